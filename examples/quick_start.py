"""CleanAI in five minutes: train a small CNN, prune half its channels, check the accuracy.

Uses only what ships with CleanAI: the UCI handwritten digits (1797 grey 8x8 images,
CC BY 4.0, embedded in ``cleanai_plugins/io/data/``) and ``DigitsCNN``, a three-layer CNN
that trains in seconds on a CPU. Run it from the repository root:

    python examples/quick_start.py              # about 10 s on one CPU core
    python examples/quick_start.py --ratio 0.3  # remove less, keep more accuracy

It prints the parameter count, FLOPs and held-out accuracy before and after pruning.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

from cleanai_core import StructuredPruner, WeightActivationImportance
from cleanai_plugins.io.demo import digits_tensors, train_digits_cnn


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` the model classifies as ``y``."""
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5, help="share of channels to remove (default 0.5)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread

    # 1. Data and a trained model: 1000 images to train on, the other 797 are the "test data".
    x, y = digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1000], perm[1000:]
    model = train_digits_cnn(x[train], y[train], epochs=args.epochs)

    # Half the test data scores the channels (calibration), the other half measures accuracy,
    # so the accuracy is never measured on the images that chose the channels.
    calib, held_out = test[:400], test[400:]
    calib_loader = DataLoader(TensorDataset(x[calib], y[calib]), batch_size=64)

    # 2. Prune: score every channel by weight magnitude x activation on the calibration data,
    #    remove the weakest `ratio` of every group of coupled channels.
    pruner = StructuredPruner(
        model,
        example_inputs=x[:1],
        importance=WeightActivationImportance(weight_ratio=0.5, activation_ratio=0.5),
        pruning_ratio=args.ratio,
    )
    pruner.collect_activations(calib_loader)
    pruned = pruner.prune()  # a sliced copy: `model` is unchanged

    # 3. Compare.
    report = pruner.report()
    acc_before = accuracy(model, x[held_out], y[held_out])
    acc_after = accuracy(pruned, x[held_out], y[held_out])
    print(f"params:   {report['params_before']} -> {report['params_after']}")
    print(f"flops:    {report['flops_before']} -> {report['flops_after']}")
    print(f"accuracy: {acc_before:.4f} -> {acc_after:.4f}  (held-out, {len(held_out)} images)")
    print(pruned.features[0])  # the first convolution, now physically narrower


if __name__ == "__main__":
    main()
