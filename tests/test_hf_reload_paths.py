"""Which way a pruned Hugging Face model reloads, and that both ways give its logits.

A config that can describe the pruned widths reloads with plain ``from_pretrained``; one
that cannot (fewer heads where the head size is ``hidden / heads``, Bloom's and
ConvNeXt's MLP fixed at 4x, Swin's stage widths) says so in ``config.cleanai_pruning``
(``"reload": "load_pruned"`` and ``"why"``), and the folder ``save_pruned`` writes reloads
through ``load_pruned`` with identical logits (and the same greedy generation).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import FAMILIES, build  # noqa: E402

from cleanai_core import DependencyGraph  # noqa: E402
from cleanai_core.history import PruningHistory  # noqa: E402
from cleanai_core.io import load_pruned, save_pruned  # noqa: E402
from cleanai_core.slicing import SliceEdit, apply_edits  # noqa: E402
from cleanai_core.testing import random_units, run_model  # noqa: E402
from cleanai_plugins.io.hf import save_and_verify  # noqa: E402
from cleanai_plugins.zoo.transformers.reload_path import HEADS, MLP  # noqa: E402


def prune(model, inputs, hidden: bool = False):
    """A random 50% of every group (normalised ones, the hidden sizes, only with
    ``hidden``) on a copy; returns ``(pruned, edits)``."""
    graph = DependencyGraph(model, inputs)
    units = random_units(graph, 0.5, torch.Generator().manual_seed(0), exclude_normalized=not hidden)
    edits = [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in graph.keep_indices(units).items()]
    small = copy.deepcopy(model)
    apply_edits(small, edits, graph.pm)
    return small, edits


def logits(model, inputs) -> torch.Tensor:
    return run_model(model, inputs)[0]


def reload_through_load_pruned(name: str, tmp_path: Path):
    """The unpruned model saved with ``save_pretrained`` (the ``hf:`` spec), the pruned
    one with ``save_pruned``; returns ``(pruned, reloaded, inputs, kind)``."""
    model, inputs, kind = build(name)
    model.save_pretrained(tmp_path / "original")
    small, edits = prune(model, inputs)
    save_pruned(tmp_path / "out", small, PruningHistory([edits]), spec=f"hf:{tmp_path / 'original'}")
    return small, load_pruned(tmp_path / "out"), inputs, kind


def greedy(model, inputs) -> torch.Tensor:
    kwargs = dict(inputs) if isinstance(inputs, dict) else {"input_ids": inputs[0]}
    kwargs.pop("decoder_input_ids", None)
    with torch.no_grad():
        return model.generate(**kwargs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)


FAST = ["gpt2", "bert", "bloom", "swin", "convnext", "falcon"]
#: families whose config cannot describe a 50% prune of heads or MLP, and why
WHY = {"gpt2": HEADS, "bert": HEADS, "bloom": MLP, "swin": HEADS, "convnext": MLP, "falcon": HEADS}


@pytest.mark.parametrize("name", FAST)
def test_load_pruned_reloads_what_from_pretrained_cannot(name, tmp_path):
    small, again, inputs, kind = reload_through_load_pruned(name, tmp_path)
    record = small.config.cleanai_pruning
    assert record["from_pretrained"] is False and record["reload"] == "load_pruned"
    assert WHY[name] in record["why"]
    assert type(again) is type(small)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in small.parameters())
    assert torch.equal(logits(small, inputs), logits(again, inputs))
    if kind != "encoder":
        assert torch.equal(greedy(small, inputs), greedy(again, inputs))


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(set(FAMILIES) - set(FAST)))
def test_corpus_load_pruned(name, tmp_path):
    small, again, inputs, kind = reload_through_load_pruned(name, tmp_path)
    # within a float's rounding: CLIP's reloaded logits differ by 9e-8 (of 0.39) under this
    # torch build, also with its weights cloned (as the other reload tests compare)
    torch.testing.assert_close(logits(small, inputs), logits(again, inputs), rtol=0, atol=1e-6)
    if kind != "encoder":
        assert torch.equal(greedy(small, inputs), greedy(again, inputs))


@pytest.mark.parametrize("name", ["swin", "convnext"])
def test_per_stage_configs_reload_with_from_pretrained_when_stages_shrink_uniformly(name, tmp_path):
    """Every group (stage widths too) at 50%: Swin's heads go with its stage widths, its
    MLP stays ``mlp_ratio`` x; ConvNeXt's MLP stays 4x its stage width."""
    model, inputs, _ = build(name)
    small, _ = prune(model, inputs, hidden=True)
    config = small.config
    assert config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    if name == "swin":
        assert (config.embed_dim, config.num_heads, config.mlp_ratio, config.hidden_size) == (8, [1, 2], 4.0, 16)
        assert small.swin.encoder.layers[1].blocks[1].attention.q_proj.weight.shape == (16, 16)
    else:
        assert config.hidden_sizes == [8, 16]
        assert small.convnext.encoder.stages[1].layers[0].pwconv1.weight.shape == (64, 16)
        assert small.convnext.embeddings.layernorm.weight.shape == (8,)  # the channels-first norm follows the stem
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(small, inputs), logits(again, inputs))


def test_swin_heads_prune_with_their_relative_position_bias_columns():
    model, inputs, _ = build("swin")
    small, _ = prune(model, inputs)
    attn = small.swin.encoder.layers[1].blocks[1].attention  # a shifted-window block
    assert attn.q_proj.weight.shape == (16, 32) and attn.num_attention_heads == 2
    assert attn.relative_position_bias.relative_position_bias_table.shape == (49, 2)
    assert small.config.num_heads == [1, 2]  # a list per stage, never one int over it


def test_job_report_says_which_reload_path(tmp_path):
    model, inputs, _ = build("bert")
    small, _ = prune(model, inputs)
    out = save_and_verify(small, tmp_path / "hf", {"input_ids": inputs[0]})
    assert out["hf_folder"] is None and out["hf_reload_path"] == "load_pruned"
    assert out["hf_reload"] == f"not possible: {HEADS}"
    assert not (tmp_path / "hf").exists()
    model, inputs, _ = build("llama-gqa")
    small, _ = prune(model, inputs)
    out = save_and_verify(small, tmp_path / "hf", {"input_ids": inputs[0]})
    assert out["hf_folder"] == "hf" and out["hf_reload_path"] == "from_pretrained"
