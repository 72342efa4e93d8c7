"""Session 16 model coverage: one focused check per cause fixed (tiny configs, default suite)."""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner, hookimpl, load_pruned
from cleanai_core.errors import UserError
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.io import save_pruned
from cleanai_core.testing import check_pruner, temporary_plugin


def groups_with(graph: DependencyGraph, module: str, slice_name: str):
    return [g for g in graph.groups() if any(s.module == module and s.name == slice_name for s in g.slices)]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def between(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def redrawn(model: nn.Module) -> nn.Module:
    """timm starts temperatures at 1, biases at 0 and layer scales at 1e-6: redraw them so
    that the masking oracle has something to tell apart."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


# -- cross-covariance attention (EdgeNeXt, XCiT) --------------------------------------------------


def XcaNet(kind: str = "edgenext"):  # noqa: N802 - used like a class
    if kind == "edgenext":
        from timm.models.edgenext import CrossCovarianceAttn as Xca
    else:
        from timm.models.xcit import XCA as Xca
    torch.manual_seed(0)
    return redrawn(between(stem=nn.Linear(5, 12), attn=Xca(12, num_heads=3), head=nn.Linear(12, 3)))


@pytest.mark.parametrize("kind", ["edgenext", "xcit"])
def test_cross_covariance_attention_heads_prune_apart_from_the_stream(kind):
    pytest.importorskip("timm.models.edgenext")
    model, x = XcaNet(kind), torch.randn(2, 7, 5)
    graph = DependencyGraph(model, x)
    # the reshape to the input width tied q, k and v channel by channel to the stream: stem's
    # 12 channels and the 3 heads were one group of 3 head-sized units
    assert [(g.size, g.prunable) for g in groups_with(graph, "attn.qkv", "out")] == [(3, 3)]
    assert [(g.size, g.prunable) for g in groups_with(graph, "stem", "out")] == [(12, 12)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    # stem 12 -> 6; heads 3 -> 2 (of 4 channels); proj 12 -> 6
    stem, qkv, temp, proj, head = 5 * 6 + 6, 6 * 24, 2, 8 * 6 + 6, 6 * 3 + 3  # qkv without bias
    assert report.params_after == stem + qkv + temp + proj + head
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head]).prune()
    attn = small.attn
    assert type(attn).__name__.startswith("Pruned") and attn.num_heads * 4 * 3 == attn.qkv.out_features
    assert attn.qkv.in_features == small.stem.out_features < 12 and attn.num_heads < 3
    with torch.no_grad():
        assert small(x).shape == (2, 7, 3)


def test_edgenext_stream_prunes_past_its_heads_and_reloads(tmp_path):
    timm = pytest.importorskip("timm")
    kwargs = {"depths": (1, 1, 1, 1), "dims": (24, 48, 88, 168)}  # edgenext_xx_small's widths, one block a stage
    torch.manual_seed(0)
    model = redrawn(timm.create_model("edgenext_xx_small", num_classes=10, **kwargs))
    x = torch.randn(2, 3, 64, 64)
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-4
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert n_params(small) / n_params(model) < 0.3  # was 0.67: XCA's heads and the split parts made few units
    xca = small.stages[3].blocks[0].xca
    assert type(xca).__name__ == "PrunedCrossCovarianceAttn" and xca.num_heads < 4
    options = {"num_classes": 10, "model_kwargs": kwargs}
    save_pruned(tmp_path / "e", small, pruner.history, "timm:edgenext_xx_small", options)
    back = load_pruned(tmp_path / "e", trust_code=True)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


# -- TF-layout relative position bias (MaxViT *_tf_*) ---------------------------------------------


def TfBiasNet():  # noqa: N802 - used like a class
    from timm.layers.pos_embed_rel import RelPosBiasTf
    from timm.models.maxxvit import AttentionCl

    torch.manual_seed(0)
    attn = AttentionCl(16, dim_head=4, rel_pos_cls=partial(RelPosBiasTf, window_size=(3, 3)))
    with torch.no_grad():
        attn.rel_pos.relative_position_bias_table.normal_()  # timm draws it with std 0.02
    return between(stem=nn.Linear(5, 16), attn=attn, head=nn.Linear(16, 3)).eval()


def test_tf_layout_relative_position_table_prunes_with_the_heads():
    pytest.importorskip("timm.models.maxxvit")
    model, x = TfBiasNet(), torch.randn(2, 3, 3, 5)
    graph = DependencyGraph(model, x)
    # the (heads, 5, 5) table was labelled on its last dimension, which met the lookup buffers in
    # einsum: the bias added to the attention had no heads, and every head froze (4 units, 0 prunable)
    (heads,) = groups_with(graph, "attn.qkv", "out")
    assert (heads.size, heads.prunable) == (4, 4)
    assert "attn.rel_pos.relative_position_bias_table" in {s.name for s in heads.slices}
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head]).prune()
    attn = small.attn
    assert attn.num_heads == attn.rel_pos.relative_position_bias_table.shape[0] == 2
    assert attn.qkv.out_features == 2 * 3 * 4
    with torch.no_grad():
        assert small(x).shape == (2, 3, 3, 3)


# -- save_pruned: buffers outside the state_dict ---------------------------------------------------


class Windowed(nn.Module):
    """A layer whose non-persistent buffer is sized by a constructor argument (timm's relative
    position index is sized by the window, the window by ``img_size``)."""

    def __init__(self, window: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.register_buffer("index", torch.arange(window * window), persistent=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = self.conv(x).flatten(2)[..., self.index]
        return self.head(y.mean(2))


class WindowedLoader:
    @hookimpl
    def cleanai_load_model(self, spec, options):
        return Windowed(**(options.get("model_kwargs") or {})) if spec == "toy:windowed" else None


def test_save_refuses_a_spec_that_rebuilds_other_buffers(tmp_path):
    # MaxxViT built with img_size=64 and saved with options={"img_size": 64} (not model_kwargs):
    # every saved tensor fit the 256 px rebuild, the folder loaded, and its forward failed
    # ("shape '[4, 4, 1]' is invalid for input of size 4096")
    torch.manual_seed(0)
    model, x = Windowed(window=2).eval(), torch.randn(2, 3, 2, 2)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head])
    small = pruner.prune()
    with temporary_plugin(WindowedLoader(), name="windowed"):
        with pytest.raises(UserError, match=r"index \(4,\) vs model \(16,\) \(a buffer outside the state_dict\)"):
            save_pruned(tmp_path / "w", small, pruner.history, "toy:windowed", {"img_size": 2})
        assert not (tmp_path / "w").exists()
        save_pruned(tmp_path / "w", small, pruner.history, "toy:windowed", {"model_kwargs": {"window": 2}})
        back = load_pruned(tmp_path / "w", trust_code=True)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


# -- constant buffers read only by layers ----------------------------------------------------------


class CoordinateBias(nn.Module):
    """Swin-V2's continuous position bias in small: a table of ``(x, y)`` coordinates kept as a
    buffer, fed to an MLP whose output is added to the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("coords", torch.randn(9, 2), persistent=False)
        self.stem = nn.Linear(4, 6)
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (B, 9, 4)
        return self.head(self.stem(x) + self.mlp(self.coords))


def test_coordinates_in_a_buffer_are_data_not_units():
    torch.manual_seed(0)
    model, x = CoordinateBias().eval(), torch.randn(2, 9, 4)
    graph = DependencyGraph(model, x)
    # the coordinates were a group of 2 prunable units: a ratio of 0.5 removed x or y
    (coords,) = groups_with(graph, "mlp.0", "in")
    assert (coords.size, coords.prunable) == (2, 0)
    assert any("buffer coords holds constant data" in r for r in coords.reasons)
    assert [(g.size, g.prunable) for g in groups_with(graph, "mlp.0", "out")] == [(8, 8)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    # stream 6 -> 3, hidden 8 -> 4, both coordinates kept
    assert report.params_after == (4 * 3 + 3) + (2 * 4 + 4) + (4 * 3 + 3) + (3 * 3 + 3)


# -- torchvision MViT ------------------------------------------------------------------------------


def TinyMViT():  # noqa: N802 - used like a class
    from torchvision.models.video.mvit import MSBlockConfig, MViT

    torch.manual_seed(0)
    blocks = [
        MSBlockConfig(2, 8, 8, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 2, 2]),
        MSBlockConfig(2, 8, 16, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1]),
    ]
    model = MViT(
        spatial_size=(16, 16),
        temporal_size=2,
        block_setting=blocks,
        residual_pool=True,
        residual_with_cls_embed=False,
        rel_pos_embed=True,
        proj_after_attn=True,
        num_classes=3,
    )
    return redrawn(model)


