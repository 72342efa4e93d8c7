"""The plugin module named by the ``cleanai`` entry point: claims :class:`ScaledLinear`."""

from __future__ import annotations

from cleanai_core import hookimpl
from cleanai_core.interfaces import LayerPruner, replace_param
from cleanai_example import ScaledLinear

__all__ = ["ScaledLinearPruner"]


class ScaledLinearPruner(LayerPruner):
    """Slices ``"in"`` (columns of ``weight``) and ``"out"`` (rows of ``weight``,
    ``scale`` and ``bias``)."""

    name = "scaled_linear"

    def trace(self, module, call, ctx):
        x = call.args[0]
        # the input channels: whatever labels reach the last dim of x
        ctx.bind(call.name, "in", ctx.labels(x, -1), "in", arg=0, dim=-1)
        # the output channels: new atoms, one per row of weight
        atoms_out = ctx.produce(call.name, "out", module.out_features, dim=-1)
        ctx.set_label(call.outputs[0], -1, atoms_out)

    def prune(self, module, keep):
        if "out" in keep:
            for attr in ("weight", "scale", "bias"):
                replace_param(module, attr, 0, keep["out"])
            module.out_features = keep["out"].numel()
        if "in" in keep:
            replace_param(module, "weight", 1, keep["in"])
            module.in_features = keep["in"].numel()

    def weight_energy(self, module, slice_name):
        w = (module.weight.detach() * module.scale.detach()[:, None]).float() ** 2
        return w.sum(1) if slice_name == "out" else w.sum(0)

    def compensate(self, module, slice_name, removed, mean):
        if slice_name != "in":
            return False
        w = module.weight.detach()
        module.bias.data += (w[:, removed] @ mean.to(w.dtype)) * module.scale.detach()
        return True


@hookimpl
def cleanai_layer_pruner(module):
    if isinstance(module, ScaledLinear):
        return ScaledLinearPruner()
    return None
