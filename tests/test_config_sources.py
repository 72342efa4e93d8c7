"""Where ``cleanai prune`` options come from: presets, TOML/YAML/JSON config files,
``CLEANAI_<OPTION>`` environment variables and the command line, in that order of priority;
trust from none but the command line; ``config.json`` of a run reproduces it."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cleanai_core.cli import build_parser, main
from cleanai_core.config_sources import PRESETS
from cleanai_core.errors import UserError
from cleanai_core.job import DEFAULTS, resolve_config
from cleanai_plugins.io.demo import MODEL_SPEC

BASE = ["--model", "m", "--data", "d", "--out", "o"]


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["prune", *argv])


def resolve(argv: list[str], env: dict[str, str] | None = None) -> dict:
    return resolve_config(parse(argv), environ=env or {})


def options(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "config"}


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------


def test_each_preset_sets_its_values_and_balanced_is_the_defaults():
    plain = resolve(BASE)
    balanced = resolve([*BASE, "--preset", "balanced"])
    assert options(balanced) == {**options(plain), "preset": "balanced"}
    assert balanced["_sources"]["ratio"] == "preset" and plain["_sources"]["ratio"] == "default"
    con = resolve([*BASE, "--preset", "conservative"])
    assert (con["ratio"], con["global_pruning"], con["round_to"]) == (0.2, False, None)
    assert con["reconstruction"] and con["bn_recalibration"] and con["bias_compensation"]
    agg = resolve([*BASE, "--preset", "aggressive"])
    assert (agg["ratio"], agg["global_pruning"], agg["round_to"]) == (0.5, True, 8)
    assert agg["_sources"]["ratio"] == "preset" and agg["_sources"]["batch_size"] == "default"
    # every preset sets the same keys, all of them options
    assert len({tuple(sorted(v)) for v in PRESETS.values()}) == 1 and set(PRESETS["balanced"]) <= set(DEFAULTS)


def test_a_preset_is_overridden_by_every_other_source(tmp_path):
    cfg = resolve([*BASE, "--preset", "aggressive", "--target-flops", "0.6", "--round-to", "4"])
    assert (cfg["ratio"], cfg["target_flops"], cfg["round_to"], cfg["global_pruning"]) == (None, 0.6, 4, True)
    (tmp_path / "c.toml").write_text('preset = "conservative"\nbatch-size = 8\n')
    cfg = resolve([*BASE, "--config", str(tmp_path / "c.toml")])
    assert (cfg["preset"], cfg["ratio"], cfg["batch_size"]) == ("conservative", 0.2, 8)
    (tmp_path / "c.toml").write_text('preset = "conservative"\nratio = 0.25\n')
    cfg = resolve([*BASE, "--config", str(tmp_path / "c.toml")], {"CLEANAI_PRESET": "aggressive"})
    assert (cfg["preset"], cfg["ratio"], cfg["global_pruning"]) == ("aggressive", 0.25, True)  # file over preset
    assert cfg["_sources"]["preset"] == "environment" and cfg["_sources"]["ratio"] == "config file"
    with pytest.raises(UserError, match="unknown preset 'wild'"):
        resolve(BASE, {"CLEANAI_PRESET": "wild"})


# ---------------------------------------------------------------------------
# Config file formats
# ---------------------------------------------------------------------------

TOML = """model = "timm:resnet18"
data = "d.pt"
out = "o"
ratio = 0.4
global = true
ignore = ["fc"]
batch-size = 8
sensitivity-ratios = [0.2, 0.6]
layer-ratio = { "layer4.*" = 0.6 }
"""
YAML = """prune:
  model: timm:resnet18
  data: d.pt
  out: o
  ratio: 0.4
  global: true
  ignore: [fc]
  batch-size: 8
  sensitivity-ratios: [0.2, 0.6]
  layer-ratio: {"layer4.*": 0.6}
