"""Thirteenth round of bad input and faults (docs/reliability.md, "Session 22: faults13"):
values a file holds in a wider type than the reader assumed (16-bit and float images, JSON
numbers past int64 or float32), and the cases below each heading."""

from __future__ import annotations

import json

import pytest
import torch

from cleanai_core.cli import main
from cleanai_core.errors import UserError
from cleanai_plugins.io.datasets import load_dataset
from cleanai_plugins.io.demo import DigitsCNN

DEMO = "cleanai_plugins.io.demo:DigitsCNN"


# -- images wider than 8 bits --------------------------------------------------------------------------


def _image_folder(root, make, ext="png", n=3):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            make(i).save(root / c / f"{i}.{ext}")
    return root


def _pixels(root, model):
    ds = load_dataset(str(root), {"model": model, "image_size": 8})
    return torch.stack([ds[i][0] for i in range(len(ds))])


@pytest.mark.parametrize("mode", ["I;16", "I"])
@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_image_reads_as_the_8_bit_image_it_scales_to(tmp_path, mode, channels):
    # PIL's convert("L") / ("RGB") clips a 16-bit image at 255: an X-ray folder read all but white
    # (every normalised pixel 2.44 for the one-channel model) and the job pruned on it, exit 0
    np = pytest.importorskip("numpy")
    from PIL import Image

    rng = np.random.default_rng(0)
    eight = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(3)]
    wide = (lambda v: Image.fromarray(v.astype(np.uint16) * 257)) if mode == "I;16" else (
        lambda v: Image.fromarray(v.astype(np.int32) * 257, "I"))  # fmt: skip
    ext = "png" if mode == "I;16" else "tiff"  # PNG does not store mode I
    a = _image_folder(tmp_path / "wide", lambda i: wide(eight[i]), ext=ext)
    b = _image_folder(tmp_path / "eight", lambda i: Image.fromarray(eight[i]))
    model = DigitsCNN() if channels == 1 else torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    got, want = _pixels(a, model), _pixels(b, model)
    assert Image.open(a / "a" / f"0.{ext}").mode == mode
    assert got.shape == want.shape == (6, channels, 8, 8)
    assert torch.equal(got, want)
    assert float(want.max()) - float(want.min()) > 3  # a real spread of values, not one white level


