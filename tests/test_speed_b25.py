"""Session 25 (speedB, issue #21): a reconstruction's weight update by ``add_at``.

``add_at(weight, rows, cols, delta)`` adds ``delta`` at the rows and columns a
reconstruction by products folds into (:meth:`LayerPruner.add_reconstruction`). It must give
the very bits that ``index_put_(..., accumulate=True)`` gave (one float addition per
entry), write into the weight itself (the module's tensor, not a copy), and the pruned
models of the compensated path must be those of that update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.interfaces import add_at


def _indices(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=g)[:k]


def _reference(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``weight[rows[i], cols[j]] += delta[i, j]`` entry by entry, in the weight's dtype."""
    out = weight.clone()
    for i, r in enumerate(rows.tolist()):
        for j, c in enumerate(cols.tolist()):
            out[r, c] = out[r, c] + delta[i, j]
    return out


@pytest.mark.parametrize(
    ("shape", "kept"),
    [
        ((12, 30), (5, 11)),  # a linear layer's weight
        ((16, 8, 1, 1), (7, 3)),  # a 1x1 convolution: the matrix path
        ((10, 6, 3, 3), (4, 5)),  # a 3x3 convolution: index_put_
        ((9, 7, 1, 2), (2, 6)),  # a kernel of two positions
    ],
)
def test_add_at_equals_the_update_entry_by_entry(shape, kept):
    g = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(*shape, generator=g)
    rows, cols = _indices(shape[0], kept[0], g), _indices(shape[1], kept[1], g)  # unsorted, no repeats
    delta = torch.randn(kept[0], kept[1], *shape[2:], generator=g)
    want = _reference(weight, rows, cols, delta)
    accumulated = weight.clone()
    accumulated.index_put_((rows[:, None], cols[None, :]), delta, accumulate=True)
    before, original = weight.data_ptr(), weight.clone()
    add_at(weight, rows, cols, delta)
    assert weight.data_ptr() == before  # written in place
    assert torch.equal(weight, want)
    assert torch.equal(weight, accumulated)
    assert not torch.equal(weight, original)


def test_add_at_on_a_channels_last_convolution_weight_and_a_transposed_view():
    """Weights that are not contiguous matrices (channels-last 1x1 convolution, a transposed
    view) take the ``index_put_`` path and give the same result."""
    g = torch.Generator().manual_seed(3)
    conv = torch.randn(8, 6, 2, 2, generator=g).to(memory_format=torch.channels_last)
    rows, cols = torch.tensor([6, 1, 3]), torch.tensor([0, 5])
    delta = torch.randn(3, 2, 2, 2, generator=g)
    want = _reference(conv, rows, cols, delta)
    add_at(conv, rows, cols, delta)
    assert torch.equal(conv, want)
    base = torch.randn(5, 9, generator=g)
    view = base.T  # (9, 5), not contiguous
    rows, cols = torch.tensor([8, 0, 4]), torch.tensor([2, 3])
    delta = torch.randn(3, 2, generator=g)
    want = _reference(view, rows, cols, delta)
    add_at(view, rows, cols, delta)
    assert torch.equal(view, want) and torch.equal(base.T, want)


class _Net(nn.Module):
    """1x1 and linear consumers with few kept output rows (the products path), a 3x3 one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.point = nn.Conv2d(16, 8, 1)
        self.spatial = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 6)

    def forward(self, x):
        y = torch.tanh(self.spatial(torch.tanh(self.point(torch.tanh(self.stem(x))))))
        return self.fc2(torch.tanh(self.fc1(y.mean((2, 3)))))


def test_the_compensated_prune_equals_one_with_the_accumulating_update(monkeypatch):
    """The whole default path on a small model: the pruned state equals, bit for bit, the
    one the layer pruners gave with ``index_put_(accumulate=True)``, and the update ran."""
    from cleanai_core import interfaces
    from cleanai_plugins.layers import conv, linear

    def prune() -> dict:
        torch.manual_seed(0)
        model = _Net().eval()
        g = torch.Generator().manual_seed(1)
        data = [torch.randn(4, 3, 10, 10, generator=g) for _ in range(3)]
        pr = StructuredPruner(model, data[0][:1], pruning_ratio=0.5)
        pr.collect_activations(data, progress=False)
        return pr.prune().state_dict()

    calls: list[tuple] = []

    def accumulating(weight, rows, cols, delta):
        calls.append(tuple(weight.shape))
        weight.index_put_((rows[:, None], cols[None, :]), delta, accumulate=True)

    new = prune()
    with monkeypatch.context() as m:
        for module in (interfaces, conv, linear):
            m.setattr(module, "add_at", accumulating)
        old = prune()
    assert calls  # the products path ran
    assert new.keys() == old.keys()
    for key in new:
        assert torch.equal(new[key], old[key]), key


def test_a_transformers_conv1d_reconstruction_adds_at_its_transposed_rows():
    """Hugging Face's ``Conv1D`` holds its weight as ``(in, out)``: the update lands at the
    kept inputs' rows and the kept outputs' columns, as the accumulating ``index_put_`` did."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from cleanai_plugins.zoo.transformers.conv1d import Conv1DPruner

    torch.manual_seed(0)
    module = Conv1D(10, 7)  # nx=7 inputs, nf=10 outputs: weight (7, 10)
    kept, rows = torch.tensor([0, 2, 3, 6]), torch.tensor([9, 1, 4])
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(3, 4, generator=g, dtype=torch.float64)  # (kept outputs, kept inputs)
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    want_w = module.weight.detach().clone()
    want_w.index_put_((kept[:, None], rows[None, :]), delta.float().T, accumulate=True)
    want_b = module.bias.detach().clone()
    want_b[rows] += bias.float()
    Conv1DPruner().add_reconstruction(module, "in", kept, {"out": rows}, delta, bias)
    assert torch.equal(module.weight.detach(), want_w)
    assert torch.equal(module.bias.detach(), want_b)
