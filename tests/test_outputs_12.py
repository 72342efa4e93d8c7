"""Session 22, outputs: what CleanAI writes after pruning and what the user gets back (the
replayable history, the saved folder pruned further, the report, recovery and gradual
pruning in the user's training loop), checked against independent counts."""

from __future__ import annotations

import pytest
import torch

from cleanai_core import StructuredPruner
from cleanai_core.history import PruningHistory
from cleanai_core.io import load_pruned, save_pruned

# -- a replayed model's transformers config declares the biases compensation added ---------------


def _tiny_llama():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _pruned_twice_widths(model, ids):
    p = StructuredPruner(model, ids[:1], pruning_ratio=0.3)
    p.collect_activations([ids], num_batches=1, progress=False)
    again = p.prune()
    return {n: tuple(t.shape) for n, t in again.named_parameters()}


def test_a_replayed_transformers_model_declares_compensation_biases_and_prunes_further_like_the_original(tmp_path):
    pytest.importorskip("transformers")
    ids = torch.randint(0, 61, (4, 12), generator=torch.Generator().manual_seed(0))
    folder = tmp_path / "orig"
    _tiny_llama().save_pretrained(folder)
    first = StructuredPruner(_tiny_llama(), ids[:1], pruning_ratio=0.3)
    first.collect_activations([ids], num_batches=1, progress=False)
    pruned = first.prune()
    assert pruned.config.mlp_bias is True  # compensation gave the MLP biases, and the config says so
    save_pruned(tmp_path / "saved", pruned, first.history, f"hf:{folder}")
    loaded = load_pruned(tmp_path / "saved")
    replayed = PruningHistory.from_json(first.history.to_json()).replay(_tiny_llama())
    for model in (loaded, replayed):
        # the config declared no bias: it no longer rebuilt its own model (from_pretrained, the describability check)
        assert model.config.mlp_bias is True
        assert model.config.cleanai_pruning == pruned.config.cleanai_pruning
    # pruned further, the loaded model keeps its 4 heads (3 heads of 8 cannot be a 32 wide Llama's config) as the
    # in-memory one does; it lost a head, and from_pretrained could not rebuild it
    want = _pruned_twice_widths(pruned, ids)
    assert want["model.layers.0.self_attn.q_proj.weight"] == (32, 32)
    assert _pruned_twice_widths(loaded, ids) == want
