"""Face-recognition scale with the class-sharded L-GM head and class sampling (Partial FC), on a synthetic task.

The task: identity k is a random unit vector v_k in R^D (drawn from a counter-based hash of (seed, k, j), so no
rank stores the K x D table); an image of k is x = F(v_k + s_id * e) + B p + s_px * n, with e ~ N(0, I/D) the
identity's variation, F a fixed random map R^D -> R^2D (a tanh layer between two linear ones), B an orthonormal
2D x m basis of a fixed "nuisance" subspace (pose, illumination) with p ~ N(0, s_p^2 I_m) drawn per image and
independent of the identity, and n ~ N(0, I/2D) pixel noise.  The nuisance dominates the raw images (their
cosine similarity verifies almost nothing), so the backbone must learn to discard it and to undo F: a small MLP
(DistributedDataParallel) ending in BatchNorm with its scale fixed, as face backbones do; the head is
``lgm_ext.distributed.ShardedLGMLoss(K, D, sample_rate=r, ddp=True)``: each rank holds K/W means and
log-variances and, with r < 1, computes the loss over the batch's classes plus a uniform r-fraction of its others.

Each step every rank draws ``batch/S`` identities uniformly from [0, K) and S images of each, from a generator
seeded by (seed, step, rank), so a resumed run sees the same data.  Verification (rank 0, at the end): two fresh
images of each of E seen identities (from [0, K)) and E unseen ones (from [K, K + E)); cosine similarity of the
backbone's features; TAR at the threshold where the false-accept rate over all impostor pairs is 1e-3, beside
three references: the raw images, the raw images with the nuisance projected out (knowing the invariance
exactly), and the latent v + s_id e (the ceiling no backbone can pass).  ``--eval-every`` adds the TAR curve.

    torchrun --nproc-per-node 2 examples/train_face_scale.py --classes 10000 --steps 300 --sample-rate 0.3
    torchrun --nproc-per-node 2 examples/train_face_scale.py --classes 10000 --steps 600 --resume   # continue

Backend: gloo on CPU, NCCL when every local process has a GPU.  ``--timeout`` (seconds) is passed to
``init_process_group``: a rank that stalls makes its peers fail after that long instead of torch's default
(30 minutes).  Checkpoints: ``--out DIR`` holds ``rank{r}.pt`` per rank (the backbone, this rank's head shard,
the optimizer state, the step); written every ``--save-every`` steps and at the end; ``--resume`` continues
from them (same world size and arguments).  ``--metrics-json`` (rank 0) records the loss curve, per-rank step
time and peak memory, and the verification numbers (``benchmarks/bench_face_scale.py`` reads it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lgm_ext
from lgm_ext.distributed import ShardedLGMLoss


# ----------------------------------------------------------------------------- the synthetic task
def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2^32) that mixes its bits (int64 arithmetic, no overflow)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def identity_vectors(ids: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Unit vectors of identities ``ids``: standard-normal coordinates (Box-Muller on hashed counters)."""
    ctr = (ids[:, None] * dim + torch.arange(dim)) * 2
    salt = _hash32(torch.tensor(seed & 0xFFFFFFFF))
    u1 = (_hash32((ctr ^ salt) & 0xFFFFFFFF).double() + 0.5) / 2 ** 32
    u2 = (_hash32(((ctr + 1) ^ salt) & 0xFFFFFFFF).double() + 0.5) / 2 ** 32
    g = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    return nn.functional.normalize(g.float(), dim=1)


