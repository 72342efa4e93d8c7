"""More of the scenarios users bring from Torch-Pruning's test suite, written for CleanAI's
API (the first 47 are in ``test_peer_scenarios.py``): pruning by hand group after group and
twice in a row, interactive plans, pickled / state_dict / checkpoint-dict round trips and
pruning a loaded model again, raw per-slice terms against every reducer, normalisers in
global ranking, Taylor scores against autograd, recurrent layers and cells, embeddings and
embedding bags, norms over odd shapes, bare parameters in forward (class tokens, position
embeddings, layer scales, a projection matrix), gates with a single channel, shared
modules, deep chunk / concat nests, and the torchvision families of the peer's lists
(including ShuffleNetV2, which the peer lists as failing).

Each test asserts widths, parameter counts or scores, and the masking oracle where slicing
must equal zeroing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cleanai_core import DependencyGraph, PruningHistory, StructuredPruner, hookimpl
from cleanai_core.errors import UserError
from cleanai_core.metrics import count_flops, count_params
from cleanai_core.scoring import get_normalizer
from cleanai_core.testing import check_pruner, temporary_plugin

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _exact(model: nn.Module, x, **kw) -> None:
    """The masking oracle: a random half of every group sliced equals it zeroed."""
    r = check_pruner(model.eval(), x, **kw)
    assert r.output_shapes_equal and r.pruned_units > 0 and r.params_after < r.params_before
    assert r.max_abs_diff < 1e-4, r


def _prune(model: nn.Module, x, importance="magnitude", ratio=0.5, **kw) -> nn.Module:
    return StructuredPruner(model.eval(), x, importance, pruning_ratio=ratio, **kw).prune()


def _group(graph: DependencyGraph, module: str, kind: str = "out"):
    return next(g for g in graph.groups() if any(s.module == module and s.kind == kind for s in g.slices))


def _mask(graph: DependencyGraph, picks) -> torch.Tensor:
    """A mask over the graph's units: ``picks`` is ``[(group, [unit indices]), ...]``."""
    pruned = torch.zeros(graph.root.numel(), dtype=torch.bool)
    for group, idx in picks:
        pruned[group.units[idx]] = True
    return pruned


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


X32 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


# -- by hand: one group, then every group, then a second cut -------------------------------------


def test_a_conv_pair_pruned_by_hand_keeps_the_other_filters_bit_for_bit():
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    graph = DependencyGraph(model, x)
    g = _group(graph, "features.0")
    assert g.modules() == ["features.0", "features.3"] and g.size == 64
    pruner = StructuredPruner(model, x, "magnitude", bias_compensation=False, recalibrate_bn=False)
    small, _ = pruner.build(_mask(pruner.graph, [(_group(pruner.graph, "features.0"), [0, 1, 3, 4])]))
    kept = [i for i in range(64) if i not in (0, 1, 3, 4)]
    assert (small.features[0].out_channels, small.features[3].in_channels) == (60, 60)
    assert torch.equal(small.features[0].weight, model.features[0].weight[kept])
    assert torch.equal(small.features[0].bias, model.features[0].bias[kept])
    assert torch.equal(small.features[3].weight, model.features[3].weight[:, kept])
    assert count_params(model) - count_params(small) == 4 * (3 * 11 * 11 + 1) + 4 * 192 * 5 * 5


def test_every_group_pruned_by_hand_after_a_first_cut():
    """The peer's ``DG.get_pruning_group(conv1, idxs=[2, 6, 9]).prune()`` and then
    ``for group in DG.get_all_groups(): group.prune(idxs=[2, 4, 6])``."""
    model = _resnet18()
    first = StructuredPruner(model, X32, "magnitude", bias_compensation=False, recalibrate_bn=False)
    once, _ = first.build(_mask(first.graph, [(_group(first.graph, "conv1"), [2, 6, 9])]))
    second = StructuredPruner(once, X32, "magnitude", bias_compensation=False, recalibrate_bn=False)
    picks = [(g, [2, 4, 6]) for g in second.graph.groups(prunable_only=True)]
    assert all(bool(~g.frozen[[2, 4, 6]].any()) for g, _ in picks)
    twice, _ = second.build(_mask(second.graph, picks))
    assert twice.conv1.out_channels == twice.layer1[1].conv2.out_channels == 64 - 3 - 3
    assert twice.layer1[0].conv1.out_channels == twice.layer1[1].conv1.out_channels == 64 - 3
    assert twice.layer2[0].conv1.out_channels == 125 and twice.layer4[1].conv1.out_channels == 509
    assert (twice.fc.in_features, twice.fc.out_features) == (509, 1000)
    keep = [i for i in range(512) if i not in (2, 4, 6)]
    assert torch.equal(twice.layer4[1].conv1.weight, once.layer4[1].conv1.weight[keep][:, keep])  # rows and columns
    assert torch.equal(twice.fc.weight, once.fc.weight[:, keep])
    assert twice(X32).shape == (2, 1000)


