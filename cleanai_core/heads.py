"""Attention heads in the report: how many query and key/value heads each attention module
had before and after, and which went, with their scores.

Glossary:

- *head layout*: where an attention module's heads lie in the channels of the slices that
  carry them, answered by plugins (:func:`~cleanai_core.hookspecs.cleanai_attention_heads`)
  on the model before it is sliced. The kernel knows no attention class: a layout is a
  module name, a ``(module, slice)`` pair for the query heads and one for the key/value
  heads, and per channel of each slice the head it belongs to (``-1`` for a channel of
  another part, the keys and values of a fused ``qkv``).
- *head gone*: every channel of the head was removed. A head that kept some of its channels
  (``nn.MultiheadAttention`` prunes the same dimensions of every head) stays, and
  ``head_dim_after`` says how wide the heads are now.
- *head score*: the score of the unit its first channel belonged to: the head itself, or
  its key/value group where whole groups go (grouped-query attention by default), so the
  query heads of one group share the group's score.

The report's layer records said ``q_proj 2 -> 1 units`` for a Llama with 8 query heads in 2
key/value groups: nothing said that 4 of 8 query heads and 1 of 2 key/value heads went.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

__all__ = ["HeadLayout", "HeadSlice", "head_layouts", "head_records", "heads_in_rows"]


@attrs.frozen
class HeadSlice:
    """The heads of one kind in one slice: ``heads[c]`` is the head of channel ``c`` of the
    slice ``slice`` of module ``module`` (``-1``: no head of this kind). ``head_dim``: the
    head size where the slice does not hold it (one channel a head: a module claimed whole
    whose ``"heads"`` slice counts them; a query and a gate per head); by default the
    channels of head 0."""

    module: str
    slice: str
    heads: torch.Tensor = attrs.field(converter=lambda t: torch.as_tensor(t, dtype=torch.int64))
    head_dim: int | None = None


@attrs.frozen
class HeadLayout:
    """The query and key/value heads of the attention module ``module`` (``kv`` ``None``:
    the module has no key/value heads of its own to count)."""

    module: str
    query: HeadSlice
    kv: HeadSlice | None = None


def heads_in_rows(width: int, head_dim: int, start: int = 0, count: int | None = None, stride: int = 0) -> torch.Tensor:
    """The head of each of ``width`` channels where ``count`` heads of ``head_dim`` channels
    begin at ``start``, one after another, or every ``stride`` channels (a fused projection
    that holds q, k and v per head: ``stride = 3 * head_dim``); ``-1`` elsewhere."""
    step = stride or head_dim
    count = (width - start) // step if count is None else count
    out = torch.full((width,), -1, dtype=torch.int64)
    for h in range(count):
        out[start + h * step : start + h * step + head_dim] = h
    return out


def head_layouts(model: nn.Module, pm: Any = None) -> list[HeadLayout]:
    """The head layouts the plugins find in ``model`` (the first answer per module wins)."""
    from cleanai_core.plugins import plugin_manager

    pm = plugin_manager(pm, "head_layouts")
    seen: dict[str, HeadLayout] = {}
    for answer in pm.hook.cleanai_attention_heads(model=model):
        for layout in answer or []:
            seen.setdefault(layout.module, layout)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(seen.values(), key=lambda h: order.get(h.module, len(order)))


def _channel_scores(rec: dict[str, Any]) -> list[float | None]:
    """The score of each channel of a layer record, in channel order."""
    width = rec["channels_before"]
    gone = set(rec.get("pruned_indices") or [])
    scores = rec.get("importance_scores") or {}
    pruned, kept = iter(scores.get("pruned") or []), iter(scores.get("kept") or [])
    return [next(pruned, None) if c in gone else next(kept, None) for c in range(width)]


def _count(part: HeadSlice, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Heads of one kind before and after, the heads gone (in the order of their index) with
    their scores and step, and the kept heads' scores (one step)."""
    own = [r for r in records if (r["name"], r["slice"]) == (part.module, part.slice)]
    if not own or own[0]["channels_before"] != part.heads.numel():
        return None  # the slice is not in the report, or not as the layout saw it
    heads = part.heads
    n = int(heads.max()) + 1 if heads.numel() and int(heads.max()) >= 0 else 0
    removed: dict[int, tuple[float | None, int | None]] = {}  # original channel -> (score, step)
    for rec in own:
        idx = rec.get("original_indices") or rec.get("pruned_indices") or []
        scores = (rec.get("importance_scores") or {}).get("pruned") or []
        for k, c in enumerate(idx):
            removed.setdefault(c, (scores[k] if k < len(scores) else None, rec.get("step")))
    gone, kept_width = [], []
    for h in range(n):
        channels = (heads == h).nonzero().squeeze(1).tolist()
        left = [c for c in channels if c not in removed]
        if channels and not left:
            gone.append((h, *removed[channels[0]]))
        elif left:
            kept_width.append(len(left))
    widths = set(kept_width)
    out: dict[str, Any] = {
        "module": part.module,
        "slice": part.slice,
        "before": n,
        "after": n - len(gone),
        "pruned": [h for h, _, _ in gone],
        "pruned_scores": [s for _, s, _ in gone],
        "head_dim_before": part.head_dim or (int((heads == 0).sum()) if n else None),
        "head_dim_after": part.head_dim or (widths.pop() if len(widths) == 1 else None),
    }
    if any(step is not None for _, _, step in gone):
        out["pruned_steps"] = [step for _, _, step in gone]
    if len(own) == 1:
        per_channel = _channel_scores(own[0])
        out["kept_scores"] = [
            per_channel[int((heads == h).nonzero()[0])] for h in range(n) if h not in set(out["pruned"])
        ]
    return out


def head_records(layouts: list[HeadLayout], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per attention module of ``layouts``: its query heads and key/value heads before and
    after, read from the layer ``records`` (of every step; a later step's records name their
    channels' ``original_indices``)."""
    out = []
    for layout in layouts:
        query = _count(layout.query, records)
        if query is None:
            continue
        kv = _count(layout.kv, records) if layout.kv is not None else None
        out.append({"module": layout.module, "query_heads": query, "kv_heads": kv})
    return out
