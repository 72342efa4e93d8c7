"""Calibration on ``torch.distributed``: each rank streams its own shard of the data, and
the additive float64 statistics of all ranks are summed with ``all_reduce(SUM)``.

Nothing here starts a process group: it uses the one the user (or ``torchrun``) set up,
gloo on CPU or NCCL on GPUs. With no group, or a group of one, every function is a no-op.

Exactness. Per-channel moments are combined in two steps: counts and sums first (giving
the global mean), then each rank's M2 moved to that global mean (Chan's formula,
``M2_r + n_r (mean_r - mean)^2``) and summed. Covariance co-moments are accumulated on
each rank about its own reference (its first sample's mean); each rank moves its
co-moment to the global covariance mean before the sum. In float64 the result equals a
single process on the union of the shards up to round-off. Covariance rows drawn at
random (``covariance_rows`` smaller than a batch's positions) are drawn per rank, so the
sample differs from a single process's draw (same distribution, not the same rows); with
``covariance_rows=0``, or batches with fewer positions, the sums are the same.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn

from cleanai_core.calibration import CoMoment
from cleanai_core.errors import UserError

__all__ = [
    "check_same_plan",
    "collectively",
    "combine_moments",
    "combine_gradients",
    "combine_stats",
    "from_writer",
    "init_from_env",
    "is_distributed",
    "is_writer",
    "rank_and_world",
    "samples_before",
    "shard",
    "spread_over_ranks",
    "stage",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """True when an initialised process group has more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def is_writer() -> bool:
    """Whether this process writes outputs (rank 0, or a single process)."""
    return rank_and_world()[0] == 0


#: seconds a rank waits in a collective before the job fails (``CLEANAI_DIST_TIMEOUT``)
DEFAULT_TIMEOUT_S = 1800


