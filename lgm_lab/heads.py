"""Classification heads compared by the source documents, behind one interface
(:class:`Head`) and one registry (:data:`HEADS`, keyed by
:data:`lgm_lab.config.HEAD_NAMES`).

Every head maps features to ``(loss, logits)`` in training and offers the
inference side: ``logits``, ``predict``, ``log_score`` (the log of the
likelihood-style score of the predicted class used for adversarial
verification, paper section 4.3; logs because exp(-d) underflows),
``log_likelihood`` and ``centers``.

- ``softmax``: a linear layer and cross-entropy; score = the affinity wᵀx+b of
  the predicted class, normalised to (0, 1] by a sigmoid.
- ``center``: softmax + lambda_c * center loss (Wen et al.), centers updated by
  their own rule; score = exp(-|x - c_ŷ|² / 2).
- ``lgm``: the L-GM loss (:class:`lgm_ext.LGMLoss`, warm-up ramp included);
  score = the log-likelihood of the predicted class's Gaussian, log-det
  included (docs/SPEC.md section 1); :meth:`LGMHead.scores` adds the paper's
  identity-covariance score, the maximum posterior and the mixture likelihood.
- ``lsoftmax``: L-Softmax (Liu et al., ICML 2016), a multiplicative angular
  margin m on the labelled class; score as softmax.
- ``inverse-class`` / ``inverse-instance``: softmax + lambda_c * a center loss
  whose targets are inverse-adversary features (:mod:`lgm_ext.inverse`: class
  centers as running means of them, or each input's own); score as center loss
  against the running means.  A training step costs ~(1 + inverse_steps) plain ones.

Learning rates: :meth:`Head.class_parameters` are the parameters that get the
head learning-rate multiplier (``TrainConfig.head_lr_mult``): the L-GM means
and log-variances, which must follow the feature clusters (docs/SPEC.md section 5).
The linear layers of softmax, center loss and L-Softmax train at the network's
rate (their usual recipe: the last layer is one more layer of the classifier),
and center-loss centers are not optimizer parameters at all: they follow Wen et
al.'s own update rule (rate ``center_alpha``).

A new head: subclass :class:`Head`, list the config fields it takes in
``config_keys``, decorate it with ``@register_head("name")`` and add the name
to ``HEAD_NAMES`` in :mod:`lgm_lab.config`.
"""
from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgm_ext import CenterLoss, InverseAdversaryCenterLoss, LGMLoss
from lgm_ext.defaults import (
    CENTER_RATE,
    INVERSE_EPS,
    INVERSE_STEP,
    INVERSE_STEPS,
    LGM_ALPHA,
    LGM_LAMBDA,
    LOG_VAR_BOUND,
)

from .config import CENTER_WEIGHT, HEAD_NAMES, LSOFTMAX_M

__all__ = ["Head", "SoftmaxHead", "CenterHead", "LGMHead", "InverseClassCenterHead", "InverseInstanceCenterHead",
           "build_head", "register_head", "HEADS"]

HEADS: dict[str, type["Head"]] = {}


def register_head(name: str):
    """Class decorator: register a :class:`Head` under ``name`` (one of ``HEAD_NAMES``)."""

    def deco(cls):
        if name not in HEAD_NAMES:
            raise ValueError(f"head name {name!r} is not in lgm_lab.config.HEAD_NAMES")
        if name in HEADS:
            raise ValueError(f"head {name!r} is registered twice")
        cls.kind = name
        HEADS[name] = cls
        return cls

    return deco


