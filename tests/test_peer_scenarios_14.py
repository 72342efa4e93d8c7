"""A fourteenth set of the scenarios users bring from Torch-Pruning's test suite, written
for CleanAI's API (see ``test_peer_scenarios.py`` to ``_13``): the peer's "unwrapped
parameters" read by functional ops that froze or dropped their channels: ``F.embedding_bag``
with a bare table, a bare grouped convolution weight (``F.conv2d`` / ``conv1d`` /
``conv_transpose2d`` with ``groups``, ``DeformConv2d`` with groups and offset groups) and
``F.bilinear`` with a bare 3-D weight.

Each test asserts widths, parameter counts and the masking oracle where slicing must equal
zeroing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_peer_scenarios_6 import _seeded
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.metrics import count_params
from cleanai_core.testing import check_pruner

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


# -- F.embedding_bag with a bare table -----------------------------------------------------------


class BareBag(nn.Module):
    """A bag-of-words classifier with its table as a bare parameter, read by
    ``F.embedding_bag`` (bags as rows of a 2-D index tensor, or a flat index tensor with
    ``offsets`` and per-sample weights)."""

    def __init__(self, mode: str, flat: bool) -> None:
        super().__init__()
        self.mode, self.flat = mode, flat
        self.table = nn.Parameter(torch.randn(20, 12))
        self.fc = nn.Linear(12, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        if self.flat:
            weights = torch.linspace(0.1, 1.0, ids.numel()) if self.mode == "sum" else None
            offsets = torch.tensor([0, 3], dtype=torch.long)
            bags = F.embedding_bag(ids, self.table, offsets, mode=self.mode, per_sample_weights=weights)
        else:
            bags = F.embedding_bag(ids, self.table, mode=self.mode)
        return self.head(F.relu(self.fc(F.relu(bags))))


@pytest.mark.parametrize(("mode", "flat"), [("mean", False), ("max", False), ("sum", True), ("mean", True)])
def test_a_bare_table_read_by_embedding_bag_prunes_its_columns(mode, flat):
    """The table's columns pass ``F.embedding_bag`` as they pass ``F.embedding``: before,
    the op dropped them and nothing could shrink but ``fc``'s rows ("nothing in this model
    can be pruned" where ``fc`` was absent; here the 12 columns froze)."""
    ids = torch.randint(0, 20, (7,) if flat else (2, 5), generator=torch.Generator().manual_seed(0))
    report = check_pruner(_seeded(lambda: BareBag(mode, flat)), ids, 0.5)
    assert report.max_abs_diff < 1e-6 and report.kept_whole == ()
    assert report.pruned_units == 6 + 8  # half the table's 12 columns and half of fc's 16 rows
    model = _seeded(lambda: BareBag(mode, flat))
    small = StructuredPruner(model, ids, "magnitude", pruning_ratio=0.5).prune()
    assert tuple(small.table.shape) == (20, 6) and small.fc.in_features == 6 and small.fc.out_features == 8
    assert (count_params(model), count_params(small)) == (499, 20 * 6 + 6 * 8 + 8 + 8 * 3 + 3)
    assert small(ids).shape == (2, 3)


# -- grouped convolutions with a bare weight -----------------------------------------------------


