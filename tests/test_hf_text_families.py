"""Text families of Hugging Face transformers outside the fast corpus subset, one bug
each: the default pruner keeps what it promises, the config says what reloads, and the
pruned model equals the masked original. Families are built in ``tests/hf_families.py``
(tiny, random, nothing downloaded); the full sweep is ``pytest -m corpus
tests/test_hf_corpus.py``."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import build  # noqa: E402

from cleanai_core import DependencyGraph, StructuredPruner  # noqa: E402
from cleanai_core.errors import UserError  # noqa: E402
from cleanai_core.metrics import count_flops  # noqa: E402
from cleanai_core.shapes import ShapeOnlyMode  # noqa: E402
from cleanai_core.slicing import apply_edits, edits_for  # noqa: E402
from cleanai_core.testing import check_pruner, random_units, run_model  # noqa: E402
from cleanai_plugins.zoo.transformers.describable import meta_copy  # noqa: E402


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def default_prune(name: str):
    model, inputs, _ = build(name)
    pruner = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.5)
    return model, inputs, pruner.prune()


def reloaded(small, tmp_path):
    small.save_pretrained(tmp_path)
    return type(small).from_pretrained(tmp_path).eval()


def test_deberta_fused_in_proj_prunes_whole_heads_and_its_head_count_follows():
    """DeBERTa's one ``in_proj`` (viewed as ``(heads, 3 * head_dim)``) was not read as a
    query projection, so ``num_attention_heads`` stayed 4 after 2 heads went: the pruned
    model split its 144 rows into 4 heads of 36 and ran, wrong (4e-3 off the masked
    original; 0.39 on a padded batch)."""
    model, inputs, _ = build("deberta")
    ids = torch.randint(3, 100, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :2] = 0
    for x in (inputs, {"input_ids": ids, "attention_mask": mask}):
        report = check_pruner(model, x, ratio=0.5)
        # heads, MLP widths, and the relative position embeddings' width (read by pos_proj, pos_q_proj)
        assert report.max_abs_diff < 1e-5 and report.pruned_units == 2 * 2 + 2 * 48 + 32
    graph = DependencyGraph(model, inputs)
    small = copy.deepcopy(model)
    apply_edits(
        small, edits_for(graph, random_units(graph, 0.5, torch.Generator().manual_seed(0), exclude_normalized=True))
    )
    attn = small.deberta.encoder.layer[0].attention.self
    assert attn.in_proj.out_features == 2 * 3 * 16 and attn.q_bias.shape == (32,)
    assert (attn.num_attention_heads, attn.attention_head_size, attn.all_head_size) == (2, 16, 32)


def test_flops_of_a_model_that_hands_a_parameter_view_to_a_module():
    """DeBERTa with relative attention passes a view of ``rel_embeddings.weight`` (taken
    under ``no_grad``) to ``pos_proj``: PyTorch's FLOP counter hooked its gradient and
    raised ``Expected gradient function to be set``, so ``cleanai prune`` failed at the
    report. The count equals the one made with gradients on; parameters keep requiring grad."""
    model, inputs, _ = build("deberta")
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), ShapeOnlyMode(), counter:  # gradients on: the tracker works
        model(*inputs)
    assert count_flops(model, inputs) == counter.get_total_flops() > 1_000_000
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["bart", "m2m100"])
def test_encoder_decoder_default_pruner_keeps_the_hidden_size_behind_a_shared_embedding(name, tmp_path):
    """``get_input_embeddings()`` is the ``shared`` embedding, which the forward never
    calls (the encoder's and decoder's ``embed_tokens`` hold its weight): naming it as the
    default ignore froze nothing, the default pruner halved ``d_model`` (166k -> 46k
    parameters), and M2M100 reloaded with another embedding scale (logits 0.34 off)."""
    model, inputs, small = default_prune(name)
    assert small.model.shared.weight.shape == (100, 64) and small.config.d_model == 64
    assert small.model.encoder.embed_tokens.weight is small.model.shared.weight
    assert small.model.encoder.layers[0].fc1.out_features == 48
    assert params(small) < params(model)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert torch.equal(run_model(small, inputs)[0], run_model(reloaded(small, tmp_path), inputs)[0])


def test_embedding_scale_the_config_derives_says_from_pretrained_cannot_rebuild_it():
    """M2M100 scales its embeddings by ``sqrt(d_model)``, a float computed at construction:
    with the hidden size pruned the config said ``from_pretrained`` rebuilds the model, and
    the reloaded one scaled by sqrt(32) instead of 8."""
    model, inputs, _ = build("m2m100")
    graph = DependencyGraph(model, inputs)
    small = copy.deepcopy(model)
    apply_edits(small, edits_for(graph, random_units(graph, 0.5, torch.Generator().manual_seed(0))))
    assert small.model.shared.weight.shape == (100, 32) and small.config.d_model == 32
    record = small.config.cleanai_pruning
    assert record["from_pretrained"] is False and record["reload"] == "load_pruned"
    assert record["mismatched"][0].startswith("model.shared.embed_scale (8 from the original config, 5.65685")


def test_tied_embeddings_slice_on_the_meta_device():
    """The dry run that finds what a config cannot describe slices a meta copy: re-tying
    BART's shared embedding compared values with ``torch.equal`` (no meta kernel), so the
    check gave up with a warning and kept nothing."""
    model, inputs, _ = build("bart")
    graph = DependencyGraph(model, inputs)
    small = meta_copy(model)
    apply_edits(small, edits_for(graph, random_units(graph, 0.5, torch.Generator().manual_seed(0))))
    assert small.model.shared.weight.shape == (100, 32) and small.model.shared.weight.is_meta
    assert small.model.encoder.embed_tokens.weight is small.model.shared.weight is small.lm_head.weight


def test_a_width_sized_from_the_head_count_keeps_those_heads_by_default(tmp_path):
    """Phi's ``q_layernorm`` is ``hidden_size / num_attention_heads`` wide: no group cuts
    it, so the check of what the config describes blamed no group for its mismatch, and
    the default pruner cut heads that ``from_pretrained`` could not rebuild."""
    model, inputs, small = default_prune("phi-qk-norm")
    attn = small.model.layers[0].self_attn
    assert attn.q_proj.out_features == 64 and attn.q_layernorm.normalized_shape == (16,)
    assert small.model.layers[0].mlp.fc1.out_features == 48 and params(small) == params(model) - 2 * 48 * (64 + 1 + 64)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert torch.equal(run_model(small, inputs)[0], run_model(reloaded(small, tmp_path), inputs)[0])


@pytest.mark.parametrize(
    ("name", "key", "up"),
    [("nemotron", "intermediate_size", "model.layers.1.mlp.up_proj"),  # no gate_proj
     ("funnel", "d_inner", "funnel.encoder.blocks.1.0.ffn.linear_1")],
)  # fmt: skip
def test_mlp_width_of_families_without_a_known_first_layer_prunes_by_default(name, key, up, tmp_path):
    """The config fix-up knew no MLP of these families (Nemotron's ``up_proj`` without a
    gate, Funnel's ``ffn.linear_1`` and ``d_inner``): their MLP widths were said to have no
    key and kept (Funnel: nothing left to prune, the default pruner refused)."""
    model, inputs, small = default_prune(name)
    assert dict(small.named_modules())[up].out_features == 48 and getattr(small.config, key) == 48
    assert params(small) < params(model)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert torch.equal(run_model(small, inputs)[0], run_model(reloaded(small, tmp_path), inputs)[0])


def test_config_keeps_a_count_the_modules_derive_from_it(tmp_path):
    """ConvBERT's attention has ``num_attention_heads // head_ratio`` heads: the config
    fix-up wrote the module's 2 into the config's 4, so a model whose heads were all kept
    (the default pruned only its MLP) could not be rebuilt, and reloaded only through
    ``load_pruned``. The old value is put back where it rebuilds more of the model."""
    model, inputs, small = default_prune("convbert")
    assert (
        small.config.num_attention_heads == 4
        and small.convbert.encoder.layer[0].attention.self.num_attention_heads == 2
    )
    assert small.config.intermediate_size == 48 and params(small) == params(model) - 2 * 48 * (64 + 1 + 64)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert torch.equal(run_model(small, inputs)[0], run_model(reloaded(small, tmp_path), inputs)[0])


def test_tokenizer_that_needs_a_missing_package_is_a_user_error(monkeypatch):
    """BioGPT's tokenizer class needs ``sacremoses``: its ImportError escaped the loader, so
    ``cleanai prune`` of a BioGPT folder failed with a traceback even on token-id data."""
    from cleanai_plugins.io.hf import load_tokenizer

    def needs_package(*args, **kwargs):
        raise ImportError("You need to install sacremoses to use BioGptTokenizer.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", needs_package)
    model, _, _ = build("llama-gqa")
    assert load_tokenizer(model, required=False) is None
    with pytest.raises(UserError, match="needs a package that is not installed: You need to install sacremoses"):
        load_tokenizer(model)


def test_padded_positions_do_not_count_in_the_activation_statistics():
    """A padded batch counted its padding tokens' activations in every consumer's
    statistics (a classifier's jsonl pads every text to the longest one). Right padding
    leaves the real tokens' activations of a causal model unchanged, so the statistics of
    the padded batch equal those of its two rows run apart: 8 + 5 positions, not 16."""
    from cleanai_core.calibration import StatsCollector

    model, inputs, _ = build("llama-gqa")
    slices = list(DependencyGraph(model, inputs).ctx.slices.values())
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0

    def stats(batches):
        collector = StatsCollector(model, slices)
        with collector.hooks(), torch.no_grad():
            for batch in batches:
                model(**batch)
        return collector.stats

    padded = stats([{"input_ids": ids, "attention_mask": mask}])
    apart = stats([{"input_ids": ids[:1]}, {"input_ids": ids[1:, :5]}])
    assert len(padded) == 15 and {s.count for s in padded.values()} == {13.0}
    for key, s in padded.items():
        torch.testing.assert_close(s.mean, apart[key].mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.var, apart[key].var, rtol=1e-5, atol=1e-5)


def test_an_encoder_decoder_batch_keeps_every_position_in_the_statistics():
    """The encoder's attention mask does not describe the decoder's positions, even when
    both streams have the same length (8 here): an encoder-decoder batch is not masked."""
    from cleanai_core.calibration import StatsCollector

    model, inputs, _ = build("bart")
    slices = list(DependencyGraph(model, inputs).ctx.slices.values())
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    batch = {"input_ids": torch.randint(3, 100, (2, 8)), "attention_mask": mask,
             "decoder_input_ids": torch.randint(3, 100, (2, 8))}  # fmt: skip
    collector = StatsCollector(model, slices)
    with collector.hooks(), torch.no_grad():
        model(**batch)
    assert {s.count for s in collector.stats.values()} == {16.0}
    assert any(k[0].startswith("model.decoder.layers.0.fc") for k in collector.stats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_widths_keep_the_grouped_matmul_alignment(dtype, tmp_path):
    """transformers runs Mixtral's 3-D experts through torch's grouped matmul, which needs
    rows of 16 bytes. At 0.4, 96 expert units kept 58 (232 bytes in float32): the pruned
    model failed (``strides should be multiple of 16 bytes``), the bisection skipped two of
    the four experts, and slicing the others refused the uneven experts (``ValueError:
    experts would keep [58, 58, 96, 96] units``). The plan rounds the kept count up to a
    multiple of 4 units (float32; 8 in bfloat16)."""
    model, inputs, _ = build("mixtral")
    model = model.to(dtype)
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4).prune()
    inter = 60 if dtype == torch.float32 else 64
    for layer in small.model.layers:
        assert layer.mlp.experts.down_proj.shape == (4, 64, inter)
    assert small.config.intermediate_size == inter
    logits = small(*inputs).logits
    assert logits.shape == (1, 8, 100) and bool(logits.isfinite().all())
    again = reloaded(small, tmp_path)
    assert again.model.layers[0].mlp.experts.down_proj.shape == (4, 64, inter)
    if dtype == torch.float32:  # model.to(bfloat16) casts the rotary buffer; a fresh bfloat16 model does not
        assert torch.equal(again(*inputs).logits, logits)


def test_a_linear_subclass_that_routes_inside_its_forward_keeps_its_rows():
    """PhiMoE's router is an ``nn.Linear`` subclass whose forward picks the experts from its
    logits and returns the picks: claimed as a plain linear layer, its 4 rows (one per
    expert) were free, and pruning them made it pick among the kept experts only (0.087
    off the masked original). Its rows stay; its input columns prune with the hidden size."""
    model, inputs, _ = build("phimoe")
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5
    graph = DependencyGraph(model, inputs)
    router = [g for g in graph.groups() if "model.layers.0.mlp.router" in g.modules() and g.size == 4]
    assert len(router) == 1 and router[0].prunable == 0
    assert "returns more than its linear output" in router[0].reasons[0]


@pytest.mark.parametrize("name", ["bamba", "jamba"])
def test_feed_forward_mlp_width_is_written_and_the_default_prunes_it(name, tmp_path):
    """The hybrid Mamba models name their MLP ``feed_forward``: the config fix-up looked for
    ``mlp.*`` only, so ``intermediate_size`` stayed 96, and the default pruner, finding that
    the rebuilt model would not match, kept every MLP (Bamba 88,988 -> 82,844 parameters)."""
    model, inputs, pruned = default_prune(name)
    mlp = next(m for n, m in pruned.named_modules() if n.endswith("feed_forward") and hasattr(m, "up_proj"))
    assert mlp.up_proj.out_features == 48 and pruned.config.intermediate_size == 48
    assert pruned.config.cleanai_pruning["from_pretrained"] is True
    assert params(pruned) < params(model)
    assert torch.equal(reloaded(pruned, tmp_path)(*inputs).logits, pruned(*inputs).logits)


def test_gpt_oss_transposed_interleaved_experts_with_biases_prune(tmp_path):
    """GPT-OSS stores its experts transposed, gate and up interleaved, with biases: no
    pruner claimed them, so the default pruned the attention only (188,112 -> 175,692
    parameters). Each expert's width now prunes with its gate/up pairs and biases."""
    model, inputs, _ = build("gpt-oss")
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 386
    pruned = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.5).prune()
    experts = pruned.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 64, 96) and experts.gate_up_proj_bias.shape == (4, 96)
    assert experts.down_proj.shape == (4, 48, 64) and pruned.config.intermediate_size == 48
    assert params(pruned) == 101_196
    assert torch.equal(reloaded(pruned, tmp_path)(*inputs).logits, pruned(*inputs).logits)


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_global_ranking_gives_every_expert_of_a_module_the_same_width(name):
    """Global ranking chose each expert's units on its own, so the experts of one 3-D
    tensor kept different counts and slicing raised ``ValueError: experts would keep [72,
    68, 68, 68] units``. Tied groups (``same_count``) now keep the most any of them keeps;
    the pruned model equals the masked original."""
    model, inputs, _ = build(name)
    pruner = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.3, global_pruning=True)
    plan = pruner.plan()
    experts = [gp for gp in plan.groups if any(s.name.startswith("inter.") for s in gp.group.slices)]
    by_module: dict[str, set[int]] = {}
    for gp in experts:
        by_module.setdefault(gp.group.modules()[0], set()).add(gp.n_pruned)
    assert len(by_module) == 2 and all(len(counts) == 1 for counts in by_module.values())
    assert sum(gp.n_pruned for gp in experts) > 0
    small = pruner.prune()
    assert params(small) < params(model)
    from cleanai_core.masking import masked_outputs

    expected = masked_outputs(pruner.graph, plan.pruned_units(), inputs)
    assert (small(*inputs).logits - expected[0]).abs().max() < 1e-5


