"""Rendering a pruning report: ``report.json``, ``report.md`` and a plot.

The plot is ``report.png`` when matplotlib is installed (it is not a dependency) and
otherwise ``report.svg``, drawn here as plain SVG: channels per layer before and after
(bars) and the importance scores of each layer, pruned units in red, kept in blue.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any
from xml.sax.saxutils import escape

from cleanai_core.errors import UserError
from cleanai_core.io import atomic_write_files

__all__ = [
    "finite_or_none",
    "render_markdown",
    "render_sensitivity_svg",
    "render_svg",
    "report_json",
    "sensitivity_markdown",
    "write_report",
]

MAX_PLOT_LAYERS = 60
#: removed channels listed per layer in report.md
MAX_LISTED = 16


def finite_or_none(value: Any, found: dict[str, str] | None = None, path: str = "") -> Any:
    """``value`` with every NaN / inf float (in dicts and lists, at any depth) as ``None``;
    ``found`` collects where each was (``"perplexity_after": "inf"``). A numpy scalar or a
    0-d tensor (an evaluator plugin's ``np.float32`` accuracy) becomes a Python number:
    ``json``'s ``default=str`` wrote it as the text ``"0.85"`` / ``"tensor(0.8500)"``."""
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        value = value.item()
    if isinstance(value, dict):
        return {k: finite_or_none(v, found, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v, found, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found[path] = str(value)
        return None
    return value


def report_json(report: dict[str, Any]) -> str:
    """``report.json``'s text: strict JSON. A NaN or infinite number (a wrecked model's
    perplexity, a diverged loss, a sensitivity trial's KL) is written as ``null`` and named
    in ``non_finite`` (``{"perplexity_after": "inf"}``); ``json`` wrote ``Infinity`` /
    ``NaN``, which strict parsers (``jq``, JavaScript's ``JSON.parse``) refuse."""
    try:  # the usual report, all finite: written as it is (cleaning a 3M-score report first took 1.5 s)
        return json.dumps(report, indent=2, default=_json_value, allow_nan=False) + "\n"
    except ValueError:
        pass
    found: dict[str, str] = {}
    clean = finite_or_none(report, found)
    if found:
        clean["non_finite"] = found
    return json.dumps(clean, indent=2, default=str, allow_nan=False) + "\n"


def _json_value(value: Any) -> Any:
    """What ``json`` cannot write itself: a numpy scalar or 0-d tensor as its number, else its text."""
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        return value.item()
    return str(value)


def _code(name: Any) -> str:
    """``name`` as inline code in a Markdown table cell. A module name may hold any
    character but ``.`` (``nn.ModuleDict`` keys): a ``|`` split the row into more cells,
    a line break ended the table, a backtick ended the code span."""
    text = str(name).replace("|", "\\|").replace("\r", "\\r").replace("\n", "\\n")
    if "`" not in text:
        return f"`{text}`"
    return f"`` {text} ``"


def _svg_text(name: Any, last: int) -> str:
    """The last ``last`` characters of ``name`` as SVG text: escaped after it is cut (cutting
    ``&amp;`` left ``mp;``), control characters (not allowed in XML 1.0) as ``?``."""
    text = str(name)
    text = text if len(text) <= last else "..." + text[-(last - 3) :]
    return escape("".join("?" if ord(c) < 32 else c for c in text))


def _fmt_int(n: Any) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        # rounded up to the next unit (999,999 read "1000.00k"); below 1000 the exact count
        if abs(n) >= scale or (scale > 1e3 and abs(round(n / scale, 2)) >= 1):
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _pct(after: Any, before: Any) -> str:
    if not before or after is None:
        return ""
    return f" ({100.0 * (after - before) / before:+.1f}%)"


# (report key, how it reads in the notes line under the headline table)
_NOTES = (
    ("model", "Model `{}`"),
    # --model FOLDER: "before" is the folder's pruned model, not the architecture's original
    ("pruned_before_steps", "pruned before by CleanAI in {} step(s), which history.json holds with this run's"),
    ("pruning_ratio", "pruning ratio {}"),
    ("target_flops", "target FLOPs {}"),
    ("target_params", "target parameters {}"),
    ("target_latency", "target latency {}"),
    ("prune_dead_only", "dead units only (`prune_dead_only`)"),
    ("importance", "importance `{}`"),
    ("gradients", "scored with {}"),
    ("calibration_samples", "{} calibration samples"),
    ("scored_samples", "{} of them scored the channels"),
    ("evaluation_samples", "{} held-out evaluation samples"),
    ("accuracy_note", "accuracy not measured: {}"),
    ("metric_note", "{}"),  # what the evaluator's numbers measure (a masked LM's: the masked tokens)
)


def _ratio_note(report: dict[str, Any], note: str) -> str:
    """The pruning ratio's note, saying what it is a share of where units were ranked
    across groups: the units of all groups (or of each isomorphic set), not the parameters,
    which the cheapest units leave mostly in place."""
    ranking, before, after = report.get("ranking"), report.get("units_before"), report.get("units_after")
    if ranking not in ("global", "isomorphic") or not before or after is None:
        return note
    what = "all groups' units ranked together" if ranking == "global" else "the units of each isomorphic set"
    return (
        f"{note}: a share of {what}, not of the parameters ({before - after:,} of {before:,} units removed; "
        "for a share of the parameters give `target_params`)"
    )


def _batch(shape: Any) -> int | None:
    """The first size the input's tensors share (their batch), ``None`` where they do not."""
    shapes = list(shape.values()) if isinstance(shape, dict) else [shape]
    if not shapes or not all(isinstance(s, list) and len(s) >= 2 for s in shapes):
        return None
    firsts = {s[0] for s in shapes}
    return firsts.pop() if len(firsts) == 1 else None


def _measured_on(shape: Any) -> str:
    """What FLOPs are counted on: one input (a report without ``input_shape`` too), or the
    library's example batch."""
    if not shape or _batch(shape) == 1:
        return "1 input"
    return f"batch of {_batch(shape)}" if _batch(shape) else "the example input"


def _headline_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = [
        (
            "Parameters",
            _fmt_int(report.get("params_before")),
            _fmt_int(report.get("params_after")),
            _pct(report.get("params_after"), report.get("params_before")).strip(" ()"),
        ),
        (
            f"FLOPs ({_measured_on(report.get('input_shape'))})",
            _fmt_int(report.get("flops_before")),
            _fmt_int(report.get("flops_after")),
            _pct(report.get("flops_after"), report.get("flops_before")).strip(" ()"),
        ),
    ]
    lb, la = report.get("latency_before_ms"), report.get("latency_after_ms")
    if lb is not None and la is not None:
        rows.append(("Latency, CPU (ms)", f"{lb:.3f}", f"{la:.3f}", _pct(la, lb).strip(" ()")))
    pb, pa = report.get("perplexity_before"), report.get("perplexity_after")
    if pb is not None and pa is not None:
        rows.append(("Perplexity (held-out)", f"{pb:.3f}", f"{pa:.3f}", _pct(pa, pb).strip(" ()")))
    mb, ma = report.get("mse_before"), report.get("mse_after")
    if mb is not None and ma is not None:  # a regression head
        rows.append(("Mean squared error (held-out)", f"{mb:.4g}", f"{ma:.4g}", _pct(ma, mb).strip(" ()")))
    eb, ea = report.get("error_rate_before"), report.get("error_rate_after")
    if eb is not None and ea is not None:  # a CTC speech recogniser
        rows.append(
            ("Token error rate (held-out)", f"{100 * eb:.2f}%", f"{100 * ea:.2f}%", f"{100 * (ea - eb):+.2f} pt")
        )
    ab, aa = report.get("accuracy_before"), report.get("accuracy_after")
    if ab is not None and aa is not None:
        rows.append(("Accuracy (held-out)", f"{100 * ab:.2f}%", f"{100 * aa:.2f}%", f"{100 * (aa - ab):+.2f} pt"))
    return rows


def headline_text(report: dict[str, Any]) -> str:
    """A few plain-text lines with the headline numbers (for the terminal)."""
    rows = _headline_rows(report)
    width = max(len(r[0]) for r in rows)
    text = "\n".join(f"{name:<{width}}  {b:>10} -> {a:<10} {c}".rstrip() for name, b, a, c in rows)
    if report.get("attention_heads"):
        text += "\n" + heads_summary(report["attention_heads"])
    if report.get("recovery"):
        from cleanai_core.recovery_report import recovery_summary

        text += "\n" + recovery_summary(report["recovery"])
    return text


def render_markdown(report: dict[str, Any], extra_sections: list[tuple[str, str]] = ()) -> str:
    lines = ["# CleanAI pruning report", ""]
    lines += ["| | before | after | change |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {b} | {a} | {c} |" for n, b, a, c in _headline_rows(report)]
    lines.append("")
    notes = [
        template.format(report[key])
        for key, template in _NOTES
        if report.get(key) is not None
        and (report.get(key) or key not in ("model", "importance", "prune_dead_only"))
        and (key != "scored_samples" or report[key] != report.get("calibration_samples"))
    ]
    ratio = f"pruning ratio {report.get('pruning_ratio')}"
    if report.get("layer_ratios"):  # the ratio then holds for the layers not named only
        notes = [f"{n} for the other layers" if n == ratio else n for n in notes]
        notes.insert(1 if report.get("model") else 0, _layer_ratio_note(report["layer_ratios"]))
    notes = [_ratio_note(report, n) if n in (ratio, f"{ratio} for the other layers") else n for n in notes]
    shape = report.get("input_shape")
    if shape:
        text = ", ".join(f"`{k}` {v}" for k, v in shape.items()) if isinstance(shape, dict) else str(shape)
        what = "FLOPs and latency" if report.get("latency") else "FLOPs"
        notes.append(f"{what} of {'one input' if _batch(shape) == 1 else 'the example input'} of shape {text}")
    lat = report.get("latency")
    if lat:
        how = f"{lat['method']}, " if lat.get("method") else ""
        notes.append(
            f"latency: {how}{lat.get('repeats')} timed runs per model, batch size {lat.get('batch_size')}, "
            f"{lat.get('threads')} CPU thread(s)"
        )
    if notes:
        lines += ["; ".join(notes) + ".", ""]
    layers = report.get("layers") or []
    lines += [
        "## Layers",
        "",
        "Removed channels with their importance scores, next to the range of the kept ones' scores "
        f"(at most {MAX_LISTED} listed per layer; all are in `report.json`).",
        "",
        "| layer | channels before | after | pruned | removed: index (score) | kept scores |",
        "|---|---:|---:|---:|---|---|",
    ]
    if report.get("pruned_before_steps"):  # --model FOLDER
        lines[-4:-2] = [
            "Removed channels by their index in the original model (before the folder's own "
            f"{report['pruned_before_steps']} step(s)), with their importance scores; channel counts are those of "
            f"the folder's model (at most {MAX_LISTED} listed per layer; all are in `report.json`, where "
            "`pruned_indices` index the folder's model and `original_indices` the original).",
            "",
        ]
    elif any(layer.get("step") for layer in layers):
        lines[-4:-2] = [
            "Iterative pruning: one row per layer and step, channel counts of that step's model; removed "
            "channels by their index in the original model, with the score they had at that step "
            f"(at most {MAX_LISTED} listed per layer; all are in `report.json`, where `pruned_indices` "
            "index the step's own model and `original_indices` the original).",
            "",
        ]
    for layer in layers:
        b, a = layer.get("channels_before"), layer.get("channels_after")
        step = f" (step {layer['step']})" if layer.get("step") else ""
        lines.append(
            f"| {_code(layer.get('name'))}{step} | {b} | {a} | {(b or 0) - (a or 0)}{_units(layer)} "
            f"| {_removed(layer)} | {_kept_range(layer)} |"
        )
    lines.append("")
    lines += _head_lines(report.get("attention_heads"), bool(report.get("pruned_before_steps")))
    lines += _skipped_lines(report.get("skipped_groups"))
    lines += _kept_lines(report.get("kept_groups"))
    lines += _dead_unit_lines(report.get("dead_units"))
    lines += _sensitivity_lines(report.get("sensitivity"), report.get("allocation"))
    for title, body in extra_sections:
        lines += [f"## {title}", "", body.rstrip(), ""]
    return "\n".join(lines)


def _head_lines(attention: list[dict[str, Any]] | None, folder: bool = False) -> list[str]:
    """The attention heads: query and key/value heads before -> after per attention module,
    the head size, and the heads removed with their scores (``report.json``'s
    ``attention_heads``). A GQA Llama's rows read "q_proj 2 -> 1 units" and nothing said heads."""
    if not attention:
        return []
    which = "the folder's model" if folder else "the model before pruning"
    lines = [
        "## Attention heads",
        "",
        f"Query and key/value heads per attention module; removed heads by their index in {which}, with their "
        "score (the score of the unit they went with: the head, or its key/value group where whole groups go, "
        f"which its query heads share; at most {MAX_LISTED} listed).",
        "",
        "| attention | query heads | key/value heads | head size | removed query heads: index (score) "
        "| removed key/value heads |",
        "|---|---:|---:|---:|---|---|",
    ]
    lines[2] = f"{heads_summary(attention)}. {lines[2]}"
    for a in attention:
        q, kv = a["query_heads"], a.get("kv_heads")
        size = (
            f"{q['head_dim_before']}"
            if q["head_dim_after"] == q["head_dim_before"]
            else (f"{q['head_dim_before']} -> {q['head_dim_after'] if q['head_dim_after'] is not None else 'mixed'}")
        )
        kv_cell = f"{kv['before']} -> {kv['after']}" if kv else "n/a"
        lines.append(
            f"| {_code(a['module'])} | {q['before']} -> {q['after']} | {kv_cell} | {size} "
            f"| {_heads_removed(q)} | {_heads_removed(kv) if kv else '-'} |"
        )
    return lines + [""]


def heads_summary(attention: list[dict[str, Any]]) -> str:
    """One line: the query and key/value heads of all attention modules, before -> after."""
    total = lambda kind, when: sum((a[kind] or {}).get(when, 0) for a in attention)  # noqa: E731
    kv = (
        f", {total('kv_heads', 'before')} -> {total('kv_heads', 'after')} key/value"
        if any(a["kv_heads"] for a in attention)
        else ""
    )
    return (
        f"Attention heads: {total('query_heads', 'before')} -> {total('query_heads', 'after')} query{kv} "
        f"({len(attention)} attention module{'s' if len(attention) != 1 else ''})"
    )


def _heads_removed(part: dict[str, Any]) -> str:
    idx, scores = part.get("pruned") or [], part.get("pruned_scores") or []
    if not idx:
        return "-"
    cells = [f"{h} ({s:.3g})" if s is not None else str(h) for h, s in zip(idx[:MAX_LISTED], scores, strict=False)]
    return ", ".join(cells) + (f", ... +{len(idx) - MAX_LISTED}" if len(idx) > MAX_LISTED else "")


def _units(layer: dict[str, Any]) -> str:
    """The pruned column's " (2 of 4 units of 48)" where several channels are one unit (attention heads)."""
    ub, ua = layer.get("units_before"), layer.get("units_after")
    if not ub or ua is None:
        return ""
    width = layer.get("channels_per_unit")
    return f" ({ub - ua} of {ub} units" + (f" of {width})" if width else ")")


def _removed(layer: dict[str, Any]) -> str:
    idx = layer.get("pruned_indices") or []
    if not idx:
        return "-"
    if layer.get("original_indices"):
        idx = layer["original_indices"]
    pruned = _raw_scores(layer)[0]
    cells = [
        f"{i} ({pruned[k]:.3g})" if k < len(pruned) and pruned[k] is not None else str(i)
        for k, i in enumerate(idx[:MAX_LISTED])
    ]
    return ", ".join(cells) + (f", ... +{len(idx) - MAX_LISTED}" if len(idx) > MAX_LISTED else "")


def _kept_range(layer: dict[str, Any]) -> str:
    raw = _raw_scores(layer)[1]
    _, kept = _scores(layer)
    if not kept:
        return "not scored" if raw else "-"
    return f"{min(kept):.3g} - {max(kept):.3g}" + (" (some not scored)" if len(kept) < len(raw) else "")


def _layer_ratio_note(ratios: dict[str, float]) -> str:
    """The note naming the per-layer ratios (at most :data:`MAX_LISTED`; all in ``report.json``)."""
    listed = ", ".join(f"{_code(name)} {r:g}" for name, r in list(ratios.items())[:MAX_LISTED])
    more = f", ... +{len(ratios) - MAX_LISTED} (all in `report.json`)" if len(ratios) > MAX_LISTED else ""
    return f"per-layer ratios: {listed}{more}"


def _skipped_lines(skipped: list[str] | None) -> list[str]:
    """The groups the plan chose that were kept whole because pruning them broke the model
    (in ``report.json`` only: a layer the plan cut by half read "0 pruned" with no reason)."""
    if not skipped:
        return []
    lines = [
        "## Skipped groups",
        "",
        f"{len(skipped)} planned group(s) were kept whole because pruning them broke the model; the other groups "
        "were pruned. `--ignore` (`ignored_layers`) their layers to plan without them, and please report the model.",
        "",
    ]
    return lines + [f"- {message.replace(chr(10), ' ')}" for message in skipped] + [""]


def _kept_lines(kept: list[dict[str, Any]] | None) -> list[str]:
    """The groups no unit of which could go, with the reasons (in ``report.json`` only, a BERT's
    attention heads, kept so that ``from_pretrained`` rebuilds the model, showed nowhere)."""
    if not kept:
        return []
    lines = ["## Groups kept whole", "", "No unit of these groups could be pruned:", ""]
    for g in kept:
        names = ", ".join(_code(m) for m in g["modules"][:4]) + (", ..." if len(g["modules"]) > 4 else "")
        why = "; ".join(w.replace(chr(10), " ") for w in g["why"]) or "no reason recorded"
        lines.append(f"- group {g['group']} ({g['units']} units: {names}): {why}")
    return lines + [""]


def _dead_unit_lines(findings: list[dict[str, Any]] | None) -> list[str]:
    if findings is None:
        return []
    lines = ["## Dead and redundant units", ""]
    if not findings:
        return lines + ["No consumer saw a dead, constant or near-duplicate input channel on the calibration data.", ""]
    lines += [
        "Channels at each layer's input that never activated (dead), took one value (constant) or were "
        "near-duplicates of another (correlation >= 0.99) on the calibration data. "
        "`prune_dead_only=True` (`--prune-dead-only`) removes exactly the dead ones.",
        "",
        "| layer input | channels | dead | constant | near-duplicate pairs |",
        "|---|---:|---|---|---|",
    ]
    for f in findings:
        pairs = ", ".join(f"{i}~{j} ({c:.3f})" for i, j, c in f.get("duplicates", [])[:5])
        n = f.get("duplicate_pairs", 0)
        pairs = f"{n}: {pairs}" + (", ..." if n > 5 else "") if n else "-"
        lines.append(
            f"| {_code(f['layer'])} | {f['channels']} | {_listed(f['dead'])} | {_listed(f['constant'])} | {pairs} |"
        )
    return lines + [""]


def _listed(idx: list[int]) -> str:
    if not idx:
        return "-"
    text = ", ".join(map(str, idx[:MAX_LISTED]))
    return f"{len(idx)}: {text}" + (", ..." if len(idx) > MAX_LISTED else "")


def sensitivity_markdown(report: dict[str, Any]) -> str:
    """The report of ``cleanai sensitivity``: what was analysed, then the sensitivity section."""
    lines = ["# CleanAI sensitivity report", ""]
    lines += [f"model: `{report['model']}`; data: `{report['data']}`; nothing was pruned.", ""]
    return "\n".join(lines + _sensitivity_lines(report["sensitivity"]))


def _sensitivity_lines(sens: dict[str, Any] | None, alloc: dict[str, Any] | None = None) -> list[str]:
    if not sens:
        return []
    ratios = sens["ratios"]
    lines = [
        "## Sensitivity",
        "",
        f"Each group pruned alone at each ratio, measured on {sens['samples']} samples "
        f"({sens['seconds']} s): mean KL divergence of the output distribution from the original's "
        "(0 = unchanged), most sensitive first"
        + (", with accuracy in brackets." if sens.get("base_accuracy") else "."),
        "",
        "![sensitivity curves](sensitivity.svg)",
        "",
        "| group (layer) | units | " + " | ".join(f"{r:g}" for r in ratios) + " |",
        "|---|---:|" + "---:|" * len(ratios),
    ]
    for g in sens["groups"]:
        cells = []
        for r in ratios:
            k = g["ratios"].index(r) if r in g["ratios"] else None
            if k is None:
                cells.append("n/a")
                continue
            acc = g["accuracy"][k]
            cells.append(f"{g['kl'][k]:.3g}" + (f" ({acc:.1f}%)" if acc is not None else ""))
        lines.append(f"| {_code(g['layer'] or g['modules'][0])} | {g['size']} | " + " | ".join(cells) + " |")
    lines.append("")
    if alloc:
        losses = ", ".join(f"{name} {kl:.3g}" for name, kl in sorted(alloc["kl"].items(), key=lambda kv: kv[1]))
        lines += [
            f"Automatic ratios (`--auto`): the **{alloc['method']}** allocation, keeping {alloc['cost']:.3f} of the "
            f"{alloc['target']}; mean KL of each candidate on the sensitivity batches: {losses} (the curves' "
            "allocation unless another is lower beyond two standard errors and no less accurate).",
            "",
            "| layer | ratio |",
            "|---|---:|",
            *[f"| {_code(name)} | {r:.2f} |" for name, r in alloc["layer_ratios"].items()],
            "",
        ]
    return lines


def _raw_scores(layer: dict[str, Any]) -> tuple[list[float | None], list[float | None]]:
    """The scores as recorded: ``None`` for a unit that was never scored (no group in the plan)."""
    s = layer.get("importance_scores") or {}
    as_float = lambda vs: [None if v is None else float(v) for v in vs or []]  # noqa: E731
    return as_float(s.get("pruned")), as_float(s.get("kept"))


def _scores(layer: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The scores of the scored units (pruned, kept)."""
    pruned, kept = _raw_scores(layer)
    return [v for v in pruned if v is not None], [v for v in kept if v is not None]


def render_svg(report: dict[str, Any]) -> str:
    """Channels per layer (before: grey, after: blue) and per-layer score strips
    (scores min-max scaled per layer; pruned red, kept blue)."""
    layers = (report.get("layers") or [])[:MAX_PLOT_LAYERS]
    row, label_w, bar_w, gap, strip_w = 16, 220, 300, 40, 300
    top = 50
    height = top + row * max(len(layers), 1) + 40
    width = label_w + bar_w + gap + strip_w + 20
    max_c = max([layer.get("channels_before") or 0 for layer in layers] + [1])
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{label_w}" y="20" font-size="13">Channels per layer (grey: before, blue: after)</text>',
        f'<text x="{label_w + bar_w + gap}" y="20" font-size="13">Importance scores (red: pruned, blue: kept)</text>',
        f'<text x="{label_w + bar_w + gap}" y="36" fill="#555">scaled per layer, low to high</text>',
    ]
    for i, layer in enumerate(layers):
        y = top + i * row
        # an iterative run has a row per layer and step: without the step, two rows read "conv1" (8/16, 4/8)
        step = f" (step {layer['step']})" if layer.get("step") else ""
        name = _svg_text(layer.get("name"), 34 - len(step)) + step
        b, a = layer.get("channels_before") or 0, layer.get("channels_after") or 0
        out.append(f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end">{name}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 2}" width="{bar_w * b / max_c:.1f}" height="12" fill="#cccccc"/>')
        out.append(f'<rect x="{label_w}" y="{y + 2}" width="{bar_w * a / max_c:.1f}" height="12" fill="#3b75af"/>')
        out.append(f'<text x="{label_w + bar_w * b / max_c + 3:.1f}" y="{y + 11}" fill="#333">{a}/{b}</text>')
        pruned, kept = _scores(layer)
        allv = pruned + kept
        if allv:
            lo, hi = min(allv), max(allv)
            span = (hi - lo) or 1.0
            x0 = label_w + bar_w + gap
            out.append(f'<line x1="{x0}" x2="{x0 + strip_w}" y1="{y + 8}" y2="{y + 8}" stroke="#eee"/>')
            for vals, color in ((kept, "#3b75af"), (pruned, "#d62728")):
                for v in vals:
                    out.append(
                        f'<line x1="{x0 + strip_w * (v - lo) / span:.1f}" x2="{x0 + strip_w * (v - lo) / span:.1f}" '
                        f'y1="{y + 3}" y2="{y + 13}" stroke="{color}" stroke-opacity="0.6"/>'
                    )
    if len(report.get("layers") or []) > MAX_PLOT_LAYERS:
        out.append(
            f'<text x="{label_w}" y="{height - 12}" fill="#555">first {MAX_PLOT_LAYERS} of '
            f"{len(report['layers'])} layers shown; all are in report.json</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def render_sensitivity_svg(sens: dict[str, Any], max_curves: int = 12) -> str:
    """Fidelity loss (mean KL) against ratio, one line per group, the most sensitive
    ``max_curves`` labelled at their end (the rest drawn grey)."""
    groups = sens["groups"]
    w, h, left, top, right, bottom = 640, 400, 60, 30, 200, 40
    xmax = max([r for g in groups for r in g["ratios"]] + [1e-9])
    ymax = max([k for g in groups for k in g["kl"]] + [1e-12])
    px = lambda r: left + (w - left - right) * r / xmax
    py = lambda k: top + (h - top - bottom) * (1 - k / ymax)
    palette = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{left}" y="18" font-size="13">Sensitivity: mean KL to the original output vs ratio pruned</text>',
        f'<line x1="{left}" y1="{py(0)}" x2="{px(xmax)}" y2="{py(0)}" stroke="#333"/>',
        f'<line x1="{left}" y1="{py(0)}" x2="{left}" y2="{py(ymax)}" stroke="#333"/>',
        f'<text x="{left - 4}" y="{py(ymax) + 4}" text-anchor="end">{ymax:.3g}</text>',
        f'<text x="{left - 4}" y="{py(0) + 4}" text-anchor="end">0</text>',
    ]
    for r in sorted({r for g in groups for r in g["ratios"]}):
        out.append(f'<text x="{px(r):.1f}" y="{py(0) + 16}" text-anchor="middle">{r:g}</text>')
    for rank, g in reversed(list(enumerate(groups))):
        pts = " ".join(f"{px(r):.1f},{py(k):.1f}" for r, k in zip(g["ratios"], g["kl"], strict=True))
        color = palette[rank % len(palette)] if rank < max_curves else "#cccccc"
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if rank < max_curves:
            name = _svg_text(g["layer"] or g["modules"][0], 28)
            out.append(f'<text x="{w - right + 8}" y="{top + 14 * rank + 10}" fill="{color}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _render_png(report: dict[str, Any]) -> bytes | None:
    """The plot as PNG bytes, ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    layers = (report.get("layers") or [])[:MAX_PLOT_LAYERS]
    n = max(len(layers), 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 1 + 0.25 * n), sharey=True)
    names = [str(layer.get("name")) for layer in layers]
    ys = list(range(len(layers)))
    ax1.barh(ys, [layer.get("channels_before") or 0 for layer in layers], color="#cccccc", label="before")
    ax1.barh(ys, [layer.get("channels_after") or 0 for layer in layers], color="#3b75af", label="after")
    ax1.set_yticks(ys, names, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel("channels")
    ax1.legend()
    for y, layer in zip(ys, layers, strict=True):
        pruned, kept = _scores(layer)
        allv = pruned + kept
        if not allv:
            continue
        lo, hi = min(allv), max(allv)
        span = (hi - lo) or 1.0
        ax2.scatter([(v - lo) / span for v in kept], [y] * len(kept), s=4, color="#3b75af")
        ax2.scatter([(v - lo) / span for v in pruned], [y] * len(pruned), s=4, color="#d62728")
    ax2.set_xlabel("importance (scaled per layer); red pruned, blue kept")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(out_dir: str | os.PathLike, report: dict[str, Any]) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the plot into ``out_dir`` (an existing
    folder), as one: everything is rendered first and the files replace the old ones
    together (:func:`~cleanai_core.io.atomic_write_files`), so a failure leaves the
    previous report whole. Extra Markdown sections come from the ``cleanai_report_sections``
    hook. Returns the report with a ``"plot"`` entry naming the plot file."""
    from cleanai_core.plugins import get_plugin_manager

    if not isinstance(report, Mapping):  # write_report(out, None): "TypeError: 'NoneType' object is not iterable"
        raise UserError(
            f"write_report needs the report as a dict (pruner.report() after prune()), got {type(report).__name__}; "
            "nothing was written"
        )
    report = dict(report)
    files: dict[str, bytes] = {}
    png = _render_png(report)
    report["plot"] = "report.png" if png is not None else "report.svg"
    files[report["plot"]] = png if png is not None else render_svg(report).encode("utf-8")
    if report.get("sensitivity"):
        files["sensitivity.svg"] = render_sensitivity_svg(report["sensitivity"]).encode("utf-8")
    sections: list[tuple[str, str]] = []
    if report.get("recovery"):
        from cleanai_core.recovery_report import recovery_markdown, recovery_plot

        name, data = recovery_plot(report["recovery"])
        report["recovery_plot"], files[name] = name, data
        sections.append(("Recovery", recovery_markdown(report["recovery"], report["recovery_plot"])))
    for result in get_plugin_manager().hook.cleanai_report_sections(report=dict(report)):
        sections.extend(result or [])
    files["report.json"] = report_json(report).encode("utf-8")
    files["report.md"] = render_markdown(report, sections).encode("utf-8")
    atomic_write_files(out_dir, files, "the report")
    return report
