"""Run a model for its shapes, not its numbers.

Tracing, the check that a pruned model still runs, and FLOP counting need every op's
output shape and every argument check, but not the arithmetic. Under
:class:`ShapeOnlyMode` the compute-heavy ops (convolutions, matrix products, fused
attention) run on the ``meta`` device: PyTorch's meta kernels infer the output shape and
raise on the same mismatches as the real kernels (wrong channel count, wrong reduction
dim, wrong norm width), without touching data. Their outputs come back as zero-filled
tensors on the original device, so every other op still runs for real and the model's
own Python code sees ordinary tensors of the right device, dtype, shape and strides.

On a batch-1 ResNet-50 the convolutions are 85% of a CPU forward pass; skipping them is
what makes tracing cost little more than the Python walk of the model.

An op whose meta kernel is missing or fails runs for real, so a genuine error surfaces
with the real kernel's message.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["HEAVY_OPS", "ShapeOnlyMode", "run_for_shape"]

_aten = torch.ops.aten

#: ATen ops computed on the meta device under :class:`ShapeOnlyMode`. All of them return
#: fresh (non-aliasing) tensors and never write to their inputs.
HEAVY_OPS = frozenset(
    getattr(_aten, name).default
    for name in (
        "convolution",
        "addmm",
        "mm",
        "bmm",
        "baddbmm",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(_aten, name)
)


def _to_meta(a: Any) -> Any:
    return a.to("meta") if isinstance(a, torch.Tensor) else a


def run_for_shape(func: Any, args: tuple, kwargs: dict) -> Any:
    """``func(*args, **kwargs)`` for a heavy op: shapes from the meta kernel, zeros for values."""
    try:
        out = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
    except Exception:  # no meta kernel, or a mismatch: let the real kernel speak
        return func(*args, **kwargs)
    device = next(a.device for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor))
    return tree_map(
        lambda m: (
            torch.empty_strided(m.size(), m.stride(), dtype=m.dtype, device=device).zero_()
            if isinstance(m, torch.Tensor)
            else m
        ),
        out,
    )


class ShapeOnlyMode(TorchDispatchMode):
    """Dispatch mode in which :data:`HEAVY_OPS` cost no arithmetic (see the module doc)."""

    @staticmethod
    def run(func: Any, args: tuple, kwargs: dict) -> Any:
        if func in HEAVY_OPS:
            return run_for_shape(func, args, kwargs)
        return func(*args, **kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.run(func, args, kwargs or {})