def test_a_skipped_group_beside_3d_experts_does_not_split_the_experts(monkeypatch):
    """When verification failed, the bisection built halves of the plan: a half holding
    two of a layer's four experts raised ``ValueError: experts would keep [...] units``
    out of ``prune()``. The experts of one tensor are tried and skipped together; here the
    first layer's query projection is made to fail, and only its group is skipped."""
    from cleanai_core.errors import PruningError

    model, inputs, _ = build("mixtral")
    pruner = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.5)
    q_out = ("model.layers.0.self_attn.q_proj", "out")
    q = next(g for g in pruner.graph.groups() if any((s.module, s.name) == q_out for s in g.slices))
    real = pruner.build

    def fails_on_q(pruned, *args, **kwargs):
        if bool(pruned[q.units].any()):
            raise PruningError("made to fail")
        return real(pruned, *args, **kwargs)

    monkeypatch.setattr(pruner, "build", fails_on_q)
    small = pruner.prune()
    assert [s.split(" ")[2] for s in pruner.skipped_groups] == [str(q.id)]
    assert small.model.layers[0].self_attn.q_proj.out_features == 64
    assert small.model.layers[0].mlp.experts.down_proj.shape == (4, 64, 48)


def test_random_units_keep_the_expert_alignment_and_the_masked_model_generates():
    """``random_units`` (the oracle helper, ``check_pruner``) ignored the slices'
    alignment: at 0.4 Mixtral's experts kept 58 of 96 units and the pruned copy failed in
    torch's grouped matmul (``strides should be multiple of 16 bytes``), so no MoE family
    could be checked off 0.5. ``masked_model`` is the oracle as a model: greedy
    ``generate()`` of the pruned copy equals it."""
    from cleanai_core.testing import masked_model

    model, inputs, _ = build("mixtral")
    report = check_pruner(model, inputs, ratio=0.4)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 2 * 4 * 36  # 96 -> 60 per expert (4 | 60)
    graph = DependencyGraph(model, inputs)
    units = random_units(graph, 0.4, torch.Generator().manual_seed(0), exclude_normalized=True)
    small = copy.deepcopy(model)
    apply_edits(small, edits_for(graph, units))
    assert small.model.layers[0].mlp.experts.down_proj.shape == (4, 64, 60)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got, want = small.generate(inputs[0], **gen), masked_model(graph, units).generate(inputs[0], **gen)
    assert got.shape == (1, 14) and torch.equal(got, want)


