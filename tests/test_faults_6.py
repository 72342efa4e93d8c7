"""Sixth round of bad input and edge cases (docs/reliability.md, "Session 16: bad inputs"):
saved folders whose settings were edited, and more (one section per class)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from test_faults_4 import DEMO, ws  # noqa: F401 - ws: a fixture, asked for by name
from torch import nn

from cleanai_core import StructuredPruner, load_pruned
from cleanai_core.errors import UserError
from cleanai_core.io import save_pruned

G = torch.Generator().manual_seed(7)
X = torch.rand(2, 3, 8, 8, generator=G)


class Net(nn.Module):
    """A conv, a norm, an attention, a recurrent layer and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.bn = nn.BatchNorm2d(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.ln = nn.LayerNorm(16)
        self.rnn = nn.GRU(16, 12, batch_first=True)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        h = self.bn(self.gn(self.conv(x))).relu()
        t = h.flatten(2).transpose(1, 2)
        t = self.ln(t + self.attn(t, t, t, need_weights=False)[0])
        return self.fc(self.rnn(t)[0][:, -1])


def build_net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _pruned_small():
    pruner = StructuredPruner(build_net(), X, "magnitude", pruning_ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pruner.prune(), pruner.history


def _save(tmp_path_factory, **extra) -> Path:
    out = tmp_path_factory.mktemp("saved") / "pruned"
    pruned, history = _pruned_small()
    save_pruned(out, pruned, history, spec=f"{__name__}:build_net", **extra)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return _save(tmp_path_factory)


def _tampered(saved: Path, tmp_path: Path, module: str, key: str, value) -> Path:
    folder = tmp_path / "t"
    shutil.copytree(saved, folder)
    arch = json.loads((folder / "architecture.json").read_text())
    arch["settings"][module][key] = value
    (folder / "architecture.json").write_text(json.dumps(arch))
    return folder


# -- a saved folder whose settings were edited --------------------------------------------------


def test_the_saved_folder_loads_and_matches(saved):
    model = load_pruned(saved, trust_code=True)
    assert model.conv.out_channels == model.conv.weight.shape[0] < 16
    assert model(X).shape == (2, 4)


@pytest.mark.parametrize(
    "module, key, value, words",
    [
        ("conv", "out_channels", 99, "out_channels=99, but its weight of shape (8, 3, 3, 3) with groups=1 gives"),
        ("conv", "groups", 2, "in_channels=3, but its weight of shape (8, 3, 3, 3) with groups=2 gives in_channels=6"),
        ("conv", "kernel_size", [5, 5], "kernel_size=(5, 5)"),
        ("gn", "num_channels", 16, "num_channels=16, but its weight of shape (8,) gives num_channels=8"),
        ("gn", "num_groups", 3, "num_groups=3 does not divide num_channels=8"),
        ("bn", "num_features", 7, "num_features=7, but its weight of shape (8,) gives num_features=8"),
        ("ln", "normalized_shape", [16], "normalized_shape=(16,)"),
        ("attn", "num_heads", 2, "head_dim=2, but out_proj.weight of shape (8, 8) with num_heads=2 gives head_dim=4"),
        ("attn", "num_heads", 3, "num_heads=3 does not divide the embedding width 8"),
        ("attn", "embed_dim", 16, "embed_dim=16"),
        ("rnn", "hidden_size", 12, "hidden_size=12, but its weights"),
        ("rnn", "input_size", 16, "input_size=16"),
        ("fc", "in_features", 5, "in_features=5, but its weight of shape (4, 6) gives in_features=6"),
    ],
)
def test_settings_that_do_not_fit_the_weights_are_refused_naming_the_file(saved, tmp_path, module, key, value, words):
    # they loaded: the model then failed in its forward (groups, num_heads=3, hidden_size), or
    # computed something else (num_heads=2: heads of 4 channels read as 2), or lied about its widths
    # (out_channels=99, which a later prune of the loaded model traces with)
    folder = _tampered(saved, tmp_path, module, key, value)
    before = _hashes(folder)
    with pytest.raises(UserError) as err:
        load_pruned(folder, trust_code=True)
    msg = str(err.value)
    assert str(folder / "architecture.json") in msg and f"'settings' of '{module}'" in msg
    assert words in msg and "save the pruned model again" in msg
    assert _hashes(folder) == before


@pytest.mark.parametrize("module, key, value", [("bn", "eps", 0.5), ("gn", "eps", 0.25), ("attn", "dropout", 0.0)])
def test_settings_the_weights_do_not_fix_still_load(saved, tmp_path, module, key, value):
    model = load_pruned(_tampered(saved, tmp_path, module, key, value), trust_code=True)
    assert getattr(model.get_submodule(module), key) == value
    assert model(X).shape == (2, 4)


# -- NaN in the weights -------------------------------------------------------------------------


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("tensor", ["0.weight", "1.running_var", "3.bias"])
@pytest.mark.parametrize("importance", ["magnitude", "weight_activation"])
def test_a_model_with_nan_weights_is_refused_naming_the_tensor(tensor, importance):
    # magnitude pruned it without a word (NaN scores ranked as they came); weight_activation
    # said "non-finite activations ... check the data"
    model = _small()
    with torch.no_grad():
        model.state_dict()[tensor].view(-1)[2] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=rf"the model's tensor '{tensor}' holds 1 NaN value\(s\) \(of \d+\).*finite"):
        StructuredPruner(model, X, importance, pruning_ratio=0.5)
    assert all(torch.allclose(v, before[k], rtol=0, atol=0, equal_nan=True) for k, v in model.state_dict().items())


def test_gradual_pruning_refuses_nan_weights():
    from cleanai_core import GradualPruner, PruningSchedule

    model = _small().train()
    with torch.no_grad():
        model[3].weight[0, 0, 0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError, match=r"'3.weight' holds 1 NaN"):
        GradualPruner(model, X, opt, PruningSchedule(final=0.5, steps=2), importance="magnitude")


def test_an_inf_bias_is_not_nan_and_prunes():
    model = _small()
    with torch.no_grad():
        model[7].bias[0] = float("inf")
    pruned = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5, ignored_layers=[model[7]]).prune()
    assert pruned[0].out_channels == 4


