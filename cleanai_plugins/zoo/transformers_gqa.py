"""Grouped-query attention of ``transformers`` models: prune the same query heads in
every key/value group, keeping every key/value head.

Without this plugin, grouped-query attention (Llama, Qwen2/3, Mistral, Mixtral, Gemma,
Phi-3 with fewer key/value heads than query heads) loses whole key/value groups: a KV
head with the query heads it serves. With it, the KV heads (and the KV cache) stay and
each group loses the same number of query heads (``num_key_value_groups`` shrinks); see
:mod:`cleanai_plugins.mappers.gqa`. Both modes reload with ``from_pretrained``.

It is not a built-in: whole KV groups stay the default (they shrink the KV cache too,
and on ``benchmarks/llm.py``'s GQA Llama they are as good or better at equal parameter
count, see ``docs/benchmarks.md``). Register it for the runs that want the other mode::

    import cleanai_plugins.zoo.transformers_gqa as gqa
    from cleanai_core.plugins import temporary_plugin

    with temporary_plugin(gqa, name="transformers_gqa"):
        pruner = StructuredPruner(model, x)  # the graph is built here
        pruner.collect_activations(batches)
        small = pruner.prune()
"""

from __future__ import annotations

from cleanai_core import hookimpl
from cleanai_plugins.mappers.gqa import prune_query_heads_per_group
from cleanai_plugins.zoo.transformers.attention import is_attention

__all__ = ["grouped_attention"]


def grouped_attention(model) -> list:
    """The transformers attention modules of ``model`` with more query than KV heads."""
    return [m for m in model.modules() if is_attention(m) and getattr(m, "num_key_value_groups", 1) > 1]


@hookimpl
def cleanai_prepare_model(model):
    found = grouped_attention(model)
    return prune_query_heads_per_group(*found) if found else None
