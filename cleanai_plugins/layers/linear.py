"""nn.Linear (and subclasses such as ``NonDynamicallyQuantizableLinear``) and nn.Bilinear.

Compensation folds removed input channels into the layer: their mean into the bias,
their least-squares prediction from the kept channels into the kept columns. A layer
that has no bias gets one, unless a plugin filed it under the model finding
:data:`NO_NEW_BIAS` (``cleanai_prepare_model``): a layer whose saved form cannot hold a
bias (a Hugging Face config with no switch for it, so ``from_pretrained`` would rebuild
it without). Such a layer keeps the least-squares fold into its kept columns and drops
the constant part (mean compensation, the regression's intercept).
"""

from __future__ import annotations

from torch import nn

from cleanai_core import hookimpl
from cleanai_core.graph.context import Label
from cleanai_core.interfaces import (
    LayerPruner,
    add_at,
    add_to_bias,
    at_rows,
    replace_param,
    runs_own_forward,
    settings_mismatch,
    shape_of,
    squared_weight,
)

__all__ = ["NO_NEW_BIAS", "BilinearPruner", "LinearPruner", "no_new_bias"]

#: model findings key: modules (a set, joined across plugins) that compensation must not give a bias
NO_NEW_BIAS = "no_new_bias"


def no_new_bias(*modules) -> dict[str, set]:
    """The findings that keep compensation from creating a bias in each of ``modules``:
    return it from ``cleanai_prepare_model``."""
    return {NO_NEW_BIAS: set(modules)}


class LinearPruner(LayerPruner):
    """Slices ``"in"`` (columns, read on the last input dim) and ``"out"`` (rows).

    ``new_bias=False``: compensation never creates a bias (:data:`NO_NEW_BIAS`)."""

    name = "linear"
    new_bias: bool = True

    def __init__(self, new_bias: bool = True) -> None:
        self.new_bias = new_bias

    def _may_add_bias(self, module) -> bool:
        return self.new_bias or module.bias is not None

    def trace(self, module, call, ctx):
        """Columns read the last input dimension, rows label the output's last one.

        Channels on another dimension pass through: the layer acts on each of their
        indices alone (a token-mixing MLP, ``fc(x.transpose(1, 2))`` with the channels on
        dim 1). They keep the output's label and the rows become its second labelled
        dimension (:meth:`~cleanai_core.graph.context.TraceContext.second_label`), which
        a following linear layer reads as its columns: the token MLP's hidden units prune
        too. A second labelled dimension of the input that is not the last passes through
        the same way."""
        x = call.args[0] if call.args else call.kwargs.get("input")
        lab = ctx.label_of(x)
        last = x.ndim - 1 if lab is not None else -1
        if lab is not None and lab.dim != last:  # channels elsewhere: they pass through
            through, own = lab, lab.cross if lab.cross is not None and lab.cross[0] == last else None
            atoms_in = ctx.take_cross(lab) if own is not None else ctx.labels_elsewhere(x, last)
        else:
            through = lab if lab is not None and lab.cross is not None else None
            atoms_in = ctx.labels(x, -1)
        ctx.bind(call.name, "in", atoms_in, "in", arg=0, dim=-1)
        atoms_out = ctx.produce(call.name, "out", module.out_features, dim=-1)
        outs = call.outputs
        fits = len(outs) == 1 and bool(outs[0].shape) and outs[0].shape[-1] == module.out_features
        if not fits:
            # a subclass whose forward does more (PhiMoE's router picks experts from its
            # logits inside and returns the picks): its rows are not free to go
            ctx.freeze(atoms_out, f"{call.name} ({type(module).__name__}) returns more than its linear output")
        if fits and through is not None and through.dim != last and len(outs[0].shape) == x.ndim:
            second = ctx.second_label(last, atoms_out, f"the output of {call.name}")
            ctx.set_label(outs[0], through.dim, through.atoms, through.origin, second)
        elif fits and (through is None or through.dim == last):
            cross = through.cross if through is not None and through.cross[0] != last else None
            ctx.set_label(outs[0], -1, atoms_out, cross=cross)
        elif fits:
            ctx.set_label(outs[0], -1, atoms_out)
            ctx.freeze(through.atoms, f"{call.name} ({type(module).__name__}) changes the rank of its input")
        elif through is not None and through.dim != last:
            ctx.freeze(through.atoms, f"{call.name} ({type(module).__name__}) returns more than its linear output")

    def trace_param(self, module, name, param, ctx):
        """``F.linear(x, module.weight, bias)`` outside the module (timm's EVA, BEiT and
        Swin-V2 attention, with a bias built from ``q_bias`` / ``v_bias``): rows are the
        module's ``"out"`` channels, columns its ``"in"`` channels, which the matrix
        product couples with ``x``; a bias follows the rows. A subclass that couples more
        in ``trace`` must say so here too, else the tensor stays frozen."""
        if type(self).trace is not LinearPruner.trace and type(self).trace_param is LinearPruner.trace_param:
            return None
        if param == "bias" and module.bias is not None and module.bias.ndim == 1:
            return Label(0, ctx.produce(name, "out", module.out_features, dim=-1))
        if param != "weight" or module.weight.ndim != 2:
            return None
        atoms_out = ctx.produce(name, "out", module.out_features, dim=-1)
        atoms_in = ctx.new_atoms(module.in_features)
        ctx.bind(name, "in", atoms_in, "in", arg=0, dim=-1)
        return Label(0, atoms_out, cross=(1, ctx.slices[(name, "in")].atoms))

    def prune(self, module, keep):
        if "out" in keep:
            replace_param(module, "weight", 0, keep["out"])
            replace_param(module, "bias", 0, keep["out"])
            module.out_features = keep["out"].numel()
        if "in" in keep:
            replace_param(module, "weight", 1, keep["in"])
            module.in_features = keep["in"].numel()

    def settings_problem(self, module):
        w = shape_of(module, "weight")
        if w is None or len(w) != 2:
            return None
        expected = {"in_features": w[1], "out_features": w[0]}
        return settings_mismatch(module, expected, f"its weight of shape {w}")

    def weight_energy(self, module, slice_name):
        rows, cols = squared_weight(module.weight)
        return rows if slice_name == "out" else cols

    def compensate(self, module, slice_name, removed, mean):
        if slice_name != "in" or not self._may_add_bias(module):
            return False
        w = module.weight.detach()
        add_to_bias(module, w[:, removed] @ mean.to(w.dtype))
        return True

    def reconstruct(self, module, slice_name, removed, kept, coef, shift):
        if slice_name != "in":
            return False
        w = module.weight.detach()
        w_removed = w.index_select(1, removed)
        w.index_add_(1, kept, w_removed @ coef.to(w.dtype))
        if self._may_add_bias(module):
            add_to_bias(module, w_removed @ shift.to(w.dtype))
        return True

    def removed_weights(self, module, slice_name, removed, keep):
        if slice_name != "in":
            return None
        w = module.weight.detach()
        rows = keep.get("out")
        return (w if rows is None else w.index_select(0, rows)).index_select(1, removed)

    def add_reconstruction(self, module, slice_name, kept, keep, delta, bias):
        w = module.weight.detach()
        rows = keep.get("out")
        if rows is None:
            w.index_add_(1, kept, delta.to(w.dtype))
        else:
            add_at(w, rows, kept, delta.to(w.dtype))
        if self._may_add_bias(module):
            add_to_bias(module, at_rows(bias.to(w.dtype), rows, w.shape[0]))


