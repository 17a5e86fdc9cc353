"""Loss heads: :class:`LGMLoss` (learnable Gaussian mixture) and :class:`CenterLoss`."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import reference
from .functional import lgm_log_likelihood, lgm_logits, lgm_loss_and_logits

__all__ = ["LGMLoss", "CenterLoss"]


def _check_labels(labels: Tensor, n: int, k: int) -> None:
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k})")


class LGMLoss(nn.Module):
    """Large-Margin Gaussian Mixture head (Wan et al., CVPR 2018).

    Learns one Gaussian per class: ``means`` (K, D) and, for
    ``covariance="diag"``, ``log_var`` (K, D), the log of the covariance
    diagonal (``"identity"`` fixes it to 0).  ``forward(features, labels)``
    returns ``(loss, logits)`` where logits are margin-free (use them for
    accuracy); ``predict`` and ``log_likelihood`` serve inference.

    Initialisation: means Xavier-uniform, log-variances 0.  ``log_var`` is
    clamped to ``[-log_var_bound, log_var_bound]`` in every forward: a
    collapsing variance would otherwise blow up the log-det term (NaN).  The
    clamp is applied to the value used (beyond the bound the gradient is 0).
    ``backend="reference"`` swaps the fused operator for the pure-PyTorch oracle.
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        *,
        alpha: float = 1.0,
        lambda_: float = 0.1,
        covariance: str = "diag",
        log_var_bound: float = 6.0,
        reduction: str = "mean",
        backend: str = "fused",
    ) -> None:
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(f"num_classes and feat_dim must be >= 1, got {num_classes}, {feat_dim}")
        if covariance not in ("diag", "identity"):
            raise ValueError(f"covariance must be 'diag' or 'identity', got {covariance!r}")
        if backend not in ("fused", "reference"):
            raise ValueError(f"backend must be 'fused' or 'reference', got {backend!r}")
        if not alpha >= 0 or not lambda_ >= 0:
            raise ValueError(f"alpha and lambda_ must be >= 0, got {alpha}, {lambda_}")
        if not log_var_bound > 0:
            raise ValueError(f"log_var_bound must be > 0, got {log_var_bound}")
        self.num_classes, self.feat_dim = num_classes, feat_dim
        self.alpha, self.lambda_ = float(alpha), float(lambda_)
        self.covariance, self.backend, self.reduction = covariance, backend, reduction
        self.log_var_bound = float(log_var_bound)
        self.means = nn.Parameter(torch.empty(num_classes, feat_dim))
        if covariance == "diag":
            self.log_var = nn.Parameter(torch.zeros(num_classes, feat_dim))
        else:
            self.register_parameter("log_var", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.means)
        if self.log_var is not None:
            nn.init.zeros_(self.log_var)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, alpha={self.alpha}, "
            f"lambda_={self.lambda_}, covariance={self.covariance!r}, backend={self.backend!r}"
        )

    def _log_var(self) -> Tensor | None:
        if self.log_var is None:
            return None
        return self.log_var.clamp(-self.log_var_bound, self.log_var_bound)

    def forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        s = self._log_var()
        if self.backend == "reference":
            loss = reference.lgm_loss(
                features, self.means, s, labels, alpha=self.alpha, lambda_=self.lambda_, reduction=self.reduction
            )
            return loss, reference.lgm_logits(features, self.means, s)
        return lgm_loss_and_logits(
            features, self.means, s, labels, alpha=self.alpha, lambda_=self.lambda_, reduction=self.reduction
        )

    def logits(self, features: Tensor, labels: Tensor | None = None, *, alpha: float = 0.0) -> Tensor:
        return lgm_logits(features, self.means, self._log_var(), labels, alpha=alpha)

    def predict(self, features: Tensor) -> Tensor:
        return self.logits(features).argmax(1)

    def log_likelihood(self, features: Tensor) -> Tensor:
        return lgm_log_likelihood(features, self.means, self._log_var())


class CenterLoss(nn.Module):
    """Center loss (Wen et al., ECCV 2016): ``0.5 * mean_n ||x_n - c_{y_n}||^2``.

    Centers are a buffer updated by the paper's rule (Eq. 4), not by the
    optimizer: ``delta_j = sum_{n: y_n = j}(c_j - x_n) / (1 + n_j)``,
    ``c_j <- c_j - alpha * delta_j``.  In training mode ``forward`` applies the
    update after computing the loss (with ``auto_update=True``); call
    :meth:`update` yourself otherwise.  Train with ``CE + lambda_c * loss``.
    """

    def __init__(self, num_classes: int, feat_dim: int, *, alpha: float = 0.5, auto_update: bool = True) -> None:
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(f"num_classes and feat_dim must be >= 1, got {num_classes}, {feat_dim}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (the center learning rate) must be in [0, 1], got {alpha}")
        self.num_classes, self.feat_dim, self.alpha = num_classes, feat_dim, float(alpha)
        self.auto_update = auto_update
        self.register_buffer("centers", torch.zeros(num_classes, feat_dim))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, alpha={self.alpha}"

    def _check(self, features: Tensor, labels: Tensor) -> None:
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(f"features must be (N, {self.feat_dim})")
        _check_labels(labels, features.shape[0], self.num_classes)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        self._check(features, labels)
        c = self.centers.to(features.dtype).index_select(0, labels)
        loss = 0.5 * (features - c).pow(2).sum(1).mean()
        if self.training and self.auto_update:
            self.update(features, labels)
        return loss

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """One application of the center update rule (Wen et al. Eq. 4)."""
        self._check(features, labels)
        f = features.detach().to(self.centers.dtype)
        diff = self.centers.index_select(0, labels) - f
        delta = torch.zeros_like(self.centers).index_add_(0, labels, diff)
        counts = torch.bincount(labels, minlength=self.num_classes).to(delta.dtype)
        self.centers.sub_(self.alpha * delta / (1.0 + counts).unsqueeze(1))
