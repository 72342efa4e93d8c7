"""torchvision Swin (v1 and v2): the window attention is one claimed composite, so the
residual stream (the embedding width) prunes; q/k/v keep their width."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

swin = pytest.importorskip("torchvision.models.swin_transformer")

from cleanai_core import DependencyGraph, StructuredPruner  # noqa: E402
from cleanai_core.testing import check_pruner, masked_forward, random_units, run_model  # noqa: E402
from cleanai_plugins.zoo.torchvision_swin import (  # noqa: E402
    ShiftedWindowAttentionPruner,
    shifted_window_attention,
)

# 40x40 input: stage 1 is 10x10 (padded to 12x12 windows, shifted), stage 2 is 5x5
X = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))


def small_swin(v2: bool = False, identity_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    kw = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if v2 else {}
    if identity_norm:  # no LayerNorm: the oracle then covers the residual stream too
        kw["norm_layer"] = lambda dim: nn.Identity()
    model = swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=10, **kw
    )
    return model.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_attention_is_claimed_whole_and_the_residual_stream_is_prunable(v2):
    graph = DependencyGraph(small_swin(v2), X)
    names = set(graph.nodes)
    assert {"features.1.0.attn", "features.1.1.attn", "features.3.0.attn", "features.3.1.attn"} <= names
    assert not any(n.endswith((".qkv", ".proj")) for n in names)  # children are not entered
    assert isinstance(graph.nodes["features.1.0.attn"].pruner, ShiftedWindowAttentionPruner)
    sizes = sorted((g.size, g.prunable) for g in graph.groups(prunable_only=True))
    # the 2 heads of each of the 4 blocks, stage widths 16 and 32 (the residual streams),
    # MLP hidden widths 64 and 128
    assert sizes == [(2, 2)] * 4 + [(16, 16), (32, 32), (64, 64), (64, 64), (128, 128), (128, 128)]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("identity_norm,units", [(False, 196), (True, 220)], ids=["layernorm", "identity-norm"])
def test_oracle(v2, identity_norm, units):
    """With LayerNorm the residual groups normalise and the oracle skips them (MLP hidden
    units 2 x 32 + 2 x 64, and one of the two heads of each of the 4 blocks); without it,
    8 + 16 residual units are pruned too."""
    report = check_pruner(small_swin(v2, identity_norm), X)
    assert report.output_shapes_equal
    assert report.pruned_units == units
    assert report.max_abs_diff < 1e-5


def test_masking_the_residual_stream_changes_the_output():
    """So that the identity-norm oracle cannot pass by accident."""
    model = small_swin(identity_norm=True)
    graph = DependencyGraph(model, X)
    pruned = random_units(graph, 0.5, torch.Generator().manual_seed(0), exclude_normalized=True)
    assert float((masked_forward(graph, pruned, X)[0] - run_model(model, X)[0]).abs().max()) > 1e-3


# one of the two heads goes in each block: per block its q, k, v rows (3 x head size x
# width, + bias), its proj columns (width x head size), and its table column (v1: 49) or
# its cpb_mlp row (v2: 512) and logit_scale; 2900 (v1) and 4756 (v2) fewer than with the
# heads kept (12586, 22410)
@pytest.mark.parametrize("v2,params_after", [(False, 9686), (True, 17654)], ids=["v1", "v2"])
def test_magnitude_prune_halves_the_embedding(v2, params_after):
    model = small_swin(v2)
    before = copy.deepcopy(model.state_dict())
    small = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5).prune()
    assert n_params(model) == (35746 if not v2 else 45538)
    assert n_params(small) == params_after
    assert small.features[0][0].out_channels == 8 and small.features[0][2].normalized_shape == (8,)
    assert small.norm.normalized_shape == (16,) and small.head.in_features == 16
    for stage, width in ((1, 8), (3, 16)):
        attn = small.features[stage][0].attn
        assert attn.num_heads == 1  # one head of the head size width (2 x width / 2 heads)
        assert attn.qkv.weight.shape == (3 * width, width)
        assert attn.proj.weight.shape == (width, width)
        assert attn.proj.bias.shape == (width,)
        old = model.features[stage][0].attn
        if v2:  # the kept head's row of cpb_mlp's last layer, and its logit_scale
            h = next(h for h in range(2) if torch.equal(attn.cpb_mlp[-1].weight, old.cpb_mlp[-1].weight[h : h + 1]))
            assert torch.equal(attn.logit_scale, old.logit_scale[h : h + 1])
        else:  # the kept head's column of the relative position bias table
            table = old.relative_position_bias_table
            assert any(torch.equal(attn.relative_position_bias_table, table[:, h : h + 1]) for h in range(2))
    pruned_cls = "PrunedShiftedWindowAttentionV2" if v2 else "PrunedShiftedWindowAttention"
    assert type(small.features[1][0].attn).__name__ == pruned_cls
    assert run_model(small, X)[0].shape == (2, 10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # source untouched


@pytest.mark.parametrize("cls", ["ShiftedWindowAttention", "ShiftedWindowAttentionV2"])
def test_function_matches_torchvision_at_equal_widths(cls):
    torch.manual_seed(0)
    m = getattr(swin, cls)(16, [4, 4], [2, 2], 2).eval()
    x = torch.randn(2, 10, 10, 16)
    with torch.no_grad():
        ours = shifted_window_attention(
            x,
            m.qkv.weight,
            m.proj.weight,
            m.get_relative_position_bias(),
            m.window_size,
            m.num_heads,
            m.shift_size,
            qkv_bias=m.qkv.bias,
            proj_bias=m.proj.bias,
            logit_scale=getattr(m, "logit_scale", None),
            training=False,
        )
        assert torch.equal(ours, m(x))


def _prune_in(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    small = copy.deepcopy(m)
    ShiftedWindowAttentionPruner().prune(small, {"in": keep})
    return small


@pytest.mark.parametrize("cls", ["ShiftedWindowAttention", "ShiftedWindowAttentionV2"])
def test_bias_compensation(cls):
    """Removed input channels that are constant (= their mean): v1 is exact after folding
    them into ``qkv.bias``; v2's forward zeroes the key bias, so that part stays zero."""
    torch.manual_seed(0)
    m = getattr(swin, cls)(16, [4, 4], [2, 2], 2).eval()
    removed, kept = torch.arange(0, 16, 2), torch.arange(1, 16, 2)
    mean = torch.randn(8)
    x = torch.randn(2, 10, 10, 16)
    x[..., removed] = mean
    with torch.no_grad():
        full = m(x)
        plain = _prune_in(m, kept)(x[..., kept])
        comp = copy.deepcopy(m)
        assert ShiftedWindowAttentionPruner().compensate(comp, "in", removed, mean)
        comp = _prune_in(comp, kept)
        err, err_plain = float((comp(x[..., kept]) - full).abs().max()), float((plain - full).abs().max())
    assert err_plain > 1e-2
    if cls == "ShiftedWindowAttention":
        assert err < 1e-5
    else:
        assert err < err_plain
        assert torch.equal(comp.qkv.bias[16:32], torch.zeros(16))


