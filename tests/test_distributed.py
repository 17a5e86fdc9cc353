"""Issue 14: the class-sharded L-GM head and the synced center loss, in real gloo processes
(torch.multiprocessing spawn), against the single-process operators."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port as _free_port
from helpers import leave_process_group

import lgm_ext
from lgm_ext.distributed import shard_range


def _problem(n, k, d, dtype, labels_below=None):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    mu = torch.randn(k, d, generator=g, dtype=torch.float64).to(dtype)
    lv = (0.3 * torch.randn(k, d, generator=g, dtype=torch.float64)).to(dtype)
    top = labels_below if labels_below is not None else k
    y = torch.randint(0, top, (n,), generator=g)
    return x, mu, lv, y


def _rows(n, world, rank):
    # unequal row counts per rank: rank r gets n_r rows (the first ranks one more)
    return shard_range(n, world, rank)


def _worker(rank, world, port, out_dir, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from lgm_ext import CenterLoss
    from lgm_ext.distributed import ShardedLGMLoss

    results = {}
    try:
        for name, (n, k, d, dtype, cov, labels_below) in cases.items():
            x, mu, lv, y = _problem(n, k, d, dtype, labels_below)
            lo, hi = _rows(n, world, rank)
            head = ShardedLGMLoss(k, d, alpha=0.7, lambda_=0.2, covariance=cov).to(dtype)
            head.load_full(mu, lv if cov == "diag" else None)
            xl = x[lo:hi].clone().requires_grad_(True)
            loss = head(xl, y[lo:hi])
            loss.backward()
            results[name] = {
                "loss": loss.detach(), "feat_grad": xl.grad, "rows": (lo, hi), "classes": head.class_range,
                "means_grad": head.means.grad,
                "log_var_grad": None if head.log_var is None else head.log_var.grad,
                "logits": head.logits(x[lo:hi]).detach(), "predict": head.predict(x[lo:hi]),
                "log_likelihood": head.log_likelihood(x[lo:hi]),
            }
        # synced center loss: every rank updates from its own rows, the centers stay equal
        x, _, _, y = _problem(12, 5, 3, torch.float64)
        lo, hi = _rows(12, world, rank)
        c = CenterLoss(5, 3, alpha=0.5, sync=True).double()
        c.centers.copy_(torch.arange(15, dtype=torch.float64).reshape(5, 3))
        for _ in range(2):
            c(x[lo:hi], y[lo:hi])
        results["centers"] = c.centers.clone()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        leave_process_group()


CASES = {
    "f64_diag": (10, 7, 5, torch.float64, "diag", None),  # K = 7 not divisible by 2 or 3
    "f64_identity": (9, 7, 4, torch.float64, "identity", None),
    "f64_untouched_shard": (8, 9, 3, torch.float64, "diag", 3),  # labels only in the first classes
    "f32_diag": (16, 11, 8, torch.float32, "diag", None),
    "f64_more_ranks_than_classes": (6, 2, 3, torch.float64, "diag", None),
    "f64_gemm_recompute": (20, 601, 16, torch.float64, "diag", None),  # GEMM path, N > D: logits recomputed
    "bf16_more_ranks_than_classes": (6, 2, 4, torch.bfloat16, "diag", None),  # a classless rank in float32 too
}


def _run(world, tmp_path):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), CASES), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_head_equals_the_single_process_op(world, tmp_path):
    res = _run(world, tmp_path)
    for name, (n, k, d, dtype, cov, labels_below) in CASES.items():
        tol = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
               torch.bfloat16: dict(rtol=2 ** -7, atol=2 ** -7)}[dtype]
        x, mu, lv, y = _problem(n, k, d, dtype, labels_below)
        x, mu = x.clone().requires_grad_(True), mu.clone().requires_grad_(True)
        lv = lv.clone().requires_grad_(True) if cov == "diag" else None
        ref = lgm_ext.lgm_loss(x, mu, lv, y, alpha=0.7, lambda_=0.2)
        ref.backward()
        feat_grad = torch.cat([r[name]["feat_grad"] for r in res])
        means_grad = torch.cat([r[name]["means_grad"] for r in res])
        for r in res:
            torch.testing.assert_close(r[name]["loss"], ref.detach(), **tol)  # the same loss on every rank
        torch.testing.assert_close(feat_grad, x.grad, **tol)
        torch.testing.assert_close(means_grad, mu.grad, **tol)
        if cov == "diag":
            torch.testing.assert_close(torch.cat([r[name]["log_var_grad"] for r in res]), lv.grad, **tol)
        # logits: each rank's columns of the global batch; predict / log-likelihood of its own rows
        full_logits = lgm_ext.lgm_logits(x.detach(), mu.detach(), None if lv is None else lv.detach())
        torch.testing.assert_close(torch.cat([r[name]["logits"] for r in res], 1), full_logits, **tol)
        torch.testing.assert_close(torch.cat([r[name]["predict"] for r in res]), full_logits.argmax(1))
        ll = lgm_ext.lgm_log_likelihood(x.detach(), mu.detach(), None if lv is None else lv.detach())
        torch.testing.assert_close(torch.cat([r[name]["log_likelihood"] for r in res]), ll, **tol)
        assert [r[name]["classes"] for r in res] == [shard_range(k, world, q) for q in range(world)]
    # centers: identical on every rank and equal to the single-process update on the global batch
    x, _, _, y = _problem(12, 5, 3, torch.float64)
    single = lgm_ext.CenterLoss(5, 3, alpha=0.5).double()
    single.centers.copy_(torch.arange(15, dtype=torch.float64).reshape(5, 3))
    for _ in range(2):
        single(x, y)
    for r in res:
        torch.testing.assert_close(r["centers"], single.centers, rtol=1e-12, atol=1e-12)


def test_shard_ranges_cover_the_classes():
    for k in (1, 2, 7, 10, 10575):
        for w in (1, 2, 3, 4, 8):
            ranges = [shard_range(k, w, r) for r in range(w)]
            assert ranges[0][0] == 0 and ranges[-1][1] == k
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_sharded_head_needs_an_initialized_group():
    from lgm_ext.distributed import ShardedLGMLoss

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedLGMLoss(10, 4)


# ----------------------------------------------------------------------------- data-parallel training
@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from helpers import write_idx

    return write_idx(tmp_path_factory.mktemp("idx"), n_train=64, n_test=16)


@pytest.mark.parametrize("head", ["center", "lgm"])
def test_two_rank_ddp_equals_one_process(src, tmp_path, head):
    """`lgm train --nproc 2` with the same global batch reaches the weights of the 1-process run; the
    center-loss centers (synced updates) and the L-GM step counter agree too."""
    from lgm_lab.checkpoints import load_checkpoint
    from lgm_lab.config import config_from_preset
    from lgm_lab.launch import train_data_parallel
    from lgm_lab.train import train

    # two steps (float32 rounding differs between a batch of 32 and two of 16, and training amplifies it:
    # after 4 steps the centers agree only to ~1e-4)
    cfg = config_from_preset(None, head=head, epochs=1, subset=64, test_subset=16, batch_size=32, feat_dim=2,
                             data_dir=str(src), device="cpu", warmup_epochs=0.5)
    train(cfg, tmp_path / "one", progress=False)
    res = train_data_parallel(cfg, tmp_path / "two", 2, progress=False)
    assert res.epochs_done == 1
    a, b = load_checkpoint(tmp_path / "one" / "checkpoint.pt"), load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    for part in ("model", "head"):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=f"{part}.{k}": f"{name}: {m}")
    for x, y in zip(a["metrics"], b["metrics"]):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["train_accuracy"] == pytest.approx(y["train_accuracy"])


def test_ddp_errors_come_back_as_one_line(src, tmp_path):
    from typer.testing import CliRunner

    from lgm_cli.app import app

    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--nproc", "2", "--batch-size", "33",
                                 "--subset", "64", "--data-dir", str(src), "--no-progress", "--epochs", "1"])
    assert r.exit_code == 2 and "multiple" in r.output
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--nproc", "2", "--subset", "64",
                                 "--data-dir", str(tmp_path / "missing"), "--no-progress", "--epochs", "1"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output


def test_the_documented_torchrun_line_trains(src, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "lgm_cli.app", "train",
           "--out", str(tmp_path / "run"), "--data-dir", str(src), "--subset", "64", "--test-subset", "16",
           "--batch-size", "32", "--epochs", "1", "--feat-dim", "2", "--head", "center", "--no-progress",
           "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("test error") == 1  # rank 0 alone reports
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_the_epoch_order_is_the_one_earlier_runs_trained_with(src):
    """The explicit permutation shared by 1- and N-process training reproduces the order of
    DataLoader(shuffle=True, generator=g), which lgm-ext 0.2 used: earlier runs stay reproducible."""
    from torch.utils.data import DataLoader

    from lgm_lab.config import config_from_preset
    from lgm_lab.data import load_dataset
    from lgm_lab.train import epoch_batches as _loader

    cfg = config_from_preset(None, subset=64, batch_size=24, data_dir=str(src), seed=3)
    ds = load_dataset(cfg.dataset, True, data_dir=cfg.data_dir, subset=64, seed=3)
    for epoch in (0, 1):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        old = [y.tolist() for _, y in DataLoader(ds, batch_size=24, shuffle=True, generator=g)]
        assert [y.tolist() for _, y, _n in _loader(ds, cfg, epoch)] == old
        two = [[y.tolist() for _, y, _n in _loader(ds, cfg, epoch, r, 2)] for r in range(2)]
        assert [sorted(a + b) for a, b in zip(*two)] == [sorted(b) for b in old]


def test_batchnorm_models_need_gpus_for_data_parallel(src, tmp_path):
    """resnet20 has BatchNorm: per-rank statistics would not be the global batch's; on CPU (no
    SyncBatchNorm) data-parallel training is refused with a clear message."""
    from lgm_lab.config import config_from_preset
    from lgm_lab.launch import train_data_parallel

    cfg = config_from_preset(None, model="resnet20", dataset="fashion-mnist", epochs=1, subset=64, batch_size=32,
                             feat_dim=2, data_dir=str(src), device="cpu")
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        train_data_parallel(cfg, tmp_path / "bn", 2, progress=False)


# ---- the operator contract behind the sharded head, in one process (no gloo): the class_offset partials
def _combine(parts):
    """Global (lse, q, per-row loss) from per-shard (loss_r, stats_r, owned) -- the formula of
    lgm_ext.distributed._combine_shard_stats without communication."""
    lse = torch.logsumexp(torch.stack([st[:, 0] for _, st, _ in parts]), 0)
    q = sum(st[:, 1] * (st[:, 0] - lse).exp() for _, st, _ in parts)
    a = sum(torch.where(own, loss - st[:, 0], torch.zeros_like(loss)) for loss, st, own in parts)
    return lse, q, lse + a


@pytest.mark.parametrize("impl", [1, 2])  # direct, GEMM
@pytest.mark.parametrize("n,k,d,shards", [(9, 7, 5, 3), (12, 40, 6, 4), (20, 601, 16, 2)])
@pytest.mark.parametrize("identity", [False, True])
def test_class_offset_partials_combine_to_the_full_loss(device, impl, n, k, d, shards, identity):
    from helpers import lgm_inputs

    ops = torch.ops.lgm_ext
    x, mu, s, y = lgm_inputs(n, k, d, device=device, identity=identity, requires_grad=False)
    y[: n // 2] = 0  # some shards own no label of the batch
    loss, logits, stats = ops.lgm_loss_forward(x, mu, s, y, 0.7, 0.2, 0, impl)
    g = torch.linspace(0.5, 1.5, n, dtype=x.dtype, device=x.device)
    gx, gmu, gs = ops.lgm_loss_backward(g, None, x, mu, s, y, logits, stats, 0.7, 0.2, 0, impl)
    parts, shard_logits = [], []
    for r in range(shards):
        lo, hi = shard_range(k, shards, r)
        sv = None if s is None else s[lo:hi]
        lr, lg, st = ops.lgm_loss_forward(x, mu[lo:hi], sv, y, 0.7, 0.2, 0, impl, lo)
        parts.append((lr, st, (y >= lo) & (y < hi)))
        shard_logits.append(lg)
    lse, q, rows = _combine(parts)
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows, loss, **tol)
    torch.testing.assert_close(torch.stack([lse, q], 1), stats, **tol)
    torch.testing.assert_close(torch.cat(shard_logits, 1), logits, **tol)
    # backward with the global statistics: exact shard gradients, feature gradient = sum over shards
    gstats = torch.stack([lse, q], 1)
    gx_sum = torch.zeros_like(x)
    for r in range(shards):
        lo, hi = shard_range(k, shards, r)
        sv = None if s is None else s[lo:hi]
        for saved in (shard_logits[r], None):  # saved logits, or recomputed per class tile
            bx, bmu, bs = ops.lgm_loss_backward(g, None, x, mu[lo:hi], sv, y, saved, gstats, 0.7, 0.2, 0, impl,
                                                [True, True, True], lo)
            torch.testing.assert_close(bmu, gmu[lo:hi], **tol)
            if s is not None:
                torch.testing.assert_close(bs, gs[lo:hi], **tol)
        gx_sum += bx
    torch.testing.assert_close(gx_sum, gx, **tol)


def test_class_offset_is_validated_and_not_differentiable_alone():
    from helpers import lgm_inputs

    ops = torch.ops.lgm_ext
    x, mu, s, y = lgm_inputs(6, 4, 3)
    with pytest.raises(ValueError, match="class_offset must be >= 0"):
        ops.lgm_loss_forward(x, mu, s, y, 1.0, 0.1, 0, 0, -1)
    with pytest.raises(ValueError, match="reduction must be 0"):
        ops.lgm_loss_forward(x, mu, s, y, 1.0, 0.1, 1, 0, 2)
    loss, _, _ = ops.lgm_loss_forward(x, mu, s, y + 10, 1.0, 0.1, 0, 0, 10)  # global labels 10..13
    with pytest.raises(RuntimeError, match="ShardedLGMLoss"):
        loss.sum().backward()
    # without class_offset the labels are still range-checked
    with pytest.raises(ValueError, match=r"labels must lie in \[0, K\)"):
        ops.lgm_loss_forward(x, mu, s, y + 10, 1.0, 0.1, 0, 0)


def test_class_offset_fake_kernel_validates_like_the_op():
    from helpers import lgm_inputs
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, mu, s, y = lgm_inputs(6, 5, 3, requires_grad=False)
    with FakeTensorMode() as mode:
        fx, fmu, fs, fy = (mode.from_tensor(t) for t in (x, mu, s, y))
        with pytest.raises(RuntimeError, match="class_offset must be >= 0"):
            torch.ops.lgm_ext.lgm_loss_forward(fx, fmu, fs, fy, 1.0, 0.1, 0, 0, -1)
        with pytest.raises(RuntimeError, match="reduction must be 0"):
            torch.ops.lgm_ext.lgm_loss_forward(fx, fmu, fs, fy, 1.0, 0.1, 1, 0, 2)


def test_class_offset_opcheck():
    from helpers import lgm_inputs

    x, mu, s, y = lgm_inputs(6, 5, 3, requires_grad=False)
    torch.library.opcheck(torch.ops.lgm_ext.lgm_loss_forward.default, (x, mu, s, y + 3, 1.0, 0.1, 0, 0, 3),
                          test_utils=("test_schema", "test_faketensor"))
