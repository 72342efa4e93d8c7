"""Session 20, outputs: what CleanAI writes after pruning (report numbers, names, units,
FLOPs, latency), checked against independent counts."""

from __future__ import annotations

import json
import math
import re
import warnings
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.metrics import count_flops, measure_latency
from cleanai_core.report import render_markdown, write_report


def _prune(model, x, **kw):
    pruner = StructuredPruner(model, x[:1], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kw.get("importance") in (None, "weight_activation"):
            pruner.collect_activations([x], num_batches=1, progress=False)
        pruned = pruner.prune()
    return pruner, pruned


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _wrecked_gpt2():
    """A tiny GPT-2 whose final norm is scaled so that its logits reach 1e4: a mean
    next-token loss of about 2,900 nats, far past ``exp``'s range (709.8)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(1e4)
    ids = torch.randint(0, 50, (2, 8))
    return model, ids


def test_a_perplexity_past_the_float_range_is_infinite_not_an_overflow_error():
    from cleanai_plugins.io import hf

    model, ids = _wrecked_gpt2()
    got = hf.cleanai_evaluate(model=model, loader=[{"input_ids": ids, "labels": ids}], device=torch.device("cpu"))
    # math.exp raised OverflowError: math range error, which the command line called "the pruned model failed"
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)  # the model's own mean next-token loss
    assert loss > 709.8 and got["loss"] == pytest.approx(loss, rel=1e-5) and got["tokens"] == 14
    assert got["perplexity"] == math.inf

    from cleanai_core.recovery import held_out_metric_and_loss

    metric, value, _ = held_out_metric_and_loss(model, [({"input_ids": ids}, ids)], torch.device("cpu"), "causal_lm")
    assert (metric, value) == ("perplexity", math.inf)

    # the job's recovery entry holds it as None (strict JSON); the terminal line raised TypeError on it
    from cleanai_core.recovery_report import recovery_summary

    entry = {"metric": "perplexity", "initial": None, "best": 41.25, "epochs": 2, "seconds": 1.5}
    assert recovery_summary(entry) == "Recovery: held-out perplexity NaN/inf -> 41.2500 (2 epochs, 1.5 s)"


def test_report_json_is_strict_json_and_names_the_numbers_that_were_not_finite(tmp_path):
    report = {
        "params_before": 100,
        "params_after": 50,
        "flops_before": 1000,
        "flops_after": 400,
        "perplexity_before": 12.5,
        "perplexity_after": math.inf,
        "mse_before": 0.25,
        "mse_after": math.nan,
        "sensitivity": None,
        "layers": [],
        "extra": {"kl": [0.1, math.nan, -math.inf]},
        "accuracy_after": torch.tensor(0.75),  # an evaluator plugin's 0-d tensor: written as "tensor(0.7500)"
    }
    written = write_report(tmp_path, report)
    text = (tmp_path / "report.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    data = _strict_json(text)  # json wrote Infinity / NaN, which jq and JSON.parse refuse
    assert data["perplexity_after"] is None and data["mse_after"] is None and data["extra"]["kl"] == [0.1, None, None]
    assert data["non_finite"] == {
        "perplexity_after": "inf",
        "mse_after": "nan",
        "extra.kl[1]": "nan",
        "extra.kl[2]": "-inf",
    }
    assert data["perplexity_before"] == 12.5 and data["params_after"] == 50 and data["accuracy_after"] == 0.75
    # the Markdown and the returned report keep the value itself
    md = (tmp_path / "report.md").read_text()
    assert "| Perplexity (held-out) | 12.500 | inf |" in md
    assert written["perplexity_after"] == math.inf


def test_the_report_groups_ratio_is_the_share_of_units_removed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(8, 6)
    # uniform 0.25: 2 of 10 and 4 of 16 (the report said 0.25 for both)
    pruner, pruned = _prune(model, x, pruning_ratio=0.25, importance="magnitude")
    groups = {tuple(g["modules"]): g for g in pruner.report()["groups"]}
    assert (pruned[0].out_features, pruned[2].out_features) == (8, 12)
    assert groups[("0", "2")]["pruned"] == 2 and groups[("0", "2")]["ratio"] == 0.2
    assert groups[("2", "4")]["pruned"] == 4 and groups[("2", "4")]["ratio"] == 0.25
    # round_to=8 keeps 16 of 16 and 10 of 10: "ratio 0.3" where nothing went
    pruner, pruned = _prune(model, x, pruning_ratio=0.3, importance="magnitude", round_to=8)
    groups = pruner.report()["groups"]
    for g in groups:
        assert g["ratio"] == round(g["pruned"] / g["units"], 6)
    assert pruned[0].out_features == 10 - groups[0]["pruned"] and pruned[2].out_features == 16 - groups[1]["pruned"]


class _Named(nn.Module):
    """Layers whose names hold Markdown's and XML's special characters (``ModuleDict`` keys
    may hold anything but a dot)."""

    def __init__(self) -> None:
        super().__init__()
        self.d = nn.ModuleDict({"a|b`c\nd": nn.Linear(4, 8), "e\x01<f>&": nn.Linear(8, 8), "名前é": nn.Linear(8, 2)})

    def forward(self, x):
        h = torch.relu(self.d["a|b`c\nd"](x))
        return self.d["名前é"](torch.relu(self.d["e\x01<f>&"](h)))


def _table_rows(md: str, header: str) -> list[list[str]]:
    """The cells of each row of the table under ``header`` (a ``\\|`` is no cell border)."""
    lines = md.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_layer_names_with_table_and_markup_characters_keep_the_report_whole(tmp_path):
    torch.manual_seed(0)
    pruner, pruned = _prune(_Named().eval(), torch.randn(8, 4), pruning_ratio=0.5, importance="magnitude")
    report = pruner.report()
    md = render_markdown(report)
    rows = _table_rows(md, "| layer |")
    # a "|" split the row into 7 cells, the line break ended the table after half a row
    assert [len(r) for r in rows] == [6, 6, 6]
    assert rows[0][0] == "`` d.a\\|b`c\\nd ``" and rows[0][1:4] == ["8", "4", "4"]
    assert rows[2][0] == "`d.名前é`"
    write_report(tmp_path, report)
    svg = ET.parse(tmp_path / "report.svg").getroot()  # a control character is not XML
    labels = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text") if t.text and t.text.startswith("d.")]
    assert labels == ["d.a|b`c?d", "d.e?<f>&", "d.名前é"]
    assert _strict_json((tmp_path / "report.json").read_text())["layers"][0]["name"] == "d.a|b`c\nd"


def test_the_layer_records_count_attention_heads_and_name_the_removed_ones():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
        num_classes=5,
    ).eval()  # fmt: skip
    pruner, pruned = _prune(model, torch.randn(4, 3, 32, 32), pruning_ratio=0.5, bias_compensation=False)
    report = pruner.report()
    records = {r["name"]: r for r in report["layers"]}
    width = [c for c in range(64) if c not in records["blocks.0.norm1"]["pruned_indices"]]  # the kept embedding
    for k in range(2):
        rec = records[f"blocks.{k}.attn.qkv"]
        heads_left = pruned.blocks[k].attn.num_heads
        assert (rec["units_before"], rec["units_after"]) == (4, heads_left) == (4, 2)
        # the removed channels are exactly the q, k and v rows of the heads named (16 each)
        rows = {s * 64 + h * 16 + j for s in range(3) for h in rec["pruned_units"] for j in range(16)}
        assert rec["pruned_indices"] == sorted(rows) and len(rows) == 96
        kept = [h for h in range(4) if h not in rec["pruned_units"]]
        assert pruned.blocks[k].attn.qkv.weight.shape[0] == 3 * 16 * len(kept)
        # the kept heads' rows are the original's, in order (on the kept embedding columns)
        w = model.blocks[k].attn.qkv.weight[:, width]
        want = torch.cat([w[s * 64 + h * 16 :][:16] for s in range(3) for h in kept])
        assert torch.equal(pruned.blocks[k].attn.qkv.weight, want)
    # one channel per unit: no unit counts (the MLP's hidden layer)
    assert "units_before" not in records["blocks.0.mlp.fc1"]
    md = render_markdown(report)
    assert "| `blocks.0.attn.qkv` | 192 | 96 | 96 (2 of 4 units of 48) |" in md


def test_a_summed_batch_product_and_an_int8_product_count_their_flops():
    class Summed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 5, 7))

        def forward(self, x):  # (3, 4, 5) @ (3, 5, 7) summed over the 3: 2 x 3 x 4 x 5 x 7
            return torch.addbmm(torch.zeros(4, 7), x, self.w)

    assert count_flops(Summed(), torch.randn(3, 4, 5)) == 2 * 3 * 4 * 5 * 7 == 840

    class Int8(nn.Module):
        def forward(self, x):
            return torch._int_mm(x, torch.ones(32, 16, dtype=torch.int8))

    assert count_flops(Int8(), torch.ones(17, 32, dtype=torch.int8)) == 2 * 17 * 32 * 16


def test_a_cpu_models_latency_does_not_wait_on_a_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(1))
    ms = measure_latency(nn.Linear(4, 4), torch.randn(2, 4), repeats=5, warmup=2)
    assert ms > 0 and calls == []  # it synchronised a GPU after each of the 7 passes of a CPU model


_SMALL = {
    "params_before": 10,
    "params_after": 5,
    "layers": [
        {
            "name": "a",
            "channels_before": 4,
            "channels_after": 2,
            "pruned_indices": [0, 1],
            "importance_scores": {"pruned": [0.1, 0.2], "kept": [1.0, 2.0]},
        }
    ],
    "sensitivity": {"ratios": [0.5], "samples": 4, "seconds": 0.1, "groups": []},
}


def test_a_report_that_fails_midway_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    import errno
    import os

    from cleanai_core import io as cio
    from cleanai_core.errors import UserError

    write_report(tmp_path, _SMALL)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(old) == {"report.svg", "sensitivity.svg", "report.json", "report.md"}
    newer = {**_SMALL, "params_after": 3, "layers": [{**_SMALL["layers"][0], "channels_after": 1}]}
    synced, real_fsync = [], os.fsync

    def full_disk(fd):  # the third file (report.json) finds the disk full
        synced.append(fd)
        if len(synced) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(cio.os, "fsync", full_disk)
    with pytest.raises(UserError, match="the disk is full"):
        write_report(tmp_path, newer)
    monkeypatch.undo()
    # report.svg and sensitivity.svg were replaced before report.json failed: a new plot beside the old numbers
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # no temporary file left either

    class Broken:
        @staticmethod
        def cleanai_report_sections(report):
            raise RuntimeError("a report section plugin failed")

    from cleanai_core import hookimpl
    from cleanai_core.plugins import get_plugin_manager

    Broken.cleanai_report_sections = hookimpl(Broken.cleanai_report_sections)
    pm = get_plugin_manager()
    pm.register(Broken, name="o10-broken")
    try:
        with pytest.raises(RuntimeError, match="section plugin"):
            write_report(tmp_path, newer)
    finally:
        pm.unregister(name="o10-broken")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old
    with pytest.raises(UserError, match="not an existing folder"):  # FileNotFoundError of '.report.svg.ixvl.tmp'
        write_report(tmp_path / "missing", newer)
    write_report(tmp_path, newer)
    assert _strict_json((tmp_path / "report.json").read_text())["params_after"] == 3


def test_a_dead_units_run_says_so_in_the_report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].bias[[1, 4]] = -100.0  # never active after the ReLU
    x = torch.randn(16, 4)
    pruner, pruned = _prune(model, x, prune_dead_only=True)
    report = pruner.report()
    assert pruned[0].out_features == 4 and report["layers"][0]["pruned_indices"] == [1, 4]
    # ratio and targets were all null: nothing in report.json or report.md said what chose the units
    assert (report["prune_dead_only"], report["pruning_ratio"], report["target_flops"]) == (True, None, None)
    assert "dead units only (`prune_dead_only`)" in render_markdown(report)
    pruner, _ = _prune(model, x, pruning_ratio=0.5)
    report = pruner.report()
    assert report["prune_dead_only"] is False and "dead units only" not in render_markdown(report)


def test_a_masked_lms_report_keeps_its_perplexity_after_recovery(tmp_path):
    transformers = pytest.importorskip("transformers")
    from cleanai_core.cli import main
    from cleanai_core.io import load_pruned
    from cleanai_core.job.inputs import split_dataset
    from cleanai_plugins.io import hf

    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    ids = torch.randint(5, 60, (24, 16))
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]
    torch.save({"input_ids": ids, "labels": labels}, tmp_path / "d.pt")
    fast = ["--threads", "1", "--latency-repeats", "2", "--quiet", "--ratio", "0.5", "--seed", "3"]
    data = ["--data", str(tmp_path / "d.pt")]  # recovery trains on its calibration part (the same file is refused)
    rc = main(["prune", "--model", f"hf:{tmp_path / 'bert'}", *data, "--out", str(tmp_path / "o"), *fast,
               "--recover-epochs", "1"])  # fmt: skip
    assert rc == 0
    report = _strict_json((tmp_path / "o" / "report.json").read_text())
    # the recovered model's accuracy alone was kept: perplexity_after and evaluation_tokens were null
    assert report["evaluation_tokens"] == 12 * 4 and report["perplexity_after"] is not None
    recovered = load_pruned(tmp_path / "o")
    _, held = split_dataset(list(range(24)), 0.5, 3)
    rows = list(held.indices)
    loader = [{"input_ids": ids[rows], "labels": labels[rows]}]
    again = hf.cleanai_evaluate(model=recovered, loader=loader, device=torch.device("cpu"))
    assert again["tokens"] == 48 and report["accuracy_after"] == again["accuracy"]
    assert report["perplexity_after"] == pytest.approx(again["perplexity"], rel=1e-6)
    assert report["perplexity_after"] != pytest.approx(report["perplexity_before"], rel=1e-4)  # it was trained
    assert (
        f"| Perplexity (held-out) | {report['perplexity_before']:.3f} | {again['perplexity']:.3f} |"
        in (tmp_path / "o" / "report.md").read_text()
    )


class _ReadsItsWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        assert h.shape[-1] == 12, "width read by the model"
        return self.c(h)


def test_report_md_names_the_groups_that_were_kept_whole_because_pruning_them_broke_the_model():
    torch.manual_seed(0)
    model = _ReadsItsWidth().eval()
    pruner, pruned = _prune(model, torch.randn(4, 6), pruning_ratio=0.5, importance="magnitude")
    report = pruner.report()
    assert (pruned.a.out_features, pruned.b.out_features) == (8, 12)
    assert len(report["skipped_groups"]) == 1 and "skipped group 2 (b, c;" in report["skipped_groups"][0]
    md = render_markdown(report)
    # report.md showed `b` with 0 of 12 pruned and no reason (report.json alone listed the group)
    section = md.split("## Skipped groups", 1)[1]
    assert "1 planned group(s) were kept whole because pruning them broke the model" in section
    assert "- skipped group 2 (b, c; pruners LinearPruner): pruning it breaks the model" in section
    assert "AssertionError: width read by the model" in section
    pruner, _ = _prune(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(4, 6), pruning_ratio=0.5)
    assert "## Skipped groups" not in render_markdown(pruner.report())


def _mixtral_flops(model, tokens: int) -> int:
    """Written out from the widths: per layer the q/k/v/o projections, the two attention
    products (query heads x tokens^2 x head dim), the router and, per token, its 2 experts'
    gate-up and down products; then the LM head. 2 x MACs."""
    total = 0
    for layer in model.model.layers:
        att, moe = layer.self_attn, layer.mlp
        for lin in (att.q_proj, att.k_proj, att.v_proj, att.o_proj):
            total += 2 * tokens * lin.in_features * lin.out_features
        total += 2 * tokens * moe.gate.weight.numel()  # the router: (experts, hidden)
        total += 2 * 2 * tokens * tokens * att.q_proj.out_features  # QK^T and AV over every query head
        experts, up, hidden = moe.experts.gate_up_proj.shape
        _, out, inner = moe.experts.down_proj.shape
        total += 2 * tokens * 2 * (hidden * up + inner * out)  # 2 experts per token
    return total + 2 * tokens * model.lm_head.in_features * model.lm_head.out_features


def test_a_mixture_of_experts_counts_its_experts_flops():
    transformers = pytest.importorskip("transformers")
    if not hasattr(torch.ops.aten, "_grouped_mm"):
        pytest.skip("this PyTorch has no grouped matrix product")
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    experts = model.model.layers[0].mlp.experts
    if not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        pytest.skip("this transformers runs Mixtral's experts as separate linear layers")
    ids = torch.randint(0, 64, (2, 12))
    # transformers 5 runs the experts as one aten._grouped_mm, which PyTorch's counter does not see: 239,616
    assert count_flops(model, {"input_ids": ids[:1]}) == _mixtral_flops(model, 12) == 829_440
    pruner = StructuredPruner(model, {"input_ids": ids[:1]}, pruning_ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.collect_activations([{"input_ids": ids}], progress=False)
        pruned = pruner.prune()
    report = pruner.report()
    assert pruned.model.layers[0].mlp.experts.gate_up_proj.shape[1] < 128  # the experts were pruned
    assert report["flops_before"] == 829_440
    assert report["flops_after"] == _mixtral_flops(pruned, 12) == 442_368  # said 147,456


def test_a_multi_output_regression_heads_mse_is_per_value_as_its_own_loss():
    transformers = pytest.importorskip("transformers")
    from cleanai_core.recovery import held_out_metric_and_loss
    from cleanai_plugins.io import hf

    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_labels=3, problem_type="regression",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids, y = torch.randint(5, 60, (6, 10)), torch.randn(6, 3)
    got = hf.cleanai_evaluate(model=model, loader=[{"input_ids": ids, "labels": y}], device=torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        own = float(model(input_ids=ids, labels=y).loss)  # transformers' MSELoss: the mean over the 18 values
    assert got["evaluated"] == 6
    # it summed the 3 outputs of each sample (3 x the model's own loss, and the recovery table's figure)
    assert got["mse"] == pytest.approx(float(((logits - y) ** 2).mean()), rel=1e-6)
    assert got["mse"] == pytest.approx(own, rel=1e-6)
    metric, value, _ = held_out_metric_and_loss(model, [({"input_ids": ids}, y)], torch.device("cpu"), "regression")
    assert metric == "mse" and value == pytest.approx(got["mse"], rel=1e-6)


def test_a_parameter_target_counts_the_biases_compensation_adds(tmp_path):
    from digits_setup import cli_prune_args

    from cleanai_core.cli import main
    from cleanai_plugins.io.demo import DigitsCNN

    torch.manual_seed(0)
    x = torch.rand(32, 1, 8, 8)
    model = DigitsCNN(width=32).eval()  # convolutions without bias: compensation gives two of them one
    model.features[4] = nn.Identity()  # (with their BatchNorms the norms take the biases instead)
    model.features[8] = nn.Identity()
    pruner, pruned = _prune(model, x, target_params=0.77)
    report = pruner.report()
    assert pruner.history.meta["added_biases"] == ["features.3", "features.7"]
    added = pruned.features[3].out_channels + pruned.features[7].out_channels
    # the search measured copies without those biases: 0.77006 kept
    assert report["params_after"] == sum(p.numel() for p in pruned.parameters())
    assert report["params_after"] / report["params_before"] <= 0.77 and added == 112
    rc = main([*cli_prune_args(tmp_path), "--auto", "--target-params", "0.6", "--out", str(tmp_path / "o")])
    assert rc == 0
    written = _strict_json((tmp_path / "o" / "report.json").read_text())
    # report.md said "keeping 0.595 of the params" where the model kept 0.5965 (98 compensation biases)
    assert written["allocation"]["cost"] == pytest.approx(written["params_after"] / written["params_before"], abs=1e-12)


def test_a_run_with_per_layer_ratios_names_them_in_the_report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    pruner, pruned = _prune(
        model, torch.randn(4, 6), pruning_ratio=0, layer_pruning_ratios={"0": 0.5}, importance="magnitude"
    )
    report = pruner.report()
    assert (pruned[0].out_features, pruned[2].out_features) == (5, 16)
    # "pruning ratio 0.0" was all report.md said of a model that lost half of a layer
    assert report["layer_ratios"] == {"0": 0.5} and report["pruning_ratio"] == 0.0
    assert "per-layer ratios: `0` 0.5; pruning ratio 0.0 for the other layers;" in render_markdown(report)
    pruner, _ = _prune(model, torch.randn(4, 6), pruning_ratio=0.5, importance="magnitude")
    assert pruner.report()["layer_ratios"] is None and "per-layer" not in render_markdown(pruner.report())


def test_report_md_rounds_a_count_up_into_the_next_unit():
    from cleanai_core.report import headline_text

    report = {"params_before": 999_999, "params_after": 994_999, "flops_before": 999_996_000, "flops_after": 999}
    text = headline_text(report)
    # "1000.00k" and "1000.00M": the unit chosen before rounding
    assert "1.00M -> 995.00k" in text and "1.00G -> 999 " in text and "1000.00" not in text


def test_unit_counts_name_a_width_only_where_every_unit_has_it():
    from cleanai_core.pruning_report import _unit_counts

    # 16 channels: 4 units of 3 channels and 4 of 1 ("8 units of 2" by 16 / 8)
    units = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 5, 6, 7])
    pruned = torch.zeros(8, dtype=torch.bool)
    pruned[[1, 5]] = True
    got = _unit_counts(units, pruned)
    assert got == {"units_before": 8, "units_after": 6, "pruned_units": [1, 5], "channels_per_unit": None}
    even = _unit_counts(torch.tensor([2, 2, 0, 0, 1, 1]), pruned[:3])  # ordered by first channel: 2, 0, 1
    assert even == {"units_before": 3, "units_after": 2, "pruned_units": [2], "channels_per_unit": 2}
