"""The prefix cache: a trial answers from the original's outputs up to its first change."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cleanai_core.prefix_cache import PrefixCache


class Doubling(nn.Module):
    """``c(b(c(a(x) * 2)))``, the doubling written in place into ``a``'s output, ``c`` called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Tanh()

    def forward(self, x):
        h = self.a(x)
        h.mul_(2.0)
        return self.c(self.b(self.c(h)))


def test_a_trial_computes_only_after_its_first_change_and_in_place_writes_spare_the_cache():
    torch.manual_seed(0)
    net = Doubling().eval()
    batches = [torch.randn(3, 4), torch.randn(2, 4)]
    cache = PrefixCache(net, batches, None)
    ref = cache.reference()
    assert torch.equal(ref[1], net(batches[1]))
    trial = copy.deepcopy(net)
    with torch.no_grad():
        trial.b.weight[0] += 1.0
    names = cache.fill(cache.prefix(trial))
    assert names == ["a"]  # c runs twice per pass: never answered from the cache
    for _ in range(2):  # the second run would see a doubled cache if the first wrote into it
        with FlopCounterMode(display=False) as counter:
            out = cache.run(trial, names, 0)
        assert counter.get_total_flops() == 2 * 3 * 4 * 4  # b alone: a answered from the cache
        assert torch.allclose(out, trial(batches[0]), atol=1e-6)
    assert cache.prefix(copy.deepcopy(net)) == ["a", "b"]  # nothing changed: all but the shared c


def test_a_change_at_the_start_leaves_no_prefix():
    net = Doubling().eval()
    cache = PrefixCache(net, [torch.randn(2, 4)], None)
    cache.reference()
    trial = copy.deepcopy(net)
    trial.a = nn.Linear(4, 4)
    assert cache.prefix(trial) == []
