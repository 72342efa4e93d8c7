"""Statistics over the channels that come back onto them: a norm written by hand.

Terms:

*statistic*
    the output of a reduction across the channel dimension that keeps it as a size-1 dim
    and whose value depends on how many channels there are (``x.mean(1, keepdim=True)``,
    ``var``, ``std``, ``amax``, ...). It carries no label: it has no channels left.
*comes back*
    the statistic, through element-wise ops on itself alone (``v + eps``, ``rsqrt``), meets
    the very channels it was taken over in an element-wise op (``x - u``, ``x * rsqrt(v)``,
    ``gx / gx.mean(-1, keepdim=True)``). That is a normalisation over the channels: a
    LayerNorm, RMSNorm or global response norm written by hand (the ConvNeXt repository's
    channels-first LayerNorm, T5's, a Llama RMSNorm in a user's own module).
*escapes*
    the statistic (or what was computed from it alone) reaches anything else: another op,
    a module, channels of another tensor, the model's output (CBAM's channel mean fed to a
    conv, StyleGAN's minibatch deviation concatenated as a feature).

*scales*
    it comes back through a product or a quotient (``/ sqrt(v + eps)``, ``* rsqrt(v)``):
    the channels are rescaled by it, as a norm does. A mean that only comes back
    subtracted (``x - x.mean(1, keepdim=True)``) centres them without normalising.

The statistics over one set of channels that all come back, never escape, and of which
one scales, make those channels normalise (:meth:`TraceContext.normalize`: prunable like
a LayerNorm's, not exactly, left out of the masking oracle); otherwise they freeze with
the reduction's reason, as every such reduction did before 2026-12-02.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

__all__ = ["Statistics"]

#: ops that pass a statistic on unchanged in value (casts, copies, broadcasting views)
_CARRIED_BY = {"_to_copy", "clone", "detach", "alias", "lift_fresh", "expand", "contiguous"}

#: element-wise ops through which a statistic coming back rescales the channels
_SCALING = {"mul", "div", "true_divide", "addcmul", "addcdiv"}


@attrs.define(eq=False)
class _Stat:
    atoms: torch.Tensor
    reason: str
    back: bool = False
    escaped: bool = False
    scales: bool = False


class Statistics:
    """The statistics of one trace, by the keys of the traced tensors that hold them."""

    def __init__(self) -> None:
        self.pending: dict[int, _Stat] = {}
        self._all: list[_Stat] = []
        self._met: set[int] = set()  # statistic keys the event being traced handled

    def add(self, outputs: list[Any], atoms: torch.Tensor, reason: str) -> None:
        stat = _Stat(atoms.reshape(-1), reason)
        self._all.append(stat)
        for ref in outputs:
            self.pending[ref.key] = stat

    def meet(self, call: Any, ctx: Any) -> None:
        """An element-wise op: statistics among its inputs come back onto their channels,
        go on into its outputs (no labelled input), or escape (other channels)."""
        stats = [(r, self.pending[r.key]) for r in call.inputs if r.key in self.pending]
        if not stats:
            return
        self._met.update(r.key for r, _ in stats)
        labels = [lab for r in call.inputs if r.key not in self.pending and (lab := ctx.label_of(r)) is not None]
        own = {id(s) for _, s in stats}
        if not labels:
            if len(own) == 1:  # ``v + eps``, ``rsqrt(v)``: still the statistic
                spread = set().union(*(ctx.spread.get(r.key, set()) for r, _ in stats))
                for out in call.outputs:
                    self.pending[out.key] = stats[0][1]
                    if spread and out.ndim == stats[0][0].ndim:  # expanded back over the channels, still
                        ctx.spread[out.key] = set(spread)
                return
            for _, s in stats:
                s.escaped = True
            return
        scale = call.op.overloadpacket.__name__.rstrip("_") in _SCALING
        for _, s in stats:
            if all(_same(lab.atoms, s.atoms) for lab in labels):
                s.back = True
                s.scales = s.scales or scale
            else:
                s.escaped = True

    def escape(self, event: Any, ctx: Any) -> None:
        """After an event: statistics it read and did not handle in :meth:`meet` escape,
        unless the event only copies or expands one of them (a cast to the input's dtype,
        ``u.expand_as(x)``): its outputs are the statistic still."""
        stats = [r for r in event.inputs if r.key in self.pending and r.key not in self._met]
        op = getattr(getattr(event, "op", None), "overloadpacket", None)
        if len(stats) == 1 and len(event.inputs) == 1 and getattr(op, "__name__", "") in _CARRIED_BY:
            spread = ctx.spread.get(stats[0].key)
            for out in event.outputs:
                self.pending[out.key] = self.pending[stats[0].key]
                if spread and out.ndim == stats[0].ndim and out.key not in ctx.spread:  # a cast keeps it
                    ctx.spread[out.key] = set(spread)
            stats = []
        for r in stats:
            self.pending[r.key].escaped = True
        self._met = set()

    def settle(self, ctx: Any, outputs: list[Any]) -> None:
        """After the trace: normalise the channels of statistics that came back and never
        escaped, freeze the others (statistics returned by the model escape)."""
        for r in outputs:
            if r.key in self.pending:
                self.pending[r.key].escaped = True
        sets: list[list[_Stat]] = []  # statistics over the same channels
        for s in self._all:
            same = next((ss for ss in sets if _same(ss[0].atoms, s.atoms)), None)
            if same is None:
                sets.append([s])
            else:
                same.append(s)
        for ss in sets:
            if all(s.back and not s.escaped for s in ss) and any(s.scales for s in ss):
                ctx.normalize(ss[0].atoms)
            else:
                for s in ss:
                    ctx.freeze(s.atoms, s.reason)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a = a.reshape(-1)
    return a.numel() == b.numel() and bool(torch.equal(a, b))
