"""BatchNorm correction stops its passes once a pass moves no norm: as many passes as the
chain of norms behind the pruned layers needs, the same statistics as every pass."""

from __future__ import annotations

import copy

import torch
from torch import nn

from cleanai_core.bn_correction import correct_batchnorm, recording


def _chain(norms_after: int) -> nn.Sequential:
    """conv1 -> relu -> conv2, then ``norms_after`` (BN -> relu -> conv) stages: pruning
    conv1's outputs changes the first BN's input, and each BN the next one's."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1)]
    for _ in range(norms_after):
        layers += [nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1)]
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _pruned(model: nn.Sequential, keep: int = 5) -> nn.Sequential:
    """conv1's outputs and conv2's inputs cut to the first ``keep`` channels."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        c1, c2 = pruned[0], pruned[2]
        c1.weight = nn.Parameter(c1.weight[:keep].clone())
        c1.bias = nn.Parameter(c1.bias[:keep].clone())
        c2.weight = nn.Parameter(c2.weight[:, :keep].clone())
    return pruned


def _correct(model, pruned, passes: int, tol: float) -> tuple[int, dict[str, torch.Tensor]]:
    """(passes run, the corrected statistics)."""
    torch.manual_seed(1)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    moments: dict = {}
    with recording(model, moments), torch.no_grad():
        for b in batches:
            model(b)
    runs = []

    def run(m, b):
        runs.append(1)
        m(b)

    pruned = copy.deepcopy(pruned)
    correct_batchnorm(pruned, moments, {}, lambda: iter(batches), run, passes=passes, tol=tol)
    return len(runs) // len(batches), {k: v.clone() for k, v in pruned.state_dict().items() if "running" in k}


def test_unchanged_inputs_stop_after_one_pass_with_the_trained_statistics():
    model = _chain(2)
    passes, stats = _correct(model, copy.deepcopy(model), passes=3, tol=1e-3)
    assert passes == 1
    for k, v in stats.items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=1e-6, atol=1e-7)


def test_one_norm_behind_the_pruned_layer_needs_two_passes_and_matches_every_pass():
    model = _chain(1)
    pruned = _pruned(model)
    passes, early = _correct(model, pruned, passes=5, tol=1e-3)
    all_passes, full = _correct(model, pruned, passes=5, tol=0.0)
    assert (passes, all_passes) == (2, 5)  # the second pass measures what the first did
    assert not torch.allclose(early["3.running_mean"], model.state_dict()["3.running_mean"])  # it did move
    for k in full:
        torch.testing.assert_close(early[k], full[k], rtol=1e-6, atol=1e-7)


def test_a_chain_of_norms_runs_a_pass_per_link_then_stops():
    model = _chain(3)
    pruned = _pruned(model)
    passes, early = _correct(model, pruned, passes=8, tol=1e-3)
    _, full = _correct(model, pruned, passes=8, tol=0.0)
    assert passes == 4  # three norms in a chain: three passes carry the change down, the fourth confirms
    for k in full:
        torch.testing.assert_close(early[k], full[k], rtol=1e-3, atol=1e-3)
