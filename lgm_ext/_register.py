"""Registration of the ``torch.ops.lgm_ext`` operators' fake kernels (for ``torch.compile``), autograd formulas
and autocast policy; imported by :mod:`lgm_ext._ops` once the compiled kernels are loaded."""
from __future__ import annotations

import torch

from ._ops import acc_dtype, ops


# --------------------------------------------------------------------- fake kernels
# The fake kernels also serve the Meta dispatch key: a call mixing real and meta
# tensors dispatches here, so they check devices like the real kernels do
# (otherwise they would hand back uninitialised memory on the real device).
def _check_devices(op, anchor_name, anchor, **named):
    for name, t in named.items():
        if t is not None and t.device != anchor.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {anchor_name} is on {anchor.device}; "
                "all inputs must be on one device"
            )


def _fake_lgm_shapes(op, features, means, log_var, labels, **others):
    _check_devices(op, "features", features, means=means, log_var=log_var, labels=labels, **others)
    torch._check(features.dim() == 2, lambda: "features must be 2-D (N, D)")
    torch._check(means.dim() == 2, lambda: "means must be 2-D (K, D)")
    torch._check(means.shape[1] == features.shape[1], lambda: "means and features disagree on D")
    if log_var is not None:
        torch._check(log_var.shape == means.shape, lambda: "log_var must have the shape of means")
    if labels is not None:
        torch._check(labels.dim() == 1 and labels.shape[0] == features.shape[0], lambda: "labels must be (N,)")
    return features.shape[0], means.shape[0]


def _check_shard(class_offset, reduction):  # as csrc/host.cpp check_shard
    if class_offset is not None:
        torch._check(class_offset >= 0, lambda: f"class_offset must be >= 0, got {class_offset}")
        torch._check(reduction == 0, lambda: "with class_offset (a class shard) reduction must be 0 (none)")


@torch.library.register_fake("lgm_ext::lgm_loss_forward")
def _(features, means, log_var, labels, alpha, lambda_, reduction, impl, class_offset=None):
    _check_shard(class_offset, reduction)
    n, k = _fake_lgm_shapes("lgm_loss", features, means, log_var, labels)
    acc = acc_dtype(features.dtype)
    loss = features.new_empty((), dtype=acc) if reduction != 0 else features.new_empty((n,), dtype=acc)
    return loss, features.new_empty((n, k), dtype=acc), features.new_empty((n, 2), dtype=acc)


def _fake_grads(features, means, log_var, output_mask):
    def grad_like(t, need):
        return torch.empty_like(t) if need and t is not None else features.new_empty((0,))

    return (
        grad_like(features, output_mask[0]),
        grad_like(means, output_mask[1]),
        grad_like(means if log_var is not None else None, output_mask[2]),
    )


@torch.library.register_fake("lgm_ext::lgm_loss_backward")
def _(grad_loss, grad_logits, features, means, log_var, labels, logits, row_stats, alpha, lambda_, reduction, impl,
      output_mask=(True, True, True), class_offset=None):
    _check_shard(class_offset, reduction)
    _fake_lgm_shapes("lgm_loss_backward", features, means, log_var, labels, grad_loss=grad_loss,
                     grad_logits=grad_logits, logits=logits, row_stats=row_stats)
    return _fake_grads(features, means, log_var, output_mask)


@torch.library.register_fake("lgm_ext::lgm_logits")
def _(features, means, log_var, labels, alpha, impl):
    n, k = _fake_lgm_shapes("lgm_logits", features, means, log_var, labels)
    return features.new_empty((n, k), dtype=acc_dtype(features.dtype))


@torch.library.register_fake("lgm_ext::lgm_logits_backward")
def _(grad, features, means, log_var, labels, alpha, impl, output_mask=(True, True, True)):
    _fake_lgm_shapes("lgm_logits_backward", features, means, log_var, labels, grad=grad)
    return _fake_grads(features, means, log_var, output_mask)


@torch.library.register_fake("lgm_ext::lgm_log_likelihood")
def _(features, means, log_var, impl):
    n, _k = _fake_lgm_shapes("lgm_log_likelihood", features, means, log_var, None)
    return features.new_empty((n,), dtype=acc_dtype(features.dtype)), features.new_empty((n,), dtype=torch.long)


