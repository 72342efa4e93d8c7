"""A fifth set of the scenarios users bring from Torch-Pruning's test suite and examples,
written for CleanAI's API (see ``test_peer_scenarios.py`` to ``_4``): channels permuted or
picked by an index buffer (a flow's fixed shuffle), the InsightFace IR-ResNet with its
pre-norm blocks, one-parameter PReLUs and squeeze-excitation, an ArcFace cosine head, the
GRU example's unbatched ``nn.GRU`` and its hand-written GRU loop, a timm ViT whose
attention ``forward`` was replaced as the peer's ViT example does, every conv pruned in
turn at ``round_to=16`` (the peer's rounding test), a group's indices chosen again
(``group.prune(idxs)``), global pruning at extreme ratios, and the magnitude and BN-scale
criteria of the peer's importance tests read back term by term.

Each test asserts widths, parameter counts or scores, and the masking oracle where slicing
must equal zeroing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_peer_scenarios import _resnet18
from test_peer_scenarios_2 import _exact, _group, _timm_vit
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from cleanai_core import DependencyGraph, PruningHistory, StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.metrics import count_params
from cleanai_core.scoring import ScoringContext, mean_normalized, score_groups

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _prune(model: nn.Module, x, importance="magnitude", ratio=0.5, **kw) -> nn.Module:
    return StructuredPruner(model.eval(), x, importance, pruning_ratio=ratio, **kw).prune()


def _mask(graph: DependencyGraph, group, idx: list[int]) -> torch.Tensor:
    pruned = torch.zeros(graph.root.numel(), dtype=torch.bool)
    pruned[group.units[idx]] = True
    return pruned


def _seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


def _kept_of(graph: DependencyGraph, module: str, pruned: torch.Tensor) -> list[int]:
    """The output channels of ``module`` that survive ``pruned`` (a mask over units)."""
    units = graph.root[graph.ctx.slices[(module, "out")].atoms]
    return (~pruned[units]).nonzero().squeeze(1).tolist()


# -- channels permuted or picked by an index buffer ---------------------------------------------


class Shuffle(nn.Module):
    """A flow's fixed channel permutation (Glow's ``Permute2d``) and its inverse, both
    buffers, read by indexing (``x[:, perm]``) or by ``index_select``."""

    def __init__(self, c: int, how: str) -> None:
        super().__init__()
        self.register_buffer("indices", torch.randperm(c, generator=torch.Generator().manual_seed(3)))
        self.register_buffer("inverse", torch.argsort(self.indices))
        self.how = how

    def forward(self, x, reverse: bool = False):
        idx = self.inverse if reverse else self.indices
        return x[:, idx] if self.how == "index" else x.index_select(1, idx)


class Flow(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.c1, self.shuffle = nn.Conv2d(3, 12, 3, padding=1), Shuffle(12, how)
        self.c2, self.c3 = nn.Conv2d(12, 12, 3, padding=1), nn.Conv2d(12, 5, 1)

    def forward(self, x):
        y = F.relu(self.c2(self.shuffle(F.relu(self.c1(x)))))
        return self.c3(self.shuffle(y, reverse=True) + y)


X_FLOW = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("how", ["index", "index_select"])
def test_channels_permuted_by_an_index_buffer_prune_and_the_buffer_follows(how, tmp_path):
    """Before: ``x[:, self.perm]`` and ``x.index_select(1, self.perm)`` on the channel dim
    froze the channels ("indexes channels"). Now the buffer's positions map the channels,
    and pruning rewrites it: the kept channels keep their permutation, renumbered. The
    inverse permutation added to the unpermuted tensor ties each cycle of it into one unit."""
    model = _seeded(Flow, how)
    graph = DependencyGraph(model, X_FLOW)
    g1, g2 = _group(graph, "c1"), _group(graph, "c2")
    assert (g1.size, g1.prunable) == (12, 12) and {"c1", "c2", "shuffle.indices@"} <= {
        s.module or s.name for s in g1.slices
    }
    cycles = 0
    seen: set[int] = set()
    for start in range(12):  # the cycles of the inverse permutation
        cycles += start not in seen
        while start not in seen:
            seen.add(start)
            start = int(model.shuffle.inverse[start])
    assert (g2.size, g2.prunable) == (cycles, cycles)
    _exact(model, X_FLOW)
    pruner = StructuredPruner(model, X_FLOW, "magnitude", bias_compensation=False, recalibrate_bn=False)
    g = _group(pruner.graph, "c1")
    pruned = _mask(pruner.graph, g, [0, 5, 7])
    small, _ = pruner.build(pruned)
    kept = _kept_of(pruner.graph, "c1", pruned)
    assert small.c1.out_channels == 9 and torch.equal(small.c1.weight, model.c1.weight[kept])
    rank = {c: i for i, c in enumerate(kept)}
    perm = [rank[int(c)] for c in model.shuffle.indices if int(c) in rank]
    assert small.shuffle.indices.tolist() == perm and small.shuffle.indices.dtype == torch.int64
    cols = [i for i, c in enumerate(model.shuffle.indices.tolist()) if c in rank]  # c2 reads the permuted channels
    assert torch.equal(small.c2.weight, model.c2.weight[:, cols])
    half = StructuredPruner(model, X_FLOW, "magnitude", pruning_ratio=0.5, iterative_steps=3)
    out = half.prune()
    assert len(half.history) == 3 and out.c1.out_channels == 6  # each step rewrites the rewritten buffer
    assert sorted(out.shuffle.indices.tolist()) == list(range(6))
    assert sorted(out.shuffle.inverse.tolist()) == list(range(out.c2.out_channels))
    assert out(X_FLOW).shape == (2, 5, 8, 8)
    half.history.save(tmp_path / "history.json")
    fresh = PruningHistory.load(tmp_path / "history.json").replay(_seeded(Flow, how))
    assert torch.equal(fresh.shuffle.indices, out.shuffle.indices)  # the replay rewrites the buffer too
    fresh.load_state_dict(out.state_dict(), strict=True)
    assert torch.equal(fresh(X_FLOW), out(X_FLOW))


def flow_by_index() -> Flow:
    """A factory for ``save_pruned``'s spec ``test_peer_scenarios_5:flow_by_index``."""
    return _seeded(Flow, "index")


