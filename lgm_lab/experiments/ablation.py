"""Ablations of the L-GM recipe: one grid of L-GM training settings at one budget, each point trained
(or reused), measured, and tabulated -- including the points that diverge.

Grids (:data:`GRIDS`): ``warmup`` (the warm-up length and the likelihood weight lambda, issue 10);
``likelihood`` (issue 24: the margin alpha in {0, 0.3, 1} -- the paper's Table 1 rows -- and the likelihood
term with its log-det (Eq. 17), without it, and with identity covariance in that term).  Each point is a set
of :class:`~lgm_lab.config.TrainConfig` overrides of an L-GM head (alpha = 1 unless overridden, 100-D, linear
feature layer) at the budget of a ``lgm reproduce`` preset.  ``lgm ablation`` runs one.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..checkpoints import checkpoint_digest, load_trained
from ..config import REPRODUCE_PRESETS
from ..data import load_dataset
from ..run_folder import save_json, save_text
from ..tensors import stack_dataset
from ..train import TrainingDiverged, log_var_stats
from .measure import measure_model
from .runs import budget_words, load_cached, run_config, save_cached, train_or_reuse
from .stats import mean_std_text

__all__ = ["GRIDS", "ablation", "ablation_markdown"]

GRIDS = {
    # (label, overrides): the first point is the default recipe
    "warmup": [
        ("default (1 epoch, lambda 0.1)", dict(warmup_epochs=1.0, lambda_=0.1)),
        ("no ramp", dict(warmup_epochs=0.0, lambda_=0.1)),
        ("0.25-epoch ramp", dict(warmup_epochs=0.25, lambda_=0.1)),
        ("2-epoch ramp", dict(warmup_epochs=2.0, lambda_=0.1)),
        ("lambda 0.01", dict(warmup_epochs=1.0, lambda_=0.01)),
        ("lambda 0.3", dict(warmup_epochs=1.0, lambda_=0.3)),
    ],
    "likelihood": [
        ("default (alpha 1, likelihood with log-det)", dict(alpha=1.0)),
        ("alpha 0.3", dict(alpha=0.3)),
        ("alpha 0 (no margin)", dict(alpha=0.0)),
        ("likelihood without log-det", dict(likelihood="no-logdet")),
        ("identity covariance in the likelihood", dict(likelihood="identity")),
    ],
}


def _slug(overrides: dict) -> str:
    return "-".join(f"{k.rstrip('_')}{v:g}" if isinstance(v, (int, float)) else f"{k}{v}"
                    for k, v in sorted(overrides.items()))


def ablation(out_dir, *, grid: str = "warmup", preset: str = "quick", seeds=(0,), data_dir=None,
             progress=print) -> dict:
    """Train every point of ``GRIDS[grid]`` for each seed at the budget of the reproduce preset ``preset``
    into ``out_dir/runs`` (finished runs reused), measure clean error, FGSM error at eps 0.3 and the
    verification EER, and write ``ablation-<grid>.json`` and ``ablation-<grid>.md``.  A point that
    diverges is recorded with the message, not raised."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    if preset not in REPRODUCE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(REPRODUCE_PRESETS)}")
    P = REPRODUCE_PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dataset = "fashion-mnist"
    test = load_dataset(dataset, False, data_dir=data_dir, subset=P["train"].get("test_subset"))
    x, y = stack_dataset(test)
    if P["attack_subset"]:
        x, y = x[: P["attack_subset"]], y[: P["attack_subset"]]
    settings = {"attack_subset": len(x), "test": len(test)}
    points = []
    for label, overrides in GRIDS[grid]:
        point = {"label": label, "overrides": overrides, "runs": {}}
        for seed in seeds:
            cfg = run_config(dataset, data_dir, 100, seed, {**P["train"], "head": "lgm", "alpha": 1.0, **overrides})
            run_dir = out / "runs" / f"{_slug(overrides)}-s{seed}"
            progress(f"{grid}: {label}, seed {seed}")
            try:
                train_or_reuse(cfg, run_dir, progress)
            except TrainingDiverged as err:
                point["runs"][seed] = {"diverged": str(err).split(";")[0]}
                continue
            model, head, _cfg, ck = load_trained(run_dir / "checkpoint.pt")
            key = dict(settings, sha256=checkpoint_digest(ck))
            ev = load_cached(run_dir / "ablation_eval.json", key)
            if ev is None:
                full = measure_model(model, head, test, x, y, eps_list=(0.0, 0.3))
                ev = {"error": full["error"], "fgsm_0.3": full["fgsm"]["0.3"],
                      "eer": full["verification"]["eer_percent"],
                      "log_var_mean": 0.0, "log_var_min": 0.0, **log_var_stats(head),
                      "train_loss": ck["metrics"][-1]["train_loss"],
                      "log_var_by_epoch": [m.get("log_var_mean") for m in ck["metrics"]]}
                save_cached(run_dir / "ablation_eval.json", key, ev)
            point["runs"][seed] = ev
        points.append(point)
    res = {"grid": grid, "preset": preset, "train": P["train"], "seeds": list(seeds), "dataset": dataset,
           "n_test": len(test), "n_attack": len(x), "points": points, "seconds": time.perf_counter() - t0}
    save_json(out / f"ablation-{grid}.json", res, indent=1, default=float)
    save_text(out / f"ablation-{grid}.md", ablation_markdown(res))
    return res


def ablation_markdown(r: dict) -> str:
    t = r["train"]
    L = [f"# L-GM ablation: {r['grid']}", "",
         f"LeNet++ 100-D, linear feature layer, L-GM (alpha 1 unless the row says otherwise), head lr x10; "
         f"{r['dataset']}, {t.get('subset') or 'all'} training images, {budget_words(t)} (the `{r['preset']}` "
         f"budget), seeds {', '.join(map(str, r['seeds']))}; test error on {r['n_test']} images, FGSM eps=0.3 and "
         f"its verification (EER of the head's default score) on {r['n_attack']}. Command: "
         f"`lgm ablation --grid {r['grid']} --preset {r['preset']} --seeds {','.join(map(str, r['seeds']))}`.", "",
         "| setting | test error % | FGSM 0.3 error % | verification EER % | final train loss | "
         "mean / min log-variance | diverged |",
         "|---|---|---|---|---|---|---|"]
    for p in r["points"]:
        ok = [ev for ev in p["runs"].values() if "diverged" not in ev]
        bad = [ev["diverged"] for ev in p["runs"].values() if "diverged" in ev]
        loss = [e["train_loss"] for e in ok if "train_loss" in e]
        L.append(f"| {p['label']} | {mean_std_text([e['error'] for e in ok])} | "
                 f"{mean_std_text([e['fgsm_0.3'] for e in ok])} | {mean_std_text([e['eer'] for e in ok], '{:.1f}')} | "
                 f"{mean_std_text(loss, '{:.3f}') if loss else '-'} | "
                 f"{mean_std_text([e['log_var_mean'] for e in ok], '{:.3f}')} / "
                 f"{mean_std_text([e.get('log_var_min', 0.0) for e in ok], '{:.3f}')} | "
                 f"{'; '.join(bad) if bad else '-'} |")
    return "\n".join(L) + "\n"
