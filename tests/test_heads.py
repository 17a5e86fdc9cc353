"""The heads and the recipe around them (issue 10): linear feature layer by default, the head's own learning
rate, verification scores, L-Softmax; the L-GM head as a library module (issue 22)."""
import math
import re

import pytest
import torch

import lgm_ext
from lgm_lab.config import config_from_preset
from lgm_lab.heads import LSoftmaxHead, build_head
from lgm_lab.models import build_model
from lgm_lab.recipe import build_model_and_head as _build
from lgm_lab.recipe import make_optimizer as _optimizer
from lgm_lab.recipe import make_scheduler as _scheduler


def test_feature_layer_is_linear_by_default_and_relu_on_request():
    assert isinstance(build_model("lenetpp", 100).feat_act, torch.nn.Identity)
    assert isinstance(build_model("lenetpp", 100, feature_relu=True).feat_act, torch.nn.ReLU)
    model, _ = _build(config_from_preset(None, feat_dim=100, feature_relu=True))
    assert isinstance(model.feat_act, torch.nn.ReLU)
    assert config_from_preset(None).feature_relu is False


@pytest.mark.parametrize("name", ["lenetpp", "resnet20"])
def test_spectral_norm_bounds_every_layer_and_round_trips(name):
    """``--spectral-norm c``: every conv and linear weight the network uses has spectral norm <= c (the
    reshaped matrix's, up to the power iteration's estimate, which follows the weights one iteration per training
    forward), also after SGD steps that push the raw weights far past c; weights already below c are left as
    they are; eval mode is deterministic and a state dict round-trips."""
    torch.manual_seed(0)
    chans = 3 if name.startswith("resnet") else 1
    plain = build_model(name, 8, chans)
    torch.manual_seed(0)
    model = build_model(name, 8, chans, spectral_norm=0.5)
    x = torch.rand(4, chans, 28, 28)

    def norms(m):
        return [torch.linalg.matrix_norm(layer.weight.detach().flatten(1), 2).item() for layer in m.modules()
                if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))]

    assert len(norms(model)) == len(norms(plain)) and max(norms(plain)) > 0.5
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(5):  # large steps: the raw weights grow, the normalised ones stay bounded
        opt.zero_grad()
        model(x).pow(2).sum().neg().backward()
        opt.step()
    with torch.no_grad():
        for _ in range(30):  # one power iteration per training forward: the estimate catches up with the weights
            model(x)
    model.eval()
    assert max(norms(model)) <= 0.5 * 1.02, norms(model)
    torch.manual_seed(0)
    same = build_model(name, 8, chans, spectral_norm=100.0).eval()
    torch.manual_seed(0)
    torch.testing.assert_close(same(x), build_model(name, 8, chans).eval()(x))  # below the bound: unchanged
    again = build_model(name, 8, chans, spectral_norm=0.5)
    again.load_state_dict(model.state_dict())
    again.eval()
    assert torch.equal(again(x), model(x)) and torch.equal(model(x), model(x))
    # two training forwards before one backward (u, v change in place between them)
    model.train()
    (model(x).sum() + model(x).sum()).backward()
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="spectral_norm"):
            config_from_preset(None, spectral_norm=bad)
    assert config_from_preset(None).spectral_norm == 0.0
    m, _ = _build(config_from_preset(None, feat_dim=8, spectral_norm=2.0))
    assert any("parametrizations" in k for k in m.state_dict())


