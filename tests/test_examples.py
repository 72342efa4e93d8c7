"""Every example in examples/ runs, with small settings, and prints the numbers it promises.

Each example runs as its own process, the way a user runs it (``python examples/X.py``),
with the repository root on ``PYTHONPATH`` so the checkout (not an installed copy) is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(*args: str, extra_path: list[Path] = (), timeout: int = 120) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *map(str, extra_path)])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["CLEANAI_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # no plugins of the machine running the tests
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


def numbers(pattern: str, text: str) -> tuple[float, ...]:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the output:\n{text}"
    return tuple(float(g) for g in match.groups())


@pytest.mark.slow
def test_quick_start_halves_the_channels_and_keeps_the_accuracy():
    out = run_example("examples/quick_start.py", "--epochs", "4")
    before, after = numbers(r"params:\s+(\d+) -> (\d+)", out)
    assert (before, after) == (56554, 14458)  # DigitsCNN 32/64/64 channels -> 16/32/32
    # (14522 before session 21: compensation's biases on the convs, now in their BatchNorms)
    flops_before, flops_after = numbers(r"flops:\s+(\d+) -> (\d+)", out)
    assert flops_after < 0.3 * flops_before
    acc_before, acc_after = numbers(r"accuracy: ([\d.]+) -> ([\d.]+)", out)
    assert acc_before > 0.9 and acc_after > 0.8
    assert "Conv2d(1, 16," in out


@pytest.mark.slow
def test_gradual_example_shrinks_to_a_quarter_of_the_flops_while_training():
    out = run_example("examples/gradual_pruning.py", "--epochs", "6", "--prune-from", "2")
    lines = [
        numbers(r"FLOPs ([\d.]+) of the start, +(\d+) parameters, test accuracy ([\d.]+)", line)
        for line in out.splitlines()
        if line.startswith("epoch")
    ]
    assert len(lines) == 6
    assert lines[0][0] == 1.0 and lines[-1][0] <= 0.26  # four cubic steps to 4x fewer FLOPs
    assert lines[-1][1] < lines[0][1] / 3
    assert lines[-1][2] > 0.9


@pytest.mark.slow
def test_basic_example_walks_every_step():
    out = run_example("examples/example_basic.py", "--epochs", "4")
    assert numbers(r"\[2\] (\d+) groups, (\d+) prunable", out) == (4, 2)
    # the residual add joins stem, conv1's input, conv2's output, bn2 and the head's input
    assert "stem.0:out(out), stem.1:channels(param), conv1:in(in), conv2:out(out), bn2:channels(param)" in out
    assert numbers(r"\[3\] calibrated on (\d+) positions", out) == (400,)
    assert numbers(r"\[5\] plan: (\d+) of (\d+) units pruned", out) == (9 + 19, 24 + 48)  # floor(0.4 * n) per group
    before, after = numbers(r"params: (\d+) -> (\d+)", out)
    assert before == 21394 and after < 0.5 * before
    assert numbers(r"conv1\s+out\s+(\d+) -> (\d+)", out) == (48, 29)
    acc_before, acc_after = numbers(r"accuracy: ([\d.]+) -> ([\d.]+)", out)
    assert acc_before > 0.9 and acc_after > 0.85
    assert "outputs identical: True" in out


@pytest.mark.slow
def test_resnet_example_cli_and_api_agree():
    out = run_example("examples/example_resnet.py", "--per-class", "4", "--epochs", "1", "--train-samples", "200")
    assert numbers(r"\[1\] wrote (\d+) images", out) == (40,)
    cli = numbers(r"CLI params: (\d+) -> (\d+)", out)
    api = numbers(r"API params: (\d+) -> (\d+)", out)
    assert cli[0] == 11181642  # resnet18 with a 10-class head
    assert cli == api and api[1] < 0.6 * api[0]  # the same ratio removes the same channels' worth
    assert re.search(r"Accuracy \(held-out\)\s+[\d.]+% -> [\d.]+%", out)
    assert numbers(r"layer1.0.conv1: (\d+) -> (\d+)", out) == (64, 45)
    assert "outputs equal: True" in out


@pytest.mark.slow
def test_example_plugin_package_passes_its_own_tests():
    plugin = EXAMPLES / "example_plugin"
    out = run_example(
        "-m", "pytest", str(plugin / "tests"), "-q", "-p", "no:cacheprovider", "-o", "addopts=", extra_path=[plugin]
    )
    assert numbers(r"(\d+) passed", out) == (3,)
    assert "failed" not in out


@pytest.mark.slow
def test_recover_example_wins_back_the_accuracy_lost_at_4x_fewer_flops():
    out = run_example("examples/example_recover.py", "--epochs", "3")
    flops_before, flops_after = numbers(r"flops:\s+(\d+) -> (\d+)", out)
    assert flops_after <= 0.26 * flops_before
    (original,) = numbers(r"accuracy original:\s+([\d.]+)", out)
    (pruned,) = numbers(r"accuracy after pruning:\s+([\d.]+)", out)
    (recovered,) = numbers(r"accuracy after recovery:\s+([\d.]+)", out)
    assert original > 0.95
    assert recovered > pruned and recovered > original - 0.02  # most of the gap won back


@pytest.mark.slow
def test_llm_example_reloads_with_from_pretrained_and_generates():
    pytest.importorskip("transformers")
    out = run_example("examples/example_llm.py", "--steps", "20")
    before, after = numbers(r"params: (\d+) -> (\d+)", out)
    assert before == 459392 and after < 0.6 * before
    assert numbers(r"heads: (\d+)/(\d+) -> (\d+)/(\d+)", out) == (8, 4, 4, 2)  # whole KV groups, GQA kept
    assert numbers(r"mlp: (\d+) -> (\d+)", out) == (384, 192)
    assert numbers(r"max logit difference after reload: ([\d.e+-]+)", out) == (0.0,)
    declared = "'biases_declared': ['attention_bias', 'mlp_bias']"
    assert f"cleanai_pruning: {{{declared}, 'from_pretrained': True, 'uniform': True}}" in out
    assert numbers(r"generated (\d+) tokens: b'Return the ", out) == (12,)


@pytest.mark.slow
def test_distributed_example_prunes_under_torchrun(tmp_path):
    bindir = str(Path(sys.executable).parent)
    if shutil.which("torchrun", path=os.pathsep.join([bindir, os.environ.get("PATH", "")])) is None:
        pytest.skip("torchrun is not on PATH")
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT),
        PATH=os.pathsep.join([bindir, env.get("PATH", "")]),  # the venv's torchrun and python
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        CLEANAI_DISABLE_PLUGIN_AUTOLOAD="1",
    )
    done = subprocess.run(
        ["bash", "examples/example_distributed.sh", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-3000:]}"
    report = json.loads((tmp_path / "out" / "pruned" / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert report["flops_after"] <= 0.5 * report["flops_before"]
    assert report["accuracy_after"] > 0.9  # held-out half of the 797 test images, rank 0 measured it
    before, after = numbers(r"params: (\d+) -> (\d+)", done.stdout)
    assert (before, after) == (report["params_before"], report["params_after"])
