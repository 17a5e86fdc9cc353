"""Why the L-GM head's own likelihood fails out of distribution (issue 45): interventions on the head's training,
each a training option of :class:`~lgm_lab.config.TrainConfig`, at the detection report's budget, measured on the
quantities a cause would move (docs/likelihood, ``lgm likelihood``).

Rules (:data:`RULES`): today's head; the log-variances' learning rate x10; the log-variances as a moving average
of the batches' squared deviations (no gradient), clamped as always and with the clamp out of reach; the
likelihood weight lambda at 0, 0.01 and 1; the margin alpha at 0; the likelihood term without its log-det; the
features L2-normalised and scaled to norm 10 before the head.  Every rule trains the same LeNet++ 100-D on
Fashion-MNIST with the report recipe; only its overrides differ.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints import checkpoint_digest, load_trained
from ..detection_protocol import detection_data, measure_network
from ..figures import variance_trace_figure
from ..ood_data import OOD_SETS
from ..run_folder import save_json, save_text
from ..tensors import features
from ..trace import class_statistics
from ..train import TrainingDiverged
from .runs import budget_words, load_cached, run_config, save_cached, train_or_reuse
from .stats import compare, mean_std_text

__all__ = ["RULES", "LIKELIHOOD_PRESETS", "rule_config", "train_rules", "head_geometry", "measure_rule",
           "score_anatomy", "likelihood_experiment", "likelihood_verdicts", "likelihood_markdown"]

_VERSION = 1  # bump when the measurement changes: cached measurements of another version are redone
FPR = 0.05
EPS = 0.1  # FGSM eps of the remedy's condition (and PGD-10 beside it)
REMEDY_REJECTION = 90.0  # % of every far-OOD set the head's own likelihood must reject, in every seed
# The head's own scores (report names of lgm_lab.detection_protocol) and the post-hoc references beside them.
HEAD_SCORES = ("L-GM likelihood", "L-GM paper score (identity distance)", "L-GM distance (no log-det)",
               "L-GM max posterior", "L-GM mixture")
REFERENCES = ("Gaussians re-fitted (diag)", "Mahalanobis (L2-normalised)")

# (name, label, TrainConfig overrides of an L-GM head with alpha = 1): the first is today's head.
RULES = (
    ("default", "today's head (log-variances by SGD)", {}),
    ("ema", "log-variances: moving average, no gradient", dict(variance_rule="ema")),
    ("log-var-lr-x10", "log-variances' learning rate x10", dict(log_var_lr_mult=10.0)),
    ("no-logdet", "likelihood term without its log-det", dict(likelihood="no-logdet")),
    ("lambda-0", "lambda 0 (no likelihood term)", dict(lambda_=0.0)),
    ("alpha-0", "alpha 0 (no margin)", dict(alpha=0.0)),
    ("l2-x10", "features L2-normalised x10 before the head", dict(feature_norm=10.0)),
    ("lambda-1", "lambda 1", dict(lambda_=1.0)),
    ("lambda-0.01", "lambda 0.01", dict(lambda_=0.01)),
    ("ema-bound-20", "moving average, clamp at 20 instead of 6", dict(variance_rule="ema", log_var_bound=20.0)),
    ("identity-cov", "identity covariance (no learned variances)", dict(covariance="identity")),
)

# The budget: the standard detection report's (1,024 SGD steps of batch 128, warm-up over the first quarter, 2,000
# test images), so that the default rule's networks are that report's L-GM networks (the same configuration).
LIKELIHOOD_PRESETS = {
    "standard": dict(train=dict(steps=1024, warmup_steps=256, test_subset=2000), seeds=(0, 1, 2), fit_points=20000,
                     fgsm_subset=1000),
}


def _rule(name: str) -> tuple[str, str, dict]:
    for r in RULES:
        if r[0] == name:
            return r
    raise ValueError(f"unknown rule {name!r}; choose from {', '.join(r[0] for r in RULES)}")


def rule_config(name: str, seed: int, *, preset: str = "standard", data_dir=None):
    """The :class:`~lgm_lab.config.TrainConfig` of rule ``name`` for ``seed`` at ``preset``'s budget."""
    if preset not in LIKELIHOOD_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(LIKELIHOOD_PRESETS)}")
    overrides = dict(head="lgm", alpha=1.0, **LIKELIHOOD_PRESETS[preset]["train"])
    overrides.update(_rule(name)[2])
    return run_config("fashion-mnist", data_dir, 100, seed, overrides)


