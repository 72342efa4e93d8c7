"""Stage 5, targets: the ratio whose plan meets a budget (FLOPs, parameters).

The search is a bisection over one uniform ratio: every trial plans with the scores
computed once, slices a copy without compensation (only sizes matter) and measures it;
parameters count the biases compensation will add.
A new stopping target is a new ``measure`` here (and an option that names it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from cleanai_core.compensation import new_bias_params
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.metrics import FlopsOfCopies, count_flops, count_params
from cleanai_core.planning import PruningPlan
from cleanai_core.slicing import edits_for, sliced_copy

__all__ = ["flops_measure", "params_measure", "pruned_size", "ratio_for_target", "unshrunk_params"]

Measure = Callable[[nn.Module], float]


def flops_measure(example_inputs: Any, forward_fn: Callable | None = None, model: nn.Module | None = None) -> Measure:
    """FLOPs of one forward pass on ``example_inputs``; with ``model``, of pruned copies of
    it (:class:`~cleanai_core.metrics.FlopsOfCopies`: from the layers' sizes where it can)."""
    if model is not None:
        return FlopsOfCopies(model, example_inputs, forward_fn)
    return lambda m: count_flops(m, example_inputs, forward_fn)


params_measure: Measure = count_params


def pruned_size(
    model: nn.Module, graph: DependencyGraph, plan: PruningPlan, measure: Measure, stats: dict | None = None
) -> float:
    """``measure`` of ``model`` sliced as ``plan`` says (a copy, sharing what it left
    unsliced; no compensation). With ``stats`` (bias compensation on), parameters count the
    biases compensation will add (:func:`~cleanai_core.compensation.new_bias_params`)."""
    pruned = plan.pruned_units()
    copy = sliced_copy(model, edits_for(graph, pruned), graph.pm, share=True)
    size = measure(copy)
    if stats and measure is params_measure:
        size += new_bias_params(copy, graph, stats, pruned)
    return size


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
