"""Stage 2, calibration: the loops over the user's data.

One pass over the calibration batches streams every consumer's channel statistics
(:class:`~cleanai_core.calibration.StatsCollector`) and the BatchNorm input moments of
the original model (:mod:`cleanai_core.bn_correction`), keeps the batches for later
passes (:class:`~cleanai_core.replay.CalibrationData`), and, for gradient criteria,
accumulates gradients on them. After slicing, :func:`correct_batchnorm_after` reads the
same batches, or those of them spread over the data that hold ``bn_samples`` samples, to
move BatchNorm statistics; where the loader's length tells them in advance, the
original's norm inputs are recorded on those batches only; where it does not, on batches
drawn at random as the stream passes (:class:`~cleanai_core.replay.Pool`), kept for the
correction. Under ``torch.distributed`` each function is a
collective stage whose sums are combined over ranks (:mod:`cleanai_core.distributed`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from cleanai_core import distributed
from cleanai_core.bn_correction import (
    Moments,
    Samples,
    correct_batchnorm,
    norms_with_running_stats,
    recording,
    sampling,
)
from cleanai_core.calibration import (
    COVARIANCE_BUDGET_BYTES,
    COVARIANCE_ROWS,
    StatsCollector,
    iterate,
    move_to,
    split_batch,
    total_batches,
)
from cleanai_core.errors import UserError, model_fault
from cleanai_core.model_state import copy_model, holds_history, preserved, set_mode
from cleanai_core.replay import CalibrationData, Pool, batch_bytes, samples_in, spread
from cleanai_core.runtime import (
    check_labels,
    class_logits,
    classes_on_dim1,
    device_of,
    dtype_advice,
    inputs_for,
    logits_of,
    may_run_channels_last,
    plain_inputs,
    positional_inputs,
    reads_as_regression,
    regression_targets,
    run_batch,
    runs_the_same,
    same_layout,
    spent,
    to_channels_last,
    unused_key_hint,
)
from cleanai_core.scoring import importance_name
from cleanai_core.verify import output_leaves

__all__ = [
    "Calibration",
    "CalibrationSetup",
    "accumulate_gradients",
    "held_gradients",
    "calibrate",
    "correct_batchnorm_after",
    "recalibrate",
]


@attrs.frozen
class CalibrationSetup:
    """How to run the model (``forward_fn``; ``output_transform`` for the loss of gradient
    criteria) and what to collect: covariances (for reconstruction) within ``budget``
    bytes, sampled at ``rows`` positions per batch, and ``gradients``: ``True`` for the
    loss gradients summed over the batches, ``"squared"`` for the squares of every
    sample's own gradients, summed (a criterion's ``needs_squared_gradients``)."""

    covariance: bool = True
    rows: int = COVARIANCE_ROWS
    budget: int = COVARIANCE_BUDGET_BYTES
    forward_fn: Callable | None = None
    output_transform: Callable | None = None
    gradients: bool | str = False
    #: the BatchNorm correction's ``bn_samples``: the original's paired samples are taken on
    #: the batches it will read only (:func:`correct_batchnorm_after`), where their count is known
    bn_samples: int | None = None
    #: the gradient criterion's registered name, for the messages about its labels
    criterion: str = "taylor"

    @classmethod
    def of(cls, pruner: Any) -> CalibrationSetup:
        """The setup of a :class:`~cleanai_core.pruner.StructuredPruner`'s options."""
        needs: bool | str = bool(getattr(pruner.importance, "needs_gradients", False))
        if needs and getattr(pruner.importance, "needs_squared_gradients", False):
            needs = "squared"
        return cls(pruner.reconstruction, pruner.covariance_rows, pruner.stats_budget_bytes, pruner.forward_fn,
                   pruner.output_transform, needs, getattr(pruner, "bn_samples", None),
                   importance_name(pruner.importance) if needs else "taylor")  # fmt: skip