@pytest.mark.parametrize("tensor", ["features.0.weight", "features.4.running_var"])
def test_the_command_line_names_nan_in_the_weights_file(request, capsys, tensor):
    folder = request.getfixturevalue("ws")  # test_faults_4's workspace: data.pt in a fresh current folder
    from cleanai_core.cli import main
    from cleanai_plugins.io.demo import DigitsCNN

    state = DigitsCNN().state_dict()
    state[tensor].view(-1)[0] = float("nan")
    torch.save(state, "w.pt")
    before = _hashes(folder)
    assert main(["prune", "--model", DEMO, "--weights", "w.pt", "--data", "data.pt", "--out", "o", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the weights in 'w.pt' are not finite: {tensor} holds 1 NaN value(s)" in err and "Traceback" not in err
    assert _hashes(folder) == before and not (folder / "o").exists()


def test_load_pruned_refuses_nan_in_model_pt(saved, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(saved, folder)
    state = torch.load(folder / "model.pt", weights_only=True)
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, folder / "model.pt")
    with pytest.raises(
        UserError, match=r"model\.pt': fc\.weight holds 1 NaN value\(s\) \(of 24\)\. The folder is damaged"
    ):
        load_pruned(folder, trust_code=True)


# -- save_pruned into a folder holding someone else's model.pt ---------------------------------


@pytest.mark.parametrize("name", ["model.pt", "history.json", "architecture.json"])
def test_save_pruned_does_not_replace_a_file_it_did_not_write(tmp_path, name):
    # a project folder's own model.pt (the unpruned weights) was replaced without a word
    project = tmp_path / "project"
    project.mkdir()
    (project / name).write_bytes(b"the user's own file")
    (project / "notes.txt").write_text("mine")
    before = _hashes(project)
    pruned, history = _pruned_small()
    with pytest.raises(UserError, match=rf"holds {name}, which no earlier save_pruned wrote .* Nothing was written"):
        save_pruned(project, pruned, history, spec=f"{__name__}:build_net")
    assert _hashes(project) == before


def test_save_pruned_replaces_its_own_earlier_save_and_keeps_other_files(saved, tmp_path):
    folder = tmp_path / "again"
    shutil.copytree(saved, folder)
    (folder / "notes.txt").write_text("mine")
    pruned, history = _pruned_small()
    save_pruned(folder, pruned, history, spec=f"{__name__}:build_net")
    assert (folder / "notes.txt").read_text() == "mine"
    assert torch.equal(load_pruned(folder, trust_code=True)(X), pruned(X))


# -- DependencyGraph's ignored layers -----------------------------------------------------------


def _chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))


