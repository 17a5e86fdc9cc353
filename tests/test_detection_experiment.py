"""Out-of-distribution and adversarial detection (issue 25): the OOD sets, the held-out-classes runs, the
metrics against hand-computed values, the experiment end to end at a tiny budget, and `lgm detect` /
`lgm ood` through the CLI."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import write_idx
from torch.utils.data import Subset, TensorDataset

from lgm_lab.config import TrainConfig, config_from_preset, parse_classes
from lgm_lab.experiments import detection as D
from lgm_lab.experiments import measure as M
from lgm_lab.ood_data import OOD_SETS, ClassSubset, ood_images, other_classes, restrict_classes, split_clean


# ----------------------------------------------------------------------------- data
def test_ood_sets_shapes_ranges_and_polarity():
    x = torch.rand(9, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for name in OOD_SETS:
        o = ood_images(name, x, seed=3)
        assert o.shape == x.shape and o.dtype == x.dtype, name
        assert float(o.min()) >= 0.0 and float(o.max()) <= 1.0, name
    torch.testing.assert_close(ood_images("inverted", x), 1.0 - x, rtol=0, atol=0)
    torch.testing.assert_close(ood_images("noise", x, seed=3), ood_images("noise", x, seed=3), rtol=0, atol=0)
    assert not torch.equal(ood_images("noise", x, seed=3), ood_images("noise", x, seed=4))
    g = ood_images("gaussian", x, n=4000)[:, 0]
    # N(0.5, 1) clipped: P(x <= 0) = P(x >= 1) = Phi(-0.5) = 0.3085
    for edge in (0.0, 1.0):
        assert abs((g == edge).double().mean().item() - 0.3085) < 0.01
    d = ood_images("digits", x, n=5000)
    assert d.shape == (1797, 1, 28, 28)  # all of scikit-learn's digits, no more
    sides = torch.cat([d[:, 0, :, :2].flatten(), d[:, 0, :, -2:].flatten()])  # the 8x8 digits' empty columns
    assert sides.mean() < 0.05 and d.amax((1, 2, 3)).min() > 0.5, "bright on dark, as Fashion-MNIST"
    rgb = ood_images("digits", torch.zeros(2, 3, 32, 32), n=2)
    assert rgb.shape == (2, 3, 32, 32) and torch.equal(rgb[:, 0], rgb[:, 2])
    with pytest.raises(ValueError, match="unknown out-of-distribution set"):
        ood_images("svhn", x)


def test_class_subsets_and_the_clean_split():
    y = torch.tensor([3, 0, 1, 4, 3, 2, 0, 4])
    ds = TensorDataset(torch.arange(8.0)[:, None], y)
    sub = restrict_classes(ds, (0, 3, 4))
    assert [int(sub[i][0]) for i in range(len(sub))] == [0, 1, 3, 4, 6, 7]
    assert [int(sub[i][1]) for i in range(len(sub))] == [1, 0, 2, 1, 0, 2]  # 0 -> 0, 3 -> 1, 4 -> 2
    assert restrict_classes(ds, None) is ds
    rest = other_classes(ds, (0, 3, 4), 5)
    assert [(int(a), int(b)) for a, b in (rest[i] for i in range(len(rest)))] == [(2, 1), (5, 2)]  # labels kept
    with pytest.raises(ValueError, match="held out"):
        other_classes(ds, range(5), 5)
    # the split follows the index in the full set, whatever subset (and class filter) came before
    picked = Subset(ds, [7, 2, 4, 1, 6])
    cal, ev = split_clean(picked)
    assert sorted(int(cal[i][0]) for i in range(len(cal))) == [2, 4, 6]
    assert sorted(int(ev[i][0]) for i in range(len(ev))) == [1, 7]
    cal, ev = split_clean(ClassSubset(picked, (0, 4)))  # samples 7 (class 4), 1 (0), 6 (0)
    assert [int(cal[i][0]) for i in range(len(cal))] == [6] and [int(ev[i][0]) for i in range(len(ev))] == [7, 1]


def test_classes_setting():
    assert parse_classes("0-4", 10) == (0, 1, 2, 3, 4)
    assert parse_classes(" 7, 0-2 ,5", 10) == (0, 1, 2, 5, 7)
    for bad, msg in (("4-2", "empty"), ("0-10", "0..9"), ("3", "at least two"), ("0;4", "classes must"),
                     ("0-99999999999999", "0..9"), ("", "classes must")):
        with pytest.raises(ValueError, match=msg):
            parse_classes(bad, 10)
    cfg = TrainConfig(classes="0-4")
    assert cfg.class_list == (0, 1, 2, 3, 4) and cfg.num_classes == 5 and TrainConfig().num_classes == 10
    with pytest.raises(ValueError, match="classes"):
        config_from_preset(None, classes="0-12")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A softmax, a center-loss and an L-GM network on all classes, and an L-GM network on classes 0-4."""
    from lgm_lab.train import train

    src = write_idx(tmp_path_factory.mktemp("idx"), n_train=160, n_test=64)
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, kw in {"softmax": dict(head="softmax"), "center": dict(head="center"), "lgm": dict(head="lgm"),
                     "lgm5": dict(head="lgm", classes="0-4")}.items():
        cfg = config_from_preset(None, data_dir=str(src), epochs=1, batch_size=32, feat_dim=4, **kw)
        runs[name] = Path(train(cfg, root / name, progress=False).checkpoint)
    return src, runs


