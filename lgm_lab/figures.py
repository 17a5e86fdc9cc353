"""Figures of the reproduction (matplotlib, headless): verification histograms
and ROC curves (paper Figs. 4-6) and 2-D embeddings with the L-GM likelihood
map (paper Fig. 1)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .tensors import features as _features

__all__ = ["verification_figures", "embedding_figure", "pmax_figure"]


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


def verification_figures(results: dict, out_dir: Path) -> list[str]:
    """Histograms of the default log-score per model on normal and FGSM inputs (paper Figs. 4, 6; logs so
    the mass is not in one bin) and all ROC curves in one plot (Fig. 5)."""
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
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "roc.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return files + [str(path)]


def pmax_figure(results: dict, path: Path) -> str:
    """Paper Fig. 3: histograms of the maximum posterior p_max on FGSM inputs, one panel per model."""
    plt = _plt()
    names = [n for n, r in results.items() if "max_posterior" in r.get("scores", {}) and not r["targeted"]]
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        p = torch.tensor(results[name]["scores"]["max_posterior"]["adversarial"]).exp()
        ax.hist(p.numpy(), bins=20, range=(0, 1), color="tab:red", alpha=0.7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("p_max on FGSM inputs")
    axes[0][0].set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


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
