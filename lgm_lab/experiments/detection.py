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

from ..checkpoints import checkpoint_digest, load_trained
from ..config import dataset_info
from ..data import load_dataset
from ..figures import detection_roc_figure
from ..heads import center_log_score
from ..ood_data import DIGITS_SIZE, OOD_SETS, ood_images, other_classes, restrict_classes, split_clean
from ..tensors import batches, features, stack_dataset
from ..train import TrainingDiverged
from .measure import attack_in_batches, calibrated_threshold, detection_metrics, rejection_rate
from .runs import budget_words, load_cached, run_config, save_cached, train_or_reuse
from .stats import compare, mean_std_text

__all__ = ["DETECTION_MODELS", "DETECTION_PRESETS", "HELDOUT_CLASSES", "EPS", "PGD_STEPS", "FPR", "LGM_DETECTOR",
           "ScoreDetector", "max_softmax", "center_distance", "detector_names",
           "build_detectors", "HELDOUT_SET",
           "detection_data", "measure_network", "detection_experiment", "detection_stages", "detection_verdicts",
           "detection_markdown"]

DETECTION_MODELS = {"softmax": dict(head="softmax"), "center": dict(head="center"),
                    "lgm-a1": dict(head="lgm", alpha=1.0)}
HELDOUT_CLASSES = "0-4"  # the held-out-classes networks train on these; the other classes are unknown
HELDOUT_SET = "held-out classes"
EPS = (0.1, 0.3)
PGD_STEPS = 10  # PGD-10, step 2.5 eps / steps (Madry et al.)
FPR = 0.05  # the calibrated false-rejection rate
LGM_DETECTOR = "L-GM likelihood (lgm-a1)"
# Budgets in SGD steps, from the budget curve (docs/budget, `lgm budget`): at 64 steps no head has trained; at
# 256 steps of batch 128 every head has (test errors 15-18%, 3 seeds) -- "quick" is that point (its full-class
# networks are the curve's and the demo's models); at 1,024 steps the three heads' errors are within noise of
# each other -- "standard".  Nothing here is chosen to favour a detector.  "train" overrides the report
# recipe; half of the test subset calibrates, half is measured; the held-out-classes networks train the same
# number of steps on their five classes.
DETECTION_PRESETS = {
    "quick": dict(train=dict(steps=256, warmup_steps=64, test_subset=2000), seeds=(0, 1, 2), fit_points=10000,
                  attack_subset=500),
    "standard": dict(train=dict(steps=1024, warmup_steps=256, test_subset=2000), seeds=(0, 1, 2),
                     fit_points=20000, attack_subset=1000),
}
_PROTOCOL = 2  # bump when the measurement changes: cached measurements of another protocol are redone


class ScoreDetector:
    """A detector from a differentiable score of features (higher = more normal), thresholded as
    :meth:`lgm_ext.LikelihoodDetector.calibrate` does: what :class:`~lgm_ext.attacks.AdaptivePGD` attacks."""

    def __init__(self, score_fn, name: str) -> None:
        self.score_fn, self.name = score_fn, name
        self.threshold: float | None = None
        self.fpr: float | None = None

    def score(self, features: Tensor) -> Tensor:
        return self.score_fn(features)

    def calibrate(self, clean_features: Tensor, fpr: float = FPR) -> ScoreDetector:
        with torch.no_grad():
            self.threshold = calibrated_threshold(self.score(clean_features), fpr)
        self.fpr = fpr
        return self

    def reject(self, features: Tensor) -> Tensor:
        if self.threshold is None:
            raise ValueError("threshold is not set: call calibrate(clean_features, fpr) first")
        with torch.no_grad():
            return ~(self.score(features) >= self.threshold)


def max_softmax(head) -> ScoreDetector:
    """Hendrycks and Gimpel's baseline: log of the largest softmax probability of the head's logits."""
    return ScoreDetector(lambda f: head.logits(f).log_softmax(1).max(1).values, "max-softmax")


def center_distance(head) -> ScoreDetector:
    """-|f - c_ŷ|²/2 against the head's centers (center loss: its learned centers), ŷ the head's prediction."""
    return ScoreDetector(lambda f: center_log_score(f, head.centers().detach(), head.predict(f)), "center distance")