def test_interactive_plan_groups_can_be_read_and_rechosen_by_hand():
    """The peer's ``for group in pruner.step(interactive=True): ... group.prune()``: each
    group of the plan shows its scores and verdicts; the user picks other units and builds."""
    model = _resnet18()
    pruner = StructuredPruner(model, X32, "magnitude", pruning_ratio=0.25, ignored_layers=[model.fc])
    plan = pruner.plan()
    for gp in plan.groups:
        free = (~gp.group.frozen).nonzero().squeeze(1)
        lowest = free[gp.scores[free].argsort()[: gp.n_pruned]]
        assert set(gp.pruned.nonzero().squeeze(1).tolist()) == set(lowest.tolist())  # the lowest scores go
        assert gp.n_pruned == gp.group.size // 4
    picks = []
    for gp in plan.groups:  # the user's own rule: drop the highest-scoring quarter instead
        free = (~gp.group.frozen).nonzero().squeeze(1)
        picks.append((gp.group, free[gp.scores[free].argsort(descending=True)[: gp.n_pruned]].tolist()))
    small, _ = pruner.build(_mask(pruner.graph, picks))
    assert _widths(small) == _widths(pruner.prune())  # the same widths, other units
    stem = next(idx for g, idx in picks if "conv1" in g.modules())
    kept = [i for i in range(64) if i not in stem]
    assert torch.equal(small.conv1.weight, model.conv1.weight[kept])


# -- pruning twice, loaded and serialised models ------------------------------------------------


def test_pruning_a_pruned_model_again_and_replaying_both_histories():
    first = StructuredPruner(_resnet18(), X32, "magnitude", pruning_ratio=0.5)
    once = first.prune()
    second = StructuredPruner(once, X32, "magnitude", pruning_ratio=0.5)
    twice = second.prune()
    assert (twice.conv1.out_channels, twice.layer4[1].conv1.out_channels, twice.fc.in_features) == (16, 128, 128)
    assert twice.fc.out_features == 1000
    _exact(once, X32)  # the oracle holds on the pruned model as on the original
    fresh = second.history.replay(first.history.replay(torchvision.models.resnet18(weights=None)))
    fresh.load_state_dict(twice.state_dict(), strict=True)
    assert torch.equal(fresh.eval()(X32), twice(X32))
    assert len(first.history) == len(second.history) == 1


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    ).eval()


def test_a_pickled_pruned_model_loads_whole_and_prunes_again(tmp_path):
    model, x = _vit(), torch.randn(2, 3, 32, 32)
    model.customized_value = 8
    small = _prune(model, x, round_to=4)
    torch.save(small, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)  # runs pickled code: own files only
    assert loaded.customized_value == 8 and loaded.hidden_dim == 32 and loaded.class_token.shape == (1, 1, 32)
    assert torch.equal(loaded(x), small(x))
    F.cross_entropy(loaded.train()(x), torch.tensor([1, 2])).backward()
    assert loaded.encoder.pos_embedding.grad.shape == (1, 17, 32)
    again = _prune(loaded.eval(), x, round_to=4)
    assert again.hidden_dim == again.conv_proj.out_channels == 16 and again.customized_value == 8
    assert again.encoder.layers[0].self_attention.embed_dim == 16 and again(x).shape == (2, 10)


