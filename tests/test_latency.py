"""``measure_latency``: what it times."""

from __future__ import annotations

import torch
from torch import nn

from cleanai_core import metrics


class DoublesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.seen: list[float] = []

    def forward(self, x):
        self.seen.append(float(x[0, 0]))
        return self.fc(x.mul_(2))


def test_each_pass_gets_a_fresh_copy_made_before_the_clock_starts(monkeypatch):
    """A forward that changes its input in place sees the user's values at every pass, and
    the user's tensor is untouched; the copy is not timed. A fake clock ticks 1 ms per
    reading and jumps 1 s for every copy: timed with the pass, the copy made each
    pass read 1001 ms."""
    clock = [0.0]

    def tick() -> float:
        clock[0] += 0.001
        return clock[0]

    real_copy = metrics.copied_inputs

    def slow_copy(inputs):
        clock[0] += 1.0
        return real_copy(inputs)

    monkeypatch.setattr(metrics.time, "perf_counter", tick)
    monkeypatch.setattr(metrics, "copied_inputs", slow_copy)
    model = DoublesItsInput().eval()
    x = torch.ones(3, 4)
    ms = metrics.measure_latency(model, x, repeats=5, warmup=1)
    assert abs(ms - 1.0) < 1e-6
    assert model.seen == [1.0] * 6
    assert torch.equal(x, torch.ones(3, 4))
