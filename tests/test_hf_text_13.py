"""Hugging Face text models, session 22: one cause per test (tiny models from configs,
nothing downloaded). Unusual-but-valid configurations and the user journey after the
prune."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import LM, V, dots3_note  # noqa: E402
from test_hf_text_7 import assert_generates_alike, default_prune, padded, params  # noqa: E402

import cleanai_plugins.zoo.transformers_gqa as gqa  # noqa: E402
from cleanai_core.plugins import temporary_plugin  # noqa: E402
from cleanai_core.testing import check_pruner  # noqa: E402


def ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


def reload_diff(small, tmp_path) -> float:
    small.save_pretrained(tmp_path)
    again = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        return float((small(**padded()).logits - again(**padded()).logits).abs().max())


#: 8 query heads in 2 KV groups, 4 layers: the last 2 reuse the keys and values of the first 2
KV_SHARING = {
    "gemma3n": ("Gemma3nForCausalLM", "Gemma3nTextConfig", {
        "intermediate_size": [96] * 4, "laurel_rank": 8, "altup_num_inputs": 2,
        "activation_sparsity_pattern": [0.0] * 4}),
    "gemma4": ("Gemma4ForCausalLM", "Gemma4TextConfig", {"global_head_dim": 8}),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(KV_SHARING))
def test_layers_that_reuse_keys_prune_query_heads_per_group_with_the_group_size(family, tmp_path):
    """Gemma3n / Gemma 4 with ``num_kv_shared_layers``: the last layers have no key or
    value projection and reuse an earlier layer's keys and values. With the
    query-heads-per-group plugin (``transformers_gqa``) their group size was not
    rewritten (read from a key projection they lack): the pruned layer 2 failed its
    check and was kept whole (8 heads beside 4, ``from_pretrained: false``), layer 3
    kept ``num_key_value_groups`` 4 for 4 heads over 2 KV heads and ``generate()``
    failed (``The size of tensor a (4) must match the size of tensor b (8)``; Gemma 4:
    ``mat1 and mat2 shapes cannot be multiplied``). A layer that reuses keys now takes
    the KV heads of the last layer of its type that made its own."""
    cls, config_cls, kw = KV_SHARING[family]
    config = getattr(transformers, config_cls)(**{
        **LM, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
        "num_kv_shared_layers": 2, "layer_types": ["sliding_attention", "full_attention"] * 2, "sliding_window": 4,
        "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": V, **kw})  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).eval()
    inputs = (ids(1, 8),)
    with temporary_plugin(gqa, name="transformers_gqa"):
        assert check_pruner(model, padded(), ratio=0.5).max_abs_diff < 1e-5
        _, small = default_prune(model, inputs, 0.5)
    attns = [layer.self_attn for layer in small.model.layers]
    assert [a.q_proj.out_features for a in attns] == [32] * 4  # 4 of 8 heads everywhere
    assert [a.num_key_value_groups for a in attns] == [2] * 4  # was [2, 2, 4, 4]
    assert [hasattr(a, "k_proj") for a in attns] == [True, True, False, False]
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (4, 2)
    assert small.config.cleanai_pruning["from_pretrained"] is True and params(small) < 0.7 * params(model)
    assert reload_diff(small, tmp_path) <= 1e-6
    assert_generates_alike(small, inputs)


class Samples(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def seq2seq(family: str):
    torch.manual_seed(0)
    if family == "t5":
        config = transformers.T5Config(vocab_size=V, d_model=64, d_ff=96, d_kv=16, num_layers=2, num_heads=4,
                                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
        return transformers.T5ForConditionalGeneration(config).eval()
    config = transformers.BartConfig(vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                     decoder_ffn_dim=96, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                                     bos_token_id=2, decoder_start_token_id=1)  # fmt: skip
    return transformers.BartForConditionalGeneration(config).eval()


def text_target_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows as ``tokenizer(text, text_target=target)`` gives them: ``input_ids``,
    ``attention_mask`` and ``labels`` (the target, padding -100), no decoder inputs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        labels = torch.randint(3, V, (6,), generator=g)
        labels[5:] = -100
        rows.append({"input_ids": torch.randint(3, V, (10,), generator=g), "attention_mask": torch.ones(10).long(),
                     "labels": labels})  # fmt: skip
    return rows


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_an_encoder_decoder_calibrates_and_recovers_on_batches_of_ids_and_labels(family):
    """A seq2seq batch as the tokenizer makes it (``input_ids``, ``attention_mask``,
    ``labels``; no decoder inputs: the model's forward shifts the labels itself). CleanAI
    takes ``labels`` out as the target, so the model got no decoder inputs: every
    calibration batch, the sensitivity and recovery failed (``the model failed on
    calibration batch 0 ...: You must specify exactly one of input_ids or inputs_embeds.
    Give calibration batches shaped like example_inputs``). The decoder inputs are now
    made from the labels by the model's own ``prepare_decoder_input_ids_from_labels``."""
    from cleanai_core import StructuredPruner
    from cleanai_core.recovery import recover
    from cleanai_core.runtime import split_batch

    model = seq2seq(family)
    rows = text_target_rows(24)
    loader = torch.utils.data.DataLoader(Samples(rows), batch_size=4)
    batch = next(iter(loader))
    example = {"input_ids": batch["input_ids"][:1], "decoder_input_ids": batch["labels"][:1].clamp(min=0)}
    pruner = StructuredPruner(model, example, pruning_ratio=0.4)
    pruner.collect_activations(loader, num_batches=3)
    small = pruner.prune()
    assert params(small) < 0.9 * params(model)
    inputs, target = split_batch(batch, model)
    with torch.no_grad():  # the decoder inputs are those the model's forward makes from the labels
        own = model(**batch).loss
        logits = model(**inputs).logits
    by_hand = torch.nn.functional.cross_entropy(logits.reshape(-1, V), target.reshape(-1), ignore_index=-100)
    assert float((own - by_hand).abs()) < 1e-6
    val = Samples(text_target_rows(4, seed=1))
    recovered, result = recover(small, model, Samples(rows), val_data=val, epochs=1, batch_size=4, progress=False)
    assert result.task == "token"  # the labels at their own positions (decoder inputs are shifted already)
    with torch.no_grad():
        loss = small(**next(iter(torch.utils.data.DataLoader(val, batch_size=4)))).loss
    assert result.initial == pytest.approx(float(loss.exp()), rel=1e-5)  # the held-out perplexity of the labels
    assert params(recovered) == params(small)


def test_recover_scores_a_masked_lm_at_its_masked_positions():
    """``recover(task="auto")`` took every ``(N, T, V)`` output for a causal LM's: a masked
    LM (and an encoder-decoder) was trained and scored on each position's next label
    (``task: "causal_lm"``, a held-out perplexity of shifted labels), which it never
    predicts. A Hugging Face model that cannot generate, an encoder-decoder or a
    ``causal=False`` LM head now trains on its labels where they stand (``"token"``)."""
    from cleanai_core import StructuredPruner
    from cleanai_core.recovery import recover

    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**LM)).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(20):
        x = torch.randint(5, V, (12,), generator=g)
        labels = torch.full_like(x, -100)
        labels[2::4] = x[2::4]
        rows.append({"input_ids": x.masked_fill(labels != -100, 4), "labels": labels})
    small = StructuredPruner(model, {"input_ids": rows[0]["input_ids"][None]}, "magnitude", pruning_ratio=0.4).prune()
    val = Samples(rows[:4])
    _, result = recover(small, model, Samples(rows[4:]), val_data=val, epochs=1, batch_size=4, progress=False)
    assert result.task == "token"  # was "causal_lm"
    with torch.no_grad():
        loss = small(**next(iter(torch.utils.data.DataLoader(val, batch_size=4)))).loss  # BERT's own masked-LM loss
    assert result.initial == pytest.approx(float(loss.exp()), rel=1e-5)


