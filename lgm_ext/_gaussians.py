"""The parts of :class:`lgm_ext.LikelihoodDetector` that are not the class: input and state checks, the
threshold convention (:func:`calibrated_threshold`), the maximum-likelihood fit and the chunked scoring
through the fused operators (docs/SPEC.md section 8)."""
from __future__ import annotations

import contextlib
import functools
import math
import types
from collections.abc import Mapping

import torch
from torch import Tensor

from ._ops import IMPLS
from .functional import _scalar, check_labels, lgm_log_likelihood, lgm_logits

__all__ = ["COVARIANCES", "SCORES", "calibrated_threshold", "check_fpr"]

COVARIANCES = ("tied", "diag", "identity")
SCORES = ("likelihood", "mixture", "max_posterior", "distance")
FORMAT = "lgm_ext.LikelihoodDetector/1"
_STATE_KEYS = ("format", "covariance", "score", "impl", "means", "log_var", "covariance_matrix", "threshold", "fpr",
               "calibration_size", "calibration_min", "calibration_max", "normalize", "given")
_CHUNK_ELEMS = 1 << 22  # rows per chunk = _CHUNK_ELEMS // max(K, D): bounds the (rows, K) logits
_LOG_2PI = math.log(2.0 * math.pi)


def _choice(name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def _matrix(name: str, x, d: int | None) -> Tensor:
    """A floating (N, d) tensor, else TypeError/ValueError naming ``name``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2 or (d is not None and x.shape[1] != d):
        raise ValueError(f"{name} must have shape (N, {'D' if d is None else d}), got {tuple(x.shape)}")
    return x


def _finite(name: str, x: Tensor) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _real(name: str, x) -> None:
    """Refuse meta tensors where values are needed (fitting, calibrating, a detector's parameters)."""
    if isinstance(x, Tensor) and x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a tensor without values): fitting, calibrating and a "
                         f"detector's parameters need real data on a device such as cpu or cuda; only score(), "
                         f"predict() and reject() accept meta features (shape inference: meta results)")


def check_fpr(fpr) -> float:
    """``fpr`` as a float in the open interval (0, 1), else TypeError (not a real number) or ValueError.

    Args:
        fpr: the false-rejection rate, the fraction of clean inputs to reject.

    Returns:
        ``float(fpr)``.
    """
    try:
        p = _scalar("fpr", fpr)
    except TypeError:
        raise TypeError(f"fpr must be a number in (0, 1), got {fpr!r}") from None
    if not 0.0 < p < 1.0:
        raise ValueError(f"fpr must be a number in (0, 1), got {p}")
    return p


def calibrated_threshold(scores: Tensor, fpr: float) -> float:
    """The threshold that rejects a fraction ``fpr`` of ``scores`` (higher = more normal), by the convention
    of :meth:`LikelihoodDetector.calibrate` (docs/SPEC.md section 8): with the N scores sorted ascending and
    ``m = floor(fpr N)``, the (m+1)-th smallest; ``score < threshold`` is rejected, so at most a fraction
    ``fpr`` of ``scores`` is.

    Args:
        scores: (N,) finite scores of clean inputs, N >= 1 (higher = more normal).
        fpr: the false-rejection rate in (0, 1): the fraction of clean inputs to reject.

    Returns:
        The threshold, a float (one of ``scores``).
    """
    p = check_fpr(fpr)
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.is_complex() \
            or not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"scores must be a (N,) real tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    _real("scores", scores)
    n = scores.shape[0]
    if n == 0:
        raise ValueError("scores must have at least one element")
    s = scores.detach()
    _finite("scores", s)
    m = min(n - 1, math.floor(p * n * (1.0 + 1e-12)))
    return float(torch.sort(s).values[m])


def _check_threshold(name: str, value) -> float:
    """A finite threshold (a real number or a one-element tensor), else TypeError/ValueError naming ``name``."""
    t = _scalar(name, value)
    if not math.isfinite(t):
        raise ValueError(f"{name} must be a finite number, got {t} (an infinite threshold accepts or rejects "
                         f"every input; NaN compares false)")
    return t


def _score_chunk(x: Tensor, kind: str, params, half_logdet: float, impl: str) -> Tensor:
    """One chunk of rows: ``params = (mu, log_var, whiten_t, center)`` in ``x``'s dtype and device (tied:
    whitened means, the transposed whitening matrix and the center; else the means and log-variances)."""
    mu, log_var, whiten_t, center = params
    k, d = mu.shape[0], x.shape[1]
    if whiten_t is not None:  # tied: (x - mu)^T Sigma^{-1} (x - mu) = ||W(x - c) - W(mu - c)||^2
        x = (x - center) @ whiten_t
    if kind == "likelihood":
        return lgm_log_likelihood(x, mu, log_var, impl=impl) - half_logdet
    logits = lgm_logits(x, mu, log_var, impl=impl)  # -d - 0.5 sum log_var: log N + 0.5 D log 2pi (+ tied)
    if kind == "predict":
        return logits.argmax(1)
    if kind == "distance":  # -d of the predicted class: its log-density without the log-det and constants
        top, best = logits.max(1)
        return top if log_var is None else top + 0.5 * log_var.sum(1).index_select(0, best)
    lse = torch.logsumexp(logits, 1)
    if kind == "mixture":
        return lse - (math.log(k) + 0.5 * d * _LOG_2PI + half_logdet)
    return logits.max(1).values - lse  # max_posterior: the constants cancel


