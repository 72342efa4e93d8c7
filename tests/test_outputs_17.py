"""Session 25 (outputs17): the report counts attention heads (query and key/value) per
attention module, and what CleanAI writes agrees with independent counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.report import render_markdown


def _llama(heads: int = 8, kv: int = 2, layers: int = 1):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=64, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, max_position_embeddings=32, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(n: int = 2, length: int = 8, vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def _prune(model, x, **kw):
    pruner = StructuredPruner(model, x, **{"pruning_ratio": 0.5, **kw})
    pruner.collect_activations([x])
    return pruner, pruner.prune()


def _heads(report, module):
    return next(a for a in report["attention_heads"] if a["module"] == module)


def _record(report, name, step=None):
    return next(r for r in report["layers"] if r["name"] == name and r.get("step") == step)


# -- grouped-query attention: heads, not "2 -> 1 units" ----------------------------------------------


def test_a_gqa_llamas_report_counts_query_and_kv_heads_and_names_the_ones_that_went(tmp_path):
    pytest.importorskip("transformers")
    model = _llama(8, 2)
    pruner, pruned = _prune(model, {"input_ids": _ids()})
    report = pruner.report()
    attn = _heads(report, "model.layers.0.self_attn")
    q, kv = attn["query_heads"], attn["kv_heads"]
    # 8 query heads in 2 KV groups of 4: one whole group went, as the pruned config says
    assert (q["before"], q["after"], kv["before"], kv["after"]) == (8, 4, 2, 1)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (4, 1)
    assert (q["head_dim_before"], q["head_dim_after"], kv["head_dim_after"]) == (8, 8, 8)
    g = kv["pruned"][0]
    assert q["pruned"] == [4 * g + j for j in range(4)]  # the query heads of the KV head that went
    # the heads named are the rows the q_proj and k_proj records removed (8 rows a head)
    rec_q, rec_k = (
        _record(report, "model.layers.0.self_attn.q_proj"),
        _record(report, "model.layers.0.self_attn.k_proj"),
    )
    assert sorted({c // 8 for c in rec_q["pruned_indices"]}) == q["pruned"]
    assert sorted({c // 8 for c in rec_k["pruned_indices"]}) == kv["pruned"]
    # a query head's score is its KV group's (the unit that went): the k_proj record's score
    assert q["pruned_scores"] == [rec_k["importance_scores"]["pruned"][0]] * 4 == kv["pruned_scores"] * 4
    assert kv["kept_scores"] == [rec_k["importance_scores"]["kept"][0]] and len(q["kept_scores"]) == 4
    assert min(q["kept_scores"]) >= max(q["pruned_scores"])  # the weaker group went
    md = render_markdown(report)
    assert "## Attention heads" in md
    removed = ", ".join(f"{h} ({s:.3g})" for h, s in zip(q["pruned"], q["pruned_scores"], strict=True))
    assert f"| `model.layers.0.self_attn` | 8 -> 4 | 2 -> 1 | 8 | {removed} | {g} (" in md


def test_query_heads_pruned_per_kv_group_keep_every_kv_head_in_the_count():
    pytest.importorskip("transformers")
    import cleanai_plugins.zoo.transformers_gqa as gqa
    from cleanai_core.plugins import temporary_plugin

    model = _llama(8, 2)
    with temporary_plugin(gqa, name="transformers_gqa"):
        pruner, pruned = _prune(model, {"input_ids": _ids()})
    attn = _heads(pruner.report(), "model.layers.0.self_attn")
    q, kv = attn["query_heads"], attn["kv_heads"]
    assert (q["before"], q["after"], kv["before"], kv["after"]) == (8, 4, 2, 2)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (4, 2)
    # the same number of query heads from each group of 4 (heads 0-3 serve KV head 0)
    assert [sum(1 for h in q["pruned"] if h // 4 == g) for g in range(2)] == [2, 2]
    assert kv["pruned"] == [] and len(q["pruned_scores"]) == 4


def test_multi_query_attention_keeps_its_one_kv_head_and_counts_the_query_heads():
    pytest.importorskip("transformers")
    pruner, pruned = _prune(_llama(8, 1), {"input_ids": _ids()})
    attn = _heads(pruner.report(), "model.layers.0.self_attn")
    q, kv = attn["query_heads"], attn["kv_heads"]
    assert (kv["before"], kv["after"]) == (1, 1)
    assert q["before"] == 8 and q["after"] == pruned.config.num_attention_heads == 8 - len(q["pruned"])


def test_iterative_pruning_names_the_step_each_head_went_in_and_its_original_index():
    pytest.importorskip("transformers")
    pruner, pruned = _prune(_llama(8, 4), {"input_ids": _ids()}, iterative_steps=2)
    report = pruner.report()
    q = _heads(report, "model.layers.0.self_attn")["query_heads"]
    assert q["after"] == pruned.config.num_attention_heads == 8 - len(q["pruned"]) < 8
    assert len(q["pruned_steps"]) == len(q["pruned"]) and set(q["pruned_steps"]) <= {1, 2}
    # the heads by their original index: the original q_proj's rows of the heads kept are the pruned one's
    kept = [h for h in range(8) if h not in q["pruned"]]
    rows = torch.cat([torch.arange(8 * h, 8 * h + 8) for h in kept])
    orig, now = _llama(8, 4).model.layers[0].self_attn.q_proj, pruned.model.layers[0].self_attn.q_proj
    assert torch.equal(now.weight, orig.weight[rows])
    assert "kept_scores" not in q  # one score per step: only the removed heads' are listed


# -- fused projections -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["phi3", "bloom", "gpt2", "falcon", "gpt-bigcode", "gpt-neox"])
def test_fused_qkv_projections_count_the_heads_the_pruned_module_has(family):
    pytest.importorskip("transformers")
    import hf_families

    from cleanai_plugins.zoo.transformers.attention import head_counts, is_attention

    if family not in hf_families.FAMILIES:
        pytest.skip(f"{family} is not in this transformers' corpus")
    model, inputs, _ = hf_families.build(family)
    before = {n: head_counts(m) for n, m in model.named_modules() if is_attention(m) and head_counts(m)}
    pruner, pruned = _prune(model, inputs[0] if isinstance(inputs, tuple) else inputs)
    heads = pruner.report()["attention_heads"]
    assert {a["module"] for a in heads} == set(before)
    mods = dict(pruned.named_modules())
    for a in heads:
        q, kv = a["query_heads"], a["kv_heads"]
        h, k, hd = head_counts(mods[a["module"]])  # what the fix-ups left in the pruned module
        h0, k0, hd0 = before[a["module"]]
        k, k0 = k or h, k0 or h0  # GPT-2's c_attn: as many key heads as query heads (head_counts reads None)
        assert (q["before"], kv["before"], q["head_dim_before"]) == (h0, k0, hd0)
        assert (q["after"], kv["after"], q["head_dim_after"]) == (h, k, hd)
        assert q["after"] == q["before"] - len(q["pruned"]) and kv["after"] == kv["before"] - len(kv["pruned"])


# -- timm, torchvision and nn.MultiheadAttention ----------------------------------------------------


def test_a_timm_vits_heads_are_the_qkv_rows_that_went():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = {"img_size": 16, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 6, "num_classes": 3}
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **kw).eval()
    pruner, pruned = _prune(model, torch.randn(4, 3, 16, 16))
    report = pruner.report()
    for k in range(2):
        attn = _heads(report, f"blocks.{k}.attn")
        q, kv = attn["query_heads"], attn["kv_heads"]
        assert (q["before"], q["after"]) == (6, pruned.blocks[k].attn.num_heads) == (6, 3)
        assert kv["pruned"] == q["pruned"] and (q["head_dim_before"], q["head_dim_after"]) == (8, 8)
        rec = _record(report, f"blocks.{k}.attn.qkv")  # rows (q, k, v) x (6 heads of 8)
        assert q["pruned"] == rec["pruned_units"] == sorted({c // 8 for c in rec["pruned_indices"] if c < 48})
        assert sorted({(c - 48) // 8 for c in rec["pruned_indices"] if 48 <= c < 96}) == kv["pruned"]


def test_nn_multihead_attention_keeps_its_heads_and_reports_the_narrower_head():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(16, 32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.out = nn.Linear(32, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.attn(h, h, h)[0])

    torch.manual_seed(0)
    pruner, pruned = _prune(Block().eval(), torch.randn(2, 5, 16))
    attn = _heads(pruner.report(), "attn")
    q = attn["query_heads"]
    assert (q["before"], q["after"]) == (4, pruned.attn.num_heads) == (4, 4) and q["pruned"] == []
    assert (q["head_dim_before"], q["head_dim_after"]) == (8, pruned.attn.head_dim) == (8, 4)
    assert "| `attn` | 4 -> 4 | 4 -> 4 | 8 -> 4 | - | - |" in render_markdown(pruner.report())


def test_torchvision_swin_counts_the_heads_of_its_window_attention():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.swin_t(num_classes=5).eval()
    pruner, pruned = _prune(model, torch.randn(1, 3, 64, 64))
    heads = pruner.report()["attention_heads"]
    mods = dict(pruned.named_modules())
    assert len(heads) == 12
    for a in heads:
        q = a["query_heads"]
        assert q["after"] == mods[a["module"]].num_heads == q["before"] - len(q["pruned"])
        assert q["head_dim_before"] == q["head_dim_after"] == 32
    assert sum(a["query_heads"]["after"] for a in heads) < sum(a["query_heads"]["before"] for a in heads)


def test_a_plugin_describes_the_heads_of_its_own_attention():
    from cleanai_core import hookimpl
    from cleanai_core.heads import HeadLayout, HeadSlice, heads_in_rows
    from cleanai_core.plugins import temporary_plugin

    class MyAttention(nn.Module):  # two heads of 4: heads whole by a reshape
        def __init__(self):
            super().__init__()
            self.wq, self.wk, self.wv, self.wo = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = (w(x).view(b, n, -1, 4).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
            return self.wo(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))

    class Plugin:
        @hookimpl
        def cleanai_attention_heads(self, model):
            return [
                HeadLayout(
                    n, HeadSlice(f"{n}.wq", "out", heads_in_rows(8, 4)), HeadSlice(f"{n}.wk", "out", [0] * 4 + [1] * 4)
                )
                for n, m in model.named_modules()
                if isinstance(m, MyAttention)
            ]

        @hookimpl
        def cleanai_whole_heads(self, model):
            return [m for m in model.modules() if isinstance(m, MyAttention)]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), MyAttention(), nn.Linear(8, 2)).eval()
    with temporary_plugin(Plugin(), name="my_attention"):
        pruner, pruned = _prune(model, torch.randn(2, 3, 8))
        report = pruner.report()
    attn = _heads(report, "1")
    assert (attn["query_heads"]["before"], attn["query_heads"]["after"]) == (2, 1)
    assert attn["kv_heads"]["pruned"] == attn["query_heads"]["pruned"] and pruned[1].wq.out_features == 4


# -- what is written agrees with independent counts; a replayed history gives the same model ---------


def _independent_flops(model, x) -> int:
    """FLOPs by torch's own counter with the attention computed by its unfused paths (the
    fused CPU kernels are invisible to the counter)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()


