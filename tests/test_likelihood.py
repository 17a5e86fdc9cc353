"""Issue 45: the interventions on how the L-GM head trains (variance rules, the clamp, normalised features), the
training trace, the head's other scores as detectors (the paper's identity-covariance distance, the distance
without the log-det, the max posterior), and the experiment that measures them (lgm likelihood)."""
import csv
import math

import pytest
import torch
from helpers import lgm_cli, tiny_config, write_idx

from lgm_ext import LikelihoodDetector, detectors
from lgm_lab.config import config_from_preset
from lgm_lab.heads import LGMHead
from lgm_lab.models import build_model
from lgm_lab.recipe import build_model_and_head, make_optimizer


def _head(k=4, d=3, seed=0, **kw):
    torch.manual_seed(seed)
    h = LGMHead(d, k, **kw)
    with torch.no_grad():
        h.means.copy_(torch.randn(k, d))
        if h.log_var is not None and h.variance_rule == "sgd":
            h.log_var.copy_(0.3 * torch.randn(k, d))
    return h


def test_distance_score_is_the_predicted_classs_mahalanobis_distance_without_the_log_det():
    h = _head().double().eval()
    x = torch.randn(50, 3, dtype=torch.float64)
    det = LikelihoodDetector.from_head(h, score="distance")
    mu, lv = h.means.detach(), h.clamped_log_var().detach()
    k = (-(0.5 * ((x[:, None] - mu) ** 2 * torch.exp(-lv)).sum(-1) + 0.5 * lv.sum(-1))).argmax(1)
    want = -0.5 * ((x - mu[k]) ** 2 * torch.exp(-lv[k])).sum(1)
    torch.testing.assert_close(det.score(x), want)
    # the head's own "distance" score is the same number
    torch.testing.assert_close(h.scores(x)["distance"], want)
    # it is differentiable (the adaptive attack reads it) and a saved detector keeps its kind
    xg = x.clone().requires_grad_()
    det.score(xg).sum().backward()
    assert xg.grad is not None and bool(torch.isfinite(xg.grad).all())
    again = LikelihoodDetector.from_state_dict(det.state_dict())
    torch.testing.assert_close(again.score(x), want)


def test_the_heads_other_scores_are_registry_members_and_in_the_detection_report():
    from lgm_lab.detection_protocol import report_detectors

    h = _head().double().eval()
    x = torch.randn(40, 3, dtype=torch.float64)
    paper = detectors.create("lgm-paper", h)
    logits = h.logits(x)
    want = -0.5 * ((x - h.means.detach()[logits.argmax(1)]) ** 2).sum(1)  # the paper's section 4.3
    torch.testing.assert_close(paper.score(x, logits), want)
    post = detectors.create("lgm-max-posterior", h)
    torch.testing.assert_close(post.score(x), logits.log_softmax(1).max(1).values)
    names = report_detectors(h)
    for label in ("L-GM paper score (identity distance)", "L-GM distance (no log-det)", "L-GM max posterior"):
        assert label in names
    soft = build_model_and_head(config_from_preset("report", head="softmax", feat_dim=3))[1]
    assert not any(n.startswith("lgm-") for n in report_detectors(soft).values())
    with pytest.raises(ValueError, match="does not apply|L-GM|applies"):
        detectors.create("lgm-paper", soft)


def test_ema_rule_moves_each_seen_class_to_the_batchs_squared_deviations_without_gradient():
    h = _head(variance_rule="ema", variance_ema_rate=0.25).double().train()
    assert not h.log_var.requires_grad and all(p is not h.log_var for p in h.class_parameters())
    before = h.log_var.detach().clone()
    x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 1, 2] * 2)  # class 3 is not in the batch
    loss, _ = h(x, y)
    loss.backward()  # the update swapped the storage: the graph's saved tensors are intact
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    mu = h.means.detach()
    for c in range(3):
        v = ((x.detach()[y == c] - mu[c]) ** 2).mean(0)
        torch.testing.assert_close(h.log_var[c], torch.log(0.75 * before[c].exp() + 0.25 * v))
    torch.testing.assert_close(h.log_var[3], before[3])
    # eval mode changes nothing
    h.eval()
    after = h.log_var.detach().clone()
    h(x.detach(), y)
    torch.testing.assert_close(h.log_var, after)


