#!/usr/bin/env python
"""Where LeNet++ training and evaluation time goes on the CPU, and what PyTorch's options buy (issue 24).

Sides, timed interleaved in one process (medians of blocks; 2 threads unless --threads):

- training step (LeNet++ 100-D + L-GM head, batch 128, SGD + Nesterov): the lab's step (lgm_ext.Classifier,
  as lgm_lab.train runs it), a bare PyTorch loop of the same model and optimizer, channels_last, and the
  backbone under torch.compile (inductor; compiled in untimed warm-up steps);
- evaluation (no gradients): batch 512 under no_grad (what lgm_lab.evaluation does), inference_mode,
  batch 1024, channels_last.

    python benchmarks/bench_training.py            # print the tables
    python benchmarks/bench_training.py --write    # also rewrite the "training-cpu" section of RESULTS.md
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from results_file import replace_section

from lgm_ext import Classifier
from lgm_lab import bench
from lgm_lab.heads import build_head
from lgm_lab.models import LeNetPlusPlus


def _parts(seed: int = 0, channels_last: bool = False):
    torch.manual_seed(seed)
    model, head = LeNetPlusPlus(feat_dim=100), build_head("lgm", 100, 10, warmup_steps=100)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9, nesterov=True)
    return model, head, opt


def training_sides(batch: int = 128) -> dict:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)
    xc = x.contiguous(memory_format=torch.channels_last)
    sides = {}

    def lab_step(net, opt, images):
        loss, _ = net(images, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model, head, opt = _parts()
    net = Classifier(model, head)
    sides["lab step (eager)"] = lambda: lab_step(net, opt, x)

    model_b, head_b, opt_b = _parts()

    def bare():
        loss, _ = head_b(model_b(x), y)
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        opt_b.step()

    sides["bare PyTorch loop"] = bare
    model_c, head_c, opt_c = _parts(channels_last=True)
    net_c = Classifier(model_c, head_c)
    sides["channels_last"] = lambda: lab_step(net_c, opt_c, xc)
    model_t, head_t, opt_t = _parts()
    net_t = Classifier(torch.compile(model_t), head_t)
    sides["torch.compile(backbone)"] = lambda: lab_step(net_t, opt_t, x)
    return sides


def evaluation_sides() -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2048, 1, 28, 28, generator=g)
    model, head, _ = _parts()
    model.eval()
    model_c, _, _ = _parts(channels_last=True)
    model_c.eval()
    xc = x.contiguous(memory_format=torch.channels_last)

    def run(m, images, batch, mode):
        with mode():
            for i in range(0, len(images), batch):
                head.predict(m(images[i:i + batch]))

    return {
        "no_grad, batch 512": lambda: run(model, x, 512, torch.no_grad),
        "inference_mode, batch 512": lambda: run(model, x, 512, torch.inference_mode),
        "inference_mode, batch 1024": lambda: run(model, x, 1024, torch.inference_mode),
        "channels_last, inference_mode, batch 512": lambda: run(model_c, xc, 512, torch.inference_mode),
    }


def measure(sides: dict, repeats: int, images: int) -> list[tuple[str, float, float]]:
    ms = bench.interleaved_medians({k: (f, repeats) for k, f in sides.items()}, warmup=3, rounds=5)
    base = next(iter(ms.values()))
    return [(k, v, images / (v / 1e3)) for k, v in ms.items()] if base else []


def markdown(title: str, rows, unit: str) -> str:
    first = rows[0][1]
    lines = [f"| {title} | ms | {unit} | vs first |", "|---|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {rate:.0f} | {first / v:.2f}x |" for k, v, rate in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    bench.flush_denormals(True)
    train_rows = measure(training_sides(), a.repeats, 128)
    eval_rows = measure(evaluation_sides(), max(3, a.repeats // 5), 2048)
    text = (markdown("training step, batch 128", train_rows, "images/s") + "\n\n"
            + markdown("evaluation of 2,048 images", eval_rows, "images/s"))
    print(text)
    if a.write:
        path = pathlib.Path(__file__).with_name("RESULTS.md")
        body = (f"Command: `python benchmarks/bench_training.py --write` ({a.threads} threads; medians of "
                f"interleaved blocks).\n\nMachine: {bench.machine_description('cpu')}.\n\n" + text + "\n")
        replace_section(path, "training-cpu", body)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
