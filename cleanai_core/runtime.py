"""Stage 0, the runtime: calling the user's model.

Every stage that runs the model goes through here: how inputs are passed (tensor,
tuple, dict or ``forward_fn``), which device and dtype they go to, what the logits of an
output are (``output_transform``, else ``.logits``), and module modes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from cleanai_core.errors import UserError
from cleanai_core.model_state import writes_guarded

__all__ = [
    "call_model",
    "cast_within_range",
    "copied_inputs",
    "channels_last_layout",
    "may_run_channels_last",
    "output_leaves_of",
    "plain_inputs",
    "positional_inputs",
    "private_rng",
    "without_autocast",
    "runs_the_same",
    "check_labels",
    "class_logits",
    "classes_on_dim1",
    "checked_device",
    "copy_modes",
    "decoder_inputs_from_labels",
    "device_of",
    "dtype_advice",
    "find_logits",
    "inputs_for",
    "iterate",
    "label_indices",
    "logits_of",
    "move_to",
    "no_nested_fast_path",
    "not_class_labels",
    "reads_as_regression",
    "regression_targets",
    "run_batch",
    "same_layout",
    "split_batch",
    "text_error",
    "to_channels_last",
    "total_batches",
    "unused_key_hint",
]


def call_model(model: nn.Module, inputs: Any, forward_fn: Callable | None = None, copy: bool = True) -> Any:
    """Call ``model`` on ``inputs`` the way every part of CleanAI does: ``forward_fn(model,
    inputs)`` when given, else a tensor positionally, a tuple/list as positional arguments,
    a dict as keywords. The model gets copies of the input tensors: a forward that changes
    its input in place (``x.div_(255)``) changed the user's example input and calibration
    batches at every call (2**15 times over for the example), and the original and pruned
    models then saw other inputs, so verification skipped every group. ``copy=False``: the
    caller passes tensors of its own (the trace, which follows them by identity). Inside
    :func:`~cleanai_core.model_state.preserved`, parameters the forward writes in place are
    copied before the write and put back with the rest of the model's state."""
    if copy:
        inputs = copied_inputs(inputs)
    with writes_guarded(model), no_nested_fast_path():  # a forward writing its weights writes what is put back
        if forward_fn is not None:
            return forward_fn(model, inputs)
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)


