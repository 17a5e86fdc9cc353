"""The detection protocol's measurement of one trained network (issues 25 and 35; docs/SPEC.md section 8):
the detectors a network gets (:func:`detector_names`, :func:`build_detectors`: the field's post-hoc baselines of
:mod:`lgm_lab.baselines` on every network, the center distance, an L-GM head's own scores), the images the
protocol needs (:func:`detection_data`), and :func:`measure_network`: thresholds at every operating point,
detection metrics per abnormal set, attacks, the adaptive PGD-10 attack and an L-GM network's diagnostics
(:func:`lgm_diagnostics`); :func:`measure_protocol`, the full adaptive protocol of :mod:`lgm_lab.adaptive_eval`;
and :func:`transfer_check`, the transfer attack between two networks.  Used by the
detection experiment (:mod:`lgm_lab.experiments.detection`) and ``lgm ood``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Subset

from lgm_ext import Classifier, LikelihoodDetector, detectors
from lgm_ext.attacks import FGSM, PGD
from lgm_ext.detector import calibrated_threshold
from lgm_ext.detectors import OnFeatures

from .adaptive_eval import (
    ATTACK_PROTOCOLS,
    adaptive_attack,
    best_scores,
    describe_protocol,
    feature_space_attack,
    success_rates,
    transfer_images,
    transfer_success,
)
from .config import dataset_info
from .data import load_dataset
from .metrics import attack_in_batches, detection_metrics, operating_point_key, rejection_rate
from .ood_data import DIGITS_SIZE, OOD_SETS, ood_images, other_classes, restrict_classes, split_clean
from .tensors import batches, features, stack_dataset

__all__ = ["HELDOUT_SET", "EPS", "PGD_STEPS", "FPRS", "FPR", "COMBINATION", "report_detectors", "detector_names",
           "build_detectors", "detection_data", "lgm_diagnostics", "measure_network", "measure_protocol",
           "calibrated_detectors", "transfer_check"]

HELDOUT_SET = "held-out classes"
EPS = (0.1, 0.3)
PGD_STEPS = 10  # PGD-10, step 2.5 eps / steps (Madry et al.)
FPRS = (0.05, 0.01)  # the calibrated false-rejection rates: the operating points a user deploys
FPR = FPRS[0]

#: The combination measured on every network (issue 41): Mahalanobis on L2-normalised features, the best on far
#: out-of-distribution inputs, with Mahalanobis on raw features, among the best on large perturbations.
COMBINATION = "mahalanobis-l2+mahalanobis"

# The protocol's detectors, by registry name (lgm_ext.detectors.DETECTORS), in report order: on an L-GM network
# its own scores first -- its likelihood, its mixture, the paper's identity-covariance distance (section 4.3), the
# distance without the log-det and the max posterior (issue 45) -- and no MaxLogit or Energy (they rank as its
# likelihood and mixture score do).
_LGM = ("lgm-likelihood", "lgm-mixture", "lgm-paper", "lgm-distance", "lgm-max-posterior", "gaussian-diag",
        "mahalanobis", "mahalanobis-l2", "knn", "max-softmax")
_OTHER = ("mahalanobis", "mahalanobis-l2", "knn", "energy", "max-logit", "max-softmax")


def report_detectors(head, feat_dim: int | None = None) -> dict[str, str]:
    """``{report name: registry name}`` of the protocol's detectors for a network with ``head`` (features of
    ``feat_dim``, default the head's): the field's post-hoc baselines on every network (Mahalanobis on raw and on
    L2-normalised features, KNN, Energy, MaxLogit, max-softmax), ViM where the head has a linear classifier, the
    center distance where it has learned centers, and on an L-GM network its own likelihood, its mixture score and
    Gaussians re-fitted post hoc (diagonal covariances) -- there MaxLogit and Energy are left out: they rank as the
    likelihood and the mixture score do; then :data:`COMBINATION`.  Every one is built from the registry of
    :mod:`lgm_ext.detectors`; KNN's k is :data:`lgm_ext.detectors.KNN_K` (or the number of training features when
    fewer), ViM's d :func:`lgm_ext.detectors.vim_dim` of the features."""
    names = list(_LGM if head.kind == "lgm" else _OTHER)
    fc = getattr(head, "fc", None)
    d = feat_dim or getattr(fc, "in_features", 0)
    if detectors.applies("vim", head) and d >= 2:
        names.append("vim")
    if head.kind != "lgm" and head.centers() is not None:
        names.append("center-distance")
    names.append(COMBINATION)
    return {detectors.label(n): n for n in names}


