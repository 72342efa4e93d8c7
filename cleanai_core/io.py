"""Saving a pruned model in the safe form and loading it back.

An output directory holds:

- ``model.pt``: the pruned ``state_dict`` (tensors only; loads with ``weights_only=True``),
- ``history.json``: every slicing step, replayable on the unpruned architecture,
- ``architecture.json``: how to rebuild the unpruned architecture (the ``--model`` spec and
  the options that shape it, such as ``num_classes``),
- optionally ``model_full.pt``: the whole module pickled (a convenience; loading it runs code).

:func:`load_pruned` rebuilds the architecture through the ``cleanai_load_model`` hook
(without pretrained weights), replays the history, and loads the ``state_dict`` strictly.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cleanai_core import __version__
from cleanai_core.errors import SpecError, UserError, shown
from cleanai_core.interfaces import memory_format_of
from cleanai_core.model_state import set_mode, state_with_versions
from cleanai_core.out_folder import (
    INSIDE,
    TrackedWriter,
    check_name,
    current_umask,
    holds_the_working_folder,
    resolved,
    sibling_prefix,
    snapshot,
    staged_folder,
    target_of,
)

# options that shape the architecture (everything else, like data paths, is left out)
from cleanai_core.saved_folder import ARCH_OPTIONS, FORMAT_VERSION, arch_option_problem, module_settings

__all__ = [
    "atomic_write_bytes",
    "atomic_write_files",
    "atomic_write_text",
    "load_pruned",
    "rebuild_pruned",
    "save_pruned",
]


def _atomic(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=sibling_prefix(path.name, path.parent), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer = TrackedWriter(fh)
            try:
                write(writer)
            except RuntimeError:
                if writer.error is not None:  # torch.save wraps the real error (ENOSPC, an interrupt)
                    raise writer.error from None
                raise
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it into place."""
    _atomic(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_files(folder: str | os.PathLike, files: dict[str, bytes], what: str = "the files") -> None:
    """Write several files into the existing ``folder`` as one: each to a temporary file
    (synced) first, then all renamed into place, so a failure (a full disk, an interrupt)
    before the renames leaves every old file as it was. Writing them one by one left a
    new plot beside the previous run's ``report.json``. A missing folder, or an
    ``OSError``, is a :class:`UserError` naming the folder."""
    from cleanai_core.out_folder import os_error, signals_deferred

    folder = Path(folder)
    if not folder.is_dir():  # FileNotFoundError named a temporary file: '.../.report.svg.ixvlt.tmp'
        raise UserError(
            f"cannot write {what} to {str(folder)!r}: it is not an existing folder. Create it first "
            "(save_pruned writes one) or give another folder; nothing was written."
        )
    temps: dict[str, str] = {}
    try:
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(prefix=sibling_prefix(name, folder), suffix=".tmp", dir=folder)
            temps[name] = tmp
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~current_umask())
        with signals_deferred():  # renames cannot run out of space: all of them, or none
            for name, tmp in temps.items():
                os.replace(tmp, folder / name)
    except OSError as exc:
        raise os_error(exc, folder, f"write {what} to") from None
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (Path, torch.device, torch.dtype)):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


OWN_FILES = ("model.pt", "history.json", "architecture.json", "model_full.pt")


