"""The `lgm` command line.  Each command is a thin layer over a library function.

Nothing here imports torch at module level: ``lgm --help`` and ``lgm --version``
stay fast; each command imports what it needs when it runs.  ``lgm train``'s
options are generated from :class:`lgm_lab.config.TrainConfig`'s fields, so the
two cannot drift.
"""
from __future__ import annotations

import enum
import inspect
import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from lgm_lab import config as C

app = typer.Typer(help="lgm-ext: fused L-GM loss and attack operators for PyTorch; training and evaluation of softmax, center-loss and L-GM heads.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lgm-ext")
    except PackageNotFoundError:  # running from a source tree without an install
        return "unknown"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"lgm-ext {_version()}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="print the version and exit")) -> None:
    """lgm-ext: fused L-GM loss and attack operators; training and evaluation of softmax, center-loss and L-GM heads."""


def _choices(name: str, values) -> type[enum.Enum]:
    """A str Enum of ``values``, so --help and shell completion list the choices."""
    return enum.Enum(name, {v: v for v in values}, type=str)


Preset = _choices("Preset", C.PRESETS)
ReproducePreset = _choices("ReproducePreset", C.REPRODUCE_PRESETS)


@app.command()
def info() -> None:
    """Show the installed build: version, torch, and which backends have kernels."""
    import torch

    import lgm_ext

    t = Table(show_header=False)
    t.add_row("lgm_ext", lgm_ext.__version__)
    t.add_row("torch", torch.__version__)
    t.add_row("CPU kernels", "yes")
    t.add_row("CUDA kernels compiled", "yes" if lgm_ext.has_cuda_kernels() else "no")
    t.add_row("GPU available", torch.cuda.get_device_name() if torch.cuda.is_available() else "no")
    console.print(t)


@app.command()
def bench(
    device: str = typer.Option("cpu", help="cpu or cuda"),
    n: int = typer.Option(256, help="batch size N"),
    sizes: Optional[str] = typer.Option(None, help="K:D pairs, e.g. 10:2,10:100 (default: the four standard sizes)"),
    repeats: Optional[int] = typer.Option(None, help="timed repeats per case (default: chosen by size)"),
    memory: bool = typer.Option(True, help="measure peak memory (one subprocess per case on the CPU)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the rows as JSON here"),
    progress: bool = typer.Option(True, help="show the progress line (--no-progress for logs)"),
    sides: Optional[str] = typer.Option(None, help="comma-separated sides, e.g. fused,plain_gemm,compiled_gemm "
                                                   "(default: all; the compiled ones compile first)"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
) -> None:
    """Time the fused L-GM loss (forward+backward) against plain-PyTorch versions, eager and torch.compile'd."""
    import torch

    from lgm_lab import bench as B

    try:
        impls = None
        if sides is not None:
            impls = [v.strip() for v in sides.split(",") if v.strip()]
            bad = [v for v in impls if v not in B.LGM_IMPLS]
            if bad or "fused" not in impls:
                raise ValueError(f"--sides must list fused and any of {', '.join(B.LGM_IMPLS)}; got {sides!r}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
        _check_positive(n, "--n")
        _check_positive(repeats, "--repeats")
        _check_json_target(json_out)
        _check_device_arg(device)
        pairs = B.LGM_SIZES if not sizes else [_size_pair(s) for s in sizes.split(",")]
    except ValueError as err:
        _fail(err)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  disable=not progress) as prog:
        task = prog.add_task("benchmark", total=None)
        rows = B.bench_lgm(
            pairs, n=n, device=device, repeats=repeats, memory=memory,
            progress=lambda m: prog.update(task, description=m), dtype=getattr(torch, dtype), impls=impls,
        )
    console.print(f"Machine: {B.machine_description(device)}")
    console.print(B.lgm_markdown(rows, n), markup=False)
    if json_out:
        try:
            json_out.write_text(B.to_json(rows))
        except OSError as err:
            _fail(err)


def _size_pair(text: str) -> tuple[int, int]:
    parts = text.split(":")
    try:
        k, d = (int(v) for v in parts)
    except ValueError:
        raise ValueError(f"--sizes takes K:D pairs of integers, e.g. 10:2,10:100; got {text!r}") from None
    if not (1 <= k <= 1 << 20 and 1 <= d <= 1 << 16):
        raise ValueError(f"--sizes {text!r}: K must be in [1, {1 << 20}] and D in [1, {1 << 16}]")
    return k, d


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _config_parameters() -> list[inspect.Parameter]:
    """One ``typer.Option`` per TrainConfig field: choices as enums, booleans as --x/--no-x,
    every default None so that a preset's values win unless an option is given."""
    params = []
    for f in C.config_fields():
        base = _TYPES[str(f.type).replace(" | None", "").replace("Optional[", "").rstrip("]")]
        flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        help_ = f"{f.metadata['help']} (default: {f.default}, or the preset's)"
        choices = f.metadata.get("choices")
        if choices is not None:
            base = _choices(f.name.title().replace("_", ""), choices)
        decls = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[base],
                                        default=typer.Option(None, *decls, help=help_)))
    return params