def _vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = {"img_size": 16, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 6, "num_classes": 3}
    return timm.create_model("vit_small_patch16_224", pretrained=False, **kw).eval(), torch.randn(2, 3, 16, 16)


def _tv_vit():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    kw = {"image_size": 16, "patch_size": 8, "num_layers": 2, "num_heads": 4, "hidden_dim": 32, "mlp_dim": 48}
    return tv.models.VisionTransformer(**kw, num_classes=4).eval(), torch.randn(2, 3, 16, 16)


def _family(name):
    def build():
        pytest.importorskip("transformers")
        import hf_families

        model, inputs, _ = hf_families.build(name)
        return model, inputs[0]

    return build


@pytest.mark.parametrize(
    "build",
    [_family("mistral"), _family("phi3"), _family("gpt2"), _family("bloom"), _family("gpt-neox"), _vit, _tv_vit],
    ids=["mistral-gqa", "phi3-fused-qkv", "gpt2-c_attn", "bloom-alibi", "gpt-neox", "timm-vit", "torchvision-vit"],
)
def test_a_history_replayed_on_a_fresh_model_gives_the_pruned_models_outputs_bit_for_bit(build):
    from cleanai_core.history import PruningHistory

    model, x = build()
    pruner, pruned = _prune(model, x)
    report = pruner.report()
    # the report's sizes are those of the model it hands back, counted here without CleanAI
    assert report["params_after"] == sum(p.numel() for p in pruned.parameters()) < report["params_before"]
    assert report["params_before"] == sum(p.numel() for p in build()[0].parameters())
    assert report["flops_after"] == _independent_flops(pruned, x) < report["flops_before"]
    assert report["flops_before"] == _independent_flops(build()[0], x)
    fresh, _ = build()  # the same architecture and weights, built again
    PruningHistory.from_json(pruner.history.to_json()).replay(fresh)
    fresh.load_state_dict(pruned.state_dict())
    out = lambda m: getattr(m(x), "logits", None) if not isinstance(m(x), torch.Tensor) else m(x)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(out(fresh.eval()), out(pruned))


