"""A classifier that says when it should not be trusted: network, head and calibrated detector as one module
(docs/SPEC.md section 8).

:class:`RejectingClassifier` is what to deploy once a detector of the family (:mod:`lgm_ext.detectors`) is
calibrated: ``forward(images) -> (logits, accepted)``, the detector's tensors and threshold held as float64
buffers (in ``state_dict``, moved by ``.to(device)``), exportable with ``torch.export.export`` with a dynamic
batch, and rebuilt from a saved state dict alone (:meth:`RejectingClassifier.from_state_dict`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ._gaussians import _check_threshold, _compute_dtype, _no_autocast
from .detectors.base import Detector, flatten_tensors, nest_tensors
from .modules import head_logits

__all__ = ["RejectingClassifier"]

_FORMAT = "lgm_ext.RejectingClassifier/2"
_REF = "__buffer__"


def _buffer_name(path: str) -> str:
    return path.replace(".", "__")


def _strip(tree, buffers: Mapping[str, Tensor]):
    """``tree`` (a detector's state dict) with each tensor equal to one of ``buffers`` replaced by a reference
    to it (so that a RejectingClassifier's state holds each tensor once)."""
    if isinstance(tree, Tensor):
        for name, b in buffers.items():
            if b.shape == tree.shape and b.dtype == tree.dtype and b.device == tree.device and torch.equal(b, tree):
                return {_REF: name}
        return tree
    if isinstance(tree, Mapping):
        return {k: _strip(v, buffers) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_strip(v, buffers) for v in tree)
    return tree


def _fill(tree, buffers: Mapping[str, Tensor]):
    """The inverse of :func:`_strip`: references replaced by (copies of) the buffers they name."""
    if isinstance(tree, Mapping):
        if set(tree) == {_REF}:
            name = tree[_REF]
            if name not in buffers:
                raise KeyError(name)
            return buffers[name].detach().clone()
        return {k: _fill(v, buffers) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_fill(v, buffers) for v in tree)
    return tree


def _describe(det: Detector) -> str:
    cov = getattr(det, "covariance", None)
    return f"{det.kind} detector" + (f" (covariance {cov!r})" if cov else "") + f" [{det.name}]"


class _DetectorBuffers(nn.Module):
    """A detector's stored and scoring tensors as float64 buffers that follow the module's device but keep
    float64 whatever ``.to(dtype)``, ``.half()`` or ``.float()`` do to the network; the detector itself (its kind
    and settings) is the extra state, its tensors referenced by buffer name."""

    def __init__(self, det: Detector) -> None:
        super().__init__()
        self.det = det
        self._scoring = det.scoring_tensors()
        flat = {**flatten_tensors(det.stored_tensors()), **flatten_tensors(self._scoring)}
        for path, t in flat.items():
            self.register_buffer(_buffer_name(path), t.detach().to(torch.float64).clone())
        self.register_buffer("threshold", torch.tensor(det.threshold, dtype=torch.float64, device=det.device))

    def _named(self) -> dict[str, Tensor]:
        return {k: v for k, v in self._buffers.items() if v is not None and k != "threshold"}

    def get_extra_state(self) -> dict:
        sd = self.det.state_dict()
        sd.pop("threshold", None)  # the buffer is the threshold
        return {"format": _FORMAT, "detector": _strip(sd, self._named())}

    def set_extra_state(self, state) -> None:
        det = rebuild_detector(state, self._named(), self.threshold)
        want = sorted((p, tuple(t.shape)) for p, t in flatten_tensors(self._scoring).items())
        got = sorted((p, tuple(t.shape)) for p, t in flatten_tensors(det.scoring_tensors()).items())
        if det.kind != self.det.kind or want != got or det.inputs != self.det.inputs:
            raise ValueError(f"detector._extra_state holds a {_describe(det)}, this module a {_describe(self.det)}: "
                             f"build the module with a detector of that kind (RejectingClassifier.from_state_dict "
                             f"does)")
        self.det = det

    def params(self, device: torch.device, dtype: torch.dtype) -> dict:
        flat = {p: self._buffers[_buffer_name(p)].to(device=device, dtype=dtype)
                for p in flatten_tensors(self._scoring)}
        return nest_tensors(self._scoring, flat)

    def _apply(self, fn, recurse=True):
        for name, b in self._buffers.items():
            if b is not None:  # where fn would put a float64 tensor, without its dtype change
                target = fn(torch.empty(0, dtype=b.dtype, device=b.device)).device
                self._buffers[name] = b.to(target)
        return self


def rebuild_detector(state, buffers: Mapping[str, Tensor], threshold) -> Detector:
    """The detector a RejectingClassifier's ``detector._extra_state`` describes, its tensors taken from
    ``buffers`` and its threshold from ``threshold``; ValueError naming what is wrong."""
    if not isinstance(state, Mapping) or state.get("format") != _FORMAT or not isinstance(state.get("detector"),
                                                                                             Mapping):
        fmt = state.get("format") if isinstance(state, Mapping) else None
        raise ValueError(f"detector._extra_state is not a RejectingClassifier state (format {_FORMAT!r}, got "
                         f"{fmt!r})")
    try:
        sd = _fill(state["detector"], buffers)
    except KeyError as e:
        raise ValueError(f"detector._extra_state refers to a tensor {e.args[0]!r} this module does not hold: the "
                         "saved detector is of another kind or covariance; build the module with a detector of that "
                         "kind (RejectingClassifier.from_state_dict does)") from None
    sd = dict(sd)
    sd["threshold"] = _check_threshold("threshold", threshold)
    return Detector.from_state_dict(sd)


class RejectingClassifier(nn.Module):
    """A feature network, its head and a calibrated detector of the family (:mod:`lgm_ext.detectors`) as one
    module.

    ``forward(images)`` returns ``(logits, accepted)``: ``logits`` (N, K) as :class:`lgm_ext.Classifier` computes
    them (``head.logits(features)``, else ``head(features)``), ``accepted`` (N,) bool, True where the detector's
    score is ``>= threshold`` (False for a NaN score): exactly ``~detector.reject(features, logits)``, the
    detector given the backbone's features and the head's logits -- whichever it reads (a Gaussian, KNN or ViM
    reads features; Energy, MaxLogit and max-softmax the logits; the center distance both; a combination what
    its members read).  ``forward(images, return_score=True)`` also returns the (N,) scores.

    The detector's tensors (and what its score derives from them, e.g. a tied covariance's whitening) and its
    threshold are float64 buffers of the submodule ``detector``: in ``state_dict()`` with the detector's kind and
    settings as the submodule's extra state, moved by ``.to(device)``, float64 under ``.to(dtype)`` /
    ``.half()`` (scores are computed in float32, float64 for float64 features).  :meth:`to_detector` gives the
    detector back; :meth:`from_state_dict` rebuilds a saved module from its state dict and the backbone and head
    modules (whose architectures a state dict cannot hold), for every member.

    Export: ``torch.export.export(model.eval(), (images,), dynamic_shapes=({0: torch.export.Dim("batch")},))``
    gives a program for any batch size (tested against eager outputs); the fused operators have fake kernels,
    so a program of a Gaussian detector holds ``torch.ops.lgm_ext`` calls and needs ``import lgm_ext`` where it
    runs.  ``torch.jit.script`` is not supported.

    Args:
        backbone: an ``nn.Module`` mapping images to (N, D) features.
        head: an ``nn.Module`` mapping features to logits (an L-GM head, ``nn.Linear``, a lab head).
        detector: a calibrated detector of the family (one without a threshold is refused).

    Example::

        import torch, lgm_ext
        backbone, head = torch.nn.Linear(32, 8), lgm_ext.LGMLoss(4, 8)
        x = torch.randn(256, 32)
        with torch.no_grad():
            det = lgm_ext.LikelihoodDetector.from_head(head).calibrate(backbone(x), fpr=0.05)
        model = lgm_ext.RejectingClassifier(backbone, head, det).eval()
        logits, accepted = model(x)                     # 95.3% accepted: at most 5% of x rejected
        batch = torch.export.Dim("batch")
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        logits2, accepted2 = program.module()(x[:7])    # any batch size
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, detector: Detector) -> None:
        super().__init__()
        for name, m in (("backbone", backbone), ("head", head)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
        if not isinstance(detector, Detector):
            raise TypeError(f"detector must be a detector of lgm_ext.detectors (e.g. lgm_ext.LikelihoodDetector), got "
                            f"{type(detector).__name__}")
        if not detector.fitted:
            raise ValueError(f"detector ({detector.name}) is not fitted: fit and calibrate it first")
        if detector.threshold is None:
            raise ValueError("detector has no threshold: calibrate it first (detector.calibrate(clean inputs, fpr))")
        d = getattr(head, "feat_dim", None)
        if "features" in detector.inputs and isinstance(d, int) and not isinstance(d, bool) \
                and detector.feat_dim is not None and d != detector.feat_dim:
            raise ValueError(f"detector scores {detector.feat_dim}-dimensional features but head takes {d}")
        k = getattr(head, "num_classes", None)
        if "logits" in detector.inputs and isinstance(k, int) and not isinstance(k, bool) \
                and detector.num_classes is not None and k != detector.num_classes:
            raise ValueError(f"detector scores {detector.num_classes} logits but head has {k} classes")
        self.backbone, self.head = backbone, head
        self.detector = _DetectorBuffers(detector.copy())

    @classmethod
    def from_state_dict(cls, backbone: nn.Module, head: nn.Module, state_dict: Mapping) -> RejectingClassifier:
        """A module saved with ``torch.save(model.state_dict(), path)``, rebuilt: ``backbone`` and ``head`` of the
        saved architectures (their weights are loaded), the detector -- of whichever kind was saved -- from the
        state dict alone.

        Args:
            backbone: the feature network (same architecture as saved).
            head: the head (same architecture as saved).
            state_dict: e.g. ``torch.load(path, weights_only=True)``.

        Returns:
            The module, its weights and detector as saved (call ``.eval()`` to deploy it).
        """
        if not isinstance(state_dict, Mapping) or "detector._extra_state" not in state_dict:
            raise ValueError("state_dict is not a RejectingClassifier's state dict (no 'detector._extra_state')")
        buffers = {k[len("detector."):]: v for k, v in state_dict.items()
                   if k.startswith("detector.") and k not in ("detector._extra_state", "detector.threshold")}
        if "detector.threshold" not in state_dict:
            raise ValueError("state_dict has no 'detector.threshold'")
        det = rebuild_detector(state_dict["detector._extra_state"], buffers, state_dict["detector.threshold"])
        model = cls(backbone, head, det)
        model.load_state_dict(state_dict)
        return model

    # ------------------------------------------------------------------ state
    num_classes = property(lambda self: self.detector.det.num_classes, doc="K, the detector's classes (or None).")
    feat_dim = property(lambda self: self.detector.det.feat_dim, doc="D, the features' dimension (or None).")
    covariance = property(lambda self: getattr(self.detector.det, "covariance", None),
                          doc="A Gaussian detector's covariance kind (None for other members).")
    score_name = property(lambda self: getattr(self.detector.det, "score_name", self.detector.det.kind),
                          doc="A Gaussian detector's score kind (the member's kind for others).")
    impl = property(lambda self: getattr(self.detector.det, "impl", None), doc="The operators' implementation.")
    fpr = property(lambda self: self.detector.det.fpr, doc="The false-rejection rate it was calibrated at.")

    @property
    def threshold(self) -> float:
        """The detector's threshold: inputs scoring below it are rejected."""
        return float(self.detector.threshold)

    def to_detector(self) -> Detector:
        """The detector these buffers hold (a copy, on their device, with their threshold)."""
        det = rebuild_detector(self.detector.get_extra_state(), self.detector._named(), self.detector.threshold)
        return det

    # ------------------------------------------------------------------ forward
    def score_features(self, features: Tensor, logits: Tensor | None = None) -> Tensor:
        """The detector's score (higher = more normal) of features (and the head's logits, computed from them
        when the detector reads logits and none are given), from the buffers.

        Returns:
            (N,) scores, float32 (float64 for float64 features).
        """
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise TypeError(f"features (backbone's output) must be a floating-point tensor, got "
                            f"{getattr(features, 'dtype', type(features).__name__)}")
        det = self.detector.det
        if features.dim() != 2 or (det.feat_dim is not None and "features" in det.inputs
                                   and features.shape[1] != det.feat_dim):
            raise ValueError(f"features (backbone's output) must have shape (N, {det.feat_dim or 'D'}), got "
                             f"{tuple(features.shape)}")
        if "logits" in det.inputs and logits is None:
            logits = head_logits(self.head, features)
        dt = _compute_dtype(features.dtype)
        f = features.to(dt)
        lg = None if logits is None or "logits" not in det.inputs else logits.to(dt)
        with _no_autocast(features.device.type):
            return det.score_with(self.detector.params(features.device, dt), f, lg)

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
        score = self.score_features(features, logits)
        accepted = score >= self.detector.threshold.to(score.dtype)
        return (logits, accepted, score) if return_score else (logits, accepted)

    def extra_repr(self) -> str:
        return f"detector={self.detector.det.name!r}, threshold={self.threshold}, fpr={self.fpr}"
