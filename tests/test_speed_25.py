"""Session 25 (speedA), issue #21: the data-free path's verification runs the masked original
first where the model is not yet known to write nothing, so the pruned copy (a copy made
before that proof) runs without the write guard. Verification keeps catching a wrong slice,
the pruned model still equals the masking oracle, the user's model is left as it was, and a
model that writes its weights in forward keeps the guard on every copy."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import test_faults_8
import test_verify
import torch
from torch import nn

import cleanai_core.model_state as ms
from cleanai_core import StructuredPruner, slicing
from cleanai_core.model_state import copy_model, preserved, writes_nothing
from cleanai_core.runtime import call_model
from cleanai_core.testing import masked_forward

X = test_faults_8.X


def _guarded(monkeypatch) -> list[int]:
    """Ids of the models each guarded call ran."""
    seen: list[int] = []
    real = ms._guarded_call

    def counted(model, snaps):
        seen.append(id(model))
        return real(model, snaps)

    monkeypatch.setattr(ms, "_guarded_call", counted)
    return seen


def _data_free(model: nn.Module, **kw) -> tuple[StructuredPruner, nn.Module, list[str]]:
    pruner = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5, bias_compensation=False, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = pruner.prune()
    return pruner, pruned, [str(w.message) for w in caught if "skipped group" in str(w.message)]


def test_a_first_prune_guards_the_original_once_and_runs_the_pruned_copy_unguarded(monkeypatch):
    model = test_faults_8.Plain().eval()
    before = test_faults_8._state(model)
    seen = _guarded(monkeypatch)
    pruner, pruned, skipped = _data_free(model)
    # the trace (proves nothing) and the masked original (proves the model and its copies clean);
    # the pruned copy's forward ran without the guard (it was a third guarded call)
    assert seen == [id(model), id(model)]
    assert writes_nothing(model) and writes_nothing(pruned)
    assert skipped == []
    assert pruned.c1.out_channels == 4 and pruned.c2.out_channels == 4 and pruned.fc.in_features == 4
    expected = masked_forward(pruner.graph, pruner.plan().pruned_units(), X)[0]
    with torch.no_grad():
        assert torch.allclose(pruned(X), expected, atol=1e-6)
    assert test_faults_8._changed(model, before) == []
    # a second prune of the same model: no guarded call at all
    seen.clear()
    _data_free(model)
    assert seen == []  # the trace too runs unguarded now


class Chain(test_verify.Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def test_a_wrong_slice_is_still_caught_on_a_first_prune(monkeypatch):
    """A slicing that keeps other channels of conv1 than the plan's (its consumer is sliced
    as planned): the model runs with the right shapes but differs from the masking oracle."""
    real = slicing.edits_for

    def shifted(graph, pruned):
        edits = real(graph, pruned)
        return [
            slicing.SliceEdit(e.module, e.slice, torch.sort((e.keep + 1) % 16).values, e.dim)
            if e.module == "conv1"
            else e
            for e in edits
        ]

    monkeypatch.setattr(slicing, "edits_for", shifted)
    model = Chain().eval()
    before = test_faults_8._state(model)
    pruner, pruned, skipped = _data_free(model)
    assert len(skipped) == 1 and "conv1" in skipped[0] and "zeroed" in skipped[0]
    assert pruned.conv1.out_channels == 16 and pruned.conv2.out_channels == 8  # conv2's group was cut right
    expected = masked_forward(pruner.graph, pruner.plan().pruned_units(), X)[0]
    with torch.no_grad():
        assert torch.allclose(pruned(X), expected, atol=1e-5)
    assert test_faults_8._changed(model, before) == []


def test_a_slicing_that_reads_its_width_is_still_skipped_by_the_data_free_path():
    pruner, pruned, skipped = _data_free(test_verify.ScalesByWidth().eval())
    assert len(skipped) == 1 and "conv2" in skipped[0]
    assert pruned.conv2.out_channels == 16 and pruned.conv1.out_channels == 8


def test_a_model_that_writes_its_weights_keeps_the_guard_on_its_pruned_copy(monkeypatch):
    model = test_faults_8.WritesItself().eval()
    before = test_faults_8._state(model)
    seen = _guarded(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner, pruned, _ = _data_free(model)
    assert not writes_nothing(model) and not writes_nothing(pruned)
    # the trace, the masked original, and the pruned copy: each guarded
    assert seen[:2] == [id(model), id(model)] and len(seen) == 3 and seen[2] != id(model)
    assert test_faults_8._changed(model, before) == []
    # the copy's own verification forward was put back: it counted no call and halved no weight
    assert float(pruned.calls) == 0.0
    kept = pruner.graph.keep_indices(pruner.plan().pruned_units())
    fc_in = next(k for (m, _), k in kept.items() if m == "fc")
    assert torch.equal(pruned.fc.weight, model.fc.weight[:, fc_in])


def test_writes_nothing_follows_copies_to_a_source_proven_after_they_were_made():
    plain = test_faults_8.Plain().eval()
    copy = copy_model(plain)
    copy_of_copy = copy_model(copy)
    assert not writes_nothing(plain) and not writes_nothing(copy) and not writes_nothing(copy_of_copy)
    with preserved(plain), torch.no_grad():
        call_model(plain, X)
    assert writes_nothing(plain) and writes_nothing(copy) and writes_nothing(copy_of_copy)
    writes = test_faults_8.WritesItself().eval()
    its_copy = copy_model(writes)
    with preserved(writes), torch.no_grad():
        call_model(writes, X)
    assert not writes_nothing(writes) and not writes_nothing(its_copy)
    # proving a copy clean says nothing about its source
    other = test_faults_8.Plain().eval()
    other_copy = copy_model(other)
    with preserved(other_copy), torch.no_grad():
        call_model(other_copy, X)
    assert writes_nothing(other_copy) and not writes_nothing(other)


@pytest.fixture
def stages():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import stages

        yield stages
    finally:
        sys.path.remove(str(Path(__file__).parents[1] / "benchmarks"))


def test_the_benchmark_times_the_peers_work_on_a_copy_and_leaves_the_model_as_it_was(stages):
    model = test_faults_8.Plain().eval()
    before = test_faults_8._state(model)
    got = stages.data_free_costs(model, X)
    assert sorted(got) == sorted(stages.DATA_FREE)
    assert all(len(v) == 2 and v[0] >= 0 and v[1] >= 0 for v in got.values())
    assert test_faults_8._changed(model, before) == []
    assert model.c1.out_channels == 8 and model.fc.in_features == 8


def test_the_trace_checks_the_guards_writes_in_its_recorder_and_still_protects_a_writing_model(monkeypatch):
    """The trace's write guard runs inside the recorder (no second Python mode on every op);
    a model that writes its weights in forward is left as it was, and is not remembered as
    clean; one that writes nothing is not remembered either (the trace proves nothing)."""
    from cleanai_core import DependencyGraph

    as_mode, checked = [], []
    real_dispatch, real_check = ms._WriteGuard.__torch_dispatch__, ms._WriteGuard.check

    def dispatch(self, func, types, args=(), kwargs=None):
        as_mode.append(func)
        return real_dispatch(self, func, types, args, kwargs)

    def check(self, func, args, kwargs):
        checked.append(func)
        return real_check(self, func, args, kwargs)

    monkeypatch.setattr(ms._WriteGuard, "__torch_dispatch__", dispatch)
    monkeypatch.setattr(ms._WriteGuard, "check", check)
    writes = test_faults_8.WritesItself().eval()
    before = test_faults_8._state(writes)
    DependencyGraph(writes, X)
    assert as_mode == [] and len(checked) > 10  # every op of the forward, checked by the recorder
    assert test_faults_8._changed(writes, before) == [] and float(writes.calls) == 0.0
    assert not writes_nothing(writes)
    plain = test_faults_8.Plain().eval()
    DependencyGraph(plain, X)
    assert not writes_nothing(plain)
    # outside a trace the guard is a dispatch mode of its own, as before
    checked.clear()
    with preserved(plain), torch.no_grad():
        call_model(plain, X)
    assert len(as_mode) == len(checked) > 0 and writes_nothing(plain)


class _Attends(nn.Module):
    """Convolutions, a linear layer, attention through ``scaled_dot_product_attention`` and a
    matrix-vector product: ops with formulas of torch's counter, of ours, and decomposed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.qkv = nn.Linear(8, 24)
        self.q = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.dw(torch.relu(self.conv(x))).flatten(2).transpose(1, 2)  # (B, 64, 8)
        q, k, v = self.qkv(t).chunk(3, -1)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        pooled = torch.softmax(a @ self.q, -1)  # a matrix times a vector
        return self.head((a * pooled.unsqueeze(-1)).sum(1))


@pytest.mark.parametrize("build", [test_faults_8.Plain, _Attends, Chain], ids=["cnn", "attention", "chain"])
def test_flops_counted_without_the_module_tracker_equal_torchs_counter(build):
    from torch.utils.flop_counter import FlopCounterMode

    from cleanai_core.metrics import EXTRA_FLOP_FORMULAS, _count_into, count_flops

    model = build().eval()
    stock = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)  # with its module tracker
    _count_into(stock, model, X, None)
    want = int(stock.get_total_flops())
    assert want > 0 and count_flops(model, X) == want
