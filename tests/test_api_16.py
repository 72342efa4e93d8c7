"""Contracts of the public Python API as a demanding user exercises them (session 24, api16):
what in-place pruning leaves for the user's optimizer and tensors, ..."""

from __future__ import annotations

import warnings

import torch
from conftest import small_convnet
from torch import nn

from cleanai_core import StructuredPruner


def _cnn() -> nn.Sequential:
    return small_convnet(8, 8, None, 4)  # conv-BN-ReLU twice, pooled, Linear(8, 4)


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_in_place_pruning_keeps_the_parameter_objects_the_users_optimizer_and_hooks_hold():
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    kept_alive = model(_x()).sum()  # a graph from before holds each parameter's gradient accumulator
    kept_alive.backward()
    opt.zero_grad()
    seen = []
    model[3].weight.register_hook(lambda g: seen.append(tuple(g.shape)))
    pruner = StructuredPruner(model, _x(), pruning_ratio=0.5, inplace=True)
    pruner.collect_activations([_x(4, 1), _x(4, 2)], progress=False)
    assert _quiet(pruner.prune) is model
    # the same 10 objects, now at the pruned shapes (they were new Parameters: the optimizer stepped orphans)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert [tuple(p.shape) for p in params][:4] == [(4, 3, 3, 3), (4,), (4,), (4,)]
    assert tuple(model[3].weight.shape) == (4, 4, 3, 3) and tuple(model[8].weight.shape) == (4, 4)
    before = model[8].weight.detach().clone()
    loss = nn.functional.cross_entropy(model(_x(4, 3)), torch.tensor([0, 1, 2, 3]))
    loss.backward()  # the old-shape accumulator: "invalid gradient ... expected shape compatible with [4, 8]"
    opt.step()
    assert not torch.equal(before, model[8].weight)  # the user's optimizer trains the pruned model
    assert seen == [(4, 4, 3, 3)]  # the tensor hook the user registered still fires, at the new shape


def test_a_history_replayed_in_place_keeps_the_parameter_objects_and_drops_stale_gradients():
    model = _cnn()
    pruner = StructuredPruner(model, _x(), "magnitude", pruning_ratio=0.5)
    pruned = _quiet(pruner.prune)
    fresh = _cnn()
    fresh(_x()).sum().backward()  # gradients of the unpruned shapes
    params = dict(fresh.named_parameters())
    assert pruner.history.replay(fresh) is fresh
    assert all(params[n] is p for n, p in fresh.named_parameters())
    assert fresh[0].weight.grad is None  # sliced: the old-shape gradient would not accumulate
    assert fresh[8].bias.grad is not None and tuple(fresh[8].bias.shape) == (4,)  # unchanged: kept
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    assert torch.equal(fresh(_x(4, 5)), pruned.eval()(_x(4, 5)))


def test_options_set_after_a_plan_make_the_next_plan_and_prune_with_them():
    from cleanai_core import WeightActivationImportance

    importance = WeightActivationImportance()
    pruner = StructuredPruner(_cnn(), _x(), importance, pruning_ratio=0.5)
    pruner.collect_activations([_x(4, 1), _x(4, 2)], progress=False)
    assert _quiet(pruner.prune)[0].weight.shape[0] == 4
    pruner.pruning_ratio = 0.25  # the cached plan of 0.5 was returned again: 296 parameters, not 550
    assert _quiet(pruner.prune)[0].weight.shape[0] == 6
    assert pruner.report()["params_after"] == 550
    first = pruner.plan().pruned_units().clone()
    importance.weight_ratio, importance.activation_ratio = 1.0, 0.0  # the criterion changed in place
    by_weights = pruner.plan().pruned_units()
    assert not torch.equal(first, by_weights)
    fresh = StructuredPruner(_cnn(), _x(), WeightActivationImportance(1.0, 0.0), pruning_ratio=0.25)
    fresh.collect_activations([_x(4, 1), _x(4, 2)], progress=False)
    assert torch.equal(by_weights, fresh.plan().pruned_units())
    pruner.global_pruning = True
    assert int(pruner.plan().pruned_units().sum()) == 4  # 0.25 of the 16 units, ranked together
    plan = pruner.plan()
    assert pruner.plan() is plan  # unchanged options: the plan is kept


