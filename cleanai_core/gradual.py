"""Gradual pruning inside the user's own training loop.

Glossary:

- *schedule*: the share removed after each of ``steps`` pruning steps, rising from
  ``start`` to ``final`` along a ``"cubic"`` curve (Zhu & Gupta 2017: fast at first,
  slow near the end, when the network has less slack) or a ``"linear"`` one. The share
  is of FLOPs (``by="flops"``, the default) or of each group's channels (``by="ratio"``).
- *increment*: what one :meth:`GradualPruner.step` removes from the current model so that
  the total removed matches the schedule.
- *kept indices*: for each parameter, per dimension, which old indices survive a step;
  read off by replaying the step's slice edits on a copy whose entries hold their own
  flat positions, so no layer type needs to be known here.
- *refreshed statistics*: before each step the BatchNorm running statistics are measured
  afresh on the step's data (:mod:`cleanai_core.bn_refresh`): those train mode leaves
  behind lag the weights after a step, and scoring, compensation and BN correction run in
  eval mode. Without it, a small ResNet fell to 69% right after its second step (91%
  before it, with the stale statistics) instead of 90% (98% before it).
- *carried state*: the optimizer's per-parameter state (SGD momentum, Adam ``exp_avg`` /
  ``exp_avg_sq``, ...) and each parameter's ``.grad``, sliced with the parameter so that
  training goes on without a restart.

Example::

    schedule = PruningSchedule(final=0.75, steps=4)           # 4x fewer FLOPs in 4 steps
    gp = GradualPruner(model, x[:2], optimizer, schedule, ignored_layers=[model.fc])
    for epoch in range(epochs):
        train_one_epoch(model, optimizer)
        if not gp.done:
            model, optimizer = gp.step(calibration_loader)     # same objects, smaller tensors
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import attrs
import torch
from torch import nn

from cleanai_core import options
from cleanai_core.bn_correction import norms_with_running_stats
from cleanai_core.bn_refresh import reestimate_batchnorm
from cleanai_core.calibration import iterate, split_batch
from cleanai_core.collect import check_iterable, model_failure
from cleanai_core.errors import UserError, model_fault, shown
from cleanai_core.interfaces import slice_tensor
from cleanai_core.metrics import count_flops
from cleanai_core.model_state import copy_model
from cleanai_core.option_names import check_option_names, keywords
from cleanai_core.runtime import run_batch, without_autocast
from cleanai_core.slicing import SliceEdit, apply_edits

__all__ = ["GradualPruner", "PruningSchedule", "kept_indices", "position_tagged_copy", "slice_optimizer"]

KINDS = ("cubic", "linear")


def _check_schedule(instance: PruningSchedule, _attr: Any, _value: Any) -> None:
    for name in ("final", "start"):
        v = getattr(instance, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):  # "0.5" raised TypeError comparing float and str
            raise UserError(f"schedule {name}={v!r} must be a number (the share removed, e.g. final=0.75)")
    if instance.kind not in KINDS:
        raise UserError(f"schedule kind={instance.kind!r}: choose 'cubic' or 'linear'")
    if isinstance(instance.steps, bool) or not isinstance(instance.steps, int) or instance.steps < 1:
        raise UserError(f"schedule steps={instance.steps!r} must be a positive integer")
    if not 0.0 <= instance.start < instance.final < 1.0:
        raise UserError(
            f"schedule start={instance.start}, final={instance.final}: need 0 <= start < final < 1 "
            "(the share removed, e.g. final=0.75 for 4x fewer FLOPs)"
        )


@attrs.frozen
class PruningSchedule:
    """Share removed after step ``k`` (1..``steps``), from ``start`` (before step 1) to
    ``final`` (after the last step)."""

    final: float = attrs.field(validator=_check_schedule, converter=options.plain_number)
    steps: int = attrs.field(default=4, converter=options.plain_number)
    start: float = attrs.field(default=0.0, converter=options.plain_number)
    kind: str = "cubic"

    def removed_after(self, step: int) -> float:
        """The cumulative share removed after ``step`` (0 = none yet: ``start``)."""
        step = options.plain_number(step)
        if isinstance(step, bool) or not isinstance(step, int):  # "a": TypeError from min(); NaN: a share of NaN
            raise UserError(f"removed_after: step={step!r} must be a whole number of steps (0 .. {self.steps})")
        t = min(max(step, 0), self.steps) / self.steps
        if self.kind == "linear":
            return self.start + (self.final - self.start) * t
        return self.final + (self.start - self.final) * (1.0 - t) ** 3


# -- kept indices and optimizer state ---------------------------------------------------------


def position_tagged_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` whose parameters hold their own flat positions."""
    tagged = copy_model(model).double()
    with torch.no_grad():
        for p in tagged.parameters():
            p.copy_(torch.arange(p.numel(), dtype=torch.float64).reshape(p.shape))
    return tagged


