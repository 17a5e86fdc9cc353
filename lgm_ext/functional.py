"""The public functional API (docs/SPEC.md section 2), over the fused operators.

Every L-GM function takes ``impl=``, the one implementation selector:

- ``"auto"`` (default): the fused operator, which runs its per-row loop when
  ``K * D <= DIRECT_MAX_KD`` (8192) and the GEMM expansion above;
- ``"direct"`` / ``"gemm"``: the fused operator on that path (results agree to rounding);
- ``"reference"``: the pure-PyTorch oracle of :mod:`lgm_ext.reference` (slow; for tests).

Defaults: the functions default to ``alpha=0, lambda_=0`` (plain Gaussian-mixture
cross-entropy: nothing is added unless asked), while :class:`lgm_ext.LGMLoss`
defaults to the paper's ``alpha=1, lambda_=0.1``.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from . import reference
from ._ops import HAVE_KERNELS, IMPLS, KERNEL_IMPLS, REDUCTIONS, ops

__all__ = [
    "lgm_loss",
    "lgm_loss_and_logits",
    "lgm_logits",
    "lgm_log_likelihood",
    "pgd_step",
    "pgd_step_",
]


def _scalar(name: str, value) -> float:
    if type(value) is float or type(value) is int:  # the common case, without the ABC check below
        return float(value)
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _nonneg(name: str, value) -> float:
    v = _scalar(name, value)
    if not v >= 0.0 or math.isinf(v):  # also rejects NaN
        raise ValueError(f"{name} must be finite and >= 0, got {v}")
    return v


def _reduction(reduction: str) -> int:
    try:
        return REDUCTIONS[reduction]
    except (KeyError, TypeError):
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}") from None


def _impl(impl: str) -> str:
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    return impl


def check_labels(labels: Tensor, n: int, k: int) -> None:
    """Python-side label validation (the fused operators validate in C++): integer, shape (n,), in [0, k)."""
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if n and labels.device.type != "meta" and not torch.compiler.is_compiling() \
            and (int(labels.min()) < 0 or int(labels.max()) >= k):  # (compiled: the gather refuses them)
        raise ValueError(f"labels must lie in [0, K) = [0, {k})")


_STORAGE = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_inputs(op: str, features: Tensor, means: Tensor, log_var: Tensor | None, labels: Tensor | None,
                  labels_required: bool) -> None:
    """The fused operators' input checks (csrc/host.cpp), for the pure-PyTorch path of an installation without
    the compiled kernels: the same errors either way."""
    if features.dtype not in _STORAGE:
        raise TypeError(f"{op}: features must be float32, float64, bfloat16 or float16, got {features.dtype}")
    if features.dim() != 2:
        raise ValueError(f"{op}: features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if means.dim() != 2:
        raise ValueError(f"{op}: means must be 2-D (K, D), got shape {tuple(means.shape)}")
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{op}: features must be non-empty, got shape {tuple(features.shape)}")
    if means.shape[0] == 0:
        raise ValueError(f"{op}: means must have at least one class, got shape {tuple(means.shape)}")
    if means.shape[1] != features.shape[1]:
        raise ValueError(f"{op}: means has feature dimension D={means.shape[1]} but features has "
                         f"D={features.shape[1]}")
    for name, t in (("means", means), ("log_var", log_var)):
        if t is not None and t.dtype != features.dtype:
            raise TypeError(f"{op}: {name} has dtype {_dtype_name(t)} but features has dtype {_dtype_name(features)}"
                            f"{_MIXED}")
        if t is not None and t.device != features.device:
            raise ValueError(f"{op}: {name} is on {t.device} but features is on {features.device}")
    if log_var is not None and log_var.shape != means.shape:
        raise ValueError(f"{op}: log_var must have the shape of means {tuple(means.shape)}, got "
                         f"{tuple(log_var.shape)}")
    if labels is None:
        if labels_required:
            raise ValueError(f"{op}: labels are required")
        return
    check_labels(labels, features.shape[0], means.shape[0])
    if labels.device != features.device:
        raise ValueError(f"{op}: labels is on {labels.device} but features is on {features.device}")


# as csrc/host.cpp check_same
_MIXED = ("; mixed dtypes are not supported (under torch.autocast the operators cast to float32; otherwise "
          "convert, e.g. the module with .to(dtype))")


def _dtype_name(t: Tensor) -> str:
    return {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
            torch.float16: "Half"}.get(t.dtype, str(t.dtype))


def _autocast(*tensors):
    """The operators' autocast policy (lgm_ext._register), for the pure-PyTorch path: inside torch.autocast,
    bfloat16/float16/float32 inputs are computed in float32 (float64 stays float64)."""
    device = next(t for t in tensors if t is not None).device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return tensors
    cast = (torch.bfloat16, torch.float16, torch.float32)
    return tuple(t.float() if t is not None and t.dtype in cast else t for t in tensors)


def _in_acc(*tensors):
    """bfloat16/float16 inputs computed in float32, as the kernels accumulate (the results are float32)."""
    return tuple(t.float() if t is not None and t.dtype in (torch.bfloat16, torch.float16) else t for t in tensors)


def _tensor(name: str, t, optional: bool = False):
    if type(t) is Tensor or isinstance(t, Tensor):
        return t
    if t is None and optional:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def lgm_loss_and_logits(
    features: Tensor,
    means: Tensor,
    log_var: Tensor | None,
    labels: Tensor,
    *,
    alpha: float = 0.0,
    lambda_: float = 0.0,
    reduction: str = "mean",
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """L-GM loss and the margin-free logits (N, K) from one fused pass.

    Both outputs are differentiable with respect to features, means and log_var.
    ``impl`` selects the implementation (module docstring).

    Args:
        features: (N, D) floating features.
        means: (K, D) class means, the same dtype and device as ``features``.
        log_var: (K, D) log of the diagonal covariances, or ``None`` for identity covariance.
        labels: (N,) integer labels in ``[0, K)``.
        alpha: the margin (>= 0) on the labelled class's distance.
        lambda_: the weight (>= 0) of the likelihood term.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (one loss per row).
        impl: ``"auto"``, ``"direct"``, ``"gemm"`` or ``"reference"`` (module docstring).

    Returns:
        ``(loss, logits)``: the loss as :func:`lgm_loss` returns it, and the (N, K) margin-free logits
        (:func:`lgm_logits` without labels), in float32 (float64 for float64 inputs).
    """
    args = (_tensor("features", features), _tensor("means", means), _tensor("log_var", log_var, optional=True),
            _tensor("labels", labels))
    a, lam, red, impl = _nonneg("alpha", alpha), _nonneg("lambda_", lambda_), _reduction(reduction), _impl(impl)
    if not HAVE_KERNELS:  # installed without the compiled kernels: the reference, with the kernels' checks
        args = (*_autocast(*args[:3]), args[3])
        _check_inputs("lgm_loss", *args, labels_required=True)
        args = (*_in_acc(*args[:3]), args[3].long())
        impl = "reference"
    if impl == "reference":
        check_labels(labels, features.shape[0], means.shape[0])
        loss = reference.lgm_loss(*args, alpha=a, lambda_=lam, reduction=reduction)
        return loss, reference.lgm_logits(*args[:3])
    out = ops.lgm_loss_forward.default(*args, a, lam, red, KERNEL_IMPLS[impl])
    return out[0], out[1]


def lgm_loss(
    features: Tensor,
    means: Tensor,
    log_var: Tensor | None,
    labels: Tensor,
    *,
    alpha: float = 0.0,
    lambda_: float = 0.0,
    reduction: str = "mean",
    impl: str = "auto",
) -> Tensor:
    """Large-Margin Gaussian Mixture loss (Wan et al. 2018, Eqs. 17-18), diagonal covariance.

    ``L = L_cls + lambda_ * L_lkd``, margin ``alpha`` on the labelled class's
    distance.  ``log_var`` is the log of the covariance diagonal (K, D); ``None``
    means identity covariance.  Analytic backward (Eqs. 19-23).  Defaults
    ``alpha=0, lambda_=0``; :class:`lgm_ext.LGMLoss` defaults to the paper's 1 and 0.1.

    Args:
        features: (N, D) floating features.
        means: (K, D) class means, the same dtype and device as ``features``.
        log_var: (K, D) log of the diagonal covariances, or ``None`` for identity covariance.
        labels: (N,) integer labels in ``[0, K)``.
        alpha: the margin (>= 0) on the labelled class's distance.
        lambda_: the weight (>= 0) of the likelihood term.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (one loss per row).
        impl: ``"auto"``, ``"direct"``, ``"gemm"`` or ``"reference"`` (module docstring).

    Returns:
        The loss: a scalar for ``reduction="mean"`` or ``"sum"``, (N,) for ``"none"``; float32 (float64 for
        float64 inputs) whatever the input dtype.
    """
    return lgm_loss_and_logits(features, means, log_var, labels, alpha=alpha, lambda_=lambda_, reduction=reduction,
                               impl=impl)[0]


def lgm_logits(
    features: Tensor,
    means: Tensor,
    log_var: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    alpha: float = 0.0,
    impl: str = "auto",
) -> Tensor:
    """Logits ``-(1 + alpha [k = y]) d[n,k] - 0.5 sum_j log_var[k,j]`` (N, K); the
    margin applies only when labels are given.  Differentiable.

    Args:
        features: (N, D) floating features.
        means: (K, D) class means.
        log_var: (K, D) log of the diagonal covariances, or ``None`` for identity covariance.
        labels: (N,) integer labels in ``[0, K)`` to add the margin to, or ``None`` (margin-free logits).
        alpha: the margin (>= 0); used only with ``labels``.
        impl: the implementation selector (module docstring).

    Returns:
        (N, K) logits, float32 (float64 for float64 inputs).
    """
    args = (_tensor("features", features), _tensor("means", means), _tensor("log_var", log_var, optional=True),
            _tensor("labels", labels, optional=True))
    a, impl = _nonneg("alpha", alpha), _impl(impl)
    if not HAVE_KERNELS:
        args = (*_autocast(*args[:3]), args[3])
        _check_inputs("lgm_logits", *args, labels_required=False)
        args = (*_in_acc(*args[:3]), None if labels is None else args[3].long())
        impl = "reference"
    if impl == "reference":
        if labels is not None:
            check_labels(labels, features.shape[0], means.shape[0])
        return reference.lgm_logits(*args, alpha=a)
    return ops.lgm_logits(*args, a, KERNEL_IMPLS[impl])


def lgm_log_likelihood(features: Tensor, means: Tensor, log_var: Tensor | None = None, *,
                       impl: str = "auto") -> Tensor:
    """Log-likelihood of each feature under the Gaussian of its predicted class
    (paper section 4.3): ``-d[n, yhat] - 0.5 sum_j log_var[yhat, j] - 0.5 D log(2 pi)``.

    Args:
        features: (N, D) floating features.
        means: (K, D) class means.
        log_var: (K, D) log of the diagonal covariances, or ``None`` for identity covariance.
        impl: the implementation selector (module docstring).

    Returns:
        (N,) log-likelihoods in nats (higher = more normal), float32 (float64 for float64 inputs).
    """
    args = (_tensor("features", features), _tensor("means", means), _tensor("log_var", log_var, optional=True))
    if not HAVE_KERNELS:
        args = _autocast(*args)
        _check_inputs("lgm_log_likelihood", *args, None, labels_required=False)
        return reference.lgm_log_likelihood(*_in_acc(*args))
    if _impl(impl) == "reference":
        return reference.lgm_log_likelihood(*args)
    return ops.lgm_log_likelihood(*args, KERNEL_IMPLS[impl])[0]


def _pgd_args(x, grad, x_orig, alpha, eps, lower, upper):
    _tensor("x", x), _tensor("grad", grad), _tensor("x_orig", x_orig)
    a = _scalar("alpha", alpha)
    e = _scalar("eps", eps)
    lo, hi = _scalar("lower", lower), _scalar("upper", upper)
    if not e >= 0.0:
        raise ValueError(f"eps must be >= 0, got {e}")
    if not lo <= hi:
        raise ValueError(f"lower must be <= upper, got lower={lo}, upper={hi}")
    return a, e, lo, hi


def pgd_step(
    x: Tensor, grad: Tensor, x_orig: Tensor, *, alpha: float, eps: float, lower: float = 0.0, upper: float = 1.0
) -> Tensor:
    """``clip_[lower,upper](clip_[x_orig-eps, x_orig+eps](x + alpha * sign(grad)))`` in one pass.

    ``alpha < 0`` descends (inverse adversary); ``sign(0) = 0``.  The step carries
    no gradient: the result never requires grad (attack loops detach anyway).
    bfloat16/float16 ``x`` steps and projects in float32 and rounds once to its dtype, so the result can
    lie up to half a unit in the last place outside the eps-ball or [lower, upper] -- as the same formula
    in bf16 torch ops, whose bounds ``x_orig +- eps`` are rounded too.

    Args:
        x: the current iterate (any shape), floating.
        grad: the gradient of the attack's loss at ``x`` (the shape of ``x``).
        x_orig: the clean input the eps-ball is centred on (the shape of ``x``).
        alpha: the step size; negative descends the loss.
        eps: the L-infinity radius (>= 0).
        lower: the box's lower bound (the valid pixel range).
        upper: the box's upper bound (``>= lower``).

    Returns:
        A new tensor of the shape and dtype of ``x``, not requiring grad.
    """
    a, e, lo, hi = _pgd_args(x, grad, x_orig, alpha, eps, lower, upper)
    with torch.no_grad():
        if not HAVE_KERNELS:
            _check_pgd("pgd_step", x, grad, x_orig, a)
            v = reference.pgd_step(*_in_acc(x, grad, x_orig), alpha=a, eps=e, lower=lo, upper=hi)
            return v.to(x.dtype).contiguous()
        return ops.pgd_step(x, grad, x_orig, a, e, lo, hi)


def pgd_step_(
    x: Tensor, grad: Tensor, x_orig: Tensor, *, alpha: float, eps: float, lower: float = 0.0, upper: float = 1.0
) -> Tensor:
    """In-place :func:`pgd_step`: overwrites and returns ``x``.

    As torch's in-place ops, it refuses (``ValueError``) a ``grad`` or ``x_orig`` that partly shares memory with
    ``x`` (``x_orig`` may be ``x`` itself) and an ``x`` whose elements share memory (an expanded tensor).

    Args:
        x: the current iterate (any shape), floating.
        grad: the gradient of the attack's loss at ``x`` (the shape of ``x``).
        x_orig: the clean input the eps-ball is centred on (the shape of ``x``).
        alpha: the step size; negative descends the loss.
        eps: the L-infinity radius (>= 0).
        lower: the box's lower bound (the valid pixel range).
        upper: the box's upper bound (``>= lower``).

    Returns:
        ``x``, updated in place.
    """
    a, e, lo, hi = _pgd_args(x, grad, x_orig, alpha, eps, lower, upper)
    with torch.no_grad():
        if not HAVE_KERNELS:
            _check_pgd("pgd_step_", x, grad, x_orig, a)
            # as torch's in-place ops (csrc/host.cpp check_pgd_inplace)
            if any(size > 1 and stride == 0 for size, stride in zip(x.shape, x.stride())):
                raise ValueError("pgd_step_: x has elements that share memory (an expanded or stride-0 tensor) and "
                                 "cannot be written in place; pass x.clone()")
            for name, t in (("grad", grad), ("x_orig", x_orig)):
                if _partly_overlaps(x, t):
                    raise ValueError(f"pgd_step_: {name} partly overlaps x (some of their elements share memory), so "
                                     f"writing x would change {name} while it is read; torch's in-place ops refuse "
                                     f"this too -- pass {name}.clone()")
            x.copy_(reference.pgd_step(*_in_acc(x, grad, x_orig), alpha=a, eps=e, lower=lo, upper=hi))
            return x
        ops.pgd_step_(x, grad, x_orig, a, e, lo, hi)
    return x


def _byte_span(t: Tensor) -> tuple[int, int]:
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _partly_overlaps(x: Tensor, t: Tensor) -> bool:
    """torch's MemOverlapStatus::Partial (at::get_overlap_status) from public attributes: ``t`` and ``x`` share
    some memory but are not the same elements.  Tensors that are not contiguous are not judged (torch's
    TooHard: allowed)."""
    if t.numel() == 0 or x.numel() == 0 or t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
        return False
    if t.data_ptr() == x.data_ptr() and t.shape == x.shape and t.stride() == x.stride():
        return False  # the same elements (full overlap): each is read before it is written
    if not (x.is_contiguous() and t.is_contiguous()):
        return False
    (a0, a1), (b0, b1) = _byte_span(x), _byte_span(t)
    return a0 < b1 and b0 < a1


def _check_pgd(op: str, x: Tensor, grad: Tensor, x_orig: Tensor, alpha: float) -> None:
    """The fused step's checks (csrc/host.cpp), for the pure-PyTorch path."""
    if x.dtype not in _STORAGE:
        raise TypeError(f"{op}: x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    for name, t in (("grad", grad), ("x_orig", x_orig)):
        if t.dtype != x.dtype:
            raise TypeError(f"pgd_step: {name} has dtype {_dtype_name(t)} but x has dtype {_dtype_name(x)}{_MIXED}")
    for name, t in (("grad", grad), ("x_orig", x_orig)):
        if t.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but x has shape {tuple(x.shape)}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if not math.isfinite(alpha):
        raise ValueError(f"{op}: alpha (the step) must be finite, got {alpha}")
