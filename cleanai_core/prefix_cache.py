"""Running a pruned copy only from where it first differs from the original.

A sensitivity trial prunes one group; every module that runs before the first module the
pruning touched computes exactly what it computed in the original model. This stage
records when each module of the original runs, keeps the outputs of the modules before
a trial's first change, and runs the trial with those modules answering from the cache.

Glossary:

- **span**: when a module ran in one forward pass of the original: the event number of
  its start and of its end (one counter, ticked at every module's start and end), and how
  often it was called. The spans must be the same on every batch (no data-dependent
  control flow), else nothing is cached.
- **changed module**: a module of the trial whose type, own parameters or buffers (shape
  or values), plain attributes (``num_heads``, ``in_features``, ...) or children differ
  from its namesake in the original, or that the original lacks.
- **prefix**: the outermost modules called once per pass whose span ends before the first
  changed module starts, with tensor outputs. A module's effect is assumed to be its
  output (true of layers in eval mode; a module that writes to a cache object it is
  handed must not be in a prefix: such outputs are not plain tensors and are not cached).

Outputs are cloned when stored and when handed out, so an in-place operation downstream
(``ReLU(inplace=True)``) cannot change the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from cleanai_core.model_state import copy_model, set_mode
from cleanai_core.runtime import call_model

__all__ = ["PrefixCache", "Span"]


@attrs.frozen
class Span:
    start: int
    end: int
    calls: int


class _Stop(Exception):
    """Raised by a hook once every wanted output is stored: the rest of the pass is not needed."""


def _clone(out: Any) -> Any:
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


def _plain(out: Any) -> bool:
    leaves, _ = tree_flatten(out)
    return all(isinstance(v, (torch.Tensor, int, float, bool, type(None))) for v in leaves)


def _attributes(m: nn.Module) -> dict[str, Any]:
    plain = (int, float, bool, str, tuple, type(None))
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training" and isinstance(v, plain)}


def _same(a: nn.Module, b: nn.Module) -> bool:
    """Whether module ``b`` of a trial computes what ``a`` of the original does, apart from its children."""
    if type(a) is not type(b) or set(a._modules) != set(b._modules) or _attributes(a) != _attributes(b):
        return False
    for ta, tb in ((a._parameters, b._parameters), (a._buffers, b._buffers)):
        if set(ta) != set(tb):
            return False
        for k, x in ta.items():
            y = tb[k]
            if x is y:  # shared with the original (a trial built with ``share``)
                continue
            if (x is None) != (y is None) or (x is not None and (x.shape != y.shape or not torch.equal(x, y))):
                return False
    return True


@contextlib.contextmanager
def _answering(model: nn.Module, outputs: dict[str, Any]) -> Iterator[None]:
    """Modules named in ``outputs`` return (a clone of) it instead of computing."""
    mods = dict(model.named_modules())
    for name, out in outputs.items():
        mods[name].forward = lambda *a, _out=out, **k: _clone(_out)
    try:
        yield
    finally:
        for name in outputs:
            del mods[name].forward


class PrefixCache:
    """The original's spans and the outputs of the current prefix, per evaluation batch.

    ``model`` is never touched: hooks go on a copy sharing its tensors."""

    def __init__(self, model: nn.Module, batches: list[Any], forward_fn: Callable | None) -> None:
        self.base = copy_model(model, {id(t): t for t in list(model.parameters()) + list(model.buffers())})
        self.batches, self.forward_fn = batches, forward_fn
        self.spans: dict[str, Span] | None = None
        self.outputs: dict[str, list[Any]] = {}  # module name -> its output on every batch
        self.opaque: set[str] = set()  # modules whose outputs are not plain tensors: never cached
        set_mode(self.base, False)

    def reference(self) -> list[Any]:
        """Run the original on every batch, recording the spans; returns its outputs."""
        outs, seen = [], []
        for x in self.batches:
            spans: dict[str, list[int]] = {}
            tick = [0]

            def pre(name: str) -> Callable:
                def hook(*_: Any) -> None:
                    s = spans.setdefault(name, [tick[0], -1, 0])
                    s[2] += 1
                    tick[0] += 1

                return hook

            def post(name: str) -> Callable:
                def hook(*_: Any) -> None:
                    spans[name][1] = tick[0]
                    tick[0] += 1

                return hook

            handles = []
            for name, m in self.base.named_modules():
                if name:
                    handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
            try:
                with torch.no_grad():
                    outs.append(call_model(self.base, x, self.forward_fn))
            finally:
                for h in handles:
                    h.remove()
            seen.append({n: Span(*s) for n, s in spans.items()})
        # no batch (a rank whose share of the batches is empty): no spans, every trial runs whole
        self.spans = seen[0] if seen and all(s == seen[0] for s in seen) else None
        return outs

    def prefix(self, trial: nn.Module) -> list[str] | None:
        """The prefix of ``trial`` (see the glossary), or ``None`` when it cannot be known
        (a changed module that never ran, data-dependent spans)."""
        if self.spans is None:
            return None
        spans, base = self.spans, dict(self.base.named_modules())
        names = dict(trial.named_modules())
        # a module added or removed shows as a change of its parent's children
        unseen = [n for n in names if n not in spans and n in base and n]
        if any(not _same(base[n], names[n]) for n in unseen):
            return None  # changed, never ran as a module (its tensors may be used elsewhere)
        end = max((s.end for s in spans.values()), default=0) + 1
        first = 0 if not _same(base[""], names[""]) else end
        for n in sorted(spans, key=lambda n: spans[n].start) if first else ():
            if n not in names or n not in base or not _same(base[n], names[n]):
                first = spans[n].start  # the earliest-starting changed module
                break
        keep: list[str] = []

        def walk(m: nn.Module, prefix: str) -> None:
            for child, sub in m.named_children():
                name = f"{prefix}{child}"
                s = spans.get(name)
                if s is None or s.start >= first:
                    continue
                if s.end < first and s.calls == 1 and name not in self.opaque:
                    keep.append(name)
                else:
                    walk(sub, name + ".")

        walk(trial, "")
        return keep

    def fill(self, names: list[str]) -> list[str]:
        """Store the outputs of ``names`` on every batch (running the original only as far
        as needed) and forget every other; returns the names whose outputs are stored (a
        module whose output is not plain tensors is left out)."""
        assert self.spans is not None
        self.outputs = {n: o for n, o in self.outputs.items() if n in names}
        missing = [n for n in names if n not in self.outputs]
        if missing:
            start = min(self.spans[n].start for n in missing)
            last = max(missing, key=lambda n: self.spans[n].end)
            ready = [n for n in self.outputs if self.spans[n].end < start]
            mods = dict(self.base.named_modules())
            for n in missing:
                self.outputs[n] = []
            for i, x in enumerate(self.batches):

                def store(name: str) -> Callable:
                    def hook(_m: nn.Module, _args: Any, out: Any) -> None:
                        self.outputs[name].append(_clone(out))
                        if name == last:
                            raise _Stop

                    return hook

                handles = [mods[n].register_forward_hook(store(n)) for n in missing]
                try:
                    with torch.no_grad(), _answering(self.base, {n: self.outputs[n][i] for n in ready}):
                        call_model(self.base, x, self.forward_fn)
                except _Stop:
                    pass
                finally:
                    for h in handles:
                        h.remove()
        for n in names:
            if not all(_plain(o) for o in self.outputs[n]):
                del self.outputs[n]
                self.opaque.add(n)
        return [n for n in names if n in self.outputs]

    def run(self, trial: nn.Module, names: list[str], index: int) -> Any:
        """``trial`` on batch ``index``, the modules ``names`` answering from the cache."""
        with _answering(trial, {n: self.outputs[n][index] for n in names}):
            return call_model(trial, self.batches[index], self.forward_fn)
