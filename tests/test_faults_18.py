"""Session 25, faults18: bad input to the public helpers around the pruner (criteria by name,
the plugin oracle, the dependency graph, the report writer); docs/reliability.md, "Session 25:
faults18"."""

from __future__ import annotations

import os

import pytest
import torch
from test_faults_17 import X, _net, _params  # the conv-BN net of 860 parameters and its input
from torch import nn

from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.report import write_report
from cleanai_core.scoring import get_importance, get_reducer
from cleanai_core.testing import check_pruner


@pytest.mark.parametrize(
    "name, options, says",
    [
        ("magnitude", {"nope": 1}, "importance 'magnitude' has no option 'nope'; its options (with their defaults): p"),
        ("weight_activation", {"alpha": 0.7}, "has no option 'alpha'; its options (with their defaults): weight"),
        ("taylor", {"damp": 1e-3}, "importance 'taylor' has no option 'damp'; its options (with their defaults): red"),
        ("random", {"seed": "a"}, "importance 'random' cannot take seed='a' (RuntimeError: manual_seed"),
        ("random", {"seed": 2.5}, "importance 'random' cannot take seed=2.5"),
        ("magnitude", {"reducer": ["sum"]}, "unknown reducer ['sum']; choose one of: "),
    ],
)
def test_get_importance_names_an_option_the_criterion_does_not_have_or_take(name, options, says) -> None:
    with pytest.raises(UserError) as info:
        get_importance(name, **options)
    assert says in str(info.value), str(info.value)


def test_get_importance_still_builds_criteria_from_good_options_and_keeps_their_own_errors() -> None:
    a = StructuredPruner(_net(), X, importance=get_importance("random", seed=3), pruning_ratio=0.5).prune()
    b = StructuredPruner(_net(), X, importance=get_importance("random", seed=3), pruning_ratio=0.5).prune()
    assert _params(a) == _params(b) == 288  # same seed, same plan: 860 -> 288 at one half
    assert get_importance("magnitude", p=1).p == 1
    with pytest.raises(UserError, match=r"magnitude p=-1: give a positive finite number"):  # the criterion's own
        get_importance("magnitude", p=-1)
    with pytest.raises(UserError, match=r"unknown reducer 5"):
        get_reducer(5)


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"ratio": 0}, "check_pruner: ratio=0 must be a number strictly between 0 and 1"),
        ({"ratio": 2}, "check_pruner: ratio=2 must be"),
        ({"ratio": -1}, "check_pruner: ratio=-1 must be"),
        ({"ratio": float("nan")}, "check_pruner: ratio=nan must be"),
        ({"ratio": "0.5"}, "check_pruner: ratio='0.5' must be"),
        ({"seed": "a"}, "check_pruner: seed='a' must be an integer"),
        ({"seed": None}, "check_pruner: seed=None must be an integer"),
        ({"output_transfrom": None}, "check_pruner got the keyword argument(s) 'output_transfrom', which it does not"),
        ({"example_inputs": X}, "the inputs are its second argument"),
    ],
)
def test_check_pruner_names_an_argument_that_cannot_make_an_oracle_check(kwargs, says) -> None:
    with pytest.raises(UserError) as info:
        check_pruner(_net(), X, **kwargs)
    assert says in str(info.value), str(info.value)


def test_check_pruner_still_compares_with_the_oracle_for_numpy_ratios_and_seeds() -> None:
    import numpy as np

    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = check_pruner(model, X, ratio=np.float64(0.5), seed=np.int64(1))
    assert report.params_before == 860 and report.params_after == 288, report
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5 and report.kept_whole == ()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_graph_of_a_model_on_the_meta_device_names_the_device_and_the_fix() -> None:
    model = _net().to("meta")
    for call in (lambda: DependencyGraph(model, X), lambda: check_pruner(model, X)):
        with pytest.raises(UserError) as info:
            call()
        msg = str(info.value)
        assert "the model's tensors are on the meta device (e.g. '0.weight'" in msg, msg
        assert "to_empty(device='cpu')" in msg and "tracing" not in msg
    assert len(DependencyGraph(_net(), X).groups(prunable_only=True)) == 2  # the same model with values


