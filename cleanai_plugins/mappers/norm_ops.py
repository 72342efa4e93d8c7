"""Functional norms (layer/batch/group/rms norm ops) and reductions."""

from __future__ import annotations

import torch

from cleanai_core import hookimpl
from cleanai_core.graph.elementwise import elementwise, is_pointwise
from cleanai_plugins.mappers._registry import MapperTable, arg

table = MapperTable()


def _couple_affine(ctx, atoms, params) -> None:
    for p in params:
        if p is None or not hasattr(p, "key"):
            continue
        if p.ndim == 1 and p.shape[0] == atoms.numel():
            ctx.union(atoms, ctx.labels(p, 0))
        else:
            ctx.freeze_tensor(p, f"{ctx.where()}: affine tensor of unexpected shape")


def _couple_wide_affine(ctx, lab, first: int, params) -> bool:
    """A norm over several trailing dims, the channels among them: couple each affine
    tensor's dim that stands over the channels (a bare ``(C, H, W)`` weight takes that dim,
    :meth:`~cleanai_core.graph.context.TraceContext.regard_bare`). ``False`` (nothing
    coupled) where the channels stand before the normalised dims or an affine tensor
    cannot follow them."""
    if lab.dim < first:
        return False
    plans = []
    for p in params:
        if p is None or not hasattr(p, "key"):
            continue
        pdim = lab.dim - first  # the affine tensors have the normalised dims' shape
        plab = ctx.label_of(p)
        if plab is not None and plab.dim != pdim and ctx.is_bare(plab):
            plab = ctx.regard_bare(p, plab, pdim)
        if plab is None or plab.dim != pdim or plab.atoms.numel() != lab.atoms.numel():
            return False
        plans.append(plab.atoms)
    for atoms in plans:
        ctx.union(lab.atoms, atoms)
    return True


_STORED_WHY = "{where} normalises over a width stored in its module's normalized_shape, which no plugin rewrites"


def _stored_shape(ctx, shape: list) -> bool:
    """The norm runs in the ``forward`` of a module (no layer pruner claimed it) that
    passes its own ``normalized_shape`` attribute: after slicing it would still hold the
    old width, so the pruned model would fail to run."""
    stored = getattr(ctx.scope_module(), "normalized_shape", None)
    if isinstance(stored, int) and not isinstance(stored, bool):  # I-BERT's IntLayerNorm keeps a plain int
        stored = (stored,)
    return isinstance(stored, (tuple, list, torch.Size)) and [int(n) for n in stored] == [int(n) for n in shape]


@table.register("native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm")
def layer_norm(call, ctx):
    x = call.args[0]
    shape = list(arg(call, 1, "normalized_shape"))
    params = [arg(call, 2, "weight"), arg(call, 3, "bias") if "rms" not in str(call.op) else None]
    lab = ctx.label_of(x)
    if lab is not None and lab.dim < x.ndim - len(shape):
        # channels outside the normalised dims (the heads of q under a per-head qk-norm):
        # every position along them is normalised alike, so they pass through untouched
        ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)
        return
    if lab is not None and _stored_shape(ctx, shape):
        ctx.freeze(lab.atoms, _STORED_WHY.format(where=ctx.where()))
        for p in params:
            ctx.freeze_tensor(p, f"{ctx.where()}: affine of a frozen norm")
        return
    if lab is not None and len(shape) > 1 and _couple_wide_affine(ctx, lab, x.ndim - len(shape), params):
        # over several dims, the channels among them (``F.layer_norm(y, y.shape[1:])`` over C, H, W)
        ctx.normalize(lab.atoms)
        ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)
        return
    if lab is None or len(shape) != 1 or lab.dim != x.ndim - 1:
        if lab is not None:
            ctx.freeze(lab.atoms, f"{ctx.where()} normalises over the channels in a way that cannot shrink")
        for p in params:
            ctx.freeze_tensor(p, f"{ctx.where()}: affine of a frozen norm")
        return
    _couple_affine(ctx, lab.atoms, params)
    ctx.normalize(lab.atoms)  # statistics over the channels: prunable like a LayerNorm's, not exactly
    ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)


@table.register(
    "native_batch_norm",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training",
    "batch_norm",
    "_batch_norm_impl_index",
    "cudnn_batch_norm",
    "miopen_batch_norm",
    "_native_batch_norm_legit_functional",
    "instance_norm",
)
def batch_norm(call, ctx):
    x = call.args[0]
    params = [a for a in call.args[1:5]]
    lab = ctx.label_of(x)
    if lab is None or lab.dim != min(1, x.ndim - 1):
        if lab is not None:
            ctx.freeze(lab.atoms, f"{ctx.where()}: channels on an unexpected dimension")
        for p in params:
            ctx.freeze_tensor(p, f"{ctx.where()}: statistics of a frozen norm")
        return
    _couple_affine(ctx, lab.atoms, params)
    ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)