@pytest.mark.parametrize(("ratio", "kept"), [(0.3, 24), (0.4, 20)])
def test_a_width_tied_to_the_experts_by_a_formula_keeps_their_share(ratio, kept, tmp_path):
    """Ernie-4.5-MoE's shared experts are ``moe_intermediate_size * moe_num_shared_experts``
    (32 x 2) wide. At 0.4 the plan kept 20 of each expert's 32 units (aligned to 4) and 39
    of the shared 64, a width the config cannot say, so round 4 kept both (only the dense
    first layer and the attention pruned). Since session 16 the shared experts are tied to
    the experts (``SliceSpec.same_share``): they keep twice the experts' count (48 at 0.3,
    40 at 0.4), and ``from_pretrained`` reloads."""
    model, inputs, _ = build("ernie4_5-moe")
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=ratio).prune()
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    mlp = small.model.layers[1].mlp
    assert mlp.experts.down_proj.shape == (4, 64, kept) and small.config.moe_intermediate_size == kept
    assert mlp.shared_experts.up_proj.out_features == 2 * kept == mlp.shared_experts.down_proj.in_features
    assert small.model.layers[0].mlp.up_proj.out_features == 96 - int(ratio * 96) and params(small) < params(model)
    assert torch.equal(reloaded(small, tmp_path)(*inputs).logits, small(*inputs).logits)
    half = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.5).prune()
    shared = half.model.layers[1].mlp.shared_experts
    assert shared.up_proj.out_features == 32 and half.config.moe_intermediate_size == 16


