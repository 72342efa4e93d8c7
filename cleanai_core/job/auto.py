"""``cleanai prune --sensitivity`` / ``--auto``: the sensitivity analysis and, for
``--auto``, the per-layer ratios it allocates to the target, set on the pruner;
``cleanai sensitivity``: the analysis alone, written by :func:`write_analysis`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["sensitivity_and_ratios", "write_analysis"]

log = logging.getLogger("cleanai")


def sensitivity_and_ratios(cfg: dict[str, Any], pruner: Any, data: Any, progress: bool = True) -> dict[str, Any]:
    """Analyse ``pruner``'s groups on ``data``; with ``cfg["auto"]`` set the allocated
    per-layer ratios on ``pruner``. Returns the report entries (``sensitivity``, and
    ``allocation`` with ``--auto``)."""
    from cleanai_core.sensitivity import allocate_ratios, analyse_sensitivity

    result = analyse_sensitivity(pruner, data, ratios=cfg["sensitivity_ratios"], progress=progress)
    out: dict[str, Any] = {"sensitivity": result.to_json()}
    top = ", ".join(f"{c.layer or c.modules[0]} ({c.mean_kl:.3g})" for c in result.ranked()[:3])
    log.info(f"sensitivity: {len(result.curves)} groups in {result.seconds:.1f} s; most sensitive: {top}")
    if cfg.get("auto"):
        from cleanai_core import distributed
        from cleanai_core.metrics import measure_latency

        repeats = int(cfg.get("latency_repeats") or 20)
        alloc = distributed.collectively(
            lambda: allocate_ratios(
                pruner,
                result,
                target_flops=cfg.get("target_flops"),
                target_params=cfg.get("target_params"),
                target_latency=cfg.get("target_latency"),
                latency_measure=lambda m: measure_latency(
                    m, pruner.example_inputs, repeats=repeats, forward_fn=pruner.forward_fn
                ),  # fmt: skip
            ),
            "the --auto allocation",
        )
        # every rank prunes as rank 0 allocated: measured latencies differ between ranks, and ranks that
        # chose differently stopped with "the ranks computed different pruning plans"
        alloc = distributed.from_writer(alloc)
        ratios = dict(cfg.get("layer_ratio") or {})  # the user's own layer ratios come first, and win
        for name, r in alloc.layer_ratios.items():
            ratios.setdefault(name, r)
        pruner.set_layer_ratios(ratios)
        if alloc.others is not None:  # the groups no layer names (a fused MoE module's experts)
            pruner.pruning_ratio = alloc.others
        out["allocation"] = alloc.to_json()
        log.info(f"auto ratios: {alloc.method} allocation keeps {alloc.cost:.3f} of the {alloc.target}")
    return out


def write_analysis(
    cfg: dict[str, Any], out: Path, at_commit: tuple[Any, Any], report: dict[str, Any]
) -> dict[str, Any]:
    """Print the most sensitive groups and write ``report.json``, ``report.md``,
    ``sensitivity.svg`` and ``config.json`` into ``out`` as one atomic folder; with
    ``--dry-run``, print only (the folder was written, without its lock and checks; an
    existing one was refused as "changed at the moment the result was to replace it")."""
    from cleanai_core.io import atomic_write_text
    from cleanai_core.job.config import recorded_config
    from cleanai_core.out_folder import staged_folder
    from cleanai_core.report import render_sensitivity_svg, report_json, sensitivity_markdown

    resolved = recorded_config(cfg)
    write = not cfg.get("dry_run")
    if write:
        with staged_folder(out, check=at_commit[0], expected=at_commit[1]) as tmp:
            atomic_write_text(tmp / "sensitivity.svg", render_sensitivity_svg(report["sensitivity"]))
            atomic_write_text(tmp / "report.json", report_json(report))
            atomic_write_text(tmp / "report.md", sensitivity_markdown(report) + "\n")
            atomic_write_text(tmp / "config.json", json.dumps(resolved, indent=2, default=str) + "\n")
    groups = report["sensitivity"]["groups"]
    print(f"{len(groups)} groups analysed in {report['sensitivity']['seconds']} s; most sensitive first:")
    for g in groups[:10]:
        kl = ", ".join(f"{r:g}: {v:.3g}" for r, v in zip(g["ratios"], g["kl"], strict=True))
        print(f"  {g['layer'] or g['modules'][0]} ({g['size']} units): KL {kl}")
    if write:
        print(f"wrote {out}/: report.md, report.json, sensitivity.svg, config.json")
    return report
