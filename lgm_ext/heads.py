"""Classification heads compared by the source documents, behind one interface:
``loss, logits = head(features, labels)``; ``head.predict(features)``;
``head.score(features)``, the likelihood-style score of the predicted class
used for adversarial verification (paper section 4.3), and ``head.log_score``,
its logarithm, which ROC curves use (exp(-d) underflows for large d).

- ``softmax``: a linear layer and cross-entropy; score = the affinity wᵀx+b of
  the predicted class, normalised to (0, 1] by a sigmoid.
- ``center``: softmax + lambda_c * center loss (Wen et al.), centers updated by
  their own rule; score = exp(-|x - c_ŷ|² / 2).
- ``lgm``: the L-GM loss (:class:`lgm_ext.LGMLoss`); score = exp(-d[n, ŷ]).
  ``alpha``/``lambda_`` can be ramped (``set_warmup``): SPEC section 5 measured
  NaN within 15 steps without a ramp.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import CenterLoss, LGMLoss

__all__ = ["SoftmaxHead", "CenterHead", "LGMHead", "build_head", "HEADS"]


class SoftmaxHead(nn.Module):
    kind = "softmax"

    def __init__(self, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(feat_dim, num_classes)

    def logits(self, features: Tensor) -> Tensor:
        return self.fc(features)

    def forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.logits(features)
        return F.cross_entropy(logits, labels), logits

    def predict(self, features: Tensor) -> Tensor:
        return self.logits(features).argmax(1)

    def score(self, features: Tensor) -> Tensor:
        return self.log_score(features).exp()

    def log_score(self, features: Tensor) -> Tensor:
        """log of :meth:`score`, exact where the score underflows (use it for ROC)."""
        return F.logsigmoid(self.logits(features).max(1).values)

    def class_weights(self) -> Tensor:
        return self.fc.weight


class CenterHead(SoftmaxHead):
    kind = "center"

    def __init__(self, feat_dim: int, num_classes: int, *, lambda_c: float = 0.01, center_alpha: float = 0.5) -> None:
        super().__init__(feat_dim, num_classes)
        self.lambda_c = float(lambda_c)
        self.center = CenterLoss(num_classes, feat_dim, alpha=center_alpha)

    def forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.logits(features)
        return F.cross_entropy(logits, labels) + self.lambda_c * self.center(features, labels), logits

    def log_score(self, features: Tensor) -> Tensor:
        c = self.center.centers.index_select(0, self.predict(features))
        return -0.5 * (features - c).pow(2).sum(1)

    def centers(self) -> Tensor:
        return self.center.centers

    def log_likelihood(self, features: Tensor) -> Tensor:
        """log N(x; c_ŷ, I): the center-loss model read as a unit-variance Gaussian per class."""
        return self.log_score(features) - 0.5 * features.shape[1] * math.log(2 * math.pi)


class LGMHead(nn.Module):
    kind = "lgm"

    def __init__(self, feat_dim: int, num_classes: int, *, alpha: float = 1.0, lambda_: float = 0.1,
                 covariance: str = "diag") -> None:
        super().__init__()
        self.lgm = LGMLoss(num_classes, feat_dim, alpha=alpha, lambda_=lambda_, covariance=covariance)
        self.target_alpha, self.target_lambda = float(alpha), float(lambda_)

    def set_warmup(self, fraction: float) -> None:
        """Scale alpha and lambda_ by ``fraction`` in [0, 1] (a linear ramp from 0)."""
        f = min(1.0, max(0.0, float(fraction)))
        self.lgm.alpha, self.lgm.lambda_ = f * self.target_alpha, f * self.target_lambda

    def logits(self, features: Tensor) -> Tensor:
        return self.lgm.logits(features)

    def forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return self.lgm(features, labels)

    def predict(self, features: Tensor) -> Tensor:
        return self.lgm.predict(features)

    def log_likelihood(self, features: Tensor) -> Tensor:
        return self.lgm.log_likelihood(features)

    def score(self, features: Tensor) -> Tensor:
        return self.log_score(features).exp()

    def log_score(self, features: Tensor) -> Tensor:
        """-d[n, ŷ] (the log of exp(-d)); exact where exp(-d) underflows."""
        logits = self.logits(features)  # -d - hl
        best = logits.argmax(1)
        s = self.lgm._log_var()
        hl = 0.5 * s.sum(1) if s is not None else torch.zeros_like(logits[0])
        return logits.gather(1, best[:, None]).squeeze(1) + hl[best]

    def centers(self) -> Tensor:
        return self.lgm.means


HEADS = {"softmax": SoftmaxHead, "center": CenterHead, "lgm": LGMHead}


def build_head(kind: str, feat_dim: int, num_classes: int, **kw) -> nn.Module:
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {sorted(HEADS)}")
    if kind == "softmax":
        kw = {}
    elif kind == "center":
        kw = {k: v for k, v in kw.items() if k in ("lambda_c", "center_alpha")}
    else:
        kw = {k: v for k, v in kw.items() if k in ("alpha", "lambda_", "covariance")}
    return HEADS[kind](feat_dim, num_classes, **kw)
