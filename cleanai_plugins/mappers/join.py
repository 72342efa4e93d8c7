"""Concatenation and stacking."""

from __future__ import annotations

import torch

from cleanai_core import hookimpl
from cleanai_plugins.mappers._registry import MapperTable, arg

table = MapperTable()


def _atoms_at(ctx, ref, dim):
    """Labels of ``ref`` along ``dim``: fresh frozen atoms when it carries none there."""
    return ctx.labels(ref, dim)


def _restacked(ctx, tensors, out, dim) -> bool:
    """Channels unbound one by one and stacked back (``stack([f(t) for t in x.unbind(1)], 1)``,
    or ``cat`` of the pieces unsqueezed): the output carries them along ``dim``. Channels the
    pieces carry of their own (a layer applied to each) freeze: a tensor carries one channel
    dimension."""
    atoms = ctx.restack(tensors)
    if atoms is None:
        return False
    for t in tensors:
        lab = ctx.label_of(t)
        if lab is not None:
            ctx.freeze(lab.atoms, f"{ctx.where()} stacks them along unbound channels")
    ctx.set_label(out, dim, atoms)
    return True


@table.register("cat", "concat", "concatenate", "_cat")
def cat(call, ctx):
    tensors = [t for t in arg(call, 0, "tensors") if t.shape != (0,)]
    out = call.outputs[0]
    if not tensors:
        return
    dim = arg(call, 1, "dim", 0) % out.ndim
    if all(t.shape[dim] == 1 for t in tensors) and _restacked(ctx, tensors, out, dim):
        return
    labs = [ctx.label_of(t) for t in tensors]
    if all(lab is None for lab in labs):
        return
    if any(lab is not None and lab.dim == dim for lab in labs):
        # the head dimension cut by a rotary embedding and put back together (Gemma-4's ViT:
        # ``cat([-x2, x1])`` of its halves): every piece from one reshape split keeps its
        # origin, so attention after it can still ask for the other split (whole heads)
        origins = {lab.origin if lab is not None and lab.dim == dim else None for lab in labs}
        origin = origins.pop() if len(origins) == 1 else None
        if origin is not None and origin[2][origin[1]] != out.shape[dim]:  # not the split's part put back
            origin = None
        ctx.set_label(out, dim, torch.cat([_atoms_at(ctx, t, dim) for t in tensors]), origin)
        return
    ldim = next(lab.dim for lab in labs if lab is not None)
    first = _atoms_at(ctx, tensors[0], ldim)
    for t in tensors[1:]:
        ctx.union(first, _atoms_at(ctx, t, ldim))
    # pieces of one reshape split (EVA's rope: cat(q[:, :, :1], rope(q[:, :, 1:]), dim=2))
    # keep its origin, so attention after the cat can still ask for the other split
    origins = {lab.origin if lab is not None else None for lab in labs}
    ctx.set_label(out, ldim, first, origins.pop() if len(origins) == 1 else None)


@table.register("stack")
def stack(call, ctx):
    tensors = arg(call, 0, "tensors")
    out = call.outputs[0]
    dim = arg(call, 1, "dim", 0) % out.ndim
    if _restacked(ctx, tensors, out, dim):
        return
    labs = [ctx.label_of(t) for t in tensors]
    if all(lab is None for lab in labs):
        return
    ldim = next(lab.dim for lab in labs if lab is not None)
    first = _atoms_at(ctx, tensors[0], ldim)
    for t in tensors[1:]:
        ctx.union(first, _atoms_at(ctx, t, ldim))
    ctx.set_label(out, ldim + (dim <= ldim), first)


@hookimpl(trylast=True)
def cleanai_index_mapper(op):
    return table.lookup(op)
