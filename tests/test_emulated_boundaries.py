"""The CUDA kernels on the SIMT executor (`cuda-emulated`) at shapes that cross each of their boundaries, against
the pure-PyTorch reference: values and gradients, both paths, float64 and float32.

The kernels' decomposition (csrc/include/lgm_ext/launch.h): row kernels one warp per row, 4 rows a block; the
direct path's class kernel sums rows in chunks of 256 (kChunkRows) over blocks of 128 columns (kClassThreads);
element kernels 256 threads a block.  So: N above 256 and not a multiple of it (and of 4), K and D below, at
and above a warp (32), D above a class block (128).  (The GEMM path's class tiles, 256 classes at the least,
are crossed by tests/test_lgm_ops_edge_cases.py's many-tiles test.)  Kept cheap for the fast tier: no gradcheck
here, the loss's value, logits and the three gradients against the reference's autograd."""
import pytest
import torch
from helpers import lgm_inputs

import lgm_ext
from lgm_ext import reference as R
from lgm_ext._testing import cuda_emulation, simt_orders

pytestmark = pytest.mark.kernels

# (N, K, D): what each crosses
SHAPES = [
    (301, 3, 5),    # N: a full 256-row chunk and 45 rows more (301 = 4 * 75 + 1: a last row block of one warp)
    (513, 2, 1),    # N: two full chunks and one row; D = 1
    (261, 33, 7),   # N over a chunk; K = a warp and one
    (37, 31, 129),  # D over a class block (two blocks in y) and over 4 warps; K just under a warp
    (6, 65, 33),    # K over two warps, D a warp and one
    (1, 1, 32),     # one row, one class, D exactly a warp
]
IDS = [f"{n}x{k}x{d}" for n, k, d in SHAPES]


def _tolerance(dtype):
    # float64: the kernels and the reference differ in summation order only; float32: its rounding over
    # sums of up to D terms and the softmax's exponentials (the tolerances torch.testing uses, loosened for D)
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("impl", ["direct", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_emulated_kernels_match_the_reference_across_boundaries(shape, dtype, impl):
    x, mu, s, y = lgm_inputs(*shape, dtype=torch.float64, seed=sum(shape))
    ref_loss = R.lgm_loss(x, mu, s, y, alpha=0.5, lambda_=0.1)
    ref_logits = R.lgm_logits(x, mu, s)  # the loss returns the margin-free logits
    ref_grads = torch.autograd.grad(ref_loss + (ref_logits * torch.linspace(-1, 1, shape[1], dtype=x.dtype)).sum(),
                                    (x, mu, s))
    xe, mue, se = (t.detach().to(dtype).requires_grad_() for t in (x, mu, s))
    with cuda_emulation():
        loss, logits = lgm_ext.lgm_loss_and_logits(xe, mue, se, y, alpha=0.5, lambda_=0.1, impl=impl)
        grads = torch.autograd.grad(loss + (logits * torch.linspace(-1, 1, shape[1], dtype=dtype)).sum(),
                                    (xe, mue, se))
    tol = _tolerance(dtype)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), **tol)
    torch.testing.assert_close(logits.double(), ref_logits.detach(), **tol)
    for name, got, want in zip(("features", "means", "log_var"), grads, ref_grads):
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("impl", ["direct", "gemm"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=[IDS[0], IDS[3]])
def test_emulated_kernels_give_the_same_bytes_under_other_thread_orders(shape, impl):
    """Every launch of a forward and backward run again in reverse order and a shuffled order (blocks and the
    threads in each), what it wrote restored in between: a race-free kernel leaves the same bytes."""
    x, mu, s, y = lgm_inputs(*shape, seed=5)
    with cuda_emulation(), simt_orders(3):
        loss, logits = lgm_ext.lgm_loss_and_logits(x, mu, s, y, alpha=0.5, lambda_=0.1, impl=impl)
        torch.autograd.grad(loss + logits.sum(), (x, mu, s))
        lgm_ext.pgd_step(x.detach(), x.detach(), x.detach() + 0.1, alpha=0.01, eps=0.03)
