"""Session 24, faults17: fault and bad-input cases through the public Python API
(docs/reliability.md, "Session 24: faults17")."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner, WeightActivationImportance, recover
from cleanai_core.allocation import allocate_ratios
from cleanai_core.errors import UserError
from cleanai_core.sensitivity import analyse_sensitivity


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


X = torch.randn(2, 3, 8, 8)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class _Encoding(collections.UserDict):  # what a tokenizer returns (transformers' BatchEncoding is a UserDict)
    pass


@pytest.mark.parametrize("kind", ["dict", "userdict", "splits"])
def test_a_dict_given_as_the_data_is_named_as_one_batch_not_as_text_to_tokenize(kind: str) -> None:
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    data = {
        "dict": {"input": x, "labels": y},
        "userdict": _Encoding({"input_ids": x, "attention_mask": y}),
        "splits": {"train": [(x, y)], "test": [(x, y)]},
    }[kind]
    first = "'train'" if kind == "splits" else ("'input_ids'" if kind == "userdict" else "'input'")
    calls = [
        lambda: StructuredPruner(_mlp(), x).collect_activations(data, progress=False),
        lambda: analyse_sensitivity(StructuredPruner(_mlp(), x, importance="magnitude"), data, progress=False),
        lambda: recover(_mlp(), _mlp(), data, epochs=1, progress=False),
        lambda: recover(_mlp(), _mlp(), [(x, y)], val_data=data, epochs=1, progress=False),
    ]
    for call in calls:
        with pytest.raises(UserError) as info:
            call()
        msg = str(info.value)
        assert f"(keys {first}" in msg and "iterating it gives its keys, not batches" in msg, msg
        assert "give a list of batches ([batch])" in msg and "Tokenize" not in msg


def test_an_edited_plan_whose_pruned_is_not_a_mask_of_its_units_is_refused_by_group() -> None:
    def pruner() -> StructuredPruner:
        p = StructuredPruner(_net(), X, importance="magnitude", pruning_ratio=0.5)
        p.plan()
        return p

    for bad, got in [
        (torch.tensor([100]), "got a int64 tensor of shape (1,) (unit indices: gp.pruned = torch.zeros(8"),
        (torch.tensor([0, 3]), "got a int64 tensor of shape (2,) (unit indices"),
        (torch.ones(3, dtype=torch.bool), "got a bool tensor of shape (3,)"),
        (torch.ones(8), "got a float32 tensor of shape (8,)"),
        (None, "got None"),
    ]:
        p = pruner()
        gp = next(g for g in p.plan().groups if g.group.size == 8)
        gp.pruned = bad
        with pytest.raises(UserError) as info:
            p.prune()
        msg = str(info.value)
        assert f"the plan's group {gp.group.id} (" in msg and "shape (8,) (True removes the unit)" in msg, msg
        assert got in msg, msg
        assert p.pruned_model is None
    # a list of booleans of the right length is the mask it spells: units 0 and 3 of that group go
    p = pruner()
    first = next(g for g in p.plan().groups if "0" in g.group.modules())
    for g in p.plan().groups:
        g.pruned = [i in (0, 3) for i in range(g.group.size)] if g is first else [False] * g.group.size
    m = p.prune()
    assert m[0].weight.shape == (6, 3, 3, 3) and m[3].weight.shape == (8, 6, 3, 3)
    assert torch.equal(m[0].weight, _net()[0].weight[[1, 2, 4, 5, 6, 7]])
    assert p.plan().n_pruned == 2


def test_importance_set_to_none_after_construction_is_the_default_criterion() -> None:
    p = StructuredPruner(_net(), X, importance="magnitude", pruning_ratio=0.5)
    p.collect_activations([X], progress=False)
    p.importance = None
    m = p.prune()
    assert isinstance(p.importance, WeightActivationImportance)
    ref = StructuredPruner(_net(), X, pruning_ratio=0.5)
    ref.collect_activations([X], progress=False)
    assert _params(m) == _params(ref.prune())
    assert torch.equal(m[0].weight, ref.pruned_model[0].weight)


def test_a_pruner_that_pruned_in_place_refuses_to_score_build_or_analyse_the_model_it_no_longer_describes() -> None:
    m = _net()
    p = StructuredPruner(m, X, pruning_ratio=0.5, inplace=True)
    p.collect_activations([X], progress=False)
    applied = p.plan()
    p.prune()
    assert m[0].weight.shape == (4, 3, 3, 3)
    for who, call in [
        ("score", p.score),
        ("build", lambda: p.build(applied.pruned_units())),
        ("plan_for", p.plan_for),
        ("collect_activations", lambda: p.collect_activations([X], progress=False)),
        ("analyse_sensitivity", lambda: analyse_sensitivity(p, [X], progress=False)),
        ("allocate_ratios", lambda: allocate_ratios(p, None, target_flops=0.5)),
        ("prune", p.prune),
    ]:
        with pytest.raises(UserError, match=f"^{who}: this pruner already pruned the model in place; to prune furth"):
            call()
    assert p.plan() is applied and applied.n_pruned == 8  # the plan it applied stays readable
    assert m[0].weight.shape == (4, 3, 3, 3) and m[3].weight.shape == (4, 4, 3, 3)
    again = StructuredPruner(m, X, pruning_ratio=0.5)  # the way on: a new pruner on the pruned model
    again.collect_activations([X], progress=False)
    assert again.prune()[0].weight.shape == (2, 3, 3, 3)


def test_allocate_ratios_names_a_step_iterations_or_latency_measure_it_cannot_use() -> None:
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    p = StructuredPruner(_net(), x, pruning_ratio=0.5)
    p.collect_activations([(x, y)], progress=False)
    result = analyse_sensitivity(p, [(x, y)], progress=False)
    for kwargs, message in [
        ({"step": 0}, "allocate_ratios: step=0 must be a number above 0 and at most 1"),
        ({"step": -0.1}, "allocate_ratios: step=-0.1 must be a number above 0"),
        ({"step": "0.05"}, "allocate_ratios: step='0.05' must be a number"),
        ({"iterations": "3"}, "allocate_ratios: iterations='3' must be an integer >= 0"),
        ({"iterations": -1}, "allocate_ratios: iterations=-1 must be an integer >= 0"),
    ]:
        with pytest.raises(UserError, match=f"^{message}"):
            allocate_ratios(p, result, target_flops=0.5, **kwargs)
    with pytest.raises(UserError, match="^allocate_ratios needs the StructuredPruner whose groups it tries"):
        allocate_ratios("pruner", result, target_flops=0.5)
    with pytest.raises(UserError, match="^latency_measure=5 is not a function"):
        allocate_ratios(p, result, target_latency=0.5, latency_measure=5)
    for got, shown_as in [("fast", "'fast'"), (None, "None"), (0.0, "0.0"), (float("nan"), "nan"), (-1.0, "-1.0")]:
        with pytest.raises(UserError, match=f"^latency_measure\\(model\\) returned {shown_as}: it must return the"):
            allocate_ratios(p, result, target_latency=0.5, latency_measure=lambda m, v=got: v)
    # a NumPy-like 0-d tensor number is a number: the allocation meets the target by parameters as latency
    alloc = allocate_ratios(p, result, target_latency=0.5, latency_measure=lambda m: torch.tensor(float(_params(m))))
    assert isinstance(alloc.cost, float) and alloc.cost <= 0.5
    assert alloc == allocate_ratios(p, result, target_latency=0.5, latency_measure=lambda m: float(_params(m)))


def _two_convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip


def _below_zero(group, ctx):  # higher keeps: unit i scores i - size, so units 0, 1, ... go first
    return torch.arange(group.size, dtype=torch.float64) - group.size


@pytest.mark.parametrize("normalizer", ["mean", "max", "sum", "lamp"])
def test_scores_below_zero_that_global_rankings_normaliser_would_reorder_are_refused(normalizer: str) -> None:
    p = StructuredPruner(_two_convs(), X, importance=_below_zero, pruning_ratio=0.5, global_pruning=True,
                         normalizer=normalizer)  # fmt: skip
    with pytest.raises(UserError) as info:
        p.prune()
    msg = str(info.value)
    assert msg.startswith("group 1 (0, 2) has scores below 0 (lowest -8), and global ranking's per-group normaliser")
    assert "return scores >= 0 from the importance (e.g. scores - scores.min())" in msg
    assert p.pruned_model is None


@pytest.mark.parametrize("normalizer", ["gaussian", "standardization", "none"])
def test_scores_below_zero_rank_as_they_order_under_a_normaliser_that_keeps_the_order(normalizer: str) -> None:
    p = StructuredPruner(_two_convs(), X, importance=_below_zero, pruning_ratio=0.5, global_pruning=True,
                         normalizer=normalizer)  # fmt: skip
    assert [gp.pruned.nonzero().flatten().tolist() for gp in p.plan().groups] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    shifted = StructuredPruner(_two_convs(), X, importance=lambda g, c: _below_zero(g, c) + g.size,
                               pruning_ratio=0.5, global_pruning=True)  # fmt: skip
    assert [gp.pruned.nonzero().flatten().tolist() for gp in shifted.plan().groups] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert _params(p.prune()) == _params(shifted.prune()) == 4 * 27 + 4 + 4 * 4 * 9 + 4 + 4 * 4 + 4


def test_nan_scores_from_a_criterion_of_the_users_are_refused_not_pruned_first() -> None:
    def some_nan(group, ctx):
        s = torch.arange(group.size, dtype=torch.float64)
        s[2] = float("nan")
        return s

    class Scores:  # an object no plugin registers
        def __call__(self, group, ctx):
            return torch.full((group.size,), float("nan"))

    for importance, name, count in [(some_nan, "some_nan", 1), (Scores(), "Scores", 8)]:
        m = _net()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        p = StructuredPruner(m, X, importance=importance, pruning_ratio=0.5)
        with pytest.raises(UserError) as info:
            p.prune()
        assert str(info.value).startswith(f"importance {name!r} returned {count} NaN score(s) for group 1 (0, 1, 3) ")
        assert "NaN cannot be ranked; return finite scores (inf keeps a unit)" in str(info.value)
        assert p.pruned_model is None and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    # inf is a score: the unit it marks is kept, the lowest finite ones go
    keep_two = lambda g, c: torch.tensor([float("inf"), 0, 1, 2, 3, 4, 5, float("inf")])  # noqa: E731
    plan = StructuredPruner(_net(), X, importance=keep_two, pruning_ratio=0.5).plan()
    assert [gp.pruned.nonzero().flatten().tolist() for gp in plan.groups] == [[1, 2, 3, 4], [1, 2, 3, 4]]
