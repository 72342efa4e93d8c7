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

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HEAVY_OPS", "ShapeOnlyMode", "map_tensors", "run_for_shape"]

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


#: argument types that hold no tensor: passed on without a call per element (an op's
#: sizes, strides and paddings are lists of ints: most of the elements a trace visits)
_PLAIN = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format})


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``fn`` applied to every tensor in the arguments or results of an ATen op (tensors,
    scalars, and tuples / lists / dicts of them): a lean ``tree_map`` for the per-op path."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)([a if type(a) in _PLAIN else map_tensors(fn, a) for a in obj])
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    return obj


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    return t.to("meta")


def run_for_shape(func: Any, args: tuple, kwargs: dict) -> Any:
    """``func(*args, **kwargs)`` for a heavy op: shapes from the meta kernel, zeros for values."""
    try:
        out = func(*map_tensors(_to_meta, args), **map_tensors(_to_meta, kwargs))
    except Exception:  # no meta kernel, or a mismatch: let the real kernel speak
        return func(*args, **kwargs)
    device = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
    return map_tensors(lambda m: torch.empty_strided(m.size(), m.stride(), dtype=m.dtype, device=device).zero_(), out)


class ShapeOnlyMode(TorchDispatchMode):
    """Dispatch mode in which :data:`HEAVY_OPS` cost no arithmetic (see the module doc)."""

    @staticmethod
    def run(func: Any, args: tuple, kwargs: dict) -> Any:
        if func in HEAVY_OPS:
            return run_for_shape(func, args, kwargs)
        return func(*args, **kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.run(func, args, kwargs or {})