def test_openai_gpt_attention_without_a_head_size_attribute_follows_its_heads():
    """OpenAI GPT's attention has ``n_head`` and ``split_size`` but no head size: the
    fix-up read no head counts, ``split_size`` stayed 64 and the pruned model failed
    (``mat1 and mat2 shapes cannot be multiplied (8x16 and 48x64)``). The head size is
    ``split_size / n_head``, both kept in ratio."""
    model, inputs, _ = build("openai-gpt")
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 2 * 2 + 2 * 128
    graph = DependencyGraph(model, inputs)
    small = copy.deepcopy(model)
    apply_edits(small, edits_for(graph, random_units(graph, 0.4, torch.Generator().manual_seed(0), True)))
    attn = small.transformer.h[0].attn
    assert attn.c_attn.weight.shape == (64, 3 * 48) and (attn.n_head, attn.split_size) == (3, 48)


def test_granitemoe_shared_mlp_width_is_written_to_its_key(tmp_path):
    """GraniteMoeShared's ``shared_mlp.input_linear`` (gate and up stacked) is
    ``shared_intermediate_size`` wide: the config fix-up knew no such key, so a pruned
    shared MLP reloaded only through ``load_pruned`` (and the default kept it)."""
    model, inputs, _ = build("granitemoe-shared")
    graph = DependencyGraph(model, inputs)
    small = copy.deepcopy(model)
    apply_edits(small, edits_for(graph, random_units(graph, 0.5, torch.Generator().manual_seed(0), True)))
    assert small.model.layers[0].shared_mlp.input_linear.out_features == 2 * 24
    assert small.config.shared_intermediate_size == 24
    assert small.config.cleanai_pruning["from_pretrained"] is True
    # within a float's rounding: from_pretrained maps the weights at 8-byte aligned addresses, where
    # the CPU kernels may round differently (the unpruned model reloads 3e-8 off too; 0 once cloned)
    torch.testing.assert_close(reloaded(small, tmp_path)(*inputs).logits, small(*inputs).logits, rtol=0, atol=1e-6)
    pruned = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.5).prune()
    assert pruned.model.layers[1].shared_mlp.output_linear.in_features == 24


