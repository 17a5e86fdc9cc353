"""Benchmarks of the fused operators against plain-PyTorch versions.

Used by ``benchmarks/bench_lgm.py``, ``benchmarks/gpu_check.py`` and ``lgm bench``.  Times are medians of
forward+backward wall time (CUDA events on a GPU), the sides interleaved and repeated until the medians
settle or the time budget ends, each with its spread (``measure``); peak memory is measured per
case in a fresh subprocess on the CPU (growth of the resident-set high-water
mark over one forward+backward) and with ``torch.cuda.max_memory_allocated``
on a GPU.  On the CPU, denormals are flushed on every thread for every side.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from lgm_ext import DIRECT_MAX_KD, lgm_loss, reference
from lgm_ext._testing import flush_denormals

from .timing import MAX_SPREAD, Timing, interleaved_medians, machine_load, measure, median_ms, synchronize  # noqa: F401

LGM_SIZES = [(10, 2), (10, 100), (1000, 512), (10575, 512)]
LGM_IMPLS = {
    "fused": lgm_loss,
    "reference": reference.lgm_loss,
    "plain_gemm": reference.lgm_loss_gemm,
    "naive_nkd": reference.lgm_loss_naive,
    # the peer a modern user picks: the same eight lines under torch.compile (inductor)
    "compiled_gemm": reference.lgm_loss_gemm,
    "compiled_naive": reference.lgm_loss_naive,
}
COMPILED = {"compiled_gemm", "compiled_naive"}
# Sides that are not a loss implementation: the three GEMMs of N x K x 2D alone (the arithmetic every exact
# float32 method of this expansion does: forward, d/dx, d/dclass); not a candidate for "best plain".
FLOOR = "gemm_floor"


def lgm_impl(name: str):
    """The loss function of side ``name``; a compiled side gets a fresh torch.compile (static shapes), so
    each size is compiled for its own shapes (the compile runs in the first, untimed, warm-up call)."""
    fn = LGM_IMPLS[name]
    return torch.compile(fn, dynamic=False) if name in COMPILED else fn


def gemm_floor_step(n: int, k: int, d: int, device: str, dtype=torch.float32):
    """One call of the three GEMMs of the fused GEMM path on preallocated operands."""
    a = torch.randn(n, 2 * d, device=device, dtype=dtype)
    b = torch.randn(k, 2 * d, device=device, dtype=dtype)
    g = torch.randn(n, k, device=device, dtype=dtype)

    def step():
        torch.mm(a, b.t())
        torch.mm(g, b)
        torch.mm(g.t(), a)

    return step


def machine_description(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()
    return (f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {cap} "
            f"(torch {torch.__version__})")


def loss_inputs(n, k, d, device, dtype, seed=0):
    """Features (N, D), means and log-variances (K, D) needing gradients, and labels: the benchmarks' inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype).to(device).requires_grad_()
    # Means a few units apart and features near them, as after some training.
    mu = (torch.randn(k, d, generator=g, dtype=dtype) * 0.5).to(device).requires_grad_()
    s = (0.1 * torch.randn(k, d, generator=g, dtype=dtype)).to(device).requires_grad_()
    y = torch.randint(0, k, (n,), generator=g).to(device)
    return x, mu, s, y


def loss_step(fn, x, mu, s, y):
    """One forward+backward of the loss function ``fn`` (alpha 1, lambda 0.1) on :func:`loss_inputs`."""
    for t in (x, mu, s):
        t.grad = None
    fn(x, mu, s, y, alpha=1.0, lambda_=0.1).backward()


def naive_fits(n, k, d, itemsize=4, device="cpu") -> bool:
    """The N x K x D broadcast keeps ~4 such tensors alive through backward."""
    need = 4 * n * k * d * itemsize
    if device.startswith("cuda"):
        return need < 0.8 * torch.cuda.get_device_properties(0).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return need < 0.5 * total


