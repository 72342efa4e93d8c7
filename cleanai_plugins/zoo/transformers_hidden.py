"""Keep the hidden size (the residual width) of ``transformers`` models by default.

Every decoder or encoder layer reads and writes the residual stream, so its width is one
group coupled across the whole model, with outlier channels that no per-channel score
judges well: the retraining-free methods that work (FLAP, Wanda-sp) prune heads and MLP
width only, and published magnitude pruning of the hidden size collapses (Llama-2-7B at
50%: perplexity 8,479). This plugin names the input embeddings as a default ignore, which
freezes that group; heads and MLP widths still prune. Where the embeddings are narrower
than the hidden size and a projection maps them into it (ALBERT's
``embedding_hidden_mapping_in``, ELECTRA's ``embeddings_project``, OPT-350m's
``project_in``), that projection is named too: the embeddings' group is not the residual
stream there.

To prune the hidden size anyway, disable this plugin:
``cleanai --disable-plugin cleanai_plugins.zoo.transformers_hidden prune ...`` or
``CLEANAI_DISABLED_PLUGINS=cleanai_plugins.zoo.transformers_hidden``.
"""

from __future__ import annotations

import re

from torch import nn

from cleanai_core import hookimpl

#: a module inside a repeated stack of layers (``layers.3.``, ``h.0.``): not an entry projection
_IN_LAYER = re.compile(r"\.\d+(\.|$)")


def _width(config, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def entry_projections(model: nn.Module, emb: nn.Module) -> list[nn.Module]:
    """The linear layers that map the embeddings' width into a wider or narrower hidden
    size, outside the stack of layers."""
    config = model.config
    hidden = _width(config, ("hidden_size", "d_model", "n_embd", "dim"))
    width = getattr(emb, "embedding_dim", None)
    if hidden is None or not isinstance(width, int) or width == hidden:
        return []
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and (m.in_features, m.out_features) == (width, hidden)
        and not _IN_LAYER.search(name)
    ]


@hookimpl
def cleanai_default_ignores(model):
    if not hasattr(getattr(model, "config", None), "model_type") or not hasattr(model, "get_input_embeddings"):
        return None
    try:
        emb = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    return [emb, *entry_projections(model, emb)] if emb is not None else None
