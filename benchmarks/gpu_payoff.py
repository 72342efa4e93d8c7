"""What pruning pays on a GPU: latency speed-up against FLOPs reduction.

For the benchmark models of ``benchmarks/speed.py`` (``pretrained=False``): prune on the
GPU (ratio 0.5, ``round_to=8`` so widths stay tensor-core friendly, magnitude importance,
as speed.py), then time the original and the pruned model at batch 256 in bfloat16 and
channels-last (CUDA events, ``torch.inference_mode``, cudnn autotuning, warm-up), in
alternating rounds so that clock or thermal drift hits both alike. Prints a markdown
table: FLOPs reduction (at batch 1), GPU speed-up, and their ratio (1.0 = the speed-up
the FLOPs promise), with the best-known peer's speed-up beside ours when given.

Usage (no install needed)::

    PYTHONPATH=. python benchmarks/gpu_payoff.py [--models resnet50,vit_small] [--batch 256]
        [--repeats 20] [--peer-json peer.json] [--out gpu_payoff.md]

``--peer-json`` holds ``{"resnet50": 1.9, ...}``: a peer's speed-ups measured the same way
on the same GPU (this script never imports a pruning library). Exits with status 2 and a
message when no CUDA GPU is present. A model that fails (e.g. out of memory) gets a row
with its error; the others still run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # speed.py's model list, and cleanai_core without install

import torch  # noqa: E402
from speed import MODELS, build  # noqa: E402

from cleanai_core import StructuredPruner  # noqa: E402
from cleanai_core.metrics import count_flops, count_params  # noqa: E402


def gpu_ms(model: torch.nn.Module, x: torch.Tensor, iters: int) -> list[float]:
    """Milliseconds of ``iters`` forward passes, each timed with CUDA events (wall clock
    off the GPU, for ``--device cpu`` checks of this script)."""
    out = []
    with torch.inference_mode():
        for _ in range(iters):
            if x.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(x)
                end.record()
                torch.cuda.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                model(x)
                out.append((time.perf_counter() - t0) * 1000.0)
    return out


def paired(before: torch.nn.Module, after: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median ms of each model, timed in alternating rounds after a warm-up."""
    for m in (before, after):
        gpu_ms(m, x, 5)
    rounds = max(1, repeats // 5)
    times: list[list[float]] = [[], []]
    for _ in range(5):
        for k, m in enumerate((before, after)):
            times[k] += gpu_ms(m, x, rounds)
    return statistics.median(times[0]), statistics.median(times[1])


def bench(key: str, args: argparse.Namespace) -> dict:
    kind, name, size = MODELS[key]
    dev = torch.device(args.device)
    model = build(kind, name).to(dev).eval()
    x1 = torch.randn(1, 3, size, size, device=dev)
    pruner = StructuredPruner(model, x1, "magnitude", pruning_ratio=args.ratio, round_to=args.round_to)
    pruned = pruner.prune().eval()
    row = {
        "model": key,
        "params": (count_params(model), count_params(pruned)),
        "flops": (count_flops(model, x1), count_flops(pruned, x1)),
    }
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    fmt = torch.channels_last
    before = model.to(dtype=dtype, memory_format=fmt)
    after = pruned.to(dtype=dtype, memory_format=fmt)
    x = torch.randn(args.batch, 3, size, size, device=dev, dtype=dtype).to(memory_format=fmt)
    row["ms"] = paired(before, after, x, args.repeats)
    return row


def table(rows: list[dict], peer: dict, args: argparse.Namespace) -> str:
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    head = (
        f"GPU payoff on {gpu} (torch {torch.__version__}), batch {args.batch}, {args.dtype}, channels-last, "
        f"ratio {args.ratio}, round_to {args.round_to}; median ms over {args.repeats}+ timed passes per model\n\n"
        "| model | params after | FLOPs reduction | ms before | ms after | GPU speed-up | speed-up / FLOPs reduction "
        "| peer speed-up |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | | | | |")
            continue
        red = r["flops"][0] / r["flops"][1]
        b, a = r["ms"]
        speed = b / a
        keep = r["params"][1] / r["params"][0]
        p = peer.get(r["model"])
        lines.append(
            f"| {r['model']} | {keep:.1%} | {red:.2f}x | {b:.2f} | {a:.2f} | {speed:.2f}x | {speed / red:.2f} "
            f"| {f'{p:.2f}x' if p else 'n/m'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated keys of speed.py's MODELS")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--peer-json", help="JSON {model: speed-up} measured with a peer tool on this GPU")
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only to check this script")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_payoff.py: no CUDA GPU is available (torch.cuda.is_available() is False); "
            "run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch.",
            file=sys.stderr,
        )
        return 2
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    torch.backends.cudnn.benchmark = True
    empty_cache = torch.cuda.empty_cache if torch.cuda.is_available() else (lambda: None)
    peer = json.loads(Path(args.peer_json).read_text()) if args.peer_json else {}
    rows = []
    for key in args.models.split(","):
        try:
            rows.append(bench(key, args))
        except Exception as exc:  # one model's failure (OOM, a missing package) leaves a row, not a crash
            traceback.print_exc()
            rows.append({"model": key, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
            empty_cache()
        print(f"done {key}", file=sys.stderr, flush=True)
    text = table(rows, peer, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
