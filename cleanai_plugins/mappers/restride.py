"""``as_strided_`` calls that only change the layout of size-1 dimensions.

ATen's ``adaptive_avg_pool2d`` to 1x1 on a channels-last input (torchvision Swin's head:
``Permute([0, 3, 1, 2])`` then ``AdaptiveAvgPool2d(1)``) computes ``mean`` and restrides
the fresh, contiguous result with ``out.as_strided_((n, c, 1, 1), (c, 1, c, c))``. The
strides of the size-1 dimensions change, every element stays where it was, so the
labels pass through. Any other ``as_strided`` is left unclaimed (its channels freeze):
the trace does not record the input's strides, so a real reinterpretation of memory
cannot be told apart from a layout change.
"""

from __future__ import annotations

from cleanai_core import hookimpl
from cleanai_plugins.mappers._registry import MapperTable, arg

table = MapperTable()


def _contiguous_strides(size) -> list[int]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return strides[::-1]


@table.register("as_strided_.default")
def restride_size_one(call, ctx):
    """Labels pass when the size is the input's, the offset 0 and the strides of every
    dimension larger than 1 are the contiguous ones (so, for a contiguous input, only
    size-1 dimensions are restrided)."""
    src = call.args[0]
    size, stride = list(arg(call, 1, "size")), list(arg(call, 2, "stride"))
    if tuple(size) != tuple(src.shape) or arg(call, 3, "storage_offset") not in (None, 0):
        return
    if any(s != c for n, s, c in zip(size, stride, _contiguous_strides(size), strict=True) if n > 1):
        return
    lab = ctx.label_of(src)
    if lab is not None:
        ctx.set_label(call.outputs[0], lab.dim, lab.atoms, lab.origin)


@hookimpl(trylast=True)
def cleanai_index_mapper(op):
    return table.lookup(op)
