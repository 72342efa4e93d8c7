"""Apply kept indices to a model through the layer pruners that claim its modules."""

from __future__ import annotations

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
    "run_after_prune",
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


def slice_tensors(model: nn.Module, edits: list[SliceEdit], pm, findings: ModelFindings | None = None) -> list[str]:
    """The slicing half of :func:`apply_edits` (no after-prune fix-ups). ``findings``:
    the scan of ``model`` before slicing (scanned here when not given); pass the same
    object to :func:`run_after_prune`."""
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
