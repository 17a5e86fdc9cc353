"""The pure-PyTorch path's cost: the L-GM loss's forward+backward with the fused kernels and without them (what an
installation without a compiler runs), N=256, K=10, D=100, float32, CPU, one torch thread.

Each side runs in its own subprocess (the fallback with ``LGM_EXT_DISABLE_KERNELS=1``, exactly the import path of
an installation without the extension); the sides alternate fused/fallback/fused/... over ``--rounds`` rounds and
each time is the median of all of a side's timed calls.  ``--write`` puts the table in benchmarks/RESULTS.md
(section ``fallback-cpu``); the import warning quotes the ratio (lgm_ext/_ops.py FALLBACK_SLOWDOWN).

    python benchmarks/bench_fallback.py --rounds 5 --write
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
N, K, D = 256, 10, 100

_SIDE = r"""
import json, sys, time, warnings
import torch
torch.set_num_threads(1)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import lgm_ext
n, k, d, calls = (int(v) for v in sys.argv[1:5])
g = torch.Generator().manual_seed(0)
x = torch.randn(n, d, generator=g, requires_grad=True)
mu = torch.randn(k, d, generator=g, requires_grad=True)
s = (0.1 * torch.randn(k, d, generator=g)).requires_grad_()
y = torch.randint(0, k, (n,), generator=g)
def step():
    loss = lgm_ext.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1)
    loss.backward()
for _ in range(20):
    step()
times = []
for _ in range(calls):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
print(json.dumps({"fused": lgm_ext.has_fused_kernels(), "times": times}))
"""


def run_side(fallback: bool, calls: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LGM_EXT_DISABLE_KERNELS", None)
    if fallback:
        env["LGM_EXT_DISABLE_KERNELS"] = "1"
    out = subprocess.run([sys.executable, "-c", _SIDE, str(N), str(K), str(D), str(calls)], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["fused"] == fallback:
        raise SystemExit(f"the {'fallback' if fallback else 'fused'} side ran the wrong path")
    return res["times"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200, help="timed calls per side and round")
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args()
    times = {"fused": [], "fallback": []}
    ratios = []  # per round: the fallback's median over the fused median (the spread a shared machine gives)
    for _ in range(args.rounds):
        fused, fallback = run_side(False, args.calls), run_side(True, args.calls)
        times["fused"] += fused
        times["fallback"] += fallback
        ratios.append(statistics.median(fallback) / statistics.median(fused))
    med = {side: 1e3 * statistics.median(t) for side, t in times.items()}
    ratio = med["fallback"] / med["fused"]
    load = os.getloadavg()[0]
    import torch
    body = (f"Command: `python benchmarks/bench_fallback.py --rounds {args.rounds} --calls {args.calls} --write` "
            f"(the L-GM loss's forward+backward, N={N}, K={K}, D={D}, float32, alpha=1, lambda_=0.1, CPU, one torch "
            f"thread; the sides alternate in their own subprocesses, the fallback with LGM_EXT_DISABLE_KERNELS=1; "
            f"medians of {args.rounds} x {args.calls} calls; torch {torch.__version__}; load average {load:.1f} on "
            f"{os.cpu_count()} cores). Per round the ratio ranged {min(ratios):.1f}-{max(ratios):.1f}x (on a shared "
            "machine it moves with the load).\n\n"
            "| path | ms per step (median) | vs fused |\n|---|---|---|\n"
            f"| fused kernels | {med['fused']:.3f} | 1.0x |\n"
            f"| pure-PyTorch path (no compiled extension) | {med['fallback']:.3f} | **{ratio:.1f}x** |\n")
    print(body)
    if args.write:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from results_file import replace_section
        replace_section(ROOT / "benchmarks" / "RESULTS.md", "fallback-cpu", body)


if __name__ == "__main__":
    main()
