"""Channels unbound one by one and stacked back: ``torch.stack([f(t) for t in x.unbind(1)], 1)``.

Terms:

*piece*
    one output of an unbind along the channels: channel ``k`` of the source, without a
    channel dimension. It carries no label (a traced tensor labels a dimension), so the
    kernel tags it instead, ``(unbind, k)``, and every tensor computed from it alone
    carries the tag on (element-wise ops, views, a claimed module applied to it).
*restack*
    a ``stack`` (or a ``cat`` of size-1 pieces) of every piece of one unbind, each once,
    in any order: its output carries the unbound atoms again, along the stacked dimension,
    in the order the pieces were stacked. A loop over whatever the unbind returns shrinks
    with the channels, so the atoms stay free.
*work*
    what was done to each piece on its way to the restack: the ops and modules it went
    through, with the constant arguments and the tensors (other than pieces) they read. A
    restack frees the atoms only when every piece went through the same work: a piece
    picked by its position (``t[0] * 2``, ``self.scales[k]``, ``zip(self.convs, ...)``)
    would meet another piece's work once a channel before it goes.

Two pieces of one position from two unbinds of the same width met in one op
(``zip(x.unbind(1), y.unbind(1))``) pair those channels of the two sources; the pieces
then go on as one. Pieces of different positions met in one op (``sum(x.unbind(1))``), an
unbind whose pieces never all reach one restack, or work that differs, freeze the atoms
with the reason, as every unbind of the channels did before 2026-12-02.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from cleanai_core.graph.trace import ModuleCall, TRef

__all__ = ["Unbinds"]


@attrs.define(slots=True, eq=False)
class _Unbind:
    atoms: torch.Tensor
    where: str
    work: list[list[Any]]  # per piece
    live: set[int]  # keys of tagged tensors no event has read yet
    problem: str | None = None
    restacked: bool = False
    joined: int | None = None  # the unbind whose pieces this one's went on with (zip)
    joined_at: set[int] = attrs.Factory(set)  # the positions where they met


class Unbinds:
    """The pieces of the unbinds seen so far, by tensor key (held by the trace context)."""

    def __init__(self) -> None:
        self.items: list[_Unbind] = []
        self.tags: dict[int, tuple[int, int]] = {}  # tensor key -> (unbind, position)
        self.restacked_by: Any = None  # the event of the last restack (its pieces end there)

    def add(self, outputs: list[TRef], atoms: torch.Tensor, where: str) -> None:
        uid = len(self.items)
        self.items.append(_Unbind(atoms, where, [[] for _ in outputs], {o.key for o in outputs}))
        for k, o in enumerate(outputs):
            self.tags[o.key] = (uid, k)

    def _root(self, uid: int) -> int:
        while self.items[uid].joined is not None:
            uid = self.items[uid].joined
        return uid

    def carry(self, event: Any, ctx: Any) -> None:
        """Pass the tags of ``event``'s pieces on to its outputs, noting the work done."""
        tagged = [(r, self.tags[r.key]) for r in event.inputs if r.key in self.tags]
        if not tagged or event is self.restacked_by:
            return
        for _, (u, _) in tagged:
            if self.items[self._root(u)].restacked:  # ``ts[0]`` read again after ``stack(ts)``
                self._fail(u, f"{ctx.where()} reads an unbound channel that is also stacked back")
        for r, (u, _) in tagged:
            self.items[u].live.discard(r.key)
        found = {(self._root(u), k) for _, (u, k) in tagged}
        if len({k for _, k in found}) > 1:
            for u, _ in found:
                self._fail(u, f"{ctx.where()} combines channels unbound apart")
            return
        uids = sorted({u for u, _ in found})
        first, k = uids[0], tagged[0][1][1]
        for u in uids[1:]:  # zip(x.unbind(1), y.unbind(1)): the two sources' channels pair
            if self.items[first].atoms.numel() != self.items[u].atoms.numel():
                self._fail(first, f"{ctx.where()} pairs pieces of unbinds of different widths")
                self._fail(u, f"{ctx.where()} pairs pieces of unbinds of different widths")
                return
            ctx.union(self.items[first].atoms, self.items[u].atoms)
            self.items[u].joined = first
        for u, kk in (t for _, t in tagged):
            if u != first:
                self.items[u].joined_at.add(kk)
        self.items[first].work[k].append(_step(event, {r.key for r, _ in tagged}, ctx.made_by))
        for o in event.outputs:
            if o.key in self.tags:  # an unbind of a piece: its own pieces
                continue
            self.tags[o.key] = (first, k)
            self.items[first].live.add(o.key)

    def restack(self, tensors: list[Any], ctx: Any) -> torch.Tensor | None:
        """The unbound atoms in the order ``tensors`` (a stack's inputs) hold them, or
        ``None`` when these are not every piece of one unbind, each once, after the same
        work (the pieces' unbinds then freeze, with the reason)."""
        tags = [self.tags.get(t.key) if isinstance(t, TRef) else None for t in tensors]
        if all(t is None for t in tags) or (None not in tags and len(set(tags)) == 1 and len(tags) > 1):
            return None  # no piece, or work on one piece (an inner unbind of it stacked back)
        uids = {self._root(t[0]) for t in tags if t is not None}
        if None in tags or len(uids) != 1:
            for u in uids:
                self._fail(u, f"{ctx.where()} stacks unbound channels with other tensors")
            return None
        uid = uids.pop()
        item = self.items[uid]
        ks = [t[1] for t in tags]
        if sorted(ks) != list(range(item.atoms.numel())):
            self._fail(uid, f"{ctx.where()} stacks some of the unbound channels, not each once")
            return None
        if any(w != item.work[0] for w in item.work):
            self._fail(uid, f"{ctx.where()} stacks unbound channels that went through different work")
            return None
        if item.problem is not None or item.restacked:
            return None
        item.restacked, self.restacked_by = True, ctx.event
        for t in tensors:
            item.live.discard(t.key)
        return item.atoms[torch.tensor(ks)]

    def _fail(self, uid: int, reason: str) -> None:
        item = self.items[self._root(uid)]
        if item.problem is None:
            item.problem = reason

    def settle(self, ctx: Any) -> None:
        """After tracing: freeze the atoms of every unbind not restacked whole (a piece
        read on a way that does not end in the restack, a paired unbind that did not meet
        at every position or whose pieces went through different work first)."""
        for uid, item in enumerate(self.items):
            root = self.items[self._root(uid)]
            reason = root.problem
            if reason is None and (not root.restacked or root.live):
                reason = f"{item.where} unbinds the channel dimension and its pieces are not all stacked back"
            if reason is None and item is not root:
                if len(item.joined_at) != item.atoms.numel() or item.live or any(w != item.work[0] for w in item.work):
                    reason = f"{item.where} unbinds the channel dimension and its pieces meet another unbind's apart"
            if reason is not None:
                ctx.freeze(item.atoms, reason)


