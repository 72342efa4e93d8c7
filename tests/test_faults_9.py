"""Ninth round of bad input and faults (docs/reliability.md, "Session 19: bad inputs"):
models and data sets whose code raises what no list of exception types foresaw, calls
``sys.exit`` or starts failing part-way; pipes, devices and loops of links given as files
or destinations; image folders with links; devices torch cannot use; a closed stdout or one
that cannot encode a path; the model itself as an ignored layer; sparse example inputs;
data sets whose ``len()`` is wrong or huge; saved folders' JSON out of any form; taylor
labels as lists or text."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.cli import main
from cleanai_core.errors import UserError

DEMO = "cleanai_plugins.io.demo:DigitsCNN"


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


class OwnError(Exception):
    """A model's own exception class."""


class FailsOnCall(nn.Module):
    """Runs ``small_net`` and raises ``CLEANAI_TEST_RAISE`` on call number ``CLEANAI_TEST_AT``."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.calls = small_net(), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == int(os.environ["CLEANAI_TEST_AT"]):
            kind = os.environ["CLEANAI_TEST_RAISE"]
            if kind == "exit":
                raise SystemExit(0)
            raise {"assert": AssertionError, "key": KeyError, "stop": StopIteration, "own": OwnError}[kind]("boom")
        return self.net(x)


def fails_on_call() -> nn.Module:
    return FailsOnCall()


class ExitingItems(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == 9:
            raise SystemExit(0)
        return torch.rand(3, 8, 8), i % 4


def exiting_items() -> torch.utils.data.Dataset:
    return ExitingItems()


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    torch.save((torch.rand(16, 3, 8, 8, generator=g), torch.arange(16) % 4), tmp_path / "data.pt")
    return tmp_path


# -- the model's own exceptions, of any type ------------------------------------------------------


@pytest.mark.parametrize("kind", ["assert", "key", "stop", "own"])
@pytest.mark.parametrize(
    ("at", "says"),
    [
        (3, "error: the model failed on the held-out part of --data"),
        (4, "error: the model failed on example_inputs"),
        (5, "failed: the pruned model failed on a calibration batch during the BatchNorm correction"),
        (6, "failed: the pruned model failed on the held-out part of --data, where the original model ran"),
        (8, "error: the model failed while its latency was timed on the example input"),
        (10, "failed: the pruned model failed while its latency was timed"),
    ],
)
def test_a_model_raising_any_exception_type_exits_with_one_line_naming_the_stage(
    ws, capsys, monkeypatch, kind, at, says
):
    monkeypatch.setenv("CLEANAI_TEST_AT", str(at))
    monkeypatch.setenv("CLEANAI_TEST_RAISE", kind)
    rc = main(
        ["prune", "--model", f"{__name__}:fails_on_call", "--data", "data.pt", "--batch-size", "4", "--out", "o", "-q"]
    )
    err = capsys.readouterr().err
    assert rc == (2 if says.startswith("error:") else 1), err  # was a traceback, exit 1
    assert says in err and "boom" in err and "Traceback" not in err, err
    assert not (ws / "o").exists()


def test_a_model_raising_its_own_exception_on_a_calibration_batch_is_named(monkeypatch):
    monkeypatch.setenv("CLEANAI_TEST_AT", "3")
    monkeypatch.setenv("CLEANAI_TEST_RAISE", "own")
    x = torch.rand(2, 3, 8, 8)
    pruner = StructuredPruner(fails_on_call(), x, pruning_ratio=0.5)
    with pytest.raises(
        UserError, match=r"the model failed on calibration batch \d \(input shape \(2, 3, 8, 8\)\): OwnError: boom"
    ):
        pruner.collect_activations([x, x, x, x])


@pytest.mark.parametrize("where", ["model", "data"])
def test_code_that_calls_sys_exit_during_a_run_is_an_error_not_exit_0(ws, capsys, monkeypatch, where):
    monkeypatch.setenv("CLEANAI_TEST_AT", "4")
    monkeypatch.setenv("CLEANAI_TEST_RAISE", "exit")
    model, data = (f"{__name__}:fails_on_call", "data.pt") if where == "model" else (DEMO, f"{__name__}:exiting_items")
    if where == "data":
        model = f"{__name__}:small_net"
    rc = main(["prune", "--model", model, "--data", data, "--batch-size", "4", "--out", "o", "-q"])
    err = capsys.readouterr().err
    assert rc == 2, err  # exit code 0, nothing said, nothing written
    assert "called sys.exit(0) instead of returning or raising an error; the run stopped there and wrote nothing" in err
    assert not (ws / "o").exists() and sorted(p.name for p in ws.iterdir()) == ["data.pt"]


# -- pipes and devices given as files -------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "shown"),
    [
        ("--data", "--data"),
        ("--weights", "--weights"),
        ("--config", "config file"),
        ("--model", "--model"),
        ("--train-data", "--train-data"),
    ],
)
def test_a_named_pipe_given_as_a_file_is_named_and_never_opened(ws, capsys, option, shown):
    os.mkfifo(ws / "pipe.pt")  # opening it waited for a writer for ever (--model with --trust-model: a hang)
    args = {"--data": ["data.pt"], "--model": [DEMO], option: ["pipe.pt"]}
    extra = {"--weights": [], "--config": [], "--model": ["--trust-model"], "--train-data": ["--recover-epochs", "1"]}
    argv = ["prune", "--model", *args["--model"], "--data", *args["--data"], "--out", "o", "-q"]
    if option not in ("--data", "--model"):
        argv += [option, "pipe.pt"]
    rc = main(argv + extra.get(option, []))
    err = capsys.readouterr().err
    assert rc == 2, err  # "does not exist" (it exists), or a hang
    assert f"{shown} 'pipe.pt' is a named pipe (FIFO), not a regular file" in err and "Save the content" in err
    assert not (ws / "o").exists()


def test_a_device_given_as_weights_or_config_is_refused_before_it_is_read(ws, capsys):
    # /dev/zero as --model was read until the out-of-memory killer stopped the process
    for argv in (["--model", "/dev/zero", "--trust-model"], ["--weights", "/dev/zero"], ["--config", "/dev/null"]):
        base = ["prune", "--model", DEMO, "--data", "data.pt", "--out", "o", "-q"]
        assert main(base + argv) == 2
        assert "is a character device, not a regular file" in capsys.readouterr().err
    assert main(["explain", "--model", "/dev/zero", "--trust-model"]) == 2
    assert "--model '/dev/zero' is a character device" in capsys.readouterr().err


def test_a_saved_folder_or_history_file_that_is_a_pipe_is_named(tmp_path):
    from cleanai_core import PruningHistory
    from cleanai_core.io import load_pruned, save_pruned

    pruner = StructuredPruner(small_net(), torch.rand(2, 3, 8, 8), "magnitude", pruning_ratio=0.5)
    save_pruned(tmp_path / "s", pruner.prune(), pruner.history, spec=f"{__name__}:small_net")
    (tmp_path / "s" / "model.pt").unlink()
    os.mkfifo(tmp_path / "s" / "model.pt")
    with pytest.raises(UserError, match=r"the saved folder's file '.*model.pt' is a named pipe \(FIFO\)"):
        load_pruned(tmp_path / "s", trust_code=True)  # said "has no model.pt"
    os.mkfifo(tmp_path / "h.json")
    with pytest.raises(UserError, match=r"history file '.*h.json' is a named pipe \(FIFO\)"):
        PruningHistory.load(tmp_path / "h.json")  # waited for a writer


# -- image folders with links ---------------------------------------------------------------------


def _images(root, classes=("a", "b"), n=4):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40, 50 if c == "a" else 200, 0)).save(root / c / f"{i}.png")


def test_links_back_up_an_image_folder_read_each_image_once(ws, caplog):
    import json

    _images(ws / "imgs")
    (ws / "imgs" / "a" / "sub").mkdir()
    os.symlink("..", ws / "imgs" / "a" / "sub" / "up")  # imgs/a/sub/up/sub/up/... until the path is too long
    os.symlink("..", ws / "imgs" / "a" / "sub" / "up2")  # two such links: a walk of 2**40 paths
    assert main(["prune", "--model", f"{__name__}:small_net", "--data", "imgs", "--image-size", "8", "--out", "o"]) == 0
    report = json.loads((ws / "o" / "report.json").read_text())
    # 8 images were 164 + 164 samples with one link (the same image in both halves)
    assert report["calibration_samples"] + report["evaluation_samples"] == 8
    assert "2 folder(s) or file(s) are reached again through links" in caplog.text


def test_an_image_folder_without_links_keeps_torchvisions_samples_and_order(ws):
    from torchvision.datasets import ImageFolder

    from cleanai_plugins.io.datasets import load_dataset

    _images(ws / "imgs", classes=("a", "a-b", "b"), n=3)
    (ws / "imgs" / "a-b" / "deep").mkdir()
    _images(ws / "imgs" / "a-b" / "deep", classes=("x",), n=2)
    ours = load_dataset("imgs", {"image_size": 8})
    assert ours.samples == ImageFolder("imgs").samples and len(ours.samples) == 11


def test_an_image_linked_into_two_classes_is_refused_naming_both(ws, capsys):
    _images(ws / "imgs")
    os.symlink("../a", ws / "imgs" / "b" / "more")  # class a's images labelled b too
    rc = main(["prune", "--model", f"{__name__}:small_net", "--data", "imgs", "--image-size", "8", "--out", "o"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "is reached from class 'a' ('imgs/a/0.png') and, through a link, from class 'b' ('imgs/b/more/0.png')" in err
    assert "label is ambiguous" in err and not (ws / "o").exists()


def test_a_pipe_among_the_images_is_named_not_waited_on(ws, capsys):
    _images(ws / "imgs")
    os.mkfifo(ws / "imgs" / "b" / "9.png")
    rc = main(["prune", "--model", f"{__name__}:small_net", "--data", "imgs", "--image-size", "8", "--out", "o"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert (
        "cannot read image 'imgs/b/9.png' in --data 'imgs' (OSError: it is a named pipe (FIFO), not a regular file)"
        in err
    )


# -- devices torch can name but not use -----------------------------------------------------------


@pytest.mark.parametrize("device", ["xla", "privateuseone", "hpu", "vulkan"])
def test_a_device_this_pytorch_cannot_use_is_refused_naming_it(ws, capsys, tmp_path, device):
    from cleanai_core.io import load_pruned

    rc = main(["prune", "--model", DEMO, "--data", "data.pt", "--out", "o", "-q", "--device", device])
    err = capsys.readouterr().err
    assert rc == 2, err  # a RuntimeError / ModuleNotFoundError traceback, exit 1
    assert f"--device {device} was asked for, but this PyTorch cannot put a tensor there" in err
    assert "use cpu" in err and not (ws / "o").exists()
    with pytest.raises(UserError, match=f"map_location='{device}' was asked for, but this PyTorch cannot"):
        load_pruned(tmp_path, map_location=device)


# -- a reader that goes away ----------------------------------------------------------------------


class ClosedPipe:
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_output_piped_into_a_reader_that_closes_ends_quietly(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["plugins"]) == 141  # exit 2: "cannot use: Broken pipe. Check the path ... and the disk"
    assert capsys.readouterr().err == ""


def test_cleanai_plugins_into_head_leaves_no_message(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cmd = f"{sys.executable} -m cleanai_core.cli plugins | head -c 10"
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert len(res.stdout) == 10, res.stdout
    assert res.returncode in (0, 141) and res.stderr == "", res.stderr


# -- the model itself as a layer spec -------------------------------------------------------------


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = small_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _size(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_model_itself_as_an_ignored_layer_keeps_every_layer():
    model, x = Wrapped(), torch.rand(2, 3, 8, 8)
    assert _size(StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()) == 288
    for spec in (model, nn.Module, Wrapped):  # the model, or a type only it (and every layer) has
        with pytest.raises(UserError, match=r"nothing in this model can be pruned \(every layer is ignored\)"):
            StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[spec]).prune()  # pruned to 288


def test_the_model_itself_given_a_ratio_sets_every_layers_ratio():
    model, x = small_net(), torch.rand(2, 3, 8, 8)
    plain = StructuredPruner(model, x, "magnitude", pruning_ratio=0.25).prune()
    every = StructuredPruner(model, x, "magnitude", pruning_ratio=0.25, layer_pruning_ratios={"*": 0.75}).prune()
    root = StructuredPruner(model, x, "magnitude", pruning_ratio=0.25, layer_pruning_ratios={model: 0.75}).prune()
    assert (_size(plain), _size(every)) == (538, 110)
    assert _size(root) == 110  # 538: the ratio was dropped without a word


def test_the_graph_ignores_what_a_container_holds_as_the_pruner_does():
    from cleanai_core import DependencyGraph

    model, x = Wrapped(), torch.rand(2, 3, 8, 8)
    for spec in (model.body, "body"):
        assert DependencyGraph(model, x, ignored_layers=[spec]).ignored == {"body", *(f"body.{i}" for i in range(8))}
    assert DependencyGraph(model, x, ignored_layers=[model.body[0]]).ignored == {"body.0"}


# -- sparse inputs --------------------------------------------------------------------------------


class SparseGraphNet(nn.Module):
    """Node features through an MLP plus a message sum over a sparse adjacency matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + torch.sparse.mm(adj, x).sum(1, keepdim=True)


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("importance", ["magnitude", "weight_activation"])
def test_a_sparse_adjacency_matrix_among_the_example_inputs_prunes(layout, importance):
    torch.manual_seed(0)
    adj = (torch.rand(5, 5) > 0.5).float()
    adj = adj.to_sparse() if layout == "coo" else adj.to_sparse_csr()
    x = torch.rand(5, 6)
    model = SparseGraphNet()
    before = model(adj, x)
    pruner = StructuredPruner(model, (adj, x), importance, pruning_ratio=0.5)  # NotImplementedError / RuntimeError
    if importance == "weight_activation":
        pruner.collect_activations([((adj, x), torch.zeros(5, dtype=torch.long))] * 3)
    pruned = pruner.prune()
    assert _size(pruned) == 43 and pruned(adj, x).shape == (5, 3)  # 83 -> 43: 4 of a's 8 units
    assert torch.equal(model(adj, x), before)
    inf = torch.sparse_coo_tensor([[0], [1]], [float("inf")], (5, 5))
    with pytest.raises(UserError, match="example_inputs contain NaN or inf values"):
        StructuredPruner(SparseGraphNet(), (inf, x), "magnitude")


