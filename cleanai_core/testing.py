"""Helpers for plugin authors and tests: the masking oracle (DESIGN.md section 5).

Slicing must be exactly equivalent to masking: the pruned model's output equals the
unpruned model's output when every pruned channel is zeroed where it is produced and
where it is consumed. :func:`check_pruner` runs that check on any model with a
random pruning of every prunable group.

Example::

    from cleanai_core.testing import check_pruner
    report = check_pruner(MyModel(), torch.randn(2, 3, 32, 32))
    assert report.max_abs_diff < 1e-5
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import nn

from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.masking import masked_model, masked_outputs
from cleanai_core.model_state import copy_model
from cleanai_core.planning import uniform_counts
from cleanai_core.plugins import temporary_plugin
from cleanai_core.slicing import SliceEdit, apply_edits
from cleanai_core.verify import model_outputs

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
    """What :func:`check_pruner` found."""

    max_abs_diff: float
    params_before: int
    params_after: int
    output_shapes_equal: bool
    pruned_units: int


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
    ``model`` must be in eval mode for a meaningful comparison."""
    graph = DependencyGraph(model, inputs, forward_fn=forward_fn, **graph_kwargs)
    pruned = random_units(graph, ratio, torch.Generator().manual_seed(seed), exclude_normalized=True)
    transform = graph_kwargs.get("output_transform")
    expected = masked_forward(graph, pruned, inputs, forward_fn, transform)
    small = copy_model(model)
    edits = [SliceEdit(m, s, k, _dim(graph, m, s)) for (m, s), k in graph.keep_indices(pruned).items()]
    apply_edits(small, edits, graph.pm)
    got = run_model(small, inputs, forward_fn, transform)
    same = [a.shape for a in got] == [b.shape for b in expected]
    diff = max(
        (float((a - b).abs().max()) for a, b in zip(got, expected, strict=False) if a.shape == b.shape and a.numel()),
        default=float("inf"),
    )
    return OracleReport(
        max_abs_diff=diff if same else float("inf"),
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in small.parameters()),
        output_shapes_equal=same,
        pruned_units=int(pruned.sum()),
    )


def _dim(graph: DependencyGraph, module: str, name: str) -> int | None:
    return graph.ctx.slices[(module, name)].dim
