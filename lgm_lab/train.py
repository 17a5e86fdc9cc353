"""The training loop of a feature model + head (softmax, center, L-GM).

``train(config, out_dir)`` writes, after every epoch and atomically (temp file
+ rename): ``checkpoint.pt`` (model, head, optimizer, scheduler, RNG state,
metrics; loadable with ``weights_only=True``; :mod:`lgm_lab.checkpoints`) and
``metrics.json`` / ``metrics.csv``.  ``train(..., resume=True)`` continues a run
killed at any moment from its last completed epoch and reproduces the
uninterrupted run: the data order of epoch e depends only on (seed, e), and the
RNG state is restored.  A non-finite loss stops training with
:class:`TrainingDiverged`, leaving the last good checkpoint untouched.  Several
processes: :mod:`lgm_lab.launch`.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lgm_ext import Classifier

from .checkpoints import CheckpointError, check_resumable, load_checkpoint, run_config_file, save_checkpoint
from .config import TrainConfig
from .data import fingerprint, load_dataset
from .devices import resolve_device
from .evaluation import evaluate
from .heads import HEADS
from .ood_data import restrict_classes
from .recipe import build_model_and_head, make_optimizer, make_scheduler, total_steps, warmup_steps
from .run_folder import (
    LOCK_NAME,
    is_own_temporary,
    locked,
    make_folder,
    remove_if_empty,
    remove_stale_temporaries,
    save_json,
    write_atomically,
)
from .signing import signing_key
from .trace import TRACE_EVERY, TRACE_FIELDS, log_var_stats, trace_point

__all__ = ["train", "finished_run", "TrainResult", "TrainingDiverged", "METRIC_FIELDS", "epoch_batches",
           "tensorboard_writer", "log_var_stats", "TRACE_EVERY", "TRACE_FIELDS", "trace_point"]


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite."""


@dataclass
class TrainResult:
    out_dir: str
    epochs_done: int
    metrics: list = field(default_factory=list)
    checkpoint: str = ""


# The files a run writes into its folder (an overwrite removes them; a kill may leave their temporaries).
RUN_FILES = ("checkpoint.pt", "metrics.json", "metrics.csv", "config.json", "trace.csv")

# The columns of metrics.csv (and the scalars sent to TensorBoard), in order.
METRIC_FIELDS = ("epoch", "steps", "train_loss", "train_accuracy", "test_error_percent", "lr",
                 "train_images_per_second", "test_log_likelihood_mean", "clipped_steps", "grad_norm_max",
                 "log_var_mean", "log_var_min")


def _finite_weights(*modules: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for m in modules
               for t in (*m.parameters(), *m.buffers()) if t.is_floating_point())


def epoch_batches(ds: Dataset, cfg: TrainConfig, epoch: int, rank: int = 0, world: int = 1):
    """Epoch ``epoch``'s shuffled batches as (images, labels, global batch size); the order depends only
    on (seed, epoch).  With ``world`` ranks, step i's global batch is the single-process batch i and this
    rank takes every ``world``-th image of it, so the ranks together see exactly what one process sees.
    A final global batch with fewer images than ranks is dropped (data-parallel only)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    # one draw discarded first, as torch's DataLoader(shuffle=True, generator=g) does for its worker seed:
    # the order is the one lgm-ext 0.2 trained with (runs trained before stay reproducible)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    perm = torch.randperm(len(ds), generator=g).tolist()
    steps = [perm[i:i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]
    if world > 1:
        steps = [b for b in steps if len(b) >= world]
    # its own generator: DataLoader draws a worker seed from it, never from the global RNG (augmentations use that)
    loader = DataLoader(ds, batch_sampler=[b[rank::world] for b in steps], generator=torch.Generator().manual_seed(0))
    for (images, labels), b in zip(loader, steps):
        yield images, labels, len(b)


# ----------------------------------------------------------------------------- process group helpers
def _dist() -> tuple[int, int]:
    """(rank, world size) of the initialized torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_sum(values: list[float], world: int, device: str) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- run state and outputs
