"""Out-of-distribution and adversarial detection, measured (issues 25 and 35; docs/SPEC.md section 8). Networks:
LeNet++ 100-D with a softmax, a center-loss and an L-GM (alpha = 1) head, each seed trained twice
(:data:`DETECTION_MODELS`): on all ten Fashion-MNIST classes, and on classes 0-4 only (the held-out-classes
protocol: the test images of classes 5-9 are its unknown inputs). Each network is measured by
:func:`lgm_lab.detection_protocol.measure_network` (its detectors: the field's post-hoc baselines on every network
-- pytorch-ood's KNN, ViM, Energy, MaxLogit, max-softmax; Mahalanobis on raw and L2-normalised features --, the
center distance, and an L-GM head's own likelihood and mixture score and Gaussians re-fitted to its features),
cached beside its checkpoint, the full adaptive protocol (:func:`~lgm_lab.detection_protocol.measure_protocol`)
cached apart from the rest. Thresholds at the 5% and 1% operating points, metrics per abnormal set (rejections,
AUROC, AUPR-in/out, FPR at 95% TPR both ways, EER), the adaptive PGD-10 attack on every detector and the full
adaptive protocol on the protocol's seeds (the preset's own, or another preset's: :func:`detection_preset`), with
the transfer attack from the next seed's network of the same kind as its check. Over seeds: mean ± std,
:func:`~lgm_lab.experiments.stats.compare`'s verdicts for "L-GM's likelihood detects X better", and per set the
detector that rejects the most at the 5% point (:func:`preferred_detectors`; the report is rendered by
:mod:`~lgm_lab.experiments.detection.report`). Finished runs and measurements are reused.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ...adaptive_eval import ATTACK_PROTOCOLS
from ...checkpoints import checkpoint_digest, load_trained
from ...config import ATTACK_PROTOCOL_CHOICES
from ...detection_protocol import (
    EPS,
    FPR,
    FPRS,
    HELDOUT_SET,
    PGD_STEPS,
    build_detectors,
    calibrated_detectors,
    detection_data,
    detector_names,
    lgm_diagnostics,
    measure_network,
    measure_protocol,
    transfer_check,
)
from ...figures import detection_roc_figure
from ...ood_data import OOD_SETS
from ...run_folder import in_folder, save_json, save_text
from ...train import TrainingDiverged
from ..runs import budget_words, load_cached, run_config, save_cached, train_or_reuse, why_not_shared
from .report import LGM_DETECTOR, detection_markdown, detection_verdicts, preferred_detectors

__all__ = ["DETECTION_MODELS", "DETECTION_PRESETS", "HELDOUT_CLASSES", "EPS", "PGD_STEPS", "FPR", "FPRS",
           "LGM_DETECTOR", "detector_names", "build_detectors", "HELDOUT_SET",
           "detection_data", "lgm_diagnostics", "measure_network", "detection_experiment", "detection_stages",
           "detection_preset", "detection_verdicts", "preferred_detectors", "detection_markdown"]

DETECTION_MODELS = {"softmax": dict(head="softmax"), "center": dict(head="center"),
                    "lgm-a1": dict(head="lgm", alpha=1.0)}
HELDOUT_CLASSES = "0-4"  # the held-out-classes networks train on these; the other classes are unknown
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
_PROTOCOL = 4  # bump when the measurement changes: cached measurements of another protocol are redone
# (4: the full attack protocol cached apart, one file per protocol; a 3's measurement is kept, see _from_legacy)
_TRANSFER = 3  # the same for the transfer check, which version 4 did not change
LEGACY_TRANSFER_FILE = "transfer_eval.json"  # one per target before version 4: read, then kept per protocol
EVAL_FILE = "detection_eval.json"


def _protocol_file(name: str) -> str:
    """The cache of the full attack protocol ``name`` beside a run's checkpoint."""
    return f"protocol_{name}_eval.json"


def _transfer_file(name: str) -> str:
    """The cache of the transfer check of the full attack protocol ``name`` beside its target's checkpoint."""
    return f"transfer_{name}_eval.json"


