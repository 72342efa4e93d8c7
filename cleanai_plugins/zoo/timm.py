"""timm (and timm-style) models: attention attributes, classifier heads.

Attention blocks keep their head count and head size in attributes (``num_heads``,
``head_dim``, ``attn_dim``) that their ``forward`` uses in reshapes. After slicing, the
kept output indices of the block's query projection tell what happened: whole heads
removed (``num_heads`` shrinks) or the same dims removed from every head
(``head_dim`` shrinks). The pruned model runs without the user patching anything.
"""

from __future__ import annotations

import functools
import inspect
import re
import weakref

from torch import nn

from cleanai_core import hookimpl
from cleanai_core.interfaces import replace_param
from cleanai_plugins.layers.conv import ConvPruner
from cleanai_plugins.layers.linear import LinearPruner
from cleanai_plugins.mappers.shape import allow_channel_ranges, allow_unequal_split

# child projection -> how many stacked (q, k, v) copies its output holds
_QUERY_PROJECTIONS = (("qkv", 3), ("q", 1), ("q_proj", 1), ("query", 1), ("to_q", 1), ("qkv_proj", 3), ("qk", 2))


def fix_attention(module: nn.Module, name: str, edits) -> None:
    heads_attr = "num_heads" if isinstance(getattr(module, "num_heads", None), int) else "heads"
    heads = getattr(module, heads_attr, None)
    dim_attr = "dim_head" if isinstance(getattr(module, "dim_head", None), int) else "head_dim"  # MaxViT: dim_head
    head_dim = getattr(module, dim_attr, None)
    if not isinstance(heads, int) or isinstance(heads, bool) or not isinstance(head_dim, int):
        return
    for child, stacks in _QUERY_PROJECTIONS:
        keep = edits.get((f"{name}.{child}" if name else child, "out"))
        if keep is None:
            continue
        if getattr(module, "head_first", False) is True:  # MaxViT: (heads, stacks * head_dim) layout
            block = stacks * head_dim
            kept_heads = int((keep // block).unique().numel())
            if keep.numel() == kept_heads * block:
                setattr(module, heads_attr, kept_heads)
            else:
                setattr(module, dim_attr, keep.numel() // (heads * stacks))
            break
        total = heads * head_dim
        q_keep = keep[keep < total]
        kept_heads = (q_keep // head_dim).unique().numel()
        if q_keep.numel() == kept_heads * head_dim:
            setattr(module, heads_attr, kept_heads)
        else:
            setattr(module, dim_attr, q_keep.numel() // heads)
        break
    else:
        return
    _fix_kv_heads(module, name, edits, getattr(module, dim_attr))
    width = getattr(module, heads_attr) * getattr(module, dim_attr)
    for attr in ("attn_dim", "all_head_dim", "inner_dim", "attn_dim_total", "dim_out"):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, width)


def _fix_kv_heads(module: nn.Module, name: str, edits, head_dim: int) -> None:
    """Grouped-query attention (``num_kv_heads``, ``num_kv_groups``, ``kv_dim``): the key
    heads follow the key projection's width."""
    kv_heads = getattr(module, "num_kv_heads", None)
    k = getattr(module, "k_proj", None)
    if not isinstance(kv_heads, int) or not isinstance(k, nn.Linear) or head_dim <= 0:
        return
    if k.out_features % head_dim:
        return
    module.num_kv_heads = k.out_features // head_dim
    if isinstance(getattr(module, "kv_dim", None), int):
        module.kv_dim = k.out_features
    heads = getattr(module, "num_heads", None)
    if isinstance(getattr(module, "num_kv_groups", None), int) and isinstance(heads, int) and module.num_kv_heads:
        module.num_kv_groups = heads // module.num_kv_heads


# Attention blocks that reshape their projections with ``C // self.num_heads``, ``C``
# being the width of their *input* (CaiT, CoaT, ConViT, CrossViT, DaViT, NesT, Twins,
# VOLO, XCiT, Swin-V2-CR...) or reshape their output to ``(B, N, C)`` (GCViT, timm's latent
# attention pooling: ``(B, latent_len, C)``): the
# projection width must stay equal to the input width, so each such projection's input
# channels are coupled with each (q, k, v) part of its output channels. Recognised by an
# int ``num_heads`` and either no int ``head_dim`` or such a reshape in ``forward``.
_PROJ_CHILDREN = ("qkv", "q", "k", "v", "qk", "kv", "wq", "wk", "wv", "q_proj", "k_proj", "v_proj")
_TIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # linear -> (stacks, width)
_WIDTH_ATTN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention -> {child: (stacks, width)}
_WIDTH_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention -> heads before pruning


class TiedLinearPruner(LinearPruner):
    """A projection whose every output part shrinks with its input channels."""

    def __init__(self, stacks: int) -> None:
        self.stacks = stacks

    def trace(self, module, call, ctx):
        super().trace(module, call, ctx)
        self._tie(module, call.name, ctx)

    def trace_param(self, module, name, param, ctx):
        lab = super().trace_param(module, name, param, ctx)  # EVA: F.linear(x, self.qkv.weight, qkv_bias)
        if lab is not None and param == "weight":
            self._tie(module, name, ctx)
        return lab

    def _tie(self, module, name, ctx):
        out = ctx.slices[(name, "out")].atoms
        parts = ctx.tie(out, (self.stacks, module.in_features), 1) if self.stacks > 1 else out
        ctx.union(parts, ctx.slices[(name, "in")].atoms)


_WIDTH_RE = re.compile(r"reshape\(\s*B_?,\s*(N|self\.latent_len),\s*C\s*\)|C // self\.(num_heads|groups)")


@functools.cache
def _reshapes_to_input_width(cls: type) -> bool:
    """The class's ``forward`` reshapes its attention output to the input width ``C``
    (``.reshape(B, N, C)``), e.g. GCViT's window attention."""
    try:
        return bool(_WIDTH_RE.search(inspect.getsource(cls.forward)))
    except (OSError, TypeError):
        return False


@functools.cache
def _heads_named_groups(cls: type) -> bool:
    """DaViT ``ChannelAttentionV2``: heads kept in ``groups`` (``C // self.groups``)."""
    try:
        return "C // self.groups" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _heads_attr(module: nn.Module) -> str:
    if not isinstance(getattr(module, "num_heads", None), int) and isinstance(getattr(module, "groups", None), int):
        if isinstance(module, nn.Module) and _heads_named_groups(type(module)):
            return "groups"
    return "num_heads"


def _scan_width_attention(model: nn.Module) -> None:
    for module in model.modules():
        heads = getattr(module, _heads_attr(module), None)
        if not isinstance(heads, int) or heads < 1:
            continue
        if isinstance(getattr(module, "head_dim", None), int) and not _reshapes_to_input_width(type(module)):
            continue
        found = {}
        for child in _PROJ_CHILDREN:
            lin = getattr(module, child, None)
            if not isinstance(lin, nn.Linear) or lin.out_features % lin.in_features:
                continue
            stacks = lin.out_features // lin.in_features
            if stacks in (1, 2, 3) and lin.in_features % heads == 0:
                found[child] = (stacks, lin.in_features)
        if found:
            _WIDTH_ATTN[module] = found
            _WIDTH_HEADS[module] = heads
            for child, info in found.items():
                _TIED[getattr(module, child)] = info


def fix_width_attention(module: nn.Module, name: str, edits) -> None:
    info = _WIDTH_ATTN.get(module)
    if not info:
        return
    heads_attr = _heads_attr(module)
    heads = _WIDTH_HEADS.get(module, getattr(module, heads_attr))  # fix_attention may have set it already
    for child, (_, width) in info.items():
        keep = edits.get((f"{name}.{child}" if name else child, "out"))
        if keep is None:
            continue
        head_dim = width // heads
        q_keep = keep[keep < width]
        kept_heads = int((q_keep // head_dim).unique().numel())
        if q_keep.numel() == kept_heads * head_dim:
            setattr(module, heads_attr, kept_heads)
        if getattr(module, "head_dim", None) == head_dim:  # e.g. DaViT's scale without dynamic_scale
            module.head_dim = q_keep.numel() // getattr(module, heads_attr)
        return


def _out_channels(module: nn.Module | None) -> int | None:
    """Output channels of a conv / linear, or of a conv-norm-act wrapper's conv."""
    if module is None:
        return None
    for m in (module, getattr(module, "conv", None)):
        n = getattr(m, "out_channels", None) or getattr(m, "out_features", None)
        if isinstance(n, int):
            return n
    return None


def fix_split_widths(module: nn.Module, name: str, edits) -> None:
    """Modules that split their channels by a stored width (``torch.split(x, self.width)``)."""
    scale, width = getattr(module, "scale", None), getattr(module, "width", None)
    if isinstance(scale, int) and isinstance(width, int) and hasattr(module, "convs"):
        n = _out_channels(getattr(module, "conv1", None))
        if n is not None and n % scale == 0:  # Res2Net / DLA Bottle2neck
            module.width = n // scale
    qkvs = getattr(module, "qkvs", None)
    kd, vd = getattr(module, "key_dim", None), getattr(module, "val_dim", None)
    if isinstance(qkvs, nn.ModuleList) and isinstance(kd, int) and kd == vd and len(qkvs):
        n = _out_channels(qkvs[0])  # EfficientViT (MSRA): split([key_dim, key_dim, val_dim])
        if n is not None and n % 3 == 0:
            module.key_dim = module.val_dim = n // 3
    if isinstance(getattr(module, "d_inner", None), int) and isinstance(getattr(module, "state_dim", None), int):
        n = _out_channels(getattr(module, "hz_proj", None))  # EfficientViM: split([d_inner] * 2)
        if n is not None and n % 2 == 0:
            module.d_inner = n // 2
        a = getattr(module, "A", None)
        if isinstance(a, nn.Parameter) and a.ndim == 1:  # split([state_dim] * 3)
            module.state_dim = a.shape[0]
    idx = getattr(module, "split_indexes", None)
    if isinstance(idx, (tuple, list)) and len(set(idx)) == 1:  # InceptionNeXt: equal parts were tied
        n = _out_channels(getattr(module, "dwconv_hw", None))
        if n is not None:
            module.split_indexes = type(idx)([n] * len(idx))
    paths = getattr(module, "paths", None)
    if getattr(module, "split_input", False) is True and isinstance(paths, nn.ModuleList) and len(paths):
        conv = getattr(paths[0], "conv", paths[0])  # SelectiveKernel: split(x, in_channels // num_paths)
        if isinstance(getattr(conv, "in_channels", None), int) and isinstance(module.in_channels, int):
            module.in_channels = conv.in_channels * len(paths)
    if isinstance(getattr(module, "in_dim", None), int) and isinstance(getattr(module, "unfold", None), nn.Unfold):
        n = _out_channels(getattr(module, "proj", None))  # TNT PixelEmbed: reshape(B * patches, in_dim, ...)
        if n is not None:
            module.in_dim = n
    splits = getattr(module, "splits", None)
    if isinstance(splits, list) and splits and all(isinstance(v, int) for v in splits):
        convs = list(module.children())  # MixConv: split(x, self.splits) feeds one conv per part
        ins = [getattr(c, "in_channels", None) for c in convs]
        if len(convs) == len(splits) and all(isinstance(v, int) for v in ins):
            module.splits = ins
            if isinstance(getattr(module, "in_channels", None), int):
                module.in_channels = sum(ins)
            outs = [getattr(c, "out_channels", None) for c in convs]
            if isinstance(getattr(module, "out_channels", None), int) and all(isinstance(v, int) for v in outs):
                module.out_channels = sum(outs)
    exp = getattr(module, "expand_chs", None)
    if isinstance(exp, int):  # CSPNet stages: ``x.split(self.expand_chs // 2)``
        n = _out_channels(getattr(module, "conv_exp", None))
        if n is not None:
            module.expand_chs = n


def fix_headmajor_attention(module: nn.Module, name: str, edits) -> None:
    """(heads, keys, head_dim) projections, e.g. CPUBone's ``pwise``."""
    keys, heads, head_dim = (getattr(module, a, None) for a in ("num_keys", "num_heads", "head_dim"))
    if not all(isinstance(v, int) for v in (keys, heads, head_dim)):
        return
    keep = edits.get((f"{name}.pwise" if name else "pwise", "out"))
    if keep is None:
        return
    kept_heads = int((keep // (keys * head_dim)).unique().numel())
    if keep.numel() == kept_heads * keys * head_dim:
        module.num_heads = kept_heads
    else:
        module.head_dim = keep.numel() // (heads * keys)
    if isinstance(getattr(module, "o_proj_inpdim", None), int):
        module.o_proj_inpdim = module.num_heads * module.head_dim


def fix_bias_attention(module: nn.Module, name: str, edits) -> None:
    """LeViT / EfficientFormer-V2 style: heads follow ``attention_biases``; cached biases
    are stale after slicing; ``dh`` is the value projection's width."""
    if isinstance(getattr(module, "attention_bias_cache", None), dict):
        module.attention_bias_cache = {}
    biases = getattr(module, "attention_biases", None)
    if isinstance(biases, nn.Parameter) and isinstance(getattr(module, "num_heads", None), int) and biases.ndim == 2:
        module.num_heads = biases.shape[0]
    kd, vd, qkv = getattr(module, "key_dim", None), getattr(module, "val_dim", None), getattr(module, "qkv", None)
    heads = getattr(module, "num_heads", None)
    if isinstance(kd, int) and kd == vd and isinstance(qkv, nn.Linear) and isinstance(heads, int) and heads > 0:
        per = qkv.out_features // heads  # TinyViT: view(B, N, heads, -1).split([kd, kd, vd])
        if per != 2 * kd + vd and per % 3 == 0 and qkv.out_features % heads == 0:
            module.key_dim = module.val_dim = per // 3
        if isinstance(getattr(module, "out_dim", None), int):
            module.out_dim = module.val_dim * heads
    if isinstance(getattr(module, "dh", None), int):
        n = _out_channels(getattr(module, "v", None))
        if n is not None:
            module.dh = n


def fix_rel_pos(module: nn.Module, name: str, edits) -> None:
    """Relative position bias modules (``RelPosBias``, ``RelPosMlp``) view their table as
    ``bias_shape = (..., num_heads)``: follow the table's (or the MLP's) kept heads."""
    shape = getattr(module, "bias_shape", None)
    if not isinstance(shape, tuple) or not shape or not all(isinstance(v, int) for v in shape):
        return
    table = getattr(module, "relative_position_bias_table", None)
    fc2 = getattr(getattr(module, "mlp", None), "fc2", None)
    if isinstance(table, nn.Parameter) and table.ndim == 2:
        n = table.shape[-1]
    elif isinstance(fc2, nn.Linear):
        n = fc2.out_features
    else:
        return
    if shape[-1] == n:
        return
    heads = getattr(module, "num_heads", None)
    if isinstance(heads, int) and heads == shape[-1]:
        module.num_heads = n
    module.bias_shape = (*shape[:-1], n)


class StdConvPruner(ConvPruner):
    """Weight-standardised convolutions (timm ``StdConv2d``, ``ScaledStdConv2d``, NFNets,
    BiT): each filter is standardised over its fan-in, so removing input channels
    re-standardises the kept weights, like a LayerNorm over fewer channels: no slicing
    matches the original exactly. The input slice is marked ``normalizes`` (as LayerNorm
    and GroupNorm slices are: prunable, approximate, left out of the exact oracle;
    depthwise convolutions excepted, there a channel is a whole filter). Output channels
    shrink with the per-filter ``gain``."""

    name = "stdconv"

    def trace(self, module, call, ctx):
        super().trace(module, call, ctx)
        if not (module.groups > 1 and module.groups == module.in_channels):
            ctx.slices[(call.name, "in")].normalizes = True

    def prune(self, module, keep):
        super().prune(module, keep)
        gain = getattr(module, "gain", None)
        if "out" in keep and isinstance(gain, nn.Parameter) and gain.ndim >= 1:
            replace_param(module, "gain", 0, keep["out"])


def fix_multi_query_attention(module: nn.Module, name: str, edits) -> None:
    """MobileNetV4/V5 ``MultiQueryAttention2d``: one shared key/value head, queries
    reshaped with ``num_heads`` and ``key_dim``; widths follow the projections."""
    if not all(isinstance(getattr(module, a, None), int) for a in ("num_heads", "key_dim", "value_dim")):
        return
    q, k, v = (_out_channels(getattr(getattr(module, a, None), "proj", None)) for a in ("query", "key", "value"))
    if q is None or k is None or v is None or k == 0 or q % k:
        return
    module.key_dim, module.value_dim, module.num_heads = k, v, q // k


def fix_scale_shape(module: nn.Module, name: str, edits) -> None:
    """MetaFormer ``Scale``: ``x * self.scale.view(self.shape)`` with ``shape = (dim, 1, 1)``."""
    scale, shape = getattr(module, "scale", None), getattr(module, "shape", None)
    if isinstance(scale, nn.Parameter) and scale.ndim == 1 and isinstance(shape, tuple) and shape:
        if all(isinstance(v, int) for v in shape) and all(v == 1 for v in shape[1:]):
            module.shape = (scale.numel(), *shape[1:])


_GROUP_SIZE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # EvoNorm-S -> channels per group


def _scan_group_norms(model: nn.Module) -> None:
    for module in model.modules():
        groups, weight = getattr(module, "groups", None), getattr(module, "weight", None)
        if type(module).__name__.startswith("EvoNorm") and isinstance(groups, int) and groups > 0:
            if isinstance(weight, nn.Parameter) and weight.numel() % groups == 0:
                _GROUP_SIZE[module] = weight.numel() // groups


def fix_group_count(module: nn.Module, name: str, edits) -> None:
    """EvoNorm-S ``group_std(x, self.groups)``: whole groups removed -> fewer groups."""
    size = _GROUP_SIZE.get(module)
    keep = edits.get(("", f"{name}.weight" if name else "weight"))
    if size is None or keep is None:
        return
    kept = int((keep // size).unique().numel())
    if keep.numel() == kept * size:
        module.groups = kept


def fix_bottleneck_attention(module: nn.Module, name: str, edits) -> None:
    """BoTNet ``BottleneckAttn``: ``split(qkv(x), [dim_out_qk, dim_out_qk, dim_out_v])`` then
    per-head reshapes with ``dim_head_qk`` / ``dim_head_v``."""
    names = ("num_heads", "dim_head_qk", "dim_head_v", "dim_out_qk", "dim_out_v")
    if not all(isinstance(getattr(module, a, None), int) for a in names):
        return
    heads, dqk, dv, oqk, ov = (getattr(module, a) for a in names)
    keep = edits.get((f"{name}.qkv" if name else "qkv", "out"))
    if keep is None or oqk != ov or dqk != dv:
        return
    q_keep = keep[keep < oqk]
    kept = int((q_keep // dqk).unique().numel())
    if q_keep.numel() == kept * dqk:
        module.num_heads = kept
    else:
        module.dim_head_qk = module.dim_head_v = q_keep.numel() // heads
    module.dim_out_qk = module.dim_out_v = module.num_heads * module.dim_head_qk


_LAMBDA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # qkv conv -> (heads, dim_qk, dim_v)


def _scan_lambda_layers(model: nn.Module) -> None:
    for module in model.modules():
        heads, dqk, dv = (getattr(module, a, None) for a in ("num_heads", "dim_qk", "dim_v"))
        qkv = getattr(module, "qkv", None)
        if not all(isinstance(v, int) for v in (heads, dqk, dv)) or not isinstance(qkv, nn.Conv2d):
            continue
        if qkv.groups == 1 and qkv.out_channels == heads * dqk + dqk + dv and qkv.in_channels == heads * dv:
            _LAMBDA[qkv] = (heads, dqk, dv)


class LambdaQKVPruner(ConvPruner):
    """LambdaNetworks ``LambdaLayer``: ``split(qkv(x), [heads * dim_qk, dim_qk, dim_v])``, the
    output ``(B, heads, M, dim_v)`` reshaped to ``(B, C, H, W)`` with ``C`` the *input*
    width. Input channel ``h * dim_v + j`` is tied with value channel ``j``: removing a
    value channel removes one input channel per head, so ``C == heads * dim_v`` holds."""

    def trace(self, module, call, ctx):
        super().trace(module, call, ctx)
        heads, dqk, dv = _LAMBDA[module]
        out = ctx.slices[(call.name, "out")].atoms
        v = out[heads * dqk + dqk :]
        ctx.union(ctx.slices[(call.name, "in")].atoms, v.repeat(heads))


def fix_lambda_layer(module: nn.Module, name: str, edits) -> None:
    """``LambdaLayer`` widths follow its norms: ``norm_q`` (heads * dim_qk), ``norm_v`` (dim_v)."""
    qkv = getattr(module, "qkv", None)
    if qkv not in _LAMBDA:
        return
    nq, nv = getattr(module, "norm_q", None), getattr(module, "norm_v", None)
    if not isinstance(nq, nn.BatchNorm2d) or not isinstance(nv, nn.BatchNorm2d):
        return
    module.dim_v = nv.num_features
    module.dim_qk = qkv.out_channels - nq.num_features - module.dim_v
    if module.dim_qk > 0 and nq.num_features % module.dim_qk == 0:
        module.num_heads = nq.num_features // module.dim_qk


_PARALLEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # in_proj -> (mlp width, dim)


def _scan_parallel_blocks(model: nn.Module) -> None:
    """Parallel blocks (``ParallelScalingBlock``): ``split(in_proj(x), [hidden, dim, dim, dim])``
    into (mlp, q, k, v), the attention output reshaped to the input width ``C``."""
    for module in model.modules():
        split, proj = getattr(module, "in_split", None), getattr(module, "in_proj", None)
        if not isinstance(split, list) or len(split) != 4 or not isinstance(proj, nn.Linear):
            continue
        hidden, d = split[0], split[1]
        ints = all(isinstance(getattr(module, a, None), int) for a in ("num_heads", "head_dim"))
        if ints and split[1:] == [d] * 3 and proj.in_features == d and proj.out_features == hidden + 3 * d:
            _PARALLEL[proj] = (hidden, d)


class ParallelInProjPruner(LinearPruner):
    """The (q, k, v) parts of a parallel block's ``in_proj`` shrink with its input channels."""

    def trace(self, module, call, ctx):
        super().trace(module, call, ctx)
        hidden, d = _PARALLEL[module]
        out = ctx.slices[(call.name, "out")].atoms
        ctx.union(ctx.tie(out[hidden:], (3, d), 1), ctx.slices[(call.name, "in")].atoms)
        allow_unequal_split(ctx, call.outputs[0])  # fix_parallel_block rewrites ``in_split``


def fix_parallel_block(module: nn.Module, name: str, edits) -> None:
    proj = getattr(module, "in_proj", None)
    info = _PARALLEL.get(proj) if isinstance(proj, nn.Linear) else None
    if info is None:
        return
    hidden, d = info
    heads, head_dim = module.num_heads, module.head_dim
    keep = edits.get((f"{name}.in_proj" if name else "in_proj", "out"))
    n = proj.in_features
    module.in_split = [proj.out_features - 3 * n, n, n, n]
    if keep is None or heads * head_dim == 0 or d % (heads * head_dim):
        return
    block = head_dim * (d // (heads * head_dim))  # one head's q width (DiffAttention: two half heads)
    q_keep = keep[(keep >= hidden) & (keep < hidden + d)] - hidden
    kept = int((q_keep // block).unique().numel())
    if q_keep.numel() == kept * block:
        module.num_heads = kept
    else:
        module.head_dim = q_keep.numel() * head_dim // (heads * block)


_GATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # fc1 -> True


def _scan_gated_conv_blocks(model: nn.Module) -> None:
    """MambaOut ``GatedConvBlock``: ``g, i, c = split(fc1(x), split_indices)`` with
    ``split_indices = (hidden, hidden - conv, conv)``, then ``fc2(act(g) * cat(i, dwconv(c)))``.
    The product pairs gate ``j`` with channel ``j`` of ``cat(i, c)``; the depthwise conv
    keeps ``c``'s channels apart."""
    for module in model.modules():
        idx = getattr(module, "split_indices", None)
        fc1, conv, fc2 = (getattr(module, a, None) for a in ("fc1", "conv", "fc2"))
        if not isinstance(idx, tuple) or len(idx) != 3 or not all(isinstance(v, int) for v in idx):
            continue
        if not isinstance(fc1, nn.Linear) or not isinstance(conv, nn.Conv2d) or not isinstance(fc2, nn.Linear):
            continue
        hidden, _, n = idx
        depthwise = conv.groups == conv.in_channels == conv.out_channels == n
        if depthwise and idx[1] == hidden - n and fc1.out_features == 2 * hidden and fc2.in_features == hidden:
            _GATED[fc1] = True


class GatedFc1Pruner(LinearPruner):
    """A gated block's ``fc1``: its output may be split into unequal parts
    (``fix_gated_conv_block`` rewrites ``split_indices``)."""

    def trace(self, module, call, ctx):
        super().trace(module, call, ctx)
        allow_unequal_split(ctx, call.outputs[0])


def fix_gated_conv_block(module: nn.Module, name: str, edits) -> None:
    """``split_indices`` follow ``fc2``'s input (gate pairs) and the depthwise conv's width."""
    fc1, conv, fc2 = (getattr(module, a, None) for a in ("fc1", "conv", "fc2"))
    if fc1 not in _GATED or not isinstance(conv, nn.Conv2d) or not isinstance(fc2, nn.Linear):
        return
    hidden, n = fc2.in_features, conv.in_channels
    module.split_indices = (hidden, hidden - n, n)


_DUAL_PATH: weakref.WeakSet = weakref.WeakSet()


def _scan_dual_path_blocks(model: nn.Module) -> None:
    """DPN ``DualPathBlock``: ``x[:, : self.num_1x1_c]`` is the residual part of its input (or
    projection) and of ``c1x1_c``'s output, ``x[:, self.num_1x1_c :]`` the dense part."""
    for module in model.modules():
        bound, c = getattr(module, "num_1x1_c", None), getattr(module, "c1x1_c", None)
        if isinstance(bound, int) and isinstance(c, nn.Module):
            _DUAL_PATH.add(module)
            allow_channel_ranges(module)  # fix_dual_path_block rewrites ``num_1x1_c``


def fix_dual_path_block(module: nn.Module, name: str, edits) -> None:
    """The residual part keeps the channels below ``num_1x1_c`` that survived: ``c1x1_c1``'s
    width (DPN-b) or the kept outputs of ``c1x1_c`` below the bound (its residual part is
    tied with the input's by the addition)."""
    if module not in _DUAL_PATH:
        return
    c1 = getattr(module, "c1x1_c1", None)
    if isinstance(c1, nn.Module):
        n = _out_channels(c1)
    else:
        conv = f"{name}.c1x1_c" if name else "c1x1_c"
        if isinstance(getattr(module.c1x1_c, "conv", None), nn.Module):
            conv += ".conv"
        keep = edits.get((conv, "out"))
        n = None if keep is None else int((keep < module.num_1x1_c).sum())
    if n is not None:
        module.num_1x1_c = n


_CONV_REL_POS: weakref.WeakSet = weakref.WeakSet()


def _scan_conv_rel_pos(model: nn.Module) -> None:
    """CoaT ``ConvRelPosEnc``: ``split(v, self.channel_splits)``, one depthwise conv per part
    (heads grouped by window size)."""
    for module in model.modules():
        splits, convs = getattr(module, "channel_splits", None), getattr(module, "conv_list", None)
        if isinstance(splits, list) and isinstance(convs, nn.ModuleList) and len(splits) == len(convs):
            if all(isinstance(c, nn.Conv2d) and c.in_channels == n for c, n in zip(convs, splits, strict=True)):
                _CONV_REL_POS.add(module)
                allow_channel_ranges(module)  # fix_conv_rel_pos rewrites ``channel_splits``


def fix_conv_rel_pos(module: nn.Module, name: str, edits) -> None:
    """``channel_splits`` follow the convs' widths (``head_splits`` is not read by ``forward``)."""
    if module in _CONV_REL_POS:
        module.channel_splits = [c.in_channels for c in module.conv_list]


@hookimpl
def cleanai_leaf_modules(model):
    _scan_parallel_blocks(model)
    _scan_width_attention(model)
    _scan_lambda_layers(model)
    _scan_group_norms(model)
    _scan_gated_conv_blocks(model)
    _scan_dual_path_blocks(model)
    _scan_conv_rel_pos(model)
    return None


@hookimpl
def cleanai_layer_pruner(module, name):
    if isinstance(module, nn.modules.conv._ConvNd) and "StdConv" in type(module).__name__:
        return StdConvPruner()
    if module in _PARALLEL:
        return ParallelInProjPruner()
    if module in _LAMBDA:
        return LambdaQKVPruner()
    if module in _GATED:
        return GatedFc1Pruner()
    info = _TIED.get(module)
    if info is not None and isinstance(module, nn.Linear):
        return TiedLinearPruner(info[0])
    return None


#: attribute fix-ups run after slicing, in this order; each returns early when the module
#: does not have its pattern
FIXUPS = (
    fix_attention,
    fix_width_attention,
    fix_split_widths,
    fix_headmajor_attention,
    fix_bias_attention,
    fix_rel_pos,
    fix_multi_query_attention,
    fix_scale_shape,
    fix_group_count,
    fix_bottleneck_attention,
    fix_lambda_layer,
    fix_parallel_block,
    fix_gated_conv_block,
    fix_dual_path_block,
    fix_conv_rel_pos,
)


@hookimpl(trylast=True)
def cleanai_after_prune(module, name, edits):
    for fix in FIXUPS:
        fix(module, name, edits)


@hookimpl(trylast=True)
def cleanai_default_ignores(model):
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:
            return None
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return [head]
    return None
