"""Stage 6b, compensation: fold what removed input channels carried into what is kept.

Runs on the pruned copy before its tensors are sliced (:func:`cleanai_core.slicing.sliced_copy`
calls it with ``own``). Per consumer, from its calibration statistics:

- reconstruction (when a covariance was collected): a ridge regression of the removed
  channels on the kept ones, ``x_removed ~ shift + coef @ x_kept``, folded by the layer
  pruner's ``reconstruct``;
- otherwise, or where the pruner cannot fold it: the removed channels' mean, folded into
  the bias by the layer pruner's ``compensate``;
- a layer whose pruner says ``new_bias = False`` and that has no bias gets none: the
  regression is made through the origin (on second moments) and the mean is not folded.

Under ``torch.distributed`` each solve runs on one rank and is broadcast to the others.

A new compensation method goes here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cleanai_core import distributed
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.parametrized import is_parametrized
from cleanai_core.runtime import device_of

__all__ = ["compensate", "compensated_copy", "regress"]


def regress(
    cov: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    mean: torch.Tensor,
    removed: torch.Tensor,
    kept: torch.Tensor,
    damping: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of the removed channels on the kept ones from their covariance:
    ``x_removed ~ shift + coef @ x_kept`` (coef: removed x kept). ``cov`` is the C x C
    covariance, or only the two blocks the solve reads, ``(cov[kept][:, kept],
    cov[kept][:, removed])`` (:meth:`~cleanai_core.calibration.ChannelStats.cov_blocks`);
    neither is written to."""
    if isinstance(cov, torch.Tensor):
        c_kk = cov[kept[:, None], kept]  # one gather each, not a K x C copy first
        c_kr = cov[kept[:, None], removed]
    else:
        c_kk, c_kr = cov
    k = c_kk.shape[0]
    lam = damping * float(c_kk.diagonal().mean().clamp(min=1e-12))
    damped = _padded(c_kk)
    damped.diagonal()[:k].add_(lam)
    # the damped covariance is symmetric positive definite: Cholesky costs half of LU; a
    # matrix that is not (non-finite or degenerate statistics) falls back to the LU solve
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        coef = torch.cholesky_solve(c_kr, factor[:k, :k]).T
    else:
        coef = torch.linalg.solve(damped[:k, :k], c_kr).T
    shift = mean[removed] - coef @ mean[kept]
    return coef, shift


def _padded(a: torch.Tensor) -> torch.Tensor:
    """A copy of the square ``a`` with the identity appended (``[[a, 0], [0, I]]``), 8 or
    16 rows larger so that its size is no multiple of 128: its Cholesky factor starts with
    ``a``'s, and MKL's one-thread ``potrf`` runs 2-3x slower at sizes that are multiples of
    256 (K=1024: 19 -> 7.5 ms padded, K=1536: 51 -> 22, K=2048: 141 -> 63; the halves of
    power-of-two layer widths that pruning at 0.5 produces)."""
    k = a.shape[0]
    size = k + 8 if (k + 8) % 128 else k + 16
    out = a.new_empty(size, size)
    out[:k, :k] = a
    out[:k, k:] = 0.0
    out[k:] = 0.0
    out.diagonal()[k:] = 1.0
    return out


