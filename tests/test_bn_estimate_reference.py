"""The BatchNorm correction's per-call estimate, written with as few operations as it takes
(:func:`cleanai_core.bn_estimate.estimate`), against a plain reference written here from
the module doc's formulas, one quantity at a time: the same statistics to 1e-12 relative
and the same uncertainty, on random moments of every kind (few or many values per
channel, constant and unchanged channels, one channel far off, overflowing changes), and
the same running statistics after a whole correction of small CNNs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from cleanai_core import bn_correction, bn_estimate
from cleanai_core.bn_estimate import _null_divergence, _trigamma
from cleanai_core.calibration import finite_moments, finite_moments_of


def _shrink(change, noise):
    """Per channel ``t^2 / (t^2 + noise)`` and the norm's uncertainty, plainly."""
    noisy = noise > 0
    if not noisy.any():
        return torch.ones_like(change), False
    known = noisy & torch.isfinite(noise) & torch.isfinite(change)
    excess = (change.square() - noise)[known]
    if excess.numel() > 1:
        spread = float((excess.sum() - excess.max()) / (excess.numel() - 1))
    else:
        spread = float(excess.sum())
    spread = spread if math.isfinite(spread) and spread > 0 else 0.0
    factor = torch.ones_like(change)
    factor[noisy] = spread / (spread + noise[noisy])
    factor[~torch.isfinite(factor)] = 0.0
    moved = change != 0
    if not moved.any():
        return factor, False
    unresolved = float(noise[moved].clamp_max(1e300).mean())
    return factor, bool(float(factor[moved].mean()) < 0.5 and unresolved >= 0.25)


def _reference(base_mean, base_var, eps, pruned, orig, pair):
    """The estimate, the module doc's formulas one by one."""
    (n, m_p, m2_p), (n_o, m_o, m2_o) = pruned, orig
    m_t, v_t = base_mean.double(), base_var.double()
    v_p, v_o = m2_p / n, m2_o / n_o
    related = v_o > eps
    shift_mean = m_t + m_p - m_o
    shift_var = torch.where(related, v_t * v_p / v_o.clamp_min(eps), v_t + v_p - v_o).clamp_min(0)
    if pair is None:
        return shift_mean, shift_var, False
    (_, _, a), (_, _, b), (n_d, _, d) = pair
    co = (a + b - d) / 2
    r = torch.zeros_like(co)
    both = (a > 0) & (b > 0)
    r[both] = (co[both] / (a[both] * b[both]).sqrt()).clamp(-1, 1)
    r[d == 0] = 1.0
    r[~related] = 0.0
    slope = r * (v_p / v_o.clamp_min(eps)).sqrt()
    resid = (1 - r**2).clamp_min(0) * v_p
    reg_mean, reg_var = m_p + slope * (m_t - m_o), resid + slope**2 * v_t
    vt, vo = v_t + eps, v_o + eps
    jeffreys = 0.5 * (vt / vo + vo / vt - 2 + (m_t - m_o) ** 2 * (1 / vt + 1 / vo))
    w = torch.where(related, 1 / (1 + jeffreys), torch.zeros_like(r))
    mean = shift_mean + w * (reg_mean - shift_mean)
    var = torch.where(w == 0, shift_var, shift_var + w * (reg_var - shift_var))
    d_mean, d_var = (mean - m_t) / vt.sqrt(), torch.log((var + eps) / vt)
    if n > 1:
        if n_d > 3:
            r_low = torch.tanh((torch.atanh(r.abs().clamp_max(1)) - 1 / math.sqrt(n_d - 3)).clamp_min(0))
        else:
            r_low = torch.where(r.abs() == 1, 1.0, 0.0).double() if n_d > 1 else torch.zeros_like(r)
        res = torch.where(related, (1 - r_low**2) * v_p, d / n_d)
        lever = torch.where(related, (m_t - m_o) ** 2 / v_o.clamp_min(eps), torch.zeros_like(r))
        sd_shift, sd_reg = (d / n_d / n / vt).sqrt(), (res / n * (1 + lever) / vt).sqrt()
        noise_mean = ((1 - w) * sd_shift + w * sd_reg) ** 2
        noise_var = 2 * _trigamma((n - 1) / 2) * (res / v_p.clamp_min(eps)).clamp_max(1)
    else:
        noise_mean = torch.where(d_mean == 0, 0.0, math.inf).double()
        noise_var = torch.where(d_var == 0, 0.0, math.inf).double()
    k_mean, u_mean = _shrink(d_mean, noise_mean)
    k_var, u_var = _shrink(d_var, noise_var)
    div = jeffreys[related]
    trust = 0.0
    if div.numel():
        excess = float(div.median()) - _null_divergence(int(n_o), div.numel())
        trust = 1 / (1 + max(excess - 1.0, 0.0)) if math.isfinite(excess) else 1.0
    k_mean, k_var = 1 - trust * (1 - k_mean), 1 - trust * (1 - k_var)
    keep_mean, keep_var = (k_mean == 1) | ~torch.isfinite(d_mean), (k_var == 1) | ~torch.isfinite(d_var)
    new_mean = torch.where(keep_mean, mean, m_t + k_mean * (mean - m_t))
    new_var = torch.where(keep_var, var, (vt * (k_var * d_var).exp() - eps).clamp_min(0))
    return new_mean, new_var, u_mean or u_var


