"""Nineteenth round of bad input and faults (docs/reliability.md, "Session 26: faults19"): the
command line's options given as '', the gradual pruner's batch count, tampered saved folders,
recovery on too little data, and the cases below each heading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_faults_16
import torch

from cleanai_core import GradualPruner, PruningSchedule, StructuredPruner
from cleanai_core.cli import main
from cleanai_core.errors import UserError
from cleanai_plugins.io.demo import DigitsCNN

DEMO = test_faults_16.DEMO
ws = test_faults_16.ws  # the fixture: the demo's weights and 24 samples in a fresh current folder


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


# -- an option naming a path, given as '' ----------------------------------------------------------------


@pytest.mark.parametrize(
    "command, extra, flag",
    [
        ("prune", ["--weights", ""], "--weights"),  # pruned the factory's random weights, exit 0
        ("prune", ["--config", ""], "--config"),  # read as no config file
        ("prune", ["--recover-epochs", "1", "--train-data", ""], "--train-data"),  # trained on --data instead
        ("prune", ["--out", ""], "--out"),  # "--out is required" though it was given
        ("sensitivity", ["--weights", ""], "--weights"),
    ],
)
def test_a_path_option_given_as_the_empty_string_is_refused_not_read_as_absent(ws, capsys, command, extra, flag):
    base = ["--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--quiet"]
    if extra[0] == "--weights":
        base = base[:2] + base[4:]
    out = [] if "--out" in extra else ["--out", "o"]
    before = _bytes(ws)
    assert main([command, *base, *extra, *out]) == 2
    err = capsys.readouterr().err
    assert f"{flag} is empty (''), which names no file or folder; nothing was read or written" in err, err
    assert ("or leave" in err) == (flag != "--out"), err
    assert _bytes(ws) == before and not (ws / "o").exists()


def test_explain_of_an_empty_model_or_weights_names_the_empty_option_not_the_current_folder(ws, capsys):
    assert main(["explain", "--model", ""]) == 2  # said "--model '' is a folder" (the current one)
    err = capsys.readouterr().err
    assert "--model is empty ('')" in err and "is a folder" not in err, err
    assert main(["explain", "--model", DEMO, "--weights", ""]) == 2  # explained the random weights
    assert "--weights is empty ('')" in capsys.readouterr().err
    assert main(["explain", "--model", DEMO, "--weights", "w.pt", "--input-shape", "1,1,8,8"]) == 0
    assert "group 1: 32 units (32 prunable)" in capsys.readouterr().out


# -- GradualPruner.step's batch count ------------------------------------------------------------------------


def _gradual():
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, GradualPruner(model, torch.rand(2, 1, 8, 8), opt, PruningSchedule(0.5, steps=2))


@pytest.mark.parametrize("bad", ["2", -1, 0, 1.5, True])
def test_gradual_step_names_a_batch_count_out_of_form(bad):
    """``"2"``: ``TypeError: '<' not supported between instances of 'int' and 'str'`` from the data loop;
    ``-1`` / ``0``: "the calibration data is empty" (the data had batches)."""
    model, gp = _gradual()
    with pytest.raises(UserError, match=f"num_batches={bad!r} must be an integer, at least 1"):
        gp.step([torch.rand(8, 1, 8, 8)], num_batches=bad)
    assert gp.steps_done == 0 and model.features[0].out_channels == 32


def test_gradual_step_still_counts_batches_given_as_numpy_integers():
    import numpy as np

    model, gp = _gradual()
    gp.step([torch.rand(8, 1, 8, 8)] * 3, num_batches=np.int64(2))
    assert gp.steps_done == 1 and model.features[0].out_channels < 32


# -- a saved folder whose example_input_shape was edited --------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    from cleanai_core.io import save_pruned

    torch.manual_seed(0)
    m = DigitsCNN().eval()
    x = torch.rand(8, 1, 8, 8)
    p = StructuredPruner(m, x[:2], pruning_ratio=0.25)
    p.collect_activations([x], progress=False)
    save_pruned(tmp_path / "f", p.prune(), p.history, DEMO, example_input_shape=[1, 1, 8, 8])
    return tmp_path / "f"


def _edit(folder: Path, **values) -> None:
    arch = json.loads((folder / "architecture.json").read_text())
    for key, value in values.items():
        if key == "stride":
            arch["settings"]["features.3"]["stride"] = value
        else:
            arch[key] = value
    (folder / "architecture.json").write_text(json.dumps(arch))


@pytest.mark.parametrize("shape", ["x", 5, ["a"], [1, 1, -8, 8], [1.5, 1, 8, 8]])
def test_an_edited_example_input_shape_is_a_damaged_folder(folder, shape, capsys):
    """It was read as no shape recorded: the run of the rebuilt model that refuses edited settings was skipped
    (a stride of 0 loaded), and ``cleanai explain`` traced 1,3,224,224 and blamed the model."""
    from cleanai_core.io import load_pruned

    _edit(folder, example_input_shape=shape, stride=[0, 0])
    with pytest.raises(UserError, match=r"'example_input_shape' is .*, expected a list of sizes .* or null"):
        load_pruned(folder)
    assert main(["explain", "--model", str(folder)]) == 2
    assert "'example_input_shape' is" in capsys.readouterr().err


def test_a_folder_with_its_recorded_shape_or_none_still_loads_and_refuses_a_stride_of_0(folder):
    from cleanai_core.io import load_pruned

    assert load_pruned(folder).features[0].out_channels == 24
    _edit(folder, stride=[0, 0])
    with pytest.raises(UserError, match="settings"):
        load_pruned(folder)
    _edit(folder, example_input_shape=None, stride=[1, 1])
    assert load_pruned(folder)(torch.rand(3, 1, 8, 8)).shape == (3, 10)


# -- recovery on the calibration samples, too few of them ---------------------------------------------------


def test_recovery_without_train_data_on_too_few_calibration_samples_names_the_options(ws, capsys):
    """2 samples: one scores, one evaluates; recovery said "train_data has 1 sample(s): too few to hold out 10%
    for early stopping", naming an argument of recover() the command line has no option for."""
    torch.save((torch.rand(2, 1, 8, 8), torch.randint(0, 10, (2,))), "d2.pt")
    args = ["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d2.pt", "--out", "o", "--quiet"]
    assert main([*args, "--recover-epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "--recover-epochs without --train-data trains on the calibration samples of --data ('d2.pt')" in err, err
    assert "give --train-data" in err and "train_data has" not in err and not (ws / "o").exists()
    assert main([*args, "--recover-epochs", "1", "--train-data", "d.pt"]) == 0
    recovery = json.loads((ws / "o" / "report.json").read_text())["recovery"]
    assert (recovery["epochs"], recovery["train_samples"], recovery["held_out_samples"]) == (1, 22, 2)


# -- PruningHistory.load of a file that is not there ----------------------------------------------------------


def test_loading_a_history_file_that_is_not_there_asks_for_a_file_not_a_folder(tmp_path):
    """It said "does not exist; give a folder written by `cleanai prune` or save_pruned()": load takes a file."""
    from cleanai_core import PruningHistory

    with pytest.raises(UserError, match="history file '.*nope.json' does not exist; give the file PruningHistory.save"):
        PruningHistory.load(tmp_path / "nope.json")
    torch.manual_seed(0)
    p = StructuredPruner(DigitsCNN().eval(), torch.rand(2, 1, 8, 8), importance="magnitude", pruning_ratio=0.25)
    p.prune()
    p.history.save(tmp_path / "h.json")
    assert PruningHistory.load(tmp_path / "h.json").replay(DigitsCNN()).features[0].out_channels == 24


# -- sensitivity at ratios that remove no unit ---------------------------------------------------------------


def test_sensitivity_at_ratios_that_remove_no_unit_is_refused_not_reported_as_insensitive(ws, capsys):
    """``--sensitivity-ratios 0.01`` on groups of 32..64 units: every trial was the unchanged model, and the
    report ranked every group "KL 0" (insensitive), exit 0."""
    args = ["sensitivity", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--quiet", "--out", "s"]
    assert main([*args, "--sensitivity-ratios", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "ratios=[0.01]: no ratio removes a unit from any group (groups of 32..64 units" in err, err
    assert not (ws / "s").exists()
    assert main([*args, "--sensitivity-ratios", "0.01,0.5"]) == 0  # 0.5 removes units: the 0.01 points stay 0
    groups = json.loads((ws / "s" / "report.json").read_text())["sensitivity"]["groups"]
    assert sorted(g["size"] for g in groups) == [32, 64, 64] and all(g["params_saved"][1] == 0 for g in groups)
    assert all(g["params_saved"][-1] > 0 for g in groups)


# -- recovery whose held-out samples hold NaN ---------------------------------------------------------------


def _pruned_digits():
    torch.manual_seed(0)
    m = DigitsCNN().eval()
    x = torch.rand(24, 1, 8, 8)
    p = StructuredPruner(m, x[:2], pruning_ratio=0.5)
    p.collect_activations([x], progress=False)
    return m, p.prune(), x, torch.randint(0, 10, (24,))


def test_recovery_with_nan_in_the_held_out_samples_is_refused_not_returned_unchanged():
    """One NaN sample in the 10% held out: the held-out loss was NaN from the start, every epoch lost the tie to
    it, and recover() returned the pruned model unchanged, ``diverged=False``, without a warning (exit 0 on the
    command line, whose check reads only the first sample)."""
    from cleanai_core import recover

    m, pruned, x, y = _pruned_digits()
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    bad = x.clone()
    bad[5] = float("nan")  # sample 5 falls in the held-out 10% at seed 0
    data = torch.utils.data.TensorDataset(bad, y)
    with pytest.raises(UserError, match="held-out data .* holds NaN or inf values in its batch 0"):
        recover(pruned, m, data, epochs=2, progress=False)
    with pytest.raises(UserError, match="holds NaN or inf values in its batch 0"):
        recover(pruned, m, data, val_data=[(bad[4:8], y[4:8])], epochs=1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())
    out, result = recover(pruned, m, torch.utils.data.TensorDataset(x, y), epochs=2, progress=False)
    assert result.held_out_samples == 2 and len(result.held_out_loss) == 2
    assert all(torch.isfinite(torch.tensor(v)) for v in (result.initial_loss, *result.held_out_loss))


def test_a_schedules_share_after_a_step_that_is_no_whole_number_is_named():
    """``removed_after("a")``: ``TypeError: '>' not supported between instances of 'int' and 'str'``;
    ``removed_after(nan)``: a share of NaN."""
    import numpy as np

    s = PruningSchedule(0.5, steps=4, kind="linear")
    for bad in ("a", float("nan"), 1.5, None, True):
        with pytest.raises(UserError, match=r"removed_after: step=.* must be a whole number of steps \(0 .. 4\)"):
            s.removed_after(bad)
    assert [s.removed_after(k) for k in (-1, 0, 2, np.int64(4), 9)] == [0.0, 0.0, 0.25, 0.5, 0.5]
