"""Between :class:`lgm_ext.LikelihoodDetector` and pytorch-ood (``pip install pytorch-ood``, an optional
dependency of the lab; the core ``lgm_ext`` never imports it): :class:`PytorchOODLikelihood`, our detector *as* a
pytorch-ood detector (a ``pytorch_ood.api.FeaturesDetector``: ``fit``/``fit_features``,
``predict``/``predict_features``), in pytorch-ood's sign convention -- ``predict`` returns outlier scores, higher =
more abnormal, i.e. ``-LikelihoodDetector.score`` -- so it drops into pytorch-ood's metrics and benchmarks.
(pytorch-ood's own detectors with our threshold: the members of :mod:`lgm_ext.detectors`, each tested against its
pytorch-ood counterpart, calibrate, save and deploy.)

Directions: pytorch-ood's scores are outlier scores (higher = more abnormal); ours (``score``) are
normality scores (higher = more normal): ``score = -outlier_score`` on both classes here.  ``fpr`` is the
fraction of clean inputs rejected (false rejections, clean = positive); pytorch-ood's and OpenOOD's
"FPR@95TPR" (abnormal = positive) is the fraction of clean inputs rejected while 95% of abnormal ones are.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lgm_ext import LikelihoodDetector

try:
    from pytorch_ood.api import FeaturesDetector, ModelNotSetException, RequiresFittingException
    from pytorch_ood.utils import extract_features
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("lgm_lab.ood_adapters needs pytorch-ood: pip install pytorch-ood (the lab's 'ood' extra)") from e

__all__ = ["PytorchOODLikelihood"]


class PytorchOODLikelihood(FeaturesDetector):
    """A :class:`lgm_ext.LikelihoodDetector` behind pytorch-ood's ``FeaturesDetector`` API.

    ``predict_features(z)`` = ``detector.outlier_score(z)`` = ``-detector.score(z)`` (higher = more
    abnormal, pytorch-ood's convention); ``predict(x)`` applies ``encoder`` first.  ``fit_features(z, y)``
    fits the Gaussians (``LikelihoodDetector.fit`` with this adapter's ``covariance``, ``ridge`` and
    ``score``; a wrapped detector is refitted in place) on the in-distribution samples -- as pytorch-ood's
    detectors do, samples labelled < 0 (pytorch-ood's mark of OOD samples) are left out; ``fit(loader)``
    extracts the features with ``encoder`` first.  With ``covariance="tied"`` this is Lee et al.'s
    Mahalanobis detector, ranking features exactly as ``pytorch_ood.detector.Mahalanobis`` does.

    Args:
        encoder: images -> (N, D) features, for ``predict``/``fit``; None to use only the ``*_features``
            methods.
        detector: a detector to wrap (fitted already, e.g. ``LikelihoodDetector.from_head(head)``); None: fit
            one with ``fit``/``fit_features``.
        covariance: the covariance kind a fit uses (:data:`lgm_ext.detector.COVARIANCES`).
        ridge: the fit's relative ridge.
        score: the score kind of a fitted detector (:data:`lgm_ext.detector.SCORES`).
    """

    requires_fit = True

    def __init__(self, encoder=None, *, detector: LikelihoodDetector | None = None, covariance: str = "tied",
                 ridge: float = 1e-6, score: str = "likelihood") -> None:
        super().__init__()
        if detector is not None and not isinstance(detector, LikelihoodDetector):
            raise TypeError(f"detector must be an lgm_ext.LikelihoodDetector or None, got {type(detector).__name__}")
        if encoder is not None and not callable(encoder):
            raise TypeError(f"encoder must be callable (images -> features) or None, got {type(encoder).__name__}")
        self.encoder, self.detector = encoder, detector
        self.covariance, self.ridge, self.score_name = covariance, ridge, score

    def fit_features(self, z: Tensor, y: Tensor) -> PytorchOODLikelihood:
        """Fit the Gaussians to features of the known samples (labels >= 0).

        Args:
            z: (N, D) features.
            y: (N,) integer labels; < 0 marks an OOD sample (left out).

        Returns:
            self.
        """
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor of labels, got {type(y).__name__}")
        known = y >= 0
        if not bool(known.any()):
            raise ValueError("y: no in-distribution sample (every label is < 0)")
        z, y = z[known], y[known]
        if self.detector is None:
            self.detector = LikelihoodDetector.fit(z, y, self.covariance, ridge=self.ridge, score=self.score_name)
        else:
            self.detector.fit(z, y, self.covariance, ridge=self.ridge, score=self.score_name)  # in place
        return self

    def fit(self, data_loader) -> PytorchOODLikelihood:
        """Extract features of ``data_loader``'s ``(x, y)`` batches with ``encoder`` and :meth:`fit_features`.

        Args:
            data_loader: yields ``(x, y)`` batches.

        Returns:
            self.
        """
        if self.encoder is None:
            raise ModelNotSetException("PytorchOODLikelihood.fit needs an encoder (images -> features)")
        z, y = extract_features(data_loader, self.encoder, self.device)
        return self.fit_features(z, y)

    def predict_features(self, z: Tensor) -> Tensor:
        """Outlier scores of features: ``-detector.score(z)``, higher = more abnormal.

        Args:
            z: (N, D) features.

        Returns:
            (N,) outlier scores.
        """
        if self.detector is None:
            raise RequiresFittingException()
        return self.detector.outlier_score(z)

    def predict(self, x: Tensor) -> Tensor:
        """Outlier scores of inputs: ``predict_features(encoder(x))``.

        Args:
            x: a batch for ``encoder``.

        Returns:
            (N,) outlier scores, higher = more abnormal.
        """
        if self.encoder is None:
            raise ModelNotSetException()
        return self.predict_features(self.encoder(x))

    def to(self, device) -> PytorchOODLikelihood:
        """Move the encoder and the detector's parameters to ``device``; returns self."""
        if isinstance(self.encoder, nn.Module):
            self.encoder.to(device)
        if self.detector is not None:
            self.detector.to(device)
        self._device = torch.device(device)
        return self
