"""Saving and loading pruned models, the data and model loaders, config resolution, report rendering."""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from cleanai_core.cli import build_parser
from cleanai_core.errors import UserError
from cleanai_core.io import atomic_write_text, load_pruned, save_pruned
from cleanai_core.job.config import resolve_config
from cleanai_core.job.inputs import split_dataset
from cleanai_core.report import render_markdown, render_svg, write_report
from cleanai_plugins.io.demo import MODEL_SPEC, DigitsCNN
from cleanai_plugins.io.loaders import build_model, load_dataset, read_npz


@pytest.fixture(scope="module")
def pruned_digits():
    from cleanai_core import StructuredPruner

    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.rand(64, 1, 8, 8)
    pruner = StructuredPruner(model, x[:1], pruning_ratio=0.5)
    pruner.collect_activations([x[:32], x[32:]], progress=False)
    return model, pruner, pruner.prune(), x


def test_save_and_load_pruned_identical(tmp_path, pruned_digits):
    model, pruner, pruned, x = pruned_digits
    # the bias compensation gave each conv built with bias=False went into the BatchNorm after it
    assert model.features[3].bias is None and pruned.features[3].bias is None
    assert pruner.history.meta["added_biases"] == []
    save_pruned(tmp_path / "o", pruned, pruner.history, MODEL_SPEC, options={"num_classes": 10, "data": "ignored"})
    arch = json.loads((tmp_path / "o" / "architecture.json").read_text())
    assert arch["spec"] == MODEL_SPEC and arch["options"] == {"num_classes": 10}
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["architecture.json", "history.json", "model.pt"]
    loaded = load_pruned(tmp_path / "o")
    assert loaded.features[0].out_channels == 16 and loaded.fc.in_features == 32
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)
    assert not loaded.training


def test_model_pt_is_plain_tensors(tmp_path, pruned_digits):
    _, pruner, pruned, _ = pruned_digits
    save_pruned(tmp_path, pruned, pruner.history, MODEL_SPEC, save_pickle=True)
    state = torch.load(tmp_path / "model.pt", weights_only=True)  # safe load works
    assert state["features.0.weight"].shape == (16, 1, 3, 3)
    full = torch.load(tmp_path / "model_full.pt", weights_only=False)
    assert isinstance(full, DigitsCNN)


def test_load_pruned_errors(tmp_path):
    with pytest.raises(UserError, match="architecture.json"):
        load_pruned(tmp_path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "two"


# ---------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------


def test_read_npz_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.integers(0, 255, (5, 4, 3), dtype=np.uint8),
        "f": np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float32)),
        "y": rng.integers(0, 10, 5).astype(np.int64),
        "d": rng.standard_normal(7),
    }
    np.savez(tmp_path / "a.npz", **arrays)
    got = read_npz(tmp_path / "a.npz")
    for k, v in arrays.items():
        assert np.array_equal(got[k].numpy(), v), k
        assert got[k].numpy().dtype == v.dtype


def test_embedded_digits_file():
    data = read_npz(__import__("cleanai_plugins.io.demo", fromlist=["x"]).DATA_PATH)
    assert data["x"].shape == (1797, 8, 8) and data["x"].dtype == torch.uint8
    assert int(data["x"].max()) == 16 and sorted(data["y"].unique().tolist()) == list(range(10))


@pytest.mark.parametrize("form", ["tuple", "dict", "tensor", "tensordataset"])
def test_pt_forms(tmp_path, form):
    x, y = torch.randn(6, 3, 4, 4), torch.arange(6)
    obj = {"tuple": (x, y), "dict": {"x": x, "y": y}, "tensor": x, "tensordataset": TensorDataset(x, y)}[form]
    torch.save(obj, tmp_path / "d.pt")
    ds = load_dataset(str(tmp_path / "d.pt"), {})
    assert len(ds) == 6
    item = ds[2]
    if form == "tensor":
        assert torch.equal(item, x[2])
    else:
        assert torch.equal(item[0], x[2]) and int(item[1]) == 2


def test_uint8_images_become_float_nchw(tmp_path):
    x = torch.randint(0, 256, (4, 10, 12, 3), dtype=torch.uint8)
    torch.save((x, torch.zeros(4, dtype=torch.long)), tmp_path / "d.pt")
    ds = load_dataset(str(tmp_path / "d.pt"), {})
    img = ds[1][0]
    assert img.shape == (3, 10, 12) and img.dtype == torch.float32
    torch.testing.assert_close(img, x[1].permute(2, 0, 1).float() / 255)


def test_data_errors(tmp_path):
    torch.save((torch.randn(4, 2), torch.arange(3)), tmp_path / "bad.pt")
    with pytest.raises(UserError, match="4 inputs but 3 labels"):
        load_dataset(str(tmp_path / "bad.pt"), {})
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(UserError, match=r"\.csv is not supported"):
        load_dataset(str(tmp_path / "d.csv"), {})
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="no class sub-folders"):
        load_dataset(str(tmp_path / "flat"), {})
    assert load_dataset("not-a-thing", {}) is None


def test_factory_and_weights(tmp_path):
    m = build_model(MODEL_SPEC, {"num_classes": 3, "trust_code": True})
    assert m.fc.out_features == 3
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "w.pt")
    m2 = build_model(MODEL_SPEC, {"num_classes": 3, "trust_code": True, "weights": str(tmp_path / "w.pt")})
    assert torch.equal(m2.fc.weight, m.fc.weight)
    with pytest.raises(UserError, match="do not fit"):
        build_model(MODEL_SPEC, {"num_classes": 5, "trust_code": True, "weights": str(tmp_path / "w.pt")})
    with pytest.raises(UserError, match="cannot import module"):
        build_model("no_such_pkg.mod:f", {"trust_code": True})


