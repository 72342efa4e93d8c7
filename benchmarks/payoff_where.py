"""Where the pruned model's time does not fall with its FLOPs: every ATen op timed by CPU time.

Glossary:

- *op kind*: the bucket an ATen op's time goes to: ``conv dense`` (groups 1), ``conv
  depthwise`` (one input channel per group), ``conv grouped``, ``linear`` (mm / addmm),
  ``attention`` (bmm, softmax, fused attention), ``norm``, ``activation``, ``elementwise``
  (add, mul, ...), ``pool`` (pooling and means), ``copy`` (clone, copy, cat, roll, pad,
  permute and other layout work), ``other``.
- *op time*: ``time.thread_time()`` around one op, on one torch thread: CPU time of the
  calling thread, which other processes on a loaded machine do not inflate (wall clock
  does); the op runs with the mode that times it switched off, so the kernels are the ones
  an untimed forward pass calls.
- *FLOPs*: PyTorch's own counter (``torch.utils.flop_counter``'s registry, FLOPs = 2 x
  MACs) per op, the same for the original and the pruned model; fused CPU attention, which
  that registry does not know, is counted as its two matrix products.

The original and the pruned model (magnitude, ratio 0.5, ``round_to`` as given) run the same
sequence of ops, so ops pair by position: the table gives, per op kind, the share of the
original's time, the speed-up and the FLOPs reduction; the widest gaps are listed op by op.

Usage: ``python benchmarks/payoff_where.py [--models mobilenet_v3_large,...] [--batch 16]
[--repeats 5] [--round-to 16 --round-mode nearest] [--channels-last] [--top 8]`` (one
thread; medians of the repeats per op).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from cleanai_core import StructuredPruner

sys.path.insert(0, str(Path(__file__).parent))
from speed import MODELS, build  # noqa: E402

KINDS = ("conv dense", "conv depthwise", "conv grouped", "linear", "attention", "norm", "activation")
KINDS += ("elementwise", "pool", "copy", "other")

_NAMES = {
    "linear": {"mm", "addmm", "linear"},
    "attention": {"bmm", "baddbmm", "_softmax", "softmax", "_safe_softmax"},
    "norm": {"native_batch_norm", "_native_batch_norm_legit_no_training", "native_layer_norm", "native_group_norm"},
    "activation": {"relu", "relu_", "hardswish", "hardswish_", "silu", "silu_", "gelu", "gelu_", "sigmoid", "sigmoid_"}
    | {"hardsigmoid", "hardsigmoid_", "clamp", "clamp_", "hardtanh", "hardtanh_", "tanh"},
    "elementwise": {"add", "add_", "mul", "mul_", "div", "div_", "sub", "sub_", "masked_fill", "where", "neg"},
    "pool": {"mean", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "max_pool2d_with_indices", "avg_pool2d", "sum"},
    "copy": {"clone", "copy_", "_to_copy", "cat", "roll", "constant_pad_nd", "pad", "permute", "transpose", "t"}
    | {"view", "_unsafe_view", "reshape", "expand", "slice", "select", "index", "unsqueeze", "squeeze", "flatten"}
    | {"contiguous", "split", "split_with_sizes", "unbind", "narrow", "stack", "index_select", "as_strided"},
}


def op_kind(func, args) -> str:
    name = func._overloadpacket.__name__
    if name == "convolution":
        weight, groups = args[1], args[8]
        if groups == 1:
            return "conv dense"
        return "conv depthwise" if weight.shape[1] == 1 else "conv grouped"
    if "scaled_dot_product" in name:
        return "attention"
    for kind, names in _NAMES.items():
        if name in names:
            return kind
    return "other"


def op_flops(func, args, kwargs, out) -> int:
    packet = func._overloadpacket
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    if "scaled_dot_product" in packet.__name__:  # QK^T and AV of a fused CPU kernel
        q, k, v = args[:3]
        return 2 * q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0


class OpTimer(TorchDispatchMode):
    """Records (kind, op name, CPU seconds, FLOPs, output shape) of every ATen op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, str, float, int, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t0 = time.thread_time()
        out = func(*args, **kwargs)
        dt = time.thread_time() - t0
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
        flops = op_flops(func, args, kwargs, out)
        self.ops.append((op_kind(func, args), func._overloadpacket.__name__, dt, flops, shape))
        return out


