"""Session 17 model coverage: one focused check per cause fixed (tiny configs, default suite)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_models_6 import groups_with, n_params, redrawn  # the session-16 tests' helpers
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.history import PruningHistory
from cleanai_core.testing import check_pruner


def replayed(model: nn.Module, history: PruningHistory) -> nn.Module:
    """The history through JSON, replayed on a copy of the unpruned model (what
    ``load_pruned`` does): no trace, the pruners see only the kept indices."""
    return PruningHistory.from_json(history.to_json()).replay(copy.deepcopy(model))


# -- grouped convs whose groups line up with attention heads (NextViT) ----------------------------


class HeadsAndGroups(nn.Module):
    """NextViT's mix in small: a stream of 16 channels read by an attention with heads of 4
    (timm ``EfficientAttention``) and by a multi-head conv attention whose grouped 3x3 conv
    has groups of 4 (``ConvAttention``), both added back to the stream."""

    def __init__(self) -> None:
        from timm.models.nextvit import ConvAttention, EfficientAttention

        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.attn = EfficientAttention(16, head_dim=4)
        self.mhca = ConvAttention(16, head_dim=4)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        x = x + self.attn(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        x = x + self.mhca(x)
        return self.head(x.mean((2, 3)))


def test_grouped_conv_prunes_whole_groups_where_its_channel_ties_collapse_the_stream():
    pytest.importorskip("timm.models.nextvit")
    torch.manual_seed(0)
    model, x = redrawn(HeadsAndGroups()), torch.randn(2, 3, 4, 4)
    graph = DependencyGraph(model, x)
    # channel j of every conv group met the heads' contiguous blocks: the stream (stem, q, k,
    # v, proj, the conv's input) was one unit, which a plan cannot prune (group sizes 1 / 4)
    (stream,) = groups_with(graph, "stem", "out")
    assert (stream.size, stream.prunable) == (4, 4)
    assert {"mhca.group_conv3x3:in", "mhca.group_conv3x3:out", "attn.q:out"} <= {
        f"{s.module}:{s.name}" for s in stream.slices
    }
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    assert (report.params_before, report.params_after) == (2067, 715)  # was 2067 -> 1635
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head])
    small = pruner.prune()
    conv = small.mhca.group_conv3x3
    assert (conv.in_channels, conv.out_channels, conv.groups) == (8, 8, 2)  # whole groups of 4
    assert small.attn.num_heads == 2 and small.attn.q.out_features == 8
    back = replayed(model, pruner.history)
    assert back.mhca.group_conv3x3.groups == 2
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


def test_grouped_conv_keeps_channel_ties_where_they_do_not_collapse():
    # a ResNeXt bottleneck: the grouped conv's inputs and outputs are free; channel j of every
    # group stays the unit (the group count is kept), as before
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(16, 5, 1)
    ).eval()
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    assert [(g.size, g.prunable) for g in groups_with(graph, "2", "in")] == [(4, 4)]
    assert [(g.size, g.prunable) for g in groups_with(graph, "2", "out")] == [(4, 4)]
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    assert (small[2].in_channels, small[2].out_channels, small[2].groups) == (8, 8, 4)


# -- channels along the length of a 1-kernel conv (CoaT's aggregate) ------------------------------


class ScaleAggregate(nn.Module):
    """CoaT's classification head in small: the class tokens of three scales stacked on dim 1
    and mixed by ``Conv1d(3, 1, 1)``; the channels run along the conv's length."""

    def __init__(self) -> None:
        super().__init__()
        self.scales = nn.ModuleList(nn.Linear(5, 8) for _ in range(3))
        self.aggregate = nn.Conv1d(3, 1, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.stack([f(x) for f in self.scales], dim=1)  # (B, 3, 8)
        return self.head(self.aggregate(x).squeeze(1))


def test_channels_pass_through_a_conv_that_maps_their_dimension_position_by_position():
    torch.manual_seed(0)
    model, x = ScaleAggregate().eval(), torch.randn(2, 5)
    graph = DependencyGraph(model, x)
    # "channels reach dim 1 of a consumer reading dim 2" froze the 8 channels of all three scales
    (tokens,) = groups_with(graph, "scales.0", "out")
    assert (tokens.size, tokens.prunable) == (8, 8)
    assert {"scales.1:out", "scales.2:out", "head:in"} <= {f"{s.module}:{s.name}" for s in tokens.slices}
    assert [(g.size, g.prunable) for g in groups_with(graph, "aggregate", "in")] == [(3, 0)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    assert (report.params_before, report.params_after) == (3 * 48 + 4 + 27, 3 * 24 + 4 + 15)
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    assert small.head.in_features == 4 and small.aggregate.weight.shape == (1, 3, 1)


def test_a_strided_or_wide_kernel_along_the_channels_still_freezes_them():
    torch.manual_seed(0)
    model = ScaleAggregate().eval()
    model.aggregate = nn.Conv1d(3, 1, 3, padding=1)  # mixes neighbouring channels: not position by position
    graph = DependencyGraph(model, torch.randn(2, 5))
    (tokens,) = groups_with(graph, "scales.0", "out")
    assert tokens.prunable == 0


def test_coat_parallel_blocks_prune_through_the_aggregate():
    timm = pytest.importorskip("timm")
    kwargs = {"img_size": 32, "embed_dims": (32,) * 4, "serial_depths": (1,) * 4, "parallel_depth": 1}
    torch.manual_seed(0)
    model = timm.create_model("coat_tiny", num_classes=3, num_heads=8, mlp_ratios=(2,) * 4, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-4
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    # was 71303 -> 54907 (the stream froze), 28639 with the heads whole before session 19 (test_models_9)
    assert (n_params(model), n_params(small)) == (71303, 22779)
    assert small.head.in_features < 32
    with torch.no_grad():
        assert small(x).shape == (2, 3)


# -- RAFT-Small's unequal context split -----------------------------------------------------------


def test_raft_small_context_split_prunes_both_parts():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.optical_flow.raft_small(weights=None).eval()
    x = (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))  # the smallest it takes

    def flow(m, x):
        return m(*x, num_flow_updates=1)[-1]

    graph = DependencyGraph(model, x, forward_fn=flow)
    # the context encoder's 160 channels split into [hidden_state_size=96, 64]: the unequal parts
    # froze; now the hidden state and the context are two groups
    parts = groups_with(graph, "context_encoder.conv", "out")
    assert [(g.size, g.prunable) for g in parts] == [(96, 96), (64, 64)]
    report = check_pruner(model, x, forward_fn=flow)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-4
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, forward_fn=flow)
    small = pruner.prune()
    assert small.context_encoder.conv.out_channels == 48 + 32
    assert small.update_block.hidden_state_size == small.update_block.recurrent_block.hidden_size == 48
    assert (n_params(model), n_params(small)) == (990162, 258666)  # was 990162 -> 655850 (0.66)
    back = replayed(model, pruner.history)
    with torch.no_grad():
        assert torch.equal(flow(back, x), flow(small, x))


# -- cascaded group attention (EfficientViT-M) ----------------------------------------------------


class Cascaded(nn.Module):
    """A stream of 16 channels and timm's ``CascadedGroupAttention`` with 2 heads: keys of 4,
    values of 8 (each head's chunk of the stream), a 3 x 3 window."""

    def __init__(self) -> None:
        from timm.models.efficientvit_msra import CascadedGroupAttention

        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.attn = CascadedGroupAttention(16, key_dim=4, num_heads=2, attn_ratio=2, resolution=3, kernels=(3, 3))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        return self.head((x + self.attn(x)).mean((2, 3)))


def test_cascaded_group_attention_prunes_keys_values_and_the_stream(tmp_path):
    pytest.importorskip("timm.models.efficientvit_msra")
    torch.manual_seed(0)
    model, x = redrawn(Cascaded()), torch.randn(2, 3, 3, 3)
    graph = DependencyGraph(model, x)
    # qkvs[i] splits into [4, 4, 8]: unequal parts froze q, k and v, and head 0's values
    # added to chunk 1 froze the stream (nothing at all could be pruned)
    assert [(g.size, g.prunable) for g in groups_with(graph, "stem", "out")] == [(8, 8)]
    assert [(g.size, g.prunable) for g in groups_with(graph, "attn.dws.1.conv", "in")] == [(4, 4)]
    report = check_pruner(model, x, ratio=0.3)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head])
    small = pruner.prune()
    attn = small.attn
    assert type(attn).__name__ == "PrunedCascadedGroupAttention"
    assert [q.conv.out_channels for q in attn.qkvs] == [2 + 2 + 4, 2 + 2 + 4] and small.stem.out_channels == 8
    assert (n_params(model), n_params(small)) == (829, 297)  # was: "nothing in this model can be pruned"
    back = replayed(model, pruner.history)
    again_small = StructuredPruner(small, x, "magnitude", pruning_ratio=0.5, ignored_layers=[small.head]).prune()
    assert [q.conv.out_channels for q in again_small.attn.qkvs] == [1 + 1 + 2, 1 + 1 + 2]  # a second cut
    torch.save(small, tmp_path / "m.pt")  # the pruned class is found by its module and name
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(x), small(x)) and torch.equal(again(x), small(x))


