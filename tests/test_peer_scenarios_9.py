"""A ninth set of the scenarios users bring from Torch-Pruning's test suite and examples,
written for CleanAI's API (see ``test_peer_scenarios.py`` to ``_8``): channels unbound one
by one and stacked back, a graph convolution over a sparse adjacency, and a constant matrix
multiplied from the right.

Each test asserts widths, parameter counts, and the masking oracle where slicing must equal
zeroing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_peer_scenarios_2 import _exact
from test_peer_scenarios_6 import _prune, _seeded, _two_step_replay
from torch import nn

from cleanai_core import DependencyGraph
from cleanai_core.metrics import count_params

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _reasons(graph: DependencyGraph) -> set[str]:
    return {r for g in graph.groups() for r in g.reasons}


def _prunable(model: nn.Module, x) -> list[int]:
    return [len(g.units) for g in DependencyGraph(model, x).groups(prunable_only=True)]


# -- channels unbound one by one and stacked back ------------------------------------------------


class Unbound(nn.Module):
    """A conv's channels unbound, each worked on alike, and stacked back for the next conv."""

    def __init__(self, way: str) -> None:
        super().__init__()
        self.way = way
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(6, 6)  # over the width, applied to every channel

    def forward(self, x):
        y = self.c1(x)
        if self.way == "stack":
            z = torch.stack([t * 2 + 1 for t in y.unbind(1)], 1)
        elif self.way == "cat":
            z = torch.cat([t.relu().unsqueeze(1) for t in torch.unbind(y, 1)], 1)
        elif self.way == "reversed":
            z = torch.stack(list(reversed(y.unbind(1))), 1)
        elif self.way == "zip":
            z = torch.stack([a * b for a, b in zip(y.unbind(1), y.sigmoid().unbind(1), strict=True)], 1)
        elif self.way == "layer":
            z = torch.stack([self.fc(t) for t in y.unbind(1)], 1)
        elif self.way == "split":
            z = torch.cat([t * 2 for t in y.split(1, dim=1)], 1)
        elif self.way == "chunk":
            z = torch.cat([t.sigmoid() for t in y.chunk(8, 1)], 1)
        elif self.way == "nested":
            z = torch.stack([torch.stack([r.relu() for r in t.unbind(1)], 1) for t in y.unbind(1)], 1)
        else:  # channels last: unbound along dim 3
            z = torch.stack([t.tanh() for t in y.permute(0, 2, 3, 1).unbind(3)], 3).permute(0, 3, 1, 2)
        return self.c2(z)


@pytest.mark.parametrize(
    "way", ["stack", "cat", "reversed", "zip", "layer", "split", "chunk", "nested", "channels_last"]
)
def test_channels_unbound_and_stacked_back_prune_with_their_producer(way):
    model, x = _seeded(lambda: Unbound(way)), torch.randn(2, 3, 6, 6)
    assert _prunable(model, x) == [8]  # was [] ("unbinds the channel dimension"); split / chunk: [1]
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (small.c1.out_channels, small.c2.in_channels) == (4, 4)
    assert count_params(small) == 174 and count_params(model) == 302
    assert small(x).shape == (2, 4, 6, 6)


def test_a_reversed_restack_keeps_each_channel_with_its_own_filter():
    model, x = _seeded(lambda: Unbound("reversed")), torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    (group,) = graph.groups(prunable_only=True)
    # drop c1's filters 0 and 1: c2 must lose its inputs 7 and 6 (the channels reversed)
    pruned = torch.zeros(graph.root.numel(), dtype=torch.bool)
    c1 = next(s for s in group.slices if s.module == "c1" and s.kind == "out")
    pruned[graph.root[c1.atoms[:2]]] = True
    keep = graph.keep_indices(pruned)
    assert keep[("c1", "out")].tolist() == [2, 3, 4, 5, 6, 7]
    assert keep[("c2", "in")].tolist() == [0, 1, 2, 3, 4, 5]


