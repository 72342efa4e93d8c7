"""Built-in loaders for the command line: models, data sets and a classification evaluator.

Model specs (``--model``):

- ``timm:NAME`` and ``torchvision:NAME`` (architecture; weights from ``--weights FILE``),
- ``package.module:factory`` (a callable returning an ``nn.Module``), only when
  ``options["trust_code"]`` is true: importing and calling it runs code. The command line
  sets it for a spec typed there; a spec read from a config file or a saved folder needs
  ``--trust-code`` / ``trust_code=True``,
- a whole pickled model file (``torch.save(model, path)``), only with ``--trust-model``,
  because unpickling runs code stored in the file.

Data specs (``--data``):

- an image folder with one sub-folder per class (torchvision's ``ImageFolder``),
- a ``.pt`` tensor file: ``(x, y)``, ``{"x": ..., "y": ...}``, a tensor, or a ``TensorDataset``,
- an ``.npz`` file with arrays ``x`` (and optionally ``y``),
- ``package.module:function`` returning a ``torch.utils.data.Dataset`` (only with
  ``options["trust_code"]``, as for models).
"""

from __future__ import annotations

import ast
import importlib
import logging
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from cleanai_core import hookimpl
from cleanai_core.errors import UserError
from cleanai_core.saved_folder import state_dict_problems

__all__ = [
    "LabelledTensors",
    "build_model",
    "call_spec",
    "class_labels",
    "label_indices",
    "finish_model",
    "load_dataset",
    "load_state_dict_file",
    "read_npz",
]

log = logging.getLogger("cleanai")

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
MODEL_FORMS = (
    "timm:NAME, torchvision:NAME (add --weights FILE with a state_dict), package.module:factory, "
    "or a whole-model file saved with torch.save(model, path) (needs --trust-model)"
)
DATA_FORMS = (
    "an image folder with one sub-folder per class, a .pt file holding (x, y) / {'x', 'y'} / a tensor / "
    "a TensorDataset, an .npz file with arrays x and y, or package.module:function returning a Dataset"
)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def _import_attr(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"cannot import module {module_name!r} for {what} {spec!r}: {exc}. "
            "Check the spelling and that the package is installed in this Python environment."
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"module {module_name!r} has no attribute {attr!r} (from {what} {spec!r}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{what} {spec!r} names {type(obj).__name__}, not a callable.")
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


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``state_dict`` safely (``weights_only=True``); unwrap ``{"state_dict": ...}``
    and ``{"model": ...}`` checkpoints and a ``module.`` prefix from DataParallel."""
    path = Path(path)
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
        raise UserError(
            f"cannot read weights from {str(path)!r} as a state_dict ({type(exc).__name__}: {str(exc)[:200]}). "
            "Save them with torch.save(model.state_dict(), path)."
        ) from exc
    for key in ("state_dict", "model_state_dict", "model", "state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{str(path)!r} does not hold a state_dict (a dict of parameter names to tensors).")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _apply_weights(model: nn.Module, weights: str, spec: str) -> None:
    state = load_state_dict_file(weights)
    parts = state_dict_problems(model.state_dict(), state)
    if parts:
        raise UserError(
            f"the weights in {weights!r} do not fit {spec!r}: " + "; ".join(parts) + ". "
            "Use the architecture the weights were trained with (and --num-classes if the head differs)."
        )
    model.load_state_dict(state, strict=True)


def _load_model_file(path: Path, options: dict[str, Any]) -> nn.Module:
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
    with open(path, "rb") as fh:
        head = fh.read(2)
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        raise UserError(
            f"{str(path)!r} is not a file written by torch.save (neither a zip archive nor a pickle); it may be "
            f"truncated or of another format. Give the model as {MODEL_FORMS}."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        obj = None  # holds Python objects (a pickled module): needs --trust-model
    else:
        if isinstance(obj, dict):
            raise UserError(
                f"{str(path)!r} holds a state_dict (weights only, no architecture). Give the architecture "
                f"with --model timm:NAME / torchvision:NAME / package.module:factory and pass this file "
                f"as --weights {path}."
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
        raise UserError(f"{str(path)!r} holds a {type(obj).__name__}, not a torch.nn.Module.")
    return obj


def build_model(spec: str, options: dict[str, Any]) -> nn.Module | None:
    """Build the model named by ``spec`` (see the module docstring), or ``None`` if the
    spec is none of the built-in forms."""
    num_classes = options.get("num_classes")
    kwargs = dict(options.get("model_kwargs") or {})
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    path = Path(spec)
    if spec.startswith("timm:"):
        try:
            import timm
        except ImportError as exc:
            raise UserError("timm:NAME needs timm: pip install timm") from exc
        name = spec[len("timm:") :]
        pretrained = bool(options.get("pretrained", False))
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise UserError(f"timm has no model {name!r}; list them with timm.list_models('*pattern*').") from exc
            raise UserError(f"timm could not build {name!r}: {exc}") from exc
    elif spec.startswith("torchvision:"):
        try:
            import torchvision
        except ImportError as exc:
            raise UserError("torchvision:NAME needs torchvision: pip install torchvision") from exc
        name = spec[len("torchvision:") :]
        if name not in torchvision.models.list_models():
            raise UserError(f"torchvision has no model {name!r}; see torchvision.models.list_models().")
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    elif path.exists():
        if path.is_dir():
            raise UserError(f"--model {spec!r} is a folder; give a model file or a spec ({MODEL_FORMS}).")
        model = _load_model_file(path, options)
        if options.get("weights"):
            _apply_weights(model, options["weights"], spec)
        return model
    elif _FACTORY_RE.match(spec) and not spec.startswith(("timm:", "torchvision:")):
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


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


class Unlabelled(Dataset):
    """Items are single tensors (no labels)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


