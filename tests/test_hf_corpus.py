"""Hugging Face transformers corpus: tiny random models of each family prune, pass the
masking oracle under eager and sdpa attention, keep a config that agrees with their
modules, save and reload with identical logits, and generate with a KV cache.

The families are built in ``tests/hf_families.py``. A fast subset (Llama with GQA,
GPT-2, BERT, ViT) runs by default; the whole list is marked ``corpus``
(``pytest -m corpus tests/test_hf_corpus.py``). ``python tests/test_hf_corpus.py``
prints the per-family table of docs/compatibility.md.
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

from cleanai_core import DependencyGraph, StructuredPruner  # noqa: E402
from cleanai_core.slicing import SliceEdit, apply_edits, edits_for  # noqa: E402
from cleanai_core.testing import check_pruner, masked_model, random_units, run_model  # noqa: E402

FAST = ["llama-gqa", "gpt2", "bert", "vit"]
ATTN = ["eager", "sdpa"]


def structure(graph: DependencyGraph) -> list[tuple]:
    """The groups as comparable data: their slices, sizes and prunable counts."""
    return sorted((tuple(sorted(f"{s.module}:{s.name}" for s in g.slices)), g.size, g.prunable) for g in graph.groups())


QUERY_NAMES = (
    "q_proj",
    "query",
    "q",
    "q_lin",
    "query_proj",
    "c_attn",
    "query_key_value",
    "qkv_proj",
    "in_proj",
    "Wqkv",
    "Wq",
)


def reload_keeps(model) -> list[str]:
    """What to keep so that a family's config can describe the pruned model: every head
    (ignoring the query projections), where the family derives the head size from
    ``hidden_size / num_attention_heads``, and Whisper's convolution stem."""
    names = dict(model.named_modules())
    return [
        n
        for n in names
        if n.endswith("encoder.conv1")
        or (n.rpartition(".")[2] in QUERY_NAMES and "Attention" in type(names[n.rpartition(".")[0]]).__name__)
    ]


def prune_uniform(model, inputs, ratio: float = 0.5, seed: int = 0, keep_heads: bool = False):
    """``ratio`` of every group at random (the same count in groups of the same size: the
    uniform mode) sliced on a copy, fix-ups included; returns ``(pruned, graph)``."""
    graph = DependencyGraph(model, inputs, ignored_layers=reload_keeps(model) if keep_heads else ())
    pruned = random_units(graph, ratio, torch.Generator().manual_seed(seed), exclude_normalized=True)
    small = copy.deepcopy(model)
    keep = graph.keep_indices(pruned)
    apply_edits(small, [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in keep.items()], graph.pm)
    return small, graph


def logits(model, inputs) -> torch.Tensor:
    return run_model(model, inputs)[0]


def assert_reloaded(before: torch.Tensor, after: torch.Tensor) -> None:
    """The reloaded model's logits, within a float's rounding: ``from_pretrained`` maps the
    weights at 8-byte aligned addresses, where CPU kernels may round differently
    (GraniteMoeShared's unpruned model reloads 3e-8 off; 0 once the weights are cloned)."""
    assert before.shape == after.shape
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def check_oracle(name: str, attn: str) -> float:
    model, inputs, _ = build(name, attn)
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.output_shapes_equal
    assert report.pruned_units > 0
    assert report.params_after < report.params_before
    return report.max_abs_diff


def check_reload(name: str, tmp_path: Path, keep_heads: bool = False) -> tuple[torch.Tensor, torch.Tensor, object]:
    model, inputs, _ = build(name)
    small, _ = prune_uniform(model, inputs, keep_heads=keep_heads)
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    return logits(small, inputs), logits(again, inputs), small


