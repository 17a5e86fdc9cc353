"""Out-of-distribution and adversarial detection, measured (issues 25 and 35; docs/SPEC.md section 8).

Networks: LeNet++ 100-D with a softmax, a center-loss and an L-GM (alpha = 1) head, each seed trained twice
(:data:`DETECTION_MODELS`): on all ten Fashion-MNIST classes, and on classes 0-4 only (the held-out-classes
protocol: the test images of classes 5-9 are its unknown inputs).  Each network is measured by
:func:`lgm_lab.detection_protocol.measure_network` (its detectors: the field's post-hoc baselines on every
network -- pytorch-ood's KNN, ViM, Energy, MaxLogit, max-softmax; Mahalanobis on raw and L2-normalised
features --, the center distance, and an L-GM head's own likelihood and mixture score and Gaussians re-fitted
to its features), cached beside its checkpoint.  Thresholds at the 5% and 1% operating points, metrics per
abnormal set (rejections, AUROC, AUPR-in/out, FPR at 95% TPR both ways, EER), the adaptive PGD-10 attack on
every detector and the full adaptive protocol on the preset's seeds, with the transfer attack from the next
seed's network of the same kind as its check.  Over seeds: mean ± std,
:func:`~lgm_lab.experiments.stats.compare`'s verdicts for "L-GM's likelihood detects X better", and per set
the detector that rejects the most at the 5% point (:func:`preferred_detectors`).  Finished runs and
measurements are reused.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..adaptive_eval import ATTACK_PROTOCOLS
from ..baselines import KNN_K
from ..checkpoints import checkpoint_digest, load_trained
from ..detection_protocol import (
    EPS,
    FPR,
    FPRS,
    HELDOUT_SET,
    PGD_STEPS,
    ScoreDetector,
    build_detectors,
    calibrated_detectors,
    center_distance,
    detection_data,
    detector_names,
    lgm_diagnostics,
    measure_network,
    transfer_check,
)
from ..figures import detection_roc_figure
from ..ood_data import OOD_SETS
from ..train import TrainingDiverged
from .measure import operating_point_key
from .runs import budget_words, load_cached, run_config, save_cached, train_or_reuse
from .stats import compare, mean_std_text

__all__ = ["DETECTION_MODELS", "DETECTION_PRESETS", "HELDOUT_CLASSES", "EPS", "PGD_STEPS", "FPR", "FPRS",
           "LGM_DETECTOR", "ScoreDetector", "center_distance", "detector_names", "build_detectors", "HELDOUT_SET",
           "detection_data", "lgm_diagnostics", "measure_network", "detection_experiment", "detection_stages",
           "detection_verdicts", "preferred_detectors", "detection_markdown"]

DETECTION_MODELS = {"softmax": dict(head="softmax"), "center": dict(head="center"),
                    "lgm-a1": dict(head="lgm", alpha=1.0)}
HELDOUT_CLASSES = "0-4"  # the held-out-classes networks train on these; the other classes are unknown
LGM_DETECTOR = "L-GM likelihood (lgm-a1)"
# Budgets in SGD steps, from the budget curve (docs/budget, `lgm budget`): at 64 steps no head has trained; at
# 256 steps of batch 128 every head has (test errors 15-18%, 3 seeds) -- "quick" is that point (its full-class
# networks are the curve's and the demo's models); at 1,024 steps the three heads' errors are within noise of
# each other -- "standard".  Nothing here is chosen to favour a detector.  "train" overrides the report
# recipe; half of the test subset calibrates, half is measured; the held-out-classes networks train the same
# number of steps on their five classes.  "adaptive_subset" images are attacked by the selective PGD-10
# attack against every detector; "protocol" is the adaptive attack's full protocol
# (lgm_lab.adaptive_eval.ATTACK_PROTOCOLS) on the first "subset" images at "eps", on the networks of "seeds".
DETECTION_PRESETS = {
    "quick": dict(train=dict(steps=256, warmup_steps=64, test_subset=2000), seeds=(0, 1, 2), fit_points=10000,
                  attack_subset=500, adaptive_subset=100,
                  protocol=dict(name="quick", eps=(0.03, 0.1), subset=20, seeds=(0,))),
    "standard": dict(train=dict(steps=1024, warmup_steps=256, test_subset=2000), seeds=(0, 1, 2),
                     fit_points=20000, attack_subset=1000, adaptive_subset=500,
                     protocol=dict(name="standard", eps=(0.03, 0.1, 0.3), subset=200, seeds=(0, 1, 2))),
}
_PROTOCOL = 3  # bump when the measurement changes: cached measurements of another protocol are redone


def _transfer_pairs(P: dict) -> list[tuple[int, int]]:
    """(target seed, source seed) of the transfer check: each protocol seed's networks are attacked with images
    crafted on the next seed's network of the same kind (none with a single seed)."""
    seeds, prot = list(P["seeds"]), P.get("protocol")
    if prot is None or len(seeds) < 2:
        return []
    return [(s, seeds[(seeds.index(s) + 1) % len(seeds)]) for s in seeds if s in prot["seeds"]]


