"""Views and shape changes: view/reshape/flatten, permute/transpose, (un)squeeze,
expand/repeat, select/slice/narrow, split/chunk/unbind, unfold, copies and ``*_like``; the
``nn.Unflatten`` module, whose sizes are an attribute."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cleanai_core import hookimpl
from cleanai_core.graph.trace import TRef
from cleanai_core.interfaces import LayerPruner
from cleanai_core.model_state import from_library
from cleanai_plugins.mappers._registry import MapperTable, arg
from cleanai_plugins.mappers.gqa import expand_group_dim

__all__ = [
    "CHANNEL_PERMUTATIONS",
    "CHANNEL_RANGES",
    "FILLED_DESTINATIONS",
    "REWRITTEN_COUNTS",
    "UnflattenPruner",
    "allow_channel_permutations",
    "allow_channel_ranges",
    "allow_filled_destinations",
    "allow_unequal_split",
    "fresh_destination_problem",
    "reshape_label",
    "rewrites_stored_counts",
    "stored_width",
]

table = MapperTable()


def allow_unequal_split(ctx, ref) -> None:
    """``ref``'s channels may be split into parts of different sizes, each part shrinking
    on its own (the caller ties parts that must stay equal). Called by a layer pruner
    while tracing, when its module's fix-up rewrites the split sizes after slicing."""
    if isinstance(ref, TRef):
        ctx.unequal_splits.add(ref.key)


#: findings key (``cleanai_prepare_model``): the set of modules whose fix-up rewrites the
#: channel bounds their ``forward`` slices with
CHANNEL_RANGES = "channel_ranges"


def allow_channel_ranges(*modules) -> dict[str, set]:
    """The findings that let ops run directly in each of ``modules``' ``forward`` take a
    fixed range of channels (``x[:, : self.n]``) or split them into unequal parts: return
    it from ``cleanai_prepare_model``; the caller's fix-up rewrites the bounds after
    slicing (a kept range keeps its channels in order, so a bound ``n`` becomes the number
    of kept channels below ``n``)."""
    return {CHANNEL_RANGES: set(modules)}


#: findings key: the set of modules whose fix-up replaces their channel splits and channel
#: shuffles by stored index buffers (see :func:`allow_channel_permutations`)
CHANNEL_PERMUTATIONS = "channel_permutations"


def allow_channel_permutations(*modules) -> dict[str, set]:
    """The findings that let each of ``modules``' ``forward`` split its channels into parts
    that shrink on their own, equal parts too (``x.chunk(2, dim=1)``), and shuffle them
    (``view(B, g, C // g, ...)``, ``transpose(1, 2)``, ``view(B, C, ...)``) as the
    permutation it is, each channel on its own: return it from ``cleanai_prepare_model``.
    The caller's fix-up must then give the pruned module a ``forward`` that picks the parts
    and shuffles by index buffers it computes from the kept channels (the module's code
    cannot split or shuffle kept sets of different sizes). Without it an equal split ties
    its parts index by index and a shuffle ties channel *i* of every group."""
    return {CHANNEL_PERMUTATIONS: set(modules)}


#: findings key: the set of modules whose ``forward`` writes channels into a fresh tensor it
#: builds with the input's width read at run time (see :func:`allow_filled_destinations`)
FILLED_DESTINATIONS = "filled_destinations"


def allow_filled_destinations(*modules) -> dict[str, set]:
    """The findings that let ``dst.index_put_(indices, values)`` run directly in each of
    ``modules``' ``forward`` take its channels from ``values`` where ``dst`` carries none:
    the module vouches that ``dst`` is built there with the width of its input read at run
    time (torchvision's ``MultiScaleRoIAlign``: ``zeros(rois, x.shape[1], h, w)``), so it
    shrinks with the channels. Elsewhere such a destination may have a literal width."""
    return {FILLED_DESTINATIONS: set(modules)}


#: findings key: the set of modules whose after-prune fix-up rewrites the numbers they store
#: (``num_heads``) to the pruned widths (see :func:`rewrites_stored_counts`)
REWRITTEN_COUNTS = "rewritten_counts"


def rewrites_stored_counts(*modules) -> dict[str, set]:
    """The findings that tell the reshape mapper that each of ``modules`` has its stored
    numbers (``self.num_heads``) rewritten by the caller's fix-up after slicing: a reshape
    split's part sized by one of them may still carry the channels (see
    :func:`_stored_parts`). Return it from ``cleanai_prepare_model``."""
    return {REWRITTEN_COUNTS: set(modules)}


def stored_width(ctx, width: int, settings: bool = False) -> bool:
    """Whether the module whose ``forward`` runs the current op holds ``width`` as a plain
    int attribute (``self.hidden_size``, ``self.heads``): a size equal to it was most likely
    built from it, a number that does not shrink with the channels (JetMoE's mixture of
    attention writes its experts' outputs into ``zeros(tokens, self.hidden_size)``; a
    hand-written attention views its projection ``(B, N, 3, self.heads, -1)``).
    ``settings``: also in the settings objects it holds (:func:`_stored_numbers`) and among
    the ints its ``forward`` was handed (a head count its parent stores)."""
    module = ctx.scope_module()
    if module is None or width <= 1:
        return False
    if settings and width in ctx.scope_numbers():  # handed to its forward: ``self.attn(x, self.heads)``
        return True
    values = _stored_numbers(module) if settings else vars(module).values()
    return any(type(v) is int and v == width for v in values)


def _stored_numbers(module: nn.Module) -> Iterator[Any]:
    """The plain values ``module`` holds, and those of the settings objects it holds (a
    dataclass, a namespace, a dict by name, a ``*Config`` object such as transformers':
    ``self.config.num_heads``, ``self.args["heads"]``). Before 2026-12-02 a head count read
    from ``self.cfg.heads`` was not seen as stored: the heads were chosen and mixed
    (``check_pruner`` 4e-3 off)."""
    for v in vars(module).values():
        yield v
        if isinstance(v, type):
            continue
        if dataclasses.is_dataclass(v):  # by its fields: one with ``slots=True`` has no ``__dict__``
            yield from (getattr(v, f.name, None) for f in dataclasses.fields(v))
        elif isinstance(v, (types.SimpleNamespace, argparse.Namespace)) or (
            type(v).__name__.endswith("Config") and hasattr(v, "__dict__")
        ):
            yield from vars(v).values()
        elif type(v) is dict and len(v) <= 1000:
            yield from v.values()


