"""Training and evaluation of a feature model + head (softmax, center, L-GM).

``train(config, out_dir)`` writes, after every epoch and atomically (temp file
+ rename): ``checkpoint.pt`` (model, head, optimizer, scheduler, RNG state,
metrics; loadable with ``weights_only=True``) and ``metrics.json``.
``train(..., resume=True)`` continues a run killed at any moment from its last
completed epoch and reproduces the uninterrupted run: the data order of epoch e
depends only on (seed, e), and the RNG state is restored.  A non-finite loss
stops training with :class:`TrainingDiverged`, leaving the last good
checkpoint untouched.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

import lgm_ext
from torch.utils.data import DataLoader, Dataset

from .config import PRESETS, TrainConfig, config_from_preset, dataset_info
from .data import load_dataset
from .heads import build_head
from .models import build_model

__all__ = ["TrainConfig", "PRESETS", "train", "evaluate", "load_checkpoint", "load_trained", "CheckpointError",
           "TrainingDiverged", "config_from_preset", "resume_config", "check_device", "resolve_device", "RESUMABLE_CHANGES", "METRIC_FIELDS",
           "train_data_parallel", "init_from_torchrun", "DistributedTrainingError"]

# v3: the checkpoint carries "sha256", a digest of everything else in it (tensors by dtype, shape and bytes),
# verified on every load.
CHECKPOINT_FORMAT = "lgm-ext-checkpoint-v3"

# Options that `train(..., resume=True)` accepts with a value other than the checkpoint's: where the run
# executes, and (for the constant schedule only, whose learning rate does not depend on the total) more epochs.
RESUMABLE_CHANGES = ("device", "epochs")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or not a plain lgm-ext checkpoint (refused, never executed)."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite."""


class DistributedTrainingError(RuntimeError):
    """A process of a data-parallel run failed with an error of another kind (e.g. out of memory, a lost peer)."""


def resolve_device(device: str | None) -> str:
    """``"auto"`` (or None) becomes ``"cuda"`` when a GPU is available, else ``"cpu"``; any other
    value is checked with :func:`check_device`."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(device)


def check_device(device: str) -> str:
    """``device`` if this machine has it, else a ``ValueError`` that says what is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for but no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return device


