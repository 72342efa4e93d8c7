"""Peak resident memory and time of pruning a random-weight Llama-architecture model end to end.

Builds ``LlamaForCausalLM(LlamaConfig(...))`` from a config (no download), calibrates on
random token batches (whole model, or ``--sequential`` block by block), prunes (ratio 0.3
by default, with the default compensation and reconstruction) and prints one JSON line:
parameters before and after, seconds per stage, and the peak resident set size of the
process after each stage (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), next to the
model's own size. Run one configuration per process: peak RSS never goes down.

Usage::

    PYTHONPATH=. python benchmarks/llm_memory.py --hidden 2048 --intermediate 5504 --layers 18 \\
        --heads 16 --dtype bf16 --sequential --batches 4 --seq 128
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cleanai_core import StructuredPruner  # noqa: E402
from cleanai_core.calibration import stats_nbytes  # noqa: E402


def peak_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--budget", type=int, default=None, help="stats_budget_bytes (default: the library's 1 GiB)")
    ap.add_argument("--no-reconstruction", action="store_true")
    args = ap.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    out: dict = {"args": vars(args), "peak_gib": {"start": peak_gib()}, "seconds": {}}
    t = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out["seconds"][name] = round(now - t, 1)
        out["peak_gib"][name] = peak_gib()
        t = now
        print(f"{name}: {out['seconds'][name]} s, peak {out['peak_gib'][name]} GiB", file=sys.stderr, flush=True)

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq),
    )
    torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy of the weights first
    try:
        model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    out["params_before"] = n_params
    out["model_gib"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 3)
    stage("build")
    g = torch.Generator().manual_seed(1)
    batches = [
        {"input_ids": torch.randint(0, args.vocab, (args.batch_size, args.seq), generator=g)}
        for _ in range(args.batches)
    ]
    options = {"stats_budget_bytes": args.budget} if args.budget is not None else {}
    pruner = StructuredPruner(
        model,
        {"input_ids": batches[0]["input_ids"][:, :8]},
        pruning_ratio=args.ratio,
        output_transform=lambda o: o.logits,
        reconstruction=not args.no_reconstruction,
        **options,
    )
    stage("graph")
    pruner.collect_activations(batches, progress=False, sequential=args.sequential)
    out["stats_gib"] = round(stats_nbytes(pruner.stats.values()) / 2**30, 3)
    out["with_covariance"] = sum(s.cov_ref is not None for s in pruner.stats.values())
    stage("calibrate")
    pruned = pruner.prune()
    stage("prune")
    out["params_after"] = sum(p.numel() for p in pruned.parameters())
    with torch.no_grad():
        logits = pruned(**batches[0]).logits
    out["output_shape"] = list(logits.shape)
    out["output_finite"] = bool(torch.isfinite(logits).all())
    stage("run_pruned")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
