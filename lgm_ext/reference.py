"""Pure-PyTorch versions of the operators.

``lgm_loss`` / ``lgm_logits`` / ``lgm_log_likelihood`` / ``pgd_step`` are the
test oracle: the direct formula of docs/SPEC.md section 1, evaluated in blocks of
classes so memory stays bounded, differentiated by autograd.  Two more versions
exist for the benchmarks: ``lgm_loss_gemm`` (the GEMM expansion in plain
PyTorch, the fastest plain version at large K*D) and ``lgm_loss_naive`` (the
full N x K x D broadcast most public ports use).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

_BLOCK_ELEMS = 1 << 22  # N * classes-per-block * D elements at most


def _block_distances(features: Tensor, means: Tensor, w: Tensor | None) -> Tensor:
    diff = features[:, None, :] - means[None, :, :]
    sq = diff * diff
    if w is not None:
        sq = sq * w[None, :, :]
    return 0.5 * sq.sum(-1)


def distances(features: Tensor, means: Tensor, log_var: Tensor | None = None) -> Tensor:
    """``d[n,k] = 0.5 * sum_j (x[n,j] - mu[k,j])^2 * exp(-log_var[k,j])`` (N, K), direct and exact.

    Evaluated in blocks of classes of at most ``_BLOCK_ELEMS`` N*c*D elements;
    with several blocks under autograd each block is checkpointed (recomputed in
    backward), so memory stays bounded by one block in backward too.  Traced by
    torch.export or torch.compile it is one block (the block size would depend on N:
    a guard on the batch size)."""
    n, dim = features.shape
    k = means.shape[0]
    step = max(1, _BLOCK_ELEMS // max(1, n * dim))
    w = None if log_var is None else torch.exp(-log_var)
    if torch.compiler.is_compiling() or step >= k:  # traced (export, compile): one block, no branch on N
        return _block_distances(features, means, w)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (features, means, w))
    blocks = []
    for start in range(0, k, step):
        args = (features, means[start : start + step], None if w is None else w[start : start + step])
        if grad:
            blocks.append(checkpoint(_block_distances, *args, use_reentrant=False))
        else:
            blocks.append(_block_distances(*args))
    return torch.cat(blocks, 1)


def _half_logdet(log_var: Tensor | None, means: Tensor) -> Tensor:
    if log_var is None:
        return means.new_zeros(means.shape[0])
    return 0.5 * log_var.sum(1)


def _loss_from_d(d, hl, labels, alpha, lambda_, reduction):
    onehot = F.one_hot(labels, d.shape[1]).to(d.dtype)
    logits = -(1.0 + alpha * onehot) * d - hl
    l_cls = torch.logsumexp(logits, 1) - logits.gather(1, labels[:, None]).squeeze(1)
    l_lkd = d.gather(1, labels[:, None]).squeeze(1) + hl[labels]
    loss = l_cls + lambda_ * l_lkd
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")


def lgm_loss(features, means, log_var, labels, *, alpha=0.0, lambda_=0.0, reduction="mean") -> Tensor:
    """The L-GM loss by the direct formula (the oracle)."""
    d = distances(features, means, log_var)
    return _loss_from_d(d, _half_logdet(log_var, means), labels, alpha, lambda_, reduction)


def lgm_logits(features, means, log_var=None, labels=None, *, alpha=0.0) -> Tensor:
    d = distances(features, means, log_var)
    scale = 1.0
    if labels is not None:
        scale = 1.0 + alpha * F.one_hot(labels, d.shape[1]).to(d.dtype)
    return -scale * d - _half_logdet(log_var, means)


def lgm_log_likelihood(features, means, log_var=None) -> Tensor:
    logits = lgm_logits(features, means, log_var)
    return logits.max(1).values - 0.5 * features.shape[1] * math.log(2.0 * math.pi)


def lgm_loss_gemm(features, means, log_var, labels, *, alpha=0.0, lambda_=0.0, reduction="mean") -> Tensor:
    """The GEMM expansion ``0.5 (x^2 w^T - 2 x (mu w)^T + sum mu^2 w)`` in plain PyTorch, clamped at 0."""
    if log_var is None:
        sq = (features * features).sum(1, keepdim=True) - 2.0 * features @ means.t() + (means * means).sum(1)
    else:
        w = torch.exp(-log_var)
        sq = (features * features) @ w.t() - 2.0 * features @ (means * w).t() + (means * means * w).sum(1)
    d = 0.5 * sq.clamp_min(0.0)
    return _loss_from_d(d, _half_logdet(log_var, means), labels, alpha, lambda_, reduction)


def lgm_loss_naive(features, means, log_var, labels, *, alpha=0.0, lambda_=0.0, reduction="mean") -> Tensor:
    """What most public ports do: one (N, K, D) broadcast tensor."""
    diff = features.unsqueeze(1) - means.unsqueeze(0)
    if log_var is None:
        d = 0.5 * (diff * diff).sum(-1)
    else:
        d = 0.5 * (diff * diff * torch.exp(-log_var).unsqueeze(0)).sum(-1)
    return _loss_from_d(d, _half_logdet(log_var, means), labels, alpha, lambda_, reduction)


def pgd_step(x, grad, x_orig, *, alpha, eps, lower=0.0, upper=1.0) -> Tensor:
    """The projected sign step in plain torch ops."""
    v = x + alpha * torch.sign(grad)
    v = torch.minimum(torch.maximum(v, x_orig - eps), x_orig + eps)
    return v.clamp(lower, upper)