def _transfer_pairs(P: dict) -> list[tuple[int, int]]:
    """(target seed, source seed) of the transfer check: each protocol seed's networks are attacked with images
    crafted on the next seed's network of the same kind (none with a single seed)."""
    seeds, prot = list(P["seeds"]), P.get("protocol")
    if prot is None or len(seeds) < 2:
        return []
    return [(s, seeds[(seeds.index(s) + 1) % len(seeds)]) for s in seeds if s in prot["seeds"]]


def detection_preset(preset: str, attack_protocol: str | None = None) -> dict:
    """The settings of ``preset``, with the adaptive attack's protocol (its budget, eps, images and seeds) of
    the preset named by ``attack_protocol`` instead of its own ("none": no protocol and no transfer check; None:
    the preset's own).  The standard protocol is a GPU's work: the standard budget with ``attack_protocol="quick"``
    is what 2 cores can measure."""
    if preset not in DETECTION_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(DETECTION_PRESETS)}")
    if attack_protocol is not None and attack_protocol not in ATTACK_PROTOCOL_CHOICES:
        raise ValueError(f"attack_protocol must be one of {', '.join(ATTACK_PROTOCOL_CHOICES)} (or None: the "
                         f"preset's own), got {attack_protocol!r}")
    P = dict(DETECTION_PRESETS[preset])
    if attack_protocol == "none":
        P["protocol"] = None
    elif attack_protocol is not None:
        P["protocol"] = DETECTION_PRESETS[attack_protocol]["protocol"]
    return P


def detection_stages(preset: str, attack_protocol: str | None = None) -> int:
    """How many stages :func:`detection_experiment` reports for ``preset`` (for a progress bar)."""
    P = detection_preset(preset, attack_protocol)
    attacked = sum(_network_protocol(P, seed, False) is not None for seed in P["seeds"])  # the protocol stages
    return (4 * len(P["seeds"]) + attacked + len(_transfer_pairs(P))) * len(DETECTION_MODELS) + 1


def _network_protocol(P: dict, seed: int, heldout: bool) -> dict | None:
    """The full attack protocol a network of ``P`` gets (JSON-ready), or None: only the all-class networks of
    the protocol's seeds are attacked with it."""
    prot = P.get("protocol")
    if heldout or prot is None or seed not in prot["seeds"]:
        return None
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in prot.items() if k != "seeds"}


def _protocol_settings(common: dict, prot: dict) -> dict:
    """What a cached full-protocol measurement must have been made with: the network's common settings, the
    protocol (name, eps, images), its budget and PGD-10's (the feature-space bound's radii)."""
    budget = json.loads(json.dumps(dataclasses.asdict(ATTACK_PROTOCOLS[prot["name"]])))  # as read back
    return dict(common, attack_protocol=prot, pgd_steps=PGD_STEPS, budget=budget)


def _from_legacy(run_dir: Path, settings: dict) -> tuple[dict, dict | None, dict | None] | None:
    """A measurement cached by lgm-ext before the protocol was cached apart (``_PROTOCOL`` 3: the protocol's
    results inside each detector's, its settings under "attack_protocol"), made with ``settings`` otherwise:
    ``(measurement without the protocol, the protocol's settings or None, its results or None)``; None if
    there is none, or none that reads as one."""
    try:
        cached = json.loads((run_dir / EVAL_FILE).read_text())
        old = dict(cached["settings"])
        prot = old.pop("attack_protocol")
        if old != dict(settings, protocol=3) or not (prot is None or prot.get("name") in ATTACK_PROTOCOLS):
            return None
        m = cached["eval"]
        results = {name: r.pop("protocol") for name, r in m["detectors"].items() if "protocol" in r} or None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return m, prot, results


def _usable(results, m: dict) -> bool:
    """A cached protocol measurement that fits measurement ``m``: one entry for each of its detectors."""
    return isinstance(results, dict) and set(results) == set(m["detectors"])