def test_history_kept_in_a_checkpoint_dict_rebuilds_the_model_whatever_pruner_is_built_next(tmp_path):
    """The peer's ``{'model': state_dict, 'pruning': pruner.pruning_history()}`` file."""
    pruner = StructuredPruner(_resnet18(), X32, "magnitude", pruning_ratio=0.5, iterative_steps=5)
    small = pruner.prune()
    torch.save({"model": small.state_dict(), "pruning": pruner.history.to_json()}, tmp_path / "ckpt.pth")
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=True)  # plain tensors and JSON data: no code runs
    fresh = torchvision.models.resnet18(weights=None)
    StructuredPruner(fresh, X32, "magnitude", pruning_ratio=0.2)  # a pruner with other settings changes nothing
    PruningHistory.from_json(ckpt["pruning"]).replay(fresh)
    fresh.load_state_dict(ckpt["model"], strict=True)
    assert len(pruner.history) == 5 and fresh.conv1.out_channels == 32 and fresh.layer4[0].conv1.out_channels == 256
    assert torch.equal(fresh.eval()(X32), small(X32))


def test_a_model_loaded_from_a_state_dict_prunes_exactly_like_the_original(tmp_path):
    model = _resnet18()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = torchvision.models.resnet18(weights=None)
    loaded.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    a, b = _prune(model, X32, ratio=0.3), _prune(loaded.eval(), X32, ratio=0.3)
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    assert _widths(a) == _widths(b) and all(torch.equal(p, q) for p, q in pairs)


# -- importance: raw per-slice terms, reducers, normalisers, gradients ----------------------------


class _Spy:
    """A plugin reducer that keeps the raw per-slice terms it is given (the peer's
    ``group_reduction=None``) and one that takes the last slice (its ``"gate"``)."""

    def __init__(self) -> None:
        self.terms: list[torch.Tensor] = []

    @hookimpl
    def cleanai_reducers(self):
        return {"spy": lambda t: self.terms.append(t.clone()) or t.mean(0), "last": lambda t: t[-1]}


def test_every_reducer_folds_the_raw_per_slice_terms_it_is_given():
    model = _resnet18()
    spy = _Spy()
    with temporary_plugin(spy, name="spy"):
        pruner = StructuredPruner(model, X32, "magnitude", pruning_ratio=0.5)
        gid = _group(pruner.graph, "conv1").id
        crit = type(pruner.importance)

        def scores(reducer: str) -> torch.Tensor:
            pruner.importance = crit(p=2, reducer=reducer)
            return pruner.score()[gid]

        scores("spy")
        raw = spy.terms[[len(t[0]) for t in spy.terms].index(64)]  # conv1's group: 64 units
        assert raw.shape[0] >= 10  # conv1, bn1, and the convs of the residual stream, in and out
        assert torch.allclose(scores("mean"), raw.mean(0))
        assert torch.allclose(scores("sum"), raw.sum(0))
        assert torch.allclose(scores("max"), raw.max(0).values)
        assert torch.allclose(scores("prod"), raw.prod(0))
        assert torch.allclose(scores("first"), raw[0]) and torch.allclose(scores("last"), raw[-1])
    w = model.conv1.weight.detach().double().pow(2).sum((1, 2, 3))
    assert torch.allclose(raw[0], w / w.mean())  # the first term: conv1's own filters, mean-normalised
    with pytest.raises(UserError, match="unknown reducer 'gate'; choose one of: first, max, mean, prod, sum"):
        crit(reducer="gate")


@pytest.mark.parametrize("normalizer", ["mean", "max", "sum", "gaussian", "standardization", "lamp", "none"])
def test_global_ranking_under_every_normaliser_removes_half_of_the_units(normalizer):
    model = _resnet18()
    kw = {"global_pruning": True, "normalizer": normalizer, "ignored_layers": [model.fc]}
    plan = StructuredPruner(model, X32, "magnitude", pruning_ratio=0.5, **kw).plan()
    total = sum(gp.group.size for gp in plan.groups)
    assert plan.n_pruned == total // 2 == 2880 // 2  # 64 + 3 x (64 + 128 + 256 + 512) units
    assert all(gp.n_pruned <= int(0.9 * gp.group.size) for gp in plan.groups)


