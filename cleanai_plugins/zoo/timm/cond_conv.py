"""timm ``CondConv2d``: a convolution whose filters are a per-sample mix of expert filters.

``forward(x, routing_weights)`` mixes ``self.weight`` (``(num_experts, out * in / groups *
kh * kw)``, every expert's filters flattened) by the routing weights, views the mix as one
grouped filter bank over the batch and convolves with ``groups * B``. Left to the trace,
that convolution reads a weight made inside the module, which cannot shrink, so every
channel a CondConv reads or writes froze (efficientnet_cc_b0_4e and tf_efficientnet_cc
kept 0.50 of their parameters at a ratio of 0.5). Every expert's filter bank has the same
layout as a plain convolution's, so the module is claimed and sliced like one: dim 1 of the
viewed ``(experts, out, in / groups, kh, kw)`` weight follows the output channels, dim 2
the input channels (a depthwise one keeps one filter per channel and ``groups`` follows),
``bias`` ``(experts, out)`` the output channels. The routing weights carry no channels of
the module (one per expert): they are frozen where they come from.
"""

from __future__ import annotations

import torch
from torch import nn

from cleanai_plugins.layers.conv import ConvPruner, _within
from cleanai_plugins.zoo.timm.lookup import triggered_by

__all__ = ["CondConvPruner", "is_cond_conv", "scan_cond_convs"]


@triggered_by("num_experts")
def scan_cond_convs(modules: list[nn.Module]) -> set[nn.Module]:
    """The conditional convolutions among ``modules`` (claimed by :class:`CondConvPruner`)."""
    return {m for m in modules if is_cond_conv(m)}


def is_cond_conv(module: nn.Module) -> bool:
    """A timm-style conditional convolution with plain or depthwise groups (a grouped one,
    not claimed, stays frozen as before)."""
    weight, shape = getattr(module, "weight", None), getattr(module, "weight_shape", None)
    experts, groups = getattr(module, "num_experts", None), getattr(module, "groups", None)
    if not (isinstance(weight, nn.Parameter) and weight.ndim == 2 and isinstance(shape, tuple)):
        return False
    if not (isinstance(experts, int) and weight.shape[0] == experts and isinstance(groups, int)):
        return False
    cin, cout = getattr(module, "in_channels", None), getattr(module, "out_channels", None)
    if not (isinstance(cin, int) and isinstance(cout, int) and len(shape) == 4 and weight.shape[1] == _numel(shape)):
        return False
    return groups == 1 or groups == cin


def _numel(shape) -> int:
    n = 1
    for v in shape:
        n *= v
    return n


class CondConvPruner(ConvPruner):
    """Slices every expert's filters of a ``CondConv2d`` as a plain or depthwise conv's."""

    name = "condconv"

    def trace(self, module, call, ctx):
        super().trace(module, call, ctx)
        if len(call.args) > 1:
            ctx.freeze_tensor(call.args[1], f"the routing weights of {call.name} (one per expert)")

    def trace_param(self, module, name, param, ctx):
        return None

    def _experts(self, module: nn.Module) -> torch.Tensor:
        cin, g = module.in_channels, module.groups
        return module.weight.detach().view(module.num_experts, module.out_channels, cin // g, *module.kernel_size)

    def prune(self, module, keep):
        g, cin = module.groups, module.in_channels
        depthwise = g > 1 and g == cin
        w = self._experts(module)
        if "out" in keep:
            w = w.index_select(1, keep["out"])
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().index_select(1, keep["out"]).contiguous())
            module.out_channels = keep["out"].numel()
        if "in" in keep:
            if depthwise:
                module.groups = keep["in"].numel()
            else:
                w = w.index_select(2, _within(keep["in"], g, cin))
            module.in_channels = keep["in"].numel()
        requires_grad = module.weight.requires_grad
        module.weight = nn.Parameter(w.reshape(w.shape[0], -1).contiguous(), requires_grad=requires_grad)
        module.weight_shape = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        if module.bias is not None:
            module.bias_shape = (module.out_channels,)

    def settings_problem(self, module):
        n = module.weight.shape[1] if module.weight.ndim == 2 else None
        filters = (module.out_channels, module.in_channels // module.groups)
        if n != _numel((*filters, *module.kernel_size)) or tuple(module.weight_shape[:2]) != filters:
            return (
                f"in_channels={module.in_channels}, out_channels={module.out_channels}, groups={module.groups} "
                f"do not fit its expert weights of shape {tuple(module.weight.shape)}"
            )
        return None

    def weight_energy(self, module, slice_name):
        w = self._experts(module).float()
        per = w.square().sum(dim=(0, *range(3, w.ndim)))  # (out, in / groups)
        if slice_name == "out":
            return per.sum(1)
        if module.groups > 1:  # depthwise: one input channel per filter
            return per.reshape(-1)
        return per.sum(0)

    def compensate(self, module, slice_name, removed, mean):
        return False

    def can_reconstruct(self, module, slice_name):
        return False
