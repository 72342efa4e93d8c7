"""A seventeenth set of the scenarios users bring from Torch-Pruning, written for CleanAI's
API (see ``test_peer_scenarios.py`` to ``_16``): the peer's keyword names given to
CleanAI's pruners (``ch_sparsity``, ``max_pruning_ratio``, ``pruning_ratio_dict``,
``num_heads``, ...) and its method names (``pruner.step()``, ``DG.get_pruning_group``),
which failed with Python's bare ``TypeError`` / ``AttributeError``; its ``FPGMImportance``
(filters near the geometric median go first), which had no CleanAI criterion; and the
peer's index-list scenarios for recurrent, transposed, grouped and depthwise layers, its
two-input three-output network and its single-layer pruning functions.

Each test asserts widths, parameter counts, scores computed by hand or the masking oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_peer_scenarios import TwoInThreeOut  # the peer's FullyConnectedNet (its issue #21)
from test_peer_scenarios_6 import _seeded
from test_peer_scenarios_16 import TransposeModel, X, _params
from torch import nn

from cleanai_core import GradualPruner, PruningSchedule, StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.metrics import count_params
from cleanai_core.option_names import PEER_NAMES
from cleanai_core.scoring import get_importance
from cleanai_core.slicing import SliceEdit, apply_edits
from cleanai_core.testing import masked_forward

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _mlp() -> nn.Sequential:
    return _seeded(lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))


# -- Torch-Pruning's keyword names ----------------------------------------------------------------


@pytest.mark.parametrize(
    "option, cleanai",
    [
        ({"ch_sparsity": 0.5}, "pruning_ratio="),
        ({"max_pruning_ratio": 1.0}, "max_layer_ratio="),
        ({"pruning_ratio_dict": {}}, "layer_pruning_ratios="),
        ({"ignored_layer_outputs": []}, "ignored_layers="),
        ({"unwrapped_parameters": []}, "found by themselves"),
        ({"customized_pruners": {}}, "cleanai_layer_pruner hook"),
        ({"root_module_types": [nn.Linear]}, "every layer a plugin slices can root a group"),
        ({"num_heads": {}}, "the graph decides whether an attention loses whole heads or head width"),
        ({"prune_num_heads": True}, "ignore its query projection"),
        ({"iterative_pruning_ratio_scheduler": None}, "iterative_schedule="),
        ({"group_reduction": "sum"}, "reducer="),
    ],
)
def test_torch_prunings_option_names_are_answered_with_cleanais_way(option, cleanai):
    """``StructuredPruner(model, x, ch_sparsity=0.5)`` raised ``TypeError: __init__() got an
    unexpected keyword argument 'ch_sparsity'``; now a :class:`UserError` names the peer's
    option and CleanAI's way, before anything is traced."""
    model = _mlp()
    (name,) = option
    with pytest.raises(UserError, match=rf"'{name}' is Torch-Pruning's option; CleanAI's way: .*{cleanai}"):
        StructuredPruner(model, torch.randn(2, 6), "magnitude", **option)
    assert model[0].out_features == 8 and name in PEER_NAMES


def test_a_misspelt_or_unknown_option_is_answered_with_the_closest_valid_names():
    model = _mlp()
    with pytest.raises(UserError, match=r"'pruning_ration' is not an option \(did you mean pruning_ratio"):
        StructuredPruner(model, torch.randn(2, 6), pruning_ration=0.5)
    with pytest.raises(UserError, match=r"'zzz' is not an option \(valid: bias_compensation, bn_samples, .*verify\)"):
        StructuredPruner(model, torch.randn(2, 6), zzz=1)
    # several at once: each is named, the peer's with CleanAI's way
    with pytest.raises(UserError, match=r"'ch_sparsity' is Torch-Pruning's.*; 'glabal_pruning' .*global_pruning"):
        StructuredPruner(model, torch.randn(2, 6), ch_sparsity=0.5, glabal_pruning=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError, match=r"GradualPruner .*'max_pruning_ratio' is Torch-Pruning's.*max_layer_ratio="):
        GradualPruner(model, torch.randn(2, 6), opt, PruningSchedule(final=0.5, steps=2), max_pruning_ratio=0.8)