def fresh_destination_problem(ctx, width: int) -> str | None:
    """Why a fresh destination without channels (``torch.zeros(n, heads, width)``,
    ``x.new_zeros(...)``) cannot take the channels that a scatter or ``index_put_`` writes
    into it, or ``None`` when it takes them. One rule for both: the destination is trusted
    to be built with a width read at run time unless that width is a number its module
    stores (:func:`stored_width`: it freezes here, with the reason); a literal width is
    found by verification, which leaves the group whole ("pruning it breaks the model").
    A module filed under :func:`allow_filled_destinations` vouches for its destinations
    whatever numbers it stores."""
    if ctx.scope_module() in ctx.findings.get(FILLED_DESTINATIONS, ()):
        return None
    if stored_width(ctx, width):
        return f"{ctx.where()} writes into a destination as wide as a number its module stores"
    return None


def _free_ranges(ctx) -> bool:
    """The module whose ``forward`` runs the current op vouched for its channel ranges."""
    return ctx.scope_module() in ctx.findings.get(CHANNEL_RANGES, ())


def _permutable(ctx) -> bool:
    """The module whose ``forward`` runs the current op vouched for its splits and shuffles
    (:func:`allow_channel_permutations`)."""
    return ctx.scope_module() in ctx.findings.get(CHANNEL_PERMUTATIONS, ())


def _sole_reader(ctx, ref, names: tuple[str, ...]) -> object | None:
    """The one event that reads ``ref``, when it is an op named in ``names`` reading it as its
    first argument; else None."""
    readers = ctx.readers(ref)
    if len(readers) != 1:
        return None
    op = getattr(readers[0], "op", None)
    name = getattr(getattr(op, "overloadpacket", None), "__name__", "")
    args = getattr(readers[0], "args", ())
    first = args[0] if args else None
    return readers[0] if name in names and isinstance(first, TRef) and first.key == ref.key else None


def _shuffled(call, ctx) -> bool:
    """``view(B, g, n, ...)`` of the channels, ``transpose`` of ``g`` and ``n``, an optional
    copy (``contiguous``), and ``view`` back to the input's shape: a channel shuffle, mapped
    as the permutation it is (output channel ``j * g + i`` is input channel ``i * n + j``)
    onto the last view's output, in a module that vouched for it
    (:func:`allow_channel_permutations`). The tensors between carry no label (each has one
    reader, the next step). False (nothing done) for anything else."""
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    d = lab.dim if lab is not None else -1
    if lab is None or lab.cross is not None or out.ndim != src.ndim + 1:
        return False
    g, n = out.shape[d], out.shape[d + 1] if d + 1 < out.ndim else 0
    if out.shape[:d] + (g * n,) + out.shape[d + 2 :] != src.shape or g < 2 or n < 2:
        return False
    turn = _sole_reader(ctx, out, ("transpose", "swapaxes", "swapdims"))
    if turn is None or {arg(turn, 1, "dim0") % out.ndim, arg(turn, 2, "dim1") % out.ndim} != {d, d + 1}:
        return False
    last = turn.outputs[0]
    copied = _sole_reader(ctx, last, ("clone", "contiguous"))
    last = copied.outputs[0] if copied is not None else last
    back = _sole_reader(ctx, last, ("view", "_unsafe_view", "reshape"))
    if back is None or back.outputs[0].shape != src.shape:
        return False
    order = torch.arange(g * n).reshape(g, n).t().reshape(-1)
    ctx.set_label(back.outputs[0], d, lab.atoms[order], lab.origin)
    return True


def _prod(xs) -> int:
    return math.prod(xs) if xs else 1


# along the channel dimension these are not the same over masked (zeroed) and kept channels
_ACROSS = {
    "cumprod",
    "logcumsumexp",
    "_softmax",
    "softmax",
    "_log_softmax",
    "log_softmax",
    "_safe_softmax",
    "special_softmax",
}


@table.register("new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided")
def fresh_tensor(call, ctx):
    """``x.new_zeros(size)`` reads only ``x``'s dtype and device: no channel flows, and the
    new tensor carries none (combined with channels later, it freezes them there)."""
    ctx.label_of(call.args[0])  # looked at, deliberately not carried


@table.register(
    "clone",
    "alias",
    "detach",
    "_to_copy",
    "lift_fresh",
    "lift_fresh_copy",
    "contiguous",
    "_conj",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand_like",
    "bernoulli",
    "bernoulli_",  # dropout's mask in training mode, drawn into an ``empty_like`` of its input
    "randn_like",
    "resolve_conj",
    "resolve_neg",
    "to",
    "_reshape_alias",
    "native_dropout",
    "dropout",
    "feature_dropout",
    "alpha_dropout",
    "cumsum",
    *sorted(_ACROSS),
)
def identity(call, ctx):
    """Output ``i`` has the label of the first tensor argument."""
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    name = getattr(call.op, "overloadpacket", call.op).__name__
    if name in _ACROSS and arg(call, 1, "dim") is not None and arg(call, 1, "dim") % max(src.ndim, 1) == lab.dim:
        ctx.freeze(lab.atoms, f"{ctx.where()}: {name} across channels depends on their number")
        return
    placed = False
    for out in call.outputs:
        if out.shape == src.shape:  # a matrix's second label too (``self.proj.to(x.dtype)``)
            ctx.set_label(out, lab.dim, lab.atoms, lab.origin, lab.cross if name not in _ACROSS else None)
            placed = True
    if not placed:
        ctx.freeze(lab.atoms, f"{ctx.where()} changes the shape")


def _repeats_along(grid: torch.Tensor, dim: int) -> bool:
    """Whether every slice of ``grid`` along ``dim`` holds the same atoms."""
    return grid.shape[dim] > 1 and bool((grid == grid.narrow(dim, 0, 1)).all())


