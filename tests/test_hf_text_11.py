"""Hugging Face text models, session 21: one cause per test (tiny models from configs,
nothing downloaded). Falcon's ALiBi heads."""

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
NO_KEEP = ["--disable-plugin", "cleanai_plugins.zoo.transformers_hidden"]  # heads and hidden size prune too


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def ids(*shape: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(5, V, shape, generator=torch.Generator().manual_seed(seed))


def padded() -> dict:
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    return {"input_ids": ids(2, 8, seed=4), "attention_mask": mask}


def prune_job(model, tmp_path: Path, *extra: str, pre: tuple[str, ...] = ()) -> tuple[int, dict]:
    """``cleanai prune`` of ``model`` saved as a folder, on 24 x 16 token ids."""
    model.save_pretrained(tmp_path / "m")
    torch.save({"input_ids": ids(24, 16)}, tmp_path / "d.pt")
    rc = main([*pre, "prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"),
               "--out", str(tmp_path / "o"), *ARGS, *extra])  # fmt: skip
    report = tmp_path / "o" / "report.json"
    return rc, json.loads(report.read_text()) if report.exists() else {}


def falcon(**kw):
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       alibi=True, **kw)  # fmt: skip
    return transformers.FalconForCausalLM(config).eval()


FALCON_LAYOUTS = {  # heads pruned per layer (of 4) at 0.5: multi-query keeps its one KV head
    "multi-query": ({}, 2 * 2),
    "multi-head": ({"multi_query": False}, 2 * 2),
    "grouped": ({"new_decoder_architecture": True, "num_kv_heads": 2}, 2 * 1),  # whole KV groups of 2
}


@pytest.mark.parametrize("layout", sorted(FALCON_LAYOUTS))
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_falcon_heads_prune_under_its_alibi(layout, impl):
    """Falcon built with ``alibi=True`` adds one ALiBi tensor of ``(batch, heads, 1, keys)``,
    built once for every layer, to its scores (eager), and folds it into the attention mask
    ``(batch, heads, queries, keys)`` (sdpa reads that mask): the heads froze (``heads meet
    an attention mask that cannot shrink``), only the MLP pruned (256 units). Each pruned
    ``FalconAttention`` now takes its kept heads' rows of both, as Bloom's and MPT's do."""
    kw, heads = FALCON_LAYOUTS[layout]
    model = falcon(**kw, attn_implementation=impl)
    for inputs in ((ids(1, 8),), padded()):
        report = check_pruner(model, inputs, ratio=0.5)
        assert report.pruned_units == 2 * 128 + heads  # 128 of 256 MLP units in each layer, and the heads
        assert report.max_abs_diff < 1e-5


def test_falcon_alibi_heads_reload_with_load_pruned_only(tmp_path):
    """With the heads and the hidden size pruned alike, the head size stays and every shape
    the rewritten config rebuilds agrees, so ``cleanai_pruning`` said ``from_pretrained:
    true``; the rebuilt model's ALiBi slopes are those of 2 heads, not of the 2 kept of 4 (the
    job's reload check refused it: `reloaded logits differ ... (max relative error 0.0325)`).
    A model whose ALiBi heads were sliced now says ``load_pruned`` with the reason, which
    reloads it with the same logits; ``generate()`` the same with and without the cache."""
    model = falcon()
    rc, report = prune_job(model, tmp_path, "--ratio", "0.5", pre=tuple(NO_KEEP))
    assert rc == 0, report
    assert (report["params_before"], report["params_after"]) == (92_800, 25_920)
    assert report["hf_reload_path"] == "load_pruned" and "ALiBi" in report["hf_reload"]
    small = load_pruned(tmp_path / "o")
    record = small.config.cleanai_pruning
    assert record["from_pretrained"] is False and any("ALiBi" in why for why in record["why"])
    assert [a.num_heads for a in (b.self_attention for b in small.transformer.h)] == [2, 2]
    pruned = torch.load(tmp_path / "o" / "model.pt", weights_only=True)
    assert pruned.keys() == small.state_dict().keys()
    assert all(torch.equal(pruned[k], v) for k, v in small.state_dict().items())
    x = ids(1, 6, seed=5)
    with torch.no_grad():
        cached = small.generate(x, max_new_tokens=6, do_sample=False)
        plain = small.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def rwkv():
    torch.manual_seed(0)
    config = transformers.RwkvConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                     intermediate_size=64, context_length=64)  # fmt: skip
    return transformers.RwkvForCausalLM(config).eval()


