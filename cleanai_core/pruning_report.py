"""Stage 8, the report: what was pruned, built once from the plans (rendered by
:mod:`cleanai_core.report`). A new report section is a new key here (and, to show it,
a renderer in :mod:`cleanai_core.report`)."""

from __future__ import annotations

import types
from typing import Any

import torch

from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.heads import head_records
from cleanai_core.planning import PruningPlan

__all__ = ["describe_importance", "indices_in_original", "input_shape", "kept_groups", "layer_records", "pruner_report"]


def layer_records(
    graph: DependencyGraph, plan: PruningPlan, origin: dict[tuple[str, str], list[int]] | None = None
) -> list[dict[str, Any]]:
    """Per pruned layer: channels before/after, pruned indices and scores of pruned and
    kept units (the units too where several channels are one: :func:`_unit_counts`). A
    unit of no group in ``plan`` (an ignored layer, a width kept whole) was never scored:
    its score is ``None``. ``origin`` (a later step of iterative pruning):
    per ``(module, slice)``, the original index of each of the step's channels; the
    records then also list ``original_indices``."""
    layers = []
    unit_score = torch.full((graph.root.numel(),), float("nan"), dtype=torch.float64)
    for gp in plan.groups:
        unit_score[gp.group.units] = gp.scores.to(torch.float64)
    pruned = plan.pruned_units()
    for spec in graph.slices:
        if spec.kind in ("in", "index", "count"):  # an index buffer or a count is no layer: its source's channels
            continue
        units = graph.root[spec.atoms]
        gone = pruned[units]
        scores = unit_score[units]
        name = spec.module or spec.name
        record = {
            "name": name,
            "slice": spec.name if spec.module else "tensor",
            "channels_before": int(spec.atoms.numel()),
            "channels_after": int((~gone).sum()),
            "pruned_indices": gone.nonzero().squeeze(1).tolist(),
            "importance_scores": {"pruned": _scores(scores[gone]), "kept": _scores(scores[~gone])},
        }
        record.update(_unit_counts(units, pruned))
        if origin is not None:
            where = origin.get((name, record["slice"]))
            record["original_indices"] = [where[i] for i in record["pruned_indices"]] if where else None
        layers.append(record)
    return layers


def _unit_counts(units: torch.Tensor, pruned: torch.Tensor) -> dict[str, Any]:
    """Where several of a layer's channels are one unit (an attention head's rows of a
    ``qkv`` or ``q_proj`` weight, a conv group, the two halves a GLU pairs): the units
    before and after and the pruned ones' positions among the layer's units, in order of
    their first channel (head 2 of 4 is ``2``). The report listed 96 channels of
    ``qkv`` with one score repeated 16 times each and never said that 2 of 4 heads went.
    Empty where each channel is its own unit."""
    uniq, inverse = torch.unique(units, return_inverse=True)
    if uniq.numel() == units.numel():
        return {}
    first = torch.full((uniq.numel(),), units.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(units.numel()), reduce="amin")
    ordered = uniq[torch.argsort(first)]
    gone = pruned[ordered]
    widths = torch.bincount(inverse).unique()
    return {
        "units_before": int(ordered.numel()),
        "units_after": int((~gone).sum()),
        "pruned_units": gone.nonzero().squeeze(1).tolist(),
        # the channels of each unit, where all have the same number (an attention head's q, k and v rows)
        "channels_per_unit": int(widths[0]) if widths.numel() == 1 else None,
    }


def _scores(scores: torch.Tensor) -> list[float | None]:
    """Scores to six significant digits (``None`` for a unit never scored). Six decimals
    made every Taylor score of a small model 0.0 (they lie near 1e-12): no ranking left."""
    return [None if v != v else float(f"{v:.6g}") for v in scores.tolist()]


