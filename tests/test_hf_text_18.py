"""Hugging Face text models, session 26 (text18): the model types of transformers 5.24 with a
text head that no earlier test built, and the attention head records and reloads left over
from session 25 (latent attention, CTRL, Funnel, CodeGen heads; GPT-NeoX-Japanese)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
import hf_families  # noqa: E402
from hf_families import V  # noqa: E402
from test_hf_text_7 import params  # noqa: E402
from test_hf_text_16 import calibrated, ids, outputs_diff, reloaded  # noqa: E402
from test_hf_text_17 import AUDIO, TEXT, VISION, nested, same_generation, tiny  # noqa: E402

from cleanai_core import StructuredPruner  # noqa: E402
from cleanai_core.cli import main  # noqa: E402
from cleanai_core.testing import check_pruner  # noqa: E402
from cleanai_plugins.zoo.transformers.attention import head_layout, is_attention  # noqa: E402


def neox_japanese(multiple: int = 4):
    """A tiny GPT-NeoX-Japanese: its MLP is ``hidden_size * intermediate_multiple_size`` wide."""
    return tiny("GPTNeoXJapaneseConfig", "GPTNeoXJapaneseForCausalLM", intermediate_multiple_size=multiple)


# -- attention heads in the report --------------------------------------------------------------------------


def _output_projection(attn):
    return next(getattr(attn, c) for c in ("o_proj", "out_proj", "dense", "post_proj") if hasattr(attn, c))


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)


@pytest.mark.parametrize("family", ["minicpm3", "deepseek-v2", "deepseek-v3", "ctrl", "funnel", "codegen", "moshi"])
def test_head_layouts_name_the_rows_that_feed_each_head(family):
    """Latent attention (``q_b_proj`` / ``q_proj`` beside ``kv_b_proj``), CTRL (``Wq`` /
    ``Wk``), Funnel (``q_head`` / ``k_head``, its head count in the config only) and
    CodeGen (``qkv_proj`` in ``mp_num`` blocks of [q, v, k]) and Moshi (``q_proj`` wrapping
    its ``linear``) had no head layout: the
    report's ``attention_heads`` was empty. Each layout is checked against the model: zeroing
    the rows it gives to head ``h`` changes exactly head ``h``'s columns of the output
    projection's input, for the query and the key/value parts."""
    if family == "moshi":
        model, inputs = SWEEP["moshi"][0](), {"input_ids": ids(1, 8)}
    else:
        model, inputs, _ = hf_families.build(family)
    inputs = inputs[0] if isinstance(inputs, tuple) else inputs
    name, attn = next((n, m) for n, m in model.named_modules() if is_attention(m) and head_layout(m, n))
    layout = head_layout(attn, name)
    seen = {}
    hook = _output_projection(attn).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    _run(model, inputs)
    base = seen["x"]
    heads = int(layout.query.heads.max()) + 1
    width = base.shape[-1] // heads
    assert heads == 4
    for part in (layout.query, layout.kv):
        proj = model.get_submodule(part.module)
        assert part.heads.numel() == proj.out_features and (part.heads >= 0).sum() % heads == 0
        for h in range(heads):
            rows = part.heads == h
            saved = proj.weight.data.clone()
            proj.weight.data[rows] = 0
            _run(model, inputs)
            proj.weight.data.copy_(saved)
            changed = ((seen["x"] - base).abs() > 1e-6).reshape(-1, base.shape[-1]).any(0).nonzero().squeeze(1)
            assert changed.tolist() == list(range(h * width, (h + 1) * width)), (part.module, h)
    hook.remove()


def test_latent_attention_heads_are_reported_with_their_sizes():
    """MiniCPM3 at 0.4: one ``attention_heads`` record per attention module (none before),
    4 query heads of ``qk_head_dim`` rows in ``q_b_proj`` and 4 key/value heads of
    ``qk_nope_head_dim + v_head_dim`` rows in ``kv_b_proj``, kept (the config derives the
    head size) and the same count as the pruned module's ``num_heads``."""
    model, inputs, _ = hf_families.build("minicpm3")
    pruner = StructuredPruner(model, inputs, pruning_ratio=0.4)
    pruner.collect_activations([inputs])
    small = pruner.prune()
    heads = pruner.report()["attention_heads"]
    assert [a["module"] for a in heads] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for a in heads:
        q, kv = a["query_heads"], a["kv_heads"]
        assert (q["module"], kv["module"]) == (f"{a['module']}.q_b_proj", f"{a['module']}.kv_b_proj")
        assert (q["before"], q["after"], q["head_dim_before"], q["head_dim_after"]) == (4, 4, 16, 16)
        assert (kv["before"], kv["after"], kv["head_dim_before"], kv["head_dim_after"]) == (4, 4, 24, 24)
        assert small.get_submodule(a["module"]).num_heads == q["after"]
    assert params(small) < params(model)


