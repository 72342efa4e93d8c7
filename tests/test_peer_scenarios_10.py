"""A tenth set of the scenarios users bring from Torch-Pruning's test suite, written for
CleanAI's API (see ``test_peer_scenarios.py`` to ``_9``): the masking oracle
(``check_pruner``) on models that read a width from another tensor, norms written by hand
(the ConvNeXt repository's channels-first LayerNorm, an RMSNorm, a global response norm),
floor division, and the peer's concat/split and customised-layer tests.

Each test asserts widths, parameter counts, and the masking oracle where slicing must equal
zeroing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_peer_scenarios_2 import _exact
from test_peer_scenarios_6 import _prune, _seeded, _two_step_replay
from torch import nn

from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.metrics import count_params
from cleanai_core.testing import check_pruner

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

X = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))


# -- check_pruner on models that read a width from another tensor --------------------------------


class TensorSplit(nn.Module):
    """``torch.tensor_split(y, 2, dim=1)``: traced as two slices with constant bounds, which
    move with the width (the first range froze, the second looked free). Since session 24
    the trace records it as the split it is, the halves shrink alike and nothing is kept
    whole (``tests/test_leftovers_16.py``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        u, v = torch.tensor_split(self.a(x), 2, dim=1)
        return self.b(u) + self.c(v)


class LiteralExpand(nn.Module):
    """A one-channel gate expanded to a literal width of 8 to meet a conv's 8 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.g, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 1, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.a(x) * self.g(x).expand(-1, 8, -1, -1))


class HeadFromInputWidth(nn.Module):
    """AIMv2's pooling head: the query's head size computed from the *input's* width."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(8, 16)
        self.o, self.h = nn.Linear(16, 8), 2

    def forward(self, x):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.h, c // self.h * 2).transpose(1, 2)
        k = self.k(x).reshape(b, n, self.h, -1).transpose(1, 2)
        v = self.v(x).reshape(b, n, self.h, -1).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.o(a.transpose(1, 2).reshape(b, n, -1))


class WidthOfTheStream(nn.Module):
    """timm's attention written without the timm zoo: ``reshape(B, N, 3, h, C // h)`` with
    ``C`` the stream's width, so the stream and the heads only run when they shrink
    together, and then mix the heads up (the oracle was 0.0021 off, nothing named)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.qkv, self.p = nn.Conv2d(4, 16, 1), nn.Linear(16, 48), nn.Linear(16, 16)
        self.o, self.h = nn.Linear(16, 3), 4

    def forward(self, x):
        t = self.a(x).flatten(2).transpose(1, 2)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.o(self.p(a) + t).mean(1)


@pytest.mark.parametrize(
    "factory, shape, before, after, kept",
    [
        (TensorSplit, (2, 3, 5, 5), 264, 136, []),
        (LiteralExpand, (2, 3, 5, 5), 264, 264, ["(a, b; "]),
        (HeadFromInputWidth, (2, 5, 8), 568, 432, ["(k, q; "]),
        (WidthOfTheStream, (2, 4, 6, 6), 1219, 1219, ["(a, o, p, qkv"]),
    ],
    ids=["tensor_split", "literal_expand", "head_from_input_width", "width_of_the_stream"],
)
def test_check_pruner_keeps_whole_the_groups_the_model_cannot_run_without(factory, shape, before, after, kept):
    """It raised the model's own RuntimeError ("expected input[2, 3, 5, 5] to have 4
    channels", "shape '[2, 5, 2, 8]' is invalid") or reported 0.0021 with nothing named; it
    now keeps those groups whole, as ``prune()``'s verification does, and names them."""
    model, x = _seeded(factory), torch.randn(shape, generator=torch.Generator().manual_seed(1))
    report = check_pruner(model, x)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    assert (report.params_before, report.params_after) == (before, after)
    assert len(report.kept_whole) == len(kept)
    for message, modules in zip(report.kept_whole, kept, strict=True):
        assert modules in message and "breaks the model" in message
    if factory is not WidthOfTheStream:  # prune()'s own plan may shrink the two together in step
        assert count_params(_prune(model, x).pruned) == after  # what prune() keeps


@pytest.mark.corpus
@pytest.mark.parametrize(
    "name, kept, before, after",
    [("dpt", 4, 427_169, 188_561), ("aimv2-vision", 1, 95_808, 60_992), ("hiera", 4, 249_714, 162_194)],
)
def test_check_pruner_on_dpt_aimv2_and_hiera_keeps_their_width_readers_whole(name, kept, before, after):
    """The models of ``docs/compatibility.md``'s session 20 leftover: DPT's readout
    reshaped to the backbone's ``feature_shape``, AIMv2's pooling head sized from its
    input, Hiera's mask units: ``check_pruner`` failed on each."""
    pytest.importorskip("transformers")
    import test_hf_vision

    model, side = test_hf_vision.build(name)
    report = check_pruner(model, (test_hf_vision.pixels(side),), ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    assert (len(report.kept_whole), report.params_before, report.params_after) == (kept, before, after)


class ScalesByWidth(nn.Module):
    """A width read at run time that changes the numbers, not the shapes (RAFT's
    ``1 / sqrt(channels)``): each group runs sliced alone, so the oracle reports it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y / y.shape[1] ** 0.5)


def test_check_pruner_still_reports_a_slicing_that_runs_but_differs_from_zeroing():
    report = check_pruner(_seeded(ScalesByWidth), X)
    assert report.kept_whole == () and report.output_shapes_equal
    assert report.max_abs_diff > 1e-2 and report.params_after < report.params_before


class RandomEveryRun(nn.Module):
    """Dropout left in training mode inside an eval model: no two runs agree."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(F.dropout(self.a(x), 0.5, training=True))


def test_check_pruner_reports_a_model_that_differs_from_itself_without_a_recursion_error():
    """The search for the groups at fault halved an empty list forever (RecursionError)
    where the model fails even with nothing pruned."""
    report = check_pruner(_seeded(RandomEveryRun), X)
    assert report.kept_whole == () and report.max_abs_diff > 1e-2
    assert (report.params_before, report.params_after) == (68, 36)


# -- norms written by hand ------------------------------------------------------------------------


class Norm(nn.Module):
    """A LayerNorm or RMSNorm over the last dim, as the module or written by hand."""

    def __init__(self, kind: str, width: int, hand: bool) -> None:
        super().__init__()
        self.kind, self.hand = kind, hand
        self.weight = nn.Parameter(torch.rand(width) + 0.5)
        self.bias = nn.Parameter(torch.randn(width)) if kind == "layer" else None
        if not hand:
            self.mod = nn.LayerNorm(width) if kind == "layer" else nn.RMSNorm(width, eps=1e-6)
            self.mod.weight, self.mod.bias = self.weight, self.bias

    def forward(self, h):
        if not self.hand:
            return self.mod(h)
        if self.kind == "layer":
            u = h.mean(-1, keepdim=True)
            v = (h - u).pow(2).mean(-1, keepdim=True)
            return (h - u) / torch.sqrt(v + 1e-5) * self.weight + self.bias
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class PreNormBlock(nn.Module):
    def __init__(self, kind: str, hand: bool) -> None:
        super().__init__()
        self.i, self.n, self.f = nn.Linear(8, 12), Norm(kind, 12, hand), nn.Linear(12, 24)
        self.g, self.o = nn.Linear(24, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = self.i(x)
        return self.o(h + self.g(F.gelu(self.f(self.n(h)))))


@pytest.mark.parametrize("kind, after", [("layer", 249), ("rms", 243)])
def test_a_norm_written_by_hand_slices_like_the_module(kind, after):
    """``(h - u) / sqrt(v + eps) * w + b`` and ``h * rsqrt(mean(h^2) + eps) * w`` froze the
    residual stream ("mean across channels depends on their number": 783 -> 483); it now
    normalises like ``nn.LayerNorm`` / ``nn.RMSNorm``: the same groups, and the same units
    removed give the same model."""
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(0))
    built = []
    for hand in (False, True):
        model = _seeded(lambda hand=hand: PreNormBlock(kind, hand))
        graph = DependencyGraph(model, x)
        assert [(g.size, g.prunable, g.normalizes) for g in graph.groups()] == [
            (8, 0, False),
            (12, 12, True),
            (24, 24, False),
            (3, 0, False),
        ]
        pruner = StructuredPruner(model, x, "magnitude", bias_compensation=False, reconstruction=False)
        mask = torch.zeros(pruner.graph.root.numel(), dtype=torch.bool)
        for g in pruner.graph.groups(prunable_only=True):
            mask[g.units[::2]] = True
        small = pruner.build(mask)[0]
        assert count_params(small) == after and small.i.out_features == 6 and small.n.weight.shape == (6,)
        built.append(small)
    assert torch.allclose(built[0](x), built[1](x), atol=1e-5)


class NormOverMaps(nn.Module):
    """A norm over channels and space: ``nn.LayerNorm([8, 6, 6])`` or ``F.layer_norm(y,
    y.shape[1:], w)`` with a bare ``(8, 6, 6)`` weight (or none)."""

    def __init__(self, way: str) -> None:
        super().__init__()
        self.way, self.a, self.b = way, nn.Conv2d(4, 8, 1), nn.Conv2d(8, 2, 1)
        self.weight = nn.Parameter(torch.rand(8, 6, 6) + 0.5) if way != "no_affine" else None
        if way == "module":
            self.n = nn.LayerNorm([8, 6, 6], bias=False)
            self.n.weight = self.weight

    def forward(self, x):
        y = self.a(x)
        return self.b(self.n(y) if self.way == "module" else F.layer_norm(y, y.shape[1:], self.weight))


@pytest.mark.parametrize("way, after", [("functional", 174), ("no_affine", 30)])
def test_a_functional_layer_norm_over_channels_and_space_slices_like_the_module(way, after):
    """``F.layer_norm(y, y.shape[1:])`` froze the channels ("normalises over the channels
    in a way that cannot shrink") where ``nn.LayerNorm([C, H, W])`` pruned them."""
    x, built = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0)), []
    for w in ("module", way):
        model = _seeded(lambda w=w: NormOverMaps(w))
        pruner = StructuredPruner(model, x, "magnitude", bias_compensation=False, reconstruction=False)
        (group,) = pruner.graph.groups(prunable_only=True)
        assert (group.size, group.normalizes) == (8, True)
        mask = torch.zeros(pruner.graph.root.numel(), dtype=torch.bool)
        mask[group.units[::2]] = True
        built.append(pruner.build(mask)[0])
    assert count_params(built[1]) == after and built[1].a.out_channels == 4
    if way == "functional":
        assert built[1].weight.shape == (4, 6, 6)
        assert torch.allclose(built[0](x), built[1](x), atol=1e-5)


