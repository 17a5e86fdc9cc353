"""`lgm embed` (paper Fig. 1) and `lgm curves` (training curves of runs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from lgm_lab import config

from .options import (
    batch_opt,
    check_common,
    check_positive,
    console,
    device_opt,
    fail,
    format_opt,
    out_folder,
    progress_bar,
    progress_opt,
)


def embed(
    checkpoint: Path = typer.Argument(..., help="a checkpoint of a model with 2-D features"),
    out: Path = typer.Option(Path("runs/embed"), help="folder for embedding.<format>"),
    fmt: str = format_opt(),
    points: int = typer.Option(5000, help="training images to plot"),
    fgsm: int = typer.Option(30, help="FGSM (eps 0.1) examples to mark on an L-GM likelihood map"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the run's)"),
    device: Optional[str] = device_opt(),
    batch_size: int = batch_opt(),
    progress: bool = progress_opt(),
) -> None:
    """The paper's Figure 1: the 2-D feature embedding of the training set (legend: class names).

    For an L-GM head, also its likelihood map and FGSM examples."""
    from lgm_ext import Classifier
    from lgm_ext.attacks import FGSM
    from lgm_lab.checkpoints import CheckpointError, load_trained
    from lgm_lab.data import DatasetUnavailable, load_dataset
    from lgm_lab.experiments.measure import attack_in_batches
    from lgm_lab.figures import embedding_figure
    from lgm_lab.tensors import stack_dataset

    try:
        dev = check_common(device, batch_size, None, None, fmt)
        check_positive(points, "--points")
        if out.suffix.lstrip(".").lower() in ("png", "pdf", "svg", "jpg", "jpeg"):
            raise ValueError(f"--out {out} looks like a file name; --out is a folder (the figure is "
                             f"embedding.<format> in it; --format picks the format)")
        if fgsm < 0:
            raise ValueError(f"--fgsm must be >= 0, got {fgsm}")
        out_folder(out)
        model, head, cfg, _ = load_trained(checkpoint, dev)
        if cfg.feat_dim != 2:
            raise ValueError(f"{checkpoint} has {cfg.feat_dim}-D features; embed needs a model with --feat-dim 2")
        x, y = stack_dataset(load_dataset(cfg.dataset, True, data_dir=data_dir or cfg.data_dir, subset=points))
        x, y = x.to(dev), y.to(dev)
    except (CheckpointError, DatasetUnavailable, RuntimeError, ValueError) as err:
        fail(err)
    with progress_bar(progress) as bar:
        n_adv = min(fgsm, len(x)) if head.density_map else 0
        task = bar.add_task("FGSM examples", total=n_adv + 1)
        adv = (attack_in_batches(FGSM(Classifier(model, head).eval(), eps=0.1), x[:n_adv], y[:n_adv], batch_size,
                                 lambda k: bar.update(task, advance=k)) if n_adv else None)
        bar.update(task, description="features and figure")
        path = embedding_figure(model, head, x, y, out / "embedding", title=f"{cfg.head}, 2-D features ({cfg.dataset})",
                                adv=adv, max_points=points, class_names=config.class_names(cfg.dataset), fmt=fmt)
        bar.update(task, advance=1)
    console.print(f"wrote {path}")


def curves(
    runs: list[Path] = typer.Argument(..., help="run folders (or their checkpoint.pt / metrics.json)"),
    out: Path = typer.Option(Path("runs/curves"), help="folder for training_curves.<format>"),
    fmt: str = format_opt(),
) -> None:
    """Training curves: the training loss and the test error per epoch of one or more runs (from metrics.json)."""
    from lgm_lab.figures import training_curves_figure

    try:
        check_common("cpu", 1, None, None, fmt)
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
        out_folder(out)
    except ValueError as err:
        fail(err)
    console.print(f"wrote {training_curves_figure(data, out / 'training_curves', fmt=fmt)}")
