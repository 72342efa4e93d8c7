"""Stage 5, targets: the ratio whose plan meets a budget (FLOPs, parameters).

The search is a bisection over one uniform ratio: every trial plans with the scores
computed once, slices a copy without compensation (only sizes matter) and measures it;
parameters count the biases compensation will add.
A new stopping target is a new ``measure`` here (and an option that names it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import nn

from cleanai_core.compensation import new_bias_params
from cleanai_core.errors import pruned_run_failed
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.metrics import FlopsOfCopies, count_flops, count_params
from cleanai_core.planning import PruningPlan
from cleanai_core.slicing import edits_for, sliced_copy
from cleanai_core.verify import build_skipping_breakers

__all__ = [
    "TrialMemory",
    "flops_measure",
    "params_measure",
    "pruned_size",
    "ratio_for_target",
    "unshrunk_params",
]

Measure = Callable[[nn.Module], float]


def flops_measure(example_inputs: Any, forward_fn: Callable | None = None, model: nn.Module | None = None) -> Measure:
    """FLOPs of one forward pass on ``example_inputs``; with ``model``, of pruned copies of
    it (:class:`~cleanai_core.metrics.FlopsOfCopies`: from the layers' sizes where it can)."""
    if model is not None:
        return FlopsOfCopies(model, example_inputs, forward_fn)
    return lambda m: count_flops(m, example_inputs, forward_fn)


params_measure: Measure = count_params


@attrs.define
class TrialMemory:
    """What the trials of one search learnt about running their copies: ``faulty``, the
    ids of groups whose slicing the model cannot run with (kept whole, as verification
    keeps them); ``ran``, the sets of pruned groups whose copy ran (a trial pruning only
    groups of such a set is not run again: a stored size breaks at any count)."""

    faulty: set[int] = attrs.field(factory=set)
    ran: list[frozenset[int]] = attrs.field(factory=list)


def pruned_size(
    model: nn.Module,
    graph: DependencyGraph,
    plan: PruningPlan,
    measure: Measure,
    stats: dict | None = None,
    memory: TrialMemory | None = None,
    check: Callable[[nn.Module], object] | None = None,
) -> float:
    """``measure`` of ``model`` sliced as ``plan`` says (a copy, sharing what it left
    unsliced; no compensation). With ``stats`` (bias compensation on), parameters count the
    biases compensation will add (:func:`~cleanai_core.compensation.new_bias_params`).

    A copy that fails to run (FLOPs are counted by running it: a width the model reads
    from another tensor, which no trace sees) is measured without the groups at fault, as
    ``prune()``'s verification keeps them whole (:func:`~cleanai_core.verify.build_skipping_breakers`;
    ``plan`` is changed). ``memory``: what the calls of one search found, read and added
    to. Before 2026-12-02 the model's own error ended a ``target_flops`` search (and every
    gradual step by FLOPs) on such a model.

    ``check(copy)`` (raises :class:`~cleanai_core.errors.PruningError`; the pruner's
    verification) runs a copy that measuring does not run: parameters are counted, and
    FLOPs of a model of convolutions and linear layers computed from their sizes, so a
    group that verification would keep whole (a split into sizes the module stores) was
    counted as pruned, and the result kept more than the target (0.76 of the parameters
    at ``target_params=0.6``). A copy pruning only groups that ran together before is not
    run again (``memory.ran``): EfficientNet-B0's ``target_params`` search runs 1-2 copies."""
    memory = TrialMemory() if memory is None else memory

    def size_of(pruned: torch.Tensor) -> float:
        copy = sliced_copy(model, edits_for(graph, pruned), graph.pm, share=True)
        if check is not None and not _runs(measure, copy):
            cut = frozenset(gp.group.id for gp in plan.groups if bool(pruned[gp.group.units].any()))
            if not any(cut <= ran for ran in memory.ran):
                check(copy)
                memory.ran.append(cut)
        try:
            size = measure(copy)
        except Exception as exc:
            pruned_run_failed(exc)
        if stats and measure is params_measure:
            size += new_bias_params(copy, graph, stats, pruned)
        return size

    for gp in plan.groups:
        if gp.group.id in memory.faulty:
            gp.pruned[:] = False
    before = {gp.group.id for gp in plan.groups if gp.n_pruned}
    size = build_skipping_breakers(plan, size_of, lambda _message: None)
    memory.faulty.update(before - {gp.group.id for gp in plan.groups if gp.n_pruned})
    return size


def _runs(measure: Measure, copy: nn.Module) -> bool:
    """Whether ``measure(copy)`` runs ``copy`` (parameters are counted; a measure with a
    ``runs`` method says; any other, such as latency, runs it)."""
    runs = getattr(measure, "runs", None)
    return bool(runs(copy)) if callable(runs) else measure is not params_measure


def unshrunk_params(model: nn.Module, graph: DependencyGraph, plan: PruningPlan) -> list[tuple[str, int]]:
    """The parameters of ``model`` that ``plan`` leaves at their full size, largest first
    (each tensor once, under its first name)."""
    small = sliced_copy(model, edits_for(graph, plan.pruned_units()), graph.pm, share=True)
    after = {name: p.shape for name, p in small.named_parameters()}
    out = [(name, p.numel()) for name, p in model.named_parameters() if after.get(name) == p.shape]
    return sorted(out, key=lambda item: -item[1])


def ratio_for_target(
    target: float,
    size_at: Callable[[float], float],
    base: float,
    iterations: int = 10,
    highest: float = 0.95,
) -> float:
    """The smallest ratio (to ``highest / 2**iterations``) whose pruned model keeps at most
    ``target`` of ``base``; ``size_at(ratio)`` measures the model pruned at ``ratio``."""
    lo, hi = 0.0, highest
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if size_at(mid) / base > target:
            lo = mid
        else:
            hi = mid
    return hi