@pytest.mark.parametrize("kind", ["lgm", "softmax", "center", "lsoftmax"])
def test_head_class_parameters_get_the_multiplier(kind):
    cfg = config_from_preset(None, head=kind, feat_dim=8, lr=0.02, head_lr_mult=10.0, weight_decay=5e-4,
                             head_weight_decay=0.0)
    model, head = _build(cfg, steps_per_epoch=10)
    opt = _optimizer(cfg, model, head)
    every = {id(p) for p in list(model.parameters()) + list(head.parameters())}
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(every), "each parameter in exactly one group"
    if kind == "lgm":
        assert len(opt.param_groups) == 2
        assert opt.param_groups[1]["lr"] == pytest.approx(0.2)
        assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == 5e-4
        assert {id(p) for p in opt.param_groups[1]["params"]} == {id(head.means), id(head.log_var)}
        sched = _scheduler(cfg, opt, 10)
        peaks = []
        for _ in range(cfg.epochs * 10 - 1):
            opt.step()
            sched.step()
            peaks.append([g["lr"] for g in opt.param_groups])
        top = max(peaks, key=lambda p: p[0])
        assert top[0] == pytest.approx(0.02, rel=1e-3) and top[1] == pytest.approx(0.2, rel=1e-3)
    else:
        assert len(opt.param_groups) == 1


def test_lgm_scores_match_their_formulas():
    torch.manual_seed(0)
    head = build_head("lgm", 5, 4).double().eval()
    with torch.no_grad():
        head.log_var.copy_(0.3 * torch.randn(4, 5, dtype=torch.float64))
    x = torch.randn(7, 5, dtype=torch.float64)
    s = head.scores(x)
    mu, lv = head.means, head.log_var
    d = 0.5 * ((x[:, None] - mu[None]) ** 2 * torch.exp(-lv)[None]).sum(-1)
    log_n = -d - 0.5 * lv.sum(1) - 2.5 * math.log(2 * math.pi)  # log N(x; mu_k, Sigma_k)
    best = log_n.argmax(1)
    torch.testing.assert_close(s["default"], log_n.max(1).values)
    torch.testing.assert_close(head.log_score(x), log_n.max(1).values)
    torch.testing.assert_close(s["identity"], -0.5 * ((x - mu[best]) ** 2).sum(1))
    torch.testing.assert_close(s["distance"], -d.gather(1, best[:, None]).squeeze(1))
    torch.testing.assert_close(s["mixture"], torch.logsumexp(log_n, 1) - math.log(4))
    torch.testing.assert_close(s["max_posterior"], torch.log_softmax(log_n, 1).max(1).values)


def _lsoftmax_formula(w, x, y, m, beta):
    """Liu et al. Eq. 6 with theta from acos (the test's independent route)."""
    logits = x @ w.t()
    out = logits.clone()
    for n in range(len(x)):
        wy, xn = w[y[n]], x[n]
        cos = (wy @ xn / (wy.norm() * xn.norm())).clamp(-1, 1)
        theta = torch.acos(cos)
        k = min(int(math.floor(theta.item() * m / math.pi)), m - 1)
        psi = (-1) ** k * torch.cos(m * theta) - 2 * k
        out[n, y[n]] = wy.norm() * xn.norm() * (beta * cos + psi) / (1 + beta)
    return out


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("beta", [0.0, 5.0])
def test_lsoftmax_forward_matches_its_formula(m, beta):
    torch.manual_seed(m)
    head = LSoftmaxHead(6, 5, lsoftmax_m=m).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (40,))
    got = head.margin_logits(x, y, beta)
    torch.testing.assert_close(got, _lsoftmax_formula(head.weight.detach(), x, y, m, beta))
    if m == 1:  # no margin: the plain linear logits
        torch.testing.assert_close(got, x @ head.weight.t())
    # the margin only lowers the labelled logit (psi(theta) <= cos(theta))
    assert (got.gather(1, y[:, None]) <= (x @ head.weight.t()).gather(1, y[:, None]) + 1e-12).all()


def test_lsoftmax_gradcheck_and_beta_schedule():
    torch.manual_seed(1)
    head = LSoftmaxHead(4, 3, lsoftmax_m=3, warmup_steps=10).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    assert torch.autograd.gradcheck(lambda a: head.margin_logits(a, y, 0.5), (x,))
    assert head.beta() == 1000.0
    for _ in range(10):
        head(x, y)
    assert head.beta() == pytest.approx(1000.0 / 1001.0)
    head.eval()
    head(x, y)
    assert int(head.step) == 10
    with pytest.raises(ValueError, match="lsoftmax_m"):
        LSoftmaxHead(4, 3, lsoftmax_m=0)