def test_split_is_seeded_and_disjoint():
    ds = TensorDataset(torch.arange(101))
    a1, b1 = split_dataset(ds, 0.5, seed=3)
    a2, b2 = split_dataset(ds, 0.5, seed=3)
    assert a1.indices == a2.indices and len(a1) == 50 and len(b1) == 51
    assert not set(a1.indices) & set(b1.indices)
    assert split_dataset(ds, 1.0, 0)[1] is None


# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["prune", *argv])


def test_config_file_merge(tmp_path):
    (tmp_path / "c.toml").write_text(
        'model = "timm:resnet18"\ndata = "d.pt"\nout = "o"\nratio = 0.4\nignore = ["fc"]\n'
        'layer-ratio = {"layer4.*" = 0.6}\nno_such = 1\n'
    )
    with pytest.raises(UserError, match="unknown key.*'no_such'"):
        resolve_config(parse(["--config", str(tmp_path / "c.toml")]))
    text = (tmp_path / "c.toml").read_text().replace("no_such = 1\n", "")
    (tmp_path / "c.toml").write_text(text)
    cfg = resolve_config(parse(["--config", str(tmp_path / "c.toml"), "--ratio", "0.2", "--ignore", "conv1"]))
    assert cfg["ratio"] == 0.2 and cfg["ignore"] == ["fc", "conv1"] and cfg["layer_ratio"] == {"layer4.*": 0.6}
    assert cfg["calib_fraction"] == 0.5 and cfg["batch_size"] == 32  # defaults
    cfg = resolve_config(parse(["--config", str(tmp_path / "c.toml"), "--target-flops", "0.5"]))
    assert cfg["target_flops"] == 0.5 and cfg["ratio"] is None


def test_config_defaults_and_validation():
    cfg = resolve_config(parse(["--model", "m", "--data", "d", "--out", "o"]))
    assert cfg["ratio"] == 0.3 and cfg["importance"] == "weight_activation" and cfg["bias_compensation"] is True
    cfg = resolve_config(parse(["--model", "m", "--data", "d", "--out", "o", "--layer-ratio", "a.*=0.7",
                                "--no-bn-recalibration"]))  # fmt: skip
    assert cfg["layer_ratio"] == {"a.*": 0.7} and cfg["bn_recalibration"] is False
    with pytest.raises(UserError, match="--out is required"):
        resolve_config(parse(["--model", "m", "--data", "d"]))
    with pytest.raises(UserError, match="--calib-fraction=0.0"):
        resolve_config(parse(["--model", "m", "--data", "d", "--out", "o", "--calib-fraction", "0"]))
    with pytest.raises(UserError, match="not including, 1"):
        resolve_config(parse(["--model", "m", "--data", "d", "--out", "o", "--layer-ratio", "x=1.0"]))
    cfg = resolve_config(parse(["--model", "m", "--data", "d", "--out", "o", "--layer-ratio", "x=0"]))
    assert cfg["layer_ratio"] == {"x": 0.0}  # 0 keeps that layer whole


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

REPORT = {
    "params_before": 1000,
    "params_after": 400,
    "flops_before": 2_000_000,
    "flops_after": 900_000,
    "latency_before_ms": 2.0,
    "latency_after_ms": 1.0,
    "accuracy_before": 0.9,
    "accuracy_after": 0.85,
    "layers": [
        {"name": "conv<1>", "channels_before": 8, "channels_after": 4, "pruned_indices": [0, 1, 2, 3],
         "importance_scores": {"pruned": [0.1, 0.2, 0.0, 0.3], "kept": [1.0, 2.0, 3.0, 4.0]}},
        {"name": "fc", "channels_before": 10, "channels_after": 10, "pruned_indices": [],
         "importance_scores": {"pruned": [], "kept": []}},
    ],
}  # fmt: skip


def test_markdown_headline_first():
    md = render_markdown(REPORT, [("Extra", "hello")])
    assert md.index("| Parameters | 1.00k | 400 | -60.0% |") < md.index("## Layers")
    assert "| FLOPs (1 input) | 2.00M | 900.00k | -55.0% |" in md
    assert "| Accuracy (held-out) | 90.00% | 85.00% | -5.00 pt |" in md
    assert "| `conv<1>` | 8 | 4 | 4 |" in md and md.rstrip().endswith("hello")


def test_svg_is_valid_and_draws_layers():
    root = ET.fromstring(render_svg(REPORT))
    ns = "{http://www.w3.org/2000/svg}"
    rects = root.findall(f"{ns}rect")
    assert len(rects) == 1 + 2 * 2  # background + before/after bar per layer
    widths = [float(r.get("width")) for r in rects[1:3]]
    assert widths[1] == pytest.approx(widths[0] / 2)  # conv<1>: 4 of 8 channels
    red = [e for e in root.findall(f"{ns}line") if e.get("stroke") == "#d62728"]
    assert len(red) == 4  # one tick per pruned unit
    assert any("conv<1>" in (t.text or "") for t in root.findall(f"{ns}text"))


def test_write_report_files(tmp_path):
    out = write_report(tmp_path, REPORT)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["report.json", "report.md", out["plot"]])
    assert json.loads((tmp_path / "report.json").read_text())["params_after"] == 400


def test_report_sections_hook(tmp_path):
    from cleanai_core import hookimpl
    from cleanai_core.plugins import temporary_plugin

    class Extra:
        @hookimpl
        def cleanai_report_sections(self, report):
            return [("Energy", f"params after: {report['params_after']}")]

    with temporary_plugin(Extra(), name="extra-section"):
        write_report(tmp_path, REPORT)
    md = (tmp_path / "report.md").read_text()
    assert "## Energy" in md and "params after: 400" in md
