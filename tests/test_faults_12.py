"""Twelfth round of bad input and faults (docs/reliability.md, "Session 21b: faults"):
options that contradict each other or that the job (or the model) would leave unread, and
the cases below each heading."""

from __future__ import annotations

import json

import pytest
import torch

from cleanai_core.cli import main
from cleanai_core.errors import UserError

DEMO = "cleanai_plugins.io.demo:DigitsCNN"
Y = torch.arange(40) % 10


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A folder holding DigitsCNN weights ``w.pt`` and data ``d.pt``; the arguments of a
    ``cleanai prune`` of them to ``o``."""
    from cleanai_plugins.io.demo import DigitsCNN

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(DigitsCNN().state_dict(), "w.pt")
    torch.save((torch.rand(40, 1, 8, 8), Y), "d.pt")  # some units of the random network never activate
    return ["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--out", "o", "-q"]


def _report(folder) -> dict:
    return json.loads((folder / "report.json").read_text())


# -- options the job leaves unread ---------------------------------------------------------------------


@pytest.mark.parametrize("option", [["--covariance-rows", "5"], ["--stats-budget-mib", "5"]])
def test_reconstructions_options_beside_no_bias_compensation_are_refused(job, tmp_path, capsys, option):
    # reconstruction folds into the bias compensation (StructuredPruner: reconstruction and
    # bias_compensation), so --no-bias-compensation turned it off and the option was ignored (exit 0)
    assert main([*job, "--no-bias-compensation", *option]) == 2
    err = capsys.readouterr().err
    assert f"{option[0]} (command line)" in err and "which --no-bias-compensation turns off" in err
    assert not (tmp_path / "o").exists()
    # the default's value (a config.json holds every option) is read as not given
    assert main([*job, "--no-bias-compensation", "--covariance-rows", "256"]) == 0


@pytest.mark.parametrize("option", [["--global"], ["--round-to", "8"], ["--global", "--isomorphic"]])
def test_prune_dead_only_refuses_a_ranking_or_rounding_it_would_ignore(job, tmp_path, capsys, option):
    # --prune-dead-only --round-to 8 removed the same 3,182 parameters as --prune-dead-only (exit 0)
    assert main([*job, "--prune-dead-only", *option]) == 2
    assert "--prune-dead-only removes exactly the units that never activate, so --" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_library_refuses_prune_dead_only_with_global_ranking_or_rounding():
    from cleanai_core.pruner import StructuredPruner
    from cleanai_plugins.io.demo import DigitsCNN

    for kwargs in ({"global_pruning": True}, {"round_to": 8}):
        with pytest.raises(UserError, match="global_pruning and round_to do not apply"):
            StructuredPruner(DigitsCNN(), torch.rand(1, 1, 8, 8), prune_dead_only=True, **kwargs)
    for round_to in ("auto", None, 1):  # the device's default, or no rounding
        pruner = StructuredPruner(DigitsCNN(), torch.rand(1, 1, 8, 8), prune_dead_only=True, round_to=round_to)
        assert pruner.prune_dead_only and not pruner.global_pruning


@pytest.mark.parametrize("preset", [[], ["--preset", "aggressive"]])
def test_the_config_json_of_a_prune_dead_only_run_reruns_it(job, tmp_path, capsys, preset):
    # config.json holds every option: its default ratio 0.3 (or the preset's ratio, global ranking and
    # round-to 8) made the rerun exit 2, "--ratio (config file) does not apply"
    assert main([*job, "--prune-dead-only", *preset]) == 0
    first = _report(tmp_path / "o")
    assert main(["prune", "--config", "o/config.json", "--out", "again", "-q"]) == 0, capsys.readouterr().err
    again = _report(tmp_path / "again")
    assert again["params_after"] == first["params_after"] < first["params_before"] == 56554
    assert [la["pruned_indices"] for la in again["layers"]] == [la["pruned_indices"] for la in first["layers"]]
    (tmp_path / "r.toml").write_text("prune-dead-only = true\nratio = 0.4\n")  # a ratio the file asks for
    assert main([*job[:-3], "--out", "o3", "-q", "--config", "r.toml"]) == 2
    assert "so --ratio (config file) does not apply" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option",
    [
        ["--recover-epochs", "1"],
        ["--save-pickle"],
        ["--prune-dead-only"],
        ["--ratio", "0.5"],
        ["--target-flops", "0.5"],
    ],
)
def test_cleanai_sensitivity_refuses_what_only_a_pruned_model_reads(job, tmp_path, capsys, caplog, option):
    # exit 0 with sensitivity.svg and the report: no recovery ran, no pickle, nothing pruned, no ratio or target
    # read (a target is, with --auto)
    args = ["sensitivity", *job[1:]]
    assert main([*args, *option]) == 2
    assert f"{option[0]} (command line) is " in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "s.toml").write_text(f"{option[0][2:]} = {option[1] if len(option) > 1 else 'true'}\n")
    assert main([*args[:-3], "--out", "o2", "-q", "--config", "s.toml"]) == 0  # a file serving prune runs too
    assert f"{option[0]} (config file) is " in caplog.text and "cleanai sensitivity" in caplog.text
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == [
        "config.json", "report.json", "report.md", "sensitivity.svg"]  # fmt: skip


# -- options the model leaves unread ------------------------------------------------------------------


def test_bn_samples_for_a_model_without_batchnorm_is_refused(job, tmp_path, monkeypatch, capsys, caplog):
    (tmp_path / "nobn.py").write_text(
        "import torch.nn as nn\n\n"
        "def mlp():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["prune", "--model", "nobn:mlp", "--data", "d.pt", "-q"]
    # nothing to correct: the option was ignored without a word (exit 0)
    assert main([*args, "--out", "o", "--bn-samples", "5"]) == 2
    err = capsys.readouterr().err
    assert "--bn-samples (command line) is read by the BatchNorm correction, and --model 'nobn:mlp' has no norm" in err
    assert not (tmp_path / "o").exists()
    (tmp_path / "b.toml").write_text("bn-samples = 5\n")  # a file serving many runs: a warning
    assert main([*args, "--out", "o2", "--config", "b.toml"]) == 0
    assert "--bn-samples (config file) is read by the BatchNorm correction" in caplog.text
    assert main([*job, "--bn-samples", "5"]) == 0  # DigitsCNN has BatchNorm: read


# -- image folders -------------------------------------------------------------------------------------


def _images(root, classes, n=2):
    from PIL import Image

    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("L", (8, 8), color=(k * 20 + i) % 256).save(root / c / f"{i}.png")


def test_hidden_folders_and_files_in_an_image_folder_are_no_class_and_no_image(tmp_path):
    from cleanai_plugins.io.datasets import load_dataset

    _images(tmp_path / "imgs", [str(k) for k in range(10)])
    plain = load_dataset(str(tmp_path / "imgs"), {})
    # Jupyter's checkpoints folder was class 0, every real label one higher ("labels go from 1 to 10"), and
    # a macOS resource fork '._0.png' (not an image) stopped the run
    _images(tmp_path / "imgs", [".ipynb_checkpoints"])
    (tmp_path / "imgs" / "3" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    ds = load_dataset(str(tmp_path / "imgs"), {})
    assert ds.classes == [str(k) for k in range(10)] == plain.classes
    assert [y for _, y in ds.samples] == [k for k in range(10) for _ in range(2)] == [y for _, y in plain.samples]
    assert all(torch.equal(ds[i][0], plain[i][0]) for i in range(len(plain)))
    (tmp_path / "only").mkdir()
    _images(tmp_path / "only", [".hidden"])
    with pytest.raises(UserError, match="has no class sub-folders but hidden ones"):
        load_dataset(str(tmp_path / "only"), {})


def test_an_empty_class_folder_is_named_with_what_its_removal_does(tmp_path):
    from cleanai_plugins.io.datasets import load_dataset

    _images(tmp_path / "imgs", ["a", "b"])
    (tmp_path / "imgs" / "c").mkdir()
    (tmp_path / "imgs" / "c" / "notes.txt").write_text("not an image")
    # said torchvision's "Found no valid file for the classes c." and nothing of the fix
    with pytest.raises(UserError, match=r"the class folder\(s\) 'c' hold no image \(\.jpg.*labels 0\.\.2: add images"):
        load_dataset(str(tmp_path / "imgs"), {})
