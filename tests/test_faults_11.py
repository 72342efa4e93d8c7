"""Eleventh round of bad input and faults (docs/reliability.md, "Session 21: faults"):
``.npz`` members whose header lies about the values that follow, and the cases below each
heading."""

from __future__ import annotations

import struct
import zipfile

import pytest
import torch

from cleanai_core.cli import main
from cleanai_core.errors import UserError
from cleanai_plugins.io.datasets import load_dataset, read_npz

DEMO = "cleanai_plugins.io.demo:DigitsCNN"


def _npy(header: dict, payload: bytes = b"") -> bytes:
    text = repr(header).encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload


def _npz(path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)


X = torch.arange(40 * 64, dtype=torch.float32).reshape(40, 1, 8, 8) / 2560
Y = torch.arange(40) % 10
X_NPY = _npy({"descr": "<f4", "fortran_order": False, "shape": (40, 1, 8, 8)}, X.numpy().tobytes())
Y_NPY = _npy({"descr": "<i8", "fortran_order": False, "shape": (40,)}, Y.numpy().tobytes())


# -- .npz members whose header does not describe what follows -----------------------------------------


def test_a_small_npz_of_compressed_zeros_is_refused_before_it_is_decompressed(tmp_path):
    # 64 MiB of zeros under a header that says 10 KiB: the whole member was read into memory
    # first (a 1 MB file asked for 1 GiB: MemoryError; 10 MB for 10 GiB: the OOM killer)
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            f.write(_npy({"descr": "<f4", "fortran_order": False, "shape": (40, 1, 8, 8)}))
            for _ in range(16):
                f.write(bytes(2**22))
    assert (tmp_path / "bomb.npz").stat().st_size < 2**17
    with pytest.raises(UserError, match=r"says shape \(40, 1, 8, 8\) of <f4 \(10,240 bytes\), but the file holds "
                       r"67,108,864 bytes of values; it is damaged"):  # fmt: skip
        read_npz(tmp_path / "bomb.npz")


@pytest.mark.parametrize(
    "header, problem",
    [
        ({"descr": "<f4", "fortran_order": False, "shape": (-1, 1, 8, 8)}, r"'shape' is \(-1, 1, 8, 8\), expected"),
        ({"descr": "<f4", "fortran_order": "yes", "shape": (40, 1, 8, 8)}, "'fortran_order' is 'yes', expected True"),
        ({"descr": "<f4", "fortran_order": False, "shape": (40.0, 1, 8, 8)}, r"'shape' is \(40.0, 1, 8, 8\)"),
        ({"descr": "<f4", "fortran_order": False, "shape": [40, 1, 8, 8]}, r"'shape' is \[40, 1, 8, 8\]"),
        ({"descr": "<f4", "shape": (40, 1, 8, 8)}, "a header without 'descr', 'fortran_order' and 'shape'"),
        ({"descr": "<f4", "fortran_order": False, "shape": (41, 1, 8, 8)}, r"says shape \(41, 1, 8, 8\)"),
    ],
    ids=["negative_size", "text_fortran_order", "float_size", "list_shape", "no_fortran_order", "too_few_values"],
)
def test_an_npy_header_out_of_numpys_form_is_named_not_reinterpreted(tmp_path, header, problem):
    # -1 was read by reshape as "the rest", "yes" as fortran order (the values transposed):
    # both pruned on other data without a word
    _npz(tmp_path / "d.npz", {"x.npy": _npy(header, X.numpy().tobytes()), "y.npy": Y_NPY})
    with pytest.raises(UserError, match=problem):
        read_npz(tmp_path / "d.npz")


def test_an_npy_header_longer_than_numpys_limit_is_refused_unparsed(tmp_path):
    text = b"[" * 50_000 + b"]" * 50_000
    member = b"\x93NUMPY\x02\x00" + struct.pack("<I", len(text)) + text
    _npz(tmp_path / "d.npz", {"x.npy": member, "y.npy": Y_NPY})
    too_long = r"\(ValueError: a header of 100,000 bytes; a .npy header is at most 10,000\)"
    with pytest.raises(UserError, match=rf"array 'x.npy' is damaged or not a .npy array {too_long}"):
        read_npz(tmp_path / "d.npz")