# -- single-head attention over a part of the channels (SHViT) ------------------------------------


class PartialAttention(nn.Module):
    """A stream of 16 channels and timm's ``SHSA``: the first 6 attended (q and k of 4, values
    of 6), the other 10 passed to ``proj`` as they are."""

    def __init__(self) -> None:
        from timm.models.shvit import SHSA

        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.attn = SHSA(16, qk_dim=4, pdim=6)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        return self.head((x + self.attn(x)).mean((2, 3)))


def test_partial_attention_prunes_its_part_keys_and_values_apart(tmp_path):
    pytest.importorskip("timm.models.shvit")
    torch.manual_seed(0)
    model, x = redrawn(PartialAttention()), torch.randn(2, 3, 3, 3)
    graph = DependencyGraph(model, x)
    # split [6, 10] and [4, 4, 6]: the unequal parts froze the attended part, q, k and v
    assert [(g.size, g.prunable) for g in groups_with(graph, "attn.qkv.c", "in")] == [(6, 6)]
    assert sorted((g.size, g.prunable) for g in groups_with(graph, "attn.qkv.c", "out")) == [(4, 4), (6, 6)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head])
    small = pruner.prune()
    attn = small.attn
    assert type(attn).__name__ == "PrunedSHSA"
    assert (attn.pdim, attn.qk_dim, attn.v_dim, small.stem.out_channels) == (3, 2, 3, 8)
    assert (n_params(model), n_params(small)) == (527, 180)  # was: "nothing in this model can be pruned"
    back = replayed(model, pruner.history)
    twice = StructuredPruner(small, x, "magnitude", pruning_ratio=0.5, ignored_layers=[small.head]).prune().attn
    assert (twice.pdim, twice.qk_dim, twice.v_dim) == (2, 1, 2)  # a second cut
    torch.save(small, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(x), small(x)) and torch.equal(again(x), small(x))


