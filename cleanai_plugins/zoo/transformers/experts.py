"""Mixture-of-experts MLPs stored as 3-D tensors (transformers' ``MixtralExperts`` and
its copies): ``gate_up_proj`` ``(experts, 2 * inter, hidden)`` and ``down_proj``
``(experts, hidden, inter)``, run per expert or through ``torch._grouped_mm``.

Claimed as one composite. Slices: ``"hidden_in"`` (the columns of ``gate_up_proj``, read
on the input's last dim), ``"hidden_out"`` (the rows of ``down_proj``, the output's
channels) and one ``"inter.<e>"`` per expert: each expert's MLP width prunes on its own
units (its own gate/up rows and down columns). The tensors stay 3-D, so every expert
must keep the same number of units: the uniform plan gives that (every expert's group
has the same size); a plan that does not is refused when slicing. The router (a
separate module) is untouched: no expert is removed.
"""

from __future__ import annotations

import torch
from torch import nn

from cleanai_core.interfaces import LayerPruner

__all__ = ["ExpertsPruner", "is_experts"]


def is_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        type(module).__module__.startswith("transformers.")
        and isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.ndim == 3
        and down.ndim == 3
        and gate_up.shape[0] == down.shape[0]
        and gate_up.shape[1] == 2 * down.shape[2]
        and gate_up.shape[2] == down.shape[1]
    )


def _set(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    old = getattr(module, attr)
    setattr(module, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


class ExpertsPruner(LayerPruner):
    name = "transformers_experts"

    def trace(self, module, call, ctx):
        x = call.args[0] if call.args else call.kwargs.get("hidden_states")
        experts, hidden, inter = module.down_proj.shape
        # torch's grouped matmul (transformers' default experts path) needs every row
        # stride, of the weights and of the tokens, a multiple of 16 bytes
        multiple = max(1, 16 // module.down_proj.element_size())
        ctx.bind(call.name, "hidden_in", ctx.labels(x, -1), "in", arg=0, dim=-1, multiple=multiple)
        for ref in (*call.args[1:], *call.kwargs.values()):
            ctx.label_of(ref)  # routing indices and weights carry no channels
        for e in range(experts):
            if (call.name, f"inter.{e}") not in ctx.slices:
                ctx.bind(call.name, f"inter.{e}", ctx.new_atoms(inter), "param", multiple=multiple)
        atoms = ctx.produce(call.name, "hidden_out", hidden, dim=-1, multiple=multiple)
        ctx.set_label(call.outputs[0], -1, atoms)

    def prune(self, module, keep):
        gate_up, down = module.gate_up_proj.data, module.down_proj.data
        experts, _, inter = down.shape
        if "hidden_in" in keep:
            gate_up = gate_up[:, :, keep["hidden_in"]]
        if "hidden_out" in keep:
            down = down[:, keep["hidden_out"], :]
        kept = [keep.get(f"inter.{e}", torch.arange(inter)) for e in range(experts)]
        if len({k.numel() for k in kept}) > 1:
            raise ValueError(
                f"{type(module).__name__}: experts would keep {[k.numel() for k in kept]} units; the 3-D expert "
                "tensors need one count for all (use the uniform plan: global_pruning=False)"
            )
        if any(f"inter.{e}" in keep for e in range(experts)):
            gate_up = torch.stack([gate_up[e][torch.cat([k, k + inter])] for e, k in enumerate(kept)])
            down = torch.stack([down[e][:, k] for e, k in enumerate(kept)])
        _set(module, "gate_up_proj", gate_up)
        _set(module, "down_proj", down)
        if isinstance(getattr(module, "intermediate_dim", None), int):
            module.intermediate_dim = down.shape[2]
        if isinstance(getattr(module, "hidden_dim", None), int):
            module.hidden_dim = down.shape[1]

    def mask(self, module, slice_name, idx):
        """Zero, in the masking oracle's copy, every weight that reads or writes ``idx``."""
        inter = module.down_proj.shape[2]
        if slice_name == "hidden_in":
            module.gate_up_proj.data[:, :, idx] = 0
        elif slice_name == "hidden_out":
            module.down_proj.data[:, idx, :] = 0
        else:
            e = int(slice_name.split(".")[1])
            module.gate_up_proj.data[e, torch.cat([idx, idx + inter])] = 0
            module.down_proj.data[e, :, idx] = 0
        return True

    def weight_energy(self, module, slice_name):
        gate_up, down = module.gate_up_proj.detach().float() ** 2, module.down_proj.detach().float() ** 2
        if slice_name == "hidden_in":
            return gate_up.sum((0, 1))
        if slice_name == "hidden_out":
            return down.sum((0, 2))
        e, inter = int(slice_name.split(".")[1]), down.shape[2]
        return gate_up[e].reshape(2, inter, -1).sum((0, 2)) + down[e].sum(0)
