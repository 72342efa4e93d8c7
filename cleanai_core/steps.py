"""Iterative pruning: every step aims at an absolute kept count taken from the original widths.

Glossary:

- *final count*: the units a group keeps when the whole ratio is pruned in one step (its
  ratio, rounding, ``min_channels`` and frozen units applied to its original width).
- *step target*: after step ``k`` of ``n``, a group keeps
  ``original - round((original - final) * (k + 1) / n)`` units, so the last step ends at
  exactly the final count. (A per-step ratio applied to the shrinking widths rounds down
  at every step and compounds: 5 steps at 0.5 would keep 7 of 10 channels, not 5.)

Under global ranking, ``max_layer_ratio`` caps what a group loses over all the steps together,
counted from its original width (a cap on the current width would compound: 5 steps at 0.5
could leave 1 of 16 channels).

Under isomorphic pruning every isomorphic set reaches the ratio on its own: each step's
ratio is computed per set from the set's original and current units.

Groups of a later step's graph are matched to the original groups through their
producing slices (module and slice name), which slicing keeps. Where a unit of the later
graph holds another number of that slice's channels than the original unit did (a grouped-
query attention left with one key/value head prunes query heads one by one, where it
pruned whole key/value groups), the target is counted in channels: the step keeps the
units that hold its share of the channels.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch import nn

from cleanai_core.graph.groups import Group, named_alone
from cleanai_core.planning import GroupPlan, PruningPlan

__all__ = [
    "Targets",
    "final_counts",
    "group_ratios",
    "layer_scope_ratios",
    "original_widths",
    "prune_in_steps",
    "ranked_units",
    "ratio_layer",
    "set_step_ratios",
    "slice_keys",
    "step_caps",
    "step_group_ratios",
    "step_ratio",
    "uniform_targets",
    "whole_plan",
]

#: per producing slice ``(module, slice)``: (original units, units kept at the end, the
#: slice's channels per unit)
Targets = dict[tuple[str, str], tuple[int, int, float]]


def slice_keys(group: Group) -> list[tuple[str, str]]:
    """The slices that identify a group across steps: its producers (outputs, parameters)."""
    own = [(s.module, s.name) for s in group.slices if s.kind != "in"]
    return own or [(s.module, s.name) for s in group.slices]


def channels_per_unit(graph: Any, group: Group) -> dict[tuple[str, str], float]:
    """Per producing slice of ``group``: how many of the slice's channels one unit holds."""
    keys = set(slice_keys(group))
    return {
        (s.module, s.name): int(torch.isin(graph.unit_of(s), group.units).sum()) / group.size
        for s in group.slices
        if (s.module, s.name) in keys
    }


def final_counts(plan: PruningPlan, graph: Any) -> Targets:
    """The final count of every group of a one-step ``plan`` made on the original ``graph``."""
    out: Targets = {}
    for gp in plan.groups:
        per_unit = channels_per_unit(graph, gp.group)
        for key in slice_keys(gp.group):
            out.setdefault(key, (gp.group.size, gp.group.size - gp.n_pruned, per_unit[key]))
    return out


def uniform_targets(pruner: Any, graph: Any, ratio: float, every: bool) -> Targets:
    """The final counts (:func:`final_counts`) of a one-step uniform plan at ``ratio`` on
    ``graph`` (the original), for every group (``every``) or only for those with a layer
    ratio: the counts a run in steps aims at where a FLOPs target or a global ranking
    chooses the rest. Counts only: every unit scores alike here."""
    groups = graph.groups(prunable_only=True)
    fixed = set(group_ratios(groups, pruner.layer_ratios))
    plan = pruner.make_plan(ratio, {g.id: torch.zeros(g.size) for g in groups}, graph, ranked=False)
    return final_counts(PruningPlan([gp for gp in plan.groups if every or gp.group.id in fixed], plan.n_atoms), graph)


def original_widths(groups: list[Group]) -> dict[tuple[str, str], int]:
    """Every group's unit count, under each of its producing slices."""
    out: dict[tuple[str, str], int] = {}
    for g in groups:
        for key in slice_keys(g):
            out.setdefault(key, g.size)
    return out


def step_caps(groups: list[Group], widths: dict[tuple[str, str], int], max_layer_ratio: float) -> dict[int, int]:
    """Per group id: the units global ranking may still take from it, so that it loses at
    most ``max_layer_ratio`` of its original width over all steps."""
    out = {}
    for g in groups:
        original = next((widths[k] for k in slice_keys(g) if k in widths), None)
        if original is not None:
            out[g.id] = max(0, math.floor(max_layer_ratio * original + 1e-9) - (original - g.size))
    return out


