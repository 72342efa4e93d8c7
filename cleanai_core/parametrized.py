"""Tensors computed by ``torch.nn.utils.parametrize`` (``weight_norm``, ``spectral_norm``
from ``torch.nn.utils.parametrizations``, a user's ``register_parametrization``).

A parametrized ``module.weight`` is a property that computes the tensor from the
``module.parametrizations.weight.original*`` tensors on every read: assigning a sliced
copy to ``module.weight`` does not shrink it. :func:`slice_parametrized` slices the
originals instead (and the state a parametrization keeps alongside them), and
:func:`trace_parametrized` tells the graph which slices of such a module are exact,
which re-normalise (like a LayerNorm over fewer channels) and which cannot be sliced:

- weight norm (``w = g v / ||v||``, norms over every dim but ``dim``): slicing ``dim``
  is exact (each row keeps its own norm); slicing another dim re-normalises the rows.
- spectral norm (``w = W / sigma(W)``): any slice changes ``sigma``: re-normalises. The
  power-iteration vectors ``_u``/``_v`` are sliced with the weight and refined on the
  pruned weight, so ``sigma`` is the pruned weight's own.
- any other parametrization: its slices are frozen (nothing says what it computes).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["is_parametrized", "slice_parametrized", "trace_parametrized"]

_KNOWN = ("_WeightNorm", "_SpectralNorm")


def is_parametrized(module: nn.Module, attr: str | None = None) -> bool:
    """Whether ``module`` (or its tensor ``attr``) is computed by a parametrization."""
    d = module.__dict__
    if "parametrizations" not in d.get("_modules", d) and "parametrizations" not in d:
        # the ModuleDict torch looks up is a child module: where there is none, its
        # ``getattr`` would only miss, at the cost of an AttributeError (every replace_param)
        if type(module).__getattr__ is nn.Module.__getattr__ and not hasattr(type(module), "parametrizations"):
            return False
    return parametrize.is_parametrized(module, attr)


def _originals(plist: Any) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in plist._parameters.items() if k.startswith("original") and v is not None]


def slice_parametrized(module: nn.Module, attr: str, dim: int, keep: torch.Tensor) -> bool:
    """Slice the parametrized ``module.<attr>`` along ``dim`` (of the computed tensor) to
    ``keep``; ``False`` when ``attr`` is not parametrized. Every original whose size along
    ``dim`` is the computed tensor's is sliced (a weight norm's ``g`` of size 1 there
    stays); a spectral norm's power-iteration state follows."""
    if not is_parametrized(module, attr):
        return False
    from cleanai_core.interfaces import slice_tensor

    plist = module.parametrizations[attr]
    with torch.no_grad():
        old = getattr(module, attr)
        size, dim = old.shape[dim], dim % old.ndim
        for name, t in _originals(plist):
            if t.ndim == old.ndim and t.shape[dim] == size:
                plist._parameters[name] = nn.Parameter(slice_tensor(t.data, dim, keep), requires_grad=t.requires_grad)
        for p in plist:
            if type(p).__name__ == "_SpectralNorm" and old.ndim > 1:
                _slice_spectral(p, old.shape, dim, keep)
                p._power_method(p._reshape_weight_to_matrix(plist.original), 15)
    return True


def _slice_spectral(p: nn.Module, shape: torch.Size, dim: int, keep: torch.Tensor) -> None:
    """``_u`` indexes ``dim`` of the weight matrix's rows (``p.dim``), ``_v`` the flattened
    other dims: slice the one ``dim`` falls in, then refine both on the pruned weight."""
    if dim == p.dim:
        p._u = p._u[keep.to(p._u.device)].clone()
    else:
        others = [d for d in range(len(shape)) if d != p.dim]
        grid = torch.arange(p._v.numel()).reshape([shape[d] for d in others])
        cols = grid.index_select(others.index(dim), keep.cpu()).reshape(-1)
        p._v = p._v[cols.to(p._v.device)].clone()
    p._u = nn.functional.normalize(p._u, dim=0, eps=p.eps)
    p._v = nn.functional.normalize(p._v, dim=0, eps=p.eps)


def trace_parametrized(name: str, module: nn.Module, pruner: Any, ctx: Any) -> None:
    """After ``pruner`` traced module ``name``: mark the slices that cut a re-normalising
    parametrization ``normalizes`` and freeze those that cut an unknown one."""
    if not is_parametrized(module):
        return
    specs = [s for (m, _), s in ctx.slices.items() if m == name]
    for attr, plist in module.parametrizations.items():
        kinds = [type(p).__name__ for p in plist]
        for spec in specs:
            dim = _cut_dim(module, pruner, spec, attr)
            if dim is False:
                continue
            if dim is None or any(k not in _KNOWN for k in kinds):
                reason = f"{name}.{attr} is computed by a parametrization ({', '.join(kinds)}) CleanAI cannot slice"
                ctx.freeze(spec.atoms, reason)
            elif "_SpectralNorm" in kinds or any(p.dim != dim for p in plist if type(p).__name__ == "_WeightNorm"):
                spec.normalizes = True


def _cut_dim(module: nn.Module, pruner: Any, spec: Any, attr: str) -> int | bool | None:
    """The dim of ``module.<attr>`` that slice ``spec`` shortens (``False``: none; ``None``:
    unknown), found by pruning one index of a copy."""
    n = spec.atoms.numel()
    before = getattr(module, attr).shape
    if n < 2:
        return None
    probe = copy.deepcopy(module)
    try:
        pruner.prune(probe, {spec.name: torch.arange(1, n)})
        after = getattr(probe, attr).shape
    except Exception:  # noqa: BLE001 - the parametrization does not take a sliced original
        return None
    if after == before:
        return False
    dims = [d for d in range(len(before)) if after[d] != before[d]]
    return dims[0] if len(dims) == 1 and len(after) == len(before) else None
