"""MobileViT-V2's separable linear attention (timm ``LinearSelfAttention``): a stored width.

Glossary:

- *separable linear attention*: ``qkv_proj`` gives ``1 + 2 * embed_dim`` channels, split as
  ``[1, embed_dim, embed_dim]``: one context-score channel (a softmax over the tokens), the
  keys, weighed by it and summed over the tokens, and the values, multiplied channel by
  channel with the keys' context vector, into ``out_proj``.
- *stored width*: ``embed_dim``, the split's sizes; the input width is free.

The split has unequal parts, which froze the keys and values (mobilevitv2_050 kept 0.32 of
its parameters at a ratio of 0.5). The attention now vouches for its split
(``allow_channel_ranges``): keys and values prune together (their product pairs channel *i*
with channel *i*), the score channel is a group of one and stays. The fix-up sets
``embed_dim`` to the kept keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from cleanai_plugins.zoo import loaded
from cleanai_plugins.zoo.timm.lookup import triggered_by

if TYPE_CHECKING:
    from cleanai_plugins.zoo.timm.scan import TimmScan

__all__ = ["fix_linear_attention", "scan_linear_attention"]


@triggered_by("embed_dim")
def scan_linear_attention(modules: list[nn.Module]) -> set[nn.Module]:
    """timm's ``LinearSelfAttention`` modules whose ``qkv_proj`` holds ``1 + 2 * embed_dim`` channels."""
    base = getattr(loaded("timm.models.mobilevit"), "LinearSelfAttention", None)
    if base is None:
        return set()
    found = set()
    for m in modules:
        qkv, width = getattr(m, "qkv_proj", None), getattr(m, "embed_dim", None)
        if type(m) is base and isinstance(qkv, nn.Conv2d) and qkv.out_channels == 1 + 2 * width:
            found.add(m)
    return found


@triggered_by("embed_dim")
def fix_linear_attention(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """``embed_dim`` follows the kept keys (the values are kept alike)."""
    if module in scan.linear_attention:
        module.embed_dim = (module.qkv_proj.out_channels - 1) // 2
