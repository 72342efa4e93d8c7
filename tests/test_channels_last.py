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
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))


class ReadsMemory(nn.Module):
    """Reinterprets its input's memory as if it were contiguous: another result channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1))

    def forward(self, x):
        n, c, h, w = x.shape
        return self.conv(x.as_strided(x.shape, (c * h * w, h * w, w, 1))).mean((2, 3))


class PatchEmbedding(nn.Module):
    """One convolution (a vision transformer's patch embedding) and linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.fc2(torch.relu(self.fc1(tokens))).mean(1)


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


class ReadsMemoryInside(nn.Module):
    """Reinterprets a conv output's memory as contiguous before the next conv (after a
    prunable conv pair)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv1(torch.relu(self.conv0(x)))
        n, c, h, w = y.shape
        return self.conv2(y.as_strided(y.shape, (c * h * w, h * w, w, 1))).mean((2, 3))


class ViewsInside(ReadsMemoryInside):
    """``.view`` of a conv output to a flat shape and back: raises on a channels-last tensor."""

    def forward(self, x):
        y = self.conv1(torch.relu(self.conv0(x)))
        return self.conv2(y.view(y.shape[0], -1).view(y.shape)).mean((2, 3))


@pytest.mark.parametrize("cls", [ReadsMemoryInside, ViewsInside, lambda: torchvision.models.resnet18(num_classes=4)])
def test_calibration_statistics_are_those_of_the_inputs_as_they_are(cls):
    """The first batch runs channels-last with the statistics on; where the model then
    disagrees with itself as it is (or raises), the statistics start again: every
    consumer's moments equal those of the contiguous inputs, batch by batch."""
    torch.manual_seed(0)
    model = cls().eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    pruner = StructuredPruner(model, batches[0][:1])
    pruner.collect_activations(batches, progress=False)
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(a[0].detach()))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    checked = 0
    for (module, _), stats in pruner.stats.items():
        if module in seen:
            x = torch.cat(seen[module]).double()
            assert stats.count == x.numel() // x.shape[1]  # each batch once
            torch.testing.assert_close(stats.mean, x.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats.var, x.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked >= 1
    channels_last = pruner.calibration.data.layout(batches[0]) is not batches[0]
    assert channels_last == (not isinstance(model, ReadsMemoryInside | ViewsInside))


def test_a_model_with_one_convolution_is_calibrated_as_it_is_without_running_samples_twice():
    """Channels-last pays for convolution stacks; with one (a patch embedding) the check
    would run two samples the other way for nothing: calibration runs each batch once."""
    torch.manual_seed(0)
    model = PatchEmbedding().eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    pruner = StructuredPruner(model, batches[0][:1])
    calls.clear()
    pruner.collect_activations(batches, progress=False)
    handle.remove()
    assert calls == [4, 4, 4]
    assert pruner.calibration.data.layout(batches[0]) is batches[0]
    assert channels_last_layout(model, batches[0])(batches[0]) is batches[0]
    two = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    assert _is_channels_last(channels_last_layout(two, batches[0])(batches[0]))


class Squeezes(nn.Module):
    """Two convs whose output is ``squeeze()``d: one sample gives another shape than a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean((2, 3)).squeeze()


@pytest.mark.parametrize(("cls", "checked"), [(lambda: torchvision.models.resnet18(num_classes=4), [1]),
                                              (Squeezes, [1, 2])])  # fmt: skip
def test_the_layout_is_checked_on_one_sample_and_on_two_where_one_disagrees(cls, checked):
    """Calibration runs its first batch channels-last, then one sample as it is (3% of a
    32-image calibration's inference; two were run before): a model that squeezes its batch
    dimension disagrees on one sample and is checked again on two, and keeps the layout.
    ``channels_last_layout`` runs one sample both ways."""
    torch.manual_seed(0)
    model = cls().eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    pruner = StructuredPruner(model, batches[0][:2])
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append((a[0].shape[0], _is_channels_last(a[0]))))
    pruner.collect_activations(batches, progress=False)
    handle.remove()
    assert calls == [(4, True), *[(k, False) for k in checked], (4, True), (4, True)]
    assert _is_channels_last(pruner.calibration.data.layout(batches[0]))
    calls.clear()
    handle = model.register_forward_pre_hook(lambda m, a: calls.append((a[0].shape[0], _is_channels_last(a[0]))))
    assert _is_channels_last(channels_last_layout(model, batches[0])(batches[0]))
    handle.remove()
    assert calls == [(1, True), (1, False)]  # both ways on one sample: squeezed alike
