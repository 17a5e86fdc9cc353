"""The fused L-GM operators against the pure-PyTorch reference (SPEC section 1-2)."""
import contextlib
import itertools
import math
from functools import partial

import pytest
import torch
from helpers import lgm_inputs, noncontiguous

import lgm_ext
from lgm_ext import reference as R
from lgm_ext._ops import ops

SHAPES = [(1, 1, 1), (1, 4, 3), (6, 1, 5), (5, 3, 1), (7, 5, 3), (16, 12, 9), (4, 200, 2), (9, 2, 64)]
HYPER = [(0.0, 0.0), (1.0, 0.1), (0.3, 0.0), (0.0, 0.5)]
IMPLS = ["direct", "gemm"]


def loss_and_logits(x, mu, s, y, alpha, lambda_, reduction="mean", impl="auto"):
    return lgm_ext.lgm_loss_and_logits(x, mu, s, y, alpha=alpha, lambda_=lambda_, reduction=reduction, impl=impl)


# --------------------------------------------------------------------------- gradcheck (float64)
# K = 200 classes: 800 numerically differentiated parameters per seed, minutes of float64 gradcheck (slow tier)
GRAD_SHAPES = [pytest.param(s, marks=pytest.mark.slow) if s[1] >= 200 else s for s in SHAPES]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", GRAD_SHAPES)
@pytest.mark.parametrize("identity", [False, True])
def test_gradcheck_loss(device, impl, shape, identity):
    for seed, (alpha, lambda_) in zip(range(3), itertools.cycle(HYPER)):
        x, mu, s, y = lgm_inputs(*shape, device=device, identity=identity, seed=seed + 10 * shape[2])
        inputs = (x, mu) if identity else (x, mu, s)

        def f(*t, y=y, alpha=alpha, lambda_=lambda_):
            xs, ms = t[0], t[1]
            ss = None if identity else t[2]
            loss, logits = loss_and_logits(xs, ms, ss, y, alpha, lambda_, impl=impl)
            return loss, logits

        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_gradcheck_reductions(device, impl, reduction):
    x, mu, s, y = lgm_inputs(6, 4, 3, device=device, seed=3)
    assert torch.autograd.gradcheck(
        lambda a, b, c: lgm_ext.lgm_loss(a, b, c, y, alpha=0.5, lambda_=0.2, reduction=reduction, impl=impl),
        (x, mu, s),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_labels", [False, True])
def test_gradcheck_logits_and_likelihood(device, impl, with_labels):
    x, mu, s, y = lgm_inputs(5, 4, 3, device=device, seed=4)
    labels = y if with_labels else None
    assert torch.autograd.gradcheck(lambda a, b, c: lgm_ext.lgm_logits(a, b, c, labels, alpha=0.7, impl=impl),
                                    (x, mu, s))
    assert torch.autograd.gradcheck(lambda a, b, c: lgm_ext.lgm_log_likelihood(a, b, c, impl=impl), (x, mu, s))


# --------------------------------------------------------------------------- values vs reference
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES + [(33, 300, 40), (64, 10, 100)])
@pytest.mark.parametrize("identity", [False, True])
def test_matches_reference_float64(device, impl, shape, identity):
    x, mu, s, y = lgm_inputs(*shape, device=device, identity=identity, seed=1)
    for reduction in ("mean", "sum", "none"):
        loss, logits = loss_and_logits(x, mu, s, y, 1.0, 0.1, reduction, impl=impl)
        ref = R.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1, reduction=reduction)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits, R.lgm_logits(x, mu, s), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lgm_ext.lgm_logits(x, mu, s, y, alpha=0.4), R.lgm_logits(x, mu, s, y, alpha=0.4))
    torch.testing.assert_close(lgm_ext.lgm_log_likelihood(x, mu, s), R.lgm_log_likelihood(x, mu, s))


def _grads(fn, x, mu, s, y):
    for t in (x, mu, s):
        if t is not None:
            t.grad = None
    fn(x, mu, s, y, alpha=1.0, lambda_=0.1).backward()
    return [t.grad.clone() for t in (x, mu, s) if t is not None]


def _err(a, b):
    return max((p.double() - q.double()).abs().max().item() for p, q in zip(a, b))


