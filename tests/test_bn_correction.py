"""BatchNorm correction: eval mode at any batch size, no change where pruning changed
nothing, running statistics moved by the measured difference, data read once."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner, replay


class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, c // 2, 1)
        self.bn = nn.BatchNorm2d(c // 2)  # sees one value per channel at batch size 1
        self.expand = nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        w = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.bn(self.reduce(w)))))


class Net(nn.Module):
    """conv-BN twice, squeeze-excite, global pooling, then BN after a linear (BN1d)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.se = SqueezeExcite(16)
        self.pooled_bn = nn.BatchNorm1d(16)  # BN after global pooling
        self.fc, self.bnf = nn.Linear(16, 32), nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.se(torch.relu(self.bn2(self.conv2(x))))
        x = self.pooled_bn(x.mean((2, 3)))
        return self.head(torch.relu(self.bnf(self.fc(x))))


def _trained(seed: int = 0, cls: type[nn.Module] = Net) -> nn.Module:
    """Random weights, running statistics from a train-mode pass on data unlike the
    calibration data (shifted and scaled), as for a model trained elsewhere."""
    torch.manual_seed(seed)
    model = cls().train()
    with torch.no_grad():
        for _ in range(30):
            model(torch.randn(16, 3, 8, 8) * 2.0 + 0.5)
    return model.eval()


def _plant_dead_units(model: Net) -> None:
    """Half the units of every prunable group carry nothing: zero weights and biases in
    the producer and its BN, so their activations are exactly zero."""
    with torch.no_grad():
        for conv, bn, n in ((model.conv1, model.bn1, 8), (model.fc, model.bnf, 16), (model.se.reduce, model.se.bn, 4)):
            conv.weight[:n] = 0
            conv.bias[:n] = 0
            bn.weight[:n] = 0
            bn.bias[:n] = 0


def _data(n: int, batch: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]


