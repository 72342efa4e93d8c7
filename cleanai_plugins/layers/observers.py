"""Quantization observers of a prepared model (``torch.ao.quantization.prepare`` /
``prepare_fx``): per-tensor observers pass their input through.

An observer's ``forward`` records statistics of a detached copy of its input (a min / max,
a histogram) and returns the input itself. Traced op by op, those bookkeeping operations
(``resize_`` of the histogram, ``add`` of running values) froze every channel an observer
saw, which is every stream of a prepared model: "nothing in this model can be pruned" for a
prepared ResNet. Claimed whole, a per-tensor observer is an identity on its channels;
its statistics describe the whole tensor, which stays a valid (if wider) range after
pruning: calibrate again before ``convert``. Per-channel observers (``ch_axis``) and fake
quantizers (quantization-aware training, whose scale changes with every forward) are left
to the trace, which freezes what they read.
"""

from __future__ import annotations

from cleanai_core import hookimpl
from cleanai_core.interfaces import LayerPruner
from cleanai_plugins.zoo import loaded

__all__ = ["ObserverPruner"]


class ObserverPruner(LayerPruner):
    """A per-tensor observer: its output is its input, channels and all; nothing to slice."""

    name = "observer"

    def trace(self, module, call, ctx):
        x = call.args[0] if call.args else next(iter(call.kwargs.values()), None)
        lab = ctx.label_of(x)
        if lab is None:
            return
        for out in call.outputs:
            if getattr(out, "shape", None) == x.shape:
                ctx.set_label(out, lab.dim, lab.atoms, lab.origin, lab.cross)

    def prune(self, module, keep):
        return None


@hookimpl(trylast=True)
def cleanai_layer_pruner(module):
    observer = loaded("torch.ao.quantization.observer")
    if observer is not None and isinstance(module, observer.ObserverBase) and not hasattr(module, "ch_axis"):
        return ObserverPruner()
    return None
