"""Text data forms and bad text inputs of ``cleanai prune --model hf:PATH``: tiny
``transformers`` models built from configs (nothing downloaded), data written by the test."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_job import FAST, TEXT, save, tiny_llama  # noqa: E402

from cleanai_core.cli import main  # noqa: E402
from cleanai_core.io import load_pruned  # noqa: E402
from cleanai_plugins.io.text import load_text_dataset  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save(tiny_llama(), tmp_path_factory.mktemp("hf_text") / "llama")


def prune(model, data, out, *extra):
    return main(["prune", "--model", f"hf:{model}", "--data", str(data), "--out", str(out), *FAST, *extra])


def refused(capsys, code, out, *words):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and all(w in err for w in words), err
    assert not out.exists()
    return err


def test_text_that_is_not_utf8_is_refused_with_the_byte(tmp_path, llama, capsys):
    data = tmp_path / "latin1.txt"
    data.write_bytes(("caf\xe9 " * 200 + "\n").encode("latin-1"))
    before = data.read_bytes()
    code = prune(llama, data, tmp_path / "o")
    refused(capsys, code, tmp_path / "o", "is not UTF-8 text (byte 3, line 1, is b'\\xe9')", "save it as UTF-8")
    assert data.read_bytes() == before


def test_token_ids_outside_the_vocabulary_or_context_are_refused(tmp_path, llama, capsys):
    torch.save(torch.randint(300, 400, (8, 32)), tmp_path / "big.pt")
    code = prune(llama, tmp_path / "big.pt", tmp_path / "o")
    refused(capsys, code, tmp_path / "o", "token ids go from 3", "vocabulary has 259 entries (ids 0..258)")
    torch.save(torch.full((8, 32), -1), tmp_path / "neg.pt")
    code = prune(llama, tmp_path / "neg.pt", tmp_path / "o")
    refused(capsys, code, tmp_path / "o", "token ids go from -1 to -1")
    torch.save(torch.randint(3, 259, (8, 80)), tmp_path / "long.pt")  # context: 64 positions
    code = prune(llama, tmp_path / "long.pt", tmp_path / "o")
    refused(capsys, code, tmp_path / "o", "rows of 80 tokens are longer than the model's context (64 positions)")


def test_seq2seq_and_vision_models_refuse_text_and_vit_takes_pixels(tmp_path, capsys):
    torch.manual_seed(0)
    t5 = transformers.T5Config(vocab_size=259, d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8)
    t5_dir = save(transformers.T5Model(t5).eval(), tmp_path / "t5")  # no LM head: T5 with one takes text (session 19)
    vit = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=8, num_labels=3)  # fmt: skip
    vit_dir = save(transformers.ViTForImageClassification(vit).eval(), tmp_path / "vit", tokenizer=False)
    (tmp_path / "d.txt").write_text(TEXT)
    code = prune(t5_dir, tmp_path / "d.txt", tmp_path / "o")
    refused(capsys, code, tmp_path / "o", "T5Model, an encoder-decoder")
    code = prune(vit_dir, tmp_path / "d.txt", tmp_path / "o")
    refused(capsys, code, tmp_path / "o", "ViTForImageClassification) reads no token ids")
    # pixel tensors in a .pt reach ViT as pixel_values (they were read as input_ids, or passed by that name)
    torch.save((torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])), tmp_path / "pix.pt")
    assert prune(vit_dir, tmp_path / "pix.pt", tmp_path / "o") == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["accuracy_before"] in (0.0, 0.25, 0.5, 0.75, 1.0) and report["evaluation_samples"] == 4


def test_a_folder_of_txt_and_npz_ids_read_like_one_txt_and_pt(tmp_path, llama, capsys):
    lines = TEXT.splitlines()
    (tmp_path / "all.txt").write_text(TEXT)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("\n".join(lines[:18]) + "\n")
    (tmp_path / "docs" / "b.txt").write_text("\n\n" + "\n".join(lines[18:]) + "\n")
    (tmp_path / "docs" / "notes.md").write_text("not read")
    reports = {}
    for name in ("all.txt", "docs"):
        assert prune(llama, tmp_path / name, tmp_path / f"o_{name}") == 0
        reports[name] = json.loads((tmp_path / f"o_{name}" / "report.json").read_text())
    assert reports["docs"]["evaluation_tokens"] == reports["all.txt"]["evaluation_tokens"] > 0
    assert reports["docs"]["perplexity_before"] == reports["all.txt"]["perplexity_before"]
    ids = torch.randint(3, 259, (8, 32))
    torch.save(ids, tmp_path / "ids.pt")
    with open(tmp_path / "ids.npz", "wb") as fh:  # numpy.savez layout, written without numpy
        import io
        import zipfile

        buf = io.BytesIO()
        header = "{'descr': '<i8', 'fortran_order': False, 'shape': (8, 32), }"
        header = header + " " * (63 - len(header) % 64) + "\n"
        buf.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + ids.numpy().tobytes())
        with zipfile.ZipFile(fh, "w") as z:
            z.writestr("input_ids.npy", buf.getvalue())
    for name in ("ids.pt", "ids.npz"):
        assert prune(llama, tmp_path / name, tmp_path / f"o_{name}") == 0
        reports[name] = json.loads((tmp_path / f"o_{name}" / "report.json").read_text())
    assert reports["ids.npz"]["evaluation_tokens"] == reports["ids.pt"]["evaluation_tokens"] == 4 * 31
    assert reports["ids.npz"]["perplexity_after"] == reports["ids.pt"]["perplexity_after"]
    (tmp_path / "empty").mkdir()
    code = prune(llama, tmp_path / "empty", tmp_path / "o")
    refused(capsys, code, tmp_path / "o", "is a folder without .txt files")


def test_causal_lm_report_says_why_no_accuracy_and_keeps_perplexity_after_recovery(tmp_path, llama, capsys):
    (tmp_path / "d.txt").write_text(TEXT)
    (tmp_path / "train.txt").write_text(TEXT.upper())
    out = tmp_path / "o"
    assert prune(llama, tmp_path / "d.txt", out, "--ratio", "0.5", "--recover-epochs", "1",
                 "--train-data", str(tmp_path / "train.txt")) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy_note"] == "a causal language model: the held-out perplexity is reported instead"
    assert "no installed evaluator" not in (out / "report.md").read_text()
    assert math.isfinite(report["perplexity_after"]) and report["evaluation_tokens"] > 0
    assert f"{report['perplexity_after']:.3f}" in (out / "report.md").read_text()
    # --train-data is cut into blocks of --seq-len (32), not the default 128
    model = transformers.AutoModelForCausalLM.from_pretrained(llama, local_files_only=True)
    train = load_text_dataset(str(tmp_path / "train.txt"), {"model": model, "seq_len": 32})
    rec = report["recovery"]
    assert rec["train_samples"] + rec["held_out_samples"] == len(train) > 20


def test_relative_hf_folder_reloads_from_any_working_directory(tmp_path, llama, monkeypatch):
    work = llama.parent
    (work / "d.txt").write_text(TEXT)
    monkeypatch.chdir(work)
    assert main(["prune", "--model", "hf:llama", "--data", "d.txt", "--out", "rel_out", *FAST]) == 0
    spec = json.loads((work / "rel_out" / "architecture.json").read_text())["spec"]
    assert spec == f"hf:{llama.resolve()}"
    monkeypatch.chdir(tmp_path)
    model = load_pruned(work / "rel_out")
    state = torch.load(work / "rel_out" / "model.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_config_that_cannot_rebuild_says_why():
    """BERT at 3 of 4 heads: the report named only 'rebuild failed: ValueError'."""
    from cleanai_plugins.zoo.transformers.config import rebuild_mismatches

    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    model = transformers.BertModel(cfg)
    model.config.num_attention_heads = 3  # what slicing one of four heads writes
    (why,) = rebuild_mismatches(model)
    assert why == (
        "<rebuild failed: ValueError: The hidden size (32) is not a multiple of the number of attention heads (3)>"
    )


def test_without_an_hf_folder_the_tokenizer_is_kept_in_out(tmp_path, capsys):
    """GPT-2 derives its head size from the hidden size: with the default that keeps what
    its config cannot describe switched off and the hidden size kept, the heads prune and
    there is no hf/ folder; the tokenizer (which hf/ would hold) was nowhere in --out."""
    cfg = transformers.GPT2Config(vocab_size=259, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    torch.manual_seed(0)
    folder = save(transformers.GPT2LMHeadModel(cfg).eval(), tmp_path / "gpt2")
    (tmp_path / "d.txt").write_text(TEXT)
    argv = ["prune", "--model", f"hf:{folder}", "--data", str(tmp_path / "d.txt"), "--out", str(tmp_path / "o")]
    off = ["--disable-plugin", "cleanai_plugins.zoo.transformers_hidden"]
    assert main([*off, *argv, *FAST, "--ratio", "0.5", "--ignore", "transformer.wte"]) == 0  # hidden kept, heads cut
    assert "tokenizer/" in capsys.readouterr().out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["hf_folder"] is None and report["tokenizer_folder"] == "tokenizer"
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "o" / "tokenizer", local_files_only=True)
    assert tok("ab")["input_ids"][:2] == [100, 101]  # ByT5: byte + 3
    assert "`tokenizer/`" in (tmp_path / "o" / "report.md").read_text()


def test_explain_traces_hugging_face_text_models_with_token_ids(tmp_path, capsys):
    # before: explain fed a float (1, 3, 224, 224) tensor, and every text model failed in its
    # embedding ("Expected tensor for argument #1 'indices' to have one of the following scalar types")
    from torch import nn

    from cleanai_core.cli.explain import example_input

    save(tiny_llama(), tmp_path / "llama", tokenizer=False)
    assert main(["explain", "--model", f"hf:{tmp_path / 'llama'}", "--max-groups", "3"]) == 0
    out = capsys.readouterr().out
    assert "model.embed_tokens: Embedding" in out and "groups (" in out
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, num_labels=2,
    )  # fmt: skip
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    assert main(["explain", "--model", f"hf:{tmp_path / 'bert'}", "--input-shape", "2,5", "--max-groups", "2"]) == 0
    assert "bert.embeddings.word_embeddings: Embedding" in capsys.readouterr().out
    bert = transformers.BertForSequenceClassification(cfg)
    ids = example_input(bert, (1, 16))  # BERT's own limit (8 positions) is not checked for a given shape
    assert ids.dtype == torch.long and ids.shape == (1, 16) and int(ids.max()) < 40
    plain = nn.Sequential(nn.Embedding(30, 8), nn.Flatten(), nn.Linear(8 * 4, 2))
    assert example_input(plain, (2, 4)).dtype == torch.long  # a hand-written text model too
    assert example_input(nn.Linear(3, 2), (2, 3)).dtype == torch.float32


def test_explain_falls_back_to_floats_when_a_leading_embedding_does_not_read_the_input(capsys, monkeypatch):
    from torch import nn

    class QueriesFirst(nn.Module):  # a learned query table declared before the layers that read the image
        def __init__(self) -> None:
            super().__init__()
            self.queries, self.conv = nn.Embedding(4, 8), nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3)) + self.queries.weight.sum(0)

    import sys
    import types

    module = types.ModuleType("qfirst")
    module.QueriesFirst = QueriesFirst
    monkeypatch.setitem(sys.modules, "qfirst", module)
    assert main(["explain", "--model", "qfirst:QueriesFirst", "--input-shape", "1,3,8,8"]) == 0
    assert "conv: Conv2d" in capsys.readouterr().out


def test_a_tokenizer_that_makes_no_tokens_is_refused_before_the_model_runs(tmp_path, capsys, monkeypatch):
    """A folder whose tokenizer is not the model's own (transformers 5 builds an empty
    ``Qwen2Tokenizer`` from a Qwen2 config next to other tokenizer files) tokenized every
    text to nothing: zero-length rows reached the model and failed inside it with
    "cannot reshape tensor of 0 elements", which named neither the tokenizer nor the data."""
    cfg = transformers.BertConfig(vocab_size=259, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    folder = save(transformers.BertForSequenceClassification(cfg).eval(), tmp_path / "bert")
    byt5 = transformers.ByT5Tokenizer(extra_ids=0)

    def drops_words(texts, **kwargs):  # keeps only the texts that start with "keep"
        return byt5([t if t.startswith("keep") else "" for t in texts], add_special_tokens=False, **kwargs)

    class Blank:
        pad_token_id = 0
        __call__ = staticmethod(drops_words)

    monkeypatch.setattr("cleanai_plugins.io.text.load_tokenizer", lambda model: Blank())
    lines = [json.dumps({"text": f"{'keep' if i % 4 else 'drop'} {i}", "label": i % 2}) for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    code = prune(folder, tmp_path / "d.jsonl", tmp_path / "o")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "o").exists()
    assert "the tokenizer (Blank) made no tokens of 5 of 20 texts (the first: 'drop 0')" in err


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_the_tokenizer_the_folder_declares_reads_the_text(family, tmp_path):
    """transformers 5 picks Qwen2's and Mistral's tokenizer from the model's config, not
    from the folder: beside a byte-level tokenizer it built an empty ``Qwen2Tokenizer``
    (every text made no tokens) or failed (Mistral: "no tokenizer next to the model"). The
    class ``tokenizer_config.json`` names is used when AutoTokenizer's makes no tokens."""
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = save(getattr(transformers, f"{family}ForCausalLM")(cfg).eval(), tmp_path / "m")
    (tmp_path / "d.txt").write_text(TEXT)
    assert prune(folder, tmp_path / "d.txt", tmp_path / "o", "--ratio", "0.5") == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert 1.0 < report["perplexity_before"] < 1000 and math.isfinite(report["perplexity_after"])
    assert report["evaluation_tokens"] > 0 and report["params_after"] < report["params_before"]


