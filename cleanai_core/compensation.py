"""Stage 6b, compensation: fold what removed input channels carried into what is kept.

Runs on the pruned copy before its tensors are sliced (:func:`cleanai_core.slicing.sliced_copy`
calls it with ``own``). Per consumer, from its calibration statistics:

- reconstruction (when a covariance was collected): a ridge regression of the removed
  channels on the kept ones, ``x_removed ~ shift + coef @ x_kept``, folded by the layer
  pruner's ``reconstruct``;
- otherwise, or where the pruner cannot fold it: the removed channels' mean, folded into
  the bias by the layer pruner's ``compensate``;
- a layer whose pruner says ``new_bias = False`` and that has no bias gets none: the
  regression is made through the origin (on second moments) and the mean is not folded;
- a layer that had no bias and whose output only a norm with running statistics reads
  (a conv before its BatchNorm) keeps none either: once the pruning step is done
  (:func:`absorb_new_biases`, after the BatchNorm correction) the constant it was given
  moves into the norm's ``running_mean`` (:func:`bias_absorbers`), exact in eval mode; in
  train mode the norm subtracts the batch mean, bias or not.

Under ``torch.distributed`` each solve runs on one rank and is broadcast to the others.

A new compensation method goes here.
"""

from __future__ import annotations

import copy
import functools
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from cleanai_core import distributed
from cleanai_core.bn_correction import norms_with_running_stats
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.graph.trace import ModuleCall
from cleanai_core.interfaces import LayerPruner
from cleanai_core.parametrized import is_parametrized
from cleanai_core.runtime import device_of

__all__ = ["absorb_new_biases", "bias_absorbers", "compensate", "compensated_copy", "new_bias_params", "regress"]


#: a consumer gets ``B @ coef`` solved for directly where its kept rows ``n`` are at most
#: this share of the removed channels ``R``: both ways form one ``n x R x K`` product (the
#: product's in float64), the direct one solves ``n`` right-hand sides instead of ``R``.
#: One thread, K = R: at n = R / 2 1536: 110 -> 86 ms, 512: 4.7 -> 5.7, 128: 0.10 -> 0.08;
#: at n = R / 4, 1536: 102 -> 47; at n = R the coefficients win at every size
PRODUCT_ROWS = 0.5


