"""timm (and timm-style) models: attention attributes, classifier heads.

Attention blocks keep their head count and head size in attributes (``num_heads``,
``head_dim``, ``attn_dim``) that their ``forward`` uses in reshapes. After slicing, the
kept output indices of the block's query projection tell what happened: whole heads
removed (``num_heads`` shrinks) or the same dims removed from every head
(``head_dim`` shrinks). The pruned model runs without the user patching anything.
"""

from __future__ import annotations

from torch import nn

from cleanai_core import hookimpl

# child projection -> how many stacked (q, k, v) copies its output holds
_QUERY_PROJECTIONS = (("qkv", 3), ("q", 1), ("q_proj", 1), ("query", 1), ("to_q", 1), ("qkv_proj", 3))


def fix_attention(module: nn.Module, name: str, edits) -> None:
    heads = getattr(module, "num_heads", None)
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return
    for child, stacks in _QUERY_PROJECTIONS:
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


@hookimpl(trylast=True)
def cleanai_after_prune(module, name, edits):
    fix_attention(module, name, edits)


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
