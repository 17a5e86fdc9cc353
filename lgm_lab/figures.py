"""Figures of the reproduction (matplotlib, headless): verification histograms
and ROC curves (paper Figs. 4-6), p_max histograms (Fig. 3), 2-D embeddings with
the L-GM likelihood map (Fig. 1), training curves, confusion matrices and the
detectors' ROC curves per abnormal set (issue 25).

Every function takes the output format (``png``, ``pdf`` or ``svg``; vector
formats for papers) and returns the paths it wrote."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .run_folder import write_atomically
from .tensors import features as _features

__all__ = ["FORMATS", "budget_figure",
           "verification_figures", "embedding_figure", "pmax_figure", "training_curves_figure",
           "confusion_figure", "detection_roc_figure"]

FORMATS = ("png", "pdf", "svg")


def _path(path: Path, fmt: str | None) -> Path:
    """``path`` with the suffix of ``fmt`` (None: keep the path's own suffix, else png)."""
    path = Path(path)
    own = path.suffix.lstrip(".")
    if fmt is None:
        fmt = own if own in FORMATS else "png"
    if fmt not in FORMATS:
        raise ValueError(f"figure format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    # a dot inside a name (hist_lgm-a0.3) is part of the name, not a suffix to replace
    return path.with_suffix("." + fmt) if own in FORMATS else path.with_name(path.name + "." + fmt)


def _save(fig, path: Path) -> str:
    """Save atomically (a temporary in the folder, then a rename): a symbolic link at ``path`` is replaced,
    never followed out of the folder."""
    plt = _plt()
    fig.tight_layout()
    fmt = path.suffix.lstrip(".")
    write_atomically(path, lambda f: fig.savefig(f, format=fmt, dpi=150 if fmt == "png" else None,
                                                 bbox_inches="tight"))
    plt.close(fig)
    return str(path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _hist_range(*arrays, lo_q: float = 0.005):
    """A common histogram range that drops the extreme 0.5% on the low side (log-scores have long tails)."""
    v = torch.cat([torch.as_tensor(a, dtype=torch.float64) for a in arrays])
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return None
    lo, hi = torch.quantile(v, lo_q).item(), v.max().item()
    return (lo, hi) if hi > lo else None


def verification_figures(results: dict, out_dir: Path, fmt: str = "png") -> list[str]:
    """Histograms of the default log-score per model on normal and FGSM inputs (paper Figs. 4, 6; logs so
    the mass is not in one bin) and all ROC curves in one plot (Fig. 5)."""
    _path(Path("x"), fmt)
    plt = _plt()
    files = []
    for name, r in results.items():
        normal, adv = r["log_scores_normal"], r["log_scores_adversarial"]
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        rng = _hist_range(normal, adv)
        ax.hist(normal, bins=50, range=rng, alpha=0.6, label="normal")
        ax.hist(adv, bins=50, range=rng, alpha=0.6, label="FGSM eps=0.3" + (" (targeted)" if r["targeted"] else ""))
        ax.set_title(f"{name}: EER {r['eer_percent']:.1f}%")
        ax.set_xlabel("log-score of the predicted class")
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
        files.append(_save(fig, _path(Path(out_dir) / f"hist_{name.replace(' ', '_')}", fmt)))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, r in results.items():
        ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], label=f"{name} (EER {r['eer_percent']:.1f}%)")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate (adversarial accepted)")
    ax.set_ylabel("true positive rate (normal accepted)")
    ax.set_title("adversarial verification ROC")
    ax.legend(fontsize=7)
    return files + [_save(fig, _path(Path(out_dir) / "roc", fmt))]


def pmax_figure(results: dict, path: Path, fmt: str | None = None) -> str:
    """Paper Fig. 3: histograms of the maximum posterior p_max on FGSM inputs, one panel per model."""
    path = _path(path, fmt)
    plt = _plt()
    names = [n for n, r in results.items() if "max_posterior" in r.get("scores", {}) and not r["targeted"]]
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        p = torch.tensor(results[name]["scores"]["max_posterior"]["adversarial"]).exp()
        ax.hist(p.numpy(), bins=20, range=(0, 1), color="tab:red", alpha=0.7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("max posterior p_max on FGSM inputs")
    axes[0][0].set_ylabel("images")
    return _save(fig, path)


def embedding_figure(model, head, x: Tensor, y: Tensor, path: Path, *, title: str = "", adv: Tensor | None = None,
                     max_points: int = 5000, class_names=None, fmt: str | None = None) -> str:
    """2-D features coloured by class (paper Fig. 1) with a legend of ``class_names``; for an L-GM
    head the learned log-likelihood over the plane, with the features of ``adv`` (e.g. FGSM) marked."""
    plt = _plt()
    path = _path(path, fmt)
    f = _features(model, x[:max_points]).cpu()
    y = y[: len(f)].cpu()
    if f.shape[1] != 2:
        raise ValueError(f"embedding figures need 2-D features, got {f.shape[1]}-D")
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    if getattr(head, "density_map", False):
        lo, hi = f.min(0).values, f.max(0).values
        pad = 0.1 * (hi - lo)
        gx, gy = torch.meshgrid(torch.linspace(lo[0] - pad[0], hi[0] + pad[0], 200),
                                torch.linspace(lo[1] - pad[1], hi[1] + pad[1], 200), indexing="xy")
        dev = next(head.parameters()).device
        with torch.no_grad():
            grid = torch.stack([gx.flatten(), gy.flatten()], 1).to(dev)
            ll = head.log_likelihood(grid).reshape(gx.shape).cpu()
        im = ax.contourf(gx.numpy(), gy.numpy(), ll.clamp_min(ll.max() - 30).numpy(), levels=30, cmap="Greys")
        fig.colorbar(im, ax=ax, label="log-likelihood (clipped 30 below the peak)")
    cmap = plt.get_cmap("tab10")
    k = int(y.max().item()) + 1 if len(y) else 0
    names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
    for c in range(k):
        m = y == c
        if m.any():
            ax.scatter(f[m, 0], f[m, 1], color=cmap(c % 10), s=2, alpha=0.6,
                       label=names[c] if c < len(names) else str(c))
    if adv is not None:
        fa = _features(model, adv).cpu()
        ax.scatter(fa[:, 0], fa[:, 1], marker="x", c="red", s=25, label="FGSM examples")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, fontsize=7, markerscale=4, frameon=False)
    ax.set_xlabel("feature 1")
    ax.set_ylabel("feature 2")
    ax.set_title(title)
    return _save(fig, path)


def training_curves_figure(runs: dict, path: Path, fmt: str | None = None) -> str:
    """Training loss and test error per epoch (from each run's ``metrics.json``), one line per run:
    ``runs`` maps a label to the list of per-epoch records that ``lgm train`` writes."""
    plt = _plt()
    path = _path(path, fmt)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    for name, hist in runs.items():
        ep = [h["epoch"] for h in hist]
        a1.plot(ep, [h["train_loss"] for h in hist], marker="o", ms=3, label=name)
        a2.plot(ep, [h["test_error_percent"] for h in hist], marker="o", ms=3, label=name)
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss (the head's objective)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("test error (%)")
    a2.legend(fontsize=7)
    for a in (a1, a2):
        a.grid(alpha=0.3)
    return _save(fig, path)


def confusion_figure(confusion, class_names, path: Path, *, title: str = "", fmt: str | None = None) -> str:
    """The confusion matrix (rows: true class, columns: predicted) with the class names, as row-normalized
    percentages with the counts written in each cell."""
    plt = _plt()
    path = _path(path, fmt)
    cm = torch.as_tensor(confusion, dtype=torch.float64)
    pct = 100.0 * cm / cm.sum(1, keepdim=True).clamp_min(1)
    k = cm.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k))
    im = ax.imshow(pct.numpy(), cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, label="% of the true class")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=6,
                    color="white" if pct[i, j] > 60 else "black")
    names = list(class_names)
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return _save(fig, path)


