"""RMS norms of Hugging Face ``transformers`` models (``LlamaRMSNorm``, ``Qwen2RMSNorm``,
``MistralRMSNorm``, ``GemmaRMSNorm``...): each model family defines its own class, none
subclasses ``nn.RMSNorm``, so they are matched by shape, not by import.

A match: the class name ends with ``RMSNorm``, the module has no children, a 1-D
``weight`` and an epsilon (``variance_epsilon`` or ``eps``). It is claimed as the RMS norm
it is (:class:`~cleanai_plugins.layers.norm.RMSNormPruner`: the weight follows the
channels; the mean over channels changes when channels go, so the slice is approximate,
like LayerNorm's). Without this claim the tracer walks into ``forward`` and the mean over
the hidden size freezes the whole residual stream.
"""

from __future__ import annotations

from torch import nn

from cleanai_core import hookimpl
from cleanai_plugins.layers.norm import RMSNormPruner

__all__ = ["is_transformers_rms_norm"]


def is_transformers_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and not isinstance(module, nn.RMSNorm)
        and next(module.children(), None) is None
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and (hasattr(module, "variance_epsilon") or hasattr(module, "eps"))
    )


@hookimpl(trylast=True)
def cleanai_layer_pruner(module):
    return RMSNormPruner() if is_transformers_rms_norm(module) else None
