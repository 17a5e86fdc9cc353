"""The detector family (docs/SPEC.md section 8; docs/detector.md): one base, :class:`Detector`, a file per
member, and one registry, :data:`DETECTORS`, that the lab's reports, ``lgm detect`` and ``lgm ood`` build
detectors from by name.

Members:

- :class:`LikelihoodDetector` (``gaussian``): class-conditional Gaussians -- an L-GM head's own
  (:meth:`~LikelihoodDetector.from_head`) or fitted with tied (Mahalanobis, Lee et al. 2018), diagonal or identity
  covariances, optionally on L2-normalised features;
- :class:`KNNDetector` (Sun et al. 2022), :class:`ViMDetector` (Wang et al. 2022);
- :class:`EnergyDetector` (Liu et al. 2020), :class:`MaxLogitDetector` (Hendrycks et al. 2022),
  :class:`MaxSoftmaxDetector` (Hendrycks and Gimpel 2017), scores of the logits;
- :class:`CenterDistanceDetector`: the distance to the predicted class's center;
- :class:`AnyOfDetector`: reject when any member rejects, calibrated jointly.

Every member scores what it reads (features, logits or both: :attr:`Detector.inputs`), higher = more normal,
differentiably; calibrates a threshold at a false-rejection rate; saves and loads its state
(``Detector.from_state_dict`` builds any member); and goes into :class:`lgm_ext.RejectingClassifier`.

By name::

    from lgm_ext import detectors
    det = detectors.create("mahalanobis-l2", head, features=f_train, labels=y_train)  # fitted
    det.calibrate(f_clean, fpr=0.05)
    both = detectors.create("mahalanobis-l2+mahalanobis", head, features=f_train, labels=y_train)

Adding a member: a file with a :class:`Detector` subclass (its ``kind``, ``inputs``, ``_fit``, ``_tensors``,
``_config``, ``_from_parts`` and ``score_with``), and a line in :data:`DETECTORS` (docs/internals.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from .any_of import AnyOfDetector
from .base import DETECTOR_KINDS, Detector
from .center import CenterDistanceDetector
from .energy import EnergyDetector
from .gaussian import LikelihoodDetector, l2_normalised
from .knn import KNN_BANK, KNN_K, KNNDetector
from .max_logit import MaxLogitDetector
from .max_softmax import MaxSoftmaxDetector
from .on_features import OnFeatures
from .vim import ViMDetector, vim_dim

__all__ = ["Detector", "OnFeatures", "LikelihoodDetector", "KNNDetector", "ViMDetector", "EnergyDetector",
           "MaxLogitDetector", "MaxSoftmaxDetector", "CenterDistanceDetector", "AnyOfDetector", "DETECTORS",
           "DETECTOR_KINDS", "Entry", "create", "label", "names_for", "applies", "needs_fit", "reads", "KNN_K",
           "KNN_BANK", "vim_dim", "l2_normalised", "DEFAULT_DETECTOR"]

#: What ``lgm detect fit`` fits when no detector is named, for every kind of head: Mahalanobis on
#: L2-normalised features, the detector the standard detection report recommends (docs/detector.md).
DEFAULT_DETECTOR = "mahalanobis-l2"


def _is_lgm_head(head) -> bool:
    from ..distributed import ShardedLGMLoss
    from ..modules import LGMLoss

    return isinstance(head, (LGMLoss, ShardedLGMLoss))


def _centers(head) -> Tensor | None:
    """A head's class centers: ``head.centers()`` (the lab's heads) or an L-GM head's means."""
    fn = getattr(head, "centers", None)
    c = fn() if callable(fn) else None
    if c is None and _is_lgm_head(head):
        c = head.means
    return c.detach() if isinstance(c, Tensor) else None


def _has_fc(head) -> bool:
    import torch

    fc = head if isinstance(head, torch.nn.Linear) else getattr(head, "fc", None)
    return isinstance(fc, torch.nn.Linear) and fc.bias is not None and fc.in_features >= 2


