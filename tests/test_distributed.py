"""Calibration on torch.distributed: two gloo processes on CPU give the same pruned model
as one process on the union of their shards (unequal shards, and an empty one)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import small_convnet
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.distributed import rank_and_world, shard

WORLD = 2
#: the scenarios every worker runs: (name, pruner options, number of union batches)
SCENARIOS = [
    # 5 batches: rank 0 streams batches 0, 2, 4 and rank 1 batches 1, 3; two steps re-collect
    ("unequal", {"iterative_steps": 2}, 5),
    # 1 batch: rank 1's shard is empty
    ("empty", {}, 1),
    # gradients (taylor) summed over ranks
    ("taylor", {"importance": "taylor"}, 3),
    # taylor with rank 1's shard empty: that rank has no gradients, but takes part in the sum
    ("empty-taylor", {"importance": "taylor"}, 1),
]
#: the command line on 12 samples in batches of 2, at most 3 batches for the whole job
CLI_ARGS = [
    *("--model", "model.pth", "--trust-model", "--data", "data.npz", "--batch-size", "2", "--calib-batches", "3"),
    *("--calib-fraction", "0.6", "--ratio", "0.5", "--threads", "1", "--latency-repeats", "1", "--quiet"),
]


def _cli_inputs(folder: Path) -> None:
    """A small pickled CNN and 12 grey 8 x 8 images with labels (``--data data.npz``)."""
    import numpy as np

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    torch.save(model, folder / "model.pth")
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x=rng.integers(0, 255, (12, 8, 8), dtype=np.uint8), y=rng.integers(0, 10, 12))


def _cli(folder: Path, out: str) -> None:
    from cleanai_core.cli import main

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main(["prune", *CLI_ARGS, "--out", out]) == 0
    finally:
        os.chdir(cwd)


def _cli_refused(folder: Path, out: str, rank: int) -> None:
    """The command line with an ``--out`` that exists: its exit code and what it said, per rank."""
    import contextlib
    import io

    from cleanai_core.cli import main

    cwd, said = os.getcwd(), io.StringIO()
    os.chdir(folder)
    try:
        with contextlib.redirect_stderr(said):
            code = main(["prune", *CLI_ARGS, "--out", out])
    finally:
        os.chdir(cwd)
    (folder / f"refused-{rank}.txt").write_text(f"{code}\n{said.getvalue()}")


def _model() -> nn.Module:
    return small_convnet(8, 16, 32, 5).double()


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of 3 float64 images (6 x 6: 108 positions per batch, under the
    covariance row sample, so every position is used) with shifted means and labels."""
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(3, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + i, torch.randint(0, 5, (3,), generator=g))
        for i in range(n)
    ]


def _prune(options: dict, batches: list) -> tuple[dict, list]:
    model = _model().eval()
    pruner = StructuredPruner(model, torch.randn(1, 3, 6, 6, dtype=torch.float64), pruning_ratio=0.4, **options)
    pruner.collect_activations(batches, progress=False)
    pruned = pruner.prune()
    indices = [(rec["name"], rec["pruned_indices"]) for rec in pruner.report()["layers"]]
    return pruned.state_dict(), indices


def _count_solves() -> list:
    """Count the least-squares solves this process makes (compensation's ``regress``)."""
    from cleanai_core import compensation

    calls: list = []
    real = compensation.regress

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    compensation.regress = counting
    return calls