@pytest.mark.parametrize("array, mode", [("float", "F"), ("wide_int", "I")])
def test_an_image_of_32_bit_values_is_refused_by_name(tmp_path, capsys, array, mode):
    # a float TIFF of values in [0, 1] read all black (every value cut to 0), exit 0
    np = pytest.importorskip("numpy")
    from PIL import Image

    values = {"float": np.linspace(0, 1, 64, dtype=np.float32), "wide_int": np.arange(64, dtype=np.int32) * 2**20}
    imgs = _image_folder(tmp_path / "imgs", lambda i: Image.fromarray(values[array].reshape(8, 8)), ext="tiff")
    torch.save(DigitsCNN().state_dict(), tmp_path / "w.pt")
    code = main(["prune", "--model", DEMO, "--weights", str(tmp_path / "w.pt"), "--data", str(imgs),
                 "--image-size", "8", "--out", str(tmp_path / "o"), "-q"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"(PIL mode '{mode}', values 0 to " in err and "imgs/" in err and ".tiff': it is a 32-bit" in err
    assert "Save the images as 8- or 16-bit PNG" in err
    assert not (tmp_path / "o").exists()


# -- JSON numbers past what a tensor holds -------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_heads(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from test_hf_job import save

    root = tmp_path_factory.mktemp("faults13_bert")
    for name, kw in [("cls", {"num_labels": 3}), ("reg", {"num_labels": 1, "problem_type": "regression"})]:
        cfg = transformers.BertConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=64, **kw)  # fmt: skip
        torch.manual_seed(0)
        save(transformers.BertForSequenceClassification(cfg).eval(), root / name)
    return root


def _jsonl(path, bad: str) -> None:
    path.write_text("\n".join('{"text": "hello world", "label": %s}' % (bad if i == 5 else i % 2) for i in range(20)))


@pytest.mark.parametrize(
    "head, bad, words",
    [
        ("cls", str(10**30), "labels go from 0 to 1000000000000000000000000000000; the model has 3 classes"),
        ("cls", "1" * 5000, "line 6 is not JSON (Exceeds the limit (4300 digits)"),
        ("reg", str(10**400), "is not a finite number within float32's range; the model is a regression head"),
        ("reg", "NaN", "label nan is not a finite number within float32's range"),
        ("reg", "1e400", "label inf is not a finite number"),
        ("reg", "1e39", "label 1e+39 is not a finite number within float32's range"),
    ],
)
def test_jsonl_labels_past_int64_or_float32_are_refused(tmp_path, capsys, bert_heads, head, bad, words):
    # 10**30 raised "ValueError: Overflow when unpacking long long" (10**400 for a regression head
    # "OverflowError: int too large to convert to float"), tracebacks; a 5,000-digit number Python's
    # own ValueError; NaN, 1e400 and 1e39 targets of a regression head pruned with exit 0 on a NaN loss
    from test_hf_job import FAST

    _jsonl(tmp_path / "d.jsonl", bad)
    code = main(["prune", "--model", f"hf:{bert_heads / head}", "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "o"), *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and words in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e39])
def test_tokenized_regression_targets_that_are_not_finite_are_refused(tmp_path, bert_heads, bad):
    # the same targets in a tokenized .pt: taken with .float(), pruned and reported on a NaN loss
    import transformers

    from cleanai_plugins.io.text import load_text_dataset

    model = transformers.AutoModelForSequenceClassification.from_pretrained(bert_heads / "reg")
    labels = torch.rand(8, dtype=torch.float64)
    labels[3] = bad
    torch.save({"input_ids": torch.randint(5, 259, (8, 16)), "labels": labels}, tmp_path / "t.pt")
    with pytest.raises(UserError, match="labels hold NaN, inf or values beyond float32's range; the model is a "
                       "regression head: give finite targets"):  # fmt: skip
        load_text_dataset(str(tmp_path / "t.pt"), {"model": model, "seq_len": 16})


def test_a_jsonl_line_nested_past_the_stack_is_not_json(tmp_path):
    from cleanai_plugins.io.text import read_jsonl

    (tmp_path / "deep.jsonl").write_text(json.dumps({"text": "a", "label": 0}) + "\n" + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match=r"'.*deep.jsonl' line 2 is not JSON \(maximum recursion depth"):
        read_jsonl(tmp_path / "deep.jsonl")


# -- a criterion of the user's that returns no scores --------------------------------------------------


@pytest.mark.parametrize(
    "returned, words",
    [
        (lambda g: None, "returned None for group"),
        (lambda g: "abc", "returned 'abc' for group"),
        (lambda g: (i for i in range(g.size)), "returned <generator object"),
        (lambda g: torch.ones(3), "returned 3 score(s) for group"),
        (lambda g: torch.empty(g.size, device="meta"), "returned a tensor on the meta device (no values)"),
    ],
)
def test_an_importance_that_returns_no_scores_names_itself_the_group_and_the_form(returned, words):
    # None, text or a generator raised "TypeError: must be real number, not NoneType" from the
    # conversion; a meta tensor pruned nothing without a word
    from cleanai_core import StructuredPruner

    def my_scores(group, ctx):
        return returned(group)

    model = DigitsCNN().eval()
    pruner = StructuredPruner(model, torch.rand(2, 1, 8, 8), importance=my_scores)
    with pytest.raises(UserError) as info:
        pruner.prune()
    text = str(info.value)
    assert "importance 'my_scores' " in text and words in text, text
    assert "(features.0, features.1, features.3), which has 32 units" in text
    assert "one score per unit, a tensor of shape (32,)" in text
    # a list of numbers, a column and integer scores are scores
    for ok in (lambda g: [1.0] * g.size, lambda g: torch.rand(g.size, 1), lambda g: torch.arange(g.size)):
        kept = StructuredPruner(DigitsCNN().eval(), torch.rand(2, 1, 8, 8), importance=lambda g, c, f=ok: f(g))
        assert sum(p.numel() for p in kept.prune().parameters()) == 28433


# -- values a narrower dtype cannot hold -------------------------------------------------------------------


def test_data_values_beyond_the_dtype_they_are_read_in_are_named_not_called_nan(tmp_path, capsys, monkeypatch):
    # float64 data of 1e300 (read as float32) was refused with "contains NaN or inf values ... clean the
    # data"; float32 data of 1e5 for a float16 model alike, or "non-finite activations" from a later item
    monkeypatch.chdir(tmp_path)
    y = torch.arange(40) % 10
    torch.save(DigitsCNN().state_dict(), "w.pt")
    torch.save((torch.rand(40, 1, 8, 8, dtype=torch.float64) * 1e300, y), "f64.pt")
    x = torch.rand(40, 1, 8, 8)
    x[7, 0, 1, 1] = 1e5
    torch.save((x, y), "big.pt")
    args = ["prune", "--model", DEMO, "--weights", "w.pt", "--out", "o", "-q"]
    assert main([*args, "--data", "f64.pt"]) == 2
    err = capsys.readouterr().err
    assert "f64.pt: float64 values up to 1e+300 in magnitude do not fit in float32 (at most 3.4e+38)" in err
    assert "NaN" not in err and not (tmp_path / "o").exists()
    from cleanai_core.job.inputs import CheckedDataset
    from cleanai_plugins.io.datasets import load_dataset

    half = CheckedDataset(load_dataset("big.pt", {}), DigitsCNN().half(), "big.pt")
    assert half[6][0].dtype == torch.float16
    with pytest.raises(UserError, match=r"--data 'big.pt': item 7: float32 values up to 1e\+05 in magnitude do "
                       r"not fit in float16 \(at most 6.55e\+04\)"):  # fmt: skip
        half[7]
    assert CheckedDataset(load_dataset("big.pt", {}), DigitsCNN().bfloat16(), "big.pt")[7][0].dtype == torch.bfloat16


# -- an output folder a command calls its own ----------------------------------------------------------


def test_a_second_demo_replaces_only_its_own_unchanged_files(tmp_path, monkeypatch, capsys):
    # the demo replaced its earlier output folder whole once the marker was in it: a user's notes and a
    # fine-tuned copy put there were deleted, an edited report.md overwritten, without --overwrite
    monkeypatch.chdir(tmp_path)
    demo = ["demo", "--epochs", "1", "-q"]
    assert main(demo) == 0
    out = tmp_path / "cleanai-demo-out"
    # its config.json cannot be rerun by cleanai prune (the model is trained in the run): it was read as the
    # import spec 'embedded:digits.npz' and --trust-code was offered
    assert main(["prune", "--config", str(out / "config.json"), "--out", "again", "-q"]) == 2
    err = capsys.readouterr().err
    assert "'embedded:digits.npz' is the data set cleanai demo embeds" in err and "trust" not in err
    assert not (tmp_path / "again").exists()
    assert main(demo) == 0  # its own, unchanged: replaced
    assert "note: replacing the previous demo output" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    (out / "tuned").mkdir()
    (out / "tuned" / "w.pt").write_bytes(b"mine too")
    assert main(demo) == 2
    err = capsys.readouterr().err
    assert "files it did not write or that changed since (notes.txt, tuned/, tuned/w.pt)" in err
    assert "note: replacing" not in err and "Traceback" not in err
    assert (out / "notes.txt").read_text() == "mine" and (out / "tuned" / "w.pt").read_bytes() == b"mine too"
    (out / "notes.txt").unlink()
    (out / "tuned" / "w.pt").unlink()
    (out / "tuned").rmdir()
    with (out / "report.md").open("a") as fh:
        fh.write("my conclusions\n")
    assert main(demo) == 2
    assert "(report.md); replacing the folder would delete them" in capsys.readouterr().err
    assert (out / "report.md").read_text().endswith("my conclusions\n")
    assert main([*demo, "--overwrite"]) == 0  # asked for
    assert not (out / "report.md").read_text().endswith("my conclusions\n")
    # a folder of an earlier version's demo (a marker without digests) is still its own by its file names
    (out / ".cleanai-demo").write_text("written by cleanai demo\n")
    assert main(demo) == 0
    (out / ".cleanai-demo").write_text("written by cleanai demo\n")
    (out / "notes.txt").write_text("mine")
    assert main(demo) == 2 and "(notes.txt); replacing the folder" in capsys.readouterr().err


# -- tokenized data whose mask or labels are not what the model reads ------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_hf_job import save, tiny_llama

    return save(tiny_llama(), tmp_path_factory.mktemp("faults13_llama") / "llama")


IDS = torch.randint(3, 259, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"attention_mask": torch.full((8, 32), 0.5)}, "attention_mask holds 0.5; a mask is 1 at real tokens"),
        ({"attention_mask": torch.full((8, 32), 2)}, "attention_mask holds 2; a mask is 1 at real tokens and 0 at"),
        ({"attention_mask": torch.zeros(8, 32, dtype=torch.long)}, "attention_mask is 0 everywhere: no row holds"),
        ({"labels": IDS + 0.25}, "labels must be integers (class indices or token ids), not torch.float32"),
        ({"labels": IDS[:, :16]}, "labels (8, 16) must match input_ids (8, 32): one label per token"),
        ({"labels": torch.full((8, 32), 10**6)}, "labels go from 1000000 to 1000000, but the vocabulary has 259 ids"),
    ],
)
def test_tokenized_data_with_a_mask_or_labels_the_model_cannot_read_is_refused(tmp_path, capsys, llama, extra, words):
    # a float mask (cut to 0 by .long()) or one of zeros: "the calibration data holds no samples (every batch
    # is empty)"; a mask of 2: read as 1; float labels: cut to integers and a perplexity reported on them
    # (exit 0); other label shapes / ids: the model's own error from the held-out pass
    from test_hf_job import FAST

    torch.save({"input_ids": IDS, **extra}, tmp_path / "t.pt")
    code = main(["prune", "--model", f"hf:{llama}", "--data", str(tmp_path / "t.pt"), "--out", str(tmp_path / "o"),
                 *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and f"t.pt': {words}" in err, err
    assert not (tmp_path / "o").exists()


def test_tokenized_data_with_padding_rows_and_ignored_labels_still_prunes(tmp_path, llama):
    from cleanai_plugins.io.text import load_text_dataset

    mask = torch.ones(8, 32, dtype=torch.long)
    mask[3] = 0  # an empty document: a row of padding only
    mask[:, 28:] = 0
    labels = IDS.masked_fill(mask == 0, -100).double()  # whole numbers in float64 are token ids
    torch.save({"input_ids": IDS, "attention_mask": mask.bool(), "labels": labels}, tmp_path / "t.pt")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    items = load_text_dataset(str(tmp_path / "t.pt"), {"model": model, "seq_len": 32})
    assert len(items) == 8
    first = items[0]
    assert first["attention_mask"].dtype == torch.long and int(first["attention_mask"].sum()) == 28
    assert first["labels"].dtype == torch.long and torch.equal(first["labels"][:28], IDS[0, :28])
    assert int((items[3]["labels"] == -100).sum()) == 32


def test_class_folders_named_by_numbers_out_of_text_order_are_warned_about(tmp_path, caplog):
    # folders 0..11 are labels in text order (0, 1, 10, 11, 2, ...), as torchvision's ImageFolder reads
    # them: where the names are the class indices, accuracy was measured against shuffled labels, silently
    from PIL import Image

    for c in map(str, range(12)):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.new("L", (8, 8), int(c) * 20).save(tmp_path / "imgs" / c / "0.png")
    caplog.set_level("WARNING", logger="cleanai")
    ds = load_dataset(str(tmp_path / "imgs"), {"model": DigitsCNN(), "image_size": 8})
    assert [ds[i][1] for i in range(12)] == list(range(12))  # unchanged: torchvision's labels
    assert ds.classes[2] == "10"
    text = caplog.text
    assert "folder '10' is label 2 (in numeric order it would be 10)" in text
    assert "name them with leading zeros (00 .. 11)" in text
    for c in map(str, range(12)):  # zero-padded: text order is numeric order, no warning
        (tmp_path / "imgs" / c).rename(tmp_path / "imgs" / f"x{c.zfill(2)}")
    for c in range(12):
        (tmp_path / "imgs" / f"x{c:02d}").rename(tmp_path / "imgs" / f"{c:02d}")
    caplog.clear()
    load_dataset(str(tmp_path / "imgs"), {"model": DigitsCNN(), "image_size": 8})
    assert "numbers" not in caplog.text


# -- weights whose values the model cannot hold -----------------------------------------------------------


def test_weights_beyond_the_models_dtype_or_a_negative_running_variance_are_named(tmp_path, monkeypatch, capsys):
    # float32 weights of 1e5 in a float16 model: loading made them inf and the refusal blamed
    # --alpha/--beta; a running_var below 0: "non-finite activations ...; check the data"
    import sys

    monkeypatch.chdir(tmp_path)
    (tmp_path / "halfnet.py").write_text(
        "from cleanai_plugins.io.demo import DigitsCNN\n\ndef build():\n    return DigitsCNN().half()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("halfnet", None)
    torch.manual_seed(0)
    torch.save((torch.rand(40, 1, 8, 8), torch.arange(40) % 10), "d.pt")
    state = DigitsCNN().state_dict()
    torch.save({**state, "fc.weight": state["fc.weight"].sign() * 1.25e5}, "big.pt")
    torch.save({**state, "features.1.running_var": -state["features.1.running_var"] - 1}, "negvar.pt")
    base = ["prune", "--data", "d.pt", "--out", "o", "-q"]
    assert main([*base, "--model", "halfnet:build", "--weights", "big.pt"]) == 2
    err = capsys.readouterr().err
    assert "the weights in 'big.pt' hold values the model's dtype cannot: fc.weight (float32 values up to 1.25e+05; " \
        "the model's float16 holds at most 6.55e+04)" in err  # fmt: skip
    assert "--alpha" not in err and not (tmp_path / "o").exists()
    assert main([*base, "--model", DEMO, "--weights", "negvar.pt"]) == 2
    err = capsys.readouterr().err
    assert "'features.1.running_var' holds 32 negative running variance(s) (down to -2)" in err
    assert "check the data" not in err and not (tmp_path / "o").exists()
    # the library refuses the same model before anything runs, and leaves it as it was
    from cleanai_core import StructuredPruner

    model = DigitsCNN().eval()
    model.features[1].running_var.fill_(-0.5)
    with pytest.raises(UserError, match=r"'features.1.running_var' holds 32 negative running variance\(s\) \(down to"):
        StructuredPruner(model, torch.rand(2, 1, 8, 8))
    assert bool((model.features[1].running_var == -0.5).all())


# -- run_job as a library call ------------------------------------------------------------------------------


def test_run_job_leaves_the_callers_random_state_threads_and_logging_as_they_were(tmp_path, monkeypatch):
    # run_job seeded the global generator with its seed (the caller's next draws repeated from it, as
    # recover()'s did before it forked the generator), kept --threads and the 'cleanai' logger's level
    import logging

    from cleanai_core import run_job

    monkeypatch.chdir(tmp_path)
    data = torch.utils.data.TensorDataset(torch.rand(40, 1, 8, 8), torch.arange(40) % 10)
    threads, logger = torch.get_num_threads(), logging.getLogger("cleanai")
    level = logger.level
    model = DigitsCNN()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    cfg = {"model": DEMO, "out": "o", "quiet": True, "batch_size": 8, "latency_repeats": 1, "seed": 0,
           "threads": 1 if threads > 1 else 2}  # fmt: skip
    report = run_job(cfg, model=model, dataset=data)
    assert report["params_after"] < report["params_before"] == 56554
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads and logger.level == level
    # the same seed gives the same job: the fork does not change what the job draws
    again = run_job({**cfg, "out": "o2"}, model=DigitsCNN(), dataset=data)
    assert again["params_after"] == report["params_after"]


@pytest.mark.parametrize("kind", ["scripted", "meta"])
def test_run_job_refuses_a_model_the_pruner_cannot_take_by_name(tmp_path, kind):
    # a scripted model raised "TypeError: contains(): incompatible function arguments" (BufferDict), a model
    # on the meta device "NotImplementedError: aten::equal ... Meta tensors", from the job's internals
    from cleanai_core import run_job

    model = torch.jit.script(DigitsCNN()) if kind == "scripted" else DigitsCNN().to("meta")
    data = torch.utils.data.TensorDataset(torch.rand(40, 1, 8, 8), torch.arange(40) % 10)
    words = "is a TorchScript module" if kind == "scripted" else "tensors are on the meta device"
    with pytest.raises(UserError, match=words):
        run_job({"model": DEMO, "out": str(tmp_path / "o"), "quiet": True}, model=model, dataset=data)
    assert not (tmp_path / "o").exists()


# -- the analysis functions' arguments ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def analysed():
    from cleanai_core import StructuredPruner
    from cleanai_core.sensitivity import analyse_sensitivity

    torch.manual_seed(0)
    batches = [(torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    pruner = StructuredPruner(DigitsCNN().eval(), torch.rand(2, 1, 8, 8))
    pruner.collect_activations(batches, progress=False)
    return pruner, batches, analyse_sensitivity(pruner, batches, ratios=[0.5], progress=False)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"ratios": "0.5"}, "ratios='0.5': give a list of ratios strictly between 0 and 1"),
        ({"ratios": None}, "ratios=None: give a list of ratios"),
        ({"num_batches": "2"}, "num_batches='2' must be an integer, at least 1"),
        ({"num_batches": -1}, "num_batches=-1 must be an integer, at least 1"),
        ({"bn_samples": -1}, "bn_samples=-1 must be an integer >= 0"),
        ({"bn_passes": 1.5}, "bn_passes=1.5 must be an integer >= 0"),
        ({"data": None}, "the sensitivity data is a NoneType, which cannot be iterated"),
        ({"pruner": "model"}, "analyse_sensitivity needs the StructuredPruner whose groups it tries"),
    ],
)
def test_analyse_sensitivity_names_an_argument_out_of_form(analysed, kwargs, words):
    # ratios="0.5": "ValueError: could not convert string to float: '.'"; num_batches="2", data=None:
    # TypeError; num_batches=-1: "the data is empty"; a model for the pruner: AttributeError; bn_samples=-1
    # and bn_passes=1.5 were taken
    from cleanai_core.sensitivity import analyse_sensitivity

    pruner, batches, _ = analysed
    args = {"pruner": pruner, "data": batches, "progress": False, **kwargs}
    if args["pruner"] == "model":
        args["pruner"] = DigitsCNN()
    with pytest.raises(UserError) as info:
        analyse_sensitivity(**args)
    assert words in str(info.value)


def test_allocate_ratios_and_history_then_name_an_argument_out_of_form(analysed):
    # allocate_ratios(p, None, ...): AttributeError 'curves'; target_flops="0.5": TypeError comparing str
    # and float; target_flops=0: "give exactly one of ..." though one was given; history.then(5): AttributeError
    from cleanai_core.allocation import allocate_ratios

    pruner, _, result = analysed
    with pytest.raises(UserError, match="needs the SensitivityResult of analyse_sensitivity"):
        allocate_ratios(pruner, None, target_flops=0.5)
    with pytest.raises(UserError, match="target_flops='0.5': give the share to keep, strictly between 0 and 1"):
        allocate_ratios(pruner, result, target_flops="0.5")
    with pytest.raises(UserError, match="target_params=0: give the share to keep"):
        allocate_ratios(pruner, result, target_params=0)
    kept = allocate_ratios(pruner, result, target_flops=torch.tensor(0.6))  # a 0-d tensor is a number
    assert 0 < kept.cost <= 0.6
    with pytest.raises(UserError, match=r"then\(\) needs the PruningHistory of the later prune .*got 5"):
        pruner.history.then(5)


def test_a_pickled_checkpoint_given_as_model_names_the_entry_holding_the_module(tmp_path, capsys):
    torch.save({"epoch": 3, "model": DigitsCNN()}, tmp_path / "ckpt.pt")
    torch.save((torch.rand(40, 1, 8, 8), torch.arange(40) % 10), tmp_path / "d.pt")
    code = main(["prune", "--model", str(tmp_path / "ckpt.pt"), "--trust-model", "--data", str(tmp_path / "d.pt"),
                 "--out", str(tmp_path / "o"), "-q"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "holds a dict, not a torch.nn.Module. Its entry ['model'] is a DigitsCNN" in err
    assert "torch.save(checkpoint['model'], 'model.pt')" in err and not (tmp_path / "o").exists()


# -- inputs of a dtype the model does not compute in ----------------------------------------------------------


@pytest.mark.parametrize(
    "batch, words",
    [
        (torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8), "Its inputs are torch.uint8 but the model computes in "
         "torch.float32: give floating-point values (x.float(), divided by 255 for 8-bit pixel values)"),
        (torch.ones(4, 1, 8, 8, dtype=torch.bool), "Its inputs are torch.bool but the model computes in torch.float32"),
        (torch.ones(4, 1, 8, 8, dtype=torch.cfloat), "Its inputs are torch.complex64 but the model computes in "
         "torch.float32: give real numbers"),
    ],
)  # fmt: skip
def test_a_batch_of_integers_booleans_or_complex_numbers_is_named_by_its_dtype(batch, words):
    # the advice was about shapes only ("Give calibration batches shaped like example_inputs"), after
    # "expected scalar type Byte but found Float"
    from cleanai_core import StructuredPruner

    pruner = StructuredPruner(DigitsCNN().eval(), torch.rand(2, 1, 8, 8))
    with pytest.raises(UserError) as info:
        pruner.collect_activations([batch], progress=False)
    assert words in str(info.value)
    with pytest.raises(Exception) as info:  # the trace of such example inputs alike
        StructuredPruner(DigitsCNN().eval(), batch[:2])
    assert words.replace("Its inputs", "example_inputs") in str(info.value)


def test_token_ids_that_fail_for_another_reason_get_no_dtype_advice():
    from cleanai_core import StructuredPruner

    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 4)).eval()
    pruner = StructuredPruner(model, torch.randint(0, 10, (2, 5)))
    with pytest.raises(UserError) as info:
        pruner.collect_activations([torch.full((2, 5), 50)], progress=False)  # beyond the vocabulary
    assert "index out of range" in str(info.value) and "computes in" not in str(info.value)


