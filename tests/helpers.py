import datetime
import gzip
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def lgm_inputs(n, k, d, *, dtype=torch.float64, device="cpu", identity=False, seed=0, spread=1.0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    mu = spread * torch.randn(k, d, generator=g, dtype=dtype)
    s = None if identity else 0.4 * torch.randn(k, d, generator=g, dtype=dtype)
    y = torch.randint(0, k, (n,), generator=g)
    out = [t.to(device) if t is not None else None for t in (x, mu, s, y)]
    if requires_grad:
        for t in out[:3]:
            if t is not None:
                t.requires_grad_()
    return out


def noncontiguous(t):
    """Same values, non-contiguous storage (every other column of a wider tensor)."""
    if t is None:
        return None
    wide = torch.empty(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
    wide[:, ::2] = t.detach()
    v = wide[:, ::2]
    assert not v.is_contiguous()
    return v.requires_grad_(t.requires_grad)


def write_idx(folder: Path, n_train=600, n_test=200, seed=0, labels_max=10):
    """Small Fashion-MNIST-format files: 10 classes, each a distinct bright block.  ``labels_max`` > 10
    writes labels out of range (for the data-validation tests)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = torch.randint(0, labels_max, (n,), generator=g)
        x = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
        for c in range(10):
            r, q = divmod(c, 5)
            x[y == c, 4 + 10 * r : 12 + 10 * r, 2 + 5 * q : 6 + 5 * q] = 230
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + x.numpy().tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + y.to(torch.uint8).numpy().tobytes())
    return folder


def tiny_config(src, **kw):
    """A run of seconds on ``write_idx`` data in ``src``: one epoch of 64 images, 2-D L-GM (``kw`` override)."""
    from lgm_lab.config import config_from_preset

    base = dict(epochs=1, subset=64, test_subset=32, batch_size=32, feat_dim=2, head="lgm", data_dir=str(src))
    base.update(kw)
    return config_from_preset(None, **base)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_process_group() -> None:
    """End a test worker's default gloo group together with its peers: a monitored barrier (every rank waits
    for the others; a rank that is gone makes it raise after 120 s instead of hanging), then
    ``destroy_process_group``.  A rank that tears down while a peer still uses the group can abort gloo
    ("terminate called without an active exception", SIGABRT): CI saw it in examples/train_ddp.py."""
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))
    finally:
        dist.destroy_process_group()


def lgm_cli(*args, cwd=None, env=None, timeout=600, preexec_fn=None):
    """The real `lgm` command (this interpreter's lgm_cli), its output captured; ``env`` is added to the
    environment."""
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lgm_cli.app", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, preexec_fn=preexec_fn)


def one_line(r, *words):
    """``r`` (a :func:`lgm_cli` result) failed as the CLI must: exit 2, one line on stderr naming ``words``, no
    traceback; returns that stderr."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    for w in words:
        assert w in r.stderr, r.stderr
    return r.stderr


def tiny_run(src, tmp_path_factory):
    """A tiny run trained on the IDX data ``src`` (:func:`tiny_config`) in a new folder: its path."""
    from lgm_lab.train import train

    out = tmp_path_factory.mktemp("run") / "a"
    train(tiny_config(src), out, progress=False)
    return out


def fitted_detector(run, tmp_path_factory):
    """A detector file `lgm detect fit` wrote for the run folder ``run``: its path."""
    path = tmp_path_factory.mktemp("det") / "det.pt"
    r = lgm_cli("detect", "fit", run / "checkpoint.pt", "--out", path, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    return path
