"""The inverse-adversary report's centers comparison (docs/SPEC.md section 5): class means of inverse
adversaries' features against center-loss centers (model A), clean class means and final-layer weights
(A and B), and the report's qualitative claims tested on our numbers."""
from __future__ import annotations

from torch import Tensor

from .measure import INVERSE_ADVERSARY, center_comparisons

__all__ = ["CENTERS_ROLES", "centers_report", "centers_claims", "centers_markdown"]

# The report's models: role -> the head kind it names (A: softmax + center loss; B: softmax alone; the L-GM
# model is ours, for its learned means).
CENTERS_ROLES = {"A": "center", "B": "softmax", "L-GM": "lgm"}


def centers_report(models: dict, x: Tensor, y: Tensor, *, batch: int = 256, num_classes: int = 10,
                   tick=None) -> dict:
    """The report's comparison.  ``models`` maps "A" (center loss), "B" (softmax) and optionally "L-GM"
    to (model, head); per model :func:`~lgm_lab.experiments.measure.center_comparisons`, then
    ``"claims"``.  ``tick(n)`` as batches of n images are attacked."""
    out = {name: center_comparisons(model, head, x, y, batch=batch, num_classes=num_classes, tick=tick)
           for name, (model, head) in models.items()}
    out["claims"] = centers_claims(out)
    return out


def centers_claims(r: dict) -> list[dict]:
    """The report's qualitative claims, tested on our numbers (criteria stated in each row)."""
    claims = []
    a = r.get("A", {})
    if "inverse vs center-loss centers" in a:
        c = a["inverse vs center-loss centers"]
        w = a.get("inverse vs weights")
        ok = c["mean_cosine"] > 0.9 and (w is None or c["mean_mse"] <= w["mean_mse"])
        claims.append({"claim": "A: inverse-adversary centers are close to the center-loss centers (high cosine, "
                                "low MSE)",
                       "criterion": "mean cosine > 0.9 and MSE no larger than vs the weights",
                       "measured": f"cosine {c['mean_cosine']:.3f}, MSE {c['mean_mse']:.4g}", "supported": bool(ok)})
    for m in ("A", "B"):
        res = r.get(m, {})
        if "inverse vs clean" in res and ("inverse vs center-loss centers" in res or m == "B"):
            clean = res["inverse vs clean"]
            ref = res.get("inverse vs center-loss centers")
            ok = clean["mean_cosine"] < 0.99 and (ref is None or clean["mean_cosine"] < ref["mean_cosine"])
            claims.append({"claim": f"{m}: inverse-adversary centers are only moderately similar to clean-feature "
                                    "centers",
                           "criterion": "mean cosine < 0.99" + (" and below the center-loss comparison" if ref else ""),
                           "measured": f"cosine {clean['mean_cosine']:.4f}, MSE {clean['mean_mse']:.4g}",
                           "supported": bool(ok)})
        if "inverse vs weights" in res and "inverse vs clean" in res:
            w, clean = res["inverse vs weights"], res["inverse vs clean"]
            ok = w["mean_cosine"] < clean["mean_cosine"] and w["mean_mse"] > clean["mean_mse"]
            claims.append({"claim": f"{m}: inverse-adversary centers are far from the final layer's weight rows",
                           "criterion": "lower cosine and higher MSE than vs the clean centers",
                           "measured": f"cosine {w['mean_cosine']:.3f}, MSE {w['mean_mse']:.4g}",
                           "supported": bool(ok)})
    return claims


def centers_markdown(centers: dict, seed: int, n_images: int | None = None) -> list[str]:
    """The report's centers section: per model, each comparison's mean cosine, MSE and per-class cosines;
    then the claims.  ``n_images``: how many test images the centers were computed on (said when given)."""
    on = f"; {n_images:,} test images" if n_images else ""
    L = [f"## Centers (inverse adversaries, {INVERSE_ADVERSARY}; 100-D, seed {seed}{on})", ""]
    for model_name, comps in centers.items():
        if model_name == "claims":
            continue
        L += [f"### Model {model_name}", "", "| comparison | mean cosine | mean MSE | per-class cosine |",
              "|---|---|---|---|"]
        for comp, v in comps.items():
            L.append(f"| {comp} | {v['mean_cosine']:.4f} | {v['mean_mse']:.4g} | "
                     + ", ".join(f"{c:.3f}" for c in v["cosine"]) + " |")
        L.append("")
    L += ["### The report's claims", "", "| claim | criterion | measured | supported |", "|---|---|---|---|"]
    for c in centers["claims"]:
        L.append(f"| {c['claim']} | {c['criterion']} | {c['measured']} | {'yes' if c['supported'] else '**no**'} |")
    return L
