"""Third round of bad input and edge cases (docs/reliability.md): empty example inputs,
saved folders that come back in another dtype or with a history that does not describe
them, devices the machine lacks, ``--num-classes`` below 1, switches given as text, and
``run_job(model=...)`` leaving the user's model as it was."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.utils.data import TensorDataset

from cleanai_core import GradualPruner, PruningSchedule, StructuredPruner, recover, run_job
from cleanai_core.cli import main
from cleanai_core.errors import UserError
from cleanai_core.io import load_pruned, save_pruned
from cleanai_plugins.io.demo import MODEL_SPEC, DigitsCNN


def _digits(dtype: torch.dtype = torch.float32) -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN().eval().to(dtype)  # the width MODEL_SPEC rebuilds


def _pruned(model: DigitsCNN, x: torch.Tensor, ratio: float = 0.5) -> tuple[torch.nn.Module, StructuredPruner]:
    pruner = StructuredPruner(model, x, importance="magnitude", pruning_ratio=ratio)
    return pruner.prune(), pruner


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    x = torch.rand(4, 1, 8, 8)
    pruned, pruner = _pruned(_digits(), x)
    out = tmp_path_factory.mktemp("f") / "o"
    save_pruned(out, pruned, pruner.history, MODEL_SPEC)
    return out


# -- example inputs without values ---------------------------------------------------------------


@pytest.mark.parametrize(
    "example", [torch.rand(0, 1, 8, 8), (torch.rand(0, 1, 8, 8),), {"x": torch.rand(0, 1, 8, 8)}], ids=str
)
def test_example_inputs_of_zero_samples_are_refused_by_name(example):
    # was RuntimeError: max(): Expected reduction dim to be specified for input.numel() == 0
    model = _digits()
    with pytest.raises(UserError, match=r"example_inputs hold no values \(the input has shape \(0, 1, 8, 8\)\)"):
        StructuredPruner(model, example, importance="magnitude", pruning_ratio=0.5).prune()


def test_gradual_pruner_checks_its_example_inputs_when_built():
    model = _digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError, match="example_inputs hold no values"):
        GradualPruner(model, torch.rand(0, 1, 8, 8), opt, PruningSchedule(final=0.5, steps=2))
    with pytest.raises(UserError, match=r"refresh_bn='no' must be True or False"):
        GradualPruner(model, torch.rand(2, 1, 8, 8), opt, PruningSchedule(final=0.5, steps=2), refresh_bn="no")


# -- saved folders ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_load_pruned_gives_back_the_saved_dtype_and_outputs(tmp_path, dtype):
    # the architecture is rebuilt in float32 and load_state_dict copied into it: a float16 or
    # float64 model came back as float32 (and a float64 input then failed in its forward)
    x = torch.rand(4, 1, 8, 8, dtype=dtype)
    pruned, pruner = _pruned(_digits(dtype), x)
    save_pruned(tmp_path / "o", pruned, pruner.history, MODEL_SPEC)
    loaded = load_pruned(tmp_path / "o")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert [tuple(p.shape) for p in loaded.parameters()] == [tuple(p.shape) for p in pruned.parameters()]
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in pruned.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_a_second_pruners_history_alone_loads_with_a_warning(tmp_path):
    # saved with the second pruner's history only: every width fits, so the folder loaded without
    # a word, though the history does not describe how the model was pruned (fix-ups such as
    # attention heads then count from the wrong widths)
    x = torch.rand(4, 1, 8, 8)
    once, first = _pruned(_digits(), x)
    twice, second = _pruned(once, x)
    save_pruned(tmp_path / "alone", twice, second.history, MODEL_SPEC)
    with pytest.warns(
        RuntimeWarning, match=r"step 0 was recorded on features\.0\.weight of shape \(16, 1, 3, 3\).*then"
    ):
        load_pruned(tmp_path / "alone")
    save_pruned(tmp_path / "both", twice, first.history.then(second.history), MODEL_SPEC)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "both")(x), twice(x))


def test_a_device_the_machine_lacks_is_named_not_blamed_on_the_folder(folder):
    # map_location="cuda" on a machine without CUDA said the folder was "damaged, tampered with"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = f"cuda:{n}" if n else "cuda"
    expected = f"has {n} cuda device" if n else "this machine has no cuda device"
    with pytest.raises(UserError, match=f"map_location='{missing}'.*{expected}") as err:
        load_pruned(folder, map_location=missing)
    assert "damaged" not in str(err.value)
    with pytest.raises(UserError, match="map_location='meta' holds shapes without data"):
        load_pruned(folder, map_location="meta")
    data = TensorDataset(torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,)))
    with pytest.raises(UserError, match=f"device='{missing}'.*{expected}"):  # was the driver's RuntimeError
        recover(load_pruned(folder), None, data, epochs=1, device=missing, progress=False)


def test_trust_given_as_text_is_refused_and_runs_nothing(folder, tmp_path):
    marker = tmp_path / "ran"
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    arch = json.loads((copy / "architecture.json").read_text())
    arch.update(spec="subprocess:run", options={"model_kwargs": {"args": ["touch", str(marker)]}})
    (copy / "architecture.json").write_text(json.dumps(arch))
    for switches in ({"trust_code": "false"}, {"trust_code": "no", "trust_model": 0.0}):
        with pytest.raises(UserError, match="must be True or False"):
            load_pruned(copy, **switches)  # "false" is a true value: the folder's command ran
    assert not marker.exists()


def test_save_pickle_given_as_text_writes_nothing(tmp_path):
    pruned, pruner = _pruned(_digits(), torch.rand(2, 1, 8, 8))
    with pytest.raises(UserError, match="save_pickle='no' must be True or False"):
        save_pruned(tmp_path / "o", pruned, pruner.history, MODEL_SPEC, save_pickle="no")
    assert not (tmp_path / "o").exists()


def test_recover_inplace_given_as_text_leaves_the_model_alone():
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))
    pruned, _ = _pruned(_digits(), x[:2])
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    for bad in ({"inplace": "no"}, {"amp": "off"}):
        with pytest.raises(UserError, match="must be True or False"):
            recover(pruned, None, TensorDataset(x, y), epochs=1, progress=False, **bad)
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())


# -- the command line and run_job ---------------------------------------------------------------


@pytest.mark.parametrize("n", ["-3", "0"])
def test_explain_with_num_classes_below_one_exits_2(capsys, n):
    # -3: "RuntimeError: Trying to create tensor with negative dimension -3" and exit 1
    code = main(["explain", "--model", MODEL_SPEC, "--num-classes", n, "--input-shape", "1,1,8,8"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--num-classes={n} is out of range: it must be an integer >= 1" in err
    assert "Traceback" not in err


def test_run_job_leaves_the_given_model_in_its_own_modes(tmp_path):
    # the job put the model in eval mode and left it there
    model = _digits().train()
    model.features[1].eval()  # a frozen BatchNorm inside a training model
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    cfg = {"model": MODEL_SPEC, "data": "memory", "ratio": 0.5, "out": str(tmp_path / "o"), "quiet": True}
    report = run_job(cfg, model=model, dataset=data)
    assert report["params_after"] < report["params_before"]
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# -- module settings survive the reload ---------------------------------------------------------


def test_settings_changed_after_building_survive_save_and_load(tmp_path):
    # the architecture is rebuilt with its defaults: bn.eps = 0.5 came back as 1e-05 and the
    # loaded model's outputs differed from the saved one's by 8e-4
    model = _digits()
    model.features[1].eps = 0.5
    model.features[4].momentum = None
    model.features[6].ceil_mode = True
    x = torch.rand(4, 1, 8, 8)
    pruned, pruner = _pruned(model, x)
    save_pruned(tmp_path / "o", pruned, pruner.history, MODEL_SPEC)
    loaded = load_pruned(tmp_path / "o")
    assert (loaded.features[1].eps, loaded.features[4].momentum, loaded.features[6].ceil_mode) == (0.5, None, True)
    settings = json.loads((tmp_path / "o" / "architecture.json").read_text())["settings"]
    assert settings["features.1"]["eps"] == 0.5 and settings["features.0"]["out_channels"] == 16
    assert loaded.features[0].padding == (1, 1)  # tuples stay tuples
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def _with_settings(folder, tmp_path, settings):
    """A copy of the saved ``folder`` whose architecture.json holds ``settings``."""
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    arch = json.loads((copy / "architecture.json").read_text())
    arch["settings"] = settings
    (copy / "architecture.json").write_text(json.dumps(arch))
    return copy


@pytest.mark.parametrize(
    "settings",
    [
        {"features.1": {"eps": "__import__('os').system('x')"}},  # text where the module has a number
        {"features.1": {"forward": "x", "__class__": "x", "_modules": 1, "training": True}},  # internals, mode
        {"nope": {"eps": 1.0}, "features.1": {"no_such_attribute": 2}},
        {"features.0": {"padding": [1, 1, 1]}},  # another length
    ],
    ids=["text-for-number", "internals", "unknown", "length"],
)
def test_saved_settings_set_only_existing_attributes_of_the_same_kind(folder, tmp_path, settings):
    copy = _with_settings(folder, tmp_path, settings)
    loaded = load_pruned(copy)
    reference = load_pruned(folder)
    for (name, m), (_, r) in zip(loaded.named_modules(), reference.named_modules(), strict=True):
        assert type(m) is type(r)
        assert {k: v for k, v in vars(m).items() if not k.startswith("_")} == {
            k: v for k, v in vars(r).items() if not k.startswith("_")
        }, name


@pytest.mark.parametrize(
    "settings", [["eps"], {"features.1": {"eps": {"a": 1}}}, {"features.1": {"eps": float("nan")}}]
)
def test_settings_out_of_form_are_a_damaged_folder(folder, tmp_path, settings):
    copy = _with_settings(folder, tmp_path, settings)
    with pytest.raises(UserError, match="'settings' must map module names to objects of numbers, text and flags"):
        load_pruned(copy)


def test_history_save_writes_with_the_permissions_the_umask_gives(tmp_path):
    # history.save() wrote through mkstemp and kept its mode 0600: readable by its owner only
    import os

    from cleanai_core import PruningHistory

    _, pruner = _pruned(_digits(), torch.rand(2, 1, 8, 8))
    old = os.umask(0o022)
    try:
        pruner.history.save(tmp_path / "h.json")
    finally:
        os.umask(old)
    assert (tmp_path / "h.json").stat().st_mode & 0o777 == 0o644
    assert len(PruningHistory.load(tmp_path / "h.json").steps) == len(pruner.history.steps) == 1


MARKER_MODEL = """
import torch
from cleanai_plugins.io.demo import DigitsCNN

