"""Single-head attention over a part of the channels (SHViT's ``SHSA``): three stored widths.

Glossary:

- *partial attention*: timm's ``SHSA``: ``split(x, [pdim, dim - pdim])``; the first part is
  normed and fed to ``qkv``, whose output splits into ``[qk_dim, qk_dim, pdim]``; the values'
  attention output is reshaped to ``pdim`` channels and concatenated with the untouched
  second part into ``proj``.
- *stored widths*: ``pdim`` serves twice, as the width of the attended part of the input and
  as the width of the values, two channel sets that nothing else ties together.

Both splits have unequal parts, which froze the attended part, q, k and v (every shvit_s*
kept 0.53 of its parameters at a ratio of 0.5). The attention now vouches for its splits
(``allow_channel_ranges``): the input part, q and k (contracted together), v and the
untouched part prune on their own. The fix-up sets ``pdim`` (the input part), ``qk_dim``
and ``v_dim`` from the kept channels and swaps the class for one whose ``forward`` uses
``v_dim`` for the values; ``scale`` stays the trained one (the masking oracle keeps it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from cleanai_plugins.zoo.timm.lookup import triggered_by
from cleanai_plugins.zoo.timm.pruned import pruned_variant, variant_lookup

if TYPE_CHECKING:
    from cleanai_plugins.zoo.timm.scan import TimmScan

__all__ = ["fix_partial_attention", "scan_partial_attention"]


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's ``SHSA.forward`` with the values' width ``v_dim`` apart from the input part's."""
    B, _, H, W = x.shape
    x1, x2 = torch.split(x, [self.pdim, x.shape[1] - self.pdim], dim=1)
    qkv = self.qkv(self.pre_norm(x1))
    q, k, v = torch.split(qkv, [self.qk_dim, self.qk_dim, self.v_dim], dim=1)
    q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
    attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
    x1 = (v @ attn.transpose(-2, -1)).reshape(B, self.v_dim, H, W)
    return self.proj(torch.cat([x1, x2], dim=1))


_variant = pruned_variant("timm.models.shvit", "SHSA", _forward, __name__)
__getattr__ = variant_lookup(__name__, ("timm.models.shvit", "PrunedSHSA", _variant))


@triggered_by("pdim")
def scan_partial_attention(modules: list[nn.Module]) -> dict[nn.Module, tuple[int, int]]:
    """timm's ``SHSA`` modules (or their pruned variant) -> ``(qk_dim, v_dim)`` before pruning."""
    _BASE, PrunedSHSA = _variant()
    if _BASE is None:
        return {}
    found = {}
    for m in modules:
        if type(m) in (_BASE, PrunedSHSA) and isinstance(_qkv_conv(m), nn.Conv2d):
            found[m] = (m.qk_dim, getattr(m, "v_dim", m.pdim))
    return found


@triggered_by("pdim")
def fix_partial_attention(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """``pdim``, ``qk_dim`` and ``v_dim`` follow the kept channels; the class becomes its pruned variant."""
    _BASE, PrunedSHSA = _variant()
    widths = scan.partial_attention.get(module)
    if widths is None or PrunedSHSA is None:
        return
    qk, v = widths
    conv = _qkv_conv(module)
    qkv = "qkv.c" if conv is not module.qkv else "qkv"
    keep = edits.get((f"{name}.{qkv}" if name else qkv, "out"))
    if keep is not None:
        qk = int((keep < qk).sum())
        v = int((keep >= 2 * widths[0]).sum())
    module.__class__ = PrunedSHSA
    module.pdim, module.qk_dim, module.v_dim = conv.in_channels, qk, v


def _qkv_conv(module: nn.Module) -> nn.Module | None:
    """The conv of ``qkv``: a ``ConvNorm``'s ``c``, or ``qkv`` itself once ``fuse()`` made it one conv."""
    qkv = getattr(module, "qkv", None)
    return getattr(qkv, "c", qkv)