def kept_at_step(original: int, final: int, step: int, steps: int, share: float | None = None) -> int:
    """The units kept after ``step`` of ``steps``: ``share`` of the way from ``original`` to
    ``final`` (default ``(step + 1) / steps``; a gradual schedule gives its own)."""
    if share is not None:
        return original - round((original - final) * share)
    return original - round((original - final) * (step + 1) / steps)


def step_group_ratios(
    groups: list[Group], targets: Targets, step: int, steps: int, graph: Any = None, share: float | None = None
) -> dict[int, float]:
    """Per group id: the share of its current units to remove at ``step`` to reach its
    step target (groups not found in ``targets`` are left out). With ``graph``, a group
    whose units hold another number of channels than the original's is counted in channels.
    ``share``: how far along from the original to the final count the step ends
    (:func:`kept_at_step`)."""
    out = {}
    for g in groups:
        key = next((k for k in slice_keys(g) if k in targets), None)
        if key is None or g.size == 0:
            continue
        original, final, per_unit = targets[key]
        now = channels_per_unit(graph, g)[key] if graph is not None else per_unit
        if abs(now - per_unit) < 1e-9:
            kept = kept_at_step(original, final, step, steps, share)
        else:  # the units changed meaning: keep the units that hold the step's channels
            channels = kept_at_step(round(original * per_unit), round(final * per_unit), step, steps, share)
            kept = math.ceil(channels / now - 1e-9)
        out[g.id] = max(0, g.size - kept) / g.size
    return out


def step_ratio(ratio: float, original_units: int, current_units: int, step: int, steps: int) -> float:
    """For global ranking: the share of the current units to remove at ``step`` so that
    ``ratio`` of the original units are gone after step ``k`` in ``(k + 1) / steps`` parts."""
    goal = int(ratio * original_units * (step + 1) / steps + 1e-9)
    removed = original_units - current_units
    return min(max(goal - removed, 0) / max(current_units, 1), 0.99)


def set_step_ratios(
    groups: list[Group],
    scopes: dict[int, Hashable],
    widths: dict[tuple[str, str], int],
    ratio: float,
    step: int,
    steps: int,
) -> dict[Hashable, float]:
    """Per isomorphic set (``scopes``: per group id): :func:`step_ratio` of its own units,
    so that every set has lost ``ratio`` of its original units after the last step."""
    original: dict[Hashable, int] = {}
    current: dict[Hashable, int] = {}
    for g in groups:
        scope = scopes[g.id]
        width = next((widths[k] for k in slice_keys(g) if k in widths), g.size)
        original[scope] = original.get(scope, 0) + width
        current[scope] = current.get(scope, 0) + g.size
    return {k: step_ratio(ratio, original[k], current[k], step, steps) for k in original}


def ratio_layer(group: Group, layer_ratios: Mapping[str, Any]) -> str | None:
    """The layer named in ``layer_ratios`` whose ratio is ``group``'s: one that produces
    the group's channels, else a custom layer named for itself whose outputs carry them
    (its tensors are bare)."""
    found = next((s.module for s in group.slices if s.kind != "in" and s.module in layer_ratios), None)
    if found is None:
        found = next((n for n in group.layers if named_alone(n, layer_ratios)), None)
    return found


def layer_scope_ratios(
    pruner: Any, groups: list[Group], ratios: dict[int, float]
) -> tuple[dict[int, Hashable], dict[Hashable, float]]:
    """Under global ranking, the groups of ``ratios`` whose layer ratio comes from a tuple
    key of ``layer_pruning_ratios`` (``pruner.layer_scopes``): per group id its scope, and
    per scope the share of its current units to remove now (the tuple's ratio; with
    iterative steps or a :class:`~cleanai_core.gradual.GradualPruner` step, what is left of
    this step's share of it, :func:`set_step_ratios`)."""
    scopes: dict[int, Hashable] = {}
    wanted: dict[Hashable, float] = {}
    for g in groups:
        layer = ratio_layer(g, pruner.layer_ratios) if g.id in ratios else None
        if layer is not None and layer in pruner.layer_scopes:
            scopes[g.id] = ("layer_pruning_ratios", pruner.layer_scopes[layer])
            wanted[scopes[g.id]] = pruner.layer_ratios[layer]
    if not scopes:
        return {}, {}
    step, steps = pruner._step
    share = pruner._share  # a GradualPruner step: how far along to the final ratio it ends
    if not pruner._widths or (steps <= 1 and share is None):
        return scopes, wanted
    if share is not None:
        step, steps = 0, 1
    members = [g for g in groups if g.id in scopes]
    out: dict[Hashable, float] = {}
    for scope, r in wanted.items():
        these = [g for g in members if scopes[g.id] == scope]
        out.update(set_step_ratios(these, scopes, pruner._widths, r * (1.0 if share is None else share), step, steps))
    return scopes, out