@pytest.mark.parametrize("ignored", ["9", ["zzz"], [nn.Linear(2, 2)], ["layer4.*"], [nn.Linear]])
def test_graph_ignored_layers_that_match_nothing_are_refused(ignored):
    # they were kept as text that matched nothing (or a ValueError for a foreign module): the
    # channels meant to be kept were free to prune without a word
    with pytest.raises(UserError, match="matches no layer of the model; check the name with `cleanai explain`"):
        from cleanai_core import DependencyGraph

        DependencyGraph(_chain(), torch.rand(1, 3, 8, 8), ignored_layers=ignored)


@pytest.mark.parametrize(
    "ignored, kept",
    [("0", {"0"}), ("[02]", {"0", "2"}), ([nn.Conv2d], {"0", "2", "4"}), (["2"], {"2"}), (None, set())],
)
def test_graph_ignored_layers_take_names_globs_and_types_as_the_pruner_does(ignored, kept):
    # a lone name was read as its characters; globs and types matched nothing
    from cleanai_core import DependencyGraph

    graph = DependencyGraph(_chain(), torch.rand(1, 3, 8, 8), ignored_layers=ignored)
    assert graph.ignored == kept
    free = {s.module for g in graph.groups(prunable_only=True) for s in g.slices if s.kind == "out"}
    assert free == {"0", "2"} - kept


# -- a saved folder whose settings break the forward; history indices beyond any tensor --------


@pytest.fixture(scope="module")
def saved_with_shape(tmp_path_factory) -> Path:
    return _save(tmp_path_factory, example_input_shape=[2, 3, 8, 8])


@pytest.mark.parametrize(
    "module, key, value, words",
    [
        ("bn", "eps", -1.0, "ValueError: batch_norm eps must be non-negative"),
        ("conv", "stride", [0, 0], "RuntimeError: non-positive stride is not supported"),
        ("conv", "padding", [-5, -5], "RuntimeError: negative padding is not supported"),
        ("conv", "padding_mode", "evil", "NotImplementedError: Unrecognised padding mode evil"),
    ],
)
def test_settings_under_which_the_model_fails_are_refused_naming_the_module(
    saved_with_shape, tmp_path, module, key, value, words
):
    # the folder loaded, and the model failed at its first forward
    folder = _tampered(saved_with_shape, tmp_path, module, key, value)
    with pytest.raises(UserError) as err:
        load_pruned(folder, trust_code=True)
    msg = str(err.value)
    assert f"architecture.json': with its 'settings' (of '{module}') the model fails on an input of the recorded" in msg
    assert "shape (1, 3, 8, 8)" in msg and words in msg and "without them it runs" in msg


def test_a_saved_folder_with_its_own_settings_loads_without_a_probe_run(saved_with_shape, monkeypatch):
    # the saved tuples read back as lists counted as changed settings: every load would run the model
    import cleanai_core.saved_folder as sf

    monkeypatch.setattr(sf, "_failure", lambda *a: pytest.fail("the model was run"))
    model = load_pruned(saved_with_shape, trust_code=True)
    assert model(X).shape == (2, 4)


@pytest.mark.parametrize("key, value", [("keep", [10**20]), ("dim", 10**20)])
def test_history_indices_beyond_any_tensor_are_a_damaged_folder(saved, tmp_path, key, value):
    # was ValueError: Overflow when unpacking long long
    folder = tmp_path / "t"
    shutil.copytree(saved, folder)
    history = json.loads((folder / "history.json").read_text())
    history["steps"][0][0][key] = value
    (folder / "history.json").write_text(json.dumps(history))
    with pytest.raises(UserError, match=rf"history\.json': step 0 edit 0: '{key}' .*The folder is damaged"):
        load_pruned(folder, trust_code=True)


# -- run_job with a model and a data set given as objects ---------------------------------------