def recurrent_gemma():
    torch.manual_seed(0)
    config = transformers.RecurrentGemmaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                               num_key_value_heads=1, intermediate_size=96, lru_width=64,
                                               attention_window_size=8)  # fmt: skip
    return transformers.RecurrentGemmaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "family, before, after, key, written",
    [
        (rwkv, 25_664, 22_464, "intermediate_size", 39),  # feed_forward.key: 39 of 64
        (recurrent_gemma, 75_360, 64_302, "intermediate_size", 2 * 29),  # mlp_block: 29 of 48 (intermediate_size // 2)
    ],
)
def test_an_mlp_width_the_config_states_or_derives_by_a_factor_reloads(family, before, after, key, written, tmp_path):
    """RWKV's channel mixing (``feed_forward.key``, then ``value``) is ``intermediate_size``
    wide, and RecurrentGemma's ``mlp_block`` ``intermediate_size // 2``: no key was written
    for either, so the default found no width its config could say, pruned everything with
    a warning (``config can describe none of its prunable widths``) and reloaded only with
    ``load_pruned`` (no ``hf/``; RecurrentGemma's heads too: 62,254 parameters). Both names
    are MLP first projections now, and a key that the layers divide by a factor (read from
    the unpruned config rebuilt on the meta device) is written times that factor: the
    default prunes the MLP alone and ``hf/`` reloads with ``from_pretrained``."""
    model = family()
    rc, report = prune_job(model, tmp_path, "--ratio", "0.4")
    assert rc == 0, report
    assert (report["params_before"], report["params_after"]) == (before, after)
    assert report["hf_reload_path"] == "from_pretrained", report["hf_reload"]
    assert json.loads((tmp_path / "o" / "hf" / "config.json").read_text())[key] == written
    again = type(model).from_pretrained(tmp_path / "o" / "hf").eval()
    small = load_pruned(tmp_path / "o")
    x = ids(2, 6, seed=5)
    with torch.no_grad():
        assert torch.equal(again(x).logits, small(x).logits)
        cached = again.generate(x[:1], max_new_tokens=5, do_sample=False)
        plain = again.generate(x[:1], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_longformer_classifier_with_global_attention_traces():
    """``LongformerForSequenceClassification`` gives its first token global attention, which
    writes the global keys with ``index_put_``; the mapper called ``numel()`` on a traced
    tensor and the trace failed (``AttributeError: 'TRef' object has no attribute
    'numel'``): no prune, no oracle. The MLM head (no global attention) traced."""
    torch.manual_seed(0)
    config = transformers.LongformerConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=96, attention_window=4, max_position_embeddings=66,
                                           pad_token_id=1, num_labels=3)  # fmt: skip
    model = transformers.LongformerForSequenceClassification(config).eval()
    inputs = padded()
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.pruned_units == 2 * 64 and report.max_abs_diff < 1e-5  # the MLP (heads: as_strided chunks)
    glob = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    report = check_pruner(model, {**inputs, "global_attention_mask": glob}, ratio=0.5)
    assert report.pruned_units == 128 and report.max_abs_diff < 1e-5
    assert report.params_after == 84_323


