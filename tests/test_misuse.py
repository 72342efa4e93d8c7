"""API misuse gets a UserError naming the problem and the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.errors import UserError


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    ).eval()


def _x(n: int = 2, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(n)).to(dtype)


def test_torchscript_model_is_refused():
    with pytest.raises(UserError, match="TorchScript.*Prune the original model"):
        StructuredPruner(torch.jit.script(_net()), _x())


def test_example_inputs_on_the_meta_device_are_refused():
    with pytest.raises(UserError, match="meta device.*real tensors"):
        StructuredPruner(_net(), torch.empty(2, 3, 4, 4, device="meta"))


def test_float64_calibration_batches_are_cast_to_the_models_dtype():
    model = _net()
    ref = StructuredPruner(model, _x(), pruning_ratio=0.5).collect_activations([_x(4)], progress=False)
    p = StructuredPruner(model, _x(), pruning_ratio=0.5).collect_activations([_x(4, torch.float64)], progress=False)
    key = next(iter(ref.stats))
    torch.testing.assert_close(p.stats[key].mean, ref.stats[key].mean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert p.prune()(_x()).shape == (2, 5)


def _taylor(labels):
    p = StructuredPruner(_net(), _x(), "taylor", pruning_ratio=0.5)
    return p.collect_activations([(_x(4), labels)], progress=False)


def test_taylor_with_more_labels_than_inputs_is_refused():
    with pytest.raises(UserError, match="4 inputs but 6 labels"):
        _taylor(torch.zeros(6, dtype=torch.long))


def test_taylor_with_fractional_labels_is_refused_and_whole_number_floats_are_class_indices():
    with pytest.raises(UserError, match="integer class labels.*float32"):
        _taylor(torch.full((4,), 0.5))
    torch.manual_seed(0)
    as_floats = _taylor(torch.tensor([0.0, 1.0, 2.0, 3.0])).gradients  # as the report's accuracy reads them
    torch.manual_seed(0)
    as_ints = _taylor(torch.tensor([0, 1, 2, 3])).gradients
    assert as_floats.keys() == as_ints.keys() and all(torch.equal(as_floats[k], as_ints[k]) for k in as_ints)


def test_taylor_with_integer_labels_works():
    p = _taylor(torch.tensor([0, 1, 2, 3]))
    assert p.gradients and all(bool(torch.isfinite(g).all()) for g in p.gradients.values())


def test_a_model_on_the_meta_device_is_refused():
    with pytest.raises(UserError, match="model's tensors are on the meta device.*'0.weight'.*load its weights"):
        StructuredPruner(_net().to("meta"), _x())


@pytest.mark.parametrize("switch", ["inplace", "global_pruning", "bias_compensation", "verify", "prune_dead_only"])
def test_a_switch_given_as_text_is_refused_and_the_model_is_untouched(switch):
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=f"{switch}='no' must be True or False"):
        StructuredPruner(model, _x(), "magnitude", pruning_ratio=0.5, **{switch: "no"})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_one_ignored_layer_name_is_that_layer_not_its_letters():
    p = StructuredPruner(_net(), _x(), "magnitude", pruning_ratio=0.5, ignored_layers="2*")  # not "2" and "*"
    assert p.ignored == {"2"}
    assert p.prune()[2].out_channels == 8


def test_layer_ratios_as_a_list_of_pairs():
    p = StructuredPruner(_net(), _x(), "magnitude", pruning_ratio=0.5, layer_pruning_ratios=[("0", 0.25)])
    assert p.layer_ratios["0"] == 0.25
    with pytest.raises(UserError, match="give a dict"):
        StructuredPruner(_net(), _x(), "magnitude", layer_pruning_ratios=[1, 2])


@pytest.mark.parametrize("pattern", ["", "  "])
def test_an_empty_layer_pattern_is_refused(pattern):
    with pytest.raises(UserError, match="empty layer pattern"):
        StructuredPruner(_net(), _x(), "magnitude", ignored_layers=[pattern])
    with pytest.raises(UserError, match="empty layer pattern"):
        StructuredPruner(_net(), _x(), "magnitude", layer_pruning_ratios={pattern: 0.5})


def test_an_importance_class_or_object_that_is_no_criterion_is_refused():
    from cleanai_core import WeightActivationImportance

    with pytest.raises(UserError, match=r"is a class; pass an instance, e.g. WeightActivationImportance\(\)"):
        StructuredPruner(_net(), _x(), WeightActivationImportance)
    with pytest.raises(UserError, match="is not a criterion"):
        StructuredPruner(_net(), _x(), 42)
    with pytest.raises(UserError, match="unknown importance"):
        from cleanai_core.scoring import get_importance

        get_importance({"name": "x"})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.5", None])
def test_weight_activation_ratios_must_be_finite_numbers(value):
    from cleanai_core import WeightActivationImportance

    with pytest.raises(UserError, match="weight_ratio=.* must be a finite number >= 0"):
        WeightActivationImportance(weight_ratio=value)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"target_flops": "abc"}, "target_flops='abc': give the share of FLOPs to keep"),
        ({"target_flops": "0.5"}, "target_flops='0.5'"),
        ({"target_flops": [0.5]}, r"target_flops=\[0.5\]"),
        ({"target_params": "x"}, "target_params='x': give the share of parameters"),
        ({"iterative_steps": True}, "iterative_steps=True must be a positive integer"),
        ({"max_layer_ratio": "a", "global_pruning": True}, "max_layer_ratio='a' must be a number between 0 and 1"),
        ({"max_layer_ratio": None}, "max_layer_ratio=None"),
        ({"round_to": True}, "round_to=True must be a positive integer"),
        ({"min_channels": "2"}, "min_channels='2' must be an integer >= 1"),
        ({"min_channels": 2.5}, "min_channels=2.5"),
        ({"min_channels": -1}, "min_channels=-1"),
        ({"covariance_rows": "a"}, "covariance_rows='a' must be an integer"),
        ({"covariance_rows": None}, "covariance_rows=None"),
        ({"covariance_rows": 2.5}, "covariance_rows=2.5"),
        ({"forward_fn": 5}, "forward_fn=5 is not a function"),
        ({"output_transform": "logits"}, "output_transform='logits' is not a function"),
    ],
)
def test_an_option_of_the_wrong_type_is_refused_by_name(kwargs, words):
    # before: TypeError/ValueError tracebacks from comparisons deep in planning ('<' between float
    # and str), a TraceError blaming the example inputs, or the value silently read as a number
    # (round_to=True as 1, min_channels=2.5 as a fractional count)
    with pytest.raises(UserError, match=words):
        StructuredPruner(_net(), _x(), "magnitude", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "cause"),
    [
        ({"round_to": 1000}, "round_to=1000 rounds every kept count up to the whole group"),
        ({"min_channels": 100}, "min_channels=100 keeps every unit"),
        ({"pruning_ratio": 0.01}, "the ratio leaves less than one unit to remove in every group"),
    ],
)
def test_a_plan_that_removes_nothing_says_why(kwargs, cause):
    # before: the "pruned" model was the original, without a word
    p = StructuredPruner(_net(), _x(), "magnitude", **{"pruning_ratio": 0.3, **kwargs})
    with pytest.warns(RuntimeWarning, match=f"the plan removes no unit: {cause}"):
        pruned = p.prune()
    assert sum(q.numel() for q in pruned.parameters()) == sum(q.numel() for q in _net().parameters())


def test_prune_called_twice_gives_a_history_that_replays_to_the_same_model():
    # before: the second call appended its steps to the first's, so the saved history replayed two
    # prunes of the original ("step 1 of 2 failed (IndexError ...)") and the folder did not load
    from cleanai_core import PruningHistory

    p = StructuredPruner(_net(), _x(), "magnitude", pruning_ratio=0.5)
    p.prune()
    again = p.prune()
    assert len(p.history.steps) == 1
    fresh = PruningHistory.from_json(p.history.to_json()).replay(_net())
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in again.state_dict().items()}


def test_a_second_in_place_prune_is_refused_and_leaves_the_model_as_pruned():
    # before: IndexError: index out of range in self (the graph described the unpruned model)
    model = _net()
    p = StructuredPruner(model, _x(), "magnitude", pruning_ratio=0.5, inplace=True)
    p.prune()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="already pruned the model in place; to prune further, build a new"):
        p.prune()
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


@pytest.mark.parametrize("n", ["2", 2.0, True])
def test_num_batches_of_the_wrong_type_is_refused(n):
    # before: TypeError: '<' not supported between instances of 'str' and 'int' (2.0 and True passed)
    p = StructuredPruner(_net(), _x(), pruning_ratio=0.5)
    with pytest.raises(UserError, match=f"num_batches={n!r} must be an integer"):
        p.collect_activations([_x()], num_batches=n, progress=False)


@pytest.mark.parametrize(
    "kwargs", [{"target_flops": 0.5}, {"target_params": 0.5}, {"layer_pruning_ratios": {"0": 0.5}}]
)
def test_prune_dead_only_with_an_amount_is_refused(kwargs):
    # before: the target or layer ratios were ignored without a word
    with pytest.raises(UserError, match="prune_dead_only=True removes exactly the units that never activate"):
        StructuredPruner(_net(), _x(), prune_dead_only=True, **kwargs)


def test_set_layer_ratios_takes_none_and_pairs_like_the_constructor():
    # before: AttributeError: 'NoneType' object has no attribute 'items' (the constructor took both)
    p = StructuredPruner(_net(), _x(), "magnitude", pruning_ratio=0.5, layer_pruning_ratios={"0": 0.25})
    p.set_layer_ratios(None)
    assert p.layer_ratios == {}
    p.set_layer_ratios([("0", 0.25)])
    assert p.layer_ratios == {"0": 0.25}
    with pytest.raises(UserError, match="layer_pruning_ratios=5: give a dict"):
        p.set_layer_ratios(5)


class _Noisy(nn.Module):
    """A forward that draws random numbers in eval mode (as ViT-MAE's random masking does)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x, noise=None):
        noise = torch.randn_like(x) if noise is None else noise
        return self.body(x + noise)


def test_a_model_whose_outputs_change_between_runs_is_named_not_left_unpruned():
    # before: every group failed the masking oracle, each was skipped with a warning, and the
    # "pruned" model had all 163 of its parameters
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="other outputs on a second run of the same example_inputs.*forward_fn"):
        StructuredPruner(_Noisy(), x, "magnitude", pruning_ratio=0.5).prune()
    fixed = torch.zeros(2, 6)
    pruned = StructuredPruner(_Noisy(), x, "magnitude", pruning_ratio=0.5, forward_fn=lambda m, x: m(x, noise=fixed))
    pruned = pruned.prune()
    assert pruned.body[0].out_features == 8 and sum(p.numel() for p in pruned.parameters()) == 6 * 8 + 8 + 8 * 3 + 3
