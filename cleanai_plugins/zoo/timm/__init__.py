"""timm (and timm-style) models: attention attributes, stored split sizes, classifier heads.

The plugin in three steps, each a hook:

1. ``cleanai_prepare_model`` scans the model once (``scan.py``) and files a
   :class:`~cleanai_plugins.zoo.timm.scan.TimmScan` in the model's findings, plus the
   modules that may slice fixed channel ranges (DPN, ReXNet, CoaT, FasterNet).
2. ``cleanai_layer_pruner`` claims, from that scan, the projections that need coupling
   beyond a plain linear or conv (width-bound attention, LambdaNetworks' whole layers, parallel blocks,
   MambaOut), and weight-standardised and conditional (CondConv) convs by type.
3. ``cleanai_after_prune`` runs :data:`FIXUPS`: attributes outside tensors (head counts,
   head sizes, split sizes) follow the sliced widths, read against the scan taken before
   slicing. On a scanned module only the fix-ups the scan found may act there run (each
   declares its trigger names, ``lookup.py``).

Where a new pattern goes: attention attributes in ``attention.py`` or
``width_attention.py``, stored split sizes in ``blocks.py`` or ``widths.py``,
normalisations in ``norms.py``; a pattern that needs a scan adds a field to ``TimmScan``.
"""

from __future__ import annotations

from torch import nn

from cleanai_core import hookimpl
from cleanai_plugins.layers.conv import ConvPruner
from cleanai_plugins.mappers.matmul import keeps_trained_scale
from cleanai_plugins.mappers.shape import allow_channel_ranges, rewrites_stored_counts
from cleanai_plugins.zoo.timm.attention import (
    fix_attention,
    fix_bias_attention,
    fix_bottleneck_attention,
    fix_headmajor_attention,
    fix_multi_query_attention,
    fix_rel_pos,
    fix_trained_scale,
    pairs_sub_heads,
    rewrites_bottleneck_counts,
    rewrites_head_count,
    shares_one_kv_head,
    splits_heads_unevenly,
    splits_qk_from_v,
)
from cleanai_plugins.zoo.timm.blocks import (
    GatedFc1Pruner,
    ParallelInProjPruner,
    fix_conv_rel_pos,
    fix_dual_path_block,
    fix_focal_modulation,
    fix_gated_conv_block,
    fix_parallel_block,
    fix_partial_conv,
    fix_range_shortcut,
)
from cleanai_plugins.zoo.timm.cascaded import fix_cascaded_attention
from cleanai_plugins.zoo.timm.cond_conv import CondConvPruner
from cleanai_plugins.zoo.timm.cross_covariance import fix_cross_covariance
from cleanai_plugins.zoo.timm.inception_dw import fix_inception_dw
from cleanai_plugins.zoo.timm.lambda_layer import LambdaLayerPruner
from cleanai_plugins.zoo.timm.linear_attention import fix_linear_attention
from cleanai_plugins.zoo.timm.lookup import acts_on, names_of, trigger_names
from cleanai_plugins.zoo.timm.norms import StdConvPruner, fix_group_count, is_std_conv
from cleanai_plugins.zoo.timm.output_width import fix_output_width
from cleanai_plugins.zoo.timm.partial_attention import fix_partial_attention
from cleanai_plugins.zoo.timm.reparam import fix_reparam_widths
from cleanai_plugins.zoo.timm.rope_mixed import fix_rope_mixed, rope_mixed_dim
from cleanai_plugins.zoo.timm.scan import KEY, scan_model, scan_of
from cleanai_plugins.zoo.timm.split_scales import fix_split_scales
from cleanai_plugins.zoo.timm.width_attention import TiedLinearPruner, fix_width_attention, mixes_heads
from cleanai_plugins.zoo.timm.widths import fix_filter_channels, fix_scale_shape, fix_split_widths

__all__ = ["FIXUPS"]

