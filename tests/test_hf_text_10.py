"""Hugging Face text models, session 20: one cause per test (tiny models from configs,
nothing downloaded). Families whose config describes none of their prunable widths (Bloom,
MPT), MPT's ALiBi heads, a question-answering folder that cannot run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import V  # noqa: E402

from cleanai_core.cli import main  # noqa: E402
from cleanai_core.io import load_pruned  # noqa: E402
from cleanai_core.testing import check_pruner  # noqa: E402

ARGS = ["--threads", "1", "--latency-repeats", "1", "--quiet"]


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def ids(*shape: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(5, V, shape, generator=torch.Generator().manual_seed(seed))


def bloom():
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=V, hidden_size=64, n_layer=2, n_head=4)
    return transformers.BloomForCausalLM(config).eval()


def mpt():
    torch.manual_seed(0)
    config = transformers.MptConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    return transformers.MptForCausalLM(config).eval()


def prune_job(model, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    """``cleanai prune`` of ``model`` saved as a folder, on 24 x 16 token ids."""
    model.save_pretrained(tmp_path / "m")
    torch.save({"input_ids": ids(24, 16)}, tmp_path / "d.pt")
    rc = main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"),
               "--out", str(tmp_path / "o"), *ARGS, *extra])  # fmt: skip
    report = tmp_path / "o" / "report.json"
    return rc, json.loads(report.read_text()) if report.exists() else {}


@pytest.mark.parametrize("family, before, after", [(bloom, 106_624, 78_728), (mpt, 105_024, 77_376)])
def test_a_family_whose_config_describes_no_width_prunes_with_the_default(family, before, after, tmp_path):
    """Bloom's MLP is ``4 * hidden_size`` in code and its head size ``hidden_size / n_head``
    (MPT: ``4 * hidden_size`` too, its ``expansion_ratio`` never read; the same head size): the default kept every width
    its config cannot describe, which was all of them, and refused (``nothing in this model
    can be pruned``). Where keeping them leaves nothing, they prune, with a warning, and the
    pruned model reloads with ``load_pruned`` (no ``hf/`` folder, the report says why)."""
    model = family()
    with pytest.warns(RuntimeWarning, match="config can describe none of its prunable widths"):
        rc, report = prune_job(model, tmp_path)
    assert rc == 0, report
    assert (report["params_before"], report["params_after"]) == (before, after)
    assert report["hf_reload_path"] == "load_pruned" and "ALiBi" in report["hf_reload"]
    assert abs(report["perplexity_after"] - report["perplexity_before"]) < 1.0  # random 100-token models: ~102
    assert not (tmp_path / "o" / "hf").exists()
    small = load_pruned(tmp_path / "o")
    assert params(small) == after
    assert small.config.cleanai_pruning["from_pretrained"] is False
    x = ids(1, 6, seed=5)
    with torch.no_grad():
        cached = small.generate(x, max_new_tokens=6, do_sample=False)
        plain = small.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_a_model_whose_config_describes_some_widths_still_keeps_the_others():
    """The fallback is for models where nothing would be left: BERT's heads (head size
    derived) stay while its MLP prunes, as before."""
    from cleanai_core import StructuredPruner

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96)  # fmt: skip
    model = transformers.BertForMaskedLM(config).eval()
    small = StructuredPruner(model, (ids(2, 8),), importance="magnitude", pruning_ratio=0.5).prune()
    layer = small.bert.encoder.layer[0]
    assert (layer.attention.self.query.out_features, layer.intermediate.dense.out_features) == (64, 48)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}


def test_mpt_heads_prune_under_its_alibi_position_bias():
    """MPT adds one ALiBi ``position_bias`` of ``(n_heads, 1, keys)`` to every layer's
    scores (``attention_scores + position_bias``): the add froze the heads (``combines
    channels with a tensor that cannot shrink``), so only the MLP pruned. The add lets that
    bias shrink with the heads in these modules, and each pruned ``MptAttention`` takes its
    kept heads' rows at every call, as Bloom's did (``zoo/transformers/alibi.py``)."""
    model = mpt()
    report = check_pruner(model, (ids(2, 8),), ratio=0.5)  # MPT has an eager attention only
    assert report.pruned_units == 2 * 2 + 2 * 128  # 2 of 4 heads and 128 of 256 MLP units, in each layer
    assert report.max_abs_diff < 1e-5
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    report = check_pruner(model, {"input_ids": ids(2, 8), "attention_mask": mask}, ratio=0.5, seed=1)
    assert report.pruned_units == 260 and report.max_abs_diff < 1e-5
    assert report.params_after == 55_872


def test_a_question_answering_folder_with_other_than_two_labels_is_refused_by_name(tmp_path, capsys):
    """A question-answering head splits ``qa_outputs`` into start and end logits; built
    with ``num_labels=3`` it fails on every input, and the job said ``the model failed on
    an input from --data ... Check that the data matches`` (exit 2): the data was blamed.
    The ``hf:`` loader names the key and the fix; nothing is written."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, num_labels=3)  # fmt: skip
    model = transformers.BertForQuestionAnswering(config).eval()
    model.save_pretrained(tmp_path / "m")
    zeros = torch.zeros(8, dtype=torch.long)
    torch.save({"input_ids": ids(8, 8), "start_positions": zeros, "end_positions": zeros + 1}, tmp_path / "d.pt")
    rc = main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"),
               "--out", str(tmp_path / "o"), "--ratio", "0.4", *ARGS])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "num_labels=3" in err and '"num_labels": 2' in err and "qa_outputs" in err
    assert not (tmp_path / "o").exists()


