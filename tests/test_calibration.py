"""Streaming activation statistics (cleanai_core.calibration) and collect_activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cleanai_core import StructuredPruner
from cleanai_core.calibration import ChannelStats
from cleanai_core.errors import UserError


class Net(nn.Module):
    """conv -> bn -> relu -> conv -> pool -> linear -> relu -> linear (conv and linear consumers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        x = x.mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BN so that post-BN activations are not standardised
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 2.0)
        net.bn.bias.uniform_(-1.0, 1.0)
    return net


def batches(sizes=(3, 7, 1, 5)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 6, 6, generator=g) * 2 + 0.5 for n in sizes]


def test_channel_stats_match_full_data_float64():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 5, 4, generator=g, dtype=torch.float64) * 3 + 7 for n in (1, 2, 9, 4, 13)]
    st = ChannelStats()
    for c in chunks:
        st.update(c, dim=1)
    full = torch.cat(chunks).movedim(1, -1).reshape(-1, 5)
    assert st.count == full.shape[0] == 29 * 4
    torch.testing.assert_close(st.mean, full.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.var, full.var(0, unbiased=False), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(st.second_moment, (full**2).mean(0), rtol=1e-10, atol=1e-12)


def _consumer_inputs(net: Net, data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full-data inputs each consumer sees, channels last, flattened."""
    seen: dict[str, list[torch.Tensor]] = {"conv2": [], "fc1": [], "fc2": []}
    hs = [getattr(net, n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach())) for n in seen]
    net.eval()
    with torch.no_grad():
        for x in data:
            net(x)
    for h in hs:
        h.remove()
    out = {}
    for n, xs in seen.items():
        t = torch.cat(xs).to(torch.float64)
        out[n] = t.movedim(1, -1).reshape(-1, t.shape[1])
    return out


def test_collect_activations_equals_full_data_mean_and_variance():
    net = make_net()
    data = batches()
    ref = _consumer_inputs(net, data)
    pruner = StructuredPruner(net, data[0], pruning_ratio=0.3)
    pruner.collect_activations(data, progress=False)
    for name in ("conv2", "fc1", "fc2"):
        st = [v for (m, _), v in pruner.stats.items() if m == name]
        assert len(st) == 1, name
        st = st[0]
        assert st.mean.dtype == torch.float64
        assert st.count == ref[name].shape[0]
        torch.testing.assert_close(st.mean, ref[name].mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st.var, ref[name].var(0, unbiased=False), rtol=1e-5, atol=1e-6)
    # post-ReLU input to fc2: some channel means must be positive (statistics are not trivially zero)
    assert float(ref["fc2"].mean(0).abs().max()) > 0


def test_memory_does_not_grow_with_batches():
    net = make_net()
    x = torch.randn(2, 3, 6, 6)
    pruner = StructuredPruner(net, x, pruning_ratio=0.3)
    pruner.collect_activations([x], progress=False)
    sizes1 = {k: (v.mean.numel(), v.m2.numel()) for k, v in pruner.stats.items()}
    pruner.collect_activations([torch.randn(2, 3, 6, 6) for _ in range(50)], progress=False)
    sizes50 = {k: (v.mean.numel(), v.m2.numel()) for k, v in pruner.stats.items()}
    assert sizes1 == sizes50
    channels = {"conv1": 3, "conv2": 8, "fc1": 6, "fc2": 12}
    for (m, _), (nm, n2) in sizes50.items():
        assert nm == n2 == channels[m]
    assert {m for m, _ in sizes50} == set(channels)
    assert all(v.count == 50 * 2 * (36 if m.startswith("conv") else 1) for (m, _), v in pruner.stats.items())


def test_activations_of_earlier_batches_are_freed_while_calibrating():
    """Streaming in bounded memory: a hooked activation (the input of ``conv2`` and of
    ``fc2``) is gone once its batch is done. The shared
    reductions' table held every one of them until calibration ended: ResNet-18 at 40
    batches of 16 images (128 px) grew by 1976 MB, and activations of every earlier
    batch were still alive here."""
    import weakref

    net = make_net()
    alive: list[list[weakref.ref]] = []
    seen_at_batch: list[int] = []

    def keep_ref(_m, args):
        alive[-1].append(weakref.ref(args[0]))

    def batches():
        for _ in range(4):
            seen_at_batch.append(sum(r() is not None for refs in alive for r in refs))
            alive.append([])
            yield torch.randn(2, 3, 6, 6)

    pruner = StructuredPruner(net, torch.randn(2, 3, 6, 6), pruning_ratio=0.3)
    handles = [net.get_submodule(name).register_forward_pre_hook(keep_ref) for name in ("conv2", "fc2")]
    pruner.collect_activations(batches(), progress=False)
    for h in handles:
        h.remove()
    assert len(alive) == 4 and all(len(refs) >= 2 for refs in alive)
    assert seen_at_batch == [0, 0, 0, 0]


def _n_hooks(net: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in net.modules())


def test_hooks_removed_and_mode_restored_when_loader_raises():
    net = make_net()
    x = torch.randn(2, 3, 6, 6)
    pruner = StructuredPruner(net, x, pruning_ratio=0.3)
    net.train()
    net.fc2.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    before = _n_hooks(net)

    def bad_loader():
        yield x
        yield x
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        pruner.collect_activations(bad_loader(), progress=False)
    assert _n_hooks(net) == before == 0
    assert net.training and all(m.training for m in net.modules())
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags


def test_mode_and_flags_restored_after_success():
    net = make_net().eval()
    x = torch.randn(2, 3, 6, 6)
    pruner = StructuredPruner(net, x, pruning_ratio=0.3)
    net.conv1.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    bn_mean = net.bn.running_mean.clone()
    pruner.collect_activations([x, x], progress=False)
    assert not net.training
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert _n_hooks(net) == 0
    torch.testing.assert_close(net.bn.running_mean, bn_mean)  # ran in eval: BN stats untouched
    net.train()
    pruner.collect_activations([x], progress=False)
    assert net.training and net.bn.training
    torch.testing.assert_close(net.bn.running_mean, bn_mean)


def _means(pruner) -> dict:
    return {k: v.mean.clone() for k, v in pruner.stats.items()}


def test_loader_formats_tensor_pair_dict_agree():
    net = make_net()
    xs = batches((4, 4, 4))
    ys = [torch.zeros(4, dtype=torch.long)] * 3
    pruner = StructuredPruner(net, xs[0], pruning_ratio=0.3)
    ref = _means(pruner.collect_activations(xs, progress=False))
    assert ref
    for loader in (
        list(zip(xs, ys, strict=True)),
        DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=4),
        DataLoader(TensorDataset(torch.cat(xs)), batch_size=4),
    ):
        got = _means(pruner.collect_activations(loader, progress=False))
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9)

    class DictNet(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values)

    dnet = DictNet(net)
    dp = StructuredPruner(dnet, {"pixel_values": xs[0]}, pruning_ratio=0.3)
    dict_batches = [{"pixel_values": x, "labels": y} for x, y in zip(xs, ys, strict=True)]
    got = _means(dp.collect_activations(dict_batches, progress=False))
    assert {m.removeprefix("inner.") for m, _ in got} == {m for m, _ in ref}
    for (m, s), v in got.items():
        torch.testing.assert_close(v, ref[(m.removeprefix("inner."), s.removeprefix("inner."))], rtol=1e-9, atol=1e-9)


def test_num_batches_limits_the_stream():
    net = make_net()
    xs = batches((2, 2, 2, 2))
    pruner = StructuredPruner(net, xs[0], pruning_ratio=0.3)
    pruner.collect_activations(xs, num_batches=2, progress=False)
    assert all(v.count == 4 for (m, _), v in pruner.stats.items() if m.startswith("fc"))


def test_empty_loader_is_a_clear_user_error():
    net = make_net()
    pruner = StructuredPruner(net, torch.randn(1, 3, 6, 6), pruning_ratio=0.3)
    with pytest.raises(UserError, match="empty"):
        pruner.collect_activations([], progress=False)
    with pytest.raises(UserError, match="empty"):
        pruner.collect_activations(DataLoader(TensorDataset(torch.empty(0, 3, 6, 6)), batch_size=2), progress=False)
    assert _n_hooks(net) == 0
    with pytest.raises(UserError, match="num_batches"):
        pruner.collect_activations([torch.randn(1, 3, 6, 6)], num_batches=0, progress=False)


def test_consumer_inputs_passed_by_keyword_are_collected():
    """Regression: a consumer called with its input as a keyword (``mha(query=q, ...)``,
    ``fc(input=x)``) got no statistics: the hook read the input only by position."""

    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.o = nn.Linear(16, 3)

        def forward(self, x):
            q = self.a(input=x)
            return self.o(input=self.mha(query=q, key=q, value=q)[0])

    torch.manual_seed(0)
    model = KW().eval()
    pruner = StructuredPruner(model, torch.randn(2, 5, 8), pruning_ratio=0.5)
    data = [torch.randn(4, 5, 8) for _ in range(2)]
    pruner.collect_activations(data, progress=False)
    assert {k: v.count for k, v in pruner.stats.items()} == {("a", "in"): 40, ("mha", "embed"): 40, ("o", "in"): 40}
    x = torch.cat(data).reshape(-1, 8).double()
    torch.testing.assert_close(pruner.stats[("a", "in")].mean, x.mean(0), rtol=1e-5, atol=1e-6)


class Shared(nn.Module):
    """Two convs read the same tensor (like a ResNet conv1 and its downsample conv); a
    third reads it only after an in-place ReLU changed it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 4, 1)
        self.b = nn.Conv2d(6, 4, 3, padding=1)
        self.c = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        y = self.a(h) + self.b(h)
        return y + self.c(torch.relu_(h))


def test_consumers_of_one_tensor_share_its_reduction(monkeypatch):
    """``a`` and ``b`` read the same tensor: it is reduced once per batch, and both end up
    with exactly the statistics (covariance included) a separate collection gives. ``c``
    reads it after an in-place change and gets the changed tensor's own statistics."""
    from cleanai_core import calibration
    from cleanai_core.graph.dependency import DependencyGraph

    torch.manual_seed(0)
    model = Shared().eval()
    data = [torch.randn(n, 3, 5, 5) for n in (2, 3, 1)]
    graph = DependencyGraph(model, data[0])
    reduced = []
    real = calibration.batch_moments
    monkeypatch.setattr(calibration, "batch_moments", lambda x, d: reduced.append(x.shape) or real(x, d))
    collector = calibration.StatsCollector(model, graph.slices, covariance=True, covariance_rows=16)
    with collector.hooks(), torch.no_grad():
        for x in data:
            model(x)
    # per batch: the input, h (once for a and b), relu(h)
    assert len(reduced) == 3 * len(data)
    got = {m: st for (m, _), st in collector.stats.items()}
    assert set(got) == {"stem", "a", "b", "c"}
    assert got["a"] is not got["b"]

    h = [model.stem(x).detach() for x in data]
    for name, inputs in (("a", h), ("b", h), ("c", [t.relu() for t in h])):
        ref = ChannelStats(covariance=True, covariance_rows=16)
        for t in inputs:
            ref.update(t, 1)
        st = got[name]
        assert st.count == ref.count == 6 * 25 and st.cov_count == ref.cov_count == 3 * 16
        for field in ("mean", "m2", "cov_mean", "cov"):
            torch.testing.assert_close(getattr(st, field), getattr(ref, field), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["c"].mean, torch.cat(h).relu().double().mean((0, 2, 3)), rtol=1e-6, atol=1e-7)


def test_channels_last_batches_merge_to_the_float64_reference():
    """Channels-last inputs (a linear's, a permuted NHWC tensor) of several batch sizes,
    reduced and merged: the mean, variance and covariance equal the float64 full-data
    values."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(7, 7, generator=g)
    chunks = [(torch.randn(n, 4, 5, 7, generator=g) @ mix + 3).permute(0, 3, 1, 2) for n in (2, 5, 1)]
    assert not chunks[0].is_contiguous() and chunks[0].stride(1) == 1  # NCHW shape, NHWC memory
    st = ChannelStats(covariance=True, covariance_rows=0)
    for c in chunks:
        st.update(c, 1)
    full = torch.cat([c.movedim(1, -1).reshape(-1, 7) for c in chunks]).double()
    assert st.count == st.cov_count == 8 * 20
    torch.testing.assert_close(st.mean, full.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.var, full.var(0, unbiased=False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.cov, torch.cov(full.T, correction=0), rtol=1e-5, atol=1e-5)
    # the same positions drawn from the NCHW-contiguous copy give the same sample
    a = ChannelStats(covariance=True, covariance_rows=9)
    b = ChannelStats(covariance=True, covariance_rows=9)
    for c in chunks:
        a.update(c, 1)
        b.update(c.contiguous(), 1)
    torch.testing.assert_close(a.cov, b.cov, rtol=1e-5, atol=1e-5)
    assert a.cov_count == b.cov_count == 27


def test_covariance_read_twice_is_formed_once_and_follows_new_batches():
    torch.manual_seed(0)
    a, b = torch.randn(40, 6, dtype=torch.float64), torch.randn(30, 6, dtype=torch.float64) * 2 + 1
    st = ChannelStats(covariance=True, covariance_rows=0)
    st.update(a, 1)
    first = st.cov
    assert st.cov is first  # the second read is the same matrix, not formed again
    assert torch.allclose(first, torch.cov(a.T, correction=0), atol=1e-12)
    st.update(b, 1)
    both = torch.cat([a, b])
    assert torch.allclose(st.cov, torch.cov(both.T, correction=0), atol=1e-12)  # not the stale matrix
    other = ChannelStats(covariance=True, covariance_rows=0)
    other.update(b, 1)
    assert torch.allclose(other.cov, torch.cov(b.T, correction=0), atol=1e-12)
    assert torch.allclose(st.cov, torch.cov(both.T, correction=0), atol=1e-12)  # one slot, keyed by the stats


def test_bn_moments_of_unchanged_channels_agree_bit_for_bit_with_the_full_tensor():
    from cleanai_core.bn_correction import _moments

    torch.manual_seed(0)
    x = torch.randn(4, 10, 7, 9) * 3 + 1
    full, kept = _moments(x), _moments(x[:, ::2].contiguous())
    assert torch.equal(full[1][::2], kept[1]) and torch.equal(full[2][::2], kept[2])
    x64 = x.double()
    assert torch.allclose(full[1], x64.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    assert torch.allclose(full[2] / full[0], x64.var((0, 2, 3), correction=0), rtol=1e-5)
    assert _moments(torch.tensor([[1.0, float("nan")]])) is None


@pytest.mark.parametrize("channels_last", [False, True])
def test_moments_keep_the_variance_of_a_channel_far_from_zero(channels_last):
    """A sum of squares about 0 in float32 loses a small spread around a large mean to
    cancellation (here entirely: the variance would read 0 or noise); the squares are
    taken about each channel's mean instead. The mean itself is exact to float32 rounding."""
    from cleanai_core.calibration import finite_moments

    torch.manual_seed(0)
    x = torch.randn(8, 7, 7, 5).permute(0, 3, 1, 2) if channels_last else torch.randn(8, 5, 7, 7)
    x = x * 0.01 + 100.0
    n, mean, m2 = finite_moments(x, 1)
    var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, ref_mean, atol=0, rtol=1e-6)
    torch.testing.assert_close(m2 / n, var, rtol=1e-4, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_moments_without_the_batch_norm_kernel_equal_the_float64_ones(monkeypatch, channels_last):
    """A device without the batch-norm statistics kernel falls back to one ``var_mean``."""
    from cleanai_core import calibration

    def missing(*args):
        raise NotImplementedError("no kernel on this device")

    torch.manual_seed(0)
    x = torch.randn(6, 9, 5, 4) * 2 + 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = calibration.finite_moments(x, 1)
    monkeypatch.setattr(calibration, "_STATS_KERNEL", missing)
    calibration._kernel_agrees.cache_clear()
    assert not calibration._kernel_agrees("cpu", torch.float32)
    n, mean, m2 = calibration.finite_moments(x, 1)
    var, ref = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert n == expected[0] == 6 * 5 * 4
    torch.testing.assert_close(mean, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2 / n, var, rtol=1e-5, atol=0)
    torch.testing.assert_close(m2, expected[2], rtol=1e-5, atol=0)
    assert calibration.finite_moments(torch.tensor([[1.0, float("inf")]]), 1) is None
    # a kernel that returns another statistic (say the inverse standard deviation) is not used
    monkeypatch.setattr(calibration, "_STATS_KERNEL", lambda x, *a: (x.mean((0, 2)), 1 / x.std((0, 2))))
    calibration._kernel_agrees.cache_clear()
    torch.testing.assert_close(calibration.finite_moments(x, 1)[2], m2)
    monkeypatch.undo()
    calibration._kernel_agrees.cache_clear()


def test_channels_last_moments_of_a_kept_channel_agree_to_rounding_and_with_float64():
    from cleanai_core.calibration import finite_moments

    torch.manual_seed(0)
    x = (torch.randn(4, 40, 30, 30) * 3 + 1).contiguous(memory_format=torch.channels_last)
    kept = x[:, ::2].contiguous(memory_format=torch.channels_last)
    (n, mean, m2), (n_k, mean_k, m2_k) = finite_moments(x, 1), finite_moments(kept, 1)
    assert n == n_k == 4 * 30 * 30
    torch.testing.assert_close(mean[::2], mean_k, rtol=0, atol=1e-6)
    torch.testing.assert_close(m2[::2], m2_k, rtol=1e-6, atol=0)
    var, ref = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(m2 / n, var, rtol=1e-5, atol=0)


def test_channels_first_moments_in_one_pass_match_float64_also_far_from_zero():
    """The one-pass row sums (channels-first inputs) give float64-accurate moments where the
    mean is small against the spread, and the channels where it is not (a mean 300 standard
    deviations from 0, a constant channel) are reduced again in two passes: without that,
    the variance of the mean-300 channel is off by about 1e-2."""
    from cleanai_core.calibration import ONE_PASS_MIN_ROW, finite_moments

    torch.manual_seed(0)
    x = torch.randn(4, 6, 9, 9)
    assert x[0, 0].numel() >= ONE_PASS_MIN_ROW
    x[:, 1] = torch.relu(x[:, 1] + 0.5)
    x[:, 2] += 300.0  # far from zero: cancellation in one pass
    x[:, 3] = 7.25  # constant
    x[:, 4] = 0.0  # all zero
    x[:, 5] = x[:, 5] * 1e-3 + 0.02  # mean 20 spreads
    n, mean, m2 = finite_moments(x, 1)
    x64 = x.double()
    assert n == 4 * 81
    assert torch.allclose(mean, x64.mean((0, 2, 3)), rtol=1e-6, atol=1e-7)
    ref = x64.var((0, 2, 3), correction=0)
    assert m2[3] == 0 and m2[4] == 0 and mean[4] == 0
    rel = (m2 / n - ref).abs() / ref.clamp_min(1e-30)
    assert float(rel[[0, 1, 2, 5]].max()) < 3e-6, rel


def test_channels_first_moments_are_none_for_non_finite_values():
    from cleanai_core.calibration import finite_moments

    x = torch.randn(2, 3, 8, 8)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[1, 2, 3, 4] = bad
        assert finite_moments(y, 1) is None
    assert finite_moments(x * 1e30, 1) is None  # squares beyond float32