def test_held_out_classes_run_trains_and_loads_with_k_classes(tiny):
    from lgm_lab.checkpoints import load_trained

    _src, runs = tiny
    model, head, cfg, ck = load_trained(runs["lgm5"])
    assert head.num_classes == 5 and head.means.shape == (5, 4) and cfg.class_list == (0, 1, 2, 3, 4)
    assert ck["metrics"][0]["test_error_percent"] <= 100
    data = D.detection_data(cfg, fit_points=50)
    assert set(data["abnormal"]) == set(OOD_SETS) | {D.HELDOUT_SET}
    assert int(data["fit"][1].max()) <= 4 and int(data["clean"][1].max()) <= 4
    n_known = len(data["calibration"]) + len(data["clean"][0])
    assert n_known + len(data["abnormal"][D.HELDOUT_SET]) <= 64 and n_known > 0
    assert len(data["fit"][0]) == 50


# ----------------------------------------------------------------------------- metrics
def test_detection_metrics_against_hand_computed_values():
    normal, abnormal = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0.65, 0.5, 0.85, 0.1])
    m, roc = M.detection_metrics(normal, abnormal, {0.05: 0.7})
    assert m["auroc"] == pytest.approx(100 * 12 / 16)  # 12 of the 16 (normal, abnormal) pairs ordered right
    assert m["fpr95_in"] == pytest.approx(50.0)  # accepting all 4 normal (t = 0.6) accepts 0.65 and 0.85
    assert m["eer"] == pytest.approx(25.0)  # t = 0.7: one normal of 4 rejected, one abnormal of 4 accepted
    assert m["rejected"] == {"5": pytest.approx(75.0)}  # 0.65, 0.5, 0.1 < 0.7
    assert roc["auc"] == pytest.approx(0.75)
    assert M.fpr_at_tpr(normal, abnormal, tpr=0.5) == pytest.approx(0.25)  # t = 0.8 accepts 0.85
    s = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0])
    assert M.calibrated_threshold(s, 0.4) == 3.0 and M.rejection_rate(s, 3.0) == pytest.approx(0.4)
    assert M.calibrated_threshold(s, 0.1) == 1.0 and M.rejection_rate(s, 1.0) == 0.0
    assert M.rejection_rate(torch.tensor([float("nan"), 2.0]), 1.0) == 0.5  # NaN is rejected
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="fpr"):
            M.calibrated_threshold(s, bad)


def test_score_detectors_follow_the_library_convention(tiny):
    """The baselines' thresholds are the LikelihoodDetector's for the same scores; each detector's score is
    the one named (L-GM: the head's own log-likelihood and mixture score)."""
    from lgm_ext import LikelihoodDetector
    from lgm_ext.detectors import EnergyDetector, MaxLogitDetector, MaxSoftmaxDetector, OnFeatures
    from lgm_lab.checkpoints import load_trained

    torch.manual_seed(0)
    f, y = torch.randn(300, 4), torch.randint(0, 3, (300,))
    det = LikelihoodDetector.fit(f, y, "tied").calibrate(f, 0.05)
    assert det.threshold == M.calibrated_threshold(det.score(f), 0.05)
    _src, runs = tiny
    names = {}
    for key in ("softmax", "center", "lgm"):
        model, head, _cfg, _ck = load_trained(runs[key])
        names[key] = D.detector_names(head)
        dets = D.build_detectors(head, f, torch.arange(300) % head.num_classes)
        x = torch.randn(20, 4)
        with torch.no_grad():
            if key == "lgm":
                torch.testing.assert_close(dets["L-GM likelihood"].score(x), head.log_likelihood(x))
                # MaxLogit and Energy of the L-GM logits rank as the likelihood and the mixture score
                for mine, theirs in (("L-GM likelihood", OnFeatures(MaxLogitDetector(), head.logits)),
                                     ("L-GM mixture", OnFeatures(EnergyDetector(), head.logits))):
                    diff = dets[mine].score(x).double() - theirs.score(x).double()
                    torch.testing.assert_close(diff, diff[:1].expand(20))
                continue
            torch.testing.assert_close(dets["max-softmax"].score(x), head.logits(x).softmax(1).max(1).values)
            torch.testing.assert_close(dets["Energy"].score(x), head.logits(x).logsumexp(1))
            if key == "center":
                c = head.centers()[head.predict(x)]
                torch.testing.assert_close(dets["center distance"].score(x), -0.5 * (x - c).pow(2).sum(1))
        ms = dets["max-softmax"].calibrate(f, 0.1)
        assert ms.reject(f).double().mean().item() <= 0.1
    base = ("Mahalanobis", "Mahalanobis (L2-normalised)", "KNN", "Energy", "MaxLogit", "max-softmax")
    both = "Mahalanobis (L2-normalised) + Mahalanobis"
    assert D.build_detectors(head, f[:30], torch.arange(30) % head.num_classes)["KNN"].name == "KNN (k=30)"
    assert names == {"softmax": base + ("ViM", both), "center": base + ("ViM", "center distance", both),
                     "lgm": ("L-GM likelihood", "L-GM mixture", "L-GM paper score (identity distance)",
                             "L-GM distance (no log-det)", "L-GM max posterior", "Gaussians re-fitted (diag)",
                             "Mahalanobis",
                             "Mahalanobis (L2-normalised)", "KNN", "max-softmax", both)}
    with pytest.raises(ValueError, match="calibrate"):
        OnFeatures(MaxSoftmaxDetector(), head.logits).reject(f)


