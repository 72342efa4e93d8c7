"""The default prune of a Hugging Face model keeps every width its config cannot describe,
so plain ``from_pretrained`` reloads it; and a weight read outside its module (MobileBERT's
MLM head) is coupled or frozen with the module that slices it.

- Sequence classifiers (BERT, RoBERTa, DeBERTa-v2): the pooler / ``classifier.dense`` is
  ``hidden_size`` wide but its own group; the default pruner halved it, and (BERT,
  RoBERTa) the heads whose size is ``hidden_size / num_attention_heads``: only
  ``load_pruned`` could reload. Now they are kept, with a reason, and the MLP prunes.
- MobileBERT: its MLM head multiplies by ``cat([decoder.weight.t(), dense.weight])``,
  the decoder weight tied to the word embeddings; that read got frozen atoms of its own,
  not coupled to the embeddings' width, so the oracle's prune of the embedding width
  broke the matmul. Its entry projection reads 3 embeddings side by side (trigram input),
  which the keep-hidden default did not match.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from cleanai_core import DependencyGraph, StructuredPruner, hookimpl  # noqa: E402
from cleanai_core.io import load_pruned, save_pruned  # noqa: E402
from cleanai_core.plugins import make_plugin_manager, set_plugin_manager, temporary_plugin  # noqa: E402
from cleanai_core.slicing import apply_edits, edits_for  # noqa: E402
from cleanai_core.testing import check_pruner, random_units  # noqa: E402
from cleanai_plugins.layers.embedding import EmbeddingPruner  # noqa: E402
from cleanai_plugins.zoo.transformers.describable import KEPT  # noqa: E402

V = 100
ENC = {"vocab_size": V, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96}
#: family -> (class, config, extra config, the pooler's dense layer)
CLASSIFIERS = {
    "bert": ("BertForSequenceClassification", "BertConfig", {}, "bert.pooler.dense"),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", {"pad_token_id": 1}, "classifier.dense"),
    "deberta-v2": ("DebertaV2ForSequenceClassification", "DebertaV2Config", {}, "pooler.dense"),
}


def ids() -> torch.Tensor:
    return torch.randint(3, V, (1, 8), generator=torch.Generator().manual_seed(1))


def classifier(name: str) -> nn.Module:
    cls, config, extra, _ = CLASSIFIERS[name]
    torch.manual_seed(0)
    return getattr(transformers, cls)(getattr(transformers, config)(**ENC, **extra)).eval()


def mobilebert() -> nn.Module:
    config = transformers.MobileBertConfig(**ENC, embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32)
    torch.manual_seed(0)
    return transformers.MobileBertForMaskedLM(config).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def default_prune(model: nn.Module, x: torch.Tensor) -> tuple[StructuredPruner, nn.Module]:
    pruner = StructuredPruner(model, (x,), importance="magnitude", pruning_ratio=0.5)
    return pruner, pruner.prune()


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_default_prune_of_a_sequence_classifier_reloads_with_from_pretrained(name, tmp_path):
    model, x = classifier(name), ids()
    pruner, small = default_prune(model, x)
    pooler = dict(small.named_modules())[CLASSIFIERS[name][3]]
    assert tuple(pooler.weight.shape) == (64, 64)  # the pooler's width: no config key describes it
    assert small.config.intermediate_size == 48  # the MLP still prunes
    assert n_params(small) == n_params(model) - 2 * 2 * 48 * 64 - 2 * 48 < n_params(model)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert f"{CLASSIFIERS[name][3]}: its width is not a key of the config: {KEPT}" in pruner.graph.explain()
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    # within a float's rounding: from_pretrained maps the weights at 8-byte aligned addresses, where the
    # CPU kernels may round differently (up to 7e-9 for the unpruned models too; 0 once the weights are cloned)
    torch.testing.assert_close(logits(small, x), logits(again, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_with_the_keep_plugin_disabled_the_pooler_shrinks_and_load_pruned_reloads(name, tmp_path):
    model, x = classifier(name), ids()
    model.save_pretrained(tmp_path / "original")
    set_plugin_manager(make_plugin_manager(disabled=["cleanai_plugins.zoo.transformers_hidden"]))
    try:
        pruner, small = default_prune(model, x)
        save_pruned(tmp_path / "out", small, pruner.history, spec=f"hf:{tmp_path / 'original'}")
        again = load_pruned(tmp_path / "out")
    finally:
        set_plugin_manager(None)
    pooler = dict(small.named_modules())[CLASSIFIERS[name][3]]
    assert pooler.out_features == 32 and n_params(again) == n_params(small) < n_params(model)
    assert torch.equal(logits(small, x), logits(again, x))


def test_mobilebert_passes_the_oracle_and_its_tied_decoder_follows_the_embedding_width():
    model, x = mobilebert(), ids()
    report = check_pruner(model, (x,), ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    assert report.params_after < report.params_before
    graph = DependencyGraph(model, (x,))
    emb = next(g for g in graph.groups() if "mobilebert.embeddings.word_embeddings" in g.modules())
    assert (emb.size, emb.prunable) == (32, 32)
    assert "cls.predictions.transform.dense" in emb.modules()  # the first 32 rows of the cat
    small = copy.deepcopy(model)  # every group at 50%, the embedding width and the hidden size too
    apply_edits(small, edits_for(graph, random_units(graph, 0.5)), graph.pm)
    assert small.cls.predictions.decoder.weight is small.mobilebert.embeddings.word_embeddings.weight
    assert small.mobilebert.embeddings.word_embeddings.weight.shape == (V, 16)
    assert logits(small, x).shape == (1, 8, V)


def test_mobilebert_default_prune_keeps_the_hidden_size_and_reloads_with_from_pretrained(tmp_path):
    model, x = mobilebert(), ids()
    pruner, small = default_prune(model, x)
    assert small.mobilebert.embeddings.embedding_transformation.weight.shape == (64, 96)  # 3 x 32 -> 64
    assert small.config.hidden_size == 64 and small.config.intermediate_size == 48
    assert small.mobilebert.encoder.layer[1].bottleneck.input.dense.out_features == 32  # no key for it
    # only the MLPs prune: 4 per layer (num_feedforward_networks), 48 of 96 units of (32 in + bias, 32 out)
    assert n_params(small) == n_params(model) - 2 * 4 * 48 * (32 + 1 + 32) == 99428
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(small, x), logits(again, x))


class _Head(nn.Module):
    """An embedding whose weight is read again outside it, concatenated with another
    layer's (MobileBERT's MLM head in small)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.up = nn.Linear(4, 6)
        self.extra = nn.Linear(10, 2, bias=False)

    def forward(self, ids):
        h = self.up(self.emb(ids))
        return h @ torch.cat([self.emb.weight.t(), self.extra.weight], dim=0)


