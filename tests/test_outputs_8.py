"""Session 18, outputs: what CleanAI writes after pruning, checked as a demanding user
would (report numbers, history replay, save/load, recovery)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from digits_setup import cli_prune_args

from cleanai_core import StructuredPruner
from cleanai_core.io import load_pruned, save_pruned
from cleanai_plugins.io.demo import MODEL_SPEC, DigitsCNN


def _pruned_digits(prep=lambda m: m, **kw):
    torch.manual_seed(0)
    model = prep(DigitsCNN(width=8).eval())
    x = prep(torch.rand(16, 1, 8, 8))
    pruner = StructuredPruner(model, x[:2], pruning_ratio=0.4, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.collect_activations([x], num_batches=1, progress=False)
        pruned = pruner.prune()
    return model, x, pruner, pruned


def _channels_last(m):
    return m.to(memory_format=torch.channels_last)


def test_a_channels_last_model_loads_back_channels_last(tmp_path):
    _, x, pruner, pruned = _pruned_digits(_channels_last)
    convs = [n for n, p in pruned.named_parameters() if p.dim() == 4]
    assert len(convs) == 3
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in pruned.parameters() if p.dim() == 4)
    save_pruned(tmp_path / "out", pruned, pruner.history, MODEL_SPEC)
    loaded = load_pruned(tmp_path / "out")
    params = dict(loaded.named_parameters())
    # save_pruned made every tensor NCHW-contiguous and load_pruned copied into NCHW tensors
    assert [n for n in convs if not params[n].is_contiguous(memory_format=torch.channels_last)] == []
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert all(state[n].is_contiguous(memory_format=torch.channels_last) for n in convs)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    # an NCHW model stays NCHW
    _, x, pruner, pruned = _pruned_digits()
    save_pruned(tmp_path / "nchw", pruned, pruner.history, MODEL_SPEC)
    loaded = load_pruned(tmp_path / "nchw")
    assert all(p.is_contiguous() for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_the_report_says_how_many_samples_scored_the_channels(tmp_path, capsys):
    from cleanai_core.cli import main

    common = [*cli_prune_args(tmp_path), "--ratio", "0.4"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*common, "--calib-batches", "1", "--out", str(tmp_path / "one")]) == 0
        assert main([*common, "--out", str(tmp_path / "all")]) == 0
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    # 20 samples in the calibration part, one batch of 8 read: the report said 20 and nothing else
    assert (one["calibration_samples"], one["scored_samples"], one["evaluation_samples"]) == (20, 8, 20)
    assert "20 calibration samples; 8 of them scored the channels;" in (tmp_path / "one" / "report.md").read_text()
    every = json.loads((tmp_path / "all" / "report.json").read_text())
    assert (every["calibration_samples"], every["scored_samples"]) == (20, 20)
    assert "scored the channels" not in (tmp_path / "all" / "report.md").read_text()


def test_a_target_run_reports_its_target_and_no_ratio(tmp_path):
    from cleanai_core.report import render_markdown

    for kw, key in ((dict(target_flops=0.5), "target FLOPs 0.5"), (dict(target_params=0.5), "target parameters 0.5")):
        _, _, pruner, pruned = _pruned_digits(**kw)
        report = pruner.report()
        # the report said "pruning ratio 0.4" (the unused ratio) and did not name the parameter target
        assert report["pruning_ratio"] is None
        assert (report["target_flops"], report["target_params"]) == (kw.get("target_flops"), kw.get("target_params"))
        kept = sum(p.numel() for p in pruned.parameters()) / report["params_before"]
        assert kept == report["params_after"] / report["params_before"] and kept <= 0.5 + 0.05
        md = render_markdown(report)
        assert key in md and "pruning ratio" not in md
    _, _, pruner, _ = _pruned_digits()
    assert (pruner.report()["pruning_ratio"], pruner.report()["target_flops"]) == (0.4, None)
    assert "pruning ratio 0.4" in render_markdown(pruner.report())


def test_a_gradual_step_keeps_the_optimizer_state_and_gradients_in_the_parameters_layout():
    from cleanai_core import GradualPruner, PruningSchedule

    torch.manual_seed(0)
    model = DigitsCNN(width=8).to(memory_format=torch.channels_last)
    x = torch.rand(16, 1, 8, 8).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).sum().backward()
    opt.step()
    with torch.no_grad():  # state and gradient = weight^2: after slicing they must still be
        for p in model.parameters():
            for v in opt.state[p].values():
                if v.dim():
                    v.copy_(p * p)
            p.grad.copy_(p * p)
    gp = GradualPruner(model, x[:2], opt, PruningSchedule(final=0.5, steps=2), bias_compensation=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gp.step([x])
    convs = {n: p for n, p in model.named_parameters() if p.dim() == 4 and p.shape[1] > 1}
    assert [tuple(p.shape)[:2] for p in convs.values()] == [(11, 6), (11, 11)]
    for name, p in convs.items():
        assert p.is_contiguous(memory_format=torch.channels_last), name
        tensors = {"grad": p.grad, **{k: v for k, v in opt.state[p].items() if v.dim()}}
        assert set(tensors) == {"grad", "exp_avg", "exp_avg_sq"}
        for key, t in tensors.items():
            assert torch.equal(t, p * p), (name, key)
            # sliced with index_select alone, they came out NCHW beside a channels-last parameter
            assert t.is_contiguous(memory_format=torch.channels_last), (name, key)


def test_the_report_groups_count_the_units_removed_over_every_step():
    model, _, pruner, pruned = _pruned_digits(iterative_steps=3)
    groups = {tuple(g["modules"]): g for g in pruner.report()["groups"]}
    width = {n: m.weight.shape[0] for n, m in pruned.named_modules() if n in ("features.0", "features.3", "features.7")}
    original = {n: m.weight.shape[0] for n, m in model.named_modules() if n in width}
    by_producer = {
        ("features.0", "features.1", "features.3"): "features.0",
        ("features.3", "features.4", "features.7"): "features.3",
        ("fc", "features.7", "features.8"): "features.7",
    }
    assert set(groups) == set(by_producer)
    for key, producer in by_producer.items():
        # the first step's plan alone was listed: 1 of 8 units pruned where the model lost 3
        assert groups[key]["units"] == original[producer]
        assert groups[key]["pruned"] == original[producer] - width[producer] > 0
        assert groups[key]["ratio"] == round(groups[key]["pruned"] / groups[key]["units"], 6)
    layers = [r for r in pruner.report()["layers"] if r["name"] == "features.0" and r["slice"] == "out"]
    assert [r["step"] for r in layers] == [1, 2, 3]
    assert sum(len(r["pruned_indices"]) for r in layers) == groups[("features.0", "features.1", "features.3")]["pruned"]


def test_small_importance_scores_keep_their_ranking_in_the_report():
    torch.manual_seed(0)
    model = DigitsCNN(width=8).eval()
    x = torch.rand(16, 1, 8, 8) * 1e-3  # Taylor scores of this model lie near 1e-12
    pruner = StructuredPruner(model, x[:2], importance="taylor", pruning_ratio=0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.collect_activations([(x, torch.randint(0, 10, (16,)))], num_batches=1, progress=False)
        plan = pruner.plan()
        pruner.prune()
    stem = next(r for r in pruner.report()["layers"] if (r["name"], r["slice"]) == ("features.0", "out"))
    gp = next(gp for gp in plan.groups if "features.0" in gp.group.modules())
    true = gp.scores.tolist()
    assert 0 < max(true) < 1e-9
    scores = stem["importance_scores"]["pruned"] + stem["importance_scores"]["kept"]
    # six decimals: every score read 0.0
    assert all(s > 0 for s in scores)
    assert stem["importance_scores"]["pruned"] == pytest.approx(gp.scores[gp.pruned].tolist(), rel=1e-5)
    assert max(stem["importance_scores"]["pruned"]) <= min(stem["importance_scores"]["kept"])
