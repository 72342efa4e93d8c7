"""A sixteenth set of the scenarios users bring from Torch-Pruning, written for CleanAI's API
(see ``test_peer_scenarios.py`` to ``_15``): the peer's option values that CleanAI refused
although they have a plain meaning here: ``max_pruning_ratio=1.0`` (its default), a
magnitude norm of any order ``p``, and a per-group normaliser given as ``None``, as a
function, or spelt ``"standarization"``.

Each test asserts widths, parameter counts or the scores themselves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_peer_scenarios_6 import _seeded
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.metrics import count_params
from cleanai_core.scoring import get_importance
from cleanai_core.testing import masked_forward

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


class TransposeModel(nn.Module):
    """The peer's ``test_pruner_TransposeConv`` model: conv, BN, transposed conv, BN, conv, BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.ConvTranspose2d(16, 64, 2, stride=2)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 8, 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.relu(self.bn3(self.conv3(x)))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _params(k1: int, k2: int) -> int:
    """Parameters of :class:`TransposeModel` with ``k1`` and ``k2`` channels kept."""
    return (27 * k1 + k1 + 2 * k1) + (k1 * k2 * 4 + k2 + 2 * k2) + (k2 * 8 * 9 + 8) + 16


# -- max_layer_ratio=1.0: Torch-Pruning's default max_pruning_ratio ------------------------------


@pytest.mark.parametrize("steps", [1, 3])
def test_max_layer_ratio_of_one_caps_nothing_but_min_channels(steps):
    """``max_layer_ratio=1.0`` was refused ("must be a number between 0 and 1"); the peer's
    ``max_pruning_ratio`` defaults to it. Global ranking at 0.9 of the 80 units then takes
    all 72 (at 0.9 the caps, 14 of 16 and 57 of 64, allow 71 only), and every group still
    keeps ``min_channels``."""
    model = _seeded(TransposeModel)
    assert count_params(model) == _params(16, 64)
    capped = StructuredPruner(
        model, X, "magnitude", pruning_ratio=0.9, global_pruning=True, max_layer_ratio=0.9, iterative_steps=steps
    ).prune()
    assert (capped.conv1.out_channels, capped.conv2.out_channels) == (2, 7)
    free = StructuredPruner(
        model, X, "magnitude", pruning_ratio=0.9, global_pruning=True, max_layer_ratio=1.0, iterative_steps=steps
    ).prune()
    k1, k2 = free.conv1.out_channels, free.conv2.out_channels
    assert k1 + k2 == 80 - 72 and k1 >= 1 and k2 >= 1
    assert (free.bn1.num_features, free.conv2.in_channels, free.bn2.num_features, free.conv3.in_channels) == (
        k1,
        k1,
        k2,
        k2,
    )
    assert count_params(free) == _params(k1, k2) < _params(2, 7) == count_params(capped)
    assert free(X).shape == (2, 8, 16, 16)
    kept3 = StructuredPruner(
        model, X, "magnitude", pruning_ratio=0.99, global_pruning=True, max_layer_ratio=1.0, min_channels=3
    ).prune()
    assert (kept3.conv1.out_channels, kept3.conv2.out_channels) == (3, 3)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1, "1"])
def test_max_layer_ratio_outside_zero_to_one_is_still_refused(bad):
    with pytest.raises(UserError, match=r"max_layer_ratio=.* must be a number between 0 and 1 \(above 0; 1 caps"):
        StructuredPruner(_seeded(TransposeModel), X, "magnitude", global_pruning=True, max_layer_ratio=bad)


# -- magnitude of any order p -----------------------------------------------------------------------


