"""Data, models, heads, training, checkpoints and the train/eval CLI (issue: training pipeline)."""
import dataclasses
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from helpers import write_idx as _write_idx

import lgm_ext
from lgm_lab import data as D
from lgm_lab.checkpoints import CheckpointError, load_checkpoint, load_trained
from lgm_lab.config import config_from_preset
from lgm_lab.evaluation import evaluate
from lgm_lab.heads import build_head
from lgm_lab.models import build_model, resnet20
from lgm_lab.train import TrainingDiverged, train


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory):
    """Real Fashion-MNIST when the Debian package is installed, small written files otherwise."""
    if all((D.SYSTEM_FASHION_MNIST / f"{f}.gz").exists() for f in D.IDX_FILES):
        return D.SYSTEM_FASHION_MNIST
    return _write_idx(tmp_path_factory.mktemp("idx"))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LGM_DATA_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def test_load_dataset_from_idx_files(tmp_path):
    src = _write_idx(tmp_path / "src", n_train=50, n_test=20)
    train_ds = D.load_dataset("fashion-mnist", True, data_dir=src, download=False)
    test_ds = D.load_dataset("fashion-mnist", False, data_dir=src, download=False)
    assert len(train_ds) == 50 and len(test_ds) == 20
    x, y = train_ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert 0 <= int(y) < 10
    a = D.load_dataset("fashion-mnist", True, data_dir=src, subset=10, download=False)
    b = D.load_dataset("fashion-mnist", True, data_dir=src, subset=10, download=False)
    assert len(a) == 10 and a.indices == b.indices


def test_missing_dataset_says_what_to_do(tmp_path):
    with pytest.raises(D.DatasetUnavailable, match="--data-dir"):
        D.load_dataset("mnist", True, data_dir=tmp_path, download=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_dataset("imagenet")


def test_real_fashion_mnist_when_installed(fmnist_dir):
    if fmnist_dir != D.SYSTEM_FASHION_MNIST:
        pytest.skip("dataset-fashion-mnist not installed")
    ds = D.load_dataset("fashion-mnist", False)
    assert len(ds) == 10000


def test_models_return_features():
    assert build_model("lenetpp", 2)(torch.rand(2, 1, 28, 28)).shape == (2, 2)
    r = resnet20(feat_dim=64)
    assert r(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in r.modules()) == 19 + 2  # 19 convs + 2 projections
    with pytest.raises(ValueError):
        build_model("vgg", 2)


@pytest.mark.parametrize("kind", ["softmax", "center", "lgm"])
def test_few_steps_lower_the_loss(kind, fmnist_dir):
    torch.manual_seed(0)
    ds = D.load_dataset("fashion-mnist", True, data_dir=fmnist_dir, subset=256, download=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    kw = dict(alpha=1.0, lambda_=0.1, warmup_steps=30) if kind == "lgm" else {}
    model, head = build_model("lenetpp", 2), build_head(kind, 2, 10, **kw)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)

    def full_loss():  # the loss at the final alpha/lambda on all 256 images, without updating centers
        head.eval()
        with torch.no_grad():
            f = model(x)
            if kind == "lgm":  # the ramp's end point, whatever the head's step counter says
                value = lgm_ext.lgm_loss(f, head.means, head.clamped_log_var(), y, alpha=1.0,
                                         lambda_=0.1).item()
            else:
                value = head(f, y)[0].item()
        head.train()
        return value

    before = full_loss()
    losses = []
    for step in range(30):
        i = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss, _ = head(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))
    assert full_loss() < 0.85 * before


def _tiny(**kw):
    base = dict(epochs=2, subset=96, test_subset=64, batch_size=32, feat_dim=2, head="lgm", schedule="cyclic")
    base.update(kw)
    return config_from_preset(None, **base)


