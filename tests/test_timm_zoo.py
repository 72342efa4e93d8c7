"""timm model patterns that need the zoo plugin (``cleanai_plugins/zoo/timm/``): a
hand-written module with the pattern, then the smallest timm model that has it."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from cleanai_core import hookimpl
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.testing import check_pruner, masked_forward, random_units, run_model, temporary_plugin
from cleanai_plugins.mappers.shape import allow_channel_ranges


def groups_with(graph: DependencyGraph, module: str, slice_name: str):
    return [g for g in graph.groups() if any(s.module == module and s.name == slice_name for s in g.slices)]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class GatedConv(nn.Module):
    """The pattern of timm's MambaOut ``GatedConvBlock``: ``fc1`` split into unequal parts
    ``(hidden, hidden - conv, conv)``, a depthwise conv on the last part."""

    def __init__(self, dim: int = 8, hidden: int = 21, conv: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.split_indices = (hidden, hidden - conv, conv)
        self.conv = nn.Conv2d(conv, conv, 3, padding=1, groups=conv)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):  # (B, H, W, C)
        g, i, c = torch.split(self.fc1(x), self.split_indices, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.fc2(self.act(g) * torch.cat((i, c), dim=-1))


def between(**layers: nn.Module) -> nn.Sequential:
    """``layers`` in a row, under their names (``stem``, ``block``, ``head``...)."""
    return nn.Sequential(OrderedDict(layers))


def GatedNet() -> nn.Sequential:  # noqa: N802 - used like the classes around it
    return between(stem=nn.Linear(4, 8), block=GatedConv(), head=nn.Linear(8, 3))


def test_gated_conv_block_prunes_gate_pairs_and_conv_channels():
    torch.manual_seed(0)
    model, x = GatedNet().eval(), torch.randn(2, 5, 5, 4)
    graph = DependencyGraph(model, x)
    gated = groups_with(graph, "block.fc1", "out")
    # gate j goes with channel j of cat(i, conv(c)): 13 plain pairs, 8 through the depthwise conv
    assert sorted((g.size, g.prunable) for g in gated) == [(8, 8), (13, 13)]  # (units, prunable units)
    conv_group = next(g for g in gated if g.size == 8)
    assert {(s.module, s.name) for s in conv_group.slices} >= {("block.conv", "in"), ("block.conv", "out")}
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    # stream 8 -> 4, hidden 21 -> 11 (13 -> 7 plain, 8 -> 4 conv)
    d, h, c = 4, 11, 4
    expected = (4 * d + d) + (d * 2 * h + 2 * h) + (c * 9 + c) + (h * d + d) + (d * 3 + 3)
    assert report.params_after == expected


def test_gated_conv_block_split_sizes_follow_the_slicing():
    from cleanai_core import StructuredPruner

    torch.manual_seed(0)
    model, x = GatedNet().eval(), torch.randn(2, 5, 5, 4)
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head]).prune()
    block = small.block
    assert block.split_indices == (block.fc2.in_features, block.fc2.in_features - block.conv.in_channels, 4)
    assert block.fc1.out_features == 2 * block.fc2.in_features < 42
    assert small(x).shape == (2, 5, 5, 3)


def test_mambaout_femto_hidden_units_prune():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model, x = timm.create_model("mambaout_femto", num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    graph = DependencyGraph(model, x)
    gated = groups_with(graph, "stages.3.blocks.2.fc1", "out")
    assert [(g.size, g.prunable) for g in gated] == [(288, 288), (480, 480)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-4
    assert report.params_before == n_params(model) == 6_163_066
    # the residual stream is LayerNorm-normalised, left out of the exact oracle: before the
    # gated hidden units could prune, nothing else did (6,163,066 kept)
    assert report.params_after == 3_618_730


def moved_by_masking(graph: DependencyGraph, x: torch.Tensor) -> float:
    """How far check_pruner's masking moves the output: the oracle proves something."""
    pruned = random_units(graph, 0.5, torch.Generator().manual_seed(0), exclude_normalized=True)
    masked, base = masked_forward(graph, pruned, x), run_model(graph.model, x)
    return max(float((a - b).abs().max()) for a, b in zip(masked, base, strict=True))


