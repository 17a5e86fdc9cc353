"""LGMLoss and CenterLoss modules."""
import pytest
import torch

import lgm_ext
from lgm_ext import reference as R


def test_lgm_module_forward_matches_functional(device):
    head = lgm_ext.LGMLoss(5, 3, alpha=0.5, lambda_=0.2).to(device).double()
    with torch.no_grad():
        head.log_var.normal_(0, 0.3)
    x = torch.randn(8, 3, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randint(0, 5, (8,), device=device)
    loss, logits = head(x, y)
    torch.testing.assert_close(loss, R.lgm_loss(x, head.means, head.log_var, y, alpha=0.5, lambda_=0.2))
    # inference helpers between forward and backward must not disturb the graph
    torch.testing.assert_close(logits, R.lgm_logits(x, head.means, head.log_var))
    torch.testing.assert_close(head.predict(x), logits.argmax(1))
    torch.testing.assert_close(head.log_likelihood(x), R.lgm_log_likelihood(x, head.means, head.log_var))
    loss.backward()
    assert head.means.grad is not None and head.log_var.grad is not None and x.grad is not None


def test_lgm_module_reference_backend_agrees(device):
    torch.manual_seed(1)
    fused = lgm_ext.LGMLoss(4, 6).to(device).double()
    ref = lgm_ext.LGMLoss(4, 6, impl="reference").to(device).double()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(10, 6, dtype=torch.float64, device=device)
    y = torch.randint(0, 4, (10,), device=device)
    a, b = fused(x, y), ref(x, y)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)
    a[0].backward()
    b[0].backward()
    torch.testing.assert_close(fused.means.grad, ref.means.grad)
    torch.testing.assert_close(fused.log_var.grad, ref.log_var.grad)


def test_lgm_identity_covariance_has_no_log_var():
    head = lgm_ext.LGMLoss(3, 2, covariance="identity")
    assert head.log_var is None
    assert [n for n, _ in head.named_parameters()] == ["means"]
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(head(x, y)[0], R.lgm_loss(x, head.means, None, y, alpha=1.0, lambda_=0.1))


def test_lgm_log_var_is_bounded():
    head = lgm_ext.LGMLoss(3, 2, log_var_bound=2.0)
    with torch.no_grad():
        head.log_var.fill_(-50.0)  # a collapsed variance
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    loss, _ = head(x, y)
    assert torch.isfinite(loss)
    want = R.lgm_loss(x, head.means, torch.full((3, 2), -2.0), y, alpha=1.0, lambda_=0.1)
    torch.testing.assert_close(loss, want)


def _likelihood_term(kind, x, means, log_var, y):
    """The per-sample likelihood term of each LGMLoss(likelihood=...) written out (docs/SPEC.md section 1)."""
    diff2 = (x - means[y]) ** 2
    s = torch.zeros_like(means) if log_var is None else log_var
    if kind == "identity":
        return 0.5 * diff2.sum(1)
    d = 0.5 * (diff2 * torch.exp(-s[y])).sum(1)
    return d if kind == "no-logdet" else d + 0.5 * s[y].sum(1)