def test_ema_values_below_the_clamp_are_stored_and_clamped_in_every_forward():
    h = _head(variance_rule="ema", variance_ema_rate=1.0, log_var_bound=2.0).double().train()
    x = h.means.detach()[torch.tensor([0, 0, 1, 1])] + 1e-3 * torch.randn(4, 3, dtype=torch.float64)
    h(x, torch.tensor([0, 0, 1, 1]))
    assert float(h.log_var[:2].max()) < -6  # stored unclamped
    assert float(h.clamped_log_var()[:2].min()) == -2.0


def test_log_var_lr_mult_gives_the_log_variances_their_own_group():
    cfg = config_from_preset("report", feat_dim=8, log_var_lr_mult=10.0)
    model, head = build_model_and_head(cfg)
    opt = make_optimizer(cfg, model, head)
    assert len(opt.param_groups) == 3
    assert [p is head.log_var for p in opt.param_groups[2]["params"]] == [True]
    assert opt.param_groups[2]["lr"] == pytest.approx(opt.param_groups[1]["lr"] * 10)
    assert all(p is not head.log_var for p in opt.param_groups[1]["params"])
    plain = make_optimizer(config_from_preset("report", feat_dim=8), model, head)
    assert len(plain.param_groups) == 2  # as every run before had: their checkpoints resume
    ema_cfg = config_from_preset("report", feat_dim=8, variance_rule="ema")
    m2, h2 = build_model_and_head(ema_cfg)
    ids = {id(p) for g in make_optimizer(ema_cfg, m2, h2).param_groups for p in g["params"]}
    assert id(h2.log_var) not in ids


def test_feature_norm_scales_the_features_and_keeps_the_state_dict():
    torch.manual_seed(0)
    plain = build_model("lenetpp", 6)
    scaled = build_model("lenetpp", 6, feature_norm=10.0)
    assert plain.state_dict().keys() == scaled.state_dict().keys()
    scaled.load_state_dict(plain.state_dict())
    x = torch.rand(5, 1, 28, 28)
    f = scaled(x)
    torch.testing.assert_close(f.norm(dim=1), torch.full((5,), 10.0))
    torch.testing.assert_close(f, 10.0 * torch.nn.functional.normalize(plain(x), dim=1))
    with pytest.raises(ValueError, match="feature_norm"):
        build_model("lenetpp", 6, feature_norm=-1.0)


@pytest.mark.parametrize("kw, name", [(dict(variance_ema_rate=0.0), "variance_ema_rate"),
                                      (dict(variance_ema_rate=1.5), "variance_ema_rate"),
                                      (dict(log_var_bound=0.0), "log_var_bound"),
                                      (dict(log_var_bound=25.0), "log_var_bound"),
                                      (dict(variance_rule="adam"), "variance_rule"),
                                      (dict(log_var_lr_mult=-1.0), "log_var_lr_mult"),
                                      (dict(feature_norm=float("nan")), "feature_norm")])
def test_config_refuses_bad_intervention_settings_naming_them(kw, name):
    with pytest.raises(ValueError, match=name):
        config_from_preset("report", **kw)


def test_training_writes_a_trace_and_a_resumed_run_keeps_it(tmp_path):
    from lgm_lab.train import TRACE_EVERY, TRACE_FIELDS, train

    src = write_idx(tmp_path / "data", n_train=640, n_test=64)
    cfg = tiny_config(src, subset=640, batch_size=8, epochs=2, feat_dim=4)  # 80 steps per epoch
    whole = train(cfg, tmp_path / "whole", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "whole" / "trace.csv")))
    assert tuple(rows[0]) == TRACE_FIELDS
    assert [int(r["steps"]) for r in rows] == [1, *range(TRACE_EVERY, 161, TRACE_EVERY)]
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in TRACE_FIELDS)
    part = train(cfg, tmp_path / "part", progress=False, stop_after=1)
    assert part.epochs_done == 1
    train(cfg, tmp_path / "part", resume=True, progress=False)
    assert list(csv.DictReader(open(tmp_path / "part" / "trace.csv"))) == rows
    del whole