def test_recover_takes_a_dataloader_over_a_list_of_tokenized_rows():
    """``recover(small, model, DataLoader(rows, batch_size=4), ...)`` with ``rows`` a list
    of tokenized texts (dicts of ``input_ids``): refused, ``train_data is a DataLoader: it
    must be a data set or a DataLoader over one``, though a DataLoader's list holds samples
    (a bare list still holds batches). It is split like any data set."""
    from cleanai_core import StructuredPruner
    from cleanai_core.recovery import recover

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LM, num_key_value_heads=2)).eval()
    small = StructuredPruner(model, (ids(1, 8),), "magnitude", pruning_ratio=0.4).prune()
    rows = [{"input_ids": ids(12, seed=i)} for i in range(20)]
    loader = torch.utils.data.DataLoader(rows, batch_size=4)
    _, result = recover(small, model, loader, epochs=1, progress=False)
    assert (result.train_samples, result.held_out_samples, result.task) == (18, 2, "causal_lm")


@pytest.mark.parametrize(
    "family, dtype, kept",
    [("t5", torch.float16, "encoder.block.0.layer.1.DenseReluDense.wo.weight"),
     ("deepseek-v3", torch.bfloat16, "model.layers.1.mlp.gate.weight")],
)  # fmt: skip
def test_a_half_precision_folder_keeps_the_tensors_its_family_keeps_in_float32(family, dtype, kept, tmp_path):
    """A float16 T5 folder (``_keep_in_fp32_modules = ["wo"]``) or a bfloat16 DeepSeek-V3
    (``_keep_in_fp32_modules_strict``: the routers' ``gate.weight``): ``from_pretrained``
    keeps those tensors in float32 and the folder stores them so, but ``cleanai prune``
    wrote every tensor in the folder's dtype: T5's ``wo`` in float16 (the overflow the
    family guards against), and ``hf/`` refused (``reloaded logits differ ... (max
    relative error 0.000747)``, ``hf_reload_path: "load_pruned"``); DeepSeek's routers
    rounded to bfloat16. They stay float32 now, in ``model.pt`` and ``hf/``."""
    from hf_families import build
    from test_hf_text_10 import ARGS

    from cleanai_core.cli import main
    from cleanai_core.io import load_pruned

    if family == "t5":
        model = seq2seq("t5")
        data = {"input_ids": ids(24, 12), "labels": ids(24, 6, seed=2)}
    else:
        model = build(family)[0]
        data = {"input_ids": ids(24, 12)}
    model.save_pretrained(tmp_path / "float32")
    source = type(model).from_pretrained(tmp_path / "float32", dtype=dtype)  # as a half-precision checkpoint is
    assert source.state_dict()[kept].dtype == torch.float32 and source.config.dtype == dtype
    source.save_pretrained(tmp_path / "m")
    torch.save(data, tmp_path / "d.pt")
    rc = main(["prune", "--model", f"hf:{tmp_path / 'm'}", "--data", str(tmp_path / "d.pt"),
               "--out", str(tmp_path / "o"), "--ratio", "0.4", *ARGS])  # fmt: skip
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rc == 0 and report["hf_reload_path"] == "from_pretrained"  # was "load_pruned" for T5
    assert report["params_after"] < report["params_before"]
    small = load_pruned(tmp_path / "o")
    assert small.state_dict()[kept].dtype == torch.float32  # was float16 / bfloat16
    assert small.state_dict()["lm_head.weight"].dtype == dtype
    if family != "t5":  # the router keeps every expert: its float32 weights as they were
        assert torch.equal(small.state_dict()[kept], source.state_dict()[kept])
    again = type(small).from_pretrained(tmp_path / "o" / "hf").eval()
    inputs = {"input_ids": ids(2, 8), **({"decoder_input_ids": ids(2, 5, seed=4)} if family == "t5" else {})}
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, small(**inputs).logits)