@pytest.mark.parametrize("report", [None, [("params_before", 1)], "report.json"])
def test_write_report_of_something_that_is_no_report_writes_nothing(tmp_path, report) -> None:
    (tmp_path / "report.md").write_text("mine")
    with pytest.raises(UserError) as info:
        write_report(tmp_path, report)
    said = f"write_report needs the report as a dict (pruner.report() after prune()), got {type(report).__name__}"
    assert said in str(info.value), str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["report.md"] and (tmp_path / "report.md").read_text() == "mine"


# -- cleanai explain: code that comes with the model's folder runs only with --trust-code ----------------


def test_explain_runs_an_hf_folders_own_code_only_with_trust_code(tmp_path, capsys, monkeypatch):
    """``cleanai explain --model hf:DIR``, where ``DIR/config.json`` names code of its own (``auto_map``),
    imported and ran ``DIR/modeling_*.py`` with no flag (exit 0): explain typed its spec's consent as
    ``trust_code`` and the ``hf:`` loader reads that where no ``trust_folder_code`` is given. ``cleanai prune``
    refuses the same folder without ``--trust-code``, which explain did not have."""
    pytest.importorskip("transformers")
    from test_hf_text_14 import MODEL_CODE, remote_code_folder

    from cleanai_core.cli import main

    marker = tmp_path / "ran.txt"
    remote_code_folder(tmp_path / "m", code=MODEL_CODE + f"\nimport pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    assert main(["explain", "--model", f"hf:{tmp_path / 'm'}"]) == 2
    err = capsys.readouterr().err
    assert "names Python code that comes with it (auto_map: " in err and "pass --trust-code" in err, err
    assert not marker.exists()  # was created: the folder's code ran
    assert main(["explain", "--model", f"hf:{tmp_path / 'm'}", "--trust-code"]) == 0
    assert marker.exists() and "group 1: " in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir() if p.name in before} == before


