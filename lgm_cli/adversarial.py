"""The adversarial commands: `lgm attack` (Table 6), `lgm verify` (section 4.3), `lgm centers` (the
inverse-adversary report's centers)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lgm_lab import config

from .options import (
    batch_opt,
    check_common,
    check_eps,
    check_same_data,
    console,
    device_opt,
    envelope,
    eval_tensors,
    fail,
    format_opt,
    json_opt,
    load_runs,
    out_folder,
    parse_eps,
    progress_bar,
    progress_opt,
    subset_opt,
    write_json,
)


def attack(
    checkpoints: list[Path] = typer.Argument(..., help="checkpoint.pt files of trained models"),
    eps: str = typer.Option("0,0.1,0.2,0.3", help="FGSM magnitudes, comma-separated"),
    subset: Optional[int] = subset_opt(),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the runs')"),
    device: Optional[str] = device_opt(),
    batch_size: int = batch_opt(),
    json_out: Optional[Path] = json_opt(),
    progress: bool = progress_opt(),
) -> None:
    """The L-GM paper's Table 6: test error under FGSM for each eps, beside the paper's values."""
    from lgm_lab.checkpoints import CheckpointError
    from lgm_lab.experiments.measure import fgsm_errors
    from lgm_lab.experiments.paper import PAPER

    try:
        eps_list = parse_eps(eps)
        dev = check_common(device, batch_size, subset, json_out, inputs=checkpoints)
        runs = load_runs(checkpoints, dev)
        cfg0 = next(iter(runs.values()))[2]
        x, y = eval_tensors(cfg0, subset, data_dir, dev)
    except (CheckpointError, RuntimeError, ValueError, OSError) as err:
        fail(err)
    t = Table(title=f"test error (%) under FGSM ({len(x)} test images; paper: MNIST)")
    t.add_column("model")
    for e in eps_list:
        t.add_column(f"eps={e:g}", justify="right")
    out = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("FGSM", total=len(runs) * len(eps_list) * len(x))
        for name, (model, head, _cfg) in runs.items():
            bar.update(task, description=f"FGSM on {name}")
            errs = fgsm_errors(model, head, x, y, eps_list, batch=batch_size,
                               tick=lambda k: bar.update(task, advance=k))
            out[name] = {str(e): v for e, v in errs.items()}
            paper = dict(zip([0.0, 0.1, 0.2, 0.3], PAPER["table6"].get(name.split(" ")[0], [])))
            t.add_row(name, *[f"{errs[e]:.2f}" + (f" (paper {paper[e]})" if e in paper else "") for e in eps_list])
    console.print(t)
    write_json(json_out, envelope("attack", out, dataset=cfg0.dataset, checkpoints=checkpoints, device=dev,
                                  n=len(x), eps=eps_list, measure="test error % under FGSM"))


def verify(
    checkpoints: list[Path] = typer.Argument(..., help="checkpoint.pt files (softmax, center, L-GM models)"),
    eps: float = typer.Option(0.3, help="FGSM magnitude"),
    targeted: bool = typer.Option(False, help="targeted FGSM towards the second most likely class"),
    subset: Optional[int] = subset_opt(),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the runs')"),
    out: Path = typer.Option(Path("runs/verify"), help="folder for the histograms, ROC plot and results.json"),
    fmt: str = format_opt(),
    device: Optional[str] = device_opt(),
    batch_size: int = batch_opt(),
    json_out: Optional[Path] = json_opt(),
    progress: bool = progress_opt(),
) -> None:
    """Adversarial verification (paper section 4.3): likelihood histograms, ROC curves and EER per model.

    Every score is measured: the head's default, identity covariance, distance, max posterior, mixture."""
    from lgm_lab.checkpoints import CheckpointError
    from lgm_lab.experiments.measure import summarize_verification, verification
    from lgm_lab.experiments.paper import PAPER
    from lgm_lab.figures import verification_figures

    try:
        check_eps([eps])
        dev = check_common(device, batch_size, subset, json_out, fmt, inputs=checkpoints)
        runs = load_runs(checkpoints, dev)
        cfg0 = next(iter(runs.values()))[2]
        x, y = eval_tensors(cfg0, subset, data_dir, dev)
        out_folder(out)
    except (CheckpointError, RuntimeError, ValueError, OSError) as err:
        fail(err)
    results = {}
    with progress_bar(progress) as bar:
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
        density = runs[name][1].density_map
        paper = PAPER["targeted"]["eer"] if targeted and density else PAPER["eer"].get(name.split(" ")[0], "-")
        t.add_row(name, f"{r['eer_percent']:.1f}", str(paper), f"{r['roc']['auc']:.3f}",
                  f"{r['adversarial_error_percent']:.2f}")
    console.print(t)
    payload = envelope("verify", {n: summarize_verification(r) for n, r in results.items()}, dataset=cfg0.dataset,
                       checkpoints=checkpoints, device=dev, n=len(x), eps=eps, targeted=targeted)
    write_json(out / "results.json", payload)
    write_json(json_out, payload)
    console.print("figures: " + ", ".join(figs))


