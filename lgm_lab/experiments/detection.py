"""Out-of-distribution and adversarial detection, measured (issue 25; docs/SPEC.md section 8).

Networks: LeNet++ 100-D with a softmax, a center-loss and an L-GM (alpha = 1) head, each seed trained twice
(:data:`DETECTION_MODELS`): on all ten Fashion-MNIST classes, and on classes 0-4 only (the held-out-classes
protocol: the test images of classes 5-9 are its unknown inputs).  Detectors on those networks
(:func:`build_detectors`): the L-GM head's own likelihood (:meth:`lgm_ext.LikelihoodDetector.from_head`); the
post-hoc Mahalanobis detector (:meth:`~lgm_ext.LikelihoodDetector.fit`, tied covariance, on the network's
training features), the maximum softmax probability and, with center loss, the distance to the predicted
class's center on the others.

Clean test images are split by :func:`lgm_lab.ood_data.split_clean`: the threshold of every detector is
calibrated at a false-rejection rate of 5% on one half, and everything is measured on the other half against
the abnormal sets -- scikit-learn's digits, uniform and Gaussian noise, inverted images, the held-out
classes, FGSM and PGD-10 at eps 0.1 and 0.3 -- as AUROC, FPR at 95% TPR, EER, the fraction rejected at the
threshold and the realised false-rejection rate.  Adaptive attack: :class:`lgm_ext.attacks.AdaptivePGD`
(selective, PGD-10 budget) against each detector; its success -- misclassified *and* accepted -- beside plain
PGD's with the same detector on.  Seeds: mean ± std, and :func:`~lgm_lab.experiments.stats.compare`'s
verdicts for "L-GM's likelihood detects X better".  Finished runs and measurements are reused.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Subset

from lgm_ext import Classifier, LikelihoodDetector
from lgm_ext.attacks import FGSM, PGD, AdaptivePGD
from lgm_ext.detector import calibrated_threshold

from .. import baselines as B
from ..adaptive_eval import ATTACK_PROTOCOLS, adaptive_attack, describe_protocol, feature_space_attack, success_rates
from ..baselines import FeatureScore

from ..checkpoints import checkpoint_digest, load_trained
from ..config import dataset_info
from ..data import load_dataset
from ..figures import detection_roc_figure
from ..heads import center_log_score
from ..ood_data import DIGITS_SIZE, OOD_SETS, ood_images, other_classes, restrict_classes, split_clean
from ..tensors import batches, features, stack_dataset
from ..train import TrainingDiverged
from .measure import attack_in_batches, detection_metrics, operating_point_key, rejection_rate
from .runs import budget_words, load_cached, run_config, save_cached, train_or_reuse
from .stats import compare, mean_std_text

__all__ = ["DETECTION_MODELS", "DETECTION_PRESETS", "HELDOUT_CLASSES", "EPS", "PGD_STEPS", "FPR", "FPRS",
           "LGM_DETECTOR", "ScoreDetector", "center_distance", "detector_names", "build_detectors", "HELDOUT_SET",
           "detection_data", "lgm_diagnostics", "measure_network", "detection_experiment", "detection_stages",
           "detection_verdicts", "preferred_detectors", "detection_markdown"]

DETECTION_MODELS = {"softmax": dict(head="softmax"), "center": dict(head="center"),
                    "lgm-a1": dict(head="lgm", alpha=1.0)}
HELDOUT_CLASSES = "0-4"  # the held-out-classes networks train on these; the other classes are unknown
HELDOUT_SET = "held-out classes"
EPS = (0.1, 0.3)
PGD_STEPS = 10  # PGD-10, step 2.5 eps / steps (Madry et al.)
FPRS = (0.05, 0.01)  # the calibrated false-rejection rates: the operating points a user deploys
FPR = FPRS[0]
LGM_DETECTOR = "L-GM likelihood (lgm-a1)"
# Budgets in SGD steps, from the budget curve (docs/budget, `lgm budget`): at 64 steps no head has trained; at
# 256 steps of batch 128 every head has (test errors 15-18%, 3 seeds) -- "quick" is that point (its full-class
# networks are the curve's and the demo's models); at 1,024 steps the three heads' errors are within noise of
# each other -- "standard".  Nothing here is chosen to favour a detector.  "train" overrides the report
# recipe; half of the test subset calibrates, half is measured; the held-out-classes networks train the same
# number of steps on their five classes.  "adaptive_subset" images are attacked by the selective PGD-10
# attack against every detector; "protocol" is the adaptive attack's full protocol
# (lgm_lab.adaptive_eval.ATTACK_PROTOCOLS) on the first "subset" images at "eps", on the networks of "seeds".
DETECTION_PRESETS = {
    "quick": dict(train=dict(steps=256, warmup_steps=64, test_subset=2000), seeds=(0, 1, 2), fit_points=10000,
                  attack_subset=500, adaptive_subset=100,
                  protocol=dict(name="quick", eps=(0.1,), subset=20, seeds=(0,))),
    "standard": dict(train=dict(steps=1024, warmup_steps=256, test_subset=2000), seeds=(0, 1, 2),
                     fit_points=20000, attack_subset=1000, adaptive_subset=500,
                     protocol=dict(name="standard", eps=(0.03, 0.1, 0.3), subset=200, seeds=(0, 1, 2))),
}
_PROTOCOL = 3  # bump when the measurement changes: cached measurements of another protocol are redone


class ScoreDetector(FeatureScore):
    """A detector from a differentiable score of features (higher = more normal), thresholded as
    :meth:`lgm_ext.LikelihoodDetector.calibrate` does: what :class:`~lgm_ext.attacks.AdaptivePGD` attacks
    (:class:`lgm_lab.baselines.FeatureScore`; the name kept for its users)."""

    def __init__(self, score_fn, name: str) -> None:
        super().__init__(name, score_fn)


def center_distance(head) -> ScoreDetector:
    """-|f - c_ŷ|²/2 against the head's centers (center loss: its learned centers), ŷ the head's prediction."""
    return ScoreDetector(lambda f: center_log_score(f, head.centers().detach(), head.predict(f)), "center distance")


_BASELINES = ("Mahalanobis", "Mahalanobis (L2-normalised)", "KNN", "Energy", "MaxLogit", "max-softmax")


def _knn_k(n_fit: int | None) -> int:
    return B.KNN_K if n_fit is None else max(1, min(B.KNN_K, n_fit))


def detector_names(head, feat_dim: int | None = None) -> tuple[str, ...]:
    """The protocol's detectors for a network with ``head`` (features of ``feat_dim``, default the head's):
    the field's post-hoc baselines on every network (:mod:`lgm_lab.baselines`: Mahalanobis, on raw and on
    L2-normalised features, KNN, Energy, MaxLogit, max-softmax), ViM where the head has a linear classifier,
    the center distance where it has learned centers, and on an L-GM network its own likelihood, its mixture
    score and Gaussians re-fitted post hoc (diagonal covariances) -- there MaxLogit and Energy are left out:
    they rank as the likelihood and the mixture score do.  KNN's k is :data:`lgm_lab.baselines.KNN_K` (or the
    number of training features when fewer), ViM's d :func:`lgm_lab.baselines.vim_dim` of the features."""
    names = ()
    if head.kind == "lgm":
        # MaxLogit and Energy of an L-GM head's logits are its likelihood and mixture scores up to a constant
        # (the same ranking, the same rejections): measured once, under the L-GM names.
        names += ("L-GM likelihood", "L-GM mixture", "Gaussians re-fitted (diag)")
        names += tuple(n for n in _BASELINES if n not in ("Energy", "MaxLogit"))
    else:
        names += _BASELINES
    fc = getattr(head, "fc", None)
    d = feat_dim or getattr(fc, "in_features", 0)
    if isinstance(fc, torch.nn.Linear) and fc.bias is not None and d >= 2:  # ViM needs a residual subspace
        names += ("ViM",)
    if head.kind != "lgm" and head.centers() is not None:
        names += ("center distance",)
    return names