@torch.library.register_fake("lgm_ext::pgd_step")
def _(x, grad, x_orig, alpha, eps, lower, upper):
    _check_devices("pgd_step", "x", x, grad=grad, x_orig=x_orig)
    torch._check(grad.shape == x.shape and x_orig.shape == x.shape, lambda: "pgd_step: shapes differ")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("lgm_ext::pgd_step_")
def _(x, grad, x_orig, alpha, eps, lower, upper):
    _check_devices("pgd_step_", "x", x, grad=grad, x_orig=x_orig)
    torch._check(grad.shape == x.shape and x_orig.shape == x.shape, lambda: "pgd_step_: shapes differ")
    return None


# --------------------------------------------------------------------- autograd
def _needs(ctx, has_log_var):
    return [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(has_log_var and ctx.needs_input_grad[2])]


# The loss's autograd formula is C++ (csrc/autograd.cpp, the Autograd dispatch key): a Python formula here
# cost ~0.2 ms of wrapper per training step, as much as the kernels at K = 10.


def _logits_setup(ctx, inputs, output):
    features, means, log_var, labels, alpha, impl = inputs
    ctx.save_for_backward(features, means, log_var, labels)
    ctx.hyper = (alpha, impl)
    ctx.has_log_var = log_var is not None


def _logits_backward(ctx, grad):
    features, means, log_var, labels = ctx.saved_tensors
    alpha, impl = ctx.hyper
    mask = _needs(ctx, ctx.has_log_var)
    gx, gmu, gs = ops.lgm_logits_backward(grad, features, means, log_var, labels, alpha, impl, mask)
    return (gx if mask[0] else None), (gmu if mask[1] else None), (gs if mask[2] else None), None, None, None


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
    grad_logits = grad_ll.new_zeros((features.shape[0], means.shape[0]))
    grad_logits.scatter_(1, pred.unsqueeze(1), grad_ll.unsqueeze(1))
    mask = _needs(ctx, ctx.has_log_var)
    gx, gmu, gs = ops.lgm_logits_backward(grad_logits, features, means, log_var, None, 0.0, ctx.impl, mask)
    return (gx if mask[0] else None), (gmu if mask[1] else None), (gs if mask[2] else None), None


torch.library.register_autograd("lgm_ext::lgm_log_likelihood", _ll_backward, setup_context=_ll_setup)


# Double backward is not supported (as torchvision's ops, which mark their
# backward once_differentiable): the backward ops get an autograd formula that
# raises when it is reached, instead of PyTorch's default (a warning, then
# silently zero second derivatives).  First derivatives with create_graph=True
# still work; only differentiating them again raises.
def _no_double_backward(op):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"lgm_ext.{op}: double backward is not supported -- the fused L-GM operators' gradients are not "
            "differentiable (torch.autograd.gradgradcheck, gradient penalties or Hessian products through them "
            "need impl='reference', the pure-PyTorch oracle)"
        )

    return backward


for _op in ("lgm_loss_backward", "lgm_logits_backward"):
    torch.library.register_autograd(f"lgm_ext::{_op}", _no_double_backward(_op),
                                    setup_context=lambda ctx, inputs, output: None)


# Autocast policy (AutocastCPU, AutocastCUDA): the forward operators run in float32, as torch's own
# losses (cross_entropy, log_softmax, ...): inside torch.autocast, bfloat16/float16 features and
# float32 parameters are cast to float32 (float64 stays float64), the loss and logits come back in
# float32, and the backward returns each input's gradient in its own dtype.  (The kernels accumulate in
# float32 whatever the storage dtype, so running them "in bf16" would only round the inputs.)
AUTOCAST_OPS = ("lgm_loss_forward", "lgm_logits", "lgm_log_likelihood")
for _op in AUTOCAST_OPS:
    for _device in ("cpu", "cuda"):
        if torch.amp.is_autocast_available(_device):
            torch.library.register_autocast(f"lgm_ext::{_op}", _device, torch.float32)