def _prune(model, data, **kw):
    pruner = StructuredPruner(
        model, data[0] if isinstance(data, list) else torch.randn(1, 3, 8, 8), ignored_layers=[model.head], **kw
    )
    pruner.collect_activations(data, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pruner, pruner.prune()


def test_pruning_planted_dead_units_leaves_outputs_unchanged():
    model = _trained()
    _plant_dead_units(model)
    # conv2's outputs are all alive: only groups holding dead units are cut
    pruner = StructuredPruner(
        model, torch.randn(2, 3, 8, 8), pruning_ratio=0.5, ignored_layers=[model.head, model.conv2]
    )
    pruner.collect_activations(_data(4, 8), progress=False)
    pruned = pruner.prune()
    assert pruned.conv1.out_channels == 8 and pruned.fc.out_features == 16 and pruned.se.reduce.out_channels == 4
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, got = model(x), pruned(x)
    assert float(expected.abs().max()) > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the running statistics stay as trained on the kept channels
    torch.testing.assert_close(pruned.bn1.running_var, model.bn1.running_var[8:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pruned.bnf.running_mean, model.bnf.running_mean[16:], atol=1e-6, rtol=1e-5)


def test_batch_size_one_with_bn_after_pooling_squeeze_excite_and_linear():
    model = _trained()
    data = _data(5, 1)
    _, pruned = _prune(model, data, pruning_ratio=0.3)
    assert pruned.se.bn.num_features < 8 and pruned.bnf.num_features < 32
    with torch.no_grad():
        out = pruned(torch.randn(4, 3, 8, 8))
    assert out.shape == (4, 10) and bool(torch.isfinite(out).all())
    for m in pruned.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert not m.training and bool((m.running_var >= 0).all()) and bool(torch.isfinite(m.running_mean).all())


def _channels(x: torch.Tensor) -> torch.Tensor:
    """A norm input as (channels, values), float64."""
    return x.transpose(0, 1).reshape(x.shape[1], -1).double()


def _by_hand(base_mean, base_var, eps, a: torch.Tensor, b: torch.Tensor, paired: tuple | None = None):
    """The estimate (:func:`cleanai_core.bn_estimate.estimate`) from the original's (``a``)
    and the pruned model's (``b``) input values at a norm, (channels, values), measured
    here rather than by the correction's hooks; ``paired``: the two at the paired
    positions, (channels, rows) each (default: all values)."""
    from cleanai_core.bn_estimate import estimate

    def triple(x):
        return float(x.shape[1]), x.mean(1), x.var(1, correction=0) * x.shape[1]

    pa, pb = paired if paired is not None else (a, b)
    e = estimate(
        base_mean, base_var, eps, triple(b), triple(a), [list(triple(pa)), list(triple(pb)), list(triple(pb - pa))]
    )
    return e.mean, e.var


def _paired(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The paired positions of each call's input (:func:`~cleanai_core.bn_estimate.sample_rows`), (channels, rows)."""
    from cleanai_core.bn_estimate import sample_rows

    return torch.cat([sample_rows(x) for x in inputs]).T.double()


def test_statistics_follow_the_regression_on_the_original_input():
    """The BN's statistics, measured by hand in both models: the trained ones carried by
    the regression of the pruned input on the original's (shrinkage negligible here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    data = _data(3, 4)
    with torch.no_grad():  # trained statistics near (not at) the calibration data's
        h = _channels(model[:3](torch.cat(data)))
        model[3].running_mean.copy_(h.mean(1) + 0.2 * h.std(1))
        model[3].running_var.copy_(h.var(1) * 1.2)
    model.eval()
    pruner = StructuredPruner(
        model, data[0], "magnitude", pruning_ratio=0.5, ignored_layers=[model[2]], bias_compensation=False
    )
    pruner.collect_activations(data, progress=False)
    pruned = pruner.prune()
    x = torch.cat(data)
    with torch.no_grad():
        a, b = _channels(model[:3](x)), _channels(pruned[:3](x))
    assert float((a.mean(1) - b.mean(1)).abs().max()) > 1e-2  # pruning changed the BN input (no compensation)
    r = ((a - a.mean(1, keepdim=True)) * (b - b.mean(1, keepdim=True))).mean(1) / (
        a.std(1, correction=0) * b.std(1, correction=0)
    )
    assert float(r.abs().max()) < 0.98  # not an affine change: the regression differs from the shift
    m_t, v_t = model[3].running_mean.double(), model[3].running_var.double()
    slope = r * b.std(1, correction=0) / a.std(1, correction=0)
    regression_mean = b.mean(1) + slope * (m_t - a.mean(1))
    shift_mean = m_t + b.mean(1) - a.mean(1)
    got = pruned[3].running_mean.double()
    # between the two, nearer the regression (the trained statistics are 0.2 sd / 20% off the data's)
    assert float((got - regression_mean).abs().max()) < 0.2 * float((shift_mean - regression_mean).abs().max())
    want_mean, want_var = _by_hand(m_t, v_t, model[3].eps, a, b)
    torch.testing.assert_close(got, want_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pruned[3].running_var.double(), want_var, atol=1e-4, rtol=1e-3)


def test_one_shot_generator_is_read_once_and_corrected_alike():
    model = _trained()
    data = _data(4, 2)
    _, from_list = _prune(model, data, pruning_ratio=0.4)
    _, from_generator = _prune(model, (b for b in data), pruning_ratio=0.4)
    for a, b in zip(from_list.state_dict().values(), from_generator.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_data_too_large_to_keep_is_read_again_beside_the_original(monkeypatch):
    model = _trained()
    data = _data(4, 2)
    _, kept = _prune(model, data, pruning_ratio=0.4)
    monkeypatch.setattr(replay, "CACHE_BYTES", 0)
    reads = []

    class Loader:  # re-iterable, counts its reads
        def __iter__(self):
            reads.append(1)
            return iter(data)

    _, reread = _prune(model, Loader(), pruning_ratio=0.4)
    assert len(reads) == 2  # calibration, then the correction pass (original and pruned side by side)
    for a, b in zip(kept.state_dict().values(), reread.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _deep_chain(depth: int = 7) -> nn.Sequential:
    """conv-BN-ReLU ``depth`` times, running statistics from train-mode passes."""
    torch.manual_seed(3)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(16, 3, 8, 8))
    return model.eval()


def test_every_norm_of_a_deep_chain_ends_at_its_measured_estimate():
    """The correction's fixed point, at every depth: with the pruned model's statistics
    held, each norm's statistics are the estimate from what it sees in the pruned and in
    the original model (a pass that holds every norm at the last estimate carries the
    correction only one norm deeper per pass)."""
    model = _deep_chain()
    data = _data(4, 8)
    pruner = StructuredPruner(model, data[0], "magnitude", pruning_ratio=0.5, ignored_layers=[model[-1]],
                              bias_compensation=False, reconstruction=False)  # fmt: skip
    pruner.collect_activations(data, progress=False)
    pruned = pruner.prune()
    x = torch.cat(data)
    norms = [i for i, m in enumerate(model) if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 7 and all(pruned[i].num_features == 4 for i in norms)
    kept = {i: pruner.history.steps[0] for i in norms}
    with torch.no_grad():
        for i in norms:
            keep = next(e.keep for e in kept[i] if e.module == str(i))
            a = model[:i](x).transpose(0, 1).reshape(8, -1).double()[keep]
            b = pruned[:i](x).transpose(0, 1).reshape(4, -1).double()
            paired = _paired([model[:i](d) for d in data])[keep], _paired([pruned[:i](d) for d in data])
            m_t, v_t = model[i].running_mean[keep], model[i].running_var[keep]
            want_mean, want_var = _by_hand(m_t, v_t, 1e-5, a, b, paired)
            if i != norms[0]:  # the first norm's input is only selected, every later one moved
                assert float((b.mean(1) - a.mean(1)).abs().max()) > 1e-2
            # the one batchwise pass leaves every norm's mean within 0.0015 and variance within
            # 2.4% of the fixed point; holding each pass's estimate alone left them 0.06 off
            torch.testing.assert_close(pruned[i].running_mean.double(), want_mean, atol=2e-2, rtol=0)
            torch.testing.assert_close(pruned[i].running_var.double(), want_var, atol=2e-2, rtol=1e-2)


class Chain(nn.Module):
    """Ten conv-BN-ReLU layers in a row: each norm's input depends on every norm above it."""

    def __init__(self, depth: int = 10, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layers = nn.Sequential(
            *(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()) for _ in range(depth))
        )
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


def test_every_norm_of_a_deep_chain_holds_the_estimate_of_what_it_sees():
    """On the calibration batch, each pruned norm's statistics are the estimate from its
    input and the original's, measured with every correction in place (kept channels):
    the correction reaches the tenth norm of a chain, not only the first few."""
    model = _trained(cls=Chain)
    data = _data(1, 8)
    pruner, pruned = _prune(model, data, pruning_ratio=0.5)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    pruned_modules = dict(pruned.named_modules())
    inputs, handles = {}, []
    for name in norms:
        for side, m in (("o", norms[name]), ("p", pruned_modules[name])):
            handles.append(
                m.register_forward_pre_hook(lambda mod, args, key=(name, side): inputs.update({key: args[0]}))
            )
    with torch.no_grad():
        model(data[0])
        pruned(data[0])
    for h in handles:
        h.remove()
    keep = {e.module: e.keep for e in pruner.history.steps[0] if e.module in norms}
    assert len(keep) == 10
    for name, k in keep.items():
        a, b = norms[name], pruned_modules[name]
        assert b.num_features == 8
        x_o, x_p = _channels(inputs[(name, "o")])[k], _channels(inputs[(name, "p")])
        paired = _paired([inputs[(name, "o")]])[k], _paired([inputs[(name, "p")]])
        want_mean, want_var = _by_hand(a.running_mean[k], a.running_var[k], a.eps, x_o, x_p, paired)
        torch.testing.assert_close(b.running_mean.double(), want_mean, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(b.running_var.double(), want_var, atol=2e-3, rtol=3e-3)


def _original_runs(model, data) -> int:
    """How often the original model ran during prune()."""
    pruner = StructuredPruner(model, data[0], ignored_layers=[model.head], pruning_ratio=0.4)
    pruner.collect_activations(data, progress=False)
    runs = []
    handle = model.register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner.prune()
    finally:
        handle.remove()
    return len(runs)


def test_samples_within_the_budget_spare_the_original_a_second_run(monkeypatch):
    from cleanai_core import bn_correction
    from cleanai_core.bn_correction import Samples, sampling

    model = _trained()
    data = _data(4, 8)
    kept = Samples(budget=1 << 40)
    with sampling(model, kept), torch.no_grad():
        for d in data:
            model(d)
    assert Samples().budget == 256 << 20 and kept.complete
    monkeypatch.setattr(bn_correction, "SAMPLE_BYTES", kept.bytes)  # just fits
    fits = _original_runs(model, data)
    monkeypatch.setattr(bn_correction, "SAMPLE_BYTES", kept.bytes - 1)  # one byte short: runs again
    again = _original_runs(model, data)
    assert again == fits + len(data)


def _bn_stats(model: nn.Module) -> list[torch.Tensor]:
    return [t for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for t in (m.running_mean, m.running_var)]  # fmt: skip


def _corrected(model: nn.Module, batches: list, bn_samples: int, reruns: list | None = None) -> nn.Module:
    """Pruned by magnitude without compensation, so the plan and the slicing do not
    depend on the data: only the BatchNorm correction reads it. ``reruns`` gets the
    batch sizes the original ran on during ``prune()`` (the example inputs hold 2)."""
    pr = StructuredPruner(
        model, torch.randn(2, 3, 8, 8), "magnitude", pruning_ratio=0.5, bias_compensation=False, bn_samples=bn_samples
    )
    pr.collect_activations(batches, progress=False)

    def rerun(module, args):  # the pruned copy inherits the hook: only the original counts
        if module is model and reruns is not None:
            reruns.append(args[0].shape[0])

    seen = model.register_forward_pre_hook(rerun)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pr.prune()
    finally:
        seen.remove()


def test_spread_takes_the_fewest_batches_evenly_spaced():
    assert replay.spread([4] * 6, 8) == [0, 3]
    assert replay.spread([4] * 6, 9) == [0, 2, 4]
    assert replay.spread([4] * 6, 24) is None and replay.spread([4] * 6, 0) is None
    assert replay.spread([1, 1, 10, 1], 11) == [0, 2]  # sizes count, not batches


@pytest.mark.parametrize("cached", [True, False])
def test_bn_samples_corrects_on_the_spread_batches_alone(cached, monkeypatch):
    """With ``bn_samples`` below the calibration set, the correction equals one calibrated
    on the chosen batches alone (0 and 3 of 6 here): the original's recorded moments and
    paired samples of those batches are the ones used, also where the batches are not
    kept and the loader is read again."""
    from cleanai_core import bn_correction

    if not cached:
        monkeypatch.setattr(replay, "CACHE_BYTES", 0)
    model = _trained()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 8, 8, generator=g) * (1 + i) for i in range(6)]
    one = bn_correction.Samples()
    with bn_correction.sampling(model, one), torch.no_grad():
        model(batches[0])
    # room for the paired samples of 2 batches of the 6, not all: the planned ones alone are taken
    monkeypatch.setattr(bn_correction, "SAMPLE_BYTES", int(one.bytes * 2.5))
    reruns: list[int] = []
    capped = _corrected(model, batches, bn_samples=8, reruns=reruns)
    # the original's paired samples were taken on the planned batches alone, so where the
    # batches are kept it does not run again beside the pruned model
    assert [n for n in reruns if n != 2] == ([] if cached else [4, 4])
    alone = _corrected(model, [batches[0], batches[3]], bn_samples=0)
    every = _corrected(model, batches, bn_samples=0)
    for a, b in zip(_bn_stats(capped), _bn_stats(alone), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    moved = max(float((a - b).abs().max()) for a, b in zip(_bn_stats(capped), _bn_stats(every), strict=True))
    assert moved > 1e-3  # the other batches (scaled differently) would have changed it


@pytest.mark.parametrize("bad", [-1, 2.5, "64", True])
def test_bn_samples_must_be_a_count(bad):
    from cleanai_core.errors import UserError

    with pytest.raises(UserError, match="bn_samples"):
        StructuredPruner(_trained(), torch.randn(2, 3, 8, 8), bn_samples=bad)


class Repeats(nn.Module):
    """A norm called once per batch of even size and twice per batch of odd size: the
    calls of each batch are told apart by where the batch ended, not by division."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        for _ in range(1 + x.shape[0] % 2):
            x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean((2, 3)))


def test_bn_samples_takes_the_chosen_batches_calls_where_calls_per_batch_vary():
    torch.manual_seed(0)
    model = Repeats().train()
    with torch.no_grad():
        for _ in range(10):
            model(torch.randn(6, 3, 8, 8) * 2 + 0.5)
    model.eval()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(3 + i % 2, 3, 8, 8, generator=g) * (1 + i) for i in range(6)]  # 3, 4, 3, 4, 3, 4
    chosen = replay.spread([b.shape[0] for b in batches], 7)
    assert chosen == [0, 3]  # one batch of each kind: 2 calls, then 1
    capped = _corrected(model, batches, bn_samples=7)
    alone = _corrected(model, [batches[i] for i in chosen], bn_samples=0)
    for a, b in zip(_bn_stats(capped), _bn_stats(alone), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bn_samples_where_the_batches_differ_from_the_plan_measures_the_original_afresh():
    """Calibration records the original's norm inputs only on the batches planned from the
    first batch's size (every batch like it); where later batches are smaller, the
    correction reads other batches, and the original runs beside on them instead."""
    model = _trained()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 3, 8, 8, generator=g) * (1 + i) for i, n in enumerate((4, 4, 1, 1, 1, 1))]
    chosen = replay.spread([b.shape[0] for b in batches], 8)
    assert chosen == [0, 1, 3, 4] and chosen != replay.spread([4] * 6, 8)
    reruns: list[int] = []
    capped = _corrected(model, batches, bn_samples=8, reruns=reruns)
    assert [n for n in reruns if n != 2] == [4, 4, 1, 1]  # beside the pruned model, on the chosen batches
    alone = _corrected(model, [batches[i] for i in chosen], bn_samples=0)
    for a, b in zip(_bn_stats(capped), _bn_stats(alone), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