def test_a_pruned_flow_saves_and_loads_back_with_its_rewritten_buffers(tmp_path):
    """The peer's ``tp.state_dict`` / ``tp.load_state_dict`` round trip, on CleanAI's folder:
    the architecture is rebuilt, the history replayed (the buffers rewritten), the weights loaded."""
    from cleanai_core import load_pruned
    from cleanai_core.io import save_pruned

    pruner = StructuredPruner(flow_by_index(), X_FLOW, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    save_pruned(tmp_path / "out", small, pruner.history, "test_peer_scenarios_5:flow_by_index")
    loaded = load_pruned(tmp_path / "out", trust_code=True)  # the spec names this test module: its code runs
    assert loaded.shuffle.indices.tolist() == small.shuffle.indices.tolist() != list(range(6))
    assert torch.equal(loaded.shuffle.inverse, small.shuffle.inverse) and torch.equal(loaded(X_FLOW), small(X_FLOW))


@pytest.mark.parametrize("seed", [1, 7, 42])
def test_rewriting_an_index_picks_the_same_kept_channels_as_before(seed):
    """``keep_positions`` on 200 random indices (permutations, subsets, repeats, int32 and
    int64, buffers and parameters) and kept sets: the sliced tensor indexed by the
    rewritten index equals the original indexed by the old one, the removed channels'
    entries left out, in the old order."""
    from cleanai_core.interfaces import keep_positions

    gen = torch.Generator().manual_seed(seed)
    for case in range(200):
        c = int(torch.randint(1, 12, (1,), generator=gen))
        n = int(torch.randint(0, 2 * c + 1, (1,), generator=gen))
        dtype = torch.int32 if case % 2 else torch.int64
        idx = (
            torch.randperm(c, generator=gen).to(dtype)
            if case % 3 == 0
            else torch.randint(0, c, (n,), generator=gen, dtype=dtype)
        )
        keep = (torch.rand(c, generator=gen) < 0.6).nonzero().squeeze(1)
        holder = nn.Module()
        if case % 5 == 0:
            holder.idx = nn.Parameter(idx.clone(), requires_grad=False)
        else:
            holder.register_buffer("idx", idx.clone())
        keep_positions(holder, "idx", keep)
        x = torch.randn(2, c, generator=gen)
        expected = x[:, idx.long()][:, torch.isin(idx.long(), keep)]
        assert holder.idx.dtype == dtype and isinstance(holder.idx, nn.Parameter) == (case % 5 == 0)
        assert torch.equal(x[:, keep][:, holder.idx.long()], expected), (idx, keep, holder.idx)


class ScatterBack(nn.Module):
    """The shuffle undone by a scatter: ``z = zeros_like(y); z[:, self.perm] = y``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
        self.register_buffer("perm", torch.randperm(8, generator=torch.Generator().manual_seed(2)))

    def forward(self, x):
        y = F.relu(self.c2(F.relu(self.c1(x))[:, self.perm]))
        z = torch.zeros_like(y)
        z[:, self.perm] = y
        return self.c3(z)


def test_channels_written_back_through_a_permutation_buffer_prune_and_the_buffer_follows():
    """Before: ``op aten.index_put_ ... writes through indices that are not followed``
    froze c2's channels. Position ``perm[i]`` of the output holds c2's channel ``i``."""
    model, x = _seeded(ScatterBack), torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    pruner = StructuredPruner(model, x, "magnitude", bias_compensation=False, recalibrate_bn=False)
    graph = pruner.graph
    g = _group(graph, "c2")
    assert (g.size, g.prunable) == (8, 8) and "c3" in g.modules()
    _exact(model, x)
    pruned = _mask(graph, g, [1, 6])
    small, _ = pruner.build(pruned)
    kept = _kept_of(graph, "c2", pruned)
    perm = model.perm.tolist()
    places = sorted(perm[i] for i in kept)  # the output positions that stay
    assert small.perm.tolist() == [places.index(perm[i]) for i in kept]
    assert torch.equal(small.c3.weight, model.c3.weight[:, places]) and small(x).shape == (2, 4, 4, 4)
    half = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    out = half.prune()
    assert out.c2.out_channels == out.c3.in_channels == 4 and sorted(out.perm.tolist()) == [0, 1, 2, 3]
    fresh = half.history.replay(_seeded(ScatterBack))
    fresh.load_state_dict(out.state_dict())
    assert torch.equal(fresh(x), out(x))


class Picked(nn.Module):
    """A subset of the channels, one of them twice, picked by a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(5, 4, 1)
        self.register_buffer("pick", torch.tensor([6, 0, 2, 2, 5]))

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)).index_select(1, self.pick))


