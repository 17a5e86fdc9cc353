"""Timing rules of the benchmarks (``lgm_lab.bench``, ``benchmarks/gpu_check.py``, ``lgm bench``): sides
interleaved in rotating rounds and repeated until their medians settle or a time budget ends, each reported with
its spread, so that a measurement taken while other work shared the machine says so instead of passing for a
number.  Torch only."""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch


def synchronize(device):
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_once(fn, device: str) -> float:
    if device.startswith("cuda"):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# A side whose timed calls spread wider than this (interquartile range / median) is reported as not to be trusted.
MAX_SPREAD = 0.10


@dataclass
class Timing:
    """The timed calls of one side, in ms: median, quartiles, count; ``settled``: the median moved by at most
    the tolerance in the last round (False when the time budget or the round limit ended the measurement)."""
    median: float
    q1: float
    q3: float
    calls: int
    rounds: int
    settled: bool

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else float("inf")

    def trusted(self, max_spread: float = MAX_SPREAD) -> bool:
        return self.settled and self.spread <= max_spread


def _timing(times: list, rounds: int, settled: bool) -> Timing:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), q[0], q[2], len(times), rounds, settled)


def measure(fns: dict, *, device: str = "cpu", warmup: int = 3, calls: int | None = None, min_rounds: int = 3,
            max_rounds: int = 40, budget_s: float = 30.0, tol: float = 0.02, block_ms: float = 25.0,
            time_call=None) -> dict:
    """Time each side of ``fns`` (name -> zero-argument callable), interleaved, until the medians settle.

    Every round runs each side once as a block: ``warmup`` untimed calls (so a side is not charged for the
    allocator and cache state the previous side left), then its timed calls; the order of the sides rotates
    from round to round, so a drift of the machine (clock, other jobs) falls on every side alike.  A block
    holds as many calls as take about ``block_ms`` (from the first warm-up call), at least one.

    Adaptive (``calls`` None): after ``min_rounds`` rounds it stops once every side's median over all its
    calls moved by at most ``tol`` (relative) in the last round -- or at ``max_rounds``, or when ``budget_s``
    seconds have passed (then the sides still moving are marked ``settled=False``).  Fixed (``calls`` given):
    exactly that many timed calls per side, over min(5, calls) rounds, no early stop; ``settled`` then says
    whether the last round moved the median by at most ``tol``.  ``time_call(fn) -> ms`` replaces the clock
    (tests); by default CUDA events on a GPU, perf_counter on the CPU.  Returns name -> Timing."""
    time_call = time_call or (lambda fn: _time_once(fn, device))
    names = list(fns)
    start = time.perf_counter()
    per_block = {}
    for name in names:  # the block size, from one call after the warm-up (a compile, lazy initialisation)
        for _ in range(max(1, warmup)):
            fns[name]()
        per_block[name] = max(1, min(1000, int(block_ms / max(time_call(fns[name]), 1e-3))))
    if calls is not None:
        rounds = max(1, min(5, calls))
        per_block = {name: -(-calls // rounds) for name in names}
        max_rounds = rounds
    times = {name: [] for name in names}
    medians = {name: None for name in names}
    moved = {name: True for name in names}
    rnd = 0
    while rnd < max_rounds:
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            fn = fns[name]
            for _ in range(max(1, warmup)):
                fn()
            synchronize(device)
            block = per_block[name] if calls is None else min(per_block[name], calls - len(times[name]))
            for _ in range(max(0, block)):
                times[name].append(time_call(fn))
        rnd += 1
        for name in names:
            m = statistics.median(times[name])
            moved[name] = medians[name] is None or abs(m - medians[name]) > tol * m
            medians[name] = m
        if calls is None and rnd >= min_rounds and not any(moved.values()):
            break
        if calls is None and time.perf_counter() - start > budget_s:
            break
    return {name: _timing(times[name], rnd, not moved[name]) for name in names}


def median_ms(fn, repeats: int, warmup: int, device: str = "cpu") -> float:
    return interleaved_medians({"f": (fn, repeats)}, warmup, device, rounds=1)["f"]


def interleaved_medians(fns: dict, warmup: int, device: str = "cpu", rounds: int = 5) -> dict:
    """Median ms of each ``name: (fn, repeats)`` from exactly ``repeats`` timed calls, the sides alternating in
    blocks over ``rounds`` rounds (see :func:`measure`, which also reports the spread and stops adaptively)."""
    times = {name: [] for name in fns}
    for rnd in range(rounds):
        for name, (fn, reps) in fns.items():
            block = -(-reps // rounds)
            for _ in range(max(1, warmup)):
                fn()
            synchronize(device)
            for _ in range(min(block, reps - rnd * block)):
                times[name].append(_time_once(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def machine_load() -> float:
    """The 1-minute load average divided by the number of cores (above ~1: other work shares the cores)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return -1.0
