"""The source documents' experiments as library functions (SPEC section 5).

- :func:`fgsm_errors`: the L-GM paper's Table 6 (test error under FGSM).
- :func:`verification`: adversarial verification (paper section 4.3): the
  likelihood score of the predicted class on normal and FGSM inputs, ROC and EER
  (and the targeted-FGSM variant).
- :func:`centers_report`: the inverse-adversary report's comparison of class
  centers (cosine similarity and MSE) and its claims.
- :func:`embedding_figure`: paper Fig. 1 (2-D features; the L-GM likelihood map).
- :func:`reproduce`: all of it, from training to ``report.md``.

Attacks use the head's classification loss: cross-entropy on the head's logits,
which for an L-GM head is L_cls with alpha = 0 (SPEC section 4).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import FGSM, InversePGD, TargetedFGSM

__all__ = ["PAPER", "Classifier", "stack_dataset", "fgsm_errors", "eer", "verification", "class_means",
           "compare_centers", "centers_report", "embedding_figure", "verification_figures", "reproduce",
           "REPRODUCE_PRESETS"]

PAPER = {
    # Table 1, test error % (2-D / 100-D features), MNIST
    "table1": {"softmax": (1.82, 0.68), "center": (1.45, 0.47), "lgm-a0": (1.44, 0.49), "lgm-a0.3": (1.32, 0.42),
               "lgm-a1": (1.17, 0.39)},
    # Table 6, test error % under FGSM at eps = 0, 0.1, 0.2, 0.3 (100-D)
    "table6": {"softmax": [0.68, 24.08, 75.56, 84.87], "center": [0.47, 43.13, 67.17, 85.49],
               "lgm-a1": [0.39, 23.63, 64.40, 81.62]},
    "eer": {"softmax": 37.7, "center": 10.2, "lgm-a1": 3.1},
    "targeted": {"error": 81.37, "eer": 4.3},
}
EPS = [0.0, 0.1, 0.2, 0.3]


class Classifier(nn.Module):
    """images -> the head's logits (what the attacks differentiate)."""

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head.logits(self.model(x))


def stack_dataset(dataset) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor([int(y) for y in ys])


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def _features(model, x: Tensor, batch: int = 512) -> Tensor:
    return torch.cat([model(x[s]) for s in _batches(len(x), batch)])


def _attack(atk, x: Tensor, y: Tensor, batch: int, **kw) -> Tensor:
    return torch.cat([atk(x[s], y[s], **kw) for s in _batches(len(x), batch)])


def fgsm_errors(model, head, x: Tensor, y: Tensor, eps_list=EPS, batch: int = 256) -> dict:
    """Test error % under FGSM for each eps (eps = 0: clean)."""
    clf = Classifier(model, head).eval()
    out = {}
    for eps in eps_list:
        adv = x if eps == 0 else _attack(FGSM(clf, eps=eps), x, y, batch)
        with torch.no_grad():
            pred = torch.cat([head.predict(model(adv[s])) for s in _batches(len(x), 512)])
        out[float(eps)] = 100.0 * (pred != y).float().mean().item()
    return out


