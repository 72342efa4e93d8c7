"""Attention blocks whose head count and head size live in attributes.

Attention blocks keep their head count and head size in attributes (``num_heads``,
``head_dim``, ``attn_dim``) that their ``forward`` uses in reshapes. After slicing, the
kept output indices of the block's query projection tell what happened: whole heads
removed (``num_heads`` shrinks) or the same dims removed from every head
(``head_dim`` shrinks). The pruned model runs without the user patching anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from cleanai_plugins.zoo import loaded
from cleanai_plugins.zoo.timm.lookup import triggered_by
from cleanai_plugins.zoo.timm.widths import out_channels

if TYPE_CHECKING:
    from cleanai_plugins.zoo.timm.scan import TimmScan

__all__ = [
    "fix_attention",
    "scan_head_sizes",
    "fix_bias_attention",
    "fix_bottleneck_attention",
    "fix_headmajor_attention",
    "fix_multi_query_attention",
    "fix_rel_pos",
    "rewrites_head_count",
    "shares_one_kv_head",
    "splits_qk_from_v",
    "splits_heads_unevenly",
]

# child projection -> how many stacked (q, k, v) copies its output holds
# (``kv`` last: a latent attention pool without ``q`` reads its query from the latent itself)
_QUERY_PROJECTIONS = (
    ("qkv", 3),
    ("q", 1),
    ("q_proj", 1),
    ("query", 1),
    ("to_q", 1),
    ("qkv_proj", 3),
    ("qk", 2),
    ("kv", 2),
)


def _linear(proj: object) -> nn.Linear | None:
    """A projection's linear layer: the projection, or the ``linear`` it wraps (Gemma-4's
    ``Gemma4ClippableLinear``, which clamps the linear's input and output)."""
    if isinstance(proj, nn.Linear):
        return proj
    inner = getattr(proj, "linear", None) if isinstance(proj, nn.Module) else None
    return inner if isinstance(inner, nn.Linear) else None


def _projection_keep(edits, name: str, child: str):
    """The kept output channels of the projection ``child`` of the module ``name`` (or of the linear it wraps)."""
    at = f"{name}.{child}" if name else child
    keep = edits.get((at, "out"))
    return keep if keep is not None else edits.get((f"{at}.linear", "out"))


@triggered_by("num_heads")
def scan_head_sizes(modules: list[nn.Module]) -> dict[nn.Module, int]:
    """Attentions that keep ``num_heads`` but no head size (timm's Hiera-Det / SAM2
    ``MultiScaleAttention``: ``qkv(x).reshape(B, N, 3, self.num_heads, -1)``) -> the head size
    before slicing, read from the query projection. Without it ``num_heads`` stayed after
    whole heads were pruned, and the reshape cut the kept heads into halves: the pruned model
    ran, 0.025 away from the masked one (sam2_hiera_tiny)."""
    found = {}
    for module in modules:
        heads = getattr(module, "num_heads", None)
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
            continue
        if any(isinstance(getattr(module, a, None), int) for a in ("head_dim", "dim_head", "key_dim", "val_dim")):
            continue  # a stored head size, or per-head parts of unequal sizes (LeViT, TinyViT, EfficientFormer)
        for child, stacks in _QUERY_PROJECTIONS:
            proj = _linear(getattr(module, child, None))
            width = getattr(proj, "out_features", None)
            if proj is not None and width % (stacks * heads) == 0:
                found[module] = width // (stacks * heads)
                break
    return found


def rewrites_head_count(module: nn.Module) -> bool:
    """Whether :func:`fix_attention` can rewrite ``module``'s head count after slicing: an
    int ``num_heads`` / ``heads`` beside a linear query projection it reads the kept heads
    from."""
    heads = getattr(module, "num_heads", getattr(module, "heads", None))
    if not isinstance(heads, int) or isinstance(heads, bool):
        return False
    return any(_linear(getattr(module, child, None)) is not None for child, _ in _QUERY_PROJECTIONS)


