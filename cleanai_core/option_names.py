"""Stage 1, arguments: keyword names a pruner does not take.

Glossary:

- *peer name*: a keyword of Torch-Pruning's pruners (``ch_sparsity``,
  ``max_pruning_ratio``, ``pruning_ratio_dict``, ...) that users bring to CleanAI. Each is
  answered with CleanAI's way to say the same thing, not read as a second spelling.
- *unknown name*: any other keyword; answered with the closest valid names.

Without this, ``StructuredPruner(model, x, ch_sparsity=0.5)`` failed with Python's bare
``TypeError: ... got an unexpected keyword argument 'ch_sparsity'``."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from cleanai_core.errors import UserError

__all__ = ["PEER_NAMES", "check_option_names", "keywords"]

_LAYERS = "ignored_layers=[...] (modules, names, globs or types)"
_HEADS = (
    "none: the graph decides whether an attention loses whole heads or head width "
    "(and rewrites num_heads / head_dim); to keep an attention's heads, ignore its query projection in " + _LAYERS
)

# Torch-Pruning's keyword -> how CleanAI says it (docs/user-guide.md, "Coming from Torch-Pruning")
PEER_NAMES: Mapping[str, str] = {
    "ch_sparsity": "pruning_ratio= (the same value)",
    "ch_sparsity_dict": "layer_pruning_ratios={layer: ratio} (a tuple of layers as key is one scope)",
    "pruning_ratio_dict": "layer_pruning_ratios={layer: ratio} (a tuple of layers as key is one scope)",
    "max_ch_sparsity": "max_layer_ratio= (the same value; 1.0: no cap)",
    "max_pruning_ratio": "max_layer_ratio= (the same value; 1.0: no cap)",
    "iterative_pruning_ratio_scheduler": "iterative_schedule= (the same function, or its steps + 1 ratios)",
    "ignored_layer_outputs": _LAYERS,
    "ignored_layer_inputs": "ignoring the layer that feeds it, in " + _LAYERS,
    "ignored_params": "the tensor itself in " + _LAYERS,
    "unwrapped_parameters": (
        "nothing: bare nn.Parameters are found by themselves (the cleanai_unwrapped_parameter hook names the dim "
        "where the guess is wrong); to keep one's channels, put it in " + _LAYERS
    ),
    "customized_pruners": (
        "a plugin whose cleanai_layer_pruner hook returns your LayerPruner for the module "
        "(cleanai_core.testing.temporary_plugin registers one for a test)"
    ),
    "root_module_types": "nothing: every layer a plugin slices can root a group; to keep a type, put it in " + _LAYERS,
    "in_channel_groups": "nothing: group counts are read from the model (conv groups, GroupNorm)",
    "out_channel_groups": "nothing: group counts are read from the model (conv groups, GroupNorm)",
    "channel_groups": "nothing: group counts are read from the model (conv groups, GroupNorm)",
    "num_heads": _HEADS,
    "prune_num_heads": _HEADS,
    "prune_head_dims": _HEADS,
    "head_pruning_ratio": _HEADS,
    "group_reduction": "the criterion's reducer=, e.g. get_importance('magnitude', reducer='sum')",
}


def check_option_names(given: Iterable[str], known: Iterable[str], who: str) -> None:
    """Refuse the keywords of ``given`` that ``who`` does not take (``known``): a peer
    name with CleanAI's way to say it, any other with the closest valid names. Raises
    :class:`UserError` (nothing else is checked before)."""
    known = sorted(known)
    unknown = [k for k in given if k not in known]
    if not unknown:
        return
    lines = []
    for k in unknown:
        if k in PEER_NAMES:
            lines.append(f"{k!r} is Torch-Pruning's option; CleanAI's way: {PEER_NAMES[k]}")
        else:
            close = difflib.get_close_matches(k, known, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else f"valid: {', '.join(known)}"
            lines.append(f"{k!r} is not an option ({hint})")
    raise UserError(f"{who} got an option it does not take: " + "; ".join(lines))


def keywords(fn: Any, skip: Iterable[str] = ("self",)) -> list[str]:
    """The named parameters of ``fn`` (not ``*args`` / ``**kwargs``), less ``skip``."""
    import inspect

    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind in kinds and p.name not in set(skip)]
