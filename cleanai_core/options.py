"""Stage 1, arguments: checks of :class:`~cleanai_core.pruner.StructuredPruner`'s options
and the selection of layers by module, name, glob or type."""

from __future__ import annotations

import decimal
import fnmatch
import fractions
import inspect
import itertools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from cleanai_core.errors import UserError, shown

__all__ = [
    "ROUND_MODES",
    "ModuleSpec",
    "as_importance",
    "as_ratio_table",
    "as_specs",
    "check_callables",
    "check_switches",
    "check_example_inputs",
    "check_model",
    "check_masks",
    "check_modules",
    "check_finite",
    "check_ignored_ratios",
    "check_not_meta",
    "meta_tensor",
    "non_finite",
    "check_options",
    "check_ranking",
    "check_round_mode",
    "check_ratio",
    "check_targets",
    "ignored_modules",
    "ignored_tensor",
    "layer_ratios",
    "layer_scopes",
    "match_modules",
    "spec_label",
    "split_ignored",
]

ModuleSpec = nn.Module | str | type | tuple


def match_modules(model: nn.Module, specs: Iterable[ModuleSpec]) -> dict[str, Any]:
    """Names of the modules of ``model`` matched by modules, names, globs or types, with
    every descendant of a matched container (``model.layer4`` covers ``layer4.0.conv1``).
    Returns ``{name: spec}``; raises :class:`UserError` for a spec that matches nothing."""
    named = list(model.named_modules())
    ids = {id(m): n for n, m in named}
    out: dict[str, Any] = {}
    for spec in specs:
        hits: list[str]
        if isinstance(spec, tuple):  # a scope of layers (``layer_pruning_ratios={(m.layer1, m.layer2): 0.4}``)
            if not spec:
                raise UserError("an empty tuple of layers names no layer; give the modules, names, globs or types")
            for name in match_modules(model, spec):
                out.setdefault(name, spec)
            continue
        if isinstance(spec, nn.Module):
            hits = [ids[id(spec)]] if id(spec) in ids else []
        elif isinstance(spec, type):
            hits = [n for n, m in named if isinstance(m, spec)]
        elif isinstance(spec, str):
            if not spec.strip():  # "" names the whole model, whose own outputs are never pruned: a slip
                raise UserError(
                    f"an empty layer pattern ({spec!r}) names no layer; give a layer name, a glob such as "
                    "'layer4.*' or a class name (see `cleanai explain`)"
                )
            pattern = _without_wrapper_prefix(spec, model)
            hits = [n for n, _ in named if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not hits:  # a class name, as --ignore documents ('Conv2d', 'Batch*'): it matched no layer
                hits = [n for n, m in named if fnmatch.fnmatchcase(type(m).__name__, pattern)]
        else:
            raise UserError(
                f"cannot match layers with {_shown_spec(spec, model)}: give a module, a name, a glob or a type"
            )
        if not hits:
            raise UserError(
                f"{_shown_spec(spec, model)} matches no layer of the model; check the name with `cleanai explain`"
                + _lookalike_hint(spec, named)
            )
        for h in hits:
            out.setdefault(h, spec)
            for n, _ in named:
                # the model itself (given as the module, or a type only it has) is the container of every
                # layer: ignored_layers=[model] pruned everything, layer_pruning_ratios={model: 0.75} did nothing
                if n and (not h or n.startswith(h + ".")):
                    out.setdefault(n, spec)
    return out


def _shown_spec(spec: Any, model: nn.Module) -> str:
    """``spec`` as an error shows it: a module or tensor by its type and shape, not its
    ``repr`` (a parameter's printed every value; a whole network's, every layer); a
    parameter of the model by its name, with the module to give instead."""
    if isinstance(spec, torch.Tensor):
        name = next((n for n, p in model.named_parameters() if p is spec), None)
        if name is not None:
            owner = name.rpartition(".")[0]
            return f"the parameter {name!r} (a tensor, not a layer; " + (
                f"give its module {owner!r})"
                if owner
                # no ``unwrapped_parameters`` option: bare tensors are found by themselves
                else "its channels are kept with the layers that make the channels it meets: ignore those)"
            )
    return shown(spec)


def spec_label(spec: Any, model: nn.Module) -> str:
    """A layer spec as a message names it: a module of ``model`` by its name, a tuple of
    specs member by member, a type by its class name, text as itself (``repr`` printed a
    module, or a tuple of blocks, layer by layer)."""
    if isinstance(spec, tuple):
        return "(" + ", ".join(spec_label(s, model) for s in spec) + ("," if len(spec) == 1 else "") + ")"
    if isinstance(spec, nn.Module):
        name = next((n for n, m in model.named_modules() if m is spec), None)
        return f"model.{name}" if name else ("model" if name == "" else shown(spec))
    if isinstance(spec, type):
        return spec.__name__
    return repr(spec) if isinstance(spec, str) else shown(spec)


def _lookalike_hint(spec: Any, named: list[tuple[str, nn.Module]]) -> str:
    """For a module that is not in the model but whose twin is (a layer of the model before
    ``copy.deepcopy``, or of the unpruned model): which name to give. For a name that is a
    parameter's (``"fc.weight"``): its module's."""
    if isinstance(spec, str):
        owner, _, attr = spec.rpartition(".")
        module = dict(named).get(owner)
        if module is not None and attr in module._parameters:
            if not owner:  # a bare tensor of the model itself (``pos_embed``)
                return f". {spec!r} is a tensor of the model, not a layer: ignore the layers that make its channels"
            return f". {spec!r} is a parameter of {owner!r}, not a layer: give {owner!r}"
        if "." in spec:
            return ""
    if not isinstance(spec, nn.Module) or len(named) > 100_000:
        return ""
    shown = repr(spec)
    twins = [n for n, m in named if n and type(m) is type(spec) and repr(m) == shown]
    if not twins:
        return ""
    return (
        f". It is not a module of this model (a copy of one?); this model has one like it named {twins[0]!r}: "
        "give that name, or the module of the model you pass to the pruner"
    )


#: the name ``torch.compile``'s wrapper gives the module it runs
COMPILED_PREFIX = "_orig_mod."
#: the names the wrappers the pruners see through give the module they run (``torch.compile``,
#: ``nn.DataParallel``)
WRAPPER_PREFIXES = (COMPILED_PREFIX, "module.")


def _without_wrapper_prefix(spec: str, model: nn.Module) -> str:
    """``spec`` without the ``_orig_mod.`` / ``module.`` prefixes of a ``torch.compile`` or
    ``DataParallel`` wrapper's names (``compiled.named_modules()``): the pruner works on the
    module inside the wrapper, whose names lack them, so ``"_orig_mod.fc"`` matched nothing.
    A model that has a child of that name keeps the spec as it is."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if spec.startswith(prefix) and prefix[:-1] not in model._modules:
                spec, stripped = spec[len(prefix) :], True
    return spec


def ignored_tensor(model: nn.Module, spec: Any) -> str | None:
    """The qualified name of the model's parameter or buffer ``spec`` names in
    ``ignored_layers`` (the tensor itself, e.g. ``model.pos_embed``, or its name where no
    module has that name), else ``None``: Torch-Pruning users keep a bare tensor's channels
    (a ViT's ``pos_embed`` / ``cls_token``) by ignoring it."""
    return _TensorNames(model).of(spec)


class _TensorNames:
    """The model's tensor and module names, read once for many specs (an ignored container
    arrives expanded into every layer inside it)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._by_id: dict[int, str] | None = None
        self._names: set[str] | None = None
        self._modules: set[str] | None = None

    def of(self, spec: Any) -> str | None:
        if isinstance(spec, torch.Tensor):
            if self._by_id is None:
                self._by_id = {}
                for n, t in itertools.chain(
                    self.model.named_parameters(remove_duplicate=False), self.model.named_buffers()
                ):
                    self._by_id.setdefault(id(t), n)
            return self._by_id.get(id(spec))
        if not isinstance(spec, str):
            return None
        if self._modules is None:
            self._modules = {n for n, _ in self.model.named_modules()}
        if spec in self._modules:
            return None
        if self._names is None:
            named = itertools.chain(self.model.named_parameters(remove_duplicate=False), self.model.named_buffers())
            self._names = {n for n, _ in named}
        name = _without_wrapper_prefix(spec, self.model)
        return name if name in self._names else None


def split_ignored(model: nn.Module, specs: Iterable[Any]) -> tuple[list[Any], set[str]]:
    """``ignored_layers`` as the layer specs and the names of the tensors it names
    (:func:`ignored_tensor`)."""
    layers, tensors = [], set()
    names = _TensorNames(model)
    for spec in specs:
        name = names.of(spec)
        if name is None:
            layers.append(spec)
        else:
            tensors.add(name)
    return layers, tensors


def check_ignored_ratios(model: nn.Module, ignored: list[Any], ratios: Mapping[Any, Any]) -> None:
    """A :class:`UserError` for a layer given both in ``ignored_layers`` and a ratio above 0
    in ``layer_pruning_ratios`` (every layer the ratio's pattern matches is ignored): the
    ratio was dropped without a word. A ratio for a region with some ignored layers in it
    stays valid."""
    if not ignored or not ratios:
        return
    kept = set(match_modules(model, split_ignored(model, ignored)[0]))
    for spec, r in ratios.items():
        if plain_number(r) and set(match_modules(model, [spec])) <= kept:
            raise UserError(
                f"layer {spec_label(spec, model)} is ignored (ignored_layers, --ignore) and given ratio "
                f"{plain_number(r)} (layer_pruning_ratios, --layer-ratio): an ignored layer keeps its output "
                "channels, so the ratio would do nothing; drop one of them"
            )


def ignored_modules(model: nn.Module, specs: Iterable[ModuleSpec]) -> set[str]:
    """Names of the modules whose output channels are kept: those ``specs`` match, and
    the classifier heads the ``cleanai_default_ignores`` hook names; and the names of the
    bare tensors ``specs`` names (:func:`ignored_tensor`), whose channels are kept too."""
    from cleanai_core.plugins import get_plugin_manager

    layers, tensors = split_ignored(model, specs)
    out = set(match_modules(model, layers)) | tensors  # a tensor by its name: the graph keeps its channels
    for res in get_plugin_manager().hook.cleanai_default_ignores(model=model):
        out.update(match_modules(model, list(res or ())))
    return out


def layer_ratios(model: nn.Module, ratios: Mapping[ModuleSpec, float]) -> dict[str, float]:
    """``{module name: ratio}`` from ``{module | name | glob | type: ratio}`` (0 keeps a
    layer whole; the first entry matching a layer wins)."""
    out: dict[str, float] = {}
    for spec, r in ratios.items():
        r = plain_number(r)
        check_ratio(f"layer_pruning_ratios[{spec_label(spec, model)}]", r, allow_zero=True)
        for name in match_modules(model, [spec]):
            out.setdefault(name, float(r))
    return out


def layer_scopes(model: nn.Module, ratios: Mapping[Any, float]) -> dict[str, int]:
    """``{module name: scope}`` for the layers a tuple key of ``layer_pruning_ratios`` names
    (``{(m.layer1, m.layer2): 0.4}``, Torch-Pruning's ``pruning_ratio_dict`` scopes): under
    global ranking their groups rank together and lose the tuple's ratio of their units in
    all; the scope is the key's position. A layer an earlier entry matched keeps that entry,
    as in :func:`layer_ratios`."""
    out: dict[str, int] = {}
    if not any(isinstance(spec, tuple) for spec in ratios):  # no scope: no second walk over the layers
        return out
    seen: set[str] = set()
    for k, spec in enumerate(ratios):
        for name in match_modules(model, [spec]):
            if name not in seen and isinstance(spec, tuple):
                out[name] = k
            seen.add(name)
    return out


def check_ratio(name: str, r: Any, allow_zero: bool = False) -> None:
    """``r`` is a ratio strictly between 0 and 1 (or 0 with ``allow_zero``)."""
    if isinstance(r, (int, float)) and not isinstance(r, bool) and allow_zero and float(r) == 0.0:
        return
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not (0.0 < float(r) < 1.0) or math.isnan(r):
        if allow_zero:
            raise UserError(f"{name}={r!r} must be a number between 0 and 1, below 1 (0 keeps the layer whole)")
        raise UserError(f"{name}={r!r} must be a number strictly between 0 and 1 (e.g. 0.3 removes 30%)")


def check_switches(**switches: Any) -> None:
    """On/off options are booleans: ``inplace="no"`` would otherwise read as true."""
    for name, v in switches.items():
        if isinstance(v, str) or v not in (True, False):
            raise UserError(f"{name}={v!r} must be True or False")


def check_callables(**functions: Any) -> None:
    """Hooks into the model call are functions or ``None`` (``forward_fn=5`` failed in tracing
    as if the example inputs were wrong)."""
    for name, f in functions.items():
        if f is not None and not callable(f):
            raise UserError(f"{name}={f!r} is not a function; give a callable or None")


def as_specs(specs: Any, name: str) -> list[Any]:
    """A list of layer specs; one name, module or type alone counts as a list of one
    (``ignored_layers="fc"`` is the layer ``fc``, not the layers ``f`` and ``c``)."""
    if specs is None:
        return []
    if isinstance(specs, (str, nn.Module, type)):
        return [specs]
    try:
        return list(specs)
    except TypeError:
        raise UserError(f"{name}={specs!r}: give a list of modules, names, globs or types") from None


def as_ratio_table(ratios: Any) -> Mapping[Any, float]:
    """``layer_pruning_ratios`` as a mapping (a list of ``(spec, ratio)`` pairs is accepted)."""
    if ratios is None or isinstance(ratios, Mapping):
        return ratios or {}
    try:
        return dict(ratios)
    except (TypeError, ValueError):
        raise UserError(
            f"layer_pruning_ratios={ratios!r}: give a dict {{module, name, glob or type: ratio}}, "
            "e.g. {'layer4.*': 0.5}"
        ) from None


def as_importance(importance: Any) -> Any:
    """``importance`` as a criterion: ``None`` (the default), a registered name or an
    instance; a class is refused with the call to make."""
    if importance is None or isinstance(importance, str):
        return importance
    if isinstance(importance, type):
        raise UserError(
            f"importance={importance.__name__} is a class; pass an instance, e.g. {importance.__name__}(), "
            "or a registered name such as 'weight_activation'"
        )
    if not callable(importance):
        raise UserError(
            f"importance={importance!r} is not a criterion: give a registered name (e.g. 'magnitude') or an "
            "object called as importance(group, ctx)"
        )
    if not _takes_two_arguments(importance):
        # Torch-Pruning's criteria are called as imp(group): a raw "TypeError: __call__() takes 2 positional
        # arguments but 3 were given" came out of scoring
        name = getattr(importance, "__qualname__", None) or type(importance).__name__
        raise UserError(
            f"importance {name} cannot be called as importance(group, ctx), the way CleanAI scores a group "
            "(cleanai_core.interfaces.Importance: group.size units, ctx a ScoringContext with the model, "
            "statistics and gradients; return one score per unit, higher keeps it). A Torch-Pruning criterion "
            "written as __call__(self, group) takes a ctx argument too"
        )
    return importance


def _takes_two_arguments(fn: Any) -> bool:
    """Whether ``fn(group, ctx)`` binds (``True`` where the signature cannot be read)."""
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # a builtin without a readable signature
        return True
    return True


def check_model(model: Any, who: str = "StructuredPruner") -> None:
    """A :class:`UserError` for a model the pruners cannot take: not a module, a scripted or
    lazy layer, the meta device, non-finite weights, a ``DistributedDataParallel`` wrapper."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(compiled_inner(model), nn.parallel.DistributedDataParallel):
        # DDP syncs the gradients of the parameters it was built with: the pruned model (or, with GradualPruner,
        # the model after a step) trained on each rank's data alone, and the ranks' weights drifted apart
        raise UserError(
            f"{who} got a DistributedDataParallel model, which syncs the gradients of the parameters it was "
            f"built with, not those pruning makes: the ranks would train apart. Give it the module DDP wraps "
            f"({who}(ddp.module, ...)) and wrap the pruned model again: DistributedDataParallel(pruned, ...)"
            + (" after each step" if who == "GradualPruner" else "")
        )
    sharded = _fsdp_module(model)
    if sharded is not None:
        # FSDP's flat parameters (FSDP1) are not picklable ("TypeError: cannot pickle 'module' object"), and
        # fully_shard's modules (FSDP2) refuse a copy ("AssertionError: FSDP does not support deepcopy")
        name, kind = sharded
        where = "the model" if not name else f"its layer {name!r}"
        raise UserError(
            f"{who} got a model sharded by FSDP ({where} is a {kind}): its parameters are shards spread over the "
            "ranks, which cannot be traced, copied or sliced. Prune the unsharded model (before "
            "FullyShardedDataParallel / fully_shard, or one rebuilt from a full state dict), then shard the pruned "
            "model"
        )
    check_modules(model)
    check_not_meta(model)
    check_finite(model)


def _fsdp_module(model: nn.Module) -> tuple[str, str] | None:
    """``(name, class name)`` of the first module of ``model`` that FSDP made (a
    ``FullyShardedDataParallel`` wrapper, or a module ``fully_shard`` gave an ``FSDPModule``
    class), else ``None``; found by the classes' modules, so ``torch.distributed.fsdp`` is
    not imported."""
    for name, m in model.named_modules():
        if any(c.__module__.startswith("torch.distributed.fsdp") for c in type(m).__mro__):
            return name, type(m).__name__
    return None


def check_modules(model: nn.Module, masks: bool = True, name: str = "model") -> None:
    """A :class:`UserError` for a module CleanAI cannot trace, copy or slice, named: the
    model or a layer of it scripted (``torch.jit.script`` / ``trace``), a lazy layer whose
    parameters have no shape yet, a weight recomputed by a forward pre-hook into a plain
    attribute (the deprecated ``weight_norm`` / ``spectral_norm``, a
    ``torch.nn.utils.prune`` mask). A scripted layer raised ``AttributeError:
    '_CachedForward' object has no attribute '__getattr__'`` from a plugin's scan, a lazy
    one ``ValueError: Attempted to use an uninitialized parameter``, a pruning mask
    ``RuntimeError: Only Tensors created explicitly by the user (graph leaves) support the
    deepcopy protocol``. ``masks=False`` skips the pre-hooks (``recover`` trains through a
    pruning mask); ``name`` is what the message calls the model."""
    model_name = name
    for name, m in model.named_modules():
        where = f"module {name!r} ({type(m).__name__})" if name else f"the {model_name} ({type(m).__name__})"
        if isinstance(m, torch.jit.ScriptModule):
            if not name:
                raise UserError(
                    f"the {model_name} is a TorchScript module (torch.jit.script or torch.jit.trace): CleanAI prunes "
                    "and trains the Python nn.Module. Prune the original model, then script the pruned one"
                )
            raise UserError(
                f"{where} is a TorchScript module (torch.jit.script or torch.jit.trace) inside the model: CleanAI "
                "traces and slices Python nn.Modules and cannot see into it. Put the Python module there, prune, "
                "then script the pruned model (or that layer of it)"
            )
        lazy = next((k for k, t in [*m._parameters.items(), *m._buffers.items()] if nn.parameter.is_lazy(t)), None)
        if lazy is not None:
            raise UserError(
                f"{where} has a parameter that is not initialised yet ({lazy!r}, a lazy module: its shape is set by "
                "the first forward). Run the model once on a batch (model(example_inputs)) so that every lazy layer "
                "gets its shape, then prune it"
            )
    if masks:
        check_masks(model)


def check_masks(model: nn.Module) -> None:
    """A :class:`UserError` for a module of ``model`` whose weight a forward pre-hook
    recomputes into a plain attribute (a ``torch.nn.utils.prune`` mask, the deprecated
    ``weight_norm``): it cannot be copied, sliced or saved as its layer's weight."""
    for sub, m in model.named_modules():
        hook = next((h for h in m._forward_pre_hooks.values() if _recomputes_weight(h)), None)
        if hook is None:
            continue
        here = f"module {sub!r} ({type(m).__name__})" if sub else f"the model ({type(m).__name__})"
        tensor = getattr(hook, "_tensor_name", None) or getattr(hook, "name", None) or "weight"
        if type(hook).__module__ == "torch.nn.utils.prune":
            raise UserError(
                f"{here} has a torch.nn.utils.prune mask on {tensor!r} ({tensor}_orig, {tensor}_mask): its "
                f"{tensor} is recomputed into a plain attribute at every call, so the model cannot be copied (torch "
                "refuses to deepcopy it) and the mask would not follow the slicing. Make that pruning permanent "
                f"first (torch.nn.utils.prune.remove(module, {tensor!r}): the zeros stay in the weight), then prune"
            )
        raise UserError(
            f"module {sub or type(model).__name__!r} uses torch.nn.utils.weight_norm/spectral_norm (deprecated): "
            "its weight is recomputed into a plain attribute, so the model cannot be copied (torch refuses to deepcopy "
            "it). Re-apply the norm with torch.nn.utils.parametrizations.weight_norm/spectral_norm (CleanAI prunes "
            "those), or remove it first (torch.nn.utils.remove_weight_norm)"
        )


def compiled_inner(model: Any) -> Any:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) runs, else ``model``.
    Tracing, calibration and verification through the wrapper ran every hooked forward
    through TorchDynamo (76 s instead of 0.1 s for the digits CNN), and its truthiness
    check raised ``TypeError: ... does not support len()``."""
    while type(model).__name__ == "OptimizedModule" and isinstance(model._modules.get("_orig_mod"), nn.Module):
        model = model._modules["_orig_mod"]
    return model


def pruned_module(model: Any) -> Any:
    """The module the pruners work on: ``model`` without its ``torch.compile`` and
    ``nn.DataParallel`` wrappers (``DistributedDataParallel`` is refused: :func:`check_model`).
    Through a ``DataParallel`` wrapper, the history named every layer ``module.*`` (``module.0``):
    it replayed on no fresh model of the architecture, ``save_pruned`` refused the module
    inside, and a folder saved with the wrapper did not load ("step 0 names module
    'module.features.0', which the architecture ... does not have")."""
    while True:
        inner = compiled_inner(model)
        if type(inner) is nn.DataParallel and isinstance(inner._modules.get("module"), nn.Module):
            inner = inner.module
        if inner is model:
            return model
        model = inner


def bare_module(model: Any) -> Any:
    """``model`` without its ``torch.compile``, ``DataParallel`` and
    ``DistributedDataParallel`` wrappers: what ``load_pruned`` rebuilds (a wrapper's
    state_dict names every tensor ``_orig_mod.`` or ``module.``)."""
    while True:
        inner = compiled_inner(model)
        if isinstance(inner, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = inner.module
        if inner is model:
            return model
        model = inner


def _recomputes_weight(hook: Any) -> bool:
    """A forward pre-hook that writes a tensor into a plain attribute: the deprecated
    ``torch.nn.utils.weight_norm``/``spectral_norm``, or a ``torch.nn.utils.prune`` method."""
    kind = type(hook)
    if kind.__module__ == "torch.nn.utils.prune":
        return True
    return kind.__name__ in ("WeightNorm", "SpectralNorm") and kind.__module__.startswith("torch.nn.utils")


def plain_number(v: Any) -> Any:
    """A NumPy, 0-d torch, ``Fraction`` or ``Decimal`` number as the Python ``int`` /
    ``float`` it holds; anything else as it is (bools stay bools and are refused by the
    checks). ``np.float32(0.5)``, ``np.int64(2)`` and ``torch.tensor(0.5)`` were refused as
    "not a number"."""
    if isinstance(v, (bool, int, float)) or v is None:
        return v
    if isinstance(v, torch.Tensor):
        if v.dim() != 0 or v.dtype == torch.bool or v.is_complex() or v.is_meta:
            return v
        return v.item()
    if type(v).__module__ == "numpy" and type(v).__name__ != "bool" and type(v).__name__ != "bool_":
        if isinstance(v, numbers.Integral):
            return int(v)
        if isinstance(v, numbers.Real):
            return float(v)
    # Fraction(1, 3) and Decimal("0.3") were refused: "pruning_ratio=Fraction(1, 3) must be a number"
    if isinstance(v, fractions.Fraction):
        return int(v) if v.denominator == 1 else float(v)
    if isinstance(v, decimal.Decimal):
        return int(v) if v.is_finite() and v == v.to_integral_value() else float(v)
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_targets(
    pruning_ratio: Any, target_flops: Any, target_params: Any, iterative_steps: Any, zero_ok: bool = False
) -> None:
    """How much to prune: a ratio, or a FLOPs or parameter share, in steps. ``zero_ok``
    (``layer_pruning_ratios`` given, or the dead units decide): ``pruning_ratio=0`` prunes
    only the layers given a ratio (the peer's ``pruning_ratio=0.0`` beside a
    ``pruning_ratio_dict``; refused before 2026-12-02)."""
    zero = _is_number(pruning_ratio) and float(pruning_ratio) == 0.0
    if zero and not zero_ok and target_flops is None and target_params is None:
        raise UserError(
            "pruning_ratio=0 removes nothing: give a ratio between 0 and 1 (e.g. 0.3 removes 30%), or "
            "layer_pruning_ratios to prune only the layers named there"
        )
    if not zero:
        check_ratio("pruning_ratio", pruning_ratio)
    for name, v, what in (("target_flops", target_flops, "FLOPs"), ("target_params", target_params, "parameters")):
        if v is not None and (not _is_number(v) or not 0.0 < float(v) < 1.0):  # "0.5" compared as text, "abc" raised
            raise UserError(f"{name}={v!r}: give the share of {what} to keep, a number between 0 and 1 (e.g. 0.5)")
    if target_params is not None and (target_flops is not None or iterative_steps != 1):
        raise UserError("target_params works alone: not with target_flops, and with iterative_steps=1")
    if not _is_count(iterative_steps) or iterative_steps < 1:
        raise UserError(f"iterative_steps={iterative_steps!r} must be a positive integer")


#: how ``round_to`` rounds a kept count (:func:`cleanai_core.planning.limit_units`)
ROUND_MODES = ("up", "nearest")


def check_round_mode(round_mode: Any) -> None:
    """``round_mode`` is one of :data:`ROUND_MODES`."""
    if round_mode not in ROUND_MODES:
        raise UserError(f"round_mode={round_mode!r} must be one of {', '.join(map(repr, ROUND_MODES))}")


def check_options(
    max_layer_ratio: Any,
    round_to: Any,
    covariance_rows: Any,
    stats_budget_bytes: Any,
    min_channels: Any = 1,
    bn_samples: Any = 0,
) -> None:
    """The numeric options of planning and reconstruction, by type and range: text, ``None``,
    ``True`` or a fraction where a count belongs raised a ``TypeError`` deep in planning or
    was silently read as a number."""
    # 1.0 (Torch-Pruning's default max_pruning_ratio) caps nothing: min_channels still stay in every group
    if not _is_number(max_layer_ratio) or not 0.0 < max_layer_ratio <= 1.0:
        raise UserError(
            f"max_layer_ratio={max_layer_ratio!r} must be a number between 0 and 1 (above 0; 1 caps nothing, "
            "min_channels still stay)"
        )
    if round_to is not None and (not _is_count(round_to) or round_to < 1):
        raise UserError(f"round_to={round_to!r} must be a positive integer (or None: no rounding)")
    if not _is_count(min_channels) or min_channels < 1:
        raise UserError(f"min_channels={min_channels!r} must be an integer >= 1 (the units every group keeps)")
    if not _is_count(covariance_rows) or covariance_rows < 0:
        raise UserError(f"covariance_rows={covariance_rows!r} must be an integer: 0 (every position) or positive")
    if not _is_count(stats_budget_bytes) or stats_budget_bytes < 0:
        raise UserError(f"stats_budget_bytes={stats_budget_bytes!r} must be a whole number of bytes, 0 or more")
    if not _is_count(bn_samples) or bn_samples < 0:
        raise UserError(f"bn_samples={bn_samples!r} must be an integer: 0 (every calibration sample) or positive")


def schedule_shares(schedule: Any, ratio: float, steps: int, targeted: bool) -> list[float] | None:
    """``iterative_schedule`` (Torch-Pruning's ``iterative_pruning_ratio_scheduler``: a
    function ``(pruning_ratio, steps)`` returning ``steps + 1`` ratios, the removed share
    before the first step and after each; or those ratios themselves) checked and read as
    the share of the way to ``ratio`` that each step ends at (``None``: equal steps)."""
    if schedule is None:
        return None
    if targeted:
        raise UserError(
            "iterative_schedule shares out pruning_ratio over the steps; with target_flops each step ends at "
            "target_flops ** (step / steps) of the original FLOPs: drop one of the two"
        )
    if steps < 2:
        raise UserError(f"iterative_schedule needs iterative_steps of 2 or more (got {steps}): one step is no schedule")
    if ratio <= 0:
        raise UserError("iterative_schedule shares out pruning_ratio, which is 0 here: give pruning_ratio above 0")
    label = getattr(schedule, "__qualname__", None) or type(schedule).__name__
    if callable(schedule):
        try:
            schedule = schedule(ratio, steps)
        except Exception as e:
            raise UserError(f"iterative_schedule {label}({ratio}, {steps}) failed: {type(e).__name__}: {e}") from e
    try:
        values = [plain_number(v) for v in schedule]
    except TypeError:
        values = None
    want = f"{steps + 1} ratios (before the first step, then after each of the {steps}), rising from 0 to {ratio}"
    if values is None or len(values) != steps + 1 or not all(_is_number(v) for v in values):
        raise UserError(f"iterative_schedule must give {want}; got {shown(schedule)}")
    values = [float(v) for v in values]
    if not all(0.0 <= v < 1.0 for v in values) or any(b < a for a, b in itertools.pairwise(values)):
        raise UserError(f"iterative_schedule must give {want}, each in [0, 1), none below the one before; got {values}")
    if abs(values[-1] - ratio) > 1e-6:
        raise UserError(f"iterative_schedule must end at pruning_ratio={ratio}; got {values}")
    return [v / ratio for v in values[1:]]


def check_ranking(global_pruning: Any, isomorphic: Any) -> None:
    """``isomorphic`` refines global ranking, so it needs ``global_pruning``."""
    if not isinstance(isomorphic, bool):
        raise UserError(f"isomorphic={isomorphic!r} must be True or False")
    if isomorphic and not global_pruning:
        raise UserError(
            "isomorphic=True ranks units across the groups of each isomorphic set, a kind of global pruning: "
            "pass global_pruning=True with it (on the command line: --global --isomorphic); uniform pruning "
            "already ranks every group on its own"
        )


def meta_tensor(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer of ``model`` on the meta device, else ``None``."""
    return next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)


def check_not_meta(model: nn.Module, name: str = "model", var: str | None = None) -> None:
    """A :class:`UserError` for a module whose tensors are shapes without values (``recover``
    and ``GradualPruner`` raised "Tensor.item() cannot be called on meta tensors" or blamed the
    example inputs)."""
    meta = meta_tensor(model)
    if meta is not None:
        raise UserError(
            f"the {name}'s tensors are on the meta device (e.g. {meta!r}: a shape without values); load its weights "
            f"first ({var or name}.to_empty(device='cpu') then {var or name}.load_state_dict(...))"
        )


def non_finite(
    named: Any, allow_inf: bool | Callable[[str, torch.Tensor], bool] = False
) -> tuple[str, int, int] | None:
    """The first floating tensor of ``named`` (name, tensor pairs) holding NaN (or inf, unless
    ``allow_inf``: a flag, or a test of the name and the tensor), as ``(name, how many, of how
    many)``; ``None`` when all are finite."""
    for name, t in named:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.is_meta or t.numel() == 0:
            continue
        # a NaN or inf anywhere makes the sum non-finite: one read and no tensor-sized mask
        # for the (usual) finite tensor; a sum that only overflowed is checked in full
        if bool(torch.isfinite(t.detach().sum(dtype=torch.float32))):
            continue
        bad = torch.isnan(t) if (allow_inf(name, t) if callable(allow_inf) else allow_inf) else ~torch.isfinite(t)
        if bool(bad.any()):
            return name, int(bad.sum()), t.numel()
    return None


def inf_refused(name: str, tensor: torch.Tensor | None = None) -> bool:
    """Whether a parameter named ``name`` (holding ``tensor``) may not hold inf: any but a bias
    and an additive mask (every finite value 0: ``nn.Parameter(torch.full((n, n), -inf).triu(1),
    requires_grad=False)``, which older attention code keeps as a parameter; such a working
    model was refused as "holds 15 inf value(s) ... Load finite weights"). A weight (or a
    scale, an embedding, a token) of inf makes what it multiplies inf and, times a 0, NaN: an
    inf in ``features.0.weight`` was "non-finite activations ... check the data", and in
    ``fc.weight`` "weight_ratio=0.5 and activation_ratio=0.5 (--alpha/--beta) ... go beyond
    what float64 holds: give numbers of the same ratio near 1". A bias only adds: its output
    is inf, which the verification knows to be non-finite. Buffers may hold inf
    (quantization observers start at +-inf, attention masks)."""
    if name.rpartition(".")[2].endswith("bias"):
        return False
    if tensor is None or not tensor.is_floating_point():
        return True
    finite = tensor.detach()[torch.isfinite(tensor.detach())]
    mask = 0 < finite.numel() < tensor.numel() and bool((finite == 0).all()) and not bool(torch.isnan(tensor).any())
    return not mask


def check_finite(model: nn.Module, name: str = "model") -> None:
    """A :class:`UserError` for a model whose parameters or buffers hold NaN, or whose
    parameters other than biases hold inf (:func:`inf_refused`): magnitude criteria ranked
    the NaN channels as they came and pruned without a word; activation criteria blamed the
    data."""
    found = non_finite(model.named_parameters(), allow_inf=lambda n, t: not inf_refused(n, t))
    found = found or non_finite(model.named_buffers(), allow_inf=True)
    if found is not None:
        tensor, count, total = found
        t = {**dict(model.named_buffers()), **dict(model.named_parameters())}[tensor]
        what = {(True, False): "NaN", (False, True): "inf"}.get(
            (bool(torch.isnan(t).any()), bool(torch.isinf(t).any()) and inf_refused(tensor, t)), "NaN or inf"
        )
        raise UserError(
            f"the {name}'s tensor {tensor!r} holds {count} {what} value(s) (of {total}): its scores and outputs would "
            f"be meaningless. Load finite weights (a training run that diverged, or a damaged checkpoint, saves "
            f"{what}); nothing was pruned"
        )
    # a norm's running variance below 0 (an edited or damaged checkpoint): every output NaN, and the
    # calibration blamed "non-finite activations ...; check the data"
    for key, buf in model.named_buffers():
        if key.rpartition(".")[2] == "running_var" and buf.is_floating_point() and buf.numel():
            low = float(buf.detach().min())
            if low < 0:
                raise UserError(
                    f"the {name}'s tensor {key!r} holds {int((buf < 0).sum())} negative running variance(s) (down "
                    f"to {low:.3g}): a variance is never negative, so the norm's outputs would be NaN. The weights are "
                    "damaged or were edited; load the checkpoint the model was trained to; nothing was pruned"
                )
            if math.isinf(float(buf.detach().max())):  # the channel's output a constant: pruned as if dead
                raise UserError(
                    f"the {name}'s tensor {key!r} holds {int(torch.isinf(buf).sum())} infinite running variance(s): "
                    "the norm divides its input by it, so those channels would output a constant whatever the data. "
                    "The weights are damaged or were edited; load the checkpoint the model was trained to; nothing "
                    "was pruned"
                )


def input_tensors(inputs: Any, name: str = "example_inputs") -> list[torch.Tensor]:
    """The tensors of one batch of ``inputs``; a :class:`UserError` naming ``name`` where it
    holds none (text, NumPy arrays, ``None``): the pruner's ``example_inputs`` and the
    measuring functions' ``inputs`` (``count_flops(model, x.numpy())`` raised conv2d's
    "received an invalid combination of arguments")."""
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    if not leaves:
        from cleanai_core.runtime import text_error

        error = text_error(inputs, name)
        if error is not None:
            raise error
        if any(type(a).__module__ == "numpy" for a in tree_flatten(inputs)[0]):
            raise UserError(
                f"{name} holds a NumPy array, not a tensor: give torch.from_numpy(x) (in the model's dtype, "
                "e.g. torch.from_numpy(x).float())"
            )
        raise UserError(f"{name} holds no tensor: give one batch of inputs, e.g. torch.randn(1, 3, 224, 224)")
    return leaves


def check_example_inputs(example_inputs: Any) -> None:
    leaves = input_tensors(example_inputs)
    if any(t.is_meta for t in leaves):
        raise UserError(
            "example_inputs are on the meta device (shapes without data): give real tensors on the model's "
            "device, e.g. torch.randn(1, 3, 224, 224)"
        )
    if leaves[0].numel() == 0 or all(t.numel() == 0 for t in leaves):
        # a batch of 0 samples: nothing to measure, and the check against the masking oracle
        # raised "max(): Expected reduction dim to be specified for input.numel() == 0"
        raise UserError(
            f"example_inputs hold no values (the input has shape {tuple(leaves[0].shape)}): give one batch of at "
            "least one sample, e.g. torch.randn(1, 3, 224, 224)"
        )
    if any(t.is_floating_point() and not bool(torch.isfinite(stored_values(t)).all()) for t in leaves):
        raise UserError("example_inputs contain NaN or inf values; give finite inputs")


def stored_values(t: torch.Tensor) -> torch.Tensor:
    """The values ``t`` stores: its non-zero entries for a sparse tensor (COO, CSR, CSC, BSR,
    BSC), whose elementwise ops (``isfinite``) are not implemented (a sparse adjacency matrix
    as a graph network's input raised ``NotImplementedError: ... 'aten::ne.Scalar' ... 'SparseCPU'``);
    a float8 tensor as float32 (which ``isfinite`` reads); ``t`` itself otherwise."""
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    if t.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        return t.values()
    if t.is_floating_point() and t.element_size() == 1:  # float8: '"isfinite" not implemented for Float8_e4m3fn'
        return t.float()
    return t
