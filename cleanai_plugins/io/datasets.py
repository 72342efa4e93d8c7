"""Built-in data loaders for the command line (``--data``):

- an image folder with one sub-folder per class (torchvision's ``ImageFolder``),
- a ``.pt`` tensor file: ``(x, y)``, ``{"x": ..., "y": ...}``, a tensor, or a ``TensorDataset``,
- an ``.npz`` file with arrays ``x`` (and optionally ``y``); uint8 inputs are divided by
  255, or by the scalar array ``x_max`` when the file holds one (the packaged digits are
  0-16 and say so),
- ``package.module:function`` returning a ``torch.utils.data.Dataset``, or ``(x, y)`` /
  ``{"x": ..., "y": ...}`` tensors as in a ``.pt`` file (only with ``options["trust_code"]``,
  as for models).
"""

from __future__ import annotations

import ast
import logging
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from cleanai_core import hookimpl
from cleanai_core.errors import UserError
from cleanai_core.extras import import_extra
from cleanai_core.runtime import cast_within_range, label_indices, not_class_labels
from cleanai_core.special_files import (
    check_not_packed,
    cleanai_folder_kind,
    not_torch_save_error,
    special_kind,
    unreadable,
)
from cleanai_plugins.io.hf import is_hf_model
from cleanai_plugins.io.models import _FACTORY_RE, call_spec

log = logging.getLogger("cleanai")

DATA_FORMS = (
    "an image folder with one sub-folder per class, a .pt file holding (x, y) / {'x', 'y'} / a tensor / "
    "a TensorDataset, an .npz file with arrays x and y, or package.module:function returning a Dataset or (x, y)"
)

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
# unsigned arrays: read as the signed dtype of the same width, widened, masked to the unsigned value
_NPY_WIDER = {
    "u2": (torch.int16, torch.int32, 0xFFFF),
    "u4": (torch.int32, torch.int64, 0xFFFFFFFF),
    "u8": (torch.int64, torch.int64, None),
}


# numpy's own limit on a header (np.load(max_header_size=10000)); a longer one is no array's
_NPY_MAX_HEADER = 10_000
_NPY_SIZES = {k: int(k[1]) for k in ("u1", "i1", "b1", "i2", "u2", "f2", "i4", "u4", "f4", "i8", "u8", "f8")}


def _npy_header(f: Any, name: str) -> tuple[str, bool, tuple[int, ...], int]:
    """``descr``, ``fortran_order``, ``shape`` and the header's length in bytes, read from
    the open member ``f`` and checked as numpy checks them: a header of at most 10,000
    bytes, ``fortran_order`` a bool and ``shape`` a tuple of sizes >= 0 (a negative size
    was taken by ``reshape`` as "the rest", a text ``fortran_order`` as true)."""
    magic = f.read(8)
    if magic[:6] != b"\x93NUMPY" or len(magic) < 8:
        raise UserError(f"array {name!r} in the .npz is not in .npy format.")
    size = struct.unpack("<H", f.read(2)) if magic[6] == 1 else struct.unpack("<I", f.read(4))
    hlen = size[0]
    if hlen > _NPY_MAX_HEADER:
        raise ValueError(f"a header of {hlen:,} bytes; a .npy header is at most {_NPY_MAX_HEADER:,}")
    text = f.read(hlen)
    header = ast.literal_eval(text.decode("latin1"))
    if not isinstance(header, dict) or not {"descr", "fortran_order", "shape"} <= set(header):
        raise ValueError(f"a header without 'descr', 'fortran_order' and 'shape': {text[:60]!r}")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(fortran, bool):
        raise ValueError(f"'fortran_order' is {fortran!r}, expected True or False")
    if not isinstance(shape, tuple) or not all(type(d) is int and 0 <= d < 2**62 for d in shape) or len(shape) > 64:
        raise ValueError(f"'shape' is {str(shape)[:40]}, expected a tuple of sizes >= 0")
    return descr, fortran, shape, (10 if magic[6] == 1 else 12) + hlen


