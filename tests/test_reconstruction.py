"""Least-squares reconstruction: covariance streaming and exact folding of removed channels."""

from __future__ import annotations

import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.calibration import ChannelStats, StatsCollector
from cleanai_core.graph.dependency import DependencyGraph


def test_streamed_covariance_equals_full_data():
    torch.manual_seed(0)
    chunks = [torch.randn(n, 5) * torch.tensor([1.0, 2, 3, 4, 5]) + 3 for n in (7, 1, 30, 12)]
    st = ChannelStats(covariance=True)
    for c in chunks:
        st.update(c, 1)
    full = torch.cat(chunks).double()
    expected = torch.cov(full.T, correction=0)
    assert torch.allclose(st.cov, expected, atol=1e-10)
    assert st.cov.shape == (5, 5)


def test_streamed_covariance_far_from_zero_and_across_flushes(monkeypatch):
    """float32 activations with a large mean and unit spread: the co-moment is summed
    about a reference (the first sample's mean), so the float32 products lose nothing to
    cancellation; with a tiny flush interval the block -> total hand-over runs many times,
    and with tiny panels the product is summed in three panels of two rows, each from its
    diagonal block on (mirrored at the end in blocks of three columns: another split).
    Summed about zero instead, float32 would leave errors of ~1e-1 on these unit variances."""
    from cleanai_core import calibration

    monkeypatch.setattr(calibration, "FLUSH_BATCHES", 3)
    monkeypatch.setattr(calibration, "_GRAM_MIN_SPLIT", 4)
    monkeypatch.setattr(calibration, "_GRAM_BLOCK", 3)
    monkeypatch.setattr(calibration, "_GRAM_PANEL", 2)
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g)
    chunks = [torch.randn(n, 6, generator=g) @ mix + 1000.0 for n in (5, 40, 9, 33, 17, 2, 64, 8, 21, 12)]
    st = ChannelStats(covariance=True)
    for c in chunks:
        st.update(c, 1)
    assert st.cov_batches == 10 and st.cov_count == sum(c.shape[0] for c in chunks)
    upper = torch.ones(3, 3).triu().repeat_interleave(2, 0).repeat_interleave(2, 1).bool()
    assert st.cov_block[upper].all() and not st.cov_block[~upper].any()  # only the panels' upper blocks
    full = torch.cat(chunks).double()
    expected = torch.cov(full.T, correction=0)
    torch.testing.assert_close(st.cov, expected, rtol=0, atol=2e-4 * float(expected.abs().max()))
    torch.testing.assert_close(st.cov_mean, full.mean(0), rtol=1e-9, atol=1e-9)


def test_consumers_with_different_references_agree():
    """Consumers of one tensor share its centred sample only when they share a reference:
    one starting a batch later adopts the shared sample's reference if it comes second in
    the batch, and makes its own if it comes first (the one already running then draws
    its own). Every one gives the covariance of what it saw."""
    from cleanai_core.calibration import BatchReduction

    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(30, 4, generator=g) * 3 + 5 for _ in range(4)]
    early, late_first, late_second = (ChannelStats(covariance=True) for _ in range(3))
    for i, c in enumerate(chunks):
        red = BatchReduction(c, 1)
        if i > 0:
            late_first.update(c, 1, red)
        early.update(c, 1, red)
        if i > 0:
            late_second.update(c, 1, red)
    assert late_second.cov_ref is early.cov_ref and late_first.cov_ref is not early.cov_ref
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(early.cov, torch.cov(torch.cat(chunks).double().T, correction=0), **tol)
    for st in (late_first, late_second):
        torch.testing.assert_close(st.cov, torch.cov(torch.cat(chunks[1:]).double().T, correction=0), **tol)


