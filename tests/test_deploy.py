"""Issue 33: lgm_ext.RejectingClassifier -- network, head and calibrated detector as one module: the same
numbers as its parts, state_dict round trip, torch.export, devices and dtypes, refusals."""
import pytest
import torch
from torch import nn

import lgm_ext
from lgm_ext import LikelihoodDetector, RejectingClassifier

K, D, IN = 4, 6, 12


def _parts(seed=0, head_kind="lgm"):
    g = torch.Generator().manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, D))
    with torch.no_grad():
        for p in backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    if head_kind == "lgm":
        head = lgm_ext.LGMLoss(K, D)
        with torch.no_grad():
            head.means.copy_(2 * torch.randn(K, D, generator=g))
            head.log_var.copy_(0.5 * torch.randn(K, D, generator=g))
    else:
        head = nn.Linear(D, K)
    x = torch.randn(300, IN, generator=g)
    y = torch.randint(0, K, (300,), generator=g)
    return backbone, head, x, y


def _detector(kind, backbone, head, x, y, score="likelihood", fpr=0.1):
    with torch.no_grad():
        f = backbone(x)
    det = LikelihoodDetector.from_head(head, score=score) if kind == "head" else \
        LikelihoodDetector.fit(f, y, kind, score=score)
    return det.calibrate(f, fpr=fpr)


KINDS = ("head", "tied", "diag", "identity")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("score", ["likelihood", "mixture", "max_posterior"])
def test_forward_is_the_classifier_and_the_detector(kind, score):
    backbone, head, x, y = _parts()
    det = _detector(kind, backbone, head, x, y, score)
    model = RejectingClassifier(backbone, head, det).eval()
    logits, accepted = model(x)
    with torch.no_grad():
        f = backbone(x)
        assert torch.equal(logits, lgm_ext.Classifier(backbone, head)(x))
        assert accepted.dtype == torch.bool and torch.equal(accepted, ~det.reject(f))
        logits2, accepted2, s = model(x, return_score=True)
        assert torch.equal(s, det.score(f)) and torch.equal(accepted2, accepted) and torch.equal(logits2, logits)
    assert 0.85 < accepted.float().mean() <= 0.9 + 1e-9 or kind == "head" and score == "max_posterior"
    assert model.threshold == det.threshold and model.fpr == det.fpr
    back = model.to_detector()
    assert back.state_dict().keys() == det.state_dict().keys()
    for key, v in det.state_dict().items():
        assert torch.equal(back.state_dict()[key], v) if isinstance(v, torch.Tensor) else back.state_dict()[key] == v


def test_a_plain_linear_head_and_nan_inputs():
    backbone, head, x, y = _parts(head_kind="linear")
    det = _detector("tied", backbone, head, x, y)
    model = RejectingClassifier(backbone, head, det)
    xn = x[:5].clone()
    xn[2, 0] = float("nan")
    logits, accepted, s = model(xn, return_score=True)
    torch.testing.assert_close(logits[[0, 1, 3, 4]], head(backbone(xn[[0, 1, 3, 4]])))
    assert torch.isnan(s[2]) and not accepted[2]  # NaN in, NaN score out, rejected


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_into_a_fresh_module(tmp_path, kind):
    backbone, head, x, y = _parts(0)
    model = RejectingClassifier(backbone, head, _detector(kind, backbone, head, x, y, score="mixture")).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    # a fresh module: other weights, a detector of the same covariance fitted elsewhere, another score kind
    b2, h2, x2, y2 = _parts(1)
    fresh = RejectingClassifier(b2, h2, _detector(kind, b2, h2, x2, y2, score="likelihood", fpr=0.3)).eval()
    before = fresh(x, return_score=True)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    want, got = model(x, return_score=True), fresh(x, return_score=True)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert not torch.equal(before[2], got[2])
    assert (fresh.score_name, fresh.threshold, fresh.fpr) == ("mixture", model.threshold, model.fpr)


