"""Hugging Face text models, session 21b: the user journey after pruning (tiny models from
configs, nothing downloaded). One cause per test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import V  # noqa: E402

from cleanai_core.cli import main  # noqa: E402
from cleanai_core.io import load_pruned  # noqa: E402

ARGS = ["--threads", "1", "--latency-repeats", "1", "--quiet"]


def ids(*shape: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(5, V, shape, generator=torch.Generator().manual_seed(seed))


def prune_job(model, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    """``cleanai prune`` of ``model`` saved as a folder, on 24 x 16 token ids."""
    model.save_pretrained(tmp_path / "m")
    torch.save({"input_ids": ids(24, 16)}, tmp_path / "d.pt")
    rc = main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"),
               "--out", str(tmp_path / "o"), *ARGS, *extra])  # fmt: skip
    report = tmp_path / "o" / "report.json"
    return rc, json.loads(report.read_text()) if report.exists() else {}


def mixtral():
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=96, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)  # fmt: skip
    return transformers.MixtralForCausalLM(config).eval()


def test_auto_meets_a_parameter_target_on_experts_no_layer_names(tmp_path):
    """Mixtral's experts are one fused module (``mlp.experts``) holding one group per
    expert, so no layer name sets one expert's ratio: ``--auto`` left them at the pruner's
    ratio (the job's default 0.3) and ``--target-params 0.6 --auto`` kept 0.70 of the
    parameters (130,368 of 185,664). The allocation now gives
    the groups it cannot name the uniform ratio that meets the target (``allocation.others``),
    and the named groups are allocated around it."""
    rc, report = prune_job(mixtral(), tmp_path, "--target-params", "0.6", "--auto")
    assert rc == 0, report
    before, after = report["params_before"], report["params_after"]
    assert (before, after) == (185_664, 105_792)  # 0.57; was 130,368 (0.70)
    alloc = report["allocation"]
    assert alloc["others"] is not None and 0.3 < alloc["others"] < 0.6
    assert alloc["cost"] == pytest.approx(after / before, abs=0.02)
    small = load_pruned(tmp_path / "o")
    assert sum(p.numel() for p in small.parameters()) == after
    x = ids(1, 6, seed=5)
    with torch.no_grad():
        cached = small.generate(x, max_new_tokens=6, do_sample=False)
        plain = small.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
