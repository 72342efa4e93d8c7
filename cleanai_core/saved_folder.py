"""Reading a saved pruned-model folder without trusting it.

Terms:

- *saved folder*: what :func:`cleanai_core.io.save_pruned` (or ``cleanai prune``) writes:
  ``architecture.json``, ``history.json``, ``model.pt``.
- *registered source*: a model spec that an installed loader plugin claims by name
  (``timm:NAME``, ``torchvision:NAME``, the demo's architecture). Resolving it imports nothing
  the file names.
- *import spec*: ``package.module:callable``. Rebuilding from it imports and calls code, so it
  needs ``trust_code=True``; so do keyword arguments for the architecture (``model_kwargs``).

Every reader checks the whole file before anything is built or replayed, and raises
:class:`UserError` naming the file and the problem: a folder someone hands you can be
truncated, of another version, or tampered with.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cleanai_core.errors import UserError
from cleanai_core.graph.context import is_count_slice, is_index_slice
from cleanai_core.history import FORMAT as HISTORY_FORMAT
from cleanai_core.history import PruningHistory, add_recorded_biases, result_mismatch, shape_mismatch, shapes_of
from cleanai_core.options import non_finite
from cleanai_core.slicing import SliceEdit, apply_edits, get_submodule_and_attr

__all__ = [
    "FORMAT_VERSION",
    "arch_option_problem",
    "apply_settings",
    "beyond_dtype",
    "module_settings",
    "read_settings",
    "read_architecture",
    "history_from_json",
    "initialise_lazy",
    "lazy_module",
    "read_history",
    "nan_tensor",
    "read_probe",
    "recorded_input_shape",
    "read_state",
    "replay_history",
    "is_extra_state",
    "state_dict_problems",
    "tensors_of",
    "unsaved_setting",
]

FORMAT_VERSION = 1
ARCH_OPTIONS = ("num_classes", "model_kwargs")
_MAX_INDEX = 2**62  # a channel index beyond this is no tensor's: torch cannot even hold it
_MAX_DIMS = 64  # torch's limit on a tensor's dimensions
_REPLAY_ERRORS = (IndexError, KeyError, RuntimeError, ValueError, TypeError, AttributeError)
_EXTRA_STATE = torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX  # "_extra_state": get_extra_state()'s value


def _bad(path: Path | str, problem: str) -> UserError:
    where = repr(str(path)) if isinstance(path, Path) else path  # a file, or words for data given in memory
    return UserError(
        f"{where}: {problem}. The folder is damaged, tampered with or not written by this CleanAI; "
        "save the pruned model again (cleanai prune or save_pruned)."
    )


def _read_json(path: Path) -> Any:
    """A saved folder's JSON file, read as strictly as a config file: a repeated key, a nesting
    too deep for the parser (``RecursionError``) and a number too long to convert
    (``ValueError``) are a damaged folder (the last two were tracebacks)."""
    from cleanai_core.config_sources import unique_keys

    try:
        return json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise UserError(
            f"{str(path)!r} does not exist; give a folder written by `cleanai prune` or save_pruned()."
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"not valid JSON ({exc}); it may be truncated") from None
    except RecursionError:
        raise _bad(path, "nested too deeply to be a CleanAI file") from None
    except ValueError as exc:  # a number of more than 4300 digits, a repeated key
        raise _bad(path, f"not valid JSON ({str(exc)[:120]})") from None
    except OSError as exc:
        raise UserError(f"cannot read {str(path)!r}: {exc.strerror or exc}.") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_architecture(path: Path, trust_code: bool = False) -> tuple[str, dict[str, Any]]:
    """The model spec and its options from ``architecture.json``, checked."""
    arch = _read_json(path)
    if not isinstance(arch, dict):
        raise _bad(path, f"holds a {type(arch).__name__}, expected an object with 'format' and 'spec'")
    fmt = arch.get("format", 1)
    if not _is_int(fmt):
        raise _bad(path, f"format {fmt!r} is not a CleanAI format number")
    if fmt > FORMAT_VERSION:
        raise UserError(f"{str(path)!r} was written by a newer CleanAI (format {fmt}); upgrade CleanAI to load it.")
    if fmt != FORMAT_VERSION:
        raise _bad(path, f"format {fmt} is not one this CleanAI reads (it reads format {FORMAT_VERSION})")
    spec = arch.get("spec")
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(path, f"'spec' is {spec!r}, expected a model spec such as 'timm:resnet18'")
    options = arch.get("options") or {}
    if not isinstance(options, dict):
        raise _bad(path, f"'options' is a {type(options).__name__}, expected an object")
    unknown = sorted(set(options) - set(ARCH_OPTIONS))
    if unknown:
        raise _bad(path, f"unknown option(s) {unknown}; known: {list(ARCH_OPTIONS)}")
    problem = arch_option_problem(options)
    if problem:
        raise _bad(path, problem)
    shape = arch.get("example_input_shape")
    # save_pruned writes None or a list of sizes; another value was read as none recorded, which skipped the run of
    # the rebuilt model on it that refuses edited settings (a stride of 0), and `cleanai explain` traced 1,3,224,224
    if shape is not None and (not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape)):
        raise _bad(path, f"'example_input_shape' is {shape!r}, expected a list of sizes (e.g. [1, 3, 8, 8]) or null")
    kwargs = options.get("model_kwargs")
    if kwargs and not trust_code:
        raise UserError(
            f"{str(path)!r} passes keyword arguments {sorted(kwargs)} to the architecture {spec!r}; they reach "
            "code that the folder chooses. If you trust the folder, pass trust_code=True (command line: --trust-code)."
        )
    return spec, dict(options)


def arch_option_problem(options: dict[str, Any]) -> str | None:
    """What is wrong with the architecture options (``num_classes``, ``model_kwargs``), or
    ``None``: checked when a folder is read, and by ``save_pruned`` before it writes one."""
    num_classes = options.get("num_classes")
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 1):
        return f"'num_classes' is {num_classes!r}, expected a positive integer"
    kwargs = options.get("model_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        return f"'model_kwargs' is a {type(kwargs).__name__}, expected an object"
    return None


def _check_edit(path: Path, where: str, e: Any) -> SliceEdit:
    if not isinstance(e, dict):
        raise _bad(path, f"{where} is a {type(e).__name__}, expected an object")
    missing = [k for k in ("module", "slice", "keep") if k not in e]
    if missing:
        raise _bad(path, f"{where} has no {missing}")
    if not isinstance(e["module"], str) or not isinstance(e["slice"], str):
        raise _bad(path, f"{where}: 'module' and 'slice' must be strings")
    keep = e["keep"]
    if not isinstance(keep, list) or not keep or not all(_is_int(i) and i >= 0 for i in keep):
        raise _bad(path, f"{where}: 'keep' must be a non-empty list of channel indices >= 0")
    if max(keep) >= _MAX_INDEX:  # a ValueError traceback: "Overflow when unpacking long long"
        raise _bad(path, f"{where}: 'keep' holds channel index {max(keep)}, beyond any tensor's size")
    if len(set(keep)) != len(keep):
        raise _bad(path, f"{where}: 'keep' repeats channel indices")
    dim = e.get("dim")
    if dim is not None and (not _is_int(dim) or abs(dim) > _MAX_DIMS):
        raise _bad(path, f"{where}: 'dim' is {dim!r}, expected a tensor dimension (an integer)")
    if e["module"] == "" and dim is None:
        raise _bad(path, f"{where}: a bare tensor edit needs 'dim'")
    return SliceEdit.from_json(e)


def read_history(path: Path) -> PruningHistory:
    """``history.json`` as a :class:`PruningHistory`, every edit checked for type and form."""
    return history_from_json(_read_json(path), path)


def history_from_json(data: Any, path: Path | str) -> PruningHistory:
    """A :class:`PruningHistory` from its JSON form; :class:`UserError` naming ``path`` (a file,
    or a description of where the data came from) for anything out of form."""
    if not isinstance(data, dict) or data.get("format") != HISTORY_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise _bad(path, f"not a CleanAI pruning history (format {got!r}, expected {HISTORY_FORMAT!r})")
    steps, meta = data.get("steps"), data.get("meta", {})
    if not isinstance(steps, list) or not all(isinstance(s, list) for s in steps):
        raise _bad(path, "'steps' must be a list of lists of edits")
    if not isinstance(meta, dict):
        raise _bad(path, "'meta' must be an object")
    added = meta.get("added_biases", [])
    if not isinstance(added, list) or not all(isinstance(n, str) for n in added):
        raise _bad(path, "'meta.added_biases' must be a list of module names")
    edits = [[_check_edit(path, f"step {i} edit {j}", e) for j, e in enumerate(step)] for i, step in enumerate(steps)]
    return PruningHistory(edits, dict(meta))


def _check_targets(path: Path, model: nn.Module, step: list[SliceEdit], where: str) -> None:
    names = dict(model.named_modules())
    for e in step:
        if e.module:
            if e.module not in names:
                raise _bad(
                    path,
                    f"{where} names module {e.module!r}, which the architecture in architecture.json does not have "
                    "(a model changed after it was built, its layers fused or replaced, is saved with a factory "
                    "that builds it so: save_pruned refuses the others)",
                )
            continue
        try:
            owner, attr = get_submodule_and_attr(model, e.slice)
        except AttributeError:
            owner, attr = None, ""
        t = getattr(owner, attr, None) if owner is not None else None
        if is_count_slice(e.slice):  # a module's stored count of channels: an int, nothing to cut
            if type(t) is not int or int(e.keep.numel()) > t:
                raise _bad(path, f"{where} names count {e.slice!r}, which is no int attribute of at least that size")
            continue
        if not isinstance(t, torch.Tensor):
            raise _bad(
                path, f"{where} names tensor {e.slice!r}, which the architecture in architecture.json does not have"
            )
        if not -t.dim() <= int(e.dim) < t.dim():
            raise _bad(path, f"{where}: dim {e.dim} is out of range for {e.slice!r} of shape {tuple(t.shape)}")
        if is_index_slice(e.slice):
            # an index buffer's kept positions are those of the channels it points into, which
            # may be more than its own entries (``x.index_select(1, self.part)`` picks a subset)
            continue
        size = t.shape[int(e.dim)]
        if int(e.keep.max()) >= size:
            raise _bad(path, f"{where}: channel {int(e.keep.max())} is out of range for {e.slice!r} ({size} channels)")


def lazy_module(model: nn.Module) -> str | None:
    """The name of the first module of ``model`` with a parameter or buffer not initialised
    yet (a lazy layer: ``nn.LazyConv2d``), else ``None``."""
    return next(
        (n for n, m in model.named_modules() if any(nn.parameter.is_lazy(t) for t in [*m._parameters.values(),
                                                                                        *m._buffers.values()])),
        None,
    )  # fmt: skip


def initialise_lazy(model: nn.Module, arch: Path) -> None:
    """Give the lazy layers of a freshly built ``model`` their shapes by running it once on
    zeros of the ``example_input_shape`` that ``arch`` records, as the first forward does,
    before the history is replayed on them (the replay raised ``RuntimeError: Can't access
    the shape of an uninitialized parameter``); a :class:`UserError` where none is recorded
    or the run fails."""
    name = lazy_module(model)
    if name is None:
        return
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    probe = read_probe(arch, model, device)
    kind = type(model.get_submodule(name)).__name__
    if probe is None:
        raise UserError(
            f"{str(arch)!r}: the architecture has lazy layers ({name!r}, {kind}), which take their shapes from a "
            "first input, and the folder records no example_input_shape to give them one. Save it again with "
            "save_pruned(..., example_input_shape=[1, C, H, W]) (cleanai prune records it)."
        )
    try:
        with torch.no_grad():
            model(probe)
    except Exception as exc:  # noqa: BLE001 - any failure of the first forward is the answer
        raise _bad(
            arch,
            f"the architecture's lazy layers ({name!r}, {kind}) could not take their shapes from an input of the "
            f"recorded example_input_shape {list(probe.shape)} ({type(exc).__name__}: {str(exc)[:200]})",
        ) from None


def replay_history(history: PruningHistory, model: nn.Module, path: Path, pm: Any = None) -> None:
    """Replay ``history`` on a freshly built ``model``; any failure is a :class:`UserError`
    naming ``path`` and the step."""
    for i, step in enumerate(history.steps):
        if not step:  # slices nothing; each replayed step scans the model (2,000 of them: 17 s, 10**6: hours)
            continue
        where = f"step {i}"
        _check_targets(path, model, step, where)
        found = shape_mismatch(history, i, model)
        if found is not None:  # e.g. the history of a second pruner alone: it loaded without a word
            name, shape, actual = found
            warnings.warn(
                f"{str(path)!r}: {where} was recorded on {name} of shape {shape}, but the architecture in "
                f"architecture.json has {actual} there; the weights fit, so the model loads, but settings that "
                "follow a layer's width (attention heads) may be wrong. Save a model pruned twice with "
                "first.history.then(second.history), with the spec and options of the model that was pruned.",
                RuntimeWarning,
                stacklevel=3,
            )
        before = shapes_of(model, history._recorded("shapes_after", i) or {})
        try:
            apply_edits(model, step, pm)
        except UserError:
            raise
        except _REPLAY_ERRORS as exc:
            raise _bad(
                path,
                f"{where} cannot be replayed on the architecture in architecture.json ({type(exc).__name__}: {exc})",
            ) from None
        found = result_mismatch(history, i, before, model)
        if found is not None:  # a hand-edited keep list: the shapes fit model.pt only if it was edited too
            name, shape, actual = found
            raise _bad(
                path,
                f"{where} left {name} of shape {actual}, where it left {shape} when it was recorded: its edits do not "
                "agree with each other (an edit removed, a 'keep' list changed or a slice renamed)",
            )
    problem = add_recorded_biases(model, history.meta.get("added_biases", ()), pm)
    if problem:
        raise _bad(path, f"'added_biases' names {problem}")


def read_state(path: Path, model: nn.Module, map_location: Any = "cpu", state: dict | None = None) -> dict:
    """``model.pt`` read with ``weights_only=True`` (or ``state``, read from it before) and
    checked against ``model``'s ``state_dict``: the same keys, shapes and kinds of dtype."""
    from cleanai_core.special_files import check_not_packed, not_torch_save, unreadable

    if state is None:
        check_not_packed(path, "the saved folder's file")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            kind = not_torch_save(path)  # said "UnpicklingError: Weights only load failed. In PyTorch 2.6, ..."
            if kind is not None:
                raise _bad(path, f"not a file written by torch.save but {kind}") from None
            # said "cannot be read as plain tensors (EOFError: )" for an empty file
            raise _bad(path, f"the file {unreadable(path, exc)}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and (isinstance(v, torch.Tensor) or is_extra_state(k)) for k, v in state.items()
    ):
        raise _bad(path, "does not hold a state_dict (a dict of names to tensors)")
    _add_missing_biases(model, state)
    problems = state_dict_problems(model.state_dict(), state)
    if problems:
        raise _bad(
            path, "does not fit the model rebuilt from architecture.json and history.json: " + "; ".join(problems)
        )
    nan = nan_tensor(state, dict(model.named_parameters()))
    if nan:
        raise _bad(path, nan)
    return state