def test_normalisers_put_a_group_on_the_scale_their_names_say():
    s = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    norm = {n: get_normalizer(n)(s) for n in ("mean", "max", "sum", "gaussian", "standardization")}
    assert norm["mean"].tolist() == [1 / 3, 2 / 3, 1.0, 2.0] and norm["max"].tolist() == [1 / 6, 1 / 3, 0.5, 1.0]
    assert float(norm["sum"].sum()) == pytest.approx(1.0)
    assert float(norm["gaussian"].mean()) == pytest.approx(0.0) and float(norm["gaussian"].std()) == pytest.approx(1)
    assert norm["standardization"].tolist() == [0.0, 0.2, 0.4, 1.0]
    assert get_normalizer("standardization")(torch.ones(3)).tolist() == [0.0, 0.0, 0.0]  # a constant group
    with pytest.raises(UserError, match="unknown normaliser 'standarization'"):
        get_normalizer("standarization")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_taylor_scores_are_squared_weight_times_gradient_summed_over_the_group():
    torch.manual_seed(0)
    model, gen = MLP().eval(), torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)) for _ in range(2)]
    pruner = StructuredPruner(model, data[0][0], "taylor", pruning_ratio=0.5)
    pruner.collect_activations(data, progress=False)
    got = pruner.score()[_group(pruner.graph, "fc1").id]
    ref = copy.deepcopy(model)
    for x, y in data:  # the loss gradients, summed over the calibration batches
        F.cross_entropy(ref(x), y).backward()
    w1, g1, w2, g2 = ref.fc1.weight, ref.fc1.weight.grad, ref.fc2.weight, ref.fc2.weight.grad
    expected = ((w1 * g1) ** 2).sum(1) + ((w2 * g2) ** 2).sum(0)  # fc1's rows and fc2's columns
    assert torch.allclose(got, expected.detach().double(), rtol=1e-5)
    assert model.fc1.weight.grad is None  # taken on a copy: the user's model has no gradients


def test_taylor_on_resnet18_in_five_steps_with_labelled_batches():
    model = _resnet18()
    gen = torch.Generator().manual_seed(4)
    data = [(torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 1000, (4,), generator=gen)) for _ in range(2)]
    pruner = StructuredPruner(model, X32, "taylor", pruning_ratio=0.5, iterative_steps=5, ignored_layers=[model.fc])
    pruner.collect_activations(data, progress=False)
    small = pruner.prune()
    assert len(pruner.history) == 5
    assert [small.conv1.out_channels, small.layer2[0].conv1.out_channels, small.layer4[1].conv1.out_channels] == [
        32,
        64,
        256,
    ]
    assert small.fc.out_features == 1000 and small(X32).shape == (2, 1000)
    with pytest.raises(UserError, match="needs labels"):
        StructuredPruner(model, X32, "taylor").collect_activations([X32], progress=False)


def test_ignoring_the_producers_keeps_a_consumers_inputs():
    """The peer's ``ignored_layer_inputs=[layer2[0].conv2, fc]``: CleanAI keeps a layer's
    inputs by ignoring a producer of the group that feeds them."""
    model = _resnet18()
    small = _prune(model, X32, ignored_layers=[model.layer2[0].conv1, model.layer4[1].conv2, model.fc])
    assert small.layer2[0].conv2.in_channels == small.layer2[0].conv1.out_channels == 128
    assert small.fc.in_features == small.layer4[0].downsample[0].out_channels == 512
    assert small.layer2[1].conv1.out_channels == 64 and small.layer4[0].conv1.out_channels == 256


def test_report_counts_params_and_flops_as_the_metrics_do():
    model = _resnet18()
    pruner = StructuredPruner(model, X32, "magnitude", pruning_ratio=0.5, ignored_layers=[model.fc])
    small = pruner.prune()
    rep = pruner.report()
    assert (rep["params_before"], rep["params_after"]) == (count_params(model), count_params(small))
    assert (rep["flops_before"], rep["flops_after"]) == (count_flops(model, X32), count_flops(small, X32))
    assert 0.24 < rep["flops_after"] / rep["flops_before"] < 0.30  # half the channels: about a quarter of the FLOPs
