"""Issue 12: bfloat16 / float16 storage, autocast, and the dtype seam (csrc/host.h).

Oracle: the float64 reference evaluated on the *same* 16-bit inputs (widened exactly), so the only error
measured is the operator's: it computes in float32 and rounds each gradient once to the storage dtype.
Tolerances, from the dtype's machine epsilon eps (bf16: 2^-7, fp16: 2^-10):
  loss, logits, row statistics (float32 outputs): the float32 bound of tests/test_lgm_ops.py, 1e-5 relative
    to the row's magnitude;
  gradients (storage dtype): |err| <= eps * |ref| + eps * 1e-3 * max|ref|  (one rounding is eps / 2 relative;
    the second term covers float32 cancellation in entries far below the largest, and fp16 subnormals).
On CUDA (and in its emulation, `cuda-emulated`) the GEMM path's GEMMs run on the tensor cores, their float32
operands split into bfloat16 parts (csrc/gemm.h); the same tolerances apply, and the tests at the end check that
the split runs where it should and stays accurate where a plain 16-bit rounding of the operands would not.
"""
import contextlib
from functools import partial

import pytest
import torch
from helpers import lgm_inputs

import lgm_ext
from lgm_ext import reference as R
from lgm_ext._ops import acc_dtype
from lgm_ext._testing import cuda_emulation, mm16_calls, tensor_core_gemms

ops = torch.ops.lgm_ext
LOW = [torch.bfloat16, torch.float16]


def _eps(dtype):
    return torch.finfo(dtype).eps


def _low_inputs(shape, dtype, device, seed=3, identity=False):
    x, mu, s, y = lgm_inputs(*shape, device=device, seed=seed, spread=0.5, identity=identity, requires_grad=False)
    low = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, mu, s)]
    wide = [t.detach().double().requires_grad_() if t is not None else None for t in low]
    return low, wide, y


def _grads(fn, ts, y, **kw):
    loss = fn(*ts, y, alpha=1.0, lambda_=0.1, **kw)
    present = [t for t in ts if t is not None]
    return loss, torch.autograd.grad(loss, present)


def _assert_grad_close(got, want, dtype):
    assert got.dtype == dtype
    err = (got.double() - want).abs()
    bound = _eps(dtype) * want.abs() + _eps(dtype) * 1e-3 * want.abs().max()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3g} (eps={_eps(dtype)})"


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("impl", ["direct", "gemm"])
@pytest.mark.parametrize("shape", [(16, 10, 2), (33, 12, 40), (20, 300, 32)])
@pytest.mark.parametrize("identity", [False, True])
def test_low_precision_matches_float64_reference(device, dtype, impl, shape, identity):
    _check_low_precision(device, dtype, impl, shape, identity)


