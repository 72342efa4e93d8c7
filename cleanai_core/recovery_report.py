"""The report's recovery story: Markdown section and a plot of the held-out metric per
epoch (``recovery.png`` with matplotlib, else ``recovery.svg`` drawn here), for the
``"recovery"`` entry that ``cleanai prune --recover-epochs`` adds to the report."""

from __future__ import annotations

import io
import math
from typing import Any

__all__ = ["recovery_markdown", "recovery_plot", "recovery_summary"]


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _no_accuracy(rec: dict[str, Any]) -> bool:
    return all(rec.get(k) is None for k in ("accuracy_original", "accuracy_pruned", "accuracy_recovered"))


#: how the report's own figures read, by ``evaluation_metric``
_EVALUATED = {"perplexity": "perplexity", "mse": "mean squared error", "error_rate": "token error rate"}


def _evaluated(rec: dict[str, Any]) -> str | None:
    """The report's held-out figure the entry gives for the three models, where it is not
    accuracy (a language model's perplexity, a regression's mean squared error, ...)."""
    name = rec.get("evaluation_metric")
    return name if name in _EVALUATED else None


def _fig(rec: dict[str, Any], value: Any) -> str:
    if value is None:
        return "n/a"
    metric = rec.get("evaluation_metric")  # as the report's headline rows write them
    if metric == "error_rate":
        return f"{100 * value:.2f}%"
    return f"{value:.3f}" if metric == "perplexity" else f"{value:.4g}"


def _gap_text(rec: dict[str, Any], sentence: bool = False) -> str:
    gap = rec.get("gap_recovered")
    if gap is None:
        return ""
    what = "accuracy" if _evaluated(rec) is None else _EVALUATED[_evaluated(rec)]
    if sentence:
        return f"Fraction of the {what} gap recovered: **{100 * gap:.1f}%**."
    return f", {100 * gap:.0f}% of the gap recovered"


def recovery_summary(rec: dict[str, Any]) -> str:
    """One line for the terminal."""
    stop = "; stopped at a NaN/inf training loss: lower --recover-lr" if rec.get("diverged") else ""
    if _evaluated(rec):  # the report's held-out figure, as its headline gives it (not the early-stopping split's)
        return (
            f"Recovery: held-out {_EVALUATED[_evaluated(rec)]} {_fig(rec, rec.get('evaluation_original'))} original, "
            f"{_fig(rec, rec.get('evaluation_pruned'))} pruned, {_fig(rec, rec.get('evaluation_recovered'))} "
            f"recovered{_gap_text(rec)} ({_epochs(rec)}, {rec['seconds']:.1f} s{stop})"
        )
    if _no_accuracy(rec):
        return (
            f"Recovery: held-out {rec['metric']} {_num(rec['initial']) or 'NaN/inf'} -> "
            f"{_num(rec['best']) or 'NaN/inf'} "
            f"({_epochs(rec)}, {rec['seconds']:.1f} s{stop})"
        )
    return (
        f"Recovery: accuracy {_pct(rec.get('accuracy_original'))} original, {_pct(rec.get('accuracy_pruned'))} "
        f"pruned, {_pct(rec.get('accuracy_recovered'))} recovered{_gap_text(rec)} ({_epochs(rec)}, "
        f"{rec['seconds']:.1f} s{stop})"
    )


def _epochs(rec: dict[str, Any]) -> str:
    return f"{rec['epochs']} epoch{'' if rec['epochs'] == 1 else 's'}"