def detection_roc_figure(curves: dict, path: Path, *, title: str = "", fmt: str | None = None) -> str:
    """ROC curves of detectors, one panel per abnormal set: ``curves`` maps a set's name to
    {detector: {"fpr", "tpr", "auc"}} (positives = clean inputs, accepted; "fpr" = abnormal inputs accepted)."""
    plt = _plt()
    path = _path(path, fmt)
    names = list(curves)
    cols = min(3, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.axis("off")
            continue
        for det, roc in curves[names[i]].items():
            ax.plot(roc["fpr"], roc["tpr"], lw=1.2, label=f"{det} ({100 * roc['auc']:.1f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(names[i], fontsize=9)
        ax.set_xlabel("abnormal inputs accepted", fontsize=8)
        ax.set_ylabel("clean inputs accepted", fontsize=8)
        ax.legend(fontsize=5.5, title="detector (AUROC %)", title_fontsize=6)
    if title:
        fig.suptitle(f"detection ROC, {title}", fontsize=10)
    return _save(fig, path)


def budget_figure(points: list[dict], path: Path, fmt: str | None = None) -> str:
    """The budget curve (issue 24): test error, verification EER (the head's score and the max posterior) and
    compactness against SGD steps (log scale), one colour per head, solid for the larger batch and dashed for
    the smaller; the band is the seed spread (mean ± std) where a point has several seeds."""
    plt = _plt()
    path = _path(path, fmt)
    panels = [("error", "test error (%)"), ("eer", "FGSM verification EER (%), the head's score"),
              ("eer_max_posterior", "FGSM verification EER (%), max posterior"),
              ("compactness", "compactness (lower = tighter)")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    heads = sorted({p["head"] for p in points})
    batches = sorted({p["batch"] for p in points}, reverse=True)
    cmap = plt.get_cmap("tab10")
    for ax, (key, label) in zip(axes.flat, panels):
        for hi, head in enumerate(heads):
            for bi, batch in enumerate(batches):
                steps = sorted({p["steps"] for p in points if p["head"] == head and p["batch"] == batch and key in p})
                if not steps:
                    continue
                vals = [torch.tensor([p[key] for p in points if p["head"] == head and p["batch"] == batch
                                      and p["steps"] == s and key in p], dtype=torch.float64) for s in steps]
                mean = [v.mean().item() for v in vals]
                std = [v.std().item() if len(v) > 1 else 0.0 for v in vals]
                ax.plot(steps, mean, marker="o", ms=3, color=cmap(hi), linestyle="-" if bi == 0 else "--",
                        label=f"{head}, batch {batch}")
                if any(std):
                    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                    color=cmap(hi), alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("SGD steps")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def variance_trace_figure(traces: dict, path: Path, *, labels: dict | None = None, bounds: dict | None = None,
                          fmt: str | None = None) -> str:
    """The head's log-variances over training against the features' own (issue 45): one panel per rule
    (``traces`` = ``{rule: {seed: [trace point, ...]}}``, points of ``lgm_lab.train.TRACE_FIELDS``), the head's
    mean log-variance as its forward uses it (solid), as stored where it differs (dotted) and the training
    batch's per-class log-variance (dashed), one colour per seed; ``bounds[rule]``: the clamp's lower end -B, drawn
    where it is within the panel's range."""
    plt = _plt()
    path = _path(path, fmt)
    n = max(1, len(traces))
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (rule, seeds) in zip(axes.flat, traces.items()):
        for i, (seed, points) in enumerate(sorted(seeds.items())):
            steps = [p["steps"] for p in points]
            for key, style, what in (("log_var_mean", "-", "head"), ("log_var_raw_mean", ":", "head, stored"),
                                     ("batch_log_var_mean", "--", "features")):
                vals = [p.get(key) for p in points]
                if any(v is None for v in vals) or not vals:
                    continue
                if key == "log_var_raw_mean" and all(abs(a - b) < 1e-9 for a, b in
                                                     zip(vals, [p["log_var_mean"] for p in points])):
                    continue
                ax.plot(steps, vals, style, color=cmap(i), lw=1, label=f"seed {seed}: {what}")
        bound = (bounds or {}).get(rule)
        if bound is not None and ax.get_ylim()[0] <= -bound:
            ax.axhline(-bound, color="grey", lw=0.8, ls="-.", label=f"clamp -{bound:g}")
        ax.set_title((labels or {}).get(rule, rule), fontsize=7)
        ax.set_xlabel("SGD step", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(traces):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("mean log-variance", fontsize=7)
    if traces:
        axes[0][0].legend(fontsize=5)
    return _save(fig, path)
