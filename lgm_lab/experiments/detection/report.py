"""The detection experiment's verdicts and report (:func:`detection_markdown`), from the results
:func:`lgm_lab.experiments.detection.detection_experiment` collects: over seeds mean ± std,
:func:`~lgm_lab.experiments.stats.compare`'s verdicts for "L-GM's likelihood detects X better", per set the
detector that rejects the most at the 5% operating point, the L-GM diagnostics, the full adaptive protocol and
the transfer check."""
from __future__ import annotations

from pathlib import Path

from lgm_ext import detectors
from lgm_ext.detectors import KNN_K

from ...detection_protocol import COMBINATION
from ..measure import operating_point_key
from ..runs import budget_words
from ..stats import compare, mean_std_text

__all__ = ["LGM_DETECTOR", "detection_verdicts", "preferred_detectors", "detection_markdown"]

LGM_DETECTOR = "L-GM likelihood (lgm-a1)"


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


COMBINATION_LABEL = detectors.label(COMBINATION)


def _detectors_paragraph(res: dict) -> str:
    """How the report's detectors were built: by the pytorch-ood baselines (reports measured before issue 41) or
    from the registry of lgm_ext.detectors, with the combination (those after)."""
    family = any(k.startswith(f"{COMBINATION_LABEL} (") for k in res["runs"])
    where = ("each a member of lgm_ext.detectors, the deployable module `lgm detect fit --detector NAME` fits, "
             "KNN, ViM, Energy, MaxLogit and max-softmax tested against pytorch-ood's:" if family else
             "pytorch-ood 0.4.0's")
    text = (f"Detectors: the field's post-hoc baselines ({where} KNN, k = {KNN_K} on L2-normalised features, ViM, "
            "d = half the feature dimension, Energy, MaxLogit and max-softmax; Mahalanobis, tied covariance, on raw "
            f"and L2-normalised features) fitted on {res['fit_points']} training images' features of each network, "
            "the center distance on the center-loss network, and on the L-GM network its own likelihood, its "
            "mixture score" + (", the paper's score (the identity-covariance distance to the predicted class's "
                               "mean, its section 4.3), the distance without the log-det, the max posterior"
                               if any(k.startswith("L-GM paper score") for k in res["runs"]) else "") +
            " and Gaussians re-fitted post hoc (on the L-GM network MaxLogit and Energy are left out: "
            "they rank as its likelihood and mixture score).")
    if family:
        text += (f" On every network, {COMBINATION_LABEL}: rejects when either does, calibrated jointly so that "
                 "the combination rejects the operating point's share of clean inputs.")
    return text


def _protocol_option(res: dict) -> str:
    """The command line's --attack-protocol, where the report used another preset's protocol."""
    return f" --attack-protocol {res['attack_protocol']}" if res.get("attack_protocol") else ""


