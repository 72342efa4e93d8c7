"""A twelfth set of the scenarios users bring from Torch-Pruning's test suite, written for
CleanAI's API (see ``test_peer_scenarios.py`` to ``_11``): attention whose head count is
given to ``unflatten`` or to a view with a computed head width, layer subclasses that carry
tensors of their own (LoRA, a per-channel gain), a hand-written GELU over 16 features, and
``check_pruner`` on a model with the user's own hooks.

Each test asserts widths, parameter counts, and the masking oracle where slicing must equal
zeroing."""

from __future__ import annotations

import dataclasses
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_peer_scenarios_6 import _seeded, _two_step_replay
from torch import nn

from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core.metrics import count_params
from cleanai_core.testing import check_pruner

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _group_of(graph: DependencyGraph, module: str, slice_name: str = "out"):
    return next(g for g in graph.groups() if any(s.module == module and s.name == slice_name for s in g.slices))


# -- a head count given to unflatten, or a head width computed from the stream -----------------


class CountedHeads(nn.Module):
    """``qkv(x).unflatten(-1, (3, self.h, -1))`` or ``view(b, n, 3, self.h, c // self.h)``:
    the head count is a number the module stores, the head width is computed. Neither
    view reaches the trace with a ``-1``: ``unflatten`` and ``c // self.h`` hand it the
    sizes they computed."""

    def __init__(self, form: str, dim: int = 32, h: int = 8, sdpa: bool = False) -> None:
        super().__init__()
        self.form, self.h, self.sdpa = form, h, sdpa
        self.inp, self.qkv = nn.Linear(5, dim), nn.Linear(dim, 3 * dim)
        self.proj, self.out = nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.inp(x)
        b, n, c = x.shape
        if self.form == "unflatten":
            t = self.qkv(x).unflatten(-1, (3, self.h, -1))
        else:
            t = self.qkv(x).view(b, n, 3, self.h, c // self.h)
        q, k, v = t.permute(2, 0, 3, 1, 4)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1) @ v
        return self.out(x + self.proj(y.transpose(1, 2).reshape(b, n, -1)))


