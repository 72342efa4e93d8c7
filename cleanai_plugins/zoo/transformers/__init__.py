"""Hugging Face transformers models: they prune, and stay transformers models.

- every transformers attention module keeps whole heads (``cleanai_whole_heads``),
  whichever attention implementation runs (eager, sdpa, flex); grouped-query attention
  loses whole key/value groups (the SDPA mapper and ``repeat_kv``'s expand/reshape tie a
  KV head to its query heads);
- mixture-of-experts MLPs (Mixtral's 3-D expert tensors) prune each expert's width
  (:mod:`.experts`); the router is untouched; shared experts whose width the config
  derives from the experts' keep the same share of it (:mod:`.shared_experts`);
- ``Conv1D`` (GPT-2) has a layer pruner (:mod:`.conv1d`); RMS norms are claimed like
  ``nn.RMSNorm`` and weightless layer norms (OLMo's) like ``nn.LayerNorm``, so the hidden
  size can shrink;
- layers whose config cannot declare a bias (Qwen2's ``o_proj``, Mistral's ``down_proj``)
  are filed under ``no_new_bias`` (:mod:`.bias`): compensation folds into their kept
  columns and creates no bias, so the default options still reload;
- multi-query attention (Falcon's fused ``query_key_value``, one KV head) prunes its
  query heads and keeps the KV head; Bloom's pruned attention takes its kept heads' rows
  of the model-wide ALiBi tensor (:mod:`.alibi`);
- after slicing, attention attributes (:mod:`.attention`) and ``config``
  (:mod:`.config`, per-stage lists: :mod:`.staged`) are rewritten from the modules, so
  ``save_pretrained`` -> ``from_pretrained`` rebuilds the pruned model when every layer
  kept the same widths and the config can say them; otherwise ``config.cleanai_pruning``
  says ``"reload": "load_pruned"`` and why (:mod:`.reload_path`).

transformers is optional: without it this plugin claims nothing.
"""

from __future__ import annotations

from cleanai_core import hookimpl
from cleanai_core.graph.findings import SAME_SHARE
from cleanai_plugins.layers.linear import NO_NEW_BIAS, no_new_bias
from cleanai_plugins.layers.norm import LayerNormPruner, RMSNormPruner
from cleanai_plugins.mappers.gqa import GQA_QUERY_HEADS
from cleanai_plugins.mappers.matmul import slices_head_inputs
from cleanai_plugins.mappers.shape import allow_channel_ranges
from cleanai_plugins.zoo import loaded
from cleanai_plugins.zoo.timm.width_attention import TiedLinearPruner
from cleanai_plugins.zoo.transformers.alibi import fix_alibi_heads, is_alibi_attention
from cleanai_plugins.zoo.transformers.attention import (
    fix_attention,
    fix_attentions,
    has_fused_mqa,
    has_fused_qkv,
    head_layout,
    input_width_query,
    is_attention,
)
from cleanai_plugins.zoo.transformers.bias import undeclarable
from cleanai_plugins.zoo.transformers.config import fix_config
from cleanai_plugins.zoo.transformers.conv1d import Conv1DPruner
from cleanai_plugins.zoo.transformers.derived import MLP_STEPS, SteppedLinearPruner, derived_mlp_ties
from cleanai_plugins.zoo.transformers.experts import ExpertsPruner, is_experts
from cleanai_plugins.zoo.transformers.fills import FILLS, HeadsFill
from cleanai_plugins.zoo.transformers.flat_experts import FlatExpertsPruner, is_flat_experts
from cleanai_plugins.zoo.transformers.parallel_experts import ParallelExpertsPruner, is_parallel_experts
from cleanai_plugins.zoo.transformers.quant_linear import QuantLinearPruner, is_quant_linear
from cleanai_plugins.zoo.transformers.rebuilt import REBUILT, FrozenLinearPruner, rebuilt_projections
from cleanai_plugins.zoo.transformers.routed import RoutedExpertsPruner, routed_experts
from cleanai_plugins.zoo.transformers.shared_experts import shared_expert_ties

__all__ = ["Conv1DPruner", "is_rms_norm", "is_weightless_layer_norm"]

#: model findings key: query projections of attention modules that reshape their output to
#: their input's width (LED's decoder attention): claimed by a pruner that ties their output
#: channels to their input channels
INPUT_WIDTH_QUERIES = "input_width_queries"
#: model findings key: projections of attention that transformers rebuilds from the config
#: while the model runs (BigBird's block-sparse attention, :mod:`.rebuilt`): frozen
REBUILT_PROJECTIONS = "rebuilt_projections"


def pretrained_model_class() -> type | None:
    """transformers' ``PreTrainedModel`` once transformers is imported (None before: no
    transformers model can exist yet, and importing it here cost every process 1-2 s)."""
    return getattr(loaded("transformers.modeling_utils"), "PreTrainedModel", None)


def _conv1d_class() -> type | None:
    return getattr(loaded("transformers.pytorch_utils"), "Conv1D", None)


def is_rms_norm(module) -> bool:
    """A transformers RMS norm (``LlamaRMSNorm``, ``GemmaRMSNorm``, ``T5LayerNorm``...):
    one weight vector over the last dimension, no bias."""
    cls = type(module)
    if not cls.__module__.startswith("transformers.") or not (
        cls.__name__.endswith("RMSNorm") or cls.__name__ == "T5LayerNorm"
    ):
        return False
    weight = getattr(module, "weight", None)
    return weight is not None and weight.ndim == 1 and getattr(module, "bias", None) is None


