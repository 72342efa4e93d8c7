"""Experts stored flat, one ``(experts * inter, hidden)`` tensor per projection (DBRX's
``DbrxExperts``: its ``mlp`` holds ``w1`` (gate), ``v1`` (up) and ``w2`` (down, read
transposed), each viewed as ``(-1, ffn_hidden_size, hidden_size)`` and indexed by the
expert a token was routed to).

Traced, the view by the stored ``ffn_hidden_size``, the per-expert select of a bare
parameter and the ``index_add_`` of the tokens froze every channel (DBRX: "nothing in this
model can be pruned"). Claimed as one composite, like the 3-D experts
(:mod:`.experts`): ``"hidden_in"`` (``w1`` / ``v1`` columns, read on the input's last dim),
``"hidden_out"`` (``w2`` columns: the output's channels) and one ``"inter.<e>"`` per expert
(its rows of ``w1``, ``v1`` and ``w2``). Every expert keeps the same count
(``same_count``: the view needs one ``ffn_hidden_size``), which the fix-up writes on the
module and its ``mlp``. The router (a separate module) is untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from cleanai_core.interfaces import LayerPruner
from cleanai_plugins.zoo.transformers.experts import kept_units

__all__ = ["FlatExpertsPruner", "flat_expert_width", "is_flat_experts"]

_PARTS = ("w1", "v1", "w2")  # gate, up, down: each (experts * inter, hidden)


def _layout(module: nn.Module) -> tuple[int, int, int] | None:
    """``(experts, hidden, inter)`` of a flat experts module, else None."""
    mlp = getattr(module, "mlp", None)
    experts, inter = getattr(module, "num_experts", None), getattr(module, "ffn_hidden_size", None)
    if not isinstance(mlp, nn.Module) or not isinstance(experts, int) or not isinstance(inter, int) or experts <= 0:
        return None
    tensors = [getattr(mlp, p, None) for p in _PARTS]
    if not all(isinstance(t, nn.Parameter) and t.ndim == 2 for t in tensors):
        return None
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or next(iter(shapes))[0] != experts * inter:
        return None
    return experts, tensors[0].shape[1], inter


def is_flat_experts(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.") and _layout(module) is not None


def flat_expert_width(module: nn.Module) -> int | None:
    """Each expert's MLP width, for the config (None: not a flat experts module)."""
    layout = _layout(module) if is_flat_experts(module) else None
    return None if layout is None else layout[2]


def _rows(keep: list[torch.Tensor], inter: int) -> torch.Tensor:
    """The flat rows of every expert's kept units, expert by expert."""
    return torch.cat([e * inter + k for e, k in enumerate(keep)])


class FlatExpertsPruner(LayerPruner):
    name = "transformers_flat_experts"

    def trace(self, module, call, ctx):
        x = call.args[0] if call.args else call.kwargs.get("hidden_states")
        experts, hidden, inter = _layout(module)
        ctx.bind(call.name, "hidden_in", ctx.labels(x, -1), "in", arg=0, dim=-1)
        for ref in (*call.args[1:], *call.kwargs.values()):
            ctx.label_of(ref)  # routing indices and weights carry no channels
        for e in range(experts):
            if (call.name, f"inter.{e}") not in ctx.slices:
                ctx.bind(call.name, f"inter.{e}", ctx.new_atoms(inter), "param", same_count=call.name)
        ctx.set_label(call.outputs[0], -1, ctx.produce(call.name, "hidden_out", hidden, dim=-1))

    def prune(self, module, keep):
        experts, hidden, inter = _layout(module)
        mlp = module.mlp
        data = {p: getattr(mlp, p).data for p in _PARTS}
        if "hidden_in" in keep:
            data["w1"], data["v1"] = (data[p].index_select(1, keep["hidden_in"]) for p in ("w1", "v1"))
        if "hidden_out" in keep:
            data["w2"] = data["w2"].index_select(1, keep["hidden_out"])
        kept = kept_units(module, keep, experts, inter, "flat")
        if any(f"inter.{e}" in keep for e in range(experts)):
            rows = _rows(kept, inter)
            data = {p: w.index_select(0, rows) for p, w in data.items()}
        for p, w in data.items():
            setattr(mlp, p, nn.Parameter(w.contiguous(), requires_grad=getattr(mlp, p).requires_grad))
        for holder in (module, mlp):
            for attr, value in (("ffn_hidden_size", kept[0].numel()), ("hidden_size", data["w2"].shape[1])):
                if isinstance(getattr(holder, attr, None), int):
                    setattr(holder, attr, value)

    def mask(self, module, slice_name, idx):
        """Zero, in the masking oracle's copy, every weight that reads or writes ``idx``."""
        _, _, inter = _layout(module)
        mlp = module.mlp
        if slice_name == "hidden_in":
            for p in ("w1", "v1"):
                getattr(mlp, p).data.index_fill_(1, idx, 0)
        elif slice_name == "hidden_out":
            mlp.w2.data.index_fill_(1, idx, 0)
        else:
            rows = int(slice_name.split(".")[1]) * inter + idx
            for p in _PARTS:
                getattr(mlp, p).data.index_fill_(0, rows, 0)
        return True

    def weight_energy(self, module, slice_name):
        experts, hidden, inter = _layout(module)
        energy = {p: getattr(module.mlp, p).detach().float() ** 2 for p in _PARTS}
        if slice_name == "hidden_in":
            return (energy["w1"] + energy["v1"]).sum(0)
        if slice_name == "hidden_out":
            return energy["w2"].sum(0)
        e = int(slice_name.split(".")[1])
        return sum(w[e * inter : (e + 1) * inter].sum(1) for w in energy.values())