def test_an_array_stored_twice_in_the_npz_is_refused(tmp_path):
    # a zip appended to: the last x.npy was taken without a word (40 samples read as 40 others)
    _npz(tmp_path / "d.npz", {"x.npy": X_NPY, "y.npy": Y_NPY})
    with zipfile.ZipFile(tmp_path / "d.npz", "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("x.npy", _npy({"descr": "<f4", "fortran_order": False, "shape": (40, 1, 8, 8)}, bytes(40 * 256)))
    with pytest.raises(UserError, match="holds the array 'x.npy' twice"):
        read_npz(tmp_path / "d.npz")


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA])
def test_well_formed_npz_members_still_read_exactly(tmp_path, compression):
    fortran = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    column_major = fortran.permute(2, 1, 0).numpy().tobytes()
    f_npy = _npy({"descr": "<f4", "fortran_order": True, "shape": (2, 3, 4)}, column_major)
    _npz(tmp_path / "d.npz", {"x.npy": X_NPY, "y.npy": Y_NPY, "f.npy": f_npy}, compression)
    got = read_npz(tmp_path / "d.npz")
    assert torch.equal(got["x"], X) and torch.equal(got["y"], Y) and torch.equal(got["f"], fortran)


@pytest.mark.parametrize("x_max", [float("inf"), float("nan"), 0.0])
def test_an_x_max_that_is_not_a_finite_positive_number_is_refused(tmp_path, x_max):
    # x_max = inf divided every uint8 input to 0: the job pruned and reported on all-zero inputs
    pixels = _npy({"descr": "|u1", "fortran_order": False, "shape": (40, 1, 8, 8)}, bytes(range(40)) * 64)
    scale = _npy({"descr": "<f4", "fortran_order": False, "shape": ()}, struct.pack("<f", x_max))
    _npz(tmp_path / "d.npz", {"x.npy": pixels, "y.npy": Y_NPY, "x_max.npy": scale})
    with pytest.raises(UserError, match="x_max must be one positive number"):
        load_dataset(str(tmp_path / "d.npz"), {})


def test_a_lying_npz_stops_cleanai_prune_with_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys):
    from cleanai_plugins.io.demo import DigitsCNN

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(DigitsCNN().state_dict(), "w.pt")
    _npz("d.npz", {"x.npy": _npy({"descr": "<f4", "fortran_order": False, "shape": (-1, 1, 8, 8)}, X.numpy().tobytes()),
                   "y.npy": Y_NPY})  # fmt: skip
    before = (tmp_path / "d.npz").read_bytes()
    assert main(["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.npz", "--out", "o", "-q"]) == 2
    assert "'shape' is (-1, 1, 8, 8), expected a tuple of sizes >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and (tmp_path / "d.npz").read_bytes() == before


# -- torch.save archives whose records were compressed ------------------------------------------------


