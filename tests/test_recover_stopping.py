"""Early stopping in recover (issue 17): a saturated held-out metric does not stop
training while the held-out loss still falls; ties of the metric go to the lower loss."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from cleanai_core import recover
from cleanai_core.recovery import evaluate_held_out, held_out_metric_and_loss


def _blobs(n: int = 400, seed: int = 0) -> TensorDataset:
    """Two well-separated Gaussian blobs in 2-D: any reasonable line gets them all right."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2, generator=g) * 0.3 + (y[:, None].float() * 2 - 1) * 2.0
    return TensorDataset(x, y)


def _separating_line() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    with torch.no_grad():  # right on every sample, with small margins: cross-entropy still ~0.3
        model.weight.copy_(torch.tensor([[-0.3, -0.3], [0.3, 0.3]]))
        model.bias.zero_()
    return model


def test_a_saturated_held_out_accuracy_does_not_stop_training_while_the_held_out_loss_falls():
    model = _separating_line()
    student, result = recover(model, None, _blobs(), epochs=5, lr=0.05, patience=1, progress=False)
    # the held-out part is at 100% from the start: before the fix every epoch was a tie,
    # counted as no progress, and training stopped after one epoch (best_epoch 1)
    assert result.initial == 1.0 and result.history == (1.0,) * 5
    assert not result.stopped_early and result.epochs == 5
    assert all(b < a for a, b in zip((result.initial_loss, *result.held_out_loss), result.held_out_loss, strict=False))
    assert result.best_epoch == 5 and result.held_out_loss[-1] < 0.5 * result.initial_loss
    _, acc, loss = held_out_metric_and_loss(student, [tuple(_blobs(50, 1).tensors)], torch.device("cpu"), "auto")
    assert acc == 1.0 and loss < 0.5 * held_out_metric_and_loss(model, [tuple(_blobs(50, 1).tensors)],
                                                              torch.device("cpu"), "auto")[2]  # fmt: skip


def test_held_out_loss_is_the_training_loss_with_the_teacher_and_the_metric_is_unchanged():
    torch.manual_seed(0)
    student, teacher = nn.Linear(2, 3), nn.Linear(2, 3)
    x, y = torch.randn(20, 2), torch.randint(0, 3, (20,))
    opts = {"temperature": 3.0, "kd_weight": 0.5, "ce_weight": 2.0}
    metric, acc, loss = held_out_metric_and_loss(student, [(x, y)], torch.device("cpu"), "classification", teacher,
                                                 loss_options=opts)  # fmt: skip
    s, t = student(x).detach(), teacher(x).detach()
    kl = (torch.softmax(t / 3, -1) * (torch.log_softmax(t / 3, -1) - torch.log_softmax(s / 3, -1))).sum(-1).mean()
    expected = 0.5 * 9 * kl + 2.0 * torch.nn.functional.cross_entropy(s, y)
    assert metric == "accuracy" and abs(loss - float(expected)) < 1e-5
    assert (metric, acc) == evaluate_held_out(student, [(x, y)], torch.device("cpu"), "classification", teacher)
    assert acc == int((s.argmax(-1) == y).sum()) / 20