def kept_indices(tagged: nn.Module, edits: list[SliceEdit], pm: Any = None) -> dict[str, list[torch.Tensor | None]]:
    """For each parameter of a :func:`position_tagged_copy` (by name), the old indices
    that ``edits`` keep along each dimension (``None``: the dimension is untouched).
    The edits are applied to ``tagged`` (it is consumed).

    A layer pruner may rescale what it keeps (``nn.MultiheadAttention``'s query rows by
    ``sqrt(new / old)`` where the head width shrinks, so that the attention scale holds):
    the edits also run on a copy of ones, and each position is the tag divided by what its
    one became. Before 2026-12-02 such a rescale stopped a gradual step on ``nn.Transformer``
    ("slicing ... changed its values, not only its shape")."""
    shapes = {name: tuple(p.shape) for name, p in tagged.named_parameters()}
    ones = copy_model(tagged)
    with torch.no_grad():
        for p in ones.parameters():
            p.fill_(1.0)
    apply_edits(tagged, edits, pm)
    apply_edits(ones, edits, pm)
    scales = dict(ones.named_parameters())
    out: dict[str, list[torch.Tensor | None]] = {}
    for name, tag in tagged.named_parameters():
        old = shapes.get(name)
        if old is None:
            continue  # a parameter the edits created (e.g. a compensation bias)
        if tuple(tag.shape) == old:
            out[name] = [None] * len(old)
            continue
        scale = scales[name].detach() if name in scales and scales[name].shape == tag.shape else 1.0
        flat = tag.detach().to(torch.float64) / scale
        near = flat.round()
        outside = flat.numel() and (near.min() < 0 or near.max() >= math.prod(old))
        if not bool(((flat - near).abs() <= 1e-6).all()) or outside:
            raise RuntimeError(f"slicing {name} changed its values, not only its shape; cannot map optimizer state")
        flat = near
        coords = torch.unravel_index(flat.long(), old)
        dims: list[torch.Tensor | None] = []
        for d, c in enumerate(coords):
            rows = c.movedim(d, 0).reshape(c.shape[d], -1)
            idx = rows[:, 0] if rows.shape[1] else torch.arange(c.shape[d])
            if not bool((rows == idx[:, None]).all()):
                raise RuntimeError(f"slicing {name} is not a selection of whole slices along dim {d}")
            dims.append(None if c.shape[d] == old[d] and bool((idx == torch.arange(old[d])).all()) else idx)
        out[name] = dims
    return out


def _slice_like(t: Any, old_shape: torch.Size, dims: list[torch.Tensor | None], where: str) -> Any:
    """``t`` (a parameter's gradient or optimizer state) sliced as the parameter is. A
    factored state (Adafactor's row and column second moments: the parameter's shape with
    size 1 where it was averaged over) is sliced along its other dimensions and keeps its
    averages, which then also count the removed units: an estimate the next steps' decay
    replaces, as it replaces any other old value."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t  # step counters and other scalars
    _check_sliceable(t, old_shape, where)
    for d, idx in enumerate(dims):
        if idx is not None and t.shape[d] == old_shape[d]:  # in the layout it had, as the parameter is sliced
            t = slice_tensor(t, d, idx)
    return t


def _check_sliceable(t: Any, shape: torch.Size, where: str) -> None:
    """Raise :class:`UserError` where tensor ``t`` of a parameter of ``shape`` is not shaped
    like it (or factored from it, see :func:`_slice_like`)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return
    if t.dim() != len(shape) or not all(s in (o, 1) for s, o in zip(t.shape, shape, strict=True)):
        raise UserError(
            f"{where} has shape {tuple(t.shape)}, not its parameter's {tuple(shape)}: this optimizer keeps "
            "state that cannot be sliced with the parameter (one vector over all of them, as L-BFGS's); use SGD, "
            "Adam(W), Adafactor or a similar per-element optimizer. The model was not pruned"
        )