def centers(
    model_a: Path = typer.Option(..., help="Model A: checkpoint trained with softmax + center loss"),
    model_b: Path = typer.Option(..., help="Model B: checkpoint trained with softmax only"),
    lgm: Optional[Path] = typer.Option(None, help="optionally an L-GM checkpoint (its learned means)"),
    subset: Optional[int] = subset_opt(),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the runs')"),
    device: Optional[str] = device_opt(),
    batch_size: int = batch_opt(),
    json_out: Optional[Path] = json_opt(),
    progress: bool = progress_opt(),
) -> None:
    """The inverse-adversary report: class centers compared by cosine similarity and MSE, and its claims checked."""
    from lgm_lab.checkpoints import CheckpointError, load_trained
    from lgm_lab.experiments.centers import CENTERS_ROLES, centers_report

    try:
        paths = {"A": model_a, "B": model_b, **({"L-GM": lgm} if lgm else {})}
        dev = check_common(device, batch_size, subset, json_out, inputs=list(paths.values()))
        resolved = [p.resolve() for p in paths.values()]
        if len(set(resolved)) < len(resolved):
            raise ValueError("--model-a, --model-b and --lgm must be three different checkpoints")
        loaded = {k: load_trained(p, dev) for k, p in paths.items()}
        options = {"A": "--model-a", "B": "--model-b", "L-GM": "--lgm"}
        for role, t in loaded.items():
            if t.head.kind != CENTERS_ROLES[role]:
                raise ValueError(f"{options[role]} {paths[role]} has a {t.head.kind} head; the report's model "
                                 f"{role} is a {CENTERS_ROLES[role]} model")
        check_same_data({paths[k]: t.config for k, t in loaded.items()})
        models = {k: v[:2] for k, v in loaded.items()}
        cfg0 = loaded["A"][2]
        x, y = eval_tensors(cfg0, subset, data_dir, dev)
    except (CheckpointError, RuntimeError, ValueError, OSError) as err:
        fail(err)
    with progress_bar(progress) as bar:
        task = bar.add_task("inverse adversaries", total=len(models) * len(x))
        rep = centers_report(models, x, y, batch=batch_size,
                             num_classes=config.dataset_info(cfg0.dataset)["num_classes"],
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
            t.add_row(comp, f"{v['mean_cosine']:.4f}", f"{v['mean_mse']:.4g}",
                      " ".join(f"{c:.2f}" for c in v["cosine"]))
        console.print(t)
    t = Table(title="the report's claims")
    for c in ("claim", "measured", "supported"):
        t.add_column(c)
    for c in rep["claims"]:
        t.add_row(c["claim"], c["measured"], "yes" if c["supported"] else "NO")
    console.print(t)
    write_json(json_out, envelope("centers", rep, dataset=cfg0.dataset, checkpoints=list(paths.values()),
                                  device=dev, n=len(x), models={k: str(p) for k, p in paths.items()}))
