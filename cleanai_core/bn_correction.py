"""BatchNorm correction: move a pruned model's running statistics by what pruning changed.

Glossary:

- *norm with running statistics*: a module holding ``running_mean`` and ``running_var``
  buffers and tracking them (BatchNorm and its subclasses, found by those buffers, not by
  type). In eval mode it normalises with them, so once pruning changes what flows into it,
  they no longer describe its input.
- *moments*: per channel of a norm's input, on one call: count, mean and M2 (sum of
  squared deviations), reduced in float64.
- *call*: one forward call of a norm; a norm used twice per forward has two calls per
  batch. Calls are matched between the original and the pruned model by their order.

The correction (eval mode throughout; any batch size, also one value per channel):

1. While calibrating, the moments of every norm's input in the *original* model are
   recorded per call (:func:`recording`); the calibration batches are kept when small.
2. Passes of the *pruned* model over the same batches (:func:`correct_batchnorm`). At
   each call a pre-hook reads the pruned input's moments; after the pass they are merged
   into totals, and so are the original's moments of the same calls (restricted to the
   kept channels); with the totals (summed over ranks under ``torch.distributed``) every
   norm gets

   ``running_mean = base_mean + (mean_pruned - mean_orig)``
   ``running_var  = base_var * var_pruned / var_orig`` (``+ var_pruned - var_orig`` where
   ``var_orig`` is below the norm's ``eps``; clamped at 0)

   where ``base_*`` are the statistics the model was trained with, sliced to the kept
   channels. In the first pass each call normalises with the statistics moved by that
   call's own difference (as train mode normalises with each batch's statistics), so the
   norms below already see a corrected input: one pass corrects a chain of any depth, and
   it is the only pass by default. Later passes (``passes=``) hold every norm at the
   estimate of the pass before and move it by the plain difference of the moments, without
   the pairing of the first: on the digits benchmark 1, 2 or 3 passes gave the same mean
   accuracy over 36 pruned models (86.15, 86.07, 86.08%), and on random-weight models at
   half the channels the later passes moved the outputs further from the original's
   (ResNet-50 at batches of 8: mean output change 0.85 after one pass, 7.0 after three,
   output scale 9.4; RegNetX-8GF at batch 1: 0.055 against 0.24, scale 0.26), at the cost
   of a pass of the pruned model each (issue 21). (Passes without the batchwise first one
   would each carry the correction only one norm deeper.) No pass depends on the order or
   the sharding of the batches. Where pruning changed nothing (dead units: zero weights,
   zero activations), both moments agree and the statistics stay as trained, to float
   tolerance.

The trained statistics are never replaced by estimates from the (small) calibration set,
and nothing runs in train mode, so a norm that sees one value per channel (after global
pooling, squeeze-excite, BN after a linear at batch size 1) is handled like any other.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from cleanai_core.bn_estimate import (
    Estimate,
    Pair,
    Prepared,
    estimate,
    estimate_prepared,
    pair_moments,
    prepare,
    sample_rows,
)
from cleanai_core.calibration import finite_moments, merged_moments
from cleanai_core.model_state import preserved, set_mode

__all__ = [
    "BN_SAMPLES",
    "SAMPLE_BYTES",
    "Moments",
    "Samples",
    "correct_batchnorm",
    "norms_with_running_stats",
    "recording",
    "sampling",
    "set_running_stats",
]

#: the most bytes of the original's paired samples kept from calibration; beyond it the
#: original runs again beside the pruned model in the correction's pass. 256 MiB holds 256
#: positions per norm call of ResNet-50 for 9 batches (27 MB per batch); thinning the
#: samples to stay within a smaller budget was tried and dropped: a random-weight
#: ResNet-152 paired on a quarter of the rows moved its outputs 14x further
SAMPLE_BYTES = 256 << 20

#: calibration samples (images) the correction reads by default, in batches spread over the
#: data (:func:`~cleanai_core.replay.spread`), so its cost stops growing with the set. On the
#: digits benchmark (36 pruned models over 3 seeds, 298 calibration images), 256 of them
#: lost nothing measurable against all 298 (-0.04 points on average, standard error 0.05,
#: in batches of 64; -0.01, 0.07 in batches of 16); fewer did: 128 -0.19 (0.08), 64 -0.35
#: (0.14), 32 -0.47 (0.18), in batches of 16
BN_SAMPLES = 256

#: per norm name: the moments ``(count, mean, M2)`` of its input, one entry per call
Moments = dict[str, list[tuple[float, torch.Tensor, torch.Tensor] | None]]


def norms_with_running_stats(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that normalise with tracked running statistics."""
    out = {}
    for name, m in model.named_modules():
        rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor) and getattr(m, "track_running_stats", True):
            out[name] = m
    return out


