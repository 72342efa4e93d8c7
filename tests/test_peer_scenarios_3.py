"""A third set of the scenarios users bring from Torch-Pruning's test suite, written for
CleanAI's API (see ``test_peer_scenarios.py`` and ``_2``): models left in train mode and
traced with a batch of one (as every peer test does), ratios given for a whole block,
a user's subclass of a built-in layer pruner, a custom layer whose input and output
channels are one, a bare matrix whose channel dim the peer asks the user to name, in-place
ops and constant channel ranges, dropout layers, isomorphic ranking of bottlenecks, the
grouped and inverted-residual torchvision families, and layer norms written by hand or
with the functional API.

Each test asserts widths, parameter counts or scores, and the masking oracle where slicing
must equal zeroing."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_peer_scenarios import CustomizedLayer, WideDeep  # the peer's wide-and-deep model: BatchNorm1d and Dropout
from test_peer_scenarios_2 import _exact, _group
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from cleanai_core import DependencyGraph, StructuredPruner, hookimpl
from cleanai_core.interfaces import LayerPruner, replace_param
from cleanai_core.metrics import count_params
from cleanai_core.testing import temporary_plugin
from cleanai_plugins.layers.linear import LinearPruner

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _prune(model: nn.Module, x, importance="magnitude", ratio=0.5, **kw) -> nn.Module:
    """Pruned in the mode it is in (the train-mode scenarios), unlike ``test_peer_scenarios_2``'s."""
    return StructuredPruner(model, x, importance, pruning_ratio=ratio, **kw).prune()


def _mask(graph: DependencyGraph, group, idx: list[int]) -> torch.Tensor:
    pruned = torch.zeros(graph.root.numel(), dtype=torch.bool)
    pruned[group.units[idx]] = True
    return pruned


def _pinned(graph: DependencyGraph, module: str) -> torch.Tensor:
    """Per output channel of ``module``: whether it must stay."""
    units = graph.root[graph.ctx.slices[(module, "out")].atoms]
    return torch.isin(units, torch.cat([g.units[g.frozen] for g in graph.groups()]))


def _seeded(cls, *args, **kw):
    torch.manual_seed(0)
    return cls(*args, **kw)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


# -- models left in train mode, traced with one sample --------------------------------------------


def test_a_model_in_train_mode_traced_with_one_sample_prunes_and_stays_untouched():
    """The peer builds its models in train mode and traces them with ``randn(1, ...)``:
    BatchNorm1d cannot run a batch of one in train mode, so CleanAI traces, scores and
    verifies in eval mode; the user's model keeps its mode and its BatchNorm statistics."""
    model = _seeded(WideDeep)
    assert model.training
    before = _state(model)
    x = torch.randn(1, 32)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, iterative_steps=5)
    small = pruner.prune()
    assert model.training and _unchanged(model, before)  # running stats and num_batches_tracked included
    assert (small.mlp[0].out_features, small.mlp[4].out_features, small.mlp[8].out_features) == (16, 8, 1)
    assert (small.linear.out_features, small.lin2.in_features) == (2, 3) and len(pruner.history) == 5
    assert small.training  # the pruned copy is handed back in the mode the model was in
    y = small.eval()(x)
    assert y.shape == (1, 1)
    _exact(_seeded(WideDeep), torch.randn(4, 32))


def test_a_resnet_in_train_mode_prunes_from_one_sample_and_its_copy_trains():
    model = torchvision.models.resnet18(weights=None)
    before = _state(model)
    small = _prune(model, torch.randn(1, 3, 32, 32), ignored_layers=[model.fc])
    assert model.training and _unchanged(model, before)
    assert small.training and (small.conv1.out_channels, small.layer4[1].conv2.out_channels) == (32, 256)
    assert small.fc.out_features == 1000
    out = small(torch.randn(2, 3, 32, 32))
    F.cross_entropy(out, torch.tensor([3, 7])).backward()
    assert small.conv1.weight.grad.shape == (32, 3, 7, 7) and small.bn1.num_batches_tracked == 1


# -- ratios for a block, a user's pruner of a built-in type -----------------------------------------


