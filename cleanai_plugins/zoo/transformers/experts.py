"""Mixture-of-experts MLPs stored as 3-D tensors (transformers' ``MixtralExperts`` and
its copies, GPT-OSS's): one ``gate_up_proj`` (Nemotron-H's experts, without a gate: one
``up_proj``) and one ``down_proj`` for all experts, run per expert or through
``torch._grouped_mm``.

The layout is what transformers' ``use_experts_implementation`` decorator writes on the
module: ``is_transposed`` (GPT-OSS: ``gate_up_proj`` ``(experts, hidden, 2 * inter)``,
``down_proj`` ``(experts, inter, hidden)``; else ``(experts, 2 * inter, hidden)`` and
``(experts, hidden, inter)``; where the module does not say, the shapes do: Llama 4's
``Llama4TextExperts``, transposed, run through ``bmm``), ``is_concatenated`` (the gate and up halves one after the
other; else interleaved, gate ``0::2`` and up ``1::2``), and ``has_bias``
(``gate_up_proj_bias`` ``(experts, 2 * inter)``, ``down_proj_bias`` ``(experts, hidden)``).

Claimed as one composite. Slices: ``"hidden_in"`` (``gate_up_proj``'s hidden dimension,
read on the input's last dim), ``"hidden_out"`` (``down_proj``'s hidden dimension and its
bias: the output's channels) and one ``"inter.<e>"`` per expert: each expert's MLP width
prunes on its own units (its own gate/up pair and down rows). The tensors stay 3-D, so
every expert must keep the same number of units: the slices say so (``same_count``), and
the plan gives every expert of a module the same count (global ranking, per-group ratios,
verification's skips included); a plan that does not is refused when slicing. The
router (a separate module) is untouched: no expert is removed.
"""

from __future__ import annotations

import torch
from torch import nn

from cleanai_core.interfaces import LayerPruner

__all__ = ["ExpertsPruner", "expert_hidden", "expert_width", "is_experts", "kept_units"]


def _up(module: nn.Module) -> tuple[str, int]:
    """The first projection's attribute and how many parts of the MLP width it stacks:
    ``("gate_up_proj", 2)``, or ``("up_proj", 1)`` for experts without a gate (Nemotron-H)."""
    return ("gate_up_proj", 2) if isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) else ("up_proj", 1)


def _up_names(module: nn.Module) -> list[str]:
    """The tensors that read the hidden size: the first projection, and a separate gate of
    the same shape beside a gate-less ``up_proj`` (Inkling's shared experts: ``gate_proj``
    and ``up_proj``, both ``(experts, inter, hidden)``), which prunes with it."""
    name, stacks = _up(module)
    gate = getattr(module, "gate_proj", None)
    if stacks == 1 and isinstance(gate, nn.Parameter) and gate.shape == getattr(module, name).shape:
        return [name, "gate_proj"]
    return [name]


