"""Sequential, block-by-block calibration for deep models (as large-model quantisers do).

The calibration batches are run to the first block of the model's block list (an
``nn.ModuleList`` of layers: HF decoder layers, ViT blocks) and the block's inputs are
cached. Then one block at a time: its consumers' hooks are installed, the cached inputs
are run through that block alone, its statistics are kept, its outputs become the next
block's cached inputs, and its hooks go. Consumers outside the blocks (an embedding's
consumers, the head) are collected on the way in and, for those after the blocks, in a
last pass whose blocks replay the cached final outputs instead of computing.

What this bounds: live activations are one block's on one batch; hooks and reductions
exist for one block at a time; the same consumers get a covariance as in a whole-model
pass (the narrowest of the model first, until ``budget`` is spent). What it costs: the
cached hidden states of every batch (batches x tokens x width) and one extra pass of
the layers outside the blocks. A block's hidden state must be its first argument and
its first output (or the output itself); its other arguments (masks, position
embeddings) are reused unchanged for every block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from cleanai_core.calibration import COVARIANCE_BUDGET_BYTES, StatsCollector, iterate, move_to, split_batch
from cleanai_core.errors import UserError
from cleanai_core.runtime import device_of

__all__ = ["collect_sequential", "find_blocks"]


class _Stop(Exception):
    """Raised by the first block's hook: the rest of the model is not run in this pass."""


def find_blocks(model: nn.Module, name: str | None = None) -> tuple[str, nn.ModuleList]:
    """The block list: ``name`` if given, else the ``nn.ModuleList`` of two or more
    same-type modules holding the most parameters."""
    if name is not None:
        try:
            blocks = model.get_submodule(name)
        except AttributeError as exc:
            raise UserError(f"sequential={name!r}: the model has no such submodule") from exc
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UserError(f"sequential={name!r} is a {type(blocks).__name__}; name an nn.ModuleList of blocks")
        return name, blocks
    best: tuple[int, str, nn.ModuleList] | None = None
    for n, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(b) for b in m}) == 1:
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[0]:
                best = (size, n, m)
    if best is None:
        raise UserError(
            "sequential calibration needs the model's layers in an nn.ModuleList (decoder layers, ViT blocks); "
            "none was found: calibrate without sequential=, or name the block list (sequential='model.layers')"
        )
    return best[1], best[2]


def collect_sequential(
    model: nn.Module,
    slices: Iterable[Any],
    loader: Iterable[Any],
    num_batches: int | None,
    forward: Callable[[nn.Module, Any], Any],
    blocks: str | None = None,
    covariance: bool = False,
    covariance_rows: int | None = None,
    budget: int | None = None,
) -> dict:
    """Statistics of every consumer in ``slices``, collected block by block (see the
    module's docstring). ``forward(model, inputs)`` runs the whole model; the model is
    run in eval mode and its mode restored."""
    prefix, block_list = find_blocks(model, blocks if isinstance(blocks, str) else None)
    consumers = [s for s in slices if s.kind == "in" and s.module]
    inside = [[s for s in consumers if _under(s.module, f"{prefix}.{i}")] for i in range(len(block_list))]
    outside = [s for s in consumers if not _under(s.module, prefix)]
    options = {"covariance": covariance, "covariance_rows": covariance_rows}
    # the consumers a whole-model pass would give a covariance, granted block by block
    chosen = StatsCollector(
        model, consumers, covariance_budget=COVARIANCE_BUDGET_BYTES if budget is None else budget, **options
    ).with_covariance
    stats: dict = {}

    def collector(group: list) -> StatsCollector:
        granted = sum(_cov_bytes(s) for s in group if (s.module, s.name) in chosen)
        return StatsCollector(model, group, covariance_budget=granted, **options)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache, outer = _run_to_first_block(model, block_list[0], loader, num_batches, forward, collector(outside))
            stats.update(outer.stats)
            finals = []
            for i, block in enumerate(block_list):
                col = collector(inside[i])
                with col.hooks():
                    for j, (args, kwargs) in enumerate(cache):
                        out = block(*args, **kwargs)
                        hidden = out if isinstance(out, torch.Tensor) else out[0]
                        cache[j] = ((hidden, *args[1:]), kwargs)
                        if i == len(block_list) - 1:
                            finals.append(out)
                stats.update(col.stats)
                del col
            unseen = [s for s in outside if stats[(s.module, s.name)].mean is None]
            if unseen:
                tail = collector(unseen)
                stats.update(_run_after_blocks(model, block_list, finals, loader, num_batches, forward, tail))
    finally:
        model.train(was_training)
    return stats


def _cov_bytes(s: Any) -> int:
    """What :class:`StatsCollector` counts against the budget for one consumer."""
    return s.atoms.numel() ** 2 * 8


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _run_to_first_block(model, first, loader, num_batches, forward, outer: StatsCollector):
    """Each batch run up to ``first`` (with ``outer``'s hooks); ``first``'s inputs cached."""
    cache: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        cache.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    device = device_of(model)
    try:
        with outer.hooks():
            for batch in iterate(loader, num_batches):
                try:
                    forward(model, move_to(split_batch(batch)[0], device))
                except _Stop:
                    continue
                raise UserError("the model ran without calling its first block: its blocks are not on the main path")
    finally:
        handle.remove()
    return cache, outer


def _run_after_blocks(model, block_list, finals, loader, num_batches, forward, tail: StatsCollector) -> dict:
    """One more pass for the consumers after the blocks: every block returns the cached
    final output of the batch instead of computing."""
    current: list[Any] = [None]
    originals = [b.__dict__.get("forward") for b in block_list]  # a forward set on the instance, if any
    for b in block_list:
        b.forward = lambda *a, **k: current[0]
    device = device_of(model)
    try:
        with tail.hooks():
            for batch, out in zip(iterate(loader, num_batches), finals, strict=False):
                current[0] = out
                forward(model, move_to(split_batch(batch)[0], device))
    finally:
        for b, f in zip(block_list, originals, strict=True):
            del b.forward
            if f is not None:
                b.forward = f
    return tail.stats
