"""Detection measured to the field's standard (issue 35): the metrics against scikit-learn and OpenOOD's
definition on fixed data (the detectors against pytorch-ood are tests/test_detectors.py), the natural-image
patches, and the adaptive attack's protocol (restarts, targets, step
sweep, one run for every operating point) on a toy network."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from lgm_ext import LGMLoss, LikelihoodDetector
from lgm_ext.attacks import AdaptivePGD
from lgm_lab.adaptive_eval import (
    ATTACK_PROTOCOLS,
    AttackProtocol,
    adaptive_attack,
    describe_protocol,
    feature_space_attack,
    success_rates,
    transfer_images,
    transfer_success,
)
from lgm_lab.experiments import measure as M
from lgm_lab.ood_data import OOD_SETS, ood_images, photo_patches

pytest.importorskip("pytorch_ood")


# ----------------------------------------------------------------------------- metrics
def _openood(normal: np.ndarray, abnormal: np.ndarray, tpr: float = 0.95) -> float:
    """OpenOOD v1.5's FPR@95 as its evaluator defines it: OOD positive, ranked by -confidence."""
    from sklearn.metrics import roc_curve

    conf = np.concatenate([normal, abnormal])
    ood = np.concatenate([np.zeros(len(normal)), np.ones(len(abnormal))])
    fpr, tp, _ = roc_curve(ood, -conf)
    return float(fpr[np.argmax(tp >= tpr)])


def test_metrics_match_scikit_learn_and_both_fpr_conventions():
    from sklearn.metrics import average_precision_score, roc_auc_score

    g = torch.Generator().manual_seed(0)
    normal = torch.randn(300, generator=g, dtype=torch.float64) + 1.5
    abnormal = torch.randn(200, generator=g, dtype=torch.float64)
    m, roc = M.detection_metrics(normal, abnormal, {0.05: 0.9, 0.01: -0.5})
    s = np.concatenate([normal.numpy(), abnormal.numpy()])
    truth = np.r_[np.ones(300), np.zeros(200)]
    assert m["auroc"] == pytest.approx(100 * roc_auc_score(truth, s))
    assert m["aupr_in"] == pytest.approx(100 * average_precision_score(truth, s))
    assert m["aupr_out"] == pytest.approx(100 * average_precision_score(1 - truth, -s))
    assert m["aupr_in"] != pytest.approx(m["aupr_out"])
    assert m["fpr95_out"] == pytest.approx(100 * _openood(normal.numpy(), abnormal.numpy()))
    # ID-positive by hand: the highest threshold accepting >= 95% of normal, the abnormal share accepted there
    t = np.sort(normal.numpy())[::-1][math.ceil(0.95 * 300) - 1]
    assert m["fpr95_in"] == pytest.approx(100 * (abnormal.numpy() >= t).mean())
    assert m["fpr95_in"] != pytest.approx(m["fpr95_out"])  # two conventions, two numbers
    assert m["rejected"] == {"5": pytest.approx(100 * (abnormal.numpy() < 0.9).mean()),
                             "1": pytest.approx(100 * (abnormal.numpy() < -0.5).mean())}
    assert M.detection_metrics(normal, abnormal, 0.9)[0]["rejected"] == {"at": m["rejected"]["5"]}
    assert M.operating_point_key(0.05) == "5" and M.operating_point_key(0.001) == "0.1"
    with pytest.raises(ValueError, match="positive"):
        M.fpr_at_tpr(normal, abnormal, positive="ood")


def test_metrics_agree_with_pytorch_ood():
    """pytorch-ood 0.4.0's metrics (OOD positive, outlier scores, labels < 0 mark OOD): FPR@95TPR is our
    fpr95_out; its AUROC is ours; its AUPR-in/out (areas under the PR curves) are close to scikit-learn's
    average precision, which we report."""
    from pytorch_ood.metrics import functional as PF

    g = torch.Generator().manual_seed(3)
    normal = torch.randn(500, generator=g, dtype=torch.float64) + 1.0
    abnormal = torch.randn(400, generator=g, dtype=torch.float64)
    m, _ = M.detection_metrics(normal, abnormal)
    scores = -torch.cat([normal, abnormal])
    labels = torch.cat([torch.zeros(500, dtype=torch.long), -torch.ones(400, dtype=torch.long)])
    assert m["fpr95_out"] == pytest.approx(100 * float(PF.fpr_at_tpr(scores, labels)))
    assert m["auroc"] == pytest.approx(100 * float(PF.auroc(scores, labels)))
    assert m["aupr_out"] == pytest.approx(100 * float(PF.aupr(scores, labels, positive="ood")), abs=0.5)
    assert m["aupr_in"] == pytest.approx(100 * float(PF.aupr(scores, labels, positive="id")), abs=0.5)


