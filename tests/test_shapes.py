"""ShapeOnlyMode: heavy ops cost no arithmetic, yet shapes, recordings, FLOP counts and
the pruned-model check are exactly what a real run gives."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core import shapes as shapes_mod
from cleanai_core.errors import PruningError
from cleanai_core.metrics import count_flops
from cleanai_core.shapes import ShapeOnlyMode


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)  # B, N, C
        q, k, v = self.qkv(t).reshape(t.shape[0], t.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        t = t + self.proj(a.transpose(1, 2).reshape(t.shape))
        return self.head(torch.bmm(t.transpose(1, 2), t).mean(1))


def _models():
    torch.manual_seed(0)
    return [
        (Attn().eval(), torch.randn(2, 3, 6, 6)),
        (torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 64, 64)),
        (torchvision.models.mobilenet_v3_small(num_classes=10).eval(), torch.randn(1, 3, 64, 64)),
    ]


def _signature(graph: DependencyGraph) -> list:
    return [
        (str(getattr(e, "op", getattr(e, "name", ""))), [r.shape for r in e.inputs], [r.shape for r in e.outputs])
        for e in graph.recording.events
    ]


@pytest.mark.parametrize("idx", range(3))
def test_shape_run_matches_real_run(idx):
    model, x = _models()[idx]
    with torch.no_grad():
        real = model(x)
        with ShapeOnlyMode():
            fake = model(x)
    assert fake.shape == real.shape and fake.dtype == real.dtype and fake.stride() == real.stride()
    assert torch.count_nonzero(fake) == 0  # the head is a heavy op: no arithmetic was done
    assert torch.count_nonzero(real) > 0


@pytest.mark.parametrize("idx", range(3))
def test_recording_is_the_same_as_with_real_arithmetic(idx, monkeypatch):
    model, x = _models()[idx]
    fast = DependencyGraph(model, x)
    monkeypatch.setattr(shapes_mod, "HEAVY_OPS", frozenset())
    slow = DependencyGraph(model, x)
    assert _signature(fast) == _signature(slow)
    assert [g.size for g in fast.groups()] == [g.size for g in slow.groups()]


@pytest.mark.parametrize("idx", range(3))
def test_flop_count_unchanged(idx):
    model, x = _models()[idx]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    assert count_flops(model, x) == counter.get_total_flops() > 0


def test_mismatch_raises_the_real_kernels_error():
    conv = nn.Conv2d(8, 4, 3)
    with pytest.raises(RuntimeError, match="expected input.*to have 8 channels"), ShapeOnlyMode():
        conv(torch.randn(1, 5, 6, 6))
    lin = nn.Linear(7, 3)
    with pytest.raises(RuntimeError, match="cannot be multiplied"), ShapeOnlyMode():
        lin(torch.randn(2, 6))


def test_pruned_model_check_still_catches_a_broken_conv():
    model, x = _models()[1]
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    conv = pruned.layer1[0].conv2
    conv.weight = nn.Parameter(conv.weight[:, :-1].clone())  # one input channel short
    with pytest.raises(PruningError, match="fails to run.*channels"):
        pruner._verify(pruned, pruner.graph)


def test_heavy_op_called_with_keywords_only():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    out = shapes_mod.run_for_shape(torch.ops.aten.mm.default, (), {"self": a, "mat2": b})
    assert out.shape == (3, 5) and out.device == a.device and torch.count_nonzero(out) == 0
