"""The post-hoc detectors the out-of-distribution field runs (OpenOOD v1.5, pytorch-ood 0.4.0), on a trained
network's features, as the detection protocol measures and the adaptive attack differentiates them
(issue 35; docs/SPEC.md section 8).

Every detector here is a :class:`FeatureScore`: ``score(features)`` is higher for more normal inputs and
differentiable with respect to the features (what :class:`lgm_ext.attacks.AdaptivePGD` needs).  Fitting and
the formulas are pytorch-ood's (the lab's ``ood`` extra; the core never imports it):

- ``Energy`` (Liu et al. 2020), ``MaxLogit`` (Hendrycks et al. 2022) and ``max-softmax`` (Hendrycks and
  Gimpel 2017): pytorch-ood's ``EnergyBased.score``, ``MaxLogit.score`` and ``MaxSoftmax.score`` of the
  head's logits -- their own functions, differentiable as they are;
- ``KNN`` (Sun et al. 2022): pytorch-ood's ``KNN`` (k = :data:`KNN_K`, the paper's CIFAR-10 choice, on
  L2-normalised features) is fitted; its score -- minus the distance to the k-th nearest normalised
  training feature -- is evaluated in torch on the fitted bank (scikit-learn's index has no gradient),
  equal to ``KNN.predict_features`` (tests/test_baselines.py);
- ``ViM`` (Wang et al. 2022), for a head with a linear classifier (``fc``): pytorch-ood's ``ViM`` fits the
  principal subspace (d = :func:`vim_dim`) and alpha; its score is evaluated in torch from the fitted
  attributes (``predict_features`` runs under ``no_grad``), equal to ``ViM.predict_features``.

Ours, where the method is ours: the Mahalanobis detector (Lee et al. 2018) and its variant on L2-normalised
features are :class:`lgm_ext.LikelihoodDetector` fits (tied covariance; ranking as pytorch-ood's
``Mahalanobis``, tests/test_ood_adapters.py); an L-GM head's own likelihood and mixture score are
:meth:`lgm_ext.LikelihoodDetector.from_head`; Gaussians re-fitted post hoc to an L-GM network's features
(diagonal covariances) are :meth:`~lgm_ext.LikelihoodDetector.fit`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from lgm_ext import LikelihoodDetector

__all__ = ["KNN_K", "FeatureScore", "energy", "max_logit", "max_softmax", "knn", "vim", "vim_dim",
           "mahalanobis", "mahalanobis_l2", "likelihood"]

KNN_K = 50  # Sun et al. 2022's k for CIFAR-10 (pytorch-ood's default)


def _pytorch_ood():
    try:
        import pytorch_ood.detector as D
    except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
        raise ImportError("the baseline detectors need pytorch-ood: pip install pytorch-ood (the lab's 'ood' "
                          "extra)") from e
    return D


class FeatureScore:
    """A detector scoring features: ``score(features) -> (N,)``, higher = more normal, differentiable.

    ``threshold`` (None until set) is what :meth:`reject` and :class:`lgm_ext.attacks.AdaptivePGD` read;
    :meth:`calibrate` sets it at a false-rejection rate on clean features (the convention of
    :meth:`lgm_ext.LikelihoodDetector.calibrate`).  ``fitted`` is the pytorch-ood detector behind it, if any.
    """

    def __init__(self, name: str, score_fn: Callable[[Tensor], Tensor], fitted=None) -> None:
        self.name, self.score_fn, self.fitted = name, score_fn, fitted
        self.threshold: float | None = None
        self.fpr: float | None = None

    def score(self, features: Tensor) -> Tensor:
        return self.score_fn(features)

    def outlier_score(self, features: Tensor) -> Tensor:
        """``-score`` (pytorch-ood's direction: higher = more abnormal)."""
        return -self.score(features)

    def calibrate(self, clean_features: Tensor, fpr: float = 0.05) -> FeatureScore:
        from lgm_ext.detector import calibrated_threshold, check_fpr

        p = check_fpr(fpr)
        with torch.no_grad():
            self.threshold = calibrated_threshold(self.score(clean_features).detach().flatten().cpu(), p)
        self.fpr = p
        return self

    def reject(self, features: Tensor) -> Tensor:
        if self.threshold is None:
            raise ValueError("threshold is not set: call calibrate(clean_features, fpr) first")
        with torch.no_grad():
            return ~(self.score(features) >= self.threshold)

    def __repr__(self) -> str:
        return f"FeatureScore({self.name!r}, threshold={self.threshold})"


def energy(head) -> FeatureScore:
    """Minus the free energy of the head's logits, ``logsumexp(logits)`` (pytorch-ood ``EnergyBased``, T = 1)."""
    D = _pytorch_ood()
    return FeatureScore("Energy", lambda f: -D.EnergyBased.score(head.logits(f)))


def max_logit(head) -> FeatureScore:
    """The largest logit (pytorch-ood ``MaxLogit``)."""
    D = _pytorch_ood()
    return FeatureScore("MaxLogit", lambda f: -D.MaxLogit.score(head.logits(f)))


def max_softmax(head) -> FeatureScore:
    """The largest softmax probability of the head's logits (pytorch-ood ``MaxSoftmax``, T = 1)."""
    D = _pytorch_ood()
    return FeatureScore("max-softmax", lambda f: -D.MaxSoftmax.score(head.logits(f)))


def _normalised(z: Tensor) -> Tensor:
    return z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)  # pytorch-ood KNN's normalisation


