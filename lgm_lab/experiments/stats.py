"""Statistics the experiments share: means over seeds, the binomial error of a rate, the z-test that
decides a verdict, and how a value with its spread is written."""
from __future__ import annotations

import torch

__all__ = ["mean_std", "binomial_se", "compare", "RELATIVE", "relative", "mean_std_text"]

# A `compare` verdict read as "is a better than b" (for rates and ratios where lower is better).
RELATIVE = {"holds": "better", "fails": "worse", "within noise": "same within noise",
            "one seed": "not measurable with one seed"}


def mean_std(values) -> tuple[float, float]:
    """Mean and (sample) standard deviation; the deviation is 0 for one value."""
    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    return v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)


def binomial_se(percent: float, n: int) -> float:
    """Standard error (in percentage points) of an error rate measured on n independent images."""
    p = min(max(percent / 100.0, 0.0), 1.0)
    return 100.0 * (p * (1.0 - p) / max(n, 1)) ** 0.5


def compare(a: list[float], b: list[float], n: int | None = None) -> dict:
    """Is the mean of ``a`` lower than the mean of ``b``?  One value per seed in each list.

    The standard error of each mean combines the seed-to-seed spread with, for rates in % measured on
    ``n`` images each, the binomial error of one measurement: se^2 = p(1-p)/(n S) + std^2/S over S seeds
    (``n=None``: the seed spread alone, for quantities that are not rates).  ``z = (mean b - mean a) / se``;
    the verdict is "holds" for z >= 2, "fails" for z <= -2, else "within noise".  Without ``n``, a side with one
    value has no error estimate: the verdict is then "one seed" (z is NaN), never a difference of infinite z."""
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    if n is None and min(len(a), len(b)) < 2:
        return {"a": ma, "b": mb, "diff": mb - ma, "se": float("nan"), "z": float("nan"), "verdict": "one seed"}
    ba = binomial_se(ma, n) ** 2 if n is not None else 0.0
    bb = binomial_se(mb, n) ** 2 if n is not None else 0.0
    se = ((ba + sa ** 2) / len(a) + (bb + sb ** 2) / len(b)) ** 0.5
    z = (mb - ma) / se if se > 0 else (0.0 if ma == mb else float("inf") * (1 if mb > ma else -1))
    verdict = "holds" if z >= 2 else ("fails" if z <= -2 else "within noise")
    return {"a": ma, "b": mb, "diff": mb - ma, "se": se, "z": z, "verdict": verdict}


def relative(a: list[float], b: list[float], n: int | None = None) -> str:
    """``compare``'s verdict as better / worse / same within noise (lower values are better)."""
    return RELATIVE[compare(a, b, n)["verdict"]]


def mean_std_text(values, fmt: str = "{:.2f}") -> str:
    """``mean ± std`` over the values (``-`` for none, the value alone for one)."""
    if not values:
        return "-"
    m, s = mean_std(values)
    return (fmt.format(m) + " ± " + fmt.format(s)) if len(values) > 1 else fmt.format(m)