def eer(normal: Tensor, adversarial: Tensor) -> tuple[float, dict]:
    """Equal error rate of separating normal (positive, high score) from adversarial
    inputs by thresholding a score; also the ROC curve (scikit-learn)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    scores = torch.cat([normal, adversarial]).detach().double().cpu().numpy()
    truth = [1] * len(normal) + [0] * len(adversarial)
    fpr, tpr, _ = roc_curve(truth, scores)
    fnr = 1.0 - tpr
    i = int(abs(fnr - fpr).argmin())
    value = float((fpr[i] + fnr[i]) / 2.0)
    return value, {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": float(roc_auc_score(truth, scores))}


def verification(model, head, x: Tensor, y: Tensor, *, eps: float = 0.3, targeted: bool = False,
                 batch: int = 256) -> dict:
    """Adversarial verification: the likelihood score of the predicted class (head.score)
    on normal and FGSM inputs (targeted: towards the second most likely class)."""
    clf = Classifier(model, head).eval()
    atk = TargetedFGSM(clf, eps=eps) if targeted else FGSM(clf, eps=eps)
    adv = _attack(atk, x, y, batch)
    with torch.no_grad():
        f_clean, f_adv = _features(model, x), _features(model, adv)
        ls_clean, ls_adv = head.log_score(f_clean), head.log_score(f_adv)
        err = 100.0 * (head.predict(f_adv) != y).float().mean().item()
    rate, roc = eer(ls_clean, ls_adv)  # ROC on log-scores: same ordering, no underflow ties
    s_clean, s_adv = ls_clean.exp(), ls_adv.exp()
    return {"eps": eps, "targeted": targeted, "adversarial_error_percent": err, "eer_percent": 100.0 * rate,
            "roc": roc, "scores_normal": s_clean.tolist(), "scores_adversarial": s_adv.tolist()}


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


def compare_centers(a: Tensor, b: Tensor) -> dict:
    """Per-class cosine similarity and MSE (mean over feature dimensions) of two (K, D) center sets."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=1)
    mse = (a.double() - b.double()).pow(2).mean(1)
    return {"cosine": cos.tolist(), "mse": mse.tolist(), "mean_cosine": cos.mean().item(),
            "mean_mse": mse.mean().item()}


def centers_report(models: dict, x: Tensor, y: Tensor, *, batch: int = 256, num_classes: int = 10) -> dict:
    """The report's comparison.  ``models`` maps "A" (center loss), "B" (softmax)
    and optionally "L-GM" to (model, head).  Inverse adversaries: eps'=4/255,
    5 steps of 2/255 on the cross-entropy of the true label."""
    out = {}
    for name, (model, head) in models.items():
        clf = Classifier(model, head).eval()
        inv = _attack(InversePGD(clf), x, y, batch)
        clean_c = class_means(_features(model, x), y, num_classes)
        inv_c = class_means(_features(model, inv), y, num_classes)
        res = {"inverse vs clean": compare_centers(inv_c, clean_c)}
        if hasattr(head, "class_weights"):
            res["inverse vs weights"] = compare_centers(inv_c, head.class_weights().detach())
        if hasattr(head, "centers"):
            label = "inverse vs center-loss centers" if head.kind == "center" else "inverse vs L-GM means"
            res[label] = compare_centers(inv_c, head.centers().detach())
        out[name] = res
    out["claims"] = _claims(out)
    return out


def _claims(r: dict) -> list[dict]:
    """The report's qualitative claims, tested on our numbers (criteria stated in each row)."""
    claims = []
    a = r.get("A", {})
    if "inverse vs center-loss centers" in a:
        c = a["inverse vs center-loss centers"]
        w = a.get("inverse vs weights")
        ok = c["mean_cosine"] > 0.9 and (w is None or c["mean_mse"] <= w["mean_mse"])
        claims.append({"claim": "A: inverse-adversary centers are close to the center-loss centers (high cosine, low MSE)",
                       "criterion": "mean cosine > 0.9 and MSE no larger than vs the weights",
                       "measured": f"cosine {c['mean_cosine']:.3f}, MSE {c['mean_mse']:.4g}", "supported": bool(ok)})
    for m in ("A", "B"):
        res = r.get(m, {})
        if "inverse vs clean" in res and ("inverse vs center-loss centers" in res or m == "B"):
            clean = res["inverse vs clean"]
            ref = res.get("inverse vs center-loss centers")
            ok = clean["mean_cosine"] < 0.99 and (ref is None or clean["mean_cosine"] < ref["mean_cosine"])
            claims.append({"claim": f"{m}: inverse-adversary centers are only moderately similar to clean-feature centers",
                           "criterion": "mean cosine < 0.99" + (" and below the center-loss comparison" if ref else ""),
                           "measured": f"cosine {clean['mean_cosine']:.4f}, MSE {clean['mean_mse']:.4g}",
                           "supported": bool(ok)})
        if "inverse vs weights" in res and "inverse vs clean" in res:
            w, clean = res["inverse vs weights"], res["inverse vs clean"]
            ok = w["mean_cosine"] < clean["mean_cosine"] and w["mean_mse"] > clean["mean_mse"]
            claims.append({"claim": f"{m}: inverse-adversary centers are far from the final layer's weight rows",
                           "criterion": "lower cosine and higher MSE than vs the clean centers",
                           "measured": f"cosine {w['mean_cosine']:.3f}, MSE {w['mean_mse']:.4g}", "supported": bool(ok)})
    return claims


