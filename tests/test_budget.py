"""Training budgets in SGD steps (TrainConfig.steps, warmup_steps) and the budget curve (lgm budget, issue 24)."""
import json

import pytest
from helpers import write_idx


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LGM_DATA_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_idx(tmp_path_factory.mktemp("idx"), n_train=96, n_test=48)


def _cfg(src, **kw):
    from lgm_lab.config import config_from_preset

    base = dict(epochs=1, test_subset=32, batch_size=32, feat_dim=2, head="lgm", data_dir=str(src))
    base.update(kw)
    return config_from_preset("report", **base)


def test_steps_train_exactly_that_many_steps_and_the_schedule_spans_them(src, tmp_path):
    """96 images at batch 32 are 3 steps an epoch: steps=5 is two epochs, the second cut short after 2 steps;
    --epochs is ignored (OneCycleLR would raise if stepped past the total it was built for)."""
    from lgm_lab.checkpoints import load_checkpoint
    from lgm_lab.train import train

    res = train(_cfg(src, steps=5, epochs=25), tmp_path, progress=False)
    assert [h["steps"] for h in res.metrics] == [3, 5]
    assert res.epochs_done == 2
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert int(ck["head"]["step"]) == 5 and ck["scheduler"]["last_epoch"] == 5  # counted, not planned
    csv = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv[0].split(",")[:2] == ["epoch", "steps"] and csv[-1].split(",")[1] == "5"


def test_a_step_budget_resumed_mid_way_equals_the_uninterrupted_run(src, tmp_path):
    """Killed after its first epoch, a 5-step run resumes into the run that was never stopped; --epochs, which a
    step budget ignores, may differ on resume."""
    import dataclasses

    import torch

    from lgm_lab.checkpoints import load_checkpoint
    from lgm_lab.train import train

    cfg = _cfg(src, steps=5)
    train(cfg, tmp_path / "whole", progress=False)
    train(cfg, tmp_path / "parts", progress=False, stop_after=1)
    train(dataclasses.replace(cfg, epochs=4), tmp_path / "parts", progress=False, resume=True)
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("whole", "parts"))
    assert [h["steps"] for h in b["metrics"]] == [3, 5]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


def test_a_warm_up_longer_than_the_steps_is_refused(src, tmp_path):
    """--steps 2 with the default one-epoch ramp (3 steps here) would end before alpha and lambda arrive."""
    from lgm_lab.train import train

    with pytest.raises(ValueError, match="--warmup-steps"):
        train(_cfg(src, steps=2), tmp_path, progress=False)
    train(_cfg(src, steps=2, warmup_steps=1), tmp_path, progress=False)


def test_a_finished_step_budget_is_reused_not_retrained(src, tmp_path):
    from lgm_lab.experiments.runs import train_or_reuse

    cfg = _cfg(src, steps=4)
    assert train_or_reuse(cfg, tmp_path, print) is False
    assert train_or_reuse(cfg, tmp_path, print) is True


