"""Keep the hidden size (the residual width) of ``transformers`` models by default.

Every decoder or encoder layer reads and writes the residual stream, so its width is one
group coupled across the whole model, with outlier channels that no per-channel score
judges well: the retraining-free methods that work (FLAP, Wanda-sp) prune heads and MLP
width only, and published magnitude pruning of the hidden size collapses (Llama-2-7B at
50%: perplexity 8,479). This plugin names the input embeddings as a default ignore, which
freezes that group; heads and MLP widths still prune.

To prune the hidden size anyway, disable this plugin:
``cleanai --disable-plugin cleanai_plugins.zoo.transformers_hidden prune ...`` or
``CLEANAI_DISABLED_PLUGINS=cleanai_plugins.zoo.transformers_hidden``.
"""

from __future__ import annotations

from cleanai_core import hookimpl


@hookimpl
def cleanai_default_ignores(model):
    if not hasattr(getattr(model, "config", None), "model_type") or not hasattr(model, "get_input_embeddings"):
        return None
    try:
        emb = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    return [emb] if emb is not None else None