@contextmanager
def no_nested_fast_path() -> Iterator[None]:
    """Switch off ``nn.TransformerEncoder``'s fast path for CleanAI's own runs: in eval
    mode with a padding mask it packs the batch into a ``NestedTensor``, which the trace
    cannot record ("NestedTensorImpl doesn't support sizes") and the hooks of masking and
    calibration cannot index; the plain path computes the same at every position the mask
    keeps (the fast path writes zeros at the padded ones). Before 2026-12-02 such a model
    could not be traced."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not mha.get_fastpath_enabled():
        yield
        return
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(True)


def copied_inputs(inputs: Any) -> Any:
    """``inputs`` with every tensor cloned (the same values, not the caller's tensors)."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)


def to_channels_last(inputs: Any) -> Any:
    """``inputs`` with every 4-D float tensor in channels-last memory order (the same values)."""
    return tree_map(
        lambda t: (
            t.contiguous(memory_format=torch.channels_last)
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point()
            else t
        ),
        inputs,
    )


def channels_last_layout(model: nn.Module, inputs: Any, forward_fn: Callable | None = None) -> Callable[[Any], Any]:
    """How to lay out ``model``'s inputs for many forward passes on the CPU: 4-D float
    tensors in channels-last memory order where the model runs them the same way, else
    as they are (the identity).

    On CPU, PyTorch's convolutions run 1.4x faster on a channels-last input (ResNet-50,
    16 images at 224 px, 2 threads: 0.78 s against 1.12 s), and the layout carries through
    every layer; the weights stay as they are, so the user's model is not touched. A
    model's own code may not accept the layout (``.view`` on a conv output) or may read
    memory directly: the first sample of ``inputs`` (the first two where one disagrees)
    runs both ways first, and the layout is used only where that raises nothing and the
    outputs agree to float rounding (:func:`runs_the_same`). Not on other devices (GPU
    convolutions in float32 gain little or lose)."""
    if not may_run_channels_last(model, inputs):
        return same_layout
    for k in _CHECKED_SAMPLES:
        few = _first_samples(inputs, k)
        try:
            last = output_leaves_of(model, to_channels_last(few), forward_fn)
        except Exception:
            return same_layout
        if runs_the_same(model, few, forward_fn, last, k):
            return to_channels_last
        if _batch_size(inputs) <= k:
            break
    return same_layout


def may_run_channels_last(model: nn.Module, inputs: Any) -> bool:
    """Whether ``inputs`` hold images (4-D float tensors), the model and they are on the
    CPU, and the model has at least two 2-D convolution kernels (4-D weights). With one
    (a vision transformer's patch embedding) the layout speeds up that layer only, and
    checking it costs samples run the other way (two, when this was written: on ViT-S at
    32 calibration images, 6% of the collection's inference for nothing)."""
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    images = [t for t in leaves if t.dim() == 4 and t.is_floating_point()]
    on_cpu = all(t.device.type == "cpu" for t in leaves) and (device_of(model) or torch.device("cpu")).type == "cpu"
    return bool(images) and on_cpu and _kernels_4d(model) >= 2


def _kernels_4d(model: nn.Module, enough: int = 2) -> int:
    """How many 4-D parameters ``model`` has, counted up to ``enough``."""
    found = 0
    for p in model.parameters():
        found += p.dim() == 4
        if found >= enough:
            break
    return found


#: samples of a batch run both ways to check the layout: one, and two where one disagrees
#: (a model that squeezes its batch dimension gives another shape for one sample). One
#: sample run channels-first is about 3% of a 32-image calibration's inference.
_CHECKED_SAMPLES = (1, 2)


def runs_the_same(
    model: nn.Module, inputs: Any, forward_fn: Callable | None, outputs: list[torch.Tensor], only: int | None = None
) -> bool:
    """Whether ``model`` gives ``outputs`` (its output leaves on ``inputs`` laid out
    channels-last) on ``inputs`` as they are, to float rounding: the first sample runs as
    it is and is compared with the same row of ``outputs`` (one sample's outputs do not
    depend on the others' in eval mode), then, where that disagrees, the first two; where
    an output has no batch dimension, the samples run channels-last again for the
    comparison. False where the model raises. ``only``: check with that many samples only."""
    for k in (only,) if only is not None else _CHECKED_SAMPLES:
        if _agrees_on(model, inputs, forward_fn, outputs, k):
            return True
        if _batch_size(inputs) <= k:
            break
    return False


def _agrees_on(model: nn.Module, inputs: Any, forward_fn: Callable | None, outputs: list[torch.Tensor], k: int) -> bool:
    n = _batch_size(inputs)
    few = _first_samples(inputs, k)
    k = _batch_size(few)
    try:
        if k != n and not all(o.dim() > 0 and o.shape[0] == n for o in outputs):
            outputs = output_leaves_of(model, to_channels_last(few), forward_fn)
        elif k != n:
            outputs = [o[:k] for o in outputs]
        plain = output_leaves_of(model, few, forward_fn)
    except Exception:
        return False
    return len(plain) == len(outputs) and all(_agree(a, b) for a, b in zip(plain, outputs, strict=False))


def output_leaves_of(model: nn.Module, inputs: Any, forward_fn: Callable | None = None) -> list[torch.Tensor]:
    """Every tensor ``model`` outputs on ``inputs`` (eval state kept, no gradients)."""
    from cleanai_core.verify import model_outputs

    return model_outputs(model, inputs, forward_fn, lambda out: out)  # all outputs, not only the logits


def _batch_size(inputs: Any) -> int:
    """The batch size of the images in ``inputs`` (a 4-D float tensor's first dimension)."""
    leaves = tree_flatten(inputs)[0]
    return next(t.shape[0] for t in leaves if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point())


def _first_samples(inputs: Any, k: int) -> Any:
    """The first ``k`` samples of a batch (tensors whose first dimension is the images' batch size)."""
    n = _batch_size(inputs)
    return tree_map(lambda t: t[:k] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else t, inputs)


def same_layout(inputs: Any) -> Any:
    """The inputs as they are (the layout where channels-last is not used)."""
    return inputs


def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two outputs of one model on the same inputs in two memory layouts: equal to float
    rounding (a tenth of a percent of the largest value)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    finite = torch.isfinite(a)
    scale = float(a[finite].abs().max()) if bool(finite.any()) else 0.0
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-3 * scale, equal_nan=True))