@pytest.mark.parametrize("kind", ["full", "no-logdet", "identity"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_lgm_likelihood_variants_against_the_formula(device, kind, reduction):
    torch.manual_seed(3)
    head = lgm_ext.LGMLoss(5, 4, alpha=0.7, lambda_=0.3, likelihood=kind, reduction=reduction).to(device).double()
    with torch.no_grad():
        head.log_var.normal_(0, 0.5)
    x = torch.randn(9, 4, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3], device=device)
    loss, logits = head(x, y)
    per = (R.lgm_loss(x, head.means, head.log_var, y, alpha=0.7, lambda_=0.0, reduction="none")
           + 0.3 * _likelihood_term(kind, x, head.means, head.log_var, y))
    want = per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(logits, R.lgm_logits(x, head.means, head.log_var))  # logits never change
    # float64 gradients through the composition (features, means, log-variances) equal the formula's
    inputs = (x, head.means, head.log_var)
    g = torch.autograd.grad(head(x, y)[0].sum(), inputs)
    g_ref = torch.autograd.grad(want.sum(), inputs)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    torch.autograd.gradcheck(lambda xx: head(xx, y)[0], (x,))


def test_lgm_likelihood_variants_coincide_with_identity_covariance_and_differ_otherwise():
    torch.manual_seed(4)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = {}
    for kind in ("full", "no-logdet", "identity"):
        head = lgm_ext.LGMLoss(3, 3, covariance="identity", likelihood=kind)
        torch.manual_seed(0)
        head.reset_parameters()
        losses[kind] = head(x, y)[0]
    torch.testing.assert_close(losses["no-logdet"], losses["full"])
    torch.testing.assert_close(losses["identity"], losses["full"])
    head = lgm_ext.LGMLoss(3, 3, likelihood="no-logdet")
    with torch.no_grad():
        head.log_var.fill_(1.0)
    full = lgm_ext.LGMLoss(3, 3)
    full.load_state_dict(head.state_dict())
    # the log-det of this covariance is 0.5 * 3 * 1.0 per sample, weighted by lambda_ = 0.1
    torch.testing.assert_close(full(x, y)[0] - head(x, y)[0], torch.tensor(0.1 * 1.5))
    with pytest.raises(ValueError, match="likelihood"):
        lgm_ext.LGMLoss(3, 2, likelihood="none")


def test_lgm_likelihood_variant_in_low_precision_and_warmup():
    head = lgm_ext.LGMLoss(4, 8, likelihood="no-logdet", warmup_steps=4).to(torch.bfloat16)
    x, y = torch.randn(16, 8).bfloat16(), torch.randint(0, 4, (16,))
    loss, logits = head(x, y)  # first step: the ramp is 0, so no likelihood term at all
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for _ in range(4):
        loss, _ = head(x, y)
    assert torch.isfinite(loss) and head.current_lambda == pytest.approx(0.1)
    loss.backward()
    assert torch.isfinite(head.means.grad).all()


def test_lgm_module_learns_a_separable_problem():
    torch.manual_seed(0)
    centers = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    y = torch.randint(0, 3, (300,))
    x = centers[y] + 0.5 * torch.randn(300, 2)
    head = lgm_ext.LGMLoss(3, 2, alpha=0.3, lambda_=0.1)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = None
    for _ in range(100):
        loss, _ = head(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert (head.predict(x) == y).float().mean() > 0.95


def test_lgm_module_bad_arguments():
    with pytest.raises(ValueError, match="covariance"):
        lgm_ext.LGMLoss(3, 2, covariance="full")
    with pytest.raises(ValueError, match="impl"):
        lgm_ext.LGMLoss(3, 2, impl="triton")
    with pytest.raises(ValueError):
        lgm_ext.LGMLoss(0, 2)
    with pytest.raises(ValueError):
        lgm_ext.LGMLoss(3, 2, alpha=-1)


def test_center_loss_value_and_update_by_hand():
    c = lgm_ext.CenterLoss(3, 2, alpha=0.5)
    with torch.no_grad():
        c.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1])
    loss = c(x, y)
    # 0.5 * mean(|x - c_y|^2) = 0.5 * (1 + 9 + (1 + 4)) / 3
    assert loss.item() == pytest.approx(0.5 * 15 / 3)
    # Class 0: delta = ((0-1) + (0-3), (0-0) + (0-0)) / (1 + 2) = (-4/3, 0); c0 <- c0 - 0.5 delta = (2/3, 0)
    # Class 1: delta = ((1-2), (1-3)) / 2 = (-0.5, -1); c1 <- (1.25, 1.5).  Class 2 has no samples: unchanged.
    torch.testing.assert_close(c.centers, torch.tensor([[2.0 / 3.0, 0.0], [1.25, 1.5], [5.0, 5.0]]))
    loss.backward()
    # d loss / d x = (x - c_y_old) / N
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 2.0]]) / 3)


