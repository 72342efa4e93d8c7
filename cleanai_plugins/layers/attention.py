"""nn.MultiheadAttention, claimed as one composite module.

Coupling (decided here, documented for users):

- ``embed_dim`` E is at once the width of ``query``, of the q/k/v projections
  (``num_heads x head_dim``) and of the output (``out_proj`` rows). PyTorch derives
  ``head_dim`` from ``query.shape[-1]``, so the three must keep the same size; this
  pruner unions them index by index: one atom per index ``e`` of E stands for query
  column ``e``, q/k/v row ``e`` and output channel ``e``.
- Heads stay equal in size: E is viewed as ``(num_heads, head_dim)`` and the ``j``-th
  dimension of every head is tied into one unit. Pruning a unit removes head dimension
  ``j`` in every head (and ``num_heads`` channels of the residual stream); ``num_heads``
  never changes. Whole-head pruning is not offered: removing a head would remove
  ``head_dim`` channels of the residual stream that have nothing to do with that head.
- The attention scale is ``1 / sqrt(head_dim)``: when ``head_dim`` shrinks, the q rows of
  the input projection (and their bias) are multiplied by ``sqrt(new / old)`` so that
  ``q . k * scale`` is unchanged; the pruned module is exactly the masked one.
- With separate key/value widths (``kdim``/``vdim`` != E) the key and value inputs are
  own slices (``"kdim"``, ``"vdim"``: columns of ``k_proj_weight``/``v_proj_weight``).
  With ``kdim == vdim == E`` (a single ``in_proj_weight``) key and value columns are the
  query columns, so their channels are unioned with E.
- ``bias_k``/``bias_v`` (``add_bias_kv``) follow E; ``add_zero_attn`` needs nothing.

Slices: ``"embed"`` (kind ``in``: query columns), ``"out"`` (kind ``out``: everything
else that follows E), ``"kdim"``, ``"vdim"``. The output is ``(attn_output, weights)``;
only ``attn_output`` is labelled (on its last dim). The pruned module keeps its flags, so
it runs through PyTorch's fast path whenever the original did.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cleanai_core import hookimpl
from cleanai_core.heads import HeadLayout, HeadSlice, heads_in_rows
from cleanai_core.interfaces import LayerPruner, replace_param, settings_mismatch, shape_of, slice_tensor

__all__ = ["MultiheadAttentionPruner", "head_layout"]


def _arg(call, i: int, name: str):
    if len(call.args) > i:
        return call.args[i]
    return call.kwargs.get(name)


def _qkv_rows(k: torch.Tensor, e: int) -> torch.Tensor:
    return torch.cat([k, k + e, k + 2 * e])


class MultiheadAttentionPruner(LayerPruner):
    name = "multihead_attention"

    def trace(self, module, call, ctx):
        q, k, v = _arg(call, 0, "query"), _arg(call, 1, "key"), _arg(call, 2, "value")
        nh, hd = module.num_heads, module.head_dim
        atoms = ctx.labels(q, -1)
        if nh > 1:
            ctx.tie(atoms, (nh, hd), 1)
        if module._qkv_same_embed_dim:
            for ref in (k, v):
                if ref is not None:
                    ctx.union(atoms, ctx.labels(ref, -1))
        else:
            if k is not None:
                ctx.bind(call.name, "kdim", ctx.labels(k, -1), "in", arg=1, dim=-1)
            if v is not None:
                ctx.bind(call.name, "vdim", ctx.labels(v, -1), "in", arg=2, dim=-1)
        for extra in ("key_padding_mask", "attn_mask"):
            ctx.freeze_tensor(_arg(call, {"key_padding_mask": 3, "attn_mask": 5}[extra], extra), "attention mask")
        ctx.bind(call.name, "embed", atoms, "in", arg=0, dim=-1)
        ctx.bind(call.name, "out", atoms, "out", dim=-1)
        outs = call.outputs
        if outs:
            ctx.set_label(outs[0], -1, atoms)

    # -- slicing ---------------------------------------------------------------
    def prune(self, module, keep):
        e = module.embed_dim
        if "kdim" in keep and not module._qkv_same_embed_dim:
            replace_param(module, "k_proj_weight", 1, keep["kdim"])
            module.kdim = keep["kdim"].numel()
        if "vdim" in keep and not module._qkv_same_embed_dim:
            replace_param(module, "v_proj_weight", 1, keep["vdim"])
            module.vdim = keep["vdim"].numel()
        k = keep.get("out", keep.get("embed"))
        if k is None:
            return
        n = k.numel()
        nh = module.num_heads
        if n % nh:
            raise ValueError(f"MultiheadAttention: {n} kept channels for {nh} heads")
        hd_old, hd_new = module.head_dim, n // nh
        c = math.sqrt(hd_new / hd_old)
        rows = _qkv_rows(k, e)
        with torch.no_grad():
            if module._qkv_same_embed_dim:
                w = module.in_proj_weight.data.clone()
                w[:e] *= c
                new = slice_tensor(slice_tensor(w, 0, rows), 1, k)
                module.in_proj_weight = nn.Parameter(new, requires_grad=module.in_proj_weight.requires_grad)
            else:
                qw = module.q_proj_weight
                new = slice_tensor(slice_tensor(qw.data * c, 0, k), 1, k)
                module.q_proj_weight = nn.Parameter(new, requires_grad=qw.requires_grad)
                replace_param(module, "k_proj_weight", 0, k)
                replace_param(module, "v_proj_weight", 0, k)
            if module.in_proj_bias is not None:
                b = module.in_proj_bias.data.clone()
                b[:e] *= c
                module.in_proj_bias = nn.Parameter(
                    slice_tensor(b, 0, rows), requires_grad=module.in_proj_bias.requires_grad
                )
        replace_param(module, "bias_k", 2, k)
        replace_param(module, "bias_v", 2, k)
        op = module.out_proj
        replace_param(op, "weight", 0, k)
        replace_param(op, "weight", 1, k)
        replace_param(op, "bias", 0, k)
        op.in_features = op.out_features = n
        module.embed_dim = n
        module.head_dim = hd_new
        if module._qkv_same_embed_dim:
            module.kdim = module.vdim = n

    def settings_problem(self, module):
        out = shape_of(module.out_proj, "weight") if isinstance(module.out_proj, nn.Module) else None
        nh = module.num_heads
        if out is None or len(out) != 2:
            return None
        e = out[0]
        if not isinstance(nh, int) or isinstance(nh, bool) or nh < 1 or e % nh:
            return f"num_heads={nh!r} does not divide the embedding width {e} of out_proj.weight {out}"
        k = shape_of(module, "k_proj_weight") if not module._qkv_same_embed_dim else None
        v = shape_of(module, "v_proj_weight") if not module._qkv_same_embed_dim else None
        expected = {"embed_dim": e, "head_dim": e // nh, "kdim": k[1] if k else e, "vdim": v[1] if v else e}
        return settings_mismatch(module, expected, f"out_proj.weight of shape {out} with num_heads={nh}")

    def mask(self, module, slice_name, idx):
        """Zero, in the masking oracle's copy, every weight that reads or writes ``idx``."""
        e = module.embed_dim
        if slice_name == "kdim":
            module.k_proj_weight.data[:, idx] = 0
            return True
        if slice_name == "vdim":
            module.v_proj_weight.data[:, idx] = 0
            return True
        if slice_name == "embed":
            if module._qkv_same_embed_dim:
                module.in_proj_weight.data[:, idx] = 0
            else:
                module.q_proj_weight.data[:, idx] = 0
            return True
        if slice_name == "out":
            rows = _qkv_rows(idx, e)
            if module._qkv_same_embed_dim:
                module.in_proj_weight.data[rows] = 0
            else:
                for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight):
                    w.data[idx] = 0
            if module.in_proj_bias is not None:
                module.in_proj_bias.data[rows] = 0
            for b in (module.bias_k, module.bias_v):
                if b is not None:
                    b.data[..., idx] = 0
            module.out_proj.weight.data[idx] = 0
            module.out_proj.weight.data[:, idx] = 0
            if module.out_proj.bias is not None:
                module.out_proj.bias.data[idx] = 0
            return True
        return False

    def weight_energy(self, module, slice_name):
        e = module.embed_dim
        if slice_name == "kdim":
            return (module.k_proj_weight.detach().float() ** 2).sum(0)
        if slice_name == "vdim":
            return (module.v_proj_weight.detach().float() ** 2).sum(0)
        if module._qkv_same_embed_dim:
            w = module.in_proj_weight.detach().float() ** 2
            if slice_name == "embed":
                return w.sum(0)
            rows = w.sum(1).reshape(3, e).sum(0)
        else:
            if slice_name == "embed":
                return (module.q_proj_weight.detach().float() ** 2).sum(0)
            rows = sum(
                (w.detach().float() ** 2).sum(1)
                for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
            )
        o = module.out_proj.weight.detach().float() ** 2
        return rows + o.sum(0) + o.sum(1)


