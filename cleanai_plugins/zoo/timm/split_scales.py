"""EdgeNeXt's split-scale block: ``x.chunk(n, dim=1)`` of a width ``n`` does not divide.

Glossary:

- *split-scale block*: timm's ``SplitTransposeBlock``: the input's channels are chunked into
  ``n = len(convs) + 1`` parts; a depthwise conv runs on the first, each later part is added
  to the previous conv's output before its own conv (so parts ``0 .. n-2`` meet channel by
  channel), and the last part passes through to the ``cat``.
- *chunk arithmetic*: ``chunk(n)`` of ``C`` channels gives parts of ``ceil(C / n)`` and a
  smaller last part where ``n`` does not divide ``C`` (EdgeNeXt-XX-Small: 88 -> 30, 30, 28).

An unequal chunk froze every channel of the residual stream ("splits channels into unequal
parts"): after pruning, ``chunk`` would split at other positions. The scan lets the parts
shrink on their own (the adds keep parts ``0 .. n-2`` equal), and the fix-up swaps the block
for :class:`PrunedSplitTransposeBlock`, which splits at its convs' kept width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from cleanai_plugins.zoo.timm.lookup import triggered_by
from cleanai_plugins.zoo.timm.pruned import pruned_variant, variant_lookup

if TYPE_CHECKING:
    from cleanai_plugins.zoo.timm.scan import TimmScan

__all__ = ["fix_split_scales", "pruned_split_transpose", "scan_split_scales"]


def _split_transpose_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A pruned ``SplitTransposeBlock``: ``split`` at the convs' width (``self.width``), the
    last part the rest, where ``chunk`` would split at ``ceil(C / n)``. The rest of
    ``forward`` is timm 1.0's."""
    shortcut = x
    n = len(self.convs)
    spx = torch.split(x, [self.width] * n + [x.shape[1] - self.width * n], dim=1)
    spo = []
    sp = spx[0]
    for i, conv in enumerate(self.convs):
        if i > 0:
            sp = sp + spx[i]
        sp = conv(sp)
        spo.append(sp)
    spo.append(spx[-1])
    x = torch.cat(spo, 1)
    B, C, H, W = x.shape
    x = x.reshape(B, C, H * W).permute(0, 2, 1)
    if self.pos_embd is not None:
        pos_encoding = self.pos_embd((B, H, W)).reshape(B, -1, x.shape[1]).permute(0, 2, 1)
        x = x + pos_encoding
    x = x + self.drop_path(self.gamma_xca * self.xca(self.norm_xca(x)))
    x = x.reshape(B, H, W, C)
    x = self.mlp(self.norm(x))
    if self.gamma is not None:
        x = self.gamma * x
    return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


_SPLIT = ("timm.models.edgenext", "SplitTransposeBlock")
_split_transpose = pruned_variant(*_SPLIT, _split_transpose_forward, __name__)
#: :class:`PrunedSplitTransposeBlock` by name (a pickled model loads, also before timm is imported)
__getattr__ = variant_lookup(__name__, (_SPLIT[0], "PrunedSplitTransposeBlock", _split_transpose))


def pruned_split_transpose() -> type | None:
    """:class:`PrunedSplitTransposeBlock`, made once timm is imported (None before)."""
    return _split_transpose()[1]


@triggered_by("convs")
def scan_split_scales(modules: list[nn.Module]) -> set[nn.Module]:
    """The split-scale blocks whose ``chunk`` leaves a smaller last part (an even chunk
    prunes as it is: its parts are tied channel by channel), with one depthwise conv of
    ``width`` channels per part but the last."""
    pruned = pruned_split_transpose()
    if pruned is None:
        return set()
    found = set()
    for m in modules:
        if type(m) is not pruned.__base__ or not isinstance(m.width, int):
            continue
        convs, width, dim = list(m.convs), m.width, m.norm_xca.normalized_shape[0]
        n = len(convs) + 1
        depthwise = all(
            isinstance(c, nn.Conv2d) and c.in_channels == c.out_channels == c.groups == width for c in convs
        )
        if convs and depthwise and dim % n and width == -(-dim // n) and 0 < dim - width * len(convs) < width:
            found.add(m)
    return found


@triggered_by("convs")
def fix_split_scales(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """``width`` follows the convs' kept channels, and the block becomes a
    :class:`PrunedSplitTransposeBlock` (its ``forward`` splits at that width)."""
    pruned = pruned_split_transpose()
    if module not in scan.split_scales or pruned is None:
        return
    module.width = module.convs[0].in_channels
    if type(module) is pruned.__base__:
        module.__class__ = pruned
