"""The masking oracle for the index mappers (``cleanai_plugins/mappers/``): shapes, joins,
spatial ops, matmul attention, fresh tensors.

See ``layer_oracle.py`` for what the oracle checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from layer_oracle import group_of, oracle
from torch import nn

torch.manual_seed(0)


# -- mappers ---------------------------------------------------------------------------------------
class Fn(nn.Module):
    """A model from a function of (self, x) and named submodules."""

    def __init__(self, fn, **mods):
        super().__init__()
        self.fn = fn
        for k, v in mods.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fn(self, x)


def conv(i, o, k=1, **kw):
    return nn.Conv2d(i, o, k, padding=k // 2, **kw)


X = torch.randn(2, 3, 8, 8)


def _halves(h):
    return torch.split(h, h.shape[1] // 2, dim=1)


MAPPER_CASES = {
    "cat": Fn(lambda s, x: s.c(torch.cat([s.a(x), torch.relu(s.b(x))], 1)), a=conv(3, 4), b=conv(3, 6), c=conv(10, 2)),
    # split sizes must follow the channels: a literal size cannot shrink (the trace cannot tell them apart)
    "split": Fn(lambda s, x: s.c(_halves(s.a(x))[0] * torch.sigmoid(_halves(s.a(x))[1])), a=conv(3, 8), c=conv(4, 2)),
    "chunk": Fn(lambda s, x: s.c(torch.cat(torch.chunk(s.a(x), 2, dim=1)[::-1], 1)), a=conv(3, 8), c=conv(8, 2)),
    "stack_unbind": Fn(
        lambda s, x: s.c(sum(torch.stack([s.a(x), s.b(x)], 0).unbind(0))), a=conv(3, 6), b=conv(3, 6), c=conv(6, 2)
    ),
    "flatten_linear": Fn(
        lambda s, x: s.fc(torch.relu(s.a(x)).flatten(1)), a=conv(3, 4, 3, stride=2), fc=nn.Linear(4 * 16, 5)
    ),
    "view_reshape": Fn(
        lambda s, x: s.fc(s.a(x).view(2, 4, -1).reshape(2, -1)), a=conv(3, 4, 3, stride=2), fc=nn.Linear(4 * 16, 5)
    ),
    "permute_channels_last": Fn(
        lambda s, x: s.c(s.fc(s.a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)),
        a=conv(3, 6),
        fc=nn.Linear(6, 8),
        c=conv(8, 2),
    ),
    "transpose": Fn(lambda s, x: s.fc(s.a(x).flatten(2).transpose(1, 2)), a=conv(3, 6), fc=nn.Linear(6, 4)),
    "expand_se": Fn(
        lambda s, x: s.c(s.a(x) * torch.sigmoid(s.a(x).mean((2, 3), keepdim=True).expand(-1, -1, 8, 8))),
        a=conv(3, 6),
        c=conv(6, 2),
    ),
    "repeat": Fn(lambda s, x: s.c(s.a(x).repeat(1, 2, 1, 1)), a=conv(3, 4), c=conv(8, 2)),
    "slice_select_spatial": Fn(
        lambda s, x: s.fc(s.a(x)[:, :, 1:-1, 2].transpose(1, 2)), a=conv(3, 6), fc=nn.Linear(6, 3)
    ),
    "residual_broadcast": Fn(
        lambda s, x: s.c(torch.relu(s.a(x) + s.b(x)) * s.scale + s.a(x).sum(1, keepdim=True)),
        a=conv(3, 6),
        b=conv(3, 6, 3),
        c=conv(6, 2),
        scale=nn.Parameter(torch.rand(1, 6, 1, 1)),
    ),
    "pool_interp_pad": Fn(
        lambda s, x: s.c(
            F.pad(
                F.interpolate(F.max_pool2d(s.a(x), 2) + F.avg_pool2d(s.a(x), 2), scale_factor=2, mode="bilinear"),
                (1, 1, 1, 1),
            )
            + F.adaptive_avg_pool2d(s.a(x), 10)
        ),
        a=conv(3, 6),
        c=conv(6, 2),
    ),
    "pixel_shuffle": Fn(lambda s, x: s.c(F.pixel_shuffle(s.a(x), 2)), a=conv(3, 12), c=conv(3, 2)),
    "pixel_unshuffle": Fn(lambda s, x: s.c(F.pixel_unshuffle(s.a(x), 2)), a=conv(3, 4), c=conv(16, 2)),
}


@pytest.mark.parametrize("name", list(MAPPER_CASES))
def test_mapper_oracle(name):
    m = copy.deepcopy(MAPPER_CASES[name])
    r = oracle(m, X)
    assert r.graph.ctx.unknown_ops == {} or name in (), r.graph.explain()


def test_flatten_linear_prunes_whole_channel_blocks():
    r = oracle(copy.deepcopy(MAPPER_CASES["flatten_linear"]), X)
    assert r.small.a.out_channels == 2 and r.small.fc.in_features == 2 * 16
    assert r.after == r.before - 2 * (27 + 1) - 2 * 16 * 5


def test_pixel_shuffle_ties_subpixels():
    r = oracle(copy.deepcopy(MAPPER_CASES["pixel_shuffle"]), X)
    assert r.small.a.out_channels % 4 == 0 and r.small.c.in_channels * 4 == r.small.a.out_channels


class QKVAttention(nn.Module):
    """Explicit ``q @ k^T * scale`` or ``F.scaled_dot_product_attention`` over heads."""

    def __init__(self, dim=24, heads=3, sdpa=None):
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 4)
        self.heads, self.sdpa, self.head_dim = heads, sdpa, dim // heads
        self.scale = self.head_dim**-0.5

    def forward(self, x):
        b, n, _ = x.shape
        h = self.inp(x)
        if self.sdpa == "heads":  # default scale: head_dim is fixed, heads are pruned
            q, k, v = self.qkv(h).reshape(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # fixed number of heads, head dims are pruned
            q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.sdpa == "heads":
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.sdpa == "scale":
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            o = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1) @ v
        h = h + self.proj(o.transpose(1, 2).reshape(b, n, -1))
        return self.out(torch.relu(h))


@pytest.mark.parametrize("sdpa", [None, "scale", "heads"], ids=["matmul", "sdpa_scale", "sdpa_heads"])
def test_matmul_attention(sdpa):
    m = QKVAttention(sdpa=sdpa)
    r = oracle(m, torch.randn(2, 5, 8))
    qkv = r.small.qkv
    assert qkv.out_features < 72 and qkv.out_features % 3 == 0
    assert r.small.proj.in_features == qkv.out_features // 3
    if sdpa == "heads":  # whole heads of 8 dims go
        assert qkv.out_features // 3 % 8 == 0
    else:  # 3 heads stay, each loses the same dims
        assert qkv.out_features // 3 % 3 == 0


class NewZerosMask(nn.Module):
    """Swin-style: a mask built with ``x.new_zeros(...)`` reads only x's dtype/device."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        mask = h.new_zeros((h.shape[-2], h.shape[-1]))
        return self.conv2(h) + mask