def _num(value: float | None) -> str:
    """Four decimals; empty for a missing value, ``nan`` / ``inf`` for a diverged one
    (the report's JSON holds those as ``null``)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) and value == value else ""


def _values(rec: dict[str, Any]) -> list[float]:
    """The plotted metric: epoch 0 then each epoch, ``None`` (a diverged epoch) as NaN."""
    return [math.nan if v is None else float(v) for v in [rec["initial"], *rec["history"]]]


def recovery_markdown(rec: dict[str, Any], plot: str | None) -> str:
    metric = rec["metric"]
    lines = [
        "| | held-out accuracy |",
        "|---|---:|",
        f"| original | {_pct(rec.get('accuracy_original'))} |",
        f"| right after pruning | {_pct(rec.get('accuracy_pruned'))} |",
        f"| after recovery | {_pct(rec.get('accuracy_recovered'))} |",
        "",
    ]
    if _evaluated(rec):
        lines = [
            f"| | held-out {_EVALUATED[_evaluated(rec)]} |",
            "|---|---:|",
            f"| original | {_fig(rec, rec.get('evaluation_original'))} |",
            f"| right after pruning | {_fig(rec, rec.get('evaluation_pruned'))} |",
            f"| after recovery | {_fig(rec, rec.get('evaluation_recovered'))} |",
            "",
        ]
    elif _no_accuracy(rec):
        lines = ["The data has no labels, so accuracy is not measured; the metric below is from training.", ""]
    if rec.get("gap_recovered") is not None:
        lines.append(_gap_text(rec, sentence=True))
    lines += [
        f"Distillation from the original model for {_epochs(rec)} in {rec['seconds']:.1f} s"
        + (
            " (stopped: the training loss became NaN or inf, a learning rate too high or NaN/inf in the training "
            "data; the best epoch's weights are kept)"
            if rec.get("diverged")
            else " (stopped early: no better held-out result for the patience window)"
            if rec.get("stopped_early")
            else ""
        )
        + f"; best epoch {rec['best_epoch']} (0 = the pruned model itself). Training data: {rec['training_data']}.",
        "",
        f"| epoch | training loss | {metric} on the training data's held-out part | held-out loss (breaks ties) |",
        "|---:|---:|---:|---:|",
        f"| 0 | | {_num(rec['initial'])} | {_num(rec.get('initial_loss'))} |",
    ]
    held_losses = list(rec.get("held_out_loss") or []) + [None] * len(rec["history"])
    lines += [
        f"| {k} | {_num(loss) or 'NaN/inf'} | {_num(v) or 'NaN/inf'} | {_num(held)} |"
        for k, (loss, v, held) in enumerate(zip(rec["train_loss"], rec["history"], held_losses, strict=False), start=1)
    ]
    if plot:
        lines += ["", f"![held-out {metric} per epoch]({plot})"]
    return "\n".join(lines)


def _svg(rec: dict[str, Any]) -> str:
    values = _values(rec)
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    w, h, left, top, bottom = 480, 260, 60, 30, 40
    lo, hi = min(finite), max(finite)
    span = (hi - lo) or 1.0
    n = max(len(values) - 1, 1)
    at = {  # epochs whose value is finite (a diverged one is left out, not drawn at "nan")
        k: (left + (w - left - 20) * k / n, top + (h - top - bottom) * (1 - (v - lo) / span))
        for k, v in enumerate(values)
        if math.isfinite(v)
    }
    pts = list(at.values())
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{left}" y="18" font-size="13">Held-out {rec["metric"]} per epoch (0 = right after pruning)</text>',
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{h - bottom}" stroke="#999"/>',
        f'<line x1="{left}" x2="{w - 20}" y1="{h - bottom}" y2="{h - bottom}" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{hi:.4g}</text>',
        f'<text x="{left - 4}" y="{h - bottom}" text-anchor="end">{lo:.4g}</text>',
        f'<text x="{(w + left) / 2}" y="{h - 10}" text-anchor="middle">epoch</text>',
        f'<polyline points="{path}" fill="none" stroke="#3b75af" stroke-width="2"/>',
    ]
    out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#3b75af"/>' for x, y in pts]
    if rec["best_epoch"] in at:
        bx, by = at[rec["best_epoch"]]
        out.append(f'<circle cx="{bx:.1f}" cy="{by:.1f}" r="5" fill="none" stroke="#d62728" stroke-width="2"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def recovery_plot(rec: dict[str, Any]) -> tuple[str, bytes]:
    """The plot's file name and content: ``recovery.png`` with matplotlib, else ``recovery.svg``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "recovery.svg", _svg(rec).encode("utf-8")
    values = _values(rec)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(len(values)), values, marker="o", color="#3b75af")
    ax.plot([rec["best_epoch"]], [values[rec["best_epoch"]]], marker="o", ms=12, mfc="none", color="#d62728")
    ax.set_xlabel("epoch (0 = right after pruning)")
    ax.set_ylabel(f"held-out {rec['metric']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "recovery.png", buf.getvalue()
