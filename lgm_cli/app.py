"""The `lgm` command line.  Each command is a thin layer over a library function."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="lgm-ext: fused L-GM loss and attack operators for PyTorch.", no_args_is_help=True)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()