def check_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> None:
    """Before a step changes anything: every state tensor of ``params`` (by name) in
    ``optimizer`` can be sliced with its parameter (a refusal after the model was sliced
    left the model pruned and the optimizer holding the old parameters)."""
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            _check_sliceable(value, p.shape, f"optimizer state {key!r} of {name}")


def slice_optimizer(
    optimizer: torch.optim.Optimizer,
    old_params: dict[str, nn.Parameter],
    new_params: dict[str, nn.Parameter],
    kept: dict[str, list[torch.Tensor | None]],
    every_name: dict[str, nn.Parameter] | None = None,
    before: dict[str, tuple[torch.Size, torch.Tensor | None]] | None = None,
) -> None:
    """Point ``optimizer`` at the new parameters, slicing each one's state and ``.grad``
    by ``kept``. Parameters new in ``new_params`` (compensation biases) join the group of
    their module's weight with fresh state. ``every_name``: the model's parameters under
    every name (``named_parameters(remove_duplicate=False)``), where the module's weight is
    found: a tied output layer's weight has only the embedding's name in ``new_params``,
    and the bias compensation gave that layer was left out of the optimizer, never trained.
    ``before``: each parameter's shape and gradient before the step (:func:`before_step`),
    where in-place pruning kept the parameter object and gave it the pruned shape."""
    name_of = {id(p): n for n, p in old_params.items()}
    placed: set[str] = set()
    for group in optimizer.param_groups:
        fresh = []
        for p in group["params"]:
            name = name_of.get(id(p))
            if name is None or name not in new_params:
                fresh.append(p)
                continue
            q = new_params[name]
            placed.add(name)
            shape, grad = before[name] if before and name in before else (p.shape, p.grad)
            dims = kept.get(name, [None] * len(shape))
            state = optimizer.state.pop(p, None)
            if state:
                optimizer.state[q] = {k: _slice_like(v, shape, dims, f"optimizer state {k!r} of {name}")
                                      for k, v in state.items()}  # fmt: skip
            if grad is not None and (q is not p or q.grad is None):
                q.grad = _slice_like(grad, shape, dims, f"the gradient of {name}").clone()
            fresh.append(q)
        group["params"] = fresh
    for name, q in new_params.items():
        if name in old_params or name in placed or not q.requires_grad:
            continue
        sibling = (every_name or new_params).get(name.rpartition(".")[0] + ".weight")
        for group in optimizer.param_groups:
            at = next((i for i, r in enumerate(group["params"]) if r is sibling), None) if sibling is not None else None
            if at is not None:
                # right after its weight, where the module's parameters() puts it: appended at the group's end, the
                # optimizer's state_dict() numbered the tensors in another order than an optimizer built over the
                # pruned model (a rebuilt model's, load_pruned's), and loading it there gave Adam's moments of one
                # tensor to another ("output with shape [5] doesn't match the broadcast shape [4, 5]")
                group["params"].insert(at + 1, q)
                if isinstance(group.get("param_names"), list) and len(group["param_names"]) == len(group["params"]) - 1:
                    # an optimizer built from named_parameters(): the names stay aligned with the tensors, in the
                    # user's spelling of the weight's name (the bias went unnamed, and every name after the
                    # appended tensor's place in optimizer.state_dict() was one short)
                    owner = str(group["param_names"][at]).rpartition(".")[0]
                    leaf = name.rpartition(".")[2]
                    group["param_names"].insert(at + 1, f"{owner}.{leaf}" if owner else leaf)
                break


def before_step(params: dict[str, nn.Parameter]) -> dict[str, tuple[torch.Size, torch.Tensor | None]]:
    """Each parameter's shape and gradient, taken before a step slices the parameters in
    place (the objects stay; :func:`slice_optimizer` slices state and gradients from these)."""
    return {n: (p.shape, p.grad) for n, p in params.items()}


# -- the training-loop API ---------------------------------------------------------------------------


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _followers(net: nn.Module, given: Any) -> list[nn.Module]:
    """The modules :class:`GradualPruner` slices beside ``net``: each given model, or the
    ``.module`` an averaging wrapper holds, with ``net``'s parameter names and shapes."""
    if isinstance(given, nn.Module):
        given = [given]
    try:
        given = list(given)
    except TypeError:
        raise UserError(
            f"followers must be a list of models (copies of the model), got {type(given).__name__}"
        ) from None
    out = []
    for i, f in enumerate(given):
        if not isinstance(f, nn.Module):
            raise UserError(f"followers[{i}] is a {type(f).__name__}, not a torch.nn.Module")
        inner = getattr(f, "module", None)
        if isinstance(inner, nn.Module) and _shapes(inner) == _shapes(net):
            f = inner  # AveragedModel / ModelEma: the copy it averages into
        f = options.pruned_module(f)
        if f is net:
            raise UserError(f"followers[{i}] is the model itself; give its copies (an EMA of its weights)")
        _check_follower(net, f, i)
        out.append(f)
    return out


