"""Widths stored in plain attributes: split sizes, channel counts, view shapes.

Modules that split their channels by a stored width (``torch.split(x, self.width)``) or
view a parameter with a stored shape: after slicing, the stored numbers follow the
widths of the layers that produce those channels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from cleanai_plugins.zoo.timm.lookup import triggered_by

if TYPE_CHECKING:
    from cleanai_plugins.zoo.timm.scan import TimmScan

__all__ = ["fix_filter_channels", "fix_scale_shape", "fix_split_widths", "out_channels"]


def out_channels(module: nn.Module | None) -> int | None:
    """Output channels of a conv / linear, or of a conv-norm-act wrapper's conv."""
    if module is None:
        return None
    for m in (module, getattr(module, "conv", None)):
        n = getattr(m, "out_channels", None) or getattr(m, "out_features", None)
        if isinstance(n, int):
            return n
    return None


@triggered_by("width", "qkvs", "d_inner", "split_indexes", "split_input", "in_dim", "splits", "expand_chs")
def fix_split_widths(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """Modules that split their channels by a stored width (``torch.split(x, self.width)``)."""
    scale, width = getattr(module, "scale", None), getattr(module, "width", None)
    if isinstance(scale, int) and isinstance(width, int) and hasattr(module, "convs"):
        n = out_channels(getattr(module, "conv1", None))
        if n is not None and n % scale == 0:  # Res2Net / DLA Bottle2neck
            module.width = n // scale
    qkvs = getattr(module, "qkvs", None)
    kd, vd = getattr(module, "key_dim", None), getattr(module, "val_dim", None)
    if isinstance(qkvs, nn.ModuleList) and isinstance(kd, int) and kd == vd and len(qkvs):
        n = out_channels(qkvs[0])  # EfficientViT (MSRA): split([key_dim, key_dim, val_dim])
        if n is not None and n % 3 == 0:
            module.key_dim = module.val_dim = n // 3
    if isinstance(getattr(module, "d_inner", None), int) and isinstance(getattr(module, "state_dim", None), int):
        n = out_channels(getattr(module, "hz_proj", None))  # EfficientViM: split([d_inner] * 2)
        if n is not None and n % 2 == 0:
            module.d_inner = n // 2
        a = getattr(module, "A", None)
        if isinstance(a, nn.Parameter) and a.ndim == 1:  # split([state_dim] * 3)
            module.state_dim = a.shape[0]
    idx = getattr(module, "split_indexes", None)
    if isinstance(idx, (tuple, list)) and len(set(idx)) == 1:  # InceptionNeXt: equal parts were tied
        n = out_channels(getattr(module, "dwconv_hw", None))
        if n is not None:
            module.split_indexes = type(idx)([n] * len(idx))
    paths = getattr(module, "paths", None)
    if getattr(module, "split_input", False) is True and isinstance(paths, nn.ModuleList) and len(paths):
        conv = getattr(paths[0], "conv", paths[0])  # SelectiveKernel: split(x, in_channels // num_paths)
        if isinstance(getattr(conv, "in_channels", None), int) and isinstance(module.in_channels, int):
            module.in_channels = conv.in_channels * len(paths)
    if isinstance(getattr(module, "in_dim", None), int) and isinstance(getattr(module, "unfold", None), nn.Unfold):
        n = out_channels(getattr(module, "proj", None))  # TNT PixelEmbed: reshape(B * patches, in_dim, ...)
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
        n = out_channels(getattr(module, "conv_exp", None))
        if n is not None:
            module.expand_chs = n


@triggered_by("shape")
def fix_scale_shape(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """MetaFormer ``Scale``: ``x * self.scale.view(self.shape)`` with ``shape = (dim, 1, 1)``."""
    scale, shape = getattr(module, "scale", None), getattr(module, "shape", None)
    if isinstance(scale, nn.Parameter) and scale.ndim == 1 and isinstance(shape, tuple) and shape:
        if all(isinstance(v, int) for v in shape) and all(v == 1 for v in shape[1:]):
            module.shape = (scale.numel(), *shape[1:])


@triggered_by("filt_size")
def fix_filter_channels(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """timm's ``BlurPool2d`` convolves with ``groups=self.channels`` and one filter per channel
    in its ``filt`` buffer, which the slicing shrank with the channels: the count follows."""
    filt, channels = getattr(module, "filt", None), getattr(module, "channels", None)
    if isinstance(channels, int) and isinstance(filt, torch.Tensor) and filt.ndim == 4 and filt.shape[1] == 1:
        module.channels = filt.shape[0]
