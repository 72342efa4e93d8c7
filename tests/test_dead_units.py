"""Dead, constant and near-duplicate units: found in the streamed statistics, listed in
the report, and pruned exactly (outputs unchanged) with ``prune_dead_only``."""

from __future__ import annotations

import pytest
import torch
from test_pruner import X, loader, make_net

from cleanai_core import StructuredPruner
from cleanai_core.dead_units import find_dead_units, removable_units
from cleanai_core.errors import UserError

DEAD = [1, 4, 9]  # bn1 channels that never activate after the ReLU
CONSTANT = [6, 12]  # bn1 channels that always output 0.7


def planted(seed: int = 0):
    net = make_net(seed)
    with torch.no_grad():
        net.bn1.weight[DEAD] = 0.0
        net.bn1.bias[DEAD] = -1.0
        net.bn1.weight[CONSTANT] = 0.0
        net.bn1.bias[CONSTANT] = 0.7
        net.fc1.weight[5] = net.fc1.weight[2]  # fc1 unit 5 duplicates unit 2
        net.fc1.bias[5] = net.fc1.bias[2]
    return net


def collected(net, **options) -> StructuredPruner:
    p = StructuredPruner(net, X[:1], ignored_layers=[net.fc2], **options)
    p.collect_activations(loader(), progress=False)
    return p


def test_find_dead_units_names_the_planted_channels_at_their_consumer():
    p = collected(planted())
    found = {f.layer: f for f in find_dead_units(p.graph, p.stats)}
    assert found["conv2"].dead == DEAD
    assert found["conv2"].constant == CONSTANT
    assert found["conv2"].channels == 16
    pair = found["fc2"].duplicates[0]
    assert pair[:2] == (2, 5) and pair[2] == pytest.approx(1.0, abs=1e-6)


def test_removable_units_are_the_dead_ones_not_the_constant_ones():
    p = collected(planted())
    g = next(g for g in p.graph.groups(prunable_only=True) if "conv1" in g.modules())
    assert removable_units(p.graph, p.stats)[g.units].nonzero().squeeze(1).tolist() == DEAD


@pytest.mark.parametrize("reconstruction", [True, False])
def test_prune_dead_only_removes_exactly_those_units_and_keeps_the_outputs(reconstruction):
    net = planted()
    p = collected(net, prune_dead_only=True, reconstruction=reconstruction, recalibrate_bn=False)
    found = {f.layer: f for f in find_dead_units(p.graph, p.stats)}
    pruned = p.prune()
    assert pruned.conv1.out_channels == 16 - len(DEAD)
    assert pruned.conv2.in_channels == 16 - len(DEAD)
    for producer, consumer, width in (("conv2", "conv3", 16), ("conv3", "fc1", 32), ("fc1", "fc2", 24)):
        gone = len(found[consumer].dead) if consumer in found else 0
        assert getattr(pruned, producer).weight.shape[0] == width - gone
    for x in loader():  # units dead on the calibration data: outputs unchanged on it
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-5)


def test_report_lists_dead_units():
    p = collected(planted(), pruning_ratio=0.25)
    p.prune()
    rows = {r["layer"]: r for r in p.report()["dead_units"]}
    assert rows["conv2"]["dead"] == DEAD and rows["conv2"]["constant"] == CONSTANT
    assert rows["fc2"]["duplicate_pairs"] == 1


def test_prune_dead_only_without_statistics_says_what_to_do():
    net = planted()
    p = StructuredPruner(net, X[:1], prune_dead_only=True)
    with pytest.raises(UserError, match="collect_activations"):
        p.prune()


def test_layer_ratio_zero_keeps_the_layer_and_negative_is_refused():
    net = make_net()
    p = StructuredPruner(net, X[:1], "magnitude", pruning_ratio=0.5, layer_pruning_ratios={"conv2": 0.0})
    pruned = p.prune()
    assert pruned.conv2.out_channels == 16 and pruned.conv1.out_channels == 8
    with pytest.raises(UserError, match="0 keeps the layer whole"):
        StructuredPruner(net, X[:1], "magnitude", layer_pruning_ratios={"conv2": -0.1})


def test_report_md_lists_removed_channels_with_scores_and_the_dead_units(tmp_path):
    from cleanai_core.report import write_report

    p = collected(planted(), pruning_ratio=0.25)
    p.prune()
    rep = p.report()
    write_report(tmp_path, rep)
    md = (tmp_path / "report.md").read_text()
    conv1 = next(layer for layer in rep["layers"] if layer["name"] == "conv1")
    first = conv1["pruned_indices"][0]
    score = conv1["importance_scores"]["pruned"][0]
    kept = conv1["importance_scores"]["kept"]
    row = next(line for line in md.splitlines() if line.startswith("| `conv1` |"))
    assert f"{first} ({score:.3g})" in row
    assert f"{min(kept):.3g} - {max(kept):.3g}" in row
    dead_row = next(line for line in md.split("## Dead and redundant units")[1].splitlines() if "`conv2`" in line)
    assert "3: 1, 4, 9" in dead_row and "2: 6, 12" in dead_row