def _stored_parts(ctx, grid: tuple, dims: list[int], sizes: list | None) -> set[int]:
    """The parts of a reshape split that cannot carry the channels: sized by a number the
    module stores, in a view that gives another part as ``-1`` (``view(B, N, 3, self.heads,
    -1)``: the head width is computed, the heads are not). Empty where no part is ``-1``
    (timm's ``reshape(B, N, 3, self.num_heads, self.head_dim)``, whose fix-up rewrites both
    numbers), where the heads stay whole by a plugin's word, and in a module whose stored
    numbers a plugin's fix-up rewrites (:func:`rewrites_stored_counts`). Before 2026-12-01 a
    hand-written attention with 8 heads of 4 chose the heads, by size, and verification
    refused the group ("pruning it breaks the model")."""
    if sizes is None or ctx.keeps_whole_heads() or ctx.scope_module() in ctx.findings.get(REWRITTEN_COUNTS, ()):
        return set()
    stored = {i for i, n in enumerate(grid) if stored_width(ctx, n, settings=True)}
    free = {i for i in range(len(grid)) if sizes[dims[i]] == -1}
    if not free and not from_library(ctx.scope_module()):
        # the ``-1`` was resolved before the view reached the trace (``x.unflatten(-1, (3,
        # self.heads, -1))`` views with the sizes it computed, as ``view(B, N, 3, self.heads,
        # C // self.heads)`` does): in the user's own module, the parts sized by no stored
        # number are the computed ones. A library's module may store numbers that its zoo
        # plugin's fix-up rewrites (timm's EvoNorm ``groups``): those keep the cheapest part
        free = set(range(len(grid))) - stored
    return stored - free if free else set()