def check_generate(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    model, inputs, kind = build(name)
    small, _ = prune_uniform(model, inputs)
    kwargs = dict(inputs) if isinstance(inputs, dict) else {"input_ids": inputs[0]}
    kwargs.pop("decoder_input_ids", None)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = small.generate(**kwargs, **gen, use_cache=True)
        plain = small.generate(**kwargs, **gen, use_cache=False)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    return cached, plain


# -- the fast subset -------------------------------------------------------------------


@pytest.mark.parametrize("name", FAST)
def test_graph_does_not_depend_on_the_attention_implementation(name):
    graphs = [structure(DependencyGraph(*build(name, attn)[:2])) for attn in ATTN]
    assert graphs[0] == graphs[1]
    assert sum(p for _, _, p in graphs[0]) > 0


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", FAST)
def test_pruned_model_equals_the_masked_original(name, attn):
    assert check_oracle(name, attn) < 1e-4


#: families whose config can say that heads are gone (``head_dim`` / ``d_kv`` read from it)
HEADS_IN_CONFIG = {
    "llama-mha",
    "llama-gqa",
    "qwen2",
    "qwen3",
    "mistral",
    "mixtral",
    "gemma",
    "gemma2",
    "phi3",
    "vit",
    "t5",
    "mt5",
    "phi",
    "starcoder2",
    "cohere",
    "granite",
    "nemotron",
    "gemma3-text",
    "olmo2",
    "qwen3-moe",
    "phimoe",
    "olmoe",
    "gpt-oss",
    "deepseek-v3",
    "glm",
    "exaone4",
    "cohere2",
    "jamba",
    "bamba",
    "cwm",
    "doge",
    "exaone-moe",
    "flex-olmo",
    "glm4-moe",
    "granitemoe-shared",
    "jais2",
    "ministral3",
    "nanochat",
    "olmo3",
    "olmo-hybrid",
    "solar-open",
    "ernie4_5-moe",
    "hunyuan-moe",
    "afmoe",
    "minimax-m2",
    "vaultgemma",
    "eurobert",
    "longformer",
    "yoso",
    "nomic-bert",
    "longt5",
    "qwen3-next",
    "switch-transformers",
    "cohere2-moe",
    "granite-swa",
    "granitemoe-swa",
    "hyperclovax",
    "mellum",
    "laguna",
    "nemotron-h",
    "mimo-v2-flash",
    "hy-v3",
    "aria-text",
    "gte",
    "esmc",
    "jina-embeddings-v3",
    "qwen3.5",
    "qwen3.5-moe",
    "deepseek-v2",
    "minicpm3",
    "granitemoe-hybrid",
    "smollm3",
    "seed-oss",
    "ministral",
    "arcee",
    "hunyuan-dense",
    "ernie4_5",
    "apertus",
    "glm4",
    "lfm3",
    "glm4-moe-lite",
    "gemma3n-text",
    "llama4-text",
    "gemma4-text",
    "falcon-h1",
    "youtu",
    "deepseek-v3.2",
    "glm-moe-dsa",
    "emu3-text",
    "jetmoe",
    "llava",
    "gemma3-vlm",
    "paligemma",
    "cpmant",
    "t5gemma",
    "t5gemma2",
    "mistral4",
    "gemma4-unified-text",
}


@pytest.mark.parametrize("name", FAST)
def test_save_pretrained_then_from_pretrained_gives_identical_logits(name, tmp_path):
    keep_heads = name not in HEADS_IN_CONFIG
    before, after, small = check_reload(name, tmp_path, keep_heads=keep_heads)
    assert before.shape == after.shape
    assert torch.equal(before, after)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in build(name)[0].parameters())


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("gpt-j", {"n_inner": 48}),  # mlp.fc_in
        ("modernbert", {"intermediate_size": 48}),  # mlp.Wi: gate and up stacked, 2 x 96 wide
        ("qwen2-moe", {"moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "intermediate_size": 96}),
        ("dinov2", {"mlp_ratio": 1}),  # no width key: int(hidden_size * mlp_ratio), hidden 64, MLP 128 -> 64
    ],
)
def test_mlp_width_is_written_to_the_family_config_key(name, keys, tmp_path):
    """MLP widths the config fix-up did not find (GPT-J's ``fc_in``, ModernBERT's stacked
    ``Wi``), wrote to the wrong key (Qwen-MoE's experts into ``intermediate_size``, the
    dense MLP's key; the shared expert nowhere) or could not write (DINOv2's
    ``mlp_ratio``): each reloaded only through ``load_pruned``, said to have no key."""
    before, after, small = check_reload(name, tmp_path, keep_heads=name in ("gpt-j", "modernbert"))
    assert {k: getattr(small.config, k) for k in keys} == keys
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert torch.equal(before, after)


