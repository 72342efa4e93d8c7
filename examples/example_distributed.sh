#!/usr/bin/env bash
# Calibration on two CPU processes: `cleanai prune` under torchrun, on the digits that ship with CleanAI.
#
# Each rank streams its own shard of the calibration split; the statistics are summed with one
# all_reduce each (gloo on CPU), every rank computes the same plan, and rank 0 evaluates and
# writes the output folder. Run it from the repository root (about 30 s on a CPU):
#
#     bash examples/example_distributed.sh            # writes to a temporary folder
#     bash examples/example_distributed.sh pruned/    # or to pruned/
#
# On GPUs the same command takes --device cuda and one process per GPU (--nproc_per_node 8).
set -euo pipefail

OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# 1. A trained DigitsCNN: train it on 1000 of the 1797 digits that ship with CleanAI
#    (cleanai_plugins.io.demo.DATA_PATH) and save its weights and the other 797 images, scaled
#    to [0, 1] the way the model saw them (the packaged file holds raw pixels 0..16), as test.npz.
"$PYTHON" -c "
import sys, numpy as np, torch
from cleanai_plugins.io.demo import digits_tensors, train_digits_cnn
x, y = digits_tensors()
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, test = perm[:1000], perm[1000:]
torch.save(train_digits_cnn(x[train], y[train], epochs=6).state_dict(), sys.argv[1] + '/digits_cnn.pt')
np.savez(sys.argv[1] + '/test.npz', x=x[test].numpy(), y=y[test].numpy())
" "$OUT"

# 2. Prune to half the FLOPs with calibration sharded over two processes (gloo, CPU). Half of
#    test.npz (--calib-fraction, default 0.5) calibrates, split between the ranks; rank 0
#    measures the accuracy on the other half.
#    torchrun (torch.distributed.run) sets RANK/WORLD_SIZE; the CLI starts the process group and shards the calibration split.
torchrun --nproc_per_node 2 --standalone -m cleanai_core.cli prune \
    --model cleanai_plugins.io.demo:DigitsCNN --weights "$OUT/digits_cnn.pt" \
    --data "$OUT/test.npz" --target-flops 0.5 --out "$OUT/pruned" --overwrite --quiet

# 3. The report's headline, from the report.json rank 0 wrote.
"$PYTHON" -c "
import json, sys
r = json.load(open(sys.argv[1]))
print(f\"params: {r['params_before']} -> {r['params_after']}, flops: {r['flops_before']} -> {r['flops_after']}, accuracy: {r['accuracy_before']:.4f} -> {r['accuracy_after']:.4f}, {r['calibration_samples']} calibration samples over 2 ranks\")
" "$OUT/pruned/report.json"
echo "output folder: $OUT/pruned"