def test_mvit_head_size_follows_the_slicing(recwarn):
    pytest.importorskip("torchvision.models.video.mvit")
    model, x = TinyMViT(), torch.randn(2, 3, 2, 16, 16)
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-4
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    # output_dim is stored: every head-size group broke the pruned model
    # (a reshape to it failed) and verification kept it
    assert not [w for w in recwarn if "skipped group" in str(w.message)]
    for before, after in zip(model.blocks, small.blocks, strict=True):
        a, b = before.attn, after.attn
        assert b.head_dim < a.head_dim and b.output_dim == b.num_heads * b.head_dim == b.qkv.out_features // 3
        assert b.scaler == a.scaler  # the scale the model was trained with
    with torch.no_grad():
        assert small(x).shape == (2, 3)


# -- attention that stores num_heads but no head size (timm Hiera-Det / SAM2) ----------------------


def test_head_count_follows_whole_heads_where_no_head_size_is_stored():
    pytest.importorskip("timm.models.hieradet_sam2")
    from timm.models.hieradet_sam2 import MultiScaleAttention

    torch.manual_seed(0)
    model = redrawn(
        between(stem=nn.Linear(5, 16), attn=MultiScaleAttention(16, 16, num_heads=4), head=nn.Linear(16, 3))
    )
    x = torch.randn(2, 3, 3, 5)
    # num_heads stayed 4 after 2 heads went: reshape(B, N, 3, 4, -1) cut the kept heads in halves
    # and the pruned model ran, away from the masked one
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head]).prune()
    assert small.attn.num_heads == small.attn.qkv.out_features // (3 * 4) == 2
    with torch.no_grad():
        assert small(x).shape == (2, 3, 3, 3)


def test_pruned_cross_covariance_attention_pickles(tmp_path):
    pytest.importorskip("timm.models.edgenext")
    model, x = XcaNet(), torch.randn(2, 7, 5)
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head]).prune()
    torch.save(small, tmp_path / "m.pt")  # save_pickle=True: the class is found by its module and name
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    assert type(back.attn).__name__ == "PrunedCrossCovarianceAttn"
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