def test_opt_350m_tied_embeddings_shrink_with_the_output_projection(tmp_path):
    """OPT-350m's embeddings (32) are projected into the hidden size (64) and back; the tied
    ``lm_head`` reads ``project_out``'s output. Only the shared weight joins the two widths
    of 32: they were two groups, so pruning either untied the weight (and broke the model
    or its reload); now one group, and ``word_embed_proj_dim`` is written."""
    before, after, small = check_reload("opt-350m", tmp_path, keep_heads=True)
    assert small.model.decoder.embed_tokens.weight.shape == (100, 16) and small.config.word_embed_proj_dim == 16
    assert small.lm_head.weight is small.model.decoder.embed_tokens.weight
    assert small.model.decoder.project_out.out_features == 16 and small.model.decoder.project_in.in_features == 16
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert torch.equal(before, after)


def test_llama_gqa_config_agrees_with_the_pruned_modules():
    model, inputs, _ = build("llama-gqa")
    small, _ = prune_uniform(model, inputs)
    config, attn = small.config, small.model.layers[0].self_attn
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    assert config.intermediate_size == 48 == small.model.layers[1].mlp.up_proj.out_features
    assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 16 and attn.num_key_value_groups == 2
    assert attn.scaling == 16**-0.5  # head_dim unchanged: the scale stays the original one


def test_config_that_cannot_describe_fewer_heads_says_so():
    """BERT derives its head size from hidden_size / num_attention_heads."""
    model, inputs, _ = build("bert")
    small, _ = prune_uniform(model, inputs)
    record = small.config.cleanai_pruning
    assert record["uniform"] is True and record["from_pretrained"] is False
    assert record["mismatched"][0] == "bert.encoder.layer.0.attention.self.query.weight"


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_generate_with_kv_cache_matches_greedy_decoding_without_it(name):
    cached, plain = check_generate(name)
    assert cached.shape == (1, 8 + 6)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize(("name", "entry"), [("albert", "albert.encoder.embedding_hidden_mapping_in"),
                                             ("electra", "electra.embeddings_project"),
                                             ("opt-350m", "model.decoder.project_in")])  # fmt: skip
def test_hidden_size_is_kept_by_default_behind_narrower_embeddings(name, entry):
    """Embeddings of 32 projected into a hidden size of 64: freezing the embeddings' group
    (the default ignore) left the residual stream free, so the default pruner halved the
    hidden size it promises to keep (and ELECTRA no longer reloaded: at 32 = embedding_size
    its config builds no ``embeddings_project``)."""
    model, inputs, _ = build(name)
    pruner = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.5)
    hidden = next(g for g in pruner.graph.groups() if any(s.module == entry and s.name == "out" for s in g.slices))
    assert (hidden.size, hidden.prunable) == (64, 0)
    small = pruner.prune()
    assert dict(small.named_modules())[entry].out_features == 64 and small.config.hidden_size == 64
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())  # heads, MLP


def test_gpt2_tied_embeddings_stay_tied_when_the_hidden_size_shrinks():
    model, inputs, _ = build("gpt2")
    graph = DependencyGraph(model, inputs)
    pruned = random_units(graph, 0.5, torch.Generator().manual_seed(0))  # normalised groups too: the hidden size
    small = copy.deepcopy(model)
    keep = graph.keep_indices(pruned)
    apply_edits(small, [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in keep.items()], graph.pm)
    assert small.transformer.wte.weight.shape == (100, 32)
    assert small.lm_head.weight is small.transformer.wte.weight
    assert logits(small, inputs).shape == (1, 8, 100)