def test_a_bias_switch_the_config_refuses_alone_is_not_declared(tmp_path):
    """InternLM3 (``LlamaForCausalLM`` with its own config) validates ``attention_bias ==
    mlp_bias``. Compensation gave ``down_proj`` biases and set ``mlp_bias`` alone, which the
    config then refused: ``hf_reload_path: "load_pruned"``, ``rebuild failed: ... InternLM3
    with `qkv_bias` different from `bias` is not supported`` (60,328 parameters with the new
    biases). A switch the config's own validation refuses set alone is no switch: the MLP
    gets no new bias (as Qwen2's), and ``hf/`` reloads with ``from_pretrained``."""
    torch.manual_seed(0)
    config = transformers.InternLM3Config(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                          max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    rc, report = prune_job(model, tmp_path, "--ratio", "0.4")
    assert rc == 0, report
    assert (report["params_before"], report["params_after"]) == (74_560, 59_968)
    assert report["hf_reload_path"] == "from_pretrained", report["hf_reload"]
    saved = json.loads((tmp_path / "o" / "hf" / "config.json").read_text())
    assert (saved["model_type"], saved["attention_bias"], saved["mlp_bias"]) == ("internlm3", False, False)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "o" / "hf").eval()
    x = ids(2, 6, seed=5)
    with torch.no_grad():
        assert torch.equal(again(x).logits, load_pruned(tmp_path / "o")(x).logits)


def test_a_model_whose_input_embeddings_are_a_parameter_prunes_from_text(tmp_path):
    """Perceiver's ``get_input_embeddings()`` returns its latents array, an ``nn.Parameter``
    (its text preprocessor embeds the token ids). The keep-hidden plugin handed it to the
    ignore list and every default prune failed in the constructor (``UserError: cannot match
    layers with the parameter 'perceiver.embeddings.latents'``); and ``cleanai prune`` took a
    ``.pt`` of token ids for an image tensor file (``expected keys 'x' and 'y'``). A
    parameter is no embedding layer: the embeddings outside the layers are kept as for
    CANINE, and the model reads token ids (its MLM decoder writes ``max_position_embeddings``
    positions, so the rows are that long)."""
    from cleanai_core import StructuredPruner

    torch.manual_seed(0)
    config = transformers.PerceiverConfig(vocab_size=V, d_model=64, d_latents=64, num_latents=16, num_blocks=1,
                                          num_self_attends_per_block=2, num_self_attention_heads=4,
                                          num_cross_attention_heads=4, max_position_embeddings=16)  # fmt: skip
    model = transformers.PerceiverForMaskedLM(config).eval()
    pruner = StructuredPruner(model, {"inputs": ids(2, 16)}, importance="magnitude", pruning_ratio=0.4)
    assert "perceiver.input_preprocessor.embeddings" in pruner.ignored
    model.save_pretrained(tmp_path / "m")
    # its byte tokenizer (no vocabulary file): a folder without one has none, and then masks nothing (21b)
    transformers.PerceiverTokenizer().save_pretrained(tmp_path / "m")
    torch.save({"input_ids": ids(24, 16)}, tmp_path / "d.pt")
    with pytest.warns(RuntimeWarning, match="config can describe none of its prunable widths"):
        rc = main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"),
                   "--out", str(tmp_path / "o"), "--ratio", "0.4", *ARGS])  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["params_before"] == 135_652 and report["params_after"] == 66_544
    assert abs(report["perplexity_after"] - report["perplexity_before"]) < 1.0  # a random 100-token model
    small = load_pruned(tmp_path / "o")
    assert params(small) == report["params_after"]
    with torch.no_grad():
        assert small(inputs=ids(2, 16)).logits.shape == (2, 16, V)


