"""``lgm reproduce``: every experiment of a preset, from training to ``report.md``.

The only module that knows every experiment: it trains the paper's models
(:mod:`~lgm_lab.experiments.paper`), measures them, draws the figures, runs the
centers comparison (:mod:`~lgm_lab.experiments.centers`) and, on request, the
inverse-adversary experiment (:mod:`~lgm_lab.experiments.inverse`) and the detection experiment
(:mod:`~lgm_lab.experiments.detection`), then writes
``results.json`` and ``report.md``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from lgm_ext import Classifier
from lgm_ext.attacks import FGSM

from ..checkpoints import load_trained
from ..config import REPRODUCE_PRESETS, class_names
from ..data import load_dataset
from ..evaluation import evaluate
from ..figures import FORMATS, embedding_figure, pmax_figure, training_curves_figure, verification_figures
from ..run_folder import in_folder, save_json, save_text
from ..tensors import stack_dataset
from . import detection as detection_experiment
from . import inverse as inverse_adversary
from .centers import centers_markdown, centers_report
from .measure import summarize_verification
from .paper import EPS, MODEL_SPECS, TARGETED, evaluate_run, paper_claims, paper_markdown
from .runs import budget_words, load_cached, pick_dataset, run_config, save_cached, train_or_reuse

__all__ = ["reproduce", "reproduce_stages", "report_markdown", "budget_text", "trained_steps", "REPRODUCE_PRESETS"]

# The centers comparison's models: report role -> model name of MODEL_SPECS.
CENTERS_MODELS = {"A": "center", "B": "softmax", "L-GM": "lgm-a1"}


def reproduce_stages(preset: str, inverse: bool = False, detection: bool = False,
                     attack_protocol: str | None = None) -> int:
    """How many stages :func:`reproduce` reports for ``preset`` (for a progress bar)."""
    P = REPRODUCE_PRESETS[preset]
    n = 2 * len(P["models100"]) * len(P["seeds"]) + 2 * len(P["models2"]) + 3
    if inverse:
        n += inverse_adversary.inverse_stages(preset)
    if detection:
        n += detection_experiment.detection_stages(preset, attack_protocol)
    return n


class _Stages:
    """One line per stage to ``progress``; ``on_stage(done, total, description)`` as each starts; the wall
    time of each stage (until the next starts, or :meth:`finish`) in :attr:`seconds`."""

    def __init__(self, total: int, progress, on_stage) -> None:
        self.total, self.progress, self.on_stage, self.done = total, progress, on_stage, 0
        self.seconds: list[tuple[str, float]] = []
        self._current: tuple[str, float] | None = None

    def __call__(self, description: str) -> None:
        self.finish()
        self._current = (description, time.perf_counter())
        self.progress(description)
        if self.on_stage is not None:
            self.on_stage(self.done, self.total, description)
        self.done += 1

    def finish(self) -> None:
        if self._current is not None:
            self.seconds.append((self._current[0], time.perf_counter() - self._current[1]))
            self._current = None


def _run_key(name: str, dim: int, seed: int) -> str:
    """The run folder's name of one model of the report."""
    return f"{name}-{dim}d-s{seed}"


def _train(name: str, dim: int, seed: int, P: dict, dataset: str, data_dir, out: Path, stage, progress,
           results: dict):
    """Train (or reuse) one model of the preset; returns (model, head, run folder)."""
    key = _run_key(name, dim, seed)
    cfg = run_config(dataset, data_dir, dim, seed, dict(P["train"], **MODEL_SPECS[name]))
    stage(f"training {key} ({f'{cfg.steps} SGD steps' if cfg.steps else f'{cfg.epochs} epochs'})")
    run_dir = out / "runs" / key
    results["models_reused"] += train_or_reuse(cfg, run_dir, progress)
    results["models"] += 1
    model, head, _cfg, ck = load_trained(run_dir / "checkpoint.pt")
    results["sgd_steps"][key] = trained_steps(ck["metrics"], cfg)
    return model, head, run_dir


