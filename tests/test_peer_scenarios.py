"""The scenarios a structured-pruning user brings from Torch-Pruning's test suite, written
for CleanAI's API: hand-picked indices on a traced graph, concat / split / reshape
coupling, custom layers registered by the user, multiple inputs and outputs, transposed
convolutions under every criterion, uniform / global / iterative ratios, round_to,
target layers, soft (masked) pruning, history replay and backward through a pruned model.

Each test asserts the widths it expects, and the masking oracle where slicing must equal
zeroing. Where CleanAI differs on purpose (it keeps the model's output shapes, it freezes
unequal splits it cannot prove safe), the test asserts that behaviour and its message."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cleanai_core import DependencyGraph, PruningHistory, StructuredPruner, hookimpl
from cleanai_core.errors import UserError
from cleanai_core.interfaces import LayerPruner, replace_param
from cleanai_core.scoring import ScoringContext, score_groups
from cleanai_core.testing import check_pruner, masked_forward, temporary_plugin

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _exact(model: nn.Module, x, **kw) -> None:
    """The masking oracle: a random half of every group sliced equals it zeroed."""
    r = check_pruner(model.eval(), x, **kw)
    assert r.output_shapes_equal and r.pruned_units > 0 and r.params_after < r.params_before
    assert r.max_abs_diff < 1e-4


def _prune(model: nn.Module, x, importance="magnitude", ratio=0.5, **kw) -> nn.Module:
    pruner = StructuredPruner(model.eval(), x, importance, pruning_ratio=ratio, **kw)
    return pruner.prune()


def _group(graph: DependencyGraph, module: str, kind: str = "out"):
    return next(g for g in graph.groups() if any(s.module == module and s.kind == kind for s in g.slices))


def _mask(graph: DependencyGraph, group, idx: list[int]) -> torch.Tensor:
    pruned = torch.zeros(graph.root.numel(), dtype=torch.bool)
    pruned[group.units[idx]] = True
    return pruned


# -- the dependency graph and hand-picked indices -------------------------------------------


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


X32 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def test_resnet18_conv1_group_is_the_whole_first_residual_stream():
    graph = DependencyGraph(_resnet18(), X32)
    g = _group(graph, "conv1")
    assert (g.size, g.prunable) == (64, 64)
    assert g.modules() == [
        "bn1",
        "conv1",
        "layer1.0.bn2",
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.1.bn2",
        "layer1.1.conv1",
        "layer1.1.conv2",
        "layer2.0.conv1",
        "layer2.0.downsample.0",
    ]


def test_hand_picked_indices_prune_every_coupled_layer_and_keep_the_rest():
    model = _resnet18()
    pruner = StructuredPruner(model, X32, "magnitude", bias_compensation=False, recalibrate_bn=False)
    g = _group(pruner.graph, "conv1")
    small, _ = pruner.build(_mask(pruner.graph, g, [2, 6, 9]))
    kept = [i for i in range(64) if i not in (2, 6, 9)]
    assert small.conv1.out_channels == small.bn1.num_features == 61
    assert small.layer1[0].conv1.in_channels == small.layer1[1].conv2.out_channels == 61
    assert small.layer2[0].conv1.in_channels == small.layer2[0].downsample[0].in_channels == 61
    assert torch.equal(small.conv1.weight, model.conv1.weight[kept])
    assert torch.equal(small.layer2[0].conv1.weight, model.layer2[0].conv1.weight[:, kept])
    assert torch.equal(small.bn1.running_mean, model.bn1.running_mean[kept])
    assert model.conv1.out_channels == 64  # the user's model is untouched
    assert small(X32).shape == (2, 1000)


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(256, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.conv1(x)), 2)
        y = F.max_pool2d(F.relu(self.conv2(y)), 2)
        y = y.view(y.shape[0], -1)
        return F.relu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(y))))))


def test_lenet_conv_filters_take_their_flattened_columns_with_them():
    torch.manual_seed(0)
    model, x = LeNet().eval(), torch.randn(2, 1, 28, 28)
    _exact(model, x)
    pruner = StructuredPruner(model, x, "magnitude")
    small, _ = pruner.build(_mask(pruner.graph, _group(pruner.graph, "conv2"), [0, 2, 6]))
    assert small.conv2.out_channels == 13
    assert small.fc1.in_features == 256 - 3 * 16  # each filter owned a 4x4 block of fc1's columns
    assert small(x).shape == (2, 10)


class FCResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(128, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x):
        skip = F.relu(self.fc1(x))
        return self.fc3(F.relu(self.fc2(skip)) + skip)


def test_fully_connected_residual_couples_both_producers():
    torch.manual_seed(0)
    model, x = FCResidual().eval(), torch.randn(4, 128)
    _exact(model, x)
    pruner = StructuredPruner(model, x, "magnitude")
    g = _group(pruner.graph, "fc1")
    assert {"fc1", "fc2", "fc3"} <= set(g.modules()) and g.size == 256
    small, _ = pruner.build(_mask(pruner.graph, g, [0, 4, 6]))
    assert (small.fc1.out_features, small.fc2.out_features, small.fc3.in_features) == (253, 253, 253)
    assert small.fc2.in_features == 253


# -- custom layers ---------------------------------------------------------------------------


class CustomizedLayer(nn.Module):
    """Normalise, scale and shift per channel, then a square linear map."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.scale = nn.Parameter(torch.rand(in_dim) + 0.5)
        self.bias = nn.Parameter(torch.randn(in_dim))
        self.fc = nn.Linear(in_dim, in_dim)

    def forward(self, x):
        x = torch.div(x, x.pow(2).sum(dim=1, keepdim=True).sqrt())
        return self.fc(x * self.scale + self.bias)


