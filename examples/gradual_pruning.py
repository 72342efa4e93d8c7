"""Gradual pruning inside your own training loop, on the digits that ship with CleanAI.

A DigitsCNN is trained from scratch; from epoch 3 on, each epoch ends with one pruning
step (a cubic schedule to 4x fewer FLOPs), and training goes on with the same optimizer:
its Adam moments and the gradients are sliced along with the parameters. Runs in well
under a minute on a laptop CPU::

    python examples/gradual_pruning.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from cleanai_core import GradualPruner, PruningSchedule
from cleanai_core.metrics import count_params
from cleanai_plugins.io.demo import DigitsCNN, digits_tensors


def main(epochs: int = 10, prune_from: int = 3) -> None:
    torch.manual_seed(0)
    x, y = digits_tensors()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, calib, test = perm[:1200], perm[1200:1400], perm[1400:]  # calibration never trains, test never tunes
    loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True)
    calib_loader = DataLoader(TensorDataset(x[calib], y[calib]), batch_size=100)

    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = PruningSchedule(final=0.75, steps=4, kind="cubic")  # remove 75% of the FLOPs in 4 steps
    pruner = GradualPruner(model, x[:2], optimizer, schedule, ignored_layers=[model.fc])
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        if epoch >= prune_from and not pruner.done:
            model, optimizer = pruner.step(calib_loader)  # the same objects, now smaller
        model.eval()
        with torch.no_grad():
            acc = float((model(x[test]).argmax(1) == y[test]).float().mean())
        print(
            f"epoch {epoch:2d}: FLOPs {pruner.flops_share():.2f} of the start, {count_params(model):6d} parameters, "
            f"test accuracy {acc:.3f}  ({time.time() - t0:.0f} s)"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    ap.add_argument("--prune-from", type=int, default=3, help="first epoch that ends with a pruning step (default 3)")
    args = ap.parse_args()
    main(args.epochs, args.prune_from)
