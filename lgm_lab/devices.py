"""Devices: ``auto`` resolved once, and every device a user names checked against this machine."""
from __future__ import annotations

import torch

__all__ = ["resolve_device", "check_device"]


def resolve_device(device: str | None) -> str:
    """``"auto"`` (or None) becomes ``"cuda"`` when a GPU is available, else ``"cpu"``; any other
    value is checked with :func:`check_device`."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(device)


def check_device(device: str) -> str:
    """``device`` if this machine has it, else a ``ValueError`` that says what is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for but no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return device
