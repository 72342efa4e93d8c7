"""InceptionNeXt's inception depthwise conv with unequal branches: widths read from its convs.

Glossary:

- *inception depthwise conv*: timm's ``InceptionDWConv2d``: ``split(x, split_indexes)`` into
  an identity part and three branches (a square, a wide and a tall depthwise conv), then
  ``cat`` back in the same order. ``split_indexes`` is ``(in - 3 * gc, gc, gc, gc)``.

Where the identity part is wider than the branches (inception_next_tiny/small/base: 0.125
of the channels a branch) the split has unequal parts and froze the whole stream (0.53 of
the parameters kept at a ratio of 0.5; equal parts, as in inception_next_atto, are tied
and pruned already, ``fix_split_widths``). The module now vouches for its split
(``allow_channel_ranges``): the identity part and every branch prune on their own, and the
class becomes one whose ``forward`` reads the branch widths from its convs and gives the
identity part the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from cleanai_plugins.zoo.timm.lookup import triggered_by
from cleanai_plugins.zoo.timm.pruned import pruned_variant, variant_lookup

if TYPE_CHECKING:
    from cleanai_plugins.zoo.timm.scan import TimmScan

__all__ = ["fix_inception_dw", "scan_inception_dw"]

_BRANCHES = ("dwconv_hw", "dwconv_w", "dwconv_h")


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's ``InceptionDWConv2d.forward`` with the split taken from the branch convs."""
    hw, w, h = (getattr(self, b).in_channels for b in _BRANCHES)
    x_id, x_hw, x_w, x_h = torch.split(x, (x.shape[1] - hw - w - h, hw, w, h), dim=1)
    return torch.cat((x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)), dim=1)


_variant = pruned_variant("timm.models.inception_next", "InceptionDWConv2d", _forward, __name__)
__getattr__ = variant_lookup(__name__, ("timm.models.inception_next", "PrunedInceptionDWConv2d", _variant))


@triggered_by("split_indexes")
def scan_inception_dw(modules: list[nn.Module]) -> set[nn.Module]:
    """timm's inception depthwise convs whose split has unequal parts."""
    _BASE, PrunedInceptionDWConv2d = _variant()
    found = set()
    for m in modules:
        idx = getattr(m, "split_indexes", None)
        if _BASE is None or type(m) not in (_BASE, PrunedInceptionDWConv2d):
            continue
        if isinstance(idx, (tuple, list)) and len(set(idx)) > 1:
            if all(isinstance(getattr(m, b, None), nn.Conv2d) for b in _BRANCHES):
                found.add(m)
    return found


@triggered_by("split_indexes")
def fix_inception_dw(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """The class becomes its pruned variant (``split_indexes`` keeps the trained sizes: the
    identity part's kept width is its input's, which the module does not hold)."""
    _BASE, PrunedInceptionDWConv2d = _variant()
    if module in scan.inception_dw and PrunedInceptionDWConv2d is not None:
        module.__class__ = PrunedInceptionDWConv2d
