"""The embedded default for ``cleanai demo``: the UCI handwritten digits (8x8 grey images,
CC BY 4.0, see ``data/README.md``) and a small CNN trained on them in seconds on a CPU.

The spec ``cleanai_plugins.io.demo:DigitsCNN`` is a registered model source (this module's
``cleanai_load_model``), so ``cleanai_core.io.load_pruned`` rebuilds a demo result without
``trust_code``: the spec names this one class, nothing is imported by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cleanai_core import hookimpl
from cleanai_plugins.io.datasets import load_dataset
from cleanai_plugins.io.models import finish_model

__all__ = ["DATA_PATH", "DigitsCNN", "digits_tensors", "train_digits_cnn"]

DATA_PATH = Path(__file__).with_name("data") / "digits.npz"
MODEL_SPEC = "cleanai_plugins.io.demo:DigitsCNN"


class DigitsCNN(nn.Module):
    """Three conv blocks and a linear head for 1x8x8 inputs scaled to [0, 1]."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 images as float ``(N, 1, 8, 8)`` in [0, 1] (pixel / 16) and labels ``(N,)``,
    read as ``--data`` reads the file (so a model trained on these takes it directly)."""
    ds = load_dataset(str(DATA_PATH), {})
    return ds.tensors[0], ds.tensors[1].long()


def train_digits_cnn(
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 8,
    seed: int = 0,
    model: nn.Module | None = None,
    width: int = 32,
) -> nn.Module:
    """Train a :class:`DigitsCNN` of the given ``width``, or the given ``model``, on the
    digits (seeded, a few seconds on two CPU cores); returns it in eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN(width=width) if model is None else model
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=gen)
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


@hookimpl
def cleanai_load_model(spec, options):
    """The demo's own architecture, by its exact spec (no import by name)."""
    if spec != MODEL_SPEC:
        return None
    num_classes = options.get("num_classes")
    return finish_model(DigitsCNN(num_classes=int(num_classes) if num_classes is not None else 10), spec, options)


@hookimpl
def cleanai_commands():
    """``cleanai demo``: the whole job on the embedded digits."""
    from cleanai_plugins.io import demo_command

    return [demo_command]
