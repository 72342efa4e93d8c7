"""round_to defaults per device: none on CPU (measured), 8 on CUDA (tensor cores)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.device_defaults import default_round_to


@pytest.mark.parametrize(
    ("device", "expected"),
    [(None, None), ("cpu", None), (torch.device("cpu"), None), ("cuda", 8), ("cuda:1", 8), ("meta", None)],
)
def test_round_to_default_by_device(device, expected):
    assert default_round_to(device) == expected


def test_the_cpu_default_keeps_the_counts_the_ratio_gives():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 20, 3), nn.ReLU(), nn.Conv2d(20, 4, 3))
    x = torch.randn(1, 3, 8, 8)
    rt = default_round_to(next(model.parameters()).device)
    pruned = StructuredPruner(model, x, "magnitude", pruning_ratio=0.3, round_to=rt).prune()
    assert pruned[0].out_channels == 14  # 20 - floor(0.3 * 20); round_to=8 would keep 16
    rounded = StructuredPruner(model, x, "magnitude", pruning_ratio=0.3, round_to=default_round_to("cuda")).prune()
    assert rounded[0].out_channels == 16


def test_the_pruner_resolves_round_to_auto_from_the_model_device():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 20, 3), nn.ReLU(), nn.Conv2d(20, 4, 3))
    pruner = StructuredPruner(model, torch.randn(1, 3, 8, 8), "magnitude", pruning_ratio=0.3)  # round_to="auto"
    assert pruner.round_to is None and pruner.prune()[0].out_channels == 14
    assert StructuredPruner(model, torch.randn(1, 3, 8, 8), "magnitude", round_to=4).round_to == 4