def build_detectors(head, fit_features: Tensor | None, fit_labels: Tensor | None) -> dict:
    """The detectors of :func:`detector_names` by name, those that are fitted fitted to (``fit_features``,
    ``fit_labels``), the training images' features."""
    dets, k = {}, head.num_classes
    n_fit = None if fit_features is None else len(fit_features)
    for name in detector_names(head, None if fit_features is None else fit_features.shape[1]):
        if name == "L-GM likelihood":
            dets[name] = LikelihoodDetector.from_head(head)
        elif name == "L-GM mixture":
            dets[name] = LikelihoodDetector.from_head(head, score="mixture")
        elif name == "max-softmax":
            dets[name] = B.max_softmax(head)
        elif name == "Energy":
            dets[name] = B.energy(head)
        elif name == "MaxLogit":
            dets[name] = B.max_logit(head)
        elif name == "center distance":
            dets[name] = center_distance(head)
        elif fit_features is None:
            raise ValueError(f"the {name} detector is fitted on training features: give fit_features")
        elif name == "Gaussians re-fitted (diag)":
            dets[name] = B.likelihood(fit_features, fit_labels, k, "diag")
        elif name == "Mahalanobis":
            dets[name] = B.mahalanobis(fit_features, fit_labels, k)
        elif name == "Mahalanobis (L2-normalised)":
            dets[name] = B.mahalanobis_l2(fit_features, fit_labels, k)
        elif name == "KNN":
            dets[name] = B.knn(fit_features, fit_labels, k=_knn_k(n_fit))
        elif name == "ViM":
            dets[name] = B.vim(head, fit_features, fit_labels)
    return dets