# ----------------------------------------------------------------------------- the experiment
def test_detection_experiment_tiny(tmp_path, monkeypatch):
    src = write_idx(tmp_path / "idx", n_train=120, n_test=64)
    monkeypatch.setitem(D.DETECTION_PRESETS, "quick", dict(
        train=dict(subset=80, test_subset=48, epochs=1, batch_size=32), seeds=(0, 1), fit_points=80,
        attack_subset=4, adaptive_subset=3, protocol=dict(name="tiny", eps=(0.3,), subset=2, seeds=(0,))))
    monkeypatch.setattr(D, "EPS", (0.3,))
    monkeypatch.setattr(D, "DETECTION_MODELS", {k: D.DETECTION_MODELS[k] for k in ("center", "lgm-a1")})
    out = tmp_path / "det"
    stages = []
    res = D.detection_experiment(out, data_dir=src, progress=lambda m: None,
                                 on_stage=lambda d, t, w: stages.append((d, t)))
    total = D.detection_stages("quick")
    assert stages == [(i, total) for i in range(total)]
    both = "Mahalanobis (L2-normalised) + Mahalanobis"
    dets = {f"{d} (center)" for d in ("Mahalanobis", "Mahalanobis (L2-normalised)", "KNN", "Energy",
                                      "MaxLogit", "max-softmax", "ViM", "center distance", both)}
    dets |= {f"{d} (lgm-a1)" for d in ("L-GM likelihood", "L-GM mixture", "L-GM paper score (identity distance)",
                                       "L-GM distance (no log-det)", "L-GM max posterior", "Gaussians re-fitted (diag)",
                                       "Mahalanobis", "Mahalanobis (L2-normalised)", "KNN", "max-softmax", both)}
    assert set(res["runs"]) == dets
    sets = {*OOD_SETS, D.HELDOUT_SET, "FGSM 0.3", "PGD-10 0.3"}
    assert set(res["sets"]) == sets and "photos" in sets
    for det, seeds in res["runs"].items():
        assert set(seeds) == {0, 1}, det
        assert "protocol" in seeds[0] and "protocol" not in seeds[1] and "transfer" not in seeds[1]
        t = seeds[0]["transfer"]
        assert t["source_seed"] == 1 and set(t["eps"]) == {"0.3"}, det
        assert t["eps"]["0.3"]["n"] == 2 and 0 <= t["eps"]["0.3"]["5"] <= t["eps"]["0.3"]["1"] <= \
            t["eps"]["0.3"]["ceiling"] <= 100
        for r in seeds.values():
            assert set(r["sets"]) == sets and set(r["false_rejection"]) == {"5", "1"}
            for m in r["sets"].values():
                for k in ("auroc", "aupr_in", "aupr_out", "fpr95_in", "fpr95_out", "eer"):
                    assert 0 <= m[k] <= 100, (det, k)
                assert set(m["rejected"]) == {"5", "1"} and m["rejected"]["1"] <= m["rejected"]["5"]
            a = r["adaptive"]["0.3"]
            for o in ("5", "1"):
                assert 0 <= a["pgd"][o] <= 100 and a["adaptive"][o] <= a["ceiling"] <= 100
            if "protocol" not in r:
                continue
            p = r["protocol"]["eps"]["0.3"]
            assert set(p) == {"restarts", "step sweep", "multi-targeted", "long", "all", "feature space"}
            assert p["all"]["5"] >= max(p[v]["5"] for v in ("restarts", "step sweep", "multi-targeted"))
    assert (out / "runs" / "center-s0" / "transfer_tiny_eval.json").exists()
    assert not (out / "runs" / "center-s1" / "transfer_tiny_eval.json").exists()
    first_transfer = (out / "runs" / "center-s0" / "transfer_tiny_eval.json").read_text()
    diag = res["networks"]["lgm-a1"][0]["diagnostics"]
    assert set(diag["sets"]) == set(OOD_SETS) and diag["head_log_var_mean"] is not None
    assert len(res["verdicts"]) == (len(dets) - 1) * (len(sets) + 1)
    assert {v["verdict"] for v in res["verdicts"]} <= {"holds", "fails", "within noise"}
    md = (out / "detection.md").read_text()
    for text in ("AUROC", "AUPR-in", "AUPR-out", "OpenOOD", "Lee et al.", "EER", "Realised false-rejection",
                 "Adaptive attack", "full protocol", "Transfer check", "seed 1 -> seed 0",
                 "Which detector rejects what", "Why the L-GM likelihood",
                 "figures/detection_roc.png", *dets):
        assert text in md, text
    assert (out / "figures" / "detection_roc.png").stat().st_size > 1000
    saved = json.loads((out / "detection.json").read_text())
    assert saved["preset"] == "quick"
    assert saved["figures"] == ["figures/detection_roc.png"]  # the report's own files, not this machine's path
    # a second call reuses every network and every measurement
    before = (out / "runs" / "lgm-a1-heldout-s0" / "checkpoint.pt").stat().st_mtime_ns
    said = []
    res2 = D.detection_experiment(out, data_dir=src, progress=said.append)
    assert (out / "runs" / "lgm-a1-heldout-s0" / "checkpoint.pt").stat().st_mtime_ns == before
    assert res2["models_reused"] == res2["models"] == 8
    # every measurement, both networks' full protocol (cached apart) and both transfer checks
    assert sum("reused" in m for m in said) == 8 + 2 + 2 and "attack protocol tiny on center-s0: reused" in said
    assert json.loads(json.dumps(res2["runs"])) == json.loads(json.dumps(res["runs"]))
    # the same networks elsewhere (a report's own) are measured there; another config's folder is ignored
    ck_other = out / "runs" / "lgm-a1-s1" / "checkpoint.pt"
    before_other = (ck_other.stat().st_mtime_ns, ck_other.read_bytes())
    reuse = {k: out / "runs" / k for k in ("center-s0", "lgm-a1-s0", "lgm-a1-s1")}
    reuse["center-s1"] = out / "runs" / "lgm-a1-s1"
    killed = tmp_path / "killed"  # a run killed before its first checkpoint: config.json only
    killed.mkdir()
    (killed / "config.json").write_bytes((out / "runs" / "center-heldout-s0" / "config.json").read_bytes())
    reuse["center-heldout-s0"] = killed
    said, stages = [], []
    res4 = D.detection_experiment(tmp_path / "det2", data_dir=src, progress=said.append, reuse_runs=reuse,
                                  on_stage=lambda d, t, w: stages.append((d, t)))
    assert stages == [(i, total) for i in range(total)]
    assert sorted(p.name for p in killed.iterdir()) == ["config.json"]  # left as it was; trained in det2
    assert (tmp_path / "det2" / "runs" / "center-heldout-s0" / "checkpoint.pt").is_file()
    assert any(m.startswith("training center-s1 (") and "not used (another config (head 'lgm'" in m for m in said)
    assert any(m.startswith("training center-s0 (") and "measured there" in m for m in said)
    assert res4["shared_runs"] == {k: str(out / "runs" / k) for k in ("center-s0", "lgm-a1-s0", "lgm-a1-s1")}
    assert res4["models_reused"] == 3 and "measuring center-s0: reused" in said
    assert not (tmp_path / "det2" / "runs" / "center-s0").exists()
    assert (tmp_path / "det2" / "runs" / "center-s1" / "checkpoint.pt").is_file()  # trained: the other was lgm's
    assert (ck_other.stat().st_mtime_ns, ck_other.read_bytes()) == before_other
    assert res4["runs"]["KNN (center)"][0]["sets"] == res["runs"]["KNN (center)"][0]["sets"]
    assert "3 of them the same runs of the report's own networks" in (tmp_path / "det2" / "detection.md").read_text()
    # a run of its own comes first; a run elsewhere is shared only if finished with the same config and data
    res5 = D.detection_experiment(tmp_path / "det2", data_dir=src, progress=lambda m: None,
                                  reuse_runs={**reuse, "center-s1": out / "runs" / "center-s1"})
    assert set(res5["shared_runs"]) == {"center-s0", "lgm-a1-s0", "lgm-a1-s1"} and res5["models_reused"] == 8
    from dataclasses import replace

    from lgm_lab.experiments.runs import run_config, why_not_shared
    cfg = run_config("fashion-mnist", src, 100, 0, dict(D.DETECTION_PRESETS["quick"]["train"],
                                                        **D.DETECTION_MODELS["center"], classes=None))
    assert cfg.device == "auto" and why_not_shared(cfg, out / "runs" / "center-s0") is None  # it ran on "cpu"
    shutil.copytree(src, tmp_path / "copy")  # the same data from another folder
    assert why_not_shared(replace(cfg, data_dir=str(tmp_path / "copy")), out / "runs" / "center-s0") is None
    assert why_not_shared(replace(cfg, epochs=2), out / "runs" / "center-s0") == "another config (epochs 1)"
    assert why_not_shared(cfg, killed) == "no finished run there"
    assert "another config (head 'lgm'" in why_not_shared(cfg, out / "runs" / "lgm-a1-s0")
    # --attack-protocol none: the same networks, measured again without the full protocol and the transfer check
    stages, said = [], []
    res_none = D.detection_experiment(out, data_dir=src, progress=said.append, attack_protocol="none",
                                      on_stage=lambda d, t, w: stages.append((d, t)))
    total_none = D.detection_stages("quick", "none")
    assert total_none == total - 2 * len(D.DETECTION_MODELS)  # no protocol, no transfer stage
    assert stages == [(i, total_none) for i in range(total_none)]
    assert res_none["models_reused"] == 8 and res_none["attack_protocol"] == "none" and res_none["protocol"] is None
    # nothing is measured again: the protocol is cached apart from the rest
    assert [m for m in said if m.startswith("measuring")] == [m for m in said if m.endswith(": reused")
                                                              and m.startswith("measuring")]
    assert "measuring center-s0: reused" in said and "measuring lgm-a1-heldout-s1: reused" in said
    assert not any("attack protocol" in m for m in said)
    for det, seeds in res_none["runs"].items():
        assert "protocol" not in seeds[0] and "transfer" not in seeds[0], det
        assert seeds[0]["adaptive"] == res["runs"][det][0]["adaptive"], det  # the rest is measured as before
    md = (out / "detection.md").read_text()
    assert "--detection --preset quick --attack-protocol none`" in md and "Not run (`--attack-protocol none`)" in md
    assert "Transfer check" not in md
    # another preset's protocol: its seeds (here seed 1, with the transfer check from seed 0) and its name
    monkeypatch.setitem(D.DETECTION_PRESETS, "standard", dict(
        D.DETECTION_PRESETS["quick"], protocol=dict(name="tiny", eps=(0.3,), subset=2, seeds=(1,))))
    said = []
    res_std = D.detection_experiment(out, data_dir=src, progress=said.append, attack_protocol="standard")
    for det, seeds in res_std["runs"].items():
        assert "protocol" in seeds[1] and "protocol" not in seeds[0] and "transfer" not in seeds[0], det
        assert seeds[1]["transfer"]["source_seed"] == 0, det
    for name in ("center", "lgm-a1"):  # only the protocol is measured, on the networks of its seed
        assert f"measuring {name}-s1: reused" in said and f"attack protocol tiny on {name}-s1" in said
        assert f"measuring {name}-s0: reused" in said
    assert "--detection --preset quick --attack-protocol standard`" in (out / "detection.md").read_text()
    with pytest.raises(ValueError, match="attack_protocol must be one of"):  # refused before anything is written
        D.detection_experiment(tmp_path / "not-made", data_dir=src, attack_protocol="paper")
    assert not (tmp_path / "not-made").exists()
    # a measurement cached before the protocol was cached apart (protocol 3: one file, the protocol's results
    # inside each detector's) is kept and split into today's two caches, not measured again
    run = out / "runs" / "center-s0"
    new_eval = json.loads((run / "detection_eval.json").read_text())
    new_prot = json.loads((run / "protocol_tiny_eval.json").read_text())
    legacy = json.loads(json.dumps(new_eval["eval"]))
    for name, r in new_prot["eval"].items():
        legacy["detectors"][name]["protocol"] = r
    legacy_settings = dict(new_eval["settings"], protocol=3, attack_protocol=new_prot["settings"]["attack_protocol"])
    (run / "detection_eval.json").write_text(json.dumps({"settings": legacy_settings, "eval": legacy}))
    (run / "protocol_tiny_eval.json").unlink()
    # and its transfer check, then one file per target (res4 above measured another source into this target's)
    (run / "transfer_tiny_eval.json").unlink()
    (run / "transfer_eval.json").write_text(first_transfer)
    said = []
    res_legacy = D.detection_experiment(out, data_dir=src, progress=said.append)
    assert "measuring center-s0: reused" in said and "attack protocol tiny on center-s0: reused" in said
    assert "transfer center-s1 -> center-s0: reused" in said
    assert json.loads((run / "transfer_tiny_eval.json").read_text()) == json.loads(first_transfer)
    assert (run / "transfer_eval.json").read_text() == first_transfer  # the old file is read, never removed
    assert json.loads((run / "detection_eval.json").read_text()) == new_eval
    assert json.loads((run / "protocol_tiny_eval.json").read_text()) == new_prot
    assert json.loads(json.dumps(res_legacy["runs"])) == json.loads(json.dumps(res["runs"]))
    # a network that diverges is recorded and left out, the rest is still measured and reported
    from lgm_lab.train import TrainingDiverged

    def train_or_reuse(cfg, run_dir, progress):
        if run_dir.name in ("lgm-a1-heldout-s0", "lgm-a1-heldout-s1", "lgm-a1-s1"):
            raise TrainingDiverged("non-finite loss (nan) at epoch 2, step 1 (lr 0.005); training stopped. Last ...")
        return True

    monkeypatch.setattr(D, "train_or_reuse", train_or_reuse)
    stages = []
    res3 = D.detection_experiment(out, data_dir=src, progress=lambda m: None,
                                  on_stage=lambda d, t, w: stages.append((d, t)))
    assert stages == [(i, total) for i in range(total)]
    why = "non-finite loss (nan) at epoch 2, step 1 (lr 0.005)"
    assert res3["diverged"] == {k: why for k in ("lgm-a1-heldout-s0", "lgm-a1-heldout-s1", "lgm-a1-s1")}
    assert "transfer" not in res3["runs"][D.LGM_DETECTOR][0] and "transfer" in res3["runs"]["KNN (center)"][0]
    assert D.HELDOUT_SET not in res3["runs"][D.LGM_DETECTOR][0]["sets"]
    assert D.HELDOUT_SET in res3["sets"] and len(res3["verdicts"]) == (len(dets) - 1) * len(sets)  # no held-out
    assert "Diverged" in (out / "detection.md").read_text()
    # a diverged network of the protocol's seed: its protocol stage is counted and reported too (the bar ends full)
    def diverge_center_s0(cfg, run_dir, progress):
        if run_dir.name == "center-s0":
            raise TrainingDiverged("non-finite loss (nan) at epoch 1, step 1 (lr 0.005); training stopped.")
        return True

    monkeypatch.setattr(D, "train_or_reuse", diverge_center_s0)
    stages, said = [], []
    res6 = D.detection_experiment(out, data_dir=src, progress=said.append,
                                  on_stage=lambda d, t, w: stages.append((d, t)))
    assert stages == [(i, total) for i in range(total)]
    assert "attack protocol tiny on center-s0: diverged, skipped" in said and set(res6["diverged"]) == {"center-s0"}


