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
training time per epoch; for seed 0, the report's cosine/MSE center comparisons
(:func:`lgm_lab.experiments.centers_report`).  A pipeline over library functions: training is
:func:`lgm_lab.train.train`, the attacks and losses are :mod:`lgm_ext`'s.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor

from lgm_ext.attacks import FGSM

from .tensors import batches as _batches
from .tensors import features as _features
from .tensors import stack_dataset

__all__ = ["INVERSE_PRESETS", "INVERSE_MODELS", "compactness", "center_scores", "inverse_experiment",
           "inverse_markdown"]

# model -> TrainConfig overrides (every model: linear 100-D feature layer, as the rest of the toolkit)
INVERSE_MODELS = {
    "A (center loss)": dict(head="center"),
    "B (softmax)": dict(head="softmax"),
    "C-class (inverse-adversary class centers)": dict(head="inverse-class"),
    "C-instance (own inverse adversary)": dict(head="inverse-instance"),
}
INVERSE_PRESETS = {
    # about 45 min on 2 CPU cores: C models cost ~6x a plain step (5 attack steps + 1 feature pass)
    "quick": dict(train=dict(subset=2000, test_subset=1000, epochs=3), seeds=(0, 1, 2), attack_subset=500,
                  mean_points=2000),
    "standard": dict(train=dict(subset=4000, test_subset=2000, epochs=4), seeds=(0, 1, 2), attack_subset=1000,
                     mean_points=4000),
    "paper": dict(train=dict(epochs=20), seeds=(0, 1, 2), attack_subset=None, mean_points=10000),
}


def _short(model: str) -> str:
    return model.split(" ")[0]


