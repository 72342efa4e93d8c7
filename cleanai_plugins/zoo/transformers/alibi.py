"""ALiBi with pruned heads (Bloom, MPT, Falcon with ``alibi=True``): each layer keeps the
slopes of the heads it kept.

``BloomModel.forward`` builds one ALiBi tensor for every layer from ``n_head``
(``_get_alibi_slopes``: head ``i`` gets the slope ``2 ** (-8 (i + 1) / n_head)``) and hands it
to each ``BloomAttention``, which adds it to the scores (``alibi.baddbmm(q, k)``). No
``n_head`` gives the slopes of an arbitrary subset of heads, so the model keeps building the
full tensor, and a pruned attention module takes the rows of its kept heads from it at every
call: a forward pre-hook reads ``cleanai_kept_heads`` (the module's kept heads, numbered as
in the unpruned model) and slices ``alibi``. The trace lets the ``baddbmm`` bias shrink with
the heads for these modules (:data:`~cleanai_plugins.mappers.matmul.HEAD_INPUTS`). MPT hands
``position_bias`` ``(heads, 1, keys)``; Falcon folds its ALiBi into the attention mask too
(``(batch, heads, queries, keys)``, read by ``scaled_dot_product_attention``) and hands both,
so its hook slices every per-head tensor argument.

The hook is not part of the saved weights or config: ``from_pretrained`` cannot rebuild such
a model (its config also derives the head size from ``hidden_size / n_head``), and
``cleanai_core.load_pruned`` can, since replaying the history runs this fix-up again.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["fix_alibi_heads", "is_alibi_attention"]


#: attention class name -> (projection whose kept rows / columns give the kept heads, its side,
#: the per-head keyword arguments, whether its rows fold the batch: Bloom's ``(batch * heads, 1,
#: keys)``; MPT's ``position_bias`` is ``(heads, 1, keys)``; Falcon's ``(batch, heads, ...)``)
_ALIBI = {
    "BloomAttention": ("query_key_value", "out", ("alibi",), True),
    "MptAttention": ("Wqkv", "out", ("position_bias",), False),
    "FalconAttention": ("dense", "in", ("alibi", "attention_mask"), True),
}


def is_alibi_attention(module: nn.Module) -> bool:
    """A Bloom or MPT attention module, or a Falcon one built with ``alibi=True`` (handed the
    model's ALiBi tensor at every call)."""
    spec = _ALIBI.get(type(module).__name__)
    if spec is None or not hasattr(module, spec[0]):
        return False
    return type(module).__name__ != "FalconAttention" or bool(getattr(module.config, "alibi", False))


def _kept_rows(tensor, kept: list[int], batch: int, batched: bool):
    """``tensor``'s rows of the ``kept`` heads, or None where it holds no unpruned head axis:
    4-D ``(batch, heads, ...)`` (Falcon), else 3-D rows of ``batch * heads`` (Bloom) or
    ``heads`` (MPT)."""
    if not isinstance(tensor, torch.Tensor):
        return None
    idx = torch.as_tensor(kept, device=tensor.device)
    if tensor.ndim == 4:
        if tensor.shape[1] in (1, len(kept)) or tensor.shape[1] <= max(kept):
            return None  # a mask shared by every head, or already the kept heads'
        return tensor[:, idx]
    b = batch if batched else 1
    if tensor.ndim != 3 or tensor.shape[0] % b:
        return None
    rows = tensor.reshape(b, -1, *tensor.shape[1:])
    if rows.shape[1] == len(kept):  # already the kept heads' rows
        return None
    return rows[:, idx].reshape(b * len(kept), *tensor.shape[1:])


def _slice_alibi(module: nn.Module, args: tuple, kwargs: dict):
    kept = getattr(module, "cleanai_kept_heads", None)
    _, _, keys, batched = _ALIBI[type(module).__name__]
    if kept is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    sliced = {k: _kept_rows(kwargs.get(k), kept, hidden.shape[0], batched) for k in keys}
    sliced = {k: v for k, v in sliced.items() if v is not None}
    if not sliced:
        return None
    return args, {**kwargs, **sliced}


_slice_alibi.cleanai_model_hook = True  # part of the pruned model (model_state.MODEL_HOOK): copies keep it


def fix_alibi_heads(module: nn.Module, name: str, edits: dict) -> None:
    """After the heads' projection lost rows or columns (whole heads: Bloom's
    ``query_key_value`` holds ``3 * head_dim`` rows per head; MPT's ``Wqkv`` q, k, v one after
    the other; Falcon's ``dense`` reads ``head_dim`` columns per query head), record the kept
    heads in the unpruned model's numbering and hook the ALiBi slicing."""
    proj, side, _, _ = _ALIBI[type(module).__name__]
    keep = edits.get((f"{name}.{proj}" if name else proj, side))
    if keep is None:
        return
    keep = torch.as_tensor(keep)
    per_head = module.head_dim
    if type(module).__name__ == "BloomAttention":
        per_head = 3 * module.head_dim
    elif type(module).__name__ == "MptAttention":  # the query third of q | k | v (kept widths equal)
        keep = keep[: keep.numel() // 3]
    rel = torch.unique(keep // per_head).tolist()
    before = getattr(module, "cleanai_kept_heads", None)
    module.cleanai_kept_heads = [before[i] for i in rel] if before is not None else rel
    if not any(h is _slice_alibi for h in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(_slice_alibi, with_kwargs=True)