def nllb_moe():
    torch.manual_seed(0)
    config = transformers.NllbMoeConfig(
        vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=96, decoder_ffn_dim=80, max_position_embeddings=64,
        pad_token_id=0, decoder_start_token_id=2, eos_token_id=2, bos_token_id=1, num_experts=4,
        expert_capacity=8, encoder_sparse_step=2, decoder_sparse_step=1,
    )  # fmt: skip
    return transformers.NllbMoeForConditionalGeneration(config).eval()


def test_experts_no_example_token_reaches_prune_like_the_others(tmp_path):
    """NLLB-MoE holds one module per expert and runs only those its router sends tokens
    to: on short example inputs experts 2 and 3 never ran, so the trace did not see them
    and they kept their width while ``encoder_ffn_dim`` / ``decoder_ffn_dim`` were written
    from the others (``uniform: false``, ``from_pretrained`` failed on their shapes). A
    member of a ``ModuleList`` / ``ModuleDict`` that did not run, beside siblings of its
    class and shapes that did, is traced on its sibling's input now (``graph/trace.py``)."""
    from cleanai_core import StructuredPruner

    model = nllb_moe()
    g = torch.Generator().manual_seed(1)
    x = {
        "input_ids": torch.randint(3, V, (2, 8), generator=g),
        "decoder_input_ids": torch.randint(3, V, (2, 5), generator=g),
    }
    ran: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: ran.add(n)) for n, m in model.named_modules()]
    with torch.no_grad():
        model(**x)
    for h in hooks:
        h.remove()
    experts = {n for n, _ in model.named_modules() if n.endswith(("expert_0", "expert_1", "expert_2", "expert_3"))}
    assert experts - ran == {f"model.{s}.ffn.experts.expert_{i}" for s in ("encoder.layers.1", "decoder.layers.0")
                             for i in (2, 3)}  # fmt: skip
    report = check_pruner(model, x, ratio=0.5)
    assert report.pruned_units == 406 and report.max_abs_diff < 1e-5  # 230 before: experts 2 and 3 stayed whole
    pruner = StructuredPruner(model, x, pruning_ratio=0.3)
    pruner.collect_activations([x, x])
    small = pruner.prune()
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert (small.config.encoder_ffn_dim, small.config.decoder_ffn_dim) == (68, 56)
    assert (params(model), params(small)) == (178_400, 147_956)
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**x).logits, small(**x).logits, rtol=0, atol=1e-6)


