"""A fourth set of the scenarios users bring from Torch-Pruning's test suite, written for
CleanAI's API (see ``test_peer_scenarios.py``, ``_2`` and ``_3``): torchvision's video Swin,
an attention that reads its head size from its input's width, ``nn.Bilinear``, and
``nn.ChannelShuffle`` after a depthwise conv with a channel multiplier.

Each test asserts widths, parameter counts or scores, and the masking oracle where slicing
must equal zeroing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_peer_scenarios_2 import _exact, _group
from torch import nn

from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core.metrics import count_params

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _heads(graph: DependencyGraph, module: str):
    return next(g for g in graph.groups() if any(s.module == module and s.name == "heads" for s in g.slices))


def _mask(graph: DependencyGraph, group, idx: list[int]) -> torch.Tensor:
    pruned = torch.zeros(graph.root.numel(), dtype=torch.bool)
    pruned[group.units[idx]] = True
    return pruned


# -- torchvision's video Swin ------------------------------------------------------------------


def _swin3d():
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    torch.manual_seed(0)
    # the input's 2 frames are fewer than the window's 4: that window shrinks to 2 and stops
    # shifting in time while it shifts in space (torchvision's mask with a zero shift)
    return SwinTransformer3d(
        patch_size=[2, 4, 4],
        embed_dim=16,
        depths=[2, 1],
        num_heads=[2, 4],
        window_size=[4, 2, 2],
        stochastic_depth_prob=0.0,
        num_classes=5,
    ).eval()


X_VIDEO = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_video_swin_prunes_whole_heads_and_the_stream():
    """torchvision's ``shifted_window_attention_3d`` reads the head size from the input's
    width: the window attention is one module, whose heads and stream prune apart."""
    model = _swin3d()
    graph = DependencyGraph(model, X_VIDEO)
    heads = _heads(graph, "features.0.0.attn")
    assert (heads.size, heads.prunable) == (2, 2)
    assert (_heads(graph, "features.2.0.attn").size, _group(graph, "patch_embed.proj").prunable) == (4, 16)
    _exact(model, X_VIDEO)
    pruner = StructuredPruner(model, X_VIDEO, "magnitude", bias_compensation=False, recalibrate_bn=False)
    small, _ = pruner.build(_mask(pruner.graph, _heads(pruner.graph, "features.2.0.attn"), [1, 3]))
    attn, old = small.features[2][0].attn, model.features[2][0].attn
    assert (attn.num_heads, attn.qkv.out_features, attn.proj.in_features) == (2, 3 * 16, 16)
    assert torch.equal(attn.relative_position_bias_table, old.relative_position_bias_table[:, [0, 2]])
    rows = [p * 32 + h * 8 + i for p in range(3) for h in (0, 2) for i in range(8)]
    assert torch.equal(attn.qkv.weight, old.qkv.weight[rows])
    assert count_params(model) - count_params(small) == 2 * 3 * 8 * (32 + 1) + 2 * 8 * 32 + 2 * 7 * 3 * 3
    pruner = StructuredPruner(model, X_VIDEO, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert small.patch_embed.proj.out_channels == 8 and small.head.in_features == 16
    assert [b.attn.num_heads for b in (small.features[0][0], small.features[0][1], small.features[2][0])] == [1, 1, 2]
    assert small(X_VIDEO).shape == (2, 5) and count_params(small) < 0.3 * count_params(model)
    fresh = _swin3d()  # the history rebuilds the pruned architecture, the state dict fills it
    pruner.history.replay(fresh)
    fresh.load_state_dict(small.state_dict(), strict=True)
    assert torch.equal(fresh(X_VIDEO), small(X_VIDEO))


class WidthFromInput(nn.Module):
    """Attention that reads its head size from its input's width (as torchvision's video
    Swin does): the stream and the head size only prune together, at one ratio."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return F.linear(out.transpose(1, 2).reshape(b, n, c), self.proj.weight, self.proj.bias)


class WidthNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm, self.attn = nn.Linear(6, 16), nn.LayerNorm(16), WidthFromInput()
        self.fc, self.head = nn.Linear(16, 24), nn.Linear(24, 3)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.attn(self.norm(h))
        return self.head(F.relu(self.fc(h)))


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_a_head_size_read_from_the_input_skips_its_groups_with_a_reason(ratio):
    """Pruning the stream alone or the head size alone breaks the model; at 0.5 both
    together happen to run, but the slicing alone (the oracle's) does not: each breaking
    group is skipped with a warning, not a crash, and the rest prunes."""
    torch.manual_seed(0)
    model, x = WidthNet().eval(), torch.randn(2, 5, 6)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=ratio)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = pruner.prune()
    skipped = [str(w.message) for w in caught if "skipped group" in str(w.message)]
    assert len(skipped) == 2 and all("attn.qkv" in m and "fails to run" in m for m in skipped)
    assert small.attn.qkv.weight.shape == (48, 16) and small.emb.out_features == 16
    assert small.fc.out_features == 24 - int(24 * ratio)  # the MLP's hidden units still go
    assert small(x).shape == (2, 5, 3)


# -- nn.Bilinear and nn.ChannelShuffle ---------------------------------------------------------


class BilinearHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 10)
        self.bil, self.out = nn.Bilinear(8, 10, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.out(F.relu(self.bil(self.a(x), self.b(x))))


def test_bilinear_prunes_both_inputs_and_its_outputs():
    torch.manual_seed(0)
    model, x = BilinearHead().eval(), torch.randn(4, 6)
    graph = DependencyGraph(model, x)
    assert [(g.size, g.prunable) for g in (_group(graph, "a"), _group(graph, "b"), _group(graph, "bil"))] == [
        (8, 8),
        (10, 10),
        (12, 12),
    ]
    _exact(model, x)
    pruner = StructuredPruner(model, x, "magnitude", bias_compensation=False, recalibrate_bn=False)
    picks = {"a": [1, 5], "b": [2, 3, 9], "bil": [0]}
    small, _ = pruner.build(sum(_mask(pruner.graph, _group(pruner.graph, m), idx) for m, idx in picks.items()).bool())
    keep1, keep2, keep_out = [0, 2, 3, 4, 6, 7], [0, 1, 4, 5, 6, 7, 8], list(range(1, 12))
    bil = small.bil
    assert (bil.in1_features, bil.in2_features, bil.out_features) == (6, 7, 11)
    assert torch.equal(bil.weight, model.bil.weight[keep_out][:, keep1][:, :, keep2])
    assert torch.equal(bil.bias, model.bil.bias[keep_out])
    assert torch.equal(small.out.weight, model.out.weight[:, keep_out])
    # a's and b's rows with their biases; bil's output 0 (and out's column), then 2 x 10 and 6 x 3 of its 11 slabs
    assert count_params(model) - count_params(small) == 2 * 7 + 3 * 7 + (8 * 10 + 1 + 3) + (11 * 2 * 10 + 11 * 6 * 3)
    small = StructuredPruner(model, x, "lamp", pruning_ratio=0.5).prune()
    assert (small.bil.in1_features, small.bil.in2_features, small.bil.out_features) == (4, 5, 6)


class ShuffledDepthwise(nn.Module):
    """A depthwise conv with a channel multiplier of 2, then a channel shuffle of 2 groups."""

    def __init__(self) -> None:
        super().__init__()
        self.pw, self.dw = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.bn, self.shuffle, self.out = nn.BatchNorm2d(16), nn.ChannelShuffle(2), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(self.shuffle(F.relu(self.bn(self.dw(self.pw(x))))))


def test_channel_shuffle_ties_each_channel_to_its_place_in_every_group():
    """Slicing keeps the shuffle's group count, so a channel leaves with the one at its
    position in the other group: pw channel ``k`` makes dw channels ``2k, 2k + 1``, which
    the shuffle of 2 groups of 8 couples with ``2k + 8, 2k + 9`` (pw channel ``k + 4``)."""
    torch.manual_seed(0)
    model, x = ShuffledDepthwise().eval(), torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    g = _group(graph, "pw")
    assert (g.size, g.prunable) == (4, 4)
    _exact(model, x)
    pruner = StructuredPruner(model, x, "magnitude", bias_compensation=False, recalibrate_bn=False)
    units = pruner.graph.root[pruner.graph.ctx.slices[("pw", "out")].atoms]
    one = int((_group(pruner.graph, "pw").units == units[1]).nonzero())
    small, _ = pruner.build(_mask(pruner.graph, _group(pruner.graph, "pw"), [one]))
    kept_pw, kept_dw = [0, 2, 3, 4, 6, 7], [0, 1, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15]
    assert torch.equal(small.pw.weight, model.pw.weight[kept_pw]) and small.dw.groups == 6
    assert torch.equal(small.dw.weight, model.dw.weight[kept_dw])
    out_cols = [(c % 8) * 2 + c // 8 for c in kept_dw]  # dw channel c's place after the shuffle
    assert torch.equal(small.out.weight, model.out.weight[:, sorted(out_cols)])
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    assert (small.pw.out_channels, small.dw.out_channels, small.out.in_channels) == (4, 8, 8)


# -- a packed sequence through an LSTM ---------------------------------------------------------


class PackedLSTM(nn.Module):
    """Variable-length sequences packed for the LSTM (``enforce_sorted=False``: the
    packed sequence carries index tensors too)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 24), nn.Linear(24, 12)
        self.lstm, self.head = nn.LSTM(12, 10, num_layers=2, batch_first=True), nn.Linear(10, 3)

    def forward(self, x, lengths):
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        packed = pack_padded_sequence(self.fc2(F.relu(self.fc1(x))), lengths, batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(out) + self.head(h[-1])[:, None]


def test_a_packed_sequence_prunes_its_lstm_and_the_layers_before():
    """A ``PackedSequence`` traces as a plain tuple (its constructor reads
    ``batch_sizes.device``); the LSTM reads its ``data`` (steps by features) and
    ``pad_packed_sequence`` writes the output steps into a fresh ``full`` tensor that takes
    their channels. Before 2026-12-02 the LSTM kept its width (fc2 and hidden frozen)."""
    torch.manual_seed(0)
    model, inputs = PackedLSTM().eval(), (torch.randn(3, 7, 6), torch.tensor([4, 7, 2]))
    graph = DependencyGraph(model, inputs)
    assert (_group(graph, "fc1").prunable, _group(graph, "fc2").prunable, _group(graph, "head", "in").prunable) == (
        24,
        12,
        10,
    )
    _exact(model, inputs)
    small = StructuredPruner(model, inputs, "magnitude", pruning_ratio=0.5).prune()
    assert (small.fc1.out_features, small.fc2.out_features, small.lstm.hidden_size) == (12, 6, 5)
    assert (count_params(model), count_params(small)) == (2341, 680)
    assert small(*inputs).shape == (3, 7, 3)


# -- a bare matrix in an einsum ----------------------------------------------------------------


class EinsumBasis(nn.Module):
    """A conv's channels mixed by a bare ``(C, K)`` or ``(K, C)`` matrix in an einsum, on
    the feature map or on its tokens: einsum hands ``bmm`` a ``(1, C, K)`` view of it."""

    def __init__(self, equation: str, shape: tuple[int, int], tokens: bool) -> None:
        super().__init__()
        self.equation, self.tokens = equation, tokens
        self.conv, self.basis = nn.Conv2d(3, 8, 1), nn.Parameter(torch.randn(*shape))
        self.out = nn.Linear(5, 2) if tokens else nn.Conv2d(5, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.tokens:
            y = y.flatten(2).transpose(1, 2)
        operands = (self.basis, y) if self.equation.startswith(("cd,", "dc,")) else (y, self.basis)
        return self.out(torch.einsum(self.equation, *operands))


@pytest.mark.parametrize(
    ("equation", "shape", "tokens"),
    [("bchw,cd->bdhw", (8, 5), False), ("bchw,dc->bdhw", (5, 8), False), ("dc,bnc->bnd", (5, 8), True)],
)
def test_a_bare_matrix_in_an_einsum_prunes_both_its_dims(equation, shape, tokens):
    torch.manual_seed(0)
    model, x = EinsumBasis(equation, shape, tokens).eval(), torch.randn(2, 3, 4, 4)
    graph = DependencyGraph(model, x)
    assert (_group(graph, "conv").size, _group(graph, "conv").prunable) == (8, 8)  # was frozen: "contracts channels"
    _exact(model, x)
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    c_dim = shape.index(8)
    assert small.conv.out_channels == 4 and small.basis.shape[c_dim] == 4 and small.basis.shape[1 - c_dim] == 3
    assert count_params(model) - count_params(small) == 4 * (3 + 1) + (8 * 5 - 4 * 3) + 2 * 2  # conv, basis, out
    assert small(x).shape == model(x).shape


# -- channels flipped ----------------------------------------------------------------------------


class Flipped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.mix = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)
        self.fc, self.head = nn.Linear(4, 10), nn.Linear(10, 2)

    def forward(self, x):
        y = self.mix(F.relu(self.conv(x)).flip(1)).mean((2, 3))
        return self.head(torch.flip(F.relu(self.fc(y)), [-1]))


def test_channels_flipped_prune_in_reverse_order():
    """``flip`` over the channels: kept channels stay reversed, so channel ``i`` of the
    producer is column ``C - 1 - i`` of the consumer (``roll`` still freezes: it wraps at
    the width)."""
    torch.manual_seed(0)
    model, x = Flipped().eval(), torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    assert [(_group(graph, m).size, _group(graph, m).prunable) for m in ("conv", "fc")] == [(6, 6), (10, 10)]
    _exact(model, x)
    pruner = StructuredPruner(model, x, "magnitude", bias_compensation=False, recalibrate_bn=False)
    small, _ = pruner.build(_mask(pruner.graph, _group(pruner.graph, "conv"), [0, 4]))
    assert torch.equal(small.conv.weight, model.conv.weight[[1, 2, 3, 5]])
    assert torch.equal(small.mix.weight, model.mix.weight[:, [0, 2, 3, 4]])  # columns 5 - i
    assert small(x).shape == (2, 2)


# -- round_to where a unit is several channels ---------------------------------------------------


class GroupNormConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.gn = nn.Conv2d(3, 12, 3, padding=1), nn.GroupNorm(3, 12)
        self.grouped, self.mix = nn.Conv2d(12, 24, 3, padding=1, groups=3), nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.mix(F.relu(self.grouped(F.relu(self.gn(self.stem(x))))))


@pytest.mark.parametrize("global_pruning", [False, True], ids=["uniform", "global"])
def test_round_to_holds_where_a_unit_is_a_channel_in_every_norm_group(global_pruning):
    """A GroupNorm of 3 groups makes each unit 3 channels (one per group): at round_to=4
    the kept units must give a multiple of 4 channels, 12 of 12 here (it kept 9)."""
    torch.manual_seed(0)
    model, x = GroupNormConvs().eval(), torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    assert (_group(graph, "stem").size, _group(graph, "stem").prunable) == (4, 4)  # 12 channels, 3 per unit
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, round_to=4, global_pruning=global_pruning)
    small = pruner.prune()
    widths = [small.stem.out_channels, small.grouped.out_channels]
    assert all(w % 4 == 0 for w in widths) and small.gn.num_channels == widths[0]
    assert small(x).shape == (2, 4, 8, 8)
    if not global_pruning:  # a global ranking rounds after choosing: here it rounds everything back
        assert widths == [12, 12]