def ranked_units(groups: list[Group], layer_ratios: Mapping[str, Any] | None) -> int:
    """The units of the groups that global ranking shares out (those without a layer ratio
    of their own, or a tuple scope's): what a step's global ratio is a share of."""
    return sum(g.size for g in groups if not layer_ratios or ratio_layer(g, layer_ratios) is None)


def group_ratios(
    groups: list[Group],
    layer_ratios: dict[str, float],
    step: int = 0,
    steps: int = 1,
    targets: Targets | None = None,
    global_pruning: bool = False,
    graph: Any = None,
    share: float | None = None,
) -> dict[int, float]:
    """Per group id, the ratio that overrides the global one: the ratio of a layer named in
    ``layer_ratios`` that produces the group's channels; with iterative pruning, this
    step's share of each group's target (under global ranking only for the groups with a
    layer ratio), so that the steps together remove the requested ratio. ``share``: a
    gradual schedule's step (:class:`~cleanai_core.gradual.GradualPruner`, one pruner per
    step), how far along to the ``targets`` it ends."""

    def named(g: Group) -> float | None:
        layer = ratio_layer(g, layer_ratios)
        return None if layer is None else layer_ratios[layer]

    if (steps > 1 or share is not None) and targets:
        ratios = step_group_ratios(groups, targets, step, steps, graph, share)
        if not global_pruning:
            return ratios
        fixed = {g.id for g in groups if named(g) is not None}
        return {gid: r for gid, r in ratios.items() if gid in fixed}
    return {g.id: r for g in groups if (r := named(g)) is not None}


def _set_ratios(pruner: Any, graph: Any, step: int) -> dict[Hashable, float] | None:
    """With isomorphic pruning: this step's ratio of every isomorphic set (its groups with
    no layer ratio)."""
    p = pruner
    if not (p.isomorphic and p.global_pruning):
        return None
    groups = graph.groups(prunable_only=True)
    fixed = group_ratios(groups, p.layer_ratios, step, p.iterative_steps, p._targets, True, graph, p._share)
    free = [g for g in groups if g.id not in fixed]
    if p._share is not None:  # iterative_schedule: the step ends at its share of the way
        return set_step_ratios(free, p.isomorphic_scopes(free), p._widths, p.pruning_ratio * p._share, 0, 1)
    return set_step_ratios(free, p.isomorphic_scopes(free), p._widths, p.pruning_ratio, step, p.iterative_steps)


def whole_plan(graph: Any, first: PruningPlan, steps: list[list[Any]]) -> PruningPlan:
    """The plan on the original ``graph`` that removes what all the ``steps`` (lists of
    :class:`~cleanai_core.slicing.SliceEdit`) removed together: ``first`` (the first step's
    plan) with each group's verdicts read back from the kept indices of its slices, composed
    over the steps; ``ratio`` is the share removed. After an iterative ``prune()``,
    ``plan()`` returned the first step's plan alone (6 of 32 units where the model lost 16),
    and building it from the original gave another model than the one returned."""
    kept: dict[tuple[str, str], torch.Tensor] = {}
    for edits in steps:
        for e in edits:
            key = (e.module, e.slice)
            kept[key] = kept[key][e.keep] if key in kept else e.keep
    pruned = torch.zeros(first.n_atoms, dtype=torch.bool)
    for spec in graph.slices:
        keep = kept.get((spec.module, spec.name))
        if keep is None or spec.kind == "index":  # an index buffer's values are rewritten, not cut
            continue
        gone = torch.ones(spec.atoms.numel(), dtype=torch.bool)
        gone[keep] = False
        pruned[graph.unit_of(spec)[gone]] = True
    groups = []
    for gp in first.groups:
        verdict = pruned[gp.group.units]
        ratio = round(int(verdict.sum()) / gp.group.size, 6) if gp.group.size else 0.0
        groups.append(GroupPlan(gp.group, gp.scores, verdict, ratio))
    return PruningPlan(groups, first.n_atoms)