# -- a terminal that cannot show the user's paths -------------------------------------------------


def test_a_path_the_terminal_cannot_encode_is_escaped_not_a_crash_after_writing(ws, monkeypatch):
    import io

    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")  # LC_ALL=C, PYTHONIOENCODING=ascii, cp1252
    monkeypatch.setattr("sys.stdout", ascii_out)
    rc = main(["prune", "--model", f"{__name__}:small_net", "--data", "data.pt", "--out", "öut ü", "--quiet"])
    ascii_out.flush()
    printed = ascii_out.buffer.getvalue().decode("ascii")
    assert rc == 0  # UnicodeEncodeError after the result was written: a traceback, exit 1
    assert "wrote \\xf6ut \\xfc/: model.pt" in printed
    assert (ws / "öut ü" / "model.pt").is_file()


def test_an_input_shape_of_more_dimensions_than_torch_has_is_refused(capsys):
    assert main(["explain", "--model", f"{__name__}:small_net", "--input-shape", ",".join(["1"] * 65)]) == 2
    assert "--input-shape has 65 dimensions; torch tensors have at most 64" in capsys.readouterr().err  # a traceback


# -- data sets whose len() is wrong or huge -------------------------------------------------------


class Overcounted(torch.utils.data.Dataset):
    """Holds 16 items; ``len()`` says ``CLEANAI_TEST_LEN``."""

    def __len__(self) -> int:
        return int(os.environ["CLEANAI_TEST_LEN"])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i >= 16:
            raise IndexError(i)
        return torch.rand(3, 8, 8), i % 4


