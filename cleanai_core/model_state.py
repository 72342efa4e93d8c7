"""Leave the user's model exactly as it was after CleanAI ran it.

Glossary:

- *mode*: a module's own ``training`` flag. A frozen BatchNorm (eval) inside a model in
  training mode has its own mode, and so does every module inside ``nn.DataParallel``.
- *state*: what a forward pass may change besides the output: buffers written in place
  (BatchNorm running statistics in train mode, quantization observers' ``min_val`` /
  ``max_val`` / histograms and fake-quant ``scale`` / ``zero_point``, which update even in
  eval mode), buffers replaced by new tensors, plain attributes a forward sets, hooks a
  forward registers (transformers installs its output-capturing hooks on the first call
  that asks for ``output_hidden_states`` and marks the model with an attribute), and
  parameters or tensor attributes a forward writes in place (weight clipping
  ``self.weight.data.clamp_(-c, c)``, ``nn.Embedding(max_norm=...)``'s renormalisation, a
  counter kept as a plain tensor attribute).
- *model hooks*: hooks that are part of how the model computes, not the user's: torch's
  own (quantization observers), bound methods of an object a module holds (timm's
  ``FeatureHooks``), and hooks an installed library registers on its own modules
  (transformers' output capture). A copy of the model keeps them; the user's are dropped.
- *write guard*: copy-on-write for those parameters and tensor attributes. A parameter is
  not copied up front (that would double a large model's memory at every run): while
  :func:`call_model <cleanai_core.runtime.call_model>` runs the model inside
  :func:`preserved`, a dispatch mode sees every op that writes a tensor and copies a
  protected tensor once, before its first write. The mode costs some 12% of a forward, so
  only the block's first call runs under it, and every call after it only where that
  first call wrote something (a model that clips its weights does so at every call). A
  model whose guarded call wrote nothing is remembered as such (:data:`_WRITES_NOTHING`,
  for as long as it lives), and so are the copies :func:`copy_model` makes of it: later
  blocks run it without the guard. The guard on every verification forward made a
  data-free ``prune()`` of EfficientNet-B0 30% slower (155 -> 200 ms at one thread).

:func:`preserved` runs a block with the model in eval mode and puts every module's mode,
buffers and plain attributes back afterwards, also when the block raises. Buffers are
restored into the very tensor objects the user holds (their values, and their shape where
an observer resized one), so references to them stay valid.

:func:`copy_model` is ``copy.deepcopy`` for models a forward pass ran on with gradients:
tensors the forward left on a module (RAFT's ``corr_pyramid``, attention maps kept for
plotting) are not graph leaves, and ``deepcopy`` refuses them.
"""

from __future__ import annotations

import copy
import copyreg
import functools
import operator
import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode

from cleanai_core.errors import UserError
from cleanai_core.out_folder import signals_deferred

__all__ = [
    "HOOK_ATTRIBUTES",
    "NO_STORAGE",
    "copy_model",
    "copy_tensor",
    "drop_user_hooks",
    "from_library",
    "holds_history",
    "layout_change",
    "layout_of",
    "preserved",
    "reads_preserved",
    "state_with_versions",
    "round_through",
    "set_mode",
    "state_copy",
    "stored_in",
    "transplant",
    "user_hooks",
    "user_hooks_off",
    "warn_user_hooks",
    "writes_guarded",
    "writes_nothing",
]

#: a module's hook tables (``_forward_hooks``, ``_forward_pre_hooks``, ...): the user's
#: ``RemovableHandle`` objects point at these very dicts
HOOK_ATTRIBUTES = frozenset(k for k in nn.Module().__dict__ if "hook" in k)
_TABLES = frozenset({"_parameters", "_buffers", "_modules"}) | HOOK_ATTRIBUTES
#: the tables of hooks that run with a forward or backward pass, and the id sets beside them
_CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