def train_cmd(**options) -> None:
    """Train a feature model with a softmax, center-loss or L-GM head; checkpoint every epoch.

    With --resume the run's saved configuration is used; only the options given explicitly are applied,
    and only --epochs (constant schedule), --device and --progress may differ from it."""
    from lgm_lab.data import DatasetUnavailable
    from lgm_lab.train import (CheckpointError, DistributedTrainingError, TrainingDiverged, resume_config,
                               train_data_parallel)

    out, preset, resume, overwrite, progress, tensorboard, nproc = (
        options.pop(k) for k in ("out", "preset", "resume", "overwrite", "progress", "tensorboard", "nproc"))
    overrides = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in options.items()}
    if overrides.get("data_dir") is not None:
        overrides["data_dir"] = str(overrides["data_dir"])
    try:
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if resume and (out / "checkpoint.pt").exists() or resume and (out / "config.json").exists():
            given = dict(C.PRESETS[preset.value]) if preset else {}
            given.update({k: v for k, v in overrides.items() if v is not None})
            cfg = resume_config(out, **given)
        else:
            cfg = C.config_from_preset(preset.value if preset else None, **overrides)
        _check_positive(nproc, "--nproc")
        result = train_data_parallel(cfg, out, nproc, resume=resume, overwrite=overwrite, progress=progress,
                                     tensorboard=tensorboard)
    except (ValueError, TypeError, OSError, DatasetUnavailable, CheckpointError, TrainingDiverged,
            DistributedTrainingError) as err:
        _fail(err)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    if not result.metrics:
        _fail(ValueError(f"{out}: no completed epoch"))
    last = result.metrics[-1]
    console.print(f"{cfg.head} head, {result.epochs_done} epochs: test error {last['test_error_percent']:.2f}% "
                  f"({last['train_images_per_second']:.0f} training images/s); run in {result.out_dir}")


_TRAIN_PARAMS = [
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path, default=typer.Option(
        Path("runs/train"), "--out", "-o", help="run folder: checkpoint.pt, metrics.json, metrics.csv, config.json")),
    inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Preset], default=typer.Option(
        None, help="quick (a few minutes on 2 cores) | report (the inverse-adversary report's recipe) | paper "
                   "(the L-GM paper's LeNet++ setting); explicit options win")),
    *_config_parameters(),
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, help="continue the run in --out from its last completed epoch")),
    inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, help="replace a run already in --out (without it, or --resume, such a folder is refused)")),
    inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        True, help="show progress bars")),
    inspect.Parameter("nproc", inspect.Parameter.KEYWORD_ONLY, annotation=int, default=typer.Option(
        1, help="data-parallel processes (DistributedDataParallel; gloo on CPU, one GPU each with NCCL); "
                "--batch-size is the global batch")),
    inspect.Parameter("tensorboard", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, help="also log the per-epoch metrics to this TensorBoard folder (needs the tensorboard package; "
                   "metrics.json and metrics.csv are always written)")),
]
train_cmd.__signature__ = inspect.Signature(_TRAIN_PARAMS)
train_cmd.__annotations__ = {p.name: p.annotation for p in _TRAIN_PARAMS}
app.command("train")(train_cmd)


