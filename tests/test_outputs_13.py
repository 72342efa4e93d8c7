"""Session 23 (outputs13): what the product writes and the steps after pruning, against
independent counts: distributed calibration against one process where the BatchNorm
correction reads a share of the data (``bn_samples``)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.distributed import shard

WORLD = 2


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).double().eval()  # fmt: skip


def _images(n: int) -> torch.utils.data.TensorDataset:
    """``n`` float64 images whose means drift with the index, so which samples the
    BatchNorm correction reads shows in the running statistics."""
    g = torch.Generator().manual_seed(3)
    x = (
        torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64)
        + torch.linspace(0, 3, n, dtype=torch.float64)[:, None, None, None]
    )
    return torch.utils.data.TensorDataset(x, torch.randint(0, 5, (n,), generator=g))


#: (name, data as (dataset size, batch size), bn_samples): batches of 3; the correction reads 7 of
#: 31 samples (a share of the data, chosen over all ranks), or every sample (bn_samples=0)
BN_SCENARIOS = [("share", (31, 3), 7), ("share-of-4", (30, 4), 9), ("all", (31, 3), 0)]


def _bn_prune(loader, bn_samples: int) -> dict[str, torch.Tensor]:
    model = _bn_model()
    pruner = StructuredPruner(
        model, torch.randn(1, 3, 6, 6, dtype=torch.float64), pruning_ratio=0.4, covariance_rows=0, bn_samples=bn_samples
    )
    pruner.collect_activations(loader, progress=False)
    return pruner.prune().state_dict()


def _bn_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=300)
    )
    try:
        for name, (n, bs), cap in BN_SCENARIOS:
            loader = torch.utils.data.DataLoader(_images(n), batch_size=bs)
            torch.save(_bn_prune(shard(loader), cap), Path(out) / f"{name}-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_correct_batchnorm_on_the_samples_one_process_reads(tmp_path):
    """Under ``torch.distributed`` each rank spread ``bn_samples`` over its own shard, so two
    ranks read twice the samples of one process (and other ones): the pruned model's
    BatchNorm running statistics differed from one process's (DigitsCNN under torchrun, the
    command line's default ``--bn-samples 256`` over 398 calibration images: by up to 0.012;
    the weights were equal). The batches are now chosen over every rank's batches, and a
    sharded DataLoader holds whole batches of the loader: the same model to round-off."""
    import torch.multiprocessing as mp

    mp.spawn(_bn_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (n, bs), cap in BN_SCENARIOS:
            ref = _bn_prune(torch.utils.data.DataLoader(_images(n), batch_size=bs), cap)
            if cap:  # the share read changes the statistics: the comparison can tell
                every = _bn_prune(torch.utils.data.DataLoader(_images(n), batch_size=bs), 0)
                assert float((every["4.running_mean"] - ref["4.running_mean"]).abs().max()) > 1e-3, name
            for rank in range(WORLD):
                got = torch.load(tmp_path / f"{name}-{rank}.pt")
                assert got.keys() == ref.keys()
                for key, value in ref.items():
                    assert got[key].shape == value.shape, (name, key)
                    if value.is_floating_point():
                        assert torch.allclose(got[key], value, rtol=0, atol=1e-12), (name, rank, key)
                    else:
                        assert torch.equal(got[key], value), (name, rank, key)
    finally:
        torch.set_num_threads(threads)


def test_a_sharded_loader_holds_whole_batches_of_the_loader_in_order():
    data = torch.utils.data.TensorDataset(torch.arange(31))
    for bs, world in ((3, 2), (4, 3), (5, 7), (32, 2)):
        loader = torch.utils.data.DataLoader(data, batch_size=bs)
        whole = [b[0].tolist() for b in loader]
        parts = [[b[0].tolist() for b in shard(loader, r, world)] for r in range(world)]
        assert sum(parts, []) == whole, (bs, world)  # the loader's own batches, every one once, in order
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1, (bs, world, sizes)