def peak_memory_mib(impl: str, n: int, k: int, d: int, device: str = "cpu", dtype=torch.float32,
                    runs: int = 2) -> float:
    """Peak memory of one forward+backward after a warm-up step, in MiB: everything the step allocates,
    the gradients it returns included.  The warm-up's gradients are dropped before the baseline: held in
    it and freed inside the step, they would be subtracted from the step's peak (on the CPU: or not, as
    malloc happened to place them, which made the number swing by their size).  On the CPU the smallest
    of ``runs`` fresh processes (the rest varies by 1-2 MiB between processes: BLAS and thread-pool
    buffers)."""
    if device.startswith("cuda"):
        x, mu, s, y = loss_inputs(n, k, d, device, dtype)
        fn = lgm_impl(impl)
        loss_step(fn, x, mu, s, y)  # warm-up (a compile, lazy initialisation)
        for t in (x, mu, s):
            t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_step(fn, x, mu, s, y)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # A fresh process; the kernel's peak-RSS counter is reset (clear_refs 5) just
    # before the step, so the import's own peak (and a compile) does not hide the step's;
    # malloc's mmap threshold is set to 0 (M_MMAP_THRESHOLD) so no freed heap hides it either:
    # every allocation from then on is its own mapping, returned to the system when freed.
    code = (
        "import torch, lgm_lab.bench as b\n"
        f"x, mu, s, y = b.loss_inputs({n}, {k}, {d}, 'cpu', {dtype})\n"
        "b.flush_denormals()\n"
        f"fn = b.lgm_impl({impl!r})\n"
        "b.loss_step(fn, x, mu, s, y)\n"  # a warm-up step: one-time costs (thread pools, a compile) are not the step's
        "for t in (x, mu, s):\n    t.grad = None\n"
        "import ctypes\nlibc = ctypes.CDLL('libc.so.6')\nlibc.mallopt(-3, 0)\nlibc.malloc_trim(0)\n"
        "def kib(f):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(f))\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "r0 = kib('VmRSS:')\n"
        "b.loss_step(fn, x, mu, s, y)\n"
        "print(kib('VmHWM:') - r0)\n"
    )
    peaks = []
    for _ in range(max(1, runs)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peaks.append(int(out.stdout.strip().splitlines()[-1]) / 1024.0)
    return min(peaks)


def sgemm_gflops(m: int, n: int, kk: int, device: str = "cpu", repeats: int = 5) -> float:
    a = torch.randn(m, kk, device=device)
    b = torch.randn(n, kk, device=device)
    ms = median_ms(lambda: torch.mm(a, b.t()), repeats, 3, device)
    return 2.0 * m * n * kk / (ms * 1e6)


@dataclass
class LGMRow:
    k: int
    d: int
    path: str
    times_ms: dict = field(default_factory=dict)  # median per side
    peak_mib: dict = field(default_factory=dict)
    speedup_vs_best_plain: float = 0.0
    best_plain: str = ""
    speedup_vs_compiled: float = 0.0
    fused_gflops: float = 0.0
    sgemm_gflops: float = 0.0
    spread: dict = field(default_factory=dict)  # interquartile range / median per side
    calls: dict = field(default_factory=dict)  # timed calls per side
    untrusted: list = field(default_factory=list)  # sides too noisy (spread) or not settled when time ran out
    load: float = -1.0  # machine_load() when the size's timing started
    notes: list = field(default_factory=list)


def bench_lgm(
    sizes=LGM_SIZES,
    n: int = 256,
    device: str = "cpu",
    repeats: int | None = None,
    memory: bool = True,
    progress=None,
    dtype=torch.float32,
    impls=None,
    *,
    budget_s: float | None = None,
    tol: float = 0.02,
    max_spread: float = MAX_SPREAD,
) -> list[LGMRow]:
    """Forward+backward of the L-GM loss (alpha=1, lambda_=0.1, diagonal covariance) in ``dtype``.
    ``impls``: the sides to run (default: all of LGM_IMPLS, plus the GEMM floor on the GEMM path).

    Timing (:func:`measure`): the sides are interleaved and repeated until their medians settle (within
    ``tol``) or the size's share of ``budget_s`` is spent; ``repeats`` fixes the timed calls per side instead.
    ``budget_s``: seconds for the whole call (timing and peak memory; default 60 per size), shared equally by
    the sizes still to run; peak-memory measurement of a size is skipped, with a note, when its share is spent.
    Each row reports the spread of every side and lists as ``untrusted`` the sides whose spread exceeds
    ``max_spread`` or whose median had not settled."""
    if device == "cpu":
        flush_denormals(True)
    names = list(impls or LGM_IMPLS)
    total = 60.0 * len(sizes) if budget_s is None else float(budget_s)
    t_start = time.perf_counter()
    rows = []
    for i, (k, d) in enumerate(sizes):
        share = max(0.0, total - (time.perf_counter() - t_start)) / (len(sizes) - i)
        t_size = time.perf_counter()
        work = n * k * d
        x, mu, s, y = loss_inputs(n, k, d, device, dtype)
        row = LGMRow(k=k, d=d, path="direct" if k * d <= DIRECT_MAX_KD else "gemm", load=machine_load())
        cases = {}
        for name in names:
            if name in ("naive_nkd", "compiled_naive") and not naive_fits(n, k, d, device=device):
                row.notes.append(f"{name} skipped: its N x K x D tensors do not fit")
                continue
            fn = lgm_impl(name)
            cases[name] = (lambda fn=fn, args=(x, mu, s, y): loss_step(fn, *args))
        if row.path == "gemm" and dtype == torch.float32:
            cases[FLOOR] = gemm_floor_step(n, k, d, device)
        # Sides that build N x K x D temporaries over 64 MiB are timed in a second phase: freeing
        # gigabytes leaves the allocator/page state that slows whatever runs next on this VM.
        heavy = {m for m in ("reference", "naive_nkd", "compiled_naive") if m in cases and 4 * work > 64 * 2**20}
        if row.path == "gemm":  # the machine's sgemm rate on this GEMM's shape, before any heavy side runs
            row.sgemm_gflops = sgemm_gflops(n, k, 2 * d, device)
        phases = [p for p in ({m: c for m, c in cases.items() if m not in heavy}, {m: cases[m] for m in heavy}) if p]
        timing_share = share * (0.6 if memory else 0.95)
        for j, phase in enumerate(phases):
            if progress:
                progress(f"K={k} D={d}: timing {', '.join(phase)}")
            left = timing_share - (time.perf_counter() - t_size)
            t = measure(phase, device=device, calls=repeats, budget_s=max(0.0, left) / (len(phases) - j), tol=tol)
            for name, tm in t.items():
                row.times_ms[name], row.spread[name], row.calls[name] = tm.median, tm.spread, tm.calls
                if not tm.trusted(max_spread):
                    row.untrusted.append(name)
        if memory:
            for name in cases:
                if name == FLOOR:
                    continue
                if time.perf_counter() - t_size > share and budget_s is not None:
                    row.notes.append(f"peak memory of {name} not measured: the time budget was spent")
                    continue
                if progress:
                    progress(f"K={k} D={d}: peak memory of {name}")
                row.peak_mib[name] = peak_memory_mib(name, n, k, d, device, dtype)
        plain = {kk: v for kk, v in row.times_ms.items() if kk not in ("fused", FLOOR)}
        if plain and "fused" in row.times_ms:  # (--sides fused alone, or its peers skipped: no comparison)
            row.best_plain = min(plain, key=plain.get)
            row.speedup_vs_best_plain = plain[row.best_plain] / row.times_ms["fused"]
        if "compiled_gemm" in row.times_ms and "fused" in row.times_ms:
            row.speedup_vs_compiled = row.times_ms["compiled_gemm"] / row.times_ms["fused"]
        if row.path == "gemm" and "fused" in row.times_ms:
            # Diagonal covariance: 3 GEMMs of N x K x 2D (forward, dx, dmu/dlog_var).
            flops = 3 * 2.0 * n * k * 2 * d
            row.fused_gflops = flops / (row.times_ms["fused"] * 1e6)
        rows.append(row)
    return rows


UNTRUSTED_MARK = " (!)"


def lgm_markdown(rows: list[LGMRow], n: int = 256) -> str:
    """Plain markdown: times (ms, medians, with the spread of the timed calls) and the speed-ups; peak memory
    (MiB); then a line on every time not to be trusted and on a busy machine."""
    names = [m for m in LGM_IMPLS if any(m in r.times_ms for r in rows)]
    floor = any(FLOOR in r.times_ms for r in rows)
    compiled = "compiled_gemm" in names

    def cell(r, m):
        if m not in r.times_ms:
            return "skipped"
        spread = f" ±{100 * r.spread[m]:.0f}%" if m in r.spread else ""
        return f"{r.times_ms[m]:.3f}{spread}" + (UNTRUSTED_MARK if m in r.untrusted else "")

    def ratio(r, value, other):
        mark = UNTRUSTED_MARK if {"fused", other} & set(r.untrusted) else ""
        return f"{value:.2f}x{mark}"

    head = "| K | D | path | " + " | ".join(f"{m} ms" for m in names) + (" | 3 GEMMs alone ms" if floor else "")
    head += (" | fused vs compiled_gemm" if compiled else "") + " | fused vs best plain | fused GFLOP/s (% of sgemm) |"
    lines = [head, "|" + "---|" * (3 + len(names) + (1 if floor else 0) + (1 if compiled else 0) + 2)]
    for r in rows:
        t = " | ".join(cell(r, m) for m in names)
        if floor:
            t += " | " + (cell(r, FLOOR) if FLOOR in r.times_ms else "-")
        rate = (f"{r.fused_gflops:.0f} ({100 * r.fused_gflops / r.sgemm_gflops:.0f}% of {r.sgemm_gflops:.0f})"
                if r.sgemm_gflops else "-")
        if compiled:
            t += " | " + (f"**{ratio(r, r.speedup_vs_compiled, 'compiled_gemm')}**" if r.speedup_vs_compiled else "-")
        best = f"{ratio(r, r.speedup_vs_best_plain, r.best_plain)} ({r.best_plain})" if r.best_plain else "-"
        lines.append(f"| {r.k} | {r.d} | {r.path} | {t} | {best} | {rate} |")
    if any(r.peak_mib for r in rows):
        lines += ["", "| K | D | " + " | ".join(f"{m} MiB" for m in names) + " | fused / compiled_gemm memory |",
                  "|" + "---|" * (3 + len(names))]
        for r in rows:
            mem = " | ".join(f"{r.peak_mib[m]:.1f}" if m in r.peak_mib else "-" for m in names)
            ratio_mem = (f"{r.peak_mib['fused'] / r.peak_mib['compiled_gemm']:.2f}"
                         if r.peak_mib.get("compiled_gemm") and "fused" in r.peak_mib else "-")
            lines.append(f"| {r.k} | {r.d} | {mem} | {ratio_mem} |")
    lines += notes_markdown(rows)
    return "\n".join(lines)


def notes_markdown(rows) -> list:
    """The lines under a table: untrusted times, a busy machine, skipped measurements."""
    out = []
    bad = [f"{', '.join(r.untrusted)} at K={r.k} D={r.d}" for r in rows if r.untrusted]
    if bad:
        out.append(f"\n{UNTRUSTED_MARK.strip()} Not to be trusted: the timed calls spread by more than "
                   f"{100 * MAX_SPREAD:.0f}% (interquartile range / median), or the median was still moving when the "
                   f"time budget ended -- {'; '.join(bad)}.  Rerun on an idle machine or with a larger budget.")
    busy = [r.load for r in rows if r.load > 1.0]
    if busy:
        out.append(f"\nThe machine was busy (load average up to {max(busy):.1f}x its core count): absolute times "
                   "are not comparable with another run's; the ratios come from interleaved rounds.")
    for r in rows:
        out += [f"\nK={r.k} D={r.d}: {note}." for note in r.notes]
    return out


def to_json(rows) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)