class Task:
    """Images of identities: x = F(v + s_id e) + B p + s_px n (module docstring)."""

    def __init__(self, dim: int, seed: int, s_id: float, s_px: float, nuisance_dim: int = 16,
                 s_nuis: float = 2.0) -> None:
        g = torch.Generator().manual_seed(seed + 17)
        self.dim, self.seed, self.s_id, self.s_px, self.s_nuis = dim, seed, s_id, s_px, s_nuis
        self.w1 = torch.randn(4 * dim, dim, generator=g) * (2.0 / math.sqrt(dim))
        self.w2 = torch.randn(2 * dim, 4 * dim, generator=g) / math.sqrt(4 * dim)
        # the nuisance subspace: m orthonormal directions of the image space, the same for every identity
        self.basis = torch.linalg.qr(torch.randn(2 * dim, nuisance_dim, generator=g))[0] if nuisance_dim else None

    def latent(self, ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        v = identity_vectors(ids, self.dim, self.seed)
        return v + self.s_id * torch.randn(v.shape, generator=g) / math.sqrt(self.dim)

    def images(self, z: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = torch.tanh(z @ self.w1.T) @ self.w2.T
        if self.basis is not None:  # the image's "pose/illumination" p ~ N(0, s_nuis^2 I_m), independent of identity
            x = x + (self.s_nuis * torch.randn(len(z), self.basis.shape[1], generator=g)) @ self.basis.T
        return x + self.s_px * torch.randn(x.shape, generator=g) / math.sqrt(x.shape[1])

    def remove_nuisance(self, x: torch.Tensor) -> torch.Tensor:
        """x with its component in the nuisance subspace projected out: the invariance, known exactly."""
        return x if self.basis is None else x - (x @ self.basis) @ self.basis.T

    def batch(self, num_classes: int, per_rank: int, per_id: int, step: int, rank: int, seed: int):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
        ids = torch.randint(0, num_classes, (per_rank // per_id,), generator=g).repeat_interleave(per_id)
        return self.images(self.latent(ids, g), g), ids


def make_task(args) -> Task:
    """The task of parsed arguments (a namespace or the metrics file's ``args`` dict)."""
    a = args if isinstance(args, dict) else vars(args)
    return Task(a["dim"], a["seed"], a["identity_noise"], a["pixel_noise"], a.get("nuisance_dim", 0),
                a.get("nuisance_scale", 0.0))


def backbone(dim: int, width: int) -> nn.Module:
    """An MLP whose embedding ends in BatchNorm1d with its scale fixed at 1, as insightface's face backbones do:
    the features keep unit variance per dimension, so the loss cannot shrink them all at once."""
    bn = nn.BatchNorm1d(dim)
    bn.weight.requires_grad_(False)
    return nn.Sequential(nn.Linear(2 * dim, width), nn.PReLU(), nn.Linear(width, width), nn.PReLU(),
                         nn.Linear(width, dim), bn)


def tar_at_far(emb: torch.Tensor, ids: torch.Tensor, far: float = 1e-3, chunk: int = 256) -> float:
    """TAR at the threshold whose false-accept rate over all impostor pairs is ``far`` (cosine similarity;
    genuine: pairs of images of one identity).  ``chunk`` rows of the similarity matrix at a time, keeping the
    largest impostor similarities only: a few MiB however many images."""
    e = nn.functional.normalize(emb.float(), dim=1)
    n = len(ids)
    counts = torch.unique(ids, return_counts=True)[1]
    k = max(1, int(far * (n * (n - 1) // 2 - int((counts * (counts - 1) // 2).sum()))))
    top, genuine = e.new_empty(0), []
    for lo in range(0, n, chunk):
        sim = e[lo:lo + chunk] @ e.T
        upper = torch.arange(n)[None, :] > torch.arange(lo, lo + len(sim))[:, None]
        same = ids[lo:lo + chunk, None] == ids[None, :]
        genuine.append(sim[upper & same])
        top = torch.cat([top, sim[upper & ~same]]).topk(min(k, top.numel() + int((upper & ~same).sum()))).values
    threshold = top[k - 1]
    return float((torch.cat(genuine) > threshold).double().mean())


def verification(task: Task, net: nn.Module, num_classes: int, identities: int, seed: int,
                 references: bool = True) -> dict:
    """TAR@FAR=1e-3 of the backbone's features on ``identities`` seen and as many unseen identities (two images
    each); with ``references``, also of the latent v + s_id e (the ceiling), of the raw images and of the raw
    images with the nuisance projected out (what knowing the invariance exactly, and nothing else, gives)."""
    g = torch.Generator().manual_seed(seed + 99)
    out, was_training = {}, net.training
    net.eval()
    for name, ids in (("seen", torch.randperm(num_classes, generator=g)[:identities]),
                      ("unseen", num_classes + torch.arange(identities))):
        ids = ids.repeat_interleave(2)
        z = task.latent(ids, g)
        x = task.images(z, g)
        with torch.no_grad():
            device = next(net.parameters()).device
            out[name] = tar_at_far(torch.cat([net(c.to(device)).cpu() for c in x.split(512)]), ids)
        if references:
            out[name + "_latent_ceiling"] = tar_at_far(z, ids)
            out[name + "_raw_images"] = tar_at_far(x, ids)
            out[name + "_nuisance_removed"] = tar_at_far(task.remove_nuisance(x), ids)
    net.train(was_training)
    return out


# ----------------------------------------------------------------------------- training
def _peak_mib() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _save(path: str, state: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=128, help="feature and identity dimension D")
    p.add_argument("--width", type=int, default=512, help="backbone hidden width")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128, help="images per rank per step")
    p.add_argument("--per-identity", type=int, default=4, help="images of each identity in a batch")
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--means-init", type=float, default=0.01,
                   help="standard deviation of the initial means (insightface: N(0, 0.01^2) class weights)")
    p.add_argument("--head-lr-mult", type=float, default=10.0)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--lambda", dest="lambda_", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=50, help="alpha and lambda ramp from 0 over these steps")
    p.add_argument("--identity-noise", type=float, default=1.0, help="s_id")
    p.add_argument("--pixel-noise", type=float, default=0.3, help="s_px")
    p.add_argument("--nuisance-dim", type=int, default=16, help="m, the nuisance subspace's dimension (0: none)")
    p.add_argument("--nuisance-scale", type=float, default=2.0, help="s_p, the nuisance's per-direction std")
    p.add_argument("--eval-identities", type=int, default=2000, help="identities per verification set (seen, unseen)")
    p.add_argument("--exact-loss-every", type=int, default=0,
                   help="every this many steps, the exact loss (all classes) of a fixed held-out batch; 0: never")
    p.add_argument("--eval-every", type=int, default=0,
                   help="every this many steps, verification TAR on rank 0 (the eval curve); 0: only at the end")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint period in steps (0: only at the end)")
    p.add_argument("--out", default=None, help="checkpoint folder (rank{r}.pt per rank)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a collective waits for a stalled peer before failing (init_process_group timeout)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: cores / local processes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics-json", default=None)
    a = p.parse_args(argv)
    if a.resume and not a.out:
        p.error("--resume needs --out")

    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=a.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1) // local_world))
    base_mib = _peak_mib()

    task = make_task(a)
    torch.manual_seed(a.seed)  # the same backbone on every rank (DDP also broadcasts rank 0's)
    net = DDP(backbone(a.dim, a.width).to(device), device_ids=[local] if use_cuda else None)
    head = ShardedLGMLoss(a.classes, a.dim, alpha=0.0, lambda_=0.0, ddp=True, sample_rate=a.sample_rate,
                          seed=a.seed).to(device)
    with torch.no_grad():
        head.means.mul_(a.means_init)  # the head draws N(0, 1) rows; in place, no K_r-sized temporary
    groups = lgm_ext.param_groups(net.module, head, lr=a.lr, head_lr_mult=a.head_lr_mult, weight_decay=5e-4,
                                  head_weight_decay=0.0)  # no decay of the head: unsampled rows stay put
    opt = torch.optim.SGD(groups, lr=a.lr, momentum=0.9)
    start, curve, exact_curve, eval_curve = 0, [], [], []
    ckpt = os.path.join(a.out, f"rank{rank}.pt") if a.out else None
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    if a.resume:
        state = torch.load(ckpt, map_location=device)
        if state["world"] != world or state["classes"] != a.classes:
            raise SystemExit(f"{ckpt} was written by {state['world']} ranks with {state['classes']} classes")
        net.module.load_state_dict(state["backbone"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        start, curve, exact_curve = state["step"], state["curve"], state["exact_curve"]
        eval_curve = state.get("eval_curve", [])
        if rank == 0:
            print(f"resumed at step {start}", flush=True)
    held_out = task.batch(a.classes, a.batch_size, a.per_identity, 10 ** 9, rank, a.seed)

    def exact_loss(step, chunk=8):
        """The loss over all K classes of the held-out batch, ``chunk`` rows per rank at a time (each call's
        (N, K_r) logits stay small: the peak memory measured is the training's)."""
        head.eval()
        net.module.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(0, a.batch_size, chunk):
                xs, ys = held_out[0][i:i + chunk].to(device), held_out[1][i:i + chunk].to(device)
                total += float(head(net.module(xs), ys)) * len(ys)
        head.train()
        net.module.train()
        exact_curve.append((step, total / a.batch_size))

    def evaluate(step):
        """Verification TAR of the backbone now (rank 0; the others wait outside the timed step)."""
        if rank == 0:
            v = verification(task, net.module, a.classes, a.eval_identities, a.seed, references=False)
            eval_curve.append((step, v["seen"], v["unseen"]))
            print(f"step {step}: TAR@FAR=1e-3 seen {v['seen']:.3f}, unseen {v['unseen']:.3f}", flush=True)
        dist.barrier()

    times = []
    loss = torch.tensor(float("nan"))
    for step in range(start, a.steps):
        if a.exact_loss_every and step % a.exact_loss_every == 0:
            exact_loss(step)
        if a.eval_every and step % a.eval_every == 0:
            evaluate(step)
        ramp = min(1.0, (step + 1) / a.warmup_steps) if a.warmup_steps else 1.0
        head.alpha, head.lambda_ = ramp * a.alpha, ramp * a.lambda_
        x, y = task.batch(a.classes, a.batch_size, a.per_identity, step, rank, a.seed)
        t0 = time.perf_counter()
        loss = head(net(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if use_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        loss = loss.detach()
        if not math.isfinite(float(loss)):
            raise SystemExit(f"non-finite loss at step {step}")
        if step % a.log_every == 0 or step == a.steps - 1:
            curve.append((step, float(loss)))
            if rank == 0:
                print(f"step {step}: loss {float(loss):.4f} ({times[-1]:.3f} s)", flush=True)
        if ckpt and a.save_every and (step + 1) % a.save_every == 0 and step + 1 < a.steps:
            _save(ckpt, {"step": step + 1, "world": world, "classes": a.classes, "backbone": net.module.state_dict(),
                         "head": head.state_dict(), "optimizer": opt.state_dict(), "curve": curve,
                         "exact_curve": exact_curve, "eval_curve": eval_curve})
    if a.exact_loss_every:
        exact_loss(a.steps)
    peak = _peak_mib() - base_mib  # the training's high-water mark (the verification below is not counted)
    if ckpt:
        _save(ckpt, {"step": a.steps, "world": world, "classes": a.classes, "backbone": net.module.state_dict(),
                     "head": head.state_dict(), "optimizer": opt.state_dict(), "curve": curve,
                     "exact_curve": exact_curve, "eval_curve": eval_curve})
    timed = sorted(times[min(2, len(times) - 1):]) if times else [float("nan")]  # the first steps warm up
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"peak_mib": peak, "step_s": timed[len(timed) // 2],
                                      "class_range": head.class_range})
    result = {}
    if rank == 0:
        result = {"args": vars(a), "world": world, "final_loss": float(loss), "curve": curve,
                  "exact_curve": exact_curve, "eval_curve": eval_curve, "ranks": per_rank,
                  "verification": verification(task, net.module, a.classes, a.eval_identities, a.seed)}
        v = result["verification"]
        print(f"final loss {float(loss):.4f}; verification TAR@FAR=1e-3: seen {v['seen']:.3f}, "
              f"unseen {v['unseen']:.3f} (raw images {v['unseen_raw_images']:.3f}, nuisance removed "
              f"{v['unseen_nuisance_removed']:.3f}, latent ceiling {v['unseen_latent_ceiling']:.3f}); "
              f"step {max(r['step_s'] for r in per_rank):.3f} s, peak {max(r['peak_mib'] for r in per_rank):.0f} MiB "
              f"per rank", flush=True)
        if a.metrics_json:
            with open(a.metrics_json, "w") as f:
                json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