@pytest.mark.parametrize("impl,plain", [("direct", R.lgm_loss), ("gemm", R.lgm_loss_gemm)])
@pytest.mark.parametrize("shape", [(64, 10, 2), (256, 10, 100), (32, 300, 64), (8, 1000, 16)])
def test_float32_no_worse_than_plain_pytorch(device, impl, plain, shape):
    """Float32 error (against float64 truth) within a small factor of the same formula in plain float32 PyTorch."""
    x64, mu64, s64, y = lgm_inputs(*shape, device=device, seed=2, spread=0.5)
    truth_loss = R.lgm_loss(x64, mu64, s64, y, alpha=1.0, lambda_=0.1).item()
    truth = _grads(R.lgm_loss, x64, mu64, s64, y)
    x, mu, s = (t.detach().float().requires_grad_() for t in (x64, mu64, s64))
    ours_loss = lgm_ext.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1, impl=impl).item()
    ours = _grads(partial(lgm_ext.lgm_loss, impl=impl), x, mu, s, y)
    plain_loss = plain(x, mu, s, y, alpha=1.0, lambda_=0.1).item()
    theirs = _grads(plain, x, mu, s, y)
    scale = max(1.0, abs(truth_loss))
    assert abs(ours_loss - truth_loss) <= 4 * abs(plain_loss - truth_loss) + 1e-6 * scale
    gscale = max(g.abs().max().item() for g in truth)
    assert _err(ours, truth) <= 4 * _err(theirs, truth) + 1e-6 * gscale


def test_paths_agree(device):
    for shape in [(7, 5, 3), (40, 120, 70), (3, 1, 9)]:
        x, mu, s, y = lgm_inputs(*shape, device=device, seed=5)
        a = _grads(partial(lgm_ext.lgm_loss, impl="direct"), x, mu, s, y)
        la = lgm_ext.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1, impl="direct")
        b = _grads(partial(lgm_ext.lgm_loss, impl="gemm"), x, mu, s, y)
        lb = lgm_ext.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1, impl="gemm")
        torch.testing.assert_close(la, lb)
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q)


@pytest.mark.parametrize("identity", [False, True])
def test_direct_row_and_class_blocks(device, identity):
    """The CPU direct loops work on blocks of 8 rows, 4/2/1 classes, 64-feature partial sums and 32/8/4/1-column
    register blocks: every remainder of N, K and D against the float64 reference, values and gradients."""
    for n, k, d in [(n, k, d) for n in (1, 7, 8, 9, 17) for k in (1, 2, 3, 5, 7) for d in (1, 5, 64, 65, 130)]:
        x, mu, s, y = lgm_inputs(n, k, d, device=device, identity=identity, seed=n + 10 * k + 100 * d)
        loss, logits = loss_and_logits(x, mu, s, y, 1.0, 0.1, "none", impl="direct")
        torch.testing.assert_close(loss, R.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1, reduction="none"),
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(logits, R.lgm_logits(x, mu, s), rtol=1e-10, atol=1e-10)
        ours = _grads(partial(lgm_ext.lgm_loss, impl="direct"), x, mu, s, y)
        torch.testing.assert_close(ours, _grads(R.lgm_loss, x, mu, s, y), rtol=1e-9, atol=1e-10)
    x, mu, s, y = lgm_inputs(11, 6, 130, device=device, identity=identity, seed=7)
    inputs = (x, mu) if identity else (x, mu, s)
    assert torch.autograd.gradcheck(
        lambda *t: loss_and_logits(t[0], t[1], None if identity else t[2], y, 1.0, 0.1, impl="direct"), inputs,
        eps=1e-6, atol=1e-5, rtol=1e-4)


def test_auto_path_switches_at_threshold(device):
    # Both sides of the K*D threshold give the reference answer.
    for k, d in [(8, 1024), (9, 1024)]:
        x, mu, s, y = lgm_inputs(4, k, d, device=device, seed=6, spread=0.05)
        torch.testing.assert_close(
            lgm_ext.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1), R.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1)
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_noncontiguous_inputs(device, impl):
    x, mu, s, y = lgm_inputs(9, 6, 5, device=device, seed=7)
    want = _grads(lgm_ext.lgm_loss, x, mu, s, y)
    xn, mun, sn = noncontiguous(x), noncontiguous(mu), noncontiguous(s)
    yn = torch.stack([y, y], 1)[:, 0]
    assert not yn.is_contiguous()
    got = _grads(partial(lgm_ext.lgm_loss, impl=impl), xn, mun, sn, yn)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q)