def trained_steps(metrics: list[dict], cfg) -> dict:
    """A run's budget: SGD steps, batch size, images seen, passes over its training set (from its metrics)."""
    steps = metrics[-1].get("steps") if metrics else None
    images = None if steps is None else steps * cfg.batch_size
    return {"steps": steps, "batch": cfg.batch_size, "images": images, "epochs": len(metrics)}


def _measure(name: str, seed: int, model, head, run_dir: Path, test, x, y, settings: dict, first_seed: bool, stage):
    """The report's measurements of one 100-D model, cached in its run folder.  Returns (the JSON-sized
    result, the full result with per-image scores or None when reused); the first seed's models are always
    measured, since the figures need their per-image scores."""
    key = run_dir.name
    cache = run_dir / "eval.json"
    cached = load_cached(cache, settings)
    if cached is not None and not first_seed:
        stage(f"evaluating {key}: reused")
        return cached, None
    stage(f"evaluating {key}: clean, FGSM, verification")
    full = evaluate_run(model, head, test, x, y, targeted=name in TARGETED)
    ev = dict(full, verification=summarize_verification(full["verification"]))
    if "targeted" in ev:
        ev["targeted"] = summarize_verification(ev["targeted"])
    save_cached(cache, settings, ev)
    return ev, full


def reproduce(out_dir, *, preset: str = "quick", data_dir=None, progress=print, on_stage=None,
              fmt: str = "png", inverse: bool = False, detection: bool = False,
              attack_protocol: str | None = None) -> dict:
    """Train every model of the preset (each seed), measure Table 1, Table 6, the verification EERs
    (every score, and targeted FGSM), the centers analysis and the figures (in ``fmt``: png, pdf or
    svg), into ``out_dir`` with ``report.md`` and ``results.json``.  Finished checkpoints and
    evaluations are reused.  ``progress(message)`` gets one line per stage; ``on_stage(done, total,
    description)`` is called as each of the :func:`reproduce_stages` stages starts.  ``inverse=True``
    also runs the inverse-adversary centers experiment (:mod:`lgm_lab.experiments.inverse`, same
    preset name) into ``out_dir/inverse`` and adds its section to the report; ``detection=True`` likewise the
    detection experiment (:mod:`lgm_lab.experiments.detection`) into ``out_dir/detection``, with the adaptive
    attack protocol of the preset named ``attack_protocol`` (or "none"; default the preset's own)."""
    if preset not in REPRODUCE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(REPRODUCE_PRESETS)}")
    if inverse and preset not in inverse_adversary.INVERSE_PRESETS:
        raise ValueError(f"the inverse-adversary experiment has no preset {preset!r}")
    if detection and preset not in detection_experiment.DETECTION_PRESETS:
        raise ValueError(f"the detection experiment has no preset {preset!r}")
    if attack_protocol is not None:
        if not detection:
            raise ValueError("attack_protocol is a setting of the detection experiment: it needs detection=True")
        detection_experiment.detection_preset(preset, attack_protocol)  # an unknown name is refused before training
    if fmt not in FORMATS:
        raise ValueError(f"figure format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    P = REPRODUCE_PRESETS[preset]
    out = Path(out_dir)
    stage = _Stages(reproduce_stages(preset, inverse, detection, attack_protocol), progress, on_stage)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    dataset = pick_dataset(preset, data_dir)
    t_start = time.perf_counter()
    seeds = list(P["seeds"])
    s0 = seeds[0]
    test = load_dataset(dataset, False, data_dir=data_dir, subset=P["train"].get("test_subset"))
    x, y = stack_dataset(test)
    if P["attack_subset"]:
        x, y = x[: P["attack_subset"]], y[: P["attack_subset"]]
    settings = {"attack_subset": len(x), "test": len(test), "eps": EPS}
    results = {"preset": preset, "dataset": dataset, "format": fmt, "seeds": seeds, "train": P["train"], "runs": {},
               "table1_2d": {}, "figures": [], "models_reused": 0, "models": 0,
               "sgd_steps": {}, "note": P.get("note")}
    first = {}  # the first seed's models (and their full measurements) for the figures and the centers
    curves = {}  # per-epoch metrics of the first seed's 100-D runs

    # 1. the 100-D models of every seed: train, measure
    for name in P["models100"]:
        for seed in seeds:
            model, head, run_dir = _train(name, 100, seed, P, dataset, data_dir, out, stage, progress, results)
            ev, full = _measure(name, seed, model, head, run_dir, test, x, y, settings, seed == s0, stage)
            results["runs"].setdefault(name, {})[seed] = ev
            if seed == s0:
                first[name] = (model, head, full)
                curves[name + f"-s{s0}"] = json.loads((run_dir / "metrics.json").read_text())
    # 2. the 2-D models (first seed): train, clean error
    embedded = {}
    for name in P["models2"]:
        model, head, _ = _train(name, 2, s0, P, dataset, data_dir, out, stage, progress, results)
        results["table1_2d"][name] = evaluate(model, head, test)["error_percent"]
        embedded[name] = (model, head)
    results["n_test"], results["n_attack"] = len(test), len(x)

    # 3. figures: histograms and ROC (default score), p_max histograms (Fig. 3), training curves
    stage("figures: histograms, ROC, p_max, training curves")
    ver = {}
    for name, (_m, _h, full) in first.items():
        ver[name] = full["verification"]
        if "targeted" in full:
            ver[f"{name} targeted"] = full["targeted"]
    results["figures"] += verification_figures(ver, out / "figures", fmt)
    results["figures"].append(pmax_figure(ver, out / "figures" / "pmax_fgsm", fmt))
    results["figures"].append(training_curves_figure(curves, out / "figures" / "training_curves", fmt))

    # 4. the inverse-adversary report's centers comparison (first seed)
    stage("centers analysis (inverse adversaries)")
    n_centers = P.get("centers_points") or len(x)  # the first images of the attack set
    results["centers"] = centers_report({role: first[name][:2] for role, name in CENTERS_MODELS.items()
                                         if name in first}, x[:n_centers], y[:n_centers])
    results["n_centers"] = min(n_centers, len(x))

    # 5. 2-D embeddings (paper Fig. 1), with FGSM examples on the likelihood map of density heads
    stage("embeddings" if P["models2"] else "report")
    if P["models2"]:
        xe, ye = stack_dataset(load_dataset(dataset, True, data_dir=data_dir, subset=P["embed_points"]))
    for name, (model, head) in embedded.items():
        stage(f"embedding of {name} (2-D)")
        adv = FGSM(Classifier(model, head).eval(), eps=0.1)(x[:30], y[:30]) if head.density_map else None
        results["figures"].append(embedding_figure(model, head, xe, ye, out / "figures" / f"embed_{name}",
                                                   title=f"{name}, 2-D features ({dataset} train)", adv=adv,
                                                   class_names=class_names(dataset), fmt=fmt))
    results["claims"] = paper_claims(results)

    # 6. the inverse-adversary experiment (trains its own models)
    if inverse:
        offset = stage.done
        inv = inverse_adversary.inverse_experiment(out / "inverse", preset=preset, data_dir=data_dir, progress=progress,
                                 on_stage=(lambda d, t, what: on_stage(offset + d, stage.total, what))
                                 if on_stage else None)
        results["inverse"] = {k: inv[k] for k in ("summary", "verdict", "seeds", "train", "step_ms")}
    # 7. the detection experiment (trains its own networks)
    if detection:
        offset = stage.done + (inverse_adversary.inverse_stages(preset) if inverse else 0)  # after inverse's stages
        det = detection_experiment.detection_experiment(
            out / "detection", preset=preset, data_dir=data_dir, progress=progress, fmt=fmt,
            attack_protocol=attack_protocol,
            reuse_runs={f"{name}-s{seed}": out / "runs" / _run_key(name, 100, seed)  # the same networks
                        for name in P["models100"] if name in detection_experiment.DETECTION_MODELS for seed in seeds},
            on_stage=(lambda d, t, what: on_stage(offset + d, stage.total, what)) if on_stage else None)
        results["detection"] = {k: det[k] for k in ("verdicts", "seeds", "train", "attack_protocol", "protocol",
                                                     "shared_runs")}
        results["detection"]["figures"] = [in_folder(out / "detection" / f, out) for f in det["figures"]]
    stage.finish()
    results["figures"] = [in_folder(f, out) for f in results["figures"]]
    results["seconds"] = time.perf_counter() - t_start
    results["stage_seconds"] = stage.seconds
    save_json(out / "results.json", results, indent=1, default=float)
    text = report_markdown(results)
    if inverse:
        section = (out / "inverse" / "inverse.md").read_text().replace("# Inverse-adversary", "## Inverse-adversary", 1)
        text += "\n" + section.replace("\n## ", "\n### ")
    if detection:
        section = (out / "detection" / "detection.md").read_text().replace("\n### ", "\n#### ")
        text += "\n" + section.replace("\n## ", "\n### ").replace("# ", "## ", 1).replace(
            "](figures/", "](detection/figures/")
    save_text(out / "report.md", text)
    return results


def budget_text(r: dict) -> str:
    """The models' training budget in SGD steps (and images, epochs), as the report states it."""
    b = {(v["steps"], v["batch"]) for v in r.get("sgd_steps", {}).values() if v["steps"] is not None}
    if not b:
        return budget_words(r["train"])
    return "each model trained " + " or ".join(budget_words(dict(steps=s, batch_size=bs)) for s, bs in sorted(b))


def report_markdown(r: dict) -> str:
    seeds = r["seeds"]
    t = r["train"]
    budget = budget_text(r)
    warm = (f"the first {t['warmup_steps']} steps" if t.get("warmup_steps") is not None else "the first epoch")
    L = [f"# Reproduction report ({r['preset']} preset, {r['dataset']})", ""]
    if r.get("note"):
        L += [f"**{r['note']}**", ""]
    L += ["Published numbers: the L-GM paper's (MNIST) and the inverse-adversary report's qualitative claims. "
         f"Ours: {r['dataset']}, LeNet++, {t.get('subset') or 'all'} training images; {budget} "
         f"(SGD + Nesterov, one-cycle lr peaking at 0.01 over the run's steps, L-GM means/log-variances at 10x the "
         f"lr, alpha/lambda warm-up over {warm}, gradient norm clipped at 10); test error on {r['n_test']} test "
         f"images, attacks on {r['n_attack']}. "
         f"Seeds: {', '.join(map(str, seeds))}; a ± b is the mean and standard deviation over seeds. "
         f"This invocation took {r['seconds'] / 60:.1f} min ({r['models_reused']} of {r['models']} models reused).",
         ""]
    if any(m.endswith("-relu") for m in r["runs"]):
        L += ["Networks: `-relu` variants have a ReLU after the feature layer (the paper's text); the others are "
              "linear (the authors' code and our default). L-GM is compared with each baseline's better variant.", ""]
    else:
        L += ["Networks: a linear feature layer for every head (the authors' code and our default; the paper's text "
              "has a ReLU there, which the `paper` preset also trains).", ""]
    L += paper_markdown(r)
    L += ["", f"![ROC](figures/roc.{r.get('format', 'png')})", ""]
    L += centers_markdown(r["centers"], seeds[0], r.get("n_centers"))
    L += ["", "## Figures", ""] + [f"![{Path(f).stem}](figures/{Path(f).name.replace(' ', '%20')})"
                                    for f in r["figures"]] + [""]
    return "\n".join(L)