def overcounted() -> torch.utils.data.Dataset:
    return Overcounted()


@pytest.mark.parametrize("length", [40, 10**12])
def test_a_data_set_whose_len_overcounts_is_named_with_its_len(ws, capsys, monkeypatch, length):
    monkeypatch.setenv("CLEANAI_TEST_LEN", str(length))
    argv = ["prune", "--model", f"{__name__}:small_net", "--data", f"{__name__}:overcounted", "--out", "o", "-q"]
    rc = main(argv + ["--batch-size", "4"])
    err = capsys.readouterr().err
    assert rc == 2, err  # 10**12: the split's permutation, 8,000 GB, a RuntimeError traceback
    assert f"Its len() is {length:,}, and item" in err and "check that __len__ counts only the items" in err
    assert "Traceback" not in err and not (ws / "o").exists()


def test_a_large_data_set_is_split_by_a_permutation_computed_per_index(monkeypatch):
    from cleanai_core.job import inputs

    small = inputs.split_dataset(list(range(50)), 0.5, 3)
    monkeypatch.setattr(inputs, "LISTED_SPLIT", 10)
    calib, held = inputs.split_dataset(list(range(1000)), 0.3, 7)
    assert isinstance(calib.indices, inputs.Shuffled) and (len(calib), len(held)) == (300, 700)
    assert sorted([*calib.indices, *held.indices]) == list(range(1000))  # a permutation: every item once
    assert list(calib.indices) != list(range(300))
    assert list(inputs.split_dataset(list(range(1000)), 0.3, 7)[0].indices[:5]) == list(calib.indices[:5])  # seeded
    monkeypatch.setattr(inputs, "LISTED_SPLIT", 10**7)
    assert inputs.split_dataset(list(range(50)), 0.5, 3)[0].indices == small[0].indices  # small sets as before


