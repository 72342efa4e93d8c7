"""The job's inputs: the model and data set from their specs (through the loader hooks),
the split into calibration and held-out evaluation parts, and what can be read off a
data set (its first input, whether it has labels)."""

from __future__ import annotations

import collections.abc
import os
from pathlib import Path
from typing import Any

import torch

from cleanai_core.config_sources import ENV_PREFIX
from cleanai_core.errors import UserError
from cleanai_core.extras import check_file_spec
from cleanai_core.model_state import set_mode
from cleanai_core.options import meta_tensor
from cleanai_core.runtime import cast_within_range

__all__ = [
    "check_real",
    "checked_dataset",
    "is_pair",
    "CheckedDataset",
    "checked_collate",
    "first_input",
    "has_labels",
    "load_inputs",
    "spec_options",
    "split_dataset",
    "to_device",
]


def first_not_finite(example: Any) -> bool:
    """Whether the floating tensors of a first input (a tensor or a dict of them) hold NaN
    or inf: such data is refused before anything runs (``--data``, ``--train-data``)."""
    tensors = [example] if isinstance(example, torch.Tensor) else list(dict(example).values())
    return any(
        isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors
    )


def first_input(dataset: Any) -> Any:
    from cleanai_core.calibration import split_batch

    item = dataset[0]
    if isinstance(item, dict):  # labels are not inputs
        return {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else v) for k, v in split_batch(item)[0].items()}
    if isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, torch.Tensor):
        kind = type(item).__name__
        if type(item).__module__.startswith("PIL."):  # a torchvision data set built without a transform
            raise UserError(
                f"data items must be tensors or (input, label) pairs; got a PIL image ({kind}). Give the data set a "
                "transform that makes tensors (torchvision.transforms.ToTensor(), with the model's resize and "
                "normalisation), or give an image folder as --data (with --image-size)."
            )
        raise UserError(f"data items must be tensors or (input, label) pairs; got {kind}.")
    return item.unsqueeze(0)


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def has_labels(dataset: Any) -> bool:
    from cleanai_core.calibration import split_batch

    item = dataset[0]
    if isinstance(item, dict):
        return split_batch(item)[1] is not None
    return isinstance(item, (tuple, list)) and len(item) >= 2


