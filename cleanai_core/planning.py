"""From scores to a PruningPlan: pure data, a dry run that changes nothing."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import attrs
import torch

from cleanai_core.errors import UserError, shown, shown_name
from cleanai_core.graph.groups import Group

__all__ = [
    "GroupPlan",
    "PruningPlan",
    "equalize_ties",
    "limit_units",
    "make_plan",
    "tie_counts",
    "tied_kept",
    "tied_sets",
    "uniform_alignments",
    "uniform_counts",
    "unroundable_note",
]


@attrs.define(eq=False)
class GroupPlan:
    """The decision for one group: a score and a verdict per unit."""

    group: Group
    scores: torch.Tensor
    pruned: torch.Tensor  # bool per unit
    ratio: float

    @property
    def n_pruned(self) -> int:
        return int(self.mask().sum())

    def mask(self) -> torch.Tensor:
        """``pruned`` as a bool tensor of one entry per unit, or a :class:`UserError` naming
        the group and the form: ``pruned`` is editable (the user guide), and one set to unit
        indices, a mask of another length or ``None`` raised ``IndexError: index 100 is out of
        bounds`` (or ``AttributeError``) from inside the plan, or removed the wrong units; a
        list of booleans of the right length is taken."""
        p, size = self.pruned, self.group.size
        if isinstance(p, torch.Tensor) and p.dtype == torch.bool and tuple(p.shape) == (size,):
            return p
        try:
            t = torch.as_tensor(p) if p is not None and not isinstance(p, (str, bytes)) else None
        except (TypeError, ValueError, RuntimeError):
            t = None
        if t is not None and t.dtype == torch.bool and tuple(t.shape) == (size,) and not t.is_meta:
            return t.cpu()
        got = f"a {str(t.dtype).replace('torch.', '')} tensor of shape {tuple(t.shape)}" if t is not None else shown(p)
        hint = ""
        if t is not None and not t.is_floating_point() and t.dtype != torch.bool and t.dim() <= 1:
            hint = f" (unit indices: gp.pruned = torch.zeros({size}, dtype=torch.bool); gp.pruned[indices] = True)"
        raise UserError(
            f"the plan's group {self.group.id} ({', '.join(shown_name(m) for m in self.group.modules()[:3])}): "
            f"pruned must be a boolean mask with one entry per unit, shape ({size},) (True removes the unit); got "
            f"{got}{hint}"
        )

    def to_json(self) -> dict[str, Any]:
        """The group as the report lists it. ``ratio`` is the share of its units removed,
        ``pruned / units``: it was ``ratio`` as asked in a uniform plan (0.1 where 0 of 3
        units went, 0.3 where ``round_to`` took 8 of 16) and the share removed in a global,
        tied or iterative one."""
        size = self.group.size
        return {
            "group": self.group.id,
            "modules": self.group.modules(),
            "units": size,
            "pruned": self.n_pruned,
            "ratio": round(self.n_pruned / size, 6) if size else 0.0,
            "frozen": int(self.group.frozen.sum()),
        }


@attrs.define(eq=False)
class PruningPlan:
    """Which units go. ``pruned_units()`` is a mask over the graph's units."""

    groups: list[GroupPlan]
    n_atoms: int

    def pruned_units(self) -> torch.Tensor:
        mask = torch.zeros(self.n_atoms, dtype=torch.bool)
        for gp in self.groups:
            gp.pruned = gp.mask()  # an edited one checked, a list of booleans made the tensor the others read
            mask[gp.group.units[gp.pruned]] = True
        return mask

    @property
    def n_pruned(self) -> int:
        return sum(gp.n_pruned for gp in self.groups)

    def summary(self, max_rows: int = 40) -> str:
        total = sum(gp.group.size for gp in self.groups)
        lines = [f"{self.n_pruned} of {total} units pruned across {sum(gp.n_pruned > 0 for gp in self.groups)} groups"]
        for gp in self.groups[:max_rows]:
            mods = [shown_name(m) for m in gp.group.modules()]
            lines.append(
                f"  group {gp.group.id:>3}: {gp.n_pruned:>5}/{gp.group.size:<5} {', '.join(mods[:3])}"
                + (f" (+{len(mods) - 3})" if len(mods) > 3 else "")
            )
        if len(self.groups) > max_rows:
            lines.append(f"  ... {len(self.groups) - max_rows} more groups")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"pruned_units": self.n_pruned, "groups": [gp.to_json() for gp in self.groups]}


def _tie_keys(group: Group) -> set[str]:
    return {k for s in group.slices for k in (s.same_count, s.same_share) if k is not None}


