"""Loss heads: :class:`LGMLoss` (learnable Gaussian mixture) and :class:`CenterLoss`."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._ops import IMPLS
from .defaults import CENTER_RATE, CHECK_FINITE_EVERY, HEAD_LR_MULT, LGM_ALPHA, LGM_LAMBDA, LOG_VAR_BOUND
from .functional import _nonneg, check_labels, lgm_log_likelihood, lgm_logits, lgm_loss_and_logits

__all__ = ["LGMLoss", "CenterLoss", "Classifier", "head_logits", "param_groups", "LIKELIHOODS", "NonFiniteLossError"]

# The likelihood terms LGMLoss can add (lambda_ times, per sample n with label y):
#   "full"      d[n, y] + 0.5 * sum_j log_var[y, j]   -- Eq. 17 / docs/SPEC.md section 1 (the default)
#   "no-logdet" d[n, y]                               -- the learned covariance without its log-det
#   "identity"  0.5 * |x_n - mu_y|^2                  -- identity covariance in that term (the authors' Caffe code)
LIKELIHOODS = ("full", "no-logdet", "identity")


def _log_var_bound(value) -> float:
    """The validated log-variance bound of a head (``LGMLoss`` and ``ShardedLGMLoss`` share the rule)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:  # inf: no bound
        raise ValueError(f"log_var_bound must be a number > 0, got {value!r}")
    return float(value)


def clamp_log_var(log_var: Tensor | None, bound: float) -> Tensor | None:
    """The one log-variance rule of every L-GM head: ``log_var`` clamped to ``[-bound, bound]`` (beyond the
    bound the gradient is 0; NaN stays NaN)."""
    return None if log_var is None else log_var.clamp(-bound, bound)