def save_pruned(
    out_dir: str | os.PathLike,
    model: nn.Module,
    history: Any,
    spec: str,
    options: dict[str, Any] | None = None,
    save_pickle: bool = False,
    example_input_shape: list[int] | tuple[int, ...] | None = None,
    *,
    example_inputs: Any = None,
    report: dict[str, Any] | None = None,
    rebuild_check: bool = True,
) -> Path:
    """Write ``model.pt``, ``history.json`` and ``architecture.json`` (and ``model_full.pt``
    with ``save_pickle``) into ``out_dir``, atomically as a whole: the files are written to a
    staged folder that then replaces ``out_dir`` (created if missing). Other files already in
    ``out_dir`` are kept; an interrupt or a full disk leaves ``out_dir`` as it was.

    Output plugins (the ``cleanai_save_outputs`` hook) add their files, as for ``cleanai
    prune``: a Hugging Face model gets ``hf/``, a ``save_pretrained`` folder that
    ``from_pretrained`` loads, kept only where the reload gives the pruned model's outputs.

    :param spec: how to rebuild the unpruned architecture: a ``--model`` spec such as
        ``timm:resnet18``, ``torchvision:resnet18`` or ``package.module:factory``.
    :param options: loader options that shape the architecture (``num_classes``...).
    :param example_inputs: one batch as the model is called, on which an output plugin
        checks its files (the reloaded ``hf/`` model's outputs); ``None``: the plugin's own
        default (a few token ids, or noise of the shape a Hugging Face config describes).
    :param report: a dict that receives what the output plugins say about their files
        (``hf_folder``: ``"hf"`` or ``None``; ``hf_reload``: why not, or how close).
    :param rebuild_check: refuse (the default) where no installed loader rebuilds ``spec``;
        ``False`` writes the folder with a warning instead (``run_job`` given a model object
        built in the caller's code: its ``model.pt`` loads into the caller's own architecture).

    Example::

        pruned = pruner.prune()
        save_pruned("pruned/", pruned, pruner.history, "hf:my-llama")  # pruned/hf/ loads with from_pretrained

    A ``torch.compile``, ``DataParallel`` or ``DistributedDataParallel`` wrapper is saved
    as the module it wraps where the history names that module's layers (what
    ``load_pruned`` rebuilds and returns).
    """
    from cleanai_core.history import PruningHistory
    from cleanai_core.options import check_masks, check_not_meta, check_switches
    from cleanai_core.saved_folder import nan_tensor

    out = _folder_arg(out_dir, "save_pruned")
    check_name(out, "save_pruned's folder")  # ' ' and '-' wrote folders of those names
    check_switches(save_pickle=save_pickle, rebuild_check=rebuild_check)  # "no" pickled the model / checked
    if report is not None and not isinstance(report, MutableMapping):  # report="x" was dropped without a word
        raise UserError(
            f"save_pruned: report={shown(report)} must be a dict, which receives what the output plugins say about "
            "their files (report = {}; save_pruned(..., report=report)), or None"
        )
    if not isinstance(model, nn.Module):
        raise UserError(f"save_pruned needs the pruned torch.nn.Module, got {type(model).__name__}")
    if not isinstance(history, PruningHistory):  # "nope" was written as history.json, a folder nothing could load
        raise UserError(
            f"save_pruned needs the PruningHistory of the prune (pruner.history), got {type(history).__name__}"
        )
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(
            f"save_pruned needs the spec that rebuilds the unpruned architecture (e.g. 'torchvision:resnet18' or "
            f"'package.module:factory'), got {shown(spec)}"
        )
    resolved(out)  # a loop of symbolic links on the way is named
    if out.exists() and not out.is_dir():
        raise UserError(f"{str(out)!r} is a file; give a folder path to save_pruned().")
    if holds_the_working_folder(out):  # the swap left the process in a deleted folder (os.getcwd() failed)
        raise UserError(
            f"save_pruned: {str(out)!r} is the current folder, a parent of it or your home; the folder is replaced "
            "as a whole, so give a folder of its own (e.g. 'pruned/')."
        )
    check_not_meta(model)  # NotImplementedError: Cannot copy out of meta tensor
    check_masks(model)  # "the history's step 0 slices 3.weight, which this model does not have" (weight_orig)
    nan = nan_tensor(model.state_dict(), dict(model.named_parameters()))
    _check_extra_state(model)
    if nan:  # written, then refused by load_pruned as damaged
        raise UserError(
            f"save_pruned: the model is not finite: {nan}; load_pruned would refuse it. Nothing was written."
        )
    options = _checked_options(options)
    # the module the history names: a compiled or DataParallel model's tensors were saved under '_orig_mod.' /
    # 'module.', which the rebuilt model did not have (a wrapper the history was recorded on stays)
    model = history.described(model)
    problem = _before_its_history(model, history)
    if problem:  # the folder was written, and load_pruned then called it damaged or tampered with
        raise UserError(f"save_pruned: {problem}. Nothing was written.")
    added: dict[str, dict[str, Any]] = {}  # plain attributes set after building (model.class_names): kept
    problem = _rebuild_problem(spec, options, model, history, example_input_shape, added)
    if problem and not rebuild_check and _UNCLAIMED in problem:
        import warnings

        warnings.warn(f"save_pruned: {problem}; the folder is written all the same", RuntimeWarning, stacklevel=2)
    elif problem:  # written, then refused by load_pruned as "damaged or tampered with"
        raise UserError(f"save_pruned: {problem}. Nothing was written.")
    _check_input_shape(model, example_input_shape)
    foreign = _foreign_own_files(out)
    if foreign:  # a project folder's own model.pt (the unpruned weights) was replaced without a word
        raise UserError(
            f"save_pruned: {str(out)!r} holds {', '.join(foreign)}, which no earlier save_pruned wrote (there is no "
            "CleanAI architecture.json beside it); saving would replace it. Save into another folder (e.g. "
            f"{str(out / 'pruned')!r}) or move the file first. Nothing was written."
        )
    target = target_of(out)
    before = snapshot(target)

    def unchanged() -> None:
        if snapshot(target) != before:
            raise UserError(f"{str(out)!r} changed while the model was being saved; nothing was replaced. Save again.")

    with staged_folder(out, check=unchanged, expected=before) as tmp:
        # dense in the layout each tensor had: made contiguous, a channels-last model came back NCHW
        state = state_with_versions(model, {k: _saved_tensor(v) for k, v in model.state_dict().items()})
        _atomic(tmp / "model.pt", lambda fh: torch.save(state, fh))
        atomic_write_text(tmp / "history.json", _json(history.to_json()))
        arch = {
            "format": FORMAT_VERSION,
            "cleanai_version": __version__,
            "spec": spec,
            "options": options,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "example_input_shape": list(example_input_shape) if example_input_shape is not None else None,
            "settings": module_settings(model),  # bn.eps set after building was lost on reload
            **({"added_settings": added} if added else {}),
        }
        atomic_write_text(tmp / "architecture.json", _json(arch))
        if save_pickle:
            _save_pickle(tmp / "model_full.pt", model)
        written = _save_outputs(model, tmp, example_inputs, spec, report)
        if written:  # named, so that a later save into the folder replaces them rather than keeping stale ones
            arch["outputs"] = written
            atomic_write_text(tmp / "architecture.json", _json(arch))
        if before:
            _carry_over(target, tmp, skip=(*OWN_FILES, *written, *_earlier_outputs(target)))
    return out


