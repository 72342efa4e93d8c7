"""Peak process memory of calibrating and pruning on a stream (a generator, no length),
against the stream's length: the "bounded memory" promise of the product's step 2.

Each length runs in a fresh process (peak RSS is a high-water mark): torchvision
ResNet-18 (10 classes, random weights), batches of 16 images at 64 px drawn from a seeded
generator, the default path at ratio 0.5, one thread. Reported: the peak RSS growth over
the process after the model's first forward, once after ``collect_activations`` and once
after ``prune()``; the BatchNorm calls whose original input moments were kept; whether
the BatchNorm statistics were corrected.

    python benchmarks/stream_memory.py [--batches 10,50,200,400]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, warnings
import torch, torchvision
from cleanai_core import StructuredPruner
torch.set_num_threads(1)
n = int(sys.argv[1])
model = torchvision.models.resnet18(num_classes=10).eval()
example = torch.randn(1, 3, 64, 64)
with torch.no_grad():
    model(torch.randn(16, 3, 64, 64))
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss()
def stream():
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        yield torch.randn(16, 3, 64, 64, generator=g)
pruner = StructuredPruner(model, example, pruning_ratio=0.5)
pruner.collect_activations(stream(), progress=False)
collected = rss() - base
calls = sum(len(v) for v in pruner.calibration.moments.values())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pruner.prune()
corrected = not any("not corrected" in str(w.message) for w in caught)
print(json.dumps({"batches": n, "collect_mb": collected, "prune_mb": rss() - base, "calls": calls,
                  "corrected": corrected}))
"""


def measure(batches: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(batches)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="10,50,200,400", help="stream lengths, comma-separated")
    args = ap.parse_args()
    print("| batches (16 images, 64 px) | peak RSS growth after collection (MB) | after prune() (MB) "
          "| norm calls kept | BN corrected |")  # fmt: skip
    print("|---|---|---|---|---|")
    for n in (int(b) for b in args.batches.split(",")):
        r = measure(n)
        done = "yes" if r["corrected"] else "no"
        print(f"| {n} | {r['collect_mb']:.0f} | {r['prune_mb']:.0f} | {r['calls']} | {done} |", flush=True)


if __name__ == "__main__":
    main()
