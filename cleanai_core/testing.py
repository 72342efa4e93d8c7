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
from cleanai_core.model_state import copy_model
from cleanai_core.plugins import temporary_plugin
from cleanai_core.slicing import SliceEdit, apply_edits, get_submodule_and_attr
from cleanai_core.verify import model_outputs

__all__ = ["OracleReport", "check_pruner", "masked_forward", "random_units", "run_model", "temporary_plugin"]


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
    never all of them."""
    gen = generator or torch.Generator().manual_seed(0)
    pruned = torch.zeros(graph.root.numel(), dtype=torch.bool)
    for g in graph.groups(prunable_only=True):
        if exclude_normalized and any(s.normalizes for s in g.slices):
            continue
        cand = g.units[~g.frozen]
        n = min(int(ratio * g.size), cand.numel(), g.size - 1)
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
    the weights of those indices in the copy and returns ``True`` to skip the default hooks."""
    model = copy_model(graph.model)
    handles = []
    for spec in graph.slices:
        gone = pruned[graph.root[spec.atoms]]
        if not bool(gone.any()):
            continue
        idx = gone.nonzero().squeeze(1)
        if spec.module == "":
            owner, attr = get_submodule_and_attr(model, spec.name)
            with torch.no_grad():
                getattr(owner, attr).data.index_fill_(spec.dim, idx, 0.0)
            continue
        module = model.get_submodule(spec.module)
        mask = getattr(spec.pruner, "mask", None)  # composite modules zero their own weights
        if mask is not None:
            with torch.no_grad():
                if mask(module, spec.name, idx):
                    continue
        if spec.kind == "in":

            def pre(m, args, kwargs, idx=idx, spec=spec):
                args = list(args)
                x = args[spec.arg]
                args[spec.arg] = x.index_fill(spec.dim % x.ndim, idx.to(x.device), 0.0)
                return tuple(args), kwargs

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            dim = spec.dim

            def post(m, args, out, idx=idx, dim=dim):
                def zero(t):
                    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                        return t
                    d = 1 if dim is None else dim
                    if t.ndim <= d % max(t.ndim, 1):
                        return t
                    return t.index_fill(d % t.ndim if d >= 0 else d + t.ndim, idx.to(t.device), 0.0)

                if isinstance(out, torch.Tensor):
                    return zero(out)
                return out

            handles.append(module.register_forward_hook(post))
    try:
        return run_model(model, inputs, forward_fn, output_transform)
    finally:
        for h in handles:
            h.remove()


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
        (float((a - b).abs().max()) for a, b in zip(got, expected, strict=False) if a.shape == b.shape),
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