def _layout(module: nn.Module) -> tuple[int, int, int, int] | None:
    """``(experts, hidden, inter, transposed)`` of a 3-D experts module, else None."""
    name, stacks = _up(module)
    gate_up, down = getattr(module, name, None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return None
    if gate_up.ndim != 3 or down.ndim != 3 or gate_up.shape[0] != down.shape[0]:
        return None
    declared = getattr(module, "is_transposed", None)
    for t in (int(declared is True),) if declared is not None else (0, 1):  # undeclared: the shapes tell
        inter, hidden = (down.shape[1], down.shape[2]) if t else (down.shape[2], down.shape[1])
        if gate_up.shape[1 + t] == stacks * inter and gate_up.shape[2 - t] == hidden:
            return down.shape[0], hidden, inter, t
    return None


def is_experts(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.") and _layout(module) is not None


def expert_width(module: nn.Module) -> int | None:
    """Each expert's MLP width, for the config (None: not a 3-D experts module)."""
    layout = _layout(module)
    return None if layout is None else layout[2]


def expert_hidden(module: nn.Module) -> int | None:
    """The hidden size the experts read and write (None: not a 3-D experts module)."""
    layout = _layout(module)
    return None if layout is None else layout[1]


def _pairs(module: nn.Module, keep: torch.Tensor, inter: int) -> torch.Tensor:
    """The gate/up positions of the units ``keep``, in the module's order."""
    if _up(module)[1] == 1:  # no gate: one row per unit
        return keep
    if getattr(module, "is_concatenated", True) is False:  # interleaved: gate 2k, up 2k + 1
        return torch.stack([2 * keep, 2 * keep + 1], 1).reshape(-1)
    return torch.cat([keep, keep + inter])


def _set(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    old = getattr(module, attr)
    setattr(module, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _bias(module: nn.Module, attr: str) -> torch.Tensor | None:
    b = getattr(module, attr, None)
    return b if isinstance(b, nn.Parameter) and b.ndim == 2 else None


def _row_multiple(module: nn.Module) -> int:
    """Rows a kept width must be a multiple of: torch's grouped matmul (transformers' default
    experts path) needs every row stride, of the weights and of the tokens, a multiple of 16
    bytes, in the dtype the model runs in and in the one its config declares (a bfloat16
    checkpoint that the job computes in float32 and writes back in bfloat16: a width of 20
    made every reloaded model fail, ``strides should be multiple of 16 bytes``)."""
    size = module.down_proj.element_size()
    declared = getattr(getattr(module, "config", None), "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    if isinstance(declared, torch.dtype) and declared.is_floating_point:
        size = min(size, declared.itemsize)
    return max(1, 16 // size)


def kept_units(module: nn.Module, keep: dict, experts: int, inter: int, layout: str) -> list[torch.Tensor]:
    """Each expert's kept units (all where ``keep`` has none for it); one count for all, as
    tensors holding every expert need (``layout`` names them in the error)."""
    kept = [keep.get(f"inter.{e}", torch.arange(inter)) for e in range(experts)]
    if len({k.numel() for k in kept}) > 1:
        raise ValueError(
            f"{type(module).__name__}: experts would keep {[k.numel() for k in kept]} units; the {layout} expert "
            "tensors need one count for all (use the uniform plan: global_pruning=False)"
        )
    return kept


class ExpertsPruner(LayerPruner):
    name = "transformers_experts"

    def trace(self, module, call, ctx):
        x = call.args[0] if call.args else call.kwargs.get("hidden_states")
        experts, hidden, inter, _ = _layout(module)
        multiple = _row_multiple(module)
        ctx.bind(call.name, "hidden_in", ctx.labels(x, -1), "in", arg=0, dim=-1, multiple=multiple)
        for ref in (*call.args[1:], *call.kwargs.values()):
            ctx.label_of(ref)  # routing indices and weights carry no channels
        for e in range(experts):
            if (call.name, f"inter.{e}") not in ctx.slices:
                atoms = ctx.new_atoms(inter)
                ctx.bind(call.name, f"inter.{e}", atoms, "param", multiple=multiple, same_count=call.name)
        atoms = ctx.produce(call.name, "hidden_out", hidden, dim=-1, multiple=multiple)
        ctx.set_label(call.outputs[0], -1, atoms)

    def prune(self, module, keep):
        experts, hidden, inter, t = _layout(module)
        ups = {name: getattr(module, name).data for name in _up_names(module)}
        down = module.down_proj.data
        up_bias, down_bias = _bias(module, "gate_up_proj_bias"), _bias(module, "down_proj_bias")
        if "hidden_in" in keep:
            ups = {name: w.index_select(2 - t, keep["hidden_in"]) for name, w in ups.items()}
        if "hidden_out" in keep:
            down = down.index_select(1 + t, keep["hidden_out"])
            if down_bias is not None:
                _set(module, "down_proj_bias", down_bias.data[:, keep["hidden_out"]])
        kept = kept_units(module, keep, experts, inter, "3-D")
        if any(f"inter.{e}" in keep for e in range(experts)):
            pairs = [_pairs(module, k, inter) for k in kept]
            ups = {name: torch.stack([w[e].index_select(t, p) for e, p in enumerate(pairs)]) for name, w in ups.items()}
            down = torch.stack([down[e].index_select(1 - t, k) for e, k in enumerate(kept)])
            if up_bias is not None:
                _set(module, "gate_up_proj_bias", torch.stack([up_bias.data[e][p] for e, p in enumerate(pairs)]))
        for name, w in ups.items():
            _set(module, name, w)
        _set(module, "down_proj", down)
        _, hidden, inter, _ = _layout(module)
        for attr, value in (("intermediate_dim", inter), ("intermediate_size", inter), ("hidden_dim", hidden),
                            ("hidden_size", hidden)):  # fmt: skip
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, value)

    def mask(self, module, slice_name, idx):
        """Zero, in the masking oracle's copy, every weight (and bias) that reads or writes ``idx``."""
        _, _, inter, t = _layout(module)
        up_bias, down_bias = _bias(module, "gate_up_proj_bias"), _bias(module, "down_proj_bias")
        ups = [getattr(module, name) for name in _up_names(module)]
        if slice_name == "hidden_in":
            for w in ups:
                w.data.index_fill_(2 - t, idx, 0)
        elif slice_name == "hidden_out":
            module.down_proj.data.index_fill_(1 + t, idx, 0)
            if down_bias is not None:
                down_bias.data[:, idx] = 0
        else:
            e, pairs = int(slice_name.split(".")[1]), _pairs(module, idx, inter)
            for w in ups:
                w.data[e].index_fill_(t, pairs, 0)
            module.down_proj.data[e].index_fill_(1 - t, idx, 0)
            if up_bias is not None:
                up_bias.data[e, pairs] = 0
        return True

    def weight_energy(self, module, slice_name):
        _, _, inter, t = _layout(module)
        stacks = _up(module)[1]
        gate_up = sum(getattr(module, name).detach().float() ** 2 for name in _up_names(module))
        down = module.down_proj.detach().float() ** 2
        if t:  # to the (experts, 2 * inter, hidden) and (experts, hidden, inter) layout
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        if slice_name == "hidden_in":
            return gate_up.sum((0, 1))
        if slice_name == "hidden_out":
            return down.sum((0, 2))
        e = int(slice_name.split(".")[1])
        rows = gate_up[e].sum(1)
        if stacks == 1:
            pair = rows
        elif getattr(module, "is_concatenated", True) is False:
            pair = rows.reshape(inter, 2).sum(1)
        else:
            pair = rows.reshape(2, inter).sum(0)
        return pair + down[e].sum(0)
