"""Cost of ``cleanai prune --auto`` on a torchvision model (issue #18): calibration,
sensitivity trials and allocation, timed separately, with the machine's load beside them.

Random weights and random images (the cost does not depend on what the model learned).
On a shared machine the wall-clock seconds grow with the load; the CPU seconds (all
threads of this process) much less.
Run::

    python benchmarks/sensitivity_cost.py                       # ResNet-50, 256 + 32 images, 224 px
    python benchmarks/sensitivity_cost.py --model resnet18 --calibration 16 --images 8 --size 112
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torchvision

from cleanai_core import StructuredPruner
from cleanai_core.sensitivity import allocate_ratios, analyse_sensitivity


def batches(n: int, size: int, seed: int, batch: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(min(batch, n - i), 3, size, size, generator=g) for i in range(0, n, batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--calibration", type=int, default=256, help="images streamed for the statistics")
    ap.add_argument("--images", type=int, default=32, help="images each sensitivity trial runs")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-flops", type=float, default=0.5)
    ap.add_argument("--slow", action="store_true", help="every trial runs the whole model (fast=False)")
    ap.add_argument("--bn-passes", type=int, default=1, help="BatchNorm correction passes per trial (0: none)")
    ap.add_argument("--profile", action="store_true", help="cProfile the sensitivity trials")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    example = torch.randn(1, 3, args.size, args.size)
    times, cpu, loads = {}, {}, {}

    def timed(name, fn):
        loads[name] = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
        loads[name] = (loads[name] + os.getloadavg()[0]) / 2
        return out

    pruner = StructuredPruner(model, example, ignored_layers=[model.fc])
    timed("calibration", lambda: pruner.collect_activations(batches(args.calibration, args.size, 1), progress=False))
    data = batches(args.images, args.size, 2)

    def sensitivity():
        return analyse_sensitivity(pruner, data, progress=False, fast=not args.slow, bn_passes=args.bn_passes)

    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        result = timed("sensitivity", lambda: prof.runcall(sensitivity))
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    else:
        result = timed("sensitivity", sensitivity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alloc = timed("allocation", lambda: allocate_ratios(pruner, result, target_flops=args.target_flops))
    trials = sum(len(c.ratios) - 1 for c in result.curves)
    print(f"{args.model}, {args.size} px, {args.threads} threads; {len(result.curves)} groups, {trials} trials")
    for name, t in times.items():
        print(f"{name}: {t:.1f} s wall, {cpu[name]:.1f} s CPU (load average, start and end: {loads[name]:.1f})")
    print(f"total: {sum(times.values()):.1f} s; allocation: {alloc.method}, keeps {alloc.cost:.3f} of the FLOPs")


if __name__ == "__main__":
    main()