class DualPath(nn.Module):
    """The pattern of timm's DPN ``DualPathBlock``: the first ``num_1x1_c`` channels of the
    input (or its projection) and of ``c1x1_c``'s output are a residual part, added; the
    rest are dense parts, concatenated."""

    def __init__(self, cin: int, c: int, inc: int, proj: bool) -> None:
        super().__init__()
        self.num_1x1_c = c
        self.c1x1_w = nn.Conv2d(cin, c + 2 * inc, 1) if proj else None
        self.c1x1_a = nn.Conv2d(cin, 5, 1)
        self.c3x3_b = nn.Conv2d(5, 5, 3, padding=1)
        self.c1x1_c = nn.Conv2d(5, c + inc, 1)

    def forward(self, x):
        x_s = x if self.c1x1_w is None else self.c1x1_w(x)
        x_s1, x_s2 = x_s[:, : self.num_1x1_c], x_s[:, self.num_1x1_c :]
        x = self.c1x1_c(torch.relu(self.c3x3_b(torch.relu(self.c1x1_a(x)))))
        out1, out2 = x[:, : self.num_1x1_c], x[:, self.num_1x1_c :]
        return torch.cat([x_s1 + out1, x_s2, out2], dim=1)


class DualPathNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = DualPath(8, 6, 2, proj=True)  # out: 6 residual + 2 * 2 + 2 dense = 12
        self.block2 = DualPath(12, 6, 2, proj=False)  # out: 6 + 6 + 2 = 14
        self.head = nn.Linear(14, 3)

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))).mean((2, 3)))


def test_dual_path_block_residual_and_dense_parts_prune():
    torch.manual_seed(0)
    model, x = DualPathNet().eval(), torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    assert not [r for _, r in graph.ctx.frozen if "fixed range" in r]
    # the residual part: both projections' first 6 channels and both c1x1_c's, added together
    residual = next(g for g in groups_with(graph, "block2.c1x1_c", "out") if g.size == 6)
    assert residual.prunable == 6
    assert {(s.module, s.name) for s in residual.slices} >= {("block1.c1x1_w", "out"), ("block1.c1x1_c", "out")}
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    assert moved_by_masking(graph, x) > 1e-3
    # stem 8 -> 4, residual 6 -> 3, dense parts 4 -> 2 (block1's projection) and 2 -> 1 (each c1x1_c), inner 5 -> 3
    stem, b1 = 4 * 3 * 9 + 4, (5 * 4 + 5) + (3 * 4 + 3) + (3 * 3 * 9 + 3) + (4 * 3 + 4)
    b2, head = (3 * 6 + 3) + (3 * 3 * 9 + 3) + (4 * 3 + 4), 7 * 3 + 3
    assert report.params_after == stem + b1 + b2 + head == 397


def test_dual_path_block_bounds_follow_the_slicing():
    from cleanai_core import StructuredPruner

    torch.manual_seed(0)
    model, x = DualPathNet().eval(), torch.randn(2, 3, 6, 6)
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head]).prune()
    for block in (small.block1, small.block2):
        assert block.num_1x1_c == block.c1x1_c.out_channels - 1 == 3  # residual 6 -> 3, dense 2 -> 1
    assert small.block1.c1x1_w.out_channels == 3 + 2
    assert small.head.in_features == 3 + (2 + 1) + 1  # residual, block1's dense parts, block2's
    assert small(x).shape == (2, 3)