def _check_low_precision(device, dtype, impl, shape, identity):
    low, wide, y = _low_inputs(shape, dtype, device, identity=identity)
    loss, grads = _grads(partial(lgm_ext.lgm_loss, impl=impl), low, y)
    ref_loss, ref_grads = _grads(R.lgm_loss, wide, y)
    assert loss.dtype == torch.float32  # the loss is returned in the accumulation type
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        _assert_grad_close(g, r, dtype)
    # logits and log-likelihood, float32, and their gradients in the storage dtype
    logits = lgm_ext.lgm_logits(*low, y, alpha=0.5, impl=impl)
    ref_logits = R.lgm_logits(*wide, y, alpha=0.5)
    assert logits.dtype == torch.float32
    scale = ref_logits.detach().abs().amax(1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(logits.double() / scale, ref_logits.detach() / scale, rtol=0, atol=1e-5)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(logits.device)
    present = [t for t in low if t is not None]
    g_ours = torch.autograd.grad((logits.double() * w).sum(), present)
    g_ref = torch.autograd.grad((ref_logits * w).sum(), [t for t in wide if t is not None])
    for g, r in zip(g_ours, g_ref):
        _assert_grad_close(g, r, dtype)
    ll = lgm_ext.lgm_log_likelihood(*low, impl=impl)
    assert ll.dtype == torch.float32
    torch.testing.assert_close(ll.double(), R.lgm_log_likelihood(*wide).detach(), rtol=1e-5, atol=1e-4)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_class_sharded_partials(device, dtype):
    """class_offset (issue 14) takes the 16-bit path too."""
    low, _, y = _low_inputs((12, 9, 6), dtype, device)
    _, _, stats = ops.lgm_loss_forward(*[t.detach() for t in low], y, 1.0, 0.1, 0, 0)
    part, _, st = ops.lgm_loss_forward(low[0].detach(), low[1][4:].detach(), low[2][4:].detach(), y, 1.0, 0.1, 0, 0, 4)
    assert part.dtype == st.dtype == torch.float32
    own = y >= 4
    lse0 = ops.lgm_loss_forward(low[0].detach(), low[1][:4].detach(), low[2][:4].detach(), y, 1.0, 0.1, 0, 0,
                                0)[2][:, 0]
    torch.testing.assert_close(torch.logaddexp(lse0, st[:, 0]), stats[:, 0], rtol=1e-5, atol=1e-5)
    assert bool((st[~own, 1] == 1).all())


@pytest.mark.parametrize("dtype", LOW)
def test_mixed_storage_dtypes_raise_and_point_to_autocast(dtype):
    low, _, y = _low_inputs((6, 4, 3), dtype, "cpu")
    with pytest.raises(TypeError, match="autocast"):
        lgm_ext.lgm_loss(low[0], low[1].float(), low[2].float(), y)


@pytest.mark.parametrize("dtype", LOW)
def test_autocast_cpu(dtype):
    """Inside torch.autocast a low-precision backbone feeds float32 head parameters: the operators run in
    float32 (the documented policy), the backbone's gradient comes back in its dtype."""
    torch.manual_seed(0)
    backbone = torch.nn.Linear(8, 5)
    head = lgm_ext.LGMLoss(4, 5, alpha=1.0, lambda_=0.1)
    inp = torch.randn(16, 8)
    y = torch.randint(0, 4, (16,))
    with torch.autocast("cpu", dtype=dtype):
        feats = backbone(inp)
        assert feats.dtype == dtype
        loss, _ = head(feats, y)
        logits = lgm_ext.lgm_logits(feats, head.means, head.log_var)
        ll = lgm_ext.lgm_log_likelihood(feats, head.means, head.log_var)
    assert loss.dtype == logits.dtype == ll.dtype == torch.float32
    loss.backward()
    assert head.means.grad.dtype == torch.float32 and backbone.weight.grad.dtype == torch.float32
    # the same step without autocast on the float32 copy of the rounded features
    f32 = feats.detach().float().requires_grad_()
    head2 = lgm_ext.LGMLoss(4, 5, alpha=1.0, lambda_=0.1)
    head2.load_state_dict(head.state_dict())
    loss2, _ = head2(f32, y)
    loss2.backward()
    torch.testing.assert_close(loss.detach(), loss2.detach())
    torch.testing.assert_close(head.means.grad, head2.means.grad)
    torch.testing.assert_close(head.log_var.grad, head2.log_var.grad)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", LOW)
def test_opcheck_low_precision(device, dtype):
    low, _, y = _low_inputs((9, 6, 5), dtype, device)
    x, mu, s = low
    loss, logits, stats = ops.lgm_loss_forward(x.detach(), mu.detach(), s.detach(), y, 1.0, 0.1, 1, 0)
    for impl in (1, 2):
        torch.library.opcheck(ops.lgm_loss_forward.default, (x, mu, s, y, 1.0, 0.1, 1, impl))
        torch.library.opcheck(ops.lgm_logits.default, (x, mu, s, y, 0.3, impl))
        torch.library.opcheck(ops.lgm_log_likelihood.default, (x, mu, s, impl))
        torch.library.opcheck(ops.lgm_loss_backward.default,
                              (torch.ones((), dtype=acc_dtype(dtype), device=x.device), None, x.detach(), mu.detach(),
                               s.detach(), y, logits, stats, 1.0, 0.1, 1, impl))
    xp = torch.rand(4, 6, dtype=dtype, device=x.device)
    torch.library.opcheck(ops.pgd_step.default, (xp, torch.randn_like(xp), xp.clone(), 0.1, 0.2, 0.0, 1.0))


@pytest.mark.parametrize("dtype", LOW)
def test_torch_compile_low_precision(device, dtype):
    low, _, y = _low_inputs((12, 5, 4), dtype, device)

    def step(x, mu, s, y):
        loss, logits = lgm_ext.lgm_loss_and_logits(x, mu, s, y, alpha=1.0, lambda_=0.1)
        return loss + 0.01 * logits.logsumexp(1).mean()

    want_loss = step(*low, y)
    want = torch.autograd.grad(want_loss, low)
    compiled = torch.compile(step, fullgraph=True)
    got_loss = compiled(*low, y)
    got = torch.autograd.grad(got_loss, low)
    assert got_loss.dtype == torch.float32
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype", LOW)
def test_pgd_step_low_precision(device, dtype):
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(4, 3, 8, 8, generator=g).to(device).to(dtype)
    x = (x0.float() + 0.05 * torch.randn(x0.shape, generator=g).to(device)).clamp(0, 1).to(dtype)
    grad = torch.randn(x0.shape, generator=g).to(device).to(dtype)
    grad[0, 0, 0, :4] = 0
    want = R.pgd_step(x.double(), grad.double(), x0.double(), alpha=2 / 255, eps=8 / 255)
    got = lgm_ext.pgd_step(x, grad, x0, alpha=2 / 255, eps=8 / 255)
    assert got.dtype == dtype
    # computed in float32 and rounded once: within one unit in the last place of the float64 result
    ulp = _eps(dtype) * want.abs().clamp_min(2 ** -14)
    assert bool(((got.double() - want).abs() <= ulp).all())
    buf = x.clone()
    lgm_ext.pgd_step_(buf, grad, x0, alpha=2 / 255, eps=8 / 255)
    assert torch.equal(buf, got)


# ----------------------------------------------------------------------------- tensor cores (issue 23)
GPU_BACKENDS = ["cuda-emulated"] + (["cuda"] if torch.cuda.is_available() else [])


@contextlib.contextmanager
def _on(backend, tensor_cores=True):
    """The device to put tensors on for ``backend``; within the block the CUDA emulation (for
    "cuda-emulated") and the tensor-core GEMMs (csrc/gemm.h) are on."""
    if backend == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype", "CUDA"):
        pytest.skip("this torch has no mm.dtype (torch < 2.8): the CUDA GEMMs stay float32")
    emulation = cuda_emulation() if backend == "cuda-emulated" else contextlib.nullcontext()
    with tensor_core_gemms(tensor_cores), emulation:
        yield "cpu" if backend == "cuda-emulated" else backend


@contextlib.contextmanager
def _tf32(on):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _mm16_used(fn):
    before = mm16_calls()
    fn()
    return mm16_calls() - before


def _step(dtype, device, impl="gemm", shape=(20, 300, 32)):
    x, mu, s, y = lgm_inputs(*shape, device=device, seed=3, spread=0.5, requires_grad=False)
    x, mu, s = (t.to(dtype).requires_grad_() for t in (x, mu, s))
    return lambda: lgm_ext.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1, impl=impl).backward()


