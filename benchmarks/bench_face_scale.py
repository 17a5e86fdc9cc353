#!/usr/bin/env python
"""Partial-FC r-sweep of the sharded L-GM head on the synthetic face-scale task (examples/train_face_scale.py):
for each class count K, world size W and sample rate r, one torchrun training run; per-rank peak memory and step
time, the training loss (over the sampled classes) and the exact held-out loss (all classes), and verification
TAR at FAR = 1e-3 on seen and unseen identities.  Plus a projection for 8-64 GPUs from bytes and FLOPs per rank.

    python benchmarks/bench_face_scale.py --config 10000:2:600 --rates 1,0.3,0.1   # run, keep JSON per run
    python benchmarks/bench_face_scale.py --table-only --write                      # table from the kept runs

Each run's metrics go to ``--runs-dir`` (``<K>_<W>_<r>_<steps>.json``); ``--write`` rewrites the section
``face-scale-cpu`` of RESULTS.md from every JSON there.  Memory: growth of each process's resident-set
high-water mark over the training (parameters, gradients, momentum, temporaries; allocator slack included).
On this 2-core CPU shared with other jobs the ranks share the cores: times are indicative, ratios more so.
"""
import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys

from results_file import replace_section

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(k: int, world: int, steps: int, rate: float, runs_dir: pathlib.Path, extra: list[str]) -> dict:
    out = runs_dir / f"{k}_{world}_{rate:g}_{steps}.json"
    exact_every = max(1, steps // 4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
           str(_port()), str(ROOT / "examples" / "train_face_scale.py"), "--classes", str(k), "--steps", str(steps),
           "--sample-rate", str(rate), "--exact-loss-every", str(exact_every), "--eval-every", str(exact_every),
           "--threads", "1",
           "--log-every", str(max(1, steps // 20)), "--metrics-json", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    print(" ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env, text=True, capture_output=True)
    if r.returncode:
        raise SystemExit(f"run failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    print(r.stdout.strip().splitlines()[-1], flush=True)
    return json.loads(out.read_text())


def _curve(points, at=(0.0, 0.25, 0.5, 0.75, 1.0)) -> str:
    if not points:
        return "-"
    last = points[-1][0]
    picked = []
    for f in at:
        step, value = min(points, key=lambda p: abs(p[0] - f * last))
        if not picked or picked[-1][0] != step:
            picked.append((step, value))
    return " → ".join(f"{v:.2f}" for _, v in picked)


def untrained(args: dict) -> dict:
    """Verification with the backbone as initialised (the runs' step 0: every rank seeds it the same way)."""
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_face_scale as ex
    finally:
        sys.path.pop(0)
    task = ex.make_task(args)
    torch.manual_seed(args["seed"])
    net = ex.backbone(args["dim"], args["width"])
    return ex.verification(task, net, args["classes"], args["eval_identities"], args["seed"])


def table(runs: list[dict]) -> str:
    runs = sorted(runs, key=lambda m: (m["args"]["classes"], m["world"], -m["args"]["sample_rate"], m["args"]["steps"]))
    rows = ["| K | ranks | r | steps × global batch | classes computed per rank per step | per-rank peak memory growth "
            "(MiB) | step time (s, slowest rank, median) | vs r = 1 | training loss (sampled classes) | exact held-out "
            "loss (all classes) | TAR@FAR=1e-3 seen / unseen | TAR unseen during the run |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base, start = {}, {}
    for m in runs:
        key = m["args"]["classes"]
        if key not in start:
            v = untrained(m["args"])
            start[key] = v
            rows.append(f"| {key:,} | - | untrained backbone (step 0) | 0 | - | - | - | - | - | - | "
                        f"{v['seen']:.3f} / {v['unseen']:.3f} | references on the unseen pairs: raw images "
                        f"{v['unseen_raw_images']:.3f}, nuisance projected out {v['unseen_nuisance_removed']:.3f}, "
                        f"latent ceiling {v['unseen_latent_ceiling']:.3f} |")
        a, k, w = m["args"], m["args"]["classes"], m["world"]
        step = max(r["step_s"] for r in m["ranks"])
        if a["sample_rate"] == 1.0 and (k, w) not in base:
            base[(k, w)] = step
        ratio = f"{base[(k, w)] / step:.2f}× faster" if (k, w) in base and a["sample_rate"] < 1 else "-"
        kr = max(hi - lo for lo, hi in (r["class_range"] for r in m["ranks"]))
        computed = min(kr, -(-round(a["sample_rate"] * kr * 1e9) // 10 ** 9))
        v = m["verification"]
        rows.append(f"| {k:,} | {w} | {a['sample_rate']:g} | {a['steps']} × {a['batch_size'] * w} | ≥ {computed:,} of "
                    f"{kr:,} | {max(r['peak_mib'] for r in m['ranks']):.0f} | {step:.3f} | {ratio} | "
                    f"{_curve(m['curve'])} | {_curve(m['exact_curve'])} | {v['seen']:.3f} / {v['unseen']:.3f} | "
                    f"{_curve([(s, u) for s, _seen, u in m.get('eval_curve', [])])} |")
    return "\n".join(rows)


def projection(k=1_000_000, d=512, n_per_gpu=256, worlds=(8, 16, 32, 64), rates=(1.0, 0.3, 0.1)) -> str:
    """Per rank and step, float32, N = 256 W (the global batch) and K_s = r K / W: the class parameters, their
    gradients and SGD momentum (6 K D / W floats, the same for every r: the gradients are dense), the forward's
    N x K_s logits (N K_s = 256 r K: constant in W), the sampled rows' copies and their gradients (4 K_s D), the
    head's FLOPs (~16 N K_s D, also constant in W: the GEMM path's 2 products forward and 6 backward, logits
    recomputed as N > D) and the bytes moved (unchanged by r; ring all-reduce 2(W-1)/W of the buffer, all-gather
    (W-1)/W)."""
    rows = ["| GPUs W | r | class params + grads + momentum per rank | forward logits N × K_s | sampled copies + their "
            "grads | head TFLOP per rank per step | bytes moved per rank per step |", "|---|---|---|---|---|---|---|"]
    for w in worlds:
        n = n_per_gpu * w
        moved = (w - 1) / w * n * (d * 4 + 8) + 2 * (w - 1) / w * 4 * n * 4 + 2 * (w - 1) / w * n * d * 4
        for r in rates:
            ks = r * k / w
            rows.append(f"| {w} | {r:g} | {6 * k * d / w * 4 / 2**30:.2f} GiB | {n * ks * 4 / 2**30:.2f} GiB | "
                        f"{(4 * ks * d * 4 / 2**30 if r < 1 else 0):.2f} GiB | {16 * n * ks * d / 1e12:.2f} | "
                        f"{moved / 2**20:.1f} MiB |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="K:W:steps (repeatable)")
    p.add_argument("--rates", default="1,0.3,0.1")
    p.add_argument("--runs-dir", default=str(ROOT / "benchmarks" / "face_scale_runs"))
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--write", action="store_true")
    p.add_argument("extra", nargs="*", help="more arguments for the example (after --)")
    a = p.parse_args(argv)
    runs_dir = pathlib.Path(a.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    if not a.table_only:
        for spec in a.config:
            k, w, steps = (int(v) for v in spec.split(":"))
            for r in (float(v) for v in a.rates.split(",")):
                run_one(k, w, steps, r, runs_dir, a.extra)
    runs = [json.loads(f.read_text()) for f in sorted(runs_dir.glob("*.json"))]
    text = table(runs)
    proj = projection()
    print(text)
    print(proj)
    if a.write:
        notes = runs_dir / "NOTES.md"  # the reading of these runs, kept beside their metrics
        body = (notes.read_text().strip() + "\n\n" if notes.exists() else "")
        body += ("Command: `python benchmarks/bench_face_scale.py --config K:W:steps ... --rates 1,0.3,0.1`, then "
                 "`--table-only --write` (examples/train_face_scale.py under torchrun, gloo, float32, D = 128, "
                 "batch 128 images per rank of 32 identities × 4, SGD momentum 0.9, the head without weight "
                 "decay).\n\n" + text + "\n\nProjection for K = 1,000,000 classes, D = 512, 256 images per GPU "
                 "(formulas in `projection()`):\n\n" + proj + "\n")
        replace_section(pathlib.Path(__file__).with_name("RESULTS.md"), "face-scale-cpu", body)
        print("wrote RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
