"""An eighth set of the scenarios users bring from Torch-Pruning's test suite and examples,
written for CleanAI's API (see ``test_peer_scenarios.py`` to ``_7``): ``plan()`` after an
iterative prune, channels gathered by an index laid out from a buffer, a parent that clips
or masks a child's weight in ``forward`` (WGAN's critic, a max-norm constraint), a per-row
gain multiplied into a weight read outside its module, a tied convolutional autoencoder
(the decoder runs the encoder's weight transposed), ``GroupNorm`` with one channel per
group, and ``nn.Embedding(max_norm=...)``.

Each test asserts widths, parameter counts, and the masking oracle where slicing must equal
zeroing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_peer_scenarios_2 import _exact
from test_peer_scenarios_6 import _prune, _seeded, _two_step_replay
from torch import nn

from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core.metrics import count_params

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _reasons(graph: DependencyGraph) -> list[str]:
    return [r for g in graph.groups() for r in g.reasons]


# -- plan() after an iterative prune -------------------------------------------------------------


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c3(self.c2(self.c1(x).relu()).relu())


@pytest.mark.parametrize("global_pruning", [False, True])
def test_plan_after_an_iterative_prune_is_every_steps_removal_on_the_original(global_pruning):
    model, x = _seeded(Plain), torch.randn(1, 3, 12, 12)
    pruner = StructuredPruner(
        model, x, "magnitude", pruning_ratio=0.5, iterative_steps=3, global_pruning=global_pruning, round_to=None
    )
    small = pruner.prune()
    assert len(pruner.history) == 3
    plan = pruner.plan()  # was the first step's plan alone: 6 of 32 units
    lost = 32 - small.c1.out_channels - small.c2.out_channels
    assert plan.n_pruned == lost == 16
    assert [gp.n_pruned for gp in plan.groups] == [16 - small.c1.out_channels, 16 - small.c2.out_channels]
    assert plan.groups[0].ratio == (16 - small.c1.out_channels) / 16
    rebuilt, _ = pruner.build(plan.pruned_units())  # the same model, from the original in one go
    assert count_params(rebuilt) == count_params(small) == (832 if global_pruning else 844)
    assert torch.equal(rebuilt(x), small(x))


def test_plan_after_an_iterative_prune_of_a_resnet_rebuilds_the_same_model():
    import torchvision

    model, x = _seeded(lambda: torchvision.models.resnet18(num_classes=10)), torch.randn(1, 3, 32, 32)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.4, iterative_steps=2, round_to=None)
    small = pruner.prune()
    plan = pruner.plan()
    rebuilt, _ = pruner.build(plan.pruned_units())
    assert count_params(rebuilt) == count_params(small) < count_params(model)
    widths = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    assert widths(rebuilt) == widths(small)
    assert torch.allclose(rebuilt(x), small(x), atol=1e-5)
    assert sum(r["pruned"] for r in pruner.report()["groups"]) == plan.n_pruned


# -- gather along the channels with an index laid out from a buffer --------------------------------


class Gathered(nn.Module):
    """Channels picked by ``gather`` with a buffer viewed and expanded to the feature map
    (``how``: ``gather`` as 4-D, ``index_long`` as ``x[:, perm.long()]``,
    ``select_view`` as ``index_select(1, perm.view(-1))``); ``n`` entries (a permutation or
    a subset)."""

    def __init__(self, how: str = "gather", n: int = 8) -> None:
        super().__init__()
        self.how = how
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(n, 4, 1)
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))[:n]
        self.register_buffer("perm", perm.int() if how == "index_long" else perm)

    def forward(self, x):
        y = self.c1(x).relu()
        if self.how == "gather":
            index = self.perm[None, :, None, None].expand(y.shape[0], -1, y.shape[2], y.shape[3])
            return self.c2(torch.gather(y, 1, index))
        if self.how == "index_long":
            return self.c2(y[:, self.perm.long()])
        return self.c2(y.index_select(1, self.perm.view(-1)))


@pytest.mark.parametrize("how", ["gather", "index_long", "select_view"])
@pytest.mark.parametrize("n", [8, 6])
def test_channels_gathered_by_an_index_laid_out_from_a_buffer_prune_and_the_buffer_follows(how, n):
    model, x = _seeded(lambda: Gathered(how, n)), torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    groups = [g for g in graph.groups() if any(s.module == "c1" and s.kind == "out" for s in g.slices)]
    assert sum(g.prunable for g in groups) == 8  # "op aten.gather.default ... indexes channels" before
    assert all(any(s.name == "perm@" for s in g.slices) for g in groups)  # the buffer is rewritten with them
    _exact(model, x)
    pruner = _prune(model, x)
    small = pruner.pruned
    assert small.c1.out_channels == 4 and small.perm.numel() == small.c2.in_channels
    assert int(small.perm.max()) < 4 and small.perm.dtype == model.perm.dtype
    assert count_params(small) == (132 if n == 8 else 128) and not pruner.skipped_groups
    kept = pruner.history.steps[0]
    keep = next(e.keep for e in kept if e.module == "c1" and e.slice == "out").tolist()
    # the pruned model picks the same surviving channels in the same order
    want = [keep.index(p) for p in model.perm.tolist() if p in keep]
    assert small.perm.tolist() == want


class StoredLaidOut(nn.Module):
    """The index buffer stored already laid out for ``gather`` (``(1, C, 1, 1)``), read both
    by ``gather`` and, flattened, by ``index_select``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
        self.register_buffer("idx", perm.view(1, -1, 1, 1))

    def forward(self, x):
        y = self.c1(x).relu()
        return self.c2(torch.gather(y, 1, self.idx.expand_as(y)) + y.index_select(1, self.idx.view(-1)))


