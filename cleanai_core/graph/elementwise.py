"""The kernel's default for element-wise operations: labels follow broadcasting."""

from __future__ import annotations

import math
from typing import Any

import torch

from cleanai_core.graph.context import TraceContext
from cleanai_core.graph.trace import TRef

__all__ = ["broadcast", "elementwise", "is_pointwise"]


# element-wise ops ATen does not tag ``pointwise`` (for every overload)
_UNTAGGED = {
    "hardswish", "where", "masked_fill", "log_sigmoid_forward", "_prelu_kernel", "prelu", "rrelu_with_noise",
    "complex", "polar", "floor_divide",
}  # fmt: skip


def is_pointwise(op: Any) -> bool:
    """ATen's ``pointwise`` tag; in-place variants (``relu_``) follow their functional op."""
    if torch.Tag.pointwise in getattr(op, "tags", ()):
        return True
    name = getattr(getattr(op, "overloadpacket", None), "__name__", "")
    if name in _UNTAGGED or name.rstrip("_") in _UNTAGGED:
        return True
    if name.endswith("_") and not name.startswith("_"):
        functional = getattr(torch.ops.aten, name[:-1], None)
        overload = getattr(functional, getattr(op, "_overloadname", "default"), None) if functional else None
        return overload is not None and torch.Tag.pointwise in overload.tags
    return False


def broadcast(ctx: TraceContext, inputs: list[Any], out: Any) -> None:
    """Couple tensors that broadcast together into ``out`` and label ``out``.

    Inputs labelled on the same output dimension are unioned index by index; an input
    that is not labelled there but has size > 1 freezes those channels (it cannot
    shrink with them); labels on any other dimension are frozen.
    """
    if not isinstance(out, TRef):
        for ref in inputs:
            ctx.freeze_tensor(ref, f"{ctx.where()} has no single tensor output")
        return
    nd = out.ndim
    refs = [r for r in inputs if isinstance(r, TRef)]
    labelled = []
    for r in refs:
        lab = ctx.label_of(r)
        if lab is None:
            continue
        if r.shape[lab.dim] == 1 and out.shape[lab.dim + nd - r.ndim] != 1:
            ctx.freeze(lab.atoms, f"a single channel is broadcast by {ctx.where()}")
            continue
        labelled.append((lab.dim + nd - r.ndim, lab, r))
    scalars = [item for item in labelled if math.prod(item[2].shape) == 1]
    if scalars and len(scalars) < len(labelled):
        # a one-element tensor beside channels (a learnable scalar ``scale * x`` on 1x1 maps)
        # is broadcast, whatever output dimension its own label lands on (a tensor with one
        # channel but more elements, Falcon's single key/value head, keeps its label)
        for _, lab, _ in scalars:
            ctx.freeze(lab.atoms, f"a single channel is broadcast by {ctx.where()}")
        labelled = [item for item in labelled if math.prod(item[2].shape) != 1]
    if not labelled:
        return
    # a bare matrix's guess, then a bare tensor's, gives way to the others
    labelled.sort(key=lambda e: (e[1].cross is not None, ctx.is_bare(e[1])))
    dim = labelled[0][0]
    first = labelled[0][1]
    coupled = {id(labelled[0][2])}
    for d, lab, r in labelled[1:]:
        if d == dim and lab.atoms.numel() == first.atoms.numel():
            ctx.union(first.atoms, lab.atoms)
            coupled.add(id(r))
        elif _cross_meets(lab, r, nd, dim, first):
            # a bare matrix whose other dimension lines up with the channels (``h[..., None]
            # * self.basis``, ``basis: (C, K)``): its rows follow them, its columns stay
            ctx.union(first.atoms, ctx.take_cross(lab))
            ctx.freeze(lab.atoms, f"the other dimension of a matrix broadcast with channels in {ctx.where()}")
            coupled.add(id(r))
        elif (moved := _bare_on(ctx, r, lab, dim - (nd - r.ndim), first)) is not None:
            ctx.union(first.atoms, moved.atoms)
            coupled.add(id(r))
        else:
            ctx.freeze(lab.atoms, f"channels on different dimensions meet in {ctx.where()}")
    for r in refs:
        if id(r) in coupled:
            continue
        local = dim - (nd - r.ndim)
        if local >= 0 and r.shape[local] > 1 and local not in ctx.spread.get(r.key, ()):
            ctx.freeze(first.atoms, f"{ctx.where()} combines channels with a tensor that cannot shrink")
    if out.shape[dim] == first.atoms.numel():
        ctx.set_label(out, dim, first.atoms, first.origin, _second(ctx, labelled, refs, out))


def _second(ctx: TraceContext, labelled: list, refs: list, out: Any) -> tuple[int, torch.Tensor] | None:
    """The second labelled dimension of the labelled inputs (a token MLP's hidden units
    through its activation; the two halves of a gated one, unioned), where each has one on
    the same output dimension and no unlabelled input is as wide there; else ``None`` (they
    are frozen: :meth:`TraceContext.end`)."""
    crossed = [(lab, src) for _, lab, src in labelled if lab.cross is not None]
    if not crossed:
        return None
    nd = out.ndim
    dims = {lab.cross[0] + nd - src.ndim for lab, src in crossed}
    d, first = dims.pop(), crossed[0][0]
    if dims or out.shape[d] != first.cross[1].numel():
        return None
    # any other input only broadcasts along it: a per-row norm dividing a weight read
    # outside its module (``w.div_(w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))``, a max-norm
    # constraint) froze its input channels ("a second labelled dimension reaches op aten.div_")
    srcs = [src for _, src in crossed]
    for r in refs:
        local = d - (nd - r.ndim)
        if (
            all(r is not s for s in srcs)
            and local >= 0
            and r.shape[local] > 1
            and local not in ctx.spread.get(r.key, ())
        ):
            return None  # (expanded along it, ``F.normalize``'s norm, it still only broadcasts)
    if not all(ctx.merge_second(first, lab) for lab, _ in crossed[1:]):
        return None
    return (d, first.cross[1])


def _bare_on(ctx: TraceContext, ref: Any, lab: Any, local: int, first: Any) -> Any:
    """``ref``'s label moved to its dimension ``local`` (where the channels stand), for a
    bare tensor first read here whose guessed dimension is another one
    (:meth:`TraceContext.regard_bare`); ``None`` when that cannot be."""
    if local < 0 or ref.shape[local] != first.atoms.numel() or not ctx.is_bare(lab):
        return None
    return ctx.regard_bare(ref, lab, local)


def _cross_meets(lab: Any, ref: Any, nd: int, dim: int, first: Any) -> bool:
    """``ref`` carries a second label (a bare matrix's rows) on output dimension ``dim``,
    as wide as the channels there."""
    if lab.cross is None:
        return False
    cross_dim, atoms = lab.cross
    return cross_dim % ref.ndim + nd - ref.ndim == dim and atoms.numel() == first.atoms.numel()


def elementwise(call: Any, ctx: TraceContext) -> None:
    """Element-wise op: every tensor argument broadcasts into every output."""
    inputs = call.inputs
    if ctx.statistics.pending:
        ctx.statistics.meet(call, ctx)
    for out in call.outputs:
        broadcast(ctx, inputs, out)