def _score_rows(x: Tensor, kind: str, params_of, half_logdet: float, impl: str) -> Tensor:
    """Scores (or ``kind="predict"``: classes) of the rows of a checked (N, D) ``x``, in float32 (float64
    for float64) without autocast, in chunks of rows; ``params_of(device, dtype)`` gives the parameters."""
    x = x.to(_compute_dtype(x.dtype))
    params = params_of(x.device, x.dtype)
    if torch.compiler.is_compiling():  # traced (torch.export, torch.compile): no branch on the batch size
        with _no_autocast(x.device.type):
            return _score_chunk(x, kind, params, half_logdet, impl)
    rows = max(1, _CHUNK_ELEMS // max(params[0].shape[0], x.shape[1]))
    if x.shape[0] == 0:  # the operators need rows; an empty result still depends on the features
        return x.new_zeros(0, dtype=torch.long) if kind == "predict" else x.sum(1)
    with _no_autocast(x.device.type):
        if x.shape[0] <= rows:
            return _score_chunk(x, kind, params, half_logdet, impl)
        return torch.cat([_score_chunk(x[i:i + rows], kind, params, half_logdet, impl)
                          for i in range(0, x.shape[0], rows)])


class _ClassOrInstanceMethod:
    """A method that receives the class when called on the class and the instance when called on an instance
    (``LikelihoodDetector.fit`` builds a detector, ``det.fit`` refits ``det``)."""

    def __init__(self, func) -> None:
        self.__func__ = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, objtype=None):
        return types.MethodType(self.__func__, objtype if obj is None else obj)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype is scored in float32 (as the operators accumulate)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(device_type: str):
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def fit_gaussians(features: Tensor, labels: Tensor, covariance: str, ridge: float,
                  num_classes: int | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The maximum-likelihood Gaussians of :meth:`lgm_ext.LikelihoodDetector.fit` (float64, in chunks of
    rows): ``(means, log_var or None, covariance_matrix or None)``."""
    covariance = _choice("covariance", covariance, COVARIANCES)
    x = _matrix("features", features, None).detach()
    _real("features", x)
    _real("labels", labels)
    n, d = x.shape
    if n == 0:
        raise ValueError("features must have at least one row")
    r = _scalar("ridge", ridge)
    if not (r >= 0.0 and math.isfinite(r)):
        raise ValueError(f"ridge must be finite and >= 0, got {r}")
    if num_classes is None:
        ok = isinstance(labels, Tensor) and labels.dim() == 1 and labels.numel() > 0 \
            and not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
        num_classes = max(1, int(labels.max()) + 1) if ok else 1  # else check_labels below raises
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    k = int(num_classes)
    check_labels(labels, n, k)
    if labels.device != x.device:
        raise ValueError(f"labels are on {labels.device} but features are on {x.device}")
    _finite("features", x)
    counts = torch.bincount(labels, minlength=k)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"labels: class(es) {empty[:10]} of {k} have no sample")
    f64 = {"dtype": torch.float64, "device": x.device}
    rows = max(1, _CHUNK_ELEMS // max(d, 1))
    sums = torch.zeros(k, d, **f64)
    for i in range(0, n, rows):
        sums.index_add_(0, labels[i:i + rows], x[i:i + rows].to(torch.float64))
    means = sums / counts.to(torch.float64)[:, None]
    if covariance == "identity":
        return means, None, None
    acc = torch.zeros(d, d, **f64) if covariance == "tied" else torch.zeros(k, d, **f64)
    for i in range(0, n, rows):
        y = labels[i:i + rows]
        c = x[i:i + rows].to(torch.float64) - means.index_select(0, y)
        if covariance == "tied":
            acc.addmm_(c.T, c)
        else:
            acc.index_add_(0, y, c * c)
    if covariance == "tied":
        cov = 0.5 * (acc + acc.T) / n  # symmetric to the last bit
        v = float(torch.diagonal(cov).sum()) / d
    else:
        v = float(acc.sum()) / (n * d)
    if not v > 0.0:
        raise ValueError("features have no within-class variance (every sample equals its class mean): "
                         "use covariance='identity'")
    if covariance == "tied":
        cov = cov + (r * v) * torch.eye(d, **f64)
        return means, None, cov
    var = acc / counts.to(torch.float64)[:, None] + r * v
    if not bool((var > 0).all()):
        raise ValueError("a class has a feature without variance and ridge = 0: fit with ridge > 0")
    return means, var.log(), None


def check_state(state_dict) -> dict:
    """The checked entries of a :meth:`lgm_ext.LikelihoodDetector.state_dict`: the constructor's keyword
    arguments (``means``, ``log_var``, ``covariance_matrix``, ``score``, ``impl``, ``threshold``) and
    ``fpr``, ``calibration_size``; TypeError/ValueError naming the key otherwise."""
    sd = state_dict
    if not isinstance(sd, Mapping):
        raise TypeError(f"state_dict must be a dict (LikelihoodDetector.state_dict()), got {type(sd).__name__}")
    if sd.get("format") != FORMAT:
        raise ValueError(f"state_dict is not a LikelihoodDetector state: state_dict['format'] must be "
                         f"{FORMAT!r}, got {sd.get('format')!r}")
    unknown = sorted(map(str, set(sd) - set(_STATE_KEYS)))
    if unknown:
        raise ValueError(f"state_dict has unknown key(s) {unknown} (a LikelihoodDetector state holds "
                         f"{', '.join(_STATE_KEYS)})")
    for key in ("covariance", "score", "impl", "means"):
        if key not in sd:
            raise ValueError(f"state_dict has no {key!r} entry")
    for key, options in (("covariance", COVARIANCES), ("score", SCORES), ("impl", IMPLS)):
        if not isinstance(sd[key], str):
            raise TypeError(f"state_dict[{key!r}] must be a string, got {type(sd[key]).__name__}")
        _choice(f"state_dict[{key!r}]", sd[key], options)
    kind = sd["covariance"]
    means = _matrix("state_dict['means']", sd["means"], None)
    k, d = means.shape
    expected = {"tied": "covariance_matrix", "diag": "log_var", "identity": None}[kind]
    for key in ("log_var", "covariance_matrix"):
        if (key in sd) != (key == expected):
            raise ValueError(f"state_dict: covariance {kind!r} {'needs' if key == expected else 'has no'} {key!r}")
    for key, shape, what in (("log_var", (k, d), f"the shape of state_dict['means'] ({k}, {d})"),
                             ("covariance_matrix", (d, d), f"shape ({d}, {d}) (D of state_dict['means'])")):
        if key not in sd:
            continue
        t = sd[key]
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"state_dict[{key!r}] must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.shape != shape:
            raise ValueError(f"state_dict[{key!r}] must have {what}, got {tuple(t.shape)}")
    threshold = None
    if "threshold" in sd:
        threshold = _check_threshold("state_dict['threshold']", sd["threshold"])
    if ("fpr" in sd) != ("calibration_size" in sd):
        have, lack = ("fpr", "calibration_size") if "fpr" in sd else ("calibration_size", "fpr")
        raise ValueError(f"state_dict has {have!r} but no {lack!r} (a calibrated state holds both)")
    fpr = size = None
    if "fpr" in sd:
        try:
            fpr = check_fpr(sd["fpr"])
        except (TypeError, ValueError) as e:
            raise type(e)(f"state_dict['fpr']: {e}") from None
        size = sd["calibration_size"]
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"state_dict['calibration_size'] must be an int, got {type(size).__name__}")
        if size < 1:
            raise ValueError(f"state_dict['calibration_size'] must be >= 1, got {size}")
    normalize, given = sd.get("normalize", False), sd.get("given", False)
    for key, flag in (("normalize", normalize), ("given", given)):
        if not isinstance(flag, bool):
            raise TypeError(f"state_dict[{key!r}] must be a bool, got {type(flag).__name__}")
    return {"means": means, "log_var": sd.get("log_var"), "covariance_matrix": sd.get("covariance_matrix"),
            "score": sd["score"], "impl": sd["impl"], "threshold": threshold, "fpr": fpr,
            "calibration_size": size, "normalize": normalize,
            "given": given}


def head_gaussians(head) -> tuple[Tensor, Tensor | None]:
    """An L-GM head's means and clamped log-variances, gathered over a sharded head's group (what
    :meth:`lgm_ext.LikelihoodDetector.from_head` documents); TypeError for anything else."""
    from .distributed import ShardedLGMLoss
    from .modules import LGMLoss

    if not isinstance(head, (LGMLoss, ShardedLGMLoss)) and (
            getattr(head, "means", None) is None or getattr(head, "log_var", None) is None):
        raise TypeError(f"head must be an L-GM head (lgm_ext.LGMLoss, lgm_ext.distributed.ShardedLGMLoss) or "
                        f"expose both means and log_var, got {type(head).__name__}; for other features or "
                        f"centers use LikelihoodDetector.fit(features, labels, covariance=...)")
    for name in ("means", "log_var"):
        value = getattr(head, name, None)
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"head.{name} must be a torch.Tensor, got {type(value).__name__}")
    with torch.no_grad():
        means = head.means.detach()
        if callable(getattr(head, "clamped_log_var", None)):
            log_var = head.clamped_log_var()
        else:
            raw = getattr(head, "log_var", None)
            bound = float(getattr(head, "log_var_bound", 6.0))
            log_var = None if raw is None else raw.detach().clamp(-bound, bound)
        log_var = None if log_var is None else log_var.detach()
        if hasattr(head, "class_range") and hasattr(head, "group"):
            from .distributed import gather_rows

            means = gather_rows(means, head.group)
            log_var = None if log_var is None else gather_rows(log_var, head.group)
    return means, log_var
