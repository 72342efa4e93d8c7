"""The garbage collector's full passes kept off the objects a command lives with.

A full pass walks every object the collector tracks, and torch imported with timm is
390,000 of them: about 0.2 s per pass at one thread. CPython starts one whenever the
objects that outlived the younger passes have grown by a quarter since the last, so a
command that imports, builds a model and loads its data before it prunes grows into
several: a ``cleanai prune`` of EfficientNet-B0 on 64 images made 7 full passes, 1.08 s
of its 13 s of CPU, each longer than the one before.

:func:`frozen_heap` runs a command with what exists out of those passes
(``gc.freeze``); :func:`heap_growing` wraps a phase that makes many long-lived objects
(the imports behind the command line, loading the model and the data): the collector
waits during it (only its full passes where user code runs), and what exists at its end
is frozen too, the little garbage among it included. What is frozen is handed back to
the collector when the block ends (``gc.unfreeze``), so nothing is kept longer than the
command. Nothing is done where
the collector is off, where someone else froze objects (their freeze stays theirs) or
inside another such block. No torch import here: the command line enters the block
before it imports torch.

Only the command line does this, once per process. Around each library call it did harm:
garbage that existed when a call froze the heap (cycles an earlier call left) went back to
the oldest generation at the call's end and was frozen again by the next call, so in a loop
of calls the full passes that would free it all ran while it was frozen (the benchmark's
data-free prune, run after the other stages in one process, went from 0.15 to 0.22 s).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["frozen_heap", "heap_growing"]

#: whether an open :func:`frozen_heap` block froze the heap (and so thaws it at its end)
_FROZEN = [False]


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Run the block with the objects that exist now, and those each :func:`heap_growing`
    phase leaves, out of the collector's passes; handed back at the end."""
    own = gc.isenabled() and gc.get_freeze_count() == 0 and not _FROZEN[0]
    if own:
        gc.freeze()
        _FROZEN[0] = True
    try:
        yield
    finally:
        if own:
            _FROZEN[0] = False
            gc.unfreeze()


@contextmanager
def heap_growing(runs_user_code: bool = False) -> Iterator[None]:
    """Inside a :func:`frozen_heap` block that froze the heap: a phase that makes many
    long-lived objects; what exists at its end is frozen too. The collector waits during
    it (imports: little garbage, and a young pass over 200,000 new objects at the end cost
    0.45 s). ``runs_user_code`` (a dataset factory could make cyclic garbage by the
    gigabyte): young passes go on, only the full ones wait. Elsewhere: nothing."""
    if not _FROZEN[0] or not gc.isenabled():
        yield
        return
    thresholds = gc.get_threshold()
    if runs_user_code:
        gc.set_threshold(thresholds[0], thresholds[1], 1 << 30)
    else:
        gc.disable()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.enable()
        gc.freeze()