# -- differential attention (timm vit_dwee / vit_dpwee) -------------------------------------------

DIFF = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.mark.parametrize(
    "name,stream_units,before,after",
    # was 21,779 -> 16,563 and 21,651 -> 16,435: only the MLPs' hidden units went; since session 19
    # DiffAttention's output reshape reads its width from the heads, so its stream prunes channel by
    # channel (test_models_9), the parallel block's still by whole heads
    [("vit_dwee_patch16_reg1_gap_256", 32, 21779, 7315), ("vit_dpwee_patch16_reg1_gap_256", 2, 21651, 7251)],
    ids=["attention", "parallel_block"],
)
def test_differential_attention_prunes_whole_heads(tmp_path, name, stream_units, before, after):
    timm = pytest.importorskip("timm")
    from cleanai_core import load_pruned
    from cleanai_core.io import save_pruned

    torch.manual_seed(0)
    model = redrawn(timm.create_model(name, num_classes=3, **DIFF))
    x = torch.randn(2, 3, 32, 32)
    # (2 * heads) sub-heads unbound as (heads, 2): the pair dimension kept the channels and
    # the unbind froze the stream with every head
    (stream,) = groups_with(DependencyGraph(model, x), "patch_embed.proj", "out")
    assert (stream.size, stream.prunable) == (stream_units, stream_units)  # 2: two heads of 16 channels
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    attn = small.blocks[0] if "dpwee" in name else small.blocks[0].attn
    assert attn.num_heads == 1 and small.patch_embed.proj.out_channels == 16
    assert (n_params(model), n_params(small)) == (before, after)
    save_pruned(tmp_path / "d", small, pruner.history, f"timm:{name}", {"num_classes": 3, "model_kwargs": DIFF})
    back = load_pruned(tmp_path / "d", trust_code=True)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


