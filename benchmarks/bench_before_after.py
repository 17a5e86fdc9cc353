#!/usr/bin/env python
"""Fused L-GM loss, forward+backward: peak memory and time of two builds of lgm_ext, interleaved.

    python benchmarks/bench_before_after.py --before /path/to/old/checkout --after . [--write]

Each side runs in its own subprocess (two builds of one extension cannot share a process), and
the sides alternate round by round (before, after, before, after, ...), so both see the same
machine conditions; times are the median over all rounds and the ratio is after/before.  Peak
memory is lgm_lab.bench.peak_memory_mib (growth of the resident-set high-water mark over one forward+backward
in a fresh process); both checkouts must have it (lgm-ext 0.2 and later).  Denormals are flushed on every
thread.  N=256, float32, alpha=1, lambda_=0.1, diagonal covariance, inputs from the same bench module.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

SIZES = [(10, 100), (1000, 512), (10575, 512), (100000, 128)]

CHILD = r"""
import json, sys, time, torch
import lgm_ext
import lgm_lab.bench as b
n, k, d, reps, mem = (int(v) for v in sys.argv[1:6])
b.flush_denormals(True)
x, mu, s, y = b.loss_inputs(n, k, d, 'cpu', torch.float32)
step = lambda: b.loss_step(lgm_ext.lgm_loss, x, mu, s, y)
for _ in range(2):
    step()
ts = []
for _ in range(reps):
    t0 = time.perf_counter(); step(); ts.append((time.perf_counter() - t0) * 1e3)
out = dict(file=lgm_ext.__file__, times=ts)
if mem:
    out['peak_mib'] = b.peak_memory_mib('fused', n, k, d)
print(json.dumps(out))
"""


def run_side(root, n, k, d, reps, mem):
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(k), str(d), str(reps), str(int(mem))],
                         env=env, cwd=str(root), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True)
    p.add_argument("--after", default=".")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", default=None, help="K:D pairs (default: 10:100,1000:512,10575:512,100000:128)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    a = p.parse_args(argv)
    sizes = SIZES if not a.sizes else [tuple(int(v) for v in s.split(":")) for s in a.sizes.split(",")]
    roots = {"before": pathlib.Path(a.before).resolve(), "after": pathlib.Path(a.after).resolve()}
    rows = []
    for k, d in sizes:
        reps = max(3, min(50, int(2e8 / (a.n * k * d))))
        res = {side: {"times": [], "peak": []} for side in roots}
        for rnd in range(a.rounds):
            for side, root in roots.items():
                r = run_side(root, a.n, k, d, reps, mem=rnd < 2)
                assert r["file"].startswith(str(root)), (r["file"], root)
                res[side]["times"] += r["times"]
                if "peak_mib" in r:
                    res[side]["peak"].append(r["peak_mib"])
            print(f"  .. K={k} D={d} round {rnd + 1}/{a.rounds}", file=sys.stderr)
        row = dict(k=k, d=d)
        for side in roots:
            row[f"{side}_ms"] = statistics.median(res[side]["times"])
            row[f"{side}_mib"] = min(res[side]["peak"])
        rows.append(row)
    lines = ["| K | D | peak MiB before | peak MiB after | after/before | ms before | ms after | after/before |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['d']} | {r['before_mib']:.1f} | {r['after_mib']:.1f} | "
                     f"{r['after_mib'] / r['before_mib']:.2f} | {r['before_ms']:.3f} | {r['after_ms']:.3f} | "
                     f"{r['after_ms'] / r['before_ms']:.2f} |")
    print("\n".join(lines))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
