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


def _load_runs(checkpoints: list[Path]):
    from lgm_ext.train import load_trained

    runs = {}
    for ck in checkpoints:
        model, head, cfg, _ = load_trained(ck)
        name = cfg.head if cfg.head != "lgm" else f"lgm-a{cfg.alpha:g}"
        runs[f"{name} ({ck.parent.name})" if name in {n.split(" ")[0] for n in runs} else name] = (model, head, cfg)
    return runs


def _test_tensors(cfg, subset: Optional[int], data_dir: Optional[Path]):
    from lgm_ext.data import load_dataset
    from lgm_ext.experiments import stack_dataset

    ds = load_dataset(cfg.dataset, False, data_dir=data_dir or cfg.data_dir, subset=subset, seed=cfg.seed)
    return stack_dataset(ds)


def _fail(err: Exception) -> None:
    console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(2)


@app.command()
def attack(
    checkpoints: list[Path] = typer.Argument(..., help="checkpoint.pt files of trained models"),
    eps: str = typer.Option("0,0.1,0.2,0.3", help="FGSM magnitudes, comma-separated"),
    subset: Optional[int] = typer.Option(None, help="attack N test images (default: the whole test set)"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the runs')"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results as JSON here"),
) -> None:
    """The L-GM paper's Table 6: test error under FGSM for each eps, beside the paper's values."""
    from lgm_ext.experiments import PAPER, fgsm_errors
    from lgm_ext.train import CheckpointError

    eps_list = [float(e) for e in eps.split(",")]
    try:
        runs = _load_runs(checkpoints)
        x, y = _test_tensors(next(iter(runs.values()))[2], subset, data_dir)
    except (CheckpointError, RuntimeError, ValueError) as err:
        _fail(err)
    t = Table(title=f"test error (%) under FGSM ({len(x)} test images; paper: MNIST)")
    t.add_column("model")
    for e in eps_list:
        t.add_column(f"eps={e:g}", justify="right")
    out = {}
    for name, (model, head, _cfg) in runs.items():
        errs = fgsm_errors(model, head, x, y, eps_list)
        out[name] = errs
        paper = dict(zip([0.0, 0.1, 0.2, 0.3], PAPER["table6"].get(name.split(" ")[0], [])))
        t.add_row(name, *[f"{errs[e]:.2f}" + (f" (paper {paper[e]})" if e in paper else "") for e in eps_list])
    console.print(t)
    if json_out:
        json_out.write_text(json.dumps(out, indent=2))


@app.command()
def verify(
    checkpoints: list[Path] = typer.Argument(..., help="checkpoint.pt files (softmax, center, L-GM models)"),
    eps: float = typer.Option(0.3, help="FGSM magnitude"),
    targeted: bool = typer.Option(False, help="targeted FGSM towards the second most likely class"),
    subset: Optional[int] = typer.Option(None, help="use N test images (default: all)"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the runs')"),
    out: Path = typer.Option(Path("runs/verify"), help="folder for the histograms, ROC plot and results.json"),
) -> None:
    """Adversarial verification (paper section 4.3): likelihood histograms, ROC curves and EER per model."""
    from lgm_ext.experiments import PAPER, verification, verification_figures
    from lgm_ext.train import CheckpointError

    try:
        runs = _load_runs(checkpoints)
        x, y = _test_tensors(next(iter(runs.values()))[2], subset, data_dir)
    except (CheckpointError, RuntimeError, ValueError) as err:
        _fail(err)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: verification(model, head, x, y, eps=eps, targeted=targeted)
               for name, (model, head, _c) in runs.items()}
    figs = verification_figures(results, out)
    t = Table(title=f"adversarial verification, {'targeted ' if targeted else ''}FGSM eps={eps:g}")
    for c in ("model", "EER %", "paper EER %", "AUC", "error on adversarial %"):
        t.add_column(c, justify="right" if c != "model" else "left")
    for name, r in results.items():
        paper = PAPER["targeted"]["eer"] if targeted and name.startswith("lgm") else PAPER["eer"].get(name.split(" ")[0], "-")
        t.add_row(name, f"{r['eer_percent']:.1f}", str(paper), f"{r['roc']['auc']:.3f}", f"{r['adversarial_error_percent']:.2f}")
    console.print(t)
    slim = {n: {k: v for k, v in r.items() if k not in ("scores_normal", "scores_adversarial", "roc")} | {"auc": r["roc"]["auc"]}
            for n, r in results.items()}
    (out / "results.json").write_text(json.dumps(slim, indent=2))
    console.print("figures: " + ", ".join(figs))


@app.command()
def centers(
    model_a: Path = typer.Option(..., help="Model A: checkpoint trained with softmax + center loss"),
    model_b: Path = typer.Option(..., help="Model B: checkpoint trained with softmax only"),
    lgm: Optional[Path] = typer.Option(None, help="optionally an L-GM checkpoint (its learned means)"),
    subset: Optional[int] = typer.Option(None, help="use N test images (default: all)"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the runs')"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results as JSON here"),
) -> None:
    """The inverse-adversary report: class centers compared by cosine similarity and MSE, and its claims checked."""
    from lgm_ext.experiments import centers_report
    from lgm_ext.train import CheckpointError, load_trained

    try:
        models = {"A": load_trained(model_a)[:2], "B": load_trained(model_b)[:2]}
        if lgm:
            models["L-GM"] = load_trained(lgm)[:2]
        x, y = _test_tensors(load_trained(model_a)[2], subset, data_dir)
    except (CheckpointError, RuntimeError, ValueError) as err:
        _fail(err)
    rep = centers_report(models, x, y)
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
    if json_out:
        json_out.write_text(json.dumps(rep, indent=2))


@app.command()
def embed(
    checkpoint: Path = typer.Argument(..., help="a checkpoint of a model with 2-D features"),
    out: Path = typer.Option(Path("embedding.png"), help="PNG file to write"),
    points: int = typer.Option(5000, help="training images to plot"),
    fgsm: int = typer.Option(30, help="FGSM (eps 0.1) examples to mark on an L-GM likelihood map"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the run's)"),
) -> None:
    """Paper Fig. 1: the 2-D feature embedding of the training set; for L-GM, the likelihood map."""
    from lgm_ext.attacks import FGSM
    from lgm_ext.data import load_dataset
    from lgm_ext.experiments import Classifier, embedding_figure, stack_dataset
    from lgm_ext.train import CheckpointError, load_trained

    try:
        model, head, cfg, _ = load_trained(checkpoint)
        x, y = stack_dataset(load_dataset(cfg.dataset, True, data_dir=data_dir or cfg.data_dir, subset=points))
        adv = FGSM(Classifier(model, head).eval(), eps=0.1)(x[:fgsm], y[:fgsm]) if cfg.head == "lgm" and fgsm else None
        path = embedding_figure(model, head, x, y, out, title=f"{cfg.head}, 2-D features", adv=adv)
    except (CheckpointError, RuntimeError, ValueError) as err:
        _fail(err)
    console.print(f"wrote {path}")


@app.command()
def reproduce(
    preset: str = typer.Option("quick", help="quick (Fashion-MNIST subsets, <= 10 min on 2 cores) | paper (the "
                                             "paper's settings; MNIST when available, else Fashion-MNIST)"),
    out: Path = typer.Option(Path("runs/reproduce"), help="output folder (finished checkpoints there are reused)"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder"),
) -> None:
    """Train every head, then Table 1, Table 6, EERs, centers tables and figures, into OUT/report.md."""
    from lgm_ext.experiments import reproduce as run

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as prog:
        task = prog.add_task("reproduce", total=None)
        try:
            res = run(out, preset=preset, data_dir=data_dir, progress=lambda m: prog.update(task, description=m))
        except (RuntimeError, ValueError) as err:
            _fail(err)
    console.print(f"done in {res['seconds'] / 60:.1f} min; report: {out / 'report.md'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

