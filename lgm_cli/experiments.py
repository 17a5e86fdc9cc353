"""The experiment commands: `lgm reproduce` (every claim into a report) and `lgm inverse-centers`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lgm_lab import config

from .options import (
    check_common,
    choices,
    console,
    fail,
    format_opt,
    json_opt,
    out_folder,
    parse_seeds,
    progress_bar,
    round_floats,
    write_json,
)

ReproducePreset = choices("ReproducePreset", config.REPRODUCE_PRESETS)
AttackProtocol = choices("AttackProtocol", config.ATTACK_PROTOCOL_CHOICES)


def _stage_reporter(progress: bool):
    """Stage lines for logs (--no-progress); nothing when the bar shows them."""
    return (lambda m: None) if progress else (lambda m: console.print(m, markup=False))


def reproduce(
    preset: ReproducePreset = typer.Option("quick", help="quick (3 heads, 256 SGD steps each, one seed; ~10 min on "
                                                         "2 cores) | "
                                                         "standard (3 heads, 1,024 SGD steps each, 3 seeds; the "
                                                         "committed report) | paper (the paper's settings; MNIST when "
                                                         "available, else Fashion-MNIST)"),
    out: Path = typer.Option(Path("runs/reproduce"), help="output folder (finished checkpoints there are reused)"),
    fmt: str = format_opt(),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder"),
    inverse: bool = typer.Option(False, "--inverse/--no-inverse",
                                 help="also train models A, B, C-class, C-instance (inverse-adversary centers, 3 "
                                      "seeds) and add that experiment to the report (lgm inverse-centers)"),
    detection: bool = typer.Option(False, "--detection/--no-detection",
                                   help="also train softmax, center and L-GM networks (all classes and classes "
                                        "0-4, 3 seeds; the report's own networks are measured where their "
                                        "configs are the same) and add the out-of-distribution and adversarial "
                                        "detection experiment to the report (lgm ood measures given checkpoints)"),
    attack_protocol: Optional[AttackProtocol] = typer.Option(
        None, help="with --detection: the adaptive attack's full protocol of this preset instead of --preset's "
                   "(quick: 20 images of one seed, eps 0.03 and 0.1, 2 restarts of 50 steps, 2 step sizes, "
                   "multi-targeted; standard: 200 images of 3 seeds, eps 0.03, 0.1 and 0.3, 10 restarts of 100 "
                   "steps, 3 step sizes, multi-targeted, 1,000 steps on 100: a GPU's work | none: not run). "
                   "The standard budget with --attack-protocol quick is what 2 cores can measure"),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="show the progress bar (--no-progress for logs: one line per stage)"),
) -> None:
    """Train every head, then Table 1, Table 6, EERs, centers tables and figures, into OUT/report.md."""
    from lgm_lab.experiments.reproduce import reproduce as run

    try:
        check_common("cpu", 1, None, None, fmt)
        if attack_protocol is not None and not detection:
            raise ValueError("--attack-protocol is a setting of the detection experiment: give --detection too")
        out_folder(out)
    except ValueError as err:
        fail(err)
    with progress_bar(progress) as bar:
        task = bar.add_task("reproduce", total=None)

        def on_stage(done: int, total: int, description: str) -> None:
            bar.update(task, completed=done, total=total, description=description)

        try:
            res = run(out, preset=preset.value, data_dir=data_dir, progress=_stage_reporter(progress),
                      on_stage=on_stage, fmt=fmt, inverse=inverse, detection=detection,
                      attack_protocol=None if attack_protocol is None else attack_protocol.value)
        except (RuntimeError, ValueError, OSError) as err:
            fail(err)
        bar.update(task, completed=bar.tasks[0].total)
    console.print(f"done in {res['seconds'] / 60:.1f} min; report: {out / 'report.md'}")


def inverse_centers(
    preset: ReproducePreset = typer.Option("quick", help="quick (256 SGD steps of batch 128, 3 seeds: ~1.5 h on 2 "
                                                         "cores) | standard (1,024 steps) | paper"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (default: the preset's 0,1,2)"),
    out: Path = typer.Option(Path("runs/inverse"), help="output folder (finished checkpoints there are reused)"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder"),
    json_out: Optional[Path] = json_opt(),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="show the progress bar (--no-progress for logs: one line per stage)"),
) -> None:
    """Can inverse adversaries replace center-loss centers? Train A (center), B (softmax), C-class and C-instance
    (inverse-adversary centers) for 3 seeds; error, FGSM, EER, compactness, centers, cost; OUT/inverse.md."""
    from lgm_lab.experiments.inverse import inverse_experiment, substitutes_text

    try:
        seed_list = None if seeds is None else parse_seeds(seeds, "--seeds")
        check_common("cpu", 1, None, json_out)
        out_folder(out)
    except ValueError as err:
        fail(err)
    with progress_bar(progress) as bar:
        task = bar.add_task("inverse-adversary centers", total=None)
        try:
            res = inverse_experiment(out, preset=preset.value, seeds=seed_list, data_dir=data_dir,
                                     progress=_stage_reporter(progress),
                                     on_stage=lambda d, t, what: bar.update(task, completed=d, total=t,
                                                                            description=what))
        except (RuntimeError, ValueError, OSError) as err:
            fail(err)
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
                      f"cost {v['cost_ratio']:.1f}x A -> substitutes: {substitutes_text(v)}",
                      markup=False)
    console.print(f"report: {out / 'inverse.md'}")
    write_json(json_out, round_floats({"command": "inverse-centers", "dataset": res["dataset"], "preset": preset.value,
                                       "results": {k: res[k] for k in ("summary", "verdict", "runs", "step_ms")}}))


def ablation(
    grid: str = typer.Option("warmup", help="which grid of L-GM settings (lgm_lab.experiments.ablation.GRIDS): "
                                            "warmup (warm-up length and lambda), likelihood (alpha 0/0.3/1, "
                                            "the likelihood term with/without log-det, identity)"),
    preset: ReproducePreset = typer.Option("quick", help="the training budget: a `lgm reproduce` preset's"),
    seeds: str = typer.Option("0", help="comma-separated seeds"),
    out: Path = typer.Option(Path("runs/ablation"), help="output folder (finished checkpoints there are reused)"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder"),
    json_out: Optional[Path] = json_opt(),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="one line per training (--no-progress: "
                                                                         "quiet)"),
) -> None:
    """Train an L-GM head at every point of a grid of settings (diverged points recorded), one budget; error,
    FGSM error, verification EER, mean log-variance; OUT/ablation-GRID.md."""
    from lgm_lab.experiments.ablation import GRIDS
    from lgm_lab.experiments.ablation import ablation as run

    try:
        if grid not in GRIDS:
            raise ValueError(f"--grid must be one of {', '.join(GRIDS)}, got {grid!r}")
        seed_list = parse_seeds(seeds, "--seeds")
        check_common("cpu", 1, None, json_out)
        out_folder(out)
        res = run(out, grid=grid, preset=preset.value, seeds=seed_list, data_dir=data_dir,
                  progress=(lambda m: console.print(m, markup=False)) if progress else (lambda m: None))
    except (RuntimeError, ValueError, OSError) as err:
        fail(err)
    console.print((out / f"ablation-{grid}.md").read_text(), markup=False)
    write_json(json_out, round_floats(res))


def budget(
    preset: str = typer.Option("standard", help="the grid of (batch size, steps) points "
                                                "(lgm_lab.experiments.budget.BUDGET_PRESETS)"),
    out: Path = typer.Option(Path("runs/budget"), help="output folder (finished runs there are reused)"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds of every point (default: the preset's)"),
    at: Optional[str] = typer.Option(None, help="extra points B:S,... (batch:steps) that get --at-seeds"),
    at_seeds: str = typer.Option("0,1,2", help="the seeds of the --at points"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder"),
    json_out: Optional[Path] = json_opt(),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="one line per run (--no-progress: quiet)"),
) -> None:
    """The budget curve: softmax, center loss and L-GM trained for 64 to 2048 SGD steps at two batch sizes; test
    error, FGSM-verification EER and compactness against steps, and where each claim turns (OUT/budget.md)."""
    from lgm_lab.experiments.budget import BUDGET_PRESETS, budget_sweep

    try:
        if preset not in BUDGET_PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(BUDGET_PRESETS)}, got {preset!r}")
        seed_list = parse_seeds(seeds, "--seeds") if seeds is not None else None
        extra = []
        for item in (at.split(",") if at else []):
            b, _, s = item.partition(":")
            try:
                extra.append((int(b), int(s)))
            except ValueError:
                raise ValueError(f"--at takes batch:steps pairs, e.g. 128:512,128:2048; got {item!r}") from None
            if extra[-1][0] < 1 or extra[-1][1] < 1:
                raise ValueError(f"--at {item}: batch and steps must be positive")
        at_list = parse_seeds(at_seeds, "--at-seeds")
        check_common("cpu", 1, None, json_out)
        out_folder(out)
        res = budget_sweep(out, preset=preset, seeds=seed_list, at=extra, at_seeds=at_list, data_dir=data_dir,
                           progress=(lambda m: console.print(m, markup=False)) if progress else (lambda m: None))
    except (RuntimeError, ValueError, OSError) as err:
        fail(err)
    console.print((out / "budget.md").read_text(), markup=False)
    write_json(json_out, round_floats(res))




def likelihood(
    preset: str = typer.Option("standard", help="the budget (lgm_lab.experiments.likelihood.LIKELIHOOD_PRESETS): "
                                                "standard, the standard detection report's 1,024 SGD steps"),
    rules: Optional[str] = typer.Option(None, help="comma-separated rules (default: all of "
                                                   "lgm_lab.experiments.likelihood.RULES)"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (default: the preset's, 0,1,2)"),
    out: Path = typer.Option(Path("runs/likelihood"), help="output folder (finished runs and measurements there "
                                                           "are reused)"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder"),
    fmt: str = format_opt(),
    json_out: Optional[Path] = json_opt(),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="one line per run (--no-progress: quiet)"),
) -> None:
    """Why the L-GM head's own likelihood fails out of distribution: interventions on how the head trains (its
    variance rule, lambda, alpha, the log-det, normalised features), each measured on the head's geometry and
    on the head's own scores against far-OOD sets (OUT/likelihood.md, docs/likelihood)."""
    from lgm_lab.experiments.likelihood import LIKELIHOOD_PRESETS, RULES, likelihood_experiment

    try:
        if preset not in LIKELIHOOD_PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(LIKELIHOOD_PRESETS)}, got {preset!r}")
        names = [r.strip() for r in rules.split(",")] if rules else None
        known = [r[0] for r in RULES]
        for name in names or ():
            if name not in known:
                raise ValueError(f"--rules: unknown rule {name!r}; the rules are {', '.join(known)}")
        seed_list = parse_seeds(seeds, "--seeds") if seeds is not None else None
        check_common("cpu", 1, None, json_out)
        out_folder(out)
        res = likelihood_experiment(out, preset=preset, seeds=seed_list, rules=names, data_dir=data_dir, fmt=fmt,
                                    progress=(lambda m: console.print(m, markup=False)) if progress
                                    else (lambda m: None))
    except (RuntimeError, ValueError, OSError) as err:
        fail(err)
    console.print((out / "likelihood.md").read_text(), markup=False)
    write_json(json_out, round_floats(res))
