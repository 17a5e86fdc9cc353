"""Center losses whose targets are *inverse adversaries* (the inverse-adversary report's question).

An inverse adversary of an input ``x`` with label ``y`` is the input a few projected gradient
steps *down* the classification loss of ``y`` (:class:`lgm_ext.attacks.InversePGD`: eps'=4/255,
5 steps of 2/255): the most confidently classified point near ``x``.  The report asks whether the
features of inverse adversaries can replace the centers of center loss.  Two losses build that in:

- ``variant="class"``: the center of class j is a running mean of the features of the inverse
  adversaries of class-j inputs, updated by Wen et al.'s rule (Eq. 4, rate ``alpha``) -- the centers
  of :class:`lgm_ext.CenterLoss`, fed inverse-adversary features instead of the inputs' own;
  loss = ``0.5 * mean_n ||f(x_n) - c_{y_n}||^2``.
- ``variant="instance"``: each input is pulled towards the feature of its own inverse adversary;
  loss = ``0.5 * mean_n ||f(x_n) - sg(f(x~_n))||^2`` (sg: stop-gradient).

Train with ``cross_entropy + lambda_c * loss``, as center loss.  One step::

    icl = InverseAdversaryCenterLoss(num_classes, feat_dim, variant="class")
    inv = icl.inverse_features(backbone, classifier, images, labels)   # no grad, eval mode
    feats = backbone(images)
    loss = F.cross_entropy(classifier(feats), labels) + lambda_c * icl(feats, labels, inv)

Cost: the inverse adversaries take ``steps`` forward+backward passes of the network on the batch
and one more forward for their features, so a training step costs about ``1 + steps`` times a plain
one (6x at the defaults).  The attack runs in eval mode (each submodule's mode is restored, so
BatchNorm running statistics are not touched), takes gradients with ``torch.autograd.grad`` with
respect to the images only (no parameter ``.grad`` changes, the optimizer sees nothing), and uses
the fused :func:`lgm_ext.pgd_step_`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .attacks import InversePGD, eval_mode
from .defaults import INVERSE_EPS, INVERSE_STEP, INVERSE_STEPS
from .functional import check_labels
from .modules import Classifier, wen_update

__all__ = ["InverseAdversaryCenterLoss", "inverse_adversary_features", "VARIANTS"]

VARIANTS = ("class", "instance")


def inverse_adversary_features(backbone: nn.Module, classifier: nn.Module, images: Tensor, labels: Tensor, *,
                               eps: float = INVERSE_EPS, step_size: float = INVERSE_STEP,
                               steps: int = INVERSE_STEPS,
                               lower: float = 0.0, upper: float = 1.0) -> Tensor:
    """Features ``backbone(x~)`` of the inverse adversaries ``x~`` of ``images`` (InversePGD on
    :class:`lgm_ext.Classifier` ``(backbone, classifier)`` with the true ``labels``; ``classifier`` maps
    features to logits, or is a head with a ``logits`` method), detached.  Both the attack and the
    feature pass run in eval mode; every submodule's mode is restored afterwards.

    Args:
        backbone: an ``nn.Module`` mapping images to (N, D) features.
        classifier: a module mapping features to logits, or a head with a ``logits`` method.
        images: (N, ...) clean images in ``[lower, upper]``.
        labels: (N,) true labels (the inverse attack descends their loss).
        eps: the L-infinity radius of the inverse attack (default 4/255).
        step_size: the step of each of its PGD steps (default 2/255).
        steps: the number of PGD steps (default 5).
        lower: the valid pixel range's lower bound.
        upper: the valid pixel range's upper bound.

    Returns:
        (N, D) features of the inverse adversaries, detached.
    """
    net = Classifier(backbone, classifier)
    inv = InversePGD(net, eps=eps, alpha=step_size, steps=steps, lower=lower, upper=upper)(images, labels)
    with eval_mode(net), torch.no_grad():
        return backbone(inv).detach()


class InverseAdversaryCenterLoss(nn.Module):
    """Center loss towards inverse-adversary features (module docstring): ``variant="class"`` keeps a
    ``centers`` buffer updated from the inverse features by Wen et al.'s rule in training mode
    (``alpha`` is its rate); ``variant="instance"`` pulls each feature towards its own inverse
    adversary's.  ``forward(features, labels, inverse_features)`` returns the (unweighted) loss.
    ``sync=True`` sums the center update over ``torch.distributed`` ranks (as :class:`CenterLoss`).

    Args:
        num_classes: K, the number of classes.
        feat_dim: D, the feature dimension.
        variant: ``"class"`` (running class centers of inverse features) or ``"instance"`` (each
            feature's own inverse adversary).
        alpha: the centers' update rate (``variant="class"``).
        eps: the inverse attack's L-infinity radius (default 4/255).
        step_size: its step size (default 2/255).
        steps: its number of PGD steps (default 5).
        lower: the valid pixel range's lower bound.
        upper: the valid pixel range's upper bound.
        sync: sum the center update over ``torch.distributed`` ranks.
        group: the process group for ``sync`` (None: the default group).
    """

    def __init__(self, num_classes: int, feat_dim: int, *, variant: str = "class", alpha: float = 0.5,
                 eps: float = INVERSE_EPS, step_size: float = INVERSE_STEP, steps: int = INVERSE_STEPS,
                 lower: float = 0.0,
                 upper: float = 1.0, sync: bool = False, group=None) -> None:
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(f"num_classes and feat_dim must be >= 1, got {num_classes}, {feat_dim}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (the center update rate) must be in [0, 1], got {alpha}")
        if not (eps >= 0 and step_size >= 0) or isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"eps and step_size must be >= 0 and steps an integer >= 0, got {eps}, {step_size}, "
                             f"{steps}")
        if not lower <= upper:
            raise ValueError(f"lower must be <= upper, got {lower}, {upper}")
        self.num_classes, self.feat_dim, self.variant, self.alpha = num_classes, feat_dim, variant, float(alpha)
        self.eps, self.step_size, self.steps = float(eps), float(step_size), steps
        self.lower, self.upper = float(lower), float(upper)
        self.sync, self.group = bool(sync), group
        self.register_buffer("centers", torch.zeros(num_classes, feat_dim))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, variant={self.variant!r}, "
                f"alpha={self.alpha}, eps={self.eps:.4g}, step_size={self.step_size:.4g}, steps={self.steps}")

    def inverse_features(self, backbone: nn.Module, classifier: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        """:func:`inverse_adversary_features` with this loss's attack settings."""
        return inverse_adversary_features(backbone, classifier, images, labels, eps=self.eps,
                                          step_size=self.step_size, steps=self.steps, lower=self.lower,
                                          upper=self.upper)

    def _check(self, name: str, t: Tensor, n: int | None = None) -> None:
        if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != self.feat_dim or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point (N, {self.feat_dim}) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if n is not None and t.shape[0] != n:
            raise ValueError(f"{name} must have {n} rows (one per feature), got {t.shape[0]}")

    def forward(self, features: Tensor, labels: Tensor, inverse_features: Tensor) -> Tensor:
        self._check("features", features)
        self._check("inverse_features", inverse_features, features.shape[0])
        check_labels(labels, features.shape[0], self.num_classes)
        if self.variant == "instance":
            loss = 0.5 * (features - inverse_features.detach().to(features.dtype)).pow(2).sum(1).mean()
        else:
            loss = 0.5 * (features - self.centers.to(features.dtype).index_select(0, labels)).pow(2).sum(1).mean()
        if self.training:  # both variants track the running means (the instance loss does not use them)
            self.update(inverse_features, labels)
        return loss

    @torch.no_grad()
    def update(self, inverse_features: Tensor, labels: Tensor) -> None:
        """Wen et al.'s center update (Eq. 4) with the inverse-adversary features:
        ``c_j <- c_j - alpha * sum_{n: y_n = j}(c_j - f(x~_n)) / (1 + n_j)``."""
        self._check("inverse_features", inverse_features)
        check_labels(labels, inverse_features.shape[0], self.num_classes)
        wen_update(self.centers, inverse_features, labels, self.alpha, sync=self.sync, group=self.group)
