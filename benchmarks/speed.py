"""What pruning costs and what it pays, on CPU.

For a fixed set of torchvision and timm models (``pretrained=False``), median of repeats:

- time to build the dependency graph, to plan and to apply (ratio 0.5, magnitude);
- activation collection time as a ratio to plain inference over the same batches, with
  calibration batches of 8 and of 32 images (the covariance sample is a fixed number of
  positions per batch, so its share falls as batches grow);
- bytes held by the statistics after 1, 10 and 50 calibration batches (must stay flat);
- latency of the pruned model against the original at batch 1 and 32 (and batch 32 on
  one thread), with and without
  ``round_to=8``, next to the FLOPs reduction (equal speed-up and FLOPs reduction is the
  limit where all work scales with FLOPs; element-wise work only scales with the width),
  eager and frozen by TorchScript;
- every conv and linear of one model timed alone, before and after, by arithmetic intensity.

Ratios (collection / inference, speed-ups) are medians of per-repeat ratios of runs timed
back to back, so a change in the machine's speed between phases cancels.

The default path (activation statistics, compensation, BatchNorm correction) is timed stage
by stage on the seven benchmark models as timm builds them (``--stages``, :mod:`stages`; the
issue's goals are on the first four), with its ratios to plain inference.

``--allocator no-faults`` runs the measurement in a process whose glibc never maps fresh
pages for a tensor (:data:`NO_FAULTS`, what a caching allocator such as jemalloc gives):
with the default allocator plain inference of EfficientNet-B0 took 0.62 CPU s in one
process and 1.03 s in another (session 18), half of it page faults, so every ratio to it
moved with the allocator's state rather than with the code.

Usage: ``python benchmarks/speed.py [--models resnet50,vit_small] [--stages resnet50] [--repeats 5]
[--payoff-only] [--allocator no-faults] [--out docs/benchmarks.md]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from cleanai_core import DependencyGraph, StructuredPruner
from cleanai_core.calibration import stats_nbytes
from cleanai_core.metrics import count_flops, measure_latency

sys.path.insert(0, str(Path(__file__).parent))
from stages import STAGE_MODELS, render_stages, stage_costs  # noqa: E402

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


def paired_latency(model, pruned, xb, repeats: int) -> tuple[float, float, float]:
    """(ms before, ms after, speed-up): medians over pairs timed back to back; the speed-up
    is the median of the pairs' ratios."""
    measure_latency(model, xb, repeats=1, warmup=1)  # warm-up
    measure_latency(pruned, xb, repeats=1, warmup=1)
    pairs = [
        (measure_latency(model, xb, repeats=1, warmup=0), measure_latency(pruned, xb, repeats=1, warmup=0))
        for _ in range(repeats)
    ]
    before = statistics.median(b for b, _ in pairs)
    after = statistics.median(a for _, a in pairs)
    return before, after, statistics.median(b / a for b, a in pairs)


class Frozen(torch.nn.Module):
    """``model`` traced, frozen and optimised for inference by TorchScript; the graph is
    held outside the module tree, which a frozen graph cannot join (no train/eval)."""

    def __init__(self, model: torch.nn.Module, x1: torch.Tensor) -> None:
        super().__init__()
        with torch.no_grad():
            graph = torch.jit.freeze(torch.jit.trace(model.eval(), x1, check_trace=False))
            self.graph = [torch.jit.optimize_for_inference(graph)]

    def forward(self, x: torch.Tensor):
        return self.graph[0](x)


def stats_bytes(pruner: StructuredPruner) -> int:
    return stats_nbytes(pruner.stats.values())


def collection_ratios(
    model: torch.nn.Module, x1: torch.Tensor, batches: list[torch.Tensor], repeats: int
) -> tuple[float, float]:
    """Collection time over ``batches`` / plain inference over them, with the covariance
    (the default) and means only: medians of per-repeat ratios."""
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
    return statistics.median(ratios), statistics.median(ratios_stats)