class ScaledInTheLoop(nn.Module):
    """Each unbound channel scaled by a parameter viewed again in every iteration (a new
    tensor each time, made the same way): the same work."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.g = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return self.c2(torch.stack([t * self.g.view(1, 1, -1) for t in self.c1(x).unbind(1)], 1))


def test_a_parameter_viewed_again_for_every_unbound_channel_is_the_same_work():
    model, x = _seeded(ScaledInTheLoop), torch.randn(2, 3, 6, 6)
    assert _prunable(model, x) == [8]
    _exact(model, x)
    assert count_params(_prune(model, x).pruned) == 174 - 42 + 6


class ZippedWithParameter(nn.Module):
    """Unbound channels zipped with a parameter iterated along its first dim: a gain per
    channel (``(C,)``: it shrinks with them) or a matrix per channel (``(C, W, W)`` carrying
    its channels on its last dim: its first dim cannot shrink, so neither can they)."""

    def __init__(self, per_channel_matrix: bool) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.w = nn.Parameter(torch.randn(8, 6, 6) if per_channel_matrix else torch.randn(8))

    def forward(self, x):
        ts = self.c1(x).unbind(1)
        if self.w.ndim == 3:
            return self.c2(torch.stack([t @ m for t, m in zip(ts, self.w, strict=True)], 1))
        return self.c2(torch.stack([t * g for t, g in zip(ts, self.w, strict=True)], 1))


def test_unbound_channels_zipped_with_a_parameter_shrink_with_it_or_keep_their_channels():
    model, x = _seeded(lambda: ZippedWithParameter(False)), torch.randn(2, 3, 6, 6)
    assert _prunable(model, x) == [8]
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (small.c1.out_channels, tuple(small.w.shape), count_params(small)) == (4, (4,), 136)
    # the matrices' first dim is not followed: the channels keep their width (the oracle was 3.3
    # off before: the pruned model paired the kept channels with the first matrices)
    model = _seeded(lambda: ZippedWithParameter(True))
    graph = DependencyGraph(model, x)
    assert graph.groups(prunable_only=True) == []
    assert any("unbinds w" in r for r in _reasons(graph)), _reasons(graph)


class Unpaired(nn.Module):
    """Unbound channels that must keep their channels: summed together, one picked by its
    position, each through a layer of its own, a scale picked by position, or one read
    again after the restack."""

    def __init__(self, way: str) -> None:
        super().__init__()
        self.way = way
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)
        self.fcs = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = self.c1(x)
        ts = y.unbind(1)
        if self.way == "sum":
            return self.c2(y) + sum(ts).unsqueeze(1)
        if self.way == "first":
            return self.c2(torch.stack([ts[0] * 2, *ts[1:]], 1))
        if self.way == "own_layer":
            return self.c2(torch.stack([f(t) for f, t in zip(self.fcs, ts, strict=True)], 1))
        if self.way == "own_scale":
            return self.c2(torch.stack([t * self.w[k] for k, t in enumerate(ts)], 1))
        if self.way == "read_again":
            return self.c2(torch.stack(ts, 1)) + ts[0].mean()
        return self.c2(torch.stack(ts[:3], 1).sum(1, keepdim=True).expand(-1, 4, -1, -1))  # "some"


@pytest.mark.parametrize(
    "way, reason",
    [
        ("sum", "combines channels unbound apart"),
        ("first", "went through different work"),
        ("own_layer", "went through different work"),
        ("own_scale", "went through different work"),
        ("read_again", "reads an unbound channel that is also stacked back"),
        ("some", "not each once"),
    ],
)
def test_unbound_channels_picked_by_position_keep_their_channels_with_the_reason(way, reason):
    model, x = _seeded(lambda: Unpaired(way)), torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    assert graph.groups(prunable_only=True) == []
    assert any(reason in r for r in _reasons(graph)), _reasons(graph)


def test_a_pruned_unbind_and_stack_replays_on_a_fresh_copy(tmp_path):
    x = torch.randn(2, 3, 6, 6)
    pruner, small, fresh = _two_step_replay(lambda: Unbound("zip"), x, tmp_path)
    assert len(pruner.history) == 2 and count_params(fresh) == count_params(small) == 174
    assert torch.equal(fresh(x), small(x))


# -- a graph convolution over a sparse adjacency -------------------------------------------------


class SparseGCN(nn.Module):
    """Two graph convolutions over a sparse adjacency buffer (the peer's GCN example with
    ``torch.sparse.mm``); ``way`` names the sparse product."""

    def __init__(self, way: str) -> None:
        super().__init__()
        self.way = way
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)
        edges = torch.tensor([[0, 1, 2, 3, 4, 5, 0], [1, 2, 3, 4, 5, 0, 3]])
        adj = torch.sparse_coo_tensor(edges, torch.rand(7), (6, 6))
        self.register_buffer("adj", adj.to_sparse_csr() if way == "csr" else adj)

    def forward(self, x):
        h = self.fc1(x).relu()
        if self.way == "sparse_mm":
            h = torch.sparse.mm(self.adj, h)
        elif self.way == "spmm":
            h = torch.spmm(self.adj, h)
        elif self.way in ("matmul", "csr"):
            h = self.adj @ h
        elif self.way == "addmm":
            h = torch.sparse.addmm(h, self.adj, h)
        else:  # features first: (C, N) @ adj
            h = (h.t() @ self.adj).t()
        return self.fc2(h)


@pytest.mark.parametrize("way", ["sparse_mm", "spmm", "matmul", "addmm", "right", "csr"])
def test_a_graph_convolution_over_a_sparse_adjacency_prunes_its_hidden_width(way):
    model, x = _seeded(lambda: SparseGCN(way)), torch.randn(6, 5)
    adj = model.adj.to_dense().clone()
    # sparse_mm: TraceError (aten::equal on SparseCPU); csr: deepcopy's "Cannot access storage of
    # SparseCsrTensorImpl"; the others: []
    assert _prunable(model, x) == [8]
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (small.fc1.out_features, small.fc2.in_features) == (4, 4)
    assert count_params(small) == 39 and count_params(model) == 75
    assert torch.equal(small.adj.to_dense(), adj) and torch.equal(model.adj.to_dense(), adj)
    assert small(x).shape == (6, 3)


def test_a_sparse_buffer_is_put_back_after_a_forward_that_changed_it():
    from cleanai_core.model_state import preserved

    model = _seeded(lambda: SparseGCN("sparse_mm"))
    before = model.adj.to_dense().clone()
    with preserved(model):
        model.adj.copy_(model.adj * 3)
    assert torch.equal(model.adj.to_dense(), before)


@pytest.mark.parametrize("way", ["sparse_mm", "csr"])
def test_a_pruned_gcn_with_a_sparse_buffer_saves_and_loads_back(way, tmp_path, monkeypatch):
    from cleanai_core import load_pruned
    from cleanai_core.io import save_pruned
    from cleanai_core.saved_folder import state_dict_problems

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    model, x = _seeded(lambda: SparseGCN(way)), torch.randn(6, 5)
    pruner = _prune(model, x)
    # was: RuntimeError "unsupported memory format option Contiguous", then "sparse, complex or
    # other non-dense tensors: ['adj']"
    save_pruned(tmp_path / "out", pruner.pruned, pruner.history, "test_peer_scenarios_9:SparseGCN",
                options={"model_kwargs": {"way": way}})  # fmt: skip
    back = load_pruned(tmp_path / "out", trust_code=True)
    assert torch.equal(back(x), pruner.pruned(x)) and back.adj.layout == model.adj.layout
    assert count_params(back) == 39
    # a sparse tensor where the model holds a dense one is still refused
    own = pruner.pruned.state_dict()
    assert state_dict_problems(own, {**own, "fc1.weight": own["fc1.weight"].to_sparse()}) == [
        "sparse, complex or other non-dense tensors: ['fc1.weight']"
    ]


# -- a constant matrix multiplied from the right -----------------------------------------------


class RightMatrix(nn.Module):
    """Features laid out ``(C, N)`` multiplied by a constant ``(N, N)`` matrix from the right
    (a dense normalised adjacency buffer, or a token-mixing weight that is a bare parameter)."""

    def __init__(self, bare: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)
        if bare:
            self.mix = nn.Parameter(torch.randn(6, 6))
        else:
            self.register_buffer("mix", torch.rand(6, 6))

    def forward(self, x):
        h = self.fc1(x).relu()
        return self.fc2((h.transpose(-1, -2) @ self.mix).transpose(-1, -2))


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("bare", [False, True])
def test_channels_on_the_rows_pass_a_constant_matrix_multiplied_from_the_right(bare, batched):
    model, x = _seeded(lambda: RightMatrix(bare)), torch.randn(2, 6, 5) if batched else torch.randn(6, 5)
    graph = DependencyGraph(model, x)
    assert [len(g.units) for g in graph.groups(prunable_only=True)] == [8]  # was []: h's channels froze
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (small.fc1.out_features, small.fc2.in_features, tuple(small.mix.shape)) == (4, 4, (6, 6))


# -- ordering ops over space, in-place views -----------------------------------------------------


class Pooled(nn.Module):
    """Channels pooled over space by an ordering op, then read by a linear head."""

    def __init__(self, way: str) -> None:
        super().__init__()
        self.way = way
        self.c1, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        y = self.c1(x).flatten(2)  # (B, C, HW)
        if self.way == "median":
            p = y.median(-1)[0]
        elif self.way == "kthvalue":
            p = y.kthvalue(3)[0]  # dim defaults to -1
        elif self.way == "mode":
            p = y.round().mode(2)[0]
        elif self.way == "nanmedian":
            p = y.nanmedian(dim=-1).values
        elif self.way == "quantile":
            p = torch.quantile(y, 0.75, dim=-1)
        elif self.way == "topk":
            p = y.topk(3, 2)[0].mean(-1)
        elif self.way == "argsort":
            p = torch.gather(y, -1, y.argsort(-1, descending=True))[..., 0]
        else:  # cummax
            p = y.cummax(2)[0][..., -1]
        return self.fc(p)


@pytest.mark.parametrize("way", ["median", "kthvalue", "mode", "nanmedian", "quantile", "topk", "argsort", "cummax"])
def test_channels_ordered_over_space_keep_their_label(way):
    model, x = _seeded(lambda: Pooled(way)), torch.randn(2, 3, 6, 6)
    # median / kthvalue / mode dropped the label: the pruned model failed ("mat1 and mat2 shapes
    # cannot be multiplied"); quantile / argsort froze at gather, cummax had no mapper
    assert _prunable(model, x) == [8]
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (small.c1.out_channels, small.fc.in_features, count_params(small)) == (4, 4, 132)
    assert small(x).shape == (2, 4)


class Ordered(nn.Module):
    def __init__(self, way: str) -> None:
        super().__init__()
        self.way = way
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        if self.way == "topk":
            return self.c2(y.topk(8, 1)[0])  # read as the last dim before 2026-12-02
        if self.way == "kthvalue":
            return self.c2(y - y.kthvalue(2, 1, keepdim=True)[0])
        return self.c2(y.cummax(1)[0])


@pytest.mark.parametrize("way", ["topk", "kthvalue", "cummax"])
def test_an_ordering_across_the_channels_keeps_them_with_its_name(way):
    model, x = _seeded(lambda: Ordered(way)), torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    assert graph.groups(prunable_only=True) == []
    assert any("orders channels" in r for r in _reasons(graph)), _reasons(graph)


class InPlaceViews(nn.Module):
    """``squeeze_`` / ``unsqueeze_`` / ``t_`` / ``transpose_`` on the way to the next layer."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.gate = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(3, 8)
        self.fc, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        g = self.gate(x.mean((2, 3))).unsqueeze_(-1).unsqueeze_(-1)
        y = self.c1(x) * g.sigmoid()
        p = y.mean((2, 3), keepdim=True).squeeze_(-1).squeeze_(-1)  # (B, 8)
        q = self.c1(x).flatten(2).transpose_(1, 2)  # (B, HW, 8)
        h = self.fc(p + q.mean(1)).t_()  # (6, B)
        return self.fc2(h.t_())


