"""Configs of hierarchical vision models (Swin, ConvNeXt): one width per stage.

Their configs hold per-stage lists (``depths``, Swin's ``num_heads``, ConvNeXt's
``hidden_sizes``) and derive the rest from them: Swin's stage ``i`` is
``embed_dim * 2**i`` wide with an MLP of ``int(mlp_ratio * width)`` and a head size of
``width // num_heads[i]``; ConvNeXt's MLP is ``4 * hidden_sizes[i]``. The per-stage
widths read from the modules are written where a key holds them; whether the config
then describes the pruned model (only when every stage shrank in the ratios the family
derives) is decided by rebuilding it (:func:`.config.rebuild_mismatches`), so a model
it cannot describe is reported ``from_pretrained: false`` and reloads through
``cleanai_core.load_pruned``.
"""

from __future__ import annotations

import re
from collections import defaultdict

from torch import nn

from cleanai_plugins.zoo.transformers.attention import head_counts, is_attention, proj_in_width, proj_width

__all__ = ["is_staged", "write_stages"]

# ``...stages.2.layers.0.`` (ConvNeXt), ``...layers.2.blocks.0.`` (Swin): stage index
_STAGE = re.compile(r"(?:^|\.)(?:stages|layers)\.(\d+)\.(?:layers|blocks)\.\d+(?:\.|$)")
_MLP_UP = re.compile(r"(?:^|\.)(?:mlp\.fc1|pwconv1)$")


def is_staged(config) -> bool:
    """A config with per-stage lists (``depths`` and per-stage heads or widths)."""
    return isinstance(getattr(config, "depths", None), (list, tuple)) and (
        isinstance(getattr(config, "num_heads", None), (list, tuple))
        or isinstance(getattr(config, "hidden_sizes", None), (list, tuple))
    )


def _per_stage(model: nn.Module) -> dict[str, dict[int, list[int]]]:
    """Per stage: the widths its blocks show (``dim``, ``mlp``, ``heads``)."""
    found: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for name, module in model.named_modules():
        m = _STAGE.search(name)
        if m is None:
            continue
        stage = int(m.group(1))
        if _MLP_UP.search(name) and proj_width(module) is not None:
            found["dim"][stage].append(proj_in_width(module))
            found["mlp"][stage].append(proj_width(module))
        elif is_attention(module) and head_counts(module) is not None:
            found["heads"][stage].append(head_counts(module)[0])
    return found


def write_stages(model: nn.Module, config) -> dict:
    """Write the per-stage widths of ``model`` into ``config``; returns the keys whose
    blocks within a stage disagree (``{key: [[widths of stage 0], ...]}``)."""
    found, record = _per_stage(model), {}
    stages = len(config.depths)

    def uniform(key: str) -> list[int] | None:
        per = found.get(key, {})
        if sorted(per) != list(range(stages)):
            return None
        if any(len(set(per[s])) > 1 for s in per):
            record[key] = [per[s] for s in range(stages)]
        return [per[s][0] for s in range(stages)]

    dims, mlps, heads = uniform("dim"), uniform("mlp"), uniform("heads")
    if heads is not None and isinstance(getattr(config, "num_heads", None), (list, tuple)):
        config.num_heads = heads
    if dims is not None and isinstance(getattr(config, "hidden_sizes", None), (list, tuple)):
        config.hidden_sizes = dims
    if dims is not None and isinstance(getattr(config, "embed_dim", None), int):
        config.embed_dim = dims[0]
        if isinstance(getattr(config, "hidden_size", None), int):
            config.hidden_size = int(dims[0] * 2 ** (stages - 1))
    if dims is not None and mlps is not None and isinstance(getattr(config, "mlp_ratio", None), float):
        ratios = {m / d for m, d in zip(mlps, dims, strict=True)}
        if len(ratios) == 1:
            config.mlp_ratio = ratios.pop()
    return record
