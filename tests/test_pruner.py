"""StructuredPruner: planning options, dry runs, copies vs inplace, compensation,
history round trip, report consistency, argument errors."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.history import PruningHistory
from cleanai_core.metrics import count_flops


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32, 24)
        self.fc2 = nn.Linear(24, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


SIZES = {"conv1": 16, "conv2": 16, "conv3": 32, "fc1": 24}


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


def loader(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


X = loader(1, seed=9)[0]


def pruner(model=None, calibrate=True, **kw) -> StructuredPruner:
    model = model if model is not None else make_net()
    kw.setdefault("pruning_ratio", 0.3)
    p = StructuredPruner(model, X[:2], **kw)
    if calibrate:
        p.collect_activations(loader(), progress=False)
    return p


def widths(model: nn.Module) -> dict[str, int]:
    return {n: getattr(model, n).weight.shape[0] for n in SIZES}


def group_of(plan, module: str):
    return next(gp for gp in plan.groups if any(s.kind == "out" and s.module == module for s in gp.group.slices))


# -- planning ---------------------------------------------------------------------------


def test_uniform_prunes_floor_ratio_per_group():
    p = pruner(pruning_ratio=0.3)
    plan = p.plan()
    for name, n in SIZES.items():
        assert group_of(plan, name).n_pruned == math.floor(0.3 * n)
    assert widths(p.prune()) == {n: c - math.floor(0.3 * c) for n, c in SIZES.items()}


def test_global_respects_max_layer_ratio():
    p = pruner(pruning_ratio=0.6, global_pruning=True, max_layer_ratio=0.5)
    plan = p.plan()
    counts = {n: group_of(plan, n).n_pruned for n in SIZES}
    caps = {n: math.floor(0.5 * c) for n, c in SIZES.items()}
    assert all(counts[n] <= caps[n] for n in SIZES)
    # 60% of all units exceeds the sum of the 50% caps: every group is capped
    assert counts == caps
    p2 = pruner(pruning_ratio=0.3, global_pruning=True, max_layer_ratio=0.5)
    plan2 = p2.plan()
    assert sum(group_of(plan2, n).n_pruned for n in SIZES) == math.floor(0.3 * sum(SIZES.values()))


def test_layer_pruning_ratios_by_module_name_glob():
    net = make_net()
    p = pruner(net, pruning_ratio=0.25, layer_pruning_ratios={net.conv1: 0.5, "conv2": 0.75, "c*3": 0.125})
    w = widths(p.prune())
    assert w == {"conv1": 8, "conv2": 4, "conv3": 28, "fc1": 18}


@pytest.mark.parametrize("spec", ["module", "conv2", "conv[2]", "type"])
def test_ignored_layers_keep_their_output_channels(spec):
    net = make_net()
    ignored = {"module": [net.conv2], "type": [nn.Conv2d]}.get(spec, [spec])
    w = widths(pruner(net, pruning_ratio=0.5, ignored_layers=ignored).prune())
    assert w["conv2"] == 16
    assert w["fc1"] == 12
    if spec == "type":
        assert w["conv1"] == 16 and w["conv3"] == 32
    else:
        assert w["conv1"] == 8 and w["conv3"] == 16


def test_round_to_gives_multiples():
    w = widths(pruner(pruning_ratio=0.4, round_to=8).prune())
    assert all(c % 8 == 0 for c in w.values()), w
    assert w["conv3"] < 32 and w["fc1"] < 24  # something was pruned (32 -> 24, 24 -> 16)


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_target_flops_is_met_within_a_few_percent(target):
    p = pruner(target_flops=target)
    small = p.prune()
    ratio = count_flops(small, X[:2]) / count_flops(p.model, X[:2])
    assert abs(ratio - target) < 0.05, ratio
    rep = p.report()
    assert rep["flops_after"] / rep["flops_before"] == pytest.approx(ratio)


@pytest.mark.parametrize(("target", "warned"), [(0.8, True), (0.54, False)])
def test_a_target_met_far_below_is_reported(target, warned):
    """One group of two units: one ratio for all keeps all of it or half, nothing between,
    so a FLOPs target of 0.8 lands at about half the FLOPs; the pruner says so (and what
    lands closer) instead of overshooting silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 2), nn.ReLU(), nn.Linear(2, 4)).eval()
    x = torch.randn(2, 16)
    p = StructuredPruner(model, x, "magnitude", target_flops=target, ignored_layers=[model[2]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = p.prune()
    kept = count_flops(small, x) / count_flops(model, x)
    assert small[0].out_features == 1 and kept == pytest.approx(0.5)
    far = [w for w in caught if "the pruned model keeps" in str(w.message)]
    assert bool(far) == warned
    if warned:
        msg = str(far[0].message)
        assert f"target_flops=0.8: the pruned model keeps {kept:.2f}" in msg and "next ratio down keeps 1.00" in msg
        assert "--auto" in msg


@pytest.mark.parametrize(
    ("kind", "target", "warned"), [("params", 0.3, True), ("flops", 0.3, True), ("params", 0.97, False)]
)
def test_a_target_out_of_reach_is_reported_with_what_does_not_shrink(kind, target, warned):
    """A model whose frozen embedding and head hold most parameters (a small LLM with its
    hidden size kept): the search stopped at its highest ratio and pruned to 0.6 of the
    parameters without a word for a target of 0.3."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(500, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 500))
    x = torch.randint(0, 500, (2, 5))
    p = StructuredPruner(
        model.eval(), x, "magnitude", ignored_layers=[model[0], model[3]], **{f"target_{kind}": target}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = p.prune()
    kept = sum(t.numel() for t in small.parameters()) / sum(t.numel() for t in model.parameters())
    assert small[1].out_features < 32 and (kept > 0.9 if warned else kept <= 0.97)
    out = [str(w.message) for w in caught if "cannot be reached" in str(w.message)]
    assert bool(out) == warned
    if warned:
        assert out[0].startswith(f"target_{kind}={target:g} cannot be reached: pruning 95% of every group keeps")
        # all but the first linear layer (its output units prune) and the second's input columns
        assert "16,516 parameters do not shrink, the largest 0.weight (8,000), 4.weight (8,000), 4.bias (500)" in out[0]


def test_iterative_steps():
    p = pruner(pruning_ratio=0.5, iterative_steps=2)
    small = p.prune()
    w = widths(small)
    # each step aims at a count from the original widths: 16 -> 12 -> 8, 32 -> 24 -> 16, 24 -> 18 -> 12
    assert w == {"conv1": 8, "conv2": 8, "conv3": 16, "fc1": 12}
    assert small(X).shape == (8, 4)
    assert len(p.history) == 2


def test_iterative_steps_do_not_compound_layer_ratios():
    """Regression: each step applied the full per-layer ratio, so two steps of
    ``conv3: 0.5`` kept a quarter of conv3 instead of half."""
    one = widths(pruner(pruning_ratio=0.25, layer_pruning_ratios={"conv3": 0.5}).prune())
    two = widths(pruner(pruning_ratio=0.25, layer_pruning_ratios={"conv3": 0.5}, iterative_steps=2).prune())
    assert one["conv3"] == 16
    # counts from the original widths: 32 -> 24 -> 16 (not 8, nor 17 from rounding per step)
    assert two == one


def test_iterative_steps_with_target_flops():
    """Regression: with target_flops, iterative pruning used pruning_ratio / steps and missed the target."""
    p = pruner(target_flops=0.5, iterative_steps=2)
    small = p.prune()
    ratio = count_flops(small, X[:2]) / count_flops(p.model, X[:2])
    assert abs(ratio - 0.5) < 0.05, ratio
    assert len(p.history) == 2


# -- copies, dry run, inplace -----------------------------------------------------------


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [id(p) for p in model.parameters()]


def test_plan_is_a_dry_run():
    net = make_net()
    sd, ids = _snapshot(net)
    p = pruner(net)
    plan = p.plan()
    assert plan.n_pruned > 0
    sd2, ids2 = _snapshot(net)
    assert ids2 == ids
    assert sd2.keys() == sd.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert widths(net) == SIZES


def test_prune_returns_a_copy_unless_inplace():
    net = make_net()
    sd, ids = _snapshot(net)
    ref = net(X)
    small = pruner(net, pruning_ratio=0.5).prune()
    assert small is not net
    assert widths(small)["conv1"] == 8
    sd2, ids2 = _snapshot(net)
    assert ids2 == ids and all(torch.equal(sd[k], sd2[k]) for k in sd)
    torch.testing.assert_close(net(X), ref, rtol=0, atol=0)

    net2 = make_net()
    out = pruner(net2, pruning_ratio=0.5, inplace=True).prune()
    assert out is net2
    assert widths(net2) == {n: c // 2 for n, c in SIZES.items()}
    assert net2(X).shape == (8, 4)


def test_bias_compensation_brings_output_closer():
    """Post-ReLU activations have non-zero mean: folding the removed channels' mean into
    the consumers' bias must reduce the output error (BN recalibration off in both)."""
    net = make_net()
    xs = loader(4, seed=5)
    ref = torch.cat([net(x) for x in xs]).detach()

    def err(comp: bool) -> float:
        small = pruner(net, pruning_ratio=0.5, bias_compensation=comp, recalibrate_bn=False).prune()
        with torch.no_grad():
            return float(((torch.cat([small(x) for x in xs]) - ref) ** 2).mean())

    on, off = err(True), err(False)
    assert on < 0.7 * off, (on, off)


# -- history, report --------------------------------------------------------------------


def test_history_round_trip_replay_reproduces_outputs(tmp_path):
    net = make_net()
    p = pruner(net, pruning_ratio=0.4, bias_compensation=False)
    small = p.prune()
    text = json.dumps(p.history.to_json())
    hist = PruningHistory.from_json(json.loads(text))
    fresh = hist.replay(make_net(seed=123))
    assert widths(fresh) == widths(small)
    fresh.load_state_dict(small.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(X), small(X), rtol=0, atol=0)
    p.history.save(tmp_path / "h.json")
    again = PruningHistory.load(tmp_path / "h.json").replay(make_net(seed=7))
    again.load_state_dict(small.state_dict())
    torch.testing.assert_close(again.eval()(X), small(X), rtol=0, atol=0)


def test_history_with_compensation_needs_bias_created_first():
    net = make_net()
    net.bn2 = nn.Identity()  # with its BatchNorm, conv2's new bias would go into the norm's running mean
    p = pruner(net, pruning_ratio=0.4, bias_compensation=True)
    small = p.prune()
    assert small.conv2.bias is not None and small.conv3.bias is None  # compensation added a bias to conv2
    assert p.history.meta["added_biases"] == ["conv2"]
    rebuilt = make_net(seed=1)
    rebuilt.bn2 = nn.Identity()
    fresh = PruningHistory.from_json(json.loads(json.dumps(p.history.to_json()))).replay(rebuilt)
    for name in ("conv1", "conv2", "conv3"):
        mod = getattr(fresh, name)
        if getattr(small, name).bias is not None and mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(mod.out_channels))
    fresh.load_state_dict(small.state_dict())
    torch.testing.assert_close(fresh.eval()(X), small(X), rtol=0, atol=0)


def test_report_is_consistent_with_the_pruned_model():
    p = pruner(pruning_ratio=0.3)
    with pytest.raises(UserError, match="prune"):
        p.report()
    small = p.prune()
    rep = p.report()
    by_name = {(e["name"], e["slice"]): e for e in rep["layers"]}
    for name, n in SIZES.items():
        e = by_name[(name, "out")]
        after = getattr(small, name).weight.shape[0]
        assert e["channels_before"] == n and e["channels_after"] == after
        idx = e["pruned_indices"]
        assert len(idx) == len(set(idx)) == n - after and all(0 <= i < n for i in idx)
        assert len(e["importance_scores"]["pruned"]) == len(idx)
        assert len(e["importance_scores"]["kept"]) == after
        # pruned units score no higher than kept ones (uniform plan, lowest first)
        assert max(e["importance_scores"]["pruned"]) <= min(e["importance_scores"]["kept"])
    # the kept rows are the original rows minus the pruned indices
    keep = [i for i in range(16) if i not in by_name[("conv1", "out")]["pruned_indices"]]
    torch.testing.assert_close(small.conv1.weight, p.model.conv1.weight[keep])
    assert rep["params_after"] < rep["params_before"]


# -- argument errors --------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0, 1, -0.1, "x", 1.5, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(UserError, match="between 0 and 1"):
        StructuredPruner(make_net(), X[:2], "magnitude", pruning_ratio=ratio)
    if ratio == 0:  # a layer ratio of 0 keeps that layer whole
        assert StructuredPruner(make_net(), X[:2], "magnitude", layer_pruning_ratios={"conv1": 0}).layer_ratios
        return
    with pytest.raises(UserError, match="between 0 and 1"):
        StructuredPruner(make_net(), X[:2], "magnitude", layer_pruning_ratios={"conv1": ratio})


def test_bad_arguments():
    with pytest.raises(UserError, match="unknown importance 'nope'.*magnitude"):
        StructuredPruner(make_net(), X[:2], "nope")
    with pytest.raises(UserError, match="every layer is ignored"):
        StructuredPruner(make_net(), X[:2], "magnitude", ignored_layers=[nn.Conv2d, nn.Linear])
    with pytest.raises(UserError, match="matches no layer"):
        StructuredPruner(make_net(), X[:2], "magnitude", ignored_layers=["nonexistent"])
    with pytest.raises(UserError, match="target_flops"):
        StructuredPruner(make_net(), X[:2], "magnitude", target_flops=1.2)
    with pytest.raises(UserError, match="must be a torch.nn.Module"):
        StructuredPruner(copy.deepcopy, X[:2])


def test_container_ratio_applies_to_its_layers():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    pruner = StructuredPruner(
        model, torch.randn(1, 3, 32, 32), "magnitude", pruning_ratio=0.3,
        layer_pruning_ratios={model.layer4: 0.5}, ignored_layers=[model.layer1],
    )  # fmt: skip
    pruned = pruner.prune()
    assert pruned.layer4[0].conv1.out_channels == 256  # 512 * (1 - 0.5)
    assert pruned.layer3[0].conv1.out_channels == 180  # 256 * (1 - 0.3), rounded down removal
    assert pruned.layer1[0].conv1.out_channels == 64  # ignored container


def test_report_gives_no_score_to_units_that_were_never_scored():
    """fc2's outputs (the classifier head, kept whole) belong to no group of the plan: the
    report once gave them a score of 0.0 each and report.md a kept range of "0 - 0"."""
    from cleanai_core.report import render_markdown

    p = pruner(pruning_ratio=0.3)
    p.prune()
    rep = p.report()
    by_name = {(e["name"], e["slice"]): e for e in rep["layers"]}
    head = by_name[("fc2", "out")]
    assert head["channels_before"] == head["channels_after"] == 4 and head["pruned_indices"] == []
    assert head["importance_scores"] == {"pruned": [], "kept": [None] * 4}
    scores = p.score()
    conv1 = by_name[("conv1", "out")]  # a scored layer keeps its real scores
    group = next(gp for gp in p.plan().groups if "conv1" in gp.group.modules())
    assert sorted(conv1["importance_scores"]["kept"]) == sorted(  # six significant digits
        float(f"{v:.6g}") for v in scores[group.group.id][~group.pruned].double().tolist()
    )
    md = render_markdown(rep)
    assert "| `fc2` | 4 | 4 | 0 | - | not scored |" in md
    low, high = min(conv1["importance_scores"]["kept"]), max(conv1["importance_scores"]["kept"])
    assert f"| {low:.3g} - {high:.3g} |" in md
    json.dumps(rep)  # None is valid JSON (null)