def detector_names(head) -> tuple[str, ...]:
    """The protocol's detectors for a network with ``head``: an L-GM head's own likelihood; for any other
    head the tied Mahalanobis detector and the max-softmax probability, plus the center distance when the
    head has centers."""
    if head.kind == "lgm":
        return ("L-GM likelihood",)
    return ("Mahalanobis", "max-softmax") + (("center distance",) if head.centers() is not None else ())


def build_detectors(head, fit_features: Tensor | None, fit_labels: Tensor | None) -> dict:
    """The detectors of :func:`detector_names` by name, Mahalanobis fitted to (``fit_features``,
    ``fit_labels``) (unused for an L-GM head)."""
    dets = {}
    for name in detector_names(head):
        if name == "L-GM likelihood":
            dets[name] = LikelihoodDetector.from_head(head)
        elif name == "Mahalanobis":
            dets[name] = LikelihoodDetector.fit(fit_features, fit_labels, "tied", num_classes=head.num_classes)
        else:
            dets[name] = max_softmax(head) if name == "max-softmax" else center_distance(head)
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


def _success(model, head, det, x: Tensor, y: Tensor, batch: int) -> Tensor:
    """(N,) bool: misclassified by the head and accepted by the detector."""
    with torch.no_grad():
        f = features(model, x, batch)
        return (head.predict(f) != y) & (det.score(f) >= det.threshold)


def _adaptive(model, head, det, x: Tensor, y: Tensor, eps: float, seed: int, batch: int, tick) -> Tensor:
    atk = AdaptivePGD(model, det, eps=eps, alpha=2.5 * eps / PGD_STEPS, steps=PGD_STEPS, classifier=head.logits,
                      seed=seed)
    ok = []
    for s in batches(len(x), batch):
        ok.append(atk(x[s], y[s], return_success=True)[1])
        if tick is not None:
            tick(s.stop - s.start)
    return torch.cat(ok) if ok else torch.zeros(0, dtype=torch.bool)


def measure_network(model, head, data: dict, *, eps=EPS, attack_subset: int | None = None, fpr: float = FPR,
                    adaptive: bool = True, seed: int = 0, batch: int = 256, tick=None, extra=None) -> dict:
    """Every detector of :func:`build_detectors` on one trained network, over ``data`` (a
    :func:`detection_data` dict): each calibrated at ``fpr`` on ``data["calibration"]``; per abnormal set
    and per attack (FGSM and PGD-10 at each eps, on the first ``attack_subset`` clean images) the
    :func:`~lgm_lab.experiments.measure.detection_metrics` against the clean images; the realised
    false-rejection rate on them; with ``adaptive``, the success (% misclassified and accepted) of plain PGD
    and of :class:`lgm_ext.attacks.AdaptivePGD` (selective, same budget) with the detector on.  Returns
    ``{"network": {...}, "detectors": {name: {...}}, "roc": {name: {set: roc}}}``; ``tick(n)`` as n images
    are attacked.  ``extra`` (name -> a detector of this network, e.g. one saved by ``lgm detect fit``) are
    measured beside them, each re-calibrated at ``fpr`` on the same calibration images as every other."""
    x, y = data["clean"]
    xa, ya = x[:attack_subset], y[:attack_subset]
    with torch.no_grad():
        f_clean = features(model, x, batch)
        f_cal = features(model, data["calibration"], batch)
        feats = {name: features(model, imgs, batch) for name, imgs in data["abnormal"].items()}
        fit = data["fit"] if "Mahalanobis" in detector_names(head) else None
        dets = build_detectors(head, None if fit is None else features(model, fit[0], batch),
                               None if fit is None else fit[1])
        dets.update(extra or {})
        net = {"clean_error": 100.0 * (head.predict(f_clean) != y).double().mean().item(), "n_clean": len(x),
               "n_attack": len(xa), "attack_error": {}}
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
    out = {"network": net, "detectors": {}, "roc": {}}
    for name, det in dets.items():
        det.calibrate(f_cal, fpr)
        with torch.no_grad():
            s_clean = det.score(f_clean)
            r = {"threshold": det.threshold, "false_rejection": 100.0 * rejection_rate(s_clean, det.threshold),
                 "n_calibration": len(f_cal), "n_attack": len(xa), "sets": {}, "adaptive": {}}
            for key, fs in feats.items():
                r["sets"][key], roc = detection_metrics(s_clean, det.score(fs), det.threshold)
                out["roc"].setdefault(name, {})[key] = roc
        if adaptive:
            for e in eps:
                plain = _success(model, head, det, pgd[e], ya, batch)
                ada = _adaptive(model, head, det, xa, ya, e, seed, batch, tick)
                r["adaptive"][f"{e:g}"] = {"pgd": 100.0 * plain.double().mean().item(),
                                           "adaptive": 100.0 * ada.double().mean().item()}
        out["detectors"][name] = r
    return out


