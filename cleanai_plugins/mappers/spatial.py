"""Pooling (also over boxes: ``roi_align``) and unpooling, interpolation, padding, pixel (un)shuffle and channel
shuffle: channels pass, space changes."""

from __future__ import annotations

import torch

from cleanai_core import hookimpl
from cleanai_core.graph.trace import TRef
from cleanai_plugins.mappers._registry import MapperTable, arg
from cleanai_plugins.mappers.shape import fresh_destination_problem

table = MapperTable()

_SPATIAL = {
    "avg_pool1d": 1,
    "avg_pool2d": 2,
    "avg_pool3d": 3,
    "max_pool1d": 1,
    "max_pool2d": 2,
    "max_pool3d": 3,
    "max_pool1d_with_indices": 1,
    "max_pool2d_with_indices": 2,
    "max_pool3d_with_indices": 3,
    "adaptive_avg_pool1d": 1,
    "adaptive_avg_pool2d": 2,
    "adaptive_avg_pool3d": 3,
    "_adaptive_avg_pool2d": 2,
    "_adaptive_avg_pool3d": 3,
    "adaptive_max_pool1d": 1,
    "adaptive_max_pool2d": 2,
    "adaptive_max_pool3d": 3,
    "upsample_nearest1d": 1,
    "upsample_nearest2d": 2,
    "upsample_nearest3d": 3,
    "_upsample_nearest_exact1d": 1,
    "_upsample_nearest_exact2d": 2,
    "_upsample_nearest_exact3d": 3,
    "upsample_linear1d": 1,
    "upsample_bilinear2d": 2,
    "upsample_trilinear3d": 3,
    "upsample_bicubic2d": 2,
    "_upsample_bilinear2d_aa": 2,
    "_upsample_bicubic2d_aa": 2,
    "reflection_pad1d": 1,
    "reflection_pad2d": 2,
    "reflection_pad3d": 3,
    "replication_pad1d": 1,
    "replication_pad2d": 2,
    "replication_pad3d": 3,
    "lp_pool2d": 2,
    "fractional_max_pool2d": 2,
    # SegNet's decoder: each channel unpooled on its own at the positions its pooling kept
    # (the indices come from the pruned pooling, as wide as the channels); unknown before 2026-12-01
    "max_unpool2d": 2,
    "max_unpool3d": 3,
}


def _spatial(call, ctx):
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    n = _SPATIAL[call.op.overloadpacket.__name__]
    if lab.dim >= src.ndim - n:
        ctx.freeze(lab.atoms, f"{ctx.where()} mixes the labelled (spatial) dimension")
        return
    out = call.outputs[0]
    dim = lab.dim + out.ndim - src.ndim
    name = call.op.overloadpacket.__name__
    if name.startswith("max_unpool"):
        # channel ``k`` is placed where the pooling of the indices' channel ``k`` found its
        # maxima: a decoder unpooled with an encoder's indices (SegNet) pairs the two layers
        ctx.union(lab.atoms, ctx.labels(call.args[1], lab.dim))
    ctx.set_label(out, dim, lab.atoms, lab.origin)
    if name.endswith("_with_indices"):  # the indices belong to the same channels
        ctx.set_label(call.outputs[1], dim, lab.atoms, lab.origin)


table.register(*_SPATIAL)(_spatial)


@table.register("roi_align", "roi_pool")
def roi_pool(call, ctx):
    """torchvision's ``roi_align`` / ``roi_pool``: features ``(N, C, H, W)`` pooled over
    boxes into ``(K, C, h, w)`` (the R-CNN ROI heads' ``MultiScaleRoIAlign``): each channel
    is pooled on its own, so the channels pass on dim 1 (they froze as an unknown op:
    "channels reach op torchvision.roi_align.default ..., which ignored them"). The
    position-sensitive ``ps_roi_*`` ops fold the bins into the channels: not here."""
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    if lab.dim != 1 or src.ndim != 4:
        ctx.freeze(lab.atoms, f"{ctx.where()} pools boxes across the labelled dimension")
        return
    ctx.label_of(call.args[1])  # the boxes: looked at, no channels
    ctx.set_label(call.outputs[0], 1, lab.atoms, lab.origin)