@triggered_by("num_heads", "heads")
def fix_attention(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    heads_attr = "num_heads" if isinstance(getattr(module, "num_heads", None), int) else "heads"
    heads = getattr(module, heads_attr, None)
    dim_attr = "dim_head" if isinstance(getattr(module, "dim_head", None), int) else "head_dim"  # MaxViT: dim_head
    head_dim = getattr(module, dim_attr, None)
    if head_dim is None and module in scan.head_sizes:  # reshaped with -1: only the head count is stored
        _fix_head_count(module, name, edits, heads, scan.head_sizes[module])
        return
    if not isinstance(heads, int) or isinstance(heads, bool) or not isinstance(head_dim, int):
        return
    for child, stacks in _QUERY_PROJECTIONS:
        keep = _projection_keep(edits, name, child)
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
        # differential attention: a head's queries are two sub-heads (``2 * heads`` of ``head_dim``)
        block = head_dim * (2 if isinstance(getattr(module, "lambda_init", None), float) else 1)
        q_keep = keep[keep < heads * block]
        kept_heads = (q_keep // block).unique().numel()
        if q_keep.numel() == kept_heads * block:
            setattr(module, heads_attr, kept_heads)
        else:
            setattr(module, dim_attr, q_keep.numel() * head_dim // (heads * block))
        break
    else:
        return
    _fix_kv_heads(module, name, edits, getattr(module, dim_attr))
    width = getattr(module, heads_attr) * getattr(module, dim_attr)
    # torchvision MViT's ``output_dim``: ``reshape(B, -1, self.output_dim)`` after the heads
    # (kept, every head-size group broke the pruned model and was skipped: mvit_v2_s kept 0.33)
    for attr in ("attn_dim", "all_head_dim", "inner_dim", "attn_dim_total", "dim_out", "output_dim", "attention_dim"):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, width)


def _fix_head_count(module: nn.Module, name: str, edits, heads: int, head_dim: int) -> None:
    """``num_heads`` follows the kept heads of the query projection (a head size changed
    alike in every head needs nothing: the reshape reads it with ``-1``)."""
    for child, _ in _QUERY_PROJECTIONS:
        keep = _projection_keep(edits, name, child)
        if keep is None:
            continue
        q_keep = keep[keep < heads * head_dim]
        kept_heads = int((q_keep // head_dim).unique().numel())
        if q_keep.numel() == kept_heads * head_dim:
            module.num_heads = kept_heads
        return


def _fix_kv_heads(module: nn.Module, name: str, edits, head_dim: int) -> None:
    """Grouped-query attention (``num_kv_heads``, ``num_kv_groups``, ``kv_dim``): the key
    heads follow the key projection's width."""
    kv_heads = getattr(module, "num_kv_heads", None)
    k = _linear(getattr(module, "k_proj", None))
    if not isinstance(kv_heads, int) or k is None or head_dim <= 0:
        return
    if k.out_features % head_dim:
        return
    module.num_kv_heads = k.out_features // head_dim
    if isinstance(getattr(module, "kv_dim", None), int):
        module.kv_dim = k.out_features
    heads = getattr(module, "num_heads", None)
    if isinstance(getattr(module, "num_kv_groups", None), int) and isinstance(heads, int) and module.num_kv_heads:
        module.num_kv_groups = heads // module.num_kv_heads


@triggered_by("num_keys")
def fix_headmajor_attention(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
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


@triggered_by("val_dim")
def splits_heads_unevenly(module: nn.Module) -> bool:
    """LeViT's attention (and its downsampling one): each head's part of ``qkv`` (``kv``) is
    split into unequal parts, ``view(B, N, heads, -1).split([key_dim, key_dim, val_dim])``.
    Channel ``j`` of every head could not shrink (the split is unequal: 0.35-0.37 of LeViT's
    parameters were kept at a ratio of 0.5), so its heads stay whole and go whole."""
    heads, kd, vd = (getattr(module, a, None) for a in ("num_heads", "key_dim", "val_dim"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (heads, kd, vd)):
        return False
    return kd != vd and heads >= 1 and any(hasattr(module, p) for p in ("qkv", "kv"))


@triggered_by("num_kv_heads")
def shares_one_kv_head(module: nn.Module) -> bool:
    """Multi-query attention (timm ``AttentionRope`` / ``Gemma4Attention`` with
    ``num_kv_heads=1``): the key and value are viewed ``(B, N, 1, head_dim)`` and
    ``repeat_interleave``-d to every query head. A dimension of size 1 carried no channels, so
    they stayed on the head dimension and the query heads, meeting them there, stayed whole
    (0.354 kept at a ratio of 0.5). Its heads stay whole (the rotary embedding and SDPA's
    default scale hold the head size anyway): the one key / value head is a unit of its own
    and the query heads prune one by one, as transformers' multi-query attention does."""
    kv, heads = getattr(module, "num_kv_heads", None), getattr(module, "num_heads", None)
    return type(kv) is int and type(heads) is int and kv == 1 < heads


@triggered_by("lambda_init")
def pairs_sub_heads(module: nn.Module) -> bool:
    """Differential attention (timm ``DiffAttention``): q and k are reshaped into ``2 * heads``
    sub-heads, v into ``heads`` heads of twice the size, and ``(heads, 2)`` is unbound into the
    two attention maps whose difference weighs v. Picking the cheapest tie kept the pair
    dimension, which the unbind froze with the whole stream (vit_dwee kept 0.65 at a ratio
    of 0.5), so its heads (two q / k sub-heads and one v head) stay whole and go whole. The same
    in timm's ``DiffParallelScalingBlock`` (vit_dpwee), whose ``in_proj`` also holds the MLP."""
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (heads, head_dim)):
        return False
    qkv = getattr(module, "qkv", None)
    if isinstance(qkv, nn.Linear):
        return qkv.out_features == 3 * 2 * heads * head_dim
    return isinstance(getattr(module, "in_proj", None), nn.Linear)  # a parallel block: MLP, q, k, v in one


@triggered_by("attention_bias_cache", "attention_biases", "key_dim", "dh")
def fix_bias_attention(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
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
    if isinstance(heads, int):  # LeViT: whole heads went (reshape(B, N, self.val_attn_dim))
        for total, per in (("key_attn_dim", "key_dim"), ("val_attn_dim", "val_dim")):
            if isinstance(getattr(module, total, None), int) and isinstance(getattr(module, per, None), int):
                setattr(module, total, heads * getattr(module, per))
    if isinstance(getattr(module, "dh", None), int):
        n = out_channels(getattr(module, "v", None))
        if n is not None:
            module.dh = n


@triggered_by("bias_shape", "height_rel")
def fix_rel_pos(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """Relative position bias modules (``RelPosBias``, ``RelPosMlp``) view their table as
    ``bias_shape = (..., num_heads)``: follow the table's (or the MLP's) kept heads.
    HaloNet's and BoTNet's ``PosEmbedRel`` view the queries with ``dim_head``: it follows
    the width of their ``height_rel`` table."""
    rel = getattr(module, "height_rel", None)
    if isinstance(getattr(module, "dim_head", None), int) and isinstance(rel, nn.Parameter) and rel.ndim == 2:
        module.dim_head = rel.shape[1]
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


@triggered_by("value_dim")
def fix_multi_query_attention(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """MobileNetV4/V5 ``MultiQueryAttention2d``: one shared key/value head, queries
    reshaped with ``num_heads`` and ``key_dim``; widths follow the projections."""
    if not all(isinstance(getattr(module, a, None), int) for a in ("num_heads", "key_dim", "value_dim")):
        return
    q, k, v = (out_channels(getattr(getattr(module, a, None), "proj", None)) for a in ("query", "key", "value"))
    if q is None or k is None or v is None or k == 0 or q % k:
        return
    module.key_dim, module.value_dim, module.num_heads = k, v, q // k


_BOTTLENECK_COUNTS = ("num_heads", "dim_head_qk", "dim_head_v", "dim_out_qk", "dim_out_v")


def rewrites_bottleneck_counts(module: nn.Module) -> bool:
    """Whether :func:`fix_bottleneck_attention` rewrites ``module``'s stored head count and
    widths after slicing (BoTNet, HaloNet): it holds them all as ints, with equal query and
    value widths (or unequal ones: :func:`splits_qk_from_v`), beside a ``qkv`` or a
    convolutional ``q`` projection."""
    if not all(isinstance(getattr(module, a, None), int) for a in _BOTTLENECK_COUNTS):
        return False
    return hasattr(module, "qkv") or isinstance(getattr(module, "q", None), nn.Conv2d)


def splits_qk_from_v(module: nn.Module) -> bool:
    """A BoTNet / HaloNet attention whose query and key width differs from the value width
    (``qk_ratio`` below 1: eca_botnext26ts, eca_halonext26ts): its ``split`` into
    ``[dim_out_qk, dim_out_qk, dim_out_v]`` (HaloNet: ``[dim_head_qk, dim_head_v]``) has
    unequal parts, which froze q, k, v and the layers around them (eca_botnext26ts_256 kept
    0.36 of its parameters at a ratio of 0.5); :func:`fix_bottleneck_attention` rewrites the
    widths, so the module may take channel ranges."""
    return rewrites_bottleneck_counts(module) and (
        module.dim_out_qk != module.dim_out_v or module.dim_head_qk != module.dim_head_v
    )


@triggered_by("dim_head_qk")
def fix_bottleneck_attention(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """BoTNet ``BottleneckAttn``: ``split(qkv(x), [dim_out_qk, dim_out_qk, dim_out_v])`` then
    per-head reshapes with ``dim_head_qk`` / ``dim_head_v``. HaloNet's ``HaloAttn`` the same,
    with q from ``q`` and k, v from ``kv``."""
    if not all(isinstance(getattr(module, a, None), int) for a in _BOTTLENECK_COUNTS):
        return
    heads, dqk, dv, oqk, ov = (getattr(module, a) for a in _BOTTLENECK_COUNTS)
    prefix = f"{name}." if name else ""
    keep = edits.get((f"{prefix}qkv", "out"))
    if keep is not None:  # BoTNet: [q, k, v] of dim_out_qk, dim_out_qk, dim_out_v
        q_keep, v_kept = keep[keep < oqk], int((keep >= 2 * oqk).sum())
    elif isinstance(getattr(module, "q", None), nn.Conv2d):  # HaloNet: q, and kv as (heads, [k, v])
        keep, kv = edits.get((f"{prefix}q", "out")), edits.get((f"{prefix}kv", "out"))
        if keep is None and kv is None:
            return
        q_keep = torch.arange(oqk) if keep is None else keep
        v_kept = ov if kv is None else int((kv % (dqk + dv) >= dqk).sum())
    else:
        return
    kept = int((q_keep // dqk).unique().numel())
    if q_keep.numel() == kept * dqk:
        module.num_heads = kept
    else:
        module.dim_head_qk = q_keep.numel() // heads
    module.dim_head_v = v_kept // module.num_heads
    module.dim_out_qk = module.num_heads * module.dim_head_qk
    module.dim_out_v = module.num_heads * module.dim_head_v


@triggered_by("fused_attn")
def scan_trained_scale(modules: list[nn.Module]) -> set[nn.Module]:
    """iFormer's single-head attention (timm ``SHMA``): its fused path calls
    ``F.scaled_dot_product_attention`` with the default scale, ``1 / sqrt(E)`` of the q / k
    width read at run time, so the q / k width froze (iformer_t kept 0.40 at a ratio of 0.5);
    its other path multiplies by the stored ``scale``. These may shrink q and k, and the
    fix-up (:func:`fix_trained_scale`) switches the pruned module to the stored scale."""
    shma = getattr(loaded("timm.models.iformer"), "SHMA", None)  # None before timm is imported, or in an older timm
    if shma is None:
        return set()
    return {m for m in modules if type(m) is shma and isinstance(getattr(m, "scale", None), float)}


@triggered_by("fused_attn")
def fix_trained_scale(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """The trained scale after pruning: the path that multiplies by ``scale`` (the same result)."""
    if module in scan.trained_scale:
        module.fused_attn = False
