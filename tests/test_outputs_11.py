"""Session 21, outputs: what CleanAI writes after pruning and what the user gets back (the
replayable history, the saved folder, the report, recovery and gradual pruning), checked
against independent counts."""

from __future__ import annotations

import copy
import json
import textwrap
import warnings

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.history import PruningHistory
from cleanai_core.io import load_pruned, save_pruned

NET = """
import torch
from torch import nn


def Net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
"""


def _net_factory(tmp_path, monkeypatch):
    """``Net``, importable as ``net_o11:Net`` (the spec ``load_pruned`` rebuilds)."""
    (tmp_path / "net_o11.py").write_text(textwrap.dedent(NET))
    monkeypatch.syspath_prepend(str(tmp_path))
    from net_o11 import Net

    return Net


def _prune(model, x, **kw):
    pruner = StructuredPruner(model, x[:1], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kw.get("importance") in (None, "weight_activation"):
            pruner.collect_activations([x], num_batches=1, progress=False)
        pruned = pruner.prune()
    return pruner, pruned


def _edited(history, how):
    data = copy.deepcopy(history.to_json())
    step = data["steps"][0]
    if how == "an edit removed":
        data["steps"][0] = [e for e in step if e["module"] != "1"]  # the first BatchNorm keeps 8 channels
    elif how == "a keep list shortened":
        step[0]["keep"] = step[0]["keep"][:-1]  # the first conv keeps 3, its BatchNorm 4
    elif how == "a slice renamed":
        step[0]["slice"] = "outputs"  # no slice of a conv: its pruner skipped it
    return json.loads(json.dumps(data))


@pytest.mark.parametrize("how", ["an edit removed", "a keep list shortened", "a slice renamed"])
def test_a_hand_edited_history_whose_edits_disagree_is_refused_by_replay_and_load_pruned(tmp_path, monkeypatch, how):
    Net = _net_factory(tmp_path, monkeypatch)
    x = torch.randn(8, 3, 8, 8)
    pruner, pruned = _prune(Net().eval(), x, pruning_ratio=0.5)
    assert [tuple(p.shape) for p in pruned[0:2].parameters()] == [(4, 3, 3, 3), (4,), (4,), (4,)]
    # the history records what each step leaves, beside what it slices from
    assert pruner.history.meta["shapes_after"][0]["1.weight"] == [4]
    assert pruner.history.meta["shapes_after"][0]["3.weight"] == [4, 4, 3, 3]
    edited = PruningHistory.from_json(_edited(pruner.history, how))
    fresh = Net().eval()
    want = {k: v.clone() for k, v in fresh.state_dict().items()}
    # it replayed without a word; the model failed in its forward ("running_mean should contain 4 elements not 8")
    with pytest.raises(UserError, match=r"step 0 of 1 left (1|0)\.weight of shape \((8|3)[,)].*edited by hand"):
        edited.replay(fresh)
    assert {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == {k: tuple(v.shape) for k, v in want.items()}
    assert all(torch.equal(v, want[k]) for k, v in fresh.state_dict().items())  # not changed
    save_pruned(tmp_path / "out", pruned, pruner.history, "net_o11:Net")
    (tmp_path / "out" / "history.json").write_text(json.dumps(_edited(pruner.history, how)))
    with pytest.raises(UserError, match=r"history\.json.*step 0 left .*edits do not agree"):
        load_pruned(tmp_path / "out", trust_code=True)
    # the history as written replays, and the pruned weights load into it
    fresh = PruningHistory.from_json(json.loads(json.dumps(pruner.history.to_json()))).replay(Net().eval())
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))
