"""Session 19 model coverage: one focused check per cause fixed (tiny configs, default suite)."""

from __future__ import annotations

import pytest
import torch
from test_models_6 import between, groups_with, n_params, redrawn  # the session-16 tests' helpers
from test_models_7 import replayed
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.testing import check_pruner

# -- ReXNet: the shortcut is added to a fixed range of the block's output -------------------------


def test_shortcut_added_to_the_first_channels_of_a_wider_output_prunes_the_stream():
    pytest.importorskip("timm")
    from timm.models.rexnet import LinearBottleneck

    torch.manual_seed(0)
    block = LinearBottleneck(8, 12, 1, exp_ratio=2.0, se_ratio=0.25)
    stem, pool = nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1)
    model = redrawn(between(stem=stem, block=block, pool=pool, flat=nn.Flatten(), head=nn.Linear(12, 3))).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    # ``cat([x[:, 0:in_channels] + shortcut, x[:, in_channels:]])``: the fixed range froze the stream
    assert [(g.size, g.prunable) for g in groups_with(graph, "stem", "out")] == [(8, 8)]  # was [(8, 0)]
    assert sorted((g.size, g.prunable) for g in groups_with(graph, "block.conv_pwl.conv", "out")) == [(4, 4), (8, 8)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    assert (report.params_before, report.params_after) == (971, 375)  # was 971 -> 571
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head])
    small = pruner.prune()
    assert (small.stem.out_channels, small.block.in_channels, small.block.conv_pwl.conv.out_channels) == (4, 4, 6)
    with torch.no_grad():
        assert torch.equal(replayed(model, pruner.history)(x), small(x))


# -- CondConv: per-sample expert filters mixed inside the module ----------------------------------


def test_conditional_conv_experts_prune_like_a_plain_conv(tmp_path):
    pytest.importorskip("timm")
    from timm.models._efficientnet_blocks import CondConvResidual

    torch.manual_seed(0)
    block = CondConvResidual(8, 8, dw_kernel_size=3, exp_ratio=2.0, se_layer=None, num_experts=3)
    stem, pool = nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1)
    model = redrawn(between(stem=stem, block=block, pool=pool, flat=nn.Flatten(), head=nn.Linear(8, 3))).eval()
    x = torch.randn(2, 3, 2, 2)  # at 2 x 2 the filters mixed by `routing @ weight` froze the stream: [(8, 0)]
    graph = DependencyGraph(model, x)
    assert [(g.size, g.prunable) for g in groups_with(graph, "stem", "out")] == [(8, 8)]
    assert [(g.size, g.prunable) for g in groups_with(graph, "block.conv_pw", "out")] == [(16, 16)]
    assert [(g.size, g.prunable) for g in groups_with(graph, "block.routing_fn", "out")] == [(3, 0)]  # the experts
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    assert (report.params_before, report.params_after) == (1558, 590)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head])
    small = pruner.prune()
    pw, dw, pwl = small.block.conv_pw, small.block.conv_dw, small.block.conv_pwl
    assert (pw.out_channels, dw.groups, dw.weight.shape) == (8, 8, (3, 72))
    assert (pwl.in_channels, pwl.weight.shape) == (8, (3, 32))
    assert pwl.weight_shape == (4, 8, 1, 1)
    with torch.no_grad():
        assert torch.equal(replayed(model, pruner.history)(x), small(x))
    torch.save(small, tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=False)(x), small(x))


# -- CoaT's factorised attention: qkv viewed with C // num_heads, output reshaped to C -----------

COAT = {"img_size": 32, "embed_dims": (32, 32, 32, 32), "serial_depths": (1, 1, 1, 1), "mlp_ratios": (2, 2, 2, 2)}


