"""Session 20 model coverage: one focused check per cause fixed (tiny configs, default suite)."""

from __future__ import annotations

import io

import pytest
import torch
from test_models_6 import groups_with, n_params, redrawn
from test_models_7 import replayed

from cleanai_core import StructuredPruner
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.testing import check_pruner

# -- ShuffleNet-V2: chunk(2) and channel_shuffle tied the halves of every block -------------------


def _tiny_shufflenet(quantizable: bool = False):
    if quantizable:
        from torchvision.models.quantization.shufflenetv2 import QuantizableShuffleNetV2 as Net
    else:
        from torchvision.models.shufflenetv2 import ShuffleNetV2 as Net
    torch.manual_seed(0)
    return Net([2, 3, 2], [8, 16, 32, 64, 64], num_classes=5).eval()


def _unit_sizes(graph, module: str) -> list[int]:
    """How many of ``module``'s output channels each unit spans (the distinct counts)."""
    root = graph.unit_of(graph.ctx.slices[(module, "out")])
    return sorted(set(torch.unique(root, return_counts=True)[1].tolist()))


@pytest.mark.parametrize("quantizable", [False, True], ids=["shufflenet", "quantizable"])
def test_shufflenet_blocks_split_and_shuffle_by_stored_indices_once_pruned(quantizable):
    pytest.importorskip("torchvision")
    model = _tiny_shufflenet(quantizable)
    x = torch.randn(2, 3, 32, 32)
    graph = DependencyGraph(model, x)
    # a stage's stream was 4 units of 10 channels (channel i of both halves tied in every block);
    # now every channel of a branch is a unit of its own
    assert _unit_sizes(graph, "stage3.1.branch2.5") == [1]  # was [4]
    stream = [g for g in groups_with(graph, "stage3.0.branch1.2", "out")]
    assert sum(g.prunable for g in stream) == 16  # was 4 units
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.fc])
    small = pruner.prune()
    assert (n_params(model), n_params(small)) == (14661, 4501)
    kinds = {type(b).__name__ for b in small.stage3}
    assert kinds == {"PrunedQuantizableInvertedResidual" if quantizable else "PrunedInvertedResidual"}
    block = small.stage3[1]
    assert block.x1_index.numel() + block.x2_index.numel() == small.stage3[0].branch2[5].out_channels * 2
    assert sorted(block.shuffle_index.tolist()) == list(range(block.shuffle_index.numel()))
    assert not any("index" in k for k in small.state_dict())  # made again by a replayed history
    with torch.no_grad():
        assert torch.equal(replayed(model, pruner.history)(x), small(x))
        buf = io.BytesIO()
        torch.save(small, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), small(x))
    # the pruned model prunes again: its index buffers are traced and rewritten by the slicer
    again = check_pruner(small, x, ratio=0.5)
    assert again.max_abs_diff < 1e-6 and again.params_after < 0.4 * again.params_before
    second = StructuredPruner(small, x, "magnitude", pruning_ratio=0.5, ignored_layers=[small.fc])
    smaller = second.prune()
    with torch.no_grad():
        assert torch.equal(replayed(small, second.history)(x), smaller(x))


def test_a_shuffle_block_that_starts_a_sequential_at_stride_one_keeps_its_ties():
    """A stride-1 block with no block of stride 2 before it in its ``nn.Sequential``: the kept
    channels of its input are not known to the fix-up, so it keeps chunk's and the shuffle's
    ties (exact, as before)."""
    pytest.importorskip("torchvision")
    from torch import nn
    from torchvision.models.shufflenetv2 import InvertedResidual

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(InvertedResidual(8, 8, 1))).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    assert _unit_sizes(graph, "0") == [2]  # channel i of both halves, as the module's code needs
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    assert type(model[1][0]) is InvertedResidual


# -- timm's mixed rotary embedding: learnable per-head frequencies of every block ------------------

ROPE_MIXED = {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 4, "num_classes": 3}


def test_mixed_rotary_frequencies_prune_with_the_heads_of_every_block():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = redrawn(timm.create_model("vit_small_patch16_rope_mixed_224", **ROPE_MIXED)).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = DependencyGraph(model, x)
    # rope.freqs (2, depth, heads, head_dim / 2) met the heads on its last dimension: every head froze
    [heads] = groups_with(graph, "", "rope.freqs")
    assert (heads.size, heads.prunable) == (4, 4)  # was (8, 0), and each block's qkv (4, 0)
    assert {s.module for s in heads.slices} >= {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    assert (report.params_before, report.params_after) == (149955, 100291)  # was 149955 -> 116931
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head])
    small = pruner.prune()
    assert small.rope.freqs.shape == (2, 2, 2, 8) and small.rope.num_heads == 2  # (2, depth, heads, 8)
    assert [b.attn.num_heads for b in small.blocks] == [2, 2]
    with torch.no_grad():
        assert torch.equal(replayed(model, pruner.history)(x), small(x))


