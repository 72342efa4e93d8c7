"""Collection cost and covariance memory, one model per run, for an A/B of two checkouts
(session 17: consumers of one tensor share their co-moment).

    OMP_NUM_THREADS=1 python benchmarks/shared_gram.py --repo /path/to/checkout --model resnet50

Runs the checkout's ``collect_activations`` on 4 batches of 8 (224 px for the timm models,
pretrained=False; 8 x 128 tokens for the small Llama) on one thread, ``--repeats`` times,
and prints one JSON line: the least CPU time of this thread (``time.thread_time``) per
collection and in its co-moment products (``_add_gram``, with their number), the
covariance memory (a co-moment shared by several consumers counted once), and a SHA-1
of every consumer's covariance matrix (equal digests: the same bits).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings

import torch

LLAMA = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 12,
         "num_key_value_heads": 4, "vocab_size": 1000, "max_position_embeddings": 256}  # fmt: skip


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "llama":
        import transformers

        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
        batches = [torch.randint(0, LLAMA["vocab_size"], (8, 128), generator=g) for _ in range(4)]
        return model, batches[0][:1], batches
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    batches = [torch.randn(8, 3, 224, 224, generator=g) for _ in range(4)]
    return model, batches[0][:1], batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, help="the checkout whose cleanai_core is measured")
    parser.add_argument("--model", required=True, help="a timm model name, or 'llama'")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prune", action="store_true", help="also prune, and digest the pruned weights")
    args = parser.parse_args()
    sys.path.insert(0, args.repo)
    from cleanai_core import StructuredPruner, calibration

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model, example, batches = build(args.model)
    gram = [0.0, 0]  # CPU seconds in the co-moment's product, and its calls (one collection)
    product = calibration._add_gram

    def timed(acc: torch.Tensor, x: torch.Tensor) -> None:
        start = time.thread_time()
        product(acc, x)
        gram[0] += time.thread_time() - start
        gram[1] += 1

    calibration._add_gram = timed
    best, best_gram, stats = float("inf"), float("inf"), None
    for _ in range(args.repeats):
        pruner = StructuredPruner(model, example, pruning_ratio=0.5)
        gram[:] = [0.0, 0]
        start = time.thread_time()
        pruner.collect_activations(batches, progress=False)
        best = min(best, time.thread_time() - start)
        best_gram = min(best_gram, gram[0])
        stats = pruner.stats
    values = list(stats.values())
    counted = getattr(calibration, "stats_nbytes", lambda v: sum(s.nbytes for s in v))
    cov_bytes = counted(values) - sum(s.mean.numel() * 16 for s in values if s.mean is not None)
    digest = hashlib.sha1()
    for key in sorted(stats):
        cov = stats[key].cov
        if cov is not None:
            digest.update(repr(key).encode() + cov.numpy().tobytes())
    shared = {id(s.comoment) for s in values if getattr(s, "comoment", None) is not None}
    with_cov = sum(s.has_cov for s in values)
    out = {"model": args.model, "repo": args.repo, "collect_s": round(best, 3), "gram_s": round(best_gram, 3),
           "gram_calls": gram[1], "cov_bytes": cov_bytes, "with_cov": with_cov, "grams": len(shared) or with_cov,
           "cov_sha1": digest.hexdigest()}  # fmt: skip
    if args.prune:  # the compensated weights (least squares on the shared co-moments), the same bits
        pruned = pruner.prune()
        weights = hashlib.sha1()
        for name, t in sorted(pruned.state_dict().items()):
            weights.update(name.encode() + t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        out["pruned_sha1"] = weights.hexdigest()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
