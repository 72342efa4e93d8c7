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
from test_peer_scenarios import X32, TransposeModel, _resnet18
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
    both = first.history.then(second.history)
    assert len(first.history) == len(second.history) == 1 and len(both) == 2
    fresh = both.replay(torchvision.models.resnet18(weights=None))
    fresh.load_state_dict(twice.state_dict(), strict=True)
    assert torch.equal(fresh.eval()(X32), twice(X32))
    # before: the second history alone sliced a fresh model without a word
    with pytest.raises(UserError, match=r"step 0 of 1 was recorded on conv1.weight of shape \(32, 3, 7, 7\)"):
        second.history.replay(torchvision.models.resnet18(weights=None))


def _timm_vit() -> nn.Module:
    """timm's ViT at 32 px (patches of 8, width 64, 4 heads, 2 blocks, 10 classes), seeded."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10
    ).eval()


def test_a_vit_pruned_twice_replays_only_through_both_histories():
    """The second history alone counted the heads from the wrong layout: the state_dict
    loaded, and the forward failed ("shape '[2, 17, 3, 2, 16]' is invalid")."""
    vit = _timm_vit
    x = torch.randn(2, 3, 32, 32)
    first = StructuredPruner(vit(), x, "magnitude", pruning_ratio=0.5)
    second = StructuredPruner(first.prune(), x, "magnitude", pruning_ratio=0.5)
    twice = second.prune()
    assert (twice.blocks[0].attn.num_heads, twice.blocks[0].attn.head_dim, twice.head.in_features) == (1, 16, 16)
    fresh = first.history.then(second.history).replay(vit())
    fresh.load_state_dict(twice.state_dict(), strict=True)
    assert fresh.blocks[0].attn.num_heads == 1 and torch.equal(fresh(x), twice(x))
    with pytest.raises(UserError, match="replays after the earlier histories"):
        second.history.replay(vit())


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
    # Torch-Pruning's spelling reads as the same min-max (it was refused before session 25)
    assert get_normalizer("standarization")(s).tolist() == norm["standardization"].tolist()
    with pytest.raises(UserError, match="unknown normaliser 'standardisation'"):
        get_normalizer("standardisation")


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
    with pytest.raises(UserError, match=r"taylor importance needs labels"):
        StructuredPruner(model, X32, "taylor").collect_activations([X32], progress=False)


def test_hessian_scores_are_squared_weights_times_per_sample_squared_gradients():
    """The peer's OBD criterion: ``imp.accumulate_grad(model)`` after each sample's own backward."""
    torch.manual_seed(0)
    model, gen = MLP().eval(), torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 8, generator=gen), torch.randint(0, 4, (5,), generator=gen)) for _ in range(2)]
    pruner = StructuredPruner(model, data[0][0], "hessian", pruning_ratio=0.5)
    pruner.collect_activations(data, progress=False)
    got = pruner.score()[_group(pruner.graph, "fc1").id]
    ref = copy.deepcopy(model)
    fisher = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for x, y in data:
        for i in range(len(y)):  # one sample at a time
            ref.zero_grad()
            F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]).backward()
            for n, p in ref.named_parameters():
                fisher[n] += p.grad**2
    w1, w2 = ref.fc1.weight.detach(), ref.fc2.weight.detach()
    expected = (w1**2 * fisher["fc1.weight"]).sum(1) + (w2**2 * fisher["fc2.weight"]).sum(0)
    assert torch.allclose(got, expected.double(), rtol=1e-4)
    taylor = StructuredPruner(model, data[0][0], "taylor", pruning_ratio=0.5)
    taylor.collect_activations(data, progress=False)
    assert not torch.allclose(taylor.score()[_group(taylor.graph, "fc1").id], got)  # summed gradients cancel


def test_hessian_on_resnet18_only_on_the_target_layers():
    """The peer's ``test_manual_prune``: OBD scores, a 0.5 ratio on two target layers only."""
    model = _resnet18()
    gen = torch.Generator().manual_seed(4)
    data = [(torch.randn(5, 3, 16, 16, generator=gen), torch.randint(0, 1000, (5,), generator=gen))]
    ratios = {model.layer1[0].conv1: 0.5, model.layer3[0].conv1: 0.5, "*": 0.0}
    pruner = StructuredPruner(model, X32, "hessian", layer_pruning_ratios=ratios)
    pruner.collect_activations(data, progress=False)
    small = pruner.prune()
    assert small.layer1[0].conv1.out_channels == small.layer1[0].conv2.in_channels == 32
    assert small.layer3[0].conv1.out_channels == small.layer3[0].conv2.in_channels == 128
    assert _widths(small)[:1] == [64] and small.layer4[1].conv1.out_channels == 512


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