def test_dpn68_residual_and_dense_parts_prune():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model, x = timm.create_model("dpn68", num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    graph = DependencyGraph(model, x)
    assert not [r for _, r in graph.ctx.frozen if "fixed range" in r]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-7  # random-init outputs are ~0.04
    assert moved_by_masking(graph, x) > 1e-3
    assert report.params_before == 11_786_932
    assert report.params_after == 2_965_167  # was 5.7M with the fixed slices frozen


class Halves(nn.Module):
    """Fixed channel ranges taken with ``narrow`` and a slice, bounds in ``self.n``."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 4
        self.a = nn.Conv2d(3, 10, 1)
        self.b = nn.Conv2d(4, 5, 1)
        self.c = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y.narrow(1, 0, self.n)) + self.c(y[:, self.n :])


class LiteralHalves(Halves):
    """``Halves`` with literal bounds: nothing in the module says where they come from (a
    module that also held 4 in an attribute would have it taken for the bound)."""

    def __init__(self) -> None:
        super().__init__()
        del self.n

    def forward(self, x):
        y = self.a(x)
        return self.b(y.narrow(1, 0, 4)) + self.c(y[:, 4:])


class HalvesFixup:
    """A plugin that vouches for ``Halves``' slices and rewrites ``n`` after slicing."""

    @hookimpl
    def cleanai_prepare_model(self, model):
        return allow_channel_ranges(*(m for m in model.modules() if isinstance(m, Halves)))

    @hookimpl
    def cleanai_after_prune(self, module, name, edits):
        keep = edits.get((f"{name}.a" if name else "a", "out"))
        if isinstance(module, Halves) and keep is not None:
            module.n = int((keep < module.n).sum())


def test_allow_channel_ranges_needs_the_module_to_vouch():
    torch.manual_seed(0)
    model, x = Halves().eval(), torch.randn(2, 3, 4, 4)
    # unvouched, constant bounds pin the channels before ``n`` (which ``y[:, n:]`` and the
    # narrow read by position); those after it may still go (they froze too before 2026-12-01).
    # Bounds in an attribute (``self.n``) follow the pruning without a plugin since session 25
    # (a ``count`` slice: tests/test_models_17.py), so the literal spelling shows the pin
    literal = LiteralHalves().eval()
    assert [(g.size, g.prunable) for g in groups_with(DependencyGraph(literal, x), "a", "out")] == [(4, 0), (6, 6)]
    with temporary_plugin(HalvesFixup(), name="halves"):
        graph = DependencyGraph(model, x)
        assert [(g.size, g.prunable) for g in groups_with(graph, "a", "out")] == [(4, 4), (6, 6)]
        report = check_pruner(model, x, ratio=0.5)
        assert moved_by_masking(graph, x) > 1e-3
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    assert report.params_after == (5 * 3 + 5) + (5 * 2 + 5) + (5 * 3 + 5)  # a: 4 -> 2, 6 -> 3 (b, c make the output)


class FactorAttention(nn.Module):
    """CoaT's factorised attention with a conv relative position encoding, in small:
    ``q @ (softmax(k)^T @ v)`` (both operands of ``k^T @ v`` carry head dims), plus
    ``q * dwconv(v)`` with the heads split into unequal groups, one conv per group."""

    def __init__(self, dim: int = 12, heads: int = 3, splits: tuple[int, ...] = (1, 2)) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.crpe = RelPosConv(self.head_dim, splits)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        factor = q @ (k.softmax(dim=2).transpose(-1, -2) @ v)
        x = (0.5 * factor + self.crpe(q, v)).transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


class RelPosConv(nn.Module):
    def __init__(self, head_dim: int, splits: tuple[int, ...]) -> None:
        super().__init__()
        self.head_splits = list(splits)
        self.channel_splits = [s * head_dim for s in splits]
        self.conv_list = nn.ModuleList(nn.Conv2d(n, n, 3, padding=1, groups=n) for n in self.channel_splits)

    def forward(self, q, v):
        B, h, N, C = q.shape
        side = int(N**0.5)
        v = v.transpose(-1, -2).reshape(B, h * C, side, side)
        parts = torch.split(v, self.channel_splits, dim=1)
        v = torch.cat([conv(p) for conv, p in zip(self.conv_list, parts, strict=True)], dim=1)
        return q * v.reshape(B, h, C, N).transpose(-1, -2)


def FactorNet() -> nn.Sequential:  # noqa: N802 - used like the classes around it
    return between(embed=nn.Linear(5, 12), attn=FactorAttention(), head=nn.Linear(12, 3))


def test_factorised_attention_and_conv_rel_pos_prune_whole_heads():
    torch.manual_seed(0)
    model, x = FactorNet().eval(), torch.randn(2, 16, 5)
    graph = DependencyGraph(model, x)
    assert not [r for _, r in graph.ctx.frozen if "both operands" in r or "unequal" in r]
    # whole heads (4 dims each) through qkv, each window group's conv, and proj
    assert [(g.size, g.prunable) for g in groups_with(graph, "attn.qkv", "out")] == [(1, 1), (2, 2)]
    assert [(g.size, g.prunable) for g in groups_with(graph, "attn.crpe.conv_list.1", "in")] == [(2, 2)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    assert moved_by_masking(graph, x) > 1e-3
    # embed and proj outputs 12 -> 6; heads 3 -> 2 (the first window group keeps its only head)
    embed, qkv, convs, proj, head = 5 * 6 + 6, 6 * 24 + 24, 2 * (4 * 9 + 4), 8 * 6 + 6, 6 * 3 + 3
    assert (report.params_before, report.params_after) == (855, embed + qkv + convs + proj + head) == (855, 359)


def test_conv_rel_pos_splits_follow_the_slicing():
    from cleanai_core import StructuredPruner

    torch.manual_seed(0)
    model, x = FactorNet().eval(), torch.randn(2, 16, 5)
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    crpe = small.attn.crpe
    assert crpe.channel_splits == [c.in_channels for c in crpe.conv_list]
    assert sum(crpe.channel_splits) == small.attn.qkv.out_features // 3 < 12
    assert small(x).shape == (2, 16, 3)


class SeparateHeads(nn.Module):
    """EfficientFormer-V2's attention, in small: q, k and v reshaped apart with one
    ``num_heads``, a talking-heads conv between ``q @ k`` and ``attn @ v``."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.num_heads = heads
        self.q, self.k, self.v = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)
        self.talking_head = nn.Conv2d(heads, heads, 1)
        self.proj = nn.Conv2d(dim, 3, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q = self.q(x).reshape(B, self.num_heads, -1, H * W).permute(0, 1, 3, 2)
        k = self.k(x).reshape(B, self.num_heads, -1, H * W)
        v = self.v(x).reshape(B, self.num_heads, -1, H * W).permute(0, 1, 3, 2)
        attn = self.talking_head(q @ k).softmax(dim=-1)
        return self.proj((attn @ v).transpose(2, 3).reshape(B, -1, H, W))


def test_value_split_alone_keeps_its_head_count():
    """``attn @ v`` with heads on ``attn`` and head dims on ``v``: v's own split must not
    switch to whole heads while q and k (reshaped elsewhere with the same ``num_heads``)
    keep theirs, or the pruned model's reshapes disagree."""
    torch.manual_seed(0)
    model, x = SeparateHeads().eval(), torch.randn(2, 8, 3, 3)
    graph = DependencyGraph(model, x)
    assert [(g.size, g.prunable) for g in groups_with(graph, "v", "out")] == [(4, 4)]  # head dims, tied over heads
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5


def PartialConvNet():  # noqa: N802 - used like the classes around it
    from timm.models.fasternet import Partial_conv3

    return between(
        stem=nn.Conv2d(3, 16, 3, padding=1),
        mix=Partial_conv3(16, 4, "split_cat"),  # split(x, [4, 12]): a 3x3 conv on the first 4
        mlp=nn.Conv2d(16, 8, 1),
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        head=nn.Linear(8, 3),
    )


def test_fasternet_partial_conv_prunes_both_parts_and_splits_at_the_kept_width():
    pytest.importorskip("timm.models.fasternet")
    from cleanai_core import StructuredPruner

    torch.manual_seed(0)
    model, x = PartialConvNet().eval(), torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    # the unequal split froze the 16 stem channels ("splits channels into unequal parts")
    assert sorted((g.size, g.prunable) for g in groups_with(graph, "stem", "out")) == [(4, 4), (12, 12)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    # stem 16 -> 2 + 6, the partial conv 4 -> 2 (in and out), mlp 8 -> 4
    assert report.params_after == (8 * 27 + 8) + 2 * 2 * 9 + (4 * 8 + 4) + (4 * 3 + 3)
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head]).prune()
    assert (small.mix.dim_conv3, small.mix.partial_conv3.in_channels, small.stem.out_channels) == (2, 2, 8)
    with torch.no_grad():
        assert small(x).shape == (2, 3)


def test_fasternet_t0_prunes_a_quarter_and_reloads(tmp_path):
    timm = pytest.importorskip("timm")
    from cleanai_core import StructuredPruner, load_pruned
    from cleanai_core.io import save_pruned

    torch.manual_seed(0)
    model, x = timm.create_model("fasternet_t0", num_classes=10).eval(), torch.randn(2, 3, 64, 64)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert n_params(model) == 2_637_310
    assert n_params(small) / n_params(model) < 0.26  # was 0.53: every partial conv's input froze
    save_pruned(tmp_path / "f", small, pruner.history, "timm:fasternet_t0", {"num_classes": 10})
    back = load_pruned(tmp_path / "f")
    assert type(back.stages[1].blocks[0].spatial_mixing).__name__ == "PrunedPartialConv"
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


def HaloNet():  # noqa: N802 - used like the classes around it
    from timm.layers.halo_attn import HaloAttn

    torch.manual_seed(0)
    attn = HaloAttn(16, 16, num_heads=2, block_size=4, halo_size=1)
    with torch.no_grad():  # timm draws the position tables tiny: make them count
        attn.pos_embed.height_rel.normal_()
        attn.pos_embed.width_rel.normal_()
    return between(
        stem=nn.Conv2d(3, 16, 3, padding=1),
        attn=attn,
        proj=nn.Conv2d(16, 8, 1),
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        head=nn.Linear(8, 3),
    )


def test_halo_attention_keys_and_values_over_unfolded_windows_prune():
    pytest.importorskip("timm.layers.halo_attn")
    from cleanai_core import StructuredPruner

    model, x = HaloNet().eval(), torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    # channel j of every head: q, k, v, both position tables, the output; the keys and
    # values reach the attention through ``Tensor.unfold`` (it froze them: "channels reach
    # op aten.unfold.default, which ignored them")
    (heads,) = groups_with(graph, "attn.q", "out")
    assert (heads.size, heads.prunable) == (8, 8)
    assert {"attn.kv", "attn.pos_embed.height_rel", "proj"} <= set(heads.modules())
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    assert moved_by_masking(graph, x) > 1e-3
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head]).prune()
    a = small.attn
    assert (a.num_heads, a.dim_head_qk, a.dim_head_v, a.pos_embed.dim_head) == (2, 4, 4, 4)
    assert a.q.out_channels == 8 and a.kv.out_channels == 16 and small(x).shape == (2, 3)