def _digest(obj, h=None) -> str:
    """SHA-256 of a checkpoint's content: nested dicts (sorted keys), lists, tensors (dtype, shape, bytes)
    and plain values."""
    top = h is None
    h = h or hashlib.sha256()
    if isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode() + b":")
            _digest(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest() if top else ""


def _finite_weights(*modules: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for m in modules
               for t in (*m.parameters(), *m.buffers()) if t.is_floating_point())


# ----------------------------------------------------------------------------- pieces
def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The L-GM ramp length in optimizer steps (``warmup_epochs`` of ``steps_per_epoch``)."""
    return max(1, int(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0


def _build(cfg: TrainConfig, steps_per_epoch: int = 0) -> tuple[nn.Module, nn.Module]:
    """The feature network and the head of ``cfg``; the head gets exactly the config fields it declares."""
    from .heads import HEADS

    info = dataset_info(cfg.dataset)
    model = build_model(cfg.model, cfg.feat_dim, info["channels"], info["image_size"], feature_relu=cfg.feature_relu)
    derived = {"warmup_steps": warmup_steps(cfg, steps_per_epoch)}
    kwargs = {k: derived[k] if k in derived else getattr(cfg, k) for k in HEADS[cfg.head].config_keys}
    head = build_head(cfg.head, cfg.feat_dim, info["num_classes"], **kwargs)
    device = resolve_device(cfg.device)
    return model.to(device), head.to(device)


def _optimizer(cfg: TrainConfig, model: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    """SGD over two parameter groups (lgm_ext.param_groups): the network and the head's other
    parameters at ``lr``; the head's class parameters (L-GM means, log-variances) at
    ``lr * head_lr_mult`` with ``head_weight_decay``."""
    cls = head.class_parameters()
    ids = {id(p) for p in cls}
    rest = list(model.parameters()) + [p for p in head.parameters() if id(p) not in ids]
    groups = lgm_ext.param_groups(rest, cls, lr=cfg.lr, head_lr_mult=cfg.head_lr_mult,
                                  weight_decay=cfg.weight_decay, head_weight_decay=cfg.head_weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def _step_schedule(total: int):
    return lambda s: 1.0 if s < 0.5 * total else (0.1 if s < 0.75 * total else 0.01)


def _scheduler(cfg, opt, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cyclic":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.LambdaLR(opt, _step_schedule(total))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _loader(ds: Dataset, cfg: TrainConfig, epoch: int, rank: int = 0, world: int = 1):
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


class _Step(nn.Module):
    """network + head as one module (what DistributedDataParallel wraps): images -> (loss, logits)."""

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, images, labels, extra):
        return self.head(self.model(images), labels, **extra)


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


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: the previous file stays, no partial .tmp is left
        tmp.unlink(missing_ok=True)
        raise


def _save_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


# The columns of metrics.csv (and the scalars sent to TensorBoard), in order.
METRIC_FIELDS = ("epoch", "train_loss", "train_accuracy", "test_error_percent", "lr", "train_images_per_second",
                 "test_log_likelihood_mean")


def _save_csv(path: Path, history: list[dict]) -> None:
    """metrics.json as a table (one row per epoch), for spreadsheets and plotting scripts."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    _atomic_write_bytes(path, lambda f: f.write(buf.getvalue().encode()))


def _tensorboard_writer(log_dir):
    if log_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from err
    return SummaryWriter(log_dir=str(log_dir))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers
    only.  Anything else (a pickled object or function, a truncated file, content
    that does not match its SHA-256) is refused with :class:`CheckpointError`;
    nothing in the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as err:
        raise CheckpointError(f"refusing to load {path}: not a plain lgm-ext checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        old = isinstance(ck, dict) and str(ck.get("format", "")).startswith("lgm-ext-checkpoint-")
        raise CheckpointError(f"refusing to load {path}: " + ("an older checkpoint format without a content hash; "
                              "train it again" if old else "unknown checkpoint format"))
    stored = ck.pop("sha256", None)
    if stored != _digest(ck):
        raise CheckpointError(f"refusing to load {path}: its content does not match its SHA-256 "
                              "(the file is corrupted or was modified)")
    if not isinstance(ck.get("config"), dict):
        raise CheckpointError(f"refusing to load {path}: no configuration in it")
    return ck


def _config_of(ck: dict, path) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    try:
        return TrainConfig(**{k: v for k, v in ck["config"].items() if k in names})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"refusing to load {path}: invalid configuration in it ({err})") from err


def resume_config(out_dir: str | os.PathLike, **changes) -> TrainConfig:
    """The configuration of the run in ``out_dir`` (its checkpoint's, else its ``config.json``) with the
    explicit (non-None) ``changes`` applied.  Changes other than :data:`RESUMABLE_CHANGES` that differ from
    the saved values raise :class:`CheckpointError` naming the fields."""
    out = Path(out_dir)
    if (out / "checkpoint.pt").exists():
        cfg = _config_of(load_checkpoint(out / "checkpoint.pt"), out / "checkpoint.pt")
    elif (out / "config.json").is_file():
        try:
            saved = json.loads((out / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot resume {out}: unreadable config.json ({err})") from err
        cfg = _config_of({"config": saved if isinstance(saved, dict) else {}}, out / "config.json")
    else:
        raise CheckpointError(f"nothing to resume in {out}: no checkpoint.pt or config.json; run without --resume")
    saved = asdict(cfg)
    unknown = sorted(set(changes) - set(saved))
    if unknown:
        raise TypeError(f"unknown configuration keys: {', '.join(unknown)}")
    differ = sorted(k for k, v in changes.items() if v is not None and v != saved[k] and k not in RESUMABLE_CHANGES)
    if differ:
        raise CheckpointError(f"cannot resume {out} with other settings for {', '.join(differ)} (saved: "
                              + ", ".join(f"{k}={saved[k]!r}" for k in differ)
                              + "); only --epochs (constant schedule) and --device may change; use --overwrite "
                                "to train anew")
    saved.update({k: v for k, v in changes.items() if v is not None})
    return TrainConfig(**saved)


def _check_resumable(saved: dict, cfg: TrainConfig, done: int, path) -> None:
    now = asdict(cfg)
    # a field added after the checkpoint was written counts as its default (older runs stay resumable)
    saved = {**{f.name: f.default for f in fields(TrainConfig)}, **saved}
    differ = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if differ:
        raise CheckpointError(f"cannot resume {path}: the configuration differs in {', '.join(differ)} ("
                              + ", ".join(f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in differ) + ")")
    if cfg.epochs != saved.get("epochs"):
        if cfg.epochs < done:
            raise CheckpointError(f"cannot resume {path} with --epochs {cfg.epochs}: it has already trained {done}")
        if cfg.schedule != "constant":
            raise CheckpointError(
                f"cannot change the epochs of {path} from {saved.get('epochs')} to {cfg.epochs}: its {cfg.schedule} "
                "learning-rate schedule depends on the total number of epochs, so the extended run would not be "
                f"the run of {cfg.epochs} epochs; train anew with --overwrite (or use --schedule constant)")


def load_trained(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, nn.Module, TrainConfig, dict]:
    """Model, head (eval mode), config and the checkpoint dict from a checkpoint file."""
    ck = load_checkpoint(path)
    cfg = _config_of(ck, path)
    cfg.device = resolve_device(device)
    try:
        model, head = _build(cfg)
        model.load_state_dict(ck["model"])
        head.load_state_dict(ck["head"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"refusing to load {path}: its weights do not match its configuration "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    return model.eval(), head.eval(), cfg, ck


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, head: nn.Module, dataset: Dataset, *, batch_size: int = 512,
             device: str = "cpu", tick=None) -> dict:
    """Test error (%), confusion matrix (rows: true class), and for heads with a
    likelihood (L-GM, center) a summary of the per-sample log-likelihood.  ``tick(n)`` after each
    batch of n images (progress bars)."""
    was = model.training, head.training
    model.eval(), head.eval()
    num_classes = head.num_classes
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    lls = []
    t0 = time.perf_counter()
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        feats = model(images.to(device))
        pred = head.predict(feats).cpu()
        confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
        lls.append(head.log_likelihood(feats).cpu())
        if tick is not None:
            tick(len(labels))
    n = int(confusion.sum())
    out = {
        "samples": n,
        "error_percent": 100.0 * (1.0 - confusion.diag().sum().item() / max(n, 1)),
        "confusion": confusion.tolist(),
        "images_per_second": n / (time.perf_counter() - t0),
    }
    if lls:
        ll = torch.cat(lls).double()
        q = torch.quantile(ll, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
        out["log_likelihood"] = {"mean": ll.mean().item(), "std": ll.std().item() if ll.numel() > 1 else 0.0,
                                 "min": ll.min().item(), "p05": q[0], "median": q[1], "p95": q[2]}
    model.train(was[0]), head.train(was[1])
    return out


# ----------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    out_dir: str
    epochs_done: int
    metrics: list = field(default_factory=list)
    checkpoint: str = ""


def train(cfg: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, stop_after: int | None = None,
          datasets: tuple[Dataset, Dataset] | None = None, tensorboard: str | os.PathLike | None = None) -> TrainResult:
    """Train ``cfg`` into ``out_dir``.  A folder that already holds a checkpoint is refused unless
    ``resume`` (continue it; only :data:`RESUMABLE_CHANGES` may differ) or ``overwrite`` (replace it).
    ``cfg.device == "auto"`` trains on the GPU when there is one (the config saved says which).
    Called in every process of an initialized ``torch.distributed`` group (``lgm train --nproc N`` or
    torchrun), it trains data-parallel: ``cfg.batch_size`` is the global batch, split over the ranks
    (DistributedDataParallel; gradients equal the single-process ones up to float rounding; BatchNorm
    models need GPUs, for SyncBatchNorm), rank 0 alone writes the checkpoint, the metrics and the logs
    and evaluates.  Launch it with spawn or torchrun, which stop every rank when one fails.
    Every epoch appends to ``metrics.json`` and ``metrics.csv``; ``tensorboard=DIR`` also logs the
    same scalars there (needs the tensorboard package).  ``stop_after=k`` returns after k epochs of
    this call (as if killed there); ``datasets`` overrides (train, test)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    cfg = replace(cfg, device=resolve_device(cfg.device))
    rank, world = _dist()
    main = rank == 0
    if world > 1 and cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the number of processes ({world})")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot create the run folder {out}: {err.strerror if isinstance(err, OSError) else err}") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"the run folder {out} is not writable")
    ck_path = out / "checkpoint.pt"
    if ck_path.exists() and not resume and not overwrite:
        raise CheckpointError(f"{out} already holds a run ({ck_path}); pass --resume to continue it or "
                              "--overwrite to replace it")
    writer = _tensorboard_writer(tensorboard) if main else None  # fails before anything is removed
    _barrier(world)  # every rank has checked before rank 0 removes anything
    if main:
        if ck_path.exists() and not resume:
            for name in ("checkpoint.pt", "metrics.json", "metrics.csv", "config.json"):
                (out / name).unlink(missing_ok=True)
        for stale in out.glob("*.tmp"):  # left by a kill during an atomic write
            stale.unlink(missing_ok=True)
    if datasets is None:
        for turn in ((0,) if world == 1 else (0, 1)):  # rank 0 stages the files first, then the others read
            if (turn == 0) == main:
                train_ds = load_dataset(cfg.dataset, True, data_dir=cfg.data_dir, subset=cfg.subset,
                                        augment=cfg.augment, seed=cfg.seed)
                test_ds = load_dataset(cfg.dataset, False, data_dir=cfg.data_dir, subset=cfg.test_subset,
                                       seed=cfg.seed)
            _barrier(world)
    else:
        train_ds, test_ds = datasets

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    if world > 1 and 0 < len(train_ds) % cfg.batch_size < world:
        steps_per_epoch -= 1  # the final batch, smaller than the number of ranks, is dropped (_loader)
    model, head = _build(cfg, steps_per_epoch)
    if world > 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if not cfg.device.startswith("cuda"):
            raise ValueError(f"data-parallel training of {cfg.model} (BatchNorm) needs GPUs: SyncBatchNorm, which "
                             "keeps the statistics of the global batch, runs on CUDA only; use one process on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = _optimizer(cfg, model, head)
    sched = _scheduler(cfg, opt, steps_per_epoch)
    history: list[dict] = []
    start_epoch = 0
    if resume and ck_path.exists():
        ck = load_checkpoint(ck_path)
        _check_resumable(ck["config"], cfg, int(ck["epoch"]), ck_path)
        model.load_state_dict(ck["model"])
        head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        history, start_epoch = list(ck["metrics"]), int(ck["epoch"])
        if main:
            _save_json(out / "metrics.json", history)  # a kill between the checkpoint and the metrics write
            _save_csv(out / "metrics.csv", history)
    if main:
        _save_json(out / "config.json", asdict(cfg))
    net = _Step(model, head)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # the head's buffers (center-loss centers, the L-GM step counter) stay equal by their own synced or
        # identical updates; BatchNorm statistics by SyncBatchNorm (above); nothing needs a broadcast
        import warnings

        with warnings.catch_warnings():  # torch suggests keeping broadcast_buffers=False for rank-local syncs
            warnings.simplefilter("ignore", FutureWarning)
            net = DistributedDataParallel(net, broadcast_buffers=False)

    bar = _progress(progress and main)
    done_here = 0

    def diverged(what: str, hint: str) -> TrainingDiverged:
        last = f"{ck_path} (epoch {start_epoch + done_here})" if ck_path.exists() else "none yet"
        return TrainingDiverged(f"{what} (lr {opt.param_groups[0]['lr']:.3g}); training stopped. "
                                f"Last good checkpoint: {last}. {hint}")

    with bar:
        task = bar.add_task("train", total=(cfg.epochs - start_epoch) * steps_per_epoch)
        for epoch in range(start_epoch, cfg.epochs):
            model.train(), head.train()
            seen, correct, loss_sum, t0 = 0, 0, 0.0, time.perf_counter()
            for i, (images, labels, n_step) in enumerate(_loader(train_ds, cfg, epoch, rank, world)):
                images, labels = images.to(cfg.device), labels.to(cfg.device)
                extra = head.prepare(model, images, labels)  # e.g. inverse adversaries (eval mode, no grad)
                loss, logits = net(images, labels, extra)
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
                opt.step()
                sched.step()
                n = labels.shape[0]
                seen += n
                loss_sum += loss.item() * n
                correct += (logits.argmax(1) == labels).sum().item()
                bar.update(task, advance=1, description=(
                    f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / seen:.4f} acc {100 * correct / seen:.1f}%"))
            train_time = time.perf_counter() - t0
            seen, correct, loss_sum = _all_sum([seen, correct, loss_sum], world, cfg.device)
            if not _finite_weights(model, head):
                raise diverged(f"non-finite weights after epoch {epoch + 1}", "Try a lower --lr.")
            if not main:  # rank 0 evaluates and writes; the others wait for it
                _barrier(world)
                done_here += 1
                if stop_after is not None and done_here >= stop_after:
                    break
                continue
            ev = evaluate(model, head, test_ds, device=cfg.device)
            history.append({
                "epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": 100.0 * correct / seen,
                "test_error_percent": ev["error_percent"], "lr": opt.param_groups[0]["lr"],
                "train_images_per_second": seen / train_time,
                **({"test_log_likelihood_mean": ev["log_likelihood"]["mean"]} if "log_likelihood" in ev else {}),
            })
            ckpt = {
                "format": CHECKPOINT_FORMAT, "config": asdict(cfg), "epoch": epoch + 1,
                "model": model.state_dict(), "head": head.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": _rng_state(cfg.device), "metrics": history,
            }
            ckpt["sha256"] = _digest(ckpt)
            _atomic_write_bytes(ck_path, lambda f: torch.save(ckpt, f))
            _save_json(out / "metrics.json", history)
            _save_csv(out / "metrics.csv", history)
            if writer is not None:
                for k in METRIC_FIELDS[1:]:
                    if k in history[-1]:
                        writer.add_scalar(k, history[-1][k], epoch + 1)
                writer.flush()
            _barrier(world)
            done_here += 1
            if stop_after is not None and done_here >= stop_after:
                break
    if writer is not None:
        writer.close()
    return TrainResult(str(out), start_epoch + done_here, history, str(ck_path))


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled)


# ----------------------------------------------------------------------------- data-parallel launcher
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig, out_dir: str, kwargs: dict, err_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cfg.device.startswith("cuda"):
        cfg = replace(cfg, device=f"cuda:{rank}")
        torch.cuda.set_device(rank)
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        train(cfg, out_dir, **kwargs)
    except Exception as err:  # one line for the parent, which raises it again in its own process
        Path(err_dir, f"rank{rank}.err").write_text(json.dumps([type(err).__name__, str(err)]))
        raise
    finally:
        dist.destroy_process_group()


def init_from_torchrun(device: str) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT; gloo on CPU, NCCL on GPU).  Returns False outside torchrun."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    if not dist.is_initialized():
        cuda = resolve_device(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return True


def train_data_parallel(cfg: TrainConfig, out_dir: str | os.PathLike, nproc: int, **kwargs) -> TrainResult:
    """:func:`train` in ``nproc`` local processes (torch.multiprocessing spawn; gloo on CPU, NCCL with one
    GPU per process): ``cfg.batch_size`` is the global batch.  Returns rank 0's result; an error in any
    rank is raised again here with its own type and message."""
    import tempfile

    import torch.multiprocessing as mp

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    cfg = replace(cfg, device=resolve_device(cfg.device))
    if cfg.device.startswith("cuda") and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} needs {nproc} GPUs; this machine has {torch.cuda.device_count()}")
    if cfg.batch_size % nproc:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of --nproc {nproc}")
    if nproc == 1:
        if init_from_torchrun(cfg.device) and cfg.device.startswith("cuda"):
            cfg = replace(cfg, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        return train(cfg, out_dir, **kwargs)
    if kwargs.get("tensorboard") is not None:
        _tensorboard_writer(kwargs["tensorboard"]).close()  # fail here, not in a worker
    with tempfile.TemporaryDirectory() as err_dir:
        try:
            mp.spawn(_ddp_worker, args=(nproc, _free_port(), cfg, str(out_dir), kwargs, err_dir), nprocs=nproc,
                     join=True)
        except Exception as err:
            # the rank that failed first (the others then fail on the broken process group)
            errors = sorted(Path(err_dir).glob("rank*.err"), key=lambda f: f.stat().st_mtime_ns)
            if not errors:
                raise DistributedTrainingError(f"a training process failed: {err}".splitlines()[0]) from None
            name, msg = json.loads(errors[0].read_text())
            from .data import DatasetUnavailable

            kinds = {c.__name__: c for c in (ValueError, TypeError, OSError, CheckpointError, TrainingDiverged,
                                             DatasetUnavailable)}
            if name in kinds:
                raise kinds[name](msg) from None
            raise DistributedTrainingError(f"{errors[0].stem}: {name}: {msg}") from None
    ck = load_checkpoint(Path(out_dir) / "checkpoint.pt")
    return TrainResult(str(out_dir), int(ck["epoch"]), list(ck["metrics"]), str(Path(out_dir) / "checkpoint.pt"))
