"""Session 18 model coverage: one focused check per cause fixed (tiny configs, default suite)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_models_6 import between, groups_with, n_params, redrawn  # the session-16 tests' helpers
from test_models_7 import replayed
from torch import nn

from cleanai_core import StructuredPruner, load_pruned
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.io import save_pruned
from cleanai_core.slicing import SliceEdit, apply_edits
from cleanai_core.testing import check_pruner, masked_forward, run_model


def heads_oracle(model, x, attn_projection: str) -> tuple[float, float]:
    """Prune the first head of every group that contains ``<block>.<attn_projection>``'s
    output (and nothing else): ``(|sliced - masked|, |sliced - original|)``; the second
    shows that the comparison has teeth."""
    graph = DependencyGraph(model, x)
    pruned = torch.zeros(graph.root.numel(), dtype=torch.bool)
    heads = [
        g
        for g in graph.groups(prunable_only=True)
        if any(s.module.endswith(attn_projection) and s.name == "out" for s in g.slices)
    ]
    assert heads and not any(g.normalizes for g in heads)
    for g in heads:
        pruned[g.units[0]] = True
    expected = masked_forward(graph, pruned, x)
    small = copy.deepcopy(model)
    edits = [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in graph.keep_indices(pruned).items()]
    apply_edits(small, edits, graph.pm)
    got, ref = run_model(small, x), run_model(model, x)
    return float((got[0] - expected[0]).abs().max()), float((got[0] - ref[0]).abs().max())


# -- EVA attention and latent attention pooling: the output reshape named the input width ---------

EVA = {"img_size": 28, "depth": 2, "embed_dim": 48, "num_heads": 3, "scale_attn_inner": False}
MAP = {"img_size": 32, "depth": 2}


def timm_model(name: str, kwargs: dict):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = redrawn(timm.create_model(name, num_classes=3, **kwargs))
    with torch.no_grad():  # timm starts these heads near zero: the logits would be their bias
        model.head.weight.normal_(0, 0.3)
    return model


@pytest.mark.parametrize(
    "name,kwargs,side,attn,before,after",
    [
        # was 85,379 -> 40,451: the 48-channel stream pruned in blocks of one head (1 of 3)
        ("eva02_tiny_patch14_224", EVA, 28, "attn.qkv", 85379, 30435),
        # was 299,523 -> 133,939: test_vit3's `map` pool tied the 96-channel stream to its 3 heads
        ("test_vit3", MAP, 32, "attn_pool.kv", 299523, 103827),
    ],
    ids=["eva_attention", "latent_attention_pool"],
)
def test_attention_whose_output_reshape_names_the_input_width_frees_the_stream(
    tmp_path, name, kwargs, side, attn, before, after
):
    model = timm_model(name, kwargs)
    x = torch.randn(2, 3, side, side)
    graph = DependencyGraph(model, x)
    (stream,) = groups_with(graph, "patch_embed.proj", "out")
    width = model.patch_embed.proj.out_channels
    assert (stream.size, stream.prunable) == (width, width)  # was (3, 3): one unit per head
    diff, moved = heads_oracle(model, x, attn)
    assert diff < 1e-5 < 1e-2 < moved
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert (n_params(model), n_params(small)) == (before, after)
    freed = [m for m in small.modules() if type(m).__name__ in ("PrunedEvaAttention", "PrunedAttentionPoolLatent")]
    assert freed and all(m.num_heads == 2 for m in freed)
    assert small.patch_embed.proj.out_channels == width // 2
    with torch.no_grad():
        assert torch.equal(replayed(model, pruner.history)(x), small(x))
    save_pruned(tmp_path / "o", small, pruner.history, f"timm:{name}", {"num_classes": 3, "model_kwargs": kwargs})
    back = load_pruned(tmp_path / "o", trust_code=True)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    torch.save(small, tmp_path / "m.pt")  # the pruned classes pickle by name
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
        for m in freed:
            m.fused_attn = False
        assert torch.allclose(small(x), again(x), atol=1e-5)  # the unfused path reads the same widths


def test_latent_pool_without_a_query_projection_counts_its_heads_from_kv():
    pytest.importorskip("timm")
    from timm.layers import AttentionPoolLatent

    torch.manual_seed(0)
    # q_proj=False: the latent is the query, so `kv` is the only projection that shows the heads
    pool = AttentionPoolLatent(16, num_heads=4, q_proj=False, mlp_ratio=1.0)
    model = redrawn(between(stem=nn.Linear(5, 16), pool=pool, head=nn.Linear(16, 3)))
    x = torch.randn(2, 6, 5)
    diff, moved = heads_oracle(model, x, "pool.kv")
    assert diff < 1e-5 < 1e-2 < moved
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head])
    small = pruner.prune()
    assert type(small.pool).__name__ == "PrunedAttentionPoolLatent"
    assert (small.pool.num_heads, small.pool.latent.shape[-1], small.pool.kv.out_features) == (2, 8, 16)
    assert small.stem.out_features == 8
    with torch.no_grad():
        assert torch.equal(replayed(model, pruner.history)(x), small(x))


# -- a constant pad of the channel dimension (EfficientViT-MIT's LiteMLA, option-A shortcuts) -----


class PadShortcut(nn.Module):
    """A CIFAR ResNet's option-A shortcut: the block doubles its channels and the shortcut
    pads the input with zero channels, ``pad`` of them on each side."""

    def __init__(self, mode: str = "constant", pad: int = 4) -> None:
        super().__init__()
        self.mode, self.pad = mode, pad
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(8, 8 + 2 * pad, 3, stride=2, padding=1)
        self.head = nn.Linear(8 + 2 * pad, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        short = x[:, :, ::2, ::2]
        if self.mode == "constant":
            short = nn.functional.pad(short, (0, 0, 0, 0, self.pad, self.pad))
        else:  # reflected channels copy the stream's values: still frozen
            b, _, h, w = short.shape
            tokens = nn.functional.pad(short.flatten(2).transpose(1, 2), (self.pad, self.pad), mode=self.mode)
            short = tokens.transpose(1, 2).reshape(b, -1, h, w)
        return self.head(torch.relu(self.branch(x) + short).mean((2, 3)))


def test_constant_channels_padded_on_are_no_units_and_the_padded_ones_prune():
    torch.manual_seed(0)
    model, x = redrawn(PadShortcut()), torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    # "pads the channel dimension" froze the stem with the whole block
    (stream,) = groups_with(graph, "stem", "out")
    assert (stream.size, stream.prunable) == (8, 8)
    assert {"branch:out", "head:in"} <= {f"{s.module}:{s.name}" for s in stream.slices}
    # the branch's 4 + 4 channels added to the padded zeros: frozen
    frozen = [g for g in groups_with(graph, "branch", "out") if g.prunable == 0]
    assert sum(g.size for g in frozen) == 8
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    assert (report.params_before, report.params_after) == (1443, 595)
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head]).prune()
    assert (small.stem.out_channels, small.branch.out_channels, small.head.in_features) == (4, 12, 12)


@pytest.mark.parametrize("mode,pad", [("reflect", 2), ("constant", -2)], ids=["reflected", "cut"])
def test_a_reflected_or_cut_channel_pad_still_freezes_the_channels(mode, pad):
    torch.manual_seed(0)
    model = PadShortcut(mode, pad).eval()
    graph = DependencyGraph(model, torch.randn(2, 3, 8, 8))
    assert all(g.prunable == 0 for g in groups_with(graph, "stem", "out"))


def test_linear_attention_values_padded_with_ones_prune_by_whole_heads():
    pytest.importorskip("timm")
    from timm.models.efficientvit_mit import LiteMLA

    torch.manual_seed(0)
    model = redrawn(between(stem=nn.Conv2d(3, 16, 1), attn=LiteMLA(16, 16, dim=4), pool=nn.AdaptiveAvgPool2d(1)))
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph(model, x)
    # v is padded with a channel of ones (the normaliser) and sliced off after the products:
    # every head of q, k and v froze
    assert [(g.size, g.prunable) for g in groups_with(graph, "attn.qkv.conv", "out")] == [(4, 4)]
    diff, moved = heads_oracle(model, x, "attn.qkv.conv")
    assert diff < 1e-5 < 1e-3 < moved
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert (small.attn.qkv.conv.out_channels, small.attn.proj.conv.in_channels) == (24, 16)  # 2 of 4 heads of 3 x 4
    assert (n_params(model), n_params(small)) == (2768, 1208)
    with torch.no_grad():
        assert torch.equal(replayed(model, pruner.history)(x), small(x))


# -- MobileViT-V2's separable linear attention: a [1, E, E] split ---------------------------------


def test_separable_linear_attention_prunes_keys_and_values_past_its_uneven_split():
    pytest.importorskip("timm")
    from timm.models.mobilevit import LinearSelfAttention

    torch.manual_seed(0)
    model = redrawn(
        between(stem=nn.Conv2d(3, 8, 1), attn=LinearSelfAttention(8), act=nn.ReLU(), out=nn.Conv2d(8, 3, 1))
    )
    x = torch.randn(2, 3, 4, 5)  # (batch, channels, patch pixels, patches)
    graph = DependencyGraph(model, x)
    # "splits channels into unequal parts" froze the keys and values (17 channels, 0 prunable)
    sizes = sorted((g.size, g.prunable) for g in groups_with(graph, "attn.qkv_proj", "out"))
    assert sizes == [(1, 0), (8, 8)]  # the score channel stays; key i and value i go together
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.out])
    small = pruner.prune()
    attn = small.attn
    assert (attn.embed_dim, attn.qkv_proj.out_channels, attn.out_proj.in_channels) == (4, 9, 4)
    assert (n_params(model), n_params(small)) == (284, 96)
    with torch.no_grad():
        assert torch.equal(replayed(model, pruner.history)(x), small(x))


PVT = {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 32, 32), "num_heads": (1, 2, 2, 2), "mlp_ratios": (2,) * 4}


@pytest.mark.parametrize("linear", [False, True], ids=["spatial_reduction", "linear"])
def test_pvt_single_head_stage_prunes_its_stream(tmp_path, linear):
    kwargs = {**PVT, "linear": linear}
    model = timm_model("pvt_v2_b0", kwargs)
    x = torch.randn(2, 3, 32, 32)
    graph = DependencyGraph(model, x)
    # stage 0's one head of 16, tied to its stream by `reshape(B, N, C)`, froze it: (16, 0)
    assert [(g.size, g.prunable) for g in groups_with(graph, "patch_embed.proj", "out")] == [(16, 16)]
    assert [(g.size, g.prunable) for g in groups_with(graph, "stages.0.blocks.0.attn.sr", "out")] == [(16, 16)]
    diff, moved = heads_oracle(model, x, "attn.q")  # the two-head stages
    assert diff < 1e-5 < 1e-2 < moved
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    attn = small.stages[0].blocks[0].attn
    assert type(attn).__name__ == "PrunedPvtAttention" and attn.num_heads == 1
    assert (attn.q.in_features, attn.sr.out_channels, attn.q.out_features) == (8, 8, 16)
    assert [s.blocks[0].attn.num_heads for s in small.stages[1:]] == [1, 1, 1]
    save_pruned(tmp_path / "o", small, pruner.history, "timm:pvt_v2_b0", {"num_classes": 3, "model_kwargs": kwargs})
    back = load_pruned(tmp_path / "o", trust_code=True)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


# -- refusals: a pair of images given as a calibration batch -------------------------------------


class TwoImages(nn.Module):
    """An optical-flow-like model: two images in, one map out."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, img1, img2):
        return self.out(torch.relu(self.a(img1) + self.b(img2)))


