"""Streaming per-channel activation statistics at the inputs of consumer modules.

For every ``"in"`` slice of the graph (a conv's, a linear's input channels), a forward
pre-hook reduces the batch to per-channel count, mean and sum of squared deviations
(the batch-norm statistics kernel, in the activation's precision, returned in float64) and merges them into
running totals with Chan's parallel formula. With covariance (for reconstruction), a
bounded number of randomly drawn positions per batch feeds a C x C co-moment (one matrix
product per batch, added in place). Memory is O(channels) (O(C^2) with covariance),
never O(data); nothing is stored per sample. Hooks are removed on exit, also on error or
Ctrl-C; the model's train/eval mode is restored.

Consumers that read the very same tensor (a ResNet block's conv1 and its downsample conv,
parallel branches, a decoder layer's q/k/v and gate/up projections) share one reduction of
it per batch: the tensor is reduced once, on its first hook, and every reader merges that
:class:`BatchReduction` into its own totals. Readers that have seen the same samples also
share one :class:`CoMoment` (the covariance's accumulators): its product is formed once per
batch and held once; a reader whose input parts from the others' gets its own copy then.

A padded text batch (the model called with an ``attention_mask`` that hides positions)
counts only its real tokens: a consumer's input shaped ``(batch, sequence, ...,
channels)`` loses the padded positions before it is reduced (:func:`real_positions`).
Not for an encoder-decoder model, whose decoder positions the mask does not describe.
"""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import torch
from torch import nn

from cleanai_core.errors import UserError
from cleanai_core.runtime import iterate, move_to, split_batch, total_batches  # re-exported

__all__ = [
    "BatchReduction",
    "ChannelStats",
    "CoMoment",
    "StatsCollector",
    "batch_moments",
    "covariance_bytes",
    "finite_moments",
    "finite_moments_of",
    "merged_moments",
    "move_to",
    "split_batch",
    "iterate",
    "stats_nbytes",
    "total_batches",
]

#: layers with more input channels than this keep no covariance (it holds two C x C matrices)
MAX_COVARIANCE_CHANNELS = 4096
#: total memory for covariance matrices; the widest consumers go without beyond it
COVARIANCE_BUDGET_BYTES = 1 << 30
#: positions per batch (per consumer) drawn at random for the covariance; 0 = all.
#: On the digits benchmark 256 x 5 batches matched every position (1,280 vs ~19,000 rows).
COVARIANCE_ROWS = 256
#: sample batches summed in one block of the co-moment before it joins the running total
FLUSH_BATCHES = 32
#: per-channel (mean, biased variance) over all dims but 1 of an (N, C, ...) tensor
_STATS_KERNEL = torch.ops.aten.batch_norm_update_stats
#: a channels-first tensor with at least this many positions per (sample, channel) row is
#: reduced in one pass of row sums (:func:`_row_moments`); below it the kernel's one call
#: costs less than the few calls of that path
ONE_PASS_MIN_ROW = 16
#: the one pass's variance is kept where the squared mean is at most this many variances
#: (its relative rounding error is about 1.5e-7 times ``1 + mean^2 / var``: at most 2.5e-6
#: here); channels beyond it are reduced again by the kernel's two passes
ONE_PASS_MAX_MEAN_SQ = 16.0
#: a channels-innermost CPU tensor with fewer channels than this is reduced by the kernel as
#: ``(P / k, k C)`` with ``k C`` up to this many columns (:func:`_kernel_moments`)
_NARROW_CHANNELS = 24
_NARROW_WIDTH = 256
#: the co-moment is mirrored from its upper triangle in column blocks about this wide from
#: this width on (:meth:`ChannelStats._form_cov`)
_GRAM_BLOCK = 768
_GRAM_MIN_SPLIT = 1024
#: the co-moment product runs in panels of this many rows from twice this width on (:func:`_add_gram`)
_GRAM_PANEL = 128


#: the covariance :attr:`ChannelStats.cov` formed last: (its co-moment, their totals' versions, the matrix)
_LAST_COV: list[tuple[weakref.ref, tuple, torch.Tensor] | None] = [None]


class Sample:
    """One batch's covariance sample at one tensor: ``rows`` drawn (the setting),
    centred on ``ref``, with the centred rows' column sums (float64). Kept on the tensor's
    :class:`BatchReduction` for its other readers; ``opened``: the :class:`CoMoment` a
    reader started from it (another reader with the same history joins that one)."""

    __slots__ = ("__weakref__", "centred", "offset", "opened", "ref", "rows")

    def __init__(self, rows: int, ref: torch.Tensor, centred: torch.Tensor, offset: torch.Tensor) -> None:
        self.rows, self.ref, self.centred, self.offset = rows, ref, centred, offset
        self.opened: CoMoment | None = None


class ChannelCountError(UserError):
    """A batch whose channel count at a layer differs from the earlier batches' (the
    collector's hook adds the layer's name)."""


