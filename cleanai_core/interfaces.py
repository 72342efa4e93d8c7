"""What plugins implement: layer pruners, index mappers, importance criteria, reducers.

Call tree of a :class:`LayerPruner` (kernel -> pruner)::

    DependencyGraph(model, x)
      |- trace(module, call, ctx)              once per forward call of the module:
      |                                        read input labels, bind slices, label outputs
      `- trace_param(module, name, param, ctx) a parameter of the module read by an op
                                               outside its calls (``F.linear(x, m.weight)``)
    StructuredPruner.prune()  /  PruningHistory.replay()
      |- prune(module, keep)                   keep = {slice name: kept indices}
      `- hook cleanai_after_prune(module)      attributes outside tensors
    scoring
      `- weight_energy(module, slice)          per index: sum of squared weights touching it
    compensation (optional)
      |- removed_weights(module, slice, removed, keep)            least squares by products (optional) ...
      |  `- add_reconstruction(module, slice, kept, keep, delta, bias)
      |- reconstruct(module, slice, removed, kept, coef, shift)   ... or by the coefficients
      `- compensate(module, slice, removed, mean)                 mean only
    load_pruned(folder)
      `- settings_problem(module)              the saved settings against the tensors

An :class:`IndexMapper` only has ``trace(call, ctx)``: it maps labels from the inputs
of one ATen operation to its outputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from cleanai_core.model_state import from_library

if TYPE_CHECKING:
    from cleanai_core.graph.context import Label, TraceContext
    from cleanai_core.graph.groups import Group
    from cleanai_core.graph.trace import ModuleCall, OpCall
    from cleanai_core.scoring import ScoringContext

__all__ = [
    "Importance",
    "IndexMapper",
    "LayerPruner",
    "Reducer",
    "add_at",
    "add_to_bias",
    "at_rows",
    "keep_positions",
    "memory_format_of",
    "runs_own_forward",
    "settings_mismatch",
    "shape_of",
    "slice_tensor",
    "squared_weight",
]


class LayerPruner:
    """Traces and slices one kind of module. Subclass and override what you need.

    Slices are named per pruner, conventionally ``"out"`` (the channels the module
    produces) and ``"in"`` (the channels it consumes). ``prune`` receives the kept
    indices of every slice of this module that shrinks.
    """

    #: printed by ``cleanai plugins`` / ``explain``
    name: str = "layer"
    #: ``False``: compensation must not give the module a bias it lacks (its saved form
    #: cannot hold one); the least-squares fold is then made without an intercept
    new_bias: bool = True

    def trace(self, module: nn.Module, call: ModuleCall, ctx: TraceContext) -> None:
        raise NotImplementedError

    def trace_param(self, module: nn.Module, name: str, param: str, ctx: TraceContext) -> Label | None:
        """``module.<param>`` is read by an operation outside the module's own calls
        (timm's EVA attention: ``F.linear(x, self.qkv.weight, qkv_bias)``). Bind the slices
        of ``module`` (named ``name``) that the tensor's dimensions follow and return its
        :class:`~cleanai_core.graph.context.Label`; a second labelled dimension goes in
        ``Label.cross``, and its atoms are frozen unless a mapper contracts them
        (:meth:`~cleanai_core.graph.context.TraceContext.take_cross`). ``None`` (the
        default): the tensor's channels are frozen."""
        return None

    def prune(self, module: nn.Module, keep: Mapping[str, torch.Tensor]) -> None:
        """Slice ``module`` to the kept indices of each of its shrinking slices.

        Replace tensors with sliced copies (:func:`replace_param`); never write into them
        (no ``weight.data = ...``, no in-place ops): the pruned copy shares its tensors
        with the user's model until they are sliced."""
        raise NotImplementedError

    def weight_energy(self, module: nn.Module, slice_name: str) -> torch.Tensor | None:
        """Per index of the slice, the sum of squared weights that read or write it
        (for an ``"in"`` slice: the consumer's input columns). ``None``: no weights."""
        return None

    def compensate(self, module: nn.Module, slice_name: str, removed: torch.Tensor, mean: torch.Tensor) -> bool:
        """Fold the mean contribution of removed input channels into the bias, before
        slicing. ``mean`` is the mean of each removed channel at this module's input.
        Return ``True`` when done. The module's tensors are its own here (copied before
        the call), so in-place writes are fine."""
        return False

    def can_reconstruct(self, module: nn.Module, slice_name: str) -> bool:
        """Whether :meth:`reconstruct` can fold removed channels of this slice; calibration
        collects the (costly) channel covariance only where it can. By default: whether
        the class overrides :meth:`reconstruct`."""
        return slice_name == "in" and type(self).reconstruct is not LayerPruner.reconstruct

    def reconstruct(
        self,
        module: nn.Module,
        slice_name: str,
        removed: torch.Tensor,
        kept: torch.Tensor,
        coef: torch.Tensor,
        shift: torch.Tensor,
    ) -> bool:
        """Fold removed input channels into the kept ones, before slicing: calibration
        regressed each removed channel on the kept ones, ``x[removed] ~ shift + coef @
        x[kept]`` (``coef``: removed x kept), so the weights of kept columns absorb
        ``W[:, removed] @ coef`` and the bias absorbs ``W[:, removed] @ shift``. Return
        ``True`` when done (then :meth:`compensate` is not called)."""
        return False

    def removed_weights(
        self, module: nn.Module, slice_name: str, removed: torch.Tensor, keep: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """Optional, with :meth:`add_reconstruction`, in place of :meth:`reconstruct`: the
        weights that read the ``removed`` input channels of ``slice_name`` and survive the
        slicing (``keep``: the kept indices of the module's shrinking slices, as
        :meth:`prune` gets them), as a matrix ``(n, len(removed))``, read only. The solve
        then returns the folded products ``B @ coef`` for these ``n`` rows alone (fewer
        right-hand sides than ``coef``'s where ``n < len(removed)``, and no fold of rows
        that slicing drops). ``None`` (the default): :meth:`reconstruct` is called. A
        subclass that overrides :meth:`reconstruct` below the class that implements this
        gets :meth:`reconstruct`."""
        return None

    def add_reconstruction(
        self,
        module: nn.Module,
        slice_name: str,
        kept: torch.Tensor,
        keep: Mapping[str, torch.Tensor],
        delta: torch.Tensor,
        bias: torch.Tensor,
    ) -> None:
        """Fold the products of :meth:`removed_weights`' matrix ``B``, row for row:
        ``delta = B @ coef`` (``n x len(kept)``) into the kept columns and ``bias = B @
        shift`` (``n``) into the bias (as :meth:`reconstruct` would, for these rows)."""
        raise NotImplementedError

    def settings_problem(self, module: nn.Module) -> str | None:
        """What in ``module``'s settings (plain attributes such as ``out_channels`` or
        ``num_heads``) does not fit its tensors, in words, or ``None``.
        :func:`~cleanai_core.io.load_pruned` asks it of every module that the settings of
        ``architecture.json`` changed: a width edited there loaded, then failed in the
        forward or computed something else without a word. :func:`settings_mismatch` words
        the usual case. ``None`` (the default): nothing to check."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


@runtime_checkable
class IndexMapper(Protocol):
    """Maps channel labels through one ATen operation (see :mod:`cleanai_core.graph.context`)."""

    def trace(self, call: OpCall, ctx: TraceContext) -> None: ...


@runtime_checkable
class Importance(Protocol):
    """Scores the units of a group: higher means more important.

    Call tree (kernel -> criterion)::

        StructuredPruner.collect_activations(loader)
          |- needs_activations    statistics at every consumer's input -> ctx.stats
          `- needs_gradients      loss gradients on labelled data     -> ctx.gradients
        planning, once per prunable group
          `- __call__(group, ctx)  -> one score per unit of group

    ``ctx`` is a :class:`~cleanai_core.scoring.ScoringContext`: the graph, the model,
    the statistics, ``bias_compensation``, ``gradients``, and helpers that turn
    per-index quantities of a slice into per-unit terms (``per_unit``, ``energy``,
    ``weight_terms``, ``consumer_terms``, ``transformed``). ``__call__`` returns a float
    tensor of ``group.size`` scores, in the order of ``group.units``. A criterion that
    combines several terms per unit folds them with a :class:`Reducer` it takes as its
    ``reducer`` option (``get_reducer(name)``).

    ``needs_activations``: calibration data is required (``collect_activations`` before
    ``prune``). ``needs_gradients``: calibration also accumulates loss gradients, which
    needs labelled data; with ``needs_squared_gradients = True`` as well (optional,
    ``hessian``), ``ctx.gradients`` holds the squares of every sample's own gradient,
    summed, instead of the summed gradient.
    """

    needs_activations: bool
    needs_gradients: bool

    def __call__(self, group: Group, ctx: ScoringContext) -> torch.Tensor: ...


@runtime_checkable
class Reducer(Protocol):
    """Folds stacked per-term scores ``(n_terms, n_units)`` into ``(n_units,)``: how a
    criterion combines its terms for one unit (one per slice or consumer). Registered by
    name with ``cleanai_reducers``; criteria take the name as their ``reducer`` option."""

    def __call__(self, scores: torch.Tensor) -> torch.Tensor: ...


_SQUARED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def runs_own_forward(module: nn.Module, known: tuple[str, ...] = ("weight", "bias")) -> bool:
    """Whether ``module``'s ``forward`` is written in the user's code (not torch's, nor an
    installed library's, which their plugins know) and the module holds tensors beyond
    ``known`` (names of tensors and submodules), the ones a built-in pruner of its torch
    base class slices: parameters or buffers of its own (a low-rank update ``x @
    self.A.t() @ self.B.t()``, a per-channel gain) or in submodules (PEFT's ``lora_A`` /
    ``lora_B``). A pruner that claimed it would leave those whole while the module's
    channels shrink; unclaimed, the module is traced through its operations like any
    custom layer. A forward that only adds work around ``super().forward(x)`` (clipping,
    logging) holds nothing more and stays claimed."""
    owner = next(c for c in type(module).__mro__ if "forward" in vars(c))
    if from_library(owner):
        return False
    own = (k for k, t in (*module._parameters.items(), *module._buffers.items()) if t is not None)
    held = (
        k
        for k, c in module.named_children()
        if next(c.parameters(), None) is not None or next(c.buffers(), None) is not None
    )
    return any(k not in known for k in (*own, *held))


def squared_weight(weight: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies of a weight ``(dim0, dim1, *k)``: ``weight**2`` summed per index of dim 0,
    and per index of dim 1 where dim 1 is ``groups`` blocks (grouped convs: one block per
    group of dim 0), so ``(dim0,)`` and ``(groups * dim1,)``, float32.

    Scoring asks for a layer's input and output energies separately; both come from one
    pass over the weight, cached until the weight changes (only the two vectors are kept)."""
    hit = _SQUARED.get(weight)
    # an inference tensor (a model built under torch.inference_mode) has no version counter; the
    # memory and shape too: an in-place prune keeps the Parameter object and gives it new data
    # (``p.data = ...``), which leaves the version as it was, and the next step scored the
    # energies of the weight before the prune (a GradualPruner step ranked stale channels)
    version = None if weight.is_inference() else (weight._version, weight.data_ptr(), tuple(weight.shape))
    if hit is not None and version is not None and hit[0] == (version, groups):
        return hit[1]
    w = weight.detach()
    w = (w.abs() if w.is_complex() else w).float()  # .float() of complex weights kept their real parts only
    if w.ndim > 2:
        per = torch.linalg.vector_norm(w.reshape(w.shape[0], w.shape[1], -1), dim=2).square()
    else:
        per = w.reshape(w.shape[0], -1).square()
    rows = per.sum(1)
    cols = per.reshape(groups, -1, per.shape[1]).sum(1).reshape(-1)
    _SQUARED[weight] = ((version, groups), (rows, cols))
    return rows, cols


def settings_mismatch(module: nn.Module, expected: Mapping[str, Any], source: str) -> str | None:
    """For :meth:`LayerPruner.settings_problem`: the attributes of ``module`` that differ
    from ``expected`` (what ``source``, e.g. ``"its weight of shape (32, 16, 3, 3)"``,
    gives), in words, or ``None``. Tuples and lists compare alike."""

    def plain(v: Any) -> Any:
        return tuple(v) if isinstance(v, (list, tuple)) else v

    wrong = {k: v for k, v in expected.items() if plain(getattr(module, k, None)) != plain(v)}
    if not wrong:
        return None
    have = ", ".join(f"{k}={plain(getattr(module, k, None))!r}" for k in wrong)
    want = ", ".join(f"{k}={plain(v)!r}" for k, v in wrong.items())
    return f"{have}, but {source} gives {want}"


def shape_of(module: nn.Module, attr: str) -> tuple[int, ...] | None:
    """The shape of tensor ``module.<attr>``, or ``None`` where there is none (or a lazy
    module's uninitialized one)."""
    t = getattr(module, attr, None)
    if not isinstance(t, torch.Tensor) or isinstance(t, nn.parameter.UninitializedTensorMixin):
        return None
    return tuple(t.shape)


def slice_tensor(t: torch.Tensor, dim: int, keep: torch.Tensor) -> torch.Tensor:
    """``t`` restricted to ``keep`` along ``dim``, as a new tensor contiguous in the memory
    format ``t`` had (a channels-last conv weight stays channels-last: made contiguous, 17
    of ResNet-18's 20 conv weights left channels-last, and the pruned model ran 6% slower
    on channels-last inputs, oneDNN reordering the weights on every call)."""
    return t.index_select(dim, keep.to(t.device)).contiguous(memory_format=memory_format_of(t))


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The layout ``t`` is dense in: ``torch.contiguous_format`` where it is (also when a
    shape makes several layouts coincide) or none is, else channels-last (2-d or 3-d). A
    sparse tensor has none: ``torch.contiguous_format``."""
    if t.layout != torch.strided or t.is_contiguous():
        return torch.contiguous_format
    for fmt, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if t.ndim == ndim and t.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def replace_param(module: nn.Module, attr: str, dim: int, keep: torch.Tensor) -> None:
    """Slice parameter or buffer ``module.<attr>`` along ``dim`` in place of the old one,
    keeping its ``requires_grad`` flag. A parametrized tensor (``weight_norm``,
    ``spectral_norm``) is sliced through its originals (:mod:`cleanai_core.parametrized`)."""
    from cleanai_core.parametrized import slice_parametrized

    if slice_parametrized(module, attr, dim, keep):
        return
    t = getattr(module, attr, None)
    if t is None:
        return
    new = slice_tensor(t.data, dim, keep)
    if isinstance(t, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        module._buffers[attr] = new


def keep_positions(module: nn.Module, attr: str, keep: torch.Tensor) -> None:
    """Rewrite ``module.<attr>``, an integer tensor of positions along a dimension that
    keeps the positions ``keep`` (ascending): entries that point at a removed position
    go, the others are renumbered to where their position now is. Order and repeats are
    kept: a permutation stays the same permutation of the kept channels."""
    t = getattr(module, attr, None)
    if t is None:
        return
    keep = keep.to(t.device, torch.int64)
    size = max(int(t.max()) if t.numel() else -1, int(keep.max()) if keep.numel() else -1) + 1
    where = torch.full((size,), -1, dtype=torch.int64, device=t.device)
    where[keep] = torch.arange(keep.numel(), device=t.device)
    moved = where[t.data.long().reshape(-1)]
    new = moved[moved >= 0].to(t.dtype).contiguous()
    long = [d for d, s in enumerate(t.shape) if s > 1]
    if t.ndim > 1 and len(long) == 1:  # laid out for ``gather`` (``(1, C, 1, 1)``): the same layout
        new = new.view(*t.shape[: long[0]], -1, *t.shape[long[0] + 1 :])
    if isinstance(t, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=False))
    else:
        module._buffers[attr] = new


def add_to_bias(module: nn.Module, delta: torch.Tensor) -> None:
    """``module.bias += delta`` in place, creating a zero bias first where the module has
    none (compensation and reconstruction fold removed inputs into it). A new bias follows
    the weight's ``requires_grad``: a frozen layer does not get a trainable bias."""
    if module.bias is None:
        weight = getattr(module, "weight", None)
        trainable = weight.requires_grad if isinstance(weight, torch.Tensor) else True
        module.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=trainable)
    module.bias.data += delta


def add_at(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor) -> None:
    """``weight[rows][:, cols] += delta`` in place (``rows`` and ``cols`` without repeats,
    ``delta`` shaped ``(len(rows), len(cols), *weight.shape[2:])``): a reconstruction's
    update of the rows that :meth:`LayerPruner.removed_weights` gave. Where the weight is a
    contiguous matrix (a linear layer's, a 1x1 convolution's) the rows are gathered, added
    to and written back (one addition per entry, as ``index_put_(accumulate=True)`` makes
    it, whose serial kernel was 2-3x slower: 768 x 3072 at half the rows and columns 2.8 ->
    1.1 ms at one thread); otherwise by ``index_put_``."""
    if not weight.is_contiguous() or math.prod(weight.shape[2:]) != 1:
        weight.index_put_((rows[:, None], cols[None, :]), delta, accumulate=True)
        return
    matrix = weight.view(weight.shape[0], weight.shape[1])
    part = matrix.index_select(0, rows)
    part.index_add_(1, cols, delta.reshape(len(rows), len(cols)))
    matrix.index_copy_(0, rows, part)


def at_rows(values: torch.Tensor, rows: torch.Tensor | None, size: int) -> torch.Tensor:
    """``values`` placed at ``rows`` of a zero vector of ``size`` (``values`` itself where
    ``rows`` is ``None``): a bias update for the rows that :meth:`LayerPruner.removed_weights`
    gave."""
    if rows is None:
        return values
    return values.new_zeros(size).index_copy_(0, rows, values)


def slice_params(module: nn.Module, keep: Mapping[str, torch.Tensor], plan: Mapping[str, Any]) -> None:
    """Slice several tensors of ``module``: ``plan`` maps a slice name to
    ``[(attr, dim), ...]``."""
    for slice_name, idx in keep.items():
        for attr, dim in plan.get(slice_name, ()):
            replace_param(module, attr, dim, idx)
