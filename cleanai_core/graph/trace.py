"""Record one forward pass: every ATen operation and every claimed-module call.

The recorder runs the model once under a ``TorchDispatchMode``. Each tensor that
flows gets a *key*; an operation's outputs always get fresh keys (so in-place ops
create a new version). Calls of claimed modules are recorded as one event and the
operations inside them are not, so a plugin can claim a composite module.

Tracing happens below autograd, at the ATen dispatcher: it needs no gradients, works
under ``torch.no_grad()`` / ``inference_mode`` and sees exact shapes and arguments of
every operation, including those on integer tensors and constants. Convolutions and
matrix products run on the meta device (:mod:`cleanai_core.shapes`): the recording needs
their shapes, not their numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from cleanai_core.model_state import preserved, set_mode
from cleanai_core.runtime import call_model, copied_inputs
from cleanai_core.shapes import _PLAIN, ShapeOnlyMode, map_tensors

__all__ = ["VALUE_NUMEL", "ModuleCall", "OpCall", "Recording", "TRef", "maintenance_reads", "record"]

#: integer tensors up to this many elements keep their values in :attr:`TRef.value`
VALUE_NUMEL = 8
_INT_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


@attrs.define(slots=True, eq=False)
class TRef:
    """A traced tensor: its key, shape and, for a model parameter or buffer, its name."""

    key: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    param: str | None = None
    #: the values of a small integer tensor (at most :data:`VALUE_NUMEL` elements: index
    #: lists such as Falcon's ``[-2]``), flattened; ``None`` for any other tensor
    value: tuple[int, ...] | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _Flow:
    """Flat lists of the traced tensors an event reads and writes (computed once, after
    the recording is complete: propagation asks for them many times)."""

    __slots__ = ()

    @property
    def inputs(self) -> list[TRef]:
        if self._inputs is None:
            self._inputs = self._refs_in((self.args, self.kwargs))
        return self._inputs

    @property
    def outputs(self) -> list[TRef]:
        if self._outputs is None:
            self._outputs = self._refs_in(self.out)
        return self._outputs

    @staticmethod
    def _refs_in(tree: Any) -> list[TRef]:
        return [a for a in tree_flatten(tree)[0] if isinstance(a, TRef)]


@attrs.define(slots=True, eq=False)
class OpCall(_Flow):
    """One ATen operation outside claimed modules."""

    index: int
    op: Any  # torch._ops.OpOverload
    args: tuple
    kwargs: dict
    out: Any
    scope: str  # the innermost module (by name) the op ran in
    _inputs: list[TRef] | None = attrs.field(default=None, init=False, repr=False)
    _outputs: list[TRef] | None = attrs.field(default=None, init=False, repr=False)

    @staticmethod
    def _refs_in(tree: Any) -> list[TRef]:  # ATen arguments: no pytree machinery needed
        acc: list[TRef] = []
        _collect_refs(tree, acc)
        return acc


@attrs.define(slots=True, eq=False)
class ModuleCall(_Flow):
    """One call of a claimed module."""

    index: int
    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    out: Any
    _inputs: list[TRef] | None = attrs.field(default=None, init=False, repr=False)
    _outputs: list[TRef] | None = attrs.field(default=None, init=False, repr=False)


def _collect_refs(obj: Any, acc: list[TRef]) -> None:
    if isinstance(obj, TRef):
        acc.append(obj)
    elif isinstance(obj, (tuple, list)):
        for a in obj:
            _collect_refs(a, acc)
    elif isinstance(obj, dict):
        for a in obj.values():
            _collect_refs(a, acc)


@attrs.define(eq=False)
class Recording:
    events: list[OpCall | ModuleCall]
    inputs: list[TRef]
    output: Any  # pytree of TRef
    #: where the training-mode pass begins in :attr:`events` (see :func:`record`), else None
    train_from: int | None = None
    train_output: Any = None  # that pass's output (pytree of TRef)
    #: the outputs of every call of the ``watched`` modules of :func:`record`, by name
    module_outputs: dict[str, list[TRef]] = attrs.field(factory=dict)
    #: the plain ints handed to each unclaimed module's ``forward`` (``self.attn(x, heads)``)
    call_numbers: dict[str, set[int]] = attrs.field(factory=dict)

    def outputs(self) -> list[TRef]:
        """Every traced output, the training-mode pass's too."""
        return [r for r in tree_flatten((self.output, self.train_output))[0] if isinstance(r, TRef)]

    def eval_events(self) -> list[OpCall | ModuleCall]:
        """The events of the eval-mode pass (the forward the oracle, calibration and
        verification run)."""
        return self.events if self.train_from is None else self.events[: self.train_from]


