"""Hugging Face text models, session 16: one cause per test (tiny models from configs,
``tests/hf_families.py``; nothing downloaded). The families run in the corpus sweep too
(``pytest -m corpus tests/test_hf_corpus.py``)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import LM, build  # noqa: E402

from cleanai_core import DependencyGraph, StructuredPruner  # noqa: E402
from cleanai_core.errors import TraceError  # noqa: E402
from cleanai_core.slicing import apply_edits, edits_for  # noqa: E402
from cleanai_core.testing import check_pruner, random_units  # noqa: E402


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def reloaded(small, tmp_path):
    small.save_pretrained(tmp_path)
    return type(small).from_pretrained(tmp_path).eval()


def same_logits(a, b, inputs) -> None:
    """Within a float's rounding: ``from_pretrained`` maps the weights at 8-byte aligned
    addresses, where the CPU kernels may round differently (the unpruned models too)."""
    with torch.no_grad():
        torch.testing.assert_close(a(*inputs).logits, b(*inputs).logits, rtol=0, atol=1e-6)


def test_shared_experts_derived_from_the_experts_width_keep_their_share(tmp_path):
    """Aria's shared experts are ``intermediate_size * moe_num_shared_experts`` (96 x 2)
    wide. At 0.4 the plan kept 60 of each expert's 96 units (aligned to 16 bytes) and 116
    of the shared 192, which one key cannot say, so the default kept both and pruned
    nothing (259,392 parameters before and after). The shared experts are tied to the
    experts (``SliceSpec.same_share``): 60 and 120, and ``from_pretrained`` reloads."""
    model, inputs, _ = build("aria-text")
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4).prune()
    for layer in small.model.layers:
        assert layer.mlp.experts.down_proj.shape == (4, 60, 64)  # transposed: (experts, inter, hidden)
        assert layer.mlp.shared_experts.gate_proj.out_features == 120 == layer.mlp.shared_experts.down_proj.in_features
    assert small.config.intermediate_size == 60 and small.config.moe_num_shared_experts == 2
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert (params(model), params(small)) == (259_392, 176_448)
    same_logits(small, reloaded(small, tmp_path), inputs)


def test_global_ranking_and_the_oracle_keep_the_tied_share():
    """The tie holds where counts are not uniform: global ranking gives each layer's
    shared experts twice the experts' kept count, and ``random_units`` (the oracle) too."""
    model, inputs, _ = build("aria-text")
    pruner = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.3, global_pruning=True)
    plan = pruner.plan()
    kept = {}
    for gp in plan.groups:
        name = gp.group.modules()[0]
        if name.endswith((".experts", ".shared_experts.down_proj")):
            kept.setdefault(name.split(".mlp.")[0], []).append(gp.group.size - gp.n_pruned)
    assert len(kept) == 2 and sum(96 * 4 + 192 - sum(k) for k in kept.values()) > 0
    for counts in kept.values():  # four experts, then the shared experts
        assert len(set(counts[:4])) == 1 and counts[4] == 2 * counts[0] and counts[0] % 4 == 0
    report = check_pruner(model, inputs, ratio=0.4)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 2 * (4 * 36 + 72)  # experts, shared experts


def test_layers_that_scale_a_head_count_key_write_the_key_they_imply(tmp_path):
    """MiMo-V2-Flash's sliding-window layers have ``2 * num_key_value_heads`` key/value
    heads. The fix-up wrote the first layer's count: with a sliding-window layer first, a
    uniform 0.5 prune wrote 2 (its 4 heads halved) where the full-attention layers need 1,
    so the config rebuilt other shapes and the pruned model reloaded only through
    ``load_pruned``. Each layer's count is divided by its factor from the unpruned config."""
    cfg = transformers.MiMoV2FlashConfig(
        **{**LM, "num_hidden_layers": 3},
        num_key_value_heads=2,
        head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    torch.manual_seed(0)
    model = transformers.MiMoV2FlashForCausalLM(cfg).eval()
    inputs = (torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(1)),)
    graph = DependencyGraph(model, inputs)
    small = copy.deepcopy(model)
    apply_edits(small, edits_for(graph, random_units(graph, 0.5, torch.Generator().manual_seed(0), True)))
    attn = [layer.self_attn for layer in small.model.layers]
    assert [a.k_proj.out_features for a in attn] == [2 * 16, 1 * 16, 2 * 16]
    assert (small.config.num_key_value_heads, small.config.num_attention_heads) == (1, 2)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    same_logits(small, reloaded(small, tmp_path), inputs)


