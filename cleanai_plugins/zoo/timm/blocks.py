"""timm blocks whose ``forward`` splits channels by stored sizes: parallel
blocks, MambaOut, DPN, CoaT, FasterNet, ReXNet, FocalNet.

Each pattern has a scan (``scan_*``, run once per model by ``scan.scan_model``), possibly
a layer pruner for the projection that feeds the split (claimed through the scan), and a
fix-up that rewrites the stored sizes after slicing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from cleanai_plugins.layers.linear import LinearPruner
from cleanai_plugins.mappers.shape import allow_unequal_split
from cleanai_plugins.zoo.timm.lookup import triggered_by
from cleanai_plugins.zoo.timm.pruned import pruned_variant, variant_lookup
from cleanai_plugins.zoo.timm.widths import out_channels

if TYPE_CHECKING:
    from cleanai_plugins.zoo.timm.scan import TimmScan

__all__ = [
    "GatedFc1Pruner",
    "ParallelInProjPruner",
    "fix_conv_rel_pos",
    "fix_dual_path_block",
    "fix_gated_conv_block",
    "fix_parallel_block",
    "fix_focal_modulation",
    "fix_partial_conv",
    "fix_range_shortcut",
    "scan_conv_rel_pos",
    "scan_dual_path_blocks",
    "scan_gated_conv_blocks",
    "scan_focal_modulations",
    "scan_parallel_blocks",
    "scan_range_shortcuts",
    "scan_partial_convs",
]


@triggered_by("in_split")
def scan_parallel_blocks(modules: list[nn.Module]) -> dict[nn.Module, tuple[int, int]]:
    """Parallel blocks (``ParallelScalingBlock``): ``split(in_proj(x), [hidden, dim, dim, dim])``
    into (mlp, q, k, v), the attention output reshaped to the input width ``C``: their
    ``in_proj`` -> (mlp width, dim)."""
    found = {}
    for module in modules:
        split, proj = getattr(module, "in_split", None), getattr(module, "in_proj", None)
        if not isinstance(split, list) or len(split) != 4 or not isinstance(proj, nn.Linear):
            continue
        hidden, d = split[0], split[1]
        ints = all(isinstance(getattr(module, a, None), int) for a in ("num_heads", "head_dim"))
        if ints and split[1:] == [d] * 3 and proj.in_features == d and proj.out_features == hidden + 3 * d:
            found[proj] = (hidden, d)
    return found


class ParallelInProjPruner(LinearPruner):
    """The (q, k, v) parts of a parallel block's ``in_proj`` shrink with its input channels."""

    def __init__(self, hidden: int, dim: int) -> None:
        self.hidden, self.dim = hidden, dim

    def trace(self, module, call, ctx):
        super().trace(module, call, ctx)
        hidden, d = self.hidden, self.dim
        out = ctx.slices[(call.name, "out")].atoms
        ctx.union(ctx.tie(out[hidden:], (3, d), 1), ctx.slices[(call.name, "in")].atoms)
        allow_unequal_split(ctx, call.outputs[0])  # fix_parallel_block rewrites ``in_split``