# -- InceptionNeXt's unequal branches -------------------------------------------------------------


class InceptionBranches(nn.Module):
    """A stream of 16 channels through timm's ``InceptionDWConv2d`` with branches of 2
    (``split_indexes`` (10, 2, 2, 2)), added back."""

    def __init__(self) -> None:
        from timm.models.inception_next import InceptionDWConv2d

        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.mixer = InceptionDWConv2d(16, band_kernel_size=3, branch_ratio=0.125)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        return self.head((x + self.mixer(x)).mean((2, 3)))


def test_inception_depthwise_branches_of_unequal_width_prune_apart(tmp_path):
    pytest.importorskip("timm.models.inception_next")
    torch.manual_seed(0)
    model, x = InceptionBranches().eval(), torch.randn(2, 3, 5, 5)
    graph = DependencyGraph(model, x)
    # split (10, 2, 2, 2): the unequal parts froze the whole stream; now each part is a group
    parts = sorted((g.size, g.prunable) for g in groups_with(graph, "stem", "out"))
    assert parts == [(2, 2), (2, 2), (2, 2), (10, 10)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head])
    small = pruner.prune()
    assert type(small.mixer).__name__ == "PrunedInceptionDWConv2d" and small.stem.out_channels == 8
    assert sum(c.in_channels for c in (small.mixer.dwconv_hw, small.mixer.dwconv_w, small.mixer.dwconv_h)) < 6
    assert (n_params(model), n_params(small)) == (151, 77)  # was: "nothing in this model can be pruned"
    back = replayed(model, pruner.history)
    torch.save(small, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(x), small(x)) and torch.equal(again(x), small(x))


# -- single-head attention through SDPA's default scale (iFormer) ---------------------------------


class SingleHead(nn.Module):
    """A stream of 16 channels and timm's ``SHMA`` (q and k of 8 channels, one head, through
    ``F.scaled_dot_product_attention`` with its default scale ``1 / sqrt(8)``)."""

    def __init__(self) -> None:
        from timm.models.iformer import SHMA

        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.attn = SHMA(16)
        self.attn.fused_attn = True
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        return self.head((x + self.attn(x)).mean((2, 3)))


def test_sdpa_default_scale_lets_q_and_k_shrink_where_the_module_stores_its_scale():
    pytest.importorskip("timm.models.iformer")
    torch.manual_seed(0)
    model, x = redrawn(SingleHead()), torch.randn(2, 3, 3, 3)
    graph = DependencyGraph(model, x)
    # "attention scale depends on the head size" froze q and k
    assert [(g.size, g.prunable) for g in groups_with(graph, "attn.q.c", "out")] == [(8, 8)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head]).prune()
    assert small.attn.q.c.out_channels == small.attn.k.c.out_channels == 4
    assert small.attn.fused_attn is False and small.attn.scale == 8**-0.5  # the trained scale, explicitly
    assert (n_params(model), n_params(small)) == (1267, 379)  # was 1267 -> 459


# -- a classifier head with a norm on its input (RepViT, iFormer, EfficientViT-M) -----------------


class NormHeadNet(nn.Module):
    """A timm-style model whose ``get_classifier()`` is ``BatchNorm1d`` + ``Linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU())
        self.head = nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 5))

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_a_norm_in_the_classifier_head_does_not_freeze_the_features():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model, x = redrawn(NormHeadNet()), torch.randn(2, 3, 6, 6)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    # ignoring the whole head froze the 16 features its BatchNorm reads ("ignored layer head.0")
    (features,) = groups_with(pruner.graph, "features.2", "out")
    assert (features.size, features.prunable) == (16, 16)
    small = pruner.prune()
    assert small.head[1].out_features == 5 and small.head[0].num_features == small.head[1].in_features == 8
    assert (n_params(model), n_params(small)) == (837, 357)  # was 837 -> 485
