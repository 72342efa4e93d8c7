"""Fifth round of bad input and edge cases (docs/reliability.md): float32 batches for a
half-precision model, models that cannot be pickled, parametrized models in saved folders,
and more (one section per class)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cleanai_core import GradualPruner, PruningSchedule, StructuredPruner
from cleanai_core.errors import UserError

G = torch.Generator().manual_seed(7)
X = torch.rand(2, 3, 8, 8, generator=G)
XS = torch.rand(12, 3, 8, 8, generator=G)
YS = torch.randint(0, 4, (12,), generator=G)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


# -- float32 batches for a float16 / bfloat16 model ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("importance", ["weight_activation", "taylor"])
def test_float32_batches_for_a_half_precision_model_are_cast_like_its_own(dtype, importance):
    # was RuntimeError: Input type (float) and bias type (c10::Half) should be the same: only
    # float64 batches were cast (the command line and recover() cast every floating input)
    batches = [(XS[i : i + 4], YS[i : i + 4]) for i in range(0, 12, 4)]
    given = StructuredPruner(_net().to(dtype), X.to(dtype), importance, pruning_ratio=0.5)
    given.collect_activations(batches, progress=False)
    cast = StructuredPruner(_net().to(dtype), X.to(dtype), importance, pruning_ratio=0.5)
    cast.collect_activations([(x.to(dtype), y) for x, y in batches], progress=False)
    key = next(iter(cast.stats))
    assert torch.equal(given.stats[key].mean, cast.stats[key].mean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = given.prune(), cast.prune()
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert torch.equal(a(X.to(dtype)), b(X.to(dtype)))


def test_gradual_pruning_of_a_bfloat16_model_takes_float32_batches():
    # the step's BatchNorm refresh ran the batches uncast (RuntimeError: Input type (float) ...)
    model = _net().bfloat16().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gp = GradualPruner(model, X.bfloat16(), opt, PruningSchedule(final=0.5, steps=2), importance="magnitude")
    for _ in range(2):
        model, opt = gp.step([(XS[:8], YS[:8])])
    assert model[0].weight.shape[0] < 8 and model[0].weight.dtype == torch.bfloat16
    assert gp.flops_share() < 0.6
    assert model(XS[:2].bfloat16()).shape == (2, 4)