class CustomNet(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, hidden)
        self.customized_layer = CustomizedLayer(hidden)
        self.fc2 = nn.Linear(hidden, 10)
        self.unused = nn.Parameter(torch.randn(10))  # never read by forward

    def forward(self, x):
        return self.fc2(self.customized_layer(F.relu(self.fc1(x))))


XC = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))


def test_custom_layer_without_a_plugin_prunes_through_its_parts():
    torch.manual_seed(0)
    model = CustomNet()
    _exact(model, XC)
    graph = DependencyGraph(model.eval(), XC)
    g = _group(graph, "fc1")
    names = {s.module or s.name for s in g.slices}
    assert {"customized_layer.scale", "customized_layer.bias", "customized_layer.fc"} <= names
    small = _prune(model, XC)
    assert small.fc1.out_features == small.customized_layer.scale.numel() == 32
    assert small.customized_layer.fc.in_features == small.customized_layer.fc.out_features == 32
    assert small.fc2.in_features == 32 and small.unused.shape == (10,)
    assert small(XC).shape == (4, 10)


class CustomizedLayerPruner(LayerPruner):
    """The user's own pruner: ``in`` = the channels entering (scale, shift, fc columns),
    ``out`` = fc's rows; keeps ``in_dim`` up to date."""

    name = "customized"

    def trace(self, module, call, ctx):
        ctx.bind(call.name, "in", ctx.labels(call.args[0], -1), "in", arg=0, dim=-1)
        ctx.set_label(call.outputs[0], -1, ctx.produce(call.name, "out", module.fc.out_features, dim=-1))

    def prune(self, module, keep):
        if "in" in keep:
            for attr in ("scale", "bias"):
                replace_param(module, attr, 0, keep["in"])
            replace_param(module.fc, "weight", 1, keep["in"])
            module.in_dim = module.fc.in_features = keep["in"].numel()
        if "out" in keep:
            replace_param(module.fc, "weight", 0, keep["out"])
            replace_param(module.fc, "bias", 0, keep["out"])
            module.fc.out_features = keep["out"].numel()

    def mask(self, module, slice_name, idx):  # the masking oracle zeroes what slicing removes
        if slice_name == "in":
            module.scale.data[idx] = 0
            module.bias.data[idx] = 0
            module.fc.weight.data[:, idx] = 0
            return False  # the input is zeroed too (the norm over channels must not see them)
        module.fc.weight.data[idx] = 0
        module.fc.bias.data[idx] = 0
        return True


class CustomizedPlugin:
    @hookimpl(tryfirst=True)
    def cleanai_layer_pruner(self, module):
        return CustomizedLayerPruner() if isinstance(module, CustomizedLayer) else None


