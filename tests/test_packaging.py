"""Packaging (issue 9): the sdist carries every source and header and builds a wheel on its own."""
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (path,) = out.glob("lgm_ext-*.tar.gz")
    return path


def test_sdist_contains_every_source_and_header(sdist):
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    wanted = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    wanted |= {"setup.py", "pyproject.toml", "README.md", "LICENSE", "lgm_ext/py.typed", "lgm_lab/py.typed"}
    wanted |= {str(p.relative_to(ROOT)) for d in ("lgm_ext", "lgm_lab", "lgm_cli") for p in (ROOT / d).glob("*.py")}
    missing = sorted(wanted - names)
    assert not missing, f"sdist lacks {missing}"


def test_sdist_builds_a_wheel(sdist, tmp_path):
    """A CPU-only wheel built from the unpacked sdist alone (no repository files)."""
    env = dict(os.environ, LGM_EXT_CPU_ONLY="1", LGM_EXT_REQUIRE_BUILD="1", MAX_JOBS="2")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                        "-w", str(tmp_path), str(sdist)], capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (wheel,) = tmp_path.glob("lgm_ext-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert any(n.startswith("lgm_ext/_C") and n.endswith(".so") for n in names)
    assert "lgm_ext/py.typed" in names and "lgm_lab/config.py" in names and "lgm_cli/app.py" in names
