"""What the installed build provides."""
import pytest
import torch

import lgm_ext
from lgm_ext._testing import cuda_emulation

OPS = ["lgm_loss_forward", "lgm_loss_backward", "lgm_logits", "lgm_logits_backward", "lgm_log_likelihood",
       "pgd_step", "pgd_step_"]


@pytest.mark.kernels
@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lgm_ext::{op}", "CPU")


@pytest.mark.skipif(not lgm_ext.has_cuda_kernels(), reason="built without CUDA (LGM_EXT_CPU_ONLY or no toolkit)")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lgm_ext::{op}", "CUDA")


@pytest.mark.kernels
def test_ci_builds_cuda():
    """CI (and `make install` on a machine with torch+CUDA and nvcc) must compile and link the CUDA kernels.

    Marked ``kernels``: the pure-PyTorch run (``make test-reference``, LGM_EXT_DISABLE_KERNELS=1) skips it, because
    there the package reports no kernels by design; the fast tier checks the same build with them loaded."""
    import os

    if os.environ.get("CI") and torch.version.cuda and os.path.exists("/usr/local/cuda/bin/nvcc"):
        assert lgm_ext.has_cuda_kernels()
    else:
        pytest.skip("not a CI run with a CUDA toolkit")


# What only the tests load: the SIMT executor, the CUDA kernels compiled for it and its faulty kernels.
EXECUTOR_MARKS = [b"lgm_simt_switch", b"SIMT executor", b"_set_cuda_emulation", b"_simt_set_orders", b"_simt_fault",
                  b"read_write_kernel", b"CallCheck", b"emulated_cuda_backend"]
# The per-call emulation check and the region list the production path used to keep for the executor.
GONE_MARKS = [b"cuda_emulation_enabled", b"note_kernel_region"]


@pytest.mark.kernels
def test_production_library_carries_no_executor():
    """lgm_ext._C, which every user loads, holds no SIMT executor, no emulated kernels, no fault kernels and no
    emulation switch (the CPU operators check nothing per call); all of it is in the test module lgm_ext._simt."""
    from pathlib import Path

    from lgm_ext import _C
    from lgm_ext._testing import executor

    production = Path(_C.__file__).read_bytes()
    assert [m.decode() for m in EXECUTOR_MARKS + GONE_MARKS if m in production] == []
    test_module = Path(executor().__file__).read_bytes()
    assert [m.decode() for m in EXECUTOR_MARKS if m not in test_module] == []


@pytest.mark.kernels
def test_a_user_process_never_loads_the_executor():
    import subprocess
    import sys

    code = ("import sys, torch, lgm_ext; x = torch.randn(4, 3); lgm_ext.lgm_logits(x, torch.randn(2, 3), None); "
            "lgm_ext.pgd_step(x, x, x, alpha=0.1, eps=0.3); print('lgm_ext._simt' in sys.modules, "
            "hasattr(torch.ops.lgm_ext, '_set_cuda_emulation'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.kernels
def test_emulation_switch_restores():
    from lgm_ext._testing import executor

    executor()
    old = torch.ops.lgm_ext._set_cuda_emulation(True)
    assert torch.ops.lgm_ext._set_cuda_emulation(old) is True
    with cuda_emulation():
        assert torch.ops.lgm_ext._set_cuda_emulation(True) is True
    assert torch.ops.lgm_ext._set_cuda_emulation(old) is old


@pytest.mark.kernels
def test_emulation_matches_cpu_loops_bitwise_where_order_agrees():
    """The emulated CUDA decomposition and the CPU loops agree to rounding on a GEMM-path and a direct-path case."""
    from helpers import lgm_inputs

    for shape, impl in [((37, 45, 70), "direct"), ((37, 45, 70), "gemm"), ((300, 3, 5), "direct")]:
        x, mu, s, y = lgm_inputs(*shape, seed=3)
        a = lgm_ext.lgm_loss_and_logits(x, mu, s, y, alpha=1.0, lambda_=0.1, impl=impl)
        ga = torch.autograd.grad(a[0] + a[1].sum(), (x, mu, s))
        with cuda_emulation():
            b = lgm_ext.lgm_loss_and_logits(x, mu, s, y, alpha=1.0, lambda_=0.1, impl=impl)
            gb = torch.autograd.grad(b[0] + b[1].sum(), (x, mu, s))
        for p, q in zip((*a, *ga), (*b, *gb)):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