def test_lfm_feed_forward_w1_is_the_mlp_width(tmp_path):
    """LFM3 names its MLP ``feed_forward.w1 / w3 / w2``: the config fix-up knew no ``w1``,
    so the MLP width was said to have no key and the default at 0.3 pruned nothing
    (104,512 parameters); ``intermediate_size`` is written now."""
    model, inputs, _ = build("lfm3")
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.3).prune()
    assert [layer.feed_forward.w1.out_features for layer in small.model.layers] == [68] * 3
    assert small.config.intermediate_size == 68
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert params(model) == 104_512 and params(small) == 104_512 - 3 * 28 * 3 * 64
    same_logits(small, reloaded(small, tmp_path), inputs)


def test_a_model_that_fails_by_itself_is_not_blamed_on_the_trace():
    """Kimi-Linear with 2 layers gets only linear-attention layers from its default layer
    types, and transformers' cache then fails (``get_seq_length`` needs an attention
    layer), unpruned and without hooks. The error said the model failed "while tracing";
    it now says the model fails the same way run plainly. Given a full-attention layer
    (the corpus family), it traces and prunes."""
    linear = {"head_dim": 16, "num_heads": 4}
    cfg = transformers.KimiLinearConfig(**LM, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8,
                                        qk_nope_head_dim=8, v_head_dim=16, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=32, linear_attn_config=linear)  # fmt: skip
    assert cfg.layer_types == ["linear_attention", "linear_attention"]
    model = transformers.KimiLinearForCausalLM(cfg).eval()
    with pytest.raises(TraceError, match="get_seq_length.*fails the same way run plainly, without CleanAI's hooks"):
        DependencyGraph(model, (torch.randint(3, 100, (1, 8)),))
    model, inputs, _ = build("kimi-linear")
    assert len(DependencyGraph(model, inputs).groups(prunable_only=True)) > 0


def test_experts_with_a_separate_3d_gate_prune_the_gate_too(tmp_path):
    """Inkling's shared experts hold ``gate_proj`` and ``up_proj`` apart, both ``(experts,
    inter, hidden)``, run through ``bmm``: claimed as gate-less experts (Nemotron-H's one
    ``up_proj``), their gate kept its 32 rows while ``up_proj`` lost 16, and every pruned
    model failed (``The size of tensor a (32) must match the size of tensor b (16)``). The
    gate now prunes with the up projection."""
    model, inputs, _ = build("inkling")
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 160
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.3).prune()
    shared = small.model.layers[0].mlp.shared_experts
    assert shared.gate_proj.shape == shared.up_proj.shape == (1, 24, 64) and shared.down_proj.shape == (1, 64, 24)
    assert small.config.moe_intermediate_size == 24
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert (params(model), params(small)) == (109_762, 94_402)
    same_logits(small, reloaded(small, tmp_path), inputs)


def test_a_decoder_only_config_with_decoder_keys_writes_its_mlp_width(tmp_path):
    """TrOCR's decoder (``TrOCRForCausalLM``) keeps its MLP width in ``decoder_ffn_dim``
    without an encoder: the fix-up wrote ``decoder_ffn_dim`` only beside an
    ``encoder_ffn_dim``, so the width was said to have no key, and with the heads kept
    (head size ``d_model / heads``) the default refused: ``nothing in this model can be
    pruned``."""
    model, inputs, _ = build("trocr")
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.3).prune()
    assert [layer.fc1.out_features for layer in small.model.decoder.layers] == [68, 68]
    assert small.config.decoder_ffn_dim == 68 and small.config.d_model == 64
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert params(small) == params(model) - 2 * 28 * (64 + 1 + 64)
    same_logits(small, reloaded(small, tmp_path), inputs)


def test_a_config_switch_that_derives_the_mlp_width_is_turned_off(tmp_path):
    """LFM2 builds its MLP ``int(2 * intermediate_size / 3)`` wide, times
    ``block_ffn_dim_multiplier``, rounded up to ``block_multiple_of`` (96 -> 256 here):
    no value of the key states a pruned width, so the default kept every MLP (0.3:
    133,920 parameters before and after). The fix-up turns ``block_auto_adjust_ff_dim``
    off where that rebuilds the model, and the key is the width as written."""
    model, inputs, _ = build("lfm2")
    assert model.model.layers[0].feed_forward.w1.out_features == 256 and model.config.intermediate_size == 96
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.3).prune()
    assert [layer.feed_forward.w1.out_features for layer in small.model.layers] == [180, 180]
    assert (small.config.intermediate_size, small.config.block_auto_adjust_ff_dim) == (180, False)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert (params(model), params(small)) == (133_920, 104_736)
    same_logits(small, reloaded(small, tmp_path), inputs)
    assert model.config.block_auto_adjust_ff_dim is True  # the user's model keeps its config