def detector_names(head, feat_dim: int | None = None) -> tuple[str, ...]:
    """The report names of :func:`report_detectors`, in order."""
    return tuple(report_detectors(head, feat_dim))


def build_detectors(head, fit_features: Tensor | None, fit_labels: Tensor | None) -> dict:
    """The detectors of :func:`report_detectors` by report name, built from the registry and fitted to
    (``fit_features``, ``fit_labels``), the training images' features; each seen as a score of features
    (:class:`lgm_ext.detectors.OnFeatures`: the head's logits computed from them where a detector reads logits)."""
    dets = {}
    logits = None
    for label, name in report_detectors(head, None if fit_features is None else fit_features.shape[1]).items():
        if detectors.needs_fit(name) and fit_features is None:
            raise ValueError(f"the {label} detector is fitted on training features: give fit_features")
        if logits is None and fit_features is not None and "logits" in detectors.reads(name):
            with torch.no_grad():
                logits = head.logits(fit_features)
        det = detectors.create(name, head, features=fit_features, labels=fit_labels,
                               logits=logits if "logits" in detectors.reads(name) else None)
        dets[label] = OnFeatures(det, head.logits)
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


def _thresholds(det, f_cal: Tensor, fprs) -> dict:
    """``{operating point key: threshold}``: ``det``'s threshold at each false-rejection rate of ``fprs`` on
    the calibration features; ``det`` is calibrated at the first (a combination standardises its members on
    those features there)."""
    det.calibrate(f_cal, fprs[0])
    s_cal = _score_batches(det, f_cal)
    return {operating_point_key(p): calibrated_threshold(s_cal, p) for p in fprs}


def calibrated_detectors(model, head, data: dict, fprs=FPRS, batch: int = 256) -> dict:
    """Every detector of :func:`build_detectors` on one network, fitted on ``data["fit"]`` (a
    :func:`detection_data` dict) and calibrated on ``data["calibration"]`` as :func:`measure_network` does:
    ``{name: (detector, {operating point key: threshold})}``."""
    with torch.no_grad():
        fit = data.get("fit")
        f_fit = None if fit is None else features(model, fit[0], batch)
        dets = build_detectors(head, f_fit, None if fit is None else fit[1])
        f_cal = features(model, data["calibration"], batch)
    return {name: (det, _thresholds(det, f_cal, fprs)) for name, det in dets.items()}


def transfer_check(source: tuple, target: tuple, x: Tensor, y: Tensor, *, eps, steps: int, seed: int = 0,
                   batch: int = 256) -> dict:
    """The transfer attack, a check of the white-box evaluation: for every detector both networks have, images
    crafted against the *source* network and that detector at its first operating point
    (:func:`lgm_lab.adaptive_eval.transfer_images`, ``steps`` steps at each of ``eps``) and evaluated on the
    *target* network and its own detector of that name at each of its operating points.  ``source`` and
    ``target`` are ``(model, head, calibrated_detectors(...))``.  Returns ``{detector: {"<eps>": {key: %,
    "ceiling": %, "n": n}}}`` (:func:`lgm_lab.adaptive_eval.transfer_success`).  A transfer attack that beats
    the white-box attack on the target would mean the white-box attack is broken (Carlini et al. 2019)."""
    (sm, sh, sdets), (tm, th_, tdets) = source, target
    out = {}
    for name in [n for n in tdets if n in sdets]:
        (sdet, sth), (tdet, tth) = sdets[name], tdets[name]
        first = next(iter(sth))
        out[name] = {}
        for e in eps:
            adv = transfer_images(sm, sh.logits, _AtThreshold(sdet, sth[first]), x, y, e, steps=steps, seed=seed,
                                  batch=batch)
            out[name][f"{e:g}"] = transfer_success(tm, th_.logits, tdet, adv, y, tth, batch)
    return out


