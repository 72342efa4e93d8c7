"""Attention blocks bound to their input width (CaiT, CoaT, ConViT, CrossViT, DaViT, NesT...).

Attention blocks that reshape their projections with ``C // self.num_heads``, ``C``
being the width of their *input* (CaiT, CoaT, ConViT, CrossViT, DaViT, NesT, Twins,
VOLO, XCiT, Swin-V2-CR...) or reshape their output to ``(B, N, C)`` (GCViT, timm's latent
attention pooling: ``(B, latent_len, C)``): the projection width must stay equal to the
input width, so each such projection's input channels are coupled with each (q, k, v)
part of its output channels. Recognised by an int ``num_heads`` and such a reshape in
``forward``: a projection only 3x its input width by chance (TinyViT's per-head
``qkv.view(B, N, heads, -1).split([key_dim, key_dim, val_dim])``) is not width-bound, and
tying it so made its whole residual stream one unit.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import TYPE_CHECKING

from torch import nn

from cleanai_plugins.layers.linear import LinearPruner
from cleanai_plugins.zoo.timm.lookup import triggered_by

if TYPE_CHECKING:
    from cleanai_plugins.zoo.timm.scan import TimmScan

__all__ = ["TiedLinearPruner", "fix_width_attention", "mixes_heads", "scan_width_attention"]

_PROJ_CHILDREN = ("qkv", "q", "k", "v", "qk", "kv", "wq", "wk", "wv", "q_proj", "k_proj", "v_proj")


class TiedLinearPruner(LinearPruner):
    """A projection whose every output part shrinks with its input channels."""

    def __init__(self, stacks: int) -> None:
        self.stacks = stacks

    def trace(self, module, call, ctx):
        super().trace(module, call, ctx)
        self._tie(module, call.name, ctx)

    def trace_param(self, module, name, param, ctx):
        lab = super().trace_param(module, name, param, ctx)  # EVA: F.linear(x, self.qkv.weight, qkv_bias)
        if lab is not None and param == "weight":
            self._tie(module, name, ctx)
        return lab

    def _tie(self, module, name, ctx):
        out = ctx.slices[(name, "out")].atoms
        parts = ctx.tie(out, (self.stacks, module.in_features), 1) if self.stacks > 1 else out
        ctx.union(parts, ctx.slices[(name, "in")].atoms)


_WIDTH_RE = re.compile(
    r"reshape\(\s*B_?,\s*(N|self\.latent_len),\s*C\s*\)|C // self\.(num_heads|groups)", re.IGNORECASE
)


@functools.cache
def _reshapes_to_input_width(cls: type) -> bool:
    """The class's ``forward`` reshapes its attention output to the input width ``C``
    (``.reshape(B, N, C)``), e.g. GCViT's window attention."""
    try:
        return bool(_WIDTH_RE.search(inspect.getsource(cls.forward)))
    except (OSError, TypeError):
        return False


@functools.cache
def _heads_named_groups(cls: type) -> bool:
    """DaViT ``ChannelAttentionV2``: heads kept in ``groups`` (``C // self.groups``)."""
    try:
        return "C // self.groups" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _heads_attr(module: nn.Module) -> str:
    if not isinstance(getattr(module, "num_heads", None), int) and isinstance(getattr(module, "groups", None), int):
        if isinstance(module, nn.Module) and _heads_named_groups(type(module)):
            return "groups"
    return "num_heads"


@triggered_by("num_heads")
def mixes_heads(module: nn.Module) -> bool:
    """A width-bound attention whose heads a linear layer mixes (CaiT's talking heads,
    ``proj_l`` and ``proj_w`` over the heads): its heads must stay whole. Otherwise its
    reshape keeps the head dimension (nothing asks for the heads), which, tied to the
    input width, unites channel ``j`` of every head, while the class-attention blocks after
    it keep whole heads: the two together made CaiT's whole stream one unit."""
    heads = getattr(module, "num_heads", None)
    if not isinstance(heads, int) or heads < 2 or not _reshapes_to_input_width(type(module)):
        return False
    return any(
        isinstance(child, nn.Linear) and child.in_features == child.out_features == heads for child in module.children()
    )


@triggered_by("num_heads", "groups")
def scan_width_attention(
    modules: list[nn.Module],
) -> tuple[dict[nn.Module, dict[str, tuple[int, int]]], dict[nn.Module, int], dict[nn.Module, tuple[int, int]]]:
    """Width-bound attentions: ``({attention: {child: (stacks, width)}}, {attention: heads},
    {projection: (stacks, width)})``."""
    width_attention, width_heads, tied = {}, {}, {}
    for module in modules:
        heads = getattr(module, _heads_attr(module), None)
        if not isinstance(heads, int) or heads < 1:
            continue
        if not _reshapes_to_input_width(type(module)):
            continue
        found = {}
        for child in _PROJ_CHILDREN:
            lin = getattr(module, child, None)
            if not isinstance(lin, nn.Linear) or lin.out_features % lin.in_features:
                continue
            stacks = lin.out_features // lin.in_features
            if stacks in (1, 2, 3) and lin.in_features % heads == 0:
                found[child] = (stacks, lin.in_features)
        if found:
            width_attention[module] = found
            width_heads[module] = heads
            for child, info in found.items():
                tied[getattr(module, child)] = info
    return width_attention, width_heads, tied


@triggered_by("num_heads", "groups")
def fix_width_attention(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    info = scan.width_attention.get(module)
    if not info:
        return
    heads_attr = _heads_attr(module)
    heads = scan.width_heads.get(module, getattr(module, heads_attr))  # fix_attention may have set it already
    for child, (_, width) in info.items():
        keep = edits.get((f"{name}.{child}" if name else child, "out"))
        if keep is None:
            continue
        head_dim = width // heads
        q_keep = keep[keep < width]
        kept_heads = int((q_keep // head_dim).unique().numel())
        if q_keep.numel() == kept_heads * head_dim:
            setattr(module, heads_attr, kept_heads)
        if getattr(module, "head_dim", None) == head_dim:  # e.g. DaViT's scale without dynamic_scale
            module.head_dim = q_keep.numel() // getattr(module, heads_attr)
        return
