"""L-GM past one device: a class-sharded head over ``torch.distributed`` (gloo on CPU, NCCL on GPU).
(Center losses stay identical across data-parallel ranks with ``CenterLoss(..., sync=True)``.)

**Class sharding** (the pattern of Megatron's vocab-parallel cross-entropy and Partial-FC): rank r
holds the means and log-variances of its contiguous class range ``[lo_r, hi_r)`` (:func:`shard_range`;
K need not divide by the world size).  One step:

1. the features and labels of every rank are gathered (the global batch, N rows);
2. each rank computes its shard's margin-free logits ``(N, K_r)`` with the fused operator
   :func:`lgm_ext.lgm_logits` -- the same kernels as the single-device loss;
3. the labelled-class terms come from the owning rank: with ``t = logit[n, y_n]`` (no margin),
   the margin logit is ``(1 + alpha) t + alpha * 0.5 * sum_j s[y_n, j]`` and the likelihood term
   ``L_lkd = -t`` (docs/SPEC.md section 1); they are summed across ranks (the other ranks add 0);
4. the log-sum-exp over all K classes is combined from per-rank (max, sum-exp) pairs by two
   all-reduces;
5. ``L = mean_n [lse_n - margin_logit_n + lambda_ * L_lkd_n]``, the same value on every rank.

Backward: each rank's means/log_var get their exact shard gradient; the gathered features' gradient
is summed over ranks (all-reduce) and each rank keeps its own rows, so ``local_features.grad`` is
the exact gradient of the global loss.  Under ``DistributedDataParallel`` (which averages gradients
over ranks) build the module with ``ddp=True``: the feature gradient is then scaled by the world
size, so the averaged backbone gradient is again the exact one.  Do not wrap the sharded
parameters in DDP: they differ per rank by design.

Memory per rank: ``2 K D / W`` parameter floats and ``N K / W`` logits, instead of ``2 K D`` and
``N K``.  Communication per step: all-gather of N x D features and N labels, four all-reduces of
N floats (max, sum-exp, two labelled terms), and in the backward one all-reduce of N x D.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

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


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks in the forward; identity backward (every rank computes the same loss from the sum,
    so the gradient of that loss with respect to this rank's addend is the incoming gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _DistLogSumExp(torch.autograd.Function):
    """Row-wise log-sum-exp over the classes of every rank from local (max, sum-exp) pairs; the
    backward is the local slice of the global softmax (no communication)."""

    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        if local.shape[1] > 0:
            m = local.max(1).values
        else:
            m = local.new_full((local.shape[0],), -math.inf)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = (local - m_safe[:, None]).exp().sum(1)
        dist.all_reduce(s, group=group)
        lse = m_safe + s.log()
        ctx.save_for_backward(local, lse)
        return lse

    @staticmethod
    def backward(ctx, grad: Tensor):
        local, lse = ctx.saved_tensors
        return grad[:, None] * (local - lse[:, None]).exp(), None


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
        logits = self._local_logits(feats)
        lo, hi = self.class_range
        own = (labels >= lo) & (labels < hi)
        col = (labels - lo).clamp(0, max(hi - lo - 1, 0))
        if hi > lo:
            t_all = logits.gather(1, col[:, None]).squeeze(1)
            half_logdet = (0.5 * self.log_var.to(feats.dtype).sum(1)).index_select(0, col) \
                if self.log_var is not None else torch.zeros_like(t_all)
        else:
            t_all = half_logdet = logits.new_zeros(logits.shape[0])
        zero = torch.zeros_like(t_all)
        t = torch.where(own, t_all, zero)
        mt = torch.where(own, (1.0 + self.alpha) * t_all + self.alpha * half_logdet, zero)
        if hi > lo:  # the labelled column gets its margin logit (rows this rank does not own: unchanged)
            logits = logits.scatter(1, col[:, None], torch.where(own, mt, t_all)[:, None])
        lse = _DistLogSumExp.apply(logits, self.group)
        t, mt = _AllReduceSum.apply(t, self.group), _AllReduceSum.apply(mt, self.group)
        per_row = lse - mt - self.lambda_ * t
        return per_row.mean() if self.reduction == "mean" else per_row.sum()

    def logits(self, local_features: Tensor) -> Tensor:
        """This rank's margin-free logits of the *global* batch, (N, K_r) (columns ``class_range``)."""
        self._check(local_features, None)
        return self._local_logits(self._gather(local_features, None)[0])

    @torch.no_grad()
    def _global_max(self, local_features: Tensor) -> tuple[Tensor, Tensor]:
        """(max logit, argmax class) over all K for each row of *this rank's* features (computed on the
        gathered batch, so that every rank reduces the same rows)."""
        n = torch.tensor([local_features.shape[0]], device=local_features.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n, group=self.group)
        start = int(sum(int(v) for v in sizes[: self.rank]))
        feats = gather_rows(local_features.detach(), self.group)
        logits = self._local_logits(feats)
        lo, _hi = self.class_range
        if logits.shape[1] > 0:
            m, idx = logits.max(1)
            idx = idx + lo
        else:
            m = feats.new_full((feats.shape[0],), -math.inf)
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
        the largest margin-free logit over all ranks minus 0.5 D log(2 pi)."""
        self._check(local_features, None)
        return self._global_max(local_features)[0] - 0.5 * self.feat_dim * math.log(2 * math.pi)
