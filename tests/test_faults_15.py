"""Session 23b, faults15: bad input through the Python API (docs/reliability.md, "Session 23b: faults15")."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cleanai_core import StructuredPruner, recover
from cleanai_core.errors import UserError
from cleanai_core.metrics import count_flops, count_params, measure_latency
from cleanai_core.sensitivity import analyse_sensitivity


def _net(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    ).eval()  # fmt: skip


X = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: count_params("resnet18"), "count_params needs a torch.nn.Module, got 'resnet18'"),
        (lambda m: count_flops(None, X), "count_flops needs a torch.nn.Module, got None"),
        (lambda m: count_flops(m, X.numpy()), "count_flops's inputs holds a NumPy array, not a tensor"),
        (lambda m: count_flops(m, None), "count_flops's inputs holds no tensor"),
        (lambda m: count_flops(m, X, forward_fn="m(x)"), "forward_fn='m(x)' is not a function"),
        (lambda m: measure_latency(m, X, repeats=0), "measure_latency: repeats=0 must be an integer >= 1"),
        (lambda m: measure_latency(m, X, repeats="5"), "measure_latency: repeats='5' must be an integer >= 1"),
        (lambda m: measure_latency(m, X, repeats=2.5), "measure_latency: repeats=2.5 must be an integer >= 1"),
        (lambda m: measure_latency(m, X, warmup=-1), "measure_latency: warmup=-1 must be an integer >= 0"),
        (lambda m: measure_latency(m, ["x"]), "measure_latency's inputs holds text ('x')"),
    ],
)
def test_the_measuring_functions_name_an_argument_out_of_form(call, message):
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as info:
        call(model)
    assert message in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_measuring_functions_still_take_numpy_counts_and_a_forward_fn_with_its_own_inputs():
    import numpy as np

    model = _net()
    assert count_params(model) == 3 * 8 * 9 + 8 + 16 + 8 * 8 * 9 + 8 + 8 * 4 + 4
    flops = count_flops(model, X)
    assert flops == count_flops(model, {"image": X}, forward_fn=lambda m, b: m(b["image"]))
    assert measure_latency(model, X, repeats=np.int64(2), warmup=np.int64(0)) > 0


def _sensitivity(model: nn.Module, data: list) -> object:
    pruner = StructuredPruner(model, X, importance="magnitude")
    return analyse_sensitivity(pruner, data, ratios=[0.5], progress=False, bn_passes=0)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0, 1, 2]), "the sensitivity data's labels have shape (3,) but the model's outputs (2, 4)"),
        (torch.tensor([7, 9]), "labels go from 7 to 9 but the model has 4 outputs; give class indices 0..3"),
        (torch.tensor([[-3], [1]]), "labels go from -3 to 1 but the model has 4 outputs"),
    ],
)
def test_sensitivity_labels_that_cannot_be_the_models_classes_are_refused(labels, message):
    with pytest.raises(UserError) as info:
        _sensitivity(_net(), [(X, labels)])
    assert message in str(info.value)


def test_sensitivity_accuracy_of_a_one_logit_classifier_reads_the_logits_sign():
    model = _net(classes=1)
    with torch.no_grad():
        logit = model(X)[:, 0]
    labels = (logit > 0).long()  # the model's own predictions: 100 %
    result = _sensitivity(model, [(X, labels)])
    assert result.base_accuracy == 100.0
    assert _sensitivity(model, [(X, 1 - labels)]).base_accuracy == 0.0
    with pytest.raises(UserError, match="1 output \\(a binary classifier: labels 0 and 1\\)"):
        _sensitivity(model, [(X, torch.tensor([0, 2]))])


def test_sensitivity_without_class_labels_keeps_the_curves_without_accuracy():
    result = _sensitivity(_net(), [(X, torch.tensor([0.5, 1.5]))])
    assert result.base_accuracy is None
    assert len(result.curves) == 2
    exact = _sensitivity(_net(), [(X, torch.tensor([0, 1]))])
    assert exact.base_accuracy in (0.0, 50.0, 100.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.make_plan("0.5", p.score()), "make_plan: ratio='0.5' must be a number from 0 up to"),
        (lambda p: p.make_plan(float("nan"), p.score()), "make_plan: ratio=nan must be a number"),
        (lambda p: p.make_plan(1.0, p.score()), "make_plan: ratio=1.0 must be a number"),
        (lambda p: p.make_plan(0.5, None), "make_plan: scores=None must be a dict of unit scores per group id"),
        (
            lambda p: p.make_plan(0.5, {1: torch.zeros(3)}),
            "make_plan: scores[1] is a tensor of shape (3,), but group 1 (0, 1, 3) has 8 units",
        ),
        (lambda p: p.make_plan(0.5, {}), "make_plan: scores[1] is None, but group 1 (0, 1, 3) has 8 units"),
        (lambda p: p.score(graph="g"), "score: graph='g' must be a DependencyGraph"),
        (lambda p: p.score(model=nn.Linear(2, 2)), "score: the model given is the module Linear(in_features=2"),
        (lambda p: p.plan_for(target="0.5"), "plan_for: target='0.5' must be a positive number"),
        (lambda p: p.plan_for(target=float("nan")), "plan_for: target=nan must be a positive number"),
    ],
)
def test_the_pruners_planning_methods_name_an_argument_that_cannot_make_a_plan(call, message):
    model = _net()
    pruner = StructuredPruner(model, X, importance="magnitude")
    with pytest.raises(UserError) as info:
        call(pruner)
    assert message in str(info.value)
    assert pruner.prune() is not model  # the pruner still works after the refusal


def test_the_planning_methods_take_numpy_ratios_and_their_own_scores():
    import numpy as np

    pruner = StructuredPruner(_net(), X, importance="magnitude")
    scores = pruner.score()
    plan = pruner.make_plan(np.float32(0.5), scores)
    assert [p.n_pruned for p in plan.groups] == [4, 4]
    assert [p.n_pruned for p in pruner.make_plan(torch.tensor(0.0), scores).groups] == [0, 0]
    assert [p.n_pruned for p in pruner.plan_for(target=np.float64(0.5)).groups] == [
        p.n_pruned for p in pruner.plan_for(target=0.5).groups
    ]


def test_options_set_by_their_constructor_names_after_construction_take_effect_or_are_refused():
    base = StructuredPruner(_net(), X, importance="magnitude")
    assert count_params(base.prune()) == 538
    pruner = StructuredPruner(_net(), X, importance="magnitude")
    pruner.layer_pruning_ratios = {"0": 0.9}  # was a new attribute nothing read: 538 parameters again
    assert pruner.layer_pruning_ratios == {"0": 0.9}
    assert count_params(pruner.prune()) == 118
    with pytest.raises(UserError, match="ignored_layers cannot change after the pruner is built"):
        pruner.ignored_layers = ["0"]
    assert pruner.ignored_layers == []
    with pytest.raises(UserError, match="unknown normaliser 'nope'; choose one of"):
        pruner.normalizer = "nope"
    with pytest.raises(UserError, match="normalizer=\\['mean'\\] must be the name of a normaliser"):
        StructuredPruner(_net(), X, importance="magnitude", normalizer=["mean"])
    ranked = StructuredPruner(_net(), X, importance="magnitude", global_pruning=True, pruning_ratio=0.5)
    ranked.normalizer = "max"  # global ranking reads it: 254 parameters with the default "mean"
    assert count_params(ranked.prune()) == 302


def _widen(model: nn.Module) -> None:
    model[3], model[7] = nn.Conv2d(8, 16, 1), nn.Linear(16, 4)


def _append(model: nn.Module) -> None:
    model.append(nn.Softmax(1))


def _drop(model: nn.Module) -> None:
    del model[4]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_widen, "the parameters of '3' (Conv2d) were {'weight': (8, 8, 3, 3), 'bias': (8,)} and are now"),
        (_append, "the layer '8' (Softmax) was added"),
        (_drop, "the layer '4' was ReLU and is now AdaptiveAvgPool2d"),
    ],
)
@pytest.mark.parametrize("when", ["prune", "collect_activations"])
def test_a_model_changed_after_the_pruner_was_built_is_refused_naming_the_change(change, message, when):
    model = _net()
    pruner = StructuredPruner(model, X, importance="magnitude")
    change(model)
    with pytest.raises(UserError) as info:
        pruner.prune() if when == "prune" else pruner.collect_activations([X], progress=False)
    assert "the model changed after the pruner was built: " + message in str(info.value)
    assert "build a new StructuredPruner once the model is as it will be pruned" in str(info.value)
    assert count_params(StructuredPruner(model, X, importance="magnitude").prune()) < count_params(model)


def test_new_weights_of_the_same_shapes_and_an_in_place_prune_are_not_a_change():
    model = _net()
    pruner = StructuredPruner(model, X, importance="magnitude", inplace=True)
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # values, not layout: scored as they are now
    model.eval()
    assert count_params(pruner.prune()) == 538
    assert count_params(model) == 538


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.graph.groups(prunable_only="no"), "prunable_only='no' must be True or False"),
        (lambda p: p.collect_activations([X], progress="no"), "progress='no' must be True or False"),
        (lambda p: analyse_sensitivity(p, [X], fast="no", progress=False), "fast='no' must be True or False"),
        (lambda p: analyse_sensitivity(p, [X], progress="off"), "progress='off' must be True or False"),
        (
            lambda p: recover(p.model, None, TensorDataset(X, torch.tensor([0, 1])), epochs=1, progress="no"),
            "progress='no' must be True or False",
        ),
    ],
)
def test_on_off_arguments_of_public_methods_refuse_text(call, message):
    pruner = StructuredPruner(_net(), X, importance="magnitude")
    with pytest.raises(UserError, match=message):
        call(pruner)
    assert [g.size for g in pruner.graph.groups(prunable_only=False)] == [g.size for g in pruner.graph.groups()]
    assert len(pruner.graph.groups(prunable_only=True)) == 2 < len(pruner.graph.groups(prunable_only=0))