def _triple(x):
    """``(count, mean, M2)`` per row of ``x`` (channels, values), float64."""
    return float(x.shape[1]), x.mean(1), x.var(1, correction=0) * x.shape[1]


def _case(seed: int, values: int, channels: int, kind: str):
    g = torch.Generator().manual_seed(seed)
    x_o = torch.randn(channels, values, generator=g, dtype=torch.float64) * 2 + 1
    mix = torch.rand(channels, 1, generator=g, dtype=torch.float64)
    x_p = mix * x_o + (1 - mix) * torch.randn(channels, values, generator=g, dtype=torch.float64) + 0.3
    base_mean = torch.randn(channels, generator=g) * 0.5 + 1
    base_var = torch.rand(channels, generator=g) * 4 + 0.5
    if kind == "dead":  # half the channels unchanged, a few constant in the original
        x_p[::2] = x_o[::2]
        x_o[1::5], x_p[1::5] = 3.0, 3.0
    elif kind == "foreign":  # trained statistics that describe nothing
        base_mean, base_var = torch.zeros(channels), torch.ones(channels) * 1e-3
    elif kind == "wild":  # one channel far off, one overflowing
        x_p[0] *= 1e4
        base_var[1] = 1e-300
    elif kind == "noise":  # the pruned input unrelated
        x_p = torch.randn(channels, values, generator=g, dtype=torch.float64)
    rows = min(values, 7)
    pair = [list(_triple(x_o[:, :rows])), list(_triple(x_p[:, :rows])), list(_triple(x_p[:, :rows] - x_o[:, :rows]))]
    return base_mean, base_var, 1e-5, _triple(x_p), _triple(x_o), pair


@pytest.mark.parametrize("kind", ["plain", "dead", "foreign", "wild", "noise"])
@pytest.mark.parametrize("values", [1, 2, 3, 4, 6, 40, 3000])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_estimate_equals_the_reference(kind, values, seed):
    args = _case(seed, values, 24, kind)
    for pair in (args[5], None):
        got = bn_estimate.estimate(*args[:5], pair)
        mean, var, uncertain = _reference(*args[:5], pair)
        assert got.mean.dtype == got.var.dtype == torch.float64
        for a, b in ((got.mean, mean), (got.var, var)):
            finite = torch.isfinite(b)
            assert torch.equal(finite, torch.isfinite(a))
            torch.testing.assert_close(a[finite], b[finite], rtol=1e-12, atol=1e-300)
        assert got.uncertain == uncertain


