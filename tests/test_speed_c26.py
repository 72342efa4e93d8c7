"""Session 26 (speedC, issue #21): two cuts in activation-statistics collection.

- A consumer's input with few channels laid out channels innermost (an image batch at the
  stem, channels-last) is reduced by the statistics kernel in groups of rows
  (``calibration._kernel_moments``), merged in float64: the kernel alone walks such a
  matrix row by row (8x3x224x224: 8-9 ms against under 1 ms). Its moments must equal the
  float64 ones at least as closely as the kernel's, each channel's must not depend on the
  other channels, ill-conditioned channels must be the kernel's own, and the BatchNorm
  correction's moments (``finite_moments`` without ``grouped``) must stay the kernel's bits.
- The covariance sample's rows of a channels-innermost input are gathered by
  ``index_select``: the same rows (so the same co-moment bits) as ``last[idx]``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner, calibration
from cleanai_core.calibration import ChannelStats, batch_moments, finite_moments
from cleanai_core.errors import UserError

_KERNEL = torch.ops.aten.batch_norm_update_stats


def _image(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(1, c, 1, 1, generator=g) * 3 + 0.1
    shift = torch.randn(1, c, 1, 1, generator=g) * 2
    x = torch.randn(n, c, h, w, generator=g) * scale + shift
    return x.contiguous(memory_format=torch.channels_last)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def test_grouped_moments_of_an_image_batch_are_closer_to_float64_than_the_kernel():
    x = _image(8, 3, 224, 224)
    n, mean, m2 = batch_moments(x, 1)
    assert n == 8 * 224 * 224
    var64, mean64 = torch.var_mean(_rows(x).double(), 0, correction=0)
    k_mean, k_var = _KERNEL(_rows(x), None, None, 0.0)
    err = float(((m2 / n - var64).abs() / var64).max())
    kernel_err = float(((k_var.double() - var64).abs() / var64).max())
    assert err < 2e-6, err
    assert err < kernel_err  # the kernel's float32 sums over 401,408 rows: about 1e-4
    assert float(((mean - mean64).abs() / var64.sqrt()).max()) < 1e-6
    # the kernel's one pass agrees with them to its own rounding
    torch.testing.assert_close(m2 / n, k_var.double(), rtol=1e-3, atol=0)


def test_a_channels_grouped_moments_do_not_depend_on_the_other_channels():
    x = _image(4, 12, 30, 30, seed=1)
    kept = x[:, ::2].contiguous(memory_format=torch.channels_last)
    (n, mean, m2), (n_k, mean_k, m2_k) = batch_moments(x, 1), batch_moments(kept, 1)
    assert n == n_k == 3600
    assert torch.equal(mean[::2], mean_k) and torch.equal(m2[::2], m2_k)  # bit for bit


def test_ill_conditioned_constant_and_zero_channels_in_groups():
    """A mean far from zero (its groups' float32 means would carry its rounding into the
    variance) is the kernel's whole-channel result, bit for bit; a constant channel has
    variance exactly 0, an all-zero one mean and variance 0; a non-finite value is an error."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 7, 7, 5, generator=g)  # NHWC memory: channels innermost
    x[..., 1] = x[..., 1] * 0.01 + 100.0
    x[..., 2] = 7.25
    x[..., 3] = 0.0
    x = x.permute(0, 3, 1, 2)
    n, mean, m2 = batch_moments(x, 1)
    rows = _rows(x)
    k_mean, k_var = _KERNEL(rows[:, 1:2].contiguous(), None, None, 0.0)
    assert mean[1] == k_mean.double()[0] and m2[1] / n == k_var.double()[0]
    var64, mean64 = torch.var_mean(rows.double(), 0, correction=0)
    torch.testing.assert_close(m2[1] / n, var64[1], rtol=1e-4, atol=0)
    assert mean[2] == 7.25 and m2[2] == 0
    assert mean[3] == 0 and m2[3] == 0
    torch.testing.assert_close(m2[[0, 4]] / n, var64[[0, 4]], rtol=1e-6, atol=0)
    x = x.clone()
    x[3, 4, 2, 1] = float("nan")
    with pytest.raises(UserError, match="non-finite"):
        batch_moments(x, 1)


@pytest.mark.parametrize("shape", [(8, 3, 28, 28), (3, 5, 7, 7), (1, 16, 1, 1)])
def test_the_norms_moments_stay_the_kernels_bits(shape):
    """The BatchNorm correction's moments (``grouped`` off) are the kernel's one call; the
    consumers' are grouped where the row count allows (an odd one, or one row, does not)."""
    x = _image(*shape, seed=3)
    n, mean, m2 = finite_moments(x, 1)
    k_mean, k_var = _KERNEL(_rows(x), None, None, 0.0)
    assert torch.equal(mean, k_mean.double()) and torch.equal(m2, k_var.double() * n)
    grouped = batch_moments(x, 1)
    rows = shape[0] * shape[2] * shape[3]
    if rows % 2:
        assert torch.equal(grouped[1], mean) and torch.equal(grouped[2], m2)
    else:
        torch.testing.assert_close(grouped[1], mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(grouped[2], m2, rtol=1e-5, atol=1e-9)


def test_wide_inputs_are_not_grouped():
    x = _image(2, calibration._NARROW_CHANNELS, 6, 6, seed=4)
    n, mean, m2 = batch_moments(x, 1)
    k_mean, k_var = _KERNEL(_rows(x), None, None, 0.0)
    assert torch.equal(mean, k_mean.double()) and torch.equal(m2, k_var.double() * n)


@pytest.mark.parametrize("channels", [6, 40])
def test_the_covariance_sample_is_the_rows_drawn_as_before(channels):
    """``index_select`` gathers the rows ``last[idx]`` gave: the co-moment's block, offset
    and reference are the bits of a sample drawn that way with the same generator."""
    x = _image(4, channels, 9, 9, seed=5)
    st = ChannelStats(covariance=True, covariance_rows=50)
    st.update(x, 1)
    last = _rows(x)
    idx = torch.randint(last.shape[0], (50,), generator=torch.Generator().manual_seed(0))
    sample = last[idx]
    ref = sample.mean(0)
    centred = sample - ref
    assert torch.equal(st.cov_ref, ref)
    assert torch.equal(st.cov_block, torch.zeros(channels, channels).addmm_(centred.T, centred))
    assert torch.equal(st.cov_offset, centred.sum(0, dtype=torch.float64))
    assert st.cov_count == 50


def test_a_stem_consumers_statistics_in_the_default_path():
    """Collection on a small channels-last CNN: the stem's input statistics (3 channels,
    grouped) equal the float64 moments of the batches, and the default prune runs."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1),
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.Conv2d(24, 8, 1),
    ).eval()
    batches = [torch.randn(4, 3, 32, 32) * 2 + 0.5 for _ in range(3)]
    pr = StructuredPruner(model, batches[0][:1], pruning_ratio=0.5)
    pr.collect_activations(batches, progress=False)
    st = pr.stats[("0", "in")]
    data = torch.cat([b.movedim(1, -1).reshape(-1, 3) for b in batches]).double()
    assert st.count == data.shape[0]
    torch.testing.assert_close(st.mean, data.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(st.var, data.var(0, unbiased=False), rtol=1e-6, atol=0)
    pruned = pr.prune()
    assert pruned(batches[0]).shape == (4, 8, 32, 32)