PGD_SHAPES = {"CIFAR batch 128x3x32x32": (128, 3, 32, 32), "MNIST batch 128x1x28x28": (128, 1, 28, 28)}


def bench_pgd_step(shapes=PGD_SHAPES, device: str = "cpu", repeats: int | None = None,
                   budget_s: float = 20.0) -> list[dict]:
    """The fused projected sign step (out-of-place and in-place) against the same step in plain torch ops,
    interleaved until the medians settle (:func:`measure`; ``repeats`` fixes the calls instead) within
    ``budget_s`` seconds per shape.  Each row has the medians, their spreads and the untrusted sides."""
    from lgm_ext import pgd_step, pgd_step_

    if device == "cpu":
        flush_denormals(True)
    rows = []
    for name, shape in shapes.items():
        g = torch.Generator().manual_seed(0)
        x0 = torch.rand(shape, generator=g).to(device)
        x = (x0 + 0.01 * torch.randn(shape, generator=g).to(device)).clamp(0, 1)
        grad = torch.randn(shape, generator=g).to(device)
        kw = dict(alpha=2 / 255, eps=8 / 255)
        buf = x.clone()
        args = (grad, x0)
        t = measure({
            "plain": lambda x=x, args=args, kw=kw: reference.pgd_step(x, *args, **kw),
            "fused": lambda x=x, args=args, kw=kw: pgd_step(x, *args, **kw),
            "inplace": lambda buf=buf, args=args, kw=kw: pgd_step_(buf, *args, **kw),
        }, device=device, warmup=20, calls=repeats, budget_s=budget_s)
        t_plain, t_fused, t_inplace = t["plain"].median, t["fused"].median, t["inplace"].median
        rows.append(dict(case=name, plain_ms=t_plain, fused_ms=t_fused, fused_inplace_ms=t_inplace,
                         speedup=t_plain / t_fused, speedup_inplace=t_plain / t_inplace,
                         spread={k: v.spread for k, v in t.items()},
                         untrusted=[k for k, v in t.items() if not v.trusted()]))
    return rows


