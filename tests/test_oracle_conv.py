"""The masking oracle for the convolution pruners (``cleanai_plugins/layers/conv.py``): plain,
transposed, grouped and depthwise convolutions.

See ``layer_oracle.py`` for what the oracle checks."""

from __future__ import annotations

import pytest
import torch
from layer_oracle import group_of, oracle, seq
from torch import nn

torch.manual_seed(0)


def test_conv2d_chain_exact_param_count():
    m = seq(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
    r = oracle(m, torch.randn(2, 3, 8, 8))
    # 4 of the 8 middle channels go: conv0 loses 4 filters (27 weights + bias), conv2 loses 4 input columns (6*9)
    assert r.after == r.before - 4 * (27 + 1) - 4 * 6 * 9
    assert r.small[0].out_channels == 4 and r.small[2].in_channels == 4


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d_with_batchnorm(dims):
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
    m = seq(conv(2, 8, 3, padding=1), bn(8), nn.ReLU(), conv(8, 4, 1))
    m[1].running_mean.normal_()
    m[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 2, *([6] * dims))
    r = oracle(m, x)
    k = 3**dims
    assert r.after == r.before - 4 * (2 * k + 1) - 4 * 2 - 4 * 4  # conv filters, bn affine, next conv columns
    assert r.small[1].num_features == 4 and r.small[1].running_mean.shape == (4,)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_transpose(dims):
    ct = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    m = seq(ct(3, 8, 2, stride=2), nn.ReLU(), ct(8, 6, 3, padding=1), nn.ReLU(), ct(6, 2, 1))
    r = oracle(m, torch.randn(2, 3, *([4] * dims)))
    k2, k3 = 2**dims, 3**dims
    assert r.after == r.before - 4 * (3 * k2 + 1) - 4 * 6 * k3 - 3 * (8 * k3 + 1) + 3 * 4 * k3 - 3 * 2
    assert r.small[2].in_channels == 4 and r.small[2].out_channels == 3


def test_grouped_conv_keeps_groups():
    m = seq(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(12, 4, 1))
    r = oracle(m, torch.randn(2, 3, 6, 6))
    g = r.small[2]
    assert g.groups == 4 and g.in_channels % 4 == 0 and g.out_channels % 4 == 0
    assert g.in_channels < 8 and g.out_channels < 12
    # the j-th channel of every group is one unit
    assert group_of(r.graph, "0", "out").size == 2 and group_of(r.graph, "2", "out").size == 3


def test_grouped_transpose_conv():
    m = seq(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.ConvTranspose2d(8, 12, 2, stride=2, groups=2), nn.ReLU(), nn.Conv2d(12, 4, 1)
    )
    r = oracle(m, torch.randn(2, 3, 4, 4))
    assert r.small[2].groups == 2


def test_depthwise_with_channel_multiplier():
    m = seq(
        nn.Conv2d(3, 8, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=8),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 4, 1),
    )
    r = oracle(m, torch.randn(2, 3, 6, 6))
    dw = r.small[3]
    assert dw.groups == dw.in_channels == 4 and dw.out_channels == 8
    assert r.small[4].num_features == 8 and r.small[6].in_channels == 8
