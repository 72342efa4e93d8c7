"""Scoring units: the Weight Magnitude - Activation rule and the registry of criteria.

A criterion gets a :class:`Group` and a :class:`ScoringContext` and returns one score
per unit (higher = more important). The context turns per-index quantities of every
slice (squared weights from the layer pruners, activation statistics from
calibration) into per-unit sums.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import nn

from cleanai_core.calibration import ChannelStats
from cleanai_core.errors import UserError
from cleanai_core.graph.context import SliceSpec
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.graph.groups import Group
from cleanai_core.plugins import get_plugin_manager

__all__ = [
    "ScoringContext",
    "WeightActivationImportance",
    "get_importance",
    "get_normalizer",
    "get_reducer",
    "list_importances",
]


@attrs.define(eq=False)
class ScoringContext:
    """What a criterion may read: the graph, calibration statistics, and helpers."""

    graph: DependencyGraph
    stats: Mapping[tuple[str, str], ChannelStats]
    model: nn.Module
    extra: dict[str, Any] = attrs.field(factory=dict)
    _energy: dict[tuple[str, str], torch.Tensor | None] = attrs.field(factory=dict)

    def per_unit(self, group: Group, spec: SliceSpec, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` (one per index of ``spec``) over the indices of each unit."""
        acc = torch.zeros(self.graph.root.numel(), dtype=torch.float64)
        acc.index_add_(0, self.graph.root[spec.atoms], values.detach().to(torch.float64).cpu().reshape(-1))
        return acc[group.units]

    def energy(self, spec: SliceSpec, model: nn.Module | None = None) -> torch.Tensor | None:
        """Per index, the sum of squared weights touching it (from the layer pruner);
        for a bare tensor, its squared values summed over the other dimensions."""
        model = model or self.model
        key = (spec.module, spec.name)
        if model is self.model and key in self._energy:
            return self._energy[key]
        if spec.module == "":
            t = _get_tensor(model, spec.name).detach().float()
            e = (t**2).movedim(spec.dim, 0).reshape(t.shape[spec.dim], -1).sum(1)
        elif spec.pruner is None:
            e = None
        else:
            e = spec.pruner.weight_energy(model.get_submodule(spec.module), spec.name)
            if e is not None and e.numel() != spec.atoms.numel():
                e = None
        if model is self.model:
            self._energy[key] = e
        return e

    def weight_terms(self, group: Group, kinds: tuple[str, ...] = ("in", "out", "param")) -> list[torch.Tensor]:
        out = []
        for spec in group.slices:
            if spec.kind in kinds:
                e = self.energy(spec)
                if e is not None:
                    out.append(self.per_unit(group, spec, e))
        return out

    def consumer_terms(self, group: Group) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per consumer slice with statistics: per-unit (weight energy of the input
        columns, second moment E[x^2], variance, count of indices)."""
        out = []
        for spec in group.slices:
            st = self.stats.get((spec.module, spec.name))
            if spec.kind != "in" or st is None or st.mean is None or st.mean.numel() != spec.atoms.numel():
                continue
            e = self.energy(spec)
            if e is None:
                continue
            ones = torch.ones(spec.atoms.numel())
            out.append(
                (
                    self.per_unit(group, spec, e.to(torch.float64) * 1.0),
                    self.per_unit(group, spec, st.second_moment),
                    self.per_unit(group, spec, st.var),
                    self.per_unit(group, spec, ones),
                )
            )
        return out


def _get_tensor(model: nn.Module, qualified: str) -> torch.Tensor:
    owner, _, attr = qualified.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _norm(x: torch.Tensor) -> torch.Tensor:
    m = x.mean()
    return x / m if float(m) > 0 else torch.ones_like(x)


class WeightActivationImportance:
    """Weight Magnitude - Activation: small weights *and* weak activations go first.

    For each consumer ``k`` of a unit ``u`` (a layer reading those channels), with
    ``w`` the squared norm of the consumer's input columns for ``u`` and ``a`` the
    activation energy of ``u`` at the consumer's input (``E[x^2]``, or ``Var(x)`` when
    bias compensation will fold the mean into the bias), each normalised by its mean
    over the group::

        multiplicative (default):  s_u = mean_k  w~^alpha * a~^beta
        additive (specification):  s_u = mean_k  alpha * w~ + beta * a~

    With ``alpha = beta`` the multiplicative form ranks like ``||W[:, u]||^2 E[x_u^2]``,
    the expected output error of removing ``u`` (a dead channel scores 0 whatever its
    weights). Groups no consumer reads with statistics fall back to weight magnitude.

    :param weight_ratio: ``alpha``.
    :param activation_ratio: ``beta``.
    :param form: ``"multiplicative"`` or ``"additive"``.
    :param statistic: ``"auto"`` (variance with bias compensation, else second
        moment), ``"second_moment"`` or ``"variance"``.
    """

    needs_activations = True

    def __init__(
        self,
        weight_ratio: float = 0.5,
        activation_ratio: float = 0.5,
        form: str = "multiplicative",
        statistic: str = "auto",
    ) -> None:
        if weight_ratio < 0 or activation_ratio < 0 or weight_ratio + activation_ratio <= 0:
            raise UserError(
                f"weight_ratio={weight_ratio} and activation_ratio={activation_ratio}: both must be >= 0 "
                "and at least one > 0 (e.g. 0.5 and 0.5)"
            )
        if form not in ("multiplicative", "additive"):
            raise UserError(f"form={form!r}: use 'multiplicative' or 'additive'")
        if statistic not in ("auto", "second_moment", "variance"):
            raise UserError(f"statistic={statistic!r}: use 'auto', 'second_moment' or 'variance'")
        self.alpha, self.beta, self.form, self.statistic = weight_ratio, activation_ratio, form, statistic

    def __repr__(self) -> str:
        return (
            f"WeightActivationImportance(weight_ratio={self.alpha}, activation_ratio={self.beta}, form={self.form!r})"
        )

    def __call__(self, group: Group, ctx: ScoringContext) -> torch.Tensor:
        terms = ctx.consumer_terms(group)
        if not terms:
            w = ctx.weight_terms(group)
            if not w:
                return torch.ones(group.size, dtype=torch.float64)
            return torch.stack([_norm(t) for t in w]).mean(0)
        use_var = self.statistic == "variance" or (self.statistic == "auto" and ctx.extra.get("bias_compensation"))
        scores = []
        for w, second, var, count in terms:
            a = (var if use_var else second) / count.clamp(min=1)
            w_t, a_t = _norm(w), _norm(a)
            if self.form == "multiplicative":
                scores.append(w_t.clamp(min=0) ** self.alpha * a_t.clamp(min=0) ** self.beta)
            else:
                scores.append(self.alpha * w_t + self.beta * a_t)
        return torch.stack(scores).mean(0)


# -- registries ---------------------------------------------------------------


def _collect(hook_name: str) -> dict[str, Any]:
    pm = get_plugin_manager()
    out: dict[str, Any] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        res = impl.function()
        for name, fn in (res or {}).items():
            if name in out and out[name] is not fn:
                raise UserError(f"two plugins register {hook_name[8:-1]} {name!r} (one is {impl.plugin_name})")
            out[name] = fn
    return out


def list_importances() -> list[str]:
    return sorted(_collect("cleanai_importances"))


def get_importance(name: str, **options: Any) -> Any:
    """An importance criterion by registered name, e.g. ``get_importance("magnitude", p=1)``."""
    table = _collect("cleanai_importances")
    if name not in table:
        raise UserError(f"unknown importance {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name](**options)


def get_reducer(name: str) -> Any:
    table = _collect("cleanai_reducers")
    if name not in table:
        raise UserError(f"unknown reducer {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name]


def get_normalizer(name: str) -> Any:
    table = _collect("cleanai_normalizers")
    if name not in table:
        raise UserError(f"unknown normaliser {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name]
