"""Keep the hidden size (the residual width) of ``transformers`` models by default.

Every decoder or encoder layer reads and writes the residual stream, so its width is one
group coupled across the whole model, with outlier channels that no per-channel score
judges well: the retraining-free methods that work (FLAP, Wanda-sp) prune heads and MLP
width only, and published magnitude pruning of the hidden size collapses (Llama-2-7B at
50%: perplexity 8,479). This plugin names the input embeddings as a default ignore (and the
other embedding modules tied to their weight: the encoder's and decoder's
``embed_tokens`` of BART-like models, whose ``shared`` embedding is never called), which
freezes that group; heads and MLP widths still prune. Where the embeddings are narrower
than the hidden size and a projection maps them into it (ALBERT's
``embedding_hidden_mapping_in``, ELECTRA's ``embeddings_project``, OPT-350m's
``project_in``), that projection is named too: the embeddings' group is not the residual
stream there. An encoder-decoder model whose decoder has embeddings of its own (FSMT's
target vocabulary) names those too.

The hidden size kept, every other width that the model's config cannot describe is kept
too (``cleanai_default_freezes``, :mod:`cleanai_plugins.zoo.transformers.describable`):
a sequence classifier's pooler (``hidden_size`` wide, no key of its own), the heads where
the head size is ``hidden_size / num_attention_heads`` (BERT), MobileBERT's bottlenecks;
so the pruned model is one ``from_pretrained`` loads (uniform pruning: the same ratio for
every group). The entry projection may read several embeddings side by side (MobileBERT's
trigram input: 3 x ``embedding_size``).
Where keeping those widths would leave nothing free (Bloom, MPT, GPT-1, XLM: the MLP is a
fixed multiple of the hidden size in code and the head size is derived), they prune anyway,
with a warning, and the pruned model reloads with ``load_pruned``.

To prune the hidden size and those widths anyway, disable this plugin (then reload the
pruned model with ``cleanai_core.load_pruned``):
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
    """The linear layers that map the embeddings' width (or several embeddings side by
    side: MobileBERT's trigram input) into a wider or narrower hidden size, outside the
    stack of layers."""
    config = model.config
    hidden = _width(config, ("hidden_size", "d_model", "n_embd", "dim"))
    width = getattr(emb, "embedding_dim", None)
    if hidden is None or not isinstance(width, int) or width == hidden:
        return []
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and m.out_features == hidden != m.in_features
        and m.in_features % width == 0
        and not _IN_LAYER.search(name)
    ]


@hookimpl
def cleanai_default_ignores(model):
    if not hasattr(getattr(model, "config", None), "model_type") or not hasattr(model, "get_input_embeddings"):
        return None
    try:
        emb = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return outer_embeddings(model) or None
    if emb is None:
        return None
    if not isinstance(emb, nn.Module):  # Perceiver's is its latents array (a parameter): no embedding layer
        return outer_embeddings(model) or None
    return [emb, *tied_copies(model, emb), *entry_projections(model, emb), *decoder_embeddings(model, emb)]


def outer_embeddings(model: nn.Module) -> list[nn.Module]:
    """Every ``nn.Embedding`` outside the stack of layers, for a model with no one input
    embedding (``get_input_embeddings`` not implemented): CANINE embeds characters with 8
    hash-bucket tables of ``hidden_size / 8`` side by side plus position and token-type
    tables, the residual stream's width; without them named the default pruned it (the
    hidden size 64 -> 32 at 0.5)."""
    return [m for name, m in model.named_modules() if isinstance(m, nn.Embedding) and not _IN_LAYER.search(name)]


def decoder_embeddings(model: nn.Module, emb: nn.Module) -> list[nn.Module]:
    """The decoder's own input embeddings where they are not the encoder's (FSMT: a source
    and a target vocabulary): the decoder's residual stream, the same ``d_model``."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError, TypeError):
        return []
    own = getattr(decoder, "embed_tokens", None)
    if not isinstance(own, nn.Embedding) or own is emb or getattr(own, "weight", None) is getattr(emb, "weight", None):
        return []
    return [own]


def tied_copies(model: nn.Module, emb: nn.Module) -> list[nn.Module]:
    """Other embedding modules holding the input embeddings' weight: an encoder-decoder
    model's ``get_input_embeddings()`` is its ``shared`` embedding, which its forward never
    calls; the encoder's and decoder's ``embed_tokens`` (BART, mBART, M2M100, Pegasus: a
    scaled embedding, another module on the same weight) read the tokens instead."""
    weight = getattr(emb, "weight", None)
    if weight is None:
        return []
    return [m for m in model.modules() if isinstance(m, nn.Embedding) and m is not emb and m.weight is weight]


@hookimpl
def cleanai_default_freezes(graph, ratio):
    if not hasattr(getattr(graph.model, "config", None), "model_type") and not any(
        hasattr(getattr(m, "config", None), "model_type") for m in graph.model.children()
    ):
        return None
    from cleanai_plugins.zoo.transformers.describable import undescribable

    return undescribable(graph, ratio) or None