def test_in_place_views_pass_the_channels():
    model, x = _seeded(InPlaceViews), torch.randn(2, 3, 6, 6)
    assert sorted(_prunable(model, x)) == [6, 8]  # was []: "channels reach op aten.squeeze_.dim ... which ignored them"
    _exact(model, x)


# -- ops without a mapper before: distances, triangles, rotations, renorm, complex numbers --------


class Prototypes(nn.Module):
    """A prototype classifier (``-torch.cdist(h, self.protos)``) and a VQ-VAE's nearest
    codebook entry (``torch.cdist(z, self.code.weight)``, many rows: ``_euclidean_dist``)."""

    def __init__(self, way: str) -> None:
        super().__init__()
        self.way = way
        self.enc, self.dec = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 1)
        self.code = nn.Embedding(16, 8)
        self.protos = nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        z = self.enc(x).permute(0, 2, 3, 1)  # (B, H, W, D)
        if self.way == "prototypes":
            return -torch.cdist(z.mean((1, 2)), self.protos)
        d = torch.cdist(z.reshape(-1, z.shape[-1]), self.code.weight)
        q = self.code(d.argmin(-1)).view_as(z)
        return self.dec((z + (q - z).detach()).permute(0, 3, 1, 2))


@pytest.mark.parametrize("way, before, after", [("prototypes", 419, 287), ("codebook", 419, 231)])
def test_distances_to_prototypes_or_a_codebook_prune_both_sides(way, before, after):
    model, x = _seeded(lambda: Prototypes(way)), torch.randn(2, 3, 6, 6)
    assert _prunable(model, x) == [8]  # was []: "channels reach op aten._cdist_forward.default ..."
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (count_params(model), count_params(small)) == (before, after)
    used = small.protos.shape[1] if way == "prototypes" else small.code.embedding_dim
    assert small.enc.out_channels == used == 4