def _repack(src, dst) -> None:
    """``src`` (a torch.save archive) with every record deflated, as a zip tool repacks it."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info.filename))


@pytest.mark.parametrize("role", ["--data", "--weights", "saved model.pt"])
def test_a_torch_archive_that_unpacks_far_beyond_its_size_is_not_loaded(tmp_path, monkeypatch, capsys, role):
    # a 200 KB .pt of deflated zeros made torch.load allocate 200 MB (10 MB: 10 GB, the OOM killer)
    from cleanai_core.io import load_pruned
    from cleanai_plugins.io.demo import DigitsCNN

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(DigitsCNN().state_dict(), "w.pt")
    torch.save((X, Y), "d.pt")
    if role == "saved model.pt":
        assert main(["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--out", "saved", "-q"]) == 0
    torch.save((torch.zeros(2**22, 1, 2, 2), torch.zeros(2**22, dtype=torch.long)), "zeros.pt")  # 96 MiB
    target = {"--data": "d.pt", "--weights": "w.pt", "saved model.pt": "saved/model.pt"}[role]
    _repack("zeros.pt", target)
    assert (tmp_path / target).stat().st_size < 2**20
    before = (tmp_path / target).read_bytes()
    if role == "saved model.pt":
        unpacks = r"whose compressed records unpack to 100,66\d,\d{3} bytes; torch.save stores"
        with pytest.raises(UserError, match=unpacks):
            load_pruned("saved")
    else:
        assert main(["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--out", "o", "-q"]) == 2
        what = role if role == "--data" else "weights file"
        assert f"{what} '{target}' is a zip archive of" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
    assert (tmp_path / target).read_bytes() == before


def test_a_torch_archive_repacked_with_deflate_still_loads_where_it_stays_small(tmp_path):
    # a zip tool's repack of ordinary data gains a few times at most: it still loads, the same tensors
    torch.save((X, Y), tmp_path / "d.pt")
    _repack(tmp_path / "d.pt", tmp_path / "packed.pt")
    ds = load_dataset(str(tmp_path / "packed.pt"), {})
    assert torch.equal(ds.tensors[0], X) and torch.equal(ds.tensors[1], Y)


# -- a saved folder whose architecture.json asks for a huge model ------------------------------------


@pytest.mark.parametrize("num_classes", [10**7, 11])
def test_a_tampered_class_count_is_a_damaged_folder_before_the_model_is_built(tmp_path, monkeypatch, num_classes):
    # num_classes = 10**7 built the whole head for real before model.pt was compared (a ResNet-18's: 20 GB,
    # the out-of-memory killer); now the shapes are compared on the meta device first
    import json

    import cleanai_core.plugins as plugins
    from cleanai_core import StructuredPruner
    from cleanai_core.io import load_pruned, save_pruned
    from cleanai_plugins.io.demo import MODEL_SPEC, DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN().eval()
    pruner = StructuredPruner(model, X[:1], "magnitude", pruning_ratio=0.5)
    save_pruned(tmp_path / "o", pruner.prune(), pruner.history, MODEL_SPEC, options={"num_classes": 10})
    arch = json.loads((tmp_path / "o" / "architecture.json").read_text())
    arch["options"]["num_classes"] = num_classes
    (tmp_path / "o" / "architecture.json").write_text(json.dumps(arch))
    devices = []
    real_load = plugins.load_model

    def spy(pm, spec, options):
        devices.append(torch.get_default_device().type)
        return real_load(pm, spec, options)

    monkeypatch.setattr(plugins, "load_model", spy)
    with pytest.raises(UserError, match=rf"model.pt': does not fit .*'fc.bias \(10,\) vs model \({num_classes},\)'.*"
                       "tampered with"):  # fmt: skip
        load_pruned(tmp_path / "o")
    assert devices == ["meta"]  # built for real (cpu) before the comparison


def test_an_untouched_folder_still_loads_equal_after_the_meta_check(tmp_path):
    from cleanai_core import StructuredPruner
    from cleanai_core.io import load_pruned, save_pruned
    from cleanai_plugins.io.demo import MODEL_SPEC, DigitsCNN

    torch.manual_seed(0)
    pruner = StructuredPruner(DigitsCNN().eval(), X[:1], "magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    save_pruned(tmp_path / "o", pruned, pruner.history, MODEL_SPEC, options={"num_classes": 10})
    loaded = load_pruned(tmp_path / "o")
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in pruned.parameters())


# -- arguments in another order -----------------------------------------------------------------------


def test_a_model_given_where_the_folder_goes_is_named_briefly_with_the_order(tmp_path, monkeypatch):
    # the message printed the whole network's repr (a ResNet-50: 20,000 characters) and no hint
    from cleanai_core import GradualPruner, PruningSchedule, StructuredPruner
    from cleanai_core.io import load_pruned, save_pruned
    from cleanai_plugins.io.demo import MODEL_SPEC, DigitsCNN

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    pruner = StructuredPruner(DigitsCNN().eval(), X[:1], "magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    with pytest.raises(UserError) as err:
        save_pruned(pruned, "o", pruner.history, MODEL_SPEC)
    assert str(err.value) == (
        "save_pruned needs a folder path (str or Path), got a DigitsCNN module (save_pruned(out_dir, model, "
        "history, spec): the folder comes first)"
    )
    with pytest.raises(UserError) as err:
        load_pruned(torch.zeros(10_000))
    assert str(err.value) == "load_pruned needs a folder path (str or Path), got a Tensor of shape (10000,)"
    # the same for every argument where a path, a spec, options or an optimizer go
    with pytest.raises(
        UserError, match=r"PruningHistory.save needs a file path \(str or Path\), got a DigitsCNN module$"
    ):
        pruner.history.save(pruned)
    with pytest.raises(UserError, match=r"'package.module:factory'\), got a DigitsCNN module$"):
        save_pruned("o", pruned, pruner.history, pruned)
    with pytest.raises(
        UserError, match=r"options must be a dict such as \{'num_classes': 10\}, got \[0, 1, 2, .*\.\.\.$"
    ):
        save_pruned("o", pruned, pruner.history, MODEL_SPEC, options=list(range(1000)))
    with pytest.raises(UserError, match=r"over the model's parameters, got a DigitsCNN module$"):
        GradualPruner(pruned, X[:1], pruned, PruningSchedule(final=0.5, steps=2))
    assert list(tmp_path.iterdir()) == []


# -- a --model whose forward returns no tensor ------------------------------------------------------


class _Returns(torch.nn.Module):
    """The demo CNN, returning ``what(logits)`` from its forward."""

    def __init__(self, what) -> None:
        from cleanai_plugins.io.demo import DigitsCNN

        super().__init__()
        torch.manual_seed(0)
        self.net, self.what = DigitsCNN(), what

    def forward(self, x):
        return self.what(self.net(x))


NO_TENSOR = {"none": lambda out: None, "number": lambda out: float(out.sum()), "text": lambda out: "cat"}


def returns_none():
    return _Returns(NO_TENSOR["none"])


def returns_number():
    return _Returns(NO_TENSOR["number"])


def returns_text():
    return _Returns(NO_TENSOR["text"])


@pytest.mark.parametrize("kind, shown", [("none", "NoneType"), ("number", "float"), ("text", "str")])
def test_a_model_returning_no_tensor_is_exit_2_with_advice_the_command_line_can_take(tmp_path, monkeypatch, capsys,
                                                                                     kind, shown):  # fmt: skip
    # exit 1, "cleanai prune: failed: the model's output (NoneType) holds no tensors ...; pass
    # output_transform=lambda out: ...", an argument the command line does not have
    monkeypatch.chdir(tmp_path)
    torch.save((X, Y), "d.pt")
    spec = f"test_faults_11:returns_{kind}"
    assert main(["prune", "--model", spec, "--data", "d.pt", "--out", "o", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"--model '{spec}' returned {shown} on an input from --data, not tensors" in err
    assert "output_transform" not in err and not (tmp_path / "o").exists()


# -- weight_ratio / activation_ratio beyond what float64 can rank ------------------------------------


def _wide_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 4),
    )  # fmt: skip


def _kept(importance) -> list[list[int]]:
    from cleanai_core import StructuredPruner

    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    pruner = StructuredPruner(_wide_net(), x, importance, pruning_ratio=0.5)
    pruner.collect_activations([x], progress=False)
    pruner.prune()
    return [e.keep.tolist() for e in pruner.history.steps[0] if e.slice == "out"]


@pytest.mark.parametrize("form", ["multiplicative", "additive"])
def test_ratios_whose_scores_float64_cannot_hold_are_refused_and_large_ones_that_fit_rank_alike(form):
    # 3000 / 7000: 33 of 64 units scored 0 (underflow) and were pruned by their index, without a word
    from cleanai_core import WeightActivationImportance as WA

    reference = _kept(WA(0.3, 0.7, form=form))
    assert _kept(WA(30, 70, form=form)) == reference  # percentages: the same units
    scale = 1e4 if form == "multiplicative" else 1e308
    lost = r"and at these values \d+ unit score\(s\) of the group of 64 units go beyond what float64"
    with pytest.raises(
        UserError, match=rf"are (exponents|factors) of the {form} Weight Magnitude - Activation score, {lost}"
    ):
        _kept(WA(0.3 * scale, 0.7 * scale, form=form))


def test_cleanai_prune_with_alpha_and_beta_in_the_thousands_exits_2(tmp_path, monkeypatch, capsys):
    from cleanai_plugins.io.demo import DigitsCNN

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(DigitsCNN().state_dict(), "w.pt")
    torch.save((X, Y), "d.pt")
    argv = ["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--out", "o", "-q"]
    assert main([*argv, "--alpha", "3000", "--beta", "7000"]) == 2
    err = capsys.readouterr().err
    assert "give numbers of the same ratio near 1 (e.g. weight_ratio=0.429, activation_ratio=1)" in err
    assert not (tmp_path / "o").exists()


# -- an image of more pixels than PIL reads -----------------------------------------------------------


def test_an_image_beyond_pils_pixel_limit_is_named_by_its_file(tmp_path, monkeypatch, capsys):
    # "--data 'imgs': reading item 6 failed (DecompressionBombError: ...)": which of the files?
    # (PIL refuses twice its MAX_IMAGE_PIXELS; lowered here so that an 8 x 8 image trips it)
    import numpy as np
    from PIL import Image

    from cleanai_plugins.io.demo import DigitsCNN

    monkeypatch.chdir(tmp_path)
    for c in "ab":
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((4, 4), 40 * i, dtype=np.uint8)).save(f"imgs/{c}/{i}.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save("imgs/b/big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # refused above 40 pixels: 8 x 8, not 4 x 4
    torch.manual_seed(0)
    torch.save(DigitsCNN().state_dict(), "w.pt")
    argv = ["prune", "--model", DEMO, "--weights", "w.pt", "--data", "imgs", "--image-size", "4", "--out", "o", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot read image 'imgs/b/big.png' in --data 'imgs' (DecompressionBombError: Image size (64 pixels)" in err
    assert "remove or replace the file" in err and not (tmp_path / "o").exists()


# -- a training checkpoint whose model is held by a wrapper module ---------------------------------


def test_a_lightning_style_checkpoint_loads_the_wrapped_models_tensors(tmp_path, caplog):
    # {"state_dict": {"model.features.0.weight": ...}} (a LightningModule's self.model): "missing 20 tensor(s)
    # of the model ...; 20 unexpected tensor(s) (e.g. ['model.features.0.weight', ...])"
    from cleanai_plugins.io.demo import DigitsCNN
    from cleanai_plugins.io.models import _apply_weights

    torch.manual_seed(0)
    trained = DigitsCNN()
    sd = trained.state_dict()
    files = {
        "lightning.ckpt": {"epoch": 3, "state_dict": {f"model.{k}": v for k, v in sd.items()}, "loops": {}},
        "nested.ckpt": {"state_dict": {f"net.backbone.{k}": v for k, v in sd.items()} | {"loss.weight": torch.ones(3)}},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        torch.manual_seed(1)
        model = DigitsCNN()
        with caplog.at_level("INFO", logger="cleanai"):
            _apply_weights(model, str(tmp_path / name), DEMO)
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert "read the tensors under 'net.backbone.' (a wrapper module's); 1 other tensor(s)" in caplog.text
    # the same architecture twice (a teacher and a student): nothing is chosen, the parts are named
    torch.save({f"{who}.{k}": v for who in ("student", "teacher") for k, v in sd.items()}, tmp_path / "kd.ckpt")
    with pytest.raises(UserError, match=r"holds this architecture 2 times, under 'student.', 'teacher.'"):
        _apply_weights(DigitsCNN(), str(tmp_path / "kd.ckpt"), DEMO)
    # a part that is not the whole model is not taken
    torch.save({f"model.{k}": v for k, v in list(sd.items())[:-1]}, tmp_path / "part.ckpt")
    with pytest.raises(UserError, match=r"do not fit .*missing 20 tensor\(s\)"):
        _apply_weights(DigitsCNN(), str(tmp_path / "part.ckpt"), DEMO)


# -- .pt data saved as lists of tensors or of samples -----------------------------------------------


def test_pt_data_as_a_list_of_tensors_or_of_samples_reads_as_the_stacked_tensors(tmp_path):
    # "the inputs are a list, expected a tensor" / "'d.pt' holds a list; expected an image folder ..."
    xs = [X[i] for i in range(40)]
    forms = {
        "list.pt": (xs, Y),
        "samples.pt": [(X[i], int(Y[i])) for i in range(40)],
        "tensor_labels.pt": [(X[i], Y[i]) for i in range(40)],
        "two_samples.pt": [(X[0], 3), (X[1], 4)],
    }
    for name, obj in forms.items():
        torch.save(obj, tmp_path / name)
        ds = load_dataset(str(tmp_path / name), {})
        n = 2 if name == "two_samples.pt" else 40
        assert torch.equal(ds.tensors[0], X[:n]), name
        assert torch.equal(ds.tensors[1], torch.tensor([3, 4]) if n == 2 else Y), name
    torch.save(([*xs[:39], torch.rand(1, 9, 9)], Y), tmp_path / "mixed.pt")
    with pytest.raises(UserError, match=r"a list of 40 tensors of 2 shapes \(e.g. \(1, 8, 8\) and \(1, 9, 9\)\)"):
        load_dataset(str(tmp_path / "mixed.pt"), {})


# -- a --plugin module that fails when it is imported -------------------------------------------------

PLUGINS = {
    "raises": ('raise RuntimeError("boom at import")\n', "importing the module raised RuntimeError: boom at import"),
    "exits": ("import sys\nsys.exit(0)\n", "importing the module called sys.exit(0)"),
    "misspelt_hook": (
        "from cleanai_core import hookimpl\n\n@hookimpl\ndef cleanai_layer_prunr(module, name, findings):\n"
        "    return None\n",
        "unknown hook 'cleanai_layer_prunr'",
    ),
}


@pytest.mark.parametrize("kind", list(PLUGINS))
def test_a_plugin_module_that_fails_at_import_is_exit_2_naming_it(tmp_path, monkeypatch, capsys, kind):
    # raises: a traceback, exit 1; exits: exit code 0 and nothing done, nothing said
    from cleanai_plugins.io.demo import DigitsCNN

    source, said = PLUGINS[kind]
    (tmp_path / f"faults11_{kind}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(DigitsCNN().state_dict(), "w.pt")
    torch.save((X, Y), "d.pt")
    argv = ["--plugin", f"faults11_{kind}", "prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "-q"]
    assert main([*argv, "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert f"--plugin faults11_{kind}: " in err and said in err, err
    assert not (tmp_path / "o").exists()


def test_a_built_in_given_as_plugin_is_named_without_the_plugin_table(capsys):
    # pluggy's "Plugin name already registered: ... {every plugin: its module}" (thousands of characters)
    assert main(["--plugin", "cleanai_plugins.layers.conv", "plugins"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "cleanai: error: --plugin cleanai_plugins.layers.conv: the module is registered already (a built-in plugin, "
        "an installed one, or given twice); leave --plugin cleanai_plugins.layers.conv out."
    )


# -- a history padded with steps that slice nothing ----------------------------------------------------


def test_steps_that_slice_nothing_are_not_replayed(tmp_path, monkeypatch):
    # each replayed step scans the whole model: 2,000 empty steps added to a history.json took 17 s to load
    # (10**6, a 4 MB file: hours); PruningHistory.replay alike
    import json

    import cleanai_core.history as history_module
    import cleanai_core.saved_folder as saved_folder
    from cleanai_core import PruningHistory, StructuredPruner
    from cleanai_core.io import load_pruned, save_pruned
    from cleanai_plugins.io.demo import MODEL_SPEC, DigitsCNN

    torch.manual_seed(0)
    pruner = StructuredPruner(DigitsCNN().eval(), X[:1], "magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    save_pruned(tmp_path / "o", pruned, pruner.history, MODEL_SPEC)
    h = json.loads((tmp_path / "o" / "history.json").read_text())
    h["steps"] += [[]] * 2000
    (tmp_path / "o" / "history.json").write_text(json.dumps(h))
    calls = []
    for module in (saved_folder, history_module):
        real = module.apply_edits
        monkeypatch.setattr(
            module, "apply_edits", lambda m, step, pm=None, real=real: calls.append(1) or real(m, step, pm)
        )
    loaded = load_pruned(tmp_path / "o")
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))
    assert len(calls) == 2  # the one real step, on the meta device and for real (2,002 before)
    torch.manual_seed(0)
    replayed = PruningHistory.load(tmp_path / "o" / "history.json").replay(DigitsCNN())
    assert len(calls) == 3 and [p.shape for p in replayed.parameters()] == [p.shape for p in pruned.parameters()]