def _npy_kind(descr: Any, name: str) -> str:
    """The dtype code of ``descr`` (``"f4"``), refusing what CleanAI does not read."""
    if not isinstance(descr, str):
        raise UserError(
            f"array {name!r} has a structured dtype (fields {[f[0] for f in descr][:5]}); store plain numeric "
            "arrays: inputs x and integer labels y (np.savez(path, x=x, y=y))."
        )
    kind = descr[1:] if descr[:1] in ("<", ">", "|", "=") else descr
    if kind[:1] in ("U", "S") or kind == "O":
        what = "Python objects (a pickle)" if kind == "O" else "text"
        raise UserError(
            f"array {name!r} holds {what} (dtype {descr!r}); CleanAI reads numeric arrays only and never unpickles. "
            "Store inputs as numbers and labels as integer class indices 0..N-1 (np.savez(path, x=x, y=y))."
        )
    if kind not in _NPY_SIZES or descr[:1] == ">":
        order = "big-endian " if descr[:1] == ">" else ""
        raise UserError(
            f"array {name!r} has {order}dtype {descr!r}, which CleanAI does not read; store little-endian "
            "bool, int8-64, uint8-64 or float16/32/64 arrays (e.g. x.astype('float32'), y.astype('int64'))."
        )
    return kind