def compactness(features: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean distance of each feature to its class mean over the mean distance between class means
    (lower: tighter classes relative to their separation).  Classes absent from ``labels`` are skipped."""
    from .experiments import class_means

    f = features.double()
    present = torch.bincount(labels, minlength=num_classes) > 0
    m = class_means(f, labels, num_classes)
    intra = (f - m.index_select(0, labels)).norm(dim=1).mean()
    mp = m[present]
    k = mp.shape[0]
    if k < 2:
        return float("nan")
    d = torch.cdist(mp, mp)
    inter = d.sum() / (k * (k - 1))
    return (intra / inter).item()


def center_scores(features: Tensor, means: Tensor, head) -> Tensor:
    """The center-style log-score -|f - m_ŷ|^2 / 2 of the predicted class ŷ against class means ``means``."""
    from .heads import center_log_score

    return center_log_score(features, means, head.predict(features))


def _evaluate(model, head, test, x, y, xm, ym, batch: int = 256) -> dict:
    from .experiments import Classifier, _attack, class_means, eer
    from .train import evaluate

    clf = Classifier(model, head).eval()
    out = {"error": evaluate(model, head, test)["error_percent"], "fgsm": {}}
    k = head.num_classes
    means = class_means(_features(model, xm), ym, k)
    adv03 = None
    for e in (0.1, 0.3):
        adv = _attack(FGSM(clf, eps=e), x, y, batch)
        if e == 0.3:
            adv03 = adv
        with torch.no_grad():
            pred = torch.cat([head.predict(model(adv[s])) for s in _batches(len(x), 512)])
        out["fgsm"][str(e)] = 100.0 * (pred != y).float().mean().item()
    with torch.no_grad():
        fc, fa = _features(model, x), _features(model, adv03)
        rate, _ = eer(center_scores(fc, means, head), center_scores(fa, means, head))
        out["eer"] = 100.0 * rate
        if head.centers() is not None:
            c = head.centers().detach()
            own, _ = eer(center_scores(fc, c, head), center_scores(fa, c, head))
            out["eer_own_centers"] = 100.0 * own
        ft = _features(model, stack_dataset(test)[0])
    out["compactness"] = compactness(ft, stack_dataset(test)[1], k)
    return out


def inverse_experiment(out_dir, *, preset: str = "quick", data_dir=None, progress=print, on_stage=None) -> dict:
    """Train A, B, C-class and C-instance for each seed of ``preset`` into ``out_dir/runs`` (finished
    runs are reused), measure them, and write ``inverse.json`` and ``inverse.md``."""
    from .data import load_dataset
    from .experiments import _config, _mean_std, _train_or_reuse, centers_report
    from .train import load_trained

    if preset not in INVERSE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(INVERSE_PRESETS)}")
    P = INVERSE_PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = "fashion-mnist"
    seeds = list(P["seeds"])
    t0 = time.perf_counter()
    test = load_dataset(dataset, False, data_dir=data_dir, subset=P["train"].get("test_subset"))
    x, y = stack_dataset(test)
    if P["attack_subset"]:
        x, y = x[: P["attack_subset"]], y[: P["attack_subset"]]
    xm, ym = stack_dataset(load_dataset(dataset, True, data_dir=data_dir, subset=P["mean_points"]))
    total = 2 * len(INVERSE_MODELS) * len(seeds) + 1
    done = [0]

    def stage(what: str) -> None:
        progress(what)
        if on_stage is not None:
            on_stage(done[0], total, what)
        done[0] += 1

    res = {"preset": preset, "dataset": dataset, "seeds": seeds, "train": P["train"], "n_test": len(test),
           "n_attack": len(x), "runs": {}, "seconds_per_epoch": {}, "models_reused": 0, "models": 0}
    keep = {}
    for model_name, spec in INVERSE_MODELS.items():
        for seed in seeds:
            key = f"{spec['head']}-s{seed}"
            cfg = _config(dataset, data_dir, 100, seed, dict(P["train"], **spec))
            stage(f"training {_short(model_name)} seed {seed} ({cfg.epochs} epochs)")
            run_dir = out / "runs" / key
            res["models_reused"] += _train_or_reuse(cfg, run_dir, progress)
            res["models"] += 1
            model, head, cfg, ck = load_trained(run_dir / "checkpoint.pt")
            hist = ck["metrics"]
            n_train = cfg.subset or 60000
            per_epoch = [n_train / h["train_images_per_second"] for h in hist]
            cache = run_dir / "inverse_eval.json"
            settings = {"n_test": len(test), "n_attack": len(x), "mean_points": len(xm), "epoch": int(ck["epoch"]),
                        "sha256": ck.get("sha256")}
            cached = json.loads(cache.read_text()) if cache.exists() else {}
            if cached.get("settings") == settings:  # the same checkpoint measured the same way
                stage(f"evaluating {_short(model_name)} seed {seed}: reused")
                ev = cached["eval"]
            else:
                stage(f"evaluating {_short(model_name)} seed {seed}")
                ev = _evaluate(model, head, test, x, y, xm, ym)
                cache.write_text(json.dumps({"settings": settings, "eval": ev}, indent=1))
            ev["seconds_per_epoch"] = sum(per_epoch) / len(per_epoch)
            res["runs"].setdefault(model_name, {})[seed] = ev
            if seed == seeds[0]:
                keep[model_name] = (model, head)
    stage("centers comparisons (seed 0)")
    res["centers"] = {}
    for model_name, mh in keep.items():
        rep = centers_report({_short(model_name): mh}, x, y)
        res["centers"][model_name] = rep[_short(model_name)]
    res["summary"] = {m: {k: _mean_std([ev[k] for ev in r.values()]) for k in
                          ("error", "eer", "compactness", "seconds_per_epoch")}
                      for m, r in res["runs"].items()}
    res["verdict"] = verdict(res)
    res["context"] = context(res)
    res["seconds"] = time.perf_counter() - t0
    (out / "inverse.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "inverse.md").write_text(inverse_markdown(res))
    return res


def _z(a: list[float], b: list[float]) -> float:
    """(mean b - mean a) over the standard error of the difference from the seed spreads."""
    from .experiments import _mean_std

    ma, sa = _mean_std(a)
    mb, sb = _mean_std(b)
    se = (sa ** 2 / len(a) + sb ** 2 / len(b)) ** 0.5
    return (mb - ma) / se if se > 0 else (0.0 if ma == mb else float("inf") * (1 if mb > ma else -1))


def verdict(r: dict) -> list[dict]:
    """Per C variant against Model A: accuracy (binomial + seed error, :func:`compare`), compactness
    (seed error), detection EER and cost; each "better" / "worse" / "same within noise"."""
    from .experiments import compare

    a = "A (center loss)"
    out = []
    if a not in r["runs"]:
        return out
    get = lambda m, k: [ev[k] for ev in r["runs"][m].values()]  # noqa: E731
    word = {"holds": "better", "fails": "worse", "within noise": "same within noise"}
    for m in r["runs"]:
        if not m.startswith("C"):
            continue
        acc = compare(get(m, "error"), get(a, "error"), r["n_test"])["verdict"]
        eer_v = compare(get(m, "eer"), get(a, "eer"), 2 * r["n_attack"])["verdict"]
        zc = _z(get(m, "compactness"), get(a, "compactness"))  # > 0: C tighter (lower ratio)
        comp = "better" if zc >= 2 else ("worse" if zc <= -2 else "same within noise")
        cost = r["summary"][m]["seconds_per_epoch"][0] / max(r["summary"][a]["seconds_per_epoch"][0], 1e-9)
        out.append({"model": m, "accuracy": word[acc], "compactness": comp, "eer": word[eer_v],
                    "cost_ratio": cost,
                    "substitutes": word[acc] != "worse" and comp != "worse"})
    return out


def context(r: dict) -> dict:
    """What the verdict can mean: does center loss itself (A) beat softmax (B) here, and does each C model
    behave like A or like B?  (Same rules as :func:`verdict`.)"""
    from .experiments import compare

    a, b = "A (center loss)", "B (softmax)"
    if a not in r["runs"] or b not in r["runs"]:
        return {}
    get = lambda m, k: [ev[k] for ev in r["runs"][m].values()]  # noqa: E731
    word = {"holds": "better", "fails": "worse", "within noise": "same within noise"}
    zc = _z(get(a, "compactness"), get(b, "compactness"))
    out = {"A_vs_B": {"compactness": "better" if zc >= 2 else ("worse" if zc <= -2 else "same within noise"),
                      "compactness_z": zc,
                      "accuracy": word[compare(get(a, "error"), get(b, "error"), r["n_test"])["verdict"]],
                      "eer": word[compare(get(a, "eer"), get(b, "eer"), 2 * r["n_attack"])["verdict"]]}}
    for m in r["runs"]:
        if m.startswith("C"):
            out[m] = {"fgsm_0.3_vs_A": word[compare([ev["fgsm"]["0.3"] for ev in r["runs"][m].values()],
                                                     [ev["fgsm"]["0.3"] for ev in r["runs"][a].values()],
                                                     r["n_attack"])["verdict"]],
                      "eer_vs_B": word[compare(get(m, "eer"), get(b, "eer"), 2 * r["n_attack"])["verdict"]]}
            cos = r.get("centers", {}).get(m, {}).get("inverse vs clean", {}).get("mean_cosine")
            if cos is not None:
                out[m]["inverse_vs_clean_cosine"] = cos
    return out


def inverse_markdown(r: dict) -> str:
    from .experiments import _ms

    t = r["train"]
    L = ["# Inverse-adversary centers, trained (" + r["preset"] + " budget, " + r["dataset"] + ")", "",
         f"LeNet++ with a linear 100-D feature layer, {t.get('subset') or 'all'} training images, {t.get('epochs')} "
         f"epochs, one budget for every model; seeds {', '.join(map(str, r['seeds']))} (mean ± std). Clean error on "
         f"{r['n_test']} test images, attacks and verification on {r['n_attack']}. Inverse adversaries: eps'=4/255, "
         "5 steps of 2/255 (lgm_ext.InversePGD), generated on the current network every training step. "
         f"This invocation took {r['seconds'] / 60:.1f} min ({r.get('models_reused', 0)} of {r.get('models', 0)} "
         "models reused from an earlier invocation; the s / epoch column is each model's own training).", "",
         "| model | clean error % | FGSM 0.1 error % | FGSM 0.3 error % | EER % (class means) | "
         "EER % (own centers) | compactness (lower = tighter) | s / epoch |", "|---|---|---|---|---|---|---|---|"]
    for m, runs in r["runs"].items():
        evs = list(runs.values())
        own = [ev["eer_own_centers"] for ev in evs if "eer_own_centers" in ev]
        L.append(f"| {m} | {_ms([e['error'] for e in evs])} | {_ms([e['fgsm']['0.1'] for e in evs])} | "
                 f"{_ms([e['fgsm']['0.3'] for e in evs])} | {_ms([e['eer'] for e in evs], '{:.1f}')} | "
                 f"{_ms(own, '{:.1f}') if own else '-'} | {_ms([e['compactness'] for e in evs], '{:.3f}')} | "
                 f"{_ms([e['seconds_per_epoch'] for e in evs], '{:.0f}')} |")
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
          "| model | accuracy | compactness | FGSM detection (EER) | cost per epoch vs A | substitutes for A's centers? |",
          "|---|---|---|---|---|---|"]
    for v in r["verdict"]:
        L.append(f"| {v['model']} | {v['accuracy']} | {v['compactness']} | {v['eer']} | {v['cost_ratio']:.1f}x | "
                 f"{'yes' if v['substitutes'] else '**no**'} |")
    L += ["", "Rule: 'better'/'worse' when the difference is at least 2 standard errors (binomial on n images "
              "combined with the seed spread for rates; the seed spread for compactness), else 'same within "
              "noise'. 'Substitutes' = accuracy and compactness not worse than A's.", ""]
    c = r.get("context", {})
    if c:
        ab = c["A_vs_B"]
        L += ["What the verdict can mean here. Center loss itself against softmax (A vs B): compactness "
              f"{ab['compactness']} (z = {ab['compactness_z']:.1f}), accuracy {ab['accuracy']}, FGSM detection "
              f"{ab['eer']}."
              + (" Since center loss does not make the classes measurably tighter than softmax at this budget, "
                 "'substitutes' above only means 'no worse than A'; it cannot show that inverse-adversary "
                 "centers deliver what center-loss centers deliver." if ab["compactness"] != "better" else "")]
        for m, v in c.items():
            if m == "A_vs_B":
                continue
            cos = v.get("inverse_vs_clean_cosine")
            L.append(f"{m}: FGSM eps=0.3 error vs A {v['fgsm_0.3_vs_A']}, FGSM detection vs B {v['eer_vs_B']}"
                     + (f"; its inverse-adversary class means have cosine {cos:.4f} with its clean class means"
                        if cos is not None else "") + ".")
        L.append("")
    return "\n".join(L)
