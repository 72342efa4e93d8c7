"""The plugin system: entry points, claim priorities, blocking, failures, and a
third-party plugin (examples/example_plugin) pruning a layer the built-ins do not know."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pluggy
import pytest
import torch
from conftest import write_dist
from torch import nn

from cleanai_core import __version__, hookimpl
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.plugins import get_plugin_manager, list_plugins, make_plugin_manager, temporary_plugin
from cleanai_core.slicing import SliceEdit, apply_edits
from cleanai_core.testing import check_pruner, masked_forward, random_units, run_model
from cleanai_plugins.layers.linear import LinearPruner

REPO = Path(__file__).resolve().parents[1]
# the console script installed with the package (``pip install -e .``), next to this Python
CLEANAI = Path(sys.executable).parent / "cleanai"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


class CountingLinearPruner(LinearPruner):
    """A third-party pruner for nn.Linear: behaves like the built-in, counts its calls."""

    name = "counting_linear"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def trace(self, module, call, ctx):
        self.log.append(f"trace {call.name}")
        super().trace(module, call, ctx)

    def prune(self, module, keep):
        self.log.append("prune")
        super().prune(module, keep)


class ClaimLinear:
    """Claims nn.Linear at default priority (no trylast), like an installed plugin would."""

    def __init__(self, tag: str = "third-party") -> None:
        self.tag = tag
        self.log: list[str] = []

    @hookimpl
    def cleanai_layer_pruner(self, module):
        if isinstance(module, nn.Linear):
            pruner = CountingLinearPruner(self.log)
            pruner.name = self.tag
            return pruner
        return None


class ClaimLinearFirst(ClaimLinear):
    @hookimpl(tryfirst=True)
    def cleanai_layer_pruner(self, module):
        return super().cleanai_layer_pruner(module)


def claimed_by(pm, model: nn.Module) -> dict[str, str]:
    graph = DependencyGraph(model, torch.randn(2, 6), pm=pm)
    return {name: node.pruner.name for name, node in graph.nodes.items()}


# ---------------------------------------------------------------------------
# Priorities
# ---------------------------------------------------------------------------


def test_third_party_claim_beats_builtin():
    pm = make_plugin_manager(load_entrypoints=False)
    assert claimed_by(pm, mlp()) == {"0": "linear", "2": "linear", "4": "linear"}
    plugin = ClaimLinear()
    pm.register(plugin, name="third_party")
    assert claimed_by(pm, mlp()) == {"0": "third-party", "2": "third-party", "4": "third-party"}

    # ... and it is the one that slices: the oracle holds through it
    plugin.log.clear()
    report = check_pruner(mlp(), torch.randn(4, 6), ratio=0.5, pm=pm)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    assert report.pruned_units == 5 + 4  # half of the 10- and 8-channel hidden groups
    assert report.params_after < report.params_before
    assert plugin.log.count("prune") == 3  # three Linear layers sliced by the third-party pruner
    assert sorted(x for x in plugin.log if x.startswith("trace")) == ["trace 0", "trace 2", "trace 4"]


def test_tryfirst_beats_third_party_and_builtin():
    pm = make_plugin_manager(load_entrypoints=False)
    # registered before the plain third-party claim, so only ``tryfirst`` can put it ahead
    pm.register(ClaimLinearFirst("first"), name="first")
    pm.register(ClaimLinear("plain"), name="plain")
    assert set(claimed_by(pm, mlp()).values()) == {"first"}
    pm.unregister(name="first")
    assert set(claimed_by(pm, mlp()).values()) == {"plain"}


def test_claim_declining_falls_through_to_builtin():
    class OnlyLastLayer:
        @hookimpl(tryfirst=True)
        def cleanai_layer_pruner(self, module, name):
            return LinearPruner() if name == "4" else None

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(OnlyLastLayer(), name="only_last")
    graph = DependencyGraph(mlp(), torch.randn(2, 6), pm=pm)
    assert {n: node.plugin for n, node in graph.nodes.items()} == {
        "0": "cleanai_plugins.layers.linear",
        "2": "cleanai_plugins.layers.linear",
        "4": "cleanai_plugins.layers.linear",  # LinearPruner's module; the claim itself came from only_last
    }


# ---------------------------------------------------------------------------
# Blocking, autoload, failures, validation
# ---------------------------------------------------------------------------


def test_blocked_builtin_is_skipped(monkeypatch):
    monkeypatch.delenv("CLEANAI_DISABLED_PLUGINS", raising=False)
    pm = make_plugin_manager(load_entrypoints=False, disabled=["cleanai_plugins.layers.linear"])
    assert pm.is_blocked("cleanai_plugins.layers.linear")
    assert pm.hook.cleanai_layer_pruner(module=nn.Linear(2, 3), name="fc") is None
    assert pm.hook.cleanai_layer_pruner(module=nn.Conv2d(2, 3, 1), name="c") is not None
    # nobody claims the Linear layers now: they are traced op by op, not as nodes
    assert claimed_by(pm, mlp()) == {}


def test_blocked_from_environment(monkeypatch, with_example):
    monkeypatch.setenv("CLEANAI_DISABLED_PLUGINS", "example, cleanai_plugins.layers.conv")
    pm = make_plugin_manager()
    assert not pm.has_plugin("example") and pm.is_blocked("example")
    assert not pm.has_plugin("cleanai_plugins.layers.conv")
    assert pm.failures == []
    assert pm.hook.cleanai_layer_pruner(module=nn.Conv2d(2, 3, 1), name="c") is None
    monkeypatch.delenv("CLEANAI_DISABLED_PLUGINS")
    assert make_plugin_manager().has_plugin("example")


def test_blocked_entry_point_by_argument(with_example):
    pm = make_plugin_manager(disabled=["example"])
    assert not pm.has_plugin("example")
    assert "example" not in {p.name for p in list_plugins(pm)}


def test_autoload_switch(monkeypatch, with_example):
    pm = make_plugin_manager()
    assert pm.has_plugin("example")
    assert pm.distributions["example"] == "cleanai-example 0.1"
    monkeypatch.setenv("CLEANAI_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = make_plugin_manager()
    assert not pm.has_plugin("example")
    assert pm.has_plugin("cleanai_plugins.layers.linear")  # built-ins always load
    assert make_plugin_manager(load_entrypoints=True).has_plugin("example")  # the argument wins


BROKEN = "raise RuntimeError('boom at import')\n"
MISSPELLED = "from cleanai_core import hookimpl\n\n@hookimpl\ndef cleanai_layer_prunner(module):\n    return None\n"


def test_broken_entry_point_is_reported_and_startup_goes_on(tmp_path, monkeypatch, with_example):
    site = write_dist(tmp_path, "cleanai-broken", "2.0", {"broken": "cleanai_broken"}, {"cleanai_broken.py": BROKEN})
    monkeypatch.syspath_prepend(str(site))
    with pytest.warns(RuntimeWarning, match=r"plugin 'broken' from cleanai-broken failed to load"):
        pm = make_plugin_manager()
    assert [(f.name, f.distribution, f.error) for f in pm.failures] == [
        ("broken", "cleanai-broken", "RuntimeError: boom at import")
    ]
    assert not pm.has_plugin("broken")
    assert pm.has_plugin("example")  # the healthy plugin still loaded
    assert pm.hook.cleanai_layer_pruner(module=nn.Linear(2, 3), name="fc") is not None


def test_misspelled_hook_is_rejected():
    class Typo:
        @hookimpl
        def cleanai_layer_prunner(self, module):
            return None

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(Typo(), name="typo")
    with pytest.raises(pluggy.PluginValidationError, match="cleanai_layer_prunner"):
        pm.check_pending()

    # temporary_plugin checks too, and leaves nothing behind
    pm = make_plugin_manager(load_entrypoints=False)
    with pytest.raises(pluggy.PluginValidationError):
        with temporary_plugin(Typo(), name="typo", pm=pm):
            pass
    assert not pm.has_plugin("typo")


def test_misspelled_hook_in_entry_point_is_a_failure(tmp_path, monkeypatch):
    monkeypatch.delenv("CLEANAI_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    site = write_dist(tmp_path, "cleanai-typo", "0.3", {"typo": "cleanai_typo"}, {"cleanai_typo.py": MISSPELLED})
    monkeypatch.syspath_prepend(str(site))
    with pytest.warns(RuntimeWarning, match="typo"):
        pm = make_plugin_manager()
    (failure,) = pm.failures
    assert (failure.name, failure.distribution) == ("typo", "cleanai-typo")
    assert "PluginValidationError" in failure.error and "cleanai_layer_prunner" in failure.error
    assert not pm.has_plugin("typo")


def test_temporary_plugin_registers_and_unregisters():
    pm = make_plugin_manager(load_entrypoints=False)
    plugin = ClaimLinear("temp")
    with temporary_plugin(plugin, name="temp", pm=pm) as p:
        assert p is plugin and pm.has_plugin("temp")
        assert pm.hook.cleanai_layer_pruner(module=nn.Linear(2, 3), name="fc").name == "temp"
        assert ("temp", "registered at run time") in {(i.name, i.source) for i in list_plugins(pm)}
    assert not pm.has_plugin("temp")
    assert pm.hook.cleanai_layer_pruner(module=nn.Linear(2, 3), name="fc").name == "linear"


def test_claim_is_resolved_once_per_module():
    torchvision = pytest.importorskip("torchvision")

    calls: list[str] = []

    class Spy:
        @hookimpl(tryfirst=True)
        def cleanai_layer_pruner(self, module, name):
            calls.append(name)
            return None

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(Spy(), name="spy")
    model = torchvision.models.resnet18(num_classes=10).eval()
    graph = DependencyGraph(model, torch.randn(1, 3, 64, 64), pm=pm)

    # the modules the graph visits: every module not inside a claimed one
    visited = [n for n, _ in model.named_modules() if not any(n.startswith(c + ".") for c in graph.nodes if c)]
    assert calls == visited
    assert len(calls) == len(set(calls)) == len(list(model.named_modules())) == 68
    convs_norms_fc = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))}
    assert len(convs_norms_fc) == 41 and convs_norms_fc <= set(graph.nodes)


def test_claim_is_not_asked_again_for_a_module_called_many_times():
    calls: list[str] = []

    class Spy:
        @hookimpl(tryfirst=True)
        def cleanai_layer_pruner(self, module, name):
            calls.append(name)
            return None

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 6)
            self.cell = nn.Linear(6, 6)

        def forward(self, x):
            h = self.inp(x)
            for _ in range(5):
                h = torch.tanh(self.cell(h))
            return h

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(Spy(), name="spy")
    graph = DependencyGraph(Recurrent().eval(), torch.randn(2, 4), pm=pm)
    assert calls == ["", "inp", "cell"]
    cell_calls = [e for e in graph.recording.events if getattr(e, "name", None) == "cell"]
    assert len(cell_calls) == 5  # traced five times, claimed once


# ---------------------------------------------------------------------------
# The third-party example plugin, loaded through its entry point
# ---------------------------------------------------------------------------


def test_example_plugin_prunes_scaled_linear_end_to_end(with_example):
    from cleanai_example import ScaledLinear, TinyNet
    from cleanai_example.plugin import ScaledLinearPruner

    pm = get_plugin_manager()
    assert pm.distributions["example"] == "cleanai-example 0.1"
    assert isinstance(pm.hook.cleanai_layer_pruner(module=ScaledLinear(2, 3), name="s"), ScaledLinearPruner)

    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(5, 8)
    graph = DependencyGraph(model, x)
    assert graph.nodes["scaled"].plugin == "example"
    shapes = {tuple(sorted(f"{s.module}:{s.name}" for s in g.slices)): (g.size, g.prunable) for g in graph.groups()}
    assert shapes == {
        ("fc1:in",): (8, 0),  # model input
        ("fc1:out", "scaled:in"): (16, 16),
        ("fc2:in", "scaled:out"): (12, 12),  # prunable only thanks to the plugin
        ("fc2:out",): (4, 0),  # model output
    }

    # prune half of both hidden groups through the plugin, compare with masking
    pruned = random_units(graph, 0.5, torch.Generator().manual_seed(1))
    assert int(pruned.sum()) == 8 + 6
    small = copy.deepcopy(model)
    edits = [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in graph.keep_indices(pruned).items()]
    apply_edits(small, edits)
    assert tuple(small.scaled.weight.shape) == (6, 8)
    assert small.scaled.scale.numel() == small.scaled.bias.numel() == small.scaled.out_features == 6
    assert small.scaled.in_features == 8
    (expected,) = masked_forward(graph, pruned, x)
    (got,) = run_model(small, x)
    assert got.shape == (5, 4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in small.parameters())
    # fc1 16->8 rows (+bias); scaled 12x16 -> 6x8 (+scale, bias); fc2 4x12 -> 4x6
    assert (before, after) == (8 * 16 + 16 + 12 * 16 + 24 + 12 * 4 + 4, 8 * 8 + 8 + 6 * 8 + 12 + 6 * 4 + 4)

    report = check_pruner(model, x, ratio=0.25)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    assert report.pruned_units == 4 + 3


def test_without_the_example_plugin_scaled_linear_is_traced_as_bare_parameters(with_example):
    from cleanai_example import TinyNet

    pm = make_plugin_manager(disabled=["example"])
    graph = DependencyGraph(TinyNet().eval(), torch.randn(5, 8), pm=pm)
    assert "scaled" not in graph.nodes
    prunable = {tuple(sorted(f"{s.module}:{s.name}" for s in g.slices)): g.prunable for g in graph.groups()}
    assert prunable == {
        ("fc1:in",): 0,
        (":scaled.weight", "fc1:out"): 16,  # the generic tracer follows the einsum's input columns
        (":scaled.bias", ":scaled.scale", ":scaled.weight#0", "fc2:in"): 12,  # and its rows (a bare matrix)
        ("fc2:out",): 0,
    }


def test_example_weight_energy_and_compensation(with_example):
    from cleanai_example import ScaledLinear
    from cleanai_example.plugin import ScaledLinearPruner

    torch.manual_seed(0)
    layer, pruner = ScaledLinear(4, 3), ScaledLinearPruner()
    energy_out = pruner.weight_energy(layer, "out")
    w = layer.weight.detach() * layer.scale.detach()[:, None]
    torch.testing.assert_close(energy_out, (w**2).sum(1))
    torch.testing.assert_close(pruner.weight_energy(layer, "in"), (w**2).sum(0))

    # removing input channel 1, whose mean is 0.7, then folding it into the bias is exact for constant input
    x = torch.randn(6, 4)
    x[:, 1] = 0.7
    with torch.no_grad():
        before = layer(x)
        assert pruner.compensate(layer, "in", torch.tensor([1]), torch.tensor([0.7]))
        pruner.prune(layer, {"in": torch.tensor([0, 2, 3])})
        after = layer(x[:, [0, 2, 3]])
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert not pruner.compensate(layer, "out", torch.tensor([0]), torch.tensor([0.0]))


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def cli(*args: str, extra_path: list[Path] = (), **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CLEANAI_")}
    environ["PYTHONPATH"] = os.pathsep.join([*map(str, extra_path), str(REPO)])
    environ.update(env)
    return subprocess.run([str(CLEANAI), *args], capture_output=True, text=True, env=environ, timeout=300)


def test_cli_version():
    assert CLEANAI.is_file(), f"no cleanai console script next to {sys.executable}: pip install -e ."
    out = cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"cleanai {__version__}"


def test_cli_plugins_lists_builtins_and_entry_points(example_dist, tmp_path):
    broken = write_dist(tmp_path, "cleanai-broken", "2.0", {"broken": "cleanai_broken"}, {"cleanai_broken.py": BROKEN})
    out = cli("plugins", extra_path=[example_dist, broken])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "  example  (cleanai-example 0.1)" in lines
    assert lines[lines.index("  example  (cleanai-example 0.1)") + 1].strip() == "hooks: cleanai_layer_pruner"
    assert "  cleanai_plugins.layers.linear  (built-in)" in lines
    assert "  broken  (cleanai-broken): RuntimeError: boom at import" in lines
    assert "plugin 'broken' from cleanai-broken failed to load" in out.stderr

    data = json.loads(cli("plugins", "--json", extra_path=[example_dist, broken]).stdout)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["example"] == {"name": "example", "source": "cleanai-example 0.1", "hooks": ["cleanai_layer_pruner"]}
    assert by_name["cleanai_plugins.layers.linear"]["source"] == "built-in"
    assert data["failures"] == [
        {"name": "broken", "distribution": "cleanai-broken", "error": "RuntimeError: boom at import"}
    ]
    assert len(data["plugins"]) == len(make_plugin_manager(load_entrypoints=False).list_name_plugin()) + 1


def test_cli_plugins_blocking_and_autoload(example_dist):
    data = json.loads(cli("--disable-plugin", "example", "plugins", "--json", extra_path=[example_dist]).stdout)
    assert "example" not in {p["name"] for p in data["plugins"]}
    assert data["blocked"] == ["example"]
    data = json.loads(cli("plugins", "--json", extra_path=[example_dist], CLEANAI_DISABLE_PLUGIN_AUTOLOAD="1").stdout)
    assert "example" not in {p["name"] for p in data["plugins"]}
    assert data["blocked"] == []


def test_a_command_lines_plugin_choices_last_that_command_only():
    """``main(["--disable-plugin", ...])`` replaced the process-wide plugin manager for
    good: a later StructuredPruner in the same process (a notebook, the test run) still
    had the plugin disabled (tests/test_hf_job.py failed after tests/test_hf_text_inputs.py:
    the hidden size pruned by default)."""
    from cleanai_core.cli import main

    before = get_plugin_manager()
    assert main(["--disable-plugin", "cleanai_plugins.zoo.transformers_hidden", "plugins"]) == 0
    assert get_plugin_manager() is before
    assert before.get_plugin("cleanai_plugins.zoo.transformers_hidden") is not None