def test_coat_factorised_attention_frees_the_stream_from_its_heads(tmp_path):
    timm = pytest.importorskip("timm")
    from cleanai_core import load_pruned
    from cleanai_core.io import save_pruned

    torch.manual_seed(0)
    model = redrawn(timm.create_model("coat_lite_tiny", num_classes=3, num_heads=8, **COAT)).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = DependencyGraph(model, x)
    # was [(3, 3), (2, 2), (3, 3)]: the stream pruned in head-sized blocks, grouped by CRPE window
    assert [(g.size, g.prunable) for g in groups_with(graph, "patch_embed1.proj", "out")] == [(32, 32)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    attn = small.serial_blocks1[0].factoratt_crpe
    assert (n_params(model), n_params(small)) == (53923, 17379)  # was 53923 -> 21943
    assert (type(attn).__name__, attn.num_heads, small.patch_embed1.proj.out_channels) == (
        "PrunedFactorAttnConvRelPosEnc",
        5,
        16,
    )
    with torch.no_grad():
        assert float((small(x) - model(x)).abs().max()) > 1e-3  # the comparisons below have teeth
        assert torch.equal(replayed(model, pruner.history)(x), small(x))
    kwargs = {"num_heads": 8, **COAT}
    save_pruned(
        tmp_path / "o", small, pruner.history, "timm:coat_lite_tiny", {"num_classes": 3, "model_kwargs": kwargs}
    )
    back = load_pruned(tmp_path / "o", trust_code=True)
    torch.save(small, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(x), small(x)) and torch.equal(again(x), small(x))


# -- BoTNet / HaloNet attention with q / k narrower than v (qk_ratio < 1) --------------------------


@pytest.mark.parametrize(
    "kind,side,proj,before,after",
    [("bottleneck", 4, "qkv", 1408, 1024), ("halo", 8, "kv", 1440, 1056)],
    ids=["botnet", "halonet"],
)
def test_bottleneck_attention_with_narrower_queries_prunes_its_values(kind, side, proj, before, after):
    pytest.importorskip("timm")
    from timm.layers.bottleneck_attn import BottleneckAttn
    from timm.layers.halo_attn import HaloAttn

    torch.manual_seed(0)
    if kind == "bottleneck":  # split(qkv, [16, 16, 32]) before the heads
        attn = BottleneckAttn(32, 32, feat_size=(4, 4), num_heads=4, qk_ratio=0.5)
    else:  # split(kv, [4, 8]) inside every head
        attn = HaloAttn(32, 32, feat_size=(8, 8), num_heads=4, block_size=4, halo_size=1, qk_ratio=0.5)
    model = redrawn(between(stem=nn.Conv2d(3, 32, 1), attn=attn, post=nn.Conv2d(32, 8, 1))).eval()
    x = torch.randn(2, 3, side, side)
    graph = DependencyGraph(model, x)
    # the split's unequal parts froze the values and everything reading them
    values = [g for g in groups_with(graph, "post", "in") if g.prunable]
    assert [(g.size, g.prunable) for g in values] == [(8, 8)]  # one unit per value channel of a head
    assert any(f"{s.module}:{s.name}" == f"attn.{proj}:out" for s in values[0].slices)
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.post])
    small = pruner.prune()
    assert n_params(small) == after < before  # before: the values and the stream's output side stayed
    a = small.attn
    assert (a.num_heads, a.dim_head_qk, a.dim_head_v, a.dim_out_qk, a.dim_out_v) == (4, 4, 4, 16, 16)
    with torch.no_grad():
        assert float((small(x) - model(x)).abs().max()) > 1e-2
        assert torch.equal(replayed(model, pruner.history)(x), small(x))


# -- LambdaNetworks: the lambda layer claimed whole -------------------------------------------------