#: ``{function: dim}`` of the splits into a number of sections (``dim`` ``None``: an
#: argument); ``hsplit`` / ``vsplit`` / ``dsplit`` split dim 1 / 0 / 2 (dim 0 for ``hsplit``
#: of a vector)
_SECTIONED: dict[Any, int | None] = {
    torch.tensor_split: None,
    torch.Tensor.tensor_split: None,
    torch.hsplit: 1,
    torch.Tensor.hsplit: 1,
    torch.vsplit: 0,
    torch.Tensor.vsplit: 0,
    torch.dsplit: 2,
    torch.Tensor.dsplit: 2,
}


class _SectionSplits(TorchFunctionMode):
    """``torch.tensor_split(x, n, dim)`` (and ``hsplit`` / ``vsplit`` / ``dsplit`` of ``n``
    sections) recorded as ``x.split(sizes, dim)``, with the same pieces. Below autograd
    these calls are slices with constant bounds (``x[:, 0:4]``, ``x[:, 4:8]``), the same
    record as ``x[:, :4], x[:, 4:8]``, which read fixed channels: the first range stayed
    whole and the second was pruned, while ``tensor_split`` of the pruned width moves its
    bounds (the pieces must shrink alike, as ``chunk``'s do). A split into given indices
    (``tensor_split(x, [5], 1)``) is a fixed range and is left to the slices."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SECTIONED:
            sized = _section_sizes(func, args, kwargs)
            if sized is not None:
                x, sizes, dim = sized
                return torch.split(x, sizes, dim)
        return func(*args, **kwargs)


def _section_sizes(func: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, list[int], int] | None:
    """``(tensor, piece sizes, dim)`` of a split into a number of sections, else ``None``."""
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    rest = list(args[1:])
    sections = (
        rest.pop(0)
        if rest
        else next(
            (kwargs[k] for k in ("sections", "indices_or_sections", "tensor_indices_or_sections") if k in kwargs), None
        )
    )
    if isinstance(sections, torch.Tensor) and sections.ndim == 0 and not sections.is_floating_point():
        sections = int(sections)
    if not isinstance(x, torch.Tensor) or type(sections) is not int or sections < 1:
        return None
    fixed = _SECTIONED[func]
    if fixed is None:
        dim = rest[0] if rest else kwargs.get("dim", 0)
    else:
        dim = 0 if fixed == 1 and x.ndim == 1 else fixed
    if type(dim) is not int or not -x.ndim <= dim < x.ndim:
        return None
    dim %= x.ndim
    q, r = divmod(x.shape[dim], sections)
    return x, [q + 1] * r + [q] * (sections - r), dim


def _may_split_sections(events: list[Any]) -> bool:
    """Whether a recorded ``slice`` ends exactly at its input's width from a start past 0
    (``x[:, a:]`` ends at 2**63 - 1; the last piece of ``tensor_split`` ends at the width):
    only then is the forward recorded again with :class:`_SectionSplits`, whose function
    mode costs about 10% of a recording (EfficientNet-B0's graph build)."""
    for e in events:
        if isinstance(e, OpCall) and e.op is torch.ops.aten.slice.Tensor and len(e.args) >= 4:
            src, dim, start, end = e.args[:4]
            if isinstance(src, TRef) and all(type(v) is int for v in (dim, start, end)) and -src.ndim <= dim < src.ndim:
                if 0 < start < end == src.shape[dim]:
                    return True
    return False


class _Recorder(ShapeOnlyMode):
    def __enter__(self) -> _Recorder:
        self._sections = _SectionSplits() if self.sections else contextlib.nullcontext()
        self._sections.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._sections.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> Any:
        try:
            return super().__exit__(*exc)
        finally:
            self._sections.__exit__(*exc)

    def __init__(self, tensor_names: dict[int, str], sections: bool = False) -> None:
        super().__init__()
        self.sections = sections  # record splits into sections as splits (:class:`_SectionSplits`)
        self.tensor_names = tensor_names
        self.keys: dict[int, int] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique during the trace
        self.events: list[OpCall | ModuleCall] = []
        self.depth = 0
        self.scope: list[str] = [""]
        self.read: set[int] = set()  # ids of the model's own tensors an op read outside claimed modules
        # write guards (:mod:`~cleanai_core.model_state`) of the calls traced: checked per op here
        # rather than as a second Python dispatch mode
        self.write_guards: list[Any] = []

    def ref(self, t: torch.Tensor, new: bool = False) -> TRef:
        ident = id(t)
        key = self.keys.get(ident)
        if key is None or new:
            key = len(self.alive)
            self.alive.append(t)
            self.keys[ident] = key
        value, dtype = None, t.dtype
        if dtype in _INT_DTYPES and t.numel() <= VALUE_NUMEL and t.device.type != "meta":
            value = tuple(t.reshape(-1).tolist())
        name = self.tensor_names.get(ident)
        if name is not None:
            self.read.add(ident)
        return TRef(key, tuple(t.shape), dtype, name, value)

    def refs(self, tree: Any, new: bool = False) -> Any:
        """Module arguments (any pytree: namedtuples, dataclasses...) as references. A
        namedtuple whose constructor checks its fields (``PackedSequence`` reads
        ``batch_sizes.device``) cannot hold references: it becomes a plain tuple."""
        done: dict[int, TRef] = {}

        def one(a: Any) -> Any:
            if not isinstance(a, torch.Tensor):
                return a
            if id(a) not in done:
                done[id(a)] = self.ref(a, new)
            return done[id(a)]

        # most module calls: a tuple of tensors and plain values, and no keywords (a pytree
        # map of each was a fifth of the module hooks' time)
        flat = type(tree) is tuple or type(tree) is dict
        if flat and all(
            isinstance(a, torch.Tensor) or type(a) in _PLAIN for a in (tree.values() if type(tree) is dict else tree)
        ):
            return tuple(map(one, tree)) if type(tree) is tuple else {k: one(v) for k, v in tree.items()}
        try:
            return tree_map(one, tree)
        except Exception:  # each tensor already has its reference in ``done``
            return _plain_map(one, tree)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for guard in self.write_guards:  # the write guard of the traced call, hosted here
            guard.check(func, args, kwargs)
        if self.depth:
            return self.run(func, args, kwargs)
        rargs, rkwargs = map_tensors(self.ref, args), map_tensors(self.ref, kwargs)
        out = self.run(func, args, kwargs)
        rout = map_tensors(self._new_ref, out)
        self.events.append(OpCall(len(self.events), func, rargs, rkwargs, rout, self.scope[-1]))
        return out

    def _new_ref(self, t: torch.Tensor) -> TRef:
        return self.ref(t, new=True)


def _plain_map(fn: Callable[[Any], Any], obj: Any) -> Any:
    """``fn`` over the leaves of tuples, lists and dicts; a namedtuple whose constructor
    refuses the mapped fields becomes a plain tuple."""
    if isinstance(obj, dict):
        return {k: _plain_map(fn, v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain_map(fn, a) for a in obj]
    if isinstance(obj, tuple):
        items = [_plain_map(fn, a) for a in obj]
        try:
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        except Exception:
            return tuple(items)
    return fn(obj)


def record(
    model: nn.Module,
    example_inputs: Any,
    claimed: dict[nn.Module, str],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    output_transform: Callable[[Any], Any] | None = None,
    names: Iterable[tuple[str, nn.Module]] | None = None,
    watched: Iterable[str] = (),
    sections: bool = False,
) -> Recording:
    """Run ``model`` once on ``example_inputs`` (in eval mode, restored afterwards) and
    record its dataflow.

    :param claimed: modules traced as one event (claimed by a layer pruner or opaque).
    :param forward_fn: ``forward_fn(model, example_inputs)``; default calls the model
        with a tensor, a tuple (positional) or a dict (keywords).
    :param output_transform: maps the model output to the tensors that matter
        (e.g. ``lambda out: out.logits``).
    :param watched: names of unclaimed modules whose outputs to note
        (:attr:`Recording.module_outputs`).
    :param sections: record ``tensor_split`` into sections as a split
        (:class:`_SectionSplits`); without it, a recording where such a split may have run
        (:func:`_may_split_sections`) is made again with it.
    """
    names = list(names) if names is not None else None  # a generator is read once per recording
    watched, given = list(watched), example_inputs  # a forward may change the copy it runs on
    tensor_names: dict[int, str] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        tensor_names.setdefault(id(p), pname)
    for bname, b in model.named_buffers(remove_duplicate=False):
        tensor_names.setdefault(id(b), bname)
    rec = _Recorder(tensor_names, sections)
    handles = []
    siblings = _sibling_sets(model)
    first_calls: dict[int, list[Any]] = {}  # sibling set -> [module, args, kwargs, output] of its first call
    ran: set[int] = set()

    numbers: dict[str, set[int]] = {}

    def pre(module: nn.Module, args: tuple, kwargs: dict, name: str) -> None:
        rec.scope.append(name)
        if rec.depth == 0 and module not in claimed:
            ints = {a for a in (*args, *kwargs.values()) if type(a) is int}
            if ints:
                numbers.setdefault(name, set()).update(ints)
        if module in siblings:
            ran.add(id(module))
            first_calls.setdefault(siblings[module], [module, args, kwargs, None])
        if module in claimed:
            if rec.depth == 0:
                rec.events.append(ModuleCall(len(rec.events), name, module, rec.refs(args), rec.refs(kwargs), None))
            rec.depth += 1

    watched = set(watched)
    noted: dict[str, list[TRef]] = {}

    def post(module: nn.Module, args: tuple, kwargs: dict, out: Any, name: str) -> None:
        rec.scope.pop()
        if name in watched and rec.depth == 0:
            noted.setdefault(name, []).extend(r for r in tree_flatten(rec.refs(out))[0] if isinstance(r, TRef))
        if module in siblings and (first := first_calls[siblings[module]])[0] is module and first[3] is None:
            first[3] = out
        if module in claimed:
            rec.depth -= 1
            if rec.depth == 0:
                call = next(e for e in reversed(rec.events) if isinstance(e, ModuleCall) and e.module is module)
                call.out = rec.refs(out, new=True)
                call._outputs = None

    for name, module in names if names is not None else model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, k, n=name: pre(m, a, k, n), with_kwargs=True))
        handles.append(module.register_forward_hook(lambda m, a, k, o, n=name: post(m, a, k, o, n), with_kwargs=True))
    try:
        # eval mode, and every module's mode, buffers (BatchNorm, quantization observers) and
        # attributes put back afterwards: tracing leaves the user's model as it was
        with preserved(model), torch.no_grad():
            example_inputs = copied_inputs(example_inputs)  # a forward changing its input in place changes a copy
            leaves = tree_flatten(example_inputs)[0]
            input_refs = [rec.ref(t) for t in leaves if isinstance(t, torch.Tensor)]
            with rec:
                out = call_model(model, example_inputs, forward_fn, copy=False)
                _run_unrun_siblings(rec, siblings, first_calls, ran)
                if output_transform is not None:  # traced: what it computes (a pooled map) is an output too
                    out = transformed(output_transform, out)
            if output_transform is None and hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
                out = out.logits
            out_refs = tree_map(lambda a: rec.ref(a) if isinstance(a, torch.Tensor) else a, _plain(out))
            train_from, train_refs = _training_pass(rec, model, example_inputs, claimed, forward_fn, output_transform)
    finally:
        for h in handles:
            h.remove()
    if not sections and _may_split_sections(rec.events):
        return record(model, given, claimed, forward_fn, output_transform, names, watched, sections=True)
    return Recording(rec.events, input_refs, out_refs, train_from, train_refs, noted, numbers)