def test_a_ratio_given_for_a_block_applies_to_every_layer_inside_it():
    """The peer's ``pruning_ratio_dict={model.conv1: 0.2, model.layer2: 0.8}``."""
    model = _seeded(torchvision.models.resnet18).eval()
    x = torch.randn(1, 3, 32, 32)
    ratios = {model.conv1: 0.2, model.layer2: 0.8}
    small = _prune(model, x, layer_pruning_ratios=ratios, ignored_layers=[model.fc])
    assert small.conv1.out_channels == small.layer1[1].conv2.out_channels == 52  # 64 * 0.8, rounded up
    inner = [small.layer2[0].conv1.out_channels, small.layer2[1].conv1.out_channels]
    assert inner == [26, 26]  # 128 * 0.2, rounded up
    assert small.layer2[0].conv2.out_channels == small.layer3[0].conv1.in_channels == 26  # layer2's stream
    assert [small.layer3[0].conv1.out_channels, small.layer4[0].conv1.out_channels] == [128, 256]  # the default 0.5
    assert small(x).shape == (1, 1000)


class RecordingLinearPruner(LinearPruner):
    """The peer's ``MyLinearPruner(tp.function.LinearPruner)`` registered for nn.Linear."""

    name = "recording_linear"

    def __init__(self, calls: list) -> None:
        super().__init__()
        self.calls = calls

    def prune(self, module, keep):
        self.calls.append({k: v.numel() for k, v in keep.items()})
        super().prune(module, keep)


class RecordingPlugin:
    def __init__(self) -> None:
        self.calls: list = []

    @hookimpl(tryfirst=True)
    def cleanai_layer_pruner(self, module):
        return RecordingLinearPruner(self.calls) if type(module) is nn.Linear else None


class ThreeLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_a_users_subclass_of_the_built_in_linear_pruner_takes_over():
    x = torch.randn(3, 16)
    plugin = RecordingPlugin()
    with temporary_plugin(plugin, name="recording"):
        pruner = StructuredPruner(_seeded(ThreeLinears).eval(), x, "magnitude", pruning_ratio=0.5)
        assert {pruner.graph.nodes[n].plugin for n in ("fc1", "fc2", "fc3")} == {"recording"}
        small = pruner.prune()
        assert plugin.calls == [{"out": 16}, {"in": 16, "out": 16}, {"in": 16}]
        _exact(_seeded(ThreeLinears), x)  # the oracle slices through the user's pruner too
    assert len(plugin.calls) == 6
    assert (small.fc1.out_features, small.fc2.in_features, small.fc2.out_features, small.fc3.in_features) == (
        16,
        16,
        16,
        16,
    )
    assert small(x).shape == (3, 4)


# -- a custom layer whose input and output channels are one -----------------------------------------


# the peer's ``CustomizedLayer``, pruned below as its ``MyPruner`` does: the same indices leave the
# scale, the shift and both sides of the square ``fc``
SquareLayer = CustomizedLayer


class SquareLayerPruner(LayerPruner):
    """One slice, ``"dim"``: the channels entering are the channels leaving."""

    name = "square"

    def trace(self, module, call, ctx):
        atoms = ctx.labels(call.args[0], -1)
        ctx.bind(call.name, "dim", atoms, "in", arg=0, dim=-1)
        ctx.set_label(call.outputs[0], -1, atoms)

    def prune(self, module, keep):
        k = keep["dim"]
        for attr in ("scale", "bias"):
            replace_param(module, attr, 0, k)
        replace_param(module.fc, "weight", 0, k)
        replace_param(module.fc, "weight", 1, k)
        replace_param(module.fc, "bias", 0, k)
        module.in_dim = module.fc.in_features = module.fc.out_features = k.numel()

    def mask(self, module, slice_name, idx):
        module.scale.data[idx] = 0
        module.bias.data[idx] = 0
        module.fc.weight.data[:, idx] = 0
        module.fc.weight.data[idx] = 0
        module.fc.bias.data[idx] = 0
        return False  # the input is zeroed too: the norm over channels must not see them


class SquarePlugin:
    @hookimpl(tryfirst=True)
    def cleanai_layer_pruner(self, module):
        return SquareLayerPruner() if isinstance(module, SquareLayer) else None


