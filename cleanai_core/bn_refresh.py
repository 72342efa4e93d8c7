"""Re-estimate the running statistics of a model in training from data, in eval mode.

Glossary:

- *stale statistics*: the running mean and variance that train mode leaves behind are an
  average over past batches, taken while the weights moved. Right after a pruning step the
  weights move fast, and the statistics lag far behind: in the gradual benchmark a small
  ResNet one epoch after its second step scored 90.6% in eval mode with its own running
  statistics and 98.3% with statistics measured afresh. Scoring, compensation and the BN
  correction of the next step all run in eval mode, so they would see that broken model.
- *re-estimate*: one pass over the data in eval mode. Each call of a norm normalises with
  the statistics of its own input (what train mode does, so the norms below see the input
  they were trained on) where the call has more than one value per channel, else with the
  statistics held so far; the moments of every call are merged, and at the end each norm
  gets the mean and the unbiased variance of everything it saw. Nothing runs in train mode,
  so a batch of one with a norm after global pooling works.

Unlike :mod:`cleanai_core.bn_correction`, which moves *trained* statistics by what pruning
changed and keeps them where nothing changed, this replaces the statistics by estimates
from the data: it is meant for a model in the middle of training, whose statistics describe
no fixed set of weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from cleanai_core.bn_correction import _moments, norms_with_running_stats, set_running_stats
from cleanai_core.calibration import _chan_merge
from cleanai_core.distributed import combine_moments
from cleanai_core.model_state import set_mode

__all__ = ["reestimate_batchnorm"]


class _Estimate:
    """The merged input moments of one norm over a pass."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.held = (module.running_mean.detach().clone(), module.running_var.detach().clone())
        self.total: list = [0.0, None, None]

    def _set(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        set_running_stats(self.module, mean, var)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        got = _moments(args[0]) if args else None
        if got is None or got[1].shape != self.held[0].shape:
            self._set(*self.held)
            return
        n, mean, m2 = got
        self.total[:] = _chan_merge(*self.total, n, mean, m2)
        if n > 1:
            self._set(mean, m2 / n)  # normalise this call as train mode would
        else:
            self._set(*self.held)

    def apply(self) -> bool:
        n, mean, m2 = self.total
        if mean is None or n < 2:
            self._set(*self.held)
            return False
        self._set(mean, m2 / (n - 1))
        return True


def reestimate_batchnorm(model: nn.Module, batches: Iterable[Any], run: Callable[[nn.Module, Any], Any]) -> int:
    """Replace the running statistics of ``model``'s norms by estimates from ``batches``
    (see the module doc); ``run(model, batch)`` calls the model on one batch. Every
    module's mode is restored. Returns how many norms were re-estimated (a norm that saw
    fewer than two values per channel keeps its statistics)."""
    norms = norms_with_running_stats(model)
    if not norms:
        return 0
    estimates = {name: _Estimate(m) for name, m in norms.items()}
    handles = [m.register_forward_pre_hook(estimates[name]) for name, m in norms.items()]
    modes = [(m, m.training) for m in model.modules()]
    set_mode(model, False)
    try:
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
    except BaseException:
        for e in estimates.values():
            e._set(*e.held)
        raise
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    ordered = [estimates[name] for name in sorted(estimates)]
    combine_moments([e.total for e in ordered], [e.held[0].numel() for e in ordered])  # over ranks, if any
    return sum(e.apply() for e in ordered)