class _Snapshot:
    """Modes, buffers (object and a copy of its values), plain attributes and parameters
    (object, its data and version) of every module.

    A snapshot is taken around every forward CleanAI runs on a model (four in a data-free
    ``prune()``), so it keeps per module only what differs from the common case: a module
    without buffers, parameters, children or hooks shares one empty table with every
    other, and modules whose ``__dict__`` has the same keys share one getter. Fewer
    objects made is less time, and fewer objects for the garbage collector's passes, whose
    full pass over torch's heap costs 0.2 s (one every few ``prune()`` calls in a loop)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.buffers = [
            {k: (b, b.detach().clone()) for k, b in bufs.items() if isinstance(b, torch.Tensor)}
            if (bufs := m._buffers)
            else _EMPTY_DICT
            for m in self.modules
        ]
        # per module: its plain attributes' names (with a getter of their values in that
        # order) and the values, and how many entries its ``__dict__`` had: :meth:`restore`
        # checks a module with two C-level calls where nothing changed (nearly always), not
        # one per attribute
        self.attr_check = [_attr_check(m.__dict__) for m in self.modules]
        # the entries of the parameter, buffer and module tables: a forward that registers a
        # buffer (a rotary cache grown for a longer input) or builds a layer on its first call
        # (``self.head = nn.Linear(...)``) left it in the user's model
        self.tables = [
            (
                dict(m._parameters) if m._parameters else _EMPTY_DICT,
                frozenset(m._buffers) if m._buffers else _NO_IDS,
                dict(m._modules) if m._modules else _EMPTY_DICT,
            )
            for m in self.modules
        ]
        # the hook ids of every module: a forward that registers a hook (transformers' output
        # capture, installed once per model behind an attribute this snapshot removes again)
        # left it in the user's model, and each later run added one more
        self.hooks = [_hook_ids(m) for m in self.modules]  # the order of _CALL_HOOKS
        self.module_ids = {id(m) for m in self.modules}
        # parameters (their data: a forward may assign ``p.data = ...``, and their version:
        # a write the guard did not see), as (module, name, parameter, data, version); the
        # tensors the guard protects are found only when a guard runs (:attr:`guarded`)
        self.params: dict[int, tuple[nn.Module, str, torch.Tensor, torch.Tensor, int]] = {}
        for m in self.modules:
            for k, p in m._parameters.items():
                if isinstance(p, torch.Tensor) and id(p) not in self.params:
                    self.params[id(p)] = (m, k, p, p.data, _version(p))
        self._guarded: dict[int, list[torch.Tensor]] | None = None
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # written: (tensor, values before)
        self.probed = False  # a guarded call ran

    @property
    def guarded(self) -> dict[int, list[torch.Tensor]]:
        """The parameters and plain tensor attributes by the storage they are written
        through (``p.data.clamp_()`` writes another tensor object than ``p``)."""
        if self._guarded is None:
            self._guarded = {}
            tensors = [p for _, _, p, _, _ in self.params.values()]
            tensors += [
                v
                for _, _, _, values in self.attr_check
                for v in values
                if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)
            ]
            for t in tensors:
                key = _storage_key(t)
                if key is not None:
                    self._guarded.setdefault(key, []).append(t)
        return self._guarded

    @property
    def wants_guard(self) -> bool:
        """Whether the next call runs under the write guard: the first, and every one after
        a call that wrote a protected tensor."""
        return (not self.probed or bool(self.saved)) and bool(self.guarded)

    def save(self, key: int) -> None:
        """Copy the tensors written through storage ``key`` before their first write."""
        for t in self.guarded.get(key, ()):
            if id(t) not in self.saved:
                self.saved[id(t)] = (t, t.detach().clone())

    def restore(self) -> None:
        with torch.no_grad():
            self._restore_params()
            for m, bufs, tables, check in zip(self.modules, self.buffers, self.tables, self.attr_check, strict=True):
                state = m.__dict__
                if not _same_attrs(state, check):
                    keys, values = check[0], check[3]
                    for key, value in zip(keys, values, strict=True):
                        if state.get(key, _MISSING) is not value:
                            state[key] = value  # includes ``training``
                    for key in state.keys() - set(keys) - _TABLES:
                        del state[key]  # set by a forward
                params, buffer_names, modules = tables
                _put_table(m._parameters, params)
                _put_table(m._modules, modules)
                for key in m._buffers.keys() - buffer_names:
                    del m._buffers[key]  # registered by a forward
                for key, (obj, saved) in bufs.items():
                    _put_back(obj, saved)
                    m._buffers[key] = obj
            for m, hooks in zip(self.modules, self.hooks, strict=True):
                _drop_new_hooks(m, hooks)

    def _restore_params(self) -> None:
        """Put back parameters and tensor attributes a forward wrote in place, and the data
        of parameters a forward replaced (``p.data = ...``); warn about a parameter written
        where the guard did not run (a later call took another path than the first)."""
        lost = [
            (m, k)
            for m, k, p, _, version in self.params.values()
            if id(p) not in self.saved and version != _version(p) and p.data_ptr() != 0
        ]
        for _, _, p, data, _ in self.params.values():
            if p.data_ptr() != data.data_ptr() or p.shape != data.shape or p.dtype != data.dtype:
                p.data = data
        for obj, saved in self.saved.values():
            _put_back(obj, saved)
        if lost:
            names = {id(m): f"{n}." if n else "" for n, m in self.modules[0].named_modules(remove_duplicate=True)}
            lost = [names.get(id(m), "") + k for m, k in lost]
            warnings.warn(
                f"the model's forward wrote its parameter(s) {', '.join(lost[:5])} in place on a call after the "
                "first, which had written none, so CleanAI kept no copy of them and they keep the values the "
                "forward gave them. Write weights outside forward (e.g. clip them after the optimizer step) "
                "or keep the write on every call",
                RuntimeWarning,
                stacklevel=4,
            )


def _drop_new_hooks(m: nn.Module, saved: tuple[frozenset, ...]) -> None:
    """Remove the hooks registered on ``m`` since ``saved`` (its hook ids per table)."""
    for table, ids in zip(_CALL_HOOKS, saved, strict=True):
        hooks = getattr(m, table)
        if not hooks or (len(hooks) == len(ids) and all(k in ids for k in hooks)):
            continue
        for key in [k for k in hooks if k not in ids]:
            del hooks[key]
            for flags in _HOOK_FLAGS:
                getattr(m, flags, {}).pop(key, None)


_EMPTY_DICT: dict = {}  # shared by every module with an empty table: never written
_NO_IDS: frozenset = frozenset()
_NO_HOOKS = (_NO_IDS,) * len(_CALL_HOOKS)


def _hook_ids(m: nn.Module) -> tuple[frozenset, ...]:
    """The ids of ``m``'s hooks per table of :data:`_CALL_HOOKS`."""
    tables = m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks
    if not any(tables):
        return _NO_HOOKS
    return tuple(frozenset(t) if t else _NO_IDS for t in tables)


@functools.lru_cache(maxsize=4096)
def _getter(keys: tuple[str, ...]) -> Callable[[dict], tuple]:
    """A function giving the values of ``keys`` in a dict as a tuple (``KeyError`` where
    one is missing); one per set of names (every ``Conv2d`` has the same)."""
    if len(keys) == 1:
        key = keys[0]
        return lambda d: (d[key],)
    return operator.itemgetter(*keys) if keys else lambda d: ()


def _attr_check(state: dict[str, Any]) -> tuple[tuple[str, ...], int, Callable[[dict], tuple], tuple]:
    """A module's plain attributes (those of its ``__dict__`` outside :data:`_TABLES`):
    ``(names, size of the dict, getter of their values, values)``."""
    keys = tuple(k for k in state if k not in _TABLES)
    values_of = _getter(keys)
    return keys, len(state), values_of, values_of(state)


