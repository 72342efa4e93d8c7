"""A transformers LLM pruned with the defaults (bias compensation on) still reloads with
``from_pretrained``: the biases compensation created are declared through the config's
``attention_bias`` / ``mlp_bias`` switches, where the family has them."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cleanai_core import StructuredPruner  # noqa: E402

VOCAB = 97


def _prune(model) -> torch.nn.Module:
    torch.manual_seed(1)
    x = torch.randint(0, VOCAB, (2, 16))
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)  # defaults: bias_compensation=True
    pruner.collect_activations([torch.randint(0, VOCAB, (2, 16)) for _ in range(3)], progress=False)
    return pruner.prune().eval()


def _config(cls, **kw):
    return cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **kw,
    )


def _tiny(config_cls, model_cls):
    torch.manual_seed(0)
    return model_cls(_config(config_cls)).eval()


def test_pruned_llama_with_compensation_reloads_with_identical_logits(tmp_path):
    model = _tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    small = _prune(model)
    layer = small.model.layers[0]
    assert layer.self_attn.q_proj.out_features == 16 and layer.self_attn.k_proj.out_features == 8  # 1 of 2 KV groups
    assert layer.mlp.gate_proj.out_features == 32
    assert layer.self_attn.o_proj.bias.abs().max() > 0  # compensation folded the removed heads in
    assert layer.mlp.down_proj.bias.abs().max() > 0
    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
        assert proj.bias is not None and proj.bias.abs().max() == 0  # zero biases the switch asks for
        assert proj.bias.dtype == proj.weight.dtype and proj.bias.requires_grad == proj.weight.requires_grad
    assert small.config.attention_bias is True and small.config.mlp_bias is True
    assert small.config.cleanai_pruning == {
        "uniform": True,
        "from_pretrained": True,
        "biases_declared": ["attention_bias", "mlp_bias"],
    }
    assert model.config.attention_bias is False and model.model.layers[0].self_attn.o_proj.bias is None  # untouched

    small.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert sorted(again.state_dict()) == sorted(small.state_dict())
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, small(input_ids=x).logits, rtol=0, atol=1e-5)


def test_zero_biases_do_not_change_the_outputs():
    """The same pruned model with and without the declared zero biases computes the same."""
    model = _tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    small = _prune(model)
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        before = small(input_ids=x).logits
        for name, module in small.named_modules():
            bias = getattr(module, "bias", None)
            if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) and bias is not None:
                assert bias.abs().max() == 0
                module.bias = None
        torch.testing.assert_close(small(input_ids=x).logits, before, rtol=0, atol=0)


def test_a_family_without_a_bias_switch_keeps_the_honest_record():
    """Mistral builds its projections with ``bias=False`` in code: nothing can declare
    compensation's biases, so the record says ``from_pretrained`` would not rebuild them."""
    model = _tiny(transformers.MistralConfig, transformers.MistralForCausalLM)
    small = _prune(model)
    record = small.config.cleanai_pruning
    assert record["from_pretrained"] is False and "biases_declared" not in record
    assert any(k.endswith("o_proj.bias") for k in record["mismatched"])
    assert small.model.layers[0].self_attn.q_proj.bias is None  # no zero biases added for nothing


def test_a_switch_for_some_of_the_biases_only_changes_nothing():
    """Qwen3 reads ``attention_bias`` but builds its MLP with ``bias=False``: declaring the
    attention biases would not make ``from_pretrained`` work, so no zero bias is added."""
    model = _tiny(transformers.Qwen3Config, transformers.Qwen3ForCausalLM)
    small = _prune(model)
    record = small.config.cleanai_pruning
    assert record["from_pretrained"] is False and "biases_declared" not in record
    assert record["mismatched"] == [
        f"model.layers.{i}.{p}.bias" for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj")
    ]
    assert small.config.attention_bias is False and small.model.layers[0].self_attn.q_proj.bias is None
    assert small.model.layers[0].self_attn.o_proj.bias.abs().max() > 0  # compensation's bias stays
