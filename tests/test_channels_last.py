"""channels_last_layout: the trials' inputs go channels-last only where the model runs them the same."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import cleanai_core.sensitivity as sens
from cleanai_core import StructuredPruner
from cleanai_core.runtime import channels_last_layout
from cleanai_core.sensitivity import analyse_sensitivity


class Views(nn.Module):
    """``.view`` on a conv output: raises on a channels-last tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))


class ReadsMemory(nn.Module):
    """Reinterprets its input's memory as if it were contiguous: another result channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        n, c, h, w = x.shape
        return self.conv(x.as_strided(x.shape, (c * h * w, h * w, w, 1))).mean((2, 3))


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_a_cnn_gets_channels_last_inputs_and_other_inputs_are_left_alone():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    layout = channels_last_layout(model, x)
    assert _is_channels_last(layout(x)) and torch.equal(layout(x), x)
    mixed = layout({"image": x, "mask": torch.ones(4, 7, dtype=torch.long)})
    assert _is_channels_last(mixed["image"]) and mixed["mask"].is_contiguous()


def test_a_model_that_fails_channels_last_keeps_its_layout():
    model, x = Views(), torch.randn(4, 3, 6, 6)
    with torch.no_grad(), pytest.raises(RuntimeError, match="view"):
        model(x.contiguous(memory_format=torch.channels_last))
    assert channels_last_layout(model, x)(x) is x


def test_a_model_whose_outputs_differ_channels_last_keeps_its_layout():
    model, x = ReadsMemory(), torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x.contiguous(memory_format=torch.channels_last)))
    assert channels_last_layout(model, x)(x) is x


def test_no_image_inputs_keep_their_layout():
    model = nn.Sequential(nn.Linear(5, 3))
    x = torch.randn(2, 5)
    assert channels_last_layout(model, x)(x) is x


def test_sensitivity_curves_are_the_same_in_either_layout(monkeypatch):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    calib = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    evals = [torch.randn(8, 3, 32, 32)]

    def curves():
        pruner = StructuredPruner(model, calib[0][:1], ignored_layers=[model.fc])
        pruner.collect_activations(calib, progress=False)
        return analyse_sensitivity(pruner, evals, ratios=(0.5,), progress=False).curves

    fast = curves()
    monkeypatch.setattr(sens, "channels_last_layout", lambda *a: lambda x: x)
    plain = curves()
    assert len(fast) == len(plain) > 5
    for a, b in zip(fast, plain, strict=True):
        assert a.flops_saved == b.flops_saved
        assert a.kl == pytest.approx(b.kl, rel=1e-2, abs=1e-5)
    assert max(c.kl[-1] for c in fast) > 1e-3  # the trials measured something