@hookimpl(trylast=True)
def cleanai_layer_pruner(module):
    if isinstance(module, nn.MultiheadAttention):
        return MultiheadAttentionPruner()
    return None


@hookimpl(trylast=True)
def cleanai_after_prune(module, name, edits, findings):
    """``nn.Transformer.forward`` refuses inputs whose width is not ``d_model``: it follows
    the (pruned) residual stream, read from its first attention's ``embed_dim`` (before
    2026-12-01 a pruned ``nn.Transformer`` failed with "the feature number of src and tgt
    must be equal to d_model" and verification kept its stream)."""
    if isinstance(module, nn.Transformer):
        attn = next((m for m in module.modules() if isinstance(m, nn.MultiheadAttention)), None)
        if attn is not None:
            module.d_model = attn.embed_dim


# child -> how many (q, k, v) parts its output stacks, ``(parts, heads, head_dim)`` (timm's ``qkv``)
_QUERY_CHILDREN = (("qkv", 3), ("q", 1), ("q_proj", 1), ("query", 1), ("to_q", 1), ("qkv_proj", 3), ("qk", 2))
_KEY_CHILDREN = (("k", 1), ("k_proj", 1), ("key", 1), ("to_k", 1), ("kv", 2), ("to_kv", 2))


def _out_linear(module: nn.Module, name: str, child: str) -> tuple[str, int] | None:
    """``(qualified name, output width)`` of a child linear projection (or of the ``linear`` it wraps)."""
    proj = getattr(module, child, None)
    at = f"{name}.{child}" if name else child
    if not isinstance(proj, nn.Linear) and isinstance(getattr(proj, "linear", None), nn.Linear):
        proj, at = proj.linear, f"{at}.linear"
    return (at, proj.out_features) if isinstance(proj, nn.Linear) else None


