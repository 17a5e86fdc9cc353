"""Checkpoints: the file format and its content hash, atomic writes, loading (refusing anything that is
not a plain lgm-ext checkpoint), and the resume policy (which settings may change on ``--resume``)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .config import TrainConfig
from .devices import resolve_device
from .recipe import build_model_and_head
from .run_folder import write_atomically
from .signing import SIGNATURE_KEY, sign, verify

__all__ = ["CHECKPOINT_FORMAT", "RESUMABLE_CHANGES", "CheckpointError", "Trained", "content_digest",
           "check_written_by_training", "add_signature", "check_signature",
           "checkpoint_digest", "save_checkpoint", "load_checkpoint", "load_plain", "run_config_file", "config_of",
           "resume_config", "config_differences", "check_resumable", "load_trained"]

# v3: the checkpoint carries "sha256", a digest of everything else in it (tensors by dtype, shape and bytes),
# verified on every load; where a signing key is set (lgm_lab.signing), also "signature", an HMAC of the digest
# of the rest (the sha256 covers it, so that readers without a key see a consistent file).
CHECKPOINT_FORMAT = "lgm-ext-checkpoint-v3"
SIGNING_PURPOSE = "lgm-ext checkpoint"

# Options that `train(..., resume=True)` accepts with a value other than the checkpoint's: where the run
# executes, where its data lie (the same data by content: the checkpoint's fingerprint is checked, so another
# spelling of the path, a copy or a link is the same run), and (for the constant schedule only, whose learning
# rate does not depend on the total) more epochs.
RESUMABLE_CHANGES = ("device", "data_dir", "epochs")

# The fields every run's config.json has had (lgm-ext 0.1 on): a config.json without them is not a run's.
_RUN_KEYS = ("dataset", "model", "feat_dim", "head", "batch_size", "lr", "seed")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or not a plain lgm-ext checkpoint (refused, never executed)."""


