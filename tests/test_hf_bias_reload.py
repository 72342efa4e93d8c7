"""A transformers LLM pruned with the defaults (bias compensation on) still reloads with
``from_pretrained``: the biases compensation created are declared through the config's
``attention_bias`` / ``mlp_bias`` switches, where the family has them."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cleanai_core import StructuredPruner  # noqa: E402

VOCAB = 97


def _prune(model, **options) -> torch.nn.Module:
    torch.manual_seed(1)
    x = torch.randint(0, VOCAB, (2, 16))
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, **options)  # defaults: bias_compensation=True
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


#: families whose config cannot declare a bias for some layers compensation reaches
NO_SWITCH = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # o_proj: bias=False in code (q/k/v have biases)
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),  # fused qkv_proj / gate_up_proj
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),  # attention_bias only
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),  # attention_bias only
}


def _family(name):
    config_cls, model_cls, kw = NO_SWITCH[name]
    torch.manual_seed(0)
    config = _config(getattr(transformers, config_cls), **kw)
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("name", sorted(NO_SWITCH))
def test_default_options_reload_where_the_config_cannot_declare_every_bias(name, tmp_path):
    """Compensation creates no bias where no config switch could declare it: it folds into
    the kept columns only, so ``from_pretrained`` rebuilds the model, logits identical."""
    model = _family(name)
    small = _prune(model)
    record = small.config.cleanai_pruning
    assert record["uniform"] is True and record["from_pretrained"] is True, record
    rebuilt_keys = set(type(small)(small.config).state_dict())
    assert set(small.state_dict()) == rebuilt_keys  # no bias the config cannot name
    assert sum(p.numel() for p in small.parameters()) < 0.75 * sum(p.numel() for p in model.parameters())
    small.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, small(input_ids=x).logits, rtol=0, atol=1e-5)


def test_the_mlp_output_without_a_bias_switch_still_gets_the_least_squares_fold():
    """Qwen3's ``down_proj`` can take no bias, yet its kept columns absorb the removed
    ones (reconstruction), and ``o_proj``'s bias is declared through ``attention_bias``."""
    model = _family("qwen3")
    small = _prune(model)
    layer, orig = small.model.layers[0], model.model.layers[0]
    assert layer.mlp.down_proj.bias is None
    kept = layer.mlp.down_proj.in_features
    assert kept == 32
    # the kept columns are no longer a plain slice of the original: they absorbed the removed ones
    cols = orig.mlp.down_proj.weight.detach()
    assert not any(torch.equal(layer.mlp.down_proj.weight[:, :1], cols[:, j : j + 1]) for j in range(cols.shape[1]))
    assert small.config.attention_bias is True and layer.self_attn.o_proj.bias.abs().max() > 0
    assert small.config.cleanai_pruning["biases_declared"] == ["attention_bias"]


def test_mean_compensation_alone_creates_no_bias_the_config_cannot_declare():
    model = _family("qwen2")
    small = _prune(model, reconstruction=False)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    layer = small.model.layers[0]
    assert layer.self_attn.o_proj.bias is None and layer.mlp.down_proj.bias is None
    assert layer.self_attn.q_proj.bias is not None  # Qwen2's own q/k/v biases stay


def test_a_bias_no_switch_declares_keeps_the_honest_record():
    """A bias that some other code created where Mistral's config has no switch: nothing
    can declare it, the record says ``from_pretrained`` would not rebuild it, and no zero
    biases are added for nothing."""
    from cleanai_plugins.zoo.transformers.config import fix_config

    model = _family("mistral")
    proj = model.model.layers[0].self_attn.o_proj
    proj.bias = torch.nn.Parameter(torch.ones(proj.out_features))
    fix_config(model)
    record = model.config.cleanai_pruning
    assert record["from_pretrained"] is False and "biases_declared" not in record
    assert record["mismatched"] == ["model.layers.0.self_attn.o_proj.bias"]
    assert model.model.layers[0].self_attn.q_proj.bias is None