@pytest.mark.kernels
@pytest.mark.parametrize("backend", ["cpu"] + GPU_BACKENDS)
def test_tensor_core_gemms_run_where_they_should(backend):
    """Switched on, the GEMM path's GEMMs run as 16-bit tensor-core GEMMs on CUDA (and in its emulation) for
    every storage dtype computed in float32 -- never for float64, never on the direct path, never on the CPU
    backend; off (the default), never."""
    gpu = backend != "cpu"
    with _on(backend, tensor_cores=False) as device:
        for dtype in (*LOW, torch.float32):
            assert _mm16_used(_step(dtype, device)) == 0
    with _on(backend) as device:
        for dtype in (*LOW, torch.float32):
            assert (_mm16_used(_step(dtype, device)) > 0) == gpu, dtype
            assert _mm16_used(_step(dtype, device, impl="direct")) == 0
        assert _mm16_used(_step(torch.float64, device)) == 0


@pytest.mark.kernels
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(33, 12, 40), (20, 300, 32)])
@pytest.mark.parametrize("identity", [False, True])
def test_tensor_core_low_precision_matches_float64_reference(backend, dtype, shape, identity):
    """The tensor-core GEMMs meet the tolerances of the widened float32 GEMMs (module docstring)."""
    with _on(backend) as device:
        before = mm16_calls()
        _check_low_precision(device, dtype, "gemm", shape, identity)
        assert mm16_calls() > before


