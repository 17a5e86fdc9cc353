#!/usr/bin/env python
"""Scale table of the class-sharded L-GM head (lgm_ext.distributed.ShardedLGMLoss) against the
unsharded fused op: per-rank peak memory and step time (forward + backward) for K classes, D feature
dimensions, a global batch of N, on 1/2/4 local gloo processes; and a projection of the bytes each rank
moves per step on 8-64 GPUs.

    python benchmarks/bench_sharded.py                     # print
    python benchmarks/bench_sharded.py --write             # also rewrite the section in RESULTS.md
    python benchmarks/bench_sharded.py --rates 1,0.3,0.1 --sizes 100000,1000000 --worlds 2,4 --write
                                                           # class sampling (Partial FC): section sharded-sampling-cpu

With ``--rates``: per (K, W), the step time of each sample rate measured in one process group, the rates
interleaved round by round (medians of ``--repeats`` rounds after a warm-up round), and each rate's peak memory
from its own processes.

Memory: the growth of each process's resident-set high-water mark over the step (parameters, their
gradients, logits and temporaries), so it includes allocator slack; on this CPU the ranks share the
machine's cores, so the times are indicative only -- memory is the point.
"""
import argparse
import os
import pathlib
import resource
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from results_file import replace_section


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker(rank, world, port, k, d, n, repeats, queue, rate=1.0):
    import lgm_ext
    from lgm_ext._testing import flush_denormals
    from lgm_ext.distributed import ShardedLGMLoss, shard_range

    flush_denormals()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    g = torch.Generator().manual_seed(0)
    lo, hi = shard_range(n, world, rank)
    x = torch.randn(n, d, generator=g)[lo:hi].clone().requires_grad_(True)
    y = torch.randint(0, k, (n,), generator=g)[lo:hi].clone()
    if world > 1:  # the process group's own buffers are not the head's memory: measure from here
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        dist.barrier()
    base = _rss_mib()
    if world == 1:
        mu = torch.randn(k, d, requires_grad=True)
        lv = torch.zeros(k, d, requires_grad=True)

        def step():
            loss = lgm_ext.lgm_loss(x, mu, lv, y, alpha=1.0, lambda_=0.1)
            loss.backward()
    else:
        head = ShardedLGMLoss(k, d, alpha=1.0, lambda_=0.1, sample_rate=rate)

        def step():
            loss = head(x, y)
            loss.backward()
            head.zero_grad(set_to_none=True)
    times = []
    for i in range(repeats + 1):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - t0)
    queue.put((rank, _rss_mib() - base, sorted(times)[len(times) // 2]))
    if world > 1:
        dist.destroy_process_group()


def run(k, d, n, world, repeats, rate=1.0):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()  # every rank needs the same one
    procs = [ctx.Process(target=_worker, args=(r, world, port, k, d, n, repeats, q, rate)) for r in range(world)]
    for p in procs:
        p.start()
    out = [q.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"rank exited with {p.exitcode}")
    mem = max(m for _, m, _ in out)
    t = max(s for _, _, s in out)
    return mem, t


def _interleaved_worker(rank, world, port, k, d, n, rates, repeats, queue):
    from lgm_ext._testing import flush_denormals
    from lgm_ext.distributed import ShardedLGMLoss, shard_range

    flush_denormals()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    g = torch.Generator().manual_seed(0)
    lo, hi = shard_range(n, world, rank)
    x = torch.randn(n, d, generator=g)[lo:hi].clone().requires_grad_(True)
    y = torch.randint(0, k, (n,), generator=g)[lo:hi].clone()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    head = ShardedLGMLoss(k, d, alpha=1.0, lambda_=0.1)
    times = {r: [] for r in rates}
    for i in range(repeats + 1):
        for r in rates:  # interleaved: each round times every rate once
            head.sample_rate = r
            dist.barrier()
            t0 = time.perf_counter()
            head(x, y).backward()
            head.zero_grad(set_to_none=True)
            if i:  # round 0 warms up
                times[r].append(time.perf_counter() - t0)
    queue.put((rank, {r: sorted(v)[len(v) // 2] for r, v in times.items()}))
    dist.destroy_process_group()


def run_interleaved(k, d, n, world, rates, repeats):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_interleaved_worker, args=(r, world, port, k, d, n, rates, repeats, q))
             for r in range(world)]
    for p in procs:
        p.start()
    out = [q.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"rank exited with {p.exitcode}")
    return {r: max(t[r] for _, t in out) for r in rates}


def sampling_table(a) -> str:
    from lgm_ext._sampling import sample_size

    rates = [float(v) for v in a.rates.split(",")]
    rows = ["| K | ranks | r | classes computed per rank (of K_r) | per-rank peak memory growth (MiB) | step time (s, "
            "slowest rank, median, rates interleaved) | vs r = 1 |", "|---|---|---|---|---|---|---|"]
    for k in (int(v) for v in a.sizes.split(",")):
        for w in (int(v) for v in a.worlds.split(",")):
            if w < 2:
                continue
            times = run_interleaved(k, a.d, a.n, w, rates, a.repeats)
            kr = -(-k // w)
            for r in rates:
                mem, _ = run(k, a.d, a.n, w, 1, r)
                ratio = f"{times[1.0] / times[r]:.2f}× faster" if r < 1 and 1.0 in times else "-"
                rows.append(f"| {k:,} | {w} | {r:g} | ≥ {sample_size(r, kr, 0):,} of {kr:,} | {mem:.0f} | "
                            f"{times[r]:.3f} | {ratio} |")
                print(rows[-1], flush=True)
    return "\n".join(rows)


def projection(k=1_000_000, d=512, n_per_gpu=256, worlds=(8, 16, 32, 64)) -> str:
    """Bytes per rank per step of the sharded head (float32; ring all-reduce moves 2(W-1)/W of the
    buffer per rank, all-gather (W-1)/W), and the class parameters' memory per rank (means, log_var,
    their gradients and SGD momentum: 6 K D / W floats)."""
    rows = ["| GPUs W | global N | class params + grads + momentum per rank | all-gather features+labels | "
            "forward all-reduces (N max, 3N sum) | backward all-reduce N x D | total moved per rank |",
            "|---|---|---|---|---|---|---|"]
    for w in worlds:
        n = n_per_gpu * w
        params = 6 * k * d / w * 4
        gather = (w - 1) / w * n * (d * 4 + 8)
        small = 2 * (w - 1) / w * (n + 3 * n) * 4
        back = 2 * (w - 1) / w * n * d * 4
        total = gather + small + back
        rows.append(f"| {w} | {n} | {params / 2**30:.2f} GiB | {gather / 2**20:.1f} MiB | {small / 2**20:.2f} MiB | "
                    f"{back / 2**20:.1f} MiB | {total / 2**20:.1f} MiB |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10575,100000,1000000", help="class counts K")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", action="store_true")
    p.add_argument("--rates", default=None, help="sample rates (class sampling): the sharded-sampling-cpu table")
    a = p.parse_args(argv)
    if a.rates:
        table = sampling_table(a)
        if a.write:
            body = (f"Command: `python benchmarks/bench_sharded.py --rates {a.rates} --sizes {a.sizes} --worlds "
                    f"{a.worlds} --repeats {a.repeats} --write` (D = {a.d}, global N = {a.n}, float32, forward + "
                    "backward of the loss, uniform labels, gloo processes on this 2-core CPU shared with other "
                    "jobs).\n\n" + table + "\n")
            replace_section(pathlib.Path(__file__).with_name("RESULTS.md"), "sharded-sampling-cpu", body)
            print("wrote RESULTS.md", file=sys.stderr)
        return
    rows = ["| K | ranks | classes per rank | class params + grads per rank (MiB) | per-rank peak memory growth (MiB) "
            "| step time (s, slowest rank, median) |", "|---|---|---|---|---|---|"]
    for k in (int(v) for v in a.sizes.split(",")):
        for w in (int(v) for v in a.worlds.split(",")):
            mem, t = run(k, a.d, a.n, w, a.repeats)
            label = "1 (unsharded fused op)" if w == 1 else str(w)
            kr = -(-k // w)  # the largest shard
            params = 4 * kr * a.d * 4 / 2**20  # means, log_var and their gradients, float32
            rows.append(f"| {k:,} | {label} | {kr:,} | {params:.0f} | {mem:.0f} | {t:.3f} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    proj = projection()
    print(proj)
    if a.write:
        path = pathlib.Path(__file__).with_name("RESULTS.md")
        body = (f"Command: `python benchmarks/bench_sharded.py --write` (D = {a.d}, global N = {a.n}, float32, "
                "forward + backward of the loss, gloo processes on this 2-core CPU: times indicative, memory is "
                "the point).\n\n" + table + "\n\nProjection for K = 1,000,000 classes, D = 512, 256 images per GPU "
                "(formulas in `projection()`):\n\n" + proj + "\n")
        replace_section(path, "sharded-cpu", body)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