def test_the_reports_networks_are_the_detection_networks():
    """`lgm reproduce --detection` shares the report's 100-D networks with the detection experiment: for every
    run it maps, the two experiments' configs are the same (else it would silently train them again)."""
    from dataclasses import asdict

    from lgm_lab.config import REPRODUCE_PRESETS
    from lgm_lab.experiments.paper import MODEL_SPECS
    from lgm_lab.experiments.runs import pick_dataset, run_config

    shared = 0
    for preset, P in D.DETECTION_PRESETS.items():
        R = REPRODUCE_PRESETS[preset]
        for name in set(R["models100"]) & set(D.DETECTION_MODELS):
            for seed in R["seeds"]:
                report = run_config(pick_dataset(preset, None), None, 100, seed, dict(R["train"], **MODEL_SPECS[name]))
                det = run_config("fashion-mnist", None, 100, seed, dict(P["train"], **D.DETECTION_MODELS[name],
                                                                        classes=None))
                assert asdict(report) == asdict(det), (preset, name, seed)
                shared += 1
    assert shared == 3 + 9  # quick: the report's seed 0; standard: seeds 0-2


def test_attack_protocol_of_another_preset():
    """--attack-protocol: a preset's training and measurement with another preset's adaptive protocol, or none;
    an unknown name is refused naming the choices; the CLI's choices are the presets' names and none."""
    from lgm_lab.config import ATTACK_PROTOCOL_CHOICES

    assert ATTACK_PROTOCOL_CHOICES == (*D.DETECTION_PRESETS, "none")
    std, quick = D.DETECTION_PRESETS["standard"], D.DETECTION_PRESETS["quick"]
    P = D.detection_preset("standard", "quick")
    assert P["protocol"] == quick["protocol"] and P["train"] == std["train"] and P["seeds"] == std["seeds"]
    assert {k: v for k, v in P.items() if k != "protocol"} == {k: v for k, v in std.items() if k != "protocol"}
    assert D.DETECTION_PRESETS["standard"]["protocol"]["name"] == "standard"  # the preset itself is untouched
    assert D.detection_preset("standard")["protocol"] == std["protocol"]
    assert D.detection_preset("quick", "none")["protocol"] is None
    # stages: the protocol and one transfer check per protocol seed and network kind
    n = len(D.DETECTION_MODELS)
    assert D.detection_stages("standard", "none") == 4 * 3 * n + 1
    assert D.detection_stages("standard", "quick") == (4 * 3 + 2 * 1) * n + 1
    assert D.detection_stages("standard") == (4 * 3 + 2 * 3) * n + 1
    with pytest.raises(ValueError, match="attack_protocol must be one of quick, standard, none .*got 'paper'"):
        D.detection_preset("standard", "paper")
    with pytest.raises(ValueError, match="unknown preset 'paper'"):
        D.detection_preset("paper", "quick")


