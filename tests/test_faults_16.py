"""Sixteenth round of bad input and faults through the command line (docs/reliability.md,
"Session 24: faults16"): the cases below each heading."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from cleanai_core.cli import main
from cleanai_plugins.io.demo import DigitsCNN

DEMO = "cleanai_plugins.io.demo:DigitsCNN"


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A fresh current folder holding the demo's weights ``w.pt`` and data ``d.pt``."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(DigitsCNN().state_dict(), "w.pt")
    torch.save((torch.rand(24, 1, 8, 8), torch.randint(0, 10, (24,))), "d.pt")
    return tmp_path


def _bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.fixture
def saved(ws):
    """``o/``: a folder ``cleanai prune`` wrote."""
    assert main(["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--out", "o", "--quiet"]) == 0
    return ws / "o"


# -- a file of another format where a torch.save file goes -----------------------------------------------


def _other_files(folder: Path) -> dict[str, str]:
    """File name -> the words that must name what it is."""
    (folder / "cfg.pt").write_text('{"ratio": 0.5}')
    (folder / "notes.pt").write_text("epoch 3: loss 0.2\n")
    (folder / "img.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (folder / "arr.npy").write_bytes(b"\x93NUMPY\x01\x00" + bytes(64))
    (folder / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x00" + bytes(64))
    with zipfile.ZipFile(folder / "arrays.pt", "w") as z:
        z.writestr("x.npy", b"\x93NUMPY")
        z.writestr("y.npy", b"\x93NUMPY")
    return {
        "cfg.pt": "it is a JSON file",
        "notes.pt": "it is a text file",
        "img.pt": "it is a PNG image",
        "arr.npy": "it is a NumPy array file (numpy.save, .npy)",
        "model.onnx": "it is an ONNX model (.onnx)",
        "arrays.pt": "it is a NumPy .npz archive (numpy.savez)",
    }


@pytest.mark.parametrize("role", ["--weights", "--data", "--model"])
def test_a_file_of_another_format_is_named_as_what_it_is_not_as_a_pickle(ws, capsys, role):
    """A JSON, text, image, .npy, ONNX or .npz file given where torch.save's file goes was
    "holds Python objects (a pickled model or checkpoint) ... add --trust-model" as
    --weights, and "UnpicklingError: Weights only load failed. In PyTorch 2.6, we changed
    the default ..." as --data."""
    files = _other_files(ws)
    for name, words in files.items():
        if (role == "--model" and name == "model.onnx") or (role == "--data" and not name.endswith(".pt")):
            continue  # refused by their suffix before anything is read (test_catalogue)
        args = {"--weights": ["--model", DEMO, "--data", "d.pt", "--weights", name]}.get(role)
        args = args or (["--model", DEMO, "--weights", "w.pt", "--data", name] if role == "--data" else None)
        args = args or ["--model", name, "--data", "d.pt"]
        before = _bytes(ws)
        assert main(["prune", *args, "--out", "o", "--quiet"]) == 2, name
        err = capsys.readouterr().err
        what = {"--weights": "weights file", "--data": "--data", "--model": "--model"}[role]
        assert f"{what} {name!r} is not a file written by torch.save: {words}." in err, err
        assert "Traceback" not in err and "pickled" not in err and "PyTorch 2.6" not in err
        assert _bytes(ws) == before and not (ws / "o").exists()


def test_a_cleanai_json_file_given_as_weights_is_named_by_its_role(saved, capsys):
    for name, words in [
        ("history.json", "it is a pruning history (history.json of a folder cleanai prune or save_pruned wrote)"),
        ("architecture.json", "it is the architecture.json of a folder cleanai prune or save_pruned wrote"),
        ("report.json", "it is a report.json that cleanai prune or cleanai sensitivity wrote"),
        ("config.json", "it is a config.json that cleanai prune wrote (give it as --config)"),
    ]:
        assert main(["prune", "--model", DEMO, "--weights", f"o/{name}", "--data", "d.pt", "--out", "p"]) == 2
        assert f"weights file 'o/{name}' is not a file written by torch.save: {words}." in capsys.readouterr().err


