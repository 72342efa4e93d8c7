"""A thirteenth set of the scenarios users bring from Torch-Pruning's test suite, written for
CleanAI's API (see ``test_peer_scenarios.py`` to ``_12``): gradient criteria (Taylor, Hessian)
on a sequence model written in plain PyTorch, whose logits are ``(N, T, vocab)`` with one
label per token; Taylor scored with the gradients of the user's own loss, left on the
parameters by its backward (the peer's ``loss.backward(); pruner.step()``); a model exported
with ``torch.export`` (``ExportedProgram.module()``), whose ``eval()`` refuses; the peer's
``get_pruning_group(layer, prune_fn, idxs)`` as ``graph.removal(layer, idxs)``; a head count
read from a settings dataclass with ``slots=True``.

Each test asserts widths, parameter counts, gradients against a hand-computed loss, and
the masking oracle where slicing must equal zeroing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_peer_scenarios_6 import _seeded
from torch import nn

from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core.collect import accumulate_gradients
from cleanai_core.errors import UserError
from cleanai_core.metrics import count_params
from cleanai_core.testing import check_pruner, masked_forward

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


# -- gradient criteria on a language model's (N, T, vocab) logits -------------------------------


class TinyLM(nn.Module):
    """Embedding -> RNN -> a linear over the vocabulary at every position: ``(N, T, 30)``."""

    def __init__(self, vocab: int = 30) -> None:
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(vocab, 12), nn.RNN(12, 16, batch_first=True), nn.Linear(16, vocab)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def _tokens(seed: int, n: int = 4, t: int = 5, vocab: int = 30) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("criterion", ["taylor", "hessian"])
def test_gradient_criteria_score_a_plain_language_model_on_its_tokens(criterion):
    """The peer's Taylor / Hessian examples on an LM: labels ``(N, T)`` for logits
    ``(N, T, vocab)``. Cross-entropy read the ``T`` positions as the classes and refused:
    "needs integer labels of shape (4, 30); got labels of shape (4, 5)". The classes are
    the last dim where the labels fit the positions before it."""
    model = _seeded(TinyLM)
    data = [(_tokens(1), _tokens(2)), (_tokens(3), _tokens(4))]
    pruner = StructuredPruner(model, _tokens(0), criterion, pruning_ratio=0.5)
    small = pruner.collect_activations(data, progress=False).prune()
    assert (small.emb.embedding_dim, small.rnn.hidden_size, small.head.out_features) == (6, 8, 30)
    assert (count_params(model), count_params(small)) == (1350, 578)
    assert small(_tokens(0)).shape == (4, 5, 30)


def test_the_gradients_of_a_language_model_are_those_of_its_per_token_cross_entropy():
    model = _seeded(TinyLM)
    x, y = _tokens(1), _tokens(2)
    y[0, :2] = -100  # positions without a label are not scored, as in cross-entropy
    grads = accumulate_gradients(model, [(x, y)], None, None)
    squares = accumulate_gradients(model, [(x, y)], None, None, squared=True)
    model.zero_grad()
    F.cross_entropy(model(x).transpose(1, 2), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-8)
    want = {}
    for i in range(4):  # each sequence's own gradient, squared: the empirical Fisher
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]).transpose(1, 2), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            want[name] = want.get(name, 0) + p.grad**2
    for name in want:
        torch.testing.assert_close(squares[name], want[name], rtol=1e-4, atol=1e-10)


def test_labels_that_fit_neither_the_positions_nor_dim_1_are_still_refused():
    model = _seeded(TinyLM)
    with pytest.raises(UserError, match=r"needs integer labels of shape \(4, 30\); got labels of shape \(4, 3\)"):
        accumulate_gradients(model, [(_tokens(1), _tokens(2)[:, :3])], None, None)
    with pytest.raises(UserError, match="class label 31 but the output has 30 classes"):
        accumulate_gradients(model, [(_tokens(1), torch.full((4, 5), 31))], None, None)


# -- Taylor with the gradients of the user's own loss --------------------------------------------


class TransposeModel(nn.Module):
    """The peer's ``test_pruner_TransposeConv`` model: its output is a feature map, scored
    there with ``model(x).sum().backward()`` before each ``pruner.step()``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.ConvTranspose2d(16, 64, 2, stride=2), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 8, 3, 1, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn3(self.conv3(F.relu(self.bn2(self.conv2(x))))))


