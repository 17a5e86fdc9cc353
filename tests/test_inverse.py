"""Issue 15: center losses towards inverse-adversary features (lgm_ext.inverse) and their heads."""
import json
from pathlib import Path

import pytest
import torch
from helpers import write_idx
from torch import nn

from lgm_ext import InverseAdversaryCenterLoss, inverse_adversary_features
from lgm_ext.inverse import VARIANTS


def _tiny_net(seed=0, bn=True):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(16, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    backbone = nn.Sequential(*layers)
    classifier = nn.Linear(3, 4)
    return backbone, classifier


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_match_finite_differences(variant):
    """The loss through a tiny backbone, in float64: analytic gradients of the features, the backbone's
    weights and the classifier against finite differences (the inverse features are constants)."""
    backbone, classifier = _tiny_net(bn=False)
    backbone, classifier = backbone.double(), classifier.double()
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 1])
    loss = InverseAdversaryCenterLoss(4, 3, variant=variant).double().eval()  # eval: no center update inside
    loss.centers.normal_()
    inv = loss.inverse_features(backbone, classifier, x.float().double(), y)
    assert not inv.requires_grad
    f = backbone(x).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: loss(f, y, inv), (f,))
    w = backbone[1].weight

    def of_weight(wt):
        h = torch.tanh(torch.nn.functional.linear(x.flatten(1), wt, backbone[1].bias))
        return loss(backbone[3](h), y, inv)

    assert torch.autograd.gradcheck(of_weight, (w.detach().clone().requires_grad_(True),))
    # the closed form: d/df 0.5 mean ||f - t||^2 = (f - t) / N
    target = inv if variant == "instance" else loss.centers[y]
    (g,) = torch.autograd.grad(loss(f, y, inv), f)
    torch.testing.assert_close(g, (f - target).detach() / len(y))


def test_center_update_by_hand():
    loss = InverseAdversaryCenterLoss(3, 2, variant="class", alpha=0.5)
    loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    inv = torch.tensor([[2.0, 0.0], [4.0, 2.0], [3.0, 3.0]])
    y = torch.tensor([0, 0, 1])
    feats = torch.zeros(3, 2)
    value = loss.train()(feats, y, inv)
    # the loss uses the centers before the update: 0.5 * mean(|0-c0|^2, |0-c0|^2, |0-c1|^2) = 0.5 * 2/3
    assert value.item() == pytest.approx(0.5 * (0 + 0 + 2) / 3)
    # class 0: delta = ((0-2) + (0-4), (0-0) + (0-2)) / (1 + 2) = (-2, -2/3); c0 <- c0 - 0.5 * delta
    # class 1: delta = (1-3, 1-3) / 2 = (-1, -1); c1 <- (1.5, 1.5); class 2 untouched
    torch.testing.assert_close(loss.centers, torch.tensor([[1.0, 1.0 / 3.0], [1.5, 1.5], [5.0, 5.0]]))
    before = loss.centers.clone()
    loss.eval()(feats, y, inv)  # no update in eval mode
    torch.testing.assert_close(loss.centers, before)


def test_instance_variant_pulls_to_its_own_inverse_and_tracks_the_centers():
    loss = InverseAdversaryCenterLoss(2, 2, variant="instance", alpha=0.5)
    f = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    inv = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    assert loss(f, y, inv).item() == pytest.approx(0.5 * (1 + 4) / 2)
    # the running means move towards the inverse features (SPEC 6) ...
    torch.testing.assert_close(loss.centers, torch.tensor([[0.0, 0.0], [0.0, 0.25]]))
    # ... but the loss and its gradient do not depend on them
    loss.centers.fill_(7.0)
    g = f.clone().requires_grad_(True)
    value = loss.eval()(g, y, inv)
    value.backward()
    assert value.item() == pytest.approx(0.5 * (1 + 4) / 2)
    torch.testing.assert_close(g.grad, (f - inv) / 2)


def test_inner_attack_leaves_modes_batchnorm_and_grads_alone():
    backbone, classifier = _tiny_net()
    backbone.train()
    classifier.train()
    backbone[3].eval()  # a frozen part
    backbone(torch.rand(8, 1, 4, 4))  # some running statistics
    bn = backbone[2]
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    modes = [m.training for m in list(backbone.modules()) + [classifier]]
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 4, (8,))
    inv = inverse_adversary_features(backbone, classifier, x, y)
    assert inv.shape == (8, 3)
    assert [m.training for m in list(backbone.modules()) + [classifier]] == modes
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in list(backbone.parameters()) + list(classifier.parameters()))


