"""The timm model scan: every pattern the claims and fix-ups need, found once per model.

:func:`scan_model` runs in ``cleanai_prepare_model``; its :class:`TimmScan` travels in the
model's findings under :data:`KEY` to the claim hook (which modules get a special pruner)
and to the after-prune fix-ups (the widths and head counts as they were before slicing).
Nothing is kept between models.
"""

from __future__ import annotations

from typing import Any

import attrs
from torch import nn

from cleanai_plugins.zoo.timm.blocks import (
    scan_conv_rel_pos,
    scan_dual_path_blocks,
    scan_gated_conv_blocks,
    scan_lambda_layers,
    scan_parallel_blocks,
    scan_partial_convs,
)
from cleanai_plugins.zoo.timm.norms import scan_group_norms
from cleanai_plugins.zoo.timm.width_attention import scan_width_attention

__all__ = ["KEY", "TimmScan", "scan_model", "scan_of"]

#: where the scan is filed in the model's findings
KEY = "timm"


@attrs.frozen
class TimmScan:
    """What :func:`scan_model` found, keyed by the module instances of the scanned model."""

    #: a projection of a width-bound attention -> (stacks of (q, k, v), input width)
    tied: dict[nn.Module, tuple[int, int]] = attrs.field(factory=dict)
    #: a width-bound attention -> {projection child: (stacks, width)}
    width_attention: dict[nn.Module, dict[str, tuple[int, int]]] = attrs.field(factory=dict)
    #: a width-bound attention -> its head count before pruning
    width_heads: dict[nn.Module, int] = attrs.field(factory=dict)
    #: an EvoNorm-S norm -> channels per group
    group_size: dict[nn.Module, int] = attrs.field(factory=dict)
    #: a LambdaLayer's ``qkv`` conv -> (heads, dim_qk, dim_v)
    lambda_qkv: dict[nn.Module, tuple[int, int, int]] = attrs.field(factory=dict)
    #: a parallel block's ``in_proj`` -> (mlp width, dim)
    parallel: dict[nn.Module, tuple[int, int]] = attrs.field(factory=dict)
    #: MambaOut gated blocks' ``fc1``
    gated_fc1: set[nn.Module] = attrs.field(factory=set)
    #: DPN dual path blocks
    dual_path: set[nn.Module] = attrs.field(factory=set)
    #: CoaT conv relative position encodings
    conv_rel_pos: set[nn.Module] = attrs.field(factory=set)
    #: FasterNet partial convolutions (split and cat)
    partial_conv: set[nn.Module] = attrs.field(factory=set)


def scan_model(model: nn.Module) -> TimmScan:
    """Scan every module of ``model`` for the patterns of :class:`TimmScan`."""
    modules = list(model.modules())
    width_attention, width_heads, tied = scan_width_attention(modules)
    return TimmScan(
        tied=tied,
        width_attention=width_attention,
        width_heads=width_heads,
        group_size=scan_group_norms(modules),
        lambda_qkv=scan_lambda_layers(modules),
        parallel=scan_parallel_blocks(modules),
        gated_fc1=scan_gated_conv_blocks(modules),
        dual_path=scan_dual_path_blocks(modules),
        conv_rel_pos=scan_conv_rel_pos(modules),
        partial_conv=scan_partial_convs(modules),
    )


_EMPTY = TimmScan()


def scan_of(findings: Any) -> TimmScan:
    """The timm scan filed in ``findings`` (an empty scan when there is none, e.g. when a
    hook is called directly, outside a model scan)."""
    scan = findings.get(KEY) if findings is not None else None
    return scan if isinstance(scan, TimmScan) else _EMPTY
