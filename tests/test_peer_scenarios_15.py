"""A fifteenth set of the scenarios users bring from Torch-Pruning, written for CleanAI's API
(see ``test_peer_scenarios.py`` to ``_14``): the peer's ``pruning_ratio_dict`` with a tuple
of modules as a key, a *scope* whose layers share one ratio and, under global pruning, are
ranked together.

Each test asserts widths, parameter counts and, where slicing must equal zeroing, the
masking oracle."""

from __future__ import annotations

import attrs
import pytest
import torch
from test_peer_scenarios_6 import _seeded
from torch import nn

from cleanai_core import GradualPruner, PruningHistory, PruningSchedule, StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.metrics import count_params

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


# -- layer_pruning_ratios with a tuple of layers: one scope ---------------------------------------


class Blocks(nn.Module):
    """A stem and three blocks of 16 channels each; ``b1``'s channels 4..15 are nearly dead
    (their weights a thousandth of the others'), ``b2``'s are all alive."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            self.b1[0].weight[4:] *= 1e-3
            self.b1[0].bias[4:] *= 1e-3
            self.b1[1].weight[4:] *= 1e-3
            self.b1[1].bias[4:] *= 1e-3
            self.b2[0].weight[:, 4:] *= 1e-3

    def forward(self, x):
        return self.head(self.b3(self.b2(self.b1(self.stem(x)))).mean((2, 3)))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _widths(model: Blocks) -> list[int]:
    return [model.stem.out_channels, model.b1[0].out_channels, model.b2[0].out_channels, model.b3[0].out_channels]


def test_a_tuple_of_layers_gives_each_its_ratio_under_uniform_pruning():
    """``layer_pruning_ratios={(m.b1, m.b2): 0.5}`` was refused ("cannot match layers with
    (Sequential(...": give a module, a name, a glob or a type); it now names both blocks,
    each losing half its channels as a ratio for each alone does."""
    model = _seeded(Blocks)
    small = StructuredPruner(
        model, X, "magnitude", pruning_ratio=0.0, layer_pruning_ratios={(model.b1, model.b2): 0.5}
    ).prune()
    assert _widths(small) == [16, 8, 8, 16]
    same = StructuredPruner(
        model, X, "magnitude", pruning_ratio=0.0, layer_pruning_ratios={model.b1: 0.5, model.b2: 0.5}
    ).prune()
    assert small.state_dict().keys() == same.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), same.state_dict().values(), strict=True))
    assert count_params(model) == 448 + 2 * (2320 + 32) + 2320 + 68
    assert count_params(small) == 448 + (16 * 8 * 9 + 8 + 16) + (8 * 8 * 9 + 8 + 16) + (8 * 16 * 9 + 16) + 68


def test_a_tuple_of_layers_is_one_ranking_scope_under_global_pruning():
    """Under global pruning the peer's tuple is a scope: its layers' units rank together and
    lose the ratio in all. ``b1``'s twelve weak channels go first (at most
    ``max_layer_ratio`` of it), the rest from ``b2``; the layers outside keep their width,
    and the whole still loses 16 of the scope's 32 units."""
    model = _seeded(Blocks)
    pruner = StructuredPruner(
        model,
        X,
        "magnitude",
        pruning_ratio=0.0,
        global_pruning=True,
        layer_pruning_ratios={(model.b1, model.b2): 0.5},
    )
    small = pruner.prune()
    assert _widths(small) == [16, 4, 12, 16]
    assert sorted(torch.nonzero(~torch.isin(torch.arange(16), _kept(pruner, "b1.0"))).squeeze(1).tolist()) == list(
        range(4, 16)
    )
    assert small(X).shape == (2, 4)
    # the same ratio per layer (no tuple) is uniform inside each layer, also under global pruning
    apart = StructuredPruner(
        model,
        X,
        "magnitude",
        pruning_ratio=0.0,
        global_pruning=True,
        layer_pruning_ratios={model.b1: 0.5, model.b2: 0.5},
    ).prune()
    assert _widths(apart) == [16, 8, 8, 16]
    fresh = _seeded(Blocks)
    PruningHistory.from_json(pruner.history.to_json()).replay(fresh)
    fresh.load_state_dict(small.state_dict())
    assert torch.equal(fresh(X), small(X))


def _kept(pruner: StructuredPruner, module: str) -> torch.Tensor:
    """The original indices the plan keeps of ``module``'s output channels."""
    units = pruner.plan().pruned_units()
    keep = pruner.graph.keep_indices(units)
    return keep[(module, "out")]


@pytest.mark.parametrize("steps", [2, 3])
def test_a_tuple_scope_reaches_its_ratio_over_iterative_steps(steps):
    """With ``iterative_steps`` the scope's share is spread over the steps: after the last
    one it has lost the tuple's ratio of its original units, the weak channels first."""
    model = _seeded(Blocks)
    small = StructuredPruner(
        model,
        X,
        "magnitude",
        pruning_ratio=0.0,
        global_pruning=True,
        iterative_steps=steps,
        layer_pruning_ratios={(model.b1, model.b2): 0.5},
    ).prune()
    widths = _widths(small)
    assert widths[0] == 16 and widths[3] == 16
    assert widths[1] + widths[2] == 16 and widths[1] < 8


def test_a_tuple_scope_beside_isomorphic_sets_and_the_global_ratio():
    """A tuple scope leaves the other groups to the global ratio (here with isomorphic
    sets): ``b3`` and the stem lose a quarter, ranked on their own, while the scope loses
    half of its units."""
    model = _seeded(Blocks)
    small = StructuredPruner(
        model,
        X,
        "magnitude",
        pruning_ratio=0.25,
        global_pruning=True,
        isomorphic=True,
        layer_pruning_ratios={(model.b1, "b2"): 0.5},
    ).prune()
    widths = _widths(small)
    assert widths[1] + widths[2] == 16 and widths[1] == 4
    assert widths[0] == 12 and widths[3] == 12


def test_an_empty_tuple_or_a_tuple_naming_nothing_is_refused():
    model = _seeded(Blocks)
    with pytest.raises(UserError, match="empty tuple of layers"):
        StructuredPruner(model, X, "magnitude", layer_pruning_ratios={(): 0.5})
    with pytest.raises(UserError, match="'b9' matches no layer"):
        StructuredPruner(model, X, "magnitude", layer_pruning_ratios={("b1", "b9"): 0.5})


def test_a_tuple_key_is_named_by_its_layers_names_in_errors():
    """A ratio error names a tuple of modules by the modules' names: the module's ``repr``
    printed every layer of both blocks into the message (the same for one module key)."""
    model = _seeded(Blocks)
    with pytest.raises(UserError) as bad:
        StructuredPruner(model, X, "magnitude", layer_pruning_ratios={(model.b1, model.b2): 1.5})
    assert str(bad.value).startswith("layer_pruning_ratios[(model.b1, model.b2)]=1.5 must be a number")
    with pytest.raises(UserError) as ignored:
        StructuredPruner(
            model, X, "magnitude", layer_pruning_ratios={(model.b1, nn.Linear): 0.5}, ignored_layers=[model.b1, "head"]
        )
    assert str(ignored.value).startswith("layer (model.b1, Linear) is ignored (ignored_layers, --ignore)")
    with pytest.raises(UserError) as head:
        StructuredPruner(model, X, "magnitude", layer_pruning_ratios={model.head: 0.5})
    assert str(head.value).startswith("layer_pruning_ratios[model.head]=0.5 (--layer-ratio): the output channels of")


# -- a checkpoint holding the history, read with torch.load's defaults ------------------------------


def test_a_checkpoint_holding_the_history_loads_with_torch_loads_defaults(tmp_path):
    """The peer's ``test_load``: ``torch.save({"model": state_dict, "pruning": history})``
    after iterative pruning, then a fresh model, the history replayed and the weights
    loaded. With the history object in the checkpoint, ``torch.load`` (``weights_only=True``
    by default) raised ``UnpicklingError: Weights only load failed ... Unsupported global:
    ... SliceEdit``; the history now pickles as its checked JSON form."""
    model = _seeded(Blocks)
    pruner = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5, iterative_steps=3)
    small = pruner.prune()
    torch.save({"model": small.state_dict(), "pruning": pruner.history}, tmp_path / "pruned.pth")
    saved = torch.load(tmp_path / "pruned.pth")
    assert isinstance(saved["pruning"], PruningHistory) and len(saved["pruning"]) == 3
    fresh = _seeded(Blocks)
    saved["pruning"].replay(fresh)
    fresh.load_state_dict(saved["model"])
    assert _widths(fresh) == _widths(small) == [8, 8, 8, 8]
    assert torch.equal(fresh(X), small(X))


def test_a_tampered_history_in_a_checkpoint_is_refused_when_read(tmp_path):
    """What the checkpoint holds is data, checked as ``PruningHistory.load`` checks a file:
    an edit of another form is a :class:`UserError` naming it, not a history that fails
    later inside a replay."""
    model = _seeded(Blocks)
    pruner = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5)
    pruner.prune()
    first = pruner.history.steps[0][0]
    bad = PruningHistory([[attrs.evolve(first, keep=torch.tensor([[0, 1]]))]])  # two dims: no edit's form
    torch.save({"pruning": bad}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="step 0 edit 0"):
        torch.load(tmp_path / "bad.pth")