def _classes(head, labels) -> int | None:
    k = getattr(head, "num_classes", None)
    return k if isinstance(k, int) and not isinstance(k, bool) else None


def _gaussian(covariance: str, normalize: bool = False):
    return lambda head, f, y, lg, **kw: LikelihoodDetector.fit(f, y, covariance, num_classes=_classes(head, y),
                                                               normalize=normalize, **kw)


def _knn(head, f, y, lg, k: int | None = None, **kw):
    n = 0 if f is None else len(f)
    return KNNDetector(k if k is not None else max(1, min(KNN_K, n)), **kw).fit(f, y)


def _center(head, f, y, lg):
    c = _centers(head) if head is not None else None
    return CenterDistanceDetector(c) if c is not None else CenterDistanceDetector().fit(f, y, logits=lg)


@dataclass(frozen=True)
class Entry:
    """A registry line: the name reports print (``label``), how to build the detector for a head from
    training inputs (``create(head, features, labels, logits, **options)``: fitted, uncalibrated), which
    heads it applies to, whether it is fitted to training inputs (``fitted``) and the member it builds
    (``member``: what it reads is that class's ``inputs``)."""

    label: str
    create: Callable
    applies: Callable = lambda head: True
    fitted: bool = True
    summary: str = ""
    member: type = LikelihoodDetector


DETECTORS: dict[str, Entry] = {
    "lgm-likelihood": Entry("L-GM likelihood", lambda h, f, y, lg: LikelihoodDetector.from_head(h), _is_lgm_head,
                            False, "an L-GM head's own Gaussians, log-likelihood of the predicted class"),
    "lgm-mixture": Entry("L-GM mixture", lambda h, f, y, lg: LikelihoodDetector.from_head(h, score="mixture"),
                         _is_lgm_head, False, "an L-GM head's own Gaussians, equal-prior mixture density"),
    "lgm-paper": Entry("L-GM paper score (identity distance)", _center, _is_lgm_head, False,
                       "the L-GM paper's score (its section 4.3): distance to the predicted class's mean, identity "
                       "covariance", member=CenterDistanceDetector),
    "lgm-distance": Entry("L-GM distance (no log-det)",
                          lambda h, f, y, lg: LikelihoodDetector.from_head(h, score="distance"), _is_lgm_head, False,
                          "an L-GM head's own Gaussians, Mahalanobis distance to the predicted class's mean"),
    "lgm-max-posterior": Entry("L-GM max posterior",
                               lambda h, f, y, lg: LikelihoodDetector.from_head(h, score="max_posterior"),
                               _is_lgm_head, False, "an L-GM head's own Gaussians, the largest class posterior"),
    "mahalanobis": Entry("Mahalanobis", _gaussian("tied"), summary="tied-covariance Gaussians fitted to the "
                                                                   "features (Lee et al. 2018)"),
    "mahalanobis-l2": Entry("Mahalanobis (L2-normalised)", _gaussian("tied", True),
                            summary="Mahalanobis on L2-normalised features (the recommended detector)"),
    "gaussian-diag": Entry("Gaussians re-fitted (diag)", _gaussian("diag"),
                           summary="diagonal-covariance Gaussians fitted to the features"),
    "gaussian-identity": Entry("Gaussians re-fitted (identity)", _gaussian("identity"),
                               summary="class means with identity covariance"),
    "knn": Entry("KNN", _knn, summary=f"distance to the k-th nearest normalised training feature (k = {KNN_K})",
                 member=KNNDetector),
    "vim": Entry("ViM", lambda h, f, y, lg, d=None: ViMDetector.for_classifier(h, d).fit(f, y), _has_fc,
                 summary="virtual-logit matching (needs a linear classifier)", member=ViMDetector),
    "energy": Entry("Energy", lambda h, f, y, lg, **kw: EnergyDetector(**kw), fitted=False,
                    summary="logsumexp of the logits", member=EnergyDetector),
    "max-logit": Entry("MaxLogit", lambda h, f, y, lg, **kw: MaxLogitDetector(**kw), fitted=False,
                       summary="the largest logit", member=MaxLogitDetector),
    "max-softmax": Entry("max-softmax", lambda h, f, y, lg, **kw: MaxSoftmaxDetector(**kw), fitted=False,
                         summary="the largest softmax probability", member=MaxSoftmaxDetector),
    "center-distance": Entry("center distance", _center, lambda h: _centers(h) is not None, False,
                             summary="distance to the predicted class's center (the head's centers or means)",
                             member=CenterDistanceDetector),
}


