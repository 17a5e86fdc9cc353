"""Data-parallel training with DistributedDataParallel and the L-GM head (lgm_ext + torch only).

Each process trains on its shard of the data (DistributedSampler); the model and
the head are wrapped together in one DDP module, so the gradients of the means
and log-variances are averaged across processes like any other parameter.
Backend: gloo on CPU, NCCL when every process has a GPU.

    python examples/train_ddp.py --nproc 2 [--epochs 3]

or with torchrun (one process per device):

    torchrun --nproc-per-node 2 examples/train_ddp.py --torchrun
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from train_core import make_data  # the same synthetic problem as the single-process example

import lgm_ext


class Classifier(nn.Module):
    """Feature network + L-GM head in one module, so DDP synchronises both."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.PReLU(), nn.Linear(128, 16))
        self.head = lgm_ext.LGMLoss(10, 16, alpha=1.0, lambda_=0.1, warmup_steps=50)

    def forward(self, x, y):
        return self.head(self.net(x), y)


def run(rank: int, world: int, epochs: int, port: int) -> None:
    if port:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}" if use_cuda else "cpu")
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = DDP(Classifier().to(device), device_ids=[rank] if use_cuda else None)
    groups = lgm_ext.param_groups(model.module.net, model.module.head, lr=0.05, head_lr_mult=10.0)
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    x, y = make_data(8192)
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2, device=device)
        for xb, yb in DataLoader(data, batch_size=64, sampler=sampler):
            loss, _ = model(xb.to(device), yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += torch.stack([loss.detach() * len(yb), torch.tensor(float(len(yb)), device=device)])
        dist.all_reduce(total)  # the epoch's mean loss over all processes
        if rank == 0:
            print(f"epoch {epoch + 1}: mean training loss {total[0].item() / total[1].item():.4f} "
                  f"({world} processes)")
    if rank == 0:
        xt, yt = make_data(2048, seed=1)
        model.eval()
        with torch.no_grad():
            err = (model.module.head.predict(model.module.net(xt.to(device))).cpu() != yt).float().mean().item()
        print(f"test error {100 * err:.2f}%")
    # Tear down together: every process waits here until rank 0 has evaluated, and the DDP module (which holds
    # the process group) goes first -- a process that exits while its peer still uses the group can abort in
    # gloo's teardown ("terminate called without an active exception").
    dist.barrier()
    del model, opt, groups
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn (ignored with --torchrun)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--port", type=int, default=29517, help="rendezvous port on 127.0.0.1 (spawn mode)")
    p.add_argument("--torchrun", action="store_true", help="started by torchrun: read RANK and WORLD_SIZE")
    args = p.parse_args(argv)
    if args.torchrun:
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args.epochs, 0)
    else:
        mp.spawn(run, args=(args.nproc, args.epochs, args.port), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
