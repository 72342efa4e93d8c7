"""The BatchNorm correction's estimate: the regression on the original's input goes to
the calibration data's own statistics where pruning left a norm's input unrelated to what
it was, and shrinks toward the trained statistics where few values per channel leave the
change within its noise (a norm after a linear at calibration batch size 1)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from cleanai_core.bn_correction import correct_batchnorm, recording


def _corrected(batch: int, batches: int, seed: int = 0, channels: int = 16):
    """A linear then a BN1d whose running statistics were trained on the data's distribution
    (4096 inputs), and a copy whose linear has fresh weights of the same scale: its BN input
    is unrelated to the original's. Returns the original, the corrected copy, the copy's BN
    input on the 4096 inputs (the truth it should be normalised by) and the warnings."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, channels), nn.BatchNorm1d(channels, momentum=None)).train()
    big = torch.randn(4096, 8)
    with torch.no_grad():
        model(big)
    model.eval()
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned[0].weight.copy_(nn.Linear(8, channels).weight)
    g = torch.Generator().manual_seed(seed + 1)
    data = [torch.randn(batch, 8, generator=g) for _ in range(batches)]
    moments: dict = {}
    with recording(model, moments), torch.no_grad():
        for b in data:
            model(b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        correct_batchnorm(pruned, moments, {}, lambda: iter(data), lambda m, b: m(b), original=model)
    with torch.no_grad():
        truth = pruned[0](big)
    return model, pruned, truth, [str(w.message) for w in caught]


def test_an_unrelated_input_gets_the_calibration_data_statistics():
    """512 calibration inputs: the estimate lands near the statistics of the new input (what
    recalibration measures), within 0.1 sd and 12%; moving the trained ones by the difference
    would land a channel 0.2 sd or 30% away."""
    model, pruned, truth, caught = _corrected(64, 8)
    bn = pruned[1]
    mean, var = truth.mean(0), truth.var(0, correction=0)
    assert float(((bn.running_mean - mean).abs() / var.sqrt()).max()) < 0.1
    assert float((bn.running_var / var).log().abs().max()) < 0.12
    assert not caught  # 512 values per channel: nothing uncertain


def test_batch_size_one_leaves_noise_out_and_warns():
    """Three calibration batches of one: three values per channel. Moving the statistics by
    what three values say moved a variance by 67-2600x and a mean by up to 2.7 sd (the truth:
    2-10x, 0.1 sd); the estimate moves no variance by 6x, no mean by 2 sd, is off the true
    variance by at most 3x what the trained statistics are (1-2.3x here; the moves by
    the difference: 3.5-640x), and says it is uncertain."""
    for seed in range(8):
        model, pruned, truth, caught = _corrected(1, 3, seed)
        trained, bn = model[1], pruned[1]
        moved_var = float((bn.running_var / trained.running_var).log().abs().max().exp())
        moved_mean = float(((bn.running_mean - trained.running_mean).abs() / trained.running_var.sqrt()).max())
        true_var = truth.var(0, correction=0)
        off_var = float((bn.running_var / true_var).log().abs().max().exp())
        off_trained = float((trained.running_var / true_var).log().abs().max().exp())
        assert moved_var < 6.0 and moved_mean < 2.0 and off_var < 3 * off_trained, (
            seed,
            moved_var,
            moved_mean,
            off_var,
        )
        assert len(caught) == 1 and "uncertain" in caught[0]


def test_identical_input_keeps_the_trained_statistics_at_batch_size_one():
    """No change (the pruned model's BN input is the original's): exactly as trained, with
    no warning, whatever the count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    pruned = copy.deepcopy(model)
    data = [torch.randn(1, 8) for _ in range(3)]
    moments: dict = {}
    with recording(model, moments), torch.no_grad():
        for b in data:
            model(b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        correct_batchnorm(pruned, moments, {}, lambda: iter(data), lambda m, b: m(b), original=model)
    assert torch.equal(pruned[1].running_mean, model[1].running_mean)
    assert torch.equal(pruned[1].running_var, model[1].running_var)


def test_the_null_divergence_beyond_the_simulated_counts_falls_as_one_over_n():
    from cleanai_core.bn_estimate import NULL_SIMULATED_UP_TO, _null_divergence, _simulated_null

    for n in (2 * NULL_SIMULATED_UP_TO, 8 * NULL_SIMULATED_UP_TO):
        assert _null_divergence(n, 2048) == pytest.approx(_simulated_null(n, 256), rel=5e-3)
    assert _null_divergence(100, 64) == _simulated_null(100, 64) > _null_divergence(100, 256)
    assert _null_divergence(1, 64) == math.inf