def test_inverse_adversaries_lower_the_loss_within_the_ball():
    backbone, classifier = _tiny_net(bn=False)
    x, y = torch.rand(16, 1, 4, 4), torch.randint(0, 4, (16,))
    from lgm_ext import Classifier
    from lgm_ext.attacks import InversePGD

    net = Classifier(backbone, classifier)
    inv = InversePGD(net)(x, y)
    assert (inv - x).abs().max() <= 4 / 255 + 1e-6
    ce = nn.functional.cross_entropy
    assert ce(net(inv), y) < ce(net(x), y)
    f_inv = inverse_adversary_features(backbone, classifier, x, y)
    torch.testing.assert_close(f_inv, backbone(inv).detach())


@pytest.mark.parametrize("bad", [
    dict(variant="both"), dict(alpha=1.5), dict(eps=-0.1), dict(steps=-1), dict(steps=2.5), dict(lower=1, upper=0)])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        InverseAdversaryCenterLoss(4, 3, **bad)


def test_bad_inputs_are_refused():
    loss = InverseAdversaryCenterLoss(4, 3)
    f, y = torch.zeros(5, 3), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="inverse_features"):
        loss(f, y, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="inverse_features"):
        loss(f, y, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="labels"):
        loss(f, torch.full((5,), 4), torch.zeros(5, 3))
    with pytest.raises(TypeError, match="labels"):
        loss(f, y.float(), torch.zeros(5, 3))


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_tiny_training_loop_lowers_the_loss(variant):
    torch.manual_seed(0)
    backbone, classifier = _tiny_net(bn=True)
    icl = InverseAdversaryCenterLoss(4, 3, variant=variant)
    x = torch.rand(64, 1, 4, 4)
    y = (x.flatten(1)[:, :4].argmax(1))  # a learnable rule
    opt = torch.optim.SGD(list(backbone.parameters()) + list(classifier.parameters()), lr=0.2, momentum=0.9)
    losses = []
    for _ in range(60):
        inv = icl.inverse_features(backbone, classifier, x, y)
        f = backbone(x)
        loss = nn.functional.cross_entropy(classifier(f), y) + 0.1 * icl(f, y, inv)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


# ----------------------------------------------------------------------------- heads in lgm train
@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_idx(tmp_path_factory.mktemp("idx"), n_train=96, n_test=32)


def _cfg(src, head, **kw):
    from lgm_lab.config import config_from_preset

    base = dict(head=head, epochs=2, subset=64, test_subset=32, batch_size=32, feat_dim=2, data_dir=str(src),
                inverse_steps=2)
    base.update(kw)
    return config_from_preset(None, **base)


@pytest.mark.parametrize("head", ["inverse-class", "inverse-instance"])
def test_training_with_an_inverse_head_is_deterministic(src, tmp_path, head):
    from lgm_lab.checkpoints import load_trained
    from lgm_lab.train import train

    a = train(_cfg(src, head), tmp_path / "a", progress=False)
    b = train(_cfg(src, head), tmp_path / "b", progress=False)
    ma, ha, _, _ = load_trained(a.checkpoint)
    mb, hb, _, _ = load_trained(b.checkpoint)
    for (k, v), (_, w) in zip(list(ma.state_dict().items()) + list(ha.state_dict().items()),
                              list(mb.state_dict().items()) + list(hb.state_dict().items())):
        assert torch.equal(v, w), k
    assert a.metrics == b.metrics or all(
        x["train_loss"] == y["train_loss"] for x, y in zip(a.metrics, b.metrics))
    assert torch.count_nonzero(ha.centers()) > 0  # both variants track the running means of inverse features


def test_inverse_head_needs_its_inputs(src):
    from lgm_lab.heads import build_head

    head = build_head("inverse-class", 2, 10)
    with pytest.raises(ValueError, match="prepare"):
        head(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))


