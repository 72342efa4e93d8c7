"""Sensitivity analysis and automatic per-layer ratios.

Glossary:

- **trial**: the model with one group pruned at one ratio and every other group whole,
  built as :meth:`StructuredPruner.prune` builds it (same scores, the same compensation
  and reconstruction, and its BatchNorm statistics corrected, here on a few calibration
  batches: :mod:`cleanai_core.trial_norms`), then run on the evaluation batches.
- **fidelity loss**: the mean KL divergence ``KL(p_original || p_trial)`` of the model's
  output distribution per sample (softmax over the last dimension), 0 when the trial
  changes nothing; with labels, also the trial's accuracy.
- **curve**: one group's fidelity loss, FLOPs and parameters saved at each ratio of a grid.
- **allocation**: one ratio per group meeting a target at the least summed fidelity
  loss, from the curves (:mod:`cleanai_core.allocation`).

The trials reuse the statistics the pruner already streamed: the only new work is one
sliced copy per (group, ratio) and a forward pass over the evaluation batches from the
first module the pruning changed (:mod:`cleanai_core.prefix_cache`; what runs before it
is the original's, cached), which also stands in for the pruner's verification pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from cleanai_core.allocation import Allocation, _plan, allocate_ratios  # the allocation, importable from here
from cleanai_core.calibration import iterate, move_to, split_batch
from cleanai_core.distributed import collectively
from cleanai_core.errors import PruningError, UserError, model_fault, pruned_run_failed
from cleanai_core.metrics import FlopsOfCopies, call_model, count_params, eval_mode
from cleanai_core.options import check_switches, plain_number
from cleanai_core.prefix_cache import PrefixCache
from cleanai_core.recovery import _check_logits
from cleanai_core.runtime import channels_last_layout, class_logits, without_autocast
from cleanai_core.trial_norms import TrialNorms

__all__ = ["Allocation", "GroupCurve", "SensitivityResult", "allocate_ratios", "analyse_sensitivity"]

DEFAULT_RATIOS = (0.25, 0.5, 0.75)


@attrs.define
class GroupCurve:
    """One group's response to pruning, ratio by ratio (ratio 0 is the unpruned model)."""

    group: int
    layer: str | None  # the module whose entry in ``layer_pruning_ratios`` sets this group's ratio
    modules: list[str]
    size: int
    ratios: list[float]
    kl: list[float]
    accuracy: list[float | None]
    flops_saved: list[int]
    params_saved: list[int]

    def at(self, ratio: float, values: Sequence[float]) -> float:
        """``values`` interpolated linearly at ``ratio`` (beyond the last ratio: infinite)."""
        if ratio > self.ratios[-1] + 1e-9:
            return math.inf
        for i in range(len(self.ratios) - 1):
            r0, r1 = self.ratios[i], self.ratios[i + 1]
            if r0 - 1e-9 <= ratio <= r1 + 1e-9:
                t = 0.0 if r1 == r0 else (ratio - r0) / (r1 - r0)
                return values[i] + t * (values[i + 1] - values[i])
        return values[0]

    @property
    def mean_kl(self) -> float:
        """The area under the curve per ratio measured: one number for ranking."""
        return sum(self.kl) / max(len(self.kl) - 1, 1)


@attrs.define
class SensitivityResult:
    """Curves for every prunable group, plus the reference numbers they are relative to."""

    curves: list[GroupCurve]
    ratios: list[float]
    base_flops: int
    base_params: int
    base_accuracy: float | None
    samples: int
    seconds: float
    evaluator: _Evaluator | None = attrs.field(default=None, repr=False)
    norms: TrialNorms | None = attrs.field(default=None, repr=False)  # corrects a trial's BatchNorm statistics

    def ranked(self) -> list[GroupCurve]:
        """Most sensitive first (largest mean fidelity loss over the ratios)."""
        return sorted(self.curves, key=lambda c: -c.mean_kl)

    def to_json(self) -> dict[str, Any]:
        return {
            "ratios": self.ratios,
            "base_flops": self.base_flops,
            "base_params": self.base_params,
            "base_accuracy": self.base_accuracy,
            "samples": self.samples,
            "seconds": round(self.seconds, 2),
            "groups": [attrs.asdict(c) for c in self.ranked()],
        }