def test_the_reference_cases_reach_every_branch():
    """The cases above shrink changes, leave some whole and find some norms uncertain."""
    flags, shrunk = set(), set()
    for kind in ("plain", "dead", "foreign", "wild", "noise"):
        for values in (1, 2, 3, 4, 6, 40):
            args = _case(0, values, 24, kind)
            mean, var, uncertain = _reference(*args)
            shift_mean, _, _ = _reference(*args[:5], None)
            flags.add(uncertain)
            shrunk.add(bool(((mean - args[0].double()).abs() < (shift_mean - args[0].double()).abs() - 1e-9).any()))
    assert flags == {True, False} and shrunk == {True, False}


def test_the_three_moments_of_a_pair_are_each_ones_own():
    """:func:`finite_moments_of` gives each tensor's :func:`finite_moments` bit for bit."""
    g = torch.Generator().manual_seed(0)
    for rows, c in ((1, 5), (3, 17), (256, 480), (256, 7)):
        o = torch.randn(rows, c, generator=g) * 3 + 1
        p = o + torch.randn(rows, c, generator=g) * 0.1
        p[:, ::3] = o[:, ::3]
        together = finite_moments_of([o, p, p - o], 1)
        for x, got in zip((o, p, p - o), together, strict=True):
            alone = finite_moments(x, 1)
            assert got[0] == alone[0] and torch.equal(got[1], alone[1]) and torch.equal(got[2], alone[2])
        assert not together[2][2][::3].any()  # unchanged channels: a difference of exactly 0
    bad = torch.ones(4, 3)
    bad[0, 0] = math.nan
    assert finite_moments_of([torch.ones(4, 3), bad], 1) is None


class _Cnn(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c3, self.b3 = nn.Conv2d(width, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y))) + y
        return self.b3(self.c3(y))


@pytest.mark.parametrize(("batch", "batches"), [(1, 3), (4, 3), (16, 2)])
def test_a_correction_gives_the_reference_running_statistics(batch, batches, monkeypatch):
    """A whole correction (first pass batch by batch, paired with the original) of a CNN
    whose middle layer was perturbed: the running statistics equal those of the same
    correction with the reference estimate, to 1e-9 relative."""
    torch.manual_seed(batch)
    model = _Cnn(12).train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(8, 3, 10, 10))
    model.eval()
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.c2.weight.mul_(torch.rand_like(pruned.c2.weight) + 0.5)
        pruned.c1.weight[:4] = 0.0
    g = torch.Generator().manual_seed(batch)
    data = [torch.randn(batch, 3, 10, 10, generator=g) for _ in range(batches)]
    results = []
    for use_reference in (False, True):
        target = copy.deepcopy(pruned)
        moments: dict = {}
        with bn_correction.recording(model, moments), torch.no_grad():
            for b in data:
                model(b)
        used = []

        def reference(*args):
            used.append(len(args))
            return bn_estimate.Estimate(*_reference(*args))

        def reference_prepared(p, pruned, pair):  # the per-call estimate from the original's prepared side
            return reference(p.base_mean, p.base_var, p.eps, pruned, (p.n, p.mean, p.m2), pair)

        with monkeypatch.context() as m:
            if use_reference:
                m.setattr(bn_correction, "estimate", reference)
                m.setattr(bn_correction, "estimate_prepared", reference_prepared)
            bn_correction.correct_batchnorm(target, moments, {}, lambda: iter(data), lambda m, b: m(b), original=model)
        assert len(used) == (3 * batches + (3 if batches > 1 else 0) if use_reference else 0)  # every call, every norm
        results.append({k: v for k, v in target.state_dict().items() if "running" in k})
    for key, want in results[1].items():
        torch.testing.assert_close(results[0][key], want, rtol=1e-9, atol=1e-12, msg=key)
    assert not torch.equal(results[0]["b2.running_var"], model.b2.running_var)  # the correction moved it


