"""The seeds' experiments: metrics, commands and the reproduction pipeline on tiny data."""
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import write_idx as _write_idx

from lgm_lab.config import config_from_preset
from lgm_lab.experiments import measure as M
from lgm_lab.experiments import reproduce as R
from lgm_lab.experiments import stats as S
from lgm_lab.train import train


def test_eer_perfect_and_identical():
    assert M.eer(torch.tensor([0.9, 0.8, 0.95]), torch.tensor([0.1, 0.2, 0.05]))[0] == 0.0
    g = torch.Generator().manual_seed(0)
    same = torch.rand(4000, generator=g)
    rate, roc = M.eer(same[:2000], same[2000:])
    assert abs(rate - 0.5) < 0.05 and abs(roc["auc"] - 0.5) < 0.05
    rate, _ = M.eer(torch.tensor([0.4, 0.6, 0.9]), torch.tensor([0.1, 0.5, 0.7]))
    assert 0 < rate < 0.5


def test_compare_centers_identity_and_known_values():
    a = torch.randn(10, 5)
    r = M.compare_centers(a, a)
    assert r["mean_cosine"] == pytest.approx(1.0) and r["mean_mse"] == pytest.approx(0.0)
    r = M.compare_centers(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
    assert r["cosine"] == [pytest.approx(0.0)] and r["mse"] == [pytest.approx((1 + 4) / 2)]


def test_class_means():
    f = torch.tensor([[1.0, 1.0], [3.0, 3.0], [5.0, 0.0]])
    torch.testing.assert_close(M.class_means(f, torch.tensor([0, 0, 2]), 3),
                               torch.tensor([[2.0, 2.0], [0.0, 0.0], [5.0, 0.0]]))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    src = _write_idx(tmp_path_factory.mktemp("idx"), n_train=160, n_test=64)
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, kw in {"softmax": dict(head="softmax"), "center": dict(head="center"), "lgm": dict(head="lgm")}.items():
        cfg = config_from_preset(None, data_dir=str(src), epochs=2, batch_size=32, feat_dim=2, lr=0.01, **kw)
        runs[name] = train(cfg, root / name, progress=False).checkpoint
    return src, runs


def _cli(*args):
    from typer.testing import CliRunner

    from lgm_cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def test_attack_command(tiny_runs, tmp_path):
    _src, runs = tiny_runs
    out = tmp_path / "attack.json"
    text = _cli("attack", runs["softmax"], runs["lgm"], "--subset", 32, "--json", out)
    assert "paper" in text
    res = json.loads(out.read_text())
    assert res["dataset"] == "fashion-mnist" and res["test_images"] == 32 and len(res["checkpoints"]) == 2
    for errs in res["results"].values():
        assert set(errs) == {"0.0", "0.1", "0.2", "0.3"}
        assert all(0.0 <= v <= 100.0 for v in errs.values())


def test_verify_command(tiny_runs, tmp_path):
    _src, runs = tiny_runs
    _cli("verify", runs["softmax"], runs["center"], runs["lgm"], "--subset", 32, "--out", tmp_path)
    _cli("verify", runs["lgm"], "--targeted", "--subset", 32, "--out", tmp_path / "t")
    res = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(res) == 3 and all(0.0 <= r["eer_percent"] <= 100.0 for r in res.values())
    assert (tmp_path / "roc.png").stat().st_size > 1000
    assert len(list(tmp_path.glob("hist_*.png"))) == 3


def test_centers_command(tiny_runs, tmp_path):
    _src, runs = tiny_runs
    out = tmp_path / "centers.json"
    text = _cli("centers", "--model-a", runs["center"], "--model-b", runs["softmax"], "--lgm", runs["lgm"],
                "--subset", 32, "--json", out)
    assert "claims" in text
    rep = json.loads(out.read_text())["results"]
    assert {"A", "B", "L-GM", "claims"} <= set(rep)
    assert "inverse vs center-loss centers" in rep["A"] and "inverse vs L-GM means" in rep["L-GM"]
    for comp in rep["A"].values():
        assert len(comp["cosine"]) == 10 and all(-1.0001 <= c <= 1.0001 for c in comp["cosine"])
        assert all(m >= 0 for m in comp["mse"])
    assert all(isinstance(c["supported"], bool) for c in rep["claims"])


def test_embed_command(tiny_runs, tmp_path):
    _src, runs = tiny_runs
    _cli("embed", runs["lgm"], "--out", tmp_path / "e", "--points", 100, "--fgsm", 5)
    assert (tmp_path / "e" / "embedding.png").stat().st_size > 1000
    _cli("embed", runs["center"], "--out", tmp_path / "e", "--points", 100, "--format", "pdf", "--no-progress")
    assert (tmp_path / "e" / "embedding.pdf").read_bytes().startswith(b"%PDF")


def test_reproduce_tiny(tmp_path, monkeypatch):
    src = _write_idx(tmp_path / "idx", n_train=96, n_test=48)
    monkeypatch.setitem(R.REPRODUCE_PRESETS, "tiny", dict(
        train=dict(subset=64, test_subset=48, epochs=1, batch_size=32), seeds=(0, 1),
        models100=("softmax", "softmax-relu", "center", "lsoftmax", "lgm-a1"), models2=("softmax", "lgm-a1"),
        attack_subset=24, embed_points=64))
    stages = []
    res = R.reproduce(tmp_path / "out", preset="tiny", data_dir=src, progress=lambda m: None,
                      on_stage=lambda done, total, what: stages.append((done, total)))
    total = R.reproduce_stages("tiny")
    assert stages == [(i, total) for i in range(total)]  # the progress bar ends full, never past it
    report = (tmp_path / "out" / "report.md").read_text()
    for heading in ("Table 1", "Table 6", "Adversarial verification", "claims, tested", "report's claims",
                    "Figures", "±"):
        assert heading in report
    assert "`-relu` variants have a ReLU" in report  # this preset trains them
    assert set(res["runs"]) == {"softmax", "softmax-relu", "center", "lsoftmax", "lgm-a1"}
    assert all(set(seeds) == {0, 1} for seeds in res["runs"].values())
    ev = res["runs"]["lgm-a1"][1]
    assert 0 <= ev["error"] <= 100 and set(ev["fgsm"]) == {"0.0", "0.1", "0.2", "0.3"}
    assert {"default", "identity", "distance", "max_posterior", "mixture"} <= set(ev["verification"]["scores"])
    assert "targeted" in ev
    assert set(res["table1_2d"]) == {"softmax", "lgm-a1"}
    assert {c["verdict"] for c in res["claims"]} <= {"holds", "fails", "within noise"} and res["claims"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["preset"] == "tiny"
    assert "figures/pmax_fgsm.png" in saved["figures"] and not any(Path(f).is_absolute() for f in saved["figures"])
    assert (tmp_path / "out" / "figures" / "embed_lgm-a1.png").exists()
    assert (tmp_path / "out" / "figures" / "pmax_fgsm.png").exists()
    assert (tmp_path / "out" / "figures" / "training_curves.png").exists()
    # re-running reuses the finished checkpoints
    before = (tmp_path / "out" / "runs" / "softmax-2d-s0" / "checkpoint.pt").stat().st_mtime_ns
    res2 = R.reproduce(tmp_path / "out", preset="tiny", data_dir=src, progress=lambda m: None)
    assert (tmp_path / "out" / "runs" / "softmax-2d-s0" / "checkpoint.pt").stat().st_mtime_ns == before
    assert res2["models_reused"] == res2["models"] == 12
    # the report states every model's budget in SGD steps (64 images at batch 32: 2 steps, 64 images, 1 epoch)
    assert res["sgd_steps"]["lgm-a1-100d-s1"] == {"steps": 2, "batch": 32, "images": 64, "epochs": 1}
    assert "each model trained 2 SGD steps of batch 32 (64 images)" in report


def test_a_preset_in_steps_reports_them_and_its_note(tmp_path, monkeypatch):
    """A budget given in SGD steps (TrainConfig.steps) is what the report states, with the preset's note on top."""
    src = _write_idx(tmp_path / "idx", n_train=96, n_test=48)
    monkeypatch.setitem(R.REPRODUCE_PRESETS, "tiny", dict(
        train=dict(steps=5, warmup_steps=2, test_subset=48, batch_size=32), seeds=(0,), models100=("softmax",),
        models2=(), attack_subset=16, embed_points=64, note="A smoke run."))
    res = R.reproduce(tmp_path / "out", preset="tiny", data_dir=src, progress=lambda m: None)
    report = (tmp_path / "out" / "report.md").read_text()
    assert res["sgd_steps"]["softmax-100d-s0"]["steps"] == 5
    assert "**A smoke run.**" in report and "5 SGD steps of batch 32 (160 images)" in report
    assert "warm-up over the first 2 steps" in report
    assert "-relu" not in report and "a linear feature layer for every head" in report  # no ReLU variant trained


def test_compare_verdicts_use_the_binomial_error():
    # 5% vs 10% on 2000 images: se ~ 0.8 points, z ~ 6 -> holds; reversed -> fails; 9.8 vs 10 -> noise
    assert S.compare([5.0], [10.0], 2000)["verdict"] == "holds"
    assert S.compare([10.0], [5.0], 2000)["verdict"] == "fails"
    assert S.compare([9.8], [10.0], 2000)["verdict"] == "within noise"
    assert S.binomial_se(50.0, 100) == pytest.approx(5.0)
    # seed spread widens the error: the same means with large std across seeds are within noise
    assert S.compare([1.0, 9.0], [8.0, 12.0], 100000)["verdict"] == "within noise"


def test_verification_scores_do_not_tie_when_likelihood_underflows():
    """In 100-D, exp(-d) underflows to 0 for every input; the ROC must still see the ordering (log-scores)."""
    from lgm_lab.heads import build_head

    head = build_head("lgm", 100, 3).eval()
    with torch.no_grad():
        head.means.zero_()
    near, far = torch.full((5, 100), 20.0), torch.full((5, 100), 30.0)  # d = 20000 and 45000
    assert (head.score(near) == 0).all() and (head.score(far) == 0).all()
    assert M.eer(head.log_score(near), head.log_score(far))[0] == 0.0
    for kind in ("softmax", "center"):
        h = build_head(kind, 4, 3).eval()
        f = torch.randn(6, 4)
        torch.testing.assert_close(h.score(f), h.log_score(f).exp())


def _cli_error(*args):
    from typer.testing import CliRunner

    from lgm_cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    return r.output


def test_checkpoints_of_different_datasets_are_refused_together(tiny_runs, tmp_path):
    """`lgm attack fm/checkpoint.pt mnist/checkpoint.pt` evaluated the MNIST model on Fashion-MNIST without a
    word (and a CIFAR model ended in a 163-line traceback): checkpoints given together must share a dataset."""
    src, runs = tiny_runs
    cfg = config_from_preset(None, dataset="mnist", data_dir=str(src), epochs=1, batch_size=32, feat_dim=2,
                             head="softmax", subset=64, test_subset=32)
    mnist = train(cfg, tmp_path / "mnist", progress=False).checkpoint
    for command in (("attack",), ("verify", "--out", tmp_path / "v")):
        out = _cli_error(*command, runs["softmax"], mnist, "--subset", 16)
        assert "different datasets" in out and "mnist" in out


def test_centers_checks_the_roles(tiny_runs):
    """`lgm centers` accepted the same L-GM checkpoint as model A and model B and reported claims about it."""
    _src, runs = tiny_runs
    assert "three different checkpoints" in _cli_error("centers", "--model-a", runs["center"], "--model-b",
                                                       runs["center"], "--subset", 16)
    out = _cli_error("centers", "--model-a", runs["lgm"], "--model-b", runs["softmax"], "--subset", 16)
    assert "--model-a" in out and "lgm head" in out and "center model" in out
    assert "--lgm" in _cli_error("centers", "--model-a", runs["center"], "--model-b", runs["softmax"], "--lgm",
                                 runs["softmax"], "--subset", 16)


def test_the_report_states_the_binomial_error_of_its_own_numbers():
    from lgm_lab.experiments.paper import paper_markdown

    def run(error):
        return {0: {"error": error, "fgsm": {str(e): 0.0 for e in (0.0, 0.1, 0.2, 0.3)},
                    "verification": {"scores": {}, "adversarial_error_percent": 0.0}}}

    r = {"seeds": [0], "runs": {"softmax": run(26.5), "lgm-a1": run(37.7)}, "table1_2d": {}, "n_test": 1000,
         "n_attack": 500, "claims": []}
    text = "\n".join(paper_markdown(r))
    assert "near 10%" not in text
    assert "(26.5-37.7%) on 1000 test images: 1.40-1.53 points" in text


def test_the_demo_profile_groups_every_stage(tmp_path, monkeypatch):
    """benchmarks/bench_demo.py: every stage's seconds land in one group, and the groups add up to the stages."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_demo

    src = _write_idx(tmp_path / "idx", n_train=96, n_test=48)
    monkeypatch.setitem(R.REPRODUCE_PRESETS, "tiny", dict(
        train=dict(steps=3, warmup_steps=1, test_subset=48, batch_size=32), seeds=(0,), models100=("softmax",),
        models2=(), attack_subset=16, embed_points=64))
    r = bench_demo.profile("tiny", {"steps": 2}, 8, data_dir=src)
    assert r["steps"] == [2] and r["n_attack"] == 8 and R.REPRODUCE_PRESETS["tiny"]["train"]["steps"] == 3
    assert abs(sum(r["groups"].values()) - sum(s for _, s in r["stages"])) < 1e-6
    assert r["groups"]["training"] > 0 and r["groups"]["evaluating"] > 0
    assert bench_demo.row("x", r).startswith("| x | 1 models, 2 SGD steps")


def test_likelihood_ablation_grid_trains_measures_and_tabulates(tmp_path, monkeypatch):
    """`lgm ablation --grid likelihood`: every point trained at the preset's budget with its overrides (alpha
    replaces the default, not a duplicate keyword), measured, its log-variances and final loss tabulated;
    a second call reuses every run."""
    from typer.testing import CliRunner

    from lgm_cli.app import app
    from lgm_lab.checkpoints import load_checkpoint
    from lgm_lab.experiments import ablation as A

    src = _write_idx(tmp_path / "idx", n_train=96, n_test=48)
    monkeypatch.setitem(A.REPRODUCE_PRESETS, "quick", dict(
        train=dict(steps=3, warmup_steps=1, subset=96, test_subset=48, batch_size=32), attack_subset=24))
    grid = A.GRIDS["likelihood"]
    assert [o for _l, o in grid][0] == dict(alpha=1.0)
    assert {o.get("alpha") for _l, o in grid} >= {0.0, 0.3, 1.0}
    assert {o.get("likelihood") for _l, o in grid} >= {"no-logdet", "identity"}
    out = tmp_path / "abl"
    r = CliRunner().invoke(app, ["ablation", "--grid", "likelihood", "--seeds", "0", "--out", out,
                                 "--data-dir", src, "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "ablation-likelihood.json").read_text())
    assert [p["label"] for p in res["points"]] == [label for label, _o in grid]
    for (_label, overrides), p in zip(grid, res["points"]):
        ev = p["runs"]["0"]
        assert 0 <= ev["error"] <= 100 and 0 <= ev["eer"] <= 100 and len(ev["log_var_by_epoch"]) == 1
        assert ev["log_var_min"] <= ev["log_var_mean"]
        cks = [load_checkpoint(d / "checkpoint.pt") for d in (out / "runs").iterdir()]
        ck = [c for c in cks if all(c["config"][k] == v for k, v in overrides.items())
              and all(c["config"][k] == d for k, d in (("alpha", 1.0), ("likelihood", "full")) if k not in overrides)]
        assert len(ck) == 1 and ck[0]["metrics"][-1]["steps"] == 3, overrides
    md = (out / "ablation-likelihood.md").read_text()
    assert "3 SGD steps of batch 32" in md and "likelihood without log-det" in md and "mean / min log-variance" in md
    again = A.ablation(out, grid="likelihood", data_dir=src, progress=lambda m: None)
    assert json.loads(json.dumps(again["points"], default=float)) == res["points"]


def test_compare_without_an_error_estimate_gives_no_verdict():
    # a quantity that is not a rate (n=None) measured on one seed has no standard error: no verdict, no z = inf
    c = S.compare([0.34], [0.40])
    assert c["verdict"] == "one seed" and math.isnan(c["z"])
    assert S.relative([0.34], [0.40, 0.41]) == "not measurable with one seed"
    assert S.compare([0.34, 0.33], [0.40, 0.41])["verdict"] == "holds"
    assert S.compare([5.0], [10.0], 2000)["verdict"] == "holds"  # a rate keeps its binomial error