def test_new_zeros_carries_no_channels():
    r = oracle(NewZerosMask(), torch.randn(2, 3, 6, 6))
    assert group_of(r.graph, "conv1", "out").prunable == 8
    assert r.small.conv1.out_channels == 4 and r.small.conv2.in_channels == 4


def test_channels_divided_by_their_norm_shrink():
    """``F.normalize`` divides by ``norm(x, keepdim=True).expand_as(x)``: one value repeated
    along the channels, which shrinks with them (zeroed channels do not change a norm)."""
    m = Fn(lambda s, x: s.c(F.normalize(s.a(x), dim=1)), a=conv(3, 6), c=conv(6, 2))
    r = oracle(m, X)
    assert (group_of(r.graph, "a", "out").size, group_of(r.graph, "a", "out").prunable) == (6, 6)
    assert r.small.a.out_channels == 3 and r.small.c.in_channels == 3


def _group_std(h, size=4):
    """EvoNorm-S's ``group_std``, with the group size fixed (the group count follows)."""
    b, c, hh, ww = h.shape
    std = h.reshape(b, -1, size, hh, ww).var(dim=(2, 3, 4), unbiased=False, keepdim=True).add(1e-5).sqrt()
    return std.expand(b, c // size, size, hh, ww).reshape(b, c, hh, ww)


def test_a_variance_over_channel_groups_prunes_whole_groups():
    """The variance runs over the inner part of a ``(groups, size)`` split: the kernel traces
    again keeping the groups, so whole groups go (they were all frozen)."""
    m = Fn(lambda s, x: s.c(s.a(x) / _group_std(s.a(x))), a=conv(3, 12), c=conv(12, 2))
    r = oracle(m, X)
    group = group_of(r.graph, "a", "out")
    assert (group.size, group.prunable) == (3, 3)  # 3 groups of 4 channels
    assert r.small.a.out_channels in (4, 8) and r.small.c.in_channels == r.small.a.out_channels
