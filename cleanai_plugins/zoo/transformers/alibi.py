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


def is_alibi_attention(module: nn.Module) -> bool:
    """A Bloom attention module (handed the model's ALiBi tensor at every call)."""
    return type(module).__name__ == "BloomAttention" and hasattr(module, "query_key_value")


def _slice_alibi(module: nn.Module, args: tuple, kwargs: dict):
    kept = getattr(module, "cleanai_kept_heads", None)
    alibi = kwargs.get("alibi")
    if kept is None or alibi is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    b = hidden.shape[0]
    rows = alibi.reshape(b, -1, *alibi.shape[1:])
    if rows.shape[1] == len(kept):  # already the kept heads' rows
        return None
    idx = torch.as_tensor(kept, device=alibi.device)
    kwargs["alibi"] = rows[:, idx].reshape(b * len(kept), *alibi.shape[1:])
    return args, kwargs


def fix_alibi_heads(module: nn.Module, name: str, edits: dict) -> None:
    """After ``query_key_value`` lost rows (whole heads of ``3 * head_dim`` rows), record
    the kept heads in the unpruned model's numbering and hook the ALiBi slicing."""
    keep = edits.get((f"{name}.query_key_value" if name else "query_key_value", "out"))
    if keep is None:
        return
    rel = torch.unique(torch.as_tensor(keep) // (3 * module.head_dim)).tolist()
    before = getattr(module, "cleanai_kept_heads", None)
    module.cleanai_kept_heads = [before[i] for i in rel] if before is not None else rel
    if not any(h is _slice_alibi for h in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(_slice_alibi, with_kwargs=True)
