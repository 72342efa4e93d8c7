"""Where the payoff goes (issue #21, session 16): kept counts rounded to the nearest multiple
(CPU convolutions pad channels to blocks of 16), sliced tensors keep their layout, and a
pruned model runs the same ATen ops as the original (no copy or permute added)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cleanai_core import StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.interfaces import memory_format_of, slice_tensor
from cleanai_core.job.config import PruneConfig, pruner_options
from cleanai_core.masking import masked_outputs


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 40, 3, padding=1),  # 40 -> 20 at 0.5: 16 nearest, 32 up
        nn.BatchNorm2d(40),
        nn.ReLU(),
        nn.Conv2d(40, 72, 1),  # 72 -> 36 (and the depthwise conv with it): 32 nearest, 48 up
        nn.BatchNorm2d(72),
        nn.ReLU(),
        nn.Conv2d(72, 72, 3, padding=1, groups=72),
        nn.ReLU(),
        nn.Conv2d(72, 48, 3, padding=1),  # 48 -> 24: halves go up, 32 nearest and up
        nn.ReLU(),
        nn.Conv2d(48, 10, 3),  # 10 -> 5: narrower than one multiple, 5 nearest; 10 up (16 > 10)
        nn.ReLU(),
        nn.Conv2d(10, 5, 1),
    ).eval()


def _widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model if isinstance(m, nn.Conv2d)]


X = torch.randn(2, 3, 12, 12)


@pytest.mark.parametrize(
    ("round_to", "mode", "widths"),
    [
        (None, "up", [20, 36, 36, 24, 5, 5]),
        (16, "up", [32, 48, 48, 32, 10, 5]),
        (16, "nearest", [16, 32, 32, 32, 5, 5]),
        (8, "nearest", [24, 40, 40, 24, 8, 5]),  # 20 -> 2.5 blocks -> 3; 36 -> 4.5 -> 5; 5 -> 8
    ],
)
def test_round_mode_nearest_keeps_the_nearest_multiple(round_to, mode, widths):
    pruner = StructuredPruner(_cnn(), X, "magnitude", pruning_ratio=0.5, round_to=round_to, round_mode=mode)
    assert _widths(pruner.prune()) == widths


def test_round_mode_nearest_equals_the_masking_oracle():
    model = _cnn()
    pruner = StructuredPruner(
        model, X, "magnitude", pruning_ratio=0.5, round_to=16, round_mode="nearest",
        bias_compensation=False, recalibrate_bn=False,
    )  # fmt: skip
    units = pruner.plan().pruned_units()
    pruned = pruner.prune()
    assert _widths(pruned) == [16, 32, 32, 32, 5, 5]
    (expected,) = masked_outputs(pruner.graph, units, X)
    with torch.no_grad():
        got = pruned(X)
    assert got.shape == expected.shape == (2, 5, 10, 10)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_round_mode_nearest_in_a_global_plan_keeps_multiples():
    pruned = StructuredPruner(
        _cnn(), X, "magnitude", pruning_ratio=0.5, global_pruning=True, round_to=16, round_mode="nearest"
    ).prune()
    for width, was in zip(_widths(pruned)[:4], (40, 72, 72, 48), strict=True):
        assert width % 16 == 0 and 16 <= width <= was


def test_a_wrong_round_mode_is_refused_by_name():
    with pytest.raises(UserError, match="round_mode='down' must be one of 'up', 'nearest'"):
        StructuredPruner(_cnn(), X, "magnitude", round_to=16, round_mode="down")


def test_the_job_config_passes_round_mode_to_the_pruner():
    assert pruner_options(PruneConfig(round_mode="nearest").to_dict())["round_mode"] == "nearest"
    assert pruner_options(PruneConfig().to_dict())["round_mode"] == "up"


def test_sliced_tensors_keep_their_memory_format():
    keep = torch.tensor([0, 2, 3])
    w4 = torch.randn(5, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    w5 = torch.randn(5, 4, 2, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    for w, fmt in ((w4, torch.channels_last), (w5, torch.channels_last_3d)):
        for dim in (0, 1):
            out = slice_tensor(w, dim, keep)
            assert out.shape[dim] == 3 and out.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(out, w.index_select(dim, keep), rtol=0, atol=0)
    plain = slice_tensor(torch.randn(5, 4, 3, 3), 1, keep)
    assert plain.is_contiguous() and plain.shape == (5, 3, 3, 3)
    assert memory_format_of(torch.randn(4, 6)[:, ::2]) is torch.contiguous_format  # dense in no layout


def test_a_channels_last_model_prunes_to_channels_last_weights_equal_to_the_oracle():
    model = _cnn().to(memory_format=torch.channels_last)
    x = X.contiguous(memory_format=torch.channels_last)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, bias_compensation=False, recalibrate_bn=False)
    units = pruner.plan().pruned_units()
    pruned = pruner.prune()
    convs = [m for m in pruned if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs][:2] == [(20, 3, 3, 3), (36, 20, 1, 1)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    (expected,) = masked_outputs(pruner.graph, units, x)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-5)


#: ATen ops that copy memory or change a layout
COPIES = ("clone", "copy_", "_to_copy", "cat", "constant_pad_nd", "roll", "permute", "transpose", "contiguous")


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _ops(model: nn.Module, x: torch.Tensor) -> list[str]:
    mode = _Ops()
    with torch.no_grad(), mode:
        model(x)
    return mode.names


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "swin"])
def test_a_pruned_model_runs_the_same_ops_as_the_original(arch):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    if arch == "swin":
        from torchvision.models.swin_transformer import SwinTransformer

        model = SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4], num_classes=10).eval()
        x = torch.randn(2, 3, 32, 32)
    else:
        model = tv.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
        x = torch.randn(2, 3, 64, 64)
    pruned = StructuredPruner(model, x[:1], "magnitude", pruning_ratio=0.5).prune()
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    before, after = Counter(_ops(model, x)), Counter(_ops(pruned, x))
    assert before.total() > 100 and after.total() <= before.total()
    # no copy, layout change or pad added; the tiny Swin's one-head windows even drop copies
    # (torch's matmul views a batch it had to clone when a window had two heads)
    assert all(after[op] <= before[op] for op in COPIES)
    assert after - before <= Counter(view=before["clone"] - after["clone"])
    if arch != "swin":
        assert after == before
    assert all(p.is_contiguous() for p in pruned.parameters())


def test_payoff_where_buckets_every_op_and_counts_the_flops_as_the_metrics_do(monkeypatch):
    from pathlib import Path

    from cleanai_core.metrics import count_flops

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    payoff_where = pytest.importorskip("payoff_where")  # imports speed.py, which needs nothing optional
    model = _cnn()
    ops = payoff_where.time_ops(model, X, repeats=2)
    kinds = Counter(k for k, *_ in ops)
    assert kinds["conv dense"] == 5 and kinds["conv depthwise"] == 1 and kinds["activation"] == 5
    assert kinds["norm"] == 2 and set(kinds) <= set(payoff_where.KINDS)
    assert sum(f for _, _, _, f, _ in ops) == count_flops(model, X)
    assert all(t >= 0 for _, _, t, _, _ in ops)


def test_the_speed_benchmark_reruns_itself_without_page_faults_when_asked(monkeypatch):
    """``--allocator no-faults``: the process is replaced by one with glibc's tunables set
    (read only when a process starts); with them set, or with the default, it goes on."""
    import os
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    speed = pytest.importorskip("speed")
    calls = []
    monkeypatch.setattr(speed.os, "execve", lambda exe, args, env: calls.append((args[1:], env["GLIBC_TUNABLES"])))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    speed._with_allocator("default", ["--stages", "resnet50"])
    assert calls == []
    speed._with_allocator("no-faults", ["--stages", "resnet50"])
    assert calls == [([os.path.abspath(speed.__file__), "--stages", "resnet50"], speed.NO_FAULTS)]
    monkeypatch.setenv("GLIBC_TUNABLES", speed.NO_FAULTS)
    speed._with_allocator("no-faults", ["--stages", "resnet50"])
    assert len(calls) == 1