def test_fpr_conventions_on_hand_computed_scores():
    normal, abnormal = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0.65, 0.5, 0.85, 0.1])
    # normal positive: accepting all 4 normal (t = 0.6) accepts 0.65 and 0.85 of the abnormal
    assert M.fpr_at_tpr(normal, abnormal, 0.95, positive="in") == pytest.approx(0.5)
    # abnormal positive: rejecting >= 95% of abnormal needs t above 0.85, which rejects 0.8, 0.7, 0.6 too
    assert M.fpr_at_tpr(normal, abnormal, 0.95, positive="out") == pytest.approx(0.75)


class _Constant:
    """A detector whose score is the same for every input: no detector in the way."""

    def __init__(self) -> None:
        self.threshold = 0.0

    def score(self, f):
        return 0.0 * f.sum(1)


# ----------------------------------------------------------------------------- natural-image patches
def test_photo_patches():
    a = photo_patches((1, 28, 28), 64, seed=0)
    assert a.shape == (64, 1, 28, 28) and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and a.std() > 0.05
    torch.testing.assert_close(photo_patches((1, 28, 28), 64, seed=0), a, rtol=0, atol=0)
    assert not torch.equal(photo_patches((1, 28, 28), 64, seed=1), a)
    assert a.flatten(1).std(1).min() > 0  # crops, not constants
    rgb = photo_patches((3, 32, 32), 4, seed=0)
    assert rgb.shape == (4, 3, 32, 32) and not torch.equal(rgb[:, 0], rgb[:, 2])
    assert "photos" in OOD_SETS
    x = torch.rand(10, 1, 28, 28)
    assert ood_images("photos", x, seed=2).shape == x.shape
    with pytest.raises(ValueError, match="1 or 3 channels"):
        photo_patches((2, 28, 28), 1)


# ----------------------------------------------------------------------------- the adaptive protocol
@pytest.fixture
def toy():
    """An images -> 2-D features network with an L-GM head fitted to its training features and the head's
    likelihood detector calibrated at 5% false rejection."""
    return _toy(0)


def _toy(seed: int):
    torch.manual_seed(seed)
    x = torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # the same images for every seed
    y = x.mean((1, 2, 3)).argsort().argsort() * 3 // len(x)  # tertiles of the mean brightness
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2)).double().eval()
    x = x.double()
    with torch.no_grad():
        f = net(x)
    head = LGMLoss(3, 2, alpha=0.0).double()
    det = LikelihoodDetector.fit(f, y, "diag", num_classes=3)
    with torch.no_grad():
        head.means.copy_(det.means)
        head.log_var.copy_(det.log_var)
    det = LikelihoodDetector.from_head(head).calibrate(f, 0.05)
    return net, head, det, x, y


def test_adaptive_pgd_best_score_measures_every_threshold(toy):
    net, head, det, x, y = toy
    atk = AdaptivePGD(net, det, eps=0.05, alpha=0.0125, steps=8, classifier=head.logits, seed=3)
    adv, ok, best = atk(x[:60], y[:60], return_success=True, return_score=True)
    assert best.dtype == torch.float64 and best.shape == (60,)
    assert torch.equal(ok.cpu(), best >= det.threshold)
    # a selective run's iterates ignore the threshold: any other threshold gives success = best >= t
    for t in (det.threshold - 2.0, det.threshold + 1.0):
        det2 = LikelihoodDetector.from_head(head)
        det2.threshold = t
        _, ok2 = AdaptivePGD(net, det2, eps=0.05, alpha=0.0125, steps=8, classifier=head.logits,
                             seed=3)(x[:60], y[:60], return_success=True)
        assert torch.equal(ok2.cpu(), best >= t)
    never = torch.isinf(best)
    assert never.any() and (best[never] < 0).all()  # -inf: no misclassified iterate
    assert atk(x[:4], y[:4]).shape == x[:4].shape  # the plain call still returns the images alone


