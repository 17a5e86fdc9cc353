"""The fused projected sign step against its formula (SPEC section 2)."""
import pytest
import torch

import lgm_ext
from lgm_ext import reference as R
from lgm_ext._ops import ops


def _data(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=dtype)
    x = (x0 + 0.05 * torch.randn(shape, generator=g, dtype=dtype)).clamp(0, 1)
    grad = torch.randn(shape, generator=g, dtype=dtype)
    grad[grad.abs() < 0.3] = 0.0  # plenty of exact zeros: sign(0) = 0
    return x.to(device), grad.to(device), x0.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (4, 3, 5, 5), (128, 3, 32, 32), (3, 1, 28, 28)])
@pytest.mark.parametrize("alpha", [2 / 255, -2 / 255, 0.3, 0.0])
def test_matches_formula(device, dtype, shape, alpha):
    x, g, x0 = _data(shape, dtype, device)
    got = lgm_ext.pgd_step(x, g, x0, alpha=alpha, eps=4 / 255)
    want = R.pgd_step(x, g, x0, alpha=alpha, eps=4 / 255)
    assert torch.equal(got, want)
    assert got.dtype == dtype and got.shape == x.shape


def test_sign_zero_and_boundaries(device):
    x = torch.tensor([0.5, 0.5, 0.0, 1.0, 0.99, 0.01], device=device)
    x0 = torch.tensor([0.5, 0.5, 0.0, 1.0, 0.99, 0.01], device=device)
    g = torch.tensor([0.0, -0.0, -1.0, 1.0, 1.0, -1.0], device=device)
    out = lgm_ext.pgd_step(x, g, x0, alpha=0.1, eps=0.05)
    # sign(0) = 0 keeps x; steps are cut at the eps-ball, then at [0, 1].
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5, 0.0, 1.0, 1.0, 0.0], device=device))
    out = lgm_ext.pgd_step(x, g, x0, alpha=0.1, eps=0.05, lower=0.2, upper=0.8)
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5, 0.2, 0.8, 0.8, 0.2], device=device))


def test_eps_zero_returns_clipped_origin(device):
    x, g, x0 = _data((5, 5), torch.float32, device)
    assert torch.equal(lgm_ext.pgd_step(x, g, x0, alpha=1.0, eps=0.0), x0)


def test_noncontiguous_and_inplace(device):
    x, g, x0 = _data((6, 8), torch.float64, device, seed=1)
    want = R.pgd_step(x.t(), g.t(), x0.t(), alpha=0.01, eps=0.02)
    got = lgm_ext.pgd_step(x.t(), g.t(), x0.t(), alpha=0.01, eps=0.02)
    assert torch.equal(got, want)
    xt = x.clone().t()
    assert not xt.is_contiguous()
    out = lgm_ext.pgd_step_(xt, g.t(), x0.t(), alpha=0.01, eps=0.02)
    assert out is xt and torch.equal(xt, want)
    xc = x.clone()
    lgm_ext.pgd_step_(xc, g, x0, alpha=0.01, eps=0.02)
    assert torch.equal(xc, R.pgd_step(x, g, x0, alpha=0.01, eps=0.02))


def test_no_gradient(device):
    x, g, x0 = _data((4, 4), torch.float32, device)
    out = lgm_ext.pgd_step(x.requires_grad_(), g, x0, alpha=0.1, eps=0.1)
    assert not out.requires_grad


def test_errors(device):
    x, g, x0 = _data((4, 4), torch.float32, device)
    with pytest.raises(ValueError, match="eps"):
        lgm_ext.pgd_step(x, g, x0, alpha=0.1, eps=-0.1)
    with pytest.raises(ValueError, match="lower"):
        lgm_ext.pgd_step(x, g, x0, alpha=0.1, eps=0.1, lower=1.0, upper=0.0)
    with pytest.raises(ValueError, match="shape"):
        lgm_ext.pgd_step(x, g[:2], x0, alpha=0.1, eps=0.1)
    with pytest.raises(ValueError, match="shape"):
        lgm_ext.pgd_step(x, g, x0.t().reshape(2, 8), alpha=0.1, eps=0.1)
    with pytest.raises(TypeError, match="dtype"):
        lgm_ext.pgd_step(x, g.double(), x0, alpha=0.1, eps=0.1)
    with pytest.raises(TypeError, match="float32, float64, bfloat16 or float16"):
        lgm_ext.pgd_step(x.int(), g.int(), x0.int(), alpha=0.1, eps=0.1)
    if lgm_ext.has_fused_kernels():
        with pytest.raises(ValueError, match="eps"):  # the raw op checks too
            ops.pgd_step(x, g, x0, 0.1, -1.0, 0.0, 1.0)
    with pytest.raises(TypeError):
        lgm_ext.pgd_step(x, g, x0, alpha="big", eps=0.1)


