"""Small tensor helpers shared by the experiments and the figures."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["stack_dataset", "batches", "features"]


def stack_dataset(dataset) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor([int(y) for y in ys])


def batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def features(model, x: Tensor, batch: int = 512) -> Tensor:
    return torch.cat([model(x[s]) for s in batches(len(x), batch)])
