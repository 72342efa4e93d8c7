"""Activations with parameters: PReLU with one slope per channel."""

from __future__ import annotations

from torch import nn

from cleanai_core import hookimpl
from cleanai_core.interfaces import runs_own_forward
from cleanai_plugins.layers.norm import _PassThrough

__all__ = ["PReLUPruner"]


class PReLUPruner(_PassThrough):
    name = "prelu"
    tensors = [("weight", 0)]

    def fix(self, module, n):
        module.num_parameters = n


@hookimpl(trylast=True)
def cleanai_layer_pruner(module):
    if isinstance(module, nn.PReLU) and module.num_parameters > 1:
        return None if runs_own_forward(module, ("weight",)) else PReLUPruner()
    return None
