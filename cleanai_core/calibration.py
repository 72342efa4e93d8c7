"""Streaming per-channel activation statistics at the inputs of consumer modules.

For every ``"in"`` slice of the graph (a conv's, a linear's input channels), a forward
pre-hook reduces the batch to per-channel count, mean and sum of squared deviations in
float64 and merges them into running totals with Chan's parallel formula. Memory is
O(channels), never O(data); nothing is stored per sample. Hooks are removed on exit,
also on error or Ctrl-C; the model's train/eval mode is restored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import torch
from torch import nn

from cleanai_core.errors import UserError

__all__ = ["ChannelStats", "StatsCollector", "move_to", "split_batch"]

#: layers with more input channels than this keep no covariance (memory is C^2 float64)
MAX_COVARIANCE_CHANNELS = 4096
#: total memory for covariance matrices; the widest consumers go without beyond it
COVARIANCE_BUDGET_BYTES = 1 << 30


@attrs.define(eq=False)
class ChannelStats:
    """Running per-channel statistics (float64): count per channel, mean, M2; with
    ``covariance=True`` also the channel co-moment matrix (C x C, for reconstruction)."""

    count: float = 0.0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    covariance: bool = False
    comoment: torch.Tensor | None = None

    def update(self, x: torch.Tensor, dim: int) -> None:
        x = x.detach()
        if not x.is_floating_point():
            return
        c = x.shape[dim]
        flat = x.movedim(dim, -1).reshape(-1, c).to(torch.float64)
        n_b = flat.shape[0]
        if n_b == 0:
            return
        if not bool(torch.isfinite(flat).all()):
            raise UserError(
                "non-finite activations (NaN or inf) reached a layer during calibration; "
                "check the data for NaN/inf values and that the model's weights are finite"
            )
        mean_b = flat.mean(0)
        centred = flat - mean_b
        m2_b = (centred**2).sum(0)
        cross_b = (centred.T @ centred).cpu() if self.covariance and c <= MAX_COVARIANCE_CHANNELS else None
        if self.mean is None:
            self.count, self.mean, self.m2, self.comoment = float(n_b), mean_b.cpu(), m2_b.cpu(), cross_b
            return
        if self.mean.numel() != c:
            raise UserError(f"a layer saw {c} channels after {self.mean.numel()} earlier in calibration")
        mean_b, m2_b = mean_b.cpu(), m2_b.cpu()
        n = self.count
        total = n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta**2 * (n * n_b / total)
        if self.comoment is not None and cross_b is not None:
            self.comoment = self.comoment + cross_b + torch.outer(delta, delta) * (n * n_b / total)
        self.count = total

    @property
    def cov(self) -> torch.Tensor | None:
        """Channel covariance matrix, when collected."""
        return None if self.comoment is None else self.comoment / max(self.count, 1.0)

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.count, 1.0)

    @property
    def second_moment(self) -> torch.Tensor:
        return self.var + self.mean**2


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` from a batch: a tensor, an ``(x, y)`` pair or a dict."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise UserError("the data loader yielded an empty batch")
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        target = None
        inputs = {}
        for k, v in batch.items():
            if k in ("label", "labels", "y", "target", "targets"):
                target = v
            else:
                inputs[k] = v
        return inputs, target
    raise UserError(
        f"the data loader yielded a {type(batch).__name__}; expected tensors, (input, label) pairs or dicts"
    )


def move_to(x: Any, device: torch.device | None) -> Any:
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: move_to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(move_to(v, device) for v in x)
    return x


class StatsCollector:
    """Collects :class:`ChannelStats` for the given consumer slices of ``model``."""

    def __init__(
        self,
        model: nn.Module,
        slices: Iterable[Any],
        covariance: bool = False,
        covariance_budget: int = COVARIANCE_BUDGET_BYTES,
    ) -> None:
        self.model = model
        self.stats: dict[tuple[str, str], ChannelStats] = {}
        consumers = [s for s in slices if s.kind == "in" and s.module]
        self._targets = [(s.module, s.name, s.arg, s.dim) for s in consumers]
        # covariance for the narrowest consumers first, within the memory budget
        self.with_covariance: set[tuple[str, str]] = set()
        used = 0
        for s in sorted(consumers, key=lambda s: s.atoms.numel()) if covariance else ():
            size = s.atoms.numel() ** 2 * 8
            if s.atoms.numel() > MAX_COVARIANCE_CHANNELS or used + size > covariance_budget:
                break
            used += size
            self.with_covariance.add((s.module, s.name))

    @contextmanager
    def hooks(self) -> Iterator[StatsCollector]:
        handles = []
        for module_name, slice_name, argpos, dim in self._targets:
            module = self.model.get_submodule(module_name)
            key = (module_name, slice_name)
            stats = self.stats.setdefault(key, ChannelStats(covariance=key in self.with_covariance))

            def pre(m, args, kwargs, stats=stats, argpos=argpos, dim=dim):
                x = args[argpos] if isinstance(argpos, int) and argpos < len(args) else kwargs.get(argpos)
                if isinstance(x, torch.Tensor) and x.ndim > 0:
                    stats.update(x, dim % x.ndim)

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def iterate(loader: Iterable[Any], num_batches: int | None) -> Iterator[Any]:
    n = 0
    for batch in loader:
        if num_batches is not None and n >= num_batches:
            break
        n += 1
        yield batch
    if n == 0:
        raise UserError("the calibration data is empty; give at least one batch")


def total_batches(loader: Any, num_batches: int | None) -> int | None:
    try:
        n = len(loader)
    except TypeError:
        n = None
    if num_batches is None:
        return n
    return num_batches if n is None else min(n, num_batches)