def content_digest(obj, h=None) -> str:
    """SHA-256 of a checkpoint's content: nested dicts (sorted keys), lists, tensors (dtype, shape, bytes)
    and plain values."""
    top = h is None
    h = h or hashlib.sha256()
    if isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode() + b":")
            content_digest(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            content_digest(v, h)
        h.update(b"]")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest() if top else ""


def add_signature(content: dict, *, purpose: str) -> dict:
    """``content`` with ``"signature"`` (:func:`lgm_lab.signing.sign` of its content digest) when a signing key
    is set; unchanged (and without one) otherwise.  Call it before the file's own SHA-256 is computed: the SHA-256
    then covers the signature too, so that any reader (older ones included) sees a consistent file."""
    content.pop(SIGNATURE_KEY, None)
    signature = sign(content_digest(content), purpose=purpose)
    if signature is not None:
        content[SIGNATURE_KEY] = signature
    return content


def check_signature(content: dict, *, purpose: str, path, error: type[Exception]) -> bool:
    """Verify the signature :func:`add_signature` put in ``content`` (its SHA-256 removed) when a key is set
    (:func:`lgm_lab.signing.verify`); ``content`` is left as it is."""
    return verify(content_digest({k: v for k, v in content.items() if k != SIGNATURE_KEY}),
                  content.get(SIGNATURE_KEY), purpose=purpose, path=path, error=error)


def save_checkpoint(path: Path, ckpt: dict) -> None:
    """Write ``ckpt`` (with ``"format"`` and everything but the hash) atomically, its SHA-256 added, and its
    signature where a signing key is set (:mod:`lgm_lab.signing`).  Serialized in memory first, so a failing
    write (a full disk) is the OSError of the file write, and the previous checkpoint stays."""
    ckpt = add_signature(dict(ckpt, format=CHECKPOINT_FORMAT), purpose=SIGNING_PURPOSE)
    ckpt["sha256"] = content_digest(ckpt)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    write_atomically(path, lambda f: f.write(buf.getbuffer()))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers
    only.  Anything else (a pickled object or function, a truncated file, content
    that does not match its SHA-256) is refused with :class:`CheckpointError`;
    nothing in the file is executed.  Where a signing key is set (:mod:`lgm_lab.signing`), a checkpoint
    without a signature, or with one that does not match, is refused too.  What no training writes -- weights
    that are not finite, negative BatchNorm variances or counts -- is refused whatever its digest: the SHA-256
    catches damage, not an edit whose digest was recomputed (docs/lab.md)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    ck = load_plain(path, CheckpointError, "a plain lgm-ext checkpoint")
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        old = isinstance(ck, dict) and str(ck.get("format", "")).startswith("lgm-ext-checkpoint-")
        raise CheckpointError(f"refusing to load {path}: " + ("an older checkpoint format without a content hash; "
                              "train it again" if old else "unknown checkpoint format"))
    stored = ck.pop("sha256", None)
    if stored != content_digest(ck):
        raise CheckpointError(f"refusing to load {path}: its content does not match its SHA-256 "
                              "(the file is corrupted or was modified)")
    check_signature(ck, purpose=SIGNING_PURPOSE, path=path, error=CheckpointError)
    if not isinstance(ck.get("config"), dict):
        raise CheckpointError(f"refusing to load {path}: no configuration in it")
    check_written_by_training(ck, path)
    return ck


def _tensors(obj, prefix: str):
    """``(name, tensor)`` of every tensor in nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def check_written_by_training(ck: dict, path) -> None:
    """Refuse a checkpoint holding what no training writes (a diverged run stops before its checkpoint,
    lgm_lab.train): a non-finite tensor in its weights or optimizer state, a negative BatchNorm variance or batch
    count -- an edited file, whatever its SHA-256 (which anyone can recompute) says."""
    for part in ("model", "head", "optimizer"):
        for name, t in _tensors(ck.get(part), part):
            if t.is_floating_point() or t.is_complex():
                if not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"refusing to load {path}: {name} holds non-finite values (NaN or "
                                          "infinity), which no training writes (a diverged run stops before its "
                                          "checkpoint): the file was edited")
            if name.endswith(("running_var", "num_batches_tracked")) and t.numel() and bool((t < 0).any()):
                raise CheckpointError(f"refusing to load {path}: {name} is negative, which no training writes: the "
                                      "file was edited")


def load_plain(path: Path, error: type[Exception], what: str):
    """``torch.load(path, weights_only=True)`` on the CPU, any failure (a file that is not a torch file, a
    truncated or bit-flipped one, a pickle of anything but tensors and plain containers: torch raises
    UnpicklingError, RuntimeError, EOFError, but also IndexError, KeyError, ... on garbage) raised as
    ``error`` in one line; nothing in the file is executed."""
    try:
        with warnings.catch_warnings():  # a damaged file may make torch warn (an odd pickle protocol) before failing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from err
    except Exception as err:  # noqa: BLE001 -- whatever a damaged file makes the unpickler raise
        raise error(f"refusing to load {path}: not {what} ({_load_failure(err)}); nothing in it was run") from err


def _load_failure(err: Exception) -> str:
    """Why torch.load refused a file, in a few words of ours: the pickled object it holds (torch's own text
    advises ``weights_only=False``, which would run it, and carries terminal escape codes), else the exception
    and the first line of its text that is not torch's advice."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a pickled {found.group(1)}, not only tensors and plain containers"
    lines = [" ".join(ln.split()) for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and "weights_only" not in ln.lower() and "torch.load" not in ln
             and "weights only" not in ln.lower() and "pytorch.org" not in ln]
    return type(err).__name__ + (f": {lines[0][:120]}" if lines else "")


def run_config_file(path: Path) -> TrainConfig:
    """The :class:`TrainConfig` of a run's ``config.json`` (what ``train`` writes when it starts); a file that
    is not one (not JSON, not a run's keys, invalid values) raises :class:`CheckpointError`."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not the config.json of an lgm-ext run (unreadable: "
                              f"{getattr(err, 'strerror', None) or err})") from err
    missing = [k for k in _RUN_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise CheckpointError(f"{path} is not the config.json of an lgm-ext run (it lacks {', '.join(missing)})")
    return config_of({"config": saved}, path)


def checkpoint_digest(ck: dict) -> str:
    """The SHA-256 of a checkpoint's content, as :func:`save_checkpoint` stored it and
    :func:`load_checkpoint` verified it (it recomputes it: the loaded dict does not carry the stored one).
    Measurements cached beside a checkpoint are keyed by it."""
    return content_digest({k: v for k, v in ck.items() if k != "sha256"})


def config_of(ck: dict, path) -> TrainConfig:
    """The :class:`TrainConfig` saved in a checkpoint (fields unknown to this version are ignored)."""
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
        cfg = config_of(load_checkpoint(out / "checkpoint.pt"), out / "checkpoint.pt")
    elif (out / "config.json").is_file():
        cfg = run_config_file(out / "config.json")
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


def config_differences(saved: dict, cfg: TrainConfig, may_differ=()) -> list[str]:
    """The fields (sorted) in which a run's saved config ``saved`` differs from ``cfg``, leaving out
    ``may_differ``; a field added after the run was written counts as its default (older runs stay comparable)."""
    now = asdict(cfg)
    saved = {**{f.name: f.default for f in fields(TrainConfig)}, **saved}
    return sorted(k for k in now if k not in may_differ and saved.get(k) != now[k])


def check_resumable(saved: dict, cfg: TrainConfig, done: int, path) -> None:
    """Refuse to resume a checkpoint (saved config ``saved``, ``done`` epochs) with ``cfg`` unless they
    differ only in :data:`RESUMABLE_CHANGES`, and more epochs only on the constant schedule."""
    now = asdict(cfg)
    saved = {**{f.name: f.default for f in fields(TrainConfig)}, **saved}
    differ = config_differences(saved, cfg, RESUMABLE_CHANGES)
    if differ:
        raise CheckpointError(f"cannot resume {path}: the configuration differs in {', '.join(differ)} ("
                              + ", ".join(f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in differ) + ")")
    if cfg.steps is None and cfg.epochs != saved.get("epochs"):  # with --steps, --epochs means nothing
        if cfg.epochs < done:
            raise CheckpointError(f"cannot resume {path} with --epochs {cfg.epochs}: it has already trained {done}")
        if cfg.schedule != "constant":
            raise CheckpointError(
                f"cannot change the epochs of {path} from {saved.get('epochs')} to {cfg.epochs}: its {cfg.schedule} "
                "learning-rate schedule depends on the total number of epochs, so the extended run would not be "
                f"the run of {cfg.epochs} epochs; train anew with --overwrite (or use --schedule constant)")


class Trained(NamedTuple):
    """A trained run: ``model`` (images -> features), ``head``, its ``config`` and the ``checkpoint`` dict;
    ``classifier`` maps images to logits (what attacks take)."""

    model: nn.Module
    head: nn.Module
    config: TrainConfig
    checkpoint: dict

    @property
    def classifier(self) -> nn.Module:
        """:class:`lgm_ext.Classifier` ``(model, head)``, in eval mode: images -> the head's logits.  Attack
        this, not ``model``, which outputs features (``FGSM(model, ...)`` on features runs, and is wrong)."""
        from lgm_ext import Classifier

        return Classifier(self.model, self.head).eval()


def load_trained(path: str | os.PathLike, device: str = "cpu") -> Trained:
    """Model, head (eval mode), config and the checkpoint dict from a checkpoint file, as a :class:`Trained`
    (a tuple: ``model, head, cfg, ck = load_trained(path)``; ``load_trained(path).classifier`` is the
    images -> logits model)."""
    ck = load_checkpoint(path)
    cfg = config_of(ck, path)
    cfg.device = resolve_device(device)
    try:
        model, head = build_model_and_head(cfg)
        model.load_state_dict(ck["model"])
        head.load_state_dict(ck["head"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"refusing to load {path}: its weights do not match its configuration "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    return Trained(model.eval(), head.eval(), cfg, ck)