# -- GPT-NeoX-Japanese: an MLP key that counts hidden sizes -------------------------------------------------


def test_an_mlp_key_counting_hidden_sizes_keeps_whole_multiples_and_reloads(tmp_path):
    """GPT-NeoX-Japanese's MLP is ``int(hidden_size * intermediate_multiple_size)``, the key
    an int: the default pruned 256 -> 154 with the "config can describe none" warning and
    only ``load_pruned`` reloaded. The MLP now keeps a multiple of the hidden size (found
    by doubling the key on a meta rebuild) and the key is written: 3 at 0.4 (192 of 256)."""
    model = neox_japanese()
    x = ids(1, 8)
    report = check_pruner(model, {"input_ids": x}, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == ()
    small = calibrated(model, {"input_ids": x}, 0.4)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert small.config.intermediate_multiple_size == 3
    assert [b.mlp.dense_h_to_4h.out_features for b in small.gpt_neox_japanese.layers] == [192, 192]
    assert (params(model), params(small)) == (105_408, 105_408 - 2 * 2 * 64 * 64)
    again = reloaded(small, tmp_path)
    with torch.no_grad():
        assert outputs_diff(small(x), again(x)) == 0
    assert same_generation(again, x)


def test_an_mlp_key_counting_hidden_sizes_through_the_job(tmp_path):
    """``cleanai prune --model hf:DIR`` on GPT-NeoX-Japanese at 0.5: 512 -> 256 MLP units,
    perplexity before and after, ``hf/`` reloading with ``from_pretrained`` (``load_pruned``
    before)."""
    neox_japanese().save_pretrained(tmp_path / "m")
    torch.save({"input_ids": ids(24, 16, seed=3)}, tmp_path / "d.pt")
    argv = ["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"), "--out", str(tmp_path / "o"),
            "--threads", "1", "--latency-repeats", "1", "--ratio", "0.5", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert (report["units_before"], report["units_after"]) == (512, 256)
    assert (report["params_before"], report["params_after"]) == (105_408, 105_408 - 2 * 2 * 128 * 64)
    assert report["hf_reload_path"] == "from_pretrained" and report["perplexity_after"] > 1
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "hf").eval()
    assert again.config.intermediate_multiple_size == 2 and params(again) == report["params_after"]


# -- the sweep ----------------------------------------------------------------------------------------------


def speech(config: str, model: str):
    """A speech (or music) model with a text decoder, its audio tower tiny: run on token ids alone."""
    cls = getattr(transformers, config)
    default = cls()
    tower = {**AUDIO, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "num_layers": 1, "num_heads": 2}  # fmt: skip
    sub = {}
    for key in cls.sub_configs:
        if key == "text_config":
            sub[key] = {**TEXT, "model_type": default.text_config.model_type}
        elif key in ("audio_config", "encoder_config"):
            audio = getattr(default, key)
            sub[key] = {**audio.to_dict(), **{k: v for k, v in tower.items() if hasattr(audio, k)}}
    return nested(config, model, **sub)


ZAMBA = dict(intermediate_size=96, num_key_value_heads=4, attention_hidden_size=128, attention_head_dim=32,
             mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, n_mamba_heads=2, num_hidden_layers=3,
             layers_block_type=["hybrid", "mamba", "hybrid"])  # fmt: skip

