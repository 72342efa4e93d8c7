"""Apply kept indices to a model through the layer pruners that claim its modules."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable

import attrs
import torch
from torch import nn

from cleanai_core.graph.dependency import resolve_modules
from cleanai_core.graph.findings import ModelFindings, prepare_model
from cleanai_core.interfaces import replace_param
from cleanai_core.plugins import get_plugin_manager

__all__ = [
    "ModelFindings",
    "SliceEdit",
    "apply_edits",
    "get_submodule_and_attr",
    "prepare_model",
    "retie",
    "run_after_prune",
    "shared_tensors",
    "slice_tensors",
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
    owner, _, attr = qualified.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def apply_edits(model: nn.Module, edits: Iterable[SliceEdit], pm=None) -> list[str]:
    """Slice ``model`` in place; returns the names of the modules that changed.

    ``model`` is scanned (``cleanai_prepare_model``) and its claims are resolved afresh
    (it may be a copy or a rebuilt model), once per module. After slicing, the
    ``cleanai_after_prune`` hook runs on every module with the findings of that scan.
    """
    edits = list(edits)
    pm = pm or get_plugin_manager()
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
        if all(t.shape == first.shape and torch.equal(t.data, first.data) for t in sliced[1:]):
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


def slice_tensors(model: nn.Module, edits: list[SliceEdit], pm, findings: ModelFindings | None = None) -> list[str]:
    """The slicing half of :func:`apply_edits` (no after-prune fix-ups). ``findings``:
    the scan of ``model`` before slicing (scanned here when not given); pass the same
    object to :func:`run_after_prune`. A parameter shared by several modules (tied
    embeddings) is shared again afterwards."""
    shared = shared_tensors(model)
    originals = [getattr(h[0][0], h[0][1]) for h in shared]
    changed = _slice(model, edits, pm, findings)
    retie(shared, originals)
    return changed


def _slice(model: nn.Module, edits: list[SliceEdit], pm, findings: ModelFindings | None) -> list[str]:
    nodes = resolve_modules(model, pm, findings)
    per_module: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    bare = []
    for e in edits:
        if e.module == "":
            bare.append(e)
        else:
            per_module[e.module][e.slice] = e.keep
    changed = []
    for name, keep in per_module.items():
        node = nodes.get(name)
        if node is None:
            raise KeyError(f"no plugin claims module {name!r} in this model; cannot slice it")
        node.pruner.prune(node.module, keep)
        changed.append(name)
    for e in bare:
        owner, attr = get_submodule_and_attr(model, e.slice)
        replace_param(owner, attr, int(e.dim), e.keep)
        changed.append(e.slice)
    return changed


def run_after_prune(model: nn.Module, edits: list[SliceEdit], pm, findings: ModelFindings) -> None:
    """The ``cleanai_after_prune`` half of :func:`apply_edits`: attribute fix-ups.
    ``findings``: the scan of ``model`` taken *before* it was sliced (:func:`prepare_model`),
    the one :func:`slice_tensors` used; a scan of the sliced model would describe the
    wrong widths."""
    edits_by_key = {(e.module, e.slice): e.keep for e in edits}
    with torch.no_grad():
        for name, module in model.named_modules():
            pm.hook.cleanai_after_prune(module=module, name=name, edits=edits_by_key, findings=findings)