def regress(
    cov: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    mean: torch.Tensor,
    removed: torch.Tensor,
    kept: torch.Tensor,
    damping: float = 1e-3,
    weights: Sequence[torch.Tensor] | None = None,
    coef: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Ridge regression of the removed channels on the kept ones from their covariance:
    ``x_removed ~ shift + coef @ x_kept`` (coef: removed x kept). ``cov`` is the C x C
    covariance, or only the two blocks the solve reads, ``(cov[kept][:, kept],
    cov[kept][:, removed])`` (:meth:`~cleanai_core.calibration.ChannelStats.cov_blocks`);
    neither is written to. Returns ``(coef, shift)``.

    ``weights``: matrices ``B`` (n x removed: a consumer's weights on the removed channels,
    :meth:`~cleanai_core.interfaces.LayerPruner.removed_weights`). Then the result is
    ``(coef, shift)`` (only where ``coef``) followed by ``B @ coef`` and ``B @ shift`` for
    each ``B``, in float64, the products solved for directly: ``n`` right-hand sides
    instead of ``len(removed)``."""
    if isinstance(cov, torch.Tensor):
        c_kk = cov[kept[:, None], kept]  # one gather each, not a K x C copy first
        c_kr = cov[kept[:, None], removed]
    else:
        c_kk, c_kr = cov
    solve = _ridge(c_kk, damping)
    m_removed, m_kept = mean[removed], mean[kept]
    out: list[torch.Tensor] = []
    if weights is None or coef:
        slope = solve(c_kr).T
        out += [slope, m_removed - slope @ m_kept]
    for b in weights or ():
        b = b.to(c_kr.dtype)
        product = solve(c_kr @ b.T).T  # B @ coef = B C_rk A^-1 = (A^-1 C_kr B^T)^T, A symmetric
        out += [product, b @ m_removed - product @ m_kept]
    return tuple(out)


def _ridge(c_kk: torch.Tensor, damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``rhs -> (c_kk + lam I)^-1 rhs``, ``lam`` = ``damping`` x the mean variance."""
    k = c_kk.shape[0]
    lam = damping * float(c_kk.diagonal().mean().clamp(min=1e-12))
    damped = _padded(c_kk)
    damped.diagonal()[:k].add_(lam)
    # the damped covariance is symmetric positive definite: Cholesky costs half of LU; a
    # matrix that is not (non-finite or degenerate statistics) falls back to the LU solve
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        return functools.partial(_cholesky_solve, factor[:k, :k])
    return functools.partial(torch.linalg.solve, damped[:k, :k])


def _cholesky_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_solve(rhs, factor)


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
    (:func:`cleanai_core.distributed.share_out`) and every rank folds the same results.

    A consumer whose pruner gives its weights on the removed channels
    (:meth:`~cleanai_core.interfaces.LayerPruner.removed_weights`: only the rows that
    slicing keeps) and at most :data:`PRODUCT_ROWS` times as many such rows as removed
    channels gets the product ``B @ coef`` solved for directly; one with more gets ``coef``
    and folds ``B @ coef`` on those rows."""
    from cleanai_core.slicing import shared_tensors

    # a weight another module holds too (tied input and output embeddings): reconstruction
    # would rewrite the other module's kept channels as well (the embedding's, where the
    # output layer was being compensated); such a consumer folds the mean into its bias only
    tied = {id(getattr(m, a)) for holders in shared_tensors(model) for m, a in holders}
    folds = []  # (spec, statistics, removed, index of its solve or None, no_bias)
    problems: list[tuple[Any, torch.Tensor, torch.Tensor, bool]] = []  # (statistics, removed, kept, no_bias)
    alike: dict[tuple, list[int]] = {}  # problems that may be the same (same sample reference and sizes)
    for spec, st, gone in _folded(graph, stats, pruned):
        module = model.get_submodule(spec.module)
        no_bias = not getattr(spec.pruner, "new_bias", True) and getattr(module, "bias", None) is None
        idx = gone.nonzero().squeeze(1)
        job = None
        weight_tied = any(id(p) in tied for n, p in module.named_parameters() if not n.endswith("bias"))
        if reconstruction and st.has_cov and not bool(gone.all()) and not weight_tied:
            problem = (st, idx, (~gone).nonzero().squeeze(1), no_bias)
            seen = alike.setdefault((id(st.cov_ref), st.cov_count, st.cov_batches, no_bias, len(idx), len(gone)), [])
            job = next((i for i in seen if _same_problem(problems[i], problem)), None)
            if job is None:
                job = len(problems)
                problems.append(problem)
                seen.append(job)
        folds.append((spec, st, idx, job, no_bias))
    weights = _removed_weights(model, graph, pruned, folds)
    by_product = {i for i, (b, _) in weights.items() if b.shape[0] <= PRODUCT_ROWS * len(folds[i][2])}
    products: dict[int, list[int]] = defaultdict(list)  # per solve: the folds it gives products for
    needs_coef = [False] * len(problems)
    for i, (_, _, _, job, _) in enumerate(folds):
        if job is not None:
            if i in by_product:
                products[job].append(i)
            else:
                needs_coef[job] = True
    jobs = []
    for j, p in enumerate(problems):
        r, k = len(p[1]), len(p[2])
        shapes = [(r, k), (r,)] if needs_coef[j] else []
        for i in products[j]:
            n = weights[i][0].shape[0]
            shapes += [(n, k), (n,)]
        mats = [weights[i][0].to("cpu", torch.float64) for i in products[j]]
        jobs.append((_solver(*p, mats, needs_coef[j]), shapes))
    solutions = distributed.share_out(jobs)
    handed: set[int] = set()  # solves already given to a pruner: the next consumer gets copies
    with torch.no_grad():
        for i, (spec, st, idx, job, no_bias) in enumerate(folds):
            module = own(model.get_submodule(spec.module))
            dev = device_of(module) or torch.device("cpu")  # the statistics live on the CPU
            if job is not None:
                kept = problems[job][2]
                found = solutions[job]
                if i in by_product:
                    at = (2 if needs_coef[job] else 0) + 2 * products[job].index(i)
                    delta, bias = (t.to(dev) for t in found[at : at + 2])
                    spec.pruner.add_reconstruction(module, spec.name, kept.to(dev), weights[i][1], delta, bias)
                    continue
                if i in weights:  # the coefficients, folded on the rows that slicing keeps
                    b, keep = weights[i]
                    coef, shift = (t.to(dev, b.dtype) for t in found[:2])
                    spec.pruner.add_reconstruction(module, spec.name, kept.to(dev), keep, b @ coef, b @ shift)
                    continue
                coef, shift = (t.clone() for t in found[:2]) if job in handed else found[:2]
                handed.add(job)
                moved = (t.to(dev) for t in (idx, kept, coef, shift))
                # a parametrized weight is recomputed from its originals: an edit of it is lost
                if not is_parametrized(module) and spec.pruner.reconstruct(module, spec.name, *moved):
                    continue
            if not no_bias:
                spec.pruner.compensate(module, spec.name, idx.to(dev), st.mean[idx].to(dev))


def absorb_new_biases(model: nn.Module, graph: DependencyGraph, before: nn.Module) -> list[str]:
    """Move the biases compensation gave layers of ``model`` (the pruned copy of ``before``,
    whose graph is ``graph``) that ``before`` lacked into the norm that alone reads each
    (:func:`bias_absorbers`: ``running_mean -= bias``), and drop them: the pruned model
    keeps the architecture it had. Runs after the BatchNorm correction, whose estimate
    reads the norm's trained statistics in the frame of its input as compensated. Returns
    the layers whose bias went."""
    lacked = set()
    old_modules = dict(before.named_modules(remove_duplicate=False))  # one walk, not a path walk per layer
    for name, module in model.named_modules():
        had = getattr(old_modules.get(name), "bias", False)  # False: no such module there, or one without a bias
        if isinstance(getattr(module, "bias", None), torch.Tensor) and had is None:
            lacked.add(name)
    gone = []
    with torch.no_grad():
        for name, norm_name in bias_absorbers(model, graph, lacked).items():
            module, norm = model.get_submodule(name), model.get_submodule(norm_name)
            if module.bias.shape != norm.running_mean.shape:
                continue
            norm.running_mean.sub_(module.bias.detach().to(norm.running_mean))
            module.bias = None
            gone.append(name)
    return gone


def bias_absorbers(model: nn.Module, graph: DependencyGraph, names: Any) -> dict[str, str]:
    """Per layer of ``names`` (layers without a bias that compensation may give one): the
    norm with running statistics (:func:`~cleanai_core.bn_correction.norms_with_running_stats`)
    that alone reads its output, which therefore holds the constant instead
    (``running_mean -= bias``). Only where the trace shows it: every call of the layer has
    one output, no model output, with its own channels on dim 1 (where the norm reads
    them, as :mod:`cleanai_core.bn_correction` assumes), read by that norm alone; every
    call of the norm reads such an output; and neither is parametrized. A norm no plugin
    claims (torchvision's ``FrozenBatchNorm2d``) is traced as its operations: they must
    read nothing but the layer's output, the norm's own tensors and what they made, and a
    probe on a copy of the norm must show that it holds a shift (:func:`_holds_a_shift`)."""
    names = {n for n in names if not is_parametrized(model.get_submodule(n))}
    if not names:
        return {}
    norms = norms_with_running_stats(model)
    calls: dict[str, list[ModuleCall]] = defaultdict(list)
    scoped: dict[str, list[Any]] = defaultdict(list)  # the operations run directly in each module
    made_in: dict[int, str] = {}  # traced tensor -> the module whose operation made it
    for event in graph.recording.events:
        if isinstance(event, ModuleCall):
            calls[event.name].append(event)
        else:
            scoped[event.scope].append(event)
            made_in.update((r.key, event.scope) for r in event.outputs)
    outputs = {r.key for r in graph.recording.outputs()}
    found: dict[str, str] = {}
    for name in names:
        spec = graph.ctx.slices.get((name, "out"))
        read_by: set[str] = set()
        keys: set[int] = set()
        shape: tuple[int, ...] = ()
        for event in calls.get(name) or [None]:
            if event is None or spec is None or len(event.outputs) != 1:
                break
            ref = _through_reshapes(graph, event.outputs[0], spec.atoms, outputs)
            label = graph.ctx.label_of(ref)
            if ref.key in outputs or label is None or label.dim != 1 or not _same_atoms(label.atoms, spec.atoms):
                break
            if ref.ndim < 2 or ref.shape[1] != spec.atoms.numel():
                break
            norm_name = _reading_norm(ref, graph.ctx.readers(ref), norms, calls)
            if norm_name is None:
                break
            read_by.add(norm_name)
            keys.add(ref.key)
            shape = ref.shape
        else:
            if len(read_by) != 1:
                continue
            norm_name = read_by.pop()
            norm = norms[norm_name]
            if is_parametrized(norm):
                continue
            if norm_name in calls:
                holds = all(e.inputs[:1] and e.inputs[0].key in keys for e in calls[norm_name])
            else:
                own = all(r.param is not None or r.key in keys or made_in.get(r.key) == norm_name
                          for e in scoped[norm_name] for r in e.inputs)  # fmt: skip
                holds = own and _holds_a_shift(norm, shape)
            if holds:
                found[name] = norm_name
    return found


#: operations that only move a tensor's elements: a per-channel constant stays one through them
_RESHAPES = frozenset({"view", "_unsafe_view", "reshape", "flatten", "transpose", "permute", "contiguous", "clone"})


def _through_reshapes(graph: DependencyGraph, ref: Any, atoms: torch.Tensor, outputs: set[int]) -> Any:
    """The tensor a norm may read ``ref`` as: ``ref``, or the end of a chain of reshapes that
    each alone read the one before and keep its channels whole on one dimension (LeViT's
    ``LinearNorm``: ``bn(linear(x).flatten(0, 1))``, channels last to dim 1)."""
    while ref.key not in outputs:
        readers = graph.ctx.readers(ref)
        if len(readers) != 1 or isinstance(readers[0], ModuleCall) or len(readers[0].outputs) != 1:
            break
        op = getattr(getattr(readers[0].op, "overloadpacket", None), "__name__", "")
        nxt = readers[0].outputs[0]
        label = graph.ctx.label_of(nxt)
        if op not in _RESHAPES or [t.key for t in readers[0].inputs[:1]] != [ref.key] or label is None:
            break
        if not _same_atoms(label.atoms, atoms):
            break
        if nxt.shape[label.dim] != atoms.numel():
            break
        ref = nxt
    return ref


def _same_atoms(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


def _reading_norm(ref: Any, readers: list, norms: dict[str, nn.Module], calls: dict) -> str | None:
    """The norm that alone reads the traced tensor ``ref``: a claimed norm's call with it as
    its first input, or operations all run directly in one norm that no plugin claims."""
    if len(readers) == 1 and isinstance(readers[0], ModuleCall):
        r = readers[0]
        return r.name if r.name in norms and [t.key for t in r.inputs[:1]] == [ref.key] else None
    scopes = {None if isinstance(r, ModuleCall) else r.scope for r in readers}
    scope = scopes.pop() if len(scopes) == 1 else None
    return scope if scope in norms and scope not in calls else None


def _holds_a_shift(norm: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether ``norm(x + c)`` equals ``norm(x)`` with ``running_mean - c`` (a per-channel
    ``c`` on dim 1), probed on a copy of ``norm`` in eval mode at one position per channel
    of an input with as many dimensions as ``shape``. For a norm whose forward the kernel does not know."""
    probe = copy.deepcopy(norm).eval()
    mean = probe.running_mean
    at = (1, mean.numel()) + (1,) * (len(shape) - 2)  # the norm's width: the model may be a sliced copy
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(at, generator=gen, dtype=mean.dtype).to(mean.device)
    c = torch.randn(mean.shape, generator=gen, dtype=mean.dtype).to(mean.device)
    try:
        with torch.no_grad():
            want = probe(x + c.reshape(at))
            mean.sub_(c)
            got, moved = probe(x), probe(x + c.reshape(at))  # moved: the statistics are read at all
    except Exception:  # noqa: BLE001 - a norm that does not run on such an input holds nothing
        return False
    if not all(isinstance(t, torch.Tensor) and t.shape == want.shape for t in (want, got, moved)):
        return False
    return bool(torch.allclose(want, got, rtol=1e-4, atol=1e-5)) and not bool(torch.allclose(want, moved))


def _folded(graph: DependencyGraph, stats: dict, pruned: torch.Tensor) -> Any:
    """``(slice, statistics, removed mask)`` of each consumer input that compensation folds:
    one with statistics, a layer pruner and a removed channel."""
    for spec in graph.slices:
        st = stats.get((spec.module, spec.name))
        if spec.kind != "in" or st is None or st.mean is None or spec.pruner is None:
            continue
        gone = pruned[graph.root[spec.atoms]]
        if bool(gone.any()):
            yield spec, st, gone


def new_bias_params(model: nn.Module, graph: DependencyGraph, stats: dict, pruned: torch.Tensor) -> int:
    """The parameters of the biases compensation will give layers of ``model`` (the original
    or a sliced copy of it) that have none: one per output of each consumer it folds into
    whose pruner allows a new bias (``weight.shape[0]``, as
    :meth:`~cleanai_core.history.PruningHistory.replay` creates them). A target search that
    measured copies without compensation missed them: ``target_params=0.77`` kept 0.77006."""
    pruners: dict[str, Any] = {}
    for spec, _, _ in _folded(graph, stats, pruned):
        pruners.setdefault(spec.module, spec.pruner)
    lacked = {n for n in pruners if getattr(model.get_submodule(n), "bias", None) is None}
    for name in bias_absorbers(model, graph, lacked):  # the norm after it holds the constant
        del pruners[name]
    count = 0
    for name, pruner in pruners.items():
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if getattr(module, "bias", None) is None and getattr(pruner, "new_bias", True) and weight is not None:
            count += int(weight.shape[0])
    return count


def _removed_weights(model: nn.Module, graph: DependencyGraph, pruned: torch.Tensor, folds: list) -> dict[int, tuple]:
    """Per fold with a solve whose pruner folds by products: its weights on the removed
    channels (:meth:`~cleanai_core.interfaces.LayerPruner.removed_weights`) and the kept
    indices of its module's slices. Not for a parametrized module (an edit of its weight is
    lost) nor one with two folds (the second reads weights the first changed)."""
    folded = Counter(spec.module for spec, _, _, job, _ in folds if job is not None)
    chosen = {i for i, (spec, _, _, job, _) in enumerate(folds) if job is not None and folded[spec.module] == 1}
    chosen = {i for i in chosen if _folds_by_products(folds[i][0].pruner)}
    if not chosen:
        return {}
    names = {folds[i][0].module for i in chosen}
    keep: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for (m, s), k in graph.keep_indices(pruned).items():
        if m in names:
            keep[m][s] = k
    out = {}
    for i in sorted(chosen):
        spec, idx = folds[i][0], folds[i][2]
        module = model.get_submodule(spec.module)
        if is_parametrized(module):
            continue
        dev = device_of(module) or torch.device("cpu")
        own_keep = {s: k.to(dev) for s, k in keep[spec.module].items()}
        b = spec.pruner.removed_weights(module, spec.name, idx.to(dev), own_keep)
        if b is not None:
            out[i] = (b, own_keep)
    return out


def _folds_by_products(pruner: Any) -> bool:
    """Whether ``pruner`` implements :meth:`~cleanai_core.interfaces.LayerPruner.removed_weights`
    and no subclass below the class that does overrides ``reconstruct`` (a third-party
    subclass that changed ``reconstruct`` keeps getting it called)."""
    mro = [c for c in type(pruner).__mro__ if c is not LayerPruner]
    at = [next((i for i, c in enumerate(mro) if n in vars(c)), len(mro)) for n in ("removed_weights", "reconstruct")]
    return at[0] < len(mro) and at[0] <= at[1]


def _same_problem(a: tuple, b: tuple) -> bool:
    """Whether two consumers' regressions are the same problem: the same removed and kept
    channels and bit-identical statistics (consumers of one tensor share one co-moment;
    where they do not, equality of the sums is checked, not assumed)."""
    (sa, ra, ka, na), (sb, rb, kb, nb) = a, b
    if na != nb or sa.cov_ref is not sb.cov_ref or sa.cov_count != sb.cov_count:
        return False
    pairs = [(ra, rb), (ka, kb)]
    if sa is not sb:
        pairs.append((sa.mean, sb.mean))
    if sa.comoment is not sb.comoment:
        pairs += [(sa.cov_offset, sb.cov_offset), (sa.cov_block, sb.cov_block), (sa.cov_total, sb.cov_total)]
    return all(_same_tensor(x, y) for x, y in pairs)


def _same_tensor(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    """Equal tensors, or both None (a co-moment's total before its first flush)."""
    return x is y or (x is not None and y is not None and x.shape == y.shape and torch.equal(x, y))


def _solver(
    st: Any, idx: torch.Tensor, kept: torch.Tensor, no_bias: bool, weights: list[torch.Tensor], coef: bool
) -> Callable[[], list[torch.Tensor]]:
    """The regression of one consumer's removed channels on its kept ones, from the two
    covariance blocks it reads; without a bias to fold a constant into, through the origin
    (second moments, no intercept). ``weights`` and ``coef``: see :func:`regress`."""

    def solve() -> list[torch.Tensor]:
        c_kk, c_kr = st.cov_blocks(kept, idx)
        mean = st.mean
        if no_bias:
            m_kept = st.mean[kept]
            c_kk += torch.outer(m_kept, m_kept)
            c_kr += torch.outer(m_kept, st.mean[idx])
            mean = torch.zeros_like(st.mean)
        return list(regress((c_kk, c_kr), mean, idx, kept, weights=weights, coef=coef))

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
