"""A seventh set of the scenarios users bring from Torch-Pruning's test suite and examples,
written for CleanAI's API (see ``test_peer_scenarios.py`` to ``_6``): a BEiT attention
written by hand (``F.linear`` on the ``qkv`` weight with a bias built from ``q_bias`` and
``v_bias``, a relative position table picked by a buffer), hand-written attention whose
head count is a number the module stores, the default scale of
``F.scaled_dot_product_attention``, one rule for writing channels into a fresh tensor
(``scatter_add_`` and ``index_put_``), the YOLOv7 blocks of the peer's YOLOv7 example
(implicit knowledge, RepConv, MP, SPPCSPC, the detection head), an Inception-v4 block, a
CIFAR SENet, a U-Net with ``nn.Upsample``, and a set of layers the earlier ports did not
combine (``InstanceNorm1d`` with affine, circular and reflect padding, ``MaxPool1d``,
``BatchNorm1d`` without affine, ``ParameterList`` / ``ModuleDict`` / ``ParameterDict``,
attention with ``add_bias_kv`` and ``add_zero_attn``, a pre-norm encoder with a decoder,
a two-layer bidirectional ReLU ``nn.RNN``, grouped and depthwise ``ConvTranspose2d``,
CoordConv, mixed integer and float inputs with ``None`` and dict outputs), and ops across
the channels that must refuse with their reason.

Each test asserts widths, parameter counts, and the masking oracle where slicing must equal
zeroing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_peer_scenarios_2 import _exact, _group, _mask
from test_peer_scenarios_6 import _prune, _seeded, _two_step_replay
from torch import nn

from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.metrics import count_params
from cleanai_core.testing import masked_forward

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _args(x):
    return x if isinstance(x, tuple) else (x,)


# -- a BEiT attention written by hand: the qkv weight read outside its module --------------------


class HandBeit(nn.Module):
    """BEiT's attention as users write it: the fused ``qkv`` linear is never called,
    ``forward`` runs ``F.linear(x, self.qkv.weight, cat(q_bias, zeros_like(v_bias),
    v_bias))``; a relative position table ``(2n, heads)`` is picked by an index buffer and
    added to the scores per head; the heads are ``self.h`` (a stored number), the head width
    ``-1``."""

    def __init__(self, dim: int = 16, heads: int = 4, win: int = 3) -> None:
        super().__init__()
        self.h = heads
        self.embed = nn.Linear(5, dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        n = win * win
        self.table = nn.Parameter(torch.randn(2 * n, heads))
        self.register_buffer("rel", torch.randint(0, 2 * n, (n, n), generator=torch.Generator().manual_seed(0)))
        self.proj, self.head = nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rel = self.table[self.rel.view(-1)].view(n, n, -1).permute(2, 0, 1)
        a = ((q * 0.5) @ k.transpose(-2, -1) + rel.unsqueeze(0)).softmax(-1)
        return self.head(x + self.proj((a @ v).transpose(1, 2).reshape(b, n, -1)))


def test_a_hand_written_beit_attention_prunes_its_head_width_through_the_outside_read():
    model, x = _seeded(HandBeit), torch.randn(2, 9, 5)
    _exact(model, x)
    graph = DependencyGraph(model, x)
    width = _group(graph, "qkv")
    assert {s.module or s.name for s in width.slices} == {"qkv", "q_bias", "v_bias", "proj"}
    assert width.units.numel() == width.prunable == 4  # the same dim of every head
    table = next(g for g in graph.groups() if any(s.name == "table" for s in g.slices))
    assert table.prunable == 0  # the heads are self.h: they stay
    # the masked model zeroes the weight rows F.linear reads (no hook of qkv sees that read)
    mask = _mask(graph, [(width, [1])])
    small, _ = StructuredPruner(model, x, "magnitude", bias_compensation=False, reconstruction=False).build(mask)
    assert float((small(x) - masked_forward(graph, mask, x)[0]).abs().max()) < 1e-6
    pruner = _prune(model, x)
    assert pruner.skipped_groups == []  # was: "pruning it breaks the model" (the oracle missed the read)
    s = pruner.pruned
    assert s.qkv.weight.shape == (24, 8) and s.q_bias.shape == s.v_bias.shape == (8,) and s.table.shape == (18, 4)
    assert (count_params(model), count_params(s)) == (1291, 427)


# -- hand-written attention: the head count is a number the module stores ------------------------


class StoredHeads(nn.Module):
    """``qkv(x).reshape(B, N, 3, self.h, -1)``: the heads are a stored number, the head
    width is computed (``by_width``: ``reshape(B, N, 3, -1, self.hd)``, the other way
    round). ``sdpa``: ``F.scaled_dot_product_attention`` with its default scale."""

    def __init__(self, dim: int = 32, h: int = 8, sdpa: bool = False, causal: bool = False, by_width=False) -> None:
        super().__init__()
        self.h, self.sdpa, self.causal, self.by_width, self.hd = h, sdpa, causal, by_width, dim // h
        self.inp, self.qkv = nn.Linear(5, dim), nn.Linear(dim, 3 * dim)
        self.proj, self.out = nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.inp(x)
        b, n, _ = x.shape
        parts = (-1, self.hd) if self.by_width else (self.h, -1)  # by_width: the head count is computed
        q, k, v = self.qkv(x).reshape(b, n, 3, *parts).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            y = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1) @ v
        return self.out(x + self.proj(y.transpose(1, 2).reshape(b, n, -1)))


@pytest.mark.parametrize("heads", [8, 2], ids=["8_heads_of_4", "2_heads_of_16"])
def test_a_stored_head_count_leaves_the_head_width_to_prune(heads):
    model, x = _seeded(lambda: StoredHeads(h=heads)), torch.randn(2, 5, 5)
    _exact(model, x)
    width = _group(DependencyGraph(model, x), "qkv")
    assert width.units.numel() == width.prunable == 32 // heads  # the same dims of every head, never a head
    pruner = _prune(model, x)
    assert pruner.skipped_groups == []  # 8 heads of 4 chose the heads, by size: refused by verification
    assert pruner.pruned.qkv.out_features == 48 and pruner.pruned.proj.in_features == 16
    assert (count_params(model), count_params(pruner.pruned)) == (4515, 1235)


class PerHeadScale(nn.Module):
    """``a(x).view(B, N, self.heads, -1) * self.scale`` with a per-head ``(heads, 1)``
    scale; ``heads`` is stored but no query projection lets a fix-up rewrite it."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = 8
        self.a, self.scale, self.o = nn.Linear(5, 32), nn.Parameter(torch.randn(8, 1)), nn.Linear(32, 3)

    def forward(self, x):
        b, n, _ = x.shape
        return self.o((self.a(x).view(b, n, self.heads, -1) * self.scale).reshape(b, n, -1))