def SplitScaleNet(dim: int = 10, scales: int = 3):  # noqa: N802 - used like the classes around it
    """timm's EdgeNeXt ``SplitTransposeBlock``: ``chunk(3)`` of 10 channels is 4, 4, 2."""
    from timm.models.edgenext import SplitTransposeBlock

    torch.manual_seed(0)
    block = SplitTransposeBlock(dim, num_scales=scales, num_heads=dim, ls_init_value=1.0)
    return between(
        stem=nn.Conv2d(3, dim, 3, padding=1),
        block=block,
        proj=nn.Conv2d(dim, 8, 1),
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        head=nn.Linear(8, 3),
    )


def test_edgenext_uneven_chunk_prunes_and_splits_at_the_kept_width():
    pytest.importorskip("timm.models.edgenext")
    from cleanai_core import StructuredPruner

    model, x = SplitScaleNet().eval(), torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    # chunk(3) of 10 channels splits at 4 and 8; after pruning it would split elsewhere, so the
    # 10 stem channels froze. Now parts 0 and 1 shrink together (the adds pair channel j and 4 + j)
    # and the last part on its own: units {0, 4} .. {3, 7}, {8}, {9}
    stem = groups_with(graph, "stem", "out")
    assert sum(g.size for g in stem) == 6 and sum(g.prunable for g in stem) == 6
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head]).prune()
    block = small.block
    assert type(block).__name__ == "PrunedSplitTransposeBlock"
    assert block.width == block.convs[0].in_channels == 2 and small.stem.out_channels == 5
    with torch.no_grad():
        assert small(x).shape == (2, 3)


