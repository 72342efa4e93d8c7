"""timm model patterns that need the zoo plugin (``cleanai_plugins/zoo/timm.py``): a
hand-written module with the pattern, then the smallest timm model that has it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.testing import check_pruner


def groups_with(graph: DependencyGraph, module: str, slice_name: str):
    return [g for g in graph.groups() if any(s.module == module and s.name == slice_name for s in g.slices)]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class GatedConv(nn.Module):
    """The pattern of timm's MambaOut ``GatedConvBlock``: ``fc1`` split into unequal parts
    ``(hidden, hidden - conv, conv)``, a depthwise conv on the last part."""

    def __init__(self, dim: int = 8, hidden: int = 21, conv: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.split_indices = (hidden, hidden - conv, conv)
        self.conv = nn.Conv2d(conv, conv, 3, padding=1, groups=conv)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):  # (B, H, W, C)
        g, i, c = torch.split(self.fc1(x), self.split_indices, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.fc2(self.act(g) * torch.cat((i, c), dim=-1))


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.block = GatedConv()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_gated_conv_block_prunes_gate_pairs_and_conv_channels():
    torch.manual_seed(0)
    model, x = GatedNet().eval(), torch.randn(2, 5, 5, 4)
    graph = DependencyGraph(model, x)
    gated = groups_with(graph, "block.fc1", "out")
    # gate j goes with channel j of cat(i, conv(c)): 13 plain pairs, 8 through the depthwise conv
    assert sorted((g.size, g.prunable) for g in gated) == [(8, 8), (13, 13)]  # (units, prunable units)
    conv_group = next(g for g in gated if g.size == 8)
    assert {(s.module, s.name) for s in conv_group.slices} >= {("block.conv", "in"), ("block.conv", "out")}
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    # stream 8 -> 4, hidden 21 -> 11 (13 -> 7 plain, 8 -> 4 conv)
    d, h, c = 4, 11, 4
    expected = (4 * d + d) + (d * 2 * h + 2 * h) + (c * 9 + c) + (h * d + d) + (d * 3 + 3)
    assert report.params_after == expected


def test_gated_conv_block_split_sizes_follow_the_slicing():
    from cleanai_core import StructuredPruner

    torch.manual_seed(0)
    model, x = GatedNet().eval(), torch.randn(2, 5, 5, 4)
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head]).prune()
    block = small.block
    assert block.split_indices == (block.fc2.in_features, block.fc2.in_features - block.conv.in_channels, 4)
    assert block.fc1.out_features == 2 * block.fc2.in_features < 42
    assert small(x).shape == (2, 5, 5, 3)


def test_mambaout_femto_hidden_units_prune():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model, x = timm.create_model("mambaout_femto", num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    graph = DependencyGraph(model, x)
    gated = groups_with(graph, "stages.3.blocks.2.fc1", "out")
    assert [(g.size, g.prunable) for g in gated] == [(288, 288), (480, 480)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-4
    assert report.params_before == n_params(model) == 6_163_066
    # the residual stream is LayerNorm-normalised, left out of the exact oracle: before the
    # gated hidden units could prune, nothing else did (6,163,066 kept)
    assert report.params_after == 3_618_730