# -- recurrent layers and cells, embeddings, norms in odd places ------------------------------------


class BiGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16, padding_idx=0)
        self.gru = nn.GRU(16, 12, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(24, 5)

    def forward(self, t):
        y, _ = self.gru(self.emb(t))
        return self.fc(y[:, -1])


class RNNThenLSTM(nn.Module):
    """Sequence-first RNN (relu), a Linear between, an LSTM whose last ``h_n`` is read."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.mid = nn.RNN(8, 16, nonlinearity="relu"), nn.Linear(16, 16)
        self.lstm, self.fc = nn.LSTM(16, 10), nn.Linear(10, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        _, (h, _) = self.lstm(torch.tanh(self.mid(y)))
        return self.fc(h[-1])


class ProjectedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.lstm, self.fc = nn.Linear(6, 16), nn.LSTM(16, 20, proj_size=8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.lstm(self.fc0(x))
        return self.fc(y.mean(1))


class CellLoop(nn.Module):
    """A decoder that steps a cell itself, ``hx=None`` first (the cell makes the zeros)."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.fc0, self.cell, self.fc = nn.Linear(6, 16), cell(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = None
        for t in range(x.shape[1]):
            h = self.cell(self.fc0(x[:, t]), h)
        return self.fc(h[0] if isinstance(h, tuple) else h)


class LiteralState(nn.Module):
    """The user builds the state with a literal width: that width cannot shrink."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.cell, self.fc = nn.Linear(6, 16), nn.GRUCell(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 12)
        for t in range(x.shape[1]):
            h = self.cell(self.fc0(x[:, t]), h)
        return self.fc(h)


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag, self.fc, self.out = nn.EmbeddingBag(30, 16, mode="sum"), nn.Linear(16, 8), nn.Linear(8, 2)

    def forward(self, tokens, offsets):
        return self.out(F.relu(self.fc(self.bag(tokens, offsets))))


class OddNorms(nn.Module):
    """LayerNorm over (C, H, W), GroupNorm with one group, InstanceNorm with running stats."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.ln = nn.Conv2d(3, 16, 3, padding=1), nn.LayerNorm([16, 8, 8])
        self.c2, self.gn = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(1, 16)
        self.c3, self.inorm = nn.Conv2d(16, 8, 1), nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.ln(self.c1(x)))
        x = F.relu(self.gn(self.c2(x)))
        return self.fc(self.inorm(self.c3(x)).mean((2, 3)))


class SequenceNorms(nn.Module):
    """Conv1d + BatchNorm1d, GroupNorm on (N, C, L), LayerNorm after a transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn, self.gn = nn.Conv1d(4, 16, 3, padding=1), nn.BatchNorm1d(16), nn.GroupNorm(4, 16)
        self.c2, self.ln, self.fc = nn.Conv1d(16, 16, 1), nn.LayerNorm(16), nn.Linear(16, 2)

    def forward(self, x):
        y = self.c2(self.gn(F.relu(self.bn(self.c(x)))))
        return self.fc(self.ln(y.transpose(1, 2)).mean(1))


class BareMatrix(nn.Module):
    """``x @ W * s`` with bare parameters: W's rows follow fc1, its columns and s follow fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(12, 3)
        self.proj, self.scale = nn.Parameter(torch.randn(16, 12)), nn.Parameter(torch.rand(12) + 0.5)

    def forward(self, x):
        return self.fc2(F.relu(F.relu(self.fc1(x)) @ self.proj * self.scale))


