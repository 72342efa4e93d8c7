"""Does rounding kept counts to 4 / 8 / 16 pay for one kind of layer? (issue #21, session 16)

Each layer kind the benchmark models prune is timed at every channel count of a window
around the width it keeps at ratio 0.5, on one thread by ``time.thread_time()`` (CPU time
of the calling thread: other processes on a loaded machine do not inflate it), as
nanoseconds per channel and image: a count the kernels like shows as a dip below its
neighbours. Counts are timed interleaved (every count once per round, median over rounds).

Usage: ``python benchmarks/round_to_kinds.py [--rounds 7] [--batch 8] [--kinds dw3,bn,...]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _dw(c: int, k: int, hw: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    return torch.nn.Conv2d(c, c, k, padding=k // 2, groups=c), (c, hw, hw)


#: kind -> (description, channel counts, factory(C) -> (module, input shape of one image))
KINDS = {
    "dw3": ("depthwise 3x3 conv, 56x56", range(28, 53), lambda c: _dw(c, 3, 56)),
    "dw5": ("depthwise 5x5 conv, 28x28", range(60, 85), lambda c: _dw(c, 5, 28)),
    "dw7": ("depthwise 7x7 conv, 56x56 (ConvNeXt)", range(40, 57), lambda c: _dw(c, 7, 56)),
    "dws": ("depthwise 3x3 conv, 112x112 (MobileNet's first block)", range(4, 21), lambda c: _dw(c, 3, 112)),
    "c3": ("3x3 conv C -> C, 28x28", range(52, 77), lambda c: (torch.nn.Conv2d(c, c, 3, padding=1), (c, 28, 28))),
    "pw": ("1x1 conv C -> 2C, 28x28", range(52, 77), lambda c: (torch.nn.Conv2d(c, 2 * c, 1), (c, 28, 28))),
    "bn": ("BatchNorm2d (eval), 56x56", range(28, 53), lambda c: (torch.nn.BatchNorm2d(c), (c, 56, 56))),
    "ln": ("LayerNorm over C, 56x56 tokens", range(40, 57), lambda c: (torch.nn.LayerNorm(c), (56 * 56, c))),
    "lin": ("Linear C -> 4C, 28x28 tokens", range(184, 201), lambda c: (torch.nn.Linear(c, 4 * c), (28 * 28, c))),
    "gelu": ("GELU, 28x28 tokens x C", range(184, 201), lambda c: (torch.nn.GELU(), (28 * 28, c))),
}


def _cpu_ns(fn, reps: int) -> float:
    fn()
    t0 = time.thread_time_ns()
    for _ in range(reps):
        fn()
    return (time.thread_time_ns() - t0) / reps


def kind_table(kind: str, batch: int, rounds: int, reps: int = 3) -> list[tuple[int, float]]:
    """(C, ns per channel and image) for every count of ``kind``'s window: medians over rounds."""
    _, counts, make = KINDS[kind]
    cases = {}
    for c in counts:
        mod, shape = make(c)
        cases[c] = (mod.eval(), torch.randn(batch, *shape))
    times: dict[int, list[float]] = {c: [] for c in counts}
    with torch.no_grad():
        for _ in range(rounds):
            for c, (mod, x) in cases.items():
                times[c].append(_cpu_ns(lambda mod=mod, x=x: mod(x), reps) / (c * batch))
    return [(c, statistics.median(times[c])) for c in counts]


def render(kind: str, rows: list[tuple[int, float]]) -> str:
    """One line per count, with the multiple of 16 / 8 / 4 it is and its cost against the
    median of the counts that are not multiples of 4."""
    plain = statistics.median(t for c, t in rows if c % 4)
    lines = [f"{kind}: {KINDS[kind][0]} (ns per channel and image; x = against the median of counts not /4)"]
    for c, t in rows:
        tag = "16" if c % 16 == 0 else "8" if c % 8 == 0 else "4" if c % 4 == 0 else ""
        lines.append(f"  {c:4d} {tag:>2} {t:9.1f}  x{t / plain:.2f}")
    by = {
        m: statistics.median(t for c, t in rows if c % m == 0) / plain
        for m in (4, 8, 16)
        if any(c % m == 0 for c, _ in rows)
    }
    lines.append("  median x of multiples: " + ", ".join(f"{m}: {v:.2f}" for m, v in by.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for kind in args.kinds.split(","):
        print(render(kind, kind_table(kind, args.batch, args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
