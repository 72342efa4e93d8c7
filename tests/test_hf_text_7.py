"""Hugging Face text models, session 17: one cause per test (tiny models from configs,
``tests/hf_families.py``; nothing downloaded), and the user-side behaviours a text prune
meets (padded calibration batches, tied embeddings, an explicit ``head_dim``, one KV head,
rope scaling, sliding windows, q/k/v biases, per-layer ratios, a continued KV cache). The
families run in the corpus sweep too (``pytest -m corpus tests/test_hf_corpus.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import LM, build  # noqa: E402

from cleanai_core import StructuredPruner  # noqa: E402
from cleanai_core.io import load_pruned, save_pruned  # noqa: E402
from cleanai_core.testing import check_pruner  # noqa: E402


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def padded() -> dict[str, torch.Tensor]:
    """3 rows of 8 token ids, the second left-padded by 2, with its attention mask."""
    ids = torch.randint(3, 100, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def default_prune(model, inputs, ratio: float, **kw):
    """The default pruner, calibrated on a padded batch and a plain one."""
    pruner = StructuredPruner(model, inputs, pruning_ratio=ratio, **kw)
    extra = {"input_ids": torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(5))}
    pruner.collect_activations([padded(), extra], num_batches=2)
    return pruner, pruner.prune()


def reload_diff(small, inputs, tmp_path) -> float:
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        return float((small(*inputs).logits - again(*inputs).logits).abs().max())


def assert_generates_alike(small, inputs) -> None:
    """Greedy ``generate()`` with the KV cache equals it without, on one row and on a padded batch."""
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    for kwargs in ({"input_ids": inputs[0]}, padded()):
        with torch.no_grad():
            cached = small.generate(**kwargs, **gen, use_cache=True)
            plain = small.generate(**kwargs, **gen, use_cache=False)
        assert cached.shape[1] == kwargs["input_ids"].shape[1] + 6
        assert torch.equal(cached, plain)


def test_one_mlp_width_per_layer_is_written_per_layer(tmp_path):
    """Gemma3n's ``intermediate_size`` is a list, one width per layer ([96, 128] here):
    the fix-up skipped list-valued keys (kept for per-stage lists, Swin's), so the default
    kept every MLP and pruned nothing at 0.3 (90,336 parameters before and after). Each
    layer's width is now written to its entry (the gate and up projection give one width
    per MLP, not two)."""
    model, inputs, _ = build("gemma3n-text")
    _, small = default_prune(model, inputs, 0.3)
    widths = [layer.mlp.gate_proj.out_features for layer in small.model.layers]
    assert widths == [68, 90] and small.config.intermediate_size == [68, 90]
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert (params(model), params(small)) == (90_336, 90_336 - (28 + 38) * 3 * 64)
    assert reload_diff(small, inputs, tmp_path) <= 1e-6
    assert_generates_alike(small, inputs)
    assert check_pruner(model, inputs, ratio=0.5).max_abs_diff < 1e-5
    # global ranking gives the layers different widths: the list holds them, from_pretrained rebuilds it
    ranked = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.3, global_pruning=True).prune()
    assert ranked.config.intermediate_size == [66, 90] and ranked.config.cleanai_pruning["from_pretrained"] is True
    assert reload_diff(ranked, inputs, tmp_path / "ranked") <= 1e-6


def test_llama4_transposed_experts_and_complex_rotary_heads_prune(tmp_path):
    """Llama 4's experts are ``(experts, hidden, 2 * inter)`` / ``(experts, inter, hidden)``
    run through ``bmm``, with no ``is_transposed`` attribute: no pruner claimed them and
    ``bmm`` froze the MoE layer; its dense layers' width is ``intermediate_size_mlp`` (the
    experts' and shared expert's ``intermediate_size``); and its rotary embedding goes
    through ``view_as_complex``, which froze the heads of every rope layer. The default
    at 0.3 pruned nothing (``nothing in this model can be pruned``)."""
    model, inputs, _ = build("llama4-text")
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 290  # heads of both layers, experts, MLPs
    _, small = default_prune(model, inputs, 0.5)
    moe, dense = small.model.layers[1].feed_forward, small.model.layers[0].feed_forward
    assert moe.experts.gate_up_proj.shape == (4, 64, 2 * 48) and moe.experts.down_proj.shape == (4, 48, 64)
    assert moe.shared_expert.gate_proj.out_features == 48 and dense.gate_proj.out_features == 48
    assert [layer.self_attn.k_proj.out_features for layer in small.model.layers] == [16, 16]
    config = small.config
    assert (config.intermediate_size, config.intermediate_size_mlp, config.num_key_value_heads) == (48, 48, 1)
    assert config.cleanai_pruning["uniform"] is True and config.cleanai_pruning["from_pretrained"] is True
    assert (params(model), params(small)) == (148_544, 81_216)
    assert reload_diff(small, inputs, tmp_path) <= 1e-6
    assert_generates_alike(small, inputs)


def test_a_sequential_mlp_writes_its_width_key(tmp_path):
    """CTRL's MLP is ``nn.Sequential(Linear, ReLU, Linear)`` of width ``dff``: no key was
    written for ``ffn.0``, and with the heads kept (head size ``n_embd / n_head``) the
    default refused: ``nothing in this model can be pruned``."""
    model, inputs, _ = build("ctrl")
    _, small = default_prune(model, inputs, 0.3)
    assert [layer.ffn[0].out_features for layer in small.transformer.h] == [68, 68] and small.config.dff == 68
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert params(small) == params(model) - 2 * 28 * (64 + 1 + 64)
    assert reload_diff(small, inputs, tmp_path) <= 1e-6
    assert_generates_alike(small, inputs)


def test_per_layer_ratios_say_that_the_layers_disagree(tmp_path):
    """A per-layer ratio leaves layers with different widths that one config key cannot
    hold; ``why`` blamed Llama's heads on a head size derived from the width (Llama's is a
    key). It now says the layers keep different widths; ``load_pruned`` reloads it."""
    model, inputs, _ = build("llama-gqa")
    model.save_pretrained(tmp_path / "original")
    pruner, small = default_prune(model, inputs, 0.3, layer_pruning_ratios={"model.layers.0": 0.6})
    assert [layer.self_attn.k_proj.out_features for layer in small.model.layers] == [16, 32]
    record = small.config.cleanai_pruning
    assert record["per_layer"]["num_key_value_heads"] == [1, 2] and record["from_pretrained"] is False
    assert record["why"] == [
        "layers keep different widths (intermediate_size, num_attention_heads, num_key_value_heads): "
        "the config holds one value per key"
    ]
    save_pruned(tmp_path / "out", small, pruner.history, spec=f"hf:{tmp_path / 'original'}")
    again = load_pruned(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(small(*inputs).logits, again(*inputs).logits)


#: user-side variants of a small Llama-like model (the default prune at 0.5, calibrated on padded batches)
VARIANTS = {
    "tied-embeddings": ("LlamaForCausalLM", "LlamaConfig", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "head-dim-32-one-kv-head": ("LlamaForCausalLM", "LlamaConfig", {"num_key_value_heads": 1, "head_dim": 32}),
    "qkv-bias-yarn": ("Qwen2ForCausalLM", "Qwen2Config", {"num_key_value_heads": 2, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 32}}),
    "sliding-window": ("MistralForCausalLM", "MistralConfig", {"num_key_value_heads": 2, "sliding_window": 4}),
}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_text_model_variants_prune_reload_and_continue_their_cache(variant, tmp_path):
    cls, config_cls, kw = VARIANTS[variant]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(**{**LM, **kw})).eval()
    inputs = (torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(1)),)
    assert check_pruner(model, inputs, ratio=0.5).max_abs_diff < 1e-5
    assert check_pruner(model, padded(), ratio=0.5).max_abs_diff < 1e-5
    _, small = default_prune(model, inputs, 0.5)
    heads = small.config.num_attention_heads
    assert heads == 2 if kw["num_key_value_heads"] > 1 else heads == 2 and small.config.num_key_value_heads == 1
    assert small.config.intermediate_size == 48 and params(small) < 0.75 * params(model)
    if kw.get("tie_word_embeddings"):
        assert small.lm_head.weight is small.model.embed_tokens.weight
    assert small.config.cleanai_pruning["from_pretrained"] is True
    assert reload_diff(small, inputs, tmp_path) <= 1e-6
    assert_generates_alike(small, inputs)
    ids = padded()["input_ids"][:1]  # a continued cache: the last token's logits equal the full pass's
    with torch.no_grad():
        first = small(ids[:, :-1], use_cache=True)
        step = small(ids[:, -1:], past_key_values=first.past_key_values).logits[:, -1]
        full = small(ids).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)


def test_attention_that_asserts_its_input_width_keeps_heads_with_it(tmp_path):
    """FSMT's attention reads ``tgt_len, bsz, embed_dim = query.size()``, asserts it equals
    ``self.embed_dim`` and reshapes its output to it: with heads pruned (``embed_dim``
    follows the heads) every pruned model failed (``AssertionError``), the oracle too. Its
    query projection now goes with the hidden size, like LED's. And its decoder embeds a
    target vocabulary of its own: the default left that hidden size free, the config's one
    ``d_model`` could not say it, and the check blamed (and kept) the encoder's MLPs."""
    model, inputs, _ = build("fsmt")
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 4 * 48  # the 4 MLPs: heads go with the hidden size
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4).prune()
    widths = [layer.fc1.out_features for stack in (small.model.encoder, small.model.decoder) for layer in stack.layers]
    assert widths == [58] * 4 and (small.config.encoder_ffn_dim, small.config.decoder_ffn_dim) == (58, 58)
    assert small.model.decoder.embed_tokens.embedding_dim == 64 == small.config.d_model
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, small(**inputs).logits, rtol=0, atol=1e-6)