def _moments(x: Any) -> tuple[float, torch.Tensor, torch.Tensor] | None:
    """``(count, mean, M2)`` per channel (dim 1, or 0 for a 1-D input), float64; None where
    a value is not finite (nothing to learn from this call). Reduced in the activation's
    precision per channel, in a way that does not depend on the other channels, so the
    original's and the pruned model's moments of an unchanged channel agree bit for bit
    (:func:`~cleanai_core.calibration.finite_moments`; a float64 ``var_mean`` of the same
    input cost 15-20x more and was half of the default path's time on ResNet-50)."""
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        return None
    return finite_moments(x, 1 if x.ndim > 1 else 0)


@contextmanager
def _on_norm_inputs(model: nn.Module, fn: Callable[[str, Any], None]) -> Iterator[None]:
    """Call ``fn(norm name, input)`` on every call of every norm of ``model`` while the
    block runs (hooks removed on exit, also on error)."""
    handles = [
        m.register_forward_pre_hook(lambda module, args, name=name: fn(name, args[0] if args else None))
        for name, m in norms_with_running_stats(model).items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def recording(model: nn.Module, moments: Moments, active: Callable[[], bool] | None = None) -> Iterator[Moments]:
    """Append the input moments of every call of every norm of ``model`` to ``moments``
    while the block runs (hooks removed on exit, also on error); with ``active``, only
    the calls made while it returns True."""
    for name in norms_with_running_stats(model):
        moments.setdefault(name, [])

    def record(name: str, x: Any) -> None:
        if active is None or active():
            moments[name].append(None if x is None else _moments(x))

    with _on_norm_inputs(model, record):
        yield moments


class Samples:
    """The original's norm inputs at the paired positions, per norm one entry per call
    (:func:`~cleanai_core.bn_estimate.sample_rows`), kept while they fit in ``budget``
    bytes (default :data:`SAMPLE_BYTES`); beyond it :attr:`complete` is False and none
    are kept. ``batches``: the indices of the batches sampled, where only some are (the
    ones the BatchNorm correction will read, :attr:`active` while they run); None: all."""

    def __init__(self, budget: int | None = None, batches: list[int] | None = None) -> None:
        self.calls: dict[str, list] = {}
        self.budget = SAMPLE_BYTES if budget is None else budget
        self.bytes = 0
        self.complete = True
        self.batches = batches
        self.active = True

    def add(self, name: str, x: Any) -> None:
        if not self.complete or not self.active:
            return
        rows = sample_rows(x)
        self.bytes += rows.numel() * rows.element_size() if rows is not None else 0
        if self.bytes > self.budget:
            self.complete, self.calls = False, {}
        else:
            self.calls.setdefault(name, []).append(rows)


@contextmanager
def sampling(model: nn.Module, samples: Samples) -> Iterator[Samples]:
    """Add the input of every call of every norm of ``model`` to ``samples`` while the block runs."""
    with _on_norm_inputs(model, samples.add):
        yield samples


def set_running_stats(module: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Write ``mean`` and ``var`` into a norm's running statistics (their dtype and device)."""
    with torch.no_grad():  # copy_ converts dtype and device
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)


class _Correction:
    """The running totals of one norm of the pruned model over a pass, and the update they give.

    At each call the hook reads the pruned input's moments (and its paired sample) and, in
    the batchwise pass, sets the statistics estimated from that call; everything else is
    done once per norm: the original's side of the estimate for all its calls before the
    pass (:func:`~cleanai_core.bn_estimate.prepare` on the stacked calls), the totals from
    all the calls after it (:func:`~cleanai_core.calibration.merged_moments`, :meth:`totals`)."""

    def __init__(self, module: nn.Module, calls: list, keep: torch.Tensor | None) -> None:
        self.module = module
        self.calls = calls
        self.keep = keep
        self._keep_at: torch.Tensor | None = None  # keep on the device last asked for
        self.base_mean = module.running_mean.detach().clone()
        self.base_var = module.running_var.detach().clone()
        # as the estimate reads them: converted once, not at every call
        self.base64 = (self.base_mean.to("cpu", torch.float64), self.base_var.to("cpu", torch.float64))
        self.eps = float(getattr(module, "eps", 1e-5))
        self.broken = False
        self.uncertain = False
        self.samples: list | None = None  # the original's paired samples, while pairing
        self.sample_offset = 0  # the pass's calls before the first entry of :attr:`samples`
        self.pair: Pair | None = None  # the pair's totals (pairing pass), kept for the later passes
        self.restart(batchwise=False)

    def restart(self, batchwise: bool, pairing: bool = False) -> None:
        """Start the totals afresh for a pass. ``batchwise``: each call normalises with the
        statistics estimated from that call alone (as train mode uses each batch's
        statistics), so the norms below see a corrected input within the same pass; else
        the statistics stay fixed while the pass runs. ``pairing``: the original runs
        beside on each batch (its samples in :attr:`samples`) and the pair is measured."""
        self.i = 0
        self.batchwise = batchwise
        self.pairing = pairing
        self.held = (self.module.running_mean.detach().clone(), self.module.running_var.detach().clone())
        self.pruned: list = [0.0, None, None]
        self.orig: list = [0.0, None, None]
        self.merged: list = []  # per call merged this pass: the pruned input's moments and the original's
        self.pairs: list = []  # per paired call: the pair's moments
        self.last: Estimate | None = None  # the batchwise estimate of the last call
        # per call recorded so far: the original's moments on the kept channels and the
        # estimate's side of them (batchwise only); calls recorded later are done one by one
        self.originals = self._originals() if batchwise else []
        if pairing:
            self.pair = [[0.0, None, None] for _ in range(3)]

    def _keep_on(self, device: torch.device) -> torch.Tensor:
        """:attr:`keep` as a long tensor on ``device`` (moved once per device)."""
        if self._keep_at is None or self._keep_at.device != device:
            self._keep_at = self.keep.to(device, torch.long)
        return self._keep_at

    def _kept(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return t if self.keep is None else t.index_select(dim, self._keep_on(t.device))

    def _originals(self) -> list[tuple[tuple, Prepared] | None]:
        """Per call recorded so far, the original's moments on the kept channels and their
        side of the estimate, all calls stacked (the same as one call at a time: elementwise
        operations, and the trust from each row's own median)."""
        valid = [k for k, c in enumerate(self.calls) if c is not None]
        if not valid or len({self.calls[k][1].shape for k in valid}) != 1:
            return []  # nothing recorded yet (measured beside the pruned model), or mixed widths: one by one
        counts = [float(self.calls[k][0]) for k in valid]
        mean = self._kept(torch.stack([self.calls[k][1] for k in valid]), 1)
        m2 = self._kept(torch.stack([self.calls[k][2] for k in valid]), 1)
        rows = prepare(*self.base64, self.eps, (counts, mean, m2)).rows()
        out: list = [None] * len(self.calls)
        for k, p in zip(valid, rows, strict=True):
            out[k] = ((p.n, p.mean, p.m2), p)
        return out

    def _original(self, k: int) -> tuple[tuple, Prepared | None] | None:
        """The original's moments of call ``k`` on the kept channels and, where made before
        the pass, their side of the estimate; None where the original measured nothing."""
        if k < len(self.originals):
            return self.originals[k]
        orig = self.calls[k]
        if orig is None:
            return None
        n, mean, m2 = orig
        return (n, self._kept(mean), self._kept(m2)), None

    def _hold(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        set_running_stats(self.module, mean, var)

    def _estimate(self, pruned: tuple, orig: tuple, pair: Pair | None) -> Estimate:
        return estimate(*self.base64, self.eps, pruned, orig, pair)

    def _paired(self, x: Any) -> Pair | None:
        """The pair of this call (the original's sample beside ``x``'s), kept for the totals."""
        if self.samples is None:
            return None
        k = self.i - 1 - self.sample_offset
        sample = self.samples[k] if 0 <= k < len(self.samples) else None
        mine = sample_rows(x)
        if sample is None or mine is None:
            return None
        if self.keep is not None:  # index_select: 15x faster than ``sample[:, keep]`` at 256 x 480
            sample = sample.index_select(1, self._keep_on(sample.device))
        got = pair_moments(sample, mine)
        if got is not None:
            self.pairs.append(got)
        return got

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.broken:
            return
        k = self.i
        if k >= len(self.calls) or not args:
            self.broken = True  # the pruned model calls this norm more often: leave it as trained
            return
        self.i = k + 1
        got = _moments(args[0])
        known = self._original(k)
        if known is None or got is None:
            if self.batchwise:
                self._hold(*self.held)
            return
        orig, prepared = known
        if orig[1].shape != got[1].shape:
            self.broken = True
            return
        pair = self._paired(args[0])
        self.merged.append((got, orig))
        if self.batchwise:
            if prepared is None:
                prepared = prepare(*self.base64, self.eps, orig)
            self.last = estimate_prepared(prepared, got, pair)
            self._hold(self.last.mean, self.last.var)

    def totals(self) -> None:
        """The pass's totals from its calls: the pruned input's moments, the original's (the
        same calls) and, in the pairing pass, the pair's."""
        self.pruned = merged_moments([got for got, _ in self.merged])
        self.orig = merged_moments([orig for _, orig in self.merged])
        if self.pairing:
            self.pair = [merged_moments([p[k] for p in self.pairs]) for k in range(3)]

    def apply(self, summed: bool = False) -> float:
        """Set the statistics from the pass's totals (``summed``: totals summed over ranks);
        returns how far they moved from where the pass started: the largest change of a
        channel's mean in its standard deviations, or of its variance relative to it (0
        when the pass measured nothing)."""
        if self.pruned[1] is None:
            self._hold(*self.held)
            return 0.0
        if len(self.merged) == 1 and self.last is not None and not summed:
            e = self.last  # one call on one rank: the totals are that call's, and so is the estimate
        else:
            e = self._estimate(tuple(self.pruned), tuple(self.orig), self.pair)
        new_mean, new_var = e.mean, e.var
        self.uncertain = e.uncertain
        self._hold(new_mean, new_var)
        old_mean = self.held[0].to(torch.float64).cpu()
        old_var = self.held[1].to(torch.float64).cpu() + self.eps
        moved = torch.maximum(
            (new_mean - old_mean).abs() / old_var.sqrt(), (new_var + self.eps - old_var).abs() / old_var
        )
        return float(moved.max()) if moved.numel() else 0.0


def correct_batchnorm(
    pruned: nn.Module,
    original_moments: Moments,
    keep: dict[str, torch.Tensor],
    batches: Callable[[], Iterable[Any]],
    run: Callable[[nn.Module, Any], Any],
    run_original: Callable[[Any], None] | None = None,
    passes: int = 1,
    tol: float = 1e-3,
    original: nn.Module | None = None,
    original_samples: Samples | None = None,
) -> int:
    """Correct the running statistics of ``pruned``'s norms (see the module doc) with up to
    ``passes`` eval-mode passes over ``batches``; returns how many norms were corrected.

    :param original_moments: the original model's norm input moments on the same batches,
        in the same order (:func:`recording`); with ``run_original`` it is filled batch by
        batch instead (``run_original(batch)`` runs the original model under
        :func:`recording` into it), for data that cannot be kept.
    :param keep: per norm name, the original channels that the pruned norm keeps (a norm
        not named kept all of them).
    :param run: ``run(model, batch)`` calls the model on one batch's inputs.
    :param batches: ``batches()`` yields the calibration batches, in the same order each time
        unless ``run_original`` is given.
    :param passes: the first pass corrects each call by its own measured difference as it
        runs, so the norms below see corrected inputs within the pass; each later pass
        measures every norm's input with the norms above it held at the last pass's
        estimate (without pairing; one pass, the default, measured as well or better).
    :param tol: passes stop early once one moves no norm's statistics by more than this
        (a mean by ``tol`` standard deviations, a variance by ``tol`` of itself): the next
        pass would measure the same inputs to within that. Where pruning changed no norm's
        input (dead units, pruning below the last norm) that is after the first pass; where
        no corrected norm feeds another, after the second. ``0`` runs every pass.
    :param original: the original model: in the first pass it runs beside the pruned one
        on each batch (in eval mode, left as it was), and the two models' norm inputs are
        paired (:mod:`cleanai_core.bn_estimate`). Without it the statistics are moved by
        the difference and the ratio of the moments alone.
    :param original_samples: the original's samples on the same batches in the same order
        (:func:`sampling`, while calibrating): paired with them instead of running it again.
    """
    from cleanai_core.distributed import combine_moments, is_distributed

    norms = norms_with_running_stats(pruned)
    if original is not None:
        # a norm sliced inside a module claimed whole (timm's LambdaLayer holds two BatchNorms)
        # is named by no edit, so its kept channels are unknown: it keeps its sliced trained
        # statistics (its moments could not be paired; they raised a size mismatch)
        widths = {name: m.running_mean.numel() for name, m in norms_with_running_stats(original).items()}
        norms = {name: m for name, m in norms.items() if name in keep or widths.get(name) == m.running_mean.numel()}
    fixes = {name: _Correction(m, original_moments.setdefault(name, []), keep.get(name)) for name, m in norms.items()}
    if not fixes:
        return 0
    handles = [m.register_forward_pre_hook(fixes[name]) for name, m in norms.items() if name in fixes]
    modes = [(m, m.training) for m in pruned.modules()]
    set_mode(pruned, False)
    stored = original_samples is not None and original_samples.complete and run_original is None
    try:
        with torch.no_grad():
            for i in range(passes):
                pairing = i == 0 and original is not None
                for name, f in fixes.items():  # the first pass batch by batch; then held at the last pass's estimate
                    f.restart(batchwise=i == 0, pairing=pairing)
                    if pairing and stored:
                        f.samples = original_samples.calls.get(name, [])
                if i > 0 and run_original is not None:  # measured afresh beside the pruned model
                    for calls in original_moments.values():
                        calls.clear()
                for batch in batches():
                    _run_beside(batch, original if pairing and not stored else None, run_original, run, fixes)
                    run(pruned, batch)
                ordered = [fixes[name] for name in sorted(fixes)]
                for f in ordered:
                    f.totals()
                sizes = [f.module.running_mean.numel() for f in ordered]
                combine_moments([f.pruned for f in ordered], sizes)
                combine_moments([f.orig for f in ordered], sizes)
                if pairing:
                    for k in range(3):
                        combine_moments([f.pair[k] for f in ordered], sizes)
                    for f in ordered:
                        f.samples = None
                moved = max(f.apply(summed=is_distributed()) for f in ordered)
                if moved <= tol:  # the same on every rank: the totals were summed over ranks
                    break
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return _finish(fixes)


def _run_beside(
    batch: Any,
    original: nn.Module | None,
    run_original: Callable[[Any], None] | None,
    run: Callable[[nn.Module, Any], Any],
    fixes: dict[str, _Correction],
) -> None:
    """Before the pruned model runs on ``batch``: the original, where its moments are
    measured afresh (``run_original``) or its inputs paired (``original``)."""
    if original is None:
        if run_original is not None:
            run_original(batch)
        return
    samples = Samples(budget=1 << 62)  # one batch's
    with preserved(original), sampling(original, samples):
        if run_original is not None:
            run_original(batch)
        else:
            run(original, batch)
    for name, f in fixes.items():
        f.samples, f.sample_offset = samples.calls.get(name, []), f.i


def _finish(fixes: dict[str, _Correction]) -> int:
    """Put back the trained statistics of norms whose calls did not match, warn about them
    and about uncertain estimates; the number of norms corrected."""
    broken = sorted(name for name, f in fixes.items() if f.broken)
    for name in broken:  # calls did not match: keep the statistics as trained
        f = fixes[name]
        with torch.no_grad():
            f.module.running_mean.copy_(f.base_mean)
            f.module.running_var.copy_(f.base_var)
    if broken:
        warnings.warn(
            f"BatchNorm correction skipped for {', '.join(broken[:5])}: the pruned model calls them differently from "
            "the original on the calibration data; their statistics stay as trained",
            RuntimeWarning,
            stacklevel=4,
        )
    uncertain = sorted(name for name, f in fixes.items() if f.uncertain and not f.broken)
    if uncertain:
        more = f" and {len(uncertain) - 5} more" if len(uncertain) > 5 else ""
        warnings.warn(
            f"BatchNorm correction uncertain for {', '.join(uncertain[:5])}{more}: the calibration data gives them "
            "too few values per channel to tell a change from noise, so their statistics were moved only part of "
            "the way (or not at all) from the trained ones; calibrate on more or larger batches",
            RuntimeWarning,
            stacklevel=4,
        )
    return len(fixes) - len(broken)