class Head(nn.Module, abc.ABC):
    """The interface every head implements."""

    kind: str = ""
    #: TrainConfig fields this head takes as keyword arguments.
    config_keys: tuple[str, ...] = ()
    #: What :meth:`centers` holds, as the centers comparisons name it (None: the head has no centers).
    centers_name: str | None = None
    #: The head models the feature density: its log-likelihood map over a 2-D feature plane is worth
    #: drawing, with adversarial examples on it (paper Fig. 1).
    density_map: bool = False

    def __init__(self, feat_dim: int | None = None, num_classes: int | None = None) -> None:
        # Cooperative: a head that is also a library module (LGMHead is an lgm_ext.LGMLoss) lets that
        # module's __init__ set the sizes and reaches this with none.
        super().__init__()
        if feat_dim is None and num_classes is None:
            return
        if feat_dim < 1 or num_classes < 1:
            raise ValueError(f"feat_dim and num_classes must be >= 1, got {feat_dim}, {num_classes}")
        self.feat_dim, self.num_classes = int(feat_dim), int(num_classes)

    @abc.abstractmethod
    def forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(training loss, logits) -- logits without any margin."""

    @abc.abstractmethod
    def logits(self, features: Tensor) -> Tensor:
        """Class scores (N, K) used for prediction and attacks."""

    def predict(self, features: Tensor) -> Tensor:
        return self.logits(features).argmax(1)

    @property
    def label(self) -> str:
        """A short name of this head and its defining setting (``lgm-a1`` for L-GM with alpha = 1)."""
        return self.kind

    @abc.abstractmethod
    def log_score(self, features: Tensor) -> Tensor:
        """log of the verification score of the predicted class (N,)."""

    def score(self, features: Tensor) -> Tensor:
        return self.log_score(features).exp()

    @abc.abstractmethod
    def log_likelihood(self, features: Tensor) -> Tensor:
        """Log-density of each feature under the head's model of the classes (N,)."""

    def centers(self) -> Tensor | None:
        """Class centers (K, D) when the head has them (center loss, L-GM means), else None."""
        return None

    def class_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at the head learning rate (``lr * head_lr_mult``); the rest at ``lr``."""
        return []

    def scores(self, features: Tensor) -> dict[str, Tensor]:
        """Every verification log-score this head offers, by name; ``"default"`` is :meth:`log_score`.
        All heads report ``"max_posterior"``, log of the largest softmax probability (paper Fig. 3).  It is
        bounded by 0 and does not fall with the distance from the data, so it accepts far-away noise (a far
        input is confidently one class): use it against adversarial inputs near the data, not to reject inputs
        from elsewhere."""
        logits = self.logits(features)
        return {"default": self.log_score(features), "max_posterior": logits.log_softmax(1).max(1).values}

    def class_weights(self) -> Tensor | None:
        """Rows of the final linear layer (K, D) when the head has one, else None."""
        return None

    def prepare(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict:
        """Extra keyword arguments for :meth:`forward` that need the network and the images (called by
        the training loop before each step's forward; e.g. inverse-adversary features).  Default: none."""
        return {}


@register_head("softmax")
class SoftmaxHead(Head):
    def __init__(self, feat_dim: int, num_classes: int) -> None:
        super().__init__(feat_dim, num_classes)
        self.fc = nn.Linear(feat_dim, num_classes)

    def logits(self, features: Tensor) -> Tensor:
        return self.fc(features)

    def forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.logits(features)
        return F.cross_entropy(logits, labels), logits

    def log_score(self, features: Tensor) -> Tensor:
        """log sigmoid of the predicted class's affinity (exact where the score underflows)."""
        return F.logsigmoid(self.logits(features).max(1).values)

    def log_likelihood(self, features: Tensor) -> Tensor:
        """The classifier read as an energy model (Grathwohl et al. 2020): log p(x) = logsumexp_k logit_k
        up to a constant."""
        return self.logits(features).logsumexp(1)

    def class_weights(self) -> Tensor:
        return self.fc.weight


def center_log_score(features: Tensor, centers: Tensor, predicted: Tensor) -> Tensor:
    """The center-style log-score -|x - c_ŷ|² / 2 of each feature against the center of its predicted class."""
    return -0.5 * (features - centers.index_select(0, predicted)).pow(2).sum(1)


class _CenterScored(SoftmaxHead):
    """Softmax classification scored against class centers (:meth:`centers`): log-score -|x - c_ŷ|²/2 and
    the log-likelihood of a unit-variance Gaussian per class."""

    def log_score(self, features: Tensor) -> Tensor:
        return center_log_score(features, self.centers(), self.predict(features))

    def log_likelihood(self, features: Tensor) -> Tensor:
        """log N(x; c_ŷ, I): the centers read as unit-variance Gaussians per class."""
        return self.log_score(features) - 0.5 * features.shape[1] * math.log(2 * math.pi)


@register_head("center")
class CenterHead(_CenterScored):
    config_keys = ("lambda_c", "center_alpha")
    centers_name = "center-loss centers"

    def __init__(self, feat_dim: int, num_classes: int, *, lambda_c: float = CENTER_WEIGHT,
                 center_alpha: float = CENTER_RATE) -> None:
        super().__init__(feat_dim, num_classes)
        self.lambda_c = float(lambda_c)
        # sync: under data-parallel training the update sums over ranks (a no-op on one process)
        self.center = CenterLoss(num_classes, feat_dim, alpha=center_alpha, sync=True)

    def forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.logits(features)
        return F.cross_entropy(logits, labels) + self.lambda_c * self.center(features, labels), logits

    def centers(self) -> Tensor:
        return self.center.centers


@register_head("lgm")
class LGMHead(LGMLoss, Head):
    """The L-GM head: an :class:`lgm_ext.LGMLoss` (warm-up ramp included) with the lab's :class:`Head`
    interface, so it goes wherever an ``LGMLoss`` goes (``LGMClassificationLoss(head)``,
    ``LikelihoodDetector.from_head(head)``, ``ShardedLGMLoss.load_full(head.means, head.log_var)``).
    Checkpoints written when the head held its ``LGMLoss`` as ``head.lgm`` load unchanged.

    ``variance_rule="ema"`` (an intervention, docs/likelihood): the log-variances get no gradient; after every
    training forward each class in the batch moves its variances to ``(1 - r) var + r v``, ``v`` the batch's mean
    squared deviation of that class's features from its (learned) mean, ``r = variance_ema_rate``.  They are
    stored unclamped (``log_var_bound`` clamps them in every forward, as always)."""

    config_keys = ("alpha", "lambda_", "covariance", "warmup_steps", "likelihood", "log_var_bound", "variance_rule",
                   "variance_ema_rate")
    centers_name = "L-GM means"
    density_map = True

    def __init__(self, feat_dim: int, num_classes: int, *, alpha: float = LGM_ALPHA, lambda_: float = LGM_LAMBDA,
                 covariance: str = "diag", warmup_steps: int = 0, likelihood: str = "full",
                 log_var_bound: float = LOG_VAR_BOUND, variance_rule: str = "sgd",
                 variance_ema_rate: float = 0.1) -> None:
        if feat_dim < 1 or num_classes < 1:
            raise ValueError(f"feat_dim and num_classes must be >= 1, got {feat_dim}, {num_classes}")
        if variance_rule not in ("sgd", "ema"):
            raise ValueError(f"variance_rule must be 'sgd' or 'ema', got {variance_rule!r}")
        if not 0.0 < variance_ema_rate <= 1.0:
            raise ValueError(f"variance_ema_rate must be in (0, 1], got {variance_ema_rate!r}")
        super().__init__(num_classes, feat_dim, alpha=alpha, lambda_=lambda_, covariance=covariance,
                         warmup_steps=warmup_steps, likelihood=likelihood, log_var_bound=log_var_bound)
        self.variance_rule = "sgd" if self.log_var is None else variance_rule
        self.variance_ema_rate = float(variance_ema_rate)
        if self.variance_rule == "ema":
            self.log_var.requires_grad_(False)
        self._register_load_state_dict_pre_hook(_unwrap_old_lgm_keys)

    def forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        out = super().forward(features, labels)
        if self.training and self.variance_rule == "ema":
            self._ema_update(features, labels)
        return out

    @torch.no_grad()
    def _ema_update(self, features: Tensor, labels: Tensor) -> None:
        """The ``ema`` rule's step (class docstring), after the loss was computed with the variances before it."""
        x = features.detach().to(self.log_var.dtype)
        y = labels.detach().long()
        counts = torch.bincount(y, minlength=self.num_classes)
        sq = torch.zeros_like(self.log_var).index_add_(0, y, (x - self.means.detach().index_select(0, y)) ** 2)
        seen = counts > 0
        batch_var = sq[seen] / counts[seen].to(sq.dtype)[:, None]
        r = self.variance_ema_rate
        var = (1 - r) * self.log_var[seen].exp() + r * batch_var
        new = self.log_var.detach().clone()
        new[seen] = var.clamp(min=torch.finfo(var.dtype).tiny).log()
        # new storage: the forward's autograd graph may hold the old tensor for the backward still to come
        self.log_var.data = new

    def class_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.means, self.log_var) if p is not None and p.requires_grad]

    @property
    def label(self) -> str:
        return f"lgm-a{self.alpha:g}" + ("" if self.likelihood == "full" else f"-lkd-{self.likelihood}")

    def log_score(self, features: Tensor) -> Tensor:
        """The log-likelihood of the predicted class's Gaussian, log-det included (docs/SPEC.md section 1).

        Not -d alone: on Fashion-MNIST the log-det term separated FGSM inputs far
        better (EER 9.8% with it, 23.5% without; docs/SPEC.md section 5)."""
        return self.log_likelihood(features)

    def scores(self, features: Tensor) -> dict[str, Tensor]:
        """The default log-likelihood and, beside it: ``"identity"``, the paper's identity-covariance
        score log exp(-|x - mu_ŷ|² / 2); ``"distance"``, -d[n, ŷ] under the learned covariance
        without the log-det; ``"max_posterior"``; ``"mixture"``, the log-likelihood of the whole
        mixture with equal priors, log (1/K) sum_k N(x; mu_k, Sigma_k)."""
        logits = self.logits(features)  # -d - hl
        best = logits.argmax(1)
        s = self.clamped_log_var()
        top = logits.gather(1, best[:, None]).squeeze(1)
        const = 0.5 * features.shape[1] * math.log(2 * math.pi)
        mu = self.means.index_select(0, best)
        return {
            "default": top - const,
            "identity": -0.5 * (features - mu).pow(2).sum(1),
            "distance": top if s is None else top + 0.5 * s.sum(1)[best],
            "max_posterior": logits.log_softmax(1).max(1).values,
            "mixture": logits.logsumexp(1) - math.log(self.num_classes) - const,
        }

    def centers(self) -> Tensor:
        return self.means