def _training_pass(
    rec: _Recorder, model: nn.Module, inputs: Any, claimed: dict[nn.Module, str], forward_fn, output_transform
) -> tuple[int | None, Any]:
    """Record the forward once more in training mode when parameters never took part in
    the eval pass and training mode reads one of them:

    - claimed layers that never ran in eval mode: layers only a training forward uses
      (GoogLeNet's and Inception-v3's auxiliary classifiers on a stream of the main path).
      Before session 20 their inputs were left whole while the stream they read shrank,
      and ``model.train()`` then failed ("expected input[2, 256, 4, 4] to have 512
      channels");
    - bare parameters no operation read in eval mode: wav2vec2-style speech encoders'
      ``masked_spec_embed`` (a vector of the hidden width written over the masked time
      steps in training only). Before session 21 it kept its width while the hidden size
      shrank, and a training step of the pruned model failed ("value tensor of shape [32]
      cannot be broadcast to indexing result of shape [20, 16]").

    Their couplings join the eval pass's, so the pruned model still trains. A training
    forward that fails on the example inputs runs again on them enlarged
    (:data:`TRAINING_PASS_SCALES`: layers that need a larger image, as Inception-v3's
    auxiliary head does); one that fails at every size (detection models want targets) or
    reaches none of them is dropped. ``(index of its first event, its output)``, or
    ``(None, None)``."""
    called = {e.module for e in rec.events if isinstance(e, ModuleCall)}
    missed = {m for m in claimed if m not in called and any(True for _ in m.parameters(recurse=False))}
    covered = {id(p) for m in called for p in m.parameters()} | rec.read
    unread = {id(p) for p in model.parameters() if id(p) not in covered} - {
        id(p) for m in missed for p in m.parameters()
    }
    if not missed and not unread:
        return None, None
    start = len(rec.events)
    read_before = set(rec.read)
    cuda = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    for scale in TRAINING_PASS_SCALES:
        given = inputs if scale == 1 else _enlarged(inputs, scale)
        ran = False
        if given is None:
            break
        # dropout's draws leave the user's random streams alone
        with torch.random.fork_rng(devices=cuda):
            try:
                set_mode(model, True)
                with rec:
                    out = call_model(model, given, forward_fn, copy=False)
                    if output_transform is not None:
                        out = output_transform(out)
                reached = any(isinstance(e, ModuleCall) and e.module in missed for e in rec.events[start:])
                if reached or (unread & (rec.read - read_before)):
                    return start, tree_map(lambda a: rec.ref(a) if isinstance(a, torch.Tensor) else a, _plain(out))
                ran = True  # and reached none of them: a larger input would not either
            except Exception:
                pass
            finally:
                set_mode(model, False)
                rec.depth, rec.scope = 0, [""]
        del rec.events[start:]
        if ran:
            break
    return None, None


