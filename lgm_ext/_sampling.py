"""Class sampling for the sharded L-GM head (Partial FC; ``ShardedLGMLoss(sample_rate=r)``, docs/SPEC.md
section 7): every class of the rank's range that labels the global batch, plus a uniform sample of its other
classes, drawn without any temporary of the shard's size (O(sampled) memory: sorting, ``unique`` and
``searchsorted`` on the drawn indices only)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def sample_size(sample_rate: float, num_local: int, num_positive: int) -> int:
    """Rows a rank computes: ``max(ceil(r * K_r), positives)``, at most ``K_r`` (``r * K_r`` is rounded to 9
    decimals first, so that 0.3 * 10 counts as 3, not 4)."""
    return min(num_local, max(math.ceil(round(sample_rate * num_local, 9)), num_positive))


def skip_excluded(ranks: Tensor, excluded: Tensor) -> Tensor:
    """The ``ranks[i]``-th (0-based) integer >= 0 not in ``excluded`` (sorted, distinct), for every i.

    The j-th such integer x is j + #{e in excluded: e < x}, and e_i < x exactly when e_i - i (the count of
    non-excluded integers below e_i) is <= j; one ``searchsorted`` gives that count."""
    if excluded.numel() == 0:
        return ranks
    gaps = excluded - torch.arange(excluded.numel(), device=excluded.device)
    return ranks + torch.searchsorted(gaps, ranks, right=True)


def uniform_subset(total: int, count: int, generator: torch.Generator) -> Tensor:
    """A uniformly random ``count``-subset of ``range(total)``, sorted (int64, on ``generator``'s device).

    Drawn by rounds: candidates i.i.d. uniform, the new distinct ones kept (a uniformly chosen part of them
    when there are more than needed), until ``count`` are held.  Every step commutes with relabelling the
    integers, so the subset's law is invariant under permutations of ``range(total)`` and, its size being
    fixed, uniform over all ``count``-subsets.  Above half of ``total`` the complement is drawn instead;
    with ~10% more candidates than the expected need, one or two rounds suffice."""
    dev = generator.device
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=dev)
    if count >= total:
        return torch.arange(total, device=dev)
    if 2 * count > total:  # the output is > total / 2 long anyway: O(total) is O(count)
        left_out = uniform_subset(total, total - count, generator)
        return skip_excluded(torch.arange(count, device=dev), left_out)
    held = torch.empty(0, dtype=torch.long, device=dev)
    while held.numel() < count:
        need, free = count - held.numel(), total - held.numel()
        draws = int(need * total / free * 1.1) + 16
        cand = torch.unique(torch.randint(total, (draws,), generator=generator, device=dev))
        if held.numel():
            cand = cand[~torch.isin(cand, held)]
        if cand.numel() > need:
            cand = cand[torch.randperm(cand.numel(), generator=generator, device=dev)[:need]]
        held = torch.cat([held, cand])
    return held.sort().values


def sample_classes(positives: Tensor, num_local: int, num_sample: int, generator: torch.Generator) -> Tensor:
    """Sorted local row indices: every one of ``positives`` (sorted, distinct, in ``range(num_local)``) and
    a uniform sample of ``num_sample - len(positives)`` of the other rows (none when the positives fill it)."""
    extra = num_sample - positives.numel()
    if extra <= 0:
        return positives
    negatives = skip_excluded(uniform_subset(num_local - positives.numel(), extra, generator), positives)
    return torch.cat([positives, negatives]).sort().values


def remap_labels(labels: Tensor, lo: int, hi: int, index: Tensor) -> Tensor:
    """Global labels -> the sampled rows' index space: a label in ``[lo, hi)`` (always among the sampled rows)
    becomes its position in ``index``; any other becomes ``len(index)`` (not owned: with ``class_offset=0``
    the fused operator gives that row no labelled column)."""
    own = (labels >= lo) & (labels < hi)
    pos = torch.searchsorted(index, (labels - lo).clamp(0, max(hi - lo - 1, 0)))
    return torch.where(own, pos, torch.full_like(pos, index.numel()))
