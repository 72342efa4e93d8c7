"""``cleanai prune --auto / --sensitivity / --target-params / --prune-dead-only`` end to end
on the demo's DigitsCNN and the digits that ship with the package."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_cli import FAST, cli

from cleanai_plugins.io.demo import DATA_PATH, MODEL_SPEC, digits_tensors, train_digits_cnn


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auto")
    x, y = digits_tensors()
    torch.save(train_digits_cnn(x, y, epochs=2).state_dict(), tmp / "weights.pt")
    return tmp


def run(tmp, *args):
    base = ["prune", "--model", MODEL_SPEC, "--weights", "weights.pt", "--data", str(DATA_PATH)]
    return cli(*base, "--calib-fraction", "0.3", "--batch-size", "64", *FAST, *args, cwd=tmp)


def test_auto_meets_the_flops_target_and_reports_the_curves(trained):
    proc = run(trained, "--auto", "--target-flops", "0.5", "--sensitivity-batches", "2", "--out", "auto")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((trained / "auto" / "report.json").read_text())
    alloc = report["allocation"]
    assert alloc["method"] in ("sensitivity", "uniform", "global") and alloc["target"] == "flops"
    assert alloc["kl"][alloc["method"]] <= alloc["kl"]["sensitivity"]
    kept = report["flops_after"] / report["flops_before"]
    assert kept <= 0.5 and kept == pytest.approx(alloc["cost"], rel=1e-6)
    sens = report["sensitivity"]
    assert sens["samples"] == 128 and sens["ratios"] == [0.25, 0.5, 0.75]
    assert {g["layer"] for g in sens["groups"]} == {"features.0", "features.3", "features.7"}
    assert report["calibration_samples"] == round(0.3 * 1797)
    md = (trained / "auto" / "report.md").read_text()
    assert "## Sensitivity" in md and f"**{alloc['method']}** allocation" in md
    assert (trained / "auto" / "sensitivity.svg").read_text().count("<polyline") == len(sens["groups"])


def test_prune_dead_only_keeps_the_accuracy_and_target_params_meets_its_share(trained):
    proc = run(trained, "--prune-dead-only", "--out", "dead")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((trained / "dead" / "report.json").read_text())
    dead = sum(len(f["dead"]) for f in report["dead_units"])
    assert report["params_after"] <= report["params_before"]
    assert (report["params_after"] < report["params_before"]) == (dead > 0)
    assert report["accuracy_after"] == pytest.approx(report["accuracy_before"], abs=0.01)
    proc = run(trained, "--target-params", "0.4", "--out", "params")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((trained / "params" / "report.json").read_text())
    assert report["params_after"] / report["params_before"] <= 0.4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--auto", "--ratio", "0.3"], "--auto allocates ratios to a target"),
        (["--ratio", "0.3", "--target-params", "0.5"], "not both --ratio and --target-params"),
        (["--sensitivity", "--sensitivity-ratios", "0.5,1.2"], "strictly between 0 and 1"),
        (["--sensitivity-batches", "0"], "--sensitivity-batches"),
    ],
)
def test_bad_automation_options_say_what_to_give(trained, args, message):
    proc = run(trained, *args, "--out", "bad")
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (trained / "bad").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-latency", "0.7"], "--target-latency needs --auto"),
        (
            ["--auto", "--target-latency", "0.7", "--target-flops", "0.5"],
            "not both --target-flops and --target-latency",
        ),
        (["--auto", "--target-latency", "1.5"], "--target-latency=1.5 is out of range"),
    ],
)
def test_bad_latency_targets_say_what_to_give(trained, args, message):
    proc = run(trained, *args, "--out", "bad")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (trained / "bad").exists()


def test_auto_allocates_to_a_measured_latency_target(trained):
    proc = run(trained, "--auto", "--target-latency", "0.9", "--latency-repeats", "3", "--out", "lat")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((trained / "lat" / "report.json").read_text())
    alloc = report["allocation"]
    assert alloc["target"] == "latency" and alloc["method"] in alloc["kl"] and alloc["cost"] > 0
    # latency on a loaded machine is noisy: the allocation may prune little, but what it chose is applied
    layers = {g["layer"] for g in report["sensitivity"]["groups"]}
    assert set(alloc["layer_ratios"]) <= layers and all(0 <= r < 1 for r in alloc["layer_ratios"].values())
    after = {rec["name"]: rec for rec in report["layers"]}
    for name, r in alloc["layer_ratios"].items():
        rec = after[name]
        n = rec["channels_before"]
        assert rec["channels_after"] == max(1, n - math.floor(r * n + 1e-9)), (name, r, rec)
