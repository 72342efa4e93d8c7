"""A small trained classifier on the embedded digits data, shared by the recovery and
gradual-pruning tests: fixed splits (train / calibration / evaluation) and a seeded CNN."""

from __future__ import annotations

import functools

import torch
from torch import nn

from cleanai_plugins.io.demo import DigitsCNN, digits_tensors, train_digits_cnn


@functools.cache
def splits() -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(train 1000, calibration 300, evaluation 497) of the 1797 digits, seeded."""
    x, y = digits_tensors()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    parts = perm[:1000], perm[1000:1300], perm[1300:]
    return tuple((x[p], y[p]) for p in parts)


@functools.cache
def _trained_state(width: int) -> dict[str, torch.Tensor]:
    return train_digits_cnn(*splits()[0], epochs=6, width=width).state_dict()


def trained_cnn(width: int = 8) -> DigitsCNN:
    """A fresh copy of the seeded, trained DigitsCNN (weights cached per session)."""
    model = DigitsCNN(width=width)
    model.load_state_dict(_trained_state(width))
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    training = model.training
    model.eval()
    acc = float((model(data[0]).argmax(1) == data[1]).float().mean())
    model.train(training)
    return acc


def cli_prune_args(folder) -> list[str]:
    """``cleanai prune`` of the demo CNN (random weights saved in ``folder / "w.pt"``) on 40
    random digit-sized images with labels (``folder / "d.pt"``), batches of 8, quiet."""
    from cleanai_plugins.io.demo import MODEL_SPEC

    torch.manual_seed(0)
    torch.save({"x": torch.rand(40, 1, 8, 8), "y": torch.randint(0, 10, (40,))}, folder / "d.pt")
    torch.save(DigitsCNN().state_dict(), folder / "w.pt")
    data = ["--data", str(folder / "d.pt"), "--batch-size", "8", "--quiet"]
    return ["prune", "--model", MODEL_SPEC, "--weights", str(folder / "w.pt"), *data]
