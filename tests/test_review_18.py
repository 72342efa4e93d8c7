"""Session 26, review18: a review of session 25's merge, and small leftovers.

A wrong-typed plugin manager, ``save_pruned``'s ``example_input_shape`` run on the model,
the CLI's own advice where outputs freeze every group, NaN scores of a registered criterion,
and the note saying what a masked LM's accuracy and perplexity measure.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_faults_17 import X, _net, _params  # the conv-BN net of 860 parameters and its input
from torch import nn

from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core.errors import UserError

# -- a plugin manager of the wrong type -------------------------------------------------------------


@pytest.mark.parametrize("pm", ["x", 0, object()])
def test_a_plugin_manager_of_another_type_is_a_type_error_naming_the_type(pm) -> None:
    """``DependencyGraph(model, x, pm="x")`` raised ``AttributeError: 'str' object has no attribute 'hook'``
    from deep in the trace; ``pm=0`` (falsy) was silently replaced by the process-wide manager."""
    from cleanai_core.plugins import list_plugins, make_plugin_manager
    from cleanai_core.slicing import apply_edits

    with pytest.raises(TypeError) as info:
        DependencyGraph(_net(), X, pm=pm)
    assert f"DependencyGraph: pm={pm!r} (a {type(pm).__name__}) must be a pluggy.PluginManager" in str(info.value)
    with pytest.raises(TypeError, match="apply_edits: pm=.* must be a pluggy.PluginManager"):
        apply_edits(_net(), [], pm=pm)
    with pytest.raises(TypeError, match="list_plugins: pm="):
        list_plugins(pm)
    own = make_plugin_manager()  # a manager of one's own still serves
    graph = DependencyGraph(_net(), X, pm=own)
    assert graph.pm is own and len(graph.groups(prunable_only=True)) == 2


# -- save_pruned's example_input_shape ----------------------------------------------------------------


def test_save_pruned_runs_the_model_at_example_input_shape(tmp_path) -> None:
    """``save_pruned(example_input_shape=...)`` only checked the form: a shape the model cannot take (5
    channels for a 3-channel conv) was written, and load_pruned's probe then skipped the settings check on
    it without a word; a size of 0 passed the form check and was then ignored at load."""
    from cleanai_core.io import load_pruned, save_pruned

    pruner = StructuredPruner(_net(), X, importance="magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    args = (small, pruner.history, "test_faults_17:_net")
    with pytest.raises(UserError) as info:
        save_pruned(tmp_path / "bad", *args, example_input_shape=[2, 5, 8, 8])
    text = str(info.value)
    assert "example_input_shape=[2, 5, 8, 8] does not run the pruned model: zeros of shape [1, 5, 8, 8]" in text
    assert "float32: RuntimeError" in text and "Nothing was written" in text
    assert not (tmp_path / "bad").exists()
    with pytest.raises(UserError, match=r"must be a list of 1 to 8 positive sizes"):
        save_pruned(tmp_path / "zero", *args, example_input_shape=[1, 0, 8, 8])
    assert small.training is False  # the probe ran in eval mode and left the mode as it was
    small.train()
    save_pruned(tmp_path / "ok", *args, example_input_shape=(4, 3, 16, 16))
    assert small.training is True
    again = load_pruned(tmp_path / "ok", trust_code=True)
    assert _params(again) == _params(small) == 288
    torch.testing.assert_close(again.eval()(X), small.eval()(X))


def test_save_pruned_takes_a_token_id_shape() -> None:
    """A model of token ids (an embedding first) fails on float zeros; integer zeros run it."""
    from cleanai_core.io import _check_input_shape

    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).eval()
    _check_input_shape(model, [1, 3])  # no error
    with pytest.raises(UserError, match=r"float32: RuntimeError.*; int64: "):
        _check_input_shape(model, [1, 5])  # 5 tokens x 4 features do not fit Linear(12, 2)


# -- the CLI's advice where the outputs freeze every group ---------------------------------------------


def test_cli_nothing_prunable_gives_the_command_lines_way_not_output_transform(tmp_path, monkeypatch, capsys):
    """``cleanai prune`` of a model whose only layer feeds the output: "pass output_transform=lambda out: ...",
    an option of the Python API that the command line does not have."""
    from cleanai_core.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "onelayer.py").write_text(
        "import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save((torch.randn(16, 3, 2, 2), torch.randint(0, 4, (16,))), tmp_path / "d.pt")
    assert main(["prune", "--model", "onelayer:build", "--data", "d.pt", "--out", "o", "-q"]) == 2
    err = capsys.readouterr().err
    assert "nothing in this model can be pruned" in err and "model output" in err
    assert "the command line has no output_transform: to let the others shrink, give --model a " in err
    assert "pass output_transform=lambda" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError) as info:  # the Python API keeps its own advice
        StructuredPruner(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), torch.randn(2, 3, 2, 2))
    assert "pass output_transform=lambda out: <only the outputs to keep>" in str(info.value)


# -- NaN scores of a registered criterion ---------------------------------------------------------------


class _HalfNaN:
    """Magnitude scores (the L1 norm of each output row), NaN for the first two units of the first conv."""

    def __call__(self, group, ctx):
        scores = torch.arange(group.size, dtype=torch.float64) + 1.0
        if "0" in group.modules():
            scores[:2] = float("nan")
        return scores


def test_nan_scores_of_a_registered_criterion_are_warned_of_naming_it_and_the_layers() -> None:
    """A registered criterion (a built-in, a plugin's) returning NaN: read as 0 without a word, so those
    units went first. Now one warning names the criterion, the units, the groups and the layers; the
    NaN units still go first (the plan is the same). A criterion of the user's own is still refused."""
    from cleanai_core import hookimpl
    from cleanai_core.plugins import temporary_plugin

    class Registers:
        @hookimpl
        def cleanai_importances(self):
            return {"half_nan": _HalfNaN}

    with temporary_plugin(Registers(), name="half-nan"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pruner = StructuredPruner(_net(), X, importance="half_nan", pruning_ratio=0.25)
        plan = pruner.plan()
    said = [str(w.message) for w in seen if "NaN" in str(w.message)]
    assert len(said) == 1, said
    assert said[0].startswith("importance 'half_nan' gave NaN scores for 2 unit(s) in 1 group(s) (layers '0', '1'")
    assert "read as 0, the lowest score, so those units are pruned first" in said[0]
    first = next(gp for gp in plan.groups if "0" in gp.group.modules())
    assert first.pruned.nonzero().flatten().tolist() == [0, 1]  # NaN read as 0: the lowest
    with pytest.raises(UserError, match="importance '_HalfNaN' returned 2 NaN score"):  # not registered
        StructuredPruner(_net(), X, importance=_HalfNaN(), pruning_ratio=0.25).plan()


# -- a masked LM's metrics say what they measure -------------------------------------------------------


def test_a_masked_lm_report_says_its_perplexity_is_of_the_masked_tokens() -> None:
    """A causal LM's report says "the held-out perplexity is reported instead"; a masked LM's showed an
    accuracy and a perplexity row with no word that they are the masked tokens' (not a next-token or a
    pseudo-perplexity)."""
    transformers = pytest.importorskip("transformers")
    from cleanai_core.report import render_markdown
    from cleanai_plugins.io.hf import MASKED_LM_NOTE, cleanai_evaluate

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = transformers.BertForMaskedLM(config).eval()
    ids = torch.randint(5, 50, (4, 10))
    labels = torch.full_like(ids, -100)
    labels[:, [2, 7]] = ids[:, [2, 7]]  # two masked tokens per row
    masked = ids.clone()
    masked[:, [2, 7]] = 4
    result = cleanai_evaluate(model, [{"input_ids": masked, "labels": labels}], torch.device("cpu"))
    assert (result["tokens"], result["evaluated"]) == (8, 8)
    with torch.no_grad():
        logits = model(input_ids=masked).logits[:, [2, 7]].reshape(8, -1)
    nll = torch.nn.functional.cross_entropy(logits, ids[:, [2, 7]].reshape(8))
    assert result["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-5)
    assert result["metric_note"] == MASKED_LM_NOTE and "pseudo-perplexity" in MASKED_LM_NOTE
    report = {"params_before": 10, "params_after": 8, "flops_before": 10, "flops_after": 8}
    report |= {"perplexity_before": result["perplexity"], "perplexity_after": result["perplexity"]}
    assert "the masked tokens" not in render_markdown(report)
    assert MASKED_LM_NOTE in render_markdown({**report, "metric_note": MASKED_LM_NOTE})


# -- --prune-dead-only where the dead units cannot go ---------------------------------------------------

_DEAD_NET = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():  # channels 0-3 of the first conv never activate
        m[0].weight[:4] = 0
        m[0].bias[:4] = -1.0
    return m
"""


def test_prune_dead_only_names_dead_units_it_cannot_remove(tmp_path, monkeypatch):
    """4 of the first conv's 8 channels never activate, and ``--ignore 0`` keeps that conv whole: the run
    said "--prune-dead-only: no unit is dead (never activates) on --data"; without --ignore they go."""
    from cleanai_core.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "deadnet.py").write_text(_DEAD_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    torch.save((torch.randn(24, 3, 8, 8), torch.randint(0, 4, (24,))), "d.pt")
    args = ["prune", "--model", "deadnet:build", "--data", "d.pt", "-q", "--prune-dead-only", "--latency-repeats", "1"]
    with pytest.warns(RuntimeWarning) as seen:
        assert main([*args, "--out", "o", "--ignore", "0"]) == 0
    said = " ".join(str(w.message) for w in seen)
    assert "--prune-dead-only: 4 unit(s) never activate on --data (4 of the 8 input channels of '2')" in said
    assert "none can be removed: they are in groups kept whole (ignored layers" in said
    assert "no unit is dead" not in said
    assert main([*args, "--out", "o2"]) == 0  # not ignored: the 4 dead channels go
    import json

    report = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert report["params_before"] - report["params_after"] == 4 * (27 + 1) + 4 * 9 * 8
