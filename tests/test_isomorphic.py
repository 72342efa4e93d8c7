"""Isomorphic pruning: global ranking within sets of groups of the same structure, every
set losing the ratio (:mod:`cleanai_core.isomorphic`)."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import cleanai_core.pruner as pruner_module
from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core.cli import main
from cleanai_core.errors import UserError
from cleanai_core.isomorphic import isomorphic_sets
from cleanai_core.metrics import count_params
from cleanai_core.scoring import get_importance
from cleanai_core.testing import masked_forward, run_model

tv = pytest.importorskip("torchvision")


def _mlp() -> nn.Module:
    """16 -> 32 -> 16 -> 32 -> 16 -> 32 -> 16 -> 4. Isomorphic sets: the three 32-wide groups
    (``fc0``, ``fc2``, ``fc4`` out), the 16-wide groups between two hidden layers (``fc1``,
    ``fc3`` out) and the last one, read by the head, alone."""
    torch.manual_seed(0)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    widths = [16, 32, 16, 32, 16, 32, 16]
    for i, (cin, cout) in enumerate(zip(widths, widths[1:], strict=False)):
        layers[f"fc{i}"], layers[f"act{i}"] = nn.Linear(cin, cout), nn.ReLU()
    layers["head"] = nn.Linear(16, 4)
    return nn.Sequential(layers).eval()


class Scaled:
    """Magnitude scores, multiplied by ``factors[producer]`` for the groups those layers
    produce (magnitude normalises every slice by its mean, so scaling weights would not do)."""

    needs_activations = False
    needs_gradients = False

    def __init__(self, **factors: float) -> None:
        self.base, self.factors = get_importance("magnitude"), factors

    def __call__(self, group, ctx) -> torch.Tensor:
        producer = next(s.module for s in group.slices if s.kind == "out")
        return self.base(group, ctx) * self.factors.get(producer, 1.0)


X = torch.randn(4, 16)
SETS = {"big": ("fc0", "fc2", "fc4"), "inner": ("fc1", "fc3"), "last": ("fc5",)}


def _prune(model: nn.Module, x: torch.Tensor = X, **kw) -> tuple[StructuredPruner, nn.Module]:
    kw = {"pruning_ratio": 0.25, "global_pruning": True, **kw}
    pruner = StructuredPruner(model, x, kw.pop("importance", "magnitude"), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pruner, pruner.prune()


def _lost(model: nn.Module, pruned: nn.Module) -> dict[str, int]:
    """Per set of :data:`SETS`: the output features its layers lost."""
    before, after = dict(model.named_children()), dict(pruned.named_children())
    return {k: sum(before[n].out_features - after[n].out_features for n in names) for k, names in SETS.items()}


def _producers(groups) -> list[list[str]]:
    return [[next(s.module for s in g.slices if s.kind == "out") for g in group_set] for group_set in groups]


# ---------------------------------------------------------------------------
# which groups are isomorphic
# ---------------------------------------------------------------------------


def test_resnet18_matches_only_layer1_blocks_and_each_stage_is_apart():
    model = tv.models.resnet18(num_classes=10).eval()
    graph = DependencyGraph(model, torch.randn(1, 3, 32, 32))
    sets = _producers(isomorphic_sets(model, graph.groups(prunable_only=True)))
    assert len(sets) == 11 and sum(map(len, sets)) == 12
    assert ["layer1.0.conv1", "layer1.1.conv1"] in sets  # 64 -> 64 -> 64 twice
    # layerK.0.conv1 reads the previous stage's width, layerK.1.conv1 this stage's: not isomorphic
    assert ["layer2.0.conv1"] in sets and ["layer2.1.conv1"] in sets and ["layer4.1.conv1"] in sets
    assert ["conv1"] in sets and ["layer2.0.conv2"] in sets  # residual streams, one per stage


def test_resnet50_bottleneck_inner_convs_of_one_shape_form_a_set():
    model = tv.models.resnet50(num_classes=10).eval()
    graph = DependencyGraph(model, torch.randn(1, 3, 32, 32))
    sets = _producers(isomorphic_sets(model, graph.groups(prunable_only=True)))
    assert len(sets) == 17 and sum(map(len, sets)) == 37
    assert [f"layer3.{i}.conv2" for i in range(6)] in sets  # every block of a stage
    assert [f"layer3.{i}.conv1" for i in range(1, 6)] in sets  # all but the first, which reads 512
    assert ["layer3.0.conv1"] in sets and ["layer3.0.conv3"] in sets
    assert [f"layer4.{i}.conv2" for i in range(3)] in sets and [f"layer1.{i}.conv2" for i in range(3)] in sets


def test_vit_heads_groups_form_one_set_and_mlp_groups_another():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=5).eval()
    graph = DependencyGraph(model, torch.randn(1, 3, 32, 32))
    sets = isomorphic_sets(model, graph.groups(prunable_only=True))
    assert _producers(sets) == [
        ["patch_embed.proj"],  # the residual stream
        ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.2.attn.qkv"],
        ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.2.mlp.fc1"],
    ]
    assert [g.size for g in sets[1]] == [3, 3, 3] and [g.size for g in sets[2]] == [768, 768, 768]


def test_vit_every_set_loses_the_ratio():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=5).eval()
    _, pruned = _prune(model, torch.randn(1, 3, 32, 32), pruning_ratio=0.4, isomorphic=True)
    heads = [b.attn.num_heads for b in pruned.blocks]
    hidden = [b.mlp.fc1.out_features for b in pruned.blocks]
    assert sum(heads) == 9 - 3 and sum(hidden) == 3 * 768 - 921  # floor(0.4 * 9), floor(0.4 * 2304)
    assert pruned.patch_embed.proj.out_channels == 192 - 76  # alone: floor(0.4 * 192)
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 5)


# ---------------------------------------------------------------------------
# ranking within sets
# ---------------------------------------------------------------------------


def test_mlp_sets():
    model = _mlp()
    graph = DependencyGraph(model, X)
    assert _producers(isomorphic_sets(model, graph.groups(prunable_only=True))) == [
        ["fc0", "fc2", "fc4"],
        ["fc1", "fc3"],
        ["fc5"],
    ]


def test_scores_100x_apart_plain_global_prunes_one_set_isomorphic_both():
    model, hundredfold = _mlp(), Scaled(fc0=100.0, fc2=100.0, fc4=100.0)
    _, plain = _prune(model, importance=hundredfold, normalizer="none")
    # 144 units, 36 go: all from the 48 units of the 16-wide groups, whose scores are 100x smaller
    lost = _lost(model, plain)
    assert lost["big"] == 0 and lost["inner"] + lost["last"] == 36
    _, iso = _prune(model, importance=hundredfold, normalizer="none", isomorphic=True)
    assert _lost(model, iso) == {"big": 24, "inner": 8, "last": 4}  # 25% of 96, 32 and 16


@pytest.mark.parametrize("steps", [3, 4, 5])
def test_iterative_steps_end_where_one_step_does_and_keep_max_layer_ratio(steps):
    model = _mlp()
    # fc0's units score lowest of their set (not normalised away): ranking would take them all
    kw = dict(isomorphic=True, max_layer_ratio=0.5, pruning_ratio=0.45, importance=Scaled(fc0=0.01), normalizer="none")
    _, one = _prune(model, **kw)
    assert _lost(model, one) == {"big": 43, "inner": 14, "last": 7}  # floor(0.45 * 96), ... of 32, of 16
    assert one.fc0.out_features == 16  # capped at half its width
    _, many = _prune(model, iterative_steps=steps, **kw)
    # each set's step ratio comes from its own units (one ratio for all sets drifts by a unit or two)
    assert _lost(model, many) == {"big": 43, "inner": 14, "last": 7}
    assert many.fc0.out_features == 16  # the cap holds over all steps, from the original width


def test_layer_ratio_takes_a_group_out_of_its_set_and_ignored_layers_leave_it():
    model = _mlp()
    _, pruned = _prune(model, isomorphic=True, layer_pruning_ratios={"fc2": 0.5})
    assert pruned.fc2.out_features == 16
    assert 32 * 2 - pruned.fc0.out_features - pruned.fc4.out_features == 16  # 25% of the other two
    _, pruned = _prune(model, isomorphic=True, ignored_layers=["fc4"])
    assert pruned.fc4.out_features == 32
    assert 32 * 2 - pruned.fc0.out_features - pruned.fc2.out_features == 16


def test_round_to_and_min_channels_hold():
    model = _mlp()
    _, pruned = _prune(model, isomorphic=True, pruning_ratio=0.7, round_to=4, min_channels=8)
    widths = [getattr(pruned, f"fc{i}").out_features for i in range(6)]
    assert all(w % 4 == 0 and w >= 8 for w in widths), widths
    assert sum(widths) < 144


def test_target_params_search_prunes_every_set_alike():
    model = _mlp()
    pruner, pruned = _prune(model, isomorphic=True, target_params=0.6)
    kept = count_params(pruned) / count_params(model)
    assert 0.58 < kept <= 0.6  # the smallest ratio searched that meets the target: about 0.26
    assert _lost(model, pruned) == {"big": 25, "inner": 8, "last": 4}  # floor(0.26 * 96), of 32, of 16


def test_pruned_model_equals_the_masked_original():
    model = tv.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner, pruned = _prune(model, x, pruning_ratio=0.4, isomorphic=True, bias_compensation=False, recalibrate_bn=False)
    plan = pruner.plan()
    expected = masked_forward(pruner.graph, plan.pruned_units(), x)
    got = run_model(pruned, x)
    assert float((got[0] - expected[0]).abs().max()) < 1e-4
    per_group = {gp.group.id: gp.n_pruned for gp in plan.groups}
    assert per_group[2] + per_group[3] == 51  # layer1's two inner groups: floor(0.4 * 128) together
    assert [per_group[i] for i in (4, 6, 10)] == [51, 51, 204]  # sets of one: exactly 40%
    assert count_params(pruned) < count_params(model)


# ---------------------------------------------------------------------------
# options, CLI and config files
# ---------------------------------------------------------------------------


def test_isomorphic_without_global_is_a_user_error():
    with pytest.raises(UserError, match="global_pruning=True"):
        StructuredPruner(_mlp(), X, "magnitude", isomorphic=True)
    with pytest.raises(UserError, match="True or False"):
        StructuredPruner(_mlp(), X, "magnitude", global_pruning=True, isomorphic="yes")


@pytest.fixture()
def job_inputs(tmp_path, monkeypatch):
    import numpy as np

    torch.save(_mlp(), tmp_path / "model.pth")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((16, 16)).astype("float32"), y=rng.integers(0, 4, 16))
    seen: list[StructuredPruner] = []

    class Recording(StructuredPruner):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            seen.append(self)

    monkeypatch.setattr(pruner_module, "StructuredPruner", Recording)  # job.run imports it when it runs
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLEANAI_DISABLE_PLUGIN_AUTOLOAD", "1")
    return seen


BASE = ["prune", "--model", "model.pth", "--trust-model", "--data", "data.npz", "--importance", "magnitude",
        "--ratio", "0.25", "--dry-run", "--quiet"]  # fmt: skip


def test_cli_flag_reaches_the_pruner(job_inputs, capsys):
    assert main([*BASE, "--global", "--isomorphic"]) == 0
    pruner = job_inputs[-1]
    assert pruner.isomorphic and pruner.global_pruning
    sizes = {gp.group.id: (gp.group.size, gp.n_pruned) for gp in pruner.plan().groups}
    assert sum(n for size, n in sizes.values() if size == 32) == 24  # the 32-wide set loses 25%
    assert main([*BASE, "--isomorphic"]) == 2
    assert "--isomorphic (command line)" in capsys.readouterr().err


def test_config_file_key_reaches_the_pruner_and_the_command_line_wins(job_inputs, tmp_path, capsys):
    (tmp_path / "c.toml").write_text("global = true\nisomorphic = true\n")
    assert main([*BASE, "--config", "c.toml"]) == 0
    assert job_inputs[-1].isomorphic is True
    (tmp_path / "c.json").write_text(json.dumps({"global_pruning": True}))
    assert main([*BASE, "--config", "c.json", "--isomorphic"]) == 0
    assert job_inputs[-1].isomorphic is True
    (tmp_path / "c.toml").write_text("isomorphic = true\n")
    assert main([*BASE, "--config", "c.toml"]) == 2
    assert "--isomorphic (config file)" in capsys.readouterr().err and len(job_inputs) == 2