def test_custom_layer_registered_by_the_user_is_sliced_by_its_pruner():
    torch.manual_seed(0)
    model = CustomNet(256).eval()
    x = torch.randn(4, 32)
    with temporary_plugin(CustomizedPlugin(), name="customized"):
        _exact(model, x)
        pruner = StructuredPruner(model, x, "magnitude")
        assert pruner.graph.nodes["customized_layer"].plugin == "customized"
        small, _ = pruner.build(_mask(pruner.graph, _group(pruner.graph, "fc1"), [0, 1, 6]))
        assert small.fc1.out_features == small.customized_layer.in_dim == 253
        assert small.customized_layer.fc.out_features == small.fc2.in_features == 256
        halved = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    assert halved.customized_layer.in_dim == halved.fc1.out_features == 128
    assert halved.customized_layer.fc.out_features == halved.fc2.in_features == 128
    assert small(x).shape == halved(x).shape == (4, 10)


# -- several inputs and outputs -----------------------------------------------------------------


class TwoInThreeOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(128, 32), nn.Linear(64, 32), nn.Linear(64, 100)

    def forward(self, x1, x2):
        x1, x2 = F.relu(self.fc1(x1)), F.relu(self.fc2(x2))
        return x1, x2, F.relu(self.fc3(torch.cat([x1, x2], dim=1)))


def test_outputs_that_are_features_are_kept_unless_the_user_says_otherwise():
    torch.manual_seed(0)
    inputs = {"x1": torch.randn(2, 128), "x2": torch.randn(2, 64)}
    with pytest.raises(UserError, match=r"frozen by: model output.*output_transform"):
        StructuredPruner(TwoInThreeOut(), inputs, "magnitude")
    model = TwoInThreeOut().eval()
    _exact(model, (inputs["x1"], inputs["x2"]), output_transform=lambda out: out[2])
    small = _prune(model, inputs, output_transform=lambda out: out[2])
    assert (small.fc1.out_features, small.fc2.out_features, small.fc3.in_features) == (16, 16, 32)
    assert [tuple(o.shape) for o in small(**inputs)] == [(2, 16), (2, 16), (2, 100)]


# -- concat, split, reshape ------------------------------------------------------------------


def _block(cin: int, cmid: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cmid, 1), nn.BatchNorm2d(cmid), nn.GELU(), nn.Conv2d(cmid, cout, 1))


class ConcatSplit(nn.Module):
    def __init__(self, d: int = 10) -> None:
        super().__init__()
        self.block1 = nn.Sequential(*_block(d, d, 2 * d), nn.BatchNorm2d(2 * d))
        self.parallel = nn.Sequential(*_block(d, d, d), nn.BatchNorm2d(d))
        self.block2 = nn.Sequential(nn.Conv2d(2 * d, d, 1), nn.BatchNorm2d(d))

    def forward(self, x):
        x3 = self.parallel(x)
        x = self.block1(x)
        c1 = self.block2[0].in_channels - self.parallel[-1].num_features
        x1, x2 = torch.split(x, (c1, self.block1[-1].num_features - c1), 1)
        return self.block2(torch.cat([x1, x3], dim=1)) + x2


def test_split_then_concat_with_sizes_read_from_the_layers():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 7, 7)
    _exact(ConcatSplit(), x)
    graph = DependencyGraph(ConcatSplit().eval(), x)
    assert _group(graph, "block1.3").prunable == 0 and _group(graph, "parallel.3").prunable == 10
    small = _prune(ConcatSplit(), x, "random")
    # x2 is added to the output, so it keeps its 10 channels; the parts of an equal split shrink
    # alike (chunk semantics), so x1 keeps its 10 too; the parallel branch's 10 halve
    assert (small.block1[0].out_channels, small.block1[3].out_channels) == (5, 20)
    assert (small.parallel[0].out_channels, small.parallel[3].out_channels) == (5, 5)
    assert (small.block2[0].in_channels, small.block2[0].out_channels) == (15, 10)
    assert small(x).shape == (2, 10, 7, 7)


class HeightConcat(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.block1 = nn.Sequential(*_block(d, d, d), nn.BatchNorm2d(d))
        self.parallel = nn.Sequential(*_block(d, d, d), nn.BatchNorm2d(d))
        self.conv1, self.conv2 = nn.Conv2d(d, d, 1), nn.Conv2d(d, d, 1)

    def forward(self, x):
        x1, x2 = self.block1(x), self.parallel(x)
        x = self.conv1(torch.cat([x1, x2], dim=2))
        top, _ = torch.split(x, [x1.shape[2], x2.shape[2]], dim=2)
        return self.conv2(top)


def test_concat_and_split_along_a_spatial_dim_couple_the_two_branches():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 7, 7)
    _exact(HeightConcat(), x)
    small = _prune(HeightConcat(), x, iterative_steps=2)
    assert small.block1[3].out_channels == small.parallel[3].out_channels == small.conv1.in_channels == 8
    assert (small.block1[0].out_channels, small.conv1.out_channels, small.conv2.out_channels) == (8, 8, 16)
    assert small(x).shape == (2, 16, 7, 7)


