"""The data-free path's costs: ``copy_model`` is ``copy.deepcopy`` for models without
deepcopy's per-object dispatch on the modules that copy the default way; the original model
runs twice, to trace it and masked (its outputs stand in for the reference where they settle it)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_verify import Body
from torch import nn
from torch.nn.utils import parametrize

from cleanai_core import StructuredPruner
from cleanai_core.model_state import copy_model


class Keeps(nn.Module):
    """Plain attributes of every kind a module may hold."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.alias = self.fc  # the same module under two names
        self.widths = [4, {"a": (1, 2)}, {3}]
        self.pair = (self.fc.weight, 2)  # a tuple holding a parameter
        self.scale = torch.ones(4)  # a plain tensor attribute
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        return self.fc(x) * self.scale


class OwnDeepcopy(nn.Linear):
    copies = 0

    def __deepcopy__(self, memo):
        type(self).copies += 1
        new = OwnDeepcopy(self.in_features, self.out_features)
        new.load_state_dict(self.state_dict())
        memo[id(self)] = new
        return new


class SetsState(nn.Linear):
    def __setstate__(self, state):
        super().__setstate__(state)
        self.restored = True


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Keeps(), OwnDeepcopy(4, 4), SetsState(4, 4))


def test_the_copy_is_deepcopy_with_the_same_sharing():
    model = _model()
    model[0].fc.register_forward_hook(lambda m, a, o: o + 1)
    new, ref = copy_model(model), copy.deepcopy(model)
    for a, b, o in zip(new.modules(), ref.modules(), model.modules(), strict=True):
        assert type(a) is type(b) and a is not o and sorted(a.__dict__) == sorted(b.__dict__)
    keeps = new[0]
    assert keeps.alias is keeps.fc and keeps.pair[0] is keeps.fc.weight
    assert keeps.widths == [4, {"a": (1, 2)}, {3}] and keeps.widths is not model[0].widths
    assert keeps.widths[1] is not model[0].widths[1] and keeps.scale is not model[0].scale
    assert keeps.fc._forward_hooks is not model[0].fc._forward_hooks and len(keeps.fc._forward_hooks) == 1
    assert new[2].restored is True
    originals = {t.data_ptr() for t in model.state_dict().values()}
    assert all(t.data_ptr() not in originals for t in new.state_dict().values())
    x = torch.randn(2, 4)
    assert torch.equal(new(x), ref(x))
    with torch.no_grad():
        keeps.fc.weight.zero_()
    assert bool(model[0].fc.weight.abs().sum() > 0)  # the user's model is not written through the copy


def test_a_module_with_its_own_deepcopy_is_copied_by_it():
    OwnDeepcopy.copies = 0
    copy_model(_model())
    assert OwnDeepcopy.copies == 1


def test_the_memo_shares_what_it_names_and_non_leaf_attributes_are_detached():
    model = _model()
    with torch.enable_grad():
        model[0].kept = model[0].fc(torch.randn(1, 4))  # what a forward under gradients leaves behind
        model[0].kept_list = [model[0].kept]
    assert not model[0].kept.is_leaf
    new = copy_model(model, {id(model[0].fc.weight): model[0].fc.weight})
    assert new[0].fc.weight is model[0].fc.weight and new[0].fc.bias is not model[0].fc.bias
    assert new[0].kept.is_leaf and new[0].kept_list[0] is new[0].kept
    assert torch.equal(new[0].kept, model[0].kept.detach())