def bench(key: str, repeats: int, calib_batches: int, batch: int, large_batch: int) -> dict:
    kind, name, size = MODELS[key]
    model = build(kind, name)
    x1 = torch.randn(1, 3, size, size)
    row: dict = {"model": key, "batch": batch, "large_batch": large_batch}
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
    row["collect_ratio"], row["collect_ratio_stats"] = collection_ratios(model, x1, batches, repeats)
    if large_batch:
        # fewer, larger batches (the same number of images as 8 small ones at most)
        n = max(1, min(calib_batches, (8 * batch) // large_batch))
        large = [torch.randn(large_batch, 3, size, size) for _ in range(n)]
        row["collect_ratio_large"], row["collect_ratio_large_stats"] = collection_ratios(
            model, x1, large, max(3, repeats // 2)
        )

    # memory of the statistics as batches grow
    mem = []
    for n in (1, 10, 50):
        small = [torch.randn(1, 3, size, size)] * n
        p = StructuredPruner(model, x1, pruning_ratio=0.5)
        p.collect_activations(small, progress=False)
        mem.append(stats_bytes(p))
    row["stats_bytes"] = mem

    row.update(payoff(model, x1, size))
    return row


#: round_to settings whose payoff is measured (None = channel counts as the ratio gives them;
#: "16n": 16 with round_mode="nearest", docs/benchmarks.md session 16)
ROUND_TOS = (None, 8, 16, "16n")


def rounding(rt: int | str | None) -> tuple[int | None, str, str]:
    """(round_to, round_mode, table label) of a :data:`ROUND_TOS` entry."""
    if isinstance(rt, str):
        return int(rt.rstrip("n")), "nearest", f"{rt.rstrip('n')} nearest"
    return rt, "up", str(rt or 1)


def payoff(model: torch.nn.Module, x1: torch.Tensor, size: int, round_tos=ROUND_TOS, frozen: bool = True) -> dict:
    """Latency of the pruned model (magnitude, ratio 0.5) against ``model`` at batch 1 and 32
    (and 32 on one thread) for each ``round_to``, next to the FLOPs reduction; with
    ``frozen``, also both models frozen by TorchScript (round_to None)."""
    row: dict = {}
    for rt in round_tos:
        round_to, mode, _ = rounding(rt)
        pr = StructuredPruner(model, x1, "magnitude", pruning_ratio=0.5, round_to=round_to, round_mode=mode)
        pruned = pr.prune()
        flops_ratio = count_flops(model, x1) / count_flops(pruned, x1)
        tag = f"rt{rt or 1}"
        row[f"flops_x_{tag}"] = flops_ratio
        threads = torch.get_num_threads()
        for bs, nt, cell in ((1, threads, "b1"), (32, threads, "b32"), (32, 1, "b32t1")):
            xb = torch.randn(bs, 3, size, size)
            torch.set_num_threads(nt)
            try:
                row[f"lat_{cell}_{tag}"] = paired_latency(model, pruned, xb, 10 if bs == 1 else 3)
            finally:
                torch.set_num_threads(threads)
        if rt is None and frozen:
            # the same two models as a deployed CPU graph would run them: traced, frozen
            # (BatchNorm folded into the convolutions, conv + ReLU fused, weights packed)
            xb = torch.randn(32, 3, size, size)
            try:
                row["lat_b32_frozen"] = paired_latency(Frozen(model, x1), Frozen(pruned, x1), xb, 3)
            except Exception as exc:  # noqa: BLE001 - a model the tracer cannot take gets "-"
                print(f"  no frozen graph ({type(exc).__name__}: {exc})", file=sys.stderr)
                row["lat_b32_frozen"] = None
    return row


def layer_intensity(key: str, batch: int = 32, repeats: int = 3) -> list[dict]:
    """Every conv and linear of ``key`` timed alone, before and after a uniform 0.5 prune, on
    inputs of the shapes it sees at ``batch``; bucketed by arithmetic intensity (FLOPs per
    byte of input, output and weight in float32) of the original layer.

    Separates the layers' own speed-up from the rest of the model: FLOPs fall with in x out
    channels (4x at half width), bytes only with the width (2x), so a layer bound by memory
    traffic would speed up by ``bytes_x`` rather than ``flops_x``."""
    kind, name, size = MODELS[key]
    model = build(kind, name)
    x1 = torch.randn(1, 3, size, size)
    pruned = StructuredPruner(model, x1, "magnitude", pruning_ratio=0.5).prune()
    xb = torch.randn(batch, 3, size, size)
    kinds = (torch.nn.Conv2d, torch.nn.Linear)

    def shapes(m):
        seen: dict[str, tuple[torch.Size, torch.Size]] = {}

        def record(mod, args, out, n):
            seen.setdefault(n, (args[0].shape, out.shape))  # returns None: the output stays

        hooks = [
            mod.register_forward_hook(lambda mod, a, out, n=n: record(mod, a, out, n))
            for n, mod in m.named_modules()
            if isinstance(mod, kinds)
        ]
        try:
            with torch.no_grad():
                m(xb)
        finally:
            for h in hooks:
                h.remove()
        return seen

    def cost(mod, shp):
        (xs, ys), w = shp, mod.weight
        flops = 2 * ys.numel() * w[0].numel()  # every output element: one dot product over a filter
        return flops, 4 * (xs.numel() + ys.numel() + w.numel())

    def time_ms(mod, shp):
        x = torch.randn(shp[0])
        with torch.no_grad():
            mod(x)
            return 1000 * median_time(lambda: mod(x), repeats)[0]

    s0, s1 = shapes(model), shapes(pruned)
    buckets: dict[str, Counter] = {}  # sums per intensity bucket
    for n, shp in s0.items():
        if n not in s1:
            continue
        m0, m1 = model.get_submodule(n), pruned.get_submodule(n)
        (f0, b0), (f1, b1) = cost(m0, shp), cost(m1, s1[n])
        intensity = f0 / b0
        label = "< 50" if intensity < 50 else ("50-150" if intensity < 150 else ">= 150")
        buckets.setdefault(label, Counter()).update(
            layers=1, ms0=time_ms(m0, shp), ms1=time_ms(m1, s1[n]), f0=f0, f1=f1, b0=b0, b1=b1
        )
    total = sum(a["ms0"] for a in buckets.values())
    return [
        {
            "model": key,
            "intensity": label,
            "layers": a["layers"],
            "share": a["ms0"] / total,
            "speed_up": a["ms0"] / a["ms1"],
            "flops_x": a["f0"] / a["f1"],
            "bytes_x": a["b0"] / a["b1"],
        }
        for label in ("< 50", "50-150", ">= 150")
        if (a := buckets.get(label))
    ]


def render_payoff(rows: list[dict]) -> list[str]:
    """The payoff table: latency before -> after per round_to, against the FLOPs reduction."""
    lines: list[str] = []
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
        for rt in ROUND_TOS:
            tag, label = f"rt{rt or 1}", rounding(rt)[2]
            if f"flops_x_{tag}" not in r:
                continue
            f = r[f"flops_x_{tag}"]
            b1, b32, t1 = r[f"lat_b1_{tag}"], r[f"lat_b32_{tag}"], r[f"lat_b32t1_{tag}"]
            lines.append(
                f"| {r['model']} | {label} | {f:.2f}x | {b1[0]:.1f} -> {b1[1]:.1f} | {b1[2]:.2f}x | "
                f"{b32[0]:.0f} -> {b32[1]:.0f} | {b32[2]:.2f}x | {b32[2] / f:.2f} | "
                f"{t1[0]:.0f} -> {t1[1]:.0f} | {t1[2]:.2f}x | {t1[2] / f:.2f} |"
            )
    return lines


def render(rows: list[dict], layers: list[dict] | None = None) -> str:
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
        "| model | groups | graph | plan | apply | total | peer total |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peer = PEER.get(r["model"])
        peer_s = f"{peer['graph'] + peer['prune']:.2f}" if peer else "-"
        lines.append(
            f"| {r['model']} | {r['groups']} | {r['graph_s']:.3f} | {r['plan_s']:.3f} | {r['apply_s']:.3f} | "
            f"{r['total_s']:.3f} | {peer_s} |"
        )
    large = next((r["large_batch"] for r in rows if r.get("large_batch")), None)
    lines += [
        "",
        "## Activation collection: time / plain inference over the same batches",
        "",
        "Default = means and variances plus the covariance sample for least-squares "
        "reconstruction; means only = `reconstruction=False` (all the weight-activation score needs).",
        "",
        f"| model | batch {rows[0]['batch']}: default | batch {rows[0]['batch']}: means only |"
        + (f" batch {large}: default | batch {large}: means only |" if large else ""),
        "|---|---|---|" + ("---|---|" if large else ""),
    ]
    for r in rows:
        cells = f"| {r['model']} | {r['collect_ratio']:.2f}x | {r['collect_ratio_stats']:.2f}x |"
        if large:
            cells += f" {r['collect_ratio_large']:.2f}x | {r['collect_ratio_large_stats']:.2f}x |"
        lines.append(cells)
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
    lines += render_payoff(rows)
    lines += [
        "",
        "## Payoff in a deployed CPU graph: eager vs TorchScript-frozen, batch 32, round_to=1",
        "",
        "Frozen = `torch.jit.trace` + `torch.jit.freeze` + `optimize_for_inference` (BatchNorm folded into "
        "the convolutions, conv + ReLU fused, weights pre-packed), for the original and the pruned model alike.",
        "",
        "| model | FLOPs x | eager b32 | speed-up | / FLOPs x | frozen b32 | speed-up | / FLOPs x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, e, z = r["flops_x_rt1"], r["lat_b32_rt1"], r.get("lat_b32_frozen")
        frozen_cells = f"{z[0]:.0f} -> {z[1]:.0f} | {z[2]:.2f}x | {z[2] / f:.2f}" if z else "- | - | -"
        lines.append(
            f"| {r['model']} | {f:.2f}x | {e[0]:.0f} -> {e[1]:.0f} | {e[2]:.2f}x | {e[2] / f:.2f} | {frozen_cells} |"
        )
    if layers:
        lines += [
            "",
            f"## Where FLOPs become speed-up: {layers[0]['model']}, batch 32, every conv and linear timed alone",
            "",
            "Layers bucketed by arithmetic intensity of the original layer (FLOPs per byte of input, output "
            "and weight, float32). Time share is of the original layers' summed time.",
            "",
            "| intensity (FLOP/byte) | layers | time share | speed-up | FLOPs x | bytes x |",
            "|---|---|---|---|---|---|",
        ]
        for r in layers:
            lines.append(
                f"| {r['intensity']} | {r['layers']} | {r['share']:.2f} | {r['speed_up']:.2f}x | "
                f"{r['flops_x']:.2f}x | {r['bytes_x']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


NOTES_MARKER = "<!-- notes: kept when the tables above are regenerated -->"


#: glibc settings under which no tensor gets fresh pages after the first pass: no mmap for
#: large blocks, and freed memory kept by the process (session 16, "where the payoff goes")
NO_FAULTS = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"


def _with_allocator(kind: str, argv: list[str] | None) -> None:
    """Run this script again in a process with ``kind``'s glibc settings, unless this one
    has them (the settings are read when a process starts)."""
    if kind == "default" or os.environ.get("GLIBC_TUNABLES") == NO_FAULTS:
        return
    if platform.system() != "Linux":
        raise SystemExit("--allocator no-faults sets glibc's tunables: Linux only")
    env = {**os.environ, "GLIBC_TUNABLES": NO_FAULTS}
    args = sys.argv[1:] if argv is None else argv
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *args], env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--allocator",
        choices=("default", "no-faults"),
        default="default",
        help="no-faults: measure in a process whose glibc gives no tensor fresh pages (see the module doc)",
    )
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the issue measures with 2)")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="images per calibration batch")
    ap.add_argument("--large-batch", type=int, default=32, help="also time collection at this batch size (0 = skip)")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    ap.add_argument("--layers", default="resnet50", help="model for the per-layer intensity table ('' = skip)")
    ap.add_argument(
        "--stages",
        default=",".join(STAGE_MODELS),
        help="timm models for the per-stage table of the default path ('' = skip)",
    )
    ap.add_argument("--payoff-only", action="store_true", help="of the --models, measure the payoff table only")
    args = ap.parse_args(argv)
    _with_allocator(args.allocator, argv)
    torch.set_num_threads(args.threads)
    text = ""
    if args.allocator == "no-faults":
        text += f"Measured with `GLIBC_TUNABLES={NO_FAULTS}` (no page faults after the first pass).\n\n"
    if args.stages:
        stage_rows = []
        for key in args.stages.split(","):
            print(f"stages of {key} ...", file=sys.stderr, flush=True)
            stage_rows.append(stage_costs(key, args.repeats, args.calib_batches, args.batch))
        text += "\n".join(render_stages(stage_rows, args.calib_batches, args.batch)) + "\n\n"
    rows = []
    for key in args.models.split(",") if args.models else ():
        print(f"benchmarking {key} ...", file=sys.stderr, flush=True)
        if args.payoff_only:
            kind, name, size = MODELS[key]
            rows.append({"model": key, **payoff(build(kind, name), torch.randn(1, 3, size, size), size, frozen=False)})
        else:
            rows.append(bench(key, args.repeats, args.calib_batches, args.batch, args.large_batch))
    if args.payoff_only:
        text += "\n".join(render_payoff(rows)) + "\n"
    elif rows:
        layers = layer_intensity(args.layers) if args.layers else None
        text = render(rows, layers) + "\n" + text
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