def test_a_per_head_scale_beside_a_stored_head_count_keeps_the_heads_and_prunes_their_width():
    model, x = _seeded(PerHeadScale), torch.randn(2, 4, 5)
    _exact(model, x)  # the heads were chosen, and the pruned model failed to run ("size of tensor a (8)")
    graph = DependencyGraph(model, x)
    width = _group(graph, "a")
    assert width.units.numel() == width.prunable == 4
    scale = next(g for g in graph.groups() if any(s.name == "scale" for s in g.slices))
    assert scale.prunable == 0 and any("channels on different dimensions meet" in r for r in scale.reasons)
    small = _prune(model, x).pruned
    assert small.a.out_features == 16 and small.scale.shape == (8, 1)
    assert (count_params(model), count_params(small)) == (299, 155)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_with_its_default_scale_and_stored_heads_keeps_the_attention_with_the_reason(causal):
    model, x = _seeded(lambda: StoredHeads(h=8, sdpa=True, causal=causal)), torch.randn(2, 5, 5)
    graph = DependencyGraph(model, x)
    width = _group(graph, "qkv")
    assert width.prunable == 0 and any("head dimension with the default scale" in r for r in width.reasons)
    pruner = _prune(model, x)
    assert pruner.skipped_groups == []  # refused in the graph, not by verification
    assert pruner.pruned.qkv.out_features == 96 and pruner.pruned.inp.out_features == 16
    assert (count_params(model), count_params(pruner.pruned)) == (4515, 2307)
    # the fix the reason names: the head count as -1, the head size stored -> whole heads go
    model = _seeded(lambda: StoredHeads(h=8, sdpa=True, causal=causal, by_width=True))
    _exact(model, x)
    heads = _group(DependencyGraph(model, x), "qkv")
    assert heads.units.numel() == heads.prunable == 8
    small = _prune(model, x).pruned
    assert small.qkv.out_features == 48 and small(x).shape == (2, 5, 3)
    assert count_params(small) == 1235


