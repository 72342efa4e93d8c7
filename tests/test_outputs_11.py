"""Session 21, outputs: what CleanAI writes after pruning and what the user gets back (the
replayable history, the saved folder, the report, recovery and gradual pruning), checked
against independent counts."""

from __future__ import annotations

import copy
import json
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from test_outputs_10 import _prune  # the pruner and its pruned model, activations collected on x
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.history import PruningHistory
from cleanai_core.io import load_pruned, save_pruned

NET = """
import torch
from torch import nn


def Net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
"""


def _net_factory(tmp_path, monkeypatch):
    """``Net``, importable as ``net_o11:Net`` (the spec ``load_pruned`` rebuilds)."""
    (tmp_path / "net_o11.py").write_text(textwrap.dedent(NET))
    monkeypatch.syspath_prepend(str(tmp_path))
    from net_o11 import Net

    return Net


def _edited(history, how):
    data = copy.deepcopy(history.to_json())
    step = data["steps"][0]
    if how == "an edit removed":
        data["steps"][0] = [e for e in step if e["module"] != "1"]  # the first BatchNorm keeps 8 channels
    elif how == "a keep list shortened":
        step[0]["keep"] = step[0]["keep"][:-1]  # the first conv keeps 3, its BatchNorm 4
    elif how == "a slice renamed":
        step[0]["slice"] = "outputs"  # no slice of a conv: its pruner skipped it
    return json.loads(json.dumps(data))


@pytest.mark.parametrize("how", ["an edit removed", "a keep list shortened", "a slice renamed"])
def test_a_hand_edited_history_whose_edits_disagree_is_refused_by_replay_and_load_pruned(tmp_path, monkeypatch, how):
    Net = _net_factory(tmp_path, monkeypatch)
    x = torch.randn(8, 3, 8, 8)
    pruner, pruned = _prune(Net().eval(), x, pruning_ratio=0.5)
    assert [tuple(p.shape) for p in pruned[0:2].parameters()] == [(4, 3, 3, 3), (4,), (4,), (4,)]
    # the history records what each step leaves, beside what it slices from
    assert pruner.history.meta["shapes_after"][0]["1.weight"] == [4]
    assert pruner.history.meta["shapes_after"][0]["3.weight"] == [4, 4, 3, 3]
    edited = PruningHistory.from_json(_edited(pruner.history, how))
    fresh = Net().eval()
    want = {k: v.clone() for k, v in fresh.state_dict().items()}
    # it replayed without a word; the model failed in its forward ("running_mean should contain 4 elements not 8")
    with pytest.raises(UserError, match=r"step 0 of 1 left (1|0)\.weight of shape \((8|3)[,)].*edited by hand"):
        edited.replay(fresh)
    assert {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == {k: tuple(v.shape) for k, v in want.items()}
    assert all(torch.equal(v, want[k]) for k, v in fresh.state_dict().items())  # not changed
    save_pruned(tmp_path / "out", pruned, pruner.history, "net_o11:Net")
    (tmp_path / "out" / "history.json").write_text(json.dumps(_edited(pruner.history, how)))
    with pytest.raises(UserError, match=r"history\.json.*step 0 left .*edits do not agree"):
        load_pruned(tmp_path / "out", trust_code=True)
    # the history as written replays, and the pruned weights load into it
    fresh = PruningHistory.from_json(json.loads(json.dumps(pruner.history.to_json()))).replay(Net().eval())
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))


def _mlp(width):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))