def test_an_index_buffer_stored_laid_out_for_gather_keeps_its_layout(tmp_path):
    model, x = _seeded(StoredLaidOut), torch.randn(2, 3, 5, 5)
    _exact(model, x)
    pruner, small, fresh = _two_step_replay(StoredLaidOut, x, tmp_path)
    assert count_params(small) == count_params(fresh) == 132 and not pruner.skipped_groups
    assert tuple(small.idx.shape) == tuple(fresh.idx.shape) == (1, 4, 1, 1)
    assert sorted(small.idx.flatten().tolist()) == [0, 1, 2, 3] and torch.equal(fresh(x), small(x))


def test_an_index_made_in_forward_refuses_with_the_fix():
    class Made(Gathered):
        def forward(self, x):
            y = self.c1(x).relu()
            return self.c2(torch.gather(y, 1, torch.arange(7, -1, -1).view(1, -1, 1, 1).expand_as(y)))

    graph = DependencyGraph(_seeded(Made), torch.randn(2, 3, 6, 6))
    why = [r for r in _reasons(graph) if "gather" in r]
    assert why and "not a 1-D index buffer" in why[0] and "register the positions" in why[0]


def test_a_gathered_model_replays_on_a_fresh_copy(tmp_path):
    pruner, small, fresh = _two_step_replay(lambda: Gathered("gather", 8), torch.randn(2, 3, 6, 6), tmp_path)
    x = torch.randn(2, 3, 6, 6)
    assert count_params(fresh) == count_params(small) < 260
    assert torch.equal(fresh.perm, small.perm) and torch.equal(fresh(x), small(x))


# -- a parent that clips or masks a child's weight in forward ---------------------------------------


class Critic(nn.Module):
    """WGAN's weight clipping done in the critic's own ``forward``: every parameter
    (``clip="all"``), or the consumer's weight alone (``"consumer"``), clamped in place
    through ``.data``; ``"mask"`` multiplies a row mask buffer into ``c2``'s weight under
    ``no_grad``."""

    def __init__(self, clip: str = "all") -> None:
        super().__init__()
        self.clip = clip
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3)
        self.c3 = nn.Conv2d(8, 2, 1)
        self.register_buffer("mask", (torch.arange(8) % 4 != 0).float())

    def forward(self, x):
        if self.clip == "all":
            for p in self.parameters():
                p.data.clamp_(-0.3, 0.3)
        elif self.clip == "consumer":
            self.c2.weight.data.clamp_(-0.3, 0.3)
        else:
            with torch.no_grad():
                self.c2.weight.mul_(self.mask.view(-1, 1, 1, 1))
        return self.c3(self.c2(self.bn(self.c1(x)).relu()).relu()).mean((2, 3))