@attrs.define(eq=False)
class CoMoment:
    """The covariance sample's running sums, one object for every consumer that has read
    the same samples (the readers of one tensor: a ResNet block's conv1 and downsample,
    a decoder layer's q/k/v and gate/up projections).

    ``block`` + ``total``: ``sum (x - ref)^T (x - ref)`` on and above the diagonal (see
    :func:`_add_gram`; the block joins the total every ``FLUSH_BATCHES`` batches; the
    total is None until the first flush, so a calibration of fewer batches holds one
    C x C matrix per co-moment, not two);
    ``offset``: the sum of ``x - ref`` (float64); ``count``: the rows; ``batches``: the
    samples added. ``members``: the :class:`ChannelStats` that hold it (weak references:
    statistics and their co-moment form no reference cycle, so a dropped set of statistics
    frees its C x C sums at once rather than at the next garbage collection).

    A batch's sample is added once for all members: the first member to read it makes it
    ``pending``, the others join its ``readers``, and it is added when every member has read
    it, or before a reader reads its next one, or when the sums are read (:meth:`settle`).
    Members that did not read it leave then with a copy of the sums without it; a member
    that reads another sample while one is pending leaves with such a copy and adds its
    own. So each member ends with the sums of exactly the samples it read, in its order:
    the same bits as accumulators of its own, formed and held once while the members agree."""

    ref: torch.Tensor
    block: torch.Tensor
    total: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    count: float = 0.0
    batches: int = 0
    members: list[weakref.ref] = attrs.field(factory=list)
    pending: Sample | None = None
    readers: list[weakref.ref] = attrs.field(factory=list)
    #: the co-moment this one was copied from (a weak reference; None: started empty) and its batches then
    origin: tuple[weakref.ref | None, int] = (None, 0)
    #: the sample added last, while its tensor's reduction holds it (joining readers check it)
    last: weakref.ref | None = None

    @classmethod
    def start(cls, sample: Sample) -> CoMoment:
        c = sample.centred.shape[1]
        return cls(sample.ref, sample.centred.new_zeros(c, c))

    def copy(self, members: list[ChannelStats]) -> CoMoment:
        """The sums as they are (without the pending sample), held by ``members`` from now on."""
        offset = None if self.offset is None else self.offset.clone()
        total = None if self.total is None else self.total.clone()
        out = CoMoment(self.ref, self.block.clone(), total, offset, self.count, self.batches,
                       origin=(weakref.ref(self), self.batches))  # fmt: skip
        for st in members:
            out.add_member(st)
        return out

    def __getstate__(self) -> dict:
        """Pickled (and deep-copied) settled, with its members as plain references (a weak
        reference cannot be pickled) and without the links of a collection in progress."""
        self.settle()
        state = {f.name: getattr(self, f.name) for f in attrs.fields(CoMoment)}
        state.update(members=self._live(), readers=[], origin=(None, 0), last=None)
        return state

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self.members = [weakref.ref(st) for st in state["members"]]

    def add_member(self, st: ChannelStats) -> None:
        st.comoment = self
        self.members.append(weakref.ref(st))

    def _live(self) -> list[ChannelStats]:
        """The members still alive (the list loses the others)."""
        live = [st for st in (r() for r in self.members) if st is not None]
        if len(live) < len(self.members):
            self.members = [weakref.ref(st) for st in live]
        return live

    def settle(self) -> None:
        """Add the pending sample; members that did not read it leave with a copy without it."""
        s = self.pending
        if s is None:
            return
        stay, self.pending, self.readers = self.readers, None, []
        members = self._live()
        if len(stay) < len(members):
            self.copy([st for st in members if not _holds(stay, st)])
            self.members = [r for r in stay if r() is not None]
        if self.offset is None:
            self.offset = s.offset.clone()
        else:
            self.offset += s.offset
        _add_gram(self.block, s.centred)
        self.count += s.centred.shape[0]
        self.batches += 1
        if self.batches % FLUSH_BATCHES == 0:
            if self.total is None:  # the first flush: the block becomes the total
                self.total, self.block = self.block, torch.zeros_like(self.block)
            else:
                self.total += self.block
                self.block.zero_()
        self.last = weakref.ref(s)

    def read(self, st: ChannelStats, s: Sample) -> None:
        """Member ``st`` reads sample ``s``: it joins the pending sample's readers, or its
        next sample waits for the other members, or it leaves (see the class)."""
        if self.pending is not None:
            if self.pending is s and not _holds(self.readers, st):
                self.readers.append(weakref.ref(st))
                if len(self.readers) >= len(self._live()):
                    self.settle()
                return
            if not _holds(self.readers, st):  # another sample than the others': st leaves
                base = (self, self.batches)
                self.members = [r for r in self.members if r() is not st]
                if len(self.readers) >= len(self._live()):
                    self.settle()
                if not _join(st, s, base):
                    own = self.copy([st])
                    s.opened = own
                    own.pending, own.readers = s, [weakref.ref(st)]
                    own.settle()
                return
            self.settle()
        self.pending, self.readers = s, [weakref.ref(st)]
        if len(self._live()) == 1:
            self.settle()

    def covariance(self) -> torch.Tensor:
        """``S / n - d d^T`` in float64 with ``S`` mirrored from its blocks on and above the
        diagonal (see :func:`_add_gram`): four passes over the C x C matrix (C=3072: 130 ms
        on one core, 300 ms with a whole-matrix ``triu`` and mirror)."""
        n = max(self.count, 1.0)
        d = (self.offset / n).cpu()
        s = self.block.to("cpu", torch.float64, copy=True)
        if self.total is not None:
            s.add_(self.total.to("cpu"))
        cols = _gram_blocks(s.shape[0])
        for i, a in enumerate(cols):
            diag = s[a, a]
            diag.copy_(diag.triu() + diag.triu(1).T)  # exactly symmetric, like the mirrored blocks
            for b in cols[i + 1 :]:
                s[b, a] = s[a, b].T
        return s.addr_(d, d, beta=1.0 / n, alpha=-1.0)

    def blocks(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`ChannelStats.cov_blocks`."""
        # the running total is None until the first flush, the block zero right after one: a
        # part that is all zero adds nothing (exactly) and is not gathered
        parts = [] if self.total is None else [self.total]
        if not parts or not _all_zero(self.block):
            parts.append(self.block)
        dev = self.block.device
        r, c = rows.to(dev), cols.to(dev)
        rows, cols = rows.cpu(), cols.cpu()
        upper_kk = (rows[:, None] <= rows[None, :]).to(dev)  # entry (i, j) is read at S[min, max]
        upper_kr = (rows[:, None] <= cols[None, :]).to(dev)
        kk = kr = None
        for t in parts:  # the running total and the running block, summed in float64
            by_rows = t.index_select(0, r)  # whole rows first: contiguous copies
            part_kk = by_rows.index_select(1, r)
            part_kk = torch.where(upper_kk, part_kk, part_kk.T.contiguous()).to("cpu", torch.float64)
            part_kr = t.index_select(0, c).index_select(1, r).T.contiguous()
            part_kr = torch.where(upper_kr, by_rows.index_select(1, c), part_kr).to("cpu", torch.float64)
            kk, kr = (part_kk, part_kr) if kk is None else (kk.add_(part_kk), kr.add_(part_kr))
        n = max(self.count, 1.0)
        d = (self.offset / n).cpu()
        d_rows = d[rows]
        kk.addr_(d_rows, d_rows, beta=1.0 / n, alpha=-1.0)
        kr.addr_(d_rows, d[cols], beta=1.0 / n, alpha=-1.0)
        return kk, kr

    @property
    def nbytes(self) -> int:
        held = (self.ref, self.offset, self.block, self.total)
        return sum(t.numel() * t.element_size() for t in held if t is not None)


def _holds(group: list[weakref.ref], st: Any) -> bool:
    return any(r() is st for r in group)


def _join(st: ChannelStats, s: Sample, base: tuple[CoMoment | None, int]) -> bool:
    """Make ``st`` a member of the co-moment another reader of ``s`` started with the same
    history (``base``: the co-moment it left, or None, and that one's batches then), when
    there is one and it holds nothing since."""
    o = s.opened
    if o is None or o.pending is not None or o.last is None or o.last() is not s or o.batches != base[1] + 1:
        return False
    if (o.origin[0]() if o.origin[0] is not None else None) is not base[0]:
        return False
    o.add_member(st)
    return True


@attrs.define(eq=False)
class ChannelStats:
    """Running per-channel statistics (float64): count, mean and M2 per channel; with
    ``covariance=True`` also the channel covariance (C x C, for reconstruction), streamed
    from at most ``covariance_rows`` randomly drawn positions of every batch (with its own
    count), so its cost per batch stays bounded.

    The covariance sample is accumulated about a fixed per-channel reference (the first
    sample's mean), so no cancellation occurs and each batch costs one matrix product
    added in place, in the activation's precision (float32 at least) and on its device:
    ``S += (x - ref)^T (x - ref)`` (for wide layers only its blocks on and above the
    diagonal). Every ``FLUSH_BATCHES`` batches the running block is added into a second
    accumulator, so rounding grows with ``FLUSH_BATCHES + batches / FLUSH_BATCHES``
    additions rather than with the number of batches. The covariance is ``S / n - d d^T``
    with ``d`` the mean offset from the reference, formed in float64. The sums live in a
    :class:`CoMoment`, shared with the consumers that read the same samples (the
    ``cov_*`` attributes read it)."""

    count: float = 0.0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    covariance: bool = False
    covariance_rows: int = 0
    comoment: CoMoment | None = None
    generator: torch.Generator | None = None

    def update(self, x: torch.Tensor, dim: int, reduction: BatchReduction | None = None) -> None:
        """Merge one batch ``x`` (channels along ``dim``); ``reduction``, when given, is
        ``x``'s reduction shared with other consumers of the same tensor."""
        if reduction is None:
            reduction = BatchReduction(x, dim)
        if reduction.moments is None:
            return
        n_b, mean_b, m2_b = reduction.moments
        c = mean_b.numel()
        if self.mean is not None and self.mean.numel() != c:
            raise ChannelCountError(
                f"got inputs of {c} channels (shape {tuple(x.shape)}) where earlier calibration batches gave "
                f"{self.mean.numel()}; give every calibration batch shaped like example_inputs (only the batch size, "
                "and an image's or a sequence's length, may change)"
            )
        self.count, self.mean, self.m2 = _chan_merge(self.count, self.mean, self.m2, n_b, mean_b, m2_b)
        if self.covariance and c <= MAX_COVARIANCE_CHANNELS:
            self._add_sample(x, reduction)

    def _add_sample(self, x: torch.Tensor, reduction: BatchReduction) -> None:
        """Add this batch's drawn positions, centred on the reference, to the co-moment.
        The centred sample is kept on ``reduction`` for the other consumers of ``x`` with
        the same reference (any reference is exact; a consumer without one adopts it), and
        readers of one sample share one :class:`CoMoment` while their samples agree."""
        m = self.comoment
        ref = None if m is None else m.ref
        sample = reduction.sample
        if sample is None or sample.rows != self.covariance_rows or (ref is not None and sample.ref is not ref):
            rows = self._sample_rows(x, reduction.dim)
            if rows.dtype in (torch.float16, torch.bfloat16):
                rows = rows.float()
            ref = rows.mean(0) if ref is None else ref
            centred = rows - ref
            sample = reduction.sample = Sample(self.covariance_rows, ref, centred, centred.sum(0, dtype=torch.float64))
        if m is not None:
            m.read(self, sample)
        elif not _join(self, sample, (None, 0)):
            m = CoMoment.start(sample)
            sample.opened = m
            m.add_member(self)
            m.read(self, sample)

    def _sample_rows(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``(rows, C)``: every position of the batch, or ``covariance_rows`` drawn at random."""
        x = x.detach()
        c = x.shape[dim]
        n = x.numel() // c
        last = _channels_last(x, dim)
        if self.covariance_rows and n > self.covariance_rows:
            if self.generator is None:
                self.generator = torch.Generator().manual_seed(0)
            idx = torch.randint(n, (self.covariance_rows,), generator=self.generator).to(x.device)
            if last is not None:  # index_select: the same rows as ``last[idx]``, 3-10x faster (C=1152: 31 us, 333)
                return last.index_select(0, idx)
            x3 = _as_rows(x, dim)
            return x3[idx // x3.shape[2], :, idx % x3.shape[2]]
        return last if last is not None else _as_rows(x, dim).transpose(1, 2).reshape(n, c)

    @property
    def has_cov(self) -> bool:
        """Whether a covariance was collected (without forming the matrix, as :attr:`cov` does)."""
        return self.comoment is not None

    def _settled(self) -> CoMoment | None:
        if self.comoment is not None:
            self.comoment.settle()
        return self.comoment

    @property
    def cov(self) -> torch.Tensor | None:
        """Channel covariance matrix (float64, CPU), when collected. The last one formed is
        kept (one matrix, for all statistics together: consumers that share their
        :class:`CoMoment` get the same one) until its totals change, so reading it twice in
        a row costs one (a caller must not write into it)."""
        m = self._settled()
        if m is None:
            return None
        key = tuple((id(t), _version(t)) for t in (m.total, m.block, m.offset) if t is not None) + (m.count,)
        last = _LAST_COV[0]
        if last is not None and last[0]() is m and last[1] == key:
            return last[2]
        cov = m.covariance()
        _LAST_COV[0] = (weakref.ref(m), key, cov)
        return cov

    def cov_blocks(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(cov[rows][:, rows], cov[rows][:, cols])`` (float64, CPU), when collected: the
        two blocks of :attr:`cov` that a regression of the ``cols`` channels on the ``rows``
        channels reads, formed from those entries of the co-moment only (no C x C float64
        matrix). Entry for entry the numbers of :attr:`cov`: each entry is read from the
        co-moment's block on or above the diagonal, and ``S / n - d d^T`` is the same
        ``addr_``. Each call returns new tensors."""
        m = self._settled()
        return None if m is None else m.blocks(rows, cols)

    @property
    def cov_mean(self) -> torch.Tensor | None:
        """Mean of the covariance sample (float64, CPU), when collected."""
        m = self._settled()
        if m is None:
            return None
        return m.ref.to("cpu", torch.float64) + (m.offset / max(m.count, 1.0)).cpu()

    # the co-moment's sums under their former names (read by distributed combination and tests)
    @property
    def cov_ref(self) -> torch.Tensor | None:
        return None if self.comoment is None else self.comoment.ref

    @property
    def cov_offset(self) -> torch.Tensor | None:
        m = self._settled()
        return None if m is None else m.offset

    @property
    def cov_block(self) -> torch.Tensor | None:
        m = self._settled()
        return None if m is None else m.block

    @cov_block.setter
    def cov_block(self, value: torch.Tensor) -> None:
        self._settled().block = value

    @property
    def cov_total(self) -> torch.Tensor | None:
        m = self._settled()
        return None if m is None else m.total

    @cov_total.setter
    def cov_total(self, value: torch.Tensor) -> None:
        self._settled().total = value

    @property
    def cov_count(self) -> float:
        m = self._settled()
        return 0.0 if m is None else m.count

    @property
    def cov_batches(self) -> int:
        m = self._settled()
        return 0 if m is None else m.batches

    @property
    def nbytes(self) -> int:
        """Memory held by these statistics, their co-moment included (shared with other
        consumers: :func:`stats_nbytes` counts it once)."""
        own = sum(t.numel() * t.element_size() for t in (self.mean, self.m2) if t is not None)
        return own + (0 if self.comoment is None else self.comoment.nbytes)

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.count, 1.0)

    @property
    def second_moment(self) -> torch.Tensor:
        return self.var + self.mean**2


def covariance_bytes(consumers: Iterable[Any]) -> int:
    """What the covariance budget counts for ``consumers`` (``"in"`` slices): two float32
    C x C matrices (twice that for float64 models) per distinct input, consumers that read
    one tensor (the same :attr:`~cleanai_core.graph.context.SliceSpec.reads`) once."""
    sizes = {_input_key(s): s.atoms.numel() for s in consumers}
    return sum(c * c * 8 for c in sizes.values())


def _input_key(s: Any) -> tuple:
    """The input a consumer slice reads, as far as the trace tells (else the slice itself)."""
    reads = getattr(s, "reads", None)
    return (reads, s.atoms.numel()) if reads is not None else (id(s),)


def stats_nbytes(stats: Iterable[ChannelStats]) -> int:
    """Memory held by ``stats`` together: a :class:`CoMoment` shared by several consumers counts once."""
    stats = list(stats)
    shared = {id(st.comoment): st.comoment for st in stats if st.comoment is not None}
    own = sum(t.numel() * t.element_size() for st in stats for t in (st.mean, st.m2) if t is not None)
    return own + sum(m.nbytes for m in shared.values())


def _as_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` viewed as ``(before, C, after)`` around the channel dim (a view when contiguous)."""
    return x.reshape(math.prod(x.shape[:dim]), x.shape[dim], -1)


def batch_moments(x: torch.Tensor, dim: int) -> tuple[float, torch.Tensor, torch.Tensor] | None:
    """``(count, mean, M2)`` per channel of one batch, float64; None for a tensor that is
    not floating point or empty; raises :class:`UserError` for non-finite activations.

    Reduced in the activation's own precision (no upcast copy of the whole tensor; see
    :func:`finite_moments`), returned in float64; a channels-innermost tensor of few channels
    in groups of rows (``grouped``, :func:`_kernel_moments`)."""
    moments = finite_moments(x, dim, grouped=True)
    if moments is None and x.is_floating_point() and x.numel() > 0:
        raise UserError(
            "non-finite activations (NaN or inf, or values too large for the model's precision) reached a layer "
            "during calibration; check the data for NaN/inf values and that the model's weights are finite"
        )
    return moments


def finite_moments(x: torch.Tensor, dim: int, grouped: bool = False) -> tuple[float, torch.Tensor, torch.Tensor] | None:
    """:func:`batch_moments` without the error: None also where a value is not finite.
    ``grouped``: a channels-innermost CPU tensor of few channels is reduced in groups of
    rows (:func:`_kernel_moments`; faster, and closer to float64, but not the same bits as
    the kernel's one pass: the consumers' statistics use it, the BatchNorm correction, whose
    original and pruned moments of a channel must agree however many channels the norm
    keeps, does not).

    The batch-norm statistics kernel (``aten::batch_norm_update_stats``, no running
    buffers) reduces each channel in two passes (its mean, then the squares about it), so
    a small spread around a large mean keeps its variance. On channels-last (and 2-D)
    tensors it runs at 1.1-1.8x one plain ``sum`` over the tensor on CPU, against 3.5-5x
    for the blocked shifted sums it replaced; channels-first CPU tensors, where it runs at
    4-12x a sum, go through :func:`_row_moments` instead (2-2.5x). Each channel is reduced
    the same way whatever the other channels hold: a channel that pruning left unchanged
    gets bit-identical moments in the original and in the pruned model (what
    :mod:`cleanai_core.bn_correction` relies on). Where a device has no such kernel, one
    ``var_mean`` in the activation's precision."""
    got = finite_moments_of([x], dim, grouped)
    return None if got is None else got[0]


def finite_moments_of(
    xs: list[torch.Tensor], dim: int, grouped: bool = False
) -> list[tuple[float, torch.Tensor, torch.Tensor]] | None:
    """:func:`finite_moments` of each of ``xs`` (same device and channel count), the
    per-channel results the same bit for bit; None where any is None. Each tensor is
    reduced alone, the conversions and the one finiteness check made once for all."""
    raw = []
    for x in xs:
        x = x.detach()
        if not x.is_floating_point() or x.numel() == 0:
            return None
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        last = _channels_last(x, dim)
        # (positions, C) when channels are innermost, else (before, C, after): both are the
        # (N, C, ...) layout the kernel reduces over all but dim 1
        rows = last if last is not None else _as_rows(x, dim)
        if last is None and rows.shape[2] >= ONE_PASS_MIN_ROW and rows.device.type == "cpu" and rows.is_contiguous():
            mean, var = _row_moments(rows)
        elif _kernel_agrees(rows.device.type, rows.dtype):
            mean, var = _kernel_moments(rows) if grouped else _STATS_KERNEL(rows, None, None, 0.0)
        else:
            var, mean = _var_mean(rows)
        raw.append((x.numel() // x.shape[dim], mean, var))
    if len(raw) == 1:
        (n, mean, var), counts = raw[0], None
    else:
        mean, var = torch.stack([r[1] for r in raw]), torch.stack([r[2] for r in raw])
        counts = [float(r[0]) for r in raw]
    mean, var = mean.to(torch.float64), var.to(torch.float64)
    # a NaN or inf anywhere, or squares too large for the precision, make these non-finite
    # (and so their float64 sum: one check)
    if not math.isfinite(float(mean.sum() + var.sum())):
        return None
    if counts is None:
        return [(float(n), mean.cpu(), (var * n).cpu())]
    mean, m2 = mean.cpu(), (var * var.new_tensor(counts)[:, None]).cpu()
    return [(n, mean[i], m2[i]) for i, n in enumerate(counts)]


def _row_moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel of a contiguous channels-first ``(B, C, L)``
    tensor, float64, from one pass of per-row sums and norms: on CPU the statistics
    kernel reduces that layout 4-12x slower than one plain sum (8x256x56x56: 10.9 ms
    against 0.9 ms, one thread), while a row sum and a row norm cost about one sum each.
    ``E[x^2] - mean^2`` loses ``mean^2 / var`` times the float32 rounding, so channels
    whose squared mean is :data:`ONE_PASS_MAX_MEAN_SQ` variances or more (constant
    ones among them, but not all-zero ones) are reduced again by the kernel. Each
    channel's result depends only on its own values (row reductions in a fixed order,
    combined over the batch in order), so an unchanged channel of the original and of
    the pruned model agree bit for bit. Collection runs convolutional models
    channels-last where they allow it (:func:`~cleanai_core.runtime.channels_last_layout`),
    where the kernel is already within 1.5x of a sum; this path serves the rest."""
    b, c, length = rows.shape
    flat = rows.view(b * c, length)
    n = b * length
    sums = flat.sum(1).view(b, c).to(torch.float64).sum(0)
    squares = torch.linalg.vector_norm(flat, dim=1).to(torch.float64).square().view(b, c).sum(0)
    mean = sums / n
    var = squares / n - mean.square()
    # an all-zero channel (squares 0) is exact as it is; False where not finite: reported as such.
    # Squares that underflow float32 (values below ~1e-19: a random-weight MobileViT's 1e-24)
    # are 0 beside a mean that is not: a negative variance, whose square root in the
    # BatchNorm correction made the running mean NaN. Those channels are reduced again too.
    again = (var * ONE_PASS_MAX_MEAN_SQ <= mean.square()) & ((squares > 0) | (sums != 0))
    if bool(again.any()):
        idx = again.nonzero().squeeze(1)
        exact = rows.index_select(1, idx)
        if _kernel_agrees("cpu", rows.dtype):
            m, v = _STATS_KERNEL(exact, None, None, 0.0)
        else:
            v, m = _var_mean(exact)
        mean[idx], var[idx] = m.to(torch.float64), v.to(torch.float64)
    return mean, var.clamp_min_(0.0)  # a variance is never negative (NaN stays NaN: reported)


def _kernel_moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel of ``rows`` (``(N, C, ...)`` or a ``(positions,
    C)`` view) by the statistics kernel. On CPU the kernel walks a ``(P, C)`` matrix row by
    row, so with few channels its cost per row dominates: 8x3x224x224 channels-last (an
    image batch at the stem) took 8.6 ms against 0.3 for one ``sum``, 8x16x112x112 0.8 ms.
    A ``(P, C)`` matrix of fewer than :data:`_NARROW_CHANNELS` channels is therefore reduced
    as ``(P / k, k C)``: each channel as ``k`` interleaved groups of rows (``k`` a power of
    two dividing ``P``, up to :data:`_NARROW_WIDTH` columns), whose equal-count moments are
    merged in float64 (mean of the means; mean of the variances plus the variance of the
    means); channels whose squared mean is :data:`ONE_PASS_MAX_MEAN_SQ` variances or more
    (where the groups' float32 means would carry the mean's rounding into the variance) are
    reduced again whole. 8x3x224x224: 0.3-0.9 ms, 8x16x112x112: 0.4 ms. Each channel still
    depends only on its own values, and the kernel's float32 sums run over ``k`` times fewer
    rows, so the result is closer to float64 (the image batch's variance: 1.4e-4 -> 4e-7
    relative). Used for the consumers' statistics only (``grouped``, :func:`finite_moments`)."""
    if rows.ndim == 2 and rows.device.type == "cpu" and rows.shape[1] < _NARROW_CHANNELS and rows.is_contiguous():
        p, c = rows.shape
        k = 1
        while (2 * k) * c <= _NARROW_WIDTH and p % (2 * k) == 0 and p // (2 * k) >= 2:
            k *= 2
        if k > 1:
            m, v = _STATS_KERNEL(rows.view(p // k, k * c), None, None, 0.0)
            m, v = m.view(k, c).to(torch.float64), v.view(k, c).to(torch.float64)
            mean = m.mean(0)
            var = v.mean(0).add_((m - mean).square_().mean(0))
            # the groups' float32 means carry the rounding of a large mean into the spread of
            # the means: channels whose squared mean is 16 variances or more are reduced whole
            again = (var * ONE_PASS_MAX_MEAN_SQ <= mean.square()) & (mean != 0)
            if bool(again.any()):
                idx = again.nonzero().squeeze(1)
                m, v = _STATS_KERNEL(rows.index_select(1, idx), None, None, 0.0)
                mean[idx], var[idx] = m.to(torch.float64), v.to(torch.float64)
            return mean, var
    return _STATS_KERNEL(rows, None, None, 0.0)


def _var_mean(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean of ``rows`` (N, C, ...) per channel (dim 1)."""
    return torch.var_mean(rows, dim=[d for d in range(rows.ndim) if d != 1], correction=0)


@functools.cache
def _kernel_agrees(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the statistics kernel runs on this device and dtype and gives the mean and
    biased variance (checked once against ``var_mean`` on a small tensor: a device that
    lacks it, or returns another statistic, gets the ``var_mean`` path)."""
    g = torch.Generator().manual_seed(0)
    probe = (torch.randn(4, 3, 5, generator=g, dtype=torch.float64) * 3 + 2).to(device_type, dtype)
    try:
        mean, var = _STATS_KERNEL(probe, None, None, 0.0)
    except (NotImplementedError, RuntimeError):
        return False
    ref_var, ref_mean = _var_mean(probe)
    return bool(torch.allclose(mean, ref_mean, rtol=1e-4, atol=1e-5) and torch.allclose(var, ref_var, rtol=1e-4))


def _channels_last(x: torch.Tensor, dim: int) -> torch.Tensor | None:
    """``x`` as a ``(positions, C)`` view when its channels are innermost in memory (a
    linear's input, a channels-last conv input, a permuted NHWC tensor), else None."""
    last = x.movedim(dim, -1)
    if not last.is_contiguous():
        return None
    return last.view(-1, x.shape[dim])


def _all_zero(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is zero (one min/max pass; ``any`` is 3-4x slower on CPU)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(lo == 0) and bool(hi == 0)


def _gram_blocks(c: int) -> list[slice]:
    """The column blocks of a C x C co-moment (one below ``_GRAM_MIN_SPLIT`` channels)."""
    k = 1 if c < _GRAM_MIN_SPLIT else math.ceil(c / _GRAM_BLOCK)
    edges = [c * i // k for i in range(k + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(k)]


def _add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += x^T x`` on and above the diagonal only: ``x^T x`` is symmetric, so for wide
    ``x`` each panel of :data:`_GRAM_PANEL` rows is multiplied from its diagonal block to
    the last column (one product per panel); entries below the panels' diagonal blocks are
    left untouched. 256 sampled rows, against one full product: C=768 1.40 -> 0.93 ms,
    C=1536 5.7 -> 3.8, C=3072 22 -> 15 on one core (on two: 0.71 -> 0.51, 2.9 -> 1.9,
    11.1 -> 7.0; the column blocks of 768 it replaced took 0.71, 2.4, 7.8)."""
    c = x.shape[1]
    if c < 2 * _GRAM_PANEL:
        acc.addmm_(x.T, x)
        return
    for start in range(0, c, _GRAM_PANEL):
        stop = min(start + _GRAM_PANEL, c)
        acc[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])


def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s parallel merge of two per-channel (count, mean, M2) summaries. The
    running ``m2_a`` is updated in place (so it starts as a copy: ``m2_b`` may be shared
    with other consumers)."""
    if mean_a is None:
        return float(n_b), mean_b, m2_b.to(torch.float64, copy=True)
    total = n_a + n_b
    delta = mean_b - mean_a
    m2_a += m2_b
    m2_a.addcmul_(delta, delta, value=n_a * n_b / total)
    return total, mean_a + delta * (n_b / total), m2_a


def merged_moments(parts: list[tuple[float, torch.Tensor, torch.Tensor]]) -> list:
    """``[count, mean, M2]`` of several per-channel ``(count, mean, M2)`` summaries of the
    same channels merged at once: the count-weighted mean, and the parts' M2 plus their
    squared deviations from it (what :func:`_chan_merge` gives one part at a time, to
    float64 rounding, in a dozen operations however many parts); ``[0.0, None, None]``
    for none. ``M2`` is a new tensor (the parts' are not changed)."""
    if not parts:
        return [0.0, None, None]
    if len(parts) == 1:
        return list(_chan_merge(0.0, None, None, *parts[0]))
    counts = torch.tensor([float(n) for n, _, _ in parts], dtype=torch.float64).unsqueeze(1)
    means = torch.stack([m for _, m, _ in parts]).to(torch.float64)
    total = float(counts.sum())
    mean = (counts * means).sum(0) / total
    m2 = torch.stack([m2 for _, _, m2 in parts]).to(torch.float64).sum(0)
    return [total, mean, m2.add_((counts * (means - mean).square()).sum(0))]


class BatchReduction:
    """One batch's tensor at a consumer's input, reduced once: its per-channel moments
    (computed on creation) and the covariance sample (drawn by the first consumer that
    wants one). Kept per distinct tensor, so consumers reading the same tensor share it."""

    __slots__ = ("dim", "moments", "sample", "version")

    def __init__(self, x: torch.Tensor, dim: int) -> None:
        self.dim = dim
        self.version = _version(x)
        self.moments = batch_moments(x, dim)
        self.sample: Sample | None = None


def _version(x: torch.Tensor) -> int | None:
    """``x``'s in-place modification counter (shared with its views); None where it has none."""
    try:
        return x._version
    except RuntimeError:  # inference-mode tensors do not count versions
        return None


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
        # within the memory budget; consumers that read one tensor (the trace's
        # ``SliceSpec.reads``) hold one co-moment and count once
        self.with_covariance: set[tuple[str, str]] = set()
        foldable = [
            s
            for s in consumers
            if covariance and s.pruner is not None and s.pruner.can_reconstruct(model.get_submodule(s.module), s.name)
        ]
        used, full = 0, False
        charged: set[tuple] = set()
        for s in sorted(foldable, key=lambda s: s.atoms.numel()):
            if s.atoms.numel() > MAX_COVARIANCE_CHANNELS:
                break
            key = _input_key(s)
            cost = 0 if key in charged else s.atoms.numel() ** 2 * 8
            if cost and (full or used + cost > covariance_budget):
                full = True  # no wider one either; readers of a tensor already paid for still join
                continue
            used += cost
            charged.add(key)
            self.with_covariance.add((s.module, s.name))

    @contextmanager
    def hooks(self) -> Iterator[StatsCollector]:
        handles = []
        # id(tensor) -> (weak reference, dim, its reduction, the positions reduced where they
        # are not the tensor itself); an entry leaves when its tensor dies, so it must not
        # hold the tensor: it did, and every hooked activation of every batch stayed alive
        # until calibration ended (ResNet-18, 16 images at 128 px: 258 MB more at 5 batches,
        # 1976 MB at 40), and each new activation was written to fresh memory
        seen: dict[int, tuple[weakref.ref, int, BatchReduction, torch.Tensor | None]] = {}
        padding: list[torch.Tensor | None] = [None]  # this batch's attention mask, where it hides positions

        def reduce(x: torch.Tensor, dim: int) -> tuple[BatchReduction, torch.Tensor]:
            key = id(x)
            hit = seen.get(key)
            if hit is not None and hit[0]() is x:
                _, d, red, rows = hit
                if d == dim and red.version is not None and red.version == _version(x):
                    return red, x if rows is None else rows
            rows, d = real_positions(x, dim, padding[0])
            red = BatchReduction(rows, d)
            red.version = _version(x)
            if red.version is not None:
                own = None if rows is x else rows
                try:
                    seen[key] = (weakref.ref(x, lambda _, key=key: seen.pop(key, None)), dim, red, own)
                except TypeError:  # a tensor type without weak references: not shared
                    pass
            return red, rows

        def mask_of_batch(m, args, kwargs):
            mask = kwargs.get("attention_mask")
            hides = isinstance(mask, torch.Tensor) and mask.ndim == 2 and not bool(mask.all())
            # one token stream only: an encoder-decoder's decoder positions are not the mask's
            two_streams = getattr(getattr(m, "config", None), "is_encoder_decoder", False) is True or any(
                k.startswith("decoder_") for k in kwargs
            )
            padding[0] = mask.bool() if hides and not two_streams else None

        handles.append(self.model.register_forward_pre_hook(mask_of_batch, with_kwargs=True))

        for module_name, slice_name, argpos, dim in self._targets:
            module = self.model.get_submodule(module_name)
            key = (module_name, slice_name)
            stats = self.stats.setdefault(
                key, ChannelStats(covariance=key in self.with_covariance, covariance_rows=self.covariance_rows)
            )
            keyword = _parameter_name(module, argpos)
            positional = isinstance(argpos, int)

            def pre(
                m,
                args,
                kwargs,
                stats=stats,
                argpos=argpos,
                dim=dim,
                keyword=keyword,
                positional=positional,
                module_name=module_name,
            ):
                if positional and argpos < len(args):
                    x = args[argpos]
                else:  # passed by keyword, e.g. mha(q, key=k, value=v)
                    x = kwargs.get(keyword)
                if isinstance(x, torch.Tensor) and x.ndim > 0:
                    red, rows = reduce(x, dim % x.ndim)
                    try:
                        stats.update(rows, red.dim, red)
                    except ChannelCountError as exc:  # "a layer saw 5 channels after 3": which layer?
                        raise UserError(f"layer {module_name!r} ({type(m).__name__}) {exc}") from None

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            seen.clear()
            for st in self.stats.values():  # the last batch's samples added; no reference to them kept
                if st.comoment is not None:
                    st.comoment.settle()
                    st.comoment.last = None


def real_positions(x: torch.Tensor, dim: int, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """``(x, dim)`` without the positions a batch's attention mask hides: a consumer's
    input of shape ``(batch, sequence, ..., channels)`` whose first two dimensions are the
    mask's loses its padded positions (``x[mask]``, channels one dimension earlier), so
    padding tokens do not count in the statistics of a padded text batch."""
    if mask is None or x.ndim < 3 or dim < 2 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x, dim
    return x[mask.to(x.device)], dim - 1


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
