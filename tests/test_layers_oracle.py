"""The masking oracle on hand-written architectures: every built-in layer pruner and mapper.

For each model a random half of every prunable group is pruned; the pruned model must
produce the same output as the original with those channels zeroed (``masked_forward``),
the output shape must not change, parameters must shrink (by the exact amount where it
is easy to count), and the masking must actually change the output (so the comparison
cannot pass by accident).
"""

from __future__ import annotations

import copy
import math

import attrs
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.slicing import SliceEdit, apply_edits
from cleanai_core.testing import check_pruner, masked_forward, random_units, run_model

torch.manual_seed(0)


@attrs.define
class Result:
    graph: DependencyGraph
    small: nn.Module
    pruned: torch.Tensor
    before: int
    after: int
    diff: float


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def prune_with(graph: DependencyGraph, pruned: torch.Tensor) -> nn.Module:
    small = copy.deepcopy(graph.model)
    edits = [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in graph.keep_indices(pruned).items()]
    apply_edits(small, edits, graph.pm)
    return small


def oracle(model, x, ratio=0.5, seed=0, forward_fn=None, must_prune=True, tol=1e-4) -> Result:
    """Prune ``ratio`` of every prunable (non-normalising) group and compare with masking."""
    model.eval()
    graph = DependencyGraph(model, x, forward_fn=forward_fn)
    pruned = random_units(graph, ratio, torch.Generator().manual_seed(seed), exclude_normalized=True)
    base = run_model(model, x, forward_fn)
    expected = masked_forward(graph, pruned, x, forward_fn)
    small = prune_with(graph, pruned)
    got = run_model(small, x, forward_fn)
    assert [g.shape for g in got] == [b.shape for b in base], "output shape changed"
    diff = max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))
    # float32 rounding grows with the outputs' size (vit_b_16's logits reach ~10)
    scale = max(1.0, max(float(e.abs().max()) for e in expected))
    assert diff < tol * scale, f"pruned model differs from the masked original by {diff} (outputs up to {scale})"
    if must_prune:
        assert int(pruned.sum()) > 0, graph.explain()
        assert n_params(small) < n_params(model)
        moved = max(float((e - b).abs().max()) for e, b in zip(expected, base, strict=True))
        assert moved > 1e-4, "masking did not change the output: the comparison proves nothing"
    return Result(graph, small, pruned, n_params(model), n_params(small), diff)


def group_of(graph: DependencyGraph, module: str, slice_name: str):
    for g in graph.groups():
        if any(s.module == module and s.name == slice_name for s in g.slices):
            return g
    raise KeyError((module, slice_name))


def seq(*layers) -> nn.Sequential:
    return nn.Sequential(*layers)


# -- convolutions ---------------------------------------------------------------------------
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


# -- linear, norms, embedding, prelu -----------------------------------------------------
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


def test_instancenorm_affine():
    m = seq(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 2)
        m[1].bias.normal_()
    r = oracle(m, torch.randn(2, 3, 6, 6))
    assert r.small[1].weight.shape == (4,) and r.after == r.before - 4 * 28 - 4 * 2 - 4 * 4


