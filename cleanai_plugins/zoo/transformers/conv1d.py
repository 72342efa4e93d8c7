"""transformers' ``Conv1D`` (GPT-2, GPT, DistilGPT-2...): a linear layer with its weight
stored transposed, ``(in, out)``, computing ``addmm(bias, x, weight)``."""

from __future__ import annotations

from cleanai_core.interfaces import LayerPruner, add_at, add_to_bias, at_rows, slice_params, squared_weight

__all__ = ["Conv1DPruner"]

_TENSORS = {"out": [("weight", 1), ("bias", 0)], "in": [("weight", 0)]}


class Conv1DPruner(LayerPruner):
    """Slices ``"in"`` (weight rows, read on the last input dim) and ``"out"`` (weight
    columns and bias)."""

    name = "transformers_conv1d"

    def trace(self, module, call, ctx):
        x = call.args[0] if call.args else call.kwargs.get("x")
        ctx.bind(call.name, "in", ctx.labels(x, -1), "in", arg=0, dim=-1)
        atoms_out = ctx.produce(call.name, "out", module.weight.shape[1], dim=-1)
        ctx.set_label(call.outputs[0], -1, atoms_out)

    def prune(self, module, keep):
        slice_params(module, keep, _TENSORS)
        module.nx, module.nf = module.weight.shape

    def weight_energy(self, module, slice_name):
        rows, cols = squared_weight(module.weight)
        return cols if slice_name == "out" else rows

    def compensate(self, module, slice_name, removed, mean):
        if slice_name != "in":
            return False
        w = module.weight.detach()
        add_to_bias(module, mean.to(w.dtype) @ w[removed])
        return True

    def reconstruct(self, module, slice_name, removed, kept, coef, shift):
        if slice_name != "in":
            return False
        w = module.weight.detach()
        w_removed = w[removed]  # (removed, out)
        w[kept] += coef.to(w.dtype).T @ w_removed
        add_to_bias(module, shift.to(w.dtype) @ w_removed)
        return True

    def removed_weights(self, module, slice_name, removed, keep):
        if slice_name != "in":
            return None
        w = module.weight.detach().index_select(0, removed)  # (removed, out)
        rows = keep.get("out")
        return (w if rows is None else w.index_select(1, rows)).T

    def add_reconstruction(self, module, slice_name, kept, keep, delta, bias):
        w = module.weight.detach()
        rows = keep.get("out")
        if rows is None:
            w.index_add_(0, kept, delta.to(w.dtype).T)
        else:
            add_at(w, kept, rows, delta.to(w.dtype).T)
        add_to_bias(module, at_rows(bias.to(w.dtype), rows, w.shape[1]))
