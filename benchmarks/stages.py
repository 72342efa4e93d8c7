"""Where the default (activation-aware) path spends its time, stage by stage (issue #21).

For each model, every repeat runs back to back over the same calibration batches:

- *plain*: inference over the batches (``torch.no_grad``), the unit of the ratios;
- *graph*: ``StructuredPruner(...)`` (trace and groups, batch-1 example input);
- *collection*: ``collect_activations`` (channel statistics, covariance sample, BatchNorm
  input moments of the original);
- *prune()*, split into: *scoring* (criterion over every group), *planning* (ranking and
  ratios), *compensation* (covariance formed, least squares, bias folding), *slicing* (the
  copy and the layer pruners, without compensation), *verification* (the pruned and the
  masked original model on the example input, and the slicing alone where compensation
  ran), *BN correction* (passes of the pruned model over the batches),
  and *other* (the rest: counts, bookkeeping);
- *data-free*: graph + ``prune()`` with ``importance="magnitude", bias_compensation=False``
  (:func:`data_free_costs`), three ways: on the same model every repeat (the column kept since
  session 5), on a fresh copy every repeat (*first prune*: what one ``prune()`` of a model
  costs; a model's first verification runs under the write guard and its weights are not in
  the caches), and on a fresh copy in place without verification (*peer's work*:
  ``inplace=True, verify=False``, what the peer does; the goal is not judged on this one);
- *floors* of collection: the same collection with its statistics replaced by no work at
  all (*hooks only*: what the hooks, the layout check and the bookkeeping cost) and by one
  plain ``sum`` per channel of every hooked tensor (*one read*: exact per-channel
  statistics must read each hooked tensor at least once; no covariance sample). They are
  lower bounds for the collection ratio, not a mode of the product (:func:`_floor`).

Stages are timed by wrapping the pruner's private methods for the duration of one call
or the stage modules' functions (see ``_WRAPPED``: the names before and after the kernel's
stage split are both listed); a stage none of whose names exist is reported as "-" (its
time then lands in *other*). Wall time and process CPU time are both kept:
on a shared machine CPU time is the steadier measure of what a stage costs.
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from cleanai_core import StructuredPruner

__all__ = ["STAGE_MODELS", "STAGES", "data_free_costs", "render_stages", "stage_costs"]

#: the seven benchmark models as timm builds them (the issue's goals are on the first four):
#: key -> (timm name, input size)
STAGE_MODELS = {
    "resnet50": ("resnet50", 224),
    "efficientnet_b0": ("efficientnet_b0", 224),
    "vit_small": ("vit_small_patch16_224", 224),
    "convnext_tiny": ("convnext_tiny", 224),
    "resnet18": ("resnet18", 224),
    "mobilenet_v3_large": ("mobilenetv3_large_100", 224),
    "swin_t": ("swin_tiny_patch4_window7_224", 224),
}
#: the peer's (Torch-Pruning 1.6.1) graph + prune seconds for the same criterion on this machine
PEER_TOTAL = {"resnet50": 0.57, "efficientnet_b0": 0.22}
#: the data-free timings of :func:`data_free_costs`
DATA_FREE = ("data_free", "data_free_first", "peer_work")
#: stages of prune(), in the order they run
STAGES = ("scoring", "planning", "compensation", "slicing", "verification", "bn_correction")
#: stage -> where its time is taken: ``("pruner", method)`` of the instance or ``(module, function)``
#: looked up at call time; both the pruner before the stage split (#16) and after it are listed,
#: and the names one of them lacks are skipped. A stage timed inside another (compensation inside
#: slicing, the slicing alone inside verification) is taken out of the enclosing one.
_WRAPPED = {
    "scoring": [("pruner", "_scores"), ("cleanai_core.pruner", "score_groups")],
    "planning": [("cleanai_core.pruner", "make_plan")],
    "compensation": [("pruner", "_compensate"), ("cleanai_core.compensation", "compensate")],
    "slicing": [("cleanai_core.pruner", "_sliced_copy"), ("cleanai_core.pruner", "compensated_copy")],
    "verification": [("pruner", "_verify_exact"), ("pruner", "_verify")],
    "bn_correction": [("pruner", "_correct_bn"), ("cleanai_core.collect", "correct_batchnorm_after")],
}


class _Clock:
    """Wall and CPU seconds of one interval."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


