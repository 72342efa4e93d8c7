"""Which dimensions of a module's tensor a slice shortens, found without touching the module."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from cleanai_core.graph.context import SliceSpec

__all__ = ["cut_dims"]


def cut_dims(module: nn.Module, pruner: Any, spec: SliceSpec, attr: str) -> dict[int, int] | None:
    """The dimensions of ``module.<attr>`` that pruning slice ``spec`` shortens, each with
    how many of its indices one channel takes (empty when it leaves that tensor alone),
    found by pruning its first index on a copy whose tensors live on the meta device;
    ``None`` when it cannot be told (a slice of one channel, a pruner that cannot slice one
    slice alone, a tensor that changes rank). ``module`` is not written to."""
    n, tensor = spec.atoms.numel(), getattr(module, attr, None)
    if n < 2 or not isinstance(tensor, torch.Tensor):
        return None
    # a deep copy whose tensors are meta stand-ins (no data copied): a shallow copy would
    # share the submodules, and a pruner that slices one (an attention's out_proj) would
    # write into the user's model
    memo: dict[int, Any] = {}
    for t in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    probe = copy.deepcopy(module, memo)
    try:
        pruner.prune(probe, {spec.name: torch.arange(1, n)})
    except Exception:  # noqa: BLE001 - a pruner that cannot slice one slice alone
        return None
    after = getattr(probe, attr, None)
    if not isinstance(after, torch.Tensor) or after.ndim != tensor.ndim:
        return None
    return {d: tensor.shape[d] - after.shape[d] for d in range(tensor.ndim) if after.shape[d] != tensor.shape[d]}