def _step_records(pruner: Any) -> list[dict[str, Any]]:
    """The layer records of every step. With several steps each record names its
    ``step`` (1-based) and the ``original_indices`` of the channels it removed, traced
    back through the earlier steps' edits (a later step's indices are its own model's)."""
    steps = pruner._pruned_plans
    if len(steps) <= 1:
        return [rec for graph, plan in steps for rec in layer_records(graph, plan)]
    origin: dict[tuple[str, str], list[int]] = {}
    out = []
    for k, (graph, plan) in enumerate(steps):
        for spec in graph.slices:  # channels no earlier step touched keep their own index
            if spec.kind != "in":
                key = (spec.module or spec.name, spec.name if spec.module else "tensor")
                origin.setdefault(key, list(range(int(spec.atoms.numel()))))
        for rec in layer_records(graph, plan, origin):
            out.append({**rec, "step": k + 1})
        edits = pruner.history.steps[k] if k < len(pruner.history.steps) else []
        for e in edits:
            key = _edit_key(e)
            if key in origin:
                origin[key] = [origin[key][i] for i in e.keep.tolist()]
    return out


def _edit_key(e: Any) -> tuple[str, str]:
    """An edit's ``(name, slice)`` as the layer records name it."""
    return (e.module or e.slice, e.slice if e.module else "tensor")


def indices_in_original(layers: list[dict[str, Any]], earlier: Any) -> None:
    """Give every layer record the ``original_indices`` of the channels it removed, traced
    back through the steps of ``earlier`` (the history of the model this run started
    from: ``cleanai prune --model FOLDER``), in place. Its ``pruned_indices`` index the
    folder's model, and nothing said so: channel 5 of a layer the first run had cut from 16
    to 12 read as the original's channel 5 (it is 7 there)."""
    for rec in layers:
        key = (rec["name"], rec["slice"])
        idx = list(rec.get("original_indices") or rec.get("pruned_indices") or [])
        for step in reversed(earlier.steps):
            keep = next((e.keep.tolist() for e in step if _edit_key(e) == key), None)
            if keep is not None:
                idx = [keep[i] for i in idx]
        rec["original_indices"] = idx


def _group_records(pruner: Any) -> list[dict[str, Any]]:
    """The plan's groups, with the units removed over every step: with ``iterative_steps``
    the report listed the first step's plan alone (1 of 8 units pruned where the model lost
    4). A group keeps its slices through the steps (each slice is in one group), so a later
    step's group is found by the first slice of the original one."""
    steps = pruner._pruned_plans
    if len(steps) <= 1:
        return pruner._plan.to_json()["groups"] if pruner._plan else []
    later = [{(s.module, s.name): gp for gp in plan.groups for s in gp.group.slices} for _, plan in steps[1:]]
    out = []
    for gp in steps[0][1].groups:
        record = gp.to_json()
        key = (gp.group.slices[0].module, gp.group.slices[0].name) if gp.group.slices else None
        record["pruned"] += sum(step[key].n_pruned for step in later if key in step)
        record["ratio"] = round(record["pruned"] / record["units"], 6) if record["units"] else 0.0
        out.append(record)
    return out