def _fake_run(eer: float, adaptive: float, seed: int) -> dict:
    m = {"auroc": 100 - eer, "aupr_in": 100 - eer, "aupr_out": 100 - eer, "fpr95_in": 2 * eer, "fpr95_out": 3 * eer,
         "eer": eer + 0.1 * seed, "rejected": {"5": 100 - eer, "1": 90 - eer}, "n_normal": 1000, "n_abnormal": 1000}
    return {"sets": {"digits": dict(m), "PGD-10 0.3": dict(m)}, "false_rejection": {"5": 5.0 + 0.1 * seed, "1": 1.0},
            "thresholds": {"5": -1.0, "1": -2.0}, "n_attack": 500, "n_adaptive": 500,
            "adaptive": {"0.3": {"pgd": {"5": 10.0, "1": 12.0}, "adaptive": {"5": adaptive + seed, "1": 95.0},
                                 "ceiling": 99.0}}}


def test_verdicts_and_report_over_seeds():
    """L-GM against each detector with the report's z-test; the report shows mean ± std over seeds."""
    res = {"preset": "quick", "dataset": "fashion-mnist", "seeds": [0, 1, 2], "eps": [0.3], "fpr": 0.05,
           "fprs": [0.05, 0.01],
           "train": {"subset": 4000, "epochs": 4, "test_subset": 2000}, "fit_points": 4000, "attack_subset": 500,
           "heldout_classes": "0-4", "seconds": 60.0, "models": 18, "models_reused": 0,
           "figures": ["x/figures/detection_roc.png"], "sets": ["digits", "PGD-10 0.3"],
           "networks": {n: {s: {"clean_error": 10.0, "heldout_clean_error": 5.0, "n_attack": 500,
                                "attack_error": {"FGSM 0.3": 90.0, "PGD-10 0.3": 99.0}} for s in (0, 1, 2)}
                        for n in ("softmax", "lgm-a1")},
           "runs": {D.LGM_DETECTOR: {s: _fake_run(5.0, 20.0, s) for s in (0, 1, 2)},
                    "Mahalanobis (softmax)": {s: _fake_run(15.0, 20.5, s) for s in (0, 1, 2)},
                    "max-softmax (softmax)": {s: _fake_run(4.8, 90.0, s) for s in (0, 1, 2)}}}
    v = {(x["other"], x["what"]): x for x in D.detection_verdicts(res)}
    assert len(v) == 2 * 3
    assert v["Mahalanobis (softmax)", "digits"]["verdict"] == "holds"  # 5 vs 15% EER on 2 x 1000 images
    assert v["max-softmax (softmax)", "digits"]["verdict"] == "within noise"  # 5 vs 4.8
    assert v["Mahalanobis (softmax)", "adaptive PGD-10 0.3"]["verdict"] == "within noise"  # 21 vs 21.5
    assert v["max-softmax (softmax)", "adaptive PGD-10 0.3"]["verdict"] == "holds"  # 21 vs 91
    assert v["Mahalanobis (softmax)", "digits"]["a"] == pytest.approx(5.1)  # mean of 5.0, 5.1, 5.2
    res["verdicts"] = list(v.values())
    md = D.detection_markdown(res)
    assert "5.1 ± 0.1" in md and "21.0 ± 1.0" in md and md.count("**holds** (") == 3
    assert "| Mahalanobis (softmax) | **holds** (" in md and "| max-softmax (softmax) | **within noise** (" in md
    assert "| Mahalanobis (softmax) | 15.1 ± 0.1 | 15.1 ± 0.1 |" in md  # the EER table


