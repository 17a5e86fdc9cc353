"""Launching :func:`lgm_lab.train.train` in several processes (data-parallel): local spawn, or joining
the process group that ``torchrun`` describes."""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoints import CheckpointError, load_checkpoint
from .config import PROCESS_GROUP_TIMEOUT, TrainConfig
from .data import DatasetUnavailable
from .devices import resolve_device
from .run_folder import RunFolderBusy
from .train import TrainingDiverged, TrainResult, tensorboard_writer, train

__all__ = ["train_data_parallel", "init_from_torchrun", "DistributedTrainingError", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = PROCESS_GROUP_TIMEOUT  # seconds (lgm_lab.config: why)


class DistributedTrainingError(RuntimeError):
    """A process of a data-parallel run failed with an error of another kind (e.g. out of memory, a lost peer)."""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig, out_dir: str, kwargs: dict, err_dir: str,
                timeout: float) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cfg.device.startswith("cuda"):
        cfg = replace(cfg, device=f"cuda:{rank}")
        torch.cuda.set_device(rank)
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    try:
        train(cfg, out_dir, **kwargs)
        # tear down together: a rank that destroys the group while a peer still uses it (rank 0 writes and
        # evaluates last) can abort gloo ("terminate called without an active exception")
        dist.barrier()
    except Exception as err:  # one line for the parent, which raises it again in its own process
        Path(err_dir, f"rank{rank}.err").write_text(json.dumps([type(err).__name__, str(err)]))
        raise
    finally:
        dist.destroy_process_group()


def init_from_torchrun(device: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT; gloo on CPU, NCCL on GPU; collectives time out after ``timeout`` seconds).
    Returns False outside torchrun."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    if not dist.is_initialized():
        cuda = resolve_device(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    return True


def train_data_parallel(cfg: TrainConfig, out_dir: str | os.PathLike, nproc: int, *,
                        timeout: float = DEFAULT_TIMEOUT, **kwargs) -> TrainResult:
    """:func:`~lgm_lab.train.train` in ``nproc`` local processes (torch.multiprocessing spawn; gloo on
    CPU, NCCL with one GPU per process): ``cfg.batch_size`` is the global batch.  A rank waits at most
    ``timeout`` seconds for its peers in any collective (:data:`DEFAULT_TIMEOUT`).  Returns rank 0's
    result; an error in any rank is raised again here with its own type and message."""
    import tempfile

    import torch.multiprocessing as mp

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    if not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    cfg = replace(cfg, device=resolve_device(cfg.device))
    if cfg.device.startswith("cuda") and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} needs {nproc} GPUs; this machine has {torch.cuda.device_count()}")
    if cfg.batch_size % nproc:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of --nproc {nproc}")
    if nproc == 1:
        import torch.distributed as dist

        ours = not (dist.is_available() and dist.is_initialized())  # a caller's own group is left to the caller
        if not init_from_torchrun(cfg.device, timeout):
            return train(cfg, out_dir, **kwargs)
        if cfg.device.startswith("cuda"):
            cfg = replace(cfg, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        result = train(cfg, out_dir, **kwargs)
        if ours:  # the group torchrun described and we joined: leave it together (as _ddp_worker does)
            dist.barrier()
            dist.destroy_process_group()
        return result
    if kwargs.get("tensorboard") is not None:
        tensorboard_writer(kwargs["tensorboard"]).close()  # fail here, not in a worker
    with tempfile.TemporaryDirectory() as err_dir:
        try:
            mp.spawn(_ddp_worker, args=(nproc, _free_port(), cfg, str(out_dir), kwargs, err_dir, float(timeout)),
                     nprocs=nproc, join=True)
        except Exception as err:
            # the rank that failed first (the others then fail on the broken process group)
            errors = sorted(Path(err_dir).glob("rank*.err"), key=lambda f: f.stat().st_mtime_ns)
            if not errors:
                raise DistributedTrainingError(f"a training process failed: {err}".splitlines()[0]) from None
            name, msg = json.loads(errors[0].read_text())
            kinds = {c.__name__: c for c in (ValueError, TypeError, OSError, CheckpointError, TrainingDiverged,
                                             DatasetUnavailable, RunFolderBusy)}
            if name in kinds:
                raise kinds[name](msg) from None
            raise DistributedTrainingError(f"{errors[0].stem}: {name}: {msg}") from None
    ck = load_checkpoint(Path(out_dir) / "checkpoint.pt")
    return TrainResult(str(out_dir), int(ck["epoch"]), list(ck["metrics"]), str(Path(out_dir) / "checkpoint.pt"))