def detection_stages(preset: str) -> int:
    """How many stages :func:`detection_experiment` reports for ``preset`` (for a progress bar)."""
    P = DETECTION_PRESETS[preset]
    return (4 * len(P["seeds"]) + len(_transfer_pairs(P))) * len(DETECTION_MODELS) + 1


def _measure_run(cfg, run_dir: Path, P: dict, data_dir, heldout: bool, stage) -> dict:
    """One run's measurement, cached beside its checkpoint (the same checkpoint measured the same way)."""
    model, head, cfg, ck = load_trained(run_dir / "checkpoint.pt")
    prot = P.get("protocol")
    prot = None if heldout or prot is None or cfg.seed not in prot["seeds"] else \
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in prot.items() if k != "seeds"}
    settings = {"protocol": _PROTOCOL, "sha256": checkpoint_digest(ck), "test_subset": P["train"].get("test_subset"),
                "fit_points": P["fit_points"], "attack_subset": P["attack_subset"],
                "adaptive_subset": P.get("adaptive_subset"), "eps": list(EPS), "fprs": list(FPRS),
                "pgd_steps": PGD_STEPS, "heldout": heldout, "attack_protocol": prot,
                "ood_sets": list(OOD_SETS)}
    cached = load_cached(run_dir / "detection_eval.json", settings)
    if cached is not None:
        stage(f"measuring {run_dir.name}: reused")
        return cached
    stage(f"measuring {run_dir.name}")
    data = detection_data(cfg, data_dir=data_dir, test_subset=P["train"].get("test_subset"), test_seed=0,
                          fit_points=P["fit_points"], sets=(HELDOUT_SET,) if heldout else None, ood_seed=cfg.seed)
    res = measure_network(model, head, data, eps=() if heldout else EPS, attack_subset=P["attack_subset"],
                          adaptive=not heldout, adaptive_subset=P.get("adaptive_subset"), protocol=prot,
                          seed=cfg.seed)
    res["network"]["label"] = head.label
    save_cached(run_dir / "detection_eval.json", settings, res)
    return res