@pytest.mark.parametrize("r,after", [(3, 240), (None, 318)], ids=["conv_lambda", "pos_emb"])
def test_lambda_layer_prunes_keys_and_values_as_one_module(tmp_path, r, after):
    pytest.importorskip("timm")
    from timm.layers.lambda_layer import LambdaLayer

    torch.manual_seed(0)
    attn = LambdaLayer(16, 16, feat_size=(4, 4) if r is None else None, num_heads=4, dim_head=4, r=r)
    model = redrawn(between(stem=nn.Conv2d(3, 16, 1), attn=attn, post=nn.Conv2d(16, 8, 1))).eval()
    x = torch.randn(2, 3, 4, 4)
    # was "nothing in this model can be pruned": the [q, k, v] split, k @ v and the position lambda froze it
    graph = DependencyGraph(model, x)
    (values,) = groups_with(graph, "attn", "v")
    assert (values.size, values.prunable) == (4, 4)  # value channel j: input and output channels h * 4 + j
    assert {"stem:out", "attn:in", "attn:out", "post:in"} <= {f"{s.module}:{s.name}" for s in values.slices}
    assert [(g.size, g.prunable) for g in groups_with(graph, "attn", "qk")] == [(4, 4)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.post])
    small = pruner.prune()
    a = small.attn
    assert (n_params(small), a.num_heads, a.dim_qk, a.dim_v, a.qkv.weight.shape[:2]) == (after, 4, 2, 2, (12, 8))
    assert (a.norm_q.num_features, a.norm_v.num_features, small.stem.out_channels) == (8, 2, 8)
    with torch.no_grad():
        assert float((small(x) - model(x)).abs().max()) > 1e-2
        assert torch.equal(replayed(model, pruner.history)(x), small(x))
    torch.save(small, tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=False)(x), small(x))


def test_batchnorm_correction_leaves_norms_sliced_inside_a_module_claimed_whole():
    pytest.importorskip("timm")
    from timm.layers.lambda_layer import LambdaLayer

    torch.manual_seed(0)
    attn = LambdaLayer(16, 16, num_heads=4, dim_head=4, r=3)
    model = redrawn(between(stem=nn.Conv2d(3, 16, 1), bn=nn.BatchNorm2d(16), attn=attn, post=nn.Conv2d(16, 8, 1)))
    model.eval()
    x = torch.randn(2, 3, 4, 4)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, ignored_layers=[model.post])
    pruner.collect_activations([torch.randn(4, 3, 4, 4) for _ in range(2)], progress=False)
    # the correction paired attn.norm_q's 16 original channels with its 8 kept ones: PruningError
    small = pruner.prune()
    assert small.attn.norm_q.num_features == 8 and small.bn.num_features == 8
    q_rows = torch.tensor([h * 4 + j for h in range(4) for j in range(4)]).reshape(4, 4)
    edits = {(e["module"], e["slice"]): e["keep"] for e in pruner.history.to_json()["steps"][0]}
    rows = q_rows[:, torch.tensor(edits[("attn", "qk")])].reshape(-1)
    # trained statistics, sliced (not moved): the module named no norm edit to pair them by
    assert torch.equal(small.attn.norm_q.running_var, model.attn.norm_q.running_var[rows])
    # bn reads the stem's kept channels, which pruning left as they were: the correction
    # kept its statistics, to float rounding (asserting that they moved passed or failed with the rounding:
    # the test alone found them bit-equal)
    kept = torch.tensor(edits[("bn", "channels")])
    torch.testing.assert_close(small.bn.running_var, model.bn.running_var[kept], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small.bn.running_mean, model.bn.running_mean[kept], rtol=1e-5, atol=1e-6)


# -- an empty output (a detector that found nothing) ----------------------------------------------