def is_weightless_layer_norm(module) -> bool:
    """A transformers layer norm with no parameters that keeps its width in
    ``normalized_shape`` (``OlmoLayerNorm``: ``F.layer_norm(x, self.normalized_shape)``)."""
    cls = type(module)
    shape = getattr(module, "normalized_shape", None)
    return (
        cls.__module__.startswith("transformers.")
        and cls.__name__.endswith("LayerNorm")
        and isinstance(shape, (tuple, list))
        and len(shape) == 1
        and next(module.parameters(), None) is None
        and next(module.children(), None) is None
    )


def outermost(root, cls) -> list:
    """``(name, module)`` of the modules of ``root`` that are ``cls`` instances and not
    inside another one."""
    found: list = []
    for name, module in root.named_modules():
        if isinstance(module, cls) and not any(name.startswith(f"{n}.") or n == "" for n, _ in found):
            found.append((name, module))
    return found


@hookimpl
def cleanai_attention_heads(model):
    """The query and key/value heads of every transformers attention module, for the report."""
    if pretrained_model_class() is None:
        return None
    found = (head_layout(m, name) for name, m in model.named_modules() if is_attention(m))
    return [layout for layout in found if layout is not None] or None


@hookimpl(trylast=True)
def cleanai_whole_heads(model):
    if pretrained_model_class() is None:
        return None
    return [m for m in model.modules() if is_attention(m)]


@hookimpl
def cleanai_prepare_model(model):
    """The q, k, v ranges of a fused ``qkv_proj`` are taken by fixed bounds: the
    attention fix-ups rewrite them after slicing. Layers whose bias no config switch
    can declare get none from compensation. Widths the config derives from others keep
    their share (shared experts, :mod:`.derived`)."""
    pretrained = pretrained_model_class()
    if pretrained is None:
        return None
    modules = list(model.modules())  # one walk for the four finders
    if not any(type(m).__module__.startswith("transformers.") for m in modules):
        return None  # every finding below is about transformers' classes (a timm model: 7 ms a scan)
    fused = [m for m in modules if is_attention(m) and (has_fused_qkv(m) or has_fused_mqa(m))]
    bare = [m for _, hf in outermost(model, pretrained) for m in undeclarable(hf)]
    alibi = [m for m in modules if is_alibi_attention(m)]
    tied = {q for q in map(input_width_query, modules) if q is not None}
    rebuilt = {p for m in modules for p in rebuilt_projections(m)}
    ties = (shared_expert_ties(model), derived_mlp_ties(model))
    same = set().union(*((t or {}).get(SAME_SHARE, set()) for t in ties))
    steps = (ties[1] or {}).get(MLP_STEPS)
    found = {
        **({SAME_SHARE: same} if same else {}),
        **(allow_channel_ranges(*fused) if fused else {}),
        **(no_new_bias(*bare) if bare else {}),
        **(slices_head_inputs(*alibi) if alibi else {}),
        **({INPUT_WIDTH_QUERIES: tied} if tied else {}),
        **({REBUILT_PROJECTIONS: rebuilt} if rebuilt else {}),
        **({MLP_STEPS: steps} if steps else {}),
    }
    return found or None


@hookimpl(trylast=True)
def cleanai_after_prune(module, name, edits, findings=None):
    pretrained = pretrained_model_class()
    if pretrained is None:
        return
    if not edits:  # nothing sliced (every group too small for the ratio): the config still says how it reloads
        if name == "":
            for _, model in outermost(module, pretrained):
                fix_config(model)
        return
    kept = (findings or {}).get(GQA_QUERY_HEADS, ())  # attention that kept its key/value heads
    if is_attention(module):
        fix_attention(module, module in kept)
    if name == "":  # once, at the root (before its children): every outermost transformers model in it
        for sub, attn in module.named_modules():  # Bloom: the kept heads' ALiBi rows (once per slicing)
            if is_alibi_attention(attn):
                fix_alibi_heads(attn, sub, edits)
        for _, model in outermost(module, pretrained):
            fix_attentions(model, kept)
            fix_config(model)


@hookimpl  # not trylast: a query projection bound to its input width goes before the plain linear pruner
def cleanai_layer_pruner(module, findings=None):
    if module in (findings or {}).get(INPUT_WIDTH_QUERIES, ()):
        return TiedLinearPruner(1)
    if module in (findings or {}).get(REBUILT_PROJECTIONS, ()):
        return FrozenLinearPruner(REBUILT)
    if module in (findings or {}).get(MLP_STEPS, {}):
        return SteppedLinearPruner(findings[MLP_STEPS][module], module not in findings.get(NO_NEW_BIAS, ()))
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return Conv1DPruner()
    if is_rms_norm(module):
        return RMSNormPruner()
    if is_weightless_layer_norm(module):
        return LayerNormPruner()
    if is_experts(module):
        return ExpertsPruner()
    if is_parallel_experts(module):
        return ParallelExpertsPruner()
    if is_flat_experts(module):
        return FlatExpertsPruner()
    if is_quant_linear(module):
        return QuantLinearPruner()
    if routed_experts(module) is not None:
        return RoutedExpertsPruner()
    return None


@hookimpl(trylast=True)
def cleanai_index_mapper(op):
    packet = getattr(op, "overloadpacket", None)
    if getattr(packet, "__name__", None) in FILLS and str(op).startswith("aten."):
        return HeadsFill()
    return None