@triggered_by("in_proj")
def fix_parallel_block(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    proj = getattr(module, "in_proj", None)
    info = scan.parallel.get(proj) if isinstance(proj, nn.Linear) else None
    if info is None:
        return
    hidden, d = info
    heads, head_dim = module.num_heads, module.head_dim
    keep = edits.get((f"{name}.in_proj" if name else "in_proj", "out"))
    n = proj.in_features
    module.in_split = [proj.out_features - 3 * n, n, n, n]
    if keep is None or heads * head_dim == 0 or d % (heads * head_dim):
        return
    block = head_dim * (d // (heads * head_dim))  # one head's q width (DiffAttention: two half heads)
    q_keep = keep[(keep >= hidden) & (keep < hidden + d)] - hidden
    kept = int((q_keep // block).unique().numel())
    if q_keep.numel() == kept * block:
        module.num_heads = kept
    else:
        module.head_dim = q_keep.numel() * head_dim // (heads * block)


@triggered_by("split_indices")
def scan_gated_conv_blocks(modules: list[nn.Module]) -> set[nn.Module]:
    """MambaOut ``GatedConvBlock``: ``g, i, c = split(fc1(x), split_indices)`` with
    ``split_indices = (hidden, hidden - conv, conv)``, then ``fc2(act(g) * cat(i, dwconv(c)))``.
    The product pairs gate ``j`` with channel ``j`` of ``cat(i, c)``; the depthwise conv
    keeps ``c``'s channels apart. Returns the blocks' ``fc1``."""
    found = set()
    for module in modules:
        idx = getattr(module, "split_indices", None)
        fc1, conv, fc2 = (getattr(module, a, None) for a in ("fc1", "conv", "fc2"))
        if not isinstance(idx, tuple) or len(idx) != 3 or not all(isinstance(v, int) for v in idx):
            continue
        if not isinstance(fc1, nn.Linear) or not isinstance(conv, nn.Conv2d) or not isinstance(fc2, nn.Linear):
            continue
        hidden, _, n = idx
        depthwise = conv.groups == conv.in_channels == conv.out_channels == n
        if depthwise and idx[1] == hidden - n and fc1.out_features == 2 * hidden and fc2.in_features == hidden:
            found.add(fc1)
    return found


class GatedFc1Pruner(LinearPruner):
    """A gated block's ``fc1``: its output may be split into unequal parts
    (``fix_gated_conv_block`` rewrites ``split_indices``)."""

    def trace(self, module, call, ctx):
        super().trace(module, call, ctx)
        allow_unequal_split(ctx, call.outputs[0])


@triggered_by("fc1")
def fix_gated_conv_block(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """``split_indices`` follow ``fc2``'s input (gate pairs) and the depthwise conv's width."""
    fc1, conv, fc2 = (getattr(module, a, None) for a in ("fc1", "conv", "fc2"))
    if fc1 not in scan.gated_fc1 or not isinstance(conv, nn.Conv2d) or not isinstance(fc2, nn.Linear):
        return
    hidden, n = fc2.in_features, conv.in_channels
    module.split_indices = (hidden, hidden - n, n)


@triggered_by("num_1x1_c")
def scan_dual_path_blocks(modules: list[nn.Module]) -> set[nn.Module]:
    """DPN ``DualPathBlock``: ``x[:, : self.num_1x1_c]`` is the residual part of its input (or
    projection) and of ``c1x1_c``'s output, ``x[:, self.num_1x1_c :]`` the dense part. The
    blocks take channel ranges: ``fix_dual_path_block`` rewrites ``num_1x1_c``."""
    found = set()
    for module in modules:
        bound, c = getattr(module, "num_1x1_c", None), getattr(module, "c1x1_c", None)
        if isinstance(bound, int) and isinstance(c, nn.Module):
            found.add(module)
    return found


@triggered_by("num_1x1_c")
def fix_dual_path_block(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """The residual part keeps the channels below ``num_1x1_c`` that survived: ``c1x1_c1``'s
    width (DPN-b) or the kept outputs of ``c1x1_c`` below the bound (its residual part is
    tied with the input's by the addition)."""
    if module not in scan.dual_path:
        return
    c1 = getattr(module, "c1x1_c1", None)
    n = out_channels(c1) if isinstance(c1, nn.Module) else _kept_below(module, name, "c1x1_c", "num_1x1_c", edits)
    if n is not None:
        module.num_1x1_c = n


def _kept_below(module: nn.Module, name: str, child: str, bound: str, edits) -> int | None:
    """How many of ``child``'s output channels below ``module.<bound>`` survived (``child``
    a conv or a conv-norm-act wrapper): a kept range keeps its channels in order."""
    conv = f"{name}.{child}" if name else child
    if isinstance(getattr(getattr(module, child), "conv", None), nn.Module):
        conv += ".conv"
    keep = edits.get((conv, "out"))
    return None if keep is None else int((keep < getattr(module, bound)).sum())


@triggered_by("input_split")
def scan_focal_modulations(modules: list[nn.Module]) -> set[nn.Module]:
    """FocalNet ``FocalModulation``: ``split(f(x), self.input_split)`` with ``input_split =
    [dim, dim, focal_level + 1]`` (queries, context, gates): the unequal parts froze the
    whole modulation and the stream around it (focalnet_tiny_lrf kept 0.38 of its parameters
    at a ratio of 0.5). Queries (tied to ``h``'s output by their product) and context (through
    the depthwise focal layers into ``h``) prune apart; every gate is read alone
    (``gates[:, l:l + 1]``, broadcast over the context) and stays. ``fix_focal_modulation``
    rewrites the split."""
    found = set()
    for module in modules:
        split, f, h = (getattr(module, a, None) for a in ("input_split", "f", "h"))
        if isinstance(split, list) and len(split) == 3 and isinstance(f, nn.Conv2d) and isinstance(h, nn.Conv2d):
            if f.out_channels == sum(split) and (h.out_channels, h.in_channels) == tuple(split[:2]):
                found.add(module)
    return found


@triggered_by("input_split")
def fix_focal_modulation(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """The split follows ``h``: its outputs are the queries' width, its inputs the context's."""
    if module in scan.focal_modulation:
        module.input_split = [module.h.out_channels, module.h.in_channels, module.input_split[2]]
        module.dim = module.h.out_channels


@triggered_by("use_shortcut")
def scan_range_shortcuts(modules: list[nn.Module]) -> set[nn.Module]:
    """ReXNet ``LinearBottleneck``: its shortcut is added to the first ``in_channels`` of
    ``conv_pwl``'s wider output, ``cat([x[:, 0:self.in_channels] + shortcut,
    x[:, self.in_channels:]])``. The fixed range froze the whole stream (rexnet kept 0.43
    at a ratio of 0.5); the blocks take channel ranges and ``fix_range_shortcut`` rewrites
    ``in_channels``."""
    found = set()
    for module in modules:
        bound, conv = getattr(module, "in_channels", None), getattr(module, "conv_pwl", None)
        if getattr(module, "use_shortcut", False) is True and isinstance(bound, int) and isinstance(conv, nn.Module):
            found.add(module)
    return found


@triggered_by("use_shortcut")
def fix_range_shortcut(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """The shortcut's range keeps the outputs of ``conv_pwl`` below ``in_channels`` that survived."""
    if module in scan.range_shortcut:
        n = _kept_below(module, name, "conv_pwl", "in_channels", edits)
        if n is not None:
            module.in_channels = n


@triggered_by("channel_splits")
def scan_conv_rel_pos(modules: list[nn.Module]) -> set[nn.Module]:
    """CoaT ``ConvRelPosEnc``: ``split(v, self.channel_splits)``, one depthwise conv per part
    (heads grouped by window size). They split into unequal parts: ``fix_conv_rel_pos``
    rewrites ``channel_splits``."""
    found = set()
    for module in modules:
        splits, convs = getattr(module, "channel_splits", None), getattr(module, "conv_list", None)
        if isinstance(splits, list) and isinstance(convs, nn.ModuleList) and len(splits) == len(convs):
            if all(isinstance(c, nn.Conv2d) and c.in_channels == n for c, n in zip(convs, splits, strict=True)):
                found.add(module)
    return found


@triggered_by("channel_splits")
def fix_conv_rel_pos(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """``channel_splits`` follow the convs' widths (``head_splits`` is not read by ``forward``)."""
    if module in scan.conv_rel_pos:
        module.channel_splits = [c.in_channels for c in module.conv_list]


def _split_cat(module: nn.Module) -> bool:
    """Whether ``module.forward`` is bound to a method named ``forward_split_cat``."""
    return getattr(module.__dict__.get("forward"), "__name__", "") == "forward_split_cat"


@triggered_by("partial_conv3")
def scan_partial_convs(modules: list[nn.Module]) -> set[nn.Module]:
    """FasterNet ``Partial_conv3`` run as ``forward_split_cat``: ``split(x, [dim_conv3,
    dim_untouched])``, a 3x3 conv on the first part, ``cat`` with the second. Both parts
    shrink on their own (unequal parts): ``fix_partial_conv`` swaps the class for
    :class:`PrunedPartialConv`. Its ``forward_slicing`` (an in-place write of the first
    part) is left out: it keeps its channels."""
    found = set()
    for module in modules:
        conv, a, b = (getattr(module, k, None) for k in ("partial_conv3", "dim_conv3", "dim_untouched"))
        if isinstance(conv, nn.Conv2d) and isinstance(a, int) and isinstance(b, int) and _split_cat(module):
            if conv.groups == 1 and conv.in_channels == a:
                found.add(module)
    return found


def _partial_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A pruned ``Partial_conv3``: the first part is as wide as its conv's kept inputs, the
    untouched part is the rest of the input (its width is read at run time, so the stale
    ``dim_untouched`` is dropped)."""
    x1, x2 = torch.split(x, [self.dim_conv3, x.shape[1] - self.dim_conv3], dim=1)
    return torch.cat((self.partial_conv3(x1), x2), 1)


_PARTIAL = ("timm.models.fasternet", "Partial_conv3")
_partial_conv = pruned_variant(*_PARTIAL, _partial_conv_forward, __name__, "PrunedPartialConv")
#: :class:`PrunedPartialConv` by name (a pickled model loads, also before timm is imported)
__getattr__ = variant_lookup(__name__, (_PARTIAL[0], "PrunedPartialConv", _partial_conv))


def pruned_partial_conv() -> type | None:
    """:class:`PrunedPartialConv`, made once timm is imported (None before, or where timm
    has no FasterNet)."""
    return _partial_conv()[1]


@triggered_by("partial_conv3")
def fix_partial_conv(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """``dim_conv3`` follows the conv's input width, and the block becomes a
    :class:`PrunedPartialConv` (its ``forward`` splits at that width)."""
    pruned = pruned_partial_conv()
    if module not in scan.partial_conv or pruned is None:
        return
    module.dim_conv3 = module.partial_conv3.in_channels
    if type(module) is pruned.__base__:
        module.__class__ = pruned
    module.__dict__.pop("forward", None)
    module.__dict__.pop("dim_untouched", None)