@pytest.mark.parametrize("clip", ["all", "consumer", "mask"])
def test_a_parent_that_clips_a_childs_weight_in_forward_prunes_the_child(clip):
    model, x = _seeded(lambda: Critic(clip)), torch.randn(2, 3, 9, 9)
    graph = DependencyGraph(model, x)
    assert [g.prunable for g in graph.groups(prunable_only=True)] == [8, 8]  # c1 -> c2 and c2 -> c3
    assert not any("reaches no operation" in r or "ignored it" in r for r in _reasons(graph))
    _exact(model, x)
    pruner = _prune(model, x)
    assert [pruner.pruned.c1.out_channels, pruner.pruned.c2.out_channels] == [4, 4]
    assert count_params(pruner.pruned) == 278 and not pruner.skipped_groups


def test_a_weight_returned_by_the_model_still_keeps_its_input_channels():
    class Returns(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(3, 8), nn.Linear(8, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.l3(self.l2(self.l1(x).relu()).relu()), self.l2.weight * 1.0

    graph = DependencyGraph(_seeded(Returns), torch.randn(2, 3))
    inner = next(g for g in graph.groups() if {s.module for s in g.slices} == {"l1", "l2"})
    assert inner.prunable == 0  # the returned weight's columns are an output: they stay


def test_a_per_row_gain_multiplied_into_a_weight_read_outside_its_module_prunes_both_dims():
    class Gain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.fc, self.l3 = nn.Linear(3, 8), nn.Linear(8, 6), nn.Linear(6, 2)
            self.g = nn.Parameter(torch.rand(6) + 0.5)

        def forward(self, x):
            return self.l3(F.linear(self.l1(x).relu(), self.fc.weight * self.g[:, None], self.fc.bias).relu())

    model, x = _seeded(Gain), torch.randn(4, 3)
    graph = DependencyGraph(model, x)
    assert sorted(g.prunable for g in graph.groups(prunable_only=True)) == [6, 8]  # the inputs froze before
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (small.fc.in_features, small.fc.out_features, small.g.numel()) == (4, 3, 3)
    assert count_params(small) == 42


# -- a tied convolutional autoencoder --------------------------------------------------------------


class TiedAutoencoder(nn.Module):
    """The decoder runs the encoder's weight transposed: ``F.conv_transpose2d(h,
    self.enc.weight, self.dec_bias)``."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mid = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)
        self.dec_bias = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return F.conv_transpose2d(self.mid(self.enc(x).relu()).relu(), self.enc.weight, self.dec_bias)


def test_a_tied_conv_autoencoder_prunes_the_encoder_filters_with_the_decoder_inputs(tmp_path):
    model, x = _seeded(TiedAutoencoder), torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    # the encoder's filters, the decoder's inputs and mid's outputs are one group ("cannot shrink" before)
    assert [sorted({s.module or s.name for s in g.slices}) for g in graph.groups(prunable_only=True)] == [
        ["enc", "mid"]
    ]
    assert graph.groups(prunable_only=True)[0].prunable == 8
    _exact(model, x)
    small = _prune(model, x).pruned
    assert tuple(small.enc.weight.shape) == (4, 3, 3, 3) and tuple(small.mid.weight.shape) == (4, 4, 1, 1)
    assert small(x).shape == (2, 3, 8, 8) and count_params(small) == 135
    _, small2, fresh = _two_step_replay(TiedAutoencoder, x, tmp_path)
    assert count_params(fresh) == count_params(small2) == 135 and torch.equal(fresh(x), small2(x))


# -- GroupNorm with one channel per group ---------------------------------------------------------


class OneChannelGroups(nn.Module):
    def __init__(self, groups: int = 8) -> None:
        super().__init__()
        self.c1, self.gn, self.c2 = nn.Conv2d(3, 8, 3), nn.GroupNorm(groups, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.gn(self.c1(x)).relu())


def test_group_norm_with_one_channel_per_group_prunes_whole_groups_exactly(tmp_path):
    model, x = _seeded(OneChannelGroups), torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    group = next(g for g in graph.groups() if any(s.module == "gn" for s in g.slices))
    assert group.prunable == 8 and not group.normalizes  # one tied unit (nothing to prune) before
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (small.gn.num_groups, small.gn.num_channels, small.gn.weight.numel()) == (4, 4, 4)
    assert count_params(small) == 140
    _, small2, fresh = _two_step_replay(OneChannelGroups, x, tmp_path)
    assert fresh.gn.num_groups == small2.gn.num_groups == 4 and torch.equal(fresh(x), small2(x))


def test_group_norm_with_several_channels_per_group_still_keeps_its_group_count():
    model, x = _seeded(lambda: OneChannelGroups(2)), torch.randn(2, 3, 6, 6)
    small = _prune(model, x).pruned
    assert (small.gn.num_groups, small.gn.num_channels) == (2, 4)


# -- an embedding that renormalises its rows -------------------------------------------------------


class MaxNormEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 8, max_norm=1.0), nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_an_embedding_with_max_norm_prunes_as_a_normalising_layer():
    model, ids = _seeded(MaxNormEmbedding), torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    graph = DependencyGraph(model, ids)
    group = graph.groups(prunable_only=True)[0]
    assert group.prunable == 8 and group.normalizes
    pruner = _prune(model, ids)
    assert not pruner.skipped_groups  # "pruning it breaks the model" before
    assert pruner.pruned.emb.embedding_dim == 4 and pruner.pruned.emb.max_norm == 1.0
    assert count_params(pruner.pruned) == 95
    plain = DependencyGraph(_seeded(lambda: nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 3))), ids)
    assert not plain.groups(prunable_only=True)[0].normalizes


# -- pruning_ratio=0 beside per-layer ratios -------------------------------------------------------


@pytest.mark.parametrize("global_pruning", [False, True])
def test_a_zero_ratio_beside_per_layer_ratios_prunes_only_those_layers(global_pruning):
    import torchvision

    model, x = _seeded(lambda: torchvision.models.resnet18(num_classes=10)), torch.randn(1, 3, 32, 32)
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruner = StructuredPruner(
        model, x, "magnitude", pruning_ratio=0.0, layer_pruning_ratios={"layer2.0.conv1": 0.75},
        global_pruning=global_pruning, round_to=None,
    )  # fmt: skip
    small = pruner.prune()  # "pruning_ratio=0.0 must be a number strictly between 0 and 1" before
    after = {n: m.out_channels for n, m in small.named_modules() if isinstance(m, nn.Conv2d)}
    assert {n: (before[n], w) for n, w in after.items() if w != before[n]} == {"layer2.0.conv1": (128, 32)}
    assert count_params(small) == 11_015_562


def test_a_zero_ratio_alone_is_refused_with_the_way_to_prune_some_layers():
    from cleanai_core.errors import UserError

    with pytest.raises(UserError, match=r"pruning_ratio=0 removes nothing: .* layer_pruning_ratios"):
        StructuredPruner(_seeded(Plain), torch.randn(1, 3, 12, 12), "magnitude", pruning_ratio=0.0)


# -- channels scattered back through a permutation laid out from a buffer -----------------------


class Scattered(Gathered):
    """A flow's inverse shuffle written as a scatter along the channels (``how``:
    ``scatter_`` into ``zeros_like``, ``scatter_add`` into a fresh ``new_zeros``,
    ``index_copy`` with the 1-D buffer, ``index_add`` onto the features themselves)."""

    def forward(self, x):
        y = self.c1(x).relu()
        index = self.perm.view(1, -1, 1, 1).expand_as(y)
        if self.how == "scatter_":
            return self.c2(torch.zeros_like(y).scatter_(1, index, y))
        if self.how == "scatter_add":
            return self.c2(y.new_zeros(y.shape).scatter_add(1, index, y))
        if self.how == "index_copy":
            return self.c2(torch.zeros_like(y).index_copy(1, self.perm, y))
        return self.c2(y.index_add(1, self.perm, y))


@pytest.mark.parametrize("how", ["scatter_", "scatter_add", "index_copy", "index_add"])
def test_channels_scattered_through_a_permutation_buffer_prune_and_the_buffer_follows(how):
    model, x = _seeded(lambda: Scattered(how)), torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    groups = [g for g in graph.groups() if any(s.module == "c1" and s.kind == "out" for s in g.slices)]
    # "writes across the channels" before; added onto itself, a channel goes with the ones it is
    # added to: one unit per cycle of the permutation (here of 1 and 7 channels)
    assert sum(g.prunable for g in groups) == (2 if how == "index_add" else 8)
    assert all(any(s.name == "perm@" for s in g.slices) for g in groups)
    _exact(model, x)
    pruner = _prune(model, x)
    small = pruner.pruned
    assert not pruner.skipped_groups and small.perm.numel() == small.c1.out_channels == small.c2.in_channels
    assert sorted(small.perm.tolist()) == list(range(small.perm.numel()))
    assert count_params(small) == (228 if how == "index_add" else 132)


# -- a bare position embedding over feature maps ----------------------------------------------------


class PositionedMaps(nn.Module):
    """A learned position embedding ``(1, C, H, W)`` (or ``(C, H, W)``) added to conv
    features, a bare parameter whose last dimension is not its channels'."""

    def __init__(self, shape: tuple[int, ...] = (1, 8, 6, 6)) -> None:
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)
        self.pos = nn.Parameter(torch.randn(*shape))

    def forward(self, x):
        return self.c(self.a(x) + self.pos)


