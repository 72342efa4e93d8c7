"""Helpers for plugin authors and tests: the masking oracle (DESIGN.md section 5).

Slicing must be exactly equivalent to masking: the pruned model's output equals the
unpruned model's output when every pruned channel is zeroed where it is produced and
where it is consumed. :func:`check_pruner` runs that check on any model with a
random pruning of every prunable group.

Example::

    from cleanai_core.testing import check_pruner
    report = check_pruner(MyModel(), torch.randn(2, 3, 32, 32))
    assert report.max_abs_diff < 1e-5 and report.kept_whole == ()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import nn

from cleanai_core.errors import PruningError
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.masking import exact_tolerance, masked_model, masked_outputs, unsteady_outputs
from cleanai_core.model_state import copy_model, drop_user_hooks, user_hooks
from cleanai_core.planning import GroupPlan, PruningPlan, uniform_counts
from cleanai_core.plugins import temporary_plugin
from cleanai_core.slicing import SliceEdit, apply_edits
from cleanai_core.verify import build_skipping_breakers, check_outputs, model_outputs, reference

__all__ = [
    "OracleReport",
    "check_pruner",
    "masked_forward",
    "masked_model",
    "random_units",
    "run_model",
    "temporary_plugin",
]


def run_model(
    model: nn.Module, inputs: Any, forward_fn: Callable | None = None, output_transform: Callable | None = None
) -> list[torch.Tensor]:
    """Call ``model`` (in eval mode, restored after) like the tracer does and return the
    flat list of output tensors (after ``output_transform``; dataclass and ``ModelOutput``
    fields included)."""
    return model_outputs(model, inputs, forward_fn, output_transform)


def random_units(
    graph: DependencyGraph,
    ratio: float = 0.5,
    generator: torch.Generator | None = None,
    exclude_normalized: bool = False,
) -> torch.Tensor:
    """A boolean mask over units: ``ratio`` of each group's prunable units, at random,
    never all of them; the kept count rounded up to the group's alignment (the plan's
    rule: transformers' grouped expert matmul needs rows of 16 bytes), the same for every
    group of one size, the same share in tied groups
    (:func:`~cleanai_core.planning.uniform_counts`)."""
    gen = generator or torch.Generator().manual_seed(0)
    pruned = torch.zeros(graph.root.numel(), dtype=torch.bool)
    groups = [g for g in graph.groups(prunable_only=True) if not (exclude_normalized and g.normalizes)]
    counts = uniform_counts(groups, ratio)
    for g in groups:
        cand = g.units[~g.frozen]
        n = counts[g.id]
        if n <= 0:
            continue
        pick = cand[torch.randperm(cand.numel(), generator=gen)[:n]]
        pruned[pick] = True
    return pruned


def masked_forward(
    graph: DependencyGraph,
    pruned: torch.Tensor,
    inputs: Any,
    forward_fn: Callable | None = None,
    output_transform: Callable | None = None,
) -> list[torch.Tensor]:
    """Outputs of the *unpruned* model with the pruned channels zeroed at every slice
    (module outputs, module inputs, norm affines, bare tensors). A pruner of a composite
    module (attention, recurrent) may define ``mask(module, slice_name, idx)``: it zeroes
    the weights of those indices in the copy and returns ``True`` to skip the default hooks
    (:func:`cleanai_core.masking.masked_outputs`)."""
    return masked_outputs(graph, pruned, inputs, forward_fn, output_transform)


@attrs.frozen
class OracleReport:
    """What :func:`check_pruner` found. ``kept_whole``: a message per group left unpruned
    because slicing it made the copy fail to run, change its output shapes or give NaN
    (the model takes a width from another tensor or from a literal: ``reshape(f.shape)``,
    ``expand(-1, 8, ...)``, ``tensor_split``), as ``prune()``'s verification leaves it;
    empty where every group was sliced."""

    max_abs_diff: float
    params_before: int
    params_after: int
    output_shapes_equal: bool
    pruned_units: int
    kept_whole: tuple[str, ...] = ()
    #: positions of outputs left out of ``max_abs_diff``: they jump where the inputs move by a
    #: rounding error (a detector's boxes sorted by score), so no slicing can match them element by
    #: element; their shapes are still compared (:func:`~cleanai_core.masking.unsteady_outputs`)
    unsteady_outputs: tuple[int, ...] = ()


def _checked_arguments(ratio: Any, seed: Any, graph_kwargs: dict[str, Any]) -> tuple[float, int]:
    """``check_pruner``'s ratio (strictly between 0 and 1: at 0 nothing is sliced and the check
    passes whatever the plugin does; 2 or -1 pruned as much as the groups allow, or nothing),
    its seed (an integer), and keyword arguments ``DependencyGraph`` takes. ``ratio="0.5"`` and
    NaN failed in ``planning.py`` (``TypeError`` / ``ValueError``), ``seed="a"`` in
    ``manual_seed``, a misspelt keyword with ``TypeError: DependencyGraph.__init__() got an
    unexpected keyword argument``."""
    import inspect

    from cleanai_core.errors import UserError
    from cleanai_core.options import check_ratio, plain_number

    ratio, seed = plain_number(ratio), plain_number(seed)
    check_ratio("check_pruner: ratio", ratio)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"check_pruner: seed={seed!r} must be an integer (it seeds the random choice of units)")
    takes = [k for k in inspect.signature(DependencyGraph.__init__).parameters if k not in ("self", "model")]
    unknown = sorted(set(graph_kwargs) - set(takes) - {"example_inputs"})
    if unknown or "example_inputs" in graph_kwargs:
        raise UserError(
            f"check_pruner got the keyword argument(s) {', '.join(repr(k) for k in unknown or ['example_inputs'])}, "
            f"which it does not take: besides ratio and seed it passes DependencyGraph's options on "
            f"({', '.join(k for k in takes if k != 'example_inputs')}); the inputs are its second argument"
        )
    return ratio, seed


def check_pruner(
    model: nn.Module,
    inputs: Any,
    ratio: float = 0.5,
    seed: int = 0,
    forward_fn: Callable | None = None,
    **graph_kwargs: Any,
) -> OracleReport:
    """Prune ``ratio`` of every group at random on a copy of ``model`` and compare the
    pruned model's output with the masked original (normalising groups excluded).
    ``model`` must be in eval mode for a meaningful comparison.

    A group whose slicing the model cannot run with (the copy raises, changes its output
    shapes or gives NaN / inf where the original's outputs are finite: a width the model
    reads from another tensor, which no trace sees) is kept whole, as ``prune()``'s
    verification keeps it, and named in :attr:`OracleReport.kept_whole`; the other
    groups are sliced and compared. So is a group that runs only sliced together with
    another and then differs (timm's ``reshape(B, N, 3, h, C // h)`` with ``C`` the
    stream's width): each fails to run sliced alone. A copy that runs but differs from
    the masked original, with groups that run alone, is what the oracle reports
    (``max_abs_diff``): nothing is kept whole for it. Assert ``kept_whole == ()`` where
    the model reads no width at run time: a plugin whose slicing breaks the model shows
    up there."""
    ratio, seed = _checked_arguments(ratio, seed, graph_kwargs)
    graph = DependencyGraph(model, inputs, forward_fn=forward_fn, **graph_kwargs)
    pruned = random_units(graph, ratio, torch.Generator().manual_seed(seed), exclude_normalized=True)
    transform = graph_kwargs.get("output_transform")
    ref: list = []

    def original() -> Any:
        if not ref:
            ref.append(reference(model, inputs, forward_fn, transform))
        return ref[0]

    def build(units: torch.Tensor) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        small = copy_model(model)
        drop_user_hooks(small, user_hooks(model))  # as prune()'s copy and the masked original have none
        edits = [SliceEdit(m, s, k, _dim(graph, m, s)) for (m, s), k in graph.keep_indices(units).items()]
        apply_edits(small, edits, graph.pm)
        expected = masked_forward(graph, units, inputs, forward_fn, transform)
        # a count of detections is compared with the masked original's, other shapes with the original's
        return small, check_outputs(small, inputs, original, forward_fn, transform, like=expected), expected, units

    def plan(units: torch.Tensor) -> PruningPlan:
        groups = [g for g in graph.groups(prunable_only=True) if bool(units[g.units].any())]
        plans = [GroupPlan(g, torch.zeros(g.size), units[g.units].clone(), ratio) for g in groups]
        return PruningPlan(plans, units.numel())

    kept_whole: list[str] = []
    small, got, expected, pruned = build_skipping_breakers(plan(pruned), build, kept_whole.append)
    unsteady: frozenset[int] = frozenset()
    if _diff(got, expected) > exact_tolerance(expected):
        unsteady = unsteady_outputs(model, inputs, forward_fn, transform)
    if _diff(got, expected, unsteady) > exact_tolerance(expected):
        readers: list[str] = []
        fewer = _without_width_readers(plan(pruned), build, readers)
        try:
            small, got, expected, pruned = build(fewer)
            kept_whole += readers
        except PruningError:  # a group left ran only beside one taken out: report the first build
            pass
    diff = _diff(got, expected, unsteady)
    return OracleReport(
        max_abs_diff=diff,
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in small.parameters()),
        output_shapes_equal=[a.shape for a in got] == [b.shape for b in expected],
        pruned_units=int(pruned.sum()),
        kept_whole=tuple(kept_whole),
        unsteady_outputs=tuple(sorted(unsteady)),
    )


def _diff(got: list[torch.Tensor], expected: list[torch.Tensor], unsteady: frozenset[int] = frozenset()) -> float:
    """The largest difference between outputs of equal shapes (inf where any shape differs),
    those at the ``unsteady`` positions left out."""
    if [a.shape for a in got] != [b.shape for b in expected]:
        return float("inf")
    pairs = [(a, b) for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a.numel() and i not in unsteady]
    return max((float((a - b).abs().max()) for a, b in pairs), default=0.0 if got else float("inf"))


def _without_width_readers(plan: PruningPlan, build: Callable, kept_whole: list[str]) -> torch.Tensor:
    """``plan``'s units without the groups that make the sliced model differ from the
    masked one *and* break it when sliced alone: groups that run only together, where the
    model reads one group's width from another's tensor (timm's ``reshape(B, N, 3, h,
    C // h)`` with ``C`` the input's width: the stream and the heads shrink to a shape
    that fits, with heads mixed up). Such a group is kept whole and named in
    ``kept_whole``; a group that runs alone and differs stays: that is the oracle's finding."""
    whole = plan.pruned_units()

    def close(units: torch.Tensor) -> Any:
        built = build(units)
        diff = _diff(built[1], built[2])
        if diff > exact_tolerance(built[2]):
            raise PruningError(f"the sliced model's outputs differ from the masked ones by {diff:.3g}")
        return built

    before = {id(gp): gp.pruned.clone() for gp in plan.groups}
    try:
        build_skipping_breakers(plan, close, lambda _msg: None)
    except PruningError:  # the groups left still differ (a model whose runs differ): the culprits are marked
        pass
    for gp in plan.groups:
        if torch.equal(gp.pruned, before[id(gp)]):
            continue  # not at fault
        alone = torch.zeros_like(whole)
        alone[gp.group.units[before[id(gp)]]] = True
        try:
            build(alone)
        except PruningError as exc:
            whole[alone] = False
            kept_whole.append(
                f"group {gp.group.id} ({', '.join(gp.group.modules()[:4])}): sliced alone it breaks the model ({exc}); "
                "with other groups it runs but differs from zeroing: the model reads its width from another tensor"
            )
    return whole


def _dim(graph: DependencyGraph, module: str, name: str) -> int | None:
    return graph.ctx.slices[(module, name)].dim