@pytest.mark.parametrize("kw", [dict(steps=0), dict(steps=2.5), dict(steps=True), dict(warmup_steps=-1)])
def test_bad_step_budgets_are_refused_by_name(src, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        _cfg(src, **kw)


def test_warmup_steps_override_warmup_epochs(src):
    from lgm_lab.recipe import warmup_steps

    assert warmup_steps(_cfg(src, warmup_epochs=2.0), 3) == 6
    assert warmup_steps(_cfg(src, warmup_epochs=2.0, warmup_steps=4), 3) == 4


def test_budget_sweep_writes_table_figure_claims_and_reuses_its_runs(src, tmp_path, monkeypatch):
    from lgm_lab.experiments import budget as B

    monkeypatch.setitem(B.BUDGET_PRESETS, "tiny", dict(points={32: (2, 4), 16: (3,)}, seeds=(0,), test_subset=32,
                                                        attack_subset=16))
    res = B.budget_sweep(tmp_path, preset="tiny", at=[(32, 2)], at_seeds=(0, 1), data_dir=src,
                         progress=lambda m: None)
    done = {(p["head"], p["batch"], p["steps"], p["seed"]) for p in res["points"]}
    assert done == {(h, b, s, seed) for h in B.BUDGET_HEADS for b, s in ((32, 2), (32, 4), (16, 3))
                    for seed in ((0, 1) if (b, s) == (32, 2) else (0,))}
    for p in res["points"]:
        assert p["images"] == p["batch"] * p["steps"]
        assert {"error", "eer", "eer_max_posterior", "compactness", "fgsm_0.3"} <= set(p)
    two_seeds = next(c for c in res["claims"] if c["measure"] == "compactness" and c["batch"] == 32)["rows"]
    assert two_seeds[0]["seeds"] == 2 and two_seeds[0]["verdict"] != "-" and two_seeds[1]["verdict"] == "-"
    md = (tmp_path / "budget.md").read_text()
    assert "## Batch 32" in md and "## Batch 16" in md and "| 4 | 128 | 1 |" in md
    assert (tmp_path / "figures" / "budget.png").stat().st_size > 0
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert len(saved["points"]) == len(res["points"]) and saved["claims"]
    assert saved["figure"] == "figures/budget.png"  # relative to the report, which can be moved or committed

    # a second sweep trains nothing: every run and its measurement are reused
    reuse = B.train_or_reuse

    def must_reuse(*a, **k):
        assert reuse(*a, **k) is True, "retrained"

    monkeypatch.setattr(B, "train_or_reuse", must_reuse)
    monkeypatch.setattr(B, "_measure", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-measured")))
    again = B.budget_sweep(tmp_path, preset="tiny", at=[(32, 2)], at_seeds=(0, 1), data_dir=src,
                           progress=lambda m: None)
    key = lambda p: (p["head"], p["batch"], p["steps"], p["seed"])  # noqa: E731
    assert sorted(map(key, again["points"])) == sorted(map(key, res["points"]))


def test_claims_turn_where_the_curve_says():
    """'holds from' is the smallest budget from which the claim holds at every larger budget measured."""
    from lgm_lab.experiments.budget import budget_claims

    errs = {64: (30.0, 20.0), 128: (15.0, 20.0), 256: (10.0, 20.0), 512: (5.0, 20.0)}  # lgm-a1, softmax
    pts = [dict(head=h, batch=128, steps=s, seed=0, error=e, eer=e, compactness=0.5)
           for s, (a, b) in errs.items() for h, e in (("lgm-a1", a), ("softmax", b), ("center", 50.0))]
    claims = budget_claims({"n_test": 10000, "n_attack": 5000, "points": pts})
    first = next(c for c in claims if c["measure"] == "error" and c["claim"].endswith("softmax"))
    assert [r["verdict"] for r in first["rows"]] == ["fails", "holds", "holds", "holds"]
    assert first["holds_from"] == 128
    comp = next(c for c in claims if c["measure"] == "compactness")
    assert all(r["verdict"] == "-" for r in comp["rows"]) and comp["holds_from"] is None  # one seed: untestable


def test_holds_from_is_never_an_untested_budget():
    """Untested budgets (`-`) before the first that holds do not count as holding (review finding)."""
    from lgm_lab.experiments.budget import budget_claims

    pts = []
    for s in (64, 128, 256, 512):
        for seed in ((0,) if s < 256 else (0, 1)):
            pts += [dict(head="center", batch=128, steps=s, seed=seed, error=20.0, eer=20.0,
                         compactness=0.30 + seed / 100),
                    dict(head="softmax", batch=128, steps=s, seed=seed, error=20.0, eer=20.0,
                         compactness=0.50 + seed / 100),
                    dict(head="lgm-a1", batch=128, steps=s, seed=seed, error=20.0, eer=20.0, compactness=0.4)]
    comp = next(c for c in budget_claims({"n_test": 1000, "n_attack": 500, "points": pts})
                if c["measure"] == "compactness")
    assert [r["verdict"] for r in comp["rows"]] == ["-", "-", "holds", "holds"]
    assert comp["holds_from"] == 256


def test_a_diverged_point_is_recorded_and_not_retried(src, tmp_path, monkeypatch):
    from lgm_lab.experiments import budget as B
    from lgm_lab.train import TrainingDiverged

    monkeypatch.setitem(B.BUDGET_PRESETS, "one", dict(points={32: (2,)}, seeds=(0,), test_subset=32, attack_subset=16))
    calls = []
    real = B.train_or_reuse

    def lgm_diverges(cfg, run_dir, progress):
        calls.append(cfg.head)
        if cfg.head == "lgm":
            raise TrainingDiverged("non-finite loss (nan) at epoch 1, step 2 (lr 0.01); training stopped.")
        return real(cfg, run_dir, progress)

    monkeypatch.setattr(B, "train_or_reuse", lgm_diverges)
    res = B.budget_sweep(tmp_path, preset="one", data_dir=src, progress=lambda m: None)
    assert [p["head"] for p in res["points"] if "diverged" in p] == ["lgm-a1"]
    md = (tmp_path / "budget.md").read_text()
    assert "Diverged (not in the table): lgm-a1, 2 steps, seed 0: non-finite loss" in md
    B.budget_sweep(tmp_path, preset="one", data_dir=src, progress=lambda m: None)
    assert calls.count("lgm") == 1  # the second sweep read the marker


def test_a_bad_point_is_refused_before_anything_trains(src, tmp_path, monkeypatch):
    from lgm_lab.experiments import budget as B

    monkeypatch.setattr(B, "train_or_reuse", lambda *a: (_ for _ in ()).throw(AssertionError("trained")))
    with pytest.raises(ValueError, match="batch"):
        B.budget_sweep(tmp_path, preset="coarse", at=[(10**9, 4)], data_dir=src, progress=lambda m: None)


@pytest.mark.parametrize("args, word", [(["--at", "128"], "--at"), (["--at", "0:5"], "--at"),
                                        (["--seeds", "a,b"], "--seeds"), (["--preset", "huge"], "--preset")])
def test_bad_budget_options_exit_2_with_one_line(tmp_path, args, word):
    from typer.testing import CliRunner

    from lgm_cli.app import app

    r = CliRunner().invoke(app, ["budget", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and word in r.output and "Traceback" not in r.output
