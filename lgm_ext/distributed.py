"""L-GM past one device: a class-sharded head over ``torch.distributed`` (gloo on CPU, NCCL on GPU).
(Center losses stay identical across data-parallel ranks with ``CenterLoss(..., sync=True)``.)

**Class sharding** (the pattern of Megatron's vocab-parallel cross-entropy and Partial-FC): rank r
holds the means and log-variances of its contiguous class range ``[lo_r, hi_r)`` (:func:`shard_range`;
K need not divide by the world size).  One step:

1. the features and labels of every rank are gathered (the global batch, N rows);
2. each rank runs the fused loss operator on its shard, ``lgm_loss_forward(..., class_offset=lo_r)``
   -- the same kernels as the single-device loss: its margin-free logits ``(N, K_r)``, and per row
   ``lse_r`` (log-sum-exp over the shard, the margin logit in the labelled column where the rank owns
   the label), ``q_r = 1 - P_r[n, y]`` (1 where it does not) and, on the owner, the labelled terms
   ``-margin_logit + lambda_ (d_y + hl_y)``;
3. two all-reduces (the max of ``lse_r``, then one packed sum of N x 3) give ``lse = log sum_r
   exp(lse_r)``, ``1 - P[n, y] = sum_r q_r exp(lse_r - lse)`` and the loss of every row -- the
   same value on every rank.

Backward: ``lgm_loss_backward(..., class_offset=lo_r)`` with the global statistics gives each rank
the exact gradient of its means/log_var and its addend of the gathered features' gradient; that is
summed over ranks (all-reduce) and each rank keeps its own rows, so ``local_features.grad`` is the
exact gradient of the global loss.  Under ``DistributedDataParallel`` (which averages gradients
over ranks) build the module with ``ddp=True``: the feature gradient is then scaled by the world
size, so the averaged backbone gradient is again the exact one.  Do not wrap the sharded
parameters in DDP: they differ per rank by design.

Memory per rank: ``2 K D / W`` parameter floats and what the fused loss holds for ``K / W`` classes
(the ``N x K_r`` logits when it keeps them, else one class tile), instead of ``2 K D`` and ``N x K``.
Communication per step: all-gather of N x D features and N labels, all-reduces of N and 3 N floats,
and in the backward one all-reduce of N x D.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._ops import KERNEL_IMPLS, REDUCTIONS, acc_dtype, keep_logits_for_backward, ops
from .functional import _nonneg, lgm_logits

__all__ = ["shard_range", "ShardedLGMLoss", "gather_rows"]


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first "
                           "(or use lgm_ext.LGMLoss on one device)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The contiguous class range ``[lo, hi)`` of ``rank``: the first ``K % W`` ranks get one class more.
    A rank may hold no class when ``K < W``."""
    if num_classes < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need num_classes >= 1, world_size >= 1 and 0 <= rank < world_size, got "
                         f"{num_classes}, {world_size}, {rank}")
    base, extra = divmod(num_classes, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (ranks may hold different row counts); backward: all-reduce the
    gradient and keep this rank's rows, times ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, group, scale: float) -> Tensor:
        rank, world = _world(group)
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n, group=group)
        sizes = [int(s) for s in sizes]
        top = max(sizes)
        pad = x.new_zeros((top,) + tuple(x.shape[1:]))
        pad[: x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad.contiguous(), group=group)
        ctx.group, ctx.scale, ctx.sizes, ctx.rank = group, scale, sizes, rank
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]] * ctx.scale, None, None


def gather_rows(x: Tensor, group=None, *, grad_scale: float = 1.0) -> Tensor:
    """Rows of ``x`` from every rank, concatenated in rank order (differentiable for floating-point
    ``x``: the gradient flowing back to each rank is the sum over ranks of the gradient of its rows,
    times ``grad_scale``)."""
    if x.is_floating_point():
        return _GatherRows.apply(x, group, float(grad_scale))
    with torch.no_grad():
        return _GatherRows.apply(x, group, 1.0)


