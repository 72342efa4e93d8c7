"""Weights computed by ``torch.nn.utils.parametrize``: ``weight_norm`` and ``spectral_norm``
(``torch.nn.utils.parametrizations``) and a user's own parametrization.

Before ``cleanai_core/parametrized.py`` a parametrized conv kept its full weight (the
computed ``module.weight`` cannot be assigned) while its bias shrank: the pruned model
crashed, and the pruner's verification skipped every group (nothing pruned)."""

from __future__ import annotations

import copy

import pytest
import torch
from layer_oracle import group_of, oracle
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from cleanai_core import DependencyGraph, StructuredPruner

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def _net(wrap) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        wrap(nn.Conv2d(3, 8, 3, padding=1)),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        nn.ReLU(),
        nn.Flatten(2),
        nn.Conv1d(6, 2, 1),
    ).eval()


def test_weight_norm_output_channels_slice_exactly():
    model = _net(parametrizations.weight_norm)  # w = g v / ||v||, norms per output channel
    r = oracle(model, X)
    conv = r.small[0]
    kept = conv.out_channels
    assert kept < 8 and r.small[2].in_channels == kept
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    assert g.shape == (kept, 1, 1, 1) and v.shape == (kept, 3, 3, 3) and conv.bias.shape == (kept,)
    assert conv.weight.shape == (kept, 3, 3, 3)
    assert r.after == r.before - (8 - kept) * (1 + 27 + 1 + 6) - (6 - r.small[2].out_channels) * (kept + 1 + 2)


def test_weight_norm_input_channels_renormalise():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), parametrizations.weight_norm(nn.Conv2d(8, 4, 1))).eval()
    graph = DependencyGraph(model, X)
    assert group_of(graph, "0", "out").prunable == 8  # prunable, like a LayerNorm's channels
    assert graph.ctx.slices[("2", "in")].normalizes and not graph.ctx.slices[("2", "out")].normalizes


def test_spectral_norm_is_the_pruned_weights_own():
    model = _net(parametrizations.spectral_norm)
    small = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5).prune()
    conv = small[0]
    assert conv.out_channels == 4 and conv.parametrizations.weight.original.shape == (4, 3, 3, 3)
    p = conv.parametrizations.weight[0]
    assert p._u.shape == (4,) and p._v.shape == (27,)
    # the computed weight is the pruned original divided by its own largest singular value
    sigma = torch.linalg.matrix_norm(conv.parametrizations.weight.original.reshape(4, -1), 2)
    assert torch.allclose(conv.weight, conv.parametrizations.weight.original / sigma, atol=1e-4)
    assert small(torch.randn(3, 3, 6, 6)).shape == (3, 2, 36)
    assert model[0].parametrizations.weight.original.shape == (8, 3, 3, 3)  # the user's model unchanged


def test_spectral_norm_on_input_channels_slices_the_power_vector():
    conv = parametrizations.spectral_norm(nn.Conv2d(8, 4, 3))
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), conv, nn.Flatten(1)).eval()
    small = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5).prune()
    p = small[2].parametrizations.weight[0]
    assert small[0].out_channels == 4 and small[2].in_channels == 4 and p._v.shape == (4 * 9,)
    w = small[2].parametrizations.weight.original.reshape(4, -1)
    assert torch.allclose(torch.linalg.matrix_norm(small[2].weight.reshape(4, -1), 2), torch.tensor(1.0), atol=1e-4)
    assert w.shape == (4, 36)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_an_unknown_parametrization_freezes_its_channels_with_a_reason():
    model = _net(lambda m: parametrize.register_parametrization(m, "weight", _Double()) or m)
    graph = DependencyGraph(model, X)
    g = group_of(graph, "0", "out")
    assert g.prunable == 0
    assert "0.weight is computed by a parametrization (_Double)" in graph.explain()
    r = oracle(copy.deepcopy(model), X)  # the rest prunes exactly
    assert r.small[0].out_channels == 8 and r.small[2].out_channels == 3


def test_default_pruning_of_a_weight_normed_model_with_calibration():
    model = _net(parametrizations.weight_norm)
    before = copy.deepcopy(model.state_dict())
    pruner = StructuredPruner(model, X, pruning_ratio=0.5)
    pruner.collect_activations([torch.randn(4, 3, 6, 6) for _ in range(2)], progress=False)
    small = pruner.prune()
    assert small[0].parametrizations.weight.original1.shape == (4, 3, 3, 3)
    assert small(torch.randn(3, 3, 6, 6)).shape == (3, 2, 36)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("norm", [nn.utils.weight_norm, nn.utils.spectral_norm])
def test_the_deprecated_hook_norms_are_refused_with_the_fix(norm):
    from cleanai_core.errors import UserError

    model = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), norm(nn.Conv1d(8, 4, 1))).eval()
    with pytest.raises(UserError, match=r"module '2' uses torch.nn.utils.weight_norm/spectral_norm .*parametrizations"):
        StructuredPruner(model, torch.randn(2, 3, 16), "magnitude")