def is_extra_state(key: str) -> bool:
    """Whether a ``state_dict`` key holds a module's extra state (``get_extra_state()``, any
    value the module returns: ``<module>._extra_state``)."""
    return key.rpartition(".")[2] == _EXTRA_STATE


def tensors_of(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` without the modules' extra state (values that need not be tensors)."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) or not is_extra_state(k)}


def nan_tensor(state: dict[str, torch.Tensor], parameters: Any = ()) -> str | None:
    """Which tensor of a state_dict holds NaN, or inf where it is one of ``parameters`` (the
    names of the model's parameters) other than a bias (:func:`~cleanai_core.options.inf_refused`),
    in words; ``None`` when there is none. Buffers may hold inf (quantization observers)."""
    from cleanai_core.options import inf_refused

    names = set(parameters)
    dense = {k: v for k, v in tensors_of(state).items() if v.layout == torch.strided}
    found = non_finite(dense.items(), allow_inf=lambda k, t: k not in names or not inf_refused(k, t))
    if found is None:
        return None
    what = "NaN" if bool(torch.isnan(dense[found[0]]).any()) else "inf"
    return f"{found[0]} holds {found[1]} {what} value(s) (of {found[2]})"


def state_dict_problems(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """How ``state`` fails to fit a model whose ``state_dict`` is ``own``: missing and
    unexpected keys, shapes, integer-vs-float dtypes (empty when it fits). A module's extra
    state (``get_extra_state``: ``..._extra_state``, any plain value) counts as a key only."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    own, state = tensors_of(own), tensors_of(state)
    shapes = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    kinds = [k for k, v in state.items() if k in own and v.is_floating_point() != own[k].is_floating_point()]
    empty = [k for k, v in state.items() if v.is_meta]
    # a sparse or complex tensor fits only where the model's own is one of the same kind (a
    # GCN's sparse adjacency buffer): elsewhere loading would turn a weight into it
    odd = [
        k
        for k, v in state.items()
        if not v.is_meta
        and (v.layout != torch.strided or v.is_complex())
        and not (k in own and own[k].layout == v.layout and own[k].is_complex() == v.is_complex())
    ]
    problems = []
    if empty:
        problems.append(f"{len(empty)} tensor(s) on the meta device, shapes without values (e.g. {empty[:3]})")
    if odd:
        problems.append(f"sparse, complex or other non-dense tensors: {odd[:3]}")
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) of the model (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"shape mismatch: {shapes[:3]}")
    if kinds:
        problems.append(f"integer/float dtypes that do not fit: {kinds[:3]}")
    return problems


def beyond_dtype(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """The floating tensors of ``state`` holding finite values that the model's own narrower
    dtype (``own``, its ``state_dict``) cannot hold, in words: ``load_state_dict`` made them
    inf (float32 weights of 1e6 in a float16 model), and the scores that overflowed were
    blamed on ``--alpha`` / ``--beta``."""
    return [
        f"{k} ({str(v.dtype).replace('torch.', '')} values up to {float(v[torch.isfinite(v)].abs().max()):.3g}; the "
        f"model's {str(own[k].dtype).replace('torch.', '')} holds at most {torch.finfo(own[k].dtype).max:.3g})"
        for k, v in state.items()
        if isinstance(v, torch.Tensor)  # a module's extra state may be any value (get_extra_state)
        and isinstance(own.get(k), torch.Tensor)
        and v.is_floating_point()
        and own[k].is_floating_point()
        and v.layout == torch.strided
        and not v.is_meta
        and v.numel()
        and torch.finfo(own[k].dtype).max < torch.finfo(v.dtype).max
        and bool((torch.isfinite(v) & ~torch.isfinite(v.to(own[k].dtype))).any())
    ]


def _add_missing_biases(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A ``bias`` in ``state`` that bias compensation added to a layer built without one
    (folders written before ``added_biases`` was recorded). Only a 1-d bias that fits the
    layer's weight is created."""
    own = model.state_dict()
    for key, value in tensors_of(state).items():
        mod_name, _, attr = key.rpartition(".")
        if key in own or attr != "bias" or value.dim() != 1:
            continue
        try:
            module = model.get_submodule(mod_name) if mod_name else model
        except AttributeError:
            continue
        w = getattr(module, "weight", None)
        if hasattr(module, "bias") and module.bias is None and isinstance(w, torch.Tensor) and w.shape[0] == len(value):
            module.register_parameter("bias", nn.Parameter(torch.zeros_like(value, dtype=w.dtype)))


# -- module settings ---------------------------------------------------------------------------
#
# *settings*: a module's public plain attributes (numbers, text, flags, short tuples of them):
# a BatchNorm's ``eps`` and ``momentum``, a dropout's ``p``, an attention's head count. The
# architecture is rebuilt with its defaults, so one the user changed after building the model
# (``bn.eps = 1e-3``) was lost on reload: other outputs, without a word.

_SCALARS = (bool, int, float, str, type(None))
_MAX_ITEMS = 64  # longer sequences are data, not a setting


def _plain(value: Any) -> bool:
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")  # JSON has no NaN or inf
    if isinstance(value, _SCALARS):
        return True
    return (
        isinstance(value, (tuple, list))
        and len(value) <= _MAX_ITEMS
        and all(isinstance(v, _SCALARS) and _plain(v) for v in value)
    )


def _setting(key: str) -> bool:
    """Whether attribute ``key`` is a setting: not private, not the mode, not where the model
    ran (``self.device = "cuda"`` would follow the folder to a machine without one)."""
    return not key.startswith("_") and key != "training" and "device" not in key


def unsaved_setting(key: str, value: Any) -> bool:
    """Whether a module's attribute ``key`` is a setting (see above) that ``architecture.json``
    cannot keep: not a plain value (a dict, an object, a function)."""
    return _setting(key) and not _plain(value)


def module_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module's settings (see above), by module name, for ``architecture.json``."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        found = {k: v for k, v in vars(m).items() if _setting(k) and _plain(v)}
        if found:
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in found.items()}
    return out


def read_settings(path: Path, key: str = "settings") -> dict[str, dict[str, Any]]:
    """The ``settings`` (or ``added_settings``) of ``architecture.json`` (none in folders
    written before they were saved), checked for form."""
    settings = _read_json(path).get(key) or {}
    if not isinstance(settings, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and all(isinstance(a, str) and _plain(x) for a, x in v.items())
        for k, v in settings.items()
    ):
        raise _bad(path, f"{key!r} must map module names to objects of numbers, text and flags")
    return settings


def _same_kind(old: Any, new: Any) -> bool:
    numbers = (int, float, type(None))
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, numbers) and isinstance(new, numbers):
        return True
    if isinstance(old, (tuple, list)):
        return isinstance(new, (tuple, list)) and len(new) == len(old)
    return type(old) is type(new)


def apply_settings(
    model: nn.Module,
    settings: dict[str, dict[str, Any]],
    path: Path | None = None,
    pm: Any = None,
    probe: torch.Tensor | None = None,
    added: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Give ``model``'s modules the saved settings. Only an attribute the rebuilt module has,
    of the same kind, is set (values only: nothing is imported or called); others, e.g. from
    another version of the model's library, are left as the architecture builds them.
    ``added``: the attributes ``save_pruned`` found set on the model after it was built
    (``added_settings``: ``model.class_names``, a threshold), given to the modules that lack
    them altogether (no attribute, method, parameter or submodule of that name; a tuple
    comes back as a list). Before 2026-12-02 they were saved and then dropped.

    With ``path`` (the ``architecture.json`` they came from), every module whose settings
    changed is then checked by the plugin that claims it
    (:meth:`~cleanai_core.interfaces.LayerPruner.settings_problem`): settings that do not fit
    the module's tensors (a conv's ``out_channels`` edited) are a damaged folder. They loaded,
    then failed in the forward or computed something else without a word. With ``probe`` (an
    input of the shape the folder records), settings under which the model no longer runs on
    it, though it ran without them (a negative ``eps``, a stride of 0), are refused too."""
    modules = dict(model.named_modules())
    changes = []
    for name, values in (added or {}).items():
        m = modules.get(name)
        for key, value in values.items() if m is not None else ():
            if _setting(key) and key not in vars(m) and not hasattr(m, key):
                changes.append((name, vars(m), key, value))
    for name, values in settings.items():
        m = modules.get(name)
        if m is None:
            continue
        own = vars(m)
        for key, value in values.items():
            if not _setting(key) or key not in own or not _plain(own[key]):
                continue
            value = tuple(value) if isinstance(own[key], tuple) and isinstance(value, list) else value
            if _same_kind(own[key], value) and own[key] != value:  # a tuple read back as a list is no change
                changes.append((name, own, key, value))
    if not changes:
        return
    ran = path is not None and probe is not None and _failure(model, probe) is None
    for _, own, key, value in changes:
        own[key] = value
    if path is None:
        return
    changed = list(dict.fromkeys(name for name, *_ in changes))
    _check_settings(path, model, changed, pm)
    failure = _failure(model, probe) if ran else None
    if failure is not None:
        raise _bad(
            path,
            f"with its 'settings' (of {', '.join(repr(n) for n in changed[:5])}{' ...' if len(changed) > 5 else ''}) "
            f"the model fails on an input of the recorded shape {tuple(probe.shape)} ({failure}), and without them "
            "it runs",
        )


def _failure(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why ``model`` fails on ``x``, or ``None`` when it runs."""
    from cleanai_core.model_state import preserved

    try:
        with torch.no_grad(), preserved(model):  # observers and attributes a forward sets stay as loaded
            model(x)
    except Exception as exc:  # noqa: BLE001 - any failure of the forward is the answer
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def recorded_input_shape(path: Path) -> tuple[int, ...] | None:
    """The ``example_input_shape`` ``architecture.json`` at ``path`` records, batch of one;
    ``None`` where none is recorded, or one out of form or of more than 2**24 values."""
    try:
        arch = _read_json(path)
    except UserError:
        return None
    shape = arch.get("example_input_shape") if isinstance(arch, dict) else None
    if not isinstance(shape, list) or not 1 <= len(shape) <= 8 or not all(_is_int(d) and d > 0 for d in shape):
        return None
    shape = (1, *shape[1:])
    return shape if math.prod(shape) <= 2**24 else None


def read_probe(path: Path, model: nn.Module, device: Any) -> torch.Tensor | None:
    """Zeros of the ``example_input_shape`` that ``architecture.json`` records (batch of one,
    in the model's floating dtype), to check saved settings on; ``None`` where none is
    recorded, or one out of form or too large to allocate cheaply."""
    shape = recorded_input_shape(path)
    if shape is None:
        return None
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.zeros(shape, dtype=dtype, device=device)


def _check_settings(path: Path, model: nn.Module, names: Any, pm: Any) -> None:
    from cleanai_core.plugins import plugin_manager

    pm = plugin_manager(pm, "_check_settings")
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        pruner = pm.hook.cleanai_layer_pruner(module=m, name=name, findings=None)
        problem = pruner.settings_problem(m) if pruner is not None else None
        if problem:
            raise _bad(
                path,
                f"the 'settings' of {name or 'the model'!r} ({type(m).__name__}) do not fit its tensors in model.pt: "
                f"{problem}",
            )
