"""Session 25 review (review17) of the count slices, the write guard's new order and the
new options (iterative_schedule, normalizer functions, max_layer_ratio=1.0): the cases
probed, with the numbers they give."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cleanai_core import StructuredPruner, load_pruned
from cleanai_core.errors import UserError
from cleanai_core.io import save_pruned

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class CountedSplit(nn.Module):
    """C2f's pattern: ``cv1``'s channels split by ``self.c``; ``how="scale"`` also multiplies
    the output by ``self.c``, ``how="shared"`` splits a second conv's channels by it too."""

    def __init__(self, how: str = "plain") -> None:
        super().__init__()
        self.how, self.c = how, 8
        self.cv1 = nn.Conv2d(3, 16, 1)
        self.m = nn.Conv2d(8, 8, 3, padding=1)
        self.cv2 = nn.Conv2d(24, 4, 1)
        if how == "shared":
            self.cv3 = nn.Conv2d(3, 16, 1)
            self.cv4 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a, b = self.cv1(x).split((self.c, self.c), 1)
        y = self.cv2(torch.cat([a, b, self.m(F.relu(b))], 1))
        if self.how == "scale":
            return y * self.c
        if self.how == "shared":
            p, q = self.cv3(x).split((self.c, self.c), 1)
            return y + self.cv4(torch.cat([q, p], 1))
        return y


def shared_split():
    torch.manual_seed(0)
    return CountedSplit("shared")


def test_a_count_that_also_scales_the_output_keeps_its_group_whole():
    """``self.c`` sizes the split and scales the output: the count slice would rescale the
    model, so verification skips that group, the number stays 8 and the output is the
    original's (the other group still prunes)."""
    torch.manual_seed(0)
    model = CountedSplit("scale").eval()
    with pytest.warns(RuntimeWarning, match="skipped group"):
        pruner = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5)
        small = pruner.prune()
    assert len(pruner.skipped_groups) == 1 and "c=0" in pruner.skipped_groups[0]
    assert (small.c, small.cv1.out_channels, small.m.out_channels, model.c) == (8, 16, 4, 8)
    with torch.no_grad():
        assert small(X).shape == (2, 4, 8, 8)


def test_one_count_shared_by_two_splits_keeps_both_at_one_width(tmp_path):
    """One ``self.c`` sizes two producers' splits: asked to keep 0.75 and 0.25 of them, both
    keep the larger count (6 of 8 a part), and the saved folder reloads bit-identically."""
    model = shared_split().eval()
    pruner = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5, layer_pruning_ratios={"cv1": 0.25, "cv3": 0.75})
    small = pruner.prune()
    assert pruner.skipped_groups == []
    assert (small.c, small.cv1.out_channels, small.cv3.out_channels, small.m.out_channels, model.c) == (6, 12, 12, 4, 8)
    save_pruned(tmp_path / "o", small, pruner.history, "test_review_17:shared_split")
    back = load_pruned(tmp_path / "o", trust_code=True).eval()
    assert back.c == 6
    with torch.no_grad():
        assert torch.equal(back(X), small(X))


