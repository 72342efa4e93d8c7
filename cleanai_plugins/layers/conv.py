"""Conv1d/2d/3d and ConvTranspose1d/2d/3d, plain, grouped and depthwise."""

from __future__ import annotations

import torch
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

__all__ = ["ConvPruner"]


def _channel_dim(module: nn.Module, ref) -> int:
    spatial = len(module.kernel_size)
    return 0 if ref.ndim == spatial + 1 else 1  # unbatched input


class ConvPruner(LayerPruner):
    """Slices ``"in"`` and ``"out"`` channels of a convolution.

    Grouped convolutions keep their group count: the j-th channel of every group is
    one unit. With ``whole_groups`` they keep their group width instead: a group (its
    input and its output channels) is one unit and ``groups`` follows the kept groups
    (a plugin claims such a conv where the layers around it keep whole groups, e.g. timm
    RegNetZ's EvoNorm-S). A depthwise convolution (``groups == in_channels``) passes its
    input channels through: its output channels are the input channels, so pruning one
    removes the filter too and ``groups`` follows.
    """

    name = "conv"
    whole_groups = False  # subclasses with an ``__init__`` of their own keep the default

    def __init__(self, whole_groups: bool = False) -> None:
        self.whole_groups = whole_groups

    def trace(self, module, call, ctx):
        """Input channels read ``cdim``, output channels label the output's ``cdim``.

        Channels on a spatial dimension that the conv maps position by position (kernel 1,
        stride 1, same size: CoaT's ``aggregate``, a ``Conv1d`` over the stacked class tokens
        of three scales with the channels along its length) pass through like a token-mixing
        linear layer's: they keep the output's label and the conv's own output channels
        become its second labelled dimension (frozen unless a consumer takes it)."""
        x = call.args[0]
        cdim = _channel_dim(module, x)
        cin, cout, g = module.in_channels, module.out_channels, module.groups
        lab = ctx.label_of(x)
        along = _along(module, call, lab.dim) if lab is not None and lab.dim != cdim else None
        through = lab if along is not None else None
        if along == "shift":  # ECA: a kernel slid along the channels sees new neighbours once some go
            ctx.normalize(lab.atoms)
        if through is None:
            atoms_in = ctx.labels(x, cdim)
        elif through.cross is not None and through.cross[0] == cdim:
            atoms_in = ctx.take_cross(through)
        else:
            atoms_in = ctx.labels_elsewhere(x, cdim)
        if g > 1 and g == cin:
            atoms_out = atoms_in.repeat_interleave(cout // cin)
            ctx.bind(call.name, "in", atoms_in, "in", arg=0, dim=cdim)
            ctx.bind(call.name, "out", atoms_out, "out", dim=cdim)
        else:
            whole = self.whole_groups or call.name in ctx.coarse
            keep_dim = 0 if whole else 1
            if g > 1:
                group_in = ctx.tie(atoms_in, (g, cin // g), keep_dim)
            ctx.bind(call.name, "in", atoms_in, "in", arg=0, dim=cdim)
            atoms_out = ctx.produce(call.name, "out", cout, dim=cdim)
            if g > 1:
                group_out = ctx.tie(atoms_out, (g, cout // g), keep_dim)
                if whole:  # group i's inputs feed its outputs only: they go together
                    ctx.union(group_in, group_out)
                if not self.whole_groups:
                    ctx.offer_coarser(call.name, atoms_in, atoms_out)
        if through is None:
            ctx.set_label(call.outputs[0], cdim, atoms_out)
        elif cout == 1:  # one output channel: nothing of it can go, and it carries no second label
            ctx.set_label(call.outputs[0], through.dim, through.atoms, through.origin)
        else:
            second = ctx.second_label(cdim, atoms_out, f"the output of {call.name}")
            ctx.set_label(call.outputs[0], through.dim, through.atoms, through.origin, second)

    def trace_param(self, module, name, param, ctx):
        """The weight or bias read outside the module (TridentNet's branches run one conv's
        weight at other dilations: ``F.conv2d(x, self.conv.weight, self.conv.bias,
        dilation=2)``): the weight's filter dim is the module's ``"out"`` channels, its
        other dim the ``"in"`` channels, which the convolution couples with its input; a
        bias follows the filters. A grouped or depthwise convolution's weight is labelled
        along its channel dimension only (dim 0: the filters, or a transposed conv's
        inputs): read where nothing needs its other dim (a parent clipping every weight in
        ``forward``, WGAN's critic), it follows the module; a functional convolution with
        it still freezes them (before 2026-12-02 any read froze the module's channels)."""
        if type(self).trace is not ConvPruner.trace:
            return None
        din, dout = (0, 1) if module.transposed else (1, 0)
        atoms_out = ctx.produce(name, "out", module.out_channels, dim=1)
        if param == "bias" and module.bias is not None:
            return Label(0, atoms_out)
        if param != "weight":
            return None
        if module.groups != 1:
            if not module.transposed:
                return Label(0, atoms_out)
            if (name, "in") not in ctx.slices:
                ctx.bind(name, "in", ctx.new_atoms(module.in_channels), "in", arg=0, dim=1)
            return Label(0, ctx.slices[(name, "in")].atoms)
        if (name, "in") not in ctx.slices:
            ctx.bind(name, "in", ctx.new_atoms(module.in_channels), "in", arg=0, dim=1)
        return Label(dout, atoms_out, cross=(din, ctx.slices[(name, "in")].atoms))

    def prune(self, module, keep):
        g, cin, cout, t = module.groups, module.in_channels, module.out_channels, module.transposed
        depthwise = g > 1 and g == cin
        if g > 1 and not depthwise and (self.whole_groups or _drops_whole_groups(keep, g, cin, cout)):
            _prune_groups(module, keep)
            return
        if "out" in keep:
            k = keep["out"]
            if not t:
                replace_param(module, "weight", 0, k)
            elif not depthwise:
                replace_param(module, "weight", 1, _within(k, g, cout))
            replace_param(module, "bias", 0, k)
            module.out_channels = k.numel()
        if "in" in keep:
            k = keep["in"]
            if t:
                replace_param(module, "weight", 0, k)
            elif not depthwise:
                replace_param(module, "weight", 1, _within(k, g, cin))
            if depthwise:
                module.groups = k.numel()
            module.in_channels = k.numel()

    def settings_problem(self, module):
        w, g = shape_of(module, "weight"), module.groups
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            return f"groups={g!r} is not a positive integer"
        if w is None or len(w) < 2:
            return None
        if w[0] % g:
            return f"groups={g} does not divide the {w[0]} rows of its weight of shape {w}"
        cin, cout = (w[0], w[1] * g) if module.transposed else (w[1] * g, w[0])
        expected = {"in_channels": cin, "out_channels": cout, "kernel_size": w[2:]}
        return settings_mismatch(module, expected, f"its weight of shape {w} with groups={g}")

    def weight_energy(self, module, slice_name):
        # weight: (out, in/g, *k), or (in, out/g, *k) when transposed
        rows, cols = squared_weight(module.weight, module.groups)
        return rows if (slice_name == "in") == module.transposed else cols

    def compensate(self, module, slice_name, removed, mean):
        if slice_name != "in" or module.transposed or module.groups != 1:
            return False
        w = module.weight.detach()
        add_to_bias(module, (w[:, removed].sum(dim=list(range(2, w.ndim))) * mean.to(w.dtype)).sum(1))
        return True

    def can_reconstruct(self, module, slice_name):
        # a grouped/depthwise input channel only feeds its own group: nothing to fold into
        return slice_name == "in" and not module.transposed and module.groups == 1

    def reconstruct(self, module, slice_name, removed, kept, coef, shift):
        if not self.can_reconstruct(module, slice_name):
            return False
        w = module.weight.detach()
        w_removed = w.index_select(1, removed)  # (out, removed, *k)
        w.index_add_(1, kept, torch.einsum("or...,rk->ok...", w_removed, coef.to(w.dtype)))
        add_to_bias(module, torch.einsum("or...,r->o", w_removed, shift.to(w.dtype)))
        return True

    def removed_weights(self, module, slice_name, removed, keep):
        if not self.can_reconstruct(module, slice_name):
            return None
        w = module.weight.detach()
        rows = keep.get("out")
        w = (w if rows is None else w.index_select(0, rows)).index_select(1, removed)  # (out, removed, *k)
        return w.movedim(1, -1).reshape(-1, removed.numel())  # a row per output and kernel position

    def add_reconstruction(self, module, slice_name, kept, keep, delta, bias):
        w = module.weight.detach()
        rows = keep.get("out")
        n = w.shape[0] if rows is None else rows.numel()
        delta = delta.to(w.dtype).reshape(n, *w.shape[2:], kept.numel()).movedim(-1, 1)  # (out, kept, *k)
        if rows is None:
            w.index_add_(1, kept, delta)
        else:
            add_at(w, rows, kept, delta)
        add_to_bias(module, at_rows(bias.to(w.dtype).reshape(n, -1).sum(1), rows, w.shape[0]))


def _prune_groups(module: nn.Module, keep) -> None:
    """Whole groups go: the weight's group-sized dimension (output rows, or input rows of
    a transposed conv) keeps the kept groups' rows, the other one is unchanged."""
    g, cin, cout = module.groups, module.in_channels, module.out_channels
    for name, k, c in (("out", keep.get("out"), cout), ("in", keep.get("in"), cin)):
        if k is None:
            continue
        if k.numel() % (c // g):
            raise ValueError(f"{name} channels {k.numel()} of a conv pruned by whole groups of {c // g}")
        groups = k.numel() // (c // g)
        if (name == "out") != module.transposed:
            replace_param(module, "weight", 0, k)
        if name == "out":
            replace_param(module, "bias", 0, k)
            module.out_channels = k.numel()
        else:
            module.in_channels = k.numel()
        module.groups = groups


def _drops_whole_groups(keep, g: int, cin: int, cout: int) -> bool:
    """Whether ``keep`` removes whole groups (the conv was traced with whole-group units,
    :meth:`~cleanai_core.graph.context.TraceContext.offer_coarser`): channel *j* of every
    group keeps a channel in every group, whole groups leave some group empty."""
    for name, c in (("out", cout), ("in", cin)):
        k = keep.get(name)
        if k is not None and _unique_groups(k, c // g) < g:
            return True
    return False


def _unique_groups(k: torch.Tensor, width: int) -> int:
    return int(torch.unique(torch.div(k, width, rounding_mode="floor")).numel())


def _along(module: nn.Module, call, dim: int) -> str | None:
    """How the conv maps spatial dimension ``dim`` of its input, where channels lie:
    ``"pointwise"`` position by position (kernel 1, stride 1, the size kept: exact),
    ``"shift"`` with one kernel of one input and one output channel slid over it at stride 1,
    the size kept (ECA's ``Conv1d(1, 1, k)`` across the channels: each channel's weight reads
    its neighbours, so the channels prune approximately, as a norm's do, left out of the
    masking oracle; they froze before and ECA models kept 0.44-0.55 of their parameters at a
    ratio of 0.5), else None (frozen: a wider conv also mixes its own channels)."""
    x, out = call.args[0], call.outputs[0]
    i = dim - (x.ndim - len(module.kernel_size))
    if i < 0 or not hasattr(out, "shape") or len(out.shape) != x.ndim:
        return None
    if module.stride[i] != 1 or out.shape[dim] != x.shape[dim]:
        return None
    if module.kernel_size[i] == 1:
        return "pointwise"
    single = module.in_channels == module.out_channels == 1
    return "shift" if single and module.padding_mode == "zeros" else None


def _within(k: torch.Tensor, g: int, c: int) -> torch.Tensor:
    """Kept indices inside one group (the same in every group) from global indices."""
    if g == 1:
        return k
    return k[: k.numel() // g] % (c // g)


@hookimpl(trylast=True)
def cleanai_layer_pruner(module):
    if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return None if runs_own_forward(module) else ConvPruner()
    return None
