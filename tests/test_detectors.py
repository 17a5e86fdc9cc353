"""Issue 41: the detector family (lgm_ext.detectors) -- every member against pytorch-ood, its oracle where it has
the detector; one base (fit, score, calibrate, reject, state, device); the combination calibrated jointly; the
registry; every member deployed in a RejectingClassifier, rebuilt from its state dict alone and exported with a
dynamic batch."""
import math

import pytest
import torch
from torch import nn

import lgm_ext
from lgm_ext import RejectingClassifier, detectors
from lgm_ext.detectors import (
    AnyOfDetector,
    CenterDistanceDetector,
    Detector,
    EnergyDetector,
    KNNDetector,
    LikelihoodDetector,
    MaxLogitDetector,
    MaxSoftmaxDetector,
    ViMDetector,
)

POD = pytest.importorskip("pytorch_ood.detector")

K, D, IN = 4, 12, 20


class _Head(nn.Module):
    """A softmax head with a linear classifier ``fc`` and class centers, as the lab's heads expose them."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(D, K)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(K, D, generator=g))
            self.fc.bias.copy_(torch.randn(K, generator=g))
        self.register_buffer("_centers", 3.0 * torch.eye(K, D))
        self.num_classes, self.feat_dim = K, D

    def logits(self, f):
        return self.fc(f)

    def forward(self, f):
        return self.fc(f)

    def centers(self):
        return self._centers


def _data(seed: int = 1, n: int = 400):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    f = torch.randn(n, D, generator=g) + 3.0 * nn.functional.one_hot(y, D).float()
    return f, y


def _spearman(a, b) -> float:
    def rank(v):
        r = torch.empty_like(v, dtype=torch.float64)
        r[v.argsort()] = torch.arange(len(v), dtype=torch.float64)
        return r

    ra, rb = rank(a.double()), rank(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


NAMES = tuple(detectors.DETECTORS)


def _built(name, head=None, seed=1):
    head = _Head() if head is None else head
    f, y = _data(seed)
    with torch.no_grad():
        lg = head.logits(f)
    return detectors.create(name, head, features=f, labels=y, logits=lg), head, f, y, lg


def _lgm_head():
    g = torch.Generator().manual_seed(3)
    head = lgm_ext.LGMLoss(K, D)
    with torch.no_grad():
        head.means.copy_(3.0 * torch.eye(K, D) + 0.1 * torch.randn(K, D, generator=g))
        head.log_var.copy_(0.2 * torch.randn(K, D, generator=g))
    return head


def _head_for(name):
    return _lgm_head() if name.startswith("lgm-") else _Head()


# ----------------------------------------------------------------------------- pytorch-ood, the oracle
def test_members_score_as_pytorch_ood_does():
    f, y = _data()
    q = torch.randn(60, D, generator=torch.Generator().manual_seed(9)) * 2
    head = _Head()
    knn = KNNDetector(7).fit(f, y)
    ref = POD.KNN(None, k=7, normalize=True).fit_features(f, y).predict_features(q)
    torch.testing.assert_close(knn.outlier_score(q).double(), torch.as_tensor(ref).double(), rtol=1e-5, atol=1e-5)
    vim = ViMDetector.for_classifier(head, d=6).fit(f, y)
    ref = POD.ViM(None, d=6, w=head.fc.weight, b=head.fc.bias).fit_features(f, y).predict_features(q)
    torch.testing.assert_close(vim.outlier_score(q), ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        lg = head.logits(q)
    for det, ref in ((EnergyDetector(), POD.EnergyBased(None).predict_logits(lg)),
                     (EnergyDetector(temperature=2.0), POD.EnergyBased(None, t=2.0).predict_logits(lg)),
                     (MaxLogitDetector(), POD.MaxLogit(None).predict_logits(lg)),
                     (MaxSoftmaxDetector(), POD.MaxSoftmax(None).predict_logits(lg))):
        torch.testing.assert_close(det.outlier_score(logits=lg), ref)
    # Mahalanobis (tied Gaussians) ranks as pytorch-ood's, on raw and on L2-normalised features
    maha = detectors.create("mahalanobis", head, features=f, labels=y)
    ref = POD.Mahalanobis(None).fit_features(f, y).predict_features(q)
    assert _spearman(maha.outlier_score(q), ref) == pytest.approx(1.0, abs=1e-6)
    l2 = detectors.create("mahalanobis-l2", head, features=f, labels=y)
    n = detectors.l2_normalised
    ref = POD.Mahalanobis(None).fit_features(n(f), y).predict_features(n(q))
    assert _spearman(l2.outlier_score(q), ref) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(l2.score(3.0 * q), l2.score(q))  # scale-free


def test_center_distance_by_hand():
    head = _Head()
    f, y = _data()
    with torch.no_grad():
        lg = head.logits(f)
    det = detectors.create("center-distance", head)
    want = -0.5 * (f - head.centers()[lg.argmax(1)]).pow(2).sum(1)
    torch.testing.assert_close(det.score(f, lg), want)
    fitted = CenterDistanceDetector().fit(f, y, logits=lg)  # class means
    means = torch.stack([f[y == k].double().mean(0) for k in range(K)])
    torch.testing.assert_close(fitted.centers, means)
    # an L-GM head: its means, the paper's identity-covariance score (Wan et al. section 4.3)
    lgm = _lgm_head()
    paper = detectors.create("center-distance", lgm)
    torch.testing.assert_close(paper.centers, lgm.means.detach().double())


# ----------------------------------------------------------------------------- the base, for every member
@pytest.mark.parametrize("name", NAMES + ("mahalanobis-l2+mahalanobis", "mahalanobis-l2+center-distance",
                                          "knn+energy"))
def test_every_member_fits_scores_calibrates_saves_and_loads(tmp_path, name):
    det, head, f, y, lg = _built(name, _head_for(name))
    g = torch.Generator().manual_seed(5)
    q = torch.randn(50, D, generator=g) * 2
    with torch.no_grad():
        lq = head.logits(q)
    assert isinstance(det, Detector)
    det.calibrate(f, 0.1, logits=lg)
    rejected = det.reject(f, lg)
    assert rejected.float().mean() <= 0.1 + 1e-9 and rejected.float().mean() >= 0.1 - 1 / len(f) - 1e-9
    lo, hi = det.calibration_range
    assert lo <= det.threshold <= hi
    s = det.score(q, lq)
    assert s.shape == (50,) and s.dtype == torch.float32
    torch.testing.assert_close(det.outlier_score(q, lq), -s)
    assert torch.equal(det.reject(q, lq), ~(s >= det.threshold))
    # differentiable with respect to what it reads
    fq, lgq = q.clone().requires_grad_(), lq.clone().requires_grad_()
    det.score(fq, lgq).sum().backward()
    grads = [t.grad for t, i in ((fq, "features"), (lgq, "logits")) if i in det.inputs]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0
    # float64 in, float64 out
    assert det.score(q.double(), lq.double()).dtype == torch.float64
    # NaN in, NaN out (and rejected)
    qn, ln = q[:3].clone(), lq[:3].clone()
    qn[1, 0] = float("nan")
    ln[1, 0] = float("nan")
    sn = det.score(qn, ln)
    assert torch.isnan(sn[1]) and torch.isfinite(sn[[0, 2]]).all() and bool(det.reject(qn, ln)[1])
    # state: plain values, weights_only load, any member by kind, an exact round trip
    torch.save(det.state_dict(), tmp_path / "det.pt")
    back = Detector.from_state_dict(torch.load(tmp_path / "det.pt", weights_only=True))
    assert type(back) is type(det) and back.threshold == det.threshold and back.fpr == det.fpr
    assert back.calibration_range == det.calibration_range
    assert torch.equal(back.score(q, lq), s)
    # device moves, dtypes are refused with a clear error
    assert det.to("cpu") is det
    with pytest.raises(ValueError, match="dtype"):
        det.to(torch.float64)


@pytest.mark.parametrize("name", ["knn", "energy", "center-distance", "mahalanobis-l2+max-logit"])
def test_missing_inputs_name_what_is_read(name):
    det, head, f, y, lg = _built(name)
    det.calibrate(f, 0.05, logits=lg)
    if "logits" in det.inputs:
        with pytest.raises(ValueError, match="logits"):
            det.score(f)
    if "features" in det.inputs:
        with pytest.raises(ValueError, match="features"):
            det.score(logits=lg)
        with pytest.raises(ValueError, match=r"features must have shape \(N, 12\)"):
            det.score(f[:, :5], lg)


def test_member_refusals():
    f, y = _data()
    with pytest.raises(ValueError, match="at least 50"):
        KNNDetector(50).fit(f[:20], y[:20])
    with pytest.raises(ValueError, match="max_bank"):
        KNNDetector(10, max_bank=5)
    with pytest.raises(ValueError, match="linear classifier"):
        ViMDetector.for_classifier(_lgm_head())
    with pytest.raises(ValueError, match="temperature"):
        EnergyDetector(temperature=0.0)
    with pytest.raises(ValueError, match="not fitted"):
        KNNDetector(3).score(f)
    with pytest.raises(TypeError, match="members"):
        AnyOfDetector([KNNDetector(3)])
    with pytest.raises(ValueError, match="calibrate"):
        AnyOfDetector([KNNDetector(3).fit(f, y), EnergyDetector()]).score(f, torch.randn(len(f), K))
    with pytest.raises(ValueError, match="kind"):
        Detector.from_state_dict({"format": "lgm_ext.detectors/1", "kind": "magic"})
    state = KNNDetector(3).fit(f, y).state_dict()
    state["tensors"]["bank"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="bank"):
        Detector.from_state_dict(state)
    with pytest.raises(ValueError, match="KNNDetector"):
        ViMDetector.from_state_dict(KNNDetector(3).fit(f, y).state_dict())


def test_knn_bank_policy_is_a_seeded_subsample():
    f, y = _data(n=600)
    a = KNNDetector(5, max_bank=100, seed=3).fit(f, y)
    b = KNNDetector(5, max_bank=100, seed=3).fit(f, y)
    c = KNNDetector(5, max_bank=100, seed=4).fit(f, y)
    assert a.bank.shape == (100, D) and torch.equal(a.bank, b.bank) and not torch.equal(a.bank, c.bank)
    assert KNNDetector(5, max_bank=None).fit(f, y).bank.shape == (600, D)
    # chunked scoring equals one piece (a small chunk forced)
    from lgm_ext.detectors import _util

    q = torch.randn(300, D)
    whole = a.score(q)
    old = _util._CHUNK_ELEMS
    _util._CHUNK_ELEMS = 1000
    try:
        torch.testing.assert_close(a.score(q), whole, rtol=1e-6, atol=1e-6)  # (BLAS blocks differ)
    finally:
        _util._CHUNK_ELEMS = old


# ----------------------------------------------------------------------------- the combination
def test_combination_is_calibrated_jointly_and_rejects_when_any_member_does():
    head = _Head()
    f, y = _data(n=2000)
    with torch.no_grad():
        lg = head.logits(f)
    comb = detectors.create("mahalanobis-l2+center-distance", head, features=f, labels=y, logits=lg)
    comb.calibrate(f, 0.05, logits=lg)
    rej = comb.reject(f, lg)
    assert rej.sum().item() == math.floor(0.05 * len(f))  # the combination's own rate, not each member's
    by = comb.rejected_by(f, lg)
    assert torch.equal(by.any(1), rej)
    for i, m in enumerate(comb.members):  # each member's own threshold is where the combination puts it
        assert torch.equal(m.reject(*((f if "features" in m.inputs else None), lg)), by[:, i])
        assert 0 < by[:, i].float().mean() < 0.05
    q = torch.randn(100, D) * 4
    with torch.no_grad():
        lq = head.logits(q)
    assert torch.equal(comb.reject(q, lq), comb.rejected_by(q, lq).any(1))
    assert comb.name == "Gaussians (tied, L2-normalised features; likelihood) + center distance"
    assert detectors.label("mahalanobis-l2+center-distance") == "Mahalanobis (L2-normalised) + center distance"


def test_a_failed_combination_fit_leaves_every_member_as_it_was():
    f, y = _data()
    a, b = KNNDetector(5).fit(f, y), KNNDetector(100)
    comb = AnyOfDetector([a, b])
    bank = a.bank.clone()
    with pytest.raises(ValueError, match="at least 100"):
        comb.fit(f[:50] * 3, y[:50])
    assert torch.equal(a.bank, bank) and b.bank is None


# ----------------------------------------------------------------------------- the registry
def test_registry_builds_by_name_and_refuses_what_does_not_apply():
    head, lgm = _Head(), _lgm_head()
    assert "vim" in detectors.names_for(head) and "lgm-likelihood" not in detectors.names_for(head)
    assert "lgm-likelihood" in detectors.names_for(lgm) and "vim" not in detectors.names_for(lgm)
    with pytest.raises(ValueError, match="unknown detector 'mahalanobis-l3'"):
        detectors.create("mahalanobis-l3", head)
    with pytest.raises(ValueError, match="linear classifier"):
        detectors.create("vim", lgm, features=torch.randn(20, D), labels=torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match="training inputs"):
        detectors.create("knn", head)
    with pytest.raises(ValueError, match="twice"):
        detectors.create("knn+knn", head)
    assert detectors.DEFAULT_DETECTOR in detectors.DETECTORS
    assert detectors.reads("mahalanobis-l2+energy") == ("features", "logits")


# ----------------------------------------------------------------------------- deployed
def _backbone(seed=0):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, D))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net


DEPLOYED = NAMES + ("mahalanobis-l2+mahalanobis", "mahalanobis-l2+center-distance")


@pytest.mark.parametrize("name", DEPLOYED)
def test_every_member_deploys_reloads_from_its_state_dict_alone_and_exports_with_a_dynamic_batch(tmp_path, name):
    head = _head_for(name)
    backbone = _backbone()
    x = torch.randn(300, IN, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, K, (300,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        f = backbone(x)
        lg = lgm_ext.modules.head_logits(head, f)
    det = detectors.create(name, head, features=f, labels=y, logits=lg).calibrate(f[:150], 0.1, logits=lg[:150])
    model = RejectingClassifier(backbone, head, det).eval()
    with torch.no_grad():
        logits, accepted, s = model(x, return_score=True)
        want = det.score(f, lg)
    assert torch.equal(s, want) and torch.equal(accepted, ~det.reject(f, lg)) and torch.equal(logits, lg)
    # from the state dict alone: another backbone and head of the same architecture, no detector built first
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh_head = _head_for(name)
    if isinstance(fresh_head, _Head):
        fresh_head = _Head(seed=7)
    back = RejectingClassifier.from_state_dict(_backbone(5), fresh_head,
                                               torch.load(tmp_path / "model.pt", weights_only=True)).eval()
    with torch.no_grad():
        for a, b in zip(back(x, return_score=True), model(x, return_score=True)):
            assert torch.equal(a, b)
    assert type(back.to_detector()) is type(det) and back.threshold == det.threshold
    # torch.export with a dynamic batch: the program gives the eager outputs at other batch sizes
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (x[:64],), dynamic_shapes=({0: batch},))
    for n in (1, 7, 300):
        with torch.no_grad():
            for got, want in zip(program.module()(x[:n]), model(x[:n])):
                assert torch.equal(got, want) if got.dtype == torch.bool else torch.allclose(got, want, atol=1e-5)


def test_a_state_dict_of_another_member_is_refused_on_load():
    backbone, head = _backbone(), _Head()
    x = torch.randn(200, IN)
    with torch.no_grad():
        f = backbone(x)
    y = torch.randint(0, K, (200,))
    knn = RejectingClassifier(backbone, head, detectors.create("knn", head, features=f, labels=y).calibrate(f))
    maha = RejectingClassifier(backbone, head, detectors.create("mahalanobis", head, features=f, labels=y)
                               .calibrate(f))
    with pytest.raises((RuntimeError, ValueError), match="kind|bank|Missing"):
        maha.load_state_dict(knn.state_dict())


@pytest.mark.parametrize("name", ["energy", "center-distance", "mahalanobis-l2+max-softmax", "knn"])
def test_adaptive_pgd_attacks_every_member(name):
    """AdaptivePGD gives a member that reads logits the classifier's logits of the features; the attack raises
    the score of the misclassified inputs it finds (selective mode), for a member of every kind."""
    from lgm_ext.attacks import AdaptivePGD

    backbone, head = _backbone(), _Head()
    x = torch.rand(120, IN)
    with torch.no_grad():
        f = backbone(x)
        lg = head.logits(f)
    y = lg.argmax(1)
    det = detectors.create(name, head, features=f, labels=y, logits=lg).calibrate(f, 0.05, logits=lg)
    atk = AdaptivePGD(lgm_ext.Classifier(backbone, head), det, eps=0.3, alpha=0.05, steps=8, seed=0)
    adv, ok = atk(x, y, return_success=True)
    with torch.no_grad():
        fa = backbone(adv)
        la = head.logits(fa)
    accepted = ~det.reject(fa, la)
    assert torch.equal(ok, ok & accepted & (la.argmax(1) != y))  # success = misclassified and accepted
    assert ok.any()


# ----------------------------------------------------------------------------- the report's numbers, deployed
def test_the_reports_numbers_are_the_deployed_modules(tmp_path):
    """On a small network, every detector the detection protocol measures (lgm_lab.detection_protocol) rejects
    the same share of each abnormal set as that detector built from the registry, calibrated on the same images
    and deployed in a RejectingClassifier -- and as the same module reloaded from its state dict."""
    from lgm_lab.detection_protocol import measure_network, report_detectors
    from lgm_lab.heads import build_head

    g = torch.Generator().manual_seed(0)
    for kind in ("center", "lgm"):
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, D)).eval()
        head = build_head(kind, D, K).eval()
        x = torch.rand(600, 1, 8, 8, generator=g)
        with torch.no_grad():
            y = head.predict(backbone(x))
        data = {"fit": (x[:300], y[:300]), "calibration": x[300:450], "clean": (x[450:], y[450:]),
                "abnormal": {"noise": torch.rand(100, 1, 8, 8, generator=g) * 3}}
        res = measure_network(backbone, head, data, eps=(), adaptive=False, fprs=(0.05,))
        names = report_detectors(head, D)
        assert set(res["detectors"]) == set(names)
        with torch.no_grad():
            f_fit, f_cal = backbone(x[:300]), backbone(x[300:450])
        for label, name in names.items():
            lg = head.logits(f_fit).detach() if "logits" in detectors.reads(name) else None
            lc = head.logits(f_cal).detach() if "logits" in detectors.reads(name) else None
            det = detectors.create(name, head, features=f_fit, labels=y[:300], logits=lg).calibrate(f_cal, 0.05,
                                                                                                  logits=lc)
            r = res["detectors"][label]
            assert det.threshold == pytest.approx(r["thresholds"]["5"], rel=1e-6, abs=1e-9), label
            model = RejectingClassifier(backbone, head, det).eval()
            torch.save(model.state_dict(), tmp_path / "m.pt")
            back = RejectingClassifier.from_state_dict(backbone, head, torch.load(tmp_path / "m.pt", weights_only=True))
            with torch.no_grad():
                for m in (model, back):
                    _logits, accepted = m(data["abnormal"]["noise"])
                    assert 100.0 * (~accepted).double().mean().item() == pytest.approx(
                        r["sets"]["noise"]["rejected"]["5"]), (kind, label)


# ----------------------------------------------------------------------------- detector files
def _file_info():
    return dict(checkpoint_sha256="0" * 64, checkpoint="runs/x/checkpoint.pt", dataset="fashion-mnist", classes=None,
                head="softmax", split="heldout", fpr=0.05, fit_images=400, calibration_images=400)


@pytest.mark.parametrize("name", ["mahalanobis-l2", "knn", "energy", "mahalanobis-l2+center-distance"])
def test_detector_files_hold_any_member_and_refuse_a_threshold_their_calibration_could_not_give(tmp_path, name):
    from lgm_lab.checkpoints import content_digest
    from lgm_lab.detector_file import DetectorFileError, load_detector_file, save_detector_file

    det, head, f, y, lg = _built(name)
    det.calibrate(f, 0.05, logits=lg)
    path = tmp_path / "det.pt"
    save_detector_file(path, det, detector_name=name, num_classes=K, feat_dim=D, **_file_info())
    back, info = load_detector_file(path)
    assert info["detector_name"] == name and type(back) is type(det) and back.threshold == det.threshold
    assert torch.equal(back.score(f, lg), det.score(f, lg))
    # an edit with the digest recomputed: a threshold no calibration of this detector could give
    file = torch.load(path, weights_only=True)
    file.pop("sha256")
    file["detector"]["threshold"] = file["detector"]["calibration_max"] + 1.0
    file["sha256"] = content_digest(file)
    torch.save(file, path)
    with pytest.raises(DetectorFileError, match="calibrat"):
        load_detector_file(path)


def test_format_2_detector_files_still_load(tmp_path):
    """A file lgm detect fit wrote before the family (format 2: Gaussians, 'covariance' instead of a name)."""
    from lgm_lab.checkpoints import content_digest
    from lgm_lab.detector_file import load_detector_file

    f, y = _data()
    for cov, name in (("tied", "mahalanobis"), ("diag", "gaussian-diag")):
        det = LikelihoodDetector.fit(f, y, cov).calibrate(f, 0.05)
        sd = {k: v for k, v in det.state_dict().items() if not k.startswith("calibration_m")}  # as format 2 wrote
        file = {"format": "lgm-detector-file/2", "detector": sd, "num_classes": K, "feat_dim": D, "covariance": cov,
                **_file_info()}
        file["sha256"] = content_digest(file)
        torch.save(file, tmp_path / f"{cov}.pt")
        back, info = load_detector_file(tmp_path / f"{cov}.pt")
        assert info["detector_name"] == name and back.covariance == cov and back.threshold == det.threshold
        assert torch.equal(back.score(f), det.score(f))


# ----------------------------------------------------------------------------- review findings (each failed before)
@pytest.mark.parametrize("seed", range(6))
def test_the_combination_never_rejects_more_than_fpr_of_its_calibration_inputs(seed):
    """The threshold is set from the scores as score() computes them (float32), so the combination, its
    rejected_by and the deployed module reject the same inputs, never more than floor(fpr N)."""
    g = torch.Generator().manual_seed(seed)
    n = 997 + 13 * seed
    y = torch.randint(0, K, (n,), generator=g)
    f = torch.randn(n, D, generator=g) + 3.0 * nn.functional.one_hot(y, D).float()
    fc = torch.randn(n, D, generator=g) + 3.0 * nn.functional.one_hot(y, D).float()
    comb = detectors.create("mahalanobis-l2+mahalanobis", features=f, labels=y).calibrate(fc, 0.05)
    rej = comb.reject(fc)
    assert int(rej.sum()) <= math.floor(0.05 * n)
    assert torch.equal(comb.rejected_by(fc).any(1), rej)
    model = RejectingClassifier(nn.Identity(), nn.Linear(D, K), comb).eval()
    assert torch.equal(~model(fc)[1], rej)


def test_logit_scores_reject_infinite_logits():
    lg = torch.tensor([[float("inf"), 0.0, 1.0], [float("nan"), 0.0, 1.0], [0.5, 0.0, 1.0]])
    for det in (EnergyDetector(), MaxLogitDetector(), MaxSoftmaxDetector()):
        det.threshold = -100.0
        assert det.reject(logits=lg).tolist() == [True, True, False], det.name


def test_a_combination_keeps_an_lgm_heads_own_gaussians_when_fitted():
    head = _lgm_head()
    f, y = _data()
    comb = detectors.create("lgm-likelihood+mahalanobis", head, features=f, labels=y)
    comb.fit(f, y)
    assert torch.equal(comb.members[0].means, head.means.detach().double())
    back = Detector.from_state_dict(comb.state_dict())
    back.fit(f * 2, y)
    assert torch.equal(back.members[0].means, head.means.detach().double())
    own = LikelihoodDetector.from_head(head)
    own.fit(f, y)  # an explicit refit of the member itself still refits it (and it is then a fitted detector)
    assert not torch.equal(own.means, head.means.detach().double()) and own.requires_fit


def test_failed_calibration_and_fit_leave_a_combination_as_it_was():
    f, y = _data()
    comb = detectors.create("mahalanobis+knn", features=f, labels=y).calibrate(f, 0.05)
    before = comb.state_dict()
    bad = f.clone()
    bad[0] = 1e19
    with pytest.raises(ValueError, match="non-finite score"):
        comb.calibrate(bad, 0.05)
    after = comb.state_dict()
    assert after["threshold"] == before["threshold"]
    assert torch.equal(after["tensors"]["center"], before["tensors"]["center"])
    lin = nn.Linear(D, K)
    both = detectors.create("mahalanobis+vim", lin, features=f, labels=y)
    means = both.members[0].means.clone()
    with pytest.raises(ValueError, match="num_classes"):
        both.fit(f[y < 3], y[y < 3])  # 3 classes for the Gaussians, 4 for ViM's classifier
    assert torch.equal(both.members[0].means, means)


def test_interface_edges():
    f, y = _data()
    with torch.no_grad():
        lg = _Head().logits(f)
    g = LikelihoodDetector.fit(f, y, "diag")
    assert g.fit(f, y, lg) is g and g.covariance == "diag"  # the family's fit(features, labels, logits)
    with pytest.raises(ValueError, match="LikelihoodDetector.state_dict"):
        Detector.from_state_dict({"format": "lgm_ext.detectors/1", "kind": "gaussian", "config": {}, "tensors": {}})
    unfitted = KNNDetector(5)
    unfitted.threshold = 0.0
    with pytest.raises(ValueError, match="not fitted"):
        RejectingClassifier(nn.Identity(), nn.Linear(D, K), unfitted)
    with pytest.raises(TypeError, match="center-distance"):
        detectors.create("center-distance", _Head(), k=3)


def test_a_detector_file_whose_name_is_not_its_detector_is_refused(tmp_path):
    from lgm_lab.checkpoints import content_digest
    from lgm_lab.detector_file import DetectorFileError, load_detector_file, save_detector_file

    det, _head, f, y, lg = _built("knn")
    det.calibrate(f, 0.05)
    path = tmp_path / "det.pt"
    for name, word in (("no-such-detector", "not a detector"), ("knn+energy", "not consistent")):
        save_detector_file(path, det, detector_name="knn", num_classes=K, feat_dim=D, **_file_info())
        file = torch.load(path, weights_only=True)
        file.pop("sha256")
        file["detector_name"] = name
        file["sha256"] = content_digest(file)
        torch.save(file, path)
        with pytest.raises(DetectorFileError, match=word):
            load_detector_file(path)