def _unwrap_old_lgm_keys(state_dict, prefix, *_args) -> None:
    """State dicts of the lab before LGMHead became an LGMLoss held ``<prefix>lgm.means`` etc."""
    for key in [k for k in state_dict if k.startswith(prefix + "lgm.")]:
        state_dict[prefix + key[len(prefix) + 4:]] = state_dict.pop(key)


@register_head("lsoftmax")
class LSoftmaxHead(Head):
    """L-Softmax (Liu et al., ICML 2016): a bias-free linear layer whose labelled-class logit
    ``|W_y| |x| cos(theta)`` becomes ``|W_y| |x| psi(theta)`` in training, with
    ``psi(theta) = (-1)^k cos(m theta) - 2k`` for ``theta`` in ``[k pi/m, (k+1) pi/m]``.

    ``cos(m theta)`` is expanded in powers of ``cos(theta)`` (no acos in the
    gradient).  As in Liu et al., the margin is eased in: the labelled logit is
    ``|W_y||x| (beta cos(theta) + psi(theta)) / (1 + beta)`` with ``beta`` falling
    from 1000 as ``1000 / (1 + 1000 t / warmup_steps)`` over training steps t
    (about 1 after the warm-up, then towards 0).  Prediction and scores use the
    plain logits ``W x``.
    """

    config_keys = ("lsoftmax_m", "warmup_steps")
    beta_base = 1000.0

    def __init__(self, feat_dim: int, num_classes: int, *, lsoftmax_m: int = LSOFTMAX_M, warmup_steps: int = 0) -> None:
        super().__init__(feat_dim, num_classes)
        if int(lsoftmax_m) != lsoftmax_m or not 1 <= lsoftmax_m <= 10:
            raise ValueError(f"lsoftmax_m must be an integer in [1, 10], got {lsoftmax_m}")
        self.m, self.warmup_steps = int(lsoftmax_m), int(warmup_steps)
        self.weight = nn.Parameter(torch.empty(num_classes, feat_dim))
        nn.init.kaiming_normal_(self.weight)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        n = torch.arange(0, self.m // 2 + 1, dtype=torch.float64)
        self.register_buffer("_binom", torch.tensor([math.comb(self.m, 2 * int(i)) for i in n]), persistent=False)

    def beta(self) -> float:
        if self.warmup_steps <= 0:
            return 0.0
        return self.beta_base / (1.0 + self.beta_base * int(self.step) / self.warmup_steps)

    def logits(self, features: Tensor) -> Tensor:
        return F.linear(features, self.weight)

    def cos_m_theta(self, cos: Tensor) -> Tensor:
        """cos(m theta) = sum_n (-1)^n C(m, 2n) cos^(m-2n) sin^(2n) (multiple-angle formula)."""
        sin2 = 1.0 - cos * cos
        out = torch.zeros_like(cos)
        for i, c in enumerate(self._binom.tolist()):
            out = out + ((-1) ** i) * c * cos.pow(self.m - 2 * i) * sin2.pow(i)
        return out

    def margin_logits(self, features: Tensor, labels: Tensor, beta: float) -> Tensor:
        """The training logits: plain ``W x`` except the labelled column, as in the class docstring."""
        logits = self.logits(features)
        w_norm = self.weight.norm(dim=1).index_select(0, labels)
        x_norm = features.norm(dim=1)
        wx = logits.gather(1, labels[:, None]).squeeze(1)
        cos = (wx / (w_norm * x_norm).clamp_min(1e-12)).clamp(-1.0, 1.0)
        with torch.no_grad():
            k = torch.floor(torch.acos(cos) * self.m / math.pi).clamp(0, self.m - 1)
        psi = torch.where(k.remainder(2) == 0, 1.0, -1.0) * self.cos_m_theta(cos) - 2.0 * k
        target = w_norm * x_norm * (beta * cos + psi) / (1.0 + beta)
        return logits.scatter(1, labels[:, None], target[:, None])

    def forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        beta = self.beta()
        loss = F.cross_entropy(self.margin_logits(features, labels, beta), labels)
        if self.training:
            self.step.add_(1)
        return loss, self.logits(features)

    def log_score(self, features: Tensor) -> Tensor:
        return F.logsigmoid(self.logits(features).max(1).values)

    def log_likelihood(self, features: Tensor) -> Tensor:
        return self.logits(features).logsumexp(1)

    def class_weights(self) -> Tensor:
        return self.weight


class _InverseCenterHead(_CenterScored):
    """softmax + lambda_c * a center loss towards inverse-adversary features
    (:class:`lgm_ext.InverseAdversaryCenterLoss`); :meth:`prepare` generates the inverse adversaries
    of each training batch on the current network (eval mode, modes restored).  Scores as center loss,
    against the running means of the inverse-adversary features."""

    variant = ""
    config_keys = ("lambda_c", "center_alpha", "inverse_eps", "inverse_step", "inverse_steps")
    centers_name = "learned inverse-adversary centers"

    def __init__(self, feat_dim: int, num_classes: int, *, lambda_c: float = CENTER_WEIGHT,
                 center_alpha: float = CENTER_RATE,
                 inverse_eps: float = INVERSE_EPS, inverse_step: float = INVERSE_STEP,
                 inverse_steps: int = INVERSE_STEPS) -> None:
        super().__init__(feat_dim, num_classes)
        self.lambda_c = float(lambda_c)
        self.inverse = InverseAdversaryCenterLoss(num_classes, feat_dim, variant=self.variant, alpha=center_alpha,
                                                  eps=inverse_eps, step_size=inverse_step, steps=inverse_steps,
                                                  sync=True)

    def prepare(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict:
        return {"inverse_features": self.inverse.inverse_features(model, self, images, labels)}

    def forward(self, features: Tensor, labels: Tensor, inverse_features: Tensor | None = None):
        if inverse_features is None:
            raise ValueError(f"the {self.kind} head needs inverse_features: call head.prepare(model, images, labels) "
                             "first and pass its result (the training loop does)")
        logits = self.logits(features)
        pull = self.inverse(features, labels, inverse_features)
        return F.cross_entropy(logits, labels) + self.lambda_c * pull, logits

    def centers(self) -> Tensor:
        return self.inverse.centers


@register_head("inverse-class")
class InverseClassCenterHead(_InverseCenterHead):
    """Model C-class: class centers = running means (Wen et al.'s rule) of inverse-adversary features."""

    variant = "class"


@register_head("inverse-instance")
class InverseInstanceCenterHead(_InverseCenterHead):
    """Model C-instance: each feature pulled towards its own inverse adversary's feature."""

    variant = "instance"


def build_head(kind: str, feat_dim: int, num_classes: int, **kwargs) -> Head:
    """The head registered as ``kind``.  Keyword arguments the head does not take raise ``TypeError``."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    cls = HEADS[kind]
    unknown = sorted(set(kwargs) - set(cls.config_keys))
    if unknown:
        raise TypeError(f"head {kind!r} takes no argument(s) {', '.join(unknown)} (it takes: "
                        f"{', '.join(cls.config_keys) or 'none'})")
    return cls(feat_dim, num_classes, **kwargs)