def _rng_state(device: str) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.startswith("cuda") and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_csv(path: Path, history: list[dict], columns=METRIC_FIELDS) -> None:
    """metrics.json as a table (one row per epoch), for spreadsheets and plotting scripts (or the trace, one row
    per trace point)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    write_atomically(path, lambda f: f.write(buf.getvalue().encode()))


def _save_metrics(out: Path, history: list[dict], trace: list[dict] | None = None) -> None:
    save_json(out / "metrics.json", history)
    _save_csv(out / "metrics.csv", history)
    if trace:
        _save_csv(out / "trace.csv", trace, TRACE_FIELDS)


def tensorboard_writer(log_dir):
    """A TensorBoard ``SummaryWriter`` into ``log_dir`` (None: no logging); a clear error without the package."""
    if log_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from err
    return SummaryWriter(log_dir=str(log_dir))


def _progress(enabled: bool):
    from .progress import progress

    return progress(enabled)  # a bar on a terminal, a plain line every 30 s in a log


def _make_folder(out: Path) -> list[Path]:
    try:
        created = make_folder(out)
    except (OSError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) else err
        raise ValueError(f"cannot create the run folder {out}: {why}") from err
    if not out.is_dir():
        remove_if_empty(created)
        raise ValueError(f"the run folder {out} is a file; --out is always a folder")
    if not os.access(out, os.W_OK | os.X_OK):
        remove_if_empty(created)
        raise ValueError(f"the run folder {out} is not writable")
    return created


def _foreign_files(out: Path) -> list[str]:
    """What in ``out`` a run did not write: anything but the lock and this project's temporaries."""
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and not is_own_temporary(p))


def _is_run_config(path: Path) -> bool:
    try:
        run_config_file(path)
    except CheckpointError:
        return False
    return path.is_file()


