"""Consumers that read the same tensor share one co-moment (the covariance's Gram sums):
formed and held once, reduced once across ranks, and bit for bit the sums each consumer
would have accumulated alone (the reference: the same collection with sharing switched
off, which is how every consumer accumulated before)."""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core import calibration as cal
from cleanai_core.calibration import ChannelStats, StatsCollector, stats_nbytes
from cleanai_core.graph.dependency import DependencyGraph


@pytest.fixture
def unshared(monkeypatch: pytest.MonkeyPatch):
    """Collection as it was before sharing: every consumer starts a co-moment of its own."""

    def switch_off() -> None:
        monkeypatch.setattr(cal, "_join", lambda *args: False)

    return switch_off


def _groups(stats: dict) -> list[list[str]]:
    """Modules whose statistics hold one co-moment, for co-moments held by several."""
    by_object: dict[int, list[str]] = {}
    for (module, _), st in stats.items():
        if st.comoment is not None:
            by_object.setdefault(id(st.comoment), []).append(module)
    return sorted(sorted(g) for g in by_object.values() if len(g) > 1)


def _prune(model: nn.Module, example, batches, **options) -> tuple[StructuredPruner, nn.Module]:
    pruner = StructuredPruner(model, example, **{"pruning_ratio": 0.4, **options})
    pruner.collect_activations(batches, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pruner, pruner.prune().eval()


def _same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


def _cov_fields(st: ChannelStats) -> tuple:
    return st.cov, st.cov_mean, st.cov_count, st.cov_batches


def _same_stats(shared: dict, alone: dict) -> None:
    assert shared.keys() == alone.keys()
    for key, st in shared.items():
        ref = alone[key]
        assert st.has_cov == ref.has_cov, key
        assert torch.equal(st.mean, ref.mean) and torch.equal(st.m2, ref.m2), key
        if st.has_cov:
            cov, mean, count, batches = _cov_fields(st)
            assert torch.equal(cov, ref.cov) and torch.equal(mean, ref.cov_mean), key
            assert (count, batches) == (ref.cov_count, ref.cov_batches), key


def test_a_resnet_blocks_conv1_and_downsample_share_and_prune_to_the_same_bits(unshared):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    batches = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    example = torch.randn(1, 3, 32, 32)
    runs = []
    for share in (True, False):
        if not share:
            unshared()
        torch.manual_seed(1)
        model = torchvision.models.resnet18(num_classes=10).eval()
        runs.append(_prune(model, example, batches))
    (pruner, pruned), (alone, pruned_alone) = runs
    assert _groups(pruner.stats) == [[f"layer{i}.0.conv1", f"layer{i}.0.downsample.0"] for i in (2, 3, 4)]
    assert _groups(alone.stats) == []
    _same_stats(pruner.stats, alone.stats)
    _same_bits(pruned.state_dict(), pruned_alone.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pruned(x), pruned_alone(x))
    # the three shared Grams (64, 128 and 256 channels: one float32 C x C sum each before the
    # first flush, the reference and the float64 offset) count once
    saved = sum(c * c * 4 + c * 4 + c * 8 for c in (64, 128, 256))
    assert stats_nbytes(alone.stats.values()) - stats_nbytes(pruner.stats.values()) == saved
    assert sum(st.nbytes for st in pruner.stats.values()) == stats_nbytes(alone.stats.values())


def test_a_llamas_qkv_and_gate_up_share_and_prune_to_the_same_logits(unshared):
    batches = [torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    runs = []
    for share in (True, False):
        if not share:
            unshared()
        runs.append(_prune(tiny_llama(32, 64, 100), batches[0][:1], batches))
    (pruner, pruned), (alone, pruned_alone) = runs
    expected = []
    for i in (0, 1):
        layer = f"model.layers.{i}"
        expected += [[f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj"]]
        expected += [[f"{layer}.self_attn.{p}_proj" for p in "kqv"]]
    assert _groups(pruner.stats) == sorted(expected)
    _same_stats(pruner.stats, alone.stats)
    _same_bits(pruned.state_dict(), pruned_alone.state_dict())
    with torch.no_grad():
        assert torch.equal(pruned(batches[1]).logits, pruned_alone(batches[1]).logits)


class Layouts(nn.Module):
    """One tensor ``h`` (batch, 8 channels, 8 positions) read four ways: ``conv`` along its
    channels, ``across`` and ``again`` along its last dim (the positions: another channel
    layout of the very same tensor object), ``view`` through a transposed view (the
    channels again, but another tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(3, 8, 3, padding=1)
        self.conv = nn.Conv1d(8, 4, 1)
        self.across = nn.Linear(8, 4)
        self.again = nn.Linear(8, 4)
        self.view = nn.Linear(8, 4)

    def forward(self, x):
        h = self.stem(x)
        a = self.conv(h).mean(2)
        b = (self.across(h) + self.again(h)).mean(1)
        return a + b + self.view(h.transpose(1, 2)).mean(1)


def test_another_channel_layout_of_one_tensor_is_not_shared():
    torch.manual_seed(0)
    model = Layouts().double().eval()
    data = [torch.randn(n, 3, 8, dtype=torch.float64) for n in (3, 2, 4)]
    graph = DependencyGraph(model, data[0])
    collector = StatsCollector(model, graph.slices, covariance=True, covariance_rows=0)
    with collector.hooks(), torch.no_grad():
        for x in data:
            model(x)
    got = {m: st for (m, _), st in collector.stats.items()}
    assert _groups(collector.stats) == [["across", "again"]]
    assert len({id(got[m].comoment) for m in ("conv", "across", "view")}) == 3
    h = [model.stem(x) for x in data]
    rows = {
        "conv": torch.cat([t.transpose(1, 2).reshape(-1, 8) for t in h]),
        "view": torch.cat([t.transpose(1, 2).reshape(-1, 8) for t in h]),
        "across": torch.cat([t.reshape(-1, 8) for t in h]),
        "again": torch.cat([t.reshape(-1, 8) for t in h]),
    }
    for name, r in rows.items():
        torch.testing.assert_close(got[name].cov, torch.cov(r.T, correction=0), rtol=1e-10, atol=1e-12)
        assert got[name].cov_count == r.shape[0]


class Parting(nn.Module):
    """``a``, ``b`` and ``c`` read ``h``, except: ``b`` reads ``h + 1`` on odd batches,
    ``c`` is skipped on batch 2, and ``a`` reads ``h`` twice on batch 3 (after ``b``, whose
    turn comes first on that batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 6)
        self.a, self.b, self.c = nn.Linear(6, 2), nn.Linear(6, 2), nn.Linear(6, 2)
        self.batch = 0

    def forward(self, x):
        h = self.stem(x)
        i = self.batch
        self.batch += 1
        out = self.b(h + 1 if i % 2 else h)
        out = out + self.a(h)
        if i != 2:
            out = out + self.c(h)
        if i == 3:
            out = out + self.a(h)
        return out


@pytest.mark.parametrize("rows", [0, 5])
def test_readers_that_part_keep_exactly_the_sums_they_read(unshared, rows):
    """However the readers of one tensor part (another input, a skipped batch, a second
    read), each ends with the bits of a co-moment of its own; those that read the same
    samples throughout still share one."""
    torch.manual_seed(0)
    data = [torch.randn(4, 3) for _ in range(6)]
    runs = []
    for share in (True, False):
        if not share:
            unshared()
        torch.manual_seed(1)
        model = Parting().eval()
        graph = DependencyGraph(model, data[0])
        model.batch = 0
        collector = StatsCollector(model, graph.slices, covariance=True, covariance_rows=rows)
        with collector.hooks(), torch.no_grad():
            for x in data:
                model(x)
        runs.append(collector.stats)
    _same_stats(*runs)
    counts = {m: st.cov_batches for (m, _), st in runs[0].items()}
    assert counts == {"stem": 6, "a": 7, "b": 6, "c": 5}
    assert _groups(runs[0]) == []  # every pair parted somewhere
    assert _groups(runs[1]) == []


def test_a_reader_that_starts_late_does_not_join_and_the_last_batch_is_settled():
    """A consumer first called on the second batch gets the sums of the batches it saw
    (not the first batch its co-reader already holds); a sample read by only one of two
    sharers on the last batch is in that one's sums only, settled when the hooks leave."""
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(20, 4, generator=g) * 2 + 1 for _ in range(4)]
    early, late, stops = (ChannelStats(covariance=True) for _ in range(3))
    for i, c in enumerate(chunks):
        red = cal.BatchReduction(c, 1)
        early.update(c, 1, red)
        if i > 0:
            late.update(c, 1, red)
        if i < 3:
            stops.update(c, 1, red)
    assert early.comoment is not late.comoment
    expected = {"early": chunks, "late": chunks[1:], "stops": chunks[:3]}
    for name, st in (("early", early), ("late", late), ("stops", stops)):
        full = torch.cat(expected[name]).double()
        torch.testing.assert_close(st.cov, torch.cov(full.T, correction=0), rtol=1e-5, atol=1e-5)
        assert st.cov_batches == len(expected[name])


def test_stats_nbytes_counts_a_shared_comoment_once():
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    a, b = ChannelStats(covariance=True), ChannelStats(covariance=True)
    red = cal.BatchReduction(x, 1)
    a.update(x, 1, red)
    b.update(x, 1, red)
    assert a.comoment is b.comoment
    own = 2 * 5 * 8  # mean and M2, float64
    gram = 5 * 5 * 4 + 5 * 4 + 5 * 8  # block (float32; no total before a flush), reference, offset (float64)
    assert a.nbytes == b.nbytes == own + gram
    assert stats_nbytes([a, b]) == 2 * own + gram


# -- two gloo ranks ----------------------------------------------------------------------


class Block(nn.Module):
    """A ResNet block with a downsample: ``conv1`` and ``down`` read ``h``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1)
        self.down = nn.Conv2d(8, 12, 1, stride=2)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = self.conv2(torch.relu(self.conv1(h))) + self.down(h)
        return self.head(y.mean((2, 3)))


def _block_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64) + i for i in range(5)]


def _collect(batches: list[torch.Tensor]) -> dict:
    torch.manual_seed(0)
    model = Block().double().eval()
    graph = DependencyGraph(model, batches[0] if batches else torch.zeros(1, 3, 6, 6, dtype=torch.float64))
    collector = StatsCollector(model, graph.slices, covariance=True, covariance_rows=0)
    with collector.hooks(), torch.no_grad():
        for x in batches:
            model(x)
    return collector.stats


def _summary(stats: dict) -> dict:
    return {
        "groups": _groups(stats),
        "stats": {k: (st.count, st.mean, st.m2, st.cov, st.cov_mean, st.cov_count) for k, st in stats.items()},
    }


def _gloo_worker(rank: int, init_file: str, out: str, world: int) -> None:
    import torch.distributed as dist

    from cleanai_core import distributed
    from cleanai_core.distributed import combine_stats, shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))  # fmt: skip
    reduced: list[int] = []
    real = distributed._sum
    distributed._sum = lambda t: reduced.append(t.numel()) or real(t)
    try:
        for scenario in ("agree", "disagree"):
            real_join = cal._join
            if scenario == "disagree" and rank == 1:  # this rank's readers do not share
                cal._join = lambda *args: False
            try:
                stats = _collect(shard(_block_batches()))
            finally:
                cal._join = real_join
            reduced.clear()
            combine_stats(stats)
            torch.save({**_summary(stats), "reduced": sum(reduced)}, Path(out) / f"{scenario}-{world}-{rank}.pt")
        # both ranks done before either tears the group down: a rank that left while the other
        # still talked aborted in gloo's teardown ("terminate called without an active exception",
        # SIGABRT; once in a loaded fresh-clone CI run)
        dist.barrier()
    finally:
        distributed._sum = real
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_gloo_ranks_reduce_a_shared_comoment_once_and_equal_one_process(tmp_path: Path, world: int):
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_gloo_worker, args=(str(tmp_path / "init"), str(tmp_path), world), nprocs=world, join=True)
    torch.set_num_threads(1)
    one = _summary(_collect(_block_batches()))
    assert one["groups"] == [["conv1", "down"]]
    cc = 8  # the shared co-moment's channels: with it reduced once, its C x C sum and C sums less
    results = {s: [torch.load(tmp_path / f"{s}-{world}-{r}.pt") for r in range(world)] for s in ("agree", "disagree")}
    for scenario, ranks in results.items():
        for got in ranks:
            shared = scenario == "agree" or world == 1
            assert got["groups"] == (one["groups"] if shared else [])
            assert got["stats"].keys() == one["stats"].keys()
            for key, ref in one["stats"].items():
                for a, b in zip(got["stats"][key], ref, strict=True):
                    if isinstance(b, torch.Tensor):
                        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
                    else:
                        assert a == b, key
    if world == 2:
        agree, disagree = results["agree"][0]["reduced"], results["disagree"][0]["reduced"]
        assert disagree - agree == cc * cc + cc + 1


# -- the covariance budget ---------------------------------------------------------------


class InPlace(nn.Module):
    """``a`` and ``b`` read ``h``; ``c`` reads it after an in-place ReLU (another tensor then)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a, self.b, self.c = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        y = self.a(h) + self.b(h)
        return y + self.c(torch.relu_(h))


def test_the_trace_says_which_consumers_read_one_tensor():
    graph = DependencyGraph(InPlace().eval(), torch.randn(1, 3, 5, 5))
    reads = {s.module: s.reads for s in graph.slices if s.kind == "in"}
    assert reads["a"] == reads["b"] and reads["a"][1] == 1
    assert len({reads["a"], reads["c"], reads["stem"]}) == 3


def test_the_budget_counts_a_shared_covariance_once(monkeypatch):
    """A tiny Llama (width 32, MLP 64): per layer q/k/v read one tensor, gate/up another,
    o_proj a third; lm_head reads the last norm. A budget of one 32-wide covariance per
    distinct input gives every 32-wide consumer one (counted per consumer, it covered 7 of
    the 13), and the co-moments held are exactly that budget."""
    model = tiny_llama(32, 64, 100)
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    graph = DependencyGraph(model, x[:1])
    narrow = [s for s in graph.slices if s.kind == "in" and s.atoms.numel() == 32 and s.pruner is not None]
    narrow = [s for s in narrow if s.pruner.can_reconstruct(model.get_submodule(s.module), s.name)]
    inputs = {s.reads for s in narrow}
    assert len(narrow) == 2 * 6 + 1 and len(inputs) == 2 * 3 + 1
    budget = len(inputs) * 32 * 32 * 8
    assert cal.covariance_bytes(narrow) == budget
    collector = StatsCollector(model, graph.slices, covariance=True, covariance_budget=budget)
    assert collector.with_covariance == {(s.module, s.name) for s in narrow}
    with collector.hooks(), torch.no_grad():
        model(x)
    held = {id(st.comoment): st.comoment for st in collector.stats.values() if st.comoment is not None}
    assert len(held) == len(inputs)
    # one matrix each until the first flush (FLUSH_BATCHES batches), two from then on: the budget
    assert all(m.total is None for m in held.values())
    assert 2 * sum(m.block.nbytes for m in held.values()) == budget
    monkeypatch.setattr(cal, "FLUSH_BATCHES", 2)
    with collector.hooks(), torch.no_grad():
        model(x)
    assert all(m.batches == 2 and m.total is not None and not m.block.any() for m in held.values())
    assert sum(m.block.nbytes + m.total.nbytes for m in held.values()) == budget
    # a budget of 4 inputs: 4 of them, each with all its readers (counted per consumer: 4 consumers)
    four = StatsCollector(model, graph.slices, covariance=True, covariance_budget=4 * 32 * 32 * 8)
    admitted = {s.reads for s in narrow if (s.module, s.name) in four.with_covariance}
    assert len(admitted) == 4
    assert four.with_covariance == {(s.module, s.name) for s in narrow if s.reads in admitted}
    assert len(four.with_covariance) > 4


def test_dropped_statistics_free_their_shared_sums_without_the_garbage_collector():
    """Statistics and their co-moment form no reference cycle: dropping the statistics frees
    the C x C sums at once (a cycle kept each dropped collection's until the next gc run)."""
    import gc
    import weakref

    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    a, b = ChannelStats(covariance=True), ChannelStats(covariance=True)
    for _ in range(2):
        red = cal.BatchReduction(x, 1)
        a.update(x, 1, red)
        b.update(x, 1, red)
    held = weakref.ref(a.comoment)
    assert a.comoment is b.comoment
    gc.disable()
    try:
        del a, b, red
        assert held() is None
    finally:
        gc.enable()


def test_statistics_with_a_shared_comoment_pickle_and_copy_with_it_shared():
    """Statistics pickle (and deep-copy) as they did before sharing: the copies share one
    co-moment, the same numbers, and go on collecting alike."""
    import copy
    import pickle

    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(30, 5, generator=g) for _ in range(3)]

    def feed(stats: list[ChannelStats], xs: list[torch.Tensor]) -> None:
        for x in xs:
            red = cal.BatchReduction(x, 1)
            for st in stats:
                st.update(x, 1, red)

    a, b = ChannelStats(covariance=True, covariance_rows=8), ChannelStats(covariance=True, covariance_rows=8)
    feed([a, b], chunks[:2])
    for a2, b2 in (pickle.loads(pickle.dumps([a, b])), copy.deepcopy([a, b])):
        assert a2.comoment is b2.comoment and a2.comoment is not a.comoment
        assert torch.equal(a2.cov, a.cov) and a2.cov_batches == 2
        feed([a2, b2], chunks[2:])
        assert a2.comoment is b2.comoment and a2.cov_batches == 3
    feed([a, b], chunks[2:])
    assert torch.equal(a2.cov, a.cov)