# -- saved folders' JSON out of any form, loops of links as destinations --------------------------


@pytest.mark.parametrize(
    ("file", "text", "says"),
    [
        ("architecture.json", "[" * 100000 + "]" * 100000, "nested too deeply to be a CleanAI file"),  # RecursionError
        ("history.json", "[" * 100000 + "]" * 100000, "nested too deeply to be a CleanAI file"),
        ("history.json", "1" * 100000, "Exceeds the limit (4300 digits)"),  # ValueError traceback
        ("architecture.json", '{"format": ' + "1" * 5000 + "}", "Exceeds the limit (4300 digits)"),
        ("architecture.json", None, "key 'spec' appears twice"),  # loaded, the last 'spec' winning
    ],
)
def test_a_saved_folders_json_out_of_any_form_is_a_damaged_folder(tmp_path, file, text, says):
    from cleanai_core import PruningHistory
    from cleanai_core.io import load_pruned, save_pruned

    pruner = StructuredPruner(small_net(), torch.rand(2, 3, 8, 8), "magnitude", pruning_ratio=0.5)
    save_pruned(tmp_path / "s", pruner.prune(), pruner.history, spec=f"{__name__}:small_net")
    path = tmp_path / "s" / file
    if text is None:
        text = path.read_text().replace('"spec":', '"spec": "timm:resnet18", "spec":', 1)
    path.write_text(text)
    with pytest.raises(UserError, match="The folder is damaged, tampered with") as err:
        load_pruned(tmp_path / "s", trust_code=True)
    assert says in str(err.value)
    if file == "history.json":
        with pytest.raises(UserError, match="The folder is damaged"):
            PruningHistory.load(path)


