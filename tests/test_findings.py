"""The prepare hook: a model is scanned once, and its findings reach the claims, the
tracing context and the after-prune fix-ups explicitly (no module-level tables)."""

from __future__ import annotations

import importlib
import pkgutil
import weakref

import pytest
import torch
from torch import nn

from cleanai_core import hookimpl
from cleanai_core.errors import UserError
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.graph.findings import ModelFindings
from cleanai_core.plugins import temporary_plugin
from cleanai_core.slicing import SliceEdit, apply_edits


class Recorder:
    """Files the model's Linear layers under its own key and records what each hook saw."""

    def __init__(self) -> None:
        self.scans: list[nn.Module] = []
        self.claims: list[tuple[str, object]] = []
        self.fixups: list[tuple[str, object]] = []

    @hookimpl
    def cleanai_prepare_model(self, model):
        self.scans.append(model)
        return {"recorder": {m for m in model.modules() if isinstance(m, nn.Linear)}}

    @hookimpl
    def cleanai_layer_pruner(self, module, name, findings):
        self.claims.append((name, findings))

    @hookimpl
    def cleanai_after_prune(self, module, name, edits, findings):
        self.fixups.append((name, findings))


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_graph_scans_once_and_hands_the_findings_to_every_claim():
    model, rec = mlp(), Recorder()
    with temporary_plugin(rec, name="recorder"):
        graph = DependencyGraph(model, torch.randn(2, 4))
    assert rec.scans == [model]
    assert [name for name, _ in rec.claims] == ["", "0", "1", "2"]
    assert all(f is graph.findings for _, f in rec.claims)
    assert graph.findings["recorder"] == {model[0], model[2]}
    assert graph.ctx.findings is graph.findings


def test_slicing_hands_the_scan_taken_before_slicing_to_the_fixups():
    model, rec = mlp(), Recorder()
    with temporary_plugin(rec, name="recorder"):
        apply_edits(
            model, [SliceEdit("0", "out", torch.tensor([0, 2, 4])), SliceEdit("2", "in", torch.tensor([0, 2, 4]))]
        )
    assert len(rec.scans) == 1
    assert len(rec.fixups) == len(list(model.modules())) == 4
    first = rec.fixups[0][1]
    assert all(f is first for _, f in rec.fixups) and first["recorder"] == {model[0], model[2]}
    assert model[0].out_features == 3 and model[2].in_features == 3


def test_claim_hook_called_directly_gets_no_findings():
    rec = Recorder()
    with temporary_plugin(rec, name="recorder") as p:
        from cleanai_core.plugins import get_plugin_manager

        get_plugin_manager().hook.cleanai_layer_pruner(module=nn.Linear(2, 3), name="fc")
    assert p.claims == [("fc", None)]


def test_findings_join_sets_and_reject_a_key_answered_twice():
    a, b = nn.Linear(1, 1), nn.Linear(1, 1)
    joined = ModelFindings.join([{"ranges": {a}, "x": 1}, None, {"ranges": {b}}])
    assert joined["ranges"] == {a, b} and joined["x"] == 1 and len(joined) == 2
    with pytest.raises(UserError, match="'x'"):
        ModelFindings.join([{"x": 1}, {"x": 2}])


def _zoo_modules():
    import cleanai_plugins.zoo as zoo

    yield importlib.import_module("cleanai_plugins.mappers.shape")  # vouching for splits and ranges
    for info in pkgutil.walk_packages(zoo.__path__, zoo.__name__ + "."):
        yield importlib.import_module(info.name)


def test_zoo_plugins_keep_no_module_level_tables_of_modules():
    tables = [
        (mod.__name__, name)
        for mod in _zoo_modules()
        for name, value in vars(mod).items()
        if isinstance(value, (weakref.WeakKeyDictionary, weakref.WeakSet))
    ]
    assert len(list(_zoo_modules())) >= 10  # shape, timm (a package of 7), torchvision, torchvision_swin
    assert tables == []