class Geometry(nn.Module):
    def __init__(self, way: str) -> None:
        super().__init__()
        self.way = way
        self.fc1, self.c = nn.Linear(6, 8), nn.Conv1d(8, 4, 1)

    def forward(self, x):  # x: (B, N, 6)
        h = self.fc1(x)  # (B, N, C), channels last
        if self.way.startswith("rot90"):
            k = int(self.way[5:])
            h = torch.rot90(h, k, (1, 2))
            h = h if k % 2 else h.transpose(1, 2)  # channels on dim 1 for the conv
        elif self.way == "tril":
            h = h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 5).tril().sum(-1)
        elif self.way == "diagonal":
            h = h.unsqueeze(-1).expand(-1, -1, -1, 5).diagonal(0, 1, 3)  # (B, C, N)
        elif self.way == "renorm":
            h = h.renorm(2, 2, 1.0).transpose(1, 2)
        elif self.way == "complex":
            h = torch.polar(h.abs(), h).real.transpose(1, 2)
        else:  # bucketize
            h = (h * torch.bucketize(h, torch.tensor([-1.0, 0.0, 1.0]))).transpose(1, 2)
        return self.c(h)


@pytest.mark.parametrize(
    "way", ["rot901", "rot902", "rot903", "rot90-1", "tril", "diagonal", "renorm", "complex", "bucketize"]
)
def test_ops_that_had_no_mapper_pass_the_channels(way):
    model, x = _seeded(lambda: Geometry(way)), torch.randn(2, 5, 6)
    assert _prunable(model, x) == [8]  # was []: "channels reach op aten.rot90.default ... which ignored them"
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (small.fc1.out_features, small.c.in_channels, count_params(small)) == (4, 4, 48)