class EmptyDetections(nn.Module):
    """Scores and the detections above a threshold none reaches: an empty second output,
    as torchvision's FCOS gives on random weights and images."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        scores = self.b(torch.relu(self.a(x))).mean((2, 3))
        return scores, scores[scores > 1e9]


def test_an_empty_output_is_left_out_of_the_oracle_comparisons():
    torch.manual_seed(0)
    model, x = EmptyDetections().eval(), torch.randn(2, 3, 8, 8)
    report = check_pruner(model, x, ratio=0.5)  # raised "max(): Expected reduction dim ..." on the empty output
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6 and report.params_after == 132
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)  # the default path's exactness check raised it too
    pruner.collect_activations([torch.randn(2, 3, 8, 8)] * 2, progress=False)
    small = pruner.prune()
    assert small.a.out_channels == 4 and [tuple(t.shape) for t in small(x)] == [(2, 4), (0,)]


# -- differential attention: its output reshape named the input width ----------------------------

DLITTLE = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3}


def test_differential_attention_frees_the_stream_from_its_whole_heads(tmp_path):
    timm = pytest.importorskip("timm")
    from cleanai_core import load_pruned
    from cleanai_core.io import save_pruned

    torch.manual_seed(0)
    model = redrawn(timm.create_model("vit_dlittle_patch16_reg1_gap_256", num_classes=3, **DLITTLE))
    x = torch.randn(2, 3, 32, 32)
    # was [(3, 3)]: heads stay whole, and the reshape to the input width tied the stream to them
    assert [(g.size, g.prunable) for g in groups_with(DependencyGraph(model, x), "patch_embed.proj", "out")] == [
        (48, 48)
    ]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    attn = small.blocks[0].attn
    assert (n_params(model), n_params(small)) == (46111, 15121)  # was 46111 -> 20073 (stream 32 of 48)
    assert (type(attn).__name__, attn.num_heads, small.patch_embed.proj.out_channels) == ("PrunedDiffAttention", 2, 24)
    with torch.no_grad():
        assert float((small(x) - model(x)).abs().max()) > 1e-3
        assert torch.equal(replayed(model, pruner.history)(x), small(x))
    save_pruned(tmp_path / "o", small, pruner.history, "timm:vit_dlittle_patch16_reg1_gap_256",
                {"num_classes": 3, "model_kwargs": DLITTLE})  # fmt: skip
    back = load_pruned(tmp_path / "o", trust_code=True)
    torch.save(small, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(x), small(x)) and torch.equal(again(x), small(x))
        attn.fused_attn = not attn.fused_attn
        assert torch.allclose(small(x), again(x), atol=1e-5)  # the other path reads the same widths


# -- a refusal where the model's own assertion has no message -------------------------------------


def _assert(condition: bool, message: str) -> None:  # timm's helper (pytest would rewrite a bare assert here)
    if not condition:
        raise AssertionError(message)


class FixedSize(nn.Module):
    """A model that takes one input size only and says so with an empty assertion (timm's
    BoTNet / HaloNet: ``_assert(H == self.pos_embed.height, '')``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        _assert(x.shape[-1] == 8, "")
        return self.conv(x)


def test_a_model_assertion_without_a_message_is_refused_with_the_line_that_failed():
    from cleanai_core.errors import TraceError

    model, x = FixedSize().eval(), torch.randn(1, 3, 6, 6)
    with pytest.raises(TraceError) as info:  # read "AssertionError: ." before
        StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    text = str(info.value)
    assert "AssertionError (no message) at " in text and "tests/test_models_9.py:" in text
    assert '_assert(x.shape[-1] == 8, "")' in text and "example_inputs" in text


# -- FocalNet's focal modulation: split into [queries, context, gates] -----------------------------


def test_focal_modulation_prunes_queries_and_context_past_its_uneven_split():
    pytest.importorskip("timm")
    from timm.models.focalnet import FocalModulation

    torch.manual_seed(0)
    mod = FocalModulation(8, focal_window=3, focal_level=2)
    model = redrawn(between(stem=nn.Conv2d(3, 8, 1), mod=mod, post=nn.Conv2d(8, 4, 1))).eval()
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    # split(f(x), [8, 8, 3]) froze all 19 channels of f, and the context's focal layers with them
    by_slices = {frozenset(f"{s.module}:{s.name}" for s in g.slices): (g.size, g.prunable) for g in graph.groups()}
    assert by_slices[frozenset({"mod.f:out", "mod.h:out", "mod.proj:in"})] == (8, 8)  # the queries
    assert by_slices[frozenset({"mod.f:out"})] == (3, 0)  # the gates, each broadcast over the context
    ctx = [g for g in groups_with(graph, "mod.focal_layers.0.0", "in")]
    assert [(g.size, g.prunable) for g in ctx] == [(8, 8)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.post])
    small = pruner.prune()
    assert (n_params(model), n_params(small)) == (655, 267)  # was 655 -> 511
    assert (small.mod.input_split, small.mod.f.out_channels) == ([4, 4, 3], 11)
    with torch.no_grad():
        assert float((small(x) - model(x)).abs().max()) > 1e-2
        assert torch.equal(replayed(model, pruner.history)(x), small(x))
