"""Registration of the ``torch.ops.lgm_ext`` operators' fake kernels (for
``torch.compile``) and autograd formulas.  The kernels themselves are C++/CUDA
(``csrc/``); importing this module loads them."""
from __future__ import annotations

import torch

from . import _C  # loads the operator library (schemas + kernels)

ops = torch.ops.lgm_ext

# Codes shared with the C++ operators; defined once, in csrc/host.h, and exported by _C.
REDUCTIONS = {"none": _C.REDUCTION_NONE, "mean": _C.REDUCTION_MEAN, "sum": _C.REDUCTION_SUM}
KERNEL_IMPLS = {"auto": _C.IMPL_AUTO, "direct": _C.IMPL_DIRECT, "gemm": _C.IMPL_GEMM}
# "auto" takes the fused per-row loop when K*D <= DIRECT_MAX_KD, else the GEMM path.
DIRECT_MAX_KD = _C.DIRECT_MAX_KD
# The values of the ``impl=`` argument of the functional API and the modules.
IMPLS = (*KERNEL_IMPLS, "reference")


def has_cuda_kernels() -> bool:
    """True when this build registered CUDA kernels for the operators."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("lgm_ext::lgm_loss_forward", "CUDA")


# --------------------------------------------------------------------- fake kernels
def _fake_lgm_shapes(features, means, log_var, labels):
    torch._check(features.dim() == 2, lambda: "features must be 2-D (N, D)")
    torch._check(means.dim() == 2, lambda: "means must be 2-D (K, D)")
    torch._check(means.shape[1] == features.shape[1], lambda: "means and features disagree on D")
    if log_var is not None:
        torch._check(log_var.shape == means.shape, lambda: "log_var must have the shape of means")
    if labels is not None:
        torch._check(labels.dim() == 1 and labels.shape[0] == features.shape[0], lambda: "labels must be (N,)")
    return features.shape[0], means.shape[0]


@torch.library.register_fake("lgm_ext::lgm_loss_forward")
def _(features, means, log_var, labels, alpha, lambda_, reduction, impl):
    n, k = _fake_lgm_shapes(features, means, log_var, labels)
    loss = features.new_empty(()) if reduction != 0 else features.new_empty((n,))
    return loss, features.new_empty((n, k)), features.new_empty((n,))


def _fake_grads(features, means, log_var):
    gs = torch.empty_like(means) if log_var is not None else features.new_empty((0,))
    return torch.empty_like(features), torch.empty_like(means), gs


@torch.library.register_fake("lgm_ext::lgm_loss_backward")
def _(grad_loss, grad_logits, features, means, log_var, labels, logits, lse, alpha, lambda_, reduction, impl):
    _fake_lgm_shapes(features, means, log_var, labels)
    return _fake_grads(features, means, log_var)


@torch.library.register_fake("lgm_ext::lgm_logits")
def _(features, means, log_var, labels, alpha, impl):
    n, k = _fake_lgm_shapes(features, means, log_var, labels)
    return features.new_empty((n, k))


@torch.library.register_fake("lgm_ext::lgm_logits_backward")
def _(grad, features, means, log_var, labels, alpha, impl):
    _fake_lgm_shapes(features, means, log_var, labels)
    return _fake_grads(features, means, log_var)


@torch.library.register_fake("lgm_ext::lgm_log_likelihood")
def _(features, means, log_var, impl):
    n, _k = _fake_lgm_shapes(features, means, log_var, None)
    return features.new_empty((n,)), features.new_empty((n,), dtype=torch.long)


@torch.library.register_fake("lgm_ext::pgd_step")
def _(x, grad, x_orig, alpha, eps, lower, upper):
    torch._check(grad.shape == x.shape and x_orig.shape == x.shape, lambda: "pgd_step: shapes differ")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("lgm_ext::pgd_step_")
def _(x, grad, x_orig, alpha, eps, lower, upper):
    torch._check(grad.shape == x.shape and x_orig.shape == x.shape, lambda: "pgd_step_: shapes differ")
    return None


# --------------------------------------------------------------------- autograd
def _loss_setup(ctx, inputs, output):
    features, means, log_var, labels, alpha, lambda_, reduction, impl = inputs
    _loss, logits, lse = output
    ctx.save_for_backward(features, means, log_var, labels, logits, lse)
    ctx.hyper = (alpha, lambda_, reduction, impl)
    ctx.has_log_var = log_var is not None
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _loss_backward(ctx, grad_loss, grad_logits, _grad_lse):
    features, means, log_var, labels, logits, lse = ctx.saved_tensors
    alpha, lambda_, reduction, impl = ctx.hyper
    if grad_loss is None:
        grad_loss = features.new_zeros(() if reduction != 0 else (features.shape[0],))
    gx, gmu, gs = ops.lgm_loss_backward(
        grad_loss, grad_logits, features, means, log_var, labels, logits, lse, alpha, lambda_, reduction, impl
    )
    return gx, gmu, (gs if ctx.has_log_var else None), None, None, None, None, None


torch.library.register_autograd("lgm_ext::lgm_loss_forward", _loss_backward, setup_context=_loss_setup)


def _logits_setup(ctx, inputs, output):
    features, means, log_var, labels, alpha, impl = inputs
    ctx.save_for_backward(features, means, log_var, labels)
    ctx.hyper = (alpha, impl)
    ctx.has_log_var = log_var is not None


def _logits_backward(ctx, grad):
    features, means, log_var, labels = ctx.saved_tensors
    alpha, impl = ctx.hyper
    gx, gmu, gs = ops.lgm_logits_backward(grad, features, means, log_var, labels, alpha, impl)
    return gx, gmu, (gs if ctx.has_log_var else None), None, None, None


torch.library.register_autograd("lgm_ext::lgm_logits", _logits_backward, setup_context=_logits_setup)


def _ll_setup(ctx, inputs, output):
    features, means, log_var, impl = inputs
    _ll, pred = output
    ctx.save_for_backward(features, means, log_var, pred)
    ctx.impl = impl
    ctx.has_log_var = log_var is not None


def _ll_backward(ctx, grad_ll, _grad_pred):
    features, means, log_var, pred = ctx.saved_tensors
    # d log_lik[n] / d logits[n, k] is one-hot at the predicted class.
    grad_logits = features.new_zeros((features.shape[0], means.shape[0]))
    grad_logits.scatter_(1, pred.unsqueeze(1), grad_ll.unsqueeze(1))
    gx, gmu, gs = ops.lgm_logits_backward(grad_logits, features, means, log_var, None, 0.0, ctx.impl)
    return gx, gmu, (gs if ctx.has_log_var else None), None


torch.library.register_autograd("lgm_ext::lgm_log_likelihood", _ll_backward, setup_context=_ll_setup)