class LabelledTensors(TensorDataset):
    """``(x, y)`` pairs from two tensors."""


_NPY_DTYPES = {
    "u1": torch.uint8,
    "i1": torch.int8,
    "i2": torch.int16,
    "i4": torch.int32,
    "i8": torch.int64,
    "f2": torch.float16,
    "f4": torch.float32,
    "f8": torch.float64,
    "b1": torch.bool,
}


def _read_npy(data: bytes, name: str) -> torch.Tensor:
    if data[:6] != b"\x93NUMPY":
        raise UserError(f"array {name!r} in the .npz is not in .npy format.")
    major = data[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", data[8:10])
        start = 10
    else:
        (hlen,) = struct.unpack("<I", data[8:12])
        start = 12
    header = ast.literal_eval(data[start : start + hlen].decode("latin1"))
    descr, fortran, shape = header["descr"], header["fortran_order"], tuple(header["shape"])
    kind = descr[1:] if descr[0] in "<>|=" else descr
    if kind[:1] in ("U", "S") or kind == "O":
        what = "Python objects (a pickle)" if kind == "O" else "text"
        raise UserError(
            f"array {name!r} holds {what} (dtype {descr!r}); CleanAI reads numeric arrays only and never unpickles. "
            "Store inputs as numbers and labels as integer class indices 0..N-1 (np.savez(path, x=x, y=y))."
        )
    if kind not in _NPY_DTYPES or descr[0] == ">":
        raise UserError(f"array {name!r} has dtype {descr!r}; use numeric (little-endian) arrays.")
    buf = bytearray(data[start + hlen :])
    t = torch.frombuffer(buf, dtype=_NPY_DTYPES[kind]) if buf else torch.empty(0, dtype=_NPY_DTYPES[kind])
    if fortran:
        return t.reshape(tuple(reversed(shape))).permute(*reversed(range(len(shape)))).contiguous()
    return t.reshape(shape).clone()


_NPZ_ERRORS = (ValueError, SyntaxError, KeyError, TypeError, IndexError, RuntimeError, struct.error, EOFError)


def read_npz(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Arrays of an ``.npz`` file as tensors (numeric dtypes; no numpy needed, no pickles).
    A truncated, corrupt or foreign file is a :class:`UserError` naming the array."""
    import zlib

    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for n in zf.namelist():
                try:
                    out[n[:-4] if n.endswith(".npy") else n] = _read_npy(zf.read(n), n)
                except UserError:
                    raise
                except (*_NPZ_ERRORS, zlib.error, zipfile.BadZipFile) as exc:
                    raise UserError(
                        f"{str(path)!r}: array {n!r} is damaged or not a .npy array ({type(exc).__name__}: "
                        f"{str(exc)[:120]}). Write the file again with numpy.savez(path, x=x, y=y)."
                    ) from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise UserError(f"{str(path)!r} is not a valid .npz file (numpy.savez output): {exc}.") from None
    return out


def _as_inputs(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; NHWC (last dim 1 or 3) -> NCHW; NHW -> N1HW."""
    if x.dtype == torch.uint8:
        if x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return x.float().div_(255.0)
    if x.dtype in (torch.float16, torch.float64, torch.bfloat16):
        return x.float()
    return x


def _from_tensors(x: Any, y: Any, source: str) -> Dataset:
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{source}: the inputs are a {type(x).__name__}, expected a tensor.")
    if x.dim() == 0:
        raise UserError(f"{source}: the inputs are a single number; give a tensor with one row per sample.")
    x = _as_inputs(x)
    if y is None:
        return Unlabelled(x)
    y = class_labels(y, source)
    if len(y) != len(x):
        raise UserError(f"{source}: {len(x)} inputs but {len(y)} labels; they must have the same length.")
    return LabelledTensors(x, y)


def class_labels(y: Any, source: str) -> torch.Tensor:
    """Labels as class indices where they are class labels: integers as they are, one-hot
    rows by their argmax, whole-number floats as integers. Anything else (fractions,
    several columns that are not one-hot) is kept, with a warning that accuracy cannot be
    measured on it. Text labels are an error: their order of classes is unknown."""
    if isinstance(y, (list, tuple)) and any(isinstance(v, (str, bytes)) for v in y):
        raise UserError(
            f"{source}: the labels are text (e.g. {next(v for v in y if isinstance(v, (str, bytes)))!r}); give integer "
            "class indices 0..N-1 in the order of the model's outputs (e.g. [classes.index(label) for label in y])."
        )
    if not isinstance(y, torch.Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UserError(
                f"{source}: the labels are not numbers ({exc}); give integer class indices 0..N-1."
            ) from None
    if y.dim() == 0:
        raise UserError(f"{source}: the labels are a single number; give one label per sample.")
    idx = label_indices(y)
    if idx is None:
        log.warning("%s: %s: accuracy is not measured.", source, not_class_labels(y))
        return y
    if y.dim() == 2:
        log.info("%s: one-hot labels read as class indices (argmax of each row).", source)
    return idx


def label_indices(y: torch.Tensor) -> torch.Tensor | None:
    """``y`` as class indices (int64): integers and booleans as they are, whole-number
    floats, one-hot rows by their argmax; ``None`` when ``y`` is none of these."""
    if y.dim() == 2 and len(y) and bool(((y == 0) | (y == 1)).all()) and bool((y.sum(1) == 1).all()):
        return y.argmax(1)
    if y.dim() != 1:
        return None
    if y.is_floating_point():
        return y.long() if bool(torch.isfinite(y).all()) and bool((y == y.round()).all()) else None
    return y.long()


def not_class_labels(y: torch.Tensor) -> str:
    """Why ``y`` is not class labels, and what to give instead."""
    what = "fractional or non-finite numbers" if y.is_floating_point() else "several columns that are not one-hot"
    return (
        f"the labels are not class indices ({what}, dtype {str(y.dtype).replace('torch.', '')}, shape "
        f"{tuple(y.shape)}); for accuracy give integer labels 0..N-1 or one-hot rows"
    )


def _load_pt(path: Path) -> Dataset:
    try:
        with torch.serialization.safe_globals([TensorDataset]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"cannot read {str(path)!r} safely ({type(exc).__name__}: {str(exc)[:200]}). Save plain tensors: "
            "torch.save((x, y), path) or torch.save({'x': x, 'y': y}, path)."
        ) from exc
    if isinstance(obj, TensorDataset):
        tensors = obj.tensors
        return _from_tensors(tensors[0], tensors[1] if len(tensors) > 1 else None, str(path))
    if isinstance(obj, torch.Tensor):
        return _from_tensors(obj, None, str(path))
    if isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 2:
        return _from_tensors(obj[0], obj[1] if len(obj) > 1 else None, str(path))
    if isinstance(obj, dict):
        for xk, yk in (("x", "y"), ("inputs", "labels"), ("data", "targets"), ("images", "labels")):
            if xk in obj:
                return _from_tensors(obj[xk], obj.get(yk), str(path))
        raise UserError(f"{str(path)!r} holds a dict with keys {sorted(obj)[:10]}; expected keys 'x' and 'y'.")
    raise UserError(f"{str(path)!r} holds a {type(obj).__name__}; expected {DATA_FORMS}.")


def _image_transform(options: dict[str, Any]):
    from torchvision import transforms

    model = options.get("model")
    image_size = options.get("image_size")
    cfg = getattr(model, "pretrained_cfg", None) if model is not None else None
    if cfg:
        try:
            import timm.data

            data_cfg = timm.data.resolve_data_config({}, model=model)
            if image_size:
                data_cfg["input_size"] = (data_cfg["input_size"][0], int(image_size), int(image_size))
            return timm.data.create_transform(**data_cfg, is_training=False)
        except ImportError:
            pass
    size = int(image_size or 224)
    return transforms.Compose(
        [
            transforms.Resize(int(round(size / 0.875))),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )


def _load_image_folder(path: Path, options: dict[str, Any]) -> Dataset:
    try:
        from torchvision.datasets import ImageFolder
    except ImportError as exc:
        raise UserError(
            f"{str(path)!r} is a folder; reading image folders needs torchvision (pip install torchvision). "
            "Or save the images as tensors: torch.save((x, y), 'data.pt')."
        ) from exc
    if not any(p.is_dir() for p in path.iterdir()):
        raise UserError(
            f"image folder {str(path)!r} has no class sub-folders. Put images in one sub-folder per class "
            "(data/cat/1.jpg, data/dog/2.jpg), in the order the model's classes were trained."
        )
    try:
        return ImageFolder(str(path), transform=_image_transform(options))
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"cannot read image folder {str(path)!r}: {exc}") from exc


def load_dataset(spec: str, options: dict[str, Any]) -> Dataset | None:
    """Build the data set named by ``spec`` (see the module docstring), or ``None``."""
    path = Path(spec)
    if path.is_dir():
        return _load_image_folder(path, options)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".pt", ".pth"):
            return _load_pt(path)
        if suffix == ".npz":
            arrays = read_npz(path)
            if "x" not in arrays:
                raise UserError(f"{spec!r} has arrays {sorted(arrays)}; it needs 'x' (inputs) and optionally 'y'.")
            return _from_tensors(arrays["x"], arrays.get("y"), spec)
        raise UserError(f"data file {spec!r}: {suffix or 'no extension'} is not supported; give {DATA_FORMS}.")
    if _FACTORY_RE.match(spec):
        ds = call_spec(spec, "data function", {}, options)
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise UserError(f"{spec} returned a {type(ds).__name__}, not a map-style torch Dataset.")
        return ds
    return None


@hookimpl(trylast=True)
def cleanai_load_dataset(spec, options):
    return load_dataset(spec, options)


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _logits(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out.get("logits", next((v for v in out.values() if isinstance(v, torch.Tensor)), None))
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


@hookimpl(trylast=True)
def cleanai_evaluate(model, loader, device):
    """Top-1 accuracy for classifiers on ``(x, y)`` batches with class labels (integers,
    whole-number floats or one-hot rows). When accuracy does not apply, returns
    ``{"accuracy_note": why}``."""
    from tqdm import tqdm

    correct = total = 0
    model.eval()
    quiet = not log.isEnabledFor(logging.INFO)
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluating", unit="batch", disable=quiet, leave=False):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                return {"accuracy_note": "the data has no labels"}
            x, y = batch[0], batch[1]
            if not isinstance(y, torch.Tensor):
                return {"accuracy_note": f"the labels are a {type(y).__name__}, not a tensor of class indices"}
            y = label_indices(y) if y.dim() >= 1 else None
            if y is None:
                return {"accuracy_note": not_class_labels(batch[1])}
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise UserError("the evaluation data contains NaN or inf values; clean the data and run again")
            logits = _logits(model(x.to(device)))
            if logits is None or logits.dim() != 2:
                shape = tuple(logits.shape) if logits is not None else "no tensor"
                return {"accuracy_note": f"the model's output ({shape}) is not one row of class scores per sample"}
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
                raise UserError(
                    f"labels go from {int(y.min())} to {int(y.max())} but the model has {logits.shape[1]} outputs; "
                    "give labels 0..N-1 matching the model's classes (or --num-classes)"
                )
            correct += int((logits.argmax(1).cpu() == y).sum())
            total += len(y)
    if total == 0:
        return {"accuracy_note": "the evaluation data is empty"}
    return {"accuracy": correct / total, "evaluated": total}
