"""BatchNorm, LayerNorm (also channels-last use, and over several dims), GroupNorm, InstanceNorm, RMS norms
(``nn.RMSNorm`` and timm's ``RmsNorm``/``SimpleNorm`` families), timm's global response
norm (ConvNeXt-V2 ``GlobalResponseNorm``), the timm norm layers that subclass them
(``BatchNormAct2d``, ``LayerNorm2d``, ``RmsNormAct2d``...), layer norms written as a
module of their own with a ``data_format`` (the ConvNeXt repository's ``LayerNorm``), and
``nn.LocalResponseNorm``."""

from __future__ import annotations

from types import SimpleNamespace

from torch import nn

from cleanai_core import hookimpl
from cleanai_core.graph.context import Label
from cleanai_core.interfaces import LayerPruner, runs_own_forward, settings_mismatch, shape_of, slice_params

__all__ = [
    "BatchNormPruner",
    "GlobalResponseNormPruner",
    "GroupNormPruner",
    "LayerNormPruner",
    "LocalResponseNormPruner",
    "RMSNormPruner",
    "SpatialLayerNormPruner",
]

_AFFINE = [("weight", 0), ("bias", 0)]
_STATS = [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]
# timm's RMS norms (x / rms(x)) and SimpleNorms (x / std(x)), matched by class name so
# timm need not be imported; the "2d" forms normalise dim 1 of NCHW tensors
_TIMM_RMS_NORMS = frozenset({"RmsNorm", "RmsNormFp32", "SimpleNorm", "SimpleNormFp32"})
_TIMM_RMS_NORMS_2D = frozenset({"RmsNorm2d", "RmsNorm2dFp32", "SimpleNorm2d", "SimpleNorm2dFp32"})
_TIMM_RMS_NORMS_ALL = _TIMM_RMS_NORMS | _TIMM_RMS_NORMS_2D
#: timm's nn.LayerNorm subclasses that normalise NCHW tensors over dim 1
_TIMM_LAYER_NORMS_2D = frozenset({"LayerNorm2d", "LayerNorm2dFp32", "LayerNormAct2d", "LayerNormAct2dFp32"})


class _PassThrough(LayerPruner):
    """A per-channel layer: output channels are the input channels."""

    tensors = _STATS
    normalizes = False
    #: normalises along its channel dim only, every other dim indexing independent positions
    positionwise = False

    def channel_dim(self, module, x) -> int:
        return 1 if x.ndim > 1 else 0

    def normalizes_across(self, module) -> bool:
        """Whether ``module`` normalises across its channels (:attr:`normalizes`)."""
        return self.normalizes

    def trace(self, module, call, ctx):
        x = call.args[0] if call.args else next(iter(call.kwargs.values()))
        dim = self.channel_dim(module, x)
        lab = ctx.label_of(x)
        if self.positionwise and lab is not None and lab.dim != dim:
            # channels on another dim (the heads of q under a per-head qk-norm): every
            # position along it is normalised alike, so they pass through untouched
            atoms = ctx.new_atoms(
                x.shape[dim], frozen=f"{ctx.where()} normalises dim {dim} alike for every channel on dim {lab.dim}"
            )
            ctx.bind(call.name, "channels", atoms, "param", dim=dim, normalizes=self.normalizes_across(module))
            for out in call.outputs:
                if out.shape == x.shape:
                    ctx.set_label(out, lab.dim, lab.atoms, lab.origin)
            return
        atoms = ctx.labels(x, dim)
        self.constrain(module, atoms, ctx)
        ctx.bind(call.name, "channels", atoms, "param", dim=dim, normalizes=self.normalizes_across(module))
        # the origin (a reshape's split of heads and head dims) goes along, so attention
        # after the norm can still ask for the other split
        origin = lab.origin if lab is not None and lab.dim == dim else None
        for out in call.outputs:
            if out.shape == x.shape:
                ctx.set_label(out, dim, atoms, origin)

    def constrain(self, module, atoms, ctx) -> None:
        return None

    def prune(self, module, keep):
        slice_params(module, {"": keep["channels"]}, {"": self.tensors})
        self.fix(module, keep["channels"].numel())

    def fix(self, module, n: int) -> None:
        module.num_features = n

    def settings_problem(self, module):
        """The attributes :meth:`fix` sets, against the width of the channel tensors."""
        found = next(((a, s) for a, _ in self.tensors if (s := shape_of(module, a))), None)
        if found is None:
            return None
        attr, shape = found
        probe = SimpleNamespace(**{k: v for k, v in vars(module).items() if not k.startswith("_")})
        before = dict(vars(probe))
        self.fix(probe, shape[0])
        expected = {k: v for k, v in vars(probe).items() if before.get(k, probe) != v}
        return settings_mismatch(module, expected, f"its {attr} of shape {shape}")

    def weight_energy(self, module, slice_name):
        w = getattr(module, "weight", None)
        if w is None:
            return None
        return w.detach().float() ** 2


