"""benchmarks/compat_sweep.py's bookkeeping: the calibration section of the compatibility
document is replaced in place (the hand-written sections stay), the oracle render keeps
it, and ``compare`` names every model whose status, kept parameters or oracle error moved."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def tools(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("compat_sweep", "compat_calibrated"):
        sys.modules.pop(name, None)
    import compat_calibrated
    import compat_sweep

    return compat_sweep, compat_calibrated


def _rec(model, status="pass", **kw):
    return {"model": model, "status": status, "error": "" if status == "pass" else "boom 12", **kw}


def test_calibration_section_replaced_in_place_and_hand_written_sections_kept(tools, tmp_path):
    sweep, calibrated = tools
    doc = tmp_path / "compatibility.md"
    doc.write_text("# Compatibility\n\n## Failures by cause\n\n- x\n\n## Hugging Face transformers\n\nby hand\n")
    caches = {
        1: {"tv:a": _rec("tv:a", params_before=10, params_after=4, input=[1, 3, 64, 64])},
        32: {"tv:a": _rec("tv:a", "fail-prune", params_before=10)},
    }
    sets = [("torchvision classification", {"tv:a"})]
    calibrated.render_calibrated(caches, doc, sets, "first")
    calibrated.render_calibrated(caches, doc, sets, "second")
    text = doc.read_text()
    assert text.count(sweep.CALIB_SECTION) == 1 and "second" in text and "first" not in text
    assert text.index("## Failures by cause") < text.index(sweep.CALIB_SECTION) < text.index("## Hugging Face")
    assert text.rstrip().endswith("by hand")
    assert "| torchvision classification | 1 | 1 | 1 | 1 | 100.0% |" in text
    assert "| torchvision classification | 32 | 1 | 1 | 0 | 0.0% |" in text
    assert "- batch 32: **1** fail-prune: boom N - tv:a" in text
    assert "| tv:a | 64x64 | pass | fail-prune | 0.00M | 0.00M | B=32: boom 12 |" in text
    # the oracle sweep's render keeps both sections
    sweep.render({"tv:b": _rec("tv:b", params_before=10, params_after=5, max_abs_diff=0.0)}, doc)
    text = doc.read_text()
    assert "second" in text and "by hand" in text and "| tv:b |" in text


def test_compare_names_status_parameter_and_oracle_changes(tools):
    sweep, _ = tools
    old = {
        "a": _rec("a", params_after=5, max_abs_diff=1e-6, tolerance=1e-3),
        "b": _rec("b", params_after=5),
        "c": _rec("c", params_after=5, max_abs_diff=1e-6, tolerance=1e-3),
        "d": _rec("d", params_after=5),
        "e": _rec("e"),
    }
    new = {
        "a": _rec("a", params_after=5, max_abs_diff=2e-6, tolerance=1e-3),  # within tolerance, not 10x: same
        "b": _rec("b", "fail-oracle"),
        "c": _rec("c", params_after=5, max_abs_diff=5e-3, tolerance=1e-3),
        "d": _rec("d", params_after=6),
    }
    lines = sweep.compare(old, new)
    assert [ln.split(":")[0] for ln in lines] == ["b", "c", "d", "e"]
    assert "pass -> fail-oracle" in lines[0] and "1.00e-06 -> 5.00e-03" in lines[1] and "5 -> 6" in lines[2]
    assert lines[3] == "e: not in the new sweep"


def test_render_keeps_the_other_tasks_section_before_the_models(tools, tmp_path):
    sweep, _ = tools
    doc = tmp_path / "compatibility.md"
    doc.write_text(f"# Compatibility\n\n{sweep.OTHER_SECTION}\n\n| tv:fcn_resnet50 | pass |\n\n## Models\n\nold\n")
    sweep.render({"tv:b": _rec("tv:b", params_before=10, params_after=5, max_abs_diff=0.0)}, doc)
    text = doc.read_text()
    assert text.count(sweep.OTHER_SECTION) == 1 and "| tv:fcn_resnet50 | pass |" in text
    assert text.index(sweep.OTHER_SECTION) < text.index("## Models") < text.index("| tv:b |")


def test_render_keeps_the_dated_sample_sweeps_after_the_failures(tools, tmp_path):
    sweep, _ = tools
    doc = tmp_path / "compatibility.md"
    sample = f"{sweep.SAMPLE_SECTION}\n\n### 2026-12-01\n\n| timm:a | pass |\n\n### 2026-11-01\n\nolder\n"
    doc.write_text(f"# Compatibility\n\n{sample}\n{sweep.OTHER_SECTION}\n\nby hand\n\n## Models\n\nold\n")
    sweep.render({"tv:b": _rec("tv:b", params_before=10, params_after=5, max_abs_diff=0.0)}, doc)
    text = doc.read_text()
    assert text.count(sweep.SAMPLE_SECTION) == 1 and "| timm:a | pass |" in text and "older" in text
    assert text.index("## Failures by cause") < text.index(sweep.SAMPLE_SECTION) < text.index(sweep.OTHER_SECTION)
    assert text.index("older") < text.index(sweep.OTHER_SECTION) < text.index("| tv:b |")


def test_end_to_end_check_records_the_oracle_both_criteria_and_the_reload(tools):
    pytest.importorskip("timm")
    _, calibrated = tools
    # a model built at a smaller input than its default: the saved folder must rebuild it with img_size
    rec = calibrated.check_end_to_end("timm:test_vit2", side=32)
    assert rec["status"] == "pass", rec["error"]
    assert rec["kwargs"] == {"img_size": [32, 32]} and rec["input"] == [2, 3, 32, 32]
    assert rec["oracle"] < rec["tol"] and rec["reload_diff"] == 0.0
    assert rec["params_after"] < rec["params_before"] and 0.2 < rec["kept"] < 0.4
    assert abs(rec["kept_magnitude"] - rec["kept"]) < 0.05
