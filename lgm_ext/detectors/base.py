"""The one base of every detector (docs/SPEC.md section 8): :class:`Detector`.

A detector maps a network's features, its logits or both to a score -- higher = more normal, differentiable
with respect to its inputs (what :class:`lgm_ext.attacks.AdaptivePGD` needs) -- and rejects inputs whose score
falls below a threshold calibrated on clean inputs at a false-rejection rate.  A member of the family is one
file: a subclass that says what it reads (:attr:`Detector.inputs`), fits itself (:meth:`Detector._fit`),
lists its tensors (:meth:`Detector._tensors`, :meth:`Detector.scoring_tensors`) and settings
(:meth:`Detector._config`), and computes its score from tensors it is handed (:meth:`Detector.score_with`), so
that :class:`lgm_ext.RejectingClassifier` can hold those tensors as buffers and export the same computation.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from .._gaussians import (
    _check_threshold,
    _compute_dtype,
    _finite,
    _matrix,
    _no_autocast,
    _real,
    calibrated_threshold,
    check_fpr,
)

__all__ = ["Detector", "check_device", "DETECTOR_KINDS", "FAMILY_FORMAT", "flatten_tensors", "nest_tensors"]

FAMILY_FORMAT = "lgm_ext.detectors/1"
#: kind -> class, filled by :meth:`Detector.__init_subclass__`: what :meth:`Detector.from_state_dict` dispatches on.
DETECTOR_KINDS: dict[str, type[Detector]] = {}
_CALIBRATION_KEYS = ("threshold", "fpr", "calibration_size", "calibration_min", "calibration_max")


def _input(name: str, x, width: int | None, n: int | None = None) -> Tensor:
    """A floating (N, width) tensor (:func:`lgm_ext._gaussians._matrix`) with ``n`` rows when given, else
    TypeError/ValueError naming ``name``."""
    x = _matrix(name, x, width)
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} rows, the features {n}: give both for the same inputs")
    return x


def flatten_tensors(tree, prefix: str = "") -> dict[str, Tensor]:
    """``{"a.b.0.c": tensor}`` for the tensors of nested dicts and lists (the rest is left out)."""
    out = {}
    if isinstance(tree, Tensor):
        out[prefix] = tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flatten_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def nest_tensors(tree, flat: Mapping[str, Tensor], prefix: str = ""):
    """``tree`` with each tensor replaced by ``flat[its path]`` (the inverse of :func:`flatten_tensors`)."""
    if isinstance(tree, Tensor):
        return flat[prefix]
    if isinstance(tree, Mapping):
        return {k: nest_tensors(v, flat, f"{prefix}.{k}" if prefix else str(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(nest_tensors(v, flat, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(tree))
    return tree


def check_range(sd: Mapping) -> tuple[float, float] | None:
    """A state's calibration range: ``calibration_min`` <= ``calibration_max``, finite numbers, both or neither."""
    if ("calibration_min" in sd) != ("calibration_max" in sd):
        raise ValueError("state_dict has one of 'calibration_min' and 'calibration_max' but not both")
    if "calibration_min" not in sd:
        return None
    lo, hi = sd["calibration_min"], sd["calibration_max"]
    for key, v in (("calibration_min", lo), ("calibration_max", hi)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"state_dict[{key!r}] must be a number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"state_dict[{key!r}] must be finite, got {v}")
    if lo > hi:
        raise ValueError(f"state_dict['calibration_min'] ({lo}) exceeds state_dict['calibration_max'] ({hi})")
    return float(lo), float(hi)


def check_device(device) -> torch.device:
    """``device`` as a torch.device for :meth:`Detector.to`: a dtype (parameters stay float64; scores follow the
    inputs' dtype), something that is no device, or the meta device (parameters need values) is a ValueError."""
    if isinstance(device, torch.dtype):
        raise ValueError(f"to() takes a device, got the dtype {device}: a detector stores float64 and scores in the "
                         "inputs' dtype (float32, or float64 for float64 inputs), so there is nothing to convert")
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"to() takes a device such as 'cpu' or 'cuda', got {device!r}") from e
    if dev.type == "meta":
        raise ValueError("device 'meta' is refused: a detector's parameters need values (score() accepts meta "
                         "inputs and gives meta scores, for shape inference)")
    return dev


