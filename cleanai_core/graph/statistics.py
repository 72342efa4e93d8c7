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
                for out in call.outputs:
                    self.pending[out.key] = stats[0][1]
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

    def escape(self, inputs: list[Any]) -> None:
        """After an event: statistics it read and did not handle in :meth:`meet` escape."""
        for r in inputs:
            if r.key in self.pending and r.key not in self._met:
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