def test_head_geometry_by_hand():
    from lgm_lab.experiments.likelihood import head_geometry

    h = _head(k=2, d=2).double()
    with torch.no_grad():
        h.means.copy_(torch.tensor([[0.0, 0.0], [4.0, 0.0]]))
        h.log_var.copy_(torch.tensor([[0.0, 7.0], [-1.0, -1.0]]))  # 7 is clamped to 6
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [4.0, 1.0], [4.0, -1.0], [1.0, 2.0], [-1.0, -2.0]],
                     dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 0, 0])
    g = head_geometry(h, f, y)
    # class 0: mean (0, 0), deviations (1,0), (-1,0), (1,2), (-1,-2); class 1: mean (4, 0), (0, +-1)
    assert g["within_rms"] == pytest.approx(math.sqrt((1 + 1 + 5 + 5 + 1 + 1) / 6))
    assert g["between_mean"] == pytest.approx(4.0)
    assert g["means_offset"] == pytest.approx(0.0)
    assert g["log_var_learned"] == pytest.approx((0 + 6 - 2) / 4)
    assert g["log_var_raw"] == pytest.approx((0 + 7 - 2) / 4)
    assert g["clamped_share"] == pytest.approx(25.0)
    var1_x = torch.finfo(torch.float64).tiny  # class 1's x-coordinates do not vary
    want = (math.log(4 / 3) + math.log(8 / 3) + math.log(var1_x) + math.log(2.0)) / 4
    assert g["log_var_fitted"] == pytest.approx(want)
    assert g["fitted_below_bound"] == pytest.approx(25.0)


def _result(rule_rejections: dict, errors: dict, sets=("digits", "noise")) -> dict:
    rules = {}
    for name, per_seed in rule_rejections.items():
        runs = {}
        for seed, rej in enumerate(per_seed):
            sets_ = {s: {"rejected": rej, "auroc": 90.0, "n": 1000} for s in (*sets, "FGSM 0.1", "PGD-10 0.1")}
            runs[seed] = {"clean_error": errors[name][seed], "n_clean": 1000, "n_attack": 1000,
                          "detectors": {"L-GM likelihood": {"sets": sets_}}}
        rules[name] = {"label": name, "runs": runs, "diverged": {}}
    return {"rules": rules, "sets": list(sets), "eps": 0.1}


def test_verdicts_name_a_remedy_only_when_every_set_and_seed_passes_and_nothing_gets_worse():
    from lgm_lab.experiments.likelihood import likelihood_verdicts

    res = _result({"default": [50.0, 55.0, 45.0], "good": [95.0, 96.0, 97.0], "one-seed-low": [95.0, 89.0, 99.0],
                   "costly": [99.0, 99.0, 99.0]},
                  {"default": [10.0, 10.5, 9.5], "good": [10.2, 10.0, 9.8], "one-seed-low": [10.0, 10.0, 10.0],
                   "costly": [20.0, 21.0, 19.0]})
    v = likelihood_verdicts(res)
    assert v["good"]["remedy"] and v["good"]["wins"]
    assert not v["one-seed-low"]["remedy"] and not v["one-seed-low"]["every_set_every_seed"]
    assert v["costly"]["every_set_every_seed"] and v["costly"]["clean_error"] == "fails"
    assert not v["costly"]["remedy"]
    assert "remedy" not in v["default"]


def test_the_rules_budget_is_the_standard_detection_reports():
    from lgm_lab.experiments.detection import DETECTION_MODELS, DETECTION_PRESETS
    from lgm_lab.experiments.likelihood import LIKELIHOOD_PRESETS, RULES, rule_config
    from lgm_lab.experiments.runs import run_config

    assert LIKELIHOOD_PRESETS["standard"]["train"] == DETECTION_PRESETS["standard"]["train"]
    want = run_config("fashion-mnist", None, 100, 1, dict(DETECTION_PRESETS["standard"]["train"],
                                                          **DETECTION_MODELS["lgm-a1"]))
    assert rule_config("default", 1) == want  # so that the report's L-GM networks are the default rule's
    assert len({r[0] for r in RULES}) == len(RULES)
    for name, _label, overrides in RULES:
        cfg = rule_config(name, 0)
        assert all(getattr(cfg, k) == v for k, v in overrides.items())