def test_a_layer_the_example_never_ran_keeps_the_width_its_key_shares():
    """Mllama's cross-attention layers do not run without an image: they are not in the
    graph and keep their MLP, while ``intermediate_size`` is the key of every layer's MLP.
    The default pruned the self-attention layer's MLP (58 of 96 at 0.4) and reported
    ``from_pretrained: false``; the MLP it shares a key with is now kept, with the reason."""
    text = {**LM, "num_key_value_heads": 2, "cross_attention_layers": [1]}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_global_layers": 1,
              "num_attention_heads": 2, "image_size": 16, "patch_size": 8, "vision_output_dim": 64,
              "intermediate_layers_indices": [0]}  # fmt: skip
    config = transformers.MllamaConfig(text_config=text, vision_config=vision, image_token_index=99)
    torch.manual_seed(0)
    model = transformers.MllamaForConditionalGeneration(config).eval()
    inputs = (torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(1)),)
    from cleanai_core.errors import UserError

    with pytest.raises(UserError, match=r"layers\.1\.mlp\.down_proj did not run on the example inputs and keeps"):
        StructuredPruner(model, inputs, pruning_ratio=0.4)


def test_a_grouped_pointwise_convolution_mlp_writes_its_width(tmp_path):
    """SqueezeBERT's MLP is two grouped pointwise ``nn.Conv1d`` (4 groups): the fix-up read
    widths from ``nn.Linear`` and ``Conv1D`` only and knew no ``intermediate.conv1d``, so
    the width had no key and the default at 0.4 pruned nothing (41,124 parameters)."""
    model, inputs, _ = build("squeezebert")
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4).prune()
    convs = [layer.intermediate.conv1d for layer in small.transformer.encoder.layers]
    assert [c.out_channels for c in convs] == [60, 60] and small.config.intermediate_size == 60
    assert all(c.groups == 4 for c in convs)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert (params(model), params(small)) == (41_124, 41_124 - 2 * 36 * (16 + 1 + 16))
    assert reload_diff(small, inputs, tmp_path) <= 1e-6


