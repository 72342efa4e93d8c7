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