def test_a_saved_folder_whose_model_pt_is_another_format_is_named(saved, capsys):
    shutil.copytree(saved, "s")
    Path("s/model.pt").write_text('{"fc.weight": [1, 2]}')
    assert main(["prune", "--model", "s", "--data", "d.pt", "--out", "p", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'s/model.pt': not a file written by torch.save but a JSON file. The folder is damaged" in err
    assert "PyTorch 2.6" not in err and not Path("p").exists()


def test_torch_save_files_that_are_damaged_keep_their_own_messages(ws, capsys):
    """A truncated torch.save zip and a cut pickle are torch.save files gone wrong, not
    another format: "truncated or damaged" as before."""
    data = Path("w.pt").read_bytes()
    Path("cut.pt").write_bytes(data[: len(data) // 2])
    torch.save(DigitsCNN().state_dict(), "old.pt", _use_new_zipfile_serialization=False)
    Path("cutpickle.pt").write_bytes(Path("old.pt").read_bytes()[:300])
    for name in ("cut.pt", "cutpickle.pt"):
        assert main(["prune", "--model", DEMO, "--data", "d.pt", "--weights", name, "--out", "o"]) == 2
        err = capsys.readouterr().err
        # leftovers16 names how the file ends (an archive without its directory, a pickle cut mid-way)
        assert f"weights file {name!r}" in err and "truncated or damaged" in err and "not a file written" not in err


# -- inf in a weight (not a bias) ------------------------------------------------------------------------


@pytest.mark.parametrize("tensor", ["features.0.weight", "features.1.weight", "fc.weight"])
def test_inf_in_a_weight_is_named_with_its_tensor_on_the_command_line(ws, capsys, tensor):
    """It was "non-finite activations ... check the data" (features.0 / .1), or, for fc, "weight_ratio=0.5 and
    activation_ratio=0.5 (--alpha/--beta) ... give numbers of the same ratio near 1"."""
    state = torch.load("w.pt")
    state[tensor].view(-1)[0] = float("inf")
    torch.save(state, "winf.pt")
    before = _bytes(ws)
    assert main(["prune", "--model", DEMO, "--weights", "winf.pt", "--data", "d.pt", "--out", "o", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the weights in 'winf.pt' are not finite: {tensor} holds 1 inf value(s) (of " in err
    assert "--alpha" not in err and _bytes(ws) == before and not Path("o").exists()


def test_inf_in_a_saved_folders_weight_or_a_models_weight_is_refused_and_save_pruned_writes_nothing(saved, capsys):
    from cleanai_core import StructuredPruner
    from cleanai_core.errors import UserError
    from cleanai_core.history import PruningHistory
    from cleanai_core.io import load_pruned, save_pruned

    shutil.copytree(saved, "s")
    state = torch.load("s/model.pt")
    state["fc.weight"][0, 0] = float("-inf")
    torch.save(state, "s/model.pt")
    assert main(["prune", "--model", "s", "--data", "d.pt", "--out", "p", "--quiet"]) == 2
    assert "'s/model.pt': fc.weight holds 1 inf value(s) (of 450). The folder is damaged" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"fc.weight holds 1 inf value\(s\) \(of 450\)"):
        load_pruned("s")
    model = load_pruned("o")
    with torch.no_grad():
        model.fc.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match=r"save_pruned: the model is not finite: fc.weight holds 1 inf value"):
        save_pruned("t", model, PruningHistory.load("o/history.json"), DEMO)
    assert not Path("t").exists()
    with pytest.raises(UserError, match=r"the model's tensor 'fc.weight' holds 1 inf value\(s\) \(of 450\)"):
        StructuredPruner(model, torch.rand(2, 1, 8, 8), "magnitude", pruning_ratio=0.5)


def test_an_infinite_running_variance_is_refused_and_an_inf_bias_still_prunes(ws):
    from cleanai_core import StructuredPruner
    from cleanai_core.errors import UserError

    model = DigitsCNN().eval()
    model.features[1].running_var[3] = float("inf")
    with pytest.raises(UserError, match=r"'features.1.running_var' holds 1 infinite running variance\(s\)"):
        StructuredPruner(model, torch.rand(2, 1, 8, 8), "magnitude", pruning_ratio=0.5)
    model = DigitsCNN().eval()
    with torch.no_grad():
        model.fc.bias[0] = float("inf")
    pruned = StructuredPruner(model, torch.rand(2, 1, 8, 8), "magnitude", pruning_ratio=0.5).prune()
    assert pruned.features[0].out_channels == 16


# -- config.json of a run, read back from another folder -------------------------------------------------


def test_the_config_json_of_a_run_reproduces_it_from_another_folder(saved, capsys, monkeypatch):
    """config.json recorded 'w.pt', 'd.pt' and 'o' as typed: `cleanai prune --config o/config.json` from another
    folder said "--data 'd.pt': no such file or folder"."""
    recorded = json.loads(Path("o/config.json").read_text())
    assert recorded["weights"] == str(saved.parent / "w.pt") and recorded["data"] == str(saved.parent / "d.pt")
    assert recorded["out"] == str(saved) and recorded["model"] == DEMO  # a spec stays as it is
    (saved.parent / "elsewhere").mkdir()
    monkeypatch.chdir(saved.parent / "elsewhere")
    assert main(["prune", "--config", "../o/config.json", "--out", "again", "--quiet"]) == 0
    first, second = torch.load(saved / "model.pt"), torch.load("again/model.pt")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_relative_path_from_a_config_file_that_is_not_there_names_the_folder_it_was_read_from(ws, capsys):
    Path("sub").mkdir()
    Path("sub/c.toml").write_text(f'model = "{DEMO}"\nweights = "w.pt"\ndata = "d.pt"\nout = "o"\n')
    Path("run").mkdir()
    os.chdir("run")
    assert main(["prune", "--config", "../sub/c.toml"]) == 2
    err = capsys.readouterr().err
    config, here = os.path.abspath("../sub/c.toml"), os.getcwd()
    assert (
        f"--weights 'w.pt' (from config file {config!r}) does not exist in the current folder {here!r}: a relative "
        "path in a config file is read from the folder cleanai runs in." in err
    )
    assert main(["prune", "--config", "../sub/c.toml", "--weights", "../w.pt", "--data", "../d.pt", "--dry-run"]) == 0


# -- cleanai explain of a folder cleanai prune wrote -----------------------------------------------------


def test_explain_of_a_saved_folder_traces_it_with_its_recorded_input_shape(saved, capsys):
    """It traced with a (1, 3, 224, 224) image: "expected input[1, 3, 224, 224] to have 1 channels ... Tried
    --input-shape 1,3,224,224; pass the right one", for a folder whose architecture.json records [1, 1, 8, 8]."""
    capsys.readouterr()
    assert main(["explain", "--model", "o"]) == 0
    out = capsys.readouterr().out
    widths = json.loads(Path("o/architecture.json").read_text())["settings"]
    assert f"group 1: {widths['features.0']['out_channels']} units" in out
    assert "group 4: 10 units (0 prunable) -> fc:out(out)" in out
    assert main(["explain", "--model", "o", "--input-shape", "1,3,8,8"]) == 2  # a shape given still wins
    assert "Tried --input-shape 1,3,8,8; pass the right one" in capsys.readouterr().err


# -- what a CleanAI run wrote, given in another role -----------------------------------------------------


def test_a_file_a_run_wrote_given_as_config_is_named_with_the_runs_config_json(saved, capsys):
    """It said "unknown key(s) 'params_before', 'params_after', ..." and listed every valid key."""
    for name, words in [
        ("report.json", "a report.json that cleanai prune or cleanai sensitivity wrote"),
        ("history.json", "a pruning history (history.json of a folder cleanai prune or save_pruned wrote)"),
        ("architecture.json", "the architecture.json of a folder cleanai prune or save_pruned wrote"),
    ]:
        assert main(["prune", "--config", f"o/{name}", "--out", "p"]) == 2
        err = capsys.readouterr().err
        assert (
            f"config file 'o/{name}' is {words}, not a config. Give the config.json of that run ('o/config.json' "
            in err
        )
        assert "unknown key" not in err and not Path("p").exists()


def test_folders_a_run_wrote_given_as_data_or_model_are_named(saved, capsys):
    """As --data they were "image folder 'o' has no class sub-folders"; as --model a folder missing a file or an
    analysis was "is a folder; give a model file, ... or a folder written by `cleanai prune`"."""
    assert main(["sensitivity", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--out", "sens", "-q"]) == 0
    shutil.copytree(saved, "part")
    Path("part/history.json").unlink()
    capsys.readouterr()
    args = ["--model", DEMO, "--weights", "w.pt", "--out", "p", "--quiet"]
    cases = [
        (["--data", "o", *args], "--data 'o' is a folder cleanai prune or save_pruned wrote, a pruned model, not data "
         "(give it as --model to prune it further)"),
        (["--data", "sens", *args], "--data 'sens' is a folder cleanai sensitivity wrote, an analysis that holds no "
         "model, not data (its config.json names the model and data it measured)"),
        (["--model", "sens", "--data", "d.pt", "--out", "p"], "--model 'sens' is a folder cleanai sensitivity wrote, "
         "an analysis that holds no model: its config.json names the model and data it measured."),
        (["--model", "part", "--data", "d.pt", "--out", "p"], "--model 'part' is a folder cleanai prune or "
         "save_pruned wrote that lacks history.json: a copy that missed files, or a damaged folder"),
    ]  # fmt: skip
    for argv, words in cases:
        before = _bytes(saved.parent)
        assert main(["prune", *argv]) == 2
        err = capsys.readouterr().err
        assert words in err, err
        assert _bytes(saved.parent) == before and not Path("p").exists()


# -- one option given twice on the command line ----------------------------------------------------------


@pytest.mark.parametrize(
    "command, twice, shown",
    [
        ("prune", ["--ratio", "0.3", "--pruning-ratio", "0.6"], "argument --ratio/--pruning-ratio/-r: given twice, "
         "as --ratio 0.3 and --pruning-ratio 0.6; give it once (a default belongs in --config or CLEANAI_RATIO"),
        ("prune", ["--out", "a", "-o", "b"], "argument --out/-o: given twice, as --out 'a' and -o 'b'"),
        ("sensitivity", ["--model", DEMO, "-m", "other:m"], "argument --model/-m: given twice, as --model "
         f"{DEMO!r} and -m 'other:m'"),
    ],
)  # fmt: skip
def test_an_option_given_under_two_spellings_with_two_values_is_refused(ws, capsys, command, twice, shown):
    """The last value was taken without a word: `--ratio 0.3 --pruning-ratio 0.6` pruned at 0.6, `--out a -o b`
    wrote b. A repeated key in a config file is refused the same way."""
    base = {"--model": DEMO, "--weights": "w.pt", "--data": "d.pt", "--out": "o"}
    argv = [command, *twice]
    for flag, value in base.items():
        if flag not in twice and not (flag == "--model" and "-m" in twice):
            argv += [flag, value]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert shown in err and "Traceback" not in err
    assert not any(Path(n).exists() for n in ("o", "a", "b"))


def test_one_spelling_given_twice_uses_the_last_with_a_warning_and_repeatable_options_add_up(ws, capsys):
    """A wrapper script's defaults overridden by its arguments keep working (as in other tools), now said."""
    argv = ["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--ratio", "0.3", "--ratio", "0.5"]
    argv += ["--ratio", "0.5", "--ignore", "features.0", "--ignore", "features.3", "--dry-run", "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "cleanai prune: warning: --ratio given twice (0.3, then 0.5); the last is used." in captured.err
    assert captured.err.count("given twice") == 1  # the same value again says nothing
    assert "32/64    fc, features.7, features.8" in captured.out and "features.0, features.1" not in captured.out


# -- a .pt dict, an .npz or a TensorDataset with other names or more tensors -----------------------------


@pytest.mark.parametrize(
    "held",
    [
        lambda x, y: {"x": x, "labels": y},
        lambda x, y: {"inputs": x, "y": y},
        lambda x, y: {"images": x, "targets": y},
        lambda x, y: {"data": x, "label": y, "classes": [str(i) for i in range(10)]},
    ],
    ids=["x+labels", "inputs+y", "images+targets", "data+label+class-names"],
)
def test_labels_under_any_of_their_names_are_read_with_inputs_under_any_of_theirs(ws, capsys, held):
    """{'x': x, 'labels': y} ran as data without labels: "Accuracy not measured: the data has no labels"."""
    x, y = torch.load("d.pt")
    torch.save(held(x, y), "named.pt")
    args = ["--model", DEMO, "--weights", "w.pt", "--quiet"]
    assert main(["prune", *args, "--data", "d.pt", "--out", "plain"]) == 0
    assert main(["prune", *args, "--data", "named.pt", "--out", "named"]) == 0
    plain, named = (json.loads(Path(f"{o}/report.json").read_text()) for o in ("plain", "named"))
    assert named["accuracy_before"] is not None and named["accuracy_before"] == plain["accuracy_before"]
    assert named["params_after"] == plain["params_after"]


def test_a_third_tensor_or_two_names_for_the_labels_are_refused_not_dropped(ws, capsys):
    import numpy as np

    x, y = torch.load("d.pt")
    cases = {
        "tds.pt": (torch.utils.data.TensorDataset(x, y, torch.ones(24)), "'tds.pt' holds a TensorDataset of 3 "
                   "tensors; expected (x, y): inputs and labels only"),
        "w.pt.pt": ({"x": x, "y": y, "w": torch.ones(24)}, "'w.pt.pt' holds the tensor(s) ['w'] besides the inputs "
                    "'x' and labels 'y'; CleanAI reads inputs and labels only"),
        "two.pt": ({"x": x, "y": y, "labels": y}, "'two.pt' holds both 'y' and 'labels'; give one inputs entry"),
    }  # fmt: skip
    for name, (held, _) in cases.items():
        torch.save(held, name)
    np.savez("w.npz", x=x.numpy(), y=y.numpy(), mask=np.ones(24))
    cases["w.npz"] = (None, "'w.npz' holds the tensor(s) ['mask'] besides the inputs 'x' and labels 'y'")
    for name, (_, words) in cases.items():
        before = _bytes(ws)
        assert main(["prune", "--model", DEMO, "--weights", "w.pt", "--data", name, "--out", "o", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert words in err, err
        assert _bytes(ws) == before and not Path("o").exists()


# -- a model whose outputs on the data are NaN or all inf ------------------------------------------------

_NAN_MODELS = """
from cleanai_plugins.io.demo import DigitsCNN


class NaNInside(DigitsCNN):
    def forward(self, x):
        hidden = self.features[0](x)
        return super().forward(x) + (hidden / 0.0 * 0.0).mean()  # 0 / 0: NaN reaches no layer, only the output


class Infinite(DigitsCNN):
    def forward(self, x):
        return super().forward(x) * float("inf")


class MaskedClass(DigitsCNN):
    def forward(self, x):
        out = super().forward(x).clone()
        out[:, 0] = float("-inf")  # a class masked out: the other logits are finite
        return out


def nan_inside():
    return NaNInside()


def infinite():
    return Infinite()


def masked_class():
    return MaskedClass()
"""


@pytest.mark.parametrize(
    "factory, words",
    [("nan_inside", "gives NaN in 10 of its 10 output values on the first sample of --data, before anything is "
      "pruned"), ("infinite", "gives inf in all of its 10 output values on the first sample of --data")],
)  # fmt: skip
def test_a_model_whose_output_on_the_data_is_nan_or_all_inf_is_refused(ws, capsys, monkeypatch, factory, words):
    """Exit 0, the result written: every check of the pruned model against the original passes where the original's
    output is not finite, and accuracy was "0.00% -> 0.00%"."""
    Path("nanmodels.py").write_text(_NAN_MODELS)
    monkeypatch.syspath_prepend(str(ws))
    before = _bytes(ws)
    assert main(["prune", "--model", f"nanmodels:{factory}", "--data", "d.pt", "--out", "o", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--model 'nanmodels:{factory}' {words}" in err and "nothing was written" in err
    assert _bytes(ws) == before and not Path("o").exists()
    assert main(["prune", "--model", "nanmodels:masked_class", "--data", "d.pt", "--out", "m", "--quiet"]) == 0
    assert json.loads(Path("m/report.json").read_text())["params_after"] < 56554


# -- --image-size with data that has no images to size -------------------------------------------------


def test_image_size_with_tensor_data_is_refused_and_with_an_image_folder_read(ws, capsys):
    """--image-size 16 with a .pt of 8 x 8 inputs ran at 8 x 8 without a word."""
    assert (
        main(["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--image-size", "16", "--out", "o"]) == 2
    )
    err = capsys.readouterr().err
    assert (
        "--image-size (command line) sizes the images of an image folder (or a data function that takes it), and "
        "the data is read from tensor or text files as it is: leave --image-size out." in err
    )
    assert not Path("o").exists()
    from PIL import Image

    for c in ("a", "b"):
        Path(f"imgs/{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("L", (5, 7), color=40 * i).save(f"imgs/{c}/{i}.png")
    argv = ["prune", "--model", DEMO, "--weights", "w.pt", "--data", "imgs", "--image-size", "8", "--out", "p", "-q"]
    assert main(argv) == 0
    assert json.loads(Path("p/report.json").read_text())["input_shape"] == [1, 1, 8, 8]


def test_a_train_data_file_of_another_kind_is_named_as_train_data(saved, capsys):
    """The data readers named every file --data: an empty --train-data file was "--data 't.pt' is empty"."""
    Path("t.pt").write_text('{"x": 1}')
    Path("e.pt").write_bytes(b"")
    args = ["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--recover-epochs", "1", "--out", "p"]
    for train, words in [
        ("t.pt", "--train-data 't.pt' is not a file written by torch.save: it is a JSON file."),
        ("e.pt", "--train-data 'e.pt' is empty (0 bytes)"),
        ("o", "--train-data 'o' is a folder cleanai prune or save_pruned wrote, a pruned model, not data"),
    ]:
        assert main([*args, "--train-data", train, "--quiet"]) == 2
        assert words in capsys.readouterr().err
        assert not Path("p").exists()


def test_the_unpruned_weights_given_with_a_pruned_models_folder_are_named_as_such(saved, capsys):
    assert main(["prune", "--model", "o", "--weights", "w.pt", "--data", "d.pt", "--out", "p", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the weights in 'w.pt' do not fit 'o': shape mismatch" in err
    assert (
        "They are the unpruned model's weights (the shapes history.json records before the first prune): to prune "
        f"them, give --model {DEMO} --weights w.pt; to prune the folder's model further, leave --weights out" in err
    )
    state = torch.load("w.pt")
    state["fc.weight"] = torch.zeros(5, 64)  # weights of neither
    torch.save(state, "other.pt")
    assert main(["prune", "--model", "o", "--weights", "other.pt", "--data", "d.pt", "--out", "p", "--quiet"]) == 2
    assert "do not fit 'o'" in (err := capsys.readouterr().err) and "unpruned model's weights" not in err
    assert not Path("p").exists()


def test_two_config_files_use_the_last_with_a_warning(ws, capsys):
    Path("a.toml").write_text("ratio = 0.5\n")
    Path("b.toml").write_text("ratio = 0.2\n")
    argv = ["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--dry-run", "--quiet"]
    assert main([*argv, "--config", "a.toml", "--config", "b.toml"]) == 0
    captured = capsys.readouterr()
    assert "warning: --config given twice ('a.toml', then 'b.toml'); the last is used." in captured.err
    assert "6/32    features.0, features.1, features.3" in captured.out  # 0.2 of 32, not 0.5
