"""KNN (Sun et al., ICML 2022): minus the distance of an L2-normalised feature to its k-th nearest L2-normalised
training feature, the score pytorch-ood's ``KNN(normalize=True)`` computes, in torch (differentiable)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._util import float_tensor, in_rows, nan_rows, positive_int
from .base import Detector
from .gaussian import l2_normalised

__all__ = ["KNNDetector", "KNN_K", "KNN_BANK"]

KNN_K = 50  #: Sun et al.'s k for CIFAR-10 (pytorch-ood's default)
KNN_BANK = 20_000  #: the default bank size: at most this many training features are kept (seeded subsample)


class KNNDetector(Detector):
    """Sun et al.'s KNN detector: ``score(x) = -|z - b_(k)|``, ``z = x / |x|``, ``b_(k)`` the k-th nearest of the
    bank of normalised training features (the same ranking and values as pytorch-ood's ``KNN``, which indexes
    them with scikit-learn; here the distances are a torch top-k, so the score has a gradient).

    Bank-size policy: :meth:`fit` keeps every training feature up to ``max_bank``; beyond it, a subsample of
    ``max_bank`` drawn without replacement with ``torch.Generator().manual_seed(seed)`` (the same features for
    the same inputs and seed).  Memory: the bank is ``max_bank x D`` float64 (16 MB at 20,000 x 100) plus a copy
    in the scoring dtype; scoring forms ``(rows, bank)`` distances in chunks of at most 4 M elements (one piece
    when traced by torch.export).

    Args:
        k: the neighbour whose distance is the score (>= 1; a fit needs at least k features).
        max_bank: the most training features kept (>= k), or None for all.
        seed: the subsample's seed.
    """

    kind = "knn"
    inputs = ("features",)

    def __init__(self, k: int = KNN_K, *, max_bank: int | None = KNN_BANK, seed: int = 0) -> None:
        super().__init__()
        self.k = positive_int("k", k)
        self.max_bank = positive_int("max_bank", max_bank, allow_none=True)
        if self.max_bank is not None and self.max_bank < self.k:
            raise ValueError(f"max_bank ({self.max_bank}) must be >= k ({self.k})")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.bank: Tensor | None = None

    fitted = property(lambda self: self.bank is not None)

    @property
    def name(self) -> str:
        return f"KNN (k={self.k})"

    def _fit(self, features, labels, logits) -> None:
        n = features.shape[0]
        if n < self.k:
            raise ValueError(f"KNN with k = {self.k} needs at least {self.k} training features, got {n}")
        x = features
        if self.max_bank is not None and n > self.max_bank:
            g = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(n, generator=g)[: self.max_bank].sort().values
            x = x[keep.to(x.device)]
        self.bank = l2_normalised(x.to(torch.float64))
        self.feat_dim = int(x.shape[1])

    def _tensors(self) -> dict:
        return {} if self.bank is None else {"bank": self.bank}

    def _set_tensors(self, tensors: dict) -> None:
        self.bank = tensors.get("bank")

    def _config(self) -> dict:
        return {"k": self.k, "max_bank": self.max_bank, "seed": self.seed}

    @classmethod
    def _from_parts(cls, config: dict, tensors: dict) -> KNNDetector:
        det = cls(config.get("k", KNN_K), max_bank=config.get("max_bank", KNN_BANK), seed=config.get("seed", 0))
        if "bank" in tensors:
            bank = float_tensor("state_dict['tensors']['bank']", tensors["bank"], (None, None))
            if bank.shape[0] < det.k:
                raise ValueError(f"state_dict['tensors']['bank'] has {bank.shape[0]} rows, fewer than k = {det.k}")
            det.bank, det.feat_dim = bank, int(bank.shape[1])
        return det

    def score_with(self, params: dict, features: Tensor | None, logits: Tensor | None = None) -> Tensor:
        bank = params["bank"]
        b2 = bank.pow(2).sum(1)
        k = self.k

        def kth(z: Tensor) -> Tensor:
            d2 = (z.pow(2).sum(1, keepdim=True) - 2 * z @ bank.T + b2).clamp_min(0.0)
            return d2.topk(k, dim=1, largest=False).values[:, -1]

        z = l2_normalised(features)
        return -in_rows(kth, z, bank.shape[0]).clamp_min(1e-24).sqrt() + nan_rows(z)
