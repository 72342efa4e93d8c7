"""``cleanai prune --sensitivity`` / ``--auto``: the sensitivity analysis and, for
``--auto``, the per-layer ratios it allocates to the target, set on the pruner."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["sensitivity_and_ratios"]

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
        from cleanai_core.metrics import measure_latency

        repeats = int(cfg.get("latency_repeats") or 20)
        alloc = allocate_ratios(
            pruner,
            result,
            target_flops=cfg.get("target_flops"),
            target_params=cfg.get("target_params"),
            target_latency=cfg.get("target_latency"),
            latency_measure=lambda m: measure_latency(
                m, pruner.example_inputs, repeats=repeats, forward_fn=pruner.forward_fn
            ),  # fmt: skip
        )
        ratios = dict(cfg.get("layer_ratio") or {})  # the user's own layer ratios come first, and win
        for name, r in alloc.layer_ratios.items():
            ratios.setdefault(name, r)
        pruner.set_layer_ratios(ratios)
        out["allocation"] = alloc.to_json()
        log.info(f"auto ratios: {alloc.method} allocation keeps {alloc.cost:.3f} of the {alloc.target}")
    return out
