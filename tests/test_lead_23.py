"""Session 23, by the lead: what the merges of the session's branches needed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cleanai_core import StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.io import save_pruned


def test_run_job_with_a_model_object_writes_its_folder_where_no_loader_rebuilds_the_spec(tmp_path):
    # faults14 made save_pruned refuse a spec no loader claims; leftovers14 made the job save through save_pruned:
    # together, run_job(cfg, model=m) of a model built in the caller's code pruned, evaluated, then wrote nothing
    from cleanai_core.job.run import run_job

    torch.manual_seed(0)
    x, y = torch.randn(48, 6), torch.randint(0, 3, (48,))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    cfg = {"model": "my-own-net", "data": "memory", "ratio": 0.5, "out": str(tmp_path / "o"), "quiet": True}
    with pytest.warns(RuntimeWarning, match="no installed loader can rebuild 'my-own-net'"):
        report = run_job(cfg, model=model, dataset=TensorDataset(x, y))
    assert report["params_after"] < report["params_before"] == 6 * 16 + 16 + 16 * 3 + 3
    state = torch.load(tmp_path / "o" / "model.pt", weights_only=True)
    assert state["0.weight"].shape == (8, 6) and state["2.weight"].shape == (3, 8)
    # the Python API still refuses such a folder, and writes nothing
    pruner = StructuredPruner(model, x[:2], "magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    with pytest.raises(UserError, match="no installed loader can rebuild 'my-own-net'"):
        save_pruned(tmp_path / "p", pruned, pruner.history, "my-own-net")
    assert not (tmp_path / "p").exists()