@attrs.define
class Calibration:
    """What one pass over the calibration data produced."""

    stats: dict = attrs.field(factory=dict)
    moments: Moments = attrs.field(factory=dict)  # BatchNorm input moments, per call
    samples: Samples = attrs.field(factory=Samples)  # BatchNorm inputs at the paired positions, per call
    data: CalibrationData | None = None
    gradients: dict[str, torch.Tensor] = attrs.field(factory=dict)
    #: after each batch, how many calls of each norm :attr:`moments` holds (to take the
    #: calls of some batches: :func:`correct_batchnorm_after`'s ``samples_cap``)
    batch_calls: list[dict[str, int]] = attrs.field(factory=list)

    def end_batch(self) -> None:
        """Mark the end of one batch's calls in :attr:`moments` (a batch that recorded
        nothing shares the entry before it: a long stream adds one reference per batch,
        not one count per norm)."""
        counts = {name: len(calls) for name, calls in self.moments.items()}
        last = self.batch_calls[-1] if self.batch_calls else None
        self.batch_calls.append(last if last == counts else counts)


def _combine(result: Calibration, model: nn.Module, *args: Any, **kwargs: Any) -> Calibration:
    """The statistics (and gradients) of every rank's shard, summed."""
    result.stats = distributed.combine_stats(result.stats)
    if _setup_of(args, kwargs).gradients:  # on every rank, also one whose shard gave no gradients
        result.gradients = distributed.combine_gradients(model, result.gradients)
    return result


