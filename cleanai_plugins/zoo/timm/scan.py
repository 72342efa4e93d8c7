"""The timm model scan: every pattern the claims and fix-ups need, found once per model.

:func:`scan_model` runs in ``cleanai_prepare_model``; its :class:`TimmScan` travels in the
model's findings under :data:`KEY` to the claim hook (which modules get a special pruner)
and to the after-prune fix-ups (the widths and head counts as they were before slicing).
Nothing is kept between models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from torch import nn

from cleanai_plugins.zoo.timm.attention import scan_head_sizes, scan_trained_scale
from cleanai_plugins.zoo.timm.blocks import (
    scan_conv_rel_pos,
    scan_dual_path_blocks,
    scan_focal_modulations,
    scan_gated_conv_blocks,
    scan_parallel_blocks,
    scan_partial_convs,
    scan_range_shortcuts,
)
from cleanai_plugins.zoo.timm.cascaded import scan_cascaded_attention
from cleanai_plugins.zoo.timm.cond_conv import scan_cond_convs
from cleanai_plugins.zoo.timm.cross_covariance import scan_cross_covariance
from cleanai_plugins.zoo.timm.inception_dw import scan_inception_dw
from cleanai_plugins.zoo.timm.lambda_layer import scan_lambda_layers
from cleanai_plugins.zoo.timm.linear_attention import scan_linear_attention
from cleanai_plugins.zoo.timm.lookup import acts_on, names_of, trigger_names
from cleanai_plugins.zoo.timm.norms import scan_group_norms, scan_whole_group_convs
from cleanai_plugins.zoo.timm.output_width import scan_output_width
from cleanai_plugins.zoo.timm.partial_attention import scan_partial_attention
from cleanai_plugins.zoo.timm.reparam import Witnesses, scan_reparam_widths
from cleanai_plugins.zoo.timm.split_scales import scan_split_scales
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
    #: LambdaNetworks' lambda layers, claimed whole
    lambda_layers: set[nn.Module] = attrs.field(factory=set)
    #: conditional (CondConv) convolutions, claimed like plain ones
    cond_convs: set[nn.Module] = attrs.field(factory=set)
    #: a parallel block's ``in_proj`` -> (mlp width, dim)
    parallel: dict[nn.Module, tuple[int, int]] = attrs.field(factory=dict)
    #: MambaOut gated blocks' ``fc1``
    gated_fc1: set[nn.Module] = attrs.field(factory=set)
    #: DPN dual path blocks
    dual_path: set[nn.Module] = attrs.field(factory=set)
    #: ReXNet blocks: the shortcut is added to the first ``in_channels`` of the output
    range_shortcut: set[nn.Module] = attrs.field(factory=set)
    #: FocalNet focal modulations: their ``[dim, dim, gates]`` split follows ``h``
    focal_modulation: set[nn.Module] = attrs.field(factory=set)
    #: CoaT conv relative position encodings
    conv_rel_pos: set[nn.Module] = attrs.field(factory=set)
    #: every scanned module -> the after-prune fix-ups that may act on it (those with one of
    #: its trigger names, :mod:`~cleanai_plugins.zoo.timm.lookup`); a module not in it (none
    #: scanned, or put in by a pruner after the scan) gets every fix-up
    fixups: dict[nn.Module, tuple[Callable, ...]] = attrs.field(factory=dict)
    #: FasterNet partial convolutions (split and cat)
    partial_conv: set[nn.Module] = attrs.field(factory=set)
    #: EdgeNeXt split-scale blocks whose ``chunk`` leaves a smaller last part
    split_scales: set[nn.Module] = attrs.field(factory=set)
    #: grouped convs normed by EvoNorm-S: they prune by whole groups
    whole_group_convs: set[nn.Module] = attrs.field(factory=set)
    #: cross-covariance attentions (EdgeNeXt, XCiT), not width-bound -> head size before pruning
    cross_covariance: dict[nn.Module, int] = attrs.field(factory=dict)
    #: attentions that store ``num_heads`` but no head size (Hiera-Det) -> head size before pruning
    head_sizes: dict[nn.Module, int] = attrs.field(factory=dict)
    #: EfficientViT-M cascaded group attentions: their split follows the pruned widths
    cascaded_attention: set[nn.Module] = attrs.field(factory=set)
    #: SHViT single-head attentions over a part of the channels -> (qk_dim, v_dim) before pruning
    partial_attention: dict[nn.Module, tuple[int, int]] = attrs.field(factory=dict)
    #: InceptionNeXt inception depthwise convs whose split has unequal parts
    inception_dw: set[nn.Module] = attrs.field(factory=set)
    #: attentions through SDPA's default scale that can use their stored one (iFormer)
    trained_scale: set[nn.Module] = attrs.field(factory=set)
    #: EVA attentions and latent attention pools, not width-bound: their output reshape reads the heads' width
    output_width: set[nn.Module] = attrs.field(factory=set)
    #: MobileViT-V2 separable linear attentions: their ``[1, embed_dim, embed_dim]`` split follows the kept keys
    linear_attention: set[nn.Module] = attrs.field(factory=set)
    #: re-parameterisable blocks (RepVGG style) -> the widths their fusion reads and their witnesses
    reparam_widths: dict[nn.Module, Witnesses] = attrs.field(factory=dict)


_SCANS = (
    scan_head_sizes,
    scan_cross_covariance,
    scan_output_width,
    scan_width_attention,
    scan_group_norms,
    scan_lambda_layers,
    scan_cond_convs,
    scan_parallel_blocks,
    scan_gated_conv_blocks,
    scan_dual_path_blocks,
    scan_range_shortcuts,
    scan_focal_modulations,
    scan_conv_rel_pos,
    scan_partial_convs,
    scan_split_scales,
    scan_whole_group_convs,
    scan_cascaded_attention,
    scan_partial_attention,
    scan_inception_dw,
    scan_trained_scale,
    scan_linear_attention,
    scan_reparam_widths,
)


def scan_model(model: nn.Module, fixups: Sequence[Callable] = ()) -> TimmScan:
    """Scan every module of ``model`` for the patterns of :class:`TimmScan`, and note which
    of ``fixups`` may act on each. Each module's trigger names are read once; each scan
    sees only the modules that have one of its own."""
    modules = list(model.modules())
    wanted = trigger_names((*_SCANS, *fixups))
    names = [names_of(m, wanted) for m in modules]

    def having(scan: Callable) -> list[nn.Module]:
        return [m for m, n in zip(modules, names, strict=True) if acts_on(scan, n)]

    cross_covariance = scan_cross_covariance(having(scan_cross_covariance))
    output_width = scan_output_width(having(scan_output_width))
    freed = {*cross_covariance, *output_width}  # their widths are freed
    bound = [m for m in having(scan_width_attention) if m not in freed]
    width_attention, width_heads, tied = scan_width_attention(bound)
    bound_or_xca = {*width_attention, *cross_covariance}  # their own fix-ups set the head count
    return TimmScan(
        tied=tied,
        width_attention=width_attention,
        width_heads=width_heads,
        group_size=scan_group_norms(having(scan_group_norms)),
        lambda_layers=scan_lambda_layers(having(scan_lambda_layers)),
        cond_convs=scan_cond_convs(having(scan_cond_convs)),
        parallel=scan_parallel_blocks(having(scan_parallel_blocks)),
        gated_fc1=scan_gated_conv_blocks(having(scan_gated_conv_blocks)),
        dual_path=scan_dual_path_blocks(having(scan_dual_path_blocks)),
        range_shortcut=scan_range_shortcuts(having(scan_range_shortcuts)),
        focal_modulation=scan_focal_modulations(having(scan_focal_modulations)),
        conv_rel_pos=scan_conv_rel_pos(having(scan_conv_rel_pos)),
        partial_conv=scan_partial_convs(having(scan_partial_convs)),
        split_scales=scan_split_scales(having(scan_split_scales)),
        whole_group_convs=scan_whole_group_convs(having(scan_whole_group_convs)),
        cross_covariance=cross_covariance,
        cascaded_attention=scan_cascaded_attention(having(scan_cascaded_attention)),
        partial_attention=scan_partial_attention(having(scan_partial_attention)),
        inception_dw=scan_inception_dw(having(scan_inception_dw)),
        trained_scale=scan_trained_scale(having(scan_trained_scale)),
        output_width=output_width,
        linear_attention=scan_linear_attention(having(scan_linear_attention)),
        reparam_widths=scan_reparam_widths(having(scan_reparam_widths)),
        head_sizes={m: d for m, d in scan_head_sizes(having(scan_head_sizes)).items() if m not in bound_or_xca},
        fixups=_acting(fixups, modules, names),
    )


def _acting(
    fixups: Sequence[Callable], modules: list[nn.Module], names: list[frozenset[str] | None]
) -> dict[nn.Module, tuple[Callable, ...]]:
    """Each module -> the ``fixups`` that may act on it (worked out once per set of names:
    most modules share the empty one)."""
    by_names: dict[frozenset[str] | None, tuple[Callable, ...]] = {}
    out = {}
    for m, n in zip(modules, names, strict=True):
        found = by_names.get(n)
        if found is None:
            found = by_names[n] = tuple(f for f in fixups if acts_on(f, n))
        out[m] = found
    return out


_EMPTY = TimmScan()


def scan_of(findings: Any) -> TimmScan:
    """The timm scan filed in ``findings`` (an empty scan when there is none, e.g. when a
    hook is called directly, outside a model scan)."""
    scan = findings.get(KEY) if findings is not None else None
    return scan if isinstance(scan, TimmScan) else _EMPTY