def test_reproduce_with_detection_adds_the_section(tmp_path, monkeypatch):
    """`lgm reproduce --inverse --detection`: both experiments' stages extend the progress bar in turn, and
    the detection section lands in report.md with its figure path (experiments replaced by stubs)."""
    from lgm_lab.experiments import inverse as IE
    from lgm_lab.experiments import reproduce as E

    src = write_idx(tmp_path / "idx", n_train=64, n_test=32)
    monkeypatch.setitem(E.REPRODUCE_PRESETS, "quick", dict(
        train=dict(subset=32, test_subset=32, epochs=1, batch_size=32), seeds=(0,),
        models100=("softmax",), models2=(), attack_subset=8, embed_points=32))

    def stub(name, n, text):
        def run(out, *, preset, data_dir, progress, on_stage, **kw):
            Path(out).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                on_stage(i, n, "stub")
            (Path(out) / name).write_text(text)
            return {"summary": {}, "verdict": [], "verdicts": [], "seeds": [0], "train": {},
                    "figures": ["figures/detection_roc.png"],
                    "step_ms": {}, "attack_protocol": kw.get("attack_protocol"), "protocol": None,
                    "shared_runs": {}}
        return run

    monkeypatch.setattr(IE, "inverse_experiment", stub("inverse.md", IE.inverse_stages("quick"),
                                                       "# Inverse-adversary centers\n\n## Verdict\n\nx\n"))
    monkeypatch.setattr(D, "detection_experiment", stub("detection.md", D.detection_stages("quick"),
                                                        "# Out-of-distribution detection\n\n## Detection\n\n"
                                                        "### AUROC\n\n![ROC curves](figures/detection_roc.png)\n"))
    stages = []
    E.reproduce(tmp_path / "out", preset="quick", data_dir=src, progress=lambda m: None, inverse=True, detection=True,
                on_stage=lambda d, t, w: stages.append((d, t)))
    total = E.reproduce_stages("quick", inverse=True, detection=True)
    assert stages == [(i, total) for i in range(total)]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "\n## Out-of-distribution detection" in report and "\n### Detection" in report
    assert "\n#### AUROC" in report and "](detection/figures/detection_roc.png)" in report
    with pytest.raises(ValueError, match="detection experiment has no preset"):
        E.reproduce(tmp_path / "out2", preset="paper", detection=True)
    # the attack protocol is the detection experiment's setting, passed through and counted in the stages
    seen = {}

    def det_stub(out, *, attack_protocol=None, reuse_runs=None, **kw):
        seen["attack_protocol"] = attack_protocol
        seen["reuse_runs"] = reuse_runs
        return stub("detection.md", D.detection_stages("quick", attack_protocol),
                    "# Out-of-distribution detection\n")(out, attack_protocol=attack_protocol, **kw)

    monkeypatch.setattr(D, "detection_experiment", det_stub)
    stages = []
    E.reproduce(tmp_path / "out", preset="quick", data_dir=src, progress=lambda m: None, detection=True,
                attack_protocol="none", on_stage=lambda d, t, w: stages.append((d, t)))
    total = E.reproduce_stages("quick", detection=True, attack_protocol="none")
    assert seen == {"attack_protocol": "none",
                    "reuse_runs": {"softmax-s0": tmp_path / "out" / "runs" / "softmax-100d-s0"}}
    assert total < E.reproduce_stages("quick", detection=True)
    recorded = json.loads((tmp_path / "out" / "results.json").read_text())["detection"]
    assert recorded["attack_protocol"] == "none" and recorded["shared_runs"] == {}
    assert recorded["figures"] == ["detection/figures/detection_roc.png"]  # relative to results.json's folder
    assert stages == [(i, total) for i in range(total)]
    with pytest.raises(ValueError, match="needs detection=True"):
        E.reproduce(tmp_path / "out3", preset="quick", attack_protocol="quick")
    with pytest.raises(ValueError, match="attack_protocol must be one of .* got 'bogus'"):
        E.reproduce(tmp_path / "out3", preset="quick", detection=True, attack_protocol="bogus")
    assert not (tmp_path / "out3").exists()  # refused before anything is written