def _transfer_run(cfgs: dict, target: str, source: str, out: Path, P: dict, data_dir, stage) -> dict:
    """The transfer check from network ``source`` to ``target`` (run names), cached in the target's folder."""
    prot = P["protocol"]
    steps = ATTACK_PROTOCOLS[prot["name"]].steps
    loaded = {k: load_trained(out / "runs" / k / "checkpoint.pt") for k in (target, source)}
    settings = {"protocol": _PROTOCOL, "target_sha256": checkpoint_digest(loaded[target].checkpoint),
                "source_sha256": checkpoint_digest(loaded[source].checkpoint), "source": source,
                "test_subset": P["train"].get("test_subset"), "fit_points": P["fit_points"],
                "attack_subset": P["attack_subset"], "eps": list(prot["eps"]), "subset": prot["subset"],
                "steps": steps, "fprs": list(FPRS)}
    cached = load_cached(out / "runs" / target / "transfer_eval.json", settings)
    if cached is not None:
        stage(f"transfer {source} -> {target}: reused")
        return cached
    stage(f"transfer {source} -> {target}")
    nets = {}
    for k, (model, head, _cfg, _ck) in loaded.items():
        data = detection_data(cfgs[k], data_dir=data_dir, test_subset=P["train"].get("test_subset"), test_seed=0,
                              fit_points=P["fit_points"], sets=(), ood_seed=cfgs[k].seed)
        nets[k] = (model, head, calibrated_detectors(model, head, data))
        if k == target:
            x, y = data["clean"]
            m = min(len(x), P["attack_subset"], prot["subset"])  # the white-box protocol's images
            x, y = x[:m], y[:m]
    res = transfer_check(nets[source], nets[target], x, y, eps=prot["eps"], steps=steps, seed=cfgs[target].seed)
    save_cached(out / "runs" / target / "transfer_eval.json", settings, res)
    return res