#: the training pass runs on the example inputs, and where that fails on images enlarged this
#: many times on each side: Inception-v3's auxiliary classifier pools 5 x 5 over a 17 x 17
#: map, which only inputs of 299 px give; traced on 75 px the pass failed, was dropped, and
#: the pruned model failed in training mode (its aux head kept every input channel)
TRAINING_PASS_SCALES = (1, 2, 4)
#: no enlarged side longer than this (a pass that failed at 224 px is not tried at 896)
TRAINING_PASS_MAX_SIDE = 640


def _enlarged(inputs: Any, scale: int) -> Any:
    """``inputs`` with every floating-point tensor of 4 or 5 dimensions (images, videos:
    ``(N, C, H, W)``, ``(N, C, T, H, W)``) repeated ``scale`` times along its last two
    dimensions (nearest-neighbour upsampling); ``None`` where there is none or a side would
    exceed :data:`TRAINING_PASS_MAX_SIDE`."""

    def image(a: Any) -> bool:
        return isinstance(a, torch.Tensor) and a.is_floating_point() and a.ndim in (4, 5)

    images = [a for a in tree_flatten(inputs)[0] if image(a)]
    if not images or any(max(a.shape[-2:]) * scale > TRAINING_PASS_MAX_SIDE for a in images):
        return None
    return tree_map(
        lambda a: a.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2) if image(a) else a, inputs
    )


