"""Bare parameters and buffers used by operations outside claimed modules.

Which dimension carries channels: ``cls_token`` / ``pos_embed`` / ``dist_token`` /
``reg_token`` and layer-scale vectors the last one (the embedding), relative-position
bias tables the last one (heads), LeViT ``attention_biases`` the first one (heads).
Integer and boolean buffers (index tables, masks, counters) never carry channels.
"""

from __future__ import annotations

from cleanai_core import hookimpl

_LAST = ("cls_token", "dist_token", "reg_token", "pos_embed", "relative_position_bias_table", "gamma")
_FIRST = ("attention_biases", "attention_bias_cache")


@hookimpl(trylast=True)
def cleanai_unwrapped_parameter(name, parameter, model):
    if not (parameter.is_floating_point() or parameter.is_complex()):
        return False
    leaf = name.rpartition(".")[2]
    if leaf in _FIRST and parameter.ndim >= 1:
        return 0
    if leaf in _LAST and parameter.ndim >= 1:
        return -1
    return None
