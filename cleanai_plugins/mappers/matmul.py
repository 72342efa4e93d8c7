"""Matrix products and attention: mm, bmm, addmm, baddbmm, matmul, scaled dot-product attention;
convolutions whose weight is a bare parameter (``F.conv2d(x, self.weight)``)."""

from __future__ import annotations

import math

from cleanai_core import hookimpl
from cleanai_core.graph.context import CROSS_MARK
from cleanai_core.graph.elementwise import broadcast, elementwise
from cleanai_core.graph.trace import TRef
from cleanai_plugins.mappers._registry import MapperTable, arg
from cleanai_plugins.mappers.gqa import couple_groups

table = MapperTable()


def _product(ctx, a, b, out) -> None:
    """``out = a @ b`` with ``a: (..., n, k)``, ``b: (..., k, m)``."""
    la, lb = ctx.label_of(a), ctx.label_of(b)
    if la is None and lb is None:
        return
    na, nb, no = a.ndim, b.ndim, out.ndim
    a_k, b_k = na - 1, max(nb - 2, 0)
    a_rows = la is not None and la.dim != a_k  # a's channels stand elsewhere: they pass, b's rows cannot meet them
    if not a_rows and lb is not None and lb.cross is not None and nb >= 2 and {lb.dim, lb.cross[0]} == {nb - 2, nb - 1}:
        # b is a matrix whose rows and columns both follow channels: a claimed module's
        # weight read outside it, transposed (``F.linear(x, m.weight, bias)``), or a bare
        # parameter (``x @ self.proj``, ``F.linear(x, self.w)``; einsum's ``(1, C, K)``
        # view of it for ``bmm``): its rows contract with a's channels, its columns label out
        last = lb.dim == nb - 1
        rows, cols = (ctx.take_cross(lb), lb.atoms) if last else (lb.atoms, ctx.take_cross(lb))
        ctx.union(ctx.labels(a, a_k), rows)
        ctx.set_label(out, no - 1, cols, lb.origin if last else None)
        return
    bare_a = la is not None and la.cross is not None and na >= 2 and {la.dim, la.cross[0]} == {na - 2, na - 1}
    if bare_a and (lb is None or lb.dim == b_k):
        # ``self.proj @ x`` with a bare matrix: its columns contract with b's channels
        rows, cols = (ctx.take_cross(la), la.atoms) if la.dim == na - 1 else (la.atoms, ctx.take_cross(la))
        ctx.union(cols, ctx.labels(b, b_k))
        ctx.set_label(out, no - 2 if nb > 1 else no - 1, rows, la.origin if la.dim == na - 2 else None)
        return
    # contraction dimension: both sides must shrink together
    if (la is not None and la.dim == a_k) or (lb is not None and lb.dim == b_k and nb > 1):
        ka = ctx.labels(a, a_k) if la is not None and la.dim == a_k else None
        kb = ctx.labels(b, b_k) if lb is not None and lb.dim == b_k and nb > 1 else None
        if ka is not None and kb is not None:
            ctx.union(ka, kb)
        else:
            why = f"{ctx.where()} contracts channels with a tensor that cannot shrink"
            ctx.freeze(ka if ka is not None else kb, why)
        # the other operand's label (rows of a, columns of b) still reaches the output
        if ka is None and la is not None:
            if na >= 2 and la.dim == na - 2:
                ctx.set_label(out, no - 2, la.atoms, la.origin)
            else:
                ctx.freeze(la.atoms, f"{ctx.where()}: channels on a batch dimension meet a contraction")
        if kb is None and lb is not None:
            if nb >= 2 and lb.dim == nb - 1:
                ctx.set_label(out, no - 1, lb.atoms, lb.origin)
            else:
                ctx.freeze(lb.atoms, f"{ctx.where()}: channels on a batch dimension meet a contraction")
        return
    if la is not None and na >= 2 and la.dim == na - 2:
        if lb is not None:
            _both_carry(ctx, la, lb)
        ctx.set_label(out, no - 2, la.atoms, la.origin)
        return
    if lb is not None and nb >= 2 and lb.dim == nb - 1:
        if la is not None:
            _both_carry(ctx, lb, la)
        ctx.set_label(out, no - 1, lb.atoms, lb.origin)
        return
    # batch dimensions broadcast like an element-wise op
    batch_a = [r for r, lab in ((a, la), (b, lb)) if lab is not None]
    for r in batch_a:
        lab = ctx.label_of(r)
        d = lab.dim + no - r.ndim
        other = b if r is a else a
        od = lab.dim + other.ndim - r.ndim
        olab = ctx.label_of(other)
        if olab is not None and olab.dim == od:
            ctx.union(lab.atoms, olab.atoms)
        elif 0 <= od < other.ndim - 2 and other.shape[od] > 1:
            ctx.freeze(lab.atoms, f"{ctx.where()} pairs channels with a batch that cannot shrink")
            continue
        ctx.set_label(out, d, lab.atoms, lab.origin)