class AcrossChannels(nn.Module):
    def __init__(self, way: str) -> None:
        super().__init__()
        self.way = way
        self.c1, self.c2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        if self.way == "triu":  # rows are channels
            return self.c2(y.permute(0, 2, 1, 3).triu().permute(0, 2, 1, 3))
        if self.way == "cross":  # 3-vectors along the channels
            return self.c2(torch.linalg.cross(y, y.flip(-1), dim=1))
        return self.c2(y.diagonal(0, 1, 2).unsqueeze(1).expand(-1, 3, -1, -1))  # channels x rows


@pytest.mark.parametrize("way, reason", [("triu", "triangle"), ("cross", "crosses vectors"), ("diagonal", "diagonal")])
def test_those_ops_across_the_channels_keep_them_with_the_reason(way, reason):
    model, x = _seeded(lambda: AcrossChannels(way)), torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    assert graph.groups(prunable_only=True) == []
    assert any(reason in r for r in _reasons(graph)), _reasons(graph)


# -- packed sequences ----------------------------------------------------------------------------


class PackedText(nn.Module):
    """Token ids embedded, packed by length, through a recurrent layer, padded back."""

    def __init__(self, kind: str, bidirectional: bool, layers: int) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        self.e = nn.Embedding(20, 8)
        self.r = rnn(8, 6, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.fc = nn.Linear(12 if bidirectional else 6, 3)

    def forward(self, ids, lengths):
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        packed = pack_padded_sequence(self.e(ids), lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.r(packed)[0], batch_first=True)
        return self.fc(out.sum(1))


@pytest.mark.parametrize(
    "kind, bidirectional, layers, before, after",
    [("lstm", False, 1, 565, 200), ("gru", True, 1, 775, 263), ("rnn", False, 2, 361, 143)],
)
def test_packed_sequences_prune_the_embedding_and_the_recurrent_width(kind, bidirectional, layers, before, after):
    model = _seeded(lambda: PackedText(kind, bidirectional, layers))
    x = (torch.randint(1, 20, (3, 5)), torch.tensor([5, 3, 2]))
    # was []: "channels reach op aten._pack_padded_sequence.default ..., which ignored them"
    assert sorted(_prunable(model, x)) == [6, 8]
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (small.e.embedding_dim, small.r.hidden_size, count_params(model), count_params(small)) == (
        4,
        3,
        before,
        after,
    )
    assert small(*x).shape == (3, 3)


class TimeFirstPacked(nn.Module):
    """Time-first sequences packed sorted, packed from a list, or padded from a list
    (``pad_sequence`` writes each sequence into a fresh ``full`` tensor through ``select``)."""

    def __init__(self, way: str) -> None:
        super().__init__()
        self.way = way
        self.e, self.r, self.fc = nn.Linear(4, 8), nn.LSTM(8, 6), nn.Linear(6, 3)

    def forward(self, x, lengths):
        from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence, pad_sequence

        h = self.e(x)  # (T, B, C)
        seqs = [h[: int(n), i] for i, n in enumerate(lengths)]
        if self.way == "sorted":
            out = pad_packed_sequence(self.r(pack_padded_sequence(h, lengths))[0])[0]
        elif self.way == "pack_sequence":
            out = pad_packed_sequence(self.r(pack_sequence(seqs, enforce_sorted=False))[0])[0]
        else:
            out = self.r(pad_sequence(seqs))[0]
        return self.fc(out.mean(0))


@pytest.mark.parametrize("way", ["sorted", "pack_sequence", "pad_sequence"])
def test_time_first_packed_or_padded_sequences_prune(way):
    model, x = _seeded(lambda: TimeFirstPacked(way)), (torch.randn(5, 3, 4), torch.tensor([5, 3, 2]))
    assert sorted(_prunable(model, x)) == [6, 8]  # pack_sequence / pad_sequence: [6] (copy_ froze e's 8)
    _exact(model, x)
    assert count_params(_prune(model, x).pruned) == 140 and count_params(model) == 445


# -- nn.TransformerEncoder's nested-tensor fast path -----------------------------------------------


class PaddedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc = nn.Linear(6, 16), nn.Linear(16, 2)
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2)  # enable_nested_tensor=True by default

    def forward(self, x, pad):
        return self.fc(self.enc(self.inp(x), src_key_padding_mask=pad).mean(1))


def test_an_encoder_with_a_padding_mask_traces_without_its_nested_fast_path():
    model = _seeded(PaddedEncoder)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 2 + [True] * 3])
    x = (torch.randn(3, 5, 6), pad)
    # was: TraceError "... NestedTensorImpl doesn't support sizes"
    assert sorted(_prunable(model, x)) == [8, 32, 32]  # the attention width, each layer's MLP
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (count_params(model), count_params(small)) == (4594, 1274)
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting is back
    assert small(*x).shape == (3, 2)