# -- an output folder that holds the model folder a loader read ------------------------------------------------


@pytest.mark.parametrize("where", ["the folder", "its parent", "inside it"])
def test_out_is_refused_where_it_holds_or_lies_in_the_hf_model_folder(tmp_path, monkeypatch, capsys, where):
    # --model hf:llama --out llama --overwrite replaced the user's model folder with the result (and its
    # architecture.json then named a folder without the model); --out llama/pruned wrote into it
    pytest.importorskip("transformers")
    from test_hf_job import FAST, TEXT, save, tiny_llama

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outer").mkdir()
    save(tiny_llama(), tmp_path / "outer" / "llama")
    (tmp_path / "docs.txt").write_text(TEXT)
    before = {p.name: p.read_bytes() for p in (tmp_path / "outer" / "llama").iterdir()}
    out = {"the folder": "outer/llama", "its parent": "outer", "inside it": "outer/llama/pruned"}[where]
    code = main(["prune", "--model", "hf:outer/llama", "--data", "docs.txt", "--out", out, "--overwrite", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert ("is inside your input folder" if where == "inside it" else "contains your input") in err
    assert f"{tmp_path / 'outer' / 'llama'}'; choose another folder" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "outer" / "llama").iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "outer").iterdir()) == ["llama"]


# -- a NUL in a path option; errors met in frozen standard-library code ------------------------------------------


