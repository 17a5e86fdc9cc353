"""Attack invariants on a small model trained here (SPEC section 4)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lgm_ext
from lgm_ext import LikelihoodDetector
from lgm_ext.attacks import FGSM, PGD, AdaptivePGD, InversePGD, LGMClassificationLoss, TargetedFGSM

CLASSES = 4


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.35 + 0.15 * torch.randn(n, 1, 8, 8, generator=g)
    for c in range(CLASSES):  # class c: a brighter quadrant
        r, q = divmod(c, 2)
        x[y == c, :, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 0.3
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    x, y = _data(512, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    xt, yt = _data(200, 1)
    assert (model(xt).argmax(1) == yt).float().mean() > 0.9
    return model, xt, yt


def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def _invariants(model, x, adv, eps):
    assert adv.shape == x.shape and not adv.requires_grad
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= eps + 1e-6
    assert all(p.grad is None for p in model.parameters())


def test_fgsm_raises_loss(trained):
    model, x, y = trained
    adv = FGSM(model, eps=0.1)(x, y)
    _invariants(model, x, adv, 0.1)
    assert _ce(model, adv, y) > _ce(model, x, y) + 0.1


def test_pgd_stronger_than_fgsm_and_deterministic(trained):
    model, x, y = trained
    a = PGD(model, eps=0.1, alpha=0.02, steps=10, seed=3)(x, y)
    b = PGD(model, eps=0.1, alpha=0.02, steps=10, seed=3)(x, y)
    _invariants(model, x, a, 0.1)
    assert torch.equal(a, b)
    assert _ce(model, a, y) >= _ce(model, FGSM(model, eps=0.1)(x, y), y) - 1e-3


def test_inverse_pgd_lowers_loss(trained):
    model, x, y = trained
    atk = InversePGD(model)
    assert (atk.eps, atk.alpha, atk.steps, atk.random_start) == (4 / 255, 2 / 255, 5, False)
    adv = atk(x, y)
    _invariants(model, x, adv, 4 / 255)
    assert _ce(model, adv, y) < _ce(model, x, y)


def test_targeted_hits_target_more_than_chance(trained):
    model, x, y = trained
    targets = (y + 1) % CLASSES
    adv = PGD(model, eps=0.3, alpha=0.05, steps=20, targeted=True, seed=0)(x, y, targets)
    _invariants(model, x, adv, 0.3)
    with torch.no_grad():
        hit = (model(adv).argmax(1) == targets).float().mean().item()
    assert hit > 1.0 / CLASSES + 0.2
    adv = TargetedFGSM(model, eps=0.3)(x, y)  # default target: second most likely class
    with torch.no_grad():
        second = model(x).topk(2, 1).indices[:, 1]
        hit = (model(adv).argmax(1) == second).float().mean().item()
    assert hit > 1.0 / CLASSES


def test_mode_restored_and_any_batch_size(trained):
    model, x, y = trained
    model.train()
    for n in (1, 3):
        FGSM(model, eps=0.05)(x[:n], y[:n])
        PGD(model, eps=0.05, steps=2, seed=0)(x[:n], y[:n])
    assert model.training
    model.eval()
    InversePGD(model)(x[:2], y[:2])
    assert not model.training


def test_per_sample_independent_of_batch(trained):
    model, x, y = trained
    whole = InversePGD(model)(x[:8], y[:8])
    single = torch.cat([InversePGD(model)(x[i : i + 1], y[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(whole, single)


def test_lgm_classification_loss_plugs_in():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))
    head = lgm_ext.LGMLoss(CLASSES, 8, alpha=0.3, lambda_=0.1)
    x, y = _data(512, 0)
    opt = torch.optim.Adam(list(backbone.parameters()) + list(head.parameters()), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        head(backbone(x), y)[0].backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    loss_fn = LGMClassificationLoss(head)
    xt, yt = _data(100, 1)
    with torch.no_grad():
        assert (head.predict(backbone(xt)) == yt).float().mean() > 0.9
        clean = loss_fn(backbone(xt), yt).item()
    adv = FGSM(backbone, eps=0.1, loss_fn=loss_fn)(xt, yt)
    inv = InversePGD(backbone, loss_fn=loss_fn)(xt, yt)
    with torch.no_grad():
        assert loss_fn(backbone(adv), yt).item() > clean
        assert loss_fn(backbone(inv), yt).item() < clean
    tgt = TargetedFGSM(backbone, eps=0.1, loss_fn=loss_fn)(xt, yt)  # targets from the head's logits
    assert tgt.shape == xt.shape
    assert all(p.grad is None for p in list(backbone.parameters()) + list(head.parameters()))


def test_bad_arguments(trained):
    model, x, y = trained
    with pytest.raises(ValueError):
        FGSM(model, eps=-1)
    with pytest.raises(ValueError):
        PGD(model, steps=-1)
    with pytest.raises(ValueError, match="targets"):
        PGD(model, targeted=True)(x, y)
    with pytest.raises(ValueError, match="labels"):
        FGSM(model)(x, y[:3])
    with pytest.raises(TypeError):
        FGSM(model)(x.long(), y)


def test_lenet_plus_plus_shapes():
    from lgm_lab.models import LeNetPlusPlus

    m = LeNetPlusPlus(feat_dim=2)
    assert m(torch.rand(3, 1, 28, 28)).shape == (3, 2)
    m = LeNetPlusPlus(feat_dim=100)
    f = m(torch.rand(2, 1, 28, 28))
    assert f.shape == (2, 100) and (f < 0).any()  # linear feature layer by default (the authors' code)
    f = LeNetPlusPlus(feat_dim=100, feature_relu=True)(torch.rand(2, 1, 28, 28))
    assert (f >= 0).all()  # the paper's text: ReLU
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.bias.abs().max() == 0 for c in convs)


@pytest.mark.parametrize("name", ["FGSM", "TargetedFGSM", "PGD", "InversePGD"])
def test_attacks_restore_each_submodules_mode(name):
    from lgm_ext import attacks

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    model[2].eval()
    atk = getattr(attacks, name)(model, eps=0.1)
    x, y = torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,))
    if name == "PGD":
        atk = attacks.PGD(model, eps=0.1, steps=2, seed=0)
    atk(x, y)
    assert [m.training for m in model.modules()] == [True, True, True, False, True, True]
    model.eval()
    model[3].train()
    atk(x, y)
    assert [m.training for m in model.modules()] == [False, False, False, False, True, False]


# ----------------------------------------------------------------------------- adaptive attack (issue 25)
@pytest.fixture(scope="module")
def lgm_detected():
    """A linear backbone with an L-GM head (features in R^8) and its likelihood detector, calibrated to reject 5%
    of the training images (the toy problem AdaptivePGD's docstring quotes)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))
    head = lgm_ext.LGMLoss(CLASSES, 8, alpha=0.3, lambda_=0.1)
    x, y = _data(512, 0)
    opt = torch.optim.Adam(list(backbone.parameters()) + list(head.parameters()), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        head(backbone(x), y)[0].backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        det = LikelihoodDetector.from_head(head).calibrate(backbone(x), fpr=0.05)
    xt, yt = _data(200, 1)
    return backbone, head, det, xt, yt


def _rejected_and_fooled(backbone, head, det, adv, y):
    with torch.no_grad():
        f = backbone(adv)
        return det.reject(f), head.predict(f) != y


@pytest.mark.parametrize("eps", [0.2, 0.3])
def test_adaptive_pgd_passes_the_detector_more_often_than_pgd(lgm_detected, eps):
    backbone, head, det, x, y = lgm_detected
    loss_fn = LGMClassificationLoss(head)
    plain = PGD(backbone, eps, eps / 4, steps=10, loss_fn=loss_fn, seed=0)(x, y)
    rej_plain, fooled_plain = _rejected_and_fooled(backbone, head, det, plain, y)
    win_plain = (fooled_plain & ~rej_plain).float().mean().item()
    assert rej_plain.float().mean() > 0.6  # the likelihood rejects most plain PGD examples
    for mode in ("penalty", "selective"):
        atk = AdaptivePGD(backbone, det, eps, eps / 4, steps=10, loss_fn=loss_fn, mode=mode, penalty=1.0, seed=0)
        adv, ok = atk(x, y, return_success=True)
        _invariants(backbone, x, adv, eps)
        assert all(p.grad is None for p in head.parameters())
        rej, fooled = _rejected_and_fooled(backbone, head, det, adv, y)
        assert torch.equal(ok, fooled & ~rej)  # the reported success is what the detector and the head say
        assert rej.float().mean() < rej_plain.float().mean() - 0.1, (mode, rej.float().mean(), rej_plain.float().mean())
        assert torch.equal(adv, atk(x, y))  # seeded: deterministic
        if mode == "selective":
            assert ok.float().mean().item() > win_plain + 0.3


def test_adaptive_pgd_without_penalty_is_pgd(lgm_detected):
    backbone, head, det, x, y = lgm_detected
    loss_fn = LGMClassificationLoss(head)
    plain = PGD(backbone, 0.2, 0.05, steps=5, loss_fn=loss_fn, seed=1)(x, y)
    same = AdaptivePGD(backbone, det, 0.2, 0.05, steps=5, loss_fn=loss_fn, mode="penalty", penalty=0.0,
                       keep_successful=False, seed=1)(x, y)
    assert torch.equal(plain, same)


def test_adaptive_pgd_takes_any_detector_with_score_and_threshold(trained):
    """A softmax network split into backbone and classifier, with a max-softmax detector written here (the
    protocol: score(outputs), threshold) and a post-hoc Mahalanobis detector on its features."""
    model, x, y = trained
    backbone, classifier = model[:3], model[3]

    class MaxSoftmax:
        threshold = None

        def score(self, feats):
            return torch.softmax(classifier(feats), 1).max(1).values

    with torch.no_grad():
        feats = backbone(x)
    soft = MaxSoftmax()
    soft.threshold = soft.score(feats).quantile(0.05).item()
    maha = LikelihoodDetector.fit(feats, y, "tied").calibrate(feats, fpr=0.05)
    plain = PGD(model, 0.3, 0.075, steps=10, seed=0)(x, y)
    model.train()
    for det in (soft, maha):
        atk = AdaptivePGD(backbone, det, 0.3, 0.075, steps=10, classifier=classifier, seed=0)
        adv, ok = atk(x, y, return_success=True)
        _invariants(model, x, adv, 0.3)
        with torch.no_grad():
            f, fp = backbone(adv), backbone(plain)
            assert torch.equal(ok, (classifier(f).argmax(1) != y) & (det.score(f) >= det.threshold))
            win_plain = ((classifier(fp).argmax(1) != y) & (det.score(fp) >= det.threshold)).float().mean()
        assert ok.float().mean() > win_plain + 0.3  # measured: max-softmax 100% vs 40%, Mahalanobis 89% vs 11%
    assert model.training  # every submodule's mode restored
    model.eval()


def test_adaptive_pgd_bad_arguments(lgm_detected):
    backbone, head, det, x, y = lgm_detected
    with pytest.raises(ValueError, match="threshold"):
        AdaptivePGD(backbone, det.with_score("likelihood"), loss_fn=LGMClassificationLoss(head))(x, y)
    with pytest.raises(TypeError, match="detector"):
        AdaptivePGD(backbone, object())
    with pytest.raises(ValueError, match="mode"):
        AdaptivePGD(backbone, det, mode="orthogonal")
    with pytest.raises(ValueError, match="penalty"):
        AdaptivePGD(backbone, det, penalty=-1.0)
    with pytest.raises(ValueError, match="eps"):
        AdaptivePGD(backbone, det, eps=-0.1)

    class Frozen:
        threshold = 0.0

        def score(self, feats):
            return feats.detach().sum(1)

    with pytest.raises(TypeError, match="differentiable"):
        AdaptivePGD(backbone, Frozen(), loss_fn=LGMClassificationLoss(head))(x, y)


def test_fgsm_sweep_equals_one_attack_per_eps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.rand(8, 1, 3, 4), torch.randint(0, 3, (8,))
    eps_list = (0.0, 0.05, 0.1, 0.3)
    swept = FGSM(model).sweep(x, y, eps_list)
    assert list(swept) == list(eps_list)
    for e in eps_list:
        assert torch.equal(swept[e], FGSM(model, eps=e)(x, y)), e
    with pytest.raises(ValueError, match="eps"):
        FGSM(model).sweep(x, y, (0.1, -0.1))
    with pytest.raises(ValueError, match="labels"):
        FGSM(model).sweep(x, y[:3], (0.1,))


# ----------------------------------------------------------------------------- AdaptivePGD's convention (issue 33)
def test_adaptive_pgd_takes_the_images_to_logits_classifier_as_fgsm_and_pgd_do(lgm_detected):
    """FGSM/PGD take an images -> logits model (lgm_ext.Classifier(backbone, head)); AdaptivePGD takes it too
    (the detector scores the backbone's features, predictions are the head's), as model or as classifier next
    to its backbone, and attacks exactly as with backbone + classifier=head.logits.  Passing it used to raise a
    shape error (the detector was handed the logits, or the classifier the features)."""
    backbone, head, det, x, y = lgm_detected
    clf = lgm_ext.Classifier(backbone, head)
    ref, ok_ref = AdaptivePGD(backbone, det, 0.2, 0.05, steps=5, classifier=head.logits, seed=0)(
        x, y, return_success=True)
    assert ok_ref.any() and not ok_ref.all()
    for atk in (AdaptivePGD(clf, det, 0.2, 0.05, steps=5, seed=0),
                AdaptivePGD(backbone, det, 0.2, 0.05, steps=5, classifier=clf, seed=0)):
        adv, ok = atk(x, y, return_success=True)
        assert torch.equal(adv, ref) and torch.equal(ok, ok_ref)
    clf.train()
    step = int(head.step)
    AdaptivePGD(clf, det, 0.2, 0.05, steps=1, seed=0)(x, y)
    assert clf.training and head.training and int(head.step) == step  # modes restored, no training forward


def test_adaptive_pgd_refuses_what_cannot_be_right(lgm_detected):
    """Combinations that used to give a silent wrong answer (or an unexplained shape error) are ValueErrors:
    without a classifier the outputs are read as logits -- a detector on 8-D features of 4 classes cannot
    score logits (the argmax of the features was taken as the prediction: 94.5% "success" at eps = 0 on this
    problem, where the true success is 0%); a classifier that does not map the model's outputs to logits; a
    detector whose dimension is not the model's output width; labels outside the classifier's classes."""
    backbone, head, det, x, y = lgm_detected
    with pytest.raises(ValueError, match="classifier"):
        AdaptivePGD(backbone, det, eps=0.0)
    with pytest.raises(ValueError, match="classifier"):  # an images -> logits network that is not the backbone's
        AdaptivePGD(backbone, det, classifier=lgm_ext.Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 8)), head))
    with pytest.raises(ValueError, match="classifier"):  # model is a Classifier: its head already classifies
        AdaptivePGD(lgm_ext.Classifier(backbone, head), det, classifier=head.logits)
    with pytest.raises(ValueError, match="classifier"):  # maps images, not features, to logits
        AdaptivePGD(backbone, det, classifier=nn.Sequential(backbone, nn.Linear(8, CLASSES)))(x, y)
    with pytest.raises(ValueError, match="detector"):  # the detector scores 5-D features, the model gives 8-D
        other = LikelihoodDetector.fit(torch.randn(40, 5), torch.arange(4).repeat(10)).calibrate(torch.randn(9, 5))
        AdaptivePGD(backbone, other, classifier=head.logits)(x, y)
    with pytest.raises(ValueError, match="labels"):
        AdaptivePGD(backbone, det, classifier=head.logits)(x, y + CLASSES)
    # a detector on logits without a classifier is right: the outputs are the logits the detector scores
    logit_det = LikelihoodDetector.fit(lgm_ext.Classifier(backbone, head)(x).detach(), y).calibrate(
        lgm_ext.Classifier(backbone, head)(x).detach())
    adv, ok = AdaptivePGD(nn.Sequential(backbone, _Logits(head)), logit_det, 0.2, 0.05, steps=3, seed=0)(
        x, y, return_success=True)
    assert adv.shape == x.shape and ok.dtype == torch.bool


class _Logits(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, features):
        return self.head.logits(features)
