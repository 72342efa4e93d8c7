"""A fourteenth set of the scenarios users bring from Torch-Pruning's test suite, written
for CleanAI's API (see ``test_peer_scenarios.py`` to ``_13``): the peer's "unwrapped
parameters" read by functional ops that no mapper knew (``F.embedding_bag`` with a bare
table).

Each test asserts widths, parameter counts and the masking oracle where slicing must equal
zeroing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_peer_scenarios_6 import _seeded
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.metrics import count_params
from cleanai_core.testing import check_pruner

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


# -- F.embedding_bag with a bare table -----------------------------------------------------------


class BareBag(nn.Module):
    """A bag-of-words classifier with its table as a bare parameter, read by
    ``F.embedding_bag`` (bags as rows of a 2-D index tensor, or a flat index tensor with
    ``offsets`` and per-sample weights)."""

    def __init__(self, mode: str, flat: bool) -> None:
        super().__init__()
        self.mode, self.flat = mode, flat
        self.table = nn.Parameter(torch.randn(20, 12))
        self.fc = nn.Linear(12, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        if self.flat:
            weights = torch.linspace(0.1, 1.0, ids.numel()) if self.mode == "sum" else None
            offsets = torch.tensor([0, 3], dtype=torch.long)
            bags = F.embedding_bag(ids, self.table, offsets, mode=self.mode, per_sample_weights=weights)
        else:
            bags = F.embedding_bag(ids, self.table, mode=self.mode)
        return self.head(F.relu(self.fc(F.relu(bags))))


@pytest.mark.parametrize(("mode", "flat"), [("mean", False), ("max", False), ("sum", True), ("mean", True)])
def test_a_bare_table_read_by_embedding_bag_prunes_its_columns(mode, flat):
    """The table's columns pass ``F.embedding_bag`` as they pass ``F.embedding``: before,
    the op dropped them and nothing could shrink but ``fc``'s rows ("nothing in this model
    can be pruned" where ``fc`` was absent; here the 12 columns froze)."""
    ids = torch.randint(0, 20, (7,) if flat else (2, 5), generator=torch.Generator().manual_seed(0))
    report = check_pruner(_seeded(lambda: BareBag(mode, flat)), ids, 0.5)
    assert report.max_abs_diff < 1e-6 and report.kept_whole == ()
    assert report.pruned_units == 6 + 8  # half the table's 12 columns and half of fc's 16 rows
    model = _seeded(lambda: BareBag(mode, flat))
    small = StructuredPruner(model, ids, "magnitude", pruning_ratio=0.5).prune()
    assert tuple(small.table.shape) == (20, 6) and small.fc.in_features == 6 and small.fc.out_features == 8
    assert (count_params(model), count_params(small)) == (499, 20 * 6 + 6 * 8 + 8 + 8 * 3 + 3)
    assert small(ids).shape == (2, 3)