@pytest.mark.parametrize(
    "owner, method, cleanai",
    [
        ("pruner", "step", r"prune\(\) \(iterative_steps=N.*pruner.build\(plan.pruned_units\(\)\)"),
        ("pruner", "regularize", "no sparse-training regulariser.*GradualPruner.*bn_scale"),
        ("pruner", "update_regularizor", "no sparse-training regulariser"),
        ("pruner", "pruning_history", "pruner.history"),
        ("graph", "get_pruning_group", r"removal\(layer, idxs\)"),
        ("graph", "get_all_groups", r"groups\(\)"),
        ("graph", "check_pruning_group", "build\\(mask\\) refuses"),
    ],
)
def test_torch_prunings_methods_are_answered_with_cleanais_way(owner, method, cleanai):
    """``pruner.step()`` / ``DG.get_pruning_group(...)`` raised Python's bare ``AttributeError``;
    the error now says CleanAI's way. It stays an ``AttributeError`` (``hasattr`` is false),
    and other missing names keep Python's message."""
    pruner = StructuredPruner(_mlp(), torch.randn(2, 6), "magnitude")
    obj = pruner if owner == "pruner" else pruner.graph
    cls = type(obj).__name__
    with pytest.raises(
        AttributeError, match=rf"'{cls}' object has no attribute '{method}': .*CleanAI's way: .*{cleanai}"
    ):
        getattr(obj, method)
    assert not hasattr(obj, method)
    with pytest.raises(AttributeError, match=rf"^'{cls}' object has no attribute 'zzz'$"):
        obj.zzz  # noqa: B018


@pytest.mark.parametrize(
    "name, cleanai",
    [
        ("GroupNormImportance", "'magnitude' \\(p=2"),
        ("MagnitudeImportance", "'magnitude' \\(p= as its p\\)"),
        ("l1", "'magnitude' with p=1"),
        ("TaylorImportance", "'taylor'"),
        ("OBDCImportance", "none; 'hessian' is OBD"),
        ("FPGMImportance", "'fpgm'"),
    ],
)
def test_torch_prunings_importance_names_are_answered_with_cleanais_criterion(name, cleanai):
    """``importance="GroupNormImportance"`` (or ``"l1"``) was "unknown importance" with the list;
    now the error names CleanAI's criterion too. Another unknown name keeps the plain message."""
    with pytest.raises(
        UserError, match=rf"unknown importance '{name}' \(Torch-Pruning's name; CleanAI's criterion: {cleanai}"
    ):
        StructuredPruner(_mlp(), torch.randn(2, 6), name)
    with pytest.raises(UserError, match=r"unknown importance 'nope'; choose one of: bn_scale, fpgm, hessian"):
        get_importance("nope")


def test_following_the_answer_gives_the_peers_result():
    """The peer's ``ch_sparsity=0.5, max_pruning_ratio=1.0`` on its ``TransposeModel``, in
    CleanAI's names: 16 + 64 channels halve to 8 + 32, in one step and in five."""
    model = _seeded(TransposeModel)
    for steps in (1, 5):
        small = StructuredPruner(
            model, X, "magnitude", pruning_ratio=0.5, max_layer_ratio=1.0, iterative_steps=steps
        ).prune()
        assert (small.conv1.out_channels, small.conv2.out_channels) == (8, 32)
        assert count_params(small) == _params(8, 32) and small(X).shape == (2, 8, 16, 16)


# -- FPGM: filters near the geometric median of their layer go first ------------------------------


def test_fpgm_scores_each_filter_by_its_summed_distance_to_the_others():
    """The peer's ``FPGMImportance``: a hidden unit of the MLP scores the sum of the L2 (or Lp)
    distances of ``fc1``'s filter to the other filters (``fc2``'s columns are inputs, not
    filters), over the mean."""
    model = _mlp()
    for p in (2, 1):
        pruner = StructuredPruner(model, torch.randn(2, 6), get_importance("fpgm", p=p), pruning_ratio=0.25)
        (gid,) = pruner.score()
        w = model[0].weight.detach().double()
        d = torch.cdist(w[None], w[None], p=p)[0].sum(1)
        torch.testing.assert_close(pruner.score()[gid], d / d.mean())
        plan = pruner.plan()
        assert plan.groups[0].pruned.nonzero().flatten().tolist() == sorted(d.argsort()[:2].tolist())


