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

Memory per rank: ``2 K D / W`` parameter floats (and as many for their gradients) and what the fused loss
holds for ``K_r = K / W`` classes: the forward's ``N x K_r`` logits (kept for the backward only when the
operator's rule says so, else recomputed one class tile at a time), instead of ``2 K D`` and ``N x K``.
Communication per step: an all-gather of a few integers per rank (row counts and the agreement check
below), all-gathers of N x D features and N labels, all-reduces of N and 3 N floats, and in the backward
one all-reduce of N x D.

**Class sampling** (Partial FC, ``sample_rate=r < 1``, training mode only): each step, each rank keeps
every class of its range that labels the global batch (the positives) plus a uniform sample of its other
classes, ``max(ceil(r K_r), positives)`` rows in all, drawn from a generator seeded per rank from
(``seed``, rank, step counter ``sample_step``; saved in the state dict, so a resumed run draws the same
samples).  The loss is the L-GM loss over the union of the sampled classes of all ranks (margin and
likelihood of the labelled class, which is always in): the same fused operator on the gathered rows
``means[idx]``, ``log_var[idx]`` with the labels remapped into the sampled rows.  The head's FLOPs and its
logits (``N x K_s``, ``K_s ~ r K_r``) fall as r; the sampled rows are copied (``2 K_s D`` floats, and as many
for their gradients), and the sampling itself makes no temporary of the shard's size (it works on the
drawn indices: ``lgm_ext._sampling``).  Gradients
reach the sampled rows only: ``means.grad`` and ``log_var.grad`` are dense and zero elsewhere (as
insightface's ``PartialFC_V2``), so a ``torch.optim`` optimizer keeps stepping every row -- with momentum
an unsampled row keeps moving along its momentum buffer (which decays by the momentum factor per step),
and weight decay shrinks every row each step.  Use ``weight_decay=0`` for the head (``param_groups(...,
head_weight_decay=0)``) to keep unsampled means and log-variances from drifting towards 0; ``sampled_rows``
(the local rows of the last training forward) lets a custom optimizer update only them.  In eval mode,
and for :meth:`ShardedLGMLoss.predict`, :meth:`~ShardedLGMLoss.log_likelihood` and
:meth:`~ShardedLGMLoss.logits`, every class counts.

**Agreement**: the first collective of every call exchanges, besides the row counts, each rank's
``num_classes``, ``feat_dim``, covariance, reduction, alpha, lambda_, ``log_var_bound``, ``sample_rate``,
``ddp``, the method called and the dtypes of features and labels, and whether its input passed the local
checks; on any difference every rank raises the same clear error (instead of a wrong loss, or an abort
inside the backend).

**Timeouts**: a rank that stalls (or dies) blocks its peers inside a collective until the process group's
timeout -- torch's default is 30 minutes (10 for NCCL in recent versions).  The head cannot change the
timeout of a group it did not create: pass ``timeout=datetime.timedelta(...)`` to
``torch.distributed.init_process_group`` (``examples/train_face_scale.py --timeout``).
"""
from __future__ import annotations

import math
import struct

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._ops import KERNEL_IMPLS, REDUCTIONS, acc_dtype, keep_logits_for_backward, ops, require_kernels
from ._sampling import remap_labels, sample_classes, sample_size
from .functional import _nonneg, check_labels, lgm_logits
from .modules import _log_var_bound, clamp_log_var

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
    def forward(ctx, x: Tensor, group, scale: float, sizes: list[int] | None) -> Tensor:
        rank, world = _world(group)
        if sizes is None:
            sizes = _row_counts(x.shape[0], x.device, group, world)
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
        return grad[start:start + ctx.sizes[ctx.rank]] * ctx.scale, None, None, None


def _row_counts(n: int, device, group, world: int) -> list[int]:
    t = torch.tensor([n], device=device)
    parts = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return [int(p) for p in parts]


def gather_rows(x: Tensor, group=None, *, grad_scale: float = 1.0, sizes: list[int] | None = None) -> Tensor:
    """Rows of ``x`` from every rank, concatenated in rank order (differentiable for floating-point
    ``x``: the gradient flowing back to each rank is the sum over ranks of the gradient of its rows,
    times ``grad_scale``).  ``sizes``: every rank's row count, when already known (else one all-gather)."""
    if x.is_floating_point():
        return _GatherRows.apply(x, group, float(grad_scale), sizes)
    with torch.no_grad():
        return _GatherRows.apply(x, group, 1.0, sizes)


# ------------------------------------------------------------------ the ranks' agreement (issue 22, item 10)
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8)
_CALLS = ("forward", "logits", "predict", "log_likelihood")
# the fields every rank must agree on, in the order of the exchanged vector (then: input rejected, row count)
_FIELDS = ("method called", "num_classes", "feat_dim", "covariance", "reduction", "alpha", "lambda_",
           "log_var_bound", "sample_rate", "sampling (training mode with sample_rate < 1)", "ddp",
           "features dtype", "labels dtype")