def bench_pgd_attack(batch: int = 32, steps: int = 10, device: str = "cpu", repeats: int = 3) -> dict:
    """A full PGD attack on LeNet++ (100-D features + linear layer): total time and the step's share."""
    from torch import nn

    from lgm_ext import pgd_step_
    from lgm_ext.attacks import PGD

    from .models import LeNetPlusPlus

    if device == "cpu":
        flush_denormals(True)
    torch.manual_seed(0)
    model = nn.Sequential(LeNetPlusPlus(feat_dim=100), nn.Linear(100, 10)).to(device).eval()
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    atk = PGD(model, eps=0.3, alpha=0.01, steps=steps, seed=0)
    t_attack = median_ms(lambda: atk(x, y), repeats, 1, device)
    grad = torch.randn_like(x)
    buf = x.clone()
    t = interleaved_medians({
        "fused": (lambda: pgd_step_(buf, grad, x, alpha=0.01, eps=0.3), 200),
        "plain": (lambda: reference.pgd_step(buf, grad, x, alpha=0.01, eps=0.3), 200),
    }, 20, device)
    t_step, t_plain = t["fused"], t["plain"]
    return dict(batch=batch, steps=steps, attack_ms=t_attack, step_ms=t_step, plain_step_ms=t_plain,
                step_share=steps * t_step / t_attack, plain_step_share=steps * t_plain / t_attack)