def test_a_config_with_per_layer_head_counts_prunes_and_writes_them_per_layer(tmp_path):
    """transformers' heterogeneous configs (``per_layer_config``): Gemma 4's full-attention
    layers take ``num_global_key_value_heads`` and ``global_head_dim`` (as the released
    Gemma 4 checkpoints do), Step-3.7's sliding-window layers ``num_sliding_attention_heads``.
    Reading such a per-layer key from the global config raises, and every prune failed in
    the config fix-up, the oracle too (``AmbiguousGlobalPerLayerAttributeError:
    'num_key_value_heads' is a per-layer attribute``). The fix-up reads the global values
    and writes a per-layer key layer by layer: ``from_pretrained`` rebuilds the pruned model."""
    config = transformers.Gemma4TextConfig(**{
        **LM, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32, "num_global_key_value_heads": 4,
        "attention_k_eq_v": True, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4,
        "hidden_size_per_layer_input": 0})  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(config).eval()
    assert [a.k_proj.out_features for a in (layer.self_attn for layer in model.model.layers)] == [32, 128]
    inputs = (ids(1, 8),)
    assert check_pruner(model, padded(), ratio=0.5).max_abs_diff < 1e-5
    _, small = default_prune(model, inputs, 0.5)
    attns = [layer.self_attn for layer in small.model.layers]
    assert [(a.q_proj.out_features, a.k_proj.out_features) for a in attns] == [(32, 16), (64, 64)]
    written = small.config.to_dict()
    assert (written["num_attention_heads"], written["num_key_value_heads"]) == (2, 1)
    assert written["per_layer_config"] == {"1": {"head_dim": 32, "num_key_value_heads": 2}}  # was 4
    assert small.config.cleanai_pruning["from_pretrained"] is True
    assert reload_diff(small, tmp_path / "gemma4") <= 1e-6
    assert_generates_alike(small, inputs)

    config = transformers.Step3p7TextConfig(**{
        **LM, "num_key_value_heads": 2, "head_dim": 16, "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 4, "num_sliding_attention_heads": 8, "mlp_layer_types": ["dense", "dense"]})  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Step3p7TextModel(config).eval()
    assert check_pruner(model, padded(), ratio=0.5).max_abs_diff < 1e-5
    _, small = default_prune(model, inputs, 0.5)
    assert [layer.self_attn.q_proj.out_features for layer in small.layers] == [64, 32]  # 8 -> 4 and 4 -> 2 heads
    assert small.config.to_dict()["per_layer_config"] == {"0": {"num_attention_heads": 4}}
    small.save_pretrained(tmp_path / "step")
    again = transformers.Step3p7TextModel.from_pretrained(tmp_path / "step").eval()
    with torch.no_grad():
        diff = (again(**padded()).last_hidden_state - small(**padded()).last_hidden_state).abs().max()
    assert float(diff) <= 1e-6


def test_latent_attention_with_an_indexer_keeps_the_hidden_size_in_every_config_copy(tmp_path):
    """Dots3-Note: latent attention (``q_proj = None`` beside ``q_a_proj``), per-layer
    config copies (its sliding-window layers' own head counts) and a DSA indexer holding a
    copy of its own. The fix-up read the attention's input width from ``q_proj`` (None), so
    each copy took its hidden size from the norms it owns: the indexer's copy got 16 (its
    key norm and the LoRA norms outnumber the residual stream's), the router reading it
    failed (``mat1 and mat2 shapes cannot be multiplied (32x16 and 64x4)``) and every prune
    was refused. The input width is the first input projection that exists
    (``q_a_proj``), and the copies of the model's config share its hidden size; the
    shared experts' key ``shared_experts_intermediate_size`` is written too."""
    model = dots3_note()
    config = model.config
    assert config.layer_types == ["indexed_attention"] * 2 + ["sliding_attention"] * 2
    inputs = (ids(1, 8),)
    assert check_pruner(model, padded(), ratio=0.5).max_abs_diff < 1e-5
    _, small = default_prune(model, inputs, 0.5)
    assert (params(model), params(small)) == (151_584, 96_288)
    copies = {id(m.config): m.config for m in small.modules() if hasattr(getattr(m, "config", None), "to_dict")}
    assert {c.__dict__["hidden_size"] for c in copies.values()} == {64}  # was 16 in the indexers' copies
    written = small.config.to_dict()
    assert (written["moe_intermediate_size"], written["shared_experts_intermediate_size"]) == (16, 16)
    assert small.config.cleanai_pruning["from_pretrained"] is True
    assert reload_diff(small, tmp_path) <= 1e-6
    assert_generates_alike(small, inputs)


def test_phi3_pruned_per_kv_group_reloads_with_load_pruned_without_the_plugin(tmp_path):
    """Phi-3's fused ``qkv_proj`` pruned with the query-heads-per-group plugin:
    ``load_pruned`` replays the history without that plugin, and its attention fix-up,
    which read the head counts from the fused width and the mode the plugin named, took
    the width for whole KV groups gone: every forward failed (``mat1 and mat2 shapes
    cannot be multiplied (24x64 and 32x64)``). The query heads are read from the output
    projection's input width, the same in both modes."""
    from cleanai_core.io import load_pruned, save_pruned

    config = transformers.Phi3Config(**{**LM, "num_attention_heads": 8, "num_key_value_heads": 2})
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "original")
    with temporary_plugin(gqa, name="transformers_gqa"):
        pruner, small = default_prune(model, (ids(1, 8),), 0.5)
    assert [layer.self_attn.qkv_proj.out_features for layer in small.model.layers] == [64, 64]  # 4 + 2 + 2 heads
    save_pruned(tmp_path / "out", small, pruner.history, spec=f"hf:{tmp_path / 'original'}")
    again = load_pruned(tmp_path / "out")
    assert [layer.self_attn.num_key_value_groups for layer in again.model.layers] == [2, 2]
    with torch.no_grad():
        assert torch.equal(again(**padded()).logits, small(**padded()).logits)
    assert_generates_alike(again, (ids(1, 8),))