def _same_attrs(state: dict[str, Any], check: tuple[tuple[str, ...], int, Callable[[dict], tuple], tuple]) -> bool:
    """Whether a module's ``__dict__`` holds the very objects it held at the snapshot
    (``check``: see :func:`_attr_check`) and no other entry."""
    _, size, values_of, values = check
    if len(state) != size:
        return False
    try:
        now = values_of(state)
    except KeyError:
        return False
    return all(map(operator.is_, now, values))


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return -1


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta, sparse or wrapper tensors
        return None
    return ptr or None


#: the snapshots of the :func:`preserved` blocks now open (innermost last)
_OPEN: ContextVar[tuple[_Snapshot, ...]] = ContextVar("cleanai_preserved", default=())


class _WriteGuard(TorchDispatchMode):
    """Copy-on-write for the open snapshots' parameters and tensor attributes: an op that
    writes a tensor whose storage one of them holds copies that tensor first."""

    def __init__(self, snaps: list[_Snapshot]) -> None:
        super().__init__()
        self.snaps = snaps
        self.wrote = False  # a protected tensor was written during this call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.check(func, args, kwargs)
        return func(*args, **kwargs)

    def check(self, func: Any, args: tuple, kwargs: dict) -> None:
        """Copy what ``func`` is about to write of the protected tensors (an ATen op about to
        run on ``args`` / ``kwargs``); a dispatch mode that hosts the guard calls it per op."""
        if _WRITES.get(func) == ():  # an op known to write none of its arguments: most of them
            return
        for t in _written(func, args, kwargs):
            key = _storage_key(t)
            if key is not None and any(key in s.guarded for s in self.snaps):
                self.wrote = True
                with _disable_current_modes(), torch.no_grad():
                    for s in self.snaps:
                        s.save(key)


#: per ATen op, the positions and names of the arguments it writes (``Tensor(a!)``)
_WRITES: dict[Any, tuple[tuple[int, str], ...]] = {}


