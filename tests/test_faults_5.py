"""Fifth round of bad input and edge cases (docs/reliability.md): float32 batches for a
half-precision model, models that cannot be pickled, parametrized models in saved folders,
and more (one section per class)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cleanai_core import GradualPruner, PruningSchedule, StructuredPruner
from cleanai_core.errors import UserError

G = torch.Generator().manual_seed(7)
X = torch.rand(2, 3, 8, 8, generator=G)
XS = torch.rand(12, 3, 8, 8, generator=G)
YS = torch.randint(0, 4, (12,), generator=G)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


# -- float32 batches for a float16 / bfloat16 model ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("importance", ["weight_activation", "taylor"])
def test_float32_batches_for_a_half_precision_model_are_cast_like_its_own(dtype, importance):
    # was RuntimeError: Input type (float) and bias type (c10::Half) should be the same: only
    # float64 batches were cast (the command line and recover() cast every floating input)
    batches = [(XS[i : i + 4], YS[i : i + 4]) for i in range(0, 12, 4)]
    given = StructuredPruner(_net().to(dtype), X.to(dtype), importance, pruning_ratio=0.5)
    given.collect_activations(batches, progress=False)
    cast = StructuredPruner(_net().to(dtype), X.to(dtype), importance, pruning_ratio=0.5)
    cast.collect_activations([(x.to(dtype), y) for x, y in batches], progress=False)
    key = next(iter(cast.stats))
    assert torch.equal(given.stats[key].mean, cast.stats[key].mean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = given.prune(), cast.prune()
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert torch.equal(a(X.to(dtype)), b(X.to(dtype)))


def test_gradual_pruning_of_a_bfloat16_model_takes_float32_batches():
    # the step's BatchNorm refresh ran the batches uncast (RuntimeError: Input type (float) ...)
    model = _net().bfloat16().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gp = GradualPruner(model, X.bfloat16(), opt, PruningSchedule(final=0.5, steps=2), importance="magnitude")
    for _ in range(2):
        model, opt = gp.step([(XS[:8], YS[:8])])
    assert model[0].weight.shape[0] < 8 and model[0].weight.dtype == torch.bfloat16
    assert gp.flops_share() < 0.6
    assert model(XS[:2].bfloat16()).shape == (2, 4)


# -- a model that cannot be pickled, with save_pickle -------------------------------------------


def unpicklable_cnn() -> nn.Module:
    """The demo CNN holding a lambda (a model factory for the command line)."""
    from cleanai_plugins.io.demo import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN().eval()
    model.note = lambda: "a lambda"  # pickle refuses it
    return model


def _demo_pruned():
    from cleanai_plugins.io.demo import DigitsCNN

    torch.manual_seed(0)
    pruner = StructuredPruner(DigitsCNN().eval(), torch.rand(2, 1, 8, 8), "magnitude", pruning_ratio=0.5)
    return pruner.prune(), pruner.history


def test_save_pickle_of_a_model_that_cannot_be_pickled_is_named_and_writes_nothing(tmp_path):
    # was the pickler's AttributeError: Can't pickle local object '...<lambda>' traceback
    from cleanai_core.io import save_pruned
    from cleanai_plugins.io.demo import MODEL_SPEC

    pruned, history = _demo_pruned()
    pruned.features[0].register_forward_hook(lambda *a: None)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match=r"cannot be pickled .*Save without save_pickle.*Nothing was written"):
        save_pruned(tmp_path / "o", pruned, history, MODEL_SPEC, save_pickle=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staged folder left
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["mine.txt"]


def test_the_command_line_with_save_pickle_of_an_unpicklable_model_exits_2(tmp_path, monkeypatch, capsys):
    from cleanai_core.cli import main

    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    torch.save((torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)), "data.pt")
    code = main(
        ["prune", "--model", "test_faults_5:unpicklable_cnn", "--data", "data.pt", "--quiet"]
        + ["--out", "out", "--save-pickle"]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "cannot be pickled" in err and "leave out --save-pickle" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.pt"]


# -- a forward that changes its input in place -------------------------------------------------


class _Scaled(nn.Module):
    """``_net`` on ``2 x``, computed in place on the input (``x.mul_(2)``) or not."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.net, self.in_place = _net(), in_place

    def forward(self, x):
        return self.net(x.mul_(2) if self.in_place else x * 2)


