"""Calibration data kept for the passes after the first one.

BatchNorm correction, iterative pruning and gradient criteria read the calibration data
again. Reading the loader twice fails for a one-shot generator and gives other batches
for a shuffled loader, so the batches seen during calibration are kept as yielded while
they fit in :data:`CACHE_BYTES` (calibration sets are a few batches). Beyond that the
loader is read again, where it can be.

Where the loader's length is not known in advance (a generator, an iterable dataset), the
batches the BatchNorm correction reads are a uniform random sample of the stream, drawn
while it passes (:class:`Pool`), so they are kept, and the original's norm inputs
recorded, on those batches only: memory stays bounded however long the stream is.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from cleanai_core.calibration import iterate
from cleanai_core.errors import UserError
from cleanai_core.runtime import same_layout

__all__ = ["CACHE_BYTES", "CalibrationData", "Pool", "batch_bytes", "samples_in", "spread"]

#: the most bytes of calibration batches kept in memory
CACHE_BYTES = 256 << 20


class CalibrationData:
    """The calibration loader, and its batches while they fit in ``budget`` bytes."""

    def __init__(self, loader: Iterable[Any], num_batches: int | None, budget: int | None = None) -> None:
        self.loader = loader
        self.num_batches = num_batches
        self.budget = CACHE_BYTES if budget is None else budget
        self.batches: list[Any] | None = []
        #: samples in each batch the first pass saw, kept or not (:func:`samples_in`)
        self.sizes: list[int] = []
        self._bytes = 0
        #: how the batches' inputs are laid out for the model, in every pass over them: set
        #: by the first pass (:func:`~cleanai_core.runtime.channels_last_layout`), so the
        #: original and a pruned model see the same layout (their norm inputs are paired)
        self.layout: Callable[[Any], Any] = same_layout
        #: where the loader's length was not known: ``(index, batch)`` of the batches drawn
        #: at random for the BatchNorm correction (:class:`Pool`), in stream order
        self.pool: list[tuple[int, Any]] | None = None

    def keep(self, batch: Any) -> None:
        """Remember ``batch`` (one the first pass saw) unless the budget is spent."""
        self.sizes.append(samples_in(batch))
        if self.batches is None:
            return
        self._bytes += batch_bytes(batch)
        if self._bytes > self.budget:
            self.batches = None  # too large to keep: later passes read the loader again
        else:
            self.batches.append(batch)

    @property
    def cached(self) -> bool:
        return self.batches is not None

    @property
    def one_shot(self) -> bool:
        """The loader is an iterator: a second read yields nothing."""
        return isinstance(self.loader, Iterator)

    def replay(self) -> Iterator[Any]:
        """The same batches again: from memory, else from the loader (re-iterable only)."""
        if self.batches is not None:
            return iter(self.batches)
        if self.one_shot:
            raise UserError(
                "the calibration data can be read only once (an iterator or generator) and is too large to keep "
                f"in memory (over {self.budget >> 20} MiB): give a re-iterable loader such as a list or a DataLoader"
            )
        return iterate(self.loader, self.num_batches)


def batch_bytes(batch: Any) -> int:
    """The bytes of every tensor in one batch."""
    return sum(t.numel() * t.element_size() for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor))


class Pool:
    """A uniform random sample of ``size`` batches of a stream whose length is not known in
    advance (Vitter's algorithm R, seeded: the same stream gives the same batches), each
    with what a pass recorded on it. :meth:`slot_for` says, before batch ``i`` runs,
    whether it enters the pool (and which earlier one it replaces); :meth:`put` stores it
    and returns the record it replaced. After ``n`` batches each is in the pool with
    probability ``size / n``, so batches spread over the whole stream, not its start.
    With ``planned`` (batch indices), those batches and no others, in their slots."""

    def __init__(self, size: int, seed: int = 0, planned: list[int] | None = None) -> None:
        self.size = max(1, size) if planned is None else len(planned)
        self._rng = random.Random(seed)
        self._slots: list[tuple[int, Any, Any] | None] = [None] * self.size
        #: batch index -> slot, where the batches are chosen in advance (a known length)
        self._planned = None if planned is None else {b: k for k, b in enumerate(planned)}

    @classmethod
    def for_samples(cls, first: Any, samples: int, budget: int) -> Pool | None:
        """A pool of batches like ``first`` that hold ``samples`` samples together, at most
        ``budget`` bytes of batches; None where not one batch fits."""
        size = min(math.ceil(samples / max(1, samples_in(first))), budget // max(1, batch_bytes(first)))
        return cls(size) if size > 0 else None

    def slot_for(self, i: int) -> int | None:
        """The slot batch ``i`` (counted from 0) takes, or None where it stays out."""
        if self._planned is not None:
            return self._planned.get(i)
        if i < self.size:
            return i
        j = self._rng.randrange(i + 1)
        return j if j < self.size else None

    def put(self, slot: int, i: int, batch: Any, record: Any) -> Any:
        """Keep batch ``i`` and its ``record`` in ``slot``; the record it replaces (or None)."""
        old = self._slots[slot]
        self._slots[slot] = (i, batch, record)
        return None if old is None else old[2]

    def kept(self) -> list[tuple[int, Any, Any]]:
        """``(index, batch, record)`` of the batches in the pool, in stream order."""
        return sorted((s for s in self._slots if s is not None), key=lambda s: s[0])


def samples_in(batch: Any) -> int:
    """The samples in one batch: the first dimension of its first tensor with one (1 for
    a batch without)."""
    return next((t.shape[0] for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.dim() > 0), 1)


def spread(sizes: list[int], samples: int | None) -> list[int] | None:
    """Indices of batches (of ``sizes`` samples each) spread evenly over them that hold at
    least ``samples`` samples together: the fewest batches, at evenly spaced positions, that
    reach it, so a loader ordered by class still gives every part of the data. None
    (all of them) where they hold no more, or ``samples`` is None or 0."""
    total = sum(sizes)
    if not samples or total <= samples:
        return None
    n = len(sizes)
    for m in range(1, n + 1):
        chosen = sorted({i * n // m for i in range(m)})
        if sum(sizes[i] for i in chosen) >= samples:
            return chosen if len(chosen) < n else None
    return None