def test_edgenext_small_stage_with_uneven_chunks_prunes_and_reloads(tmp_path):
    timm = pytest.importorskip("timm")
    from cleanai_core import StructuredPruner, load_pruned
    from cleanai_core.io import save_pruned

    torch.manual_seed(0)
    model, x = timm.create_model("edgenext_small", num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    stage = model.stages[2]  # 160 channels, chunk(3): 54, 54, 52
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert stage.downsample[1].out_channels == 160
    assert small.stages[2].downsample[1].out_channels < 160  # was 160: the uneven chunk froze the stage
    kept = n_params(small) / n_params(model)
    assert kept < 0.36  # was 0.38
    save_pruned(tmp_path / "e", small, pruner.history, "timm:edgenext_small", {"num_classes": 10})
    back = load_pruned(tmp_path / "e")
    assert type(back.stages[2].blocks[-1]).__name__ == "PrunedSplitTransposeBlock"
    with torch.no_grad():
        assert small(x).shape == (1, 10) and torch.equal(back(x), small(x))


class LevitAttentions(nn.Module):
    """timm LeViT's attention and its downsampling attention (``view(B, N, heads, -1).split(
    [key_dim, key_dim, val_dim])``, ``key_dim != val_dim``); ``side`` 2 leaves one token after
    the downsampling, as LeViT's last stage at 64 px."""

    def __init__(self, side: int, conv: bool = False) -> None:
        from timm.models.levit import Attention, AttentionDownsample

        super().__init__()
        self.side, self.conv = side, conv
        self.stem = nn.Linear(6, 16)
        self.attn = Attention(16, key_dim=4, num_heads=4, attn_ratio=2, resolution=side, use_conv=conv)
        self.down = AttentionDownsample(16, 24, key_dim=4, num_heads=3, attn_ratio=2, stride=2, resolution=side)
        self.head = nn.Linear(24, 3)
        torch.manual_seed(1)
        with torch.no_grad():  # timm zero-initialises the projections' BatchNorm and the biases
            for p in self.parameters():
                p.normal_(0, 0.5)

    def forward(self, x):  # (B, side * side, 6)
        x = self.stem(x)
        if self.conv:
            b, n, c = x.shape
            x = self.attn(x.transpose(1, 2).reshape(b, c, self.side, self.side)).flatten(2).transpose(1, 2)
        else:
            x = self.attn(x)
        return self.head(self.down(x)).mean(1)


@pytest.mark.parametrize("side, conv", [(4, False), (2, False), (4, True)], ids=["linear", "one-token", "conv"])
def test_levit_attention_with_uneven_head_parts_prunes_whole_heads(side, conv):
    pytest.importorskip("timm.models.levit")
    from cleanai_core import StructuredPruner

    model, x = LevitAttentions(side, conv).eval(), torch.randn(2, side * side, 6)
    graph = DependencyGraph(model, x)
    # channel j of every head met an unequal split and froze (0 prunable); now the heads go whole
    assert [(g.size, g.prunable) for g in groups_with(graph, "attn.qkv.linear", "out")] == [(4, 4)]
    # one token left (side 2) took the (B, 1, C) output for a single head: the residual froze
    assert [(g.size, g.prunable) for g in groups_with(graph, "down.kv.linear", "out")] == [(3, 3)]
    assert [(g.size, g.prunable) for g in groups_with(graph, "down.proj.ln.linear", "out")] == [(24, 24)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-4
    assert report.params_after < 0.5 * report.params_before
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    attn, down = small.attn, small.down
    assert (attn.num_heads, attn.val_attn_dim, attn.key_attn_dim) == (2, 16, 8)
    assert (down.num_heads, down.val_attn_dim) == (2, 16)  # 3 heads: round(1.5) went
    with torch.no_grad():
        assert small(x).shape == (2, 3)


def test_levit_128s_prunes_a_quarter():
    timm = pytest.importorskip("timm")
    from cleanai_core import StructuredPruner

    torch.manual_seed(0)
    model = timm.create_model("levit_128s", num_classes=10, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    assert n_params(small) / n_params(model) < 0.27  # was 0.35
    assert small.stages[2].blocks[0].attn.num_heads == 4  # of 8
    with torch.no_grad():
        assert small(x).shape == (1, 10)


def EvoGroupedNet():  # noqa: N802 - used like the classes around it
    """timm RegNetZ-EvoNorm's bottleneck: a grouped 3x3 conv of fixed group width (4 groups
    of 4) between EvoNorm-S norms of 2 groups (8 channels each)."""
    from timm.layers import ConvNormAct, EvoNorm2dS0a

    torch.manual_seed(0)
    norm = lambda c, **kw: EvoNorm2dS0a(c, groups=2, **kw)  # noqa: E731
    model = between(
        stem=nn.Conv2d(3, 16, 1),
        stem_norm=EvoNorm2dS0a(16, groups=2),
        grouped=ConvNormAct(16, 16, 3, groups=4, norm_layer=norm),
        proj=nn.Conv2d(16, 8, 1),
        pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(),
        head=nn.Linear(8, 3),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5).abs_() if p.ndim == 1 else p.normal_(0, 0.5)
    return model


def test_grouped_conv_between_evonorms_prunes_whole_groups():
    pytest.importorskip("timm.layers")
    from cleanai_core import StructuredPruner

    model, x = EvoGroupedNet().eval(), torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    # EvoNorm kept whole norm groups and the conv channel j of every conv group: one unit, 0 pruned
    # (0 prunable where it was the only unit); now a unit is a norm group of 2 conv groups
    assert [(g.size, g.prunable) for g in groups_with(graph, "stem", "out")] == [(2, 2)]
    assert [(g.size, g.prunable) for g in groups_with(graph, "grouped.conv", "out")] == [(2, 2)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head]).prune()
    conv = small.grouped.conv
    assert (conv.in_channels, conv.out_channels, conv.groups, conv.weight.shape[1]) == (8, 8, 2, 4)
    assert (small.stem_norm.groups, small.grouped.bn.groups) == (1, 1)
    with torch.no_grad():
        assert small(x).shape == (2, 3)


def test_regnetz_evonorm_prunes_whole_conv_groups_and_reloads(tmp_path):
    timm = pytest.importorskip("timm")
    from cleanai_core import StructuredPruner, load_pruned
    from cleanai_core.io import save_pruned

    torch.manual_seed(0)
    model, x = timm.create_model("regnetz_b16_evos", num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    conv = small.stages[1][0].conv2_kxk.conv  # 144 channels in 9 groups of 16
    assert conv.groups < 9 and conv.in_channels == 16 * conv.groups and conv.weight.shape[1] == 16
    assert n_params(small) / n_params(model) < 0.31  # was 0.58
    save_pruned(tmp_path / "r", small, pruner.history, "timm:regnetz_b16_evos", {"num_classes": 10})
    back = load_pruned(tmp_path / "r")
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