def test_a_forward_changing_its_input_in_place_leaves_the_users_tensors_and_prunes_as_without():
    # the example input came back multiplied by 2**15, the calibration batches by 2, and since
    # the original and the pruned model saw other inputs, verification skipped every group
    x, batches = X.clone(), [XS[:4].clone(), XS[4:8].clone()]
    pruner = StructuredPruner(_Scaled(True), x, pruning_ratio=0.5)
    pruner.collect_activations(batches, progress=False)
    plain = StructuredPruner(_Scaled(False), X, pruning_ratio=0.5)
    plain.collect_activations([XS[:4], XS[4:8]], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no group skipped
        pruned, expected = pruner.prune(), plain.prune()
    assert torch.equal(x, X) and torch.equal(batches[0], XS[:4]) and torch.equal(batches[1], XS[4:8])
    assert pruned.net[0].weight.shape == expected.net[0].weight.shape == (4, 3, 3, 3)
    assert torch.equal(pruned(X.clone()), expected(X))


# -- pruning called under torch.no_grad() or torch.inference_mode() -------------------------------


@pytest.mark.parametrize("importance", ["taylor", "weight_activation"])
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_pruning_under_no_grad_or_inference_mode_prunes_as_outside(importance, context):
    # taylor raised "element 0 of tensors does not require grad and does not have a grad_fn"
    batches = [(XS[:4], YS[:4]), (XS[4:8], YS[4:8])]
    expected = StructuredPruner(_net(), X, importance, pruning_ratio=0.5)
    expected = expected.collect_activations(batches, progress=False).prune()
    with context():
        pruner = StructuredPruner(_net(), X, importance, pruning_ratio=0.5)
        pruned = pruner.collect_activations(batches, progress=False).prune()
    assert pruned[0].weight.shape == (4, 3, 3, 3)
    assert torch.equal(pruned(X), expected(X))


def test_a_model_built_under_inference_mode_prunes():
    # its parameters are inference tensors: "Inference tensors do not track version counter"
    with torch.inference_mode():
        model = _net()
    pruned = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5).prune()
    expected = StructuredPruner(_net(), X, "magnitude", pruning_ratio=0.5).prune()
    assert torch.equal(pruned(X), expected(X))


# -- save_pruned of a model changed after it was built -------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: nn.utils.parametrizations.weight_norm(m.features[3]), "remove_parametrizations"),
        (lambda m: setattr(m, "fc", nn.Linear(m.fc.in_features, 3)), "a layer was replaced or added"),
    ],
)
def test_save_pruned_of_a_model_its_spec_does_not_rebuild_is_refused_and_writes_nothing(tmp_path, change, words):
    # the folder was written, and load_pruned then called it "damaged, tampered with or not written by this CleanAI"
    from cleanai_core.io import save_pruned
    from cleanai_plugins.io.demo import MODEL_SPEC, DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN().eval()
    change(model)
    pruner = StructuredPruner(model, torch.rand(2, 1, 8, 8), "magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    with pytest.raises(UserError, match=rf"load_pruned could not load the folder: .*{words}.*Nothing was written"):
        save_pruned(tmp_path / "o", pruned, pruner.history, MODEL_SPEC)
    assert list(tmp_path.iterdir()) == []


# -- a GradualPruner step on bad data -------------------------------------------------------------


def _gradual() -> tuple[nn.Module, GradualPruner]:
    model = _net().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, GradualPruner(model, X, opt, PruningSchedule(final=0.5, steps=2), importance="weight_activation")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (None, "the calibration data is a NoneType, which cannot be iterated"),  # was TypeError
        (5, "the calibration data is a int, which cannot be iterated"),
        # the BatchNorm refresh ran the batches first: the model's own RuntimeError traceback
        ([(XS[:4], YS[:4]), (torch.rand(4, 5, 8, 8), YS[:4])], r"failed on calibration batch 1 \(input shape"),
        # the refresh set the running statistics to NaN before calibration refused the batch
        ([(XS[:4], YS[:4]), (XS[4:8] * float("nan"), YS[4:8])], "non-finite activations"),
    ],
)
def test_a_gradual_step_on_bad_data_is_named_and_leaves_the_model_as_it_was(data, words):
    model, gp = _gradual()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=words):
        gp.step(data)
    assert gp.steps_done == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model2, opt2 = gp.step([(XS[:4], YS[:4]), (XS[4:8], YS[4:8])])  # the step then runs
    assert model2[0].weight.shape[0] < 8 and gp.steps_done == 1


