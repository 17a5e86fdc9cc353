"""Feature extractors.  Every model returns features; the head (softmax layer,
center loss, L-GM) is separate."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["LeNetPlusPlus", "CifarResNet", "resnet20", "resnet56", "resnet110", "build_model", "MODELS", "he_init_",
           "spectral_normalize_"]


def he_init_(module: nn.Module, prelu_slope: float = 0.25) -> nn.Module:
    """He et al. (Kaiming normal) initialisation for conv and linear weights,
    zero biases (docs/SPEC.md section 5: PyTorch's default leaves the six-conv stack at
    chance for hundreds of steps)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=prelu_slope, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class LeNetPlusPlus(nn.Module):
    """LeNet++ (Wen et al. 2016; Wan et al. 2018): six 5x5 convs with 32, 32, 64,
    64, 128, 128 channels and PReLU, a 2x2 max-pool after each pair, then a
    linear layer to the feature (2-D for plots, 100-D for accuracy).

    ``feature_relu=False`` (default) leaves the feature layer linear, as the
    L-GM authors' code does (their Caffe MNIST prototxt comments the ReLU out;
    their PyTorch release has a plain Linear); ``True`` adds the ReLU of the
    paper's text.  With it, 80-95% of the 100 feature dimensions die and FGSM
    pulls features to the origin, where the mixture density is highest
    (docs/SPEC.md section 5)."""

    def __init__(self, feat_dim: int = 2, in_channels: int = 1, image_size: int = 28, feature_relu: bool = False):
        super().__init__()
        layers, c = [], in_channels
        for out in (32, 64, 128):
            layers += [nn.Conv2d(c, out, 5, padding=2), nn.PReLU(), nn.Conv2d(out, out, 5, padding=2), nn.PReLU(),
                       nn.MaxPool2d(2)]
            c = out
        self.body = nn.Sequential(*layers)
        side = image_size // 8
        self.fc = nn.Linear(128 * side * side, feat_dim)
        self.feat_dim = feat_dim
        self.feat_act = nn.ReLU() if feature_relu else nn.Identity()
        he_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.feat_act(self.fc(torch.flatten(self.body(x), 1)))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity()
        if stride != 1 or cin != cout:  # projection shortcut (option B)
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNets of He et al. (2016): depth 6n+2, three stages of n basic
    blocks with 16, 32, 64 channels, global average pooling, then a linear layer
    to ``feat_dim`` (the feature; the head is separate)."""

    def __init__(self, depth: int, feat_dim: int = 64, in_channels: int = 3, feature_relu: bool = False) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, c = [], 16
        for i, out in enumerate((16, 32, 64)):
            for b in range(n):
                blocks.append(_BasicBlock(c, out, 2 if (b == 0 and i > 0) else 1))
                c = out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, feat_dim)
        self.feat_dim = feat_dim
        self.feat_act = nn.ReLU() if feature_relu else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.stem(x))
        return self.feat_act(self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)))


def resnet20(feat_dim: int = 64, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, feat_dim, in_channels)


def resnet56(feat_dim: int = 64, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, feat_dim, in_channels)


def resnet110(feat_dim: int = 64, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(110, feat_dim, in_channels)


# The registry, keyed by lgm_lab.config.MODEL_NAMES: name -> builder(feat_dim, in_channels, image_size, **kw).
MODELS = {
    "lenetpp": lambda feat_dim, in_channels, image_size, **kw: LeNetPlusPlus(feat_dim, in_channels, image_size, **kw),
    "resnet20": lambda feat_dim, in_channels, image_size, **kw: CifarResNet(20, feat_dim, in_channels, **kw),
    "resnet56": lambda feat_dim, in_channels, image_size, **kw: CifarResNet(56, feat_dim, in_channels, **kw),
    "resnet110": lambda feat_dim, in_channels, image_size, **kw: CifarResNet(110, feat_dim, in_channels, **kw),
}


class _SoftSpectralNorm(nn.Module):
    """The parametrization ``W / max(1, sigma(W) / coeff)``: sigma, the spectral norm of the weight reshaped to
    (out, in * kh * kw) (Miyato et al. 2018), estimated by one power iteration per training-mode forward (u, v
    persistent buffers, drawn from the global generator); the soft form DDU (Mukhoti et al. 2023) uses, which
    leaves weights of norm <= coeff as they are.  For a conv this is the reshaped weight's norm, not the layer's
    Lipschitz constant (which DDU bounds, after Gouk et al.): a k x k conv can stretch its input by up to k times
    more."""

    def __init__(self, weight: Tensor, coeff: float) -> None:
        super().__init__()
        self.coeff = float(coeff)
        w = weight.detach().flatten(1)
        u = torch.randn(w.shape[0], dtype=w.dtype, device=w.device)
        v = torch.randn(w.shape[1], dtype=w.dtype, device=w.device)
        self.register_buffer("u", nn.functional.normalize(u, dim=0, eps=1e-12))
        self.register_buffer("v", nn.functional.normalize(v, dim=0, eps=1e-12))
        self._power_iteration(w, 15)

    @torch.no_grad()
    def _power_iteration(self, w: Tensor, n: int) -> None:
        for _ in range(n):
            self.v.copy_(nn.functional.normalize(w.t() @ self.u, dim=0, eps=1e-12))
            self.u.copy_(nn.functional.normalize(w @ self.v, dim=0, eps=1e-12))

    def forward(self, weight: Tensor) -> Tensor:
        w = weight.flatten(1)
        if self.training:
            self._power_iteration(w.detach(), 1)
        # differentiable in the weight, u and v held fixed; cloned (as torch's spectral_norm does) so that another
        # training forward before this one's backward does not change what its backward needs
        sigma = self.u.clone() @ w @ self.v.clone()
        return weight / torch.clamp(sigma / self.coeff, min=1.0)


def spectral_normalize_(module: nn.Module, coeff: float) -> nn.Module:
    """Bound every conv and linear weight of ``module`` to a spectral norm <= ``coeff`` (the norm of the weight
    reshaped to a matrix, Miyato et al.'s; :class:`_SoftSpectralNorm` as a ``torch.nn.utils.parametrize``
    parametrization of ``weight``)."""
    if not (isinstance(coeff, (int, float)) and not isinstance(coeff, bool) and math.isfinite(coeff) and coeff > 0):
        raise ValueError(f"spectral_norm must be a finite number > 0, got {coeff!r}")
    for m in list(module.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(m, "weight", _SoftSpectralNorm(m.weight, coeff))
    return module


class _ScaledL2Norm:
    """A forward hook replacing a network's (N, D) output x by ``scale * x / |x|`` (a picklable callable)."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def __call__(self, _module, _inputs, output):
        return self.scale * nn.functional.normalize(output, dim=1)


def scale_features_(module: nn.Module, scale: float) -> nn.Module:
    """Make ``module``'s features L2-normalised and scaled to norm ``scale`` (a forward hook: the state dict
    is unchanged, and everything that reads the features -- head, detectors, attacks -- reads these)."""
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"feature_norm must be a finite number > 0, got {scale!r}")
    module.register_forward_hook(_ScaledL2Norm(scale))
    return module


def build_model(name: str, feat_dim: int, in_channels: int = 1, image_size: int = 28, *,
                spectral_norm: float = 0.0, feature_norm: float = 0.0, **kwargs) -> nn.Module:
    """The feature network registered as ``name``; extra keyword arguments go to its constructor.
    ``spectral_norm`` > 0: :func:`spectral_normalize_` with that coefficient; ``feature_norm`` > 0:
    :func:`scale_features_` to that norm."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    model = MODELS[name](feat_dim, in_channels, image_size, **kwargs)
    if spectral_norm:
        spectral_normalize_(model, spectral_norm)
    return scale_features_(model, feature_norm) if feature_norm else model