@table.register("constant_pad_nd", "pad")
def pad(call, ctx):
    """Padding passes the channels. A constant pad of the channel dimension adds constant
    channels before and after them, which are no units (EfficientViT-MIT's ``LiteMLA`` pads
    its values with a channel of ones, its normaliser, and slices it off after the products:
    the whole attention froze, efficientvit_b2 kept 0.33 at a ratio of 0.5); a cut (a
    negative pad) or a reflected / replicated one still freezes them."""
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    p = list(arg(call, 1, "pad"))
    padded = {src.ndim - 1 - i // 2 for i, v in enumerate(p) if v}
    if lab.dim not in padded:
        ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)
        return
    at = 2 * (src.ndim - 1 - lab.dim)
    before, after = int(p[at]), int(p[at + 1]) if at + 1 < len(p) else 0
    constant = call.op.overloadpacket.__name__ == "constant_pad_nd" or arg(call, 2, "mode", "constant") == "constant"
    if not constant or before < 0 or after < 0:
        ctx.freeze(lab.atoms, f"{ctx.where()} pads the channel dimension")
        return
    what = f"a constant channel padded by {ctx.where()}"
    atoms = torch.cat([ctx.new_atoms(before, frozen=what), lab.atoms, ctx.new_atoms(after, frozen=what)])
    ctx.set_label(call.outputs[0], lab.dim, atoms, lab.origin)


@table.register("pixel_shuffle")
def pixel_shuffle(call, ctx):
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    r = arg(call, 1, "upscale_factor")
    if lab.dim != src.ndim - 3:
        ctx.freeze(lab.atoms, f"{ctx.where()} shuffles a spatial dimension")
        return
    rep = ctx.tie(lab.atoms, (out.shape[-3], r * r), 0)
    ctx.set_label(out, out.ndim - 3, rep)