class ChannelsFirstLayerNorm(nn.Module):
    """The ConvNeXt repository's ``LayerNorm(data_format="channels_first")`` without its
    attributes: statistics over dim 1, affine ``weight[:, None, None]``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class HandConvNeXt(nn.Module):
    """A ConvNeXt stage: a channels-first LayerNorm after the stem and before the
    downsampling, a depthwise conv, an MLP over channels-last, a layer scale."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.n0 = nn.Conv2d(3, 8, 2, 2), ChannelsFirstLayerNorm(8)
        self.dw, self.ln = nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.LayerNorm(8, eps=1e-6)
        self.p1, self.p2, self.gamma = nn.Linear(8, 32), nn.Linear(32, 8), nn.Parameter(torch.rand(8))
        self.down = nn.Sequential(ChannelsFirstLayerNorm(8), nn.Conv2d(8, 16, 2, 2))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.n0(self.stem(x))
        y = self.p2(F.gelu(self.p1(self.ln(self.dw(x).permute(0, 2, 3, 1))))) * self.gamma
        return self.head(self.down(x + y.permute(0, 3, 1, 2)).mean((2, 3)))


def test_a_convnext_with_hand_written_channels_first_norms_prunes_its_stream():
    """The stream froze (1,691 -> 1,131: only the MLP's hidden units went)."""
    model, x = _seeded(HandConvNeXt), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    groups = DependencyGraph(model, x).groups()
    stream = next(g for g in groups if any(s.module == "stem" and s.kind == "out" for s in g.slices))
    assert (stream.size, stream.prunable, stream.normalizes) == (8, 8, True)
    small = _prune(model, x).pruned
    assert (small.stem.out_channels, small.dw.out_channels, small.p1.out_features) == (4, 4, 16)
    assert small.n0.weight.shape == (4,) and small.down[0].bias.shape == (4,)
    assert count_params(model) == 1691 and count_params(small) == 591
    assert small(x).shape == (2, 3)


