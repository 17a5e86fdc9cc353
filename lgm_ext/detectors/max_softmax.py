"""Maximum softmax probability (Hendrycks and Gimpel, ICLR 2017; pytorch-ood's ``MaxSoftmax``, negated)."""
from __future__ import annotations

from torch import Tensor

from ._logit_scores import LogitScore

__all__ = ["MaxSoftmaxDetector"]


class MaxSoftmaxDetector(LogitScore):
    """``score = max_k softmax(logits / T)_k`` in (0, 1] (higher = more normal).  Reads logits; no fit.  Bounded:
    it flags inputs between classes, not inputs far from every class."""

    kind = "max_softmax"
    label = "max-softmax"

    def _of_logits(self, logits: Tensor) -> Tensor:
        return logits.softmax(dim=1).max(dim=1).values
