"""The `lgm` command line.  Each command is a thin layer over a library function."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="lgm-ext: fused L-GM loss and attack operators for PyTorch; training and evaluation of softmax, center-loss and L-GM heads.", no_args_is_help=True)
console = Console()


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
) -> None:
    """Time the fused L-GM loss (forward+backward) against plain-PyTorch versions."""
    from lgm_ext import bench as B

    pairs = B.LGM_SIZES if not sizes else [tuple(int(v) for v in s.split(":")) for s in sizes.split(",")]
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as prog:
        task = prog.add_task("benchmark", total=None)
        rows = B.bench_lgm(
            pairs, n=n, device=device, repeats=repeats, memory=memory,
            progress=lambda m: prog.update(task, description=m),
        )
    console.print(f"Machine: {B.machine_description(device)}")
    console.print(B.lgm_markdown(rows, n), markup=False)
    if json_out:
        json_out.write_text(B.to_json(rows))


def _d(name: str) -> str:
    from lgm_ext.train import TrainConfig

    return f"(default: {getattr(TrainConfig, name)}, or the preset's)"


@app.command("train")
def train_cmd(
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="run folder: checkpoint.pt, metrics.json, config.json"),
    preset: Optional[str] = typer.Option(None, help="quick (a few minutes on 2 cores) | report (the inverse-adversary "
                                         "report's recipe) | paper (L-GM paper's LeNet++ setting); explicit options win"),
    dataset: Optional[str] = typer.Option(None, help=f"fashion-mnist | mnist | cifar10 {_d('dataset')}"),
    data_dir: Optional[Path] = typer.Option(None, help="folder with the dataset files (else ~/.cache/lgm-ext/data; "
                                            "Fashion-MNIST also from /usr/share/datasets/fashion-mnist)"),
    subset: Optional[int] = typer.Option(None, help="use N training images (seeded choice) (default: all)"),
    test_subset: Optional[int] = typer.Option(None, help="use N test images (default: all)"),
    model: Optional[str] = typer.Option(None, help=f"lenetpp | resnet20 | resnet56 | resnet110 {_d('model')}"),
    feat_dim: Optional[int] = typer.Option(None, help=f"feature dimension (2 for plots, 100 for accuracy) {_d('feat_dim')}"),
    head: Optional[str] = typer.Option(None, help=f"softmax | center | lgm {_d('head')}"),
    alpha: Optional[float] = typer.Option(None, help=f"L-GM margin {_d('alpha')}"),
    lambda_: Optional[float] = typer.Option(None, "--lambda", help=f"L-GM likelihood weight {_d('lambda_')}"),
    covariance: Optional[str] = typer.Option(None, help=f"L-GM covariance: diag | identity {_d('covariance')}"),
    lambda_c: Optional[float] = typer.Option(None, help=f"center-loss weight {_d('lambda_c')}"),
    center_alpha: Optional[float] = typer.Option(None, help=f"center update rate (Wen et al. Eq. 4) {_d('center_alpha')}"),
    warmup_epochs: Optional[float] = typer.Option(None, help=f"L-GM: ramp alpha and lambda from 0 over these epochs {_d('warmup_epochs')}"),
    epochs: Optional[int] = typer.Option(None, help=f"epochs {_d('epochs')}"),
    batch_size: Optional[int] = typer.Option(None, help=f"batch size {_d('batch_size')}"),
    lr: Optional[float] = typer.Option(None, help=f"(peak) learning rate {_d('lr')}"),
    momentum: Optional[float] = typer.Option(None, help=f"SGD momentum {_d('momentum')}"),
    nesterov: Optional[bool] = typer.Option(None, "--nesterov/--no-nesterov", help=f"Nesterov momentum {_d('nesterov')}"),
    weight_decay: Optional[float] = typer.Option(None, help=f"weight decay {_d('weight_decay')}"),
    schedule: Optional[str] = typer.Option(None, help=f"cyclic (one cycle to the peak lr) | step | constant {_d('schedule')}"),
    seed: Optional[int] = typer.Option(None, help=f"random seed {_d('seed')}"),
    device: Optional[str] = typer.Option(None, help=f"cpu | cuda {_d('device')}"),
    resume: bool = typer.Option(False, help="continue the run in --out from its last completed epoch"),
    progress: bool = typer.Option(True, help="show progress bars"),
) -> None:
    """Train a feature model with a softmax, center-loss or L-GM head; checkpoint every epoch."""
    from lgm_ext.data import DatasetUnavailable
    from lgm_ext.train import CheckpointError, TrainingDiverged, config_from_preset, train

    try:
        cfg = config_from_preset(
            preset, dataset=dataset, data_dir=str(data_dir) if data_dir else None, subset=subset,
            test_subset=test_subset, model=model, feat_dim=feat_dim, head=head, alpha=alpha, lambda_=lambda_,
            covariance=covariance, lambda_c=lambda_c, center_alpha=center_alpha, warmup_epochs=warmup_epochs,
            epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, nesterov=nesterov,
            weight_decay=weight_decay, schedule=schedule, seed=seed, device=device,
        )
        result = train(cfg, out, resume=resume, progress=progress)
    except (ValueError, DatasetUnavailable, CheckpointError, TrainingDiverged) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2)
    last = result.metrics[-1]
    console.print(f"{cfg.head} head, {result.epochs_done} epochs: test error {last['test_error_percent']:.2f}% "
                  f"({last['train_images_per_second']:.0f} training images/s); run in {result.out_dir}")


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="a checkpoint.pt written by `lgm train`"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the run's)"),
    subset: Optional[int] = typer.Option(None, help="evaluate on N test images (default: the run's test subset)"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results as JSON here"),
) -> None:
    """Test error, confusion matrix and (L-GM / center heads) the log-likelihood summary of a trained model."""
    from lgm_ext.data import DatasetUnavailable, load_dataset
    from lgm_ext.train import CheckpointError, evaluate, load_trained

    try:
        model, head, cfg, _ck = load_trained(checkpoint, device)
        ds = load_dataset(cfg.dataset, False, data_dir=data_dir or cfg.data_dir,
                          subset=subset if subset is not None else cfg.test_subset, seed=cfg.seed)
    except (CheckpointError, DatasetUnavailable) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2)
    res = evaluate(model, head, ds, device=device)
    res.update(dataset=cfg.dataset, head=cfg.head, checkpoint=str(checkpoint))
    t = Table(title=f"{cfg.head} head on {cfg.dataset} ({res['samples']} test images)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("test error", f"{res['error_percent']:.2f}%")
    for k, v in res.get("log_likelihood", {}).items():
        t.add_row(f"log-likelihood {k}", f"{v:.3f}")
    console.print(t)
    cm = Table(title="confusion matrix (rows: true class, columns: predicted)")
    cm.add_column("")
    for j in range(len(res["confusion"])):
        cm.add_column(str(j), justify="right")
    for i, row in enumerate(res["confusion"]):
        cm.add_row(str(i), *map(str, row))
    console.print(cm)
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