class WritesInForward(nn.Module):
    """A buffer counted up in every forward, and another only on batches of more than 2."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        if x.shape[0] > 2:
            self.seen.add_(x.shape[0])
        return self.fc(self.c2(F.relu(self.c1(x))).mean((2, 3)))


@pytest.mark.parametrize("steps", [1, 2])
def test_the_calibration_of_a_later_step_leaves_the_pruned_model_s_buffers_as_they_were(steps):
    """Before: pruned in two steps, the model came back with the writes of the second step's
    calibration passes (``seen`` 12, ``calls`` 3: three batches of 4); in one step with none.
    The user's model is untouched either way."""
    torch.manual_seed(0)
    model = WritesInForward().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)) for _ in range(3)]
    pruner = StructuredPruner(model, X, "weight_activation", pruning_ratio=0.5, iterative_steps=steps)
    pruner.collect_activations(data)
    small = pruner.prune()
    assert (small.c1.out_channels, small.c2.out_channels) == (8, 4)
    assert (float(small.calls), float(small.seen)) == (0.0, 0.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class ClampsItsWeights(nn.Module):
    """An in-place clamp of a view of a parameter in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        with torch.no_grad():
            self.c1.weight[:, 0].clamp_(-0.05, 0.05)
        return self.c2(F.relu(self.c1(x)))


@pytest.mark.parametrize("options", [{}, {"iterative_steps": 2}, {"global_pruning": True}])
@pytest.mark.parametrize("train", [False, True])
def test_a_model_that_writes_its_own_parameters_is_unchanged_by_prune(options, train):
    torch.manual_seed(0)
    model = ClampsItsWeights().train(train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert float(before["c1.weight"][:, 0].abs().max()) > 0.05  # the clamp would change it
    small = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5, **options).prune()
    assert small.c1.out_channels == 8 and model.training is train
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class ThreeConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x)))))).mean((2, 3)))


@pytest.mark.parametrize(
    ("options", "widths"),
    [
        ({"iterative_steps": 3, "iterative_schedule": [0, 0, 0, 0.5]}, (8, 16, 8)),
        ({"iterative_steps": 2, "iterative_schedule": torch.tensor([0.0, 0.25, 0.5])}, (8, 16, 8)),
        ({"iterative_steps": 2, "iterative_schedule": [0, 0.1, 0.5], "layer_pruning_ratios": {"c2": 0.75}}, (8, 8, 8)),
        (
            {
                "iterative_steps": 2,
                "iterative_schedule": [0, 0.1, 0.5],
                "layer_pruning_ratios": {"c2": 0.75},
                "global_pruning": True,
            },
            (10, 8, 6),
        ),
        ({"global_pruning": True, "max_layer_ratio": 1.0, "pruning_ratio": 0.95}, (1, 1, 2)),
        ({"global_pruning": True, "max_layer_ratio": 1.0, "pruning_ratio": 0.95, "iterative_steps": 2}, (1, 1, 2)),
    ],
)
def test_schedules_and_uncapped_layers_end_at_the_widths_asked(options, widths):
    """A schedule ends where equal steps end (a layer ratio too, under global ranking the
    other groups share 0.5 of their units); max_layer_ratio=1.0 leaves one channel."""
    torch.manual_seed(0)
    options = dict(options)
    ratio = options.pop("pruning_ratio", 0.5)
    small = StructuredPruner(ThreeConvs().eval(), X, "magnitude", pruning_ratio=ratio, **options).prune()
    assert (small.c1.out_channels, small.c2.out_channels, small.c3.out_channels) == widths


def test_dead_units_of_one_of_two_splits_sized_by_one_count_stay():
    """``cv3``'s 8 dead channels (4 a part) share ``self.c`` with ``cv1``'s live ones: removing
    them would shrink ``cv1``'s parts too, so pruning the dead units only keeps all 16 and the
    output is exactly the original's."""
    torch.manual_seed(0)
    model = CountedSplit("shared").eval()
    with torch.no_grad():
        for i in (0, 1, 2, 3, 8, 9, 10, 11):
            model.cv3.weight[i].zero_()
            model.cv3.bias[i] = 0.0
        want = model(X)
    data = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)) for _ in range(3)]
    pruner = StructuredPruner(model, X, "weight_activation", prune_dead_only=True)
    pruner.collect_activations(data)
    small = pruner.prune()
    assert (small.c, small.cv1.out_channels, small.cv3.out_channels) == (8, 16, 16)
    with torch.no_grad():
        assert torch.equal(small(X), want)


def test_a_normalizer_returning_a_list_ranks_as_no_normalizer():
    """A function's result is read as float64 scores: the identity as a list ranks as
    ``normalizer=None``; one score too few is refused by name."""
    widths = []
    for norm in (None, lambda s: s.tolist()):
        torch.manual_seed(0)
        small = StructuredPruner(
            ThreeConvs().eval(), X, "magnitude", pruning_ratio=0.5, global_pruning=True, normalizer=norm
        ).prune()
        widths.append((small.c1.out_channels, small.c2.out_channels, small.c3.out_channels))
    assert widths[0] == widths[1] and sum(widths[0]) == 32
    with pytest.raises(UserError, match="normalizer .*lambda.* got shape \\(1,\\)"):
        StructuredPruner(ThreeConvs(), X, "magnitude", global_pruning=True, normalizer=lambda s: s[:1]).prune()


class _Gain(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.linspace(0.5, 1.5, channels).reshape(1, channels, 1, 1))

    def forward(self, x):
        return x * self.g


class KeyedBlocks(nn.Module):
    """A bare parameter under an ``nn.ModuleDict`` key holding ``=`` (torch allows any key
    without a dot): its slice ``blocks.k=3.g`` is a tensor's, not a stored count's."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleDict({key: _Gain(16)})
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.blocks[self.key](self.c1(x))))


@pytest.mark.parametrize("key", ["k3", "k=3"])
def test_a_module_name_holding_the_count_mark_prunes_like_any_other(key):
    """Before: the ``=`` made ``blocks.k=3.g`` a count slice: prune() failed with
    "'ModuleDict' object has no attribute 'k'"."""
    torch.manual_seed(0)
    model = KeyedBlocks(key).eval()
    pruner = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert pruner.skipped_groups == []
    assert (small.c1.out_channels, tuple(small.blocks[key].g.shape), small.c2.in_channels) == (8, (1, 8, 1, 1), 8)
    kept = pruner.history.steps[0]
    assert [e.keep.numel() for e in kept if e.slice == f"blocks.{key}.g"] == [8]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_example_inputs_of_another_dtype_are_named_whichever_runs_first(dtype):
    """The masked original now runs before the pruned model where the model is not known to
    write nothing: its own RuntimeError came out raw ("expected scalar type ... but found
    Float") instead of the error that names the example inputs."""
    torch.manual_seed(0)
    # convolutions without bias: the trace (on the meta device) passes the dtype clash
    model = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.ReLU(), nn.Conv2d(16, 8, 3, bias=False)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = StructuredPruner(model, X.to(dtype), "magnitude", pruning_ratio=0.5)
    with pytest.raises(UserError, match=r"the model failed on example_inputs \(RuntimeError: "):
        pruner.prune()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