def spec_options(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    """Consent for ``--model``/``--data``: a spec typed on the command line may name code to
    import and call; one read from ``--config`` only with ``--trust-code``."""
    from_config = key in (cfg.get("_from_config") or ())
    source = f"--{key}"
    if from_config and (cfg.get("_sources") or {}).get(key) == "environment":
        source = f"{ENV_PREFIX}{key.upper()} in the environment"
    elif from_config:
        source = f"{key} in config file {cfg.get('config')!r}"
    # "flag": the option the loaders' messages name (a --train-data file was called --data)
    flag = f"--{key.replace('_', '-')}"
    return {"trust_code": bool(cfg.get("trust_code")) or not from_config, "spec_source": source, "flag": flag}


def _model_options(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "weights": cfg.get("weights"),
        "trust_model": bool(cfg.get("trust_model")),
        "num_classes": cfg.get("num_classes"),
        "pretrained": False,
        # a saved folder's own architecture.json runs code only with the explicit flag
        "trust_folder_code": bool(cfg.get("trust_code")),
        **spec_options(cfg, "model"),
    }


def check_real(model: Any, spec: str) -> None:
    """A :class:`UserError` for a ``--model`` whose tensors are on the meta device (a factory
    that builds under ``torch.device('meta')``): ``cleanai prune`` raised
    ``NotImplementedError: Cannot copy out of meta tensor`` from ``.to(device)`` (exit 1),
    ``cleanai explain`` blamed ``--input-shape``."""
    meta = meta_tensor(model)
    if meta is not None:
        raise UserError(
            f"--model {spec!r} gave a model whose tensors are on the meta device (e.g. {meta!r}: a shape without "
            "values), so there is nothing to prune or measure. Build it with real tensors (not under "
            "torch.device('meta') or an empty-weights context), or give its weights with --weights FILE."
        )


def load_inputs(cfg: dict[str, Any], model: Any = None, dataset: Any = None) -> tuple[Any, Any, Any]:
    """Model (eval mode, on the device), data set and the plugin manager: each read from
    ``cfg`` unless given (``run_job(config, model=m)``: the model given, the data from
    ``--data``; both were read from ``cfg``, so the user's trained model was replaced by
    one built from the spec without a word, and a data set given alone was never read)."""
    from cleanai_core.job.config import check_config_paths
    from cleanai_core.plugins import get_plugin_manager, input_forms, load_model

    check_config_paths(cfg)
    pm = get_plugin_manager()
    data = cfg["data"]
    if dataset is None and str(data).startswith("embedded:") and not Path(data).exists():
        # the name cleanai demo gives its own data in config.json: read as an import spec, its rerun was
        # offered --trust-code (and then would have pruned an untrained network: the demo's trained weights
        # are in no file)
        raise UserError(
            f"--data {data!r} is the data set cleanai demo embeds and trains on in the run; a config.json of "
            "cleanai demo records it, but its model is trained in that run and saved nowhere, so cleanai prune "
            "cannot rerun it. Run cleanai demo again (with the --seed and --ratio its config.json holds), or give "
            "--model and --data of your own."
        )
    path_like = Path(data).suffix or "/" in data or os.sep in data
    if dataset is None:
        check_file_spec(data, "--data", "a data function")
    if dataset is None and not Path(data).exists() and path_like and ":" not in data:
        raise UserError(f"--data {data!r}: no such file or folder. Give {input_forms('data', pm)}.")
    if model is None:
        model_options = _model_options(cfg)
        check_file_spec(cfg["model"], "--model", "a model factory")
        model = load_model(pm, cfg["model"], model_options)
        if model is None:
            hint = " (no such file)" if ("/" in cfg["model"] or "." in Path(cfg["model"]).suffix) else ""
            forms = input_forms("model", pm)
            raise UserError(f"--model {cfg['model']!r}{hint}: not a model this tool can load. Give {forms}.")
        check_real(model, cfg["model"])
        model = set_mode(model, False).to(cfg["device"])
        if model_options.get(
            "resolved_spec"
        ):  # a loader's spec that works from any folder (a relative path made absolute)
            cfg["_model_spec"] = model_options["resolved_spec"]
        if isinstance(model_options.get("stored_dtype"), torch.dtype):  # the files' dtype, narrower than the model's
            cfg["_stored_dtype"] = model_options["stored_dtype"]
            cfg["_stored_float32"] = tuple(model_options.get("stored_float32") or ())  # tensors the files keep float32
        if model_options.get("prior_history") is not None:  # --model FOLDER: pruned before, by cleanai
            cfg["_prior_history"] = model_options["prior_history"]
            cfg["_arch_options"] = model_options.get("arch_options") or {}
    if dataset is None:
        dataset = pm.hook.cleanai_load_dataset(
            spec=cfg["data"],
            options={
                "model": model,
                "image_size": cfg.get("image_size"),
                "seq_len": cfg.get("seq_len"),
                **spec_options(cfg, "data"),
            },
        )
        if dataset is None:
            raise UserError(
                f"--data {cfg['data']!r}: no such file or folder, or not a form this tool reads. "
                f"Give {input_forms('data', pm)}."
            )
    return model, checked_dataset(dataset, model, str(data)), pm


def checked_dataset(dataset: Any, model: Any, source: str) -> CheckedDataset:
    """``dataset`` (read from ``--data`` or given to ``run_job``) for the job: at least two
    items, each checked as it is read. Given to ``run_job``: a ``DataLoader`` stands for its
    data set (the job batches it by ``batch_size``), ``(x, y)`` tensors for the data set of
    their rows. They were a data set of two items ("the model failed on an input of shape
    (1, 16, ...)"), "'DataLoader' object is not subscriptable", and an empty data set an
    ``IndexError`` traceback."""
    from torch.utils.data import DataLoader, TensorDataset

    if isinstance(dataset, DataLoader):
        dataset = dataset.dataset
    if isinstance(dataset, (str, bytes, os.PathLike)):  # "data items must be tensors ...; got str" (its letters)
        raise UserError(
            f"--data {source!r} is the path {os.fsdecode(dataset)!r}, not a data set: give a file or folder as the "
            "option 'data' (run_job({..., 'data': path})), and as dataset= a torch Dataset, (x, y) tensors or a list "
            "of (input, label) samples."
        )
    # {'x': x, 'y': y}: "reading item 1 failed (KeyError: 1)"; a dict keyed by sample index is a data set
    if isinstance(dataset, collections.abc.Mapping) and set(dataset) != set(range(len(dataset))):
        keys = ", ".join(repr(k) for k in list(dataset)[:4]) + (", ..." if len(dataset) > 4 else "")
        raise UserError(
            f"--data {source!r} is a {type(dataset).__name__} (keys {keys or 'none'}), not a data set: it is read by "
            "sample index (0, 1, ...), which a dict does not have. Give the inputs and labels as (x, y) tensors "
            "(e.g. (d['x'], d['y'])), TensorDataset(x, y), or one split of a dict of splits."
        )
    if is_pair(dataset):
        dataset = TensorDataset(*dataset)
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise UserError(
            f"--data {source!r} is a {type(dataset).__name__}, not a map-style torch Dataset: the data is split into "
            "calibration and held-out parts by index, so it needs len() and [i]; give TensorDataset(x, y), (x, y) "
            "tensors or a list of (input, label) samples (e.g. list(your_iterable))."
        )
    dataset = CheckedDataset(dataset, model, source)
    if len(dataset) < 2:
        raise UserError(f"--data {source!r} has {len(dataset)} item(s); at least 2 are needed.")
    return dataset


def is_pair(obj: Any) -> bool:
    """Whether ``obj`` is ``(x, y)``: inputs with a batch dimension and one label (or row) per input."""
    if not (isinstance(obj, tuple) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)):
        return False
    x, y = obj
    return x.dim() >= 2 and 1 <= y.dim() <= 2 and len(x) == len(y)


