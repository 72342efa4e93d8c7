"""Hugging Face text models, session 24 (text16): one cause per test (tiny models from
configs, nothing downloaded)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import V  # noqa: E402
from test_hf_text_7 import params  # noqa: E402

from cleanai_core import StructuredPruner  # noqa: E402
from cleanai_core.testing import check_pruner  # noqa: E402


def ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


def calibrated(model, inputs: dict, ratio: float, **kw):
    pruner = StructuredPruner(model, inputs, pruning_ratio=ratio, **kw)
    pruner.collect_activations([inputs], num_batches=1)
    return pruner.prune()


def outputs_diff(a, b) -> float:
    """Max abs difference over every tensor of two model outputs."""
    return max(float((a[k] - b[k]).abs().max()) for k in a.keys() if torch.is_tensor(a[k]))


def reloaded(small, tmp_path):
    small.save_pretrained(tmp_path)
    return type(small).from_pretrained(tmp_path).eval()


def seamless(version: str):
    """SeamlessM4T(v2)'s text-to-text model: its halves are ``text_encoder`` /
    ``text_decoder`` (the speech and unit towers of the config are not built)."""
    name = "SeamlessM4Tv2" if version == "v2" else "SeamlessM4T"
    config = getattr(transformers, f"{name}Config")(
        vocab_size=V, hidden_size=64, max_position_embeddings=64, encoder_layers=2, decoder_layers=2,
        encoder_ffn_dim=96, decoder_ffn_dim=96, encoder_attention_heads=4, decoder_attention_heads=4,
        speech_encoder_layers=1, speech_encoder_attention_heads=4, speech_encoder_intermediate_size=64,
        t2u_encoder_layers=1, t2u_decoder_layers=1, t2u_vocab_size=50, unit_embed_dim=32,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        decoder_start_token_id=3)  # fmt: skip
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForTextToText")(config).eval()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_prefixed_encoder_and_decoder_halves_write_their_own_keys(version, tmp_path):
    """SeamlessM4T's text-to-text model names its halves ``text_encoder`` /
    ``text_decoder``. The config fix-up told the halves apart only by a module named
    ``encoder`` / ``decoder``: every head count went to ``num_attention_heads`` (which the
    config maps to ``decoder_attention_heads``) and no MLP width was written at all, so
    the rebuild check found every width undescribable and the default pruned everything
    anyway with a warning: 157,568 -> 113,096 parameters with 3 heads of 64 / 4, and
    ``from_pretrained`` failed (``embed_dim must be divisible by num_heads``). The nearest
    ``*_encoder`` / ``*_decoder`` part now names the half."""
    model = seamless(version)
    inputs = {"input_ids": ids(1, 8), "decoder_input_ids": ids(1, 5)}
    assert check_pruner(model, inputs, ratio=0.5).max_abs_diff < 1e-5
    small = calibrated(model, inputs, 0.4)
    cfg = small.config
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert (cfg.encoder_ffn_dim, cfg.decoder_ffn_dim) == (58, 58)
    assert (cfg.encoder_attention_heads, cfg.decoder_attention_heads) == (4, 4)  # head size 64 / heads: kept
    assert [layer.ffn.fc1.out_features for layer in small.text_encoder.layers] == [58, 58]
    assert (params(model), params(small)) == (157_568, 157_568 - 4 * 38 * (64 + 1 + 64))
    again = reloaded(small, tmp_path)
    with torch.no_grad():
        assert outputs_diff(small(**inputs), again(**inputs)) == 0
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        cached = again.generate(inputs["input_ids"], **gen)
        assert torch.equal(cached, again.generate(inputs["input_ids"], **gen, use_cache=False))


def ernie_vl(layers: int = 3, **kw):
    """A tiny ERNIE-4.5-VL-MoE (a dense first layer, then MoE layers with text experts,
    vision experts and a shared expert; ``moe_intermediate_size`` = [text, vision])."""
    text = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, moe_intermediate_size=[32, 16],
                moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, rope_parameters={
                    "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]})  # fmt: skip
    text.update(kw)
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=4)
    config = transformers.Ernie4_5_VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=V - 1, video_token_id=V - 2, image_start_token_id=V - 3,
        image_end_token_id=V - 4, video_start_token_id=V - 5, video_end_token_id=V - 6)  # fmt: skip
    torch.manual_seed(0)
    return transformers.Ernie4_5_VLMoeForConditionalGeneration(config).eval()


def test_a_list_key_holding_one_width_per_kind_of_expert_is_written_per_kind(tmp_path):
    """ERNIE-4.5-VL-MoE's ``moe_intermediate_size`` is [text experts, vision experts], not
    one width per layer. The fix-up wrote a list key only when it had one value per
    layer: with two MoE layers (4 expert widths for a 2-entry list) nothing was written,
    the rebuild check blamed the MLP width and the default kept every expert (250,608 ->
    243,312 parameters at 0.4: the dense MLP only). Widths that repeat the list in every
    layer are now written per kind: the text experts prune (32 -> 20, and the shared
    expert with them); the vision experts, which text tokens never reach, keep 16."""
    model = ernie_vl(3)
    inputs = (ids(1, 8),)
    assert check_pruner(model, inputs, ratio=0.5).max_abs_diff < 1e-5
    small = calibrated(model, {"input_ids": inputs[0]}, 0.4)
    text = small.config.text_config
    assert text.moe_intermediate_size == [20, 16] and text.intermediate_size == 58
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    moe = [layer.mlp for layer in small.model.language_model.layers[1:]]
    assert [tuple(m.text_moe.experts.gate_up_proj.shape) for m in moe] == [(4, 40, 64)] * 2
    assert [m.shared_experts.gate_proj.out_features for m in moe] == [20, 20]
    assert (params(model), params(small)) == (250_608, 220_272)
    again = reloaded(small, tmp_path)
    with torch.no_grad():
        assert outputs_diff(small(*inputs), again(*inputs)) == 0
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(again.generate(inputs[0], **gen), again.generate(inputs[0], **gen, use_cache=False))


def test_shared_experts_beside_several_kinds_of_routed_experts_prune_with_the_first(tmp_path):
    """ERNIE-4.5-VL-MoE's shared experts (``mlp.shared_experts``, ``moe_intermediate_size[0]
    x moe_num_shared_experts`` wide) sit beside the blocks of routed experts
    (``mlp.text_moe.experts``, ``mlp.vision_moe.experts``), not beside the experts. The tie
    that keeps them at the experts' share looked beside the experts only: with 2 shared
    experts (64 wide) the text experts pruned 32 -> 20 and the shared ones stayed 64,
    which the config rebuilds as 40, so the default's ``hf/`` could not reload
    (``from_pretrained: false``, a size mismatch in ``shared_experts``). The block's parent
    is now searched too; the first kind of routed experts claims the shared MLP."""
    model = ernie_vl(2, moe_intermediate_size=[32, 32], moe_num_shared_experts=2, mlp_layer_types=["sparse"] * 2)
    inputs = (ids(1, 8),)
    small = calibrated(model, {"input_ids": inputs[0]}, 0.4)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert small.config.text_config.moe_intermediate_size == [20, 32]
    moe = [layer.mlp for layer in small.model.language_model.layers]
    assert [m.shared_experts.gate_proj.out_features for m in moe] == [40, 40]  # 2 x 20 (was 64)
    assert [tuple(m.text_moe.experts.gate_up_proj.shape) for m in moe] == [(4, 40, 64)] * 2
    assert (params(model), params(small)) == (256_624, 228_976)
    again = reloaded(small, tmp_path)
    with torch.no_grad():
        assert outputs_diff(small(*inputs), again(*inputs)) == 0


def test_a_width_sized_from_a_sibling_blocks_key_keeps_that_block_when_nothing_nearer_cut(monkeypatch):
    """The default's rebuild check blames a mismatched tensor that no group cut on the
    groups cutting beside it (its holder's parent), then on those cutting it in other
    layers; where neither cut anything it blamed nothing, and the prune went on with a
    config that rebuilds another model: ERNIE-4.5-VL's shared experts (kept, 64 wide,
    rebuilt as ``2 x moe_intermediate_size[0]``) beside text experts pruned 32 -> 20 in
    the sibling block ``mlp.text_moe``. With the shared-experts tie switched off (a layout
    it does not know), the check now looks one level up (``mlp``) and keeps the experts
    whose key sizes the shared MLP: ``from_pretrained`` rebuilds what the default left."""
    import cleanai_plugins.zoo.transformers as hf

    monkeypatch.setattr(hf, "shared_expert_ties", lambda model: None)
    model = ernie_vl(2, moe_intermediate_size=[32, 32], moe_num_shared_experts=2, mlp_layer_types=["sparse"] * 2)
    small = calibrated(model, {"input_ids": ids(1, 8)}, 0.4)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}  # was false: 2 x 20 != 64
    moe = [layer.mlp for layer in small.model.language_model.layers]
    assert [tuple(m.text_moe.experts.gate_up_proj.shape) for m in moe] == [(4, 64, 64)] * 2
    assert small.config.text_config.moe_intermediate_size == [32, 32]