def _parts(name: str) -> list[str]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"detector name must be a non-empty string, got {name!r}")
    parts = [p.strip() for p in name.split("+")]
    unknown = [p for p in parts if p not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown detector {unknown[0]!r}: the detectors are {', '.join(DETECTORS)}, or two or more "
                         f"joined by '+' (reject when any rejects)")
    if len(set(parts)) != len(parts):
        raise ValueError(f"detector {name!r} names a member twice")
    return parts


def label(name: str) -> str:
    """The name reports print for a registry name (``"mahalanobis-l2+mahalanobis"`` ->
    ``"Mahalanobis (L2-normalised) + Mahalanobis"``)."""
    return " + ".join(DETECTORS[p].label for p in _parts(name))


def applies(name: str, head) -> bool:
    """Whether the detector ``name`` can be built for ``head`` (e.g. ViM needs a linear classifier)."""
    return all(DETECTORS[p].applies(head) for p in _parts(name))


def needs_fit(name: str) -> bool:
    """Whether building ``name`` needs training inputs."""
    return any(DETECTORS[p].fitted for p in _parts(name))


def reads(name: str) -> tuple[str, ...]:
    """What the built detector reads ("features", "logits")."""
    out = {i for p in _parts(name) for i in DETECTORS[p].member.inputs}
    return tuple(i for i in ("features", "logits") if i in out)


def names_for(head) -> tuple[str, ...]:
    """The registry's names that apply to ``head``, in registry order."""
    return tuple(n for n, e in DETECTORS.items() if e.applies(head))


def create(name: str, head=None, *, features: Tensor | None = None, labels: Tensor | None = None,
           logits: Tensor | None = None, **options) -> Detector:
    """The detector ``name`` for ``head``, fitted to the training inputs (features, labels and, where it reads
    them, logits) when it is fitted; uncalibrated.  ``name`` is a key of :data:`DETECTORS` or several joined by
    ``+`` (an :class:`AnyOfDetector`).  ``options`` go to a single member's constructor or fit (e.g. ``k`` for
    ``knn``, ``d`` for ``vim``, ``temperature`` for the logit scores, ``ridge`` for the Gaussians).

    Raises:
        ValueError: an unknown name, a detector that does not apply to ``head`` (naming why), or a fitted one
            without training inputs.
    """
    parts = _parts(name)
    if options and len(parts) > 1:
        raise ValueError(f"options {sorted(options)} go to a single detector, not to the combination {name!r}")
    members = []
    for p in parts:
        entry = DETECTORS[p]
        if head is not None and not entry.applies(head):
            raise ValueError(f"the {p} detector does not apply to this head ({type(head).__name__}): "
                             f"{entry.summary}")
        if head is None and p in ("lgm-likelihood", "lgm-mixture", "vim"):
            raise ValueError(f"the {p} detector is built from a head: give head")
        if entry.fitted and (labels is None or (features is None and "features" in reads(p))):
            raise ValueError(f"the {p} detector is fitted to training inputs: give features and labels")
        try:
            members.append(entry.create(head, features, labels, logits, **options))
        except TypeError as e:
            if options and "argument" in str(e):
                raise TypeError(f"options {sorted(options)} do not apply to the {p} detector") from None
            raise
    return members[0] if len(members) == 1 else AnyOfDetector(members)
