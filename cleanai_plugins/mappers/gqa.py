"""Grouped-query attention: which units its heads form.

Glossary: with ``m`` query heads and ``n`` key/value (KV) heads, each KV head serves a
*group* of ``g = m / n`` consecutive query heads. Two ways to shrink it keep the model
a grouped-query attention:

- **whole KV groups** (the default): a unit is one KV head with the ``g`` query heads it
  serves; the group size stays, the number of KV heads shrinks;
- **query heads per group**: the KV heads are kept, and a unit is the ``j``-th query head
  of *every* group, so each group loses the same number of query heads (``g`` shrinks,
  ``n`` stays). The choice is by position, not by score: the ``j``-th heads of different
  groups go together.

Multi-query attention (one KV head, ``n = 1``) always takes the second mode: its one
group is the whole attention, so its query heads prune one by one and the KV head stays.

A plugin picks the second mode for an attention module by filing it under the model
finding :data:`GQA_QUERY_HEADS` from ``cleanai_prepare_model``
(:func:`prune_query_heads_per_group`); the SDPA mapper (``enable_gqa``) and the
``expand`` of ``repeat_kv`` (eager attention) then couple the heads this way, so the
graph does not depend on the attention implementation.
"""

from __future__ import annotations

import torch

__all__ = ["GQA_QUERY_HEADS", "couple_groups", "expand_group_dim", "per_group", "prune_query_heads_per_group"]

#: model findings key: attention modules whose GQA prunes the same query heads in every group
GQA_QUERY_HEADS = "gqa_query_heads"


def prune_query_heads_per_group(*modules) -> dict[str, set]:
    """The findings that switch each attention module of ``modules`` to query heads per
    group: return it from ``cleanai_prepare_model``."""
    return {GQA_QUERY_HEADS: set(modules)}


def per_group(ctx) -> bool:
    """Whether the op being traced runs in a module filed under :data:`GQA_QUERY_HEADS`."""
    module = ctx.scope_module()
    return module is not None and module in ctx.findings.get(GQA_QUERY_HEADS, ())


def couple_groups(ctx, query: torch.Tensor, kv: torch.Tensor) -> None:
    """Couple ``m`` query-head atoms with ``n`` KV-head atoms (``m % n == 0``) the way the
    module's mode says."""
    n, m = kv.numel(), query.numel()
    grid = query.reshape(n, m // n)
    if per_group(ctx) or n == 1:  # multi-query: one KV group; losing it would empty the attention
        ctx.freeze(kv, f"{ctx.where()}: grouped-query attention keeps its key/value heads (query heads per group)")
        ctx.union(grid[:1].expand_as(grid), grid)
    else:
        ctx.union(grid, kv[:, None].expand(n, m // n))


def expand_group_dim(ctx, src, out, lab) -> bool:
    """``repeat_kv``: ``(b, n, 1, s, d) -> (b, n, g, s, d)`` with the KV heads on dim 1.
    In query-heads-per-group mode the KV heads are kept and the new ``g`` dimension gets
    fresh atoms, one per position in the group, which the query heads meet after the
    reshape to ``(b, n * g, s, d)``. Returns whether it labelled ``out``."""
    shift = out.ndim - src.ndim
    d = lab.dim + shift
    if (
        not (per_group(ctx) or lab.atoms.numel() == 1)
        or d + 1 >= out.ndim
        or src.shape[lab.dim + 1] != 1
        or out.shape[d + 1] <= 1
    ):
        return False
    ctx.freeze(lab.atoms, f"{ctx.where()}: grouped-query attention keeps its key/value heads (query heads per group)")
    ctx.set_label(out, d + 1, ctx.new_atoms(out.shape[d + 1]))
    return True