# ----------------------------------------------------------------------------- options shared by the commands
# Every command that runs a model takes the same --device, --batch-size, --subset, --data-dir, --progress;
# every command that writes figures takes --out (a folder) and --format; every command with numbers a
# script would want takes --json FILE.
_DEVICE_HELP = "auto | cpu | cuda | cuda:N (default auto: cuda when available, else cpu)"
_SUBSET_HELP = ("use N test images: the seeded selection `lgm train --test-subset N` evaluates on "
                "(default: the whole test set)")
_BATCH_HELP = "images per forward/backward pass"
_PROGRESS_HELP = "show progress bars (--no-progress for logs)"
_FORMAT_HELP = "figure format: png | pdf | svg (vector, for papers)"
_JSON_HELP = "also write the numbers as JSON to this file (with the dataset and checkpoints)"


def _device_opt():
    return typer.Option(None, "--device", help=_DEVICE_HELP)


def _batch_opt():
    return typer.Option(256, "--batch-size", help=_BATCH_HELP)


def _subset_opt():
    return typer.Option(None, "--subset", help=_SUBSET_HELP)


def _format_opt():
    return typer.Option("png", "--format", help=_FORMAT_HELP)


def _progress_opt():
    return typer.Option(True, "--progress/--no-progress", help=_PROGRESS_HELP)


def _json_opt():
    return typer.Option(None, "--json", help=_JSON_HELP)


def _bar(enabled: bool):
    """A rich progress display (bar, count, elapsed, remaining) on stderr, off with --no-progress."""
    from rich.progress import (BarColumn, MofNCompleteColumn, TimeElapsedColumn, TimeRemainingColumn)

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, disable=not enabled)


