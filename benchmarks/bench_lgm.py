#!/usr/bin/env python
"""Benchmark the fused L-GM loss against plain-PyTorch versions (see lgm_lab/bench.py).

    python benchmarks/bench_lgm.py                 # CPU, the four standard sizes, prints a table
    python benchmarks/bench_lgm.py --write         # also rewrite the L-GM section of benchmarks/RESULTS.md
    python benchmarks/bench_lgm.py --device cuda   # GPU mode (CUDA events, cuda peak memory)
    python benchmarks/bench_lgm.py --dtype bfloat16 --write   # the bf16 rows (own section)

Sides: the fused op; plain PyTorch (the direct reference, the GEMM expansion, the N x K x D broadcast) eager
and under torch.compile (inductor; the compile runs in an untimed warm-up call); on the GEMM path also the
three GEMMs alone (the floor of any exact method of this expansion).

Timing (lgm_lab/timing.py measure): the sides alternate in rotating rounds, repeated until every median moves
by less than --tol in a round or the time budget (--budget seconds for the whole run) ends; each time is
printed with its spread (interquartile range / median), and a time whose spread exceeds 10% or that had not
settled is marked "(!)" and listed under the table as not to be trusted.  --repeats fixes the timed calls.
"""
import argparse
import pathlib
import sys

import torch
from results_file import replace_section

from lgm_lab import bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=256, help="batch size N (default 256)")
    p.add_argument("--sizes", default=None, help="K:D pairs, e.g. 10:2,10:100 (default: the four standard sizes)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per side (default: until the medians settle, within --budget)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: 60 per size)")
    p.add_argument("--tol", type=float, default=0.02, help="a median has settled when a round moves it less")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--sides", default=None, help="comma-separated sides (default: all of lgm_lab.bench.LGM_IMPLS)")
    p.add_argument("--write", action="store_true", help="rewrite the L-GM section of benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    sizes = bench.LGM_SIZES
    if a.sizes:
        sizes = [tuple(int(v) for v in s.split(":")) for s in a.sizes.split(",")]
    dtype = getattr(torch, a.dtype)
    rows = bench.bench_lgm(
        sizes, n=a.n, device=a.device, repeats=a.repeats, memory=not a.no_memory,
        progress=lambda m: print("  ..", m, file=sys.stderr), dtype=dtype,
        impls=a.sides.split(",") if a.sides else None, budget_s=a.budget, tol=a.tol,
    )
    table = bench.lgm_markdown(rows, a.n)
    print(table)
    if a.write:
        path = pathlib.Path(__file__).with_name("RESULTS.md")
        body = (
            f"Command: `python benchmarks/bench_lgm.py{'' if a.dtype == 'float32' else ' --dtype ' + a.dtype} --write` "
            f"(N={a.n}, {a.dtype}, alpha=1, lambda_=0.1, diagonal "
            f"covariance, forward+backward, median ± spread of the interleaved timed calls).\n\n"
            f"Machine: {bench.machine_description(a.device)}. "
            "Denormals flushed on every thread for every side.\n\n" + table + "\n"
        )
        replace_section(path, f"lgm-{a.device}" + ("" if a.dtype == "float32" else f"-{a.dtype}"), body)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