class CascadedConcat(nn.Module):
    def __init__(self, d: int = 10) -> None:
        super().__init__()
        self.block1 = nn.Sequential(*_block(d, d, d), nn.BatchNorm2d(d))
        self.block2 = nn.Sequential(*_block(d, 2 * d, 2 * d), nn.BatchNorm2d(2 * d))
        self.block3 = nn.Sequential(nn.Conv2d(d, 3 * d, 1), nn.BatchNorm2d(3 * d))
        self.block4 = nn.Sequential(nn.Conv2d(d, 6 * d, 1), nn.BatchNorm2d(6 * d))
        self.output = nn.Conv2d(12 * d, 10, 1)

    def forward(self, x):
        x12 = torch.cat([self.block1(x), self.block2(x)], dim=1)
        x123 = torch.cat([x12, self.block3(x)], dim=1)
        return self.output(torch.cat([x123, self.block4(x)], dim=1))


@pytest.mark.parametrize("steps", [1, 5])
def test_cascaded_concats_map_each_branch_to_its_columns(steps):
    torch.manual_seed(0)
    x = torch.randn(2, 10, 7, 7)
    _exact(CascadedConcat(), x)
    small = _prune(CascadedConcat(), x, "random", iterative_steps=steps)
    widths = [getattr(small, f"block{i}")[0].out_channels for i in (1, 2, 3, 4)]
    assert widths == [5, 10, 15, 30]
    assert small.output.in_channels == 5 + 10 + 15 + 30
    assert small(x).shape == (2, 10, 7, 7)