def test_load_refuses_another_covariance_and_an_infinite_threshold():
    backbone, head, x, y = _parts()
    tied = RejectingClassifier(backbone, head, _detector("tied", backbone, head, x, y))
    diag = RejectingClassifier(backbone, head, _detector("diag", backbone, head, x, y))
    with pytest.raises((RuntimeError, ValueError), match="covariance"):
        diag.load_state_dict(tied.state_dict(), strict=False)
    sd = diag.state_dict()
    sd["detector.threshold"] = torch.tensor(float("inf"), dtype=torch.float64)
    with pytest.raises(ValueError, match="threshold"):
        diag.load_state_dict(sd)


@pytest.mark.parametrize("kind", ["head", "tied"])
def test_torch_export_runs_as_eager(kind):
    """torch.export.export (the supported path): the exported program gives the eager outputs."""
    backbone, head, x, y = _parts()
    model = RejectingClassifier(backbone, head, _detector(kind, backbone, head, x, y)).eval()
    program = torch.export.export(model, (x[:64],))
    for got, want in zip(program.module()(x[:64]), model(x[:64])):
        assert torch.equal(got, want)
    with_score = torch.export.export(model, (x[:64],), kwargs={"return_score": True})
    got = with_score.module()(x[:64], return_score=True)
    assert len(got) == 3
    for a, b in zip(got, model(x[:64], return_score=True)):
        assert torch.equal(a, b)
    # the fused operators in the graph (the pure-PyTorch path exports plain torch ops)
    assert any("lgm_ext" in str(n.target) for n in program.graph.nodes if n.op == "call_function") \
        == lgm_ext.has_fused_kernels()


def test_buffers_follow_the_device_and_stay_float64(device):
    backbone, head, x, y = _parts()
    det = _detector("tied", backbone, head, x, y)
    model = RejectingClassifier(backbone, head, det).eval()
    assert all(b.dtype == torch.float64 for b in model.detector.buffers())
    assert {k for k in model.state_dict() if k.startswith("detector.")} >= {
        "detector.means", "detector.covariance_matrix", "detector.threshold", "detector._extra_state"}
    model.to(device)
    assert all(b.device.type == torch.device(device).type for b in model.buffers())
    with torch.no_grad():
        xd = x.to(device)
        logits, accepted, s = model(xd, return_score=True)
        assert torch.equal(accepted.cpu(), ~det.reject(backbone.cpu()(x)))
        model.to(device)
    model.double()  # the network in float64: the detector's buffers are float64 anyway, scores now float64
    with torch.no_grad():
        logits, accepted, s = model(xd.double(), return_score=True)
    assert s.dtype == torch.float64 and torch.equal(s.cpu(), det.score(backbone.cpu().double()(x.double())))
    model.to(device).to(torch.bfloat16)  # no precision lost on the Gaussians or the threshold
    assert all(b.dtype == torch.float64 for b in model.detector.buffers())
    assert model.threshold == det.threshold


def test_refusals():
    backbone, head, x, y = _parts()
    det = _detector("tied", backbone, head, x, y)
    with pytest.raises(ValueError, match="threshold"):
        RejectingClassifier(backbone, head, LikelihoodDetector.fit(backbone(x).detach(), y))
    with pytest.raises(TypeError, match="detector"):
        RejectingClassifier(backbone, head, det.state_dict())
    with pytest.raises(TypeError, match="backbone"):
        RejectingClassifier(lambda t: t, head, det)
    with pytest.raises(TypeError, match="head"):
        RejectingClassifier(backbone, head.logits, det)
    with pytest.raises(ValueError, match="detector"):  # the head takes 6-D features, the detector scores 3-D
        RejectingClassifier(backbone, head, LikelihoodDetector.fit(torch.randn(40, 3), y[:40]).calibrate(
            torch.randn(9, 3)))
    model = RejectingClassifier(nn.Sequential(backbone, nn.Linear(D, 3)), nn.Linear(3, K), det)
    with pytest.raises(ValueError, match="features"):  # the backbone's output is not what the detector scores
        model(x)