def prune_in_steps(pruner: Any) -> nn.Module:
    """The pruning steps of a :class:`~cleanai_core.pruner.StructuredPruner` (one unless
    ``iterative_steps``), each: re-trace and re-calibrate the previous step's model (after
    the first), plan, build (slice, compensate, verify; groups that break the model are
    skipped), correct BatchNorm statistics, move the biases compensation gave a layer before
    a BatchNorm into the norm (:func:`~cleanai_core.compensation.absorb_new_biases`), record
    the edits. Returns the last model."""
    from cleanai_core import distributed
    from cleanai_core.collect import CalibrationSetup, correct_batchnorm_after, recalibrate
    from cleanai_core.compensation import absorb_new_biases
    from cleanai_core.errors import PruningError, UserError, model_fault
    from cleanai_core.metrics import count_flops
    from cleanai_core.verify import build_skipping_breakers

    p = pruner
    current, graph, cal, steps = p.model, p.graph, p.calibration, p.iterative_steps
    shares = p._schedule  # iterative_schedule: where each step ends on the way (None: equal steps)
    if shares is not None and len(shares) != steps:
        raise UserError(
            f"iterative_schedule was given for {len(shares)} steps, but iterative_steps is now {steps}: "
            "build a new StructuredPruner with both"
        )
    if steps > 1:
        p._widths = original_widths(graph.groups(prunable_only=True))
    if steps > 1 and p.target_flops is None:  # every step aims at a count from the original widths
        p._targets = final_counts(p.make_plan(p.pruning_ratio, p.score()), graph)
        # under global ranking the groups with a layer ratio reach theirs on their own: the
        # others' share counted their units, and they lost less than pruning_ratio over the steps
        units = ranked_units(graph.groups(prunable_only=True), p.layer_ratios)
    elif steps > 1:  # the FLOPs search chooses the others; a layer ratio applied per step compounded (16 -> 1)
        p._targets = uniform_targets(p, graph, 0.0, every=False)
    for step in range(steps):
        p._step = (step, steps)
        if shares is not None:
            p._share = shares[step]
        if step > 0:
            graph = p._build_graph(current)
            cal = recalibrate(current, graph.slices, p.calibration.data, CalibrationSetup.of(p))
        if steps == 1:
            plan = p.plan()
        elif p.target_flops is not None:  # step k ends at target ** (k / steps) of the original FLOPs
            share = count_flops(current, p.example_inputs, p.forward_fn) / p.flops_before()
            plan = p.plan_for(graph, current, cal, p.target_flops ** ((step + 1) / steps) / share)
        else:
            now = ranked_units(graph.groups(prunable_only=True), p.layer_ratios)
            if shares is None:
                ratio = step_ratio(p.pruning_ratio, units, now, step, steps)
            else:  # the step ends at its share of the way, as a GradualPruner step does
                ratio = step_ratio(p.pruning_ratio * shares[step], units, now, 0, 1)
            plan = p.make_plan(ratio, p.score(graph, current, cal), graph, set_ratios=_set_ratios(p, graph, step))
        if step == 0:
            p._plan = plan
        distributed.check_same_plan(plan.pruned_units())
        build = lambda pruned, c=current, g=graph, s=cal.stats: p.build(pruned, c, g, s, exact=True)  # noqa: E731
        pruned_model, edits = build_skipping_breakers(plan, build, p._skip)
        p._pruned_plans.append((graph, plan))
        if p.recalibrate_bn and p.calibration.data is not None:
            keep = {e.module: e.keep for e in edits}
            try:
                correct_batchnorm_after(
                    current, pruned_model, cal.moments, keep, cal.data, p.forward_fn, cal.samples, cal.batch_calls,
                    p.bn_samples,
                )  # fmt: skip
            except Exception as exc:
                if not model_fault(exc):
                    raise
                # was the model's own traceback: the pruned model ran on the example, not on this batch
                raise PruningError(
                    f"the pruned model failed on a calibration batch during the BatchNorm correction, where the "
                    f"original ran ({type(exc).__name__}: {str(exc)[:300]}). It was checked on the example input "
                    "only; ignore the layers whose width the model reads (or pass recalibrate_bn=False, command "
                    "line: --no-bn-recalibration), and report it."
                ) from exc
        absorb_new_biases(pruned_model, graph, current)
        p.history.record(edits, before=current, after=pruned_model)
        current = pruned_model
    if steps > 1:  # plan() now answers for every step, on the original graph
        p._plan = whole_plan(p.graph, p._pruned_plans[0][1], p.history.steps)
    if steps > 1 and p.target_flops is not None:  # each step's plan_for checked its own aim only
        from cleanai_core.pruner import _warn_if_far

        _warn_if_far(
            "flops", p.target_flops, count_flops(current, p.example_inputs, p.forward_fn) / p.flops_before(), []
        )
    return current
