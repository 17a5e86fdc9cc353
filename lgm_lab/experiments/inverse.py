"""The inverse-adversary report's question, answered by training (issue 15): can the features of
inverse adversaries *replace* the centers of center loss?

Four LeNet++ models under one budget, each with several seeds (the report's "3 tries"):

- Model A: softmax + center loss (Wen et al.);
- Model B: softmax only;
- Model C-class: softmax + a center loss whose class centers are running means of inverse-adversary
  features (:class:`lgm_ext.InverseAdversaryCenterLoss`, ``variant="class"``);
- Model C-instance: softmax + each feature pulled to its own inverse adversary's (``"instance"``).

Measured per model and seed: clean test error, FGSM error at eps 0.1 and 0.3, adversarial
verification EER (FGSM eps 0.3) with the center-style score -|f - m_ŷ|^2/2 against the class means
m of the training features (one score for every model, so B is scored too), intra-class compactness
(mean distance of a test feature to its class mean over the mean distance between class means), and
training time per epoch; for seed 0, the report's cosine/MSE center comparisons.  A pipeline over
shared measurements (:mod:`~lgm_lab.experiments.measure`) and runs (:mod:`~lgm_lab.experiments.runs`).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..checkpoints import checkpoint_digest, load_trained
from ..config import dataset_info
from ..data import load_dataset
from ..evaluation import error_percent
from ..run_folder import save_json, save_text
from ..tensors import features, stack_dataset
from .measure import (
    INVERSE_ADVERSARY,
    center_comparisons,
    center_scores,
    class_means,
    compactness,
    eer,
    fgsm_sweep,
    training_step_ms,
)
from .runs import budget_words, load_cached, run_config, save_cached, train_or_reuse
from .stats import RELATIVE, compare, mean_std, mean_std_text, relative

__all__ = ["INVERSE_PRESETS", "INVERSE_MODELS", "inverse_experiment", "inverse_stages", "verdict", "substitutes_text",
           "context",
           "inverse_markdown"]

# model -> TrainConfig overrides (every model: linear 100-D feature layer, as the rest of the toolkit)
INVERSE_MODELS = {
    "A (center loss)": dict(head="center"),
    "B (softmax)": dict(head="softmax"),
    "C-class (inverse-adversary class centers)": dict(head="inverse-class"),
    "C-instance (own inverse adversary)": dict(head="inverse-instance"),
}
INVERSE_PRESETS = {
    # 256 SGD steps of batch 128 on the full training set: the smallest budget of the curve (docs/budget) at
    # which center loss measurably tightens the classes against softmax (compactness 0.335 vs 0.404, z 7.6,
    # 3 seeds), so "C-class ~ center loss" can mean something; A and B are the curve's models at that point.
    # C models cost ~6x a plain step (5 attack steps + 1 feature pass): ~1.5 h on 2 CPU cores for 3 seeds.
    "quick": dict(train=dict(steps=256, warmup_steps=64, test_subset=2000), seeds=(0, 1, 2), attack_subset=1000,
                  mean_points=10000),
    "standard": dict(train=dict(steps=1024, warmup_steps=256, test_subset=2000), seeds=(0, 1, 2),
                     attack_subset=1000, mean_points=20000),
    "paper": dict(train=dict(epochs=20), seeds=(0, 1, 2), attack_subset=None, mean_points=10000),
}


def _short(model: str) -> str:
    return model.split(" ")[0]


def _evaluate(model, head, test, x, y, xm, ym, batch: int = 256) -> dict:
    model.eval(), head.eval()
    k = head.num_classes
    xt, yt = stack_dataset(test)
    with torch.no_grad():  # one pass over the test set serves the error and the compactness
        ft = features(model, xt)
        out = {"error": error_percent((head.predict(ft) == yt).sum().item(), len(yt))}
    means = class_means(features(model, xm), ym, k)
    feats = {}  # the sweep's features of the clean and eps-0.3 images serve the verification
    errors, _ = fgsm_sweep(model, head, x, y, (0.0, 0.1, 0.3), batch=batch, predict_batch=512, features_out=feats)
    out["fgsm"] = {str(e): errors[e] for e in (0.1, 0.3)}
    fc, fa = feats[0.0], feats[0.3]
    with torch.no_grad():
        rate, _ = eer(center_scores(fc, means, head), center_scores(fa, means, head))
        out["eer"] = 100.0 * rate
        if head.centers() is not None:
            c = head.centers().detach()
            own, _ = eer(center_scores(fc, c, head), center_scores(fa, c, head))
            out["eer_own_centers"] = 100.0 * own
    out["compactness"] = compactness(ft, yt, k)
    return out


def inverse_stages(preset: str, seeds=None) -> int:
    """How many stages :func:`inverse_experiment` reports for ``preset`` (for a progress bar)."""
    return 2 * len(INVERSE_MODELS) * len(INVERSE_PRESETS[preset]["seeds"] if seeds is None else seeds) + 1


def inverse_experiment(out_dir, *, preset: str = "quick", seeds=None, data_dir=None, progress=print,
                       on_stage=None) -> dict:
    """Train A, B, C-class and C-instance for each seed of ``preset`` (or ``seeds``) into ``out_dir/runs``
    (finished runs are reused), seed by seed so that a stopped run has whole seeds, measure them, and write
    ``inverse.json`` and ``inverse.md``."""
    if preset not in INVERSE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(INVERSE_PRESETS)}")
    P = INVERSE_PRESETS[preset]
    out = Path(out_dir)
    seeds = list(P["seeds"] if seeds is None else seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be integers >= 0, got {seeds!r}")
    out.mkdir(parents=True, exist_ok=True)
    dataset = "fashion-mnist"
    t0 = time.perf_counter()
    test = load_dataset(dataset, False, data_dir=data_dir, subset=P["train"].get("test_subset"))
    x, y = stack_dataset(test)
    if P["attack_subset"]:
        x, y = x[: P["attack_subset"]], y[: P["attack_subset"]]
    xm, ym = stack_dataset(load_dataset(dataset, True, data_dir=data_dir, subset=P["mean_points"]))
    total = inverse_stages(preset, seeds)
    done = [0]

    def stage(what: str) -> None:
        progress(what)
        if on_stage is not None:
            on_stage(done[0], total, what)
        done[0] += 1

    res = {"preset": preset, "dataset": dataset, "seeds": seeds, "train": P["train"], "n_test": len(test),
           "n_attack": len(x), "runs": {}, "seconds_per_epoch": {}, "models_reused": 0, "models": 0}
    keep = {}
    for seed in seeds:
        for model_name, spec in INVERSE_MODELS.items():
            key = f"{spec['head']}-s{seed}"
            cfg = run_config(dataset, data_dir, 100, seed, dict(P["train"], **spec))
            stage(f"training {_short(model_name)} seed {seed} ({budget_words(cfg.__dict__)})")
            run_dir = out / "runs" / key
            res["models_reused"] += train_or_reuse(cfg, run_dir, progress)
            res["models"] += 1
            model, head, cfg, ck = load_trained(run_dir / "checkpoint.pt")
            n_train = cfg.subset or dataset_info(cfg.dataset)["train_size"]
            per_epoch = [n_train / h["train_images_per_second"] for h in ck["metrics"]]
            cache = run_dir / "inverse_eval.json"
            settings = {"n_test": len(test), "n_attack": len(x), "mean_points": len(xm), "epoch": int(ck["epoch"]),
                        "sha256": checkpoint_digest(ck)}
            ev = load_cached(cache, settings)  # the same checkpoint measured the same way
            if ev is not None:
                stage(f"evaluating {_short(model_name)} seed {seed}: reused")
            else:
                stage(f"evaluating {_short(model_name)} seed {seed}")
                ev = _evaluate(model, head, test, x, y, xm, ym)
                save_cached(cache, settings, ev)
            ev["seconds_per_epoch"] = sum(per_epoch) / len(per_epoch)
            res["runs"].setdefault(model_name, {})[seed] = ev
            if seed == seeds[0]:
                keep[model_name] = (model, head)
    stage(f"centers comparisons and training-step cost (seed {seeds[0]})")
    res["centers"] = {m: center_comparisons(model, head, x, y) for m, (model, head) in keep.items()}
    bs = P["train"].get("batch_size", 128)  # one training batch of (random) training images
    res["step_ms"] = training_step_ms(keep, xm[:bs], ym[:bs])
    res["summary"] = {m: {k: mean_std([ev[k] for ev in r.values()]) for k in
                          ("error", "eer", "compactness", "seconds_per_epoch")}
                      for m, r in res["runs"].items()}
    res["verdict"] = verdict(res)
    res["context"] = context(res)
    res["seconds"] = time.perf_counter() - t0
    save_json(out / "inverse.json", res, indent=1, default=float)
    save_text(out / "inverse.md", inverse_markdown(res))
    return res


def verdict(r: dict) -> list[dict]:
    """Per C variant against Model A: accuracy (binomial + seed error), compactness (seed error),
    detection EER and cost; each "better" / "worse" / "same within noise"."""
    a = "A (center loss)"
    out = []
    if a not in r["runs"]:
        return out
    get = lambda m, k: [ev[k] for ev in r["runs"][m].values()]  # noqa: E731
    for m in r["runs"]:
        if not m.startswith("C"):
            continue
        acc = relative(get(m, "error"), get(a, "error"), r["n_test"])
        eer_v = relative(get(m, "eer"), get(a, "eer"), 2 * r["n_attack"])
        comp = relative(get(m, "compactness"), get(a, "compactness"))  # lower ratio: C tighter
        if "step_ms" in r:  # measured side by side (see training_step_ms)
            cost = r["step_ms"][m] / max(r["step_ms"][a], 1e-9)
        else:
            cost = r["summary"][m]["seconds_per_epoch"][0] / max(r["summary"][a]["seconds_per_epoch"][0], 1e-9)
        out.append({"model": m, "accuracy": acc, "compactness": comp, "eer": eer_v, "cost_ratio": cost,
                    # None: not determined (compactness has no error estimate with one seed)
                    "substitutes": None if comp == RELATIVE["one seed"] else (acc != "worse" and comp != "worse")})
    return out


def substitutes_text(v: dict) -> str:
    """A verdict row's answer to "substitutes for A's centers?": yes, no, or not determined (one seed)."""
    return "not determined (one seed)" if v["substitutes"] is None else ("yes" if v["substitutes"] else "no")


