"""Hugging Face text models, session 25 (text17): model types of transformers 5.24 that no
earlier test built, from tiny configs (nothing downloaded), on the default path."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import V  # noqa: E402
from test_hf_text_7 import params  # noqa: E402
from test_hf_text_16 import calibrated, ids, outputs_diff, reloaded  # noqa: E402

from cleanai_core.cli import main  # noqa: E402
from cleanai_core.testing import check_pruner  # noqa: E402

#: the keys every tiny config below shares (2 layers, hidden 64, 4 heads, vocab 100)
BASE = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
#: latent attention (DeepSeek-style) and expert sizes
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8, head_dim=8,
           qk_head_dim=16)  # fmt: skip
MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2)
GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)


def tiny(config: str, model: str, **kw):
    """``model`` built from ``config(**BASE, **kw)``, seeded, in eval mode."""
    cfg = getattr(transformers, config)(**{**BASE, **kw})
    torch.manual_seed(0)
    return getattr(transformers, model)(cfg).eval()


def dbrx(**kw):
    attn = {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}
    ffn = {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2, **kw}
    return tiny("DbrxConfig", "DbrxForCausalLM", d_model=64, n_heads=4, n_layers=2, max_seq_len=64, attn_config=attn,
                ffn_config=ffn)  # fmt: skip


def longcat():
    return tiny("LongcatFlashConfig", "LongcatFlashForCausalLM", num_layers=2, num_key_value_heads=4,
                ffn_hidden_size=96, moe_topk=2, n_routed_experts=4, zero_expert_num=2, expert_ffn_hidden_size=32,
                **MLA)  # fmt: skip


def minimax_m3():
    return tiny("MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM", intermediate_size=32, num_key_value_heads=2,
                head_dim=16, num_local_experts=4, dense_intermediate_size=96, shared_intermediate_size=32, rotary_dim=8,
                mlp_layer_types=["dense", "sparse"], index_head_dim=16, index_block_size=4, index_topk_blocks=2,
                layer_types=["full_attention"] * 2, num_experts_per_tok=2)  # fmt: skip


def reformer():
    """A tiny Reformer (local then LSH attention; ``hash_seed``: the same LSH rotations every forward)."""
    return tiny("ReformerConfig", "ReformerModelWithLMHead", attention_head_size=16, attn_layers=["local", "lsh"],
                feed_forward_size=96, axial_pos_shape=[8, 8], axial_pos_embds_dim=[32, 32], is_decoder=True,
                local_attn_chunk_length=4, lsh_attn_chunk_length=4, num_buckets=2, num_hashes=1,
                hash_seed=0)  # fmt: skip


def axk2():
    return tiny("AXK2Config", "AXK2ForCausalLM", intermediate_size=96, num_key_value_heads=4, n_routed_experts=4,
                mlp_layer_types=["dense", "sparse"], n_group=1, topk_group=1, index_topk=4, index_head_dim=16,
                index_n_heads=2, **MLA, **MOE)  # fmt: skip


def same_generation(model, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(model.generate(x, **GREEDY), model.generate(x, **GREEDY, use_cache=False))


def test_flat_experts_prune_as_one_composite_and_reload(tmp_path):
    """DBRX keeps its experts flat: ``w1`` (gate), ``v1`` (up), ``w2`` (down), each
    ``(experts * ffn_hidden_size, hidden)``, viewed per expert by the stored
    ``ffn_hidden_size`` and indexed by the routed expert. Traced op by op, the view, the
    select of a bare parameter and the ``index_add_`` froze every channel, and its fused
    ``Wqkv`` split into unequal [q, k, v] parts froze the heads: ``nothing in this model
    can be pruned``. The experts are now one composite (each expert's rows of the three,
    one count for all), and ``ffn_config.ffn_hidden_size`` is written."""
    model = dbrx()
    x = ids(1, 8)
    report = check_pruner(model, {"input_ids": x}, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == ()
    small = calibrated(model, {"input_ids": x}, 0.4)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert small.config.ffn_config.ffn_hidden_size == 20
    experts = [b.ffn.experts for b in small.transformer.blocks]
    assert [tuple(e.mlp.w1.shape) for e in experts] == [(80, 64)] * 2  # 4 experts x 20
    assert [(e.ffn_hidden_size, e.mlp.ffn_hidden_size) for e in experts] == [(20, 20)] * 2
    assert (params(model), params(small)) == (87_360, 87_360 - 2 * 3 * 4 * 12 * 64)
    again = reloaded(small, tmp_path)
    with torch.no_grad():
        assert outputs_diff(small(x), again(x)) == 0
    assert same_generation(again, x)


def test_flat_experts_through_the_job_report_their_units_and_perplexity(tmp_path):
    """``cleanai prune --model hf:DIR`` on DBRX: the experts' units counted, perplexity
    before and after, and ``hf/`` reloading with ``from_pretrained`` (it refused before:
    nothing could be pruned)."""
    dbrx().save_pretrained(tmp_path / "m")
    torch.save({"input_ids": ids(24, 16, seed=3)}, tmp_path / "d.pt")
    argv = ["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"), "--out", str(tmp_path / "o"),
            "--threads", "1", "--latency-repeats", "1", "--ratio", "0.4", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert (report["units_before"], report["units_after"]) == (256, 160)  # 2 layers x 4 experts x 32 -> 20
    assert (report["params_before"], report["params_after"]) == (87_360, 68_928)
    assert report["hf_reload_path"] == "from_pretrained" and report["perplexity_after"] > 1
    assert abs(report["perplexity_after"] - report["perplexity_before"]) < 1
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "hf").eval()
    assert params(again) == 68_928


def test_two_mlps_per_layer_write_their_key():
    """LongCat-Flash holds two attentions and two MLPs per layer (``mlps.0``, ``mlps.1``);
    the MLPs' names were not an MLP's to the config fix-up, so ``ffn_hidden_size`` was never
    written and, with the query LoRA rank (which its ``mla_scale_q_lora`` derives from) not
    describable either, the default pruned everything with the "config can describe none"
    warning: 101,632 -> 85,492, ``from_pretrained: false``. The MLPs now write
    ``ffn_hidden_size``; the query rank is kept (the rebuilt scale would differ)."""
    model = longcat()
    x = ids(1, 8)
    small = calibrated(model, {"input_ids": x}, 0.4)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert small.config.ffn_hidden_size == 58 and small.config.q_lora_rank == 16
    layer = small.model.layers[0]
    assert [m.gate_proj.out_features for m in layer.mlps] == [58, 58]
    assert [a.q_a_proj.out_features for a in layer.self_attn] == [16, 16]
    assert (params(model), params(small)) == (101_632, 101_632 - 2 * 38 * 3 * 64)


def test_dense_layers_with_a_key_of_their_own_beside_the_experts(tmp_path):
    """MiniMax-M3's dense layers are ``dense_intermediate_size`` wide, its experts
    ``intermediate_size`` (Cohere2-MoE's dense first layers: ``prefix_dense_intermediate_size``).
    Only Llama 4's ``intermediate_size_mlp`` was known: both widths went to
    ``intermediate_size`` (``[96, 32]``, "uniform: false") and the default kept both,
    87,168 -> 84,864. Each now has its key."""
    model = minimax_m3()
    x = ids(1, 8)
    small = calibrated(model, {"input_ids": x}, 0.4)
    cfg = small.config
    assert cfg.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert (cfg.dense_intermediate_size, cfg.intermediate_size, cfg.shared_intermediate_size) == (58, 20, 20)
    assert (params(model), params(small)) == (87_168, 68_352)
    again = reloaded(small, tmp_path)
    with torch.no_grad():
        assert outputs_diff(small(x), again(x)) == 0
    assert same_generation(again, x)


@pytest.mark.parametrize("dense", [96, None])
def test_dense_first_layers_of_their_own_width_or_of_the_mlp_key(dense, tmp_path):
    """Cohere2-MoE's dense first layers read ``prefix_dense_intermediate_size``, or, where
    it is None, ``intermediate_size`` as the experts do (then both widths go there). With a
    key of their own the two widths went to ``intermediate_size`` (``[96, 32]``) and the
    default pruned nothing (74,432 parameters at 0.4)."""
    model = tiny("Cohere2MoeConfig", "Cohere2MoeForCausalLM", intermediate_size=32, num_key_value_heads=2, head_dim=16,
                 num_experts=4, num_experts_per_tok=2, sliding_window=4, mlp_layer_types=["dense", "sparse"],
                 prefix_dense_intermediate_size=dense)  # fmt: skip
    x = ids(1, 8)
    small = calibrated(model, {"input_ids": x}, 0.4)
    cfg = small.config
    assert cfg.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert (cfg.prefix_dense_intermediate_size, cfg.intermediate_size) == ((58, 20) if dense else (None, 20))
    assert (params(model), params(small)) == ((74_432, 57_920) if dense else (62_144, 50_624))
    again = reloaded(small, tmp_path)
    with torch.no_grad():
        assert outputs_diff(small(x), again(x)) == 0


def test_reformer_feed_forward_size_is_written(tmp_path):
    """Reformer's MLP (``feed_forward.dense.dense``, ``feed_forward_size``) had no MLP key:
    the default pruned it with the others anyway and only ``load_pruned`` could reload.
    Now: 74,248 -> 64,444 with ``feed_forward_size`` 58, ``from_pretrained``."""
    model = reformer()
    x = ids(1, 8)
    assert check_pruner(model, {"input_ids": x}, ratio=0.5).max_abs_diff < 1e-5
    small = calibrated(model, {"input_ids": x}, 0.4)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert small.config.feed_forward_size == 58
    assert (params(model), params(small)) == (74_248, 64_444)
    again = reloaded(small, tmp_path)
    with torch.no_grad():
        assert outputs_diff(small(x), again(x)) < 1e-6


def test_an_mlp_inside_a_norm_is_not_the_layers_mlp():
    """AXK2's gated norms hold an ``mlp`` (``fc1`` / ``fc2``, ``gated_norm_rank`` wide): the
    fix-up took it for the layer's MLP and wrote ``intermediate_size`` per layer
    ``[58, 16, 16, 16]`` ("uniform: false"). MLPs inside a norm are left out now."""
    model = axk2()
    small = calibrated(model, {"input_ids": ids(1, 8)}, 0.4)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert small.config.intermediate_size == 58 and small.config.moe_intermediate_size == 20
    assert small.model.layers[0].input_layernorm.mlp.fc1.out_features == 16  # gated_norm_rank: no key, kept


def test_an_attention_whose_head_size_attribute_is_all_heads_width_prunes_heads(tmp_path):
    """LXMERT's attention names the width of all heads ``head_size`` (one head's is
    ``attention_head_size``) and reshapes its output to it: the fix-up left it at 64, so
    every head prune failed to run (``shape '[1, 8, 64]' is invalid for input of size
    256``) and the oracle kept 6 attention groups whole. Now rewritten with the heads. (The
    default keeps the heads: its config derives the head size.)"""
    config = transformers.LxmertConfig(
        vocab_size=V, hidden_size=64, num_attention_heads=4, intermediate_size=96, max_position_embeddings=64,
        pad_token_id=0, l_layers=2, x_layers=1, r_layers=1, visual_feat_dim=16, visual_pos_dim=4, num_qa_labels=5,
        num_object_labels=5, num_attr_labels=5)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LxmertForQuestionAnswering(config).eval()
    gen = torch.Generator().manual_seed(3)
    inputs = {"input_ids": ids(1, 8), "visual_feats": torch.randn(1, 3, 16, generator=gen),
              "visual_pos": torch.rand(1, 3, 4, generator=gen)}  # fmt: skip
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == ()
    small = calibrated(model, inputs, 0.4)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert (params(model), params(small)) == (189_285, 164_775)
    again = reloaded(small, tmp_path)
    with torch.no_grad():
        assert outputs_diff(small(**inputs), again(**inputs)) < 1e-6


def bbox(n: int = 8) -> torch.Tensor:
    """Boxes ``(x0, y0, x1, y1)`` in 0..1000 for ``n`` tokens of one row."""
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 500, (1, n, 2), generator=gen)
    return torch.cat([x0, x0 + torch.randint(1, 400, (1, n, 2), generator=gen)], -1)


TEXT = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            head_dim=16)  # fmt: skip
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)  # fmt: skip
AUDIO = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=16,
             max_source_positions=16)  # fmt: skip


def nested(config: str, model: str, **kw):
    cfg = getattr(transformers, config)(**kw)
    torch.manual_seed(0)
    return getattr(transformers, model)(cfg).eval()


#: name -> (builder, extra inputs beside ``input_ids``, generative): model types of transformers 5.24 that
#: no earlier test built, each passing every check below without a fix of this session
SWEEP = {
    "kolibri1": (
        lambda: tiny(
            "Kolibri1Config",
            "Kolibri1ForCausalLM",
            intermediate_size=96,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            shared_expert_intermediate_size=32,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            **MOE,
        ),
        None,
        True,
    ),
    "lara_mini": (
        lambda: tiny(
            "LaraMiniConfig",
            "LaraMiniForCausalLM",
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=16,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            num_experts=4,
            shared_expert_intermediate_size=32,
            sliding_window=4,
            layer_types=["linear_attention", "sliding_attention", "full_attention"],
            **MOE,
        ),
        None,
        True,
    ),
    "qwen4_exp": (
        lambda: tiny(
            "Qwen4ExpTextConfig",
            "Qwen4ExpForCausalLM",
            num_key_value_heads=2,
            head_dim=16,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            num_experts=4,
            shared_expert_intermediate_size=32,
            hc_lowrank=8,
            ple_embed_dim=32,
            ngram_vocab_size_base=200,
            make_ngram_vocab_size_divisible_by=8,
            split_ngram_parts=4,
            layer_types=["linear_attention", "indexed_attention"],
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=16,
            indexer_budget=8,
            indexer_compress_ratio=2,
            **MOE,
        ),
        None,
        True,
    ),
    "zaya": (
        lambda: tiny(
            "ZayaConfig",
            "ZayaForCausalLM",
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            router_hidden_size=16,
            moe_intermediate_size=32,
            num_experts_per_tok=1,
        ),
        None,
        True,
    ),
    "axk1": (
        lambda: tiny(
            "AXK1Config",
            "AXK1ForCausalLM",
            intermediate_size=96,
            num_key_value_heads=4,
            n_routed_experts=4,
            mlp_layer_types=["dense", "sparse"],
            n_group=1,
            topk_group=1,
            **MLA,
            **MOE,
        ),
        None,
        True,
    ),
    "deepseek_v4": (
        lambda: tiny(
            "DeepseekV4Config",
            "DeepseekV4ForCausalLM",
            head_dim=16,
            q_lora_rank=16,
            n_routed_experts=4,
            o_lora_rank=16,
            index_n_heads=2,
            index_head_dim=16,
            index_topk=4,
            sliding_window=4,
            layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
            mlp_layer_types=["hash_moe", "moe"],
            **MOE,
        ),
        None,
        True,
    ),
    "bitnet": (
        lambda: tiny("BitNetConfig", "BitNetForCausalLM", intermediate_size=96, num_key_value_heads=2),
        None,
        True,
    ),
    "dory": (
        lambda: tiny("DoryConfig", "DoryForCausalLM", intermediate_size=96, num_key_value_heads=2, head_dim=16),
        None,
        True,
    ),
    "cohere_compass": (
        lambda: tiny(
            "CohereCompassTextConfig",
            "CohereCompassForCausalLM",
            intermediate_size=96,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                k: {"rope_type": "default", "rope_theta": 10000.0} for k in ("full_attention", "sliding_attention")
            },
        ),
        None,
        True,
    ),
    "qwen2_audio (text only)": (
        lambda: nested(
            "Qwen2AudioConfig",
            "Qwen2AudioForConditionalGeneration",
            text_config={**TEXT, "model_type": "qwen2"},
            audio_token_index=V - 1,
            audio_config={**AUDIO, "model_type": "qwen2_audio_encoder"},
        ),
        None,
        True,
    ),
    "voxtral (text only)": (
        lambda: nested(
            "VoxtralConfig",
            "VoxtralForConditionalGeneration",
            text_config={**TEXT, "model_type": "llama"},
            audio_token_id=V - 1,
            audio_config={
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "num_mel_bins": 16,
                "max_source_positions": 16,
            },
        ),
        None,
        True,
    ),
    "roc_bert": (
        lambda: tiny(
            "RoCBertConfig",
            "RoCBertForMaskedLM",
            intermediate_size=96,
            pronunciation_vocab_size=50,
            shape_vocab_size=50,
            pronunciation_embed_dim=16,
            shape_embed_dim=16,
        ),
        None,
        False,
    ),
    "ultravbert": (
        lambda: nested(
            "UltraVBertConfig",
            "UltraVBertForMaskedLM",
            vision_config=VISION,
            image_token_id=V - 1,
            text_config={**TEXT, "sliding_window": 4, "prediction_head_size": 32},
        ),
        None,
        False,
    ),
    "modernvbert": (
        lambda: nested(
            "ModernVBertConfig",
            "ModernVBertForMaskedLM",
            vision_config=VISION,
            image_token_id=V - 1,
            text_config={
                **{k: v for k, v in TEXT.items() if k not in ("num_key_value_heads", "head_dim")},
                "local_attention": 4,
                "cls_token_id": 1,
                "sep_token_id": 2,
            },
        ),
        None,
        False,
    ),
    "bros": (
        lambda: tiny("BrosConfig", "BrosForTokenClassification", intermediate_size=96, dim_bbox=8, num_labels=3),
        lambda: {"bbox": bbox().float() / 1000},
        False,
    ),
    "layoutlmv3": (
        lambda: tiny(
            "LayoutLMv3Config",
            "LayoutLMv3ForTokenClassification",
            intermediate_size=96,
            visual_embed=False,
            coordinate_size=10,
            shape_size=12,
            rel_pos_bins=8,
            max_rel_pos=16,
            rel_2d_pos_bins=8,
            max_rel_2d_pos=32,
            num_labels=3,
        ),
        lambda: {"bbox": bbox()},
        False,
    ),
    "markuplm": (
        lambda: tiny(
            "MarkupLMConfig",
            "MarkupLMForTokenClassification",
            intermediate_size=96,
            num_labels=3,
            xpath_unit_hidden_size=16,
            max_depth=8,
            max_xpath_tag_unit_embeddings=32,
            max_xpath_subs_unit_embeddings=32,
            tag_pad_id=31,
            subs_pad_id=31,
        ),
        None,
        False,
    ),
}


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(SWEEP))
def test_sweep_oracle_default_prune_reload_and_generate(name, tmp_path):
    """Each model type: the masking oracle at 0.5 (nothing kept whole), the calibrated
    default at 0.4 (fewer parameters, ``from_pretrained`` rebuilding it with the same
    outputs) and, for the generative ones, greedy ``generate()`` of the reload with and
    without the cache, on a left-padded batch of 2 too."""
    build, extra, generative = SWEEP[name]
    model = build()
    inputs = {"input_ids": ids(1, 8), **(extra() if extra else {})}
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == ()
    small = calibrated(model, inputs, 0.4)
    assert small.config.cleanai_pruning["from_pretrained"] is True
    assert params(small) < 0.95 * params(model)
    again = reloaded(small, tmp_path)
    with torch.no_grad():
        assert outputs_diff(small(**inputs), again(**inputs)) < 1e-6
    if generative:
        assert same_generation(again, inputs["input_ids"])
        x, mask = ids(2, 8), torch.ones(2, 8, dtype=torch.long)
        x[0, :3], mask[0, :3] = 0, 0
        padded = {"input_ids": x, "attention_mask": mask, **GREEDY}
        with torch.no_grad():
            try:
                model.generate(**padded)
            except RuntimeError as exc:  # transformers' own (Dory's cache with a padded batch): the same after
                with pytest.raises(RuntimeError, match=re.escape(str(exc)[:40])):
                    again.generate(**padded)
            else:
                assert torch.equal(again.generate(**padded), again.generate(**padded, use_cache=False))


@pytest.mark.parametrize("head", ["LiltForTokenClassification", "LiltForQuestionAnswering"])
def test_a_width_the_config_derives_from_the_mlp_key_keeps_its_share(head, tmp_path):
    """LiLT's layout MLP is ``intermediate_size // channel_shrink_ratio`` wide (24 of the MLP's
    96), no key of its own. The default kept it and pruned the MLP (96 -> 58), so the config
    rebuilt a layout MLP of ``58 // 4 = 14`` beside the kept 24: ``from_pretrained: false``.
    Widths that grow with the MLP key (probed on a meta rebuild with the key doubled) are now
    tied to their layer's MLP by the same share: 60 and 15 at 0.4, one key for both."""
    model = tiny("LiltConfig", head, hidden_size=48, intermediate_size=96, channel_shrink_ratio=4,
                 max_2d_position_embeddings=1024)  # fmt: skip
    inputs = {"input_ids": ids(1, 8), "bbox": bbox()}
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == ()
    small = calibrated(model, inputs, 0.4)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    layers = small.lilt.encoder.layer
    widths = [(x.intermediate.dense.out_features, x.layout_intermediate.dense.out_features) for x in layers]
    assert widths == [(60, 15)] * 2
    assert small.config.intermediate_size == 60
    again = reloaded(small, tmp_path)
    with torch.no_grad():
        assert outputs_diff(small(**inputs), again(**inputs)) == 0
