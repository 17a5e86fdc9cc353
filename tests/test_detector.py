"""Issue 25: lgm_ext.LikelihoodDetector -- fit / calibrate / score / reject / state_dict, against Gaussians
with a known answer, the L-GM heads (single device and class-sharded over gloo), every dtype and device."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port as _free_port
from helpers import leave_process_group

import lgm_ext
from lgm_ext import LikelihoodDetector
from lgm_ext import _gaussians as gaussians_module

F64 = torch.float64
KINDS = ("tied", "diag", "identity")
SCORES = ("likelihood", "mixture", "max_posterior")


def _truth(k=3, d=4, seed=0):
    """Known class means (well separated) and one full covariance (condition number ~10)."""
    g = torch.Generator().manual_seed(seed)
    means = 4.0 * torch.randn(k, d, generator=g, dtype=F64)
    a = torch.randn(d, d, generator=g, dtype=F64)
    return means, a @ a.T / d + 0.5 * torch.eye(d, dtype=F64)


def _sample(means, cov, n_per, seed, scales=None):
    """n_per points of each class from N(means[k], cov) (times scales[k]**2 per dimension when given)."""
    g = torch.Generator().manual_seed(seed)
    k, d = means.shape
    y = torch.arange(k).repeat_interleave(n_per)
    z = torch.randn(k * n_per, d, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
    if scales is not None:
        z = z * scales[y]
    return means[y] + z, y


def _hand_log_densities(x, means, covs):
    """log N(x; mu_k, Sigma_k) (N, K) in float64 by the textbook formula (solve + slogdet), covs (K, D, D)."""
    x, d = x.to(F64), x.shape[1]
    cols = []
    for mu, cov in zip(means, covs):
        diff = x - mu
        maha = (diff * torch.linalg.solve(cov, diff.T).T).sum(1)
        cols.append(-0.5 * maha - 0.5 * torch.linalg.slogdet(cov)[1] - 0.5 * d * math.log(2 * math.pi))
    return torch.stack(cols, 1)


def _covs_of(det):
    k, d = det.num_classes, det.feat_dim
    if det.covariance == "tied":
        return det.covariance_matrix.expand(k, d, d)
    if det.covariance == "diag":
        return torch.diag_embed(det.log_var.exp())
    return torch.eye(d, dtype=F64).expand(k, d, d)


def _expected(kind, logp):
    if kind == "likelihood":
        return logp.max(1).values
    if kind == "mixture":
        return torch.logsumexp(logp, 1) - math.log(logp.shape[1])
    return torch.log_softmax(logp, 1).max(1).values


# ------------------------------------------------------------------------------------------ fit
def test_fit_tied_recovers_the_gaussians_and_the_pooled_covariance():
    means, cov = _truth()
    x, y = _sample(means, cov, 20000, seed=1)
    det = LikelihoodDetector.fit(x, y, covariance="tied", ridge=1e-6)
    assert det.covariance == "tied" and (det.num_classes, det.feat_dim) == (3, 4)
    # exactly the hand-computed maximum-likelihood estimates (float64)
    hand_means = torch.stack([x[y == c].mean(0) for c in range(3)])
    c = x - hand_means[y]
    hand_cov = c.T @ c / x.shape[0]
    hand_cov = hand_cov + 1e-6 * torch.diagonal(hand_cov).mean() * torch.eye(4, dtype=F64)
    torch.testing.assert_close(det.means, hand_means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(det.covariance_matrix, hand_cov, rtol=1e-10, atol=1e-12)
    assert torch.equal(det.covariance_matrix, det.covariance_matrix.T)
    # and close to the truth (20000 samples a class: standard errors ~0.007 on the means)
    assert (det.means - means).abs().max() < 0.05
    assert (det.covariance_matrix - cov).abs().max() < 0.05 * cov.abs().max()


def test_fit_diag_recovers_per_class_variances_and_identity_only_means():
    means, _ = _truth(d=3)
    scales = torch.tensor([[1.0, 2.0, 0.5], [0.3, 1.0, 3.0], [2.0, 2.0, 2.0]], dtype=F64)
    x, y = _sample(means, torch.eye(3, dtype=F64), 20000, seed=2, scales=scales)
    det = LikelihoodDetector.fit(x, y, covariance="diag", ridge=0.0)
    hand_var = torch.stack([x[y == c].var(0, unbiased=False) for c in range(3)])
    torch.testing.assert_close(det.log_var.exp(), hand_var, rtol=1e-10, atol=0)
    assert ((det.log_var.exp() / scales ** 2) - 1).abs().max() < 0.05
    ident = LikelihoodDetector.fit(x, y, covariance="identity")
    assert ident.log_var is None and ident.covariance_matrix is None
    torch.testing.assert_close(ident.means, det.means, rtol=0, atol=0)


def test_fit_ridge_keeps_degenerate_features_invertible():
    """A dead unit (a constant feature) and a class with one sample: the relative ridge keeps every
    covariance positive definite; without a ridge the fit says why it cannot."""
    x, y = _sample(*_truth(), 50, seed=3)
    x[:, 2] = 1.5
    for kind in ("tied", "diag"):
        det = LikelihoodDetector.fit(x, y, kind)
        assert torch.isfinite(det.score(x)).all()
        with pytest.raises(ValueError, match="ridge"):
            LikelihoodDetector.fit(x, y, kind, ridge=0.0)
    one = torch.cat([y[:-1], torch.tensor([3])])  # class 3 has a single sample
    det = LikelihoodDetector.fit(x.clone().normal_(), one, "diag")
    assert det.num_classes == 4 and torch.isfinite(det.log_var).all()


def test_fit_float64_accumulation_from_low_precision_and_offset_features():
    """bfloat16/float32 features are accumulated in float64: the fit equals the fit of the same values in float64
    (a float32 running sum of 200k values near 1000 would be off by ~1e-3)."""
    means, cov = _truth()
    x, y = _sample(means + 1000.0, cov, 70000, seed=4)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        a = LikelihoodDetector.fit(xd, y)
        b = LikelihoodDetector.fit(xd.to(F64), y)
        torch.testing.assert_close(a.means, b.means, rtol=0, atol=0)
        torch.testing.assert_close(a.covariance_matrix, b.covariance_matrix, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ scores
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("score", SCORES)
def test_scores_equal_the_closed_form_gaussian_density(kind, score):
    """float64: each score equals the textbook log-density (solve + slogdet) of the fitted Gaussians."""
    means, cov = _truth()
    x, y = _sample(means, cov, 500, seed=5)
    det = LikelihoodDetector.fit(x, y, kind, score=score)
    test, _ = _sample(means, cov, 100, seed=6)
    test = torch.cat([test, test[:10] + 6.0])  # a few points off the data
    logp = _hand_log_densities(test, det.means, _covs_of(det))
    s = det.score(test)
    assert s.dtype == F64 and s.shape == (test.shape[0],)
    torch.testing.assert_close(s, _expected(score, logp), rtol=1e-10, atol=1e-10)
    assert torch.equal(det.predict(test), logp.argmax(1))


def test_tied_score_is_lees_mahalanobis_and_its_gradient():
    """The tied likelihood score is -0.5 min_k Mahalanobis^2 plus a constant, with gradient -Sigma^{-1}(x - mu_yhat)."""
    means, cov = _truth()
    x, y = _sample(means, cov, 500, seed=7)
    det = LikelihoodDetector.fit(x, y)
    test = _sample(means, cov, 20, seed=8)[0].requires_grad_(True)
    s = det.score(test)
    (g,) = torch.autograd.grad(s.sum(), test)
    diff = test.detach()[:, None, :] - det.means[None]
    prec = torch.linalg.inv(det.covariance_matrix)
    maha = torch.einsum("nkd,de,nke->nk", diff, prec, diff)
    yhat = maha.argmin(1)
    const = -0.5 * torch.linalg.slogdet(det.covariance_matrix)[1] - 2 * math.log(2 * math.pi)
    torch.testing.assert_close(s.detach(), -0.5 * maha.min(1).values + const, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, -(diff[torch.arange(diff.shape[0]), yhat] @ prec), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("score", SCORES)
def test_score_gradcheck(kind, score):
    means, cov = _truth(d=3)
    x, y = _sample(means, cov, 200, seed=9)
    det = LikelihoodDetector.fit(x, y, kind, score=score)
    test = _sample(means, cov, 3, seed=10)[0].requires_grad_(True)
    assert torch.autograd.gradcheck(det.score, (test,), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ calibration
def test_calibrate_rejects_fpr_of_the_calibration_set_within_one_over_n():
    means, cov = _truth()
    x, y = _sample(means, cov, 300, seed=11)
    det = LikelihoodDetector.fit(x, y)
    for n in (1, 7, 100, 1001):
        cal = _sample(means, cov, n, seed=12 + n)[0][:n]
        for fpr in (0.01, 0.05, 0.29, 0.5, 0.9, 0.99):
            assert det.calibrate(cal, fpr=fpr) is det
            rate = det.reject(cal).double().mean().item()
            assert fpr - 1.0 / n < rate <= fpr + 1e-12, (n, fpr, rate)
            assert det.fpr == fpr and det.calibration_size == n
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29 rejections, not 28
    cal = _sample(means, cov, 100, seed=13)[0][:100]
    assert int(det.calibrate(cal, fpr=0.29).reject(cal).sum()) == 29
    # the threshold is a calibration score: the (floor(fpr N) + 1)-th smallest
    assert det.calibrate(cal, fpr=0.05).threshold == torch.sort(det.score(cal)).values[5].item()


@pytest.mark.parametrize("kind", KINDS)
def test_calibrated_detector_generalises_and_rejects_far_points(kind):
    means, cov = _truth()
    x, y = _sample(means, cov, 5000, seed=14)
    det = LikelihoodDetector.fit(x, y, kind).calibrate(_sample(means, cov, 10000, seed=15)[0], fpr=0.05)
    held_out = _sample(means, cov, 10000, seed=16)[0]
    rate = det.reject(held_out).double().mean().item()
    assert abs(rate - 0.05) < 0.01  # binomial sd of the two rates together ~0.0018
    g = torch.Generator().manual_seed(17)
    far = means[torch.randint(0, 3, (500,), generator=g)] + 30.0 * torch.nn.functional.normalize(
        torch.randn(500, 4, generator=g, dtype=F64), dim=1)
    assert det.reject(far).all()


# ------------------------------------------------------------------------------------------ heads
def _head(covariance="diag", impl="auto", k=7, d=5):
    head = lgm_ext.LGMLoss(k, d, covariance=covariance, impl=impl)
    with torch.no_grad():
        head.means.normal_(0, 2)
        if head.log_var is not None:
            head.log_var.normal_(0, 1)
            head.log_var[0, 0], head.log_var[1, 1] = 9.0, -8.0  # beyond the +-6 bound: clamped
    return head


@pytest.mark.parametrize("covariance", ["diag", "identity"])
@pytest.mark.parametrize("impl", ["auto", "gemm"])
def test_from_head_equals_head_log_likelihood_exactly(device, covariance, impl):
    head = _head(covariance, impl).to(device)
    x = (2 * torch.randn(64, 5)).to(device)
    det = LikelihoodDetector.from_head(head)  # a detector on the head's device
    assert det.impl == impl and det.covariance == covariance
    assert torch.equal(det.score(x), head.log_likelihood(x))
    assert torch.equal(det.predict(x), head.predict(x))
    cpu_det = LikelihoodDetector.from_head(head.cpu()).with_score("mixture")  # on the CPU, scoring `device`
    head.to(device)
    logits = head.logits(x)
    torch.testing.assert_close(cpu_det.score(x), torch.logsumexp(logits, 1) - math.log(7) - 2.5 * math.log(2 * math.pi))
    assert cpu_det.score(x).device == x.device and cpu_det.device.type == "cpu"
    torch.testing.assert_close(cpu_det.with_score("max_posterior").score(x), torch.log_softmax(logits, 1).max(1).values)


def test_from_head_reads_log_var_without_clamped_log_var():
    """A head without clamped_log_var() (ShardedLGMLoss before it had one): log_var clamped to +-log_var_bound."""

    class Bare:
        means = torch.randn(4, 3)
        log_var = torch.tensor([[7.0, -7.0, 0.5]] * 4)

    det = LikelihoodDetector.from_head(Bare())
    assert det.log_var.abs().max() == 6.0 and det.impl == "auto"
    Bare.log_var_bound = 2.0
    assert LikelihoodDetector.from_head(Bare()).log_var.abs().max() == 2.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(device, kind, dtype):
    """Low precisions are scored in float32 (float64 stays float64): equal to the float64 score of the same
    (rounded) inputs to float32 rounding; gradients come back in the input dtype."""
    means, cov = _truth()
    x, y = _sample(means, cov, 300, seed=18)
    det = LikelihoodDetector.fit(x, y, kind)
    test = _sample(means, cov, 20, seed=19)[0].to(dtype).to(device).requires_grad_(True)
    s = det.score(test)
    assert s.dtype == (F64 if dtype == F64 else torch.float32) and s.device == test.device
    ref = det.score(test.detach().to(F64).cpu())
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 2e-6, "atol": 2e-5}
    torch.testing.assert_close(s.detach().cpu().to(F64), ref, **tol)
    (g,) = torch.autograd.grad(s.sum(), test)
    assert g.dtype == dtype and torch.isfinite(g.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the whitening is not run in bf16 under autocast
        assert torch.equal(det.score(test.detach()), s.detach())


def test_chunked_scoring_equals_one_chunk(monkeypatch):
    means, cov = _truth()
    x, y = _sample(means, cov, 100, seed=20)
    dets = [LikelihoodDetector.fit(x, y, kind, score=s) for kind in KINDS for s in SCORES]
    whole = [d.score(x) for d in dets]
    monkeypatch.setattr(gaussians_module, "_CHUNK_ELEMS", 32)  # 8 rows a chunk
    for d, w in zip(dets, whole):
        torch.testing.assert_close(d.score(x), w, rtol=1e-14, atol=1e-14)


def test_nan_in_nan_out_rejected_and_empty_batches():
    det = LikelihoodDetector.fit(*_sample(*_truth(), 100, seed=21)).calibrate(_sample(*_truth(), 50, seed=22)[0])
    x = _sample(*_truth(), 3, seed=23)[0]
    x[1, 2] = float("nan")
    s = det.score(x)
    assert torch.isnan(s[1]) and torch.isfinite(s[[0, 2]]).all()
    assert det.reject(x)[1]
    assert det.score(torch.empty(0, 4)).shape == (0,) and det.reject(torch.empty(0, 4)).shape == (0,)


# ------------------------------------------------------------------------------------------ state
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("score", SCORES)
def test_state_dict_round_trip_through_weights_only_load(tmp_path, kind, score):
    means, cov = _truth()
    x, y = _sample(means, cov, 200, seed=24)
    det = LikelihoodDetector.fit(x, y, kind, score=score)
    for calibrated in (False, True):
        if calibrated:
            det.calibrate(x, fpr=0.1)
        sd = det.state_dict()
        assert all(isinstance(v, (torch.Tensor, int, float, str)) for v in sd.values())
        torch.save(sd, tmp_path / "det.pt")
        back = LikelihoodDetector.from_state_dict(torch.load(tmp_path / "det.pt", weights_only=True))
        assert (back.covariance, back.score_name, back.impl, back.threshold, back.fpr, back.calibration_size) == \
            (det.covariance, det.score_name, det.impl, det.threshold, det.fpr, det.calibration_size)
        sd2 = back.state_dict()
        assert sd2.keys() == sd.keys()
        for key, v in sd.items():
            assert torch.equal(sd2[key], v) if isinstance(v, torch.Tensor) else sd2[key] == v
        assert torch.equal(back.score(x), det.score(x)) and torch.equal(back.score(x.float()), det.score(x.float()))
        if calibrated:
            assert torch.equal(back.reject(x), det.reject(x))


def test_from_head_state_round_trip_and_to(device, tmp_path):
    head = _head().to(device)
    x = torch.randn(32, 5).to(device)
    det = LikelihoodDetector.from_head(head).calibrate(x, fpr=0.25)
    torch.save(det.state_dict(), tmp_path / "d.pt")
    back = LikelihoodDetector.from_state_dict(torch.load(tmp_path / "d.pt", weights_only=True, map_location="cpu"))
    assert back.device.type == "cpu" and back.to(device) is back and back.device == det.device
    assert torch.equal(back.score(x), head.log_likelihood(x)) and torch.equal(back.reject(x), det.reject(x))
    assert int(back.reject(x).sum()) == 8


# ------------------------------------------------------------------------------------------ bad input
def _bad_cases():
    means, cov = _truth()
    x, y = _sample(means, cov, 20, seed=25)
    det = LikelihoodDetector.fit(x, y)
    nan_x = x.clone()
    nan_x[3, 1] = float("nan")
    inf_x = x.clone()
    inf_x[0, 0] = float("inf")
    gap = y.clone()
    gap[gap == 1] = 2  # class 1 has no sample
    sd = det.state_dict()
    fit = LikelihoodDetector.fit
    return [
        ("fpr", ValueError, lambda: det.calibrate(x, fpr=0.0)),
        ("fpr", ValueError, lambda: det.calibrate(x, fpr=1.0)),
        ("fpr", ValueError, lambda: det.calibrate(x, fpr=float("nan"))),
        ("fpr", TypeError, lambda: det.calibrate(x, fpr="5%")),
        ("clean_features", ValueError, lambda: det.calibrate(nan_x)),
        ("clean_features", ValueError, lambda: det.calibrate(inf_x)),
        ("clean_features", ValueError, lambda: det.calibrate(x[:, :3])),
        ("clean_features", ValueError, lambda: det.calibrate(x[:0])),
        ("features", ValueError, lambda: fit(nan_x, y)),
        ("features", ValueError, lambda: fit(inf_x, y)),
        ("features", TypeError, lambda: fit(x.long(), y)),
        ("features", TypeError, lambda: fit(x.numpy(), y)),
        ("features", ValueError, lambda: fit(x[0], y)),
        ("features", ValueError, lambda: det.score(x[:, :3])),
        ("features", ValueError, lambda: det.score(x[:, None])),
        ("features", TypeError, lambda: det.score(x.int())),
        ("features", ValueError, lambda: det.reject(x[:, :5])),
        ("labels", ValueError, lambda: fit(x, y, num_classes=2)),
        ("labels", ValueError, lambda: fit(x, y - 1)),
        ("labels", ValueError, lambda: fit(x, y[:5])),
        ("labels", TypeError, lambda: fit(x, y.double())),
        ("labels", ValueError, lambda: fit(x, gap)),
        ("labels", ValueError, lambda: fit(x, y, num_classes=5)),  # classes 3 and 4 have no sample
        ("num_classes", ValueError, lambda: fit(x, y, num_classes=0)),
        ("ridge", ValueError, lambda: fit(x, y, ridge=-1e-3)),
        ("covariance", ValueError, lambda: fit(x, y, "full")),
        ("score", ValueError, lambda: fit(x, y, score="energy")),
        ("score", ValueError, lambda: det.with_score("maxsoftmax")),
        ("impl", ValueError, lambda: fit(x, y, impl="fast")),
        ("threshold", ValueError, lambda: LikelihoodDetector.fit(x, y).reject(x)),
        ("threshold", ValueError, lambda: setattr(det, "threshold", float("nan"))),
        ("head", TypeError, lambda: LikelihoodDetector.from_head(torch.nn.Linear(3, 3))),
        ("covariance_matrix", ValueError, lambda: LikelihoodDetector(means, covariance_matrix=-cov)),
        ("covariance_matrix", ValueError,
         lambda: LikelihoodDetector(means, covariance_matrix=cov + torch.triu(cov, 1))),  # not symmetric
        ("covariance_matrix", ValueError, lambda: LikelihoodDetector(means, covariance_matrix=cov[:3, :3])),
        ("log_var", ValueError, lambda: LikelihoodDetector(means, log_var=means[:, :2])),
        ("means", ValueError, lambda: LikelihoodDetector(means[:0])),
        ("state_dict", ValueError, lambda: LikelihoodDetector.from_state_dict({"means": means})),
        ("log_var", ValueError, lambda: LikelihoodDetector.from_state_dict({**sd, "log_var": means})),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_names_the_argument(case):
    name, exc, call = _bad_cases()[case]
    with pytest.raises(exc, match=name):
        call()


# ------------------------------------------------------------------------------------------ sharded head

# diag_k1: rank 1 holds no class
SHARD_CASES = {"diag_k7": (7, "diag"), "identity_k7": (7, "identity"), "diag_k1": (1, "diag")}


def _shard_params(k, d=5):
    g = torch.Generator().manual_seed(k)
    mu, lv = 2 * torch.randn(k, d, generator=g), torch.randn(k, d, generator=g)
    lv[0, 0] = 8.0  # beyond the bound
    return mu, lv, 3 * torch.randn(40, d, generator=g)


def _shard_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from lgm_ext.distributed import ShardedLGMLoss

    results = {}
    try:
        for name, (k, cov) in SHARD_CASES.items():
            mu, lv, x = _shard_params(k)
            head = ShardedLGMLoss(k, 5, covariance=cov).load_full(mu, lv)
            det = LikelihoodDetector.from_head(head)
            results[name] = {"state": det.state_dict(), "score": det.score(x), "class_range": head.class_range}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        leave_process_group()


@pytest.mark.kernels
def test_from_sharded_head_equals_the_single_device_detector(tmp_path):
    mp.spawn(_shard_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert res[1]["diag_k1"]["class_range"] == (1, 1)
    for name, (k, cov) in SHARD_CASES.items():
        mu, lv, x = _shard_params(k)
        head = lgm_ext.LGMLoss(k, 5, covariance=cov)
        with torch.no_grad():
            head.means.copy_(mu)
            if cov == "diag":
                head.log_var.copy_(lv)
        single = LikelihoodDetector.from_head(head)
        for r in res:
            sd = r[name]["state"]
            for key, v in single.state_dict().items():
                assert torch.equal(sd[key], v) if isinstance(v, torch.Tensor) else sd[key] == v, (name, key)
            assert torch.equal(r[name]["score"], head.log_likelihood(x))


# ------------------------------------------------------------------------------------------ issue 33
def test_instance_fit_refits_in_place_and_the_class_form_still_builds():
    """scikit-learn's convention: ``det.fit(x, y)`` on a detector refits that detector and returns it (it used to
    return a new detector and leave ``det`` as it was); ``LikelihoodDetector.fit(x, y)`` still builds one."""
    means, cov = _truth()
    x1, y1 = _sample(means, cov, 100, seed=40)
    x2, y2 = _sample(means + 1.0, cov, 100, seed=41)
    det = LikelihoodDetector.fit(x1, y1, "diag", score="mixture").calibrate(x1, fpr=0.1)
    assert isinstance(det, LikelihoodDetector) and det.covariance == "diag"
    out = det.fit(x2, y2, covariance="tied")
    assert out is det
    fresh = LikelihoodDetector.fit(x2, y2, "tied", score="mixture")
    assert det.covariance == "tied" and torch.equal(det.means, fresh.means)
    assert torch.equal(det.covariance_matrix, fresh.covariance_matrix) and det.log_var is None
    assert torch.equal(det.score(x1), fresh.score(x1))
    # the old threshold was calibrated for other Gaussians: refitting leaves the detector uncalibrated
    assert det.threshold is None and det.fpr is None and det.calibration_size is None
    # the instance form keeps the detector's own covariance, score and impl unless told otherwise
    det.fit(x1, y1)
    assert (det.covariance, det.score_name, det.impl) == ("tied", "mixture", "auto")
    assert torch.equal(det.score(x2), LikelihoodDetector.fit(x1, y1, "tied", score="mixture").score(x2))
    det.fit(x1, y1, "identity", score="likelihood")
    assert (det.covariance, det.score_name) == ("identity", "likelihood")
    # a failed refit leaves the detector as it was
    with pytest.raises(ValueError, match="labels"):
        det.fit(x1, y1[:5])
    assert det.covariance == "identity" and det.threshold is None
    # the class form's defaults are unchanged
    assert LikelihoodDetector.fit(x1, y1).covariance == "tied"


def test_threshold_must_be_finite():
    means, cov = _truth()
    x, y = _sample(means, cov, 50, seed=42)
    det = LikelihoodDetector.fit(x, y)
    sd = det.calibrate(x).state_dict()
    for bad in (float("inf"), -float("inf"), float("nan"), torch.tensor(float("inf"))):
        with pytest.raises(ValueError, match="threshold"):
            det.threshold = bad
        with pytest.raises(ValueError, match="threshold"):
            LikelihoodDetector.from_state_dict({**sd, "threshold": bad})
        with pytest.raises(ValueError, match="threshold"):
            LikelihoodDetector(det.means, threshold=bad)
    assert det.threshold == sd["threshold"]  # a refused value leaves the threshold as it was


def _state_cases():
    """(expected error, text the message must contain, a broken state dict) for every kind of damage."""
    means, cov = _truth()
    x, y = _sample(means, cov, 50, seed=43)
    tied = LikelihoodDetector.fit(x, y, "tied").calibrate(x).state_dict()
    diag = LikelihoodDetector.fit(x, y, "diag").state_dict()
    drop = lambda sd, key: {k: v for k, v in sd.items() if k != key}  # noqa: E731
    return [
        (ValueError, "means", drop(tied, "means")),
        (ValueError, "covariance", drop(tied, "covariance")),
        (ValueError, "score", drop(tied, "score")),
        (ValueError, "impl", drop(tied, "impl")),
        (ValueError, "calibration_size", drop(tied, "calibration_size")),
        (ValueError, "fpr", drop(tied, "fpr")),
        (ValueError, "covariance_matrix", drop(tied, "covariance_matrix")),
        (ValueError, "log_var", drop(diag, "log_var")),
        (ValueError, "extra", {**tied, "extra": 1}),
        (TypeError, "means", {**tied, "means": means.tolist()}),
        (TypeError, "means", {**tied, "means": means.long()}),
        (ValueError, "means", {**tied, "means": means[0]}),
        (TypeError, "covariance_matrix", {**tied, "covariance_matrix": cov.numpy()}),
        (ValueError, "covariance_matrix", {**tied, "covariance_matrix": cov[:3, :3]}),
        (ValueError, "covariance_matrix", {**tied, "means": means[:, :3]}),  # D = 3 means, a 4 x 4 covariance
        (ValueError, "log_var", {**diag, "log_var": diag["log_var"][:2]}),  # 2 classes of variances, 3 of means
        (ValueError, "log_var", {**diag, "means": means[:2]}),
        (TypeError, "log_var", {**diag, "log_var": "zeros"}),
        (TypeError, "threshold", {**tied, "threshold": "-3.5"}),
        (TypeError, "threshold", {**tied, "threshold": torch.zeros(2)}),
        (TypeError, "fpr", {**tied, "fpr": "0.05"}),
        (ValueError, "fpr", {**tied, "fpr": 5.0}),
        (TypeError, "calibration_size", {**tied, "calibration_size": 50.5}),
        (ValueError, "calibration_size", {**tied, "calibration_size": 0}),
        (TypeError, "covariance", {**tied, "covariance": 3}),
        (ValueError, "format", {**tied, "format": "other/1"}),
        (TypeError, "state_dict", [("means", means)]),
    ]


@pytest.mark.parametrize("case", range(len(_state_cases())))
def test_from_state_dict_validates_every_entry(case):
    """A damaged state dict raises ValueError/TypeError naming the key (a missing key was a bare KeyError)."""
    exc, name, sd = _state_cases()[case]
    with pytest.raises(exc, match=name):
        LikelihoodDetector.from_state_dict(sd)


def test_calibrate_fpr_must_be_a_number_in_the_open_unit_interval():
    x, y = _sample(*_truth(), 30, seed=44)
    det = LikelihoodDetector.fit(x, y)
    for bad, exc in ((7, ValueError), (-0.1, ValueError), (float("inf"), ValueError), ("abc", TypeError),
                     (None, TypeError), (True, TypeError), (torch.tensor([0.1, 0.2]), TypeError)):
        with pytest.raises(exc, match=r"fpr must be a number in \(0, 1\)"):
            det.calibrate(x, fpr=bad)
    assert det.threshold is None


def test_from_head_accepts_only_l_gm_heads():
    """A module with ``means`` but no log-variances (a centers table, some other head) used to become a silent
    identity-covariance detector; only L-GM heads (identity covariance included) and objects that expose both
    ``means`` and ``log_var`` are taken."""

    class MeansOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.means = torch.nn.Parameter(torch.randn(3, 4))

    with pytest.raises(TypeError, match="head"):
        LikelihoodDetector.from_head(MeansOnly())
    with pytest.raises(TypeError, match="head"):
        LikelihoodDetector.from_head(lgm_ext.CenterLoss(3, 4))
    ident = lgm_ext.LGMLoss(3, 4, covariance="identity")  # an L-GM head without log-variances: identity, as documented
    assert LikelihoodDetector.from_head(ident).covariance == "identity"

    class BadShapes:
        means = torch.randn(3, 4)
        log_var = torch.zeros(3, 5)

    with pytest.raises(ValueError, match="log_var"):
        LikelihoodDetector.from_head(BadShapes())

    class NotTensors:
        means = [[0.0, 1.0]]
        log_var = [[0.0, 0.0]]

    with pytest.raises(TypeError, match="means"):
        LikelihoodDetector.from_head(NotTensors())


def test_meta_tensors_say_what_is_supported():
    """Meta tensors carry no values: fitting, calibrating and building a detector on them is refused with a
    ValueError that says so (it was a RuntimeError from inside torch); scoring meta features (shape inference,
    tracing) gives meta scores."""
    x, y = _sample(*_truth(), 30, seed=45)
    det = LikelihoodDetector.fit(x, y).calibrate(x)
    meta = torch.empty(5, 4, device="meta")
    for call, name in ((lambda: LikelihoodDetector.fit(meta, torch.zeros(5, dtype=torch.long, device="meta")),
                        "features"),
                       (lambda: det.calibrate(meta), "clean_features"),
                       (lambda: LikelihoodDetector(torch.empty(3, 4, device="meta")), "means"),
                       (lambda: det.to("meta"), "meta")):
        with pytest.raises(ValueError, match=name) as info:
            call()
        assert "meta" in str(info.value)
    assert det.device.type == "cpu"
    s = det.score(meta)
    assert s.device.type == "meta" and s.shape == (5,)
    assert det.reject(meta).shape == (5,)


def test_directions_outlier_score_and_relative_to_threshold():
    """score: higher = more normal; outlier_score = -score (pytorch-ood's direction); relative_to_threshold =
    score - threshold, >= 0 exactly where reject() accepts."""
    means, cov = _truth()
    x, y = _sample(means, cov, 300, seed=46)
    det = LikelihoodDetector.fit(x, y).calibrate(x, fpr=0.1)
    far = means[:1] + 30.0
    test = torch.cat([x[:50], far, torch.full((1, 4), float("nan"), dtype=F64)])
    s = det.score(test)
    assert s[50] < s[:50].min()  # the far point scores lowest: higher = more normal
    torch.testing.assert_close(det.outlier_score(test), -s, rtol=0, atol=0, equal_nan=True)
    rel = det.relative_to_threshold(test)
    torch.testing.assert_close(rel, s - det.threshold, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(~(rel >= 0), det.reject(test))
    g = test[:3].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(det.outlier_score(g).sum(), g)
    assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="threshold"):
        LikelihoodDetector.fit(x, y).relative_to_threshold(x)


def test_max_posterior_accepts_far_away_noise():
    """What the max_posterior docstring warns about: bounded by 0, it does not fall with the distance from the
    data, so points far from every class are accepted (the likelihood rejects them all)."""
    means, cov = _truth()
    x, y = _sample(means, cov, 1000, seed=47)
    g = torch.Generator().manual_seed(48)
    far = means[torch.randint(0, 3, (200,), generator=g)] + 50.0 * torch.nn.functional.normalize(
        torch.randn(200, 4, generator=g, dtype=F64), dim=1)
    post = LikelihoodDetector.fit(x, y, score="max_posterior").calibrate(x, fpr=0.05)
    lik = LikelihoodDetector.fit(x, y).calibrate(x, fpr=0.05)
    assert lik.reject(far).all()
    assert post.reject(far).float().mean() < 0.5  # most of the far points pass
