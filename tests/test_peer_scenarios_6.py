"""A sixth set of the scenarios users bring from Torch-Pruning's test suite, examples and
benchmarks, written for CleanAI's API (see ``test_peer_scenarios.py`` to ``_5``): the graph
attention network of the peer's GAT benchmark (messages gathered over edges and summed back
into their nodes with ``scatter_add_`` / ``index_add_``, per-head scoring vectors as bare
parameters, the dense form with ``bmm``), gated linear units (``F.glu`` / ``nn.GLU``),
convolutions whose weights are bare ``nn.Parameter``s (the peer's unwrapped parameters, read
by ``F.conv2d``), ``nn.Transformer`` (its ``d_model`` check), and a handful of small blocks
of the peer's model zoo (YOLOv5's Focus, SPPF and detection head, DGCNN's edge convolution,
PointNet, a ``torch.fx`` graph module, kdim/vdim attention, pixel shuffle, a depthwise
convolution with a channel multiplier).

Each test asserts widths, parameter counts, and the masking oracle where slicing must equal
zeroing."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from test_peer_scenarios_2 import _exact, _group, _mask
from torch import nn

from cleanai_core import DependencyGraph, PruningHistory, StructuredPruner, hookimpl
from cleanai_core.errors import UserError
from cleanai_core.metrics import count_params
from cleanai_core.plugins import temporary_plugin

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _prune(model: nn.Module, x, ratio=0.5, **kw) -> StructuredPruner:
    pruner = StructuredPruner(model.eval(), x, "magnitude", pruning_ratio=ratio, **kw)
    pruner.pruned = pruner.prune()
    return pruner


def _seeded(factory):
    torch.manual_seed(0)
    return factory().eval()


# -- graph attention: messages over edges, summed into nodes ------------------------------------


class EdgeAttention(nn.Module):
    """A graph attention layer over an edge list (the peer's GAT benchmark, implementation 3):
    per-head features picked for every edge by ``index_select``, scores normalised per
    target node with ``scatter_add_`` into ``torch.zeros``, messages summed back into their
    nodes with ``scatter_add_``; per-head scoring vectors ``(1, heads, width)`` and the bias
    are bare parameters; the head width is read from the projection in ``forward``."""

    def __init__(self, fin: int, width: int, heads: int, concat: bool = True) -> None:
        super().__init__()
        self.heads, self.concat = heads, concat
        self.proj = nn.Linear(fin, heads * width, bias=False)
        self.skip = nn.Linear(fin, heads * width, bias=False)
        self.a_src = nn.Parameter(torch.randn(1, heads, width))
        self.a_dst = nn.Parameter(torch.randn(1, heads, width))
        self.bias = nn.Parameter(torch.randn(heads * width if concat else width))

    def forward(self, data):
        x, edges = data
        n, (src, dst) = x.shape[0], edges
        width = self.proj.out_features // self.heads
        h = self.proj(x).view(-1, self.heads, width)
        e = F.leaky_relu((h * self.a_src).sum(-1).index_select(0, src) + (h * self.a_dst).sum(-1).index_select(0, dst))
        e = (e - e.max()).exp()
        denom = torch.zeros(n, self.heads).scatter_add_(0, dst.unsqueeze(-1).expand_as(e), e)
        msg = h.index_select(0, src) * (e / (denom.index_select(0, dst) + 1e-16)).unsqueeze(-1)
        size = list(msg.shape)
        size[0] = n
        out = torch.zeros(size).scatter_add_(0, dst.view(-1, 1, 1).expand_as(msg), msg)
        out = out + self.skip(x).view(-1, self.heads, width)
        out = out.reshape(n, -1) if self.concat else out.mean(1)
        out = out + self.bias
        return (F.elu(out) if self.concat else out), edges


class GAT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        last = EdgeAttention(32, 5, 2, concat=False)
        self.net = nn.Sequential(EdgeAttention(12, 8, 4), EdgeAttention(32, 8, 4), last)

    def forward(self, x, edges):
        return self.net((x, edges))[0]


def _graph(nodes: int = 10, edges: int = 30, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(nodes, 12, generator=gen), torch.randint(0, nodes, (2, edges), generator=gen)


def test_graph_attention_sums_messages_into_nodes_and_prunes_each_heads_width():
    model, x = _seeded(GAT), _graph()
    _exact(model, x)
    graph = DependencyGraph(model, x)
    g = _group(graph, "net.0.proj")
    names = {s.module or s.name for s in g.slices}
    assert {"net.0.a_src", "net.0.a_dst", "net.0.skip", "net.0.bias", "net.1.proj", "net.1.skip"} <= names
    assert g.units.numel() == 8  # one unit: the same feature of every head
    pruner = _prune(model, x)
    small = pruner.pruned
    assert pruner.skipped_groups == []
    first = small.net[0]
    assert first.proj.out_features == first.skip.out_features == 16 and first.bias.shape == (16,)
    assert first.a_src.shape == first.a_dst.shape == (1, 4, 4)
    assert small.net[1].proj.in_features == 16 and small.net[2].proj.out_features == 10  # the output stays
    assert (count_params(model), count_params(small)) == (3673, 1337)
    other = _graph(nodes=7, edges=19, seed=3)  # another graph: the widths are read at run time
    assert small(*other).shape == model(*other).shape == (7, 5)


class StoredWidth(nn.Module):
    """Messages summed into ``torch.zeros(n, self.width)``, a number the module stores
    (JetMoE's mixture of attention: ``zeros(tokens, self.hidden_size)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 32
        self.proj, self.head = nn.Linear(12, 32), nn.Linear(32, 3)

    def forward(self, x, edges):
        h = self.proj(x)
        out = torch.zeros(x.shape[0], self.width).index_add_(0, edges[1], h.index_select(0, edges[0]))
        return self.head(F.elu(out))


def test_a_destination_as_wide_as_a_stored_number_freezes_in_the_graph():
    model, x = _seeded(StoredWidth), _graph()
    g = _group(DependencyGraph(model, x), "proj")
    assert not bool((~g.frozen).any())
    assert any("as wide as a number its module stores" in r for r in g.reasons)
    with pytest.raises(UserError, match="nothing in this model can be pruned.*as wide as a number its module stores"):
        _prune(model, x)


class LiteralWidth(nn.Module):
    """Messages summed into ``torch.zeros(n, 4, 8)``: the width is a literal."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(12, 32), nn.Linear(32, 3)

    def forward(self, x, edges):
        h = self.proj(x).view(-1, 4, 8)
        out = torch.zeros(x.shape[0], 4, 8).index_add_(0, edges[1], h.index_select(0, edges[0]))
        return self.head(F.elu(out.flatten(1)))


def test_a_destination_with_a_literal_width_is_left_whole_with_the_reason():
    model, x = _seeded(LiteralWidth), _graph()
    pruner = _prune(model, x)
    assert count_params(pruner.pruned) == count_params(model) == 515
    assert len(pruner.skipped_groups) == 1
    assert "pruning it breaks the model" in pruner.skipped_groups[0] and "proj" in pruner.skipped_groups[0]
    assert torch.equal(pruner.pruned(*x), model(*x))


class IndexAddNodes(nn.Module):
    """Node features summed with ``index_add_`` into ``new_zeros`` and maxed with
    ``scatter_reduce`` into ``zeros_like``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.gate, self.head = nn.Linear(12, 32), nn.Parameter(torch.randn(1, 4, 8)), nn.Linear(32, 3)

    def forward(self, x, edges):
        src, dst = edges
        h = self.proj(x).view(x.shape[0], 4, -1)
        msg = h.index_select(0, src) * torch.sigmoid((h * self.gate).sum(-1, keepdim=True)).index_select(0, src)
        total = h.new_zeros(h.shape).index_add_(0, dst, msg)
        peak = torch.zeros_like(h).scatter_reduce(0, dst.view(-1, 1, 1).expand_as(msg), msg, "amax", include_self=False)
        return self.head(F.elu((total + peak).flatten(1)))


def test_index_add_and_scatter_reduce_over_nodes_pass_the_channels():
    model, x = _seeded(IndexAddNodes), _graph()
    _exact(model, x)
    small = _prune(model, x).pruned
    assert small.proj.out_features == small.head.in_features == 16 and small.gate.shape == (1, 4, 4)
    assert (count_params(model), count_params(small)) == (547, 275)


class ScatterAcrossChannels(nn.Module):
    def __init__(self, computed: bool = True) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(12, 8), nn.Linear(8, 3)
        self.computed = computed
        self.register_buffer("order", torch.tensor([[7, 6, 5, 4, 3, 2, 1, 0]]))

    def forward(self, x):
        h = self.proj(x)
        order = self.order * 1 if self.computed else self.order  # ``* 1``: an index made in forward
        return self.head(torch.zeros_like(h).scatter_add(1, order.expand_as(h), h))


def test_a_scatter_along_the_channels_freezes_them_with_the_reason():
    model = _seeded(ScatterAcrossChannels)
    graph = DependencyGraph(model, torch.randn(5, 12))
    g = _group(graph, "proj")
    assert not bool((~g.frozen).any())
    assert any("writes across the channels" in r for r in g.reasons)
    # through the buffer itself (a permutation), the channels are placed and the buffer rewritten
    # (session 19, tests/test_peer_scenarios_8.py)
    placed = DependencyGraph(_seeded(lambda: ScatterAcrossChannels(False)), torch.randn(5, 12))
    assert _group(placed, "proj").prunable == 8


class DenseGraphAttention(nn.Module):
    """The dense form (the peer's implementation 1): ``(heads, nodes, width)`` features,
    scoring vectors laid out ``(heads, width, 1)`` for ``bmm``, an additive adjacency mask."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(12, 32, bias=False), nn.Linear(32, 3)
        self.a_src, self.a_dst = nn.Parameter(torch.randn(4, 8, 1)), nn.Parameter(torch.randn(4, 8, 1))

    def forward(self, x, adj):
        h = self.proj(x).view(x.shape[0], 4, -1).transpose(0, 1)
        scores = torch.bmm(h, self.a_src) + torch.bmm(h, self.a_dst).transpose(1, 2)
        att = torch.softmax(F.leaky_relu(scores) + adj, -1)
        return self.head(torch.bmm(att, h).transpose(0, 1).reshape(x.shape[0], -1))


def test_dense_graph_attention_prunes_scoring_vectors_laid_out_for_bmm():
    x = _graph()[0]
    adj = torch.where(torch.rand(10, 10, generator=torch.Generator().manual_seed(1)) > 0.5, 0.0, -1e9)
    model = _seeded(DenseGraphAttention)
    _exact(model, (x, adj))
    spec = DependencyGraph(model, (x, adj)).ctx.slices[("", "a_src")]
    assert spec.dim == 1  # the width, not the trailing 1 it broadcasts over
    small = _prune(model, (x, adj)).pruned
    assert small.proj.out_features == small.head.in_features == 16
    assert small.a_src.shape == small.a_dst.shape == (4, 4, 1)
    assert (count_params(model), count_params(small)) == (547, 275)


def test_a_pruned_graph_attention_network_replays_on_a_fresh_copy(tmp_path):
    model, x = _seeded(GAT), _graph()
    pruner = _prune(model, x)
    pruner.history.save(tmp_path / "history.json")
    torch.save(pruner.pruned.state_dict(), tmp_path / "model.pt")
    fresh = _seeded(GAT)
    PruningHistory.load(tmp_path / "history.json").replay(fresh)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"), strict=True)
    assert fresh.net[0].a_src.shape == (1, 4, 4) and count_params(fresh) == 1337
    assert torch.equal(fresh.eval()(*x), pruner.pruned(*x))


# -- gated linear units --------------------------------------------------------------------------


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 16, 3), nn.Conv2d(8, 6, 1)
        self.fc1, self.glu, self.fc2 = nn.Linear(6, 32), nn.GLU(), nn.Linear(16, 4)

    def forward(self, x):
        y = self.conv2(F.glu(self.conv(x), dim=1)).mean((2, 3))
        return self.fc2(self.glu(self.fc1(y)))


def test_a_gated_linear_unit_ties_each_channel_to_its_gate():
    model, x = _seeded(Gated), torch.randn(2, 3, 8, 8)
    _exact(model, x)
    graph = DependencyGraph(model, x)
    conv, fc1 = _group(graph, "conv"), _group(graph, "fc1")
    assert conv.units.numel() == 8 and fc1.units.numel() == 16  # a value and its gate: one unit
    small, _ = StructuredPruner(model, x, "magnitude").build(_mask(graph, [(conv, [0, 3]), (fc1, [5])]))
    keep = [c for c in range(16) if c not in (0, 3, 8, 11)]
    assert torch.equal(small.conv.weight, model.conv.weight[keep])
    assert torch.equal(small.conv2.weight, model.conv2.weight[:, [c for c in range(8) if c not in (0, 3)]])
    assert torch.equal(small.fc1.weight, model.fc1.weight[[r for r in range(32) if r not in (5, 21)]])
    assert small.fc2.in_features == 15 and small(x).shape == (2, 4)
    half = _prune(model, x).pruned
    widths = (half.conv.out_channels, half.conv2.in_channels, half.fc1.out_features, half.fc2.in_features)
    assert widths == (8, 4, 16, 8)


# -- convolutions with bare weights (unwrapped parameters) ---------------------------------------


class BareConvs(nn.Module):
    """``F.conv2d`` / ``F.conv_transpose2d`` / ``F.conv1d`` reading bare parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.w, self.b = nn.Parameter(torch.randn(16, 8, 3, 3)), nn.Parameter(torch.randn(16))
        self.up = nn.Parameter(torch.randn(16, 12, 2, 2))  # transposed: (in, out, k, k)
        self.w1d = nn.Parameter(torch.randn(10, 12, 3))
        self.head = nn.Conv1d(10, 4, 1)

    def forward(self, x):
        y = F.relu(F.conv2d(self.stem(x), self.w, self.b, padding=1))
        y = F.relu(F.conv_transpose2d(y, self.up, stride=2))
        return self.head(F.relu(F.conv1d(y.flatten(2), self.w1d)))


def test_functional_convolutions_with_bare_weights_prune_filters_bias_and_inputs():
    model, x = _seeded(BareConvs), torch.randn(2, 3, 4, 4)
    _exact(model, x)
    graph = DependencyGraph(model, x)
    g = _group(graph, "stem")
    assert {s.name for s in g.slices if not s.module} == {"w#1"}
    small = _prune(model, x).pruned
    assert small.stem.out_channels == 4 and small.w.shape == (8, 4, 3, 3) and small.b.shape == (8,)
    assert small.up.shape == (8, 6, 2, 2) and small.w1d.shape == (5, 6, 3) and small.head.in_channels == 5
    assert (count_params(model), count_params(small)) == (2372, 618)
    assert small(x).shape == model(x).shape == (2, 4, 62)


class GroupedBare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)
        self.dw, self.w = nn.Parameter(torch.randn(8, 1, 3, 3)), nn.Parameter(torch.randn(8, 8, 1, 1))

    def forward(self, x):
        y = F.conv2d(self.stem(x), self.dw, groups=8)  # grouped: kept
        y = F.conv2d(y, self.w / self.w.pow(2).sum((1, 2, 3), keepdim=True).sqrt())  # computed: kept
        return self.head(F.relu(y))


def test_a_grouped_or_computed_bare_conv_weight_keeps_its_channels_with_the_reason():
    model, x = _seeded(GroupedBare), torch.randn(2, 3, 8, 8)
    with pytest.raises(UserError, match="convolves channels with a weight that cannot shrink"):
        StructuredPruner(model, x, "magnitude")
    graph = DependencyGraph(model, x)
    assert not bool((~_group(graph, "stem").frozen).any())


# -- nn.Transformer -----------------------------------------------------------------------------


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.t = nn.Transformer(16, 4, 1, 1, 32, dropout=0.0)
        self.head = nn.Linear(16, 3)

    def forward(self, src, tgt):
        return self.head(self.t(self.embed(src), self.embed(tgt)))


def test_nn_transformer_prunes_its_stream_and_d_model_follows(tmp_path):
    model, x = _seeded(Seq2Seq), (torch.randn(5, 2, 8), torch.randn(4, 2, 8))
    pruner = _prune(model, x)
    small = pruner.pruned
    assert pruner.skipped_groups == []
    assert small.t.d_model == small.embed.out_features == small.t.encoder.layers[0].self_attn.embed_dim == 8
    assert small.t.decoder.layers[0].linear1.out_features == 16
    assert (count_params(model), count_params(small)) == (5827, 1635)
    assert small(*x).shape == (4, 2, 3)
    pruner.history.save(tmp_path / "history.json")
    fresh = _seeded(Seq2Seq)
    PruningHistory.load(tmp_path / "history.json").replay(fresh)
    fresh.load_state_dict(small.state_dict(), strict=True)
    assert fresh.t.d_model == 8 and torch.equal(fresh.eval()(*x), small(*x))


# -- small blocks of the peer's model zoo ---------------------------------------------------------


class Focus(nn.Module):
    """YOLOv5's space-to-depth stem, SPPF and detection head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.cv1 = nn.Conv2d(12, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.pool, self.cv2 = nn.MaxPool2d(5, 1, 2), nn.Conv2d(32, 16, 1)
        self.detect, self.na, self.no = nn.Conv2d(16, 3 * 7, 1), 3, 7

    def forward(self, x):
        x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
        y = self.cv1(F.silu(self.stem(x)))
        y1 = self.pool(y)
        y2 = self.pool(y1)
        y = self.detect(F.silu(self.cv2(torch.cat([y, y1, y2, self.pool(y2)], 1))))
        bs, _, ny, nx = y.shape
        return y.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous().view(bs, -1, self.no)


def _knn(x, k):
    inner = -2 * torch.matmul(x.transpose(2, 1), x)
    xx = torch.sum(x**2, dim=1, keepdim=True)
    return (-xx - inner - xx.transpose(2, 1)).topk(k=k, dim=-1)[1]


class EdgeConv(nn.Module):
    """DGCNN's edge convolution: neighbours gathered by a k-NN index made in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.c, self.bn = nn.Conv1d(3, 8, 1), nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12)
        self.o = nn.Conv1d(12, 4, 1)

    def forward(self, x):
        x = self.c0(x)
        b, c, n = x.shape
        idx = (_knn(x, 4) + torch.arange(b).view(-1, 1, 1) * n).view(-1)
        xt = x.transpose(2, 1).contiguous()
        near = xt.view(b * n, -1)[idx, :].view(b, n, 4, c)
        xr = xt.view(b, n, 1, c).repeat(1, 1, 4, 1)
        f = torch.cat((near - xr, xr), dim=3).permute(0, 3, 1, 2)
        return self.o(F.leaky_relu(self.bn(self.c(f))).max(-1)[0])


class PointNet(nn.Module):
    """A spatial transformer predicting a 3x3 matrix, shared MLPs as 1x1 Conv1d, a max pool."""

    def __init__(self) -> None:
        super().__init__()
        self.t1, self.tb, self.tf = nn.Conv1d(3, 16, 1), nn.BatchNorm1d(16), nn.Linear(16, 9)
        self.c1, self.b1 = nn.Conv1d(3, 32, 1), nn.BatchNorm1d(32)
        self.c2, self.b2 = nn.Conv1d(32, 64, 1), nn.BatchNorm1d(64)
        self.f = nn.Linear(64, 5)

    def forward(self, x):
        t = self.tf(F.relu(self.tb(self.t1(x))).max(2)[0]).view(-1, 3, 3) + torch.eye(3)
        x = torch.bmm(x.transpose(1, 2), t).transpose(1, 2)
        x = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return self.f(torch.flatten(torch.max(x, 2, keepdim=True)[0], 1))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        return self.fc((y + self.c2(y)).mean((2, 3)))


class KdimAttention(nn.Module):
    """Sequence-first attention with separate key and value widths."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 16), nn.Linear(8, 12), nn.Linear(8, 20)
        self.attn, self.out = nn.MultiheadAttention(16, 4, kdim=12, vdim=20), nn.Linear(16, 3)

    def forward(self, q, kv):
        return self.out(self.attn(self.q(q), self.k(kv), self.v(kv))[0])


class Shuffles(nn.Module):
    """Pixel shuffle, a depthwise convolution with a channel multiplier of 3, pixel unshuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.ps, self.dw = nn.Conv2d(3, 32, 3, padding=1), nn.PixelShuffle(2), nn.Conv2d(8, 24, 3, groups=8)
        self.pu, self.c2 = nn.PixelUnshuffle(2), nn.Conv2d(96, 4, 1)

    def forward(self, x):
        return self.c2(self.pu(F.relu(self.dw(F.relu(self.ps(self.c1(x)))))))


ZOO = {
    "yolov5_focus_sppf_detect": (Focus, lambda: torch.randn(1, 3, 16, 16), (2765, 1233)),
    "dgcnn_edge_conv": (EdgeConv, lambda: torch.randn(2, 3, 10), (312, 110)),
    "pointnet": (PointNet, lambda: torch.randn(2, 3, 20), (3006, 998)),
    "fx_graph_module": (lambda: torch.fx.symbolic_trace(Residual()), lambda: torch.randn(2, 3, 8, 8), (860, 288)),
    "mha_kdim_vdim": (KdimAttention, lambda: (torch.randn(5, 2, 8), torch.randn(7, 2, 8)), (1571, 531)),
    "pixel_shuffle_depthwise_multiplier": (Shuffles, lambda: torch.randn(1, 3, 8, 8), (1524, 764)),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_small_blocks_of_the_peers_zoo_prune_exactly(name):
    factory, inputs, (before, after) = ZOO[name]
    torch.manual_seed(1)
    x = inputs()
    model = _seeded(factory)
    _exact(model, x)
    pruner = _prune(model, x)
    small = pruner.pruned
    assert (count_params(model), count_params(small)) == (before, after)
    args = x if isinstance(x, tuple) else (x,)
    assert small(*args).shape == model(*args).shape


def test_a_torchscript_module_is_refused_with_the_fix():
    x = torch.randn(2, 3, 8, 8)
    scripted = torch.jit.trace(_seeded(Residual), x)
    with pytest.raises(UserError, match="TorchScript module.*Prune the original model, then script the pruned one"):
        StructuredPruner(scripted, x, "magnitude")


# -- a linear layer viewed as feature maps, read on another part of the split ---------------------


class LinearToMaps(nn.Module):
    """``Linear(8, 160)`` viewed ``(B, C, 5, 8)`` for a conv reading ``C`` = 4 (the peer's
    reshape test with a narrow channel dim): the view's widths are read at run time."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 160)
        self.conv = nn.ConvTranspose2d(4, 6, 2, 2) if transposed else nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = F.relu(self.fc(x)).view(x.shape[0], self.conv.in_channels, 5, -1)
        return self.head(F.relu(self.conv(y)))


@pytest.mark.parametrize("transposed", [False, True])
def test_a_linear_viewed_as_narrow_feature_maps_prunes_whole_maps(transposed):
    model, x = _seeded(lambda: LinearToMaps(transposed)), torch.randn(2, 8)
    _exact(model, x)
    g = _group(DependencyGraph(model, x), "fc")
    assert g.units.numel() == 4  # a unit is one 5x8 map: 40 rows of fc
    small, _ = StructuredPruner(model, x, "magnitude").build(_mask(DependencyGraph(model, x), [(g, [1])]))
    rows = [r for r in range(160) if not 40 <= r < 80]
    assert torch.equal(small.fc.weight, model.fc.weight[rows]) and small.conv.in_channels == 3
    half = _prune(model, x).pruned
    assert (half.fc.out_features, half.conv.in_channels, half.conv.out_channels) == (80, 2, 3)
    assert half(x).shape == model(x).shape


def _generator() -> nn.Sequential:
    """A DCGAN-style generator: ``Linear -> nn.Unflatten(1, (16, 4, 4)) -> ConvTranspose2d``."""
    return nn.Sequential(
        nn.Linear(16, 256),
        nn.ReLU(),
        nn.Unflatten(1, (16, 4, 4)),
        nn.ConvTranspose2d(16, 8, 4, 2, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 3, 4, 2, 1),
    )


def test_an_unflatten_module_rewrites_its_sizes_to_the_kept_maps(tmp_path):
    model, x = _seeded(_generator), torch.randn(2, 16)
    _exact(model, x)
    g = _group(DependencyGraph(model, x), "0")
    assert g.units.numel() == 16 and any(s.module == "2" and s.name == "size0" for s in g.slices)
    pruner = _prune(model, x)
    small = pruner.pruned
    assert pruner.skipped_groups == [] and small[2].unflattened_size == (8, 4, 4)
    assert (small[0].out_features, small[3].in_channels, small[3].out_channels) == (128, 8, 4)
    assert (count_params(model), count_params(small)) == (6811, 2895)
    assert small(x).shape == (2, 3, 16, 16)
    pruner.history.save(tmp_path / "history.json")
    fresh = _seeded(_generator)
    PruningHistory.load(tmp_path / "history.json").replay(fresh)
    fresh.load_state_dict(small.state_dict(), strict=True)
    assert fresh[2].unflattened_size == (8, 4, 4) and torch.equal(fresh.eval()(x), small(x))


# -- unpooling with the encoder's indices ---------------------------------------------------------


class SegNet(nn.Module):
    """SegNet's decoder unpools with the indices of the encoder's poolings: decoder layer
    ``d2``'s channel ``k`` is placed where encoder ``e1``'s channel ``k`` had its maxima."""

    def __init__(self) -> None:
        super().__init__()
        self.e1, self.e2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.pool, self.unpool = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)
        self.d2, self.d1 = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y, i1 = self.pool(F.relu(self.e1(x)))
        y, i2 = self.pool(F.relu(self.e2(y)))
        y = F.relu(self.d2(self.unpool(y, i2)))
        return self.d1(self.unpool(y, i1, output_size=x.shape[-2:]))


def test_unpooling_with_the_encoders_indices_pairs_encoder_and_decoder_channels():
    model, x = _seeded(SegNet), torch.randn(2, 3, 16, 16)
    _exact(model, x)
    graph = DependencyGraph(model, x)
    assert {s.module for s in _group(graph, "e1").slices} >= {"e1", "e2", "d2", "d1"}
    assert {s.module for s in _group(graph, "e2").slices} >= {"e2", "d2"}
    small = _prune(model, x).pruned
    assert (small.e1.out_channels, small.e2.out_channels, small.d2.out_channels) == (4, 8, 4)
    assert (count_params(model), count_params(small)) == (2844, 848)
    assert small(x).shape == (2, 4, 16, 16)


# -- spatial transformers, folding, Fourier filters --------------------------------------------


class SpatialTransformer(nn.Module):
    """A localisation net predicts an affine grid; ``F.grid_sample`` resamples features."""

    def __init__(self) -> None:
        super().__init__()
        self.loc, self.theta = nn.Conv2d(3, 4, 3), nn.Linear(4, 6)
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        theta = self.theta(F.relu(self.loc(x)).mean((2, 3))).view(-1, 2, 3)
        f = F.relu(self.conv(x))
        return self.head(F.grid_sample(f, F.affine_grid(theta, f.size(), align_corners=False), align_corners=False))


class Folded(nn.Module):
    """Patches unfolded, mixed by a linear layer, folded back (``F.fold``), filtered in the
    Fourier domain over space."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.head = nn.Linear(12, 32), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        cols = self.mix(F.unfold(x, 2, stride=2).transpose(1, 2)).transpose(1, 2)
        y = F.fold(cols, (8, 8), 2, stride=2)
        spec = torch.fft.rfft2(y, norm="ortho")
        y = torch.fft.irfft2(spec * torch.sigmoid(spec.abs()), s=(8, 8), norm="ortho")
        return self.head(F.gelu(y))


def test_grid_sampled_features_and_the_localisation_net_prune():
    model, x = _seeded(SpatialTransformer), torch.randn(2, 3, 8, 8)
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (small.loc.out_channels, small.theta.in_features, small.conv.out_channels) == (2, 2, 4)
    assert small.theta.out_features == 6  # the affine parameters are coordinates: kept
    assert (count_params(model), count_params(small)) == (393, 201)


def test_folded_patches_and_a_fourier_filter_over_space_pass_the_channels():
    model, x = _seeded(Folded), torch.randn(2, 3, 8, 8)
    _exact(model, x)
    g = _group(DependencyGraph(model, x), "mix")
    assert g.units.numel() == 8  # a unit: the 2x2 columns of one folded channel
    small = _prune(model, x).pruned
    assert small.mix.out_features == 16 and small.head.in_channels == 4
    assert (count_params(model), count_params(small)) == (443, 223)
    assert small(x).shape == (2, 3, 8, 8)


class GlobalFilter(nn.Module):
    """GFNet's global filter: a complex filter stored as a bare ``(h, w // 2 + 1, C, 2)``
    parameter, applied in the Fourier domain over space on ``(B, H, W, C)`` tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(3, 8), nn.Linear(8, 3)
        self.filter = nn.Parameter(torch.randn(8, 5, 8, 2) * 0.02)

    def forward(self, x):
        x = self.embed(x.permute(0, 2, 3, 1))
        x = torch.fft.rfft2(x, dim=(1, 2), norm="ortho") * torch.view_as_complex(self.filter)
        return self.head(torch.fft.irfft2(x, s=(8, 8), dim=(1, 2), norm="ortho"))


class FilterChannels:
    @hookimpl(tryfirst=True)
    def cleanai_unwrapped_parameter(self, name, parameter, model):
        return 2 if name == "filter" else None


def test_a_complex_global_filter_prunes_once_a_plugin_names_its_channel_dim():
    model, x = _seeded(GlobalFilter), torch.randn(2, 3, 8, 8)
    with pytest.raises(UserError, match="view_as_complex.*reads the labelled dimension as real and imaginary parts"):
        StructuredPruner(model, x, "magnitude")  # by default the trailing (re, im) pair is taken for channels
    with temporary_plugin(FilterChannels(), name="filter-channels"):
        _exact(model, x)
        small = _prune(model, x).pruned
    assert small.embed.out_features == small.head.in_features == 4 and small.filter.shape == (8, 5, 4, 2)
    assert (count_params(model), count_params(small)) == (699, 351)


REPLAYED = {
    "bare_convs": (BareConvs, lambda: torch.randn(2, 3, 4, 4), 618),
    "gated": (Gated, lambda: torch.randn(2, 3, 8, 8), 339),
    "segnet": (SegNet, lambda: torch.randn(2, 3, 16, 16), 848),
    "folded_fourier": (Folded, lambda: torch.randn(2, 3, 8, 8), 223),
    "spatial_transformer": (SpatialTransformer, lambda: torch.randn(2, 3, 8, 8), 201),
    "dense_graph_attention": (DenseGraphAttention, lambda: (_graph()[0], torch.zeros(10, 10)), 275),
}


def _two_step_replay(factory, x, tmp_path):
    """Prune a seeded model in two steps, save the history, replay it on a fresh seeded
    copy and load the pruned weights: ``(pruner, pruned, replayed)``."""
    pruner = StructuredPruner(_seeded(factory), x, "magnitude", pruning_ratio=0.5, iterative_steps=2)
    small = pruner.prune()
    pruner.history.save(tmp_path / "history.json")
    fresh = _seeded(factory)
    PruningHistory.load(tmp_path / "history.json").replay(fresh)
    fresh.load_state_dict(small.state_dict(), strict=True)
    return pruner, small, fresh.eval()


@pytest.mark.parametrize("name", sorted(REPLAYED))
def test_two_step_histories_of_the_new_scenarios_replay_on_fresh_copies(name, tmp_path):
    factory, inputs, after = REPLAYED[name]
    x = inputs()
    args = x if isinstance(x, tuple) else (x,)
    pruner, small, fresh = _two_step_replay(factory, x, tmp_path)
    assert len(pruner.history) == 2 and count_params(fresh) == count_params(small) == after
    assert torch.equal(fresh(*args), small(*args))


# -- local response norm ---------------------------------------------------------------------------


def _alexnet_v1() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.LocalResponseNorm(5),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 24, 3, padding=1),
        nn.ReLU(),
        nn.LocalResponseNorm(3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 5),
    )


def test_local_response_norm_prunes_as_a_normalising_layer():
    from cleanai_core.testing import masked_forward

    model, x = _seeded(_alexnet_v1), torch.randn(2, 3, 16, 16)
    graph = DependencyGraph(model, x)
    g = _group(graph, "0")
    assert g.normalizes and int((~g.frozen).sum()) == 16 and any(s.module == "2" for s in g.slices)
    mask = _mask(graph, [(g, [0, 5, 9])])
    small, _ = StructuredPruner(model, x, "magnitude", bias_compensation=False, reconstruction=False).build(mask)
    # the neighbours of a channel change when channels go: close to zeroing, not equal
    diff = float((small(x) - masked_forward(graph, mask, x)[0]).abs().max())
    assert 0 < diff < 1e-3
    half = _prune(model, x).pruned
    assert (half[0].out_channels, half[4].out_channels, half[9].in_features) == (8, 12, 12)
    assert (count_params(model), count_params(half)) == (4053, 1165)