# ----------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def verification_figures(results: dict, out_dir: Path) -> list[str]:
    """Score histograms per model (paper Figs. 4, 6) and all ROC curves in one plot (Fig. 5)."""
    plt = _plt()
    files = []
    for name, r in results.items():
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.hist(r["scores_normal"], bins=40, range=(0, 1), alpha=0.6, label="normal")
        ax.hist(r["scores_adversarial"], bins=40, range=(0, 1), alpha=0.6, label="adversarial")
        ax.set_title(f"{name}: EER {r['eer_percent']:.1f}%")
        ax.set_xlabel("likelihood score of the predicted class")
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"hist_{name.replace(' ', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, r in results.items():
        ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], label=f"{name} (EER {r['eer_percent']:.1f}%)")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate (adversarial accepted)")
    ax.set_ylabel("true positive rate (normal accepted)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "roc.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return files + [str(path)]


def embedding_figure(model, head, x: Tensor, y: Tensor, path: Path, *, title: str = "", adv: Tensor | None = None,
                     max_points: int = 5000) -> str:
    """2-D features coloured by class (paper Fig. 1); for an L-GM head the learned
    log-likelihood over the plane, with the features of ``adv`` (e.g. FGSM) marked."""
    plt = _plt()
    f = _features(model, x[:max_points])
    if f.shape[1] != 2:
        raise ValueError(f"embedding figures need 2-D features, got {f.shape[1]}-D")
    fig, ax = plt.subplots(figsize=(5, 4.5))
    if getattr(head, "kind", "") == "lgm":
        lo, hi = f.min(0).values, f.max(0).values
        pad = 0.1 * (hi - lo)
        gx, gy = torch.meshgrid(torch.linspace(lo[0] - pad[0], hi[0] + pad[0], 200),
                                torch.linspace(lo[1] - pad[1], hi[1] + pad[1], 200), indexing="xy")
        with torch.no_grad():
            ll = head.log_likelihood(torch.stack([gx.flatten(), gy.flatten()], 1)).reshape(gx.shape)
        im = ax.contourf(gx.numpy(), gy.numpy(), ll.clamp_min(ll.max() - 30).numpy(), levels=30, cmap="Greys")
        fig.colorbar(im, ax=ax, label="log-likelihood")
    ax.scatter(f[:, 0], f[:, 1], c=y[: len(f)], cmap="tab10", s=2, alpha=0.6)
    if adv is not None:
        fa = _features(model, adv)
        ax.scatter(fa[:, 0], fa[:, 1], marker="x", c="red", s=25, label="FGSM examples")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------- reproduce
REPRODUCE_PRESETS = {
    # <= 10 minutes on 2 CPU cores: Fashion-MNIST subsets, 3 epochs per model (10 models).
    "quick": dict(train=dict(subset=8000, test_subset=2000, epochs=3), attack_subset=1000, embed_points=3000),
    # The paper's settings (MNIST when available, else Fashion-MNIST): full sets, 20 epochs; hours on a CPU.
    "paper": dict(train=dict(epochs=20, schedule="step", nesterov=False), attack_subset=None, embed_points=10000),
}

TABLE1_HEADS = {"softmax": dict(head="softmax"), "center": dict(head="center"),
                "lgm-a0": dict(head="lgm", alpha=0.0), "lgm-a0.3": dict(head="lgm", alpha=0.3),
                "lgm-a1": dict(head="lgm", alpha=1.0)}


def _pick_dataset(preset: str, data_dir) -> str:
    if preset != "paper":
        return "fashion-mnist"
    from .data import DatasetUnavailable, load_dataset

    try:
        load_dataset("mnist", False, data_dir=data_dir)
        return "mnist"
    except DatasetUnavailable:
        return "fashion-mnist"


def reproduce(out_dir, *, preset: str = "quick", data_dir=None, progress=print) -> dict:
    """Train every head (Table 1, 2-D and 100-D), then Table 6, verification
    (EERs, targeted FGSM), the centers analysis and the figures, into ``out_dir``
    with ``report.md``.  Finished checkpoints are reused."""
    from .data import load_dataset
    from .train import config_from_preset, evaluate, load_checkpoint, load_trained, train

    if preset not in REPRODUCE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(REPRODUCE_PRESETS)}")
    P = REPRODUCE_PRESETS[preset]
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    dataset = _pick_dataset(preset, data_dir)
    t_start = time.perf_counter()
    runs, reused = {}, 0
    for dim in (2, 100):
        for name, kw in TABLE1_HEADS.items():
            key = f"{name}-{dim}d"
            cfg = config_from_preset("report", dataset=dataset, data_dir=str(data_dir) if data_dir else None,
                                     feat_dim=dim, **P["train"], **kw)
            progress(f"training {key} ({cfg.epochs} epochs)")
            ck = out / "runs" / key / "checkpoint.pt"
            if ck.exists() and load_checkpoint(ck)["epoch"] >= cfg.epochs:
                reused += 1
            train(cfg, out / "runs" / key, resume=True, progress=False)
            runs[key] = load_trained(out / "runs" / key / "checkpoint.pt")[:3]
    test = load_dataset(dataset, False, data_dir=data_dir, subset=P["train"].get("test_subset"))
    results = {"preset": preset, "dataset": dataset, "table1": {}, "table6": {}, "verification": {}, "figures": []}
    for key, (model, head, cfg) in runs.items():
        results["table1"][key] = evaluate(model, head, test)["error_percent"]
    x, y = stack_dataset(test)
    if P["attack_subset"]:
        x, y = x[: P["attack_subset"]], y[: P["attack_subset"]]
    for name in ("softmax", "center", "lgm-a1"):
        progress(f"FGSM table and verification: {name}")
        model, head, _ = runs[f"{name}-100d"]
        results["table6"][name] = fgsm_errors(model, head, x, y)
        results["verification"][name] = verification(model, head, x, y, eps=0.3)
    progress("targeted FGSM against L-GM")
    model, head, _ = runs["lgm-a1-100d"]
    results["verification"]["lgm-a1 targeted"] = verification(model, head, x, y, eps=0.3, targeted=True)
    results["figures"] += verification_figures(results["verification"], out / "figures")
    progress("centers analysis (inverse adversaries)")
    results["centers"] = centers_report({"A": runs["center-100d"][:2], "B": runs["softmax-100d"][:2],
                                         "L-GM": runs["lgm-a1-100d"][:2]}, x, y)
    progress("embeddings")
    train_ds = load_dataset(dataset, True, data_dir=data_dir, subset=P["embed_points"])
    xe, ye = stack_dataset(train_ds)
    for name in ("softmax", "center", "lgm-a1"):
        model, head, _ = runs[f"{name}-2d"]
        adv = FGSM(Classifier(model, head).eval(), eps=0.1)(x[:30], y[:30]) if name == "lgm-a1" else None
        results["figures"].append(embedding_figure(model, head, xe, ye, out / "figures" / f"embed_{name}.png",
                                                   title=f"{name}, 2-D features ({dataset} train)", adv=adv))
    results["seconds"] = time.perf_counter() - t_start
    results["models_reused"] = reused
    slim = json.loads(json.dumps(results, default=float))
    for r in slim["verification"].values():
        r.pop("scores_normal"), r.pop("scores_adversarial"), r["roc"].pop("fpr"), r["roc"].pop("tpr")
    (out / "results.json").write_text(json.dumps(slim, indent=2))
    (out / "report.md").write_text(report_markdown(results))
    return results