def test_protocol_variants_restarts_targets_and_step_sweep(toy):
    net, head, det, x, y = toy
    xs, ys = x[:30], y[:30]
    p = AttackProtocol(steps=6, restarts=3, step_sizes=(0.1, 0.5), targeted=True, long_steps=12, long_subset=5)
    best = adaptive_attack(net, head.logits, det, xs, ys, 0.15, p, num_classes=3, seed=0)
    assert set(best) == {"restarts", "step sweep", "multi-targeted", "long", "all"}
    assert best["long"].shape == (5,) and all(best[k].shape == (30,) for k in ("restarts", "all"))
    for k in ("restarts", "step sweep", "multi-targeted"):
        assert (best["all"] >= best[k]).all()
    assert (best["all"][:5] >= best["long"]).all()
    # more restarts never lose: the 3-restart best dominates one run from the first restart's seed
    one = adaptive_attack(net, head.logits, det, xs, ys, 0.15, AttackProtocol(steps=6, restarts=1, step_sizes=(),
                          targeted=False, long_steps=0), num_classes=3, seed=0)
    assert set(one) == {"restarts", "all"}
    assert (best["restarts"] >= one["restarts"]).sum() >= 27  # replicas draw other starts than the lone run
    # multi-targeted: each target class is tried (a 2-class problem has one target, the untargeted direction)
    r = success_rates(best, {"5": det.threshold, "1": det.threshold - 1.0})
    for k, v in r.items():
        assert 0 <= v["5"] <= v["1"] <= v["ceiling"] <= 100 and v["n"] == len(best[k])
    assert r["all"]["5"] >= max(r[k]["5"] for k in ("restarts", "step sweep", "multi-targeted"))
    assert "3 random restarts of 6 steps" in describe_protocol(p, 30) and "12 steps on 5 images" in \
        describe_protocol(p, 30)
    assert set(ATTACK_PROTOCOLS) == {"tiny", "quick", "standard"}
    s = ATTACK_PROTOCOLS["standard"]
    assert s.steps >= 100 and s.restarts == 10 and s.targeted and s.long_steps == 1000 and len(s.step_sizes) >= 3
    for bad in (dict(steps=-1), dict(restarts=1.5), dict(step_sizes=(0.0,)), dict(long_subset=-2)):
        with pytest.raises(ValueError):
            AttackProtocol(**bad)


def test_targeted_variant_reaches_the_target(toy):
    """With no detector in the way (a constant score), the multi-targeted runs misclassify about as many
    images as the untargeted run on the same budget, or more."""
    net, head, det, x, y = toy
    loose = _Constant()
    p = AttackProtocol(steps=10, restarts=1, step_sizes=(), targeted=True, long_steps=0)
    best = adaptive_attack(net, head.logits, loose, x[:50], y[:50], 0.3, p, num_classes=3, seed=1)
    fooled = torch.isfinite(best["multi-targeted"])
    assert fooled.double().mean() >= torch.isfinite(best["restarts"]).double().mean() - 0.02
    assert fooled.any()


def test_feature_space_bound(toy):
    net, head, det, x, y = toy
    with torch.no_grad():
        f = net(x[:40])
    zero = feature_space_attack(head.logits, det, f, y[:40], 0.0, steps=5)
    wrong = (head.logits(f).argmax(1) != y[:40])
    assert torch.equal(torch.isfinite(zero), wrong)  # no room: only the already misclassified
    big = feature_space_attack(head.logits, det, f, y[:40], 10.0, steps=60)
    assert (big >= det.threshold).double().mean() > 0.9  # free features reach another class's mode
    per_row = feature_space_attack(head.logits, det, f, y[:40], torch.full((40,), 10.0), steps=60)
    torch.testing.assert_close(per_row, big)