@pytest.mark.parametrize("shape", [(1, 8, 6, 6), (8, 6, 6)])
def test_a_position_embedding_over_feature_maps_prunes_with_the_channels(shape, tmp_path):
    model, x = _seeded(lambda: PositionedMaps(shape)), torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    (group,) = graph.groups(prunable_only=True)  # "channels on different dimensions meet" before
    assert group.prunable == 8 and {s.module or s.name for s in group.slices} == {"a", "c", "pos"}
    _exact(model, x)
    pruner, small, fresh = _two_step_replay(lambda: PositionedMaps(shape), x, tmp_path)
    assert tuple(small.pos.shape) == tuple(fresh.pos.shape) == (*shape[:-3], 4, 6, 6)
    assert count_params(small) == count_params(fresh) == 266 and torch.equal(fresh(x), small(x))


# -- a weight normalised or penalised over its inputs in forward ------------------------------------


class CosineHead(nn.Module):
    """A cosine classifier: the head's weight rows normalised over their inputs in
    ``forward`` (``how``: ``F.normalize``, ``w / w.norm(dim=1, keepdim=True)``, or an L2
    penalty ``sum((p ** 2).sum())`` kept as an attribute beside a plain call)."""

    def __init__(self, how: str = "normalize") -> None:
        super().__init__()
        self.how = how
        self.l1, self.fc, self.l3 = nn.Linear(3, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.l1(x).relu()
        if self.how == "normalize":
            h = F.linear(h, F.normalize(self.fc.weight, dim=1), self.fc.bias)
        elif self.how == "norm":
            h = F.linear(h, self.fc.weight / self.fc.weight.norm(dim=1, keepdim=True))
        else:
            self.penalty = sum((p**2).sum() for p in self.parameters())
            h = self.fc(h)
        return self.l3(h.relu())


@pytest.mark.parametrize("how", ["normalize", "norm", "penalty"])
def test_a_weight_normalised_or_penalised_over_its_inputs_prunes_them(how):
    model, x = _seeded(lambda: CosineHead(how)), torch.randn(4, 3)
    graph = DependencyGraph(model, x)
    # "a second labelled dimension reaches op aten.linalg_vector_norm / aten.div / aten.sum ... which
    # ignored it" before: the inputs of fc (l1's outputs) froze
    assert sorted(g.prunable for g in graph.groups(prunable_only=True)) == [6, 8]
    _exact(model, x)
    small = _prune(model, x).pruned
    assert (small.fc.in_features, small.fc.out_features) == (4, 3)
    assert count_params(small) == 39


def test_a_mean_of_a_weight_over_its_inputs_still_keeps_them():
    class MeanLogged(CosineHead):
        def forward(self, x):
            self.stat = self.fc.weight.abs().mean(1)  # a mean over fewer inputs is another number
            return self.l3(self.fc(self.l1(x).relu()).relu())

    graph = DependencyGraph(_seeded(MeanLogged), torch.randn(4, 3))
    inner = next(g for g in graph.groups() if {s.module for s in g.slices} == {"l1", "fc"})
    assert inner.prunable == 0 and any("mean" in r for r in inner.reasons)


class GroupedCritic(nn.Module):
    """A critic of grouped, depthwise and grouped transposed convolutions whose ``forward``
    clips every parameter in place (``clip=False``: the same model without)."""

    def __init__(self, clip: bool = True) -> None:
        super().__init__()
        self.clip = clip
        self.c1, self.g = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2)
        self.dw, self.t = nn.Conv2d(8, 16, 3, groups=8), nn.ConvTranspose2d(16, 8, 2, stride=2, groups=4)
        self.c3 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        if self.clip:
            for p in self.parameters():
                p.data.clamp_(-0.3, 0.3)
        return self.c3(self.t(self.dw(self.g(self.c1(x).relu()).relu()).relu())).mean((2, 3))


