"""torchvision Swin (v1, v2 and the video Swin3d): the window attention claimed as one composite module.

``ShiftedWindowAttention`` (and ``ShiftedWindowAttentionV2``, ``ShiftedWindowAttention3d``) never call their ``qkv`` and
``proj`` linears: ``forward`` hands their weights to the function
``torchvision.models.swin_transformer.shifted_window_attention``, which applies them with
``F.linear``. Traced op by op, those parameters are used outside the modules that own
them, which freezes the whole residual stream. Claimed whole, the module has two slices:

- ``"in"``: the input width C (the columns of ``qkv.weight``), read on the last dim of the
  ``(B, H, W, C)`` (video: ``(B, T, H, W, C)``) input;
- ``"out"``: the output width (the rows of ``proj.weight`` and ``proj.bias``), on the last
  dim of the output.

- ``"heads"``: whole heads (their q, k and v rows, their columns of ``proj``, their
  column of the relative position bias table (v1, 3d), their row of ``cpb_mlp``'s last layer
  and their ``logit_scale`` (v2)); a group of its own in each block. The head size stays,
  so the attention scale does too; the masked model zeroes a head's value rows, which
  makes its contribution exactly 0, as removing it does.

The head size itself (``head_dim``) is not pruned. The relative position bias table (v1),
``cpb_mlp`` and ``logit_scale`` (v2) do not depend on C.

torchvision's function derives the head size and the output width from the *input*
width C, so a pruned module's class is swapped for a subclass whose ``forward`` reads the
internal width from ``qkv`` and the output width from ``proj`` (same computation
otherwise; an unpruned module keeps its own class).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from cleanai_core import hookimpl
from cleanai_core.heads import HeadLayout, HeadSlice
from cleanai_core.interfaces import LayerPruner, add_to_bias, replace_param, squared_weight
from cleanai_plugins.zoo import loaded, named_classes, once_loaded

__all__ = ["ShiftedWindowAttentionPruner", "shifted_window_attention"]


def _shift_mask(x: torch.Tensor, padded, window_size, shift_size) -> torch.Tensor:
    """torchvision's attention mask for shifted windows over any number of spatial dims
    (its 2-D and 3-D code): ``(num_windows, N, N)``."""
    d = len(padded)
    attn_mask = x.new_zeros(tuple(padded))
    spans = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(window_size, shift_size, strict=True)]
    for count, box in enumerate(itertools.product(*spans)):
        attn_mask[tuple(slice(a, b) for a, b in box)] = count
    split = [n for p, w in zip(padded, window_size, strict=True) for n in (p // w, w)]
    attn_mask = attn_mask.view(split).permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2))
    attn_mask = attn_mask.reshape(-1, math.prod(window_size[:d]))
    attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def shifted_window_attention(
    input: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` (input ``(B, H, W, C)``) and
    ``shifted_window_attention_3d`` (``(B, T, H, W, C)``) where the input width (columns of
    ``qkv_weight``), the internal width (``qkv_weight.shape[0] // 3``) and the output width
    (rows of ``proj_weight``) may differ. With all three equal it computes the same."""
    B, *size, c_in = input.shape
    d = len(size)
    window_size, shift_size = list(window_size), list(shift_size)
    pads = [(w - n % w) % w for n, w in zip(size, window_size, strict=True)]
    x = F.pad(input, [0, 0] + [q for p in reversed(pads) for q in (0, p)])
    padded = list(x.shape[1:-1])
    for i in range(d):
        if window_size[i] >= padded[i]:
            shift_size[i] = 0
    dims = tuple(range(1, d + 1))
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=[-s for s in shift_size], dims=dims)
    counts = [p // w for p, w in zip(padded, window_size, strict=True)]
    num_windows = math.prod(counts)
    x = x.view(B, *[n for c, w in zip(counts, window_size, strict=True) for n in (c, w)], c_in)
    x = x.permute(0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), 2 * d + 1)
    x = x.reshape(B * num_windows, math.prod(window_size), c_in)

    inner = qkv_weight.shape[0] // 3
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        qkv_bias[inner : 2 * inner].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, inner // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # v2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (inner // num_heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        mask = _shift_mask(x, padded, window_size, shift_size)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)

    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), inner)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    c_out = x.shape[-1]
    x = x.view(B, *counts, *window_size, c_out)
    x = x.permute(0, *[k for i in range(1, d + 1) for k in (i, i + d)], 2 * d + 1).reshape(B, *padded, c_out)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=shift_size, dims=dims)
    return x[(slice(None), *[slice(0, n) for n in size])].contiguous()