def knn(fit_features: Tensor, fit_labels: Tensor, k: int = KNN_K) -> FeatureScore:
    """Sun et al.'s KNN: pytorch-ood's ``KNN(k, normalize=True)`` fitted on the training features; score =
    minus the distance of the normalised feature to its k-th nearest normalised training feature."""
    D = _pytorch_ood()
    if int((fit_labels >= 0).sum()) < k:
        raise ValueError(f"KNN with k = {k} needs at least {k} training features, got {int((fit_labels >= 0).sum())}")
    det = D.KNN(None, k=k, normalize=True).fit_features(fit_features.detach().cpu(), fit_labels.detach().cpu())
    bank = torch.as_tensor(det.knn._fit_X)  # the normalised training features scikit-learn indexed

    def score(f: Tensor) -> Tensor:
        z = _normalised(f)
        b = bank.to(device=z.device, dtype=z.dtype)
        d2 = (z.pow(2).sum(1, keepdim=True) - 2 * z @ b.T + b.pow(2).sum(1)).clamp_min(0.0)
        kth = d2.topk(k, dim=1, largest=False).values[:, -1]
        return -kth.clamp_min(1e-24).sqrt()

    return FeatureScore(f"KNN (k={k})", score, det)


def vim_dim(feat_dim: int) -> int:
    """ViM's principal-subspace dimension d for ``feat_dim``-dimensional features: half of them (the
    paper's ratio for its ViT, 512 of 768; 1,000 of 2,048 for BiT)."""
    return max(1, feat_dim // 2)


def vim(head, fit_features: Tensor, fit_labels: Tensor, d: int | None = None) -> FeatureScore:
    """Wang et al.'s ViM for a head with a linear classifier ``head.fc``: pytorch-ood's ``ViM`` fitted on
    the training features; score = ``logsumexp(W z + b) - alpha |P_perp (z - u)|`` (minus pytorch-ood's)."""
    D = _pytorch_ood()
    fc = getattr(head, "fc", None)
    if not isinstance(fc, torch.nn.Linear) or fc.bias is None:
        raise ValueError("ViM needs a head with a linear classifier with bias (head.fc)")
    d = vim_dim(fit_features.shape[1]) if d is None else d
    det = D.ViM(None, d=d, w=fc.weight, b=fc.bias).fit_features(fit_features.detach().cpu().float(),
                                                                 fit_labels.detach().cpu())
    w, b, u, p, alpha = det.w, det.b, det.u, det.principal_subspace, float(det.alpha)

    def score(f: Tensor) -> Tensor:
        dev, dt = f.device, f.dtype
        logits = f @ w.to(dev, dt).T + b.to(dev, dt)
        residual = ((f - u.to(dev, dt)) @ p.to(dev, dt)).norm(dim=-1)
        return torch.logsumexp(logits, dim=-1) - alpha * residual

    return FeatureScore(f"ViM (d={d})", score, det)


def mahalanobis(fit_features: Tensor, fit_labels: Tensor, num_classes: int) -> LikelihoodDetector:
    """Lee et al.'s Mahalanobis detector: class means and one tied covariance fitted on training features."""
    return LikelihoodDetector.fit(fit_features, fit_labels, "tied", num_classes=num_classes)


def mahalanobis_l2(fit_features: Tensor, fit_labels: Tensor, num_classes: int) -> FeatureScore:
    """The Mahalanobis detector on L2-normalised features (as KNN normalises them)."""
    det = LikelihoodDetector.fit(_normalised(fit_features), fit_labels, "tied", num_classes=num_classes)
    return FeatureScore("Mahalanobis (L2-normalised)", lambda f: det.score(_normalised(f)), det)


def likelihood(fit_features: Tensor, fit_labels: Tensor, num_classes: int, covariance: str = "diag",
               score: str = "likelihood") -> LikelihoodDetector:
    """Class-conditional Gaussians re-fitted post hoc (``covariance``: diag or tied), scored by ``score``."""
    return LikelihoodDetector.fit(fit_features, fit_labels, covariance, num_classes=num_classes, score=score)

