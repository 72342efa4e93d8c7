"""BatchNorm correction for sensitivity trials, on a few calibration batches.

A prune corrects the BatchNorm statistics of the model it built
(:mod:`cleanai_core.bn_correction`); a sensitivity trial that skips the correction
measures another model than the prune will build. On a plain chain of conv-BN layers
the difference is the larger part of the loss: pruning the first of five groups of a
small CNN to 75% moved its output by a KL of 2.45 uncorrected and 0.26 corrected, so
curves without it ranked the groups by the wrong number and the allocation from them
lost to uniform and global ranking at the same FLOPs (#18).

Glossary:

- **correction batches**: the first calibration batches (the statistics' data, never the
  trials' evaluation batches), as many samples as the trials run on; the original
  model's norm input moments on them are recorded once.
- **trial correction**: :func:`~cleanai_core.bn_correction.correct_batchnorm` of one
  trial on the correction batches, with ``passes`` passes (the first alone carries the
  correction down a chain of any depth).
"""

from __future__ import annotations

import warnings
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils._pytree import tree_map

from cleanai_core.bn_correction import (
    Moments,
    Samples,
    correct_batchnorm,
    norms_with_running_stats,
    recording,
    sampling,
)
from cleanai_core.calibration import move_to, split_batch
from cleanai_core.distributed import samples_before
from cleanai_core.errors import pruned_run_failed
from cleanai_core.prefix_cache import PrefixCache
from cleanai_core.replay import samples_in
from cleanai_core.runtime import device_of, run_batch, same_layout

__all__ = ["TrialNorms"]


def _batched(t: Any, size: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size


@attrs.define(eq=False)
class TrialNorms:
    """Corrects a trial's norms on the correction batches (see the module doc); with a
    :class:`PrefixCache`, each pass runs only from the trial's first changed module."""

    batches: list[Any]
    moments: Moments
    forward_fn: Any
    passes: int
    cache: PrefixCache | None = None
    #: the original model and its norm inputs at the paired positions on the batches: the
    #: trial's norms get the estimate the prune gives them (:mod:`cleanai_core.bn_estimate`)
    original: nn.Module | None = None
    samples: Samples | None = None

    @classmethod
    def of(
        cls, pruner: Any, samples: int, passes: int = 1, fast: bool = True, layout: Any = same_layout
    ) -> TrialNorms | None:
        """For ``pruner``'s trials, on calibration batches holding at least ``samples``
        samples, laid out by ``layout`` (:func:`~cleanai_core.runtime.channels_last_layout`,
        as the trials' evaluation batches); ``None`` where the prune corrects nothing
        (``recalibrate_bn`` off, no norm with running statistics, calibration data that
        cannot be read again)."""
        data, model = pruner.calibration.data, pruner.model
        if not pruner.recalibrate_bn or data is None or data.one_shot or not norms_with_running_stats(model):
            return None
        # under torch.distributed, the first samples of the whole calibration data (the ranks hold it in rank
        # order): each rank took its own first ones, and the summed correction read other samples than one
        # process; a rank whose shard starts past them reads none
        samples -= min(samples, samples_before(sum(data.sizes)))
        batches, n = [], 0
        for batch in data.replay() if samples > 0 else ():
            x = split_batch(batch, model)[0]
            size = samples_in(x)
            if n + size > samples:  # as many samples as the trials run on, no more
                x = tree_map(lambda t: t[: samples - n] if _batched(t, size) else t, x)
            batches.append(layout(move_to(x, device_of(model))))
            n += samples_in(batches[-1])
            if n >= samples:
                break
        cache = PrefixCache(model, batches, pruner.forward_fn)
        moments: Moments = {}
        samples = Samples()
        with recording(cache.base, moments), sampling(cache.base, samples), torch.no_grad():
            cache.reference()
        return cls(batches, moments, pruner.forward_fn, passes, cache if fast else None, model, samples)

    def __call__(self, trial: nn.Module, edits: list) -> None:
        """Correct ``trial``'s norm statistics in place (``edits``: its build's slice edits)."""
        norms = norms_with_running_stats(trial)
        keep = {e.module: e.keep for e in edits if e.module in norms}
        names = self.cache.prefix(trial) if self.cache is not None else None
        if names is not None:
            names = self.cache.fill(names)
        run = (
            (lambda m, i: run_batch(m, self.batches[i], self.forward_fn))
            if names is None
            else (lambda m, i: self.cache.run(m, names, i))
        )
        moments = {k: list(v) for k, v in self.moments.items()}
        try:
            with warnings.catch_warnings():
                # its warnings (uncertain estimates, norms left as trained) would repeat for
                # every trial; the prune gives them once, for the model it builds
                warnings.simplefilter("ignore", RuntimeWarning)
                correct_batchnorm(
                    trial,
                    moments,
                    keep,
                    lambda: range(len(self.batches)),
                    run,
                    passes=self.passes,
                    original=self.original,
                    original_samples=self.samples,
                )
        except Exception as exc:
            pruned_run_failed(exc)