XT = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_taylor_scores_with_the_gradients_the_users_own_backward_left():
    """Without labelled batches Taylor refused ("call pruner.collect_activations(loader)
    first"), and ``collect_activations`` refused a feature map's unlabelled batches: a model
    whose loss is not a classifier's could not be scored by Taylor at all."""
    model = _seeded(TransposeModel)
    pruner = StructuredPruner(model, XT, "taylor", pruning_ratio=0.5)
    with pytest.raises(UserError, match="with labelled batches, or run your own loss's backward on the model"):
        pruner.prune()
    model(XT).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    small = pruner.prune()
    assert (small.conv1.out_channels, small.conv2.out_channels, small.conv3.out_channels) == (8, 32, 8)
    assert (count_params(model), count_params(small)) == (9400, 3688)
    assert small(XT).shape == (1, 8, 32, 32)
    # the scores are (w * dL/dw)^2 summed over each unit's weights: conv1's filters (their weights: the
    # energies leave a layer's bias out), bn1's scale and shift, conv2's inputs
    stem = next(g for g in pruner.graph.groups() if any(s.module == "conv1" and s.name == "out" for s in g.slices))
    term = {n: (p.detach() * grads[n]) ** 2 for n, p in model.named_parameters()}
    own = term["conv1.weight"].sum((1, 2, 3)) + term["bn1.weight"] + term["bn1.bias"]
    own = own + term["conv2.weight"].sum((1, 2, 3))  # a transposed conv's inputs are its weight's dim 0
    torch.testing.assert_close(pruner.score()[stem.id], own.double(), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())  # the user's gradients stay


def test_taylor_from_the_users_backward_chooses_what_labelled_batches_choose():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    labelled = StructuredPruner(model, x, "taylor", pruning_ratio=0.5).collect_activations([(x, y)], progress=False)
    F.cross_entropy(model(x), y).backward()
    held = StructuredPruner(model, x, "taylor", pruning_ratio=0.5)
    want, got = labelled.score(), held.score()
    assert sorted(want) == sorted(got) and len(got) == 12
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=0)
    assert torch.equal(held.plan().pruned_units(), labelled.plan().pruned_units())


def test_gradients_of_the_users_backward_that_cannot_score_are_refused_with_the_way():
    model = _seeded(TransposeModel)
    model(XT).sum().backward()
    with pytest.raises(UserError, match=r"score one step, but iterative_steps=3: .* inplace=True\)\.prune\(\)"):
        StructuredPruner(model, XT, "taylor", pruning_ratio=0.5, iterative_steps=3).prune()
    with pytest.raises(UserError, match="hessian importance needs each sample's own gradient, but the gradients on"):
        StructuredPruner(model, XT, "hessian", pruning_ratio=0.5).prune()
    model.conv1.weight.grad = None  # a frozen layer's: its units would score 0 and go first
    with pytest.raises(UserError, match=r"but 1 of them have none \(conv1.weight: requires_grad=False, or your loss"):
        StructuredPruner(model, XT, "taylor", pruning_ratio=0.5).prune()
    assert model.conv1.out_channels == 16


# -- a model exported with torch.export --------------------------------------------------------


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.fc((y + F.relu(self.bn2(self.conv2(y)))).mean((2, 3)))


X8 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _exported(factory, x):
    return torch.export.export(_seeded(factory), (x,)).module()


def test_a_model_exported_with_torch_export_prunes_like_the_module_it_came_from():
    """``torch.export.export(model, (x,)).module()`` raises ``NotImplementedError: Calling
    eval() is not supported yet`` from ``eval()`` / ``train()``; tracing, scoring and
    verification switch modes and stopped there. Its mode was fixed when it was exported:
    the flags are set directly. Its convolutions run ``aten.conv2d`` on bare weights, which
    prune like the modules'."""
    exported = _exported(ResidualNet, X8)
    before = {n: p.detach().clone() for n, p in exported.named_parameters()}
    modes = [m.training for m in exported.modules()]
    report = check_pruner(exported, X8)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6 and report.kept_whole == ()
    small = StructuredPruner(exported, X8, "magnitude", pruning_ratio=0.5).prune()
    eager = StructuredPruner(_seeded(ResidualNet), X8, "magnitude", pruning_ratio=0.5).prune()
    assert (count_params(exported), count_params(small), count_params(eager)) == (876, 296, 296)
    # the same widths (its bare tensors score a little otherwise: its BatchNorms' running statistics are
    # tensors of the graph beside their weights, so other channels may go)
    assert {n: p.shape for n, p in small.named_parameters()} == {n: p.shape for n, p in eager.named_parameters()}
    assert small(X8).shape == (2, 4)
    assert [m.training for m in exported.modules()] == modes  # the user's module as it was
    assert all(torch.equal(p, before[n]) for n, p in exported.named_parameters())


@pytest.mark.parametrize("criterion", ["weight_activation", "taylor"])
def test_an_exported_model_is_calibrated_and_scored_on_data(criterion):
    exported = _exported(ResidualNet, X8)
    data = [(X8, torch.tensor([0, 3])), (X8 * 2, torch.tensor([1, 2]))]
    pruner = StructuredPruner(exported, X8, criterion, pruning_ratio=0.5)
    small = pruner.collect_activations(data, progress=False).prune()
    assert count_params(small) == 296 and small(X8).shape == (2, 4)


def test_an_exported_torchvision_resnet_prunes_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    exported = torch.export.export(torchvision.models.resnet18(num_classes=10).eval(), (x,)).module()
    report = check_pruner(exported, x)
    assert report.max_abs_diff < 1e-5 and report.kept_whole == ()
    small = StructuredPruner(exported, x, "magnitude", pruning_ratio=0.5).prune()
    assert (count_params(exported), count_params(small)) == (11181642, 2801450)
    assert small(x).shape == (2, 10)


