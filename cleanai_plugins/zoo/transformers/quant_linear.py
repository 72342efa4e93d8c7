"""I-BERT's ``QuantLinear``: a linear layer (``weight (out, in)``, ``bias``) that returns
``(output, scaling factor)`` and keeps integer copies of its weight and bias and a
per-row scaling factor as buffers (saved, so ``from_pretrained`` checks their shapes). Out
of quantization mode it computes ``F.linear(x, weight, bias)``; the buffers are only
rewritten in quantization mode, from the weight."""

from __future__ import annotations

from cleanai_core.interfaces import replace_param
from cleanai_plugins.layers.linear import LinearPruner

__all__ = ["QuantLinearPruner", "is_quant_linear"]


def is_quant_linear(module) -> bool:
    cls = type(module)
    return cls.__name__ == "QuantLinear" and cls.__module__.startswith("transformers.models.ibert")


class QuantLinearPruner(LinearPruner):
    """Slices like ``nn.Linear`` (``"in"``, ``"out"``), and the integer buffers with it.
    In quantization mode the layer returns a second tensor (its scaling factor): its rows
    stay (:meth:`LinearPruner.trace` freezes a layer that returns more than its output)."""

    name = "transformers_quant_linear"

    def __init__(self) -> None:
        super().__init__(new_bias=False)  # the integer bias buffer is rebuilt from the config's bias switch

    def prune(self, module, keep):
        out = module.weight.shape[0]
        super().prune(module, keep)
        if "out" in keep:
            replace_param(module, "weight_integer", 0, keep["out"])
            replace_param(module, "bias_integer", 0, keep["out"])
            if getattr(module, "fc_scaling_factor", None) is not None and module.fc_scaling_factor.numel() == out:
                replace_param(module, "fc_scaling_factor", 0, keep["out"])
        if "in" in keep:
            replace_param(module, "weight_integer", 1, keep["in"])