def _written(func: Any, args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    spots = _WRITES.get(func)
    if spots is None:
        spots = _WRITES[func] = tuple(
            (i, a.name)
            for i, a in enumerate(func._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write
        )
    for i, name in spots:
        value = args[i] if i < len(args) else kwargs.get(name)
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


#: models a guarded call found writing none of their tensors, and copies of them
#: (:func:`copy_model`): their later calls run without the guard
_WRITES_NOTHING: weakref.WeakSet[nn.Module] = weakref.WeakSet()
#: copies (:func:`copy_model`) of models not known to write nothing when copied -> their source
_COPY_OF: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def writes_nothing(model: nn.Module) -> bool:
    """Whether ``model`` is known to write none of its tensors in forward: a guarded call of
    it, or of the model it was copied from (before or after the copy), wrote nothing. A
    pruned copy is made before the original's first real call (the trace's proves nothing),
    and its own first call ran under the guard: 3 ms of a data-free ``prune()`` of
    EfficientNet-B0 on a model pruned for the first time."""
    seen = 0
    while model is not None and seen < 64:  # a copy of a copy of ...: a short chain
        if model in _WRITES_NOTHING:
            return True
        ref = _COPY_OF.get(model)
        model = ref() if ref is not None else None
        seen += 1
    return False


def writes_guarded(model: nn.Module) -> Any:
    """The context a call of ``model`` runs in (:func:`~cleanai_core.runtime.call_model`):
    the write guard where an open :func:`preserved` block holds ``model`` and wants it, and
    ``model`` is not known to write nothing (:func:`writes_nothing`)."""
    opened = [s for s in _OPEN.get() if id(model) in s.module_ids]
    if not opened or (writes_nothing(model) and not any(s.saved for s in opened)):
        return nullcontext()
    snaps = [s for s in opened if s.wants_guard]
    return _guarded_call(model, snaps) if snaps else nullcontext()


@contextmanager
def _guarded_call(model: nn.Module, snaps: list[_Snapshot]) -> Iterator[None]:
    # under another dispatch mode (the trace runs its ops on the meta device) a write may
    # not reach the real tensors: such a call tells nothing about the model's own runs
    real = torch._C._len_torch_dispatch_stack() == 0
    params = [(p, p.data_ptr()) for p in model.parameters()] if real else []
    guard = _WriteGuard(snaps)
    # a dispatch mode already running every op in Python (the trace's recorder) checks the
    # writes itself (its ``write_guards``): a second Python mode on every op of the trace was
    # 5 ms of a first data-free prune() of EfficientNet-B0 at one thread
    host = None if real else _get_current_dispatch_mode()
    hosted = isinstance(getattr(host, "write_guards", None), list)
    clean = False
    try:
        if hosted:
            host.write_guards.append(guard)
            try:
                yield
            finally:
                host.write_guards.remove(guard)
        else:
            with guard:
                yield
        # nothing written in place, and no parameter's data replaced (``p.data = ...``)
        clean = real and not guard.wrote and all(p.data_ptr() == ptr for p, ptr in params)
    finally:
        for s in snaps:
            s.probed = True
        if clean:
            _WRITES_NOTHING.add(model)


def _put_table(table: dict[str, Any], saved: dict[str, Any]) -> None:
    """Make a module's parameter or module table hold ``saved``'s entries again (an entry a
    forward added is dropped, one it replaced put back); untouched, it is not written."""
    if not table and not saved:
        return
    if table.keys() == saved.keys() and all(table[k] is v for k, v in saved.items()):
        return
    for key in table.keys() - saved.keys():
        del table[key]
    for key, value in saved.items():
        if table.get(key, _MISSING) is not value:
            table[key] = value


_MISSING = object()


def _put_back(obj: torch.Tensor, saved: torch.Tensor) -> None:
    """Write ``saved`` into ``obj`` where they differ (values, or the shape an observer
    resized); an untouched buffer is not written (its version counter stays). A sparse
    buffer (a graph's adjacency for ``torch.sparse.mm``) has no ``equal`` / ``set_``: it is
    copied back, which costs its stored entries only."""
    if obj.layout != torch.strided:
        obj.copy_(saved)
    elif obj.shape != saved.shape or obj.device != saved.device:
        obj.set_(saved.to(obj.device))
    elif torch.equal(obj, saved):  # one call for what is nearly always so
        return
    elif not bool(((obj == saved) | (torch.isnan(obj) & torch.isnan(saved))).all()):
        obj.copy_(saved)


def set_mode(model: nn.Module, training: bool = False) -> nn.Module:
    """``model.train(training)``, also for a module that refuses to switch: torch.export's
    ``ExportedProgram.module()`` raises ``NotImplementedError`` from ``eval()`` and
    ``train()`` (its mode was fixed when it was exported, its graph ignores the flags), so
    its modules' flags are set directly. Before 2026-12-02 tracing, scoring and
    verification stopped there with "Calling eval() is not supported yet"."""
    try:
        model.train(training)
    except NotImplementedError:
        for m in model.modules():
            m.training = training
    return model


@contextmanager
def preserved(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Run the block (in eval mode unless ``eval_mode=False``) and restore every module's
    mode, buffers, attributes and the parameters a forward wrote (see the write guard in
    the module doc) afterwards, also on error or Ctrl-C."""
    snap = _Snapshot(model)
    if eval_mode and not _in_eval(model, snap.modules):
        set_mode(model, False)
    token = _OPEN.set((*_OPEN.get(), snap))
    try:
        yield model
    finally:
        try:
            _OPEN.reset(token)
        except ValueError:  # left in another context than it was entered in
            _OPEN.set(tuple(s for s in _OPEN.get() if s is not snap))
        snap.restore()


def reads_preserved(model: nn.Module) -> Any:
    """:func:`preserved` for a block that reads ``model``'s tensors between its runs (a
    plugin's scan, the scores, the copies), where such a read can change it: some module
    is in training mode (a ``spectral_norm`` weight read in training mode runs a power
    iteration that rewrites ``_u`` / ``_v``). A model all in eval mode is read as it is,
    with no snapshot: the blocks that run it keep their own. Four snapshots more, for
    nothing, made a data-free ``prune()`` of EfficientNet-B0 15% slower."""
    if _in_eval(model, list(model.modules())):
        return nullcontext(model)
    return preserved(model)


def _in_eval(model: nn.Module, modules: list[nn.Module]) -> bool:
    """Whether ``model.eval()`` would change nothing: every module is in eval mode already
    and none overrides ``train`` (or the model ``eval``). Setting 340 flags through
    ``nn.Module.__setattr__`` was 0.6 ms of each of a ``prune()``'s three runs."""
    if type(model).eval is not nn.Module.eval:
        return False
    return not any(m.training or type(m).train is not nn.Module.train for m in modules)


def transplant(target: nn.Module, source: nn.Module) -> None:
    """Make ``target`` the model ``source`` is, module by module (for in-place pruning):
    each module of ``target`` takes the state of its namesake in ``source``, keeping its
    own hook tables, so the user's hook handles stay valid. Ctrl-C and SIGTERM wait for the
    end: one that came mid-way left the user's model half pruned (a conv sliced, its
    BatchNorm not), a model that no longer ran.

    Every parameter stays the object the user holds (:func:`_kept_parameters`): its values
    and shape become the pruned ones, so the optimizer built over ``model.parameters()``,
    the hooks registered on a tensor and the names bound to it keep reaching the model (new
    ``Parameter`` objects left the user's optimizer stepping tensors the model no longer
    used: training went on and the model never changed)."""
    mine = dict(target.named_modules())
    # the objects whose methods the kept hook tables call (timm's FeatureHooks, which the
    # forward then reads the features from) stay too: the copy's got none of those calls
    owners = {id(_owner(fn)) for m in mine.values() for t in _CALL_HOOKS for fn in getattr(m, t, {}).values()}
    owners.discard(id(None))
    held: dict[int, nn.Parameter] = {}  # id of a source parameter -> the user's parameter object taking it
    taken: set[int] = set()  # the user's parameter objects already given a source parameter
    with signals_deferred():
        for name, m in source.named_modules():
            t = mine.get(name)
            if t is None:
                continue
            if type(t) is not type(m):  # a plugin may swap a pruned module's class
                t.__class__ = type(m)
            m.__dict__["_parameters"] = _kept_parameters(t.__dict__.get("_parameters", {}), m._parameters, held, taken)
            for key, value in m.__dict__.items():
                if key != "_modules" and key not in HOOK_ATTRIBUTES and id(t.__dict__.get(key)) not in owners:
                    t.__dict__[key] = value
            _add_model_hooks(t, m)


def _add_model_hooks(target: nn.Module, source: nn.Module) -> None:
    """The hooks a fix-up installed on ``source`` as part of how the pruned model computes
    (:data:`MODEL_HOOK`: a Bloom's ALiBi rows of the kept heads) added to ``target``'s own
    tables, with their flags. Keeping only ``target``'s tables dropped them: a Bloom pruned in
    place, or a fresh one a history was replayed on, failed at its first call ("The expanded
    size of the tensor (2) must match the existing size (4)")."""
    for table in ("_forward_pre_hooks", "_forward_hooks"):
        mine = getattr(target, table)
        for key, fn in getattr(source, table).items():
            if getattr(fn, MODEL_HOOK, False) and not any(h is fn for h in mine.values()):
                mine[key] = fn
                for flags in _HOOK_FLAGS:
                    if table.removesuffix("s") in flags and key in getattr(source, flags):
                        getattr(target, flags)[key] = getattr(source, flags)[key]


def _kept_parameters(
    mine: dict[str, Any], theirs: dict[str, Any], held: dict[int, nn.Parameter], taken: set[int]
) -> dict[str, Any]:
    """``theirs`` (a module's parameter table in the pruned copy) with each parameter's
    values moved into the user's parameter object of that name, where there is one of the
    same class (``held`` / ``taken``: the pairs made so far, so a tied tensor stays one
    object). A gradient of the old shape is dropped (a backward would fail to accumulate
    into it); the new ``requires_grad`` is the copy's. A parameter new in the copy (a bias
    compensation created) stays the copy's object."""
    out = {}
    for key, q in theirs.items():
        p = mine.get(key)
        if q is None or id(q) in held:
            out[key] = held.get(id(q)) if q is not None else None
            continue
        if (
            isinstance(p, nn.Parameter)
            and type(p) is type(q)
            and id(p) not in taken
            and not p.is_inference()
            and p.device == q.device
            and p.dtype == q.dtype
        ):
            if p.shape != q.shape:
                if p.grad is not None:
                    p.grad = None
                if p.is_floating_point() or p.is_complex():
                    # a graph still alive (an output kept from before, the last loss) holds the tensor's gradient
                    # accumulator, made for the old shape, and the next backward would reuse it: "invalid gradient
                    # ... got [4, 4] but expected shape compatible with [4, 8]". Setting .data drops the cached
                    # accumulator only where the dtype changes, so it passes through another dtype first
                    other = torch.float32 if p.dtype == torch.float64 else torch.float64
                    p.data = torch.empty(0, dtype=other, device=p.device)
            p.data = q.data
            p.requires_grad_(q.requires_grad)
            q = p
        held[id(theirs[key])] = q
        taken.add(id(q))
        out[key] = q
    return out


def _saved_floats(model: nn.Module, keep: Iterable[str] = ()) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    """``(table, name, tensor)`` of every floating parameter and saved buffer of ``model``
    (non-persistent buffers, such as a rotary ``inv_freq``, are left out: a fresh load
    computes them), but those whose ``state_dict`` names are in ``keep``, and the ``bias``
    beside a kept ``weight`` (one compensation gave a float32 layer after the files were
    read: written in the narrow dtype beside its float32 weight, the layer could not run)."""
    keep, out = set(keep), []
    for prefix, m in model.named_modules():
        pre = f"{prefix}." if prefix else ""
        for table, skip in ((m._parameters, ()), (m._buffers, m._non_persistent_buffers_set)):
            out += [
                (table, n, t)
                for n, t in table.items()
                if t is not None
                and t.is_floating_point()
                and n not in skip
                and pre + n not in keep
                and not (n == "bias" and pre + "weight" in keep)
            ]
    return out


def stored_in(model: nn.Module, dtype: torch.dtype, keep: Iterable[str] = ()) -> nn.Module:
    """A copy of ``model`` with its floating parameters and saved buffers in ``dtype``: the
    dtype its files store it in, where a loader built it in float32 to compute (a
    ``bfloat16`` checkpoint written back in float32 was twice its size). Buffers that are
    not saved (a rotary ``inv_freq``) stay as they are, as a fresh load computes them, and
    so do the parameters and buffers named in ``keep``: those the files store in float32
    beside the rest (T5's ``wo`` in a float16 checkpoint, routers' ``gate.weight``)."""
    model, keep = copy_model(model), set(keep)
    with torch.no_grad():
        for table, name, t in _saved_floats(model, keep):
            if isinstance(t, nn.Parameter):
                t.data = t.data.to(dtype)
            else:
                table[name] = t.to(dtype)
    return model


def round_through(model: nn.Module, dtype: torch.dtype, keep: Iterable[str] = ()) -> nn.Module:
    """``model`` (in place, and returned) with its floating parameters and saved buffers
    rounded to the values ``dtype`` holds, in their own dtype, layout and objects: a model
    computed in float32 and written in ``bfloat16`` (:func:`stored_in`) is then measured as
    it is written. ``keep``: as for :func:`stored_in` (tensors the files keep in float32)."""
    with torch.no_grad():
        for _table, _name, t in _saved_floats(model, keep):
            if t.dtype != dtype:
                t.copy_(t.to(dtype))
    return model


def copy_model(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model, memo)``, with every tensor that carries autograd history in a
    module's plain attributes (or in a list, tuple or dict there) copied detached. Such
    tensors are what a forward under gradients left behind (RAFT's correlation pyramid
    after ``model(a, b)``); ``deepcopy`` raised "Only Tensors created explicitly by the user
    (graph leaves) support the deepcopy protocol" for them, so a model that had been called
    once could not be pruned.

    Modules that copy the default way (no ``__deepcopy__``, ``__reduce__`` or
    ``__getstate__`` of their own: nearly all) are copied here with what ``deepcopy`` would
    do, without its per-object dispatch (a model's hook tables alone are a dozen dicts per
    module): a new object of the same class, its ``__dict__`` copied entry by entry (dicts,
    lists, tuples and sets rebuilt, atoms and ``memo`` entries reused, anything else
    through ``deepcopy`` with the same memo), set by the class's ``__setstate__``. That
    was most of a data-free ``prune()`` (two copies of an EfficientNet-B0: 36,000
    ``deepcopy`` calls, 0.1 s). Other modules (ScriptModules, parametrized ones) go
    through ``deepcopy`` itself. A copy of a model known to write none of its tensors in
    forward is known as such too (the write guard, see the module doc)."""
    try:
        out = _Copier(memo).module(model)
    except Exception as exc:  # noqa: BLE001 - a copy of the user's objects failed: name which one
        found = _uncopyable(model, memo)
        if found is None:
            raise
        what, fix = found
        raise UserError(
            f"the model cannot be copied: {what} ({type(exc).__name__}: {exc}). CleanAI prunes, checks and "
            f"measures copies of the model, so all it holds must be copyable: {fix}"
        ) from exc
    if model in _WRITES_NOTHING:
        _WRITES_NOTHING.add(out)
    else:
        _COPY_OF[out] = weakref.ref(model)
    return out


def _uncopyable(model: nn.Module, memo: dict[int, Any] | None) -> tuple[str, str] | None:
    """What in ``model`` :func:`copy_model` cannot copy and what to do, in words (``"the
    attribute 'writer' of module 'features.0' (Conv2d) holds a _thread.lock ..."``), or
    ``None`` where no single attribute, tensor, hook or module's own copy protocol fails on
    its own. Each is copied alone: this runs only after a copy failed (a model holding a
    lock, an open file, a generator, a TensorBoard writer raised a bare ``TypeError: cannot
    pickle '_thread.lock' object`` from ``copy.py``)."""
    named = list(model.named_modules(remove_duplicate=True))
    for name, m in named:
        where = f"module {name!r} ({type(m).__name__})" if name else f"the model ({type(m).__name__})"
        for key, value in m.__dict__.items():
            table = key in _TABLES and isinstance(value, dict)
            for k, v in value.items() if table else [(key, value)]:
                if isinstance(v, nn.Module) or v is None:
                    continue
                try:
                    _Copier(memo).value(v)
                except Exception:  # noqa: BLE001 - the one that fails is the answer
                    if key in HOOK_ATTRIBUTES:
                        hook = getattr(v, "__qualname__", type(v).__qualname__)
                        return (
                            f"the {key.strip('_')[:-1].replace('_', ' ')} {hook} of {where} is bound to an object "
                            "that copy.deepcopy cannot copy",
                            "remove the hook before pruning (handle.remove()) and register it again on the pruned "
                            "model, or give the object's class a __deepcopy__ that shares or recreates it.",
                        )
                    what = key.strip("_")[:-1] if table else "attribute"
                    return (
                        f"the {what} {k!r} of {where} holds {_kind_of(v)}, which copy.deepcopy cannot copy",
                        "take it off the model before pruning (keep it in a variable, delete the attribute and set "
                        "it again on the pruned model), or give its class a __deepcopy__ that shares or recreates it.",
                    )
    for name, m in reversed(named):  # a class's own __deepcopy__ / __reduce_ex__, leaves first
        if not _copies_plainly(type(m)):
            try:
                copy.deepcopy(m, dict(memo or {}))
            except Exception:  # noqa: BLE001
                where = f"module {name!r}" if name else "the model"
                return (
                    f"{where} ({type(m).__name__}) fails to copy itself (its class's own copy protocol)",
                    f"make copy.deepcopy work on {type(m).__name__} (its __deepcopy__, __reduce_ex__ or "
                    "__getstate__), or remove that method so that the module copies the default way.",
                )
    return None


def _kind_of(value: Any) -> str:
    cls = type(value)
    article = "an" if cls.__name__[:1].lower() in "aeiou" else "a"
    if isinstance(value, (list, tuple, dict, set)):
        return f"{article} {cls.__name__} holding an object"
    named = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    return f"{article} {named}"


class _Copier:
    """One :func:`copy_model` call: the memo and the classes found to copy the default way."""

    def __init__(self, memo: dict[int, Any] | None) -> None:
        self.memo = dict(memo or {})
        self.plain: dict[type, bool] = {}

    def module(self, m: nn.Module) -> nn.Module:
        memo = self.memo
        if id(m) in memo:
            return memo[id(m)]
        cls = type(m)
        plain = self.plain.get(cls)
        if plain is None:
            plain = self.plain[cls] = _copies_plainly(cls)
        if not plain:
            for sub in m.modules():
                for key, value in sub.__dict__.items():
                    if key not in _TABLES:
                        _detached_into(value, memo, 3)
            return copy.deepcopy(m, memo)
        new = cls.__new__(cls)
        memo[id(m)] = new
        state = {k: self.value(v) for k, v in m.__dict__.items() if k != "_compiled_call_impl"}
        new.__setstate__(state)
        return new

    def value(self, v: Any) -> Any:
        """``copy.deepcopy(v, self.memo)``, without the dispatch for what is common in a module."""
        cls = type(v)
        if _ATOMIC.get(cls) is copy._deepcopy_atomic:  # type: ignore[attr-defined]
            return v
        memo = self.memo
        found = memo.get(id(v), _MISSING)
        if found is not _MISSING:
            return found
        if cls is dict or (cls is OrderedDict and not v.__dict__):
            new = memo[id(v)] = cls()
            for k, x in v.items():
                new[self.value(k)] = self.value(x)
            return new
        if cls is list:
            new = memo[id(v)] = []
            new.extend(self.value(x) for x in v)
            return new
        if cls is tuple:
            items = [self.value(x) for x in v]
            if all(a is b for a, b in zip(items, v, strict=True)):
                return v
            new = memo[id(v)] = tuple(items)
            return new
        if cls is set and all(_ATOMIC.get(type(x)) is copy._deepcopy_atomic for x in v):  # type: ignore[attr-defined]
            new = memo[id(v)] = set(v)
            return new
        if isinstance(v, nn.Module):
            return self.module(v)
        if isinstance(v, torch.Tensor) and (not v.is_leaf or (v.layout in NO_STORAGE and type(v) is torch.Tensor)):
            new = memo[id(v)] = v.detach().clone()
            return new
        return copy.deepcopy(v, memo)


_ATOMIC = copy._deepcopy_dispatch  # type: ignore[attr-defined]


def copy_tensor(t: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    """``copy.deepcopy(t, memo)``; a tensor of a layout ``deepcopy`` refuses (a CSR
    adjacency buffer, :data:`NO_STORAGE`) is cloned."""
    if t.layout in NO_STORAGE and type(t) is torch.Tensor:
        if id(t) not in memo:
            memo[id(t)] = t.detach().clone()
        return memo[id(t)]
    return copy.deepcopy(t, memo)


#: layouts whose tensors ``deepcopy`` refuses ("Cannot access storage of SparseCsrTensorImpl":
#: a GCN's CSR adjacency buffer); ``clone`` copies them
NO_STORAGE = frozenset({torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc})


def _copies_plainly(cls: type) -> bool:
    """Whether ``deepcopy`` copies a module of class ``cls`` the default way: a new object
    whose ``__setstate__`` gets a copy of ``nn.Module.__getstate__()``."""
    return (
        getattr(cls, "__deepcopy__", None) is None
        and cls not in copyreg.dispatch_table
        and cls not in _ATOMIC
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and cls.__getstate__ is nn.Module.__getstate__
        and getattr(cls, "__getnewargs_ex__", None) is None
        and getattr(cls, "__getnewargs__", None) is None
    )


def _detached_into(value: Any, memo: dict[int, Any], depth: int) -> None:
    if isinstance(value, torch.Tensor):
        if (not value.is_leaf or value.layout in NO_STORAGE) and id(value) not in memo:
            memo[id(value)] = value.detach().clone()
    elif depth > 0 and isinstance(value, (list, tuple)):
        for v in value:
            _detached_into(v, memo, depth - 1)
    elif depth > 0 and isinstance(value, dict):
        for v in value.values():
            _detached_into(v, memo, depth - 1)


def holds_history(model: nn.Module) -> bool:
    """Whether a module of ``model`` keeps, in a plain attribute (or a list, tuple or dict
    there), a tensor with autograd history: a cache its forward filled under gradients
    (timm LeViT's and EfficientFormer's ``attention_bias_cache`` in eval mode). Every later
    forward reads the same graph, so a backward that frees it breaks the next one ("Trying
    to backward through the graph a second time")."""
    return any(
        _has_history(value, 3) for m in model.modules() for key, value in m.__dict__.items() if key not in _TABLES
    )


def _has_history(value: Any, depth: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.grad_fn is not None
    if depth > 0 and isinstance(value, (list, tuple)):
        return any(_has_history(v, depth - 1) for v in value)
    if depth > 0 and isinstance(value, dict):
        return any(_has_history(v, depth - 1) for v in value.values())
    return False


def user_hooks(model: nn.Module) -> list[tuple[str, str, int]]:
    """``(module name, hook table, handle id)`` of the forward and backward hooks on
    ``model``'s modules that belong to the user rather than to the model: every hook except
    those defined by torch itself (the observers of ``torch.ao.quantization.prepare``, part
    of how a prepared model computes), bound methods of an object a module holds (timm's
    ``FeatureHooks`` of a ``features_only`` net, copied with the model) and hooks an
    installed library defines for its own modules (transformers' output capture: dropped
    from a copy that kept the attribute saying they are installed, the pruned model
    returned no ``hidden_states``), also on a module of another library inside the model
    (transformers' ``enable_input_require_grads``, which ``gradient_checkpointing_enable``
    puts on the ``nn.Embedding`` of token ids: dropped from the pruned copy, with a warning
    telling the user to register it again)."""
    named = list(model.named_modules())
    found = [
        (name, m, table, key, fn)
        for name, m in named
        for table in _CALL_HOOKS
        for key, fn in getattr(m, table, {}).items()
    ]
    if not found:  # most models: no hook, and no need for the ids below (0.27 ms of 1.0 on EfficientNet-B0)
        return []
    held = {id(v) for _, m in named for k, v in m.__dict__.items() if k not in _TABLES}
    held |= {id(m) for _, m in named}
    libraries = {_package(m) for _, m in named if from_library(m)}
    return [(name, table, key) for name, m, table, key, fn in found if not _model_hook(fn, held, libraries)]


def _package(obj: Any) -> str:
    """The top-level package that defines ``obj``'s class (``transformers``, ``torch``)."""
    return type(obj).__module__.partition(".")[0]


#: attribute of a hook function that a plugin's fix-up installs as part of how the pruned
#: model computes (the ALiBi rows of the kept heads): the model's, kept in copies like torch's
MODEL_HOOK = "cleanai_model_hook"


def _owner(fn: Any) -> Any:
    """The object a hook is a bound method of, through ``functools.partial`` (timm's
    ``FeatureHooks`` registers ``partial(self._collect_output_hook, name)``); else None."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__self__", None)


def _model_hook(fn: Any, held: set[int], libraries: set[str]) -> bool:
    """Whether the hook ``fn`` is part of the model: marked so by a fix-up, a bound method
    of an object the model holds, or defined by torch or by an installed library that
    defines one of the model's modules (``libraries``)."""
    if getattr(fn, MODEL_HOOK, False):
        return True
    owner = _owner(fn)
    if owner is not None and id(owner) in held:
        return True
    while isinstance(fn, functools.partial):
        fn = fn.func
    where = getattr(fn, "__module__", None) or type(fn).__module__ or ""
    if where == "torch" or where.startswith("torch."):
        return True
    return where.partition(".")[0] in libraries


def from_library(obj: Any) -> bool:
    """Whether ``obj`` (a class, or an object of it) is defined in an installed library
    (torch, timm, transformers: under a site-packages folder), not in the user's script
    or project."""
    cls = obj if isinstance(obj, type) else type(obj)
    return _installed(cls.__module__.partition(".")[0])


@functools.cache
def _installed(package: str) -> bool:
    """Whether ``package`` is an installed library (under a site-packages folder), not the
    user's script or project, whose hooks on their own modules stay theirs."""
    import site
    import sysconfig

    mod = sys.modules.get(package)
    origin = getattr(mod, "__file__", None)
    if not origin:
        return False
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}  # the environment's (a venv's)
    roots |= {*getattr(site, "getsitepackages", list)(), site.getusersitepackages()}  # system, pip --user
    return any(Path(origin).resolve().is_relative_to(Path(r).resolve()) for r in roots)


def drop_user_hooks(copy: nn.Module, hooks: list[tuple[str, str, int]]) -> None:
    """Remove ``hooks`` (:func:`user_hooks` of the model ``copy`` was copied from) from
    ``copy``: a copy of a hook is one the user's handle cannot remove, that writes into the
    user's objects (a list of features) and may expect the original widths."""
    for name, table, key in hooks:
        m = copy.get_submodule(name)
        getattr(m, table).pop(key, None)
        for flags in _HOOK_FLAGS:
            getattr(m, flags, {}).pop(key, None)


def warn_user_hooks(hooks: list[tuple[str, str, int]], made: str, verb: str, stacklevel: int) -> None:
    """Say that the copy (the ``made`` model: "pruned", "recovered") carries none of the
    user's ``hooks`` (:func:`user_hooks` of the original, where they stay)."""
    if hooks:
        where = sorted({name or "<model>" for name, _, _ in hooks})
        warnings.warn(
            f"{len(hooks)} forward/backward hook(s) on {', '.join(where[:5])}{' ...' if len(where) > 5 else ''} "
            f"stay on the original model; the {made} copy has none of them: register them again on the {made} "
            f"model (or {verb} with inplace=True, which keeps them)",
            UserWarning,
            stacklevel=stacklevel,
        )


@contextmanager
def user_hooks_off(model: nn.Module) -> Iterator[None]:
    """Run the block with the user's forward and backward hooks on ``model`` (those of
    :func:`user_hooks`) taken off their tables, and put them back, in their order, after
    (also on error or Ctrl-C): the user's handles stay valid. For the masked original the
    sliced copy is compared with: the copy carries none of them, so a hook that changes an
    output (``lambda m, i, o: o * 2``) made every group differ from its masking."""
    hooks = user_hooks(model)
    if not hooks:
        yield
        return
    modules = dict(model.named_modules())
    tables = {(name, table): getattr(modules[name], table) for name, table, _ in hooks}
    saved = {where: dict(table) for where, table in tables.items()}
    try:
        for name, table, key in hooks:
            tables[(name, table)].pop(key, None)
        yield
    finally:
        for where, table in tables.items():
            table.clear()
            table.update(saved[where])


def state_copy(model: nn.Module) -> dict[str, Any]:
    """A copy of ``model.state_dict()``: its tensors detached and cloned, a module's extra
    state (``get_extra_state()``: a dict of class names and tensors) rebuilt with its tensors
    cloned (``v.detach()`` on it raised "'dict' object has no attribute 'detach'")."""
    from torch.utils._pytree import tree_map

    clone = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
    return {k: clone(v) if isinstance(v, torch.Tensor) else tree_map(clone, v) for k, v in model.state_dict().items()}


def state_with_versions(model: nn.Module, state: dict[str, torch.Tensor]) -> OrderedDict:
    """``state`` (tensors by name) as ``load_state_dict`` reads a ``state_dict``: with the
    per-module versions (``_metadata``) of ``model``'s own, which a plain dict of its
    tensors lost. A module's ``_load_from_state_dict`` reads its version and may refuse
    without one (torchvision MNASNet: "version should be set to 1 or 2 instead of None",
    on every ``load_pruned`` and at the end of a recovery). The versions are ``model``'s,
    never ones read from a file (an old version number sends a module down its legacy
    conversion path)."""
    out = OrderedDict(state)
    out._metadata = getattr(model.state_dict(keep_vars=True), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return out


def layout_of(model: nn.Module) -> dict[str, tuple[str, tuple[tuple[str, torch.Size, torch.dtype], ...]]]:
    """Per module name, its class, its own parameters' shapes and their dtypes: what a graph
    built on ``model`` describes (buffers left out: a model may fill caches of them as it
    runs). A model cast after the pruner was built (``model.double()``) failed at
    ``prune()`` with advice to give ``example_inputs`` in float64, which were right when given."""
    return {
        name: (type(m).__name__, tuple((k, p.shape, p.dtype) for k, p in m._parameters.items() if p is not None))
        for name, m in model.named_modules()
    }


def layout_change(before: dict[str, Any], model: nn.Module) -> str | None:
    """How ``model`` differs from the :func:`layout_of` taken ``before`` (the first module
    added, removed, replaced by another class or reshaped), or None where it does not."""
    now = layout_of(model)
    for name in [*before, *(n for n in now if n not in before)]:  # in the model's order: the first change
        was, is_ = before.get(name), now.get(name)
        if was == is_:
            continue
        shown = repr(name) if name else "the model"
        if was is None:
            return f"the layer {shown} ({is_[0]}) was added"
        if is_ is None:
            return f"the layer {shown} ({was[0]}) was removed"
        if was[0] != is_[0]:
            return f"the layer {shown} was {was[0]} and is now {is_[0]}"
        shapes = lambda p: {k: tuple(size) for k, size, _ in p}  # noqa: E731
        if shapes(was[1]) == shapes(is_[1]):
            dtypes = lambda p: ", ".join(sorted({str(t).replace("torch.", "") for _, _, t in p}))  # noqa: E731
            return f"the parameters of {shown} ({is_[0]}) were {dtypes(was[1])} and are now {dtypes(is_[1])}"
        return f"the parameters of {shown} ({is_[0]}) were {shapes(was[1])} and are now {shapes(is_[1])}"
    return None
