"""MaxLogit (Hendrycks et al., ICML 2022): the largest logit (pytorch-ood's ``MaxLogit``, negated)."""
from __future__ import annotations

from torch import Tensor

from ._logit_scores import LogitScore

__all__ = ["MaxLogitDetector"]


class MaxLogitDetector(LogitScore):
    """``score = max_k logits_k / T`` (higher = more normal).  Reads logits; no fit."""

    kind = "max_logit"
    label = "MaxLogit"

    def _of_logits(self, logits: Tensor) -> Tensor:
        return logits.max(dim=1).values