@table.register("channel_shuffle", "native_channel_shuffle")
def channel_shuffle(call, ctx):
    """``(N, g * n, ...) -> view (g, n) -> transpose -> (N, n * g, ...)``: a channel leaves
    with the ones at its position in every other group (``g`` stays, ``n`` shrinks)."""
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    if lab.dim != 1:  # channels elsewhere: the shuffled dim is not theirs
        ctx.set_label(out, lab.dim, lab.atoms, lab.origin)
        return
    g = arg(call, 1, "groups")
    rep = ctx.tie(lab.atoms, (g, src.shape[1] // g), 1)
    ctx.set_label(out, 1, rep.repeat_interleave(g))


@table.register("pixel_unshuffle")
def pixel_unshuffle(call, ctx):
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    r = arg(call, 1, "downscale_factor")
    if lab.dim != src.ndim - 3:
        ctx.freeze(lab.atoms, f"{ctx.where()} unshuffles a spatial dimension")
        return
    ctx.set_label(out, out.ndim - 3, lab.atoms.repeat_interleave(r * r))


@table.register("im2col")
def im2col(call, ctx):
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    if lab.dim != src.ndim - 3:
        ctx.freeze(lab.atoms, f"{ctx.where()} unfolds a spatial dimension")
        return
    k = out.shape[-2] // src.shape[lab.dim]
    ctx.set_label(out, out.ndim - 2, lab.atoms.repeat_interleave(k))


@table.register("col2im")
def col2im(call, ctx):
    """``F.fold``: ``(N, C * k * k, L) -> (N, C, H, W)``, the inverse of ``im2col``: the
    ``k * k`` columns of one channel go together (unknown before 2026-12-01)."""
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    c = out.shape[-3]
    if lab.dim != src.ndim - 2 or src.shape[lab.dim] % c:
        ctx.freeze(lab.atoms, f"{ctx.where()} folds the labelled dimension into space")
        return
    ctx.set_label(out, out.ndim - 3, ctx.tie(lab.atoms, (c, src.shape[lab.dim] // c), 0))


@table.register("grid_sampler_2d", "grid_sampler_3d", "grid_sampler", "cudnn_grid_sampler")
def grid_sample(call, ctx):
    """``F.grid_sample(x, grid)`` (spatial transformer networks): every channel is sampled
    at the same points; the grid (its last dim the coordinates) carries none (unknown
    before 2026-12-01)."""
    src, grid = call.args[0], call.args[1]
    lab = ctx.label_of(src)
    ctx.freeze_tensor(grid, f"{ctx.where()} reads channels as sampling coordinates")
    if lab is None:
        return
    if lab.dim != 1:
        ctx.freeze(lab.atoms, f"{ctx.where()} samples the labelled dimension")
        return
    ctx.set_label(call.outputs[0], 1, lab.atoms, lab.origin)


@table.register("_fft_r2c", "_fft_c2r", "_fft_c2c")
def fft(call, ctx):
    """Fourier transforms over some dims (GFNet's global filter, FNO's spectral layers):
    channels on another dim pass, each transformed on its own; over the channels they
    freeze (unknown before 2026-12-01)."""
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    dims = [d % src.ndim for d in arg(call, 1, "dim")]
    if lab.dim in dims:
        ctx.freeze(lab.atoms, f"{ctx.where()} transforms across the channels")
        return
    ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)


@table.register("index")
def index(call, ctx):
    """``x[idx]`` with index tensors before the channel dimension (e.g. gathering a
    relative-position table by an index buffer): channels pass. One index buffer on the
    channel dimension (``x[:, self.perm]``) moves them: see :meth:`TraceContext.picked`."""
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    idx = list(arg(call, 1, "indices"))
    used = [i for i, t in enumerate(idx) if t is not None]
    if used == [lab.dim] and _picked(ctx, src, out, lab, idx[lab.dim]):
        return
    if used == [lab.dim] and _fixed_positions(call, ctx, src, lab, idx[lab.dim]):
        return
    new_dim = _dim_after_indexing(idx, src, out, lab.dim)
    if new_dim is None:
        ctx.freeze(lab.atoms, f"{ctx.where()} indexes channels")
        return
    ctx.set_label(out, new_dim, lab.atoms, lab.origin)


def _dim_after_indexing(idx: list, src, out, dim: int) -> int | None:
    """Where dimension ``dim`` of ``src`` lands in ``out = src[idx]`` (advanced indexing:
    ``idx`` holds index tensors or ``None`` per leading dimension; a boolean mask spans as
    many dimensions as it has), or ``None`` when an index covers it. Index tensors that
    sit next to each other put their broadcast dimensions where they stood; apart, those
    go first (NumPy's rule). Tokens picked before the channels (``x[:, ids]`` on ``(B, N,
    C)``, a buffer or an index made in ``forward``) froze the channels before 2026-12-01."""
    covered: list[int] = []
    pos = 0
    for t in idx:
        span = t.ndim if t is not None and t.dtype in (torch.bool, torch.uint8) else 1
        if t is not None:
            covered.extend(range(pos, pos + span))
        pos += span
    if not covered or dim in covered:
        return None
    adjacent = covered == list(range(covered[0], covered[-1] + 1))
    broadcast = out.ndim - (src.ndim - len(covered))
    if adjacent:
        new = dim if dim < covered[0] else dim - len(covered) + broadcast
    else:
        new = broadcast + dim - sum(c < dim for c in covered)
    return new if 0 <= new < out.ndim and out.shape[new] == src.shape[dim] else None


def _fixed_positions(call, ctx, src, lab, positions) -> bool:
    """``x[..., [-2], :]`` in an attention module that keeps whole heads (Falcon's
    multi-query ``qkv[..., [-2], :]``, the key head after the query heads): the picked
    positions are constants, so they must not move when other positions go. Everything
    from the picked positions to the nearer end (the end for negative positions, the
    start otherwise) is frozen; the positions before them (the query heads) stay free.
    Returns whether it labelled the output."""
    value = getattr(positions, "value", None)
    size = src.shape[lab.dim]
    if value is None or not value or not ctx.keeps_whole_heads() or positions.ndim != 1:
        return False
    if not all(-size <= v < size for v in value) or (min(value) < 0) != (max(value) < 0):
        return False
    if min(value) < 0:
        ctx.freeze(lab.atoms[size + min(value) :], f"{ctx.where()} picks heads counted from the end")
    else:
        ctx.freeze(lab.atoms[: max(value) + 1], f"{ctx.where()} picks heads counted from the start")
    ctx.set_label(call.outputs[0], lab.dim, lab.atoms[list(value)], lab.origin)
    return True


#: ``F.embedding_bag`` with a bare table (``(table, indices, offsets, ...)``): each bag's
#: rows are summed, averaged or maxed per column, so the columns pass as ``embedding``'s
#: do; the output is the first of its four results. No mapper knew the op before
#: 2026-12-02: the columns were dropped and the consumer's inputs froze
_EMBEDDING_BAGS = ("_embedding_bag", "_embedding_bag_forward_only")


@table.register("index_select", "gather", "embedding", *_EMBEDDING_BAGS)
def index_select(call, ctx):
    src, out = call.args[0], call.outputs[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    name = call.op.overloadpacket.__name__
    if name == "embedding" or name in _EMBEDDING_BAGS:
        if lab.dim == src.ndim - 1:
            ctx.set_label(out, out.ndim - 1, lab.atoms)
            return
    else:
        dim = arg(call, 1, "dim") % src.ndim
        if dim != lab.dim and out.ndim == src.ndim and out.shape[lab.dim] == src.shape[lab.dim]:
            index = arg(call, 2, "index")
            ilab = ctx.label_of(index) if name == "gather" else None
            if ilab is not None:  # an index computed per channel (``quantile``, ``x.argsort(-1)``)
                if ilab.dim == lab.dim:
                    ctx.union(lab.atoms, ilab.atoms)
                else:
                    ctx.freeze(ilab.atoms, f"{ctx.where()} gathers with an index whose channels stand elsewhere")
            ctx.set_label(out, lab.dim, lab.atoms, lab.origin)
            return
        if dim == lab.dim and name == "index_select" and _picked(ctx, src, out, lab, arg(call, 2, "index")):
            return
        if dim == lab.dim and name == "gather" and _gathered(ctx, out, lab, arg(call, 2, "index")):
            return
        if dim == lab.dim:
            ctx.freeze(
                lab.atoms,
                f"{ctx.where()} picks channels with an index that is not a 1-D index buffer of the model laid out "
                "by views or expands (it cannot be rewritten when they shrink); register the positions as a 1-D "
                "integer buffer and pick with x.index_select(dim, buffer), x[:, buffer] or gather on it",
            )
            return
    ctx.freeze(lab.atoms, f"{ctx.where()} indexes channels")


#: ``op name -> position of the values written`` (``self`` is argument 0, ``dim`` 1, the
#: index 2); ``scatter.value`` / ``index_fill`` write a number
_SCATTERS = {
    "scatter": 3,
    "scatter_": 3,
    "scatter_add": 3,
    "scatter_add_": 3,
    "scatter_reduce": 3,
    "scatter_reduce_": 3,
    "index_add": 3,
    "index_add_": 3,
    "index_copy": 3,
    "index_copy_": 3,
    "index_reduce": 3,
    "index_reduce_": 3,
    "index_fill": 3,
    "index_fill_": 3,
}


@table.register(*_SCATTERS)
def scatter(call, ctx):
    """``dst.scatter_add_(dim, index, src)`` / ``dst.index_add_(dim, index, src)`` (a graph
    network summing messages into their target nodes, a histogram per channel): along a
    ``dim`` that is not the channels', channel ``k`` of ``src`` lands in channel ``k`` of
    ``dst`` whatever the index holds, so the channels pass (and ``dst``'s, if it carries
    any, are the same ones). A destination without channels (``torch.zeros(n, heads,
    width)``) takes ``src``'s, like ``gather`` whose index gives its output's width,
    unless its width is a number its module stores (:func:`fresh_destination_problem`,
    the rule ``index_put_`` follows too); a width written as a literal is found by the
    verification, which leaves the group whole. Writing along the channel dimension moves
    channels: they freeze. Before 2026-12-01 every scatter froze the channels that
    reached it."""
    dst, out = call.args[0], call.outputs[0]
    src = arg(call, _SCATTERS[call.op.overloadpacket.__name__], "src")
    dim = arg(call, 1, "dim") % dst.ndim
    ld, lv = ctx.label_of(dst), ctx.label_of(src)
    ctx.label_of(arg(call, 2, "index"))  # looked at: positions, not channels
    if ld is None and lv is None:
        return
    if _permuted_scatter(ctx, call, dst, src, out, dim, ld, lv):
        return
    if any(lab is not None and lab.dim == dim for lab in (ld, lv)) or (lv is not None and src.ndim != dst.ndim):
        for lab in (ld, lv):
            if lab is not None:
                ctx.freeze(lab.atoms, f"{ctx.where()} writes across the channels")
        return
    c = (ld or lv).dim
    if isinstance(src, TRef) and src.ndim == dst.ndim and src.shape[c] != dst.shape[c]:
        for lab in (ld, lv):
            if lab is not None:
                ctx.freeze(lab.atoms, f"{ctx.where()} writes fewer channels than its destination has")
        return
    if ld is not None and lv is not None:
        if ld.dim != lv.dim:
            ctx.freeze(lv.atoms, f"{ctx.where()} writes channels onto another dimension")
        else:
            ctx.union(ld.atoms, lv.atoms)
        ctx.set_label(out, ld.dim, ld.atoms, ld.origin)
        return
    if ld is not None:  # a number, or values without channels
        if isinstance(src, TRef) and src.ndim == dst.ndim and src.shape[c] > 1:
            ctx.freeze(ld.atoms, f"{ctx.where()} writes values that cannot shrink with the channels")
        ctx.set_label(out, ld.dim, ld.atoms, ld.origin)
        return
    why = fresh_destination_problem(ctx, dst.shape[lv.dim])
    if why is not None:
        ctx.freeze(lv.atoms, why)
        return
    ctx.set_label(out, lv.dim, lv.atoms, lv.origin)


def _permuted_scatter(ctx, call, dst, src, out, dim, ld, lv) -> bool:
    """A scatter along the channels through a permutation laid out from an index buffer
    (a flow's inverse shuffle: ``zeros_like(y).scatter_(1, perm.view(1, -1, 1, 1)
    .expand_as(y), y)``, ``index_copy(1, perm, y)``, ``index_add``): destination channel
    ``perm[i]`` gets channel ``i`` of ``src``, like ``dst[:, perm] = y``
    (:func:`~cleanai_plugins.mappers.shape.index_put`); the buffer is rewritten. The
    destination's channel ``perm[i]`` goes with it where its values are added to
    (``index_add``, ``scatter_add``) or it has channels of its own; a destination without
    channels takes the placed ones unless its width is a number the module stores
    (:func:`fresh_destination_problem`). It froze the channels ("writes across the
    channels") before 2026-12-02."""
    name = call.op.overloadpacket.__name__
    if lv is None or lv.dim != dim or (ld is not None and ld.dim != dim) or not isinstance(src, TRef):
        return False
    if src.shape != dst.shape or name.startswith(("index_fill", "scatter_reduce", "index_reduce")):
        return False
    if ld is None and fresh_destination_problem(ctx, dst.shape[dim]) is not None:
        return False
    index = arg(call, 2, "index")
    atoms = ctx.placed(ctx.index_source(index, dim if getattr(index, "ndim", 1) == dst.ndim else 0), lv)
    if atoms is None:
        return False
    # overwritten everywhere, or added to a constant (``zeros_like(src)``: the same channels),
    # the destination needs no tie; added to the features themselves, it does
    adds = "add" in name and not _constant(ctx, dst)
    if ld is not None and (adds or not torch.equal(ld.atoms.sort().values, atoms.sort().values)):
        ctx.union(ld.atoms, atoms)
    ctx.set_label(out, dim, atoms)
    return True


#: ops that make a tensor of one value everywhere
_CONSTANT_FILLS = frozenset(
    {"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full", "zeros", "ones", "full",
     "zero_", "fill_"}
)  # fmt: skip


def _constant(ctx, ref) -> bool:
    """Whether ``ref`` was made holding one value everywhere (``torch.zeros_like(y)``)."""
    event = ctx.made_by.get(getattr(ref, "key", None))
    while event is not None and getattr(event, "op", None) is not None:
        name = event.op.overloadpacket.__name__
        if name in _CONSTANT_FILLS:
            return True
        if name not in ("detach", "alias") or not event.args:
            return False
        event = ctx.made_by.get(getattr(event.args[0], "key", None))
    return False


def _picked(ctx, src, out, lab, index) -> bool:
    """Channels picked by a model's index buffer (a fixed permutation, a subset): the
    output carries the atoms it picks, and pruning rewrites the buffer. Returns whether
    it labelled the output."""
    shape = getattr(index, "shape", ())
    if len(shape) != 1 or out.ndim != src.ndim or out.shape[lab.dim] != shape[0]:
        return False
    atoms = ctx.picked(ctx.index_source(index, 0), lab)  # the buffer, or one laid out from it (``perm.long()``)
    if atoms is None:
        return False
    ctx.set_label(out, lab.dim, atoms)
    return True


def _gathered(ctx, out, lab, index) -> bool:
    """``torch.gather(x, dim, index)`` along the channels with an index laid out from a
    1-D index buffer (``perm.view(1, -1, 1, 1).expand_as(x)``): ``index_select`` with the
    buffer, which pruning rewrites. It froze the channels before 2026-12-02."""
    source = ctx.index_source(index, lab.dim)
    if source is None or out.shape[lab.dim] != max(source.shape):
        return False
    atoms = ctx.picked(source, lab)
    if atoms is None:
        return False
    ctx.set_label(out, lab.dim, atoms)
    return True


@hookimpl(trylast=True)
def cleanai_index_mapper(op):
    return table.lookup(op)
