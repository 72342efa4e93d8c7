"""Dead and redundant units, found in the statistics calibration already streamed.

Glossary:

- **dead** channel of a consumer's input: it never activates on the data (its second
  moment ``E[x^2]`` is zero).
- **constant** channel: it takes one value on every sample (variance zero, mean not
  zero). Folding that value into the consumer's bias removes it almost exactly; not
  exactly where the consumer pads its input with zeros (a 3x3 conv's border positions
  see the padding, not the constant), so constant channels are reported, not removed.
- **near-duplicate** pair: two channels of one consumer's input whose correlation on the
  data is at least ``duplicate_threshold`` (from the covariance collected for
  reconstruction; absent without it). Least-squares reconstruction folds one into the
  other almost exactly.
- **removable unit** (of a group): every consumer that reads the unit has statistics for
  it and sees it dead. Pruning exactly these units leaves the outputs on the
  calibration data unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from cleanai_core.calibration import ChannelStats

__all__ = ["LayerFindings", "dead_plan", "find_dead_units", "removable_units"]

#: a channel counts as dead below this share of its layer's mean energy
RELATIVE_TOLERANCE = 1e-10
#: ... and as constant when its variance is below this share of its squared mean: the
#: per-batch reductions run in float32, whose E[x^2] - E[x]^2 is exact to a few 1e-7 of E[x]^2
CONSTANT_TOLERANCE = 1e-6
DUPLICATE_THRESHOLD = 0.99
MAX_PAIRS_LISTED = 20


@attrs.define
class LayerFindings:
    """Per consumer input (``layer``): channel indices that are dead, constant, or near-duplicates."""

    layer: str
    channels: int
    dead: list[int]
    constant: list[int]
    duplicates: list[tuple[int, int, float]]  # (i, j, correlation), strongest first, at most MAX_PAIRS_LISTED
    duplicate_pairs: int  # all pairs above the threshold

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _flags(st: ChannelStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(dead, constant) per channel of one statistics record."""
    second, var = st.second_moment, st.var
    scale = float(second.mean()) if second.numel() else 0.0
    tol = RELATIVE_TOLERANCE * scale if scale > 0 else 0.0
    dead = second <= tol
    constant = (var <= torch.clamp(CONSTANT_TOLERANCE * st.mean**2, min=tol)) & ~dead
    return dead, constant


def _duplicates(st: ChannelStats, threshold: float) -> tuple[list[tuple[int, int, float]], int]:
    cov = st.cov
    if cov is None:
        return [], 0
    sd = cov.diagonal().clamp(min=0).sqrt()
    live = sd > 0
    corr = cov / (sd[:, None] * sd[None, :]).clamp(min=1e-300)
    upper = torch.triu(torch.ones_like(corr, dtype=torch.bool), diagonal=1) & live[:, None] & live[None, :]
    hits = (corr.abs() >= threshold) & upper
    idx = hits.nonzero()
    values = corr[hits]
    order = torch.argsort(values.abs(), descending=True)[:MAX_PAIRS_LISTED]
    pairs = [(int(idx[k, 0]), int(idx[k, 1]), round(float(values[k]), 6)) for k in order]
    return pairs, int(idx.shape[0])


def find_dead_units(
    graph: Any, stats: Mapping[tuple[str, str], ChannelStats], duplicate_threshold: float = DUPLICATE_THRESHOLD
) -> list[LayerFindings]:
    """Per consumer input with statistics and anything to report: dead, constant and
    near-duplicate channels (indices into that input's channels)."""
    out = []
    for spec in graph.slices:
        st = stats.get((spec.module, spec.name))
        if spec.kind != "in" or st is None or st.mean is None:
            continue
        dead, constant = _flags(st)
        pairs, n_pairs = _duplicates(st, duplicate_threshold)
        if dead.any() or constant.any() or n_pairs:
            out.append(
                LayerFindings(
                    spec.module or spec.name,
                    int(st.mean.numel()),
                    dead.nonzero().squeeze(1).tolist(),
                    constant.nonzero().squeeze(1).tolist(),
                    pairs,
                    n_pairs,
                )
            )
    return out


def removable_units(graph: Any, stats: Mapping[tuple[str, str], ChannelStats]) -> torch.Tensor:
    """A mask over the graph's units: those every consumer sees dead. Units no consumer
    has statistics for are never removable."""
    n = graph.root.numel()
    seen = torch.zeros(n, dtype=torch.bool)
    live = torch.zeros(n, dtype=torch.bool)
    for spec in graph.slices:
        if spec.kind != "in":
            continue
        units = graph.root[spec.atoms]
        st = stats.get((spec.module, spec.name))
        if st is None or st.mean is None or st.mean.numel() != spec.atoms.numel():
            live[units] = True  # read without statistics: unknown, so kept
            continue
        dead, _ = _flags(st)
        seen[units] = True
        live[units[~dead]] = True
    return seen & ~live


def dead_plan(graph: Any, stats: Mapping[tuple[str, str], ChannelStats], score: Any) -> Any:
    """The plan that removes exactly the removable dead units (:func:`removable_units`);
    a group keeps at least its best-scored unit. ``score()`` gives the groups' scores."""
    from cleanai_core.errors import UserError
    from cleanai_core.planning import GroupPlan, PruningPlan, equalize_ties

    if not stats:
        raise UserError("prune_dead_only needs activation statistics: call pruner.collect_activations(loader) first")
    gone, scores = removable_units(graph, stats), score()
    plans = []
    for g in graph.groups(prunable_only=True):
        pruned = gone[g.units] & ~g.frozen
        if int(pruned.sum()) >= g.size:  # a group keeps at least one unit
            pruned[int(torch.argmax(scores[g.id]))] = False
        plans.append(GroupPlan(g, scores[g.id], pruned, int(pruned.sum()) / max(g.size, 1)))
    equalize_ties(plans)  # tied groups (3-D experts) remove as many dead units each
    return PruningPlan(plans, graph.root.numel())
