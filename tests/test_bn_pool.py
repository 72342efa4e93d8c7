"""The BatchNorm correction on a stream of unknown length: the batches it reads are drawn
at random while calibration passes (:class:`cleanai_core.replay.Pool`), kept with the
original's norm inputs on them only, so a long generator is corrected in bounded memory
(it was not corrected at all once it outgrew the replay cache)."""

from __future__ import annotations

import warnings

import torch
from test_bn_correction import _data, _trained

from cleanai_core import StructuredPruner, replay
from cleanai_core.bn_correction import norms_with_running_stats
from cleanai_core.replay import Pool


def test_pool_keeps_each_batch_of_a_stream_with_equal_chance():
    """Algorithm R: after n batches each is in a pool of k with probability k / n; seeded,
    so the same stream keeps the same batches."""
    n, k, trials = 20, 4, 3000
    counts = [0] * n
    for seed in range(trials):
        pool = Pool(k, seed=seed)
        for i in range(n):
            slot = pool.slot_for(i)
            if slot is not None:
                pool.put(slot, i, None, None)
        kept = [i for i, _, _ in pool.kept()]
        assert len(kept) == k and kept == sorted(set(kept))
        for i in kept:
            counts[i] += 1
    expected = trials * k / n  # 600, binomial standard deviation ~22
    assert all(abs(c - expected) < 5 * (expected * (1 - k / n)) ** 0.5 for c in counts), counts
    again = Pool(k, seed=5)
    first = Pool(k, seed=5)
    assert [again.slot_for(i) for i in range(n)] == [first.slot_for(i) for i in range(n)]


def test_planned_pool_takes_the_planned_batches_only():
    pool = Pool(0, planned=[0, 3, 6])
    assert [pool.slot_for(i) for i in range(8)] == [0, None, None, 1, None, None, 2, None]


def _stream(batches):
    yield from batches


def _magnitude(model, example, **kw):
    """A plan that does not depend on the data, so two calibrations prune the same units."""
    return StructuredPruner(model, example, "magnitude", pruning_ratio=0.4, ignored_layers=[model.head],
                            bias_compensation=False, reconstruction=False, **kw)  # fmt: skip


def test_a_generator_larger_than_the_cache_is_corrected_on_the_pooled_batches(monkeypatch):
    model = _trained()
    data = _data(12, 4)
    # the replay cache holds 3 of the 12 batches: before the pool, the correction was skipped
    monkeypatch.setattr(replay, "CACHE_BYTES", 3 * data[0].numel() * 4)
    pruner = _magnitude(model, data[0], bn_samples=8)  # 8 samples: a pool of 2 batches of 4
    pruner.collect_activations(_stream(data), progress=False)
    cal = pruner.calibration
    assert cal.data.batches is None and cal.data.pool is not None
    chosen = [i for i, _ in cal.data.pool]
    assert len(chosen) == 2 and chosen == sorted(chosen) and all(0 <= i < 12 for i in chosen)
    # the original's norm inputs were kept on the pooled batches only
    norms = norms_with_running_stats(model)
    assert all(len(cal.moments[name]) == 2 for name in norms)
    assert all(len(calls) == 2 for calls in cal.samples.calls.values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = pruner.prune()
    assert not [w for w in caught if "not corrected" in str(w.message)]  # was: "...were not corrected"
    # the same correction as on a list holding exactly those batches
    monkeypatch.setattr(replay, "CACHE_BYTES", 256 << 20)
    same = _magnitude(model, data[0], bn_samples=8)
    same.collect_activations([data[i] for i in chosen], progress=False)
    expected = same.prune()
    for name in norms:
        got, want = pruned.get_submodule(name), expected.get_submodule(name)
        torch.testing.assert_close(got.running_mean, want.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.running_var, want.running_var, atol=1e-6, rtol=1e-5)
    assert _moved(model, pruned, data[:1]) > 1e-3  # the correction did move the statistics


def _moved(model, pruned, data) -> float:
    """How far ``pruned``'s running variances are from those of the same plan uncorrected."""
    plain = _magnitude(model, data[0], recalibrate_bn=False)
    plain.collect_activations(data, progress=False)
    trained = plain.prune()
    return max(
        float((pruned.get_submodule(name).running_var - trained.get_submodule(name).running_var).abs().max())
        for name in norms_with_running_stats(trained)
    )


def test_an_unsized_stream_within_the_cache_still_reads_only_the_pooled_batches():
    """A re-iterable loader without a length: the correction reads the pooled batches
    from memory, not the loader again (it read every batch beside the original)."""
    model = _trained()
    data = _data(10, 4)
    reads = []

    class Loader:  # no __len__
        def __iter__(self):
            reads.append(1)
            return iter(data)

    pruner = _magnitude(model, data[0], bn_samples=12)
    pruner.collect_activations(Loader(), progress=False)
    assert len(pruner.calibration.data.pool) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.prune()
    assert len(reads) == 1


def test_a_one_shot_stream_of_known_length_keeps_its_planned_batches(monkeypatch):
    """An iterator with a length whose batches outgrow the cache: the planned batches
    (spread over the data) are kept, and the correction reads them."""
    model = _trained()
    data = _data(8, 4)
    monkeypatch.setattr(replay, "CACHE_BYTES", 3 * data[0].numel() * 4)

    class Sized:
        def __init__(self):
            self._it = iter(data)

        def __iter__(self):
            return self

        def __next__(self):
            return next(self._it)

        def __len__(self):
            return len(data)

    pruner = _magnitude(model, data[0], bn_samples=8)
    pruner.collect_activations(Sized(), progress=False)
    assert [i for i, _ in pruner.calibration.data.pool] == replay.spread([4] * 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = pruner.prune()
    assert not [w for w in caught if "not corrected" in str(w.message)]
    assert _moved(model, pruned, data[:1]) > 1e-3