def reshape_label(ctx, src: TRef, out: TRef, sizes: list | None = None) -> None:
    """Map the label of ``src`` onto ``out`` of another shape with the same numel.

    The labelled dimension of ``src`` lands on the output dimensions whose positions
    in the flat layout it spans. One dimension: labels are gathered (flatten repeats a
    channel over its spatial positions). Several (a split, e.g. ``3C -> (3, h, d)``):
    they are tied so that pruning stays rectangular, keeping the dimension chosen by
    the kernel's split choice (default: the cheapest tie, larger dims first; in an
    attention module named by the ``cleanai_whole_heads`` hook, the outermost: the heads).
    """
    lab = ctx.label_of(src)
    if lab is None:
        return
    d, c = lab.dim, src.shape[lab.dim]
    inner = _prod(src.shape[d + 1 :])
    so = out.shape
    strides = [_prod(so[k + 1 :]) for k in range(len(so))]
    dims = [k for k in range(len(so)) if so[k] > 1 and strides[k] * so[k] > inner and strides[k] < inner * c]
    if not dims or _prod([so[k] for k in dims]) > 50_000_000:
        ctx.freeze(lab.atoms, f"{ctx.where()} reshapes channels in a way that cannot be followed")
        return
    offset = torch.zeros((), dtype=torch.int64)
    for i, k in enumerate(dims):
        shape = [1] * len(dims)
        shape[i] = so[k]
        offset = offset + torch.arange(so[k]).reshape(shape) * strides[k]
    grid = lab.atoms[(offset // inner) % c]
    if len(dims) == 1:
        single = c == so[-1] and len(so) > src.ndim  # a size-1 dim put in, not (B, 1 token, C) merged
        if ctx.keeps_whole_heads() and single and dims[0] == len(so) - 1 and so[-2] == 1 < so[-1]:
            # (..., 1, head_dim): a single head (multi-query attention's key and value)
            ctx.set_label(out, len(so) - 2, ctx.tie(grid.reshape(-1), (1, so[-1]), 0), lab.origin)
            return
        ctx.set_label(out, dims[0], grid.reshape(-1), lab.origin)
        return
    event = ctx.event.index
    fixed = _stored_parts(ctx, tuple(grid.shape), dims, sizes)
    choice = ctx.split_choices.get(event)
    if choice in fixed:  # asked for a part that a stored number sizes: it cannot shrink
        choice = None
    if choice is None and ctx.keeps_whole_heads():
        # (heads, head_dim), (heads, 3, head_dim), (kv, group, head_dim): the heads, the
        # outermost dimension that is not a copy (eager attention's bmm folds the batch
        # into the heads, ``(b * heads) -> (b, heads)``: the batch repeats the same atoms)
        choice = next((i for i in range(len(dims) - 1) if not _repeats_along(grid, i)), len(dims) - 1)
    elif choice is None:
        costs = []
        for i in range(len(dims)):
            g = grid.movedim(i, 0).reshape(grid.shape[i], -1)
            costs.append((int((g != g[:, :1]).sum()), -grid.shape[i], -i))
        choice = min((i for i in range(len(dims)) if i not in fixed), key=lambda i: costs[i])
    rep = ctx.tie(grid, tuple(grid.shape), choice)
    ctx.set_label(out, dims[choice], rep, (event, choice, tuple(grid.shape)))


@table.register("view", "_unsafe_view", "reshape", "view_copy", "_reshape_copy", "unflatten", "flatten")
def view(call, ctx):
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is not None and lab.cross is not None and _unit_dims_only(src.shape, out.shape):
        # a bare matrix given size-1 dims (einsum's ``(C, K) -> (1, C, K)``): both its labels go on
        where = [d for d, n in enumerate(out.shape) if n != 1]
        kept = [d for d, n in enumerate(src.shape) if n != 1]
        move = {d: where[kept.index(d)] for d in kept}
        ctx.set_label(out, move[lab.dim], lab.atoms, lab.origin, (move[lab.cross[0]], lab.cross[1]))
    elif src.shape == out.shape:
        ctx.copy_label(src, out)
    elif _permutable(ctx) and _shuffled(call, ctx):
        return
    else:
        sizes = arg(call, 1, "size")
        ok = isinstance(sizes, (list, tuple)) and len(sizes) == out.ndim
        reshape_label(ctx, src, out, list(sizes) if ok else None)


def _unit_dims_only(a: tuple, b: tuple) -> bool:
    """``a`` and ``b`` differ only by dims of size 1."""
    return [n for n in a if n != 1] == [n for n in b if n != 1]


@table.register("permute", "permute_copy")
def permute(call, ctx):
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    perm = [p % src.ndim for p in arg(call, 1, "dims")]
    cross = (perm.index(lab.cross[0]), lab.cross[1]) if lab.cross is not None else None
    ctx.set_label(call.outputs[0], perm.index(lab.dim), lab.atoms, lab.origin, cross)


@table.register("transpose", "transpose_copy", "swapaxes", "swapdims", "transpose_", "swapaxes_", "swapdims_")
def transpose(call, ctx):
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    if src.ndim == 0:
        return
    a, b = arg(call, 1, "dim0") % src.ndim, arg(call, 2, "dim1") % src.ndim
    d = b if lab.dim == a else a if lab.dim == b else lab.dim
    cross = None
    if lab.cross is not None:
        c = lab.cross[0]
        cross = (b if c == a else a if c == b else c, lab.cross[1])
    ctx.set_label(call.outputs[0], d, lab.atoms, lab.origin, cross)


@table.register("t", "numpy_T", "t_")
def t(call, ctx):
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    d = lab.dim if src.ndim < 2 else src.ndim - 1 - lab.dim
    cross = (1 - lab.cross[0], lab.cross[1]) if lab.cross is not None and src.ndim == 2 else None
    ctx.set_label(call.outputs[0], d, lab.atoms, lab.origin, cross)


@table.register("unsqueeze", "unsqueeze_copy", "unsqueeze_")
def unsqueeze(call, ctx):
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    dim = arg(call, 1, "dim") % out.ndim
    cross = (lab.cross[0] + (dim <= lab.cross[0]), lab.cross[1]) if lab.cross is not None else None
    ctx.set_label(out, lab.dim + (dim <= lab.dim), lab.atoms, lab.origin, cross)


@table.register("squeeze", "squeeze_copy", "squeeze_")
def squeeze(call, ctx):
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    dims = arg(call, 1, "dim")
    if dims is None:
        dims = [i for i, s in enumerate(src.shape) if s == 1]
    elif isinstance(dims, int):
        dims = [dims]
    dims = [x % max(src.ndim, 1) for x in dims if src.shape[x % src.ndim] == 1]
    if lab.dim in dims:
        ctx.freeze(lab.atoms, f"{ctx.where()} squeezes away a single-channel dimension")
        return
    cross = None
    if lab.cross is not None and lab.cross[0] not in dims:
        cross = (lab.cross[0] - sum(x < lab.cross[0] for x in dims), lab.cross[1])
    ctx.set_label(out, lab.dim - sum(x < lab.dim for x in dims), lab.atoms, lab.origin, cross)


@table.register("view_as_complex", "view_as_real")
def complex_view(call, ctx):
    """``view_as_complex`` folds the last dimension (2: the real and imaginary parts) into
    one complex value, ``view_as_real`` unfolds it again (Llama 4's rotary embedding,
    GFNet's filter ``(h, w, C, 2)``): channels on the other dimensions keep their place; on
    the folded pair, they freeze."""
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    pair = src.ndim - 1 if out.ndim < src.ndim else None
    if lab.dim == pair or (lab.cross is not None and lab.cross[0] == pair):
        ctx.freeze(lab.atoms, f"{ctx.where()} reads the labelled dimension as real and imaginary parts")
        return
    ctx.set_label(out, lab.dim, lab.atoms, lab.origin, lab.cross)


@table.register("expand", "expand_copy", "expand_as", "broadcast_to")
def expand(call, ctx):
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    shift = out.ndim - src.ndim
    grown = {d for d in range(out.ndim) if out.shape[d] > 1 and (d < shift or src.shape[d - shift] == 1)}
    if grown and isinstance(out, TRef) and isinstance(src, TRef):
        # one value repeated along the grown dimensions: it may meet channels (or, labelled, a
        # weight's second label: ``F.normalize(fc.weight, dim=1)``'s expanded norm) there
        ctx.spread[out.key] = grown | {d + shift for d in ctx.spread.get(src.key, ())}
    if lab is None:
        return
    if src.shape[lab.dim] != out.shape[lab.dim + shift]:
        ctx.freeze(lab.atoms, f"{ctx.where()} broadcasts a single channel")
        if src.shape[lab.dim] == 1 and ctx.keeps_whole_heads():
            # multi-query attention: the one key/value head is broadcast to the query heads
            # (eager ``q @ k^T``); it stays, and its copies shrink with the query heads
            ctx.set_label(out, lab.dim + shift, ctx.new_atoms(out.shape[lab.dim + shift]))
        return
    if expand_group_dim(ctx, src, out, lab):  # repeat_kv, query heads per group
        return
    if ctx.keeps_whole_heads() and _broadcasts_one_head(ctx, src, out, lab):
        return
    ctx.set_label(out, lab.dim + shift, lab.atoms, lab.origin)


def _broadcasts_one_head(ctx, src, out, lab) -> bool:
    """Multi-query attention whose one key/value head carries its channels on the head
    dimension (GPT-BigCode's ``c_attn(x).unsqueeze(1).split(...)``: no reshape into heads),
    broadcast by eager ``repeat_kv`` (``(b, 1, 1, s, d) -> (b, 1, g, s, d)``) to the query
    heads: the key/value head stays, and its copies get fresh atoms that shrink with the
    query heads they meet, as when the one head is labelled on its heads dimension.
    Returns whether it labelled ``out``."""
    shift = out.ndim - src.ndim
    if lab.dim != src.ndim - 1:
        return False
    grown = [d for d in range(shift, out.ndim - 1) if src.shape[d - shift] == 1 and out.shape[d] > 1]
    if len(grown) != 1 or grown[0] - shift < 1 or src.shape[grown[0] - shift - 1] != 1:
        return False  # not one new group dimension right after a single key/value head
    ctx.freeze(lab.atoms, f"{ctx.where()}: multi-query attention keeps its key/value head")
    ctx.set_label(out, grown[0], ctx.new_atoms(out.shape[grown[0]]))
    return True


@table.register("repeat")
def repeat(call, ctx):
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    shift = out.ndim - src.ndim
    d = lab.dim + shift
    factor = out.shape[d] // src.shape[lab.dim]
    ctx.set_label(out, d, lab.atoms.repeat(factor), lab.origin)


@table.register("select", "select_copy")
def select(call, ctx):
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    dim = arg(call, 1, "dim") % src.ndim
    if dim == lab.dim:
        index = arg(call, 2, "index")
        if isinstance(index, int) and -src.shape[dim] <= index < 0:
            # a constant counted from the end (BART's ``inputs_embeds[:, :, -1]``, read for its
            # shape): the picked channel and those after it stay, so it picks the same one
            ctx.freeze(lab.atoms[src.shape[dim] + index :], f"{ctx.where()} picks a channel counted from the end")
            return
        _ask_inner_split(ctx, lab)
        ctx.freeze(lab.atoms, f"{ctx.where()} picks one channel by index")
        return
    ctx.set_label(out, lab.dim - (dim < lab.dim), lab.atoms, lab.origin)


def _ask_inner_split(ctx, lab) -> None:
    """Picking along a reshape split's kept part (q, k and v of ``(3, heads, head_dim)``
    when the heads must stay whole and the three parts are tied): ask the kernel to keep
    the part inside it instead. Only there: elsewhere the inner part chosen this way paired
    q's and k's channels unlike the masking oracle (a random (3, 2, 2) split, 1e-3 off)."""
    if ctx.keeps_whole_heads() and lab.origin is not None and lab.origin[1] + 1 < len(lab.origin[2]):
        ctx.request_split(lab.origin, lab.origin[1] + 1)


@table.register("slice", "slice_copy", "narrow", "narrow_copy")
def slice_(call, ctx):
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    dim = arg(call, 1, "dim", 0) % src.ndim
    if dim == lab.dim and out.shape[dim] != src.shape[dim]:
        idx = _slice_positions(call, src.shape[dim])
        if idx is not None and len(idx) == out.shape[dim] and _free_ranges(ctx):
            ctx.set_label(out, dim, lab.atoms[idx.start : idx.stop : idx.step], lab.origin)
            return
        if idx is not None and len(idx) == out.shape[dim] and not ctx.is_bare(lab) and _counted_bounds(call, ctx, lab):
            ctx.set_label(out, dim, lab.atoms[idx.start : idx.stop], lab.origin)
            return
        keep = _fixed_span(call, src.shape[dim]) if idx is not None and len(idx) == out.shape[dim] else None
        # a bare tensor's constant range is mostly positions cut to the input's length (a
        # causal mask ``bias[:, :, :T, :T]``, a position table ``pos[:, :T]``): the bounds
        # come from the example's shape, and the rest must stay for longer inputs
        if keep is None or ctx.is_bare(lab):
            ctx.freeze(lab.atoms, f"{ctx.where()} takes a fixed range of channels")
            return
        # ``x[:, a:b]`` with constant bounds reads the same channels after slicing as long as
        # none before ``b`` goes (none before ``a`` for ``x[:, a:]``, none from ``-a`` on for
        # ``x[:, -a:]``): those stay, the others may go
        ctx.freeze(lab.atoms[keep], f"{ctx.where()} takes a fixed range of channels")
        ctx.set_label(out, dim, lab.atoms[idx.start : idx.stop], lab.origin)
        return
    ctx.set_label(out, lab.dim, lab.atoms, lab.origin)


def _counted_bounds(call, ctx, lab) -> bool:
    """``x[:, : self.oup]``, ``x[:, self.a : self.b]`` (GhostNet's module, a hand-written
    gate): the bounds of a ``slice`` with step 1 that its module holds, each in one
    attribute, become ``count`` slices of the channels below them, so they follow the
    pruning (a bound ``n`` becomes the number of channels kept below ``n``); True where
    they did. Before 2026-12-02 the channels up to the bound were frozen."""
    if "narrow" in str(call.op):
        return False
    size = lab.atoms.numel()
    start, end, step = arg(call, 2, "start"), arg(call, 3, "end"), arg(call, 4, "step", 1)
    bounds = [b for b in (start, end) if isinstance(b, int) and 0 < b < size]
    if step != 1 or not bounds or any(b is not None and (not isinstance(b, int) or b < 0) for b in (start, end)):
        return False
    counts = _stored_counts(ctx, bounds)
    if counts is None:
        return False
    for b in bounds:
        ctx.counted(counts[b], lab.atoms[:b])
    return True


def _slice_positions(call, size: int) -> range | None:
    """The positions ``slice`` / ``narrow`` keep along a dimension of ``size``."""
    if "narrow" in str(call.op):
        start, length = arg(call, 2, "start"), arg(call, 3, "length")
        if not isinstance(start, int) or not isinstance(length, int):
            return None
        start = start % size if size else 0
        return range(start, start + length)
    start, end, step = arg(call, 2, "start"), arg(call, 3, "end"), arg(call, 4, "step", 1)
    if not all(isinstance(v, int) or v is None for v in (start, end)) or not isinstance(step, int):
        return None
    return range(size)[slice(start, end, step)]


def _fixed_span(call, size: int) -> slice | None:
    """For a ``slice`` / ``narrow`` with step 1 along ``size`` channels: the channels that
    must stay for it to read the same ones when the others go, those up to its end (up to
    its start when it runs to the end; from its start on when it counts from the end).
    ``None`` when that is all of them or unknown (a step, bounds counted from both ends)."""
    if "narrow" in str(call.op):
        start, length = arg(call, 2, "start"), arg(call, 3, "length")
        if not isinstance(start, int) or not isinstance(length, int):
            return None
        return slice(0, start + length) if start >= 0 else slice(size + start, None)
    start, end, step = arg(call, 2, "start"), arg(call, 3, "end"), arg(call, 4, "step", 1)
    start = 0 if start is None else start
    if step != 1 or not isinstance(start, int) or not (end is None or isinstance(end, int)):
        return None
    open_end = end is None or end >= size
    if start < 0:
        return slice(size + start, None) if open_end or end < 0 else None
    if open_end:
        return slice(0, start)  # runs to the end: only the channels before it must stay in place
    return slice(0, end) if end >= 0 else None


@table.register("split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "split_copy", "tensor_split")
def split(call, ctx):
    src = call.args[0]
    outs = call.outputs
    lab = ctx.label_of(src)
    if lab is None:
        return
    dim = arg(call, 2, "dim", 0) % src.ndim
    if dim != lab.dim:  # a second labelled dimension split (a gated token MLP) or passed on
        across = lab.cross is not None and lab.cross[0] == dim
        parts = ctx.split_second(lab, [o.shape[dim] for o in outs]) if across else None
        for i, o in enumerate(outs):
            cross = (dim, parts[i]) if parts is not None else None if across else lab.cross
            ctx.set_label(o, lab.dim, lab.atoms, lab.origin, cross)
        return
    sizes = [o.shape[dim] for o in outs]
    vouched = src.key in ctx.unequal_splits or _free_ranges(ctx) or _permutable(ctx)  # its fix-up splits
    counts = _stored_counts(ctx, sizes) if not vouched and "tensor_split" not in str(call.op) else None
    if len(set(sizes)) != 1 or _permutable(ctx):
        if counts is None and not vouched:
            ctx.freeze(lab.atoms, f"{ctx.where()} splits channels into unequal parts")
            return
        start = 0
        for o, s in zip(outs, sizes, strict=True):
            ctx.set_label(o, dim, lab.atoms[start : start + s], lab.origin)
            if counts is not None:  # ``split((self.a, self.b))``: each part its count (a size, one count)
                ctx.counted(counts[s], lab.atoms[start : start + s])
            start += s
        return
    if sizes[0] == 1 and len(sizes) > 1:  # ``x.split(1, 1)``, ``x.chunk(C, 1)``: one channel a part
        ctx.unbind_pieces(outs, lab.atoms)  # free where the parts are stacked back after the same work
        return
    ctx.tie(lab.atoms, (len(sizes), sizes[0]), 1)
    if counts is not None:  # ``split((self.c, self.c))``, ``split(self.c)``: the parts shrink alike
        ctx.counted(counts[sizes[0]], lab.atoms[: sizes[0]])
    start = 0
    for o, s in zip(outs, sizes, strict=True):  # keeps the origin: attention can still ask for whole heads
        ctx.set_label(o, dim, lab.atoms[start : start + s], lab.origin)
        start += s


def _stored_counts(ctx, sizes: list[int]) -> dict[int, str] | None:
    """The int attribute of the module whose ``forward`` runs the current op that holds each
    of the channel counts ``sizes`` (a split's parts: YOLOv8's ``C2f``, ``split((self.c,
    self.c), 1)``), by size; ``None`` unless every size is held by exactly one attribute and
    distinct sizes by distinct ones (a size of 1, two attributes with the same value, or a
    size equal to the number of parts, which may be the count of sections the code asked
    for, say nothing about which number the code read). The attributes become ``"count"``
    slices (:meth:`~cleanai_core.graph.context.TraceContext.counted`) that pruning sets to
    the kept channels. Before 2026-12-02 such a split froze its parts (unequal sizes) or
    broke the pruned model (equal sizes: verification kept the group whole), though a
    ``chunk(2, 1)`` of the same channels pruned; a ``chunk`` whose module holds the size
    gets the count too, which it then no longer needs."""
    module = ctx.scope_module()
    if module is None or min(sizes) <= 1 or (len(sizes) > 1 and len(sizes) in sizes):
        return None
    if _free_ranges(ctx) or _permutable(ctx) or module in ctx.findings.get(REWRITTEN_COUNTS, ()):
        return None  # a plugin's fix-up rewrites its numbers (SHViT's ``pdim`` sizes two channel sets)
    found: dict[int, str] = {}
    for size in dict.fromkeys(sizes):
        names = [k for k, v in vars(module).items() if type(v) is int and v == size and not k.startswith("_")]
        if len(names) != 1:
            return None
        found[size] = names[0]
    return found if len(set(found.values())) == len(found) else None


@table.register("glu")
def glu(call, ctx):
    """``F.glu(x, dim)`` / ``nn.GLU``: ``a * sigmoid(b)`` with ``a, b = x.chunk(2, dim)``.
    Along the channels, output channel ``i`` reads input channels ``i`` and ``i + n/2``:
    the two halves are tied index by index (they shrink alike) and the output carries the
    first half. Before 2026-12-01 the op was unknown and froze its input's channels."""
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    dim = arg(call, 1, "dim", -1) % src.ndim
    if dim != lab.dim:
        ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)
        return
    half = src.shape[dim] // 2
    ctx.set_label(call.outputs[0], dim, ctx.tie(lab.atoms, (2, half), 1), lab.origin)


@table.register("unbind", "unbind_copy")
def unbind(call, ctx):
    src = call.args[0]
    lab = ctx.label_of(src)
    dim = arg(call, 1, "dim", 0) % src.ndim
    if isinstance(src, TRef) and src.param is not None and (lab is None or dim != lab.dim):
        # a parameter iterated along a dim that does not shrink (``zip(x.unbind(1), self.W)``):
        # its pieces pair with unbound channels by position, which then cannot shrink
        ctx.unbind_pieces(call.outputs, ctx.new_atoms(len(call.outputs), frozen=f"{ctx.where()} unbinds {src.param}"))
    if lab is None:
        return
    if dim == lab.dim:  # channels one by one: free if stacked back whole (before 2026-12-02 frozen)
        _ask_inner_split(ctx, lab)
        ctx.unbind_pieces(call.outputs, lab.atoms)
        return
    for o in call.outputs:
        ctx.set_label(o, lab.dim - (dim < lab.dim), lab.atoms, lab.origin)


@table.register("unfold")
def unfold(call, ctx):
    """``Tensor.unfold(dim, size, step)``: sliding windows along ``dim`` (HaloNet's key and
    value neighbourhoods over the spatial dimensions), as a new last dimension. Channels on
    another dimension stay where they are; windows across them freeze them."""
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    if arg(call, 1, "dimension") % max(src.ndim, 1) == lab.dim:
        ctx.freeze(lab.atoms, f"{ctx.where()} slides windows across channels")
        return
    ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)


@table.register("_pack_padded_sequence")
def pack_padded_sequence(call, ctx):
    """``pack_padded_sequence(x, lengths)``: the steps of every sequence packed as rows of
    ``data: (steps, features)``; the features (``x``'s last dim) stay the last dim. Channels
    on the time or batch dims freeze (rows of different sequences are mixed)."""
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    if lab.dim != src.ndim - 1:
        ctx.freeze(lab.atoms, f"{ctx.where()} packs sequences along their channels")
        return
    ctx.set_label(call.outputs[0], call.outputs[0].ndim - 1, lab.atoms, lab.origin)


@table.register("tril", "triu")
def triangle(call, ctx):
    """``tril`` / ``triu`` keep a triangle of the last two dims: channels before them pass;
    on them, which entries stay depends on each channel's position (frozen)."""
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    if lab.dim >= src.ndim - 2:
        ctx.freeze(lab.atoms, f"{ctx.where()} keeps a triangle whose rows or columns are channels")
        return
    ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)