def train_rules(out_dir, *, preset: str = "standard", seeds=None, rules=None, data_dir=None, progress=print) -> dict:
    """Train (or reuse) every rule's network for every seed into ``out_dir/runs/<rule>-s<seed>``, seed by seed
    (every rule's first seed first); a network that diverges is recorded in its folder (``diverged.json``)
    and not retried.  Returns ``{run name: None or the divergence message}``."""
    P = LIKELIHOOD_PRESETS[preset]
    seeds = tuple(P["seeds"] if seeds is None else seeds)
    names = [r[0] for r in RULES] if rules is None else [_rule(n)[0] for n in rules]
    out, done = Path(out_dir), {}
    for seed in seeds:
        for name in names:
            cfg = rule_config(name, seed, preset=preset, data_dir=data_dir)
            run_dir = out / "runs" / f"{name}-s{seed}"
            key = {"config": cfg.__dict__}
            marker = load_cached(run_dir / "diverged.json", key)
            if marker is not None:
                done[run_dir.name] = marker["message"]
                continue
            progress(f"training {run_dir.name}")
            try:
                train_or_reuse(cfg, run_dir, progress)
                done[run_dir.name] = None
            except TrainingDiverged as err:
                run_dir.mkdir(parents=True, exist_ok=True)
                save_cached(run_dir / "diverged.json", key, {"message": str(err).split(";")[0]})
                done[run_dir.name] = str(err).split(";")[0]
    return done


@torch.no_grad()
def head_geometry(head, f_fit: Tensor, y_fit: Tensor) -> dict:
    """Where an L-GM head's Gaussians sit against its network's training features (``f_fit``, ``y_fit``):

    - ``within_rms``: the root mean squared distance of a feature to its class's empirical mean;
      ``between_mean``: the mean distance between two classes' empirical means; their ratio;
    - ``means_offset``: the mean distance of a learned mean to its class's empirical mean, also over
      ``within_rms``;
    - ``log_var_learned``: the head's log-variances as its forward uses them (mean), ``log_var_raw`` as stored,
      ``clamped_share``: the share of them the clamp changes;
    - ``log_var_fitted``: the mean log of the features' per-class, per-dimension variances around the class
      means (Gaussians re-fitted post hoc), and ``fitted_below_bound``: the share below ``-log_var_bound``
      (what a rule that tracked the features would need the clamp to allow);
    - ``feature_norm``: the mean norm of the training features."""
    f = f_fit.double()
    y = y_fit.long().to(f.device)
    k = head.num_classes
    _counts, m, var = class_statistics(f, y, k)
    within = (f - m[y]).pow(2).sum(1).mean().sqrt().item()
    between = torch.pdist(m).mean().item() if k > 1 else float("nan")
    fitted = var.clamp(min=torch.finfo(f.dtype).tiny).log()
    mu = head.means.detach().double().to(f.device)
    offset = (mu - m).norm(dim=1).mean().item()
    out = {"within_rms": within, "between_mean": between, "within_over_between": within / between,
           "means_offset": offset, "means_offset_over_within": offset / within,
           "log_var_fitted": fitted.mean().item(), "feature_norm": f.norm(dim=1).mean().item()}
    raw = getattr(head, "log_var", None)
    if isinstance(raw, Tensor):
        bound = float(head.log_var_bound)
        lv = head.clamped_log_var().detach().double()
        out.update(log_var_learned=lv.mean().item(), log_var_raw=raw.detach().double().mean().item(),
                   clamped_share=100.0 * (lv != raw.detach().double()).double().mean().item(),
                   fitted_below_bound=100.0 * (fitted < -bound).double().mean().item(), log_var_bound=bound)
    return out


@torch.no_grad()
def score_anatomy(head, f_clean: Tensor, feats: dict) -> dict:
    """The head's log-likelihood of its predicted class, ``-d - h + const``, taken apart on clean features and on
    each abnormal set's (``feats``): the median squared-distance part ``d`` (half the Mahalanobis distance under
    the head's covariance) and the median half log-determinant ``h`` of the predicted class, their spreads (std)
    over the inputs, and the share of the inputs predicted as the most common class -- whether the score ranks
    inputs by their distance or by which class they are assigned to."""
    def parts(f: Tensor) -> dict:
        f = f.to(head.means.dtype)
        sc = head.scores(f)
        pred = head.logits(f).argmax(1)
        d = -sc["distance"].double()
        lv = head.clamped_log_var()
        h = torch.zeros_like(d) if lv is None else 0.5 * lv.detach().double().sum(1)[pred]
        share = torch.bincount(pred, minlength=head.num_classes).max().item() / max(1, len(pred))
        return {"d_median": d.median().item(), "h_median": h.median().item(), "d_std": d.std().item(),
                "h_std": h.std().item(), "top_class_share": 100.0 * share}

    return {"clean": parts(f_clean), "sets": {name: parts(f) for name, f in feats.items()}}