def test_a_prune_that_removes_nothing_still_says_how_the_model_reloads():
    """HunYuan-MoE at 0.03: the MLP widths lose 2 of 96 units, which the experts' alignment
    (kept counts a multiple of 4) rounds to none; the heads and key/value groups lose
    nothing. The model came back unchanged without ``config.cleanai_pruning``
    (``AttributeError`` for a caller reading it)."""
    model, inputs, _ = build("hunyuan-moe")
    with pytest.warns(RuntimeWarning, match="the pruned model equals the original"):
        small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.03).prune()
    assert params(small) == params(model)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert not hasattr(model.config, "cleanai_pruning")


@pytest.mark.parametrize(
    ("name", "dense", "experts"),
    [("jamba", "model.layers.0.feed_forward.up_proj", "model.layers.1.feed_forward.experts"),
     ("hunyuan-moe", "model.layers.0.mlp.shared_mlp.up_proj", "model.layers.0.mlp.experts")],
)  # fmt: skip
def test_widths_of_one_config_key_keep_one_aligned_count(name, dense, experts, tmp_path):
    """A dense MLP and experts of one config key (Jamba's ``feed_forward`` and its experts,
    HunYuan-MoE's shared MLP and experts: ``intermediate_size``, 96): at 0.4 the plan kept
    58 of the dense units and 60 of each expert's (aligned to 16 bytes), a width one key
    cannot hold. Jamba reloaded only through ``load_pruned``; HunYuan-MoE's check kept both
    and the default pruned nothing (222,592 parameters). Groups of one size now keep one
    count, aligned for all of them (60), in the plan, the check and ``random_units``."""
    model, inputs, _ = build(name)
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4).prune()
    modules = dict(small.named_modules())
    assert modules[dense].out_features == 60 and modules[experts].down_proj.shape[-1] == 60
    assert small.config.intermediate_size == 60
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert params(small) < params(model) - 2 * 36 * 64 * 3
    assert torch.equal(reloaded(small, tmp_path)(*inputs).logits, small(*inputs).logits)
    graph = DependencyGraph(model, inputs)
    units = random_units(graph, 0.4, torch.Generator().manual_seed(0), exclude_normalized=True)
    assert {int(units[g.units].sum()) for g in graph.groups() if g.size == 96} == {36}