def test_center_loss_eval_mode_does_not_update():
    c = lgm_ext.CenterLoss(2, 2).eval()
    before = c.centers.clone()
    c(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))
    torch.testing.assert_close(c.centers, before)


def test_center_loss_bad_input():
    c = lgm_ext.CenterLoss(2, 2)
    with pytest.raises(ValueError):
        c(torch.randn(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError):
        c(torch.randn(3, 2), torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError):
        c(torch.randn(3, 5), torch.tensor([0, 1, 1]))


def test_lgm_module_raises_on_a_non_finite_loss_without_a_sync_per_step(monkeypatch):
    """A diverged run (NaN features, an infinite loss) raises NonFiniteLossError naming the step and the causes;
    the record is read on the host only every check_finite_every training forwards (issue 43)."""
    head = lgm_ext.LGMLoss(3, 2, check_finite_every=4)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    reads = []
    real = head.check_finite
    monkeypatch.setattr(head, "check_finite", lambda: (reads.append(int(head.step)), real())[1])
    for _ in range(3):
        head(x, y)
    head(x * float("nan"), y)  # training step 3 diverges; nothing is read yet
    assert reads == []
    with pytest.raises(lgm_ext.NonFiniteLossError, match=r"features.*at training step 3.*learning rate"):
        head(x, y)  # the 5th forward reads the record of the 4 before it
    assert reads == [4]
    head.eval()(x * float("inf"), y)  # evaluation records nothing: a fresh head, then an infinite loss only
    fresh = lgm_ext.LGMLoss(3, 2, check_finite_every=1000)  # read only when asked below
    for _ in range(10):
        fresh(x, y)
    with torch.no_grad():
        fresh.means.fill_(float("inf"))  # the loss alone becomes non-finite
    fresh(x, y)
    with pytest.raises(lgm_ext.NonFiniteLossError, match=r"the loss became NaN or infinite at training step 10"):
        fresh.check_finite()
    lgm_ext.LGMLoss(3, 2).eval()(x * float("nan"), y)  # eval mode: no record, no error
    fresh.reset_parameters()
    fresh.check_finite()  # reset clears the record
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="check_finite_every"):
            lgm_ext.LGMLoss(3, 2, check_finite_every=bad)


def test_lgm_module_with_warmup_compiles_without_a_graph_break_or_recompile():
    """torch.compile(head) with warmup_steps: one graph (fullgraph: no break) across the ramp, the same loss and
    gradients as eager (issue 43: int(self.step) broke the graph and recompiled every step)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    head = lgm_ext.LGMLoss(5, 4, warmup_steps=3, likelihood="full")
    eager = lgm_ext.LGMLoss(5, 4, warmup_steps=3)
    eager.load_state_dict(head.state_dict())
    compiled = torch.compile(head, backend="eager", fullgraph=True)
    x, y = torch.randn(8, 4), torch.randint(0, 5, (8,))
    for _ in range(6):  # through the ramp and past it
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        lc, lgc = compiled(xc, y)
        le, lge = eager(xe, y)
        torch.testing.assert_close(lc, le)
        torch.testing.assert_close(lgc, lge)
        lc.backward()
        le.backward()
        torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(head.means.grad, eager.means.grad)
    assert int(head.step) == int(eager.step) == 6
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    # every likelihood variant and reduction: the ramped form equals the eager one at every point of the ramp
    for kind in ("full", "no-logdet", "identity"):
        for reduction in ("mean", "none"):
            h = lgm_ext.LGMLoss(5, 4, warmup_steps=7, likelihood=kind, reduction=reduction).double()
            with torch.no_grad():
                h.log_var.normal_(0, 0.3)
            xd = torch.randn(9, 4, dtype=torch.float64)
            for step in (0, 3, 7, 20):
                h.step.fill_(step)
                for a, b in zip(h._forward(xd, y.repeat(2)[:9], h._ramp()), h._ramped_forward(xd, y.repeat(2)[:9])):
                    torch.testing.assert_close(a, b)