@pytest.mark.kernels
def test_opcheck(device):
    x, g, x0 = _data((3, 5), torch.float32, device)
    torch.library.opcheck(ops.pgd_step.default, (x, g, x0, 0.1, 0.05, 0.0, 1.0))
    torch.library.opcheck(ops.pgd_step_.default, (x.clone(), g, x0, -0.1, 0.05, 0.0, 1.0))


def test_compiles(device):
    x, g, x0 = _data((3, 5), torch.float32, device)
    f = torch.compile(lambda a, b, c: lgm_ext.pgd_step(a, b, c, alpha=0.1, eps=0.05) * 2, fullgraph=True,
                      backend="aot_eager")
    assert torch.equal(f(x, g, x0), 2 * R.pgd_step(x, g, x0, alpha=0.1, eps=0.05))


def test_nan_propagates(device):
    """A NaN in x or x_orig gives NaN, as the formula in plain torch ops (torch.maximum / minimum propagate NaN;
    torch.sign(NaN) = 0, so a NaN gradient entry makes no step)."""
    for dtype in (torch.float32, torch.float64):
        x, g, x0 = _data((6, 5), dtype, device, seed=2)
        x[0, 1] = float("nan")
        g[1, 2] = float("nan")
        x0[2, 3] = float("nan")
        got = lgm_ext.pgd_step(x, g, x0, alpha=0.1, eps=0.05)
        want = R.pgd_step(x, g, x0, alpha=0.1, eps=0.05)
        assert torch.isnan(want[[0, 2], [1, 3]]).all() and torch.isnan(want).sum() == 2
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
        buf = x.clone()
        lgm_ext.pgd_step_(buf, g, x0, alpha=0.1, eps=0.05)
        torch.testing.assert_close(buf, want, equal_nan=True, rtol=0, atol=0)


def test_inplace_partial_overlap_raises(device):
    """Issue 22 item 12: x and x_orig (or grad) that partly share memory gave wrong values where torch's
    in-place ops raise.  Reproducer, before the fix (no error, wrong values: 12 of 100 on the CPU, 994 of 1000
    in the CUDA emulation):

        buf = torch.rand(101); g = torch.randn(100)
        lgm_ext.pgd_step_(buf[1:], g, buf[:-1], alpha=0.1, eps=0.05)

    Now every backend refuses it (a ValueError naming the argument); the same tensor (full overlap) stays
    allowed, as in torch (each element is read before it is written)."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        buf = torch.rand(1001, dtype=dtype, device=device)
        g = torch.randn(1000, dtype=dtype, device=device)
        with pytest.raises(ValueError, match="x_orig partly overlaps x"):
            lgm_ext.pgd_step_(buf[1:], g, buf[:-1], alpha=0.1, eps=0.05)
        with pytest.raises(ValueError, match="x_orig partly overlaps x"):
            lgm_ext.pgd_step_(buf[:-1], g, buf[1:], alpha=0.1, eps=0.05)
        with pytest.raises(ValueError, match="grad partly overlaps x"):
            lgm_ext.pgd_step_(buf[1:], buf[:-1], g, alpha=0.1, eps=0.05)
        if lgm_ext.has_fused_kernels():
            with pytest.raises(ValueError, match="x_orig partly overlaps x"):  # the raw op checks too
                ops.pgd_step_(buf[1:], g, buf[:-1], 0.1, 0.05, 0.0, 1.0)
        before = buf.clone()
        assert torch.equal(buf, before)  # nothing was written
        # full overlap: x_orig (and grad) is x itself
        x = buf[1:].clone()
        want = R.pgd_step(x.double(), x.double(), x.double(), alpha=0.1, eps=0.05).to(dtype)
        lgm_ext.pgd_step_(x, x, x, alpha=0.1, eps=0.05)
        assert torch.equal(x, want)
    # an x whose elements share memory cannot be written
    with pytest.raises(ValueError, match="share memory"):
        lgm_ext.pgd_step_(torch.rand(1, device=device).expand(5), torch.randn(5, device=device),
                          torch.rand(5, device=device), alpha=0.1, eps=0.05)
