"""Least squares by products: a consumer whose pruner gives its weights on the removed
channels (``LayerPruner.removed_weights``) gets ``B @ coef`` solved for over the rows that
slicing keeps. The pruned models must equal those of the coefficients' path
(``reconstruct``) to float tolerance, and a pruner with only ``reconstruct`` keeps working."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner, compensation, hookimpl
from cleanai_core.interfaces import LayerPruner
from cleanai_core.plugins import temporary_plugin
from cleanai_plugins.layers.conv import ConvPruner
from cleanai_plugins.layers.linear import LinearPruner


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 24), nn.Linear(24, 20), nn.Linear(20, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class _Cnn(nn.Module):
    """1x1 consumers with few kept output rows (products), a 3x3 one with many rows
    (coefficients on the kept rows), a grouped conv (mean only) and a consumer behind it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.narrow = nn.Conv2d(16, 6, 1)
        self.wide = nn.Conv2d(6, 12, 3, padding=1, bias=False)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = torch.tanh(self.narrow(torch.tanh(self.stem(x))))
        y = torch.tanh(self.wide(y))
        return self.head(torch.tanh(self.grouped(y)) + y)


def _pruned(model: nn.Module, data: list, by_products: bool, monkeypatch, rows: float = 10.0) -> dict:
    """The pruned model's state, solved by products (where the pruner can and the kept rows
    are at most ``rows`` times the removed channels: 10, every consumer) or by the
    coefficients alone; records the sizes of the products solved for in ``_pruned.sizes``."""
    sizes: list[tuple[int, int]] = []
    real = compensation.regress

    def recording(cov, mean, removed, kept, damping=1e-3, weights=None, coef=True):
        sizes.extend((b.shape[0], len(removed)) for b in weights or ())
        return real(cov, mean, removed, kept, damping, weights, coef)

    with monkeypatch.context() as m:
        m.setattr(compensation, "regress", recording)
        m.setattr(compensation, "PRODUCT_ROWS", rows)
        if not by_products:
            m.setattr(compensation, "_folds_by_products", lambda pruner: False)
        pruner = StructuredPruner(model, data[0], pruning_ratio=0.5, recalibrate_bn=False)
        pruner.collect_activations(data, progress=False)
        state = {k: v.clone() for k, v in pruner.prune().state_dict().items()}
    _pruned.sizes = sizes
    return state


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        scale = max(1.0, float(b[key].abs().max()))
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6 * scale, msg=key)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rows", [0.5, 10.0])
def test_linear_consumers_with_pruned_outputs_equal_the_coefficients_path(seed, rows, monkeypatch):
    torch.manual_seed(seed)
    model = _Mlp().eval()
    data = [torch.randn(40, 6) * 2 + 1 for _ in range(3)]
    new = _pruned(model, data, True, monkeypatch, rows)
    sizes = _pruned.sizes
    old = _pruned(model, data, False, monkeypatch)
    assert _pruned.sizes == []  # the coefficients' path solves for no product
    # b keeps 10 of its 20 rows against 12 removed inputs (coefficients on those rows at
    # the default 0.5); c has 3 rows against 10 removed
    assert sizes == ([(10, 12), (3, 10)] if rows > 1 else [(3, 10)])
    assert new["b.weight"].shape == (10, 12) and new["c.weight"].shape == (3, 10)
    _assert_close(new, old)


@pytest.mark.parametrize("seed", [0, 1])
def test_conv_consumers_grouped_and_not_equal_the_coefficients_path(seed, monkeypatch):
    torch.manual_seed(seed)
    model = _Cnn().eval()
    data = [torch.randn(4, 3, 10, 10) for _ in range(3)]
    new = _pruned(model, data, True, monkeypatch, rows=0.5)
    sizes = _pruned.sizes
    old = _pruned(model, data, False, monkeypatch)
    assert (3, 8) in sizes  # narrow: 3 kept rows x 1 position < 8 removed: by products
    assert all(n <= r / 2 for n, r in sizes)  # wide (6 x 9 rows > 3 removed): coefficients, on its kept rows
    assert "wide.bias" in new and new["wide.bias"].shape == (6,)  # the intercept creates a bias, as before
    _assert_close(new, old)


def test_conv1d_consumer_equals_the_coefficients_path(monkeypatch):
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Gpt2Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc, self.c_mid, self.c_proj = Conv1D(24, 6), Conv1D(16, 24), Conv1D(4, 16)

        def forward(self, x):
            return self.c_proj(torch.tanh(self.c_mid(torch.tanh(self.c_fc(x)))))

    torch.manual_seed(0)
    model = Gpt2Mlp().eval()
    data = [torch.randn(2, 20, 6) for _ in range(3)]
    new = _pruned(model, data, True, monkeypatch)
    assert (8, 12) in _pruned.sizes
    old = _pruned(model, data, False, monkeypatch)
    _assert_close(new, old)