def detection_data(cfg, *, data_dir=None, test_subset: int | None = None, test_seed: int | None = None,
                   fit_points: int | None = None, sets=None, ood_seed: int = 0) -> dict:
    """The images the protocol needs for the run ``cfg`` (of its classes, ``cfg.classes``): ``fit`` (its
    training images and labels, the first ``fit_points``; None for ``fit_points=0``), ``calibration`` and
    ``clean`` (the two halves of the ``test_subset`` test images selected with ``test_seed``, default the
    run's seed), and ``abnormal``
    by set name (``sets``, default :data:`~lgm_lab.ood_data.OOD_SETS` and, for a run on some classes, the
    held-out classes' images of the evaluation half)."""
    data_dir = data_dir or cfg.data_dir
    seed = cfg.seed if test_seed is None else test_seed
    test = load_dataset(cfg.dataset, False, data_dir=data_dir, subset=test_subset, seed=seed)
    cal, ev = split_clean(test)
    n_cal, n_ev = (len(restrict_classes(part, cfg.class_list)) for part in (cal, ev))
    if not (n_cal and n_ev):
        raise ValueError(f"too few test images ({len(test)}{' selected by --subset' if test_subset else ''}): half "
                         f"calibrate the thresholds and half are measured, and the halves hold {n_cal} and {n_ev} "
                         "images of the run's classes; use more (--subset)")
    fit = None
    if fit_points != 0:
        train = load_dataset(cfg.dataset, True, data_dir=data_dir, subset=cfg.subset, augment=False, seed=cfg.seed)
        train = restrict_classes(train, cfg.class_list)
        n_fit = len(train) if fit_points is None else min(fit_points, len(train))
        fit = stack_dataset(Subset(train, range(n_fit)))
    xc, _ = stack_dataset(restrict_classes(cal, cfg.class_list))
    x, y = stack_dataset(restrict_classes(ev, cfg.class_list))
    if sets is None:
        sets = OOD_SETS + ((HELDOUT_SET,) if cfg.class_list else ())
    abnormal = {}
    for name in sets:
        if name == HELDOUT_SET:
            if not cfg.class_list:
                raise ValueError(f"the {HELDOUT_SET!r} set needs a run trained on some classes (--classes)")
            k = dataset_info(cfg.dataset)["num_classes"]
            abnormal[name] = stack_dataset(other_classes(ev, cfg.class_list, k))[0]
        else:
            abnormal[name] = ood_images(name, x, n=min(len(x), DIGITS_SIZE) if name == "digits" else None,
                                        seed=ood_seed)
    return {"fit": fit, "calibration": xc, "clean": (x, y), "abnormal": abnormal}


def _score_batches(det, f: Tensor, batch: int = 1024) -> Tensor:
    with torch.no_grad():
        return torch.cat([det.score(f[s]).detach().double().cpu() for s in batches(len(f), batch)]) if len(f) \
            else torch.zeros(0, dtype=torch.float64)


class _AtThreshold:
    """``det`` with another threshold (what AdaptivePGD reads): the detector's score, unchanged."""

    def __init__(self, det, threshold: float) -> None:
        self.det, self.threshold = det, threshold

    def score(self, f: Tensor) -> Tensor:
        return self.det.score(f)


def _selective_pgd(model, head, det, x: Tensor, y: Tensor, eps: float, steps: int, seed: int, batch: int,
                   tick) -> Tensor:
    """(N,) float64 best scores of misclassified iterates of the selective PGD-``steps`` attack."""
    out = []
    for s in batches(len(x), batch):
        atk = AdaptivePGD(model, det, eps=eps, alpha=2.5 * eps / steps, steps=steps, classifier=head.logits,
                          seed=seed)
        out.append(atk(x[s], y[s], return_score=True)[1].cpu())
        if tick is not None:
            tick(s.stop - s.start)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def lgm_diagnostics(model, head, data: dict, f_fit: Tensor, y_fit: Tensor, feats: dict, batch: int = 256) -> dict:
    """Why an L-GM network's likelihood does or does not reject abnormal inputs: the head's learned
    log-variances against those of Gaussians fitted to its training features (diagonal), the features' norms,
    and, per abnormal set, the squared Mahalanobis distance (under the head's Gaussians) of each input to its
    nearest mean and the log-determinant term of that class, against the clean inputs' (medians)."""
    from lgm_ext.detector import LikelihoodDetector as LD

    x, _y = data["clean"]
    with torch.no_grad():
        f = features(model, x, batch).double()
        lv = head.clamped_log_var().detach().double() if hasattr(head, "clamped_log_var") else None
        refit = LD.fit(f_fit, y_fit, "diag", num_classes=head.num_classes)
        mu = head.means.detach().double()
        out = {"head_log_var_mean": None if lv is None else lv.mean().item(),
               "fitted_log_var_mean": refit.log_var.mean().item() if refit.log_var is not None else None,
               "within_class_spread": ((f_fit.double() - mu[y_fit]).pow(2).mean()).log().item(),
               "sets": {}}

        def stats(z: Tensor) -> dict:
            z = z.double()
            var = lv.exp() if lv is not None else torch.ones_like(mu)
            d2 = ((z[:, None, :] - mu[None]) ** 2 / var[None]).sum(-1)  # (N, K)
            k = d2.argmin(1)
            logdet = (lv.sum(1) if lv is not None else torch.zeros(len(mu), dtype=torch.float64))[k]
            return {"norm": z.norm(dim=1).median().item(), "d2_nearest": d2.min(1).values.median().item(),
                    "logdet_nearest": logdet.median().item(),
                    "nearest_class_share": (torch.bincount(k, minlength=len(mu)).max() / len(k)).item()}

        out["clean"] = stats(f)
        for name, z in feats.items():
            out["sets"][name] = stats(z)
    return out