def _ordering(values: dict, names: list[str]) -> str:
    order = sorted(names, key=lambda n: values[n])
    return " < ".join(order)


def report_markdown(r: dict) -> str:
    L = [f"# Reproduction report ({r['preset']} preset, {r['dataset']})", "",
         "Published numbers are the L-GM paper's (MNIST) and the inverse-adversary report's qualitative claims.",
         f"Ours: {r['dataset']}" + (" subsets; see the preset in lgm_ext/experiments.py" if r["preset"] == "quick" else "")
         + f". This invocation took {r['seconds'] / 60:.1f} min"
         + (f" ({r.get('models_reused', 0)} of {len(r['table1'])} models reused from earlier runs)." if r.get("models_reused")
            else " (every model trained in it)."), "",
         "## Table 1: test error (%)", "", "| head | ours 2-D | paper 2-D | ours 100-D | paper 100-D |", "|---|---|---|---|---|"]
    t1 = r["table1"]
    for name, (p2, p100) in PAPER["table1"].items():
        L.append(f"| {name} | {t1[name + '-2d']:.2f} | {p2} | {t1[name + '-100d']:.2f} | {p100} |")
    names = list(PAPER["table1"])
    for dim in ("2d", "100d"):
        ours = {n: t1[f"{n}-{dim}"] for n in names}
        paper = {n: PAPER["table1"][n][0 if dim == "2d" else 1] for n in names}
        best_ours, best_paper = min(ours, key=ours.get), min(paper, key=paper.get)
        L.append(f"\n{dim}: our ordering {_ordering(ours, names)}; paper {_ordering(paper, names)}. "
                 f"Paper's best ({best_paper}) is {'also' if best_ours == best_paper else 'not'} ours ({best_ours}).")
    L += ["", "## Table 6: test error (%) under FGSM (100-D)", "",
          "| head | " + " | ".join(f"eps={e} ours / paper" for e in EPS) + " |", "|---|" + "---|" * len(EPS)]
    for name, errs in r["table6"].items():
        cells = [f"{errs[e]:.2f} / {p}" for e, p in zip(EPS, PAPER["table6"][name])]
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    at03 = {n: r["table6"][n][0.3] for n in r["table6"]}
    L.append(f"\nAt eps=0.3 our ordering is {_ordering(at03, list(at03))}; the paper's is lgm-a1 < softmax < center.")
    L += ["", "## Adversarial verification (FGSM eps=0.3)", "",
          "| model | EER ours (%) | EER paper (%) | AUC | error on adversarial inputs (%) |", "|---|---|---|---|---|"]
    for name, v in r["verification"].items():
        paper = PAPER["eer"].get(name, PAPER["targeted"]["eer"] if "targeted" in name else "-")
        L.append(f"| {name} | {v['eer_percent']:.1f} | {paper} | {v['roc']['auc']:.3f} | {v['adversarial_error_percent']:.2f}"
                 + (f" (paper {PAPER['targeted']['error']})" if "targeted" in name else "") + " |")
    e = {n: r["verification"][n]["eer_percent"] for n in ("softmax", "center", "lgm-a1")}
    holds = e["lgm-a1"] < e["center"] < e["softmax"]
    L.append(f"\nPaper's ordering lgm-a1 < center < softmax: {'holds' if holds else 'does not hold'} "
             f"(ours: {_ordering(e, list(e))}). Scores: L-GM exp(-d) of the predicted class, center loss "
             "exp(-|x-c|^2/2), softmax the affinity through a sigmoid (ROC is unchanged by any monotone normalisation). "
             "Targeted FGSM uses L_cls per SPEC (the paper used L_GM).")
    L += ["", "![ROC](figures/roc.png)", "", "## Centers (inverse adversaries, eps'=4/255, 5 steps of 2/255; 100-D)", ""]
    for model_name, comps in r["centers"].items():
        if model_name == "claims":
            continue
        L += [f"### Model {model_name}", "", "| comparison | mean cosine | mean MSE | per-class cosine |", "|---|---|---|---|"]
        for comp, v in comps.items():
            L.append(f"| {comp} | {v['mean_cosine']:.4f} | {v['mean_mse']:.4g} | "
                     + ", ".join(f"{c:.3f}" for c in v["cosine"]) + " |")
        L.append("")
    L += ["### The report's claims", "", "| claim | criterion | measured | supported |", "|---|---|---|---|"]
    for c in r["centers"]["claims"]:
        L.append(f"| {c['claim']} | {c['criterion']} | {c['measured']} | {'yes' if c['supported'] else '**no**'} |")
    L += ["", "## Figures", ""] + [f"![{Path(f).stem}](figures/{Path(f).name.replace(' ', '%20')})"
                                    for f in r["figures"]] + [""]
    return "\n".join(L)

