"""``cleanai prune --recover-epochs``: the report tells the recovery story (issue 17)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from digits_setup import splits, trained_cnn

from cleanai_core.cli import main
from cleanai_core.io import load_pruned

FAST = ["--threads", "1", "--latency-repeats", "2", "--quiet", "--target-flops", "0.25", "--ignore", "fc"]


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A width-8 DigitsCNN behind a factory module, its weights, test data (calibration +
    evaluation splits) and separate training data, all in ``tmp_path`` (the cwd)."""
    (tmp_path / "tiny_digits.py").write_text(
        "from cleanai_plugins.io.demo import DigitsCNN\n\ndef model():\n    return DigitsCNN(width=8)\n"
    )
    torch.save(trained_cnn().state_dict(), tmp_path / "w.pt")
    train_d, cal_d, eval_d = splits()
    np.savez(
        tmp_path / "test.npz", x=torch.cat([cal_d[0], eval_d[0]]).numpy(), y=torch.cat([cal_d[1], eval_d[1]]).numpy()
    )
    np.savez(tmp_path / "train.npz", x=train_d[0].numpy(), y=train_d[1].numpy())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CLEANAI_DISABLE_PLUGIN_AUTOLOAD", "1")
    return tmp_path


def _prune(*extra: str) -> int:
    base = ["prune", "--model", "tiny_digits:model", "--weights", "w.pt", "--data", "test.npz", "--out", "o"]
    return main([*base, *FAST, *extra])


@pytest.mark.slow  # trains the shared digits CNN, then prunes and recovers through the CLI (~10 s)
def test_recovery_with_train_data_reports_original_pruned_and_recovered_accuracy(inputs, capsys):
    rc = _prune("--recover-epochs", "3", "--train-data", "train.npz", "--recover-lr", "3e-3")
    assert rc == 0, capsys.readouterr().err
    report = json.loads((inputs / "o" / "report.json").read_text())
    rec = report["recovery"]
    assert rec["accuracy_original"] == report["accuracy_before"]
    assert rec["accuracy_recovered"] == report["accuracy_after"] > rec["accuracy_pruned"] + 0.1
    expected_gap = (rec["accuracy_recovered"] - rec["accuracy_pruned"]) / (
        rec["accuracy_original"] - rec["accuracy_pruned"]
    )
    assert rec["gap_recovered"] == pytest.approx(expected_gap)
    assert rec["epochs"] == len(rec["history"]) == len(rec["train_loss"]) <= 3 and rec["seconds"] > 0
    assert rec["train_samples"] == 900 and rec["held_out_samples"] == 100 and "train.npz" in rec["training_data"]
    md = (inputs / "o" / "report.md").read_text()
    assert "## Recovery" in md and "right after pruning" in md and "gap recovered" in md
    assert len(rec["held_out_loss"]) == rec["epochs"] and rec["initial_loss"] > 0
    assert (
        f"| {rec['epochs']} | {rec['train_loss'][-1]:.4f} | {rec['history'][-1]:.4f} | {rec['held_out_loss'][-1]:.4f} |"
        in md
    )
    assert (inputs / "o" / report["recovery_plot"]).stat().st_size > 500
    assert "Recovery: accuracy" in capsys.readouterr().out
    # the saved model is the recovered one: its accuracy on the CLI's evaluation split is the report's
    model = load_pruned(inputs / "o", trust_code=True)  # the test's own factory module
    x, y = torch.tensor(np.load("test.npz")["x"]), torch.tensor(np.load("test.npz")["y"])
    n_cal = report["calibration_samples"]
    assert n_cal + report["evaluation_samples"] == 797
    ev = torch.randperm(797, generator=torch.Generator().manual_seed(0))[n_cal:]
    with torch.no_grad():
        assert float((model(x[ev]).argmax(1) == y[ev]).float().mean()) == pytest.approx(rec["accuracy_recovered"])


def test_recovery_without_train_data_trains_on_the_calibration_part_only(inputs, capsys):
    rc = _prune("--recover-epochs", "1")
    assert rc == 0, capsys.readouterr().err
    report = json.loads((inputs / "o" / "report.json").read_text())
    rec = report["recovery"]
    assert rec["train_samples"] + rec["held_out_samples"] == report["calibration_samples"] == 398
    assert "calibration samples of --data" in rec["training_data"] and "never on the held-out" in rec["training_data"]


@pytest.mark.parametrize(("flag", "value"), [("--recover-epochs", "-1"), ("--recover-lr", "-0.001")])
def test_bad_recovery_options_are_refused(inputs, capsys, flag, value):
    assert _prune(flag, value) == 2
    assert flag in capsys.readouterr().err


def test_recovery_on_unlabelled_data_distils_and_reports_agreement_with_the_original(inputs, capsys):
    np.savez(inputs / "unl.npz", x=np.load("test.npz")["x"])
    base = ["prune", "--model", "tiny_digits:model", "--weights", "w.pt", "--data", "unl.npz", "--out", "o"]
    assert main([*base, *FAST, "--recover-epochs", "2"]) == 0
    rec = json.loads((inputs / "o" / "report.json").read_text())["recovery"]
    assert rec["metric"] == "teacher_agreement" and rec["accuracy_recovered"] is None and rec["gap_recovered"] is None
    assert rec["best"] > rec["initial"]  # the pruned model agrees more with the original after distillation
    assert "no labels" in (inputs / "o" / "report.md").read_text()
    assert "Recovery: held-out teacher_agreement" in capsys.readouterr().out


def _strict(text: str):
    """JSON as strict parsers (jq, JavaScript) read it: NaN / Infinity are refused."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"report.json holds {c}, which is not JSON"))


def test_a_diverging_recovery_says_so_keeps_the_pruned_model_and_writes_strict_json(inputs, capsys):
    rc = _prune("--recover-epochs", "3", "--train-data", "train.npz", "--recover-lr", "1e4")
    assert rc == 0, capsys.readouterr().err
    report = _strict((inputs / "o" / "report.json").read_text())  # before: "train_loss": [NaN, NaN, NaN]
    rec = report["recovery"]
    assert rec["diverged"] and rec["stopped_early"] and rec["epochs"] == 1 and rec["train_loss"] == [None]
    assert rec["best_epoch"] == 0 and rec["accuracy_recovered"] == rec["accuracy_pruned"] == report["accuracy_after"]
    md = (inputs / "o" / "report.md").read_text()
    assert "the training loss became NaN or inf" in md and "no better held-out result" not in md
    assert "| 1 | NaN/inf |" in md
    assert "stopped at a NaN/inf training loss: lower --recover-lr" in capsys.readouterr().out


def test_train_data_without_recover_epochs_is_refused(inputs, capsys):
    assert _prune("--train-data", "train.npz") == 2  # before: exit 0, the training data read by nothing
    assert "--train-data is read only for recovery: add --recover-epochs N" in capsys.readouterr().err
    assert not (inputs / "o").exists()
