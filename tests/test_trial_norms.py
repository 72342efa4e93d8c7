"""Sensitivity trials and allocation candidates get their BatchNorm statistics corrected
as the prune corrects the model it builds (#18): uncorrected, they measured another model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.metrics import count_flops
from cleanai_core.sensitivity import allocate_ratios, analyse_sensitivity


def images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


def trained_chain() -> nn.Sequential:
    """conv-BN-ReLU x3 with running statistics that describe the data (as after training)."""
    torch.manual_seed(2)
    net = nn.Sequential()
    for i, (cin, cout) in enumerate(((3, 12), (12, 16), (16, 16))):
        net.add_module(f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1))
        net.add_module(f"bn{i}", nn.BatchNorm2d(cout, momentum=None))
        net.add_module(f"act{i}", nn.ReLU())
    net.pool, net.flat, net.head = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)
    with torch.no_grad():
        net.head.weight.mul_(20.0)
        net.train()
        for x in images(4, seed=7):
            net(x)
    return net.eval()


CAL, EVAL = images(2, seed=1), [(x, torch.arange(8) % 5) for x in images(2, seed=3)]


def pruner_for(net, **options):
    p = StructuredPruner(net, CAL[0][:1], ignored_layers=[net.head], **options)
    p.collect_activations(CAL, progress=False)
    return p


@pytest.fixture(scope="module")
def exact():
    """Trials corrected on all 16 calibration samples with the prune's passes: the prune's own correction."""
    net = trained_chain()
    p = pruner_for(net)
    return net, p, analyse_sensitivity(p, EVAL, progress=False, bn_passes=1, bn_samples=16)


def test_a_curve_point_is_the_prune_of_that_group_alone_with_its_norms_corrected(exact):
    net, p, result = exact
    c = next(c for c in result.curves if c.layer == "conv0")
    alone = pruner_for(net, layer_pruning_ratios={"conv0": 0.5, "conv1": 0.0, "conv2": 0.0}).prune()
    truth = result.evaluator.fidelity(alone)[0]
    assert c.kl[2] == pytest.approx(truth, rel=1e-3)
    # uncorrected (what the trials measured before): another model, far off
    raw = analyse_sensitivity(p, EVAL, progress=False, ratios=(0.5,), bn_passes=0)
    assert abs(next(c for c in raw.curves if c.layer == "conv0").kl[1] - truth) > 0.2 * truth
    # the default: one pass on at most 16 calibration samples, close to the prune's
    cheap = analyse_sensitivity(p, EVAL, progress=False, ratios=(0.5,))
    assert next(c for c in cheap.curves if c.layer == "conv0").kl[1] == pytest.approx(truth, rel=0.1)


def test_the_trial_correction_leaves_the_users_model_alone(exact):
    net = trained_chain()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    analyse_sensitivity(pruner_for(net), EVAL, progress=False, ratios=(0.5,))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_candidates_are_measured_as_the_prune_builds_them(exact):
    net, p, result = exact
    alloc = allocate_ratios(p, result, target_flops=0.5)
    assert alloc.kl[alloc.method] <= alloc.kl["sensitivity"]
    auto = pruner_for(net, layer_pruning_ratios=alloc.layer_ratios).prune()
    assert count_flops(auto, CAL[0][:1]) / count_flops(net, CAL[0][:1]) == pytest.approx(alloc.cost)
    assert alloc.kl[alloc.method] == pytest.approx(result.evaluator.fidelity(auto)[0], rel=1e-3)