def test_a_subset_with_a_repeat_picked_by_a_buffer_keeps_what_it_still_points_at():
    model, x = _seeded(Picked), torch.randn(2, 3, 4, 4)
    _exact(model, x)
    pruner = StructuredPruner(model, x, "magnitude", bias_compensation=False, recalibrate_bn=False)
    graph = pruner.graph
    read, unread = _group(graph, "c2", "in"), _group(graph, "c1")
    # the channels picked (0, 2, 5, 6) and the ones nobody reads (1, 3, 4, 7) prune apart
    assert (read.size, read.prunable, unread.size, unread.prunable) == (4, 4, 4, 4) and "c2" not in unread.modules()
    two = graph.root[graph.ctx.slices[("c1", "out")].atoms[2]]
    small, _ = pruner.build(_mask(graph, read, [int((read.units == two).nonzero())]))
    # channel 2 goes: the two columns of c2 that read it go, the others point at renumbered channels
    assert small.c1.out_channels == 7 and small.pick.tolist() == [5, 0, 4]
    assert torch.equal(small.c2.weight, model.c2.weight[:, [0, 1, 4]]) and small(x).shape == (2, 4, 4, 4)
    half = _prune(model, x)
    assert (half.c1.out_channels, half.pick.tolist(), half.c2.in_channels) == (4, [0, 1, 1], 3)


class ReversedInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.c1(x))
        return self.c2(y[:, torch.arange(y.shape[1] - 1, -1, -1)])


def test_an_index_made_in_forward_cannot_be_rewritten_and_keeps_its_channels():
    graph = DependencyGraph(_seeded(ReversedInForward), torch.randn(2, 3, 4, 4))
    g = _group(graph, "c1")
    assert (g.size, g.prunable) == (8, 0) and any("indexes channels" in r for r in g.reasons)