@pytest.mark.parametrize(
    "data",
    [["a first text", "a second"], [["a first text", "a second"]], [("a first text", 1)], [{"text": ["a first text"]}]],
)  # fmt: skip
def test_text_batches_in_the_python_api_are_refused_with_the_fix(data):
    """A batch of strings reached the model (``embedding(): argument 'indices' must be
    Tensor, not str``, a list of two texts read as an (input, label) pair) or was called
    "a str; expected tensors": neither said that text must be tokenized first."""
    from cleanai_core import StructuredPruner
    from cleanai_core.errors import UserError

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = StructuredPruner(model, torch.randint(3, 259, (1, 8)), pruning_ratio=0.3)
    with pytest.raises(UserError, match=r"batch holds text \('a first text'\), not tensors.*Tokenize the text first"):
        pruner.collect_activations(data, progress=False)
    with pytest.raises(UserError, match=r"example_inputs holds text \('a first text'\).*--data \(a \.txt or \.jsonl"):
        StructuredPruner(model, data[0], pruning_ratio=0.3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_tokenizer_batch_encoding_is_taken_as_the_dict_it_holds():
    """What the text error tells the user to give, ``tokenizer(texts, return_tensors="pt",
    padding=True)``, is a ``BatchEncoding`` (a mapping, not a dict): as example inputs it
    was "example_inputs holds no tensor". It prunes as its dict does, padding masked."""
    from cleanai_core import StructuredPruner

    tok = transformers.ByT5Tokenizer(extra_ids=0)
    batch = tok(["a first text", "short"], return_tensors="pt", padding=True)
    assert not isinstance(batch, dict) and int(batch["attention_mask"].sum()) == 12 + 5 + 2
    models = []
    for x in (batch, dict(batch)):
        torch.manual_seed(0)
        pruner = StructuredPruner(tiny_llama(), x, pruning_ratio=0.5)
        pruner.collect_activations([x, x], progress=False)
        models.append(pruner.prune())
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert models[0].model.layers[0].mlp.up_proj.out_features < tiny_llama().model.layers[0].mlp.up_proj.out_features
