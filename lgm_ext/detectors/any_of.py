"""A combination of detectors that rejects an input when any member rejects it, calibrated jointly: the
combination's false-rejection rate on the clean inputs is the one requested, not each member's."""
from __future__ import annotations

import torch
from torch import Tensor

from ._util import float_tensor
from .base import Detector

__all__ = ["AnyOfDetector", "STANDARD_QUANTILE"]

#: The lower quantile of each member's clean scores that sets its scale: ``scale = median - q_0.05``.
STANDARD_QUANTILE = 0.05


class AnyOfDetector(Detector):
    """Reject when any member rejects: ``score = min_i (s_i - m_i) / r_i`` over the members' scores ``s_i``.

    :meth:`calibrate` standardises each member on the clean inputs -- ``m_i`` the median of its clean scores,
    ``r_i = m_i - q_i`` with ``q_i`` their 5% quantile (:data:`STANDARD_QUANTILE`), so one unit is each member's
    own spread into its lower tail -- and then sets one threshold ``t`` on the combined score, by the family's
    convention, so that a fraction ``fpr`` of the clean inputs is rejected **by the combination**.  An input is
    accepted exactly when every member's score ``s_i >= m_i + t r_i``: the members' thresholds sit at the same
    standardised level, chosen jointly (each member alone then rejects less than ``fpr``).
    :meth:`rejected_by` says which members reject an input at that threshold.

    The score is differentiable (a minimum of affine maps of the members' scores: its gradient is that of the
    member nearest to rejecting), so an adaptive attack sees every member.  Reads what its members read; fitting
    fits every member (in place) and clears the standardisation; scoring needs :meth:`calibrate` first (or a
    state that holds the standardisation).

    Args:
        members: two or more detectors (any members of the family, fitted or not).
    """

    kind = "any_of"

    def __init__(self, members) -> None:
        super().__init__()
        members = list(members) if isinstance(members, (list, tuple)) else members
        if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, Detector) for m in members):
            raise TypeError("members must be a list of two or more lgm_ext.detectors.Detector")
        if any(isinstance(m, AnyOfDetector) for m in members):
            raise ValueError("members must not be combinations themselves: list their members instead")
        self.members = members
        self.inputs = tuple(i for i in ("features", "logits") if any(i in m.inputs for m in members))
        self.requires_fit = any(m.requires_fit for m in members)
        self.center: Tensor | None = None
        self.scale: Tensor | None = None
        self._check_widths()

    def _check_widths(self) -> None:
        for attr in ("feat_dim", "num_classes"):
            widths = {getattr(m, attr) for m in self.members} - {None}
            if len(widths) > 1:
                raise ValueError(f"members disagree on {attr}: {sorted(widths)}")

    feat_dim = property(lambda self: next((m.feat_dim for m in self.members if m.feat_dim is not None), None))
    num_classes = property(lambda self: next((m.num_classes for m in self.members if m.num_classes is not None),
                                             None))

    @property
    def fitted(self) -> bool:
        return all(m.fitted for m in self.members)

    @property
    def standardised(self) -> bool:
        return self.center is not None

    @property
    def name(self) -> str:
        return " + ".join(m.name for m in self.members)

    def _fit(self, features, labels, logits) -> None:
        fitted = [m.copy() for m in self.members]  # a member that raises leaves every member as it was
        for m in fitted:
            if not m.requires_fit:  # given (an L-GM head's own Gaussians, a head's centers): kept as it is
                continue
            f_m, lg_m = self._member_inputs(m, features, logits)
            m.fit(f_m, labels, logits=lg_m)
        AnyOfDetector(fitted)  # the refitted members agree on their widths, checked before any member changes
        for m, new in zip(self.members, fitted):
            m.__dict__.clear()
            m.__dict__.update(new.__dict__)
        self._check_widths()
        self.center = self.scale = None

    def _member_inputs(self, m: Detector, features, logits):
        return (features if "features" in m.inputs else None), (logits if "logits" in m.inputs else None)

    def member_scores(self, features: Tensor | None = None, logits: Tensor | None = None) -> Tensor:
        """(N, M) the members' own scores (each higher = more normal)."""
        f, lg = self._inputs(features, logits, "score")
        return torch.stack([m.score(*self._member_inputs(m, f, lg)) for m in self.members], dim=1)

    def _prepare_calibration(self, features, logits) -> Tensor:
        """Standardise the members on these clean inputs (the new center and scale are kept only if the
        calibration then succeeds: :meth:`Detector.calibrate` restores the detector otherwise) and return the
        combined scores, computed as :meth:`score` computes them, so that the threshold set from them rejects
        exactly what :meth:`reject` and a RejectingClassifier reject."""
        s = self.member_scores(features, logits).to(torch.float64)
        center = s.median(dim=0).values
        low = torch.quantile(s, STANDARD_QUANTILE, dim=0)
        spread = center - low
        tiny = 1e-12 * center.abs().clamp(min=1.0)
        dev = self.members[0].device
        self.center, self.scale = center.to(dev), torch.where(spread > tiny, spread, tiny).to(dev)
        self._cache = {}
        return self.score(features, logits)

    def calibrate(self, features: Tensor | None = None, fpr: float = 0.05, *, logits: Tensor | None = None
                  ) -> AnyOfDetector:
        super().calibrate(features, fpr, logits=logits)
        for i, m in enumerate(self.members):  # each member's own threshold, where the combination puts it
            m.threshold = float(self.center[i] + self._threshold * self.scale[i])
        return self

    def _standardised(self, params: dict, features: Tensor | None, logits: Tensor | None) -> Tensor:
        """(N, M) each member's standardised score ``(s_i - m_i) / r_i``."""
        return torch.stack([(m.score_with(p, *self._member_inputs(m, features, logits)) - params["center"][i])
                            / params["scale"][i] for i, (m, p) in enumerate(zip(self.members, params["members"]))],
                           dim=1)

    def rejected_by(self, features: Tensor | None = None, logits: Tensor | None = None) -> Tensor:
        """(N, M) bool: which members reject each input at the combination's threshold (computed as :meth:`score`
        computes the standardised scores: an input is rejected exactly when any is; NaN counts as rejected)."""
        t = self._need_threshold()
        f, lg = self._inputs(features, logits, "score")
        ref = f if f is not None else lg
        dt = torch.float64 if ref.dtype == torch.float64 else torch.float32
        f = None if f is None else f.to(dt)
        lg = None if lg is None else lg.to(dt)
        with torch.no_grad():
            z = self._standardised(self.params(ref.device, dt), f, lg)
        return ~(z >= t)

    def scoring_tensors(self) -> dict:
        if self.center is None:
            raise ValueError(f"{self.name}: the combination is not standardised yet: call calibrate(clean inputs, "
                             f"fpr) first")
        return {"members": [m.scoring_tensors() for m in self.members], "center": self.center, "scale": self.scale}

    def score_with(self, params: dict, features: Tensor | None, logits: Tensor | None) -> Tensor:
        return self._standardised(params, features, logits).amin(dim=1)

    def score(self, features: Tensor | None = None, logits: Tensor | None = None) -> Tensor:
        if self.center is None:
            raise ValueError(f"{self.name}: the combination's score needs calibrate(clean inputs, fpr) first (it "
                             "standardises its members' scores on clean inputs)")
        return super().score(features, logits)

    def _tensors(self) -> dict:
        return {} if self.center is None else {"center": self.center, "scale": self.scale}

    def stored_tensors(self) -> dict:
        return {"members": [m.stored_tensors() for m in self.members], **self._tensors()}

    def _set_tensors(self, tensors: dict) -> None:
        self.center, self.scale = tensors.get("center"), tensors.get("scale")

    def to(self, device) -> AnyOfDetector:
        for m in self.members:
            m.to(device)
        return super().to(device)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def _config(self) -> dict:
        return {"members": [m.state_dict() for m in self.members]}

    @classmethod
    def _from_parts(cls, config: dict, tensors: dict) -> AnyOfDetector:
        states = config.get("members")
        if not isinstance(states, list) or len(states) < 2:
            raise ValueError("state_dict['config']['members'] must list two or more member states")
        members = []
        for i, sd in enumerate(states):
            try:
                members.append(Detector.from_state_dict(sd))
            except (TypeError, ValueError) as e:
                raise type(e)(f"state_dict['config']['members'][{i}]: {e}") from None
        det = cls(members)
        if ("center" in tensors) != ("scale" in tensors):
            raise ValueError("state_dict['tensors'] must hold both 'center' and 'scale' or neither")
        if "center" in tensors:
            m = len(members)
            det.center = float_tensor("state_dict['tensors']['center']", tensors["center"], (m,))
            det.scale = float_tensor("state_dict['tensors']['scale']", tensors["scale"], (m,))
            if not bool((det.scale > 0).all()):
                raise ValueError("state_dict['tensors']['scale'] must be > 0")
        return det
