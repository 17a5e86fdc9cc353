"""Rejecting abnormal inputs with class-conditional Gaussians (docs/SPEC.md section 8).

:class:`LikelihoodDetector` holds K Gaussians over D-dimensional features -- an L-GM head's own
(:meth:`~LikelihoodDetector.from_head`) or fitted post hoc to any backbone's features
(:meth:`~LikelihoodDetector.fit`, the Mahalanobis detector of Lee et al. 2018 with ``covariance="tied"``)
-- a score (higher = more normal) and a threshold set from clean data at a chosen false-rejection
rate::

    det = LikelihoodDetector.from_head(head).calibrate(clean_features, fpr=0.05)
    mask = det.reject(features)                     # True = rejected

Every distance goes through the fused operators (:func:`lgm_ext.lgm_log_likelihood`,
:func:`lgm_ext.lgm_logits`): diagonal and identity covariances directly, the tied full covariance
on whitened features.  No (N, K, D) tensor is formed; rows are scored in chunks of at most
``2**22 / max(K, D)``.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from ._ops import IMPLS
from .functional import _scalar, check_labels, lgm_log_likelihood, lgm_logits

__all__ = ["COVARIANCES", "SCORES", "LikelihoodDetector"]

COVARIANCES = ("tied", "diag", "identity")
SCORES = ("likelihood", "mixture", "max_posterior")
_FORMAT = "lgm_ext.LikelihoodDetector/1"
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
    float64 on the device of ``means``; :meth:`to` moves them.

    ``score`` (the kind, fixed at construction; :meth:`with_score` makes a detector of another kind):

    - ``"likelihood"`` (default): ``log N(x; mu_yhat, Sigma_yhat)``, the log-density of the predicted
      class ``yhat = argmax_k log N(x; mu_k, Sigma_k)`` with its log-det (SPEC section 1; for a head's
      Gaussians the number :func:`lgm_ext.lgm_log_likelihood` gives);
    - ``"mixture"``: ``log (1/K) sum_k N(x; mu_k, Sigma_k)``, the equal-prior mixture's log-density;
    - ``"max_posterior"``: ``max_k log P(k | x)`` (<= 0), the log of the largest class posterior.

    Scoring: features of any float dtype (bfloat16/float16 are computed in float32, float64 in
    float64; the scores come back in that dtype), on any device -- the parameters are copied to the
    features' device and dtype on first use and cached (:meth:`to` clears the cache).  The score is
    differentiable with respect to the features (the adaptive attack needs that); NaN features give NaN
    scores, and :meth:`reject` rejects them.  ``impl`` is the operators' implementation selector.
    """

    def __init__(self, means: Tensor, *, log_var: Tensor | None = None, covariance_matrix: Tensor | None = None,
                 score: str = "likelihood", impl: str = "auto", threshold: float | None = None) -> None:
        means = _matrix("means", means, None)
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
        """
        if not hasattr(head, "means"):
            raise TypeError(f"head must be an L-GM head with means (LGMLoss or ShardedLGMLoss), got "
                            f"{type(head).__name__}")
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

    @classmethod
    def fit(cls, features: Tensor, labels: Tensor, covariance: str = "tied", *, ridge: float = 1e-6,
            num_classes: int | None = None, score: str = "likelihood", impl: str = "auto") -> LikelihoodDetector:
        """Fit class Gaussians to labelled features (maximum likelihood, float64 accumulation, in chunks
        of rows on the features' device).

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
        covariance = _choice("covariance", covariance, COVARIANCES)
        x = _matrix("features", features, None).detach()
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
        """Inputs with ``score < threshold`` are rejected (None: not calibrated)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value) -> None:
        if value is None:
            self._threshold = None
            return
        t = _scalar("threshold", value)
        if math.isnan(t):
            raise ValueError("threshold must not be NaN")
        self._threshold = t

    def calibrate(self, clean_features: Tensor, fpr: float = 0.05) -> LikelihoodDetector:
        """Set the threshold so that a fraction ``fpr`` of ``clean_features`` is rejected; returns self.

        Convention: with the N clean scores sorted ascending, ``s_(1) <= ... <= s_(N)``, and
        ``m = floor(fpr * N)`` (``fpr * N`` rounded down, a relative 1e-12 of floating error
        forgiven), the threshold is ``s_(m+1)``, the (m+1)-th smallest score.  Inputs scoring strictly
        below it are rejected, so on the calibration set exactly m inputs (a rate in
        ``(fpr - 1/N, fpr]``) are rejected when the scores are distinct, fewer when ``s_(m) = s_(m+1)``
        -- never more than ``fpr``.  ``fpr < 1/N`` rejects none of them.
        """
        p = _scalar("fpr", fpr)
        if not 0.0 < p < 1.0:
            raise ValueError(f"fpr must lie in (0, 1), got {p}")
        x = _matrix("clean_features", clean_features, self.feat_dim)
        n = x.shape[0]
        if n == 0:
            raise ValueError("clean_features must have at least one row")
        _finite("clean_features", x)
        with torch.no_grad():
            s = self.score(x)
        m = min(n - 1, math.floor(p * n * (1.0 + 1e-12)))
        self.threshold = float(torch.sort(s).values[m])
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

    def _chunk(self, x: Tensor, kind: str) -> Tensor:
        mu, log_var, whiten_t, center = self._params(x.device, x.dtype)
        if whiten_t is not None:  # tied: (x - mu)^T Sigma^{-1} (x - mu) = ||W(x - c) - W(mu - c)||^2
            x = (x - center) @ whiten_t
        if kind == "likelihood":
            return lgm_log_likelihood(x, mu, log_var, impl=self.impl) - self._half_logdet
        logits = lgm_logits(x, mu, log_var, impl=self.impl)  # -d - 0.5 sum log_var: log N + 0.5 D log 2pi (+ tied)
        if kind == "predict":
            return logits.argmax(1)
        lse = torch.logsumexp(logits, 1)
        if kind == "mixture":
            return lse - (math.log(self.num_classes) + 0.5 * self.feat_dim * _LOG_2PI + self._half_logdet)
        return logits.max(1).values - lse  # max_posterior: the constants cancel

    def _apply(self, features: Tensor, kind: str) -> Tensor:
        x = _matrix("features", features, self.feat_dim)
        x = x.to(_compute_dtype(x.dtype))
        rows = max(1, _CHUNK_ELEMS // max(self.num_classes, self.feat_dim))
        if x.shape[0] == 0:  # the operators need rows; an empty result still depends on the features
            return x.new_zeros(0, dtype=torch.long) if kind == "predict" else x.sum(1)
        with _no_autocast(x.device.type):
            if x.shape[0] <= rows:
                return self._chunk(x, kind)
            return torch.cat([self._chunk(x[i:i + rows], kind) for i in range(0, x.shape[0], rows)])

    def score(self, features: Tensor) -> Tensor:
        """(N,) scores of the detector's kind, higher = more normal (float32, float64 for float64
        features); differentiable with respect to ``features``.  Needs no threshold."""
        return self._apply(features, self.score_name)

    def predict(self, features: Tensor) -> Tensor:
        """(N,) the most likely class under the Gaussians (argmax_k log N(x; mu_k, Sigma_k))."""
        with torch.no_grad():
            return self._apply(features, "predict")

    def reject(self, features: Tensor) -> Tensor:
        """(N,) bool, True where ``not score >= threshold`` (so a NaN score is rejected).  Needs
        :meth:`calibrate` (or a threshold set by hand) first."""
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
        device without it (the parameters are copied to the features' device and cached)."""
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
        and scores)."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != _FORMAT:
            raise ValueError(f"state_dict is not a LikelihoodDetector state (format {_FORMAT!r} expected)")
        kind = _choice("state_dict['covariance']", state_dict.get("covariance"), COVARIANCES)
        expected = {"tied": "covariance_matrix", "diag": "log_var", "identity": None}[kind]
        for key in ("log_var", "covariance_matrix"):
            if (key in state_dict) != (key == expected):
                raise ValueError(f"state_dict: covariance {kind!r} {'needs' if key == expected else 'has no'} {key!r}")
        det = cls(state_dict["means"], log_var=state_dict.get("log_var"),
                  covariance_matrix=state_dict.get("covariance_matrix"), score=state_dict.get("score"),
                  impl=state_dict.get("impl"), threshold=state_dict.get("threshold"))
        if "fpr" in state_dict:
            det.fpr, det.calibration_size = float(state_dict["fpr"]), int(state_dict["calibration_size"])
        return det

    def __repr__(self) -> str:
        return (f"LikelihoodDetector(num_classes={self.num_classes}, feat_dim={self.feat_dim}, "
                f"covariance={self.covariance!r}, score={self.score_name!r}, threshold={self._threshold}, "
                f"fpr={self.fpr})")