def test_embedding():
    m = seq(nn.Embedding(50, 16), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    r = oracle(m, torch.randint(0, 50, (2, 5)))
    assert r.small[0].embedding_dim == 8 and r.small[0].weight.shape == (50, 8)
    assert r.after == 50 * 8 + (4 * 8 + 4) + (3 * 4 + 3)


def test_prelu_per_channel():
    m = seq(nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        m[1].weight.uniform_(-1, 1)
    r = oracle(m, torch.randn(2, 3, 6, 6))
    assert r.small[1].num_parameters == 4 and r.small[1].weight.shape == (4,)


# -- attention -------------------------------------------------------------------------------
class MHABlock(nn.Module):
    def __init__(self, e=32, heads=4, batch_first=True, kdim=None, bias=True, add_bias_kv=False, need_weights=True):
        super().__init__()
        self.inp = nn.Linear(8, e)
        self.kv = nn.Linear(8, kdim) if kdim else None
        self.attn = nn.MultiheadAttention(
            e, heads, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias, add_bias_kv=add_bias_kv
        )
        self.fc = nn.Linear(e, 16)
        self.batch_first, self.need_weights = batch_first, need_weights

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.inp(x)
        kv = self.kv(x) if self.kv is not None else h
        a, _ = self.attn(h, kv, kv, need_weights=self.need_weights)
        return self.fc(torch.relu(h + a))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"batch_first": False},
        {"kdim": 12},
        {"kdim": 12, "batch_first": False},
        {"bias": False},
        {"add_bias_kv": True},
        {"need_weights": False},
    ],
    ids=str,
)
def test_multihead_attention(kw):
    m = MHABlock(**kw)
    r = oracle(m, torch.randn(2, 5, 8))
    a = r.small.attn
    assert a.num_heads == 4 and a.embed_dim == a.head_dim * 4 and a.head_dim == 4  # 4 of 8 head dims per head
    assert a.out_proj.weight.shape == (16, 16)
    g = group_of(r.graph, "attn", "out")
    assert g.size == 8  # 32 channels viewed as (4 heads, 8 dims): one unit per head dim
    if kw.get("kdim"):
        assert a.kdim == a.vdim == 6 and a.k_proj_weight.shape == (16, 6) and not a._qkv_same_embed_dim
    else:
        assert a.in_proj_weight.shape == (48, 16) and a._qkv_same_embed_dim


def test_mha_fast_path_is_exact():
    """Self-attention, batch_first, eval, no grad: the native fast path runs before and after."""
    m = MHABlock(need_weights=False).eval()
    x = torch.randn(2, 5, 8)
    g = DependencyGraph(m, x)
    small = prune_with(g, random_units(g, 0.5))
    h = small.inp(x)
    with torch.no_grad():
        fast = small.attn(h, h, h, need_weights=False)[0]
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = small.attn(h, h, h, need_weights=False)[0]
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert torch.allclose(fast, slow, atol=1e-5)


def _random_head(vit: nn.Module) -> nn.Module:
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises it: the output would be constant
    return vit


def test_vit_b_16():
    m = _random_head(torchvision.models.vit_b_16(image_size=32)).eval()
    r = oracle(m, torch.randn(2, 3, 32, 32), ratio=0.25)
    # the residual stream (LayerNorm) is normalising; the 12 MLP hidden groups lose 768 units each
    assert r.before - r.after == 12 * 768 * (768 + 1 + 768)
    assert group_of(r.graph, "encoder.layers.encoder_layer_0.self_attention", "out").size == 64


def test_small_vit_without_layernorm_prunes_head_dims():
    m = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48, num_classes=5
    )
    for layer in m.encoder.layers:
        layer.ln_1, layer.ln_2 = nn.Identity(), nn.Identity()
    m.encoder.ln = nn.Identity()
    _random_head(m)

    def fwd(model, x):  # torchvision reads hidden_dim in _process_input
        model.hidden_dim = model.conv_proj.out_channels
        return model(x)

    r = oracle(m, torch.randn(2, 3, 32, 32), forward_fn=fwd)
    att = r.small.encoder.layers[0].self_attention
    assert att.embed_dim == 16 and att.head_dim == 4 and r.small.class_token.shape == (1, 1, 16)
    assert r.small.encoder.pos_embedding.shape == (1, 17, 16)


