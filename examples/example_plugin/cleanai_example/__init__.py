"""A layer CleanAI's built-in plugins do not know, and a small model that uses it."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ScaledLinear", "TinyNet"]


class ScaledLinear(nn.Module):
    """``y = (x @ weight.T) * scale + bias``: a linear layer with a learned per-output gain.

    Without the plugin, CleanAI traces its ``einsum`` generically: ``weight``, ``scale``
    and ``bias`` are bare parameters whose dims follow the channels they meet. The plugin
    describes the layer as one module (its slices, weight energies and compensation).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.scale = nn.Parameter(torch.rand(out_features) + 0.5)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...i,oi->...o", x, self.weight) * self.scale + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class TinyNet(nn.Module):
    """``Linear -> ReLU -> ScaledLinear -> ReLU -> Linear``."""

    def __init__(self, d_in: int = 8, hidden: int = 16, mid: int = 12, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.scaled = ScaledLinear(hidden, mid)
        self.fc2 = nn.Linear(mid, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.scaled(torch.relu(self.fc1(x)))))