def detection_markdown(res: dict) -> str:
    t, ms = res["train"], mean_std_text
    ops = [operating_point_key(p) for p in res["fprs"]]
    attacks = list(dict.fromkeys(k for runs in res["networks"].values() for v in runs.values()
                                 for k in v.get("attack_error", {})))
    seeds = ", ".join(map(str, res["seeds"]))
    pref = preferred_detectors(res)
    # the answer first: the verdicts per abnormal set, then how they were measured (short paragraphs)
    L = [f"# Out-of-distribution and adversarial detection ({res['preset']} budget, {res['dataset']})", "",
         "## Which detector rejects what, at the 5% operating point", "",
         f"Per abnormal set, the detector that rejects the most of it at the threshold calibrated for {ops[0]}% "
         "false rejections (mean over seeds), the runner-up, and whether the difference is beyond noise "
         "(z-test of the non-rejection rates, binomial on the abnormal images with the seed spread). How it was "
         "measured follows the table; the L-GM likelihood's verdicts against every detector close the report.", "",
         "| set | best detector | rejected % | runner-up | rejected % | best vs runner-up |",
         "|---|---|---|---|---|---|"]
    for s, p in pref.items():
        word = {"holds": "better", "fails": "worse"}.get(p["verdict"], p["verdict"])
        L.append(f"| {s} | {p['best']} | {p['rejected']:.1f} | {p['runner_up']} | {p['runner_up_rejected']:.1f} | "
                 f"{word} ({p['z']:.1f}) |")
    L += ["", "## How it was measured", "",
          f"LeNet++ 100-D (linear feature layer), {t.get('subset') or 'all'} training images, "
          f"{budget_words(t)}, the report recipe; seeds {seeds} (mean ± std). Held-out-classes networks train on "
          "classes "
          f"{res['heldout_classes']} only; the test images of the other classes are their unknown inputs. Each "
          "detector's thresholds are calibrated at "
          + " and ".join(f"{o}%" for o in ops) + " false rejections (the operating points) on one half of the "
          f"{t.get('test_subset') or 'full'} test images; everything is measured on the other half.", "",
          "Abnormal sets: scikit-learn's digits (8x8 resized to 28x28, not inverted), uniform noise, Gaussian noise "
          "N(0.5, 1) clipped to [0, 1], inverted test images, natural-image patches (crops of scikit-learn's two "
          "sample photographs, grey, 28x28), the held-out classes, FGSM and PGD-10 (step 2.5 eps/10, random start) "
          f"on {res['attack_subset']} test images.", "",
          _detectors_paragraph(res), "",
          "Command: `lgm reproduce --detection --preset "
          f"{res['preset']}{_protocol_option(res)}`. This invocation took {res['seconds'] / 60:.1f} min "
          f"({res['models_reused']} of {res['models']} networks reused"
          + (f"; {len(res['shared_runs'])} of them the same runs of the report's own networks"
             if res.get("shared_runs") else "") + ").", "",
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
        return ["## Adaptive attack, full protocol", "", "Not run (`--attack-protocol none`): only the adaptive "
                "PGD-10 attack above, a lower bound on an attacker who knows the detector.", ""] \
            if res.get("attack_protocol") == "none" else []
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
            ceiling = mean_std_text([q["all"]["ceiling"] for q in per], "{:.0f}")
            L.append(f"| {det} | " + " | ".join(cells) + f" | {ceiling} |")
        L.append("")
    return L + _transfer_section(res, ops)


def _transfer_section(res: dict, ops: list[str]) -> list[str]:
    rows = [(det, seed, r) for det, runs in res["runs"].items() for seed, r in runs.items()
            if "transfer" in r and "protocol" in r]
    if not rows:
        return []
    pairs = sorted({(seed, r["transfer"]["source_seed"]) for _d, seed, r in rows})
    L = ["### Transfer check", "",
         "Images crafted by the selective adaptive attack against the same kind of network of another seed and "
         "its own detector of that name (at its 5% point; "
         + ", ".join(f"seed {b} -> seed {a}" for a, b in pairs)
         + "), evaluated on this network and detector: success % (misclassified and accepted) beside the "
         "white-box protocol's (\"all\") on the same images. A transfer attack that succeeds more often than the "
         "white-box one would mean the white-box attack is broken.", "",
         "| detector | eps | " + " | ".join(f"white-box @{o}% | transfer @{o}%" for o in ops)
         + " | transfer ceiling |", "|---|---|" + "---|---|" * len(ops) + "---|"]
    broken = []
    for det in dict.fromkeys(d for d, _s, _r in rows):
        for e in dict.fromkeys(e for d, _s, r in rows if d == det for e in r["transfer"]["eps"]):
            per = [(r["protocol"]["eps"][e]["all"], r["transfer"]["eps"][e]) for d, _s, r in rows
                   if d == det and e in r["transfer"]["eps"] and e in r["protocol"]["eps"]]
            if not per:
                continue
            cells = []
            for o in ops:
                cells += [mean_std_text([w[o] for w, _t in per], "{:.0f}"),
                          mean_std_text([t[o] for _w, t in per], "{:.0f}")]
                if any(t[o] > w[o] for w, t in per):
                    broken.append(f"{det} at eps {e}, {o}%")
            L.append(f"| {det} | {e} | " + " | ".join(cells) + " | "
                     + mean_std_text([t["ceiling"] for _w, t in per], "{:.0f}") + " |")
    L += ["", "Transfer beat the white-box attack for: " + "; ".join(broken) + "." if broken else
          "The white-box attack succeeded at least as often as the transfer attack for every detector, eps and "
          "operating point.", ""]
    return L