def _round(obj, digits: int = 4):
    """Floats rounded to ``digits`` decimals (percentages and scores do not need 17 digits)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, digits) for v in obj]
    return obj


def _common(device: Optional[str], batch_size: int, subset: Optional[int], json_out: Optional[Path] = None,
            fmt: Optional[str] = None) -> str:
    """Check the shared options before any work; returns the resolved device."""
    from lgm_lab.train import resolve_device

    _check_positive(batch_size, "--batch-size")
    _check_positive(subset, "--subset")
    _check_json_target(json_out)
    if fmt is not None:
        from lgm_lab.figures import FORMATS

        if fmt not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return resolve_device(device)


def _out_folder(out: Path) -> Path:
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; --out is always a folder")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the output folder {out}: {err.strerror or err}") from err
    return out


def _envelope(command: str, results, *, dataset: str, checkpoints, device: str, n: int, **extra) -> dict:
    return _round({"command": command, "dataset": dataset, "checkpoints": [str(c) for c in checkpoints],
                   "test_images": n, "device": device, **extra, "results": results})


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="a checkpoint.pt written by `lgm train`"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the run's)"),
    subset: Optional[int] = _subset_opt(),
    device: Optional[str] = _device_opt(),
    batch_size: int = _batch_opt(),
    json_out: Optional[Path] = _json_opt(),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for the confusion-matrix figure and the "
                                                           "training curves (default: no figures)"),
    fmt: str = _format_opt(),
    progress: bool = _progress_opt(),
) -> None:
    """Test error, confusion matrix (with class names) and the log-likelihood summary of a trained model.

    With --out, the confusion matrix and the run's training curves are also drawn as figures."""
    from lgm_lab.data import DatasetUnavailable, load_dataset
    from lgm_lab.train import CheckpointError, evaluate, load_trained

    try:
        dev = _common(device, batch_size, subset, json_out, fmt)
        if out is not None:
            _out_folder(out)
        model, head, cfg, ck = load_trained(checkpoint, dev)
        ds = load_dataset(cfg.dataset, False, data_dir=data_dir or cfg.data_dir, subset=subset, seed=cfg.seed)
    except (CheckpointError, DatasetUnavailable, ValueError) as err:
        _fail(err)
    with _bar(progress) as bar:
        task = bar.add_task(f"evaluating {checkpoint.parent.name}", total=len(ds))
        res = evaluate(model, head, ds, device=dev, batch_size=batch_size,
                       tick=lambda k: bar.update(task, advance=k))
    names = list(C.class_names(cfg.dataset))
    res.update(head=cfg.head, classes=names)
    t = Table(title=f"{cfg.head} head on {cfg.dataset} ({res['samples']} test images)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("test error", f"{res['error_percent']:.2f}%")
    for k, v in res.get("log_likelihood", {}).items():
        t.add_row(f"log-likelihood {k}", f"{v:.3f}")
    console.print(t)
    cm = Table(title="confusion matrix (rows: true class, columns: predicted class)")
    cm.add_column("true \\ predicted", no_wrap=True)
    for j in range(len(res["confusion"])):
        cm.add_column(f"{j} {names[j][:7]}" if j < len(names) else str(j), justify="right")
    for i, row in enumerate(res["confusion"]):
        cm.add_row(f"{i} {names[i]}" if i < len(names) else str(i), *map(str, row))
    console.print(cm)
    if out is not None:
        from lgm_lab.figures import confusion_figure, training_curves_figure

        figs = [confusion_figure(res["confusion"], names, out / "confusion", fmt=fmt,
                                 title=f"{cfg.head} head, {cfg.dataset}: error {res['error_percent']:.2f}%")]
        if ck.get("metrics"):
            figs.append(training_curves_figure({checkpoint.parent.name: ck["metrics"]}, out / "training_curves",
                                               fmt=fmt))
        console.print("figures: " + ", ".join(figs))
    _write_json(json_out, _envelope("eval", res, dataset=cfg.dataset, checkpoints=[checkpoint], device=dev,
                                    n=res["samples"]))


def _load_runs(checkpoints: list[Path], device: str = "cpu"):
    from lgm_lab.train import load_trained

    runs = {}
    for ck in checkpoints:
        model, head, cfg, _ = load_trained(ck, device)
        name = cfg.head if cfg.head != "lgm" else f"lgm-a{cfg.alpha:g}"
        runs[f"{name} ({ck.parent.name})" if name in {n.split(" ")[0] for n in runs} else name] = (model, head, cfg)
    return runs


def _test_tensors(cfg, subset: Optional[int], data_dir: Optional[Path], device: str = "cpu"):
    """The test images every command evaluates on: ``--subset`` picks the same seeded selection as
    ``lgm train --test-subset`` (the run's seed)."""
    from lgm_lab.data import load_dataset
    from lgm_lab.experiments import stack_dataset

    ds = load_dataset(cfg.dataset, False, data_dir=data_dir or cfg.data_dir, subset=subset, seed=cfg.seed)
    x, y = stack_dataset(ds)
    return x.to(device), y.to(device)


def _fail(err: Exception) -> None:
    """One line on stderr, exit status 2, no traceback."""
    if isinstance(err, OSError) and err.strerror:
        msg = f"{err.strerror}" + (f": {err.filename}" if err.filename else "")
    else:
        msg = " ".join(str(err).split()) or type(err).__name__
    from rich.markup import escape

    err_console.print(f"[red]error:[/red] {escape(msg)}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


def _check_eps(values: list[float], what: str = "--eps") -> list[float]:
    import math

    for e in values:
        if not (math.isfinite(e) and 0.0 <= e <= 1.0):
            raise ValueError(f"{what} must be finite and in [0, 1] (images are in [0, 1]), got {e}")
    return values


def _parse_eps(text: str) -> list[float]:
    try:
        values = [float(e) for e in text.split(",")]
    except ValueError:
        raise ValueError(f"--eps must be comma-separated numbers, e.g. 0,0.1,0.3; got {text!r}") from None
    return _check_eps(values)


def _check_positive(value: Optional[int], name: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def _check_json_target(path: Optional[Path]) -> None:
    """Refuse a --json target that cannot be written, before any work is done."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"--json {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"--json {path}: the folder {path.parent} does not exist")


def _write_json(path: Optional[Path], obj) -> None:
    if path is not None:
        try:
            path.write_text(json.dumps(obj, indent=2))
        except OSError as err:
            _fail(err)


def _check_device_arg(device: str) -> None:
    from lgm_lab.train import check_device

    check_device(device)


@app.command()
def attack(
    checkpoints: list[Path] = typer.Argument(..., help="checkpoint.pt files of trained models"),
    eps: str = typer.Option("0,0.1,0.2,0.3", help="FGSM magnitudes, comma-separated"),
    subset: Optional[int] = _subset_opt(),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the runs')"),
    device: Optional[str] = _device_opt(),
    batch_size: int = _batch_opt(),
    json_out: Optional[Path] = _json_opt(),
    progress: bool = _progress_opt(),
) -> None:
    """The L-GM paper's Table 6: test error under FGSM for each eps, beside the paper's values."""
    from lgm_lab.experiments import PAPER, fgsm_errors
    from lgm_lab.train import CheckpointError

    try:
        eps_list = _parse_eps(eps)
        dev = _common(device, batch_size, subset, json_out)
        runs = _load_runs(checkpoints, dev)
        cfg0 = next(iter(runs.values()))[2]
        x, y = _test_tensors(cfg0, subset, data_dir, dev)
    except (CheckpointError, RuntimeError, ValueError, OSError) as err:
        _fail(err)
    t = Table(title=f"test error (%) under FGSM ({len(x)} test images; paper: MNIST)")
    t.add_column("model")
    for e in eps_list:
        t.add_column(f"eps={e:g}", justify="right")
    out = {}
    with _bar(progress) as bar:
        task = bar.add_task("FGSM", total=len(runs) * len(eps_list) * len(x))
        for name, (model, head, _cfg) in runs.items():
            bar.update(task, description=f"FGSM on {name}")
            errs = fgsm_errors(model, head, x, y, eps_list, batch=batch_size,
                               tick=lambda k: bar.update(task, advance=k))
            out[name] = {str(e): v for e, v in errs.items()}
            paper = dict(zip([0.0, 0.1, 0.2, 0.3], PAPER["table6"].get(name.split(" ")[0], [])))
            t.add_row(name, *[f"{errs[e]:.2f}" + (f" (paper {paper[e]})" if e in paper else "") for e in eps_list])
    console.print(t)
    _write_json(json_out, _envelope("attack", out, dataset=cfg0.dataset, checkpoints=checkpoints, device=dev,
                                    n=len(x), eps=eps_list, measure="test error % under FGSM"))


@app.command()
def verify(
    checkpoints: list[Path] = typer.Argument(..., help="checkpoint.pt files (softmax, center, L-GM models)"),
    eps: float = typer.Option(0.3, help="FGSM magnitude"),
    targeted: bool = typer.Option(False, help="targeted FGSM towards the second most likely class"),
    subset: Optional[int] = _subset_opt(),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the runs')"),
    out: Path = typer.Option(Path("runs/verify"), help="folder for the histograms, ROC plot and results.json"),
    fmt: str = _format_opt(),
    device: Optional[str] = _device_opt(),
    batch_size: int = _batch_opt(),
    json_out: Optional[Path] = _json_opt(),
    progress: bool = _progress_opt(),
) -> None:
    """Adversarial verification (paper section 4.3): likelihood histograms, ROC curves and EER per model.

    Every score is measured: the head's default, identity covariance, distance, max posterior, mixture."""
    from lgm_lab.experiments import PAPER, _slim, verification, verification_figures
    from lgm_lab.train import CheckpointError

    try:
        _check_eps([eps])
        dev = _common(device, batch_size, subset, json_out, fmt)
        runs = _load_runs(checkpoints, dev)
        cfg0 = next(iter(runs.values()))[2]
        x, y = _test_tensors(cfg0, subset, data_dir, dev)
        _out_folder(out)
    except (CheckpointError, RuntimeError, ValueError, OSError) as err:
        _fail(err)
    results = {}
    with _bar(progress) as bar:
        task = bar.add_task("verification", total=len(runs) * len(x))
        for name, (model, head, _c) in runs.items():
            bar.update(task, description=f"{'targeted ' if targeted else ''}FGSM on {name}")
            results[name] = verification(model, head, x, y, eps=eps, targeted=targeted, batch=batch_size,
                                         tick=lambda k: bar.update(task, advance=k))
    figs = verification_figures(results, out, fmt)
    t = Table(title=f"adversarial verification, {'targeted ' if targeted else ''}FGSM eps={eps:g}")
    for c in ("model", "EER %", "paper EER %", "AUC", "error on adversarial %"):
        t.add_column(c, justify="right" if c != "model" else "left")
    for name, r in results.items():
        paper = PAPER["targeted"]["eer"] if targeted and name.startswith("lgm") else PAPER["eer"].get(name.split(" ")[0], "-")
        t.add_row(name, f"{r['eer_percent']:.1f}", str(paper), f"{r['roc']['auc']:.3f}", f"{r['adversarial_error_percent']:.2f}")
    console.print(t)
    payload = _envelope("verify", {n: _slim(r) for n, r in results.items()}, dataset=cfg0.dataset,
                        checkpoints=checkpoints, device=dev, n=len(x), eps=eps, targeted=targeted)
    _write_json(out / "results.json", payload)
    _write_json(json_out, payload)
    console.print("figures: " + ", ".join(figs))


@app.command()
def centers(
    model_a: Path = typer.Option(..., help="Model A: checkpoint trained with softmax + center loss"),
    model_b: Path = typer.Option(..., help="Model B: checkpoint trained with softmax only"),
    lgm: Optional[Path] = typer.Option(None, help="optionally an L-GM checkpoint (its learned means)"),
    subset: Optional[int] = _subset_opt(),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the runs')"),
    device: Optional[str] = _device_opt(),
    batch_size: int = _batch_opt(),
    json_out: Optional[Path] = _json_opt(),
    progress: bool = _progress_opt(),
) -> None:
    """The inverse-adversary report: class centers compared by cosine similarity and MSE, and its claims checked."""
    from lgm_lab.experiments import centers_report
    from lgm_lab.train import CheckpointError, load_trained

    try:
        dev = _common(device, batch_size, subset, json_out)
        paths = {"A": model_a, "B": model_b, **({"L-GM": lgm} if lgm else {})}
        loaded = {k: load_trained(p, dev) for k, p in paths.items()}
        models = {k: v[:2] for k, v in loaded.items()}
        cfg0 = loaded["A"][2]
        x, y = _test_tensors(cfg0, subset, data_dir, dev)
    except (CheckpointError, RuntimeError, ValueError, OSError) as err:
        _fail(err)
    with _bar(progress) as bar:
        task = bar.add_task("inverse adversaries", total=len(models) * len(x))
        rep = centers_report(models, x, y, batch=batch_size, num_classes=C.dataset_info(cfg0.dataset)["num_classes"],
                             tick=lambda k: bar.update(task, advance=k))
    for name, comps in rep.items():
        if name == "claims":
            continue
        t = Table(title=f"Model {name}")
        t.add_column("comparison")
        t.add_column("mean cosine", justify="right")
        t.add_column("mean MSE", justify="right")
        t.add_column("per-class cosine")
        for comp, v in comps.items():
            t.add_row(comp, f"{v['mean_cosine']:.4f}", f"{v['mean_mse']:.4g}", " ".join(f"{c:.2f}" for c in v["cosine"]))
        console.print(t)
    t = Table(title="the report's claims")
    for c in ("claim", "measured", "supported"):
        t.add_column(c)
    for c in rep["claims"]:
        t.add_row(c["claim"], c["measured"], "yes" if c["supported"] else "NO")
    console.print(t)
    _write_json(json_out, _envelope("centers", rep, dataset=cfg0.dataset, checkpoints=list(paths.values()),
                                    device=dev, n=len(x), models={k: str(p) for k, p in paths.items()}))


@app.command()
def embed(
    checkpoint: Path = typer.Argument(..., help="a checkpoint of a model with 2-D features"),
    out: Path = typer.Option(Path("runs/embed"), help="folder for embedding.<format>"),
    fmt: str = _format_opt(),
    points: int = typer.Option(5000, help="training images to plot"),
    fgsm: int = typer.Option(30, help="FGSM (eps 0.1) examples to mark on an L-GM likelihood map"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the run's)"),
    device: Optional[str] = _device_opt(),
    batch_size: int = _batch_opt(),
    progress: bool = _progress_opt(),
) -> None:
    """Paper Fig. 1: the 2-D feature embedding of the training set (legend: class names).

    For an L-GM head, also its likelihood map and FGSM examples."""
    from lgm_ext.attacks import FGSM
    from lgm_lab.data import DatasetUnavailable, load_dataset
    from lgm_lab.experiments import Classifier, _attack, embedding_figure, stack_dataset
    from lgm_lab.train import CheckpointError, load_trained

    try:
        dev = _common(device, batch_size, None, None, fmt)
        _check_positive(points, "--points")
        if out.suffix.lstrip(".").lower() in ("png", "pdf", "svg", "jpg", "jpeg"):
            raise ValueError(f"--out {out} looks like a file name; --out is a folder (the figure is "
                             f"embedding.<format> in it; --format picks the format)")
        if fgsm < 0:
            raise ValueError(f"--fgsm must be >= 0, got {fgsm}")
        _out_folder(out)
        model, head, cfg, _ = load_trained(checkpoint, dev)
        if cfg.feat_dim != 2:
            raise ValueError(f"{checkpoint} has {cfg.feat_dim}-D features; embed needs a model with --feat-dim 2")
        x, y = stack_dataset(load_dataset(cfg.dataset, True, data_dir=data_dir or cfg.data_dir, subset=points))
        x, y = x.to(dev), y.to(dev)
    except (CheckpointError, DatasetUnavailable, RuntimeError, ValueError) as err:
        _fail(err)
    with _bar(progress) as bar:
        n_adv = min(fgsm, len(x)) if cfg.head == "lgm" else 0
        task = bar.add_task("FGSM examples", total=n_adv + 1)
        adv = (_attack(FGSM(Classifier(model, head).eval(), eps=0.1), x[:n_adv], y[:n_adv], batch_size,
                       lambda k: bar.update(task, advance=k)) if n_adv else None)
        bar.update(task, description="features and figure")
        path = embedding_figure(model, head, x, y, out / "embedding", title=f"{cfg.head}, 2-D features ({cfg.dataset})",
                                adv=adv, max_points=points, class_names=C.class_names(cfg.dataset), fmt=fmt)
        bar.update(task, advance=1)
    console.print(f"wrote {path}")


@app.command()
def curves(
    runs: list[Path] = typer.Argument(..., help="run folders (or their checkpoint.pt / metrics.json)"),
    out: Path = typer.Option(Path("runs/curves"), help="folder for training_curves.<format>"),
    fmt: str = _format_opt(),
) -> None:
    """Training curves: the training loss and the test error per epoch of one or more runs (from metrics.json)."""
    from lgm_lab.figures import training_curves_figure

    try:
        _common("cpu", 1, None, None, fmt)
        data = {}
        for r in runs:
            folder = r if r.is_dir() else r.parent
            path = folder / "metrics.json"
            if not path.is_file():
                raise ValueError(f"{r}: no metrics.json (is it a run folder written by `lgm train`?)")
            try:
                hist = json.loads(path.read_text())
                need = ("epoch", "train_loss", "test_error_percent")
                if not isinstance(hist, list) or not hist or not all(
                        isinstance(h, dict) and all(k in h for k in need) for h in hist):
                    raise ValueError(f"not a list of per-epoch records with {', '.join(need)}")
            except (ValueError, OSError) as err:
                raise ValueError(f"{path}: unreadable metrics ({err})") from None
            data[folder.name if folder.name not in data else str(folder)] = hist
        _out_folder(out)
    except ValueError as err:
        _fail(err)
    console.print(f"wrote {training_curves_figure(data, out / 'training_curves', fmt=fmt)}")


@app.command()
def reproduce(
    preset: ReproducePreset = typer.Option("quick", help="quick (Fashion-MNIST subsets, about 10 min on 2 cores) | "
                                                         "standard (3 seeds, both feature layers; the committed "
                                                         "report) | paper (the paper's settings; MNIST when "
                                                         "available, else Fashion-MNIST)"),
    out: Path = typer.Option(Path("runs/reproduce"), help="output folder (finished checkpoints there are reused)"),
    fmt: str = _format_opt(),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder"),
    inverse: bool = typer.Option(False, "--inverse/--no-inverse",
                                 help="also train models A, B, C-class, C-instance (inverse-adversary centers, 3 "
                                      "seeds) and add that experiment to the report (lgm inverse-centers)"),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="show the progress bar (--no-progress for logs: one line per stage)"),
) -> None:
    """Train every head, then Table 1, Table 6, EERs, centers tables and figures, into OUT/report.md."""
    from lgm_lab.experiments import reproduce as run

    try:
        _common("cpu", 1, None, None, fmt)
        _out_folder(out)
    except ValueError as err:
        _fail(err)
    with _bar(progress) as bar:
        task = bar.add_task("reproduce", total=None)

        def on_stage(done: int, total: int, description: str) -> None:
            bar.update(task, completed=done, total=total, description=description)

        report = (lambda m: None) if progress else (lambda m: console.print(m, markup=False))
        try:
            res = run(out, preset=preset.value, data_dir=data_dir, progress=report, on_stage=on_stage, fmt=fmt,
                      inverse=inverse)
        except (RuntimeError, ValueError) as err:
            _fail(err)
        bar.update(task, completed=bar.tasks[0].total)
    console.print(f"done in {res['seconds'] / 60:.1f} min; report: {out / 'report.md'}")


@app.command("inverse-centers")
def inverse_centers(
    preset: ReproducePreset = typer.Option("quick", help="quick (2,000 images, 3 epochs, 3 seeds: ~45 min on 2 "
                                                         "cores) | standard | paper"),
    out: Path = typer.Option(Path("runs/inverse"), help="output folder (finished checkpoints there are reused)"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder"),
    json_out: Optional[Path] = _json_opt(),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="show the progress bar (--no-progress for logs: one line per stage)"),
) -> None:
    """Can inverse adversaries replace center-loss centers? Train A (center), B (softmax), C-class and C-instance
    (inverse-adversary centers) for 3 seeds; error, FGSM, EER, compactness, centers, cost; OUT/inverse.md."""
    from lgm_lab.inverse_experiment import inverse_experiment

    try:
        _common("cpu", 1, None, json_out)
        _out_folder(out)
    except ValueError as err:
        _fail(err)
    with _bar(progress) as bar:
        task = bar.add_task("inverse-adversary centers", total=None)
        report = (lambda m: None) if progress else (lambda m: console.print(m, markup=False))
        try:
            res = inverse_experiment(out, preset=preset.value, data_dir=data_dir, progress=report,
                                     on_stage=lambda d, t, what: bar.update(task, completed=d, total=t, description=what))
        except (RuntimeError, ValueError) as err:
            _fail(err)
        bar.update(task, completed=bar.tasks[0].total)
    t = Table(title=f"inverse-adversary centers ({preset.value}, {len(res['seeds'])} seeds; mean ± std)")
    for c in ("model", "clean error %", "EER %", "compactness", "s/epoch"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for m, sm in res["summary"].items():
        t.add_row(m, *(f"{sm[k][0]:.{d}f} ± {sm[k][1]:.{d}f}" for k, d in
                       (("error", 2), ("eer", 1), ("compactness", 3), ("seconds_per_epoch", 0))))
    console.print(t)
    for v in res["verdict"]:
        console.print(f"{v['model']}: accuracy {v['accuracy']}, compactness {v['compactness']}, EER {v['eer']}, "
                      f"cost {v['cost_ratio']:.1f}x A -> substitutes: {'yes' if v['substitutes'] else 'no'}",
                      markup=False)
    console.print(f"report: {out / 'inverse.md'}")
    _write_json(json_out, _round({"command": "inverse-centers", "dataset": res["dataset"], "preset": preset.value,
                                  "results": {k: res[k] for k in ("summary", "verdict", "runs")}}))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