def _job(tmp_path, dataset, **extra):
    from cleanai_core import run_job
    from cleanai_plugins.io.demo import DigitsCNN

    torch.manual_seed(0)
    tmp_path.mkdir(exist_ok=True)
    cfg = {"model": DEMO, "out": str(tmp_path / "o"), "quiet": True, "ratio": 0.5, **extra}
    return run_job(cfg, model=DigitsCNN().eval(), dataset=dataset)


def _digits_xy():
    g = torch.Generator().manual_seed(3)
    return torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


@pytest.mark.parametrize("form", ["pair", "loader"])
def test_run_job_reads_x_y_tensors_and_a_dataloader_as_the_dataset_they_hold(tmp_path, form):
    # (x, y) was a data set of two items: "the model failed on an input from --data (shape (1, 16, 1, 8, 8))";
    # a DataLoader: "reading item 3 failed (TypeError: 'DataLoader' object is not subscriptable)"
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _digits_xy()
    expected = _job(tmp_path / "a", TensorDataset(x, y))
    given = (x, y) if form == "pair" else DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True)
    report = _job(tmp_path / "b", given)
    assert report["params_after"] == expected["params_after"] < report["params_before"]
    assert report["accuracy_after"] == expected["accuracy_after"]
    assert torch.equal(
        load_pruned(tmp_path / "b" / "o", trust_code=True).fc.weight, load_pruned(tmp_path / "a" / "o").fc.weight
    )


@pytest.mark.parametrize(
    "dataset, words",
    [
        ("empty", "has 0 item(s); at least 2 are needed"),
        ("generator", "is a generator, not a map-style torch Dataset"),
    ],
)
def test_run_job_names_a_dataset_it_cannot_use_and_writes_nothing(tmp_path, dataset, words):
    # an empty data set was an IndexError traceback; a generator "len() of the data set failed"
    from torch.utils.data import TensorDataset

    x, y = _digits_xy()
    given = TensorDataset(x[:0], y[:0]) if dataset == "empty" else ((x[i], y[i]) for i in range(16))
    with pytest.raises(UserError, match=re.escape(words)):
        _job(tmp_path, given)
    assert not (tmp_path / "o").exists()


def test_run_job_with_a_model_object_but_no_spec_says_what_the_spec_is_for(tmp_path):
    # said "--model is required (on the command line or in --config)" though a model was given
    from cleanai_core import run_job
    from cleanai_plugins.io.demo import DigitsCNN

    x, y = _digits_xy()
    from torch.utils.data import TensorDataset

    with pytest.raises(UserError, match=r"run_job\(config, model=...\) also needs the option 'model': the spec"):
        run_job({"out": str(tmp_path / "o")}, model=DigitsCNN(), dataset=TensorDataset(x, y))
    with pytest.raises(UserError, match=r"run_job\(model=...\) must be a torch.nn.Module, got str"):
        run_job({"model": DEMO, "out": str(tmp_path / "o")}, model="resnet", dataset=TensorDataset(x, y))
    assert not (tmp_path / "o").exists()


# -- save_pruned of a model load_pruned would refuse; a generator read up by an earlier call ----


@pytest.mark.parametrize("change, words", [("nan", "the model is not finite: fc.weight holds 1 NaN value(s) (of 24)"),
                                           ("meta", "the model's tensors are on the meta device")])  # fmt: skip
def test_save_pruned_refuses_a_model_load_pruned_would_refuse_and_writes_nothing(tmp_path, change, words):
    # a NaN model was written, then refused by load_pruned as damaged; a meta model raised
    # NotImplementedError: Cannot copy out of meta tensor
    pruned, history = _pruned_small()
    if change == "nan":
        with torch.no_grad():
            pruned.fc.weight[0, 0] = float("nan")
    else:
        pruned = pruned.to("meta")
    with pytest.raises(UserError, match=re.escape(words)):
        save_pruned(tmp_path / "o", pruned, history, spec=f"{__name__}:build_net")
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_a_generator_read_up_by_an_earlier_call_is_named():
    # said only "the calibration data is empty; give at least one batch"
    batches = (X for _ in range(2))
    pruner = StructuredPruner(_small(), X, "weight_activation", pruning_ratio=0.5)
    pruner.collect_activations(batches, progress=False)
    with pytest.raises(
        UserError, match=r"empty \(it is a one-shot generator, which yields nothing once read: an earlier"
    ):
        pruner.collect_activations(batches, progress=False)
    with pytest.raises(UserError, match=r"the calibration data is empty; give at least one batch"):
        pruner.collect_activations([], progress=False)  # a list is not one-shot: no such words


