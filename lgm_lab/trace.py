"""What training records about the head and the features besides the per-epoch metrics: the head's
log-variances (:func:`log_var_stats`, a column of metrics.csv) and a trace point every :data:`TRACE_EVERY` SGD
steps (:func:`trace_point`, trace.csv), which shows how the head's variances follow -- or do not follow -- the
features within an epoch (docs/likelihood)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["log_var_stats", "TRACE_EVERY", "TRACE_FIELDS", "trace_point", "class_statistics"]


def log_var_stats(head: nn.Module) -> dict:
    """Mean and minimum of a head's learned log-variances as its forward uses them (clamped), to follow a
    collapse of the variances epoch by epoch; {} for a head without them."""
    clamped = getattr(head, "clamped_log_var", None)
    lv = clamped() if clamped is not None else None
    if lv is None:
        return {}
    lv = lv.detach().double()
    return {"log_var_mean": lv.mean().item(), "log_var_min": lv.min().item()}


#: Every this many SGD steps (and after the first) training records a trace point: how the head's variances and the
#: features move within an epoch, which the per-epoch metrics are too coarse to show (trace.csv, the checkpoint's
#: "trace"; docs/likelihood/ draws it).
TRACE_EVERY = 32
#: The columns of trace.csv: the head's log-variances as its forward uses them (mean, minimum) and as stored
#: (``log_var_raw_mean``: below the clamp when a rule pushes them there), the log of the training batch's own
#: per-class variances around its class means (unbiased, mean over classes with two images or more and over
#: dimensions: what Gaussians fitted to these features would have), and the batch's mean feature norm.
TRACE_FIELDS = ("steps", "log_var_mean", "log_var_min", "log_var_raw_mean", "batch_log_var_mean",
                "feature_norm_mean")


@torch.no_grad()
def class_statistics(features: Tensor, labels: Tensor, num_classes: int | None = None):
    """Per class of (N, D) ``features`` with (N,) ``labels`` (float64): the counts (K,), the means (K, D) and the
    unbiased per-dimension variances around them (K, D; 0 for a class with fewer than two features)."""
    x = features.detach().to(torch.float64)
    y = labels.detach().to(x.device).long()
    k = int(y.max()) + 1 if num_classes is None else num_classes
    counts = torch.bincount(y, minlength=k).to(x.dtype)
    means = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x) \
        / counts.clamp(min=1)[:, None]
    sq = torch.zeros_like(means).index_add_(0, y, (x - means[y]) ** 2)
    return counts, means, sq / (counts - 1).clamp(min=1)[:, None]


@torch.no_grad()
def trace_point(head: nn.Module, features: Tensor, labels: Tensor) -> dict:
    """One trace point (:data:`TRACE_FIELDS` but ``steps``) from a training batch's features and labels and the
    head as it is now; the head's columns only for a head with log-variances."""
    counts, _means, var = class_statistics(features, labels)
    many = counts >= 2
    out = {"feature_norm_mean": features.detach().double().norm(dim=1).mean().item()}
    if bool(many.any()):
        out["batch_log_var_mean"] = var[many].clamp(min=torch.finfo(var.dtype).tiny).log().mean().item()
    out.update(log_var_stats(head))
    raw = getattr(head, "log_var", None)
    if isinstance(raw, Tensor):
        out["log_var_raw_mean"] = raw.detach().double().mean().item()
    return out
