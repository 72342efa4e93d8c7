"""Routed experts kept as one module per expert, called only for the experts a token
was sent to (SwitchTransformers' ``SwitchTransformersExperts``: a ``ModuleDict`` of
``expert_<i>`` MLPs, each ``wi`` then ``wo``).

Traced module by module, the experts no example token reached were never seen: they kept
their width while the others shrank, and one ``d_ff`` could not describe the layer. The
dict is claimed as one composite instead: ``"hidden_in"`` (every expert's ``wi`` columns),
``"hidden_out"`` (every expert's ``wo`` rows) and one ``"inter.<i>"`` per expert (its
``wi`` rows and ``wo`` columns), so every expert prunes, reached or not. The router is
untouched: no expert is removed.
"""

from __future__ import annotations

from torch import nn

from cleanai_core.interfaces import LayerPruner, replace_param

__all__ = ["RoutedExpertsPruner", "routed_experts"]


def routed_experts(module: nn.Module) -> list[tuple[nn.Linear, nn.Linear]] | None:
    """``[(wi, wo)]`` per expert of a transformers ``ModuleDict`` of ``expert_<i>`` MLPs
    (``wi``: hidden -> inner, ``wo``: inner -> hidden, every expert alike), else None."""
    cls = type(module)
    if not (cls.__module__.startswith("transformers.") and isinstance(module, nn.ModuleDict) and len(module)):
        return None
    pairs = []
    for i in range(len(module)):
        expert = module[f"expert_{i}"] if f"expert_{i}" in module else None
        wi, wo = getattr(expert, "wi", None), getattr(expert, "wo", None)
        if not (isinstance(wi, nn.Linear) and isinstance(wo, nn.Linear) and wi.out_features == wo.in_features):
            return None
        pairs.append((wi, wo))
    shapes = {(wi.in_features, wi.out_features, wo.out_features) for wi, wo in pairs}
    return pairs if len(shapes) == 1 and len(pairs) == len(module) else None


class RoutedExpertsPruner(LayerPruner):
    name = "transformers_routed_experts"

    def trace(self, module, call, ctx):
        pairs = routed_experts(module)
        x = call.args[0] if call.args else call.kwargs.get("hidden_states")
        ctx.bind(call.name, "hidden_in", ctx.labels(x, -1), "in", arg=0, dim=-1)
        for ref in (*call.args[1:], *call.kwargs.values()):
            ctx.label_of(ref)  # routing indices and weights carry no channels
        for i, (wi, _) in enumerate(pairs):
            if (call.name, f"inter.{i}") not in ctx.slices:
                ctx.bind(call.name, f"inter.{i}", ctx.new_atoms(wi.out_features), "param")
        atoms = ctx.produce(call.name, "hidden_out", pairs[0][1].out_features, dim=-1)
        ctx.set_label(call.outputs[0], -1, atoms)

    def prune(self, module, keep):
        for i, (wi, wo) in enumerate(routed_experts(module)):
            if "hidden_in" in keep:
                replace_param(wi, "weight", 1, keep["hidden_in"])
            if "hidden_out" in keep:
                replace_param(wo, "weight", 0, keep["hidden_out"])
                replace_param(wo, "bias", 0, keep["hidden_out"])
            inter = keep.get(f"inter.{i}")
            if inter is not None:
                replace_param(wi, "weight", 0, inter)
                replace_param(wi, "bias", 0, inter)
                replace_param(wo, "weight", 1, inter)
            wi.in_features, wi.out_features = wi.weight.shape[1], wi.weight.shape[0]
            wo.in_features, wo.out_features = wo.weight.shape[1], wo.weight.shape[0]

    def mask(self, module, slice_name, idx):
        """Zero, in the masking oracle's copy, every weight (and bias) that reads or writes ``idx``."""
        for i, (wi, wo) in enumerate(routed_experts(module)):
            if slice_name == "hidden_in":
                wi.weight.data[:, idx] = 0
            elif slice_name == "hidden_out":
                wo.weight.data[idx] = 0
                if wo.bias is not None:
                    wo.bias.data[idx] = 0
            elif slice_name == f"inter.{i}":
                wi.weight.data[idx] = 0
                if wi.bias is not None:
                    wi.bias.data[idx] = 0
                wo.weight.data[:, idx] = 0
        return True

    def weight_energy(self, module, slice_name):
        pairs = routed_experts(module)
        if slice_name == "hidden_in":
            return sum(wi.weight.detach().float().pow(2).sum(0) for wi, _ in pairs)
        if slice_name == "hidden_out":
            return sum(wo.weight.detach().float().pow(2).sum(1) for _, wo in pairs)
        wi, wo = pairs[int(slice_name.split(".")[1])]
        return wi.weight.detach().float().pow(2).sum(1) + wo.weight.detach().float().pow(2).sum(0)