def context(r: dict) -> dict:
    """What the verdict can mean: does center loss itself (A) beat softmax (B) here, and does each C model
    behave like A or like B?  (Same rules as :func:`verdict`.)"""
    a, b = "A (center loss)", "B (softmax)"
    if a not in r["runs"] or b not in r["runs"]:
        return {}
    get = lambda m, k: [ev[k] for ev in r["runs"][m].values()]  # noqa: E731
    zc = compare(get(a, "compactness"), get(b, "compactness"))["z"]
    out = {"A_vs_B": {"compactness": relative(get(a, "compactness"), get(b, "compactness")),
                      "compactness_z": zc,
                      "accuracy": relative(get(a, "error"), get(b, "error"), r["n_test"]),
                      "eer": relative(get(a, "eer"), get(b, "eer"), 2 * r["n_attack"])}}
    for m in r["runs"]:
        if m.startswith("C"):
            out[m] = {"fgsm_0.3_vs_A": relative([ev["fgsm"]["0.3"] for ev in r["runs"][m].values()],
                                                [ev["fgsm"]["0.3"] for ev in r["runs"][a].values()], r["n_attack"]),
                      "eer_vs_B": relative(get(m, "eer"), get(b, "eer"), 2 * r["n_attack"])}
            cos = r.get("centers", {}).get(m, {}).get("inverse vs clean", {}).get("mean_cosine")
            if cos is not None:
                out[m]["inverse_vs_clean_cosine"] = cos
    return out