def init_from_env(device: str) -> tuple[str, bool]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) with no process group
    yet, start one from the environment: NCCL for a CUDA device (each rank on
    ``cuda:LOCAL_RANK`` when the device is plain ``cuda``), else gloo, with a timeout so a
    rank that dies cannot leave the others waiting forever. Returns ``(device, started)``."""
    world = _env_int("WORLD_SIZE", "1")
    if world <= 1:
        return device, False
    import torch.distributed as dist

    if dist.is_initialized():
        return device, False
    rank = _env_int("RANK", None, world)
    local = _env_int("LOCAL_RANK", "0")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:  # "Error initializing torch.distributed using env:// rendezvous ..." traceback
        raise UserError(
            f"WORLD_SIZE={world} and RANK={rank} make this one process of a distributed run, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: start the job with torchrun (torchrun "
            f"--nproc_per_node {world} -m cleanai_core.cli prune ...), or unset WORLD_SIZE for a run in one process."
        )
    cuda = str(device).startswith("cuda")
    if str(device) == "cuda":
        device = f"cuda:{local}"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    timeout = datetime.timedelta(seconds=dist_timeout())
    _bind_group_defaults_early()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return device, True


def _bind_group_defaults_early() -> None:
    """Import ``torch.distributed.nn.functional`` before the process group starts. Its
    functions take ``group=group.WORLD`` as a default argument, read when the module is
    imported: imported later (tracing a model with hooks imports ``torch._dynamo``, which
    imports it), ten defaults held the live group, so ``destroy_process_group()`` could not
    free it: each rank of ``cleanai prune`` under ``torchrun`` left its gloo threads
    (``gloo_tcp_loop``, ``pt_gloo_runloop``) running to the interpreter's teardown, where the
    group was destroyed at last. Imported first, the defaults hold ``None``. Also run when
    this module is imported, for the process groups users start themselves."""
    import importlib

    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        try:
            importlib.import_module("torch.distributed.nn.functional")
        except ImportError:  # a build without it: nothing there to hold a group
            pass


# at import (``from cleanai_core import StructuredPruner``), usually before the user's own
# ``init_process_group``: their ``destroy_process_group()`` then frees the group too
_bind_group_defaults_early()


def _env_int(name: str, default: str | None, below: int | None = None) -> int:
    """An integer from the environment torchrun sets (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``), or a :class:`UserError` naming the variable: text raised ``ValueError:
    invalid literal for int()``, a missing ``RANK`` torch's rendezvous error, and ``RANK=5`` in
    a world of 2 waited for peers that never come."""
    text = os.environ.get(name, default)
    advice = "start the job with torchrun, which sets it, or unset WORLD_SIZE for a run in one process"
    if text is None:
        raise UserError(f"WORLD_SIZE is set, so this is one process of a distributed run, but {name} is not: {advice}.")
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name}={text!r} is not an integer; {advice}.") from None
    if value < 0 or (below is not None and value >= below):
        bound = f" below WORLD_SIZE={below}" if below is not None else ""
        raise UserError(f"{name}={value} is out of range: it must be an integer >= 0{bound}; {advice}.")
    return value


def dist_timeout() -> float:
    """Seconds from ``CLEANAI_DIST_TIMEOUT`` (default :data:`DEFAULT_TIMEOUT_S`), or a
    :class:`UserError`: text raised ``could not convert string to float``."""
    text = os.environ.get("CLEANAI_DIST_TIMEOUT", "").strip()
    if not text:
        return float(DEFAULT_TIMEOUT_S)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UserError(
            f"CLEANAI_DIST_TIMEOUT={text!r} is not a positive number of seconds (the default is {DEFAULT_TIMEOUT_S})."
        )
    return value


def shard(data: Any, rank: int | None = None, world: int | None = None) -> Any:
    """This rank's disjoint share of ``data``, with no padding and no duplicates (unlike
    ``DistributedSampler``): shards may differ in size by one item (a loader's by one batch), or be empty.

    - a map-style dataset (``len`` and indexing): the contiguous block
      ``[n * rank // world, n * (rank + 1) // world)`` as a ``Subset``;
    - a ``DataLoader`` over such a dataset without a custom sampler, or with a
      ``DistributedSampler`` (PyTorch's idiom for sharding, which this one replaces: sharded
      again round-robin, the ranks read 11 of 21 samples): the same loader rebuilt over the
      contiguous block of its *batches* ``[b * rank // world, b * (rank +
      1) // world)`` (batch size, collate, workers kept), so every rank's batches are
      batches of the loader itself, and the ranks together hold exactly its batches, in
      order (the BatchNorm correction then reads the batches one process reads:
      :func:`spread_over_ranks`). A block of samples cut batches at other places;
    - any other iterable of batches: every ``world``-th batch, from the ``rank``-th.
    """
    from torch.utils.data import DataLoader, Subset
    from torch.utils.data.distributed import DistributedSampler
    from torch.utils.data.sampler import SequentialSampler

    if rank is None or world is None:
        rank, world = rank_and_world()
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside a world of {world} processes")
    if world == 1:
        return data
    if isinstance(data, DataLoader):
        sampler = getattr(data, "sampler", None)
        whole = isinstance(sampler, (SequentialSampler, DistributedSampler))
        if _sized(data.dataset) and whole and data.batch_size is not None:
            n, size = len(data.dataset), data.batch_size
            batches = -(-n // size)
            first, end = batches * rank // world * size, min(n, batches * (rank + 1) // world * size)
            return DataLoader(
                Subset(data.dataset, range(first, max(first, end))),
                batch_size=data.batch_size,
                shuffle=False,
                collate_fn=data.collate_fn,
                num_workers=data.num_workers,
                drop_last=data.drop_last,
                pin_memory=data.pin_memory,
            )
        return _EveryNth(data, rank, world)
    if _sized(data) and hasattr(data, "__getitem__"):
        n = len(data)
        return Subset(data, range(n * rank // world, n * (rank + 1) // world))
    if isinstance(data, Iterable):
        return _EveryNth(data, rank, world)
    raise UserError(f"cannot shard a {type(data).__name__}: give a dataset, a DataLoader or an iterable of batches")


def _sized(x: Any) -> bool:
    try:
        len(x)
    except TypeError:
        return False
    return True


class _EveryNth:
    """Every ``world``-th item of an iterable, from the ``rank``-th (re-iterable)."""

    def __init__(self, data: Iterable[Any], rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world

    def __iter__(self):
        for i, item in enumerate(self.data):
            if i % self.world == self.rank:
                yield item


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all ranks (float64, on the communication device; result on CPU)."""
    import torch.distributed as dist

    buf = t.to(_comm_device(), torch.float64).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu()


def share_out(jobs: list[tuple[Callable[[], list[torch.Tensor]], list[tuple[int, ...]]]]) -> list[list[torch.Tensor]]:
    """Run a list of independent computations once across the ranks instead of on every
    rank: job ``i`` (a function returning tensors of the given shapes) runs on rank
    ``i % world`` and its float64 results are broadcast to the others. Every rank must
    call this with the same jobs in the same order (the plan is the same on every rank).
    Without a process group, every job runs here."""
    if not is_distributed():
        return [[t.to(torch.float64) for t in fn()] for fn, _ in jobs]
    import torch.distributed as dist

    rank, world = rank_and_world()
    dev = _comm_device()
    out = []
    for i, (fn, shapes) in enumerate(jobs):
        owner = i % world
        if rank == owner:
            tensors = [t.to(dev, torch.float64).contiguous() for t in fn()]
        else:
            tensors = [torch.empty(shape, dtype=torch.float64, device=dev) for shape in shapes]
        for t in tensors:
            dist.broadcast(t, src=owner)
        out.append([t.cpu() for t in tensors])
    return out


def spread_over_ranks(sizes: list[int], samples: int | None) -> list[int] | None:
    """:func:`~cleanai_core.replay.spread` over the batches of every rank, taken in rank
    order (rank 0's, then rank 1's, ...): the indices among this rank's ``sizes`` of the
    batches it reads, ``None`` for all of them. ``samples`` then counts the samples of the
    whole job, as in one process, and where the ranks hold contiguous blocks of one
    process's batches (:func:`shard`) they read the very batches one process reads. Each
    rank spread ``samples`` over its own shard before 2026-12-02: two ranks read twice the
    BatchNorm correction's samples, and the pruned model's running statistics differed
    from one process's (DigitsCNN under ``torchrun``: by up to 0.012). A collective: every
    rank calls it with its own ``sizes``. Without a process group, :func:`spread` itself."""
    from cleanai_core.replay import spread

    if not is_distributed():
        return spread(sizes, samples)
    rank, _ = rank_and_world()
    counts = _per_rank(len(sizes))
    offset, total = int(counts[:rank].sum()), int(counts.sum())
    every = torch.zeros(total, dtype=torch.float64)
    every[offset : offset + len(sizes)] = torch.tensor(sizes, dtype=torch.float64)
    chosen = spread([int(n) for n in _sum(every).tolist()], samples)
    if chosen is None:
        return None
    return [i - offset for i in chosen if offset <= i < offset + len(sizes)]


def samples_before(count: int) -> int:
    """The samples of the ranks before this one (each rank gives its own ``count``): where
    the ranks hold contiguous blocks of the data in rank order (:func:`shard`), this rank's
    first sample is sample ``samples_before(count)`` of the whole. A collective; 0 without
    a process group."""
    if not is_distributed():
        return 0
    return int(_per_rank(count)[: rank_and_world()[0]].sum())


def _per_rank(value: float) -> torch.Tensor:
    """Every rank's ``value``, by rank (float64; one sum over the ranks)."""
    rank, world = rank_and_world()
    values = torch.zeros(world, dtype=torch.float64)
    values[rank] = value
    return _sum(values)


def collectively(fn: Callable[[], T], what: str, shared: tuple[type[BaseException], ...] = ()) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, raise on every rank (the failing
    rank its own error, the others a :class:`UserError` naming the rank), so no rank is
    left waiting in a collective. An error of a ``shared`` type (an expected outcome, as a
    trial that cannot be pruned that far) is raised on every rank as that type where no
    rank failed otherwise: the ranks take the same branch. A no-op wrapper without a
    process group."""
    if not is_distributed():
        return fn()

    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except BaseException as exc:  # also KeyboardInterrupt: the other ranks must not hang
        error = exc
    expected = error is not None and bool(shared) and isinstance(error, shared)
    world = rank_and_world()[1]
    flags = _per_rank(0.0 if error is None else 1.0 if expected else 2.0)
    failed = [r for r in range(world) if flags[r] > 1.5]
    if error is not None and (not expected or not failed):
        raise error
    if failed:
        raise UserError(f"{what} failed on rank(s) {failed}; see that rank's error above. Every rank stops.")
    others = [r for r in range(world) if flags[r] > 0.5]
    if others:
        raise shared[0](f"{what}: rank(s) {others} raised {shared[0].__name__}; every rank takes it")
    return result  # type: ignore[return-value]


def from_writer(value: T) -> T:
    """Rank 0's ``value`` on every rank (a collective; ``value`` itself without a process
    group): for a choice the ranks make from measurements that differ between them (the
    latency of ``--auto --target-latency``), so that they all prune the same way."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def stage(what: str, then: Callable[..., Any] | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a pipeline stage: run it :func:`collectively`, then (with a process group)
    ``then(result, *args, **kwargs)`` combines what it produced; its return value replaces
    the stage's result."""

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            result = collectively(lambda: fn(*args, **kwargs), what)
            if then is not None and is_distributed():
                result = then(result, *args, **kwargs)
            return result

        return wrapper

    return decorate


def combine_stats(stats: dict, channels: dict | None = None) -> dict:
    """Sum every rank's :class:`~cleanai_core.calibration.ChannelStats` in place, so all
    ranks hold the statistics of the union of their shards. ``channels`` (key -> channel
    count) gives the size of a consumer a rank never saw; otherwise it comes from the
    ranks that did. Raises on every rank when no rank saw any data.

    A :class:`~cleanai_core.calibration.CoMoment` shared by several consumers is reduced
    once, and they share the combined one, where every rank that collected one shares it
    the same way (:func:`_shared_with`); elsewhere each consumer's is reduced on its own."""
    if not is_distributed():
        return stats
    keys = sorted(stats)
    # channel counts (and whether a covariance was collected), agreed by max over ranks
    meta = torch.zeros(2 * len(keys), dtype=torch.float64)
    for i, k in enumerate(keys):
        st = stats[k]
        meta[2 * i] = st.mean.numel() if st.mean is not None else (channels or {}).get(k, 0)
        meta[2 * i + 1] = st.cov_ref.numel() if st.cov_ref is not None else 0
    agreed = _max(meta)
    first = _shared_with(keys, stats)
    # step 1: counts and sums (moments and covariance sample), one reduction
    parts = []
    for i, k in enumerate(keys):
        st, c, cc = stats[k], int(agreed[2 * i]), int(agreed[2 * i + 1])
        parts += [_tensor([st.count]), _sum_of(st.count, st.mean, c)]
        if cc and first[i] == i:
            parts += [_tensor([st.cov_count]), _cov_sum(st, cc)]
    totals = _split(_sum(torch.cat(parts)), parts)
    if sum(float(totals[j][0]) for j in _count_slots(keys, agreed, first)) == 0:
        raise UserError("the calibration data is empty on every rank; give at least one batch")
    # step 2: M2 about the global means, one reduction; co-moments about the global
    # covariance means, one reduction each (once per shared co-moment)
    j = 0
    m2_parts, means = [], {}
    combined: dict[int, CoMoment | None] = {}
    for i, k in enumerate(keys):
        st, c, cc = stats[k], int(agreed[2 * i]), int(agreed[2 * i + 1])
        n, total = float(totals[j][0]), totals[j + 1]
        j += 2
        mean = total / max(n, 1.0)
        means[k] = (n, mean)
        m2_parts.append(_moved_m2(st, mean, c))
        if cc and first[i] == i:
            cn, ctotal = float(totals[j][0]), totals[j + 1]
            j += 2
            cmean = ctotal / max(cn, 1.0)
            combined[i] = _combined_cov(_sum(_moved_comoment(st, cmean, cc)), cn, cmean)
    for i, k in enumerate(keys):
        if int(agreed[2 * i + 1]):
            _set_cov(stats[k], combined[first[i]])
    m2s = _split(_sum(torch.cat(m2_parts)), m2_parts)
    for k, m2 in zip(keys, m2s, strict=True):
        st = stats[k]
        n, mean = means[k]
        if n == 0 or mean.numel() == 0:
            st.count, st.mean, st.m2 = 0.0, None, None
        else:
            st.count, st.mean, st.m2 = n, mean, m2
    return stats


def _shared_with(keys: list, stats: dict) -> list[int]:
    """Per key, the first key (by position) whose co-moment it shares on every rank that
    collected one (itself where it shares none, or where the ranks disagree: one rank's
    readers may part where another's agree). Agreed by one max over ranks of each key's
    first sharer and of its negation (ranks without a co-moment there abstain)."""
    n = len(keys)
    by_object: dict[int, int] = {}
    votes = torch.full((2 * n,), -float(n + 1), dtype=torch.float64)
    for i, k in enumerate(keys):
        m = stats[k].comoment
        if m is not None:
            lead = by_object.setdefault(id(m), i)
            votes[2 * i], votes[2 * i + 1] = lead, -lead
    top = _max(votes)
    out = []
    for i in range(n):
        hi, lo = int(top[2 * i]), -int(top[2 * i + 1])
        out.append(hi if hi >= 0 and hi == lo else i)
    return out


def _count_slots(keys: list, agreed: torch.Tensor, first: list[int]) -> list[int]:
    """Positions of the moment counts in the step-1 list of parts."""
    slots, j = [], 0
    for i in range(len(keys)):
        slots.append(j)
        j += 2 + (2 if int(agreed[2 * i + 1]) and first[i] == i else 0)
    return slots


def _max(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    buf = t.to(_comm_device(), torch.float64)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.cpu()


def _tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(flat.split([p.numel() for p in like]))


def _sum_of(n: float, mean: torch.Tensor | None, c: int) -> torch.Tensor:
    if mean is None:
        return torch.zeros(c, dtype=torch.float64)
    if mean.numel() != c:
        raise UserError(f"a layer saw {mean.numel()} channels on this rank and {c} on another")
    return mean.to(torch.float64) * n


def _moved_m2(st: Any, mean: torch.Tensor, c: int) -> torch.Tensor:
    """This rank's sum of squared deviations about the global ``mean``."""
    if st.mean is None:
        return torch.zeros(c, dtype=torch.float64)
    d = st.mean.to(torch.float64) - mean
    return st.m2.to(torch.float64) + st.count * d * d


def _cov_sum(st: Any, cc: int) -> torch.Tensor:
    """Sum of this rank's covariance sample (float64)."""
    if st.cov_ref is None:
        return torch.zeros(cc, dtype=torch.float64)
    return st.cov_ref.to("cpu", torch.float64) * st.cov_count + st.cov_offset.to("cpu", torch.float64)


def _moved_comoment(st: Any, g: torch.Tensor, cc: int) -> torch.Tensor:
    """``sum (x - g)(x - g)^T`` of this rank's covariance sample, full and symmetric
    (float64): ``S + e o^T + o e^T + n e e^T`` with ``e = ref - g`` and ``o`` the sum of
    ``x - ref``."""
    if st.cov_ref is None:
        return torch.zeros(cc, cc, dtype=torch.float64)
    s = st.cov_block.to("cpu", torch.float64, copy=True)
    if st.cov_total is not None:  # None before the first flush
        s += st.cov_total.to("cpu", torch.float64)
    s = s.triu_()  # the accumulators fill the blocks on and above the diagonal
    s += s.triu(1).T
    e = st.cov_ref.to("cpu", torch.float64) - g
    o = st.cov_offset.to("cpu", torch.float64)
    s += torch.outer(e, o) + torch.outer(o, e) + st.cov_count * torch.outer(e, e)
    return s


def _combined_cov(comoment: torch.Tensor, n: float, g: torch.Tensor) -> CoMoment | None:
    """A co-moment holding the combined ``comoment`` about ``g`` (None where no rank sampled any)."""
    if n == 0:
        return None
    return CoMoment(g, torch.zeros_like(comoment), comoment, torch.zeros_like(g), n)


def _set_cov(st: Any, m: CoMoment | None) -> None:
    """Make ``st`` a member of the combined co-moment ``m`` (none where ``m`` is None)."""
    st.comoment = None
    if m is not None:
        m.add_member(st)


def combine_gradients(model: nn.Module, gradients: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's summed gradients (taylor importance) summed over ranks; a parameter
    with no gradient on one rank counts as zero there."""
    if not is_distributed():
        return gradients
    names = [n for n, _ in model.named_parameters()]
    has = _sum(torch.tensor([n in gradients for n in names], dtype=torch.float64))
    params = dict(model.named_parameters())
    out = {}
    for name, h in zip(names, has, strict=True):
        if h > 0:
            g = gradients.get(name)
            local = g if g is not None else torch.zeros_like(params[name])
            out[name] = _sum(local).to(local.device, local.dtype)
    return out


def combine_moments(totals: list[list], channels: list[int]) -> None:
    """Per-channel moment totals ``[count, mean, M2]`` (one list per entry, ``mean`` None
    where this rank saw nothing), summed over all ranks in place: counts and sums first,
    then the squared deviations moved to the global mean."""
    if not is_distributed() or not totals:
        return
    parts = []
    for (n, mean, _), c in zip(totals, channels, strict=True):
        parts += [_tensor([n if mean is not None else 0.0]), _sum_of(n, mean, c)]
    summed = _split(_sum(torch.cat(parts)), parts)
    means = []
    for i, c in enumerate(channels):
        n_all = float(summed[2 * i][0])
        means.append((n_all, summed[2 * i + 1] / n_all if n_all > 0 else torch.zeros(c, dtype=torch.float64)))
    parts = []
    for (n, mean, m2), (_, mu), c in zip(totals, means, channels, strict=True):
        if mean is None:
            parts.append(torch.zeros(c, dtype=torch.float64))
        else:
            parts.append(m2.to(torch.float64) + n * (mean.to(torch.float64) - mu) ** 2)
    m2s = _split(_sum(torch.cat(parts)), parts)
    for t, (n_all, mu), m2 in zip(totals, means, m2s, strict=True):
        t[:] = [n_all, mu, m2] if n_all > 0 else [0.0, None, None]


def plan_digest(pruned: torch.Tensor) -> int:
    """A 63-bit hash of a plan's pruned-unit mask."""
    data = bytes(pruned.to(torch.uint8).cpu().tolist())
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1


def check_same_plan(pruned: torch.Tensor) -> None:
    """Raise on every rank unless all ranks planned to prune the very same units."""
    if not is_distributed():
        return
    import torch.distributed as dist

    rank, world = rank_and_world()
    mine = torch.tensor([plan_digest(pruned)], dtype=torch.int64, device=_comm_device())
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    digests = [int(t.item()) for t in every]
    if len(set(digests)) > 1:
        raise UserError(
            f"the ranks computed different pruning plans (plan hashes {digests}); every rank must load the same "
            "model weights and use the same options, and the statistics must be combined before planning"
        )
