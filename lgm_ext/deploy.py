"""A classifier that says when it should not be trusted: network, head and calibrated detector as one module
(docs/SPEC.md section 8).

:class:`RejectingClassifier` is what to deploy once a :class:`lgm_ext.LikelihoodDetector` is calibrated:
``forward(images) -> (logits, accepted)``, the detector's Gaussians and threshold held as buffers (in
``state_dict``, moved by ``.to(device)``), exportable with ``torch.export.export``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._gaussians import _check_threshold, _score_rows
from .detector import LikelihoodDetector
from .modules import head_logits

__all__ = ["RejectingClassifier"]

_FORMAT = "lgm_ext.RejectingClassifier/1"


class _DetectorBuffers(nn.Module):
    """The detector's tensors as float64 buffers that follow the module's device but keep float64 whatever
    ``.to(dtype)``, ``.half()`` or ``.float()`` do to the network (scores are computed in the features' dtype
    from them, as :class:`~lgm_ext.LikelihoodDetector` computes from its float64 parameters)."""

    def __init__(self, det: LikelihoodDetector) -> None:
        super().__init__()
        f64 = {"dtype": torch.float64, "device": det.device}
        self.register_buffer("means", det.means.detach().to(**f64).clone())
        if det.log_var is not None:
            self.register_buffer("log_var", det.log_var.detach().to(**f64).clone())
        if det.covariance_matrix is not None:
            self.register_buffer("covariance_matrix", det.covariance_matrix.detach().to(**f64).clone())
            self.register_buffer("white_means", det._white_means.to(**f64).clone())
            self.register_buffer("whiten_t", det._whiten.T.to(**f64).contiguous())
            self.register_buffer("center", det._center.to(**f64).clone())
        self.register_buffer("half_logdet", torch.tensor(det._half_logdet, **f64))
        self.register_buffer("threshold", torch.tensor(det.threshold, **f64))
        self.num_classes, self.feat_dim, self.covariance = det.num_classes, det.feat_dim, det.covariance
        self.score_name, self.impl = det.score_name, det.impl
        self.fpr, self.calibration_size = det.fpr, det.calibration_size

    def get_extra_state(self) -> dict:
        state = {"format": _FORMAT, "covariance": self.covariance, "score": self.score_name, "impl": self.impl}
        if self.fpr is not None:
            state["fpr"], state["calibration_size"] = self.fpr, self.calibration_size
        return state

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"detector._extra_state is not a RejectingClassifier state (format {_FORMAT!r})")
        if state.get("covariance") != self.covariance:
            raise ValueError(f"detector._extra_state: covariance {state.get('covariance')!r} saved, this module's "
                             f"detector has {self.covariance!r} (build it with a detector of that covariance)")
        det = self.to_detector(state.get("score"), state.get("impl"))  # the loaded state, checked as a detector
        self.score_name, self.impl = det.score_name, det.impl
        self.fpr, self.calibration_size = state.get("fpr"), state.get("calibration_size")

    def to_detector(self, score: str | None = None, impl: str | None = None) -> LikelihoodDetector:
        det = LikelihoodDetector(self.means, log_var=getattr(self, "log_var", None),
                                 covariance_matrix=getattr(self, "covariance_matrix", None),
                                 score=self.score_name if score is None else score,
                                 impl=self.impl if impl is None else impl,
                                 threshold=_check_threshold("threshold", self.threshold))
        det.fpr, det.calibration_size = self.fpr, self.calibration_size
        return det

    def _apply(self, fn, recurse=True):
        for name, b in self._buffers.items():
            if b is not None:  # where fn would put a float64 tensor, without its dtype change
                target = fn(torch.empty(0, dtype=b.dtype, device=b.device)).device
                self._buffers[name] = b.to(target)
        return self


class RejectingClassifier(nn.Module):
    """A feature network, its head and a calibrated :class:`~lgm_ext.LikelihoodDetector` as one module.

    ``forward(images)`` returns ``(logits, accepted)``: ``logits`` (N, K) as :class:`lgm_ext.Classifier`
    computes them (``head.logits(features)``, else ``head(features)``), ``accepted`` (N,) bool, True where the
    detector's score of ``features = backbone(images)`` is ``>= threshold`` (False for a NaN score): exactly
    ``~detector.reject(features)``.  ``forward(images, return_score=True)`` also returns the (N,) scores
    (higher = more normal; the threshold is :attr:`threshold`).

    The detector's Gaussians, derived whitening (tied covariance) and threshold are float64 buffers of the
    submodule ``detector``: they are in ``state_dict()`` (with the score kind, impl and calibration as the
    submodule's extra state), move with ``.to(device)`` and stay float64 under ``.to(dtype)`` / ``.half()``
    (scores are computed in float32, float64 for float64 features, as the detector computes them).
    :meth:`to_detector` gives the :class:`~lgm_ext.LikelihoodDetector` back.

    Export: ``torch.export.export(model.eval(), (images,))`` is the supported path (tested: the exported
    program gives the eager outputs); the fused operators have fake kernels, so the program holds
    ``torch.ops.lgm_ext`` calls and needs ``import lgm_ext`` where it runs.  ``torch.jit.script`` is not
    supported (the scoring goes through Python helpers that TorchScript does not compile).

    Args:
        backbone: an ``nn.Module`` mapping images to (N, D) features.
        head: an ``nn.Module`` mapping features to logits (an L-GM head, ``nn.Linear``, a lab head).
        detector: a calibrated :class:`~lgm_ext.LikelihoodDetector` over D-dimensional features (one
            without a threshold is refused: there would be nothing to accept or reject by).

    Example::

        import torch, lgm_ext
        backbone, head = torch.nn.Linear(32, 8), lgm_ext.LGMLoss(4, 8)
        x = torch.randn(256, 32)
        with torch.no_grad():
            det = lgm_ext.LikelihoodDetector.from_head(head).calibrate(backbone(x), fpr=0.05)
        model = lgm_ext.RejectingClassifier(backbone, head, det).eval()
        logits, accepted = model(x)                     # 95.3% accepted: at most 5% of x rejected
        program = torch.export.export(model, (x,))
        logits2, accepted2 = program.module()(x)        # the same
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, detector: LikelihoodDetector) -> None:
        super().__init__()
        for name, m in (("backbone", backbone), ("head", head)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
        if not isinstance(detector, LikelihoodDetector):
            raise TypeError(f"detector must be an lgm_ext.LikelihoodDetector, got {type(detector).__name__}")
        if detector.threshold is None:
            raise ValueError("detector has no threshold: calibrate it first (detector.calibrate(clean_features, fpr))")
        d = getattr(head, "feat_dim", None)
        if isinstance(d, int) and not isinstance(d, bool) and d != detector.feat_dim:
            raise ValueError(f"detector scores {detector.feat_dim}-dimensional features but head takes {d}")
        self.backbone, self.head = backbone, head
        self.detector = _DetectorBuffers(detector)

    # ------------------------------------------------------------------ state
    num_classes = property(lambda self: self.detector.num_classes, doc="K, the detector's number of classes.")
    feat_dim = property(lambda self: self.detector.feat_dim, doc="D, the features' dimension.")
    covariance = property(lambda self: self.detector.covariance, doc="The detector's covariance kind.")
    score_name = property(lambda self: self.detector.score_name, doc="The detector's score kind.")
    impl = property(lambda self: self.detector.impl, doc="The operators' implementation selector.")
    fpr = property(lambda self: self.detector.fpr, doc="The false-rejection rate it was calibrated at.")

    @property
    def threshold(self) -> float:
        """The detector's threshold: inputs scoring below it are rejected."""
        return float(self.detector.threshold)

    def to_detector(self) -> LikelihoodDetector:
        """The :class:`~lgm_ext.LikelihoodDetector` these buffers hold (a copy, on their device).

        Returns:
            A calibrated detector equal to the one given at construction (or loaded).
        """
        return self.detector.to_detector()

    # ------------------------------------------------------------------ forward
    def _params(self, device: torch.device, dtype: torch.dtype):
        b, cast = self.detector, {"device": device, "dtype": dtype}
        if self.covariance == "tied":
            return b.white_means.to(**cast), None, b.whiten_t.to(**cast), b.center.to(**cast)
        log_var = getattr(b, "log_var", None)
        return b.means.to(**cast), None if log_var is None else log_var.to(**cast), None, None

    def score_features(self, features: Tensor) -> Tensor:
        """The detector's score of features (higher = more normal), from the buffers.

        Args:
            features: (N, D) floating features.

        Returns:
            (N,) scores, float32 (float64 for float64 features).
        """
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise TypeError(f"features (backbone's output) must be a floating-point tensor, got "
                            f"{getattr(features, 'dtype', type(features).__name__)}")
        if features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(f"features (backbone's output) must have shape (N, {self.feat_dim}), got "
                             f"{tuple(features.shape)}")
        half_logdet = self.detector.half_logdet if self.covariance == "tied" else 0.0
        return _score_rows(features, self.score_name, self._params, half_logdet, self.impl)

    def forward(self, images: Tensor, return_score: bool = False):
        """Classify and accept or reject.

        Args:
            images: a batch for ``backbone``.
            return_score: also return the scores.

        Returns:
            ``(logits, accepted)`` -- (N, K) logits and (N,) bool, True where ``score >= threshold`` -- or
            ``(logits, accepted, score)`` with ``return_score=True``.
        """
        features = self.backbone(images)
        logits = head_logits(self.head, features)
        score = self.score_features(features)
        accepted = score >= self.detector.threshold.to(score.dtype)
        return (logits, accepted, score) if return_score else (logits, accepted)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, covariance={self.covariance!r}, "
                f"score={self.score_name!r}, threshold={self.threshold}, fpr={self.fpr}")

