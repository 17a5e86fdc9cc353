"""The center distance: ``-|x - c_yhat|^2 / 2``, the squared distance of a feature to the center of the class the
network predicts -- center loss's learned centers (Wen et al. 2016), or an L-GM head's means, where it is the
paper's identity-covariance score (Wan et al. 2018, section 4.3), or class means fitted to training features."""
from __future__ import annotations

import torch
from torch import Tensor

from ._util import float_tensor, nan_rows
from .base import Detector

__all__ = ["CenterDistanceDetector"]


class CenterDistanceDetector(Detector):
    """``score(x, logits) = -|x - c_k|^2 / 2`` with ``k = argmax logits`` (the network's prediction).

    Reads features and logits.  Given ``centers`` (K, D) -- a head's learned centers or means -- it needs no
    fit (:meth:`fit` changes nothing but the calibration); without, :meth:`fit` sets them to the class means of
    the training features (float64).

    Args:
        centers: (K, D) class centers, or None (fitted).
    """

    kind = "center_distance"
    inputs = ("features", "logits")

    def __init__(self, centers: Tensor | None = None) -> None:
        super().__init__()
        self.requires_fit = centers is None
        self.centers: Tensor | None = None
        if centers is not None:
            self._set_centers(float_tensor("centers", centers, (None, None)))

    def _set_centers(self, c: Tensor) -> None:
        if c.shape[0] < 1 or c.shape[1] < 1:
            raise ValueError(f"centers must have K >= 1 rows and D >= 1 columns, got {tuple(c.shape)}")
        self.centers, self.num_classes, self.feat_dim = c, int(c.shape[0]), int(c.shape[1])

    fitted = property(lambda self: self.centers is not None)

    @property
    def name(self) -> str:
        return "center distance"

    def _fit(self, features, labels, logits) -> None:
        k = int(labels.max()) + 1 if logits is None else logits.shape[1]
        if int(labels.min()) < 0 or int(labels.max()) >= k:
            raise ValueError(f"labels must lie in [0, {k}) (the logits' classes)")
        x = features.to(torch.float64)
        counts = torch.bincount(labels.to(x.device), minlength=k)
        if bool((counts == 0).any()):
            raise ValueError(f"labels: class(es) {torch.nonzero(counts == 0).flatten().tolist()[:10]} have no sample")
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, labels.to(x.device), x)
        self._set_centers(sums / counts[:, None])

    def _tensors(self) -> dict:
        return {} if self.centers is None else {"centers": self.centers}

    def _set_tensors(self, tensors: dict) -> None:
        self.centers = tensors.get("centers")

    def _config(self) -> dict:
        return {"fitted_centers": self.requires_fit}

    @classmethod
    def _from_parts(cls, config: dict, tensors: dict) -> CenterDistanceDetector:
        det = cls(tensors["centers"] if "centers" in tensors else None)
        det.requires_fit = bool(config.get("fitted_centers", False))
        return det

    def score_with(self, params: dict, features: Tensor | None, logits: Tensor | None) -> Tensor:
        c = params["centers"].index_select(0, logits.argmax(dim=1))
        return -0.5 * (features - c).pow(2).sum(1) + nan_rows(logits)
