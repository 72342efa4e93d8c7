"""Automatic per-layer ratios against uniform and global ranking at the same FLOPs (issue #18).

Uses the models, data and splits of ``benchmarks/accuracy.py`` (digits; the calibration
half split again: 200 images for the statistics of every method, the other 98 for the
sensitivity trials; the evaluation half for accuracy), the default criterion and
compensation, no retraining. For each FLOPs target, three allocations:

- ``uniform``: one ratio for every group, searched to the target (``target_flops``);
- ``global``: scores normalised per group and ranked together (``global_pruning=True``);
- ``auto``: :func:`analyse_sensitivity` on the calibration batches, then
  :func:`allocate_ratios` to the target.

Run::

    python benchmarks/auto_ratios.py            # -> prints the table (--seed N: models trained with seed N)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import MLP, MODELS, accuracy, load_data, train  # noqa: E402

from cleanai_core import StructuredPruner  # noqa: E402
from cleanai_core.metrics import count_flops  # noqa: E402
from cleanai_core.sensitivity import allocate_ratios, analyse_sensitivity  # noqa: E402

TARGETS = (0.5, 0.35, 0.25)


def head(model):
    return model.fc3 if isinstance(model, MLP) else model.fc


def make(model, example, cal_loader, **options) -> StructuredPruner:
    p = StructuredPruner(model, example, ignored_layers=[head(model)], **options)
    p.collect_activations(cal_loader, progress=False)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)))
    ap.add_argument("--stats", type=int, default=200, help="calibration images for the statistics; the rest: trials")
    ap.add_argument("--seed", type=int, default=0, help="the data split and training seed (as accuracy.py --seeds)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    train_d, cal_d, ev_d = load_data(args.seed)
    # the statistics' batches for every method; the trials' batches, disjoint, for auto's
    # sensitivity trials and choice of candidate (as ``cleanai prune --auto`` sets them aside)
    cal_loader = DataLoader(TensorDataset(*(t[: args.stats] for t in cal_d)), batch_size=64)
    trial_loader = DataLoader(TensorDataset(*(t[args.stats :] for t in cal_d)), batch_size=64)
    print("| model | FLOPs target | uniform | global | auto | auto chose | auto FLOPs kept | sensitivity (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = train(name, train_d, seed=args.seed)
        example = cal_d[0][:2]
        base_acc = accuracy(model, ev_d)
        base = count_flops(model, example)
        t0 = time.perf_counter()
        sens_pruner = make(model, example, cal_loader)
        result = analyse_sensitivity(sens_pruner, trial_loader, progress=False)
        t_sens = time.perf_counter() - t0
        for target in map(float, args.targets.split(",")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                uni = make(model, example, cal_loader, target_flops=target).prune()
                glob = make(model, example, cal_loader, target_flops=target, global_pruning=True).prune()
                alloc = allocate_ratios(sens_pruner, result, target_flops=target)
                auto = make(model, example, cal_loader, layer_pruning_ratios=alloc.layer_ratios).prune()
            accs = [100 * accuracy(m, ev_d) / base_acc for m in (uni, glob, auto)]
            print(
                f"| {name} ({100 * base_acc:.2f}%) | {target:.2f} | {accs[0]:.1f} | {accs[1]:.1f} | {accs[2]:.1f} "
                f"| {alloc.method} | {count_flops(auto, example) / base:.3f} | {t_sens:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
