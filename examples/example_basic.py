"""Every step of a CleanAI prune, one at a time, on a small CNN.

    python examples/example_basic.py

Steps, each printed as it runs:

1. train a small residual CNN on the embedded UCI digits (8x8 grey images, CC BY 4.0);
2. trace it into a ``DependencyGraph`` and list the *groups*: the channels that must be
   removed together (the residual add couples two convolutions' outputs);
3. calibrate: stream per-channel activation statistics over the calibration data;
4. score every unit with the Weight Magnitude - Activation rule;
5. plan: decide which units go (a dry run that changes nothing);
6. prune: slice a copy of the model, check it still runs;
7. report: parameters, FLOPs, per-layer channels and accuracy, then save the history and
   replay it on a freshly built model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cleanai_core import DependencyGraph, PruningHistory, StructuredPruner, WeightActivationImportance
from cleanai_plugins.io.demo import digits_tensors, train_digits_cnn


class SmallResCNN(nn.Module):
    """conv-bn-relu, then a residual block (two convs added to the skip), pooling, a linear head."""

    def __init__(self, width: int = 24, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.conv2 = nn.Conv2d(2 * width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))  # residual add
        return self.head(x.mean((2, 3)))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description="every step of a CleanAI prune on a small CNN")
    parser.add_argument("--ratio", type=float, default=0.4, help="share of channels to remove (default 0.4)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    # -- 1. a trained model and its test data ---------------------------------------------
    x, y = digits_tensors()  # (1797, 1, 8, 8) floats in [0, 1], labels 0..9
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train_idx, calib_idx, eval_idx = perm[:1000], perm[1000:1400], perm[1400:]
    torch.manual_seed(0)  # the initial weights
    model = train_digits_cnn(x[train_idx], y[train_idx], args.epochs, model=SmallResCNN())
    print(f"[1] trained SmallResCNN: accuracy {accuracy(model, x[eval_idx], y[eval_idx]):.4f}")

    # -- 2. the dependency graph -----------------------------------------------------------
    # One traced forward pass on an example input. Each *group* lists every tensor slice
    # that shrinks when one of its units goes: a conv's output channels, the BatchNorm after
    # it, and the input channels of every consumer. The residual add joins stem, conv2 and
    # bn2 into one group; the input image and the logits are frozen (cannot be pruned).
    example = x[:1]
    graph = DependencyGraph(model, example)
    print(f"[2] {len(graph.groups())} groups, {len(graph.groups(prunable_only=True))} prunable:")
    for group in graph.groups():
        print("     ", group.describe())
    # graph.explain() also says which plugin claims each module and why channels are frozen.

    # -- 3. calibration ----------------------------------------------------------------------
    # The pruner builds the same graph, then streams per-channel statistics (mean and
    # variance, float64) at the input of every consumer over the calibration batches.
    # Memory grows with the channel count, never with the data.
    importance = WeightActivationImportance(weight_ratio=0.5, activation_ratio=0.5)
    pruner = StructuredPruner(model, example, importance, pruning_ratio=args.ratio)
    calib = DataLoader(TensorDataset(x[calib_idx], y[calib_idx]), batch_size=50)
    pruner.collect_activations(calib, num_batches=8, progress=False)
    head_stats = pruner.stats[("head", "in")]
    print(f"[3] calibrated on {int(head_stats.count)} positions; head input channel means:")
    print("     ", [round(v, 3) for v in head_stats.mean[:8].tolist()], "...")

    # -- 4. scores and 5. the plan -----------------------------------------------------------
    # plan() scores every prunable unit (weight magnitude x activation of what it feeds,
    # normalised per group) and picks the weakest `ratio` of each group. Nothing changes yet.
    plan = pruner.plan()
    print("[4] scores of the residual group (lowest 5): ", end="")
    residual = next(gp for gp in plan.groups if "conv2" in gp.group.modules())
    print([round(s, 4) for s in residual.scores.sort().values[:5].tolist()])
    print("[5] plan:", plan.summary().replace("\n", "\n     "))

    # -- 6. prune ------------------------------------------------------------------------------
    # Slices a copy (the original is untouched), folds the removed channels into the kept
    # ones (least squares on the calibration statistics), recomputes BatchNorm statistics,
    # and checks that the result runs and keeps the output shape.
    pruned = pruner.prune()
    print(f"[6] pruned: stem {model.stem[0]} -> {pruned.stem[0]}")
    assert model.conv1.out_channels == 48, "the original model is never modified"

    # -- 7. report, history ------------------------------------------------------------------
    report = pruner.report()
    print(f"[7] params: {report['params_before']} -> {report['params_after']}")
    print(f"    flops:  {report['flops_before']} -> {report['flops_after']}")
    for layer in report["layers"]:
        print(f"    {layer['name']:<8} {layer['slice']:<9} {layer['channels_before']:>3} -> {layer['channels_after']}")
    acc_before, acc_after = accuracy(model, x[eval_idx], y[eval_idx]), accuracy(pruned, x[eval_idx], y[eval_idx])
    print(f"    accuracy: {acc_before:.4f} -> {acc_after:.4f}  (held-out, {len(eval_idx)} images)")

    # The history is every slicing step, as data: replayed on a fresh model of the same
    # architecture it rebuilds the pruned shapes, and the pruned state_dict loads strictly.
    with tempfile.TemporaryDirectory() as tmp:
        pruner.history.save(Path(tmp) / "history.json")
        rebuilt = PruningHistory.load(Path(tmp) / "history.json").replay(SmallResCNN()).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    same = torch.equal(rebuilt(x[eval_idx]), pruned(x[eval_idx]))
    print(f"    replayed history: {len(pruner.history)} step(s), outputs identical: {same}")


if __name__ == "__main__":
    main()