def _read_npy(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> torch.Tensor:
    """One member of an ``.npz``: its header first, then exactly the bytes its shape and
    dtype take, as the member's recorded size says. The whole member was read at once: a
    1 MB file of compressed zeros under a small header asked for 1 GiB (a ``MemoryError``
    traceback), 10 MB for 10 GiB (the out-of-memory killer)."""
    name = info.filename
    with zf.open(info) as f:
        descr, fortran, shape, head = _npy_header(f, name)
        kind = _npy_kind(descr, name)
        count = 1
        for d in shape:
            count *= d
        nbytes = count * _NPY_SIZES[kind]
        if nbytes != info.file_size - head:
            raise UserError(
                f"{source!r}: array {name!r} says shape {shape} of {descr} ({nbytes:,} bytes), but the file holds "
                f"{max(info.file_size - head, 0):,} bytes of values; it is damaged or was not written by numpy. Write "
                "it again with numpy.savez(path, x=x, y=y)."
            )
        try:
            raw = bytearray(f.read(nbytes))
        except MemoryError:
            raise UserError(
                f"{source!r}: array {name!r} of shape {shape} takes {nbytes / 2**30:,.1f} GiB, more memory than there "
                "is; give a smaller data set (or a package.module:function that reads it lazily)."
            ) from None
    if len(raw) != nbytes:
        raise UserError(f"{source!r}: array {name!r} ends after {len(raw):,} of its {nbytes:,} bytes; it is truncated.")
    if kind in _NPY_WIDER:  # unsigned integers torch barely computes with: widened
        signed, wide, mask = _NPY_WIDER[kind]
        t = torch.frombuffer(raw, dtype=signed) if raw else torch.empty(0, dtype=signed)
        if kind == "u8":
            if bool((t < 0).any()):
                raise UserError(f"array {name!r} (uint64) holds values of 2**63 or more; store labels as int64.")
        else:
            t = t.to(wide) & mask
    else:
        t = torch.frombuffer(raw, dtype=_NPY_DTYPES[kind]) if raw else torch.empty(0, dtype=_NPY_DTYPES[kind])
    if fortran:
        return t.reshape(tuple(reversed(shape))).permute(*reversed(range(len(shape)))).contiguous()
    return t.reshape(shape)


_NPZ_ERRORS = (ValueError, SyntaxError, KeyError, TypeError, IndexError, RuntimeError, struct.error, EOFError)


def read_npz(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Arrays of an ``.npz`` file as tensors (numeric dtypes; no numpy needed, no pickles).
    A truncated, corrupt or foreign file is a :class:`UserError` naming the array; so is an
    array name that appears twice (the last one was taken without a word)."""
    import zlib

    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
            if twice is not None:
                raise UserError(
                    f"{str(path)!r} holds the array {twice!r} twice (the zip was appended to); numpy would read only "
                    "the last. Write the file again with numpy.savez(path, x=x, y=y)."
                )
            pickle = next((n for n in names if n.endswith("/data.pkl")), None)
            if pickle is not None:  # said "array 'w/data.pkl' in the .npz is not in .npy format"
                raise UserError(
                    f"{str(path)!r} is a file written by torch.save (it holds {pickle!r}), not by numpy.savez, named "
                    ".npz: give it the .pt suffix it is read by."
                )
            for info in zf.infolist():
                n = info.filename
                try:
                    out[n[:-4] if n.endswith(".npy") else n] = _read_npy(zf, info, str(path))
                except UserError:
                    raise
                except (*_NPZ_ERRORS, zlib.error, zipfile.BadZipFile, NotImplementedError) as exc:
                    raise UserError(
                        f"{str(path)!r}: array {n!r} is damaged or not a .npy array ({type(exc).__name__}: "
                        f"{str(exc)[:120]}). Write the file again with numpy.savez(path, x=x, y=y)."
                    ) from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise UserError(f"{str(path)!r} is not a valid .npz file (numpy.savez output): {exc}.") from None
    return out


def _as_inputs(x: torch.Tensor, x_max: float = 255.0, source: str = "--data") -> torch.Tensor:
    """uint8 images -> float in [0, 1] (divided by ``x_max``); NHWC (last dim 1 or 3) ->
    NCHW; NHW -> N1HW."""
    if x.dtype == torch.uint8:
        if x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return x.float().div_(x_max)
    if x.dtype in (torch.float16, torch.float64, torch.bfloat16):
        return cast_within_range(x, torch.float32, source)
    return x


def _plain(t: torch.Tensor, what: str, source: str) -> torch.Tensor:
    """``t`` as an ordinary dense tensor of real numbers: a sparse tensor is made dense;
    meta tensors (shapes without values), complex and quantized tensors are refused."""
    if t.is_meta:
        raise UserError(
            f"{source}: the {what} are on the meta device (shapes without values); save the real tensors "
            "(torch.save((x, y), path) with x and y on the cpu)."
        )
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_complex() or t.is_quantized:
        raise UserError(
            f"{source}: the {what} are {str(t.dtype).replace('torch.', '')} numbers; give real numbers "
            "(float inputs, integer labels)."
        )
    return t


def _stacked(x: Any, source: str) -> Any:
    """A list or tuple of input tensors of one shape as one tensor (``torch.save((xs, y))``
    with ``xs`` a list of images said "the inputs are a list, expected a tensor"); of
    several shapes, an error naming two of them."""
    if not isinstance(x, (list, tuple)) or not x or not all(isinstance(t, torch.Tensor) for t in x):
        return x
    shapes = sorted({tuple(t.shape) for t in x})
    if len(shapes) > 1:
        raise UserError(
            f"{source}: the inputs are a {type(x).__name__} of {len(x)} tensors of {len(shapes)} shapes (e.g. "
            f"{shapes[0]} and {shapes[-1]}); give one tensor of shape (N, ...): resize the inputs to one size and "
            "torch.stack them."
        )
    return torch.stack(list(x))


def _samples(obj: Any) -> bool:
    """Whether ``obj`` is a list of ``(input tensor, label)`` samples."""
    return (
        isinstance(obj, (list, tuple))
        and len(obj) >= 2
        and all(isinstance(s, (list, tuple)) and len(s) == 2 and isinstance(s[0], torch.Tensor) for s in obj)
    )


def _from_tensors(x: Any, y: Any, source: str, x_max: float = 255.0) -> Dataset:
    x = _stacked(x, source)
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{source}: the inputs are a {type(x).__name__}, expected a tensor.")
    if x.dim() == 0:
        raise UserError(f"{source}: the inputs are a single number; give a tensor with one row per sample.")
    x = _as_inputs(_plain(x, "inputs", source), x_max, source)
    if y is None:
        return Unlabelled(x)
    if isinstance(y, torch.Tensor):
        y = _plain(y, "labels", source)
    y = class_labels(y, source)
    if len(y) != len(x):
        raise UserError(f"{source}: {len(x)} inputs but {len(y)} labels; they must have the same length.")
    return LabelledTensors(x, y)


def class_labels(y: Any, source: str) -> torch.Tensor:
    """Labels as class indices where they are class labels: integers as they are, one-hot
    rows by their argmax; whole-number floats are kept (class indices where the model has
    several outputs, a regression's targets where it has one). Anything else (fractions,
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
    if y.dim() == 1 and y.is_floating_point():
        # whole-number floats stay floats: against a model with one output they are a
        # regression's targets (ratings, counts), which as integers were refused as labels
        # beyond a binary classifier's 0 and 1; as class labels they are read where used
        return y
    if y.dim() == 2:
        log.info("%s: one-hot labels read as class indices (argmax of each row).", source)
    return idx


def _load_pt(path: Path, flag: str = "--data", model: Any = None) -> Dataset:
    check_not_packed(path, flag)
    try:
        with torch.serialization.safe_globals([TensorDataset]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an empty file said "(EOFError: )"
        other = not_torch_save_error(path, flag, "Save plain tensors: torch.save((x, y), path).")
        if other is not None:  # said "UnpicklingError: Weights only load failed. In PyTorch 2.6, we changed ..."
            raise other from None
        raise UserError(
            f"{flag} {str(path)!r} {unreadable(path, exc)}; write the data again as plain tensors: "
            "torch.save((x, y), path) or torch.save({'x': x, 'y': y}, path)."
        ) from None
    return _from_object(obj, str(path), model)


#: the names of the inputs and of the labels in a dict or an .npz, in the order they are looked for
INPUT_KEYS = ("x", "inputs", "data", "images")
LABEL_KEYS = ("y", "labels", "targets", "label", "target")


def inputs_and_labels(named: dict[str, Any], source: str, also: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """The inputs and the labels (or ``None``) of a dict or an ``.npz``, by any of the names
    :data:`INPUT_KEYS` / :data:`LABEL_KEYS`. Each name went with one other (``x`` with ``y``,
    ``inputs`` with ``labels``), so ``{'x': x, 'labels': y}`` ran as data without labels
    ("Accuracy not measured") and a third tensor (sample weights, a mask) was dropped, without
    a word; two names of one kind, or a tensor of neither, are refused. Entries that are not
    tensors (class names, notes) and the names in ``also`` are left alone."""
    xs = [k for k in INPUT_KEYS if k in named]
    ys = [k for k in LABEL_KEYS if k in named]
    if len(xs) > 1 or len(ys) > 1:
        both = xs if len(xs) > 1 else ys
        raise UserError(
            f"{source!r} holds both {both[0]!r} and {both[1]!r}; give one inputs entry (one of {list(INPUT_KEYS)}) "
            f"and at most one labels entry (one of {list(LABEL_KEYS)})."
        )
    other = [str(k) for k, v in named.items() if k not in (*xs, *ys, *also) and isinstance(v, torch.Tensor)]
    if other:
        found = f"inputs {xs[0]!r}" + (f" and labels {ys[0]!r}" if ys else "")
        raise UserError(
            f"{source!r} holds the tensor(s) {other[:5]} besides the {found}; CleanAI reads inputs and labels "
            f"only (labels named one of {list(LABEL_KEYS)}): save those two alone, e.g. torch.save({{'x': x, "
            "'y': y}, path)."
        )
    return named[xs[0]], named[ys[0]] if ys else None


def _forward_names(model: Any) -> str:
    """The names ``model.forward`` takes (comma-separated), or ``""`` where it has no signature."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (AttributeError, TypeError, ValueError):
        return ""
    return ", ".join(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def _keyword_inputs(obj: dict, model: Any, source: str) -> Dataset | None:
    """A dict of ``model``'s own forward inputs by name, one row per item (RAFT's ``image1`` and
    ``image2``), and optionally labels (one of :data:`LABEL_KEYS`): a data set of dict items,
    which the job passes as keywords. A model that takes two images was refused ("expected
    keys 'x' and 'y'"), and ``(x1, x2)`` was read as inputs and labels. ``None`` where a key
    is neither an input of the forward nor labels (the caller's message explains)."""
    from cleanai_plugins.io.text import TextItems

    takes = _forward_names(model)
    takes = takes.split(", ") if takes else []
    if not obj or not all(isinstance(k, str) and (k in takes or k in LABEL_KEYS) for k in obj):
        return None
    if not any(k in takes for k in obj) or sum(k in LABEL_KEYS for k in obj) > 1:
        return None
    rows = {k: len(v) if isinstance(v, torch.Tensor) and v.dim() else None for k, v in obj.items()}
    if None in rows.values() or len(set(rows.values())) != 1 or not next(iter(rows.values())):
        raise UserError(
            f"{source!r} holds {rows}: every value must be a tensor with one row per item, the same number of rows "
            "for each (N, ...)."
        )
    tensors = {k: _as_inputs(_plain(v, k, source), source=source) for k, v in obj.items() if k in takes}
    for k in (k for k in obj if k in LABEL_KEYS):
        tensors["labels"] = class_labels(_plain(obj[k], k, source), source)
    return TextItems(tensors)


def _from_object(obj: Any, source: str, model: Any = None) -> Dataset:
    """The data set a ``.pt`` file (or a data function) holds: a ``TensorDataset``, a
    tensor, ``(x, y)``, ``{'x': x, 'y': y}`` or a dict of the forward's own inputs
    (:func:`_keyword_inputs`)."""
    if isinstance(obj, TensorDataset):
        tensors = obj.tensors
        if len(tensors) > 2:  # the third and later were dropped without a word; a tuple of 3 is refused
            raise UserError(
                f"{source!r} holds a TensorDataset of {len(tensors)} tensors; expected (x, y): inputs and labels only "
                "(e.g. TensorDataset(x, y))."
            )
        return _from_tensors(tensors[0], tensors[1] if len(tensors) > 1 else None, source)
    if isinstance(obj, torch.Tensor):
        return _from_tensors(obj, None, source)
    if _samples(obj):  # [(x1, y1), (x2, y2), ...]: said "holds a list; expected ..."
        labels = [s[1] for s in obj]
        if all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in labels):
            labels = torch.stack(labels)
        return _from_tensors([s[0] for s in obj], labels, source)
    if isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 2:
        return _from_tensors(obj[0], obj[1] if len(obj) > 1 else None, source)
    if isinstance(obj, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in obj):  # (x, y, extra) said no more
        raise UserError(
            f"{source!r} holds a {type(obj).__name__} of {len(obj)} tensors; expected (x, y): inputs and "
            "labels only (e.g. torch.save((x, y), path))."
        )
    if isinstance(obj, dict):
        if any(k in obj for k in INPUT_KEYS):
            return _from_tensors(*inputs_and_labels(obj, source), source)
        if (
            obj
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
            and any(k.endswith((".weight", ".bias")) for k in obj)
        ):
            raise UserError(
                f"{source!r} holds a model's state_dict (weights), not data; pass it as --weights and give the "
                "data as (x, y) tensors: torch.save((x, y), path)."
            )
        named = _keyword_inputs(obj, model, source) if model is not None else None
        if named is not None:
            return named
        keys = sorted(map(str, obj))[:10]
        takes = _forward_names(model)
        raise UserError(
            f"{source!r} holds a dict with keys {keys}; expected keys 'x' and 'y', or the names of the model's "
            f"forward inputs{f' ({takes})' if takes else ''} and optionally 'y' (a model that takes several inputs)."
        )
    raise UserError(f"{source!r} holds a {type(obj).__name__}; expected {DATA_FORMS}.")


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
    gray = _input_channels(model) == 1
    return transforms.Compose(
        [
            transforms.Resize(int(round(size / 0.875))),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            # a one-channel model: ImageNet's statistics averaged over the three channels
            transforms.Normalize((0.449,), (0.226,)) if gray else transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _input_channels(model: Any) -> int | None:
    """The input channels of ``model``'s first layer with weights, where it is a 2-d
    convolution (the stem), else ``None``."""
    first = next((m for m in model.modules() if m._parameters), None) if isinstance(model, torch.nn.Module) else None
    return first.in_channels if isinstance(first, torch.nn.Conv2d) else None


def _image_loader(model: Any):
    """Images read as the model's stem takes them: grayscale (``"L"``) for a one-channel
    stem, else RGB. ImageFolder's loader made every image RGB, so a model of one input
    channel (digits, X-rays) failed on its own images: "expected input[1, 3, 224, 224] to
    have 1 channels"."""
    from PIL import Image

    mode = "L" if _input_channels(model) == 1 else "RGB"

    def load(file: str) -> Any:
        kind = special_kind(file)
        if kind is not None:  # opening a named pipe waited for a writer for ever
            raise OSError(f"it is {kind}, not a regular file")
        with open(file, "rb") as fh:
            return _eight_bit(Image.open(fh), file).convert(mode)

    return load


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _eight_bit(image: Any, file: str) -> Any:
    """``image`` with its values on the 8-bit scale that ``convert("L")`` / ``"RGB"`` and
    ``ToTensor`` read. PIL's conversion of a wider image clips at 255 instead of scaling:
    a 16-bit grayscale PNG or TIFF (X-rays, depth maps) was read all but white, a 32-bit
    float TIFF (values in [0, 1]) all black, and the job pruned and reported on them with
    exit 0. A 16-bit image is scaled by 255 / 65535 (as torchvision's
    ``convert_image_dtype`` reads ``uint16``); a 32-bit integer image whose values fit 16
    bits likewise (older PIL opened 16-bit PNGs as mode ``"I"``), within 8 bits as it is;
    a float image, or integers beyond 16 bits, have no range to scale by and are refused."""
    if image.mode not in (*_SIXTEEN_BIT, "I", "F"):
        return image
    low, high = image.convert("I").getextrema() if image.mode != "F" else image.getextrema()
    if image.mode in _SIXTEEN_BIT or (image.mode == "I" and 255 < high <= 65535 and low >= 0):
        return image.convert("I").point(lambda v: v / 257 + 0.5)  # 0..65535 -> 0..255, rounded
    if image.mode == "I" and 0 <= low and high <= 255:
        return image
    kind = "32-bit floating-point" if image.mode == "F" else "32-bit integer"
    raise UserError(
        f"cannot read image {file!r}: it is a {kind} image (PIL mode {image.mode!r}, values {low:g} to {high:g}), "
        "which has no fixed range to scale to the model's inputs (read as 8 bits, its values were cut to 0..255). "
        "Save the images as 8- or 16-bit PNG, or the inputs as tensors: torch.save((x, y), 'data.pt')."
    )


def _hidden(name: str) -> bool:
    """A hidden file or folder (``.ipynb_checkpoints``, ``.git``, macOS's ``._img.png``
    resource forks): never a class and never an image of ``--data``."""
    return name.startswith(".")


def _image_files(
    directory: Any, class_to_idx: dict[str, int], extensions: Any, allow_empty: bool, spec: str
) -> list[tuple[str, int]]:
    """torchvision's ``make_dataset`` (the same samples in the same order), with every
    folder and file counted once by its real path. torchvision walks the class folders
    following links: a link back up the tree (``imgs/a/loop -> ..``) was walked until the
    path grew too long, so 8 images were read as 328 samples, one image in both the
    calibration and the held-out half (and two such links made the walk exponential). A
    file reached from two classes (a class folder linked into another) is an error: its
    label is ambiguous."""
    from torchvision.datasets.folder import has_file_allowed_extension

    samples: list[tuple[str, int]] = []
    owner: dict[str, tuple[str, str]] = {}  # real path -> (class, the path it was first reached by)
    repeats = hidden = 0
    for target in sorted(class_to_idx):
        found: list[tuple[str, str]] = []
        seen_dirs: set[str] = set()
        for root, dirs, files in os.walk(os.path.join(os.path.expanduser(directory), target), followlinks=True):
            real_root = os.path.realpath(root)
            if real_root in seen_dirs:
                dirs[:] = []
                repeats += 1
                continue
            seen_dirs.add(real_root)
            hidden += sum(_hidden(n) for n in (*dirs, *files))
            # the first path to an image (the one named) does not depend on the file system's order
            dirs[:] = sorted(d for d in dirs if not _hidden(d))
            for fname in sorted(f for f in files if not _hidden(f)):
                file = os.path.join(root, fname)
                if extensions is not None and not has_file_allowed_extension(file, extensions):
                    continue
                real = os.path.realpath(file)
                if real in owner:
                    if owner[real][0] != target:
                        raise UserError(
                            f"image folder {spec!r}: the image {real!r} is reached from class {owner[real][0]!r} "
                            f"({owner[real][1]!r}) and, through a link, from class {target!r} ({file!r}), so its "
                            "label is ambiguous. Give each image one class folder (remove the link)."
                        )
                    repeats += 1
                    continue
                owner[real] = (target, file)
                found.append((root, fname))
        samples += [(os.path.join(root, fname), class_to_idx[target]) for root, fname in sorted(found)]
    if repeats:
        log.warning(
            "image folder %r: %d folder(s) or file(s) are reached again through links (a link back up the tree?); "
            "each image is read once.", spec, repeats,
        )  # fmt: skip
    if hidden:
        log.info("image folder %r: %d hidden file(s) or folder(s) (names starting with '.') are not read.",
                 spec, hidden)  # fmt: skip
    empty = sorted(set(class_to_idx) - {t for t, _ in owner.values()})
    if empty and not allow_empty:  # said "Found no valid file for the classes c." (torchvision's words)
        kinds = ", ".join(extensions) if isinstance(extensions, (tuple, list)) else "images"
        named = ", ".join(repr(c) for c in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise UserError(
            f"image folder {spec!r}: the class folder(s) {named} hold no image ({kinds}). The class folders, sorted, "
            f"are the labels 0..{len(class_to_idx) - 1}: add images to each, or move out a folder that is not one of "
            "the model's classes (the classes after it are numbered one lower)."
        )
    return samples


def _warn_numbers_in_text_order(classes: list[str], spec: str) -> None:
    """A warning where the class folders are whole numbers whose text order (torchvision's,
    and so CleanAI's labels) is not their numeric order: folders ``0`` .. ``11`` give
    ``10`` the label 2. Where the names are the class indices the model was trained on,
    accuracy was measured against shuffled labels without a word."""
    if not all(c.isdigit() for c in classes):
        return
    numeric = sorted(classes, key=int)
    if numeric == classes:
        return
    c = next(c for i, c in enumerate(classes) if numeric[i] != c)
    width = max(len(c) for c in classes)
    log.warning(
        "image folder %r: the class folders are numbers, read in text order as torchvision's ImageFolder reads "
        "them: folder '%s' is label %d (in numeric order it would be %d). If the folder names are the class "
        "indices, name them with leading zeros (%s .. %s); if the model was trained with ImageFolder on these "
        "folders, the labels are right.",
        spec, c, classes.index(c), numeric.index(c), numeric[0].zfill(width), numeric[-1].zfill(width),
    )  # fmt: skip


def _load_image_folder(path: Path, options: dict[str, Any]) -> Dataset:
    ImageFolder = import_extra(
        "torchvision.datasets",
        f"{str(path)!r} is a folder; reading image folders",
        "pip install torchvision",
        "Or save the images as tensors: torch.save((x, y), 'data.pt').",
    ).ImageFolder
    kind = cleanai_folder_kind(path)
    if kind is not None:  # "image folder ... has no class sub-folders"
        flag = options.get("flag") or "--data"
        raise UserError(
            f"{flag} {str(path)!r} is {kind[0]}, not data ({kind[1]}). Give an image folder with one sub-folder per "
            "class, or the data as (x, y) tensors: torch.save((x, y), path)."
        )
    if not any(p.is_dir() for p in path.iterdir()):
        raise UserError(
            f"image folder {str(path)!r} has no class sub-folders. Put images in one sub-folder per class "
            "(data/cat/1.jpg, data/dog/2.jpg), in the order the model's classes were trained."
        )

    class CheckedImageFolder(ImageFolder):
        """An image that cannot be read names its file (``--data`` is the user's input); each
        image file is read once however many links lead to it (:func:`_image_files`); hidden
        folders are no class (torchvision made ``.ipynb_checkpoints`` class 0, every label
        one higher)."""

        def find_classes(self, directory: Any) -> tuple[list[str], dict[str, int]]:
            classes, _ = super().find_classes(directory)
            classes = [c for c in classes if not _hidden(c)]
            if not classes:
                raise UserError(f"image folder {str(path)!r} has no class sub-folders but hidden ones (names "
                                "starting with '.'). Put images in one sub-folder per class.")  # fmt: skip
            _warn_numbers_in_text_order(classes, str(path))
            return classes, {c: i for i, c in enumerate(classes)}

        @staticmethod
        def make_dataset(directory: Any, class_to_idx: dict[str, int], extensions: Any = None,
                         is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:  # fmt: skip
            return _image_files(directory, class_to_idx, extensions, allow_empty, str(path))

        def __getitem__(self, index: int) -> Any:
            from PIL.Image import DecompressionBombError  # more pixels than PIL reads: said "reading item 6 failed"

            try:
                return super().__getitem__(index)
            except UserError:  # names the file itself (an image of 32-bit values)
                raise
            except (OSError, ValueError, SyntaxError, DecompressionBombError) as exc:  # unidentified, truncated
                file = self.samples[index][0]
                raise UserError(
                    f"cannot read image {file!r} in --data {str(path)!r} ({type(exc).__name__}: {str(exc)[:150]}); "
                    "remove or replace the file and run again."
                ) from None

    try:
        return CheckedImageFolder(
            str(path), transform=_image_transform(options), loader=_image_loader(options.get("model"))
        )
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"cannot read image folder {str(path)!r}: {exc}") from exc


def _x_max(arrays: dict[str, torch.Tensor], spec: str) -> float:
    """The scale of uint8 inputs: the file's scalar ``x_max`` where it has one, else 255."""
    if "x_max" not in arrays:
        return 255.0
    m = arrays["x_max"]
    if m.numel() != 1 or not 0 < float(m.reshape(-1)[0]) < float("inf"):  # inf made every input 0
        raise UserError(f"{spec!r}: x_max must be one positive number (the largest input value), got {m.tolist()}")
    return float(m.reshape(-1)[0])


def load_dataset(spec: str, options: dict[str, Any]) -> Dataset | None:
    """Build the data set named by ``spec`` (see the module docstring), or ``None``."""
    path = Path(spec)
    if path.is_dir():
        return _load_image_folder(path, options)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".pt", ".pth"):
            return _load_pt(path, options.get("flag") or "--data", options.get("model"))
        if suffix == ".npz":
            arrays = read_npz(path)
            if "x" not in arrays:
                raise UserError(f"{spec!r} has arrays {sorted(arrays)}; it needs 'x' (inputs) and optionally 'y'.")
            return _from_tensors(*inputs_and_labels(arrays, spec, ("x_max",)), spec, _x_max(arrays, spec))
        raise UserError(f"data file {spec!r}: {suffix or 'no extension'} is not supported; give {DATA_FORMS}.")
    if _FACTORY_RE.match(spec):
        from cleanai_core.job.inputs import is_pair

        ds = call_spec(spec, "data function", {}, options)
        if is_hf_model(options.get("model")):  # token ids, read as a .pt of them is
            from cleanai_plugins.io.text import function_data

            ds = function_data(ds, options["model"], spec)
        if isinstance(ds, dict) and any(k in ds for k in INPUT_KEYS) or is_pair(ds):
            # (x, y) tensors were read as a data set of two items: "the model failed on an input (shape (1, 16, ...))"
            return _from_object(ds, spec, options.get("model"))
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise UserError(  # said no more: an IterableDataset or a generator needs to be made indexable
                f"{spec} returned a {type(ds).__name__}, not a map-style torch Dataset: the data is split into "
                "calibration and held-out parts by index, so it needs len() and [i]; return TensorDataset(x, y), "
                "(x, y) tensors or a list of (input, label) samples (e.g. list(your_iterable))."
            )
        return ds
    return None


@hookimpl(trylast=True)
def cleanai_load_dataset(spec, options):
    return load_dataset(spec, options)


@hookimpl(trylast=True)
def cleanai_input_forms():
    return {"data": DATA_FORMS}
