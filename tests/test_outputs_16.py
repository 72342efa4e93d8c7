"""Session 24 (outputs16): what CleanAI writes and reports, against independent counts."""

from __future__ import annotations

import pytest
import torch


def _tiny_llama():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


# -- --quiet keeps transformers' progress bars off --------------------------------------------------


def test_quiet_prune_of_a_transformers_model_shows_no_progress_bar_and_puts_the_setting_back(
    tmp_path, monkeypatch, capsys
):
    pytest.importorskip("transformers")
    from transformers.utils import logging as tf_logging

    from cleanai_core.cli import main

    monkeypatch.chdir(tmp_path)
    _tiny_llama().save_pretrained(tmp_path / "model")
    torch.save({"input_ids": torch.randint(0, 61, (16, 12), generator=torch.Generator().manual_seed(0))}, "ids.pt")
    capsys.readouterr()
    common = ["--data", "ids.pt", "--ratio", "0.5", "--latency-repeats", "1", "--threads", "1"]
    assert main(["prune", "--model", "hf:model", *common, "--quiet", "--out", "a"]) == 0
    err = capsys.readouterr().err
    # "Loading weights: 100%|...| 20/20" (from_pretrained, twice) and "Writing model shards" (save_pretrained)
    assert "Loading weights" not in err and "Writing model shards" not in err and "it/s" not in err
    assert tf_logging.is_progress_bar_enabled()  # transformers' own setting is back
    assert (tmp_path / "a" / "hf" / "config.json").is_file()