def _check_folder(out: Path, cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    """Refuse a folder that holds a run unless resuming or overwriting, a folder that holds files a run did not
    write unless overwriting (its run files would be replaced), and a resume with nothing to resume."""
    ck_path = out / "checkpoint.pt"
    if resume:
        if not ck_path.exists():
            if not (out / "config.json").is_file():
                raise CheckpointError(f"nothing to resume in {out}: no checkpoint.pt or config.json there; run "
                                      "without --resume to start a new run")
            # killed before its first checkpoint: the config it started with must be a run's and this one
            check_resumable(asdict(run_config_file(out / "config.json")), cfg, 0, out / "config.json")
        return ck_path
    if overwrite:
        return ck_path
    if ck_path.exists():
        raise CheckpointError(f"{out} already holds a run ({ck_path}); pass --resume to continue it or "
                              "--overwrite to replace it")
    foreign = _foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        if _is_run_config(out / "config.json"):
            raise CheckpointError(f"{out} holds a run that has no checkpoint yet ({shown}); pass --resume to "
                                  "continue it or --overwrite to replace it")
        raise CheckpointError(f"{out} holds files a run did not write ({shown}); give a new or empty --out, or "
                              f"--overwrite to write the run there (its {', '.join(RUN_FILES)} would be replaced; "
                              "nothing else is touched)")
    return ck_path


def _clear_folder(out: Path, ck_path: Path, resume: bool) -> None:
    """Rank 0, holding the folder's lock, before training: drop the replaced run's files (overwrite) and the
    temporaries a killed run left; nothing else in the folder is touched."""
    if not resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    remove_stale_temporaries(out, RUN_FILES, legacy=resume and ck_path.exists())


def _load_datasets(cfg: TrainConfig, main: bool, world: int) -> tuple[Dataset, Dataset]:
    train_ds = test_ds = None
    for turn in ((0,) if world == 1 else (0, 1)):  # rank 0 stages the files first, then the others read
        if (turn == 0) == main:
            train_ds = load_dataset(cfg.dataset, True, data_dir=cfg.data_dir, subset=cfg.subset,
                                    augment=cfg.augment, seed=cfg.seed)
            test_ds = load_dataset(cfg.dataset, False, data_dir=cfg.data_dir, subset=cfg.test_subset,
                                   seed=cfg.seed)
        _barrier(world)
    # a run on some classes (cfg.classes) sees only those, renumbered 0..k-1
    return restrict_classes(train_ds, cfg.class_list), restrict_classes(test_ds, cfg.class_list)


def _steps_per_epoch(n_train: int, cfg: TrainConfig, world: int) -> int:
    steps = math.ceil(n_train / cfg.batch_size)
    if world > 1 and 0 < n_train % cfg.batch_size < world:
        steps -= 1  # the final batch, smaller than the number of ranks, is dropped (epoch_batches)
    return steps


def _data_parallel(net: nn.Module) -> nn.Module:
    # the head's buffers (center-loss centers, the L-GM step counter) stay equal by their own synced or
    # identical updates; BatchNorm statistics by SyncBatchNorm; spectral normalisation's u, v (--spectral-norm) by
    # every rank drawing them from the same seed and running the same power iteration on the same weights; nothing
    # needs a broadcast
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    with warnings.catch_warnings():  # torch suggests keeping broadcast_buffers=False for rank-local syncs
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(net, broadcast_buffers=False)


def _check_same_data(ck: dict, cfg: TrainConfig, data_sig: dict, ck_path: Path) -> None:
    """Refuse to continue (or reuse) a checkpoint on data other than its own.  The same data is decided by
    content (the fingerprint the checkpoint carries), not by the spelling of the path."""
    if "data" not in ck:  # runs from before lgm-ext 0.3 carry no fingerprint: the folder must be the same
        if ck["config"].get("data_dir") != cfg.data_dir:
            raise CheckpointError(f"{ck_path} was trained on the data in {ck['config'].get('data_dir')}, not "
                                  f"{cfg.data_dir}, and carries no fingerprint of its data to compare")
        return
    if ck["data"] != data_sig:
        which = " and ".join(k for k in ("train", "test") if ck["data"].get(k) != data_sig[k])
        raise CheckpointError(f"cannot resume {ck_path}: its {which} data differ from the data it was trained "
                              f"on (the files under {cfg.data_dir or 'the dataset folder'} changed?); train "
                              "anew with --overwrite")


def finished_run(cfg: TrainConfig, out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a finished run of ``cfg`` (True) or an unfinished one that ``train(cfg,
    out_dir, resume=True)`` continues (False).  Its checkpoint must have ``cfg``'s configuration (up to
    :data:`~lgm_lab.checkpoints.RESUMABLE_CHANGES`) and have trained on the same data by content (its
    fingerprint): anything else raises :class:`CheckpointError` naming the difference.  Only reads: call it
    under a shared lock (``locked(out_dir, shared=True)``) so that readers do not exclude each other."""
    out = Path(out_dir)
    cfg = replace(cfg, device=resolve_device(cfg.device))
    ck_path = out / "checkpoint.pt"
    ck = load_checkpoint(ck_path)
    check_resumable(ck["config"], cfg, int(ck["epoch"]), ck_path)
    train_ds, test_ds = _load_datasets(cfg, True, 1)
    _check_same_data(ck, cfg, {"train": fingerprint(train_ds), "test": fingerprint(test_ds)}, ck_path)
    history = list(ck["metrics"])
    if cfg.steps is not None:
        return bool(history) and int(history[-1].get("steps", 0)) >= cfg.steps
    return int(ck["epoch"]) >= cfg.epochs


# ----------------------------------------------------------------------------- training
def train(cfg: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, stop_after: int | None = None,
          datasets: tuple[Dataset, Dataset] | None = None, tensorboard: str | os.PathLike | None = None) -> TrainResult:
    """Train ``cfg`` into ``out_dir``.  A folder that already holds a checkpoint is refused unless
    ``resume`` (continue it; only :data:`~lgm_lab.checkpoints.RESUMABLE_CHANGES` may differ) or
    ``overwrite`` (replace it).  ``cfg.device == "auto"`` trains on the GPU when there is one (the config
    saved says which).  Called in every process of an initialized ``torch.distributed`` group
    (:func:`lgm_lab.launch.train_data_parallel`, ``lgm train --nproc N`` or torchrun), it trains
    data-parallel: ``cfg.batch_size`` is the global batch, split over the ranks
    (DistributedDataParallel; gradients equal the single-process ones up to float rounding; BatchNorm
    models need GPUs, for SyncBatchNorm), rank 0 alone writes the checkpoint, the metrics and the logs
    and evaluates.  Launch it with spawn or torchrun, which stop every rank when one fails.
    Every epoch appends to ``metrics.json`` and ``metrics.csv``; ``tensorboard=DIR`` also logs the
    same scalars there (needs the tensorboard package).  ``stop_after=k`` returns after k epochs of
    this call (as if killed there); ``datasets`` overrides (train, test)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    signing_key()  # a signing key that cannot be used is refused before any work, not at the first checkpoint
    cfg = replace(cfg, device=resolve_device(cfg.device))
    rank, world = _dist()
    main = rank == 0
    if world > 1 and cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the number of processes ({world})")
    out = Path(out_dir)
    created = _make_folder(out)
    try:
        # one writer per run folder: rank 0 holds the lock for the whole run (a second `lgm train` on the
        # same --out is refused at once, naming this one)
        with locked(out) if main else contextlib.nullcontext():
            return _train(cfg, out, rank, world, resume=resume, overwrite=overwrite, progress=progress,
                          stop_after=stop_after, datasets=datasets, tensorboard=tensorboard)
    except BaseException:
        if main:  # a refused run leaves nothing behind: the folders it created, while still empty, go again
            remove_if_empty(created)
        raise


def _train(cfg: TrainConfig, out: Path, rank: int, world: int, *, resume: bool, overwrite: bool, progress: bool,
           stop_after: int | None, datasets, tensorboard) -> TrainResult:
    main = rank == 0
    ck_path = _check_folder(out, cfg, resume, overwrite)
    writer = tensorboard_writer(tensorboard) if main else None  # fails before anything is removed
    _barrier(world)  # every rank has checked before rank 0 removes anything
    if main:
        _clear_folder(out, ck_path, resume)
    train_ds, test_ds = datasets if datasets is not None else _load_datasets(cfg, main, world)
    data_sig = {"train": fingerprint(train_ds), "test": fingerprint(test_ds)}

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    steps_per_epoch = _steps_per_epoch(len(train_ds), cfg, world)
    n_steps = total_steps(cfg, steps_per_epoch)
    n_epochs = math.ceil(n_steps / steps_per_epoch)
    ramp = warmup_steps(cfg, steps_per_epoch)
    if cfg.steps is not None and "alpha" in HEADS[cfg.head].config_keys and ramp > n_steps:
        raise ValueError(f"the {cfg.head} head's warm-up ({ramp} steps: --warmup-epochs {cfg.warmup_epochs} of "
                         f"{steps_per_epoch}) is longer than --steps {n_steps}: it would never finish; set "
                         "--warmup-steps (e.g. a quarter of --steps)")
    model, head = build_model_and_head(cfg, steps_per_epoch)
    if world > 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if not cfg.device.startswith("cuda"):
            raise ValueError(f"data-parallel training of {cfg.model} (BatchNorm) needs GPUs: SyncBatchNorm, which "
                             "keeps the statistics of the global batch, runs on CUDA only; use one process on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = make_optimizer(cfg, model, head)
    sched = make_scheduler(cfg, opt, steps_per_epoch)
    history: list[dict] = []
    trace: list[dict] = []
    start_epoch = steps_done = 0
    if resume and ck_path.exists():
        ck = load_checkpoint(ck_path)
        check_resumable(ck["config"], cfg, int(ck["epoch"]), ck_path)
        _check_same_data(ck, cfg, data_sig, ck_path)
        model.load_state_dict(ck["model"])
        head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        history, start_epoch = list(ck["metrics"]), int(ck["epoch"])
        trace = list(ck.get("trace", []))  # a checkpoint written before the trace has none
        steps_done = int(history[-1].get("steps", start_epoch * steps_per_epoch)) if history else 0
        if main:
            _save_metrics(out, history, trace)  # a kill between the checkpoint and the metrics write
    if main:
        save_json(out / "config.json", asdict(cfg))
    params = [p for p in (*model.parameters(), *head.parameters()) if p.requires_grad]
    net = Classifier(model, head)  # images, labels -> (loss, logits): what DDP wraps
    if world > 1:
        net = _data_parallel(net)

    bar = _progress(progress and main)
    done_here = 0
    head_input: list = [None]  # the features of the last training forward, for the trace (a reference, no copy)
    hook = head.register_forward_pre_hook(lambda _m, args: head_input.__setitem__(0, args[0])) if main else None

    def diverged(what: str, hint: str) -> TrainingDiverged:
        last = f"{ck_path} (epoch {start_epoch + done_here})" if ck_path.exists() else "none yet"
        return TrainingDiverged(f"{what} (lr {opt.param_groups[0]['lr']:.3g}); training stopped. "
                                f"Last good checkpoint: {last}. {hint}")

    with bar:
        task = bar.add_task("train", total=n_steps - min(n_steps, start_epoch * steps_per_epoch),
                            images_per_step=cfg.batch_size)
        for epoch in range(start_epoch, n_epochs):
            epoch_steps = min(steps_per_epoch, n_steps - epoch * steps_per_epoch)  # the last may be cut short
            model.train(), head.train()
            seen, correct, loss_sum, t0 = 0, 0, 0.0, time.perf_counter()
            clipped, norm_max = 0, 0.0
            batches = itertools.islice(epoch_batches(train_ds, cfg, epoch, rank, world), epoch_steps)
            for i, (images, labels, n_step) in enumerate(batches):
                images, labels = images.to(cfg.device), labels.to(cfg.device)
                extra = head.prepare(model, images, labels)  # e.g. inverse adversaries (eval mode, no grad)
                loss, logits = net(images, labels, **extra)
                finite = bool(torch.isfinite(loss))
                if world > 1:  # every rank stops together
                    finite = _all_sum([float(not finite)], world, cfg.device)[0] == 0
                if not finite:
                    raise diverged(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {i + 1}",
                                   "Try a lower --lr, a longer --warmup-epochs for L-GM, or a smaller --alpha.")
                opt.zero_grad(set_to_none=True)
                # DDP averages gradients over ranks: weight this rank's mean by its share of the global
                # batch so that the average is the gradient of the global batch's mean loss
                (loss * (labels.shape[0] * world / n_step) if world > 1 else loss).backward()
                if cfg.grad_clip > 0:  # after DDP's averaging: every rank clips the same gradient
                    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                    if not math.isfinite(norm):
                        raise diverged(f"non-finite gradient at epoch {epoch + 1}, step {i + 1}",
                                       "Try a lower --lr or a longer --warmup-epochs for L-GM.")
                    clipped += norm > cfg.grad_clip
                    norm_max = max(norm_max, norm)
                opt.step()
                sched.step()
                steps_done += 1
                if main and (steps_done % TRACE_EVERY == 0 or steps_done == 1) and head_input[0] is not None:
                    trace.append({"steps": steps_done, **trace_point(head, head_input[0], labels)})
                n = labels.shape[0]
                seen += n
                loss_sum += loss.item() * n
                correct += (logits.argmax(1) == labels).sum().item()
                bar.update(task, advance=1, description=(
                    f"epoch {epoch + 1}/{n_epochs} loss {loss_sum / seen:.4f} acc {100 * correct / seen:.1f}%"))
            train_time = time.perf_counter() - t0
            seen, correct, loss_sum = _all_sum([seen, correct, loss_sum], world, cfg.device)
            if not _finite_weights(model, head):
                raise diverged(f"non-finite weights after epoch {epoch + 1}", "Try a lower --lr.")
            if main:  # rank 0 evaluates and writes; the others wait for it
                ev = evaluate(model, head, test_ds, device=cfg.device)
                history.append({
                    "epoch": epoch + 1, "steps": steps_done, "train_loss": loss_sum / seen,
                    "train_accuracy": 100.0 * correct / seen,
                    "test_error_percent": ev["error_percent"], "lr": opt.param_groups[0]["lr"],
                    "train_images_per_second": seen / train_time,
                    **({"clipped_steps": clipped, "grad_norm_max": norm_max} if cfg.grad_clip > 0 else {}),
                    **({"test_log_likelihood_mean": ev["log_likelihood"]["mean"]} if "log_likelihood" in ev else {}),
                    **log_var_stats(head),
                })
                save_checkpoint(ck_path, {
                    "config": asdict(cfg), "epoch": epoch + 1, "model": model.state_dict(),
                    "head": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "rng": _rng_state(cfg.device), "metrics": history, "data": data_sig, "trace": trace,
                })
                _save_metrics(out, history, trace)
                if writer is not None:
                    for k in METRIC_FIELDS[1:]:
                        if k in history[-1]:
                            writer.add_scalar(k, history[-1][k], epoch + 1)
                    writer.flush()
            _barrier(world)
            done_here += 1
            if stop_after is not None and done_here >= stop_after:
                break
    if hook is not None:
        hook.remove()
    if writer is not None:
        writer.close()
    return TrainResult(str(out), start_epoch + done_here, history, str(ck_path))