def checked_device(value: Any, name: str) -> torch.device:
    """``value`` as a device this machine has, else a :class:`UserError` naming the option
    ``name`` (``"--device"``, ``"map_location="``): ``cuda`` without a GPU raised the driver's
    ``RuntimeError`` in the middle of a run, or was blamed on the file being loaded."""
    # an empty value or one with spaces is quoted: "--device  is not a device" hid what was given
    odd = isinstance(value, str) and not (value and value == value.strip() and value.isprintable())
    shown = f"{name}{value!r}" if not name.startswith("--") else f"{name} {value!r}" if odd else f"{name} {value}"
    try:
        device = value if isinstance(value, torch.device) else torch.device(value)
    except (RuntimeError, TypeError):
        raise UserError(f"{shown} is not a device; use cpu, cuda or cuda:N.") from None
    if device.type == "meta":
        raise UserError(f"{shown} holds shapes without data, so nothing can be measured or loaded; use cpu or cuda.")
    if device.type == "cpu" and device.index:
        # torch takes cpu:1 and puts every tensor on the one cpu: the run went on as if cpu:1 were a
        # second device the user had chosen
        raise UserError(f"{shown}: torch has one cpu device (cpu, or cpu:0), whatever the number of cores; use cpu.")
    try:
        backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    except ImportError:  # torch.privateuseone: a lazy module that is not there
        backend = None
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        raise UserError(f"{shown} was asked for, but this machine has no {device.type} device; use cpu.")
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise UserError(f"{shown}: this machine has {count()} {device.type} device(s) (0..{count() - 1}).")
    if device.type != "cpu" and not callable(available):
        # a type torch can name but not say is there (xla, privateuseone, ...): the run failed later with
        # "PyTorch is not linked with support for xla devices" or a ModuleNotFoundError, as a traceback
        try:
            torch.empty(0, device=device)
        except Exception as exc:
            raise UserError(
                f"{shown} was asked for, but this PyTorch cannot put a tensor there ({type(exc).__name__}: "
                f"{str(exc)[:200]}); use cpu, or cuda on a machine with a GPU."
            ) from None
    return device


@contextmanager
def private_rng(device: torch.device | None = None) -> Iterator[None]:
    """Run the block on a fork of the global random generators (the CPU's, and ``device``'s
    where it is a CUDA device): what the block draws (layers initialised when a model is
    built, dropout, shuffling) leaves the caller's random state as it was."""
    cuda = []
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        yield