class FunctionalBiasAttention(nn.Module):
    """EVA / BEiT style self-attention: the fused ``qkv`` linear has no bias and is never
    called; ``forward`` runs ``F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))``
    with ``k_bias`` a zero buffer. Residual stream of 16 channels, 4 heads of 8."""

    def __init__(self, c=16, heads=4, hd=8):
        super().__init__()
        self.num_heads, self.head_dim = heads, hd
        self.embed = nn.Linear(3, c)
        self.qkv = nn.Linear(c, 3 * heads * hd, bias=False)
        self.q_bias = nn.Parameter(torch.randn(heads * hd))
        self.register_buffer("k_bias", torch.zeros(heads * hd), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(heads * hd))
        self.proj = nn.Linear(heads * hd, c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        h = self.embed(x)
        b, n, _ = h.shape
        qkv = F.linear(h, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.head(h + self.proj(y))


def test_weight_read_outside_its_linear_prunes_heads_and_inputs():
    r = oracle(FunctionalBiasAttention(), torch.randn(2, 5, 3))
    heads = group_of(r.graph, "qkv", "out")
    names = {(s.module, s.name) for s in heads.slices}
    assert names == {("qkv", "out"), ("", "q_bias"), ("", "k_bias"), ("", "v_bias"), ("proj", "in")}
    assert heads.size == heads.prunable == 4  # whole heads of 8 (the default SDPA scale)
    stream = group_of(r.graph, "qkv", "in")
    assert {("embed", "out"), ("proj", "out"), ("head", "in")} <= {(s.module, s.name) for s in stream.slices}
    assert stream.size == stream.prunable == 16
    s = r.small
    assert s.qkv.weight.shape == (48, 8) and s.q_bias.shape == s.k_bias.shape == s.v_bias.shape == (16,)
    assert s.num_heads == 2 and s.proj.weight.shape == (8, 16)
    # embed 3*16+16, qkv 96*16, q/v bias 2*32, proj 32*16+16, head 16*4+4 -> 8 channels, 2 heads
    assert (r.before, r.after) == (64 + 1536 + 64 + 528 + 68, 32 + 384 + 32 + 136 + 36)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-qkv", "q-k-v-projections"])
def test_eva_attention_ties_heads_to_the_stream(fused):
    """timm's ``EvaAttention`` reshapes its output to the input width (``reshape(B, N, C)``):
    the q, k and v parts shrink with the stream, so whole heads go with it. Rotary
    embeddings (on all tokens but the first, joined back by ``cat``) keep the head size."""
    eva = pytest.importorskip("timm.models.eva")
    rope = pytest.importorskip("timm.layers").RotaryEmbeddingCat

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 16)
            self.attn = eva.EvaAttention(16, num_heads=4, qkv_bias=True, qkv_fused=fused, scale_norm=False)
            self.rope = rope(4, in_pixels=False, feat_shape=[2, 2])
            self.head = nn.Linear(16, 4)
            with torch.no_grad():
                for p in self.attn.parameters():
                    if p.ndim == 1:
                        p.normal_()

        def forward(self, x):
            h = self.embed(x)
            return self.head(h + self.attn(h, rope=self.rope.get_embed()))

    r = oracle(Block(), torch.randn(2, 5, 3))
    q = "attn.qkv" if fused else "attn.q_proj"
    stream = group_of(r.graph, q, "out")
    names = {(s.module, s.name) for s in stream.slices}
    assert {(q, "in"), ("embed", "out"), ("attn.proj", "in")} <= names
    assert stream.size == stream.prunable == 4  # 16 channels, tied into the 4 heads of 4
    a = r.small.attn
    assert a.num_heads == 2 and a.proj.weight.shape == (8, 8)
    if fused:
        assert ("", "attn.q_bias") in names and a.qkv.weight.shape == (24, 8) and a.k_bias.shape == (8,)
    else:
        assert a.q_proj.weight.shape == a.k_proj.weight.shape == a.v_proj.weight.shape == (8, 8)


class TwiceScaledWeight(nn.Module):
    """``F.linear(x, 2 * self.fc.weight)``: the scaled copy has no columns' label."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.head = nn.Linear(3, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(F.linear(self.embed(x), 2 * self.fc.weight, self.fc.bias)))


def test_weight_read_outside_its_linear_freezes_columns_it_cannot_follow():
    r = oracle(TwiceScaledWeight(), torch.randn(4, 3))
    assert group_of(r.graph, "fc", "in").prunable == 0  # the multiplication drops the columns' label
    assert "the second dimension of fc.weight reaches an operation" in r.graph.explain()
    assert group_of(r.graph, "fc", "out").prunable == 6 and r.small.fc.weight.shape == (3, 8)


# -- recurrent --------------------------------------------------------------------------------
class RNNBlock(nn.Module):
    def __init__(self, cls, hidden=12, **kw):
        super().__init__()
        d = 2 if kw.get("bidirectional") else 1
        out = kw.get("proj_size") or hidden
        self.inp = nn.Linear(6, 10)
        self.rnn = cls(10, hidden, **kw)
        self.fc = nn.Linear(out * d, 5)

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.inp(x)))
        return self.fc(y)


RNN_CASES = [
    (nn.RNN, {}),
    (nn.RNN, {"nonlinearity": "relu", "num_layers": 2}),
    (nn.RNN, {"num_layers": 3, "bidirectional": True}),
    (nn.LSTM, {}),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    (nn.LSTM, {"bias": False, "bidirectional": True}),
    (nn.LSTM, {"proj_size": 5, "num_layers": 2, "bidirectional": True}),
    (nn.GRU, {}),
    (nn.GRU, {"num_layers": 3, "bidirectional": True}),
    (nn.GRU, {"batch_first": True, "num_layers": 2, "bias": False}),
]


@pytest.mark.parametrize(("cls", "kw"), RNN_CASES, ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_recurrent(cls, kw):
    m = RNNBlock(cls, **kw)
    r = oracle(m, torch.randn(7, 3, 6))
    rnn = r.small.rnn
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cls]
    assert rnn.hidden_size == 6 and rnn.input_size == 5
    assert rnn.weight_ih_l0.shape == (gates * 6, 5)
    if kw.get("proj_size"):
        assert rnn.proj_size < 5 and rnn.weight_hr_l0.shape == (rnn.proj_size, 6)
    else:
        d = 2 if kw.get("bidirectional") else 1
        assert rnn.weight_hh_l0.shape == (gates * 6, 6) and r.small.fc.in_features == 6 * d
        if kw.get("num_layers", 1) > 1:
            assert rnn.weight_ih_l1.shape == (gates * 6, 6 * d)
    # the flat weights the kernels use are the new tensors
    assert all(
        a is b for a, b in zip(rnn._flat_weights, [getattr(rnn, n) for n in rnn._flat_weights_names], strict=True)
    )


class StateRNN(nn.Module):
    def __init__(self, cls, buffer: bool):
        super().__init__()
        self.rnn = cls(6, 8)
        self.fc = nn.Linear(8, 3)
        self.buffer = buffer
        self.register_buffer("h0", torch.randn(1, 3, 8))
        self.register_buffer("c0", torch.randn(1, 3, 8))

    def forward(self, x):
        h0 = self.h0 * 1.0 if self.buffer else torch.ones(1, x.shape[1], 8)
        hx = (h0, self.c0 * 1.0) if isinstance(self.rnn, nn.LSTM) else h0
        return self.fc(self.rnn(x, hx)[0])


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM], ids=lambda c: c.__name__)
def test_recurrent_initial_state(cls):
    # a constant initial state cannot shrink: the hidden units are frozen
    g = DependencyGraph(StateRNN(cls, buffer=False).eval(), torch.randn(4, 3, 6))
    assert group_of(g, "rnn", "hidden").prunable == 0
    # a buffer initial state is sliced with the units, and the oracle holds with non-zero states
    r = oracle(StateRNN(cls, buffer=True), torch.randn(4, 3, 6))
    assert r.small.h0.shape == (1, 3, 4) and r.small.rnn.hidden_size == 4


# -- bare parameters ----------------------------------------------------------------------------
class TokenNet(nn.Module):
    """Patchify, prepend a cls token, add pos_embed, layer-scale gamma, linear head."""

    def __init__(self, c=16):
        super().__init__()
        self.patch = nn.Conv2d(3, c, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.pos = nn.Parameter(torch.randn(1, 5, c))
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.mlp = nn.Linear(c, c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        t = t + self.gamma * self.mlp(t)
        return self.head(t[:, 0])


def test_bare_parameters_follow_channels():
    r = oracle(TokenNet(), torch.randn(2, 3, 8, 8))
    s = r.small
    assert s.cls.shape == (1, 1, 8) and s.pos.shape == (1, 5, 8) and s.gamma.shape == (8,)
    assert s.patch.out_channels == 8 and s.mlp.weight.shape == (8, 8) and s.head.in_features == 8


class LayerScale2dNet(nn.Module):
    """A residual conv block scaled by a FastViT-style layer scale ``gamma`` of shape
    ``(C, 1, 1)``, broadcast over NCHW feature maps."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.gamma * self.conv(x)
        return self.head(x)


def test_layer_scale_shaped_for_nchw_follows_channels():
    r = oracle(LayerScale2dNet(), X)
    assert group_of(r.graph, "", "gamma").prunable == 8
    assert r.small.gamma.shape == (4, 1, 1) and r.small.stem.out_channels == 4
    # stem 3*8*9+8, conv 8*8*9+8, gamma 8, head 8*4+4 -> half of the 8 channels kept
    assert (r.before, r.after) == (852, 3 * 4 * 9 + 4 + 4 * 4 * 9 + 4 + 4 + 4 * 4 + 4)


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


# -- what the graph does not understand must freeze --------------------------------------------
@torch.library.custom_op("cleanai_test::channel_mix", mutates_args=())
def channel_mix(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1).cumsum(1)


@channel_mix.register_fake
def _(x):
    return torch.empty_like(x)


@pytest.mark.parametrize(
    "how",
    ["roll", "custom_op", "channel_slice", "mean_over_channels", "softmax_over_channels", "cumprod"],
)
def test_unknown_or_channel_moving_ops_freeze(how):
    ops = {
        "roll": lambda h: torch.roll(h, 1, dims=1),
        "custom_op": lambda h: channel_mix(h),
        "channel_slice": lambda h: torch.cat([h[:, 1:], h[:, :1]], 1),
        "mean_over_channels": lambda h: h - h.mean(1, keepdim=True),
        "softmax_over_channels": lambda h: h.softmax(1),
        "cumprod": lambda h: h.cumprod(1),
    }
    op = ops[how]
    m = Fn(
        lambda s, x: s.c(torch.relu(op(s.a(x))) + s.b(x)),
        a=conv(3, 6),
        b=conv(3, 6),
        c=conv(6, 4, 3),
    ).eval()
    g = DependencyGraph(m, X)
    assert group_of(g, "a", "out").prunable == 0, g.explain()
    if how == "custom_op":
        assert any("channel_mix" in k for k in g.ctx.unknown_ops)
        assert "Operations not understood" in g.explain()
    report = check_pruner(m, X)
    assert report.pruned_units == 0 and report.max_abs_diff < 1e-6 and report.params_after == report.params_before


def test_check_pruner_on_resnet18_math():
    m = torchvision.models.resnet18(num_classes=10).eval()
    r = check_pruner(m, torch.randn(2, 3, 32, 32))
    assert r.output_shapes_equal and r.max_abs_diff < 1e-4 and r.params_after < r.params_before * 0.5
    assert math.isfinite(r.max_abs_diff)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (MHABlock(kdim=12), torch.randn(2, 5, 8)),
        lambda: (MHABlock(add_bias_kv=True), torch.randn(2, 5, 8)),
        lambda: (RNNBlock(nn.LSTM, num_layers=2, bidirectional=True, proj_size=5), torch.randn(7, 3, 6)),
        lambda: (RNNBlock(nn.GRU, num_layers=2, bidirectional=True), torch.randn(7, 3, 6)),
        lambda: (TokenNet(), torch.randn(2, 3, 8, 8)),
        lambda: (copy.deepcopy(MAPPER_CASES["pixel_shuffle"]), X),
    ],
    ids=["mha_kdim", "mha_bias_kv", "lstm_proj", "gru", "tokens", "pixel_shuffle"],
)
def test_weight_energy_matches_slices(make):
    """Every pruner gives one energy per index of each of its slices, all non-negative."""
    model, x = make()
    g = DependencyGraph(model.eval(), x)
    checked = 0
    for spec in g.slices:
        if spec.pruner is None:
            continue
        e = spec.pruner.weight_energy(g.model.get_submodule(spec.module), spec.name)
        if e is None:
            continue
        assert e.shape == (spec.atoms.numel(),), (spec.module, spec.name)
        assert bool((e >= 0).all()) and float(e.sum()) > 0
        checked += 1
    assert checked >= 3


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