def test_reproduce_passes_the_attack_protocol(tmp_path, monkeypatch):
    from lgm_lab.experiments import reproduce as E

    seen = {}

    def run(out, **kw):
        seen.update(kw)
        return {"seconds": 1.0}

    monkeypatch.setattr(E, "reproduce", run)
    _cli("reproduce", "--detection", "--attack-protocol", "none", "--no-progress", "--out", tmp_path / "r")
    assert seen["attack_protocol"] == "none" and seen["detection"] is True
    _cli("reproduce", "--detection", "--no-progress", "--out", tmp_path / "r")
    assert seen["attack_protocol"] is None


def test_reproduce_attack_protocol_needs_detection_in_one_line(tmp_path):
    out = _cli("reproduce", "--attack-protocol", "quick", "--out", tmp_path / "r", code=2)
    assert "--attack-protocol is a setting of the detection experiment: give --detection too" in out
    assert "Traceback" not in out and not (tmp_path / "r").exists()
    out = _cli("reproduce", "--detection", "--attack-protocol", "paper", "--out", tmp_path / "r", code=2)
    assert "quick" in out and "standard" in out and "none" in out and not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- the CLI
def _cli(*args, code=0):
    from typer.testing import CliRunner

    from lgm_cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r.output


def test_detect_fit_and_score(tiny, tmp_path):
    _src, runs = tiny
    det_file = tmp_path / "det.pt"
    _cli("detect", "fit", runs["softmax"], "--covariance", "tied", "--fpr", 0.1, "--out", det_file, "--no-progress")
    saved = torch.load(det_file, weights_only=True)  # plain tensors, numbers and strings
    assert saved["split"] == "heldout" and saved["detector_name"] == "mahalanobis" and saved["fit_images"] == 160
    assert saved["detector"]["covariance"] == "tied" and saved["detector"]["fpr"] == 0.1
    out = tmp_path / "score.json"
    _cli("detect", "score", det_file, runs["softmax"], "--data", "fashion-mnist,noise,inverted,digits,photos",
         "--json", out, "--no-progress")
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"fashion-mnist", "noise", "inverted", "digits", "photos"}
    assert res["split"] == "heldout"
    assert all(0 <= r["rejected_percent"] <= 100 for r in res["results"].values())
    assert res["results"]["fashion-mnist"]["images"] == res["results"]["noise"]["images"] == res["test_images"]
    # the L-GM head's own Gaussians, calibrated on the training images; held-out classes of a 5-class run
    _cli("detect", "fit", runs["lgm"], "--covariance", "head", "--split", "train", "--out", det_file, "--no-progress")
    assert torch.load(det_file, weights_only=True)["fit_images"] == 160
    lgm5 = tmp_path / "lgm5.pt"
    _cli("detect", "fit", runs["lgm5"], "--covariance", "head", "--out", lgm5, "--no-progress")
    _cli("detect", "score", lgm5, runs["lgm5"], "--data", "heldout-classes,gaussian", "--json", out, "--no-progress")
    assert set(json.loads(out.read_text())["results"]) == {"held-out classes", "gaussian"}


def _one_line_error(*args, match):
    text = _cli(*args, code=2)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in text, text
    return lines[0]