class TinyViT(nn.Module):
    """A class token, position embeddings and a layer scale: bare parameters on the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.cls_token, self.pos_embed = nn.Parameter(torch.randn(1, 1, 16)), nn.Parameter(torch.randn(1, 5, 16))
        self.gamma = nn.Parameter(torch.full((16,), 0.1))
        self.ln, self.fc1, self.fc2, self.head = (
            nn.LayerNorm(16),
            nn.Linear(16, 32),
            nn.Linear(32, 16),
            nn.Linear(16, 4),
        )

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], 1) + self.pos_embed
        t = t + self.gamma * self.fc2(F.gelu(self.fc1(self.ln(t))))
        return self.head(t[:, 0])


class SpatialGate(nn.Module):
    """A one-channel attention map multiplies the features: it cannot shrink, they can."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.att, self.c2 = (
            nn.Conv2d(3, 16, 3, padding=1),
            nn.Conv2d(16, 1, 7, padding=3),
            nn.Conv2d(16, 8, 3, padding=1),
        )

    def forward(self, x):
        f = F.relu(self.c1(x))
        return self.c2(f * torch.sigmoid(self.att(f)))


class ChunkNest(nn.Module):
    """Four chunks, two processed, concatenated back in another order, in two levels."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.a, self.b, self.c2 = (
            nn.Conv2d(3, 16, 1),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Conv2d(4, 6, 1),
            nn.Conv2d(18, 8, 1),
        )

    def forward(self, x):
        p, q, r, u = torch.chunk(self.c1(x), 4, dim=1)
        return self.c2(torch.cat([torch.cat([u, self.a(p)], 1), torch.cat([self.b(q), r], 1)], 1))


class Siamese(nn.Module):
    """One trunk on two inputs: its channels are one group however often it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)
        )
        self.head = nn.Linear(32, 2)

    def forward(self, a, b):
        return self.head(torch.cat([self.trunk(a).mean((2, 3)), self.trunk(b).mean((2, 3))], 1))


class DictInOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img, self.txt, self.fuse, self.cls, self.box = (
            nn.Linear(12, 16),
            nn.Embedding(20, 8),
            nn.Linear(24, 32),
            nn.Linear(32, 5),
            nn.Linear(32, 4),
        )

    def forward(self, image, tokens):
        h = F.relu(self.fuse(torch.cat([F.relu(self.img(image)), self.txt(tokens).mean(1)], 1)))
        return {"logits": self.cls(h), "boxes": self.box(h)}


def _seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


def test_bidirectional_two_layer_gru_after_an_embedding_with_padding():
    t = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    _exact(_seeded(BiGRU), t)
    small = _prune(_seeded(BiGRU), t)
    assert (small.emb.embedding_dim, small.gru.input_size, small.gru.hidden_size) == (8, 8, 6)
    assert small.gru.weight_ih_l1.shape == (3 * 6, 2 * 6) and small.fc.in_features == 12  # both directions
    assert small.emb.padding_idx == 0 and small(t).shape == (3, 5)


def test_sequence_first_rnn_then_lstm_read_through_its_last_state():
    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(1))
    _exact(_seeded(RNNThenLSTM), x)
    small = _prune(_seeded(RNNThenLSTM), x)
    assert (small.rnn.hidden_size, small.mid.in_features, small.mid.out_features) == (8, 8, 8)
    assert (small.lstm.input_size, small.lstm.hidden_size, small.fc.in_features) == (8, 5, 5)
    assert small(x).shape == (3, 3)


def test_lstm_with_a_projection_prunes_cells_and_projection_apart():
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(1))
    _exact(_seeded(ProjectedLSTM), x)
    small = _prune(_seeded(ProjectedLSTM), x)
    assert (small.lstm.input_size, small.lstm.hidden_size, small.lstm.proj_size) == (8, 10, 4)
    assert small.lstm.weight_hr_l0.shape == (4, 10) and small.fc.in_features == 4 and small(x).shape == (3, 3)


@pytest.mark.parametrize(("cell", "gates"), [(nn.GRUCell, 3), (nn.LSTMCell, 4), (nn.RNNCell, 1)])
def test_a_cell_stepped_in_a_loop_prunes_its_inputs_and_hidden_units(cell, gates):
    # before: the cells had no pruner; their weights were traced as bare tensors and the
    # hidden units froze ("op aten.addmm.default in cell combines channels with a tensor that
    # cannot shrink"): only fc0 pruned (1231 -> 887 parameters for the GRU cell)
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))
    _exact(_seeded(CellLoop, cell), x)
    small = _prune(_seeded(CellLoop, cell), x)
    assert (small.fc0.out_features, small.cell.input_size, small.cell.hidden_size, small.fc.in_features) == (8, 8, 6, 6)
    assert small.cell.weight_ih.shape == (gates * 6, 8) and small.cell.weight_hh.shape == (gates * 6, 6)
    assert small(x).shape == (3, 3)


