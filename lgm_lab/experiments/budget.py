"""The budget curve (issue 24): test error, adversarial verification and class compactness of softmax, center
loss and L-GM as functions of the number of SGD steps, at two batch sizes -- the evidence the presets are
chosen from.

Every point is its own run on the full Fashion-MNIST training set: ``steps`` SGD steps of the report recipe
(one-cycle learning rate spanning exactly those steps; the L-GM ramp over the first quarter of them), 100-D
linear feature layer.  A grid (:data:`BUDGET_PRESETS`) runs one seed per point; ``at`` adds seeds at chosen
points (those the reproduce presets use).  Finished runs and their measurements are reused, so a killed sweep
continues where it stopped and added seeds cost only their own runs.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoints import checkpoint_digest, load_trained
from ..data import load_dataset
from ..evaluation import evaluate
from ..figures import budget_figure
from ..run_folder import in_folder, save_json, save_text
from ..tensors import features, stack_dataset
from ..train import TrainingDiverged
from .measure import compactness, fgsm_sweep, verification
from .runs import load_cached, run_config, save_cached, train_or_reuse
from .stats import compare, mean_std_text

__all__ = ["BUDGET_HEADS", "BUDGET_PRESETS", "budget_config", "budget_sweep", "budget_claims", "budget_markdown"]

BUDGET_HEADS = {"softmax": dict(head="softmax"), "center": dict(head="center"), "lgm-a1": dict(head="lgm", alpha=1.0)}
BUDGET_PRESETS = {
    # every other point of "standard" (its runs are reused there): ~1.0M training images, ~1 h on 2 idle cores
    "coarse": dict(points={128: (64, 256, 1024), 64: (512, 2048)}, seeds=(0,), test_subset=2000, attack_subset=1000),
    # ~2.3M training images in all at one seed: about 2.5 h of LeNet++ on 2 idle cores
    "standard": dict(points={128: (64, 128, 256, 512, 1024, 2048), 64: (128, 512, 2048)}, seeds=(0,),
                     test_subset=2000, attack_subset=1000),
}
# The claims read off the curve: (name, measure, lower-is-better head, compared with).
CLAIMS = [
    ("L-GM has a lower test error than softmax", "error", "lgm-a1", "softmax"),
    ("L-GM has a lower test error than center loss", "error", "lgm-a1", "center"),
    ("L-GM's likelihood detects FGSM inputs better than softmax's score (EER)", "eer", "lgm-a1", "softmax"),
    ("L-GM's likelihood detects FGSM inputs better than center loss's score (EER)", "eer", "lgm-a1", "center"),
    ("center loss makes the classes tighter than softmax (compactness)", "compactness", "center", "softmax"),
]


def budget_config(head: str, batch: int, steps: int, seed: int, *, test_subset: int, dataset: str = "fashion-mnist",
                  data_dir=None):
    """One point of the curve: the report recipe for ``steps`` SGD steps at batch size ``batch`` on the full
    training set, the L-GM ramp over the first quarter of the steps."""
    return run_config(dataset, data_dir, 100, seed, dict(BUDGET_HEADS[head], batch_size=batch, steps=steps,
                                                         warmup_steps=max(1, steps // 4), test_subset=test_subset))


def _measure(model, head, test, x, y) -> dict:
    feats = {}  # the sweep's features of the clean and FGSM images, reused by the verification
    errors, adversarial = fgsm_sweep(model, head, x, y, (0.0, 0.3), batch=256, predict_batch=512, features_out=feats)
    ver = verification(model, head, x, y, eps=0.3, adversarial=adversarial[0.3], features_of=(feats[0.0], feats[0.3]))
    xt, yt = stack_dataset(test)
    with torch.no_grad():
        comp = compactness(features(model, xt), yt, head.num_classes)
    return {"error": evaluate(model, head, test)["error_percent"], "fgsm_0.3": errors[0.3],
            "eer": ver["eer_percent"], "eer_max_posterior": ver["scores"]["max_posterior"]["eer_percent"],
            "compactness": comp}


def _train_seconds(history: list[dict], batch: int) -> float:
    """Training time of a run (evaluation excluded) from its per-epoch throughput."""
    done, seconds = 0, 0.0
    for h in history:
        steps = h.get("steps", done) - done
        seconds += batch * steps / max(h["train_images_per_second"], 1e-9)
        done = h.get("steps", done)
    return seconds


def budget_sweep(out_dir, *, preset: str = "standard", seeds=None, at=(), at_seeds=(0, 1, 2), data_dir=None,
                 progress=print) -> dict:
    """Train and measure every point of ``BUDGET_PRESETS[preset]`` (its seeds, or ``seeds``), plus ``at_seeds``
    at each (batch, steps) of ``at``, into ``out_dir/runs``; write ``budget.json``, ``budget.md`` and
    ``figures/budget.png``.  A point that diverges is recorded, not raised."""
    if preset not in BUDGET_PRESETS:
        raise ValueError(f"unknown budget preset {preset!r}; choose one of {', '.join(BUDGET_PRESETS)}")
    P = BUDGET_PRESETS[preset]
    seeds = tuple(P["seeds"] if seeds is None else seeds)
    plan = {(b, s, seed) for b, steps in P["points"].items() for s in steps for seed in seeds}
    plan |= {(b, s, seed) for b, s in at for seed in at_seeds}
    order = sorted(plan, key=lambda p: (p[1] * p[0], p[0], p[2]))  # cheapest first
    # every point's configuration up front: a bad point is refused before anything trains
    configs = {(b, s, seed, h): budget_config(h, b, s, seed, test_subset=P["test_subset"], data_dir=data_dir)
               for b, s, seed in order for h in BUDGET_HEADS}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    test = load_dataset("fashion-mnist", False, data_dir=data_dir, subset=P["test_subset"])
    x, y = stack_dataset(test)
    x, y = x[: P["attack_subset"]], y[: P["attack_subset"]]
    settings = {"test": len(test), "attack": len(x), "protocol": 1}
    points = []
    for batch, steps, seed in order:
        for head_name in BUDGET_HEADS:
            cfg = configs[batch, steps, seed, head_name]
            run_dir = out / "runs" / f"{head_name}-b{batch}-s{steps}-seed{seed}"
            progress(f"{head_name}, batch {batch}, {steps} steps, seed {seed}")
            point = {"head": head_name, "batch": batch, "steps": steps, "seed": seed, "images": batch * steps}
            marker = load_cached(run_dir / "diverged.json", asdict(cfg))  # a diverged run is not retried
            if marker is not None:
                points.append(dict(point, diverged=marker["message"]))
                continue
            try:
                train_or_reuse(cfg, run_dir, progress)
            except TrainingDiverged as err:
                message = str(err).split(";")[0]
                run_dir.mkdir(parents=True, exist_ok=True)
                save_cached(run_dir / "diverged.json", asdict(cfg), {"message": message})
                points.append(dict(point, diverged=message))
                continue
            model, head, _cfg, ck = load_trained(run_dir / "checkpoint.pt")
            key = dict(settings, sha256=checkpoint_digest(ck))
            ev = load_cached(run_dir / "budget_eval.json", key)
            if ev is None:
                ev = _measure(model, head, test, x, y)
                save_cached(run_dir / "budget_eval.json", key, ev)
            points.append(dict(point, **ev, train_seconds=_train_seconds(ck["metrics"], batch)))
    res = {"preset": preset, "dataset": "fashion-mnist", "n_test": len(test), "n_attack": len(x),
           "points": points, "seconds": time.perf_counter() - t0}
    res["claims"] = budget_claims(res)
    (out / "figures").mkdir(exist_ok=True)
    res["figure"] = in_folder(budget_figure(points, out / "figures" / "budget.png"), out)
    save_json(out / "budget.json", res, indent=1, default=float)
    save_text(out / "budget.md", budget_markdown(res))
    return res


def _values(res: dict, head: str, batch: int, steps: int, key: str) -> list[float]:
    return [p[key] for p in res["points"] if p["head"] == head and p["batch"] == batch and p["steps"] == steps
            and key in p]


def budget_claims(res: dict) -> list[dict]:
    """Each claim of :data:`CLAIMS` at every (batch, steps) measured: holds / fails / within noise (the z-test
    of :func:`~lgm_lab.experiments.stats.compare`; binomial on the images for rates, and the seed spread;
    compactness only where there are 2+ seeds), and the smallest budget from which it holds at every larger
    one measured."""
    out = []
    grid = sorted({(p["batch"], p["steps"]) for p in res["points"]})
    for name, key, a, b in CLAIMS:
        n = {"error": res["n_test"], "eer": 2 * res["n_attack"]}.get(key)
        for batch in sorted({g[0] for g in grid}):
            rows = []
            for _b, steps in [g for g in grid if g[0] == batch]:
                va, vb = _values(res, a, batch, steps, key), _values(res, b, batch, steps, key)
                if not va or not vb or (n is None and min(len(va), len(vb)) < 2):
                    rows.append({"steps": steps, "verdict": "-", "seeds": min(len(va), len(vb))})
                    continue
                c = compare(va, vb, n)
                rows.append({"steps": steps, "verdict": c["verdict"], "z": c["z"], "a": c["a"], "b": c["b"],
                             "seeds": min(len(va), len(vb))})
            holds_from = None
            for i, r in enumerate(rows):
                tested = [q for q in rows[i:] if q["verdict"] != "-"]
                if r["verdict"] == "holds" and all(q["verdict"] == "holds" for q in tested):
                    holds_from = r["steps"]
                    break
            out.append({"claim": name, "measure": key, "batch": batch, "rows": rows, "holds_from": holds_from})
    return out


def budget_markdown(res: dict) -> str:
    L = ["# The budget curve: softmax, center loss and L-GM against SGD steps", "",
         f"LeNet++ 100-D (linear feature layer), Fashion-MNIST, the full 60,000-image training set; the report "
         f"recipe (SGD + Nesterov, one-cycle lr peaking at 0.01 over exactly the run's steps, weight decay 5e-4, "
         f"L-GM means/log-variances at 10x the lr, alpha = 1 and lambda = 0.1 ramped over the first quarter of the "
         f"steps, gradient norm clipped at 10). Test error on {res['n_test']} test images; FGSM eps = 0.3 and its "
         f"verification on the first {res['n_attack']}; compactness (mean distance to the own class mean over the "
         "mean distance between class means) on the test features. One seed per point unless the seeds column "
         f"says more (mean ± std over seeds). Command: `lgm budget`; this invocation took {res['seconds'] / 60:.0f} "
         "min (finished runs are reused).", "", f"![budget](figures/{Path(res['figure']).name})", ""]
    heads = list(BUDGET_HEADS)
    ms = mean_std_text
    for batch in sorted({p["batch"] for p in res["points"]}, reverse=True):
        L += [f"## Batch {batch}", "",
              "| SGD steps | images | seeds | " + " | ".join(f"{h} error %" for h in heads) + " | "
              + " | ".join(f"{h} EER %" for h in heads) + " | lgm-a1 EER % (max posterior) | "
              + " | ".join(f"{h} compactness" for h in heads) + " |", "|---" * (4 + 3 * len(heads)) + "|"]
        for steps in sorted({p["steps"] for p in res["points"] if p["batch"] == batch}):
            def v(h, key, fmt="{:.2f}", batch=batch, steps=steps):
                return ms(_values(res, h, batch, steps, key), fmt)
            nseed = max(len(_values(res, h, batch, steps, "error")) for h in heads)
            L.append(f"| {steps} | {batch * steps:,} | {nseed} | " + " | ".join(v(h, "error") for h in heads) + " | "
                     + " | ".join(v(h, "eer", "{:.1f}") for h in heads)
                     + f" | {v('lgm-a1', 'eer_max_posterior', '{:.1f}')}"
                     + " | " + " | ".join(v(h, "compactness", "{:.3f}") for h in heads) + " |")
        L.append("")
        L += [f"Diverged (not in the table): {p['head']}, {p['steps']} steps, seed {p['seed']}: {p['diverged']}."
              for p in res["points"] if p["batch"] == batch and "diverged" in p]
        L.append("")
    L += ["## Where each claim turns", "",
          "Verdict per budget (steps): `holds` when the difference is at least 2 standard errors in the claim's "
          "direction, `fails` when at least 2 in the other, else `within noise`; `-`: not testable there "
          "(compactness needs 2+ seeds). Where a point has one seed (`1 seed`), the standard error is the binomial "
          "error of the test images alone: the verdict is about that seed's model, and the seed-to-seed spread of "
          "training (larger at small budgets) is not in it. 'Holds from' is the smallest budget from which it holds "
          "at every larger budget measured.", "",
          "| claim | batch | verdict by steps | holds from |", "|---|---|---|---|"]
    for c in res["claims"]:
        cells = ", ".join(f"{r['steps']}: {r['verdict']}"
                          + (f" (z {r['z']:.1f}{', 1 seed' if r['seeds'] == 1 else ''})" if "z" in r else "")
                          for r in c["rows"])
        L.append(f"| {c['claim']} | {c['batch']} | {cells} | "
                 f"{c['holds_from'] if c['holds_from'] is not None else 'never, up to the largest budget'} |")
    return "\n".join(L) + "\n"

