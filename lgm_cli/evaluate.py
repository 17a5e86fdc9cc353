"""`lgm eval`: test error, confusion matrix and log-likelihood summary of a trained model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lgm_lab import config

from .options import (
    batch_opt,
    check_common,
    console,
    device_opt,
    envelope,
    fail,
    format_opt,
    json_opt,
    out_folder,
    progress_bar,
    progress_opt,
    subset_opt,
    write_json,
)


def eval_command(
    checkpoint: Path = typer.Argument(..., help="a checkpoint.pt written by `lgm train`"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the run's)"),
    subset: Optional[int] = subset_opt(),
    device: Optional[str] = device_opt(),
    batch_size: int = batch_opt(),
    json_out: Optional[Path] = json_opt(),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for the confusion-matrix figure and the "
                                                           "training curves (default: no figures)"),
    fmt: str = format_opt(),
    progress: bool = progress_opt(),
) -> None:
    """Test error, confusion matrix (with class names) and the log-likelihood summary of a trained model.

    With --out, the confusion matrix and the run's training curves are also drawn as figures."""
    from lgm_lab.checkpoints import CheckpointError, load_trained
    from lgm_lab.data import DatasetUnavailable, load_dataset
    from lgm_lab.evaluation import evaluate
    from lgm_lab.ood_data import restrict_classes

    try:
        dev = check_common(device, batch_size, subset, json_out, fmt, inputs=[checkpoint])
        if out is not None:
            out_folder(out)
        model, head, cfg, ck = load_trained(checkpoint, dev)
        ds = load_dataset(cfg.dataset, False, data_dir=data_dir or cfg.data_dir, subset=subset, seed=cfg.seed)
        ds = restrict_classes(ds, cfg.class_list)  # a run trained on some classes (--classes)
    except (CheckpointError, DatasetUnavailable, ValueError) as err:
        fail(err)
    with progress_bar(progress) as bar:
        task = bar.add_task(f"evaluating {checkpoint.parent.name}", total=len(ds))
        res = evaluate(model, head, ds, device=dev, batch_size=batch_size,
                       tick=lambda k: bar.update(task, advance=k))
    names = list(config.class_names(cfg.dataset))
    names = [names[c] for c in cfg.class_list] if cfg.class_list else names
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
    write_json(json_out, envelope("eval", res, dataset=cfg.dataset, checkpoints=[checkpoint], device=dev,
                                  n=res["samples"]))