def test_int32_labels(device):
    x, mu, s, y = lgm_inputs(5, 4, 3, device=device)
    torch.testing.assert_close(lgm_ext.lgm_loss(x, mu, s, y.int()), lgm_ext.lgm_loss(x, mu, s, y))


def test_unused_outputs(device):
    """Backward through only the loss, only the logits, or both."""
    x, mu, s, y = lgm_inputs(6, 4, 3, device=device, seed=8)
    loss, logits = loss_and_logits(x, mu, s, y, 1.0, 0.1)
    gx_logits = torch.autograd.grad(logits.sum(), x, retain_graph=True)[0]
    ref_logits = R.lgm_logits(x, mu, s)
    torch.testing.assert_close(gx_logits, torch.autograd.grad(ref_logits.sum(), x)[0])
    gx_loss = torch.autograd.grad(loss, x)[0]
    torch.testing.assert_close(gx_loss, torch.autograd.grad(R.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1), x)[0])


def test_far_features_are_finite_and_exact(device):
    """Features far from every mean: probabilities underflow; loss and gradients stay finite and right."""
    x, mu, s, y = lgm_inputs(8, 5, 4, device=device, seed=9)
    with torch.no_grad():
        x.mul_(30.0)
    for impl in IMPLS:
        got = _grads(partial(lgm_ext.lgm_loss, impl=impl), x, mu, s, y)
        want = _grads(R.lgm_loss, x, mu, s, y)
        for p, q in zip(got, want):
            assert torch.isfinite(p).all()
            torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


def test_float32_tiny_probabilities_are_flushed(device):
    """Coefficients of classes with probability below float32's normal range are exactly 0, not denormal."""
    x = torch.zeros(1, 1, device=device)
    mu = torch.tensor([[0.0], [20.0]], device=device, requires_grad=True)
    y = torch.zeros(1, dtype=torch.long, device=device)
    lgm_ext.lgm_loss(x, mu, None, y).backward()
    g = mu.grad[1, 0].item()  # p_1 = exp(-200) underflows: exactly zero gradient
    assert g == 0.0


# --------------------------------------------------------------------------- torch.library
def _opcheck_samples(device):
    x, mu, s, y = lgm_inputs(5, 4, 3, device=device, seed=11)
    loss, logits, stats = ops.lgm_loss_forward(x.detach(), mu.detach(), s.detach(), y, 1.0, 0.1, 1, 0)
    g = torch.ones((), dtype=x.dtype, device=device)
    return x, mu, s, y, loss, logits, stats, g


@pytest.mark.kernels
@pytest.mark.parametrize("impl", [1, 2])
def test_opcheck(device, impl):
    x, mu, s, y, _loss, logits, stats, g = _opcheck_samples(device)
    for red in (0, 1, 2):
        torch.library.opcheck(ops.lgm_loss_forward.default, (x, mu, s, y, 1.0, 0.1, red, impl))
        torch.library.opcheck(ops.lgm_loss_forward.default, (x, mu, None, y, 0.5, 0.0, red, impl))
    xd, mud, sd = x.detach(), mu.detach(), s.detach()
    torch.library.opcheck(ops.lgm_loss_backward.default, (g, None, xd, mud, sd, y, logits, stats, 1.0, 0.1, 1, impl))
    # memory-lean: no saved logits (recomputed in class tiles), and only some gradients wanted
    torch.library.opcheck(
        ops.lgm_loss_backward.default,
        (g, torch.randn_like(logits), xd, mud, sd, y, None, stats, 1.0, 0.1, 1, impl, [True, False, True]),
    )
    torch.library.opcheck(ops.lgm_logits.default, (x, mu, s, y, 0.3, impl))
    torch.library.opcheck(ops.lgm_logits.default, (x, mu, None, None, 0.0, impl))
    torch.library.opcheck(ops.lgm_logits_backward.default, (torch.randn_like(logits), xd, mud, sd, y, 0.3, impl))
    torch.library.opcheck(
        ops.lgm_logits_backward.default,
        (torch.randn_like(logits), xd, mud, None, None, 0.0, impl, [True, False, False]),
    )
    torch.library.opcheck(ops.lgm_log_likelihood.default, (x, mu, s, impl))


def test_torch_compile_fullgraph(device):
    x, mu, s, y = lgm_inputs(12, 5, 4, device=device, dtype=torch.float32, seed=12)

    def step(x, mu, s, y):
        loss, logits = lgm_ext.lgm_loss_and_logits(x, mu, s, y, alpha=1.0, lambda_=0.1)
        return loss + 0.01 * logits.logsumexp(1).mean()

    want = _grads(lambda a, b, c, d, **_: step(a, b, c, d), x, mu, s, y)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = _grads(lambda a, b, c, d, **_: compiled(a, b, c, d), x, mu, s, y)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q)


