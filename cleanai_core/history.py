"""PruningHistory: a replayable, serialisable record of every slicing step."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from cleanai_core.errors import UserError, shown
from cleanai_core.slicing import SliceEdit, apply_edits, get_submodule_and_attr
from cleanai_core.special_files import check_not_special

__all__ = [
    "PruningHistory",
    "add_recorded_biases",
    "atomic_write_text",
    "check_result",
    "check_shapes",
    "result_mismatch",
    "shape_mismatch",
    "shapes_of",
    "shapes_sliced",
]

FORMAT = "cleanai-history/1"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename
    (:func:`cleanai_core.io.atomic_write_text`: synced, with the permissions the umask gives;
    this copy left ``history.save()``'s file readable by its owner only, mode 0600)."""
    from cleanai_core.io import atomic_write_text as write

    write(path, text)


def _file_path(path: Any, verb: str) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise UserError(f"PruningHistory.{verb} needs a file path (str or Path), got {shown(path)}")
    return Path(path)


@attrs.define(eq=False)
class PruningHistory:
    """Steps of slice edits, in order. Replaying them on a freshly built model of the
    same architecture reproduces the pruned architecture exactly; the weights then
    load from the pruned model's ``state_dict``.

    Example::

        history.save("history.json")
        fresh = build_model()
        PruningHistory.load("history.json").replay(fresh)
        fresh.load_state_dict(torch.load("model.pt"))
    """

    steps: list[list[SliceEdit]] = attrs.field(factory=list)
    meta: dict[str, Any] = attrs.field(factory=dict)

    def record(self, edits: list[SliceEdit], before: nn.Module | None = None, after: nn.Module | None = None) -> None:
        """One step's edits; with the models ``before`` and ``after`` it, also the modules
        that compensation gave a bias they lacked (``meta["added_biases"]``), the shapes
        the step slices from (``meta["shapes"]``) and those it leaves (``meta["shapes_after"]``),
        both checked on replay."""
        self.steps.append(list(edits))
        if before is not None:
            shapes = self.meta.setdefault("shapes", [])
            shapes.extend([None] * (len(self.steps) - 1 - len(shapes)))
            shapes.append(shapes_sliced(before, edits))
        if before is None or after is None:
            return
        left = self.meta.setdefault("shapes_after", [])
        left.extend([None] * (len(self.steps) - 1 - len(left)))
        left.append(shapes_of(after, shapes[-1]))
        old = dict(before.named_modules())
        added = self.meta.setdefault("added_biases", [])
        for name, m in after.named_modules():
            o = old.get(name)
            if isinstance(getattr(m, "bias", None), torch.Tensor) and o is not None and o.bias is None:
                added.append(name)

    # under the caller's inference_mode, the model's parameters became inference tensors: it could never train
    @torch.inference_mode(False)
    def replay(self, model: nn.Module, pm: Any = None) -> nn.Module:
        """Apply every step to ``model`` in place and return it. Biases that bias
        compensation created (``meta["added_biases"]``) are created too (as zeros), so the
        pruned ``state_dict`` loads with ``strict=True``.

        All or nothing: the steps run on a copy, which replaces ``model``'s state only when
        every step applied. A history that does not fit ``model`` (another architecture,
        or a model already pruned) raises :class:`UserError` and leaves ``model`` as it was.
        A ``torch.compile`` or ``DataParallel`` wrapper of the architecture is pruned through
        the module it wraps."""
        from cleanai_core.model_state import copy_model, transplant
        from cleanai_core.options import check_modules

        if not isinstance(model, nn.Module):
            raise UserError(f"replay needs the unpruned torch.nn.Module, got {type(model).__name__}")
        given, model = model, self.described(model)
        check_modules(model)  # a lazy layer not run yet raised "Can't access the shape of an uninitialized parameter"
        work = copy_model(model)
        for i, step in enumerate(self.steps):
            if not step:  # slices nothing (a step that removed no unit): nothing to scan the model for
                continue
            check_shapes(self, i, work)
            before = shapes_of(work, self._recorded("shapes_after", i) or {})
            try:
                apply_edits(work, step, pm)
            except UserError:
                raise
            except (IndexError, KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
                raise UserError(
                    f"this history does not fit the model: step {i} of {len(self.steps)} failed "
                    f"({type(exc).__name__}: {str(exc)[:200]}). Replay it on a fresh, unpruned model of the "
                    "architecture it was recorded on; the model was not changed."
                ) from None
            check_result(self, i, before, work, "this history", "; the model was not changed.")
        problem = add_recorded_biases(work, self.meta.get("added_biases", ()), pm)
        if problem:
            raise UserError(f"this history adds a bias to {problem}; the model was not changed.")
        transplant(model, work)
        return given

    def described(self, model: nn.Module) -> nn.Module:
        """``model``, or the module its ``torch.compile`` / ``DataParallel`` wrapper runs where
        the history names that module's layers and not the wrapper's (recorded on the
        unwrapped model, replay said the history "does not fit" the wrapped one)."""
        from cleanai_core.options import bare_module

        names = {e.module for step in self.steps for e in step if e.module}
        inner = bare_module(model)
        if inner is model or not names:
            return model
        mods = lambda m: {n for n, _ in m.named_modules()}  # noqa: E731
        return inner if not names <= mods(model) and names <= mods(inner) else model

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "meta": self.meta, "steps": [[e.to_json() for e in step] for step in self.steps]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PruningHistory:
        """A history from :meth:`to_json`'s form, every edit checked for type and form (a
        missing ``steps``, an edit without ``slice`` or a ``meta`` list raised ``KeyError`` /
        ``TypeError``)."""
        from cleanai_core.saved_folder import history_from_json

        return history_from_json(data, "PruningHistory.from_json")

    def save(self, path: str | os.PathLike) -> None:
        """Write the history as JSON to the file ``path`` (atomically)."""
        path = _file_path(path, "save")
        if path.is_dir():
            raise UserError(f"history file {str(path)!r} is a folder; give a file path such as 'history.json'")
        if not path.parent.is_dir():
            raise UserError(f"cannot save the history to {str(path)!r}: the folder {str(path.parent)!r} does not exist")
        atomic_write_text(path, json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningHistory:
        """Read a history written by :meth:`save` (or a saved folder's ``history.json``),
        checked like :func:`cleanai_core.io.load_pruned` checks it."""
        from cleanai_core.saved_folder import read_history

        path = _file_path(path, "load")
        if path.is_dir():
            raise UserError(f"history file {str(path)!r} is a folder; give the history.json inside it")
        check_not_special(path, "history file")
        if not path.exists():  # said "does not exist; give a folder written by `cleanai prune`": a file goes here
            raise UserError(
                f"history file {str(path)!r} does not exist; give the file PruningHistory.save() wrote or the "
                "history.json of a folder `cleanai prune` / save_pruned() wrote."
            )
        return read_history(path)

    def __len__(self) -> int:
        return len(self.steps)

    # pickled as its JSON form (lists, numbers and text), checked again when read: a checkpoint
    # holding the history, Torch-Pruning's ``torch.save({"model": sd, "pruning": history}, f)``,
    # loads with ``torch.load``'s default ``weights_only=True`` (the class is on torch's safe list,
    # below); it was an UnpicklingError ("Unsupported global: ... SliceEdit")
    def __getstate__(self) -> dict[str, Any]:
        return self.to_json()

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict) and "format" not in state and "steps" in state:
            # pickled before 2026-12-02 as its fields (only a full unpickler reads those: the edits' class)
            self.steps, self.meta = state["steps"], state.get("meta", {})
            return
        checked = PruningHistory.from_json(state)
        self.steps, self.meta = checked.steps, checked.meta

    def then(self, later: PruningHistory) -> PruningHistory:
        """One history of this one's steps followed by ``later``'s: the history of a
        model pruned twice (``later`` recorded by a second pruner on this one's output),
        to replay on a fresh model or to pass to ``save_pruned``.

        Example::

            once = first.prune()
            twice = StructuredPruner(once, x, pruning_ratio=0.3).prune()  # its history starts at `once`
            save_pruned("out/", twice, first.history.then(second.history), "timm:vit_small_patch16_224")
        """
        if not isinstance(later, PruningHistory):  # AttributeError: 'int' object has no attribute '_shapes'
            raise UserError(f"then() needs the PruningHistory of the later prune (second.history), got {shown(later)}")
        meta: dict[str, Any] = {}
        for key in ("shapes", "shapes_after"):
            shapes = [*self._shapes(key), *later._shapes(key)]
            if any(s is not None for s in shapes):
                meta[key] = shapes
        added = [*self.meta.get("added_biases", ()), *later.meta.get("added_biases", ())]
        if added:
            meta["added_biases"] = list(dict.fromkeys(added))
        return PruningHistory([*self.steps, *later.steps], meta)

    def _shapes(self, key: str = "shapes") -> list[Any]:
        recorded = self.meta.get(key)
        recorded = list(recorded) if isinstance(recorded, list) else []
        return (recorded + [None] * len(self.steps))[: len(self.steps)]

    def _recorded(self, key: str, step: int) -> dict[str, Any] | None:
        """``meta[key][step]`` where it is a dict of shapes, else ``None``."""
        recorded = self.meta.get(key)
        found = recorded[step] if isinstance(recorded, list) and step < len(recorded) else None
        return found if isinstance(found, dict) else None


torch.serialization.add_safe_globals([PruningHistory])


def shapes_sliced(model: nn.Module, edits: list[SliceEdit]) -> dict[str, list[int]]:
    """The shapes of the tensors a step slices, as ``model`` has them before it: every
    parameter under each edited module, and each edited bare tensor."""
    out: dict[str, list[int]] = {}
    modules = dict(model.named_modules(remove_duplicate=False))  # one walk, not one per edit
    for e in edits:
        if e.module == "":
            owner, attr = get_submodule_and_attr(model, e.slice)
            t = getattr(owner, attr)
            if isinstance(t, torch.Tensor):  # not a stored count
                out[e.slice] = list(t.shape)
            continue
        module = modules.get(e.module)
        for n, p in (module if module is not None else model.get_submodule(e.module)).named_parameters():
            out[f"{e.module}.{n}"] = list(p.shape)
    return out


def add_recorded_biases(model: nn.Module, names: Any, pm: Any = None) -> str | None:
    """Give each layer named in ``names`` (``meta["added_biases"]``) that has none a zero bias
    of its weight's rows, dtype and device, as bias compensation gave it. Returns what is
    wrong instead (``"'2', which is a ReLU, not a layer with a weight and a bias"``), before
    anything is added; a name that is not a layer with a weight and a bias raised
    ``AttributeError: 'ReLU' object has no attribute 'weight'`` from ``replay``.

    Where a bias was added, the after-prune fix-ups run again (no slice edits), as they run
    after compensation when pruning: a transformers config then declares the new biases
    (``mlp_bias``). Before 2026-12-02 the replayed model's config did not, so it no longer
    rebuilt its own model; pruning the model ``load_pruned`` returned (``cleanai prune
    --model FOLDER``) then took that for a config that describes nothing and cut the heads
    the first prune had kept for ``from_pretrained`` (no ``hf/`` folder)."""
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if module is None:
            return f"{name!r}, which the model does not have"
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 1 or not hasattr(module, "bias"):
            return f"{name!r}, which is a {type(module).__name__}, not a layer with a weight and a bias"
    added = False
    for name in names:
        module = modules[name]
        if module.bias is None:
            w = module.weight
            module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            added = True
    if added:
        apply_edits(model, [], pm)
    return None


def shapes_of(model: nn.Module, names: Any) -> dict[str, list[int]]:
    """The shapes of the tensors of ``model`` called ``names`` (as :func:`shapes_sliced` names
    them: ``module.param``, or a bare tensor's qualified name); those it lacks are left out."""
    out: dict[str, list[int]] = {}
    for name in names:
        try:
            owner, attr = get_submodule_and_attr(model, name)
        except AttributeError:
            continue
        t = getattr(owner, attr, None)
        if isinstance(t, torch.Tensor):
            out[name] = list(t.shape)
    return out


def result_mismatch(
    history: PruningHistory, step: int, before: dict[str, list[int]], model: nn.Module
) -> tuple[str, tuple[int, ...], tuple[int, ...]] | None:
    """The first tensor that ``step`` left with another shape than when it was recorded
    (``meta["shapes_after"]``): ``(name, recorded shape, model's shape)``; ``None`` when all
    fit or nothing was recorded. ``before``: ``model``'s shapes of those tensors before the
    step (:func:`shapes_of`). A dimension the step did not change when it was recorded is
    compared with its size before the step, so the history of a second pruner replayed alone
    (its step starts from other widths, see :func:`check_shapes`) is not refused twice."""
    after = history._recorded("shapes_after", step)
    if after is None:
        return None
    was = history._recorded("shapes", step) or {}
    actual = shapes_of(model, after)
    for name, shape in after.items():
        old, now, here = was.get(name), actual.get(name), before.get(name)
        if not isinstance(shape, list) or now is None or here is None:
            continue
        if isinstance(old, list) and len(old) == len(shape) == len(here):
            want = [s if o != s else h for o, s, h in zip(old, shape, here, strict=True)]
        else:  # no shape recorded before the step: the one recorded after it, whole
            want = list(shape)
        if now != want:
            return name, tuple(want), tuple(now)
    return None


def check_result(history: PruningHistory, step: int, before: dict[str, list[int]], model: nn.Module,
                 what: str, tail: str) -> None:  # fmt: skip
    """A :class:`UserError` (``what`` names the history, ``tail`` ends the message) unless
    ``step`` left ``model``'s tensors as it left them when it was recorded. Replay applies
    any ``keep`` lists it is given: a ``history.json`` edited by hand (an edit removed, a
    ``keep`` list shortened, a slice name no pruner knows) replayed without a word and gave
    a model whose BatchNorm no longer fit its convolution, failing only in its forward."""
    found = result_mismatch(history, step, before, model)
    if found is not None:
        name, shape, actual = found
        raise UserError(
            f"{what} does not fit the model: step {step} of {len(history.steps)} left {name} of shape {actual}, "
            f"where it left {shape} when it was recorded. Its edits do not agree with each other (an edit removed, "
            "a 'keep' list changed or a slice renamed: edited by hand or damaged); replay the history as "
            f"PruningHistory.save or save_pruned wrote it{tail}"
        )


def check_shapes(history: PruningHistory, step: int, model: nn.Module) -> None:
    """A :class:`UserError` unless ``model`` has the shapes ``step`` was recorded on. The
    kept indices alone fix the new widths, so the history of a second ``StructuredPruner``
    (run on the first one's output) replayed on a fresh model sliced it without a word:
    the ``state_dict`` loaded, and a ViT whose heads the fix-ups counted from the wrong
    layout failed in its forward (or computed something else)."""
    found = shape_mismatch(history, step, model)
    if found is not None:
        name, shape, actual = found
        raise UserError(
            f"this history does not fit the model: step {step} of {len(history.steps)} was recorded on "
            f"{name} of shape {shape}, this model has {actual}. A history recorded on an "
            "already pruned model (a second StructuredPruner on the first one's output) replays after the "
            "earlier histories, in order, on a fresh model; the model was not changed."
        )


def shape_mismatch(
    history: PruningHistory, step: int, model: nn.Module
) -> tuple[str, tuple[int, ...], tuple[int, ...]] | None:
    """The first tensor that ``step`` was recorded on with another shape than ``model``
    has it: ``(name, recorded shape, model's shape)``; ``None`` when all fit or nothing
    was recorded."""
    recorded = history.meta.get("shapes")
    expected = recorded[step] if isinstance(recorded, list) and step < len(recorded) else None
    if not isinstance(expected, dict):
        return None  # recorded without the model (or by an older version): nothing to compare
    try:
        actual = shapes_sliced(model, history.steps[step])
    except AttributeError:
        return None  # a missing module: the slicing itself says which
    for name, shape in expected.items():
        if isinstance(shape, list) and name in actual and actual[name] != shape:
            return name, tuple(shape), tuple(actual[name])
    return None