def test_olmo_weightless_layer_norms_shrink_with_the_hidden_size(tmp_path):
    """``OlmoLayerNorm`` has no parameters and calls ``F.layer_norm(x, self.normalized_shape)``:
    pruning the hidden size left it at 64 and the pruned model failed to run."""
    model, inputs, _ = build("olmo")
    graph = DependencyGraph(model, inputs)
    hidden = next(g for g in graph.groups() if any(s.module == "model.embed_tokens" for s in g.slices))
    assert hidden.prunable == 64 and any(s.normalizes for s in hidden.slices)  # the oracle leaves it out
    pruned = random_units(graph, 0.5, torch.Generator().manual_seed(0))  # normalised groups too: the hidden size
    small = copy.deepcopy(model)
    keep = graph.keep_indices(pruned)
    apply_edits(small, [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in keep.items()], graph.pm)
    assert small.model.embed_tokens.weight.shape == (100, 32)
    assert small.model.layers[0].input_layernorm.normalized_shape == (32,) == small.model.norm.normalized_shape
    assert small.config.hidden_size == 32 and small.config.cleanai_pruning["from_pretrained"] is True
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    assert logits(small, inputs).shape == (1, 8, 100)
    assert torch.equal(logits(small, inputs), logits(again, inputs))


def test_led_decoder_heads_shrink_only_with_the_width_they_are_reshaped_to():
    """LED's decoder attention reshapes its output to ``hidden_states.size()``'s width: its
    heads were pruned alone and the pruned model failed to run (``shape '[1, 5, 64]' is
    invalid``). Its query projection's output now goes with its input (the hidden size, which
    the longformer encoder's heads keep), so the heads stay and the MLPs prune."""
    model, inputs, _ = build("led")
    graph = DependencyGraph(model, inputs)
    q = "led.decoder.layers.0.self_attn.q_proj"
    heads = next(g for g in graph.groups() if any(s.module == q and s.name == "out" for s in g.slices))
    assert any(s.module == q and s.name == "in" for s in heads.slices) and heads.prunable == 0
    assert check_oracle("led", "eager") < 1e-4


def test_gpt2_conv1d_layers_prune():
    model, inputs, _ = build("gpt2")
    small, _ = prune_uniform(model, inputs)
    mlp, attn = small.transformer.h[0].mlp, small.transformer.h[0].attn
    assert mlp.c_fc.weight.shape == (64, 128) and mlp.c_proj.weight.shape == (128, 64)
    assert attn.c_attn.weight.shape == (64, 96) and (attn.num_heads, attn.split_size) == (2, 32)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", ["falcon", "llama-mqa"])
def test_multi_query_attention_prunes_query_heads_and_keeps_its_key_value_head(name, attn):
    """One key/value head for 4 query heads: the query heads prune one by one (pruning
    the one KV group would empty the attention). Falcon fuses them in one
    ``query_key_value`` of 6 heads and picks the key and value with ``[-2]``, ``[-1]``."""
    assert check_oracle(name, attn) < 1e-4
    model, inputs, _ = build(name, attn)
    small, _ = prune_uniform(model, inputs)
    if name == "falcon":
        attn_module = small.transformer.h[1].self_attention
        assert attn_module.query_key_value.weight.shape == ((2 + 2) * 16, 64) and attn_module.num_heads == 2
        assert attn_module.dense.weight.shape == (64, 32)
    else:
        attn_module = small.model.layers[1].self_attn
        assert attn_module.q_proj.weight.shape == (32, 64) and attn_module.k_proj.weight.shape == (16, 64)
        assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
        assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    cached, plain = check_generate(name)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize(
    ("name", "rows", "heads"), [("falcon-mha", 2 * 3 * 16, (2, 2)), ("falcon-gqa", 4 * 16, (2, 1))]
)
def test_falcon_without_multi_query_prunes_heads_of_its_fused_qkv(name, rows, heads, attn):
    """``query_key_value`` viewed as ``(num_heads, 3, head_dim)`` (``falcon-mha``; the
    pruned model failed to run before) or, Falcon-40B's layout, as ``(kv groups, group + 2,
    head_dim)`` with the key and value picked by ``[-2]``, ``[-1]`` inside each group
    (``falcon-gqa``: whole KV groups go; frozen before): ``num_heads`` and ``num_kv_heads``
    follow the kept heads."""
    assert check_oracle(name, attn) < 1e-4
    model, inputs, _ = build(name, attn)
    small, _ = prune_uniform(model, inputs)
    attn_module = small.transformer.h[0].self_attention
    assert attn_module.query_key_value.weight.shape == (rows, 64)
    assert (attn_module.num_heads, attn_module.num_kv_heads) == heads
    cached, plain = check_generate(name)
    assert torch.equal(cached, plain)