# -- a conv's weight read outside it --------------------------------------------------------------


class Trident(nn.Module):
    """TridentNet's branches: one conv's weight and bias run again at dilation 2 with
    ``F.conv2d``, outside the module (``grouped``: a grouped conv, which stays frozen)."""

    def __init__(self, grouped: bool = False) -> None:
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=2 if grouped else 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        c = self.conv
        wide = F.conv2d(x, c.weight, c.bias, padding=2, dilation=2, groups=c.groups)
        return self.head(F.relu(c(x) + wide))


class ConvAsMatrix(nn.Module):
    """A 1x1 conv's weight read as a matrix by ``einsum`` (never called)."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.o = nn.Conv2d(3, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        y = torch.einsum("bchw,oc->bohw", x, self.c.weight[:, :, 0, 0]) + self.c.bias.view(1, -1, 1, 1)
        return self.o(F.relu(y).mean((2, 3)))


def test_a_conv_weight_run_again_at_another_dilation_prunes_with_its_module():
    model, x = _seeded(Trident), torch.randn(2, 3, 8, 8)
    _exact(model, x)
    g = _group(DependencyGraph(model, x), "conv")
    assert g.units.numel() == g.prunable == 8 and {s.module for s in g.slices} >= {"conv", "head"}
    small = _prune(model, x).pruned
    assert (small.stem.out_channels, small.conv.weight.shape, small.head.in_channels) == (4, (4, 4, 3, 3), 4)
    assert (count_params(model), count_params(small)) == (844, 280)  # was refused: "conv.weight is used outside"
    matrix = _seeded(ConvAsMatrix)
    _exact(matrix, x)
    assert (count_params(matrix), count_params(_prune(matrix, x).pruned)) == (59, 31)
    grouped = _seeded(lambda: Trident(grouped=True))
    g = _group(DependencyGraph(grouped, x), "conv")
    # (session 19: a grouped weight is labelled along its filters, so the functional conv names itself)
    assert g.prunable == 0 and any("convolves channels with a weight that cannot shrink" in r for r in g.reasons)


class BatchNormOutside(nn.Module):
    """A BatchNorm's statistics and affine read outside it: by ``F.batch_norm``
    (``folded=False``), or folded into the conv's weight and bias in ``forward``
    (``folded=True``, RepVGG's deploy form computed on the fly); neither module is called."""

    def __init__(self, folded: bool) -> None:
        super().__init__()
        self.folded = folded
        self.c, self.bn, self.o = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 2)
            self.bn.bias.normal_()

    def forward(self, x):
        bn = self.bn
        if not self.folded:
            y = F.conv2d(x, self.c.weight)
            return self.o(F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)))
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        w, b = self.c.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale
        return self.o(F.relu(F.conv2d(x, w, b)))


@pytest.mark.parametrize("folded", [False, True], ids=["f_batch_norm", "folded_into_the_conv"])
def test_a_batchnorm_read_outside_its_module_prunes_with_its_conv(folded):
    model, x = _seeded(lambda: BatchNormOutside(folded)), torch.randn(2, 3, 8, 8)
    _exact(model, x)  # the masked model zeroes the statistics and weights read outside
    g = _group(DependencyGraph(model, x), "c")
    assert g.prunable == 8 and {"bn", "o"} <= {s.module for s in g.slices}
    small = _prune(model, x).pruned
    assert (small.c.out_channels, small.bn.running_var.shape, small.o.in_channels) == (4, (4,), 4)
    assert (count_params(model), count_params(small)) == (268, 136)  # was refused: "bn.weight is used outside"