def test_prophetnet_mlp_width_is_written_to_its_ffn_keys(tmp_path):
    """ProphetNet's MLP is ``feed_forward.intermediate`` / ``feed_forward.output``, a name
    the config fix-up did not know: ``encoder_ffn_dim`` / ``decoder_ffn_dim`` were not
    written, so the default kept the MLP as well as the heads (head size derived) and
    refused (``nothing in this model can be pruned``; since this session: pruned, reload
    through ``load_pruned`` only). The MLP prunes and ``from_pretrained`` reloads."""
    from cleanai_core import StructuredPruner

    torch.manual_seed(0)
    config = transformers.ProphetNetConfig(
        vocab_size=V, hidden_size=64, encoder_ffn_dim=96, decoder_ffn_dim=80, num_encoder_layers=2,
        num_decoder_layers=1, num_encoder_attention_heads=4, num_decoder_attention_heads=4,
        max_position_embeddings=64, ngram=2, pad_token_id=0, decoder_start_token_id=0,
    )  # fmt: skip
    model = transformers.ProphetNetForConditionalGeneration(config).eval()
    x = {"input_ids": ids(2, 8), "decoder_input_ids": ids(2, 5, seed=4)}
    report = check_pruner(model, x, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 2 * 48 + 40
    small = StructuredPruner(model, x, importance="magnitude", pruning_ratio=0.5).prune()
    assert (small.config.encoder_ffn_dim, small.config.decoder_ffn_dim) == (48, 40)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert (params(model), params(small)) == (126_032, 108_488)
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**x).logits, small(**x).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "cls, config", [("XLMWithLMHeadModel", "XLMConfig"), ("FlaubertWithLMHeadModel", "FlaubertConfig")]
)
def test_an_lm_head_without_a_causal_mask_is_scored_as_a_masked_lm(cls, config, tmp_path):
    """XLM's and Flaubert's LM head attends both ways unless ``causal=True`` (the
    ``xlm-mlm-*`` checkpoints): the evaluator took it for a causal LM and scored each
    position against the next token, which the model sees (a meaningless perplexity;
    labels of masked tokens were shifted by one). Such a head is a masked LM now: its
    labels are scored where they stand; with ``causal=True`` it stays a causal LM."""
    from cleanai_plugins.io.hf import cleanai_evaluate, head_kind

    torch.manual_seed(0)
    size = {"vocab_size": V, "emb_dim": 64, "n_layers": 2, "n_heads": 4, "max_position_embeddings": 64}
    model = getattr(transformers, cls)(getattr(transformers, config)(**size)).eval()
    causal = getattr(transformers, cls)(getattr(transformers, config)(**size, causal=True)).eval()
    assert (head_kind(model), head_kind(causal)) == ("masked", "")
    x = ids(8, 12)
    labels = torch.full_like(x, -100)
    labels[:, [3, 7]] = x[:, [3, 7]]
    x[:, [3, 7]] = 4  # the masked positions
    result = cleanai_evaluate(model, [{"input_ids": x, "labels": labels}], torch.device("cpu"))
    with torch.no_grad():
        logits = model(x).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert result["tokens"] == 16 and result["recovery_task"] == "token"
    assert result["loss"] == pytest.approx(float(loss), rel=1e-5)
    hits = (logits.argmax(-1) == labels)[labels != -100]
    assert result["accuracy"] == pytest.approx(float(hits.float().mean()))