def test_a_norm_whose_normalized_shape_is_an_int_is_claimed_without_error():
    """I-BERT's ``IntLayerNorm`` keeps ``normalized_shape`` as the int it was given: the
    RMS-norm claim called ``len()`` on it and every graph of the model failed with
    ``TypeError: object of type 'int' has no len()``. (Its quantised encoder layers are
    claimed by no pruner: I-BERT stays out of the corpus.)"""
    cfg = transformers.IBertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=96, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.IBertForMaskedLM(cfg).eval()
    norm = model.ibert.encoder.layer[0].output.LayerNorm
    assert isinstance(norm.normalized_shape, int)
    graph = DependencyGraph(model, (torch.randint(3, 100, (1, 8)),))  # raised TypeError
    head = [g for g in graph.groups() if any((s.module, s.name) == ("lm_head.dense", "out") for s in g.slices)]
    assert len(head) == 1 and (head[0].size, head[0].prunable) == (64, 64)


@pytest.mark.parametrize("name", ["llama-mha", "llama-mqa"])
def test_heads_a_config_validation_refuses_are_kept_by_default(name, tmp_path):
    """Llama with 4 heads of 16 at 0.4 keeps 3 heads: transformers' config validation
    (``hidden_size % num_attention_heads == 0``, run by ``save_pretrained``) refuses that
    although ``head_dim`` is a key, so the default prune could not even be saved
    (``StrictDataclassClassValidationError``). The rebuild check runs the validation; the
    groups that make it fail are found by bisection and kept, the MLP prunes."""
    model, inputs, _ = build(name)
    pruner = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4)
    small = pruner.prune()
    assert small.config.num_attention_heads == 4 and small.model.layers[0].self_attn.q_proj.out_features == 64
    assert small.model.layers[0].mlp.up_proj.out_features == 96 - 38
    assert any("validate_architecture" in r for g in pruner.graph.groups() for r in g.reasons)
    assert torch.equal(reloaded(small, tmp_path)(*inputs).logits, small(*inputs).logits)