def _padded_batch() -> dict[str, torch.Tensor]:
    """A batch of 3 token sequences, the second left-padded by 2 (attention paths for padding)."""
    ids = torch.randint(3, 100, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("attn", ATTN)
def test_gpt_bigcode_multi_query_prunes_query_heads_of_its_fused_c_attn(attn):
    """GPT-BigCode's default (SantaCoder, StarCoder): one ``c_attn`` of ``embed_dim + 2 *
    kv_dim`` split into ``(embed_dim, kv_dim, kv_dim)``, the one key/value head carrying its
    channels on the head dimension. The fix-up read 3 equal q, k, v parts from ``c_attn``
    (GPT-2's layout) and halved ``embed_dim``, so every pruned model failed to run and the
    pruner skipped every group (nothing pruned); eager attention tied the head dims of all
    query heads instead of whole heads."""
    model, inputs, _ = build("gpt-bigcode", attn)
    for x in (inputs, _padded_batch()):
        report = check_pruner(model, x, ratio=0.5)
        assert report.max_abs_diff < 1e-5 and report.pruned_units == 2 * 128 + 2 * 2
    small, _ = prune_uniform(model, inputs)
    attn_module = small.transformer.h[0].attn
    assert attn_module.c_attn.weight.shape == ((2 + 2) * 16, 64) and attn_module.c_proj.weight.shape == (64, 32)
    assert (attn_module.num_heads, attn_module.embed_dim, attn_module.kv_dim) == (2, 32, 16)
    cached, plain = check_generate("gpt-bigcode")
    assert torch.equal(cached, plain)


def test_gpt_bigcode_prunes_with_the_default_pruner():
    model, inputs, _ = build("gpt-bigcode")
    pruner = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert pruner.skipped_groups == []
    # heads kept by default: the config derives the head size from n_embd / n_head (tests/test_hf_describable.py)
    assert small.transformer.h[1].attn.c_attn.out_features == 96 and small.transformer.h[1].mlp.c_fc.out_features == 128
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert logits(small, inputs).shape == (1, 8, 100)


def test_bloom_heads_prune_and_keep_their_alibi_slopes():
    """Bloom builds one ALiBi tensor for all layers from ``n_head``; each pruned attention
    takes its kept heads' rows of it (a forward pre-hook), so different layers may keep
    different heads. Checked with a padded batch of 3 (the other ALiBi path)."""
    model, inputs, _ = build("bloom")
    for x in (inputs, _padded_batch()):
        report = check_pruner(model, x, ratio=0.5)
        assert report.max_abs_diff < 1e-5 and report.pruned_units == 2 * 128 + 2 * 2
    small, _ = prune_uniform(model, inputs)
    layers = [small.transformer.h[i].self_attention for i in range(2)]
    assert [a.query_key_value.weight.shape[0] for a in layers] == [2 * 3 * 16] * 2
    assert [a.num_heads for a in layers] == [2, 2]
    assert layers[0].cleanai_kept_heads != layers[1].cleanai_kept_heads  # per layer, numbered as in the original
    assert small.config.cleanai_pruning["why"][-1].startswith("ALiBi: ")
    cached, plain = check_generate("bloom")
    assert torch.equal(cached, plain)


def test_bart_hidden_size_prunes_and_reloads(tmp_path):
    """``BartEncoder`` reads ``inputs_embeds[:, :, -1]`` for its shape: only that last
    hidden channel stays; every group (hidden too) at 50% reloads with from_pretrained."""
    model, inputs, _ = build("bart")
    graph = DependencyGraph(model, inputs)
    hidden = next(g for g in graph.groups() if any(s.module == "model.encoder.embed_tokens" for s in g.slices))
    assert (hidden.size, hidden.prunable) == (64, 63)
    pruned = random_units(graph, 0.5, torch.Generator().manual_seed(0))
    small = copy.deepcopy(model)
    keep = graph.keep_indices(pruned)
    apply_edits(small, [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in keep.items()], graph.pm)
    assert small.config.d_model == 32 == small.model.shared.weight.shape[1]
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(small, inputs), logits(again, inputs))