@pytest.mark.parametrize("values", [1, 3, 40, 3000])
def test_the_calls_of_a_norm_prepared_together_equal_each_prepared_alone(values):
    """The original's side of the estimate (:func:`bn_estimate.prepare`) made for all of a
    norm's calls stacked, as the correction does before its pass, gives each call the same
    terms and trust as that call alone, and so the same estimate: bit for bit, also where a
    call has no related channel (trust 0) or a median over an even count of channels."""
    cases = [_case(seed, values + seed, 24, kind) for seed, kind in enumerate(("plain", "dead", "foreign", "noise"))]
    base_mean, base_var, eps = cases[0][:3]
    origs = [c[4] for c in cases]
    const = (float(values), torch.full((24,), 2.0, dtype=torch.float64), torch.zeros(24, dtype=torch.float64))
    origs.append(const)  # constant everywhere in the original: nothing related
    odd = (origs[0][0], origs[0][1], origs[0][2].clone())
    odd[2][:5] = 0.0  # 19 related channels: an odd count
    origs.append(odd)
    stacked = bn_estimate.prepare(
        base_mean,
        base_var,
        eps,
        ([o[0] for o in origs], torch.stack([o[1] for o in origs]), torch.stack([o[2] for o in origs])),
    )
    rows = stacked.rows()
    assert rows[-2].trust == 0.0
    for row, orig, case in zip(rows, origs, cases + cases[:2], strict=True):
        alone = bn_estimate.prepare(base_mean, base_var, eps, orig)
        assert row.trust == alone.trust and row.n == alone.n
        for field in ("mean", "m2", "var", "related", "var_c", "off", "w", "w_zero", "lever1", "v_t", "sd_t"):
            assert torch.equal(getattr(row, field), getattr(alone, field)), field
        for pair in (case[5], None):
            got = bn_estimate.estimate_prepared(row, case[3], pair)
            want = bn_estimate.estimate(base_mean, base_var, eps, case[3], orig, pair)
            assert torch.equal(got.mean, want.mean) and torch.equal(got.var, want.var)
            assert got.uncertain == want.uncertain


def test_moments_merged_at_once_equal_the_merge_one_call_at_a_time():
    """The correction's totals (:func:`merged_moments`, after its pass) against Chan's merge
    of one call at a time (what it did at every call): equal to 1e-13 relative."""
    from cleanai_core.calibration import _chan_merge, merged_moments

    g = torch.Generator().manual_seed(3)
    parts = []
    for n in (8 * 49, 8 * 49, 3 * 49, 1):
        x = torch.randn(n, 40, generator=g, dtype=torch.float64) * 5 + 100
        parts.append((float(n), x.mean(0), x.var(0, correction=0) * n))
    total: list = [0.0, None, None]
    for p in parts:
        total = list(_chan_merge(*total, *p))
    got = merged_moments(parts)
    assert got[0] == total[0] == sum(p[0] for p in parts)
    torch.testing.assert_close(got[1], total[1], rtol=1e-13, atol=0)
    torch.testing.assert_close(got[2], total[2], rtol=1e-13, atol=0)
    one = merged_moments(parts[:1])
    assert one[0] == parts[0][0] and torch.equal(one[2], parts[0][2]) and one[2] is not parts[0][2]
    assert merged_moments([]) == [0.0, None, None]


def _sequential_totals(parts):
    """The pass's totals the way the correction made them before: Chan's merge at every call."""
    from cleanai_core.calibration import _chan_merge

    total: list = [0.0, None, None]
    for p in parts:
        total = list(_chan_merge(*total, *p))
    return total