class NonFiniteLossError(FloatingPointError):
    """Raised by :class:`LGMLoss` when training has gone wrong: its loss (or the features it was given) became NaN
    or infinite.  The message names the training step and the usual causes.

    Args:
        message: what became non-finite, at which training step, and the usual causes.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)


# What usually makes an L-GM run diverge, and what to do (benchmarks/RECIPE.md measured them).
_DIVERGENCE_CAUSES = (
    "Usual causes: a learning rate too high for this network (the head's is lr * head_lr_mult), no gradient "
    "clipping (torch.nn.utils.clip_grad_norm_(params, 10.0) before optimizer.step()), or no warm-up "
    "(warmup_steps); the features of a diverged network stay non-finite, so restart from a checkpoint "
    "taken before that step with a lower lr, a clip or a longer warm-up.")


class LGMLoss(nn.Module):
    """Large-Margin Gaussian Mixture head (Wan et al., CVPR 2018).

    Learns one Gaussian per class: ``means`` (K, D) and, for
    ``covariance="diag"``, ``log_var`` (K, D), the log of the covariance
    diagonal (``"identity"`` fixes it to 0).  ``forward(features, labels)``
    returns ``(loss, logits)`` where logits are margin-free (use them for
    accuracy); ``predict`` and ``log_likelihood`` serve inference.

    Defaults are the paper's ``alpha=1, lambda_=0.1``; the functional
    :func:`lgm_ext.lgm_loss` defaults to ``alpha=0, lambda_=0``.

    Warm-up: with ``warmup_steps=S > 0`` the margin and the likelihood weight
    ramp linearly from 0 -- training forward number ``t`` (counting from 0)
    uses ``min(1, t / S) * alpha`` and ``min(1, t / S) * lambda_``.  The
    counter (buffer ``step``) advances on every forward in training mode and
    is saved in the state dict, so a resumed run continues the ramp.  With
    alpha = 1 and lambda_ = 0.1 from the first step LeNet++ diverges to NaN
    within ~15 SGD steps (docs/SPEC.md section 5); about one epoch of ramp
    avoids it.  ``warmup_steps=0`` (default) disables the ramp.
    :attr:`current_alpha` and :attr:`current_lambda` are the values in force.
    Under ``torch.compile`` the ramp is computed from the ``step`` buffer as a tensor, so a compiled head
    with a warm-up has no graph break and does not recompile as the step advances.

    Divergence check: in training mode the head records, on the device and without waiting for it, the first
    training step whose loss or features are NaN or infinite; every ``check_finite_every`` training forwards
    (and whenever :meth:`check_finite` is called) it reads that record -- one host sync per that many steps,
    not one per step -- and raises :class:`NonFiniteLossError` naming the step and the usual causes.  The
    read happens at the start of a forward, so it reports a step up to ``check_finite_every`` steps back.
    ``check_finite_every=0`` turns the check off.  Under ``torch.compile`` the record is kept but read only
    by :meth:`check_finite` (call it where you read the loss).

    Initialisation: means Xavier-uniform, log-variances 0.  ``log_var`` is
    clamped to ``[-log_var_bound, log_var_bound]`` in every forward: a
    collapsing variance would otherwise blow up the log-det term (NaN).  The
    clamp is applied to the value used (beyond the bound the gradient is 0).
    ``impl`` selects the implementation as in :func:`lgm_ext.lgm_loss`
    (``"reference"`` is the pure-PyTorch oracle).

    ``likelihood`` chooses the likelihood term that ``lambda_`` weighs (:data:`LIKELIHOODS`): ``"full"``
    (default) is the negative log-likelihood of the labelled class's Gaussian with its log-det (Eq. 17),
    fused into the operator; ``"no-logdet"`` drops the log-det; ``"identity"`` uses ``0.5 |x - mu_y|^2``
    whatever the learned covariance (the authors' Caffe layer).  The classification term and the
    logits always use the learned covariance; with ``covariance="identity"`` the three coincide.  The
    two alternatives are ablations (docs/SPEC.md section 5): computed beside the fused loss from the
    labelled rows only (N x D), never N x K x D.

    Args:
        num_classes: K, the number of classes (Gaussians).
        feat_dim: D, the feature dimension.
        alpha: the margin (>= 0; the paper's 1).
        lambda_: the likelihood weight (>= 0; the paper's 0.1).
        covariance: ``"diag"`` (learned log-variances) or ``"identity"`` (fixed unit covariance).
        log_var_bound: the clamp on ``log_var`` (> 0).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        warmup_steps: training forwards over which ``alpha`` and ``lambda_`` ramp from 0 (0: no ramp).
        impl: ``"auto"``, ``"direct"``, ``"gemm"`` or ``"reference"`` (:data:`lgm_ext.IMPLS`).
        likelihood: ``"full"``, ``"no-logdet"`` or ``"identity"`` (above).
        check_finite_every: read the divergence record every this many training forwards (0: never; above).

    ``forward(features, labels)`` takes (N, D) features and (N,) integer labels and returns
    ``(loss, logits)``: the loss (reduced as ``reduction`` says) and the (N, K) margin-free logits.
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        *,
        alpha: float = LGM_ALPHA,
        lambda_: float = LGM_LAMBDA,
        covariance: str = "diag",
        log_var_bound: float = LOG_VAR_BOUND,
        reduction: str = "mean",
        warmup_steps: int = 0,
        impl: str = "auto",
        likelihood: str = "full",
        check_finite_every: int = CHECK_FINITE_EVERY,
    ) -> None:
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(f"num_classes and feat_dim must be >= 1, got {num_classes}, {feat_dim}")
        if covariance not in ("diag", "identity"):
            raise ValueError(f"covariance must be 'diag' or 'identity', got {covariance!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, got {likelihood!r}")
        _nonneg("alpha", alpha), _nonneg("lambda_", lambda_)
        if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps}")
        if isinstance(check_finite_every, bool) or not isinstance(check_finite_every, int) or check_finite_every < 0:
            raise ValueError(f"check_finite_every must be an integer >= 0 (0: no check), got {check_finite_every!r}")
        self.check_finite_every = check_finite_every
        self._forwards = 0  # training forwards in this process (host side: when to read the record)
        self.num_classes, self.feat_dim = num_classes, feat_dim
        self.alpha, self.lambda_ = float(alpha), float(lambda_)
        self.covariance, self.impl, self.reduction = covariance, impl, reduction
        self.likelihood = likelihood
        self.log_var_bound = _log_var_bound(log_var_bound)
        self.warmup_steps = int(warmup_steps)
        self.means = nn.Parameter(torch.empty(num_classes, feat_dim))
        if covariance == "diag":
            self.log_var = nn.Parameter(torch.zeros(num_classes, feat_dim))
        else:
            self.register_parameter("log_var", None)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # the first training step whose loss or features were non-finite (-1: none), and whether its features were;
        # not saved in the state dict
        self.register_buffer("_nonfinite_step", torch.full((), -1, dtype=torch.long), persistent=False)
        self.register_buffer("_nonfinite_features", torch.zeros((), dtype=torch.bool), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.means)
        if self.log_var is not None:
            nn.init.zeros_(self.log_var)
        self.step.zero_()
        self._nonfinite_step.fill_(-1)
        self._nonfinite_features.fill_(False)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, alpha={self.alpha}, "
            f"lambda_={self.lambda_}, covariance={self.covariance!r}, warmup_steps={self.warmup_steps}, "
            f"impl={self.impl!r}" + (f", likelihood={self.likelihood!r}" if self.likelihood != "full" else "")
        )

    def _ramp(self) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, int(self.step) / self.warmup_steps)

    @property
    def current_alpha(self) -> float:
        """The margin in force (``alpha`` scaled by the warm-up ramp)."""
        return self._ramp() * self.alpha

    @property
    def current_lambda(self) -> float:
        """The likelihood weight in force (``lambda_`` scaled by the warm-up ramp)."""
        return self._ramp() * self.lambda_

    def clamped_log_var(self) -> Tensor | None:
        """``log_var`` clamped to ``[-log_var_bound, log_var_bound]`` (what every forward uses)."""
        return clamp_log_var(self.log_var, self.log_var_bound)

    def forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        compiling = torch.compiler.is_compiling()
        if self.training and not compiling and self.check_finite_every:
            if self._forwards and self._forwards % self.check_finite_every == 0:
                self.check_finite()
            self._forwards += 1
        if compiling and self.warmup_steps > 0:
            out = self._ramped_forward(features, labels)
        else:
            out = self._forward(features, labels, self._ramp())
        if self.training:
            if self.check_finite_every:
                self._record_nonfinite(out[0], features)
            self.step.add_(1)
        return out

    def _forward(self, features: Tensor, labels: Tensor, ramp: float) -> tuple[Tensor, Tensor]:
        lam, log_var = ramp * self.lambda_, self.clamped_log_var()
        if self.likelihood == "full" or lam == 0.0:
            return lgm_loss_and_logits(features, self.means, log_var, labels, alpha=ramp * self.alpha, lambda_=lam,
                                       reduction=self.reduction, impl=self.impl)
        loss, logits = lgm_loss_and_logits(features, self.means, log_var, labels, alpha=ramp * self.alpha,
                                           lambda_=0.0, reduction="none", impl=self.impl)
        loss = loss + lam * self._likelihood_term(features, labels, log_var, loss.dtype)[1]
        return self._reduce(loss), logits

    def _likelihood_term(self, features: Tensor, labels: Tensor, log_var: Tensor | None, dtype: torch.dtype):
        """The labelled class's distance ``d[n, y]`` and the likelihood term of :attr:`likelihood`, from the
        labelled rows only (N x D), in ``dtype``."""
        diff = features.to(dtype) - self.means.to(dtype).index_select(0, labels)
        sq = diff * diff
        lv = None if log_var is None else log_var.to(dtype).index_select(0, labels)
        d = 0.5 * (sq if lv is None else sq * torch.exp(-lv)).sum(1)
        if self.likelihood == "full":
            term = d if lv is None else d + 0.5 * lv.sum(1)
        elif self.likelihood == "no-logdet":
            term = d
        else:  # identity
            term = 0.5 * sq.sum(1)
        return d, term

    def _reduce(self, loss: Tensor) -> Tensor:
        return loss.mean() if self.reduction == "mean" else loss.sum() if self.reduction == "sum" else loss

    def _ramped_forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The loss with the warm-up ramp as a tensor (``torch.compile``): the fused margin-free logits, the
        margin and the likelihood term added from the labelled rows -- the same loss as :meth:`_forward`
        without reading the step on the host (a graph break, and a recompile per step)."""
        log_var = self.clamped_log_var()
        logits = lgm_logits(features, self.means, log_var, impl=self.impl)  # (N, K), margin-free
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() \
                or labels.dtype == torch.bool or labels.shape != (features.shape[0],):  # (the range: cross_entropy)
            raise TypeError(f"labels must be an integer tensor of shape ({features.shape[0]},)")
        labels = labels.long()
        d, term = self._likelihood_term(features, labels, log_var, logits.dtype)
        ramp = (self.step.to(logits.dtype) / self.warmup_steps).clamp(max=1.0)
        margin = torch.zeros_like(logits).scatter(1, labels[:, None], (ramp * self.alpha * d)[:, None])
        loss = nn.functional.cross_entropy(logits - margin, labels, reduction="none") \
            + ramp * self.lambda_ * term
        return self._reduce(loss), logits

    @torch.no_grad()
    def _record_nonfinite(self, loss: Tensor, features: Tensor) -> None:
        """Record (on the device, no host sync) the first step whose loss or features are non-finite."""
        bad_features = ~torch.isfinite(features).all()
        bad = (~torch.isfinite(loss).all() | bad_features) & (self._nonfinite_step < 0)
        self._nonfinite_step.copy_(torch.where(bad, self.step, self._nonfinite_step))
        self._nonfinite_features.logical_or_(bad & bad_features)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a training step's loss or features were NaN or infinite (one host
        sync).  Forward calls it every ``check_finite_every`` training steps; call it yourself where you read the
        loss, or under ``torch.compile``.

        Raises:
            NonFiniteLossError: naming the first such step (the head's ``step`` counter) and the usual causes.
        """
        step = int(self._nonfinite_step)
        if step < 0:
            return
        what = "features (the network's output) and loss" if bool(self._nonfinite_features) else "loss"
        raise NonFiniteLossError(
            f"LGMLoss: training has diverged: the {what} became NaN or infinite at training step {step} (the "
            f"head's step counter; checked every {self.check_finite_every} steps). {_DIVERGENCE_CAUSES}")

    def logits(self, features: Tensor, labels: Tensor | None = None, *, alpha: float = 0.0) -> Tensor:
        return lgm_logits(features, self.means, self.clamped_log_var(), labels, alpha=alpha, impl=self.impl)

    def predict(self, features: Tensor) -> Tensor:
        return self.logits(features).argmax(1)

    def log_likelihood(self, features: Tensor) -> Tensor:
        return lgm_log_likelihood(features, self.means, self.clamped_log_var(), impl=self.impl)