def inverse_markdown(r: dict) -> str:
    t = r["train"]
    ms = mean_std_text
    L = ["# Inverse-adversary centers, trained (" + r["preset"] + " budget, " + r["dataset"] + ")", "",
         f"LeNet++ with a linear 100-D feature layer, {t.get('subset') or 'all'} training images, "
         f"{budget_words(t)}, one budget for every model; seeds {', '.join(map(str, r['seeds']))} (mean ± std). "
         "Clean error on "
         f"{r['n_test']} test images, attacks and verification on {r['n_attack']}. Inverse adversaries: "
         f"{INVERSE_ADVERSARY} (lgm_ext.InversePGD), generated on the current network every training step. "
         f"This invocation took {r['seconds'] / 60:.1f} min ({r.get('models_reused', 0)} of {r.get('models', 0)} "
         "models reused from an earlier invocation; the s / epoch column is each model's own training, under "
         "whatever shared the machine then"
         + ("; 'step ms' is one training step (the head's inverse attack where it has one, forward and backward) "
            f"on a batch of {t.get('batch_size', 128)} images by each seed-{r['seeds'][0]} model, timed side by "
            "side in this invocation, which the cost ratio below uses)." if "step_ms" in r else ")."), "",
         "| model | clean error % | FGSM 0.1 error % | FGSM 0.3 error % | EER % (class means) | "
         "EER % (own centers) | compactness (lower = tighter) | s / epoch | step ms |",
         "|---|---|---|---|---|---|---|---|---|"]
    for m, runs in r["runs"].items():
        evs = list(runs.values())
        own = [ev["eer_own_centers"] for ev in evs if "eer_own_centers" in ev]
        step = f"{r['step_ms'][m]:.0f}" if m in r.get("step_ms", {}) else "-"
        L.append(f"| {m} | {ms([e['error'] for e in evs])} | {ms([e['fgsm']['0.1'] for e in evs])} | "
                 f"{ms([e['fgsm']['0.3'] for e in evs])} | {ms([e['eer'] for e in evs], '{:.1f}')} | "
                 f"{ms(own, '{:.1f}') if own else '-'} | {ms([e['compactness'] for e in evs], '{:.3f}')} | "
                 f"{ms([e['seconds_per_epoch'] for e in evs], '{:.0f}')} | {step} |")
    L += ["", "EER: adversarial verification of FGSM eps=0.3 inputs with the center-style score -|f - m_ŷ|²/2; "
              "'class means' uses the class means of training features for every model (B has no centers), "
              "'own centers' the model's learned centers (A: center-loss centers; C: running means of "
              "inverse-adversary features, tracked by both C variants). Compactness: mean distance to the own "
              "class mean over the mean distance between class means, on test features.", "",
          "## Centers (seed " + str(r["seeds"][0]) + "): cosine similarity and MSE", "",
          "| model | comparison | mean cosine | mean MSE |", "|---|---|---|---|"]
    for m, comps in r["centers"].items():
        for comp, v in comps.items():
            L.append(f"| {m} | {comp} | {v['mean_cosine']:.4f} | {v['mean_mse']:.4g} |")
    L += ["", "## Verdict (against Model A)", "",
          "| model | accuracy | compactness | FGSM detection (EER) | "
          + ("cost per step vs A " if "step_ms" in r else "cost per epoch vs A ")
          + "| substitutes for A's centers? |",
          "|---|---|---|---|---|---|"]
    for v in r["verdict"]:
        sub = substitutes_text(v)
        sub = f"**{sub}**" if sub == "no" else sub
        L.append(f"| {v['model']} | {v['accuracy']} | {v['compactness']} | {v['eer']} | {v['cost_ratio']:.1f}x | "
                 f"{sub} |")
    L += ["", "Rule: 'better'/'worse' when the difference is at least 2 standard errors (binomial on n images "
              "combined with the seed spread for rates; the seed spread for compactness), else 'same within "
              "noise'. 'Substitutes' = accuracy and compactness not worse than A's.", ""]
    c = r.get("context", {})
    if c:
        ab = c["A_vs_B"]
        L += ["What the verdict can mean here. Center loss itself against softmax (A vs B): compactness "
              f"{ab['compactness']}"  # z is NaN with one seed
              + ("" if math.isnan(ab["compactness_z"]) else f" (z = {ab['compactness_z']:.1f})")
              + f", accuracy {ab['accuracy']}, FGSM detection {ab['eer']}."
              + (" Since center loss does not make the classes measurably tighter than softmax at this budget, "
                 "'substitutes' above only means 'no worse than A'; it cannot show that inverse-adversary "
                 "centers deliver what center-loss centers deliver."
                 if ab["compactness"] not in ("better", RELATIVE["one seed"]) else "")]
        for m, v in c.items():
            if m == "A_vs_B":
                continue
            cos = v.get("inverse_vs_clean_cosine")
            L.append(f"{m}: FGSM eps=0.3 error vs A {v['fgsm_0.3_vs_A']}, FGSM detection vs B {v['eer_vs_B']}"
                     + (f"; its inverse-adversary class means have cosine {cos:.4f} with its clean class means"
                        if cos is not None else "") + ".")
        L.append("")
    return "\n".join(L)