class _NoBiasLinears:
    @hookimpl
    def cleanai_layer_pruner(self, module):
        if isinstance(module, nn.Linear) and module.bias is None:
            return LinearPruner(new_bias=False)
        return None


def test_a_layer_that_gets_no_bias_equals_the_coefficients_path(monkeypatch):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 18), nn.Tanh(), nn.Linear(18, 16, bias=False), nn.Tanh(), nn.Linear(16, 2))
    data = [torch.randn(50, 5) + 2 for _ in range(3)]
    with temporary_plugin(_NoBiasLinears(), name="no_bias"):
        new = _pruned(model.eval(), data, True, monkeypatch)
        assert (8, 9) in _pruned.sizes
        old = _pruned(model.eval(), data, False, monkeypatch)
    assert "2.bias" not in new
    _assert_close(new, old)


def test_products_equal_the_folded_coefficients():
    """``regress(weights=...)``: ``B @ coef`` and ``B @ shift`` for each ``B``, in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 30, generator=g, dtype=torch.float64) @ torch.randn(30, 30, generator=g, dtype=torch.float64)
    cov, mean = torch.cov(x.T, correction=0), x.mean(0) + 2.0
    removed, kept = torch.arange(0, 30, 3), torch.tensor([i for i in range(30) if i % 3])
    coef, shift = compensation.regress(cov, mean, removed, kept)
    mats = [torch.randn(4, 10, generator=g), torch.randn(7, 10, generator=g, dtype=torch.float64)]
    got = compensation.regress(cov, mean, removed, kept, weights=mats, coef=False)
    assert len(got) == 4
    both = compensation.regress(cov, mean, removed, kept, weights=mats[:1])
    assert torch.equal(both[0], coef) and torch.equal(both[1], shift)
    for b, (product, bias) in zip(mats, (got[:2], got[2:]), strict=True):
        b = b.double()
        assert product.dtype == torch.float64 and product.shape == (b.shape[0], 20)
        torch.testing.assert_close(product, b @ coef, rtol=1e-10, atol=1e-10 * float((b @ coef).abs().max()))
        torch.testing.assert_close(bias, b @ shift, rtol=1e-10, atol=1e-10 * float((b @ shift).abs().max()))


class _OwnReconstruct(LinearPruner):
    """A third-party subclass that changed ``reconstruct``: it must still be called."""

    calls = 0

    def reconstruct(self, module, slice_name, removed, kept, coef, shift):
        type(self).calls += 1
        return super().reconstruct(module, slice_name, removed, kept, coef, shift)


class _OnlyReconstruct(LayerPruner):
    """A pruner written against the old interface: ``reconstruct`` only."""

    name = "only_reconstruct"

    def __init__(self) -> None:
        self.inner = LinearPruner()
        self.calls = 0

    def trace(self, module, call, ctx):
        self.inner.trace(module, call, ctx)

    def prune(self, module, keep):
        self.inner.prune(module, keep)

    def weight_energy(self, module, slice_name):
        return self.inner.weight_energy(module, slice_name)

    def compensate(self, module, slice_name, removed, mean):
        return self.inner.compensate(module, slice_name, removed, mean)

    def reconstruct(self, module, slice_name, removed, kept, coef, shift):
        self.calls += 1
        return self.inner.reconstruct(module, slice_name, removed, kept, coef, shift)


class _Claim:
    def __init__(self, pruner) -> None:
        self.pruner = pruner

    @hookimpl
    def cleanai_layer_pruner(self, module):
        return self.pruner if isinstance(module, nn.Linear) else None


@pytest.mark.parametrize("make", [_OwnReconstruct, _OnlyReconstruct])
def test_a_pruner_with_its_own_reconstruct_is_still_called(make, monkeypatch):
    assert not compensation._folds_by_products(make())
    assert compensation._folds_by_products(LinearPruner()) and compensation._folds_by_products(ConvPruner())
    torch.manual_seed(0)
    model = _Mlp().eval()
    data = [torch.randn(40, 6) * 2 + 1 for _ in range(3)]
    want = _pruned(model, data, False, monkeypatch)
    pruner = make()
    _OwnReconstruct.calls = 0
    with temporary_plugin(_Claim(pruner), name="claim"):
        got = _pruned(model, data, True, monkeypatch)
    assert _pruned.sizes == [] and (pruner.calls if make is _OnlyReconstruct else _OwnReconstruct.calls) == 2
    _assert_close(got, want)
