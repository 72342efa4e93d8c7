"""Verification: does a pruned model still give what the user would use?

Glossary:

- *outputs*: the tensor leaves of what the model returns after ``output_transform``
  (default: ``.logits`` where the output has it), found in tensors, tuples, lists, dicts,
  dataclasses and ``ModelOutput``-like objects, in order.
- *reference*: the original model's outputs on the example inputs, computed once: their
  shapes, and which of them are finite.

:func:`check_outputs` runs the pruned model on the example inputs and raises
:class:`~cleanai_core.errors.PruningError` when it fails to run, when its outputs' shapes
differ from the reference, or when an output holds NaN or inf where the original's was
finite. The pruner's failing-group search then names and skips the groups at fault.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
import torch
from torch import nn

from cleanai_core.errors import PruningError, pruned_run_failed
from cleanai_core.model_state import preserved
from cleanai_core.planning import tied_sets
from cleanai_core.runtime import call_model

__all__ = [
    "Reference",
    "build_skipping_breakers",
    "check_outputs",
    "model_outputs",
    "other_paths",
    "output_leaves",
    "reference",
    "run_outputs",
    "untraced_layers",
]


T = TypeVar("T")


def output_leaves(out: Any) -> list[torch.Tensor]:
    """Every tensor in ``out``, in order (see the glossary)."""
    leaves: list[torch.Tensor] = []
    _collect(out, leaves)
    return leaves


def _collect(obj: Any, acc: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        acc.append(obj)
    elif isinstance(obj, dict):  # also ModelOutput (an OrderedDict of its set fields)
        for v in obj.values():
            _collect(v, acc)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _collect(v, acc)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _collect(getattr(obj, f.name), acc)
    elif attrs.has(type(obj)):
        for f in attrs.fields(type(obj)):
            _collect(getattr(obj, f.name), acc)
    elif hasattr(obj, "to_tuple"):
        _collect(obj.to_tuple(), acc)


def model_outputs(
    model: nn.Module,
    inputs: Any,
    forward_fn: Callable | None = None,
    output_transform: Callable[[Any], Any] | None = None,
) -> list[torch.Tensor]:
    """Call ``model`` (eval mode, its state put back after, no gradients) and return its
    outputs' tensor leaves, after ``output_transform`` (default: ``.logits`` where present)."""
    with preserved(model), torch.no_grad():
        out = call_model(model, inputs, forward_fn)
    if output_transform is not None:
        out = output_transform(out)
    elif isinstance(getattr(out, "logits", None), torch.Tensor):
        out = out.logits
    return output_leaves(out)


@attrs.frozen
class Reference:
    """The original model's output shapes and which outputs are finite."""

    shapes: list[tuple[int, ...]]
    finite: list[bool]


def reference(
    model: nn.Module, inputs: Any, forward_fn: Callable | None = None, output_transform: Callable | None = None
) -> Reference:
    outs = model_outputs(model, inputs, forward_fn, output_transform)
    return Reference([tuple(o.shape) for o in outs], [_finite(o) for o in outs])


def _finite(t: torch.Tensor) -> bool:
    return (not t.is_floating_point() and not t.is_complex()) or bool(torch.isfinite(t).all())


def run_outputs(
    model: nn.Module, inputs: Any, forward_fn: Callable | None = None, output_transform: Callable | None = None
) -> list[torch.Tensor]:
    """:func:`model_outputs` of a pruned model; :class:`PruningError` where it fails to run."""
    try:
        return model_outputs(model, inputs, forward_fn, output_transform)
    except Exception as exc:
        pruned_run_failed(exc)


