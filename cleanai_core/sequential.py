"""Sequential, block-by-block calibration for deep models (as large-model quantisers do).

The block list is an ``nn.ModuleList`` of layers (HF decoder layers, ViT blocks). The
batches run through the model once per block: block ``i`` runs with its consumers' hooks,
the blocks before it return what they returned on the same batch in the previous passes
(their hidden state replaced by the last one computed, the rest, such as T5's position
bias, kept), and block ``i + 1`` stops the pass. So every block gets the arguments the
model's own loop gives it: per-layer masks and position embeddings (sliding-window and
global layers of Gemma, ModernBERT, GPT-Neo), a position bias the first block computes
(T5), the encoder's states (cross-attention). Consumers before the blocks are collected in
the first pass, those after them in the last.

What this bounds: live activations are one block's on one batch; hooks and reductions
exist for one block at a time; the same consumers get a covariance as in a whole-model
pass (the narrowest of the model first, until ``budget`` is spent). What it costs: the
last hidden state of every batch (batches x tokens x width), and the layers outside the
blocks run once per block (embeddings and masks of a decoder; the encoder of an
encoder-decoder whose decoder layers are the blocks). The data is read once per block: a
list or a ``DataLoader``, not a one-shot iterator. A block's hidden state must be its
first output (or the output itself).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from cleanai_core.calibration import (
    COVARIANCE_BUDGET_BYTES,
    StatsCollector,
    covariance_bytes,
    iterate,
    move_to,
    split_batch,
)
from cleanai_core.errors import UserError
from cleanai_core.model_state import set_mode
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
    if isinstance(loader, Iterator):
        raise UserError(
            f"sequential calibration reads the data once per block, and a {type(loader).__name__} can be read "
            "only once: give a list or a DataLoader"
        )
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
        granted = covariance_bytes([s for s in group if (s.module, s.name) in chosen])
        return StatsCollector(model, group, covariance_budget=granted, **options)

    was_training = model.training
    set_mode(model, False)
    try:
        with torch.no_grad():
            stats.update(
                _run_blocks(model, prefix, block_list, inside, outside, loader, num_batches, forward, collector)
            )
    finally:
        set_mode(model, was_training)
    return stats


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _split(out: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """A block's output as its hidden state and a function that puts another hidden state
    in its place (the rest, e.g. T5's position bias, kept as it was)."""
    if isinstance(out, torch.Tensor):
        return out, lambda h: h
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        rest, kind = list(out[1:]), type(out)
        if hasattr(out, "_fields"):  # a named tuple
            return out[0], lambda h: kind(h, *rest)
        return out[0], lambda h: kind([h, *rest])
    return out[0], lambda h: out


def _run_blocks(model, prefix, block_list, inside, outside, loader, num_batches, forward, collector) -> dict:
    """One pass of the model per block: the blocks before it return their recorded
    outputs, it runs with its consumers' hooks, the next block stops the pass."""
    stats: dict = {}
    device = device_of(model)
    outputs: list[list[Callable[[torch.Tensor], Any]]] = []  # per block before this one, per batch
    hidden: list[torch.Tensor] = []  # per batch: the last computed block's hidden state
    batch = [0]
    originals = [b.__dict__.get("forward") for b in block_list]  # a forward set on the instance, if any
    n_batches = None
    try:
        for i, block in enumerate(block_list):
            group = list(inside[i])
            if i == 0:
                group += outside
            elif i == len(block_list) - 1:  # the consumers after the blocks
                group += [s for s in outside if stats[(s.module, s.name)].mean is None]
            col = collector(group)
            produced: list[Any] = []
            handles = [block.register_forward_hook(lambda m, a, out: produced.append(out))]
            if i + 1 < len(block_list):
                handles.append(block_list[i + 1].register_forward_pre_hook(_stop))
            if i > 0:  # the previous blocks replay what they returned on this batch
                replays = outputs[i - 1]
                block_list[i - 1].forward = lambda *a, _r=replays, **k: _r[batch[0]](hidden[batch[0]])
            seen = 0
            try:
                with col.hooks():
                    for seen, inputs in enumerate(iterate(loader, num_batches), 1):
                        batch[0] = seen - 1
                        try:
                            forward(model, move_to(split_batch(inputs, model)[0], device))
                        except _Stop:
                            pass
                        if len(produced) > seen:
                            raise UserError(
                                f"sequential calibration: block {i} of {prefix!r} ran more than once in one forward "
                                "(one layer applied several times, as ALBERT shares its layers); calibrate without "
                                "sequential="
                            )
                        if len(produced) < seen:
                            raise UserError(
                                f"sequential calibration: the model ran without calling block {i} of its blocks: "
                                "they are not on the main path; calibrate without sequential="
                            )
            finally:
                for h in handles:
                    h.remove()
            if n_batches is not None and seen != n_batches:
                raise UserError(
                    f"sequential calibration reads the data once per block: it gave {n_batches} batch(es) for "
                    f"block 0 but {seen} for block {i}; give data that gives the same batches each time"
                )
            n_batches = seen
            stats.update(col.stats)
            del col
            split = [_split(out) for out in produced]
            hidden = [h for h, _ in split]
            outputs.append([put for _, put in split])
            del split
    finally:
        for b, f in zip(block_list, originals, strict=True):
            b.__dict__.pop("forward", None)
            if f is not None:
                b.forward = f
    return stats


def _stop(module, args):
    raise _Stop
