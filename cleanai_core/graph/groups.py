"""Units and groups: the result of coupling.

A *unit* is a connected set of atoms (the smallest thing that can be removed). A
:class:`Group` is the set of units that touch exactly the same slices, e.g. the 64
output channels of ``conv1`` together with ``bn1`` and the input columns of ``conv2``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import attrs
import torch

from cleanai_core.errors import shown_name
from cleanai_core.graph.context import SliceSpec

__all__ = ["Group", "components", "make_groups", "named_alone", "unique"]


def unique(t: torch.Tensor) -> torch.Tensor:
    """``torch.unique`` (sorted) of a 1-D integer tensor, by one sort and a comparison of
    neighbours (faster than ``torch.unique`` on the CPU)."""
    return _unique(t)


def _unique(t: torch.Tensor, return_inverse: bool = False) -> Any:
    s, order = torch.sort(_narrow(t), stable=True)
    s = s.to(t.dtype)
    new = _firsts(s)
    if not return_inverse:
        return s[new]
    inverse = torch.empty_like(t)
    inverse[order] = torch.cumsum(new, 0) - 1
    return s[new], inverse


def _firsts(s: torch.Tensor) -> torch.Tensor:
    """Where a sorted 1-D tensor's values change (the first of each run of equal values)."""
    new = torch.ones(s.shape, dtype=torch.bool)
    torch.ne(s[1:], s[:-1], out=new[1:])
    return new


_INT32 = torch.iinfo(torch.int32)


def _narrow(t: torch.Tensor) -> torch.Tensor:
    """``t`` as int32 where its values fit: CPU sorts sort 32-bit keys over twice as fast
    (EfficientNet-B0's 83,000 (unit, slice) pairs: 1.9 -> 0.8 ms a sort, five sorts a graph)."""
    if t.dtype != torch.int64 or t.numel() < 1024:
        return t
    lo, hi = torch.aminmax(t)
    return t.to(torch.int32) if _INT32.min <= int(lo) and int(hi) <= _INT32.max else t


def components(n: int, unions: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Root (smallest atom id) of each atom's connected component, vectorised."""
    parent = torch.arange(n)
    if not unions or n == 0:
        return parent
    a = torch.cat([u[0] for u in unions])
    b = torch.cat([u[1] for u in unions])
    while True:
        pa, pb = parent[a], parent[b]
        low = torch.minimum(pa, pb)
        new = parent.clone()
        new.scatter_reduce_(0, pa, low, reduce="amin")
        new.scatter_reduce_(0, pb, low, reduce="amin")
        while True:  # pointer jumping until every atom points at its root
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, parent):
            return parent
        parent = new


@attrs.define(eq=False)
class Group:
    """Units that shrink the same slices.

    ``units``: root atom ids, sorted. ``frozen``: per unit, whether it must be kept.
    ``slices``: every slice the units touch. ``reasons``: why frozen units are frozen.
    ``normalizes``: a norm module or op normalises across the units (LayerNorm, GroupNorm,
    ``F.layer_norm``): pruning them changes its statistics, so slicing is not exactly
    zeroing and the masking oracle leaves the group out.
    """

    id: int
    units: torch.Tensor
    frozen: torch.Tensor
    slices: list[SliceSpec]
    reasons: list[str] = attrs.field(factory=list)
    normalizes: bool = False
    #: the layers no plugin claims (custom layers, subclasses traced through) whose outputs
    #: carry units of the group: ``layer_pruning_ratios`` naming one of them applies here
    layers: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return int(self.units.numel())

    @property
    def prunable(self) -> int:
        return int((~self.frozen).sum())

    def modules(self) -> list[str]:
        return sorted({s.module or s.name for s in self.slices})

    def describe(self) -> str:
        parts = ", ".join(f"{shown_name(s.module) if s.module else '<param>'}:{s.name}({s.kind})" for s in self.slices)
        return f"group {self.id}: {self.size} units ({self.prunable} prunable) -> {parts}"


def named_alone(name: str, names: Collection[str]) -> bool:
    """Whether the module ``name`` is in ``names`` and no module it sits in is: named for
    itself, not as a part of a container that was named (``ignored_layers``,
    ``layer_pruning_ratios`` cover every module inside a container)."""
    parts = name.split(".")
    return name in names and not any(".".join(parts[:i]) in names for i in range(1, len(parts)))


def make_groups(
    root: torch.Tensor,
    frozen_atoms: torch.Tensor,
    slices: list[SliceSpec],
    reasons: tuple[torch.Tensor, torch.Tensor, list[str]],
    normalized_atoms: torch.Tensor | None = None,
) -> list[Group]:
    """Group the units of ``root`` by the set of slices they touch. ``normalized_atoms``:
    atoms an op normalises across (their groups are marked ``normalizes``)."""
    n = root.numel()
    frozen_unit = torch.zeros(n, dtype=torch.bool)
    frozen_unit[root[frozen_atoms]] = True
    normalized_unit = torch.zeros(n, dtype=torch.bool)
    if normalized_atoms is not None:
        normalized_unit[root[normalized_atoms]] = True
    gen = torch.Generator().manual_seed(0)
    n_slices = max(len(slices), 1)
    salt = torch.randint(1, 2**62, (n_slices,), generator=gen)
    if not slices:
        return []
    # every (unit, slice) pair once, in one vectorised pass
    units_cat = torch.cat([root[s.atoms] for s in slices])
    slice_cat = torch.repeat_interleave(torch.arange(len(slices)), torch.tensor([s.atoms.numel() for s in slices]))
    pairs = _unique(units_cat * n_slices + slice_cat)
    pair_unit = torch.div(pairs, n_slices, rounding_mode="floor")
    pair_slice = pairs - pair_unit * n_slices
    sig = torch.zeros(n, dtype=torch.int64)
    sig.index_add_(0, pair_unit, salt[pair_slice])
    units = pair_unit[_firsts(pair_unit)]  # sorted already: pairs sort by unit first
    if units.numel() == 0:
        return []
    keys, inverse = _unique(sig[units], return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=keys.numel())
    per_group = torch.split(units[order], counts.tolist())
    group_of = torch.full((n,), -1, dtype=torch.int64)
    group_of[units] = inverse
    members: list[list[SliceSpec]] = [[] for _ in per_group]
    gs_pairs = _unique(group_of[pair_unit] * n_slices + pair_slice)
    gs_group = torch.div(gs_pairs, n_slices, rounding_mode="floor")
    for g, i in zip(gs_group.tolist(), (gs_pairs - gs_group * n_slices).tolist(), strict=True):
        members[g].append(slices[i])
    groups = []
    for g, us in enumerate(per_group):
        fz = frozen_unit[us]
        why = []
        if bool(fz.any()):
            r_unit, r_text, texts = reasons
            hit = torch.isin(r_unit, us[fz][:64])
            why = [texts[i] for i in torch.unique(r_text[hit]).tolist()[:5]]
        norm = bool(normalized_unit[us].any()) or any(s.normalizes for s in members[g])
        groups.append(Group(g, us, fz, members[g], why, norm))
    # deterministic order: by first slice appearance
    first = {id(s): i for i, s in enumerate(slices)}
    groups.sort(key=lambda gr: min(first[id(s)] for s in gr.slices))
    for i, gr in enumerate(groups):
        gr.id = i
    return groups
