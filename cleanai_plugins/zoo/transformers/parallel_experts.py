"""Experts stored as one ``(experts, out, in)`` weight and run on tokens sorted by expert
(JetMoE's ``JetMoeParallelExperts``: ``forward(inputs, expert_size)`` splits the tokens
by ``expert_size``, runs ``F.linear(part, weight[e])`` per expert and concatenates).

Traced, the split over tokens and the per-expert selects of a bare weight froze every
channel (JetMoE pruned nothing). Claimed as one layer: ``"in"`` (the weight's last
dimension, read on the input's last dim) and ``"out"`` (its middle dimension, the output's
last dim), like ``nn.Linear``; a unit is the same row (or column) of every expert, so the
3-D weight stays one tensor and each expert keeps the same width.
"""

from __future__ import annotations

from torch import nn

from cleanai_core.interfaces import LayerPruner, replace_param

__all__ = ["ParallelExpertsPruner", "is_parallel_experts"]


def is_parallel_experts(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__module__.startswith("transformers.")
        and type(module).__name__.endswith("ParallelExperts")
        and isinstance(weight, nn.Parameter)
        and weight.ndim == 3
        and (weight.shape[0], weight.shape[1], weight.shape[2])
        == (
            getattr(module, "num_experts", None),
            getattr(module, "output_size", None),
            getattr(module, "input_size", None),
        )
    )


class ParallelExpertsPruner(LayerPruner):
    name = "transformers_parallel_experts"

    def trace(self, module, call, ctx):
        x = call.args[0] if call.args else call.kwargs.get("inputs")
        ctx.bind(call.name, "in", ctx.labels(x, -1), "in", arg=0, dim=-1)
        for ref in (*call.args[1:], *call.kwargs.values()):
            ctx.label_of(ref)  # the experts' token counts carry no channels
        ctx.set_label(call.outputs[0], -1, ctx.produce(call.name, "out", module.output_size, dim=-1))

    def prune(self, module, keep):
        if "out" in keep:
            replace_param(module, "weight", 1, keep["out"])
            module.output_size = keep["out"].numel()
        if "in" in keep:
            replace_param(module, "weight", 2, keep["in"])
            module.input_size = keep["in"].numel()

    def weight_energy(self, module, slice_name):
        w = module.weight.detach().float().square()
        return w.sum((0, 2)) if slice_name == "out" else w.sum((0, 1))
