"""Built-in importance criteria: weight_activation (default), magnitude, bn_scale,
taylor, hessian, random, lamp, fpgm."""

from __future__ import annotations

import math

import torch
from torch import nn

from cleanai_core import hookimpl
from cleanai_core.errors import UserError
from cleanai_core.scoring import ScoringContext, WeightActivationImportance, get_reducer, mean_normalized

__all__ = [
    "BNScaleImportance",
    "FPGMImportance",
    "HessianImportance",
    "LAMPImportance",
    "MagnitudeImportance",
    "RandomImportance",
    "TaylorImportance",
]


class MagnitudeImportance:
    """Group weight magnitude: per slice that touches the unit (producer filters,
    consumer columns, norm affines), the sum of ``|w| ** p`` over the unit's weights
    (``p=2``, the default: the squared L2 norm; ``p=1``: the L1 norm, as Torch-Pruning's
    ``GroupMagnitudeImportance``; any other ``p > 0`` as its ``MagnitudeImportance(p=...)``
    takes it), divided by the slice's mean over the group's units, then folded over the
    slices by ``reducer`` (default ``"mean"``). Data-free. It said "the Lp norm", which for
    ``p=2`` ranks otherwise once the slices are averaged."""

    needs_activations = False
    needs_gradients = False

    def __init__(self, p: float = 2, reducer: str = "mean") -> None:
        # 1 and 2 only, before 2026-12-02: Torch-Pruning's users also pass p=3, 4 or 0.5
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p < math.inf:
            raise UserError(f"magnitude p={p!r}: give a positive finite number (1: L1, 2: squared L2, the default)")
        self.p = p
        self.reducer, self.reduce = reducer, get_reducer(reducer)

    def __call__(self, group, ctx: ScoringContext) -> torch.Tensor:
        # energy() sums squares, so the weights are read as |w|^(p/2): their squares sum to sum |w|^p
        model = ctx.model if self.p == 2 else ctx.transformed(f"l{self.p:g}", self._root)
        terms = []
        for spec in group.slices:
            e = ctx.energy(spec, model)
            if e is not None:
                terms.append(mean_normalized(ctx.per_unit(group, spec, e)))
        if not terms:
            return torch.ones(group.size, dtype=torch.float64)
        return self.reduce(torch.stack(terms))

    def _root(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return w.abs().sqrt() if self.p == 1 else w.abs() ** (self.p / 2)


class BNScaleImportance:
    """``|gamma|`` of the norm layers in the group (network slimming). Groups without
    a norm fall back to magnitude. Terms folded by ``reducer`` (default ``"mean"``)."""

    needs_activations = False
    needs_gradients = False

    def __init__(self, reducer: str = "mean") -> None:
        self.reducer, self.reduce = reducer, get_reducer(reducer)
        self.fallback = MagnitudeImportance(reducer=reducer)

    def __call__(self, group, ctx: ScoringContext) -> torch.Tensor:
        terms = [
            ctx.per_unit(group, s, ctx.energy(s).sqrt())
            for s in group.slices
            if s.kind == "param" and s.module and ctx.energy(s) is not None
        ]
        if not terms:
            return self.fallback(group, ctx)
        return self.reduce(torch.stack([mean_normalized(t) for t in terms]))


class TaylorImportance:
    """First-order Taylor: ``sum (w * dL/dw)^2`` over the weights touching the unit,
    with gradients of the cross-entropy loss on labelled calibration data
    (``collect_activations`` accumulates them into ``ctx.gradients`` because
    ``needs_gradients`` is set). Needs labelled data. Terms folded by ``reducer`` (default
    ``"sum"``)."""

    needs_activations = True
    needs_gradients = True

    def __init__(self, reducer: str = "sum") -> None:
        self.reducer, self.reduce = reducer, get_reducer(reducer)

    def __call__(self, group, ctx: ScoringContext) -> torch.Tensor:
        grads = ctx.gradients
        if not grads:
            raise UserError("taylor importance needs gradients: call collect_activations with labelled data first")
        model = ctx.transformed("taylor", lambda name, p: p * grads.get(name, 0))
        terms = []
        for spec in group.slices:
            e = ctx.energy(spec, model)
            if e is not None:
                terms.append(ctx.per_unit(group, spec, e))
        if not terms:
            return torch.ones(group.size, dtype=torch.float64)
        return self.reduce(torch.stack(terms))


class HessianImportance:
    """Optimal Brain Damage with the empirical Fisher as the Hessian's diagonal:
    ``sum w^2 * sum_s g_s^2`` over the weights touching the unit, ``g_s`` the gradient of
    sample ``s``'s own cross-entropy on labelled calibration data (calibration takes one
    backward pass per sample). Where Taylor squares the gradient summed over the data,
    gradients of opposite sign in different samples do not cancel here. Terms folded by
    ``reducer`` (default ``"sum"``)."""

    needs_activations = True
    needs_gradients = True
    needs_squared_gradients = True

    def __init__(self, reducer: str = "sum") -> None:
        self.reducer, self.reduce = reducer, get_reducer(reducer)

    def __call__(self, group, ctx: ScoringContext) -> torch.Tensor:
        fisher = ctx.gradients
        if not fisher:
            raise UserError("hessian importance needs gradients: call collect_activations with labelled data first")
        model = ctx.transformed("hessian", lambda name, p: p * fisher[name].sqrt() if name in fisher else p * 0)
        terms = [ctx.per_unit(group, s, e) for s in group.slices if (e := ctx.energy(s, model)) is not None]
        if not terms:
            return torch.ones(group.size, dtype=torch.float64)
        return self.reduce(torch.stack(terms))


class RandomImportance:
    """Random scores (a baseline). Seeded."""

    needs_activations = False
    needs_gradients = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, group, ctx):
        return torch.rand(group.size, generator=self.gen, dtype=torch.float64)