class Dependent(nn.Module):
    """Hidden unit 3 is exactly 2*h0 - h1 + 0.5, so removing it loses nothing."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        self.conv = conv
        layer = (lambda i, o: nn.Conv2d(i, o, 3, padding=1)) if conv else nn.Linear
        self.l1 = layer(4, 6)
        self.l2 = layer(6, 3)
        with torch.no_grad():
            self.l1.weight[3] = 2 * self.l1.weight[0] - self.l1.weight[1]
            self.l1.bias[3] = 2 * self.l1.bias[0] - self.l1.bias[1] + 0.5

    def forward(self, x):
        return self.l2(self.l1(x))


def _prune_unit3(model, x, reconstruction):
    pruner = StructuredPruner(
        model, x, "magnitude", pruning_ratio=0.1, reconstruction=reconstruction, recalibrate_bn=False
    )
    pruner.collect_activations([x], progress=False)
    plan = pruner.plan()
    gp = next(gp for gp in plan.groups if any(s.module == "l1" and s.name == "out" for s in gp.group.slices))
    gp.pruned[:] = False
    l1_out = pruner.graph.ctx.slices[("l1", "out")]
    unit3 = pruner.graph.root[l1_out.atoms[3]]
    gp.pruned[(gp.group.units == unit3).nonzero().squeeze(1)] = True
    for other in plan.groups:
        if other is not gp:
            other.pruned[:] = False
    return pruner.prune()


def test_reconstruction_folds_a_dependent_channel_exactly():
    for conv in (False, True):
        torch.manual_seed(1)
        model = Dependent(conv).eval()
        x = torch.randn(64, 4, 5, 5) if conv else torch.randn(256, 4)
        ref = model(x)
        exact = _prune_unit3(model, x, reconstruction=True)
        mean_only = _prune_unit3(model, x, reconstruction=False)
        assert exact.l2.weight.shape[1] == 5 and mean_only.l2.weight.shape[1] == 5
        err_ls = float((exact(x) - ref).detach().abs().max())
        err_mean = float((mean_only(x) - ref).detach().abs().max())
        if conv:  # zero padding breaks the linear relation at the borders: interior must be exact
            err_ls = float((exact(x) - ref)[..., 1:-1, 1:-1].detach().abs().max())
        scale = float(ref.detach().abs().mean())
        # exact up to the ridge damping (1e-3 of the mean variance)
        assert err_ls < 5e-3 * scale, (conv, err_ls, scale)
        assert err_mean > 20 * err_ls, (conv, err_mean, err_ls)


def test_covariance_budget_prefers_narrow_consumers():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2)).eval()
    graph = DependencyGraph(model, torch.randn(2, 3))
    budget = 8 * 8 * 8 + 3 * 3 * 8  # room for the 3- and 8-channel consumers, not the 64-channel one
    collector = StatsCollector(model, graph.slices, covariance=True, covariance_budget=budget)
    assert collector.with_covariance == {("0", "in"), ("2", "in")}
    with collector.hooks():
        model(torch.randn(5, 3))
    assert collector.stats[("2", "in")].cov.shape == (8, 8)
    assert collector.stats[("4", "in")].cov is None


def test_covariance_only_where_the_layer_can_fold_it():
    """A depthwise conv's input channel feeds only its own output: no covariance there."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1)
    ).eval()
    graph = DependencyGraph(model, torch.randn(1, 3, 6, 6))
    collector = StatsCollector(model, graph.slices, covariance=True)
    assert collector.with_covariance == {("0", "in"), ("4", "in")}
    with collector.hooks():
        model(torch.randn(2, 3, 6, 6))
    assert collector.stats[("2", "in")].cov is None
    assert collector.stats[("2", "in")].count == 2 * 36
    assert collector.stats[("4", "in")].cov.shape == (8, 8)


def test_subsampled_covariance_is_bounded_and_close():
    """With ``covariance_rows`` the co-moment sees that many random positions per batch
    (its own count), the means and variances still see every position."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    chunks = [(torch.randn(4000, 6, generator=g, dtype=torch.float64) @ mix + 2.0) for _ in range(5)]
    st = ChannelStats(covariance=True, covariance_rows=500)
    for c in chunks:
        st.update(c, 1)
    full = torch.cat(chunks)
    assert st.count == 20000 and st.cov_count == 2500
    torch.testing.assert_close(st.mean, full.mean(0), rtol=1e-12, atol=1e-12)
    expected = torch.cov(full.T, correction=0)
    rel = float((st.cov - expected).abs().max() / expected.abs().max())
    assert 0 < rel < 0.15, rel  # an estimate from 2500 of 20000 rows, not the exact value


def test_float32_moments_keep_the_second_moment_exact():
    """Reductions run in the activation's precision; E[x^2] stays within float32 rounding
    even for channels with a large mean (where the variance alone loses digits)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, 30, 30, generator=g) * torch.tensor([0.01, 1, 3, 10, 0.1]).view(1, 5, 1, 1) + 50
    st = ChannelStats()
    st.update(x, 1)
    ref = x.double().movedim(1, -1).reshape(-1, 5)
    torch.testing.assert_close(st.second_moment, (ref**2).mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(st.mean, ref.mean(0), rtol=1e-6, atol=0)
    # the variance of channels with std >= 0.1 x mean / 500 is good to a few percent
    torch.testing.assert_close(st.var[1:4], ref.var(0, unbiased=False)[1:4], rtol=0.05, atol=0)
    assert bool((st.var >= 0).all())


class _NoNewBias:
    """A test plugin filing the second layer under the ``no_new_bias`` finding."""

    @staticmethod
    def prepare(model):
        from cleanai_plugins.layers.linear import no_new_bias

        return no_new_bias(model[2])


def test_a_layer_filed_under_no_new_bias_gets_the_least_squares_slope_and_no_bias():
    """Removed inputs correlated with the kept ones (tanh features, moderate means): the
    layer keeps no bias and its kept columns absorb the regression slope, which beats no
    compensation; with a bias allowed the intercept goes to the bias, better still. (With
    ReLU features, whose means are large, the slope alone can be worse than nothing: the
    intercept it drops is big. A fit without intercept needs the kernel's statistics.)"""
    from cleanai_core import hookimpl
    from cleanai_core.plugins import temporary_plugin

    class Plugin:
        @hookimpl
        def cleanai_prepare_model(self, model):
            return _NoNewBias.prepare(model)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4, bias=False)).eval()
    data = [torch.randn(64, 8) for _ in range(4)]
    x = torch.randn(256, 8)

    def prune(**options):
        pruner = StructuredPruner(model, data[0], pruning_ratio=0.5, **options)
        pruner.collect_activations(data, progress=False)
        return pruner.prune()

    with temporary_plugin(Plugin(), name="no-new-bias"):
        ruled = prune()
    free, plain = prune(), prune(bias_compensation=False)
    assert ruled[2].bias is None and free[2].bias is not None and plain[2].bias is None
    with torch.no_grad():
        ref = model(x)
        err = {k: float((m(x) - ref).square().mean()) for k, m in (("ruled", ruled), ("free", free), ("plain", plain))}
    assert ruled[2].in_features == 8
    assert err["free"] < err["ruled"] < 0.5 * err["plain"], err