# -- a layer both ignored and given a ratio ------------------------------------------------------


@pytest.mark.parametrize("ignored, ratios", [("0", {"0": 0.5}), (["0"], {0: 0.5}), ("features", {"features.0": 0.5})])
def test_a_layer_both_ignored_and_given_a_ratio_is_refused(ignored, ratios):
    # the ratio was dropped without a word: the layer kept its 8 channels
    model = _small()
    if ignored == "features":  # a ratio for a layer inside an ignored container
        model = nn.Sequential()
        model.add_module("features", _small())
    spec = {k if isinstance(k, str) else model[k]: v for k, v in ratios.items()}
    with pytest.raises(
        UserError, match=r"is ignored \(ignored_layers, --ignore\) and given ratio 0.5 .*drop one of them"
    ):
        StructuredPruner(model, X, "magnitude", pruning_ratio=0.3, ignored_layers=ignored, layer_pruning_ratios=spec)


def test_a_ratio_for_a_region_with_an_ignored_layer_in_it_stays_valid():
    model = _small()
    pruned = StructuredPruner(
        model, X, "magnitude", pruning_ratio=0.3, ignored_layers=["0"], layer_pruning_ratios={"*": 0.5, "0": 0}
    ).prune()
    assert (pruned[0].out_channels, pruned[3].out_channels) == (8, 4)


def test_the_command_line_refuses_a_layer_both_ignored_and_given_a_ratio(request, capsys):
    from cleanai_core.cli import main

    folder = request.getfixturevalue("ws")
    args = ["--ignore", "features.3", "--layer-ratio", "features.3=0.5", "--out", "o", "--quiet"]
    assert main(["prune", "--model", DEMO, "--data", "data.pt", *args]) == 2
    err = capsys.readouterr().err
    assert "layer 'features.3' is ignored (ignored_layers, --ignore) and given ratio 0.5" in err
    assert not (folder / "o").exists()


# -- Ctrl-C while an in-place prune or a replay moves the result into the user's model -------------


class _InterruptAt(frozenset):
    """``HOOK_ATTRIBUTES`` that sends this process SIGINT at its ``at``-th membership test:
    Ctrl-C in the middle of the transplant."""

    def __new__(cls, names, at):
        self = super().__new__(cls, names)
        self.at, self.n = at, 0
        return self

    def __contains__(self, key):
        self.n += 1
        if self.n == self.at:
            import signal

            # to this thread, at once: os.kill may hand it to another thread of the process,
            # which under load ran its handler after the transplant had ended (a flaky failure)
            signal.raise_signal(signal.SIGINT)
        return super().__contains__(key)


@pytest.mark.usefixtures("sigint_raises")
@pytest.mark.parametrize("at", [5, 40, 90])
@pytest.mark.parametrize("how", ["inplace", "replay"])
def test_ctrl_c_during_the_transplant_leaves_a_whole_model(monkeypatch, at, how):
    # the model was left half pruned (a conv sliced, its BatchNorm not): it no longer ran
    import cleanai_core.model_state as ms

    model, x = _small(), X
    pruner = StructuredPruner(
        model if how == "inplace" else _small(), x, "magnitude", pruning_ratio=0.5, inplace=how == "inplace"
    )
    history = None
    if how == "replay":
        pruner.prune()
        history = pruner.history
    monkeypatch.setattr(ms, "HOOK_ATTRIBUTES", _InterruptAt(ms.HOOK_ATTRIBUTES, at))
    with pytest.raises(KeyboardInterrupt):
        pruner.prune() if how == "inplace" else history.replay(model)
    assert ms.HOOK_ATTRIBUTES.n >= at  # the interrupt came during the transplant
    assert model[0].out_channels == model[0].weight.shape[0] == model[1].weight.shape[0] == 4
    assert model(x).shape == (2, 4)
