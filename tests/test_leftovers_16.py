"""Defects earlier sessions noticed and left alone (Session 24, leftovers16): each test
fails on the code before its fix (``git`` db85692) and names the number it pins."""

from __future__ import annotations

import os

import pytest
import torch

from cleanai_core.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

ARGS = ["--ratio", "0.25", "--quiet", "--latency-repeats", "1", "--threads", "1"]

from test_leftovers_14 import CNN  # noqa: E402 - the same small conv-BN factory, as a source file


@pytest.fixture
def cnn_job(tmp_path, monkeypatch):
    (tmp_path / "cnn16.py").write_text(CNN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    torch.save((torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)), "d.pt")
    return ["prune", "--model", "cnn16:build", "--data", "d.pt", *ARGS]


# -- 1. an empty or cut-short torch.save file is named as such -------------------------------------


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_an_empty_or_cut_short_saved_model_file_is_named_with_its_size(cnn_job, capsys, cut):
    """A saved folder's empty ``model.pt`` said "cannot be read as plain tensors (EOFError: )",
    one cut in half torch's "failed finding central directory. This is an internal miniz
    error. If you are seeing ..." cut mid-sentence; an empty ``--model`` file "neither a zip
    archive nor a pickle". Each now says what the file is: empty, or an archive of N bytes
    without its closing directory."""
    from cleanai_core.cli import main
    from cleanai_core.io import load_pruned

    assert main([*cnn_job, "--out", "a", "--trust-code"]) == 0
    raw = open("a/model.pt", "rb").read()
    kept = b"" if cut == "empty" else raw[: len(raw) // 2]
    open("a/model.pt", "wb").write(kept)
    want = (
        "the file is empty (0 bytes)"
        if cut == "empty"
        else f"the file is a torch.save archive of {len(kept):,} bytes without the directory a complete one ends "
        "with: it may be truncated or damaged"
    )
    with pytest.raises(UserError) as info:
        load_pruned("a", trust_code=True)
    assert want in str(info.value) and "EOFError" not in str(info.value) and "miniz" not in str(info.value)
    assert "save the pruned model again" in str(info.value)
    open("m.pt", "wb").write(kept)
    assert main(["prune", "--model", "m.pt", "--data", "d.pt", *ARGS, "--out", "b"]) == 2
    err = capsys.readouterr().err
    assert ("'m.pt' is empty (0 bytes); save the model again" if cut == "empty" else f"'m.pt' {want[9:]}") in err
    assert not os.path.exists("b")


def test_an_empty_weights_file_in_a_hugging_face_folder_is_named(tmp_path, monkeypatch, capsys):
    """The same for ``--model hf:FOLDER`` whose ``model.safetensors`` is empty: it said
    "SafetensorError: Error while deserializing header: header too small ... may be
    truncated or damaged, or not fit its config.json (sizes)"."""
    pytest.importorskip("transformers")
    from test_outputs_12 import _tiny_llama

    from cleanai_core.cli import main

    monkeypatch.chdir(tmp_path)
    _tiny_llama().save_pretrained("m")
    open("m/model.safetensors", "wb").close()
    torch.save(torch.randint(0, 61, (8, 12), generator=torch.Generator().manual_seed(0)), "ids.pt")
    assert main(["prune", "--model", "hf:m", "--data", "ids.pt", *ARGS, "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "--model 'hf:m': the weights file 'm/model.safetensors' is empty (0 bytes); save the model again" in err
    assert "SafetensorError" not in err and not os.path.exists("o")


# -- 2. --out names no one means -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out", "words"),
    [
        (" ", "the folder name ' ' is blanks only"),
        ("\u3000", r"the folder name '\u3000' is blanks only"),  # an ideographic space, escaped on the terminal
        ("-", "would write a folder named '-': the result is a folder of files, not a stream to standard output"),
        ("sub/-", "would write a folder named '-'"),
        ("pruned ", "has blanks at its end, so it looks like 'pruned' but is another folder"),
        (" new/pruned", "the folder name ' new' has blanks at its start"),
        ("x/ /y", "the folder name ' ' is blanks only"),
        ("a\tb", r"holds the control character '\t'"),
        ("~/pruned", "the folder '~' would be made here, in "),  # a quoted or config-file path: no ./~ made
    ],
)
def test_an_out_folder_name_of_blanks_a_dash_or_control_characters_is_refused(cnn_job, capsys, out, words):
    """``--out ' '`` and ``--out -`` wrote folders named ``' '`` and ``'-'`` (exit 0), hard
    to see and to remove from a shell; so did a name with a stray blank at an end, and
    ``'~/pruned'`` (not expanded by the shell) made a folder named ``~`` here."""
    from cleanai_core.cli import main
    from cleanai_core.io import save_pruned

    before = sorted(os.listdir("."))
    assert main([*cnn_job, "--trust-code", "--out", out]) == 2
    err = capsys.readouterr().err
    assert words in err
    if out.startswith("~"):
        assert f"Give {os.path.expanduser(out)!r} if that is what you meant" in err
    assert sorted(os.listdir(".")) == before  # nothing written, no parent made
    with pytest.raises(UserError, match="save_pruned's folder"):
        save_pruned(out, torch.nn.Linear(2, 2), None, "x:y")  # refused before its other arguments are read
    assert sorted(os.listdir(".")) == before


def test_an_existing_folder_with_an_odd_name_is_the_users_own_and_is_written_into(cnn_job):
    """Only the folders the run would create are checked: a parent that exists already is
    the user's (``'old '``); the result is written below it."""
    from cleanai_core.cli import main

    os.mkdir("old ")
    assert main([*cnn_job, "--trust-code", "--out", "old /pruned"]) == 0
    assert sorted(os.listdir("old /pruned"))[:3] == ["architecture.json", "config.json", "history.json"]


# -- 3. tensor_split into sections: the pieces move with the width -----------------------------------


class Sections(torch.nn.Module):
    """A conv's channels split into ``n`` sections by ``how``, each read by its own conv."""

    def __init__(self, width: int, n: int, how: str) -> None:
        super().__init__()
        q, r = divmod(width, n)
        self.a, self.n, self.how = torch.nn.Conv2d(3, width, 3, padding=1), n, how
        self.outs = torch.nn.ModuleList(torch.nn.Conv2d(s, 4, 1) for s in [q + 1] * r + [q] * (n - r))

    def forward(self, x):
        y = self.a(x)
        parts = {
            "tensor_split": lambda: torch.tensor_split(y, self.n, dim=1),
            "method": lambda: y.tensor_split(self.n, 1),
            "keyword": lambda: torch.tensor_split(y, sections=self.n, dim=-3),
            "hsplit": lambda: torch.hsplit(y, self.n),
            "indices": lambda: torch.tensor_split(y, [5], dim=1),  # fixed bounds: channels 0-4 stay
        }[self.how]()
        return sum(o(p) for o, p in zip(self.outs, parts, strict=True))


@pytest.mark.parametrize(
    ("width", "n", "how", "after"),
    [
        (8, 2, "tensor_split", 136),  # 4 + 4 channels -> 2 + 2
        (9, 3, "method", 204),  # 3 + 3 + 3 -> 2 + 2 + 2 (one unit of 3 channels of 3 goes)
        (8, 2, "keyword", 136),
        (8, 4, "hsplit", 144),  # 2 x 4 -> 1 x 4
        (8, 3, "tensor_split", None),  # 3 + 3 + 2: sections of unequal sizes cannot shrink alike: kept
        (10, 2, "indices", 264),  # [0:5] fixed, [5:10] free: 2 of channels 5-9 go, 0-4 stay
    ],
)
def test_a_split_into_sections_shrinks_its_pieces_alike_and_matches_the_masking_oracle(width, n, how, after):
    """``torch.tensor_split(y, 2, dim=1)`` traced as two slices with constant bounds, the
    record of ``y[:, 0:4], y[:, 4:8]``: the first range froze, the second was free, and the
    pruned model's ``tensor_split`` moved its bounds (verification kept the group whole;
    ``check_pruner`` named it broken). A split into a number of sections is now recorded as
    the split it is: its pieces shrink alike, index by index."""
    from cleanai_core import StructuredPruner
    from cleanai_core.metrics import count_params
    from cleanai_core.testing import check_pruner

    torch.manual_seed(0)
    model, x = Sections(width, n, how).eval(), torch.randn(2, 3, 6, 6)
    report = check_pruner(model, x)
    assert report.kept_whole == () and report.output_shapes_equal and report.max_abs_diff < 1e-5
    if after is None:  # was: channels 6-7 free, and the pruned model's sections moved (3 + 2 + 2)
        assert report.params_after == report.params_before == 268
        with pytest.raises(UserError, match="split_with_sizes.default in model splits channels into unequal parts"):
            StructuredPruner(model, x, importance="magnitude", pruning_ratio=0.5)
        return
    pruned = StructuredPruner(model, x, importance="magnitude", pruning_ratio=0.5).prune()
    assert count_params(pruned) == after
    with torch.no_grad():
        assert pruned(x).shape == (2, 4, 6, 6)


# -- 4. a trace failure the user caused is a UserError; one of the trace itself is not ------------

ODD_MODELS = """
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode


class NoTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        self.c(x)
        return "done"


class TraceShy(nn.Module):
    # runs plainly; fails under a dispatch mode (an op the recorder cannot run, as it stands for)
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if _get_current_dispatch_mode() is not None:
            raise RuntimeError("this op cannot run under a dispatch mode")
        return self.c(x)


def no_tensor():
    return NoTensor()


def trace_shy():
    return TraceShy()


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
"""


@pytest.fixture
def odd_models(tmp_path, monkeypatch):
    (tmp_path / "odd16.py").write_text(ODD_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import importlib

    return importlib.import_module("odd16")


def test_trace_failures_the_user_caused_are_user_errors_and_the_traces_own_are_not(odd_models):
    """``TraceError`` was a ``RuntimeError`` whichever side was at fault: the wrong input
    shape, a forward returning no tensor, and a forward the recorder could not run all came
    out of the command line as "failed" (exit 1), and the last was told to "check that
    example_inputs match". The user's are now :class:`TraceInputError` (a ``UserError``
    and still a ``TraceError``) with a ``kind``; the trace's own stay ``TraceError``."""
    from cleanai_core import DependencyGraph
    from cleanai_core.errors import TraceError, TraceInputError

    x = torch.randn(1, 3, 8, 8)
    cases = [
        (odd_models.build(), torch.randn(1, 5, 8, 8), "inputs", "It fails the same way run plainly"),
        (odd_models.no_tensor(), x, "output", "holds no tensors"),
    ]
    for model, inputs, kind, words in cases:
        with pytest.raises(TraceInputError) as info:
            DependencyGraph(model, inputs)
        assert isinstance(info.value, UserError) and isinstance(info.value, TraceError)
        assert info.value.kind == kind and words in str(info.value)
    assert info.value.returned == "str"
    with pytest.raises(TraceError) as info:
        DependencyGraph(odd_models.trace_shy(), x)
    assert not isinstance(info.value, UserError)
    assert "It runs on the same inputs without CleanAI's hooks, so the failure comes from tracing it" in str(info.value)
    assert "Check that example_inputs match" not in str(info.value)


def test_explain_names_a_model_without_tensor_outputs_and_a_trace_fault_as_they_are(odd_models, capsys):
    """``cleanai explain`` turned every ``TraceError`` into "Tried --input-shape 1,3,224,224;
    pass the right one" (exit 2): a forward returning a string was told to pass
    ``output_transform`` (a Python argument) and another input shape, a model the recorder
    could not run was blamed on its input shape."""
    from cleanai_core.cli import main

    assert main(["explain", "--model", "odd16:no_tensor", "--input-shape", "1,3,8,8"]) == 2
    err = capsys.readouterr().err
    assert "--model 'odd16:no_tensor' returned str on the example input, which holds no tensors" in err
    assert "output_transform" not in err and "Tried --input-shape" not in err
    assert main(["explain", "--model", "odd16:trace_shy", "--input-shape", "1,3,8,8"]) == 1
    err = capsys.readouterr().err
    assert "cleanai explain: failed: the model failed to run on the example inputs while tracing" in err
    assert "the failure comes from tracing it" in err and "pass the right one" not in err
    assert main(["explain", "--model", "odd16:build", "--input-shape", "1,5,8,8"]) == 2
    assert "It fails the same way run plainly" in capsys.readouterr().err
    assert main(["explain", "--model", "odd16:build", "--input-shape", "1,3,8,8"]) == 0


# -- 5. cleanai demo reads the CLEANAI_* variables as the other commands do ---------------------------


def test_the_demo_reads_cleanai_variables_below_its_command_line(tmp_path, monkeypatch, capsys):
    """``CLEANAI_RATIO=0.2 cleanai demo`` pruned 0.5, and ``CLEANAI_OUT`` / ``CLEANAI_QUIET``
    were ignored without a word, where ``cleanai prune`` and ``cleanai sensitivity`` read
    them. The demo now resolves its options as prune does (variables < command line), with
    its own defaults below both; the variables naming a model or data set are not its own
    and it says so."""
    import json

    from cleanai_core.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLEANAI_RATIO", "0.2")
    monkeypatch.setenv("CLEANAI_OUT", "from-env")
    monkeypatch.setenv("CLEANAI_MODEL", "timm:resnet18")
    monkeypatch.setenv("CLEANAI_IMPORTANCE", "magnitude")
    assert main(["demo", "--epochs", "1", "-q"]) == 0
    assert "note: cleanai demo uses its embedded model and data; CLEANAI_MODEL not read here" in capsys.readouterr().err
    assert not os.path.exists("cleanai-demo-out")
    config = json.loads(open("from-env/config.json").read())
    assert (config["ratio"], config["importance"]) == (0.2, "magnitude")
    assert config["model"] == "cleanai_plugins.io.demo:DigitsCNN"
    report = json.loads(open("from-env/report.json").read())
    assert (report["pruning_ratio"], report["units_before"], report["units_after"]) == (0.2, 160, 130)
    assert main(["demo", "--epochs", "1", "-q", "--ratio", "0.5", "--out", "given"]) == 0  # the command line wins
    assert json.loads(open("given/report.json").read())["units_after"] == 80
    monkeypatch.setenv("CLEANAI_RATIO", "2")
    assert main(["demo", "--epochs", "1", "-q"]) == 2
    assert "--ratio=2.0 is out of range: it must be in (0.0, 1.0)" in capsys.readouterr().err


# -- 6. one sample too large for the memory is refused before it runs --------------------------------


def test_a_first_sample_beyond_the_free_memory_is_refused_before_it_runs(cnn_job, monkeypatch, capsys):
    """The batch check needs the first sample's forward, so one sample too large for the
    machine (an 8192 x 8192 image through a wide stem) was ended by the out-of-memory killer
    in that forward, without a word. Its peak is now estimated first on the meta device
    (16 channels x 8 x 8 float32 in and out of the BatchNorm: 8,192 bytes, as measured)."""
    import cleanai_core.job.memory as memory
    import cleanai_core.job.run as run
    from cleanai_core.cli import main

    def never(*a, **k):
        raise AssertionError("the real first forward ran")

    monkeypatch.setattr(memory, "free_memory", lambda device: 8191)
    monkeypatch.setattr(run, "sample_peak", never)
    assert main([*cnn_job, "--trust-code", "--out", "o"]) == 2  # --image-size does not apply to a .pt (faults16)
    err = capsys.readouterr().err
    assert "one sample of shape [1, 3, 8, 8] needs at least 8.2 kB" in err and "estimated without running it" in err
    assert "more than the 8.2 kB of memory free on cpu" in err and "Give smaller inputs" in err
    assert not os.path.exists("o")


def test_the_meta_estimate_equals_the_measured_peak_and_leaves_the_model_as_it_was():
    """The estimate is the measured peak (ResNet-style blocks, an attention) where the
    forward runs on meta tensors, ``None`` where it reads values; a forward that caches its
    input keeps its own tensor, not a meta one."""
    from cleanai_core.job.memory import meta_sample_peak, sample_peak

    class Caching(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.last = torch.nn.Conv2d(3, 16, 3, padding=1), None
            self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            self.last = x
            h = self.c(x).flatten(2).transpose(1, 2)
            return self.attn(h, h, h)[0]

    class ReadsValues(Caching):
        def forward(self, x):
            return self.c(x) * float(x.abs().max().item())

    model, x = Caching().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad(), sample_peak() as peak:
        model(x)
    model.last = "mine"
    # the attention: its input (one tensor, 4,096 bytes), output (4,096) and averaged weights (64 x 64: 16,384)
    assert meta_sample_peak(model, x) == peak() == 24_576
    assert model.last == "mine" and model.c.weight.device.type == "cpu"
    assert meta_sample_peak(ReadsValues().eval(), x) is None


# -- 7. a model pruned after fusing -------------------------------------------------------------------

FUSED = """
import torch
import cnn16


def build(groups=(("0", "1", "2"),)):
    return torch.ao.quantization.fuse_modules(cnn16.build().eval(), [list(g) for g in groups])


def conv_bn():
    return build((("0", "1"),))


class Block(torch.nn.Module):  # a BatchNorm deleted once folded in (YOLO-style fuse())
    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x)
        return self.fc((self.bn(x) if hasattr(self, "bn") else x).mean((2, 3)))


def block():
    torch.manual_seed(0)
    return Block().eval()


def block_fused():
    m = block()
    m.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(m.conv, m.bn)
    del m.bn
    return m
"""


@pytest.mark.parametrize(
    ("groups", "factory", "changed"),
    [
        ((("0", "1", "2"),), "build", "'0' is ConvReLU2d where it builds Conv2d, '1' is Identity where it builds "
         "BatchNorm2d, '2' is Identity where it builds ReLU"),
        ((("0", "1"),), "conv_bn", "'1' is Identity where it builds BatchNorm2d"),
    ],
)  # fmt: skip
def test_a_model_pruned_after_fusing_is_saved_with_a_factory_that_fuses_and_refused_with_the_spec_before(
    cnn_job, groups, factory, changed
):
    """``save_pruned`` of a model fused after it was built (``fuse_modules``: conv + bn (+ relu))
    with the unfused spec wrote a folder that ``load_pruned`` then called "damaged, tampered
    with or not written by this CleanAI" (``step 0 names module '0.0'``), or said "a new
    head?" when only the BatchNorm had gone. It now names the fused layers and the factory
    that loads; with that factory the folder loads to the same outputs."""
    from cleanai_core import StructuredPruner
    from cleanai_core.io import load_pruned, save_pruned
    from cleanai_core.metrics import count_params

    open("fused16.py", "w").write(FUSED)
    import cnn16

    model = torch.ao.quantization.fuse_modules(cnn16.build().eval(), [list(g) for g in groups])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pruner = StructuredPruner(model, x, importance="magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    with pytest.raises(UserError) as info:
        save_pruned("a", pruned, pruner.history, "cnn16:build")
    assert f"the model was changed after 'cnn16:build' built it ({changed}): layers fused" in str(info.value)
    assert "package.module:factory that builds the model as it was pruned" in str(info.value)
    assert not os.path.exists("a")
    save_pruned("a", pruned, pruner.history, f"fused16:{factory}")
    again = load_pruned("a", trust_code=True)
    assert count_params(again) == count_params(pruned) == 844
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


def test_a_model_whose_batchnorm_was_deleted_after_folding_names_it_gone(cnn_job):
    """A BatchNorm folded into its conv and deleted (``del m.bn``): "'bn' (BatchNorm2d) is
    gone"; the factory that folds it the same way loads."""
    from cleanai_core import StructuredPruner
    from cleanai_core.io import load_pruned, save_pruned

    open("fused16.py", "w").write(FUSED)
    import fused16

    model, x = fused16.block_fused(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pruner = StructuredPruner(model, x, importance="magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    with pytest.raises(UserError, match=r"changed after 'fused16:block' built it \('bn' \(BatchNorm2d\) is gone\)"):
        save_pruned("a", pruned, pruner.history, "fused16:block")
    save_pruned("a", pruned, pruner.history, "fused16:block_fused")
    with torch.no_grad():
        assert torch.equal(load_pruned("a", trust_code=True)(x), pruned(x))