def _logits(out: Any, transform: Any) -> torch.Tensor:
    """The tensor whose last dimension is the output distribution's logits."""
    if transform is not None:
        out = transform(out)
    out = getattr(out, "logits", out)
    if isinstance(out, dict):
        out = next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        out = next(v for v in out if isinstance(v, torch.Tensor))
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise UserError(
            "sensitivity analysis compares floating-point outputs; give an output_transform that picks the logits"
        )
    return out.detach().float()


def _fidelity(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p_ref || p_out) over the last dimension, summed over other positions;
    for a single output per sample (regression), the squared error instead."""
    if ref.shape[-1] == 1 or ref.dim() == 1:
        return ((out - ref) ** 2).reshape(ref.shape[0], -1).sum(1)
    lp, lq = F.log_softmax(ref, -1), F.log_softmax(out, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)  # rounding made equal outputs' KL -2e-08
    if not bool(torch.isfinite(out).all()):
        kl = torch.full_like(kl, math.inf)
    return kl.reshape(ref.shape[0], -1).sum(1)


def _correct(out: torch.Tensor, target: Any) -> int | None:
    """How many rows of class scores ``out`` pick their integer class label in ``target``
    (a one-logit binary classifier by the logit's sign); None where ``target`` holds no
    class labels (none, floating values, per-position labels). Labels that cannot be this
    output's classes are a :class:`UserError`: labels of another batch size were taken as
    "no labels" and the accuracy dropped without a word, labels beyond the classes (or 1 for
    a one-logit model, always "wrong" under ``argmax``) gave 0 % for every trial."""
    if not isinstance(target, torch.Tensor) or out.dim() != 2 or target.is_floating_point():
        return None
    labels = target[:, 0] if target.dim() == 2 and target.shape[1] == 1 else target  # a column of indices
    if labels.dim() != 1:
        return None
    if labels.shape[0] != out.shape[0]:
        raise UserError(
            f"the sensitivity data's labels have shape {tuple(target.shape)} but the model's outputs "
            f"{tuple(out.shape)}: give one class index per sample ((inputs, labels) pairs of the same batch), "
            "or batches without labels (the curves then measure the output change alone)"
        )
    scores = class_logits(out)
    _check_logits(scores, None, labels, binary=out.shape[1] == 1)  # labels beyond the model's classes
    return int((scores.argmax(1) == labels.to(out.device)).sum())


def _layer_keys(groups: list) -> dict[int, str | None]:
    """For each group, a leaf module producing its channels that no other group produces:
    its name in ``layer_pruning_ratios`` sets that group's ratio and nothing else."""
    owners: dict[str, set[int]] = {}
    for g in groups:
        for s in g.slices:
            if s.kind != "in" and s.module:
                owners.setdefault(s.module, set()).add(g.id)
    keys: dict[int, str | None] = {}
    for g in groups:
        names = [s.module for s in g.slices if s.kind != "in" and s.module]
        unique = [n for n in names if owners[n] == {g.id} and not any(o.startswith(n + ".") for o in owners)]
        keys[g.id] = unique[0] if unique else None
    return keys


@attrs.define(eq=False)
class _Evaluator:
    """The evaluation batches, the original model's outputs on them, and how to compare.
    With a :class:`PrefixCache`, a trial runs only from its first changed module on."""

    batches: list[tuple[Any, Any]]
    forward_fn: Any
    output_transform: Any
    ref: list[torch.Tensor] = attrs.field(factory=list)
    cache: PrefixCache | None = None
    #: the original's accuracy on the batches, its cost (FLOPs of copies, parameters)
    base_acc: float | None = None
    flops: Any = None
    base_flops: float = 0.0
    base_params: int = 0

    def outputs(self, m: nn.Module) -> list[torch.Tensor]:
        with eval_mode(m), torch.no_grad():
            return [_logits(call_model(m, x, self.forward_fn), self.output_transform) for x, _ in self.batches]

    def reference(self, m: nn.Module) -> list[torch.Tensor]:
        """The original's outputs (``m``), recording its spans when there is a cache."""
        if self.cache is None:
            return self.outputs(m)
        return [_logits(o, self.output_transform) for o in self.cache.reference()]

    def trial_outputs(self, m: nn.Module) -> list[torch.Tensor]:
        """The outputs of a trial built without verification: raises :class:`PruningError`
        where verification would (it fails to run, other output shapes, NaN or inf where
        the original's outputs are finite)."""
        try:
            names = self.cache.prefix(m) if self.cache is not None else None
            if names is None:
                outs = self.outputs(m)
            else:
                names = self.cache.fill(names)
                with eval_mode(m), torch.no_grad():
                    outs = [
                        _logits(self.cache.run(m, names, i), self.output_transform) for i in range(len(self.batches))
                    ]
        except Exception as exc:
            pruned_run_failed(exc)
        for a, b in zip(self.ref, outs, strict=True):
            if a.shape != b.shape:
                raise PruningError(f"the pruned model's output shape {tuple(b.shape)} differs from {tuple(a.shape)}")
            if bool(torch.isfinite(a).all()) and not bool(torch.isfinite(b).all()):
                raise PruningError("the pruned model's output holds NaN or inf where the original model's is finite")
        return outs

    @property
    def samples(self) -> int:
        return sum(o.shape[0] for o in self.ref)

    def accuracy(self, outs: list[torch.Tensor]) -> float | None:
        hits = [_correct(o, y) for o, (_, y) in zip(outs, self.batches, strict=True)]
        if any(h is None for h in hits):
            return None
        return 100.0 * sum(hits) / self.samples

    def fidelity(self, m: nn.Module, outs: list[torch.Tensor] | None = None) -> tuple[float, float | None]:
        """(mean KL to the original output, accuracy or None) of model ``m`` (or of its ``outs``)."""
        outs = self.outputs(m) if outs is None else outs
        return float(self.per_sample(outs).mean()), self.accuracy(outs)

    def per_sample(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """Each evaluation sample's KL to the original output (float64, in batch order)."""
        return torch.cat([_fidelity(a, b).double().cpu() for a, b in zip(self.ref, outs, strict=True)])


def _check_the_original_runs(exc: PruningError, ev: _Evaluator, model: nn.Module) -> None:
    """A trial that raised: where the unpruned model now fails on the same batches too, it is
    the model's own fault (a forward that fails on some calls), a :class:`UserError`. Each
    failing trial ended its group's curve at ratio 0, so such a model was reported
    insensitive everywhere (KL 0) and ``--auto`` pruned it most, with exit 0."""
    if not model_fault(exc.__cause__ or exc):
        return
    try:
        ev.outputs(model)
    except Exception as again:
        if not model_fault(again):
            raise
        raise UserError(
            f"the model failed on its own during the sensitivity trials ({type(again).__name__}: {str(again)[:300]}), "
            "on batches it had run before: its forward fails on some calls only. Make it deterministic (or fix what "
            "fails); nothing was written."
        ) from again


def check_pruner(pruner: Any, who: str) -> None:
    """A :class:`UserError` unless ``pruner`` is a pruner whose groups can be tried: a
    :class:`~cleanai_core.pruner.StructuredPruner` (or what has its ``model``, ``graph`` and
    ``score``) that has not pruned its model in place."""
    from cleanai_core.errors import shown

    if not all(hasattr(pruner, a) for a in ("model", "graph", "score")):
        raise UserError(
            f"{who} needs the StructuredPruner whose groups it tries (after collect_activations), got {shown(pruner)}"
        )
    if hasattr(pruner, "_check_not_pruned_in_place"):
        pruner._check_not_pruned_in_place(who)


def _check_arguments(
    pruner: Any, data: Any, num_batches: Any, ratios: Any, bn_passes: Any, bn_samples: Any, progress: Any, fast: Any
) -> None:
    """:func:`analyse_sensitivity`'s arguments, each named where it is out of form: a pruner
    that is no pruner raised ``AttributeError: ... has no attribute 'model'``, ``ratios="0.5"``
    ``could not convert string to float: '.'``, ``num_batches="2"`` and ``data=None``
    ``TypeError``; ``num_batches=-1`` read no batch ("the data is empty"); ``bn_samples=-1`` and
    ``bn_passes=1.5`` were taken."""
    from cleanai_core.collect import check_iterable, check_num_batches
    from cleanai_core.errors import shown

    check_pruner(pruner, "analyse_sensitivity")
    check_iterable(data, "the sensitivity data")
    check_num_batches(num_batches)
    check_switches(progress=progress, fast=fast)  # fast="no" ran the fast path
    values = [plain_number(r) for r in ratios] if isinstance(ratios, Iterable) and not isinstance(ratios, str) else None
    if not values or any(isinstance(r, bool) or not isinstance(r, (int, float)) for r in values):
        raise UserError(
            f"ratios={shown(ratios)}: give a list of ratios strictly between 0 and 1, e.g. [0.25, 0.5, 0.75]"
        )
    for name, value in (("bn_passes", bn_passes), ("bn_samples", bn_samples)):
        value = plain_number(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{name}={shown(value)} must be an integer >= 0")


@without_autocast()  # the trials in the model's own dtype, as the prune runs them
def analyse_sensitivity(
    pruner: Any,
    data: Iterable[Any],
    num_batches: int | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    progress: bool = True,
    fast: bool = True,
    bn_passes: int = 1,
    bn_samples: int = 16,
) -> SensitivityResult:
    """Measure, for every prunable group of ``pruner``, how the model's output moves when
    that group alone is pruned at each of ``ratios``.

    Call after :meth:`StructuredPruner.collect_activations` (criteria that read
    activations need it). ``data`` yields inputs or ``(inputs, labels)``: the evaluation
    batches (at most ``num_batches``), kept in memory for the trials (and for
    :func:`allocate_ratios`), so a few batches are the right size. Nothing of the
    user's model changes.

    ``fast`` (the default) runs each trial only from the first module the pruning changed
    (:mod:`cleanai_core.prefix_cache`), and lets that run stand in for the pruner's
    verification pass; ``fast=False`` builds every trial with :meth:`StructuredPruner.build`
    (verified) and runs the whole model. Both give the same curves, to float rounding.

    Where the prune corrects BatchNorm statistics (``recalibrate_bn``), each trial's are
    corrected too, with ``bn_passes`` passes (0: not corrected) over the first
    ``bn_samples`` samples of the calibration data (never the evaluation batches); the
    allocation corrects its candidates the same way. Uncorrected trials measure another
    model than the prune builds: on a plain conv-BN chain they overstated the loss of the
    early groups tenfold and the allocation from them lost to uniform ratios (#18).
    """
    _check_arguments(pruner, data, num_batches, ratios, bn_passes, bn_samples, progress, fast)
    ratios = sorted({float(plain_number(r)) for r in ratios})
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise UserError(f"ratios={list(ratios)}: give ratios strictly between 0 and 1, e.g. 0.25,0.5,0.75")
    t0 = time.perf_counter()
    # three stages, each run collectively under torch.distributed (every rank runs the same
    # trials on the same batches): an error on one rank stops every rank with its name
    # instead of leaving the others in the next collective (the norms' sample count)
    what = "the sensitivity analysis"
    setup = collectively(lambda: _setup(pruner, data, num_batches, fast), what)
    ev, cache, layout = setup
    norms = collectively(
        lambda: TrialNorms.of(pruner, min(bn_samples, ev.samples), bn_passes, fast, layout) if bn_passes > 0 else None,
        what,
    )
    curves = _trials(pruner, ev, cache, norms, ratios, progress, fast)  # each trial's steps agreed by the ranks
    ev.cache = None  # the cached outputs are large; the allocation runs whole models
    if norms is not None:
        norms.cache = None
    groups = pruner.graph.groups(prunable_only=True)
    if groups and not any(saved for g in groups for saved in curves[g.id].params_saved):
        # every curve read "KL 0" (the model unchanged), which ranked every group as insensitive
        sizes = sorted(g.size for g in groups)
        raise UserError(
            f"ratios={ratios}: no ratio removes a unit from any group (groups of {sizes[0]}..{sizes[-1]} units, "
            f"round_to={pruner.round_to}, min_channels={pruner.min_channels}), so every trial is the unchanged "
            "model and measures nothing; give larger ratios, e.g. 0.25,0.5,0.75 (--sensitivity-ratios)"
        )
    return SensitivityResult(
        [curves[g.id] for g in groups],
        ratios,
        ev.base_flops,
        ev.base_params,
        ev.base_acc,
        ev.samples,
        time.perf_counter() - t0,
        evaluator=ev,
        norms=norms,
    )


def _setup(pruner: Any, data: Iterable[Any], num_batches: int | None, fast: bool) -> tuple[Any, Any, Any]:
    """The evaluation batches, their reference outputs and the original's cost:
    ``(evaluator, prefix cache or None, the trials' input layout)``."""
    model = pruner.model
    device = next((p.device for p in model.parameters()), None)
    batches = [(move_to(x, device), y) for x, y in (split_batch(b, model) for b in iterate(data, num_batches))]
    if not batches:
        raise UserError("the sensitivity data is empty: give at least one batch")
    layout = channels_last_layout(model, batches[0][0], pruner.forward_fn)  # the trials' forward passes, faster
    batches = [(layout(x), y) for x, y in batches]
    cache = PrefixCache(model, [x for x, _ in batches], pruner.forward_fn) if fast else None
    ev = _Evaluator(batches, pruner.forward_fn, pruner.output_transform, cache=cache)
    try:
        ev.ref = ev.reference(model)
    except Exception as exc:  # the model's own error on these batches was a traceback
        if not model_fault(exc):
            raise
        raise UserError(
            f"the model failed on the sensitivity data ({type(exc).__name__}: {str(exc)[:300]}); give batches shaped "
            "like example_inputs that the model runs on (command line: check that every sample of --data fits the "
            "model)"
        ) from exc
    ev.base_acc = ev.accuracy(ev.ref)
    ev.flops = FlopsOfCopies(model, pruner.example_inputs, pruner.forward_fn)
    ev.base_flops = ev.flops.total
    ev.base_params = count_params(model)
    return ev, cache, layout


def _trials(
    pruner: Any, ev: Any, cache: PrefixCache | None, norms: TrialNorms | None, ratios: list[float], progress: bool,
    fast: bool,
) -> dict[int, GroupCurve]:  # fmt: skip
    """Each group's curve: the group alone pruned at each of ``ratios``."""
    from tqdm.auto import tqdm

    model, flops, base_acc = pruner.model, ev.flops, ev.base_acc
    base_flops, base_params = ev.base_flops, ev.base_params
    groups = pruner.graph.groups(prunable_only=True)
    keys = _layer_keys(groups)
    scores = collectively(pruner.score, "the sensitivity analysis")
    curves = {}

    def agreed(fn: Any, what: str = "a sensitivity trial") -> Any:
        # under torch.distributed a trial's BatchNorm correction sums over the ranks: a step that
        # fails (or cannot prune the group that far) on one rank ends the trial on every rank
        return collectively(fn, what, (PruningError,))

    trials = tqdm(total=len(groups) * len(ratios), disable=not progress, desc="sensitivity", unit="trial", leave=False)
    for g in _in_running_order(groups, cache):
        curve = GroupCurve(g.id, keys[g.id], g.modules(), g.size, [0.0], [0.0], [base_acc], [0], [0])
        for r in ratios:
            plan = _plan(pruner, scores, {g.id: r}, 0.0)
            trials.update(1)
            if plan.n_pruned == 0 and len(curve.ratios) > 1:  # the group is too small to lose more
                break
            try:
                trial, edits = agreed(
                    lambda: pruner.build(plan.pruned_units(), verify=False if fast else None, share=True)  # noqa: B023
                )
                if norms is not None:
                    norms(trial, edits)
                kl, acc = agreed(lambda: ev.fidelity(trial, ev.trial_outputs(trial) if fast else None))  # noqa: B023
            except PruningError as exc:
                _check_the_original_runs(exc, ev, model)
                break  # this group cannot be pruned this far: the curve ends here
            curve.ratios.append(r)
            curve.kl.append(kl)
            curve.accuracy.append(acc)
            curve.flops_saved.append(base_flops - flops(trial))
            curve.params_saved.append(base_params - count_params(trial))
        curves[g.id] = curve
    trials.close()
    return curves


def _in_running_order(groups: list, cache: PrefixCache | None) -> list:
    """``groups`` by when their first module runs: consecutive trials then share most of
    their prefix, and the cache grows by a short run of the original at a time."""
    if cache is None or cache.spans is None:
        return groups
    spans = cache.spans
    end = max((s.end for s in spans.values()), default=0) + 1
    return sorted(groups, key=lambda g: min((spans[n].start for n in g.modules() if n in spans), default=end))