def test_lgm_likelihood_refuses_an_unknown_rule_in_one_line(tmp_path):
    # (the pure-PyTorch path's import warning is not the command's output: make test-reference)
    r = lgm_cli("likelihood", "--rules", "default,nope", "--out", tmp_path / "o",
                env={"PYTHONWARNINGS": "ignore::RuntimeWarning"})
    assert r.returncode == 2 and "--rules" in r.stderr and "nope" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_score_anatomy_takes_the_likelihood_apart_into_distance_and_log_det():
    from lgm_lab.experiments.likelihood import score_anatomy

    h = _head(k=2, d=2).double().eval()
    with torch.no_grad():
        h.means.copy_(torch.tensor([[0.0, 0.0], [3.0, 0.0]]))
        h.log_var.copy_(torch.tensor([[0.0, 0.0], [-2.0, -2.0]]))  # class 1 is tight: h = -2
    clean = torch.tensor([[0.1, 0.0], [-0.1, 0.0], [3.0, 0.1]], dtype=torch.float64)
    far = torch.tensor([[3.5, 0.0], [3.0, -0.5]], dtype=torch.float64)
    a = score_anatomy(h, clean, {"far": far})
    # the far inputs are predicted as class 1 (d = 0.5 * 0.25 / e^-2 each), h = -2
    assert a["sets"]["far"]["top_class_share"] == pytest.approx(100.0)
    assert a["sets"]["far"]["h_median"] == pytest.approx(-2.0)
    assert a["sets"]["far"]["d_median"] == pytest.approx(0.5 * 0.25 * math.exp(2))
    assert a["clean"]["h_median"] == pytest.approx(0.0)  # two of three clean inputs are class 0
    lik = h.log_likelihood(far) + 0.5 * 2 * math.log(2 * math.pi)
    torch.testing.assert_close(lik, -torch.full((2,), 0.5 * 0.25 * math.exp(2), dtype=torch.float64) + 2.0)


@pytest.mark.slow
def test_likelihood_experiment_end_to_end_and_reuses_its_runs(tmp_path, monkeypatch):
    import json

    from lgm_lab.experiments import likelihood as lk

    src = write_idx(tmp_path / "data", n_train=400, n_test=200)
    monkeypatch.setitem(lk.LIKELIHOOD_PRESETS, "tiny", dict(
        train=dict(steps=12, warmup_steps=4, test_subset=120, subset=400, batch_size=32), seeds=(0,),
        fit_points=200, fgsm_subset=40))
    out = tmp_path / "out"
    res = lk.likelihood_experiment(out, preset="tiny", rules=["default", "ema", "identity-cov"], data_dir=src,
                                   progress=lambda m: None)
    for f in ("likelihood.json", "likelihood.md", "figures/variance_trace.png"):
        assert (out / f).is_file(), f
    md = (out / "likelihood.md").read_text()
    for label in ("today's head", "moving average", "identity covariance", "L-GM paper score", "Remedy:"):
        assert label in md
    run = res["rules"]["ema"]["runs"][0]
    assert run["geometry"]["clamped_share"] >= 0 and run["trace"] and "anatomy" in run
    assert res["rules"]["identity-cov"]["runs"][0]["geometry"].get("log_var_learned") is None
    assert json.loads((out / "likelihood.json").read_text())["preset"] == "tiny"
    # a second call trains and measures nothing: the runs and their measurements are reused
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    lk.likelihood_experiment(out, preset="tiny", rules=["default", "ema", "identity-cov"], data_dir=src,
                             progress=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == before


def test_lgm_diagnostics_of_an_identity_covariance_head():
    """lgm_diagnostics (lgm ood, the detection report) read an L-GM head's log-variances unconditionally and
    raised AttributeError for a head with identity covariance (found by the identity-covariance rule)."""
    from lgm_lab.detection_protocol import lgm_diagnostics

    h = _head(k=3, d=4, covariance="identity").eval()
    x = torch.randn(30, 4)
    y = torch.arange(30) % 3
    out = lgm_diagnostics(torch.nn.Identity(), h, {"clean": (x, y)}, x, y, {"far": 10 * x})
    assert out["head_log_var_mean"] is None and out["sets"]["far"]["norm"] > out["clean"]["norm"]


def test_likelihood_experiment_never_replaces_a_users_file_in_its_out_folder(tmp_path):
    import os

    from lgm_lab.experiments.likelihood import likelihood_experiment

    out = tmp_path / "out"
    out.mkdir()
    mine = out / "likelihood.md"
    mine.write_text("my notes")
    with pytest.raises(ValueError, match="likelihood.md was not written by lgm likelihood"):
        likelihood_experiment(out, rules=["default"], seeds=(0,), progress=lambda m: None)
    assert mine.read_text() == "my notes" and sorted(p.name for p in out.iterdir()) == ["likelihood.md"]
    mine.unlink()
    os.mkfifo(out / "likelihood.json")
    with pytest.raises(ValueError, match="not a regular file"):
        likelihood_experiment(out, rules=["default"], seeds=(0,), progress=lambda m: None)
    assert (out / "likelihood.json").is_fifo()