def measure_network(model, head, data: dict, *, eps=EPS, attack_subset: int | None = None, fprs=FPRS,
                    adaptive: bool = True, adaptive_subset: int | None = None, protocol: dict | None = None,
                    seed: int = 0, batch: int = 256, tick=None, extra=None, fpr: float | None = None) -> dict:
    """Every detector of :func:`build_detectors` on one trained network, over ``data`` (a
    :func:`detection_data` dict).

    Each detector's thresholds are calibrated at each false-rejection rate of ``fprs`` (the operating points,
    keyed "5" and "1" for 5% and 1%) on ``data["calibration"]``.  Per abnormal set and per attack (FGSM and
    PGD-10 at each eps, on the first ``attack_subset`` clean images): the
    :func:`~lgm_lab.experiments.measure.detection_metrics` against the clean images (AUROC, AUPR-in/out, FPR
    at 95% TPR both ways, EER, rejected at each operating point); the realised false-rejection rates.  With
    ``adaptive``, on the first ``adaptive_subset`` of those images: the success (% misclassified and
    accepted) at each operating point of plain PGD-10 and of the selective adaptive PGD-10
    (:class:`lgm_ext.attacks.AdaptivePGD`, same budget) and the no-detector ceiling.  ``protocol``
    (``{"name", "eps", "subset"}``): the full adaptive protocol (:mod:`lgm_lab.adaptive_eval`) on the first
    ``subset`` images per eps, with the feature-space bound.  An L-GM network also gets
    :func:`lgm_diagnostics`.

    Returns ``{"network": {...}, "detectors": {name: {...}}, "roc": {name: {set: roc}}}``; ``tick(n)`` as n
    images are attacked.  ``extra`` (name -> a detector of this network, e.g. one saved by ``lgm detect fit``)
    are measured beside them, calibrated on the same calibration images as every other.  ``fpr``: a single
    operating point instead of ``fprs``."""
    fprs = (fpr,) if fpr is not None else tuple(fprs)
    keys = [operating_point_key(p) for p in fprs]
    x, y = data["clean"]
    xa, ya = x[:attack_subset], y[:attack_subset]
    n_ad = len(xa) if adaptive_subset is None else min(len(xa), adaptive_subset)
    with torch.no_grad():
        f_clean = features(model, x, batch)
        f_cal = features(model, data["calibration"], batch)
        feats = {name: features(model, imgs, batch) for name, imgs in data["abnormal"].items()}
        fit = data.get("fit")
        f_fit = None if fit is None else features(model, fit[0], batch)
        dets = build_detectors(head, f_fit, None if fit is None else fit[1])
        dets.update(extra or {})
        net = {"clean_error": 100.0 * (head.predict(f_clean) != y).double().mean().item(), "n_clean": len(x),
               "n_attack": len(xa), "n_adaptive": n_ad, "attack_error": {}}
    clf = Classifier(model, head).eval()
    pgd = {}
    for e in eps:
        for kind, atk in (("FGSM", FGSM(clf, eps=e)),
                          ("PGD-10", PGD(clf, eps=e, alpha=2.5 * e / PGD_STEPS, steps=PGD_STEPS, seed=seed))):
            adv = attack_in_batches(atk, xa, ya, batch, tick)
            key = f"{kind} {e:g}"
            with torch.no_grad():
                feats[key] = features(model, adv, batch)
                net["attack_error"][key] = 100.0 * (head.predict(feats[key]) != ya).double().mean().item()
            if kind == "PGD-10":
                pgd[e] = adv
    if head.kind == "lgm" and f_fit is not None:
        net["diagnostics"] = lgm_diagnostics(model, head, data, f_fit, fit[1],
                                             {k: v for k, v in feats.items() if k in data["abnormal"]}, batch)
    out = {"network": net, "detectors": {}, "roc": {}}
    for name, det in dets.items():
        s_cal = _score_batches(det, f_cal)
        th = {k: calibrated_threshold(s_cal, p) for k, p in zip(keys, fprs)}
        det.calibrate(f_cal, fprs[0])  # the primary operating point, for a caller that keeps the detector
        s_clean = _score_batches(det, f_clean)
        r = {"detector": getattr(det, "name", type(det).__name__),
             "thresholds": th, "false_rejection": {k: 100.0 * rejection_rate(s_clean, t) for k, t in th.items()},
             "n_calibration": len(f_cal), "n_attack": len(xa), "n_adaptive": n_ad, "sets": {}, "adaptive": {}}
        for key, fs in feats.items():
            r["sets"][key], roc = detection_metrics(s_clean, _score_batches(det, fs), th)
            out["roc"].setdefault(name, {})[key] = roc
        if adaptive:
            for e in eps:
                with torch.no_grad():
                    fa = features(model, pgd[e][:n_ad], batch)
                    fooled = (head.predict(fa) != ya[:n_ad]).cpu()
                    plain = torch.where(fooled, _score_batches(det, fa), torch.tensor(-float("inf")).double())
                best = _selective_pgd(model, head, _AtThreshold(det, th[keys[0]]), xa[:n_ad], ya[:n_ad], e,
                                      PGD_STEPS, seed, batch, tick)
                r["adaptive"][f"{e:g}"] = {
                    "pgd": {k: 100.0 * (plain >= t).double().mean().item() for k, t in th.items()},
                    "adaptive": {k: 100.0 * (best >= t).double().mean().item() for k, t in th.items()},
                    "ceiling": 100.0 * torch.isfinite(best).double().mean().item()}
        if protocol:
            prot = ATTACK_PROTOCOLS[protocol["name"]]
            m = min(len(xa), protocol["subset"])
            r["protocol"] = {"name": protocol["name"], "n": m, "description": describe_protocol(prot, m), "eps": {}}
            for e in protocol["eps"]:
                best = adaptive_attack(model, head.logits, _AtThreshold(det, th[keys[0]]), xa[:m], ya[:m], e, prot,
                                       num_classes=head.num_classes, seed=seed, batch=batch,
                                       tick=None if tick is None else (lambda k: tick(k / max(prot.steps, 1))))
                with torch.no_grad():  # the feature-space bound: as far as image-space PGD moved each feature
                    f0 = features(model, xa[:m], batch)
                    adv = PGD(clf, eps=e, alpha=2.5 * e / PGD_STEPS, steps=PGD_STEPS, seed=seed)(xa[:m], ya[:m])
                    radius = (features(model, adv, batch) - f0).norm(dim=1)
                best["feature space"] = feature_space_attack(head.logits, det, f0, ya[:m], radius, seed=seed).cpu()
                r["protocol"]["eps"][f"{e:g}"] = success_rates(best, th)
        out["detectors"][name] = r
    return out