def _combine_shard_stats(lse_r: Tensor, q_r: Tensor, a_r: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """Global row statistics and loss from one shard's partials (the forward of
    ``lgm_loss_forward(..., class_offset=lo)``): ``lse = log sum_r exp(lse_r)``, ``1 - P[n, y] =
    sum_r q_r exp(lse_r - lse)`` (a sum of non-negative terms: as exact as the single-device value)
    and ``L[n] = lse + sum_r a_r`` with ``a_r = L_r - lse_r`` on the owner, 0 elsewhere.  Two
    all-reduces: the max (N) and one packed sum (N x 3)."""
    m = lse_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = (lse_r - m_safe).exp()
    packed = torch.stack([e, q_r * e, a_r], 1)
    dist.all_reduce(packed, group=group)
    total = packed[:, 0]
    lse = m_safe + total.log()
    q = packed[:, 1] / total
    return lse, q, lse + packed[:, 2]


class _ShardedLoss(torch.autograd.Function):
    """Per-row L-GM loss of the gathered batch over all shards.  Forward and backward are the fused
    operators with ``class_offset`` (one shard's logits, partial statistics and gradients; no N x K_r
    temporaries beyond what the single-device loss holds) plus :func:`_combine_shard_stats`."""

    @staticmethod
    def forward(ctx, feats: Tensor, means: Tensor, log_var: Tensor | None, labels: Tensor, lo: int, alpha: float,
                lambda_: float, impl: int, group) -> Tensor:
        n = feats.shape[0]
        if means.shape[0] == 0:  # a rank without classes (K < W) contributes nothing to any sum
            acc = acc_dtype(feats.dtype)  # what the other ranks' operator returns: the all-reduces need one dtype
            lse_r = feats.new_full((n,), -math.inf, dtype=acc)
            q_r, a_r = feats.new_ones(n, dtype=acc), feats.new_zeros(n, dtype=acc)
            logits = None
        else:
            loss_r, logits, stats = ops.lgm_loss_forward(feats, means, log_var, labels, alpha, lambda_,
                                                         REDUCTIONS["none"], impl, lo)
            lse_r, q_r = stats[:, 0], stats[:, 1]
            own = (labels >= lo) & (labels < lo + means.shape[0])
            a_r = torch.where(own, loss_r - lse_r, torch.zeros_like(loss_r))
            if not keep_logits_for_backward(n, means.shape[0], feats.shape[1], impl):
                logits = None  # the backward recomputes them one class tile at a time
        lse, q, rows = _combine_shard_stats(lse_r, q_r, a_r, group)
        ctx.save_for_backward(feats, means, log_var, labels, logits, torch.stack([lse, q], 1))
        ctx.hyper = (lo, alpha, lambda_, impl)
        return rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows: Tensor):
        feats, means, log_var, labels, logits, stats = ctx.saved_tensors
        lo, alpha, lambda_, impl = ctx.hyper
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], log_var is not None and ctx.needs_input_grad[2]]
        if means.shape[0] == 0:
            gx = torch.zeros_like(feats) if need[0] else None
            return (gx, torch.zeros_like(means) if need[1] else None,
                    torch.zeros_like(log_var) if need[2] else None, None, None, None, None, None, None)
        gx, gmu, gs = ops.lgm_loss_backward(grad_rows.contiguous(), None, feats, means, log_var, labels, logits, stats,
                                            alpha, lambda_, REDUCTIONS["none"], impl, need, lo)
        return ((gx if need[0] else None), (gmu if need[1] else None), (gs if need[2] else None),
                None, None, None, None, None, None)


_INIT_BLOCK = 4096


def _init_rows(lo: int, hi: int, d: int, seed: int) -> Tensor:
    """Rows [lo, hi) of a (K, D) standard-normal matrix drawn block by block (block b of _INIT_BLOCK rows from
    a generator seeded with seed * 1_000_003 + b): no rank materializes the full matrix."""
    out = torch.empty(hi - lo, d)
    b = lo // _INIT_BLOCK
    while b * _INIT_BLOCK < hi:
        start = b * _INIT_BLOCK
        block = torch.randn(_INIT_BLOCK, d, generator=torch.Generator().manual_seed(seed * 1_000_003 + b))
        a0, a1 = max(lo, start), min(hi, start + _INIT_BLOCK)
        out[a0 - lo:a1 - lo] = block[a0 - start:a1 - start]
        b += 1
    return out


