"""Bad or unusual data on the command line: labels that are not class indices, malformed
.npz files, Ctrl-C during start-up (docs/reliability.md). Every case either works with a
stated reading of the data, or exits non-zero with a message naming the problem and the fix."""

from __future__ import annotations

import io
import json
import re
import zipfile

import numpy as np
import pytest
import torch

from cleanai_core import cli as cli_pkg
from cleanai_core.cli import main
from cleanai_plugins.io.demo import MODEL_SPEC

N = 24


@pytest.fixture()
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(N, 1, 8, 8, generator=g), torch.randint(0, 10, (N,), generator=g)


def prune(data_file: str, out: str = "out") -> int:
    return main(
        ["prune", "--model", MODEL_SPEC, "--data", data_file, "--out", out, "--quiet", "--latency-repeats", "1"]
    )


def report(ws, out: str = "out") -> dict:
    return json.loads((ws / out / "report.json").read_text())


def test_one_hot_and_whole_number_float_labels_give_the_same_accuracy_as_indices(ws, data, capsys):
    x, y = data
    torch.save((x, y), ws / "int.pt")
    torch.save((x, torch.nn.functional.one_hot(y, 10).float()), ws / "onehot.pt")
    torch.save((x, y.double()), ws / "float.pt")
    np.savez(ws / "onehot.npz", x=x.numpy(), y=np.eye(10, dtype=np.uint8)[y.numpy()])
    accs = {}
    for name in ("int.pt", "onehot.pt", "float.pt", "onehot.npz"):
        assert prune(name, out=name + ".out") == 0, capsys.readouterr().err
        r = report(ws, name + ".out")
        accs[name] = (r["accuracy_before"], r["accuracy_after"])
        assert r["accuracy_note"] is None
    assert accs["int.pt"][0] is not None
    assert len(set(accs.values())) == 1, accs


@pytest.mark.parametrize(
    ("labels", "why"),
    [
        (lambda y: y.float() + 0.5, "fractional"),
        (lambda y: torch.rand(len(y), 3), "fractional"),
        (lambda y: torch.stack([y, y], 1), "several columns"),
    ],
    ids=["fractional floats", "soft labels", "two integer columns"],
)
def test_labels_that_are_not_class_indices_say_why_accuracy_is_absent(ws, data, capsys, labels, why):
    x, y = data
    torch.save((x, labels(y)), ws / "d.pt")
    assert prune("d.pt") == 0
    out = capsys.readouterr().out
    r = report(ws)
    assert r["accuracy_before"] is None and r["accuracy_after"] is None
    assert "not class indices" in r["accuracy_note"] and why in r["accuracy_note"]
    assert "Accuracy not measured: the labels are not class indices" in out
    assert "accuracy not measured" in (ws / "out" / "report.md").read_text()


def test_unlabelled_data_says_why_accuracy_is_absent(ws, data, capsys):
    torch.save(data[0], ws / "x.pt")
    assert prune("x.pt") == 0
    assert report(ws)["accuracy_note"] == "the data has no labels"
    assert "Accuracy not measured: the data has no labels." in capsys.readouterr().out