class _TwoInputs(nn.Module):
    """Two images in, as a stereo or optical-flow model takes them: ``forward(left, right)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.left, self.right = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.left(left) + self.right(right)))


def test_tuple_batches_of_a_model_of_several_positional_inputs_are_its_inputs_then_its_label():
    from torch.utils.data import DataLoader, TensorDataset

    left, right, y = _x(12, 1), _x(12, 2), torch.arange(12) % 4
    pairs = [((left[i : i + 4], right[i : i + 4]), y[i : i + 4]) for i in range(0, 12, 4)]

    def pruned(batches, importance="taylor"):
        pruner = StructuredPruner(_TwoInputs(), (_x(2), _x(2, 3)), importance, pruning_ratio=0.5)
        pruner.collect_activations(batches, progress=False)
        return _quiet(pruner.prune).state_dict()

    want = pruned(pairs)  # the documented form: ((x1, x2), label)
    # (x1, x2, label), as TensorDataset(x1, x2, y) yields it: the model got x1 alone ("missing 1 required
    # positional argument: 'right'")
    got = pruned(DataLoader(TensorDataset(left, right, y), batch_size=4))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert tuple(got["left.weight"].shape) == (4, 3, 3, 3)
    # (x1, x2) shaped like example_inputs, no label: read as the inputs, as the example is
    unlabelled = pruned([(a, b) for (a, b), _ in pairs], "weight_activation")
    plain = pruned([((a, b), None) for (a, b), _ in pairs], "weight_activation")
    assert all(torch.equal(unlabelled[k], plain[k]) for k in plain)


def test_a_schedule_beyond_what_the_model_can_lose_is_named_once_in_the_originals_terms():
    from cleanai_core import GradualPruner, PruningSchedule

    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gp = GradualPruner(model, _x(), opt, PruningSchedule(final=0.99, steps=3), min_channels=4)
    said = []
    for _ in range(3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gp.step([_x(8, 1), _x(8, 2)])
        said.append([str(w.message) for w in caught])
    assert round(gp.flops_share(), 4) == 0.3183  # every group at 4 of 8 channels after the first step
    # the steps said "target_flops=0.146614 cannot be reached: ... keeps 1.00 of the original's flops": a target
    # the user never gave, and a share of the step's model called the original's
    assert said[:2] == [[], []] and len(said[2]) == 1
    assert "left 0.32 of the original's FLOPs where the schedule ends at 0.01" in said[2][0]
    assert "a final of at most 0.68" in said[2][0]


def test_a_model_cast_after_the_pruner_was_built_is_named_as_changed_not_blamed_on_the_example():
    import pytest

    from cleanai_core.errors import UserError

    model = _cnn()
    pruner = StructuredPruner(model, _x(), pruning_ratio=0.5)
    pruner.collect_activations([_x(4, 1)], progress=False)
    model.double()  # was: "the model failed on example_inputs ...; give them as the model takes them (dtype float64"
    with pytest.raises(UserError, match=r"changed after the pruner was built: the parameters of '0' \(Conv2d\) were "
                       r"float32 and are now float64"):  # fmt: skip
        pruner.prune()
    model.float()
    assert tuple(_quiet(pruner.prune)[0].weight.shape) == (4, 3, 3, 3)  # as built again: it prunes


def test_replay_load_and_in_place_pruning_under_inference_mode_leave_a_model_that_trains(tmp_path):
    from cleanai_core import load_pruned
    from cleanai_core.io import save_pruned

    def trains(model: nn.Module) -> bool:
        model.train()
        before = model[8].weight.detach().clone()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        nn.functional.cross_entropy(model(_x(4, 7)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
        return not torch.equal(before, model[8].weight)

    pruner = StructuredPruner(_cnn(), _x(), "magnitude", pruning_ratio=0.5)
    pruned = _quiet(pruner.prune)
    # tests/ is on sys.path (as for "from test_cli import FAST"); the repository root is not, in CI
    save_pruned(tmp_path / "o", pruned, pruner.history, "test_api_16:_cnn", rebuild_check=False)
    fresh = _cnn()
    with torch.inference_mode():
        pruner.history.replay(fresh)  # its parameters became inference tensors
        loaded = load_pruned(tmp_path / "o", trust_code=True)  # built of inference tensors
        built_inside = _cnn()
    assert not any(p.is_inference() for m in (fresh, loaded) for p in m.parameters())
    assert trains(fresh) and trains(loaded)  # "Inference tensors cannot be saved for backward"
    # a model built under inference_mode, pruned in place: "Setting requires_grad=True on inference tensor outside
    # InferenceMode is not allowed" from the FLOP count
    _quiet(StructuredPruner(built_inside, _x(), "magnitude", pruning_ratio=0.5, inplace=True).prune)
    assert tuple(built_inside[0].weight.shape) == (4, 3, 3, 3) and trains(built_inside)


def test_a_bias_a_gradual_step_creates_joins_the_optimizer_after_its_weight_so_its_state_dict_reloads():
    from cleanai_core import GradualPruner, PruningHistory, PruningSchedule

    def biasless() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4, bias=False),
        )  # fmt: skip

    model = biasless()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gp = GradualPruner(model, _x(), opt, PruningSchedule(final=0.5, steps=2))
    for _ in range(2):
        model(_x()).sum().backward()
        opt.step()
        opt.zero_grad()
        model, opt = gp.step([_x(16, 1), _x(16, 2)])
    model(_x()).sum().backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    # compensation gave both later layers a bias: in the model's order (it was appended: 0, 2, 6 weights, 2, 6 biases)
    assert [names[id(p)] for p in opt.param_groups[0]["params"]] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "2.weight", "2.bias", "6.weight", "6.bias"]
    rebuilt = PruningHistory.from_json(gp.history.to_json()).replay(biasless())
    rebuilt.load_state_dict(model.state_dict())
    fresh = torch.optim.Adam(rebuilt.parameters(), 1e-3)
    fresh.load_state_dict(opt.state_dict())  # was: Adam's moments of one tensor given to another
    assert all(fresh.state[p]["exp_avg"].shape == p.shape for p in rebuilt.parameters())
    rebuilt(_x()).sum().backward()
    fresh.step()  # "output with shape [5] doesn't match the broadcast shape [4, 5]"


def test_the_recovered_copy_carries_none_of_the_users_hooks_and_says_so():
    from torch.utils.data import TensorDataset

    from cleanai_core import recover

    teacher = _cnn().eval()
    student = _quiet(StructuredPruner(teacher, _x(), "magnitude", pruning_ratio=0.5).prune)
    seen: list[tuple[int, ...]] = []
    handle = student[0].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    data = TensorDataset(_x(32, 1), torch.arange(32) % 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recovered, _ = recover(student, teacher, data, val_data=data, epochs=1, batch_size=8, progress=False)
    said = [w for w in caught if "hook" in str(w.message)]
    assert len(said) == 1 and "the recovered copy has none of them" in str(said[0].message)
    assert said[0].filename == __file__  # the user's line
    assert seen == []  # the copy's hook fired into the user's list 5 times per epoch, and stays on the result
    assert not recovered[0]._forward_hooks
    student(_x(2))
    assert seen == [(2, 4, 8, 8)]  # the user's own model keeps its hook, and the handle still removes it
    handle.remove()
    assert not student[0]._forward_hooks