def _worker(rank: int, init_file: str, out: str) -> None:
    """Every scenario on this rank's shard; then one where rank 1's data is broken, after
    which both ranks must raise (no hang)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a rank left waiting fails the test in minutes rather than hanging it for the default 30;
    # not shorter: rank 1 waits in a collective while rank 0 writes the CLI outputs (120 s
    # aborted a rank on a loaded machine)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=600)
    )
    solves = _count_solves()
    try:
        assert rank_and_world() == (rank, WORLD)
        for name, options, n in SCENARIOS:
            mine = shard(_batches(n))
            solves.clear()
            torch.save(_prune(options, mine), Path(out) / f"{name}-{rank}.pt")
            (Path(out) / f"{name}-{rank}.solves").write_text(str(len(solves)))
        dist.barrier()
        _cli(Path(out), "cli")  # the command line inside the process group: rank 0 writes cli/
        _cli_refused(Path(out), "cli", rank)  # again: cli/ exists, and rank 0 refuses it
        batches = _batches(2)
        if rank == 1:
            batches = [(torch.full((3, 3, 6, 6), float("nan"), dtype=torch.float64), batches[0][1])]
        try:
            _prune({}, batches)
        except Exception as exc:
            (Path(out) / f"error-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder where two spawned gloo ranks left their results."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ranks")
    _cli_inputs(out)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_on_the_union(ranks_out: Path):
    tmp_path = ranks_out
    worst = 0.0
    threads = torch.get_num_threads()
    for name, options, n in SCENARIOS:
        # on one thread, as the ranks ran: the statistics kernel's float32 sums over rows
        # (a (positions, channels) sample) round differently on more threads
        torch.set_num_threads(1)
        try:
            ref_state, ref_indices = _prune(options, _batches(n))
        finally:
            torch.set_num_threads(threads)
        assert any(idx for _, idx in ref_indices), "the reference prunes nothing: the test would prove nothing"
        for rank in range(WORLD):
            state, indices = torch.load(tmp_path / f"{name}-{rank}.pt")
            assert indices == ref_indices, (name, rank)
            assert state.keys() == ref_state.keys()
            for key, ref in ref_state.items():
                assert state[key].shape == ref.shape, (name, key)
                if ref.is_floating_point():
                    diff = float((state[key] - ref).abs().max()) if ref.numel() else 0.0
                    worst = max(worst, diff / max(1.0, float(ref.abs().max())))
                else:
                    assert torch.equal(state[key], ref), (name, key)
    print(f"largest relative difference to one process: {worst:.3g}")
    assert worst < 1e-12


@pytest.mark.slow
def test_the_least_squares_solves_are_shared_out_among_the_ranks(ranks_out: Path):
    from cleanai_core import compensation

    real = compensation.regress
    try:
        solves = _count_solves()
        for name, options, n in SCENARIOS:
            solves.clear()
            _prune(options, _batches(n))
            per_rank = [int((ranks_out / f"{name}-{r}.solves").read_text()) for r in range(WORLD)]
            if len(solves) > 1:  # one process solves them all; two ranks split them
                assert sum(per_rank) == len(solves) and all(0 < k < len(solves) for k in per_rank), (name, per_rank)
            else:
                assert sum(per_rank) == len(solves), (name, per_rank)
    finally:
        compensation.regress = real


@pytest.mark.slow
def test_an_out_folder_rank_0_refuses_stops_every_rank(ranks_out: Path):
    """Only rank 0 checks ``--out`` (it writes there); its refusal must reach rank 1, which
    would otherwise wait in the first collective until the process group's timeout."""
    said = {r: (ranks_out / f"refused-{r}.txt").read_text() for r in range(WORLD)}
    assert said[0].splitlines()[0] == "2" and "exists and is not empty" in said[0]
    assert said[1].splitlines()[0] == "2" and "checking --out failed on rank(s) [0]" in said[1]


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank(ranks_out: Path):
    errors = {r: (ranks_out / f"error-{r}.txt").read_text() for r in range(WORLD)}
    assert "non-finite activations" in errors[1]
    assert "failed on rank(s) [1]" in errors[0]


def test_shard_is_disjoint_and_unpadded():
    data = list(range(7))
    dataset = torch.utils.data.TensorDataset(torch.arange(7))
    for world in (1, 2, 3, 9):
        parts = [list(shard(data, r, world)) for r in range(world)]
        assert sorted(x for p in parts for x in p) == data
        blocks = [[int(x[0]) for x in shard(dataset, r, world)] for r in range(world)]
        assert sum(blocks, []) == data  # contiguous, in order, nothing repeated
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert [len(list(shard(data, r, 9))) for r in range(9)].count(0) == 2  # empty shards, no padding
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    got = [torch.cat([b[0] for b in shard(loader, r, 2)]).tolist() for r in range(2)]
    assert got == [[0, 1, 2, 3], [4, 5, 6]]  # whole batches of the loader (session 23: blocks of samples)


@pytest.mark.slow
def test_calib_batches_counts_the_batches_of_the_whole_job(ranks_out: Path):
    """``--calib-batches 3`` on two ranks reads the 3 batches one process reads, shared
    between the ranks (not 3 per rank): the same pruned model, written once, by rank 0."""
    os.environ.setdefault("CLEANAI_DISABLE_PLUGIN_AUTOLOAD", "1")
    _cli(ranks_out, "cli-one")
    ranks = torch.load(ranks_out / "cli" / "model.pt", weights_only=False)
    one = torch.load(ranks_out / "cli-one" / "model.pt", weights_only=False)
    assert ranks.keys() == one.keys()
    for key, ref in one.items():
        if isinstance(ref, torch.Tensor):
            assert ranks[key].shape == ref.shape, key
            assert torch.allclose(ranks[key].double(), ref.double(), atol=1e-4), key
