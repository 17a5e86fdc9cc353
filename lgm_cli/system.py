"""`lgm info` (the installed build) and `lgm bench` (the fused operator against plain PyTorch)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .options import check_json_target, check_positive, console, fail


def info() -> None:
    """Show the installed build: version, torch, which path the operators run (fused kernels or pure PyTorch)
    and which backends have kernels."""
    import warnings

    import torch

    with warnings.catch_warnings():  # the table says it
        warnings.simplefilter("ignore", RuntimeWarning)
        import lgm_ext

    t = Table(show_header=False)
    t.add_row("lgm_ext", lgm_ext.__version__)
    t.add_row("torch", torch.__version__)
    from lgm_ext._ops import FALLBACK_COST, WHY_NO_KERNELS

    fused = lgm_ext.has_fused_kernels()
    t.add_row("operators", "fused C++ kernels" if fused else f"pure PyTorch (lgm_ext.reference), because "
              f"{WHY_NO_KERNELS}; {FALLBACK_COST}")
    t.add_row("CUDA kernels compiled", "yes" if lgm_ext.has_cuda_kernels() else "no")
    t.add_row("GPU available", torch.cuda.get_device_name() if torch.cuda.is_available() else "no")
    console.print(t)


def _size_pair(text: str) -> tuple[int, int]:
    parts = text.split(":")
    try:
        k, d = (int(v) for v in parts)
    except ValueError:
        raise ValueError(f"--sizes takes K:D pairs of integers, e.g. 10:2,10:100; got {text!r}") from None
    if not (1 <= k <= 1 << 20 and 1 <= d <= 1 << 16):
        raise ValueError(f"--sizes {text!r}: K must be in [1, {1 << 20}] and D in [1, {1 << 16}]")
    return k, d


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
    budget: Optional[float] = typer.Option(None, help="seconds of timing per size (default 60): the sides run in "
                                                      "rotating rounds until their medians settle or this ends"),
    tol: float = typer.Option(0.02, help="a median has settled when a round moves it by less than this fraction"),
) -> None:
    """Time the fused L-GM loss (forward+backward) against plain-PyTorch versions, eager and torch.compile'd.

    Sides are interleaved; each cell is the median with its spread (interquartile range / median), and cells
    too spread to trust are marked.  Piped, the tables are printed as plain markdown."""
    import torch

    from lgm_lab import bench as benchmarks
    from lgm_lab.devices import check_device

    try:
        impls = None
        if sides is not None:
            impls = [v.strip() for v in sides.split(",") if v.strip()]
            bad = [v for v in impls if v not in benchmarks.LGM_IMPLS]
            if bad or "fused" not in impls:
                raise ValueError(f"--sides must list fused and any of {', '.join(benchmarks.LGM_IMPLS)}; got {sides!r}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
        check_positive(n, "--n")
        check_positive(repeats, "--repeats")
        if budget is not None and not budget > 0:
            raise ValueError(f"--budget must be a positive number of seconds, got {budget}")
        if not 0 < tol < 1:
            raise ValueError(f"--tol must be in (0, 1), got {tol}")
        check_json_target(json_out)
        check_device(device)
        pairs = benchmarks.LGM_SIZES if not sizes else [_size_pair(s) for s in sizes.split(",")]
    except ValueError as err:
        fail(err)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  disable=not progress) as prog:
        task = prog.add_task("benchmark", total=None)
        rows = benchmarks.bench_lgm(
            pairs, n=n, device=device, repeats=repeats, memory=memory,
            progress=lambda m: prog.update(task, description=m), dtype=getattr(torch, dtype), impls=impls,
            budget_s=budget, tol=tol,
        )
    text = f"Machine: {benchmarks.machine_description(device)}\n\n{benchmarks.lgm_markdown(rows, n)}"
    if console.is_terminal:
        console.print(text, markup=False)
    else:  # piped: plain markdown, never wrapped to the console's width
        print(text)
    if json_out:
        from lgm_lab.run_folder import save_text

        try:
            save_text(json_out, benchmarks.to_json(rows))  # atomically: a link there is replaced, not followed
        except OSError as err:
            fail(err)


def cache(
    clear: bool = typer.Option(False, "--clear", help="remove what the cache wrote (staged copies, downloads; a "
                                                      "copy another process is reading stays); nothing else in "
                                                      "LGM_DATA_DIR, and no dataset folder of yours, is touched"),
) -> None:
    """The data cache (LGM_DATA_DIR, default ~/.cache/lgm-ext/data): where it is and the size of what the cache
    wrote there; --clear removes what the cache can prove it wrote (its marks, bound to the cache folder and to
    the files it created) and says what.

    Datasets found in a folder (--data-dir, Debian's Fashion-MNIST) are staged there, at most the three most
    recently used sources; downloads (MNIST, CIFAR-10 where the network allows) land there too."""
    from lgm_lab.data import cache_size, clear_cache, default_data_dir

    root = default_data_dir()
    try:
        if clear:
            done = clear_cache()
            for path in done.removed:
                console.print(f"removed {path}", markup=False, soft_wrap=True)
            for path in done.kept:
                console.print(f"kept {path}: in use by another process", markup=False, soft_wrap=True)
            for path, reason in done.unproven:
                console.print(f"kept {path}: {reason}", markup=False, soft_wrap=True)
            console.print(done.note or f"freed {done.freed / 2**20:.1f} MiB", markup=False, soft_wrap=True)
        elif root.exists() and not root.is_dir():
            raise ValueError(f"the data cache {root} (LGM_DATA_DIR) is not a folder")
        else:
            console.print(f"{root}: {cache_size() / 2**20:.1f} MiB written by the cache (staged copies and "
                          "downloads; nothing else there is counted)" + ("" if root.exists() else " (does not exist)"),
                          markup=False, soft_wrap=True)
    except (OSError, ValueError) as err:
        fail(err)
