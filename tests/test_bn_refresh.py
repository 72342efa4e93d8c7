"""Re-estimating BatchNorm statistics in eval mode (the refresh before each gradual step):
the same statistics as a train-mode pass, at any batch size, modes and weights untouched."""

from __future__ import annotations

import copy

import torch
from torch import nn

from cleanai_core.bn_refresh import reestimate_batchnorm


def _run(model, batch):
    return model(batch)


def _chain() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
    )  # fmt: skip
    with torch.no_grad():  # statistics that describe nothing: what a fast-moving training leaves
        for m in (model[1], model[4]):
            m.running_mean.uniform_(-3, 3)
            m.running_var.uniform_(5, 10)
    return model.eval()


def test_one_batch_gives_the_statistics_of_a_train_mode_pass_with_cumulative_average():
    model = _chain()
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 1
    reference = copy.deepcopy(model)
    for m in (reference[1], reference[4]):
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        reference(x)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    assert reestimate_batchnorm(model, [x], _run) == 2
    for i in (1, 4):
        torch.testing.assert_close(model[i].running_mean, reference[i].running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model[i].running_var, reference[i].running_var, atol=1e-5, rtol=1e-5)
    assert float((model[4].running_mean - _chain()[4].running_mean).abs().max()) > 0.5  # they did move
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())


class Pooled(nn.Module):
    """A BN after global pooling: one value per channel at batch size 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.conv(x).mean((2, 3)))


def test_batch_size_one_after_global_pooling_gives_the_statistics_of_all_samples():
    torch.manual_seed(0)
    model = Pooled().train()  # modes are put back as they were
    xs = [torch.randn(1, 3, 6, 6) for _ in range(10)]
    with torch.no_grad():
        pooled = torch.cat([model.conv(x).mean((2, 3)) for x in xs]).double()
    assert reestimate_batchnorm(model, xs, _run) == 1
    torch.testing.assert_close(model.bn.running_mean.double(), pooled.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.bn.running_var.double(), pooled.var(0), atol=1e-6, rtol=1e-5)
    assert model.training and model.bn.training


def test_a_single_sample_leaves_the_statistics_as_they_were():
    torch.manual_seed(0)
    model = Pooled().eval()
    before = model.bn.running_mean.clone(), model.bn.running_var.clone()
    assert reestimate_batchnorm(model, [torch.randn(1, 3, 6, 6)], _run) == 0
    assert torch.equal(model.bn.running_mean, before[0]) and torch.equal(model.bn.running_var, before[1])