def _setup_of(args: tuple, kwargs: dict) -> CalibrationSetup:
    """The :class:`CalibrationSetup` among a stage's arguments (the same on every rank)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, CalibrationSetup):
            return value
    raise TypeError("a calibration stage was called without its CalibrationSetup")


@distributed.stage("calibration", then=_combine)
def calibrate(
    model: nn.Module,
    slices: Any,
    loader: Iterable[Any],
    num_batches: int | None,
    setup: CalibrationSetup,
    progress: bool = True,
    sequential: bool | str = False,
) -> Calibration:
    """Stream statistics at the inputs of ``slices``' consumers over ``loader``; ``model``'s
    modes and buffers come back as they were. ``sequential``: one block at a time
    (:mod:`cleanai_core.sequential`; the batches are not kept)."""
    check_num_batches(num_batches)
    data = CalibrationData(loader, num_batches)
    out = Calibration(data=data)
    if sequential:
        from cleanai_core.sequential import collect_sequential

        forward = lambda m, x: run_batch(m, x, setup.forward_fn)  # noqa: E731
        out.stats = collect_sequential(
            model,
            slices,
            loader,
            num_batches,
            forward,
            blocks=sequential if isinstance(sequential, str) else None,
            covariance=setup.covariance,
            covariance_rows=setup.rows,
            budget=setup.budget,
        )
        data.batches = None  # not kept: the BatchNorm correction reads the loader again beside the original
    else:
        from tqdm.auto import tqdm

        planned: list[list[int] | None] = [None]  # the batches the BatchNorm correction will read

        def fresh() -> StatsCollector:
            out.moments, out.samples, out.batch_calls = {}, Samples(batches=planned[0]), []
            return StatsCollector(
                model, slices, covariance=setup.covariance, covariance_budget=setup.budget, covariance_rows=setup.rows
            )

        collector = fresh()
        # where the loader's length is not known, the batches the correction reads are drawn
        # at random while it passes (:class:`~cleanai_core.replay.Pool`); a one-shot loader
        # of known length keeps its planned ones: else neither could be read again
        pool: list[Pool | None] = [None]

        @contextlib.contextmanager
        def collecting() -> Iterator[None]:
            # the original's norm inputs only on the batches the BatchNorm correction will read
            only = lambda: out.samples.active  # noqa: E731
            with collector.hooks(), recording(model, out.moments, only), sampling(model, out.samples):
                yield

        total = total_batches(loader, num_batches)
        bar = tqdm(total=total, disable=not progress, desc="calibrating", unit="batch", leave=False)
        with preserved(model), torch.no_grad(), bar:  # every module's mode and buffers (BN, observers) put back
            batches = iter(iterate(check_iterable(loader), num_batches))
            first = next(batches, _NO_BATCH)
            if first is not _NO_BATCH:
                if total is not None and not distributed.is_distributed():
                    # batches like the first: the spread the correction reads (over ranks, it is chosen over
                    # every rank's batches when it runs: :func:`~cleanai_core.distributed.spread_over_ranks`)
                    planned[0] = spread([samples_in(first)] * total, setup.bn_samples)
                    out.samples.batches = planned[0]
                if setup.bn_samples and norms_with_running_stats(model) and (total is None or data.one_shot):
                    if total is None:
                        pool[0] = Pool.for_samples(first, setup.bn_samples, data.budget)
                    else:  # known length: the planned batches, kept where they fit
                        chosen = planned[0] if planned[0] is not None else list(range(total))
                        if len(chosen) * batch_bytes(first) <= data.budget:
                            pool[0] = Pool(len(chosen), planned=chosen)
                data.keep(first)
                inputs = inputs_for(model, split_batch(first, model)[0])
                if may_run_channels_last(model, inputs):
                    # the first batch channels-last, then its first samples as they are: the
                    # layout is kept where the outputs agree (:func:`channels_last_layout`)
                    data.layout = to_channels_last
                    try:
                        with preserved(model), collecting():
                            reference = output_leaves(run_batch(model, to_channels_last(inputs), setup.forward_fn))
                        fits = runs_the_same(model, inputs, setup.forward_fn, reference)
                    except Exception:
                        fits = False
                    if not fits:  # the statistics start again, from the inputs as they are
                        data.layout, collector = same_layout, fresh()
                if data.layout is same_layout:
                    with collecting(), model_failure(0, inputs, first, model):
                        run_batch(model, inputs, setup.forward_fn)
                out.end_batch()
                _to_pool(pool[0], pool[0].slot_for(0) if pool[0] is not None else None, 0, first, out)
                bar.update()
            with collecting():
                for i, batch in enumerate(batches, 1):
                    data.keep(batch)
                    slot = pool[0].slot_for(i) if pool[0] is not None else None
                    if pool[0] is not None:
                        out.samples.active = slot is not None
                    else:
                        out.samples.active = planned[0] is None or i in planned[0]
                    inputs = split_batch(batch, model)[0]
                    with model_failure(i, inputs, batch, model):
                        run_batch(model, data.layout(inputs), setup.forward_fn)
                    out.end_batch()
                    _to_pool(pool[0], slot, i, batch, out)
                    bar.update()
        if pool[0] is not None:
            _from_pool(pool[0], out, data)
        out.stats = collector.stats
    check_samples_seen(out.stats)
    if setup.gradients:
        out.gradients = _gradients(model, data, setup)
    return out


_NO_BATCH = object()


def _to_pool(pool: Pool | None, slot: int | None, i: int, batch: Any, out: Calibration) -> None:
    """Move what batch ``i`` recorded (the original's norm moments and paired samples) out
    of ``out``'s running lists into ``pool``'s ``slot``; the batch it replaces leaves with
    its records, its samples' bytes given back to their budget."""
    if pool is None or slot is None:
        return
    samples = out.samples
    moments = {name: calls[:] for name, calls in out.moments.items()}
    taken = {name: calls[:] for name, calls in samples.calls.items()}
    for calls in (*out.moments.values(), *samples.calls.values()):
        calls.clear()
    size = sum(r.numel() * r.element_size() for calls in taken.values() for r in calls if r is not None)
    old = pool.put(slot, i, batch, [moments, taken, size])
    if old is not None:
        samples.bytes -= old[2]
    if not samples.complete:  # over the budget: no batch keeps its samples (the original runs again beside)
        for _, _, record in pool.kept():
            record[1], record[2] = {}, 0


def _from_pool(pool: Pool, out: Calibration, data: CalibrationData) -> None:
    """``out``'s norm moments and samples, and ``data.pool``, from the batches in ``pool``, in stream order."""
    kept = pool.kept()
    out.moments = {name: [c for _, _, rec in kept for c in rec[0].get(name, [])] for name in out.moments}
    if out.samples.complete:
        names = {name for _, _, rec in kept for name in rec[1]}
        out.samples.calls = {name: [c for _, _, rec in kept for c in rec[1].get(name, [])] for name in names}
    out.samples.batches = [i for i, _, _ in kept]
    counts: dict[str, int] = dict.fromkeys(out.moments, 0)
    out.batch_calls = []
    for _, _, rec in kept:
        for name, calls in rec[0].items():
            counts[name] += len(calls)
        out.batch_calls.append(dict(counts))
    data.pool = [(i, batch) for i, batch, _ in kept]


def check_num_batches(num_batches: Any) -> None:
    """``num_batches`` is ``None`` (every batch) or an integer of at least 1: ``"2"`` raised
    ``TypeError`` comparing text and an integer, and ``-1`` read no batch ("the data is empty")."""
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise UserError(f"num_batches={num_batches!r} must be an integer, at least 1 (or None: every batch)")


def check_iterable(loader: Any, what: str = "the calibration data") -> Any:
    """``loader`` if it can be iterated (a DataLoader, a list of batches, a generator)."""
    # by type, not by calling iter(): that would read a loader once more (start a
    # DataLoader's workers, advance a one-shot generator's source)
    if not isinstance(loader, Iterable) and not hasattr(type(loader), "__getitem__"):
        raise UserError(
            f"{what} is a {type(loader).__name__}, which cannot be iterated; give a DataLoader or "
            "a list of batches (tensors, (input, label) pairs or dicts)"
        )
    refuse_mapping(loader, what)
    return loader


def refuse_mapping(data: Any, what: str) -> None:
    """A :class:`UserError` where ``data`` is a dict (or another mapping): iterating it gives
    its keys, so one tokenized batch (a ``BatchEncoding``) or a dict of splits given as the
    data was called with the key ``'input_ids'`` and refused as text to tokenize, and
    ``recover`` raised ``KeyError: 0`` from the DataLoader it built over a ``BatchEncoding``."""
    if not isinstance(data, Mapping):
        return
    keys = ", ".join(repr(k) for k in list(data)[:4]) + (", ..." if len(data) > 4 else "")
    raise UserError(
        f"{what} is a {type(data).__name__} (keys {keys or 'none'}): iterating it gives its keys, not batches. A "
        "dict of tensors is one batch: give a list of batches ([batch]) or a DataLoader; a dict of splits (a "
        "DatasetDict): give one split, e.g. data['test']"
    )


def _shapes(inputs: Any) -> str:
    from torch.utils._pytree import tree_flatten

    shapes = [tuple(t.shape) for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    return ", ".join(map(str, shapes[:4])) or f"no tensor ({type(inputs).__name__})"


@contextlib.contextmanager
def model_failure(index: int, inputs: Any, batch: Any = None, model: nn.Module | None = None) -> Iterator[None]:
    """An error of the model on a calibration batch becomes a :class:`UserError` naming the
    batch and its shapes (the loader's own errors pass through unchanged); ``batch``, as the
    loader gave it, for the hint about a pair read as ``(input, label)``."""
    try:
        yield
    except Exception as exc:
        if not model_fault(exc):  # out of memory: not the batch's shape
            raise
        raise UserError(
            f"the model failed on calibration batch {index} (input shape {_shapes(inputs)}): "
            f"{type(exc).__name__}: {str(exc)[:300]}. Give calibration batches shaped like example_inputs, with "
            "the batch as the first dimension (a DataLoader over the dataset, not the dataset itself)."
            + (dtype_advice(model, inputs, "Its inputs", exc) if model is not None else "")
            + unused_key_hint(exc, inputs)
            + _pair_hint(batch, exc, model)
        ) from exc


def _pair_hint(batch: Any, exc: BaseException | None = None, model: nn.Module | None = None) -> str:
    """A sentence when the batch was a tuple of tensors shaped alike (two images, as an
    optical-flow model takes), or any tuple of tensors where the model's ``forward`` then
    missed a positional argument (a decoder's source features and target tokens): it was
    read as ``(input, label)``, so the model got only the first. None where the batch was
    read as the ``model``'s several inputs (:func:`~cleanai_core.runtime.positional_inputs`):
    the model got them all, and the hint blamed a reading that did not happen."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or positional_inputs(plain_inputs(batch), model):
        return ""
    if not all(isinstance(t, torch.Tensor) for t in batch) or batch[0].ndim < 2:
        return ""
    missed = isinstance(exc, TypeError) and "required positional argument" in str(exc)
    if batch[1].shape != batch[0].shape and not missed:
        return ""
    return (
        f" A tuple batch is read as (input, label), so the model got only its first tensor {tuple(batch[0].shape)}: "
        "for a model of several inputs give ((x1, x2), label), ((x1, x2), None) or a dict of keyword inputs."
    )


def check_samples_seen(stats: dict) -> None:
    """Calibration that measured nothing (every batch empty) is an error, not zero scores."""
    if distributed.is_distributed() or not stats:
        return
    if all(getattr(s, "count", 1) == 0 for s in stats.values()):
        raise UserError(
            "the calibration data holds no samples (every batch is empty); give batches with at least one sample"
        )


@distributed.stage("re-calibration", then=_combine)
def recalibrate(
    model: nn.Module,
    slices: Any,
    data: CalibrationData | None,
    setup: CalibrationSetup,
) -> Calibration:
    """Statistics, BatchNorm input moments (and gradients) of ``model``, an intermediate
    step's result, on the kept calibration batches; empty without calibration data."""
    if data is None:
        return Calibration()
    out = Calibration(data=data)
    collector = StatsCollector(
        model, slices, covariance=setup.covariance, covariance_budget=setup.budget, covariance_rows=setup.rows
    )
    set_mode(model, False)
    # the step's model is what the next step slices: what its forward writes (a running
    # buffer, a counter) is put back, as for the original's calibration; before 2026-12-02
    # a model pruned in two steps kept the writes of the second step's calibration passes
    with preserved(model):
        with collector.hooks(), recording(model, out.moments), sampling(model, out.samples), torch.no_grad():
            for batch in data.replay():
                run_batch(model, data.layout(split_batch(batch, model)[0]), setup.forward_fn)
                out.end_batch()
        out.stats = collector.stats
        if setup.gradients:
            out.gradients = _gradients(model, data, setup)
    return out


def _gradients(model: nn.Module, data: CalibrationData, setup: CalibrationSetup) -> dict[str, torch.Tensor]:
    """The gradient criterion's sums over the calibration batches again (:func:`accumulate_gradients`)."""
    return accumulate_gradients(
        model, data.replay(), setup.forward_fn, setup.output_transform, setup.gradients == "squared", setup.criterion
    )


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Callable | None,
    output_transform: Callable | None,
    squared: bool = False,
    criterion: str = "taylor",
) -> dict[str, torch.Tensor]:
    """Parameter gradients of the cross-entropy (the squared error for a regression's
    targets, :func:`~cleanai_core.runtime.reads_as_regression`) summed over ``batches`` (labelled), taken
    on a copy of ``model`` in eval mode. ``squared``: instead, the squares of each
    sample's own gradient (its loss averaged over its positions), summed: the diagonal of
    the empirical Fisher, times the number of samples; one backward pass per sample.
    ``criterion``: the criterion's name, which errors about the labels give."""
    clone = set_mode(copy_model(model), False)
    device = device_of(model)
    named = list(clone.named_parameters())
    for _, p in named:
        p.requires_grad_(True)
        p.grad = None
    sums: dict[str, torch.Tensor] = {}
    seen = False
    own_loss = _takes_labels(model)  # it may shift its labels itself (a causal LM): scored on its loss, below
    for batch in batches:
        inputs, target = split_batch(batch, model)
        if target is None:
            raise UserError(
                f"{criterion} importance needs labels (it scores with the gradients of the loss), but the data yields "
                "inputs only; give (inputs, labels) batches, or a criterion that needs no labels (weight_activation)"
            )
        raw = run_batch(clone, inputs, forward_fn)
        logits = logits_of(raw, output_transform)
        out = class_logits(logits)  # one logit: a binary classifier's two classes
        if not own_loss:
            out = classes_on_dim1(out, target)  # (N, T, vocab) with (N, T) labels: the classes on the last dim
        if reads_as_regression(logits, target):  # squared error per sample, averaged over its outputs
            y = regression_targets(logits, move_to(target, device))
            rows = (logits.float() - y.float()).square().reshape(len(y), -1).mean(1)
            per = rows if squared else [rows.mean()]
        else:
            try:
                labels = check_labels(out, move_to(target, device), criterion)
            except UserError:
                per = _own_losses(clone, inputs, target, forward_fn, output_transform, squared)
                if per is None:
                    raise
            else:
                per = None
        # a cache the forward filled under gradients (LeViT's attention biases) is read by
        # the next batches too: its graph must outlive this batch's backward
        cached = holds_history(clone)
        if not squared and per is not None:
            per[0].backward(retain_graph=cached)
        elif not squared:
            nn.functional.cross_entropy(out, labels).backward(retain_graph=cached)
        else:
            if per is None:
                per = nn.functional.cross_entropy(out, labels, reduction="none")
                if per.dim() > 0:  # each sample's mean over its labelled positions (-100: none), as in its batch
                    counted = (labels != -100).reshape(per.shape[0], -1).sum(1).clamp(min=1)
                    per = per.reshape(per.shape[0], -1).sum(1) / counted
                else:
                    per = per.reshape(1)
            # each sample's gradients by a plain backward into .grad, not torch.autograd.grad: a
            # forward through torch.utils.checkpoint(..., use_reentrant=True) (Hugging Face's
            # gradient checkpointing) refuses .grad() ("incompatible with .grad()")
            for i, loss in enumerate(per):
                for _, p in named:
                    p.grad = None
                loss.backward(retain_graph=cached or i < len(per) - 1)
                for name, p in named:
                    if p.grad is not None:
                        g = p.grad.detach()
                        sums[name] = sums[name] + g**2 if name in sums else g**2
            for _, p in named:
                p.grad = None
        raw = logits = out = per = None  # this batch's graph goes before the next forward (kept by `cached`)
        seen = True
    if not seen and not distributed.is_distributed():
        raise UserError(f"the calibration data is empty{spent(batches)}")
    if squared:
        return sums
    return {n: p.grad.detach().clone() for n, p in named if p.grad is not None}


def _takes_labels(model: nn.Module) -> bool:
    import inspect

    try:
        return "labels" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def held_gradients(model: nn.Module, importance: Any, graph: Any = None) -> dict[str, torch.Tensor] | None:
    """The gradients the user's own backward left on ``model``'s parameters (the peer's
    ``loss.backward()`` before ``pruner.step()``: any loss, a detector's or a dummy
    ``out.sum()``), for a criterion that scores with gradients summed over the data
    (Taylor); ``None`` where the criterion needs none or no parameter holds one. A criterion
    that needs each sample's own gradient (Hessian) cannot use a batch's sum: it is refused
    with the way to give them. ``graph``: the model's :class:`DependencyGraph`; a parameter
    without a gradient is refused only where a prunable group reads it (a frozen backbone
    or embedding under ignored layers, or outside every group, scores no unit)."""
    if not getattr(importance, "needs_gradients", False):
        return None
    named = list(model.named_parameters())
    held = {n: p.grad.detach() for n, p in named if p.grad is not None}
    scored = None if graph is None or not held else _scored_parameters(model, graph)
    missing = [n for n, p in named if p.grad is None and p.is_floating_point() and (scored is None or id(p) in scored)]
    if held and missing:  # scored as zero, their units would go first
        raise UserError(
            f"{importance_name(importance)} importance scores with the gradients on the model's parameters, but "
            f"{len(missing)} of them have none ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}: "
            "requires_grad=False, or your loss does not reach them), and their units would score 0. Give labelled "
            "batches to collect_activations (the gradients are then taken for every parameter), or set "
            "requires_grad=True on them before your backward"
        )
    if held and getattr(importance, "needs_squared_gradients", False):
        raise UserError(
            f"{importance_name(importance)} importance needs each sample's own gradient, but the gradients on the "
            "model's parameters (your own loss's backward) are summed over the batch; give labelled batches to "
            "collect_activations (one backward per sample is taken there), or use importance='taylor', which scores "
            "with the gradients you computed"
        )
    return held or None


def _scored_parameters(model: nn.Module, graph: Any) -> set[int]:
    """The ids of the parameters the prunable groups of ``graph`` read: those of each
    slice's module, and the bare parameters its slices name (by id: a tied parameter has
    one name in ``named_parameters()``, maybe not the one its group reads it under)."""
    out: set[int] = set()
    for module, name in {(s.module, s.name) for g in graph.groups(prunable_only=True) for s in g.slices}:
        try:
            if module == "":
                out.add(id(model.get_parameter(name)))
            else:
                out.update(id(p) for p in model.get_submodule(module).parameters())
        except AttributeError:
            continue
    return out


def _own_losses(
    model: nn.Module,
    inputs: Any,
    target: Any,
    forward_fn: Callable | None,
    output_transform: Callable | None,
    per_sample: bool,
) -> list[torch.Tensor] | None:
    """The loss a model computes itself from ``labels`` (``out.loss``), where cross-entropy
    over its output's dim 1 does not fit the labels: a Hugging Face causal LM (it shifts
    its labels by one token), masked LM, token classifier or encoder-decoder. One loss for
    the batch, or with ``per_sample`` one per row (each row run alone). ``None`` where the
    model takes no ``labels`` or returns no loss; the criterion then refuses the labels."""
    if forward_fn is not None or output_transform is not None or not isinstance(inputs, dict):
        return None
    if "labels" in inputs or not isinstance(target, torch.Tensor) or not _takes_labels(model):
        return None
    with_labels = {**inputs, "labels": target}
    loss = getattr(run_batch(model, with_labels), "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
        return None
    if not per_sample:
        return [loss]
    n = len(target)
    row = lambda i: {k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() and len(v) == n else v  # noqa: E731
                     for k, v in with_labels.items()}  # fmt: skip
    return [run_batch(model, row(i)).loss for i in range(n)]


@distributed.stage("BatchNorm correction")
def correct_batchnorm_after(
    source: nn.Module,
    pruned: nn.Module,
    moments: Moments,
    keep: dict[str, torch.Tensor],
    data: CalibrationData,
    forward_fn: Callable | None = None,
    samples: Samples | None = None,
    batch_calls: list[dict[str, int]] | None = None,
    samples_cap: int | None = None,
) -> None:
    """Move ``pruned``'s BatchNorm statistics by what pruning changed at their inputs
    (:mod:`cleanai_core.bn_correction`): on the kept calibration batches, else on the
    loader read again beside ``source``; skipped with a warning where neither can be.
    ``keep``: the kept channels of each sliced module; ``samples``: the original's norm
    inputs at the paired positions, from calibration (else it runs again beside).
    ``samples_cap``: the correction reads batches spread evenly over the calibration data
    that hold at least this many samples (:func:`~cleanai_core.replay.spread`), not all of
    them; ``batch_calls`` (:attr:`Calibration.batch_calls`) says which of ``moments``'
    calls each batch made. Under ``torch.distributed`` the cap counts the samples of every
    rank (:func:`~cleanai_core.distributed.spread_over_ranks`)."""
    norms = norms_with_running_stats(pruned)
    keep = {name: k for name, k in keep.items() if name in norms}
    chosen = distributed.spread_over_ranks(data.sizes, samples_cap)
    if chosen is not None and data.cached and (batch_calls is None or len(batch_calls) != len(data.sizes)):
        chosen = None  # which calls each batch made is not known: every batch

    def run(model: nn.Module, batch: Any) -> None:  # in the layout the original's moments were measured in
        run_batch(model, data.layout(split_batch(batch, model)[0]), forward_fn)

    def batches() -> Iterator[Any]:
        if chosen is None:
            return data.replay()
        wanted = set(chosen)
        return (b for i, b in enumerate(data.replay()) if i in wanted)

    pooled = data.pool is not None and samples is not None and samples.batches == [i for i, _ in data.pool]
    if pooled:  # the batches kept while calibrating, the only ones whose norm inputs it recorded
        calls = {k: list(v) for k, v in moments.items()}
        batches_kept = lambda: (batch for _, batch in data.pool)  # noqa: E731
        correct_batchnorm(pruned, calls, keep, batches_kept, run, original=source, original_samples=samples)
        return
    planned = samples.batches if samples is not None else None  # the only batches calibration recorded
    if data.cached and (planned is None or planned == chosen):
        calls = {k: list(v) for k, v in moments.items()}
        if chosen is not None:
            calls = {k: _calls_of(v, k, batch_calls, chosen) for k, v in calls.items()}
            if planned is None and samples is not None and samples.complete:
                taken = Samples(budget=samples.budget)
                taken.calls = {k: _calls_of(v, k, batch_calls, chosen) for k, v in samples.calls.items()}
                samples = taken
        correct_batchnorm(pruned, calls, keep, batches, run, original=source, original_samples=samples)
        return
    if data.one_shot and not data.cached:
        warnings.warn(
            "BatchNorm statistics were not corrected: the calibration data was an iterator too large to keep, "
            "so it cannot be read again; give a re-iterable loader (a list or a DataLoader)",
            RuntimeWarning,
            stacklevel=4,
        )
        return
    # the original's moments are measured afresh beside the pruned model: the batches are not
    # kept, or calibration recorded others than the ones read now (planned from the first
    # batch's size, the batches turned out otherwise)
    fresh: Moments = {}

    def run_original(batch: Any) -> None:  # the loader may shuffle: measure both on each batch
        with preserved(source), recording(source, fresh), torch.no_grad():
            run(source, batch)

    correct_batchnorm(pruned, fresh, keep, batches, run, run_original, original=source)


def _calls_of(calls: list, name: str, batch_calls: list[dict[str, int]], chosen: list[int]) -> list:
    """The entries of one norm's ``calls`` (one per call, every batch's in order) that the
    ``chosen`` batches made; ``batch_calls[i]``: the calls of each norm after batch ``i``."""
    out = []
    for i in chosen:
        start = batch_calls[i - 1].get(name, 0) if i > 0 else 0
        out.extend(calls[start : batch_calls[i].get(name, 0)])
    return out