@table.register("diagonal", "diagonal_copy")
def diagonal(call, ctx):
    """``x.diagonal(offset, dim1, dim2)``: the two dims go, the diagonal becomes the last
    one; channels on another dim pass, on one of the two they freeze."""
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    d1, d2 = arg(call, 2, "dim1", 0) % src.ndim, arg(call, 3, "dim2", 1) % src.ndim
    if lab.dim in (d1, d2):
        ctx.freeze(lab.atoms, f"{ctx.where()} takes a diagonal across channels")
        return
    ctx.set_label(call.outputs[0], lab.dim - (d1 < lab.dim) - (d2 < lab.dim), lab.atoms, lab.origin)


@table.register("rot90")
def rot90(call, ctx):
    """``torch.rot90(x, k, dims)``: ``x.flip(b).transpose(a, b)`` per quarter turn. Channels
    outside ``dims`` pass; on them they move to the other dim of the two (odd ``k``), and
    come out reversed where the turn flips their dim, as ``flip`` reverses them."""
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    k = arg(call, 1, "k", 1) % 4
    a, b = (d % src.ndim for d in arg(call, 2, "dims", [0, 1]))
    atoms, dim = lab.atoms, lab.dim
    for _ in range(k):
        if dim == b:
            atoms = atoms.flip(0)
        dim = b if dim == a else a if dim == b else dim
    ctx.set_label(call.outputs[0], dim, atoms, lab.origin if dim == lab.dim and k == 0 else None)