@contextmanager
def without_autocast() -> Iterator[None]:
    """A context (or decorator) that switches off the caller's ``torch.autocast`` (CPU, and
    CUDA where there is one): pruning traces, measures, scores, compensates and verifies in
    the model's own dtype. A ``GradualPruner`` step inside a training loop's
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` scored on bfloat16 activations (a
    ResNet-18 lost other channels than outside it, weights up to 4.7 apart), and so did
    ``StructuredPruner`` and ``analyse_sensitivity`` called there."""
    with ExitStack() as stack:
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def device_of(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter (``None`` without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else None


def inputs_for(model: nn.Module, inputs: Any) -> Any:
    """``inputs`` on ``model``'s device, floating tensors cast to the model's floating dtype:
    every one where the model computes in one dtype (float32 batches for a float16 or
    bfloat16 model failed with a dtype mismatch, as the command line and ``recover`` cast
    them), float64 ones where it mixes dtypes (numpy arrays default to float64)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None:
        return inputs
    inputs = move_to(inputs, p.device)
    if len(dtypes) == 1:
        cast = lambda t: t.is_floating_point() and t.dtype != p.dtype  # noqa: E731
    else:
        cast = lambda t: t.dtype == torch.float64 and p.dtype != torch.float64  # noqa: E731
    return tree_map(lambda t: t.to(p.dtype) if isinstance(t, torch.Tensor) and cast(t) else t, inputs)


def cast_within_range(t: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """``t`` in the floating ``dtype``; a finite value the cast makes infinite (float64 data
    of 1e300 for a float32 model, 1e5 for a float16 one) is a :class:`UserError` naming
    ``where`` and the largest value. A data file of such values was refused with "contains
    NaN or inf values; clean the data", values it did not hold."""
    out = t.to(dtype)
    if t.dtype == dtype or torch.finfo(dtype).max >= torch.finfo(t.dtype).max or bool(torch.isfinite(out).all()):
        return out
    lost = torch.isfinite(t) & ~torch.isfinite(out)
    if bool(lost.any()):
        raise UserError(
            f"{where}: {str(t.dtype).replace('torch.', '')} values up to {float(t[lost].abs().max()):.3g} in "
            f"magnitude do not fit in {str(dtype).replace('torch.', '')} (at most {torch.finfo(dtype).max:.3g}), "
            "the dtype they are read in for the model: scale or normalise the inputs as the model was trained on them."
        )
    return out


_DTYPE_WORDS = ("scalar type", "not implemented for '", "Input type", "dtype", "should be the same")


def dtype_advice(model: nn.Module, inputs: Any, name: str = "example_inputs", exc: BaseException | None = None) -> str:
    """A sentence when ``inputs`` hold tensors of a dtype the model computes in nowhere:
    floating ones of another precision (float64 inputs for a float32 model: the trace's
    error said only "Input type (double) and bias type (float) should be the same"), or,
    where ``exc`` is a dtype error, integers, booleans or complex numbers for a floating
    model (uint8 images: "expected scalar type Byte but found Float", and the advice was
    about shapes); else ``""``. Integer token ids are what an embedding reads, so they get
    the sentence only when the model failed on their dtype."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    given = {t.dtype for t in leaves if t.is_floating_point()}
    if len(dtypes) != 1 or given & dtypes:
        return ""
    want = str(next(iter(dtypes)))
    if given:
        return (
            f" {name} are {', '.join(sorted(map(str, given)))} but the model's parameters are {want}: give them in "
            f"the model's dtype (x.to({want}))."
        )
    odd = sorted({str(t.dtype) for t in leaves})
    if not odd or exc is None or not any(w in str(exc) for w in _DTYPE_WORDS):
        return ""
    fix = "real numbers (x.real, or x.abs())" if any("complex" in d for d in odd) else (
        "floating-point values (x.float(), divided by 255 for 8-bit pixel values)")  # fmt: skip
    return f" {name} are {', '.join(odd)} but the model computes in {want}: give {fix}."


def run_batch(model: nn.Module, inputs: Any, forward_fn: Callable | None = None) -> Any:
    """Call ``model`` on a batch's inputs, moved and cast for it (:func:`inputs_for`)."""
    return call_model(model, inputs_for(model, inputs), forward_fn)


def logits_of(out: Any, output_transform: Callable[[Any], Any] | None = None) -> Any:
    """What a loss reads from a model output: ``output_transform(out)`` when given, else
    ``out.logits`` where the output has it (Hugging Face), else ``out``."""
    if output_transform is not None:
        return output_transform(out)
    return getattr(out, "logits", out)


def find_logits(out: Any) -> torch.Tensor | None:
    """The class scores in a model output: a tensor, ``.logits`` (Hugging Face), a dict's
    ``"logits"`` (else its first tensor), or a tuple's first element; ``None`` if none."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out.get("logits", next((v for v in out.values() if isinstance(v, torch.Tensor)), None))
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def copy_modes(source: nn.Module, target: nn.Module) -> None:
    """Give every module of ``target`` the train/eval mode of its namesake in ``source``
    (a frozen BatchNorm inside a training model stays frozen)."""
    modes = {name: m.training for name, m in source.named_modules()}
    for name, m in target.named_modules():
        m.training = modes.get(name, source.training)


def class_logits(logits: torch.Tensor) -> torch.Tensor:
    """Classification logits ``(N, C, ...)`` with one logit per class: a single logit ``z``
    (a binary classifier, ``(N, 1)``) as the two classes' ``(0, z)``, whose softmax is
    ``(1 - sigmoid(z), sigmoid(z))``: cross-entropy on it is the binary cross-entropy, its
    argmax the logit's sign. Other logits (and outputs that are no tensor: a feature net's list
    or dict, which the label check then refuses with the fix) as they are."""
    if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], 1)
    return logits


def classes_on_dim1(logits: Any, target: Any) -> Any:
    """A sequence model's logits ``(N, T, classes)`` with one integer label per position
    ``(N, T)`` (a language model or tagger written in plain PyTorch), with the classes moved to
    dim 1, where cross-entropy reads them; other logits as they are. Where the labels fit
    dim 1 too (``T`` equal to the number of classes), dim 1 stays the classes."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor) or logits.dim() < 3:
        return logits
    if target.is_floating_point() or target.is_complex() or tuple(target.shape) != tuple(logits.shape[:-1]):
        return logits
    if tuple(target.shape) == (logits.shape[0], *logits.shape[2:]):
        return logits
    return logits.movedim(-1, 1)


def _kind_of(out: Any) -> str:
    """A model output's kind as a message names it: ``a dict with keys '0', '1', 'pool'``."""
    name = type(out).__name__
    kind = f"{'an' if name[:1] in 'AEIOU' else 'a'} {name}"
    if isinstance(out, dict):
        keys = ", ".join(repr(str(k)) for k in list(out)[:4])
        return f"{kind} with keys {keys}{' ...' if len(out) > 4 else ''}"
    if isinstance(out, (list, tuple)):
        return f"{kind} of {len(out)}"
    return kind


def check_labels(out: Any, target: Any, criterion: str = "taylor") -> torch.Tensor:
    """Labels a classification loss can use for gradient criteria, or a :class:`UserError`.
    Labels given as a list or tuple of numbers (``[0, 1, 2, 3]``) are taken as the tensor
    they make; text labels are named (both were told to pass ``output_transform``).
    ``criterion``: the gradient criterion's name, which the messages give (a hessian run's
    said "taylor importance")."""
    if isinstance(out, torch.Tensor) and isinstance(target, (list, tuple)):
        text = next((v for v in tree_flatten(target)[0] if isinstance(v, (str, bytes))), None)
        if text is not None:
            raise UserError(
                f"{criterion} importance needs class indices, but the labels are text (e.g. {text!r}); give integer "
                "class indices 0..N-1 in the order of the model's outputs (e.g. [classes.index(label) for label in y])"
            )
        try:
            target = torch.as_tensor(target)
        except (TypeError, ValueError, RuntimeError):
            pass  # a list of tensors of several shapes, objects: the message below
    if isinstance(out, torch.Tensor) and isinstance(target, (str, bytes)):
        raise UserError(
            f"{criterion} importance needs class indices, but the label is text ({target!r}); give a tensor of integer "
            "class indices 0..N-1, one per input"
        )
    if not isinstance(out, torch.Tensor) or not isinstance(target, torch.Tensor):
        got = "" if isinstance(out, torch.Tensor) else f" (the model returns {_kind_of(out)})"
        raise UserError(
            f"{criterion} importance needs a tensor of logits and a tensor of labels{got}; pass "
            "output_transform=lambda out: <the logits> for models that return something else"
        )
    if target.is_floating_point() and target.dim() == 1 and target.shape != out.shape:
        indices = label_indices(target)  # whole numbers: class indices
        target = target if indices is None else indices
    if target.is_floating_point() or target.is_complex():
        if target.shape == out.shape:  # class probabilities (soft labels)
            return target.to(out.dtype)
        raise UserError(
            f"{criterion} importance needs integer class labels, got {target.dtype} labels of shape "
            f"{tuple(target.shape)}; give class indices 0..N-1 (e.g. labels.long())"
        )
    if target.ndim == 0 or out.ndim == 0 or target.shape[0] != out.shape[0]:
        n_in = out.shape[0] if out.ndim else 1
        n_lab = target.shape[0] if target.ndim else 1
        raise UserError(
            f"the calibration batch has {n_in} inputs but {n_lab} labels; "
            f"give one label per input for {criterion} importance"
        )
    if out.ndim >= 2:  # cross-entropy: classes along dim 1, one label per remaining position
        want = (out.shape[0], *out.shape[2:])
        if tuple(target.shape) != want:
            raise UserError(
                f"{criterion} importance scores with cross-entropy over dim 1 of the output, which has shape "
                f"{tuple(out.shape)}, so it needs integer labels of shape {want}; got labels of shape "
                f"{tuple(target.shape)}. Give labels that match the output, or pass output_transform=lambda out: "
                "<the logits, shape (N, classes)>"
            )
        bad = (target >= out.shape[1]) | ((target < 0) & (target != -100))
        if bool(bad.any()):
            raise UserError(
                f"{criterion} importance got class label {int(target[bad][0])} but the output has {out.shape[1]} "
                f"classes (dim 1 of shape {tuple(out.shape)}); give labels 0..{out.shape[1] - 1}"
            )
    # cross-entropy takes int64 class indices only: bool, int32 and int16 labels raised "expected
    # target dtype to be Long"
    return target.long()


def label_indices(y: torch.Tensor) -> torch.Tensor | None:
    """``y`` as class indices (int64): integers and booleans as they are, whole-number
    floats, one-hot rows by their argmax; ``None`` when ``y`` is none of these. A single
    column ``(N, 1)`` is a column of indices (it read as one-hot rows of one class: every
    label 0)."""
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() == 2 and len(y) and bool(((y == 0) | (y == 1)).all()) and bool((y.sum(1) == 1).all()):
        return y.argmax(1)
    if y.dim() != 1:
        return None
    if y.is_floating_point():
        return y.long() if bool(torch.isfinite(y).all()) and bool((y == y.round()).all()) else None
    return y.long()


def regression_targets(logits: torch.Tensor, target: Any) -> torch.Tensor | None:
    """``target`` shaped as ``logits`` (its dtype and device) where it can be a regression's:
    floating values, one per output (``(N,)`` against ``(N, 1)`` too); else ``None``."""
    if not isinstance(target, torch.Tensor) or not target.is_floating_point() or target.numel() != logits.numel():
        return None
    if target.shape != logits.shape and not (target.dim() == 1 and logits.shape == (len(target), 1)):
        return None
    return target.reshape(logits.shape).to(logits.device, logits.dtype)


def reads_as_regression(logits: Any, target: Any) -> bool:
    """Whether ``target`` holds a regression's targets for ``logits``: floating values, one
    per output (:func:`regression_targets`), that are not class labels for those outputs.
    One output per sample: anything but 0/1 (a binary classifier's labels), whole numbers
    too (ratings 1.0-5.0, counts: read as class indices they were refused as labels beyond
    a one-logit model's two classes). Several outputs: anything but one-hot or probability
    rows (soft labels)."""
    if not isinstance(logits, torch.Tensor) or regression_targets(logits, target) is None:
        return False
    t = target.detach().float()
    if not bool(torch.isfinite(t).all()):
        return True
    if logits.dim() == 1 or logits.shape[-1] == 1:
        return not bool(((t == 0) | (t == 1)).all())
    rows = t.reshape(len(t), -1)
    return not (bool((rows >= 0).all()) and torch.allclose(rows.sum(1), torch.ones(len(rows)), atol=1e-3))


def not_class_labels(y: torch.Tensor) -> str:
    """Why ``y`` is not class labels, and what to give instead."""
    what = "fractional or non-finite numbers" if y.is_floating_point() else "several columns that are not one-hot"
    return (
        f"the labels are not class indices ({what}, dtype {str(y.dtype).replace('torch.', '')}, shape "
        f"{tuple(y.shape)}); for accuracy give integer labels 0..N-1 or one-hot rows"
    )


def unused_key_hint(exc: BaseException, inputs: Any) -> str:
    """A sentence when a dict batch holds a key the model's forward does not take (an index or
    a file name beside the input): ``TypeError: forward() got an unexpected keyword argument``,
    which the advice about batch shapes did not explain."""
    import re

    found = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
    if not isinstance(exc, TypeError) or not isinstance(inputs, dict) or found is None:
        return ""
    return (
        f" The batches hold the key {found.group(1)!r}, which the model's forward does not take: leave it out of "
        f"the batches (the keys {', '.join(map(repr, LABEL_KEYS))} are read as labels) or pass forward_fn=."
    )


# -- batches ---------------------------------------------------------------------------------


def plain_inputs(inputs: Any) -> Any:
    """``inputs`` with a mapping that is not a ``dict`` (a tokenizer's ``BatchEncoding``)
    made a ``dict``: CleanAI calls the model with a dict's items as keywords."""
    return dict(inputs) if isinstance(inputs, Mapping) and not isinstance(inputs, dict) else inputs


def text_error(obj: Any, what: str) -> UserError | None:
    """The error for ``obj`` (a batch, the example inputs) when it holds text (``str``)
    where the model reads tensors, else None."""
    text = next((leaf for leaf in tree_flatten(obj)[0] if isinstance(leaf, str)), None)
    if text is None:
        return None
    shown = text if len(text) <= 40 else text[:37] + "..."
    return UserError(
        f"{what} holds text ({shown!r}), not tensors: the model is called with the batch as it is, and a text "
        "model reads token ids. Tokenize the text first, e.g. batch = tokenizer(texts, return_tensors='pt', "
        "padding=True) (a dict of input_ids and attention_mask; its padding is left out of the statistics); or, "
        "with `cleanai prune --model hf:FOLDER`, give the text itself as --data (a .txt or .jsonl file, "
        "tokenized with the tokenizer saved in FOLDER)"
    )


#: the keys of a dict batch that hold its labels (:func:`split_batch`)
LABEL_KEYS = ("label", "labels", "y", "target", "targets")


def split_batch(batch: Any, model: nn.Module | None = None) -> tuple[Any, Any]:
    """``(inputs, target)`` from a batch: a tensor, an ``(x, y)`` pair or a dict (or another
    mapping: a tokenizer's ``BatchEncoding``). Text
    (strings where the inputs go) is refused with the fix: tokenize it first. ``model``: the
    model the inputs are for, which may make decoder inputs from the labels
    (:func:`decoder_inputs_from_labels`)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    batch = plain_inputs(batch)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise UserError("the data loader yielded an empty batch")
        if all(isinstance(b, str) for b in batch):  # a list of texts, not an (x, y) pair
            raise text_error(batch, "the data loader's batch")
        n = positional_inputs(batch, model)
        if n:
            inputs, target = tuple(batch[:n]), (batch[n] if len(batch) > n else None)
        else:
            inputs, target = batch[0], (batch[1] if len(batch) > 1 else None)
    elif isinstance(batch, dict):
        target = None
        inputs = {}
        for k, v in batch.items():
            if k in LABEL_KEYS:
                target = v
            else:
                inputs[k] = v
    elif isinstance(batch, str):
        raise text_error(batch, "the data loader's batch")
    else:
        raise UserError(
            f"the data loader yielded a {type(batch).__name__}; expected tensors, (input, label) pairs or dicts"
        )
    error = text_error(inputs, "the data loader's batch")
    if error is not None:
        raise error
    return decoder_inputs_from_labels(model, inputs, target), target


def positional_inputs(batch: Any, model: nn.Module | None) -> int:
    """How many leading tensors of a tuple ``batch`` are ``model``'s positional inputs: ``n``
    where its ``forward`` requires ``n > 1`` of them (:func:`required_positionals`) and the
    batch is ``n`` or ``n + 1`` tensors, ``(x1, ..., xn)`` or ``(x1, ..., xn, label)``, as
    the example inputs and a ``TensorDataset(x1, x2, y)`` give them (read as ``(x1, x2)``,
    the model got ``x1`` alone and failed); else 0: the batch is ``(input, label)``. One
    rule for :func:`split_batch` and the messages about how a batch was read."""
    if not isinstance(batch, (tuple, list)) or not all(isinstance(b, torch.Tensor) for b in batch):
        return 0
    n = required_positionals(model)
    return n if n > 1 and len(batch) in (n, n + 1) else 0


def required_positionals(model: nn.Module | None) -> int:
    """How many positional arguments ``model``'s ``forward`` requires (0 where it takes
    ``*args``, or for no model): a tuple batch of that many tensors is the inputs, one more
    the inputs and a label (:func:`split_batch`)."""
    forward = getattr(model, "forward", None)
    if forward is None:
        return 0
    bound = getattr(forward, "__func__", None)  # a method: its first parameter is the module
    try:
        return _required_positionals(bound or forward, bound is not None)
    except TypeError:  # an unhashable callable
        return 0


@functools.lru_cache(maxsize=256)
def _required_positionals(fn: Callable, method: bool) -> int:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C function without a signature
        return 0
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 0
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return sum(p.default is p.empty for p in positional[int(method) :])


def decoder_inputs_from_labels(model: nn.Module | None, inputs: Any, target: Any) -> Any:
    """``inputs`` with the ``decoder_input_ids`` an encoder-decoder makes from its labels
    where a dict batch has labels and no decoder inputs (``tokenizer(texts,
    text_target=targets)``, a seq2seq collator without the model): the model's forward
    shifts the labels right itself when it gets them, but CleanAI takes them out as the
    target, and every calibration, recovery and evaluation run of T5, BART, Marian, ...
    failed (``You must specify exactly one of input_ids or inputs_embeds``). Made by the
    model's own ``prepare_decoder_input_ids_from_labels``; other inputs are returned as
    they are."""
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if (
        not isinstance(inputs, dict)
        or not callable(prepare)
        or not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        or not isinstance(target, torch.Tensor)
        or target.dim() != 2
        or target.is_floating_point()
        or "decoder_input_ids" in inputs
        or "decoder_inputs_embeds" in inputs
    ):
        return inputs
    return {**inputs, "decoder_input_ids": prepare(labels=target.long())}


def move_to(x: Any, device: torch.device | None) -> Any:
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        if x.is_meta and torch.device(device).type != "meta":  # "Cannot copy out of meta tensor; no data!"
            raise UserError(
                f"a batch holds a tensor on the meta device (shape {tuple(x.shape)}: a shape without values), so "
                f"the model cannot run on it; give real tensors (on the cpu or the model's device, {device})"
            )
        return x.to(device)
    if isinstance(x, dict):
        return {k: move_to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(move_to(v, device) for v in x)
    return x


def iterate(loader: Iterable[Any], num_batches: int | None) -> Iterator[Any]:
    """The first ``num_batches`` batches of ``loader`` (all where ``None``; none read beyond
    them). An exception the loader raises (its dataset's ``__getitem__``, a transform,
    ``collate_fn``) goes on as it is, the user's own type, with a note that names the batch
    and says the data is at fault (it came out of CleanAI's calibration loop unexplained)."""
    from cleanai_core.errors import CleanAIError

    n = 0
    batches = iter(loader)
    while num_batches is None or n < num_batches:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except Exception as exc:
            if not isinstance(exc, CleanAIError):
                exc.add_note(
                    f"cleanai: the data loader raised this on batch {n}{f', after {n} good one(s)' if n else ''}: the "
                    "fault is in the data (its dataset's __getitem__, a transform or collate_fn), not in the model "
                    "or CleanAI; nothing was collected."
                )
            raise
        n += 1
        yield batch
    from cleanai_core.distributed import is_distributed

    if n == 0 and not is_distributed():  # one rank's shard may be empty: checked over all ranks
        raise UserError(f"the calibration data is empty{spent(loader)}; give at least one batch")


def spent(loader: Any) -> str:
    """Words for an empty ``loader`` that is a one-shot iterator (its own ``iter()``): most
    likely a generator already read by an earlier call, which then said only "empty"."""
    try:
        one_shot = iter(loader) is loader
    except TypeError:
        return ""
    if not one_shot:
        return ""
    return (
        f" (it is a one-shot {type(loader).__name__}, which yields nothing once read: an earlier call may have "
        "used it up; pass a list of batches or a DataLoader, which can be read again)"
    )


def total_batches(loader: Any, num_batches: int | None) -> int | None:
    try:
        n = len(loader)
    except TypeError:
        n = None
    if num_batches is None:
        return n
    return num_batches if n is None else min(n, num_batches)
