"""Normalisations inside timm layers: weight-standardised convolutions, EvoNorm-S groups."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from cleanai_core.interfaces import replace_param
from cleanai_plugins.layers.conv import ConvPruner
from cleanai_plugins.zoo.timm.lookup import triggered_by

if TYPE_CHECKING:
    from cleanai_plugins.zoo.timm.scan import TimmScan

__all__ = ["StdConvPruner", "fix_group_count", "is_std_conv", "scan_group_norms", "scan_whole_group_convs"]


def is_std_conv(module: nn.Module) -> bool:
    """timm ``StdConv2d``, ``ScaledStdConv2d`` and their kin."""
    return isinstance(module, nn.modules.conv._ConvNd) and "StdConv" in type(module).__name__


class StdConvPruner(ConvPruner):
    """Weight-standardised convolutions (timm ``StdConv2d``, ``ScaledStdConv2d``, NFNets,
    BiT): each filter is standardised over its fan-in, so removing input channels
    re-standardises the kept weights, like a LayerNorm over fewer channels: no slicing
    matches the original exactly. The input slice is marked ``normalizes`` (as LayerNorm
    and GroupNorm slices are: prunable, approximate, left out of the exact oracle;
    depthwise convolutions excepted, there a channel is a whole filter). Output channels
    shrink with the per-filter ``gain``."""

    name = "stdconv"

    def trace(self, module, call, ctx):
        super().trace(module, call, ctx)
        if not (module.groups > 1 and module.groups == module.in_channels):
            ctx.slices[(call.name, "in")].normalizes = True

    def prune(self, module, keep):
        super().prune(module, keep)
        gain = getattr(module, "gain", None)
        if "out" in keep and isinstance(gain, nn.Parameter) and gain.ndim >= 1:
            replace_param(module, "gain", 0, keep["out"])


@triggered_by("groups")
def scan_group_norms(modules: list[nn.Module]) -> dict[nn.Module, int]:
    """EvoNorm-S norms -> channels per group."""
    found = {}
    for module in modules:
        groups, weight = getattr(module, "groups", None), getattr(module, "weight", None)
        if type(module).__name__.startswith("EvoNorm") and isinstance(groups, int) and groups > 0:
            if isinstance(weight, nn.Parameter) and weight.numel() % groups == 0:
                found[module] = weight.numel() // groups
    return found


def _is_evonorm_s(module: nn.Module) -> bool:
    groups = getattr(module, "groups", None)
    return type(module).__name__.startswith("EvoNorm") and "S" in type(module).__name__ and isinstance(groups, int)


@triggered_by("bn")
def scan_whole_group_convs(modules: list[nn.Module]) -> set[nn.Module]:
    """Grouped (not depthwise) convs normed by an EvoNorm-S (timm ``ConvNormAct``, RegNetZ's
    3x3 convs with fixed group width): EvoNorm-S keeps whole norm groups, the conv channel
    ``j`` of every conv group, and the two together made the block's width one unit
    (regnetz_*_evos kept 0.53-0.58 of its parameters at 0.5). These convs prune by whole
    groups (``ConvPruner(whole_groups=True)``), which the norm groups line up with."""
    found = set()
    for m in modules:
        conv, norm = getattr(m, "conv", None), getattr(m, "bn", None)
        if not isinstance(conv, nn.modules.conv._ConvNd) or not isinstance(norm, nn.Module) or is_std_conv(conv):
            continue
        if 1 < conv.groups < conv.in_channels and _is_evonorm_s(norm):
            found.add(conv)
    return found


@triggered_by("groups")
def fix_group_count(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """EvoNorm-S ``group_std(x, self.groups)``: whole groups removed -> fewer groups."""
    size = scan.group_size.get(module)
    keep = edits.get(("", f"{name}.weight" if name else "weight"))
    if size is None or keep is None:
        return
    kept = int((keep // size).unique().numel())
    if keep.numel() == kept * size:
        module.groups = kept