def _measure_run(cfg, key: str, run_dir: Path, P: dict, data_dir, heldout: bool, stage) -> dict:
    """The measurement of run ``key`` (in ``run_dir``), cached beside its checkpoint (the same checkpoint
    measured the same way), and for an all-class network of the protocol's seeds the full attack protocol,
    cached apart (``protocol_<name>_eval.json``): another ``attack_protocol`` measures only that again."""
    model, head, cfg, ck = load_trained(run_dir / "checkpoint.pt")
    digest = checkpoint_digest(ck)
    common = {"protocol": _PROTOCOL, "sha256": digest, "test_subset": P["train"].get("test_subset"),
              "fit_points": P["fit_points"], "attack_subset": P["attack_subset"], "fprs": list(FPRS)}
    settings = dict(common, adaptive_subset=P.get("adaptive_subset"), eps=list(EPS), pgd_steps=PGD_STEPS,
                    heldout=heldout, ood_sets=list(OOD_SETS))
    prot = _network_protocol(P, cfg.seed, heldout)
    loaded = {}

    def network_data(sets) -> dict:  # loaded once, only if something is measured
        if sets == () and loaded:  # the protocol's images (clean, calibration, fit) are part of any load
            return next(iter(loaded.values()))
        if sets not in loaded:
            loaded[sets] = detection_data(cfg, data_dir=data_dir, test_subset=P["train"].get("test_subset"),
                                          test_seed=0, fit_points=P["fit_points"], sets=sets, ood_seed=cfg.seed)
        return loaded[sets]

    m = load_cached(run_dir / EVAL_FILE, settings)
    if m is None and (legacy := _from_legacy(run_dir, settings)) is not None:
        m, old_prot, old_results = legacy  # kept, in today's two caches
        if old_prot is not None and old_results is not None:
            save_cached(run_dir / _protocol_file(old_prot["name"]), _protocol_settings(common, old_prot),
                        old_results)
        save_cached(run_dir / EVAL_FILE, settings, m)
    if m is not None:
        stage(f"measuring {key}: reused")
    else:
        stage(f"measuring {key}")
        m = measure_network(model, head, network_data((HELDOUT_SET,) if heldout else None),
                            eps=() if heldout else EPS, attack_subset=P["attack_subset"], adaptive=not heldout,
                            adaptive_subset=P.get("adaptive_subset"), seed=cfg.seed)
        m["network"]["label"] = head.label
        save_cached(run_dir / EVAL_FILE, settings, m)
    if prot is None:
        return m
    prot_settings = _protocol_settings(common, prot)
    results = load_cached(run_dir / _protocol_file(prot["name"]), prot_settings)
    if _usable(results, m):
        stage(f"attack protocol {prot['name']} on {key}: reused")
    else:
        stage(f"attack protocol {prot['name']} on {key}")
        results = measure_protocol(model, head, network_data(()), prot, attack_subset=P["attack_subset"],
                                   seed=cfg.seed)
        save_cached(run_dir / _protocol_file(prot["name"]), prot_settings, results)
    for name, r in results.items():
        m["detectors"][name]["protocol"] = r
    return m


def _transfer_run(cfgs: dict, dirs: dict, target: str, source: str, P: dict, data_dir, stage) -> dict:
    """The transfer check from network ``source`` to ``target`` (run names), cached in the target's folder."""
    prot = P["protocol"]
    steps = ATTACK_PROTOCOLS[prot["name"]].steps
    loaded = {k: load_trained(dirs[k] / "checkpoint.pt") for k in (target, source)}
    settings = {"protocol": _TRANSFER, "target_sha256": checkpoint_digest(loaded[target].checkpoint),
                "source_sha256": checkpoint_digest(loaded[source].checkpoint), "source": source,
                "test_subset": P["train"].get("test_subset"), "fit_points": P["fit_points"],
                "attack_subset": P["attack_subset"], "eps": list(prot["eps"]), "subset": prot["subset"],
                "steps": steps, "fprs": list(FPRS)}
    path = dirs[target] / _transfer_file(prot["name"])
    cached = load_cached(path, settings)
    if cached is None and (cached := load_cached(dirs[target] / LEGACY_TRANSFER_FILE, settings)) is not None:
        save_cached(path, settings, cached)  # kept under today's name; the old file is left as it is
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
    save_cached(path, settings, res)
    return res