#: name -> (builder, input_ids shape, generative): model types of transformers 5.24 no earlier test built,
#: passing every check below (GPT-NeoX-Japanese after this session's fix)
SWEEP = {
    "zamba": (lambda: tiny("ZambaConfig", "ZambaForCausalLM", **ZAMBA), (1, 8), True),
    "zamba (classifier)": (
        lambda: tiny("ZambaConfig", "ZambaForSequenceClassification", num_labels=3, **ZAMBA),
        (1, 8),
        False,
    ),
    "moshi": (
        lambda: tiny(
            "MoshiConfig",
            "MoshiForCausalLM",
            num_key_value_heads=4,
            num_codebooks=2,
            audio_vocab_size=50,
            ffn_dim=192,
            head_dim=16,
            sliding_window=8,
            depth_decoder_config={
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "ffn_dim": 64,
                "num_codebooks": 2,
                "audio_vocab_size": 50,
            },
            audio_encoder_config={"model_type": "mimi", "hidden_size": 32, "num_hidden_layers": 1},
        ),
        (1, 8),
        True,
    ),  # fmt: skip
    "musicgen": (
        lambda: tiny("MusicgenDecoderConfig", "MusicgenForCausalLM", ffn_dim=96, num_codebooks=2),
        (2, 8),
        False,
    ),
    "musicgen_melody": (
        lambda: tiny("MusicgenMelodyDecoderConfig", "MusicgenMelodyForCausalLM", ffn_dim=96, num_codebooks=2),
        (2, 8),
        False,
    ),
    "fuyu": (
        lambda: nested(
            "FuyuConfig",
            "FuyuForCausalLM",
            text_config={**TEXT, "model_type": "persimmon"},
            hidden_size=64,
            vocab_size=V,
            patch_size=4,
            num_channels=3,
            image_size=32,
        ),
        (1, 8),
        True,
    ),  # fmt: skip
    "neomme": (
        lambda: tiny(
            "NeoMMEConfig",
            "NeoMMEForMaskedLM",
            intermediate_size=96,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            embedding_rank=32,
            patch_size=4,
            embedding_dim=32,
            image_token_id=V - 1,
            document_token_id=V - 2,
        ),
        (1, 8),
        False,
    ),  # fmt: skip
    "phi4_multimodal": (
        lambda: tiny(
            "Phi4MultimodalConfig",
            "Phi4MultimodalForCausalLM",
            intermediate_size=96,
            num_key_value_heads=2,
            vision_config=VISION,
            audio_config={
                "hidden_size": 32,
                "num_blocks": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "input_size": 16,
                "nemo_conv_channels": 16,
                "depthwise_seperable_out_channel": 16,
                "ext_pw_out_channel": 16,
                "depthwise_multiplier": 1,
                "kernel_size": 3,
                "downsample_rate": 2,
                "nemo_final_size": 4,
                "time_reduction": 2,
            },
        ),
        (1, 8),
        True,
    ),  # fmt: skip
    "got_ocr2": (
        lambda: nested(
            "GotOcr2Config",
            "GotOcr2ForConditionalGeneration",
            text_config={**TEXT, "model_type": "qwen2"},
            image_token_index=V - 1,
            vision_config={
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
                "output_channels": 16,
                "window_size": 2,
                "global_attn_indexes": [0],
                "mlp_dim": 64,
            },
        ),
        (1, 8),
        False,
    ),  # fmt: skip
    "gemma4_unified": (
        lambda: nested(
            "Gemma4UnifiedConfig",
            "Gemma4UnifiedForConditionalGeneration",
            text_config={**TEXT, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
            vision_config=None,
            audio_config=None,
            image_token_id=V - 1,
            audio_token_id=V - 2,
            boi_token_id=V - 3,
            eoi_token_id=V - 4,
            video_token_id=V - 5,
            boa_token_id=V - 6,
            eoa_token_index=V - 7,
        ),
        (1, 8),
        False,
    ),  # fmt: skip
    "gpt_neox_japanese": (neox_japanese, (1, 8), True),
    **{
        name: (lambda c=c, m=m: speech(c, m), (1, 8), False)
        for name, c, m in [
            ("audioflamingo3", "AudioFlamingo3Config", "AudioFlamingo3ForConditionalGeneration"),
            ("glmasr", "GlmAsrConfig", "GlmAsrForConditionalGeneration"),
            ("musicflamingo", "MusicFlamingoConfig", "MusicFlamingoForConditionalGeneration"),
            ("qwen3_asr", "Qwen3ASRConfig", "Qwen3ASRForConditionalGeneration"),
            ("omniasr", "OmniASRConfig", "OmniASRForConditionalGeneration"),
            ("moss_transcribe_diarize", "MossTranscribeDiarizeConfig", "MossTranscribeDiarizeForConditionalGeneration"),
        ]
    },
}


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(SWEEP))
def test_sweep_oracle_default_prune_reload_and_generate(name, tmp_path):
    """Each model type: the masking oracle at 0.5 (nothing kept whole), the calibrated
    default at 0.4 (fewer parameters, ``from_pretrained`` rebuilding it with the same
    outputs) and, for the causal LMs, greedy ``generate()`` of the reload with and without
    the cache."""
    build, shape, generative = SWEEP[name]
    model = build()
    inputs = {"input_ids": ids(*shape)}
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == ()
    small = calibrated(model, inputs, 0.4)
    assert small.config.cleanai_pruning["from_pretrained"] is True
    assert params(small) < params(model)
    again = reloaded(small, tmp_path)
    with torch.no_grad():
        assert outputs_diff(small(**inputs), again(**inputs)) < 1e-6
    if generative:
        assert same_generation(again, inputs["input_ids"])
