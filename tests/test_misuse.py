"""API misuse gets a UserError naming the problem and the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.errors import UserError


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    ).eval()


def _x(n: int = 2, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(n)).to(dtype)


def test_torchscript_model_is_refused():
    with pytest.raises(UserError, match="TorchScript.*Prune the original model"):
        StructuredPruner(torch.jit.script(_net()), _x())


def test_example_inputs_on_the_meta_device_are_refused():
    with pytest.raises(UserError, match="meta device.*real tensors"):
        StructuredPruner(_net(), torch.empty(2, 3, 4, 4, device="meta"))


def test_float64_calibration_batches_are_cast_to_the_models_dtype():
    model = _net()
    ref = StructuredPruner(model, _x(), pruning_ratio=0.5).collect_activations([_x(4)], progress=False)
    p = StructuredPruner(model, _x(), pruning_ratio=0.5).collect_activations([_x(4, torch.float64)], progress=False)
    key = next(iter(ref.stats))
    torch.testing.assert_close(p.stats[key].mean, ref.stats[key].mean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert p.prune()(_x()).shape == (2, 5)


def _taylor(labels):
    p = StructuredPruner(_net(), _x(), "taylor", pruning_ratio=0.5)
    return p.collect_activations([(_x(4), labels)], progress=False)


def test_taylor_with_more_labels_than_inputs_is_refused():
    with pytest.raises(UserError, match="4 inputs but 6 labels"):
        _taylor(torch.zeros(6, dtype=torch.long))


def test_taylor_with_float_labels_is_refused():
    with pytest.raises(UserError, match="integer class labels.*float32"):
        _taylor(torch.zeros(4))


def test_taylor_with_integer_labels_works():
    p = _taylor(torch.tensor([0, 1, 2, 3]))
    assert p.gradients and all(bool(torch.isfinite(g).all()) for g in p.gradients.values())
