"""Test and benchmark hooks (private: not part of the public API).

Operators that exist only for the test suite and the benchmarks are registered
with a leading underscore in ``torch.ops.lgm_ext`` and wrapped here.  Those of
the SIMT executor live in a separate extension module, ``lgm_ext._simt``
(csrc/simt/), which the production library never loads; ``executor()`` loads it:

- ``_set_cuda_emulation(on) -> previous``: route the CPU operators through the
  CUDA kernels' own source (csrc/cuda/*.cuh) run on the CPU by the SIMT executor
  (csrc/simt/simt.cpp: every thread of every block, CUDA's barrier and shuffle
  semantics, bounds checks, read-write race tracking, outputs that must be
  filled checked).  The test suite runs every device-parametrized test this way
  as ``cuda-emulated``.
- ``_simt_set_orders(n) -> previous``: run every launch under ``n`` thread
  orders and require the same result (``simt_orders``).
- ``_simt_fault(kind)``: one small deliberately wrong kernel (tests/test_simt.py).

The others act on the production kernels (``lgm_ext._C``):
- ``_flush_denormal_all_threads(on) -> ok``: set flush-to-zero on the calling
  thread *and* on every ATen worker thread (``torch.set_flush_denormal`` sets
  only the calling thread); benchmarks call it for every side.
- ``_set_max_grid_z(z) -> previous``: the z extent one CUDA launch may use
  (CUDA's limit, 65,535, by default); lowered, the launches that split a
  larger z extent (csrc/include/lgm_ext/launch.h) split on small inputs, and
  the emulation refuses a launch beyond it as CUDA would.
- ``_set_tensor_core_gemms(on) -> previous``: run the GEMM path's GEMMs on the
  tensor cores, split into bfloat16 parts at float32 accuracy (csrc/gemm.h; CUDA
  and its emulation; off by default).
- ``_mm16_calls() -> count``: how many 16-bit tensor-core GEMMs the GEMM path
  has run, so a test can tell which GEMMs a call used.
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from ._ops import HAVE_KERNELS, require_kernels
from ._ops import ops as _library


class _Hooks:
    """The private operators, refused with a clear error where the compiled kernels are missing."""

    def __getattr__(self, name):
        if not HAVE_KERNELS:
            require_kernels(f"lgm_ext._testing ({name})")
        return getattr(_library, name)


ops = _Hooks()

__all__ = ["cuda_emulation", "executor", "flush_denormals", "max_grid_z", "mm16_calls", "simt_orders",
           "tensor_core_gemms"]


def executor():
    """Load the SIMT executor's module ``lgm_ext._simt`` (once) and return it: its operators
    (``_set_cuda_emulation``, ``_simt_set_orders``, ``_simt_fault``) are then in ``torch.ops.lgm_ext``."""
    if not HAVE_KERNELS:
        require_kernels("lgm_ext._testing.executor")
    return importlib.import_module("lgm_ext._simt")


@contextlib.contextmanager
def cuda_emulation(on: bool = True):
    """Within the block, CPU tensors run through the CUDA kernels on the SIMT executor."""
    executor()
    old = ops._set_cuda_emulation(bool(on))
    try:
        yield
    finally:
        ops._set_cuda_emulation(old)


def flush_denormals(on: bool = True) -> bool:
    """Flush denormals to zero on the calling thread and on every ATen worker thread."""
    torch.set_flush_denormal(on)
    return bool(ops._flush_denormal_all_threads(on))


@contextlib.contextmanager
def max_grid_z(z: int):
    """Within the block, a CUDA launch (real or emulated) uses at most ``z`` blocks in grid.z."""
    old = ops._set_max_grid_z(int(z))
    try:
        yield
    finally:
        ops._set_max_grid_z(old)


def mm16_calls() -> int:
    """The number of 16-bit (tensor-core) GEMMs the GEMM path has run in this process."""
    return int(ops._mm16_calls())


@contextlib.contextmanager
def tensor_core_gemms(on: bool = True):
    """Within the block, the GEMM path's GEMMs run on the tensor cores (split into bf16 parts) where the
    backend has them (CUDA, and its emulation)."""
    old = ops._set_tensor_core_gemms(bool(on))
    try:
        yield
    finally:
        ops._set_tensor_core_gemms(old)


@contextlib.contextmanager
def simt_orders(n: int):
    """Within the block, every launch on the SIMT executor runs under ``n`` thread orders (index order, reverse
    order, then seeded shuffles), what it wrote restored between them, and must leave the same bytes."""
    executor()
    old = ops._simt_set_orders(int(n))
    try:
        yield
    finally:
        ops._simt_set_orders(old)