# -- control flow that depends on the data ---------------------------------------------------------


class _Branches(nn.Module):
    """Takes layer ``a`` for bright inputs and ``b`` for dark ones (the trace follows one)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre = nn.Conv2d(3, 8, 3, padding=1)
        self.stem = nn.Conv2d(8, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.stem(torch.relu(self.pre(x))))
        h = self.a(h) if x.mean() > 0.5 else self.b(h)
        return self.head(torch.relu(h).mean((2, 3)))


def test_a_calibration_batch_taking_another_path_is_verified_too():
    # the stem was pruned for the traced branch (a) only: the pruned model failed on dark inputs with
    # "expected input[2, 4, 8, 8] to have 8 channels", though the calibration data ran branch b
    bright, dark = XS[:4] * 0.5 + 0.5, XS[4:8] * 0.5
    model = _Branches().eval()
    pruner = StructuredPruner(model, bright, pruning_ratio=0.5)
    pruner.collect_activations([bright, dark], progress=False)
    with pytest.warns(RuntimeWarning, match=r"skipped group .*stem.*layers the example inputs do not run \(b: "):
        pruned = pruner.prune()
    assert pruned(dark).shape == pruned(bright).shape == (4, 4)
    # the widths branch b reads and writes stay; the rest prunes
    assert pruned.pre.weight.shape[0] == pruned.stem.weight.shape[1] == 4
    assert pruned.stem.weight.shape[0] == pruned.a.weight.shape[0] == pruned.b.weight.shape[1] == 8
    assert not model.stem._forward_pre_hooks and not model._forward_pre_hooks


# -- NumPy and torch numbers as options ---------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "plain"),
    [
        ({"pruning_ratio": np.float32(0.5)}, {"pruning_ratio": 0.5}),
        ({"pruning_ratio": torch.tensor(0.5)}, {"pruning_ratio": 0.5}),
        ({"target_flops": np.float32(0.5)}, {"target_flops": 0.5}),
        ({"round_to": np.int64(2), "min_channels": np.int64(2)}, {"round_to": 2, "min_channels": 2}),
        ({"iterative_steps": np.int64(2)}, {"iterative_steps": 2}),
        ({"layer_pruning_ratios": {"0": np.float32(0.25)}}, {"layer_pruning_ratios": {"0": 0.25}}),
    ],
)
def test_numpy_and_torch_numbers_are_taken_as_the_numbers_they_hold(given, plain):
    # were refused: "pruning_ratio=np.float32(0.5) must be a number strictly between 0 and 1"
    # (np.float64 passed: it subclasses float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = StructuredPruner(_net(), X, "magnitude", **given).prune()
        b = StructuredPruner(_net(), X, "magnitude", **plain).prune()
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert sum(p.numel() for p in a.parameters()) < sum(p.numel() for p in _net().parameters())
    assert torch.equal(a(X), b(X))


def test_recover_and_the_schedule_take_numpy_numbers():
    from torch.utils.data import TensorDataset

    from cleanai_core import recover

    assert PruningSchedule(final=np.float32(0.5), steps=np.int64(2)) == PruningSchedule(final=0.5, steps=2)
    teacher = _net()
    student = StructuredPruner(teacher, X, "magnitude", pruning_ratio=0.5).prune()
    data = TensorDataset(XS, YS)
    _, result = recover(student, teacher, data, epochs=np.int64(2), batch_size=np.int64(4), progress=False)
    assert result.epochs == 2 and len(result.history) == 2
    with pytest.raises(UserError, match="must be a positive integer"):  # still checked
        recover(student, teacher, data, epochs=np.int64(0), progress=False)


def test_run_job_takes_numpy_numbers_in_its_options():
    # were "UserError: --ratio must be a number, got np.float32(0.5)" / "--batch-size must be an integer"
    from cleanai_core.job.config import PruneConfig, resolve_config

    given = {"model": "cleanai_plugins.io.demo:DigitsCNN", "data": "d.pt", "out": "o"}
    cfg = resolve_config(
        {**given, "ratio": np.float32(0.25), "batch_size": np.int64(4), "calib_fraction": torch.tensor(0.5)}
    )
    assert (cfg["ratio"], cfg["batch_size"], cfg["calib_fraction"]) == (0.25, 4, 0.5)
    assert type(cfg["batch_size"]) is int
    assert resolve_config(PruneConfig(**given, ratio=np.float32(0.25)))["ratio"] == 0.25


# -- an empty or truncated --weights file -------------------------------------------------------


@pytest.mark.parametrize(
    ("cut", "words"), [(0, r"is empty \(0 bytes\); save them again"), (2, r"it may be truncated or damaged")]
)
def test_an_empty_or_truncated_weights_file_says_so(tmp_path, monkeypatch, capsys, cut, words):
    # the empty file said "cannot read weights from 'w.pt' as a state_dict (EOFError: )", the truncated
    # one "(OSError: [Errno 22] Invalid argument)", and no more
    from cleanai_core.cli import main
    from cleanai_plugins.io.demo import DigitsCNN

    monkeypatch.chdir(tmp_path)
    torch.save(DigitsCNN().state_dict(), "full.pt")
    raw = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(raw[: len(raw) // cut] if cut else b"")
    torch.save((torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))), "data.pt")
    code = main(["prune", "--model", "cleanai_plugins.io.demo:DigitsCNN", "--weights", "w.pt", "--data", "data.pt"]
                + ["--out", "out", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "'w.pt'" in err
    assert re.search(words, err), err
    assert not (tmp_path / "out").exists()


# -- an output_transform or forward_fn that fails ----------------------------------------------


def test_a_failing_output_transform_is_named_not_blamed_on_the_example_inputs():
    # was TraceError: the model failed to run on the example inputs while tracing: IndexError: too many
    # indices for tensor of dimension 2. Check that example_inputs match what the model's forward expects
    with pytest.raises(UserError, match=r"output_transform failed on the model's output, a tensor of shape \(2, 4\) "
                       r"\(IndexError: too many indices") as info:  # fmt: skip
        StructuredPruner(_net(), X, "magnitude", output_transform=lambda out: out["logits"])
    assert "example_inputs" not in str(info.value)
    with pytest.raises(Exception, match=r"output_transform returned NoneType, which holds no tensors; return the"):
        StructuredPruner(_net(), X, "magnitude", output_transform=lambda out: None)  # said "pass output_transform="


def test_a_failing_forward_fn_is_named_with_the_example_inputs():
    with pytest.raises(Exception, match=r"\(through forward_fn\) .*and that forward_fn calls the model as it should"):
        StructuredPruner(_net(), X, "magnitude", forward_fn=lambda m, x: m(x, 3))