@pytest.mark.parametrize("key", ["out", "data", "weights", "train_data"])
def test_a_nul_character_in_a_path_option_is_refused_by_name(tmp_path, monkeypatch, capsys, key):
    # a config file's out = "x\u0000y" ended in "failed: ValueError: embedded null byte, raised by code outside
    # CleanAI (<frozen posixpath>:451: the model's forward, a data set, a factory or a plugin)", exit 1
    monkeypatch.chdir(tmp_path)
    cfg = {"model": DEMO, "data": "d.pt", "out": "o", "quiet": True, key: "x\u0000y"}
    if key == "train_data":
        cfg["recover_epochs"] = 1
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["prune", "--config", "c.json"]) == 2
    err = capsys.readouterr().err
    flag = "--" + key.replace("_", "-")
    assert f"{flag} 'x\\x00y' holds a NUL character (\\x00), which no name or path can hold (from the config " in err
    assert "outside CleanAI" not in err and not list(tmp_path.glob("o*"))


def test_an_error_cleanai_meets_in_frozen_standard_library_code_is_cleanais_not_the_users():
    # the innermost frame '<frozen posixpath>' went through os.path.abspath and became a path in the
    # working folder: the error was blamed on the user's code (exit 1, no traceback)
    import os

    import cleanai_core.cli as cli
    from cleanai_plugins.io import datasets

    with pytest.raises(TypeError) as ours:
        datasets._image_files(5, {"a": 0}, None, True, "x")  # cleanai_plugins -> os.path.expanduser
    assert ours.value.__traceback__ is not None
    assert cli._user_code_frame(ours.value) is None
    with pytest.raises(TypeError) as users:
        os.path.join("a", 5)  # this file (the user's code) -> <frozen posixpath>
    assert cli._user_code_frame(users.value).startswith(__file__ + ":")


