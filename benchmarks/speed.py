"""What pruning costs and what it pays, on CPU.

For a fixed set of torchvision and timm models (``pretrained=False``), median of repeats:

- time to build the dependency graph, to plan and to apply (ratio 0.5, magnitude);
- activation collection time as a ratio to plain inference over the same batches;
- bytes held by the statistics after 1, 10 and 50 calibration batches (must stay flat);
- latency of the pruned model against the original at batch 1 and 32 (and batch 32 on
  one thread), with and without
  ``round_to=8``, next to the FLOPs reduction (equal speed-up and FLOPs reduction is the
  physical limit).

Ratios (collection / inference, speed-ups) are medians of per-repeat ratios of runs timed
back to back, so a change in the machine's speed between phases cancels.

Usage: ``python benchmarks/speed.py [--models resnet50,vit_small] [--repeats 5] [--out docs/benchmarks.md]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core.metrics import count_flops, measure_latency

MODELS = {
    "resnet18": ("torchvision", "resnet18", 224),
    "resnet50": ("torchvision", "resnet50", 224),
    "mobilenet_v3_large": ("torchvision", "mobilenet_v3_large", 224),
    "efficientnet_b0": ("torchvision", "efficientnet_b0", 224),
    "convnext_tiny": ("torchvision", "convnext_tiny", 224),
    "vit_small": ("timm", "vit_small_patch16_224", 224),
    "swin_t": ("torchvision", "swin_t", 224),
}

# Torch-Pruning 1.6.1 on this project's 2-core machine, ResNet-50, ratio 0.5 (issue #7).
PEER = {"resnet50": {"graph": 0.23, "prune": 0.34}}


def build(kind: str, name: str) -> torch.nn.Module:
    if kind == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval()
    import torchvision

    return torchvision.models.get_model(name, weights=None).eval()


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def stats_bytes(pruner: StructuredPruner) -> int:
    return sum(s.nbytes for s in pruner.stats.values())


def bench(key: str, repeats: int, calib_batches: int, batch: int) -> dict:
    kind, name, size = MODELS[key]
    model = build(kind, name)
    x1 = torch.randn(1, 3, size, size)
    row: dict = {"model": key}
    row["graph_s"], graph = median_time(lambda: DependencyGraph(model, x1), repeats)
    row["groups"] = len(graph.groups(prunable_only=True))

    def make():
        return StructuredPruner(model, x1, "magnitude", pruning_ratio=0.5)

    plans, applies = [], []
    for _ in range(repeats):
        pruner = make()
        t0 = time.perf_counter()
        pruner.plan()
        t1 = time.perf_counter()
        pruner.prune()
        t2 = time.perf_counter()
        plans.append(t1 - t0)
        applies.append(t2 - t1)
    row["plan_s"], row["apply_s"] = statistics.median(plans), statistics.median(applies)
    row["total_s"] = row["graph_s"] + row["plan_s"] + row["apply_s"]

    # activation collection vs plain inference over the same batches
    batches = [torch.randn(batch, 3, size, size) for _ in range(calib_batches)]
    wa = StructuredPruner(model, x1, pruning_ratio=0.5)
    stats_only = StructuredPruner(model, x1, pruning_ratio=0.5, reconstruction=False)

    def plain():
        with torch.no_grad():
            for b in batches:
                model(b)

    # interleaved: each repeat times inference and both collections back to back, and the
    # ratios of each repeat are taken before the median, so drift in the machine's speed
    # between phases does not land on one side of a ratio
    plain()
    ratios, ratios_stats = [], []
    for _ in range(repeats):
        t_plain, _ = median_time(plain, 1)
        t_coll, _ = median_time(lambda: wa.collect_activations(batches, progress=False), 1)
        t_stats, _ = median_time(lambda: stats_only.collect_activations(batches, progress=False), 1)
        ratios.append(t_coll / t_plain)
        ratios_stats.append(t_stats / t_plain)
    row["collect_ratio"] = statistics.median(ratios)
    row["collect_ratio_stats"] = statistics.median(ratios_stats)

    # memory of the statistics as batches grow
    mem = []
    for n in (1, 10, 50):
        small = [torch.randn(1, 3, size, size)] * n
        p = StructuredPruner(model, x1, pruning_ratio=0.5)
        p.collect_activations(small, progress=False)
        mem.append(stats_bytes(p))
    row["stats_bytes"] = mem

    # latency payoff
    for rt in (None, 8):
        pr = StructuredPruner(model, x1, "magnitude", pruning_ratio=0.5, round_to=rt)
        pruned = pr.prune()
        flops_ratio = count_flops(model, x1) / count_flops(pruned, x1)
        tag = "rt8" if rt else "rt1"
        row[f"flops_x_{tag}"] = flops_ratio
        threads = torch.get_num_threads()
        for bs, nt, key in ((1, threads, "b1"), (32, threads, "b32"), (32, 1, "b32t1")):
            xb = torch.randn(bs, 3, size, size)
            reps = 10 if bs == 1 else 3
            torch.set_num_threads(nt)
            try:
                measure_latency(model, xb, repeats=1, warmup=1)  # warm-up
                measure_latency(pruned, xb, repeats=1, warmup=1)
                # pairs timed back to back; the speed-up is the median of the pairs' ratios
                pairs = [
                    (measure_latency(model, xb, repeats=1, warmup=0), measure_latency(pruned, xb, repeats=1, warmup=0))
                    for _ in range(reps)
                ]
            finally:
                torch.set_num_threads(threads)
            before = statistics.median(b for b, _ in pairs)
            after = statistics.median(a for _, a in pairs)
            row[f"lat_{key}_{tag}"] = (before, after, statistics.median(b / a for b, a in pairs))
    return row


def render(rows: list[dict]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}. Medians of repeats; "
        "ratio 0.5, magnitude criterion, classifier kept, `pretrained=False`, input 224x224.",
        "",
        "## Cost: graph, plan, apply (seconds, batch-1 example input)",
        "",
        "| model | groups | graph | plan | apply | total | peer total | collection / inference "
        "(means + covariance, default) | collection / inference (means only) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peer = PEER.get(r["model"])
        peer_s = f"{peer['graph'] + peer['prune']:.2f}" if peer else "-"
        lines.append(
            f"| {r['model']} | {r['groups']} | {r['graph_s']:.3f} | {r['plan_s']:.3f} | {r['apply_s']:.3f} | "
            f"{r['total_s']:.3f} | {peer_s} | {r['collect_ratio']:.2f}x | {r['collect_ratio_stats']:.2f}x |"
        )
    lines += [
        "",
        "## Memory of the statistics, covariance included (bytes after 1 / 10 / 50 calibration batches)",
        "",
        "| model | 1 | 10 | 50 |",
        "|---|---|---|---|",
    ]
    for r in rows:
        a, b, c = r["stats_bytes"]
        lines.append(f"| {r['model']} | {a} | {b} | {c} |")
    lines += [
        "",
        "## Payoff: latency (ms) before -> after, speed-up, against the FLOPs reduction",
        "",
        f"Batch 1 and batch 32 with {torch.get_num_threads()} threads, and batch 32 with 1 thread "
        "(one core per request, as in many serving setups).",
        "",
        "| model | round_to | FLOPs x | batch 1 | speed-up b1 | batch 32 | speed-up b32 | b32 speed-up / FLOPs x "
        "| batch 32, 1 thread | speed-up | / FLOPs x |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for tag, label in (("rt1", "1"), ("rt8", "8")):
            f = r[f"flops_x_{tag}"]
            b1, b32, t1 = r[f"lat_b1_{tag}"], r[f"lat_b32_{tag}"], r[f"lat_b32t1_{tag}"]
            lines.append(
                f"| {r['model']} | {label} | {f:.2f}x | {b1[0]:.1f} -> {b1[1]:.1f} | {b1[2]:.2f}x | "
                f"{b32[0]:.0f} -> {b32[1]:.0f} | {b32[2]:.2f}x | {b32[2] / f:.2f} | "
                f"{t1[0]:.0f} -> {t1[1]:.0f} | {t1[2]:.2f}x | {t1[2] / f:.2f} |"
            )
    return "\n".join(lines) + "\n"


NOTES_MARKER = "<!-- notes: kept when the tables above are regenerated -->"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    rows = []
    for key in args.models.split(","):
        print(f"benchmarking {key} ...", file=sys.stderr, flush=True)
        rows.append(bench(key, args.repeats, args.calib_batches, args.batch))
    text = render(rows)
    print(text)
    if args.out:
        path = Path(args.out)
        old = path.read_text() if path.exists() else ""
        if NOTES_MARKER in old:  # hand-written analysis below the marker survives
            text += "\n" + old[old.index(NOTES_MARKER) :]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
