__version__ = "0.2.0"
"""The version of lgm-ext (PEP 440), read by the packaging (pyproject.toml)."""