class HandGRN(nn.Module):
    """ConvNeXt-V2's global response norm written inline: ``gx / gx.mean(-1, keepdim=True)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Conv2d(3, 8, 1), nn.Linear(8, 2)
        self.g, self.b = nn.Parameter(torch.rand(1, 1, 1, 8)), nn.Parameter(torch.rand(1, 1, 1, 8))

    def forward(self, x):
        y = self.a(x).permute(0, 2, 3, 1)
        gx = torch.norm(y, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(-1, keepdim=True) + 1e-6)
        return self.o(self.g * (y * nx) + self.b + y).mean((1, 2))


class ScaledByStd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.o = nn.Linear(5, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.fc(x))
        return self.o(h / (h.std(-1, keepdim=True) + 1))


class CastAndExpanded(nn.Module):
    """Statistics cast to another dtype and expanded back over the channels before they
    come back (``u.expand_as(y)``, ``v.double()...to(y.dtype)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        u = y.mean(1, keepdim=True).expand_as(y)
        v = (y - u).pow(2).mean(1, keepdim=True).double().expand_as(y)
        return self.b((y - u) / (v + 1e-5).sqrt().to(y.dtype))


@pytest.mark.parametrize(
    "factory, x, before, after",
    [(HandGRN, X, 66, 34), (ScaledByStd, X[0, 0], 147, 75), (CastAndExpanded, X, 50, 26)],
    ids=["response_norm", "scaled_by_std", "cast_and_expanded"],
)
def test_channels_rescaled_by_their_own_statistic_prune_as_normalised(factory, x, before, after):
    model = _seeded(factory)
    assert [g.normalizes for g in DependencyGraph(model, x).groups(prunable_only=True)] == [True]
    small = _prune(model, x).pruned
    assert (count_params(model), count_params(small)) == (before, after)


class Statistic(nn.Module):
    def __init__(self, way: str) -> None:
        super().__init__()
        self.way = way
        self.a, self.s = nn.Conv2d(3, 8, 1), nn.Conv2d(2, 1, 7, padding=3)
        self.b = nn.Conv2d(9 if way == "minibatch_std" else 8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if self.way == "cbam":  # a channel mean and max fed to a conv: the statistic escapes
            y = y * torch.sigmoid(self.s(torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)))
        elif self.way == "minibatch_std":  # StyleGAN: a deviation concatenated as a feature
            y = torch.cat([y, y.std(1, keepdim=True)], 1)
        else:  # centring alone rescales nothing
            y = y - y.mean(1, keepdim=True)
        return self.b(y)


@pytest.mark.parametrize(
    "way, says",
    [
        ("cbam", "amax across channels depends on their number"),
        ("minibatch_std", "std across channels depends on their number"),
        ("centred", "mean across channels depends on their number"),
    ],
)
def test_a_statistic_over_channels_that_escapes_or_only_centres_still_freezes_them(way, says):
    model = _seeded(lambda: Statistic(way))
    graph = DependencyGraph(model, X)
    a = next(g for g in graph.groups() if any(s.module == "a" and s.kind == "out" for s in g.slices))
    assert a.prunable == 0 and any(says in r for r in a.reasons), a.reasons
    with pytest.raises(UserError, match="nothing in this model can be pruned"):
        StructuredPruner(model, X, "magnitude")


class StoredWidthNorm(nn.Module):
    """A norm written by hand in a module that stores its width as a plain int (I-BERT's
    ``IntLayerNorm``, whose quantised mode reads it): nothing rewrites it after slicing."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.normalized_shape, self.weight = width, nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, h):
        u = h.mean(-1, keepdim=True)
        return (h - u) / torch.sqrt((h - u).pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def test_a_norm_written_in_a_module_that_stores_its_width_keeps_its_channels():
    model = _seeded(lambda: nn.Sequential(nn.Linear(5, 12), StoredWidthNorm(12), nn.Linear(12, 3)))
    (group,) = [g for g in DependencyGraph(model, torch.randn(2, 5)).groups() if g.size == 12]
    assert group.prunable == 0
    assert any("normalises over a width stored in its module's normalized_shape" in r for r in group.reasons)


# -- floor division --------------------------------------------------------------------------------


class FloorDivided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(self.a(x) // 0.5 + torch.floor_divide(self.c(x), 2.0))


def test_floor_division_passes_the_channels():
    """``aten.floor_divide`` carries no ``pointwise`` tag: "channels reach op
    aten.floor_divide.default ..., which ignored them", nothing pruned."""
    model = _seeded(FloorDivided)
    _exact(model, X)
    assert (count_params(model), count_params(_prune(model, X).pruned)) == (82, 42)


# -- the peer's concat / split and customised-layer tests ---------------------------------------


def _cbr(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 1), nn.BatchNorm2d(o), nn.GELU())