class Detector:
    """A score of features and/or logits (higher = more normal) and a rejection threshold.

    Every member (:mod:`lgm_ext.detectors`) has this interface:

    - :meth:`fit` ``(features, labels, logits=None)`` fits it to labelled training inputs, in place, and returns
      it (a member that needs no fit, e.g. :class:`~lgm_ext.detectors.EnergyDetector`, accepts the call and
      leaves itself as it is); a fit clears the calibration;
    - :meth:`score` ``(features=None, logits=None)``: (N,) scores, higher = more normal, differentiable with
      respect to the inputs; :meth:`outlier_score` is ``-score`` (pytorch-ood's and OpenOOD's direction);
    - :meth:`calibrate` ``(features=None, fpr=0.05, *, logits=None)`` sets :attr:`threshold` so that a fraction
      ``fpr`` of those clean inputs is rejected (``m = floor(fpr N)`` of N fall strictly below it; the
      convention of :func:`lgm_ext.detector.calibrated_threshold`) and records the calibration scores' range;
    - :meth:`reject` (True = rejected: ``not score >= threshold``, so NaN is rejected),
      :meth:`relative_to_threshold` (``score - threshold``, >= 0 exactly when accepted);
    - :meth:`state_dict` / :meth:`from_state_dict` (plain tensors, numbers and strings, with the member's
      ``kind`` and the family's format: loadable with ``torch.load(weights_only=True)``); ``Detector.
      from_state_dict`` builds whichever member the state names;
    - :meth:`to` moves the stored tensors to a device (they stay float64; scores follow the inputs' dtype).

    :attr:`inputs` says what a member reads: ``("features",)``, ``("logits",)`` or both; pass what it reads
    (``det.score(features)``, ``det.score(logits=logits)``, ``det.score(features, logits)``).  Inputs are (N, D)
    features and (N, K) logits of any float dtype: bfloat16/float16 are scored in float32, float64 in float64;
    NaN rows give NaN scores.
    """

    #: The member's name in a state dict (and in :data:`DETECTOR_KINDS`).
    kind: ClassVar[str] = ""
    #: What :meth:`score` reads: a tuple of "features" and/or "logits".
    inputs: ClassVar[tuple[str, ...]] = ("features",)
    #: Whether :meth:`fit` must be called before scoring.
    requires_fit: ClassVar[bool] = True

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if cls.__dict__.get("kind"):
            if cls.kind in DETECTOR_KINDS and DETECTOR_KINDS[cls.kind] is not cls:
                raise ValueError(f"detector kind {cls.kind!r} is defined twice")
            DETECTOR_KINDS[cls.kind] = cls

    def __init__(self) -> None:
        self._threshold: float | None = None
        self.fpr: float | None = None
        self.calibration_size: int | None = None
        #: (min, max) of the clean scores the threshold was calibrated on (None: not calibrated here).
        self.calibration_range: tuple[float, float] | None = None
        self._cache: dict = {}

    # ------------------------------------------------------------------ what a member defines
    #: D, the features' width it scores (None: any, or it reads no features); members set it when fitted.
    feat_dim: int | None = None
    #: K, the logits' width it scores (None: any, or unknown).
    num_classes: int | None = None

    @property
    def fitted(self) -> bool:
        """Whether the detector can score (fitted, or a member that needs no fit)."""
        return True

    def _fit(self, features: Tensor | None, labels: Tensor, logits: Tensor | None) -> None:
        """Fit to checked inputs (float64-accumulated where it matters), in place."""

    def _tensors(self) -> dict:
        """The member's stored float64 tensors (a possibly nested dict): what :meth:`state_dict` saves."""
        return {}

    def _set_tensors(self, tensors: dict) -> None:
        """Take stored tensors back (:meth:`to`, :meth:`from_state_dict`)."""

    def _config(self) -> dict:
        """The member's settings: plain numbers, strings, bools, lists and dicts of them."""
        return {}

    @classmethod
    def _from_parts(cls, config: dict, tensors: dict) -> Detector:
        """A member from its settings and stored tensors (both checked here, errors naming the key)."""
        raise NotImplementedError

    def scoring_tensors(self) -> dict:
        """The float64 tensors :meth:`score_with` needs (nested dict; by default the stored ones)."""
        return self._tensors()

    def stored_tensors(self) -> dict:
        """The stored float64 tensors under the paths :meth:`scoring_tensors` uses for them (a tensor both
        stores and scores has one path): what :class:`lgm_ext.RejectingClassifier` holds as buffers."""
        return self._tensors()

    def score_with(self, params: dict, features: Tensor | None, logits: Tensor | None) -> Tensor:
        """The score of checked inputs from ``params`` (:meth:`scoring_tensors` cast to the inputs' compute dtype
        and device): the computation both :meth:`score` and :class:`lgm_ext.RejectingClassifier` run."""
        raise NotImplementedError

    # ------------------------------------------------------------------ construction
    @property
    def name(self) -> str:
        """A readable name of the detector (its class and settings)."""
        return type(self).__name__

    def fit(self, features: Tensor | None = None, labels: Tensor | None = None, logits: Tensor | None = None
            ) -> Detector:
        """Fit to labelled training inputs (in place; returns self).  A refitted detector is uncalibrated; a fit
        that raises leaves the detector as it was.

        Args:
            features: (N, D) features (for members that read features).
            labels: (N,) integer class labels.
            logits: (N, K) logits (for members that read logits).

        Returns:
            self.
        """
        if not self.requires_fit:  # nothing to learn (a score of the logits, or given centers)
            self._cache = {}
            self._clear_calibration()
            return self
        f, lg = self._inputs(features, logits, "fit")
        if f is not None:
            _real("features", f)
            _finite("features", f.detach())
        if lg is not None:
            _real("logits", lg)
            _finite("logits", lg.detach())
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
        n = (f if f is not None else lg).shape[0]
        if labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
        if n == 0:
            raise ValueError("fit needs at least one training input")
        saved = copy.copy(self.__dict__)
        try:
            with torch.no_grad():
                self._fit(None if f is None else f.detach(), labels,
                          None if lg is None else lg.detach())
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        self._cache = {}
        self._clear_calibration()
        return self

    def _clear_calibration(self) -> None:
        self._threshold = self.fpr = self.calibration_size = self.calibration_range = None

    def copy(self) -> Detector:
        """An independent copy (tensors cloned)."""
        return type(self).from_state_dict(self.state_dict())

    # ------------------------------------------------------------------ threshold
    @property
    def threshold(self) -> float | None:
        """Inputs with ``score < threshold`` are rejected (None: not calibrated).  Set it to a finite number (or
        None); NaN and +-inf are refused with ValueError."""
        return self._threshold

    @threshold.setter
    def threshold(self, value) -> None:
        self._threshold = None if value is None else _check_threshold("threshold", value)

    def calibrate(self, features: Tensor | None = None, fpr: float = 0.05, *, logits: Tensor | None = None
                  ) -> Detector:
        """Set the threshold so that a fraction ``fpr`` of these clean inputs is rejected; returns self.

        With the N clean scores sorted ascending and ``m = floor(fpr N)``, the threshold is the (m+1)-th
        smallest score; inputs scoring strictly below it are rejected -- m of the calibration inputs when the
        scores are distinct, never more than ``fpr`` of them.  ``fpr`` is the false-*rejection* rate (clean
        inputs are the positives), not OpenOOD's "FPR@95TPR".

        Args:
            features: (N, D) clean features (for members that read features).
            fpr: a number in (0, 1).
            logits: (N, K) clean logits (for members that read logits).

        Returns:
            self, with ``threshold``, ``fpr``, ``calibration_size`` and ``calibration_range`` set.
        """
        p = check_fpr(fpr)
        f, lg = self._inputs(features, logits, "calibrate")
        for name, t in (("features", f), ("logits", lg)):
            if t is not None:
                _real(name, t)
                _finite(name, t.detach())
        n = (f if f is not None else lg).shape[0]
        if n == 0:
            raise ValueError("calibrate needs at least one clean input")
        saved = copy.copy(self.__dict__)
        try:
            with torch.no_grad():
                s = self._prepare_calibration(f, lg)
            if not bool(torch.isfinite(s).all()):
                raise ValueError(f"{self.name}: the clean inputs give {int((~torch.isfinite(s)).sum())} non-finite "
                                 "score(s) (features or logits too large for the scoring dtype?): calibrate on inputs "
                                 "it scores")
            t = calibrated_threshold(s.detach().double().cpu(), p)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        self.threshold = t
        self.fpr, self.calibration_size = p, int(n)
        self.calibration_range = (float(s.min()), float(s.max()))
        return self

    def _prepare_calibration(self, features: Tensor | None, logits: Tensor | None) -> Tensor:
        """The clean scores the threshold is set from (a member that standardises on clean inputs, such as
        :class:`~lgm_ext.detectors.AnyOfDetector`, does that here first)."""
        return self.score(features, logits)

    # ------------------------------------------------------------------ scoring
    def _inputs(self, features, logits, what: str) -> tuple[Tensor | None, Tensor | None]:
        """The inputs this member reads, checked; what it does not read is ignored."""
        if not self.fitted and what != "fit":
            args = "features, labels" + (", logits" if "logits" in self.inputs else "")
            raise ValueError(f"{self.name} is not fitted: call fit({args}) first")
        f = lg = None
        if "features" in self.inputs:
            if features is None:
                raise ValueError(f"{self.name} reads features: give features (N, D)")
            f = _input("features", features, self.feat_dim if what != "fit" else None)
        if "logits" in self.inputs:
            if logits is None:
                raise ValueError(f"{self.name} reads logits: give logits=(N, K) (e.g. head.logits(features))")
            lg = _input("logits", logits, self.num_classes if what != "fit" else None,
                        None if f is None else f.shape[0])
        return f, lg

    def params(self, device: torch.device, dtype: torch.dtype) -> dict:
        """:meth:`scoring_tensors` on ``device`` in ``dtype`` (cached until :meth:`to` or a fit)."""
        key = (device, dtype)
        if key not in self._cache:
            tree = self.scoring_tensors()
            flat = {k: v.to(device=device, dtype=dtype) for k, v in flatten_tensors(tree).items()}
            self._cache[key] = nest_tensors(tree, flat)
        return self._cache[key]

    def score(self, features: Tensor | None = None, logits: Tensor | None = None) -> Tensor:
        """Scores: higher = more normal.  Needs no threshold.

        Args:
            features: (N, D) floating features (members that read features).
            logits: (N, K) floating logits (members that read logits).

        Returns:
            (N,) scores, float32 (float64 for float64 inputs), differentiable with respect to the inputs.
        """
        f, lg = self._inputs(features, logits, "score")
        ref = f if f is not None else lg
        dt = _compute_dtype(ref.dtype)
        f = None if f is None else f.to(dt)
        lg = None if lg is None else lg.to(dt)
        with _no_autocast(ref.device.type):
            return self.score_with(self.params(ref.device, dt), f, lg)

    def outlier_score(self, features: Tensor | None = None, logits: Tensor | None = None) -> Tensor:
        """``-score``: higher = more abnormal (pytorch-ood's and OpenOOD's convention)."""
        return -self.score(features, logits)

    def _need_threshold(self) -> float:
        if self._threshold is None:
            raise ValueError("threshold is not set: call calibrate(clean_features, fpr) first (score() works without "
                             "a threshold)")
        return self._threshold

    def relative_to_threshold(self, features: Tensor | None = None, logits: Tensor | None = None) -> Tensor:
        """``score - threshold``: >= 0 for accepted inputs, < 0 (or NaN) for rejected ones."""
        t = self._need_threshold()
        return self.score(features, logits) - t

    def reject(self, features: Tensor | None = None, logits: Tensor | None = None) -> Tensor:
        """(N,) bool, True (rejected) where ``not score >= threshold`` (NaN is rejected).  Needs a threshold."""
        with torch.no_grad():
            s = self.score(features, logits)  # the inputs checked first: an error names what is wrong with them
        return ~(s >= self._need_threshold())

    # ------------------------------------------------------------------ device and state
    @property
    def device(self) -> torch.device:
        flat = flatten_tensors(self._tensors())
        return next(iter(flat.values())).device if flat else torch.device("cpu")

    def to(self, device) -> Detector:
        """Move the stored tensors to ``device`` (in place; returns self).  They stay float64 (scores are
        computed in the inputs' dtype), so a dtype is refused with ValueError, as is the meta device."""
        dev = check_device(device)
        tree = self._tensors()
        self._set_tensors(nest_tensors(tree, {k: v.to(dev) for k, v in flatten_tensors(tree).items()}))
        self._cache = {}
        return self

    def state_dict(self) -> dict:
        """The member's kind, settings, tensors (float64) and calibration: ``torch.save``-able and loadable with
        ``torch.load(..., weights_only=True)``."""
        sd = {"format": FAMILY_FORMAT, "kind": self.kind, "config": self._config(),
              "tensors": {k: v for k, v in self._tensors().items()}}
        sd["tensors"] = nest_tensors(sd["tensors"], {k: v.detach().clone() for k, v in
                                                     flatten_tensors(sd["tensors"]).items()})
        sd.update(self._calibration_state())
        return sd

    def _calibration_state(self) -> dict:
        out = {}
        if self._threshold is not None:
            out["threshold"] = self._threshold
        if self.fpr is not None:
            out["fpr"], out["calibration_size"] = self.fpr, self.calibration_size
        if self.calibration_range is not None:
            out["calibration_min"], out["calibration_max"] = self.calibration_range
        return out

    def _load_calibration(self, sd: Mapping) -> None:
        self.threshold = _check_threshold("state_dict['threshold']", sd["threshold"]) if "threshold" in sd else None
        if ("fpr" in sd) != ("calibration_size" in sd):
            raise ValueError("state_dict has one of 'fpr' and 'calibration_size' but not both")
        if "fpr" in sd:
            try:
                self.fpr = check_fpr(sd["fpr"])
            except (TypeError, ValueError) as e:
                raise type(e)(f"state_dict['fpr']: {e}") from None
            size = sd["calibration_size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"state_dict['calibration_size'] must be an int >= 1, got {size!r}")
            self.calibration_size = size
        self.calibration_range = check_range(sd)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping) -> Detector:
        """The detector a :meth:`state_dict` describes: called on :class:`Detector`, whichever member the state
        names (``kind``); on a member, that member only.  Every entry is checked (TypeError/ValueError naming
        it)."""
        sd = state_dict
        if not isinstance(sd, Mapping):
            raise TypeError(f"state_dict must be a dict (a detector's state_dict()), got {type(sd).__name__}")
        from .gaussian import LikelihoodDetector

        if sd.get("format") == LikelihoodDetector.STATE_FORMAT and issubclass(LikelihoodDetector, cls):
            return LikelihoodDetector._from_flat_state(sd)
        if sd.get("format") != FAMILY_FORMAT:
            raise ValueError(f"state_dict is not a detector's state: its 'format' is {sd.get('format')!r} "
                             f"(expected {FAMILY_FORMAT!r})")
        kind = sd.get("kind")
        member = DETECTOR_KINDS.get(kind) if isinstance(kind, str) else None
        if member is None:
            raise ValueError(f"state_dict['kind'] {kind!r} is no detector of this lgm-ext (known: "
                             f"{', '.join(sorted(DETECTOR_KINDS))})")
        if not issubclass(member, cls):
            raise ValueError(f"state_dict holds a {member.__name__}, not a {cls.__name__}")
        unknown = sorted(set(map(str, sd)) - {"format", "kind", "config", "tensors", *_CALIBRATION_KEYS})
        if unknown:
            raise ValueError(f"state_dict has unknown key(s) {unknown}")
        config, tensors = sd.get("config", {}), sd.get("tensors", {})
        if not isinstance(config, Mapping) or not isinstance(tensors, Mapping):
            raise TypeError("state_dict['config'] and state_dict['tensors'] must be dicts")
        for path, t in flatten_tensors(tensors).items():
            if not t.is_floating_point():
                raise TypeError(f"state_dict['tensors'][{path!r}] must be a floating-point tensor, got {t.dtype}")
            _real(f"state_dict['tensors'][{path!r}]", t)
            _finite(f"state_dict['tensors'][{path!r}]", t)
        det = member._from_parts(dict(config), dict(tensors))
        det._load_calibration(sd)
        return det

    def __repr__(self) -> str:
        return f"{self.name}(threshold={self._threshold}, fpr={self.fpr})"