def test_a_tilde_in_a_config_files_paths_is_the_home_folder(tmp_path, monkeypatch, capsys):
    # no shell expands a config file's "~/pruned": the run refused "the folder '/cwd/~' it goes in does not
    # exist" (or, where it did, wrote into a folder named "~" beside the config); data = "~/d.pt": no such file
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    torch.save((torch.rand(40, 1, 8, 8), torch.arange(40) % 10), home / "d.pt")
    torch.save(DigitsCNN().state_dict(), home / "w.pt")
    (work / "c.toml").write_text('out = "~/pruned"\ndata = "~/d.pt"\nweights = "~/w.pt"\n')
    assert main(["prune", "--model", DEMO, "--config", "c.toml", "-q"]) == 0, capsys.readouterr().err
    assert (home / "pruned" / "model.pt").is_file() and sorted(p.name for p in work.iterdir()) == ["c.toml"]
    saved = json.loads((home / "pruned" / "config.json").read_text())
    assert saved["out"] == str(home / "pruned") and saved["data"] == str(home / "d.pt")
    monkeypatch.setenv("CLEANAI_OUT", "~/again")  # the environment alike
    assert main(["prune", "--model", DEMO, "--data", str(home / "d.pt"), "-q"]) == 0
    assert (home / "again" / "model.pt").is_file() and not (work / "~").exists()


