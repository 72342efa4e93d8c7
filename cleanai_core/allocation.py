"""Automatic per-layer ratios from sensitivity curves (:mod:`cleanai_core.sensitivity`).

Glossary:

- **allocation**: one ratio per group, chosen so that a target (FLOPs, parameters or
  measured latency) is met at the least summed fidelity loss. Each group picks the point
  of its curve that minimises ``loss - lam * saved``; one multiplier ``lam`` is searched
  by bisection until the *measured* cost of the whole plan meets the target (the
  Lagrangian relaxation of the knapsack over the curves; curves are interpolated linearly
  between measured ratios). The result is checked against a uniform ratio and global
  ranking at the same target, and replaced by one of them only where it measures
  clearly better on the evaluation batches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from cleanai_core.errors import PruningError, UserError
from cleanai_core.metrics import measure_latency
from cleanai_core.targets import TrialMemory, flops_measure, params_measure, pruned_size

if TYPE_CHECKING:
    from cleanai_core.sensitivity import SensitivityResult

__all__ = ["Allocation", "allocate_ratios"]


def _plan(pruner: Any, scores: dict, group_ratios: dict[int, float], others: float, ranked: bool = False) -> Any:
    """A plan with ``group_ratios`` where given and ``others`` elsewhere, as the pruner
    will make it (with ``global_pruning``, the groups without a ratio lose ``others`` of
    their units ranked together); ``ranked``: instead, ``others`` of all units ranked
    together (the global candidate)."""
    if ranked:
        return pruner.make_plan(others, scores, ratios={}, ranked=True)
    return pruner.make_plan(others, scores, ratios=group_ratios)


@attrs.define
class Allocation:
    """Per-layer ratios meeting a target, how they were chosen, and what they measured.

    ``layer_ratios`` goes to ``StructuredPruner(layer_pruning_ratios=...)``, ``others`` to its
    ``pruning_ratio`` (``None``: keep it): the ratio of the groups no single layer names, such
    as the experts of a fused mixture-of-experts module (one module, one group per expert),
    the uniform ratio that meets the target. ``method`` says which
    candidate was chosen: ``"sensitivity"`` (the curves' allocation), ``"uniform"`` (one
    ratio for all) or ``"global"`` (scores ranked across groups); ``kl`` holds each
    candidate's mean fidelity loss on the evaluation batches. The curves assume that the
    losses of groups add up; where pruning several groups together compounds, a simpler
    allocation can measure clearly better (beyond the sampling noise of the evaluation
    batches, see :func:`_choose`), and then it is the one returned."""

    layer_ratios: dict[str, float]
    method: str
    target: str
    cost: float
    kl: dict[str, float]
    others: float | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def allocate_ratios(
    pruner: Any,
    result: SensitivityResult,
    target_flops: float | None = None,
    target_params: float | None = None,
    target_latency: float | None = None,
    step: float = 0.05,
    iterations: int = 30,
    latency_measure: Callable[[nn.Module], float] | None = None,
) -> Allocation:
    """Per-layer ratios that keep the given share of FLOPs, parameters or measured latency
    (one of them, between 0 and 1) at the least summed fidelity loss. The cost of each
    candidate is measured on the sliced model, not estimated; the result meets the target
    or, when nothing within the measured curves can, is the most the curves allow. The
    allocation is checked against a uniform ratio and global ranking at the same target
    on the evaluation batches of ``result``, and replaced by one of them only where that
    one is better beyond the batches' sampling noise (:func:`_choose`).

    ``target_latency`` is a share of the original's latency as ``latency_measure(model)``
    gives it (default: median milliseconds of a forward pass on the pruner's example
    inputs, :func:`~cleanai_core.metrics.measure_latency`, on the model's device). Each
    candidate's cost is measured once; ``Allocation.cost`` is that measurement's share."""
    from cleanai_core.errors import shown
    from cleanai_core.options import plain_number
    from cleanai_core.sensitivity import SensitivityResult

    step, iterations = _check_arguments(pruner, step, iterations, latency_measure)
    if not isinstance(result, SensitivityResult):  # None raised "AttributeError: ... has no attribute 'curves'"
        raise UserError(f"allocate_ratios needs the SensitivityResult of analyse_sensitivity(pruner, ...), got "
                        f"{shown(result)}")  # fmt: skip
    targets = (("flops", target_flops), ("params", target_params), ("latency", target_latency))
    given = [(n, plain_number(t)) for n, t in targets if t is not None]
    if len(given) != 1:
        raise UserError("give exactly one of target_flops, target_params or target_latency (a share to keep, 0-1)")
    kind, target = given[0]
    # text raised "TypeError: '>' not supported between instances of 'float' and 'str'"
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) < 1.0:
        raise UserError(f"target_{kind}={shown(target)}: give the share to keep, strictly between 0 and 1")
    graph, model = pruner.graph, pruner.model
    live = {g.id for g in graph.groups(prunable_only=True)}
    curves = [c for c in result.curves if c.layer is not None and c.group in live]
    named = {c.group for c in curves}
    scores = pruner.score()
    # the groups the allocation cannot name take the pruner's ratio (``others``): a fused
    # mixture-of-experts module holds one group per expert and is no name of any one, and
    # the pruner's ratio (0.3 from the job) kept Mixtral's experts at 0.7 whatever the
    # target (--target-params 0.6 --auto kept 0.73). They take the uniform ratio that meets
    # the target, and the named groups are allocated around it. The named groups without a
    # curve stay whole.
    others, chosen = pruner.pruning_ratio, None
    # the named groups without an allocated ratio stay whole; the others take ``others`` as the prune gives it
    # them (each, or ranked together under global pruning: costed each, --global --auto kept 0.603 of Mixtral's
    # parameters where the allocation said 0.570)
    fixed = dict.fromkeys(named, 0.0)
    stuck = {c.layer: 0.0 for c in curves if len(c.ratios) == 1}
    curves = [c for c in curves if len(c.ratios) > 1]
    if not curves:
        raise UserError("no group has a sensitivity curve: nothing to allocate")
    saved_of = (lambda c: c.flops_saved) if kind != "params" else (lambda c: c.params_saved)
    base = result.base_flops if kind != "params" else result.base_params
    grids = {}
    for c in curves:
        pts = [round(i * step, 6) for i in range(int(round(c.ratios[-1] / step)) + 1)]
        if pts[-1] < c.ratios[-1]:
            pts.append(c.ratios[-1])
        grids[c.group] = [(r, c.at(r, c.kl), c.at(r, saved_of(c)) / base) for r in pts]

    def choose(lam: float) -> dict[int, float]:
        return {gid: min(pts, key=lambda p: (p[1] - lam * p[2], p[0]))[0] for gid, pts in grids.items()}

    ex, fwd = pruner.example_inputs, pruner.forward_fn
    if kind == "flops":
        measure, base_size = flops_measure(ex, fwd, model), result.base_flops
    elif kind == "params":
        measure, base_size = params_measure, result.base_params
    else:
        measure = _checked_latency(latency_measure or (lambda m: measure_latency(m, ex, forward_fn=fwd)))
        base_size = measure(model)
    measured: dict[tuple, float] = {}  # the searches revisit choices: measure each once
    stats = pruner.stats if pruner.bias_compensation else None  # the biases compensation adds count as parameters
    memory, check = TrialMemory(), pruner.trial_check()  # groups that break the model: costed whole, as pruned

    def cost(ratios: dict[int, float], rest: float | None = None) -> float:
        key = (rest, *sorted(ratios.items()))
        if key not in measured:
            plan = _plan(pruner, scores, {**fixed, **ratios}, others if rest is None else rest)
            if not any(gp.n_pruned for gp in plan.groups):  # the original itself: not measured, where a
                measured[key] = 1.0  # noisy latency could read it below the target and prune nothing
            else:
                measured[key] = pruned_size(model, graph, plan, measure, stats, memory, check) / base_size
        return measured[key]

    def uniform_cost(r: float) -> float:  # every group at r (the ones without a ratio as the prune ranks them)
        return cost(dict.fromkeys(named, r), r)

    if live - named:
        others = chosen = _search(lambda r: round(min(r, 0.95), 6), uniform_cost, target, iterations, linear=True)

    def ranked(r: float) -> dict[int, float]:  # global ranking at ratio r, as per-group ratios
        plan = _plan(pruner, scores, {}, min(r, 0.95), ranked=True)
        return {gp.group.id: gp.n_pruned / max(gp.group.size, 1) for gp in plan.groups if gp.group.id in grids}

    candidates = {
        "sensitivity": _back_off(_search(choose, cost, target, iterations), grids, target, cost),
        "uniform": _search(lambda r: dict.fromkeys(grids, min(r, 0.95)), cost, target, iterations, linear=True),
        "global": _search(ranked, cost, target, iterations, linear=True),
    }
    losses: dict[str, torch.Tensor] = {}
    hits: dict[str, float | None] = {}
    ev = result.evaluator
    if ev is not None:
        for name, ratios in candidates.items():
            plan = _plan(pruner, scores, {**fixed, **ratios}, others)
            try:
                trial, edits = pruner.build(plan.pruned_units(), share=True)  # measured, then dropped
            except PruningError:
                continue  # this candidate does not build: another one wins
            if result.norms is not None:  # as the prune will, on the trials' few correction batches
                result.norms(trial, edits)
            outs = ev.outputs(trial)
            losses[name], hits[name] = ev.per_sample(outs), ev.accuracy(outs)
    method = _choose(losses, hits)
    best = candidates[method]
    kl = {name: float(v.mean()) for name, v in losses.items()}
    by_group = {c.group: c.layer for c in curves}
    layer_ratios = {**stuck, **{by_group[gid]: r for gid, r in sorted(best.items())}}
    _warn_beyond_curves(kind, target, cost({gid: pts[-1][0] for gid, pts in grids.items()}), grids)
    return Allocation(layer_ratios, method, kind, cost(best), kl, chosen)


def _check_arguments(pruner: Any, step: Any, iterations: Any, latency_measure: Any) -> tuple[float, int]:
    """:func:`allocate_ratios`' arguments, each named where it is out of form: a pruner that is
    no pruner raised ``AttributeError: 'str' object has no attribute 'graph'``, ``step=0``
    ``ZeroDivisionError``, a negative ``step`` ``IndexError``, ``iterations="3"`` and a
    ``latency_measure`` that is no function ``TypeError``."""
    from cleanai_core.errors import shown
    from cleanai_core.options import check_callables, plain_number
    from cleanai_core.sensitivity import check_pruner

    check_pruner(pruner, "allocate_ratios")
    step, iterations = plain_number(step), plain_number(iterations)
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step <= 1.0:
        raise UserError(f"allocate_ratios: step={shown(step)} must be a number above 0 and at most 1 (e.g. 0.05)")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise UserError(f"allocate_ratios: iterations={shown(iterations)} must be an integer >= 0 (e.g. 30)")
    check_callables(latency_measure=latency_measure)
    return float(step), iterations


def _checked_latency(measure: Callable[[nn.Module], Any]) -> Callable[[nn.Module], float]:
    """``measure`` whose every answer is checked: a positive finite number (a NumPy or 0-d
    tensor number taken). Text or ``None`` raised ``TypeError`` from a division, 0
    ``ZeroDivisionError``; NaN, a negative number or a tensor made the allocation's costs NaN,
    1.0 or a tensor without a word."""
    from cleanai_core.errors import shown
    from cleanai_core.options import plain_number

    def checked(model: nn.Module) -> float:
        got = plain_number(measure(model))
        if isinstance(got, bool) or not isinstance(got, (int, float)) or not math.isfinite(got) or got <= 0:
            raise UserError(
                f"latency_measure(model) returned {shown(got)}: it must return the model's latency as a positive, "
                "finite number (e.g. milliseconds per forward pass)"
            )
        return float(got)

    return checked


def _warn_beyond_curves(kind: str, target: float, kept: float, grids: dict[int, list]) -> None:
    """Warn where every group at the highest ratio its curve measured keeps more than the
    target asks: the allocation stops there, and said so only in an info line (BART with
    its heads kept, ``--target-params 0.6 --auto``: 0.79 kept, every MLP at 0.75, where one
    ratio for every group reaches 0.73)."""
    from cleanai_core.pruner import TARGET_SLACK

    if kept - target <= TARGET_SLACK:
        return
    top = max(pts[-1][0] for pts in grids.values())
    more = (
        "measure higher ratios (--sensitivity-ratios 0.25,0.5,0.75,0.9; sensitivity_ratios in Python), "
        if top < 0.9
        else "the parameters outside the groups do not shrink (`cleanai explain` says why); "
    )
    warnings.warn(
        f"target_{kind}={target:g} cannot be reached by the allocation: every group at the highest ratio its "
        f"sensitivity curve measured (at most {top:g}) keeps {kept:.2f} of the original's {kind}; {more}or ask "
        f"for a target above {kept:.2f}",
        RuntimeWarning,
        stacklevel=3,
    )


def _choose(losses: dict[str, torch.Tensor], hits: dict[str, float | None], z: float = 2.0) -> str:
    """The curves' allocation, unless another candidate measured clearly better on the
    evaluation batches: a lower mean KL by more than ``z`` standard errors of the paired
    per-sample differences and, where labels give an accuracy, not a lower accuracy.
    A few dozen samples cannot rank candidates a few hundredths of a nat apart, and the
    curves' allocation is the one built for the target; a simpler allocation replaces it
    where the groups' losses compound beyond doubt (#18)."""
    if "sensitivity" not in losses:
        return min(losses, key=lambda n: float(losses[n].mean())) if losses else "sensitivity"
    own, own_hits = losses["sensitivity"], hits["sensitivity"]
    broken = not bool(torch.isfinite(own).all())  # the curves' allocation broke the output
    better = {}
    for name, loss in losses.items():
        if name == "sensitivity" or not bool(torch.isfinite(loss).all()):
            continue
        gain = own - loss
        se = float(gain.std()) / math.sqrt(gain.numel()) if gain.numel() > 1 else math.inf
        less_accurate = hits[name] is not None and own_hits is not None and hits[name] < own_hits
        if broken or (float(gain.mean()) > z * se and not less_accurate):
            better[name] = float(loss.mean())
    return min(better, key=better.get) if better else "sensitivity"


def _search(choose: Any, cost: Any, target: float, iterations: int, linear: bool = False) -> dict[int, float]:
    """The smallest parameter of ``choose`` (a multiplier, or with ``linear`` a ratio in
    [0, 1]) whose choice meets ``target``, by bisection on the measured cost."""
    lo, hi = 0.0, 1.0
    if not linear:
        while cost(choose(hi)) > target and hi < 1e12:
            hi *= 10.0
    best = choose(hi)
    for _ in range(iterations):
        if linear:
            mid = (lo + hi) / 2
        else:
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        pick = choose(mid)
        if cost(pick) <= target:
            hi, best = mid, pick
        else:
            lo = mid
        if (hi - lo < 1e-3) if linear else (lo > 0 and hi / lo < 1.0001):
            break
    return best


def _back_off(
    ratios: dict[int, float], grids: dict[int, list[tuple[float, float, float]]], target: float, cost: Any
) -> dict[int, float]:
    """The multiplier search lands on curve vertices and can overshoot the target: where
    the curves are flat (no measurable loss, e.g. over the first steps of a robust layer,
    or everywhere in a random-weight model) any multiplier prunes every flat group to its
    last measured ratio. Give back grid steps, those that buy the most fidelity per unit
    of cost first (among equals, of the groups pruned most), as long as the measured cost
    stays within the target: the budget the target allows is spent.

    Each round takes the ``k`` best steps (one per group) together and measures them once:
    ``k`` doubles after a round within the target and halves after one beyond it, and a
    single step beyond it retires its group (a random-weight MobileNet-V3 small, every curve
    flat, ``--target-flops 0.5 --auto``: 2m11 CPU in all, 3m45 one step at a time)."""
    ratios = dict(ratios)
    done: set[int] = set()
    k = 1
    while True:
        moves = []
        for gid, pts in grids.items():
            i = next(j for j, p in enumerate(pts) if p[0] == ratios[gid])
            if gid in done or i == 0:
                continue
            gain, lost = pts[i][1] - pts[i - 1][1], pts[i][2] - pts[i - 1][2]
            value = gain / lost if lost > 0 else (math.inf if gain >= 0 else -math.inf)
            moves.append((-value, -ratios[gid], gid, pts[i - 1][0]))
        if not moves:
            return ratios
        moves.sort()
        k = min(k, len(moves))
        trial = {**ratios, **{gid: r for *_, gid, r in moves[:k]}}
        if cost(trial) <= target:
            ratios, k = trial, 2 * k
        elif k > 1:
            k //= 2
        else:
            done.add(moves[0][2])
