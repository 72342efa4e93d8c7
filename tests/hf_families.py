"""Tiny random Hugging Face transformers models, one per family, for the HF corpus test
(``tests/test_hf_corpus.py``). Built from configs (no download): 2 layers, hidden 64,
4 heads, vocab 100."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

V = 100  # vocabulary
COMMON = {"vocab_size": V, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96}
LM = {**COMMON, "num_attention_heads": 4, "max_position_embeddings": 64, "pad_token_id": 0}


def _ids(n: int = 8) -> torch.Tensor:
    return torch.randint(3, V, (1, n), generator=torch.Generator().manual_seed(1))


def dots3_note() -> Any:
    """A tiny Dots3-Note (latent attention, per-layer config copies for its sliding-window
    layers, a DSA indexer with a config copy of its own), seeded, in eval mode."""
    import transformers

    config = transformers.Dots3NoteTextConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
        q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, head_dim=16, index_topk=8,
        index_head_dim=16, index_n_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        shared_experts_intermediate_size=32, swa_num_attention_heads=2, swa_num_key_value_heads=2,
        swa_q_lora_rank=16, swa_kv_lora_rank=16, swa_head_dim=16, swa_qk_nope_head_dim=8, swa_v_head_dim=8,
        sliding_window_size=4, use_dsa=True)  # fmt: skip
    torch.manual_seed(0)
    return transformers.Dots3NoteForCausalLM(config).eval()


def _pixels(size: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(1))


def _causal(cls_name: str, config_name: str, **kw) -> Callable[[], tuple[Any, Any]]:
    def build():
        import transformers

        config = getattr(transformers, config_name)(**{**LM, **kw})
        return getattr(transformers, cls_name)(config), (_ids(),)

    return build


def _make(cls_name: str, config_name: str, inputs: Callable[[], Any], **kw) -> Callable[[], tuple[Any, Any]]:
    def build():
        import transformers

        config = getattr(transformers, config_name)(**kw)
        x = inputs()
        return getattr(transformers, cls_name)(config), (x,) if isinstance(x, torch.Tensor) else x

    return build


def _seq2seq_inputs() -> dict:
    return {"input_ids": _ids(), "decoder_input_ids": _ids(5)}


def _clip_inputs() -> dict:
    return {"input_ids": _ids(), "pixel_values": _pixels()}


def _whisper_inputs() -> dict:
    feats = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    return {"input_features": feats, "decoder_input_ids": _ids(5)}


def _bert2bert() -> tuple[Any, Any]:
    import transformers

    enc = transformers.BertConfig(**ENC, **ENC_EXTRA)
    dec = transformers.BertConfig(**ENC, **ENC_EXTRA, is_decoder=True, add_cross_attention=True)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id, config.pad_token_id = 1, 0
    return transformers.EncoderDecoderModel(config), _seq2seq_inputs()


OPT = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
           max_position_embeddings=64, pad_token_id=0)  # fmt: skip
FALCON = {"vocab_size": V, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
ENC = {"vocab_size": V, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
#: the sweep's other encoder keys (max_position_embeddings 64, pad 0)
ENC_EXTRA = {"intermediate_size": 96, "max_position_embeddings": 64, "pad_token_id": 0}
VIT = {"image_size": 32, "patch_size": 8, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
#: GPT-J's config keys, which CodeGen shares
GPTJ = dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8, n_inner=96)
T5 = dict(vocab_size=V, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, decoder_start_token_id=0)
BART = dict(
    vocab_size=V,
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=96,
    decoder_ffn_dim=96,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
)

#: name -> (builder, kind): kind "causal" (generate), "seq2seq" (generate), "encoder"
FAMILIES: dict[str, tuple[Callable[[], tuple[Any, Any]], str]] = {
    "llama-mha": (_causal("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=4), "causal"),
    "llama-gqa": (_causal("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2), "causal"),
    "llama-mqa": (_causal("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=1), "causal"),
    "qwen2": (_causal("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2), "causal"),
    "qwen3": (_causal("Qwen3ForCausalLM", "Qwen3Config", num_key_value_heads=2, head_dim=16), "causal"),
    "mistral": (_causal("MistralForCausalLM", "MistralConfig", num_key_value_heads=2), "causal"),
    "mixtral": (
        _causal(
            "MixtralForCausalLM", "MixtralConfig", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
        ),
        "causal",
    ),
    "gemma": (_causal("GemmaForCausalLM", "GemmaConfig", num_key_value_heads=2, head_dim=16), "causal"),
    "gemma2": (_causal("Gemma2ForCausalLM", "Gemma2Config", num_key_value_heads=2, head_dim=16), "causal"),
    "phi3": (_causal("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=2), "causal"),
    "olmo": (_causal("OlmoForCausalLM", "OlmoConfig", num_key_value_heads=2), "causal"),
    "gpt2": (
        _make("GPT2LMHeadModel", "GPT2Config", _ids, vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64),
        "causal",
    ),
    "gpt-neox": (_causal("GPTNeoXForCausalLM", "GPTNeoXConfig"), "causal"),
    "opt": (_make("OPTForCausalLM", "OPTConfig", _ids, **OPT, word_embed_proj_dim=64), "causal"),
    "gpt-j": (
        _make("GPTJForCausalLM", "GPTJConfig", _ids, **GPTJ),
        "causal",
    ),
    "qwen2-moe": (
        _causal(
            "Qwen2MoeForCausalLM",
            "Qwen2MoeConfig",
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
        ),
        "causal",
    ),
    "opt-350m": (  # embeddings narrower than the hidden size: project_in / project_out
        _make("OPTForCausalLM", "OPTConfig", _ids, **OPT, word_embed_proj_dim=32, do_layer_norm_before=False),
        "causal",
    ),
    "falcon": (_make("FalconForCausalLM", "FalconConfig", _ids, **FALCON), "causal"),
    "falcon-mha": (_make("FalconForCausalLM", "FalconConfig", _ids, **FALCON, multi_query=False), "causal"),
    "falcon-gqa": (
        _make("FalconForCausalLM", "FalconConfig", _ids, **FALCON, new_decoder_architecture=True, num_kv_heads=2),
        "causal",
    ),
    "gpt-bigcode": (  # multi-query (SantaCoder, StarCoder): one fused c_attn of embed_dim + 2 * head_dim
        _make(
            "GPTBigCodeForCausalLM",
            "GPTBigCodeConfig",
            _ids,
            vocab_size=V,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
        ),
        "causal",
    ),
    "bloom": (
        _make("BloomForCausalLM", "BloomConfig", _ids, vocab_size=V, hidden_size=64, n_layer=2, n_head=4),
        "causal",
    ),
    "phi": (_causal("PhiForCausalLM", "PhiConfig", partial_rotary_factor=0.5), "causal"),
    "phi-qk-norm": (  # q/k layer norms of hidden_size / num_attention_heads: heads have no key
        _causal("PhiForCausalLM", "PhiConfig", partial_rotary_factor=0.5, qk_layernorm=True),
        "causal",
    ),
    "stablelm": (
        _causal("StableLmForCausalLM", "StableLmConfig", num_key_value_heads=2, partial_rotary_factor=0.25),
        "causal",
    ),
    "starcoder2": (_causal("Starcoder2ForCausalLM", "Starcoder2Config", num_key_value_heads=2), "causal"),
    "cohere": (_causal("CohereForCausalLM", "CohereConfig", num_key_value_heads=2, use_qk_norm=True), "causal"),
    "granite": (
        _causal(
            "GraniteForCausalLM",
            "GraniteConfig",
            num_key_value_heads=2,
            logits_scaling=4.0,
            residual_multiplier=0.5,
            embedding_multiplier=2.0,
            attention_multiplier=0.1,
        ),
        "causal",
    ),
    "nemotron": (  # an MLP without a gate: up_proj, relu2, down_proj
        _causal("NemotronForCausalLM", "NemotronConfig", num_key_value_heads=2, partial_rotary_factor=0.5),
        "causal",
    ),
    "persimmon": (_causal("PersimmonForCausalLM", "PersimmonConfig"), "causal"),
    "gemma3-text": (
        _causal("Gemma3ForCausalLM", "Gemma3TextConfig", num_key_value_heads=2, head_dim=16, sliding_window=4),
        "causal",
    ),
    "olmo2": (_causal("Olmo2ForCausalLM", "Olmo2Config", num_key_value_heads=2), "causal"),
    "qwen3-moe": (
        _causal(
            "Qwen3MoeForCausalLM",
            "Qwen3MoeConfig",
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
        "causal",
    ),
    "phimoe": (  # its router is an nn.Linear subclass that picks the experts inside its forward
        _causal("PhimoeForCausalLM", "PhimoeConfig", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        "causal",
    ),
    "olmoe": (
        _causal("OlmoeForCausalLM", "OlmoeConfig", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
        "causal",
    ),  # fmt: skip
    "deepseek-v3": (  # multi-head latent attention, routed and shared experts, a dense first layer
        _causal(
            "DeepseekV3ForCausalLM",
            "DeepseekV3Config",
            num_key_value_heads=4,  # latent attention: as many key/value heads as heads
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            n_group=1,
            topk_group=1,
        ),
        "causal",
    ),
    "gpt-oss": (  # experts transposed, gate and up interleaved, with biases; sinks, sliding window
        _causal(
            "GptOssForCausalLM",
            "GptOssConfig",
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
        ),
        "causal",
    ),
    "glm": (_causal("GlmForCausalLM", "GlmConfig", num_key_value_heads=2, head_dim=16), "causal"),
    "helium": (_causal("HeliumForCausalLM", "HeliumConfig", num_key_value_heads=2, head_dim=16), "causal"),
    "exaone4": (_causal("Exaone4ForCausalLM", "Exaone4Config", num_key_value_heads=2, head_dim=16), "causal"),
    "cohere2": (_causal("Cohere2ForCausalLM", "Cohere2Config", num_key_value_heads=2, sliding_window=4), "causal"),
    "jamba": (  # Mamba and attention layers, experts every other layer
        _causal(
            "JambaForCausalLM",
            "JambaConfig",
            num_key_value_heads=2,
            num_experts=2,
            num_experts_per_tok=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            mamba_d_state=4,
            use_mamba_kernels=False,
        ),
        "causal",
    ),
    "bamba": (
        _causal(
            "BambaForCausalLM",
            "BambaConfig",
            num_key_value_heads=2,
            attn_layer_indices=[1],
            mamba_n_heads=4,
            mamba_d_head=32,
            mamba_d_state=8,
            mamba_n_groups=1,
        ),
        "causal",
    ),
    "granitemoe": (
        _causal(
            "GraniteMoeForCausalLM",
            "GraniteMoeConfig",
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        "causal",
    ),
    "codegen": (
        _make("CodeGenForCausalLM", "CodeGenConfig", _ids, **GPTJ),
        "causal",
    ),
    "gpt-neo": (
        _make(
            "GPTNeoForCausalLM",
            "GPTNeoConfig",
            _ids,
            vocab_size=V,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            max_position_embeddings=64,
            window_size=4,
            intermediate_size=96,
        ),
        "causal",
    ),
    "xglm": (
        _make(
            "XGLMForCausalLM",
            "XGLMConfig",
            _ids,
            vocab_size=V,
            d_model=64,
            num_layers=2,
            attention_heads=4,
            ffn_dim=96,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
        "causal",
    ),
    # -- 2026-12-03: families swept in round 4 (docs/compatibility.md) --
    "biogpt": (_causal("BioGptForCausalLM", "BioGptConfig"), "causal"),
    "cwm": (_causal("CwmForCausalLM", "CwmConfig", num_key_value_heads=2, head_dim=16, sliding_window=4), "causal"),
    "diffllama": (_causal("DiffLlamaForCausalLM", "DiffLlamaConfig", num_key_value_heads=2, head_dim=16), "causal"),
    "doge": (  # dynamic-mask attention, a cross-domain mixture of experts (embedding-bag experts)
        _causal(
            "DogeForCausalLM",
            "DogeConfig",
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
        ),
        "causal",
    ),  # fmt: skip
    "exaone-moe": (
        _causal(
            "ExaoneMoeForCausalLM",
            "ExaoneMoeConfig",
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            sliding_window=4,
        ),
        "causal",
    ),  # fmt: skip
    "flex-olmo": (
        _causal("FlexOlmoForCausalLM", "FlexOlmoConfig", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
        "causal",
    ),  # fmt: skip
    "glm4-moe": (
        _causal(
            "Glm4MoeForCausalLM",
            "Glm4MoeConfig",
            num_key_value_heads=2,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
        "causal",
    ),  # fmt: skip
    "granitemoe-shared": (
        _causal(
            "GraniteMoeSharedForCausalLM",
            "GraniteMoeSharedConfig",
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=48,
        ),
        "causal",
    ),  # fmt: skip
    "jais2": (_causal("Jais2ForCausalLM", "Jais2Config", num_key_value_heads=2, head_dim=16), "causal"),
    "minimax": (
        _causal(
            "MiniMaxForCausalLM",
            "MiniMaxConfig",
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
        ),
        "causal",
    ),  # fmt: skip
    "ministral3": (
        _causal("Ministral3ForCausalLM", "Ministral3Config", num_key_value_heads=2, head_dim=16, sliding_window=4),
        "causal",
    ),
    "nanochat": (_causal("NanoChatForCausalLM", "NanoChatConfig", num_key_value_heads=2), "causal"),
    "olmo3": (_causal("Olmo3ForCausalLM", "Olmo3Config", num_key_value_heads=2, sliding_window=4), "causal"),
    "olmo-hybrid": (_causal("OlmoHybridForCausalLM", "OlmoHybridConfig", num_key_value_heads=2), "causal"),
    "solar-open": (
        _causal(
            "SolarOpenForCausalLM",
            "SolarOpenConfig",
            num_key_value_heads=2,
            head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
        "causal",
    ),  # fmt: skip
    "modernbert-decoder": (
        _causal("ModernBertDecoderForCausalLM", "ModernBertDecoderConfig", sliding_window=4),
        "causal",
    ),
    "ernie4_5-moe": (  # shared experts moe_intermediate_size x moe_num_shared_experts (2) wide
        _causal(
            "Ernie4_5_MoeForCausalLM",
            "Ernie4_5_MoeConfig",
            num_key_value_heads=2,
            moe_num_experts=4,
            moe_k=2,
            moe_intermediate_size=32,
        ),
        "causal",
    ),  # fmt: skip
    "hunyuan-moe": (
        _causal("HunYuanMoEV1ForCausalLM", "HunYuanMoEV1Config", num_key_value_heads=2, head_dim=16, num_experts=4),
        "causal",
    ),
    "openai-gpt": (
        _make(
            "OpenAIGPTLMHeadModel",
            "OpenAIGPTConfig",
            _ids,
            vocab_size=V,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
        ),
        "causal",
    ),  # fmt: skip
    "xlnet": (  # q, k, v, o: bare (d_model, heads, head_dim) parameters read by einsum
        _make("XLNetLMHeadModel", "XLNetConfig", _ids, vocab_size=V, d_model=64, n_layer=2, n_head=4, d_inner=96),
        "encoder",
    ),
    "dots1": (  # dots.llm1: routed and shared experts, a dense first layer
        _causal(
            "Dots1ForCausalLM",
            "Dots1Config",
            num_key_value_heads=2,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            moe_intermediate_size=32,
            sliding_window=4,
        ),
        "causal",
    ),  # fmt: skip
    "zamba2": (  # Mamba-2 layers and one shared transformer block (a "hybrid" layer)
        _causal(
            "Zamba2ForCausalLM",
            "Zamba2Config",
            num_key_value_heads=2,
            layers_block_type=["mamba", "hybrid"],
            mamba_d_state=8,
            n_mamba_heads=4,
        ),
        "causal",
    ),  # fmt: skip
    "afmoe": (
        _causal(
            "AfmoeForCausalLM",
            "AfmoeConfig",
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            sliding_window=4,
        ),
        "causal",
    ),  # fmt: skip
    "minimax-m2": (
        _causal(
            "MiniMaxM2ForCausalLM",
            "MiniMaxM2Config",
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        "causal",
    ),  # fmt: skip
    "vaultgemma": (
        _causal("VaultGemmaForCausalLM", "VaultGemmaConfig", num_key_value_heads=2, head_dim=16, sliding_window=4),
        "causal",
    ),
    # -- round 5 --
    "qwen3-next": (  # gated delta-net and full attention layers; its q_proj holds a query and a gate per head
        _causal(
            "Qwen3NextForCausalLM",
            "Qwen3NextConfig",
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            layer_types=["linear_attention", "full_attention"],
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
        ),
        "causal",
    ),
    "switch-transformers": (  # T5 with top-1 routed experts (one nn.Module per expert) every other layer
        _make(
            "SwitchTransformersForConditionalGeneration",
            "SwitchTransformersConfig",
            _seq2seq_inputs,
            **T5,
            num_decoder_layers=2,  # its default (12) leaves generate()'s cache 2 layers long: unpruned fails too
            num_experts=4,
            num_sparse_encoder_layers=1,
            num_sparse_decoder_layers=1,
        ),
        "seq2seq",
    ),
    "pegasus-x": (  # global-local encoder attention reshaped to its input's width
        _make(
            "PegasusXForConditionalGeneration",
            "PegasusXConfig",
            _seq2seq_inputs,
            **BART,
            block_size=4,
            num_global_tokens=2,
        ),
        "seq2seq",
    ),
    "bigbird": (  # block-sparse attention (its default): rebuilt from the config for short inputs
        _make("BigBirdForMaskedLM", "BigBirdConfig", _ids, **ENC, **ENC_EXTRA, block_size=2, num_random_blocks=1),
        "encoder",
    ),
    "bigbird-pegasus": (
        _make(
            "BigBirdPegasusForConditionalGeneration",
            "BigBirdPegasusConfig",
            _seq2seq_inputs,
            **BART,
            block_size=2,
            num_random_blocks=1,
        ),
        "seq2seq",
    ),
    "cohere2-moe": (
        _causal(
            "Cohere2MoeForCausalLM",
            "Cohere2MoeConfig",
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
        ),
        "causal",
    ),  # fmt: skip
    "granite-swa": (
        _causal("GraniteSWAForCausalLM", "GraniteSWAConfig", num_key_value_heads=2, sliding_window=4),
        "causal",
    ),
    "granitemoe-swa": (
        _causal(
            "GraniteMoeSWAForCausalLM",
            "GraniteMoeSWAConfig",
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
        ),
        "causal",
    ),  # fmt: skip
    "hyperclovax": (
        _causal("HyperCLOVAXForCausalLM", "HyperCLOVAXConfig", num_key_value_heads=2, head_dim=16),
        "causal",
    ),
    "mellum": (
        _causal(
            "MellumForCausalLM",
            "MellumConfig",
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
        "causal",
    ),  # fmt: skip
    "laguna": (  # a dense first layer, experts and shared experts; a gate projection on the attention output
        _causal(
            "LagunaForCausalLM",
            "LagunaConfig",
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
        "causal",
    ),  # fmt: skip
    "nemotron-h": (  # experts and shared experts, attention and an MLP, each a "mixer" layer
        _causal(
            "NemotronHForCausalLM",
            "NemotronHConfig",
            num_hidden_layers=3,
            layers_block_type=["moe", "full_attention", "mlp"],
            num_key_value_heads=2,
            head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=48,
        ),
        "causal",
    ),  # fmt: skip
    "mimo-v2-flash": (  # sliding-window layers with their own key/value head count
        _causal(
            "MiMoV2FlashForCausalLM",
            "MiMoV2FlashConfig",
            num_key_value_heads=2,
            head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
        "causal",
    ),  # fmt: skip
    "hy-v3": (
        _causal(
            "HYV3ForCausalLM",
            "HYV3Config",
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
        "causal",
    ),  # fmt: skip
    "aria-text": (  # shared experts intermediate_size x moe_num_shared_experts wide
        _causal(
            "AriaTextForCausalLM",
            "AriaTextConfig",
            num_key_value_heads=2,
            head_dim=16,
            moe_num_experts=4,
            moe_topk=2,
            moe_num_shared_experts=2,
        ),
        "causal",
    ),  # fmt: skip
    "bert-lm-head": (_make("BertLMHeadModel", "BertConfig", _ids, **ENC, **ENC_EXTRA, is_decoder=True), "causal"),
    "roberta-causal": (
        _make("RobertaForCausalLM", "RobertaConfig", _ids, **ENC, **ENC_EXTRA, is_decoder=True),
        "causal",
    ),
    "qwen3.5": (  # gated delta-net and gated full attention
        _causal(
            "Qwen3_5ForCausalLM",
            "Qwen3_5TextConfig",
            num_key_value_heads=2,
            head_dim=16,
            layer_types=["linear_attention", "full_attention"],
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
        ),
        "causal",
    ),
    "qwen3.5-moe": (
        _causal(
            "Qwen3_5MoeForCausalLM",
            "Qwen3_5MoeTextConfig",
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            layer_types=["linear_attention", "full_attention"],
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
        ),
        "causal",
    ),
    "deepseek-v2": (
        _causal(
            "DeepseekV2ForCausalLM",
            "DeepseekV2Config",
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            head_dim=8,
            n_group=1,
            topk_group=1,
        ),
        "causal",
    ),
    "minicpm3": (
        _causal(
            "MiniCPM3ForCausalLM",
            "MiniCPM3Config",
            num_key_value_heads=4,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            head_dim=8,
        ),
        "causal",
    ),
    "granitemoe-hybrid": (
        _causal(
            "GraniteMoeHybridForCausalLM",
            "GraniteMoeHybridConfig",
            num_key_value_heads=2,
            layer_types=["mamba", "attention"],
            mamba_d_state=8,
            mamba_n_heads=4,
            mamba_d_head=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=48,
        ),
        "causal",
    ),
    "smollm3": (_causal("SmolLM3ForCausalLM", "SmolLM3Config", num_key_value_heads=2), "causal"),
    "seed-oss": (_causal("SeedOssForCausalLM", "SeedOssConfig", num_key_value_heads=2, head_dim=16), "causal"),
    "ministral": (
        _causal("MinistralForCausalLM", "MinistralConfig", num_key_value_heads=2, head_dim=16, sliding_window=4),
        "causal",
    ),
    "arcee": (_causal("ArceeForCausalLM", "ArceeConfig", num_key_value_heads=2, head_dim=16), "causal"),
    "hunyuan-dense": (
        _causal("HunYuanDenseV1ForCausalLM", "HunYuanDenseV1Config", num_key_value_heads=2, head_dim=16),
        "causal",
    ),
    "ernie4_5": (_causal("Ernie4_5ForCausalLM", "Ernie4_5Config", num_key_value_heads=2, head_dim=16), "causal"),
    "apertus": (_causal("ApertusForCausalLM", "ApertusConfig", num_key_value_heads=2), "causal"),
    "glm4": (_causal("Glm4ForCausalLM", "Glm4Config", num_key_value_heads=2, head_dim=16), "causal"),
    # -- session 16: text models --
    "apertus1.5-text": (_causal("Apertus1p5TextForCausalLM", "Apertus1p5TextConfig", num_key_value_heads=2), "causal"),
    "beam": (
        _causal(
            "BeamForCausalLM",
            "BeamConfig",
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            sliding_window=4,
            n_group=1,
            topk_group=1,
        ),
        "causal",
    ),
    "bert-generation": (_make("BertGenerationDecoder", "BertGenerationConfig", _ids, **ENC, **ENC_EXTRA), "causal"),
    "flint": (
        _causal(
            "FlintForCausalLM",
            "FlintConfig",
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            sliding_window=4,
        ),
        "causal",
    ),
    "bailing-hybrid": (  # linear and latent full attention (layer types given: see kimi-linear), shared experts
        _causal(
            "BailingHybridForCausalLM",
            "BailingHybridConfig",
            num_key_value_heads=4,  # latent attention: as many key/value heads as heads (eager fails with 2)
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            layer_types=["linear_attention", "full_attention"],
        ),
        "causal",
    ),
    "lfm2": (  # its MLP width is derived from intermediate_size (block_auto_adjust_ff_dim)
        _causal("Lfm2ForCausalLM", "Lfm2Config", num_key_value_heads=2, layer_types=["conv", "full_attention"]),
        "causal",
    ),
    "lfm2-moe": (
        _causal(
            "Lfm2MoeForCausalLM",
            "Lfm2MoeConfig",
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            layer_types=["conv", "full_attention"],
        ),
        "causal",
    ),
    "hrm-text": (_causal("HrmTextForCausalLM", "HrmTextConfig", head_dim=16), "causal"),
    "inkling": (  # short convolutions, relative logits; shared experts as 3-D gate_proj / up_proj / down_proj
        _causal(
            "InklingForCausalLM",
            "InklingTextConfig",
            num_key_value_heads=2,
            head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            sliding_window=4,
            n_shared_experts=1,
            swa_head_dim=16,
            swa_num_attention_heads=4,
            swa_num_key_value_heads=2,
            rel_extent=16,
        ),
        "causal",
    ),
    "llama-seq-cls": (  # a sequence classifier: the score head reads the last token's hidden state
        _causal("LlamaForSequenceClassification", "LlamaConfig", num_key_value_heads=2, num_labels=3),
        "encoder",
    ),
    "qwen3-moe-seq-cls": (
        _causal(
            "Qwen3MoeForSequenceClassification",
            "Qwen3MoeConfig",
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            num_labels=3,
        ),
        "encoder",
    ),
    "trocr": (  # a decoder-only config with decoder_* keys (the text side of TrOCR)
        _make(
            "TrOCRForCausalLM",
            "TrOCRConfig",
            _ids,
            vocab_size=V,
            d_model=64,
            decoder_layers=2,
            decoder_attention_heads=4,
            decoder_ffn_dim=96,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
        "causal",
    ),
    "hy-v4": (  # latent attention with a sparse-attention indexer, routed and shared experts, hyper-connections
        _causal(
            "HYV4ForCausalLM",
            "HYV4Config",
            num_key_value_heads=2,
            head_dim=16,
            index_head_dim=16,
            index_n_heads=4,
            index_topk=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
        ),
        "causal",
    ),
    "kimi-linear": (  # KDA linear attention and latent full attention; with no full-attention layer (the
        # default layer types of a 2-layer config) transformers' own cache fails, unpruned too
        _causal(
            "KimiLinearForCausalLM",
            "KimiLinearConfig",
            num_key_value_heads=4,
            layer_types=["linear_attention", "full_attention"],
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            linear_attn_config={"head_dim": 16, "num_heads": 4},
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
        "causal",
    ),
    "lfm3": (  # short convolutions, sliding-window and full attention (layer types given: see kimi-linear)
        _causal(
            "Lfm3ForCausalLM",
            "Lfm3Config",
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=16,
            layer_types=["conv", "full_attention", "sliding_attention"],
            sliding_window=4,
        ),
        "causal",
    ),
    "glm4-moe-lite": (  # latent attention, routed and shared experts
        _causal(
            "Glm4MoeLiteForCausalLM",
            "Glm4MoeLiteConfig",
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
        "causal",
    ),
    # session 17
    "gemma3n-text": (  # one MLP width per layer (intermediate_size a list), AltUp, LAuReL, per-layer inputs
        _causal(
            "Gemma3nForCausalLM",
            "Gemma3nTextConfig",
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=[96, 128],
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=V,
            laurel_rank=8,
            altup_num_inputs=2,
            num_kv_shared_layers=0,
            activation_sparsity_pattern=[0.0, 0.0],
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=4,
        ),
        "causal",
    ),
    "llama4-text": (  # transposed 3-D experts run through bmm, a dense layer, complex rotary embeddings
        _causal(
            "Llama4ForCausalLM",
            "Llama4TextConfig",
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            intermediate_size_mlp=96,
            interleave_moe_layer_step=1,
            moe_layers=[1],
            no_rope_layers=[1, 0],
            attention_chunk_size=16,
        ),
        "causal",
    ),
    "ctrl": (  # an nn.Sequential MLP (ffn.0, ffn.2) of width dff
        _make(
            "CTRLLMHeadModel",
            "CTRLConfig",
            _ids,
            vocab_size=V,
            n_embd=64,
            n_head=4,
            n_layer=2,
            dff=96,
            n_positions=64,
            pad_token_id=0,
        ),  # fmt: skip
        "causal",
    ),
    "gemma4-text": (
        _causal(
            "Gemma4ForCausalLM",
            "Gemma4TextConfig",
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=16,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=4,
            hidden_size_per_layer_input=0,
        ),
        "causal",
    ),
    "falcon-h1": (
        _causal(
            "FalconH1ForCausalLM",
            "FalconH1Config",
            num_key_value_heads=2,
            head_dim=16,
            mamba_d_ssm=64,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=8,
            mamba_n_groups=1,
            mamba_chunk_size=8,
        ),  # fmt: skip
        "causal",
    ),
    "youtu": (  # latent attention
        _causal(
            "YoutuForCausalLM",
            "YoutuConfig",
            num_key_value_heads=4,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),  # fmt: skip
        "causal",
    ),
    **{
        name: (
            _causal(
                cls,
                cls.replace("ForCausalLM", "Config"),
                num_key_value_heads=4,
                kv_lora_rank=16,
                q_lora_rank=32,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=16,
                n_routed_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                n_group=1,
                topk_group=1,
                index_n_heads=2,
                index_head_dim=16,
                index_topk=4,
                first_k_dense_replace=1,
            ),  # fmt: skip
            "causal",
        )  # latent attention with a sparse-attention indexer, routed and shared experts, a dense first layer
        for name, cls in (("deepseek-v3.2", "DeepseekV32ForCausalLM"), ("glm-moe-dsa", "GlmMoeDsaForCausalLM"))
    },
    "fsmt": (  # its attention asserts that its input is embed_dim wide, and reshapes its output to that width
        _make(
            "FSMTForConditionalGeneration",
            "FSMTConfig",
            _seq2seq_inputs,
            src_vocab_size=V,
            tgt_vocab_size=V,
            langs=["en", "de"],
            **{k: v for k, v in BART.items() if k != "vocab_size"},
        ),  # fmt: skip
        "seq2seq",
    ),
    # vision-language models run on token ids alone: their text towers prune
    **{
        name: (_make(cls, cls.replace("ForConditionalGeneration", "Config"), _ids, **kw), "causal")
        for name, cls, kw in (
            (
                "llava",
                "LlavaForConditionalGeneration",
                dict(
                    text_config={**LM, "num_key_value_heads": 2, "model_type": "llama"},
                    vision_config={**VIT, "intermediate_size": 96, "model_type": "clip_vision_model"},
                    image_token_index=99,
                ),
            ),
            (
                "qwen2-vl",
                "Qwen2VLForConditionalGeneration",
                dict(
                    text_config={
                        **LM,
                        "num_key_value_heads": 2,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                    },
                    vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "patch_size": 4},
                    image_token_id=97,
                    video_token_id=98,
                    vision_start_token_id=96,
                    vision_end_token_id=95,
                ),
            ),
            (
                "gemma3-vlm",
                "Gemma3ForConditionalGeneration",
                dict(
                    text_config={**LM, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 4},
                    vision_config={**VIT, "intermediate_size": 96, "model_type": "siglip_vision_model"},
                    mm_tokens_per_image=4,
                    image_token_index=99,
                    boi_token_index=98,
                    eoi_token_index=97,
                ),
            ),
            (
                "paligemma",
                "PaliGemmaForConditionalGeneration",
                dict(
                    text_config={**LM, "num_key_value_heads": 2, "head_dim": 16, "model_type": "gemma"},
                    vision_config={**VIT, "intermediate_size": 96, "model_type": "siglip_vision_model"},
                    image_token_index=99,
                ),
            ),
        )
    },  # fmt: skip
    "jetmoe": (  # experts as one (experts, out, in) weight run on tokens sorted by expert; mixture of attention
        _causal(
            "JetMoeForCausalLM",
            "JetMoeConfig",
            num_key_value_heads=2,
            kv_channels=16,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),  # fmt: skip
        "causal",
    ),
    "emu3-text": (_causal("Emu3ForCausalLM", "Emu3TextConfig", num_key_value_heads=2), "causal"),
    # session 18
    "cpmant": (  # heads with a relative position bias shared by every layer; a gated FFN (w_in.w_0, w_in.w_1) of dim_ff
        _make(
            "CpmAntForCausalLM",
            "CpmAntConfig",
            _ids,
            vocab_size=V,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            dim_head=16,
            dim_ff=96,
        ),
        "causal",
    ),  # fmt: skip
    "canine": (  # no one input embedding: 8 hash-bucket tables of hidden_size / 8 side by side, downsampled characters
        _make(
            "CanineForSequenceClassification",
            "CanineConfig",
            _ids,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            downsampling_rate=2,
            num_hash_buckets=64,
        ),
        "encoder",
    ),  # fmt: skip
    "t5gemma": (  # Gemma encoder and decoder (GQA, head_dim 16)
        _make(
            "T5GemmaForConditionalGeneration",
            "T5GemmaConfig",
            _seq2seq_inputs,
            vocab_size=V,
            encoder={**LM, "num_key_value_heads": 2, "head_dim": 16, "model_type": "t5_gemma_module"},
            decoder={**LM, "num_key_value_heads": 2, "head_dim": 16, "model_type": "t5_gemma_module"},
        ),
        "seq2seq",
    ),  # fmt: skip
    "bert2bert": (  # EncoderDecoderModel: a BERT encoder and a BERT decoder with cross-attention
        _bert2bert,
        "seq2seq",
    ),
    "t5gemma2": (  # a Gemma 3 encoder (text and SigLIP towers; run on text) and decoder
        _make(
            "T5Gemma2ForConditionalGeneration",
            "T5Gemma2Config",
            _seq2seq_inputs,
            image_token_index=99,
            encoder={
                "text_config": {**LM, "num_key_value_heads": 2, "head_dim": 16},
                "vision_config": {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "image_size": 16,
                    "patch_size": 8,
                },
            },
            decoder={**LM, "num_key_value_heads": 2, "head_dim": 16},
        ),
        "seq2seq",
    ),  # fmt: skip
    "mistral4": (  # latent attention (q and kv LoRA ranks), routed and shared experts
        _causal(
            "Mistral4ForCausalLM",
            "Mistral4Config",
            num_key_value_heads=4,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            v_head_dim=16,
            qk_nope_head_dim=8,
        ),
        "causal",
    ),  # fmt: skip
    "gemma4-unified-text": (  # a full-attention layer with its own head_dim (per_layer_config)
        _causal(
            "Gemma4UnifiedForCausalLM",
            "Gemma4UnifiedTextConfig",
            num_key_value_heads=2,
            head_dim=16,
            per_layer_config={"1": {"head_dim": 32}},
        ),
        "causal",
    ),  # fmt: skip
    "ibert": (  # QuantLinear layers (F.linear out of quantization mode) with integer buffers beside their weights
        _make("IBertForMaskedLM", "IBertConfig", _ids, **ENC, **ENC_EXTRA),
        "encoder",
    ),
    "git": (  # a BERT-like decoder over (here: no) image tokens
        _make(
            "GitForCausalLM",
            "GitConfig",
            _ids,
            **ENC,
            **ENC_EXTRA,
            vision_config={
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "image_size": 32,
                "patch_size": 16,
            },
        ),
        "causal",
    ),  # fmt: skip
    **{
        name: (_make(cls, cls.replace("ForMaskedLM", "Config"), _ids, **ENC, **ENC_EXTRA, **kw), "encoder")
        for name, cls, kw in (
            ("camembert", "CamembertForMaskedLM", {}),
            ("data2vec-text", "Data2VecTextForMaskedLM", {}),
            ("ernie", "ErnieForMaskedLM", {}),
            ("esm", "EsmForMaskedLM", {}),
            ("eurobert", "EuroBertForMaskedLM", {"num_key_value_heads": 2, "head_dim": 16}),
            ("fnet", "FNetForMaskedLM", {}),
            ("longformer", "LongformerForMaskedLM", {"attention_window": 4}),
            ("megatron-bert", "MegatronBertForMaskedLM", {}),
            ("mra", "MraForMaskedLM", {}),
            ("nystromformer", "NystromformerForMaskedLM", {}),
            ("roformer", "RoFormerForMaskedLM", {"embedding_size": 64}),
            ("roberta-prelayernorm", "RobertaPreLayerNormForMaskedLM", {}),
            ("xlm-roberta-xl", "XLMRobertaXLForMaskedLM", {}),
            ("yoso", "YosoForMaskedLM", {}),
            ("nomic-bert", "NomicBertForMaskedLM", {"head_dim": 16}),
            ("gte", "GteForMaskedLM", {}),
            ("esmc", "EsmcForMaskedLM", {"num_key_value_heads": 4, "head_dim": 16}),
            ("jina-embeddings-v3", "JinaEmbeddingsV3ForMaskedLM", {}),
            ("ultrabert", "UltrabertForMaskedLM", {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 4}),
            ("rembert", "RemBertForMaskedLM", {"input_embedding_size": 32, "output_embedding_size": 32}),
            ("squeezebert", "SqueezeBertForMaskedLM", {"embedding_size": 64}),  # grouped pointwise Conv1d MLP
            ("layoutlm", "LayoutLMForMaskedLM", {}),
            ("tapas", "TapasForMaskedLM", {}),
            ("xmod", "XmodForMaskedLM", {"languages": ["en_XX"], "default_language": "en_XX"}),
            ("luke", "LukeForMaskedLM", {"entity_vocab_size": 10, "entity_emb_size": 32}),
        )
    },
    **{
        name: (_make(cls, config, _seq2seq_inputs, **BART, **kw), "seq2seq")
        for name, cls, config, kw in (
            ("blenderbot", "BlenderbotForConditionalGeneration", "BlenderbotConfig", {}),
            ("blenderbot-small", "BlenderbotSmallForConditionalGeneration", "BlenderbotSmallConfig", {}),
            ("mvp", "MvpForConditionalGeneration", "MvpConfig", {}),
            ("plbart", "PLBartForConditionalGeneration", "PLBartConfig", {}),
            ("nllb-moe", "NllbMoeForConditionalGeneration", "NllbMoeConfig", {"num_experts": 4}),
        )
    },
    **{
        name: (_make(cls, config, _seq2seq_inputs, **T5, **kw), "seq2seq")
        for name, cls, config, kw in (
            ("longt5", "LongT5ForConditionalGeneration", "LongT5Config", {}),
            ("umt5", "UMT5ForConditionalGeneration", "UMT5Config", {}),
        )
    },  # fmt: skip
    "bert": (_make("BertForMaskedLM", "BertConfig", _ids, **ENC, intermediate_size=96), "encoder"),
    "xlm-roberta": (
        _make("XLMRobertaForMaskedLM", "XLMRobertaConfig", _ids, **ENC, intermediate_size=96, pad_token_id=1),
        "encoder",
    ),
    "mpnet": (_make("MPNetForMaskedLM", "MPNetConfig", _ids, **ENC, intermediate_size=96, pad_token_id=1), "encoder"),
    "deberta": (  # one fused in_proj viewed as (heads, 3 * head_dim), relative attention
        _make(
            "DebertaForMaskedLM",
            "DebertaConfig",
            _ids,
            **ENC,
            intermediate_size=96,
            relative_attention=True,
            pos_att_type=["c2p", "p2c"],
            max_relative_positions=16,
        ),
        "encoder",
    ),
    "convbert": (  # its attention has num_attention_heads // head_ratio heads (2 of 4)
        _make("ConvBertForMaskedLM", "ConvBertConfig", _ids, **ENC, intermediate_size=96, embedding_size=64),
        "encoder",
    ),
    "funnel": (  # the MLP width is d_inner, its first layer ffn.linear_1
        _make(
            "FunnelForMaskedLM",
            "FunnelConfig",
            _ids,
            vocab_size=V,
            block_sizes=[1, 1],
            d_model=64,
            n_head=4,
            d_head=16,
            d_inner=96,
        ),
        "encoder",
    ),
    "roberta": (
        _make("RobertaForMaskedLM", "RobertaConfig", _ids, **ENC, intermediate_size=96, pad_token_id=1),
        "encoder",
    ),
    "distilbert": (
        _make(
            "DistilBertForMaskedLM",
            "DistilBertConfig",
            _ids,
            vocab_size=V,
            dim=64,
            n_layers=2,
            n_heads=4,
            hidden_dim=96,
        ),
        "encoder",
    ),
    "albert": (
        _make("AlbertForMaskedLM", "AlbertConfig", _ids, **ENC, intermediate_size=96, embedding_size=32),
        "encoder",
    ),
    "electra": (
        _make("ElectraForMaskedLM", "ElectraConfig", _ids, **ENC, intermediate_size=96, embedding_size=32),
        "encoder",
    ),
    "deberta-v2": (_make("DebertaV2ForMaskedLM", "DebertaV2Config", _ids, **ENC, intermediate_size=96), "encoder"),
    "modernbert": (
        _make(
            "ModernBertForMaskedLM",
            "ModernBertConfig",
            _ids,
            **ENC,
            intermediate_size=96,
            global_attn_every_n_layers=2,
            local_attention=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            sep_token_id=2,
            cls_token_id=1,
        ),
        "encoder",
    ),
    "vit": (_make("ViTForImageClassification", "ViTConfig", _pixels, **VIT, intermediate_size=96), "encoder"),
    "dinov2": (_make("Dinov2Model", "Dinov2Config", _pixels, **VIT, mlp_ratio=2), "encoder"),
    "swin": (
        _make(
            "SwinForImageClassification",
            "SwinConfig",
            _pixels,
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[2, 2],
            num_heads=[2, 4],
            window_size=4,
        ),
        "encoder",
    ),
    "convnext": (
        _make(
            "ConvNextForImageClassification",
            "ConvNextConfig",
            _pixels,
            num_channels=3,
            hidden_sizes=[16, 32],
            num_stages=2,
            depths=[1, 1],
            image_size=32,
        ),
        "encoder",
    ),
    "t5": (
        _make("T5ForConditionalGeneration", "T5Config", _seq2seq_inputs, **T5),
        "seq2seq",
    ),
    "bart": (_make("BartForConditionalGeneration", "BartConfig", _seq2seq_inputs, **BART), "seq2seq"),
    "mbart": (_make("MBartForConditionalGeneration", "MBartConfig", _seq2seq_inputs, **BART), "seq2seq"),
    "m2m100": (  # embeddings scaled by sqrt(d_model), a float the config derives
        _make("M2M100ForConditionalGeneration", "M2M100Config", _seq2seq_inputs, **BART),
        "seq2seq",
    ),
    "led": (  # longformer encoder (local window of 4); its decoder attention reshapes to its input width
        _make(
            "LEDForConditionalGeneration",
            "LEDConfig",
            _seq2seq_inputs,
            **{k: v for k, v in BART.items() if k != "max_position_embeddings"},
            max_encoder_position_embeddings=64,
            max_decoder_position_embeddings=64,
            attention_window=4,
        ),
        "seq2seq",
    ),
    "pegasus": (_make("PegasusForConditionalGeneration", "PegasusConfig", _seq2seq_inputs, **BART), "seq2seq"),
    "marian": (_make("MarianMTModel", "MarianConfig", _seq2seq_inputs, **BART), "seq2seq"),
    "mt5": (
        _make("MT5ForConditionalGeneration", "MT5Config", _seq2seq_inputs, **T5),
        "seq2seq",
    ),
    "whisper": (
        _make(
            "WhisperForConditionalGeneration",
            "WhisperConfig",
            _whisper_inputs,
            **{
                **{k: v for k, v in BART.items() if k != "max_position_embeddings"},
                "num_mel_bins": 16,
                "max_source_positions": 16,
                "max_target_positions": 32,
            },
        ),
        "seq2seq",
    ),
    "clip": (
        _make(
            "CLIPModel",
            "CLIPConfig",
            _clip_inputs,
            text_config={**ENC, "intermediate_size": 96, "max_position_embeddings": 32},
            vision_config={**VIT, "intermediate_size": 96},
        ),
        "encoder",
    ),
    "siglip-text": (
        _make("SiglipTextModel", "SiglipTextConfig", _ids, **ENC, intermediate_size=96, max_position_embeddings=32),
        "encoder",
    ),
}


def build(name: str, attn: str = "sdpa") -> tuple[Any, Any, str]:
    """``(model in eval mode, inputs, kind)`` of a family, with weights seeded so that every
    attention implementation gets the same model."""
    builder, kind = FAMILIES[name]
    torch.manual_seed(0)
    model, inputs = builder()
    try:
        model.set_attn_implementation(attn)
    except (ValueError, AttributeError, ImportError):  # the family has one implementation only
        pass
    if getattr(model.config, "_attn_implementation", attn) != attn:  # chosen at construction only (Falcon)
        config = copy.deepcopy(model.config)
        config._attn_implementation = attn
        torch.manual_seed(0)
        try:
            model = type(model)(config)
        except ValueError:  # one implementation only (Bloom, DeBERTa-v2: eager)
            pass
    return model.eval(), inputs, kind
