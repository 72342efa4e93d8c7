"""Every registered importance criterion, through the public pruner: scores have one finite
value per unit, criteria that read activations rank a dead unit lowest, Taylor matches
``sum (w * dL/dw)^2`` computed by hand, and the reducer option really folds the terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cleanai_core import StructuredPruner, hookimpl
from cleanai_core.errors import UserError
from cleanai_core.interfaces import Importance
from cleanai_core.plugins import temporary_plugin
from cleanai_core.scoring import get_importance, list_importances

DEAD = 2
BUILTIN = {"weight_activation", "magnitude", "bn_scale", "taylor", "hessian", "random", "lamp", "fpgm"}


def mlp() -> nn.Sequential:
    """Hidden unit DEAD never fires on the (positive) data but has the largest weights."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        m[0].weight[DEAD] = -5.0
        m[0].bias[DEAD] = -1.0
        m[2].weight[:, DEAD] = 5.0
    return m


def labelled(n_batches: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.rand(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n_batches)]


def plan(model: nn.Module, importance, data=None, ratio: float = 0.25):
    pruner = StructuredPruner(model, labelled()[0][0], importance, pruning_ratio=ratio)
    if pruner.importance.needs_activations:
        pruner.collect_activations(data or labelled(), progress=False)
    return pruner, pruner.plan()


def hidden(pl):
    return next(gp for gp in pl.groups if "0" in gp.group.modules())


def test_registry_holds_the_builtin_criteria():
    assert BUILTIN <= set(list_importances())


@pytest.mark.parametrize("name", list_importances())
def test_criterion_scores_every_unit_once_and_finitely(name):
    importance = get_importance(name)
    assert isinstance(importance, Importance)  # needs_activations, needs_gradients, __call__
    pruner, pl = plan(mlp(), importance)
    assert [gp.group.size for gp in pl.groups] == [8]
    for gp in pl.groups:
        assert gp.scores.shape == (gp.group.size,) and gp.scores.dtype == torch.float64
        assert bool(torch.isfinite(gp.scores).all())
        assert gp.n_pruned == 2  # a quarter of 8
    if importance.needs_activations:  # reads the data: the unit that never fires goes first
        scores = hidden(pl).scores
        assert float(scores[DEAD]) < float(torch.cat([scores[:DEAD], scores[DEAD + 1 :]]).min())
        assert bool(hidden(pl).pruned[DEAD])
    assert bool(pruner.gradients) == importance.needs_gradients


def test_taylor_scores_are_the_squared_weight_gradient_products():
    model = mlp()
    data = labelled()
    _, pl = plan(model, "taylor", data)
    ref = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    w1, b1, w2, b2 = ref
    for x, y in data:  # what collect_activations accumulates: the sum over batches of each batch's mean loss
        F.cross_entropy(F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2), y).backward()
    g1, g2 = (w1.detach() * w1.grad).double(), (w2.detach() * w2.grad).double()
    expected = (g1**2).sum(1) + (g2**2).sum(0)  # fc1 rows (out slice) + fc2 columns (in slice), reducer "sum"
    torch.testing.assert_close(hidden(pl).scores, expected, rtol=1e-5, atol=1e-12)
    assert float(expected[DEAD]) == 0.0 and float(expected.min()) == 0.0 and int((expected == 0).sum()) == 1


def test_taylor_needs_labels():
    pruner = StructuredPruner(mlp(), labelled()[0][0], "taylor", pruning_ratio=0.25)
    with pytest.raises(UserError, match="labels"):
        pruner.collect_activations([x for x, _ in labelled()], progress=False)


class CountReducer:
    """Registers a reducer that returns how many terms each unit had."""

    @hookimpl
    def cleanai_reducers(self):
        return {"count": lambda scores: scores.new_full((scores.shape[1],), float(scores.shape[0]))}


@pytest.mark.parametrize("name", ["magnitude", "bn_scale", "weight_activation", "taylor"])
def test_reducer_option_folds_the_terms(name):
    with temporary_plugin(CountReducer(), name="count"):
        _, counted = plan(mlp(), get_importance(name, reducer="count"))
    n_terms = hidden(counted).scores
    assert bool((n_terms == n_terms[0]).all()) and float(n_terms[0]) >= 1
    _, summed = plan(mlp(), get_importance(name, reducer="sum"))
    _, averaged = plan(mlp(), get_importance(name, reducer="mean"))
    torch.testing.assert_close(hidden(summed).scores, hidden(averaged).scores * n_terms)


def test_default_reducers_and_unknown_reducer():
    assert get_importance("magnitude").reducer == "mean" and get_importance("taylor").reducer == "sum"
    with pytest.raises(UserError, match="unknown reducer 'median'.*mean"):
        get_importance("magnitude", reducer="median")