def test_old_checkpoints_without_the_new_fields_resume(src, tmp_path):
    """Runs written before the inverse_* fields existed still resume (missing fields = defaults)."""
    from lgm_lab.checkpoints import content_digest as _digest
    from lgm_lab.checkpoints import load_checkpoint
    from lgm_lab.train import train

    cfg = _cfg(src, "softmax", epochs=2, inverse_steps=5)  # the defaults, as an older run had
    train(cfg, tmp_path, progress=False, stop_after=1)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    for k in ("inverse_eps", "inverse_step", "inverse_steps"):
        del ck["config"][k]
    ck["sha256"] = _digest(ck)
    torch.save(ck, tmp_path / "checkpoint.pt")
    res = train(cfg, tmp_path, progress=False, resume=True)
    assert res.epochs_done == 2
    assert json.loads((tmp_path / "config.json").read_text())["inverse_steps"] == 5


def test_compactness_by_hand():
    from lgm_lab.experiments.measure import compactness

    f = torch.tensor([[0.0, 1.0], [0.0, -1.0], [10.0, 1.0], [10.0, -1.0]])
    y = torch.tensor([0, 0, 1, 1])
    # every feature is 1 from its class mean; the two means are 10 apart
    assert compactness(f, y, 2) == pytest.approx(0.1)
    assert compactness(f, y, 3) == pytest.approx(0.1)  # an absent class is skipped


