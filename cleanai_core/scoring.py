"""Scoring units: the Weight Magnitude - Activation rule and the registry of criteria.

A criterion (:class:`~cleanai_core.interfaces.Importance`) gets a :class:`Group` and a
:class:`ScoringContext` and returns one score per unit (higher = more important). The
context turns per-index quantities of every slice (squared weights from the layer
pruners, activation statistics from calibration, loss gradients) into per-unit terms,
one per slice; the criterion's *reducer* (registry ``cleanai_reducers``: ``mean``,
``sum``, ``max``...) folds the stacked terms ``(n_terms, n_units)`` into one score per
unit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from cleanai_core.calibration import ChannelStats
from cleanai_core.errors import UserError, shown
from cleanai_core.graph.context import SliceSpec
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.graph.groups import Group
from cleanai_core.model_state import copy_model
from cleanai_core.option_names import PEER_IMPORTANCES
from cleanai_core.plugins import get_plugin_manager
from cleanai_core.slicing import get_submodule_and_attr

__all__ = [
    "ScoringContext",
    "WeightActivationImportance",
    "get_importance",
    "get_normalizer",
    "get_reducer",
    "importance_name",
    "list_importances",
    "mean_normalized",
]


@attrs.define(eq=False)
class ScoringContext:
    """Everything a criterion receives with each group, for one scoring pass.

    Data:

    - ``graph``: the :class:`DependencyGraph` (``graph.root`` maps atoms to units);
    - ``stats``: calibration statistics per ``(module, slice)`` (empty when the
      criterion is data-free);
    - ``model``: the model being scored (read only);
    - ``bias_compensation``: whether the removed channels' mean will be folded into the
      consumers' biases (then the variance, not the second moment, is what is lost);
    - ``gradients``: loss gradients per parameter name, accumulated over labelled
      calibration data when the criterion ``needs_gradients`` (else ``None``).

    Helpers: :meth:`per_unit`, :meth:`energy`, :meth:`weight_terms`,
    :meth:`consumer_terms` and :meth:`transformed` (a copy of the model with mapped
    weights, made once per context).

    ``extra`` is the old untyped way in (``{"bias_compensation": ..., "gradients": ...}``,
    what ``StructuredPruner`` passes until the pruner split): its keys fill the typed
    fields; criteria never read it.
    """

    graph: DependencyGraph
    stats: Mapping[tuple[str, str], ChannelStats]
    model: nn.Module
    extra: Mapping[str, Any] = attrs.field(factory=dict, kw_only=True)
    bias_compensation: bool = attrs.field(default=False, kw_only=True)
    gradients: Mapping[str, torch.Tensor] | None = attrs.field(default=None, kw_only=True)
    _energy: dict[tuple[str, str], torch.Tensor | None] = attrs.field(factory=dict, init=False)
    _transformed: dict[str, nn.Module] = attrs.field(factory=dict, init=False)
    _acc: torch.Tensor | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        unknown = set(self.extra) - {"bias_compensation", "gradients"}
        if unknown:
            raise TypeError(f"ScoringContext(extra=...) has no field(s) {sorted(unknown)}")
        self.bias_compensation = bool(self.extra.get("bias_compensation", self.bias_compensation))
        self.gradients = self.extra.get("gradients", self.gradients)

    def transformed(self, key: str, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> nn.Module:
        """A copy of :attr:`model` whose float parameters are ``fn(name, p)``, made on the
        first call with ``key`` and reused for every group of this pass (e.g. ``|w|^(1/2)``
        for an L1 magnitude, ``w * dL/dw`` for Taylor), so :meth:`energy` can read it."""
        if key not in self._transformed:
            clone = copy_model(self.model)
            with torch.no_grad():
                for name, p in clone.named_parameters():
                    if p.is_floating_point():
                        p.copy_(fn(name, p))
            self._transformed[key] = clone
        return self._transformed[key]

    def per_unit(self, group: Group, spec: SliceSpec, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` (one per index of ``spec``) over the indices of each unit."""
        if self._acc is None:  # one accumulator over all atoms, put back to zeros after each use
            self._acc = torch.zeros(self.graph.root.numel(), dtype=torch.float64)
        acc, idx = self._acc, self.graph.root[spec.atoms]
        acc.index_add_(0, idx, values.detach().to(torch.float64).cpu().reshape(-1))
        out = acc[group.units]
        acc.index_fill_(0, idx, 0.0)
        return out

    def energy(self, spec: SliceSpec, model: nn.Module | None = None) -> torch.Tensor | None:
        """Per index, the sum of squared weights touching it (from the layer pruner);
        for a bare tensor, its squared values summed over the other dimensions."""
        model = self.model if model is None else model
        key = (spec.module, spec.name)
        if model is self.model and key in self._energy:
            return self._energy[key]
        if spec.kind in ("index", "count"):  # positions or a number, not weights
            e = None
        elif spec.module == "":
            t = _get_tensor(model, spec.name).detach()
            t = (t.abs() if t.is_complex() else t).float()
            e = (t**2).movedim(spec.dim, 0).reshape(t.shape[spec.dim], -1).sum(1)
        elif spec.pruner is None:
            e = None
        else:
            node = self.graph.nodes.get(spec.module) if model is self.graph.model else None
            module = node.module if node is not None else model.get_submodule(spec.module)
            e = spec.pruner.weight_energy(module, spec.name)
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
    owner, attr = get_submodule_and_attr(model, qualified)
    return getattr(owner, attr)