def test_the_digits_benchmark_prunes_to_the_same_accuracy_as_the_reference_correction(monkeypatch):
    """The trained digits CNN pruned by half on its calibration split, once with the
    correction as it runs (the original's side prepared before the pass, totals merged after
    it) and once with the plain reference estimate at every call and Chan's merge call by
    call: the same running statistics to 1e-6 relative, the same predictions on the
    evaluation split, and so the same accuracy, which the correction moves from the
    uncorrected model's."""
    from digits_setup import accuracy, splits, trained_cnn

    from cleanai_core import StructuredPruner

    calibration, evaluation = splits()[1], splits()[2]
    batches = [calibration[0][i : i + 32] for i in range(0, 300, 32)]

    def pruned(**kwargs):
        pruner = StructuredPruner(trained_cnn(16), calibration[0][:1], pruning_ratio=0.5, **kwargs)
        pruner.collect_activations(batches, progress=False)
        return pruner.prune()

    fast = pruned()
    calls = []

    def reference(*args):
        calls.append(1)
        return bn_estimate.Estimate(*_reference(*args))

    with monkeypatch.context() as m:
        m.setattr(bn_correction, "estimate", reference)
        m.setattr(
            bn_correction,
            "estimate_prepared",
            lambda p, pruned, pair: reference(p.base_mean, p.base_var, p.eps, pruned, (p.n, p.mean, p.m2), pair),
        )
        m.setattr(bn_correction, "merged_moments", _sequential_totals)
        slow = pruned()
    assert len(calls) == 3 * 8 + 3  # three norms: 8 of the 10 batches (256 samples, spread), then the totals
    plain = pruned(recalibrate_bn=False)
    stats = {k: v for k, v in fast.state_dict().items() if "running_" in k}
    assert len(stats) == 6
    for key, want in ((k, v) for k, v in slow.state_dict().items() if "running_" in k):
        torch.testing.assert_close(stats[key], want, rtol=1e-6, atol=1e-7, msg=key)
    with torch.no_grad():
        assert torch.equal(fast(evaluation[0]).argmax(1), slow(evaluation[0]).argmax(1))
    assert accuracy(fast, evaluation) == accuracy(slow, evaluation)
    assert accuracy(fast, evaluation) != accuracy(plain, evaluation)
    assert not torch.equal(stats["features.4.running_var"], plain.state_dict()["features.4.running_var"])


@pytest.mark.parametrize("channels", [1, 7, 200, 341, 342, 1500])
def test_a_pair_joined_for_one_reduction_gives_each_sample_its_own_moments(channels):
    """:func:`bn_estimate.pair_moments` joins small pairs along the channels for one call of
    the statistics kernel and reduces wide ones alone: either way each of the three samples
    gets its own :func:`finite_moments` bit for bit; a non-finite value anywhere: None."""
    g = torch.Generator().manual_seed(channels)
    o = torch.randn(256, channels, generator=g) * 3 + 1
    p = o * 0.5 + torch.randn(256, channels, generator=g)
    p[:, ::2] = o[:, ::2]
    got = bn_estimate.pair_moments(o, p)
    for x, (n, mean, m2) in zip((o, p, p - o), got, strict=True):
        alone = finite_moments(x, 1)
        assert n == alone[0] == 256.0 and torch.equal(mean, alone[1]) and torch.equal(m2, alone[2])
    assert not got[2][2][::2].any()  # unchanged channels: a difference of exactly 0
    p[3, -1] = math.inf
    assert bn_estimate.pair_moments(o, p) is None
    assert bn_estimate.pair_moments(o, p[:, :-1]) is None if channels > 1 else True


def test_moments_of_values_whose_squares_underflow_are_never_negative():
    """A random-weight MobileViT's BatchNorm inputs are about 1e-24: their squares are below
    float32's range, the one-pass sums gave ``0 - mean^2`` (a negative variance), and the
    correction's square root of it made the pruned model's running mean NaN."""
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 1e-24  # channels-first rows of 64
    n, mean, m2 = finite_moments(x, 1)
    assert n == 128 and bool((m2 >= 0).all())
    torch.testing.assert_close(mean, x.double().mean((0, 2, 3)), rtol=1e-5, atol=0)
