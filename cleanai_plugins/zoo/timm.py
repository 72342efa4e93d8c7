"""timm (and timm-style) models: attention attributes, classifier heads.

Attention blocks keep their head count and head size in attributes (``num_heads``,
``head_dim``, ``attn_dim``) that their ``forward`` uses in reshapes. After slicing, the
kept output indices of the block's query projection tell what happened: whole heads
removed (``num_heads`` shrinks) or the same dims removed from every head
(``head_dim`` shrinks). The pruned model runs without the user patching anything.
"""

from __future__ import annotations

import weakref

from torch import nn

from cleanai_core import hookimpl
from cleanai_plugins.layers.linear import LinearPruner

# child projection -> how many stacked (q, k, v) copies its output holds
_QUERY_PROJECTIONS = (("qkv", 3), ("q", 1), ("q_proj", 1), ("query", 1), ("to_q", 1), ("qkv_proj", 3))


def fix_attention(module: nn.Module, name: str, edits) -> None:
    heads = getattr(module, "num_heads", None)
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return
    for child, _stacks in _QUERY_PROJECTIONS:
        keep = edits.get((f"{name}.{child}" if name else child, "out"))
        if keep is None:
            continue
        total = heads * head_dim
        q_keep = keep[keep < total]
        kept_heads = (q_keep // head_dim).unique().numel()
        if q_keep.numel() == kept_heads * head_dim:
            module.num_heads = kept_heads
        else:
            module.head_dim = q_keep.numel() // heads
        break
    else:
        return
    if isinstance(getattr(module, "attn_dim", None), int):
        module.attn_dim = module.num_heads * module.head_dim
    for attr in ("all_head_dim", "inner_dim", "attn_dim_total"):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, module.num_heads * module.head_dim)


# Attention blocks that reshape their projections with ``C // self.num_heads``, ``C``
# being the width of their *input* (CaiT, CoaT, ConViT, CrossViT, DaViT, NesT, Twins,
# VOLO, XCiT, Swin-V2-CR...): the projection width must stay equal to the input width,
# so each such projection's input channels are coupled with each (q, k, v) part of its
# output channels. Recognised by an int ``num_heads`` and no int ``head_dim``.
_PROJ_CHILDREN = ("qkv", "q", "k", "v", "qk", "kv", "wq", "wk", "wv")
_TIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # linear -> (stacks, width)
_WIDTH_ATTN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention -> {child: (stacks, width)}


class TiedLinearPruner(LinearPruner):
    """A projection whose every output part shrinks with its input channels."""

    def __init__(self, stacks: int) -> None:
        self.stacks = stacks

    def trace(self, module, call, ctx):
        super().trace(module, call, ctx)
        out = ctx.slices[(call.name, "out")].atoms
        parts = ctx.tie(out, (self.stacks, module.in_features), 1) if self.stacks > 1 else out
        ctx.union(parts, ctx.slices[(call.name, "in")].atoms)


def _scan_width_attention(model: nn.Module) -> None:
    for module in model.modules():
        heads = getattr(module, "num_heads", None)
        if not isinstance(heads, int) or heads < 1 or isinstance(getattr(module, "head_dim", None), int):
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
            for child, info in found.items():
                _TIED[getattr(module, child)] = info


def fix_width_attention(module: nn.Module, name: str, edits) -> None:
    info = _WIDTH_ATTN.get(module)
    if not info:
        return
    heads = module.num_heads
    for child, (_, width) in info.items():
        keep = edits.get((f"{name}.{child}" if name else child, "out"))
        if keep is None:
            continue
        head_dim = width // heads
        q_keep = keep[keep < width]
        kept_heads = int((q_keep // head_dim).unique().numel())
        if q_keep.numel() == kept_heads * head_dim:
            module.num_heads = kept_heads
        return


@hookimpl
def cleanai_leaf_modules(model):
    _scan_width_attention(model)
    return None


@hookimpl
def cleanai_layer_pruner(module, name):
    info = _TIED.get(module)
    if info is not None and isinstance(module, nn.Linear):
        return TiedLinearPruner(info[0])
    return None


@hookimpl(trylast=True)
def cleanai_after_prune(module, name, edits):
    fix_attention(module, name, edits)
    fix_width_attention(module, name, edits)


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
