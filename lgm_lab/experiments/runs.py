"""Runs the experiments share: the configuration of one trained model, training it or reusing a
finished run, the dataset a preset uses, and caching a measurement beside its checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

from ..checkpoints import CheckpointError, config_differences, run_config_file
from ..config import TrainConfig, config_from_preset
from ..data import DatasetUnavailable, load_dataset
from ..run_folder import RunFolderBusy, locked, save_json
from ..train import finished_run, train

__all__ = ["run_config", "train_or_reuse", "why_not_shared", "pick_dataset", "load_cached", "save_cached",
           "budget_words"]


def run_config(dataset: str, data_dir, feat_dim: int, seed: int, overrides: dict) -> TrainConfig:
    """The "report" recipe (docs/SPEC.md section 5) with ``overrides`` for one model of an experiment."""
    return config_from_preset("report", dataset=dataset, data_dir=str(data_dir) if data_dir else None,
                              feat_dim=feat_dim, seed=seed, **overrides)


def train_or_reuse(cfg: TrainConfig, run_dir: Path, progress) -> bool:
    """Train ``cfg`` into ``run_dir``; a finished run of the same config (and the same data by content) is
    reused (returns True) under a shared lock, so that experiments reading one run do not exclude each other;
    an unfinished one is resumed (an exclusive lock).  A run of another config, or on other data, or a
    checkpoint that cannot be read, is never deleted: it is refused with :class:`CheckpointError` naming the
    difference."""
    ck = run_dir / "checkpoint.pt"
    if ck.exists():
        try:
            with locked(run_dir, shared=True):
                if finished_run(cfg, run_dir):
                    return True
        except CheckpointError as err:
            raise CheckpointError(f"{err}. The run in {run_dir} is kept: give another --out, or move it away to "
                                  "train this point anew") from err
    # nothing there, or unfinished (killed after its first checkpoint, or before it: config.json only)
    train(cfg, run_dir, resume=ck.exists() or (run_dir / "config.json").is_file(), progress=False)
    return False


_SHARED_MAY_DIFFER = ("device", "data_dir")  # where it ran and the folder its data came from (checked by content)


def why_not_shared(cfg: TrainConfig, run_dir: Path) -> str | None:
    """None when ``run_dir`` holds a finished run of exactly ``cfg`` (the same config but for
    :data:`_SHARED_MAY_DIFFER`, the same data by content; read under a shared lock): a network another experiment
    may measure instead of training the same configuration again.  Otherwise why not, in words: nothing there,
    an unfinished run, another config, other data, an unreadable run or one that a writer holds.  Only reads."""
    d = Path(run_dir)
    if not (d / "checkpoint.pt").is_file():
        return "no finished run there"
    try:
        saved = run_config_file(d / "config.json")
        other = config_differences(saved.__dict__, cfg, _SHARED_MAY_DIFFER)
        if other:
            return f"another config ({', '.join(f'{k} {getattr(saved, k)!r}' for k in other)})"
        with locked(d, shared=True):
            return None if finished_run(cfg, d) else "an unfinished run"
    except (CheckpointError, RunFolderBusy) as err:
        return str(err)


def pick_dataset(preset: str, data_dir) -> str:
    """Fashion-MNIST, except for the "paper" preset: MNIST when it is available here."""
    if preset != "paper":
        return "fashion-mnist"
    try:
        load_dataset("mnist", False, data_dir=data_dir)
        return "mnist"
    except DatasetUnavailable:
        return "fashion-mnist"


def load_cached(path: Path, settings: dict) -> dict | None:
    """The measurement cached in ``path`` if it was made with exactly ``settings``, else None."""
    if not path.exists():
        return None
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cached.get("eval") if isinstance(cached, dict) and cached.get("settings") == settings else None


def save_cached(path: Path, settings: dict, value: dict) -> None:
    save_json(path, {"settings": settings, "eval": value}, indent=1)


def budget_words(train: dict) -> str:
    """An experiment's training budget (its "train" overrides of the report recipe) in words: SGD steps and batch
    size when the budget is in steps, else epochs."""
    if train.get("steps"):
        bs = train.get("batch_size", 128)
        return f"{train['steps']:,} SGD steps of batch {bs} ({train['steps'] * bs:,} images)"
    return f"{train.get('epochs', 25)} epochs"
