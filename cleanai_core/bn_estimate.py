"""The BatchNorm correction's estimate of a pruned norm's running statistics, per channel.

Glossary:

- *trained statistics* ``m_t, v_t``: the running mean and variance the model was trained
  with (kept channels), the statistics of the original model's norm input on the data it
  was trained for.
- *calibration moments*: mean and variance of the norm input on the calibration data, in
  the original (``m_o, v_o``) and in the pruned model (``m_p, v_p``), all values of a channel.
- *pair*: the original's and the pruned model's input at the same positions of the same
  batches (a fixed, evenly spaced sample of at most :data:`SAMPLE_ROWS` positions per
  call), from which their correlation ``r`` per channel is measured.

**The estimate is the regression (control-variate) estimator of survey sampling.** The
original's input ``x_o`` is an auxiliary variable whose statistics on the target data are
known (the trained ones); the pruned input ``x_p`` is regressed on it,
``x_p = a + b x_o + e`` with ``b = r sqrt(v_p / v_o)`` and ``var(e) = (1 - r^2) v_p``, and
the target statistics of ``x_p`` follow from the known ones of ``x_o``:

``mean = m_p + b (m_t - m_o)``
``var  = (1 - r^2) v_p + b^2 v_t``

- Where pruning changed nothing (dead units), ``x_p = x_o``: ``r = 1``, ``b = 1``, and the
  estimate is the trained statistics exactly.
- Where pruning rescaled and shifted a channel (``r = 1``), it is the trained statistics
  carried through that affine map, so the norm's output is the original's
  (``var = v_t v_p / v_o``, the ratio the shift used before).
- Where pruning left a channel unrelated to what it was (``r -> 0``), the trained
  statistics say nothing about it and the estimate goes to the calibration data's own
  (``m_p, v_p``, what train-mode recalibration measured).

Where the original's channel is constant on the calibration data (``v_o <= eps``) nothing
relates the two, and the statistics are moved by the difference: ``m_t + m_p - m_o``,
``v_t + v_p - v_o``.

**Few values per channel** (a norm after global pooling at batch size 1 sees one value per
channel per batch): the estimate has sampling noise ``s^2`` per channel. For the mean it
blends, by the same weight ``w`` as the estimate (the weight of the regression against the
plain shift, ``1 / (1 + J)`` with ``J`` the divergence of the trained statistics from the
original's calibration moments), the shift's ``var(x_p - x_o) / n`` and the regression's
at the trained mean, ``var(e) / n (1 + (m_t - m_o)^2 / v_o)``, in standard deviations
(the leverage alone made a random-weight RegNet, whose trained statistics describe nothing,
shrink every late norm back to them: its output blew up by 1e8); for the
log variance, ``2 trigamma((n - 1) / 2)`` (the variance of the log of a sample variance
from ``n`` values, twice for a ratio) times the share of ``v_p`` the original does not
explain. ``r`` itself is taken one standard error (Fisher's z) toward 0, so that three
points that happen to lie on a line are not believed. Each norm's changes from the trained
statistics are shrunk toward 0 (empirical Bayes, as James-Stein): a channel's change ``d``
becomes ``d t^2 / (t^2 + s^2)``, where ``t^2`` is the spread of the true changes over the
norm's channels, estimated as the mean of ``d^2 - s^2`` over all channels but the one
where it is largest (at least 0), so that one wild channel does not set it. A change
measured without noise (``r = 1``) is kept whole; a norm whose changes are within their
noise stays as trained. A norm where most of the change is noise of at least
:data:`UNRESOLVED` is reported *uncertain*.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from cleanai_core.calibration import finite_moments, finite_moments_of

__all__ = [
    "SAMPLE_ROWS",
    "Estimate",
    "Prepared",
    "correlation",
    "estimate",
    "estimate_prepared",
    "pair_moments",
    "prepare",
    "sample_rows",
]

#: positions per call at which the original's and the pruned model's norm inputs are paired
SAMPLE_ROWS = 256

#: the most bytes of a pair's three samples that :func:`pair_moments` joins into one tensor
#: to reduce them in one call (256 rows of up to 341 float32 channels)
PAIR_JOINED_BYTES = 1 << 20

#: a norm is reported uncertain where most of its change is noise and that noise is at
#: least this (the variance of a change of the mean in trained standard deviations, or of
#: the log variance): changes of half a standard deviation or a factor 1.65 cannot be told
UNRESOLVED = 0.25

#: a divergence (nats, beyond sampling's) from which the trained statistics are taken not to
#: describe the calibration data (a mean 1 standard deviation off, or a variance 3.7x):
#: below it, shrinking toward them is trusted fully (a trained model on its own kind of
#: data, also at three values per channel, where the trained statistics are 1-2.3x off)
FOREIGN = 1.0

#: per channel: (count, mean, M2) of the original's sample, of the pruned's, of their difference
Pair = list

# the constants of the estimate's ``torch.where``s, comparisons and ``1 - x``: a 0-d tensor costs
# 0.5-1.5 us less than a Python number (an ``int`` most), and ``x.abs() < inf`` is ``isfinite``
# (NaN compares False) at two cheap operations instead of its four
_ZERO, _ONE, _INF, _NEG_INF = (torch.tensor(v, dtype=torch.float64) for v in (0.0, 1.0, math.inf, -math.inf))


def sample_rows(x: Any) -> torch.Tensor | None:
    """A norm input as ``(rows, C)`` float32 at fixed positions: every position when there
    are at most :data:`SAMPLE_ROWS`, else that many evenly spaced (the same for every
    tensor of the same shape); None where there is nothing to pair."""
    if not isinstance(x, torch.Tensor) or x.ndim == 0 or not x.is_floating_point() or x.numel() == 0:
        return None
    x = x.detach()
    if x.ndim == 1:
        return x.reshape(1, -1).float()
    n, c = x.shape[:2]
    s = x[0, 0].numel()
    idx = None if n * s <= SAMPLE_ROWS else _positions(n * s, x.device)
    last = x.movedim(1, -1)
    if last.is_contiguous():  # channels innermost (channels-last): positions are rows of a view
        rows = last.view(n * s, c)
        return (rows if idx is None else rows.index_select(0, idx)).float()  # 3-4x faster than rows[idx]
    x3 = x.reshape(n, c, -1)  # channels first: index positions without transposing the whole input
    return (x3.transpose(1, 2).reshape(n * s, c) if idx is None else x3[idx // s, :, idx % s]).float()


@functools.lru_cache(maxsize=256)
def _positions(total: int, device: torch.device) -> torch.Tensor:
    """:data:`SAMPLE_ROWS` evenly spaced positions of ``total`` (made once per size and device)."""
    return torch.linspace(0, total - 1, SAMPLE_ROWS, device=device).long()


def pair_moments(orig: torch.Tensor, pruned: torch.Tensor) -> Pair | None:
    """The pair's moments from the two samples of one call (the original's restricted to
    the kept channels); None where they do not match or a value is not finite. Each of
    the three samples (original, pruned, their difference) is reduced by the statistics
    kernel of :func:`~cleanai_core.calibration.finite_moments` (two passes per channel,
    in the samples' precision, each channel alone: the same bits however the three are
    laid side by side). Up to :data:`PAIR_JOINED_BYTES` the three are joined along the
    channels and reduced by one call (256 rows: 120 channels 64 -> 30 us, 480 channels
    150 -> 106 us, and a third of the operations, which cost most between the pruned
    model's layers); wider, each is reduced alone (at 2048 channels 4x faster than stacking
    the three and reducing the stack, and 1.5x faster than the joined copy, which no
    longer fits the cache)."""
    if orig.shape != pruned.shape:
        return None
    diff = pruned - orig
    if orig.ndim != 2 or 3 * orig.numel() * orig.element_size() > PAIR_JOINED_BYTES:
        return finite_moments_of([orig, pruned, diff], 1)
    got = finite_moments(torch.cat([orig, pruned, diff], 1), 1)
    if got is None:
        return None
    n, mean, m2 = got
    return [(n, a, b) for a, b in zip(mean.view(3, -1).unbind(), m2.view(3, -1).unbind(), strict=True)]


def correlation(pair: Pair) -> torch.Tensor:
    """The signed correlation of the original's and the pruned input per channel: 1 where
    they were equal at every paired position, 0 where either is constant but they differ."""
    (_, _, m2_o), (_, _, m2_p), (_, _, m2_d) = pair
    co = (m2_o + m2_p - m2_d).mul_(0.5)  # the co-moment; exactly m2_o where the difference is 0
    both = (m2_o > _ZERO) & (m2_p > _ZERO)
    r = torch.where(both, co.div_((m2_o * m2_p).clamp_min_(1e-300).sqrt_()), _ZERO).clamp_(-1.0, 1.0)
    return torch.where(m2_d == _ZERO, _ONE, r)


class Estimate:
    """One norm's estimated statistics (float64, CPU) and whether they were uncertain
    (worked out when asked: the correction's per-call estimates mostly are not)."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, uncertain: bool | tuple = False) -> None:
        self.mean, self.var, self._uncertain = mean, var, uncertain

    @property
    def uncertain(self) -> bool:
        if isinstance(self._uncertain, tuple):
            self._uncertain = _unresolved(*self._uncertain)
        return self._uncertain


def _shrinkage(change: torch.Tensor, noise: torch.Tensor, finite: torch.Tensor | None = None) -> torch.Tensor:
    """Per row (the mean's changes, the log variance's) and channel the factor ``t^2 /
    (t^2 + noise)`` for ``change`` (1 where the noise is 0 or not a number, 0 where it is
    infinite), ``t^2`` the row's spread (see the module doc). Masked sums over both rows at
    once rather than boolean indexing and a sort, and the two rows' spreads worked out as
    Python floats from one read of the three sums (the same float64 arithmetic): this runs
    on every norm call of the correction pass (C-sized vectors, where each op's overhead
    is the cost). ``finite``: where ``change`` is finite, if the caller has it."""
    if finite is None:
        finite = change.abs() < _INF
    noisy = noise > _ZERO
    known = noisy & (noise < _INF) & finite  # noise > 0: finite where below inf
    # the mean of change^2 - noise without the largest channel: one wild channel does not set it
    excess = torch.where(known, change.square() - noise, _ZERO)
    top = torch.where(known, excess, _NEG_INF).amax(1)
    spreads = []
    for k, total, largest in zip(known.sum(1).tolist(), excess.sum(1).tolist(), top.tolist(), strict=True):
        spread = (total - largest) / (k - 1) if k > 1 else total  # k == 0: total is 0
        spreads.append([spread if math.isfinite(spread) and spread > 0 else 0.0])
    spread = torch.tensor(spreads, dtype=torch.float64)
    factor = torch.where(noisy, spread / (spread + noise), _ONE)
    return factor.nan_to_num_(0.0, 0.0, 0.0)  # inf noise: no trust


def _unresolved(change: torch.Tensor, noise: torch.Tensor, factor: torch.Tensor) -> bool:
    """Whether, in either row, most of the change of the moved channels is noise
    (the mean factor under 0.5) and that noise is at least :data:`UNRESOLVED`."""
    for d, s, k in zip(change, noise, factor, strict=True):
        moved = d != 0
        m = int(moved.sum())
        if m == 0 or not bool((s > 0).any()):
            continue
        unresolved = float(torch.where(moved, s.clamp_max(1e300), 0.0).sum()) / m
        if float(torch.where(moved, k, 0.0).sum()) / m < 0.5 and unresolved >= UNRESOLVED:
            return True
    return False


def _trigamma(x: float) -> float:
    """The trigamma function (the variance of the log of a gamma variable of shape ``x``)."""
    acc = 0.0
    while x < 6:
        acc, x = acc + 1 / x**2, x + 1
    return acc + 1 / x + 1 / (2 * x**2) + 1 / (6 * x**3) - 1 / (30 * x**5) + 1 / (42 * x**7)


def _divergence(v_t: torch.Tensor, v_o: torch.Tensor, off_sq: torch.Tensor) -> torch.Tensor:
    """The symmetric Kullback-Leibler divergence (Jeffreys) between normals with the trained
    statistics and with the original's calibration moments, per channel (nats), from the
    two variances (``eps`` added) and the squared difference of the means."""
    return (v_t / v_o + v_o / v_t - 2 + off_sq * (v_t.reciprocal() + v_o.reciprocal())) * 0.5


#: up to this many values per channel the null divergence is simulated at the count itself;
#: beyond it, scaled from this count (it falls as ``1 / n``: both of its terms are squared
#: standardised sampling errors)
NULL_SIMULATED_UP_TO = 1024


def _null_divergence(n: int, channels: int) -> float:
    """What sampling alone gives for the median over ``channels`` channels of the divergence
    (:func:`_divergence`) of ``n`` values' moments from the statistics they were drawn
    from: its 90th percentile (large for a few values over a few channels, about ``1.5 / n``
    for many). Simulated once per ``(n, channels)`` from a fixed seed (:func:`_simulated_null`),
    at most 256 channels (the median of more varies less: the threshold stays on the safe
    side) and :data:`NULL_SIMULATED_UP_TO` values, scaled by ``1 / n`` beyond."""
    if n <= 1:
        return math.inf
    top = NULL_SIMULATED_UP_TO
    return _simulated_null(min(n, top), max(1, min(channels, 256))) * (top / n if n > top else 1.0)


def _simulated_null(n: int, channels: int) -> float:
    """:func:`_null_divergence` drawn: the moments sampled directly (the mean normal, the
    variance chi-square), 1001 times over the first ``channels`` of 256 channels drawn
    once per ``n`` (:func:`_null_draws`: the draws, not their medians, are what cost)."""
    return _null_quantile(n, channels)


@functools.cache
def _null_quantile(n: int, channels: int) -> float:
    divergence = _null_draws(n)[:, :channels]
    return float(divergence.median(1).values.quantile(0.9))


@functools.lru_cache(maxsize=64)
def _null_draws(n: int) -> torch.Tensor:
    """The divergences of 1001 x 256 simulated channels of ``n`` values each (seeded)."""
    g = torch.Generator().manual_seed(0)
    shape = (1001, 256)
    mean = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(n)
    chi2 = torch._standard_gamma(torch.full(shape, (n - 1) / 2, dtype=torch.float64), generator=g) * 2
    one = torch.ones((), dtype=torch.float64)
    return _divergence(one, chi2 / n, mean.square())


def _trust(divergence: torch.Tensor, n: float) -> float:
    """How far one norm's trained statistics describe the calibration data (1: as well as
    ``n`` values per channel can tell, toward 0: not at all), from the median over its
    channels of the divergence beyond what sampling alone gives, once that excess passes
    :data:`FOREIGN`. Changes are shrunk toward the trained statistics only by this much:
    a random-weight model's trained statistics (0 and 1) describe nothing (a median
    divergence of 3-75 on a RegNet at batch size 1, where sampling gives 0.01-0.2), and
    shrinking toward them compounded down its chain of norms until its output was off by
    1e9."""
    if divergence.numel() == 0:
        return 0.0
    return _trust_of(float(divergence.median()), divergence.numel(), n)


def _trust_of(median: float, channels: int, n: float) -> float:
    """:func:`_trust` from the median divergence over ``channels`` channels of ``n`` values."""
    excess = median - _null_divergence(int(n), channels)
    return 1.0 / (1.0 + max(excess - FOREIGN, 0.0)) if math.isfinite(excess) else 1.0


class Prepared:
    """The original's side of one norm call for :func:`estimate_prepared`: the trained
    statistics, the original's calibration moments (kept channels) and every term of the
    estimate that depends on them alone, worked out before the pruned model runs
    (:func:`prepare`), for all the calls of a norm at once where their moments are known.
    ``trust`` is a float (one call) or a list (one per row, :func:`prepare` on stacked calls)."""

    __slots__ = (
        "base_mean", "base_var", "eps", "n", "mean", "m2", "var", "related", "var_c", "off", "v_t", "sd_t", "w",
        "w_zero", "lever1", "trust",
    )  # fmt: skip

    def rows(self) -> list[Prepared]:
        """One :class:`Prepared` per row of one made from stacked calls (views, no copies)."""
        out = []
        per_row = [getattr(self, f).unbind(0) for f in _ROW_FIELDS]
        for i, fields in enumerate(zip(*per_row, strict=True)):
            p = Prepared()
            p.base_mean, p.base_var, p.eps, p.v_t, p.sd_t = self.base_mean, self.base_var, self.eps, self.v_t, self.sd_t
            p.n, p.trust = self.n[i], self.trust[i]
            for f, t in zip(_ROW_FIELDS, fields, strict=True):
                setattr(p, f, t)
            out.append(p)
        return out


#: the fields of :class:`Prepared` that hold one row per call (the others are the norm's)
_ROW_FIELDS = ("mean", "m2", "var", "related", "var_c", "off", "w", "w_zero", "lever1")


def prepare(base_mean: torch.Tensor, base_var: torch.Tensor, eps: float, orig: tuple) -> Prepared:
    """The terms of the estimate that depend on the trained statistics and the original's
    moments ``(count, mean, M2)`` alone (see :func:`estimate`). ``orig`` may hold one call
    (``mean`` of shape ``(C,)``, a float count) or several stacked (``(K, C)``, a list of
    K counts): then :meth:`Prepared.rows` gives each call's, the same as one call's alone."""
    n_o, mean_o, m2_o = orig
    p = Prepared()
    stacked = mean_o.ndim == 2
    counts = torch.tensor(n_o, dtype=torch.float64).unsqueeze(1) if stacked else n_o
    p.base_mean = base_mean.to(torch.float64).cpu()  # no copy where the caller keeps them so
    p.base_var = base_var.to(torch.float64).cpu()
    p.eps, p.n, p.mean, p.m2 = eps, n_o, mean_o, m2_o
    p.var = var_o = m2_o / counts
    p.related = related = var_o > eps
    p.var_c = var_c = var_o.clamp_min(eps)
    p.off = off = p.base_mean - mean_o
    off_sq = off.square()
    p.v_t = v_t = p.base_var + eps
    p.sd_t = v_t.sqrt()
    # the divergence (Jeffreys) of the trained statistics from the original's calibration moments
    divergence = _divergence(v_t, var_o + eps, off_sq)
    p.w = w = torch.where(related, (divergence + 1).reciprocal_(), _ZERO)
    p.w_zero = w == 0
    # the regression's leverage at the trained mean, plus 1 (0 where the original is constant)
    p.lever1 = torch.where(related, off_sq / var_c, _ZERO).add_(1)
    if not stacked:
        p.trust = _trust(divergence[related], n_o)
        return p
    # each call's median over its related channels (the lower middle value, as ``median``;
    # a NaN among them makes it NaN, as it does ``median``'s)
    medians = torch.where(related, divergence, math.nan).nanmedian(1).values
    medians = medians.masked_fill_((related & divergence.isnan()).any(1), math.nan).tolist()
    p.trust = [_trust_of(m, k, n) if k else 0.0 for m, k, n in zip(medians, related.sum(1).tolist(), n_o, strict=True)]
    return p


def estimate(
    base_mean: torch.Tensor, base_var: torch.Tensor, eps: float, pruned: tuple, orig: tuple, pair: Pair | None
) -> Estimate:
    """The statistics of a pruned norm from the trained ones, the pruned and original
    moments ``(count, mean, M2)`` on the same data and the ``pair``'s moments (see the
    module doc). ``pair`` None (not paired): the statistics are moved by the difference
    (mean) and the ratio (variance), unshrunk. :func:`prepare` then
    :func:`estimate_prepared`."""
    return estimate_prepared(prepare(base_mean, base_var, eps, orig), pruned, pair)


def estimate_prepared(p: Prepared, pruned: tuple, pair: Pair | None) -> Estimate:
    """:func:`estimate` from the original's side worked out before (:func:`prepare`).

    This runs at every norm call of the correction's first pass, on vectors of a few
    hundred channels where each operation's overhead is the cost: the formulas are
    written with as few operations as they take (the mean's and the log variance's
    shrinkage in one stacked pass, ``w = 0`` and ``r = 0`` where the original is constant
    folded into the masks that say so), and what does not depend on the pruned model is
    in ``p``."""
    n, mean_p, m2_p = pruned
    base_mean, base_var, eps, related = p.base_mean, p.base_var, p.eps, p.related
    var_p = m2_p / n
    ratio = var_p / p.var_c  # read only where related
    shift_mean = (mean_p - p.mean).add_(base_mean)
    shift_var = torch.where(related, base_var * ratio, (var_p - p.var).add_(base_var)).clamp_min_(0.0)
    if pair is None or pair[0][1] is None:
        return Estimate(shift_mean, shift_var)
    n_d, _, m2_dd = pair[2]
    r = torch.where(related, correlation(pair), _ZERO)  # 0 where the original is constant
    # the regression x_p = a + slope x_o + e: its estimate at the trained statistics (in place
    # where a term is not read again: fewer fresh tensors, which cost most with cold caches)
    slope = ratio.sqrt_().mul_(r)
    resid = (_ONE - r.square()).clamp_min_(0.0).mul_(var_p)  # (1 - r^2) var_p: what the original does not predict
    reg_mean = (slope * p.off).add_(mean_p)
    reg_var = slope.square_().mul_(base_var).add_(resid)
    w = p.w
    mean = reg_mean.sub_(shift_mean).mul_(w).add_(shift_mean)
    var = torch.where(p.w_zero, shift_var, reg_var.sub_(shift_var).mul_(w).add_(shift_var))
    # the sampling noise of the changes from the trained statistics, in the trained units
    scale = p.v_t
    moved_mean = mean - base_mean
    change = torch.stack([moved_mean / p.sd_t, (var + eps).div_(scale).log_()])
    if n > 1:  # of the fitted line at the trained mean: residual / n times (1 + leverage)
        resid = torch.where(related, (_ONE - _lower_correlation_sq(r, n_d)).mul_(var_p), m2_dd / n_d)
        # the mean blends the shift (noise: the paired difference's variance / n) and the
        # regression (its residual / n times 1 + leverage) by ``w``; so does its noise (in
        # standard deviations: the two errors share ``m_p``'s). Where the trained statistics
        # do not describe the calibration data (``w`` -> 0) the regression's leverage at
        # the trained mean is large but the estimate does not rely on it.
        sd_shift = (m2_dd / (n_d * n)).div_(scale).sqrt_()
        sd_reg = (resid * p.lever1).div_(n * scale).sqrt_()
        # the log of a variance from n values varies by trigamma((n - 1) / 2); a ratio of two, twice that
        noise_var = (resid / var_p.clamp_min(eps)).clamp_max_(1.0).mul_(2 * _trigamma((n - 1) / 2))
        noise = torch.stack([sd_reg.sub_(sd_shift).mul_(w).add_(sd_shift).square_(), noise_var])
    else:  # one value per channel: no measure of the noise, so no change is trusted
        noise = torch.full_like(change, math.inf).masked_fill_(change == 0, 0.0)
    finite = change.abs() < _INF
    factor = _shrinkage(change, noise, finite)
    # shrink toward the trained statistics only as far as they describe the calibration data
    k = _ONE - (_ONE - factor).mul_(p.trust)  # 1 - trust (1 - factor)
    # a change too large for float64 (a model whose activations overflow) is left unshrunk
    keep_mean, keep_var = ((k == _ONE) | ~finite).unbind()
    k_mean, k_var = k.unbind()
    new_mean = torch.where(keep_mean, mean, (k_mean * moved_mean).add_(base_mean))
    new_var = torch.where(keep_var, var, (k_var * change[1]).exp_().mul_(scale).sub_(eps).clamp_min_(0.0))
    return Estimate(new_mean, new_var, (change, noise, factor))


def _lower_correlation_sq(r: torch.Tensor, n: float) -> torch.Tensor:
    """The square of the correlation one standard error closer to 0 (Fisher's z, ``1 /
    sqrt(n - 3)``; 0 for ``n <= 3``); an exact 1 stays 1 (the inputs were equal)."""
    if n <= 3:
        return torch.where(r.abs() == 1, 1.0, 0.0).to(r.dtype) if n > 1 else torch.zeros_like(r)
    return r.abs().clamp_max_(1.0).atanh_().sub_(1 / math.sqrt(n - 3)).clamp_min_(0.0).tanh_().square_()
