"""The plugin's own tests: the masking oracle and the groups it should create.

Run from this folder after ``pip install -e .`` (or with the folder on ``PYTHONPATH``):

    pytest tests -q
"""

from __future__ import annotations

import torch
from cleanai_example import TinyNet, plugin

from cleanai_core import DependencyGraph
from cleanai_core.plugins import make_plugin_manager
from cleanai_core.testing import check_pruner, temporary_plugin


def isolated_manager():
    """Built-ins only, plus this plugin: the test does not depend on what else is installed."""
    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(plugin, name="example")
    return pm


def test_scaled_linear_prunes_exactly_like_masking():
    torch.manual_seed(0)
    with temporary_plugin(plugin, name="example"):
        report = check_pruner(TinyNet().eval(), torch.randn(5, 8), ratio=0.25)
    assert report.output_shapes_equal
    assert report.max_abs_diff < 1e-5
    assert report.params_after < report.params_before


def test_scaled_linear_outputs_form_a_prunable_group_with_fc2_inputs():
    graph = DependencyGraph(TinyNet().eval(), torch.randn(2, 8), pm=isolated_manager())
    assert graph.nodes["scaled"].plugin == "example"
    by_modules = {tuple(g.modules()): g for g in graph.groups()}
    mid = by_modules[("fc2", "scaled")]  # scaled's 12 outputs and the 12 input columns of fc2
    assert (mid.size, mid.prunable) == (12, 12)
    hidden = by_modules[("fc1", "scaled")]  # fc1's 16 outputs and scaled's 16 input columns
    assert (hidden.size, hidden.prunable) == (16, 16)


def test_without_the_plugin_the_layer_is_traced_op_by_op():
    pm = make_plugin_manager(load_entrypoints=False)  # built-ins only: ScaledLinear is traced generically
    graph = DependencyGraph(TinyNet().eval(), torch.randn(2, 8), pm=pm)
    assert "scaled" not in graph.nodes  # unclaimed: entered, its einsum traced op by op
    fc2_inputs = next(g for g in graph.groups() if any(f"{s.module}:{s.name}" == "fc2:in" for s in g.slices))
    names = sorted(f"{s.module}:{s.name}" for s in fc2_inputs.slices)
    assert names == [":scaled.bias", ":scaled.scale", ":scaled.weight#0", "fc2:in"]  # bare parameters' rows
    assert (fc2_inputs.size, fc2_inputs.prunable) == (12, 12)
