"""Rejecting abnormal inputs with class-conditional Gaussians (docs/SPEC.md section 8).

:class:`LikelihoodDetector` holds K Gaussians over D-dimensional features -- an L-GM head's own
(:meth:`~LikelihoodDetector.from_head`) or fitted post hoc to any backbone's features
(:meth:`~LikelihoodDetector.fit`, the Mahalanobis detector of Lee et al. 2018 with ``covariance="tied"``)
-- a score (higher = more normal) and a threshold set from clean data at a chosen false-rejection
rate::

    det = LikelihoodDetector.from_head(head).calibrate(clean_features, fpr=0.05)
    mask = det.reject(features)                     # True = rejected

Which way each number points: ``score`` (a log-density) is higher for more normal inputs;
:meth:`~LikelihoodDetector.outlier_score` is its negation, pytorch-ood's convention (higher = more
abnormal); ``fpr`` is the fraction of *clean* inputs rejected (false rejections, clean = positive), not
OpenOOD's / pytorch-ood's "FPR at 95% TPR" (abnormal inputs accepted, abnormal = positive).
:class:`lgm_ext.RejectingClassifier` bundles a network, its head and a calibrated detector as one
exportable module.

Every distance goes through the fused operators (:func:`lgm_ext.lgm_log_likelihood`,
:func:`lgm_ext.lgm_logits`): diagonal and identity covariances directly, the tied full covariance
on whitened features.  No (N, K, D) tensor is formed; rows are scored in chunks of at most
``2**22 / max(K, D)``.
"""
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

__all__ = ["COVARIANCES", "SCORES", "LikelihoodDetector", "calibrated_threshold", "check_fpr"]

COVARIANCES = ("tied", "diag", "identity")
SCORES = ("likelihood", "mixture", "max_posterior")
_FORMAT = "lgm_ext.LikelihoodDetector/1"
_STATE_KEYS = ("format", "covariance", "score", "impl", "means", "log_var", "covariance_matrix", "threshold", "fpr",
               "calibration_size")
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
    lse = torch.logsumexp(logits, 1)
    if kind == "mixture":
        return lse - (math.log(k) + 0.5 * d * _LOG_2PI + half_logdet)
    return logits.max(1).values - lse  # max_posterior: the constants cancel


def _score_rows(x: Tensor, kind: str, params_of, half_logdet: float, impl: str) -> Tensor:
    """Scores (or ``kind="predict"``: classes) of the rows of a checked (N, D) ``x``, in float32 (float64
    for float64) without autocast, in chunks of rows; ``params_of(device, dtype)`` gives the parameters."""
    x = x.to(_compute_dtype(x.dtype))
    params = params_of(x.device, x.dtype)
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