#: data sets up to this many items are split by a listed permutation (36 bytes an item as a Python list)
LISTED_SPLIT = 10_000_000


class Shuffled(collections.abc.Sequence):
    """The seeded permutation ``i -> (a i + b) mod n`` of ``range(n)``, computed per index: a
    data set whose ``len()`` is 10**12 (a lazy or generated one, or a wrong ``__len__``)
    made the split allocate an 8,000 GB permutation (a ``RuntimeError`` traceback); at 10**9
    its Python list alone was 36 GB, past what the machine has."""

    def __init__(self, n: int, seed: int, start: int = 0, stop: int | None = None) -> None:
        import math
        import random

        rng = random.Random(seed)
        self.n, self.start, self.stop = n, start, n if stop is None else stop
        self.a = next(a for a in iter(lambda: rng.randrange(1, n), None) if math.gcd(a, n) == 1)
        self.b = rng.randrange(n)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[k] for k in range(start, stop, step)]
            part = Shuffled.__new__(Shuffled)
            part.n, part.a, part.b = self.n, self.a, self.b
            part.start, part.stop = self.start + start, self.start + max(start, stop)
            return part
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return (self.a * (self.start + i) + self.b) % self.n


def split_dataset(dataset: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Seeded random split into (calibration, held-out evaluation); evaluation is ``None``
    when ``fraction`` is 1."""
    from torch.utils.data import Subset

    n = len(dataset)
    perm: Any = (
        torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        if n <= LISTED_SPLIT
        else Shuffled(n, seed)
    )
    n_cal = n if fraction >= 1.0 else min(max(1, int(round(n * fraction))), n - 1)
    calib = Subset(dataset, perm[:n_cal])
    held = Subset(dataset, perm[n_cal:]) if n_cal < n else None
    return calib, held


def _numpy_as_tensors(item: Any) -> Any:
    """An item with its NumPy arrays as tensors, at the top or one level down (``(x, y)``, a
    dict), as ``default_collate`` would make them; a data set returning arrays was refused
    ("data items must be tensors ...; got ndarray")."""
    if _is_array(item):
        return _as_tensor(item)
    if isinstance(item, tuple):
        values = [_as_tensor(v) if _is_array(v) else v for v in item]
        return type(item)(*values) if hasattr(item, "_fields") else tuple(values)  # a namedtuple keeps its type
    if isinstance(item, list):
        return [_as_tensor(v) if _is_array(v) else v for v in item]
    if isinstance(item, dict):
        return {k: (_as_tensor(v) if _is_array(v) else v) for k, v in item.items()}
    return item


def _is_array(v: Any) -> bool:
    return type(v).__module__ == "numpy" and type(v).__name__ == "ndarray"


def _as_tensor(a: Any) -> torch.Tensor:
    if a.dtype.kind not in "biuf":  # objects, text, dates, complex: what default_collate refuses too
        raise UserError(
            f"a data item holds a NumPy array of dtype {str(a.dtype)!r}; give numeric arrays (float inputs, integer "
            "labels)."
        )
    return torch.as_tensor(a)


def _cast_inputs(item: Any, dtype: torch.dtype | None, where: str = "an input") -> Any:
    """An item's floating inputs in ``dtype`` (labels, integer ids and masks untouched), each
    within the dtype's range (:func:`~cleanai_core.runtime.cast_within_range`)."""
    if dtype is None:
        return item

    def cast(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        return cast_within_range(t, dtype, where)

    if isinstance(item, torch.Tensor):
        return cast(item)
    if isinstance(item, (tuple, list)) and item:
        values = [cast(item[0]), *item[1:]]
        if hasattr(item, "_fields"):  # a namedtuple takes its fields one by one (a float16 model raised TypeError)
            return type(item)(*values)
        return tuple(values) if isinstance(item, tuple) else values
    if isinstance(item, dict):
        return {k: (v if k in ("labels", "label") else cast(v)) for k, v in item.items()}
    return item


class CheckedDataset(torch.utils.data.Dataset):
    """The job's view of ``--data``: its length checked once, an item that fails to load
    named by index, and floating inputs in the model's floating dtype (a float16 or bfloat16
    model was fed the file's float32 and failed with a dtype mismatch)."""

    def __init__(self, dataset: Any, model: Any, spec: str) -> None:
        try:
            n = len(dataset)
        except Exception as exc:  # a data function's own __len__ (e.g. a negative length)
            raise UserError(f"--data {spec!r}: len() of the data set failed ({type(exc).__name__}: {exc}).") from None
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UserError(f"--data {spec!r}: the data set's len() is {n!r}, not a count of items.")
        p = next((p for p in model.parameters() if p.is_floating_point()), None)
        self.dataset, self.n, self.spec = dataset, n, spec
        # every item in the model's dtype: items of several float dtypes (float64 and float32 arrays
        # in one data set) failed to stack, "expected scalar type Double but found Float"
        self.dtype = p.dtype if p is not None else None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        try:
            item = self.dataset[index]
        except UserError:
            raise
        except Exception as exc:
            hint = ""
            if isinstance(exc, IndexError):  # the split asks for indices below len(): a __len__ that overcounts
                hint = (
                    f" Its len() is {self.n:,}, and item {index} is below it: check that __len__ counts "
                    "only the items __getitem__ can return."
                )
            raise UserError(
                f"--data {self.spec!r}: reading item {index} failed ({type(exc).__name__}: {str(exc)[:200]}).{hint}"
            ) from None
        return _cast_inputs(_numpy_as_tensors(item), self.dtype, f"--data {self.spec!r}: item {index}")


def checked_collate(items: list[Any]) -> Any:
    """``default_collate``, with items of different shapes (images of several sizes, token rows
    of several lengths) named instead of a ``RuntimeError`` from ``torch.stack``."""
    from torch.utils.data import default_collate

    try:
        return default_collate(items)
    except (RuntimeError, TypeError) as exc:
        shapes = sorted({str(tuple(_first_tensor(it).shape)) for it in items if _first_tensor(it) is not None})
        kinds = [_kind(it) for it in items]
        other = next((k for k in kinds if k != kinds[0]), None)
        if other is not None and len(shapes) <= 1:  # "expected Tensor as element 6 in argument 0, but got NoneType"
            raise UserError(
                f"the items of --data cannot be put in one batch: one item is {kinds[0]}, another {other}. Give every "
                "item the same parts, of the same types (e.g. (image tensor, integer label))."
            ) from None
        detail = f"shapes {', '.join(shapes[:4])}" if len(shapes) > 1 else f"{type(exc).__name__}: {str(exc)[:200]}"
        raise UserError(
            f"the items of --data cannot be put in one batch ({detail}); give items of one shape and type "
            "(for an image folder, --image-size N resizes them), or --batch-size 1"
        ) from None


def _kind(item: Any, depth: int = 0) -> str:
    """What an item of a data set is, to tell two that do not batch together apart:
    ``(tensor (1, 8, 8) float32, int)``, ``{'x': tensor (3,) float32, 'y': text}``."""
    if isinstance(item, torch.Tensor):
        return f"tensor {tuple(item.shape)} {str(item.dtype).removeprefix('torch.')}"
    if isinstance(item, (str, bytes)):
        return "text"
    if depth < 3 and isinstance(item, (tuple, list)):
        inner = ", ".join(_kind(v, depth + 1) for v in item[:6]) + (", ..." if len(item) > 6 else "")
        return f"({inner})" if isinstance(item, tuple) else f"[{inner}]"
    if depth < 3 and isinstance(item, dict):
        return "{" + ", ".join(f"{k!r}: {_kind(v, depth + 1)}" for k, v in list(item.items())[:6]) + "}"
    return type(item).__name__


def _first_tensor(item: Any) -> torch.Tensor | None:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item:
        return _first_tensor(item[0])
    if isinstance(item, dict):
        return next((v for v in item.values() if isinstance(v, torch.Tensor)), None)
    return None