def test_a_folder_whose_config_returns_tuples_is_pruned_and_keeps_its_setting(tmp_path):
    """A folder whose ``config.json`` says ``"return_dict": false``: a BERT classifier with
    labels got ``accuracy_note: BertForSequenceClassification returns no logits (a model
    without a task head ...)`` (its tuple has no ``.logits``), and a Llama failed, blamed on
    the data (``the model failed on an input from --data ...: 'tuple' object has no
    attribute 'last_hidden_state'``: transformers' own forward, unpruned too). The job's
    copy now returns output objects; ``hf/`` keeps ``return_dict: false``."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, num_labels=3, return_dict=False)  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "m")
    x = ids(24, 16)
    with torch.no_grad():
        labels = model(x)[0].argmax(-1)  # the model's own answers: accuracy 1.0
    torch.save({"input_ids": x, "labels": labels}, tmp_path / "d.pt")
    rc = main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"),
               "--out", str(tmp_path / "o"), "--ratio", "0.4", *ARGS])  # fmt: skip
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rc == 0 and report["accuracy_before"] == 1.0 and report["accuracy_note"] is None
    assert report["hf_reload_path"] == "from_pretrained"
    assert json.loads((tmp_path / "o" / "hf" / "config.json").read_text())["return_dict"] is False
    again = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "o" / "hf").eval()
    with torch.no_grad():
        out = again(x[:2])
    assert isinstance(out, tuple) and out[0].shape == (2, 3)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, return_dict=False)  # fmt: skip
    llama = transformers.LlamaForCausalLM(config).eval()
    rc, report = prune_job(llama, tmp_path / "llama", "--ratio", "0.4")
    assert rc == 0 and report["params_after"] == 60_328 and report["perplexity_after"] > 1


@pytest.mark.parametrize("family, before, after", [("ibert", 73_828, 64_024), ("luke", 118_222, 108_418)])
def test_masked_lms_with_an_embedding_of_their_own_class_or_a_broken_tokenizer_method_take_token_ids(
    family, before, after, tmp_path
):
    """``cleanai prune --model hf:DIR --data ids.pt`` of an I-BERT masked LM: refused, ``holds
    a dict with keys ['input_ids']; expected keys 'x' and 'y'`` (its input embedding is a
    ``QuantEmbedding``, no ``nn.Embedding``, so it did not count as reading token ids); of a
    LUKE masked LM: a raw ``TypeError: super(type, obj): obj must be an instance or subtype
    of type`` from ``LukeTokenizer.get_special_tokens_mask`` (broken in transformers itself)
    while masking the tokens. An embedding table of any class counts; the special tokens are
    the tokenizer's special ids where its own method fails."""
    from hf_families import build

    model, _, _ = build(family)
    model.save_pretrained(tmp_path / "m")  # with its type's tokenizer saved: a folder without one has none (21b)
    transformers.AutoTokenizer.from_pretrained(tmp_path / "m").save_pretrained(tmp_path / "m")
    rc, report = prune_job(model.eval(), tmp_path, "--ratio", "0.4")
    assert rc == 0, report
    assert (report["params_before"], report["params_after"]) == (before, after)
    assert report["perplexity_before"] > 50 and report["accuracy_note"] is None  # masked tokens scored (random model)
    assert report["hf_reload_path"] == "from_pretrained"


def test_experts_of_a_half_precision_checkpoint_keep_rows_its_grouped_matmul_takes(tmp_path):
    """``cleanai prune --model hf:DIR`` of a bfloat16 Qwen3-MoE folder: the job computes in
    float32, where 16-byte expert rows are 4 units, kept 20 of 32 expert units and wrote the
    model back in bfloat16, where 20 units are 40 bytes: ``from_pretrained`` and every
    forward of ``load_pruned``'s model failed in torch's grouped matmul (``strides should be
    multiple of 16 bytes``); ``hf_reload_path: "load_pruned"`` for a model nothing could run.
    The experts' rows now suit the dtype the config declares too (the ``hf:`` loader keeps
    the folder's), so 24 units are kept."""
    from hf_families import build

    model, _, _ = build("qwen3-moe")
    rc, report = prune_job(model.eval().to(torch.bfloat16), tmp_path, "--ratio", "0.4")
    assert rc == 0, report
    assert (report["params_before"], report["params_after"]) == (87_424, 75_136)
    assert report["hf_reload_path"] == "from_pretrained", report["hf_reload"]
    small = load_pruned(tmp_path / "o")
    experts = small.model.layers[0].mlp.experts
    assert small.dtype == torch.bfloat16 and experts.down_proj.shape[-1] == 24
    x = ids(2, 6, seed=5)
    with torch.no_grad():
        cached = small.generate(x, max_new_tokens=5, do_sample=False)
        plain = small.generate(x, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_flex_attention_is_refused_with_the_switch_that_prunes_it():
    """A model built with ``attn_implementation="flex_attention"`` failed to trace with
    ``NotImplementedError: There was no rule registered for HigherOrderOperator flex_attention
    and mode <cleanai_core.model_state._WriteGuard object at 0x...>`` and a hint to set an
    attribute of CleanAI's objects (torch compiles flex attention, which cannot run under a
    dispatch mode). The error now says what to do: switch to ``sdpa`` to prune; the pruned
    model switched back to flex attention gives the same logits."""
    from cleanai_core import StructuredPruner
    from cleanai_core.errors import TraceError

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96,
                                      attn_implementation="flex_attention")  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    x = ids(1, 8)
    with pytest.raises(TraceError, match=r"set_attn_implementation\('sdpa'\)"):
        StructuredPruner(model, (x,), importance="magnitude", pruning_ratio=0.5)
    model.set_attn_implementation("sdpa")
    small = StructuredPruner(model, (x,), importance="magnitude", pruning_ratio=0.5).prune()
    assert params(small) == 43_840
    with torch.no_grad():
        ref = small(x).logits
        small.set_attn_implementation("flex_attention")
        torch.testing.assert_close(small(x).logits, ref, rtol=0, atol=1e-5)