class SquareNet(nn.Module):
    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.fc1, self.customized_layer, self.fc2 = nn.Linear(128, hidden), SquareLayer(hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(self.customized_layer(F.relu(self.fc1(x))))


def test_a_custom_layer_with_one_slice_for_its_input_and_output():
    """The peer's ``get_pruning_group(model.fc1, prune_linear_out_channels, idxs=[0, 1, 6])``
    then ``fc1.out_features == customized_layer.in_dim == fc2.in_features == 253``. Its
    masking rule (``mask``) is what lets verification accept the cut: without it the
    zeroed copy still adds ``fc.weight[:, j] * bias[j]`` and the group would be skipped."""
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
    with temporary_plugin(SquarePlugin(), name="square"):
        model = _seeded(SquareNet).eval()
        pruner = StructuredPruner(model, x, "magnitude")
        g = _group(pruner.graph, "fc1")
        assert g.modules() == ["customized_layer", "fc1", "fc2"] and g.size == 256
        small, _ = pruner.build(_mask(pruner.graph, g, [0, 1, 6]))
        assert small.fc1.out_features == small.customized_layer.in_dim == small.fc2.in_features == 253
        assert small.customized_layer.fc.weight.shape == (253, 253)
        kept = [i for i in range(256) if i not in (0, 1, 6)]
        assert torch.equal(small.customized_layer.fc.weight, model.customized_layer.fc.weight[kept][:, kept])
        _exact(_seeded(SquareNet, 64), x)
        half = _prune(model, x)
    assert half.customized_layer.in_dim == half.fc2.in_features == 128 and half(x).shape == (2, 10)
    assert count_params(half) == 128 * 128 + 128 + 2 * 128 + 128 * 128 + 128 + 128 * 10 + 10


# -- a bare parameter whose channel dimension the user names ----------------------------------------


class PerChannelBasis(nn.Module):
    """Each hidden unit owns a row of a bare ``(16, 5)`` basis: its channels are on dim 0."""

    def __init__(self, basis_first: bool = False) -> None:
        super().__init__()
        self.fc1, self.basis, self.fc2 = nn.Linear(8, 16), nn.Parameter(torch.randn(16, 5)), nn.Linear(16, 3)
        self.basis_first = basis_first

    def forward(self, x):
        h = F.relu(self.fc1(x)).unsqueeze(-1)
        return self.fc2((self.basis * h if self.basis_first else h * self.basis).sum(-1))


class BasisOnDim0:
    @hookimpl(tryfirst=True)
    def cleanai_unwrapped_parameter(self, name, parameter, model):
        return 0 if name == "basis" else None


@pytest.mark.parametrize("basis_first", [False, True])
@pytest.mark.parametrize("named", [False, True], ids=["guessed", "named"])
def test_a_bare_matrix_broadcast_along_its_rows_follows_the_channels(named, basis_first):
    """The peer's ``unwrapped_parameters=[(param, 0)]``. CleanAI guesses the dimensions of a
    bare tensor; for a matrix it takes the last one and keeps the rows as a second label.
    Before: the guess (the 5 basis columns) met the hidden units on another dimension and
    froze them ("channels on different dimensions meet"), unless a plugin answering
    ``cleanai_unwrapped_parameter`` named dim 0. Now a broadcast whose channels line up with
    the matrix's rows couples them (its columns stay), with or without the plugin."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    with temporary_plugin(BasisOnDim0(), name="basis_dim0") if named else contextlib.nullcontext():
        graph = DependencyGraph(_seeded(PerChannelBasis, basis_first).eval(), x)
        g = _group(graph, "fc1")
        assert (g.size, g.prunable) == (16, 16) and {"fc1", "fc2"} <= set(g.modules())
        _exact(_seeded(PerChannelBasis, basis_first), x)
        small = _prune(_seeded(PerChannelBasis, basis_first).eval(), x)
    assert (small.basis.shape, small.fc1.out_features, small.fc2.in_features) == ((8, 5), 8, 8)
    assert count_params(small) == (8 * 8 + 8) + 8 * 5 + (3 * 8 + 3)


# -- in-place ops, dropout ------------------------------------------------------------------------


class InPlaceOps(nn.Module):
    """In-place add of a bare parameter, in-place ReLU, ``+=``, an in-place gate, clamp_."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.gate, self.c3 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 8, 1)
        self.shift = nn.Parameter(torch.randn(16, 1, 1))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.c1(x)
        y.add_(self.shift)
        y = self.act(y)
        z = self.c2(y)
        z += y
        z.mul_(torch.sigmoid(self.gate(z)))
        z.clamp_(min=-1.0)
        return self.c3(z)


def test_in_place_ops_couple_and_slice_like_their_out_of_place_forms():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    _exact(_seeded(InPlaceOps), x)
    graph = DependencyGraph(_seeded(InPlaceOps).eval(), x)
    g = _group(graph, "c1")
    assert g.size == g.prunable == 16 and {"c1", "c2", "gate", "c3", "shift"} <= set(g.modules())
    model = _seeded(InPlaceOps).eval()
    small = _prune(model, x)
    assert (small.c1.out_channels, small.c2.out_channels, small.gate.out_channels) == (8, 8, 8)
    assert (small.shift.shape, small.c3.in_channels, small.c3.out_channels) == ((8, 1, 1), 8, 8)
    assert small(x).shape == (2, 8, 8, 8) and model.c1.out_channels == 16


class PartialConv(nn.Module):
    """FasterNet's partial convolution, the slicing form: a conv rewrites the first
    ``part`` channels in place, the others pass untouched."""

    def __init__(self, d: int = 16, part: int = 4) -> None:
        super().__init__()
        self.c1, self.part = nn.Conv2d(3, d, 3, padding=1), part
        self.pconv, self.c2 = nn.Conv2d(part, part, 3, padding=1, bias=False), nn.Conv2d(d, 8, 1)

    def forward(self, x):
        x = F.relu(self.c1(x)).clone()
        x[:, : self.part] = self.pconv(x[:, : self.part])
        return self.c2(x)


class FixedRanges(nn.Module):
    """Constant channel ranges counted from the start, to the end and from the end."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.head, self.rest = nn.Conv2d(3, 24, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(20, 8, 1)
        self.mid, self.tail = nn.Conv2d(4, 8, 1), nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = F.relu(self.c1(x))
        mid = self.mid(torch.narrow(y, 1, 6, 4))
        return self.head(y[:, :4]).sum(1, keepdim=True) + self.rest(y[:, 4:]) + mid + self.tail(y[:, -3:])


def test_a_constant_channel_range_keeps_only_the_channels_it_depends_on():
    """Before: any slice of the channels by constant bounds (``x[:, :4]``, ``x[:, 4:]``)
    froze its whole group, so FasterNet's partial convolution kept all 16 channels of
    ``c1``. Now only the channels whose positions the bounds pin stay: those up to the end
    of ``x[:, :4]`` and ``narrow(y, 1, 6, 4)``, those before the start of ``x[:, 4:]``, those
    from the start of ``x[:, -3:]``; the others shrink, exactly. Since session 25 a bound
    the module stores (FasterNet's ``self.part``) is a count of the channels below it, so
    those shrink too: ``part`` 4 -> 2 with ``pconv``, nothing pinned."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    _exact(_seeded(PartialConv), x)
    pinned = _pinned(DependencyGraph(_seeded(PartialConv).eval(), x), "c1")
    assert pinned.nonzero().squeeze(1).tolist() == []
    model = _seeded(PartialConv).eval()
    small = _prune(model, x)
    widths = (small.c1.out_channels, small.pconv.in_channels, small.pconv.out_channels, small.c2.in_channels)
    assert widths == (8, 2, 2, 8)
    assert (small.part, model.part) == (2, 4)
    assert small(x).shape == (2, 8, 8, 8)
    _exact(_seeded(FixedRanges), x)
    pinned = _pinned(DependencyGraph(_seeded(FixedRanges).eval(), x), "c1")
    assert pinned.nonzero().squeeze(1).tolist() == [*range(10), 21, 22, 23]  # :4 and 6:10, 4: and -3:
    small = _prune(_seeded(FixedRanges).eval(), x)
    assert (small.c1.out_channels, small.rest.in_channels, small.head.in_channels, small.tail.in_channels) == (
        18,
        14,
        4,
        3,
    )


class Dropouts(nn.Module):
    """Dropout as a module, as a function keyed on ``self.training``, 2-D and alpha dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        self.drop, self.alpha = nn.Dropout(0.5), nn.AlphaDropout(0.2)
        self.conv, self.drop2d = nn.Conv2d(3, 8, 3), nn.Dropout2d(0.3)

    def forward(self, x, img):
        h = F.dropout(F.relu(self.fc1(x)), 0.3, self.training)
        h = self.alpha(self.drop(F.relu(self.fc2(h))))
        c = self.drop2d(self.conv(img)).mean((2, 3))
        return self.fc3(h) + c.sum(1, keepdim=True)


def test_dropout_in_train_mode_neither_randomises_the_trace_nor_the_cut():
    inputs = (torch.randn(4, 16), torch.randn(4, 3, 8, 8))
    _exact(_seeded(Dropouts), inputs)
    model = _seeded(Dropouts)
    before = _state(model)
    a, b = _prune(model, inputs), _prune(model, inputs)
    assert (a.fc1.out_features, a.fc2.out_features, a.conv.out_channels, a.fc3.in_features) == (16, 16, 4, 16)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a.training and model.training and _unchanged(model, before)
    assert a.eval()(*inputs).shape == (4, 4)


# -- isomorphic ranking of bottlenecks; grouped and inverted residual families -----------------------


def _bottleneck_resnet() -> nn.Module:
    torch.manual_seed(0)
    return ResNet(Bottleneck, [3, 2, 1, 1], width_per_group=16, num_classes=10).eval()


def test_isomorphic_global_ranking_of_a_bottleneck_resnet_halves_every_set():
    """The peer's ResNet-50 ``global_pruning=True, isomorphic=True``: the conv2 groups of
    the blocks of a stage form one set (as do conv1's after the first block), each set
    loses half of its units, whatever the scores of its groups."""
    model = _bottleneck_resnet()
    x = torch.randn(2, 3, 32, 32)
    pruner = StructuredPruner(
        model, x, "magnitude", pruning_ratio=0.5, global_pruning=True, isomorphic=True, ignored_layers=[model.fc]
    )
    plan = pruner.plan()
    scope = pruner.isomorphic_scopes([gp.group for gp in plan.groups])
    sets: dict = {}
    for gp in plan.groups:
        sets.setdefault(scope[gp.group.id], []).append(gp)
    names = sorted(sorted(gp.group.modules()[0] for gp in s) for s in sets.values() if len(s) > 1)
    assert names == [
        ["layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"],
        ["layer1.1.bn1", "layer1.2.bn1"],
        ["layer2.0.bn2", "layer2.1.bn2"],
    ]
    for members in sets.values():
        assert sum(gp.n_pruned for gp in members) == sum(gp.group.size for gp in members) // 2
    small = pruner.prune()
    assert small.conv1.out_channels == 32 and small.layer4[0].conv3.out_channels == 1024
    assert small.fc.out_features == 10 and small(x).shape == (2, 10)


def test_grouped_bottlenecks_keep_their_groups_like_resnext():
    """The peer's ``resnext50_32x4d`` on a small ResNeXt: 4 groups of 8 channels in each
    3x3 conv; half of each group's channels go, the group count stays."""
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [2, 1, 1, 1], groups=4, width_per_group=8, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    _exact(model, x)
    small = _prune(model, x)
    grouped = [(m.in_channels, m.out_channels, m.groups) for n, m in small.named_modules() if n.endswith("conv2")]
    assert grouped == [(16, 16, 4), (16, 16, 4), (32, 32, 4), (64, 64, 4), (128, 128, 4)]
    assert small.layer1[0].conv3.out_channels == small.layer1[1].conv1.in_channels == 128
    assert (count_params(model), count_params(small)) == (4073802, 1030442)
    assert small(x).shape == (2, 10)


def test_mobilenet_v2_depthwise_convs_follow_their_expansions():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    _exact(model, x)
    small = _prune(model, x)
    dw = small.features[2].conv[1][0]
    assert (dw.in_channels, dw.out_channels, dw.groups) == (48, 48, 48)  # 96 expanded channels, halved
    assert small.features[2].conv[0][0].out_channels == small.features[2].conv[2].in_channels == 48
    assert (count_params(model), count_params(small)) == (2236682, 587178)
    assert small(x).shape == (2, 10)


# -- layer norms written by hand or with the functional API ---------------------------------------


class RepoLayerNorm(nn.Module):
    """The ConvNeXt repository's ``LayerNorm`` (copied into many user models): channels-last
    through ``F.layer_norm`` with its stored ``normalized_shape``, channels-first by hand."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(normalized_shape) + 0.5)
        self.bias = nn.Parameter(torch.randn(normalized_shape) * 0.1)
        self.eps, self.data_format = eps, data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """The same norm channels-first as torchvision writes it (an nn.LayerNorm subclass
    that permutes), under a name of the user's (torchvision's and timm's are known)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self, repo: bool = True, d: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, d, 4, 4)
        self.stem_norm = RepoLayerNorm(d, data_format="channels_first") if repo else ChannelsFirstLayerNorm(d, eps=1e-6)
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = RepoLayerNorm(d) if repo else nn.LayerNorm(d, eps=1e-6)
        self.pw1, self.pw2, self.gamma = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Parameter(torch.full((d,), 0.1))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        x = x + (self.pw2(F.gelu(self.pw1(y))) * self.gamma).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


def test_a_hand_written_convnext_layer_norm_prunes_like_the_library_ones():
    """Before: the repository's ``LayerNorm`` froze the whole stream (its channels-first
    mean over dim 1 "depends on their number"; its channels-last ``normalized_shape`` is
    stored, "which no plugin rewrites"); the same model with torchvision's norms pruned.
    Now such a module is claimed as a LayerNorm (by its ``data_format``): slicing the same
    channels of both models gives the same outputs. The library form here is an
    ``nn.LayerNorm`` subclass that permutes under a name of the user's: it used to pass the
    channels through unsliced (its last input dim is spatial) and froze its own."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    repo, lib = _seeded(TinyConvNeXt).eval(), _seeded(TinyConvNeXt, repo=False).eval()
    lib.load_state_dict(repo.state_dict())
    assert torch.allclose(repo(x), lib(x), atol=1e-5)
    built = []
    for model in (repo, lib):
        pruner = StructuredPruner(model, x, "magnitude", bias_compensation=False, recalibrate_bn=False)
        g = _group(pruner.graph, "stem")
        assert (g.size, g.prunable, g.normalizes) == (16, 16, True)
        assert {"stem_norm", "norm", "dw", "pw1", "gamma", "head"} <= set(g.modules())
        built.append(pruner.build(_mask(pruner.graph, g, [1, 4, 5, 9, 12]))[0])
    small, reference = built
    assert small.norm.normalized_shape == small.stem_norm.normalized_shape == (11,)
    assert (small.norm.weight.shape, small.stem_norm.bias.shape, small.dw.groups) == ((11,), (11,), 11)
    assert torch.allclose(small(x), reference(x), atol=1e-5)
    half = _prune(repo, x)
    assert (half.stem.out_channels, half.norm.normalized_shape, half.pw1.out_features) == (8, (8,), 32)
    d = 8  # stem, its norm, dw, norm, pw1 (hidden 4d), pw2, gamma, head
    expected = (3 * 16 * d + d) + 2 * d + (49 * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d) + d + (d * 5 + 5)
    assert count_params(half) == count_params(_prune(lib, x)) == expected


class FunctionalNorms(nn.Module):
    """``F.layer_norm`` over a width read at run time and ``F.group_norm``, affine tensors bare."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.literal = nn.Linear(8, 16), nn.Linear(16, 8), literal
        self.w, self.b = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))
        self.gw, self.gb = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))
        self.c = nn.Conv1d(8, 4, 1)

    def forward(self, x):
        h = self.fc1(x)
        h = F.layer_norm(h, (16,) if self.literal else h.shape[-1:], self.w, self.b)
        g = F.group_norm(self.fc2(F.relu(h)).unsqueeze(-1), 2, self.gw, self.gb)
        return self.c(F.relu(g)).squeeze(-1)


