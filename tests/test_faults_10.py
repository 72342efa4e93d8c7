"""Tenth round of bad input and faults (docs/reliability.md, "Session 20: faults"): device
indices torch ignores, the config file named by the environment, gradient criteria named in
their label errors, and the cases below each heading."""

from __future__ import annotations

import json

import pytest
import torch
from test_faults_9 import small_net  # the same small network as the session before
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.cli import main
from cleanai_core.errors import TraceError, UserError

DEMO = "cleanai_plugins.io.demo:DigitsCNN"


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A folder with ``w.pt`` (the demo CNN's random weights) and ``d.pt`` (40 labelled
    digit-sized images), the current folder."""
    from cleanai_plugins.io.demo import DigitsCNN

    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.rand(40, 1, 8, 8, generator=g), "y": torch.randint(0, 10, (40,), generator=g)}, "d.pt")
    torch.manual_seed(0)
    torch.save(DigitsCNN().state_dict(), "w.pt")
    return tmp_path


PRUNE = ["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--batch-size", "8", "-q"]


# -- devices torch takes but does not have ---------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu:1", "cpu:7"])
def test_a_cpu_index_other_than_0_is_refused_before_anything_is_read(ws, capsys, device):
    from cleanai_core.io import load_pruned

    rc = main([*PRUNE, "--out", "o", "--device", device])
    err = capsys.readouterr().err
    assert rc == 2, err  # exit 0: torch puts cpu:1 tensors on the one cpu
    assert f"--device {device}: torch has one cpu device (cpu, or cpu:0)" in err and "use cpu" in err
    assert not (ws / "o").exists()
    with pytest.raises(UserError, match=f"map_location='{device}': torch has one cpu device"):
        load_pruned(ws, map_location=device)


@pytest.mark.parametrize("device", ["", " cpu", "cpu\n"])
def test_an_empty_or_padded_device_is_quoted_in_the_message(ws, capsys, device):
    assert main([*PRUNE, "--out", "o", "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"--device {device!r} is not a device; use cpu, cuda or cuda:N." in err  # "--device  is not a device"


def test_cpu_and_cpu_0_still_run(ws, capsys):
    assert main([*PRUNE, "--out", "o", "--device", "cpu:0", "--ratio", "0.5"]) == 0, capsys.readouterr().err
    assert json.loads((ws / "o" / "config.json").read_text())["device"] == "cpu:0"


# -- CLEANAI_CONFIG --------------------------------------------------------------------------------


def test_cleanai_config_names_the_config_file_as_config_does(ws, capsys, monkeypatch):
    (ws / "c.toml").write_text("ratio = 0.5\nround-to = 2\n")
    monkeypatch.setenv("CLEANAI_CONFIG", "c.toml")
    assert main([*PRUNE, "--out", "o"]) == 0, capsys.readouterr().err
    cfg = json.loads((ws / "o" / "config.json").read_text())
    assert (cfg["ratio"], cfg["round_to"], cfg["_sources"]["ratio"]) == (0.5, 2, "config file")  # 0.3, default
    assert cfg["config"] == str((ws / "c.toml").resolve())
    (ws / "other.toml").write_text("ratio = 0.25\n")  # --config on the command line replaces it
    assert main([*PRUNE, "--out", "o2", "--config", "other.toml"]) == 0
    assert json.loads((ws / "o2" / "config.json").read_text())["ratio"] == 0.25


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (None, "config file 'c.toml' does not exist."),
        ("ratoi = 0.5\n", "unknown key(s) 'ratoi' (did you mean 'ratio'?)"),
        ("trust-code = true\n", "a config file cannot grant trust"),
        ('model = "os:getcwd"\n', "trust_code=True"),
    ],
)
def test_a_bad_config_named_by_cleanai_config_says_where_it_came_from(ws, capsys, monkeypatch, text, says):
    if text is not None:
        (ws / "c.toml").write_text(text)
    monkeypatch.setenv("CLEANAI_CONFIG", "c.toml")
    args = [a for a in PRUNE if a not in ("--model", DEMO)] if "model" in (text or "") else PRUNE
    assert main([*args, "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert says in err and not (ws / "o").exists()
    if text is None or "ratoi" in text:
        assert "(The file is named by CLEANAI_CONFIG; unset it or fix the file.)" in err


def test_a_misspelt_cleanai_config_is_warned_about(ws, caplog, monkeypatch):
    monkeypatch.setenv("CLEANAI_CONFG", "c.toml")
    with caplog.at_level("WARNING", logger="cleanai"):
        assert main([*PRUNE, "--out", "o", "--dry-run"]) == 0
    said = [r.getMessage() for r in caplog.records]
    assert "warning: CLEANAI_CONFG is not an option and was ignored; did you mean CLEANAI_CONFIG?" in said


# -- gradient criteria name themselves -------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["taylor", "hessian"])
@pytest.mark.parametrize(
    ("labels", "says"),
    [
        (["cat"] * 4, "importance needs class indices, but the labels are text"),
        (torch.full((4,), 0.5), "importance needs integer class labels, got torch.float32"),
        (torch.tensor([0, 1, 2, 9]), "importance got class label 9 but the output has 4 classes"),
        (torch.tensor([0, 1]), "give one label per input for {criterion} importance"),
        (None, "importance needs labels (it scores with the gradients of the loss), but the data yields inputs"),
    ],
)
def test_a_gradient_criterions_label_errors_name_that_criterion(criterion, labels, says):
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    pruner = StructuredPruner(small_net(), x, criterion, pruning_ratio=0.5)
    says = says.format(criterion=criterion)
    with pytest.raises(UserError) as info:  # hessian's said "taylor importance"
        pruner.collect_activations([(x, labels)] if labels is not None else [x], progress=False)
    text = str(info.value)
    assert says in text and (text.startswith(criterion) or f"for {criterion} importance" in text)
    assert ("taylor" in text) == (criterion == "taylor")


# -- layer specs that are no layer of the model ----------------------------------------------------


def test_a_parameter_given_as_an_ignored_layer_is_named_not_printed():
    model = small_net()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(UserError) as info:
        StructuredPruner(model, x, "magnitude", ignored_layers=[model[0].weight])
    text = str(info.value)  # it printed every value of the weight
    # since session 24 a bare tensor may be ignored (its channels are kept); a claimed layer's is refused
    assert "ignored_layers names the tensor '0.weight', which layer '0' holds and slices" in text
    assert "ignore '0' to keep them" in text
    assert "tensor(" not in text and len(text) < 200
    with pytest.raises(UserError, match=r"cannot match layers with a Tensor of shape \(3, 4\): give a module"):
        StructuredPruner(model, x, "magnitude", ignored_layers=[torch.zeros(3, 4)])
    with pytest.raises(UserError, match=r"'3.weight' is a parameter of '3', not a layer: give '3'"):
        StructuredPruner(model, x, "magnitude", layer_pruning_ratios={"3.weight": 0.5})  # the name, not the tensor


def test_a_layer_of_a_copy_of_the_model_names_the_twin_to_give():
    import copy

    import torchvision

    model = small_net()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(UserError) as info:
        StructuredPruner(copy.deepcopy(model), x, "magnitude", ignored_layers=[model[3]])
    assert "this model has one like it named '3': give that name" in str(info.value)
    with pytest.raises(UserError) as info:  # a whole network's repr was the message
        StructuredPruner(model, x, "magnitude", layer_pruning_ratios={torchvision.models.resnet18(): 0.5})
    assert str(info.value).startswith("a ResNet module matches no layer of the model") and len(str(info.value)) < 200


# -- calibration batches that change shape part-way ------------------------------------------------


def test_a_calibration_batch_of_other_channels_names_the_layer_and_the_shapes():
    x = torch.rand(4, 3, 8, 8)
    pruner = StructuredPruner(small_net(), x, "weight_activation", pruning_ratio=0.5)
    with pytest.raises(UserError) as info:  # "a layer saw 5 channels after 3 earlier in calibration"
        pruner.collect_activations([x, torch.rand(4, 5, 8, 8)], progress=False)
    assert str(info.value).startswith(
        "layer '0' (Conv2d) got inputs of 5 channels (shape (4, 5, 8, 8)) where earlier calibration batches gave 3; "
        "give every calibration batch shaped like example_inputs"
    )


# -- counts past what Python and torch can count ---------------------------------------------------


@pytest.mark.parametrize("flag", ["--batch-size", "--calib-batches", "--covariance-rows", "--bn-samples"])
def test_a_count_past_the_largest_integer_is_refused_before_anything_is_read(ws, capsys, flag):
    rc = main([*PRUNE, "--out", "o", flag, str(10**20)])
    err = capsys.readouterr().err
    assert rc == 2, err  # --batch-size: "Stop argument for islice() must be ... <= sys.maxsize" traceback, exit 1
    assert f"{flag}=100000000000000000000 is out of range: it must be at most 9223372036854775807 (2**63 - 1)." in err
    assert "Traceback" not in err and not (ws / "o").exists()


def test_a_class_count_torch_cannot_count_is_named_as_too_large_a_model(ws, capsys):
    rc = main(["explain", "--model", DEMO, "--num-classes", str(2**63 - 1)])
    err = capsys.readouterr().err
    assert rc == 2, err  # "Storage size calculation overflowed" with a C++ stack, exit 1
    assert "needs more memory than there is (a tensor of more elements than torch can count)" in err
    assert "frame #" not in err


# -- a [prune] table among other keys --------------------------------------------------------------


def test_a_prune_table_beside_other_keys_says_how_to_lay_the_file_out(ws, capsys):
    (ws / "c.toml").write_text("batch-size = 4\n[prune]\nratio = 0.5\n")
    assert main([*PRUNE, "--out", "o", "--config", "c.toml"]) == 2
    err = capsys.readouterr().err  # "unknown key(s) 'prune'", a key the user guide names
    assert "config file 'c.toml' has a [prune] table and other top-level keys ('batch-size')" in err
    assert "move those keys into it" in err and not (ws / "o").exists()


# -- options the run would not read ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--no-reconstruction", "--covariance-rows", "64"], "--covariance-rows (command line) feeds the covariances"),
        (["--no-reconstruction", "--stats-budget-mib", "4"], "--stats-budget-mib (command line) is the memory for"),
        (["--round-mode", "nearest"], "--round-mode (command line) says how --round-to rounds, and no rounding is on"),
    ],
)
def test_an_option_whose_stage_is_off_is_refused_naming_both(ws, capsys, extra, says):
    assert main([*PRUNE, "--out", "o", *extra]) == 2  # exit 0, the option ignored without a word
    err = capsys.readouterr().err
    assert says in err and not (ws / "o").exists()


def test_round_mode_with_round_to_and_covariance_rows_with_reconstruction_still_run(ws, capsys):
    args = [*PRUNE, "--out", "o", "--round-mode", "nearest", "--round-to", "2", "--covariance-rows", "64"]
    assert main(args) == 0, capsys.readouterr().err
    cfg = json.loads((ws / "o" / "config.json").read_text())
    assert (cfg["round_mode"], cfg["round_to"], cfg["covariance_rows"]) == ("nearest", 2, 64)


# -- CleanAI's own errors keep their traceback -----------------------------------------------------


def test_an_error_raised_in_cleanais_own_code_keeps_its_traceback(ws, monkeypatch, capsys):
    from cleanai_core import history

    # an error whose raising frame is in cleanai_core (history.py): a CleanAI bug to report, not the
    # user's code; in a source checkout or an editable install it was "raised by code outside CleanAI"
    monkeypatch.setattr("cleanai_core.job.run.check_unread", lambda cfg: history.shapes_sliced(None, [1]))
    with pytest.raises(AttributeError):
        main([*PRUNE, "--out", "o"])
    assert "outside CleanAI" not in capsys.readouterr().err and not (ws / "o").exists()


def test_the_user_code_frame_is_told_from_cleanais_own():
    import cleanai_core.cli as cli
    from cleanai_core import history

    try:
        history.shapes_sliced(None, [1])
    except AttributeError as exc:
        assert cli._user_code_frame(exc) is None  # cleanai_core/history.py: ours
    try:
        small_net()(torch.rand(1, 5, 8, 8))
    except RuntimeError as exc:
        assert cli._user_code_frame(exc) is None  # torch's
    try:
        {}["boom"]
    except KeyError as exc:
        assert cli._user_code_frame(exc).startswith(__file__ + ":")  # this test file: the user's


# -- the demo's and explain's numbers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--epochs", str(10**11)], "--epochs=100000000000 must be from 1 to 1000"),  # trained until killed
        (["--seed", str(10**23)], "--seed=100000000000000000000000 is out of range"),  # Overflow ..., exit 1
    ],
)
def test_the_demo_refuses_epochs_and_seeds_it_cannot_use(tmp_path, capsys, extra, says):
    assert main(["demo", "--out", str(tmp_path / "o"), "-q", *extra]) == 2
    assert says in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_an_input_shape_of_more_elements_than_torch_counts_is_refused(capsys):
    assert main(["explain", "--model", DEMO, "--input-shape", f"{10**20},1,8,8"]) == 2  # a C++ stack, exit 1
    assert "has 6.4e+21 elements, more than torch can count (2**63 - 1)" in capsys.readouterr().err


# -- odd dtypes ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_complex_weights_are_scored_by_their_magnitude_not_their_real_part():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8).to(torch.cfloat), nn.Linear(8, 2).to(torch.cfloat))
    with torch.no_grad():
        model[0].weight[:4] = 0.01 * torch.randn(4, 4)  # small, real
        model[0].weight[4:] = 10j * torch.randn(4, 4)  # large, imaginary
        model[1].weight[:] = torch.ones(2, 8)  # the consumer reads every unit alike
    pruner = StructuredPruner(model, torch.randn(3, 4, dtype=torch.cfloat), "magnitude", pruning_ratio=0.5)
    pruner.prune()  # kept units 0..3: .float() of a complex weight keeps its real part only
    assert pruner.history.steps[0][0].keep.tolist() == [4, 5, 6, 7]


def test_a_float8_model_is_named_by_what_torch_cannot_do_not_by_the_finiteness_check():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.float8_e4m3fn)
    with pytest.raises(TraceError) as info:  # NotImplementedError: "isfinite" not implemented for 'Float8_e4m3fn'
        StructuredPruner(model, torch.rand(4, 8).to(torch.float8_e4m3fn), "magnitude", pruning_ratio=0.5)
    assert "the model failed to run on the example inputs" in str(info.value)
    assert "not implemented for 'Float8_e4m3fn'" in str(info.value)
    with pytest.raises(UserError, match="contain NaN or inf"):  # the check still reads float8 values
        StructuredPruner(model, torch.full((4, 8), float("inf")).to(torch.float8_e5m2), "magnitude")


# -- data set items of different make ----------------------------------------------------------------

ITEMS_MODULE = '''
import torch


class Items(torch.utils.data.Dataset):
    """40 digit-sized images with labels; from item 20 on, the item is changed by ``kind``."""

    def __init__(self, kind):
        self.kind = kind

    def __len__(self):
        return 40

    def __getitem__(self, i):
        x, y = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(i)), i % 10
        if i < 20:
            return x, y
        return {"none": (None, y), "text": (x, "cat"), "three": (x, y, 0), "dict": {"x": x, "y": y}}[self.kind]


def none():
    return Items("none")


def text():
    return Items("text")


def three():
    return Items("three")


def dict_():
    return Items("dict")
'''


@pytest.mark.parametrize(
    ("fn", "other"),
    [
        ("none", "(NoneType, int)"),  # "expected Tensor as element 6 in argument 0, but got NoneType"
        ("text", "(tensor (1, 8, 8) float32, text)"),  # "new(): invalid data type 'str'"
        ("three", "(tensor (1, 8, 8) float32, int, int)"),  # "each element in list of batch should be of equal size"
        ("dict_", "{'x': tensor (1, 8, 8) float32, 'y': int}"),
    ],
)
def test_data_set_items_of_another_make_are_shown_side_by_side(ws, capsys, monkeypatch, fn, other):
    (ws / "items10.py").write_text(ITEMS_MODULE)
    monkeypatch.syspath_prepend(str(ws))
    argv = ["prune", "--model", DEMO, "--weights", "w.pt", "--data", f"items10:{fn}", "-q", "--out", "o"]
    assert main([*argv, "--batch-size", "40"]) == 2
    err = capsys.readouterr().err
    assert f"cannot be put in one batch: one item is (tensor (1, 8, 8) float32, int), another {other}." in err
    assert "Give every item the same parts" in err and not (ws / "o").exists()


# -- a distributed environment that is not one -------------------------------------------------------

_PEERS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer; start the job with torchrun"),  # ValueError
        ({"WORLD_SIZE": "2"}, "this is one process of a distributed run, but RANK is not"),  # rendezvous ValueError
        ({"WORLD_SIZE": "2", "RANK": "0"}, "but MASTER_ADDR, MASTER_PORT are not set: start the job with torchrun"),
        ({"WORLD_SIZE": "2", "RANK": "5", **_PEERS}, "RANK=5 is out of range: it must be an integer >= 0 below"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x", **_PEERS}, "LOCAL_RANK='x' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "0", "CLEANAI_DIST_TIMEOUT": "abc", **_PEERS}, "TIMEOUT='abc' is not"),
        ({"WORLD_SIZE": "2", "RANK": "0", "CLEANAI_DIST_TIMEOUT": "-1", **_PEERS}, "CLEANAI_DIST_TIMEOUT='-1' is not"),
    ],
)
def test_a_stray_or_broken_torchrun_environment_is_named_before_any_wait(ws, capsys, monkeypatch, env, says):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CLEANAI_DIST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # RANK=5 of 2 waited for peers that never come (up to 30 minutes); the others were tracebacks
    assert main([*PRUNE, "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and not (ws / "o").exists()


# -- run_job given a model or a data set alone --------------------------------------------------------


def test_run_job_prunes_the_model_it_is_given_with_the_data_of_the_config(ws):
    from cleanai_core import run_job
    from cleanai_plugins.io.demo import DigitsCNN

    model = DigitsCNN()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_job({"model": DEMO, "data": "d.pt", "out": "o", "quiet": True, "ratio": 0.5}, model=model)
    saved = torch.load(ws / "o" / "model.pt")
    # the model was rebuilt from the spec (random weights) and the one given was never read
    assert torch.all(saved["features.0.weight"] == 0.01) and saved["features.0.weight"].shape[0] == 16
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model untouched


def test_run_job_reads_the_data_set_it_is_given_with_the_model_of_the_config(ws):
    from torch.utils.data import TensorDataset

    from cleanai_core import run_job

    d = torch.load(ws / "d.pt")
    cfg = {"model": DEMO, "weights": "w.pt", "out": "o", "quiet": True, "ratio": 0.5}
    # "--data '<dataset given to run_job>': no such file or folder"
    report = run_job(cfg, dataset=TensorDataset(d["x"], d["y"]))
    # 14522 before session 21: compensation gave the convs biases, which their BatchNorms now hold
    assert (report["params_before"], report["params_after"]) == (56554, 14458)
    assert json.loads((ws / "o" / "config.json").read_text())["data"] == "<dataset given to run_job>"


# -- recovery trained on the samples that measure it ------------------------------------------------


@pytest.mark.parametrize("train", ["d.pt", "./d.pt", "link.pt", "copy.pt"])
def test_train_data_that_is_the_evaluation_data_is_refused_before_the_run(ws, capsys, monkeypatch, train):
    import shutil

    (ws / "link.pt").symlink_to(ws / "d.pt")
    shutil.copyfile(ws / "d.pt", ws / "copy.pt")
    monkeypatch.setattr("cleanai_core.job.run.load_inputs", lambda *a: pytest.fail("read the model first"))
    # exit 0: recovery trained on the held-out half, and the recovered accuracy was measured on it
    assert main([*PRUNE, "--out", "o", "--recover-epochs", "1", "--train-data", train]) == 2
    err = capsys.readouterr().err
    assert f"--train-data {train!r} is the --data 'd.pt', whose held-out part measures the report's accuracy" in err
    assert not (ws / "o").exists()


def test_train_data_of_other_samples_still_recovers(ws, capsys):
    g = torch.Generator().manual_seed(5)
    torch.save({"x": torch.rand(40, 1, 8, 8, generator=g), "y": torch.randint(0, 10, (40,), generator=g)}, "t.pt")
    assert main([*PRUNE, "--out", "o", "--recover-epochs", "1", "--train-data", "t.pt"]) == 0, capsys.readouterr()
    assert (
        "--train-data t.pt (40 samples"
        in json.loads((ws / "o" / "report.json").read_text())["recovery"]["training_data"]
    )


# -- layer patterns as the user guide gives them ------------------------------------------------------


def test_a_class_name_as_a_layer_pattern_matches_that_classs_layers_as_documented():
    from cleanai_core.options import match_modules

    model = small_net()
    # "'Conv2d' matches no layer of the model", though --ignore documents "layer name, glob or class name"
    assert sorted(match_modules(model, ["Conv2d"])) == ["0", "3"]
    assert sorted(match_modules(model, ["Batch*"])) == ["1"]
    assert sorted(match_modules(model, ["0"])) == ["0"]  # a layer's name is still read as a name first
    x = torch.rand(2, 3, 8, 8)
    kept = StructuredPruner(small_net(), x, "magnitude", pruning_ratio=0.5, ignored_layers=["BatchNorm2d"]).prune()
    assert (kept[0].out_channels, kept[3].out_channels) == (8, 4)  # the norm's channels stay, the second conv's go


@pytest.mark.parametrize("pair", ["features.0=0.5=0.3", "features.0=0.5,features.3=0.2"])
def test_a_layer_ratio_of_several_pairs_says_to_give_one_per_flag(ws, capsys, pair):
    assert main([*PRUNE, "--out", "o", "--layer-ratio", pair]) == 2  # "'features.0=0.5,features.3' matches no layer"
    assert f"--layer-ratio: {pair!r} holds more than one '='; give one PATTERN=R per --layer-ratio" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("name", ["model.pt", "history.json", "architecture.json"])
def test_a_saved_folder_whose_file_is_a_folder_says_so(ws, capsys, name):
    import shutil

    from cleanai_core.io import load_pruned

    assert main([*PRUNE, "--out", "saved"]) == 0, capsys.readouterr().err
    (ws / "saved" / name).unlink()
    (ws / "saved" / name).mkdir()
    with pytest.raises(UserError, match=f"'saved/{name}' is a folder, where `cleanai prune` and save_pruned"):
        load_pruned("saved")  # "'saved' has no model.pt"
    shutil.rmtree(ws / "saved")
