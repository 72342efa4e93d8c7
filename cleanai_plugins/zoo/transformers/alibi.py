"""Bloom's ALiBi with pruned heads: each layer keeps the slopes of the heads it kept.

``BloomModel.forward`` builds one ALiBi tensor for every layer from ``n_head``
(``_get_alibi_slopes``: head ``i`` gets the slope ``2 ** (-8 (i + 1) / n_head)``) and hands it
to each ``BloomAttention``, which adds it to the scores (``alibi.baddbmm(q, k)``). No
``n_head`` gives the slopes of an arbitrary subset of heads, so the model keeps building the
full tensor, and a pruned attention module takes the rows of its kept heads from it at every
call: a forward pre-hook reads ``cleanai_kept_heads`` (the module's kept heads, numbered as
in the unpruned model) and slices ``alibi``. The trace lets the ``baddbmm`` bias shrink with
the heads for these modules (:data:`~cleanai_plugins.mappers.matmul.HEAD_INPUTS`).

The hook is not part of the saved weights or config: ``from_pretrained`` cannot rebuild such
a model (its config also derives the head size from ``hidden_size / n_head``), and
``cleanai_core.load_pruned`` can, since replaying the history runs this fix-up again.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["fix_alibi_heads", "is_alibi_attention"]


#: attention class name -> (fused projection, ALiBi keyword argument, whether its rows fold the
#: batch: Bloom's ``(batch * heads, 1, keys)``; MPT's ``position_bias`` is ``(heads, 1, keys)``)
_ALIBI = {"BloomAttention": ("query_key_value", "alibi", True), "MptAttention": ("Wqkv", "position_bias", False)}


def is_alibi_attention(module: nn.Module) -> bool:
    """A Bloom or MPT attention module (handed the model's ALiBi tensor at every call)."""
    spec = _ALIBI.get(type(module).__name__)
    return spec is not None and hasattr(module, spec[0])


def _slice_alibi(module: nn.Module, args: tuple, kwargs: dict):
    kept = getattr(module, "cleanai_kept_heads", None)
    _, key, batched = _ALIBI[type(module).__name__]
    alibi = kwargs.get(key)
    if kept is None or alibi is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    b = hidden.shape[0] if batched else 1
    rows = alibi.reshape(b, -1, *alibi.shape[1:])
    if rows.shape[1] == len(kept):  # already the kept heads' rows
        return None
    idx = torch.as_tensor(kept, device=alibi.device)
    kwargs[key] = rows[:, idx].reshape(b * len(kept), *alibi.shape[1:])
    return args, kwargs


def fix_alibi_heads(module: nn.Module, name: str, edits: dict) -> None:
    """After the fused projection lost rows (whole heads: Bloom's ``query_key_value`` holds
    ``3 * head_dim`` rows per head; MPT's ``Wqkv`` q, k, v one after the other), record the
    kept heads in the unpruned model's numbering and hook the ALiBi slicing."""
    proj, _, batched = _ALIBI[type(module).__name__]
    keep = edits.get((f"{name}.{proj}" if name else proj, "out"))
    if keep is None:
        return
    keep = torch.as_tensor(keep)
    if not batched:  # the query third of q | k | v (kept widths equal)
        keep = keep[: keep.numel() // 3]
    rel = torch.unique(keep // (module.head_dim if not batched else 3 * module.head_dim)).tolist()
    before = getattr(module, "cleanai_kept_heads", None)
    module.cleanai_kept_heads = [before[i] for i in rel] if before is not None else rel
    if not any(h is _slice_alibi for h in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(_slice_alibi, with_kwargs=True)
