"""ViM (Wang et al., CVPR 2022): the energy of a linear classifier's logits minus a scaled norm of the
features' residual off their principal subspace -- pytorch-ood's ``ViM``, fitted and scored in torch."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._util import float_tensor, nan_rows, positive_int
from .base import Detector

__all__ = ["ViMDetector", "vim_dim"]


def vim_dim(feat_dim: int) -> int:
    """ViM's principal-subspace dimension d for ``feat_dim``-dimensional features: half of them (the paper's ratio
    for its ViT, 512 of 768; 1,000 of 2,048 for BiT)."""
    return max(1, feat_dim // 2)


class ViMDetector(Detector):
    """``score(x) = logsumexp(W x + b) - alpha |(x - u) P|``: ``u = -W^+ b`` (the origin the classifier's bias
    implies), ``P`` the D - d eigenvectors of the smallest eigenvalues of the training features' covariance
    about ``u`` (the residual off the principal subspace of dimension d), ``alpha`` = mean max-logit / mean
    residual norm over the training features (pytorch-ood's ``ViM``; its ``predict_features`` is ``-score``).

    It needs the network's last linear layer: build it with ``ViMDetector(weight, bias)``, or
    :meth:`for_classifier` from an ``nn.Linear`` (or a head holding one as ``fc``).

    Args:
        weight: (K, D) the classifier's weight.
        bias: (K,) its bias.
        d: the principal subspace's dimension, 1 <= d < D; None: :func:`vim_dim` (D // 2).
    """

    kind = "vim"
    inputs = ("features",)

    def __init__(self, weight: Tensor, bias: Tensor, d: int | None = None) -> None:
        super().__init__()
        w = float_tensor("weight", weight, (None, None))
        k, dim = w.shape
        if dim < 2:
            raise ValueError(f"ViM needs features of >= 2 dimensions (a residual subspace), got D = {dim}")
        b = float_tensor("bias", bias, (k,)).to(w.device)
        self.d = vim_dim(dim) if d is None else positive_int("d", d)
        if self.d >= dim:
            raise ValueError(f"d must be < D = {dim} (the residual needs a dimension), got {self.d}")
        self.weight, self.bias = w, b
        self.origin = -(torch.linalg.pinv(w) @ b)
        self.residual: Tensor | None = None
        self.alpha: Tensor | None = None
        self.feat_dim, self.num_classes = int(dim), int(k)

    @classmethod
    def for_classifier(cls, classifier, d: int | None = None) -> ViMDetector:
        """From an ``nn.Linear`` with a bias, or a head that holds one as ``fc`` (the lab's softmax heads)."""
        fc = classifier if isinstance(classifier, nn.Linear) else getattr(classifier, "fc", None)
        if not isinstance(fc, nn.Linear) or fc.bias is None:
            raise ValueError(f"ViM needs a linear classifier with a bias (an nn.Linear, or a head with one as .fc); "
                             f"{type(classifier).__name__} has none")
        return cls(fc.weight, fc.bias, d)

    fitted = property(lambda self: self.residual is not None)

    @property
    def name(self) -> str:
        return f"ViM (d={self.d})"

    def _fit(self, features, labels, logits) -> None:
        x = features.to(device=self.weight.device, dtype=torch.float64)
        if x.shape[1] != self.feat_dim:
            raise ValueError(f"features must have shape (N, {self.feat_dim}) (the classifier's D), got "
                             f"{tuple(x.shape)}")
        c = x - self.origin
        cov = c.T @ c / c.shape[0]
        _vals, vecs = torch.linalg.eigh(cov)  # ascending: the first D - d span the residual
        residual = vecs[:, : self.feat_dim - self.d].contiguous()
        vlogit = (c @ residual).norm(dim=-1).mean()
        maxlogit = (x @ self.weight.T + self.bias).max(dim=-1).values.mean()
        if not float(vlogit) > 0:
            raise ValueError("the training features have no residual off their principal subspace (alpha would "
                             "divide by zero): use a smaller d or more varied features")
        self.residual, self.alpha = residual, maxlogit / vlogit

    def _tensors(self) -> dict:
        out = {"weight": self.weight, "bias": self.bias, "origin": self.origin}
        if self.residual is not None:
            out.update(residual=self.residual, alpha=self.alpha)
        return out

    def _set_tensors(self, tensors: dict) -> None:
        self.weight, self.bias, self.origin = tensors["weight"], tensors["bias"], tensors["origin"]
        self.residual, self.alpha = tensors.get("residual"), tensors.get("alpha")

    def _config(self) -> dict:
        return {"d": self.d}

    @classmethod
    def _from_parts(cls, config: dict, tensors: dict) -> ViMDetector:
        for key in ("weight", "bias"):
            if key not in tensors:
                raise ValueError(f"state_dict['tensors'] has no {key!r}")
        det = cls(tensors["weight"], tensors["bias"], config.get("d"))
        if ("residual" in tensors) != ("alpha" in tensors):
            raise ValueError("state_dict['tensors'] must hold both 'residual' and 'alpha' or neither")
        if "origin" in tensors:
            det.origin = float_tensor("state_dict['tensors']['origin']", tensors["origin"], (det.feat_dim,))
        if "residual" in tensors:
            det.residual = float_tensor("state_dict['tensors']['residual']", tensors["residual"],
                                        (det.feat_dim, det.feat_dim - det.d))
            det.alpha = float_tensor("state_dict['tensors']['alpha']", tensors["alpha"], ())
        return det

    def score_with(self, params: dict, features: Tensor | None, logits: Tensor | None = None) -> Tensor:
        x = features
        energy = torch.logsumexp(x @ params["weight"].T + params["bias"], dim=-1)
        vlogit = ((x - params["origin"]) @ params["residual"]).norm(dim=-1) * params["alpha"]
        return energy - vlogit + nan_rows(x)