class _NoParamLabel(EmbeddingPruner):
    def trace_param(self, module, name, param, ctx):
        return None


class _Claim:
    @hookimpl(tryfirst=True)
    def cleanai_layer_pruner(self, module):
        return _NoParamLabel() if isinstance(module, nn.Embedding) else None


def test_a_weight_read_outside_its_module_without_a_label_freezes_the_slices_that_cut_it():
    torch.manual_seed(0)
    model, x = _Head().eval(), torch.tensor([[1, 2, 3]])
    with temporary_plugin(_Claim()):
        graph = DependencyGraph(model, (x,))
        emb = next(g for g in graph.groups() if "emb" in g.modules())
        assert emb.prunable == 0
        assert "emb.weight is used outside its module emb, which a plugin claims" in emb.reasons
        report = check_pruner(model, (x,), ratio=0.5)
    assert report.max_abs_diff < 1e-6 and report.output_shapes_equal
    graph = DependencyGraph(model, (x,))  # the embedding pruner labels it: one group, prunable
    emb = next(g for g in graph.groups() if "emb" in g.modules())
    assert (emb.size, emb.prunable) == (4, 4) and "up" in emb.modules()
    report = check_pruner(model, (x,), ratio=0.5)
    assert report.max_abs_diff < 1e-6 and report.pruned_units == 2 + 1  # of emb (4) and extra (2)