def _check_input_shape(model: nn.Module, shape: Any) -> None:
    """A :class:`UserError` where ``example_input_shape`` is out of form, or where the
    pruned ``model`` does not run on it. ``load_pruned`` runs the rebuilt model once on
    zeros of that shape (batch of one, the model's floating dtype) to give lazy layers their
    shapes and to check the saved settings, and ``cleanai explain FOLDER`` traces it: a
    shape the model cannot take was written without a word (only its form was checked), and
    a size of 0 was written and then ignored at load. Zeros of integer dtype are tried
    where floating ones fail (token ids). Shapes of more than 2**24 values are checked for
    form only, as ``load_pruned`` does not run them either."""
    from cleanai_core.model_state import preserved
    from cleanai_core.runtime import device_of

    if shape is None:
        return
    if (
        not isinstance(shape, (list, tuple))
        or not 1 <= len(shape) <= 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise UserError(
            f"example_input_shape={shape!r} must be a list of 1 to 8 positive sizes, the shape of one input "
            "(e.g. [1, 3, 224, 224])"
        )
    probe_shape = (1, *shape[1:])  # what load_pruned runs: a batch of one
    if math.prod(probe_shape) > 2**24:
        return
    device = device_of(model) or torch.device("cpu")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    failures = []
    for kind in (dtype, torch.long):
        try:
            with torch.no_grad(), preserved(model):  # in eval mode; modes, buffers and attributes put back
                model(torch.zeros(probe_shape, dtype=kind, device=device))
            return
        except Exception as exc:  # noqa: BLE001 - any failure of the forward is the answer
            failures.append(f"{str(kind).removeprefix('torch.')}: {type(exc).__name__}: {str(exc)[:160]}")
    raise UserError(
        f"save_pruned: example_input_shape={list(shape)} does not run the pruned model: zeros of shape "
        f"{list(probe_shape)} (a batch of one, as load_pruned runs it to give lazy layers their shapes and check "
        f"the saved settings) failed ({'; '.join(failures)}). Give the shape of one input as the model takes it "
        "(e.g. [1, 3, 224, 224]), or leave example_input_shape out. Nothing was written."
    )


def _save_outputs(model: nn.Module, folder: Path, example: Any, spec: str, report: dict[str, Any] | None) -> list[str]:
    """Run the ``cleanai_save_outputs`` plugins on ``folder`` (the Hugging Face plugin writes
    ``hf/``): the one code path of ``save_pruned`` and ``cleanai prune``, which wrote ``hf/``
    alone (a Python user's HF model got no folder ``from_pretrained`` loads). The plugins
    get the model on the CPU in eval mode, without moving or switching the caller's. Returns
    the names of the entries they added; their report entries go into ``report``."""
    from cleanai_core.model_state import copy_model, preserved
    from cleanai_core.plugins import get_plugin_manager
    from cleanai_core.runtime import device_of

    present = {p.name for p in folder.iterdir()}
    with preserved(model):  # the caller's modes and attributes put back
        on_cpu = model if device_of(model) in (None, torch.device("cpu")) else copy_model(model).cpu()
        results = get_plugin_manager().hook.cleanai_save_outputs(
            model=set_mode(on_cpu, False), folder=folder, options={"example": example, "model_spec": spec}
        )
    for extra in results:
        if report is not None:
            report.update(extra or {})
    return sorted(p.name for p in folder.iterdir() if p.name not in present)


def _earlier_outputs(folder: Path) -> list[str]:
    """The entries an earlier ``save_pruned`` into ``folder`` had its output plugins write
    (``outputs`` in its ``architecture.json``): replaced, never carried over stale."""
    try:
        names = json.loads((folder / "architecture.json").read_text()).get("outputs") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")]


def _foreign_own_files(out: Path) -> list[str]:
    """The files of ``out`` named like the ones :func:`save_pruned` writes, where ``out`` is
    not a folder it wrote (no ``architecture.json`` of CleanAI's form): someone else's."""
    if not out.is_dir():
        return []
    present = [name for name in OWN_FILES if os.path.lexists(out / name)]
    if not present:
        return []
    try:
        arch = json.loads((out / "architecture.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return present
    return [] if isinstance(arch, dict) and "spec" in arch and "format" in arch else present


#: what :func:`_rebuild_problem` says of a spec no installed loader claims
_UNCLAIMED = "no installed loader can rebuild"


def _rebuild_problem(
    spec: str,
    options: dict[str, Any],
    model: nn.Module,
    history: Any,
    example_input_shape: Any = None,
    added: dict[str, dict[str, Any]] | None = None,
) -> str | None:
    """Why the folder would not load: the tensors of what ``load_pruned`` rebuilds (``spec``
    and ``options``, ``history`` replayed; built on the meta device, so nothing is
    allocated) do not fit ``model``'s, because a layer was replaced or a parametrization
    (``weight_norm``) added after the model was built. ``None`` when they fit, or when the
    architecture cannot be rebuilt here (a pickled model, a factory that needs real
    tensors): ``load_pruned`` then says why. ``added`` receives the plain attributes set on
    ``model`` after it was built (the rebuilt model lacks them), by module name, for
    ``architecture.json``'s ``added_settings``; the others are named in a warning."""
    from cleanai_core.saved_folder import state_dict_problems

    opts = dict(options, pretrained=False, weights=None, trust_model=False, trust_code=True)
    opts["warn_random_weights"] = False
    try:
        fresh = _meta_rebuild(spec, opts, history)
        if isinstance(fresh, str):  # load_pruned runs a lazy model once on the recorded input shape first
            return None if example_input_shape is not None else _lazy_problem(spec, fresh)
        if fresh is None:  # no loader claims the spec: the folder was written, load_pruned then refused it
            return (
                f"load_pruned could not load the folder: {_UNCLAIMED} {spec!r} (give timm:NAME, "
                "torchvision:NAME, a package.module:factory that builds the unpruned model, or a spec an installed "
                "loader plugin reads)"
            )
        own = fresh.state_dict()
        state = model.state_dict()
        problems = [p for p in state_dict_problems(own, state) if "meta device" not in p]
        problems += _buffer_problems(fresh, model, state)
        lost = [] if problems else _added_attributes(fresh, model, added if added is not None else {})
    except SpecError as exc:  # a factory spec naming nothing to call: the folder was written, and never loaded
        return f"load_pruned could not load the folder: {str(exc).rstrip('.')}"
    except UserError:  # the history does not replay on what the spec builds: written, then called damaged
        return _changed_after_build(spec, opts, model, history)
    except Exception:  # noqa: BLE001 - the check is best effort; load_pruned reports its own failures
        return None
    if lost:
        import warnings

        warnings.warn(
            f"save_pruned: {', '.join(lost)}, set on the model after it was built, "
            f"{'is not a plain value' if len(lost) == 1 else 'are not plain values'} (numbers, text, flags or lists "
            "of them, which architecture.json keeps): the model load_pruned returns will not have "
            f"{'it' if len(lost) == 1 else 'them'}. Set them again after loading, or store them as plain values.",
            RuntimeWarning,
            stacklevel=3,
        )
    if not problems:
        return None
    changed = _changed_after_build(spec, opts, model, history)  # a BatchNorm fused away: Identity in its place
    if changed is not None:
        return changed
    hint = (
        "a parametrization (weight_norm, spectral_norm) was added after the model was built: remove it before "
        "saving (torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')) or add it in the factory"
        if any(".parametrizations." in k for k in state)
        and not any(".parametrizations." in k for k in fresh.state_dict())
        else "a layer was replaced or added after the model was built (a new head?), or it was built with keyword "
        "arguments (img_size=64): give the spec and options that build this model (num_classes, and the keyword "
        "arguments as options={'model_kwargs': {...}}), or a package.module:factory that builds it"
    )
    return (
        f"load_pruned could not load the folder: the model {spec!r} rebuilds with the history replayed does not fit "
        f"this one ({'; '.join(problems)}); {hint}"
    )


def _changed_after_build(spec: str, options: dict[str, Any], model: nn.Module, history: Any) -> str | None:
    """Why ``history`` does not replay on what ``spec`` builds where ``model`` is not what
    it builds: the layers whose class differs (``conv + bn + relu`` fused by
    ``torch.ao.quantization.fuse_modules``: a ``ConvReLU2d`` where it builds a ``Conv2d``,
    ``Identity`` where it builds the ``BatchNorm2d``), ``None`` where none does (the
    history itself is at fault). Such a folder was written, and ``load_pruned`` called it
    "damaged, tampered with or not written by this CleanAI"."""
    import warnings

    from cleanai_core.plugins import get_plugin_manager, load_model

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = history.described(load_model(get_plugin_manager(), spec, options))
        built = dict(fresh.named_modules())
    except Exception:  # noqa: BLE001 - best effort, as the rest of the check
        return None
    own = dict(model.named_modules())
    changed: list[str] = []  # a class other than the spec's (fused into, or Identity), or gone (a deleted .bn)
    for name, other in built.items():
        if not name or any(name.startswith(c + ".") for c in changed):
            continue
        module = own.get(name)
        gone = module is None and any(True for _ in other.parameters())
        # a subclass is no change: the pruned variants plugins swap in (``PrunedInvertedResidual``), a
        # parametrized layer (``ParametrizedConv2d``, which keeps its own message); a fused one is another class
        if gone or (module is not None and not isinstance(module, type(other))):
            changed.append(name)
    if not changed:
        return None
    shown_ = ", ".join(
        f"{n!r} is {type(own[n]).__name__} where it builds {type(built[n]).__name__}"
        if n in own
        else f"{n!r} ({type(built[n]).__name__}) is gone"
        for n in changed[:4]
    ) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return (
        f"load_pruned could not load the folder: the model was changed after {spec!r} built it ({shown_}): layers "
        "fused (torch.ao.quantization.fuse_modules, a conv with its BatchNorm folded in) or replaced, which "
        f"load_pruned cannot rebuild from {spec!r}. Give a package.module:factory that builds the model as it was "
        "pruned (build it, then fuse it the same way), or prune before fusing"
    )


def _meta_rebuild(spec: str, options: dict[str, Any], history: Any, pm: Any = None) -> nn.Module | str | None:
    """The model ``spec`` and ``options`` build, with ``history`` replayed, on the meta
    device (nothing allocated, whatever sizes the options ask for); the name and class of a
    lazy layer (``"conv (LazyConv2d)"``) where it has one, which takes its shape from a first
    forward; ``None`` where the loader gives no module. Failures raise, as the loader's."""
    import warnings

    from cleanai_core.plugins import load_model, plugin_manager
    from cleanai_core.saved_folder import lazy_module, replay_history

    pm = plugin_manager(pm, "_meta_rebuild")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = load_model(pm, spec, options)
        if not isinstance(fresh, nn.Module):
            return None
        fresh = history.described(fresh)
        lazy = lazy_module(fresh)
        if lazy is not None:
            return f"{lazy!r}, {type(fresh.get_submodule(lazy)).__name__}"
        missing = _first_missing(fresh, history, first_only=True)
        # another architecture (save_pruned with the spec of another model: written, never loaded); a layer the
        # architecture has, changed after it was built (weight_norm added), is named by the shapes' comparison
        if missing and missing[1].split(".")[0] not in dict(fresh.named_children()):
            raise SpecError(
                f"the history's step {missing[0]} slices {missing[1]}, which the model {spec!r} builds does not have: "
                "the spec builds another architecture than the one pruned; give the spec (and options) of the model "
                "the history was recorded on"
            )
        replay_history(history, fresh, Path("history.json"), pm)
    return fresh


def _lazy_problem(spec: str, lazy: str) -> str:
    """The folder of a model with lazy layers (``lazy``: the name and class of one) saved
    without an input shape: ``load_pruned`` failed replaying the history on them
    (``RuntimeError: Can't access the shape of an uninitialized parameter``)."""
    return (
        f"load_pruned could not load the folder: the model {spec!r} has lazy layers ({lazy}), which take their "
        "shapes from a first input; give "
        "example_input_shape=[1, C, H, W] (the shape of one input) so that load_pruned can run it once"
    )


def _added_attributes(fresh: nn.Module, model: nn.Module, added: dict[str, dict[str, Any]]) -> list[str]:
    """Attributes of ``model``'s modules that the rebuilt ``fresh`` lacks (set after
    building): the plain ones into ``added`` (by module name), and the names of the others,
    which ``architecture.json`` cannot keep (``["model.meta (dict)"]``, at most 5)."""
    from cleanai_core.saved_folder import module_settings, unsaved_setting

    built = dict(fresh.named_modules())
    plain = module_settings(model)
    lost = []
    for name, m in model.named_modules():
        other = built.get(name)
        if other is None:
            continue
        for key, value in vars(m).items():
            if key in vars(other) or hasattr(other, key):
                continue
            if key in plain.get(name, {}):
                added.setdefault(name, {})[key] = plain[name][key]
            elif unsaved_setting(key, value):
                lost.append(f"{'.'.join(['model', name] if name else ['model'])}.{key} ({type(value).__name__})")
    return lost[:5]


def _buffer_problems(fresh: nn.Module, model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Buffers outside the ``state_dict`` (``persistent=False``: timm's relative position
    index and log-spaced coordinates, sized by the window) that the rebuilt model has in
    another shape than ``model``: the weights load, and the forward fails or computes with
    another window (MaxxViT built with ``img_size=64``, saved without it)."""
    own = dict(fresh.named_buffers())
    found = []
    for name, buf in model.named_buffers():
        other = own.get(name)
        if name not in state and other is not None and tuple(other.shape) != tuple(buf.shape):
            owner, _, attr = name.rpartition(".")
            if _refilled_by_a_method(type(model.get_submodule(owner)), attr):
                continue  # a cache sized by the input, as the rebuilt model fills it at its first forward
            found.append(f"{name} {tuple(buf.shape)} vs model {tuple(other.shape)} (a buffer outside the state_dict)")
    return found[:3]


@functools.cache
def _refilled_by_a_method(cls: type, attr: str) -> bool:
    """Whether the forward of ``cls`` assigns ``self.<attr>``: a buffer the forward
    recomputes for the input it gets (timm ConViT's ``rel_indices``, a ``(1, 1, 1, 3)``
    placeholder until the first forward sizes it by the patches), which a rebuilt model has
    in its built shape and fills the same way. Only ``forward`` (and ``_forward*``) count:
    timm's ``set_input_size`` re-registers window tables too, and a model saved without the
    ``img_size`` that sized them must still be refused. ``False`` where the source cannot
    be read."""
    assign = re.compile(rf"\bself\.{re.escape(attr)}\s*=[^=]")
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.nn") or klass is object:
            continue
        for key, fn in vars(klass).items():
            if not (key == "forward" or key.startswith("_forward")) or not inspect.isfunction(fn):
                continue
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            if assign.search(source):
                return True
    return False


def _save_pickle(path: Path, model: nn.Module) -> None:
    """``model_full.pt``: the whole module pickled. A model holding a lambda, a local
    function or class (a hook, a patched ``forward``) cannot be pickled: that was the
    pickler's own ``AttributeError: Can't pickle local object`` traceback."""
    import pickle

    try:
        _atomic(path, lambda fh: torch.save(model, fh))
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise UserError(
            f"save_pruned(save_pickle=True): the model cannot be pickled ({type(exc).__name__}: {exc}); it holds "
            "a lambda, a local function or class, or an open resource (a hook, a patched forward). Save without "
            "save_pickle (command line: leave out --save-pickle): model.pt, history.json and architecture.json "
            "rebuild it with load_pruned(). Nothing was written."
        ) from None


def _first_missing(model: nn.Module, history: Any, first_only: bool = False) -> tuple[int, str] | None:
    """The step and name of the first tensor the history slices that ``model`` lacks
    (another architecture), else ``None``. ``first_only``: the first step that slices
    anything alone (the unpruned architecture lacks the biases that bias compensation adds
    and later steps slice)."""
    from cleanai_core.graph.context import tensor_name

    have = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    have |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    for i, shapes in enumerate(history._shapes()):
        missing = sorted(n for n in (shapes or {}) if tensor_name(n) not in have)
        if missing:
            return i, missing[0]
        if first_only and shapes:
            return None
    return None


def _before_its_history(model: nn.Module, history: Any) -> str | None:
    """Why ``model`` is not what ``history`` made: the history's tensors are missing from it
    (another model), or it has the shapes the history's last step slices from and that step
    would change them (the model before pruning, e.g. the original instead of what
    ``prune()`` returned). ``None`` when neither is seen."""
    from cleanai_core.history import shape_mismatch, shapes_sliced
    from cleanai_core.model_state import copy_model
    from cleanai_core.slicing import apply_edits

    recorded = history._shapes()
    missing = _first_missing(model, history)
    if missing:
        return (
            f"the history's step {missing[0]} slices {missing[1]}, which this model does not have; pass the model "
            "this history was recorded with (what pruner.prune() returned, with pruner.history)"
        )
    last = max((i for i, step in enumerate(history.steps) if step and recorded[i]), default=None)
    if last is None or shape_mismatch(history, last, model) is not None:
        return None
    try:  # the model has the shapes the last step slices from; does the step change them?
        probe = copy_model(model)
        apply_edits(probe, history.steps[last])
        after = shapes_sliced(probe, history.steps[last])
    except Exception:  # noqa: BLE001 - a history that does not apply is for load_pruned to name
        return None
    changed = next((n for n, shape in recorded[last].items() if after.get(n, shape) != shape), None)
    if changed is None:
        return None
    return (
        f"the model has the shapes the history's step {last} prunes from ({changed} is "
        f"{tuple(recorded[last][changed])}, the step leaves {tuple(after[changed])}): it is the model before "
        "pruning. Pass the pruned model (what pruner.prune() returned) with its pruner.history"
    )


def _check_extra_state(model: nn.Module) -> None:
    """A :class:`UserError` where a module's extra state (``get_extra_state()``) is not plain
    data that ``load_pruned`` reads without running code (``torch.load(weights_only=True)``:
    tensors, numbers, text, lists and dicts of them). Such a module's state crashed
    ``save_pruned`` (``AttributeError: 'dict' object has no attribute 'layout'``)."""
    import io as _io

    from cleanai_core.saved_folder import is_extra_state

    extra = {k: v for k, v in model.state_dict().items() if is_extra_state(k)}
    if not extra:
        return
    buffer = _io.BytesIO()
    try:
        torch.save(extra, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:  # noqa: BLE001 - pickling or the safe loader refusing: either way not plain data
        owners = [k.rpartition(".")[0] for k in extra]
        names = ", ".join(f"module {o!r}" if o else "the model" for o in owners[:3])
        raise UserError(
            f"save_pruned: the extra state of {names} (get_extra_state()) is not plain data, which model.pt must hold "
            "for load_pruned to read it without running code: return tensors, numbers, text, or lists and dicts of "
            "them from get_extra_state. Nothing was written."
        ) from None


def _saved_tensor(v: Any) -> Any:
    """``v`` on the CPU, dense in the layout it had (a sparse buffer as it is: it has no
    memory format, and ``contiguous`` refused it before 2026-12-02). A module's extra state
    (not a tensor) with its tensors on the CPU."""
    if not isinstance(v, torch.Tensor):
        from torch.utils._pytree import tree_map

        return tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, v)
    v = v.detach().cpu()
    return v if v.layout != torch.strided else v.contiguous(memory_format=memory_format_of(v))


def _checked_options(options: Any) -> dict[str, Any]:
    """The architecture options of ``options`` (others are left out), as ``load_pruned``
    will accept them: a folder with ``num_classes="10"`` was written, then refused."""
    if options is not None and not isinstance(options, dict):
        raise UserError(f"save_pruned options must be a dict such as {{'num_classes': 10}}, got {shown(options)}")
    kept = {k: v for k, v in (options or {}).items() if k in ARCH_OPTIONS and v is not None}
    problem = arch_option_problem(kept)
    if problem is None:
        try:
            json.dumps(kept, default=_json_default, allow_nan=False)
        except (TypeError, ValueError) as exc:
            problem = f"the options cannot be written as JSON ({exc})"
    if problem:
        raise UserError(f"save_pruned: {problem}; load_pruned could not rebuild the model. Nothing was written.")
    return kept


def _folder_arg(path: Any, verb: str) -> Path:
    """``path`` as a ``Path``; anything else is named briefly (a model given first, as
    ``save_pruned(model, "out", ...)``, printed the whole network's repr)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        order = " (save_pruned(out_dir, model, history, spec): the folder comes first)"
        order = order if verb == "save_pruned" and isinstance(path, nn.Module) else ""
        raise UserError(f"{verb} needs a folder path (str or Path), got {shown(path)}{order}")
    return Path(path)


def _carry_over(src: Path, dst: Path, skip: tuple[str, ...]) -> None:
    """Hard-link (or copy) every entry of ``src`` except ``skip`` into ``dst``."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    for p in src.iterdir():
        if p.name in skip or p.name.startswith(INSIDE):
            continue
        if p.is_symlink():
            os.symlink(os.readlink(p), dst / p.name)
        elif p.is_dir():
            shutil.copytree(p, dst / p.name, symlinks=True, copy_function=link)
        else:
            link(str(p), str(dst / p.name))


# under the caller's inference_mode the rebuilt model was made of inference tensors: it could never train
@torch.inference_mode(False)
def load_pruned(
    out_dir: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    trust_model: bool = False,
    trust_code: bool = False,
) -> nn.Module:
    """Rebuild a pruned model saved by :func:`save_pruned` (or ``cleanai prune``).

    Rebuilds the unpruned architecture from ``architecture.json`` (no pretrained weights are
    downloaded), replays ``history.json`` on it, then loads ``model.pt`` strictly, in the
    dtypes it was saved in, and gives the modules their saved settings (plain attributes such
    as a BatchNorm's ``eps``). The model is returned in eval mode on ``map_location``. Every
    file is checked first; a tampered or foreign folder raises :class:`UserError` naming the
    file and the problem.

    Nothing in the folder runs code unless you say so: the architecture comes from a
    registered model source (``timm:``, ``torchvision:``, installed loader plugins).
    ``trust_code`` allows an import spec (``package.module:factory``) and its keyword
    arguments; ``trust_model`` allows a pickled model file (rebuilding unpickles it again).

    The caller's random state is left as it was (the architecture's layers initialise
    randomly before the saved weights replace them, on a fork of the generators).
    """
    return rebuild_pruned(out_dir, map_location, trust_model, trust_code)[0]


def rebuild_pruned(
    out_dir: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    trust_model: bool = False,
    trust_code: bool = False,
    *,
    saved_dtypes: bool = True,
) -> tuple[nn.Module, torch.dtype | None, list[str]]:
    """:func:`load_pruned`, the floating dtype ``model.pt`` stores where it is narrower than
    the float32 the architecture is rebuilt in (a ``bfloat16`` checkpoint's pruned model),
    else ``None``, and the tensors it keeps in float32 beside it (a MoE model's routers).
    ``saved_dtypes=False``: such a model keeps the rebuilt float32 (holding ``model.pt``'s
    values exactly), to be computed in and written back in the stored dtypes, as ``cleanai
    prune`` does with the checkpoint it pruned first (``--model FOLDER``)."""
    from cleanai_core.options import check_switches
    from cleanai_core.plugins import get_plugin_manager, load_model
    from cleanai_core.runtime import checked_device, private_rng
    from cleanai_core.saved_folder import (
        apply_settings,
        initialise_lazy,
        read_architecture,
        read_history,
        read_probe,
        read_settings,
        read_state,
        replay_history,
    )
    from cleanai_core.special_files import check_not_special

    out = _folder_arg(out_dir, "load_pruned")
    check_switches(trust_model=trust_model, trust_code=trust_code)  # trust_code="false" ran the folder's code
    # a bad map_location, or cuda on a machine without one, was blamed on a damaged model.pt
    map_location = checked_device(map_location, "map_location=")
    if not out.exists():  # said "has no architecture.json"
        raise UserError(f"{str(out)!r} does not exist; give a folder written by `cleanai prune` or save_pruned().")
    if not out.is_dir():  # a file of the folder (its model.pt) said "has no architecture.json"
        parent = out.parent if (out.parent / "architecture.json").is_file() else None
        raise UserError(
            f"{str(out)!r} is a file; give the folder written by `cleanai prune` or save_pruned()"
            + (f": load_pruned({str(parent)!r})." if parent is not None else ".")
        )
    for name in ("architecture.json", "history.json", "model.pt"):
        check_not_special(out / name, "the saved folder's file")  # said "has no model.pt"
        if (out / name).is_dir():  # said "has no model.pt", which is there
            raise UserError(
                f"{str(out / name)!r} is a folder, where `cleanai prune` and save_pruned() write a file; the folder is "
                "damaged or not written by CleanAI: save the pruned model again."
            )
        if not (out / name).is_file():
            raise UserError(f"{str(out)!r} has no {name}; give a folder written by `cleanai prune` or save_pruned().")
    spec, options = read_architecture(out / "architecture.json", trust_code=trust_code)
    history = read_history(out / "history.json")
    options.update(
        pretrained=False,
        weights=None,
        trust_model=trust_model,
        trust_code=trust_code,
        spec_source=str(out / "architecture.json"),
        warn_random_weights=False,
    )
    with private_rng(map_location):  # building the architecture drew from the caller's random state
        pm = get_plugin_manager()
        state = _checked_on_meta(spec, options, history, out, map_location, pm)
        try:
            model = load_model(pm, spec, options)
        except UserError as exc:
            where = str(out / "architecture.json")
            raise (exc if where in str(exc) else UserError(f"{where!r}: {exc}")) from None
        if model is None:
            raise UserError(
                f"{str(out / 'architecture.json')!r}: no installed loader can rebuild {spec!r}; install the plugin or "
                "package that provides it."
            )
        model = history.described(model)  # a factory returning torch.compile(model): the module it wraps
        initialise_lazy(model, out / "architecture.json")
        replay_history(history, model, out / "history.json", pm)
        state = read_state(out / "model.pt", model, map_location, state)
        model.to(map_location)
        stored, kept_float32 = narrower_stored_dtype(model, state)
        take_saved_form(model, state, dtypes=saved_dtypes or stored is None)
        model.load_state_dict(state_with_versions(model, state), strict=True)
        arch = out / "architecture.json"
        added = read_settings(arch, "added_settings")
        set_mode(model, False)  # not model.eval(): a module exported with torch.export refuses it
        apply_settings(model, read_settings(arch), arch, pm, read_probe(arch, model, map_location), added)
        return set_mode(model, False), stored, kept_float32


def narrower_stored_dtype(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[torch.dtype | None, list[str]]:
    """The floating dtype narrower than float32 that ``state`` stores the tensors of a float32
    ``model`` in, and the names it keeps in float32 beside it (a bfloat16 MoE checkpoint's
    routers: ``from_pretrained`` keeps them float32); ``(None, [])`` where there is no such
    dtype (a float32 or float64 model, two narrow dtypes, a model rebuilt in another
    dtype). Such a folder given as ``--model FOLDER`` was pruned in its stored dtypes, in
    bfloat16, where its first prune had computed in float32."""
    own = dict([*model.named_parameters(), *model.named_buffers()])
    floats = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and k in own]
    narrow = {state[k].dtype for k in floats} - {torch.float32}
    if len(narrow) != 1 or {own[k].dtype for k in floats} != {torch.float32}:
        return None, []
    dtype = narrow.pop()
    if dtype.itemsize >= 4:
        return None, []
    return dtype, [k for k in floats if state[k].dtype == torch.float32]


def _checked_on_meta(
    spec: str, options: dict[str, Any], history: Any, out: Path, map_location: Any, pm: Any
) -> dict[str, torch.Tensor] | None:
    """``model.pt``'s state, checked against the architecture rebuilt on the meta device
    (``history`` replayed) before ``load_pruned`` builds it for real: an ``architecture.json``
    edited to ask for a huge model (``num_classes`` of 10**7: 20 GB for a ResNet-18's head,
    the out-of-memory killer) is a damaged folder without allocating it. ``None`` where the
    architecture cannot be rebuilt there (a pickled model, whose rebuild runs its code; a
    loader that needs real tensors; lazy layers): the real build then checks, as before."""
    from cleanai_core.saved_folder import read_state

    if Path(spec).exists():  # a pickled model file: unpickling runs its code, once is enough
        return None
    try:  # a factory the user trusts declines the probe (it ran twice: once here, once for real)
        fresh = _meta_rebuild(spec, dict(options, meta_probe=True), history, pm)
    except Exception:  # noqa: BLE001 - best effort: the real build reports its own failures
        return None
    if not isinstance(fresh, nn.Module):
        return None
    return read_state(out / "model.pt", fresh, map_location)


def take_saved_form(model: nn.Module, state: dict[str, torch.Tensor], dtypes: bool = True) -> None:
    """Give every parameter and buffer of ``model`` the dtype and memory format of its
    tensor in ``state``: the architecture is rebuilt in float32 NCHW, and
    ``load_state_dict`` copies into it, so a float16, bfloat16 or float64 model came back
    as float32 (other outputs, twice the size) and a channels-last one came back NCHW
    (slower on channels-last inputs). The parameter objects stay (tied weights stay tied).
    ``dtypes=False``: the memory formats only."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            saved = state.get(name)
            if saved is None:
                continue
            if dtypes and saved.dtype != t.dtype:
                t.data = t.data.to(saved.dtype)
            fmt = memory_format_of(saved)
            if saved.shape == t.shape and fmt != memory_format_of(t):
                t.data = t.data.contiguous(memory_format=fmt)
