"""nn.Embedding and nn.EmbeddingBag: the embedding dimension is a producer of channels."""

from __future__ import annotations

from torch import nn

from cleanai_core import hookimpl
from cleanai_core.graph.context import Label
from cleanai_core.interfaces import LayerPruner, replace_param, runs_own_forward, settings_mismatch, shape_of

__all__ = ["EmbeddingPruner"]


class EmbeddingPruner(LayerPruner):
    """The embedding dimension is the module's ``"out"`` channels. With ``max_norm`` the
    module rescales every row it looks up to that norm, taken over the embedding
    dimension: it normalises across its channels (prunable, approximate, left out of the
    exact oracle, like LayerNorm); before 2026-12-02 verification skipped the group
    ("pruning it breaks the model")."""

    name = "embedding"

    def trace(self, module, call, ctx):
        for ref in call.inputs:  # indices (EmbeddingBag: offsets, per-sample weights) carry no channels
            ctx.label_of(ref)
        renorms = getattr(module, "max_norm", None) is not None
        atoms = ctx.produce(call.name, "out", module.embedding_dim, dim=-1, normalizes=renorms)
        ctx.set_label(call.outputs[0], -1, atoms)

    def trace_param(self, module, name, param, ctx):
        """The weight read outside the module (MobileBERT's MLM head concatenates the tied
        ``decoder.weight.t()`` with another layer's weight): its columns are the
        module's ``"out"`` channels; its rows (the vocabulary) carry none."""
        if param != "weight" or module.weight.ndim != 2:
            return None
        return Label(1, ctx.produce(name, "out", module.embedding_dim, dim=-1))

    def prune(self, module, keep):
        if "out" in keep:
            replace_param(module, "weight", 1, keep["out"])
            module.embedding_dim = keep["out"].numel()

    def settings_problem(self, module):
        w = shape_of(module, "weight")
        if w is None or len(w) != 2:
            return None
        return settings_mismatch(module, {"num_embeddings": w[0], "embedding_dim": w[1]}, f"its weight of shape {w}")

    def weight_energy(self, module, slice_name):
        return (module.weight.detach().float() ** 2).sum(0)


@hookimpl(trylast=True)
def cleanai_layer_pruner(module):
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return None if runs_own_forward(module, ("weight",)) else EmbeddingPruner()
    return None