def test_a_bloom_pruned_in_place_keeps_the_alibi_rows_of_its_kept_heads():
    build = _family("bloom")
    model, x = build()
    pruner = StructuredPruner(model, x, pruning_ratio=0.5, inplace=True)
    pruner.collect_activations([x])
    assert pruner.prune() is model
    copy_pruner, copied = _prune(build()[0], x)  # the same prune on a copy
    assert model.transformer.h[0].self_attention.num_heads == copied.transformer.h[0].self_attention.num_heads == 2
    with torch.no_grad():  # it failed: "The expanded size of the tensor (2) must match the existing size (4)"
        assert torch.equal(model(x).logits, copied(x).logits)


# -- the command line: a text model's report, and an interrupted run ---------------------------------


def _llama_folder(tmp_path):
    _llama(8, 2, layers=2).save_pretrained(tmp_path / "model")
    torch.save({"input_ids": torch.randint(0, 61, (16, 12), generator=torch.Generator().manual_seed(0))}, "ids.pt")
    return ["prune", "--model", "hf:model", "--data", "ids.pt", "--ratio", "0.5", "--latency-repeats", "2"]


def test_the_command_lines_report_of_a_gqa_llama_has_heads_latency_perplexity_and_the_saved_models_size(
    tmp_path, monkeypatch
):
    transformers = pytest.importorskip("transformers")
    import json

    from cleanai_core import load_pruned
    from cleanai_core.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([*_llama_folder(tmp_path), "--threads", "1", "--quiet", "--out", "out"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf")
    for model in (hf, load_pruned(tmp_path / "out")):
        assert sum(p.numel() for p in model.parameters()) == report["params_after"] < report["params_before"]
    assert report["flops_after"] == _independent_flops(hf, torch.zeros(1, 12, dtype=torch.long))
    assert report["latency_before_ms"] > 0 and report["latency_after_ms"] > 0
    assert report["perplexity_before"] > 1 and report["perplexity_after"] > 1
    heads = [(a["query_heads"]["after"], a["kv_heads"]["after"]) for a in report["attention_heads"]]
    assert heads == [(hf.config.num_attention_heads, hf.config.num_key_value_heads)] * 2 == [(4, 1)] * 2
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| `model.layers.1.self_attn` | 8 -> 4 | 2 -> 1 | 8 |" in md and "Perplexity (held-out)" in md
    assert "Attention heads: 16 -> 8 query, 4 -> 2 key/value (2 attention modules)." in md


def test_a_run_interrupted_while_writing_its_report_leaves_no_half_folder(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import cleanai_core.report as report_module
    from cleanai_core.cli import main

    monkeypatch.chdir(tmp_path)
    args = [*_llama_folder(tmp_path), "--threads", "1", "--quiet"]
    assert main([*args, "--out", "kept"]) == 0
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "kept").rglob("*") if p.is_file()}
    entries = sorted(p.name for p in tmp_path.iterdir())

    def interrupted(*a, **k):  # Ctrl-C after the model, the history and the Hugging Face folder were written
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "render_markdown", interrupted)
    for out in ("kept", "fresh"):
        assert main([*args, "--overwrite", "--out", out]) == 130  # the shell's code for Ctrl-C
    # the earlier result is whole and as it was, the new one was never made, nothing staged is left
    assert {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "kept").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == entries
