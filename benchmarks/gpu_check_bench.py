#!/usr/bin/env python
"""The GPU benchmarks of ``make gpu-check`` (run by benchmarks/gpu_check.py in a subprocess, so that a CUDA
fault cannot take the driver down).  Writes its results to ``--json`` after every case:

    python benchmarks/gpu_check_bench.py --deadline <epoch s> --json build/gpu-check/bench.json

- ``lgm``: the fused loss against plain PyTorch eager and torch.compile (reference.lgm_loss_gemm, inductor) at
  N = 256 and (K, D) = (10575, 512), (100000, 512), (10, 100), float32 and bfloat16: lgm_lab.bench.bench_lgm
  (CUDA events; sides interleaved until their medians settle; max_memory_allocated per side).
- ``tensor_cores``: the fused loss with its default float32 GEMMs against the tensor-core GEMMs (csrc/gemm.h).
- ``pgd_markdown``: lgm_lab.bench.bench_pgd_step.
- ``kernels``: one forward+backward under torch.profiler, each CUDA kernel's time grouped by the rows of
  benchmarks/cuda_floors.py and set beside the row's floor (H100 figures: an H200 has the same peak FLOP rates
  and 4.8 TB/s instead of 3.35).
Cases run in order of interest while time is left; the ones that do not fit are listed in ``skipped``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import cuda_floors

N = 256
CASES = [(10575, 512, "float32"), (10575, 512, "bfloat16"), (100000, 512, "float32"), (100000, 512, "bfloat16"),
         (10, 100, "float32"), (10, 100, "bfloat16")]
STORAGE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def group_kernels(measured: dict, steps: int, floor_rows: list) -> tuple:
    """Measured CUDA kernel times (name -> total µs over ``steps`` steps) grouped by the floor rows (a row
    covers the kernels whose name contains one of its ``match`` substrings; our kernels are matched first, then
    cuBLAS's, then ATen's elementwise ones), per step, each beside its floor; the rest is one "other" row.
    Returns (rows, names of the unmatched kernels)."""
    def rank(r):
        if all(m.endswith("_kernel") for m in r.match):
            return 0
        return 1 if r.name.startswith("GEMM") else 2

    left = dict(measured)
    rows = []
    gemm_rows = [r for r in floor_rows if r.name.startswith("GEMM")]
    groups = [r for r in floor_rows if not r.name.startswith("GEMM")]
    if gemm_rows:  # cuBLAS kernels cannot be told apart by name: the GEMMs are one row
        groups.append(cuda_floors.Kernel("GEMMs (cuBLAS), all", sum(r.flops for r in gemm_rows),
                                         sum(r.bytes for r in gemm_rows), gemm_rows[0].match, gemm_rows[0].peak))
        floors = {"GEMMs (cuBLAS), all": sum(r.floor_s() for r in gemm_rows)}
    else:
        floors = {}
    for r in sorted(groups, key=rank):
        names = [n for n in left if any(m in n for m in r.match)]
        us = sum(left.pop(n) for n in names)
        floor_s = floors.get(r.name, r.floor_s())
        rows.append({"name": r.name, "measured_us": us / steps, "floor_us": floor_s * 1e6, "bound": r.bound(),
                     "kernels": sorted(names)})
    if left:
        rows.append({"name": "other", "measured_us": sum(left.values()) / steps, "floor_us": None, "bound": "",
                     "kernels": sorted(left)})
    total = sum(r["measured_us"] for r in rows)
    rows.append({"name": "total", "measured_us": total, "floor_us": sum(r.floor_s() for r in floor_rows) * 1e6,
                 "bound": "", "kernels": []})
    return rows, sorted(left)


def kernel_profile(k: int, d: int, dtype_name: str, device: str = "cuda", n: int = N, steps: int = 3) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lgm_ext import lgm_loss
    from lgm_lab import bench

    gpu = device.startswith("cuda")
    kind = torch.autograd.DeviceType.CUDA if gpu else torch.autograd.DeviceType.CPU
    x, mu, s, y = bench.loss_inputs(n, k, d, device, getattr(torch, dtype_name))
    bench.loss_step(lgm_loss, x, mu, s, y)
    bench.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            bench.loss_step(lgm_loss, x, mu, s, y)
        bench.synchronize(device)
    measured = {}
    for evt in prof.events():  # on a GPU: the kernels (on the CPU, for a dry run: the ops)
        if evt.device_type == kind:
            measured[evt.name] = measured.get(evt.name, 0.0) + evt.time_range.elapsed_us()
    rows, unmatched = group_kernels(measured, steps, cuda_floors.kernels(n, k, d, STORAGE[dtype_name]))
    return {"case": f"N={n} K={k} D={d} {dtype_name}", "steps": steps, "rows": rows, "unmatched": unmatched}


def tensor_core_case(k: int, d: int, dtype_name: str, budget_s: float, device: str = "cuda", n: int = N) -> dict:
    import torch

    from lgm_ext import lgm_loss
    from lgm_ext._testing import tensor_core_gemms
    from lgm_lab import bench

    x, mu, s, y = bench.loss_inputs(n, k, d, device, getattr(torch, dtype_name))

    def tc():
        with tensor_core_gemms(True):
            bench.loss_step(lgm_loss, x, mu, s, y)

    t = bench.measure({"float32_gemms": lambda: bench.loss_step(lgm_loss, x, mu, s, y), "tensor_cores": tc},
                      device=device, budget_s=budget_s)
    return {"k": k, "d": d, "dtype": dtype_name, "times_ms": {n: v.median for n, v in t.items()},
            "spread": {n: v.spread for n, v in t.items()}, "untrusted": [n for n, v in t.items() if not v.trusted()]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deadline", type=float, required=True, help="epoch seconds")
    p.add_argument("--json", required=True)
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a dry run of this script (tests)")
    p.add_argument("--cases", default=None, help="K:D:dtype,... (default: the six cases above)")
    p.add_argument("--n", type=int, default=N)
    p.add_argument("--quick", action="store_true", help="a dry run: every measurement within a fraction of a second")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile side")
    a = p.parse_args(argv)
    import torch

    from lgm_lab import bench

    out = Path(a.json)
    dev, n = a.device, a.n
    cases = CASES if not a.cases else [(int(k), int(d), dt) for k, d, dt in (c.split(":") for c in a.cases.split(","))]
    res = {"n": n, "lgm": [], "tensor_cores": [], "kernels": [], "pgd_markdown": "", "skipped": [], "errors": []}

    def save():
        out.write_text(json.dumps(res, indent=2))

    def left():
        return a.deadline - time.time()

    def budget(cap, share):
        return 0.2 if a.quick else max(3.0, min(cap, left() / share))

    def attempt(label, fn):
        try:
            fn()
        except Exception as err:  # one failing case must not cost the others
            res["errors"].append(f"{label}: {type(err).__name__}: {err}")
            traceback.print_exc()
        save()

    def empty_cache():
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()

    # (what, the seconds it needs at least, action), cheapest first: the fused loss against eager PyTorch at
    # every size, the kernels beside their floors, the tensor-core mode, the PGD step; then torch.compile's side
    # (its compiles take tens of seconds each).
    plan = []
    rows = {}
    for k, d, dt in cases:
        def eager_case(k=k, d=d, dt=dt):
            (r,) = bench.bench_lgm([(k, d)], n=n, device=dev, dtype=getattr(torch, dt), impls=["fused", "plain_gemm"],
                                   memory=dev.startswith("cuda"), budget_s=budget(15.0, 12))
            rows[(k, d, dt)] = {"dtype": dt, **asdict(r)}
            res["lgm"] = list(rows.values())
            empty_cache()
        plan.append((f"L-GM K={k} D={d} {dt}: fused and eager", 8, eager_case))
    for k, d, dt in cases:
        plan.append((f"kernels K={k} D={d} {dt}", 5, lambda k=k, d=d, dt=dt: res["kernels"].append(
            kernel_profile(k, d, dt, dev, n))))
    for k, d, dt in [c for c in cases if c[0] * c[1] > cuda_floors.DIRECT_MAX_KD][:4]:
        plan.append((f"tensor cores K={k} D={d} {dt}", 8, lambda k=k, d=d, dt=dt: res["tensor_cores"].append(
            tensor_core_case(k, d, dt, budget(10.0, 8), dev, n))))
    shapes = {"MNIST batch 16x1x28x28": (16, 1, 28, 28)} if a.quick else bench.PGD_SHAPES
    plan.append(("PGD step", 5, lambda: res.update(pgd_markdown=bench.pgd_markdown(
        bench.bench_pgd_step(shapes, device=dev, budget_s=budget(8.0, 6)), None))))
    for k, d, dt in ([] if a.no_compile else cases):
        def compiled_case(k=k, d=d, dt=dt):
            (r,) = bench.bench_lgm([(k, d)], n=n, device=dev, dtype=getattr(torch, dt),
                                   impls=["fused", "compiled_gemm"], memory=dev.startswith("cuda"),
                                   budget_s=budget(15.0, 4))
            row = rows.setdefault((k, d, dt), {"dtype": dt, **asdict(r)})
            for field in ("times_ms", "spread", "peak_mib"):
                row[field]["compiled_gemm"] = getattr(r, field).get("compiled_gemm")
            row["untrusted"] = sorted(set(row["untrusted"]) | ({"compiled_gemm"} & set(r.untrusted)))
            row["compiled_vs_fused"] = r.speedup_vs_compiled  # from this run's interleaved fused calls
            res["lgm"] = list(rows.values())
            empty_cache()
        plan.append((f"L-GM K={k} D={d} {dt}: torch.compile", 45, compiled_case))
    if a.no_compile:
        res["skipped"].append("the torch.compile side (--no-compile)")
    for label, cost, fn in plan:
        if left() < (0 if a.quick else cost):
            res["skipped"].append(f"{label} (time)")
            save()
            continue
        print(f"[gpu-check bench] {label}", flush=True)
        attempt(label, fn)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
