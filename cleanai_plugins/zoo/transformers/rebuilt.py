"""Attention that transformers rebuilds from the config while the model runs.

BigBird's and BigBird-Pegasus's block-sparse attention switch to full attention when the
input is short (or a cache is used) and back when it is long again: ``set_attention_type``
builds a new self-attention from ``config`` (head size ``hidden_size /
num_attention_heads``) and moves only the query, key and value projections into it. Pruned
heads or a pruned hidden size come back at the config's widths there (``ValueError: The
hidden size (64) is not a multiple of the number of attention heads (3)``, or a reshape to
the old width), so the projections' heads and the width they read are frozen, with the
reason; the MLP still prunes.
"""

from __future__ import annotations

from torch import nn

from cleanai_plugins.layers.linear import LinearPruner

__all__ = ["REBUILT", "FrozenLinearPruner", "rebuilt_projections"]

REBUILT = (
    "BigBird's block-sparse attention rebuilds its self-attention from the config when it switches "
    "between sparse and full attention (short inputs, a cache): its heads and the hidden size it reads stay"
)


def rebuilt_projections(module: nn.Module) -> list[nn.Module]:
    """The query, key and value projections of an attention module that rebuilds its
    self-attention from the config (``set_attention_type``, block-sparse attention)."""
    cls = type(module)
    config = getattr(module, "config", None)
    inner = getattr(module, "self", None)
    if not (
        cls.__module__.startswith("transformers.")
        and callable(getattr(module, "set_attention_type", None))
        and getattr(config, "attention_type", None) == "block_sparse"
        and isinstance(inner, nn.Module)
    ):
        return []
    return [p for p in (getattr(inner, n, None) for n in ("query", "key", "value")) if isinstance(p, nn.Linear)]


class FrozenLinearPruner(LinearPruner):
    """A linear layer whose output and input channels never prune (``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def trace(self, module, call, ctx):
        super().trace(module, call, ctx)
        for side in ("out", "in"):
            spec = ctx.slices.get((call.name, side))
            if spec is not None:
                ctx.freeze(spec.atoms, self.reason)