def _check_follower(net: nn.Module, follower: nn.Module, i: int) -> None:
    mine, theirs = _shapes(net), _shapes(follower)
    if mine != theirs:
        name = next((n for n in mine if theirs.get(n) != mine[n]), next(iter(set(theirs) - set(mine)), "?"))
        raise UserError(
            f"followers[{i}] is not shaped like the model (parameter {name!r}: {theirs.get(name)} against "
            f"{mine.get(name)}); give copies of the model as it is now (an EMA of its weights), built before any step"
        )


def _warn_unoptimized(
    held: set[int],
    old: dict[str, nn.Parameter],
    new: dict[str, nn.Parameter],
    before: dict[str, tuple[torch.Size, torch.Tensor | None]],
) -> None:
    """A warning naming the trainable parameters a step sliced that none of the given
    optimizers held (``held``: their parameters' ids before the step): an optimizer not given
    to :class:`GradualPruner` (a second one, for the head) kept its per-parameter state
    (momentum) at the old shapes, unsliced, without a word (before parameters kept their
    objects, it stepped tensors the model no longer used)."""
    missed = [
        n
        for n, p in old.items()
        if p.requires_grad and id(p) not in held and (new.get(n) is not p or tuple(p.shape) != tuple(before[n][0]))
    ]
    if missed:
        warnings.warn(
            f"this step replaced the trainable parameter(s) {missed[:5]} with sliced values, which no optimizer "
            "given to GradualPruner holds: an optimizer of yours that holds them keeps their state (momentum) at the "
            "old shapes. Give every optimizer: GradualPruner(model, x, [optimizer, head_optimizer], ...), or set "
            "requires_grad=False on parameters you do not train",
            RuntimeWarning,
            stacklevel=4,
        )


def _check_not_wrapping(optimizer: torch.optim.Optimizer) -> None:
    """A :class:`UserError` for an optimizer whose steps run another optimizer it holds with
    parameter groups of its own (``ZeroRedundancyOptimizer``'s ``optim``: this rank's shard):
    a step slices the groups it can see, the inner one kept the old tensors, and training
    then moved nothing the model uses, without a word. A wrapper that shares its inner
    optimizer's groups (``param_groups`` the same list) is sliced through them."""
    for name, inner in vars(optimizer).items():
        if isinstance(inner, torch.optim.Optimizer) and inner.param_groups is not optimizer.param_groups:
            raise UserError(
                f"the optimizer is a {type(optimizer).__name__}, whose steps run the {type(inner).__name__} it holds "
                f"(.{name}) over parameter groups of its own (a shard of the parameters it was built with): "
                "GradualPruner slices the groups of the optimizer it is given, so after a step training would "
                "update tensors the model no longer uses. Prune with a plain optimizer over the model "
                "(torch.optim.AdamW(model.parameters(), ...)), and build the sharded one over the pruned model's "
                "parameters after the last step"
            )


