"""Iterative pruning: every step aims at an absolute kept count taken from the original widths.

Glossary:

- *final count*: the units a group keeps when the whole ratio is pruned in one step (its
  ratio, rounding, ``min_channels`` and frozen units applied to its original width).
- *step target*: after step ``k`` of ``n``, a group keeps
  ``original - round((original - final) * (k + 1) / n)`` units, so the last step ends at
  exactly the final count. (A per-step ratio applied to the shrinking widths rounds down
  at every step and compounds: 5 steps at 0.5 would keep 7 of 10 channels, not 5.)

Groups of a later step's graph are matched to the original groups through their
producing slices (module and slice name), which slicing keeps.
"""

from __future__ import annotations

from cleanai_core.graph.groups import Group
from cleanai_core.planning import PruningPlan

__all__ = ["Targets", "final_counts", "step_group_ratios", "step_ratio"]

#: per producing slice ``(module, slice)``: (original units, units kept at the end)
Targets = dict[tuple[str, str], tuple[int, int]]


def _keys(group: Group) -> list[tuple[str, str]]:
    """The slices that identify a group across steps: its producers (outputs, parameters)."""
    own = [(s.module, s.name) for s in group.slices if s.kind != "in"]
    return own or [(s.module, s.name) for s in group.slices]


def final_counts(plan: PruningPlan) -> Targets:
    """The final count of every group of a one-step ``plan`` made on the original graph."""
    out: Targets = {}
    for gp in plan.groups:
        for key in _keys(gp.group):
            out.setdefault(key, (gp.group.size, gp.group.size - gp.n_pruned))
    return out


def kept_at_step(original: int, final: int, step: int, steps: int) -> int:
    return original - round((original - final) * (step + 1) / steps)


def step_group_ratios(groups: list[Group], targets: Targets, step: int, steps: int) -> dict[int, float]:
    """Per group id: the share of its current units to remove at ``step`` to reach its
    step target (groups not found in ``targets`` are left out)."""
    out = {}
    for g in groups:
        hit = next((targets[k] for k in _keys(g) if k in targets), None)
        if hit is None or g.size == 0:
            continue
        out[g.id] = max(0, g.size - kept_at_step(*hit, step, steps)) / g.size
    return out


def step_ratio(ratio: float, original_units: int, current_units: int, step: int, steps: int) -> float:
    """For global ranking: the share of the current units to remove at ``step`` so that
    ``ratio`` of the original units are gone after step ``k`` in ``(k + 1) / steps`` parts."""
    goal = int(ratio * original_units * (step + 1) / steps + 1e-9)
    removed = original_units - current_units
    return min(max(goal - removed, 0) / max(current_units, 1), 0.99)