class ShardedLGMLoss(nn.Module):
    """The L-GM loss with the classes sharded over the ranks of ``group`` (module docstring).

    ``forward(local_features, local_labels)`` returns the loss of the global batch (reduction
    "mean" or "sum", the same on every rank).  Each rank holds ``means`` and ``log_var`` of
    ``class_range``; ``covariance="identity"`` keeps no log-variances.  The means are standard-normal,
    drawn in blocks of rows each with its own generator seeded from (``seed``, block), so a rank draws
    only its own rows and the shards form one initialisation whatever the world size;
    :meth:`load_full` copies given full parameters."""

    def __init__(self, num_classes: int, feat_dim: int, *, alpha: float = 1.0, lambda_: float = 0.1,
                 covariance: str = "diag", group=None, ddp: bool = False, reduction: str = "mean",
                 impl: str = "auto", seed: int = 0) -> None:
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(f"num_classes and feat_dim must be >= 1, got {num_classes}, {feat_dim}")
        if covariance not in ("diag", "identity"):
            raise ValueError(f"covariance must be 'diag' or 'identity', got {covariance!r}")
        if impl not in KERNEL_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, KERNEL_IMPLS))}, got {impl!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.rank, self.world_size = _world(group)
        self.group, self.ddp, self.reduction, self.impl = group, bool(ddp), reduction, impl
        self.num_classes, self.feat_dim, self.covariance = num_classes, feat_dim, covariance
        self.alpha, self.lambda_ = _nonneg("alpha", alpha), _nonneg("lambda_", lambda_)
        self.class_range = shard_range(num_classes, self.world_size, self.rank)
        lo, hi = self.class_range
        self.means = nn.Parameter(_init_rows(lo, hi, feat_dim, seed))
        self.log_var = nn.Parameter(torch.zeros(hi - lo, feat_dim)) if covariance == "diag" else None

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, class_range={self.class_range}, "
                f"world_size={self.world_size}, alpha={self.alpha}, lambda_={self.lambda_}, "
                f"covariance={self.covariance!r}")

    @torch.no_grad()
    def load_full(self, means: Tensor, log_var: Tensor | None = None) -> "ShardedLGMLoss":
        """Copy this rank's rows of full (K, D) parameters (e.g. from a single-device LGMLoss)."""
        lo, hi = self.class_range
        self.means.copy_(means[lo:hi])
        if self.log_var is not None and log_var is not None:
            self.log_var.copy_(log_var[lo:hi])
        return self

    def _check(self, features: Tensor, labels: Tensor | None) -> None:
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(f"features must be (N, {self.feat_dim}), got "
                             f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
        if labels is not None:
            from .functional import check_labels

            check_labels(labels, features.shape[0], self.num_classes)

    def _local_logits(self, feats: Tensor) -> Tensor:
        if self.means.shape[0] == 0:  # a rank without classes (K < W): empty logits, still in the graph
            touch = 0.0 * feats[:, :1] + 0.0 * self.means.sum()
            if self.log_var is not None:
                touch = touch + 0.0 * self.log_var.sum()
            return feats.new_zeros(feats.shape[0], 0) + touch
        return lgm_logits(feats, self.means.to(feats.dtype),
                          None if self.log_var is None else self.log_var.to(feats.dtype), impl=self.impl)

    def _gather(self, features: Tensor, labels: Tensor | None):
        feats = gather_rows(features, self.group, grad_scale=self.world_size if self.ddp else 1.0)
        labs = gather_rows(labels, self.group) if labels is not None else None
        return feats, labs

    def forward(self, local_features: Tensor, local_labels: Tensor) -> Tensor:
        self._check(local_features, local_labels)
        feats, labels = self._gather(local_features, local_labels)
        log_var = None if self.log_var is None else self.log_var.to(feats.dtype)
        per_row = _ShardedLoss.apply(feats, self.means.to(feats.dtype), log_var, labels.long(), self.class_range[0],
                                     self.alpha, self.lambda_, KERNEL_IMPLS[self.impl], self.group)
        return per_row.mean() if self.reduction == "mean" else per_row.sum()

    def logits(self, local_features: Tensor) -> Tensor:
        """This rank's margin-free logits of the *global* batch, (N, K_r) (columns ``class_range``)."""
        self._check(local_features, None)
        return self._local_logits(self._gather(local_features, None)[0])

    @torch.no_grad()
    def _global_max(self, local_features: Tensor) -> tuple[Tensor, Tensor]:
        """(log-likelihood, argmax class) over all K for each row of *this rank's* features: the fused
        ``lgm_log_likelihood`` on this shard, then a max and a min (ties: the lowest class) all-reduce
        (computed on the gathered batch, so that every rank reduces the same rows)."""
        n = torch.tensor([local_features.shape[0]], device=local_features.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n, group=self.group)
        start = int(sum(int(v) for v in sizes[: self.rank]))
        feats = gather_rows(local_features.detach(), self.group)
        lo, hi = self.class_range
        if hi > lo:
            m, idx = ops.lgm_log_likelihood(feats, self.means.detach().to(feats.dtype),
                                            None if self.log_var is None else self.log_var.detach().to(feats.dtype),
                                            KERNEL_IMPLS[self.impl])
            idx = idx + lo
        else:
            m = feats.new_full((feats.shape[0],), -math.inf, dtype=acc_dtype(feats.dtype))  # as the op's output
            idx = torch.full(m.shape, self.num_classes, dtype=torch.long, device=m.device)
        best = m.clone()
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=self.group)
        cand = torch.where(m == best, idx, torch.full_like(idx, self.num_classes))
        dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=self.group)  # ties: the lowest class, as argmax
        rows = slice(start, start + local_features.shape[0])
        return best[rows], cand[rows]

    def predict(self, local_features: Tensor) -> Tensor:
        """argmax over all K classes of this rank's rows (every rank must call it: it communicates)."""
        self._check(local_features, None)
        return self._global_max(local_features)[1]

    def log_likelihood(self, local_features: Tensor) -> Tensor:
        """Log-likelihood of this rank's rows under the predicted class's Gaussian (SPEC section 1):
        the largest margin-free logit over all ranks minus 0.5 D log(2 pi).  Not differentiable."""
        self._check(local_features, None)
        return self._global_max(local_features)[0]
