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


# -- the report's scores are the criterion's documented formula --------------------------------------


@pytest.mark.parametrize("p", [1, 2])
def test_the_reports_magnitude_scores_are_the_documented_sum_of_powers_per_slice(p):
    from torch import nn

    from cleanai_core import StructuredPruner
    from cleanai_plugins.importance.criteria import MagnitudeImportance

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    w1, w2 = m[0].weight.detach().clone(), m[2].weight.detach().clone()
    pruner = StructuredPruner(m, torch.randn(2, 8), importance=MagnitudeImportance(p=p), pruning_ratio=0.25)
    pruner.prune()
    layer = pruner.report()["layers"][0]
    gone = layer["pruned_indices"]
    kept = [i for i in range(16) if i not in gone]
    scores = torch.empty(16, dtype=torch.float64)
    scores[gone] = torch.tensor(layer["importance_scores"]["pruned"], dtype=torch.float64)
    scores[kept] = torch.tensor(layer["importance_scores"]["kept"], dtype=torch.float64)
    # per slice, the sum of |w|^p of the unit's weights (the producer's rows, the consumer's columns; a bias is
    # no weight here), over its mean; the mean over the two slices
    rows, cols = w1.abs().pow(p).sum(1).double(), w2.abs().pow(p).sum(0).double()
    want = (rows / rows.mean() + cols / cols.mean()) / 2
    assert torch.allclose(scores, want, rtol=1e-5)
    assert sorted(gone) == sorted(torch.argsort(want)[:4].tolist())


@pytest.mark.parametrize("compensation", [True, False])
def test_the_reports_default_scores_are_the_documented_weight_activation_product(compensation):
    """``s_u = (w_u / mean w)^0.5 * (a_u / mean a)^0.5``: ``w`` the consumer's squared column norm, ``a``
    the activation's variance (compensation folds the mean) or its second moment, over two batches."""
    from torch import nn

    from cleanai_core import StructuredPruner

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(64, 8)
    with torch.no_grad():
        act = torch.relu(m[0](x)).double()
    w = m[2].weight.detach().double().pow(2).sum(0)
    a = act.var(0, unbiased=False) if compensation else act.pow(2).mean(0)
    want = (w / w.mean()).sqrt() * (a / a.mean()).sqrt()
    pruner = StructuredPruner(m, x[:1], pruning_ratio=0.25, bias_compensation=compensation)
    pruner.collect_activations([x[:32], x[32:]], progress=False)
    pruner.prune()
    layer = pruner.report()["layers"][0]
    gone = layer["pruned_indices"]
    scores = torch.empty(16, dtype=torch.float64)
    scores[gone] = torch.tensor(layer["importance_scores"]["pruned"], dtype=torch.float64)
    scores[[i for i in range(16) if i not in gone]] = torch.tensor(
        layer["importance_scores"]["kept"], dtype=torch.float64
    )
    assert torch.allclose(scores, want, rtol=1e-5)
    assert sorted(gone) == sorted(torch.argsort(want)[:4].tolist())


# -- groups that nothing could prune are named, with why --------------------------------------------


def test_the_report_names_the_groups_kept_whole_with_why_a_berts_heads_too(tmp_path):
    pytest.importorskip("transformers")
    import transformers

    from cleanai_core import StructuredPruner
    from cleanai_core.report import render_markdown

    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(0))
    pruner = StructuredPruner(model, {"input_ids": ids[:1]}, pruning_ratio=0.5)
    pruner.collect_activations([{"input_ids": ids}], progress=False)
    pruned = pruner.prune()
    report = pruner.report()
    # the heads stayed (4 of 4), and the report's groups and skipped groups said nothing about them
    assert pruned.bert.encoder.layer[0].attention.self.query.out_features == 32
    assert all("attention.self.query" not in " ".join(g["modules"]) for g in report["groups"])
    assert report["skipped_groups"] == []
    heads = [g for g in report["kept_groups"] if any(w.startswith("heads:") for w in g["why"])]
    assert len(heads) == 1 and heads[0]["units"] == 4 and "from_pretrained" in heads[0]["why"][0]
    assert "bert.encoder.layer.0.attention.self.query" in heads[0]["modules"]
    # every unit of the graph is in exactly one listed group: pruned groups' or kept ones'
    listed = sum(g["units"] for g in report["groups"]) + sum(g["units"] for g in report["kept_groups"])
    assert listed == sum(g.size for g in pruner.graph.groups())
    md = render_markdown(report)
    assert "## Groups kept whole" in md and f"- group {heads[0]['group']} (4 units: " in md