def _gradual(width, schedule, by="ratio", steps_before_resume=None, **kw):
    from cleanai_core.gradual import GradualPruner

    model = _mlp(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    gp = GradualPruner(model, x[:2], opt, schedule, by=by, ignored_layers=[model[4]], **kw)
    widths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while not gp.done:
            if steps_before_resume is not None and gp.steps_done == steps_before_resume:
                state = json.loads(json.dumps(gp.state_dict()))  # a checkpoint, through JSON
                model_state, opt_state = model.state_dict(), opt.state_dict()
                model = _mlp(width)
                opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
                gp = GradualPruner(model, x[:2], opt, schedule, by=by, ignored_layers=[model[4]], **kw)
                gp.load_state_dict(state)
                model.load_state_dict(model_state)
                opt.load_state_dict(opt_state)
                steps_before_resume = None
            gp.step([x])
            widths.append((model[0].out_features, model[2].out_features))
    return widths, gp


@pytest.mark.parametrize(
    ("width", "final", "steps", "kind", "kw", "want"),
    [
        (10, 0.5, 4, "linear", {}, [(9, 9), (8, 8), (6, 6), (5, 5)]),  # was 6 of 10 at the end
        (10, 0.5, 4, "cubic", {}, [(7, 7), (6, 6), (5, 5), (5, 5)]),  # was 7 of 10
        (16, 0.75, 4, "cubic", {}, [(9, 9), (6, 6), (4, 4), (4, 4)]),  # was 6 of 16
        (16, 0.5, 4, "cubic", {"round_to": 4}, [(12, 12), (12, 12), (8, 8), (8, 8)]),  # was 12 throughout
        # a layer ratio was taken from the shrunk width at every step: 16 -> 8 -> 4 -> 2 -> 1
        (16, 0.5, 4, "cubic", {"layer_pruning_ratios": {"0": 0.5}}, [(11, 11), (9, 9), (8, 8), (8, 8)]),
    ],
)
def test_gradual_pruning_by_ratio_ends_at_the_count_one_step_would_keep(width, final, steps, kind, kw, want):
    from cleanai_core.gradual import PruningSchedule

    schedule = PruningSchedule(final=final, steps=steps, kind=kind)
    widths, _ = _gradual(width, schedule, **kw)
    assert widths == want
    # a one-step StructuredPruner at the final ratio keeps the same count
    one = StructuredPruner(_mlp(width), torch.randn(2, 6), "magnitude", pruning_ratio=final, ignored_layers=["4"], **kw)
    one = one.prune()
    assert (one[0].out_features, one[2].out_features) == want[-1]
    # resumed from a checkpoint taken after step 2: the same widths at every step after it
    assert _gradual(width, schedule, steps_before_resume=2, **kw)[0] == want


def test_gradual_pruning_under_global_ranking_removes_the_schedules_share_of_the_units():
    from cleanai_core.gradual import PruningSchedule

    widths, _ = _gradual(16, PruningSchedule(final=0.5, steps=4), global_pruning=True)
    # 32 units: 0.5 of them go, in the cubic schedule's shares 0.289, 0.438, 0.492, 0.5 of the
    # original units (was 18 of 32 kept at the end: each step's ratio applied to the shrunk units)
    assert [a + b for a, b in widths] == [32 - 9, 32 - 14, 32 - 15, 32 - 16]


def test_gradual_pruning_by_flops_takes_a_layer_ratio_once_over_all_the_steps():
    from cleanai_core.gradual import PruningSchedule

    widths, gp = _gradual(16, PruningSchedule(final=0.5, steps=4), by="flops", layer_pruning_ratios={"0": 0.5})
    # the layer with a ratio ends at half its width (was 4 of 16: half of the rest at two steps)
    assert [w[0] for w in widths] == [11, 9, 8, 8]
    # the others make up the FLOPs: 6*8 + 8*14 + 14*3 (+ biases' adds counted as PyTorch does)
    assert widths[-1] == (8, 14)
    assert gp.flops_share() == pytest.approx((6 * 8 + 8 * 14 + 14 * 3) / (6 * 16 + 16 * 16 + 16 * 3))


def test_iterative_pruning_to_a_flops_target_takes_a_layer_ratio_once_over_all_the_steps():
    x = torch.randn(32, 6)
    kw = dict(iterative_steps=4, layer_pruning_ratios={"0": 0.5}, ignored_layers=["4"])
    pruner = StructuredPruner(_mlp(16), x[:2], "magnitude", target_flops=0.5, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = pruner.prune()
    # the layer with a ratio lost half its width at every step: 1 of 16 kept (0.5 ** 4)
    assert (pruned[0].out_features, pruned[2].out_features) == (8, 13)
    assert [len(next(e.keep for e in step if e.module == "0")) for step in pruner.history.steps] == [14, 12, 10, 8]
    assert pruner.report()["flops_after"] / pruner.report()["flops_before"] == pytest.approx(
        (6 * 8 + 8 * 13 + 13 * 3) / (6 * 16 + 16 * 16 + 16 * 3), rel=0.02
    )


def test_the_plot_of_an_iterative_run_names_the_step_of_each_row(tmp_path, monkeypatch):
    import xml.etree.ElementTree as ET

    from cleanai_core.report import render_svg

    Net = _net_factory(tmp_path, monkeypatch)
    pruner, _ = _prune(Net().eval(), torch.randn(8, 3, 8, 8), pruning_ratio=0.5, iterative_steps=2)
    texts = [t.text for t in ET.fromstring(render_svg(pruner.report())).iter("{http://www.w3.org/2000/svg}text")]
    # the rows of both steps read "0", "1", "3", ... with nothing to tell them apart
    names = [t for t in texts if t and t.startswith(("0", "3")) and "/" not in t]
    assert names == ["0 (step 1)", "3 (step 1)", "0 (step 2)", "3 (step 2)"]
    assert [t for t in texts if t and "/" in t] == [
        "6/8", "6/8", "6/8", "6/8", "4/4", "4/6", "4/6", "4/6", "4/6", "4/4",
    ]  # fmt: skip


def test_a_gradual_step_that_its_count_needs_nothing_from_removes_nothing_without_a_warning():
    from cleanai_core.gradual import GradualPruner, PruningSchedule

    model = _mlp(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    gp = GradualPruner(model, x[:2], opt, PruningSchedule(final=0.5, steps=4), by="ratio", ignored_layers=[model[4]])
    for want in (7, 6, 5):
        gp.step([x])
        assert model[0].out_features == want
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was "the plan removes no unit ...; raise the ratio"
        gp.step([x])
    assert gp.done and model[0].out_features == 5 and [len(s) for s in gp.histories[-1].steps] == [0]


@pytest.mark.parametrize(("name", "kind"), [("2", "ReLU"), ("", "Sequential"), ("6", "AdaptiveAvgPool2d")])
def test_a_history_that_adds_a_bias_to_a_layer_without_a_weight_is_refused_by_replay(tmp_path, monkeypatch, name, kind):
    Net = _net_factory(tmp_path, monkeypatch)
    pruner, pruned = _prune(Net().eval(), torch.randn(8, 3, 8, 8), pruning_ratio=0.5)
    data = json.loads(json.dumps(pruner.history.to_json()))
    data["meta"]["added_biases"] = [name]
    fresh = Net()
    shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    # was AttributeError: 'ReLU' object has no attribute 'weight', from replay's bias creation
    with pytest.raises(UserError, match=rf"adds a bias to '{name}', which is a {kind}, not a layer with a weight"):
        PruningHistory.from_json(data).replay(fresh)
    assert {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == shapes  # not changed
    save_pruned(tmp_path / "out", pruned, pruner.history, "net_o11:Net")
    (tmp_path / "out" / "history.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=rf"'added_biases' names '{name}', which is a {kind}"):
        load_pruned(tmp_path / "out", trust_code=True)


def test_the_reports_accuracy_leaves_out_labels_of_minus_100_as_recovery_does(tmp_path, monkeypatch):
    np = pytest.importorskip("numpy")
    from cleanai_core.cli import main
    from cleanai_plugins.io.evaluation import cleanai_evaluate

    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = torch.randn(8, 4)
    y = lin(x).argmax(1)
    y[:3] = -100
    y[3] = (y[3] + 1) % 3  # one labelled sample wrong: 4 of 5
    cpu = torch.device("cpu")
    # was UserError: labels go from -100 to 2 but the model has 3 outputs
    assert cleanai_evaluate(model=lin, loader=[(x, y)], device=cpu) == {"accuracy": 0.8, "evaluated": 5}
    got = cleanai_evaluate(model=lin, loader=[(x, torch.full((8,), -100))], device=cpu)
    assert got == {"accuracy_note": "every label of the evaluation data is -100 (ignored)"}
    binary = nn.Linear(4, 1)
    labels = (binary(x)[:, 0] > 0).long()
    labels[[0, 5]] = -100
    assert cleanai_evaluate(model=binary, loader=[(x, labels)], device=cpu) == {"accuracy": 1.0, "evaluated": 6}

    # the command line stopped with that error; now the original scores 1.0 on its own labels
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    images = torch.randn(40, 1, 6, 6)
    with torch.no_grad():
        classes = model(images).argmax(1)
    classes[::4] = -100
    torch.save(model, tmp_path / "model.pth")
    np.savez(tmp_path / "data.npz", x=images.numpy(), y=classes.numpy())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLEANAI_DISABLE_PLUGIN_AUTOLOAD", "1")
    args = ["--model", "model.pth", "--trust-model", "--data", "data.npz", "--ratio", "0.3", "--out", "o"]
    assert main(["prune", *args, "--quiet", "--threads", "1", "--latency-repeats", "1"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["accuracy_before"] == 1.0 and report["accuracy_note"] is None


def _ddp_worker(rank: int, init: str, out: str) -> None:
    """Two gloo ranks train a gradual run as the refusal says: GradualPruner on the module
    DDP wraps, wrapped again after each step; each rank writes its first layer's weight."""
    from datetime import timedelta

    import torch.distributed as dist

    from cleanai_core.distributed import shard
    from cleanai_core.gradual import GradualPruner, PruningSchedule

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=2, timeout=timedelta(seconds=300)
    )
    try:
        g = torch.Generator().manual_seed(1)
        mine = shard([(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)])
        ddp = nn.parallel.DistributedDataParallel(_mlp(16))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        schedule = PruningSchedule(final=0.5, steps=2)
        try:
            GradualPruner(ddp, mine[0][0][:2], opt, schedule)
        except UserError as exc:
            (Path(out) / f"refused-{rank}.txt").write_text(str(exc))
        gp = GradualPruner(ddp.module, mine[0][0][:2], opt, schedule, by="ratio", ignored_layers=["4"])
        for _ in range(2):
            for x, y in mine:
                opt.zero_grad()
                nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
            gp.step(mine)
            ddp = nn.parallel.DistributedDataParallel(ddp.module)
        for x, y in mine:
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        torch.save(ddp.module[0].weight.detach(), Path(out) / f"w-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_pruners_refuse_a_ddp_model(tmp_path):
    import torch.distributed as dist

    from cleanai_core.gradual import GradualPruner, PruningSchedule

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(_mlp(16))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        shapes = [tuple(p.shape) for p in ddp.parameters()]
        with pytest.raises(UserError, match=r"DistributedDataParallel model.*GradualPruner\(ddp\.module"):
            GradualPruner(ddp, torch.randn(2, 6), opt, PruningSchedule(final=0.5, steps=2))
        # StructuredPruner returned a DDP copy (or pruned the wrapper in place) whose training synced the
        # unpruned parameters' gradients: two ranks' first layers differed after 3 SGD steps
        for inplace in (False, True):
            with pytest.raises(UserError, match=r"\(StructuredPruner\(ddp\.module, \.\.\.\)\) and wrap the pruned"):
                StructuredPruner(ddp, torch.randn(2, 6), "magnitude", pruning_ratio=0.5, inplace=inplace)
        assert [tuple(p.shape) for p in ddp.parameters()] == shapes
    finally:
        dist.destroy_process_group()


@pytest.mark.corpus  # two spawned processes: 15-35 s
def test_the_ddp_recipe_keeps_the_ranks_of_a_gradual_run_in_step(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        # before: the step ran; the next backward synced the parameters DDP was built with, not the new ones,
        # and the ranks' weights drifted apart (first layer 8 x 6, not equal between the ranks)
        assert "DistributedDataParallel" in (tmp_path / f"refused-{rank}.txt").read_text()
    w0, w1 = (torch.load(tmp_path / f"w-{rank}.pt") for rank in range(2))
    assert w0.shape == (8, 6) and torch.equal(w0, w1)