def compensate(
    model: nn.Module,
    graph: DependencyGraph,
    stats: dict,
    pruned: torch.Tensor,
    own: Callable[[nn.Module], nn.Module],
    reconstruction: bool = True,
) -> None:
    """Fold what the removed input channels carried into the kept ones; ``own(module)``
    gives the module tensors of its own before a plugin writes to them in place. Consumers
    that read the very same statistics with the same kept channels (a ResNet block's first
    conv and its downsample conv) share one solve. Under ``torch.distributed`` the
    least-squares solves are shared out among the ranks
    (:func:`cleanai_core.distributed.share_out`) and every rank folds the same results."""
    folds = []  # (spec, statistics, removed, index of its solve or None, no_bias)
    problems: list[tuple[Any, torch.Tensor, torch.Tensor, bool]] = []  # (statistics, removed, kept, no_bias)
    alike: dict[tuple, list[int]] = {}  # problems that may be the same (same sample reference and sizes)
    for spec in graph.slices:
        st = stats.get((spec.module, spec.name))
        if spec.kind != "in" or st is None or st.mean is None or spec.pruner is None:
            continue
        gone = pruned[graph.root[spec.atoms]]
        if not bool(gone.any()):
            continue
        module = model.get_submodule(spec.module)
        no_bias = not getattr(spec.pruner, "new_bias", True) and getattr(module, "bias", None) is None
        idx = gone.nonzero().squeeze(1)
        job = None
        if reconstruction and st.has_cov and not bool(gone.all()):
            problem = (st, idx, (~gone).nonzero().squeeze(1), no_bias)
            seen = alike.setdefault((id(st.cov_ref), st.cov_count, st.cov_batches, no_bias, len(idx), len(gone)), [])
            job = next((i for i in seen if _same_problem(problems[i], problem)), None)
            if job is None:
                job = len(problems)
                problems.append(problem)
                seen.append(job)
        folds.append((spec, st, idx, job, no_bias))
    jobs = [(_solver(*p), [(len(p[1]), len(p[2])), (len(p[1]),)]) for p in problems]
    solutions = distributed.share_out(jobs)
    handed: set[int] = set()  # solves already given to a pruner: the next consumer gets copies
    with torch.no_grad():
        for spec, st, idx, job, no_bias in folds:
            module = own(model.get_submodule(spec.module))
            dev = device_of(module) or torch.device("cpu")  # the statistics live on the CPU
            if job is not None:
                coef, shift = (t.clone() for t in solutions[job]) if job in handed else solutions[job]
                handed.add(job)
                kept = problems[job][2]
                moved = (t.to(dev) for t in (idx, kept, coef, shift))
                # a parametrized weight is recomputed from its originals: an edit of it is lost
                if not is_parametrized(module) and spec.pruner.reconstruct(module, spec.name, *moved):
                    continue
            if not no_bias:
                spec.pruner.compensate(module, spec.name, idx.to(dev), st.mean[idx].to(dev))


def _same_problem(a: tuple, b: tuple) -> bool:
    """Whether two consumers' regressions are the same problem: the same removed and kept
    channels and bit-identical statistics (consumers of one tensor accumulate the same
    co-moment from the same centred sample; equality is checked, not assumed)."""
    (sa, ra, ka, na), (sb, rb, kb, nb) = a, b
    if na != nb or sa.cov_ref is not sb.cov_ref or sa.cov_count != sb.cov_count:
        return False
    pairs = [(ra, rb), (ka, kb)]
    if sa is not sb:
        pairs += [(sa.mean, sb.mean), (sa.cov_offset, sb.cov_offset), (sa.cov_block, sb.cov_block),
                  (sa.cov_total, sb.cov_total)]  # fmt: skip
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in pairs)


def _solver(st: Any, idx: torch.Tensor, kept: torch.Tensor, no_bias: bool) -> Callable[[], list[torch.Tensor]]:
    """The regression of one consumer's removed channels on its kept ones, from the two
    covariance blocks it reads; without a bias to fold a constant into, through the origin
    (second moments, no intercept)."""

    def solve() -> list[torch.Tensor]:
        c_kk, c_kr = st.cov_blocks(kept, idx)
        if no_bias:
            m_kept = st.mean[kept]
            c_kk += torch.outer(m_kept, m_kept)
            c_kr += torch.outer(m_kept, st.mean[idx])
            return list(regress((c_kk, c_kr), torch.zeros_like(st.mean), idx, kept))
        return list(regress((c_kk, c_kr), st.mean, idx, kept))

    return solve


def compensated_copy(
    source: nn.Module,
    graph: DependencyGraph,
    pruned: torch.Tensor,
    stats: dict,
    reconstruction: bool = True,
    share: bool = False,
) -> tuple[nn.Module, list]:
    """A copy of ``source`` without the ``pruned`` units of ``graph``, with what they
    carried folded into the kept ones (:func:`compensate`; none without ``stats``).
    Returns the model and its slice edits; ``source`` is not written to. ``share``: see
    :func:`~cleanai_core.slicing.sliced_copy`."""
    from cleanai_core.slicing import edits_for, sliced_copy

    edits = edits_for(graph, pruned)
    fold = None
    if stats:
        fold = functools.partial(compensate, graph=graph, stats=stats, pruned=pruned, reconstruction=reconstruction)
    claims = graph.nodes if source is graph.model else None  # the graph's claims hold for a copy of its model
    return sliced_copy(source, edits, graph.pm, fold, share, claims), edits
