"""BatchNorm, LayerNorm (also channels-last use), GroupNorm, InstanceNorm, and the timm
norm layers that subclass them (``BatchNormAct2d``, ``LayerNorm2d``...)."""

from __future__ import annotations

from torch import nn

from cleanai_core import hookimpl
from cleanai_core.interfaces import LayerPruner, slice_params

__all__ = ["BatchNormPruner", "GroupNormPruner", "LayerNormPruner"]

_AFFINE = [("weight", 0), ("bias", 0)]
_STATS = [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]


class _PassThrough(LayerPruner):
    """A per-channel layer: output channels are the input channels."""

    tensors = _STATS
    normalizes = False

    def channel_dim(self, module, x) -> int:
        return 1 if x.ndim > 1 else 0

    def trace(self, module, call, ctx):
        x = call.args[0] if call.args else next(iter(call.kwargs.values()))
        dim = self.channel_dim(module, x)
        atoms = ctx.labels(x, dim)
        self.constrain(module, atoms, ctx)
        ctx.bind(call.name, "channels", atoms, "param", dim=dim, normalizes=self.normalizes)
        for out in call.outputs:
            if out.shape == x.shape:
                ctx.set_label(out, dim, atoms)

    def constrain(self, module, atoms, ctx) -> None:
        return None

    def prune(self, module, keep):
        slice_params(module, {"": keep["channels"]}, {"": self.tensors})
        self.fix(module, keep["channels"].numel())

    def fix(self, module, n: int) -> None:
        module.num_features = n

    def weight_energy(self, module, slice_name):
        w = getattr(module, "weight", None)
        if w is None:
            return None
        return w.detach().float() ** 2


class BatchNormPruner(_PassThrough):
    name = "batchnorm"


class InstanceNormPruner(_PassThrough):
    name = "instancenorm"


class LayerNormPruner(_PassThrough):
    """LayerNorm over the last dimension (channels-last). Normalises across channels:
    pruning changes the statistics, so it is exempt from the masking oracle."""

    name = "layernorm"
    tensors = _AFFINE
    normalizes = True

    def channel_dim(self, module, x) -> int:
        if type(module).__name__ == "LayerNorm2d" or getattr(module, "_channels_first", False):
            return 1
        return x.ndim - 1

    def fix(self, module, n):
        module.normalized_shape = (n,)


class GroupNormPruner(_PassThrough):
    """GroupNorm keeps ``num_groups``: the j-th channel of every group is one unit."""

    name = "groupnorm"
    tensors = _AFFINE
    normalizes = True

    def constrain(self, module, atoms, ctx):
        g = module.num_groups
        if g > 1:
            ctx.tie(atoms, (g, atoms.numel() // g), 1)

    def fix(self, module, n):
        module.num_channels = n


@hookimpl(trylast=True)
def cleanai_layer_pruner(module):
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return BatchNormPruner()
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return InstanceNormPruner()
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return LayerNormPruner()
    if isinstance(module, nn.GroupNorm):
        return GroupNormPruner()
    return None