class LikelihoodDetector:
    """K Gaussians over features, a score (higher = more normal) and a rejection threshold.

    Construct with :meth:`from_head`, :meth:`fit` or :meth:`from_state_dict` (or directly from the
    Gaussians: ``means`` (K, D) with ``log_var`` (K, D) for diagonal covariances, ``covariance_matrix``
    (D, D) for one tied full covariance, or neither for identity).  The parameters are stored in
    float64 on the device of ``means``; :meth:`to` moves them.  ``det.fit(features, labels)`` on an
    existing detector refits it in place and returns it (scikit-learn's convention);
    ``LikelihoodDetector.fit(features, labels)`` builds a new one.

    Directions: :meth:`score` is higher for more normal inputs (a log-density, in nats);
    :meth:`outlier_score` ``= -score`` is higher for more abnormal ones (pytorch-ood's and OpenOOD's
    convention); :meth:`relative_to_threshold` ``= score - threshold`` is >= 0 exactly for accepted inputs.
    :meth:`calibrate`'s ``fpr`` is the fraction of clean inputs rejected (false rejections; clean inputs
    are the positives), whereas the "FPR@95TPR" of OpenOOD and pytorch-ood counts abnormal inputs
    accepted (abnormal inputs are the positives there).

    Args (construction from the Gaussians):
        means: (K, D) floating class means.
        log_var: (K, D) log of diagonal covariances, or None.
        covariance_matrix: (D, D) symmetric positive-definite tied covariance, or None.
        score: the score kind (below).
        impl: the operators' implementation selector (:data:`lgm_ext.IMPLS`).
        threshold: a finite threshold, or None (uncalibrated).

    ``score`` (the kind, fixed at construction; :meth:`with_score` makes a detector of another kind):

    - ``"likelihood"`` (default): ``log N(x; mu_yhat, Sigma_yhat)``, the log-density of the predicted
      class ``yhat = argmax_k log N(x; mu_k, Sigma_k)`` with its log-det (SPEC section 1; for a head's
      Gaussians the number :func:`lgm_ext.lgm_log_likelihood` gives);
    - ``"mixture"``: ``log (1/K) sum_k N(x; mu_k, Sigma_k)``, the equal-prior mixture's log-density;
    - ``"max_posterior"``: ``max_k log P(k | x)`` (<= 0), the log of the largest class posterior.
      It does not detect far-away inputs: it is bounded by 0 and does not fall with the distance from
      the data -- with shared (tied or identity) covariances, far from every mean the nearest class's
      posterior tends to 1, the most normal score there is -- so noise far from the features is
      accepted.  Use it to flag inputs between classes, not inputs from elsewhere.

    Scoring: features of any float dtype (bfloat16/float16 are computed in float32, float64 in
    float64; the scores come back in that dtype), on any device -- the parameters are copied to the
    features' device and dtype on first use and cached (:meth:`to` clears the cache).  The score is
    differentiable with respect to the features (the adaptive attack needs that); NaN features give NaN
    scores, and :meth:`reject` rejects them.  ``impl`` is the operators' implementation selector.
    """

    def __init__(self, means: Tensor, *, log_var: Tensor | None = None, covariance_matrix: Tensor | None = None,
                 score: str = "likelihood", impl: str = "auto", threshold: float | None = None) -> None:
        means = _matrix("means", means, None)
        for name, t in (("means", means), ("log_var", log_var), ("covariance_matrix", covariance_matrix)):
            _real(name, t)
        if means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have K >= 1 rows and D >= 1 columns, got {tuple(means.shape)}")
        _finite("means", means)
        self.score_name = _choice("score", score, SCORES)
        self.impl = _choice("impl", impl, IMPLS)
        if log_var is not None and covariance_matrix is not None:
            raise ValueError("give log_var (diagonal covariances) or covariance_matrix (tied), not both")
        self.num_classes, self.feat_dim = int(means.shape[0]), int(means.shape[1])
        f64 = {"dtype": torch.float64, "device": means.device}
        self.means = means.detach().to(**f64).clone()
        self.log_var = self.covariance_matrix = None
        if log_var is not None:
            if not isinstance(log_var, Tensor) or not log_var.is_floating_point():
                raise TypeError("log_var must be a floating-point tensor")
            if log_var.shape != means.shape:
                raise ValueError(f"log_var must have the shape of means {tuple(means.shape)}, "
                                 f"got {tuple(log_var.shape)}")
            _finite("log_var", log_var)
            self.log_var = log_var.detach().to(**f64).clone()
        if covariance_matrix is not None:
            self.covariance_matrix = self._check_covariance(covariance_matrix).to(**f64).clone()
        self.covariance = "tied" if covariance_matrix is not None else "diag" if log_var is not None else "identity"
        self._derive()
        self.fpr: float | None = None
        self.calibration_size: int | None = None
        self._threshold: float | None = None
        self.threshold = threshold

    # ------------------------------------------------------------------ construction
    def _check_covariance(self, cov) -> Tensor:
        d = self.feat_dim
        if not isinstance(cov, Tensor) or not cov.is_floating_point():
            raise TypeError("covariance_matrix must be a floating-point tensor")
        if cov.shape != (d, d):
            raise ValueError(f"covariance_matrix must have shape ({d}, {d}), got {tuple(cov.shape)}")
        _finite("covariance_matrix", cov)
        c = cov.detach().to(torch.float64)
        if not torch.allclose(c, c.T, rtol=1e-10, atol=0.0):
            raise ValueError("covariance_matrix must be symmetric")
        return cov.detach()

    def _derive(self) -> None:
        """Quantities the tied score needs, computed once in float64: the Cholesky factor L of Sigma, the
        whitening matrix W = L^{-1}, the center c (mean of the class means), the whitened means
        (mu - c) W^T and half the log-determinant, sum_j log L_jj."""
        self._cache: dict = {}
        self._whiten = self._center = self._white_means = None
        self._half_logdet = 0.0
        if self.covariance_matrix is None:
            return
        chol, info = torch.linalg.cholesky_ex(self.covariance_matrix)
        if int(info) != 0:
            raise ValueError("covariance_matrix must be positive definite (its Cholesky factorization failed); "
                             "fit with ridge > 0")
        eye = torch.eye(self.feat_dim, dtype=torch.float64, device=chol.device)
        self._whiten = torch.linalg.solve_triangular(chol, eye, upper=False)
        self._center = self.means.mean(0)
        self._white_means = (self.means - self._center) @ self._whiten.T
        self._half_logdet = float(torch.log(torch.diagonal(chol)).sum())

    @classmethod
    def from_head(cls, head, *, score: str = "likelihood", impl: str | None = None) -> LikelihoodDetector:
        """The Gaussians of an L-GM head: its ``means`` and clamped log-variances (``clamped_log_var()``
        when the head has it, else ``log_var`` clamped to +-``log_var_bound`` (default 6), as every
        forward of :class:`lgm_ext.LGMLoss` uses them); identity covariance when the head has none.
        ``impl`` defaults to the head's.  The ``"likelihood"`` score then equals
        ``head.log_likelihood(x)`` bit for bit (same operator, same inputs; up to rounding when more
        than one chunk of rows is scored).

        A :class:`lgm_ext.distributed.ShardedLGMLoss` (every rank of its group must call this: it
        communicates): each rank holds the rows ``class_range`` of the means and log-variances, so
        the full parameters are gathered over the head's process group with ``all_gather`` (padded to
        the largest shard).  Cost: every rank receives K x D means and K x D log-variances
        (about 2 K D / W per rank sent) and then holds the full Gaussians in float64 (16 K D bytes,
        plus a copy in the scoring dtype on first use) -- the memory sharding saved; the detector
        then scores unsharded on each rank.  At K = 10^6, D = 128 that is about 2 GiB per rank.

        What is accepted: an :class:`lgm_ext.LGMLoss` (or a subclass, such as the lab's L-GM head) or a
        :class:`~lgm_ext.distributed.ShardedLGMLoss` -- with ``covariance="identity"`` these have no
        log-variances and give an identity-covariance detector -- or any other object exposing both
        ``means`` (K, D) and ``log_var`` (K, D) tensors.  Anything else raises TypeError: an object
        with ``means`` but no log-variances is not read as identity covariance (fit the features with
        :meth:`fit` instead, e.g. ``covariance="identity"``).

        Args:
            head: the L-GM head (above).
            score: the score kind (:data:`SCORES`).
            impl: the operators' implementation selector; None: the head's ``impl``.

        Returns:
            A new, uncalibrated detector.
        """
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
        if impl is None:
            impl = getattr(head, "impl", "auto")
            impl = impl if impl in IMPLS else "auto"
        return cls(means, log_var=log_var, score=score, impl=impl)

    @_ClassOrInstanceMethod
    def fit(self_or_cls, features: Tensor, labels: Tensor, covariance: str | None = None, *, ridge: float = 1e-6,
            num_classes: int | None = None, score: str | None = None, impl: str | None = None) -> LikelihoodDetector:
        """Fit class Gaussians to labelled features (maximum likelihood, float64 accumulation, in chunks
        of rows on the features' device).

        Two forms: ``LikelihoodDetector.fit(features, labels, ...)`` builds a new detector (defaults
        ``covariance="tied"``, ``score="likelihood"``, ``impl="auto"``); ``det.fit(features, labels, ...)``
        refits ``det`` in place and returns it (scikit-learn's convention), keeping its own covariance
        kind, score kind and impl unless given.  A refitted detector is uncalibrated (its threshold, fpr
        and calibration size are cleared: they belonged to the old Gaussians); a fit that raises leaves
        ``det`` unchanged.

        Args:
            features: (N, D) floating features, finite.
            labels: (N,) integer class labels in [0, num_classes).
            covariance: ``"tied"``, ``"diag"`` or ``"identity"`` (below); None: the default above.
            ridge: the relative ridge (>= 0, finite).
            num_classes: K; None: ``labels.max() + 1``.
            score: the score kind (:data:`SCORES`); None: the default above.
            impl: the operators' implementation selector; None: the default above.

        Returns:
            The fitted detector: a new one (class form) or ``det`` itself (instance form).

        ``mu_k`` = mean of class k's features.  With ``v = tr(S) / D`` the mean within-class variance
        (S the pooled covariance below):

        - ``"tied"`` (Lee et al. 2018): one shared ``Sigma = S + ridge * v * I``,
          ``S = (1/N) sum_n (x_n - mu_{y_n})(x_n - mu_{y_n})^T``;
        - ``"diag"``: per class ``exp(log_var[k, j]) = (1/N_k) sum_{n: y_n = k} (x_nj - mu_kj)^2 + ridge * v``;
        - ``"identity"``: the means only, unit covariance.

        The ridge is relative to the features' scale (the fitted detector's scores do not depend on the
        units of the features); it keeps Sigma invertible when a direction has no within-class variance
        (a class with one sample, a dead unit).  ``num_classes`` defaults to ``labels.max() + 1``;
        every class must have a sample.
        """
        if isinstance(self_or_cls, type):
            return self_or_cls._fitted(features, labels, "tied" if covariance is None else covariance, ridge=ridge,
                                       num_classes=num_classes, score="likelihood" if score is None else score,
                                       impl="auto" if impl is None else impl)
        det = self_or_cls
        new = type(det)._fitted(features, labels, det.covariance if covariance is None else covariance, ridge=ridge,
                                num_classes=num_classes, score=det.score_name if score is None else score,
                                impl=det.impl if impl is None else impl)
        det.__dict__.update(new.__dict__)
        return det

    @classmethod
    def _fitted(cls, features: Tensor, labels: Tensor, covariance: str, *, ridge: float, num_classes: int | None,
                score: str, impl: str) -> LikelihoodDetector:
        """The new detector :meth:`fit` describes."""
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
            return cls(means, score=score, impl=impl)
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
            return cls(means, covariance_matrix=cov, score=score, impl=impl)
        var = acc / counts.to(torch.float64)[:, None] + r * v
        if not bool((var > 0).all()):
            raise ValueError("a class has a feature without variance and ridge = 0: fit with ridge > 0")
        return cls(means, log_var=var.log(), score=score, impl=impl)

    def with_score(self, score: str) -> LikelihoodDetector:
        """The same Gaussians with another score kind (uncalibrated: its threshold is unset)."""
        return LikelihoodDetector(self.means, log_var=self.log_var, covariance_matrix=self.covariance_matrix,
                                  score=score, impl=self.impl)

    # ------------------------------------------------------------------ threshold
    @property
    def threshold(self) -> float | None:
        """Inputs with ``score < threshold`` are rejected (None: not calibrated).  Set it to a finite number
        (or None); NaN and +-inf are refused with ValueError (an infinite threshold accepts or rejects
        everything, silently)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value) -> None:
        self._threshold = None if value is None else _check_threshold("threshold", value)

    def calibrate(self, clean_features: Tensor, fpr: float = 0.05) -> LikelihoodDetector:
        """Set the threshold so that a fraction ``fpr`` of ``clean_features`` is rejected; returns self.

        Convention: with the N clean scores sorted ascending, ``s_(1) <= ... <= s_(N)``, and
        ``m = floor(fpr * N)`` (``fpr * N`` rounded down, a relative 1e-12 of floating error
        forgiven), the threshold is ``s_(m+1)``, the (m+1)-th smallest score.  Inputs scoring strictly
        below it are rejected, so on the calibration set exactly m inputs (a rate in
        ``(fpr - 1/N, fpr]``) are rejected when the scores are distinct, fewer when ``s_(m) = s_(m+1)``
        -- never more than ``fpr``.  ``fpr < 1/N`` rejects none of them.

        ``fpr`` is the false-*rejection* rate: the fraction of clean inputs rejected, clean inputs being the
        positives.  It is not the "FPR" of OpenOOD's and pytorch-ood's "FPR@95TPR", which is the fraction
        of abnormal inputs *accepted* (abnormal = positive) while 95% of clean ones are.

        Args:
            clean_features: (N, D) features of clean inputs, finite, N >= 1.
            fpr: a number in (0, 1), the fraction of them to reject.

        Returns:
            self, with ``threshold``, ``fpr`` and ``calibration_size`` set.
        """
        p = check_fpr(fpr)
        x = _matrix("clean_features", clean_features, self.feat_dim)
        _real("clean_features", x)
        n = x.shape[0]
        if n == 0:
            raise ValueError("clean_features must have at least one row")
        _finite("clean_features", x)
        with torch.no_grad():
            s = self.score(x)
        self.threshold = calibrated_threshold(s, p)
        self.fpr, self.calibration_size = p, n
        return self

    # ------------------------------------------------------------------ scoring
    def _params(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        if key not in self._cache:
            cast = {"device": device, "dtype": dtype}
            if self.covariance == "tied":
                self._cache[key] = (self._white_means.to(**cast), None, self._whiten.T.to(**cast).contiguous(),
                                    self._center.to(**cast))
            else:
                self._cache[key] = (self.means.to(**cast), None if self.log_var is None else self.log_var.to(**cast),
                                    None, None)
        return self._cache[key]

    def _apply(self, features: Tensor, kind: str) -> Tensor:
        x = _matrix("features", features, self.feat_dim)
        return _score_rows(x, kind, self._params, self._half_logdet, self.impl)

    def score(self, features: Tensor) -> Tensor:
        """Scores of the detector's kind: higher = more normal.

        A log-density in nats (``"likelihood"``, ``"mixture"``) or a log-posterior (``"max_posterior"``,
        <= 0).  Absolute values depend on D and on the covariances: read them against the threshold
        (:meth:`relative_to_threshold`) or by their ranking, not by their size.  Needs no threshold.

        Args:
            features: (N, D) floating features (NaN rows give NaN; meta features give meta scores).

        Returns:
            (N,) scores, float32 (float64 for float64 features), differentiable with respect to ``features``.
        """
        return self._apply(features, self.score_name)

    def outlier_score(self, features: Tensor) -> Tensor:
        """``-score(features)``: higher = more abnormal, the sign convention of pytorch-ood's and OpenOOD's
        detectors (their ``predict`` returns outlier scores), for users and metrics written for them.

        Args:
            features: (N, D) floating features.

        Returns:
            (N,) outlier scores (dtype and gradient as :meth:`score`); an input is rejected iff
            ``not outlier_score <= -threshold``.
        """
        return -self.score(features)

    def relative_to_threshold(self, features: Tensor) -> Tensor:
        """``score(features) - threshold``: >= 0 for accepted inputs, < 0 (or NaN) for rejected ones, in the
        score's units (nats for the log-densities).

        Why: a log-density sums over the D feature dimensions, so absolute scores are large and depend on D
        and on the covariances, while what decides is the distance to the threshold.  With an L-GM head's
        own Gaussians (:meth:`from_head`) the learned variances are much wider than the features' spread
        around the means (the classification loss, not the likelihood, shapes them), so clean and abnormal
        scores can sit within about one nat of each other around a large negative number -- still
        separated (the ranking is what rejects), but only readable relative to the threshold.

        Args:
            features: (N, D) floating features.

        Returns:
            (N,) ``score - threshold`` (dtype as :meth:`score`).  Needs a threshold.
        """
        if self._threshold is None:
            raise ValueError("threshold is not set: call calibrate(clean_features, fpr) first")
        return self.score(features) - self._threshold

    def predict(self, features: Tensor) -> Tensor:
        """(N,) the most likely class under the Gaussians (argmax_k log N(x; mu_k, Sigma_k))."""
        with torch.no_grad():
            return self._apply(features, "predict")

    def reject(self, features: Tensor) -> Tensor:
        """Which inputs the detector rejects.  Needs :meth:`calibrate` (or a threshold set by hand) first.

        Args:
            features: (N, D) floating features.

        Returns:
            (N,) bool, True (rejected) where ``not score >= threshold`` (so a NaN score is rejected).
        """
        if self._threshold is None:
            raise ValueError("threshold is not set: call calibrate(clean_features, fpr) first "
                             "(score() works without a threshold)")
        with torch.no_grad():
            return ~(self.score(features) >= self._threshold)

    # ------------------------------------------------------------------ device and state
    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, device) -> LikelihoodDetector:
        """Move the stored parameters to ``device`` (in place; returns self).  Scoring works on any
        device without it (the parameters are copied to the features' device and cached).  The meta
        device is refused (ValueError): the parameters need values."""
        if torch.device(device).type == "meta":
            raise ValueError("device 'meta' is refused: a detector's parameters need values (score() accepts "
                             "meta features and gives meta scores, for shape inference)")
        self.means = self.means.to(device)
        self.log_var = None if self.log_var is None else self.log_var.to(device)
        if self.covariance_matrix is not None:
            self.covariance_matrix = self.covariance_matrix.to(device)
            self._whiten, self._center = self._whiten.to(device), self._center.to(device)
            self._white_means = self._white_means.to(device)
        self._cache = {}
        return self

    def state_dict(self) -> dict:
        """Plain tensors (float64), numbers and strings: ``torch.save``-able and loadable with
        ``torch.load(..., weights_only=True)``.  Absent entries (no log_var, no threshold) are left out."""
        sd = {"format": _FORMAT, "covariance": self.covariance, "score": self.score_name, "impl": self.impl,
              "means": self.means.clone()}
        if self.log_var is not None:
            sd["log_var"] = self.log_var.clone()
        if self.covariance_matrix is not None:
            sd["covariance_matrix"] = self.covariance_matrix.clone()
        if self._threshold is not None:
            sd["threshold"] = self._threshold
        if self.fpr is not None:
            sd["fpr"], sd["calibration_size"] = self.fpr, self.calibration_size
        return sd

    @classmethod
    def from_state_dict(cls, state_dict: dict) -> LikelihoodDetector:
        """The detector :meth:`state_dict` describes (an exact round trip: the same tensors, threshold
        and scores).

        Every entry is checked: a missing or unknown key, a wrong type (TypeError), a wrong shape, a
        threshold that is not finite, an fpr outside (0, 1), a calibration size < 1, or entries that disagree
        (log-variances or a covariance matrix whose class count or dimension is not the means') raise an
        error naming the key.

        Args:
            state_dict: a dict written by :meth:`state_dict` (e.g. ``torch.load(path, weights_only=True)``).

        Returns:
            A new detector.
        """
        sd = state_dict
        if not isinstance(sd, Mapping):
            raise TypeError(f"state_dict must be a dict (LikelihoodDetector.state_dict()), got {type(sd).__name__}")
        if sd.get("format") != _FORMAT:
            raise ValueError(f"state_dict is not a LikelihoodDetector state: state_dict['format'] must be "
                             f"{_FORMAT!r}, got {sd.get('format')!r}")
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
        if "log_var" in sd:
            lv = sd["log_var"]
            if not isinstance(lv, Tensor) or not lv.is_floating_point():
                raise TypeError(f"state_dict['log_var'] must be a floating-point tensor, got "
                                f"{getattr(lv, 'dtype', type(lv).__name__)}")
            if lv.shape != (k, d):
                raise ValueError(f"state_dict['log_var'] must have the shape of state_dict['means'] ({k}, {d}), "
                                 f"got {tuple(lv.shape)}")
        if "covariance_matrix" in sd:
            cov = sd["covariance_matrix"]
            if not isinstance(cov, Tensor) or not cov.is_floating_point():
                raise TypeError(f"state_dict['covariance_matrix'] must be a floating-point tensor, got "
                                f"{getattr(cov, 'dtype', type(cov).__name__)}")
            if cov.shape != (d, d):
                raise ValueError(f"state_dict['covariance_matrix'] must have shape ({d}, {d}) (D of "
                                 f"state_dict['means']), got {tuple(cov.shape)}")
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
        det = cls(means, log_var=sd.get("log_var"), covariance_matrix=sd.get("covariance_matrix"),
                  score=sd["score"], impl=sd["impl"], threshold=threshold)
        det.fpr, det.calibration_size = fpr, size
        return det

    def __repr__(self) -> str:
        return (f"LikelihoodDetector(num_classes={self.num_classes}, feat_dim={self.feat_dim}, "
                f"covariance={self.covariance!r}, score={self.score_name!r}, threshold={self._threshold}, "
                f"fpr={self.fpr})")