def detection_stages(preset: str) -> int:
    """How many stages :func:`detection_experiment` reports for ``preset`` (for a progress bar)."""
    return 4 * len(DETECTION_MODELS) * len(DETECTION_PRESETS[preset]["seeds"]) + 1


def _measure_run(cfg, run_dir: Path, P: dict, data_dir, heldout: bool, stage) -> dict:
    """One run's measurement, cached beside its checkpoint (the same checkpoint measured the same way)."""
    model, head, cfg, ck = load_trained(run_dir / "checkpoint.pt")
    prot = P.get("protocol")
    prot = None if heldout or prot is None or cfg.seed not in prot["seeds"] else \
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in prot.items() if k != "seeds"}
    settings = {"protocol": _PROTOCOL, "sha256": checkpoint_digest(ck), "test_subset": P["train"].get("test_subset"),
                "fit_points": P["fit_points"], "attack_subset": P["attack_subset"],
                "adaptive_subset": P.get("adaptive_subset"), "eps": list(EPS), "fprs": list(FPRS),
                "pgd_steps": PGD_STEPS, "heldout": heldout, "attack_protocol": prot,
                "ood_sets": list(OOD_SETS)}
    cached = load_cached(run_dir / "detection_eval.json", settings)
    if cached is not None:
        stage(f"measuring {run_dir.name}: reused")
        return cached
    stage(f"measuring {run_dir.name}")
    data = detection_data(cfg, data_dir=data_dir, test_subset=P["train"].get("test_subset"), test_seed=0,
                          fit_points=P["fit_points"], sets=(HELDOUT_SET,) if heldout else None, ood_seed=cfg.seed)
    res = measure_network(model, head, data, eps=() if heldout else EPS, attack_subset=P["attack_subset"],
                          adaptive=not heldout, adaptive_subset=P.get("adaptive_subset"), protocol=prot,
                          seed=cfg.seed)
    res["network"]["label"] = head.label
    save_cached(run_dir / "detection_eval.json", settings, res)
    return res


