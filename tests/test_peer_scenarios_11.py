"""An eleventh set of the scenarios users bring from Torch-Pruning's test suite and
examples, written for CleanAI's API (see ``test_peer_scenarios.py`` to ``_10``): detection
necks and heads (deformable convolutions), ...

Each test asserts widths, parameter counts, and the masking oracle where slicing must equal
zeroing."""

from __future__ import annotations

import pytest
import torch
from test_peer_scenarios_6 import _seeded, _two_step_replay
from torch import nn

from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core.metrics import count_params
from cleanai_core.testing import check_pruner

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


# -- deformable convolutions (DCNv2 in detection necks and heads) --------------------------------


class DeformBlock(nn.Module):
    """A DCNv2 block as detection necks write it: one conv computes the offsets and the
    modulation mask from the features, ``torchvision.ops.DeformConv2d`` reads them."""

    def __init__(self, offset_groups: int = 1, groups: int = 1) -> None:
        super().__init__()
        from torchvision.ops import DeformConv2d

        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.om = nn.Conv2d(8, 27 * offset_groups, 3, padding=1)
        self.d, self.o = DeformConv2d(8, 8, 3, padding=1, groups=groups), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        o1, o2, m = self.om(a).chunk(3, 1)
        return self.o(torch.relu(self.d(a, torch.cat([o1, o2], 1), m.sigmoid())))


DX = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_a_deformable_convolution_prunes_its_filters_and_inputs_exactly(tmp_path):
    """``torchvision.deform_conv2d`` had no mapper: "channels reach op
    torchvision.deform_conv2d.default in d, which ignored them", nothing pruned."""
    pytest.importorskip("torchvision")
    report = check_pruner(_seeded(DeformBlock), DX)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5 and report.kept_whole == ()
    assert (report.params_before, report.params_after) == (2797, 1269)
    small = StructuredPruner(_seeded(DeformBlock), DX, "magnitude", pruning_ratio=0.5, round_to=None).prune()
    assert small.d.weight.shape == (4, 4, 3, 3) and small.d.bias.shape == (4,)
    assert (small.d.in_channels, small.d.out_channels, small.om.out_channels) == (4, 4, 27)
    pruner, small, fresh = _two_step_replay(DeformBlock, DX, tmp_path)
    assert count_params(fresh) == count_params(small) < 2797 and torch.equal(fresh(DX), small(DX))
    assert fresh.d.out_channels == small.d.weight.shape[0]


def test_deformable_offset_groups_and_a_grouped_weight_keep_their_group_counts():
    """Several offset groups each move a fixed share of the input channels, a grouped weight
    reads one group's channels: channel j of every share (every group) goes together, so
    the counts stay (both kept every input before 2026-12-02: 4,768 -> 4,468, the grouped
    weight nothing; ``tests/test_peer_scenarios_14.py`` has the rest). The offsets and the
    mask keep their channels, with the reason."""
    pytest.importorskip("torchvision")
    report = check_pruner(_seeded(lambda: DeformBlock(offset_groups=2)), DX)
    assert report.max_abs_diff < 1e-5 and (report.params_before, report.params_after) == (4768, 2268)
    text = DependencyGraph(_seeded(lambda: DeformBlock(offset_groups=2)), DX).explain()
    assert "reads offsets and a mask per kernel position, which cannot shrink" in text
    report = check_pruner(_seeded(lambda: DeformBlock(groups=2)), DX)
    assert report.max_abs_diff < 1e-5 and (report.params_before, report.params_after) == (2509, 1197)


class DeformNoBias(nn.Module):
    """``DeformConv2d(bias=False)`` before a BatchNorm: torchvision runs the op with a bias
    of ``zeros(weight.shape[0])`` made at run time."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import DeformConv2d

        self.a, self.off = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 18, 3, padding=1)
        self.d, self.bn, self.o = DeformConv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        return self.o(torch.relu(self.bn(self.d(a, self.off(a)))))


class DeformFunctional(nn.Module):
    """mmcv's way: the module holds its own weight and bias and calls
    ``torchvision.ops.deform_conv2d`` with them, at stride 2, without a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.off = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 18, 3, 2, padding=1, bias=False)
        self.weight, self.bias = nn.Parameter(torch.randn(6, 8, 3, 3) * 0.2), nn.Parameter(torch.randn(6))
        self.o = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        from torchvision.ops import deform_conv2d

        a = torch.relu(self.a(x))
        return self.o(deform_conv2d(a, self.off(a), self.weight, self.bias, stride=2, padding=1))


@pytest.mark.parametrize(
    "factory, before, after, weight, side",
    [(DeformNoBias, 2148, 940, (4, 4, 3, 3), 8), (DeformFunctional, 1972, 879, (3, 4, 3, 3), 4)],
    ids=["without_bias", "functional_own_weight"],
)
def test_deformable_convolutions_without_bias_or_functional_prune_exactly(factory, before, after, weight, side):
    """Without a bias, the filters froze: "input without traced channels (op
    torchvision.deform_conv2d.default in d)" (the zeros torchvision makes)."""
    pytest.importorskip("torchvision")
    report = check_pruner(_seeded(factory), DX)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5 and report.kept_whole == ()
    assert (report.params_before, report.params_after) == (before, after)
    small = StructuredPruner(_seeded(factory), DX, "magnitude", pruning_ratio=0.5, round_to=None).prune()
    assert (small.d if factory is DeformNoBias else small).weight.shape == weight
    assert small(DX).shape == (2, 2, side, side)


# -- gradual pruning of nn.Transformer (the peer's iterative steps inside training) --------------