def _both_carry(ctx, kept, other) -> None:
    """Rows of ``a`` and columns of ``b`` both carry channels: ``other`` freezes. When both
    come from one reshape split of a fused projection (CoaT's factorised attention
    ``k^T @ v``, XCiT's and DaViT's channel attention ``q^T @ k``, all head dims of one
    ``qkv``), ask for the dimension before (the heads: a batch dimension here); q, k and v
    switch together, so their heads stay equal. Operands split apart (CaiT's talking heads,
    GCViT's global query, EfficientFormer-V2's ``v``) are left alone: switching one split
    would leave the others' heads behind."""
    if kept.origin is not None and other.origin is not None and kept.origin[0] == other.origin[0]:
        ctx.request_split(kept.origin, kept.origin[1] - 1)
    ctx.freeze(other.atoms, f"{ctx.where()}: both operands carry channels")


@table.register("mm", "bmm", "matmul", "_unsafe_mm", "_sparse_mm", "hspmm")
def mm(call, ctx):
    """``a @ b``; a sparse operand (``torch.spmm``, ``torch.hspmm``: a graph's adjacency)
    is a constant matrix like any unlabelled one."""
    _product(ctx, call.args[0], call.args[1], call.outputs[0])


@table.register("convolution", "_convolution")
def convolution(call, ctx):
    """``F.conv2d(x, self.weight, self.bias)`` with a bare weight (a parameter of a module
    no layer pruner claims, the peer's "unwrapped parameters"): its output filters (dim 0;
    dim 1 when transposed) are fresh channels that the bias and the output follow, its
    input channels (the other dim) shrink with ``x``'s. A claimed module's weight read
    outside it maps the same way where its pruner labels it (``trace_param``: a plain
    conv's, since session 18). Grouped convolutions, a computed weight (weight
    normalisation done in ``forward``) or an unlabelled module weight keep their channels.
    Before 2026-12-01 no mapper knew the op: the output carried no channels and its
    consumers' inputs froze."""
    x, w, out = call.args[0], call.args[1], call.outputs[0]
    lab = ctx.label_of(x)
    transposed, groups = arg(call, 6, "transposed", False), arg(call, 8, "groups", 1)
    bare = isinstance(w, TRef) and w.param is not None and ctx.param_owner.get(w.param) is None
    din, dout = (0, 1) if transposed else (1, 0)
    lw = ctx.label_of(w) if not bare and groups == 1 and w.ndim == x.ndim else None
    if lw is not None and lw.dim == dout:
        # a claimed conv's weight read outside it, labelled by its pruner (TridentNet's shared
        # weight at another dilation), or computed from it (a conv folded with its BatchNorm in
        # ``forward``): its filters label the output; its input channels shrink with x's
        # where it still knows them, else x's channels stay
        if lw.cross is not None and lw.cross[0] == din:
            ctx.union(ctx.labels(x, 1), ctx.take_cross(lw))
        else:
            ctx.freeze_tensor(x, f"{ctx.where()} convolves channels with a weight whose inputs cannot shrink")
        bias = arg(call, 2, "bias")
        if isinstance(bias, TRef):
            ctx.union(lw.atoms, ctx.labels(bias, 0))
        ctx.set_label(out, 1, lw.atoms)
        return
    if lw is not None and lw.dim == din and lw.cross is not None and lw.cross[0] == dout:
        # a claimed conv's weight run the other way round (a tied autoencoder's decoder,
        # ``F.conv_transpose2d(h, self.enc.weight)``): its filters meet x's channels, its
        # input channels label the output. Froze both before 2026-12-02
        ctx.union(ctx.labels(x, 1), lw.atoms)
        atoms = ctx.take_cross(lw)
        bias = arg(call, 2, "bias")
        if isinstance(bias, TRef):
            ctx.union(atoms, ctx.labels(bias, 0))
        ctx.set_label(out, 1, atoms)
        return
    if bare and _depthwise(x, w, lab, groups, transposed):
        # one filter per channel (timm's ``BlurPool2d``: a fixed blur in a buffer, ``groups=C``;
        # froze its channels and the stream they belong to, resnetblur18 kept 0.36): the
        # channels pass, the filters (dim 0) go with them
        ctx.bind("", w.param, lab.atoms, "param", dim=0)
        bias = arg(call, 2, "bias")
        if isinstance(bias, TRef):
            ctx.union(lab.atoms, ctx.labels(bias, 0))
        ctx.set_label(out, 1, lab.atoms, lab.origin)
        return
    _bare_weight(ctx, x, w, arg(call, 2, "bias"), out, bare, transposed, groups)


