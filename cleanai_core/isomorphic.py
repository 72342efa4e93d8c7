"""Stage 4, planning: isomorphic sets, the ranking scopes of isomorphic pruning.

Global ranking compares the scores of every group, but the scores of structurally
different groups are not on one scale: a unit of an attention-heads group removes a whole
head across ``qkv`` and ``proj``, a unit of an MLP group one hidden neuron; a unit of a
3x3 conv reading 512 channels sums its score over 4608 weights, one of a 1x1 conv reading
64 over 64. Isomorphic pruning (Fang et al., "Isomorphic Pruning", ECCV 2024) ranks the
units of each set of isomorphic groups on its own, and every set loses the same ratio.

Glossary:

- *slice signature*: what one slice of a group looks like apart from how wide the group
  is: the class of the module that owns it (``"parameter"`` for a bare tensor), the slice's
  kind and name (``"out"``, ``"in"``, ``"channels"``, ``"heads"``...), how many of its
  indices one unit covers (a head covers ``3 * head_dim`` rows of a fused ``qkv``), and the
  shapes of the module's parameters with the pruned dimension left out (the first one as
  long as the slice; for a bare tensor, the traced dimension). The owner's name is not in it.
- *group signature*: the sorted tuple of its slices' signatures (a multiset).
- *isomorphic groups*: groups with equal signatures. An *isomorphic set* holds all the
  groups of one signature, in graph order.

What that makes of common models:

- ViT (timm, torchvision): the attention-heads groups of all blocks form one set, the MLP
  hidden groups another, the residual stream (patch embedding, norms, every block's
  input and output) a set of its own.
- ResNet: a bottleneck's inner groups match within a stage where their convs have the
  same shapes: in ResNet-50 ``layerK.*.conv2`` of every block of a stage form a set, and
  ``layerK.*.conv1`` of every block but the first (which reads the previous stage's
  width); in ResNet-18 only ``layer1``'s two blocks match (``layerK.0.conv1`` reads the
  previous stage's width, ``layerK.1.conv1`` this one's), so there isomorphic pruning is
  close to uniform pruning. Each stage's residual group is a set of its own.

Why shapes count (not only the module types, which would put every stage's inner convs in
one set): the fan-in sets how many weights a unit's score sums and the stage sets the
resolution its activations are measured at, so scores of different stages are as far from
one scale as those of heads and MLP neurons; ranking them together is what lets global
pruning hollow out one stage. The pruned dimension is left out so that groups of a set
may differ in width.

Signatures are read once on the original model: pruning changes the widths that other
groups' signatures hold, so iterative pruning matches a later step's groups to the
original sets through their producing slices (:mod:`cleanai_core.steps`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from cleanai_core.graph.context import SliceSpec
from cleanai_core.graph.groups import Group
from cleanai_core.steps import slice_keys

__all__ = ["Signatures", "group_signature", "isomorphic_sets", "scopes_of", "signatures", "slice_signature"]

#: per producing slice ``(module, slice)`` of the original model: its group's signature
Signatures = dict[tuple[str, str], Hashable]


def _without(shape: tuple[int, ...], dim: int | None, length: int) -> tuple[int, ...]:
    if dim is None:
        dim = next((i for i, n in enumerate(shape) if n == length), None)
    if dim is None or not -len(shape) <= dim < len(shape):
        return shape
    dim %= len(shape)
    return shape[:dim] + shape[dim + 1 :]


def slice_signature(model: Any, spec: SliceSpec, units: int) -> tuple[Hashable, ...]:
    """The signature of ``spec``, a slice of a group of ``units`` units of ``model``."""
    length = int(spec.atoms.numel())
    per_unit = length // max(units, 1)
    if not spec.module:  # a bare parameter or buffer; ``dim`` is the traced one
        tensor = _tensors(model).get(spec.name)
        shape = tuple(tensor.shape) if tensor is not None else ()
        return ("parameter", spec.kind, per_unit, (_without(shape, spec.dim, length),))
    try:
        module = model.get_submodule(spec.module)
    except AttributeError:  # a name the trace gave, not a submodule: compare by slice alone
        return ("?", spec.kind, spec.name, per_unit, ())
    shapes = tuple(_without(tuple(p.shape), None, length) for _, p in sorted(module.named_parameters()))
    return (type(module).__qualname__, spec.kind, spec.name, per_unit, shapes)


def group_signature(model: Any, group: Group) -> tuple[Hashable, ...]:
    """The multiset of ``group``'s slice signatures, as a sorted tuple."""
    return tuple(sorted((slice_signature(model, s, group.size) for s in group.slices), key=repr))


def isomorphic_sets(model: Any, groups: list[Group]) -> list[list[Group]]:
    """``groups`` of ``model`` (a graph's groups, on the model the graph traced) split into
    isomorphic sets, each in graph order, the sets ordered by their first group."""
    sets: dict[tuple[Hashable, ...], list[Group]] = {}
    for g in groups:
        sets.setdefault(group_signature(model, g), []).append(g)
    return list(sets.values())


def signatures(model: Any, groups: list[Group]) -> Signatures:
    """The signature of every group of ``model``, under each of its producing slices."""
    out: Signatures = {}
    for g in groups:
        out.update(dict.fromkeys(slice_keys(g), group_signature(model, g)))
    return out


def scopes_of(groups: list[Group], original: Signatures) -> dict[int, Hashable]:
    """Per group id, the signature of its set in ``original`` (:func:`signatures` of the
    original model), matched through its producing slices; a group that matches none is
    a set of its own."""
    return {g.id: next((original[k] for k in slice_keys(g) if k in original), ("alone", g.id)) for g in groups}


def _tensors(model: Any) -> dict[str, Any]:
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(dict(model.named_buffers(remove_duplicate=False)))
    return out