@table.register("bucketize")
def bucketize(call, ctx):
    """``torch.bucketize(x, boundaries)``: each element's bucket, element by element; the
    boundaries are a list, not a tensor aligned with ``x``."""
    src = call.args[0]
    lab, blab = ctx.label_of(src), ctx.label_of(arg(call, 1, "boundaries"))
    if blab is not None:
        ctx.freeze(blab.atoms, f"{ctx.where()} searches channels as boundaries")
    if lab is not None and isinstance(src, TRef):
        ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)


@table.register("roll", "flip")
def roll(call, ctx):
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    flip = "flip" in str(call.op)
    dims = arg(call, 1, "dims") if flip else arg(call, 2, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if flip and lab.dim in [x % src.ndim for x in dims]:
        # reversed channels stay reversed when some go: the label is reversed with them
        ctx.set_label(call.outputs[0], lab.dim, lab.atoms.flip(0))
        return
    if not dims or lab.dim in [x % src.ndim for x in dims]:
        ctx.freeze(lab.atoms, f"{ctx.where()} moves channels")  # a roll by k wraps at the width
        return
    ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)


@table.register("index_put_", "index_put", "_index_put_impl_")
def index_put(call, ctx):
    """``dst.index_put_(indices, values)`` with index tensors over the leading dimensions
    (rows picked, channels after them): ``values``' channels meet ``dst``'s at the same
    positions. ``values`` broadcasts from the right against what the indices pick, so a
    vector as wide as the channels, written over every picked row, meets them too. A
    boolean mask over ``k`` leading dimensions picks rows as ``k`` index tensors would (it
    is their ``nonzero()``): wav2vec2's ``h[mask_time_indices] = masked_spec_embed`` in
    training; before session 21 such a mask froze the channels it wrote. A ``dst``
    without channels takes ``values``' unless its width is a number the module stores
    (:func:`fresh_destination_problem`, the scatters' rule). Before 2026-12-01 it froze
    them unless the module vouched (:func:`allow_filled_destinations`), while a scatter
    trusted the width: two rules for one question."""
    dst, values, out = call.args[0], arg(call, 2, "values"), call.outputs[0]
    indices = list(arg(call, 1, "indices") or ())
    ld, lv = ctx.label_of(dst), ctx.label_of(values)
    if ld is None and lv is None:
        return
    if _permuted_write(ctx, dst, values, out, indices, ld, lv):
        return
    # index tensors over the leading dimensions: 1-D positions, or boolean masks (k dims each)
    plain = len(indices) >= 1 and all(isinstance(i, TRef) and (i.ndim == 1 or i.dtype == torch.bool) for i in indices)
    if plain and any(i.dtype == torch.bool for i in indices) and len(indices) > 1:
        plain = False  # a mask beside other index tensors: their broadcast is not followed
    if not plain:  # skipped dims (None), mixed masks or broadcast index grids: not followed
        for lab in (ld, lv):
            if lab is not None:
                ctx.freeze(lab.atoms, f"{ctx.where()} writes through indices that are not followed")
        return
    n = sum(i.ndim if i.dtype == torch.bool else 1 for i in indices)  # the leading dims the indices cover
    # ``values`` broadcasts against (rows, *dst.shape[n:]) from the right: its dim d is that shape's d + off
    off = dst.ndim - n + 1 - values.ndim if isinstance(values, TRef) else None
    if lv is not None and (off is None or off < 0 or lv.dim + off < 1):
        ctx.freeze(lv.atoms, f"{ctx.where()} writes channels to other positions")
        lv = None
    if ld is not None and ld.dim < n:
        ctx.freeze(ld.atoms, f"{ctx.where()} writes into the channels' positions")
        return
    if ld is not None and lv is not None:
        if lv.dim + off + n - 1 == ld.dim and lv.atoms.numel() == ld.atoms.numel():
            ctx.union(ld.atoms, lv.atoms)
        else:
            ctx.freeze(lv.atoms, f"{ctx.where()} writes channels onto another dimension")
        ctx.set_label(out, ld.dim, ld.atoms, ld.origin)
        return
    if ld is not None:  # values without channels: a scalar or a width of its own
        vd = ld.dim - n + 1 - (off or 0)  # values' dim over dst's channels (< 0: broadcast over them)
        if isinstance(values, TRef) and math.prod(values.shape) > 1 and vd >= 0 and values.shape[vd] != 1:
            ctx.freeze(ld.atoms, f"{ctx.where()} writes values that cannot shrink with the channels")
        ctx.set_label(out, ld.dim, ld.atoms, ld.origin)
        return
    if lv is not None:  # a fresh destination: the same rule as a scatter's
        why = fresh_destination_problem(ctx, dst.shape[lv.dim + off + n - 1])
        if why is not None:
            ctx.freeze(lv.atoms, why)
        else:
            ctx.set_label(out, lv.dim + off + n - 1, lv.atoms, lv.origin)