def _sibling_sets(model: nn.Module) -> dict[nn.Module, int]:
    """``{module: set id}`` of the members of every ``nn.ModuleList`` / ``nn.ModuleDict``
    that has other members of the same class with parameters of the same shapes (the
    experts of a routed mixture held one module each: NLLB-MoE, Switch Transformers)."""
    out: dict[nn.Module, int] = {}
    for container in model.modules():
        if not isinstance(container, (nn.ModuleList, nn.ModuleDict)):
            continue
        sets: dict[tuple, list[nn.Module]] = {}
        for child in container.children():
            shapes = tuple(tuple(p.shape) for p in child.parameters())
            if shapes:
                sets.setdefault((type(child), shapes), []).append(child)
        for members in sets.values():
            if len(members) > 1:
                out.update(dict.fromkeys(members, id(members[0])))
    return out


def _run_unrun_siblings(
    rec: Any, siblings: dict[nn.Module, int], first_calls: dict[int, list[Any]], ran: set[int]
) -> None:
    """Run each member of a sibling set that the example inputs did not reach (a routed
    expert no token went to) on its first sibling's input, and add its output to that
    sibling's, so that the trace couples it as the routing would: it prunes like its
    siblings instead of keeping its width while the config key it shares is rewritten."""
    for module, key in siblings.items():
        first = first_calls.get(key)
        if id(module) in ran or first is None or not isinstance(first[3], torch.Tensor):
            continue
        mark = (len(rec.events), rec.depth, len(rec.scope))
        try:
            extra = module(*first[1], **first[2])
        except Exception:  # noqa: BLE001 - a member that cannot take its sibling's input stays unrun
            del rec.events[mark[0] :], rec.scope[mark[2] :]
            rec.depth = mark[1]
            continue
        if isinstance(extra, torch.Tensor) and extra.shape == first[3].shape:
            _ = first[3] + extra  # recorded: couples the two outputs' channels