def detection_experiment(out_dir, *, preset: str = "quick", data_dir=None, progress=print, on_stage=None,
                         fmt: str = "png", attack_protocol: str | None = None, reuse_runs: dict | None = None) -> dict:
    """Train (or reuse) every network of :data:`DETECTION_MODELS` for each seed of ``preset``, on all classes
    and on :data:`HELDOUT_CLASSES`, into ``out_dir/runs``; measure them (:func:`measure_network`, cached in
    each run folder); write ``detection.json``, ``detection.md`` and ``figures/detection_roc.<fmt>`` (the
    first seed's ROC curves).  ``attack_protocol`` names another preset whose adaptive-attack protocol is used
    (or "none"; see :func:`detection_preset`).  ``reuse_runs`` maps run names (``softmax-s0``) to folders of
    runs elsewhere (the report's own networks): one that holds a finished run of exactly the network's config
    is measured there (its measurement cached beside it) instead of training the same network again into
    ``out_dir/runs``, unless ``out_dir/runs`` already has that run; any other is ignored and left untouched.
    ``on_stage(done, total, description)`` as each of the :func:`detection_stages` stages starts."""
    P = detection_preset(preset, attack_protocol)
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    t0, done, total = time.perf_counter(), [0], detection_stages(preset, attack_protocol)

    def stage(what: str) -> None:
        progress(what)
        if on_stage is not None:
            on_stage(done[0], total, what)
        done[0] += 1

    dataset, seeds = "fashion-mnist", list(P["seeds"])
    prot = P.get("protocol")
    res = {"preset": preset, "attack_protocol": attack_protocol, "dataset": dataset, "seeds": seeds,
           "train": P["train"], "fit_points": P["fit_points"],
           "attack_subset": P["attack_subset"], "adaptive_subset": P.get("adaptive_subset"), "eps": list(EPS),
           "fpr": FPR, "fprs": list(FPRS), "heldout_classes": HELDOUT_CLASSES,
           "protocol": None if prot is None else {k: list(v) if isinstance(v, tuple) else v for k, v in prot.items()},
           "networks": {}, "runs": {}, "models": 0, "models_reused": 0, "diverged": {}, "shared_runs": {}}
    curves, cfgs, dirs = {}, {}, {}
    for seed in seeds:
        for name, spec in DETECTION_MODELS.items():
            for heldout in (False, True):
                key = f"{name}{'-heldout' if heldout else ''}-s{seed}"
                cfg = run_config(dataset, data_dir, 100, seed,
                                 dict(P["train"], **spec, classes=HELDOUT_CLASSES if heldout else None))
                cfgs[key], dirs[key], note = cfg, out / "runs" / key, ""
                other = (reuse_runs or {}).get(key)
                if other is not None and not (dirs[key] / "checkpoint.pt").exists():
                    why = why_not_shared(cfg, Path(other))
                    if why is None:
                        dirs[key], res["shared_runs"][key] = Path(other), str(other)
                        note = f": the same run in {other}, measured there"
                    else:
                        note = f": {other} not used ({why})"
                stage(f"training {key} ({budget_words(cfg.__dict__)}){note}")
                res["models"] += 1
                try:  # a shared run is only read, never trained into
                    res["models_reused"] += True if key in res["shared_runs"] else \
                        train_or_reuse(cfg, dirs[key], progress)
                except TrainingDiverged as err:  # recorded and reported, not measured
                    res["diverged"][key] = str(err).split(";")[0]
                    stage(f"measuring {key}: diverged, skipped")
                    if _network_protocol(P, seed, heldout) is not None:
                        stage(f"attack protocol {P['protocol']['name']} on {key}: diverged, skipped")
                    continue
                m = _measure_run(cfg, key, dirs[key], P, data_dir, heldout, stage)
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
            for det, r in _transfer_run(cfgs, dirs, target, source, P, data_dir, stage).items():
                res["runs"][f"{det} ({name})"][seed]["transfer"] = {"source_seed": src, "eps": r}
    stage("verdicts, figure, report")
    res["figures"] = [in_folder(detection_roc_figure(curves, out / "figures" / "detection_roc", fmt=fmt,
                                                     title=f"seed {seeds[0]}"), out)]
    res["sets"] = list(dict.fromkeys(s for runs in res["runs"].values() for r in runs.values() for s in r["sets"]))
    res["verdicts"] = detection_verdicts(res)
    res["seconds"] = time.perf_counter() - t0
    save_json(out / "detection.json", res, indent=1, default=float)
    save_text(out / "detection.md", detection_markdown(res))
    return res
