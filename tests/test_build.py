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


@pytest.mark.kernels
def test_emulation_switch_restores():
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