def test_a_query_projection_with_a_gate_per_head_counts_its_heads_from_the_output_projection(tmp_path):
    """Qwen3-Next's ``q_proj`` holds a query and a gate per head (2 x heads x head_dim rows):
    the fix-up read 4 heads from the 64 rows left of 2 pruned heads, set
    ``num_key_value_groups`` to 4, and eager attention failed (``The size of tensor a (2)
    must match the size of tensor b (4)``); the config said 4 heads, so the default kept them.
    The head count is ``o_proj``'s input width over the head size."""
    model, inputs, _ = build("qwen3-next", "eager")
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 177
    model, inputs, _ = build("qwen3-next")  # sdpa, as from_pretrained gives
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.5).prune()
    attn = small.model.layers[1].self_attn
    assert attn.q_proj.out_features == 2 * 2 * 16 and attn.o_proj.in_features == 32 and attn.num_key_value_groups == 2
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert torch.equal(reloaded(small, tmp_path)(*inputs).logits, small(*inputs).logits)


def test_pegasus_x_global_local_attention_keeps_the_heads_of_the_width_it_reshapes_to():
    """PEGASUS-X's encoder attention reshapes its output to ``token_hidden_states.shape[2]``
    (``hidden_dim=``, then ``.view(..., dim.hidden_dim)``), a pattern the input-width check
    did not read: its heads were pruned alone and every pruned model failed (``shape '[1, 2,
    64]' is invalid for input of size 64``). Its query projection now goes with the hidden
    size, which the default keeps; the decoder's heads and every MLP prune."""
    model, inputs, _ = build("pegasus-x")
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 200
    graph = DependencyGraph(model, inputs)
    small = copy.deepcopy(model)
    apply_edits(small, edits_for(graph, random_units(graph, 0.5, torch.Generator().manual_seed(0), True)))
    assert small.model.encoder.layers[0].self_attn.q_proj.out_features == 64
    assert small.model.decoder.layers[0].self_attn.q_proj.out_features == 32
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = small.generate(input_ids=inputs["input_ids"], **gen)
    assert out.shape[1] >= 5


@pytest.mark.parametrize("n", [8, 48])  # 48 > (5 + 2 x 1 random block) x block 2: block-sparse runs
def test_bigbird_block_sparse_attention_keeps_its_heads_and_says_why(n, tmp_path):
    """BigBird's block-sparse attention switches to full attention for short inputs by
    building a new self-attention from the config (head size ``hidden_size /
    num_attention_heads``): its pruned heads came back at the old width (``ValueError: The
    hidden size (64) is not a multiple of the number of attention heads (3)``; at 0.5 ``shape
    '[1, 8, 64]' is invalid``). Its projections are frozen with the reason; the MLP prunes."""
    from cleanai_plugins.zoo.transformers.rebuilt import REBUILT

    model, _, _ = build("bigbird")
    inputs = (torch.randint(3, 100, (1, n), generator=torch.Generator().manual_seed(1)),)
    graph = DependencyGraph(model, inputs)
    q = "bert.encoder.layer.0.attention.self.query"
    heads = next(g for g in graph.groups() if any(s.module == q and s.name == "out" for s in g.slices))
    assert heads.prunable == 0 and REBUILT in heads.reasons
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 2 * 48 + 32  # MLPs, the MLM head's dense
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.5).prune()
    assert small.bert.encoder.layer[1].intermediate.dense.out_features == 48
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    long = torch.randint(3, 100, (1, 48), generator=torch.Generator().manual_seed(3))
    for x in (inputs[0], long, long[:, :8]):  # sparse and full, switching both ways
        assert small(x).logits.shape == (1, x.shape[1], 100)
    short = long[:, :8]  # full attention: the sparse one draws its random blocks anew each call
    assert torch.equal(reloaded(small, tmp_path)(short).logits, small(short).logits)