class TokenPick(nn.Module):
    """Tokens picked before the channels: by a buffer (``x[:, ids]``), per sample by an
    index made in ``forward`` (MAE's ``x[batch, ids_keep]``), or by a boolean mask."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.emb, self.fc = how, nn.Linear(6, 16), nn.Linear(16, 4)
        self.register_buffer("ids", torch.tensor([4, 0, 2, 1, 3, 5, 6, 0, 1]))

    def forward(self, x):
        h = F.relu(self.emb(x))
        if self.how == "buffer":
            return self.fc(h[:, self.ids])
        if self.how == "per_sample":
            keep = torch.argsort(x[..., 0], dim=1)[:, :4]
            return self.fc(h[torch.arange(h.shape[0])[:, None], keep])
        return self.fc(h[x[..., 0] > 0])


@pytest.mark.parametrize("how", ["buffer", "per_sample", "mask"])
def test_tokens_picked_before_the_channels_let_the_channels_pass(how):
    """Before: ``op aten.index.Tensor ... indexes channels`` froze the embedding (16 of 16
    kept) whenever an index tensor stood before the channels but not at dim 0."""
    x = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(1))
    graph = DependencyGraph(_seeded(TokenPick, how), x)
    g = _group(graph, "emb")
    assert (g.size, g.prunable) == (16, 16) and "fc" in g.modules()
    _exact(_seeded(TokenPick, how), x)
    small = _prune(_seeded(TokenPick, how), x)
    assert (small.emb.out_features, small.fc.in_features) == (8, 8)
    assert small(x).shape == _seeded(TokenPick, how)(x).shape


class TinyMAE(nn.Module):
    """MAE's random masking: tokens gathered by a shuffled index (``gather`` over the
    tokens, the index repeated over the width read at run time), learned mask tokens
    concatenated, the order restored by a second ``gather``."""

    def __init__(self, dim: int = 16, dec_dim: int = 12) -> None:
        super().__init__()
        self.patch, self.pos = nn.Linear(12, dim), nn.Parameter(0.1 * torch.randn(1, 8, dim))
        self.enc = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.dec_embed, self.mask_token = nn.Linear(dim, dec_dim), nn.Parameter(torch.randn(1, 1, dec_dim))
        self.dec = nn.Linear(dec_dim, 12)

    def forward(self, x):
        h = self.patch(x) + self.pos
        b, n, d = h.shape
        shuffle = torch.argsort(torch.rand(b, n, generator=torch.Generator().manual_seed(0)), dim=1)
        restore, keep = torch.argsort(shuffle, dim=1), shuffle[:, : n // 2]
        h = torch.gather(h, 1, keep.unsqueeze(-1).repeat(1, 1, d))
        y = self.dec_embed(h + self.enc(h))
        y = torch.cat([y, self.mask_token.repeat(b, n - n // 2, 1)], dim=1)
        return self.dec(torch.gather(y, 1, restore.unsqueeze(-1).repeat(1, 1, y.shape[2])))


def test_mae_masking_gathers_tokens_and_the_widths_prune_with_the_mask_token():
    x = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(1))
    graph = DependencyGraph(_seeded(TinyMAE), x)
    assert {"pos", "mask_token"} <= {s.name for g in graph.groups(prunable_only=True) for s in g.slices}
    _exact(_seeded(TinyMAE), x)
    small = _prune(_seeded(TinyMAE), x)
    assert (small.patch.out_features, small.pos.shape, small.enc[1].out_features) == (8, (1, 8, 8), 16)
    assert (small.dec_embed.out_features, small.mask_token.shape, small.dec.in_features) == (6, (1, 1, 6), 6)
    assert small(x).shape == (2, 8, 12)


# -- InsightFace's IR-ResNet and an ArcFace head -------------------------------------------------


class SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c, c // 4), nn.PReLU(), nn.Linear(c // 4, c), nn.Sigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        return x * self.fc(self.pool(x).view(b, c)).view(b, c, 1, 1)


class IRBlock(nn.Module):
    """Pre-norm (``bn0``) on the block's input, one ``PReLU()`` (a single parameter)
    called twice, a squeeze-excitation, an in-place residual add."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn0, self.conv1, self.bn1 = (
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cin, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cin),
        )
        self.prelu = nn.PReLU()
        self.conv2, self.bn2 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.se = SE(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.prelu(self.bn1(self.conv1(self.bn0(x))))
        out = self.se(self.bn2(self.conv2(out)))
        out += x if self.down is None else self.down(x)
        return self.prelu(out)


class FaceNet(nn.Module):
    """InsightFace's ResNet: the 4x4 map flattened into a 24-d embedding with BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.prelu = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.PReLU()
        self.layer1 = nn.Sequential(IRBlock(16, 16), IRBlock(16, 16))
        self.layer2 = nn.Sequential(IRBlock(16, 32, 2), IRBlock(32, 32))
        self.bn2, self.dropout = nn.BatchNorm2d(32), nn.Dropout()
        self.fc, self.bn3 = nn.Linear(32 * 4 * 4, 24), nn.BatchNorm1d(24)

    def forward(self, x):
        x = F.max_pool2d(self.prelu(self.bn1(self.conv1(x))), 2)
        x = self.dropout(self.bn2(self.layer2(self.layer1(x))))
        return self.bn3(self.fc(x.view(x.size(0), -1)))


def _face() -> FaceNet:
    model = _seeded(FaceNet)
    with torch.no_grad():  # trained-looking norms: the oracle compares more than zeros and ones
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    return model


X_FACE = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_insightface_ir_resnet_prunes_its_stream_inner_convs_and_se_exactly():
    model = _face()
    graph = DependencyGraph(model, X_FACE)
    stream = _group(graph, "conv1")
    assert {"layer1.0.bn0", "layer1.1.bn0", "layer2.0.bn0", "layer1.0.se.fc.2"} <= set(stream.modules())
    assert _group(graph, "fc").prunable == 0  # the embedding is the model's output
    _exact(model, X_FACE)
    small = _prune(model, X_FACE)
    assert (small.conv1.out_channels, small.layer1[0].bn0.num_features, small.layer1[0].conv1.out_channels) == (8, 8, 8)
    assert (small.layer2[0].conv2.out_channels, small.layer2[1].bn0.num_features, small.bn2.num_features) == (
        16,
        16,
        16,
    )
    se = small.layer2[0].se.fc
    assert (se[0].in_features, se[0].out_features, se[2].out_features, se[1].weight.shape) == (16, 4, 16, (1,))
    assert (small.fc.in_features, small.fc.out_features, small.bn3.num_features) == (16 * 16, 24, 24)
    assert count_params(model) == 49945 and count_params(small) == 15925 and small(X_FACE).shape == (2, 24)


class ArcFace(nn.Module):
    """An embedding scored against class centres by cosine: ``F.normalize`` on both."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.emb, self.bn = nn.Linear(10, 32), nn.Linear(32, 16), nn.BatchNorm1d(16)
        self.weight = nn.Parameter(torch.randn(7, 16))

    def forward(self, x):
        e = self.bn(self.emb(F.relu(self.fc1(x))))
        return 30.0 * F.linear(F.normalize(e), F.normalize(self.weight))


def test_arcface_cosine_head_prunes_the_embedding_with_the_class_centres():
    """An L2 norm over the embedding sees zeroed dimensions as absent, so slicing the
    embedding and the centres' columns equals masking them: exact, unlike a mean."""
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    _exact(_seeded(ArcFace), x)
    graph = DependencyGraph(_seeded(ArcFace), x)
    g = _group(graph, "emb")
    assert (g.size, g.prunable) == (16, 16) and {"emb", "bn", "weight"} <= {s.module or s.name for s in g.slices}
    small = _prune(_seeded(ArcFace), x)
    assert (small.emb.out_features, small.bn.num_features, small.weight.shape, small.fc1.out_features) == (
        8,
        8,
        (7, 8),
        16,
    )
    assert small(x).shape == (4, 7)


# -- the GRU example ----------------------------------------------------------------------------


class GRUTestNet(nn.Module):
    """The peer's GRU example: LeNet features into an ``nn.GRU`` fed a 2-D (unbatched) input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = nn.Linear(256, 64), nn.Linear(64, 20)
        self.gru, self.fc3 = nn.GRU(20, 24), nn.Linear(24, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2))), 2)
        x = x.view(-1, int(x.nelement() / x.shape[0]))
        return self.fc3(self.gru(F.relu(self.fc2(F.relu(self.fc1(x)))))[0])


def test_an_unbatched_gru_after_lenet_features_prunes_its_hidden_units():
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    _exact(_seeded(GRUTestNet), x)
    small = _prune(_seeded(GRUTestNet), x)
    assert (small.conv2.out_channels, small.fc1.in_features, small.fc2.out_features) == (8, 8 * 16, 10)
    assert (small.gru.input_size, small.gru.hidden_size, small.gru.weight_hh_l0.shape, small.fc3.in_features) == (
        10,
        12,
        (36, 12),
        12,
    )
    assert count_params(small) == 6138 and small(x).shape == (3, 10)


class HandGRU(nn.Module):
    """The peer's ``PrunableGRU``: linear gates chunked in three, stepped in a Python loop
    over ``out[t]``, with an identity-initialised ``hidden_map`` before the hidden gates.
    ``learned_start``: the first state comes from the first input (else a literal
    ``torch.zeros(batch, hidden)``, whose width the pruned model could not change)."""

    def __init__(self, n_in: int, hidden: int, learned_start: bool) -> None:
        super().__init__()
        self.hidden, self.learned_start = hidden, learned_start
        self.ih, self.hh, self.hidden_map = (
            nn.Linear(n_in, 3 * hidden),
            nn.Linear(hidden, 3 * hidden),
            nn.Linear(hidden, hidden),
        )
        self.start = nn.Linear(n_in, hidden)
        with torch.no_grad():
            self.hidden_map.weight.copy_(torch.eye(hidden) + 0.1 * torch.randn(hidden, hidden))

    def forward(self, x):  # (seq, batch, features)
        h = torch.tanh(self.start(x[0])) if self.learned_start else torch.zeros(x.shape[1], self.hidden)
        steps = []
        for t in range(x.shape[0]):
            hm = self.hidden_map(h)
            rh, zh, nh = self.hh(hm).chunk(3, 1)
            ri, zi, ni = self.ih(x[t]).chunk(3, 1)
            r, z = torch.sigmoid(rh + ri), torch.sigmoid(zh + zi)
            h = (1 - z) * torch.tanh(ni + r * nh) + z * hm
            steps.append(h)
        return torch.stack(steps, 0)


class HandGRUNet(nn.Module):
    def __init__(self, learned_start: bool) -> None:
        super().__init__()
        self.fc1, self.gru, self.head = nn.Linear(6, 20), HandGRU(20, 16, learned_start), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.gru(F.relu(self.fc1(x))))


@pytest.mark.parametrize("learned_start", [True, False], ids=["learned_start", "literal_zeros"])
def test_a_hand_written_gru_loop_prunes_its_gates_together(learned_start):
    x = torch.randn(4, 2, 6, generator=torch.Generator().manual_seed(1))
    _exact(_seeded(HandGRUNet, learned_start), x)
    graph = DependencyGraph(_seeded(HandGRUNet, learned_start), x)
    hidden = _group(graph, "gru.hidden_map")
    small = _prune(_seeded(HandGRUNet, learned_start), x)
    assert small.fc1.out_features == small.gru.ih.in_features == 10 and small(x).shape == (4, 2, 3)
    if not learned_start:  # a state of a literal width: the hidden units stay, with the reason
        assert hidden.prunable == 0 and any("input without traced channels" in r for r in hidden.reasons)
        assert small.gru.hh.weight.shape == (48, 16)
        return
    assert (hidden.size, hidden.prunable) == (16, 16)
    assert {"gru.ih", "gru.hh", "gru.hidden_map", "gru.start", "head"} <= set(hidden.modules())
    gru = small.gru
    assert (gru.ih.weight.shape, gru.hh.weight.shape, gru.hidden_map.weight.shape) == ((24, 10), (24, 8), (8, 8))
    assert (gru.start.out_features, small.head.in_features) == (8, 8)


# -- a timm ViT with the peer's attention forward -----------------------------------------------


def _peer_attention_forward(self, x, attn_mask=None, is_causal=False):
    """The peer's ViT example replaces timm's ``Attention.forward`` so that the output
    reshape reads ``-1`` instead of the input width."""
    b, n, _ = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = F.scaled_dot_product_attention(q, k, v)
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, -1)))


def test_timm_vit_with_the_peers_replaced_attention_forward_prunes_whole_heads():
    model = _timm_vit()
    from timm.models.vision_transformer import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            m.forward = _peer_attention_forward.__get__(m, Attention)
    x = torch.randn(2, 3, 32, 32)
    graph = DependencyGraph(model, x)
    assert (_group(graph, "blocks.0.attn.qkv").size, _group(graph, "blocks.1.attn.qkv").prunable) == (4, 4)
    _exact(model, x)
    small = _prune(model, x, ignored_layers=[model.head])
    attn = small.blocks[1].attn
    assert (attn.num_heads, attn.head_dim, attn.qkv.weight.shape, attn.proj.in_features) == (2, 16, (96, 32), 32)
    assert count_params(small) == 32554 and small(x).shape == (2, 10)  # as with timm's own forward


# -- rounding, re-chosen indices, extreme ratios ------------------------------------------------


def test_every_conv_pruned_in_turn_at_round_to_16_keeps_multiples_of_16():
    """The peer's rounding test: each conv in turn loses 20% of its group, rounded to 16
    channels. A group whose 20% rounds back to all of it stays, and the warning says
    that round_to did it (it blamed "the ratio leaves less than one unit to remove")."""
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=32).eval()
    x = torch.randn(1, 3, 32, 32)
    before = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = StructuredPruner(model, x, "magnitude", layer_pruning_ratios={"conv1": 0.2, "*": 0.0}, round_to=16)
        same = pruner.prune()
    said = [str(w.message) for w in caught if "removes no unit" in str(w.message)]
    assert said and all("round_to=16 rounds every kept count up to the whole group (64 units)" in m for m in said)
    assert same.conv1.out_channels == 64
    for name in [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]:
        model = _prune(model, x, layer_pruning_ratios={name: 0.2, "*": 0.0}, round_to=16)
    after = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert before == [64, 32, 32, 256, 256, 64, 64, 512, 512, 128, 128, 1024, 1024, 256, 256, 2048, 2048]
    assert after == [64, 32, 32, 208, 208, 64, 64, 416, 416, 112, 112, 832, 832, 208, 208, 1648, 1648]
    assert model(x).shape == (1, 10)


def test_a_groups_indices_chosen_again_build_the_same_weights():
    """The peer's ``group.prune([2, 6, 9])`` after fetching the group with ``[1, 2, 3, 4]``:
    a pruner builds from any mask as often as asked; an earlier build leaves no trace."""
    model = _resnet18()
    x = torch.randn(1, 3, 32, 32)
    first = StructuredPruner(model, x, "magnitude", bias_compensation=False, recalibrate_bn=False)
    g = _group(first.graph, "conv1")
    first.build(_mask(first.graph, g, [1, 2, 3, 4]))
    again, _ = first.build(_mask(first.graph, g, [2, 6, 9]))
    fresh = StructuredPruner(_resnet18(), x, "magnitude", bias_compensation=False, recalibrate_bn=False)
    once, _ = fresh.build(_mask(fresh.graph, _group(fresh.graph, "conv1"), [2, 6, 9]))
    touched = [n for n in g.modules() if n]
    for name in touched:
        for (pa, a), (pb, b) in zip(
            again.get_submodule(name).named_parameters(), once.get_submodule(name).named_parameters(), strict=True
        ):
            assert pa == pb and torch.equal(a, b), name
    assert again.conv1.out_channels == 61 and model.conv1.out_channels == 64


def test_a_hand_made_mask_that_empties_a_layer_or_cuts_frozen_units_is_refused_before_slicing():
    """The peer's ``if DG.check_pruning_group(group): group.prune()``. Before: both masks were
    sliced, and the copy failed to run ("expected weight to be at least 1 at dimension 0")."""
    model = _resnet18()
    x = torch.randn(1, 3, 32, 32)
    pruner = StructuredPruner(model, x, "magnitude")
    graph = pruner.graph
    stem, image = _group(graph, "conv1"), _group(graph, "conv1", "in")
    every = torch.zeros(graph.root.numel(), dtype=torch.bool)
    every[stem.units] = True
    with pytest.raises(
        UserError, match=r"removes all 64 units of group \d+ \(bn1, conv1, layer1.0.bn2, layer1.0.conv1, ...\)"
    ):
        pruner.build(every)
    with pytest.raises(
        UserError, match=r"removes 1 frozen unit\(s\) of group \d+ \(conv1\): input without traced channels"
    ):
        pruner.build(_mask(graph, image, [0]))
    with pytest.raises(UserError, match="boolean mask over the graph's"):
        pruner.build(every.float())
    graph.check_removal(_mask(graph, stem, list(range(63))))  # one unit left: fine
    assert model.conv1.out_channels == 64


class TwoBranchConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.c, self.fc = nn.Conv2d(12, 16, 1), nn.Linear(16, 5)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        return self.fc(F.relu(self.c(y)).mean((2, 3)))


@pytest.mark.parametrize("ratio", [0.9, 0.99])
def test_global_pruning_at_extreme_ratios_never_empties_a_concat_branch(ratio):
    """The peer's issues: an empty concatenation at some ratios (#204), a model that grows
    at high sparsity (#417). One branch scores far lowest; the cap keeps a tenth of each."""
    model, x = _seeded(TwoBranchConcat), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.b.weight.mul_(1e-3)
    small = _prune(model, x, ratio=ratio, global_pruning=True)
    assert (small.a.out_channels, small.b.out_channels, small.c.in_channels, small.c.out_channels) == (1, 1, 2, 2)
    assert count_params(small) == 77 < count_params(model) == 629 and small(x).shape == (2, 5)


# -- the criteria of the peer's importance tests, term by term ----------------------------------


class ConvPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_scores_are_the_mean_of_normalised_filter_and_column_norms(p):
    """The peer's ``NormMetric(p=1)`` / ``MagnitudeImportance(p=2)`` on a layer pair: each
    unit's score is the mean of its producer row's and consumer column's ``||.||_p^p``,
    each term divided by its mean over the group."""
    model, x = _seeded(ConvPair), torch.randn(3, 8)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    pruner.importance = type(pruner.importance)(p=p)
    g = _group(pruner.graph, "fc1")
    w1, w2 = model.fc1.weight.detach().double(), model.fc2.weight.detach().double()
    rows, cols = w1.abs().pow(p).sum(1), w2.abs().pow(p).sum(0)
    expected = (mean_normalized(rows) + mean_normalized(cols)) / 2
    assert torch.allclose(pruner.score()[g.id], expected, atol=1e-6)
    small = pruner.prune()
    kept = expected.argsort(descending=True)[:6].sort().values
    assert torch.equal(small.fc1.weight, model.fc1.weight[kept])


def test_bn_scale_scores_of_the_resnet_stem_group_are_its_norms_gammas():
    """The peer's ``BNScaleImportance()(DG.get_pruning_group(model.conv1, ...))``: the stem's
    group holds three BatchNorms (bn1 and the two blocks' bn2); its scores are the mean of
    their normalised ``|gamma|``."""
    model = _resnet18()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.0, 1.0)
    x = torch.randn(1, 3, 32, 32)
    graph = DependencyGraph(model, x)
    imp = StructuredPruner(model, x, "bn_scale").importance
    g = _group(graph, "conv1")
    score = score_groups(imp, graph, ScoringContext(graph, {}, model))[g.id]
    gammas = [model.bn1.weight, model.layer1[0].bn2.weight, model.layer1[1].bn2.weight]
    expected = torch.stack([mean_normalized(w.detach().double().abs()) for w in gammas]).mean(0)
    assert torch.allclose(score, expected, atol=1e-6)


# -- models from the peer's issue tracker -------------------------------------------------------


def _cbs(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class YoloBottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = _cbs(c, c, 3), _cbs(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's block: ``cv1``'s output chunked in two, the second half through residual
    bottlenecks, every piece concatenated into ``cv2`` (the peer asks users to rewrite it
    as ``C2f_v2``, issue #147)."""

    def __init__(self, cin: int, cout: int, n: int) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1, self.cv2 = _cbs(cin, 2 * self.c), _cbs((2 + n) * self.c, cout)
        self.m = nn.ModuleList(YoloBottleneck(self.c) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class TinyYolo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.c2f, self.down, self.c2f2 = _cbs(3, 16, 3), C2f(16, 32, 2), _cbs(32, 32, 3), C2f(32, 32, 1)
        self.head = nn.Conv2d(64, 8, 1)

    def forward(self, x):
        a = self.c2f(self.stem(x))
        return self.head(torch.cat([a, self.c2f2(self.down(a))], 1))


def _trained_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 2.0)
    return model


def test_yolov8_c2f_chunks_prune_without_rewriting_the_block():
    model, x = _trained_norms(_seeded(TinyYolo)), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    graph = DependencyGraph(model, x)
    half = _group(graph, "c2f.m.0.cv2.0")  # the second chunk, the bottlenecks' residual stream
    assert (half.size, half.prunable) == (16, 16) and {"c2f.cv1.0", "c2f.m.1.cv2.0", "c2f.cv2.0"} <= set(half.modules())
    _exact(model, x)
    small = _prune(model, x)
    assert (small.c2f.cv1[0].out_channels, small.c2f.m[0].cv1[0].out_channels, small.c2f.cv2[0].in_channels) == (
        16,
        8,
        32,
    )
    assert (small.c2f.cv2[0].out_channels, small.head.in_channels, small.head.out_channels) == (16, 32, 8)
    assert count_params(model) == 29656 and count_params(small) == 7792 and small(x).shape == (2, 8, 16, 16)


class VitPytorchAttention(nn.Module):
    """vit-pytorch's attention (issue #412: IndexError in the peer): ``to_qkv(x).chunk(3,
    dim=-1)``, each part rearranged ``b n (h d) -> b h n d``, a fixed scale."""

    def __init__(self, dim: int = 32, heads: int = 4, dim_head: int = 8) -> None:
        super().__init__()
        self.heads, self.emb, self.norm = heads, nn.Linear(6, dim), nn.LayerNorm(dim)
        self.to_qkv, self.to_out = nn.Linear(dim, 3 * heads * dim_head, bias=False), nn.Linear(heads * dim_head, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.emb(x)
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(self.norm(x)).chunk(3, dim=-1))
        o = ((q @ k.transpose(-1, -2)) * 0.35).softmax(-1) @ v
        return self.head((x + self.to_out(o.transpose(1, 2).reshape(b, n, -1))).mean(1))


def test_vit_pytorch_attention_with_chunked_qkv_prunes_its_head_dims_and_stream():
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    graph = DependencyGraph(_seeded(VitPytorchAttention), x)
    inner = _group(graph, "to_qkv")
    assert inner.prunable == inner.size and "to_out" in inner.modules()
    _exact(_seeded(VitPytorchAttention), x)
    small = _prune(_seeded(VitPytorchAttention), x)
    assert (small.emb.out_features, small.norm.normalized_shape, small.to_qkv.weight.shape) == (16, (16,), (48, 16))
    assert (small.to_out.in_features, small.to_out.out_features, small(x).shape) == (16, 16, (2, 3))


class TransposedAttention(nn.Module):
    """Restormer's channel attention (issue #392: IndexError in the peer): q, k and v
    chunked from a depthwise-convolved projection, each reshaped to heads apart, attention
    over channels scaled by a learned per-head temperature."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.temperature = heads, nn.Parameter(torch.full((heads, 1, 1), 0.5))
        self.stem, self.qkv = nn.Conv2d(3, dim, 3, padding=1), nn.Conv2d(dim, 3 * dim, 1)
        self.dw = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim)
        self.proj, self.out = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        b, _, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, -1, h * w) for t in self.dw(self.qkv(x)).chunk(3, dim=1))
        attn = ((F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature).softmax(-1)
        return self.out(x + self.proj((attn @ v).reshape(b, -1, h, w)))


def test_restormer_channel_attention_keeps_its_channels_with_a_reason_and_the_stream_prunes():
    """Attention over channels normalises across them (a softmax over k's channels), and
    whole heads cannot go either (the reshapes read the literal ``self.heads``: tried,
    the oracle is 0.06 off): the q/k/v channels stay, with the reason, instead of the
    peer's IndexError; the stream prunes."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    graph = DependencyGraph(_seeded(TransposedAttention), x)
    inner = _group(graph, "qkv")
    assert inner.prunable == 0 and any("both operands carry channels" in r for r in inner.reasons)
    _exact(_seeded(TransposedAttention), x)
    small = _prune(_seeded(TransposedAttention), x)
    assert (small.stem.out_channels, small.qkv.in_channels, small.proj.out_channels, small.out.in_channels) == (
        8,
        8,
        8,
        8,
    )
    assert (small.qkv.out_channels, small.dw.groups, small.proj.in_channels) == (48, 48, 16) and small(
        x
    ).shape == x.shape


class OneChannelConvs(nn.Module):
    """A conv from one channel to eight and one from one to one (``groups=1``: issue #179,
    the peer took it for a depthwise conv and coupled its input with its output)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 1, 3, padding=1), nn.Conv2d(1, 8, 3, padding=1)
        self.one, self.c2 = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(9, 4, 1)

    def forward(self, x):
        y = F.relu(self.c0(x))
        return self.c2(torch.cat([F.relu(self.c1(y)), self.one(y)], 1))


def test_a_one_channel_conv_is_not_taken_for_a_depthwise_conv():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    graph = DependencyGraph(_seeded(OneChannelConvs), x)
    assert _group(graph, "one").modules() == ["c2", "one"]  # its output is its own group, not c0's
    assert _group(graph, "c0").modules() == ["c0", "c1", "one"]
    _exact(_seeded(OneChannelConvs), x)
    small = _prune(_seeded(OneChannelConvs), x)
    assert (small.c0.out_channels, small.c1.out_channels, small.one.out_channels, small.c2.in_channels) == (1, 4, 1, 5)
