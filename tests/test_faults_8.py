"""Eighth round of bad input and edge cases (docs/reliability.md, "Session 18: bad
inputs"): forwards that write the model's own weights and tensors in place, ..."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cleanai_core import DependencyGraph, StructuredPruner, WeightActivationImportance
from cleanai_core.testing import check_pruner

X = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))
Y = torch.tensor([0, 1])


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    now = model.state_dict()
    return sorted(k for k in state.keys() | now.keys() if k not in now or k not in state or not torch.equal(now[k], state[k]))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- forwards that write their own weights -------------------------------------------------


class DataClipConv(nn.Conv2d):
    """Weight clipping in forward through ``.data`` (no version bump)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.weight.data.clamp_(-0.05, 0.05)
        return super().forward(x)


class NoGradClipConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.weight.clamp_(-0.05, 0.05)
        return super().forward(x)


class HalvingLinear(nn.Linear):
    """Replaces its weight's data at every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.weight.data = self.weight.data * 0.5
        return super().forward(x)


class WritesItself(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = DataClipConv(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = NoGradClipConv(8, 8, 3, padding=1)
        self.fc = HalvingLinear(8, 4)
        self.calls = torch.zeros(())  # a plain tensor attribute, counted in place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.c2(h)).mean((2, 3)))


@pytest.mark.parametrize("importance", ["weight_activation", "taylor", "magnitude"])
def test_a_forward_that_writes_its_weights_leaves_the_users_model_unchanged(importance):
    model = WritesItself()
    before, calls = _state(model), model.calls.clone()
    imp = WeightActivationImportance() if importance == "weight_activation" else importance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DependencyGraph(model, X)
        assert _changed(model, before) == []
        pruner = StructuredPruner(model, X, imp, pruning_ratio=0.5)
        pruner.collect_activations([(X, Y)] * 3)
        pruned = pruner.prune()
        pruner.report()
        check_pruner(model, X)
    assert _changed(model, before) == []  # c1.weight, c2.weight and fc.weight were clipped / halved
    assert torch.equal(model.calls, calls)
    assert (_params(model), _params(pruned)) == (860, 288)


class RenormEmbedding(nn.Module):
    """``nn.Embedding(max_norm=...)`` renormalises the rows it looks up, in place, at every call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 16, max_norm=0.5)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(1)


def test_an_embedding_with_max_norm_keeps_the_users_rows():
    model, ids = RenormEmbedding(), torch.arange(12).reshape(2, 6)
    before = _state(model)
    pruner = StructuredPruner(model, ids, WeightActivationImportance(), pruning_ratio=0.5)
    pruner.collect_activations([ids] * 2)
    with pytest.warns(RuntimeWarning, match=r"skipped group 0 \(emb, fc1"):  # max_norm spans the channels
        pruned = pruner.prune()
    assert _changed(model, before) == []  # emb.weight: 12 rows renormalised to norm 0.5
    assert pruned.fc1.out_features == 16


class WritesOnItsSecondCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.step += 1
        if self.step > 1:
            with torch.no_grad():
                self.fc.weight.zero_()
        return self.fc(x)


def test_a_weight_written_only_on_a_later_call_is_named():
    from cleanai_core.model_state import preserved
    from cleanai_core.runtime import call_model

    model = WritesOnItsSecondCall()
    weight = model.fc.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"wrote its parameter\(s\) fc.weight in place on a call after the first"):
        with preserved(model), torch.no_grad():
            call_model(model, torch.ones(1, 4))  # writes nothing: later calls run unguarded
            call_model(model, torch.ones(1, 4))
    assert int(model.step) == 0  # the buffer is put back; the weight could not be
    assert not torch.equal(model.fc.weight, weight)