class ModuleNorms(FunctionalNorms):
    """The same with ``nn.LayerNorm`` and ``nn.GroupNorm`` modules."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.gn = nn.LayerNorm(16), nn.GroupNorm(2, 8)

    def forward(self, x):
        h = F.relu(self.ln(self.fc1(x)))
        return self.c(F.relu(self.gn(self.fc2(h).unsqueeze(-1)))).squeeze(-1)


def test_layer_and_group_norms_written_with_the_functional_api_prune_like_the_modules():
    """Before: the groups of ``F.layer_norm`` and ``F.group_norm`` over the channels were
    not marked as normalising, so verification compared their slicing with zeroing (they
    differ, as for any norm over channels: 0.34 and 0.68) and skipped them ("pruning it
    breaks the model"); only the module forms pruned. A width written as a literal still
    cannot shrink: verification skips that group and says why."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    fn, mod = _seeded(FunctionalNorms).eval(), _seeded(ModuleNorms).eval()
    with torch.no_grad():
        for a, b in (("ln", ("w", "b")), ("gn", ("gw", "gb"))):
            getattr(mod, a).weight.copy_(getattr(fn, b[0]))
            getattr(mod, a).bias.copy_(getattr(fn, b[1]))
    assert torch.allclose(fn(x), mod(x), atol=1e-5)
    built = []
    for model in (fn, mod):
        pruner = StructuredPruner(model, x, "magnitude", bias_compensation=False, recalibrate_bn=False)
        g1, g2 = _group(pruner.graph, "fc1"), _group(pruner.graph, "fc2")
        assert (g1.size, g1.prunable, g1.normalizes, g2.size, g2.normalizes) == (16, 16, True, 4, True)
        pruned = _mask(pruner.graph, g1, [0, 3, 7, 8, 13]) | _mask(pruner.graph, g2, [1])
        built.append(pruner.build(pruned)[0])
    assert (built[0].w.shape, built[0].gw.shape, built[0].fc2.out_features) == ((11,), (6,), 6)  # 2 groups of 3
    assert torch.allclose(built[0](x), built[1](x), atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no group is skipped
        small = _prune(fn, x)
    assert (small.w.shape, small.gw.shape, small.c.in_channels) == ((8,), (4,), 4)
    with pytest.warns(RuntimeWarning, match=r"fails to run: RuntimeError: Expected weight .* normalized_shape"):
        literal = _prune(_seeded(FunctionalNorms, literal=True).eval(), x)
    assert (literal.w.shape, literal.fc1.out_features, literal.gw.shape) == ((16,), 16, (4,))


class CausalMaskBuffer(nn.Module):
    """OpenAI GPT's causal mask: a ``(1, 1, n_ctx, n_ctx)`` buffer cut to the input's length
    (``bias[:, :, :T, :T]``), whose bounds the trace sees as constants."""

    def __init__(self, n_ctx: int = 16, width: int = 8) -> None:
        super().__init__()
        self.qk = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.register_buffer("bias", torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx))

    def forward(self, x):
        t = x.shape[1]
        q, k = self.qk(x).chunk(2, dim=-1)
        w = (q @ k.transpose(-1, -2)).unsqueeze(1)
        w = w * self.bias[:, :, :t, :t] - 1e4 * (1 - self.bias[:, :, :t, :t])
        return self.out(w.softmax(-1).squeeze(1) @ x)


def test_a_buffer_cut_to_the_input_length_keeps_its_positions():
    """The constant-range rule (the channels after a range's end may go) does not apply
    to a bare tensor: there the bounds are the example's length (4 of 16 positions here),
    and pruning the rest made the pruned model fail on any longer input."""
    torch.manual_seed(0)
    model = CausalMaskBuffer().eval()
    small = StructuredPruner(model, torch.randn(1, 4, 8), importance="magnitude", pruning_ratio=0.5).prune()
    assert small.bias.shape == (1, 1, 16, 16)
    assert small(torch.randn(2, 12, 8)).shape == (2, 12, 8)
