"""Recovery after pruning: prune to 4x fewer FLOPs, then distil the original into the pruned model.

A DigitsCNN trains on the digits that ship with CleanAI, is pruned to a quarter of its
FLOPs (accuracy drops), then ``cleanai_core.recover`` trains the pruned model as a student
of the original (knowledge distillation plus cross-entropy) on the training split, never
on the test split. Run it from the repository root::

    python examples/example_recover.py              # about 20 s on one CPU core
    python examples/example_recover.py --epochs 3   # what CI runs

It prints the test accuracy of the original, right after pruning and after recovery.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

from cleanai_core import StructuredPruner, recover
from cleanai_core.metrics import count_params
from cleanai_plugins.io.demo import digits_tensors, train_digits_cnn


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` the model classifies as ``y``."""
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="recovery epochs (default 8)")
    parser.add_argument("--train-epochs", type=int, default=8, help="epochs training the original (default 8)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    # Three disjoint splits: train (the original, then recovery), calibration (scores the channels), test.
    x, y = digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, calib, test = perm[:1200], perm[1200:1400], perm[1400:]
    model = train_digits_cnn(x[train], y[train], epochs=args.train_epochs)

    # Prune to a quarter of the FLOPs: far enough that accuracy visibly drops.
    pruner = StructuredPruner(model, example_inputs=x[:1], target_flops=0.25)
    pruner.collect_activations(DataLoader(TensorDataset(x[calib], y[calib]), batch_size=100))
    pruned = pruner.prune()  # a sliced copy: `model` is unchanged and serves as the teacher

    # Recover: distil the original into the pruned model on the training split. 10% of it is held
    # out for early stopping; the best epoch's weights come back.
    recovered, result = recover(
        pruned, teacher=model, train_data=TensorDataset(x[train], y[train]), epochs=args.epochs, progress=False
    )

    report = pruner.report()
    print(f"params:   {count_params(model)} -> {count_params(recovered)}")
    print(f"flops:    {report['flops_before']} -> {report['flops_after']}")
    print(f"accuracy original:       {accuracy(model, x[test], y[test]):.4f}  (test, {len(test)} images)")
    print(f"accuracy after pruning:  {accuracy(pruned, x[test], y[test]):.4f}")
    print(f"accuracy after recovery: {accuracy(recovered, x[test], y[test]):.4f}")
    print(f"recovery: {result.epochs} epochs, best epoch {result.best_epoch}, {result.seconds:.1f} s")


if __name__ == "__main__":
    main()
