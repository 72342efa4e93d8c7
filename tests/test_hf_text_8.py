"""Hugging Face text models, session 18: one cause per test (tiny models from configs,
``tests/hf_families.py``; nothing downloaded), and the user-side behaviours a text prune
meets (hidden states asked for, a model called before it is pruned). The families run in
the corpus sweep too (``pytest -m corpus tests/test_hf_corpus.py``)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import build  # noqa: E402

from cleanai_core import StructuredPruner  # noqa: E402
from cleanai_core.io import load_pruned  # noqa: E402


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def hidden_states(model, inputs, **kw) -> list[torch.Tensor] | None:
    with torch.no_grad():
        out = model(*inputs, **kw)
    return None if out.hidden_states is None else list(out.hidden_states)


def test_a_model_that_returned_hidden_states_prunes_to_one_that_still_does():
    """transformers installs its output-capturing hooks on the first call that asks for
    ``output_hidden_states`` and marks the model with an attribute. The pruned copy kept the
    mark but not the hooks (taken for the user's, with a warning telling the user to
    register them again): it returned ``hidden_states=None`` when asked. An installed
    library's hooks on its own modules are the model's now, and stay on the copy."""
    model, inputs, _ = build("llama-gqa")
    assert len(hidden_states(model, inputs, output_hidden_states=True)) == 3  # hooks installed now
    assert hooks(model) == 4
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*hook")
        small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4).prune()
    assert hooks(small) == 4 and params(small) < params(model)
    states = hidden_states(small, inputs, output_hidden_states=True)
    assert states is not None and [tuple(h.shape) for h in states] == [(1, 8, 64)] * 3
    assert hidden_states(small, inputs) is None  # not asked: none


def test_a_config_that_asks_for_hidden_states_leaves_the_model_as_it_was():
    """With ``config.output_hidden_states=True``, every run of the model during a prune
    (trace, checks) installed transformers' hooks once more: the attribute that says they
    are installed was put back, the hooks were not. The user's model then returned 7 hidden
    states for 2 layers (12 hooks), the pruned one 5. Hooks a forward registers now go with
    the rest of the state a forward leaves."""
    model, inputs, _ = build("llama-gqa")
    model.config.output_hidden_states = True
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4).prune()
    assert hooks(model) == 0 and hooks(small) == 0
    assert len(hidden_states(small, inputs)) == 3
    assert len(hidden_states(model, inputs)) == 3 and hooks(model) == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_folder_is_written_back_in_its_own_dtype(dtype, tmp_path):
    """``cleanai prune --model hf:DIR`` loads the folder in float32 to compute; the ``hf/``
    folder and ``model.pt`` it wrote kept float32, so a bfloat16 checkpoint pruned by 15%
    came back 1.7x its size on disk (191,976 -> 325,432 bytes of safetensors). Both are
    written in the dtype the source folder stored, and reload in it with identical logits."""
    import json

    from cleanai_core.cli import main

    model, inputs, _ = build("llama-gqa")
    model.to(dtype).save_pretrained(tmp_path / "m")
    torch.save(torch.randint(3, 100, (12, 16), generator=torch.Generator().manual_seed(3)), tmp_path / "ids.pt")
    args = ["--ratio", "0.4", "--threads", "1", "--latency-repeats", "1", "--quiet"]
    assert main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "ids.pt"),
                 "--out", str(tmp_path / "o"), *args]) == 0  # fmt: skip
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["hf_reload_path"] == "from_pretrained" and report["hf_dtype"] == str(dtype)[6:]
    assert report["perplexity_before"] > 1 and report["params_after"] < report["params_before"]
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("m", "o/hf")}
    assert size["o/hf"] < size["m"]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "hf").eval()
    assert {p.dtype for p in again.parameters()} == {dtype}
    assert params(again) == report["params_after"]
    # model.pt too: load_pruned replays the history and gives the stored dtype, the same logits
    replayed = load_pruned(tmp_path / "o")
    assert {p.dtype for p in replayed.parameters()} == {dtype}
    assert (tmp_path / "o" / "model.pt").stat().st_size < size["m"]
    with torch.no_grad():
        assert torch.equal(replayed(*inputs).logits, again(*inputs).logits)


def test_cpmant_heads_and_gated_ffn_prune_and_reload(tmp_path):
    """CPM-Ant's attention holds ``num_heads`` and ``dim_head`` beside ``project_q`` /
    ``project_k``: the fix-up read neither, so every model with heads pruned failed
    (``shape '[1, 40, 4, 16]' is invalid``), the oracle too; its gated FFN
    (``ffn.w_in.w_0`` / ``w_1``) of width ``dim_ff`` had no key, so the default kept it."""
    from cleanai_core.testing import check_pruner

    model, inputs, _ = build("cpmant")
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 2 + 2 * 48  # heads (one bias for both layers), FFNs
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.5).prune()
    attn = small.cpmant.encoder.layers[0].self_att.self_attention
    assert (attn.num_heads, attn.project_q.out_features) == (2, 32)
    assert (small.config.num_attention_heads, small.config.dim_ff) == (2, 48)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert (params(model), params(small)) == (156_480, 118_592)
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(*inputs).logits, small(*inputs).logits, rtol=0, atol=1e-6)


def test_a_model_without_one_input_embedding_keeps_its_hidden_size():
    """CANINE embeds characters with 8 hash-bucket tables side by side (``hidden_size / 8``
    each) and has no ``get_input_embeddings``: the default named no embedding to keep, and
    at 0.5 pruned the hidden size (64 -> 32, 172,354 -> 46,242 parameters), the width the
    default keeps everywhere else. Its embeddings outside the layers are kept now."""
    model, inputs, _ = build("canine")
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.5).prune()
    config = small.config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (64, 4, 48)
    assert config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert (params(model), params(small)) == (172_354, 147_586)


def test_a_character_model_without_an_embedding_table_takes_text(tmp_path):
    """``cleanai prune --model hf:DIR --data texts.jsonl`` of a CANINE classifier was
    refused: ``reads no token ids (it has no token embedding: a vision or audio model)``.
    Its forward takes ``input_ids`` (code points, hashed into 8 tables), so the text data
    reads it now; a model that needs pixels as well (CLIP) is still refused."""
    import json

    from cleanai_core.cli import main

    model, _, _ = build("canine")
    model.save_pretrained(tmp_path / "m")
    transformers.CanineTokenizer().save_pretrained(tmp_path / "m")
    words = ["pruning removes channels", "a smaller model", "weak units go first", "held-out text decides"]
    lines = [json.dumps({"text": f"{w} {i}", "label": i % 2}) for i, w in enumerate(words * 6)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--ratio", "0.4", "--threads", "1", "--latency-repeats", "1", "--quiet", "--seq-len", "32"]
    assert main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "o"), *args]) == 0  # fmt: skip
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert 0 <= report["accuracy_before"] <= 1 and report["evaluation_samples"] > 0
    assert report["params_after"] < report["params_before"] == 172_354
    assert report["hf_reload_path"] == "from_pretrained"


def _word_tokenizer(folder: Path, size: int = 100):
    """A BERT word-piece tokenizer of ``size`` entries (specials, then words), written offline."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(TEXT.split())]
    vocab += [f"w{i}" for i in range(size - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizer(str(folder / "vocab.txt"))


TEXT = (
    "structured pruning removes whole channels heads and neurons from a trained network\n"
    "the model is smaller and faster on ordinary hardware\n"
    "activations measured on held out text decide which units are weak\n"
) * 12


def test_a_masked_lm_reports_the_masked_tokens_accuracy_and_perplexity(tmp_path):
    """``cleanai prune --model hf:DIR --data docs.txt`` of a BERT masked LM measured
    nothing (``Accuracy not measured: the data has no labels``). The text data masks 15% of
    each document's real tokens (a fixed draw, at least one per row) with the tokenizer's
    mask token and labels them; the evaluator scores those positions, unshifted."""
    import json

    from cleanai_core.cli import main
    from cleanai_plugins.io.text import masked_tokens

    model, _, _ = build("bert")
    model.save_pretrained(tmp_path / "m")
    tok = _word_tokenizer(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    enc = tok(["the model is smaller", "weak units"], padding=True, return_tensors="pt")
    items = masked_tokens(enc["input_ids"], enc["attention_mask"], tok)
    picked = items["labels"] != -100
    assert picked.sum(dim=1).tolist() == [2, 1] and bool((items["input_ids"][picked] == tok.mask_token_id).all())
    assert torch.equal(items["labels"][picked], enc["input_ids"][picked])  # the original ids
    specials = torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))
    assert not bool((picked & specials).any())  # never [CLS], [SEP] or [PAD]
    (tmp_path / "docs.txt").write_text(TEXT)
    args = ["--ratio", "0.4", "--threads", "1", "--latency-repeats", "1", "--quiet", "--seq-len", "32"]
    assert main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "docs.txt"),
                 "--out", str(tmp_path / "o"), *args]) == 0  # fmt: skip
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["accuracy_note"] is None and 0 <= report["accuracy_before"] <= 1
    assert 1 < report["perplexity_before"] < 1000 and report["evaluation_tokens"] >= report["evaluation_samples"]
    assert report["params_after"] < report["params_before"] == 102_500