class BatchNormPruner(_PassThrough):
    name = "batchnorm"

    def trace_param(self, module, name, param, ctx):
        """An affine parameter or running statistic read outside the module
        (``F.batch_norm(x, self.bn.running_mean, ...)``, a conv folded with its BN in
        ``forward``): its one dimension is the module's channels."""
        t = getattr(module, param, None) if param in dict(self.tensors) else None
        if type(self).trace is not _PassThrough.trace or t is None or t.ndim != 1:
            return None
        if (name, "channels") not in ctx.slices:
            ctx.bind(name, "channels", ctx.new_atoms(t.shape[0]), "param", dim=1, normalizes=self.normalizes)
        return Label(0, ctx.slices[(name, "channels")].atoms)


class InstanceNormPruner(_PassThrough):
    name = "instancenorm"


class LayerNormPruner(_PassThrough):
    """LayerNorm over the last dimension (channels-last). Normalises across channels:
    pruning changes the statistics, so it is exempt from the masking oracle."""

    name = "layernorm"
    tensors = _AFFINE
    normalizes = True
    positionwise = True

    def channel_dim(self, module, x) -> int:
        channels_first = any(c.__name__ in _TIMM_LAYER_NORMS_2D for c in type(module).__mro__)
        channels_first = channels_first or getattr(module, "data_format", None) == "channels_first"  # HF ConvNeXt
        if channels_first or getattr(module, "_channels_first", False):
            return 1
        n = module.normalized_shape[0] if len(getattr(module, "normalized_shape", ())) == 1 else None
        if n is not None and x.ndim > 1 and x.shape[-1] != n:
            # a subclass that moves the channels last itself (``permute`` in its forward,
            # under a name of its own): the one input dim as wide as the norm holds them
            wide = [d for d in range(x.ndim) if x.shape[d] == n]
            if len(wide) == 1:
                return wide[0]
        return x.ndim - 1

    def fix(self, module, n):
        module.normalized_shape = (n,)


class SpatialLayerNormPruner(LayerNormPruner):
    """``nn.LayerNorm`` over several trailing dimensions, e.g. ``LayerNorm((C, H, W))`` on
    NCHW tensors: the channels are the first normalised dimension, and the affine tensors
    ``(C, H, W)`` follow them along their dim 0 (``normalized_shape`` becomes
    ``(C', H, W)``). Normalises across channels (and space): prunable, approximate, left
    out of the exact oracle. Channels on a dimension before the normalised ones (a
    ``LayerNorm((H, W))``) pass through: every channel is normalised on its own."""

    name = "layernorm_nd"

    def channel_dim(self, module, x) -> int:
        return x.ndim - len(module.normalized_shape)

    def fix(self, module, n):
        module.normalized_shape = (n, *module.normalized_shape[1:])

    def weight_energy(self, module, slice_name):
        w = getattr(module, "weight", None)
        if w is None:
            return None
        return (w.detach().float() ** 2).reshape(w.shape[0], -1).sum(1)


class RMSNormPruner(LayerNormPruner):
    """RMS norm over one channel dimension: ``nn.RMSNorm`` and timm's ``RmsNorm``,
    ``SimpleNorm`` (last dimension) and ``RmsNorm2d``, ``SimpleNorm2d`` (dim 1), their
    ``Fp32`` forms and subclasses (``RmsNormAct2d``). A weight (or none), no bias.
    Normalises across channels, like LayerNorm."""

    name = "rmsnorm"

    def channel_dim(self, module, x) -> int:
        return 1 if _timm_rms_norm(module) in _TIMM_RMS_NORMS_2D else x.ndim - 1


def _timm_rms_norm(module: nn.Module) -> str | None:
    """The name of the timm RMS-norm class ``module`` is or subclasses, provided it
    normalises one dimension and its weight (if any) has that shape; else None."""
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, int):  # a layer norm that keeps the int it was given (I-BERT's IntLayerNorm)
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or len(shape) != 1:  # (torch.Size is a tuple)
        return None
    weight = getattr(module, "weight", None)
    if weight is not None and tuple(weight.shape) != tuple(shape):
        return None
    for cls in type(module).__mro__:
        if cls.__name__ in _TIMM_RMS_NORMS_ALL:
            return cls.__name__
    return None