def _step(event: Any, pieces: set[int], made_by: dict[int, Any]) -> tuple:
    """What ``event`` does to a piece: its op or module, its constant arguments, and what
    the other tensors it reads are (:func:`_source`)."""
    if isinstance(event, ModuleCall):
        return (event.name, (), tuple(_source(r, made_by) for r in event.inputs if r.key not in pieces))
    return (str(event.op), _consts(event), tuple(_source(r, made_by) for r in event.inputs if r.key not in pieces))


def _consts(event: Any) -> tuple:
    return tuple(repr(a) for a in _leaves((event.args, event.kwargs)) if not isinstance(a, TRef))


def _source(ref: TRef, made_by: dict[int, Any], depth: int = 3) -> Any:
    """A tensor a piece's work reads besides the piece: a parameter by name; one computed
    from parameters and constants by how (``self.scale.view(1, -1)`` made again for every
    piece is the same work; ``self.w[k]`` is not); anything else by its key (one tensor
    shared by every piece, or one per piece)."""
    if ref.param is not None:
        return ref.param
    event = made_by.get(ref.key)
    if depth == 0 or event is None or isinstance(event, ModuleCall):
        return ref.key
    return (str(event.op), _consts(event), tuple(_source(r, made_by, depth - 1) for r in event.inputs))


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, (tuple, list)):
        return [x for a in obj for x in _leaves(a)]
    if isinstance(obj, dict):
        return [x for a in obj.values() for x in _leaves(a)]
    return [obj]
