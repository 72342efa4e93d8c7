"""Cross-covariance attention (XCA: EdgeNeXt, XCiT): its inner width freed from the stream's.

Glossary:

- *cross-covariance attention*: timm's ``CrossCovarianceAttn`` (EdgeNeXt) and ``XCA`` (XCiT):
  ``qkv(x).reshape(B, N, 3, heads, -1)``, an attention map between a head's *channels*
  (``q @ k^T`` contracts the tokens), softmax over the key channels, ``(attn @ v)``, then
  ``reshape(B, N, C)`` with ``C`` the width of the *input* and ``proj``.
- *width-bound*: that last reshape ties ``qkv``'s q, k and v widths to the input width, so
  each input channel was coupled with one channel of every part (``width_attention.py``).
  With whole heads (the softmax normalises over a head's key channels) the residual stream
  then pruned in head-sized blocks, and in EdgeNeXt, whose split-scale adds pair the
  stream's parts position by position, heads and parts merged into a few units: the stream
  barely pruned (edgenext_x_small kept 0.56 of its parameters at a ratio of 0.5).

The scan leaves these attentions out of the width-bound ones, so the graph prunes their heads
on their own (q, k, v, ``temperature`` and ``proj``'s input together) and the stream on its
own; the fix-up sets ``num_heads`` and swaps the class for a variant whose ``forward`` reads
the widths from ``qkv`` (``reshape(B, N, -1)``), the rest of ``forward`` as timm 1.0's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cleanai_plugins.zoo.timm.lookup import triggered_by
from cleanai_plugins.zoo.timm.pruned import pruned_variant, variant_lookup

if TYPE_CHECKING:
    from cleanai_plugins.zoo.timm.scan import TimmScan

__all__ = ["fix_cross_covariance", "pruned_cross_covariance_classes", "scan_cross_covariance"]


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's XCA ``forward`` with the widths read from ``qkv``'s output, not from ``x``."""
    B, N, _ = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 4, 1)
    q, k, v = qkv.unbind(0)
    if getattr(self, "fused_attn", False):  # XCiT
        q = F.normalize(q, dim=-1) * self.temperature
        k = F.normalize(k, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    else:
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
    x = x.permute(0, 3, 1, 2).reshape(B, N, -1)
    return self.proj_drop(self.proj(x))


#: timm's cross-covariance attentions: (module, class)
_BASES = (("timm.models.edgenext", "CrossCovarianceAttn"), ("timm.models.xcit", "XCA"))


_VARIANTS = [pruned_variant(module, name, _forward, __name__) for module, name in _BASES]
#: the pruned classes by name (a pickled model loads, also before timm is imported)
__getattr__ = variant_lookup(
    __name__, *((module, f"Pruned{name}", v) for (module, name), v in zip(_BASES, _VARIANTS, strict=True))
)


def pruned_cross_covariance_classes() -> dict[type, type] | None:
    """timm's XCA class -> its pruned variant (``Pruned<name>``), made once timm is
    imported (None before)."""
    made = dict(v() for v in _VARIANTS)
    made.pop(None, None)
    return made or None


def _pruned() -> dict[type, type]:
    return pruned_cross_covariance_classes() or {}


@triggered_by("temperature")
def scan_cross_covariance(modules: list[nn.Module]) -> dict[nn.Module, int]:
    """timm's XCA modules -> head size before pruning (``qkv``: 3 parts of ``heads`` heads)."""
    found = {}
    for m in modules:
        if type(m) not in _pruned():
            continue
        qkv, heads = getattr(m, "qkv", None), getattr(m, "num_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(heads, int) and heads > 0 and qkv.out_features % (3 * heads) == 0:
            found[m] = qkv.out_features // (3 * heads)
    return found


@triggered_by("temperature")
def fix_cross_covariance(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """``num_heads`` follows the kept heads of ``qkv``'s query part (a head's channels go
    together or not at all); the class becomes its pruned variant."""
    head_dim = scan.cross_covariance.get(module)
    if head_dim is None:
        return
    keep = edits.get((f"{name}.qkv" if name else "qkv", "out"))
    if keep is not None:
        width = module.num_heads * head_dim
        q_keep = keep[keep < width]
        kept_heads = int((q_keep // head_dim).unique().numel())
        if q_keep.numel() == kept_heads * head_dim:
            module.num_heads = kept_heads
    pruned = _pruned().get(type(module))
    if pruned is not None:
        module.__class__ = pruned