_FLOAT_FIELDS = {"alpha", "lambda_", "log_var_bound", "sample_rate"}


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _show(name: str, v: int):
    if name in _FLOAT_FIELDS:
        return struct.unpack("<d", struct.pack("<q", v))[0]
    if name.endswith("dtype"):
        return "none" if v < 0 else str(_DTYPES[v]) if v < len(_DTYPES) else "another dtype"
    return {"method called": lambda: _CALLS[v], "covariance": lambda: ("diag", "identity")[v],
            "reduction": lambda: ("mean", "sum")[v]}.get(name, lambda: v)()


def _dtype_code(t) -> int:
    if not isinstance(t, Tensor):
        return -1
    return _DTYPES.index(t.dtype) if t.dtype in _DTYPES else len(_DTYPES)


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
    ``class_range``; ``covariance="identity"`` keeps no log-variances.  ``log_var`` is clamped to
    ``[-log_var_bound, log_var_bound]`` wherever it is used, exactly as :class:`lgm_ext.LGMLoss` does
    (:meth:`clamped_log_var`).  The means are standard-normal, drawn in blocks of rows each with its own
    generator seeded from (``seed``, block), so a rank draws only its own rows and the shards form one
    initialisation whatever the world size; :meth:`load_full` copies given full parameters.
    ``sample_rate=r < 1``: class sampling in training mode (module docstring); ``r = 1`` is the exact loss."""

    def __init__(self, num_classes: int, feat_dim: int, *, alpha: float = 1.0, lambda_: float = 0.1,
                 covariance: str = "diag", group=None, ddp: bool = False, reduction: str = "mean",
                 impl: str = "auto", seed: int = 0, log_var_bound: float = 6.0, sample_rate: float = 1.0) -> None:
        super().__init__()
        require_kernels("ShardedLGMLoss (the class-sharded head)")
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(f"num_classes and feat_dim must be >= 1, got {num_classes}, {feat_dim}")
        if covariance not in ("diag", "identity"):
            raise ValueError(f"covariance must be 'diag' or 'identity', got {covariance!r}")
        if impl not in KERNEL_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, KERNEL_IMPLS))}, got {impl!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
        self.rank, self.world_size = _world(group)
        self.group, self.ddp, self.reduction, self.impl = group, bool(ddp), reduction, impl
        self.num_classes, self.feat_dim, self.covariance = num_classes, feat_dim, covariance
        self.alpha, self.lambda_ = _nonneg("alpha", alpha), _nonneg("lambda_", lambda_)
        self.log_var_bound, self.sample_rate, self.seed = _log_var_bound(log_var_bound), float(sample_rate), int(seed)
        self.class_range = shard_range(num_classes, self.world_size, self.rank)
        lo, hi = self.class_range
        self.means = nn.Parameter(_init_rows(lo, hi, feat_dim, seed))
        self.log_var = nn.Parameter(torch.zeros(hi - lo, feat_dim)) if covariance == "diag" else None
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.long))  # sampled training steps so far
        self.sampled_rows: Tensor | None = None  # local rows of the last sampled forward (None: all rows)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, class_range={self.class_range}, "
                f"world_size={self.world_size}, alpha={self.alpha}, lambda_={self.lambda_}, "
                f"covariance={self.covariance!r}, sample_rate={self.sample_rate}")

    @torch.no_grad()
    def load_full(self, means, log_var: Tensor | None = None) -> "ShardedLGMLoss":
        """Copy this rank's rows of full (K, D) parameters, given as tensors or as a single-device
        :class:`lgm_ext.LGMLoss` (whose ``log_var_bound`` must equal this head's: one rule for both)."""
        if isinstance(means, nn.Module):
            src = means
            bound = getattr(src, "log_var_bound", self.log_var_bound)
            if bound != self.log_var_bound:
                raise ValueError(f"the source head clamps log_var to +-{bound}, this one to +-{self.log_var_bound}: "
                                 "build the sharded head with the same log_var_bound")
            means, log_var = src.means, getattr(src, "log_var", None)
        if tuple(means.shape) != (self.num_classes, self.feat_dim):
            raise ValueError(f"means must be ({self.num_classes}, {self.feat_dim}), got {tuple(means.shape)}")
        lo, hi = self.class_range
        self.means.copy_(means[lo:hi])
        if self.log_var is not None and log_var is not None:
            self.log_var.copy_(log_var[lo:hi])
        return self

    def clamped_log_var(self) -> Tensor | None:
        """This shard's ``log_var`` clamped to ``[-log_var_bound, log_var_bound]`` (what every use of it sees;
        the rule of :meth:`lgm_ext.LGMLoss.clamped_log_var`)."""
        return clamp_log_var(self.log_var, self.log_var_bound)

    def _bounded_log_var(self, dtype) -> Tensor | None:
        """:meth:`clamped_log_var` in ``dtype``, without a (K_r, D) copy when no entry lies beyond the bound
        (then the clamp is the identity, in value and gradient)."""
        lv = self.log_var
        if lv is None:
            return None
        if lv.numel():
            with torch.no_grad():
                low, high = torch.aminmax(lv)
            if bool(low < -self.log_var_bound) or bool(high > self.log_var_bound):
                lv = self.clamped_log_var()
        return lv.to(dtype)

    def _check(self, features: Tensor, labels: Tensor | None) -> None:
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(f"features must be (N, {self.feat_dim}), got "
                             f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
        if labels is not None:
            check_labels(labels, features.shape[0], self.num_classes)

    def _agree(self, call: str, features, labels) -> list[int]:
        """One all-gather of a few integers per rank: the fields of ``_FIELDS``, whether this rank's input
        passed :meth:`_check`, and its row count (returned for every rank).  Raises on every rank when the
        ranks disagree or any rank's input was rejected (that rank raises its own error)."""
        err = None
        try:
            self._check(features, labels)
        except (TypeError, ValueError) as e:
            err = e
        sampling = self.training and self.sample_rate < 1.0 and call == "forward"
        mine = [_CALLS.index(call), self.num_classes, self.feat_dim, ("diag", "identity").index(self.covariance),
                ("mean", "sum").index(self.reduction), _bits(self.alpha), _bits(self.lambda_),
                _bits(self.log_var_bound), _bits(self.sample_rate), int(sampling), int(self.ddp),
                _dtype_code(features), _dtype_code(labels) if call == "forward" else -1,
                int(err is not None), features.shape[0] if err is None else -1]
        t = torch.tensor(mine, dtype=torch.long, device=self.means.device)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self.group)
        table = torch.stack(parts).tolist()
        for j, name in enumerate(_FIELDS):
            column = [row[j] for row in table]
            if len(set(column)) > 1:
                values = ", ".join(f"rank {r}: {_show(name, v)}" for r, v in enumerate(column))
                kind = TypeError if name.endswith("dtype") else ValueError
                raise kind(f"ShardedLGMLoss.{call}: the ranks disagree on {name} ({values}); build the head with "
                           "the same arguments on every rank and call it on every rank with the same dtypes")
        rejected = [r for r, row in enumerate(table) if row[-2]]
        if err is not None:
            raise err
        if rejected:
            raise ValueError(f"ShardedLGMLoss.{call}: the input of rank(s) {rejected} was rejected (see the error "
                             "on that rank); every rank stops here")
        return [row[-1] for row in table]

    def _gather(self, features: Tensor, labels: Tensor | None, sizes: list[int]):
        feats = gather_rows(features, self.group, grad_scale=self.world_size if self.ddp else 1.0, sizes=sizes)
        labs = gather_rows(labels, self.group, sizes=sizes) if labels is not None else None
        return feats, labs

    def _sampled_shard(self, labels: Tensor, dtype):
        """(means, log_var, labels, class_offset) of this step's sampled rows (module docstring)."""
        lo, hi = self.class_range
        own = labels[(labels >= lo) & (labels < hi)]
        positives = torch.unique(own - lo)  # sorted
        gen = torch.Generator(device=labels.device)
        gen.manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_033 + int(self.sample_step)) % (2 ** 63))
        idx = sample_classes(positives, hi - lo, sample_size(self.sample_rate, hi - lo, positives.numel()), gen)
        self.sample_step.add_(1)
        self.sampled_rows = idx
        lv = None if self.log_var is None else clamp_log_var(self.log_var.index_select(0, idx), self.log_var_bound)
        return (self.means.index_select(0, idx).to(dtype), None if lv is None else lv.to(dtype),
                remap_labels(labels, lo, hi, idx), 0)

    def forward(self, local_features: Tensor, local_labels: Tensor) -> Tensor:
        sizes = self._agree("forward", local_features, local_labels)
        feats, labels = self._gather(local_features, local_labels, sizes)
        labels = labels.long()
        lo, hi = self.class_range
        if self.training and self.sample_rate < 1.0 and hi > lo:
            means, log_var, labels, offset = self._sampled_shard(labels, feats.dtype)
        else:
            self.sampled_rows = None
            means, log_var, offset = self.means.to(feats.dtype), self._bounded_log_var(feats.dtype), lo
        per_row = _ShardedLoss.apply(feats, means, log_var, labels, offset, self.alpha, self.lambda_,
                                     KERNEL_IMPLS[self.impl], self.group)
        return per_row.mean() if self.reduction == "mean" else per_row.sum()

    def logits(self, local_features: Tensor) -> Tensor:
        """This rank's margin-free logits of the *global* batch, (N, K_r) (columns ``class_range``; all of
        them, also with sampling)."""
        sizes = self._agree("logits", local_features, None)
        feats = self._gather(local_features, None, sizes)[0]
        if self.means.shape[0] == 0:  # a rank without classes (K < W): empty logits, still in the graph
            touch = 0.0 * feats[:, :1] + 0.0 * self.means.sum()
            if self.log_var is not None:
                touch = touch + 0.0 * self.log_var.sum()
            return feats.new_zeros(feats.shape[0], 0) + touch
        return lgm_logits(feats, self.means.to(feats.dtype), self._bounded_log_var(feats.dtype), impl=self.impl)

    @torch.no_grad()
    def _global_max(self, call: str, local_features: Tensor) -> tuple[Tensor, Tensor]:
        """(log-likelihood, argmax class) over all K for each row of *this rank's* features: the fused
        ``lgm_log_likelihood`` on this shard, then a max and a min (ties: the lowest class) all-reduce
        (computed on the gathered batch, so that every rank reduces the same rows)."""
        sizes = self._agree(call, local_features, None)
        start = sum(sizes[: self.rank])
        feats = gather_rows(local_features.detach(), self.group, sizes=sizes)
        lo, hi = self.class_range
        if hi > lo:
            m, idx = ops.lgm_log_likelihood(feats, self.means.detach().to(feats.dtype),
                                            self._bounded_log_var(feats.dtype), KERNEL_IMPLS[self.impl])
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
        return self._global_max("predict", local_features)[1]

    def log_likelihood(self, local_features: Tensor) -> Tensor:
        """Log-likelihood of this rank's rows under the predicted class's Gaussian (SPEC section 1):
        the largest margin-free logit over all ranks minus 0.5 D log(2 pi).  Not differentiable."""
        return self._global_max("log_likelihood", local_features)[0]