def test_a_state_built_with_a_literal_width_keeps_the_cells_hidden_units():
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))
    graph = DependencyGraph(_seeded(LiteralState), x)
    g = _group(graph, "cell", "out")
    assert g.prunable == 0 and g.reasons == ["input without traced channels (module cell)"]  # the zeros
    small = _prune(_seeded(LiteralState), x)
    assert (small.fc0.out_features, small.cell.input_size, small.cell.hidden_size) == (8, 8, 12)


def test_embedding_bag_with_offsets_prunes_its_dimension():
    # before: nn.EmbeddingBag had no pruner; the dimensions it feeds froze ("input without traced channels")
    inputs = (torch.randint(0, 30, (10,), generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3, 7]))
    _exact(_seeded(Bag), inputs)
    small = _prune(_seeded(Bag), inputs)
    assert (small.bag.embedding_dim, small.bag.weight.shape, small.fc.in_features, small.fc.out_features) == (
        8,
        (30, 8),
        8,
        4,
    )
    assert small(*inputs).shape == (3, 2)


class SpatialNorm(nn.Module):
    """LayerNorm over (H, W) only: every channel is normalised on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.ln, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.LayerNorm([8, 8]), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c2(F.relu(self.ln(self.c1(x))))


def test_layer_norms_over_several_dims_prune_with_their_affine():
    # before: LayerNorm((C, H, W)) had no pruner; its channels froze ("normalises over a width
    # stored in its module's normalized_shape, which no plugin rewrites") and c1 kept all 16
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    graph = DependencyGraph(_seeded(OddNorms), x)
    g = _group(graph, "c1")
    assert g.prunable == 16 and g.modules() == ["c1", "c2", "ln"]
    _exact(_seeded(OddNorms), x)  # the groups without a cross-channel norm
    small = _prune(_seeded(OddNorms), x)
    assert (small.c1.out_channels, small.ln.normalized_shape, small.ln.weight.shape) == (8, (8, 8, 8), (8, 8, 8))
    assert (small.c2.out_channels, small.gn.num_channels, small.gn.num_groups) == (8, 8, 1)
    assert (small.c3.out_channels, small.inorm.num_features, small.inorm.running_mean.shape) == (4, 4, (4,))
    assert count_params(small) == 1912 and small(x).shape == (2, 4)
    _exact(_seeded(SpatialNorm), x)  # LayerNorm((H, W)): channels pass through, exactly
    small = _prune(_seeded(SpatialNorm), x)
    assert (small.c1.out_channels, small.ln.normalized_shape, small.c2.in_channels) == (8, (8, 8), 8)


def test_group_norm_loses_the_same_number_of_channels_in_every_group():
    x = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(1))
    pruner = StructuredPruner(_seeded(SequenceNorms), x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    kept = next(e.keep for e in pruner.history.steps[0] if (e.module, e.slice) == ("gn", "channels"))
    assert torch.bincount(kept // 4, minlength=4).tolist() == [2, 2, 2, 2]  # GroupNorm(4, 16): 4 per group
    assert (small.c.out_channels, small.bn.num_features, small.gn.num_channels, small.gn.num_groups) == (8, 8, 8, 4)
    assert (small.c2.out_channels, small.ln.normalized_shape, small.fc.in_features) == (8, (8,), 8)


def test_bare_parameters_in_forward_follow_the_channels_they_meet():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    _exact(_seeded(TinyViT), x)
    small = _prune(_seeded(TinyViT), x)
    assert (small.cls_token.shape, small.pos_embed.shape, small.gamma.shape) == ((1, 1, 8), (1, 5, 8), (8,))
    assert (small.patch.out_channels, small.fc1.out_features, small.head.in_features) == (8, 16, 8)
    y = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    _exact(_seeded(BareMatrix), y)
    small = _prune(_seeded(BareMatrix), y)
    # the matrix's rows shrink with fc1's channels (they froze before 2026-12-02), its columns with fc2's
    assert (small.proj.shape, small.scale.shape, small.fc2.in_features) == ((8, 6), (6,), 6)
    graph = DependencyGraph(_seeded(BareMatrix), y)
    assert (_group(graph, "fc1").size, _group(graph, "fc1").prunable) == (16, 16)
    assert small.fc1.out_features == 8


def test_a_one_channel_gate_stays_while_the_features_it_gates_shrink():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    _exact(_seeded(SpatialGate), x)
    graph = DependencyGraph(_seeded(SpatialGate), x)
    assert _group(graph, "att").size == 1 and _group(graph, "att").prunable == 0
    small = _prune(_seeded(SpatialGate), x)
    assert (small.c1.out_channels, small.att.weight.shape, small.c2.in_channels, small.c2.out_channels) == (
        8,
        (1, 8, 7, 7),
        8,
        8,
    )


def test_chunks_concatenated_back_in_another_order_in_two_levels():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    _exact(_seeded(ChunkNest), x)
    small = _prune(_seeded(ChunkNest), x)
    assert (small.c1.out_channels, small.a.in_channels, small.a.out_channels, small.b.in_channels) == (8, 2, 2, 2)
    assert (small.b.out_channels, small.c2.in_channels) == (3, 2 + 2 + 3 + 2)
    assert small(x).shape == (2, 8, 8, 8)


def test_a_module_shared_by_two_inputs_is_one_group():
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    _exact(_seeded(Siamese), (a, b))
    small = _prune(_seeded(Siamese), (a, b))
    assert (small.trunk[0].out_channels, small.trunk[1].num_features, small.trunk[3].out_channels) == (8, 8, 8)
    assert small.head.in_features == 16 and small(a, b).shape == (2, 2)


def test_dict_inputs_and_dict_outputs():
    inputs = {"image": torch.randn(3, 12), "tokens": torch.randint(0, 20, (3, 5))}
    _exact(_seeded(DictInOut), inputs)
    small = _prune(_seeded(DictInOut), inputs)
    assert (small.img.out_features, small.txt.embedding_dim, small.fuse.in_features, small.fuse.out_features) == (
        8,
        4,
        12,
        16,
    )
    out = small(**inputs)
    assert (out["logits"].shape, out["boxes"].shape) == ((3, 5), (3, 4))


# -- the torchvision families of the peer's lists ----------------------------------------------------


def _seg(builder):
    return lambda: builder(weights=None, weights_backbone=None, num_classes=4, aux_loss=False)


TORCHVISION = {
    # name: (factory, input size, output transform); the peer lists ShuffleNetV2 as failing
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(), 32, None),
    "regnet_x_400mf": (lambda: torchvision.models.regnet_x_400mf(), 32, None),
    "regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(), 32, None),
    "googlenet": (lambda: torchvision.models.googlenet(aux_logits=False, init_weights=True), 64, None),
    "inception_v3": (lambda: torchvision.models.inception_v3(aux_logits=False, init_weights=False), 75, None),
    "mnasnet0_5": (lambda: torchvision.models.mnasnet0_5(), 32, None),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), 32, None),
    "squeezenet1_1": (lambda: torchvision.models.squeezenet1_1(), 64, None),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(), 32, None),
    "lraspp_mobilenet_v3_large": (
        lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None),
        64,
        lambda out: out["out"],
    ),
    "deeplabv3_mobilenet_v3_large": (
        _seg(torchvision.models.segmentation.deeplabv3_mobilenet_v3_large),
        64,
        lambda out: out["out"],
    ),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_family_prunes_exactly_and_keeps_its_output(name):
    factory, size, transform = TORCHVISION[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    kw = {"output_transform": transform} if transform else {}
    _exact(model, x, **kw)
    small = _prune(model, x, **kw)
    before, after = model(x), small(x)
    if transform:
        assert set(after) == set(before) and transform(after).shape == transform(before).shape
    else:
        assert after.shape == before.shape == (2, 1000)
    assert count_params(small) < 0.6 * count_params(model)


def test_convnext_layer_scales_follow_the_channels_over_five_steps():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    _exact(model, x)
    small = _prune(model, x, iterative_steps=5)
    blocks = [m for m in small.modules() if type(m).__name__ == "CNBlock"]
    assert [tuple(b.layer_scale.shape) for b in blocks] == [(8, 1, 1)] * 2 + [(16, 1, 1)] * 2
    assert [b.block[0].out_channels for b in blocks] == [8, 8, 16, 16]  # the depthwise convs
    assert small.classifier[2].in_features == 16 and small(x).shape == (2, 10)


def test_convnext_every_conv_pruned_by_hand_in_turn():
    """The peer's random per-layer loop: for each conv, a random half (at most 10) of its
    group goes, the graph traced afresh each time."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10).eval()
    x, gen = torch.randn(1, 3, 32, 32), torch.Generator().manual_seed(0)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for name in names:
        pruner = StructuredPruner(model, x, "magnitude", bias_compensation=False, recalibrate_bn=False)
        g = _group(pruner.graph, name)
        free = (~g.frozen).nonzero().squeeze(1)
        if free.numel() < 2:
            continue
        pick = free[torch.randperm(free.numel(), generator=gen)[: min(free.numel() // 2, 10)]]
        before = model.get_submodule(name).out_channels
        model, _ = pruner.build(_mask(pruner.graph, [(g, pick.tolist())]))
        assert model.get_submodule(name).out_channels == before - pick.numel()
    assert model(x).shape == (1, 10)
    assert count_params(model) < 0.7 * 29370 - 1  # the 2-stage ConvNeXt had 29370 parameters


@pytest.mark.parametrize("importance", ["magnitude", "bn_scale", "lamp", "taylor"])
def test_densenet_global_ranking_under_each_criterion(importance):
    """The peer's DenseNet-121 loop over criteria, on a two-block DenseNet."""
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10)
    model.eval()
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(2)]
    x = data[0][0]
    _exact(model, x)
    pruner = StructuredPruner(model, x, importance, pruning_ratio=0.5, global_pruning=True, iterative_steps=2)
    pruner.collect_activations(data, progress=False)
    plan = pruner.plan()
    total = sum(gp.group.size for gp in plan.groups)
    small = pruner.prune()
    assert total == 16 + 2 * (2 * (32 + 8)) + 16 and len(pruner.history) == 2  # stem, blocks, transition
    kept = sum(m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d))
    assert kept == sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)) - total // 2
    assert small(x).shape == (4, 10)


