"""Measurements the experiments share: attacks over batches, FGSM errors, adversarial verification
(ROC, EER), detection metrics (AUROC, FPR at 95% TPR, a calibrated threshold and the rate it rejects),
class means, center comparisons, compactness.

Attacks differentiate :class:`lgm_ext.Classifier` ``(model, head)`` -- images to the head's logits --
with the cross-entropy of those logits, which for an L-GM head is L_cls with alpha = 0
(docs/SPEC.md section 4).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from lgm_ext import Classifier
from lgm_ext.attacks import FGSM, InversePGD, TargetedFGSM
from lgm_ext.defaults import INVERSE_EPS, INVERSE_STEP, INVERSE_STEPS
from lgm_ext.detector import calibrated_threshold  # the one convention, shared with LikelihoodDetector

from ..evaluation import evaluate
from ..heads import center_log_score
from ..metrics import attack_in_batches, detection_metrics, eer, fpr_at_tpr, operating_point_key, rejection_rate
from ..tensors import batches, features
from ..timing import interleaved_medians

__all__ = ["measure_model", "attack_in_batches", "predict_in_batches", "fgsm_sweep", "fgsm_errors", "eer",
           "verification",
           "summarize_verification", "fpr_at_tpr", "calibrated_threshold", "rejection_rate", "operating_point_key",
           "detection_metrics",
           "class_means", "compare_centers", "center_comparisons", "compactness",
           "center_scores", "training_step_ms", "INVERSE_ADVERSARY"]

# How the reports describe the inverse adversary (the library's defaults).
INVERSE_ADVERSARY = f"eps'={INVERSE_EPS * 255:g}/255, {INVERSE_STEPS} steps of {INVERSE_STEP * 255:g}/255"


@torch.no_grad()
def predict_in_batches(model, head, x: Tensor, batch: int = 512) -> Tensor:
    return torch.cat([head.predict(model(x[s])) for s in batches(len(x), batch)])


def fgsm_sweep(model, head, x: Tensor, y: Tensor, eps_list, *, batch: int = 256, predict_batch: int | None = None,
               tick=None, features_out: dict | None = None) -> tuple[dict, dict]:
    """Test error % under FGSM for each eps of ``eps_list`` (eps = 0: clean), and the adversarial images
    by eps: one gradient per batch serves every eps (:meth:`lgm_ext.attacks.FGSM.sweep`).  ``x``, ``y`` on the
    model's device; ``tick(n)`` as batches of n images are attacked (once per eps, eps = 0 too).
    ``features_out``: a dict that receives the features of the images at each eps (what the predictions
    were computed from), for measurements that need them again."""
    clf = Classifier(model, head).eval()
    eps_list = [float(e) for e in eps_list]
    attacked = [e for e in eps_list if e != 0]
    parts, atk = {e: [] for e in attacked}, FGSM(clf)
    for s in batches(len(x), batch) if attacked else ():
        for e, adv in atk.sweep(x[s], y[s], attacked).items():
            parts[e].append(adv)
    errors, adversarial = {}, {}
    for eps in eps_list:
        adv = x if eps == 0 else torch.cat(parts[eps])
        with torch.no_grad():
            f = features(model, adv, predict_batch or batch)
            pred = head.predict(f)
        if features_out is not None:
            features_out[eps] = f
        errors[eps] = 100.0 * (pred != y).float().mean().item()
        adversarial[eps] = adv
        if tick is not None:
            tick(len(x))
    return errors, adversarial


def fgsm_errors(model, head, x: Tensor, y: Tensor, eps_list=(0.0, 0.1, 0.2, 0.3), batch: int = 256,
                tick=None) -> dict:
    """Test error % under FGSM for each eps (the L-GM paper's Table 6)."""
    return fgsm_sweep(model, head, x, y, eps_list, batch=batch, tick=tick)[0]


def verification(model, head, x: Tensor, y: Tensor, *, eps: float = 0.3, targeted: bool = False,
                 batch: int = 256, adversarial: Tensor | None = None, tick=None,
                 features_of: tuple[Tensor, Tensor] | None = None) -> dict:
    """Adversarial verification (paper section 4.3): threshold a likelihood-style score of the
    predicted class to tell normal from FGSM inputs (targeted: towards the second most likely
    class).  Every score of ``head.scores`` is evaluated; ``"default"`` is the head's own
    (docs/SPEC.md section 5).  All scores are logs (no underflow ties).  ``adversarial``: reuse
    already-computed FGSM inputs of ``x``, and ``features_of`` their (clean, adversarial) features if known;
    ``tick(n)`` as batches of n images are attacked."""
    clf = Classifier(model, head).eval()
    if adversarial is None:
        atk = TargetedFGSM(clf, eps=eps) if targeted else FGSM(clf, eps=eps)
        adversarial = attack_in_batches(atk, x, y, batch, tick)
    elif tick is not None:
        tick(len(x))
    with torch.no_grad():
        if features_of is None or adversarial is None:
            f_clean, f_adv = features(model, x, batch), features(model, adversarial, batch)
        else:
            f_clean, f_adv = features_of
        clean, adv = head.scores(f_clean), head.scores(f_adv)
        err = 100.0 * (head.predict(f_adv) != y).float().mean().item()
    per_score = {}
    for name in clean:
        rate, roc = eer(clean[name], adv[name])
        per_score[name] = {"eer_percent": 100.0 * rate, "auc": roc["auc"], "roc": roc,
                           "normal": clean[name].tolist(), "adversarial": adv[name].tolist()}
    d = per_score["default"]
    return {"eps": eps, "targeted": targeted, "adversarial_error_percent": err, "eer_percent": d["eer_percent"],
            "roc": d["roc"], "log_scores_normal": d["normal"], "log_scores_adversarial": d["adversarial"],
            "scores": per_score, "n": len(x)}


def summarize_verification(v: dict) -> dict:
    """A :func:`verification` result without its per-image arrays and ROC points (for JSON)."""
    keep = {k: w for k, w in v.items() if k not in ("roc", "log_scores_normal", "log_scores_adversarial", "scores")}
    keep["auc"] = v["roc"]["auc"]
    keep["scores"] = {n: {"eer_percent": s["eer_percent"], "auc": s["auc"]} for n, s in v["scores"].items()}
    return keep


def measure_model(model, head, test, x: Tensor, y: Tensor, *, eps_list=(0.0, 0.1, 0.2, 0.3),
                  verify_eps: float = 0.3, targeted: bool = False) -> dict:
    """One trained model measured: clean error on the dataset ``test``; on the attack set ``x``, ``y``,
    the error under FGSM at each eps of ``eps_list`` and the adversarial verification at ``verify_eps``
    (every score of the head; its FGSM inputs reused when ``verify_eps`` is in ``eps_list``); optionally
    the targeted-FGSM verification."""
    out = {"error": evaluate(model, head, test)["error_percent"], "n_test": len(test), "n_attack": len(x)}
    feats = {}
    errors, adversarial = fgsm_sweep(model, head, x, y, tuple(dict.fromkeys((0.0, *map(float, eps_list)))),
                                     batch=256, predict_batch=512, features_out=feats)
    out["fgsm"] = {str(e): errors[float(e)] for e in eps_list}
    v = float(verify_eps)
    out["verification"] = verification(model, head, x, y, eps=verify_eps, adversarial=adversarial.get(v),
                                       features_of=(feats[0.0], feats[v]) if v in feats else None)
    if targeted:
        out["targeted"] = verification(model, head, x, y, eps=verify_eps, targeted=True)
    return out


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean feature of each class (K, D); a class without samples gets zeros."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


def compare_centers(a: Tensor, b: Tensor) -> dict:
    """Per-class cosine similarity and MSE (mean over feature dimensions) of two (K, D) center sets."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=1)
    mse = (a.double() - b.double()).pow(2).mean(1)
    return {"cosine": cos.tolist(), "mse": mse.tolist(), "mean_cosine": cos.mean().item(),
            "mean_mse": mse.mean().item()}


def center_comparisons(model, head, x: Tensor, y: Tensor, *, batch: int = 256, num_classes: int = 10,
                       tick=None) -> dict:
    """The inverse-adversary report's comparisons for one model: the class means of its inverse
    adversaries' features (InversePGD, :mod:`lgm_ext.defaults`) against the clean class means, the final
    layer's weight rows (when the head has them) and the head's own centers (when it has them)."""
    clf = Classifier(model, head).eval()
    inv = attack_in_batches(InversePGD(clf), x, y, batch, tick)
    clean_c = class_means(features(model, x, batch), y, num_classes).cpu()
    inv_c = class_means(features(model, inv, batch), y, num_classes).cpu()
    res = {"inverse vs clean": compare_centers(inv_c, clean_c)}
    if head.class_weights() is not None:
        res["inverse vs weights"] = compare_centers(inv_c, head.class_weights().detach().cpu())
    if head.centers() is not None:
        res[f"inverse vs {head.centers_name}"] = compare_centers(inv_c, head.centers().detach().cpu())
    return res


def compactness(features: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean distance of each feature to its class mean over the mean distance between class means
    (lower: tighter classes relative to their separation).  Classes absent from ``labels`` are skipped."""
    f = features.double()
    present = torch.bincount(labels, minlength=num_classes) > 0
    m = class_means(f, labels, num_classes)
    intra = (f - m.index_select(0, labels)).norm(dim=1).mean()
    mp = m[present]
    k = mp.shape[0]
    if k < 2:
        return float("nan")
    d = torch.cdist(mp, mp)
    inter = d.sum() / (k * (k - 1))
    return (intra / inter).item()


def center_scores(features: Tensor, means: Tensor, head) -> Tensor:
    """The center-style log-score -|f - m_ŷ|^2 / 2 of the predicted class ŷ against class means ``means``."""
    return center_log_score(features, means, head.predict(features))


def training_step_ms(nets: dict, images: Tensor, labels: Tensor, *, repeats: int = 6, rounds: int = 3) -> dict:
    """Median milliseconds of one training step of each ``name: (model, head)`` on ``images``: the head's
    ``prepare`` (e.g. the inverse attack), forward and backward (the optimizer step and clipping, the same for
    every model, are left out).  The models are timed in alternating blocks in this process, so that their
    ratios hold whatever else shares the machine (a run's own seconds per epoch do not when runs were trained at
    different times or thread counts).  The models are copied, not changed."""
    steps = {}
    for name, (model, head) in nets.items():
        m, h = copy.deepcopy(model).train(), copy.deepcopy(head).train()
        net = Classifier(m, h)

        def step(m=m, h=h, net=net):
            extra = h.prepare(m, images, labels)
            loss, _ = net(images, labels, **extra)
            loss.backward()
            net.zero_grad(set_to_none=True)

        steps[name] = (step, repeats)
    return interleaved_medians(steps, warmup=1, device=images.device.type, rounds=rounds)
