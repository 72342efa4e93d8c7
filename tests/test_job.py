"""The job as a library (``cleanai_core.job``): one set of option names for the API, the
command line and config files; plugin-contributed commands and input forms; the packaged
digits read through ``--data`` as the demo reads them."""

from __future__ import annotations

import json
import types

import pytest
import torch

from cleanai_core import hookimpl
from cleanai_core.cli import build_parser, main
from cleanai_core.errors import CleanAIError, UserError
from cleanai_core.job import DEFAULTS, PruneConfig, resolve_config, run_job
from cleanai_core.job.config import API_NAMES, option_fields, pruner_options
from cleanai_core.plugins import input_forms, temporary_plugin
from cleanai_core.pruner import StructuredPruner
from cleanai_plugins.io.datasets import load_dataset
from cleanai_plugins.io.demo import DATA_PATH, MODEL_SPEC, digits_tensors


def test_every_option_is_a_documented_field_with_a_flag():
    parser = build_parser()
    prune = parser._subparsers._group_actions[0].choices["prune"]
    dests = {a.dest for a in prune._actions}
    for field in option_fields():
        assert field.metadata["help"], field.name
        assert field.name in dests, f"{field.name} has no command-line flag"
    assert set(DEFAULTS) == {f.name for f in option_fields()}


def test_api_spellings_work_on_the_command_line_and_in_config_files(tmp_path):
    args = build_parser().parse_args(["prune", "--model", "m", "--data", "d", "--out", "o", "--pruning-ratio", "0.4"])
    assert resolve_config(args, environ={})["ratio"] == 0.4
    (tmp_path / "c.toml").write_text('pruning_ratio = 0.2\nignored_layers = ["fc"]\nrecalibrate_bn = false\n')
    cfg = resolve_config({"model": "m", "data": "d", "out": "o", "config": str(tmp_path / "c.toml")}, environ={})
    assert (cfg["ratio"], cfg["ignore"], cfg["bn_recalibration"]) == (0.2, ["fc"], False)
    # and the job's names map onto StructuredPruner's keywords in one place
    kwargs = pruner_options(cfg)
    assert kwargs["pruning_ratio"] == 0.2 and kwargs["ignored_layers"] == ["fc"] and kwargs["recalibrate_bn"] is False
    signature = StructuredPruner.__init__.__code__.co_varnames
    assert all(name in signature for name in kwargs) and set(API_NAMES.values()) <= set(kwargs)


def test_run_job_from_a_prune_config_matches_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = digits_tensors()
    torch.save((x[:96], y[:96]), tmp_path / "data.pt")
    common = dict(model=MODEL_SPEC, data="data.pt", ratio=0.4, quiet=True, latency_repeats=1)
    report = run_job(PruneConfig(out="api", **common))
    assert main(["prune", "--model", MODEL_SPEC, "--data", "data.pt", "--out", "cli", "--pruning-ratio", "0.4",
                 "--quiet", "--latency-repeats", "1"]) == 0  # fmt: skip
    cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    for key in ("params_before", "params_after", "flops_before", "flops_after", "accuracy_before", "accuracy_after"):
        assert report[key] == cli[key], key
    assert report["params_after"] < report["params_before"]
    # the library report is the base of the job's: one FLOPs count, no keys copied by hand
    assert report["flops_after"] < report["flops_before"] and len(report["layers"]) > 0
    recorded = json.loads((tmp_path / "api" / "config.json").read_text())
    assert recorded["ratio"] == 0.4 and recorded["_sources"]["ratio"] == "command line"


def test_run_job_refuses_bad_options_by_name():
    with pytest.raises(UserError, match="--ratio=1.5 is out of range"):
        run_job({"model": MODEL_SPEC, "data": "x.pt", "out": "o", "ratio": 1.5})
    with pytest.raises(TypeError):
        PruneConfig(no_such_option=1)


def test_the_packaged_digits_read_through_data_match_the_demo_inputs():
    x, y = digits_tensors()
    ds = load_dataset(str(DATA_PATH), {})
    xs, ys = ds.tensors
    assert torch.equal(xs, x) and torch.equal(ys.long(), y)
    assert float(xs.max()) == 1.0 and float(xs.min()) == 0.0  # pixel / 16, not / 255


def test_an_npz_states_its_input_scale(tmp_path):
    import numpy as np

    x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([0, 1]), x_max=np.array(31))
    np.savez(tmp_path / "b.npz", x=x, y=np.array([0, 1]))
    np.savez(tmp_path / "c.npz", x=x, x_max=np.array([0, 2]))
    assert float(load_dataset(str(tmp_path / "a.npz"), {}).tensors[0].max()) == 1.0
    assert float(load_dataset(str(tmp_path / "b.npz"), {}).tensors[0].max()) == pytest.approx(31 / 255)
    with pytest.raises(UserError, match="x_max must be one positive number"):
        load_dataset(str(tmp_path / "c.npz"), {})


def _command(name: str, calls: list) -> types.SimpleNamespace:
    def add_parser(sub):
        p = sub.add_parser(name, help="a plugin's command")
        p.add_argument("--times", type=int, default=1)
        return p

    def run(args):
        calls.append(args.times)
        return 3

    return types.SimpleNamespace(NAME=name, add_parser=add_parser, run=run)


def test_a_plugin_adds_a_command_through_the_hook():
    calls: list = []

    class Plugin:
        @hookimpl
        def cleanai_commands(self):
            return [_command("hello", calls)]

    with temporary_plugin(Plugin()):
        assert main(["hello", "--times", "2"]) == 3
    assert calls == [2]
    assert "demo" in build_parser()._subparsers._group_actions[0].choices  # the built-in demo, by the same hook


def test_a_plugin_command_cannot_shadow_a_kernel_command():
    class Plugin:
        @hookimpl
        def cleanai_commands(self):
            return [_command("prune", [])]

    with temporary_plugin(Plugin()), pytest.raises(CleanAIError, match="'prune', which cleanai has already"):
        build_parser()


def test_input_forms_come_from_the_loaders():
    class Plugin:
        @hookimpl
        def cleanai_input_forms(self):
            return {"model": "onnx:FILE"}

    assert "timm:NAME" in input_forms("model") and ".npz" in input_forms("data")
    with temporary_plugin(Plugin()):
        assert "onnx:FILE" in input_forms("model") and "timm:NAME" in input_forms("model")
        with pytest.raises(UserError, match="onnx:FILE"):
            run_job({"model": "nonsense-model", "data": str(DATA_PATH), "out": "o", "quiet": True})
