"""``cleanai prune --model hf:PATH`` on text: tiny ``transformers`` models saved to a
temporary folder (built from configs, nothing downloaded), text data written by the test."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cleanai_core import StructuredPruner  # noqa: E402
from cleanai_core.cli import main  # noqa: E402
from cleanai_core.io import load_pruned  # noqa: E402
from cleanai_core.metrics import count_params  # noqa: E402
from cleanai_core.plugins import make_plugin_manager, set_plugin_manager  # noqa: E402
from cleanai_plugins.io.hf import cleanai_evaluate  # noqa: E402

FAST = ["--threads", "1", "--latency-repeats", "2", "--quiet", "--seq-len", "32"]
TEXT = (
    "Structured pruning removes whole channels, heads and neurons from a trained network.\n"
    "The pruned model is physically smaller and faster on ordinary hardware.\n"
    "Activations measured on held-out text decide which units are weak.\n"
) * 12


def tiny_llama(**kw):
    cfg = transformers.LlamaConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        **{"num_key_value_heads": 4, **kw},
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def save(model, folder, tokenizer: bool = True):
    model.save_pretrained(folder)
    if tokenizer:
        transformers.ByT5Tokenizer(extra_ids=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_causal")
    model = save(tiny_llama(), tmp / "model")
    (tmp / "docs.txt").write_text(TEXT)
    out = tmp / "out"
    code = main(["prune", "--model", f"hf:{model}", "--data", str(tmp / "docs.txt"), "--out", str(out),
                 "--ratio", "0.5", *FAST])  # fmt: skip
    assert code == 0
    return tmp, json.loads((out / "report.json").read_text())


def test_causal_lm_reports_finite_perplexity_before_and_after(causal_run):
    tmp, report = causal_run
    before, after = report["perplexity_before"], report["perplexity_after"]
    assert math.isfinite(before) and math.isfinite(after)
    assert 1.0 < before < 1000 and 1.0 < after < 1000  # a random 259-way model: about 259
    assert report["evaluation_tokens"] > 0 and report["accuracy_before"] is None
    md = (tmp / "out" / "report.md").read_text()
    assert "Perplexity (held-out)" in md and f"{before:.3f}" in md
    # FLOPs depend on the sequence length: the report names the input they were counted on
    assert report["input_shape"] == {"input_ids": [1, 32]}
    assert "FLOPs and latency of one input of shape `input_ids` [1, 32]" in md


def test_causal_lm_prunes_heads_and_mlp_but_keeps_the_hidden_size(causal_run):
    tmp, report = causal_run
    assert report["params_after"] < report["params_before"]
    state = torch.load(tmp / "out" / "model.pt", weights_only=True)
    assert state["model.layers.0.mlp.gate_proj.weight"].shape == (32, 32)  # 64 -> 32 MLP units
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (16, 32)  # 4 -> 2 heads of 8
    assert state["model.embed_tokens.weight"].shape == (259, 32)  # hidden size kept by default
    biases = 2 * (3 * 16 + 4 * 32)  # per layer: q, k, v (16 each), o (32); gate, up (32 each), down (32)
    assert report["params_before"] - report["params_after"] == 2 * (3 * 32 * 32 + 4 * 16 * 32) - biases
    # compensation added biases to o_proj and down_proj; attention_bias / mlp_bias declare them, with zero
    # biases on q, k, v, gate and up, so that from_pretrained rebuilds the same model
    assert state["model.layers.0.self_attn.o_proj.bias"].abs().max() > 0
    assert state["model.layers.0.mlp.up_proj.bias"].abs().max() == 0


def test_causal_lm_output_reloads(causal_run):
    tmp, report = causal_run
    out = tmp / "out"
    model = load_pruned(out)
    x = torch.randint(3, 259, (2, 32))
    with torch.no_grad():
        logits = model(input_ids=x).logits
    assert logits.shape == (2, 32, 259) and bool(torch.isfinite(logits).all())
    # compensation's biases are declared in the config (attention_bias, mlp_bias): the hf/ folder is kept
    assert report["hf_folder"] == "hf" and report["hf_reload"].startswith("identical logits"), report["hf_reload"]
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    again = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_sequence_classifier_on_jsonl_reports_accuracy(tmp_path):
    cfg = transformers.BertConfig(
        vocab_size=259, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    folder = save(transformers.BertForSequenceClassification(cfg).eval(), tmp_path / "bert")
    lines = [
        json.dumps({"text": f"sample {i} " + "good " * (i % 5), "label": ["neg", "pos"][i % 2]}) for i in range(40)
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = main(["prune", "--model", f"hf:{folder}", "--data", str(tmp_path / "d.jsonl"), "--out", str(out),
                 "--ratio", "0.5", *FAST])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["accuracy_before"] <= 1.0 and 0.0 <= report["accuracy_after"] <= 1.0
    assert report["evaluation_samples"] == 20 and report["perplexity_before"] is None
    assert report["params_after"] < report["params_before"]
    # BERT's config derives the head size from hidden / heads and has no key for the pooler's
    # width: the default keeps both (tests/test_hf_describable.py), so the hf/ folder reloads
    # with from_pretrained; load_pruned still gives the pruned model back
    assert report["hf_folder"] == "hf" and report["hf_reload_path"] == "from_pretrained", report["hf_reload"]
    assert report["hf_reload"].startswith("identical logits") and (out / "hf" / "config.json").exists()
    again = load_pruned(out)
    assert type(again).__name__ == "BertForSequenceClassification"
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())


def test_tokenized_pt_needs_no_tokenizer_and_txt_says_it_does(tmp_path, capsys):
    folder = save(tiny_llama(), tmp_path / "m", tokenizer=False)
    torch.save(torch.randint(3, 259, (8, 32)), tmp_path / "ids.pt")
    (tmp_path / "d.txt").write_text(TEXT)
    code = main(["prune", "--model", f"hf:{folder}", "--data", str(tmp_path / "ids.pt"), "--out",
                 str(tmp_path / "o1"), *FAST])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "o1" / "report.json").read_text())
    assert math.isfinite(report["perplexity_after"]) and report["evaluation_tokens"] == 4 * 31
    code = main(["prune", "--model", f"hf:{folder}", "--data", str(tmp_path / "d.txt"), "--out",
                 str(tmp_path / "o2"), *FAST])  # fmt: skip
    assert code != 0
    assert "no tokenizer next to the model" in capsys.readouterr().err


def test_hf_spec_that_is_neither_a_folder_nor_cached_fails_clearly(tmp_path, capsys):
    (tmp_path / "d.txt").write_text(TEXT)
    code = main(["prune", "--model", "hf:no-such-org/no-such-model-xyz", "--data", str(tmp_path / "d.txt"),
                 "--out", str(tmp_path / "o"), *FAST])  # fmt: skip
    assert code != 0
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache" in err and "nothing is downloaded" in err


def test_perplexity_equals_the_models_own_loss():
    model = tiny_llama()
    x = torch.randint(3, 259, (3, 16))
    metrics = cleanai_evaluate(model, [{"input_ids": x, "labels": x}], torch.device("cpu"))
    with torch.no_grad():
        loss = model(input_ids=x, labels=x).loss
    assert metrics["tokens"] == 3 * 15
    assert metrics["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_hidden_size_prunes_only_with_the_keep_plugin_disabled():
    model = tiny_llama()
    x = torch.randint(3, 259, (2, 16))

    def hidden_group(pruner):
        return next(g for g in pruner.graph.groups() if g.size == 32 and "model.embed_tokens" in g.modules())

    assert hidden_group(StructuredPruner(model, x)).prunable == 0
    set_plugin_manager(make_plugin_manager(disabled=["cleanai_plugins.zoo.transformers_hidden"]))
    try:
        pruner = StructuredPruner(model, x, pruning_ratio=0.25, ignored_layers=["*q_proj", "*k_proj", "*v_proj",
                                                                                 "*gate_proj", "*up_proj"])  # fmt: skip
        assert hidden_group(pruner).prunable == 32  # the HF RMSNorms no longer freeze it
        pruner.collect_activations([x], progress=False)
        pruned = pruner.prune()
    finally:
        set_plugin_manager(None)
    assert pruned.model.embed_tokens.weight.shape == (259, 24)
    assert pruned.model.layers[1].post_attention_layernorm.weight.shape == (24,)
    assert bool(torch.isfinite(pruned(input_ids=x).logits).all())


def test_target_params_keeps_the_asked_share_of_parameters():
    model = tiny_llama()
    x = torch.randint(3, 259, (2, 16))
    pruner = StructuredPruner(model, x, target_params=0.8, bias_compensation=False)
    pruner.collect_activations([x], progress=False)
    share = count_params(pruner.prune()) / count_params(model)
    assert 0.78 < share <= 0.8


def test_plugin_option_prunes_query_heads_per_group_on_the_command_line(tmp_path, capsys):
    """``cleanai --plugin cleanai_plugins.zoo.transformers_gqa prune ...``: grouped-query
    attention keeps its 2 KV heads and each group loses one of its 2 query heads; the
    saved ``hf/`` folder reloads with ``from_pretrained``."""
    model = save(tiny_llama(num_key_value_heads=2), tmp_path / "model")
    (tmp_path / "docs.txt").write_text(TEXT)
    args = ["prune", "--model", f"hf:{model}", "--data", str(tmp_path / "docs.txt"), "--ratio", "0.5", *FAST]
    try:
        assert main(["--plugin", "cleanai_plugins.zoo.transformers_gqa", *args, "--out", str(tmp_path / "o")]) == 0
    finally:
        set_plugin_manager(None)
    config = json.loads((tmp_path / "o" / "hf" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 2)
    assert main(["--plugin", "no_such_plugin_module", *args, "--out", str(tmp_path / "p")]) == 2
    assert "--plugin no_such_plugin_module" in capsys.readouterr().err


def _pair_classifier(folder):
    cfg = transformers.BertConfig(
        vocab_size=259, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    return model, save(model, folder, tokenizer=False)


def test_tokenized_token_type_ids_reach_the_model(tmp_path, capsys):
    """A sentence-pair classifier's ``token_type_ids`` in a tokenized ``.pt`` were dropped:
    calibration and accuracy ran on segment 0 only (accuracy 0.2 on labels the model gets
    all right with its segments). Keys the model does not take, and token types outside
    its ``type_vocab_size``, are refused."""
    model, folder = _pair_classifier(tmp_path / "bert")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (40, 16), generator=g)
    types = torch.zeros_like(ids)
    types[:, :8] = 1  # the first half as segment 1: the pooled first position reads it
    with torch.no_grad():
        labels = model(input_ids=ids, token_type_ids=types).logits.argmax(-1)
        blind = model(input_ids=ids).logits.argmax(-1)
    assert (blind != labels).sum() >= 10  # the segments change the answer
    torch.save({"input_ids": ids, "token_type_ids": types, "labels": labels}, tmp_path / "pairs.pt")
    out = tmp_path / "out"
    code = main(["prune", "--model", f"hf:{folder}", "--data", str(tmp_path / "pairs.pt"), "--out", str(out),
                 "--ratio", "0.3", *FAST])  # fmt: skip
    assert code == 0
    assert json.loads((out / "report.json").read_text())["accuracy_before"] == 1.0
    torch.save({"input_ids": ids, "segment": types}, tmp_path / "other.pt")
    code = main(["prune", "--model", f"hf:{folder}", "--data", str(tmp_path / "other.pt"), "--out",
                 str(tmp_path / "o2"), *FAST])  # fmt: skip
    assert code == 2 and "BertForSequenceClassification takes no 'segment'" in capsys.readouterr().err
    torch.save({"input_ids": ids, "token_type_ids": types + 1}, tmp_path / "types.pt")
    code = main(["prune", "--model", f"hf:{folder}", "--data", str(tmp_path / "types.pt"), "--out",
                 str(tmp_path / "o3"), *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "token_type_ids go from 1 to 2; the model has 2 token types (0..1)" in err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