def lgm_diagnostics(model, head, data: dict, f_fit: Tensor, y_fit: Tensor, feats: dict, batch: int = 256) -> dict:
    """Why an L-GM network's likelihood does or does not reject abnormal inputs: the head's learned
    log-variances against those of Gaussians fitted to its training features (diagonal), the features' norms,
    and, per abnormal set, the squared Mahalanobis distance (under the head's Gaussians) of each input to its
    nearest mean and the log-determinant term of that class, against the clean inputs' (medians)."""
    x, _y = data["clean"]
    with torch.no_grad():
        f = features(model, x, batch).double()
        lv = head.clamped_log_var() if hasattr(head, "clamped_log_var") else None  # None: identity covariance
        lv = None if lv is None else lv.detach().double()
        refit = LikelihoodDetector.fit(f_fit, y_fit, "diag", num_classes=head.num_classes)
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
                    adaptive: bool = True, adaptive_subset: int | None = None, seed: int = 0, batch: int = 256,
                    tick=None, extra=None, fpr: float | None = None) -> dict:
    """Every detector of :func:`build_detectors` on one trained network, over ``data`` (a
    :func:`detection_data` dict).

    Each detector's thresholds are calibrated at each false-rejection rate of ``fprs`` (the operating points,
    keyed "5" and "1" for 5% and 1%) on ``data["calibration"]``.  Per abnormal set and per attack (FGSM and
    PGD-10 at each eps, on the first ``attack_subset`` clean images): the
    :func:`~lgm_lab.experiments.measure.detection_metrics` against the clean images (AUROC, AUPR-in/out, FPR
    at 95% TPR both ways, EER, rejected at each operating point); the realised false-rejection rates.  With
    ``adaptive``, on the first ``adaptive_subset`` of those images: the success (% misclassified and
    accepted) at each operating point of plain PGD-10 and of the selective adaptive PGD-10
    (:class:`lgm_ext.attacks.AdaptivePGD`, same budget) and the no-detector ceiling (the full adaptive
    protocol is :func:`measure_protocol`).  An L-GM network also gets :func:`lgm_diagnostics`.

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
        for name, det in (extra or {}).items():
            dets[name] = det if isinstance(det, OnFeatures) else OnFeatures(det, head.logits)
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
        th = _thresholds(det, f_cal, fprs)  # calibrated at the primary operating point, for a caller that keeps it
        s_clean = _score_batches(det, f_clean)
        r = {"detector": det.name,
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
                best = best_scores(model, head.logits, _AtThreshold(det, th[keys[0]]), xa[:n_ad], ya[:n_ad], e,
                                   2.5 * e / PGD_STEPS, PGD_STEPS, seed, batch, tick=tick)
                r["adaptive"][f"{e:g}"] = {
                    "pgd": {k: 100.0 * (plain >= t).double().mean().item() for k, t in th.items()},
                    "adaptive": {k: 100.0 * (best >= t).double().mean().item() for k, t in th.items()},
                    "ceiling": 100.0 * torch.isfinite(best).double().mean().item()}
        out["detectors"][name] = r
    return out


def measure_protocol(model, head, data: dict, protocol: dict, *, attack_subset: int | None = None, fprs=FPRS,
                     seed: int = 0, batch: int = 256) -> dict:
    """The full adaptive protocol (:mod:`lgm_lab.adaptive_eval`; ``protocol`` = ``{"name", "eps", "subset"}``)
    against every detector of :func:`calibrated_detectors` on one network (``data`` a :func:`detection_data`
    dict): on the first ``subset`` of the first ``attack_subset`` clean images, at each eps, every variant of
    the protocol at the first operating point's threshold, and the feature-space bound (each feature moved
    within the distance image-space PGD-10 moved it).  Returns ``{detector: {"name", "n", "description",
    "eps": {"<eps>": success % per variant and operating point, with the ceiling}}}``
    (:func:`lgm_lab.adaptive_eval.success_rates`); measured apart from :func:`measure_network`, so that
    another protocol re-measures only this."""
    prot = ATTACK_PROTOCOLS[protocol["name"]]
    dets = calibrated_detectors(model, head, data, fprs, batch)
    x, y = data["clean"]
    xa, ya = x[:attack_subset], y[:attack_subset]
    m = min(len(xa), protocol["subset"])
    clf = Classifier(model, head).eval()
    radii = {}  # the feature-space bound, per eps: as far as image-space PGD-10 moved each feature
    with torch.no_grad():
        f0 = features(model, xa[:m], batch)
        for e in protocol["eps"]:
            adv = PGD(clf, eps=e, alpha=2.5 * e / PGD_STEPS, steps=PGD_STEPS, seed=seed)(xa[:m], ya[:m])
            radii[e] = (features(model, adv, batch) - f0).norm(dim=1)
    out = {}
    for name, (det, th) in dets.items():
        first = next(iter(th))
        r = {"name": protocol["name"], "n": m, "description": describe_protocol(prot, m), "eps": {}}
        for e in protocol["eps"]:
            best = adaptive_attack(model, head.logits, _AtThreshold(det, th[first]), xa[:m], ya[:m], e, prot,
                                   num_classes=head.num_classes, seed=seed, batch=batch)
            best["feature space"] = feature_space_attack(head.logits, det, f0, ya[:m], radii[e], seed=seed).cpu()
            r["eps"][f"{e:g}"] = success_rates(best, th)
        out[name] = r
    return out