# -- one rule for a fresh destination: scatter and index_put ---------------------------------------


class FreshDestination(nn.Module):
    """Per-node features written into a fresh tensor, by ``index_add_`` or by
    ``index_put_`` (``dst[rows] = values``); its width is read at run time (``run``), is a
    number the module stores (``stored``) or a literal (``literal``)."""

    def __init__(self, op: str, width: str) -> None:
        super().__init__()
        self.op, self.kind = op, width
        if width == "stored":
            self.width = 16
        self.proj, self.head = nn.Linear(6, 16), nn.Linear(16, 3)
        self.register_buffer("rows", torch.tensor([4, 0, 2, 1, 3]))

    def forward(self, x):
        h = F.relu(self.proj(x))
        c = {"run": h.shape[1], "stored": getattr(self, "width", 0), "literal": 16}[self.kind]
        dst = torch.zeros(x.shape[0], c)
        y = dst.index_add_(0, self.rows, h) if self.op == "index_add" else dst.index_put_((self.rows,), h)
        return self.head(y)


@pytest.mark.parametrize("op", ["index_add", "index_put"])
def test_a_fresh_destination_follows_one_rule_for_scatters_and_index_put(op):
    x = torch.randn(5, 6)
    run = _seeded(lambda: FreshDestination(op, "run"))
    _exact(run, x)
    small = _prune(run, x).pruned  # index_put froze here before the rule was shared
    assert small.proj.out_features == small.head.in_features == 8
    assert (count_params(run), count_params(small)) == (163, 83)
    stored = _seeded(lambda: FreshDestination(op, "stored"))
    g = _group(DependencyGraph(stored, x), "proj")
    assert g.prunable == 0 and any("as wide as a number its module stores" in r for r in g.reasons)
    literal = _seeded(lambda: FreshDestination(op, "literal"))
    pruner = _prune(literal, x)  # the graph trusts it; verification finds the literal and leaves it whole
    assert count_params(pruner.pruned) == 163 and len(pruner.skipped_groups) == 1
    assert "pruning it breaks the model" in pruner.skipped_groups[0]
    assert torch.equal(pruner.pruned(x), literal(x))


# -- YOLOv7 blocks ------------------------------------------------------------------------------


class ImplicitA(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.implicit = nn.Parameter(torch.randn(1, c, 1, 1))

    def forward(self, x):
        return self.implicit + x


class ImplicitM(ImplicitA):
    def forward(self, x):
        return self.implicit * x


def _cbs(i: int, o: int, k: int = 1, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, bias=False), nn.BatchNorm2d(o), nn.SiLU())


class RepConv(nn.Module):
    """3x3 conv + BN, 1x1 conv + BN and an identity BN, summed."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.point = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.silu(self.dense(x) + self.point(x) + self.identity(x))


class MP(nn.Module):
    """YOLOv7's downsampling: a max-pool branch and a strided-conv branch, concatenated."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.m, self.a = nn.MaxPool2d(2, 2), _cbs(c, c // 2)
        self.b1, self.b2 = _cbs(c, c // 2), _cbs(c // 2, c // 2, 3, 2)

    def forward(self, x):
        return torch.cat([self.a(self.m(x)), self.b2(self.b1(x))], 1)


class SPPCSPC(nn.Module):
    def __init__(self, c1: int, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2, self.cv3 = _cbs(c1, c), _cbs(c1, c), _cbs(c, c, 3)
        self.m = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in (5, 9, 13))
        self.cv5, self.cv7 = _cbs(4 * c, c), _cbs(2 * c, c)

    def forward(self, x):
        x1 = self.cv3(self.cv1(x))
        return self.cv7(torch.cat((self.cv5(torch.cat([x1] + [m(x1) for m in self.m], 1)), self.cv2(x)), 1))


class IDetect(nn.Module):
    """Per level: ImplicitA, a 1x1 conv, ImplicitM, viewed ``(bs, na, no, ny, nx)``."""

    def __init__(self, nc: int = 3, ch: tuple = (16, 16), na: int = 2) -> None:
        super().__init__()
        self.no, self.na = nc + 5, na
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * na, 1) for c in ch)
        self.ia = nn.ModuleList(ImplicitA(c) for c in ch)
        self.im = nn.ModuleList(ImplicitM(self.no * na) for _ in ch)

    def forward(self, xs):
        out = []
        for i, x in enumerate(xs):
            y = self.im[i](self.m[i](self.ia[i](x)))
            bs, _, ny, nx = y.shape
            out.append(y.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).reshape(bs, -1, self.no))
        return torch.cat(out, 1)


