"""Flex attention (issue #15): the pruned weights and config do not depend on the attention
implementation the graph was traced with. A Llama (GQA) pruned with the default path under
sdpa gives the same logits when switched to ``flex_attention``. On CPU flex attention runs
only compiled (a minute to several for this 2-layer model), so this is in the ``corpus`` set
(``pytest -m corpus tests/test_hf_flex.py``)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.corpus


def test_a_model_pruned_under_sdpa_runs_under_flex_attention_with_the_same_logits():
    from cleanai_core import StructuredPruner

    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 100, (2, 12))
    pruner = StructuredPruner(model, ids, pruning_ratio=0.5)
    pruner.collect_activations([torch.randint(0, 100, (4, 12)) for _ in range(4)], progress=False)
    pruned = pruner.prune()
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 1)
    assert pruned.config.intermediate_size == 64
    with torch.no_grad():
        sdpa = pruned(ids).logits
    try:
        pruned.set_attn_implementation("flex_attention")
    except (ImportError, ValueError) as exc:  # a transformers or torch build without flex attention
        pytest.skip(f"flex attention unavailable: {exc}")
    with torch.no_grad():
        flex = pruned(ids).logits
    assert torch.allclose(flex, sdpa, atol=1e-5), float((flex - sdpa).abs().max())
