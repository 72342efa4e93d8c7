"""FlopsOfCopies: the FLOPs of pruned copies from the layers' sizes equal a full count."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.metrics import FlopsOfCopies, count_flops
from cleanai_core.slicing import edits_for, sliced_copy


class Transposed(nn.Module):
    """Conv, grouped conv, transposed conv and a linear head on a 1-D and a 2-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.c = nn.Conv1d(8, 8, 3)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.up(torch.relu(self.b(torch.relu(self.a(x)))))
        y = self.c(y.flatten(2))
        return self.head(y.mean(2))


class WithBmm(nn.Module):
    """FLOPs outside any linear or convolution layer (attention's products): copies are counted by running."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        t = self.fc(x)
        a = torch.softmax(torch.bmm(t, t.transpose(1, 2)), -1)
        return self.out(torch.bmm(a, t).mean(1))


def _copies(model: nn.Module, x: torch.Tensor, ratios=(0.25, 0.5, 0.75)) -> list[nn.Module]:
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, importance="magnitude")
    out = []
    for r in ratios:
        plan = pruner.make_plan(r, pruner.score())
        out.append(sliced_copy(model, edits_for(pruner.graph, plan.pruned_units()), pruner.graph.pm))
    return out


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 48, 48)),
        (lambda: torchvision.models.mobilenet_v2(num_classes=10), (1, 3, 64, 64)),
        (Transposed, (2, 3, 8, 8)),
    ],
)
def test_copies_from_layer_sizes_equal_a_full_count(make, shape):
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    flops = FlopsOfCopies(model, x)
    assert flops.layers is not None  # every FLOP is in a linear or convolution layer
    assert flops.total == count_flops(model, x) == flops(model)
    seen = set()
    for copy in _copies(model, x):
        got = flops(copy)
        assert got == count_flops(copy, x)
        seen.add(got)
    assert len(seen) == 3 and max(seen) < flops.total  # three different sizes, all smaller


def test_flops_outside_layers_fall_back_to_counting():
    torch.manual_seed(0)
    model, x = WithBmm().eval(), torch.randn(2, 4, 6)
    flops = FlopsOfCopies(model, x)
    assert flops.layers is None
    copy = _copies(model, x, ratios=(0.5,))[0]
    assert copy.fc.out_features == 6
    assert flops(copy) == count_flops(copy, x) < flops.total


def test_a_copy_with_other_layers_is_counted_by_running():
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    flops = FlopsOfCopies(model, x)
    copy = _copies(model, x, ratios=(0.5,))[0]
    copy.fc = nn.Sequential(nn.Linear(copy.fc.in_features, 64), nn.Linear(64, 10))  # layers the original lacks
    assert flops(copy) == count_flops(copy, x)
