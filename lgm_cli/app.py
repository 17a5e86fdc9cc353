"""The `lgm` command line: a Typer app over one module per command group.

- :mod:`lgm_cli.train`: ``lgm train`` (its options generated from ``TrainConfig``);
- :mod:`lgm_cli.evaluate`: ``lgm eval``;
- :mod:`lgm_cli.adversarial`: ``lgm attack``, ``lgm verify``, ``lgm centers``;
- :mod:`lgm_cli.figures`: ``lgm embed``, ``lgm curves``;
- :mod:`lgm_cli.experiments`: ``lgm reproduce``, ``lgm inverse-centers``, ``lgm ablation``, ``lgm budget``,
  ``lgm likelihood``;
- :mod:`lgm_cli.detection`: ``lgm detect fit``, ``lgm detect score``; :mod:`lgm_cli.ood`: ``lgm ood``;
- :mod:`lgm_cli.system`: ``lgm info``, ``lgm bench``, ``lgm cache``;
- :mod:`lgm_cli.options`: what they share (options, checks, one-line errors, JSON).

Each command is a thin layer over a library function.  Nothing here imports torch at module level:
``lgm --help`` and ``lgm --version`` stay fast; each command imports what it needs when it runs.
"""
from __future__ import annotations

import re

import typer
import typer.core

from . import adversarial, detection, evaluate, experiments, figures, ood, system, train

app = typer.Typer(help="lgm-ext: fused L-GM loss and attack operators for PyTorch; training and evaluation of "
                       "softmax, center-loss and L-GM heads.", no_args_is_help=True,
                  rich_markup_mode=None)  # click's plain help: readable at 80 columns (rich's panels squeeze it)


def _list_shown_as_repeated(display_type):
    """Typer shows a list-valued parameter's type as a Python type (``<list[Path]>``); --help shows the
    element's type, repeated (``<path>...``), as it shows every other type."""

    def shown(self, ctx) -> str:
        text = display_type(self, ctx)
        m = re.fullmatch(r"<list\[(.+)\]>", text)
        return f"<{m.group(1).lower()}>..." if m else text

    return shown


_PARAM = getattr(typer.core, "_TyperParameter", None)  # typer >= 0.20's parameter base (absent: help as typer has it)
if _PARAM is not None and hasattr(_PARAM, "display_type"):
    _PARAM.display_type = _list_shown_as_repeated(_PARAM.display_type)


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


app.command("info")(system.info)
app.command("bench")(system.bench)
app.command("cache")(system.cache)
app.command("train")(train.train_command)
app.command("eval")(evaluate.eval_command)
app.command("attack")(adversarial.attack)
app.command("verify")(adversarial.verify)
app.command("centers")(adversarial.centers)
app.command("embed")(figures.embed)
app.command("curves")(figures.curves)
app.command("reproduce")(experiments.reproduce)
app.command("inverse-centers")(experiments.inverse_centers)
app.command("ablation")(experiments.ablation)
app.command("budget")(experiments.budget)
app.command("likelihood")(experiments.likelihood)
app.add_typer(detection.detect_app, name="detect")
app.command("ood")(ood.ood)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