def _permuted_write(ctx, dst, values, out, indices, ld, lv) -> bool:
    """``dst[:, self.perm] = values`` (a flow's inverse shuffle written as a scatter): one
    permutation buffer over the channel dimension of a destination as wide as ``values``.
    Destination position ``perm[i]`` gets ``values``' channel ``i``; the destination's own
    channels there go with it (every position is overwritten, but its width must shrink
    alike), unless they are ``values``' own (``zeros_like(values)``: any order has the
    width); the buffer is rewritten (:meth:`TraceContext.placed`). Returns whether it
    labelled the output."""
    used = [i for i, t in enumerate(indices) if t is not None]
    if lv is None or len(used) != 1 or used[0] != lv.dim or not isinstance(values, TRef):
        return False
    dim = used[0]
    if values.shape != dst.shape or ld is None or ld.dim != dim:
        return False
    atoms = ctx.placed(ctx.index_source(indices[dim], 0), lv)  # the buffer, or one laid out from it
    if atoms is None:
        return False
    if not torch.equal(ld.atoms.sort().values, atoms.sort().values):  # (``zeros_like(values)``: the same channels)
        ctx.union(ld.atoms, atoms)
    ctx.set_label(out, dim, atoms)
    return True


_FRESH = frozenset({"full", "zeros", "empty", "ones", "new_zeros", "new_full", "new_empty", "new_ones"})