def input_shape(example: Any) -> list[int] | dict[str, list[int]] | None:
    """The shape of the input that FLOPs (and latency) are measured on: a tensor's, per key
    for a dict of tensors (a text model's ``input_ids``: its length sets the FLOPs), per
    position (``"0"``, ``"1"``, ...) for a tuple or list of them."""
    if isinstance(example, torch.Tensor):
        return list(example.shape)
    if isinstance(example, (tuple, list)):
        example = {str(i): v for i, v in enumerate(example)}
    if isinstance(example, dict):
        return {str(k): list(v.shape) for k, v in example.items() if isinstance(v, torch.Tensor)} or None
    return None


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
    groups = _group_records(pruner)
    layers = _step_records(pruner)
    return {
        "params_before": before.get("params"),
        "params_after": count_params(pruner.pruned_model),
        "flops_before": pruner.flops_before(),
        "flops_after": before["flops_after"],
        # the example's shape: FLOPs of a batch of 4 read "FLOPs (1 input)" in report.md, 4x the CLI's figure
        "input_shape": input_shape(pruner.example_inputs),
        "importance": describe_importance(pruner.importance),
        # Taylor without labelled calibration data: the gradients on the parameters, from whatever backward ran
        # last (a training loop's last batch, before its optimizer step, is scored without a word otherwise)
        "gradients": HELD_GRADIENTS if getattr(pruner, "scored_with_held_gradients", False) else None,
        # what set the amount: a target or the dead units leave the ratio unused (it read 0.3, the default)
        "pruning_ratio": None if _amount_set_otherwise(pruner) else pruner.pruning_ratio,
        "target_flops": pruner.target_flops,
        "target_params": pruner.target_params,
        # a dead-units run named no amount at all (ratio and targets null): what chose the units
        "prune_dead_only": bool(pruner.prune_dead_only),
        # per layer name: "pruning ratio 0" was all a run with layer_pruning_ratios={"fc1": 0.5} said
        "layer_ratios": dict(pruner.layer_ratios) or None,
        # what the ratio is a share of: units, per group or of all groups ranked together (a global
        # 0.3 kept 0.67 of a MobileNet-V3's parameters, and nothing said the ratio counts units)
        "ranking": "isomorphic" if pruner.isomorphic else "global" if pruner.global_pruning else "per group",
        "units_before": sum(g["units"] for g in groups),
        "units_after": sum(g["units"] - g["pruned"] for g in groups),
        "skipped_groups": list(pruner.skipped_groups),
        # groups no unit of which could go, with why: a BERT's attention heads (kept for from_pretrained) were
        # in neither "groups" nor "skipped_groups", and the report said nothing of them
        "kept_groups": kept_groups(pruner.graph),
        "groups": groups,
        "layers": layers,
        # query and key/value heads per attention module: "q_proj 2 -> 1 units" was all a GQA Llama's said
        "attention_heads": head_records(getattr(pruner._pruned_plans[0][0], "head_layouts", []), layers)
        if pruner._pruned_plans
        else [],
        "dead_units": [f.to_json() for f in find_dead_units(pruner.graph, pruner.stats)] if pruner.stats else None,
    }


def kept_groups(graph: DependencyGraph) -> list[dict[str, Any]]:
    """Every group of ``graph`` that nothing could prune (every unit frozen), with its
    modules, its units and why (an ignored layer, the model's output, a width the
    Hugging Face config cannot describe: the freezing plugin's reason)."""
    return [
        {"group": g.id, "modules": g.modules(), "units": int(g.size), "why": list(dict.fromkeys(g.reasons))}
        for g in graph.groups()
        if g.prunable == 0
    ]


#: the report's ``gradients`` where a gradient criterion scored with the gradients found on the parameters
HELD_GRADIENTS = (
    "the gradients on the model's parameters when it was scored (left by your own loss's backward), not gradients "
    "taken on calibration data"
)


def describe_importance(importance: Any) -> str:
    """The criterion as the report names it: its own ``repr``, or, for a class without one,
    ``Name(option=value, ...)`` from its plain public attributes. The default ``repr`` wrote
    ``<cleanai_plugins.importance.criteria.MagnitudeImportance object at 0x7f5d...>`` into
    ``report.json``: no options, and an address that differed in every run."""
    if isinstance(importance, types.FunctionType):  # a criterion written as a function: its name
        return f"{importance.__module__}.{importance.__qualname__}"
    if type(importance).__repr__ is not object.__repr__:
        return repr(importance)
    if not isinstance(getattr(importance, "__dict__", None), dict):
        return getattr(importance, "__qualname__", type(importance).__qualname__)
    plain = {
        k: v
        for k, v in vars(importance).items()
        if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))
    }
    return f"{type(importance).__name__}({', '.join(f'{k}={v!r}' for k, v in plain.items())})"


def _amount_set_otherwise(pruner: Any) -> bool:
    """Whether ``pruning_ratio`` played no part: a FLOPs or parameter target, or
    ``prune_dead_only``, chose what goes."""
    return pruner.target_flops is not None or pruner.target_params is not None or bool(pruner.prune_dead_only)