def test_resume_reproduces_uninterrupted_run(tmp_path, fmnist_dir):
    cfg = _tiny(data_dir=str(fmnist_dir))
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, stop_after=1)  # "killed" after epoch 1
    assert part.epochs_done == 1
    resumed = train(cfg, tmp_path / "part", progress=False, resume=True)
    assert resumed.epochs_done == 2
    for a, b in zip(full.metrics, resumed.metrics):
        for k in ("train_loss", "train_accuracy", "test_error_percent", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    sa, sb = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    for k in sa["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k])
    metrics = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2]
    # the learned log-variances are followed epoch by epoch (issue 24: does the variance collapse?)
    head_lv = sb["head"]["log_var"].clamp(-6, 6).double()
    assert metrics[-1]["log_var_mean"] == pytest.approx(head_lv.mean().item())
    assert metrics[-1]["log_var_min"] == pytest.approx(head_lv.min().item())


def test_a_likelihood_ablation_trains_and_is_kept_in_the_checkpoint(tmp_path, fmnist_dir):
    from lgm_lab.checkpoints import load_trained

    cfg = _tiny(data_dir=str(fmnist_dir), epochs=1, likelihood="identity")
    train(cfg, tmp_path / "lkd", progress=False)
    model, head, saved, _ck = load_trained(tmp_path / "lkd" / "checkpoint.pt")
    assert saved.likelihood == "identity" and head.likelihood == "identity" and head.label == "lgm-a1-lkd-identity"
    soft = train(_tiny(data_dir=str(fmnist_dir), epochs=1, head="softmax"), tmp_path / "soft", progress=False)
    assert "log_var_mean" not in soft.metrics[-1]  # no variances to follow
    with pytest.raises(ValueError, match="likelihood"):
        _tiny(likelihood="nope")


def test_resume_refuses_a_different_config(tmp_path, fmnist_dir):
    train(_tiny(data_dir=str(fmnist_dir), epochs=1), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="configuration differs"):
        train(_tiny(data_dir=str(fmnist_dir), epochs=1, lr=0.5), tmp_path, progress=False, resume=True)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_tampered_and_corrupt_checkpoints_are_refused(tmp_path, fmnist_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = train(_tiny(data_dir=str(fmnist_dir), epochs=1), tmp_path / "run", progress=False)
    good = Path(res.checkpoint).read_bytes()
    bad = tmp_path / "tampered.pt"
    torch.save({"format": "lgm-ext-checkpoint-v1", "model": _Payload()}, bad)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(bad)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    raw = tmp_path / "raw_pickle.pt"
    raw.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(cut)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(other)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, fmnist_dir, monkeypatch):
    cfg = _tiny(data_dir=str(fmnist_dir), epochs=2)
    train(cfg, tmp_path, progress=False, stop_after=1)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    from lgm_lab import heads

    real = heads.LGMHead.forward

    def nan_forward(self, features, labels):
        loss, logits = real(self, features, labels)
        return loss * float("nan"), logits

    monkeypatch.setattr(heads.LGMHead, "forward", nan_forward)
    with pytest.raises(TrainingDiverged, match="epoch 2.*Last good checkpoint"):
        train(cfg, tmp_path, progress=False, resume=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_evaluate_reports_error_confusion_and_likelihood(tmp_path, fmnist_dir):
    res = train(_tiny(data_dir=str(fmnist_dir), epochs=1, head="center"), tmp_path, progress=False)
    model, head, cfg, _ = load_trained(res.checkpoint)
    ds = D.load_dataset("fashion-mnist", False, data_dir=fmnist_dir, subset=64, download=False)
    ev = evaluate(model, head, ds)
    cm = torch.tensor(ev["confusion"])
    assert cm.shape == (10, 10) and int(cm.sum()) == 64
    assert ev["error_percent"] == pytest.approx(100 * (1 - cm.diag().sum().item() / 64))
    assert ev["log_likelihood"]["min"] <= ev["log_likelihood"]["median"] <= ev["log_likelihood"]["p95"]


def test_presets_and_bad_config():
    q = config_from_preset("report")
    assert (q.epochs, q.lr, q.momentum, q.nesterov, q.weight_decay, q.schedule) == (25, 0.01, 0.9, True, 5e-4, "cyclic")
    assert config_from_preset("small", epochs=1).epochs == 1  # explicit options win
    with pytest.raises(ValueError):
        config_from_preset("fast")
    with pytest.raises(ValueError):
        config_from_preset(None, head="arcface")


def test_cli_train_and_eval_end_to_end(tmp_path, fmnist_dir):
    from typer.testing import CliRunner

    from lgm_cli.app import app

    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--out", str(out), "--head", "lgm", "--epochs", "1", "--subset", "64",
                            "--test-subset", "32", "--batch-size", "32", "--data-dir", str(fmnist_dir),
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "test error" in r.output
    assert {"checkpoint.pt", "metrics.json", "config.json"} <= {p.name for p in out.iterdir()}
    assert {"metrics.csv"} <= {p.name for p in out.iterdir()}
    r = runner.invoke(app, ["eval", str(out / "checkpoint.pt"), "--subset", "32", "--json", str(tmp_path / "ev.json")])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev.json").read_text())["results"]
    assert ev["samples"] == 32 and 0 <= ev["error_percent"] <= 100 and "log_likelihood" in ev
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = runner.invoke(app, ["eval", str(bad)])
    assert r.exit_code == 2 and "refusing" in r.output
    r = runner.invoke(app, ["train", "--help"])
    assert r.exit_code == 0 and "--warmup-epochs" in r.output


def test_staging_never_writes_into_the_source(tmp_path):
    src = _write_idx(tmp_path / "src", n_train=20, n_test=10)
    before = sorted(p.name for p in src.iterdir())
    D.load_dataset("fashion-mnist", True, data_dir=src, download=False)
    assert sorted(p.name for p in src.iterdir()) == before
    other = _write_idx(tmp_path / "other", n_train=30, n_test=10, seed=1)
    assert len(D.load_dataset("fashion-mnist", True, data_dir=other, download=False)) == 30  # no mixing


@pytest.mark.parametrize("line", [
    dict(subset=400, epochs=3, batch_size=50),   # issue 22.1: NaN at epoch 2, step 3 without the clip
    dict(preset="small", epochs=1, subset=3000),  # the README's first line (2-D, small), its first 24 steps
])
def test_the_documented_small_lgm_runs_train_to_a_finite_loss(tmp_path, fmnist_dir, line):
    """``lgm train --head lgm --subset 400 --epochs 3 --batch-size 50`` (2-D features, the defaults) stopped with
    a non-finite loss at epoch 2, step 3; the README's ``lgm train --preset small --head lgm`` at epoch 2, step 40.
    The default gradient clip (docs/SPEC.md section 5) trains both to the end; without it the first diverges
    on real Fashion-MNIST (the control below), so this test fails if the clip stops working."""
    line = dict(line)
    cfg = config_from_preset(line.pop("preset", None), head="lgm", data_dir=str(fmnist_dir), test_subset=200, **line)
    res = train(cfg, tmp_path / "clip", progress=False)
    assert res.epochs_done == cfg.epochs
    assert all(math.isfinite(h["train_loss"]) for h in res.metrics)
    if fmnist_dir == D.SYSTEM_FASHION_MNIST and line.get("subset") == 400:
        with pytest.raises(TrainingDiverged):
            train(dataclasses.replace(cfg, grad_clip=0.0), tmp_path / "no-clip", progress=False)


def test_lgm_train_into_a_log_prints_progress_lines(tmp_path, fmnist_dir):
    """Issue 43: `lgm train ... > log` printed nothing until the end (a rich bar, not a terminal); now a log gets
    a plain line per interval -- step/total, the epoch's loss, images/s, ETA -- and --no-progress none."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "LGM_PROGRESS_INTERVAL": "0", "COLUMNS": "60"}
    args = [sys.executable, "-m", "lgm_cli.app", "train", "--head", "lgm", "--epochs", "1", "--subset", "128",
            "--test-subset", "32", "--batch-size", "32", "--data-dir", str(fmnist_dir), "--feat-dim", "2"]
    r = subprocess.run([*args, "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "/4 (" in line]
    step = [line for line in lines if line.startswith("epoch 1/1 loss ") and ": 2/4 (50%)" in line]
    assert step and "images/s" in step[0] and "ETA" in step[0], r.stdout
    assert len(max(r.stdout.splitlines(), key=len)) > 60  # a log line is not wrapped at the console's width
    r = subprocess.run([*args, "--out", str(tmp_path / "b"), "--no-progress"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0 and "/4 (" not in r.stdout + r.stderr, r.stdout