def _npz_with(ws, name: str, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(ws / name, "w") as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    return name


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _truncated(ws, x, y) -> str:
    np.savez(ws / "d.npz", x=x.numpy(), y=y.numpy())
    (ws / "d.npz").write_bytes((ws / "d.npz").read_bytes()[:300])
    return "d.npz"


BAD_DATA = {
    "text labels in a .pt": (lambda ws, x, y: torch.save((x, [str(int(v)) for v in y]), ws / "d.pt") or "d.pt", "text"),
    "text labels in an .npz": (
        lambda ws, x, y: np.savez(ws / "d.npz", x=x.numpy(), y=np.array(["cat"] * len(y))) or "d.npz",
        "text",
    ),
    "object array (pickle) in an .npz": (
        lambda ws, x, y: (
            np.savez(ws / "d.npz", x=x.numpy(), y=np.array([1, "a"] * (len(y) // 2), dtype=object)) or "d.npz"
        ),
        "never unpickles",
    ),
    "no x array": (lambda ws, x, y: np.savez(ws / "d.npz", inputs=x.numpy()) or "d.npz", "needs 'x'"),
    "empty zip": (lambda ws, x, y: _npz_with(ws, "d.npz", {}), "needs 'x'"),
    "truncated .npz": (_truncated, "not a valid .npz"),
    "array not .npy": (lambda ws, x, y: _npz_with(ws, "d.npz", {"x.npy": b"hello"}), "not in .npy format"),
    "header cut short": (lambda ws, x, y: _npz_with(ws, "d.npz", {"x.npy": _npy(x.numpy())[:30]}), "damaged"),
    "data shorter than its shape": (
        lambda ws, x, y: _npz_with(ws, "d.npz", {"x.npy": _npy(x.numpy())[:400]}),
        "damaged",
    ),
    "header without shape": (
        lambda ws, x, y: _npz_with(ws, "d.npz", {"x.npy": b"\x93NUMPY\x01\x00\x20\x00{'descr': '<f4'}" + b" " * 16}),
        "damaged",
    ),
    "complex numbers": (lambda ws, x, y: np.savez(ws / "d.npz", x=x.numpy().astype(np.complex64)) or "d.npz", "dtype"),
    "a scalar x": (lambda ws, x, y: np.savez(ws / "d.npz", x=np.float32(3.0)) or "d.npz", "single number"),
    "a scalar y": (lambda ws, x, y: torch.save((x, torch.tensor(3)), ws / "d.pt") or "d.pt", "single number"),
    "labels of another length": (
        lambda ws, x, y: np.savez(ws / "d.npz", x=x.numpy(), y=y[:5].numpy()) or "d.npz",
        "labels",
    ),
    "structured array": (
        lambda ws, x, y: np.savez(ws / "d.npz", x=np.zeros(len(y), dtype=[("a", "f4"), ("b", "i4")])) or "d.npz",
        "structured dtype (fields ['a', 'b'])",
    ),
    "big-endian array": (
        lambda ws, x, y: np.savez(ws / "d.npz", x=x.numpy().astype(">f4")) or "d.npz",
        "big-endian dtype '>f4'",
    ),
    "uint64 labels of 2**63 or more": (
        lambda ws, x, y: np.savez(ws / "d.npz", x=x.numpy(), y=np.full(len(y), 2**63, np.uint64)) or "d.npz",
        "2**63",
    ),
    "inputs on the meta device": (lambda ws, x, y: torch.save((x.to("meta"), y), ws / "d.pt") or "d.pt", "meta"),
    "labels on the meta device": (lambda ws, x, y: torch.save((x, y.to("meta")), ws / "d.pt") or "d.pt", "meta"),
    "complex inputs in a .pt": (
        lambda ws, x, y: torch.save((x.to(torch.complex64), y), ws / "d.pt") or "d.pt",
        "complex64 numbers",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_malformed_data_is_a_user_error_naming_the_problem(ws, data, capsys, case):
    make, message = BAD_DATA[case]
    name = make(ws, *data)
    rc = prune(name)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (ws / "out").exists()


def test_ctrl_c_during_start_up_imports_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(name, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_pkg.importlib, "import_module", interrupted)
    assert main(["prune", "--model", "x", "--data", "y"]) == 130
    err = capsys.readouterr().err
    assert err == "cleanai prune: interrupted; nothing was written.\n"


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_unsigned_labels_in_an_npz_give_the_accuracy_of_int64_labels(ws, data, capsys, dtype):
    x, y = data
    np.savez(ws / "int.npz", x=x.numpy(), y=y.numpy())
    np.savez(ws / "u.npz", x=x.numpy(), y=y.numpy().astype(dtype))
    assert prune("int.npz", out="a") == 0, capsys.readouterr().err
    assert prune("u.npz", out="b") == 0, capsys.readouterr().err
    assert report(ws, "a")["accuracy_before"] == report(ws, "b")["accuracy_before"] is not None


def test_sparse_inputs_are_read_as_dense(ws, data, capsys):
    x, y = data
    torch.save((x, y), ws / "dense.pt")
    torch.save((x.to_sparse(), y), ws / "sparse.pt")
    assert prune("dense.pt", out="a") == 0, capsys.readouterr().err
    assert prune("sparse.pt", out="b") == 0, capsys.readouterr().err
    assert report(ws, "a")["accuracy_before"] == report(ws, "b")["accuracy_before"]


def test_an_unreadable_image_in_an_image_folder_names_the_file(ws, capsys):
    pytest.importorskip("torchvision")
    pytest.importorskip("PIL")
    from PIL import Image

    for cls in ("a", "b"):
        (ws / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), color=40 * i).save(ws / "imgs" / cls / f"{i}.png")
    (ws / "imgs" / "b" / "9.png").write_bytes(b"not an image")
    before = {p: p.read_bytes() for p in (ws / "imgs").rglob("*.png")}
    argv = ["--model", "torchvision:resnet18", "--num-classes", "2", "--data", "imgs", "--image-size", "32"]
    rc = main(["prune", *argv, "--out", "out", "--quiet", "--latency-repeats", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "cannot read image 'imgs/b/9.png' in --data 'imgs'" in err and "remove or replace the file" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (ws / "out").exists()
    assert {p: p.read_bytes() for p in (ws / "imgs").rglob("*.png")} == before


@pytest.mark.parametrize("options", [["--round-to", "1000"], ["--ratio", "0.01"]])
def test_a_run_that_would_remove_nothing_fails_and_writes_nothing(ws, data, capsys, options):
    # before: exit 0 and an "pruned" model identical to the input, the headline saying +0.0%
    torch.save(data, ws / "d.pt")
    argv = ["prune", "--model", MODEL_SPEC, "--data", "d.pt", "--out", "out", "--quiet", *options]
    assert main(argv) == 2
    assert "the plan removes no unit" in capsys.readouterr().err
    assert not (ws / "out").exists()


def _write_module(ws, text: str) -> None:
    (ws / "faultmods.py").write_text(text)


FAULT_MODULES = """
import torch
from torch.utils.data import Dataset
from cleanai_plugins.io.demo import DigitsCNN


class Mixed(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        s = 8 if i % 2 else 6
        return torch.rand(1, s, s), i % 10


class NegativeLength(Mixed):
    def __len__(self):
        return -1


def mixed():
    return Mixed()


def negative_length():
    return NegativeLength()


def half():
    return DigitsCNN().half()


def bfloat16():
    return DigitsCNN().to(torch.bfloat16)
"""


@pytest.mark.parametrize(
    ("data_spec", "words"),
    [
        ("faultmods:mixed", r"cannot be put in one batch \(shapes \(1, 6, 6\), \(1, 8, 8\)\)"),
        ("faultmods:negative_length", r"len\(\) of the data set failed \(ValueError"),
    ],
)
def test_a_data_set_whose_items_cannot_be_batched_or_counted_is_named(ws, capsys, monkeypatch, data_spec, words):
    # before: a RuntimeError traceback from torch.stack inside the DataLoader / a ValueError from len()
    _write_module(ws, FAULT_MODULES)
    monkeypatch.syspath_prepend(str(ws))
    argv = ["prune", "--model", MODEL_SPEC, "--data", data_spec, "--out", "out", "--quiet"]
    assert main(argv) == 2
    assert re.search(words, capsys.readouterr().err)
    assert not (ws / "out").exists()


@pytest.mark.parametrize("factory", ["half", "bfloat16"])
def test_a_half_precision_model_prunes_on_float32_data(ws, data, monkeypatch, factory):
    # before: exit 2, "the model failed on an input from --data: expected scalar type Float but found Half"
    _write_module(ws, FAULT_MODULES)
    monkeypatch.syspath_prepend(str(ws))
    torch.save(data, ws / "d.pt")
    argv = ["prune", "--model", f"faultmods:{factory}", "--data", "d.pt", "--out", "out", "--quiet"]
    assert main([*argv, "--latency-repeats", "1"]) == 0
    rep = report(ws)
    assert rep["params_after"] < rep["params_before"]
    assert rep["accuracy_after"] is not None
    state = torch.load(ws / "out" / "model.pt", weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {
        getattr(torch, "float16" if factory == "half" else factory)
    }


def test_a_column_of_labels_is_read_as_class_indices(ws, data, capsys):
    # before: (N, 1) labels were "several columns that are not one-hot" (no accuracy), and a column
    # of ones passed as one-hot rows of a single class: every label read as class 0
    from cleanai_plugins.io.datasets import label_indices

    x, y = data
    torch.save((x, y), ws / "int.pt")
    torch.save((x, y[:, None]), ws / "column.pt")
    accs = []
    for name in ("int.pt", "column.pt"):
        assert prune(name, out=name + ".out") == 0, capsys.readouterr().err
        r = report(ws, name + ".out")
        assert r["accuracy_note"] is None
        accs.append((r["accuracy_before"], r["accuracy_after"]))
    assert accs[0] == accs[1]
    assert label_indices(torch.ones(4, 1, dtype=torch.long)).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize(("content", "words"), [(b"", "is empty (0 bytes)"), (None, "may be truncated or damaged")])
def test_an_empty_or_truncated_data_file_says_so(ws, data, capsys, content, words):
    # before: "cannot read 'd.pt' safely (EOFError: )" / "(OSError: [Errno 22] Invalid argument)"
    torch.save(data, ws / "full.pt")
    raw = (ws / "full.pt").read_bytes()
    (ws / "d.pt").write_bytes(raw[: len(raw) // 2] if content is None else content)
    assert prune("d.pt") == 2
    assert words in capsys.readouterr().err
    assert not (ws / "out").exists()


def test_data_that_is_all_inf_names_the_data_not_example_inputs(ws, data, capsys):
    # before: "example_inputs contain NaN or inf values", an argument the command line does not have
    x, y = data
    np.savez(ws / "inf.npz", x=np.full(tuple(x.shape), np.inf, np.float32), y=y.numpy())
    assert prune("inf.npz") == 2
    err = capsys.readouterr().err
    assert "--data 'inf.npz' contains NaN or inf values" in err and "example_inputs" not in err
    assert not (ws / "out").exists()