def pgd_markdown(rows: list[dict], attack: dict | None) -> str:
    lines = ["| case | plain torch ms | fused ms | fused in-place ms | speed-up (in-place) |", "|---|---|---|---|---|"]

    def cell(r, key, side):
        spread = r.get("spread", {}).get(side)
        text = f"{r[key]:.4f}" + (f" ±{100 * spread:.0f}%" if spread is not None else "")
        return text + (UNTRUSTED_MARK if side in r.get("untrusted", ()) else "")

    for r in rows:
        lines.append(f"| {r['case']} | {cell(r, 'plain_ms', 'plain')} | {cell(r, 'fused_ms', 'fused')} | "
                     f"{cell(r, 'fused_inplace_ms', 'inplace')} | **{r['speedup']:.2f}x** "
                     f"({r['speedup_inplace']:.2f}x) |")
    bad = [f"{', '.join(r['untrusted'])} ({r['case']})" for r in rows if r.get("untrusted")]
    if bad:
        lines.append(f"\n{UNTRUSTED_MARK.strip()} Not to be trusted (spread above {100 * MAX_SPREAD:.0f}% or not "
                     "settled): " + "; ".join(bad) + ".")
    if attack:
        lines += ["", f"PGD-{attack['steps']} on LeNet++ (batch {attack['batch']}, 1x28x28): whole attack "
                  f"{attack['attack_ms']:.1f} ms; the fused step is {attack['step_ms']:.4f} ms per step = "
                  f"{100 * attack['step_share']:.2f}% of the attack (plain torch step: "
                  f"{attack['plain_step_ms']:.4f} ms, "
                  f"{100 * attack['plain_step_share']:.2f}%).  The attack is dominated by LeNet++'s forward+backward."]
    return "\n".join(lines)


__all__ = ["bench_pgd_step", "bench_pgd_attack", "pgd_markdown", "bench_lgm", "lgm_markdown", "flush_denormals",
           "machine_description", "machine_load", "measure", "median_ms", "Timing", "to_json", "loss_inputs",
           "loss_step", "synchronize"]

