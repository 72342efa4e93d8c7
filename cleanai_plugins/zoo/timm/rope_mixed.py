"""timm's learnable mixed rotary embedding (``RotaryEmbeddingMixed``: ``vit_*_rope_mixed_*``).

``rope.freqs`` ``(2, depth, num_heads, head_dim / 2)`` holds every block's per-head
frequencies; ``get_embed`` turns them into ``(depth, num_heads, N, 2 * head_dim)`` and
block ``i`` multiplies its queries and keys by entry ``i``. Its channels are the heads
(dim 2): labelled there, head ``h`` of every block meets row ``h`` of the frequencies, so
head ``h`` goes from every block at once and the frequencies shrink with it. Before
session 20 the parameter's guessed dimension was the last one (the frequencies), which
(and the grid coordinates' guessed one, the positions) met the heads in a product
("channels on different dimensions meet in op aten.mul") and
froze every head of the model (vit_small_patch16_rope_mixed_224 kept 0.337 at a ratio
of 0.5). :func:`fix_rope_mixed` keeps ``num_heads`` in step.
"""

from __future__ import annotations

from torch import nn

from cleanai_plugins.zoo import loaded

__all__ = ["fix_rope_mixed", "rope_mixed_dim"]


def _mixed() -> type | None:
    pos = loaded("timm.layers.pos_embed_sincos")
    return getattr(pos, "RotaryEmbeddingMixed", None) if pos is not None else None


def rope_mixed_dim(name: str, parameter, model: nn.Module) -> int | bool | None:
    """For a ``RotaryEmbeddingMixed``'s tensors: 2 (the heads) for ``freqs``, False (no
    channels) for the grid coordinates ``t_x`` / ``t_y``, whose guessed dimension (the
    positions) met the heads in the same product; None for any other tensor."""
    owner, _, leaf = name.rpartition(".")
    mixed = _mixed()
    if mixed is None or leaf not in ("freqs", "t_x", "t_y"):
        return None
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return None
    if not isinstance(module, mixed):
        return None
    if leaf != "freqs":
        return False
    return 2 if parameter.ndim == 4 and parameter.shape[2] == module.num_heads else None


def fix_rope_mixed(module: nn.Module) -> None:
    """``num_heads`` follows the kept rows of ``freqs``."""
    mixed = _mixed()
    if mixed is not None and isinstance(module, mixed) and module.freqs.shape[2] != module.num_heads:
        module.num_heads = int(module.freqs.shape[2])
