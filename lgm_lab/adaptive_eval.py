"""The adaptive attack on a classifier and its detector, to the field's protocol (issue 35; Carlini & Wagner
2017, "Adversarial examples are not easily detected"; Tramer et al. 2020, "On adaptive attacks to adversarial
example defenses"; the multi-targeted attack of Gowal et al. 2019).

The attacker knows the network, the detector and its threshold, and wants an input in the L-inf eps-ball
that is misclassified *and* accepted.  Every variant is :class:`lgm_ext.attacks.AdaptivePGD` in its selective
form (the classification loss until misclassified, then the detector's score), whose iterates do not depend
on the threshold: each run returns, per image, the highest detector score of any misclassified iterate
(``return_score``), and the attack succeeds at a threshold t exactly where that score is >= t -- so one run
measures every calibrated operating point, and the best of many runs is their per-image maximum.

The variants of :class:`AttackProtocol` (a run's success is counted per image, over all its iterates):

- ``restarts``: untargeted, ``steps`` steps of 2.5 eps / steps, from ``restarts`` random starts (the images
  replicated in one batch, each replica with its own start);
- ``step sweep``: untargeted, ``steps`` steps of each size in ``step_sizes`` (fractions of eps), one random
  start each;
- ``multi-targeted``: for every target class c other than the label, the targeted loss (minus the
  cross-entropy to c) until misclassified, then the score; one random start per target;
- ``long``: ``long_steps`` steps of 2.5 eps / long_steps on the first ``long_subset`` images;
- ``all``: the per-image best of the variants above (the reported adaptive success).

Beside them: the no-detector ceiling (the images the same runs misclassify at all: no detector can let
through more), and two checks of the evaluation itself -- an attack in *feature* space
(:func:`feature_space_attack`: the features move freely in an L2 ball as large as the image-space attack
moved them, an upper bound on what the image-space attack could reach), and a *transfer* attack (the
adversarial images found against another network and its detector, evaluated here; a transfer attack that
beats the white-box one would mean the white-box attack is broken).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lgm_ext.attacks import AdaptivePGD

from .tensors import batches, features

__all__ = ["AttackProtocol", "ATTACK_PROTOCOLS", "VARIANTS", "adaptive_attack", "best_scores", "success_rates",
           "feature_space_attack", "describe_protocol", "transfer_images", "transfer_success"]

VARIANTS = ("restarts", "step sweep", "multi-targeted", "long")


@dataclass(frozen=True)
class AttackProtocol:
    """The budget of :func:`adaptive_attack` (see the module docstring)."""

    steps: int = 100
    restarts: int = 10
    step_sizes: tuple[float, ...] = (0.01, 0.05, 0.25)  # fractions of eps
    targeted: bool = True
    long_steps: int = 1000
    long_subset: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "restarts", "long_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.long_subset, int) or self.long_subset < 0:
            raise ValueError(f"long_subset must be an integer >= 0, got {self.long_subset!r}")
        if any(not (a > 0 and math.isfinite(a)) for a in self.step_sizes):
            raise ValueError(f"step_sizes must be positive fractions of eps, got {self.step_sizes}")


# "quick" is what the quick detection report can afford on 2 cores; "standard" is the field's protocol.
ATTACK_PROTOCOLS = {
    "tiny": AttackProtocol(steps=5, restarts=2, step_sizes=(0.1, 0.5), targeted=True, long_steps=10, long_subset=4),
    "quick": AttackProtocol(steps=50, restarts=2, step_sizes=(0.01, 0.25), targeted=True, long_steps=0,
                            long_subset=0),
    "standard": AttackProtocol(),
}


def describe_protocol(p: AttackProtocol, n: int) -> str:
    """The protocol in words, for a report."""
    parts = [f"{p.restarts} random restarts of {p.steps} steps of 2.5 eps/{p.steps}" if p.restarts else None,
             f"{p.steps} steps of each of {', '.join(f'{a:g}' for a in p.step_sizes)} eps" if p.step_sizes else None,
             f"multi-targeted ({p.steps} steps towards every other class)" if p.targeted else None,
             f"{p.long_steps} steps on {min(n, p.long_subset)} images" if p.long_steps and p.long_subset else None]
    return "; ".join(x for x in parts if x) + f"; {n} images"


class _TargetedLoss:
    """Minus the cross-entropy of the classifier's logits to fixed targets (summed): what a targeted attack
    maximises; ``logits`` as :class:`lgm_ext.attacks.AdaptivePGD` expects of a loss_fn."""

    def __init__(self, classifier, targets: Tensor) -> None:
        self.logits, self.targets = classifier, targets

    def __call__(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return -F.cross_entropy(self.logits(outputs), self.targets, reduction="sum")


def best_scores(model, classifier, det, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, seed: int,
                batch: int, targets: Tensor | None = None, tick=None) -> Tensor:
    """One run of the selective :class:`lgm_ext.attacks.AdaptivePGD` (``steps`` steps of ``alpha``; towards
    ``targets`` if given) over ``x`` in batches: (N,) float64, per image the highest detector score of a
    misclassified iterate (-inf: none).  ``tick(k)`` after k images."""
    out = []
    for s, atk in _selective_batches(model, classifier, det, len(x), eps, alpha, steps, seed, batch, targets):
        out.append(atk(x[s], y[s], return_score=True)[1].cpu())
        if tick is not None:
            tick(s.stop - s.start)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _selective_batches(model, classifier, det, n: int, eps: float, alpha: float, steps: int, seed: int, batch: int,
                       targets: Tensor | None = None):
    """``(slice, attack)`` per batch of ``n`` images: the selective :class:`lgm_ext.attacks.AdaptivePGD` that
    every run of this module makes (towards ``targets[slice]`` if given)."""
    for s in batches(n, batch):
        kw = {} if targets is None else {"loss_fn": _TargetedLoss(classifier, targets[s])}
        yield s, AdaptivePGD(model, det, eps=eps, alpha=alpha, steps=steps, classifier=classifier, seed=seed, **kw)


def adaptive_attack(model, classifier, det, x: Tensor, y: Tensor, eps: float, protocol: AttackProtocol, *,
                    num_classes: int, seed: int = 0, batch: int = 256, tick=None) -> dict:
    """Every variant of ``protocol`` against ``model`` (images -> features), ``classifier`` (features ->
    logits) and ``det`` (``score(features)``, differentiable; its ``threshold`` must be set, but the runs do
    not depend on it) at ``eps``.  Returns ``{variant: (n,) float64 best scores}`` over
    :data:`VARIANTS` that ran, plus ``"all"`` (their per-image maximum, the long variant on its subset);
    ``tick(k)`` after k images attacked (in each run)."""
    p, n = protocol, len(x)
    res = {}
    step = 2.5 * eps / max(p.steps, 1)
    def run(xs, ys, alpha, steps, run_seed, targets=None):
        return best_scores(model, classifier, det, xs, ys, eps, alpha, steps, run_seed, batch, targets, tick)

    # Replicas of the images in one batch: each draws its own random start (restarts) or target class.
    if p.restarts:
        r = p.restarts
        res["restarts"] = run(x.repeat(r, 1, 1, 1), y.repeat(r), step, p.steps, seed).view(r, n).amax(0)
    if p.step_sizes:
        res["step sweep"] = torch.stack([run(x, y, a * eps, p.steps, seed + 7919 * (i + 1))
                                         for i, a in enumerate(p.step_sizes)]).amax(0)
    if p.targeted and num_classes > 1:
        t = num_classes - 1
        targets = torch.cat([(y + c) % num_classes for c in range(1, num_classes)])
        res["multi-targeted"] = run(x.repeat(t, 1, 1, 1), y.repeat(t), step, p.steps, seed + 104729,
                                    targets).view(t, n).amax(0)
    if p.long_steps and p.long_subset:
        m = min(n, p.long_subset)
        res["long"] = run(x[:m], y[:m], 2.5 * eps / p.long_steps, p.long_steps, seed + 31)
    all_ = torch.full((n,), -math.inf, dtype=torch.float64)
    for v in res.values():
        all_[:len(v)] = torch.maximum(all_[:len(v)], v)
    res["all"] = all_
    return res


def success_rates(best: dict, thresholds: dict) -> dict:
    """% of images where each variant succeeds at each threshold (``{key: threshold}``), plus ``ceiling``:
    % misclassified by any iterate (success with no detector).  ``best`` as :func:`adaptive_attack` returns."""
    out = {}
    for name, v in best.items():
        out[name] = {k: 100.0 * (v >= t).double().mean().item() for k, t in thresholds.items()}
        out[name]["ceiling"] = 100.0 * torch.isfinite(v).double().mean().item()
        out[name]["n"] = len(v)
    return out


def feature_space_attack(classifier, det, f: Tensor, y: Tensor, radius: Tensor, *, steps: int = 100,
                         restarts: int = 1, seed: int = 0) -> Tensor:
    """The selective attack in feature space: each feature row moves within an L2 ball of its ``radius``
    ((N,) or a number) around ``f`` (projected after each step); the
    classification loss until misclassified, then the detector's score; normalised-gradient steps of
    radius/10 decaying linearly to 0.  Returns the per-row best score of
    a misclassified iterate (-inf: none), as :func:`adaptive_attack`."""
    r = torch.as_tensor(radius, dtype=f.dtype, device=f.device).expand(len(f)).clone()
    best = torch.full((len(f),), -math.inf, dtype=torch.float64, device=f.device)
    g_ = torch.Generator().manual_seed(seed)
    for k in range(restarts):
        d = torch.randn(f.shape, generator=g_).to(f)
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12) * r[:, None] * (torch.rand(len(f), generator=g_)
                                                                             .to(f)[:, None] if k else 0.0)
        z = (f + d).detach()
        for i in range(steps + 1):
            z.requires_grad_(i < steps)
            with torch.enable_grad():
                logits = classifier(z)
                s = det.score(z)
            fooled = logits.argmax(1) != y
            best = torch.maximum(best, torch.where(fooled, s.detach().double(), torch.full_like(best, -math.inf)))
            if i == steps:
                break
            (g_cls,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), z, retain_graph=True)
            (g_s,) = torch.autograd.grad(s.sum(), z)
            g = torch.where(fooled[:, None], g_s.to(g_cls.dtype), g_cls)
            with torch.no_grad():
                step = r * (0.1 * (1.0 - i / steps))  # decays to 0: the last steps settle in a narrow mode
                z = z + step[:, None] * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
                delta = z - f
                scale = (r / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                z = (f + delta * scale[:, None]).detach()
    return best


def transfer_images(model, classifier, det, x: Tensor, y: Tensor, eps: float, *, steps: int, seed: int = 0,
                    batch: int = 256) -> Tensor:
    """The transfer attack's images: the selective :class:`lgm_ext.attacks.AdaptivePGD` (``steps`` steps of
    2.5 eps / steps, one random start) against a *source* network (``model``, ``classifier``) and its
    detector at ``det.threshold``; per image the last iterate the source misclassified and accepted, else the
    last iterate.  Evaluate them on another network with :func:`transfer_success`."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    out = [atk(x[s], y[s]) for s, atk in _selective_batches(model, classifier, det, len(x), eps, 2.5 * eps / steps,
                                                             steps, seed, batch)]
    return torch.cat(out) if out else x[:0].clone()


def transfer_success(model, classifier, det, adv: Tensor, y: Tensor, thresholds: dict, batch: int = 256) -> dict:
    """% of ``adv`` that the *target* network (``model``, ``classifier``) misclassifies and its ``det``
    accepts at each threshold (``{key: threshold}``), plus ``ceiling`` (% misclassified) and ``n``: the
    entries of :func:`success_rates`, for images crafted elsewhere (:func:`transfer_images`)."""
    if not len(adv):
        return {**{k: 0.0 for k in thresholds}, "ceiling": 0.0, "n": 0}
    f = features(model, adv, batch)
    with torch.no_grad():
        fo = torch.cat([(classifier(f[s]).argmax(1) != y[s]).cpu() for s in batches(len(f), batch)])
        sc = torch.cat([det.score(f[s]).detach().double().cpu() for s in batches(len(f), batch)])
    out = {k: 100.0 * (fo & (sc >= t)).double().mean().item() for k, t in thresholds.items()}
    return {**out, "ceiling": 100.0 * fo.double().mean().item(), "n": len(adv)}
