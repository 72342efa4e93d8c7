"""Built-in model loaders for the command line and saved folders (``--model``):

- ``timm:NAME`` and ``torchvision:NAME`` (architecture; weights from ``--weights FILE``;
  nothing is downloaded: torchvision's segmentation and detection builders get
  ``weights_backbone=None`` unless ``model_kwargs`` name one),
- ``package.module:factory`` (a callable returning an ``nn.Module``), only when
  ``options["trust_code"]`` is true: importing and calling it runs code. The command line
  sets it for a spec typed there; a spec read from a config file or a saved folder needs
  ``--trust-code`` / ``trust_code=True``,
- a whole pickled model file (``torch.save(model, path)``), only with ``--trust-model``,
  because unpickling runs code stored in the file,
- a folder ``cleanai prune`` / ``save_pruned`` wrote, to prune its model further
  (:func:`load_saved_folder`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from cleanai_core import hookimpl
from cleanai_core.errors import SpecError, UserError, model_fault
from cleanai_core.extras import import_extra, module_name_problem, search_path_hint
from cleanai_core.saved_folder import beyond_dtype, is_extra_state, nan_tensor, state_dict_problems, tensors_of
from cleanai_core.special_files import (
    check_not_packed,
    check_not_special,
    cleanai_folder_kind,
    not_torch_save_error,
    unreadable,
)

log = logging.getLogger("cleanai")

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
MODEL_FORMS = (
    "timm:NAME, torchvision:NAME (add --weights FILE with a state_dict), package.module:factory, "
    "or a whole-model file saved with torch.save(model, path) (needs --trust-model)"
)
# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def _import_attr(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    problem = module_name_problem(module_name)
    if problem:
        raise SpecError(f"{what} {spec!r}: {module_name!r} {problem}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(
            f"cannot import module {module_name!r} for {what} {spec!r}: {exc}.{search_path_hint(module_name, exc)} "
            "Check the spelling and that the package is installed in this Python environment."
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"module {module_name!r} has no attribute {attr!r} (from {what} {spec!r}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"{what} {spec!r} names {type(obj).__name__}, not a callable.")
    return obj


def _require_trust(spec: str, what: str, options: dict[str, Any], kwargs: dict[str, Any] | None = None) -> None:
    """Refuse to import and call ``spec`` unless the caller said it trusts code."""
    if options.get("trust_code"):
        return
    source = f" (from {options['spec_source']})" if options.get("spec_source") else ""
    extra = f" with keyword arguments {sorted(kwargs)}" if kwargs else ""
    raise UserError(
        f"{what} {spec!r}{source} is an import spec: using it imports {spec.partition(':')[0]!r} and calls "
        f"{spec.partition(':')[2]!r}{extra}, which runs code. Only registered sources (timm:NAME, torchvision:NAME, "
        "installed loader plugins) are used without consent. If you trust it, pass trust_code=True (command line: "
        "--trust-code)."
    )


def call_spec(spec: str, what: str, kwargs: dict[str, Any], options: dict[str, Any]) -> Any:
    """Import ``package.module:callable`` and call it with ``kwargs``, after checking
    ``options["trust_code"]``. Errors in the call (and ``sys.exit``) become a ``UserError``."""
    _require_trust(spec, what, options, kwargs)
    fn = _import_attr(spec, what)
    args = ", ".join(f"{k}=..." for k in kwargs)
    try:
        return fn(**kwargs)
    except UserError:
        raise
    except SystemExit as exc:
        raise UserError(f"{what} {spec}({args}) called sys.exit({exc.code!r}) instead of returning a value.") from None
    except Exception as exc:
        raise UserError(f"calling {what} {spec}({args}) failed: {type(exc).__name__}: {str(exc)[:300]}") from exc


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def is_saved_folder(path: Path) -> bool:
    """Whether ``path`` is a folder ``cleanai prune`` / ``save_pruned`` wrote (its three own files)."""
    return path.is_dir() and all((path / n).is_file() for n in ("architecture.json", "history.json", "model.pt"))


def _saved_folder_note(path: Path) -> str:
    """A sentence for a folder written by ``cleanai prune`` / ``save_pruned`` given as weights."""
    if not is_saved_folder(path):
        return ""
    return (
        f" The folder {str(path)!r} was written by `cleanai prune` or save_pruned() and holds a pruned model, whose "
        "model.pt does not fit the unpruned architecture: give the folder itself as --model to prune it further "
        f"(in Python: cleanai_core.io.load_pruned({str(path)!r}))."
    )


def load_saved_folder(path: Path, options: dict[str, Any]) -> nn.Module:
    """The pruned model in a folder ``cleanai prune`` / ``save_pruned`` wrote, to prune it
    further (``--model FOLDER``): rebuilt by :func:`~cleanai_core.io.load_pruned` with the
    consent given on the command line for the folder's own contents (``--trust-model`` for a
    pickled original, ``--trust-code`` for an import spec in its ``architecture.json``:
    typing the folder's name consents to reading it, not to running what it names). Then
    ``--weights`` (e.g. the pruned model fine-tuned since) replace its weights. Writes back
    into ``options``: ``resolved_spec`` and ``arch_options`` (the unpruned architecture the
    new folder names again) and ``prior_history`` (replayed before this job's steps)."""
    from cleanai_core.io import rebuild_pruned
    from cleanai_core.saved_folder import read_architecture, read_history

    if options.get("num_classes") is not None:
        raise UserError(
            f"--model {str(path)!r} is a saved folder, whose architecture.json fixes the architecture; leave out "
            "--num-classes (it applies to timm:/torchvision: specs)."
        )
    trust_code = bool(options.get("trust_folder_code"))
    # a bfloat16 checkpoint pruned by cleanai prune is computed in float32 and written back in bfloat16, as it was
    # the first time (it was pruned in bfloat16, and its perplexity before differed from the first run's after)
    model, stored, kept_float32 = rebuild_pruned(
        path, trust_model=bool(options.get("trust_model")), trust_code=trust_code, saved_dtypes=False
    )
    if stored is not None:  # a bfloat16 MoE folder's routers stay float32 (it was pruned in bfloat16)
        options["stored_dtype"], options["stored_float32"] = stored, kept_float32
    spec, arch_options = read_architecture(path / "architecture.json", trust_code=trust_code)
    history = read_history(path / "history.json")
    options.update(resolved_spec=spec, arch_options=arch_options, prior_history=history)
    if options.get("weights"):
        try:
            _apply_weights(model, options["weights"], str(path))
        except UserError as exc:
            note = _unpruned_weights_note(options["weights"], history, spec)
            if note is None:
                raise
            raise UserError(f"{exc} {note}") from None
    return model


def _unpruned_weights_note(weights: str, history: Any, spec: str) -> str | None:
    """A sentence where ``weights``, given with a pruned model's folder, have the shapes the
    folder's history records before its first step: the unpruned model's (they did "not fit
    'o'", with advice about the architecture and --num-classes)."""
    shapes = (history.meta.get("shapes") or [None])[0]
    try:
        state = load_state_dict_file(weights)
    except UserError:
        return None
    if not shapes or not all(k in state and list(state[k].shape) == list(v) for k, v in shapes.items()):
        return None
    return (
        f"They are the unpruned model's weights (the shapes history.json records before the first prune): to prune "
        f"them, give --model {spec} --weights {weights}; to prune the folder's model further, leave --weights out "
        "(or give its weights fine-tuned since)."
    )


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``state_dict`` safely (``weights_only=True``); unwrap ``{"state_dict": ...}``
    and ``{"model": ...}`` checkpoints and the ``module.`` prefix of DataParallel and the
    ``_orig_mod.`` prefix of ``torch.compile``."""
    path = Path(path)
    if path.is_dir():  # said "does not exist"
        raise UserError(
            f"weights file {str(path)!r} is a folder; give the file torch.save(model.state_dict(), path) "
            f"wrote.{_saved_folder_note(path)}"
        )
    check_not_special(path, "weights file")
    check_not_packed(path, "weights file")
    if not path.is_file():
        raise UserError(f"weights file {str(path)!r} does not exist.")
    if _is_torchscript(path):
        raise UserError(
            f"{str(path)!r} is a TorchScript archive, not a state_dict. Pass a file saved with "
            "torch.save(model.state_dict(), path)."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # JSON, text, an image, an .npz: "holds Python objects (a pickled model) ... --trust-model"
        fix = "Save the weights with torch.save(model.state_dict(), path)."
        other = not_torch_save_error(path, "weights file", fix)
        if other is not None:
            raise other from None
        _unreadable_weights(path, exc)
    for key in ("state_dict", "model_state_dict", "model", "state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(
        isinstance(v, torch.Tensor) or (isinstance(k, str) and is_extra_state(k)) for k, v in obj.items()
    ):  # a module's extra state (get_extra_state) may be any plain value
        raise UserError(f"{str(path)!r} does not hold a state_dict (a dict of parameter names to tensors).")
    # the prefixes of DataParallel / DistributedDataParallel and of torch.compile (a compiled model's
    # state_dict named every tensor '_orig_mod.*' and did not fit the architecture), in any nesting
    while True:
        prefix = next((p for p in ("module.", "_orig_mod.") if obj and all(k.startswith(p) for k in obj)), None)
        if prefix is None:
            return obj
        obj = {k[len(prefix) :]: v for k, v in obj.items()}


def _unreadable_weights(path: Path, exc: Exception) -> NoReturn:
    """The :class:`UserError` for a weights file ``torch.load`` could not read safely."""
    if isinstance(exc, pickle.UnpicklingError):
        if "weights only load failed" not in str(exc).lower():
            raise UserError(f"cannot read weights from {str(path)!r}: it is damaged ({str(exc)[:200]}).") from exc
        raise UserError(
            f"{str(path)!r} holds Python objects (a pickled model or checkpoint), not a plain state_dict; reading "
            "it would run code from the file. Give the model itself as --model with --trust-model if you trust the "
            "file, or save the weights with torch.save(model.state_dict(), path)."
        ) from None
    raise UserError(  # an empty file said "(EOFError: )"
        f"weights file {str(path)!r} {unreadable(path, exc)}; save them again with "
        "torch.save(model.state_dict(), path)."
    ) from None


def _fitting_parts(
    state: dict[str, torch.Tensor], keys: set[str], prefix: str = "", depth: int = 4
) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Every ``(prefix, tensors)`` of ``state`` whose names, under that prefix (up to
    ``depth`` names deep), are exactly ``keys``: a wrapper module's ``model.``."""
    if depth == 0:
        return []
    found = []
    for head in sorted({k.split(".", 1)[0] for k in state if "." in k}):
        part = {k[len(head) + 1 :]: v for k, v in state.items() if k.startswith(head + ".")}
        here = f"{prefix}{head}."
        found += [(here, part)] if set(part) == keys else _fitting_parts(part, keys, here, depth - 1)
    return found


def _without_wrapper_prefix(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` under one leading name (``model.``, ``net.backbone.``), that
    name stripped, where their names are then exactly the model's and no other part's are: a
    PyTorch Lightning checkpoint (``{"state_dict": {"model.conv.weight": ..., "loss.weight":
    ...}}``, the module held as ``self.model``) did not fit, "20 unexpected tensor(s) (e.g.
    ['model.features.0.weight', ...])". Where two parts fit (a teacher and a student),
    nothing is chosen."""
    if set(state) == set(own):
        return state
    found = _fitting_parts(state, set(own))
    if len(found) != 1:
        return state
    prefix, fitted = found[0]
    left = len(state) - len(fitted)
    log.info("weights: read the tensors under %r (a wrapper module's)%s.", prefix,
             f"; {left} other tensor(s) of the file are not the model's" if left else "")  # fmt: skip
    return fitted


def _apply_weights(model: nn.Module, weights: str, spec: str) -> None:
    state = _without_wrapper_prefix(load_state_dict_file(weights), model.state_dict())
    parts = state_dict_problems(model.state_dict(), state)
    if parts:
        fits = [prefix for prefix, _ in _fitting_parts(state, set(model.state_dict()))]
        several = (
            f" The file holds this architecture {len(fits)} times, under {', '.join(map(repr, fits))} (a teacher and a "
            "student?): save the one to prune alone, e.g. torch.save(module.student.state_dict(), path)."
            if len(fits) > 1
            else ""
        )
        raise UserError(
            f"the weights in {weights!r} do not fit {spec!r}: " + "; ".join(parts) + ". "
            "Use the architecture the weights were trained with (and --num-classes if the head differs)."
            + several
            + _saved_folder_note(Path(weights).parent)
        )
    wide = beyond_dtype(model.state_dict(), state)
    if wide:
        raise UserError(
            f"the weights in {weights!r} hold values the model's dtype cannot: {'; '.join(wide[:3])}. The model "
            f"{spec!r} computes in a narrower dtype than the weights were saved in: build it in the weights' dtype, or "
            "give weights trained in its own."
        )
    nan = nan_tensor(state, dict(model.named_parameters()))
    if nan:  # blamed on the data ("non-finite activations ... check the data"), or pruned without a word
        raise UserError(
            f"the weights in {weights!r} are not finite: {nan}. The training run that saved them diverged or the "
            "file is damaged; give finite weights."
        )
    # a model built on the meta device (shapes only) takes the file's tensors themselves: copying into
    # it was a no-op with a warning per tensor, and the run then failed on a model without values
    assign = any(t.is_meta for t in tensors_of(model.state_dict()).values())
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        raise UserError(
            f"the weights in {weights!r} do not load into {spec!r}: {str(exc)[:300]}. Save them again with "
            "torch.save(model.state_dict(), path)."
        ) from None


def _load_model_file(path: Path, options: dict[str, Any]) -> nn.Module:
    check_not_special(path, "--model")
    check_not_packed(path, "--model")
    suffix = path.suffix.lower()
    if suffix in (".onnx", ".tflite", ".pb", ".h5", ".keras", ".safetensors", ".engine"):
        raise UserError(
            f"{str(path)!r}: {suffix} models are not supported; CleanAI prunes PyTorch nn.Modules. "
            f"Give the model as {MODEL_FORMS}."
        )
    if _is_torchscript(path):
        raise UserError(
            f"{str(path)!r} is a TorchScript archive. Pruning needs the Python model to slice its layers; "
            "give the architecture as timm:NAME, torchvision:NAME or package.module:factory and the weights "
            "with --weights FILE (a state_dict)."
        )
    other = not_torch_save_error(path, "--model", f"Give the model as {MODEL_FORMS}.")
    if other is not None:
        raise other
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not zipfile.is_zipfile(path) and not head.startswith((b"\x80", b"PK\x03\x04")):
        if not head:  # said "neither a zip archive nor a pickle; it may be truncated or of another format"
            raise UserError(f"{str(path)!r} is empty (0 bytes); save the model again. Give the model as {MODEL_FORMS}.")
        raise UserError(
            f"{str(path)!r} is not a file written by torch.save (neither a zip archive nor a pickle); it may be "
            f"truncated or of another format. Give the model as {MODEL_FORMS}."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = None  # holds Python objects (a pickled module): needs --trust-model
    except Exception as exc:  # not even a pickle torch can walk: truncated, or a zip of something else
        raise UserError(
            f"{str(path)!r} {unreadable(path, exc)}; save the model again. Give the model as {MODEL_FORMS}."
        ) from None
    else:
        if isinstance(obj, dict):
            saved = _saved_folder_note(path.parent)
            raise UserError(
                f"{str(path)!r} holds a state_dict (weights only, no architecture)."
                + (saved or " Give the architecture with --model timm:NAME / torchvision:NAME / "
                   f"package.module:factory and pass this file as --weights {path}.")
            )  # fmt: skip
        raise UserError(
            f"{str(path)!r} holds a {type(obj).__name__} (plain data), not a model. Give the model as {MODEL_FORMS}."
        )
    if not options.get("trust_model"):
        raise UserError(
            f"{str(path)!r} is a pickled model. Loading it runs Python code stored in the file, which can do "
            "anything on this machine. If you trust where it came from, add --trust-model; otherwise give the "
            "architecture (timm:NAME, torchvision:NAME, package.module:factory) and a state_dict with --weights."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(
            f"cannot unpickle {str(path)!r} ({type(exc).__name__}: {str(exc)[:300]}). A pickled model needs its "
            "class importable here: install the package that defines it, or use package.module:factory."
        ) from exc
    if not isinstance(obj, nn.Module):
        raise UserError(f"{str(path)!r} holds a {type(obj).__name__}, not a torch.nn.Module.{_module_inside(obj)}")
    return obj


def _module_inside(obj: Any) -> str:
    """Where a pickled checkpoint (a dict, list or tuple: ``{"model": net, "epoch": 3}``)
    holds a module, a sentence on saving it alone; else ``""``. The refusal said only
    "holds a dict, not a torch.nn.Module"."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    found = [(k, v) for k, v in items if isinstance(v, nn.Module)]
    if not found:
        return ""
    key, module = found[0]
    return (
        f" Its entry [{key!r}] is a {type(module).__name__} (a checkpoint?): save that alone, "
        f"torch.save(checkpoint[{key!r}], 'model.pt'), and give that file as --model."
    )


def _check_hub_cached(name: str, spec: str) -> None:
    """``timm:hf-hub:ORG/NAME`` reads the model's config from the Hugging Face Hub, also
    without pretrained weights: offline it retried for some 40 s and then said "cannot use:
    An error happened while trying to locate the file on the Hub ... Check the path (its
    length, links and permissions) and the disk". CleanAI downloads nothing: a name that is
    not in the local cache is refused at once."""
    if not name.startswith("hf-hub:"):
        return
    repo = name[len("hf-hub:") :].split("@")[0]
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "config.json")
    except Exception:  # noqa: BLE001 - no hub library, or a name it refuses: timm says what is wrong
        return
    if not isinstance(found, str):
        raise UserError(
            f"--model {spec!r}: timm reads {repo!r} from the Hugging Face Hub, and it is not in the local cache "
            f"(CleanAI downloads nothing). Download it first (huggingface-cli download {repo}), or give the "
            "architecture as timm:NAME with its weights as --weights FILE."
        )


def build_model(spec: str, options: dict[str, Any]) -> nn.Module | None:
    """Build the model named by ``spec`` (see the module docstring), or ``None`` if the
    spec is none of the built-in forms."""
    num_classes = options.get("num_classes")
    kwargs = dict(options.get("model_kwargs") or {})
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    path = Path(spec)
    if spec.startswith("timm:"):
        timm = import_extra("timm", "timm:NAME", "pip install timm")
        name = spec[len("timm:") :]
        pretrained = bool(options.get("pretrained", False))
        _check_hub_cached(name, spec)
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except Exception as exc:  # noqa: BLE001 - timm's own errors about the name or its arguments
            if not model_fault(exc):
                raise
            if "Unknown model" in str(exc):
                raise UserError(f"timm has no model {name!r}; list them with timm.list_models('*pattern*').") from exc
            raise UserError(f"timm could not build {name!r}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    elif spec.startswith("torchvision:"):
        torchvision = import_extra("torchvision", "torchvision:NAME", "pip install torchvision")
        name = spec[len("torchvision:") :]
        if name not in torchvision.models.list_models():
            raise UserError(f"torchvision has no model {name!r}; see torchvision.models.list_models().")
        if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
            # segmentation and detection builders default to an ImageNet backbone: a download
            # (offline: a URLError in load_pruned) of weights that --weights / model.pt replace
            kwargs.setdefault("weights_backbone", None)
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    elif path.exists():
        if is_saved_folder(path):
            return load_saved_folder(path, options)
        if path.is_dir():
            kind = cleanai_folder_kind(path)
            if kind is not None:  # an analysis, or a pruned model's folder missing a file: "is a folder"
                raise UserError(f"--model {spec!r} is {kind[0]}: {kind[1]}. Give the model as {MODEL_FORMS}.")
            raise UserError(
                f"--model {spec!r} is a folder; give a model file, a spec ({MODEL_FORMS}) or a folder written by "
                "`cleanai prune`."
            )
        model = _load_model_file(path, options)
        if options.get("weights"):
            _apply_weights(model, options["weights"], spec)
        return model
    elif _FACTORY_RE.match(spec) and not spec.startswith(("timm:", "torchvision:")):
        if options.get("meta_probe"):  # load_pruned's shape check: the factory runs once, in the real build
            return None
        model = call_spec(spec, "model factory", kwargs, options)
        if not isinstance(model, nn.Module):
            raise UserError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module.")
    else:
        return None
    return finish_model(model, spec, options)


def finish_model(model: nn.Module, spec: str, options: dict[str, Any]) -> nn.Module:
    """Load ``options["weights"]`` into a freshly built model (or warn that its weights
    are random); shared by every model source."""
    if options.get("weights"):
        _apply_weights(model, options["weights"], spec)
    elif options.get("warn_random_weights", True) and not options.get("pretrained"):
        log.warning("note: %s was built without --weights, so it has random weights.", spec)
    return model


@hookimpl(trylast=True)
def cleanai_load_model(spec, options):
    return build_model(spec, options)


@hookimpl(trylast=True)
def cleanai_input_forms():
    return {"model": MODEL_FORMS}
