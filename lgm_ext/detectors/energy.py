"""Energy (Liu et al., NeurIPS 2020): ``T logsumexp(logits / T)``, minus the free energy (pytorch-ood's
``EnergyBased``, whose outlier score is its negation)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._logit_scores import LogitScore

__all__ = ["EnergyDetector"]


class EnergyDetector(LogitScore):
    """``score = T * logsumexp(logits / T)`` (higher = more normal).  Reads logits; no fit."""

    kind = "energy"
    label = "Energy"

    def _of_logits(self, logits: Tensor) -> Tensor:
        return self.temperature * torch.logsumexp(logits, dim=1)
