"""Fourth round of bad input and edge cases (docs/reliability.md): models wrapped by
``torch.compile`` or ``DataParallel``, ``save_pruned`` of a model its history did not make
or into the current folder, integer inputs, saved folders and compiled weights on the
command line, data functions returning ``(x, y)``, float labels and data without ``len()``
in ``recover``, and dict batches with keys the model does not take."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_recover_edges import _Samples  # samples from an IterableDataset, without len()
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cleanai_core import GradualPruner, PruningSchedule, StructuredPruner, recover
from cleanai_core.cli import main
from cleanai_core.errors import UserError
from cleanai_core.io import load_pruned, save_pruned
from cleanai_plugins.io.demo import MODEL_SPEC, DigitsCNN

DEMO = "cleanai_plugins.io.demo:DigitsCNN"
X = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _digits() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN().eval()


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- torch.compile and DataParallel wrappers ---------------------------------------------------


@pytest.mark.parametrize("importance", ["magnitude", "weight_activation"])
def test_a_compiled_model_prunes_like_the_model_it_wraps(importance):
    # was TypeError: DigitsCNN does not support len() (the scorer tested the model's truth value);
    # the wrapper is not run: through it every hooked forward went through TorchDynamo (76 s, not 0.1 s)
    model = _digits()
    before = _state(model)
    pruner = StructuredPruner(torch.compile(model), X, importance=importance, pruning_ratio=0.5)
    pruner.collect_activations(_batches())
    pruned = pruner.prune()
    plain = StructuredPruner(_digits(), X, importance=importance, pruning_ratio=0.5)
    plain.collect_activations(_batches())
    expected = plain.prune()
    assert type(pruned) is DigitsCNN
    assert [p.shape for p in pruned.parameters()] == [p.shape for p in expected.parameters()]
    assert torch.equal(pruned(X), expected(X))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model as it was


def test_a_compiled_model_pruned_in_place_is_the_users_wrapper():
    model = _digits()
    compiled = torch.compile(model)
    out = StructuredPruner(compiled, X, importance="magnitude", pruning_ratio=0.5, inplace=True).prune()
    assert out is compiled and compiled._orig_mod is model
    assert model.features[0].weight.shape == (16, 1, 3, 3)  # 32 before


@pytest.mark.parametrize(
    "ignored, ratios",
    [(["_orig_mod.features.3"], {}), (["_orig_mod.features.[37]"], {"_orig_mod.features.0": 0.25})],
    ids=["name", "glob"],
)
def test_layer_names_of_a_compiled_model_carry_its_prefix(ignored, ratios):
    # compiled.named_modules() names every layer '_orig_mod.*'; the pruner works on the module inside
    # and raised "'_orig_mod.features.3' matches no layer of the model"
    compiled = torch.compile(_digits())
    assert "_orig_mod.features.3" in dict(compiled.named_modules())
    pruned = StructuredPruner(
        compiled, X, importance="magnitude", pruning_ratio=0.5, ignored_layers=ignored, layer_pruning_ratios=ratios
    ).prune()
    plain = StructuredPruner(
        _digits(),
        X,
        importance="magnitude",
        pruning_ratio=0.5,
        ignored_layers=[i.removeprefix("_orig_mod.") for i in ignored],
        layer_pruning_ratios={k.removeprefix("_orig_mod."): v for k, v in ratios.items()},
    ).prune()
    assert pruned.features[3].out_channels == 64  # ignored: kept whole
    assert pruned.features[0].out_channels == (24 if ratios else 16)
    assert [p.shape for p in pruned.parameters()] == [p.shape for p in plain.parameters()]


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "DataParallel"])
def test_save_pruned_of_a_wrapped_model_loads_back(tmp_path, wrap):
    # the tensors were saved as '_orig_mod.features.0.weight' / 'module.features.0.weight': the folder did not load
    pruner = StructuredPruner(_digits(), X, importance="magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    save_pruned(tmp_path / "o", wrap(pruned), pruner.history, MODEL_SPEC)
    loaded = load_pruned(tmp_path / "o")
    assert type(loaded) is DigitsCNN and torch.equal(loaded(X), pruned(X))


def test_gradual_pruning_of_a_compiled_model_resumes_on_the_plain_model():
    # the checkpoint named the parameters '_orig_mod.*' and a plain model did not resume from it
    model = _digits().train()
    compiled = torch.compile(model)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    gp = GradualPruner(compiled, X, opt, PruningSchedule(final=0.5, steps=2))
    out, _ = gp.step(_batches())
    assert out is compiled
    state = gp.state_dict()
    assert set(state["shapes"]) == {n for n, _ in model.named_parameters()}
    fresh = _digits().train()
    gp2 = GradualPruner(fresh, X, torch.optim.SGD(fresh.parameters(), lr=0.1), PruningSchedule(final=0.5, steps=2))
    gp2.load_state_dict(state)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]
    assert sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in _digits().parameters())


# -- save_pruned of a model its history did not make ------------------------------------------


def test_save_pruned_of_the_unpruned_model_is_refused_and_writes_nothing(tmp_path):
    # the folder was written, and load_pruned then called it "damaged, tampered with or not written by this CleanAI"
    model = _digits()
    pruner = StructuredPruner(model, X, importance="magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    with pytest.raises(UserError, match=r"features\.0\.weight is \(32, 1, 3, 3\), the step leaves \(16, 1, 3, 3\)"):
        save_pruned(tmp_path / "o", model, pruner.history, MODEL_SPEC)
    with pytest.raises(UserError, match=r"step 0 slices [\w.]+, which this model does not have"):
        save_pruned(tmp_path / "o", nn.Sequential(nn.Conv2d(1, 4, 3)), pruner.history, MODEL_SPEC)
    assert not (tmp_path / "o").exists()
    save_pruned(tmp_path / "o", pruned, pruner.history, MODEL_SPEC)  # the pruned model saves and loads
    assert torch.equal(load_pruned(tmp_path / "o")(X), pruned(X))


def test_save_pruned_of_a_plan_that_removed_nothing_still_saves(tmp_path):
    model = _digits()
    with pytest.warns(RuntimeWarning, match="the plan removes no unit"):
        pruner = StructuredPruner(model, X, importance="magnitude", pruning_ratio=0.5, round_to=1000)
        pruned = pruner.prune()
    save_pruned(tmp_path / "o", pruned, pruner.history, MODEL_SPEC)
    assert load_pruned(tmp_path / "o").features[0].weight.shape == (32, 1, 3, 3)


# -- command line: integer inputs, saved folders and compiled weights, a missing parent of --out ----------


def _prune_cli(ws, *args: str) -> int:
    data = [] if "--data" in args else ["--data", "data.pt"]
    return main(["prune", "--model", DEMO, *data, "--quiet", "--ratio", "0.5", *args])


@pytest.fixture()
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    torch.save((x, y), tmp_path / "data.pt")
    torch.save(((x * 100).to(torch.int8), y), tmp_path / "int8.pt")
    torch.save((x > 0.5, y), tmp_path / "bool.pt")
    return tmp_path


@pytest.mark.parametrize(("data", "kind"), [("int8.pt", "int8"), ("bool.pt", "bool")])
def test_integer_inputs_for_a_float_model_are_named_with_the_fix(ws, capsys, data, kind):
    # the advice was "check channels, image size, --num-classes" after "expected scalar type Char but found Float"
    rc = main(["prune", "--model", DEMO, "--data", data, "--out", "o", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"The inputs are {kind} values but the model computes in float32" in err
    assert "x.float()" in err and not (ws / "o").exists()


@pytest.mark.parametrize("wrap", [torch.compile, lambda m: nn.DataParallel(torch.compile(m))], ids=["compile", "dp"])
def test_weights_saved_from_a_compiled_model_load(ws, capsys, wrap):
    # a compiled model's state_dict names its tensors '_orig_mod.*': "the weights ... do not fit" (exit 2)
    model = _digits()
    torch.save(wrap(model).state_dict(), ws / "w.pt")
    assert _prune_cli(ws, "--weights", "w.pt", "--out", "o") == 0, capsys.readouterr().err
    report = json.loads((ws / "o" / "report.json").read_text())
    torch.save(model.state_dict(), ws / "plain.pt")
    assert _prune_cli(ws, "--weights", "plain.pt", "--out", "o2") == 0
    assert report["params_after"] == json.loads((ws / "o2" / "report.json").read_text())["params_after"]
    assert torch.equal(torch.load(ws / "o" / "model.pt")["features.0.weight"],
                       torch.load(ws / "o2" / "model.pt")["features.0.weight"])  # fmt: skip


def test_a_saved_folder_as_weights_or_its_model_file_says_how_to_load_it(ws, capsys):
    # (session 22: the folder itself as --model prunes it further, tests/test_lead_22.py)
    assert _prune_cli(ws, "--out", "saved") == 0
    capsys.readouterr()
    for args in (["--weights", "saved"], ["--model", "saved/model.pt"]):
        rc = main(["prune", "--model", DEMO, "--data", "data.pt", "--out", "o", "--quiet", *args])
        err = capsys.readouterr().err
        assert rc == 2 and "The folder 'saved' was written by `cleanai prune`" in err, err
        assert "load_pruned('saved')" in err and "does not exist" not in err
    assert not (ws / "o").exists()


def test_an_out_folder_whose_parent_is_missing_says_so(ws, capsys):
    # said "No such file or directory ... free space, fix the permissions"
    assert _prune_cli(ws, "--out", "a/b/c") == 2
    err = capsys.readouterr().err
    assert "the folder" in err and "a/b' it goes in does not exist" in err and "mkdir -p" in err
    assert not (ws / "a").exists()


# -- recover with floating-point labels ---------------------------------------------------------


@pytest.mark.parametrize("as_float", [lambda y: y.float(), lambda y: nn.functional.one_hot(y, 10).double()],
                         ids=["whole-number floats", "one-hot rows"])  # fmt: skip
def test_recover_reads_float_class_labels_as_class_indices(as_float):
    # the labels were dropped without a word: the loss was the teacher's alone, the metric "teacher_agreement"
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    model = _digits()
    pruned = StructuredPruner(model, X, importance="magnitude", pruning_ratio=0.5).prune()
    runs = [
        recover(pruned, model, TensorDataset(x, lab), epochs=2, progress=False, patience=None)
        for lab in (as_float(y), y)
    ]
    (a, ra), (b, rb) = runs
    assert ra.metric == rb.metric == "accuracy" and ra.history == rb.history and ra.train_loss == rb.train_loss
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_recover_says_when_labels_are_not_class_indices():
    g = torch.Generator().manual_seed(0)
    x, soft = torch.rand(20, 1, 8, 8, generator=g), torch.rand(20, generator=g)
    model = _digits()
    pruned = StructuredPruner(model, X, importance="magnitude", pruning_ratio=0.5).prune()
    with pytest.warns(RuntimeWarning, match=r"the labels are not class indices \(fractional.*they are not used"):
        _, result = recover(pruned, model, TensorDataset(x, soft), epochs=1, progress=False)
    assert result.metric == "teacher_agreement"


def test_recover_counts_the_samples_of_data_without_len():
    # train_samples was 0 for an IterableDataset (and a DataLoader over one) that it trained on
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(21, 1, 8, 8, generator=g), torch.randint(0, 10, (21,), generator=g)
    model = _digits()
    pruned = StructuredPruner(model, X, importance="magnitude", pruning_ratio=0.5).prune()
    val = TensorDataset(x[:4], y[:4])
    for data in (_Samples(x, y), DataLoader(_Samples(x, y), batch_size=5)):
        _, result = recover(pruned, model, data, val_data=val, epochs=1, progress=False)
        assert result.train_samples == 21 and result.held_out_samples == 4
    with pytest.raises(UserError, match=r"train_data is a tuple: it must be a data set .*TensorDataset\(x, y\)"):
        recover(pruned, model, (x, y), epochs=1, progress=False)


# -- data functions returning (x, y) tensors; a .pt file of (x, y, extra) --------------------------


def pair_data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def dict_data():
    x, y = pair_data()
    return {"x": x, "y": y}


def generator_data():
    x, y = pair_data()
    yield from zip(x, y, strict=True)


@pytest.mark.parametrize("function", ["pair_data", "dict_data"])
def test_a_data_function_returning_x_and_y_tensors_is_read_like_a_pt_file(ws, capsys, function):
    # (x, y) was read as a data set of two items: "the model failed on an input from --data (shape (1, 16, 1, 8, 8))"
    torch.save(pair_data(), ws / "same.pt")
    assert _prune_cli(ws, "--data", f"test_faults_4:{function}", "--out", "o") == 0, capsys.readouterr().err
    assert _prune_cli(ws, "--data", "same.pt", "--out", "o2") == 0
    a, b = (json.loads((ws / o / "report.json").read_text()) for o in ("o", "o2"))
    assert a["params_after"] == b["params_after"] and a["accuracy_after"] == b["accuracy_after"]


def test_a_data_function_returning_a_generator_says_what_to_return(ws, capsys):
    assert _prune_cli(ws, "--data", "test_faults_4:generator_data", "--out", "o") == 2
    err = capsys.readouterr().err
    assert "returned a generator, not a map-style torch Dataset" in err and "TensorDataset(x, y)" in err


def test_a_pt_file_of_three_tensors_says_it_wants_two(ws, capsys):
    x, y = pair_data()
    torch.save((x, y, y.float()), ws / "triple.pt")
    assert _prune_cli(ws, "--data", "triple.pt", "--out", "o") == 2
    assert "'triple.pt' holds a tuple of 3 tensors; expected (x, y)" in capsys.readouterr().err
    assert not (ws / "o").exists()


# -- dict batches with a key the model does not take ------------------------------------------------


class _TakesX(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _digits()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_a_dict_batch_key_the_model_does_not_take_is_named_with_the_fix():
    # the advice was about batch shapes only, after "forward() got an unexpected keyword argument 'idx'"
    model = _TakesX().eval()
    items = [{"x": x, "y": i % 10, "idx": i} for i, x in enumerate(torch.rand(8, 1, 8, 8))]
    loader = DataLoader(items, batch_size=4)
    hint = r"The batches hold the key 'idx', which the model's forward does not take: leave it out"
    pruner = StructuredPruner(model, {"x": X}, pruning_ratio=0.5)
    with pytest.raises(UserError, match=r"calibration batch 0 .*" + hint):
        pruner.collect_activations(loader)
    pruned = StructuredPruner(model, {"x": X}, importance="magnitude", pruning_ratio=0.5).prune()
    with pytest.raises(UserError, match=r"the pruned model failed on a batch .*" + hint):
        recover(pruned, model, loader, val_data=loader, epochs=1, progress=False)


# -- save_pruned into the current folder ------------------------------------------------------------------


def test_save_pruned_refuses_the_current_folder_its_parents_and_home(tmp_path, monkeypatch):
    # the folder was swapped for the staged one: the process was left in a deleted folder (os.getcwd() failed)
    pruner = StructuredPruner(_digits(), X, importance="magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    work = tmp_path / "work" / "inner"
    work.mkdir(parents=True)
    (work / "mine.txt").write_text("keep")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for out in (".", work, tmp_path / "work", tmp_path / "home"):
        with pytest.raises(UserError, match="is the current folder, a parent of it or your home"):
            save_pruned(out, pruned, pruner.history, MODEL_SPEC)
    assert os.getcwd() == str(work) and sorted(p.name for p in work.iterdir()) == ["mine.txt"]
    assert list((tmp_path / "home").iterdir()) == []
    save_pruned("pruned", pruned, pruner.history, MODEL_SPEC)  # a folder of its own, inside the current one
    assert torch.equal(load_pruned(work / "pruned")(X), pruned(X))


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "DataParallel"])
def test_a_history_replays_on_a_wrapped_fresh_model(wrap):
    # said "this history does not fit the model ... no plugin claims module 'features.0'"
    pruner = StructuredPruner(_digits(), X, importance="magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    fresh = _digits()
    wrapped = wrap(fresh)
    assert pruner.history.replay(wrapped) is wrapped
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in pruned.parameters()]


def test_load_pruned_of_a_file_or_a_missing_path_says_which(tmp_path):
    # each said "'...' has no architecture.json"
    pruner = StructuredPruner(_digits(), X, importance="magnitude", pruning_ratio=0.5)
    save_pruned(tmp_path / "o", pruner.prune(), pruner.history, MODEL_SPEC)
    folder = str(tmp_path / "o")
    with pytest.raises(UserError, match=rf"model.pt' is a file; give the folder .*: load_pruned\('{folder}'\)"):
        load_pruned(tmp_path / "o" / "model.pt")
    with pytest.raises(UserError, match=r"'.*nope' does not exist; give a folder written by"):
        load_pruned(tmp_path / "nope")


def compiled_digits():
    return torch.compile(_digits())


def test_the_command_line_prunes_a_compiled_factory_like_the_plain_one_and_it_loads(ws, capsys):
    # exit 0 with nothing pruned (56,554 parameters kept, 33 s through TorchDynamo); the folder then did not load:
    # the rebuilt wrapper lacked the history's 'features.0' ("damaged, tampered with")
    assert main(["prune", "--model", "test_faults_4:compiled_digits", "--data", "data.pt", "--out", "c", "--quiet",
                 "--ratio", "0.5"]) == 0, capsys.readouterr().err  # fmt: skip
    assert _prune_cli(ws, "--out", "p") == 0
    compiled, plain = (json.loads((ws / o / "report.json").read_text()) for o in ("c", "p"))
    assert compiled["params_after"] == plain["params_after"] < compiled["params_before"]
    loaded = load_pruned(ws / "c", trust_code=True)
    assert sum(p.numel() for p in loaded.parameters()) == plain["params_after"]
    assert torch.equal(loaded(X), load_pruned(ws / "p")(X))