def test_inverse_experiment_tiny(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lgm_cli.app import app
    from lgm_lab.experiments import inverse as IE

    src = write_idx(tmp_path / "idx", n_train=96, n_test=48)
    monkeypatch.setitem(IE.INVERSE_PRESETS, "quick", dict(
        train=dict(subset=64, test_subset=48, epochs=1, batch_size=32, inverse_steps=1), seeds=(0, 1),
        attack_subset=24, mean_points=64))
    out = tmp_path / "inv"
    r = CliRunner().invoke(app, ["inverse-centers", "--out", str(out), "--data-dir", str(src), "--no-progress",
                                 "--json", str(tmp_path / "inv.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "inverse.json").read_text())
    assert set(res["runs"]) == set(IE.INVERSE_MODELS)
    for runs in res["runs"].values():
        assert set(runs) == {"0", "1"}
        for ev in runs.values():
            assert 0 <= ev["error"] <= 100 and 0 <= ev["eer"] <= 100 and ev["compactness"] > 0
            assert set(ev["fgsm"]) == {"0.1", "0.3"} and ev["seconds_per_epoch"] > 0
    assert "eer_own_centers" in res["runs"]["C-class (inverse-adversary class centers)"]["0"]
    assert "eer_own_centers" not in res["runs"]["B (softmax)"]["0"]
    assert {v["model"] for v in res["verdict"]} == {m for m in IE.INVERSE_MODELS if m.startswith("C")}
    # the cost ratio is the side-by-side step time of the first seed's models, not their runs' seconds per epoch
    assert set(res["step_ms"]) == set(IE.INVERSE_MODELS) and all(t > 0 for t in res["step_ms"].values())
    for v in res["verdict"]:
        assert v["cost_ratio"] == pytest.approx(res["step_ms"][v["model"]] / res["step_ms"]["A (center loss)"])
    assert all(v["accuracy"] in ("better", "worse", "same within noise") for v in res["verdict"])
    assert "inverse vs learned inverse-adversary centers" in res["centers"]["C-class (inverse-adversary class centers)"]
    md = (out / "inverse.md").read_text()
    assert "±" in md and "Verdict" in md and md.count("| C-") >= 4 and "step ms" in md
    assert json.loads((tmp_path / "inv.json").read_text())["dataset"] == "fashion-mnist"
    # a second call reuses every run
    before = (out / "runs" / "inverse-class-s0" / "checkpoint.pt").stat().st_mtime_ns
    IE.inverse_experiment(out, data_dir=src, progress=lambda m: None)
    assert (out / "runs" / "inverse-class-s0" / "checkpoint.pt").stat().st_mtime_ns == before
    # --seeds picks some of the preset's seeds (here reused: nothing trains), bad seeds are refused
    r = CliRunner().invoke(app, ["inverse-centers", "--out", str(out), "--data-dir", str(src), "--no-progress",
                                 "--seeds", "1", "--json", str(tmp_path / "inv1.json")])
    assert r.exit_code == 0, r.output
    one = json.loads((out / "inverse.json").read_text())
    assert one["seeds"] == [1] and one["models_reused"] == one["models"] == len(IE.INVERSE_MODELS)
    assert one["runs"]["B (softmax)"]["1"] == res["runs"]["B (softmax)"]["1"]
    # one seed: compactness has no error estimate, so no verdict on it (it read "worse" at z = inf before)
    assert all(v["compactness"] == "not measurable with one seed" and v["substitutes"] is None for v in one["verdict"])
    md1 = (out / "inverse.md").read_text()
    assert "not determined (one seed)" in md1 and "z = inf" not in md1 and "z = nan" not in md1
    bad = CliRunner().invoke(app, ["inverse-centers", "--out", str(out), "--seeds", "x"])
    assert bad.exit_code == 2 and "--seeds" in bad.output
    with pytest.raises(ValueError, match="seeds"):
        IE.inverse_experiment(out, seeds=[-1], data_dir=src, progress=lambda m: None)


def test_reproduce_with_inverse_adds_the_section(tmp_path, monkeypatch):
    """`lgm reproduce --inverse`: the experiment's stages extend the progress bar and its section
    lands in report.md (the experiment itself replaced by a stub that writes its files)."""
    from lgm_lab.experiments import inverse as IE
    from lgm_lab.experiments import reproduce as E

    src = write_idx(tmp_path / "idx", n_train=64, n_test=32)
    monkeypatch.setitem(E.REPRODUCE_PRESETS, "quick", dict(
        train=dict(subset=32, test_subset=32, epochs=1, batch_size=32), seeds=(0,),
        models100=("softmax", "center", "lgm-a1"), models2=(), attack_subset=16, embed_points=32))
    n_inv = 2 * len(IE.INVERSE_MODELS) * len(IE.INVERSE_PRESETS["quick"]["seeds"]) + 1

    def stub(out, *, preset, data_dir, progress, on_stage):
        Path(out).mkdir(parents=True, exist_ok=True)
        for i in range(n_inv):
            on_stage(i, n_inv, "stub")
        (Path(out) / "inverse.md").write_text("# Inverse-adversary centers, trained\n\n## Verdict\n\nstub verdict\n")
        return {"summary": {}, "verdict": [], "seeds": [0], "train": {}, "step_ms": {}}

    monkeypatch.setattr(IE, "inverse_experiment", stub)
    stages = []
    E.reproduce(tmp_path / "out", preset="quick", data_dir=src, progress=lambda m: None, inverse=True,
                on_stage=lambda d, t, w: stages.append((d, t)))
    total = E.reproduce_stages("quick", inverse=True)
    assert stages == [(i, total) for i in range(total)]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Inverse-adversary centers" in report and "### Verdict" in report and "stub verdict" in report


def test_training_step_ms_leaves_the_models_alone():
    from lgm_lab.experiments.measure import training_step_ms
    from lgm_lab.heads import build_head
    from lgm_lab.models import LeNetPlusPlus, resnet20

    torch.manual_seed(0)
    nets = {"center": (LeNetPlusPlus(feat_dim=8).eval(), build_head("center", 8, 10).eval()),
            # a backbone with BatchNorm: its running statistics must not move either
            "inverse-class": (resnet20(feat_dim=8, in_channels=1).eval(),
                              build_head("inverse-class", 8, 10, inverse_steps=1).eval())}
    before = {k: [t.clone() for t in (*m.state_dict().values(), *h.state_dict().values())]
              for k, (m, h) in nets.items()}
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    ms = training_step_ms(nets, x, y, repeats=2, rounds=2)
    assert set(ms) == set(nets) and all(t > 0 for t in ms.values())
    for k, (m, h) in nets.items():
        after = [*m.state_dict().values(), *h.state_dict().values()]
        assert all(torch.equal(a, b) for a, b in zip(before[k], after))  # BN statistics and centers too
        assert not m.training and not h.training
        assert all(p.grad is None for p in (*m.parameters(), *h.parameters()))


def test_an_older_result_renders_its_cost_per_epoch():
    """A result without the side-by-side step timing (written before it existed) still renders, and says that
    its cost ratio is per epoch."""
    from lgm_lab.experiments import inverse as IE

    r = json.loads((Path(__file__).parents[1] / "docs" / "quick-report" / "inverse" / "inverse.json").read_text())
    r.pop("step_ms", None)
    md = IE.inverse_markdown(r)
    assert "cost per epoch vs A" in md and "cost per step" not in md and "'step ms'" not in md
    per_epoch = {m: v["seconds_per_epoch"][0] for m, v in r["summary"].items()}
    assert [v["cost_ratio"] for v in IE.verdict(r)] == pytest.approx(
        [per_epoch[m] / per_epoch["A (center loss)"] for m in r["runs"] if m.startswith("C")])
