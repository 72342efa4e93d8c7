"""Apply kept indices to a model through the layer pruners that claim its modules."""

from __future__ import annotations

import itertools
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from cleanai_core.errors import UserError
from cleanai_core.graph.context import is_count_slice, is_index_slice, tensor_name
from cleanai_core.graph.dependency import resolve_modules
from cleanai_core.graph.findings import ModelFindings, prepare_model
from cleanai_core.interfaces import keep_positions, replace_param
from cleanai_core.model_state import copy_model, copy_tensor, drop_user_hooks, user_hooks
from cleanai_core.plugins import plugin_manager

__all__ = [
    "ModelFindings",
    "SliceEdit",
    "apply_edits",
    "edits_for",
    "get_submodule_and_attr",
    "prepare_model",
    "retie",
    "run_after_prune",
    "shared_tensors",
    "slice_tensors",
    "sliced_copy",
]


@attrs.frozen
class SliceEdit:
    """Keep ``keep`` along slice ``slice`` of module ``module``. For a bare tensor
    (``module == ""``) ``slice`` is its qualified name and ``dim`` its channel dim."""

    module: str
    slice: str
    keep: torch.Tensor
    dim: int | None = None

    def to_json(self) -> dict:
        return {"module": self.module, "slice": self.slice, "dim": self.dim, "keep": self.keep.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> SliceEdit:
        return cls(d["module"], d["slice"], torch.tensor(d["keep"], dtype=torch.int64), d.get("dim"))


def get_submodule_and_attr(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    """The module holding a bare tensor and its attribute name; ``qualified`` may be the
    name of the tensor's second slice (``"proj#0"``, :data:`~cleanai_core.graph.context.CROSS_MARK`)."""
    owner, _, attr = tensor_name(qualified).rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def apply_edits(model: nn.Module, edits: Iterable[SliceEdit], pm=None) -> list[str]:
    """Slice ``model`` in place; returns the names of the modules that changed.

    ``model`` is scanned (``cleanai_prepare_model``) and its claims are resolved afresh
    (it may be a copy or a rebuilt model), once per module. After slicing, the
    ``cleanai_after_prune`` hook runs on every module with the findings of that scan.
    """
    edits = list(edits)
    pm = plugin_manager(pm, "apply_edits")
    findings = prepare_model(model, pm)
    changed = slice_tensors(model, edits, pm, findings)
    run_after_prune(model, edits, pm, findings)
    return changed


def shared_tensors(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Parameters held by several modules (or attributes): for each, its holders as
    ``(module, attribute)`` pairs. Tied input and output embeddings are one."""
    holders: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                holders[id(p)].append((module, attr))
    return [h for h in holders.values() if len(h) > 1]


def retie(shared: list[list[tuple[nn.Module, str]]], originals: list[torch.Tensor] | None = None) -> None:
    """Tie again what :func:`shared_tensors` found before slicing: when every holder that
    sliced a shared parameter made the same tensor, all holders get that one (each pruner
    sliced its own copy; the model should keep one; a holder the model never called, as
    T5's ``shared`` embedding, follows). ``originals``: the parameters before slicing."""
    for i, holders in enumerate(shared):
        tensors = [getattr(m, a) for m, a in holders]
        orig = originals[i] if originals is not None else None
        sliced = [t for t in tensors if t is not orig] if orig is not None else tensors
        if not sliced or all(t is sliced[0] for t in tensors):
            continue
        first = sliced[0]
        if all(_same(t, first) for t in sliced[1:]):
            for m, a in holders:
                setattr(m, a, first)
        else:
            names = ", ".join(f"{type(m).__name__}.{a}" for m, a in holders)
            warnings.warn(
                f"a parameter shared by {names} was sliced differently by its holders, so they no longer share it; "
                "keep the channels of one of them (ignored_layers) to keep it tied",
                RuntimeWarning,
                stacklevel=3,
            )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and values; on the meta device (a dry run: no values) the same shape."""
    if a.shape != b.shape:
        return False
    return a.is_meta or b.is_meta or bool(torch.equal(a.data, b.data))


def slice_tensors(
    model: nn.Module,
    edits: list[SliceEdit],
    pm,
    findings: ModelFindings | None = None,
    claims: Mapping[str, Any] | None = None,
) -> list[str]:
    """The slicing half of :func:`apply_edits` (no after-prune fix-ups). ``findings``:
    the scan of ``model`` before slicing (scanned here when not given); pass the same
    object to :func:`run_after_prune`. ``claims``: the layer pruner of every claimed
    module by name (a graph's nodes), where ``model`` is a copy of the model they were
    resolved on: they are not asked again. A parameter shared by several modules (tied
    embeddings) is shared again afterwards."""
    shared = shared_tensors(model)
    originals = [getattr(h[0][0], h[0][1]) for h in shared]
    changed = _slice(model, edits, pm, findings, claims)
    retie(shared, originals)
    return changed


def _slice(
    model: nn.Module, edits: list[SliceEdit], pm, findings: ModelFindings | None, claims: Mapping[str, Any] | None
) -> list[str]:
    pruners = (
        {name: node.pruner for name, node in resolve_modules(model, pm, findings).items()}
        if claims is None
        else {name: node.pruner for name, node in claims.items()}
    )
    per_module: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    bare = []
    for e in edits:
        if e.module == "":
            bare.append(e)
        else:
            per_module[e.module][e.slice] = e.keep
    for name, keep in per_module.items():  # all checked before any is cut
        if pruners.get(name) is None:
            held = dict(model.named_modules()).get(name)
            if held is None:  # a history of another architecture: its caller says it does not fit
                raise KeyError(f"no plugin claims module {name!r} in this model; cannot slice it")
            # the layer is there but nothing slices it now: a history recorded while a plugin (or a
            # temporary_plugin) claimed it, replayed without it, was "does not fit ... replay it on a
            # fresh, unpruned model", which it was
            raise UserError(
                f"module {name!r} ({type(held).__name__}) has slices to cut ({', '.join(map(repr, keep))}), but no "
                f"registered plugin claims a {type(held).__name__} now: the plugin whose cleanai_layer_pruner sliced "
                "it when these edits were made is not registered. Register it (install it, or wrap the call in "
                "cleanai_core.testing.temporary_plugin) and try again; nothing was sliced"
            )
    changed = []
    for name, keep in per_module.items():
        pruner = pruners[name]
        pruner.prune(model.get_submodule(name), keep)
        changed.append(name)
    for e in bare:
        if is_count_slice(e.slice):  # a stored count: set after the fix-ups (run_after_prune)
            continue
        owner, attr = get_submodule_and_attr(model, e.slice)
        if is_index_slice(e.slice):  # an index buffer: its values follow the kept channels
            keep_positions(owner, attr, e.keep)
        else:
            replace_param(owner, attr, int(e.dim), e.keep)
        changed.append(e.slice)
    return changed


def run_after_prune(model: nn.Module, edits: list[SliceEdit], pm, findings: ModelFindings) -> None:
    """The ``cleanai_after_prune`` half of :func:`apply_edits`: attribute fix-ups.
    ``findings``: the scan of ``model`` taken *before* it was sliced (:func:`prepare_model`),
    the one :func:`slice_tensors` used; a scan of the sliced model would describe the
    wrong widths."""
    edits_by_key = {(e.module, e.slice): e.keep for e in edits}
    counts = [(e, *get_submodule_and_attr(model, e.slice)) for e in edits if not e.module and is_count_slice(e.slice)]
    stored = [getattr(owner, attr) for _, owner, attr in counts]
    with torch.no_grad():
        for name, module in model.named_modules():
            pm.hook.cleanai_after_prune(module=module, name=name, edits=edits_by_key, findings=findings)
    # a stored count (``self.c`` of ``split((self.c, self.c), 1)``) becomes the channels kept,
    # unless a fix-up set it (timm's ``num_heads`` from the kept heads): it read the number
    # as it was, and knows the module
    fixed = [getattr(owner, attr) != was for (_, owner, attr), was in zip(counts, stored, strict=True)]
    for (e, owner, attr), done in zip(counts, fixed, strict=True):
        if not done:
            setattr(owner, attr, int(e.keep.numel()))


def edits_for(graph, pruned: torch.Tensor) -> list[SliceEdit]:
    """The slice edits that remove the ``pruned`` units of ``graph`` (a boolean mask over its root units)."""
    return [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in graph.keep_indices(pruned).items()]


def sliced_copy(
    source: nn.Module,
    edits: list[SliceEdit],
    pm: Any,
    compensate: Callable | None = None,
    share: bool = False,
    claims: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A pruned copy of ``source``; ``source`` and its tensors are never written to.

    The copy starts out sharing ``source``'s parameters and buffers: slicing makes new,
    smaller tensors anyway, so cloning every weight first (what ``copy.deepcopy`` does)
    would copy most of the model only to throw it away. A tensor is copied only where it
    is about to be written in place (``compensate(model, own)`` calls ``own(module)``
    before touching a module) or is left unsliced; one memo keeps tied tensors tied.
    Fix-up hooks run after every tensor is the copy's own. The user's forward and backward
    hooks on ``source``'s modules stay there: the copy has none of them
    (:func:`~cleanai_core.model_state.user_hooks`; torch's own, such as quantization
    observers, are copied).

    A plugin that writes into a tensor it was handed instead of replacing it would change
    the user's model through the sharing: every shared tensor's version counter, storage
    and shape are compared afterwards, and such a write raises, naming the tensor and the
    plugin that claimed its module.

    ``share``: the copy keeps sharing the parameters it left unsliced (its buffers are
    still its own): for a copy that is measured or run and thrown away, never returned
    and never trained (a sensitivity trial, a candidate measured for its size). Copying
    them was 40% of a ResNet-50 trial's build.

    ``claims``: ``source``'s claimed modules by name, with their pruners (its graph's
    ``nodes``): the copy's modules are then not claimed again (:func:`slice_tensors`).
    """
    originals = list(source.parameters()) + list(source.buffers())
    before = [_fingerprint(t) for t in originals]
    model = copy_model(source, {id(t): t for t in originals})
    drop_user_hooks(model, user_hooks(source))
    shared = {id(t) for t in originals}
    memo: dict[int, Any] = {}
    holders: dict[int, list[tuple[dict, str]]] = defaultdict(list)  # every place the copy holds each tensor
    for m in model.modules():
        for table in (m._parameters, m._buffers):
            for key, t in table.items():
                if t is not None and id(t) in shared:
                    holders[id(t)].append((table, key))

    def own(module: nn.Module, tables: tuple[str, ...] = ("_parameters", "_buffers")) -> nn.Module:
        # a tensor is copied for every module that holds it: tied embeddings copied for the
        # output layer that compensation wrote to stayed the source's in the embedding, so
        # slicing found nothing shared, the pruned model held two tensors and its state_dict
        # loaded into a rebuilt (tied) model gave other outputs
        for m in module.modules():
            for table in (getattr(m, t) for t in tables):
                for t in list(table.values()):
                    if t is not None and id(t) in shared:
                        new = copy_tensor(t, memo)
                        for where, name in holders[id(t)]:
                            where[name] = new
        return module

    if compensate is not None:
        compensate(model, own=own)
    findings = prepare_model(model, pm)  # the copy as it is before slicing: its fix-ups read this
    slice_tensors(model, edits, pm, findings, claims)
    _check_untouched(source, originals, before, pm)
    own(model, ("_buffers",) if share else ("_parameters", "_buffers"))
    run_after_prune(model, edits, pm, findings)
    return model


def _fingerprint(t: torch.Tensor) -> tuple:
    """What an in-place write or a ``.data`` swap changes: version, storage, shape. (A
    write through ``t.data`` bumps no counter; reading every weight to catch it would cost
    more than the whole slicing.)"""
    try:
        version = t._version
    except RuntimeError:  # inference-mode tensors count no versions
        version = None
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # no storage (e.g. an uninitialised lazy parameter)
        ptr = None
    return version, ptr, tuple(t.shape)


def _check_untouched(source: nn.Module, originals: list[torch.Tensor], before: list[tuple], pm: Any) -> None:
    changed = {id(t) for t, fp in zip(originals, before, strict=True) if _fingerprint(t) != fp}
    if not changed:
        return
    names = [n for n, t in itertools.chain(source.named_parameters(), source.named_buffers()) if id(t) in changed]
    owners = {n.rpartition(".")[0] for n in names}
    nodes = resolve_modules(source, pm)
    claimed = sorted({f"{type(nodes[o].pruner).__name__} ({o or 'root'})" for o in owners if o in nodes})
    raise RuntimeError(
        f"a layer pruner wrote into {', '.join(names)} in place while slicing a copy, which changed your model "
        f"(it shares those tensors with the copy). Pruners involved: {', '.join(claimed) or 'unknown'}. "
        "LayerPruner.prune must replace a module's tensors (slice_params / replace_param), never write into "
        "them; report this to the plugin's author, or prune with inplace=True."
    )
