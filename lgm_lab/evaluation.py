"""Evaluation of a trained feature network + head on a dataset: error, confusion matrix, log-likelihoods."""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["evaluate", "error_percent"]


def error_percent(correct: int, n: int) -> float:
    """Test error in % from the number of correct predictions among ``n`` (0 for no samples)."""
    return 100.0 * (1.0 - correct / max(n, 1))


@torch.no_grad()
def evaluate(model: nn.Module, head: nn.Module, dataset: Dataset, *, batch_size: int = 512,
             device: str = "cpu", tick=None) -> dict:
    """Test error (%), confusion matrix (rows: true class), and for heads with a
    likelihood (L-GM, center) a summary of the per-sample log-likelihood.  ``tick(n)`` after each
    batch of n images (progress bars)."""
    was = model.training, head.training
    model.eval(), head.eval()
    num_classes = head.num_classes
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    lls = []
    t0 = time.perf_counter()
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        feats = model(images.to(device))
        pred = head.predict(feats).cpu()
        confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
        lls.append(head.log_likelihood(feats).cpu())
        if tick is not None:
            tick(len(labels))
    n = int(confusion.sum())
    out = {
        "samples": n,
        "error_percent": error_percent(confusion.diag().sum().item(), n),
        "confusion": confusion.tolist(),
        "images_per_second": n / (time.perf_counter() - t0),
    }
    if lls:
        ll = torch.cat(lls).double()
        q = torch.quantile(ll, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
        out["log_likelihood"] = {"mean": ll.mean().item(), "std": ll.std().item() if ll.numel() > 1 else 0.0,
                                 "min": ll.min().item(), "p05": q[0], "median": q[1], "p95": q[2]}
    model.train(was[0]), head.train(was[1])
    return out
