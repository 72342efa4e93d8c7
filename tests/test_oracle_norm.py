"""The masking oracle for the norm pruners (``layers/norm.py``) and norm ops
(``mappers/norm_ops.py``): batch, layer, group, instance, RMS and QK norms.

See ``layer_oracle.py`` for what the oracle checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_oracle import group_of, n_params, oracle, prune_with, seq
from torch import nn

from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.testing import random_units

torch.manual_seed(0)


def test_batchnorm1d_on_features():
    m = seq(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 5))
    m[1].running_var.uniform_(0.5, 2)
    r = oracle(m, torch.randn(4, 10))
    assert r.small[1].num_features == 10


def test_layernorm_channels_last_is_normalising_but_prunable():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3, padding=1)
            self.ln = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 16)
            self.out = nn.Linear(16, 4)

        def forward(self, x):
            h = self.ln(self.c(x).permute(0, 2, 3, 1))
            return self.out(F.gelu(self.fc(h)))

    m = M()
    r = oracle(m, torch.randn(2, 3, 5, 5))  # the fc hidden group is exact
    g = group_of(r.graph, "ln", "channels")
    assert any(s.normalizes for s in g.slices) and g.size == 8
    assert r.small.ln.normalized_shape == (8,)  # normalising group left alone by the oracle
    # pruning the normalising group too still gives a runnable model of the right shape
    pruned = random_units(r.graph, 0.5)
    small = prune_with(r.graph, pruned)
    assert small.ln.normalized_shape == (4,) and small.ln.weight.shape == (4,) and small.fc.in_features == 4
    assert small(torch.randn(2, 3, 5, 5)).shape == (2, 5, 5, 4)


class GRNMlp(nn.Module):
    """A ConvNeXt-V2 MLP: ``fc1``, GELU, timm's ``GlobalResponseNorm`` over the hidden
    channels (channels-last tokens ``(N, H, W, C)``, or NCHW with 1x1 convolutions), ``fc2``."""

    def __init__(self, nchw=False, c=4, hidden=16):
        super().__init__()
        grn = pytest.importorskip("timm.layers.grn").GlobalResponseNorm
        lin = (lambda i, o: nn.Conv2d(i, o, 1)) if nchw else nn.Linear
        self.fc1, self.fc2 = lin(c, hidden), lin(hidden, c)
        self.grn = grn(hidden, channels_last=not nchw)
        nn.init.uniform_(self.grn.weight, 0.5, 2.0)
        nn.init.uniform_(self.grn.bias, -0.5, 0.5)

    def forward(self, x):
        return x + self.fc2(self.grn(F.gelu(self.fc1(x))))


@pytest.mark.parametrize("nchw", [False, True], ids=["channels-last", "nchw"])
def test_global_response_norm_hidden_group_is_normalising_but_prunable(nchw):
    """GRN divides by the mean over channels of their L2 norms: like a LayerNorm, its
    channels prune approximately (the exact oracle leaves them alone)."""
    m = GRNMlp(nchw).eval()
    x = torch.randn(2, 4, 5, 5) if nchw else torch.randn(2, 5, 5, 4)
    g = DependencyGraph(m, x)
    hidden = group_of(g, "grn", "channels")
    names = {(s.module, s.name) for s in hidden.slices}
    assert names == {("fc1", "out"), ("grn", "channels"), ("fc2", "in")}
    assert hidden.size == hidden.prunable == 16 and any(s.normalizes for s in hidden.slices)
    assert type(g.nodes["grn"].pruner).__name__ == "GlobalResponseNormPruner"
    pruned = random_units(g, 0.5)
    keep = g.keep_indices(pruned)[("grn", "channels")]
    small = prune_with(g, pruned)
    # fc1 4*16+16, grn 16+16, fc2 16*4+4 -> hidden width 8
    assert (n_params(m), n_params(small)) == (80 + 32 + 68, 40 + 16 + 36)
    assert keep.numel() == 8 and torch.equal(small.grn.weight, m.grn.weight[keep])
    assert torch.equal(small.grn.bias, m.grn.bias[keep])
    # the pruned model is the same MLP built with 8 hidden channels and the kept weights
    narrow = GRNMlp(nchw, hidden=8).eval()
    narrow.load_state_dict(small.state_dict())
    got = small(x)
    assert got.shape == m(x).shape and torch.equal(got, narrow(x))


def test_groupnorm_ties_channels_across_groups():
    m = seq(nn.Conv2d(3, 12, 3, padding=1), nn.GroupNorm(3, 12), nn.ReLU(), nn.Conv2d(12, 4, 1))
    g = DependencyGraph(m.eval(), torch.randn(2, 3, 6, 6))
    grp = group_of(g, "1", "channels")
    assert grp.size == 4 and any(s.normalizes for s in grp.slices)  # 12 channels / 3 groups
    small = prune_with(g, random_units(g, 0.5))
    assert small[1].num_channels == 6 and small[1].num_groups == 3 and small[0].out_channels == 6
    assert small(torch.randn(2, 3, 6, 6)).shape == (2, 4, 6, 6)


class RMSResidual(nn.Module):
    """A pre-norm residual stream of ``c`` channels (tokens ``(N, T, C)``, or ``(N, C, H, W)``
    with 1x1 convolutions when ``nchw``), normalised by ``norm(c)`` before the MLP and the head."""

    def __init__(self, norm, nchw=False, c=8, hidden=16):
        super().__init__()
        lin = (lambda i, o: nn.Conv2d(i, o, 1)) if nchw else nn.Linear
        self.embed, self.fc1, self.fc2, self.head = lin(3, c), lin(c, hidden), lin(hidden, c), lin(c, 4)
        self.norm1, self.norm2 = norm(c), norm(c)
        for n in (self.norm1, self.norm2):
            if n.weight is not None:
                nn.init.uniform_(n.weight, 0.5, 2.0)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.norm1(h))))
        return self.head(self.norm2(h))


def _timm_norm(name):
    return lambda c: getattr(pytest.importorskip("timm.layers"), name)(c)


@pytest.mark.parametrize(
    "norm,nchw",
    [
        (nn.RMSNorm, False),
        (lambda c: nn.RMSNorm(c, elementwise_affine=False), False),
        *((_timm_norm(n), False) for n in ("RmsNorm", "RmsNormFp32", "SimpleNorm", "SimpleNormFp32")),
        *((_timm_norm(n), True) for n in ("RmsNorm2d", "RmsNorm2dFp32", "SimpleNorm2d", "SimpleNorm2dFp32")),
        (_timm_norm("RmsNormAct2d"), True),
        *((_timm_norm(n), True) for n in ("LayerNorm2d", "LayerNorm2dFp32", "LayerNormAct2d", "LayerNormAct2dFp32")),
    ],
    ids=[
        "torch",
        "torch-no-affine",
        "RmsNorm",
        "RmsNormFp32",
        "SimpleNorm",
        "SimpleNormFp32",
        "RmsNorm2d",
        "RmsNorm2dFp32",
        "SimpleNorm2d",
        "SimpleNorm2dFp32",
        "RmsNormAct2d",
        "LayerNorm2d",
        "LayerNorm2dFp32",
        "LayerNormAct2d",
        "LayerNormAct2dFp32",
    ],
)
def test_channel_norm_residual_stream_is_normalising_but_prunable(norm, nchw):
    """RMS norms, and timm's LayerNorms over dim 1 of NCHW tensors."""
    m = RMSResidual(norm, nchw)
    x = torch.randn(2, 3, 5, 5) if nchw else torch.randn(2, 5, 3)
    r = oracle(m, x)  # the MLP hidden group is exact: 8 of 16 go from fc1's rows and fc2's columns
    assert r.after == r.before - 8 * (8 + 1) - 8 * 8
    stream = group_of(r.graph, "norm1", "channels")
    names = {(s.module, s.name) for s in stream.slices}
    assert {("embed", "out"), ("norm2", "channels"), ("fc2", "out"), ("head", "in")} <= names
    assert stream.size == stream.prunable == 8 and any(s.normalizes for s in stream.slices)
    rms = "LayerNorm" not in type(m.norm1).__name__
    assert type(r.graph.nodes["norm1"].pruner).__name__ == ("RMSNormPruner" if rms else "LayerNormPruner")
    # pruning the normalising stream too: half of its 8 channels and of the 16 hidden ones
    pruned = random_units(r.graph, 0.5)
    keep = r.graph.keep_indices(pruned)[("norm1", "channels")]
    small = prune_with(r.graph, pruned)
    # 8 per norm for each of a weight and a bias
    affine = 8 * sum(getattr(m.norm1, t, None) is not None for t in ("weight", "bias"))
    # embed 3*8+8, norms, fc1 8*16+16, fc2 16*8+8, head 8*4+4 -> widths 4 and 8
    assert n_params(m) == 32 + 2 * affine + 144 + 136 + 36
    assert n_params(small) == 16 + affine + 40 + 36 + 20
    assert small.norm1.normalized_shape == small.norm2.normalized_shape == (4,) and keep.numel() == 4
    if affine:
        for t in ("weight", "bias")[: affine // 8]:
            assert torch.equal(getattr(small.norm1, t), getattr(m.norm1, t)[keep])
            assert torch.equal(getattr(small.norm2, t), getattr(m.norm2, t)[keep])
    else:
        assert small.norm1.weight is None
    # the pruned model is the same network built at width 4 with the kept weights
    narrow = RMSResidual(norm, nchw, c=4, hidden=8).eval()
    narrow.load_state_dict(small.state_dict())
    got = small(x)
    assert got.shape == m(x).shape and torch.equal(got, narrow(x))


@pytest.mark.parametrize("norm", ["LayerNorm", "RmsNorm"])
def test_qk_norm_lets_whole_heads_prune(norm):
    """A qk-norm normalises each head's q and k over the head dim with one weight shared by
    every head: heads prune through it (exactly), the head dim and the norm's weight stay.
    Without it the heads of every block and the stream they feed were frozen."""
    vit = pytest.importorskip("timm.models.vision_transformer")
    layers = pytest.importorskip("timm.layers")

    def make(qk_norm):
        torch.manual_seed(0)
        return vit.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
            qk_norm=qk_norm, norm_layer=getattr(layers, norm),
        ).eval()  # fmt: skip

    x = torch.randn(2, 3, 32, 32)
    plain = group_of(DependencyGraph(make(False), x), "blocks.0.attn.proj", "in")
    m = make(True)
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.q_norm.weight.uniform_(0.5, 2.0)
    r = oracle(m, x)
    heads = group_of(r.graph, "blocks.0.attn.proj", "in")
    assert heads.size == plain.size == 4 and heads.prunable == 4  # whole heads of 16
    assert r.small.blocks[0].attn.proj.in_features < 64 and r.small.blocks[0].attn.proj.in_features % 16 == 0
    for blk, old in zip(r.small.blocks, m.blocks, strict=True):
        assert torch.equal(blk.attn.q_norm.weight, old.attn.q_norm.weight)  # 16 wide, per head, unsliced
    assert "normalises dim 3 alike for every channel on dim" in r.graph.explain()


