"""Cascaded group attention (EfficientViT-M, timm ``efficientvit_msra``): widths per head.

Glossary:

- *cascaded group attention*: timm's ``CascadedGroupAttention``. The input's channels are
  chunked into one part per head; head *i* reads its chunk plus head *i - 1*'s output;
  its ``qkvs[i]`` (conv and BatchNorm) gives ``key_dim + key_dim + val_dim`` channels, split
  into q, k and v with the stored widths; ``dws[i]``, a depthwise conv, runs on q; the
  heads' outputs, viewed with the stored ``val_dim``, are concatenated into ``proj``.
- *stored widths*: ``key_dim`` and ``val_dim``, one pair for every head.

The split into unequal parts froze every head's q, k and v, and the add of head *i - 1*'s
values to chunk *i* froze the stream with them (every efficientvit_m* kept 0.53 of its
parameters at a ratio of 0.5). The attention now vouches for its split
(``allow_channel_ranges``): q and k (contracted together) and v prune on their own in
every head, and the fix-up swaps the class for one whose ``forward`` reads each head's key
width from its depthwise conv and its value width from the rest of ``qkvs[i]``'s output;
``scale`` stays the trained one (the masking oracle keeps it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from cleanai_plugins.zoo.timm.lookup import triggered_by
from cleanai_plugins.zoo.timm.pruned import pruned_variant, variant_lookup
from cleanai_plugins.zoo.timm.widths import out_channels

if TYPE_CHECKING:
    from cleanai_plugins.zoo.timm.scan import TimmScan

__all__ = ["fix_cascaded_attention", "scan_cascaded_attention"]


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's ``CascadedGroupAttention.forward`` with each head's widths read from its layers."""
    B, C, H, W = x.shape
    feats_in = x.chunk(len(self.qkvs), dim=1)
    feats_out = []
    feat = feats_in[0]
    attn_bias = self.get_attention_biases(x.device)
    for head_idx, (qkv, dws) in enumerate(zip(self.qkvs, self.dws, strict=True)):
        if head_idx > 0:
            feat = feat + feats_in[head_idx]
        feat = qkv(feat)
        key = getattr(dws, "conv", dws).in_channels  # ``fuse()`` makes the ConvNorm one conv
        q, k, v = feat.view(B, -1, H, W).split([key, key, feat.shape[1] - 2 * key], dim=1)
        q = dws(q)
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
        q = q * self.scale
        attn = q.transpose(-2, -1) @ k
        attn = attn + attn_bias[head_idx]
        attn = attn.softmax(dim=-1)
        feat = (v @ attn.transpose(-2, -1)).view(B, -1, H, W)
        feats_out.append(feat)
    return self.proj(torch.cat(feats_out, 1))


_variant = pruned_variant("timm.models.efficientvit_msra", "CascadedGroupAttention", _forward, __name__)
__getattr__ = variant_lookup(__name__, ("timm.models.efficientvit_msra", "PrunedCascadedGroupAttention", _variant))


@triggered_by("qkvs")
def scan_cascaded_attention(modules: list[nn.Module]) -> set[nn.Module]:
    """timm's cascaded group attentions whose heads each have a depthwise conv on q."""
    _BASE, PrunedCascadedGroupAttention = _variant()
    if _BASE is None:
        return set()
    found = set()
    for m in modules:
        if type(m) not in (_BASE, PrunedCascadedGroupAttention):  # pruned again: its heads' widths may differ
            continue
        dws = getattr(m, "dws", None)
        convs = [getattr(d, "conv", d) for d in dws] if isinstance(dws, nn.ModuleList) else []  # fused: a conv
        if convs and all(isinstance(c, nn.Conv2d) for c in convs):
            found.add(m)
    return found


@triggered_by("qkvs")
def fix_cascaded_attention(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """The class becomes its pruned variant; ``key_dim`` / ``val_dim`` say head 0's widths."""
    _BASE, PrunedCascadedGroupAttention = _variant()
    if module not in scan.cascaded_attention or PrunedCascadedGroupAttention is None:
        return
    module.__class__ = PrunedCascadedGroupAttention
    key = getattr(module.dws[0], "conv", module.dws[0]).in_channels
    module.key_dim, module.val_dim = key, out_channels(module.qkvs[0]) - 2 * key