# -- hand-picked indices of one layer, whatever order its group lists them in ---------------------


class FlippedResidual(nn.Module):
    """``p(x).flip(1) + a(x)``: ``a``'s channel ``i`` meets ``p``'s channel ``7 - i``, and the
    group lists its units in ``p``'s order."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.a, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.p(x).flip(1) + self.a(x))


def test_indices_picked_for_one_layer_remove_that_layers_channels_and_their_partners():
    """The documented idiom ``mask[group.units[idxs]] = True`` removed ``a``'s channels
    5, 1 and 0 where 2, 6 and 7 were meant: the group's unit ``i`` is
    ``p``'s channel ``i``, ``a``'s ``7 - i``. ``graph.removal(layer, idxs)`` maps the
    layer's own indices."""
    model = _seeded(FlippedResidual)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    pruner = StructuredPruner(model, x, "magnitude", bias_compensation=False, recalibrate_bn=False)
    group = next(g for g in pruner.graph.groups() if any(s.module == "a" for s in g.slices))
    idiom = torch.zeros(pruner.graph.root.numel(), dtype=torch.bool)
    idiom[group.units[[2, 6, 7]]] = True
    assert pruner.graph.keep_indices(idiom)[("a", "out")].tolist() == [2, 3, 4, 6, 7]  # a's 0, 1, 5 went
    mask = pruner.graph.removal(model.a, [2, 6, 7])
    assert torch.equal(mask, pruner.graph.removal("a", torch.tensor([2, 6, 7])))
    small, _ = pruner.build(mask)
    kept = [0, 1, 3, 4, 5]
    assert torch.equal(small.a.weight, model.a.weight[kept])
    assert torch.equal(small.p.weight, model.p.weight[[7 - i for i in reversed(kept)]])
    assert torch.equal(small.c.weight, model.c.weight[:, kept])
    torch.testing.assert_close(small(x), masked_forward(pruner.graph, mask, x)[0], rtol=0, atol=1e-6)
    # the peer's conv1 group of resnet18 by the layer's indices, and by a BatchNorm's
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    graph = DependencyGraph(net, torch.randn(1, 3, 32, 32))
    assert torch.equal(graph.removal(net.conv1, [2, 6, 9]), graph.removal(net.layer1[1].bn2, [2, 6, 9], "channels"))
    assert int(graph.removal(net.layer2[0].conv1, [2, 6, 9], "in").sum()) == 3


def test_indices_for_a_layer_that_the_graph_cannot_map_are_refused_by_name():
    model = _seeded(FlippedResidual)
    graph = DependencyGraph(model, torch.randn(1, 3, 4, 4))
    with pytest.raises(UserError, match=r"indices to remove from a:out must be integers in 0..7; got \[2, 8\]"):
        graph.removal(model.a, [2, 8])
    with pytest.raises(UserError, match=r"module 'a' has no slice 'channels' \(its slices: 'in', 'out'\)"):
        graph.removal("a", [1], "channels")
    with pytest.raises(UserError, match="'Conv2d' is not a module of the traced model"):
        graph.removal(nn.Conv2d(3, 8, 1), [1])


# -- a head count read from a settings dataclass with slots ------------------------------------


@dataclasses.dataclass(slots=True)
class SlottedSettings:
    heads: int = 8
    layers: int = 2


class HeadsFromSlottedSettings(nn.Module):
    """``reshape(b, n, 3, self.cfg.heads, -1)`` with ``self.cfg`` a dataclass with
    ``slots=True`` (no ``__dict__``)."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = SlottedSettings()
        self.inp, self.qkv = nn.Linear(5, 32), nn.Linear(32, 96)
        self.proj, self.out = nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        x = self.inp(x)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.cfg.heads, -1).permute(2, 0, 3, 1, 4)
        y = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1) @ v
        return self.out(x + self.proj(y.transpose(1, 2).reshape(b, n, -1)))


def test_a_head_count_read_from_a_slotted_settings_dataclass_is_a_stored_number():
    """Reading the settings object's values with ``vars()`` failed on a dataclass with
    ``slots=True``: ``TraceError: tracing failed at op aten.view.default ... TypeError:
    vars() argument must have __dict__ attribute`` (also torch.export's modules, which hold
    such dataclasses). Its fields are read instead."""
    x = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(0))
    model = _seeded(HeadsFromSlottedSettings)
    report = check_pruner(model, x)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5 and report.kept_whole == ()
    width = next(
        g for g in DependencyGraph(model, x).groups() if any((s.module, s.name) == ("qkv", "out") for s in g.slices)
    )
    assert width.units.numel() == width.prunable == 4  # a dim of every head, never a head
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    assert small.qkv.out_features == 48 and (count_params(model), count_params(small)) == (4515, 1235)
