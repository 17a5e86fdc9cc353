"""Between :class:`lgm_ext.LikelihoodDetector` and pytorch-ood (``pip install pytorch-ood``, an optional
dependency of the lab; the core ``lgm_ext`` never imports it).

- :class:`PytorchOODLikelihood`: our detector *as* a pytorch-ood detector (a
  ``pytorch_ood.api.FeaturesDetector``: ``fit``/``fit_features``, ``predict``/``predict_features``), in
  pytorch-ood's sign convention -- ``predict`` returns outlier scores, higher = more abnormal, i.e.
  ``-LikelihoodDetector.score`` -- so it drops into pytorch-ood's metrics and benchmarks.
- :class:`CalibratedOODDetector`: any pytorch-ood detector that scores features or logits (Mahalanobis,
  KNN, EnergyBased, ...) with *our* threshold machinery: ``calibrate(clean, fpr)`` sets a threshold at a
  false-rejection rate (:func:`lgm_ext.detector.calibrated_threshold`, the convention of
  :meth:`lgm_ext.LikelihoodDetector.calibrate`), ``reject(x)`` applies it, ``state_dict`` saves it.

Directions: pytorch-ood's scores are outlier scores (higher = more abnormal); ours (``score``) are
normality scores (higher = more normal): ``score = -outlier_score`` on both classes here.  ``fpr`` is the
fraction of clean inputs rejected (false rejections, clean = positive); pytorch-ood's and OpenOOD's
"FPR@95TPR" (abnormal = positive) is the fraction of clean inputs rejected while 95% of abnormal ones are.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lgm_ext import LikelihoodDetector
from lgm_ext.detector import calibrated_threshold, check_fpr

try:
    from pytorch_ood.api import FeaturesDetector, LogitsDetector, ModelNotSetException, RequiresFittingException
    from pytorch_ood.utils import extract_features
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("lgm_lab.ood_adapters needs pytorch-ood: pip install pytorch-ood (the lab's 'ood' extra)") from e

__all__ = ["PytorchOODLikelihood", "CalibratedOODDetector"]

_FORMAT = "lgm_lab.CalibratedOODDetector/1"


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


class CalibratedOODDetector:
    """A pytorch-ood detector with a threshold at a false-rejection rate, our way.

    ``score(x)`` = ``-outlier_score(x)`` (higher = more normal, as :class:`lgm_ext.LikelihoodDetector`),
    where ``outlier_score`` is the detector's ``predict_features`` (a ``FeaturesDetector``: Mahalanobis, KNN,
    ...) or ``predict_logits`` (a ``LogitsDetector``: EnergyBased, MaxSoftmax, ...).  :meth:`calibrate` sets
    the threshold so that a fraction ``fpr`` of clean inputs is rejected, by the convention of
    :meth:`lgm_ext.LikelihoodDetector.calibrate` (m = floor(fpr N) of N clean scores fall below it);
    :meth:`reject` is ``not score >= threshold`` (NaN rejected).

    Saving: :meth:`state_dict` holds the threshold, the calibration and the detector's fitted tensors (its
    tensor, number and string attributes, e.g. Mahalanobis's ``mu``, ``cov``, ``precision``; encoders and
    models are not saved: give them to the detector you load into); :meth:`load_state_dict` restores them
    into a wrapper of a detector of the same class.  A detector whose fitted state is something else (KNN's
    scikit-learn index) cannot be saved this way: ``state_dict`` raises ValueError naming the attribute.

    Args:
        detector: a fitted (or fit-free) pytorch-ood ``FeaturesDetector`` or ``LogitsDetector``.
    """

    def __init__(self, detector) -> None:
        if isinstance(detector, FeaturesDetector):
            self.representation = "features"
        elif isinstance(detector, LogitsDetector):
            self.representation = "logits"
        else:
            raise TypeError(f"detector must be a pytorch_ood FeaturesDetector or LogitsDetector, got "
                            f"{type(detector).__name__}")
        self.detector = detector
        self.threshold: float | None = None
        self.fpr: float | None = None
        self.calibration_size: int | None = None

    def outlier_score(self, x: Tensor) -> Tensor:
        """The detector's own scores (pytorch-ood's direction: higher = more abnormal).

        Args:
            x: (N, D) features or (N, K) logits, what the detector takes.

        Returns:
            (N,) outlier scores.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
            raise TypeError(f"x must be a (N, {'D' if self.representation == 'features' else 'K'}) floating tensor "
                            f"of {self.representation}, got {getattr(x, 'shape', type(x).__name__)}")
        out = (self.detector.predict_features if self.representation == "features" else
               self.detector.predict_logits)(x)
        return torch.as_tensor(out).to(x.device)

    def score(self, x: Tensor) -> Tensor:
        """``-outlier_score(x)``: higher = more normal (lgm_ext's direction).

        Args:
            x: features or logits, as :meth:`outlier_score`.

        Returns:
            (N,) scores.
        """
        return -self.outlier_score(x)

    def calibrate(self, clean: Tensor, fpr: float = 0.05) -> CalibratedOODDetector:
        """Set the threshold so that a fraction ``fpr`` of ``clean`` is rejected (false rejections).

        Args:
            clean: (N, ...) clean features or logits, N >= 1, with finite scores.
            fpr: a number in (0, 1).

        Returns:
            self.
        """
        p = check_fpr(fpr)
        with torch.no_grad():
            s = self.score(clean).detach().flatten()
        self.threshold = calibrated_threshold(s.cpu(), p)
        self.fpr, self.calibration_size = p, int(s.numel())
        return self

    def reject(self, x: Tensor) -> Tensor:
        """(N,) bool, True where ``not score >= threshold``.  Needs :meth:`calibrate` first.

        Args:
            x: features or logits, as :meth:`outlier_score`.

        Returns:
            (N,) bool, True = rejected.
        """
        if self.threshold is None:
            raise ValueError("threshold is not set: call calibrate(clean, fpr) first")
        with torch.no_grad():
            return ~(self.score(x) >= self.threshold)

    # ------------------------------------------------------------------ state
    def _fitted_state(self) -> dict:
        state = {}
        for name, value in vars(self.detector).items():
            if isinstance(value, Tensor):
                state[name] = value.detach().cpu().clone()
            elif isinstance(value, (bool, int, float, str)):
                state[name] = value
            elif value is None or isinstance(value, (nn.Module, torch.device)) or callable(value):
                continue  # unset, or the encoder/model and device the loading side gives its detector
            else:
                raise ValueError(f"cannot save {type(self.detector).__name__}.{name} ({type(value).__name__}): "
                                 f"state_dict holds tensors, numbers and strings only; refit this detector where "
                                 f"it is loaded")
        return state

    def state_dict(self) -> dict:
        """The threshold, the calibration and the detector's fitted state: ``torch.save``-able and loadable
        with ``torch.load(..., weights_only=True)``.

        Returns:
            A dict of plain tensors, numbers and strings.
        """
        if self.threshold is None:
            raise ValueError("threshold is not set: call calibrate(clean, fpr) first")
        return {"format": _FORMAT, "detector": type(self.detector).__qualname__,
                "representation": self.representation, "threshold": self.threshold, "fpr": self.fpr,
                "calibration_size": self.calibration_size, "state": self._fitted_state()}

    def load_state_dict(self, state_dict: dict) -> CalibratedOODDetector:
        """Restore what :meth:`state_dict` saved into this wrapper and its detector (of the same class).

        Args:
            state_dict: a dict written by :meth:`state_dict`.

        Returns:
            self.
        """
        sd = state_dict
        if not isinstance(sd, dict) or sd.get("format") != _FORMAT:
            raise ValueError(f"state_dict is not a CalibratedOODDetector state (format {_FORMAT!r})")
        for key in ("detector", "representation", "threshold", "fpr", "calibration_size", "state"):
            if key not in sd:
                raise ValueError(f"state_dict has no {key!r} entry")
        if sd["detector"] != type(self.detector).__qualname__:
            raise ValueError(f"state_dict['detector'] is {sd['detector']!r}, this wrapper holds "
                             f"{type(self.detector).__qualname__!r}")
        t = sd["threshold"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"state_dict['threshold'] must be a finite number, got {t!r}")
        if not isinstance(sd["state"], dict):
            raise TypeError("state_dict['state'] must be a dict")
        fpr = check_fpr(sd["fpr"])
        device = getattr(self.detector, "device", None)
        for name, value in sd["state"].items():
            setattr(self.detector, name, value.to(device) if isinstance(value, Tensor) and device else value)
        self.threshold, self.fpr, self.calibration_size = float(t), fpr, int(sd["calibration_size"])
        return self