def test_parametrized_and_scripted_modules_still_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), torch.jit.script(nn.Linear(4, 2)))
    parametrize.register_parametrization(model[0], "weight", _Double())
    new = copy_model(model)
    x = torch.randn(3, 4)
    assert torch.equal(new(x), model(x)) and parametrize.is_parametrized(new[0])
    assert new[0].parametrizations.weight.original is not model[0].parametrizations.weight.original


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_plain_modules_are_not_copied_through_deepcopy(monkeypatch):
    """The per-object dispatch of ``copy.deepcopy`` was most of a data-free prune()."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(5)])
    calls = []
    real = copy.deepcopy

    def counting(x, memo=None, _nil=[]):  # noqa: B006 (deepcopy's own signature)
        calls.append(type(x).__name__)
        return real(x, memo)

    monkeypatch.setattr(copy, "deepcopy", counting)
    new = copy_model(model, {id(t): t for t in model.parameters()})
    # only the BatchNorms' buffers (tensors keep torch's own __deepcopy__, which copies their storage)
    assert set(calls) == {"Tensor", "UntypedStorage"} and calls.count("Tensor") == 3 * 5
    assert new[0][0].weight is model[0][0].weight and new[0][1].running_mean is not model[0][1].running_mean


class CountsCalls(Body):
    calls: list[int] = []  # ids of the objects run (a copy counts too; user hooks stay off copies)

    def forward(self, x):
        self.calls.append(id(self))
        y = self.features(x)
        # every layer runs: a layer with parameters that never runs in eval mode (Body's aux alone)
        # is looked for by one more trace in training mode (GoogLeNet's auxiliary classifiers)
        return self.fc(y), self.aux(y)


def test_the_data_free_path_runs_the_original_twice_in_all():
    model = CountsCalls().eval()
    calls = CountsCalls.calls = []
    model.register_forward_pre_hook(lambda m, a: None)
    x = torch.randn(1, 3, 8, 8)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, bias_compensation=False)
    calls[:] = [c == id(model) for c in calls]
    assert calls == [True]  # the trace
    pruned = pruner.prune()
    calls[1:] = [c == id(model) for c in calls[1:]]
    # the masked original (the original itself with zeroing hooks: first, since its guarded call
    # proves the copy writes nothing too), then the pruned model (a copy); no forward of the
    # original for reference (it was one more)
    assert calls == [True, True, False]
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == [1, 0, 0, 0, 0]
    assert pruned.conv1.out_channels == 8 and pruned.conv2.out_channels == 8


class ReadsItsWidth(Body):
    """Returns a tensor as wide as ``conv2``'s output: slicing changes an output's shape."""

    def forward(self, x):
        y = self.features(x)
        return self.fc(y), torch.zeros(y.shape[1])


def test_a_pruned_output_shape_is_still_caught_against_the_original():
    model = ReadsItsWidth().eval()
    pruner = StructuredPruner(model, torch.randn(1, 3, 8, 8), "magnitude", pruning_ratio=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = pruner.prune()
    skipped = [str(w.message) for w in caught if "skipped group" in str(w.message)]
    assert len(skipped) == 1 and "conv2" in skipped[0] and "output shapes [(1, 10), (8,)]" in skipped[0]
    assert pruned.conv2.out_channels == 16 and pruned.conv1.out_channels == 8
    assert [tuple(o.shape) for o in pruned(torch.randn(1, 3, 8, 8))] == [(1, 10), (16,)]


@pytest.mark.parametrize("bad", ["nan", "shape"])
def test_the_check_without_masked_outputs_still_runs_the_original(bad):
    from cleanai_core.errors import PruningError
    from cleanai_core.verify import Reference, check_outputs

    model = CountsCalls().eval()
    x = torch.randn(1, 3, 8, 8)
    asked = []

    def ref():
        asked.append(1)
        return Reference([(1, 10)], [True])

    out = [torch.full((1, 10), float("nan"))] if bad == "nan" else [torch.zeros(1, 9)]
    like = [torch.zeros(1, 10)]
    with pytest.raises(PruningError, match="NaN or inf" if bad == "nan" else "shapes"):
        check_outputs(model, x, ref, outputs=out, like=like)
    assert asked == [1]
    assert check_outputs(model, x, ref, outputs=[torch.ones(1, 10)], like=like)[0].shape == (1, 10)
    assert asked == [1]  # settled by the masked outputs: the original did not run


class AddsInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.armed = False

    def forward(self, x):
        y = self.conv1(x)
        if self.armed and bool((y[:, 0] == 0).all()):
            raise RuntimeError("channel 0 is all zeros")
        y.add_(1.0)  # after the zeroing at conv1's output: conv2's input must be zeroed again
        return self.conv2(y)


def _conv1_group(graph) -> torch.Tensor:
    pruned = torch.zeros(graph.root.numel(), dtype=torch.bool)
    (group,) = [g for g in graph.groups(prunable_only=True) if "conv1" in g.modules()]
    pruned[group.units[[0, 3, 5]]] = True
    return pruned


def test_the_masked_original_zeroes_an_input_written_since_its_producer_was_zeroed():
    from cleanai_core import DependencyGraph
    from cleanai_core.testing import masked_forward

    model = AddsInPlace().eval()
    x = torch.randn(2, 3, 4, 4)
    graph = DependencyGraph(model, x)
    (got,) = masked_forward(graph, _conv1_group(graph), x)
    with torch.no_grad():
        y = model.conv1(x) + 1.0
        y[:, [0, 3, 5]] = 0.0
        want = model.conv2(y)
    assert torch.equal(got, want)
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == [0, 0, 0]


def test_a_masked_run_that_fails_leaves_the_model_as_it_was():
    from cleanai_core import DependencyGraph
    from cleanai_core.testing import masked_forward

    model = AddsInPlace().eval()
    x = torch.randn(2, 3, 4, 4)
    graph = DependencyGraph(model, x)
    tensors = {n: (t, t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()}
    model.armed = True
    with pytest.raises(RuntimeError, match="all zeros"):
        masked_forward(graph, _conv1_group(graph), x)
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == [0, 0, 0]
    now = model.state_dict(keep_vars=True)
    assert all(now[n] is t and torch.equal(t, saved) for n, (t, saved) in tensors.items())
    assert model(x).shape == (2, 4, 4, 4)


@pytest.mark.parametrize("n", [0, 1, 7, 5000])
def test_graph_unique_is_torch_unique(n):
    from cleanai_core.graph.groups import unique

    x = torch.randint(-50, 50, (n,), generator=torch.Generator().manual_seed(n))
    assert torch.equal(unique(x), torch.unique(x)) and unique(x).dtype == torch.int64


class Doubles(nn.Module):
    """Keeps what its forward made: a reference to its output, a view of it, or nothing."""

    def __init__(self, keep: str) -> None:
        super().__init__()
        self.keep = keep

    def forward(self, x):
        out = x * 2.0
        self.made = id(out)  # an int: no reference
        if self.keep == "reference":
            self.last = out
        elif self.keep == "view":
            self.last = out[:, :2]
        return out


@pytest.mark.parametrize("keep", ["nothing", "reference", "view"])
def test_an_output_is_zeroed_in_place_only_where_nothing_else_sees_it(keep):
    from cleanai_core.masking import _Zeroed

    module = Doubles(keep)
    module.register_forward_hook(_Zeroed().output(1, torch.tensor([0, 2])))
    with torch.no_grad():
        y = module(torch.ones(2, 3))
    assert y.tolist() == [[0.0, 2.0, 0.0], [0.0, 2.0, 0.0]]
    assert (id(y) == module.made) is (keep == "nothing")  # in place: the very tensor the module made
    if keep != "nothing":
        assert bool((module.last == 2.0).all())  # what the module kept is not zeroed under it


class Overlapping(nn.Module):
    def forward(self, x):
        return torch.empty_strided((2, 3), (0, 1)).fill_(2.0)  # one row of memory for two rows


def test_an_output_that_overlaps_itself_is_zeroed_in_a_copy(recwarn):
    from cleanai_core.masking import _Zeroed

    module = Overlapping()
    module.register_forward_hook(_Zeroed().output(1, torch.tensor([1])))
    with torch.no_grad():
        y = module(torch.ones(2, 3))
    assert y.tolist() == [[2.0, 0.0, 2.0], [2.0, 0.0, 2.0]]
    assert y.stride() == (3, 1) and [str(w.message) for w in recwarn] == []  # not written in place