def test_routed_experts_no_example_token_reached_prune_with_the_others(tmp_path):
    """SwitchTransformers keeps one ``wi``/``wo`` module per expert and calls only the
    experts tokens were routed to: traced one by one, the experts the 8 example tokens
    missed kept 96 units while the others shrank, and ``d_ff`` was never written (no key
    for ``mlp.wi``), so the default kept every MLP (229,120 -> 179,840 parameters: heads
    only). The experts' dict is claimed as one module; every expert prunes, reached or not."""
    model, inputs, _ = build("switch-transformers")
    report = check_pruner(model, inputs, ratio=0.5)
    assert report.max_abs_diff < 1e-5 and report.pruned_units == 486
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.5).prune()
    experts = small.encoder.block[1].layer[1].mlp.experts
    assert [experts[f"expert_{i}"].wi.out_features for i in range(4)] == [48] * 4
    assert small.encoder.block[0].layer[1].mlp.wi.out_features == 48 and small.config.d_ff == 48
    assert params(small) == 118_400
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    again = reloaded(small, tmp_path)
    assert torch.equal(run_model(again, inputs)[0], run_model(small, inputs)[0])
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(small.generate(input_ids=inputs["input_ids"], **gen),
                           again.generate(input_ids=inputs["input_ids"], **gen))  # fmt: skip


def test_nemotron_h_mixer_mlp_widths_are_written_to_their_keys(tmp_path):
    """Nemotron-H names every layer's module ``mixer``: its MLP layers' ``mixer.up_proj``
    (``intermediate_size``) and its MoE layers' ``mixer.shared_experts.up_proj``
    (``moe_shared_expert_intermediate_size``) were said to have no key and kept, so the
    default at 0.4 pruned nothing (60,416 parameters). Its 3-D experts have no gate (one
    ``up_proj``): no pruner claimed them; each expert's width now prunes too."""
    model, inputs, _ = build("nemotron-h")
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4).prune()
    layers = small.model.layers
    assert layers[2].mixer.up_proj.out_features == 58 and small.config.intermediate_size == 58
    assert layers[0].mixer.shared_experts.up_proj.out_features == 29
    assert small.config.moe_shared_expert_intermediate_size == 29
    experts = layers[0].mixer.experts
    assert experts.up_proj.shape == (4, 20, 64) and experts.down_proj.shape == (4, 64, 20)
    assert small.config.moe_intermediate_size == 20
    assert params(small) == 60_416 - (38 + 19) * 2 * 64 - 4 * 12 * 2 * 64
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert torch.equal(reloaded(small, tmp_path)(*inputs).logits, small(*inputs).logits)


def test_per_layer_head_counts_and_plural_shared_experts_are_written(tmp_path):
    """Laguna reads its head counts from ``num_attention_heads_per_layer`` and its shared
    experts' width (``mlp.shared_experts``, plural) from ``shared_expert_intermediate_size``:
    neither was written, so the default kept the heads and the shared experts (179,844 ->
    163,332 parameters at 0.4) and a 0.5 prune of either reloaded only through
    ``load_pruned``."""
    model, inputs, _ = build("laguna")
    graph = DependencyGraph(model, inputs)
    small = copy.deepcopy(model)
    apply_edits(small, edits_for(graph, random_units(graph, 0.5, torch.Generator().manual_seed(0), True)))
    assert small.config.num_attention_heads_per_layer == [2, 2] and small.config.num_attention_heads == 2
    assert small.model.layers[1].mlp.shared_experts.gate_proj.out_features == 256  # of 512
    assert small.config.shared_expert_intermediate_size == 256
    assert small.config.cleanai_pruning == {"uniform": True, "from_pretrained": True}
    assert torch.equal(reloaded(small, tmp_path)(*inputs).logits, small(*inputs).logits)
    pruned = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4).prune()
    assert params(pruned) == 124_164