def head_layout(module: nn.Module, name: str) -> HeadLayout | None:
    """The head layout of an attention block that keeps its head count in ``num_heads`` (or
    ``heads``) beside a linear query projection (timm's and torchvision's ``qkv`` blocks,
    ``(3, heads, head_dim)`` rows; ``head_first``: ``(heads, 3, head_dim)``), or of an
    ``nn.MultiheadAttention`` (its ``"out"`` slice: E channels, ``(heads, head_dim)``)."""
    if isinstance(module, nn.MultiheadAttention):
        heads = heads_in_rows(module.embed_dim, module.head_dim)
        return HeadLayout(name, HeadSlice(name, "out", heads), HeadSlice(name, "out", heads))
    n = next((getattr(module, a) for a in ("num_heads", "heads") if type(getattr(module, a, None)) is int), None)
    if not n or n < 1 or any(type(getattr(module, a, None)) is int for a in ("key_dim", "val_dim")):
        return None  # per-head parts of unequal sizes (LeViT, TinyViT, EfficientFormer): not this layout
    hd = next((getattr(module, a) for a in ("head_dim", "dim_head") if type(getattr(module, a, None)) is int), None)
    for child, parts in _QUERY_CHILDREN:
        found = _out_linear(module, name, child)
        if found is None:
            continue
        at, width = found
        hd = hd or width // (parts * n)
        if hd < 1 or width != parts * n * hd:
            return None  # a query and a gate per head, sub-heads, unequal parts: not a layout read here
        if getattr(module, "head_first", False) is True:
            query = HeadSlice(at, "out", heads_in_rows(width, hd, 0, n, parts * hd))
            kv = HeadSlice(at, "out", heads_in_rows(width, hd, hd, n, parts * hd)) if parts > 1 else None
        else:
            query = HeadSlice(at, "out", heads_in_rows(width, hd, 0, n))
            kv = HeadSlice(at, "out", heads_in_rows(width, hd, n * hd, n)) if parts > 1 else None
        if kv is None:
            kv = next((_key_heads(module, name, c, p, hd) for c, p in _KEY_CHILDREN if hasattr(module, c)), None)
        return HeadLayout(name, query, kv)
    return None


def _key_heads(module: nn.Module, name: str, child: str, parts: int, hd: int) -> HeadSlice | None:
    found = _out_linear(module, name, child)
    if found is None or found[1] % (parts * hd):
        return None
    return HeadSlice(found[0], "out", heads_in_rows(found[1], hd, 0, found[1] // (parts * hd)))


@hookimpl(trylast=True)
def cleanai_attention_heads(model):
    """Heads of ``nn.MultiheadAttention`` and of ``num_heads`` + ``qkv`` blocks outside
    transformers (whose attention modules its zoo plugin describes)."""
    found = []
    for name, module in model.named_modules():
        if type(module).__module__.startswith("transformers."):
            continue
        layout = head_layout(module, name)
        if layout is not None:
            found.append(layout)
    return found or None
