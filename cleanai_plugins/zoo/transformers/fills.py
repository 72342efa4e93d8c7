"""Tensors an attention module builds from nothing with one entry per head.

T5's cross-attention (and any layer without a relative attention bias) adds
``torch.zeros((1, self.n_heads, q, k))`` to its scores. The tensor reads no channels,
but its heads dimension has to shrink with the heads: the module reads ``n_heads``,
which the fix-up rewrites. Inside a ``cleanai_whole_heads`` module, a fill of shape
``(b, heads, ...)`` whose ``heads`` is the module's head count gets fresh atoms on that
dimension, so it is coupled with the scores instead of freezing them.
"""

from __future__ import annotations

from cleanai_plugins.zoo.transformers.attention import HEADS_ATTRS

__all__ = ["FILLS", "HeadsFill"]

FILLS = ("zeros", "ones", "full", "empty")


class HeadsFill:
    """Index mapper for ``aten.zeros`` / ``ones`` / ``full`` / ``empty``."""

    def trace(self, call, ctx):
        out = call.outputs[0] if call.outputs else None
        module = ctx.scope_module()
        if out is None or module is None or not ctx.keeps_whole_heads() or out.ndim != 4:
            return
        heads = {getattr(module, a) for a in HEADS_ATTRS if isinstance(getattr(module, a, None), int)}
        if out.shape[1] > 1 and out.shape[1] in heads:
            ctx.set_label(out, 1, ctx.new_atoms(out.shape[1]))