@table.register("native_group_norm", "group_norm")
def group_norm(call, ctx):
    x = call.args[0]
    params = [arg(call, 1, "weight"), arg(call, 2, "bias")]
    groups = arg(call, 6, "group") if "native" in str(call.op) else arg(call, 1, "num_groups")
    lab = ctx.label_of(x)
    if lab is None or lab.dim != 1 or not isinstance(groups, int):
        if lab is not None:
            ctx.freeze(lab.atoms, f"{ctx.where()}: channels on an unexpected dimension")
        return
    if groups > 1:
        ctx.tie(lab.atoms, (groups, lab.atoms.numel() // groups), 1)
    _couple_affine(ctx, lab.atoms, params)
    ctx.normalize(lab.atoms)
    ctx.set_label(call.outputs[0], 1, lab.atoms, lab.origin)


# reductions whose value over masked (zeroed) channels equals that over the kept ones
_MASK_INVARIANT = {"sum", "nansum", "norm", "linalg_vector_norm", "any", "count_nonzero"}


# reductions that a norm written by hand takes over the channels and brings back onto them
_STATISTICS = {"mean", "nanmean", "var", "std", "var_mean", "std_mean", "amax", "amin", "logsumexp"}


def _reduce_channels(call, ctx, lab, name, dims: list[int] | None = None, keep: bool = False) -> None:
    """A reduction across the channels: the label is dropped when zeroed channels do not
    change the result (a sum over fewer channels); otherwise (mean, max, var...) the
    result depends on how many channels there are, so they are frozen. When the label
    came from a reshape split whose outer part is not reduced (timm EvoNorm-S
    ``x.reshape(B, groups, C // groups, H, W).var(dim=(2, 3, 4))``), the kernel is asked
    to trace again with the outer part carrying the channels: whole groups then go.
    A statistic kept as a size-1 dim (``keep``) waits: where it only comes back onto
    these channels (a norm written by hand) they normalise (graph/statistics.py)."""
    if name in _MASK_INVARIANT:
        return
    if dims is not None and lab.origin is not None and lab.origin[1] > 0 and lab.dim - 1 not in dims:
        ctx.request_split(lab.origin, lab.origin[1] - 1)
    why = f"{ctx.where()}: {name} across channels depends on their number"
    src = call.args[0]
    if keep and name in _STATISTICS and all(o.ndim == src.ndim and o.shape[lab.dim] == 1 for o in call.outputs):
        # a module of its own that stores the width it normalises (I-BERT's IntLayerNorm keeps
        # ``normalized_shape`` and its quantised mode reads it) stays whole, as F.layer_norm's does
        if _stored_shape(ctx, [lab.atoms.numel()]):
            why = _STORED_WHY.format(where=ctx.where())
        else:
            ctx.statistic(call.outputs, lab.atoms, why)
            return
    ctx.freeze(lab.atoms, why)


@table.register(
    "sum",
    "mean",
    "amax",
    "amin",
    "var",
    "std",
    "var_mean",
    "std_mean",
    "logsumexp",
    "norm",
    "linalg_vector_norm",
    "max",
    "min",
    "argmax",
    "argmin",
    "prod",
    "nansum",
    "nanmean",
    "any",
    "all",
    "count_nonzero",
    "aminmax",
)
def reduce(call, ctx):
    """Reducing over the channel dimension drops the label (a sum over fewer channels
    has the same shape); reducing elsewhere keeps it."""
    if is_pointwise(call.op):  # aten.max.other and friends
        elementwise(call, ctx)
        return
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    name = call.op.overloadpacket.__name__
    dims = arg(call, 2 if name in ("norm", "linalg_vector_norm") else 1, "dim")
    keep = arg(call, 3 if name in ("norm", "linalg_vector_norm") else 2, "keepdim", False)
    if name in ("var", "std", "var_mean", "std_mean") and not isinstance(dims, (list, tuple, int)):
        dims = call.kwargs.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        _reduce_channels(call, ctx, lab, name)  # a full reduction: no channel dimension is left
        _reduce_second(ctx, lab, name, None)
        return
    if not isinstance(dims, (list, tuple, int)):
        ctx.freeze(lab.atoms, f"{ctx.where()}: reduction over unknown dimensions")
        return
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [x % src.ndim for x in dims]
    if lab.dim in dims:
        _reduce_channels(call, ctx, lab, name, dims, keep is True)
        _reduce_second(ctx, lab, name, dims)
        return
    d = lab.dim if keep is True else lab.dim - sum(x < lab.dim for x in dims)
    cross = None
    if lab.cross is not None and not _reduce_second(ctx, lab, name, dims):
        c = lab.cross[0] % src.ndim
        cross = (c if keep is True else c - sum(x < c for x in dims), lab.cross[1])
    _label_outputs(call, ctx, lab, d, cross)


def _label_outputs(call, ctx, lab, d: int, cross=None) -> None:
    """Label every output that still has the channels on ``d``; where none has them, they
    freeze (dropped silently, the next layer's inputs would be pruned apart from them)."""
    placed = False
    for out in call.outputs:
        if out.ndim > d and out.shape[d] == lab.atoms.numel():
            ctx.set_label(out, d, lab.atoms, lab.origin, cross)
            placed = True
    if not placed:
        ctx.freeze(lab.atoms, f"{ctx.where()} changes the shape")


def _reduce_second(ctx, lab, name: str, dims: list[int] | None) -> bool:
    """A reduction over the second labelled dimension of a weight read outside its module
    (a cosine classifier's ``fc.weight.norm(dim=1, keepdim=True)``, an L2 penalty
    ``(w ** 2).sum()``): dropped, like channels, where zeroed entries do not change the
    result (the masking oracle zeroes such a weight along both dims); left to freeze
    otherwise. Returns whether it reduced it. Before 2026-12-02 any reduction froze it."""
    if lab.cross is None or (dims is not None and lab.cross[0] not in dims):
        return False
    if name in _MASK_INVARIANT:
        ctx.pass_second(lab)
    return True


#: ``op -> (position of dim, position of keepdim or None when the dim stays)``; an op
#: without a dim argument (``median(x)``, ``msort``) orders all elements, or dim 0
_ORDERING = {
    "topk": (2, None),
    "sort": (1, None),
    "argsort": (1, None),
    "msort": (None, None),
    "kthvalue": (2, 3),
    "median": (1, 2),
    "nanmedian": (1, 2),
    "mode": (1, 2),
    "cummax": (1, None),
    "cummin": (1, None),
}


@table.register(*_ORDERING)
def sort_like(call, ctx):
    """Ordering along a dimension (``topk``, ``sort``, ``kthvalue``, ``median``, ``mode``,
    ``cummax``): across the channels it depends on every channel (frozen); elsewhere the
    channels pass to the values and the indices, on the dim they keep when the op reduces
    it (``median(-1)`` without ``keepdim``). Before 2026-12-02 the dim was read from the
    wrong argument (``topk(k, 1)`` ordered the last dim to the graph, ``kthvalue(k)`` took
    ``k`` for the dim) and a reducing op dropped the label: the pruned model failed to run."""
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    name = call.op.overloadpacket.__name__
    dim_at, keep_at = _ORDERING[name]
    if src.ndim == 0:
        return
    if dim_at is None:  # msort: along dim 0; median(x): over everything
        dim = 0 if name == "msort" else None
    else:
        dim = call.kwargs.get("dim", arg(call, dim_at, "dim", -1))
    if dim is None or dim % src.ndim == lab.dim:
        ctx.freeze(lab.atoms, f"{ctx.where()} orders channels")
        return
    dim %= src.ndim
    keep = keep_at is None or bool(arg(call, keep_at, "keepdim", False))
    d = lab.dim if keep else lab.dim - (dim < lab.dim)
    _label_outputs(call, ctx, lab, d)


@table.register("renorm")
def renorm(call, ctx):
    """``x.renorm(p, dim, maxnorm)`` rescales each slice along ``dim`` whose norm over the
    other dims exceeds ``maxnorm``: along the channels, each channel alone (exact); along
    another dim, the norm is taken across the channels (they shrink, not exactly, like a
    norm layer's)."""
    src = call.args[0]
    lab = ctx.label_of(src)
    if lab is None:
        return
    if arg(call, 2, "dim") % src.ndim != lab.dim:
        ctx.normalize(lab.atoms)
    ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)


@table.register("linalg_cross", "cross")
def cross(call, ctx):
    """``torch.linalg.cross(a, b, dim)`` of 3-vectors along ``dim``: channels there are the
    vectors' coordinates (frozen); elsewhere it is element-wise."""
    a = call.args[0]
    dim = arg(call, 2, "dim", -1)
    for r in call.args[:2]:
        lab = ctx.label_of(r)
        if lab is not None and dim is not None and lab.dim == dim % r.ndim:
            ctx.freeze(lab.atoms, f"{ctx.where()} crosses vectors laid along channels")
            return
    if a is not None:
        elementwise(call, ctx)


@hookimpl(trylast=True)
def cleanai_index_mapper(op):
    return table.lookup(op)
