"""Compensation's least squares: the covariance blocks it forms, the solve, shared solves,
and the folded weights against a plain float64 ``torch.linalg.solve`` reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner, calibration, compensation
from cleanai_core.calibration import ChannelStats


def _streamed(c: int, batches: int, seed: int = 0) -> ChannelStats:
    """Covariance statistics of ``batches`` batches of correlated channels far from zero."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g) / c**0.5
    st = ChannelStats(covariance=True, covariance_rows=64)
    for _ in range(batches):
        st.update(torch.randn(48, c, generator=g) @ mix + 3.0, 1)
    return st


def _split(c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gone = torch.rand(c, generator=torch.Generator().manual_seed(seed)) < 0.5
    return (~gone).nonzero().squeeze(1), gone.nonzero().squeeze(1)


@pytest.mark.parametrize(
    ("channels", "batches", "flush"),
    [(6, 3, 32), (40, 7, 3), (300, 4, 4), (1100, 2, 32), (1100, 5, 2), (1100, 3, 2)],
)
def test_covariance_blocks_are_the_blocks_of_the_full_matrix(monkeypatch, channels, batches, flush):
    """Before a flush (running total zero), right after one (block zero), and with both;
    below and above the width from which only the blocks on and above the diagonal are
    accumulated (1024)."""
    monkeypatch.setattr(calibration, "FLUSH_BATCHES", flush)
    st = _streamed(channels, batches)
    full = st.cov.clone()
    scale = float(full.abs().max())
    kept, removed = _split(channels, 1)
    for rows, cols in ((kept, removed), (kept.flip(0), removed[torch.randperm(len(removed))])):
        kk, kr = st.cov_blocks(rows, cols)
        assert kk.dtype == torch.float64 and kk.shape == (len(rows), len(rows)) and kr.shape == (len(rows), len(cols))
        torch.testing.assert_close(kk, full[rows][:, rows], rtol=0, atol=4e-16 * scale)
        torch.testing.assert_close(kr, full[rows][:, cols], rtol=0, atol=4e-16 * scale)


def test_covariance_blocks_read_a_float64_total_as_the_ranks_combine_it():
    """After combining ranks the running total is a float64 co-moment and the block zero."""
    st = _streamed(50, 3)
    assert st.cov_total is None  # before the first flush
    st.cov_total = st.cov_block.double()
    st.cov_block = torch.zeros_like(st.cov_block)
    kept, removed = _split(50, 2)
    kk, kr = st.cov_blocks(kept, removed)
    torch.testing.assert_close(kk, st.cov[kept][:, kept], rtol=0, atol=1e-15 * float(kk.abs().max()))
    torch.testing.assert_close(kr, st.cov[kept][:, removed], rtol=0, atol=1e-15 * float(kk.abs().max()))


def _covariance(c: int, condition: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    return (q * torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), c, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize(("condition", "damping", "tol"), [(10.0, 1e-3, 1e-13), (1e12, 1e-6, 1e-9)])
def test_regress_from_blocks_matches_a_float64_solve(condition, damping, tol):
    """The ill-conditioned case: the damped kept block's condition number is about 3e6."""
    c = 240
    cov = _covariance(c, condition, 0)
    mean = torch.randn(c, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kept, removed = _split(c, 3)
    c_kk, c_kr = cov[kept][:, kept], cov[kept][:, removed]
    damped = c_kk + damping * float(c_kk.diagonal().mean()) * torch.eye(len(kept), dtype=torch.float64)
    assert float(torch.linalg.cond(damped)) > (1e6 if condition > 1e6 else 1.0)
    ref = torch.linalg.solve(damped, c_kr).T
    blocks = (c_kk.clone(), c_kr.clone())
    coef, shift = compensation.regress(blocks, mean, removed, kept, damping)
    assert torch.equal(blocks[0], c_kk) and torch.equal(blocks[1], c_kr)  # not written to
    assert float((coef - ref).norm() / ref.norm()) < tol
    torch.testing.assert_close(shift, mean[removed] - ref @ mean[kept], rtol=0, atol=tol * float(shift.abs().max()))
    full_coef, full_shift = compensation.regress(cov, mean, removed, kept, damping)
    assert torch.equal(full_coef, coef) and torch.equal(full_shift, shift)


@pytest.mark.parametrize("k", [1, 120, 248, 256, 376, 512])
def test_regress_solves_every_size_of_kept_block(k):
    """The damped kept block is factored with identity rows appended (8 or 16, so that its
    size is no multiple of 128): sizes around and at those multiples."""
    c = k + 40
    cov = _covariance(c, 1e4, k)
    mean = torch.linspace(-1, 2, c, dtype=torch.float64)
    kept, removed = torch.arange(k), torch.arange(k, c)
    c_kk, c_kr = cov[:k, :k], cov[:k, k:]
    damped = c_kk + 1e-3 * float(c_kk.diagonal().mean()) * torch.eye(k, dtype=torch.float64)
    ref = torch.linalg.solve(damped, c_kr).T
    coef, shift = compensation.regress((c_kk, c_kr), mean, removed, kept)
    assert coef.shape == (40, k) and float((coef - ref).norm() / ref.norm()) < 1e-12


def test_regress_falls_back_to_lu_where_the_damped_block_is_not_positive_definite():
    c_kk = torch.diag(torch.tensor([4.0, -1.0, 2.0], dtype=torch.float64)) + 0.1
    c_kr = torch.tensor([[1.0, 0.5], [2.0, -1.0], [0.0, 3.0]], dtype=torch.float64)
    mean = torch.tensor([0.5, 1.0, -1.0, 2.0, 0.0], dtype=torch.float64)
    coef, _ = compensation.regress((c_kk, c_kr), mean, torch.tensor([3, 4]), torch.tensor([0, 1, 2]))
    damped = c_kk + 1e-3 * float(c_kk.diagonal().mean()) * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(coef, torch.linalg.solve(damped, c_kr).T, rtol=1e-14, atol=0)


class _TwoReaders(nn.Module):
    """A stem read by two 1x1 convs (a ResNet block's first conv and downsample conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.conv1 = nn.Conv2d(12, 10, 1)
        self.down = nn.Conv2d(12, 10, 1)
        self.head = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        y = torch.tanh(self.stem(x))
        return self.head(torch.tanh(self.conv1(y)) + self.down(y))


def test_consumers_of_one_tensor_share_one_solve_with_the_same_result(monkeypatch):
    torch.manual_seed(0)
    model = _TwoReaders().eval()
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    pruner = StructuredPruner(model, data[0], pruning_ratio=0.5, recalibrate_bn=False)
    pruner.collect_activations(data, progress=False)
    a, b = pruner.stats[("conv1", "in")], pruner.stats[("down", "in")]
    assert a is not b and torch.equal(a.cov_block, b.cov_block) and torch.equal(a.mean, b.mean)

    solves = []
    real = compensation.regress

    def counting(*args, **kwargs):
        solves.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(compensation, "regress", counting)
    shared = pruner.prune()
    consumers = len(solves)
    monkeypatch.setattr(compensation, "_same_problem", lambda a, b: False)
    solves.clear()
    apart = pruner.prune()
    assert shared.conv1.in_channels == 6 and consumers == len(solves) - 1 == 2  # conv1 + down share, head alone
    for key, t in apart.state_dict().items():
        assert torch.equal(shared.state_dict()[key], t), key


def test_folded_weights_match_a_float64_linalg_solve_reference():
    """Each consumer's kept columns absorb ``W[:, removed] @ coef`` and its bias
    ``W[:, removed] @ shift``, ``coef`` from ``torch.linalg.solve`` on the damped covariance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).eval()
    data = [torch.randn(64, 6) for _ in range(3)]
    pruner = StructuredPruner(model, data[0], pruning_ratio=0.5)
    pruner.collect_activations(data, progress=False)
    pruned = pruner.prune()
    gone = {r["name"]: r["pruned_indices"] for r in pruner.report()["layers"]}
    for layer, producer in (("2", "0"), ("4", "2")):
        st = pruner.stats[(layer, "in")]
        c = st.mean.numel()
        removed = torch.tensor(gone[producer])
        kept = torch.tensor([i for i in range(c) if i not in gone[producer]])
        c_kk, c_kr = st.cov[kept][:, kept], st.cov[kept][:, removed]
        damped = c_kk + 1e-3 * float(c_kk.diagonal().mean()) * torch.eye(len(kept), dtype=torch.float64)
        coef = torch.linalg.solve(damped, c_kr).T
        shift = st.mean[removed] - coef @ st.mean[kept]
        w = model.get_submodule(layer).weight.detach().double()
        out_kept = [i for i in range(w.shape[0]) if i not in gone.get(layer, [])]
        expected_w = (w[:, kept] + w[:, removed] @ coef)[out_kept]
        expected_b = (model.get_submodule(layer).bias.detach().double() + w[:, removed] @ shift)[out_kept]
        got = pruned.get_submodule(layer)
        for got_t, want in ((got.weight, expected_w), (got.bias, expected_b)):
            torch.testing.assert_close(got_t.double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
