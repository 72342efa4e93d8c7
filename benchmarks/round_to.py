"""Does rounding kept channel counts to a multiple pay on this CPU? (issue #21)

Two measurements, 2 threads:

1. *Layers*: a 3x3 convolution (batch 32, 28x28, C -> C) and a linear (batch 32 x 197
   tokens, C -> 4C) timed at every channel count C of a window, as microseconds per
   million multiply-adds: a count the kernels like shows as a dip. Counts are timed
   interleaved (every count once per round, median over rounds), so a change in the
   machine's load lands on all of them.
2. *Models*: the four timm models pruned at ratio 0.4 (``magnitude``) with ``round_to``
   None, 8 and 16, latency at batch 1 and 32 against the unpruned model, timed back to back.

Usage: ``python benchmarks/round_to.py [--models resnet50,...] [--rounds 7]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from cleanai_core import StructuredPruner
from cleanai_core.metrics import count_flops, measure_latency


def _ms(fn, reps: int = 3) -> float:
    with torch.no_grad():
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
    return (time.perf_counter() - t0) / reps * 1000


def layer_table(counts: list[int], rounds: int) -> list[tuple[int, float, float]]:
    """Per channel count: (C, conv us per M MACs, linear us per M MACs), medians over rounds."""
    convs = {c: (torch.nn.Conv2d(c, c, 3, padding=1).eval(), torch.randn(32, c, 28, 28)) for c in counts}
    lins = {c: (torch.nn.Linear(c, 4 * c).eval(), torch.randn(32 * 197, c)) for c in counts}
    times: dict[int, list[tuple[float, float]]] = {c: [] for c in counts}
    for _ in range(rounds):
        for c in counts:
            conv, x = convs[c]
            lin, t = lins[c]
            conv_macs = 32 * 28 * 28 * c * c * 9 / 1e6
            lin_macs = 32 * 197 * c * 4 * c / 1e6
            times[c].append((_ms(lambda: conv(x)) * 1e3 / conv_macs, _ms(lambda: lin(t)) * 1e3 / lin_macs))
    return [(c, statistics.median(a for a, _ in times[c]), statistics.median(b for _, b in times[c])) for c in counts]


def model_table(keys: list[str], ratio: float = 0.4) -> list[dict]:
    import timm
    from stages import STAGE_MODELS

    rows = []
    for key in keys:
        name, size = STAGE_MODELS[key]
        model = timm.create_model(name, pretrained=False).eval()
        x1 = torch.randn(1, 3, size, size)
        for rt in (None, 8, 16):
            pruned = StructuredPruner(model, x1, "magnitude", pruning_ratio=ratio, round_to=rt).prune()
            flops_x = count_flops(model, x1) / count_flops(pruned, x1)
            row = {"model": key, "round_to": rt or 1, "flops_x": flops_x}
            for bs, reps in ((1, 10), (32, 3)):
                xb = torch.randn(bs, 3, size, size)
                measure_latency(model, xb, repeats=1, warmup=1)
                measure_latency(pruned, xb, repeats=1, warmup=1)
                pairs = [
                    (measure_latency(model, xb, repeats=1, warmup=0), measure_latency(pruned, xb, repeats=1, warmup=0))
                    for _ in range(reps)
                ]
                row[f"b{bs}"] = statistics.median(a / b for a, b in pairs)
                row[f"b{bs}_ms"] = statistics.median(b for _, b in pairs)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,efficientnet_b0,vit_small,convnext_tiny")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--counts", default="56-72,248-264")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    counts = []
    for part in args.counts.split(","):
        lo, hi = map(int, part.split("-"))
        counts += list(range(lo, hi + 1))
    print("| C | conv 3x3 us / M MACs | linear us / M MACs |\n|---|---|---|")
    for c, conv, lin in layer_table(counts, args.rounds):
        mark = " (x16)" if c % 16 == 0 else (" (x8)" if c % 8 == 0 else "")
        print(f"| {c}{mark} | {conv:.1f} | {lin:.1f} |", flush=True)
    if args.models:
        print("\n| model | round_to | FLOPs x | speed-up b1 | speed-up b32 | pruned b1 ms | pruned b32 ms |")
        print("|---|---|---|---|---|---|---|")
        for r in model_table(args.models.split(",")):
            print(
                f"| {r['model']} | {r['round_to']} | {r['flops_x']:.2f}x | {r['b1']:.2f}x | {r['b32']:.2f}x "
                f"| {r['b1_ms']:.1f} | {r['b32_ms']:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
