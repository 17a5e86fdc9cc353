"""The detection metrics and batch helpers the measurements share (AUROC, AUPR, FPR at 95% TPR in both of the
field's conventions, EER, rejection at a calibrated threshold, how operating points are named; attacks over
batches), below both the detection protocol (:mod:`lgm_lab.detection_protocol`) and the experiments
(:mod:`lgm_lab.experiments.measure` re-exports them), so that neither imports the other."""
from __future__ import annotations

import torch
from torch import Tensor

from .tensors import batches

__all__ = ["attack_in_batches", "eer", "fpr_at_tpr", "rejection_rate", "operating_point_key", "detection_metrics"]


def attack_in_batches(atk, x: Tensor, y: Tensor, batch: int, tick=None, **kw) -> Tensor:
    """``atk(x, y)`` over ``x`` in batches; ``tick(n)`` after each batch of n images (progress bars)."""
    out = []
    for s in batches(len(x), batch):
        out.append(atk(x[s], y[s], **kw))
        if tick is not None:
            tick(s.stop - s.start)
    return torch.cat(out)


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


def fpr_at_tpr(normal: Tensor, abnormal: Tensor, tpr: float = 0.95, *, positive: str = "in") -> float:
    """FPR at ``tpr`` TPR, in either of the field's two conventions (scikit-learn's ROC, no point dropped):

    - ``positive="in"`` (Liang et al. 2018, Lee et al. 2018's Mahalanobis paper): the normal inputs are the
      positives (high score); the fraction of ``abnormal`` inputs *accepted* (score >= t) at the highest
      threshold t that accepts at least a fraction ``tpr`` of the ``normal`` ones;
    - ``positive="out"`` (OpenOOD v1.5, pytorch-ood): the abnormal inputs are the positives (low score); the
      fraction of ``normal`` inputs *rejected* (score <= t) at the lowest threshold that rejects at least a
      fraction ``tpr`` of the abnormal ones.

    The two are different numbers on the same scores: compare like with like."""
    from sklearn.metrics import roc_curve

    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    if positive not in ("in", "out"):
        raise ValueError(f"positive must be 'in' (normal inputs are the positives) or 'out', got {positive!r}")
    scores = torch.cat([normal, abnormal]).detach().double().cpu().numpy()
    truth = [1] * len(normal) + [0] * len(abnormal)
    if positive == "out":
        scores, truth = -scores, [1 - t for t in truth]
    fpr, tp, _ = roc_curve(truth, scores, drop_intermediate=False)
    return float(fpr[int((tp >= tpr - 1e-12).argmax())])


def rejection_rate(scores: Tensor, threshold: float) -> float:
    """The fraction of inputs rejected at ``threshold``: ``not score >= threshold`` (NaN is rejected)."""
    return (~(scores.detach() >= threshold)).double().mean().item() if len(scores) else float("nan")


def operating_point_key(fpr: float) -> str:
    """How results name the operating point calibrated for a false-rejection rate ``fpr``: "5" for 0.05."""
    return f"{100 * fpr:g}"


def detection_metrics(normal: Tensor, abnormal: Tensor, thresholds=None) -> tuple[dict, dict]:
    """Telling ``normal`` inputs (high score) from ``abnormal`` ones by a score, in %:

    - ``auroc``; ``aupr_in`` (average precision with the normal inputs as the positives) and ``aupr_out``
      (the abnormal ones as the positives, ranked by ``-score``), scikit-learn's ``average_precision_score``;
    - ``fpr95_in``: abnormal inputs accepted while 95% of normal ones are (normal = positive; Lee et al.
      2018), and ``fpr95_out``: normal inputs rejected while 95% of abnormal ones are (abnormal = positive;
      OpenOOD, pytorch-ood) -- :func:`fpr_at_tpr`;
    - ``eer``;
    - given ``thresholds`` (a number, or ``{fpr: threshold}`` of thresholds calibrated for false-rejection
      rates on other clean inputs), ``rejected``: ``{operating_point_key(fpr): % of abnormal inputs
      rejected}`` (a single number is keyed "at").

    Also returns the ROC curve (fpr, tpr, auc) of :func:`eer`."""
    from sklearn.metrics import average_precision_score

    rate, roc = eer(normal, abnormal)
    scores = torch.cat([normal, abnormal]).detach().double().cpu().numpy()
    truth = [1] * len(normal) + [0] * len(abnormal)
    out = {"auroc": 100.0 * roc["auc"],
           "aupr_in": 100.0 * float(average_precision_score(truth, scores)),
           "aupr_out": 100.0 * float(average_precision_score([1 - t for t in truth], -scores)),
           "fpr95_in": 100.0 * fpr_at_tpr(normal, abnormal, positive="in"),
           "fpr95_out": 100.0 * fpr_at_tpr(normal, abnormal, positive="out"),
           "eer": 100.0 * rate, "n_normal": len(normal), "n_abnormal": len(abnormal)}
    if thresholds is not None:
        if not isinstance(thresholds, dict):
            thresholds = {"at": thresholds}
        out["rejected"] = {k if isinstance(k, str) else operating_point_key(k): 100.0 * rejection_rate(abnormal, t)
                           for k, t in thresholds.items()}
    return out, roc
