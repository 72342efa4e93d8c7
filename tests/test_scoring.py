"""WeightActivationImportance: dead channels, multiplicative vs additive, statistic choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner, WeightActivationImportance
from cleanai_core.errors import UserError

DEAD = 2


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def dead_channel_mlp() -> MLP:
    """Hidden unit DEAD never fires on positive inputs but has the largest weights on both sides."""
    torch.manual_seed(0)
    m = MLP()
    with torch.no_grad():
        m.fc1.weight[DEAD] = -5.0
        m.fc1.bias[DEAD] = -1.0
        m.fc2.weight[:, DEAD] = 5.0
    return m


def data(n_batches: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand(16, 6, generator=g) for _ in range(n_batches)]


def fc1_group(plan):
    return next(gp for gp in plan.groups if "fc1" in gp.group.modules())


def plan_for(model, importance, ratio=0.125, **kw):
    p = StructuredPruner(model, data()[0], importance, pruning_ratio=ratio, **kw)
    if getattr(p.importance, "needs_activations", False):
        p.collect_activations(data(), progress=False)
    return p, fc1_group(p.plan())


def test_dead_channel_pruned_first_by_weight_activation_not_by_magnitude():
    m = dead_channel_mlp()
    _, gp = plan_for(m, WeightActivationImportance())
    assert gp.pruned.nonzero().flatten().tolist() == [DEAD]
    assert float(gp.scores[DEAD]) == 0.0
    _, gp_mag = plan_for(m, "magnitude")
    assert gp_mag.n_pruned == 1
    assert not bool(gp_mag.pruned[DEAD])
    assert int(gp_mag.scores.argmax()) == DEAD  # magnitude rates it the most important


def _reference_terms(model, xs, use_var: bool):
    """Per hidden unit: consumer column energy ||W2[:, u]||^2 and E[x_u^2] (or Var) at fc2's input."""
    h = torch.relu(model.fc1(torch.cat(xs))).detach().double()
    w = (model.fc2.weight.detach().double() ** 2).sum(0)
    a = h.var(0, unbiased=False) if use_var else (h**2).mean(0)
    return w, a


@pytest.mark.parametrize("comp", [False, True])
def test_multiplicative_equals_normalised_product(comp):
    m = dead_channel_mlp()
    _, gp = plan_for(m, WeightActivationImportance(0.5, 0.5), bias_compensation=comp)
    w, a = _reference_terms(m, data(), use_var=comp)
    expected = (w / w.mean()).sqrt() * (a / a.mean()).sqrt()
    torch.testing.assert_close(gp.scores, expected, rtol=1e-6, atol=1e-9)
    # alpha = beta ranks exactly like the expected output error ||W[:, u]||^2 E[x_u^2]
    assert torch.equal(torch.argsort(gp.scores), torch.argsort(w * a))


def test_additive_equals_weighted_sum_and_keeps_dead_channel():
    m = dead_channel_mlp()
    _, gp = plan_for(m, WeightActivationImportance(0.3, 0.7, form="additive"), bias_compensation=False)
    w, a = _reference_terms(m, data(), use_var=False)
    expected = 0.3 * w / w.mean() + 0.7 * a / a.mean()
    torch.testing.assert_close(gp.scores, expected, rtol=1e-6, atol=1e-9)
    # the dead unit has a = 0 but the largest weights: additive keeps it, multiplicative prunes it
    assert float(gp.scores[DEAD]) > 0.3 * float(w[DEAD] / w.mean()) - 1e-9
    assert not bool(gp.pruned[DEAD])


def test_exponents_weight_only_and_activation_only():
    m = dead_channel_mlp()
    w, a = _reference_terms(m, data(), use_var=False)
    _, gw = plan_for(m, WeightActivationImportance(1.0, 0.0), bias_compensation=False)
    torch.testing.assert_close(gw.scores, w / w.mean(), rtol=1e-6, atol=1e-9)
    _, ga = plan_for(m, WeightActivationImportance(0.0, 1.0), bias_compensation=False)
    torch.testing.assert_close(ga.scores, a / a.mean(), rtol=1e-6, atol=1e-9)


def test_constant_channel_scores_zero_only_with_compensation():
    """A constant non-zero channel has zero variance: removable exactly if its mean is
    folded into the bias, but costly without compensation."""
    m = dead_channel_mlp()
    with torch.no_grad():
        m.fc1.weight[DEAD] = 0.0
        m.fc1.bias[DEAD] = 2.0  # relu(2) = 2 always
    _, on = plan_for(m, WeightActivationImportance(), bias_compensation=True)
    _, off = plan_for(m, WeightActivationImportance(), bias_compensation=False)
    assert float(on.scores[DEAD]) == pytest.approx(0.0, abs=1e-12)
    assert bool(on.pruned[DEAD])
    assert float(off.scores[DEAD]) > 1.0  # 4 = E[x^2] with big weights: above the mean score
    assert not bool(off.pruned[DEAD])
    # and pruning it with compensation changes the output by (almost) nothing
    p = StructuredPruner(m, data()[0], WeightActivationImportance(), pruning_ratio=0.125)
    p.collect_activations(data(), progress=False)
    small = p.prune()
    x = data()[0]
    torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-5)


def test_needs_activations_and_bad_options():
    m = dead_channel_mlp()
    p = StructuredPruner(m, data()[0], WeightActivationImportance(), pruning_ratio=0.3)
    with pytest.raises(UserError, match="collect_activations"):
        p.plan()
    with pytest.raises(UserError, match="form"):
        WeightActivationImportance(form="sum")
    with pytest.raises(UserError, match="weight_ratio"):
        WeightActivationImportance(0.0, 0.0)
    with pytest.raises(UserError, match="statistic"):
        WeightActivationImportance(statistic="median")
