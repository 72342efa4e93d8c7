"""Heterogeneous transformers configs: keys that hold one value per layer.

Glossary:

- *heterogeneous config*: a transformers config built with ``per_layer_config`` (transformers
  5.x, ``integrations.heterogeneity``): sparse overrides ``{layer: {key: value}}`` over the
  global keys, which the families that support it read per layer (Gemma 4's full-attention
  layers: ``head_dim`` and, from ``num_global_key_value_heads``, ``num_key_value_heads``;
  Step-3.7's sliding-window layers: ``num_attention_heads``).
- *per-layer key*: a key some layer overrides (``config.per_layer_attributes``). Reading it
  from the global config raises ``AmbiguousGlobalPerLayerAttributeError``, so every prune of
  such a model failed in the config fix-up (the oracle too); the fix-up reads the global
  values under :func:`global_reads` and writes a per-layer key's pruned counts layer by
  layer (:func:`write_per_layer`): the global value where most layers without an override
  have it, an override where a layer differs. ``from_pretrained`` then rebuilds layers with
  different counts too.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["global_reads", "layer_index", "per_layer_keys", "write_per_layer"]

_ALLOW = "allow_global_per_layer_attribute_access"
_LOGGER = "transformers.integrations.heterogeneity.configuration_utils"  # its "Reading global ..." warning
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def _heterogeneous(config: Any) -> bool:
    return getattr(type(config), "is_heterogeneous", None) is not None and bool(config.is_heterogeneous)


def per_layer_keys(config: Any) -> set[str]:
    """The keys some layer of ``config`` overrides (empty for an ordinary config)."""
    if not _heterogeneous(config):
        return set()
    return set(config.per_layer_attributes or ())


@contextmanager
def global_reads(configs: list[Any]) -> Iterator[None]:
    """Within: the global value of a per-layer key of ``configs`` can be read (the fix-up
    reads every key as ever), without transformers' warning; afterwards as before."""
    found = [c for c in configs if _heterogeneous(c)]
    if not found:
        yield
        return
    held = [(c, c.__dict__.get(_ALLOW, None)) for c in found]
    logger = logging.getLogger(_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    for c in found:
        c.__dict__[_ALLOW] = True
    try:
        yield
    finally:
        logger.setLevel(level)
        for c, was in held:
            if was is None:
                c.__dict__.pop(_ALLOW, None)
            else:
                c.__dict__[_ALLOW] = was


def without_global_reads(config: Any) -> None:
    """Drop the :func:`global_reads` switch from a copy of a config (a model rebuilt from it
    must read its per-layer keys as ``from_pretrained`` will)."""
    getattr(config, "__dict__", {}).pop(_ALLOW, None)


def layer_index(name: str, module: nn.Module) -> int | None:
    """The decoder layer ``module`` (named ``name``) belongs to: its ``layer_idx``, else the
    number after ``layers.`` (``h.``, ``blocks.``) in its name."""
    idx = getattr(module, "layer_idx", None)
    if isinstance(idx, int) and not isinstance(idx, bool):
        return idx
    found = _LAYER.findall(name)
    return int(found[-1]) if found else None


def write_per_layer(config: Any, key: str, values: list[int], layers: list[int | None]) -> bool:
    """Write ``key``'s pruned counts (``values``, one per module, of the layers ``layers``)
    into a heterogeneous ``config``: the global value is the most common among the layers
    that do not override ``key`` (among all where every layer does), the others get an
    override. A layer that shows no count (a KV-shared layer without key projections) takes
    the count of the last layer of its ``layer_types`` type before it. Returns whether it
    wrote (not where a module's layer is unknown)."""
    if key not in per_layer_keys(config) or not values or len(values) != len(layers) or None in layers:
        return False
    spec = config._heterogeneity_spec
    overrides = {int(i): dict(o) for i, o in spec.per_layer_overrides.items()}
    by_layer = dict(zip(layers, values, strict=True))
    kinds = getattr(config, "layer_types", None)
    for i in range(config.num_hidden_layers):
        if i not in by_layer and i in overrides and key in overrides[i] and isinstance(kinds, list):
            earlier = [j for j in range(i) if j in by_layer and kinds[j] == kinds[i]]
            if earlier:
                by_layer[i] = by_layer[earlier[-1]]
    plain = [v for i, v in by_layer.items() if key not in overrides.get(i, {})]
    value = Counter(plain or list(by_layer.values())).most_common(1)[0][0]
    setattr(config, key, value)
    for i, v in by_layer.items():
        if v == value:
            overrides.get(i, {}).pop(key, None)
        else:
            overrides.setdefault(i, {})[key] = v
    config.per_layer_config = {i: o for i, o in overrides.items() if o}
    return True