def test_a_history_pickled_as_its_fields_before_still_unpickles():
    """A history pickled by the earlier CleanAI (its fields, the edits as objects: what
    ``pickle.dumps`` of a pruner or a whole-model checkpoint holding it wrote) still loads
    through a full unpickler."""
    model = _seeded(Blocks)
    pruner = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    old = PruningHistory.__new__(PruningHistory)
    old.__setstate__({"steps": pruner.history.steps, "meta": pruner.history.meta})
    fresh = _seeded(Blocks)
    old.replay(fresh)
    fresh.load_state_dict(small.state_dict())
    assert torch.equal(fresh(X), small(X))


# -- Hessian scores through reentrant activation checkpointing -------------------------------------


class Checkpointed(nn.Module):
    """A block run through ``torch.utils.checkpoint`` (reentrant, as older research code and
    Hugging Face's gradient checkpointing call it) or plainly."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.a = nn.Conv2d(3, 8, 1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.a(x)
        if self.reentrant is None:
            y = self.block(y)
        else:
            y = torch.utils.checkpoint.checkpoint(self.block, y, use_reentrant=self.reentrant)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("reentrant", [True, False])
def test_hessian_scores_through_checkpointed_blocks_equal_the_plain_forwards(reentrant):
    """``"hessian"`` takes each sample's own gradient; it did so with ``torch.autograd.grad``,
    which a reentrant checkpoint refuses: ``RuntimeError: When use_reentrant=True,
    torch.utils.checkpoint is incompatible with .grad() ...`` out of ``prune()``. Each
    sample's gradient now comes from a plain backward; the scores equal those of the same
    model run without checkpointing, and so do the pruned weights."""
    batches = [
        (torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(s)), torch.tensor([0, 1, 2, 3]))
        for s in (1, 2)
    ]
    results = []
    for mode in (reentrant, None):
        model = _seeded(lambda mode=mode: Checkpointed(mode))
        pruner = StructuredPruner(model, batches[0][0][:1], "hessian", pruning_ratio=0.5)
        pruner.collect_activations(batches, num_batches=2)
        scores = pruner.score()
        small = pruner.prune()
        results.append((scores, small))
    (scores, small), (plain_scores, plain) = results
    assert scores.keys() == plain_scores.keys() and len(scores) == 2
    for gid in scores:
        torch.testing.assert_close(scores[gid], plain_scores[gid], rtol=1e-5, atol=1e-12)
    assert small.block[0].out_channels == plain.block[0].out_channels == 4 and small.a.out_channels == 4
    for (name, a), (_, b) in zip(small.state_dict().items(), plain.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


# -- global ranking beside layer ratios, in steps --------------------------------------------------


@pytest.mark.parametrize("scoped", [False, True], ids=["per_layer", "tuple"])
def test_global_ranking_beside_layer_ratios_removes_the_same_share_in_steps_as_in_one(scoped):
    """The peer's ``global_pruning=True`` with a ``pruning_ratio_dict`` and
    ``iterative_steps``: the layers without a ratio of their own (the stem and ``b3``) share
    ``pruning_ratio`` among themselves. In one step they lost 8 of their 32 units; in four
    steps only 3 (14 and 15 channels kept), since each step's share of the ranked units
    counted the units the layers with a ratio had lost. They now lose 8 either way."""
    model = _seeded(Blocks)
    ratios = {(model.b1, model.b2): 0.5} if scoped else {model.b1: 0.5, model.b2: 0.5}
    kept = []
    for steps in (1, 4):
        small = StructuredPruner(
            model,
            X,
            "magnitude",
            pruning_ratio=0.25,
            global_pruning=True,
            iterative_steps=steps,
            layer_pruning_ratios=ratios,
        ).prune()
        kept.append(_widths(small))
    assert kept[0] == kept[1]
    assert kept[0][0] + kept[0][3] == 32 - 8
    assert kept[0][1:3] == ([4, 12] if scoped else [8, 8])


def test_a_gradual_schedule_with_global_ranking_and_a_tuple_scope_reaches_both_ratios():
    """A :class:`GradualPruner` (by ratio, global ranking) with a tuple scope: after the
    schedule the scope has lost its 0.5 of its units (the weak channels of ``b1`` first) and
    the other layers their 0.25 of theirs (before: 4 of 32, the scope's progress counted as
    theirs)."""
    model = _seeded(Blocks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    gradual = GradualPruner(
        model,
        X,
        optimizer,
        PruningSchedule(final=0.25, steps=4),
        by="ratio",
        importance="magnitude",
        global_pruning=True,
        layer_pruning_ratios={(model.b1, model.b2): 0.5},
    )
    for _ in range(4):
        gradual.step([X])
    widths = _widths(model)
    assert widths[1:3] == [4, 12]
    assert widths[0] + widths[3] == 32 - 8


# -- a history of a layer a plugin sliced, replayed without the plugin ------------------------------


def test_a_history_replayed_without_the_plugin_that_sliced_a_custom_layer_names_the_plugin(tmp_path):
    """The peer's customised layer, pruned through a plugin (``test_peer_scenarios_3``),
    then its history replayed, or its saved folder loaded, where the plugin is not
    registered: "this history does not fit the model ... (KeyError: no plugin claims module
    'customized_layer' ...). Replay it on a fresh, unpruned model", which it was, and
    ``load_pruned`` called the folder "damaged, tampered with or not written by this
    CleanAI". Both now say that the plugin that sliced the layer is missing; with it the
    replay gives the pruned model's outputs."""
    from test_peer_scenarios_3 import SquareNet, SquarePlugin

    from cleanai_core.io import load_pruned, save_pruned
    from cleanai_core.testing import temporary_plugin

    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
    with temporary_plugin(SquarePlugin(), name="square"):
        model = _seeded(SquareNet)
        pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
        small = pruner.prune()
        save_pruned(tmp_path / "out", small, pruner.history, "test_peer_scenarios_3:SquareNet")
    fresh = _seeded(SquareNet)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(
        UserError, match=r"module 'customized_layer' \(CustomizedLayer\) has slices to cut \('dim'\), but"
    ):
        pruner.history.replay(fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    with pytest.raises(UserError, match="no registered plugin claims a CustomizedLayer now"):
        load_pruned(tmp_path / "out", trust_code=True)
    with temporary_plugin(SquarePlugin(), name="square"):
        pruner.history.replay(fresh)
        fresh.load_state_dict(small.state_dict())
        assert torch.equal(fresh(x), small(x))
        again = load_pruned(tmp_path / "out", trust_code=True)
        assert torch.equal(again(x), small(x))


# -- ignoring a bare tensor ----------------------------------------------------------------------


class TokenNet(nn.Module):
    """A ViT in miniature: patch embedding, a class token and a position embedding as bare
    parameters, an MLP block on the stream, a norm and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 16) * 0.02)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1) + self.pos_embed
        t = t + self.fc2(torch.relu(self.fc1(t)))
        return self.head(self.norm(t)[:, 0])


@pytest.mark.parametrize("spec", ["tensor", "name", "cls_token"])
def test_ignoring_a_bare_tensor_keeps_its_channels(spec):
    """Torch-Pruning users keep a ViT's embedding width by leaving its ``pos_embed`` /
    ``cls_token`` out: ``ignored_layers=[model.pos_embed]`` was refused ("cannot match layers
    with the parameter 'pos_embed' (a tensor, not a layer; ...)"). A bare tensor of the
    model, given as itself or by its name, now keeps its channels, with every channel
    coupled to them (here the stream), as ignoring ``patch`` does; the MLP still prunes."""
    model = _seeded(TokenNet)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ignored = {"tensor": [model.pos_embed], "name": ["pos_embed"], "cls_token": ["cls_token"]}[spec]
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=ignored).prune()
    assert tuple(small.pos_embed.shape) == (1, 5, 16) and small.patch.out_channels == 16
    assert small.fc1.out_features == 16 and small(x).shape == (2, 3)
    same = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=["patch"]).prune()
    for (name, a), (_, b) in zip(small.state_dict().items(), same.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    free = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    assert tuple(free.pos_embed.shape) == (1, 5, 8)


def test_ignoring_a_tensor_a_layer_holds_names_the_layer_to_ignore():
    model = _seeded(TokenNet)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(
        UserError, match=r"the tensor 'fc1.weight', which layer 'fc1' holds and slices: .* ignore 'fc1'"
    ):
        StructuredPruner(model, x, "magnitude", ignored_layers=[model.fc1.weight])