class QueryDecoder(nn.Module):
    """DETR's shape: a conv backbone, ``nn.Transformer`` over the feature map, learned
    object queries (``nn.Embedding.weight`` repeated over the batch), class and box heads."""

    def __init__(self) -> None:
        super().__init__()
        self.bb, self.proj, self.q = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 12, 1), nn.Embedding(5, 12)
        self.tr = nn.Transformer(12, 2, 1, 1, 24, dropout=0.0, batch_first=True)
        self.cls, self.box = nn.Linear(12, 3), nn.Linear(12, 4)

    def forward(self, x):
        src = self.proj(torch.relu(self.bb(x))).flatten(2).transpose(1, 2)
        h = self.tr(src, self.q.weight.unsqueeze(0).repeat(x.shape[0], 1, 1))
        return torch.cat([self.cls(h), self.box(h).sigmoid()], -1)


def test_kept_indices_see_through_the_query_rescale_of_multihead_attention():
    """``nn.MultiheadAttention``'s pruner multiplies the query rows by ``sqrt(new / old)``
    where the head width shrinks: the position tags were no longer integers and
    ``kept_indices`` raised "slicing tr.encoder.layers.0.self_attn.in_proj_weight changed
    its values, not only its shape"."""
    from cleanai_core.gradual import kept_indices, position_tagged_copy

    model, x = _seeded(QueryDecoder), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.3, round_to=None)
    small, edits = pruner.build(pruner.plan().pruned_units())
    kept = kept_indices(position_tagged_copy(model), edits)
    name = "tr.encoder.layers.0.self_attn.in_proj_weight"
    rows, cols = kept[name]
    old, new = model.get_parameter(name).detach(), small.get_parameter(name).detach()
    e = new.shape[1]
    assert new.shape == (3 * e, e) and e < 12 and rows.shape == (3 * e,) and cols.shape == (e,)
    sliced = old[rows][:, cols]
    assert torch.equal(new[e:], sliced[e:])  # keys and values: a selection
    assert torch.allclose(new[:e], sliced[:e] * (e / 2 / 6) ** 0.5, atol=1e-6)  # queries: rescaled


def test_gradual_pruning_of_a_transformer_carries_the_optimizer_state():
    from cleanai_core.gradual import GradualPruner, PruningSchedule

    model, x = _seeded(QueryDecoder).train(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    model(x).pow(2).mean().backward()
    opt.step()
    gp = GradualPruner(model, x[:2], opt, PruningSchedule(final=0.5, steps=2))
    for _ in range(2):
        model, opt = gp.step([x])
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert gp.done and count_params(model) < 3000
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape and torch.isfinite(p).all()


# -- a FLOPs target on a model that reads a width from another tensor ----------------------------


def test_a_flops_target_keeps_whole_the_groups_the_model_cannot_run_without():
    """FLOPs are counted by running each trial plan: where a group's slicing breaks the
    model (AIMv2's head size from the input's width), the model's own ``RuntimeError``
    ("shape '[2, 5, 2, 8]' is invalid for input of size 100") ended the search and every
    gradual step by FLOPs. The group is now measured whole, as verification keeps it."""
    from test_peer_scenarios_10 import HeadFromInputWidth

    from cleanai_core.gradual import GradualPruner, PruningSchedule
    from cleanai_core.metrics import count_flops

    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    model = _seeded(HeadFromInputWidth)
    pruner = StructuredPruner(model, x, "magnitude", target_flops=0.6)
    small = pruner.prune()
    assert (count_params(model), count_params(small)) == (568, 330)
    assert count_flops(small, x) / count_flops(model, x) == pytest.approx(0.562, abs=1e-3)
    assert len(pruner.report()["skipped_groups"]) == 1 and small(x).shape == (2, 5, 8)
    net = _seeded(HeadFromInputWidth).train()
    gp = GradualPruner(net, x, torch.optim.SGD(net.parameters(), 0.1), PruningSchedule(final=0.4, steps=2))
    for _ in range(2):
        net, _opt = gp.step([x])
    assert gp.done and count_params(net) < 568 and net(x).shape == (2, 5, 8)


# -- calibration batches of a model with several inputs (the peer's multiple-inputs test) --------


class CrossDecoder(nn.Module):
    """A decoder layer with cross-attention over encoded source features: two inputs of
    different shapes (features and target token ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.src, self.tgt = nn.Linear(6, 16), nn.Embedding(10, 16)
        self.dec = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 10)

    def forward(self, x, t):
        return self.out(self.dec(self.tgt(t), self.src(x)))


def test_a_tuple_batch_of_several_inputs_is_answered_with_how_to_give_them():
    """``[(features, tokens)]`` was read as ``(input, label)``: the model missed ``t`` and the
    error said only "give calibration batches shaped like example_inputs", which they were
    (the hint named the layout only for two tensors of one shape). Since session 24 a tuple
    of as many tensors as the forward's required positional inputs is those inputs
    (``runtime.split_batch``); a batch that still misses one gets the hint."""
    from cleanai_core.errors import UserError

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 7, 6, generator=g), torch.randint(0, 10, (4, 5), generator=g)
    pruner = StructuredPruner(_seeded(CrossDecoder), (x[:2], t[:2]), "weight_activation", pruning_ratio=0.5)
    with pytest.raises(UserError, match=r"missing 1 required positional argument: 't'.*\(\(x1, x2\), label\)"):
        pruner.collect_activations([(x, t, t[:, 0], t[:, 1])])  # four tensors: not (x, t[, label])
    pruner.collect_activations([(x, t)])
    pairs = pruner.prune()
    pruner.collect_activations([((x, t), None)])
    small = pruner.prune()
    assert count_params(small) < 3786 and small(x, t).shape == (4, 5, 10)
    assert torch.equal(pairs(x, t), small(x, t))