def test_clipping_grouped_and_depthwise_weights_in_forward_prunes_them_like_unclipped():
    x = torch.randn(2, 3, 12, 12)
    clipped = DependencyGraph(_seeded(GroupedCritic), x)
    plain = DependencyGraph(_seeded(lambda: GroupedCritic(False)), x)
    # "g.weight is used outside its module g, which a plugin claims" froze every group before
    assert [g.prunable for g in clipped.groups(prunable_only=True)] == [4, 2, 2]
    assert [g.prunable for g in plain.groups(prunable_only=True)] == [4, 2, 2]
    _exact(_seeded(GroupedCritic), x)
    assert count_params(_prune(_seeded(GroupedCritic), x).pruned) == 314


def test_a_grouped_conv_weight_run_by_a_functional_conv_still_keeps_its_channels():
    class Trident(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.g, self.c3 = (
                nn.Conv2d(3, 8, 3, padding=1),
                nn.Conv2d(8, 8, 3, padding=1, groups=2),
                nn.Conv2d(8, 2, 1),
            )

        def forward(self, x):
            h = self.c1(x).relu()
            return self.c3(self.g(h) + F.conv2d(h, self.g.weight, self.g.bias, padding=2, dilation=2, groups=2))

    graph = DependencyGraph(_seeded(Trident), torch.randn(2, 3, 6, 6))
    inner = [g for g in graph.groups() if any(s.module == "g" for s in g.slices)]
    assert inner and all(g.prunable == 0 for g in inner)
    assert any("convolves channels with a weight that cannot shrink" in r for g in inner for r in g.reasons)


class ClippedLayers(nn.Module):
    """Every parameter clipped in place in ``forward`` beside layers whose pruners do not
    label a tensor read outside them: instance and group norms with affine (``kind="norms"``),
    a layer norm, multi-head attention and an LSTM (``"sequence"``)."""

    def __init__(self, kind: str = "norms", clip: bool = True) -> None:
        super().__init__()
        self.kind, self.clip = kind, clip
        if kind == "norms":
            self.a, self.n, self.b = nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8, affine=True), nn.Conv2d(8, 8, 3)
            self.g, self.c = nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 1)
        else:
            self.a, self.n = nn.Linear(5, 16), nn.LayerNorm(16)
            self.att, self.r, self.l = (
                nn.MultiheadAttention(16, 4, batch_first=True),
                nn.LSTM(16, 6, batch_first=True),
                nn.Linear(6, 3),
            )

    def forward(self, x):
        if self.clip:
            for p in self.parameters():
                p.data.clamp_(-0.5, 0.5)
        if self.kind == "norms":
            return self.c(self.g(self.b(self.n(self.a(x)).relu())).relu()).mean((2, 3))
        h = self.n(self.a(x))
        return self.l(self.r(self.att(h, h, h)[0])[0][:, -1])


