"""The bad-input catalogue of docs/reliability.md, through the CLI (in-process).

Each case: a clear message naming the problem, a non-zero exit code, and nothing
written or changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from cleanai_core.cli import main

DEMO = "cleanai_plugins.io.demo:DigitsCNN"


def tiny_linear() -> nn.Module:
    """Nothing prunable: the only layer's inputs are the model input, its outputs the output."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def dict_of_strings() -> nn.Module:
    class Strange(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            self.conv(x)
            return {"label": "cat"}

    return Strange()


@pytest.fixture()
def ws(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    torch.save((x, y), tmp_path / "data.pt")
    torch.save((x[:0], y[:0]), tmp_path / "empty.pt")
    torch.save((torch.rand(16, 3, 8, 8), y), tmp_path / "wrongshape.pt")
    torch.save((x, y + 100), tmp_path / "badlabels.pt")
    nan = x.clone()
    nan[3, 0, 2, 2] = float("nan")
    torch.save((nan, y), tmp_path / "nan.pt")
    from cleanai_plugins.io.demo import DigitsCNN

    torch.save(DigitsCNN().state_dict(), tmp_path / "weights.pt")
    raw = (tmp_path / "weights.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 3])
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 100)
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "otherweights.pt")
    (tmp_path / "bad.toml").write_text("ratio = = 0.3\n")
    (tmp_path / "notes.txt").write_text("hello")
    torch.save((x.to("meta"), y), tmp_path / "meta.pt")
    torch.save((x.to(torch.complex64), y), tmp_path / "complex.pt")
    state = DigitsCNN().state_dict()
    torch.save({k: v.to("meta") for k, v in state.items()}, tmp_path / "metaweights.pt")
    torch.save({k: v.to_sparse() if v.dim() > 1 else v for k, v in state.items()}, tmp_path / "sparseweights.pt")
    torch.save(DigitsCNN(), tmp_path / "pickled.pt")
    (tmp_path / "latin1.toml").write_bytes("ratio = 0.3 # caf\xe9\n".encode("latin-1"))
    (tmp_path / "strbool.toml").write_text("overwrite = 'false'\n")
    return tmp_path


def _digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


CASES = [
    ("missing model file", ["--model", "nope.pt", "--data", "data.pt"], "nope.pt"),
    ("truncated checkpoint", ["--model", DEMO, "--weights", "truncated.pt", "--data", "data.pt"], "truncated.pt"),
    ("corrupt checkpoint", ["--model", DEMO, "--weights", "corrupt.pt", "--data", "data.pt"], "corrupt.pt"),
    ("weights of another model", ["--model", DEMO, "--weights", "otherweights.pt", "--data", "data.pt"], "fit"),
    ("wrong model format", ["--model", "notes.txt", "--data", "data.pt"], "not a file written by torch.save"),
    ("unknown architecture", ["--model", "torchvision:no_such_net", "--data", "data.pt"], "no_such_net"),
    ("unknown factory", ["--model", "no_pkg.mod:factory", "--data", "data.pt"], "no_pkg.mod"),
    ("empty dataset", ["--model", DEMO, "--data", "empty.pt"], "empty"),
    ("data does not fit the model", ["--model", DEMO, "--data", "wrongshape.pt"], "input"),
    ("labels out of range", ["--model", DEMO, "--data", "badlabels.pt"], "label"),
    ("NaN in the data", ["--model", DEMO, "--data", "nan.pt"], "NaN"),
    ("unknown importance", ["--model", DEMO, "--data", "data.pt", "--importance", "nope"], "unknown importance"),
    ("ratio zero", ["--model", DEMO, "--data", "data.pt", "--ratio", "0"], "ratio"),
    ("every layer ignored", ["--model", DEMO, "--data", "data.pt", "--ignore", "*"], "nothing in this model"),
    ("nothing prunable", ["--model", f"{__name__}:tiny_linear", "--data", "data.pt"], "nothing in this model"),
    ("output is not a tensor", ["--model", f"{__name__}:dict_of_strings", "--data", "data.pt"], "output"),
    ("malformed config", ["--model", DEMO, "--data", "data.pt", "--config", "bad.toml"], "not valid TOML"),
    ("missing config", ["--model", DEMO, "--data", "data.pt", "--config", "none.toml"], "none.toml"),
    ("layer pattern matches nothing", ["--model", DEMO, "--data", "data.pt", "--layer-ratio", "zzz=0.5"], "zzz"),
    ("data on the meta device", ["--model", DEMO, "--data", "meta.pt"], "meta device"),
    ("complex data", ["--model", DEMO, "--data", "complex.pt"], "give real numbers"),
    ("weights on the meta device", ["--model", DEMO, "--weights", "metaweights.pt", "--data", "data.pt"], "meta"),
    ("sparse weights", ["--model", DEMO, "--weights", "sparseweights.pt", "--data", "data.pt"], "sparse"),
    ("pickled model as --weights", ["--model", DEMO, "--weights", "pickled.pt", "--data", "data.pt"], "--trust-model"),
    ("plain data as --model", ["--model", "data.pt", "--data", "data.pt"], "not a model"),
    ("a state_dict as --data", ["--model", DEMO, "--data", "weights.pt"], "pass it as --weights"),
    ("config not UTF-8", ["--model", DEMO, "--data", "data.pt", "--config", "latin1.toml"], "not UTF-8"),
    ("switch as text in a config", ["--model", DEMO, "--data", "data.pt", "--config", "strbool.toml"], "true or false"),
    ("path too long", ["--model", DEMO, "--data", "y" * 300 + ".pt"], "File name too long"),
    ("seed out of range", ["--model", DEMO, "--data", "data.pt", "--seed", "9" * 25], "--seed"),
    ("too many threads", ["--model", DEMO, "--data", "data.pt", "--threads", "100000"], "--threads=100000"),
    ("device meta", ["--model", DEMO, "--data", "data.pt", "--device", "meta"], "--device meta"),
    ("empty layer pattern", ["--model", DEMO, "--data", "data.pt", "--ignore", ""], "empty layer pattern"),
    ("infinite alpha", ["--model", DEMO, "--data", "data.pt", "--alpha", "inf"], "not a finite number"),
]


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_catalogued_bad_input(ws, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(ws)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    before = _digest(ws)
    rc = main(["prune", *argv, "--out", "out", "--quiet", "--latency-repeats", "1"])
    err = capsys.readouterr().err
    assert rc in (1, 2), err
    assert message.lower() in err.lower(), err
    assert "Traceback" not in err
    assert not (ws / "out").exists()
    assert _digest(ws) == before


def test_catalogue_is_documented():
    doc = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    for name, *_ in CASES:
        assert name in doc, name


if os.environ.get("CLEANAI_PRINT_CATALOGUE"):  # helper for keeping docs/reliability.md current
    print("\n".join(c[0] for c in CASES))
