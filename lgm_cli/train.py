"""`lgm train`: its options are generated from :class:`lgm_lab.config.TrainConfig`'s fields, one per
field, so the two cannot drift."""
from __future__ import annotations

import enum
import inspect
import os
from pathlib import Path
from typing import Optional

import typer

from lgm_lab import config

from .options import PROGRESS_HELP, check_positive, choices, console, err_console, fail

Preset = choices("Preset", (*config.PRESETS, *config.RENAMED_PRESETS))
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def shown_default(value) -> str:
    """A default as a reader wants it: a multiple of 1/255 (a pixel step) as ``4/255``, other floats in their
    shortest form (``%g``), None as ``none``."""
    if value is None:
        return "none"
    if isinstance(value, float):
        steps = value * 255
        if value and abs(steps - round(steps)) < 1e-9 and round(steps) % 255:
            return f"{round(steps)}/255"
        return f"{value:g}"
    return str(value)


def _help_with_default(text: str, default) -> str:
    """``text`` with its default and that a preset may change it, said once: a help that names its default
    ("(default: all)") gets ", or the preset's" inside it."""
    if text.endswith(")") and "(default: " in text:
        return text[:-1] + ", or the preset's)"
    return f"{text} (default: {shown_default(default)}, or the preset's)"


def _config_parameters() -> list[inspect.Parameter]:
    """One ``typer.Option`` per TrainConfig field: choices as enums, booleans as --x/--no-x,
    every default None so that a preset's values win unless an option is given."""
    params = []
    for f in config.config_fields():
        base = _TYPES[str(f.type).replace(" | None", "").replace("Optional[", "").rstrip("]")]
        flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        help_ = _help_with_default(f.metadata["help"], f.default)
        values = f.metadata.get("choices")
        if values is not None:
            base = choices(f.name.title().replace("_", ""), values)
        decls = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[base],
                                        default=typer.Option(None, *decls, help=help_,
                                                             metavar=f.metadata.get("metavar"))))
    return params


def train_command(**options) -> None:
    """Train a feature model with a softmax, center-loss or L-GM head; checkpoint every epoch.

    With --resume the run's saved configuration is used; only the options given explicitly are applied,
    and only --epochs (constant schedule), --device and --progress may differ from it."""
    from lgm_lab.checkpoints import CheckpointError, resume_config
    from lgm_lab.data import DatasetUnavailable
    from lgm_lab.launch import DistributedTrainingError, train_data_parallel
    from lgm_lab.run_folder import RunFolderBusy
    from lgm_lab.train import TrainingDiverged

    out, preset, resume, overwrite, progress, tensorboard, nproc, timeout = (
        options.pop(k) for k in ("out", "preset", "resume", "overwrite", "progress", "tensorboard", "nproc",
                                 "timeout"))
    overrides = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in options.items()}
    if preset is not None and preset.value in config.RENAMED_PRESETS:
        new = config.RENAMED_PRESETS[preset.value]
        err_console.print(f"note: --preset {preset.value} is now --preset {new} ({preset.value!r} names lgm "
                          "reproduce's preset)", markup=False, highlight=False)
        preset = Preset(new)
    if overrides.get("data_dir") is not None:
        overrides["data_dir"] = str(overrides["data_dir"])
    try:
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if resume and (out / "checkpoint.pt").exists() or resume and (out / "config.json").exists():
            given = dict(config.PRESETS[preset.value]) if preset else {}
            given.update({k: v for k, v in overrides.items() if v is not None})
            cfg = resume_config(out, **given)
            if cfg.steps is not None and overrides.get("epochs") is not None:
                err_console.print(f"note: --epochs {overrides['epochs']} is ignored: this run's budget is --steps "
                                  f"{cfg.steps} (SGD steps), which --resume keeps", markup=False, highlight=False)
        else:
            chosen = {**(config.PRESETS[preset.value] if preset else {}),
                      **{k: v for k, v in overrides.items() if v is not None}}
            if chosen.get("steps") is not None and chosen.get("warmup_steps") is None \
                    and chosen.get("warmup_epochs") is None:
                # a step budget gets a warm-up that fits it, a quarter of the run (as the experiments' presets),
                # unless one is given; saved in the config as any explicit value
                overrides["warmup_steps"] = max(1, chosen["steps"] // 4)
            cfg = config.config_from_preset(preset.value if preset else None, **overrides)
        check_positive(nproc, "--nproc")
        result = train_data_parallel(cfg, out, nproc, timeout=timeout, resume=resume, overwrite=overwrite,
                                     progress=progress, tensorboard=tensorboard)
    except (ValueError, TypeError, OSError, DatasetUnavailable, CheckpointError, TrainingDiverged,
            DistributedTrainingError, RunFolderBusy) as err:
        fail(err)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    if not result.metrics:
        fail(ValueError(f"{out}: no completed epoch"))
    last = result.metrics[-1]
    console.print(f"{cfg.head} head, {result.epochs_done} epochs: test error {last['test_error_percent']:.2f}% "
                  f"({last['train_images_per_second']:.0f} training images/s); run in {result.out_dir}")


_PARAMS = [
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path, default=typer.Option(
        Path("runs/train"), "--out", "-o", help="run folder: checkpoint.pt, metrics.json, metrics.csv, config.json")),
    inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Preset], default=typer.Option(
        None, metavar="<" + "|".join(config.PRESETS) + ">",  # quick, small's old name, works but is not offered
        help="small (4 epochs of 10,000 images: a few minutes on 2 cores; formerly quick) | report (the "
             "inverse-adversary report's recipe) | paper (the L-GM paper's LeNet++ setting); explicit options win")),
    *_config_parameters(),
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, help="continue the run in --out from its last completed epoch")),
    inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, help="replace a run already in --out (without it, or --resume, such a folder is refused)")),
    inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        True, help=PROGRESS_HELP)),
    inspect.Parameter("nproc", inspect.Parameter.KEYWORD_ONLY, annotation=int, default=typer.Option(
        1, help="data-parallel processes (DistributedDataParallel; gloo on CPU, one GPU each with NCCL); "
                "--batch-size is the global batch")),
    inspect.Parameter("timeout", inspect.Parameter.KEYWORD_ONLY, annotation=float, default=typer.Option(
        config.PROCESS_GROUP_TIMEOUT,
        help="data-parallel runs: seconds a process waits for its peers in a collective before the run stops "
             "(torch's own default is 30 min)")),
    inspect.Parameter("tensorboard", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, help="also log the per-epoch metrics to this TensorBoard folder (needs the tensorboard package; "
                   "metrics.json and metrics.csv are always written)")),
]
train_command.__signature__ = inspect.Signature(_PARAMS)
train_command.__annotations__ = {p.name: p.annotation for p in _PARAMS}