class CenterLoss(nn.Module):
    """Center loss (Wen et al., ECCV 2016): ``0.5 * mean_n ||x_n - c_{y_n}||^2``.

    Centers are a buffer updated by the paper's rule (Eq. 4), not by the
    optimizer: ``delta_j = sum_{n: y_n = j}(c_j - x_n) / (1 + n_j)``,
    ``c_j <- c_j - alpha * delta_j``.  In training mode ``forward`` applies the
    update after computing the loss (with ``auto_update=True``); call
    :meth:`update` yourself otherwise.  Train with ``CE + lambda_c * loss``.
    ``sync=True``: under ``torch.distributed`` the update uses the whole global batch (sums over
    ranks), so the centers stay identical on every rank (a plain update lets them drift apart).

    Args:
        num_classes: K, the number of classes (centers).
        feat_dim: D, the feature dimension.
        alpha: the centers' update rate (Wen et al.'s alpha, in [0, 1]).
        auto_update: update the centers in every training-mode forward.
        sync: sum the update over ``torch.distributed`` ranks (data-parallel training).
        group: the process group for ``sync`` (None: the default group).

    ``forward(features, labels)`` takes (N, D) features and (N,) integer labels and returns the scalar loss.
    """

    def __init__(self, num_classes: int, feat_dim: int, *, alpha: float = CENTER_RATE, auto_update: bool = True,
                 sync: bool = False, group=None) -> None:
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(f"num_classes and feat_dim must be >= 1, got {num_classes}, {feat_dim}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (the center learning rate) must be in [0, 1], got {alpha}")
        self.num_classes, self.feat_dim, self.alpha = num_classes, feat_dim, float(alpha)
        self.auto_update, self.sync, self.group = auto_update, bool(sync), group
        self.register_buffer("centers", torch.zeros(num_classes, feat_dim))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, alpha={self.alpha}"

    def _check(self, features: Tensor, labels: Tensor) -> None:
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(f"features must be (N, {self.feat_dim})")
        check_labels(labels, features.shape[0], self.num_classes)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        self._check(features, labels)
        labels = labels.long()  # any integer dtype, as LGMLoss takes (index_select wants int64)
        c = self.centers.to(features.dtype).index_select(0, labels)
        loss = 0.5 * (features - c).pow(2).sum(1).mean()
        if self.training and self.auto_update:
            self.update(features, labels)
        return loss

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """One application of the center update rule (Wen et al. Eq. 4); synced over ranks (``sync``)."""
        self._check(features, labels)
        wen_update(self.centers, features, labels.long(), self.alpha, sync=self.sync, group=self.group)


