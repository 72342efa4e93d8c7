"""Bare parameters and buffers used by operations outside claimed modules.

Which dimension carries channels: ``cls_token`` / ``pos_embed`` / ``dist_token`` /
``reg_token`` and layer-scale vectors the last one (the embedding), except positional maps
laid out ``(1, C, H, W)`` (dim 1) and layer scales shaped ``(C, 1, 1)`` to broadcast over
NCHW tensors (FastViT's ``gamma``: dim 0), relative-position
bias tables the last one (heads), or the first where they are laid out ``(heads, 2h - 1, 2w - 1)``
(timm's TF-compatible ``RelPosBiasTf``, MaxViT ``*_tf_*``: its last dimension, the relative
widths, met the lookup buffer and froze every head), LeViT ``attention_biases`` the first one (heads).
Integer and boolean buffers (index tables, masks, counters) never carry channels, nor do
one-hot lookup tables kept as float buffers (``height_lookup`` / ``width_lookup`` of
``RelPosBiasTf``, contracted with a bias table by ``einsum``).
"""

from __future__ import annotations

from cleanai_core import hookimpl

_LAST = ("cls_token", "dist_token", "reg_token", "pos_embed", "relative_position_bias_table", "gamma")
_FIRST = ("attention_biases", "attention_bias_cache")


def _is_nchw_map(leaf: str, parameter) -> bool:
    """A positional map laid out like a feature map, ``(1, C, H, W)`` (PiT, Visformer,
    ``pos_embed1``...): channels on dim 1 when the two last dimensions look spatial."""
    if parameter.ndim != 4 or parameter.shape[0] != 1 or not ("pos" in leaf or leaf in _LAST):
        return False
    _, c, h, w = parameter.shape
    return h == w and c != h


@hookimpl(trylast=True)
def cleanai_unwrapped_parameter(name, parameter, model):
    if not (parameter.is_floating_point() or parameter.is_complex()):
        return False
    leaf = name.rpartition(".")[2]
    if leaf.endswith("_lookup"):
        return False
    if leaf in _FIRST and parameter.ndim >= 1:
        return 0
    if leaf == "relative_position_bias_table" and parameter.ndim == 3:
        return 0
    if _is_nchw_map(leaf, parameter):
        return 1
    if leaf == "gamma" and parameter.ndim > 1 and all(s == 1 for s in parameter.shape[1:]):
        return 0
    if leaf in _LAST and parameter.ndim >= 1:
        return -1
    return None
