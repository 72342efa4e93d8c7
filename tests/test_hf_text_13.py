"""Hugging Face text models, session 22: one cause per test (tiny models from configs,
nothing downloaded). Unusual-but-valid configurations and the user journey after the
prune."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import LM, V  # noqa: E402
from test_hf_text_7 import assert_generates_alike, default_prune, padded, params  # noqa: E402

import cleanai_plugins.zoo.transformers_gqa as gqa  # noqa: E402
from cleanai_core.plugins import temporary_plugin  # noqa: E402
from cleanai_core.testing import check_pruner  # noqa: E402


def ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


def reload_diff(small, tmp_path) -> float:
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        return float((small(**padded()).logits - again(**padded()).logits).abs().max())


#: 8 query heads in 2 KV groups, 4 layers: the last 2 reuse the keys and values of the first 2
KV_SHARING = {
    "gemma3n": ("Gemma3nForCausalLM", "Gemma3nTextConfig", {
        "intermediate_size": [96] * 4, "laurel_rank": 8, "altup_num_inputs": 2,
        "activation_sparsity_pattern": [0.0] * 4}),
    "gemma4": ("Gemma4ForCausalLM", "Gemma4TextConfig", {"global_head_dim": 8}),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(KV_SHARING))
def test_layers_that_reuse_keys_prune_query_heads_per_group_with_the_group_size(family, tmp_path):
    """Gemma3n / Gemma 4 with ``num_kv_shared_layers``: the last layers have no key or
    value projection and reuse an earlier layer's keys and values. With the
    query-heads-per-group plugin (``transformers_gqa``) their group size was not
    rewritten (read from a key projection they lack): the pruned layer 2 failed its
    check and was kept whole (8 heads beside 4, ``from_pretrained: false``), layer 3
    kept ``num_key_value_groups`` 4 for 4 heads over 2 KV heads and ``generate()``
    failed (``The size of tensor a (4) must match the size of tensor b (8)``; Gemma 4:
    ``mat1 and mat2 shapes cannot be multiplied``). A layer that reuses keys now takes
    the KV heads of the last layer of its type that made its own."""
    cls, config_cls, kw = KV_SHARING[family]
    config = getattr(transformers, config_cls)(**{
        **LM, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
        "num_kv_shared_layers": 2, "layer_types": ["sliding_attention", "full_attention"] * 2, "sliding_window": 4,
        "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": V, **kw})  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).eval()
    inputs = (ids(1, 8),)
    with temporary_plugin(gqa, name="transformers_gqa"):
        assert check_pruner(model, padded(), ratio=0.5).max_abs_diff < 1e-5
        _, small = default_prune(model, inputs, 0.5)
    attns = [layer.self_attn for layer in small.model.layers]
    assert [a.q_proj.out_features for a in attns] == [32] * 4  # 4 of 8 heads everywhere
    assert [a.num_key_value_groups for a in attns] == [2] * 4  # was [2, 2, 4, 4]
    assert [hasattr(a, "k_proj") for a in attns] == [True, True, False, False]
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (4, 2)
    assert small.config.cleanai_pruning["from_pretrained"] is True and params(small) < 0.7 * params(model)
    assert reload_diff(small, tmp_path) <= 1e-6
    assert_generates_alike(small, inputs)