def mean_normalized(x: torch.Tensor) -> torch.Tensor:
    """``x`` divided by its mean (all ones when the mean is not positive): makes terms of
    different scales (weights, activations, slices) comparable within a group."""
    m = x.mean()
    return x / m if float(m) > 0 else torch.ones_like(x)


def _checked_ratios(weight_ratio: Any, activation_ratio: Any) -> None:
    """Both finite numbers >= 0, at least one > 0."""
    for name, v in (("weight_ratio", weight_ratio), ("activation_ratio", activation_ratio)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise UserError(f"{name}={v!r} must be a finite number >= 0 (e.g. 0.5)")
    if weight_ratio < 0 or activation_ratio < 0 or weight_ratio + activation_ratio <= 0:
        raise UserError(
            f"weight_ratio={weight_ratio} and activation_ratio={activation_ratio}: both must be >= 0 "
            "and at least one > 0 (e.g. 0.5 and 0.5)"
        )


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
    :param reducer: how the per-consumer scores fold into one (a registered reducer,
        default ``"mean"``, the ``mean_k`` above).
    """

    needs_activations = True
    needs_gradients = False

    def __init__(
        self,
        weight_ratio: float = 0.5,
        activation_ratio: float = 0.5,
        form: str = "multiplicative",
        statistic: str = "auto",
        reducer: str = "mean",
    ) -> None:
        _checked_ratios(weight_ratio, activation_ratio)
        self.alpha, self.beta, self.form, self.statistic = weight_ratio, activation_ratio, form, statistic
        self.reducer = reducer

    #: the constructor's names of ``alpha`` and ``beta``
    _ALIASES = {"weight_ratio": "alpha", "activation_ratio": "beta"}

    def __setattr__(self, name: str, value: Any) -> None:
        """Every option checked as the constructor checks it, also when set afterwards:
        ``imp.weight_ratio = 0.8`` set an attribute nothing read (the scores stayed at 0.5),
        ``imp.alpha = -1`` or ``imp.form = "nope"`` were taken."""
        name = self._ALIASES.get(name, name)
        if name in ("alpha", "beta"):
            other = getattr(self, "beta" if name == "alpha" else "alpha", 1.0)  # the constructor checked both
            _checked_ratios(*((value, other) if name == "alpha" else (other, value)))
        elif name == "form" and value not in ("multiplicative", "additive"):
            raise UserError(f"form={value!r}: use 'multiplicative' or 'additive'")
        elif name == "statistic" and value not in ("auto", "second_moment", "variance"):
            raise UserError(f"statistic={value!r}: use 'auto', 'second_moment' or 'variance'")
        elif name == "reducer":
            object.__setattr__(self, "reduce", get_reducer(value))
        object.__setattr__(self, name, value)

    @property
    def weight_ratio(self) -> float:
        return self.alpha

    @property
    def activation_ratio(self) -> float:
        return self.beta

    def __repr__(self) -> str:
        # the options that change the scores beyond the defaults' (statistic, reducer) are named too
        options = (("statistic", self.statistic, "auto"), ("reducer", self.reducer, "mean"))
        extra = "".join(f", {k}={v!r}" for k, v, default in options if v != default)
        return (
            f"WeightActivationImportance(weight_ratio={self.alpha}, activation_ratio={self.beta}, form={self.form!r}"
            f"{extra})"
        )

    def __call__(self, group: Group, ctx: ScoringContext) -> torch.Tensor:
        terms = ctx.consumer_terms(group)
        if not terms:
            w = ctx.weight_terms(group)
            if not w:
                return torch.ones(group.size, dtype=torch.float64)
            return self.reduce(torch.stack([mean_normalized(t) for t in w]))
        use_var = self.statistic == "variance" or (self.statistic == "auto" and ctx.bias_compensation)
        scores = []
        for w, second, var, count in terms:
            a = (var if use_var else second) / count.clamp(min=1)
            w_t, a_t = mean_normalized(w), mean_normalized(a)
            if self.form == "multiplicative":
                w_t, a_t = w_t.clamp(min=0), a_t.clamp(min=0)
                s = w_t**self.alpha * a_t**self.beta
                under = int(((s == 0) & (w_t > 0) & (a_t > 0)).sum())  # underflowed from two terms above 0
            else:
                s = self.alpha * w_t + self.beta * a_t
                under = 0
            # units that float64 cannot tell apart at these ratios (two or more inf, or 0 by underflow; a
            # NaN from inf * 0) were ranked by their index, without a word
            lost = max(under, int(torch.isinf(s).sum()))
            if lost > 1 or bool(torch.isnan(s).any()):
                self._out_of_range(group, max(lost, int(torch.isnan(s).sum())))
            scores.append(s)
        return self.reduce(torch.stack(scores))

    def _out_of_range(self, group: Group, count: int) -> None:
        """The :class:`UserError` of scores that float64 cannot hold at these ratios (units
        scored inf or 0 alike were ranked by their index, without a word)."""
        how = "exponents of" if self.form == "multiplicative" else "factors of"
        top = max(self.alpha, self.beta)
        raise UserError(
            f"weight_ratio={self.alpha:g} and activation_ratio={self.beta:g} (--alpha/--beta) are {how} the "
            f"{self.form} Weight Magnitude - Activation score, and at these values {count} unit score(s) of the group "
            f"of {group.size} units go beyond what float64 holds (inf or 0), so those units cannot be ranked. Only "
            f"their ratio matters: give numbers of the same ratio near 1 (e.g. weight_ratio={self.alpha / top:.3g}, "
            f"activation_ratio={self.beta / top:.3g})."
        )


# -- registries ---------------------------------------------------------------


def _collect(hook_name: str) -> dict[str, Any]:
    pm = get_plugin_manager()
    out: dict[str, Any] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        res = impl.function()
        if res is not None and not isinstance(res, Mapping):  # a list: "'list' object has no attribute 'items'"
            raise UserError(
                f"the plugin {impl.plugin_name!r} returns {shown(res)} from {hook_name}, which must return a dict of "
                "names to what they register (or None)"
            )
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
    if not isinstance(name, str) or name not in table:
        peer = PEER_IMPORTANCES.get(name) if isinstance(name, str) else None
        hint = f" (Torch-Pruning's name; CleanAI's criterion: {peer})" if peer else ""
        raise UserError(f"unknown importance {name!r}{hint}; choose one of: {', '.join(sorted(table))}")
    return _made(name, table[name], options)


def _made(name: str, factory: Any, options: dict[str, Any]) -> Any:
    """``factory(**options)``, where an option the criterion does not have, or a value its
    constructor cannot take, is a :class:`UserError` naming the criterion, the option and
    the options it has. ``get_importance("magnitude", nope=1)`` raised ``TypeError:
    MagnitudeImportance.__init__() got an unexpected keyword argument``, and
    ``get_importance("random", seed="a")`` torch's ``RuntimeError: manual_seed expected a
    long``. A criterion's own ``UserError`` (``magnitude p=3: use 1 or 2``) passes as it is."""
    import inspect

    if not callable(factory):  # {"mine": 5}: "'int' object is not callable"
        raise UserError(
            f"importance {name!r} is registered as {shown(factory)}, which is not a class or function that makes the "
            "criterion: the plugin registering it (cleanai_importances) must map the name to one"
        )
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C factory: nothing to read
        signature = None
    takes = [] if signature is None else [
        (k, p.default) for k, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]  # fmt: skip
    has = ", ".join(f"{k}={d!r}" if d is not inspect.Parameter.empty else k for k, d in takes) or "none"
    if signature is not None:
        try:
            signature.bind(**options)
        except TypeError:
            unknown = sorted(set(options) - {k for k, _ in takes})
            raise UserError(
                f"importance {name!r} has no option {', '.join(repr(k) for k in unknown) or 'of that form'}; "
                f"its options (with their defaults): {has}"
            ) from None
    try:
        return factory(**options)
    except UserError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        if not options:  # the criterion fails with its defaults: its plugin's error, as it is
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise UserError(
            f"importance {name!r} cannot take {given} ({type(exc).__name__}: {str(exc)[:200]}); "
            f"give values of the kinds of its defaults: {has}"
        ) from exc


def importance_name(importance: Any) -> str:
    """The name ``importance`` is registered under (``"hessian"``), else its class name:
    what an error about the criterion calls it."""
    table = _collect("cleanai_importances")
    return next((name for name, fn in table.items() if fn is type(importance)), type(importance).__name__)


def get_reducer(name: str) -> Any:
    """A reducer by registered name: folds stacked per-term scores ``(n_terms, n_units)``
    into ``(n_units,)``; criteria take it as their ``reducer`` option."""
    table = _collect("cleanai_reducers")
    if not isinstance(name, str) or name not in table:  # reducer=["mean"]: TypeError: unhashable type
        raise UserError(f"unknown reducer {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name]


#: other spellings of normaliser names: Torch-Pruning's ``"standarization"``
_NORMALIZER_SPELLINGS = {"standarization": "standardization"}


def get_normalizer(name: str) -> Any:
    """A normaliser by registered name (``"none"`` for none; Torch-Pruning's spelling
    ``"standarization"`` reads as ``"standardization"``)."""
    table = _collect("cleanai_normalizers")
    if name not in table and _NORMALIZER_SPELLINGS.get(name) in table:
        name = _NORMALIZER_SPELLINGS[name]
    if name not in table:
        raise UserError(f"unknown normaliser {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name]


def user_normalizer(fn: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (the user's per-group normaliser, as Torch-Pruning takes one) made safe for
    global ranking: its result is read as a float64 tensor of the scores' shape, and
    anything else, or an exception, is a :class:`UserError` naming the function."""
    label = getattr(fn, "__qualname__", None) or type(fn).__name__

    def normalize(scores: torch.Tensor) -> torch.Tensor:
        try:
            out = torch.as_tensor(fn(scores), dtype=torch.float64)
        except Exception as e:
            raise UserError(
                f"normalizer {label} failed on a group's scores (a float64 tensor of shape "
                f"{tuple(scores.shape)}): {type(e).__name__}: {e}"
            ) from e
        if out.shape != scores.shape:
            raise UserError(
                f"normalizer {label} must return one finite number per score: got shape {tuple(out.shape)} "
                f"for scores of shape {tuple(scores.shape)}"
            )
        if not bool(torch.isfinite(out).all()):
            raise UserError(
                f"normalizer {label} must return one finite number per score: got NaN or inf for "
                f"{int((~torch.isfinite(out)).sum())} of {out.numel()} scores"
            )
        return out

    return normalize


def score_groups(importance: Any, graph: DependencyGraph, ctx: ScoringContext) -> dict[int, torch.Tensor]:
    """Every prunable group's unit scores (float64, NaN as 0) by ``importance``. Criteria
    that read activations need statistics, unless no prunable group has a layer's input to
    measure them at (a model of layers traced through, whose weights are bare tensors: its
    groups fall back to their weights, as such groups do in any model; before 2026-12-02
    the default criterion refused it, after ``collect_activations`` too)."""
    groups = graph.groups(prunable_only=True)
    measured = any(s.kind == "in" for g in groups for s in g.slices)
    from_gradients = bool(ctx.gradients) and getattr(importance, "needs_gradients", False)  # held ones: no data
    if getattr(importance, "needs_activations", False) and not ctx.stats and measured and not from_gradients:
        summed = getattr(importance, "needs_gradients", False) and not getattr(importance, "needs_squared_gradients", 0)
        held = " with labelled batches, or run your own loss's backward on the model" if summed else ""
        raise UserError(
            f"{type(importance).__name__} scores activations: call "
            f"pruner.collect_activations(loader) first{held}, or choose a data-free importance such as 'magnitude'"
        )
    out = {}
    nan_groups: list[tuple[Group, int]] = []  # a registered criterion's groups with NaN scores, and how many
    for g in groups:
        s = _unit_scores(importance, importance(g, ctx), g)
        if bool(s.isnan().any()) and type(importance) in _collect("cleanai_importances").values():
            nan_groups.append((g, int(s.isnan().sum())))
        elif bool(s.isnan().any()):
            # a criterion of the user's (a function, an object no plugin registers): its NaN were read as 0,
            # so those units went first, and a group of NaN lost units by index, without a word
            name = getattr(importance, "__name__", None) or type(importance).__name__
            raise UserError(
                f"importance {name!r} returned {int(s.isnan().sum())} NaN score(s) for group {g.id} "
                f"({', '.join(g.modules()[:4])}) of {g.size} units: NaN cannot be ranked; return finite scores "
                "(inf keeps a unit)"
            )
        out[g.id] = torch.nan_to_num(s, nan=0.0)
    if nan_groups:
        _warn_nan_scores(importance_name(importance), nan_groups)
    return out


def _warn_nan_scores(name: str, nan_groups: list[tuple[Group, int]]) -> None:
    """One warning for a registered criterion's NaN scores, naming it and the layers: they
    are read as 0, the lowest score (those units go first), as before 2026-12-03, when they
    were read so without a word. A registered criterion (a built-in, a plugin's) gives NaN
    from non-finite statistics (activations that overflow float16, a NaN in the data), not
    by design, so the run goes on; a criterion of the user's own is refused instead."""
    import warnings

    units = sum(n for _, n in nan_groups)
    layers = list(dict.fromkeys(m for g, _ in nan_groups for m in g.modules()))
    shown_layers = ", ".join(repr(m) for m in layers[:4]) + (", ..." if len(layers) > 4 else "")
    warnings.warn(
        f"importance {name!r} gave NaN scores for {units} unit(s) in {len(nan_groups)} group(s) (layers "
        f"{shown_layers}): they are read as 0, the lowest score, so those units are pruned first. NaN scores come "
        "from non-finite statistics or gradients (a NaN in the calibration data, activations that overflow "
        "float16); check the data, or collect in float32",
        RuntimeWarning,
        stacklevel=3,
    )


def _unit_scores(importance: Any, scores: Any, g: Group) -> torch.Tensor:
    """``scores``, what ``importance`` returned for ``g``, as ``g.size`` float64 numbers, or a
    :class:`UserError` naming the criterion, the group and the form it must return: a
    criterion of the user's (a function) returning ``None``, text or a generator raised
    ``TypeError: must be real number, not NoneType`` from the conversion, and one on the
    meta device (no values) pruned nothing without a word."""
    try:
        s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        s = None
    if s is None or s.is_meta or s.numel() != g.size:
        got = "a tensor on the meta device (no values)" if s is not None and s.is_meta else (
            f"{s.numel()} score(s)" if s is not None else shown(scores))  # fmt: skip
        name = getattr(importance, "__name__", None) or importance_name(importance)
        raise UserError(
            f"importance {name!r} returned {got} for group {g.id} ({', '.join(g.modules()[:4])}), which has "
            f"{g.size} units: an importance returns one score per unit, a tensor of shape ({g.size},) (higher "
            "keeps the unit)"
        )
    return s.detach()
