"""Feature extractors.  Every model returns features; the head (softmax layer,
center loss, L-GM) is separate."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LeNetPlusPlus", "he_init_"]


def he_init_(module: nn.Module, prelu_slope: float = 0.25) -> nn.Module:
    """He et al. (Kaiming normal) initialisation for conv and linear weights,
    zero biases (SPEC section 5: PyTorch's default leaves the six-conv stack at
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
    linear layer to the feature (2-D for plots; 100-D with ReLU for accuracy)."""

    def __init__(self, feat_dim: int = 2, in_channels: int = 1, image_size: int = 28, feat_relu: bool | None = None):
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
        self.feat_act = nn.ReLU() if (feat_relu if feat_relu is not None else feat_dim > 2) else nn.Identity()
        he_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.feat_act(self.fc(torch.flatten(self.body(x), 1)))