def test_the_users_own_hook_on_a_transformers_layer_is_still_theirs():
    """Beside transformers' own hooks (kept on the copy), a hook the user registered on a
    transformers layer is still the user's: warned about, not copied."""
    model, inputs, _ = build("llama-gqa")
    hidden_states(model, inputs, output_hidden_states=True)  # transformers' 4 hooks
    seen = []
    model.model.layers[0].register_forward_hook(lambda m, a, out: seen.append(1))
    with pytest.warns(UserWarning, match=r"^1 forward/backward hook\(s\) on model\.layers\.0 stay"):
        small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4).prune()
    assert hooks(small) == 4 and hooks(model) == 5
    seen.clear()
    hidden_states(small, inputs)
    assert seen == []


def test_ibert_quant_linear_layers_prune_with_their_integer_buffers(tmp_path):
    """I-BERT's ``QuantLinear`` returns ``(output, scaling factor)`` and keeps integer
    copies of its weight and bias as saved buffers: no pruner claimed it, its bare weights
    were sliced op by op and the attention's head counts were not rewritten, so the
    oracle's pruned model failed (``shape '[1, 8, 64]' is invalid for input of size 256``)
    and the default refused. Claimed like ``nn.Linear``, its buffers sliced with it."""
    from cleanai_core.testing import check_pruner

    model, inputs, _ = build("ibert")
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 4 + 96  # the heads of both layers, the MLPs
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.5).prune()
    dense = small.ibert.encoder.layer[0].intermediate.dense
    assert dense.weight.shape == dense.weight_integer.shape == (48, 64) and dense.bias_integer.shape == (48,)
    assert small.config.intermediate_size == 48 and small.config.cleanai_pruning["from_pretrained"] is True
    assert (params(model), params(small)) == (73_828, 61_444)
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(*inputs).logits, small(*inputs).logits, rtol=0, atol=1e-6)