#: attribute fix-ups run after slicing, in this order; each returns early when the module
#: does not have its pattern, and declares the names that pattern needs (``@triggered_by``)
FIXUPS = (
    fix_attention,
    fix_width_attention,
    fix_split_widths,
    fix_headmajor_attention,
    fix_bias_attention,
    fix_rel_pos,
    fix_multi_query_attention,
    fix_scale_shape,
    fix_group_count,
    fix_bottleneck_attention,
    fix_parallel_block,
    fix_gated_conv_block,
    fix_dual_path_block,
    fix_range_shortcut,
    fix_focal_modulation,
    fix_conv_rel_pos,
    fix_partial_conv,
    fix_split_scales,
    fix_cross_covariance,
    fix_output_width,
    fix_cascaded_attention,
    fix_partial_attention,
    fix_inception_dw,
    fix_trained_scale,
    fix_linear_attention,
    fix_filter_channels,
    fix_reparam_widths,
)


@hookimpl
def cleanai_prepare_model(model):
    scan = scan_model(model, FIXUPS)
    ranges = (
        *scan.dual_path,
        *scan.range_shortcut,
        *scan.focal_modulation,
        *scan.conv_rel_pos,
        *scan.partial_conv,
        *scan.split_scales,
    )
    ranges = (*ranges, *scan.cascaded_attention, *scan.partial_attention, *scan.inception_dw, *scan.linear_attention)
    # the head counts fix_attention rewrites (``num_heads`` / ``heads`` beside a query
    # projection), and the counts and widths fix_bottleneck_attention does (BoTNet, HaloNet)
    counted = (
        m
        for m, found in scan.fixups.items()
        if (fix_attention in found and rewrites_head_count(m))
        or (fix_bottleneck_attention in found and rewrites_bottleneck_counts(m))
    )
    rewritten = rewrites_stored_counts(*counted)
    uneven = (m for m, found in scan.fixups.items() if fix_bottleneck_attention in found and splits_qk_from_v(m))
    ranges = (*ranges, *uneven)
    return {KEY: scan, **allow_channel_ranges(*ranges), **keeps_trained_scale(*scan.trained_scale), **rewritten}


#: the attentions whose heads must stay whole (``cleanai_whole_heads``)
WHOLE_HEADS = (mixes_heads, splits_heads_unevenly, pairs_sub_heads, shares_one_kv_head)


@hookimpl
def cleanai_whole_heads(model):
    wanted = trigger_names(WHOLE_HEADS)
    found = []
    for m in model.modules():
        names = names_of(m, wanted)
        if any(acts_on(test, names) and test(m) for test in WHOLE_HEADS):
            found.append(m)
    return found or None


@hookimpl
def cleanai_layer_pruner(module, findings):
    if is_std_conv(module):
        return StdConvPruner()
    scan = scan_of(findings)
    if module in scan.cond_convs:
        return CondConvPruner()
    if module in scan.whole_group_convs:
        return ConvPruner(whole_groups=True)
    if module in scan.parallel:
        return ParallelInProjPruner(*scan.parallel[module])
    if module in scan.lambda_layers:
        return LambdaLayerPruner()
    if module in scan.gated_fc1:
        return GatedFc1Pruner()
    info = scan.tied.get(module)
    if info is not None and isinstance(module, nn.Linear):
        return TiedLinearPruner(info[0])
    return None


@hookimpl(trylast=True)
def cleanai_after_prune(module, name, edits, findings):
    scan = scan_of(findings)
    for fix in scan.fixups.get(module, FIXUPS):
        fix(module, name, edits, scan)
    fix_rope_mixed(module)


@hookimpl
def cleanai_unwrapped_parameter(name, parameter, model):
    return rope_mixed_dim(name, parameter, model)


@hookimpl(trylast=True)
def cleanai_default_ignores(model):
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:
            return None
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return classifier_layers(head)
    return None


#: normalisations: in a classifier head they pass its input features through
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def classifier_layers(head: nn.Module) -> list[nn.Module]:
    """The layers of a classifier head to keep: those with parameters, less its norms. A norm
    on the head's input (RepViT's, iFormer's, EfficientViT-M's ``BatchNorm1d`` + ``Linear``)
    only passes the features through; ignored with the head, it froze the last stage's
    channels on the default path (repvit_m1 kept 0.36, iformer_t 0.38 at a ratio of 0.5)."""
    layers = [m for m in head.modules() if any(True for _ in m.parameters(recurse=False))]
    return [m for m in layers if not isinstance(m, _NORMS)] or [head]
