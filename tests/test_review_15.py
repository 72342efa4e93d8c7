"""Review 15 of session 23's merged changes: a model exported with ``torch.export``
(whose ``eval()`` / ``train()`` raise ``NotImplementedError``) saved with ``save_pruned``
and loaded back, and pruned by the command line (with an evaluation of labelled data);
Taylor scored with the gradients the user's own backward left where the parameters
without one are in no prunable group (a frozen, ignored stem).

Each test asserts parameter counts, widths, and output equality."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cleanai_core import StructuredPruner, load_pruned
from cleanai_core.cli import main
from cleanai_core.errors import UserError
from cleanai_core.io import save_pruned
from cleanai_core.metrics import count_params
from cleanai_core.report import render_markdown

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

# -- a model exported with torch.export: every mode switch goes through model_state.set_mode --------

FACTORY = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn


    class ResidualNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv2, self.bn2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)

        def forward(self, x):
            y = F.relu(self.bn(self.conv(x)))
            return self.fc((y + F.relu(self.bn2(self.conv2(y)))).mean((2, 3)))


    def build():
        torch.manual_seed(0)
        batch = torch.export.Dim("batch", min=1, max=1024)
        model = ResidualNet().eval()
        return torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch},)).module()
    """
)

X8 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def exported_factory(tmp_path, monkeypatch):
    (tmp_path / "exported_r15.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()
    return importlib.import_module("exported_r15").build


def test_an_exported_model_saved_with_save_pruned_loads_back_with_the_same_outputs(exported_factory, tmp_path):
    """load_pruned switched the rebuilt model with ``model.eval()``: the export's
    ``NotImplementedError`` traceback, of a folder save_pruned had written."""
    model = exported_factory()
    with pytest.raises(NotImplementedError):
        model.eval()  # what the loader met
    pruner = StructuredPruner(model, X8, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    save_pruned(tmp_path / "o", small, pruner.history, "exported_r15:build")
    back = load_pruned(tmp_path / "o", trust_code=True)
    assert (count_params(model), count_params(small), count_params(back)) == (876, 296, 296)
    assert torch.equal(back(X8), small(X8))
    assert not any(m.training for m in back.modules())


def test_the_command_line_prunes_and_evaluates_an_exported_model(exported_factory, tmp_path, monkeypatch, capsys):
    """``cleanai prune --model package.module:factory`` of a factory returning an exported
    module stopped at ``model.eval()`` with a traceback (exit 1); the evaluator and the
    latency copies switched modes the same way."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(1)
    torch.save((torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 4, (24,), generator=g)), "d.pt")
    argv = ["prune", "--model", "exported_r15:build", "--data", "d.pt", "--ratio", "0.5", "--out", "o"]
    assert main([*argv, "--trust-code", "--quiet"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert (report["params_before"], report["params_after"]) == (876, 296)
    assert report["accuracy_before"] is not None and report["accuracy_after"] is not None
    back = load_pruned(tmp_path / "o", trust_code=True)
    assert count_params(back) == 296 and back(X8).shape == (2, 4)


# -- Taylor from the user's backward: parameters without a gradient outside every prunable group ---


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def test_taylor_from_the_users_backward_with_a_frozen_ignored_stem_prunes_as_with_a_trainable_one():
    """A frozen stem (fine-tuning the rest) kept whole with ``ignored_layers``: its
    parameters hold no gradient, but no prunable group reads them. The run was refused
    ("2 of them have none (0.weight, 0.bias ...)"); the scores of the groups it prunes are
    those of the same model with a trainable stem (their gradients do not depend on it)."""
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    frozen, trainable = _net(), _net()
    frozen[0].requires_grad_(False)
    for m in (frozen, trainable):
        F.cross_entropy(m(x), torch.tensor([0, 1, 2, 3])).backward()
    assert frozen[0].weight.grad is None and frozen[3].weight.grad is not None
    small = StructuredPruner(frozen, x[:1], "taylor", pruning_ratio=0.5, ignored_layers=[frozen[0]]).prune()
    same = StructuredPruner(trainable, x[:1], "taylor", pruning_ratio=0.5, ignored_layers=[trainable[0]]).prune()
    assert (small[0].out_channels, small[3].out_channels, count_params(small)) == (8, 8, 860)
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), same.state_dict().values(), strict=True))
    # a frozen layer a prunable group does read is still refused (its units would score without it)
    frozen[1].requires_grad_(False)
    frozen[1].weight.grad = frozen[1].bias.grad = None
    with pytest.raises(UserError, match=r"4 of them have none \(0.weight, 0.bias, 1.weight"):
        StructuredPruner(frozen, x[:1], "taylor", pruning_ratio=0.5).prune()


def test_the_report_says_taylor_scored_with_the_gradients_the_users_backward_left():
    """After a training loop the parameters hold the last batch's gradients (taken before
    its optimizer step); Taylor without labelled calibration data scores with them, and
    nothing said so. The report names them; with labelled batches it does not."""
    x, y = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 3])
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    pruner = StructuredPruner(model, x[:1], "taylor", pruning_ratio=0.5)
    assert count_params(pruner.prune()) == 452
    report = pruner.report()
    assert report["gradients"] is not None and "your own loss's backward" in report["gradients"]
    assert "scored with the gradients on the model's parameters" in render_markdown(report)
    labelled = StructuredPruner(model, x[:1], "taylor", pruning_ratio=0.5).collect_activations([(x, y)], progress=False)
    assert count_params(labelled.prune()) == 452 and labelled.report()["gradients"] is None