def _compact(m: dict) -> dict:
    """What the experiment keeps of :func:`~lgm_lab.detection_protocol.measure_network`'s result: the network's
    errors and diagnostics, and per detector and set the rejection at the operating point and the AUROC."""
    key = f"{100 * FPR:g}"
    dets = {name: {"false_rejection": r["false_rejection"][key],
                   "sets": {s: {"rejected": v["rejected"][key], "auroc": v["auroc"], "n": v["n_abnormal"]}
                            for s, v in r["sets"].items()}}
            for name, r in m["detectors"].items()}
    net = m["network"]
    return {"clean_error": net["clean_error"], "attack_error": net["attack_error"], "n_clean": net["n_clean"],
            "n_attack": net["n_attack"], "diagnostics": net.get("diagnostics"), "detectors": dets}


def measure_rule(run_dir: Path, P: dict, data_dir=None, batch: int = 256) -> dict:
    """One rule's network (``run_dir``) measured, cached beside its checkpoint (``likelihood_eval.json``, keyed
    by the checkpoint's digest and the settings): the detection protocol's detectors at 5% false rejections on
    the far-OOD sets and FGSM/PGD-10 at eps 0.1 (:func:`~lgm_lab.detection_protocol.measure_network`, no
    adaptive attack), :func:`head_geometry` on the training features it fits on, and the run's trace."""
    model, head, cfg, ck = load_trained(run_dir / "checkpoint.pt")
    settings = {"version": _VERSION, "sha256": checkpoint_digest(ck), "fit_points": P["fit_points"],
                "fgsm_subset": P["fgsm_subset"], "test_subset": cfg.test_subset, "sets": list(OOD_SETS),
                "fpr": FPR, "eps": EPS}
    cached = load_cached(run_dir / "likelihood_eval.json", settings)
    if cached is not None:
        return cached
    data = detection_data(cfg, data_dir=data_dir, test_subset=cfg.test_subset, fit_points=P["fit_points"],
                          sets=OOD_SETS)
    m = measure_network(model, head, data, eps=(EPS,), attack_subset=P["fgsm_subset"], fprs=(FPR,),
                        adaptive=False, seed=cfg.seed, batch=batch)
    f_fit = features(model, data["fit"][0], batch)
    ev = {**_compact(m), "geometry": head_geometry(head, f_fit, data["fit"][1]),
          "anatomy": score_anatomy(head, features(model, data["clean"][0], batch),
                                   {k: features(model, v, batch) for k, v in data["abnormal"].items()}),
          "trace": list(ck.get("trace", [])), "metrics": ck["metrics"][-1]}
    save_cached(run_dir / "likelihood_eval.json", settings, ev)
    return ev


_TITLE = "# Why the L-GM head's own likelihood fails out of distribution"


def _check_own_outputs(out: Path) -> None:
    """Refuse (ValueError naming the file) an output name in ``out`` that holds something this experiment did not
    write -- a user's file, or anything but a regular file -- before any work: only its own results are replaced."""
    names = (out / "likelihood.json", out / "likelihood.md", out / "figures" / "variance_trace.png")
    there = [p for p in names if p.exists() or p.is_symlink()]
    if not there:
        return
    for p in there:
        if p.is_symlink() or not p.is_file():
            raise ValueError(f"{p} is not a regular file this experiment wrote; move it away or give another --out")
    try:
        own = json.loads(names[0].read_text()) if names[0].is_file() else None
    except (OSError, ValueError):
        own = None
    md_own = not names[1].is_file() or names[1].read_text(errors="replace").startswith(_TITLE)
    if not (isinstance(own, dict) and {"preset", "rules", "verdicts"} <= own.keys() and md_own):
        raise ValueError(f"{there[0]} was not written by lgm likelihood (the folder holds files of yours); move it "
                         "away or give another --out")