class GroupNormPruner(_PassThrough):
    """GroupNorm keeps ``num_groups``: the j-th channel of every group is one unit
    (normalised across, approximate). With one channel per group (``GroupNorm(C, C)``,
    an instance norm with affine) every channel is normalised on its own: channels go one
    by one, each taking its group (``num_groups`` follows, exact). Before 2026-12-02 the
    one-channel groups were tied into one unit and nothing could go."""

    name = "groupnorm"
    tensors = _AFFINE
    normalizes = True

    def normalizes_across(self, module) -> bool:
        return not _one_channel_groups(module)

    def constrain(self, module, atoms, ctx):
        g = module.num_groups
        if g > 1 and not _one_channel_groups(module):
            ctx.tie(atoms, (g, atoms.numel() // g), 1)

    def fix(self, module, n):
        if _one_channel_groups(module):
            module.num_groups = n
        module.num_channels = n

    def settings_problem(self, module):
        g, c = module.num_groups, module.num_channels
        if not isinstance(g, int) or isinstance(g, bool) or g < 1 or (isinstance(c, int) and c % g):
            return f"num_groups={g!r} does not divide num_channels={c!r}"
        return super().settings_problem(module)


def _one_channel_groups(module) -> bool:
    return module.num_groups == module.num_channels > 1


class GlobalResponseNormPruner(_PassThrough):
    """timm's ``GlobalResponseNorm`` (ConvNeXt-V2), matched by class name:
    ``x + bias + weight * x * g / mean_c(g)`` with ``g`` the per-channel L2 norm over the
    spatial dims. The mean over channels changes when channels go, so, like LayerNorm,
    the slice normalises: prunable, approximate, left out of the exact oracle. Channels
    on ``module.channel_dim`` (-1 channels-last, 1 for NCHW); ``weight`` and ``bias``
    follow them."""

    name = "grn"
    tensors = _AFFINE
    normalizes = True

    def channel_dim(self, module, x) -> int:
        return module.channel_dim % x.ndim

    def fix(self, module, n):
        return None  # the affine is viewed with ``wb_shape`` (a -1 for the channels)


class LocalResponseNormPruner(_PassThrough):
    """``nn.LocalResponseNorm`` (AlexNet's and GoogLeNet's first versions): each channel is
    divided by the energy of its ``size`` neighbours along dim 1. The neighbours change
    when channels go, so, like GlobalResponseNorm, the slice normalises: prunable,
    approximate, left out of the exact oracle. It holds no tensors. Before 2026-12-01 its
    padding of the channel dim froze them ("pads the channel dimension")."""

    name = "lrn"
    tensors = []
    normalizes = True

    def fix(self, module, n):
        return None


def _timm_grn(module: nn.Module) -> bool:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not any(c.__name__ == "GlobalResponseNorm" for c in type(module).__mro__):
        return False
    if not isinstance(weight, nn.Parameter) or not isinstance(bias, nn.Parameter) or weight.ndim != 1:
        return False
    return getattr(module, "channel_dim", None) in (1, -1) and bias.shape == weight.shape


def _custom_layer_norm(module: nn.Module) -> bool:
    """A layer norm written as a module of its own, the ConvNeXt repository's
    ``LayerNorm`` and its many copies: ``F.layer_norm(x, self.normalized_shape, ...)``
    channels-last, or the mean and variance over dim 1 by hand channels-first, as
    ``data_format`` says. Matched by its attributes: a ``data_format`` of either value, a
    one-dimensional ``normalized_shape``, ``weight`` and ``bias`` of that shape and no
    other parameters or children."""
    if isinstance(module, nn.LayerNorm) or getattr(module, "data_format", None) not in (
        "channels_last",
        "channels_first",
    ):
        return False
    shape, weight, bias = (getattr(module, a, None) for a in ("normalized_shape", "weight", "bias"))
    if not isinstance(shape, (tuple, list)) or len(shape) != 1 or not isinstance(weight, nn.Parameter):
        return False
    if tuple(weight.shape) != tuple(shape) or not (
        bias is None or (isinstance(bias, nn.Parameter) and bias.shape == weight.shape)
    ):
        return False
    return next(module.children(), None) is None and len(list(module.parameters())) == 1 + (bias is not None)


_TORCH_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)
#: the tensors the norm pruners slice
_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@hookimpl(trylast=True)
def cleanai_layer_pruner(module):
    if isinstance(module, _TORCH_NORMS) and runs_own_forward(module, _NORM_TENSORS):
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return BatchNormPruner()
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return InstanceNormPruner()
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return LayerNormPruner()
    if type(module) is nn.LayerNorm and (module.weight is None or module.weight.shape == module.normalized_shape):
        return SpatialLayerNormPruner()
    if isinstance(module, nn.GroupNorm):
        return GroupNormPruner()
    if isinstance(module, nn.RMSNorm):
        return RMSNormPruner() if len(module.normalized_shape) == 1 else None
    if _timm_rms_norm(module) is not None:
        return RMSNormPruner()
    if _timm_grn(module):
        return GlobalResponseNormPruner()
    if _custom_layer_norm(module):
        return LayerNormPruner()
    if isinstance(module, nn.LocalResponseNorm):
        return LocalResponseNormPruner()
    return None
