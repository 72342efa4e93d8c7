"""What the graph does not understand must freeze; whole models through ``check_pruner``;
every pruner's weight energies.

See ``layer_oracle.py`` for what the oracle checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from layer_oracle import group_of
from test_oracle_attention import MHABlock
from test_oracle_mappers import MAPPER_CASES, Fn, X, conv
from test_oracle_parameters import TokenNet
from test_oracle_recurrent import RNNBlock
from torch import nn

from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.testing import check_pruner

torch.manual_seed(0)


# -- what the graph does not understand must freeze --------------------------------------------
@torch.library.custom_op("cleanai_test::channel_mix", mutates_args=())
def channel_mix(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1).cumsum(1)


@channel_mix.register_fake
def _(x):
    return torch.empty_like(x)


@pytest.mark.parametrize(
    "how",
    ["roll", "custom_op", "channel_slice_by_step", "mean_over_channels", "softmax_over_channels", "cumprod"],
)
def test_unknown_or_channel_moving_ops_freeze(how):
    ops = {
        "roll": lambda h: torch.roll(h, 1, dims=1),
        "custom_op": lambda h: channel_mix(h),
        "channel_slice_by_step": lambda h: torch.cat([h[:, ::2], h[:, 1::2]], 1),
        "mean_over_channels": lambda h: h - h.mean(1, keepdim=True),
        "softmax_over_channels": lambda h: h.softmax(1),
        "cumprod": lambda h: h.cumprod(1),
    }
    op = ops[how]
    m = Fn(
        lambda s, x: s.c(torch.relu(op(s.a(x))) + s.b(x)),
        a=conv(3, 6),
        b=conv(3, 6),
        c=conv(6, 4, 3),
    ).eval()
    g = DependencyGraph(m, X)
    assert group_of(g, "a", "out").prunable == 0, g.explain()
    if how == "custom_op":
        assert any("channel_mix" in k for k in g.ctx.unknown_ops)
        assert "Operations not understood" in g.explain()
    report = check_pruner(m, X)
    assert report.pruned_units == 0 and report.max_abs_diff < 1e-6 and report.params_after == report.params_before


def test_a_rotation_by_constant_slices_pins_only_the_channel_it_moves():
    """``cat([h[:, 1:], h[:, :1]])``: both bounds pin channel 0 (it froze the whole group
    before 2026-12-01); channels 1.. keep their order, pair with ``b``'s 0.. and prune exactly."""
    m = Fn(
        lambda s, x: s.c(torch.relu(torch.cat([s.a(x)[:, 1:], s.a(x)[:, :1]], 1)) + s.b(x)),
        a=conv(3, 6),
        b=conv(3, 6),
        c=conv(6, 4, 3),
    ).eval()
    g = DependencyGraph(m, X)
    assert (group_of(g, "a", "out").size, group_of(g, "a", "out").prunable) == (6, 5)
    report = check_pruner(m, X)
    assert report.pruned_units == 3 and report.max_abs_diff < 1e-5
    assert (report.params_before, report.params_after) == (268, 136)


def test_check_pruner_on_resnet18_math():
    m = torchvision.models.resnet18(num_classes=10).eval()
    r = check_pruner(m, torch.randn(2, 3, 32, 32))
    assert r.output_shapes_equal and r.max_abs_diff < 1e-4 and r.params_after < r.params_before * 0.5
    assert math.isfinite(r.max_abs_diff)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (MHABlock(kdim=12), torch.randn(2, 5, 8)),
        lambda: (MHABlock(add_bias_kv=True), torch.randn(2, 5, 8)),
        lambda: (RNNBlock(nn.LSTM, num_layers=2, bidirectional=True, proj_size=5), torch.randn(7, 3, 6)),
        lambda: (RNNBlock(nn.GRU, num_layers=2, bidirectional=True), torch.randn(7, 3, 6)),
        lambda: (TokenNet(), torch.randn(2, 3, 8, 8)),
        lambda: (copy.deepcopy(MAPPER_CASES["pixel_shuffle"]), X),
    ],
    ids=["mha_kdim", "mha_bias_kv", "lstm_proj", "gru", "tokens", "pixel_shuffle"],
)
def test_weight_energy_matches_slices(make):
    """Every pruner gives one energy per index of each of its slices, all non-negative."""
    model, x = make()
    g = DependencyGraph(model.eval(), x)
    checked = 0
    for spec in g.slices:
        if spec.pruner is None:
            continue
        e = spec.pruner.weight_energy(g.model.get_submodule(spec.module), spec.name)
        if e is None:
            continue
        assert e.shape == (spec.atoms.numel(),), (spec.module, spec.name)
        assert bool((e >= 0).all()) and float(e.sum()) > 0
        checked += 1
    assert checked >= 3