class _PrunedForward:
    """``forward`` of a pruned window attention: the widths come from the weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window_size, shift_size = self.window_size, self.shift_size
        if x.ndim == 5:  # video Swin: windows larger than the input shrink to it, unshifted
            window_size, shift_size = loaded("torchvision.models.video.swin_transformer")._get_window_and_shift_size(
                shift_size.copy(), list(x.shape[1:4]), window_size.copy()
            )
            bias = self.get_relative_position_bias(window_size)
        else:
            bias = self.get_relative_position_bias()
        return shifted_window_attention(
            x,
            self.qkv.weight,
            self.proj.weight,
            bias,
            window_size,
            self.num_heads,
            shift_size=shift_size,
            attention_dropout=self.attention_dropout,
            dropout=self.dropout,
            qkv_bias=self.qkv.bias,
            proj_bias=self.proj.bias,
            logit_scale=getattr(self, "logit_scale", None),
            training=self.training,
        )


@once_loaded
def pruned_classes() -> dict[type, type] | None:
    """Claimed class -> class of the pruned module (the pruned classes claim themselves),
    made once torchvision is imported (None before)."""
    swin, swin3d = loaded("torchvision.models.swin_transformer"), loaded("torchvision.models.video.swin_transformer")
    if swin is None or swin3d is None:
        return None
    made = {}
    for base in (swin.ShiftedWindowAttention, swin.ShiftedWindowAttentionV2, swin3d.ShiftedWindowAttention3d):
        name = f"Pruned{base.__name__}"
        doc = f"A pruned ``{base.__name__}``: input, internal and output widths may differ."
        made[base] = type(name, (_PrunedForward, base), {"__module__": __name__, "__doc__": doc})
    return {**made, **{cls: cls for cls in made.values()}}


def _pruned_class() -> dict[type, type]:
    return pruned_classes() or {}


def _named(name: str) -> type | None:
    return next((cls for cls in _pruned_class().values() if cls.__name__ == name), None)


#: the pruned classes by name (a pickled model loads, also before torchvision is imported)
__getattr__ = named_classes(
    __name__,
    {
        f"Pruned{base}": ("torchvision.models.video.swin_transformer", functools.partial(_named, f"Pruned{base}"))
        for base in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2", "ShiftedWindowAttention3d")
    },
)


class ShiftedWindowAttentionPruner(LayerPruner):
    """Slices ``"in"`` (``qkv`` columns) and ``"out"`` (``proj`` rows) of torchvision's
    window attention; q/k/v, heads and ``proj`` columns keep their width (see the module
    docstring)."""

    name = "swin_window_attention"

    def trace(self, module, call, ctx):
        x = call.args[0] if call.args else call.kwargs.get("x")
        ctx.bind(call.name, "in", ctx.labels(x, -1), "in", arg=0, dim=-1)
        atoms_out = ctx.produce(call.name, "out", module.proj.out_features, dim=-1)
        ctx.set_label(call.outputs[0], -1, atoms_out)
        if module.num_heads > 1:
            ctx.produce(call.name, "heads", module.num_heads)

    def prune(self, module, keep):
        if "heads" in keep:
            _keep_heads(module, keep["heads"])
        if "in" in keep:
            replace_param(module.qkv, "weight", 1, keep["in"])
            module.qkv.in_features = keep["in"].numel()
        if "out" in keep:
            replace_param(module.proj, "weight", 0, keep["out"])
            replace_param(module.proj, "bias", 0, keep["out"])
            module.proj.out_features = keep["out"].numel()
        if keep:
            module.__class__ = _pruned_class()[type(module)]

    def mask(self, module, slice_name, idx):
        """In the masking oracle's copy, a pruned head's value rows are zeroed (its output is
        then 0); the other slices get the default input/output zeroing."""
        if slice_name != "heads":
            return False
        rows = _head_rows(module, idx, parts=(2,))
        module.qkv.weight.data[rows] = 0
        if module.qkv.bias is not None:
            module.qkv.bias.data[rows] = 0
        return True

    def weight_energy(self, module, slice_name):
        if slice_name == "heads":
            h = module.num_heads
            qkv = squared_weight(module.qkv.weight)[0].view(3, h, -1).sum((0, 2))
            return qkv + squared_weight(module.proj.weight)[1].view(h, -1).sum(1)
        if slice_name == "in":
            return squared_weight(module.qkv.weight)[1]
        return squared_weight(module.proj.weight)[0]

    def compensate(self, module, slice_name, removed, mean):
        """``qkv.bias += W[:, removed] @ mean``. In v2 the forward zeroes the key part of
        the bias (and cosine attention would not ignore a shift of the keys), so that
        part stays zero: the removed channels' mean contribution to the keys is dropped."""
        if slice_name != "in":
            return False
        qkv = module.qkv
        w = qkv.weight.detach()
        contrib = w[:, removed] @ mean.to(w.dtype)
        if getattr(module, "logit_scale", None) is not None:
            inner = qkv.out_features // 3
            contrib[inner : 2 * inner] = 0
        add_to_bias(qkv, contrib)
        return True