@pytest.mark.parametrize("kind", ["norms", "sequence"])
def test_clipping_every_parameter_in_forward_frees_layers_that_do_not_label_outside_reads(kind):
    x = torch.randn(2, 3, 8, 8) if kind == "norms" else torch.randn(2, 4, 5)
    clipped = DependencyGraph(_seeded(lambda: ClippedLayers(kind)), x)
    plain = DependencyGraph(_seeded(lambda: ClippedLayers(kind, clip=False)), x)
    # "n.weight is used outside its module n, which a plugin claims" froze them before
    assert not any("used outside its module" in r for r in _reasons(clipped))
    assert [g.prunable for g in clipped.groups(prunable_only=True)] == [
        g.prunable for g in plain.groups(prunable_only=True)
    ]
    assert sum(g.prunable for g in clipped.groups(prunable_only=True)) == (12 if kind == "norms" else 10)
    small = _prune(_seeded(lambda: ClippedLayers(kind)), x).pruned
    unclipped = _prune(_seeded(lambda: ClippedLayers(kind, clip=False)), x).pruned
    assert count_params(small) == count_params(unclipped) < count_params(ClippedLayers(kind))


def test_a_norm_weight_returned_by_the_model_still_keeps_its_channels():
    class Returns(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.n, self.b = nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(self.n(self.a(x)).relu()), self.n.weight.clamp(0, 1)

    graph = DependencyGraph(_seeded(Returns), torch.randn(2, 5))
    assert not graph.groups(prunable_only=True)
    assert any("n.weight is used outside its module n" in r for r in _reasons(graph))
