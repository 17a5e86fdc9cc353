"""Data-parallel runs stop within their timeout when a rank stalls (issue 22, item 17)."""
import time

import pytest
import torch

from lgm_lab.config import config_from_preset
from lgm_lab.launch import DistributedTrainingError, train_data_parallel


class StallingDataset(torch.utils.data.Dataset):
    """Images for rank 0 at once; rank 1 stalls on its first image (a hung data pipeline or a dead peer)."""

    def __init__(self, n: int = 64, stall: float = 300.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
        self.stall = stall

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() == 1 and self.stall:
            time.sleep(self.stall)
            self.stall = 0.0
        return self.x[i], self.y[i]


def test_a_stalled_rank_stops_the_run_within_the_timeout(tmp_path):
    """Neither the data-parallel workers nor the process group passed a timeout: a stalled rank blocked its
    peers for torch's default 30 minutes.  `lgm train --timeout` (default 600 s) bounds every collective."""
    cfg = config_from_preset(None, head="softmax", feat_dim=2, epochs=1, batch_size=32, device="cpu")
    data = StallingDataset()
    t0 = time.perf_counter()
    with pytest.raises(DistributedTrainingError, match="(?i)timed out|timeout"):
        train_data_parallel(cfg, tmp_path / "run", 2, timeout=5, progress=False, datasets=(data, data))
    assert time.perf_counter() - t0 < 120


def test_the_timeout_is_checked():
    cfg = config_from_preset(None, head="softmax", feat_dim=2, epochs=1, device="cpu")
    for bad in (0, -1, float("inf"), "10"):
        with pytest.raises(ValueError, match="timeout"):
            train_data_parallel(cfg, "unused", 2, timeout=bad)
