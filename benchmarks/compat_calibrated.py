"""The default user path on one model, for ``compat_sweep.py --calibrate N --calib-batch B``.

Glossary:

- *default path*: ``StructuredPruner(model, example, pruning_ratio=r)`` with every default
  (weight-magnitude x activation importance, bias compensation, reconstruction, BatchNorm
  correction), ``collect_activations`` on ``N`` random batches of ``B`` inputs, ``prune()``.
- *calibration side*: the input side used (``--calib-side``, 64 px by default) where the
  model runs at it, else the model's default size (capped at 224 px where it allows).

A model passes when every step runs, the pruned model's output on a fresh batch is finite
(where the original's is) and has the original's shape, parameters went down, and the
user's model is left as it was. Statuses (beside the oracle sweep's ``skipped-*``):
``fail-trace`` (the pruner could not be built), ``fail-calibrate`` (``collect_activations``
raised), ``fail-prune``, ``fail-forward``, ``fail-shape``, ``fail-nonfinite``,
``fail-noprune`` (no parameter removed), ``fail-modified`` (the user's model changed).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

__all__ = ["STATUSES", "check_calibrated", "check_end_to_end", "render_calibrated"]

STATUSES = (
    "pass",
    "fail-trace",
    "fail-calibrate",
    "fail-prune",
    "fail-forward",
    "fail-shape",
    "fail-nonfinite",
    "fail-noprune",
    "fail-modified",
    "skipped-too-big",
    "skipped-too-slow",
    "skipped-unsupported",
)


def _built(spec: str, side: int, batch: int, kwargs_out: dict | None = None):
    """``(model, size, x, ref)``: the model at the smallest of ``side``, its default size
    capped at 224 px, or its full default size that runs on ``batch`` random inputs
    (``kwargs_out`` receives the architecture's keyword arguments)."""
    import torch
    from compat_sweep import MAX_SIDE, build_with_kwargs

    from cleanai_core.testing import run_model

    last: Exception | None = None
    for cap in (side, MAX_SIDE, 100_000):
        try:
            model, size, kwargs = build_with_kwargs(spec, max_side=cap)
            x = torch.randn(batch, *size)
            ref = run_model(model, x)
            if kwargs_out is not None:
                kwargs_out.update(kwargs)
            return model, size, x, ref
        except Exception as exc:  # too small for this model: try the next size
            last = exc
    raise last  # type: ignore[misc]


def _fingerprint(model) -> list:
    return [
        (n, float(t.double().sum()), tuple(t.shape)) for n, t in model.state_dict().items() if t.is_floating_point()
    ]


def check_calibrated(
    spec: str,
    calib_batch: int = 1,
    num_batches: int = 2,
    side: int = 64,
    ratio: float = 0.5,
    max_params: int = 150_000_000,
    seed: int = 0,
) -> dict:
    """Prune ``spec`` by the default path with ``num_batches`` calibration batches of
    ``calib_batch`` random inputs; the record of what happened (``status`` first)."""
    import torch
    from compat_sweep import error_text as _err
    from compat_sweep import sized

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rec: dict = {"model": spec, "calib_batch": calib_batch, "status": None, "error": ""}
    rec.update(params_before=None, params_after=None)
    t0 = time.time()
    if not sized(spec, max_params, rec):
        return rec
    n = rec["params_before"]
    try:
        model, size, x, ref = _built(spec, side, 2)
    except Exception as exc:
        rec.update(status="skipped-unsupported", error="unpruned forward: " + _err(exc))
        return rec
    rec["input"] = [calib_batch, *size]
    rec["calib_batches"] = num_batches
    from cleanai_core import StructuredPruner
    from cleanai_core.testing import run_model

    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(calib_batch, *size, generator=gen) for _ in range(num_batches)]
    before = _fingerprint(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pruner = StructuredPruner(model, batches[0][:2], pruning_ratio=ratio)  # traced on 2 inputs at most
        except Exception as exc:
            rec.update(status="fail-trace", error=_err(exc))
            return rec
        try:
            pruner.collect_activations(batches, progress=False)
        except Exception as exc:
            rec.update(status="fail-calibrate", error=_err(exc))
            return rec
        try:
            pruned = pruner.prune()
        except Exception as exc:
            rec.update(status="fail-prune", error=_err(exc))
            return rec
    rec["warnings"] = sorted({str(w.message)[:200] for w in caught})[:5]
    rec["params_after"] = sum(p.numel() for p in pruned.parameters())
    rec["skipped_groups"] = len(pruner.skipped_groups)
    try:
        got = run_model(pruned, x)
    except Exception as exc:
        rec.update(status="fail-forward", error=_err(exc))
        return rec
    rec["seconds"] = round(time.time() - t0, 1)
    shapes = [tuple(t.shape) for t in ref]
    if [tuple(t.shape) for t in got] != shapes:
        rec.update(status="fail-shape", error=f"{shapes} -> {[tuple(t.shape) for t in got]}")
        return rec
    finite = [bool(torch.isfinite(a).all()) for a in ref]
    if any(f and not bool(torch.isfinite(b).all()) for f, b in zip(finite, got, strict=True)):
        rec.update(
            status="fail-nonfinite", error="the pruned model's output has NaN/inf where the original's is finite"
        )
        return rec
    scale = max((float(a.abs().max()) for a in ref if a.numel()), default=0.0)
    rec["max_abs_change"] = max((float((a - b).abs().max()) for a, b in zip(ref, got, strict=True)), default=0.0)
    rec["output_scale"] = scale
    if _fingerprint(model) != before:
        rec.update(status="fail-modified", error="the user's model changed (parameters or buffers)")
        return rec
    if rec["params_after"] >= n:
        rec.update(status="fail-noprune", error="no parameter removed")
        return rec
    rec["status"] = "pass"
    return rec


def redraw_constants(model, seed: int = 1):
    """Redraw every parameter that starts constant (timm's temperatures at 1, biases at 0,
    layer scales at 1e-6) or near zero (EVA's classifier, started at 1e-3 of its scale: the
    logits were its bias whatever the input) so that the masking oracle has something to
    tell apart."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() <= 1 or not p.is_floating_point():
                continue
            if bool((p == p.flatten()[0]).all()) or (p.ndim >= 2 and float(p.abs().max()) < 1e-3):
                p.add_(torch.randn(p.shape, generator=gen).to(p) * 0.3)
    return model


def check_end_to_end(
    spec: str,
    calib_batch: int = 2,
    num_batches: int = 2,
    side: int = 64,
    ratio: float = 0.5,
    max_params: int = 150_000_000,
    seed: int = 0,
) -> dict:
    """What a model-sample battery checks, on ``spec`` with constant parameters redrawn:
    the masking oracle at ``ratio`` (``oracle`` / ``tol``), the default path with
    ``num_batches`` calibration batches (``kept``: parameters kept), ``save_pruned`` /
    ``load_pruned`` of that model (``reload_diff``), and ``magnitude`` (``kept_magnitude``).
    ``status`` names the first step that failed (``fail-oracle`` past the tolerance,
    ``fail-reload`` where the reloaded outputs differ)."""
    import tempfile

    import torch
    from compat_sweep import error_text as _err
    from compat_sweep import oracle_tolerance, sized

    from cleanai_core import StructuredPruner, load_pruned
    from cleanai_core.io import save_pruned
    from cleanai_core.testing import check_pruner, run_model

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rec: dict = {"model": spec, "status": None, "error": "", "params_before": None, "params_after": None}
    t0 = time.time()
    if not sized(spec, max_params, rec):
        return rec
    n = rec["params_before"]
    kwargs: dict = {}
    try:
        model, size, x, _ = _built(spec, side, calib_batch, kwargs)
        ref = run_model(redraw_constants(model), x)
    except Exception as exc:
        rec.update(status="skipped-unsupported", error="unpruned forward: " + _err(exc))
        return rec
    rec["input"] = [calib_batch, *size]
    rec["kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    step = "oracle"
    try:
        report = check_pruner(model, x, ratio=ratio)
        rec.update(oracle=report.max_abs_diff, tol=oracle_tolerance(ref), oracle_kept=report.params_after / n)
        step = "default path"
        gen = torch.Generator().manual_seed(seed)
        batches = [torch.randn(calib_batch, *size, generator=gen) for _ in range(num_batches)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruner = StructuredPruner(model, x, pruning_ratio=ratio)
            pruner.collect_activations(batches, progress=False)
            pruned = pruner.prune()
        rec["warnings"] = sorted({str(w.message)[:200] for w in caught})[:5]
        rec["skipped_groups"] = len(pruner.skipped_groups)
        rec["params_after"] = sum(p.numel() for p in pruned.parameters())
        rec["kept"] = round(rec["params_after"] / n, 4)
        got = run_model(pruned, x)
        if [a.shape for a in got] != [a.shape for a in ref]:
            rec.update(status="fail-shape", error=f"default path: {[tuple(a.shape) for a in got]}")
            return rec
        step = "save / reload"
        lib, name = spec.split(":", 1)
        options = {"num_classes": 10, **({"model_kwargs": rec["kwargs"]} if rec["kwargs"] else {})}
        source = ("timm:" if lib == "timm" else "torchvision:") + name
        with tempfile.TemporaryDirectory() as tmp:
            save_pruned(f"{tmp}/o", pruned, pruner.history, source, options)
            back = load_pruned(f"{tmp}/o", trust_code=bool(rec["kwargs"]))
        rec["reload_diff"] = max(float((a - b).abs().max()) for a, b in zip(run_model(back, x), got, strict=True))
        step = "magnitude"
        small = StructuredPruner(model, x, "magnitude", pruning_ratio=ratio).prune()
        rec["kept_magnitude"] = round(sum(p.numel() for p in small.parameters()) / n, 4)
        run_model(small, x)
    except Exception as exc:
        rec.update(status="fail-prune", error=f"{step}: " + _err(exc))
        return rec
    rec["seconds"] = round(time.time() - t0, 1)
    if not rec["oracle"] <= rec["tol"]:
        rec.update(status="fail-oracle", error=f"max |pruned - masked| = {rec['oracle']:.3g} > {rec['tol']:.3g}")
    elif rec["reload_diff"] != 0.0:
        rec.update(status="fail-reload", error=f"reloaded outputs differ by {rec['reload_diff']:.3g}")
    elif rec["params_after"] >= n:
        rec.update(status="fail-noprune", error="no parameter removed")
    else:
        rec["status"] = "pass"
    return rec


# ---------------------------------------------------------------------------
# The section of docs/compatibility.md
# ---------------------------------------------------------------------------
def render_calibrated(
    caches: dict[int, dict[str, dict]], doc: Path, sets: list[tuple[str, set[str]]], how: str
) -> None:
    """Write (or replace) the calibration section of ``doc`` from ``{batch: {model: rec}}``;
    the rest of the document stays as it is. ``sets`` are ``(title, models)`` rows of the
    summary; ``how`` says how the run was made."""
    from compat_sweep import CALIB_SECTION as SECTION
    from compat_sweep import _m, _short

    def summary(rows: list[dict]) -> str:
        counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        ran = [r for r in rows if not r["status"].startswith("skipped")]
        pct = f"{100 * counts['pass'] / len(ran):.1f}%" if ran else "-"
        cells = " | ".join(str(counts[s]) for s in STATUSES)
        return f"| {len(rows)} | {len(ran)} | {counts['pass']} | {pct} | {cells} |"

    lines = [
        SECTION,
        "",
        "Generated by `benchmarks/compat_sweep.py --calibrate N --calib-batch B` (do not edit by hand): the",
        "default user path, `StructuredPruner(model, example, pruning_ratio=0.5)` with every default (weight",
        "magnitude x activation importance, bias compensation, reconstruction, BatchNorm correction),",
        "`collect_activations` on N random batches of B inputs, `prune()`. A model passes when every step runs,",
        "the pruned model's output on a fresh batch has the original's shape and is finite where the",
        "original's is, parameters went down and the user's model is unchanged. Random weights, so the outputs'",
        "change says nothing about accuracy (see `docs/accuracy.md`).",
        "",
        how,
        "",
        "| set | batch " + "| models | ran | pass | pass % of ran | " + " | ".join(STATUSES) + " |",
        "|---|---" + "|---" * (4 + len(STATUSES)) + "|",
    ]
    for title, names in sets:
        for b, cache in sorted(caches.items()):
            rows = [r for m, r in cache.items() if m in names]
            if rows:
                lines.append(f"| {title} | {b} " + summary(rows))
    for b, cache in sorted(caches.items()):
        big = sorted(
            r["model"]
            for r in cache.values()
            if r["status"] == "pass" and r.get("max_abs_change", 0.0) > 10 * max(r.get("output_scale", 0.0), 1.0)
        )
        if big:
            shown = ", ".join(big[:12]) + (f" ... (+{len(big) - 12})" if len(big) > 12 else "")
            lines += ["", f"Batch {b}: {len(big)} passing models' outputs moved by more than 10x their scale: {shown}."]
    lines += ["", "Failures by cause:", ""]
    any_fail = False
    for b, cache in sorted(caches.items()):
        causes: dict[str, list[str]] = {}
        for r in sorted(cache.values(), key=lambda r: r["model"]):
            if r["status"] != "pass" and r["status"] != "skipped-too-big":
                causes.setdefault(f"{r['status']}: {_short(r.get('error', ''))}", []).append(r["model"])
        for key, models in sorted(causes.items(), key=lambda kv: -len(kv[1])):
            any_fail = True
            shown = ", ".join(models[:12]) + (f" ... (+{len(models) - 12})" if len(models) > 12 else "")
            lines.append(f"- batch {b}: **{len(models)}** {key.replace('|', '/')} - {shown}")
    if not any_fail:
        lines.append("- none (beside models over the parameter limit)")
    batches = sorted(caches)
    lines += [
        "",
        "| model | input | " + " | ".join(f"batch {b}" for b in batches) + " | params before | params after | note |",
        "|---|---|" + "---|" * len(batches) + "---|---|---|",
    ]
    names = sorted({m for c in caches.values() for m in c}, key=lambda m: (not m.startswith("tv:"), m))
    for m in names:
        recs = [caches[b].get(m) for b in batches]
        first = next(r for r in recs if r)
        size = "x".join(str(s) for s in (first.get("input") or [])[2:])
        notes = [
            f"B={b}: {r.get('error', '')}" for b, r in zip(batches, recs, strict=True) if r and r["status"] != "pass"
        ]
        note = "; ".join(notes).replace("|", "/").replace("\n", " ")[:300]
        cells = " | ".join(r["status"] if r else "" for r in recs)
        after = next((r.get("params_after") for r in recs if r and r.get("params_after")), None)
        lines.append(f"| {m} | {size} | {cells} | {_m(first.get('params_before'))} | {_m(after)} | {note} |")
    lines.append("")
    text = doc.read_text() if doc.exists() else "# Compatibility\n"
    start = text.find(SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + "\n".join(lines) + ("\n" + text[end + 1 :] if end >= 0 else "")  # a blank line ends it
    else:  # before the hand-written sections, after the oracle sweep's failures
        at = text.find("\n## Hugging Face")
        at = text.find("\n## Models") if at < 0 else at
        text = text + "\n" + "\n".join(lines) if at < 0 else text[: at + 1] + "\n".join(lines) + "\n" + text[at + 1 :]
    doc.write_text(text)
