"""timm ``LambdaLayer`` (LambdaNetworks: lambda_resnet*), claimed as one composite module.

Its ``forward`` splits ``qkv(x)`` into ``[heads * dim_qk, dim_qk, dim_v]`` (unequal parts),
forms the content lambda ``k @ v`` (keys and values both carry channels: a product the
graph cannot label) and the position lambda with ``conv_lambda`` slid along the values
(or a ``pos_emb`` table), and reshapes ``(B, heads, M, dim_v)`` to the input width ``C``.
Traced op by op, each of these froze the layer and the stream around it (lambda_resnet26t
kept 0.39 of its parameters at a ratio of 0.5). Claimed whole, its units are plain:

- ``"qk"`` (a param slice, one atom per key channel ``j``): query channel ``j`` of every
  head, key channel ``j``, ``norm_q`` at those channels, ``conv_lambda``'s filter ``j`` or
  ``pos_emb[..., j]``. Both lambdas contract the key channels with the query's, so removing
  ``j`` equals zeroing the query there (the oracle's mask: ``norm_q``'s affine at ``j``).
- ``"v"`` (a param slice, one atom per value channel ``j``): value channel ``j``, ``norm_v``
  there; the output channels ``h * dim_v + j`` of every head (``"out"``) go with it, and so
  do the input channels ``h * dim_v + j`` (``"in"``), as ``forward`` reshapes the output to
  the input width (``C == heads * dim_v`` holds after slicing).

``dim_qk`` and ``dim_v`` follow (``fix_lambda_layer`` reads them back from the norms).
"""

from __future__ import annotations

import torch
from torch import nn

from cleanai_core.interfaces import LayerPruner, replace_param
from cleanai_plugins.zoo.timm.lookup import triggered_by

__all__ = ["LambdaLayerPruner", "is_lambda_layer", "scan_lambda_layers"]


@triggered_by("dim_qk")
def scan_lambda_layers(modules: list[nn.Module]) -> set[nn.Module]:
    """The lambda layers among ``modules`` (claimed by :class:`LambdaLayerPruner`)."""
    return {m for m in modules if is_lambda_layer(m)}


def is_lambda_layer(module: nn.Module) -> bool:
    """A timm-style ``LambdaLayer`` whose output width is its input width."""
    heads, dqk, dv = (getattr(module, a, None) for a in ("num_heads", "dim_qk", "dim_v"))
    qkv, nq, nv = (getattr(module, a, None) for a in ("qkv", "norm_q", "norm_v"))
    if not all(isinstance(v, int) for v in (heads, dqk, dv)) or not isinstance(qkv, nn.Conv2d) or qkv.groups != 1:
        return False
    if not (isinstance(nq, nn.BatchNorm2d) and isinstance(nv, nn.BatchNorm2d)):
        return False
    conv, pos = getattr(module, "conv_lambda", None), getattr(module, "pos_emb", None)
    if not (isinstance(conv, nn.Conv3d) and conv.in_channels == 1) and not isinstance(pos, nn.Parameter):
        return False
    return qkv.out_channels == heads * dqk + dqk + dv and qkv.in_channels == heads * dv


def _q_rows(keep: torch.Tensor, heads: int, dqk: int) -> torch.Tensor:
    return (torch.arange(heads)[:, None] * dqk + keep[None, :]).reshape(-1)


class LambdaLayerPruner(LayerPruner):
    """Slices a ``LambdaLayer``'s key / query channels and value channels (see the module)."""

    name = "lambda_layer"

    def trace(self, module, call, ctx):
        heads, dqk, dv = module.num_heads, module.dim_qk, module.dim_v
        x = call.args[0]
        old = ctx.slices.get((call.name, "v"))  # a second call of the module: the same channels
        if old is None:
            ctx.bind(call.name, "qk", ctx.new_atoms(dqk), "param")
            ctx.bind(call.name, "v", ctx.new_atoms(dv), "param")
        v = ctx.slices[(call.name, "v")].atoms
        ctx.bind(call.name, "in", ctx.labels(x, 1), "in", arg=0, dim=1)
        ctx.union(ctx.slices[(call.name, "in")].atoms, v.repeat(heads))
        out = v.repeat(heads)
        ctx.bind(call.name, "out", out, "out", dim=1)
        ctx.set_label(call.outputs[0], 1, out)

    def prune(self, module, keep):
        heads, dqk, dv = module.num_heads, module.dim_qk, module.dim_v
        k_qk = keep.get("qk", torch.arange(dqk))
        k_v = keep.get("v", torch.arange(dv))
        if "qk" in keep or "v" in keep:
            rows = torch.cat([_q_rows(k_qk, heads, dqk), heads * dqk + k_qk, heads * dqk + dqk + k_v])
            replace_param(module.qkv, "weight", 0, rows)
            replace_param(module.qkv, "bias", 0, rows)
            module.qkv.out_channels = rows.numel()
            _slice_norm(module.norm_q, _q_rows(k_qk, heads, dqk))
            _slice_norm(module.norm_v, k_v)
            if module.conv_lambda is not None:
                replace_param(module.conv_lambda, "weight", 0, k_qk)
                replace_param(module.conv_lambda, "bias", 0, k_qk)
                module.conv_lambda.out_channels = k_qk.numel()
            if isinstance(getattr(module, "pos_emb", None), nn.Parameter):
                replace_param(module, "pos_emb", 2, k_qk)
            module.dim_qk, module.dim_v = k_qk.numel(), k_v.numel()
        if "in" in keep:
            replace_param(module.qkv, "weight", 1, keep["in"])
            module.qkv.in_channels = keep["in"].numel()

    def settings_problem(self, module):
        if is_lambda_layer(module) and module.norm_q.num_features == module.num_heads * module.dim_qk:
            if module.norm_v.num_features == module.dim_v:
                return None
        nq, nv = module.norm_q.num_features, module.norm_v.num_features
        return (
            f"num_heads={module.num_heads}, dim_qk={module.dim_qk}, dim_v={module.dim_v} do not fit its qkv of "
            f"{module.qkv.out_channels} channels and norms of {nq} / {nv}"
        )

    def mask(self, module, slice_name, idx):
        """The oracle's copy: a key channel goes where the query is zero (both lambdas
        contract them); a value channel only reaches its output channels, zeroed by the
        ``"out"`` slice."""
        if slice_name == "qk":
            rows = _q_rows(idx, module.num_heads, module.dim_qk)
            module.norm_q.weight.data[rows] = 0
            module.norm_q.bias.data[rows] = 0
            return True
        return slice_name == "v"

    def weight_energy(self, module, slice_name):
        w = module.qkv.weight.detach().float().flatten(1).square()
        heads, dqk = module.num_heads, module.dim_qk
        if slice_name == "in":
            return w.sum(0)
        rows = w.sum(1)
        if slice_name == "qk":
            return rows[: heads * dqk].reshape(heads, dqk).sum(0) + rows[heads * dqk : heads * dqk + dqk]
        if slice_name == "v":
            return rows[heads * dqk + dqk :]
        return None


def _slice_norm(norm: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    for attr in ("weight", "bias", "running_mean", "running_var"):
        replace_param(norm, attr, 0, keep)
    norm.num_features = keep.numel()