# -- an index buffer that picks a subset of the channels, replayed from a saved history ------------


class _Picker(torch.nn.Module):
    """``head`` reads four of the eight channels, picked by a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)
        self.head = torch.nn.Conv2d(4, 2, 1)
        self.other = torch.nn.Conv2d(8, 2, 1)
        self.register_buffer("part", torch.tensor([1, 4, 6, 7]))
        with torch.no_grad():
            self.conv.weight[:4] *= 0.01  # keep channels past the buffer's length

    def forward(self, x):
        y = self.conv(x)
        return self.head(y.index_select(1, self.part)) + self.other(y)


def test_a_history_that_prunes_channels_an_index_buffer_picks_a_subset_of_replays(tmp_path):
    """A saved history's check of a bare tensor's kept channels compared an index buffer's kept
    positions (those of the channels it points into) with the buffer's own length: "channel 7
    is out of range for 'part@' (4 channels)" refused a valid folder (ShuffleNet-V2 pruned
    twice, ``iterative_steps``, whose blocks pick their halves with such buffers)."""
    from cleanai_core.saved_folder import replay_history

    torch.manual_seed(0)
    model = _Picker().eval()
    x = torch.randn(2, 3, 4, 4)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert small.part.tolist() == [1, 3] and small.conv.out_channels == 4
    [edit] = [e for e in pruner.history.steps[0] if e.slice == "part@"]
    assert int(edit.keep.max()) >= 4  # a kept channel past the buffer's length
    fresh = _Picker().eval()
    fresh.load_state_dict(model.state_dict())
    replay_history(pruner.history, fresh, tmp_path / "history.json")  # raised UserError
    with torch.no_grad():
        assert torch.equal(fresh(x), small(x))


# -- layers only a training forward runs (auxiliary classifiers) -----------------------------------


class _WithAux(torch.nn.Module):
    """An auxiliary classifier on the first conv's output, run only in training mode (as
    GoogLeNet's ``aux1`` / ``aux2`` and Inception-v3's ``AuxLogits``)."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        self.aux = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
        )

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        out = self.head(torch.relu(self.conv2(y)))
        return (out, self.aux(y)) if self.training else out


def test_layers_only_a_training_forward_runs_prune_with_the_stream_they_read():
    """The eval trace never ran ``aux``: ``conv1`` shrank and ``aux.2`` kept its 8 inputs, so
    the pruned model failed as soon as it was trained ("mat1 and mat2 shapes cannot be
    multiplied"). The graph records a training-mode pass for such layers (dropout's random
    mask follows the channels); the user's random stream is left as it was."""
    torch.manual_seed(0)
    model = _WithAux().eval()
    x = torch.randn(2, 3, 8, 8)
    state = torch.get_rng_state()
    graph = DependencyGraph(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    [stream] = groups_with(graph, "conv1", "out")
    assert ("aux.2", "in") in {(s.module, s.name) for s in stream.slices}  # was not coupled
    [hidden] = groups_with(graph, "aux.2", "out")
    assert (hidden.size, hidden.prunable) == (16, 16)  # the dropout's mask does not freeze them
    assert not model.training
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head, model.aux[5]])
    small = pruner.prune()
    assert (small.conv1.out_channels, small.aux[2].in_features, small.aux[2].out_features) == (4, 4, 8)
    small.train()
    out, aux = small(x)  # raised RuntimeError before
    assert out.shape == aux.shape == (2, 3)


def test_naflexvit_with_mixed_rotary_frequencies_prunes_its_heads():
    pytest.importorskip("timm")
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    torch.manual_seed(0)
    cfg = NaFlexVitCfg(embed_dim=64, depth=2, num_heads=4, rope_type="mixed", patch_size=16)
    model = redrawn(NaFlexVit(cfg, num_classes=3, img_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    [heads] = groups_with(DependencyGraph(model, x), "", "rope.freqs")
    assert (heads.size, heads.prunable) == (4, 4)  # each block's qkv was (4, 0)
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    assert (report.params_before, report.params_after) == (215939, 140419)  # was 215939 -> 157059
