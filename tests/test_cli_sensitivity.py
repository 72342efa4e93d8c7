"""``cleanai sensitivity``: the analysis alone, on the demo's DigitsCNN and the digits that
ship with the package; nothing is pruned and no model is written."""

from __future__ import annotations

import json

import pytest
from test_cli import FAST, cli
from test_cli_auto import trained  # noqa: F401 (the fixture: weights of a DigitsCNN trained for 2 epochs)

from cleanai_plugins.io.demo import DATA_PATH, MODEL_SPEC


def sensitivity(tmp, *args):
    base = ["sensitivity", "--model", MODEL_SPEC, "--weights", "weights.pt", "--data", str(DATA_PATH)]
    return cli(*base, "--calib-fraction", "0.3", "--batch-size", "64", *FAST, *args, cwd=tmp)


def test_sensitivity_writes_the_curves_and_no_model(trained):  # noqa: F811
    proc = sensitivity(trained, "--sensitivity-ratios", "0.3,0.6", "--out", "s1")
    assert proc.returncode == 0, proc.stderr
    out = trained / "s1"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "report.json", "report.md", "sensitivity.svg"]
    sens = json.loads((out / "report.json").read_text())["sensitivity"]
    assert sens["ratios"] == [0.3, 0.6] and sens["samples"] == 128
    groups = sens["groups"]
    assert {g["layer"] for g in groups} == {"features.0", "features.3", "features.7"}
    means = [sum(g["kl"]) / len(g["kl"]) for g in groups]
    assert means == sorted(means, reverse=True) and all(k >= 0 for g in groups for k in g["kl"])
    assert all(g["ratios"][-1] == 0.6 and g["kl"][-1] > 0 for g in groups)  # 60% of a layer's channels gone
    # printed most sensitive first, as in the report
    printed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert printed == [g["layer"] for g in groups]
    assert "## Sensitivity" in (out / "report.md").read_text()
    assert (out / "sensitivity.svg").read_text().count("<polyline") == len(groups)
    # config.json reproduces the run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sensitivity"] is True and cfg["sensitivity_ratios"] == [0.3, 0.6]
    again = cli("sensitivity", "--config", str(out / "config.json"), "--out", "s2", cwd=trained)
    assert again.returncode == 0, again.stderr
    sens2 = json.loads((trained / "s2" / "report.json").read_text())["sensitivity"]
    flat = lambda gs: [(g["layer"], r, k) for g in gs for r, k in zip(g["ratios"], g["kl"], strict=True)]
    assert [x[:2] for x in flat(sens2["groups"])] == [x[:2] for x in flat(groups)]
    assert [x[2] for x in flat(sens2["groups"])] == pytest.approx([x[2] for x in flat(groups)], rel=1e-6, abs=1e-9)


def test_sensitivity_needs_an_out_folder_and_leaves_an_existing_one(trained):  # noqa: F811
    proc = sensitivity(trained)
    assert proc.returncode == 2 and "--out is required" in proc.stderr
    (trained / "taken").mkdir()
    (trained / "taken" / "mine.txt").write_text("keep")
    proc = sensitivity(trained, "--out", "taken")
    assert proc.returncode == 2 and "taken" in proc.stderr
    assert [p.name for p in (trained / "taken").iterdir()] == ["mine.txt"]