def test_xlnet_takes_rows_of_any_length_and_its_beam_qa_head_is_scored(tmp_path):
    """XLNet's positions are relative, ``max_position_embeddings = -1``: every ``.pt`` of
    token ids was refused (``rows of 12 tokens are longer than the model's context (-1
    positions)``), whatever the head. And its (and XLM's) SQuAD head with beam search
    returns the indices of its best starts and ends, no ``start_logits``: the answers were
    not scored (``returns no logits (a model without a task head ...)``). Now a context
    of -1 is no limit, and the first start and end of the beam are the answer."""
    torch.manual_seed(0)
    config = transformers.XLNetConfig(vocab_size=V, d_model=64, n_layer=2, n_head=4, d_inner=96, start_n_top=2,
                                      end_n_top=2)  # fmt: skip
    model = transformers.XLNetForQuestionAnswering(config).eval()
    x = ids(16, 12)
    with torch.no_grad():
        out = model(x)
    start, end = out.start_top_index[:, 0], out.end_top_index[:, 0]
    model.save_pretrained(tmp_path / "m")
    torch.save({"input_ids": x, "start_positions": start, "end_positions": end}, tmp_path / "d.pt")
    rc = main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"), "--out",
               str(tmp_path / "o"), "--ratio", "0.4", *ARGS])  # fmt: skip
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rc == 0 and report["accuracy_before"] == 1.0  # the split the report measures: the model's own answers
    assert report["hf_reload_path"] == "from_pretrained"
    assert (report["params_before"], report["params_after"]) == (90_306, 80_502)


def _lm(**kw) -> dict:
    return {"vocab_size": V, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96,
            "max_position_embeddings": 64, "pad_token_id": 0, **kw}  # fmt: skip


_BART = {"vocab_size": V, "d_model": 64, "encoder_layers": 2, "decoder_layers": 1, "encoder_attention_heads": 4,
         "decoder_attention_heads": 2, "encoder_ffn_dim": 96, "decoder_ffn_dim": 80, "max_position_embeddings": 64,
         "pad_token_id": 0, "decoder_start_token_id": 2, "eos_token_id": 2, "bos_token_id": 1}  # fmt: skip

#: config variants checked in session 20 (docs/compatibility.md): name -> (class, config class, config keys, seq2seq)
VARIANTS = {
    "llama-6-heads-2-kv": ("LlamaForCausalLM", "LlamaConfig", _lm(hidden_size=96, num_attention_heads=6,
                                                                    num_key_value_heads=2, head_dim=16), False),
    "llama-tp2-untied-biases": ("LlamaForCausalLM", "LlamaConfig", _lm(num_attention_heads=4, num_key_value_heads=2,
                                pretraining_tp=2, tie_word_embeddings=False, attention_bias=True,
                                mlp_bias=True), False),
    "qwen3-head-dim-24": ("Qwen3ForCausalLM", "Qwen3Config", _lm(num_attention_heads=4, num_key_value_heads=2,
                                                                 head_dim=24), False),
    "qwen2-moe-dense-layer": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", _lm(num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                              num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[2]), False),
    "gemma2-window-4": ("Gemma2ForCausalLM", "Gemma2Config", _lm(num_attention_heads=4, num_key_value_heads=2,
                                                               head_dim=16, sliding_window=4), False),
    "bart-asymmetric": ("BartForConditionalGeneration", "BartConfig", _BART, True),
    "marian-unshared": ("MarianMTModel", "MarianConfig", {**_BART, "share_encoder_decoder_embeddings": False,
                                                          "decoder_vocab_size": V}, True),
    "t5-d-kv-24": ("T5ForConditionalGeneration", "T5Config", {"vocab_size": V, "d_model": 64, "d_kv": 24, "d_ff": 96,
                   "num_layers": 2, "num_decoder_layers": 1, "num_heads": 4, "decoder_start_token_id": 0,
                   "pad_token_id": 0}, True),
}  # fmt: skip


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_config_variants_prune_match_the_oracle_reload_and_generate(name, tmp_path):
    from cleanai_core import StructuredPruner

    cls, config, kw, seq2seq = VARIANTS[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config)(**kw)).eval()
    x = {"input_ids": ids(2, 8), **({"decoder_input_ids": ids(2, 5, seed=4)} if seq2seq else {})}
    assert check_pruner(model, x, ratio=0.5).max_abs_diff < 1e-5
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    pruner.collect_activations([x, x])
    small = pruner.prune()
    assert params(small) < params(model)
    assert small.config.cleanai_pruning["from_pretrained"] is True, small.config.cleanai_pruning
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**x).logits, small(**x).logits, rtol=0, atol=1e-6)
        cached = small.generate(x["input_ids"][:1], max_new_tokens=5, do_sample=False)
        plain = small.generate(x["input_ids"][:1], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