def test_raft_keeps_its_correlation_scale_when_its_features_shrink():
    """The peer lists RAFT as failing. RAFT's correlation divides by the square root of the
    feature width read at run time; the pruned model must keep the trained width's scale."""
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    model = raft_small(weights=None).eval()
    images = (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))
    last = lambda flows: flows[-1]  # noqa: E731  the final of the iterative flow estimates
    _exact(model, images, output_transform=last)  # before: 0.76 off (it divided by the pruned width's root)
    small = _prune(model, images, output_transform=last)
    assert small.feature_encoder.conv.out_channels == 64 and small.corr_block.channels == 128
    assert last(small(*images)).shape == (1, 2, 128, 128)
    again = _prune(small, images, output_transform=last)  # a second cut keeps the first scale
    assert again.feature_encoder.conv.out_channels == 32 and again.corr_block.channels == 128


class KeepsItsActivations(nn.Module):
    """Keeps the last activations on itself, as models that plot attention maps do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        h = F.relu(self.fc1(x))
        self.seen = [h, {"h": h}]
        return self.fc2(h)


def test_a_model_called_with_gradients_before_pruning_prunes_and_replays():
    # before: prune() raised "Only Tensors created explicitly by the user (graph leaves) support
    # the deepcopy protocol" for the activations the user's own forward had kept on the model
    model, x = _seeded(KeepsItsActivations), torch.randn(3, 8)
    model(x).sum().backward()
    assert model.seen[0].grad_fn is not None
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert small.fc1.out_features == small.fc2.in_features == 8 and small(x).shape == (3, 4)
    assert pruner.history.replay(model).fc1.out_features == 8  # replay copies the model too


@pytest.mark.parametrize("importance", ["taylor", "magnitude", "lamp", "bn_scale"])
def test_isomorphic_global_ranking_halves_each_structure_of_a_transposed_conv_model(importance):
    """The peer's ``isomorphic=True`` loop: conv1's group and the transposed conv's group
    differ in structure, so each is ranked apart and loses half, whatever the criterion."""
    torch.manual_seed(0)
    model = TransposeModel().eval()
    with torch.no_grad():
        model.bn1.weight.mul_(0.01)  # plain global ranking would take conv1's channels first
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    data = [(x, torch.randint(0, 8, (2, 32, 32), generator=torch.Generator().manual_seed(8)))]
    kw = {"pruning_ratio": 0.5, "iterative_steps": 5, "global_pruning": True}
    iso = StructuredPruner(model, x, importance, isomorphic=True, **kw)
    iso.collect_activations(data, progress=False)
    small = iso.prune()
    assert (small.conv1.out_channels, small.conv2.out_channels, small.conv3.out_channels) == (8, 32, 8)
    assert small(x).shape == (2, 8, 32, 32)
    if importance == "bn_scale":
        plain = StructuredPruner(model, x, importance, **kw)
        plain.collect_activations(data, progress=False)
        assert plain.prune().conv1.out_channels < 8  # without isomorphic sets the scaled-down group goes first


def test_timm_vision_transformer_prunes_heads_mlp_and_the_stream_with_its_tokens():
    model = _timm_vit()
    x = torch.randn(2, 3, 32, 32)
    _exact(model, x)
    small = _prune(model, x)
    attn = small.blocks[0].attn
    assert (small.cls_token.shape, small.pos_embed.shape) == ((1, 1, 32), (1, 17, 32))
    assert (attn.num_heads, attn.head_dim, attn.qkv.weight.shape) == (2, 16, (3 * 2 * 16, 32))
    assert (small.blocks[1].mlp.fc1.out_features, small.head.in_features, small.head.out_features) == (128, 32, 10)
    block = 2 * 32 + (32 * 96 + 96) + (32 * 32 + 32) + 2 * 32 + (32 * 128 + 128) + (128 * 32 + 32)
    expected = (3 * 8 * 8 * 32 + 32) + 32 + 17 * 32 + 2 * block + 2 * 32 + (32 * 10 + 10)
    assert count_params(small) == expected == 32554 and small(x).shape == (2, 10)


# -- single layers by hand, per-unit metrics in the report ---------------------------------------


def test_one_layer_sliced_by_hand_without_the_graph():
    """The peer's ``prune_conv_out_channels(features[0], idxs)`` then
    ``prune_conv_in_channels(features[3], idxs)``: slice edits applied directly."""
    from cleanai_core.slicing import SliceEdit, apply_edits

    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).eval()
    w0, w3 = model.features[0].weight.detach().clone(), model.features[3].weight.detach().clone()
    keep = torch.tensor([i for i in range(64) if i not in (0, 1, 3, 4)])
    changed = apply_edits(model, [SliceEdit("features.0", "out", keep), SliceEdit("features.3", "in", keep)])
    assert sorted(changed) == ["features.0", "features.3"]
    assert model.features[0].weight.shape == (60, 3, 11, 11) and model.features[0].out_channels == 60
    assert model.features[3].weight.shape == (192, 60, 5, 5) and model.features[3].in_channels == 60
    assert torch.equal(model.features[0].weight, w0[keep]) and torch.equal(model.features[3].weight, w3[:, keep])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_report_lists_each_layers_pruned_indices_and_their_scores():
    """The peer's per-index metrics (``reduction='none'``): the report keeps every pruned
    unit's index and score, and those scores are the lowest of the layer's group."""
    model = _resnet18()
    pruner = StructuredPruner(model, X32, "magnitude", pruning_ratio=0.25)
    plan = pruner.plan()
    pruner.prune()
    stem = next(r for r in pruner.report()["layers"] if (r["name"], r["slice"]) == ("conv1", "out"))
    gp = next(gp for gp in plan.groups if "conv1" in gp.group.modules())
    assert (stem["channels_before"], stem["channels_after"]) == (64, 48)
    assert stem["pruned_indices"] == gp.pruned.nonzero().squeeze(1).tolist()
    scores = stem["importance_scores"]
    assert len(scores["pruned"]) == 16 and len(scores["kept"]) == 48
    assert max(scores["pruned"]) <= min(scores["kept"])
    assert scores["pruned"] == pytest.approx(gp.scores[gp.pruned].tolist(), abs=1e-6)