@pytest.mark.parametrize("out", ["loop", "pair/sub"])
def test_a_destination_through_a_loop_of_links_is_named(ws, capsys, out):
    from cleanai_core.io import save_pruned

    os.symlink("loop", ws / "loop")
    os.symlink("pair2", ws / "pair")
    os.symlink("pair", ws / "pair2")
    rc = main(["prune", "--model", f"{__name__}:small_net", "--data", "data.pt", "--out", out, "-q"])
    assert rc == 2  # RuntimeError: Symlink loop from '.../loop', a traceback
    assert f"'{out}' goes through a loop of symbolic links" in capsys.readouterr().err
    pruner = StructuredPruner(small_net(), torch.rand(2, 3, 8, 8), "magnitude", pruning_ratio=0.5)
    with pytest.raises(UserError, match=f"'{out}' goes through a loop of symbolic links"):
        save_pruned(out, pruner.prune(), pruner.history, spec=f"{__name__}:small_net")
    assert sorted(p.name for p in ws.iterdir()) == ["data.pt", "loop", "pair", "pair2"]


@pytest.mark.parametrize("option", ["--data", "--weights", "--config", "--model", "--train-data"])
def test_an_input_that_is_a_loop_of_links_is_named_not_missing(ws, capsys, option):
    os.symlink("in.pt", ws / "in.pt")
    argv = ["prune", "--model", DEMO, "--data", "data.pt", "--out", "o", "-q", option, "in.pt"]
    argv += {"--model": ["--trust-model"], "--train-data": ["--recover-epochs", "1"]}.get(option, [])
    assert main(argv) == 2
    err = capsys.readouterr().err  # "does not exist" / "no such file"
    assert "'in.pt' is a loop of symbolic links (a link that leads back to itself), so there is nothing to read" in err
    assert main(["explain", "--model", "in.pt"]) == 2
    assert "--model 'in.pt' is a loop of symbolic links" in capsys.readouterr().err