def test_a_vision_language_model_on_token_ids_reports_its_perplexity(tmp_path):
    """``cleanai prune --model hf:DIR`` of a vision-language model (Qwen2-VL) with token
    ids: only ``...ForCausalLM`` / ``...LMHeadModel`` counted as causal LMs, so the ids had
    no labels and the report had no perplexity (``perplexity_before: null``). A decoder-only
    model that generates is a causal LM to the text data now."""
    import json

    from cleanai_core.cli import main

    model, _, _ = build("qwen2-vl")
    model.save_pretrained(tmp_path / "m")
    torch.save(torch.randint(3, 100, (24, 32), generator=torch.Generator().manual_seed(3)), tmp_path / "ids.pt")
    args = ["--ratio", "0.4", "--threads", "1", "--latency-repeats", "2", "--quiet", "--seq-len", "32"]
    assert main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "ids.pt"),
                 "--out", str(tmp_path / "o"), *args]) == 0  # fmt: skip
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert 90 < report["perplexity_before"] < 110 and 90 < report["perplexity_after"] < 110  # a random 100-token model
    assert (report["params_before"], report["params_after"]) == (115_424, 100_832)
    assert report["hf_reload_path"] == "from_pretrained"


def test_experts_run_on_tokens_sorted_by_expert_prune_as_one_layer(tmp_path):
    """JetMoE's MLP experts are one ``(experts, out, in)`` weight run by
    ``JetMoeParallelExperts``: tokens split by expert, ``F.linear(part, weight[e])`` each,
    concatenated. Traced op by op, the per-expert selects of a bare weight froze every
    channel: the oracle pruned 0 units and the default refused (``nothing in this model can
    be pruned``). Claimed as one layer (``"in"`` / ``"out"``, the same unit in every
    expert) with ``mlp.input_linear`` (gate and up stacked) written to ``intermediate_size``."""
    model, inputs, _ = build("jetmoe")
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 2 * 48
    _, small = default_prune(model, inputs, 0.4)
    mlp = small.model.layers[0].mlp
    assert mlp.input_linear.weight.shape == (4, 2 * 58, 64) and mlp.output_linear.weight.shape == (4, 64, 58)
    assert small.config.intermediate_size == 58
    assert small.config.cleanai_pruning["uniform"] is True and small.config.cleanai_pruning["from_pretrained"] is True
    assert (params(model), params(small)) == (196_416, 196_416 - 2 * 4 * 38 * 3 * 64)
    assert reload_diff(small, inputs, tmp_path) <= 1e-6
    assert_generates_alike(small, inputs)
