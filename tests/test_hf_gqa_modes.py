"""Grouped-query attention, the second mode: every key/value head kept, the same query
heads pruned in every group (``cleanai_plugins.zoo.transformers_gqa``). The masking
oracle holds under eager and sdpa attention, the graph does not depend on which runs,
and a model pruned with the default options reloads with ``from_pretrained``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import cleanai_plugins.zoo.transformers_gqa as gqa  # noqa: E402
from cleanai_core import DependencyGraph, StructuredPruner  # noqa: E402
from cleanai_core.plugins import temporary_plugin  # noqa: E402
from cleanai_core.testing import check_pruner  # noqa: E402

VOCAB = 97
#: 8 query heads in 2 groups of 4 (head_dim 8); Phi-3 fuses q, k, v in one projection
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def _tiny(name: str, attn: str = "sdpa"):
    config_cls, model_cls, kw = FAMILIES[name]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=False,
        **kw,
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    model.set_attn_implementation(attn)
    return model


def _x(n: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def _attention_groups(graph) -> list[tuple]:
    """(slices, units, prunable) of the groups on the attention's output projections."""
    return sorted(
        (tuple(sorted(f"{s.module.rpartition('.')[2]}:{s.name}" for s in g.slices)), g.size, g.prunable)
        for g in graph.groups()
        if any(s.module.endswith(("q_proj", "k_proj", "v_proj", "qkv_proj")) and s.name == "out" for s in g.slices)
    )


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3"])
def test_units_are_query_heads_by_position_and_the_kv_heads_stay(name):
    """One unit per position in a group (4), each the j-th query head of both groups; the
    key/value heads are frozen. The same graph under eager and sdpa attention."""
    with temporary_plugin(gqa, name="gqa"):
        graphs = [_attention_groups(DependencyGraph(_tiny(name, attn), (_x(),))) for attn in ("eager", "sdpa")]
    assert graphs[0] == graphs[1]
    queries = [g for g in graphs[0] if g[2] > 0]
    assert len(queries) == 2 and all(size == 4 and prunable == 4 for _, size, prunable in queries)  # one per layer
    frozen = [g for g in graphs[0] if g[2] == 0]
    if name != "phi3":  # Phi-3's k and v are rows of the fused qkv_proj, in its one group
        assert all(size == 2 for _, size, _ in frozen) and len(frozen) >= 2  # 2 KV heads per layer, kept
    defaults = [_attention_groups(DependencyGraph(_tiny(name, attn), (_x(),))) for attn in ("eager", "sdpa")]
    assert defaults[0] == defaults[1]  # eager's bmm folds the batch of 2 into the heads and back
    assert [size for _, size, p in defaults[1] if p] == [2, 2]  # without the plugin: whole KV groups


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3", "mixtral"])
def test_query_heads_per_group_pass_the_masking_oracle(name, attn):
    with temporary_plugin(gqa, name="gqa"):
        report = check_pruner(_tiny(name, attn), (_x(),), ratio=0.5)
    assert report.output_shapes_equal and report.pruned_units > 0
    assert report.max_abs_diff < 1e-5


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_default_options_reload_with_every_kv_head_kept(name, tmp_path):
    model = _tiny(name)
    with temporary_plugin(gqa, name="gqa"):
        pruner = StructuredPruner(model, _x(), pruning_ratio=0.5)
        pruner.collect_activations([_x(16, seed) for seed in range(3)], progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = pruner.prune().eval()
    config, attn = small.config, small.model.layers[0].self_attn
    assert config.num_key_value_heads == 2 and config.num_attention_heads == 4  # 2 of 4 per group gone
    assert attn.num_key_value_groups == 2 and config.head_dim == 8
    assert config.cleanai_pruning["from_pretrained"] is True
    small.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    x = _x(12, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, small(input_ids=x).logits, rtol=0, atol=1e-5)
        gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        cached = again.generate(input_ids=x[:1], use_cache=True, **gen)
        plain = again.generate(input_ids=x[:1], use_cache=False, **gen)
    assert torch.equal(cached, plain)
    assert copy.deepcopy(model.config).num_attention_heads == 8  # the user's model is untouched