# -- labels of gradient criteria as plain lists or text -------------------------------------------


def test_taylor_labels_as_a_list_of_ints_score_as_the_tensor_and_text_labels_are_named():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(9))

    def pruned(labels):
        pruner = StructuredPruner(small_net(), x, "taylor", pruning_ratio=0.5)
        pruner.collect_activations([(x, labels)])
        return pruner.prune()

    expected = pruned(torch.tensor([0, 1, 2, 3]))
    got = pruned([0, 1, 2, 3])  # "needs a tensor of logits and a tensor of labels; pass output_transform=..."
    assert all(
        torch.equal(a, b) for a, b in zip(got.state_dict().values(), expected.state_dict().values(), strict=True)
    )
    with pytest.raises(UserError, match=r"the labels are text \(e.g. 'cat'\); give integer class indices"):
        pruned(["cat", "dog", "cat", "dog"])
    with pytest.raises(UserError, match=r"the label is text \('cat'\)"):
        pruner = StructuredPruner(small_net(), x, "taylor", pruning_ratio=0.5)
        pruner.collect_activations([{"input": x, "labels": "cat"}])
        pruner.prune()


# -- a model that starts failing part-way through the sensitivity analysis -------------------------

_CALLS = [0]


class FailsFromCall(nn.Module):
    """Fails on every call from the ``CLEANAI_TEST_AT``-th on (counted outside the model, where
    the model's state being put back after each run does not reset it)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _CALLS[0] += 1
        if _CALLS[0] >= int(os.environ["CLEANAI_TEST_AT"]):
            raise KeyError("boom")
        return self.net(x)


def fails_from_call() -> nn.Module:
    _CALLS[0] = 0
    return FailsFromCall()


@pytest.mark.parametrize("at", [6, 9, 12, 17, 20])
def test_a_model_failing_part_way_through_sensitivity_stops_with_one_line(ws, capsys, monkeypatch, at):
    monkeypatch.setenv("CLEANAI_TEST_AT", str(at))
    argv = ["sensitivity", "--model", f"{__name__}:fails_from_call", "--data", "data.pt", "--batch-size", "4"]
    rc = main([*argv, "--out", "o", "-q"])
    err = capsys.readouterr().err
    # was a KeyError traceback (exit 1) from the reference pass, FLOPs counting or a trial's BatchNorm pass, or
    # exit 0 with every trial read as "cannot be pruned": KL 0 for every group
    assert rc in (1, 2) and "Traceback" not in err, err
    assert "KeyError: 'boom'" in err and len(err.strip().splitlines()) == 1, err
    assert not (ws / "o").exists()