@pytest.mark.kernels
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("identity", [False, True])
def test_tensor_core_gemms_stay_accurate_near_the_means(backend, dtype, identity):
    """Features 0.01 from their class mean, means of norm ~8: the expansion sum_j x^2 w - 2 x mu w + mu^2 w cancels
    ~10^5-fold in the labelled distance and ~100-fold in the gradients.  Rounding the float32 GEMM operands to
    16 bits would leave errors of 2^-8 |x|^2 w there, orders of magnitude beyond float32's; the bf16 parts of the
    split keep float32 accuracy: the loss and logits within the float32 bound, each gradient within twice the
    error of the CPU's float32 GEMMs on the same inputs (both against the float64 reference)."""
    g = torch.Generator().manual_seed(11)
    n, k, d = 24, 200, 64  # K * D > 8192: the GEMM path
    mu = torch.randn(k, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x = mu[y] + 0.01 * torch.randn(n, d, generator=g)
    s = None if identity else 0.1 * torch.randn(k, d, generator=g)
    low_cpu = [t.to(dtype) if t is not None else None for t in (x, mu, s)]
    wide = [t.double().requires_grad_() if t is not None else None for t in low_cpu]
    ref_loss, ref_grads = _grads(partial(R.lgm_loss, reduction="sum"), wide, y)
    ref_logits = R.lgm_logits(*wide).detach()
    native = [t.clone().requires_grad_() if t is not None else None for t in low_cpu]
    _, native_grads = _grads(partial(lgm_ext.lgm_loss, reduction="sum"), native, y)  # CPU: float32 GEMMs
    with _on(backend) as device:
        low = [t.to(device).requires_grad_() if t is not None else None for t in low_cpu]
        before = mm16_calls()
        loss, grads = _grads(partial(lgm_ext.lgm_loss, reduction="sum"), low, y.to(device))
        logits = lgm_ext.lgm_logits(*low).detach().cpu()
        assert mm16_calls() > before
    torch.testing.assert_close(loss.double().cpu(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    scale = ref_logits.abs().amax(1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(logits.double() / scale, ref_logits / scale, rtol=0, atol=1e-5)
    for got, ours_native, want in zip(grads, native_grads, ref_grads):
        err = (got.double().cpu() - want).abs().max().item()
        native_err = (ours_native.double() - want).abs().max().item()
        assert err <= 2 * native_err + 2.0 ** -20 * want.abs().max().item(), (err, native_err)


@pytest.mark.kernels
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(32, 300, 64), (8, 1000, 16), (64, 40, 256)])
def test_tensor_core_float32_keeps_float32_accuracy(backend, shape):
    """float32 storage through the tensor cores (three bf16 parts per operand) stays within the float32 test's
    bound of tests/test_lgm_ops.py: a small factor of the same formula in plain float32 PyTorch."""
    with _on(backend) as device:
        x64, mu64, s64, y = lgm_inputs(*shape, device=device, seed=2, spread=0.5)
        truth_loss = R.lgm_loss(x64, mu64, s64, y, alpha=1.0, lambda_=0.1).item()
        truth = _grads(R.lgm_loss, [x64, mu64, s64], y)[1]
        f32 = [t.detach().float().requires_grad_() for t in (x64, mu64, s64)]
        plain_loss, plain = _grads(R.lgm_loss_gemm, f32, y)
        before = mm16_calls()
        ours_loss, ours = _grads(partial(lgm_ext.lgm_loss, impl="gemm"), f32, y)
        assert mm16_calls() > before
    scale = max(1.0, abs(truth_loss))
    assert abs(ours_loss.item() - truth_loss) <= 4 * abs(plain_loss.item() - truth_loss) + 1e-6 * scale
    gscale = max(t.abs().max().item() for t in truth)
    err = max((a.double() - b).abs().max().item() for a, b in zip(ours, truth))
    plain_err = max((a.double() - b).abs().max().item() for a, b in zip(plain, truth))
    assert err <= 4 * plain_err + 1e-6 * gscale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_allow_tf32_does_not_round_the_float32_gemms():
    """With torch.backends.cuda.matmul.allow_tf32 set, cuBLAS would round float32 GEMM operands to TF32 (10-bit
    mantissas), where the expansion cancels (csrc/gemm.h); the GEMM path's GEMMs run under at::NoTF32Guard, so
    the flag changes nothing (bitwise)."""
    x, mu, s, y = lgm_inputs(64, 300, 128, device="cuda", seed=4, requires_grad=False)

    def step():
        ts = [t.float().requires_grad_() for t in (x, mu, s)]
        return _grads(partial(lgm_ext.lgm_loss, impl="gemm"), ts, y)

    with _tf32(False):
        want_loss, want = step()
    with _tf32(True):
        got_loss, got = step()
    assert torch.equal(got_loss, want_loss) and all(torch.equal(a, b) for a, b in zip(got, want))