@table.register("copy_", "copy")
def copy(call, ctx):
    """``dst.copy_(src)``: element-wise; where ``dst`` is a slice of a fresh tensor without
    channels (``pad_packed_sequence`` writes each step's rows into ``full((T, B, C), 0)``),
    the fresh tensor takes ``src``'s channels (:func:`_fresh_base`)."""
    dst, src, out = call.args[0], call.args[1], call.outputs[0]
    from cleanai_core.graph.elementwise import broadcast

    lab = ctx.label_of(src)
    if lab is not None and ctx.label_of(dst) is None and isinstance(dst, TRef):
        d = lab.dim + dst.ndim - src.ndim
        found = _fresh_base(ctx, dst, d) if 0 <= d < dst.ndim and src.shape[lab.dim] == dst.shape[d] else None
        if found is not None:
            base, bd = found
            held = ctx.label_of(base)
            if held is None:
                ctx.set_label(base, bd, lab.atoms)
            elif held.dim == bd:
                ctx.union(held.atoms, lab.atoms)
            else:
                ctx.freeze(lab.atoms, f"{ctx.where()} writes channels across the destination's own")
            ctx.set_label(out, d, lab.atoms, lab.origin)
            return
    broadcast(ctx, [dst, src], out)


def _fresh_base(ctx, ref, d: int):
    """The fresh tensor (``torch.full`` / ``zeros`` / ``empty`` / ``x.new_zeros``...) that
    ``ref`` is a view of, through slices and selects along other dims than ``d`` (``d``
    followed to the fresh tensor's dims), when it is as wide there and its width is not a
    number the module stores: ``(tensor, its dim)``; else ``None``."""
    width = ref.shape[d]
    for _ in range(8):
        event = ctx.made_by.get(ref.key)
        if event is None or not hasattr(event, "op"):
            return None
        name = event.op.overloadpacket.__name__
        if name in _FRESH:
            base = event.outputs[0]
            ok = base.shape[d] == width and fresh_destination_problem(ctx, width) is None
            return (base, d) if ok else None
        src = event.args[0]
        if name == "select":  # ``full(...)[:, i]`` (pad_sequence): the dim comes back
            at = arg(event, 1, "dim", 0) % src.ndim
            d += at <= d
        elif name in ("slice", "narrow"):
            at = arg(event, 1, "dim", 0) % src.ndim
        elif name != "alias":
            return None
        if name != "alias" and at == d:
            return None
        ref = src
    return None


@table.register("as_strided_.default")
def restride_size_one(call, ctx):
    """``as_strided_`` that only changes the strides of size-1 dimensions: ATen's
    ``adaptive_avg_pool2d`` to 1x1 on a channels-last input (torchvision Swin's head)
    restrides its fresh, contiguous result so. Labels pass when the size is the input's,
    the offset 0 and every dimension larger than 1 keeps its contiguous stride. Any other
    ``as_strided`` stays unclaimed (its channels freeze): the trace does not record input
    strides, so a real reinterpretation of memory could not be told apart."""
    src = call.args[0]
    size, stride = list(arg(call, 1, "size")), list(arg(call, 2, "stride"))
    if tuple(size) != tuple(src.shape) or arg(call, 3, "storage_offset") not in (None, 0):
        return
    if any(stride[k] != _prod(size[k + 1 :]) for k in range(len(size)) if size[k] > 1):
        return
    lab = ctx.label_of(src)
    if lab is not None:
        ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)


@hookimpl(trylast=True)
def cleanai_index_mapper(op):
    return table.lookup(op)


class UnflattenPruner(LayerPruner):
    """``nn.Unflatten(dim, sizes)``: a view whose sizes are an attribute. Channels split
    across the new dims are mapped as a ``view`` maps them (:func:`reshape_label`); when
    they land on one of the new dims, that entry of ``unflattened_size`` is a slice
    (``"size<k>"``, nothing to slice but the number) rewritten to the kept count. Before
    2026-12-01 the literal sizes stayed: a decoder's ``Linear -> Unflatten(1, (C, 4, 4))
    -> ConvTranspose2d`` failed verification and kept its channels."""

    name = "unflatten"

    def trace(self, module, call, ctx):
        x, out = call.args[0], call.outputs[0]
        reshape_label(ctx, x, out)
        lab = ctx.label_of(out)
        k = lab.dim - module.dim % x.ndim if lab is not None else -1
        if 0 <= k < len(module.unflattened_size) and module.unflattened_size[k] != -1:
            ctx.bind(call.name, f"size{k}", lab.atoms, "param", dim=lab.dim)

    def prune(self, module, keep):
        sizes = list(module.unflattened_size)
        for name, kept in keep.items():
            sizes[int(name.removeprefix("size"))] = kept.numel()
        module.unflattened_size = tuple(sizes)


@hookimpl(trylast=True)
def cleanai_layer_pruner(module):
    return UnflattenPruner() if isinstance(module, nn.Unflatten) else None