def time_ops(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> list[tuple[str, str, float, int, tuple]]:
    """One entry per op of a forward pass: its CPU time is the median over ``repeats`` passes."""
    runs = []
    with torch.no_grad():
        model(x)  # warm-up: weight packing, allocator
        for _ in range(repeats):
            timer = OpTimer()
            with timer:
                model(x)
            runs.append(timer.ops)
    first = runs[0]
    return [(k, n, statistics.median(r[i][2] for r in runs), f, s) for i, (k, n, _, f, s) in enumerate(first)]


def forward_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median CPU time of a whole forward pass, untimed op by op (ms)."""
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            t0 = time.thread_time()
            model(x)
            times.append(time.thread_time() - t0)
    return 1000 * statistics.median(times)


def where(
    key: str, batch: int, repeats: int, round_to: int | None, top: int, round_mode: str = "up", layout=None
) -> dict:
    """``key``'s original and pruned model timed op by op; ``layout``: a memory format for
    both models and the input (e.g. ``torch.channels_last``)."""
    kind, name, size = MODELS[key]
    layout = layout or torch.contiguous_format
    model = build(kind, name).to(memory_format=layout)
    x1 = torch.randn(1, 3, size, size)
    pruned = StructuredPruner(
        model, x1, "magnitude", pruning_ratio=0.5, round_to=round_to, round_mode=round_mode
    ).prune()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    a, b = time_ops(model, x, repeats), time_ops(pruned, x, repeats)
    whole = [(forward_ms(model, x, 1), forward_ms(pruned, x, 1)) for _ in range(repeats)]
    if [o[1] for o in a] != [o[1] for o in b]:
        raise SystemExit(f"{key}: the pruned model runs other ops than the original; ops cannot pair")
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0, 0])
    for (k, _, t0, f0, _), (_, _, t1, f1, _) in zip(a, b, strict=True):
        s = sums[k]
        s[0], s[1], s[2], s[3] = s[0] + t0, s[1] + t1, s[2] + f0, s[3] + f1
    total0, total1 = sum(s[0] for s in sums.values()), sum(s[1] for s in sums.values())
    flops0, flops1 = sum(s[2] for s in sums.values()), sum(s[3] for s in sums.values())
    # an op's excess: its pruned time over the time it would take at the model's FLOPs reduction
    fx = flops0 / flops1
    pairs = zip(a, b, strict=True)
    gaps = sorted(
        ((t1 - t0 / fx, n, k, s0, s1, t0, t1) for (k, n, t0, _, s0), (_, _, t1, _, s1) in pairs), reverse=True
    )
    return {
        "model": key,
        "ms0": 1000 * total0,
        "ms1": 1000 * total1,
        "flops_x": fx,
        "whole": (statistics.median(w[0] for w in whole), statistics.median(w[1] for w in whole)),
        "whole_x": statistics.median(w[0] / w[1] for w in whole),
        "kinds": {k: sums[k] for k in KINDS if k in sums},
        "gaps": gaps[:top],
    }


def render(r: dict) -> str:
    lines = [
        f"{r['model']}: {r['ms0']:.0f} -> {r['ms1']:.0f} ms CPU, speed-up {r['ms0'] / r['ms1']:.2f}x, "
        f"FLOPs {r['flops_x']:.2f}x, ratio {r['ms0'] / r['ms1'] / r['flops_x']:.2f}; whole forward "
        f"{r['whole'][0]:.0f} -> {r['whole'][1]:.0f} ms, {r['whole_x']:.2f}x, ratio {r['whole_x'] / r['flops_x']:.2f}",
        "| op kind | share of original | ms before -> after | speed-up | FLOPs x | share of pruned |",
        "|---|---|---|---|---|---|",
    ]
    for k, (t0, t1, f0, f1) in r["kinds"].items():
        fx = f"{f0 / f1:.2f}x" if f1 else "-"
        lines.append(
            f"| {k} | {t0 / (r['ms0'] / 1000):.3f} | {1000 * t0:.1f} -> {1000 * t1:.1f} | {t0 / t1:.2f}x | {fx} | "
            f"{t1 / (r['ms1'] / 1000):.3f} |"
        )
    lines.append("widest gaps (ms the pruned op takes over the original's / the FLOPs reduction): op, kind, shape, ms")
    for gap, n, k, s0, s1, t0, t1 in r["gaps"]:
        lines.append(f"  {1000 * gap:7.2f}  {n} ({k}) {s0} -> {s1}: {1000 * t0:.2f} -> {1000 * t1:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenet_v3_large,efficientnet_b0,convnext_tiny,swin_t")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--round-to", type=int, default=None)
    ap.add_argument("--round-mode", default="up", choices=("up", "nearest"))
    ap.add_argument("--channels-last", action="store_true", help="both models and the input in channels-last")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for key in args.models.split(","):
        layout = torch.channels_last if args.channels_last else None
        r = where(key, args.batch, args.repeats, args.round_to, args.top, args.round_mode, layout)
        print(render(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