"""
JSON = {
    "model": "timm:resnet18",
    "data": "d.pt",
    "out": "o",
    "ratio": 0.4,
    "global_pruning": True,
    "ignore": ["fc"],
    "batch_size": 8,
    "sensitivity_ratios": [0.2, 0.6],
    "layer_ratio": {"layer4.*": 0.6},
}


def test_toml_yaml_and_json_give_the_same_config(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "c.toml").write_text(TOML)
    (tmp_path / "c.yaml").write_text(YAML)
    (tmp_path / "c.json").write_text(json.dumps(JSON))
    got = [options(resolve(["--config", str(tmp_path / name)])) for name in ("c.toml", "c.yaml", "c.json")]
    assert got[0] == got[1] == got[2]
    assert got[0]["ratio"] == 0.4 and got[0]["global_pruning"] is True and got[0]["batch_size"] == 8
    assert got[0]["layer_ratio"] == {"layer4.*": 0.6} and got[0]["sensitivity_ratios"] == [0.2, 0.6]
    assert got[0]["batch_size"] != DEFAULTS["batch_size"]
    cfg = resolve(["--config", str(tmp_path / "c.yaml")])
    assert cfg["_sources"]["batch_size"] == "config file" and cfg["_from_config"] == ["data", "model"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "ratio: [0.4\n", "is not valid YAML"),
        ("bad.yml", "- 1\n- 2\n", "must be a table"),
        ("bad.json", '{"ratio": 0.4,}', "is not valid JSON"),
        ("bad.json", "[1, 2]", "must be a table"),
        ("bad.toml", "ratio = \n", "is not valid TOML"),
    ],
)
def test_a_malformed_file_is_a_user_error_naming_it(tmp_path, name, text, message):
    if name.endswith((".yaml", ".yml")):
        pytest.importorskip("yaml")
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=message) as info:
        resolve([*BASE, "--config", str(tmp_path / name)])
    assert name in str(info.value)


def test_yaml_without_pyyaml_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    (tmp_path / "c.yml").write_text("ratio: 0.4\n")
    with pytest.raises(UserError, match=r"c\.yml.*needs PyYAML.*cleanai\[yaml\]"):
        resolve([*BASE, "--config", str(tmp_path / "c.yml")])


@pytest.mark.parametrize("ext", ["toml", "json", "yaml"])
def test_unknown_keys_are_refused_in_every_format(tmp_path, ext):
    if ext == "yaml":
        pytest.importorskip("yaml")
    text = {"toml": "ratio = 0.4\nno-such = 1\n", "json": '{"ratio": 0.4, "no-such": 1}', "yaml": "no-such: 1\n"}
    (tmp_path / f"c.{ext}").write_text(text[ext])
    with pytest.raises(UserError, match=r"unknown key\(s\) 'no-such'. Valid keys: .*preset"):
        resolve([*BASE, "--config", str(tmp_path / f"c.{ext}")])


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("latin1.toml", "ratio = 0.4 # caf\xe9\n".encode("latin-1"), r"not UTF-8 text \(byte 17 is b'\\xe9'\)"),
        ("deep.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        ("long.json", b'{"seed": ' + b"9" * 5000 + b"}", "is not valid JSON"),
        ("long.toml", b"seed = " + b"9" * 5000 + b"\n", "is not valid TOML"),
    ],
)
def test_an_unreadable_config_file_is_a_user_error(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=message):
        resolve([*BASE, "--config", str(tmp_path / name)])


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "c.toml").write_bytes("\ufeffratio = 0.4\n".encode())
    assert resolve([*BASE, "--config", str(tmp_path / "c.toml")])["ratio"] == 0.4


def test_a_folder_as_config_says_so(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        resolve([*BASE, "--config", str(tmp_path)])


@pytest.mark.parametrize("text", ["false", "no", "0"])
def test_a_switch_given_as_text_in_a_config_is_refused(tmp_path, text):
    """overwrite = "false" used to read as true: an existing --out would be replaced."""
    (tmp_path / "c.toml").write_text(f"overwrite = '{text}'\nglobal = true\n")
    with pytest.raises(UserError, match=f"--overwrite is a switch: give true or false, not '{text}'.*config file"):
        resolve([*BASE, "--config", str(tmp_path / "c.toml")])
    (tmp_path / "c.json").write_text('{"overwrite": 0, "quiet": 1}')
    cfg = resolve([*BASE, "--config", str(tmp_path / "c.json")])
    assert cfg["overwrite"] is False and cfg["quiet"] is True
    # a switch that other checks read first (isomorphic needs global) gets the same answer
    (tmp_path / "i.toml").write_text(f"isomorphic = '{text}'\n")
    with pytest.raises(UserError, match=f"--isomorphic is a switch: give true or false, not '{text}'"):
        resolve([*BASE, "--config", str(tmp_path / "i.toml")])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("device = 5", "--device must be text"),
        ("importance = {name = 'x'}", "--importance must be text"),
        ("out = ['a', 'b']", "--out must be text"),
        ("seed = 1.5", "--seed must be an integer"),
        ("seed = 99999999999999999999", r"--seed=99999999999999999999 is out of range"),
        ("alpha = inf", "--alpha=inf is not a finite number"),
        ("recover-lr = inf", "--recover-lr=inf is not a finite number"),
        ("threads = 100000", r"--threads=100000 is out of range: it must be in \[1, "),
        ("device = 'meta'", "--device meta holds shapes without data"),
    ],
)
def test_config_values_of_the_wrong_kind_are_user_errors(tmp_path, text, message):
    (tmp_path / "c.toml").write_text(text + "\n")
    with pytest.raises(UserError, match=message):
        given = {k: v for k, v in {"model": "m", "data": "d", "out": "o"}.items() if not text.startswith(k)}
        resolve_config({"config": str(tmp_path / "c.toml"), **given}, environ={})


def test_paths_as_path_objects_are_text():
    cfg = resolve_config({"model": "m", "data": Path("d"), "out": Path("o")}, environ={})
    assert cfg["data"] == "d" and cfg["out"] == "o"


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("CLEANAI_SEED", "1" * 30, "--seed=1+ is out of range"),
        ("CLEANAI_ALPHA", "inf", "--alpha=inf is not a finite number"),
        ("CLEANAI_THREADS", "100000", "--threads=100000 is out of range"),
    ],
)
def test_environment_values_out_of_range_are_user_errors(var, value, message):
    with pytest.raises(UserError, match=message):
        resolve(BASE, env={var: value})


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------


def test_environment_beats_the_config_file_and_loses_to_the_command_line(tmp_path):
    (tmp_path / "c.toml").write_text("ratio = 0.2\nbatch-size = 8\nglobal = false\n")
    conf = ["--config", str(tmp_path / "c.toml")]
    env = {"CLEANAI_RATIO": "0.4", "CLEANAI_BATCH_SIZE": "16", "CLEANAI_GLOBAL_PRUNING": "yes"}
    cfg = resolve([*BASE, *conf], env)
    assert (cfg["ratio"], cfg["batch_size"], cfg["global_pruning"]) == (0.4, 16, True)
    assert {k: cfg["_sources"][k] for k in ("ratio", "batch_size", "seed")} == {
        "ratio": "environment",
        "batch_size": "environment",
        "seed": "default",
    }
    cfg = resolve([*BASE, *conf, "--batch-size", "2", "--target-flops", "0.5"], env)
    assert (cfg["ratio"], cfg["target_flops"], cfg["batch_size"]) == (None, 0.5, 2)
    assert cfg["_sources"]["batch_size"] == "command line" and cfg["global_pruning"] is True
    # a target from the environment clears the file's ratio
    cfg = resolve([*BASE, *conf], {"CLEANAI_TARGET_FLOPS": "0.6"})
    assert (cfg["ratio"], cfg["target_flops"]) == (None, 0.6)


def test_environment_values_are_parsed_by_the_option_type():
    env = {
        "CLEANAI_GLOBAL_PRUNING": "0",
        "CLEANAI_RECONSTRUCTION": "false",
        "CLEANAI_IGNORE": "conv1, fc",
        "CLEANAI_SENSITIVITY_RATIOS": "0.5,0.1",
        "CLEANAI_LAYER_RATIO": "layer4.*=0.6,fc=0",
        "CLEANAI_ROUND_TO": "4",
        "CLEANAI_DEVICE": "cpu",
        "CLEANAI_CALIB_FRACTION": "",  # empty: ignored
        "CLEANAI_DISABLED_PLUGINS": "x",  # not an option: left alone
        "CLEANAI_DIST_TIMEOUT": "5",
    }
    cfg = resolve(BASE, env)
    assert cfg["global_pruning"] is False and cfg["reconstruction"] is False and cfg["round_to"] == 4
    assert cfg["ignore"] == ["conv1", "fc"] and cfg["sensitivity_ratios"] == [0.1, 0.5]
    assert cfg["layer_ratio"] == {"layer4.*": 0.6, "fc": 0.0} and cfg["calib_fraction"] == 0.5
    with pytest.raises(UserError, match="CLEANAI_BATCH_SIZE='many' is not an integer"):
        resolve(BASE, {"CLEANAI_BATCH_SIZE": "many"})
    with pytest.raises(UserError, match="CLEANAI_SEQUENTIAL='maybe': give 1/0"):
        resolve(BASE, {"CLEANAI_SEQUENTIAL": "maybe"})


def test_specs_from_the_environment_need_trust_code():
    cfg = resolve(["--out", "o"], {"CLEANAI_MODEL": "evil:model", "CLEANAI_DATA": "d.pt"})
    assert cfg["_from_config"] == ["data", "model"] and cfg["_sources"]["model"] == "environment"
    from cleanai_core.job.inputs import spec_options as _spec_options

    assert _spec_options(cfg, "model") == {
        "trust_code": False,
        "spec_source": "CLEANAI_MODEL in the environment",
        "flag": "--model",  # the option the loaders' messages name (faults16)
    }
    cfg = resolve(["--out", "o", "--trust-code"], {"CLEANAI_MODEL": "evil:model", "CLEANAI_DATA": "d.pt"})
    assert _spec_options(cfg, "model")["trust_code"] is True


# ---------------------------------------------------------------------------
# Trust is never granted by a file or the environment
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["trust_model", "trust-code"])
def test_trust_is_refused_from_every_source(tmp_path, key):
    name = "CLEANAI_" + key.replace("-", "_").upper()
    with pytest.raises(UserError, match=f"{name} is set: the environment cannot grant trust"):
        resolve(BASE, {name: "1"})
    # a config.json written by a trusted run is read back without its trust
    (tmp_path / "config.json").write_text(json.dumps({key: True, "ratio": 0.4, "_sources": {}}))
    cfg = resolve([*BASE, "--config", str(tmp_path / "config.json")])
    assert cfg["trust_model"] is False and cfg["trust_code"] is False and cfg["ratio"] == 0.4
    (tmp_path / "c.json").write_text(json.dumps({key: True}))
    with pytest.raises(UserError, match="cannot grant trust"):
        resolve([*BASE, "--config", str(tmp_path / "c.json")])
    (tmp_path / "c.toml").write_text(f"{key} = true\n")
    with pytest.raises(UserError, match="cannot grant trust"):
        resolve([*BASE, "--config", str(tmp_path / "c.toml")])
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text(f"{key}: true\n")
    with pytest.raises(UserError, match="cannot grant trust"):
        resolve([*BASE, "--config", str(tmp_path / "c.yaml")])


# ---------------------------------------------------------------------------
# End to end: config.json of a run reproduces it
# ---------------------------------------------------------------------------


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLEANAI_")}
    return subprocess.run(
        [sys.executable, "-m", "cleanai_core.cli", "prune", *args, "--quiet", "--latency-repeats", "1"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, "OMP_NUM_THREADS": "1", **env},
        timeout=120,
    )


@pytest.mark.slow
def test_config_json_of_a_run_reproduces_it(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    torch.save((torch.rand(24, 1, 8, 8), torch.randint(0, 10, (24,))), tmp_path / "data.pt")
    first = _cli(
        ["--model", MODEL_SPEC, "--data", "data.pt", "--out", "one", "--preset", "aggressive", "--round-to", "2"],
        tmp_path,
        {"CLEANAI_BATCH_SIZE": "4", "CLEANAI_SEED": "3"},
    )
    assert first.returncode == 0, first.stderr
    cfg1 = json.loads((tmp_path / "one" / "config.json").read_text())
    assert (cfg1["ratio"], cfg1["global_pruning"], cfg1["round_to"], cfg1["batch_size"], cfg1["seed"]) == (
        0.5,
        True,
        2,
        4,
        3,
    )
    src = cfg1["_sources"]
    assert (src["ratio"], src["round_to"], src["batch_size"], src["model"], src["quiet"], src["alpha"]) == (
        "preset",
        "command line",
        "environment",
        "command line",
        "command line",
        "default",
    )
    # in-process, without the environment: the file reproduces the run
    for key in DEFAULTS:
        monkeypatch.delenv("CLEANAI_" + key.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    rc = main(["prune", "--config", "one/config.json", "--out", "two", "--trust-code"])
    assert rc == 0, capsys.readouterr().err
    cfg2 = json.loads((tmp_path / "two" / "config.json").read_text())
    differ = {"out", "config", "trust_code", "_sources"}
    assert {k: v for k, v in cfg2.items() if k not in differ} == {k: v for k, v in cfg1.items() if k not in differ}
    assert cfg2["_sources"]["ratio"] == "config file" and cfg2["config"] == str(tmp_path / "one/config.json")
    rep1, rep2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert rep1["params_after"] == rep2["params_after"] < rep1["params_before"]
    assert [la["pruned_indices"] for la in rep1["layers"]] == [la["pruned_indices"] for la in rep2["layers"]]


def test_a_misspelt_environment_variable_is_named_with_the_option_it_looks_like(caplog):
    # before: CLEANAI_RATIOO=0.5 (or the API's spelling CLEANAI_PRUNING_RATIO) was ignored without a
    # word and the run pruned at the default ratio
    env = {"CLEANAI_RATIOO": "0.5", "CLEANAI_PRUNING_RATIO": "0.4", "CLEANAI_DIST_TIMEOUT": "5", "CLEANAI_XYZ": "1"}
    with caplog.at_level("WARNING", logger="cleanai"):
        cfg = resolve(BASE, env)
    assert cfg["ratio"] == 0.3  # the default, not 0.5 nor 0.4
    said = [r.getMessage() for r in caplog.records]
    assert "warning: CLEANAI_RATIOO is not an option and was ignored; did you mean CLEANAI_RATIO?" in said
    assert "warning: CLEANAI_PRUNING_RATIO is not an option and was ignored; did you mean CLEANAI_RATIO?" in said
    assert not any("DIST_TIMEOUT" in m or "XYZ" in m for m in said)  # other variables and unrelated names: quiet


def test_one_layer_pattern_given_twice_with_two_ratios_is_refused(tmp_path):
    # before: the later value won without a word (features.3 pruned at 0.1, not 0.5)
    with pytest.raises(UserError, match="'features.3' is given twice, with ratios 0.5 and 0.1; give it once"):
        resolve([*BASE, "--layer-ratio", "features.3=0.5", "--layer-ratio", "features.3=0.1"])
    cfg = resolve([*BASE, "--layer-ratio", "features.3=0.5", "--layer-ratio", "features.3=0.5"])
    assert cfg["layer_ratio"] == {"features.3": 0.5}


@pytest.mark.parametrize(
    ("name", "text", "words"),
    [
        ("c.json", '{"ratio": 0.3, "ratio": 0.5}', "is not valid JSON: key 'ratio' appears twice"),
        ("c.yaml", "ratio: 0.3\nratio: 0.5\n", "is not valid YAML: key 'ratio' appears twice"),
        ("c.toml", "ratio = 0.3\npruning-ratio = 0.5\n", r"sets ratio twice \(as 'ratio' and 'pruning-ratio'\)"),
        ("c.yaml", "global: true\nglobal_pruning: false\n", "sets global-pruning twice"),
    ],
)
def test_an_option_set_twice_in_one_config_file_is_refused(tmp_path, name, text, words):
    # before: the last value won without a word (JSON and YAML keep the last of a repeated key; two
    # spellings of one option overwrote each other)
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=words):
        resolve([*BASE, "--config", str(tmp_path / name)])


def test_yaml_still_refuses_python_tags(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text('ratio: !!python/object/apply:os.system ["echo x"]\n')
    with pytest.raises(UserError, match="could not determine a constructor"):
        resolve([*BASE, "--config", str(tmp_path / "c.yaml")])


@pytest.mark.parametrize("extra", [["--ratio", "0.5"], ["--target-flops", "0.5"], ["--layer-ratio", "fc=0.2"]])
def test_prune_dead_only_with_an_amount_on_the_command_line_is_refused(extra):
    # before: exit 0, the ratio or target ignored without a word
    with pytest.raises(UserError, match=f"--prune-dead-only removes exactly .* so {extra[0]} \\(command line\\)"):
        resolve([*BASE, "--prune-dead-only", *extra])
    assert resolve([*BASE, "--prune-dead-only", "--preset", "aggressive"])["prune_dead_only"] is True


def test_a_list_option_given_one_string_in_a_config_file_reads_as_the_environment_reads_it(tmp_path):
    """``ignore = "fc"`` (the API takes ``ignored_layers="fc"``) was refused with "ignore must
    be a list of layer patterns"; a string for a list option now splits on commas, as a
    ``CLEANAI_*`` variable does, and gives the same options as the list."""
    (tmp_path / "s.toml").write_text('ignore = "fc"\nsensitivity-ratios = "0.6, 0.2"\nlayer-ratio = "layer4.*=0.6"\n')
    (tmp_path / "l.toml").write_text(
        'ignore = ["fc"]\nsensitivity-ratios = [0.2, 0.6]\nlayer-ratio = { "layer4.*" = 0.6 }\n'
    )
    (tmp_path / "two.json").write_text(json.dumps({"ignore": "conv1, fc"}))
    strings, lists = (options(resolve([*BASE, "--config", str(tmp_path / n)])) for n in ("s.toml", "l.toml"))
    assert strings == lists
    assert strings["ignore"] == ["fc"] and strings["sensitivity_ratios"] == [0.2, 0.6]
    assert strings["layer_ratio"] == {"layer4.*": 0.6}
    assert resolve([*BASE, "--config", str(tmp_path / "two.json")])["ignore"] == ["conv1", "fc"]