def detection_stages(preset: str) -> int:
    """How many stages :func:`detection_experiment` reports for ``preset`` (for a progress bar)."""
    return 4 * len(DETECTION_MODELS) * len(DETECTION_PRESETS[preset]["seeds"]) + 1


def _measure_run(cfg, run_dir: Path, P: dict, data_dir, heldout: bool, stage) -> dict:
    """One run's measurement, cached beside its checkpoint (the same checkpoint measured the same way)."""
    model, head, cfg, ck = load_trained(run_dir / "checkpoint.pt")
    settings = {"protocol": _PROTOCOL, "sha256": checkpoint_digest(ck), "test_subset": P["train"].get("test_subset"),
                "fit_points": P["fit_points"], "attack_subset": P["attack_subset"], "eps": list(EPS), "fpr": FPR,
                "pgd_steps": PGD_STEPS, "heldout": heldout}
    cached = load_cached(run_dir / "detection_eval.json", settings)
    if cached is not None:
        stage(f"measuring {run_dir.name}: reused")
        return cached
    stage(f"measuring {run_dir.name}")
    data = detection_data(cfg, data_dir=data_dir, test_subset=P["train"].get("test_subset"), test_seed=0,
                          fit_points=P["fit_points"], sets=(HELDOUT_SET,) if heldout else None, ood_seed=cfg.seed)
    res = measure_network(model, head, data, eps=() if heldout else EPS, attack_subset=P["attack_subset"],
                          adaptive=not heldout, seed=cfg.seed)
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
    res = {"preset": preset, "dataset": dataset, "seeds": seeds, "train": P["train"], "fit_points": P["fit_points"],
           "attack_subset": P["attack_subset"], "eps": list(EPS), "fpr": FPR, "heldout_classes": HELDOUT_CLASSES,
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
    adaptive attack's success.  Each a :func:`~lgm_lab.experiments.stats.compare` result with the claim."""
    out = []
    if LGM_DETECTOR not in res["runs"]:
        return out
    lgm_runs = list(res["runs"][LGM_DETECTOR].values())
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
            a = _values(res, LGM_DETECTOR, lambda r, e=e: r["adaptive"][f"{e:g}"]["adaptive"])
            b = _values(res, det, lambda r, e=e: r["adaptive"][f"{e:g}"]["adaptive"])
            if not a or not b:
                continue
            n = next(r["n_attack"] for r in lgm_runs if "n_attack" in r)
            out.append(dict(compare(a, b, n), other=det, what=f"adaptive PGD-10 {e:g}", metric="success",
                            claim=f"L-GM's likelihood resists the adaptive attack at eps {e:g} better than {det}"))
    return out


def _table(res: dict, title: str, get, fmt: str = "{:.1f}") -> list[str]:
    L = [f"### {title}", "", "| detector | " + " | ".join(res["sets"]) + " |", "|---" * (len(res["sets"]) + 1) + "|"]
    for det in res["runs"]:
        L.append(f"| {det} | " + " | ".join(mean_std_text(_values(res, det, lambda r, s=s: get(r["sets"][s])), fmt)
                                          for s in res["sets"]) + " |")
    return L + [""]


def detection_markdown(res: dict) -> str:
    t, ms = res["train"], mean_std_text
    attacks = list(dict.fromkeys(k for runs in res["networks"].values() for v in runs.values()
                                 for k in v.get("attack_error", {})))
    seeds = ", ".join(map(str, res["seeds"]))
    L = [f"# Out-of-distribution and adversarial detection ({res['preset']} budget, {res['dataset']})", "",
         f"LeNet++ 100-D (linear feature layer), {t.get('subset') or 'all'} training images, "
         f"{budget_words(t)}, the report recipe; seeds {seeds} (mean ± std). Held-out-classes networks train on "
         "classes "
         f"{res['heldout_classes']} only; the test images of the other classes are their unknown inputs. Each "
         f"detector's threshold is calibrated at a {100 * res['fpr']:g}% false-rejection rate on one half of the "
         f"{t.get('test_subset') or 'full'} test images; everything is measured on the other half. Abnormal "
         "sets: scikit-learn's digits (8x8 resized to 28x28, not inverted), uniform noise, Gaussian noise "
         "N(0.5, 1) clipped to [0, 1], inverted test images, the held-out classes, FGSM and PGD-10 (step 2.5 "
         f"eps/10, random start) on {res['attack_subset']} test images. Mahalanobis: tied covariance fitted on "
         f"{res['fit_points']} training images' features. Command: `lgm reproduce --detection --preset "
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
    L += ["", "## Detection", ""]
    L += _table(res, "AUROC % (higher is better)", lambda m: m["auroc"])
    L += _table(res, "FPR at 95% TPR % (abnormal inputs accepted while 95% of clean ones are; lower is better)",
                lambda m: m["fpr95"])
    L += _table(res, "EER % (lower is better)", lambda m: m["eer"])
    L += _table(res, f"Rejected % at the threshold calibrated for {100 * res['fpr']:g}% false rejections",
                lambda m: m["rejected"])
    L += ["### Realised false-rejection rate on the evaluation half (calibrated for "
          f"{100 * res['fpr']:g}%)", "", "| detector | clean inputs rejected % |", "|---|---|"]
    L += [f"| {det} | {ms(_values(res, det, lambda r: r['false_rejection']))} |" for det in res["runs"]]
    L += ["", f"![ROC curves](figures/detection_roc.{Path(res['figures'][0]).suffix.lstrip('.')})", "",
          "## Adaptive attack (an attacker who knows the detector)", "",
          "Success = misclassified *and* accepted by the detector at its calibrated threshold, % of the attacked "
          "images. Plain PGD-10 ignores the detector; the adaptive attack (lgm_ext.attacks.AdaptivePGD, selective: "
          "the classification loss until misclassified, then the detector's score) has the same budget.", "",
          "| detector | " + " | ".join(f"PGD-10 {e:g} | adaptive {e:g}" for e in res["eps"]) + " |",
          "|---|" + "---|---|" * len(res["eps"])]
    for det in res["runs"]:
        cells = [ms(_values(res, det, lambda r, e=e, k=k: r["adaptive"][f"{e:g}"][k]), "{:.1f}")
                 for e in res["eps"] for k in ("pgd", "adaptive")]
        L.append(f"| {det} | " + " | ".join(cells) + " |")
    cols = list(dict.fromkeys(v["what"] for v in res["verdicts"]))
    L += ["", "## Verdicts: L-GM's likelihood against each detector", "",
          "Per column the claim \"L-GM's likelihood detects this set better\" (lower EER) or, for the adaptive "
          "columns, \"resists the adaptive attack better\" (lower success), tested against the detector of the row "
          "by the z-test of the difference (binomial error on the images measured combined with the seed spread): "
          "**holds** for z >= 2, **fails** for z <= -2, else **within noise**; z in brackets.", "",
          "| L-GM likelihood vs | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    cell = {(v["other"], v["what"]): f"**{v['verdict']}** ({v['z']:.1f})" for v in res["verdicts"]}
    for det in dict.fromkeys(v["other"] for v in res["verdicts"]):
        L.append(f"| {det} | " + " | ".join(cell.get((det, c), "-") for c in cols) + " |")
    return "\n".join(L) + "\n"
