"""Streaming per-channel activation statistics at the inputs of consumer modules.

For every ``"in"`` slice of the graph (a conv's, a linear's input channels), a forward
pre-hook reduces the batch to per-channel count, mean and sum of squared deviations
(two reductions in the activation's precision, combined in float64) and merges them into
running totals with Chan's parallel formula. With covariance (for reconstruction), a
bounded number of randomly drawn positions per batch feeds a C x C co-moment. Memory is
O(channels) (O(C^2) with covariance), never O(data); nothing is stored per sample. Hooks
are removed on exit, also on error or Ctrl-C; the model's train/eval mode is restored.
"""

from __future__ import annotations

import inspect
import math
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
#: positions per batch (per consumer) drawn at random for the covariance; 0 = all.
#: On the digits benchmark 256 x 5 batches matched every position (1,280 vs ~19,000 rows).
COVARIANCE_ROWS = 256


@attrs.define(eq=False)
class ChannelStats:
    """Running per-channel statistics (float64): count, mean and M2 per channel; with
    ``covariance=True`` also the channel co-moment matrix (C x C, for reconstruction),
    streamed from at most ``covariance_rows`` randomly drawn positions of every batch
    (with its own count and mean), so its cost per batch stays bounded."""

    count: float = 0.0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    covariance: bool = False
    comoment: torch.Tensor | None = None
    covariance_rows: int = 0
    cov_count: float = 0.0
    cov_mean: torch.Tensor | None = None
    generator: torch.Generator | None = None

    def update(self, x: torch.Tensor, dim: int) -> None:
        moments = batch_moments(x, dim)
        if moments is None:
            return
        n_b, mean_b, m2_b = moments
        c = mean_b.numel()
        if self.mean is not None and self.mean.numel() != c:
            raise UserError(f"a layer saw {c} channels after {self.mean.numel()} earlier in calibration")
        self.count, self.mean, self.m2 = _chan_merge(self.count, self.mean, self.m2, n_b, mean_b, m2_b)
        if self.covariance and c <= MAX_COVARIANCE_CHANNELS:
            rows = self._sample_rows(x, dim)
            if rows.dtype in (torch.float16, torch.bfloat16):
                rows = rows.float()
            n_r = rows.shape[0]
            mean_r = rows.mean(0)
            centred = rows - mean_r
            cross = (centred.T @ centred).cpu()
            self.cov_count, self.cov_mean, self.comoment = _chan_merge(
                self.cov_count, self.cov_mean, self.comoment, n_r, mean_r.to(torch.float64).cpu(), cross
            )

    def _sample_rows(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``(rows, C)``: every position of the batch, or ``covariance_rows`` drawn at random."""
        x3 = _as_rows(x.detach(), dim)
        pre, c, post = x3.shape
        n = pre * post
        if self.covariance_rows and n > self.covariance_rows:
            if self.generator is None:
                self.generator = torch.Generator().manual_seed(0)
            idx = torch.randint(n, (self.covariance_rows,), generator=self.generator).to(x.device)
            return x3[idx // post, :, idx % post]
        return x3.transpose(1, 2).reshape(n, c)

    @property
    def cov(self) -> torch.Tensor | None:
        """Channel covariance matrix, when collected."""
        return None if self.comoment is None else self.comoment / max(self.cov_count, 1.0)

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.count, 1.0)

    @property
    def second_moment(self) -> torch.Tensor:
        return self.var + self.mean**2


def _as_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` viewed as ``(before, C, after)`` around the channel dim (a view when contiguous)."""
    return x.reshape(math.prod(x.shape[:dim]), x.shape[dim], -1)


def batch_moments(x: torch.Tensor, dim: int) -> tuple[float, torch.Tensor, torch.Tensor] | None:
    """``(count, mean, M2)`` per channel of one batch, float64.

    Two reductions in the activation's own precision (a sum and a sum of squares; no
    upcast copy of the whole tensor), combined in float64. M2 = sum(x^2) - n mean^2 loses
    relative precision only for channels whose variance is tiny next to their squared
    mean (it is clamped at 0); the second moment E[x^2] the criteria use is exact to
    the activation's precision."""
    x = x.detach()
    if not x.is_floating_point():
        return None
    x3 = _as_rows(x, dim)
    n = x3.shape[0] * x3.shape[2]
    if n == 0:
        return None
    if x3.dtype in (torch.float16, torch.bfloat16):
        x3 = x3.float()
    # reducing the contiguous trailing dim first is several times faster than one
    # reduction over (0, 2) on CPU
    if x3.shape[2] > 1:
        total = x3.sum(2).sum(0)
        squares = torch.linalg.vector_norm(x3, dim=2).square().sum(0)
    else:
        x2 = x3[:, :, 0]
        total = x2.sum(0)
        squares = (x2 * x2).sum(0)
    total, squares = total.to(torch.float64), squares.to(torch.float64)
    if not (bool(torch.isfinite(total).all()) and bool(torch.isfinite(squares).all())):
        raise UserError(
            "non-finite activations (NaN or inf, or values too large for the model's precision) reached a layer "
            "during calibration; check the data for NaN/inf values and that the model's weights are finite"
        )
    mean = total / n
    m2 = (squares - n * mean**2).clamp_min(0.0)
    return float(n), mean.cpu(), m2.cpu()


def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s parallel merge of two (count, mean, co-moment) summaries, updating
    the running ``m2_a`` in place. ``m2`` is per-channel (a vector) or a co-moment matrix."""
    if mean_a is None:
        return float(n_b), mean_b, m2_b.to(torch.float64)
    total = n_a + n_b
    delta = mean_b - mean_a
    weight = n_a * n_b / total
    m2_a += m2_b
    if m2_a.ndim == 2:
        m2_a.addr_(delta, delta, alpha=weight)
    else:
        m2_a.addcmul_(delta, delta, value=weight)
    return total, mean_a + delta * (n_b / total), m2_a


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
        covariance_rows: int | None = None,
    ) -> None:
        self.covariance_rows = COVARIANCE_ROWS if covariance_rows is None else covariance_rows
        self.model = model
        self.stats: dict[tuple[str, str], ChannelStats] = {}
        consumers = [s for s in slices if s.kind == "in" and s.module]
        self._targets = [(s.module, s.name, s.arg, s.dim) for s in consumers]
        # covariance where the layer can use it (reconstruct), narrowest consumers first,
        # within the memory budget
        self.with_covariance: set[tuple[str, str]] = set()
        used = 0
        foldable = [
            s
            for s in consumers
            if covariance and s.pruner is not None and s.pruner.can_reconstruct(model.get_submodule(s.module), s.name)
        ]
        for s in sorted(foldable, key=lambda s: s.atoms.numel()):
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
            stats = self.stats.setdefault(
                key, ChannelStats(covariance=key in self.with_covariance, covariance_rows=self.covariance_rows)
            )

            keyword = _parameter_name(module, argpos)

            def pre(m, args, kwargs, stats=stats, argpos=argpos, dim=dim, keyword=keyword):
                if isinstance(argpos, int) and argpos < len(args):
                    x = args[argpos]
                else:  # passed by keyword, e.g. mha(q, key=k, value=v)
                    x = kwargs.get(keyword)
                if isinstance(x, torch.Tensor) and x.ndim > 0:
                    stats.update(x, dim % x.ndim)

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _parameter_name(module: nn.Module, arg: int | str) -> str | None:
    """The keyword of ``module.forward``'s positional parameter ``arg`` (or ``arg`` itself)."""
    if not isinstance(arg, int):
        return arg
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if arg < len(params) and params[arg].kind in (params[arg].POSITIONAL_ONLY, params[arg].POSITIONAL_OR_KEYWORD):
        return params[arg].name
    return None


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