def test_v1_ignores_a_constant_shift_of_the_keys():
    """Why folding into the key part of the bias is harmless in v1: ``q . (k + s)`` shifts
    every logit of a query by the same ``q . s``, which the softmax ignores."""
    torch.manual_seed(0)
    m = swin.ShiftedWindowAttention(16, [4, 4], [2, 2], 2).eval()
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        y = m(x)
        m.qkv.bias[16:32] += torch.randn(16)
        assert float((m(x) - y).abs().max()) < 1e-5


class _ChannelsLastPool(nn.Module):
    """Swin's head: ``(B, H, W, C)`` permuted to ``(B, C, H, W)``, then ``AdaptiveAvgPool2d(1)``
    (ATen restrides the 1x1 result with ``as_strided_``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.pool(self.lin(x).permute(0, 3, 1, 2)).flatten(1))


class _Restride(nn.Module):
    """An ``as_strided_`` that really moves elements: its channels must freeze."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.lin(x).contiguous()
        return self.head(y.as_strided_(y.shape, (16, 1, 4)))


def test_restride_of_size_one_dims_passes_labels():
    report = check_pruner(_ChannelsLastPool(), torch.randn(2, 3, 3, 8))
    assert report.pruned_units == 8 and report.max_abs_diff < 1e-6
    assert report.params_after == report.params_before - 8 * 8 - 8 - 4 * 8


def test_restride_that_moves_elements_freezes():
    graph = DependencyGraph(_Restride(), torch.randn(2, 4, 8))
    assert [(g.size, g.prunable) for g in graph.groups() if any(s.module == "lin" for s in g.slices)] == [
        (8, 0),
        (4, 0),
    ]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_inplace_prune_gives_the_model_the_pruned_class(v2):
    model = small_swin(v2)
    expected = run_model(StructuredPruner(small_swin(v2), X, "magnitude", pruning_ratio=0.5).prune(), X)[0]
    out = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5, inplace=True).prune()
    assert out is model and model.features[0][0].out_channels == 8
    assert type(model.features[1][0].attn).__name__.startswith("PrunedShiftedWindowAttention")
    assert torch.allclose(run_model(model, X)[0], expected, atol=1e-6)