def test_torch_compile_inductor(device):
    x, mu, s, y = lgm_inputs(12, 5, 4, device=device, dtype=torch.float32, seed=13)
    compiled = torch.compile(lambda a, b, c, d: lgm_ext.lgm_loss(a, b, c, d, alpha=1.0, lambda_=0.1) * 2.0,
                             fullgraph=True)
    got = _grads(lambda a, b, c, d, **_: compiled(a, b, c, d), x, mu, s, y)
    want = _grads(lambda a, b, c, d, **_: 2.0 * R.lgm_loss(a, b, c, d, alpha=1.0, lambda_=0.1), x, mu, s, y)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- malformed input
def _bad_cases(device):
    x, mu, s, y = lgm_inputs(4, 3, 2, device=device, requires_grad=False)
    ok = dict(features=x, means=mu, log_var=s, labels=y)
    cases = [
        ("labels", dict(labels=torch.tensor([0, 1, 3, 0], device=device)), ValueError),
        ("labels", dict(labels=torch.tensor([0, -1, 2, 0], device=device)), ValueError),
        ("labels", dict(labels=y.float()), TypeError),
        ("labels", dict(labels=y[:3]), ValueError),
        ("labels", dict(labels=y.view(2, 2)), ValueError),
        ("features", dict(features=x[0]), ValueError),
        ("features", dict(features=x.unsqueeze(0)), ValueError),
        ("D=", dict(features=torch.randn(4, 5, dtype=x.dtype, device=device)), ValueError),
        ("log_var", dict(log_var=s[:2]), ValueError),
        ("means", dict(means=mu.float()), TypeError),
        ("log_var", dict(log_var=s.float()), TypeError),
        ("features", dict(features=x.int(), means=mu.int(), log_var=s.int()), TypeError),
        ("features", dict(features=x.long(), means=mu.long(), log_var=None), TypeError),
        ("features", dict(features=x[:0]), ValueError),
        ("means", dict(means=mu[:0], log_var=s[:0]), ValueError),
    ]
    return ok, cases


def test_malformed_inputs_raise_clear_errors(device):
    ok, cases = _bad_cases(device)
    for needle, change, exc in cases:
        args = {**ok, **change}
        with pytest.raises(exc, match=needle):
            lgm_ext.lgm_loss(args["features"], args["means"], args["log_var"], args["labels"])


def test_malformed_scalars(device):
    x, mu, s, y = lgm_inputs(4, 3, 2, device=device, requires_grad=False)
    for kw, exc in [
        (dict(alpha=-0.1), ValueError),
        (dict(alpha=float("nan")), ValueError),
        (dict(alpha=float("inf")), ValueError),
        (dict(lambda_=-1.0), ValueError),
        (dict(lambda_=float("nan")), ValueError),
        (dict(alpha="1"), TypeError),
        (dict(reduction="avg"), ValueError),
    ]:
        with pytest.raises(exc, match=next(iter(kw)).rstrip("_") if "reduction" not in kw else "reduction"):
            lgm_ext.lgm_loss(x, mu, s, y, **kw)
    with pytest.raises(ValueError, match="alpha"):
        lgm_ext.lgm_logits(x, mu, s, y, alpha=-1.0)
    with pytest.raises(TypeError, match="features"):
        lgm_ext.lgm_loss(x.numpy() if device == "cpu" else [1.0], mu, s, y)


