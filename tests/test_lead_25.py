"""Session 25, by the lead: ``--prune-dead-only`` on a model with no dead unit says so."""

from __future__ import annotations

import json

import pytest
import torch

from cleanai_core.cli import main

DEMO = "cleanai_plugins.io.demo:DigitsCNN"


def test_prune_dead_only_with_no_dead_unit_says_the_model_is_written_unpruned(tmp_path, monkeypatch):
    """Before: exit 0 and an unchanged copy, without a word (faults18's finding)."""
    from cleanai_plugins.io.demo import DigitsCNN

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = DigitsCNN()
    with torch.no_grad():  # every ReLU input above 0 on any input in [0, 1]: no unit is dead
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.fill_(50.0)
    torch.save(model.state_dict(), "w.pt")
    torch.save((torch.rand(24, 1, 8, 8), torch.randint(0, 10, (24,))), "d.pt")
    args = ["prune", "--model", DEMO, "--weights", "w.pt", "--data", "d.pt", "--out", "o", "-q"]
    with pytest.warns(RuntimeWarning, match=r"--prune-dead-only: no unit is dead \(never activates\) on --data"):
        assert main([*args, "--prune-dead-only"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    n = sum(p.numel() for p in model.parameters())
    assert report["params_before"] == report["params_after"] == n