def test_a_torch_save_file_named_npz_is_named_as_one(tmp_path, capsys):
    # "array 'weights/data.pkl' in the .npz is not in .npy format": the file is torch.save's, named .npz
    torch.save((torch.rand(40, 1, 8, 8), torch.arange(40) % 10), tmp_path / "data.npz")
    code = main(["prune", "--model", DEMO, "--data", str(tmp_path / "data.npz"), "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "is a file written by torch.save (it holds 'data/data.pkl'), not by numpy.savez" in err
    assert "give it the .pt suffix" in err and not (tmp_path / "o").exists()
    (tmp_path / "data.npz").rename(tmp_path / "data.pt")  # renamed, it is read
    args = ["prune", "--model", DEMO, "--data", str(tmp_path / "data.pt"), "--out", str(tmp_path / "o"), "-q"]
    assert main(args) == 0


# -- options set on the pruner after it was built ------------------------------------------------------------


@pytest.mark.parametrize(
    "attr, value, words",
    [
        ("pruning_ratio", 1.5, "pruning_ratio=1.5 must be a number strictly between 0 and 1"),
        ("pruning_ratio", "0.5", "pruning_ratio='0.5' must be a number strictly between 0 and 1"),
        ("pruning_ratio", float("nan"), "pruning_ratio=nan must be a number strictly between 0 and 1"),
        ("round_to", 0, "round_to=0 must be a positive integer"),
        ("target_flops", 2.0, "target_flops=2.0: give the share of FLOPs to keep"),
        ("global_pruning", "no", "global_pruning='no' must be True or False"),
    ],
)
def test_an_option_set_on_the_pruner_after_it_was_built_is_checked_before_it_prunes(attr, value, words):
    # pruner.pruning_ratio = 1.5 pruned 56,554 parameters to 53 without a word; "0.5" and NaN raised
    # TypeError / ValueError from planning; global_pruning = "no" ranked globally
    from cleanai_core import StructuredPruner

    model = DigitsCNN().eval()
    pruner = StructuredPruner(model, torch.rand(2, 1, 8, 8), importance="magnitude")
    setattr(pruner, attr, value)
    for call in (pruner.plan, pruner.prune):
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
            call()
    assert sum(p.numel() for p in model.parameters()) == 56554 and pruner.pruned_model is None


def test_an_importance_name_or_a_ratio_set_after_construction_is_taken():
    from cleanai_core import StructuredPruner

    pruner = StructuredPruner(DigitsCNN().eval(), torch.rand(2, 1, 8, 8), importance="magnitude")
    pruner.importance, pruner.pruning_ratio = "magnitude", torch.tensor(0.5)  # 'str' object is not callable
    assert sum(p.numel() for p in pruner.prune().parameters()) == 14458


def test_weight_activation_options_set_afterwards_are_checked_and_read():
    # imp.weight_ratio = 0.8 set an attribute the scores never read (they stayed at alpha = 0.5);
    # imp.alpha = -1 and imp.form = "nope" were taken
    from cleanai_core import WeightActivationImportance

    imp = WeightActivationImportance()
    imp.weight_ratio = 0.8
    assert imp.alpha == 0.8 and "weight_ratio=0.8" in repr(imp)
    for name, value, words in [("alpha", -1, "both must be >= 0"), ("activation_ratio", float("nan"), "finite"),
                               ("form", "nope", "use 'multiplicative' or 'additive'"),
                               ("statistic", "mean", "use 'auto', 'second_moment' or 'variance'"),
                               ("reducer", "nope", "unknown reducer 'nope'")]:  # fmt: skip
        with pytest.raises(UserError, match=words):
            setattr(imp, name, value)
    assert (imp.alpha, imp.beta, imp.form, imp.statistic, imp.reducer) == (0.8, 0.5, "multiplicative", "auto", "mean")
    assert repr(WeightActivationImportance(0, 1)) == "WeightActivationImportance(weight_ratio=0, activation_ratio=1, " \
        "form='multiplicative')"  # fmt: skip


def test_training_data_with_nan_is_refused_as_the_data_is(tmp_path, monkeypatch, capsys):
    # --train-data of NaN: recovery stopped at once on a NaN loss, with a warning, and the run exited 0
    monkeypatch.chdir(tmp_path)
    y = torch.arange(40) % 10
    torch.save(DigitsCNN().state_dict(), "w.pt")
    torch.save((torch.rand(40, 1, 8, 8), y), "d.pt")
    torch.save((torch.full((40, 1, 8, 8), float("nan")), y), "t.pt")
    args = ["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--out", "o", "-q"]
    assert main([*args, "--recover-epochs", "1", "--train-data", "t.pt"]) == 2
    err = capsys.readouterr().err
    assert "--train-data 't.pt' contains NaN or inf values (in its first sample); clean the data" in err
    assert not (tmp_path / "o").exists()


def test_num_classes_a_model_does_not_read_is_refused(tmp_path, monkeypatch, capsys):
    # --num-classes 5 with a pickled model of 10 outputs: exit 0, the option ignored without a word
    monkeypatch.chdir(tmp_path)
    torch.save(DigitsCNN(), "pickled.pt")
    torch.save((torch.rand(40, 1, 8, 8), torch.arange(40) % 10), "d.pt")
    args = ["prune", "--model", "pickled.pt", "--trust-model", "--data", "d.pt", "-q"]
    assert main([*args, "--out", "o", "--num-classes", "5"]) == 2
    err = capsys.readouterr().err
    assert "--num-classes (command line) builds the model's head" in err and "gives 10 class scores" in err
    assert not (tmp_path / "o").exists()
    assert main([*args, "--out", "o", "--num-classes", "10"]) == 0  # what it has: read as given


def test_set_layer_ratios_refuses_a_ratio_for_an_ignored_layer_as_the_constructor_does():
    # the constructor refused ignored_layers=["features.0"] beside a ratio for it; set_layer_ratios took it
    # and dropped it without a word (features.0 kept its 32 channels)
    from cleanai_core import StructuredPruner

    pruner = StructuredPruner(DigitsCNN().eval(), torch.rand(2, 1, 8, 8), importance="magnitude",
                              ignored_layers=["features.0"], layer_pruning_ratios={"features.3": 0.25})  # fmt: skip
    with pytest.raises(UserError, match="layer 'features.0' is ignored .* and given ratio 0.5"):
        pruner.set_layer_ratios({"features.0": 0.5})
    pruned = pruner.prune()  # the ratios it had stay
    assert (pruned.features[0].out_channels, pruned.features[3].out_channels) == (32, 48)
