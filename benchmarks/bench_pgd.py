#!/usr/bin/env python
"""Benchmark the fused projected sign step against plain torch ops, and its share of a PGD-10 attack.

    python benchmarks/bench_pgd.py            # print
    python benchmarks/bench_pgd.py --write    # also rewrite the PGD section of benchmarks/RESULTS.md
"""
import argparse
import pathlib
import sys

from results_file import replace_section

from lgm_lab import bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-attack", action="store_true", help="skip the PGD-10 attack on LeNet++")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per side (default: until the medians settle, within --budget)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per shape (default 20)")
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    rows = bench.bench_pgd_step(device=a.device, repeats=a.repeats, budget_s=a.budget)
    attack = None if a.no_attack else bench.bench_pgd_attack(device=a.device)
    table = bench.pgd_markdown(rows, attack)
    print(table)
    if a.write:
        path = pathlib.Path(__file__).with_name("RESULTS.md")
        body = (
            "Command: `python benchmarks/bench_pgd.py --write` (float32, alpha=2/255, eps=8/255, median ± spread of "
            "the interleaved timed calls).\n\n"
            f"Machine: {bench.machine_description(a.device)}. Denormals flushed on every thread.\n\n" + table + "\n"
        )
        replace_section(path, f"pgd-{a.device}", body.replace("\\\n", "\n"))
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