@pytest.mark.kernels
def test_raw_op_validates_scalars(device):
    x, mu, s, y = lgm_inputs(4, 3, 2, device=device, requires_grad=False)
    with pytest.raises(ValueError, match="alpha"):
        ops.lgm_loss_forward(x, mu, s, y, -1.0, 0.0, 1, 0)
    with pytest.raises(ValueError, match="reduction"):
        ops.lgm_loss_forward(x, mu, s, y, 0.0, 0.0, 7, 0)
    with pytest.raises(ValueError, match="impl"):
        ops.lgm_loss_forward(x, mu, s, y, 0.0, 0.0, 1, 9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a second device")
def test_mixed_devices_raise():
    x, mu, s, y = lgm_inputs(4, 3, 2, requires_grad=False)
    with pytest.raises(ValueError, match="device"):
        lgm_ext.lgm_loss(x, mu.cuda(), s.cuda(), y.cuda())


def test_log_likelihood_formula(device):
    x, mu, s, _ = lgm_inputs(6, 3, 4, device=device, requires_grad=False)
    d = R.distances(x, mu, s)
    hl = 0.5 * s.sum(1)
    best = (-d - hl).argmax(1)
    want = -d.gather(1, best[:, None]).squeeze(1) - hl[best] - 0.5 * 4 * math.log(2 * math.pi)
    torch.testing.assert_close(lgm_ext.lgm_log_likelihood(x, mu, s), want)


def test_reference_blocked_and_checkpointed_matches_single_block(monkeypatch):
    """The oracle evaluated in many checkpointed class blocks equals the one-block formula (value and gradient)."""
    x, mu, s, y = lgm_inputs(5, 7, 3, seed=14)
    want = torch.autograd.grad(R.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1), (x, mu, s))
    monkeypatch.setattr(R, "_BLOCK_ELEMS", 5 * 3 * 2)  # two classes per block
    got = torch.autograd.grad(R.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1), (x, mu, s))
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q)


def test_torch_compile_dynamic_batch_does_not_recompile(device):
    """The loss's C++ autograd formula reads sizes symbolically: a new batch size reuses the compiled graph
    (it used to specialise N, so every batch size compiled again)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda a, b, c, d: lgm_ext.lgm_loss(a, b, c, d, alpha=1.0, lambda_=0.1),
                             backend=counter, dynamic=True)
    for n in (8, 12, 20):
        x, mu, s, y = lgm_inputs(n, 5, 4, device=device, dtype=torch.float32, seed=n)
        got = _grads(lambda a, b, c, d, **_: compiled(a, b, c, d), x, mu, s, y)
        want = _grads(lgm_ext.lgm_loss, x, mu, s, y)
        for p, q in zip(got, want):
            torch.testing.assert_close(p, q)
    assert counter.frame_count == 1


# --------------------------------------------------------------------------- CUDA launch limits (issue 22, item 18)
GPU_BACKENDS = ["cuda-emulated"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.kernels
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_class_gradient_launch_splits_grid_z(backend):
    """The direct path's class-gradient kernel put ceil(N / 256) row chunks in grid.z, which CUDA caps at 65,535:
    N above ~16.7M rows could not launch ("invalid configuration argument").  It now launches in z pieces
    (launch.h for_each_z_launch).  The emulation refuses a grid beyond the limit as CUDA does; with the limit
    lowered to 2 (lgm_ext._testing.max_grid_z), N = 1100 rows (5 chunks) take 3 launches, and the gradients are
    bitwise those of one launch (the chunks are summed in the same order).  Before the fix the lowered limit
    made the single launch fail."""
    from lgm_ext._testing import cuda_emulation, max_grid_z

    ctx = cuda_emulation() if backend == "cuda-emulated" else contextlib.nullcontext()
    device = "cpu" if backend == "cuda-emulated" else backend
    with ctx:
        x, mu, s, y = lgm_inputs(1100, 3, 5, device=device, dtype=torch.float32, seed=21)
        want = _grads(partial(lgm_ext.lgm_loss, impl="direct"), x, mu, s, y)
        with max_grid_z(2):
            got = _grads(partial(lgm_ext.lgm_loss, impl="direct"), x, mu, s, y)
            with pytest.raises(ValueError, match="max_grid_z"):
                ops._set_max_grid_z(0)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.kernels
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_direct_path_refuses_a_d_beyond_its_grid(backend):
    """grid.y of the same kernel spans D in blocks of 128 (at most 65,535): a D beyond 8,388,480 with impl='direct'
    is refused with a clear error pointing to the GEMM path (auto never takes the direct path there)."""
    from lgm_ext._testing import cuda_emulation

    ctx = cuda_emulation() if backend == "cuda-emulated" else contextlib.nullcontext()
    device = "cpu" if backend == "cuda-emulated" else backend
    d = 128 * 65535 + 1
    with ctx:
        x = torch.zeros(1, d, device=device)
        mu = torch.zeros(1, d, device=device, requires_grad=True)
        loss = lgm_ext.lgm_loss(x, mu, None, torch.zeros(1, dtype=torch.long, device=device), impl="direct")
        with pytest.raises(ValueError, match="impl='gemm'"):
            loss.backward()
