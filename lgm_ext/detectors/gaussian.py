"""The Gaussian member of the detector family: class-conditional Gaussians (docs/SPEC.md section 8).

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

import torch
from torch import Tensor

from .._gaussians import (
    COVARIANCES,
    FORMAT,
    IMPLS,
    SCORES,
    _choice,
    _ClassOrInstanceMethod,
    _finite,
    _matrix,
    _real,
    _score_rows,
    calibrated_threshold,
    check_fpr,
    check_state,
    fit_gaussians,
    head_gaussians,
)
from .base import Detector, check_device, check_range

__all__ = ["COVARIANCES", "SCORES", "LikelihoodDetector", "calibrated_threshold", "check_fpr", "l2_normalised"]


def l2_normalised(x: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero: norms are clamped at 1e-12), as KNN and
    pytorch-ood normalise features."""
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


class LikelihoodDetector(Detector):
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
    are the positives), not the "FPR@95TPR" of the OOD literature (with clean inputs positive: abnormal
    inputs accepted while 95% of clean ones are; with abnormal inputs positive, as OpenOOD and pytorch-ood
    count it: clean inputs rejected while 95% of abnormal ones are).

    Args (construction from the Gaussians):
        means: (K, D) floating class means.
        log_var: (K, D) log of diagonal covariances, or None.
        covariance_matrix: (D, D) symmetric positive-definite tied covariance, or None.
        score: the score kind (below).
        impl: the operators' implementation selector (:data:`lgm_ext.IMPLS`).
        threshold: a finite threshold, or None (uncalibrated).
        normalize: L2-normalise the features before scoring (the Gaussians are then over unit vectors).

    ``score`` (the kind, fixed at construction; :meth:`with_score` makes a detector of another kind):

    - ``"likelihood"`` (default): ``log N(x; mu_yhat, Sigma_yhat)``, the log-density of the predicted
      class ``yhat = argmax_k log N(x; mu_k, Sigma_k)`` with its log-det (SPEC section 1; for a head's
      Gaussians the number :func:`lgm_ext.lgm_log_likelihood` gives);
    - ``"mixture"``: ``log (1/K) sum_k N(x; mu_k, Sigma_k)``, the equal-prior mixture's log-density;
    - ``"max_posterior"``: ``max_k log P(k | x)`` (<= 0), the log of the largest class posterior.
      It does not detect far-away inputs: it is bounded by 0 and does not fall with the distance from
      the data -- with shared (tied or identity) covariances, far from every mean the nearest class's
      posterior tends to 1, the most normal score there is -- so noise far from the features is
      accepted.  Use it to flag inputs between classes, not inputs from elsewhere;
    - ``"distance"``: ``-(x - mu_yhat)^T Sigma_yhat^-1 (x - mu_yhat) / 2``, the predicted class's squared
      Mahalanobis distance without the log-det and constants (the likelihood's other half: with tied or
      identity covariances the two rank alike).

    ``normalize=True`` L2-normalises every feature before it is fitted or scored (``x / |x|``): with
    ``covariance="tied"`` that is the Mahalanobis detector on L2-normalised features, the detector the standard
    detection report recommends for an L-GM network (docs/detector.md).

    Scoring: features of any float dtype (bfloat16/float16 are computed in float32, float64 in
    float64; the scores come back in that dtype), on any device -- the parameters are copied to the
    features' device and dtype on first use and cached (:meth:`to` clears the cache).  The score is
    differentiable with respect to the features (the adaptive attack needs that); NaN features give NaN
    scores, and :meth:`reject` rejects them.  ``impl`` is the operators' implementation selector.
    """

    kind = "gaussian"
    inputs = ("features",)
    STATE_FORMAT = FORMAT

    def __init__(self, means: Tensor, *, log_var: Tensor | None = None, covariance_matrix: Tensor | None = None,
                 score: str = "likelihood", impl: str = "auto", threshold: float | None = None,
                 normalize: bool = False) -> None:
        Detector.__init__(self)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
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
        means, log_var = head_gaussians(head)
        if impl is None:
            impl = getattr(head, "impl", "auto")
            impl = impl if impl in IMPLS else "auto"
        det = cls(means, log_var=log_var, score=score, impl=impl)
        det.requires_fit = False  # the head's Gaussians: a combination's fit keeps them (det.fit still refits)
        return det

    @classmethod
    def _from_parts(cls, config: dict, tensors: dict) -> LikelihoodDetector:
        raise ValueError("a Gaussian detector's state is LikelihoodDetector.state_dict()'s own (format "
                         f"{FORMAT!r}), not the family's 'config'/'tensors' layout")

    @_ClassOrInstanceMethod
    def fit(self_or_cls, features: Tensor, labels: Tensor, covariance: str | None = None, *, ridge: float = 1e-6,
            num_classes: int | None = None, score: str | None = None, impl: str | None = None,
            normalize: bool | None = None, logits: Tensor | None = None) -> LikelihoodDetector:
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
            normalize: fit (and later score) L2-normalised features; None: False (class form) or ``det``'s.
            logits: ignored (the family's ``fit(features, labels, logits)`` signature; Gaussians read features; a
                tensor given as the third positional argument is taken as these logits, not as ``covariance``).

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
        if isinstance(covariance, Tensor):  # fit(features, labels, logits): the family's signature
            covariance = None
        if isinstance(self_or_cls, type):
            return self_or_cls._fitted(features, labels, "tied" if covariance is None else covariance, ridge=ridge,
                                       num_classes=num_classes, score="likelihood" if score is None else score,
                                       impl="auto" if impl is None else impl,
                                       normalize=False if normalize is None else normalize)
        det = self_or_cls
        new = type(det)._fitted(features, labels, det.covariance if covariance is None else covariance, ridge=ridge,
                                num_classes=num_classes, score=det.score_name if score is None else score,
                                impl=det.impl if impl is None else impl,
                                normalize=det.normalize if normalize is None else normalize)
        det.__dict__.update(new.__dict__)
        det.__dict__.pop("requires_fit", None)  # fitted now, not a head's given Gaussians
        return det

    @classmethod
    def _fitted(cls, features: Tensor, labels: Tensor, covariance: str, *, ridge: float, num_classes: int | None,
                score: str, impl: str, normalize: bool = False) -> LikelihoodDetector:
        """The new detector :meth:`fit` describes."""
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        if normalize and isinstance(features, Tensor) and features.is_floating_point() and features.dim() == 2:
            features = l2_normalised(features.detach().to(torch.float64))
        means, log_var, cov = fit_gaussians(features, labels, covariance, ridge, num_classes)
        return cls(means, log_var=log_var, covariance_matrix=cov, score=score, impl=impl, normalize=normalize)

    def with_score(self, score: str) -> LikelihoodDetector:
        """The same Gaussians with another score kind (uncalibrated: its threshold is unset)."""
        return LikelihoodDetector(self.means, log_var=self.log_var, covariance_matrix=self.covariance_matrix,
                                  score=score, impl=self.impl, normalize=self.normalize)

    @property
    def name(self) -> str:
        return (f"Gaussians ({self.covariance}{', L2-normalised features' if self.normalize else ''}; "
                f"{self.score_name})")

    # ------------------------------------------------------------------ threshold
    def calibrate(self, clean_features: Tensor, fpr: float = 0.05, *, logits: Tensor | None = None
                  ) -> LikelihoodDetector:
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
            logits: ignored (the family's signature: Gaussians read features only).

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
        self.calibration_range = (float(s.min()), float(s.max()))
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
        if self.normalize:
            x = l2_normalised(x)
        return _score_rows(x, kind, self._params, self._half_logdet, self.impl)

    # the family's seam: the tensors a RejectingClassifier holds, and the score computed from them
    def _tensors(self) -> dict:
        out = {"means": self.means}
        if self.log_var is not None:
            out["log_var"] = self.log_var
        if self.covariance_matrix is not None:
            out["covariance_matrix"] = self.covariance_matrix
        return out

    def scoring_tensors(self) -> dict:
        half = torch.tensor(self._half_logdet, dtype=torch.float64, device=self.means.device)
        if self.covariance == "tied":
            return {"white_means": self._white_means, "whiten_t": self._whiten.T.contiguous(),
                    "center": self._center, "half_logdet": half}
        return {**self._tensors(), "half_logdet": half}

    def score_with(self, params: dict, features: Tensor | None, logits: Tensor | None = None) -> Tensor:
        x = l2_normalised(features) if self.normalize else features
        if self.covariance == "tied":
            p = (params["white_means"], None, params["whiten_t"], params["center"])
        else:
            p = (params["means"], params.get("log_var"), None, None)
        return _score_rows(x, self.score_name, lambda _d, _t: p, params["half_logdet"], self.impl)

    def score(self, features: Tensor, logits: Tensor | None = None) -> Tensor:
        """Scores of the detector's kind: higher = more normal.

        A log-density in nats (``"likelihood"``, ``"mixture"``), minus half a squared distance
        (``"distance"``) or a log-posterior (``"max_posterior"``,
        <= 0).  Absolute values depend on D and on the covariances: read them against the threshold
        (:meth:`relative_to_threshold`) or by their ranking, not by their size.  Needs no threshold.

        Args:
            features: (N, D) floating features (NaN rows give NaN; meta features give meta scores).
            logits: ignored (the family's signature: Gaussians read features only).

        Returns:
            (N,) scores, float32 (float64 for float64 features), differentiable with respect to ``features``.
        """
        return self._apply(features, self.score_name)

    def relative_to_threshold(self, features: Tensor, logits: Tensor | None = None) -> Tensor:
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

    # ------------------------------------------------------------------ device and state
    def to(self, device) -> LikelihoodDetector:
        """Move the stored parameters to ``device`` (in place; returns self).  Scoring works on any
        device without it (the parameters are copied to the features' device and cached).  The meta
        device is refused (ValueError): the parameters need values; so is a dtype (they stay float64;
        scores follow the features' dtype)."""
        device = check_device(device)
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
        sd = {"format": FORMAT, "covariance": self.covariance, "score": self.score_name, "impl": self.impl,
              "means": self.means.clone()}
        if self.log_var is not None:
            sd["log_var"] = self.log_var.clone()
        if self.covariance_matrix is not None:
            sd["covariance_matrix"] = self.covariance_matrix.clone()
        sd.update(self._calibration_state())
        if self.normalize:
            sd["normalize"] = True
        if not self.requires_fit:
            sd["given"] = True
        return sd

    @classmethod
    def _from_flat_state(cls, state_dict: dict) -> LikelihoodDetector:
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
        kw = check_state(state_dict)
        fpr, size, given = kw.pop("fpr"), kw.pop("calibration_size"), kw.pop("given")
        det = cls(kw.pop("means"), **kw)
        det.fpr, det.calibration_size = fpr, size
        det.calibration_range = check_range(state_dict)
        det.requires_fit = not given
        return det

    @classmethod
    def from_state_dict(cls, state_dict: dict) -> LikelihoodDetector:
        """The detector :meth:`state_dict` describes (an exact round trip: the same tensors, threshold
        and scores); errors name the key (see :meth:`_from_flat_state`)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict (LikelihoodDetector.state_dict()), got "
                            f"{type(state_dict).__name__}")
        if state_dict.get("format") != FORMAT:
            raise ValueError(f"state_dict is not a LikelihoodDetector state: state_dict['format'] must be "
                             f"{FORMAT!r}, got {state_dict.get('format')!r}")
        return cls._from_flat_state(state_dict)

    def __repr__(self) -> str:
        return (f"LikelihoodDetector(num_classes={self.num_classes}, feat_dim={self.feat_dim}, "
                f"covariance={self.covariance!r}, score={self.score_name!r}, "
                f"{'normalize=True, ' if self.normalize else ''}threshold={self._threshold}, fpr={self.fpr})")