def test_a_pair_of_images_of_a_two_input_model_is_read_as_its_inputs():
    """Session 8 refused ``[pair]`` (read as input and label) with the fix ``((x1, x2), label)``;
    since session 24 (api16) a tuple of as many tensors as the forward requires is its inputs,
    and calibrates as ``(pair, None)`` does."""
    torch.manual_seed(0)
    model = TwoImages().eval()
    pair = (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    smalls = []
    for batches in ([pair], [(pair, None)]):
        pruner = StructuredPruner(model, pair, pruning_ratio=0.5)
        pruner.collect_activations(batches)
        smalls.append(pruner.prune())
    for small in smalls:
        assert (small.a.out_channels, small.b.out_channels, small.out.in_channels) == (4, 4, 4)
    first, second = (s.state_dict() for s in smalls)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# -- a depthwise F.conv2d with one filter per channel in a buffer (timm BlurPool2d) -------------


def test_a_fixed_depthwise_filter_in_a_buffer_passes_its_channels():
    pytest.importorskip("timm")
    from timm.layers import BlurPool2d

    torch.manual_seed(0)
    model = redrawn(between(stem=nn.Conv2d(3, 8, 3), act=nn.ReLU(), aa=BlurPool2d(8), head=nn.Conv2d(8, 3, 1)))
    x = torch.randn(2, 3, 10, 10)
    graph = DependencyGraph(model, x)
    # "convolves channels with a weight that cannot shrink" froze the stem
    (stream,) = groups_with(graph, "stem", "out")
    assert (stream.size, stream.prunable) == (8, 8) and ("", "aa.filt") in {(s.module, s.name) for s in stream.slices}
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    assert (report.params_before, report.params_after) == (251, 127)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head])
    small = pruner.prune()
    assert (small.aa.channels, tuple(small.aa.filt.shape), small.head.in_channels) == (4, (4, 1, 3, 3), 4)
    with torch.no_grad():
        assert torch.equal(replayed(model, pruner.history)(x), small(x))


# -- ECA: one Conv1d(1, 1, k) slid across the channels ------------------------------------------


def test_eca_channels_prune_approximately_like_a_norms():
    pytest.importorskip("timm")
    from timm.layers import EcaModule

    torch.manual_seed(0)
    model = redrawn(between(stem=nn.Conv2d(3, 16, 3), eca=EcaModule(16, kernel_size=3), head=nn.Conv2d(16, 3, 1)))
    x = torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    # "channels reach dim 1 of a consumer reading dim 2" froze them: ECA models kept 0.44-0.55
    (stream,) = groups_with(graph, "stem", "out")
    assert (stream.size, stream.prunable, stream.normalizes) == (16, 16, True)  # approximate: out of the oracle
    assert [g.prunable for g in groups_with(graph, "eca.conv", "in")] == [0]  # its one channel stays
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head])
    small = pruner.prune()
    assert (small.stem.out_channels, small.head.in_channels, tuple(small.eca.conv.weight.shape)) == (8, 8, (1, 1, 3))
    assert (n_params(model), n_params(small)) == (502, 254)
    with torch.no_grad():
        assert torch.equal(replayed(model, pruner.history)(x), small(x))