def _bare_weight(ctx, x, w, bias, out, bare: bool, transposed: bool, groups: int = 1) -> None:
    """A convolution with a bare weight: its filters are fresh channels that the bias and
    the output follow, its input channels shrink with ``x``'s channels (dim 1). With
    ``groups`` (a number the model passes, or torchvision's ``deform_conv2d`` derives from
    the widths) the group count stays: the j-th channel of every group is one unit, on
    the input as on the filters, as :class:`~cleanai_plugins.layers.conv.ConvPruner` ties
    a grouped ``nn.Conv2d`` (froze both before 2026-12-02). The weight holds one group's
    share of a dim (the inputs, or a transposed weight's filters: dim 1) and every channel
    of the other. A weight of the wrong rank or shape for ``groups``, or a claimed
    module's weight, freezes ``x`` and ``w`` with the reason."""
    lab, (din, dout) = ctx.label_of(x), ((0, 1) if transposed else (1, 0))
    grouped = groups != 1
    cin = w.shape[din] * (1 if transposed else groups)  # the input channels the weight reads
    split = cin % groups or (not transposed and w.shape[dout] % groups)  # groups that do not divide
    if not bare or w.ndim != x.ndim or x.shape[1] != cin or split:
        why = f"{ctx.where()} convolves channels with a weight that cannot shrink"
        ctx.freeze_tensor(x, why)
        ctx.freeze_tensor(w, why)
        return
    if lab is not None and lab.dim == 1:
        cols = lab.atoms
        if grouped:  # channel j of every group; a plain weight's dim 1 holds one group's share
            share = ctx.tie(lab.atoms, (groups, cin // groups), 1)
            cols = lab.atoms if transposed else share
        ctx.bind("", f"{w.param}{CROSS_MARK}{din}", cols, "param", dim=din)
    elif lab is not None:
        ctx.freeze(lab.atoms, f"{ctx.where()} convolves over the channels' dimension")
    atoms = ctx.produce("", w.param, w.shape[dout], dim=dout)
    ctx.slices[("", w.param)].kind = "param"
    if grouped and transposed:  # the weight holds one group's filters: filter j of every group
        atoms = atoms.repeat(groups)
    elif grouped:
        ctx.tie(atoms, (groups, w.shape[dout] // groups), 1)
    if isinstance(bias, TRef):
        ctx.union(atoms, ctx.labels(bias, 0))
    ctx.set_label(out, 1, atoms)


@table.register("_trilinear")
def trilinear(call, ctx):
    """``F.bilinear(x1, x2, self.weight)`` with a bare ``(out, in1, in2)`` weight (the peer's
    unwrapped parameter; ``nn.Bilinear`` has its own pruner): ATen runs
    ``_trilinear(x1, weight, x2, [1, 3], [0], [1, 2], [2, 3])`` on ``(N, in1)`` and
    ``(N, in2)``. The weight's dim 1 shrinks with ``x1``'s channels, its dim 2 with
    ``x2``'s, its dim 0 is fresh channels the output follows. Any other ``_trilinear``, or
    a claimed module's weight, freezes the channels it meets. Before 2026-12-02 no mapper
    knew the op: "channels reach op aten._trilinear.default, which ignored them"."""
    x1, w, x2, out = call.args[0], call.args[1], call.args[2], call.outputs[0]
    pattern = [list(arg(call, i, name)) for i, name in ((3, "expand1"), (4, "expand2"), (5, "expand3"), (6, "sumdim"))]
    bare = isinstance(w, TRef) and w.param is not None and ctx.param_owner.get(w.param) is None
    if not bare or pattern != [[1, 3], [0], [1, 2], [2, 3]] or w.ndim != 3 or x1.ndim != 2 or x2.ndim != 2:
        why = f"{ctx.where()} contracts channels with a weight that cannot shrink"
        for t in (x1, w, x2):
            ctx.freeze_tensor(t, why)
        return
    for x, dim in ((x1, 1), (x2, 2)):
        lab = ctx.label_of(x)
        if lab is not None and lab.dim == 1:
            ctx.bind("", f"{w.param}{CROSS_MARK}{dim}", lab.atoms, "param", dim=dim)
        elif lab is not None:
            ctx.freeze(lab.atoms, f"{ctx.where()} contracts over the channels' dimension")
    atoms = ctx.produce("", w.param, w.shape[0], dim=0)
    ctx.slices[("", w.param)].kind = "param"
    ctx.set_label(out, 1, atoms)


@table.register("deform_conv2d")
def deform_conv2d(call, ctx):
    """torchvision's deformable convolution (``torchvision.ops.DeformConv2d``, DCN in
    detection necks and heads; ``torchvision.ops.deform_conv2d`` with a bare weight):
    ``(input, weight, offset, mask, bias, ..., groups, offset_groups, use_mask)``. The
    weight (the module's, which no layer pruner claims) maps like a bare ``F.conv2d``
    weight: its filters are fresh channels that the bias and the output follow, its
    input channels shrink with the input's. The offsets and the mask are read per kernel
    position (``2 * offset_groups * kh * kw`` and ``offset_groups * kh * kw`` channels): the
    layers that compute them keep their channels. Several offset groups (each a fixed share
    of the input channels) keep the input's channels, a grouped weight all of them. Without
    a bias, torchvision passes ``zeros(weight.shape[0])``: it follows the kept filters. Before
    2026-12-02 no mapper knew the op: every channel around it froze ("which ignored them")."""
    x, w, out = call.args[0], call.args[1], call.outputs[0]
    groups, offset_groups = arg(call, 11, "groups", 1), arg(call, 12, "offset_groups", 1)
    why = f"{ctx.where()} reads offsets and a mask per kernel position, which cannot shrink"
    for name, i in (("offset", 2), ("mask", 3)):
        t = arg(call, i, name)
        if isinstance(t, TRef):
            ctx.freeze_tensor(t, why)
    lab = ctx.label_of(x)
    if offset_groups != 1 and lab is not None and lab.dim == 1 and x.shape[1] % offset_groups == 0:
        # offset group i moves the i-th share of the input channels: channel j of every share
        # goes together, so each share keeps its width (froze every input before 2026-12-02)
        ctx.tie(lab.atoms, (offset_groups, x.shape[1] // offset_groups), 1)
    elif offset_groups != 1:
        ctx.freeze_tensor(x, f"{ctx.where()} splits its input channels into {offset_groups} offset groups")
    bare = isinstance(w, TRef) and w.param is not None and ctx.param_owner.get(w.param) is None
    bias = arg(call, 4, "bias")
    if isinstance(bias, TRef) and bias.param is None and ctx.label_of(bias) is None:
        bias = None  # no bias: torchvision passes zeros(weight.shape[0]), as wide as the filters kept
    _bare_weight(ctx, x, w, bias, out, bare, False, groups)


def _depthwise(x, w, lab, groups: int, transposed: bool) -> bool:
    """A depthwise convolution with a weight of one filter per channel of ``x``'s labelled dim 1."""
    if transposed or lab is None or lab.dim != 1 or w.ndim != x.ndim or groups <= 1:
        return False
    return w.shape[0] == groups == x.shape[1] and w.shape[1] == 1


#: model findings key (``cleanai_prepare_model``): attention modules whose fix-up slices an
#: additive per-head input they are handed (Bloom's ALiBi, built once for every layer) to
#: the heads they kept, at every call
HEAD_INPUTS = "head_inputs"


def slices_head_inputs(*modules) -> dict[str, set]:
    """The findings that let the per-head additive input of each of ``modules`` (an
    unlabelled ``baddbmm`` bias, one row per head) shrink with the heads: return it from
    ``cleanai_prepare_model``; the caller's fix-up must slice that input at run time."""
    return {HEAD_INPUTS: set(modules)}


@table.register("add")
def add(call, ctx):
    """Element-wise, except a per-head bias added to the scores inside an attention module
    that slices it to its kept heads at every call (MPT's ALiBi ``position_bias``, ``(heads,
    1, keys)`` beside ``(batch, heads, queries, keys)`` scores: :data:`HEAD_INPUTS`)."""
    if ctx.scope_module() in ctx.findings.get(HEAD_INPUTS, ()) and len(call.args) >= 2:
        out, (a, b) = call.outputs[0], call.args[:2]
        la, lb = ctx.label_of(a), ctx.label_of(b)
        if isinstance(out, TRef) and isinstance(a, TRef) and isinstance(b, TRef) and (la is None) != (lb is None):
            src, bias, lab = (a, b, la) if la is not None else (b, a, lb)
            dim = lab.dim + out.ndim - src.ndim
            local = dim - (out.ndim - bias.ndim)
            if 0 <= local and bias.shape[local] == out.shape[dim] > 1:
                broadcast(ctx, [src], out)
                return
    elementwise(call, ctx)


#: findings key: the set of modules whose fix-up makes the pruned module scale its attention
#: by the trained head size (a ``scale`` it stores), not by the pruned one that
#: ``F.scaled_dot_product_attention`` would read from its inputs
TRAINED_SCALE = "trained_scale"


def keeps_trained_scale(*modules) -> dict[str, set]:
    """The findings that let the head size of a scaled dot-product attention run directly in
    each of ``modules``' ``forward`` shrink: return it from ``cleanai_prepare_model``; the
    caller's fix-up must make the pruned module scale by the trained head size."""
    return {TRAINED_SCALE: set(modules)}


@table.register("addmm", "baddbmm", "addbmm", "_sparse_addmm")
def addmm(call, ctx):
    """``bias + a @ b``; ``torch.sparse.mm`` / ``torch.sparse.addmm`` run as ``_sparse_addmm``
    (before 2026-12-02 no mapper knew it: the channels it carried froze)."""
    out = call.outputs[0]
    _product(ctx, call.args[1], call.args[2], out)
    bias = call.args[0]
    if arg(call, 3, "beta", 1) == 0 and ctx.label_of(bias) is None:
        return  # not read (``torch.sparse.mm`` adds its product to ``zeros`` with beta=0)
    lab = ctx.label_of(out)
    if (
        lab is not None
        and ctx.label_of(bias) is None
        and ctx.scope_module() in ctx.findings.get(HEAD_INPUTS, ())
        and getattr(bias, "ndim", 0) == out.ndim
        and bias.shape[lab.dim] == out.shape[lab.dim]
    ):
        return  # a per-head input the module slices to its kept heads (Bloom's ALiBi)
    if ctx.label_of(bias) is not None or lab is not None:
        broadcast(ctx, [bias, out], out)


@table.register("_cdist_forward", "cdist", "_euclidean_dist")
def cdist(call, ctx):
    """``torch.cdist(x1, x2)``: distances between the rows of ``x1: (..., P, M)`` and of
    ``x2: (..., R, M)`` over their last dimension (a prototype classifier, a VQ-VAE's
    nearest codebook entry): like ``x1 @ x2^T``, channels on ``M`` contract (both sides
    shrink together: a zeroed pair adds nothing to the distance), rows label the output's
    ``P``, ``x2``'s rows its ``R``. Before 2026-12-02 no mapper knew it: its channels froze."""
    a, b, out = call.args[0], call.args[1], call.outputs[0]
    la, lb = ctx.label_of(a), ctx.label_of(b)
    if la is None and lb is None:
        return
    ka = la is not None and la.dim == a.ndim - 1
    kb = lb is not None and (lb.dim == b.ndim - 1 or (lb.cross is not None and lb.cross[0] == b.ndim - 1))
    if ka or kb:
        cols = None if lb is None else lb.atoms if lb.dim == b.ndim - 1 else ctx.take_cross(lb) if kb else None
        if ka and cols is not None:
            ctx.union(la.atoms, cols)
        else:
            ctx.freeze(
                la.atoms if ka else cols, f"{ctx.where()} measures distances over channels that only one side has"
            )
    if la is not None and la.dim == a.ndim - 2:
        ctx.set_label(out, out.ndim - 2, la.atoms, la.origin)
    elif la is not None and not ka:
        ctx.freeze(la.atoms, f"{ctx.where()}: channels on a batch dimension meet a distance")
    rows = None
    if lb is not None and lb.dim == b.ndim - 2:
        rows = lb.atoms
    elif lb is not None and lb.cross is not None and lb.cross[0] == b.ndim - 2 and lb.dim == b.ndim - 1:
        rows = ctx.take_cross(lb)
    elif lb is not None and not kb:
        ctx.freeze(lb.atoms, f"{ctx.where()}: channels on a batch dimension meet a distance")
    if rows is not None:
        if ctx.label_of(out) is None:
            ctx.set_label(out, out.ndim - 1, rows)
        else:
            ctx.freeze(rows, f"{ctx.where()}: both operands carry channels")


@table.register("mul")
def mul(call, ctx):
    """Element-wise, except the scale of a decomposed scaled dot-product attention.

    When ATen runs SDPA through its math path (e.g. non-contiguous inputs), the trace sees
    ``q * E ** -0.25`` and ``k^T * E ** -0.25``, ``E`` being the head size: that scalar
    changes with ``E``, so the head dimension must not shrink (keep whole heads instead)."""
    src, scalar = call.args[0], arg(call, 1, "other")
    if isinstance(scalar, float) and hasattr(src, "key") and src.ndim >= 2:
        lab = ctx.label_of(src)
        n = src.shape[lab.dim] if lab is not None else 0
        scaled = n > 1 and math.isclose(scalar, n**-0.25, rel_tol=1e-5) and _reaches_product(ctx, call.outputs[0])
        if lab is not None and lab.dim >= src.ndim - 2 and scaled and not _keeps_trained_scale(ctx):
            if lab.origin is not None:
                ctx.request_split(lab.origin, lab.origin[1] - 1)
            ctx.freeze(lab.atoms, f"{ctx.where()}: attention scale depends on the head size")
    elementwise(call, ctx)


#: ops that only lay out a tensor, between an attention's scale and its matrix product
_LAYOUT = frozenset({"expand", "view", "_unsafe_view", "reshape", "_reshape_alias", "transpose", "t", "permute",
                     "clone", "contiguous", "unsqueeze", "squeeze"})  # fmt: skip
_PRODUCTS = frozenset({"mm", "bmm", "matmul", "baddbmm", "addmm", "addbmm"})


def _reaches_product(ctx, ref, steps: int = 4) -> bool:
    """Whether ``ref`` is an operand of a matrix product, through at most ``steps`` ops that
    only lay it out (SDPA's math path: ``q * E ** -0.25`` expanded and viewed for ``bmm``).
    A scalar that only happens to be ``E ** -0.25`` elsewhere (GELU's ``0.5 * x`` over 16
    channels, ``x * 0.25`` over 256) scales nothing that depends on the width: before
    2026-12-02 it froze those channels ("attention scale depends on the head size")."""
    todo, seen = [(ref, 0)], set()
    while todo:
        r, depth = todo.pop()
        for event in ctx.readers(r):
            name = getattr(getattr(getattr(event, "op", None), "overloadpacket", None), "__name__", "")
            if name in _PRODUCTS:
                return True
            if name in _LAYOUT and depth < steps and id(event) not in seen:
                seen.add(id(event))
                todo += [(o, depth + 1) for o in event.outputs]
    return False


def _keeps_trained_scale(ctx) -> bool:
    return ctx.scope_module() in ctx.findings.get(TRAINED_SCALE, ())


def _grouped(ctx, a, b) -> bool:
    """Grouped-query attention (``enable_gqa``): the side with ``n`` heads serves
    ``m / n`` consecutive heads of the side with ``m``; a key/value head and its query
    heads go together (whole KV groups), or, in a module filed for it, the KV heads stay
    and each group loses the same query heads (:mod:`~cleanai_plugins.mappers.gqa`).
    ``False`` when the counts do not divide."""
    big, small = (a, b) if a.atoms.numel() > b.atoms.numel() else (b, a)
    if big.atoms.numel() % small.atoms.numel():
        return False
    couple_groups(ctx, big.atoms, small.atoms)
    return True


class _SDPA:
    """``softmax(q k^T * scale) v``. Heads (a batch dimension) may shrink on q, k and v
    together; the head dimension may shrink only when ``scale`` is given, since the
    default scale depends on it: if a reshape split chose it, the kernel is asked to
    re-trace preferring the heads. With grouped-query attention (k and v with fewer
    heads than q) each key/value head is pruned with the query heads it serves."""

    def trace(self, call, ctx):
        q, k, v = call.args[0], call.args[1], call.args[2]
        out = call.outputs[0]
        lq, lk, lv = ctx.label_of(q), ctx.label_of(k), ctx.label_of(v)
        scale = call.kwargs.get("scale")
        mask = call.kwargs.get("attn_mask", arg(call, 3, "attn_mask") if "flash" not in str(call.op) else None)
        mask = mask if hasattr(mask, "key") else None
        nd = q.ndim
        for lab in (lq, lk):
            if lab is not None and lab.dim == nd - 1 and scale is None and lab.origin is not None:
                ctx.request_split(lab.origin, lab.origin[1] - 1)
        head = None
        for ref, lab in ((q, lq), (k, lk), (v, lv)):
            if lab is None:
                continue
            if lab.dim < nd - 2:
                if head is None:
                    head = lab
                elif head.atoms.numel() == lab.atoms.numel() and head.dim == lab.dim:
                    ctx.union(head.atoms, lab.atoms)
                elif head.dim == lab.dim and _grouped(ctx, head, lab):
                    pass
                else:
                    ctx.freeze(lab.atoms, f"{ctx.where()}: heads do not line up")
            elif lab.dim == nd - 1 and ref is not v:
                pass
            elif ref is not v:
                ctx.freeze(lab.atoms, f"{ctx.where()}: sequence dimension carries channels")
        if lq is not None and lq.dim == nd - 1 or lk is not None and lk.dim == nd - 1:
            if lq is None or lk is None or lq.dim != lk.dim or scale is None:
                for lab in (lq, lk):
                    if lab is not None and lab.dim == nd - 1:
                        why = "head dimension with the default scale (1/sqrt of the head size changes if it shrinks"
                        fix = "pass scale=, or reshape with the head count as -1 so that whole heads can go"
                        ctx.freeze(lab.atoms, f"{ctx.where()}: {why}; {fix})")
            else:
                ctx.union(lq.atoms, lk.atoms)
        if head is not None:
            for ref in (q, k, v):
                lab = ctx.label_of(ref)
                if lab is None and ref.shape[head.dim] > 1:
                    ctx.freeze(head.atoms, f"{ctx.where()}: heads meet a tensor that cannot shrink")
                elif lab is not None and lab.dim != head.dim and ref.shape[head.dim] > 1:
                    # e.g. v split keeping its head dim while q, k keep heads: ask for whole heads
                    if lab.origin is not None:
                        ctx.request_split(lab.origin, lab.origin[1] - 1)
                    ctx.freeze(head.atoms, f"{ctx.where()}: heads of q, k, v do not line up")
            if mask is not None:  # an additive bias / mask per head (relative position bias) shrinks with the heads
                ml, md = ctx.label_of(mask), head.dim - (nd - mask.ndim)
                if ml is not None and ml.dim == md and ml.atoms.numel() == head.atoms.numel():
                    ctx.union(head.atoms, ml.atoms)
                    mask = None
                elif ml is None and md >= 0 and ctx.scope_module() in ctx.findings.get(HEAD_INPUTS, ()):
                    mask = None  # a per-head mask the module slices to its kept heads (Falcon's ALiBi)
                elif md >= 0 and mask.shape[md] > 1:
                    ctx.freeze(head.atoms, f"{ctx.where()}: heads meet an attention mask that cannot shrink")
            atoms = head.atoms
            if atoms.numel() != out.shape[head.dim]:  # only k / v carried heads, fewer than q's
                atoms = atoms.repeat_interleave(out.shape[head.dim] // atoms.numel())
            ctx.set_label(out, head.dim, atoms, head.origin)
            if lv is not None and lv.dim == nd - 1:
                ctx.freeze(lv.atoms, f"{ctx.where()}: both heads and value dims carry channels")
        elif lv is not None and lv.dim == nd - 1:
            # v split keeping its head dim on its own (not the split of a fused qkv that q
            # and k come from): modules reshape q and v with one ``head_dim``, so v loses
            # whole heads as q and k do
            fused = {lab.origin[0] for lab in (lq, lk) if lab is not None and lab.origin is not None}
            if nd >= 3 and v.shape[nd - 3] > 1 and lv.origin is not None and lv.origin[0] not in fused:
                ctx.request_split(lv.origin, lv.origin[1] - 1)
            ctx.set_label(out, nd - 1, lv.atoms, lv.origin)
        if mask is not None:
            ctx.freeze_tensor(mask, f"{ctx.where()}: attention mask")


@hookimpl(trylast=True)
def cleanai_index_mapper(op):
    if "scaled_dot_product" in str(op):
        return _SDPA()
    return table.lookup(op)
