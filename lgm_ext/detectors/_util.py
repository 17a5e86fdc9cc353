"""Checks and row chunking the members share."""
from __future__ import annotations

import math

import torch
from torch import Tensor

_CHUNK_ELEMS = 1 << 22  # rows per chunk = _CHUNK_ELEMS // width: bounds an (rows, width) temporary


def positive_int(name: str, value, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def float_tensor(name: str, value, shape=None) -> Tensor:
    """A finite floating tensor (of ``shape``: None entries match any size), as float64; errors name ``name``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: a detector's parameters need values")
    if shape is not None and (value.dim() != len(shape) or any(s is not None and a != s for a, s in
                                                                zip(value.shape, shape))):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return value.detach().to(torch.float64)


def in_rows(fn, x: Tensor, width: int) -> Tensor:
    """``fn`` over row chunks of ``x`` so that an (rows, width) temporary stays within ~4 M elements; traced
    (torch.export / torch.compile) in one piece, without a branch on the batch size."""
    if torch.compiler.is_compiling():
        return fn(x)
    rows = max(1, _CHUNK_ELEMS // max(1, width))
    if x.shape[0] <= rows:
        return fn(x)
    return torch.cat([fn(x[i:i + rows]) for i in range(0, x.shape[0], rows)])


def nan_rows(x: Tensor) -> Tensor:
    """0 for finite rows, NaN for rows holding NaN or Inf: added to a score so that NaN in gives NaN out."""
    return x.sum(1) * 0