class LAMPImportance(MagnitudeImportance):
    """Magnitude rescaled LAMP-style: ``s_u^2 / sum_{v: s_v >= s_u} s_v^2``, which makes
    scores comparable across groups for global pruning."""

    def __call__(self, group, ctx):
        s = super().__call__(group, ctx)
        from cleanai_plugins.reducers import lamp

        return lamp(s)


class FPGMImportance:
    """Filter pruning via the geometric median (He et al., CVPR 2019; Torch-Pruning's
    ``FPGMImportance``): a filter close to all the others is the one the rest can stand
    in for. Per producer slice whose units are a layer's filters (the output rows of a
    ``Linear`` or of a non-transposed convolution), each filter scores the sum of its
    ``p``-norm distances to the layer's other filters, divided by the slice's mean over
    the group's units; the slices are folded by ``reducer`` (default ``"mean"``). A group
    that no such layer produces (a norm or a bare tensor alone) is scored by
    :class:`MagnitudeImportance`. Data-free."""

    needs_activations = False
    needs_gradients = False

    def __init__(self, p: float = 2, reducer: str = "mean") -> None:
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p < math.inf:
            raise UserError(f"fpgm p={p!r}: give a positive finite number (the order of the distance; 2, the default)")
        self.p = p
        self.reducer, self.reduce = reducer, get_reducer(reducer)
        self.fallback = MagnitudeImportance(reducer=reducer)

    def __call__(self, group, ctx: ScoringContext) -> torch.Tensor:
        terms = []
        for spec in group.slices:
            rows = _filters(ctx, spec)
            if rows is not None and rows.shape[0] > 1:
                # in blocks of rows: a 11008-filter MLP projection would hold a 1 GB distance matrix at once
                d = torch.cat([torch.cdist(b, rows, p=float(self.p)).sum(1) for b in rows.split(1024)])
                terms.append(mean_normalized(ctx.per_unit(group, spec, d)))
        if not terms:
            return self.fallback(group, ctx)
        return self.reduce(torch.stack(terms))


def _filters(ctx: ScoringContext, spec) -> torch.Tensor | None:
    """The filters of ``spec``'s layer as rows ``(out, in * k)``, float64, where the slice is
    the output of a ``Linear`` or of a non-transposed convolution; else ``None``."""
    if spec.kind != "out" or not spec.module:
        return None
    node = ctx.graph.nodes.get(spec.module) if ctx.model is ctx.graph.model else None
    module = node.module if node is not None else ctx.model.get_submodule(spec.module)
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        return None
    if not isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
        return None
    w = module.weight.detach()
    if w.shape[0] != spec.atoms.numel() or w.is_complex():
        return None
    return w.reshape(w.shape[0], -1).to(torch.float64).cpu()


@hookimpl(trylast=True)
def cleanai_importances():
    return {
        "weight_activation": WeightActivationImportance,
        "magnitude": MagnitudeImportance,
        "bn_scale": BNScaleImportance,
        "taylor": TaylorImportance,
        "hessian": HessianImportance,
        "random": RandomImportance,
        "lamp": LAMPImportance,
        "fpgm": FPGMImportance,
    }