def test_detect_refuses_bad_inputs_in_one_line(tiny, tmp_path):
    _src, runs = tiny
    det_file = tmp_path / "det.pt"
    _cli("detect", "fit", runs["softmax"], "--out", det_file, "--no-progress")
    # a detector fitted to one model refuses another model's features
    _one_line_error("detect", "score", det_file, runs["center"], match="fitted to another model")
    _one_line_error("detect", "fit", runs["softmax"], "--covariance", "head", "--out", det_file,
                    match="does not apply")
    for fpr in ("0", "1", "nan"):
        _one_line_error("detect", "fit", runs["softmax"], "--fpr", fpr, "--out", det_file, match="--fpr")
    _one_line_error("detect", "fit", runs["softmax"], "--out", tmp_path, match="--out")
    _one_line_error("detect", "fit", runs["softmax"], "--fit-subset", 0, "--out", det_file, match="--fit-subset")
    _one_line_error("detect", "fit", tmp_path / "missing.pt", "--out", det_file, match="no checkpoint")
    _one_line_error("detect", "score", det_file, runs["softmax"], "--data", "cifar10", match="--data")
    _one_line_error("detect", "score", det_file, runs["softmax"], "--data", "heldout-classes",
                    match="some classes")
    _one_line_error("detect", "score", runs["softmax"], runs["softmax"], match="not a detector file")
    (tmp_path / "junk.pt").write_bytes(b"not a file torch wrote")
    _one_line_error("detect", "score", tmp_path / "junk.pt", runs["softmax"], match="not a detector file")
    _one_line_error("ood", runs["softmax"], "--fpr", 2, "--out", tmp_path / "o", match="--fpr")
    _one_line_error("ood", runs["softmax"], "--eps", "x", "--out", tmp_path / "o", match="--eps")
    _one_line_error("ood", runs["softmax"], "--attack-subset", 0, "--out", tmp_path / "o", match="--attack-subset")
    bad = _cli("detect", "fit", runs["softmax"], "--covariance", "full", code=2)
    assert "full" in bad


def test_ood_command(tiny, tmp_path):
    _src, runs = tiny
    out = tmp_path / "ood"
    text = _cli("ood", runs["center"], runs["lgm5"], "--eps", "0.3", "--attack-subset", 3, "--fit-subset", 100,
                "--subset", 40, "--out", out, "--json", tmp_path / "ood.json", "--no-progress")
    assert "AUROC" in text
    res = json.loads((tmp_path / "ood.json").read_text())
    assert set(res["results"]) == {"center", "lgm-a1"}
    lgm5 = res["results"]["lgm-a1"]["detectors"]["L-GM likelihood"]
    assert D.HELDOUT_SET in lgm5["sets"] and "PGD-10 0.3" in lgm5["sets"]
    assert set(res["results"]["center"]["detectors"]) == {
        "Mahalanobis", "Mahalanobis (L2-normalised)", "KNN", "Energy", "MaxLogit", "max-softmax", "ViM",
        "center distance", "Mahalanobis (L2-normalised) + Mahalanobis"}
    cd = res["results"]["center"]["detectors"]["center distance"]
    assert set(cd["adaptive"]) == {"0.3"} and set(cd["false_rejection"]) == {"5", "1"}
    assert res["fprs"] == [0.05, 0.01] and "photos" in cd["sets"]
    assert (out / "detection_roc.png").stat().st_size > 1000 and (out / "results.json").exists()
    _cli("ood", runs["lgm"], "--no-adaptive", "--eps", "0.1", "--attack-subset", 2, "--subset", 20, "--out", out,
         "--format", "svg", "--overwrite", "--no-progress")  # its own results replaced (issue 42)
    assert (out / "detection_roc.svg").exists()


def test_ood_data_folders_and_datasets(tiny, tmp_path):
    """`lgm ood --ood-data`: a folder of a user's images (any size, colour) and another dataset's test split
    are measured as abnormal sets beside the built-in ones; a bad spec is one line."""
    from PIL import Image

    _src, runs = tiny
    photos = tmp_path / "my-photos"
    photos.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        arr = (torch.rand(40, 30, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(photos / f"p{i}.png")
    other = write_idx(tmp_path / "other", n_train=8, n_test=12, seed=5)
    _cli("ood", runs["softmax"], "--no-adaptive", "--eps", "0.1", "--attack-subset", 2, "--subset", 20,
         "--fpr", "0.1", "--ood-data", photos, "--ood-data", f"mnist:{other}", "--out", tmp_path / "o",
         "--json", tmp_path / "o.json", "--no-progress")
    res = json.loads((tmp_path / "o.json").read_text())
    sets = res["results"]["softmax"]["detectors"]["KNN"]["sets"]
    assert sets["my-photos"]["n_abnormal"] == 5 and sets["mnist"]["n_abnormal"] == 10  # as many as clean
    assert set(sets["my-photos"]["rejected"]) == {"10"}
    _one_line_error("ood", runs["softmax"], "--ood-data", tmp_path / "nowhere", "--out", tmp_path / "o2",
                    match="--ood-data")
    _one_line_error("ood", runs["softmax"], "--fpr", "0.05,0.05", "--out", tmp_path / "o2", match="--fpr")
    before = sorted(p.name for p in photos.iterdir())
    _one_line_error("ood", runs["softmax"], "--ood-data", photos, "--out", photos, match="reads")  # no output
    _one_line_error("ood", runs["softmax"], "--ood-data", f"mnist:{other}", "--out", other,
                    match="reads")  # among the user's images or data
    assert sorted(p.name for p in photos.iterdir()) == before
    _one_line_error("ood", runs["softmax"], "--ood-data", photos, "--ood-data", photos, "--out", tmp_path / "o2",
                    match="measured already")