class UnequalSplit(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.block1 = nn.Sequential(*_block(d, d, 4 * d), nn.BatchNorm2d(4 * d))
        self.block2_1 = nn.Sequential(nn.Conv2d(d, d, 1), nn.BatchNorm2d(d))
        self.block2_2 = nn.Sequential(nn.Conv2d(2 * d, d, 1), nn.BatchNorm2d(d))

    def forward(self, x):
        x = self.block1(x)
        c1, c2 = self.block2_1[0].in_channels, self.block2_2[0].in_channels
        x1, x2, x3 = torch.split(x, [c1, c1, c2], dim=1)
        return self.block2_1(x1), self.block2_1(x2), self.block2_2(x3)


def test_unequal_split_is_kept_whole_with_a_reason_and_the_rest_prunes():
    """By design: split sizes are often constants in ``forward``, so channels split into
    unequal parts are frozen (and said so) unless a plugin vouches for the sizes."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5)
    graph = DependencyGraph(UnequalSplit().eval(), x)
    g = _group(graph, "block1.3")
    assert g.prunable == 0 and any("splits channels into unequal parts" in r for r in g.reasons)
    small = _prune(UnequalSplit(), x)
    assert (small.block1[0].out_channels, small.block1[3].out_channels) == (4, 32)
    assert [tuple(o.shape) for o in small(x)] == [(2, 8, 5, 5)] * 3


class ReshapeIntoDeconv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 32 * 16)
        self.up1, self.up2 = nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ConvTranspose2d(16, 8, 4, 2, 1)
        self.final = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        x = F.relu(self.linear(x)).view(-1, self.up1.in_channels, 4, 4)
        x = F.relu(self.up2(F.relu(self.up1(x))))
        return self.final(torch.flatten(x, 1))


def test_view_into_transposed_convs_prunes_whole_channel_blocks():
    torch.manual_seed(0)
    model, x = ReshapeIntoDeconv(), torch.randn(2, 64)
    _exact(model, x)
    small = _prune(model, x, ignored_layers=[model.final], iterative_steps=5)
    assert (small.linear.out_features, small.up1.in_channels) == (16 * 16, 16)
    assert (small.up1.out_channels, small.up2.out_channels, small.final.in_features) == (8, 4, 4 * 256)
    assert small.final.out_features == 10 and small(torch.randn(3, 64)).shape == (3, 10)


class WideDeep(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((d, 32), (32, 16)):
            layers += [nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU(), nn.Dropout(0.2)]
        self.mlp = nn.Sequential(*layers, nn.Linear(16, 1))
        self.linear, self.lin2 = nn.Linear(d, 3), nn.Linear(4, 1)

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        return torch.sigmoid(self.lin2(torch.concat([self.linear(x), self.mlp(x)], dim=-1)))


def test_wide_and_deep_concat_of_linears():
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    _exact(WideDeep(), x)
    small = _prune(WideDeep(), x, iterative_steps=5)
    assert (small.mlp[0].out_features, small.mlp[4].out_features, small.mlp[8].out_features) == (16, 8, 1)
    assert (small.linear.out_features, small.lin2.in_features) == (2, 3)
    assert small(x).shape == (4, 1)


class SingleChannelHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 64, 2, 2), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 1, 3, 1, 1), nn.BatchNorm2d(1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn3(self.conv3(F.relu(self.bn2(self.conv2(x))))))


def test_single_channel_output_groups():
    graph = DependencyGraph(SingleChannelHead().eval(), torch.randn(1, 3, 32, 32))
    first = _group(graph, "conv1")
    assert [(s.module, s.kind) for s in first.slices] == [("conv1", "out"), ("bn1", "param"), ("conv2", "in")]
    last = _group(graph, "conv3")
    assert (last.size, last.prunable) == (1, 0)


# -- transposed convolutions under every criterion, uniform and global ---------------------


class TransposeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.ConvTranspose2d(16, 64, 2, stride=2), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 8, 3, 1, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn3(self.conv3(F.relu(self.bn2(self.conv2(x))))))


def _transpose_model() -> TransposeModel:
    torch.manual_seed(0)
    model = TransposeModel().eval()
    with torch.no_grad():
        model.bn1.weight.mul_(0.01)  # conv1's group scores lowest under a global ranking
    return model


XT = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
# per-pixel class labels: the output (2, 8, 32, 32) is a dense 8-class prediction
LABELLED = [(XT, torch.randint(0, 8, (2, 32, 32), generator=torch.Generator().manual_seed(8)))]


@pytest.mark.parametrize("importance", ["magnitude", "bn_scale", "lamp", "random", "taylor", "weight_activation"])
@pytest.mark.parametrize("global_pruning", [False, True], ids=["uniform", "global"])
def test_transposed_conv_model_under_every_criterion(importance, global_pruning):
    pruner = StructuredPruner(
        _transpose_model(), XT, importance, pruning_ratio=0.5, iterative_steps=3, global_pruning=global_pruning
    )
    pruner.collect_activations(LABELLED, progress=False)
    small = pruner.prune()
    c1, c2 = small.conv1.out_channels, small.conv2.out_channels
    assert small.conv3.out_channels == 8  # the model's output channels stay
    if global_pruning:
        assert c1 + c2 == 40 and c1 >= 16 - int(0.9 * 16)
    else:
        assert (c1, c2) == (8, 32)
    assert small(XT).shape == (2, 8, 32, 32)


def test_taylor_labels_that_do_not_fit_the_output_are_refused():
    pruner = StructuredPruner(_transpose_model(), XT, "taylor", pruning_ratio=0.5)
    with pytest.raises(UserError, match=r"labels of shape \(2, 32, 32\); got labels of shape \(2,\)"):
        pruner.collect_activations([(XT, torch.zeros(2, dtype=torch.long))], progress=False)
    with pytest.raises(UserError, match="class label 8 but the output has 8 classes"):
        pruner.collect_activations([(XT, torch.full((2, 32, 32), 8))], progress=False)


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize(("max_layer_ratio", "conv1"), [(0.5, 8), (0.9, 2)])
def test_global_max_layer_ratio_holds_over_all_steps(steps, max_layer_ratio, conv1):
    """conv1 scores lowest, so global ranking takes it down to the cap: the cap counts
    from its original 16 channels however many steps there are."""
    small = _prune(
        _transpose_model(), XT, "bn_scale", iterative_steps=steps, global_pruning=True, max_layer_ratio=max_layer_ratio
    )
    assert small.conv1.out_channels == conv1
    assert small.conv1.out_channels + small.conv2.out_channels == 40  # half of the 80 units either way


# -- ratios: global, per layer, target layers, ignored layers, round_to ----------------------


def test_global_pruning_on_resnet18_keeps_the_classifier_and_removes_half():
    model = _resnet18()
    pruner = StructuredPruner(
        model, X32, "magnitude", pruning_ratio=0.5, global_pruning=True, ignored_layers=[model.fc]
    )
    plan = pruner.plan()
    total = sum(gp.group.size for gp in plan.groups)
    assert plan.n_pruned == total // 2
    assert all(gp.n_pruned <= int(0.9 * gp.group.size) for gp in plan.groups)
    small = pruner.prune()
    assert small.fc.out_features == 1000 and small(X32).shape == (2, 1000)


def test_only_target_layers_are_pruned():
    model = _resnet18()
    ratios = {model.layer1[0].conv1: 0.5, model.layer3[0].conv1: 0.5, "*": 0.0}
    small = _prune(model, X32, layer_pruning_ratios=ratios)
    assert small.layer1[0].conv1.out_channels == small.layer1[0].conv2.in_channels == 32
    assert small.layer3[0].conv1.out_channels == small.layer3[0].conv2.in_channels == 128
    assert [small.conv1.out_channels, small.layer1[1].conv1.out_channels, small.layer4[1].conv1.out_channels] == [
        64,
        64,
        512,
    ]


def test_ignoring_a_producer_keeps_its_consumers_inputs():
    model = _resnet18()
    small = _prune(model, X32, iterative_steps=2, ignored_layers=[model.layer2[0].conv1, model.fc])
    assert small.layer2[0].conv1.out_channels == small.layer2[0].conv2.in_channels == 128
    assert small.layer2[1].conv1.out_channels == 64 and small.fc.out_features == 1000
    assert small(X32).shape == (2, 1000)


def test_round_to_keeps_multiples_on_resnet18():
    small = _prune(_resnet18(), X32, ratio=0.3, round_to=16)
    widths = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 16 == 0 for w in widths)
    assert small.conv1.out_channels == 48 and small.layer4[0].conv1.out_channels == 368


# -- importance reduction --------------------------------------------------------------------


def test_magnitude_reducers_fold_the_same_per_slice_terms():
    model = _resnet18()
    graph = DependencyGraph(model, X32)
    ctx = ScoringContext(graph, {}, model)
    g = _group(graph, "conv1")
    scores = {}
    for reducer in ("mean", "sum", "max", "prod"):
        imp = StructuredPruner(model, X32, "magnitude").importance.__class__(p=2, reducer=reducer)
        scores[reducer] = score_groups(imp, graph, ctx)[g.id]
    n_terms = scores["sum"] / scores["mean"]
    assert torch.allclose(n_terms, n_terms[0].expand_as(n_terms)) and float(n_terms[0]) >= 10
    assert bool((scores["max"] >= scores["mean"] - 1e-12).all())
    assert bool((scores["prod"] <= scores["mean"] ** float(n_terms[0]) + 1e-9).all())  # AM-GM


# -- soft pruning, editing a plan, history ---------------------------------------------------


def test_soft_pruning_with_the_plan_masks_equals_slicing():
    model = _resnet18()
    pruner = StructuredPruner(model, X32, "magnitude", pruning_ratio=0.3, bias_compensation=False, recalibrate_bn=False)
    plan = pruner.plan()
    masked = masked_forward(pruner.graph, plan.pruned_units(), X32)[0]
    sliced = pruner.prune()(X32)
    assert float((masked - sliced).abs().max()) < 1e-4
    assert float((masked - model(X32)).abs().max()) > 1e-3  # the masks did change the output


def test_a_plan_edited_by_hand_is_what_gets_built():
    model = _resnet18()
    pruner = StructuredPruner(model, X32, "magnitude", pruning_ratio=0.5)
    plan = pruner.plan()
    stem = next(gp for gp in plan.groups if "conv1" in gp.group.modules())
    stem.pruned[:] = False  # the user keeps the residual stream of layer1 whole
    small, _ = pruner.build(plan.pruned_units())
    assert small.conv1.out_channels == small.layer1[1].conv2.out_channels == 64
    assert small.layer1[0].conv1.out_channels == 32 and small.layer3[0].conv1.out_channels == 128


def test_history_replay_then_state_dict_rebuilds_the_pruned_resnet(tmp_path):
    pruner = StructuredPruner(_resnet18(), X32, "magnitude", pruning_ratio=0.5, iterative_steps=2)
    small = pruner.prune()
    torch.save(small.state_dict(), tmp_path / "model.pt")
    pruner.history.save(tmp_path / "history.json")
    fresh = torchvision.models.resnet18(weights=None)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(torch.load(tmp_path / "model.pt"))  # not without the history
    PruningHistory.load(tmp_path / "history.json").replay(fresh)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"), strict=True)
    fresh.eval()
    assert fresh.conv1.out_channels == 32 and len(pruner.history) == 2
    assert torch.equal(fresh(X32), small(X32))


def test_vit_pruned_by_heads_replays_with_its_attributes_and_trains():
    def vit() -> nn.Module:
        torch.manual_seed(0)
        return torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
        ).eval()

    model, x = vit(), torch.randn(2, 3, 32, 32)
    _exact(model, x)
    model.customized_value = 8
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, round_to=4)
    small = pruner.prune()
    assert small.customized_value == 8 and small.hidden_dim == small.conv_proj.out_channels == 32
    assert small.class_token.shape == (1, 1, 32) and small.encoder.pos_embedding.shape[-1] == 32
    fresh = pruner.history.replay(vit())
    fresh.load_state_dict(small.state_dict())
    assert fresh.hidden_dim == 32 and torch.equal(fresh(x), small(x))
    fresh.train()
    F.cross_entropy(fresh(x), torch.tensor([1, 2])).backward()
    assert fresh.conv_proj.weight.grad.shape == (32, 3, 8, 8)


# -- layers beyond conv and linear; torchvision families; misuse --------------------------


class TextNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.ln = nn.Embedding(50, 32), nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.lstm = nn.LSTM(32, 24, num_layers=2, batch_first=True)
        self.fc, self.act, self.head = nn.Linear(24, 16), nn.PReLU(16), nn.Linear(16, 5)

    def forward(self, t):
        x = self.ln(self.emb(t))
        x = x + self.attn(x, x, x, need_weights=False)[0]
        y, _ = self.lstm(x)
        return self.head(self.act(self.fc(y[:, -1])))


def test_embedding_layernorm_attention_lstm_prelu():
    torch.manual_seed(0)
    t = torch.randint(0, 50, (3, 7))
    _exact(TextNet(), t)
    small = _prune(TextNet(), t)
    assert (small.emb.embedding_dim, small.ln.normalized_shape, small.attn.embed_dim) == (16, (16,), 16)
    assert (small.lstm.input_size, small.lstm.hidden_size, small.fc.out_features) == (16, 12, 8)
    assert small.act.weight.shape == (8,) and small(t).shape == (3, 5)


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(4, 32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.g = nn.Conv2d(32, 64, 3, padding=1, groups=4)
        self.norm, self.act, self.fc = nn.InstanceNorm2d(64, affine=True), nn.PReLU(64), nn.Linear(64, 10)

    def forward(self, x):
        x = self.act(self.norm(self.g(self.dw(self.gn(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def test_groupnorm_depthwise_and_grouped_convs_keep_their_groups():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    _exact(GroupedNet(), x)
    small = _prune(GroupedNet(), x, iterative_steps=3)
    assert (small.gn.num_channels, small.gn.num_groups, small.dw.groups, small.dw.out_channels) == (16, 4, 16, 16)
    assert (small.g.groups, small.g.in_channels, small.g.out_channels, small.act.weight.numel()) == (4, 16, 32, 32)
    assert small(x).shape == (2, 10)


def test_torchvision_mobilenet_v3_prunes_exactly_and_trains():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    _exact(model, x)
    small = _prune(model, x)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(small) < 0.6 * n(model)
    assert small.features[1].block[0][0].out_channels == small.features[1].block[1].fc1.in_channels == 8
    small.train()
    F.cross_entropy(small(x), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in small.parameters() if p.requires_grad)


def test_an_importance_class_instead_of_an_instance_is_refused():
    crit = type(StructuredPruner(_resnet18(), X32, "magnitude").importance)
    with pytest.raises(UserError, match=r"importance=MagnitudeImportance is a class; pass an instance"):
        StructuredPruner(_resnet18(), X32, crit)
    with pytest.raises(UserError, match="a registered name"):
        StructuredPruner(_resnet18(), X32, 3)