class CatSplitNotChannels(nn.Module):
    """The peer's ``test_non_feature_dim_cat``: two paths concatenated along the height, a
    conv, and split back by the paths' heights read at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2, self.c1, self.c2 = _cbr(4, 4), _cbr(4, 4), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x1, x2 = self.b1(x), self.b2(x)
        y = self.c1(torch.cat([x1, x2], 2))
        a, _ = torch.split(y, [x1.shape[2], x2.shape[2]], 2)
        return self.c2(a)


class CatSplitByAttributes(nn.Module):
    """The peer's ``test_concat_split``: a split whose sizes are computed from layers'
    attributes, one part concatenated with a parallel path, the other added back."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Sequential(_cbr(4, 4), nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8))
        self.p = _cbr(4, 4)
        self.b2 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        x3, x = self.p(x), self.b1(x)
        c1 = self.b2[0].in_channels - self.p[1].num_features
        x1, x2 = torch.split(x, (c1, self.b1[2].num_features - c1), 1)
        return self.b2(torch.cat([x1, x3], 1)) + x2


class CustomisedLayer(nn.Module):
    """The peer's ``test_unused_parameters``: a layer normalising by the L2 norm over the
    channels, with its own scale and bias, and a parameter the model never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc, self.fc2 = nn.Linear(16, 12), nn.Linear(12, 12), nn.Linear(12, 5)
        self.scale, self.bias = nn.Parameter(torch.rand(12)), nn.Parameter(torch.randn(12))
        self.unused = nn.Parameter(torch.randn(10))

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = x / x.pow(2).sum(1, keepdim=True).sqrt()
        return self.fc2(self.fc(x * self.scale + self.bias))


@pytest.mark.parametrize(
    "factory, shape, before, after",
    [
        (CatSplitNotChannels, (2, 4, 6, 6), 96, 46),
        (CatSplitByAttributes, (2, 4, 6, 6), 156, 104),
        (CustomisedLayer, (3, 16), 459, 201),
    ],
    ids=["cat_split_not_channels", "cat_split_by_attributes", "customised_layer"],
)
def test_the_peers_concat_split_and_customised_layer_tests_prune_exactly(factory, shape, before, after):
    model, x = _seeded(factory), torch.randn(shape, generator=torch.Generator().manual_seed(0))
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (count_params(model), count_params(small)) == (before, after)
    assert small(x).shape == model(x).shape


@pytest.mark.parametrize(
    "factory, shape, after",
    [
        (HandConvNeXt, (2, 3, 8, 8), 591),
        (lambda: PreNormBlock("layer", True), (2, 5, 8), 249),
        (lambda: NormOverMaps("functional"), (2, 4, 6, 6), 174),
        (HandGRN, (2, 3, 5, 5), 34),
    ],
    ids=["convnext", "layer_norm", "functional_over_maps", "response_norm"],
)
def test_two_step_histories_of_hand_written_norms_replay_on_fresh_copies(factory, shape, after, tmp_path):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    pruner, small, fresh = _two_step_replay(factory, x, tmp_path)
    assert len(pruner.history) == 2 and count_params(fresh) == count_params(small) == after
    assert torch.equal(fresh(x), small(x))
