"""Stage 8, the report: what was pruned, built once from the plans (rendered by
:mod:`cleanai_core.report`). A new report section is a new key here (and, to show it,
a renderer in :mod:`cleanai_core.report`)."""

from __future__ import annotations

from typing import Any

import torch

from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.planning import PruningPlan

__all__ = ["layer_records", "pruner_report"]


def layer_records(graph: DependencyGraph, plan: PruningPlan) -> list[dict[str, Any]]:
    """Per pruned layer: channels before/after, pruned indices and scores of pruned and
    kept units."""
    layers = []
    unit_score = torch.zeros(graph.root.numel(), dtype=torch.float64)
    for gp in plan.groups:
        unit_score[gp.group.units] = gp.scores.to(torch.float64)
    pruned = plan.pruned_units()
    for spec in graph.slices:
        if spec.kind == "in":
            continue
        units = graph.root[spec.atoms]
        gone = pruned[units]
        scores = unit_score[units]
        layers.append(
            {
                "name": spec.module or spec.name,
                "slice": spec.name if spec.module else "tensor",
                "channels_before": int(spec.atoms.numel()),
                "channels_after": int((~gone).sum()),
                "pruned_indices": gone.nonzero().squeeze(1).tolist(),
                "importance_scores": {
                    "pruned": scores[gone].round(decimals=6).tolist(),
                    "kept": scores[~gone].round(decimals=6).tolist(),
                },
            }
        )
    return layers


def pruner_report(pruner: Any) -> dict[str, Any]:
    """The library's report of a :class:`~cleanai_core.pruner.StructuredPruner` after
    ``prune()``: params and FLOPs before/after (FLOPs counted once), the plan's groups,
    per-layer records of every step, skipped groups and dead units found on the data."""
    from cleanai_core.dead_units import find_dead_units
    from cleanai_core.errors import UserError
    from cleanai_core.metrics import count_flops, count_params

    if pruner.pruned_model is None:
        raise UserError("nothing pruned yet: call pruner.prune() before pruner.report()")
    before = pruner._before
    if "flops_after" not in before:
        before["flops_after"] = count_flops(pruner.pruned_model, pruner.example_inputs, pruner.forward_fn)
    return {
        "params_before": before.get("params"),
        "params_after": count_params(pruner.pruned_model),
        "flops_before": pruner.flops_before(),
        "flops_after": before["flops_after"],
        "importance": repr(pruner.importance),
        "pruning_ratio": pruner.pruning_ratio,
        "skipped_groups": list(pruner.skipped_groups),
        "groups": pruner._plan.to_json()["groups"] if pruner._plan else [],
        "layers": [rec for graph, plan in pruner._pruned_plans for rec in layer_records(graph, plan)],
        "dead_units": [f.to_json() for f in find_dead_units(pruner.graph, pruner.stats)] if pruner.stats else None,
    }
