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
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .defaults import INVERSE_EPS, INVERSE_STEP, INVERSE_STEPS
from .functional import lgm_loss, pgd_step, pgd_step_
from .modules import Classifier

__all__ = ["Attack", "FGSM", "TargetedFGSM", "PGD", "InversePGD", "AdaptivePGD", "LGMClassificationLoss",
           "second_most_likely", "eval_mode"]

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

    def sweep(self, images: Tensor, labels: Tensor, eps_list) -> dict[float, Tensor]:
        """The FGSM images at every eps of ``eps_list`` (>= 0) from one gradient: ``{eps: FGSM(model, eps)(images,
        labels)}``, equal to attacking once per eps (the gradient at the clean images does not depend on eps),
        at the cost of one forward and backward pass."""
        self._check(images, labels)
        eps_list = [float(e) for e in eps_list]
        if not all(e >= 0 for e in eps_list):
            raise ValueError(f"eps must be >= 0, got {eps_list}")
        with eval_mode(self.model):
            x = images.detach()
            g = self._grad(x, labels)
            return {e: pgd_step(x, g, x, alpha=e, eps=e, lower=self.lower, upper=self.upper).detach()
                    for e in eps_list}


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


class AdaptivePGD(Attack):
    """PGD against a classifier *and* a detector, by an attacker who knows the detector (the adaptive
    evaluation of Carlini & Wagner, "Adversarial examples are not easily detected", 2017): untargeted,
    it looks for inputs in the eps-ball that are misclassified *and* score at least the detector's
    threshold.

    What to pass -- the convention of every attack here: the classifier under attack maps images to
    logits, as for :class:`FGSM` and :class:`PGD`.  The detector scores the features in between, so
    AdaptivePGD needs the split, given either way:

    - ``AdaptivePGD(lgm_ext.Classifier(backbone, head), detector)``: the images -> logits model of
      FGSM/PGD; the detector scores ``backbone(images)``, predictions and the loss use the head's logits
      (:meth:`lgm_ext.Classifier.logits_from_features`).  ``classifier=`` must then be None.
    - ``AdaptivePGD(backbone, detector, classifier=head.logits)``: ``model`` maps images to the outputs
      the detector scores, ``classifier`` maps those outputs to logits.  ``classifier`` may also be the
      ``lgm_ext.Classifier(backbone, head)`` of that same backbone (its head is used).
    - ``AdaptivePGD(model, detector)`` with neither: ``model``'s outputs are both what the detector
      scores and the logits (a detector on logits), unless ``loss_fn`` has a ``logits`` method
      (:class:`LGMClassificationLoss`), which then gives the logits.

    What cannot be right is a ValueError, not a silent wrong answer: no classifier while the detector
    (one with ``num_classes`` and ``feat_dim``, such as :class:`lgm_ext.LikelihoodDetector`) scores
    features whose dimension is not its number of classes (the argmax of the features would be taken
    as the prediction); a classifier that does not map ``model``'s outputs to (N, K) logits (checked on
    the first step); outputs whose width is not the detector's ``feat_dim``; labels outside [0, K).

    ``detector`` is any object with ``score(outputs) -> (N,)`` (higher = more normal,
    differentiable with respect to ``outputs``) and a numeric ``threshold`` (read at every call); an
    input passes iff ``score >= threshold`` (:class:`lgm_ext.LikelihoodDetector` rejects exactly the
    others).  A detector of :mod:`lgm_ext.detectors` that reads logits (Energy, the center distance, a
    combination) is given the classifier's logits of the outputs too: ``score(outputs, logits)``.
    The classification loss is ``loss_fn(outputs, labels)`` (summed over the batch; default:
    cross-entropy of the logits above); predictions are the argmax of the logits.

    Each step is the fused :func:`lgm_ext.pgd_step_` (a sign step of ``alpha``, projected on the
    eps-ball and ``[lower, upper]``; random start as :class:`PGD`) on a per-sample objective, ``s`` the
    score, ``t`` the threshold:

    - ``mode="selective"`` (default; the selective gradient descent of Bryniarski et al. 2022,
      "Evading adversarial example detection defenses with orthogonal projected gradient
      descent"): the classification loss while the sample is still classified correctly, the score
      ``s`` once it is misclassified.  Scale-free (``penalty`` and ``margin`` are unused): any detector
      works as it is.  For a class-conditional score (the likelihood of the predicted class, a
      distance to the predicted class's center, the max-softmax probability) raising ``s`` of a
      misclassified sample pulls it into the *wrong* class's region, so it stays misclassified.
    - ``mode="penalty"``: ``L_cls(x) - penalty * relu(t + margin - s(x))``, C&W's hinge on the
      detector (their density-estimate attack penalises ``max(-log KDE(x) - eps, 0)``); no
      projection onto ``{s >= t}`` exists in image space.  The hinge is 0 once a sample passes with
      the margin, so it spends no budget beyond that.  ``penalty`` is in units of classification loss
      per unit of score and must be scaled to the detector.  Weaker against a likelihood: between
      two classes lies a region of low density that the hinge forbids crossing, while the
      misclassified, high-density region lies beyond it.  Measured on the toy L-GM problem of
      tests/test_attacks.py (eps = 0.3, 10 steps of eps/4 from a random start), the inputs
      misclassified and passing the likelihood detector: plain PGD 24.5%, this form 28% (penalty 1)
      and 52.5% (penalty 0.1), the selective form 100%.

    The outputs' gradients of the two terms are taken separately and combined per sample, then
    back-propagated through ``model`` once: a step costs one forward and one backward of ``model``
    (plus one forward to check the last iterate).  Rows must not interact in ``model``, ``loss_fn``,
    ``classifier`` and ``score`` (eval mode).  With ``keep_successful=True`` (default) each sample
    returns its last iterate that was misclassified and passed the detector, if any (else the final
    one); ``mode="penalty", penalty=0, keep_successful=False`` is :class:`PGD` with the same
    ``loss_fn``.  ``atk(images, labels, return_success=True)`` also returns (N,) bool: the returned
    image is misclassified and passes the detector.
    """

    MODES = ("penalty", "selective")

    def __init__(self, model, detector, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, *,
                 penalty: float = 1.0, margin: float = 0.0, mode: str = "selective", classifier: Callable | None = None,
                 random_start: bool = True, keep_successful: bool = True, loss_fn: LossFn | None = None,
                 **kw) -> None:
        whole = model  # put in eval mode during the attack (with the classifier's module)
        if isinstance(model, Classifier):
            if classifier is not None:
                raise ValueError("classifier must be None when model is an lgm_ext.Classifier (images -> logits): "
                                 "its head gives the logits and the detector scores its backbone's features; or pass "
                                 "model=backbone with classifier=head.logits")
            model, classifier = model.backbone, model.logits_from_features
        elif isinstance(classifier, Classifier):
            if classifier.backbone is not model:
                raise ValueError("classifier is an lgm_ext.Classifier (images -> logits) whose backbone is not model: "
                                 "classifier must map model's outputs to logits (e.g. head.logits), or pass "
                                 "model=lgm_ext.Classifier(backbone, head) and no classifier")
            whole, classifier = classifier, classifier.logits_from_features
        if loss_fn is None and classifier is not None:
            loss_fn = _ClassifierCrossEntropy(classifier)
        super().__init__(model, loss_fn=loss_fn, **kw)
        if not eps >= 0 or not alpha >= 0 or steps < 0:
            raise ValueError(f"eps and alpha must be >= 0 and steps >= 0, got {eps}, {alpha}, {steps}")
        if not (penalty >= 0 and penalty < float("inf")):
            raise ValueError(f"penalty must be finite and >= 0, got {penalty}")
        if not (margin >= 0 and margin < float("inf")):
            raise ValueError(f"margin must be finite and >= 0, got {margin}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, self.MODES))}, got {mode!r}")
        if not callable(getattr(detector, "score", None)) or not hasattr(detector, "threshold"):
            raise TypeError(f"detector must have a score(outputs) method and a threshold, "
                            f"got {type(detector).__name__}")
        self.detector, self.classifier = detector, classifier
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.penalty, self.margin, self.mode = float(penalty), float(margin), mode
        self.random_start, self.keep_successful = random_start, keep_successful
        owner = getattr(classifier, "__self__", classifier)  # head.logits: put the head in eval mode too
        self._eval = [m for m in (whole, owner, detector) if isinstance(m, nn.Module)]
        k, d = getattr(detector, "num_classes", None), getattr(detector, "feat_dim", None)
        if classifier is None and getattr(self.loss_fn, "logits", None) is None and isinstance(k, int) \
                and isinstance(d, int) and k != d:
            raise ValueError(f"no classifier given, so model's outputs would be taken as the logits, but the detector "
                             f"scores {d}-dimensional features of {k} classes: pass model=lgm_ext.Classifier(backbone, "
                             f"head) (images -> logits, as FGSM and PGD take) or classifier=head.logits (the "
                             f"detector's features -> logits)")

    def _check_outputs(self, out: Tensor, labels: Tensor) -> None:
        """On the first step: the outputs fit the detector, the classifier maps them to (N, K) logits, the
        labels are classes of those logits."""
        d = getattr(self.detector, "feat_dim", None)
        if isinstance(d, int) and (out.dim() != 2 or out.shape[1] != d):
            raise ValueError(f"the detector scores {d}-dimensional features but model's outputs have shape "
                             f"{tuple(out.shape)}: model must map images to the features the detector was fitted on")
        with torch.no_grad():
            try:
                logits = self._logits(out.detach())
            except RuntimeError as e:
                raise ValueError(f"classifier must map model's outputs (shape {tuple(out.shape)}) to logits (N, K), "
                                 f"not images to logits; calling it raised: {e}") from e
            if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != out.shape[0]:
                raise ValueError(f"classifier must map model's outputs to ({out.shape[0]}, K) logits, got "
                                 f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
                raise ValueError(f"labels must lie in [0, K) = [0, {logits.shape[1]}) (K: the classifier's logits)")

    def _threshold(self) -> float:
        t = self.detector.threshold
        if t is None:
            raise ValueError("detector.threshold is None: calibrate the detector first")
        t = float(t)
        if math.isnan(t):
            raise ValueError("detector.threshold is NaN")
        return t

    def _logits(self, outputs: Tensor) -> Tensor:
        return self.classifier(outputs) if self.classifier is not None else self._scores(outputs)

    def _predict(self, outputs: Tensor) -> Tensor:
        return self._logits(outputs).argmax(1)

    def _outputs_grad(self, out: Tensor, labels: Tensor, t: float, need_grad: bool):
        """(gradient of the per-sample objective with respect to the outputs, success mask)."""
        f = out.detach().requires_grad_(need_grad)
        with torch.enable_grad() if need_grad else torch.no_grad():
            reads = getattr(self.detector, "inputs", ("features",))
            if "logits" in reads:  # a detector of the family that reads the logits: the classifier's, of f
                s = self.detector.score(f if "features" in reads else None, self._logits(f))
            else:
                s = self.detector.score(f)
            if not isinstance(s, Tensor) or s.shape != (f.shape[0],):
                raise ValueError(f"detector.score must return a ({f.shape[0]},) tensor, got "
                                 f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}")
            with torch.no_grad():
                fooled = self._predict(f) != labels
                ok = fooled & (s >= t)
                self._fooled_score = torch.where(fooled, s.detach().to(torch.float64),
                                                 torch.full_like(s.detach(), -math.inf, dtype=torch.float64))
            if not need_grad:
                return None, ok
            if not s.requires_grad:
                raise TypeError("detector.score(outputs) must be differentiable with respect to outputs")
            (g_cls,) = torch.autograd.grad(self.loss_fn(f, labels), f)
            (g_s,) = torch.autograd.grad(s.sum(), f)
        shape = (-1,) + (1,) * (f.dim() - 1)
        g_s = g_s.to(g_cls.dtype)
        if self.mode == "selective":
            return torch.where(fooled.view(shape), g_s, g_cls), ok
        active = (s.detach() < t + self.margin).view(shape)
        return g_cls + self.penalty * active.to(g_cls.dtype) * g_s, ok

    def _attack(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        t = self._threshold()
        x = images.clone()
        if self.random_start and self.eps > 0:
            noise = torch.rand(images.shape, generator=self._generator(images.device), device=images.device,
                               dtype=images.dtype)
            x = (x + (2 * noise - 1) * self.eps).clamp_(self.lower, self.upper)
        best, success = x.clone(), torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.best_score = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        for i in range(self.steps + 1):
            last = i == self.steps
            xr = x.detach().requires_grad_(not last)
            with torch.no_grad() if last else torch.enable_grad():
                out = self.model(xr)
            if i == 0:
                self._check_outputs(out, labels)
            g_out, ok = self._outputs_grad(out, labels, t, need_grad=not last)
            self.best_score = torch.maximum(self.best_score, self._fooled_score)
            if self.keep_successful:
                best[ok], success = x[ok], success | ok
            if last:
                break
            (g,) = torch.autograd.grad(out, xr, grad_outputs=g_out)
            pgd_step_(x, g, images, alpha=self.alpha, eps=self.eps, lower=self.lower, upper=self.upper)
        if not self.keep_successful:
            return x, ok
        return torch.where(success.view((-1,) + (1,) * (x.dim() - 1)), best, x), success

    def perturb(self, images, labels):
        return self._attack(images, labels)[0]

    def __call__(self, images: Tensor, labels: Tensor, *, return_success: bool = False, return_score: bool = False):
        """The adversarial images; with ``return_success`` also the (N,) bool success mask; with
        ``return_score`` also (N,) float64: the highest detector score over every iterate that was
        misclassified (-inf where none was).  In ``"selective"`` mode the iterates do not depend on the
        threshold, so the attack succeeds at *any* threshold t exactly where that score is >= t: one run
        measures every operating point."""
        self._check(images, labels)
        with contextlib.ExitStack() as stack:
            for m in (self.model, *self._eval):
                stack.enter_context(eval_mode(m))
            adv, ok = self._attack(images.detach(), labels)
        out = (adv.detach(),) + ((ok,) if return_success else ()) + ((self.best_score,) if return_score else ())
        return out if len(out) > 1 else out[0]


class _ClassifierCrossEntropy:
    """``cross_entropy(classifier(outputs), labels, reduction="sum")``; ``logits`` = the classifier."""

    def __init__(self, classifier: Callable) -> None:
        self.logits = classifier

    def __call__(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(outputs), labels, reduction="sum")