def detection_experiment(out_dir, *, preset: str = "quick", data_dir=None, progress=print, on_stage=None,
                         fmt: str = "png") -> dict:
    """Train (or reuse) every network of :data:`DETECTION_MODELS` for each seed of ``preset``, on all classes
    and on :data:`HELDOUT_CLASSES`, into ``out_dir/runs``; measure them (:func:`measure_network`, cached in
    each run folder); write ``detection.json``, ``detection.md`` and ``figures/detection_roc.<fmt>`` (the
    first seed's ROC curves).  ``on_stage(done, total, description)`` as each of the
    :func:`detection_stages` stages starts."""
    if preset not in DETECTION_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(DETECTION_PRESETS)}")
    P = DETECTION_PRESETS[preset]
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    t0, done, total = time.perf_counter(), [0], detection_stages(preset)

    def stage(what: str) -> None:
        progress(what)
        if on_stage is not None:
            on_stage(done[0], total, what)
        done[0] += 1

    dataset, seeds = "fashion-mnist", list(P["seeds"])
    prot = P.get("protocol")
    res = {"preset": preset, "dataset": dataset, "seeds": seeds, "train": P["train"], "fit_points": P["fit_points"],
           "attack_subset": P["attack_subset"], "adaptive_subset": P.get("adaptive_subset"), "eps": list(EPS),
           "fpr": FPR, "fprs": list(FPRS), "heldout_classes": HELDOUT_CLASSES,
           "protocol": None if prot is None else {k: list(v) if isinstance(v, tuple) else v for k, v in prot.items()},
           "networks": {}, "runs": {}, "models": 0, "models_reused": 0, "diverged": {}}
    curves = {}
    for seed in seeds:
        for name, spec in DETECTION_MODELS.items():
            for heldout in (False, True):
                key = f"{name}{'-heldout' if heldout else ''}-s{seed}"
                cfg = run_config(dataset, data_dir, 100, seed,
                                 dict(P["train"], **spec, classes=HELDOUT_CLASSES if heldout else None))
                stage(f"training {key} ({budget_words(cfg.__dict__)})")
                res["models"] += 1
                try:
                    res["models_reused"] += train_or_reuse(cfg, out / "runs" / key, progress)
                except TrainingDiverged as err:  # recorded and reported, not measured
                    res["diverged"][key] = str(err).split(";")[0]
                    stage(f"measuring {key}: diverged, skipped")
                    continue
                m = _measure_run(cfg, out / "runs" / key, P, data_dir, heldout, stage)
                net = res["networks"].setdefault(name, {}).setdefault(seed, {})
                net.update({"heldout_clean_error": m["network"]["clean_error"]} if heldout else m["network"])
                for det, r in m["detectors"].items():
                    full = f"{det} ({name})"
                    run = res["runs"].setdefault(full, {}).setdefault(seed, {"sets": {}})
                    if heldout:
                        run["sets"][HELDOUT_SET] = r["sets"][HELDOUT_SET]
                    else:
                        run.update({k: v for k, v in r.items() if k != "sets"})
                        run["sets"].update(r["sets"])
                    if seed == seeds[0]:
                        for s, roc in m["roc"][det].items():
                            curves.setdefault(s, {})[full] = roc
    stage("verdicts, figure, report")
    res["figures"] = [detection_roc_figure(curves, out / "figures" / "detection_roc", fmt=fmt,
                                           title=f"seed {seeds[0]}")]
    res["sets"] = list(dict.fromkeys(s for runs in res["runs"].values() for r in runs.values() for s in r["sets"]))
    res["verdicts"] = detection_verdicts(res)
    res["seconds"] = time.perf_counter() - t0
    (out / "detection.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "detection.md").write_text(detection_markdown(res))
    return res


def _values(res: dict, det: str, get) -> list[float]:
    """``get(run)`` over the seeds of ``det``, leaving out seeds without it (a network that diverged)."""
    out = []
    for r in res["runs"].get(det, {}).values():
        try:
            out.append(get(r))
        except KeyError:
            continue
    return out


def detection_verdicts(res: dict) -> list[dict]:
    """L-GM's likelihood against every other detector: per set, "detects it better" by EER (binomial on the
    clean + abnormal images, with the seed spread); per eps, "resists the adaptive attack better" by the
    adaptive PGD-10 attack's success at the 5% operating point.  Each a
    :func:`~lgm_lab.experiments.stats.compare` result with the claim."""
    out = []
    if LGM_DETECTOR not in res["runs"]:
        return out
    lgm_runs = list(res["runs"][LGM_DETECTOR].values())
    op = operating_point_key(res["fprs"][0])
    for det in res["runs"]:
        if det == LGM_DETECTOR:
            continue
        for s in res["sets"]:
            a = _values(res, LGM_DETECTOR, lambda r, s=s: r["sets"][s]["eer"])
            b = _values(res, det, lambda r, s=s: r["sets"][s]["eer"])
            if not a or not b:
                continue
            m = next(r["sets"][s] for r in lgm_runs if s in r["sets"])
            out.append(dict(compare(a, b, m["n_normal"] + m["n_abnormal"]), other=det, what=s, metric="EER",
                            claim=f"L-GM's likelihood detects {s} better than {det} (lower EER)"))
        for e in res["eps"]:
            a = _values(res, LGM_DETECTOR, lambda r, e=e: r["adaptive"][f"{e:g}"]["adaptive"][op])
            b = _values(res, det, lambda r, e=e: r["adaptive"][f"{e:g}"]["adaptive"][op])
            if not a or not b:
                continue
            n = next(r["n_adaptive"] for r in lgm_runs if "n_adaptive" in r)
            out.append(dict(compare(a, b, n), other=det, what=f"adaptive PGD-10 {e:g}", metric="success",
                            claim=f"L-GM's likelihood resists the adaptive attack at eps {e:g} better than {det}"))
    return out


def preferred_detectors(res: dict, op: str | None = None) -> dict:
    """Per abnormal set, the detectors ranked by the share of those inputs they reject at the operating
    point ``op`` (default the first, "5"): ``{set: {"best": name, "rejected": mean %, "runner_up": name,
    "verdict": compare(...) of the runner-up's non-rejections against the best's}}`` -- what a user who
    deploys a threshold gets, mean over the seeds."""
    op = op or operating_point_key(res["fprs"][0])
    out = {}
    for s in res["sets"]:
        ranked = []
        for det in res["runs"]:
            v = _values(res, det, lambda r, s=s: r["sets"][s]["rejected"][op])
            if v:
                ranked.append((sum(v) / len(v), det, v))
        if len(ranked) < 2:
            continue
        ranked.sort(key=lambda t: -t[0])
        (m0, d0, v0), (m1, d1, v1) = ranked[0], ranked[1]
        n = next(r["sets"][s]["n_abnormal"] for r in res["runs"][d0].values() if s in r["sets"])
        cmp_ = compare([100 - x for x in v0], [100 - x for x in v1], n)
        out[s] = {"best": d0, "rejected": m0, "runner_up": d1, "runner_up_rejected": m1, "verdict": cmp_["verdict"],
                  "z": cmp_["z"], "ranking": [(d, m) for m, d, _ in ranked]}
    return out


def _table(res: dict, title: str, get, fmt: str = "{:.1f}") -> list[str]:
    L = [f"### {title}", "", "| detector | " + " | ".join(res["sets"]) + " |", "|---" * (len(res["sets"]) + 1) + "|"]
    for det in res["runs"]:
        L.append(f"| {det} | " + " | ".join(mean_std_text(_values(res, det, lambda r, s=s: get(r["sets"][s])), fmt)
                                          for s in res["sets"]) + " |")
    return L + [""]


def _diagnostics_section(res: dict) -> list[str]:
    rows = [(seed, v["diagnostics"]) for seed, v in res["networks"].get("lgm-a1", {}).items() if "diagnostics" in v]
    if not rows:
        return []
    sets = [s for s in res["sets"] if s in rows[0][1]["sets"]]
    L = ["## Why the L-GM likelihood is unreliable out of distribution", "",
         "Per seed of the L-GM network: the head's mean learned log-variance against that of Gaussians fitted to "
         "its training features (diagonal), and per set the median squared Mahalanobis distance (under the head's "
         "Gaussians) to the nearest mean, the share of inputs whose nearest mean is the most common one, and the "
         "EER % of the L-GM network's detectors.", "",
         "| seed | head log-var | fitted log-var | set | median d² to nearest mean | one-class share | "
         + " | ".join(f"EER {d}" for d in res["runs"] if d.endswith("(lgm-a1)")) + " |",
         "|---|---|---|---|---|---|" + "---|" * sum(d.endswith("(lgm-a1)") for d in res["runs"])]
    for seed, d in rows:
        for s in ["clean"] + sets:
            st = d["clean"] if s == "clean" else d["sets"][s]
            eers = [res["runs"][det].get(seed, {}).get("sets", {}).get(s, {}).get("eer") for det in res["runs"]
                    if det.endswith("(lgm-a1)")]
            L.append(f"| {seed} | {d['head_log_var_mean']:.2f} | {d['fitted_log_var_mean']:.2f} | {s} | "
                     f"{st['d2_nearest']:.3g} | {st['nearest_class_share']:.2f} | "
                     + " | ".join("-" if e is None else f"{e:.1f}" for e in eers) + " |")
    return L + [""]


def detection_markdown(res: dict) -> str:
    t, ms = res["train"], mean_std_text
    ops = [operating_point_key(p) for p in res["fprs"]]
    attacks = list(dict.fromkeys(k for runs in res["networks"].values() for v in runs.values()
                                 for k in v.get("attack_error", {})))
    seeds = ", ".join(map(str, res["seeds"]))
    L = [f"# Out-of-distribution and adversarial detection ({res['preset']} budget, {res['dataset']})", "",
         f"LeNet++ 100-D (linear feature layer), {t.get('subset') or 'all'} training images, "
         f"{budget_words(t)}, the report recipe; seeds {seeds} (mean ± std). Held-out-classes networks train on "
         "classes "
         f"{res['heldout_classes']} only; the test images of the other classes are their unknown inputs. Each "
         "detector's thresholds are calibrated at "
         + " and ".join(f"{o}%" for o in ops) + " false rejections (the operating points) on one half of the "
         f"{t.get('test_subset') or 'full'} test images; everything is measured on the other half. Abnormal "
         "sets: scikit-learn's digits (8x8 resized to 28x28, not inverted), uniform noise, Gaussian noise "
         "N(0.5, 1) clipped to [0, 1], inverted test images, natural-image patches (crops of scikit-learn's two "
         "sample photographs, grey, 28x28), the held-out classes, FGSM and PGD-10 (step 2.5 eps/10, random start) "
         f"on {res['attack_subset']} test images. Detectors: the field's post-hoc baselines (pytorch-ood 0.4.0's "
         f"KNN, k = {B.KNN_K} on L2-normalised features, ViM, d = half the feature dimension, Energy, MaxLogit "
         "and max-softmax; Mahalanobis, tied covariance, on raw and L2-normalised "
         f"features) fitted on {res['fit_points']} training images' features of each network, the center distance "
         "on the center-loss network, and on the L-GM network its own likelihood, its mixture score and Gaussians "
         "re-fitted post hoc (on the L-GM network MaxLogit and Energy are left out: they rank as its "
         "likelihood and mixture score). Command: `lgm reproduce --detection --preset "
         f"{res['preset']}`. This invocation took {res['seconds'] / 60:.1f} min ({res['models_reused']} of "
         f"{res['models']} networks reused).", "",
         "## Networks", "", "| network | clean error % | classes 0-4 network error % | "
         + " | ".join(f"{k} error %" for k in attacks) + " |", "|---|---|---|" + "---|" * len(attacks)]
    for name, runs in res["networks"].items():
        r = list(runs.values())
        L.append(f"| {name} | {ms([v['clean_error'] for v in r if 'clean_error' in v])} | "
                 f"{ms([v['heldout_clean_error'] for v in r if 'heldout_clean_error' in v])} | "
                 + " | ".join(ms([v["attack_error"][k] for v in r if k in v.get("attack_error", {})], "{:.1f}")
                              for k in attacks) + " |")
    if res.get("diverged"):
        L += ["", "Diverged (non-finite loss; not measured, left out of the means): "
              + "; ".join(f"{k}: {v}" for k, v in res["diverged"].items()) + "."]
    pref = preferred_detectors(res)
    L += ["", "## Which detector rejects what, at the 5% operating point", "",
          f"Per abnormal set, the detector that rejects the most of it at the threshold calibrated for {ops[0]}% "
          "false rejections (mean over seeds), the runner-up, and whether the difference is beyond noise "
          "(z-test of the non-rejection rates, binomial on the abnormal images with the seed spread).", "",
          "| set | best detector | rejected % | runner-up | rejected % | best vs runner-up |", "|---|---|---|---|---|---|"]
    for s, p in pref.items():
        L.append(f"| {s} | {p['best']} | {p['rejected']:.1f} | {p['runner_up']} | {p['runner_up_rejected']:.1f} | "
                 f"{'better' if p['verdict'] == 'holds' else 'within noise' if p['verdict'] == 'within noise' else p['verdict']}"
                 f" ({p['z']:.1f}) |")
    L += ["", "## Detection", ""]
    for o in ops:
        L += _table(res, f"Rejected % at the threshold calibrated for {o}% false rejections",
                    lambda m, o=o: m["rejected"][o])
    L += _table(res, "AUROC % (higher is better)", lambda m: m["auroc"])
    L += _table(res, "AUPR-in % (normal inputs positive; higher is better)", lambda m: m["aupr_in"])
    L += _table(res, "AUPR-out % (abnormal inputs positive; higher is better)", lambda m: m["aupr_out"])
    L += _table(res, "FPR at 95% TPR %, normal inputs positive (Lee et al. 2018): abnormal inputs accepted while "
                "95% of clean ones are; lower is better", lambda m: m["fpr95_in"])
    L += _table(res, "FPR at 95% TPR %, abnormal inputs positive (OpenOOD v1.5, pytorch-ood): clean inputs "
                "rejected while 95% of abnormal ones are; lower is better", lambda m: m["fpr95_out"])
    L += _table(res, "EER % (lower is better)", lambda m: m["eer"])
    L += ["### Realised false-rejection rate on the evaluation half", "",
          "| detector | " + " | ".join(f"calibrated for {o}%" for o in ops) + " |", "|---|" + "---|" * len(ops)]
    L += [f"| {det} | " + " | ".join(ms(_values(res, det, lambda r, o=o: r["false_rejection"][o])) for o in ops)
          + " |" for det in res["runs"]]
    L += ["", f"![ROC curves](figures/detection_roc.{Path(res['figures'][0]).suffix.lstrip('.')})", ""]
    L += _diagnostics_section(res)
    L += ["## Adaptive attack (an attacker who knows the detector)", "",
          "Success = misclassified *and* accepted by the detector at its calibrated threshold, % of the attacked "
          f"images ({res.get('adaptive_subset') or res['attack_subset']} per seed). Plain PGD-10 ignores the "
          "detector; the adaptive PGD-10 (lgm_ext.attacks.AdaptivePGD, selective: the classification loss until "
          "misclassified, then the detector's score; any iterate that succeeds counts) has the same budget. "
          "Ceiling = the images the adaptive attack misclassifies at all: what no detector can lower by accepting "
          "less. PGD-10 is a lower bound on the attacker; the full protocol below is stronger.", "",
          "| detector | " + " | ".join(f"PGD-10 {e:g} @{o}% | adaptive {e:g} @{o}%" for e in res["eps"] for o in ops)
          + " | " + " | ".join(f"ceiling {e:g}" for e in res["eps"]) + " |",
          "|---|" + "---|---|" * len(res["eps"]) * len(ops) + "---|" * len(res["eps"])]
    for det in res["runs"]:
        cells = [ms(_values(res, det, lambda r, e=e, k=k, o=o: r["adaptive"][f"{e:g}"][k][o]), "{:.1f}")
                 for e in res["eps"] for o in ops for k in ("pgd", "adaptive")]
        cells += [ms(_values(res, det, lambda r, e=e: r["adaptive"][f"{e:g}"]["ceiling"]), "{:.1f}")
                  for e in res["eps"]]
        L.append(f"| {det} | " + " | ".join(cells) + " |")
    L += ["", *_protocol_section(res, ops)]
    cols = list(dict.fromkeys(v["what"] for v in res["verdicts"]))
    L += ["## Verdicts: L-GM's likelihood against each detector", "",
          "Per column the claim \"L-GM's likelihood detects this set better\" (lower EER) or, for the adaptive "
          f"columns, \"resists the adaptive PGD-10 attack better\" (lower success at the {ops[0]}% operating "
          "point), tested against the detector of the row by the z-test of the difference (binomial error on the "
          "images measured combined with the seed spread): **holds** for z >= 2, **fails** for z <= -2, else "
          "**within noise**; z in brackets.", "",
          "| L-GM likelihood vs | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    cell = {(v["other"], v["what"]): f"**{v['verdict']}** ({v['z']:.1f})" for v in res["verdicts"]}
    for det in dict.fromkeys(v["other"] for v in res["verdicts"]):
        L.append(f"| {det} | " + " | ".join(cell.get((det, c), "-") for c in cols) + " |")
    return "\n".join(L) + "\n"


def _protocol_section(res: dict, ops: list[str]) -> list[str]:
    rows = [(det, seed, r["protocol"]) for det, runs in res["runs"].items() for seed, r in runs.items()
            if "protocol" in r]
    if not rows:
        return []
    first = rows[0][2]
    eps = list(first["eps"])
    variants = list(next(iter(first["eps"].values())))
    seeds = sorted({seed for _d, seed, _p in rows})
    L = ["## Adaptive attack, full protocol (reduced budget)" if first["name"] != "standard"
         else "## Adaptive attack, full protocol", "",
         f"Protocol \"{first['name']}\" (lgm_lab.adaptive_eval): {first['description']}, on seed(s) "
         f"{', '.join(map(str, seeds))}. Every variant is the selective adaptive attack; \"all\" is the per-image "
         "best of the image-space variants; \"feature space\" moves the features freely within an L2 ball as "
         "large as image-space PGD-10 moved each one (an upper bound, not an attack on images). Success % at the "
         + " and ".join(f"{o}%" for o in ops) + " operating points; ceiling = misclassified by any iterate. "
         "With this few images a rate's binomial standard error is up to "
         f"{50 / max(first['n'], 1) ** 0.5:.0f} points.", ""]
    for e in eps:
        L += [f"### eps {e}", "", "| detector | " + " | ".join(f"{v} @{o}%" for v in variants for o in ops)
              + " | ceiling (all) |", "|---|" + "---|" * (len(variants) * len(ops) + 1)]
        for det in dict.fromkeys(d for d, _s, _p in rows):
            per = [p["eps"][e] for d, _s, p in rows if d == det and e in p["eps"]]
            cells = [mean_std_text([q[v][o] for q in per], "{:.0f}") for v in variants for o in ops]
            L.append(f"| {det} | " + " | ".join(cells) + f" | {mean_std_text([q['all']['ceiling'] for q in per], '{:.0f}')} |")
        L.append("")
    return L