def likelihood_experiment(out_dir, *, preset: str = "standard", seeds=None, rules=None, data_dir=None,
                          progress=print, fmt: str = "png") -> dict:
    """Every rule of :data:`RULES` (or ``rules``) for every seed of ``preset``: trained (or reused) into
    ``out_dir/runs`` (:func:`train_rules`), measured (:func:`measure_rule`, cached), and written as
    ``likelihood.json``, ``likelihood.md`` and ``figures/variance_trace.<fmt>``."""
    if preset not in LIKELIHOOD_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(LIKELIHOOD_PRESETS)}")
    P = LIKELIHOOD_PRESETS[preset]
    seeds = tuple(P["seeds"] if seeds is None else seeds)
    names = [r[0] for r in RULES] if rules is None else [_rule(n)[0] for n in rules]
    out = Path(out_dir)
    _check_own_outputs(out)
    t0 = time.perf_counter()
    diverged = train_rules(out, preset=preset, seeds=seeds, rules=names, data_dir=data_dir, progress=progress)
    res = {"preset": preset, "train": P["train"], "seeds": list(seeds), "fit_points": P["fit_points"],
           "fgsm_subset": P["fgsm_subset"], "fpr": FPR, "eps": EPS, "sets": list(OOD_SETS), "rules": {}}
    for name in names:
        _, label, overrides = _rule(name)
        rule = res["rules"][name] = {"label": label, "overrides": overrides, "runs": {}, "diverged": {}}
        for seed in seeds:
            run = f"{name}-s{seed}"
            if diverged.get(run):
                rule["diverged"][seed] = diverged[run]
                continue
            progress(f"measuring {run}")
            rule["runs"][seed] = measure_rule(out / "runs" / run, P, data_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    traces = {name: {seed: r["trace"] for seed, r in rule["runs"].items()} for name, rule in res["rules"].items()}
    res["figures"] = [str(Path(variance_trace_figure(traces, out / "figures" / "variance_trace", fmt=fmt,
                                                     labels={n: r["label"] for n, r in res["rules"].items()},
                                                     bounds={n: rule_config(n, 0).log_var_bound for n in names}))
                          .relative_to(out))]
    res["verdicts"] = likelihood_verdicts(res)
    res["seconds"] = time.perf_counter() - t0
    save_json(out / "likelihood.json", res, indent=1, default=float)
    save_text(out / "likelihood.md", likelihood_markdown(res))
    return res


def _values(rule: dict, get) -> list[float]:
    out = []
    for r in rule["runs"].values():
        try:
            out.append(float(get(r)))
        except (KeyError, TypeError):
            pass
    return out


def _rejected(det: str, s: str):
    return lambda r: r["detectors"][det]["sets"][s]["rejected"]


def likelihood_verdicts(res: dict) -> dict:
    """Per rule against today's head: is its own likelihood a remedy -- every far-OOD set rejected at
    >= :data:`REMEDY_REJECTION` % at the 5% point in every seed, with clean error and FGSM eps 0.1 rejection
    not worse beyond noise (:func:`~lgm_lab.experiments.stats.compare`) -- and does it win beyond noise (its
    likelihood rejects every far-OOD set more than today's head's)."""
    base = res["rules"].get("default")
    out = {}
    fgsm = f"FGSM {res['eps']:g}"
    for name, rule in res["rules"].items():
        runs = list(rule["runs"].values())
        if not runs:
            out[name] = {"remedy": False, "why": "no finished network"}
            continue
        every = all(r["detectors"]["L-GM likelihood"]["sets"][s]["rejected"] >= REMEDY_REJECTION
                    for r in runs for s in res["sets"])
        v = {"every_set_every_seed": every and not rule["diverged"], "seeds": len(runs)}
        if base is not None and name != "default" and base["runs"]:
            n_clean, n_att = runs[0]["n_clean"], runs[0]["n_attack"]
            v["clean_error"] = compare(_values(rule, lambda r: r["clean_error"]),
                                       _values(base, lambda r: r["clean_error"]), n_clean)["verdict"]
            # higher rejection is better: compare the non-rejected shares
            v["fgsm_rejection"] = compare(_values(rule, lambda r: 100 - _rejected("L-GM likelihood", fgsm)(r)),
                                          _values(base, lambda r: 100 - _rejected("L-GM likelihood", fgsm)(r)),
                                          n_att)["verdict"]
            v["sets"] = {s: compare(_values(rule, lambda r, s=s: 100 - _rejected("L-GM likelihood", s)(r)),
                                    _values(base, lambda r, s=s: 100 - _rejected("L-GM likelihood", s)(r)),
                                    runs[0]["detectors"]["L-GM likelihood"]["sets"][s].get("n"))["verdict"]
                         for s in res["sets"]}
            v["remedy"] = v["every_set_every_seed"] and v["clean_error"] != "fails" and v["fgsm_rejection"] != "fails"
            v["wins"] = v["remedy"] and all(x == "holds" for x in v["sets"].values())
        out[name] = v
    return out


def _far(r: dict, det: str, sets) -> tuple[float, float]:
    vals = [r["detectors"][det]["sets"][s]["rejected"] for s in sets]
    return min(vals), sum(vals) / len(vals)


def likelihood_markdown(res: dict) -> str:
    """The experiment as markdown: its budget and command, what each rule does to the head and the features,
    the head's own likelihood per abnormal set, the head's other scores and two post-hoc references, verdicts."""
    t, sets = res["train"], res["sets"]
    fgsm, pgd = f"FGSM {res['eps']:g}", f"PGD-10 {res['eps']:g}"
    seeds = ", ".join(map(str, res["seeds"]))
    L = [f"{_TITLE}: interventions", "",
         f"LeNet++ 100-D (linear feature layer), L-GM head (alpha 1, lambda 0.1 unless the rule says otherwise), "
         f"Fashion-MNIST, all training images, {budget_words(t)}, the report recipe (the standard detection "
         f"report's budget: the default rule's networks are that report's L-GM networks); seeds {seeds}. Each "
         f"score's threshold is calibrated for {100 * res['fpr']:g}% false rejections on one half of "
         f"{t['test_subset']} test images and measured on the other half; the abnormal sets are the detection "
         f"report's far-OOD sets ({', '.join(sets)}) and FGSM / PGD-10 at eps {res['eps']:g} on "
         f"{res['fgsm_subset']} test images. Post-hoc Gaussians are fitted on {res['fit_points']:,} training "
         f"images' features. Mean ± std over seeds. Command: `lgm likelihood --out DIR` (finished runs and "
         f"measurements are reused); this invocation took {res.get('seconds', 0) / 60:.0f} min.", "",
         f"![variances over training](figures/{Path(res['figures'][0]).name})" if res.get("figures") else "", "",
         "## What each rule does to the head and to the features", "",
         "Log-variances: the head's as its forward uses them (learned) against the training features' own "
         "per-class variances (fitted), means over classes and dimensions; clamped: the share of the head's "
         "log-variances the clamp (|log var| <= bound) changes; offset: the mean distance of a learned mean to "
         "its class's empirical mean over the within-class RMS radius; within / between: that radius over the "
         "mean distance between class means; norms: median feature norm of clean test images and of two "
         "abnormal sets.", "",
         "| rule | test error % | learned / fitted log-var | clamped % | offset / within | within / between | "
         "norm: clean / noise / inverted | diverged |",
         "|---|---|---|---|---|---|---|---|"]
    for rule in res["rules"].values():
        def g(key, fmt="{:.2f}", rule=rule):
            return mean_std_text(_values(rule, lambda r: r["geometry"][key]), fmt)

        def norm(s, rule=rule):
            return mean_std_text(_values(rule, lambda r: r["diagnostics"]["sets"][s]["norm"] if s != "clean"
                                         else r["diagnostics"]["clean"]["norm"]), "{:.2g}")
        L.append(f"| {rule['label']} | {mean_std_text(_values(rule, lambda r: r['clean_error']))} | "
                 f"{g('log_var_learned')} / {g('log_var_fitted')} | {g('clamped_share', '{:.0f}')} | "
                 f"{g('means_offset_over_within')} | {g('within_over_between')} | "
                 f"{norm('clean')} / {norm('noise')} / {norm('inverted')} | "
                 f"{'; '.join(f'seed {s}: {m}' for s, m in rule['diverged'].items()) or '-'} |")
    L += ["", f"## The head's own likelihood: rejected % at {100 * res['fpr']:g}% false rejections", "",
          "| rule | " + " | ".join(sets) + f" | {fgsm} | {pgd} | every far-OOD set >= "
          f"{REMEDY_REJECTION:g}% in every seed |", "|---|" + "---|" * (len(sets) + 3)]
    for name, rule in res["rules"].items():
        cells = [mean_std_text(_values(rule, _rejected("L-GM likelihood", s)), "{:.1f}") for s in (*sets, fgsm, pgd)]
        ok = res["verdicts"].get(name, {}).get("every_set_every_seed")
        L.append(f"| {rule['label']} | " + " | ".join(cells) + f" | {'yes' if ok else 'no'} |")
    L += ["", "## What the head's likelihood ranks by", "",
          "The head's log-likelihood of its predicted class is -d - h + const: d half the squared Mahalanobis "
          "distance to that class's mean under the head's covariance, h half that class's log-determinant. "
          "Medians of d and h on clean test images and on two abnormal sets; the spread (std) of each over the "
          "clean images; the share of uniform noise predicted as one class (mean over seeds).", "",
          "| rule | clean: d / h | noise: d / h | inverted: d / h | clean spread: d / h | noise in one class % |",
          "|---|---|---|---|---|---|"]
    for rule in res["rules"].values():
        def an(where, key, rule=rule):
            def get(r):
                a = r["anatomy"]
                return (a["clean"] if where == "clean" else a["sets"][where])[key]
            vals = _values(rule, get)
            return f"{sum(vals) / len(vals):.3g}" if vals else "-"
        L.append(f"| {rule['label']} | {an('clean', 'd_median')} / {an('clean', 'h_median')} | "
                 f"{an('noise', 'd_median')} / {an('noise', 'h_median')} | "
                 f"{an('inverted', 'd_median')} / {an('inverted', 'h_median')} | "
                 f"{an('clean', 'd_std')} / {an('clean', 'h_std')} | {an('noise', 'top_class_share')} |")
    dets = [d for d in (*HEAD_SCORES, *REFERENCES)
            if any(d in r["detectors"] for rule in res["rules"].values() for r in rule["runs"].values())]
    L += ["", "## The head's other scores and two post-hoc references on the same networks", "",
          f"Rejected % at {100 * res['fpr']:g}% false rejections: the lowest over the far-OOD sets / their mean "
          "(mean over seeds). The paper's score is the identity-covariance distance to the predicted class's mean "
          "(its section 4.3); the distance is the head's Mahalanobis distance without the log-det; the references "
          "are Gaussians re-fitted to the training features post hoc and Mahalanobis on L2-normalised features.", "",
          "| rule | " + " | ".join(dets) + " |", "|---|" + "---|" * len(dets)]
    for rule in res["rules"].values():
        cells = []
        for d in dets:
            lo = _values(rule, lambda r, d=d: _far(r, d, sets)[0])
            mean = _values(rule, lambda r, d=d: _far(r, d, sets)[1])
            cells.append(f"{sum(lo) / len(lo):.1f} / {sum(mean) / len(mean):.1f}" if lo else "-")
        L.append(f"| {rule['label']} | " + " | ".join(cells) + " |")
    L += ["", "## Verdicts", "",
          f"A remedy is a rule under which the head's own likelihood rejects every far-OOD set at >= "
          f"{REMEDY_REJECTION:g}% in every seed, with the clean test error and the rejection of FGSM eps "
          f"{res['eps']:g} not worse than today's head beyond noise (z-test over seeds with the binomial error); it "
          "wins if it also rejects every far-OOD set more than today's head beyond noise.", ""]
    remedies = [n for n, v in res["verdicts"].items() if v.get("remedy")]
    for name, v in res["verdicts"].items():
        if name == "default" or "clean_error" not in v:
            continue
        worse = [s for s, x in v["sets"].items() if x == "fails"]
        better = [s for s, x in v["sets"].items() if x == "holds"]
        L.append(f"- {res['rules'][name]['label']}: every far-OOD set >= {REMEDY_REJECTION:g}% in every seed: "
                 f"{'yes' if v['every_set_every_seed'] else 'no'}; against today's head, rejects more of "
                 f"{', '.join(better) or 'no set'} and less of {', '.join(worse) or 'no set'} beyond noise; clean "
                 f"error {_WORDS[v['clean_error']]}, FGSM {res['eps']:g} rejection {_WORDS[v['fgsm_rejection']]}"
                 f"{' -- a remedy' + (', and it wins' if v.get('wins') else '') if v['remedy'] else ''}.")
    L += ["", f"Remedy: {', '.join(res['rules'][n]['label'] for n in remedies) if remedies else 'none'} "
          f"({len(res['seeds'])} seed(s))."]
    return "\n".join(L) + "\n"


_WORDS = {"holds": "better beyond noise", "fails": "worse beyond noise", "within noise": "within noise",
          "one seed": "not comparable with one seed"}
