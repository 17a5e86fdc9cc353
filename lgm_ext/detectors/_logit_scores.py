"""What the scores of logits share: no fit, no tensors, a temperature."""
from __future__ import annotations

from torch import Tensor

from ._util import nan_rows, positive_float
from .base import Detector

__all__ = ["LogitScore"]


class LogitScore(Detector):
    """A score of the logits alone: nothing to fit (:meth:`fit` is accepted and changes nothing but the
    calibration), nothing stored but the temperature ``T`` (> 0; 1 by default, as pytorch-ood)."""

    inputs = ("logits",)
    requires_fit = False
    label = ""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = positive_float("temperature", temperature)

    @property
    def name(self) -> str:
        return self.label + (f" (T={self.temperature:g})" if self.temperature != 1.0 else "")

    def _config(self) -> dict:
        return {"temperature": self.temperature}

    @classmethod
    def _from_parts(cls, config: dict, tensors: dict) -> LogitScore:
        if tensors:
            raise ValueError(f"state_dict['tensors'] must be empty for {cls.__name__}, got {sorted(tensors)}")
        return cls(config.get("temperature", 1.0))

    def score_with(self, params: dict, features: Tensor | None, logits: Tensor | None) -> Tensor:
        # + nan_rows: a row with an infinite or NaN logit scores NaN (rejected), not +inf (accepted)
        return self._of_logits(logits / self.temperature if self.temperature != 1.0 else logits) + nan_rows(logits)

    def _of_logits(self, logits: Tensor) -> Tensor:
        raise NotImplementedError
