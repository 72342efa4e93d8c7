"""The ``cleanai`` command end to end, mostly as a subprocess, on small models and data."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cleanai_core.cli import main
from cleanai_core.io import load_pruned

FAST = ["--threads", "1", "--latency-repeats", "2", "--quiet"]


def cli(*args: str, cwd: Path | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, CLEANAI_DISABLE_PLUGIN_AUTOLOAD="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "cleanai_core.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_layers_match_state_dict(report: dict, state: dict[str, torch.Tensor]) -> int:
    """Every reported layer's channels_after equals the saved tensor's channel count."""
    checked = 0
    for layer in report["layers"]:
        w = state.get(f"{layer['name']}.weight")
        if w is None:
            continue
        assert w.shape[0] == layer["channels_after"], layer["name"]
        assert layer["channels_before"] - layer["channels_after"] == len(layer["pruned_indices"])
        assert len(layer["importance_scores"]["kept"]) == layer["channels_after"]
        checked += 1
    return checked


# ---------------------------------------------------------------------------
# torchvision resnet18 on a .pt tensor file, with --weights and --save-pickle
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    torch.save((torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))), tmp / "data.pt")
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp / "weights.pt")
    hashes = {p.name: digest(p) for p in tmp.iterdir()}
    proc = cli(
        "prune", "--model", "torchvision:resnet18", "--num-classes", "10", "--weights", "weights.pt",
        "--data", "data.pt", "--ratio", "0.5", "--batch-size", "8", "--save-pickle", "--out", "out", *FAST,
        cwd=tmp,
    )  # fmt: skip
    return tmp, proc, hashes


def test_resnet_outputs(resnet_run):
    tmp, proc, hashes = resnet_run
    assert proc.returncode == 0, proc.stderr
    out = tmp / "out"
    names = {p.name for p in out.iterdir()}
    assert {"model.pt", "history.json", "architecture.json", "config.json", "report.json", "report.md"} <= names
    assert "model_full.pt" in names
    assert ("report.png" in names) or ("report.svg" in names)
    assert not [p for p in tmp.iterdir() if p.name.startswith(".out.")], "temporary folders left behind"
    # nothing the user gave was touched
    assert {p.name: digest(p) for p in tmp.iterdir() if p.is_file()} == hashes
    assert "Parameters" in proc.stdout and "->" in proc.stdout
    assert "calibrating" not in proc.stderr and "evaluating" not in proc.stderr  # --quiet


def test_resnet_report_numbers(resnet_run):
    tmp, proc, _ = resnet_run
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp / "out" / "report.json").read_text())
    assert report["params_before"] == 11_181_642  # resnet18, 10 classes
    assert report["params_after"] < 0.35 * report["params_before"]
    kept = report["flops_after"] / report["flops_before"]
    assert 0.2 < kept < 0.35, kept  # ratio 0.5 on both sides of most convs -> about (1 - 0.5)^2
    assert report["latency"]["repeats"] == 5 and report["latency"]["batch_size"] == 1  # 5 rounds of 1
    assert report["latency_before_ms"] > 0 and report["latency_after_ms"] > 0
    assert report["calibration_samples"] == 8 and report["evaluation_samples"] == 8
    assert 0.0 <= report["accuracy_before"] <= 1.0 and 0.0 <= report["accuracy_after"] <= 1.0
    assert report["input_shape"] == [1, 3, 32, 32]
    state = torch.load(tmp / "out" / "model.pt", weights_only=True)
    assert check_layers_match_state_dict(report, state) >= 20
    conv1 = next(layer for layer in report["layers"] if layer["name"] == "conv1")
    assert (conv1["channels_before"], conv1["channels_after"]) == (64, 32)
    md = (tmp / "out" / "report.md").read_text()
    assert md.index("Parameters") < md.index("## Layers")
    assert "| `conv1` | 64 | 32 | 32 |" in md


def test_resnet_config_and_load_back(resnet_run):
    tmp, proc, _ = resnet_run
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((tmp / "out" / "config.json").read_text())
    assert cfg["ratio"] == 0.5 and cfg["calib_fraction"] == 0.5 and cfg["importance"] == "weight_activation"
    assert cfg["num_classes"] == 10 and cfg["bias_compensation"] is True
    arch = json.loads((tmp / "out" / "architecture.json").read_text())
    assert arch["spec"] == "torchvision:resnet18" and arch["options"] == {"num_classes": 10}
    rebuilt = load_pruned(tmp / "out")
    saved = torch.load(tmp / "out" / "model_full.pt", weights_only=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), saved(x), rtol=0, atol=0)
    assert (
        sum(p.numel() for p in rebuilt.parameters())
        == json.loads((tmp / "out" / "report.json").read_text())["params_after"]
    )


# ---------------------------------------------------------------------------
# timm model on a generated image folder, --target-flops, TOML config
# ---------------------------------------------------------------------------


def test_timm_image_folder_target_flops(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "cfg.toml").write_text('importance = "magnitude"\nbatch-size = 4\nratio = 0.2\n')
    proc = cli(
        "prune", "--model", "timm:resnet10t", "--num-classes", "2", "--data", "imgs", "--image-size", "32",
        "--config", "cfg.toml", "--target-flops", "0.5", "--out", "out", *FAST,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["input_shape"] == [1, 3, 32, 32]  # timm's data config, resized to --image-size
    kept = report["flops_after"] / report["flops_before"]
    assert 0.35 < kept <= 0.55, kept
    assert report["calibration_samples"] == 4 and report["evaluation_samples"] == 4
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["importance"] == "magnitude" and cfg["batch_size"] == 4  # from the file
    assert cfg["target_flops"] == 0.5 and cfg["ratio"] is None  # the command line wins
    assert "Magnitude" in report["importance"]
    rebuilt = load_pruned(tmp_path / "out")
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert set(rebuilt.state_dict()) == set(state)
    check_layers_match_state_dict(report, state)


# ---------------------------------------------------------------------------
# pickled model + .npz data; errors
# ---------------------------------------------------------------------------


@pytest.fixture()
def small_inputs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    torch.save(model, tmp_path / "model.pth")
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 255, (20, 8, 8), dtype=np.uint8), y=rng.integers(0, 10, 20))
    return tmp_path


def test_pickled_model_needs_trust(small_inputs):
    proc = cli("prune", "--model", "model.pth", "--data", "data.npz", "--out", "out", cwd=small_inputs)
    assert proc.returncode == 2
    assert "--trust-model" in proc.stderr and "runs Python code" in proc.stderr
    assert not (small_inputs / "out").exists()
    proc = cli(
        "prune", "--model", "model.pth", "--trust-model", "--data", "data.npz", "--ratio", "0.25", "--out", "out",
        *FAST, cwd=small_inputs,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((small_inputs / "out" / "report.json").read_text())
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert (layers["0"]["channels_after"], layers["2"]["channels_after"]) == (6, 12)
    assert report["params_after"] < report["params_before"]
    assert report["input_shape"] == [1, 1, 8, 8]
    model = load_pruned(small_inputs / "out", trust_model=True)
    assert model[0].out_channels == 6 and model[2].out_channels == 12


def test_missing_data_file(small_inputs):
    proc = cli("prune", "--model", "model.pth", "--trust-model", "--data", "nope.pt", "--out", "out", cwd=small_inputs)
    assert proc.returncode == 2
    assert "nope.pt" in proc.stderr and "no such file" in proc.stderr
    assert not (small_inputs / "out").exists()


def run_main(args: list[str], cwd: Path, capsys) -> tuple[int, str]:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        rc = main(args)
    finally:
        os.chdir(old)
    captured = capsys.readouterr()
    run_main.stdout = captured.out
    return rc, captured.err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratio", "1.5"], "--ratio=1.5 is out of range"),
        (["--ratio", "0.5", "--target-flops", "0.5"], "not both"),
        (["--alpha", "1", "--importance", "magnitude"], "--alpha/--beta"),
        (["--layer-ratio", "0"], "PATTERN=R"),
        (["--batch-size", "0"], "--batch-size=0 is out of range: it must be >= 1"),
        (["--covariance-rows", "-3"], "--covariance-rows=-3 is out of range: it must be >= 0"),
        (["--stats-budget-mib", "-1"], "--stats-budget-mib=-1 is out of range: it must be >= 0"),
    ],
)
def test_bad_options(small_inputs, capsys, extra, message):
    rc, err = run_main(
        ["prune", "--model", "model.pth", "--trust-model", "--data", "data.npz", "--out", "out", *extra],
        small_inputs,
        capsys,
    )
    assert rc == 2 and message in err
    assert not (small_inputs / "out").exists()


def test_existing_out_dir_refused(small_inputs, capsys):
    (small_inputs / "out").mkdir()
    (small_inputs / "out" / "keep.txt").write_text("mine")
    rc, err = run_main(
        ["prune", "--model", "model.pth", "--trust-model", "--data", "data.npz", "--out", "out"], small_inputs, capsys
    )
    assert rc == 2 and "--overwrite" in err
    assert (small_inputs / "out" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in small_inputs.iterdir()) == ["data.npz", "model.pth", "out"]


def test_out_dir_inside_input_folder_refused(small_inputs, capsys):
    rc, err = run_main(
        ["prune", "--model", "model.pth", "--trust-model", "--data", str(small_inputs), "--out", "sub", "--overwrite"],
        small_inputs,
        capsys,
    )
    assert rc == 2 and "inside your input folder" in err
    assert not (small_inputs / "sub").exists()


def test_layer_options(small_inputs, capsys):
    rc, err = run_main(
        ["prune", "--model", "model.pth", "--trust-model", "--data", "data.npz", "--out", "o", "--ignore", "0",
         "--layer-ratio", "2=0.5", "--ratio", "0.1", "--importance", "magnitude", "--no-bias-compensation", *FAST],
        small_inputs,
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    layers = {x["name"]: x for x in json.loads((small_inputs / "o" / "report.json").read_text())["layers"]}
    assert (layers["0"]["channels_before"], layers["0"]["channels_after"]) == (8, 8)  # ignored
    assert (layers["2"]["channels_before"], layers["2"]["channels_after"]) == (16, 8)  # its own ratio
    state = torch.load(small_inputs / "o" / "model.pt", weights_only=True)
    assert state["2.weight"].shape == (8, 8, 3, 3) and state["6.weight"].shape == (10, 8)
    rc, err = run_main(
        ["prune", "--model", "model.pth", "--trust-model", "--data", "data.npz", "--out", "g", "--global",
         "--round-to", "4", "--ratio", "0.4", *FAST],
        small_inputs,
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    layers = {x["name"]: x for x in json.loads((small_inputs / "g" / "report.json").read_text())["layers"]}
    assert layers["0"]["channels_after"] % 4 == 0 and layers["2"]["channels_after"] % 4 == 0
    assert layers["0"]["channels_after"] + layers["2"]["channels_after"] < 24


def test_out_dir_is_current_folder_refused(small_inputs, capsys):
    rc, err = run_main(
        ["prune", "--model", "model.pth", "--trust-model", "--data", "data.npz", "--out", ".", "--overwrite"],
        small_inputs,
        capsys,
    )
    assert rc == 2 and "current folder" in err
    assert sorted(p.name for p in small_inputs.iterdir()) == ["data.npz", "model.pth"]


def test_unlabelled_data_no_accuracy(small_inputs, capsys):
    torch.save(torch.rand(12, 1, 8, 8), small_inputs / "x.pt")
    rc, err = run_main(
        ["prune", "--model", "model.pth", "--trust-model", "--data", "x.pt", "--out", "o", "--calib-fraction",
         "0.25", *FAST],
        small_inputs,
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    report = json.loads((small_inputs / "o" / "report.json").read_text())
    assert report["accuracy_before"] is None and report["accuracy_after"] is None
    assert report["calibration_samples"] == 3 and report["evaluation_samples"] == 9
    assert "Accuracy" not in (small_inputs / "o" / "report.md").read_text()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_model_file_errors(small_inputs, capsys):
    torch.save(nn.Linear(2, 3).state_dict(), small_inputs / "sd.pt")
    rc, err = run_main(["prune", "--model", "sd.pt", "--data", "data.npz", "--out", "o"], small_inputs, capsys)
    assert rc == 2 and "state_dict" in err and "--weights" in err
    torch.jit.script(nn.Linear(2, 3)).save(str(small_inputs / "ts.pt"))
    rc, err = run_main(["prune", "--model", "ts.pt", "--data", "data.npz", "--out", "o"], small_inputs, capsys)
    assert rc == 2 and "TorchScript" in err
    rc, err = run_main(
        ["prune", "--model", "timm:no_such_net", "--data", "data.npz", "--out", "o"], small_inputs, capsys
    )
    assert rc == 2 and "no_such_net" in err
    assert not (small_inputs / "o").exists()


def test_unknown_config_key(small_inputs, capsys):
    (small_inputs / "c.toml").write_text("ratio = 0.2\nratioo = 0.3\n")
    rc, err = run_main(
        ["prune", "--model", "model.pth", "--data", "data.npz", "--out", "o", "--config", "c.toml"],
        small_inputs,
        capsys,
    )
    assert rc == 2 and "'ratioo'" in err and "Valid keys" in err


def test_dry_run_writes_nothing(small_inputs, capsys):
    rc, _ = run_main(
        ["prune", "--model", "model.pth", "--trust-model", "--data", "data.npz", "--ratio", "0.5", "--dry-run",
         "--out", "o", "--quiet"],
        small_inputs,
        capsys,
    )  # fmt: skip
    assert rc == 0
    assert "units pruned" in run_main.stdout and "group" in run_main.stdout
    assert not (small_inputs / "o").exists()


def test_explain(capsys):
    rc = main(["explain", "--model", "cleanai_plugins.io.demo:DigitsCNN", "--input-shape", "1,1,8,8"])
    out = capsys.readouterr().out
    assert rc == 0 and "features.3: Conv2d" in out and "prunable" in out
    rc = main(["explain", "--model", "cleanai_plugins.io.demo:DigitsCNN", "--input-shape", "1,a"])
    assert rc == 2 and "--input-shape" in capsys.readouterr().err


def half_digits_cnn() -> nn.Module:
    from cleanai_plugins.io.demo import DigitsCNN

    return DigitsCNN().half()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--input-shape", "1,1,8,8", "--max-groups", "-1"], "--max-groups=-1 is out of range: it must be >= 0."),
        (["--input-shape", "1,1,100000,100000"], "cannot allocate an example input of that size"),
    ],
)
def test_explain_refuses_a_negative_group_count_and_an_input_too_large(capsys, argv, words):
    # before: --max-groups -1 listed every group but one, then "... 6 more", with exit 0; a huge shape
    # was a RuntimeError traceback from the allocator (exit 1)
    assert main(["explain", "--model", "cleanai_plugins.io.demo:DigitsCNN", *argv]) == 2
    assert words in capsys.readouterr().err


def test_explain_traces_a_half_precision_model(capsys):
    # before: exit 2, "mixed dtype (CPU): expect parameter to have scalar type of Float" (float32 noise)
    rc = main(["explain", "--model", f"{__name__}:half_digits_cnn", "--input-shape", "1,1,8,8"])
    out = capsys.readouterr().out
    assert rc == 0 and "features.3: Conv2d" in out and "group 3: 64 units (64 prunable)" in out


# ---------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------


def test_demo(tmp_path):
    proc = cli("demo", "--out", "demo", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["accuracy_before"] > 0.95  # the trained CNN is good on held-out digits
    assert report["accuracy_after"] > 0.9  # ratio 0.5, least-squares reconstruction, no fine-tuning
    assert 0.2 < report["params_after"] / report["params_before"] < 0.3  # ratio 0.5 on both sides: ~(1 - 0.5)^2
    assert report["calibration_samples"] + report["evaluation_samples"] == 797
    assert "Accuracy (held-out)" in proc.stdout and "load_pruned" in proc.stdout
    model = load_pruned(tmp_path / "demo")
    from cleanai_plugins.io.demo import digits_tensors

    x, y = digits_tensors()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.5
    # an unrelated non-empty folder is refused, the demo's own is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f").write_text("x")
    proc = cli("demo", "--out", "other", "--quiet", cwd=tmp_path)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