def _two_filters() -> nn.Sequential:
    """Filter 0 has one large weight (L1 3, sum of cubes 27), filter 1 27 weights of 0.2
    (L1 5.4, sum of cubes 0.216), filters 2 and 3 larger than both by every norm."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False)).eval()
    with torch.no_grad():
        w = torch.zeros(4, 3, 3, 3)
        w[0, 0, 0, 0] = 3.0
        w[1] = 0.2
        w[2:] = 1.0
        model[0].weight.copy_(w)
        model[2].weight.fill_(1.0)
    return model


@pytest.mark.parametrize(("p", "first_out"), [(0.5, 0), (1, 0), (2, 1), (3, 1), (4, 1)])
def test_magnitude_of_any_order_ranks_filters_by_the_sum_of_their_pth_powers(p, first_out):
    """``MagnitudeImportance(p=3)`` (the peer takes any ``p``) was refused: "use 1 or 2".
    The producer's term is now ``sum |w|^p`` over each filter, divided by its mean: at
    ``p <= 1`` the filter of many small weights outranks the single large one, above it
    the opposite, so a different filter goes first."""
    model = _two_filters()
    x = torch.randn(1, 3, 6, 6)
    pruner = StructuredPruner(model, x, get_importance("magnitude", p=p, reducer="first"), pruning_ratio=0.25)
    plan = pruner.plan()
    (gp,) = [g for g in plan.groups if g.group.size == 4]
    w = model[0].weight.detach().double().abs().pow(p).flatten(1).sum(1)
    assert torch.allclose(gp.scores, w / w.mean())
    assert gp.pruned.nonzero().flatten().tolist() == [first_out]
    small = pruner.prune()
    assert small[0].out_channels == 3 and count_params(small) == 3 * 27 + 2 * 3


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), True, "2"])
def test_magnitude_order_must_be_a_positive_finite_number(bad):
    with pytest.raises(UserError, match="give a positive finite number"):
        get_importance("magnitude", p=bad)


# -- the per-group normaliser: None, a function, the peer's spelling -----------------------------


class RawScale:
    """A criterion of the user's whose scores are on the groups' own scales: unit ``i``
    scores ``i + 1``, times 1000 in the 16-unit group. Ranked unnormalised, only the
    64-unit group loses units."""

    needs_activations = False
    needs_gradients = False

    def __call__(self, group, ctx) -> torch.Tensor:
        return torch.arange(1, group.size + 1, dtype=torch.float64) * (1000.0 if group.size == 16 else 1.0)


def _pruned(normalizer) -> list[list[int]]:
    pruner = StructuredPruner(
        _seeded(TransposeModel), X, RawScale(), pruning_ratio=0.5, global_pruning=True, normalizer=normalizer
    )
    return [gp.pruned.nonzero().flatten().tolist() for gp in pruner.plan().groups]


def test_a_normaliser_given_as_none_as_a_function_or_in_the_peers_spelling():
    """``normalizer=None`` ("must be the name of a normaliser"), a function
    ("must be the name ...") and ``"standarization"`` ("unknown normaliser") were refused:
    they are the peer's no normalisation, its callable normaliser and its spelling of
    min-max. Each now ranks as its named equivalent does."""
    unnormalised = _pruned(None)
    assert unnormalised == _pruned("none") == [[], list(range(40))]
    by_max = _pruned(lambda s: s / s.max())
    assert by_max == _pruned("max") == [list(range(8)), list(range(32))]  # (i + 1) / 16 against (i + 1) / 64
    assert _pruned("standarization") == _pruned("standardization") != unnormalised


@pytest.mark.parametrize(
    ("fn", "words"),
    [
        (lambda s: s[:1], r"must return one finite number per score: got shape \(1,\) for scores of shape \(16,\)"),
        (lambda s: s / 0.0, r"must return one finite number per score: got NaN or inf for 16 of 16 scores"),
        (lambda s: s.no_such_method(), "failed on a group's scores .*AttributeError"),
    ],
)
def test_a_normaliser_function_that_misbehaves_is_refused_by_name(fn, words):
    model = _seeded(TransposeModel)
    pruner = StructuredPruner(model, X, RawScale(), pruning_ratio=0.5, global_pruning=True, normalizer=fn)
    with pytest.raises(UserError, match="normalizer <lambda> " + words):
        pruner.plan()


def test_a_normaliser_function_leaves_slicing_exact():
    """The pruned model of a callable normaliser's plan equals the masked original (no
    compensation, no BatchNorm recalibration)."""
    pruner = StructuredPruner(
        _seeded(TransposeModel),
        X,
        RawScale(),
        pruning_ratio=0.5,
        global_pruning=True,
        normalizer=lambda s: s / s.sum(),
        bias_compensation=False,
        reconstruction=False,
        recalibrate_bn=False,
    )
    small = pruner.prune()
    (expected,) = masked_forward(pruner.graph, pruner.plan().pruned_units(), X)
    assert float((small(X) - expected).abs().max()) < 1e-5
    # (i + 1) / 136 against (i + 1) / 2080: the 40 lowest are 1/136, 2/136 and 1/2080 .. 38/2080
    assert (small.conv1.out_channels, small.conv2.out_channels) == (16 - 2, 64 - 38)
    assert count_params(small) == _params(14, 26)


# -- iterative_schedule: Torch-Pruning's iterative_pruning_ratio_scheduler -----------------------


def _linear(ratio: float, steps: int) -> list[float]:
    return [ratio * i / steps for i in range(steps + 1)]


def _kept_per_step(pruner: StructuredPruner) -> list[tuple[int, int]]:
    """(conv1, conv2) output channels after each step, read from the history."""
    out = []
    for edits in pruner.history.steps:
        kept = {e.module: len(e.keep) for e in edits if e.slice == "out"}
        out.append((kept["conv1"], kept["conv2"]))
    return out


@pytest.mark.parametrize(
    ("options", "linear", "front_loaded"),
    [
        ({}, [(13, 53), (11, 43), (8, 32)], [(12, 48), (10, 38), (8, 32)]),
        ({"global_pruning": True}, None, "20 then 32 of 80 units gone"),
        ({"layer_pruning_ratios": {"conv2": 0.75}}, [(13, 48), (11, 32), (8, 16)], [(12, 40), (10, 26), (8, 16)]),
    ],
)
def test_an_iterative_schedule_sets_how_much_each_step_removes(options, linear, front_loaded):
    """The peer's ``iterative_pruning_ratio_scheduler`` had no equivalent: ``iterative_steps``
    removed equal shares. ``iterative_schedule`` takes the scheduler (or its ``steps + 1``
    ratios): each step ends at its share of the way to the final counts, layer ratios on
    the same curve. Its linear scheduler gives the default steps; ``[0, 0.25, 0.4, 0.5]``
    leaves 12 of 16 and 48 of 64 channels after the first step (a layer ratio of 0.75: 64
    -> 40, half of the way to 16), and every schedule ends at the same widths."""
    model = _seeded(TransposeModel)

    def run(schedule):
        pruner = StructuredPruner(
            model, X, "magnitude", pruning_ratio=0.5, iterative_steps=3, iterative_schedule=schedule, **options
        )
        pruner.pruned = pruner.prune()
        return pruner

    default, by_linear, early = run(None), run(_linear), run([0.0, 0.25, 0.4, 0.5])
    assert _kept_per_step(by_linear) == _kept_per_step(default)
    if linear is not None:
        assert _kept_per_step(default) == linear
        assert _kept_per_step(early) == front_loaded
    else:  # global ranking: 0.25 and 0.4 of the 80 units gone after the first two steps
        assert [k1 + k2 for k1, k2 in _kept_per_step(early)] == [80 - 20, 80 - 32, 80 - 40]
    finals = [_kept_per_step(p)[-1] for p in (default, by_linear, early)]
    assert all(sum(f) == sum(finals[0]) for f in finals)
    if not options.get("global_pruning"):  # global ranking may share the last units out otherwise
        assert finals[0] == finals[1] == finals[2]
    assert count_params(early.pruned) == _params(*_kept_per_step(early)[-1])


def test_a_scheduled_run_equals_the_masked_original_of_its_whole_plan():
    """After a scheduled run ``plan()`` is what all steps removed on the original graph, and
    the returned model equals the original with those units zeroed (no compensation, no
    BatchNorm recalibration)."""
    pruner = StructuredPruner(
        _seeded(TransposeModel),
        X,
        "magnitude",
        pruning_ratio=0.5,
        iterative_steps=3,
        iterative_schedule=[0.0, 0.3, 0.45, 0.5],
        bias_compensation=False,
        reconstruction=False,
        recalibrate_bn=False,
    )
    small = pruner.prune()
    units = pruner.plan().pruned_units()
    assert int(units.sum()) == 8 + 32
    (expected,) = masked_forward(pruner.graph, units, X)
    assert float((small(X) - expected).abs().max()) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"iterative_schedule": [0.0, 0.5]}, r"must give 4 ratios .* rising from 0 to 0.5; got \[0.0, 0.5\]"),
        ({"iterative_schedule": [0.0, 0.3, 0.2, 0.5]}, r"none below the one before; got \[0.0, 0.3, 0.2, 0.5\]"),
        ({"iterative_schedule": [0.0, 0.1, 0.2, 0.4]}, r"must end at pruning_ratio=0.5; got"),
        ({"iterative_schedule": lambda r, n: 1 / 0}, r"schedule .*<lambda>\(0.5, 3\) failed: ZeroDivisionError"),
        ({"iterative_schedule": _linear, "iterative_steps": 1}, r"needs iterative_steps of 2 or more \(got 1\)"),
        ({"iterative_schedule": _linear, "target_flops": 0.5}, r"with target_flops each step ends at"),
    ],
)
def test_a_schedule_that_does_not_fit_is_refused_with_what_it_must_give(kwargs, words):
    options = {"pruning_ratio": 0.5, "iterative_steps": 3, **kwargs}
    with pytest.raises(UserError, match=words):
        StructuredPruner(_seeded(TransposeModel), X, "magnitude", **options)


def test_changing_the_step_count_after_a_schedule_is_refused_before_any_work():
    pruner = StructuredPruner(
        _seeded(TransposeModel), X, "magnitude", pruning_ratio=0.5, iterative_steps=3, iterative_schedule=_linear
    )
    pruner.iterative_steps = 2
    with pytest.raises(UserError, match="was given for 3 steps, but iterative_steps is now 2: build a new"):
        pruner.prune()
    assert pruner.history.steps == []


# -- a criterion written for Torch-Pruning: __call__(self, group) ----------------------------------


class OneArgument:
    """A criterion in Torch-Pruning's form, called with the group alone."""

    def __call__(self, group):
        return torch.ones(len(group))


class GroupAndContext:
    """The same, in CleanAI's form: one score per unit of ``group``, here its index."""

    def __call__(self, group, ctx):
        return torch.arange(group.size, dtype=torch.float64)


def test_a_criterion_called_with_the_group_alone_is_refused_with_cleanais_signature():
    """A criterion written as ``__call__(self, group)`` raised a raw ``TypeError: __call__()
    takes 2 positional arguments but 3 were given`` from inside scoring; it is now refused
    when the pruner is built, with the signature CleanAI calls. The same criterion taking
    ``ctx`` too prunes: the lowest indices go first."""
    model = _seeded(TransposeModel)
    with pytest.raises(UserError, match=r"importance OneArgument cannot be called as importance\(group, ctx\)"):
        StructuredPruner(model, X, OneArgument())
    small = StructuredPruner(model, X, GroupAndContext(), pruning_ratio=0.5).prune()
    assert (small.conv1.out_channels, small.conv2.out_channels) == (8, 32)
    assert torch.equal(small.conv1.weight, model.conv1.weight[8:])