def maintenance_reads(recording: Recording) -> set[int]:
    """Keys of the model's parameters and buffers read only to maintain themselves: every
    op that reads them (and what it makes, transitively) reaches neither the model's output
    nor a module call nor a write into another tensor; it may write back into a parameter
    or buffer (WGAN's ``for p in self.parameters(): p.data.clamp_(-c, c)``, a max-norm
    step, a norm kept as an attribute). Such a read constrains no channel."""
    outputs = {r.key for r in recording.outputs()}
    params: set[int] = set()
    whole = set()  # keys of parameters and of their whole aliases (``p.data``, ``p.detach()``)
    for e in recording.events:
        params.update(r.key for r in e.inputs if r.param is not None)
        whole.update(r.key for r in e.inputs if r.param is not None)
        if isinstance(e, OpCall) and e.op.overloadpacket.__name__ in ("detach", "alias") and e.inputs:
            if e.inputs[0].key in whole:
                whole.update(o.key for o in e.outputs)
    live = set(outputs)
    for event in reversed(recording.events):
        if (
            isinstance(event, ModuleCall)
            or _writes_elsewhere(event, whole)
            or any(o.key in live for o in event.outputs)
        ):
            live.update(r.key for r in event.inputs)
    return params - live


def _writes_elsewhere(event: OpCall, whole: set[int]) -> bool:
    """Whether ``event`` writes into a tensor that is not a parameter or buffer of the model
    (or a whole alias of one, ``whole``); an op PyTorch does not describe counts as writing
    anywhere."""
    schema = getattr(event.op, "_schema", None)
    if schema is None:
        return True
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            t = event.args[i] if i < len(event.args) else event.kwargs.get(a.name)
            if not (isinstance(t, TRef) and t.key in whole):
                return True
    return False


def transformed(output_transform: Callable[[Any], Any], out: Any) -> Any:
    """``output_transform(out)``; its failure is a :class:`UserError` naming it and what it
    got (it was blamed on the example inputs: "the model failed to run on the example
    inputs while tracing: IndexError: too many indices for tensor")."""
    from cleanai_core.errors import CleanAIError, UserError

    try:
        return output_transform(out)
    except CleanAIError:
        raise
    except Exception as exc:
        got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise UserError(
            f"output_transform failed on the model's output, {got} ({type(exc).__name__}: {str(exc)[:200]}); it "
            "gets what the model's forward (or forward_fn) returns and must return the tensor(s) to keep."
        ) from exc


def _plain(out: Any) -> Any:
    """Dataclass-like outputs (HuggingFace ``ModelOutput``) as tuples of their tensors."""
    if isinstance(out, (torch.Tensor, tuple, list, dict)) or out is None:
        return out
    if hasattr(out, "to_tuple"):
        return out.to_tuple()
    if hasattr(out, "__dataclass_fields__"):
        return tuple(getattr(out, f) for f in out.__dataclass_fields__)
    return out