def _head_rows(module, heads: torch.Tensor, parts=(0, 1, 2)) -> torch.Tensor:
    """The ``qkv`` rows of ``heads`` in the given parts (0: q, 1: k, 2: v)."""
    inner = module.qkv.out_features // 3
    size = inner // module.num_heads
    within = (heads.long()[:, None] * size + torch.arange(size, device=heads.device)).reshape(-1)
    return torch.cat([within + p * inner for p in parts])


def _keep_heads(module, heads: torch.Tensor) -> None:
    """Keep only ``heads``: their q/k/v rows, ``proj`` columns and per-head tables."""
    rows, cols = _head_rows(module, heads), _head_rows(module, heads, parts=(0,))
    replace_param(module.qkv, "weight", 0, rows)
    replace_param(module.qkv, "bias", 0, rows)
    module.qkv.out_features = rows.numel()
    replace_param(module.proj, "weight", 1, cols)
    module.proj.in_features = cols.numel()
    if getattr(module, "relative_position_bias_table", None) is not None:  # v1
        replace_param(module, "relative_position_bias_table", 1, heads)
    if getattr(module, "logit_scale", None) is not None:  # v2
        replace_param(module, "logit_scale", 0, heads)
        last = module.cpb_mlp[-1]
        replace_param(last, "weight", 0, heads)
        replace_param(last, "bias", 0, heads)
        last.out_features = heads.numel()
    module.num_heads = heads.numel()


@hookimpl
def cleanai_layer_pruner(module):
    if type(module) in _pruned_class():
        return ShiftedWindowAttentionPruner()
    return None


@hookimpl
def cleanai_attention_heads(model):
    """A claimed window attention's heads are the channels of its ``"heads"`` slice, one each
    (its ``qkv`` and ``proj`` are no layers of the report)."""
    claimed = _pruned_class()
    found = []
    for name, m in model.named_modules():
        if type(m) in claimed and m.num_heads > 1:
            heads = HeadSlice(name, "heads", torch.arange(m.num_heads), m.qkv.out_features // (3 * m.num_heads))
            found.append(HeadLayout(name, heads, heads))
    return found or None
