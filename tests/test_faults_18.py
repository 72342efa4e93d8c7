"""Session 25, faults18: bad input to the public helpers around the pruner (criteria by name,
the plugin oracle, the dependency graph, the report writer); docs/reliability.md, "Session 25:
faults18"."""

from __future__ import annotations

import os

import pytest
import torch
from test_faults_17 import X, _net, _params  # the conv-BN net of 860 parameters and its input

from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.report import write_report
from cleanai_core.scoring import get_importance, get_reducer
from cleanai_core.testing import check_pruner


@pytest.mark.parametrize(
    "name, options, says",
    [
        ("magnitude", {"nope": 1}, "importance 'magnitude' has no option 'nope'; its options (with their defaults): p"),
        ("weight_activation", {"alpha": 0.7}, "has no option 'alpha'; its options (with their defaults): weight"),
        ("taylor", {"damp": 1e-3}, "importance 'taylor' has no option 'damp'; its options (with their defaults): red"),
        ("random", {"seed": "a"}, "importance 'random' cannot take seed='a' (RuntimeError: manual_seed"),
        ("random", {"seed": 2.5}, "importance 'random' cannot take seed=2.5"),
        ("magnitude", {"reducer": ["sum"]}, "unknown reducer ['sum']; choose one of: "),
    ],
)
def test_get_importance_names_an_option_the_criterion_does_not_have_or_take(name, options, says) -> None:
    with pytest.raises(UserError) as info:
        get_importance(name, **options)
    assert says in str(info.value), str(info.value)


def test_get_importance_still_builds_criteria_from_good_options_and_keeps_their_own_errors() -> None:
    a = StructuredPruner(_net(), X, importance=get_importance("random", seed=3), pruning_ratio=0.5).prune()
    b = StructuredPruner(_net(), X, importance=get_importance("random", seed=3), pruning_ratio=0.5).prune()
    assert _params(a) == _params(b) == 288  # same seed, same plan: 860 -> 288 at one half
    assert get_importance("magnitude", p=1).p == 1
    with pytest.raises(UserError, match=r"magnitude p=3: use 1 or 2"):  # the criterion's own message, as it was
        get_importance("magnitude", p=3)
    with pytest.raises(UserError, match=r"unknown reducer 5"):
        get_reducer(5)


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"ratio": 0}, "check_pruner: ratio=0 must be a number strictly between 0 and 1"),
        ({"ratio": 2}, "check_pruner: ratio=2 must be"),
        ({"ratio": -1}, "check_pruner: ratio=-1 must be"),
        ({"ratio": float("nan")}, "check_pruner: ratio=nan must be"),
        ({"ratio": "0.5"}, "check_pruner: ratio='0.5' must be"),
        ({"seed": "a"}, "check_pruner: seed='a' must be an integer"),
        ({"seed": None}, "check_pruner: seed=None must be an integer"),
        ({"output_transfrom": None}, "check_pruner got the keyword argument(s) 'output_transfrom', which it does not"),
        ({"example_inputs": X}, "the inputs are its second argument"),
    ],
)
def test_check_pruner_names_an_argument_that_cannot_make_an_oracle_check(kwargs, says) -> None:
    with pytest.raises(UserError) as info:
        check_pruner(_net(), X, **kwargs)
    assert says in str(info.value), str(info.value)


def test_check_pruner_still_compares_with_the_oracle_for_numpy_ratios_and_seeds() -> None:
    import numpy as np

    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = check_pruner(model, X, ratio=np.float64(0.5), seed=np.int64(1))
    assert report.params_before == 860 and report.params_after == 288, report
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5 and report.kept_whole == ()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_graph_of_a_model_on_the_meta_device_names_the_device_and_the_fix() -> None:
    model = _net().to("meta")
    for call in (lambda: DependencyGraph(model, X), lambda: check_pruner(model, X)):
        with pytest.raises(UserError) as info:
            call()
        msg = str(info.value)
        assert "the model's tensors are on the meta device (e.g. '0.weight'" in msg, msg
        assert "to_empty(device='cpu')" in msg and "tracing" not in msg
    assert len(DependencyGraph(_net(), X).groups(prunable_only=True)) == 2  # the same model with values


@pytest.mark.parametrize("report", [None, [("params_before", 1)], "report.json"])
def test_write_report_of_something_that_is_no_report_writes_nothing(tmp_path, report) -> None:
    (tmp_path / "report.md").write_text("mine")
    with pytest.raises(UserError) as info:
        write_report(tmp_path, report)
    said = f"write_report needs the report as a dict (pruner.report() after prune()), got {type(report).__name__}"
    assert said in str(info.value), str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["report.md"] and (tmp_path / "report.md").read_text() == "mine"