def test_param_groups_helper_used_by_a_plain_loop():
    net, head = torch.nn.Linear(3, 2), lgm_ext.LGMLoss(4, 2)
    opt = torch.optim.SGD(lgm_ext.param_groups(net, head, lr=0.1, head_lr_mult=10), lr=0.1)
    before = head.means.detach().clone()
    loss, _ = head(net(torch.randn(8, 3)), torch.randint(0, 4, (8,)))
    loss.backward()
    g = head.means.grad.clone()
    opt.step()
    torch.testing.assert_close(head.means.detach(), before - 1.0 * g)  # lr 0.1 x 10


def test_the_lab_lgm_head_is_an_lgm_loss_and_trained_runs_give_a_classifier(tmp_path, monkeypatch):
    """`FGSM(model, eps=0.3)(x, y)` on the model `load_trained` returned (100-D features, not logits) ran and
    reported 41% adversarial error instead of 96.5%; `LGMClassificationLoss(head)` with the lab's L-GM head
    raised `AttributeError: 'LGMHead' object has no attribute 'means'`."""
    from helpers import write_idx

    from lgm_ext.attacks import FGSM, LGMClassificationLoss
    from lgm_lab.checkpoints import load_trained
    from lgm_lab.experiments.measure import fgsm_errors
    from lgm_lab.tensors import stack_dataset
    from lgm_lab.train import train

    monkeypatch.setenv("LGM_DATA_DIR", str(tmp_path / "cache"))
    src = write_idx(tmp_path / "idx", n_train=96, n_test=48)
    cfg = config_from_preset(None, head="lgm", feat_dim=100, subset=64, test_subset=48, epochs=1, batch_size=32,
                             data_dir=str(src))
    train(cfg, tmp_path / "run", progress=False)
    trained = load_trained(tmp_path / "run" / "checkpoint.pt")
    model, head, _cfg, _ck = trained  # still a 4-tuple
    assert isinstance(head, lgm_ext.LGMLoss)
    x, y = stack_dataset(load_dataset_for(cfg))
    clf = trained.classifier
    assert isinstance(clf, lgm_ext.Classifier) and not clf.training
    with torch.no_grad():
        assert clf(x).shape == (len(x), 10)
        torch.testing.assert_close(clf(x), head.logits(model(x)))
    adv = FGSM(clf, eps=0.3)(x, y)
    with torch.no_grad():
        err = 100.0 * (clf(adv).argmax(1) != y).float().mean().item()
    assert err == fgsm_errors(model, head, x, y, (0.3,))[0.3]
    # the same attack through the library's L-GM loss on features, with the lab's head
    adv2 = FGSM(model, eps=0.3, loss_fn=LGMClassificationLoss(head))(x, y)
    assert (adv2 == adv).float().mean() > 0.999  # the same L_cls: signs differ only where the gradient is ~0


def load_dataset_for(cfg):
    from lgm_lab.data import load_dataset

    return load_dataset(cfg.dataset, False, data_dir=cfg.data_dir, subset=cfg.test_subset, seed=cfg.seed)


@pytest.mark.parametrize("model, bad, good", [("lenetpp", (1e-300, 1e-45, 1e-3, 0.09, 1e39), (0.1, 3.0, 1e30)),
                                              ("resnet20", (1e-300, 1e-45, 1e-3), (0.004, 1.0))])
def test_spectral_norm_bounds_no_network_can_meet_are_refused(model, bad, good):
    """--spectral-norm 1e-300 failed later as a "non-finite gradient ... try a lower --lr"; 1e-45 trained to
    chance (90.6% error)."""
    from lgm_lab.config import spectral_norm_range

    low, high = spectral_norm_range(model)
    for c in bad:
        with pytest.raises(ValueError, match=re.escape(f"spectral_norm must be 0 (off) or in [{low:.2g}, {high:.3g}]")):
            config_from_preset(None, model=model, spectral_norm=c)
    for c in good:
        assert config_from_preset(None, model=model, spectral_norm=c).spectral_norm == c