def detection_experiment(out_dir, *, preset: str = "quick", data_dir=None, progress=print, on_stage=None,
                         fmt: str = "png") -> dict:
    """Train (or reuse) every network of :data:`DETECTION_MODELS` for each seed of ``preset``, on all classes
    and on :data:`HELDOUT_CLASSES`, into ``out_dir/runs``; measure them (:func:`measure_network`, cached in
    each run folder); write ``detection.json``, ``detection.md`` and ``figures/detection_roc.<fmt>`` (the
    first seed's ROC curves).  ``on_stage(done, total, description)`` as each of the
    :func:`detection_stages` stages starts."""
    if preset not in DETECTION_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(DETECTION_PRESETS)}")
    P = DETECTION_PRESETS[preset]
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    t0, done, total = time.perf_counter(), [0], detection_stages(preset)

    def stage(what: str) -> None:
        progress(what)
        if on_stage is not None:
            on_stage(done[0], total, what)
        done[0] += 1

    dataset, seeds = "fashion-mnist", list(P["seeds"])
    prot = P.get("protocol")
    res = {"preset": preset, "dataset": dataset, "seeds": seeds, "train": P["train"], "fit_points": P["fit_points"],
           "attack_subset": P["attack_subset"], "adaptive_subset": P.get("adaptive_subset"), "eps": list(EPS),
           "fpr": FPR, "fprs": list(FPRS), "heldout_classes": HELDOUT_CLASSES,
           "protocol": None if prot is None else {k: list(v) if isinstance(v, tuple) else v for k, v in prot.items()},
           "networks": {}, "runs": {}, "models": 0, "models_reused": 0, "diverged": {}}
    curves, cfgs = {}, {}
    for seed in seeds:
        for name, spec in DETECTION_MODELS.items():
            for heldout in (False, True):
                key = f"{name}{'-heldout' if heldout else ''}-s{seed}"
                cfg = run_config(dataset, data_dir, 100, seed,
                                 dict(P["train"], **spec, classes=HELDOUT_CLASSES if heldout else None))
                cfgs[key] = cfg
                stage(f"training {key} ({budget_words(cfg.__dict__)})")
                res["models"] += 1
                try:
                    res["models_reused"] += train_or_reuse(cfg, out / "runs" / key, progress)
                except TrainingDiverged as err:  # recorded and reported, not measured
                    res["diverged"][key] = str(err).split(";")[0]
                    stage(f"measuring {key}: diverged, skipped")
                    continue
                m = _measure_run(cfg, out / "runs" / key, P, data_dir, heldout, stage)
                net = res["networks"].setdefault(name, {}).setdefault(seed, {})
                net.update({"heldout_clean_error": m["network"]["clean_error"]} if heldout else m["network"])
                for det, r in m["detectors"].items():
                    full = f"{det} ({name})"
                    run = res["runs"].setdefault(full, {}).setdefault(seed, {"sets": {}})
                    if heldout:
                        run["sets"][HELDOUT_SET] = r["sets"][HELDOUT_SET]
                    else:
                        run.update({k: v for k, v in r.items() if k != "sets"})
                        run["sets"].update(r["sets"])
                    if seed == seeds[0]:
                        for s, roc in m["roc"][det].items():
                            curves.setdefault(s, {})[full] = roc
    for seed, src in _transfer_pairs(P):
        for name in DETECTION_MODELS:
            target, source = f"{name}-s{seed}", f"{name}-s{src}"
            if target in res["diverged"] or source in res["diverged"]:
                stage(f"transfer {source} -> {target}: a network diverged, skipped")
                continue
            for det, r in _transfer_run(cfgs, target, source, out, P, data_dir, stage).items():
                res["runs"][f"{det} ({name})"][seed]["transfer"] = {"source_seed": src, "eps": r}
    stage("verdicts, figure, report")
    res["figures"] = [detection_roc_figure(curves, out / "figures" / "detection_roc", fmt=fmt,
                                           title=f"seed {seeds[0]}")]
    res["sets"] = list(dict.fromkeys(s for runs in res["runs"].values() for r in runs.values() for s in r["sets"]))
    res["verdicts"] = detection_verdicts(res)
    res["seconds"] = time.perf_counter() - t0
    (out / "detection.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "detection.md").write_text(detection_markdown(res))
    return res


def _values(res: dict, det: str, get) -> list[float]:
    """``get(run)`` over the seeds of ``det``, leaving out seeds without it (a network that diverged)."""
    out = []
    for r in res["runs"].get(det, {}).values():
        try:
            out.append(get(r))
        except KeyError:
            continue
    return out


def detection_verdicts(res: dict) -> list[dict]:
    """L-GM's likelihood against every other detector: per set, "detects it better" by EER (binomial on the
    clean + abnormal images, with the seed spread); per eps, "resists the adaptive attack better" by the
    adaptive PGD-10 attack's success at the 5% operating point.  Each a
    :func:`~lgm_lab.experiments.stats.compare` result with the claim."""
    out = []
    if LGM_DETECTOR not in res["runs"]:
        return out
    lgm_runs = list(res["runs"][LGM_DETECTOR].values())
    op = operating_point_key(res["fprs"][0])
    for det in res["runs"]:
        if det == LGM_DETECTOR:
            continue
        for s in res["sets"]:
            a = _values(res, LGM_DETECTOR, lambda r, s=s: r["sets"][s]["eer"])
            b = _values(res, det, lambda r, s=s: r["sets"][s]["eer"])
            if not a or not b:
                continue
            m = next(r["sets"][s] for r in lgm_runs if s in r["sets"])
            out.append(dict(compare(a, b, m["n_normal"] + m["n_abnormal"]), other=det, what=s, metric="EER",
                            claim=f"L-GM's likelihood detects {s} better than {det} (lower EER)"))
        for e in res["eps"]:
            a = _values(res, LGM_DETECTOR, lambda r, e=e: r["adaptive"][f"{e:g}"]["adaptive"][op])
            b = _values(res, det, lambda r, e=e: r["adaptive"][f"{e:g}"]["adaptive"][op])
            if not a or not b:
                continue
            n = next(r["n_adaptive"] for r in lgm_runs if "n_adaptive" in r)
            out.append(dict(compare(a, b, n), other=det, what=f"adaptive PGD-10 {e:g}", metric="success",
                            claim=f"L-GM's likelihood resists the adaptive attack at eps {e:g} better than {det}"))
    return out


def preferred_detectors(res: dict, op: str | None = None) -> dict:
    """Per abnormal set, the detectors ranked by the share of those inputs they reject at the operating
    point ``op`` (default the first, "5"): ``{set: {"best": name, "rejected": mean %, "runner_up": name,
    "verdict": compare(...) of the runner-up's non-rejections against the best's}}`` -- what a user who
    deploys a threshold gets, mean over the seeds."""
    op = op or operating_point_key(res["fprs"][0])
    out = {}
    for s in res["sets"]:
        ranked = []
        for det in res["runs"]:
            v = _values(res, det, lambda r, s=s: r["sets"][s]["rejected"][op])
            if v:
                ranked.append((sum(v) / len(v), det, v))
        if len(ranked) < 2:
            continue
        ranked.sort(key=lambda t: -t[0])
        (m0, d0, v0), (m1, d1, v1) = ranked[0], ranked[1]
        n = next(r["sets"][s]["n_abnormal"] for r in res["runs"][d0].values() if s in r["sets"])
        cmp_ = compare([100 - x for x in v0], [100 - x for x in v1], n)
        out[s] = {"best": d0, "rejected": m0, "runner_up": d1, "runner_up_rejected": m1, "verdict": cmp_["verdict"],
                  "z": cmp_["z"], "ranking": [(d, m) for m, d, _ in ranked]}
    return out


def _table(res: dict, title: str, get, fmt: str = "{:.1f}") -> list[str]:
    L = [f"### {title}", "", "| detector | " + " | ".join(res["sets"]) + " |", "|---" * (len(res["sets"]) + 1) + "|"]
    for det in res["runs"]:
        L.append(f"| {det} | " + " | ".join(mean_std_text(_values(res, det, lambda r, s=s: get(r["sets"][s])), fmt)
                                          for s in res["sets"]) + " |")
    return L + [""]


def _diagnostics_section(res: dict) -> list[str]:
    rows = [(seed, v["diagnostics"]) for seed, v in res["networks"].get("lgm-a1", {}).items() if "diagnostics" in v]
    if not rows:
        return []
    sets = [s for s in res["sets"] if s in rows[0][1]["sets"]]
    L = ["## Why the L-GM likelihood is unreliable out of distribution", "",
         "Per seed of the L-GM network: the head's mean learned log-variance against that of Gaussians fitted to "
         "its training features (diagonal), and per set the median squared Mahalanobis distance (under the head's "
         "Gaussians) to the nearest mean, the share of inputs whose nearest mean is the most common one, and the "
         "EER % of the L-GM network's detectors.", "",
         "| seed | head log-var | fitted log-var | set | median d² to nearest mean | one-class share | "
         + " | ".join(f"EER {d}" for d in res["runs"] if d.endswith("(lgm-a1)")) + " |",
         "|---|---|---|---|---|---|" + "---|" * sum(d.endswith("(lgm-a1)") for d in res["runs"])]
    for seed, d in rows:
        for s in ["clean"] + sets:
            st = d["clean"] if s == "clean" else d["sets"][s]
            eers = [res["runs"][det].get(seed, {}).get("sets", {}).get(s, {}).get("eer") for det in res["runs"]
                    if det.endswith("(lgm-a1)")]
            L.append(f"| {seed} | {d['head_log_var_mean']:.2f} | {d['fitted_log_var_mean']:.2f} | {s} | "
                     f"{st['d2_nearest']:.3g} | {st['nearest_class_share']:.2f} | "
                     + " | ".join("-" if e is None else f"{e:.1f}" for e in eers) + " |")
    return L + [""]


def detection_markdown(res: dict) -> str:
    t, ms = res["train"], mean_std_text
    ops = [operating_point_key(p) for p in res["fprs"]]
    attacks = list(dict.fromkeys(k for runs in res["networks"].values() for v in runs.values()
                                 for k in v.get("attack_error", {})))
    seeds = ", ".join(map(str, res["seeds"]))
    L = [f"# Out-of-distribution and adversarial detection ({res['preset']} budget, {res['dataset']})", "",
         f"LeNet++ 100-D (linear feature layer), {t.get('subset') or 'all'} training images, "
         f"{budget_words(t)}, the report recipe; seeds {seeds} (mean ± std). Held-out-classes networks train on "
         "classes "
         f"{res['heldout_classes']} only; the test images of the other classes are their unknown inputs. Each "
         "detector's thresholds are calibrated at "
         + " and ".join(f"{o}%" for o in ops) + " false rejections (the operating points) on one half of the "
         f"{t.get('test_subset') or 'full'} test images; everything is measured on the other half. Abnormal "
         "sets: scikit-learn's digits (8x8 resized to 28x28, not inverted), uniform noise, Gaussian noise "
         "N(0.5, 1) clipped to [0, 1], inverted test images, natural-image patches (crops of scikit-learn's two "
         "sample photographs, grey, 28x28), the held-out classes, FGSM and PGD-10 (step 2.5 eps/10, random start) "
         f"on {res['attack_subset']} test images. Detectors: the field's post-hoc baselines (pytorch-ood 0.4.0's "
         f"KNN, k = {KNN_K} on L2-normalised features, ViM, d = half the feature dimension, Energy, MaxLogit "
         "and max-softmax; Mahalanobis, tied covariance, on raw and L2-normalised "
         f"features) fitted on {res['fit_points']} training images' features of each network, the center distance "
         "on the center-loss network, and on the L-GM network its own likelihood, its mixture score and Gaussians "
         "re-fitted post hoc (on the L-GM network MaxLogit and Energy are left out: they rank as its "
         "likelihood and mixture score). Command: `lgm reproduce --detection --preset "
         f"{res['preset']}`. This invocation took {res['seconds'] / 60:.1f} min ({res['models_reused']} of "
         f"{res['models']} networks reused).", "",
         "## Networks", "", "| network | clean error % | classes 0-4 network error % | "
         + " | ".join(f"{k} error %" for k in attacks) + " |", "|---|---|---|" + "---|" * len(attacks)]
    for name, runs in res["networks"].items():
        r = list(runs.values())
        L.append(f"| {name} | {ms([v['clean_error'] for v in r if 'clean_error' in v])} | "
                 f"{ms([v['heldout_clean_error'] for v in r if 'heldout_clean_error' in v])} | "
                 + " | ".join(ms([v["attack_error"][k] for v in r if k in v.get("attack_error", {})], "{:.1f}")
                              for k in attacks) + " |")
    if res.get("diverged"):
        L += ["", "Diverged (non-finite loss; not measured, left out of the means): "
              + "; ".join(f"{k}: {v}" for k, v in res["diverged"].items()) + "."]
    pref = preferred_detectors(res)
    L += ["", "## Which detector rejects what, at the 5% operating point", "",
          f"Per abnormal set, the detector that rejects the most of it at the threshold calibrated for {ops[0]}% "
          "false rejections (mean over seeds), the runner-up, and whether the difference is beyond noise "
          "(z-test of the non-rejection rates, binomial on the abnormal images with the seed spread).", "",
          "| set | best detector | rejected % | runner-up | rejected % | best vs runner-up |",
          "|---|---|---|---|---|---|"]
    for s, p in pref.items():
        word = {"holds": "better", "fails": "worse"}.get(p["verdict"], p["verdict"])
        L.append(f"| {s} | {p['best']} | {p['rejected']:.1f} | {p['runner_up']} | {p['runner_up_rejected']:.1f} | "
                 f"{word} ({p['z']:.1f}) |")
    L += ["", "## Detection", ""]
    for o in ops:
        L += _table(res, f"Rejected % at the threshold calibrated for {o}% false rejections",
                    lambda m, o=o: m["rejected"][o])
    L += _table(res, "AUROC % (higher is better)", lambda m: m["auroc"])
    L += _table(res, "AUPR-in % (normal inputs positive; higher is better)", lambda m: m["aupr_in"])
    L += _table(res, "AUPR-out % (abnormal inputs positive; higher is better)", lambda m: m["aupr_out"])
    L += _table(res, "FPR at 95% TPR %, normal inputs positive (Lee et al. 2018): abnormal inputs accepted while "
                "95% of clean ones are; lower is better", lambda m: m["fpr95_in"])
    L += _table(res, "FPR at 95% TPR %, abnormal inputs positive (OpenOOD v1.5, pytorch-ood): clean inputs "
                "rejected while 95% of abnormal ones are; lower is better", lambda m: m["fpr95_out"])
    L += _table(res, "EER % (lower is better)", lambda m: m["eer"])
    L += ["### Realised false-rejection rate on the evaluation half", "",
          "| detector | " + " | ".join(f"calibrated for {o}%" for o in ops) + " |", "|---|" + "---|" * len(ops)]
    L += [f"| {det} | " + " | ".join(ms(_values(res, det, lambda r, o=o: r["false_rejection"][o])) for o in ops)
          + " |" for det in res["runs"]]
    L += ["", f"![ROC curves](figures/detection_roc.{Path(res['figures'][0]).suffix.lstrip('.')})", ""]
    L += _diagnostics_section(res)
    L += ["## Adaptive attack (an attacker who knows the detector)", "",
          "Success = misclassified *and* accepted by the detector at its calibrated threshold, % of the attacked "
          f"images ({res.get('adaptive_subset') or res['attack_subset']} per seed). Plain PGD-10 ignores the "
          "detector; the adaptive PGD-10 (lgm_ext.attacks.AdaptivePGD, selective: the classification loss until "
          "misclassified, then the detector's score; any iterate that succeeds counts) has the same budget. "
          "Ceiling = the images the adaptive attack misclassifies at all: what no detector can lower by accepting "
          "less. PGD-10 is a lower bound on the attacker; the full protocol below is stronger.", "",
          "| detector | " + " | ".join(f"PGD-10 {e:g} @{o}% | adaptive {e:g} @{o}%" for e in res["eps"] for o in ops)
          + " | " + " | ".join(f"ceiling {e:g}" for e in res["eps"]) + " |",
          "|---|" + "---|---|" * len(res["eps"]) * len(ops) + "---|" * len(res["eps"])]
    for det in res["runs"]:
        cells = [ms(_values(res, det, lambda r, e=e, k=k, o=o: r["adaptive"][f"{e:g}"][k][o]), "{:.1f}")
                 for e in res["eps"] for o in ops for k in ("pgd", "adaptive")]
        cells += [ms(_values(res, det, lambda r, e=e: r["adaptive"][f"{e:g}"]["ceiling"]), "{:.1f}")
                  for e in res["eps"]]
        L.append(f"| {det} | " + " | ".join(cells) + " |")
    L += ["", *_protocol_section(res, ops)]
    cols = list(dict.fromkeys(v["what"] for v in res["verdicts"]))
    L += ["## Verdicts: L-GM's likelihood against each detector", "",
          "Per column the claim \"L-GM's likelihood detects this set better\" (lower EER) or, for the adaptive "
          f"columns, \"resists the adaptive PGD-10 attack better\" (lower success at the {ops[0]}% operating "
          "point), tested against the detector of the row by the z-test of the difference (binomial error on the "
          "images measured combined with the seed spread): **holds** for z >= 2, **fails** for z <= -2, else "
          "**within noise**; z in brackets.", "",
          "| L-GM likelihood vs | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    cell = {(v["other"], v["what"]): f"**{v['verdict']}** ({v['z']:.1f})" for v in res["verdicts"]}
    for det in dict.fromkeys(v["other"] for v in res["verdicts"]):
        L.append(f"| {det} | " + " | ".join(cell.get((det, c), "-") for c in cols) + " |")
    return "\n".join(L) + "\n"


def _protocol_section(res: dict, ops: list[str]) -> list[str]:
    rows = [(det, seed, r["protocol"]) for det, runs in res["runs"].items() for seed, r in runs.items()
            if "protocol" in r]
    if not rows:
        return []
    first = rows[0][2]
    eps = list(first["eps"])
    variants = list(next(iter(first["eps"].values())))
    seeds = sorted({seed for _d, seed, _p in rows})
    L = ["## Adaptive attack, full protocol (reduced budget)" if first["name"] != "standard"
         else "## Adaptive attack, full protocol", "",
         f"Protocol \"{first['name']}\" (lgm_lab.adaptive_eval): {first['description']}, on seed(s) "
         f"{', '.join(map(str, seeds))}. Every variant is the selective adaptive attack; \"all\" is the per-image "
         "best of the image-space variants; \"feature space\" moves the features freely within an L2 ball as "
         "large as image-space PGD-10 moved each one (an upper bound, not an attack on images). Success % at the "
         + " and ".join(f"{o}%" for o in ops) + " operating points; ceiling = misclassified by any iterate. "
         "With this few images a rate's binomial standard error is up to "
         f"{50 / max(first['n'], 1) ** 0.5:.0f} points.", ""]
    for e in eps:
        L += [f"### eps {e}", "", "| detector | " + " | ".join(f"{v} @{o}%" for v in variants for o in ops)
              + " | ceiling (all) |", "|---|" + "---|" * (len(variants) * len(ops) + 1)]
        for det in dict.fromkeys(d for d, _s, _p in rows):
            per = [p["eps"][e] for d, _s, p in rows if d == det and e in p["eps"]]
            cells = [mean_std_text([q[v][o] for q in per], "{:.0f}") for v in variants for o in ops]
            ceiling = mean_std_text([q["all"]["ceiling"] for q in per], "{:.0f}")
            L.append(f"| {det} | " + " | ".join(cells) + f" | {ceiling} |")
        L.append("")
    return L + _transfer_section(res, ops)


def _transfer_section(res: dict, ops: list[str]) -> list[str]:
    rows = [(det, seed, r) for det, runs in res["runs"].items() for seed, r in runs.items()
            if "transfer" in r and "protocol" in r]
    if not rows:
        return []
    pairs = sorted({(seed, r["transfer"]["source_seed"]) for _d, seed, r in rows})
    L = ["### Transfer check", "",
         "Images crafted by the selective adaptive attack against the same kind of network of another seed and "
         "its own detector of that name (at its 5% point; "
         + ", ".join(f"seed {b} -> seed {a}" for a, b in pairs)
         + "), evaluated on this network and detector: success % (misclassified and accepted) beside the "
         "white-box protocol's (\"all\") on the same images. A transfer attack that succeeds more often than the "
         "white-box one would mean the white-box attack is broken.", "",
         "| detector | eps | " + " | ".join(f"white-box @{o}% | transfer @{o}%" for o in ops)
         + " | transfer ceiling |", "|---|---|" + "---|---|" * len(ops) + "---|"]
    broken = []
    for det in dict.fromkeys(d for d, _s, _r in rows):
        for e in dict.fromkeys(e for d, _s, r in rows if d == det for e in r["transfer"]["eps"]):
            per = [(r["protocol"]["eps"][e]["all"], r["transfer"]["eps"][e]) for d, _s, r in rows
                   if d == det and e in r["transfer"]["eps"] and e in r["protocol"]["eps"]]
            if not per:
                continue
            cells = []
            for o in ops:
                cells += [mean_std_text([w[o] for w, _t in per], "{:.0f}"),
                          mean_std_text([t[o] for _w, t in per], "{:.0f}")]
                if any(t[o] > w[o] for w, t in per):
                    broken.append(f"{det} at eps {e}, {o}%")
            L.append(f"| {det} | {e} | " + " | ".join(cells) + " | "
                     + mean_std_text([t["ceiling"] for _w, t in per], "{:.0f}") + " |")
    L += ["", "Transfer beat the white-box attack for: " + "; ".join(broken) + "." if broken else
          "The white-box attack succeeded at least as often as the transfer attack for every detector, eps and "
          "operating point.", ""]
    return L