def _every_name(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


def _is_size(d: Any) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


class GradualPruner:
    """Prune ``model`` in place, one increment per :meth:`step`, keeping ``optimizer``.

    :param model: the model being trained; sliced in place (the same object throughout).
    :param example_inputs: one batch of inputs for tracing.
    :param optimizer: its optimizer, or a list of them where several train parts of the
        model (one for the backbone, one for the head); after each step each holds the new parameters with
        their state and gradients sliced (the same object: LR schedulers keep working).
    :param schedule: a :class:`PruningSchedule`.
    :param by: ``"flops"`` (the schedule is the share of FLOPs removed) or ``"ratio"``
        (the share of each group's channels).
    :param refresh_bn: re-estimate the BatchNorm running statistics on the step's data
        before each step (see *refreshed statistics* above); ``False`` keeps those training
        left behind.
    :param followers: copies of the model that each step slices the same way, in place:
        the same units go, the kept values stay (no compensation; a bias compensation added
        starts at zero). An exponential moving average of the weights
        (``torch.optim.swa_utils.AveragedModel``, timm's ``ModelEmaV2`` / ``ModelEmaV3``:
        the wrapper or its ``.module``) kept the old widths, and its next update failed
        with "The size of tensor a (11) must match the size of tensor b (16)".
    :param pruner_options: passed to :class:`~cleanai_core.pruner.StructuredPruner`
        (``importance``, ``ignored_layers``, ``bias_compensation``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | tuple[torch.optim.Optimizer, ...],
        schedule: PruningSchedule,
        *,
        by: str = "flops",
        refresh_bn: bool = True,
        followers: Any = (),
        **pruner_options: Any,
    ) -> None:

        from cleanai_core.pruner import StructuredPruner

        options.check_model(model, "GradualPruner")
        optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise UserError(
                "optimizer must be a torch.optim.Optimizer (or a list of them, one per part of the model) over the "
                f"model's parameters, got {shown(optimizer)}"
            )
        for o in optimizers:
            _check_not_wrapping(o)
        own = {id(q) for q in model.parameters()}
        if not any(id(q) in own for o in optimizers for g in o.param_groups for q in g["params"]):
            # training would then step tensors the model no longer uses, and the model would never change
            raise UserError(
                "the optimizer holds none of the model's parameters; build it over this model "
                "(e.g. torch.optim.SGD(model.parameters(), lr=...)) before GradualPruner"
            )
        # found only at the first step, after the training set-up, before; Torch-Pruning's names get CleanAI's
        known = keywords(StructuredPruner.__init__, ("self", "model", "example_inputs"))
        check_option_names(pruner_options, known, "GradualPruner (an option of the pruner it builds)")
        if not isinstance(schedule, PruningSchedule):
            raise UserError(f"schedule must be a PruningSchedule, got {type(schedule).__name__}")
        options.check_switches(refresh_bn=refresh_bn)  # "no" read as true
        options.check_example_inputs(example_inputs)
        if by not in ("flops", "ratio"):
            raise UserError(f"by={by!r}: choose 'flops' or 'ratio'")
        for key in ("inplace", "pruning_ratio", "target_flops", "iterative_steps", "iterative_schedule"):
            if key in pruner_options:
                raise UserError(f"GradualPruner sets {key} itself from the schedule; remove it from the options")
        self.model, self.example_inputs, self.optimizer = model, example_inputs, optimizer
        self._optimizers = optimizers
        # a torch.compile wrapper: the steps prune the module it runs (step() returns the wrapper; through it,
        # each step's tracing and calibration ran TorchDynamo, and the replayed history did not find its names)
        self.net = options.pruned_module(model)  # also DataParallel's: the history and checkpoint name its layers
        self.followers = _followers(self.net, followers)
        self.schedule, self.by, self.options = schedule, by, pruner_options
        self.refresh_bn = refresh_bn
        self.steps_done = 0
        try:
            self.base_flops = count_flops(self.net, example_inputs, pruner_options.get("forward_fn"))
        except Exception as exc:
            if not model_fault(exc):
                raise
            raise UserError(
                f"the model failed on example_inputs ({type(exc).__name__}: {str(exc)[:200]}); give one batch of "
                "inputs as the model takes them"
            ) from None
        self.histories: list[Any] = []
        #: from the first step: every group's original and final unit counts (by its producing
        #: slices), the original widths and the original prunable units (see :meth:`_aim`)
        self._targets: dict[tuple[str, str], tuple[int, int, float]] | None = None
        self._widths: dict[tuple[str, str], int] = {}
        self._units = 0

    @property
    def done(self) -> bool:
        return self.steps_done >= self.schedule.steps

    @property
    def history(self) -> Any:
        """The steps done as one :class:`~cleanai_core.history.PruningHistory` (each step's
        joined with :meth:`~cleanai_core.history.PruningHistory.then`): the one to replay on a
        fresh model or to give ``save_pruned``, as ``StructuredPruner.history`` (there was only
        the list ``histories``, one per step, which neither takes)."""
        from cleanai_core.history import PruningHistory

        joined = PruningHistory()
        for h in self.histories:
            joined = joined.then(h)
        return joined

    def _increment(self) -> dict[str, float]:
        removed = self.schedule.removed_after(self.steps_done + 1)
        if self.by == "flops":
            share = count_flops(self.net, self.example_inputs, self.options.get("forward_fn")) / self.base_flops
            return {"target_flops": min(max((1.0 - removed) / share, 1e-6), 1.0 - 1e-6)}
        before = self.schedule.removed_after(self.steps_done) if self.steps_done else 0.0
        return {"pruning_ratio": 1.0 - (1.0 - removed) / (1.0 - before)}

    def step(self, data: Any, num_batches: int | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Prune the next increment, scoring on ``data`` (a loader of batches), and
        return ``(model, optimizer)`` — the same objects (the optimizer as given: one or a
        list), sliced. After the last step it
        changes nothing."""
        from cleanai_core.collect import check_num_batches

        num_batches = options.plain_number(num_batches)
        check_num_batches(num_batches)  # "2" raised TypeError from the loop; -1 and 0 said "the data is empty"
        if self.done:
            return self.model, self.optimizer
        check_iterable(data)  # None or a number: TypeError: 'NoneType' object is not iterable
        # each module's own mode (a frozen BatchNorm inside a training model stays in eval mode;
        # model.train(training) switched it back to train mode); the step under the user's
        # inference_mode made the parameters inference tensors, which training cannot use
        modes = {name: m.training for name, m in self.net.named_modules()}
        with torch.inference_mode(False), without_autocast():
            self._step(data, num_batches)
            self._warn_if_final_missed()
        for name, m in self.net.named_modules():
            m.training = modes.get(name, self.net.training)
        return self.model, self.optimizer

    def _step(self, data: Any, num_batches: int | None) -> None:
        from cleanai_core.history import PruningHistory
        from cleanai_core.pruner import StructuredPruner

        keep = 1.0 - self.schedule.removed_after(self.steps_done + 1)
        if self.by == "flops" and self.flops_share() <= keep + 0.005:
            # an earlier step landed at or below this one's share (channels come in whole units): the
            # clamped target of 1 - 1e-6 still removed a unit, ending up further below the schedule
            self.histories.append(PruningHistory())
            self.steps_done += 1
            return
        for opt in self._optimizers:
            check_optimizer_state(opt, dict(self.net.named_parameters()))
        for i, f in enumerate(self.followers):  # in step with the model, or nothing changes
            _check_follower(self.net, f, i)
        # a step that fails before pruning (a NaN batch the calibration refuses) puts back the
        # statistics the refresh changed: they were left NaN in the user's model
        held = {name: b.detach().clone() for name, b in self.net.named_buffers()}
        try:
            if self.refresh_bn and norms_with_running_stats(self.net):
                if iter(data) is data:  # a one-shot iterator: keep its batches for both reads
                    data, num_batches = list(iterate(data, num_batches)), None
                index = itertools.count()
                reestimate_batchnorm(self.net, iterate(data, num_batches), lambda m, b: self._run(m, b, next(index)))
            pruner = StructuredPruner(self.net, self.example_inputs, inplace=True, **self._increment(), **self.options)
            self._aim(pruner)
            pruner.collect_activations(data, num_batches=num_batches, progress=False)
        except BaseException:
            with torch.no_grad():
                for name, b in self.net.named_buffers():
                    if name in held and held[name].shape == b.shape:
                        b.copy_(held[name])
            raise
        old_params = dict(self.net.named_parameters())
        before = before_step(old_params)
        tagged = position_tagged_copy(self.net)  # the step's edits replay on it: the kept indices
        with warnings.catch_warnings():
            # a step the earlier ones already brought to its count removes nothing (as by FLOPs, silently):
            # "raise the ratio" was advice the user cannot take inside a schedule
            warnings.filterwarnings("ignore", message="the plan removes no unit")
            # the step's own FLOPs target is a share of the model as it is now, not of the original, and the advice
            # (`cleanai prune --auto`) is not the schedule's: the later steps aim from where this one lands, and the
            # last one is judged against the schedule below
            warnings.filterwarnings("ignore", message=r"target_flops=\S+: the pruned model keeps")
            # likewise where the step's own target is out of reach: "target_flops=0.219757 cannot be reached: ...
            # keeps 1.00 of the original's flops" named a share of the step's model as the original's, and a target
            # the user never gave; the last step is judged against the schedule
            warnings.filterwarnings("ignore", message=r"target_flops=\S+ cannot be reached")
            pruner.prune()
        kept = kept_indices(tagged, [e for step in pruner.history.steps for e in step])
        del tagged
        held = {id(p) for o in self._optimizers for g in o.param_groups for p in g["params"]}
        new_params = dict(self.net.named_parameters())
        for opt in self._optimizers:
            slice_optimizer(opt, old_params, new_params, kept, _every_name(self.net), before)
        _warn_unoptimized(held, old_params, new_params, before)
        with torch.no_grad():
            for f in self.followers:
                pruner.history.replay(f)
        self.histories.append(pruner.history)
        self.steps_done += 1

    def _warn_if_final_missed(self) -> None:
        """After the last step by FLOPs: a warning where the model keeps clearly less of the
        original's FLOPs than the schedule's end asks (channels go in whole units)."""
        from cleanai_core.pruner import TARGET_SLACK

        if self.by != "flops" or not self.done:
            return
        keep, share = 1.0 - self.schedule.final, self.flops_share()
        if keep - share > TARGET_SLACK:
            warnings.warn(
                f"GradualPruner's last step left {share:.2f} of the original's FLOPs where the schedule ends at "
                f"{keep:.2f} (final={self.schedule.final}): its groups' channels go in units too coarse to land "
                "closer; more steps, or a smaller round_to, land closer",
                RuntimeWarning,
                stacklevel=3,  # the caller of step()
            )
        elif share - keep > TARGET_SLACK:
            warnings.warn(
                f"GradualPruner's last step left {share:.2f} of the original's FLOPs where the schedule ends at "
                f"{keep:.2f} (final={self.schedule.final}): nothing more can go (every group is down to "
                "min_channels, and the other layers are frozen or in no prunable group: `cleanai explain` says why); "
                f"a final of at most {1.0 - share:.2f} is what this model reaches",
                RuntimeWarning,
                stacklevel=3,
            )

    def _aim(self, pruner: Any) -> None:
        """Point this step's ``pruner`` at counts taken from the original widths, as
        :func:`~cleanai_core.steps.prune_in_steps` does for ``iterative_steps``: each group
        with a layer ratio (and, ``by="ratio"``, every group) ends the step at its share of the
        way to its final count, and under global ranking (``by="ratio"``) the step's ratio
        is what is left of the schedule's share of the original units. A ratio taken from
        the schedule and applied to the shrunk widths rounded down at every step and
        compounded: ``final=0.5`` in 4 steps kept 10 of 16 channels (7 of 10 with a cubic
        schedule), ``round_to=4`` never got below 12, and a layer ratio of 0.5 was taken
        at every step (16 channels -> 1)."""
        from cleanai_core.steps import original_widths, ranked_units, step_ratio, uniform_targets

        groups = pruner.graph.groups(prunable_only=True)
        if self._targets is None:
            if self.steps_done:
                return  # resumed from a checkpoint that does not record them: the ratios as before
            every = self.by == "ratio" and not pruner.global_pruning  # else the groups with a layer ratio only
            ratio = self.schedule.final if self.by == "ratio" else 0.0
            self._targets = uniform_targets(pruner, pruner.graph, ratio, every)
            self._widths = original_widths(groups)
            self._units = ranked_units(groups, pruner.layer_ratios)
        removed = self.schedule.removed_after(self.steps_done + 1)
        pruner._targets, pruner._widths = self._targets, self._widths
        pruner._share = removed / self.schedule.final
        if self.by == "ratio" and pruner.global_pruning and self._units:
            pruner.pruning_ratio = step_ratio(removed, self._units, ranked_units(groups, pruner.layer_ratios), 0, 1)

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs besides the model's and the optimizer's own state dicts:
        the steps done, the original FLOPs the schedule is a share of, each step's slice
        edits and the resulting parameter shapes (plain Python values: ``torch.save`` and
        ``json`` both take it)."""
        return {
            "steps_done": self.steps_done,
            "base_flops": self.base_flops,
            "schedule": attrs.asdict(self.schedule),
            "by": self.by,
            "histories": [h.to_json() for h in self.histories],
            "shapes": {n: list(p.shape) for n, p in self.net.named_parameters()},
            # the counts the steps aim at (:meth:`_aim`), taken from the original widths at the first step
            "targets": None if self._targets is None else [[*k, *v] for k, v in self._targets.items()],
            "widths": [[*k, v] for k, v in self._widths.items()],
            "units": self._units,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. Build the model as at the start (unpruned), its
        optimizer and this pruner as at the start, call this, then load the model's and the
        optimizer's state dicts: the model is pruned to the checkpoint's shapes (the steps'
        edits replayed, the optimizer pointed at the new parameters) and the schedule goes
        on from the step it had reached. A model already at the checkpoint's shapes (e.g.
        unpickled) is left as it is."""
        from cleanai_core.history import PruningHistory

        if not isinstance(state, dict) or not {"steps_done", "base_flops", "histories", "shapes"} <= set(state):
            raise UserError("not a GradualPruner state (give what GradualPruner.state_dict() returned)")
        problem = self._state_problem(state)
        if problem:  # were AttributeError / ValueError here, or ZeroDivisionError / TypeError at the next step
            raise UserError(f"the GradualPruner checkpoint is damaged: {problem}; give what state_dict() returned")
        if state.get("schedule") != attrs.asdict(self.schedule) or state.get("by") != self.by:
            raise UserError(
                f"the checkpoint was taken with schedule {state.get('schedule')} by={state.get('by')!r}, "
                f"this pruner has {attrs.asdict(self.schedule)} by={self.by!r}; build it as it was"
            )
        histories = [PruningHistory.from_json(h) for h in state["histories"]]
        want = {n: tuple(v) for n, v in state["shapes"].items()}
        shapes = lambda: {n: tuple(p.shape) for n, p in self.net.named_parameters()}  # noqa: E731
        if shapes() != want:
            if self.steps_done:
                raise UserError("load_state_dict needs the pruner as built (no step taken yet)")
            with torch.inference_mode(False):
                for history in histories:
                    old_params = dict(self.net.named_parameters())
                    before = before_step(old_params)
                    tagged = position_tagged_copy(self.net)
                    history.replay(self.net)
                    kept = kept_indices(tagged, [e for step in history.steps for e in step])
                    del tagged
                    new_params = dict(self.net.named_parameters())
                    for opt in self._optimizers:
                        slice_optimizer(opt, old_params, new_params, kept, _every_name(self.net), before)
            if shapes() != want:
                raise UserError(
                    "the checkpoint's pruning steps do not bring this model to the checkpoint's shapes: build the "
                    "same architecture, unpruned, with the same ignored layers"
                )
        with torch.no_grad():
            for f in self.followers:  # at the unpruned shapes (built as at the start): pruned as the model was
                if {n: tuple(p.shape) for n, p in f.named_parameters()} != want:
                    for history in histories:
                        history.replay(f)
        self.steps_done, self.base_flops = int(state["steps_done"]), state["base_flops"]
        self.histories = histories
        targets = state.get("targets")  # absent from checkpoints of earlier versions: the steps go on as they did
        self._targets = None if targets is None else {(m, s): (o, f, u) for m, s, o, f, u in targets}
        self._widths = {(m, s): n for m, s, n in state.get("widths") or []}
        self._units = state.get("units") or 0

    def _state_problem(self, state: dict[str, Any]) -> str | None:
        """What is out of form in a :meth:`state_dict` (``None`` when nothing is)."""
        done, flops, histories, shapes = (state[k] for k in ("steps_done", "base_flops", "histories", "shapes"))
        if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= self.schedule.steps:
            return f"'steps_done' is {done!r}, expected a whole number from 0 to {self.schedule.steps}"
        if not isinstance(histories, list) or len(histories) != done:
            return f"'histories' must be a list of one pruning history per step done ({done})"
        if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0 < flops < math.inf:
            return f"'base_flops' is {flops!r}, expected a positive number"
        if not isinstance(shapes, dict) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and all(_is_size(d) for d in v)
            for k, v in shapes.items()
        ):
            return "'shapes' must map parameter names to lists of sizes"
        targets, widths, units = state.get("targets"), state.get("widths") or [], state.get("units") or 0
        row = lambda r, n: isinstance(r, list) and len(r) == n and all(isinstance(v, str) for v in r[:2])  # noqa: E731
        if targets is not None and not (
            isinstance(targets, list)
            and all(row(r, 5) and all(_is_size(v) for v in r[2:4]) and isinstance(r[4], (int, float)) for r in targets)
        ):
            return "'targets' must be a list of [module, slice, original units, final units, channels per unit]"
        if not isinstance(widths, list) or not all(row(r, 3) and _is_size(r[2]) for r in widths) or not _is_size(units):
            return "'widths' must be a list of [module, slice, units] and 'units' a whole number"
        return None

    def _run(self, model: nn.Module, batch: Any, index: int = 0) -> Any:
        inputs = split_batch(batch, model)[0]
        with model_failure(index, inputs, model=model):  # the model's own traceback, where calibration names the batch
            return run_batch(model, inputs, self.options.get("forward_fn"))

    def flops_share(self) -> float:
        """FLOPs of the current model over those of the model given at the start."""
        return count_flops(self.net, self.example_inputs, self.options.get("forward_fn")) / self.base_flops
