"""A plain PyTorch training loop with the L-GM head, using only the core library (lgm_ext + torch).

Data: a synthetic 10-class problem (Gaussian blobs in 32-D seen through a random
non-linear map), so the example runs anywhere in seconds.  After training, the
head's log-likelihood flags inputs that are far from every class (here: uniform
noise) -- the "reject abnormal inputs" use of the L-GM paper (section 4.3).

    python examples/train_core.py [--steps 300] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import lgm_ext


def make_data(n: int, num_classes: int = 10, dim: int = 32, seed: int = 0):
    """``n`` samples; the problem (class centers, map) is fixed, ``seed`` draws the samples."""
    problem = torch.Generator().manual_seed(1234)
    centers = 3.0 * torch.randn(num_classes, dim, generator=problem) / dim**0.5
    mix = torch.randn(dim, dim, generator=problem) / dim**0.5
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    x = centers[labels] + 0.3 * torch.randn(n, dim, generator=g) / dim**0.5
    return torch.tanh(4.0 * x @ mix), labels


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    x, y = make_data(8192)
    x_test, y_test = make_data(2048, seed=1)
    net = nn.Sequential(nn.Linear(32, 128), nn.PReLU(), nn.Linear(128, 16)).to(args.device)  # 16-D features
    # The library head: alpha and lambda_ ramp from 0 over the first 100 steps (no NaN at the start).
    head = lgm_ext.LGMLoss(10, 16, alpha=1.0, lambda_=0.1, warmup_steps=100).to(args.device)
    # The head's parameters (means, log-variances) learn 10x faster than the network.
    opt = torch.optim.SGD(lgm_ext.param_groups(net, head, lr=0.05, head_lr_mult=10.0), lr=0.05, momentum=0.9)

    for step in range(args.steps):
        i = torch.randint(0, len(x), (args.batch_size,))
        loss, logits = head(net(x[i].to(args.device)), y[i].to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            acc = (logits.argmax(1).cpu() == y[i]).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.4f}  batch accuracy {100 * acc:.1f}%")

    net.eval(), head.eval()
    with torch.no_grad():
        f = net(x_test.to(args.device))
        error = (head.predict(f).cpu() != y_test).float().mean().item()
        ll_clean = head.log_likelihood(f).cpu()
        ll_noise = head.log_likelihood(net(torch.rand(2048, 32, device=args.device) * 2 - 1)).cpu()
    threshold = ll_clean.quantile(0.05)  # accept 95% of normal inputs
    rejected = (ll_noise < threshold).float().mean().item()
    print(f"test error {100 * error:.2f}%; noise inputs rejected at the 95%-acceptance threshold: "
          f"{100 * rejected:.1f}%")
    return {"test_error": error, "noise_rejected": rejected}


if __name__ == "__main__":
    main()