class Marker(DigitsCNN):
    def forward(self, x):
        if bool((x == 0.5).any()):
            raise ValueError("cannot handle a 0.5 pixel")
        return super().forward(x)

def build():
    return Marker(width=8)
"""


def test_a_model_that_fails_on_a_held_out_batch_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    # the evaluation of the original model raised the model's own ValueError: a traceback, exit 1
    (tmp_path / "markmod.py").write_text(MARKER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8) * 0.4, torch.randint(0, 10, (16,))
    x[0, 0, 0, 0] = 0.5  # a sample of the held-out half (split seed 0)
    torch.save((x, y), tmp_path / "d.pt")
    before = (tmp_path / "d.pt").read_bytes()
    code = main(["prune", "--model", "markmod:build", "--data", str(tmp_path / "d.pt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "the model failed on the held-out part of --data, which measures accuracy (ValueError: cannot handle" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists() and (tmp_path / "d.pt").read_bytes() == before


def test_a_pruned_model_that_fails_where_the_original_ran_is_a_pruning_error():
    from cleanai_core.errors import PruningError
    from cleanai_core.job.run import _evaluate

    class Hook:
        @staticmethod
        def cleanai_evaluate(model, loader, device):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x10)")

    class PM:
        hook = Hook()

    with pytest.raises(PruningError, match=r"the pruned model failed on the held-out part of --data, where the orig"):
        _evaluate(PM(), None, [], torch.device("cpu"), pruned=True)
    with pytest.raises(UserError, match=r"the model failed on the held-out part of --data, .*\(RuntimeError: mat1"):
        _evaluate(PM(), None, [], torch.device("cpu"))
    assert _evaluate(PM(), None, None, torch.device("cpu")) is None


class _FailsWhenPrunedAndBatched(DigitsCNN):
    """Runs unpruned, and pruned on one sample (the example), but not on a batch of several."""

    def forward(self, x):
        if self.features[0].out_channels < 32 and x.shape[0] > 1:
            raise ValueError("pruned and batched")
        return super().forward(x)


def test_a_pruned_model_failing_in_the_batchnorm_correction_is_a_pruning_error():
    # was the model's own ValueError from inside the BatchNorm correction
    from cleanai_core.errors import PruningError

    torch.manual_seed(0)
    model = _FailsWhenPrunedAndBatched().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 1, 8, 8)
    pruner = StructuredPruner(model, x[:1], pruning_ratio=0.5)
    pruner.collect_activations([x[:4], x[4:]], progress=False)
    with pytest.raises(PruningError, match=r"during the BatchNorm correction, where the original ran \(ValueError"):
        pruner.prune()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.features[0].out_channels == 32


def test_a_misspelt_blocked_plugin_is_said_and_blocks_nothing(monkeypatch):
    # --disable-plugin cleanai_plugins.io.demoo left the demo active without a word
    from cleanai_core.plugins import make_plugin_manager

    monkeypatch.delenv("CLEANAI_DISABLED_PLUGINS", raising=False)
    with pytest.warns(RuntimeWarning, match=r"'cleanai_plugins\.io\.demoo' .* blocks nothing; did you mean 'cleanai_p"):
        pm = make_plugin_manager(load_entrypoints=False, disabled=["cleanai_plugins.io.demoo"])
    assert pm.has_plugin("cleanai_plugins.io.demo")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real name: no warning
        assert not make_plugin_manager(load_entrypoints=False, disabled=["cleanai_plugins.io.demo"]).has_plugin(
            "cleanai_plugins.io.demo"
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_classes": "10"}, r"'num_classes' is '10', expected a positive integer"),
        ({"num_classes": 0}, r"'num_classes' is 0, expected a positive integer"),
        ({"model_kwargs": "w"}, r"'model_kwargs' is a str, expected an object"),
        ({"model_kwargs": {"a": object()}}, r"cannot be written as JSON"),
        ("abc", r"options must be a dict"),
    ],
)
def test_save_pruned_refuses_options_load_pruned_would_refuse(tmp_path, options, message):
    # num_classes="10" was written, and load_pruned then called the folder damaged or tampered with;
    # "abc" and an object in model_kwargs raised AttributeError / TypeError
    pruned, pruner = _pruned(_digits(), torch.rand(2, 1, 8, 8))
    with pytest.raises(UserError, match=message):
        save_pruned(tmp_path / "o", pruned, pruner.history, MODEL_SPEC, options=options)
    assert not (tmp_path / "o").exists()
    save_pruned(tmp_path / "ok", pruned, pruner.history, MODEL_SPEC, options={"num_classes": 10})
    assert [p.shape for p in load_pruned(tmp_path / "ok").parameters()] == [p.shape for p in pruned.parameters()]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.bool])
@pytest.mark.parametrize("importance", ["taylor", "hessian"])
def test_gradient_criteria_take_integer_labels_of_any_width(importance, dtype):
    # int32 / int16 / bool labels raised "expected target dtype to be Long or Byte" from cross-entropy
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    scores = []
    for lab in (labels.to(dtype), labels):
        pruner = StructuredPruner(_digits(), x[:1], importance=importance, pruning_ratio=0.5)
        pruner.collect_activations([(x[:4], lab[:4]), (x[4:], lab[4:])], progress=False)
        pruned = pruner.prune()
        scores.append([tuple(p.shape) for p in pruned.parameters()])
        scores.append(pruned(x))
    assert scores[0] == scores[2]  # the same channels kept as with int64 labels
    assert torch.equal(scores[1], scores[3])


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_recover_takes_integer_labels_of_any_width(dtype):
    # cross-entropy raised "expected target dtype to be Long or Byte, but got Int"
    torch.manual_seed(0)
    x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 2, (40,))
    pruned, _ = _pruned(_digits(), x[:2])
    runs = [recover(pruned, None, TensorDataset(x, lab), epochs=2, progress=False) for lab in (y.to(dtype), y)]
    (a, ra), (b, rb) = runs
    assert ra.best == rb.best and ra.history == rb.history
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_example_inputs_the_model_cannot_run_are_named_though_the_trace_passed():
    # the trace runs convolutions on the meta device, so float16 inputs to a float32 model passed it;
    # prune() then raised the model's own RuntimeError from the verification
    model = _digits()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = StructuredPruner(model, torch.rand(2, 1, 8, 8).half(), importance="magnitude", pruning_ratio=0.5)
    # torch words the dtype clash by the convolution path it takes ("Input type (torch.HalfTensor) ..." or
    # "expected scalar type Half but found Float")
    with pytest.raises(UserError, match=r"the model failed on example_inputs \(RuntimeError: .*Half"):
        pruner.prune()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_where_the_model_ran_is_not_a_saved_setting():
    from cleanai_core.saved_folder import module_settings

    model = _digits()
    model.features[1].device, model.features[1].compute_device = "cuda:0", "cuda:0"  # would follow the folder
    model.features[1].training_note = "kept"
    found = module_settings(model)["features.1"]
    assert "device" not in found and "compute_device" not in found and "training" not in found
    assert found["training_note"] == "kept" and found["eps"] == 1e-05


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shapes": [1]}, "'shapes' must map parameter names to lists of sizes"),
        ({"steps_done": "x"}, "'steps_done' is 'x', expected a whole number from 0 to 2"),
        ({"steps_done": 99}, "'steps_done' is 99"),
        ({"steps_done": 0}, r"'histories' must be a list of one pruning history per step done \(0\)"),
        ({"base_flops": 0}, "'base_flops' is 0, expected a positive number"),
        ({"base_flops": "x"}, "'base_flops' is 'x'"),
    ],
)
def test_a_damaged_gradual_checkpoint_is_refused_before_anything_changes(change, message):
    # were AttributeError / ValueError, or accepted and ZeroDivisionError / TypeError at the next step
    def fresh():
        model = _digits().train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, GradualPruner(model, torch.rand(2, 1, 8, 8), opt, PruningSchedule(final=0.5, steps=2))

    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    _, gp = fresh()
    gp.step([(x, y)])
    state = {**gp.state_dict(), **change}
    model, resumed = fresh()
    widths = [tuple(p.shape) for p in model.parameters()]
    with pytest.raises(UserError, match=message):
        resumed.load_state_dict(state)
    assert [tuple(p.shape) for p in model.parameters()] == widths and resumed.steps_done == 0


def test_recover_and_gradual_pruning_refuse_a_model_on_the_meta_device():
    # recover raised "Tensor.item() cannot be called on meta tensors" (a meta teacher: "Cannot copy out of
    # meta tensor"); GradualPruner blamed the example inputs
    meta = _digits().to("meta")
    data = TensorDataset(torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,)))
    with pytest.raises(UserError, match=r"the pruned model's tensors are on the meta device .*pruned\.to_empty"):
        recover(meta, None, data, epochs=1, progress=False)
    with pytest.raises(UserError, match=r"the teacher's tensors are on the meta device \(e\.g\. 'features\.0\.weight'"):
        recover(_digits(), meta, data, epochs=1, progress=False)
    with pytest.raises(UserError, match=r"the model's tensors are on the meta device"):
        GradualPruner(meta, torch.rand(2, 1, 8, 8), torch.optim.SGD(meta.parameters(), lr=0.1), PruningSchedule(0.5))