def _tie_indices(groups: list[Group]) -> list[list[int]]:
    """Positions in ``groups`` in sets tied by a ``same_count`` / ``same_share`` key (one
    key space), in the order of each set's first member."""
    sets: dict[int, list[int]] = {}  # first member's position -> members
    owner: dict[str, int] = {}
    for i, g in enumerate(groups):
        keys = _tie_keys(g)
        roots = sorted({owner[k] for k in keys if k in owner})
        root = roots[0] if roots else i
        members = sets.setdefault(root, [])
        for r in roots[1:]:  # a group that joins two sets merges them
            members.extend(sets.pop(r))
        members.append(i)
        owner.update({k: root for k, r in owner.items() if r in roots})
        owner.update(dict.fromkeys(keys, root))
    return list(sets.values())


def tied_sets(plans: list[GroupPlan]) -> list[list[GroupPlan]]:
    """``plans`` in sets that must keep the same share of their units (their slices name
    the same ``same_count`` or ``same_share`` key: the experts of one 3-D tensor, and the
    shared experts whose width the config derives from theirs); a plan tied to none is a
    set of one. In the order of each set's first member."""
    return [[plans[i] for i in tie] for tie in _tie_indices([gp.group for gp in plans])]


def tied_kept(groups: list[Group], kept: list[int], aligns: list[int]) -> list[int]:
    """The kept counts of one tied set: the same share of every member's units, as much as
    the member that keeps most asks, each a multiple of its ``aligns`` entry (a kept count
    the whole group where no share below it fits). Groups of one size keep one count (the
    experts of one 3-D tensor); a group ``k`` times as wide keeps ``k`` times as many
    (Aria's, Ernie-4.5-MoE's shared experts: the routed width times their number)."""
    base = math.gcd(*(g.size for g in groups))
    parts = [g.size // max(base, 1) for g in groups]
    step = 1
    for part, align in zip(parts, aligns, strict=True):
        step = math.lcm(step, max(align, 1) // math.gcd(max(align, 1), part))
    share = max(math.ceil(k / part) for k, part in zip(kept, parts, strict=True))
    share = min(base, math.ceil(share / step) * step)
    return [part * share for part in parts]


def tie_counts(
    groups: list[Group], counts: Mapping[int, int], aligns: Mapping[int, int] | None = None
) -> dict[int, int]:
    """``counts`` (units pruned per group id) made to agree within every tied set
    (:func:`tied_kept`): a member prunes fewer, never more. ``aligns``: per group id, the
    alignment of its kept count (default: its slices' own)."""
    out = dict(counts)
    for tie in _tie_indices(groups):
        if len(tie) < 2:
            continue
        members = [groups[i] for i in tie]
        align = [(aligns or {}).get(g.id) or _alignment(g) for g in members]
        kept = tied_kept(members, [g.size - out[g.id] for g in members], align)
        out.update({g.id: min(out[g.id], g.size - k) for g, k in zip(members, kept, strict=True)})
    return out


def equalize_ties(plans: list[GroupPlan]) -> None:
    """Make every tied set (:func:`tied_sets`) keep the same share of its units, in place:
    the most any of its groups asks (:func:`tied_kept`). A group that would keep fewer
    gives back its highest-scoring pruned units, so what goes is always a subset of what
    was chosen (a dead-unit plan stays exact)."""
    counts = tie_counts([gp.group for gp in plans], {gp.group.id: gp.n_pruned for gp in plans})
    for gp in plans:
        extra = gp.n_pruned - counts[gp.group.id]
        if extra > 0:
            chosen = gp.pruned.nonzero().squeeze(1)
            order = torch.argsort(gp.scores[chosen].to(torch.float64), descending=True, stable=True)
            gp.pruned[chosen[order[:extra]]] = False
            gp.ratio = gp.n_pruned / max(gp.group.size, 1)


def _multiplicity(group: Group) -> int:
    spec = next((s for s in group.slices if s.kind == "out"), group.slices[0])
    return max(1, spec.atoms.numel() // max(group.size, 1))


def _alignment(group: Group) -> int:
    """The kept units must be a multiple of this, so that every slice keeps a multiple of
    its ``multiple`` channels."""
    out = 1
    for s in group.slices:
        if s.multiple > 1:
            per_unit = max(1, s.atoms.numel() // max(group.size, 1))
            out = math.lcm(out, s.multiple // math.gcd(s.multiple, per_unit))
    return out


def uniform_alignments(groups: list[Group]) -> dict[int, int]:
    """Per group id, the alignment of its kept count in a uniform plan: the least common
    multiple of the alignments of every group of its size, so that groups of one size
    keep one count (Jamba's dense MLP and its experts, both ``intermediate_size`` wide:
    the experts' 16-byte alignment kept 60 of 96 units where the MLP kept 58, a width
    one config key cannot hold)."""
    by_size: dict[int, int] = {}
    for g in groups:
        by_size[g.size] = math.lcm(by_size.get(g.size, 1), _alignment(g))
    return {g.id: by_size[g.size] for g in groups}


def _round_step(group: Group, round_to: int | None) -> int:
    """The kept units must be a multiple of this for ``round_to`` channels: a unit is m
    channels (a GroupNorm's groups), so keep a number of units whose channels are a
    multiple of round_to (3 units of 3 channels would keep 9 at round_to=4)."""
    if not round_to or round_to <= 1:
        return 1
    return round_to // math.gcd(round_to, _multiplicity(group))


def unroundable_note(groups: list[Group], round_to: int | None) -> str | None:
    """Why ``round_to`` keeps whole some of ``groups`` (those a plan left whole) whatever the
    ratio, or ``None``: groups of more than one prunable unit whose units span several
    channels, with no multiple of ``round_to`` channels below their width (regnety_002's
    grouped convolutions: 8 units of 46 channels, and only all 8 make a multiple of 16), and
    the largest power of two below ``round_to`` that lets them shrink."""
    stuck = [g for g in groups if g.prunable > 1 and _multiplicity(g) > 1 and _round_step(g, round_to) >= g.size]
    if not stuck or not round_to:
        return None
    better = 1 << (round_to.bit_length() - 1)
    while better > 1 and any(_round_step(g, better) >= g.size for g in stuck):
        better //= 2
    g = max(stuck, key=lambda g: g.size * _multiplicity(g))
    return (
        f"round_to={round_to} keeps {len(stuck)} group(s) whole whatever the ratio ({', '.join(g.modules()[:2])}: "
        f"{g.size} units of {_multiplicity(g)} channels): their units span several channels, and no multiple of "
        f"{round_to} channels lies below their width. round_to={better if better > 1 else None} lets them shrink; "
        "or keep it where aligned widths matter more"
    )


def uniform_counts(
    groups: list[Group],
    ratio: float,
    group_ratios: Mapping[int, float] | None = None,
    round_to: int | None = None,
    min_units: int = 1,
    nearest: bool = False,
) -> dict[int, int]:
    """Per group id, the units a uniform plan prunes: ``ratio`` of each group (or its entry
    in ``group_ratios``) made a count it can lose (:func:`limit_units`, aligned alike in
    groups of one size: :func:`uniform_alignments`), then the same share in every tied
    set (:func:`tie_counts`); ``nearest``: ``round_to`` to the nearest multiple. The plan,
    the default-freeze check and the oracle's ``random_units`` count with it, so they agree."""
    aligns = uniform_alignments(groups)
    counts = {}
    for g in groups:
        r = (group_ratios or {}).get(g.id, ratio)
        counts[g.id] = limit_units(g, int(math.floor(r * g.size + 1e-9)), round_to, min_units, aligns[g.id], nearest)
    steps = {g.id: math.lcm(aligns[g.id], _round_step(g, round_to)) for g in groups}
    return tie_counts(groups, counts, steps)


def limit_units(
    group: Group, n: int, round_to: int | None, min_units: int, align: int | None = None, nearest: bool = False
) -> int:
    """``n`` units of ``group`` made a count the group can lose: at most its prunable
    units, at least ``min_units`` kept, the kept count rounded up to ``round_to`` channels
    (with ``nearest``: to the nearest multiple, halves up, at least one multiple; a group
    narrower than one multiple keeps the count the ratio gives) and to the slices'
    alignment (``SliceSpec.multiple``; ``align``, a multiple of it, where given:
    :func:`uniform_alignments`)."""
    n = max(0, min(n, group.prunable, group.size - max(1, min_units)))
    if round_to and round_to > 1 and n > 0:
        step = _round_step(group, round_to)
        kept = group.size - n
        if not nearest:
            n = max(0, group.size - math.ceil(kept / step) * step)
        elif group.size >= step:
            # CPU convolutions pad channels to a block (docs/benchmarks.md, session 16): a count
            # just above a multiple pays a whole block, one just below gains nothing by its cut
            n = group.size - min(group.size, max(step, math.floor(kept / step + 0.5) * step))
            n = max(0, min(n, group.prunable, group.size - max(1, min_units)))
        n = min(n, group.prunable)
    align = align or _alignment(group)
    if align > 1 and n > 0:
        n = min(max(0, group.size - math.ceil((group.size - n) / align) * align), group.prunable)
    return n


def _lowest(scores: torch.Tensor, frozen: torch.Tensor, n: int) -> torch.Tensor:
    pruned = torch.zeros(scores.numel(), dtype=torch.bool)
    if n <= 0:
        return pruned
    s = scores.clone().to(torch.float64)
    s[frozen] = math.inf
    order = torch.argsort(s, stable=True)
    pruned[order[:n]] = True
    return pruned


def _rank(
    groups: list[Group],
    scores: dict[int, torch.Tensor],
    norm: Any,
    budget: int,
    caps: dict[int, int],
    chosen: dict[int, list[int]],
) -> None:
    """Global ranking of ``groups``: their unfrozen units, scores normalised per group, go
    lowest first into ``chosen`` until ``budget`` units are taken (at most ``caps`` per group)."""
    pool_s, pool_g, pool_i = [], [], []
    for g in groups:
        if g.prunable == 0:
            continue
        s = norm(scores[g.id].to(torch.float64))
        idx = (~g.frozen).nonzero().squeeze(1)
        pool_s.append(s[idx])
        pool_g.append(torch.full((idx.numel(),), g.id))
        pool_i.append(idx)
    if not pool_s:
        return
    s_all, g_all, i_all = torch.cat(pool_s), torch.cat(pool_g), torch.cat(pool_i)
    taken = 0
    for k in torch.argsort(s_all, stable=True).tolist():
        if taken >= budget:
            break
        gid = int(g_all[k])
        if len(chosen[gid]) < caps[gid]:
            chosen[gid].append(int(i_all[k]))
            taken += 1


def _checked_plan_inputs(
    groups: list[Group], scores: Any, ratio: Any, group_ratios: Any = None, scope_ratios: Any = None
) -> float:
    """``ratio`` as a float, after a :class:`UserError` for a ratio or scores that cannot make
    a plan (``StructuredPruner.make_plan`` is public): ``ratio="0.5"`` raised ``TypeError: can
    only concatenate str``, NaN ``cannot convert float NaN to integer``, ``scores=None`` "'NoneType'
    object is not subscriptable", a group's scores of another length an ``IndexError`` about a
    mask's shape. Cheap: one look per group (the target searches plan a few dozen times)."""
    from cleanai_core.options import plain_number

    value = plain_number(ratio)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise UserError(f"make_plan: ratio={shown(ratio)} must be a number from 0 up to (not including) 1")
    if not isinstance(scores, Mapping):
        raise UserError(
            f"make_plan: scores={shown(scores)} must be a dict of unit scores per group id, as pruner.score() "
            "returns it"
        )
    for g in groups:
        got = scores.get(g.id)
        if not isinstance(got, torch.Tensor) or got.dim() != 1 or got.numel() != g.size:
            has = f"a tensor of shape {tuple(got.shape)}" if isinstance(got, torch.Tensor) else shown(got)
            raise UserError(
                f"make_plan: scores[{g.id}] is {has}, but group {g.id} ({', '.join(g.modules()[:3])}) has {g.size} "
                "units: give one score per unit of every prunable group of the graph, as pruner.score() returns "
                "them (scores of another model or graph do not fit)"
            )
    # ratios={1: 2.0} pruned what the group allows, ratios=[0.5] raised "'list' object has no attribute 'get'"
    for name, table, keys in (("ratios", group_ratios, "group id"), ("set_ratios", scope_ratios, "isomorphic set")):
        if table is None:
            continue
        if not isinstance(table, Mapping):
            raise UserError(f"make_plan: {name}={shown(table)} must be a dict of ratios by {keys}, or None")
        for key, r in table.items():
            v = plain_number(r)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise UserError(
                    f"make_plan: {name}[{key!r}]={shown(r)} must be a number from 0 (keeps the group whole) up to "
                    "(not including) 1"
                )
    return float(value)


def _check_order_kept(g: Group, s: torch.Tensor, norm: Any) -> None:
    """A :class:`UserError` where global ranking's per-group normaliser reorders (or flattens)
    ``g``'s scores, ``s``: scores below 0 from a criterion of the user's were ranked by
    ``score / mean`` (a negative mean: every unit 0, pruned by index) or by their squares
    (``lamp``: -5 kept before 1), without a word. Looked at only where a score is below 0."""
    if not bool((s < 0).any()):
        return
    order = torch.argsort(s, stable=True)
    n = torch.as_tensor(norm(s), dtype=torch.float64)[order]
    flat = bool((n[1:] == n[:-1]).all()) and bool((s[order][1:] > s[order][:-1]).any())
    if flat or bool((n[1:] < n[:-1]).any()):
        raise UserError(
            f"group {g.id} ({', '.join(shown_name(m) for m in g.modules()[:3])}) has scores below 0 "
            f"(lowest {float(s.min()):.4g}), and global ranking's per-group normaliser does not keep their order "
            "('mean', 'max' and 'sum' divide by a total that needs scores >= 0, 'lamp' squares them): return scores "
            ">= 0 from the importance (e.g. scores - scores.min()), or choose normalizer='standardization' or "
            "'gaussian'"
        )


def make_plan(
    groups: list[Group],
    scores: dict[int, torch.Tensor],
    n_atoms: int,
    ratio: float,
    group_ratios: dict[int, float] | None = None,
    global_pruning: bool = False,
    max_layer_ratio: float = 0.9,
    round_to: int | None = None,
    min_units: int = 1,
    normalizer: Any = None,
    caps: dict[int, int] | None = None,
    scopes: Mapping[int, Hashable] | None = None,
    scope_ratios: Mapping[Hashable, float] | None = None,
    round_nearest: bool = False,
) -> PruningPlan:
    """Decide, per group, which units to prune.

    Uniform (default): each group loses ``ratio`` of its units (or its entry in
    ``group_ratios``), the lowest-scoring first. Global: scores normalised per group
    are ranked together and the lowest ``ratio`` of all units go, at most
    ``max_layer_ratio`` of any group. Frozen units are never pruned; at least
    ``min_units`` units stay in every group; ``round_to`` rounds kept channel counts
    up to a multiple (with ``round_nearest``: to the nearest one, :func:`limit_units`).
    ``caps``: per group id, the most units global ranking may take from it, instead of
    ``max_layer_ratio`` of its current size (iterative pruning caps by the original width,
    so the steps together never take more than ``max_layer_ratio``).
    ``scopes``: per group id, its ranking scope (isomorphic pruning,
    :mod:`cleanai_core.isomorphic`): global ranking runs within each scope on its own, and
    each loses ``ratio`` of its units (or its entry in ``scope_ratios``); groups not named
    rank in one scope together. Groups whose slices must keep the same count, or the
    same share (:func:`equalize_ties`), keep the most any of them asks.
    """
    ratio = _checked_plan_inputs(groups, scores, ratio, group_ratios, scope_ratios)
    group_ratios = group_ratios or {}
    plans = []
    if not global_pruning:
        counts = uniform_counts(groups, ratio, group_ratios, round_to, min_units, round_nearest)
        for g in groups:
            n = counts[g.id]
            plans.append(GroupPlan(g, scores[g.id], _lowest(scores[g.id], g.frozen, n), group_ratios.get(g.id, ratio)))
        equalize_ties(plans)
        return PruningPlan(plans, n_atoms)

    fixed = [g for g in groups if g.id in group_ratios]
    free = [g for g in groups if g.id not in group_ratios]
    for g in fixed:
        n = int(math.floor(group_ratios[g.id] * g.size + 1e-9))
        n = limit_units(g, n, round_to, min_units, None, round_nearest)
        plans.append(GroupPlan(g, scores[g.id], _lowest(scores[g.id], g.frozen, n), group_ratios[g.id]))
    norm = normalizer or (lambda s: s / s.mean() if float(s.mean()) > 0 else s)
    for g in free:
        _check_order_kept(g, scores[g.id], norm)
    caps = {
        g.id: limit_units(g, (caps or {}).get(g.id, int(math.floor(max_layer_ratio * g.size))), None, min_units)
        for g in free
    }
    chosen: dict[int, list[int]] = {g.id: [] for g in free}
    members: dict[Hashable, list[Group]] = {}
    for g in free:
        members.setdefault((scopes or {}).get(g.id), []).append(g)
    for scope, in_scope in members.items():
        r = (scope_ratios or {}).get(scope, ratio)
        budget = int(math.floor(r * sum(g.size for g in in_scope) + 1e-9))
        _rank(in_scope, scores, norm, budget, caps, chosen)
    counts = {gid: len(units) for gid, units in chosen.items()}
    for g in free:
        pruned = torch.zeros(g.size, dtype=torch.bool)
        n = limit_units(g, counts[g.id], round_to, min_units, None, round_nearest)
        if n:
            pruned = _lowest(scores[g.id], g.frozen, n) if n != counts[g.id] else pruned
            if n == counts[g.id]:
                pruned[torch.tensor(chosen[g.id], dtype=torch.int64)] = True
        plans.append(GroupPlan(g, scores[g.id], pruned, n / max(g.size, 1)))
    plans.sort(key=lambda gp: gp.group.id)
    equalize_ties(plans)
    return PruningPlan(plans, n_atoms)