class YoloV7(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.rep, self.mp, self.spp = _cbs(3, 16, 3, 2), RepConv(16), MP(16), SPPCSPC(16, 16)
        self.up, self.fuse, self.detect = nn.Upsample(scale_factor=2, mode="nearest"), _cbs(32, 16), IDetect()

    def forward(self, x):
        a = self.rep(self.stem(x))
        b = self.spp(self.mp(a))
        return self.detect([self.fuse(torch.cat([a, self.up(b)], 1)), b])


def test_yolov7_blocks_prune_with_their_implicit_knowledge():
    model, x = _seeded(YoloV7), torch.randn(1, 3, 32, 32)
    _exact(model, x)
    pruner = _prune(model, x, ignored_layers=[model.detect])  # the peer's example ignores Detect
    s = pruner.pruned
    assert pruner.skipped_groups == []
    assert s.detect.ia[0].implicit.shape == (1, 8, 1, 1) and s.detect.m[0].in_channels == 8
    assert s.detect.m[0].out_channels == 16 and s.detect.im[0].implicit.shape == (1, 16, 1, 1)  # kept
    assert (s.rep.identity.num_features, s.mp.a[0].out_channels, s.spp.cv5[0].in_channels) == (8, 4, 32)
    assert (count_params(model), count_params(s)) == (9664, 2800)
    assert s(x).shape == model(x).shape == (1, 640, 8)


# -- blocks the earlier ports did not combine ----------------------------------------------------


class InceptionV4Block(nn.Module):
    """An average-pool branch, a 1x1 branch, a 1x7 / 7x1 branch and a split 1x3 / 3x1 branch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Conv2d(16, 8, 1))
        self.b2 = nn.Conv2d(16, 8, 1)
        self.b3 = nn.Sequential(
            nn.Conv2d(16, 6, 1), nn.Conv2d(6, 8, (1, 7), padding=(0, 3)), nn.Conv2d(8, 8, (7, 1), padding=(3, 0))
        )
        self.b4 = nn.Conv2d(16, 6, 1)
        self.b4x, self.b4y = nn.Conv2d(6, 4, (1, 3), padding=(0, 1)), nn.Conv2d(6, 4, (3, 1), padding=(1, 0))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        t = F.relu(self.b4(x))
        y = torch.cat([self.b1(x), self.b2(x), self.b3(x), torch.cat([self.b4x(t), self.b4y(t)], 1)], 1)
        return self.fc(F.adaptive_avg_pool2d(F.relu(y), 1).flatten(1))


class CifarSE(nn.Module):
    """The CIFAR SENet block: ``F.avg_pool2d(out, out.size(2))``, 1x1 convs as the MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.c2, self.lin = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 5)

    def forward(self, x):
        out = F.relu(self.bn(self.c1(x)))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(F.avg_pool2d(out, out.size(2))))))
        out = self.c2(out * w) + out
        return self.lin(F.adaptive_avg_pool2d(out, 1).view(out.size(0), -1))


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e1, self.e2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.d, self.o = nn.Conv2d(24, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = F.relu(self.e1(x))
        b = F.relu(self.e2(F.max_pool2d(a, 2)))
        return self.o(F.relu(self.d(torch.cat([self.up(b), a], 1))))


class Sequence1d(nn.Module):
    """``InstanceNorm1d(affine)``, circular and reflect padding, ``MaxPool1d``,
    ``BatchNorm1d(affine=False)``, ``Hardswish``, ``AdaptiveMaxPool1d``, then parameters
    and layers held in ``ParameterList`` / ``ModuleDict`` / ``ParameterDict``, stacked."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(3, 16, 3, padding=1, padding_mode="circular")
        self.inorm, self.pool = nn.InstanceNorm1d(16, affine=True), nn.MaxPool1d(2)
        self.c2 = nn.Conv1d(16, 12, 3, dilation=2, padding=2, padding_mode="reflect")
        self.bn, self.act, self.amp = nn.BatchNorm1d(12, affine=False), nn.Hardswish(), nn.AdaptiveMaxPool1d(1)
        self.plist = nn.ParameterList([nn.Parameter(torch.randn(12)), nn.Parameter(torch.randn(12))])
        self.md = nn.ModuleDict({"a": nn.Linear(12, 8), "b": nn.Linear(12, 8)})
        self.pd = nn.ParameterDict({"g": nn.Parameter(torch.randn(8))})
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        y = self.amp(self.act(self.bn(self.c2(self.pool(F.relu(self.inorm(self.c(x)))))))).flatten(1)
        y = y * self.plist[0] + self.plist[1]
        return self.out(torch.stack([self.md["a"](y), self.md["b"](y)], 0).sum(0) * self.pd["g"])


class BiasKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 3)
        self.attn = nn.MultiheadAttention(16, 4, add_bias_kv=True, add_zero_attn=True, batch_first=True)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0] + h)


class EncoderDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 3)
        self.enc = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.dec = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)

    def forward(self, x, t):
        return self.out(self.dec(self.inp(t), self.enc(self.inp(x))))


class ReluRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(5, 8), nn.Linear(24, 3)
        self.rnn = nn.RNN(8, 12, num_layers=2, nonlinearity="relu", batch_first=True, bidirectional=True)

    def forward(self, x):
        return self.out(self.rnn(self.inp(x))[0][:, -1])


class TransposedGroups(nn.Module):
    """A grouped ``ConvTranspose2d`` with ``output_padding``, a depthwise one, a ``ConvTranspose1d``."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 16, 3, padding=1)
        self.t1 = nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1, output_padding=1, groups=4)
        self.t2 = nn.ConvTranspose2d(16, 16, 3, padding=1, groups=16)
        self.t3, self.o = nn.ConvTranspose1d(16, 8, 2, stride=2), nn.Conv1d(8, 3, 1)

    def forward(self, x):
        y = F.relu(self.t2(F.relu(self.t1(F.relu(self.c(x))))))
        return self.o(F.relu(self.t3(y.flatten(2))))