class FunctionalQKNorm(nn.Module):
    """Self-attention whose q and k go through a functional norm over the head dim."""

    def __init__(self, op, heads=4, hd=8):
        super().__init__()
        self.op, self.heads, self.hd = op, heads, hd
        self.qkv, self.proj = nn.Linear(16, 3 * heads * hd), nn.Linear(heads * hd, 16)
        self.gain = nn.Parameter(torch.rand(hd) + 0.5)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, -1, self.hd).unbind(2)
        q, k = (getattr(F, self.op)(t, (self.hd,), self.gain) for t in (q, k))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_functional_qk_norm_lets_whole_heads_prune(op):
    r = oracle(FunctionalQKNorm(op), torch.randn(2, 5, 16))
    heads = group_of(r.graph, "proj", "in")
    assert heads.size == heads.prunable == 4 and r.small.proj.in_features == 16  # 2 of 4 heads of 8
    assert r.small.qkv.out_features == 48 and r.small.gain.shape == (8,)


class StoredShapeNorm(nn.Module):
    """A weightless layer norm that keeps its width in an attribute (OLMo's layer norm),
    claimed by no layer pruner: nothing would rewrite ``normalized_shape`` after slicing."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.normalized_shape = (n,)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape)


def test_functional_norm_over_a_stored_width_freezes_its_channels():
    m = seq(nn.Linear(10, 16), StoredShapeNorm(16), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    graph = DependencyGraph(m, torch.randn(3, 10))
    stored = group_of(graph, "0", "out")
    assert (stored.size, stored.prunable) == (16, 0)
    assert any("normalized_shape" in r for r in stored.reasons)
    r = oracle(m, torch.randn(3, 10))  # the pruned model runs: only the 12 after the norm shrink
    assert r.small[1].normalized_shape == (16,) and r.small[2].out_features == 6


def test_instancenorm_affine():
    m = seq(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 2)
        m[1].bias.normal_()
    r = oracle(m, torch.randn(2, 3, 6, 6))
    assert r.small[1].weight.shape == (4,) and r.after == r.before - 4 * 28 - 4 * 2 - 4 * 4
