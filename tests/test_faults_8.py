"""Eighth round of bad input and edge cases (docs/reliability.md, "Session 18: bad
inputs"): forwards that write the model's own weights and tensors in place, a spectral
norm read in training mode, a user's hook that changes an output, command-line options the
run would not read, huge counts, data loaders that fail mid-way or give meta tensors, and
``recover()`` / option numbers out of form."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cleanai_core import DependencyGraph, StructuredPruner, WeightActivationImportance
from cleanai_core.cli import main
from cleanai_core.errors import UserError
from cleanai_core.testing import check_pruner

X = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))
Y = torch.tensor([0, 1])


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    now = model.state_dict()
    keys = state.keys() | now.keys()
    return sorted(k for k in keys if k not in now or k not in state or not torch.equal(now[k], state[k]))


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
    pruned = pruner.prune()
    assert _changed(model, before) == []  # emb.weight: 12 rows renormalised to norm 0.5
    # max_norm normalises across the embedding dims: the group prunes approximately (it was
    # skipped by verification before session 19, tests/test_peer_scenarios_8.py)
    assert (pruned.emb.embedding_dim, pruned.fc1.out_features) == (8, 16) and not pruner.skipped_groups


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


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def test_a_spectral_norm_in_a_training_model_keeps_its_power_iteration_vectors():
    model = _cnn()  # training mode, as built
    torch.nn.utils.parametrizations.spectral_norm(model[3])
    before = _state(model)
    DependencyGraph(model, X)
    assert _changed(model, before) == []  # a plugin's scan read model[3].weight in training mode
    pruner = StructuredPruner(model, X, WeightActivationImportance(), pruning_ratio=0.5)
    assert _changed(model, before) == []
    pruner.collect_activations([X] * 2)
    pruner.plan()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = pruner.prune()
    pruner.report()
    assert _changed(model, before) == []  # 3.parametrizations.weight.0._u and _v were rewritten
    assert model.training and model[3].parametrizations.weight[0].training and pruned.training
    assert (_params(model), _params(pruned)) == (860, 288)


# -- the command line ------------------------------------------------------------------------


DEMO = "cleanai_plugins.io.demo:DigitsCNN"


@pytest.fixture()
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    torch.save((torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)), tmp_path / "data.pt")
    return tmp_path


def _prune(*args: str) -> int:
    return main(["prune", "--model", DEMO, "--data", "data.pt", "--quiet", *args])


def test_latency_repeats_beyond_10000_are_refused_before_anything_runs(ws, capsys):
    assert _prune("--out", "o", "--latency-repeats", "1000000000000") == 2  # ran until killed
    assert "--latency-repeats=1000000000000 is out of range: it must be in [1, 10000]." in capsys.readouterr().err
    assert not (ws / "o").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--recover-lr", "0.1"], "--recover-lr (command line) is the learning rate of recovery, which runs only "
         "with --recover-epochs N (N >= 1): add it, or leave --recover-lr out."),
        (["--sensitivity-ratios", "0.5,0.6"], "--sensitivity-ratios (command line) is read by the sensitivity "
         "analysis, which runs only with --sensitivity or --auto"),
        (["--sensitivity-batches", "3"], "--sensitivity-batches (command line) is read by the sensitivity analysis"),
        (["--bn-samples", "3", "--no-bn-recalibration"], "--bn-samples (command line) is read by the BatchNorm "
         "recalibration, which --no-bn-recalibration turns off: drop one of them."),
    ],
)  # fmt: skip
def test_an_option_the_run_would_not_read_is_refused_naming_the_one_it_needs(ws, capsys, args, says):
    assert _prune("--out", "o", *args) == 2  # exit 0, the option ignored without a word
    assert says in capsys.readouterr().err
    assert not (ws / "o").exists()


def test_options_read_with_their_switch_or_from_a_config_file_still_run(ws, caplog):
    assert _prune("--out", "a", "--sensitivity-ratios", "0.5,0.6", "--sensitivity") == 0
    (ws / "c.toml").write_text("recover-lr = 0.01\n")
    with caplog.at_level("WARNING", logger="cleanai"):
        assert _prune("--out", "b", "--config", "c.toml") == 0  # a config file serves many runs: a warning
    assert any("--recover-lr (config file) is the learning rate of" in r.getMessage() for r in caplog.records)
    assert _prune("--out", "c", "--config", "a/config.json") == 0  # an earlier run's options, every one written
    assert main(["sensitivity", "--model", DEMO, "--data", "data.pt", "--quiet", "--out", "s",
                 "--sensitivity-ratios", "0.5,0.6"]) == 0  # fmt: skip


def test_more_iterative_steps_than_units_are_refused_naming_the_count():
    model = _cnn()
    with pytest.raises(UserError, match=r"iterative_steps=1000000000 is more steps than the 16 units this model can "):
        StructuredPruner(model, X, "magnitude", pruning_ratio=0.5, iterative_steps=10**9)  # ran until killed
    pruned = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5, iterative_steps=16).prune()
    assert _params(pruned) == 288  # as one step


# -- calibration data that fails --------------------------------------------------------------


class FailsAtItem(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 5:
            raise OSError("the disk went away")
        return X[0]


def _generator_failing_after_two():
    yield X
    yield X
    raise ValueError("bad record")


@pytest.mark.parametrize(
    "loader",
    [lambda: torch.utils.data.DataLoader(FailsAtItem(), batch_size=2), _generator_failing_after_two],
    ids=["dataset_item", "generator"],
)
def test_a_data_loader_that_fails_mid_way_keeps_its_error_with_a_note_naming_the_batch(loader):
    model = _cnn()
    before = _state(model)
    pruner = StructuredPruner(model, X, WeightActivationImportance(), pruning_ratio=0.5)
    with pytest.raises((OSError, ValueError), match="the disk went away|bad record") as info:
        pruner.collect_activations(loader(), progress=False)  # the user's own type, as before
    assert not isinstance(info.value, UserError)
    assert (
        "cleanai: the data loader raised this on batch 2, after 2 good one(s): the fault is in the data"
        in (info.value.__notes__[0])
    )
    with pytest.raises(UserError, match="call pruner.collect_activations"):  # nothing half-collected is used
        pruner.prune()
    pruner.collect_activations([X] * 2, progress=False)
    assert _params(pruner.prune()) == 288 and _changed(model, before) == []


def test_a_calibration_batch_on_the_meta_device_is_named():
    pruner = StructuredPruner(_cnn(), X, WeightActivationImportance(), pruning_ratio=0.5)
    with pytest.raises(UserError, match=r"a batch holds a tensor on the meta device \(shape \(2, 3, 8, 8\)"):
        pruner.collect_activations([X.to("meta")], progress=False)  # NotImplementedError: Cannot copy out of meta


def test_recover_names_a_seed_torch_cannot_take_and_a_forward_fn_that_is_no_function():
    from cleanai_core import recover

    teacher = _cnn()
    pruned = StructuredPruner(teacher, X, "magnitude", pruning_ratio=0.5).prune()
    data = torch.utils.data.TensorDataset(torch.rand(8, 3, 8, 8), torch.randint(0, 4, (8,)))
    with pytest.raises(UserError, match=r"seed=1180591620717411303424 must be an integer in \[-2\*\*63, 2\*\*64\)"):
        recover(pruned, teacher, data, epochs=1, seed=2**70, progress=False)  # ValueError: Overflow ... long long
    with pytest.raises(UserError, match="forward_fn=3 is not a function; give a callable or None"):
        recover(pruned, teacher, data, epochs=1, forward_fn=3, progress=False)  # "... shaped like the model's inputs"
    _, result = recover(pruned, teacher, data, epochs=1, seed=2**64 - 1, progress=False)
    assert result.epochs == 1


def test_fractions_and_decimals_are_numbers_like_floats():
    from decimal import Decimal
    from fractions import Fraction

    want = _params(StructuredPruner(_cnn(), X, "magnitude", pruning_ratio=0.5).prune())
    for ratio in (Fraction(1, 2), Decimal("0.5")):  # "pruning_ratio=Fraction(1, 2) must be a number ..."
        pruner = StructuredPruner(_cnn(), X, "magnitude", pruning_ratio=ratio, round_to=Fraction(2, 1))
        assert _params(pruner.prune()) == want == 288
    with pytest.raises(UserError, match=r"pruning_ratio=nan must be a number strictly between 0 and 1"):
        StructuredPruner(_cnn(), X, "magnitude", pruning_ratio=Decimal("NaN"))


def _double(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out * 2


def test_a_user_hook_that_changes_an_output_no_longer_blocks_every_group():
    from cleanai_core.masking import masked_model

    model = _cnn().eval()
    model[0].register_forward_hook(_double)
    pruner = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5, bias_compensation=False)
    with pytest.warns(UserWarning, match="stay on the original model"):
        pruned = pruner.prune()
    assert _params(pruned) == 288  # 860: "skipped group 1 ...: slicing them is not the same as zeroing them"
    assert len(model[0]._forward_hooks) == 1 and not pruned[0]._forward_hooks
    pruned[0].register_forward_hook(_double)  # as the warning says
    oracle = masked_model(pruner.graph, pruner.plan().pruned_units())
    assert _double not in oracle[0]._forward_hooks.values()  # only its zeroing hook
    oracle[0].register_forward_hook(_double)
    with torch.no_grad():
        assert torch.allclose(pruned(X), oracle(X), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"forward_fn": 5}, "forward_fn=5 is not a function; give a callable or None"),
        ({"output_transform": "logits"}, "output_transform='logits' is not a function"),
        ({"example_inputs": None}, "example_inputs holds no tensor"),
        (
            {"example_inputs": X.numpy()},
            r"example_inputs holds a NumPy array, not a tensor: give torch.from_numpy\(x\)",
        ),
        ({"example_inputs": X[:0]}, r"example_inputs hold no values \(the input has shape \(0, 3, 8, 8\)\)"),
    ],
    ids=["forward_fn", "output_transform", "none", "numpy", "empty"],
)
def test_the_graph_checks_its_arguments_as_the_pruner_does(kwargs, says):
    args = {"example_inputs": X, **kwargs}  # each was "the model failed to run on the example inputs while tracing"
    with pytest.raises(UserError, match=says):
        DependencyGraph(_cnn(), **args)
    if "forward_fn" not in kwargs and "output_transform" not in kwargs:
        with pytest.raises(UserError, match=says):
            StructuredPruner(_cnn(), args["example_inputs"], "magnitude")


def _guarded_calls(monkeypatch) -> list[str]:
    import cleanai_core.model_state as ms

    seen: list[str] = []
    real = ms._guarded_call

    def counted(model, snaps):
        seen.append(type(model).__name__)
        return real(model, snaps)

    monkeypatch.setattr(ms, "_guarded_call", counted)
    return seen


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))).mean((2, 3)))


def test_the_write_guard_runs_once_per_model_that_writes_nothing_and_on_every_run_of_one_that_writes(monkeypatch):
    """The guard costs about 12% of a forward: a model whose first real guarded call wrote
    nothing (and the copies made of it) runs without it from then on; one that writes is
    guarded in every block; the trace (ops on the meta device) proves nothing either way."""
    from cleanai_core.model_state import copy_model, preserved
    from cleanai_core.runtime import call_model

    seen = _guarded_calls(monkeypatch)
    plain, writes = Plain().eval(), WritesItself().eval()
    DependencyGraph(plain, X)
    DependencyGraph(writes, X)
    assert seen == ["Plain", "WritesItself"]  # the traces: guarded, and neither model remembered
    for model in (plain, writes, plain, writes):
        with preserved(model):
            call_model(model, X)
            call_model(model, X)
    # Plain: its first real call only; WritesItself: every call (it wrote on each)
    assert seen[2:] == ["Plain"] + ["WritesItself"] * 4
    seen.clear()
    copies = copy_model(plain), copy_model(writes)
    for model in copies:
        with preserved(model):
            call_model(model, X)
    assert seen == ["WritesItself"]
    before = _state(writes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StructuredPruner(writes, X, "magnitude", pruning_ratio=0.5).prune()
    assert _changed(writes, before) == []