class Selects(nn.Module):
    """``torch.where``, ``maximum`` and ``minimum`` between two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.c(torch.where(a > 0, a, b) + torch.maximum(a, b) - torch.minimum(a, 0.5 * b))


class CoordConv(nn.Module):
    """Coordinate channels from a buffer and a constant channel concatenated to features."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(10, 6, 3, padding=1), nn.Conv2d(7, 4, 1)
        grid = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
        self.register_buffer("coords", torch.stack(grid)[None])

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), self.coords.expand(x.shape[0], -1, -1, -1)], 1)
        y = F.relu(self.b(y))
        return self.c(torch.cat([y, torch.ones_like(y[:, :1])], 1))


class MixedInputs(nn.Module):
    """Token ids and float features in; logits, ``None`` and a dict of numbers out."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.o = nn.Embedding(20, 8), nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, ids, feats):
        return self.o(F.relu(self.emb(ids).mean(1) + self.fc(feats))), None, {"aux": 3}


BLOCKS = {
    "inception_v4_block": (InceptionV4Block, lambda: torch.randn(2, 3, 8, 8), (2041, 679)),
    "cifar_senet": (CifarSE, lambda: torch.randn(2, 3, 8, 8), (3033, 911)),
    "unet_upsample": (UNet, lambda: torch.randn(2, 3, 8, 8), (3146, 854)),
    "sequence_1d_containers": (Sequence1d, lambda: torch.randn(2, 3, 16), (1047, 333)),
    "mha_bias_kv_zero_attn": (BiasKV, lambda: torch.randn(2, 5, 6), (1283, 387)),
    "encoder_decoder_norm_first": (EncoderDecoder, lambda: (torch.randn(2, 5, 6), torch.randn(2, 4, 6)), (5731, 1587)),
    "relu_rnn_bidirectional": (ReluRNN, lambda: torch.randn(2, 5, 5), (1563, 447)),
    "grouped_transposed_convs": (TransposedGroups, lambda: torch.randn(2, 3, 4, 4), (1491, 539)),
    "where_maximum_minimum": (Selects, lambda: torch.randn(2, 3, 8, 8), (484, 244)),
    "coord_conv": (CoordConv, lambda: torch.randn(2, 3, 8, 8), (802, 297)),
    "mixed_inputs_none_dict_out": (
        MixedInputs,
        lambda: (torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0)), torch.randn(2, 4)),
        (227, 115),
    ),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_blocks_the_earlier_ports_did_not_combine_prune_exactly(name):
    factory, inputs, (before, after) = BLOCKS[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = inputs()
    _exact(model, x)
    pruner = _prune(model, x)
    small = pruner.pruned
    assert pruner.skipped_groups == []
    assert (count_params(model), count_params(small)) == (before, after)
    got, want = small(*_args(x)), model(*_args(x))
    got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
    assert got.shape == want.shape


@pytest.mark.parametrize("name", ["yolov7", "hand_beit", "stored_heads", "trident", "folded_batchnorm"])
def test_two_step_histories_of_the_new_scenarios_replay_on_fresh_copies(name, tmp_path):
    factory, x = {
        "yolov7": (YoloV7, torch.randn(1, 3, 32, 32)),
        "hand_beit": (HandBeit, torch.randn(2, 9, 5)),
        "stored_heads": (StoredHeads, torch.randn(2, 5, 5)),
        "trident": (Trident, torch.randn(2, 3, 8, 8)),
        "folded_batchnorm": (lambda: BatchNormOutside(folded=True), torch.randn(2, 3, 8, 8)),
    }[name]
    pruner, small, fresh = _two_step_replay(factory, x, tmp_path)
    assert len(pruner.history) == 2 and count_params(fresh) == count_params(small) < count_params(_seeded(factory))
    assert torch.equal(fresh(x), small(x))


# -- ops across the channels refuse with their reason --------------------------------------------


class Across(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        width = {"adaptive_pool": 8, "std": 17}.get(op, 16)
        self.op, self.fc, self.o = op, nn.Linear(5, 16), nn.Linear(width, 3)
        self.pool = nn.AdaptiveAvgPool1d(8)

    def forward(self, x):
        h = F.relu(self.fc(x))
        if self.op == "sort":
            h = h.sort(-1)[0]
        elif self.op == "topk":
            h = h.topk(4, -1)[0].sum(-1, keepdim=True) * h
        elif self.op == "std":  # a feature of its own (``h / (std + 1)`` normalises: test_peer_scenarios_10)
            h = torch.cat([h, h.std(-1, keepdim=True)], -1)
        elif self.op == "log_softmax":
            h = F.log_softmax(h, -1)
        elif self.op == "adaptive_pool":
            h = self.pool(h.unsqueeze(1)).squeeze(1)
        return self.o(h)


@pytest.mark.parametrize(
    "op, says",
    [
        ("sort", "aten.sort.default in model orders channels"),
        ("topk", "aten.topk.default in model orders channels"),
        ("std", "std across channels depends on their number"),
        ("log_softmax", "_log_softmax across channels depends on their number"),
        ("adaptive_pool", "mixes the labelled (spatial) dimension"),
    ],
)
def test_an_op_across_the_channels_refuses_with_its_name(op, says):
    model, x = _seeded(lambda: Across(op)), torch.randn(2, 5)
    with pytest.raises(UserError, match="nothing in this model can be pruned") as err:
        StructuredPruner(model, x, "magnitude")
    assert says in str(err.value)