def test_mixtral_experts_prune_each_expert_and_keep_the_router():
    model, inputs, _ = build("mixtral")
    assert check_oracle("mixtral", "sdpa") < 1e-5
    small, _ = prune_uniform(model, inputs)
    moe = small.model.layers[0].mlp
    assert moe.experts.gate_up_proj.shape == (4, 96, 64) and moe.experts.down_proj.shape == (4, 64, 48)
    assert moe.gate.weight.shape == (4, 64)  # the router: every expert stays
    assert small.config.intermediate_size == 48 and small.config.cleanai_pruning["from_pretrained"]


@pytest.mark.slow
def test_t5_shared_embedding_stays_one_parameter_when_the_hidden_size_shrinks():
    model, inputs, _ = build("t5")
    graph = DependencyGraph(model, inputs)
    pruned = random_units(graph, 0.5, torch.Generator().manual_seed(0))
    small = copy.deepcopy(model)
    keep = graph.keep_indices(pruned)
    apply_edits(small, [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in keep.items()], graph.pm)
    shared = small.shared.weight
    assert shared.shape == (100, 32)
    assert small.encoder.embed_tokens.weight is shared and small.decoder.embed_tokens.weight is shared
    assert small.lm_head.weight is shared
    assert small.config.cleanai_pruning["from_pretrained"] is False  # T5 scales tied logits by the old d_model


# -- the whole list --------------------------------------------------------------------


@pytest.mark.corpus
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_corpus_oracle(name, attn):
    assert check_oracle(name, attn) < 1e-4


#: families whose config cannot describe a pruned MLP alone (fixed 4x MLPs): they reload through
#: ``load_pruned`` (tests/test_hf_reload_paths.py); ConvNeXt also when its stages shrink with the MLP
NO_RELOAD = {
    "convnext": "MLP width fixed at 4x the stage width",
    "bloom": "MLP width fixed at 4x hidden",
    "deberta": "relative position embeddings: their width has no key (the default pruner keeps it)",
    "convbert": "span-based convolution heads: their count has no key (the default pruner keeps them)",
    "openai-gpt": "MLP width fixed at 4x hidden",
    "xlnet": "heads are bare (d_model, n_head, d_head) parameters; its config derives d_head (the default keeps them)",
    "diffllama": "its lambda vectors (head_dim wide) have no key of their own (the default pruner keeps them)",
    "fnet": "its pooler is hidden_size wide with no key of its own (the default pruner keeps it)",
    "mra": "its key/value widths are derived from the width and head count (the default pruner keeps them)",
    "bigbird": "its pooler is hidden_size wide with no key of its own (the default pruner keeps it)",
    "ultrabert": "its MLM head's widths have no key of their own (the default pruner keeps them)",
    "zamba2": "the shared block's attention width (2 x hidden) and its adapters have no key (the default keeps them)",
    "kimi-linear": "its delta-net's low-rank gates (head_dim wide) have no key of their own (the default keeps them)",
    "gemma3n-text": "its AltUp coefficients and LAuReL widths have no key of their own (the default keeps them)",
    **dict.fromkeys(("layoutlm", "luke", "squeezebert", "canine", "bert2bert"), "its pooler is hidden_size wide "
                    "with no key of its own (the default pruner keeps it)"),
    "xmod": "its language adapters are hidden_size / adapter_reduction_factor wide (the default pruner keeps them)",
}  # fmt: skip


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_corpus_reload(name, tmp_path):
    if name in NO_RELOAD:
        pytest.skip(NO_RELOAD[name])
    before, after, _ = check_reload(name, tmp_path, keep_heads=name not in HEADS_IN_CONFIG)
    assert_reloaded(before, after)


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(n for n, (_, kind) in FAMILIES.items() if kind != "encoder"))
def test_corpus_generate(name):
    cached, plain = check_generate(name)
    assert torch.equal(cached, plain)