def test_external_sets_are_conformed_to_the_model(tmp_path):
    from PIL import Image

    from lgm_lab.ood_data import conform_images, external_ood_set

    rgb = torch.rand(3, 3, 40, 30)
    grey = conform_images(rgb, (1, 28, 28))
    assert grey.shape == (3, 1, 28, 28) and 0 <= float(grey.min()) and float(grey.max()) <= 1
    flat = torch.full((1, 3, 28, 28), 0.5)
    torch.testing.assert_close(conform_images(flat, (1, 28, 28)), torch.full((1, 1, 28, 28), 0.5))  # luma sums to 1
    assert conform_images(torch.rand(2, 1, 28, 28), (3, 32, 32)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="channels"):
        conform_images(torch.rand(1, 2, 8, 8), (1, 8, 8))
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(4):
        Image.fromarray((torch.rand(20, 25, 3) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
    name, x, skipped = external_ood_set(str(folder), (1, 28, 28), n=3, seed=0)
    assert name == "shots" and x.shape == (3, 1, 28, 28) and skipped == []
    with pytest.raises(ValueError, match="--ood-data"):
        external_ood_set(str(tmp_path / "nowhere"), (1, 28, 28))


def test_transfer_attack(toy):
    """The transfer attack's images are the selective attack's kept images: evaluated on the network and
    detector they were crafted against, they succeed exactly where the white-box run did; on another network
    they are counted as that network's own success (misclassified and accepted), never above its ceiling."""
    net, head, det, x, y = toy
    xs, ys = x[:60], y[:60]
    adv = transfer_images(net, head.logits, det, xs, ys, 0.05, steps=8, seed=2)
    assert adv.shape == xs.shape and (adv - xs).abs().max() <= 0.05 + 1e-12
    full, ok = AdaptivePGD(net, det, eps=0.05, alpha=2.5 * 0.05 / 8, steps=8, classifier=head.logits, seed=2)(
        xs, ys, return_success=True)
    assert torch.equal(adv, full) and 0.2 < ok.double().mean() < 0.95  # the kept images; some fail, some succeed
    same = transfer_success(net, head.logits, det, adv, ys, {"5": det.threshold})
    assert same["n"] == 60 and same["5"] == pytest.approx(100.0 * ok.double().mean().item())
    # in batches, each with its own random start, the images differ but stay in the ball
    parts = transfer_images(net, head.logits, det, xs, ys, 0.05, steps=8, seed=2, batch=25)
    assert parts.shape == xs.shape and (parts - xs).abs().max() <= 0.05 + 1e-12
    # with nothing rejected, success is the misclassification rate; a threshold above every score: 0
    with torch.no_grad():
        wrong = (head.logits(net(adv)).argmax(1) != ys).double().mean().item() * 100
    r = transfer_success(net, head.logits, det, adv, ys, {"none": -math.inf, "all": math.inf})
    assert r["none"] == pytest.approx(wrong) == r["ceiling"] and r["all"] == 0.0
    net2, head2, det2, _x, _y = _toy(1)
    r2 = transfer_success(net2, head2.logits, det2, adv, ys, {"5": det2.threshold, "1": det2.threshold - 1.0})
    assert 0 <= r2["5"] <= r2["1"] <= r2["ceiling"] <= 100
    assert transfer_success(net2, head2.logits, det2, adv[:0], ys[:0], {"5": 0.0}) == {"5": 0.0, "ceiling": 0.0,
                                                                                         "n": 0}
    with pytest.raises(ValueError, match="steps"):
        transfer_images(net, head.logits, det, xs, ys, 0.15, steps=0)


def test_transfer_check_between_two_networks():
    from lgm_lab.detection_protocol import _thresholds, transfer_check

    nets = []
    for seed in (0, 1):
        net, head, det, x, y = _toy(seed)
        with torch.no_grad():
            f = net(x)
        loose = _Constant()
        nets.append((net, head, {"L-GM likelihood": (det, _thresholds(det, f, (0.05, 0.01))),
                                 "anything": (loose, {"5": 0.0, "1": 0.0})}))
    nets[1][2].pop("anything")  # only the detectors both networks have are checked
    out = transfer_check(nets[0], nets[1], x[:30], y[:30], eps=(0.05, 0.3), steps=6, seed=0)
    assert set(out) == {"L-GM likelihood"} and set(out["L-GM likelihood"]) == {"0.05", "0.3"}
    for r in out["L-GM likelihood"].values():
        assert r["n"] == 30 and 0 <= r["5"] <= r["1"] <= r["ceiling"] <= 100
    assert out["L-GM likelihood"]["0.3"]["ceiling"] >= out["L-GM likelihood"]["0.05"]["ceiling"]