def test_explain_of_a_saved_folder_with_a_factory_spec_runs_it_with_trust_code(tmp_path, capsys):
    """A folder ``save_pruned`` wrote with a ``package.module:factory`` spec: explain said "If you trust it,
    pass ... (command line: --trust-code)", and then refused ``--trust-code`` as an unrecognised argument."""
    from cleanai_core.cli import main
    from cleanai_core.io import save_pruned

    pruner = StructuredPruner(_net(), X, importance="magnitude", pruning_ratio=0.5)
    save_pruned(tmp_path / "o", pruner.prune(), pruner.history, "test_faults_17:_net", example_input_shape=[1, 3, 8, 8])
    assert main(["explain", "--model", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "model factory 'test_faults_17:_net'" in err and "(command line: --trust-code)" in err, err
    assert main(["explain", "--model", str(tmp_path / "o"), "--trust-code"]) == 0
    out = capsys.readouterr().out
    assert "group 1: 4 units (4 prunable)" in out and "group 2: 4 units (4 prunable)" in out, out  # the pruned 8 -> 4


def test_save_pruned_refuses_on_off_and_report_arguments_out_of_form_and_writes_nothing(tmp_path) -> None:
    """``rebuild_check="no"`` read as true (the check ran); ``report="x"`` was dropped without a word."""
    from cleanai_core.io import save_pruned

    pruner = StructuredPruner(_net(), X, importance="magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    for kwargs, says in [
        ({"rebuild_check": "no"}, "rebuild_check='no' must be True or False"),
        ({"report": "x"}, "save_pruned: report='x' must be a dict, which receives what the output plugins say"),
        ({"report": [("hf_folder", None)]}, "must be a dict"),
    ]:
        with pytest.raises(UserError) as info:
            save_pruned(tmp_path / "o", pruned, pruner.history, "test_faults_17:_net", **kwargs)
        assert says in str(info.value), str(info.value)
        assert not (tmp_path / "o").exists()
    report: dict = {}
    save_pruned(tmp_path / "o", pruned, pruner.history, "test_faults_17:_net", report=report, rebuild_check=False)
    assert sorted(os.listdir(tmp_path / "o")) == ["architecture.json", "history.json", "model.pt"]


def test_a_plugin_registering_criteria_in_another_form_is_named() -> None:
    """A plugin whose ``cleanai_importances`` returns a list, or maps a name to what cannot be called: an
    ``AttributeError: 'list' object has no attribute 'items'`` from the registry at every prune (with any
    criterion), and ``TypeError: 'int' object is not callable`` for the name it registered."""
    from cleanai_core import hookimpl
    from cleanai_core.plugins import temporary_plugin

    class Listed:
        @hookimpl
        def cleanai_importances(self):
            return ["magnitude"]

    class NotCallable:
        @hookimpl
        def cleanai_importances(self):
            return {"mine": 5}

    with temporary_plugin(Listed(), name="listed"), pytest.raises(UserError) as info:
        StructuredPruner(_net(), X, importance="magnitude").prune()
    assert "the plugin 'listed' returns ['magnitude'] from cleanai_importances, which must return a dict" in str(
        info.value
    )
    with temporary_plugin(NotCallable(), name="five"):
        with pytest.raises(UserError) as info:
            get_importance("mine")
        assert "importance 'mine' is registered as 5, which is not a class or function" in str(info.value)
        assert _params(StructuredPruner(_net(), X, importance="magnitude", pruning_ratio=0.5).prune()) == 288


@pytest.mark.parametrize("given", ["path", "dict"])
def test_run_job_names_a_path_or_a_dict_given_as_the_dataset(tmp_path, given) -> None:
    """``run_job(cfg, model=m, dataset="d.pt")``: "data items must be tensors or (input, label) pairs; got str"
    (a letter of the path); ``dataset={'x': x, 'y': y}``: "reading item 1 failed (KeyError: 1)"."""
    from cleanai_core.job.run import run_job

    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    cfg = {"model": "test_faults_17:_net", "out": str(tmp_path / "o"), "quiet": True, "latency_repeats": 1}
    dataset = str(tmp_path / "d.pt") if given == "path" else {"x": x, "y": y}
    with pytest.raises(UserError) as info:
        run_job(cfg, model=_net(), dataset=dataset)
    msg = str(info.value)
    if given == "path":
        assert f"is the path {str(tmp_path / 'd.pt')!r}, not a data set: give a file or folder as the option" in msg
    else:
        assert "is a dict (keys 'x', 'y'), not a data set: it is read by sample index" in msg, msg
        assert "(e.g. (d['x'], d['y']))" in msg
    assert not (tmp_path / "o").exists()
    report = run_job(cfg, model=_net(), dataset={i: (x[i], y[i]) for i in range(8)})  # keyed by index: a data set
    assert report["params_before"] == 860 and report["params_after"] < 860


def test_build_names_a_source_graph_statistics_or_switch_out_of_form() -> None:
    """``pruner.build(mask, source=...)`` (public, ``docs/api.md``) took its other arguments unchecked:
    ``source="m"``: ``AttributeError`` from ``slicing.py``; a model of another architecture: ``KeyError: "no
    plugin claims module '0'"``; ``graph="g"``: ``AttributeError``; ``stats=[1]``: ``AttributeError`` from
    ``compensation.py``; ``verify="no"``: verified (a truthy string)."""
    pruner = StructuredPruner(_net(), X, importance="magnitude", pruning_ratio=0.5)
    mask = pruner.plan().pruned_units()
    for kwargs, says in [
        ({"source": "m"}, "build: the model given is 'm', not the one the graph was built on"),
        ({"source": nn.Linear(2, 2)}, "build: the model given is the module Linear(in_features=2, out_features=2"),
        ({"graph": "g"}, "build: graph='g' must be a DependencyGraph (default: the pruner's)"),
        ({"stats": [1]}, "build: stats=[1] must be the calibration statistics by layer (pruner.stats, a dict)"),
        ({"verify": "no"}, "verify='no' must be True or False"),
        ({"share": "yes"}, "share='yes' must be True or False"),
    ]:
        with pytest.raises(UserError) as info:
            pruner.build(mask, **kwargs)
        assert says in str(info.value), str(info.value)
    small, edits = pruner.build(mask, source=pruner.model, graph=pruner.graph, verify=False)
    assert _params(small) == 288 and _params(pruner.model) == 860 and edits


def test_make_plan_names_a_graph_group_ratio_or_switch_out_of_form() -> None:
    """``make_plan``'s documented ``graph``, ``ratios``, ``ranked`` and ``set_ratios`` went unchecked (only
    ``ratio`` and ``scores`` were, session 23b): ``graph="g"``: ``AttributeError``; ``ratios=[0.5]``:
    ``AttributeError: 'list' object has no attribute 'get'``; ``ratios={1: 2.0}``: a plan pruning what the group
    allows; ``ranked="no"``: ranked globally."""
    pruner = StructuredPruner(_net(), X, importance="magnitude", pruning_ratio=0.5)
    scores = pruner.score()
    for kwargs, says in [
        ({"graph": "g"}, "make_plan: graph='g' must be a DependencyGraph (default: the pruner's)"),
        ({"ratios": [0.5]}, "make_plan: ratios=[0.5] must be a dict of ratios by group id, or None"),
        ({"ratios": {1: 2.0}}, "make_plan: ratios[1]=2.0 must be a number from 0 (keeps the group whole) up to"),
        ({"ratios": {1: float("nan")}}, "make_plan: ratios[1]=nan must be a number"),
        ({"ranked": "no"}, "ranked='no' must be True or False"),
        ({"set_ratios": [1]}, "make_plan: set_ratios=[1] must be a dict of ratios by isomorphic set, or None"),
    ]:
        with pytest.raises(UserError) as info:
            pruner.make_plan(0.5, scores, **kwargs)
        assert says in str(info.value), str(info.value)
    plan = pruner.make_plan(0.5, scores, ratios={1: 0.25, 2: 0.0})  # group 1 loses 2 of 8, group 2 none
    assert [int(gp.pruned.sum()) for gp in plan.groups] == [2, 0]


def test_the_commands_own_warnings_read_as_notes_without_a_source_line(tmp_path) -> None:
    """A warning of CleanAI's own on the command line came as Python prints one:
    ``/.../cleanai_core/job/run.py:319: RuntimeWarning: target_flops=0.999: ...`` and then the line of
    CleanAI's source, ``removed = pruner.plan().n_pruned``. It reads ``cleanai prune: warning: ...``, as the
    command's other warnings; the run is as before (exit 0, the folder written)."""
    import subprocess
    import sys
    from pathlib import Path

    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    torch.save(_net().state_dict(), tmp_path / "w.pt")
    tests, root = Path(__file__).parent, Path(__file__).parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(tests)]), OMP_NUM_THREADS="1")
    argv = ["prune", "--model", "test_faults_17:_net", "--weights", "w.pt", "--data", "d.pt"]
    argv += ["--target-flops", "0.999", "--out", "o", "--quiet", "--latency-repeats", "1"]
    run = subprocess.run(
        [sys.executable, "-m", "cleanai_core.cli", *argv], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "cleanai prune: warning: target_flops=0.999: the pruned model keeps 0.80 of the original's flops" in (
        run.stderr
    )
    assert "RuntimeWarning" not in run.stderr and "cleanai_core" not in run.stderr and "pruner.plan()" not in run.stderr
    assert (tmp_path / "o" / "model.pt").is_file()


def test_layer_ratios_of_0_for_every_group_are_named_not_blamed_on_the_ratio() -> None:
    """``layer_pruning_ratios={"0": 0, "3": 0}`` (``--layer-ratio '*=0'``) keeps every prunable group whole on
    purpose; the warning (the command line's error) said "the ratio leaves less than one unit to remove in every
    group (8 units); raise the ratio", with the ratio at 0.3 of 8 units."""
    with pytest.warns(RuntimeWarning) as record:
        small = StructuredPruner(_net(), X, importance="magnitude", layer_pruning_ratios={"0": 0, "3": 0}).prune()
    said = [str(w.message) for w in record if "the plan removes no unit" in str(w.message)]
    assert said and said[0].startswith(
        "the plan removes no unit: layer_pruning_ratios give every prunable group a ratio of 0, which keeps it whole "
        "(layers '0', '3'); give the layers to prune a ratio above 0"
    ), said
    assert _params(small) == 860
    with pytest.warns(RuntimeWarning, match="the plan removes no unit: the ratio leaves less than one unit"):
        StructuredPruner(_net(), X, importance="magnitude", pruning_ratio=0.05).prune()  # still the ratio's


def test_a_warning_before_the_command_names_the_command_not_an_options_value() -> None:
    """``cleanai --disable-plugin nope plugins``: the command was taken as the first word not starting with
    ``-``, the option's value, so the warning read ``cleanai nope: warning: cleanai: the blocked plugin ...``."""
    from cleanai_core.cli import _command_of

    assert _command_of(["--disable-plugin", "nope", "plugins"]) == "plugins"
    assert _command_of(["--plugin", "a.b", "--disable-plugin=x", "prune", "--model", "m"]) == "prune"
    assert _command_of(["--version"]) == ""
