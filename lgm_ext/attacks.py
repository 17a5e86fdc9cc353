"""Adversarial and inverse-adversarial examples (docs/SPEC.md section 4), built on the
fused :func:`lgm_ext.pgd_step`.

Usage follows the torchattacks habit: construct with the model and the
parameters, call on ``(images, labels)``::

    atk = PGD(model, eps=8/255, alpha=2/255, steps=10, seed=0)
    adv = atk(images, labels)

``model`` maps images in ``[lower, upper]`` to whatever ``loss_fn`` takes
(logits for the default cross-entropy; features for
:class:`LGMClassificationLoss`).  Every attack puts the model in eval mode and
restores its mode afterwards, takes gradients with ``torch.autograd.grad`` so no
parameter ``.grad`` is touched, works on any batch size and device, and is
deterministic given ``seed``.  Losses are summed over the batch, so each
sample's perturbation does not depend on the batch it is in.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .defaults import INVERSE_EPS, INVERSE_STEP, INVERSE_STEPS
from .functional import lgm_loss, pgd_step, pgd_step_

__all__ = ["Attack", "FGSM", "TargetedFGSM", "PGD", "InversePGD", "LGMClassificationLoss", "second_most_likely",
           "eval_mode"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels, reduction="sum")


class LGMClassificationLoss:
    """The classification loss L_cls of an L-GM head (paper section 4.3), for a
    model that outputs features: ``loss_fn(features, labels)``.  ``alpha=0``
    (default) is the inference-time posterior; the likelihood term is never
    included."""

    def __init__(self, head, alpha: float = 0.0) -> None:
        self.head, self.alpha = head, float(alpha)

    def __call__(self, features: Tensor, labels: Tensor) -> Tensor:
        return lgm_loss(features, self.head.means, self.head.clamped_log_var(), labels, alpha=self.alpha, lambda_=0.0,
                        reduction="sum")

    def logits(self, features: Tensor) -> Tensor:
        return self.head.logits(features)


def second_most_likely(scores: Tensor) -> Tensor:
    """The class with the second-largest score of each row (the paper's target for targeted FGSM)."""
    if scores.shape[1] < 2:
        raise ValueError("a targeted attack needs at least two classes")
    return scores.topk(2, dim=1).indices[:, 1]


@contextlib.contextmanager
def eval_mode(model):
    """Put ``model`` (an ``nn.Module``, or anything with ``training``/``eval``) in eval mode for the
    block, then restore each submodule's *own* mode: a model in training mode may hold frozen
    eval-mode parts (e.g. a BatchNorm kept in eval for fine-tuning), and BatchNorm running
    statistics are not updated in between."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    if not modes and getattr(model, "training", None) is not None and hasattr(model, "train"):
        modes = [(model, model.training)]
    for m, _ in modes:
        m.training = False
    if modes and hasattr(model, "eval"):
        model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


class Attack:
    """Base class: model handling, gradient of the loss, input checks."""

    def __init__(self, model: nn.Module | Callable, *, loss_fn: LossFn | None = None, lower: float = 0.0,
                 upper: float = 1.0, seed: int | None = None) -> None:
        if not lower <= upper:
            raise ValueError(f"lower must be <= upper, got {lower}, {upper}")
        self.model, self.loss_fn = model, loss_fn or _cross_entropy_sum
        self.lower, self.upper, self.seed = float(lower), float(upper), seed

    def _scores(self, outputs: Tensor) -> Tensor:
        """Class scores from model outputs (logits, or an L-GM head's logits of features)."""
        to_logits = getattr(self.loss_fn, "logits", None)
        return to_logits(outputs) if to_logits is not None else outputs

    def _check(self, images: Tensor, labels: Tensor | None) -> None:
        if not isinstance(images, Tensor) or not images.is_floating_point():
            raise TypeError("images must be a floating-point tensor")
        if labels is not None and (labels.dim() != 1 or labels.shape[0] != images.shape[0]):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")

    def _grad(self, x: Tensor, labels: Tensor) -> Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_fn(self.model(x), labels)
            (grad,) = torch.autograd.grad(loss, x)
        return grad

    def _generator(self, device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def __call__(self, images: Tensor, labels: Tensor, *args, **kwargs) -> Tensor:
        self._check(images, labels)
        with eval_mode(self.model):
            return self.perturb(images.detach(), labels, *args, **kwargs).detach()

    def perturb(self, images: Tensor, labels: Tensor, *args, **kwargs) -> Tensor:
        raise NotImplementedError


class FGSM(Attack):
    """Fast gradient sign method: ``clip(x + eps * sign(grad_x L(x, y)))``."""

    def __init__(self, model, eps: float = 8 / 255, **kw) -> None:
        super().__init__(model, **kw)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)

    def perturb(self, images, labels):
        g = self._grad(images, labels)
        return pgd_step(images, g, images, alpha=self.eps, eps=self.eps, lower=self.lower, upper=self.upper)


class TargetedFGSM(FGSM):
    """Targeted FGSM: ``clip(x - eps * sign(grad_x L(x, t)))`` with ``t`` given, or
    by default the class with the second-largest posterior (paper section 4.3)."""

    def perturb(self, images, labels, targets: Tensor | None = None):
        if targets is None:
            with torch.no_grad():
                targets = second_most_likely(self._scores(self.model(images)))
        g = self._grad(images, targets)
        return pgd_step(images, g, images, alpha=-self.eps, eps=self.eps, lower=self.lower, upper=self.upper)


class PGD(Attack):
    """Projected gradient descent (Madry et al.): random start in the eps-ball, then
    ``steps`` fused projected sign steps of size ``alpha``.  ``targeted=True``
    descends the loss of the given ``targets`` instead."""

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, *,
                 random_start: bool = True, targeted: bool = False, **kw) -> None:
        super().__init__(model, **kw)
        if not eps >= 0 or not alpha >= 0 or steps < 0:
            raise ValueError(f"eps and alpha must be >= 0 and steps >= 0, got {eps}, {alpha}, {steps}")
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.random_start, self.targeted = random_start, targeted

    def _direction(self) -> float:
        return -1.0 if self.targeted else 1.0

    def perturb(self, images, labels, targets: Tensor | None = None):
        if self.targeted and targets is None:
            raise ValueError("a targeted PGD needs targets")
        goal = targets if self.targeted else labels
        x = images.clone()
        if self.random_start and self.eps > 0:
            noise = torch.rand(images.shape, generator=self._generator(images.device), device=images.device,
                               dtype=images.dtype)
            x = (x + (2 * noise - 1) * self.eps).clamp_(self.lower, self.upper)
        step = self._direction() * self.alpha
        for _ in range(self.steps):
            pgd_step_(x, self._grad(x, goal), images, alpha=step, eps=self.eps, lower=self.lower, upper=self.upper)
        return x


class InversePGD(PGD):
    """Inverse adversary (report Eq. 3): PGD that *descends* the loss of the true
    label inside a small ball -- defaults (:mod:`lgm_ext.defaults`) eps'=4/255, 5 steps of
    alpha'=2/255, starting at x (no random start unless asked)."""

    def __init__(self, model, eps: float = INVERSE_EPS, alpha: float = INVERSE_STEP, steps: int = INVERSE_STEPS, *,
                 random_start: bool = False, **kw) -> None:
        super().__init__(model, eps, alpha, steps, random_start=random_start, **kw)

    def _direction(self) -> float:
        return -1.0