@contextmanager
def _timed_stages(pruner: StructuredPruner, acc: dict[str, list[float]]) -> Iterator[None]:
    """Add each stage's (wall, cpu) seconds into ``acc`` while the block runs."""
    undo = []
    running: list[str] = []  # stages being timed, innermost last: each second counts in one stage only

    def wrap(stage: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if stage in running:  # a wrapped name called inside its own stage
                return fn(*args, **kwargs)
            running.append(stage)
            clock = _Clock()
            try:
                return fn(*args, **kwargs)
            finally:
                running.pop()
                wall, cpu = clock.read()
                _add(acc, stage, wall, cpu)
                if running:  # the enclosing stage's time is its own, without this one
                    _add(acc, running[-1], -wall, -cpu)

        return timed

    for stage, places in _WRAPPED.items():
        for where, attr in places:
            try:
                owner = pruner if where == "pruner" else importlib.import_module(where)
            except ImportError:
                continue
            fn = getattr(owner, attr, None)
            if fn is None:
                continue
            setattr(owner, attr, wrap(stage, fn))
            undo.append((owner, attr, fn, where))
    try:
        yield
    finally:
        for owner, attr, fn, where in reversed(undo):
            if where == "pruner":
                delattr(owner, attr)  # the instance attribute goes; the class method shows again
            else:
                setattr(owner, attr, fn)


def _floor_moments(mode: str):
    """Stand-ins for the per-channel moments ``(count, mean, M2)`` of a hooked tensor."""

    def moments(x: torch.Tensor, dim: int, grouped: bool = False):
        x = x.detach()
        c = x.shape[dim]
        if mode == "hooks":
            zero = torch.zeros(c, dtype=torch.float64)
            return float(x.numel() // c), zero, zero + 1
        sums = x.sum([d for d in range(x.ndim) if d != dim]).to(torch.float64)
        return float(x.numel() // c), sums, sums.abs()

    return moments


@contextmanager
def _floor(mode: str) -> Iterator[bool]:
    """Collection's statistics replaced (``mode`` "hooks": by nothing; "read": by one sum
    per channel) while the block runs; yields False, changing nothing, where one of the
    replaced names is missing (the report then shows "-")."""
    from cleanai_core import bn_correction, calibration

    moments = _floor_moments(mode)
    patches = [
        (calibration, "finite_moments", moments),
        (bn_correction, "_moments", lambda x: moments(x, int(x.ndim > 1)) if torch.is_tensor(x) and x.ndim else None),
        (calibration.ChannelStats, "_add_sample", lambda self, x, reduction: None),
        (bn_correction, "sample_rows", lambda x: None),
    ]
    if not all(hasattr(owner, name) for owner, name, _ in patches):
        yield False
        return
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, fn in patches:
        setattr(owner, name, fn)
    try:
        yield True
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _add(acc: dict[str, list[float]], stage: str, wall: float, cpu: float) -> None:
    acc.setdefault(stage, [0.0, 0.0])
    acc[stage][0] += wall
    acc[stage][1] += cpu


def _build(name: str) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=False).eval()


def data_free_costs(model: torch.nn.Module, x1: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Wall and CPU seconds of one data-free ``prune()`` (graph included) of ``model``
    (``data_free``), of a fresh copy of it (``data_free_first``) and of a fresh copy pruned in
    place without verification (``peer_work``); the copies are made outside the clock."""
    out = {}
    for key, fresh, options in (
        ("data_free", False, {}),
        ("data_free_first", True, {}),
        ("peer_work", True, {"inplace": True, "verify": False}),
    ):
        target = copy.deepcopy(model) if fresh else model
        clock = _Clock()
        StructuredPruner(target, x1, "magnitude", pruning_ratio=0.5, bias_compensation=False, **options).prune()
        out[key] = clock.read()
    return out


def stage_costs(key: str, repeats: int = 3, calib_batches: int = 4, batch: int = 8, floors: bool = True) -> dict:
    """Median per-stage seconds (wall and CPU) and the issue's ratios for one model
    (``floors``: also collection's two floors, see the module doc)."""
    name, size = STAGE_MODELS[key]
    model = _build(name)
    x1 = torch.randn(1, 3, size, size)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(calib_batches)]

    def plain() -> None:
        with torch.no_grad():
            for b in batches:
                model(b)

    plain()  # warm-up
    runs = []
    for _ in range(repeats):
        run: dict[str, tuple[float, float]] = {}
        clock = _Clock()
        plain()
        run["plain"] = clock.read()
        clock = _Clock()
        pr = StructuredPruner(model, x1, pruning_ratio=0.5)
        run["graph"] = clock.read()
        clock = _Clock()
        pr.collect_activations(batches, progress=False)
        run["collection"] = clock.read()
        acc: dict[str, list[float]] = {}
        clock = _Clock()
        with _timed_stages(pr, acc):
            pr.prune()
        run["prune"] = clock.read()
        for stage in STAGES:
            if stage in acc:
                run[stage] = tuple(acc[stage])
        known = [run[s] for s in STAGES if s in run]
        run["other"] = tuple(p - sum(k[i] for k in known) for i, p in enumerate(run["prune"]))
        run.update(data_free_costs(model, x1))
        for mode in ("hooks", "read") if floors else ():
            floor = StructuredPruner(model, x1, pruning_ratio=0.5)
            clock = _Clock()
            with _floor(mode) as patched:
                floor.collect_activations(batches, progress=False)
            if patched:
                run[f"floor_{mode}"] = clock.read()
        runs.append(run)
    row: dict = {"model": key, "load": os.getloadavg()[0]}
    for i, kind in enumerate(("wall", "cpu")):
        for stage in ("plain", "graph", "collection", "prune", *STAGES, "other", *DATA_FREE):
            vals = [r[stage][i] for r in runs if stage in r]
            row[f"{stage}_{kind}"] = statistics.median(vals) if vals else None
        # ratios per repeat (back to back), then the median: drift between repeats cancels
        row[f"collect_x_{kind}"] = statistics.median(r["collection"][i] / r["plain"][i] for r in runs)
        row[f"total_x_{kind}"] = statistics.median((r["collection"][i] + r["prune"][i]) / r["plain"][i] for r in runs)
        for mode in ("hooks", "read"):
            got = [r[f"floor_{mode}"][i] / r["plain"][i] for r in runs if f"floor_{mode}" in r]
            row[f"floor_{mode}_x_{kind}"] = statistics.median(got) if got else None
    peer = PEER_TOTAL.get(key)
    row["peer_s"] = peer
    row["data_free_x_peer"] = row["data_free_wall"] / peer if peer else None
    return row


def _cell(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def render_stages(rows: list[dict], calib_batches: int, batch: int) -> list[str]:
    """Markdown: per-stage CPU seconds, then the issue's ratios (wall and CPU)."""
    loads = [r["load"] for r in rows]
    lines = [
        "## The default path, stage by stage (issue #21)",
        "",
        f"timm models, `pretrained=False`, {calib_batches} calibration batches of {batch} images (224x224), "
        f"ratio 0.5, default criterion (weight-activation, bias compensation + least squares, BatchNorm "
        f"correction), torch threads: {torch.get_num_threads()}; medians of repeats. Machine load (1-min average "
        f"while the rows ran): {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores.",
        "",
        "Process CPU seconds per stage (steadier than wall time on a shared machine):",
        "",
        "| model | plain inference | graph | collection | scoring | planning | compensation | slicing "
        "| verification | BN correction | other | prune() total | data-free |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r[f"{s}_cpu"] for s in ("plain", "graph", "collection", *STAGES, "other", "prune", "data_free")]
        lines.append(f"| {r['model']} | " + " | ".join(_cell(c) for c in cells) + " |")
    lines += [
        "",
        "Ratios to plain inference over the same batches (medians of per-repeat ratios; goal: collection "
        "<= 1.15x, collection + prune() <= 1.5x), and the data-free path (magnitude, no compensation: graph + "
        "prune(), wall seconds) against the peer (goal <= 0.5x). *first prune*: the same on a fresh copy of the "
        "model (what one prune() costs); *peer's work*: a fresh copy pruned in place without verification, what the "
        "peer does (not the goal's measure: the product verifies and copies by default):",
        "",
        "| model | collection (wall) | collection (CPU) | + prune() (wall) | + prune() (CPU) | data-free s "
        "| first prune s | peer's work s | peer s | data-free / peer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['collect_x_wall']:.2f}x | {r['collect_x_cpu']:.2f}x | {r['total_x_wall']:.2f}x "
            f"| {r['total_x_cpu']:.2f}x | {r['data_free_wall']:.3f} | {_cell(r.get('data_free_first_wall'), '{:.3f}')} "
            f"| {_cell(r.get('peer_work_wall'), '{:.3f}')} | {_cell(r['peer_s'])} | {_cell(r['data_free_x_peer'])} |"
        )
    if any(r.get("floor_read_x_wall") is not None for r in rows):
        lines += [
            "",
            "Floors of collection (ratios to plain inference, wall / CPU): the same collection with the statistics "
            "replaced by no work (*hooks only*) and by one sum per channel of each hooked tensor (*one read*, the "
            "least any exact per-channel statistics cost; no covariance sample):",
            "",
            "| model | collection | one read | hooks only |",
            "|---|---|---|---|",
        ]
        for r in rows:
            cells = [
                f"{_cell(r.get(f'{k}_wall'))}x / {_cell(r.get(f'{k}_cpu'))}x"
                for k in ("collect_x", "floor_read_x", "floor_hooks_x")
            ]
            lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    # `stages.py MODEL [REPEATS [THREADS]]`: one row as JSON, to compare checkouts;
    # `stages.py --data-free MODEL [REPEATS [THREADS]]`: the data-free timings alone, medians (CPU s)
    import json
    import sys

    args = sys.argv[1:]
    only_data_free = args[:1] == ["--data-free"]
    args = args[1:] if only_data_free else args
    torch.set_num_threads(int(args[2]) if len(args) > 2 else 2)
    repeats = int(args[1]) if len(args) > 1 else 3
    if only_data_free:
        name, size = STAGE_MODELS[args[0]]
        model, x = _build(name), torch.randn(1, 3, size, size)
        runs = [data_free_costs(model, x) for _ in range(repeats)]
        print(json.dumps({k: statistics.median(r[k][1] for r in runs) for k in DATA_FREE}))
    else:
        print(json.dumps(stage_costs(args[0], repeats)))