def test_fpgm_removes_the_filter_the_others_stand_in_for_where_magnitude_keeps_it():
    """Filter 0 is the centre of filters 1..4 (their geometric median, closest to all seven
    others); filters 5..7 are small and far: FPGM takes filter 0, magnitude a small one; the
    cut equals the masked original."""
    model = _mlp()
    with torch.no_grad():
        w = model[0].weight
        c = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 5.0])
        w[0] = c
        w[1:5] = c + 2 * torch.tensor(
            [[1.0, 0, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, -1, 0, 0, 0, 0]]
        )
        w[5:] *= 0.1
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    fpgm = StructuredPruner(model, x, "fpgm", pruning_ratio=0.125, bias_compensation=False)
    plan = fpgm.plan()
    assert plan.groups[0].pruned.nonzero().flatten().tolist() == [0]
    magnitude = StructuredPruner(model, x, "magnitude", pruning_ratio=0.125).plan()
    assert magnitude.groups[0].pruned.nonzero().flatten().tolist()[0] in (5, 6, 7)
    small, _ = fpgm.build(plan.pruned_units())
    (ref,) = masked_forward(fpgm.graph, plan.pruned_units(), x)
    assert small[0].out_features == 7 and torch.allclose(small(x), ref, atol=1e-6)


def test_fpgm_prunes_the_peers_models_in_steps_and_globally_exactly():
    """The peer's regulariser test ranks with FPGM globally over five steps. Transposed convs
    are no filters here (their groups are scored by magnitude), every width halves, and the
    global run keeps the classifier of a ResNet-18."""
    import torchvision

    model = _seeded(TransposeModel)
    pruner = StructuredPruner(model, X, "fpgm", pruning_ratio=0.5, iterative_steps=5)
    small = pruner.prune()
    assert (small.conv1.out_channels, small.conv2.out_channels) == (8, 32)
    pruned = pruner.plan().pruned_units()
    (ref,) = masked_forward(pruner.graph, pruned, X)
    rebuilt, _ = pruner.build(pruned)
    assert torch.allclose(rebuilt(X), ref, atol=1e-5)
    net = _seeded(lambda: torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = count_params(net)
    cut = StructuredPruner(
        net, x, "fpgm", pruning_ratio=0.5, global_pruning=True, iterative_steps=2, ignored_layers=[net.fc]
    ).prune()
    assert cut.fc.out_features == 1000 and cut(x).shape == (1, 1000) and count_params(cut) < 0.5 * before


@pytest.mark.parametrize("p", [0, -1, float("inf"), True, "2"])
def test_fpgm_distance_order_must_be_a_positive_finite_number(p):
    with pytest.raises(UserError, match=r"fpgm p=.*give a positive finite number"):
        get_importance("fpgm", p=p)


# -- index lists through the graph, for the layers the peer's tests cover ---------------------------


class Recurrent(nn.Module):
    """A linear, a stacked bidirectional GRU, an RNN and an LSTM, sequence first."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(6, 10)
        self.gru = nn.GRU(10, 8, num_layers=2, bidirectional=True)
        self.rnn = nn.RNN(16, 6)
        self.lstm = nn.LSTM(6, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        y, _ = self.gru(self.fc0(x))
        y, _ = self.rnn(y)
        y, _ = self.lstm(y)
        return self.fc(y)


class Convs(nn.Module):
    """A grouped transposed conv, a depthwise conv with a multiplier, a grouped conv, BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ConvTranspose2d(3, 8, 3, stride=2, groups=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)
        self.dw = nn.Conv2d(8, 16, 3, groups=8)
        self.g = nn.Conv2d(16, 12, 1, groups=2)
        self.fc = nn.Linear(12, 10)
        self.bn = nn.BatchNorm1d(10)
        self.out = nn.Linear(10, 2)

    def forward(self, x):
        y = F.relu(self.g(F.relu(self.dw(F.relu(self.up(F.relu(self.a(x))))))))
        return self.out(F.relu(self.bn(self.fc(y.mean((2, 3))))))


@pytest.mark.parametrize(
    "factory, x, layer, slice_, idxs, widths",
    [
        (Recurrent, (5, 2, 6), "fc0", "out", [0, 7], {"gru.input_size": 8}),
        (Recurrent, (5, 2, 6), "gru", "hidden", [0, 7], {"gru.hidden_size": 6, "rnn.input_size": 12}),
        (Recurrent, (5, 2, 6), "rnn", "hidden", [1], {"rnn.hidden_size": 5, "lstm.input_size": 5}),
        (Recurrent, (5, 2, 6), "lstm", "hidden", [0, 4], {"lstm.hidden_size": 3, "fc.in_features": 3}),
        (Convs, (2, 3, 5, 5), "a", "out", [0, 1], {"a.out_channels": 4, "up.in_channels": 4}),
        (Convs, (2, 3, 5, 5), "up", "out", [0, 5], {"up.out_channels": 4, "dw.groups": 4, "dw.out_channels": 8}),
        (Convs, (2, 3, 5, 5), "g", "out", [0, 11], {"g.out_channels": 8, "g.groups": 2, "fc.in_features": 8}),
        (Convs, (2, 3, 5, 5), "fc", "out", [2, 9], {"bn.num_features": 8, "out.in_features": 8}),
    ],
)
def test_indices_of_a_recurrent_transposed_grouped_or_depthwise_layer_prune_exactly(
    factory, x, layer, slice_, idxs, widths
):
    """``graph.removal(layer, idxs, slice)``: the peer's ``DG.get_pruning_group(layer, fn, idxs)``
    for GRU / RNN / LSTM hidden units (slice ``"hidden"``), transposed convs, a depthwise
    conv with a multiplier (two filters per input channel go with it) and ``BatchNorm1d``.
    Where a grouped layer reads or writes the channels, channel ``j`` of each group goes with
    channel ``j`` (``a``'s 0 and 1 take 4 and 5, ``up``'s 0 and 5 take 4 and 1, ``g``'s 0
    and 11 take 6 and 5), so the group count stays. The built model equals the masked
    original."""
    model = _seeded(factory)
    x = torch.randn(*x, generator=torch.Generator().manual_seed(2))
    pruner = StructuredPruner(model, x, "magnitude", bias_compensation=False, recalibrate_bn=False)
    mask = pruner.graph.removal(getattr(model, layer), idxs, slice_)
    small, _ = pruner.build(mask)
    for path, width in widths.items():
        name, attr = path.split(".")
        assert getattr(getattr(small, name), attr) == width, path
    (ref,) = masked_forward(pruner.graph, mask, x)
    assert small(x).shape == ref.shape and torch.allclose(small(x), ref, atol=1e-5)


def test_a_recurrent_layer_has_no_out_slice_and_the_error_names_its_slices():
    model = _seeded(Recurrent)
    pruner = StructuredPruner(model, torch.randn(5, 2, 6), "magnitude")
    with pytest.raises(UserError, match=r"module 'lstm' has no slice 'out' \(its slices: 'hidden', 'in'\)"):
        pruner.graph.removal(model.lstm, [0])


def test_two_inputs_by_name_and_three_outputs_prune_once_the_outputs_may_shrink():
    """The peer prunes ``fc1``'s filters 0, 2, 4, which reach the first output. CleanAI keeps
    every output's width unless ``output_transform`` names the outputs to keep; with the
    third kept, ``fc1`` loses them, ``fc3`` its columns, and the last output equals the
    masked original's."""
    model = _seeded(TwoInThreeOut)
    x = {"x1": torch.randn(1, 128), "x2": torch.randn(1, 64)}
    with pytest.raises(UserError, match="nothing in this model can be pruned.*output_transform"):
        StructuredPruner(model, x, "magnitude").graph.removal(model.fc1, [0, 2, 4])
    keep_last = lambda out: out[2]  # noqa: E731
    pruner = StructuredPruner(model, x, "magnitude", output_transform=keep_last, bias_compensation=False)
    mask = pruner.graph.removal(model.fc1, [0, 2, 4])
    small, _ = pruner.build(mask)
    assert (small.fc1.out_features, small.fc2.out_features, small.fc3.in_features) == (29, 32, 61)
    o1, o2, o3 = small(**x)
    (ref,) = masked_forward(pruner.graph, mask, x, output_transform=keep_last)
    assert (o1.shape, o2.shape) == ((1, 29), (1, 32)) and torch.allclose(o3, ref, atol=1e-6)
    halved = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, output_transform=keep_last).prune()
    assert (halved.fc1.out_features, halved.fc2.out_features, halved.fc3.in_features) == (16, 16, 32)


def test_one_layers_output_and_the_next_layers_input_sliced_by_hand():
    """The peer's ``prune_conv_out_channel`` / ``prune_conv_in_channel`` on AlexNet's first two
    convs: ``apply_edits`` with the kept indices, no graph; the other weights are kept bit for
    bit."""
    features = _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2)
        )
    )
    w0, w3 = features[0].weight.detach().clone(), features[3].weight.detach().clone()
    keep = torch.tensor([i for i in range(64) if i not in (0, 1, 3, 4)])
    apply_edits(features, [SliceEdit("0", "out", keep), SliceEdit("3", "in", keep)])
    assert features[0].weight.shape == (60, 3, 11, 11) and features[3].weight.shape == (192, 60, 5, 5)
    assert (features[0].out_channels, features[3].in_channels) == (60, 60)
    assert torch.equal(features[0].weight, w0[keep]) and torch.equal(features[3].weight, w3[:, keep])
    assert features(torch.randn(1, 3, 64, 64)).shape == (1, 192, 7, 7)
