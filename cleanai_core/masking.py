"""The masking oracle (DESIGN.md section 5): the original model with pruned channels zeroed.

Glossary:

- *masked model*: the unpruned model with every pruned channel zeroed at every slice
  (module outputs, module inputs, norm affines, bare tensors). Slicing is exact when the
  sliced model's outputs equal the masked model's.
- *exact units*: the pruned units of groups that normalise across no slice. A group with
  a LayerNorm/GroupNorm (or a weight-standardised input) changes the statistics it
  normalises by when it shrinks, so no masking reproduces it: it is left out of the
  comparison.

:func:`masked_outputs` runs the masked model; :func:`check_exact` compares it with the
sliced model (the pruner's verification, on the units it prunes), and the plugin authors'
helper :func:`cleanai_core.testing.check_pruner` does the same on a random pruning.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cleanai_core.errors import PruningError
from cleanai_core.model_state import copy_model, copy_tensor, drop_user_hooks, user_hooks, user_hooks_off
from cleanai_core.shapes import map_tensors
from cleanai_core.slicing import get_submodule_and_attr
from cleanai_core.verify import model_outputs, run_outputs

__all__ = ["check_exact", "exact_tolerance", "exact_units", "masked_model", "masked_outputs", "unsteady_outputs"]


def exact_units(graph: Any, pruned: torch.Tensor) -> torch.Tensor:
    """``pruned`` (a mask over ``graph.root``) without the units of normalising groups."""
    out = pruned.clone()
    for g in graph.groups(prunable_only=True):
        if g.normalizes:
            out[g.units] = False
    return out


def masked_outputs(
    graph: Any,
    pruned: torch.Tensor,
    inputs: Any,
    forward_fn: Callable | None = None,
    output_transform: Callable | None = None,
) -> list[torch.Tensor]:
    """Outputs of ``graph.model`` with the ``pruned`` channels zeroed at every slice.

    Where every pruned slice is a module's input or output, the masked model is
    ``graph.model`` itself with a zeroing hook on each, run once like the reference
    (eval mode, state put back, hooks removed, also on error): none of its tensors is
    written or replaced. Where a bare tensor is zeroed, or a module whose pruner defines
    ``mask(module, slice_name, idx)`` (it zeroes the module's weights and returns ``True``
    to skip the default hooks), the masked model is a copy that shares ``graph.model``'s
    parameters except the ones it zeroes, which are its own."""
    slices = pruned_slices(graph, pruned)
    # an index moves channels, a count counts them: neither zeroes any
    slices = [(spec, idx) for spec, idx in slices if spec.kind not in ("index", "count")]
    outside = outside_zeros(graph, pruned)
    if outside or any(spec.module == "" or getattr(spec.pruner, "mask", None) is not None for spec, _ in slices):
        return model_outputs(_masked_copy(graph, slices, outside), inputs, forward_fn, output_transform)
    model = graph.model
    modules = dict(model.named_modules(remove_duplicate=False))
    zeroed = _Zeroed()
    handles = []
    # the user's hooks off, as the sliced copy has none of them (a hook changing an output,
    # ``o * 2``, made every group differ from its masking); taken before the zeroing hooks
    with user_hooks_off(model):
        try:
            for spec, idx in slices:
                module = modules[spec.module]
                if spec.kind == "in":
                    handles.append(module.register_forward_pre_hook(zeroed.input(spec, idx), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(zeroed.output(spec.dim, idx)))
            return model_outputs(model, inputs, forward_fn, output_transform)
        finally:
            for h in handles:
                h.remove()


def pruned_slices(graph: Any, pruned: torch.Tensor) -> list[tuple[Any, torch.Tensor]]:
    """Every slice of ``graph`` that loses units of ``pruned`` (a mask over ``graph.root``),
    with the indices it loses."""
    return [(spec, idx) for spec, idx in zip(graph.slices, graph.indices_in(pruned), strict=True) if idx.numel()]


def outside_zeros(graph: Any, pruned: torch.Tensor) -> list[tuple[str, int, torch.Tensor]]:
    """``(tensor name, dim, indices)`` to zero in the tensors of claimed modules that the
    model reads outside their modules' calls (``F.linear(x, self.qkv.weight, qkv_bias)``,
    labelled by the pruner's ``trace_param``): no hook of the module sees that read, so
    the masked model zeroes the tensor itself. Before 2026-12-01 it did not, and a
    hand-written BEiT attention whose head width shrank was refused by verification
    ("pruning it breaks the model") though its slicing was exact."""
    out: list[tuple[str, int, torch.Tensor]] = []
    seen: set[tuple[str, int]] = set()
    for name, lab in getattr(getattr(graph, "ctx", None), "labelled_outside", ()):
        dims = [(lab.dim, lab.atoms)] + ([lab.cross] if lab.cross is not None else [])
        for dim, atoms in dims:
            idx = pruned[graph.root[atoms]].nonzero().squeeze(1)
            if idx.numel() and (name, dim) not in seen:
                seen.add((name, dim))
                out.append((name, dim, idx))
    return out


def masked_model(graph: Any, pruned: torch.Tensor) -> nn.Module:
    """A copy of ``graph.model`` that is the masked model of ``pruned`` for every call
    (``generate()`` included): zeroing hooks and zeroed weights of its own, the other
    parameters shared with ``graph.model`` (do not train it)."""
    return _masked_copy(graph, pruned_slices(graph, pruned), outside_zeros(graph, pruned))


def _masked_copy(
    graph: Any, slices: list[tuple[Any, torch.Tensor]], outside: list[tuple[str, int, torch.Tensor]] = ()
) -> nn.Module:
    source = graph.model
    model = copy_model(source, {id(t): t for t in source.parameters()})  # buffers: its own
    drop_user_hooks(model, user_hooks(source))  # as the sliced copy has none (see masked_outputs)
    zeroed = _Zeroed()
    for name, dim, idx in outside:
        _zero_tensor(model, name, dim, idx)
    for spec, idx in slices:
        if spec.kind in ("index", "count"):  # an index buffer moves channels (the zeroed ones with it)
            continue
        if spec.module == "":
            _zero_tensor(model, spec.name, spec.dim, idx)
            continue
        module = model.get_submodule(spec.module)
        mask = getattr(spec.pruner, "mask", None)  # composite modules zero their own weights
        if mask is not None:
            _own(module)
            with torch.no_grad():
                if mask(module, spec.name, idx):
                    continue
        if spec.kind == "in":
            module.register_forward_pre_hook(zeroed.input(spec, idx), with_kwargs=True)
        else:
            module.register_forward_hook(zeroed.output(spec.dim, idx))
    return model


def _zero_tensor(model: nn.Module, name: str, dim: int, idx: torch.Tensor) -> None:
    """Replace the tensor ``name`` of ``model`` (wherever it is held) by a copy zeroed at
    ``idx`` along ``dim``."""
    owner, attr = get_submodule_and_attr(model, name)
    t = getattr(owner, attr)
    masked = t.detach().index_fill(dim, idx.to(t.device), 0.0)
    if isinstance(t, nn.Parameter):
        masked = nn.Parameter(masked, requires_grad=t.requires_grad)
    _replace(model, t, masked)


def _replace(model: nn.Module, old: torch.Tensor, new: torch.Tensor) -> None:
    """Put ``new`` wherever ``model`` holds ``old`` (a tied tensor has several names)."""
    for m in model.modules():
        for table in (m._parameters, m._buffers):
            for key, t in table.items():
                if t is old:
                    table[key] = new


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors count no versions
        return None


def _own(module: nn.Module) -> None:
    """Give ``module`` (in the masked copy) its own parameters and buffers, once."""
    memo: dict[int, Any] = {}
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for key, t in table.items():
                if t is not None:
                    table[key] = copy_tensor(t, memo)


class _Zeroed:
    """The zeroing hooks of one masked run. An input that is the very tensor a hook just
    zeroed at the same indices, unchanged since (its version counter), is passed on as it
    is: a convolution's zeroed output read by its BatchNorm is not zeroed a second time.

    A module's output that nothing else refers to (no other Python reference, no other
    tensor on its memory: the counts a fresh output has on its way through the hook, read
    on a probe module first) is zeroed in place: no one can tell, and a copy of every
    activation was a third of the masking's cost."""

    def __init__(self) -> None:
        self.done: dict[int, tuple[Any, int | None, int, torch.Tensor]] = {}  # id -> (weakref, version, dim, idx)
        self.sole: tuple[int, int, int] | None = None
        probe = _Probe()
        probe.register_forward_hook(self.output(0, torch.zeros(0, dtype=torch.int64), probe=True))
        with torch.no_grad():
            probe(torch.zeros(1))

    def _fill(self, x: torch.Tensor, dim: int, idx: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        seen = self.done.get(id(x))
        if seen is not None and seen[0]() is x and seen[1] == _version(x) is not None and seen[2] == dim:
            if seen[3] is idx or torch.equal(seen[3], idx):
                return x
        idx_here = idx.to(x.device)
        out = x.index_fill_(dim, idx_here, 0.0) if in_place else x.index_fill(dim, idx_here, 0.0)
        self.done[id(out)] = (weakref.ref(out), _version(out), dim, idx)
        return out

    def input(self, spec: Any, idx: torch.Tensor) -> Callable:
        def pre(m, args, kwargs):
            args = list(args)
            x = args[spec.arg]
            args[spec.arg] = self._fill(x, spec.dim % x.ndim, idx)
            return tuple(args), kwargs

        return pre

    def output(self, dim: int | None, idx: torch.Tensor, probe: bool = False) -> Callable:
        def post(m, args, out):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return out
            sole = _holders(out)
            if probe:
                self.sole = sole
                return out
            d = 1 if dim is None else dim
            if out.ndim <= d % max(out.ndim, 1):
                return out
            in_place = sole is not None and sole == self.sole and out._base is None and not out.requires_grad
            in_place = in_place and _dense(out)
            return self._fill(out, d % out.ndim if d >= 0 else d + out.ndim, idx, in_place)

        return post


class _Probe(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0


def _dense(t: torch.Tensor) -> bool:
    """Contiguous in one of the usual layouts: no element shares memory with another (an
    expanded tensor's do, and writing into it would write several elements at once)."""
    return any(t.is_contiguous(memory_format=f) for f in (torch.contiguous_format, torch.channels_last))


def _holders(t: torch.Tensor) -> tuple[int, int, int] | None:
    """References to ``t`` (Python), to its tensor (C++) and to its memory (other tensors)."""
    try:
        return sys.getrefcount(t), t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):  # no storage: a wrapper subclass
        return None


def exact_tolerance(expected: list[torch.Tensor]) -> float:
    """How far a sliced model's outputs may be from the masked model's: 1e-3 of the outputs'
    scale (at least 1e-3) in float32/64, 3e-2 of it where an output is a 16-bit float."""
    floats = [t for t in expected if t.is_floating_point() and t.numel()]
    scale = max((float(t.detach().abs().max()) for t in floats), default=1.0)
    rel = 3e-2 if any(t.element_size() < 4 for t in floats) else 1e-3
    return rel * max(1.0, scale)


def within(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Whether ``a`` and ``b`` (same shape) differ by at most ``tol`` where they differ at all
    (equal infinities and NaN beside NaN agree; integer outputs must be equal)."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    same = (a == b) | (a.isnan() & b.isnan())
    return bool(same.all()) or float((a.float() - b.float()).abs()[~same].max()) <= tol


def unsteady_outputs(
    model: nn.Module, inputs: Any, forward_fn: Callable | None = None, output_transform: Callable | None = None
) -> frozenset[int]:
    """The positions of ``model``'s outputs on ``inputs`` that jump (by more than
    :func:`exact_tolerance`, or to another shape) where the floating-point inputs move by 1e-4
    of themselves: outputs sorted or selected by value (a detector's boxes after top-k and NMS,
    where a near tie of scores goes the other way). Slicing moves values by rounding errors
    too, so such outputs cannot be held to the masking oracle element by element; their
    shapes still are. An output that differs between two runs of the same inputs (a forward
    that draws random numbers) is not one: it stays compared, and fails. Costs three forwards
    of ``model``."""
    first, again = (model_outputs(model, inputs, forward_fn, output_transform) for _ in range(2))
    gen = torch.Generator().manual_seed(0)

    def nudge(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        return t * (1 + 1e-4 * torch.randn(t.shape, generator=gen).to(t.device, t.dtype))

    moved = model_outputs(model, map_tensors(nudge, inputs), forward_fn, output_transform)
    tol = exact_tolerance([t for t in first if bool(torch.isfinite(t).all())])

    return frozenset(
        i
        for i, (a, b, c) in enumerate(zip(first, moved, again, strict=False))
        if a.is_floating_point()
        and a.shape == c.shape
        and within(a, c, tol)
        and (a.shape != b.shape or not within(a, b, tol))
    )


def check_exact(
    sliced: nn.Module,
    got: list[torch.Tensor] | None,
    graph: Any,
    pruned: torch.Tensor,
    inputs: Any,
    forward_fn: Callable | None = None,
    output_transform: Callable | None = None,
    expected: list[torch.Tensor] | None = None,
    unsteady: frozenset[int] = frozenset(),
) -> None:
    """Raise :class:`~cleanai_core.errors.PruningError` when ``sliced`` (``graph.model``
    sliced without ``pruned``, nothing compensated) gives other outputs on ``inputs`` than
    the masked model. Such a model computes something the graph did not see: e.g. it reads
    a channel count at run time (``x / sqrt(x.shape[1])``), which zeroing channels keeps
    and slicing changes. Outputs whose shapes differ (a variable number of detections) or
    that are not finite in the masked model are not compared. ``got``: ``sliced``'s
    outputs on ``inputs`` where they were just computed (None: run it); ``expected``: the
    masked model's (:func:`masked_outputs`), where they were. ``unsteady``: the positions of
    outputs not compared either, those that jump where the inputs move by a rounding error
    (detections sorted by score: a tie broken the other way reorders the boxes)."""
    if expected is None:
        expected = masked_outputs(graph, pruned, inputs, forward_fn, output_transform)
    if got is None:  # the slicing alone may fail to run where the whole plan ran (a width read from another)
        got = run_outputs(sliced, inputs, forward_fn, output_transform)
    pairs = [
        (a, b)
        for i, (a, b) in enumerate(zip(got, expected, strict=False))
        if i not in unsteady
        and a.shape == b.shape
        and a.numel()
        and a.is_floating_point()
        and b.is_floating_point()
        and bool(torch.isfinite(b).all())
    ]  # an empty output (a detector that found nothing) has nothing to compare: max() of it raised
    diff = max((float((a.detach().float() - b.detach().float()).abs().max()) for a, b in pairs), default=0.0)
    tol = exact_tolerance([b for _, b in pairs])
    if not diff <= tol:
        raise PruningError(
            f"the sliced model's outputs differ from the original's with those channels zeroed by {diff:.3g} "
            f"(tolerance {tol:.3g}): slicing them is not the same as zeroing them, e.g. the model reads a channel "
            "count at run time (x / sqrt(x.shape[1]))"
        )
