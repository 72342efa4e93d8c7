"""The masking oracle on hand-written architectures, shared by the ``test_oracle_*`` files
(one per plugin family: conv, linear, norm, attention, recurrent, parameters, mappers,
and what must freeze).

For each model a random half of every prunable group is pruned; the pruned model must
produce the same output as the original with those channels zeroed (``masked_forward``),
the output shape must not change, parameters must shrink (by the exact amount where it
is easy to count), and the masking must actually change the output (so the comparison
cannot pass by accident).
"""

from __future__ import annotations

import copy

import attrs
import torch
from torch import nn

from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.slicing import SliceEdit, apply_edits
from cleanai_core.testing import masked_forward, random_units, run_model

__all__ = ["Result", "group_of", "n_params", "oracle", "prune_with", "seq"]


@attrs.define
class Result:
    graph: DependencyGraph
    small: nn.Module
    pruned: torch.Tensor
    before: int
    after: int
    diff: float


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def prune_with(graph: DependencyGraph, pruned: torch.Tensor) -> nn.Module:
    small = copy.deepcopy(graph.model)
    edits = [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in graph.keep_indices(pruned).items()]
    apply_edits(small, edits, graph.pm)
    return small


def oracle(model, x, ratio=0.5, seed=0, forward_fn=None, must_prune=True, tol=1e-4) -> Result:
    """Prune ``ratio`` of every prunable (non-normalising) group and compare with masking."""
    model.eval()
    graph = DependencyGraph(model, x, forward_fn=forward_fn)
    pruned = random_units(graph, ratio, torch.Generator().manual_seed(seed), exclude_normalized=True)
    base = run_model(model, x, forward_fn)
    expected = masked_forward(graph, pruned, x, forward_fn)
    small = prune_with(graph, pruned)
    got = run_model(small, x, forward_fn)
    assert [g.shape for g in got] == [b.shape for b in base], "output shape changed"
    diff = max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))
    # float32 rounding grows with the outputs' size (vit_b_16's logits reach ~10)
    scale = max(1.0, max(float(e.abs().max()) for e in expected))
    assert diff < tol * scale, f"pruned model differs from the masked original by {diff} (outputs up to {scale})"
    if must_prune:
        assert int(pruned.sum()) > 0, graph.explain()
        assert n_params(small) < n_params(model)
        moved = max(float((e - b).abs().max()) for e, b in zip(expected, base, strict=True))
        assert moved > 1e-4, "masking did not change the output: the comparison proves nothing"
    return Result(graph, small, pruned, n_params(model), n_params(small), diff)


def group_of(graph: DependencyGraph, module: str, slice_name: str):
    for g in graph.groups():
        if any(s.module == module and s.name == slice_name for s in g.slices):
            return g
    raise KeyError((module, slice_name))


def seq(*layers) -> nn.Sequential:
    return nn.Sequential(*layers)