def check_outputs(
    model: nn.Module,
    inputs: Any,
    ref: Reference | Callable[[], Reference],
    forward_fn: Callable | None = None,
    output_transform: Callable | None = None,
    outputs: list[torch.Tensor] | None = None,
    like: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Raise :class:`PruningError` unless ``model`` runs on ``inputs`` with the reference's
    output shapes and finite outputs wherever the reference's are finite; returns the outputs.

    ``outputs``: ``model``'s outputs where they were just computed (None: run it). ``ref``
    may be a function that computes the reference (a forward of the original), called only
    where ``like`` does not settle the check: ``like`` are the outputs of the original with
    some channels zeroed (the masking oracle's), whose shapes are the original's. Outputs
    with those shapes, all finite, pass whatever the reference's finiteness (the check the
    reference would make; the forward it costs was a sixth of a data-free ``prune()``).
    Where an output's shape depends on its values (a count of detections), it is compared
    with the masked original's."""
    if outputs is None:
        outputs = run_outputs(model, inputs, forward_fn, output_transform)
    shapes = [tuple(o.shape) for o in outputs]
    if like is not None and shapes == [tuple(o.shape) for o in like] and all(_finite(o) for o in outputs):
        return outputs
    ref = ref if isinstance(ref, Reference) else ref()
    if shapes != ref.shapes:
        raise PruningError(f"the pruned model's output shapes {shapes} differ from {ref.shapes}")
    bad = [i for i, (o, was) in enumerate(zip(outputs, ref.finite, strict=True)) if was and not _finite(o)]
    if bad:
        raise PruningError(
            f"the pruned model's output{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} hold NaN or inf "
            "where the original model's are finite"
        )
    return outputs


def build_skipping_breakers(plan: Any, build: Callable[[torch.Tensor], T], on_skip: Callable[[str], None]) -> T:
    """``build(pruned_units)`` for ``plan`` (a :class:`~cleanai_core.planning.PruningPlan`);
    when the result fails verification (:class:`PruningError`), find the groups at fault by
    bisection, drop them from the plan (``on_skip`` gets a message naming each group, its
    modules and plugins) and build without them."""
    pruned = plan.pruned_units()
    try:
        return build(pruned)
    except PruningError as first:
        # tied groups (the experts of one 3-D tensor) are tried and skipped together
        active = [tie for tie in tied_sets(plan.groups) if any(gp.n_pruned for gp in tie)]

        def mask(ties: list) -> torch.Tensor:
            m = torch.zeros_like(pruned)
            for gp in (gp for tie in ties for gp in tie):
                m[gp.group.units[gp.pruned]] = True
            return m

        def ok(ties: list) -> bool:
            try:
                build(mask(ties))
                return True
            except PruningError:
                return False

        def bad(gps: list) -> list:
            if ok(gps):
                return []
            if len(gps) <= 1:  # none: the model fails with nothing pruned (halving [] again never ended)
                return gps
            half = len(gps) // 2
            found = bad(gps[:half]) + bad(gps[half:])
            return found or gps

        culprits = bad(active)
        for gp in (gp for tie in culprits for gp in tie if gp.n_pruned):
            plugins = sorted({type(s.pruner).__name__ for s in gp.group.slices if s.pruner is not None})
            on_skip(
                f"skipped group {gp.group.id} ({', '.join(gp.group.modules()[:4])}; pruners "
                f"{', '.join(plugins) or 'none'}): pruning it breaks the model ({first})"
            )
            gp.pruned[:] = False
        return build(mask([tie for tie in active if tie not in culprits]))


def untraced_layers(graph: Any) -> dict[str, nn.Module]:
    """The layers of ``graph`` (modules a pruner claims) that its trace of the example inputs
    never called: a branch the forward takes for other inputs, or a layer it does not use."""
    from cleanai_core.graph.trace import ModuleCall

    called = {e.name for e in graph.recording.events if isinstance(e, ModuleCall)}
    return {name: node.module for name, node in graph.nodes.items() if name not in called}


@attrs.define
class OtherPath:
    """What :func:`other_paths` saw: the model's inputs on the first call that ran an
    untraced layer (``(args, kwargs)``), and the layers that ran."""

    inputs: tuple[tuple, dict] | None = None
    layers: set[str] = attrs.field(factory=set)


@contextlib.contextmanager
def other_paths(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[OtherPath]:
    """While the block runs (calibration), note the first call of ``model`` that runs one of
    ``layers`` (untraced ones): data-dependent control flow the trace of the example inputs
    did not follow. The hooks are removed afterwards."""
    seen = OtherPath()
    if not layers:
        yield seen
        return
    current: list[Any] = [None]

    def on_model(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        current[0] = (args, kwargs)

    def on_layer(name: str) -> Callable:
        def hook(*_: Any) -> None:
            seen.layers.add(name)
            if seen.inputs is None and current[0] is not None:
                seen.inputs = current[0]

        return hook

    handles = [model.register_forward_pre_hook(on_model, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(on_layer(name)) for name, m in layers.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