@torch.no_grad()
def wen_update(centers: Tensor, features: Tensor, labels: Tensor, alpha: float, *, sync: bool = False,
               group=None) -> None:
    """Wen et al.'s center update (Eq. 4) in place:
    ``c_j <- c_j - alpha * sum_{n: y_n = j}(c_j - x_n) / (1 + n_j)``.  With ``sync`` and an initialized
    ``torch.distributed`` group, the per-class sums and counts are summed over the ranks first, so every
    rank applies the update of the global batch and the centers stay identical (data-parallel training)."""
    f = features.detach().to(centers.dtype)
    delta = torch.zeros_like(centers).index_add_(0, labels, centers.index_select(0, labels) - f)
    counts = torch.bincount(labels, minlength=centers.shape[0]).to(delta.dtype)
    if sync:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            packed = torch.cat([delta, counts[:, None]], 1)
            dist.all_reduce(packed, group=group)
            delta, counts = packed[:, :-1], packed[:, -1]
    centers.sub_(alpha * delta / (1.0 + counts).unsqueeze(1))


def _params(obj) -> list:
    if isinstance(obj, nn.Module):
        return [p for p in obj.parameters() if p.requires_grad]
    return [p for p in obj if p.requires_grad]


def param_groups(backbone, head, *, lr: float, head_lr_mult: float = HEAD_LR_MULT, weight_decay: float = 0.0,
                 head_weight_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups that train a head's class parameters faster than the network.

    ``backbone`` and ``head`` are modules (or iterables of parameters).  Returns
    ``[{"params": backbone, "lr": lr, "weight_decay": weight_decay},
    {"params": head, "lr": lr * head_lr_mult, "weight_decay": head_weight_decay}]``
    for any ``torch.optim`` optimizer (``head_weight_decay=None``: same as the
    network's).

    Why: the L-GM means and log-variances follow the feature clusters; at the
    network's learning rate they lag behind them (measured on LeNet++: distance
    from learned to empirical class means 0.56 vs 0.20 with 10x, test error 1.5%
    -> 1.1%, FGSM-verification EER 35% -> 8.4%; docs/SPEC.md section 5).  The
    authors' Caffe code gives the means their own learning-rate multiplier.
    With a scheduler that sets absolute rates (``OneCycleLR``), pass one
    ``max_lr`` per group: ``[g["lr"] for g in optimizer.param_groups]``.

    Args:
        backbone: the network (a module or an iterable of parameters).
        head: the head whose class parameters train faster (a module or an iterable of parameters).
        lr: the network's learning rate.
        head_lr_mult: the head's learning rate is ``lr * head_lr_mult`` (the authors' 10).
        weight_decay: the network's weight decay.
        head_weight_decay: the head's weight decay (None: ``weight_decay``).

    Returns:
        Two parameter-group dicts, the network's then the head's, for any ``torch.optim`` optimizer.
    """
    lr, head_lr_mult, weight_decay = _nonneg("lr", lr), _nonneg("head_lr_mult", head_lr_mult), \
        _nonneg("weight_decay", weight_decay)
    head_weight_decay = weight_decay if head_weight_decay is None else _nonneg("head_weight_decay", head_weight_decay)
    net, cls = _params(backbone), _params(head)
    shared = {id(p) for p in net} & {id(p) for p in cls}
    if shared:
        raise ValueError("backbone and head share parameters; pass disjoint modules")
    groups = [{"params": net, "lr": float(lr), "weight_decay": float(weight_decay)}]
    if cls:
        groups.append({"params": cls, "lr": float(lr) * float(head_lr_mult), "weight_decay": float(head_weight_decay)})
    return groups


class Classifier(nn.Module):
    """A feature network followed by a head, as one model.

    ``Classifier(backbone, head)(images)`` returns the logits: ``head.logits(backbone(images))`` when the
    head has a ``logits`` method (:class:`LGMLoss`, the lab's heads), else ``head(backbone(images))`` (a
    plain classifier layer such as ``nn.Linear``).  This is the "images -> logits" model that attacks
    differentiate (:mod:`lgm_ext.attacks`, torchattacks): an L-GM backbone alone outputs features, and an
    attack on features silently measures the wrong thing.

    ``Classifier(backbone, head)(images, labels, **kwargs)`` returns the head's training output
    ``head(backbone(images), labels, **kwargs)`` (for :class:`LGMLoss`: ``(loss, logits)``), so one module
    holds both for ``DistributedDataParallel``.

    Args:
        backbone: an ``nn.Module`` mapping images to (N, D) features.
        head: a head with a ``logits`` method (:class:`LGMLoss`, the lab's heads), or a module mapping
            features to logits (``nn.Linear``).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        if not callable(backbone) or not callable(head):
            raise TypeError("backbone and head must be callables (modules) mapping images to features and "
                            "features to logits")
        self.backbone, self.head = backbone, head

    def forward(self, images: Tensor, labels: Tensor | None = None, **kwargs):
        features = self.backbone(images)
        if labels is not None:
            return self.head(features, labels, **kwargs)
        if kwargs:
            raise TypeError(f"keyword arguments ({', '.join(kwargs)}) are for the training form: pass labels too")
        return self.logits_from_features(features)

    def logits_from_features(self, features: Tensor) -> Tensor:
        """The head's logits of features (the second half of ``forward(images)``): ``head.logits(features)``
        when the head has a ``logits`` method, else ``head(features)``.

        Args:
            features: (N, D) outputs of ``backbone``.

        Returns:
            (N, K) logits.
        """
        return head_logits(self.head, features)


def head_logits(head, features: Tensor) -> Tensor:
    """A head's logits of features, the rule of :class:`Classifier`: ``head.logits(features)`` when the head
    has a ``logits`` method (:class:`LGMLoss`, the lab's heads), else ``head(features)`` (``nn.Linear``).

    Args:
        head: the head (a module or a callable).
        features: (N, D) features.

    Returns:
        (N, K) logits.
    """
    to_logits = getattr(head, "logits", None)
    return to_logits(features) if callable(to_logits) else head(features)