class BareGroupedConv(nn.Module):
    """``F.conv2d`` / ``F.conv1d`` with a bare weight and a literal ``groups``: the weight
    reads one group's channels, so the group count must stay."""

    def __init__(self, groups: int, dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.groups, self.fn = groups, F.conv2d if dims == 2 else F.conv1d
        self.a = conv(3, 8, 1)
        self.weight = nn.Parameter(torch.randn(12, 8 // groups, *(3,) * dims))
        self.bias = nn.Parameter(torch.randn(12))
        self.head = conv(12, 4, 1)

    def forward(self, x):
        h = self.fn(torch.relu(self.a(x)), self.weight, self.bias, padding=1, groups=self.groups)
        return self.head(torch.relu(h))


@pytest.mark.parametrize(("groups", "dims", "filters"), [(2, 2, 6), (4, 2, 8), (2, 1, 6)])
def test_a_bare_grouped_convolution_weight_keeps_its_group_count(groups, dims, filters):
    """The peer's unwrapped conv weight with ``groups``: channel j of every group is one
    unit, on the inputs as on the filters (as ``nn.Conv2d``'s pruner ties them): with 4
    groups of 3 filters, one of the 3 goes (8 kept). Before, a grouped bare weight froze
    its input and its filters: nothing around it shrank."""
    x = torch.randn(2, 3, *(8,) * dims, generator=torch.Generator().manual_seed(0))
    report = check_pruner(_seeded(lambda: BareGroupedConv(groups, dims)), x, 0.5)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == () and report.output_shapes_equal
    model = _seeded(lambda: BareGroupedConv(groups, dims))
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, round_to=None).prune()
    k = 3**dims
    assert small.a.out_channels == 4 and tuple(small.weight.shape) == (filters, 4 // groups, *(3,) * dims)
    assert small.head.in_channels == filters and small.bias.shape == (filters,)
    before = 3 * 8 + 8 + 12 * (8 // groups) * k + 12 + 12 * 4 + 4
    after = 3 * 4 + 4 + filters * (4 // groups) * k + filters + filters * 4 + 4
    assert (count_params(model), count_params(small)) == (before, after)
    assert small(x).shape == (2, 4, *(8,) * dims)


def test_a_grouped_deformable_convolution_with_offset_groups_prunes_and_replays(tmp_path):
    """``DeformConv2d(groups=2)`` reading two offset groups (torchvision derives both counts
    from the widths): channel j of every group and of every offset share goes together, the
    counts stay, and the history replays on a fresh model."""
    pytest.importorskip("torchvision")
    from test_peer_scenarios_6 import _two_step_replay
    from test_peer_scenarios_11 import DX, DeformBlock

    report = check_pruner(_seeded(lambda: DeformBlock(groups=2, offset_groups=2)), DX)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == ()
    assert (report.params_before, report.params_after) == (4480, 2196)
    small = StructuredPruner(
        _seeded(lambda: DeformBlock(groups=2, offset_groups=2)), DX, "magnitude", pruning_ratio=0.5, round_to=None
    ).prune()
    assert tuple(small.d.weight.shape) == (4, 2, 3, 3) and small.om.out_channels == 54
    assert (small.d.in_channels, small.d.out_channels, small.d.groups) == (4, 4, 2)
    _, small, fresh = _two_step_replay(lambda: DeformBlock(groups=2, offset_groups=2), DX, tmp_path)
    assert count_params(fresh) == count_params(small) < 4480 and torch.equal(fresh(DX), small(DX))


class BareGroupedConvTranspose(nn.Module):
    """``F.conv_transpose2d`` with a bare grouped weight ``(in, out // groups, k, k)``: dim 0
    holds every input channel, dim 1 one group's filters."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.weight = nn.Parameter(torch.randn(8, 3, 2, 2))
        self.bias = nn.Parameter(torch.randn(6))
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = F.conv_transpose2d(torch.relu(self.a(x)), self.weight, self.bias, stride=2, groups=2)
        return self.head(torch.relu(h))


def test_a_bare_grouped_transposed_convolution_weight_keeps_its_group_count(tmp_path):
    """Input channel j of both groups goes together (dim 0 of the weight), and filter j of
    both groups (dim 1, one group's share; the output and the bias hold it per group)."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    report = check_pruner(_seeded(BareGroupedConvTranspose), x, 0.5)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == ()
    assert (report.params_before, report.params_after) == (162, 72)
    model = _seeded(BareGroupedConvTranspose)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, round_to=None)
    small = pruner.prune()
    assert tuple(small.weight.shape) == (4, 2, 2, 2) and small.bias.shape == (4,) and small.head.in_channels == 4
    assert small(x).shape == (2, 4, 8, 8)
    fresh = _seeded(BareGroupedConvTranspose)
    pruner.history.replay(fresh).load_state_dict(small.state_dict())
    assert torch.equal(fresh(x), small(x))


# -- F.bilinear with a bare weight ---------------------------------------------------------------


class BareBilinear(nn.Module):
    """``F.bilinear`` of two branches with a bare ``(out, in1, in2)`` weight and bias, on
    vectors or on sequences ``(N, T, C)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(6, 12)
        self.weight = nn.Parameter(torch.randn(10, 16, 12) / 8)
        self.bias = nn.Parameter(torch.randn(10))
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        h = F.bilinear(torch.relu(self.a(x)), torch.relu(self.b(x)), self.weight, self.bias)
        return self.head(torch.relu(h))


@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 6)])
def test_a_bare_bilinear_weight_shrinks_along_each_of_its_three_dims(shape):
    """Its dim 1 follows the first input's channels, dim 2 the second's, dim 0 (with the
    bias) the output's. Before, ``_trilinear`` had no mapper: "channels reach op
    aten._trilinear.default in model, which ignored them", and only ``head`` was left."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    report = check_pruner(_seeded(BareBilinear), x, 0.5)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == ()
    assert report.pruned_units == 8 + 6 + 5
    model = _seeded(BareBilinear)
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    assert tuple(small.weight.shape) == (5, 8, 6) and small.bias.shape == (5,)
    assert (small.a.out_features, small.b.out_features, small.head.in_features) == (8, 6, 5)
    assert (count_params(model), count_params(small)) == (2159, 6 * 8 + 8 + 6 * 6 + 6 + 5 * 8 * 6 + 5 + 5 * 3 + 3)
    assert small(x).shape == (*shape[:-1], 3)