def test_a_model_with_pruned_alibi_heads_prunes_again():
    """Bloom after the default prune (its heads go, each attention slicing the ALiBi rows of
    the heads it kept in a forward pre-hook) could not be pruned or checked again: the hook,
    defined by CleanAI, counted as the user's, so the masked original ran without it and
    copies dropped it (``The expanded size of the tensor (12) must match the existing size
    (16)``). A hook a fix-up marks as part of the model (``model_state.MODEL_HOOK``) is the
    model's, like torch's own: copies keep it."""
    from cleanai_core import StructuredPruner

    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=V, hidden_size=64, n_layer=2, n_head=8)
    model = transformers.BloomForCausalLM(config).eval()
    x = {"input_ids": ids(2, 8)}
    with pytest.warns(RuntimeWarning, match="config can describe none of its prunable widths"):
        once = StructuredPruner(model, x, importance="magnitude", pruning_ratio=0.3).prune()
        report = check_pruner(once, x, ratio=0.5)
        twice = StructuredPruner(once, x, importance="magnitude", pruning_ratio=0.3).prune()
    assert [a.self_attention.num_heads for a in once.transformer.h] == [6, 6]
    assert report.pruned_units == 186 and report.max_abs_diff < 1e-5
    assert [a.self_attention.num_heads for a in twice.transformer.h] == [5, 5]
    assert all(len(a.self_attention.cleanai_kept_heads) == 5 for a in twice.transformer.h)
    with torch.no_grad():
        cached = twice.generate(x["input_ids"][:1], max_new_tokens=5, do_sample=False)
        plain = twice.generate(x["input_ids"][:1], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_experts_in_a_sub_config_of_a_half_precision_checkpoint_keep_their_rows(tmp_path):
    """The same for a vision-language MoE (Qwen3-VL-MoE, run on token ids): its experts read
    the text config, a sub-config, whose dtype the ``hf:`` loader had not kept (131,008
    parameters, ``strides should be multiple of 16 bytes`` on every reload)."""
    torch.manual_seed(0)
    text = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [2, 3, 3]})  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])  # fmt: skip
    config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    model = transformers.Qwen3VLMoeForConditionalGeneration(config).eval().to(torch.bfloat16)
    rc, report = prune_job(model, tmp_path, "--ratio", "0.4")
    assert rc == 0, report
    assert (report["params_before"], report["params_after"]) == (149_440, 137_152)
    assert report["hf_reload_path"] == "from_pretrained", report["hf_reload"]
    small = load_pruned(tmp_path / "o")
    with torch.no_grad():
        assert small(input_ids=ids(2, 6, seed=5)).logits.shape == (2, 6, V)
