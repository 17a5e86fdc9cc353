"""A detector of the family seen as a score of features alone (what an attack or a measurement that holds only
features needs)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Detector

__all__ = ["OnFeatures"]


class OnFeatures:
    """A detector seen as a score of features alone: for a member that reads logits, ``classifier`` (the head's
    features -> logits map, e.g. ``head.logits``) computes them from the features, differentiably.  What an
    attack or a measurement that holds only features needs (``score(features)``, ``threshold``).

    ``threshold`` reads and sets the detector's; :meth:`calibrate`, :meth:`reject`, :meth:`outlier_score` and
    :meth:`relative_to_threshold` take features and pass the logits on.

    Args:
        detector: a detector of the family.
        classifier: features -> logits (needed when the detector reads logits).
    """

    def __init__(self, detector: Detector, classifier=None) -> None:
        if not isinstance(detector, Detector):
            raise TypeError(f"detector must be a detector of lgm_ext.detectors, got {type(detector).__name__}")
        if "logits" in detector.inputs and not callable(classifier):
            raise ValueError(f"{detector.name} reads logits: give classifier (features -> logits, e.g. head.logits)")
        self.detector, self.classifier = detector, classifier
        self.inputs = ("features",)

    name = property(lambda self: self.detector.name)
    feat_dim = property(lambda self: self.detector.feat_dim if "features" in self.detector.inputs else None)
    num_classes = property(lambda self: self.detector.num_classes)
    fpr = property(lambda self: self.detector.fpr)

    @property
    def threshold(self) -> float | None:
        return self.detector.threshold

    @threshold.setter
    def threshold(self, value) -> None:
        self.detector.threshold = value

    def _args(self, features: Tensor) -> tuple[Tensor | None, Tensor | None]:
        reads = self.detector.inputs
        return (features if "features" in reads else None,
                self.classifier(features) if "logits" in reads else None)

    def score(self, features: Tensor) -> Tensor:
        return self.detector.score(*self._args(features))

    def outlier_score(self, features: Tensor) -> Tensor:
        return -self.score(features)

    def relative_to_threshold(self, features: Tensor) -> Tensor:
        return self.detector.relative_to_threshold(*self._args(features))

    def reject(self, features: Tensor) -> Tensor:
        return self.detector.reject(*self._args(features))

    def calibrate(self, features: Tensor, fpr: float = 0.05) -> OnFeatures:
        with torch.no_grad():
            f, lg = self._args(features)
        self.detector.calibrate(f, fpr, logits=lg)
        return self

    def __repr__(self) -> str:
        return f"OnFeatures({self.detector!r})"