X5 = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("form", ["unflatten", "computed_width"])
@pytest.mark.parametrize("heads", [8, 2], ids=["8_heads_of_4", "2_heads_of_16"])
def test_a_head_count_given_to_unflatten_or_a_computed_view_leaves_the_head_width_to_prune(form, heads):
    """The stored-count rule looked for a ``-1`` in the view's sizes; without one, the
    cheapest part was chosen: 8 heads of 4 chose the heads, the sliced model ran with the
    stored count and mixed them (``unflatten``: oracle 2.9e-3, nothing named; the computed
    width: both groups kept whole, 4,515 parameters before and after)."""
    model = _seeded(lambda: CountedHeads(form, h=heads))
    report = check_pruner(model, X5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5 and report.kept_whole == ()
    width = _group_of(DependencyGraph(model, X5), "qkv")
    assert width.units.numel() == width.prunable == 32 // heads  # a dim of every head, never a head
    small = StructuredPruner(model, X5, "magnitude", pruning_ratio=0.5).prune()
    assert small.qkv.out_features == 48 and small.proj.in_features == 16 and small.inp.out_features == 16
    assert (count_params(model), count_params(small)) == (4515, 1235)
    assert small(X5).shape == (2, 5, 3)


@pytest.mark.parametrize("dim, heads", [(32, 8), (16, 4)], ids=["8_heads_of_4", "4_heads_of_4"])
def test_sdpa_after_unflatten_keeps_the_head_width_with_the_reason_and_prunes_the_stream(dim, heads):
    """With SDPA's default scale the head width cannot shrink; the heads were chosen in its
    place and mixed (oracle 2.9e-3 / 4.6e-3). 16 features in 4 heads of 4: the head count
    and the head width are the same stored number, and the qkv outputs stay whole."""
    model = _seeded(lambda: CountedHeads("unflatten", dim=dim, h=heads, sdpa=True))
    report = check_pruner(model, X5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5 and report.kept_whole == ()
    qkv = _group_of(DependencyGraph(model, X5), "qkv")
    assert qkv.prunable == 0
    small = StructuredPruner(model, X5, "magnitude", pruning_ratio=0.5).prune()
    assert small.qkv.out_features == 3 * dim and small.inp.out_features == dim // 2
    assert count_params(small) == {32: 2307, 16: 643}[dim]


def test_the_computed_width_with_sdpa_names_the_scale_and_keeps_the_stream_whole():
    """``view(b, n, 3, self.h, c // self.h)`` before SDPA: the head width is frozen in the
    graph by the default scale; the stream, whose width sets ``c // self.h``, is the one
    group verification keeps whole (it named the head-width group too)."""
    model = _seeded(lambda: CountedHeads("computed_width", sdpa=True))
    graph = DependencyGraph(model, X5)
    assert any("head dimension with the default scale" in r for r in _group_of(graph, "qkv").reasons)
    report = check_pruner(model, X5)
    assert report.max_abs_diff == 0 and len(report.kept_whole) == 1
    assert "(inp, out, proj, qkv" in report.kept_whole[0] and "breaks the model" in report.kept_whole[0]


@dataclasses.dataclass
class Settings:
    heads: int = 8
    layers: int = 2


class HeadsConfig:
    """A plain settings class, named as transformers names its own."""

    def __init__(self) -> None:
        self.heads, self.vocab = 8, 100


class HeadsFromSettings(nn.Module):
    """``reshape(b, n, 3, self.cfg.heads, -1)``: the head count is read from a settings
    object the module holds, not from an int attribute of its own."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.cfg = {
            "dataclass": Settings(),
            "namespace": types.SimpleNamespace(heads=8, layers=2),
            "dict": {"heads": 8, "layers": 2},
            "config_class": HeadsConfig(),
        }[kind]
        self.inp, self.qkv = nn.Linear(5, 32), nn.Linear(32, 96)
        self.proj, self.out = nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        x = self.inp(x)
        b, n, _ = x.shape
        heads = self.cfg["heads"] if self.kind == "dict" else self.cfg.heads
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        y = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1) @ v
        return self.out(x + self.proj(y.transpose(1, 2).reshape(b, n, -1)))


@pytest.mark.parametrize("kind", ["dataclass", "namespace", "dict", "config_class"])
def test_a_head_count_read_from_a_settings_object_is_a_stored_number(kind):
    """Only int attributes of the module counted as stored: the 8 heads of 4 were chosen
    and mixed (``check_pruner`` 4e-3 off; ``prune()``'s verification kept the group, 2,307)."""
    model = _seeded(lambda: HeadsFromSettings(kind))
    report = check_pruner(model, X5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5 and report.kept_whole == ()
    width = _group_of(DependencyGraph(model, X5), "qkv")
    assert width.units.numel() == width.prunable == 4
    small = StructuredPruner(model, X5, "magnitude", pruning_ratio=0.5).prune()
    assert small.qkv.out_features == 48 and count_params(small) == 1235


class HandedHeads(nn.Module):
    """An attention core whose ``forward`` is handed the head count by its block."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x, heads):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        y = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class BlockWithHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads, self.inp, self.attn, self.out = 8, nn.Linear(5, 32), HandedHeads(), nn.Linear(32, 3)

    def forward(self, x):
        x = self.inp(x)
        return self.out(x + self.attn(x, self.heads))


def test_a_head_count_handed_to_the_forward_is_a_stored_number():
    """Only numbers the module holds counted: handed in by the block, the 8 heads of 4 were
    chosen and mixed (``check_pruner`` 2e-3 off; verification kept the group, 2,307)."""
    model = _seeded(BlockWithHeads)
    report = check_pruner(model, X5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5 and report.kept_whole == ()
    assert _group_of(DependencyGraph(model, X5), "attn.qkv").units.numel() == 4
    assert count_params(StructuredPruner(model, X5, "magnitude", pruning_ratio=0.5).prune()) == 1235


# -- layer subclasses that carry tensors of their own ------------------------------------------


class LoRALinear(nn.Linear):
    """A linear layer with a low-rank update of its own: ``x @ A^T @ B^T`` beside the weight."""

    def __init__(self, fin: int, fout: int, rank: int = 2) -> None:
        super().__init__(fin, fout)
        self.A, self.B = nn.Parameter(torch.randn(rank, fin) * 0.3), nn.Parameter(torch.randn(fout, rank) * 0.3)

    def forward(self, x):
        return super().forward(x) + (x @ self.A.t()) @ self.B.t()


class PeftLinear(nn.Linear):
    """PEFT's way: the update's factors are linear submodules, scaled by a float."""

    def __init__(self, fin: int, fout: int, rank: int = 2) -> None:
        super().__init__(fin, fout)
        self.lora_A, self.lora_B = nn.Linear(fin, rank, bias=False), nn.Linear(rank, fout, bias=False)
        self.scaling = 0.5
        nn.init.normal_(self.lora_B.weight)

    def forward(self, x):
        return super().forward(x) + self.lora_B(self.lora_A(x)) * self.scaling


class GainLinear(nn.Linear):
    """A per-output gain multiplied after ``F.linear``."""

    def __init__(self, fin: int, fout: int) -> None:
        super().__init__(fin, fout)
        self.g = nn.Parameter(torch.rand(fout) + 0.5)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.g


class ClippingLinear(nn.Linear):
    """A forward that only clips the weight around ``super().forward``: nothing of its own."""

    def forward(self, x):
        with torch.no_grad():
            self.weight.clamp_(-0.5, 0.5)
        return super().forward(x)


class Stack(nn.Module):
    def __init__(self, layer) -> None:
        super().__init__()
        self.a, self.b, self.c = layer(6, 16), layer(16, 16), layer(16, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


T6 = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "layer, after",
    [(LoRALinear, 196), (PeftLinear, 196), (GainLinear, 174)],
    ids=["own_parameters", "submodules", "gain"],
)
def test_a_layer_subclass_with_tensors_of_its_own_prunes_through_its_forward(layer, after, tmp_path):
    """The linear pruner claimed any ``nn.Linear`` and sliced its weight and bias only: the
    update's factors (or the gain) kept 16 columns, the copy failed ("The size of tensor a
    (8) must match the size of tensor b (16)") and verification kept both hidden groups
    whole (581 parameters before and after); PEFT's scaling of 0.5 over 16 features was
    also taken for an attention scale. Such a module is now traced through its forward."""
    model = _seeded(lambda: Stack(layer))
    report = check_pruner(model, T6)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5 and report.kept_whole == ()
    pruner = StructuredPruner(model, T6, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert pruner.skipped_groups == [] and count_params(small) == after
    assert small.b.weight.shape == (8, 8) and small(T6).shape == (2, 5, 3)
    if layer is PeftLinear:
        assert small.b.lora_A.in_features == 8 and small.b.lora_B.out_features == 8
    _, small, fresh = _two_step_replay(lambda: Stack(layer), T6, tmp_path)
    assert count_params(fresh) == count_params(small) < count_params(model)
    assert torch.equal(fresh(T6), small(T6))


class GatedBatchNorm(nn.BatchNorm2d):
    """A BatchNorm with a per-channel gate of its own after ``super().forward``."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.gate = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x):
        return super().forward(x) * self.gate


class GatedConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.c = nn.Conv2d(3, 8, 3, padding=1), GatedBatchNorm(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.bn(self.a(x))))


def test_a_timm_vit_with_lora_linears_prunes_its_mlps_and_stream():
    """Every linear of a timm ViT's blocks replaced by the LoRA subclass: every group was
    kept whole by verification (1,052,165 parameters before and after). Traced through,
    the MLPs and the stream prune exactly; verification keeps the head groups whole (the
    attention reshapes by its stored ``head_dim``: "shape '[1, 5, 3, 3, 64]' is invalid")."""
    timm = pytest.importorskip("timm")

    def lora_vit() -> nn.Module:
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5, depth=2)
        for parent in list(model.blocks.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    lora = LoRALinear(child.in_features, child.out_features)
                    lora.load_state_dict(child.state_dict(), strict=False)
                    setattr(parent, name, lora)
        return model

    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = _seeded(lora_vit)
    report = check_pruner(model, x)
    assert report.max_abs_diff < 1e-5 and len(report.kept_whole) == 2  # one head group per block
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    assert (count_params(model), count_params(small)) == (1052165, 376901) and small(x).shape == (1, 5)
    assert small.blocks[0].mlp.fc1.weight.shape == (384, 96) and small.blocks[0].mlp.fc1.A.shape[1] == 96


def test_a_norm_subclass_with_a_gate_of_its_own_prunes_through_its_forward():
    """The gate kept 8 channels, verification kept the group whole (284 before and after)."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = _seeded(GatedConvNet)
    report = check_pruner(model, x)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == () and report.params_after == 144
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    assert small.bn.gate.shape == (4, 1, 1) and small.bn.running_mean.shape == (4,) and count_params(small) == 144


class StatConv(nn.Conv2d):
    """A conv that keeps a running mean of its output channels in a buffer of its own."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("ema", torch.zeros(self.out_channels))

    def forward(self, x):
        y = super().forward(x)
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * y.mean((0, 2, 3)))
        return y


class StatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = StatConv(3, 8, 3, padding=1), StatConv(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_a_conv_subclass_tracking_its_outputs_in_a_buffer_prunes_the_buffer_too():
    """The buffer kept 8 entries and the copy failed ("The size of tensor a (8) must match
    the size of tensor b (4)"): both groups kept whole, 844 parameters before and after."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = _seeded(StatNet)
    report = check_pruner(model, x)
    assert report.max_abs_diff < 1e-6 and report.kept_whole == () and report.params_after == 280
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    small(x)
    assert small.a.ema.shape == (4,) and small.b.weight.shape == (4, 4, 3, 3) and count_params(small) == 280


def test_a_subclass_that_only_wraps_super_forward_stays_claimed():
    model = _seeded(lambda: Stack(ClippingLinear))
    text = DependencyGraph(model, T6).explain()
    assert "b: ClippingLinear -> cleanai_plugins.layers.linear" in text
    small = StructuredPruner(model, T6, "magnitude", pruning_ratio=0.5).prune()
    assert small.b.in_features == small.b.out_features == 8 and count_params(small) == 155


# -- a scalar that equals the fourth root of an attention scale --------------------------------


class TokenGelu(nn.Module):
    """A GELU written out (``0.5 * y * (1 + erf(y / sqrt 2))``) over 16 features: 0.5 is
    ``16 ** -0.25``, the factor SDPA's math path puts on ``q`` and ``k``."""

    def __init__(self, width: int = 16, factor: float = 0.5) -> None:
        super().__init__()
        self.factor = factor
        self.a, self.b = nn.Linear(6, width), nn.Linear(width, 3)

    def forward(self, x):
        y = self.a(x)
        return self.b(y * self.factor * (1 + torch.erf(y * 0.7071067811865476)))


@pytest.mark.parametrize("width, factor, after", [(16, 0.5, 83), (256, 0.25, 1283)], ids=["16", "256"])
def test_a_scalar_equal_to_the_attention_scale_elsewhere_is_element_wise(width, factor, after):
    """It froze the features: "attention scale depends on the head size"; nothing pruned."""
    model = _seeded(lambda: TokenGelu(width, factor))
    report = check_pruner(model, T6)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == () and report.params_after == after


def test_the_scale_of_sdpas_math_path_still_keeps_the_head_width():
    """``q * E ** -0.25`` expanded and viewed for ``bmm`` (SDPA run through its math path)
    still keeps the head width whole, with the reason."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class MathPath(CountedHeads):
        def forward(self, x):
            with sdpa_kernel(SDPBackend.MATH):
                return super().forward(x)

    model = _seeded(lambda: MathPath("unflatten", dim=64, h=4, sdpa=True))
    graph = DependencyGraph(model, X5)
    reasons = _group_of(graph, "qkv").reasons
    assert any("attention scale depends on the head size" in r for r in reasons)
    report = check_pruner(model, X5)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == ()


# -- the user's hooks -----------------------------------------------------------------------------


class Hooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Linear(8, 4)
        self.a.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
        self.bn.register_forward_hook(lambda m, i, o: o * 0.5 + 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.bn(self.a(x))))).mean((2, 3)))


def test_check_pruner_compares_without_the_users_hooks_as_prune_does():
    """The masked original ran without the user's hooks, the sliced copy with copies of
    them: 0.067 apart for every group."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    report = check_pruner(_seeded(Hooked), x)
    assert report.max_abs_diff < 1e-6 and (report.params_before, report.params_after) == (860, 288)


# -- ignoring a bare tensor ---------------------------------------------------------------------


class Positions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e, self.pos, self.o = nn.Linear(6, 16), nn.Parameter(torch.randn(1, 5, 16)), nn.Linear(16, 3)

    def forward(self, x):
        return self.o(torch.relu(self.e(x) + self.pos))


def test_ignoring_a_bare_tensor_keeps_its_channels():
    """The peer ignores modules only; given ``model.pos`` the error pointed to an
    ``unwrapped_parameters`` option CleanAI does not have, and ``"pos"`` got no hint. Since
    session 24 (``test_peer_scenarios_15``) a bare tensor may be ignored: its channels stay,
    as ignoring the layer that makes them keeps them."""
    model = _seeded(Positions)
    assert _group_of(DependencyGraph(model, T6), "", "pos").prunable == 16  # found by itself
    assert not DependencyGraph(model, T6, ignored_layers=[model.e]).groups(prunable_only=True)
    for spec in (model.pos, "pos"):
        graph = DependencyGraph(model, T6, ignored_layers=[spec])
        assert not graph.groups(prunable_only=True)
        assert "ignored tensor pos" in _group_of(graph, "", "pos").reasons


# -- the default criterion on a model without a layer input to measure ------------------------


class BareMLP(nn.Module):
    """The peer's unwrapped parameters: weights used by ``F.linear`` directly."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 6) * 0.3), nn.Parameter(torch.zeros(16))
        self.w2 = nn.Parameter(torch.randn(3, 16) * 0.3)

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2)


@pytest.mark.parametrize("factory, after", [(BareMLP, 80), (lambda: Stack(LoRALinear), 196)], ids=["bare", "lora"])
def test_weight_activation_scores_a_model_whose_groups_no_layer_input_measures(factory, after):
    """``collect_activations`` found no layer input to measure, and scoring then refused:
    "WeightActivationImportance scores activations: call pruner.collect_activations(loader)
    first", which had been called. Such groups fall back to their weights."""
    model = _seeded(factory)
    pruner = StructuredPruner(model, T6, "weight_activation", pruning_ratio=0.5)
    pruner.collect_activations([T6, T6], progress=False)
    small = pruner.prune()
    assert count_params(small) == after and small(T6).shape == (2, 5, 3)


def test_weight_activation_still_asks_for_the_data_where_a_layer_input_measures_it():
    from cleanai_core.errors import UserError

    pruner = StructuredPruner(_seeded(lambda: Stack(nn.Linear)), T6, "weight_activation", pruning_ratio=0.5)
    with pytest.raises(UserError, match="call pruner.collect_activations"):
        pruner.prune()


# -- ignoring a layer no plugin claims ----------------------------------------------------------


def test_a_ratio_for_a_layer_traced_through_applies_to_its_output_channels():
    """``layer_pruning_ratios={layer: r}`` for a layer without slices of its own (its
    tensors are bare) changed nothing: the LoRA linear kept 16 outputs, the ConvNeXt
    stream 8 (1,691 before and after)."""
    from test_peer_scenarios_10 import HandConvNeXt

    model = _seeded(lambda: Stack(LoRALinear))
    small = StructuredPruner(model, T6, "magnitude", pruning_ratio=0.0, layer_pruning_ratios={model.a: 0.75}).prune()
    assert small.a.weight.shape == (4, 6) and small.b.weight.shape == (16, 4) and small.c.weight.shape == (3, 16)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = _seeded(HandConvNeXt)
    assert "n0" in _group_of(DependencyGraph(model, x), "stem").layers
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.0, layer_pruning_ratios={"n0": 0.5}).prune()
    assert small.stem.out_channels == small.n0.weight.numel() == 4 and small.p1.out_features == 32
    assert count_params(small) == 895


def test_ignoring_a_layer_traced_through_keeps_its_output_channels():
    """A LoRA linear (traced through) and a channels-first LayerNorm written by hand were
    ignored in name only: their output channels were pruned (16 -> 8; the ConvNeXt stream
    8 -> 4). A custom layer inside an ignored container stays free (the container's claimed
    layers are what it keeps)."""
    from test_peer_scenarios_10 import HandConvNeXt

    model = _seeded(lambda: Stack(LoRALinear))
    small = StructuredPruner(model, T6, "magnitude", pruning_ratio=0.5, ignored_layers=[model.a]).prune()
    assert small.a.weight.shape == (16, 6) and small.b.weight.shape == (8, 16) and small.a.B.shape[0] == 16
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = _seeded(HandConvNeXt)
    graph = DependencyGraph(model, x, ignored_layers=[model.n0])
    stream = _group_of(graph, "stem")
    assert stream.prunable == 0 and any("ignored layer n0" in r for r in stream.reasons)
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.n0]).prune()
    assert small.stem.out_channels == 8 and small.n0.weight.shape == (8,) and count_params(small) == 1131
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.down]).prune()
    assert small.stem.out_channels == 4 and small.down[1].out_channels == 16


# -- a layer the example inputs never run -------------------------------------------------------


class TwoTasks(nn.Module):
    """A shared trunk and a head per task, chosen by an argument: the example inputs run one."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({"cls": nn.Linear(16, 5), "reg": nn.Linear(16, 2)})

    def forward(self, x, task: str = "cls"):
        return self.heads[task](self.trunk(x))


def test_a_head_the_example_inputs_never_run_is_named_in_a_warning():
    """The trunk shrank, the other task's head kept 16 inputs, and ``model(x, "reg")``
    failed afterwards ("mat1 and mat2 shapes cannot be multiplied") without a word."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"1 layer\(s\) never ran on the example inputs \(heads.reg\)"):
        small = StructuredPruner(_seeded(TwoTasks), x, "magnitude", pruning_ratio=0.5).prune()
    assert small.heads.cls.in_features == 8 and small.heads.reg.in_features == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer ran: no such warning
        StructuredPruner(_seeded(lambda: Stack(nn.Linear)), T6, "magnitude", pruning_ratio=0.5).prune()
