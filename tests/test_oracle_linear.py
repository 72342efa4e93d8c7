"""The masking oracle for the linear and per-channel activation pruners
(``layers/linear.py``, ``layers/activation.py``).

See ``layer_oracle.py`` for what the oracle checks."""

from __future__ import annotations

import torch
from layer_oracle import oracle, seq
from torch import nn

torch.manual_seed(0)


def test_linear_2d_exact():
    m = seq(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    r = oracle(m, torch.randn(4, 10))
    assert r.after == r.before - 10 * (10 + 1) - 10 * 5


def test_linear_3d_and_batchnorm1d():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Linear(16, 5)

        def forward(self, x):  # (N, T, C): batchnorm over channels wants (N, C, T)
            h = self.a(x)
            h = self.bn(h.transpose(1, 2)).transpose(1, 2)
            return self.b(torch.relu(h))

    m = M()
    m.bn.running_mean.normal_()
    r = oracle(m, torch.randn(2, 7, 10))
    assert r.after == r.before - 8 * 11 - 8 * 2 - 8 * 5


def test_prelu_per_channel():
    m = seq(nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        m[1].weight.uniform_(-1, 1)
    r = oracle(m, torch.randn(2, 3, 6, 6))
    assert r.small[1].num_parameters == 4 and r.small[1].weight.shape == (4,)