#: families the default pruner cannot prune at all
DEFAULT_PRUNES_NOTHING: dict[str, str] = {}
#: the default prune at 0.4 reloads only through ``load_pruned``: every free width is one their config cannot
#: describe, so keeping them would prune nothing; they prune with a warning (session 20)
DEFAULT_NEEDS_LOAD_PRUNED = {
    "openai-gpt": "MLP fixed at 4x hidden, head size derived from the width",
    "bloom": "MLP fixed at 4x hidden, head size derived from the width",
    "convnext": "MLP fixed at 4x the stage width",
    "swin": "MLP ratio, heads and the patch-merging widths have no key",
}


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_corpus_default_prune_at_0_4_reloads_with_from_pretrained(name, tmp_path):
    """The default pruner at 0.4 (not the 0.5 the freezes were first checked at: kept
    counts aligned, widths tied by a formula) gives a model plain ``from_pretrained``
    rebuilds, with identical logits."""
    if name in DEFAULT_PRUNES_NOTHING:
        pytest.skip(DEFAULT_PRUNES_NOTHING[name])
    model, inputs, _ = build(name)
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4).prune()
    if name in DEFAULT_NEEDS_LOAD_PRUNED:
        assert small.config.cleanai_pruning["reload"] == "load_pruned"
        pytest.xfail(DEFAULT_NEEDS_LOAD_PRUNED[name])
    assert small.config.cleanai_pruning["from_pretrained"] is True, small.config.cleanai_pruning
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    assert_reloaded(logits(small, inputs), logits(again, inputs))


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(n for n, (_, kind) in FAMILIES.items() if kind != "encoder"))
def test_corpus_greedy_generate_equals_the_masked_original(name):
    """Greedy ``generate()`` (KV cache on) of a random 0.4 prune gives the tokens of the
    masked original (:func:`cleanai_core.testing.masked_model`)."""
    model, inputs, _ = build(name)
    graph = DependencyGraph(model, inputs)
    units = random_units(graph, 0.4, torch.Generator().manual_seed(0), exclude_normalized=True)
    small = copy.deepcopy(model)
    apply_edits(small, edits_for(graph, units), graph.pm)
    kwargs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"} if isinstance(inputs, dict) else {}
    kwargs = kwargs or {"input_ids": inputs[0]}
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(small.generate(**kwargs, **gen), masked_model(graph, units).generate(**kwargs, **gen))


def _table() -> None:  # pragma: no cover - the compatibility table, by hand
    import tempfile
    import traceback

    names = sys.argv[1:] or sorted(FAMILIES)
    for name in names:
        row = [name]
        for attn in ATTN:
            try:
                row.append(f"{attn} {check_oracle(name, attn):.1e}")
            except Exception as exc:
                row.append(f"{attn} FAIL {type(exc).__name__}: {str(exc)[:200]}")
                traceback.print_exc(limit=-3)
        for keep_heads in (False, True):
            try:
                with tempfile.TemporaryDirectory() as d:
                    model, inputs, _ = build(name)
                    small, _ = prune_uniform(model, inputs, keep_heads=keep_heads)
                    row.append(f"cfg{'(heads kept)' if keep_heads else ''} {small.config.cleanai_pruning}")
                    if not small.config.cleanai_pruning["from_pretrained"]:
                        continue
                    before, after, small = check_reload(name, Path(d), keep_heads)
                    row.append(f"reload {'equal' if torch.equal(before, after) else (before - after).abs().max()}")
                    break
            except Exception as exc:
                row.append(f"reload FAIL {type(exc).__name__}: {str(exc)[:200]}")
                traceback.print_exc(limit=-3)
        try:
            from test_hf_reload_paths import greedy, reload_through_load_pruned

            with tempfile.TemporaryDirectory() as d:
                small, again, inputs, kind = reload_through_load_pruned(name, Path(d))
                same = torch.equal(logits(small, inputs), logits(again, inputs))
                gen = kind == "encoder" or torch.equal(greedy(small, inputs), greedy(again, inputs))
                row.append(f"load_pruned {'equal' if same else 'DIFFERENT'}{'' if gen else ', generate DIFFERENT'}")
        except Exception as exc:
            row.append(f"load_pruned FAIL {type(exc).__name__}: {str(exc)[:200]}")
            traceback.print_exc(limit=-3)
        if FAMILIES[name][1] != "encoder":
            try:
                cached, plain = check_generate(name)
                row.append(f"generate {'same' if torch.equal(cached, plain) else 'DIFFERENT'}")
            except Exception as exc:
                row.append(f"generate FAIL {type(exc).__name__}: {str(exc)[:200]}")
                traceback.print_exc(limit=-3)
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    _table()