class BilinearPruner(LayerPruner):
    """``nn.Bilinear`` (``y_k = x1 W_k x2 + b_k``, weight ``(out, in1, in2)``): slices
    ``"in1"`` and ``"in2"`` (the last dim of each input) and ``"out"``. A removed input
    channel's term depends on the other input, so no compensation folds it."""

    name = "bilinear"

    def trace(self, module, call, ctx):
        x1 = call.args[0] if call.args else call.kwargs.get("input1")
        x2 = call.args[1] if len(call.args) > 1 else call.kwargs.get("input2")
        ctx.bind(call.name, "in1", ctx.labels(x1, -1), "in", arg=0, dim=-1)
        ctx.bind(call.name, "in2", ctx.labels(x2, -1), "in", arg=1, dim=-1)
        ctx.set_label(call.outputs[0], -1, ctx.produce(call.name, "out", module.out_features, dim=-1))

    def prune(self, module, keep):
        for name, dim, attr in (("out", 0, "out_features"), ("in1", 1, "in1_features"), ("in2", 2, "in2_features")):
            if name in keep:
                replace_param(module, "weight", dim, keep[name])
                if dim == 0:
                    replace_param(module, "bias", 0, keep[name])
                setattr(module, attr, keep[name].numel())

    def settings_problem(self, module):
        w = shape_of(module, "weight")
        if w is None or len(w) != 3:
            return None
        expected = {"out_features": w[0], "in1_features": w[1], "in2_features": w[2]}
        return settings_mismatch(module, expected, f"its weight of shape {w}")

    def weight_energy(self, module, slice_name):
        dim = {"out": 0, "in1": 1, "in2": 2}[slice_name]
        w = module.weight.detach().float().square()
        return w.sum([d for d in range(3) if d != dim])


@hookimpl(trylast=True)
def cleanai_layer_pruner(module, findings=None):
    if isinstance(module, (nn.Linear, nn.Bilinear)) and runs_own_forward(module):
        return None
    if isinstance(module, nn.Linear) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return LinearPruner(new_bias=module not in (findings or {}).get(NO_NEW_BIAS, ()))
    if isinstance(module, nn.Bilinear) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return BilinearPruner()
    return None
