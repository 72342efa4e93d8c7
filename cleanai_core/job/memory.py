"""Memory the job's batches need, checked before calibration reads them.

Glossary:

- *sample peak*: the most bytes one sample's tensors hold at once in the first forward,
  as far as modules show them: the largest sum of a module's inputs and outputs (both
  are alive when its forward returns). A lower bound of what a forward needs per sample.
- *free memory*: what the device can still give: ``MemAvailable`` of ``/proc/meminfo``
  on the CPU, ``torch.cuda.mem_get_info`` plus the allocator's unused cache on a GPU.

``--image-size 8192 --batch-size 32`` asked for batches of 26 GB of pixels alone: the
operating system's out-of-memory killer ended the run without a word. The job now runs
its first sample with :func:`sample_peak` measuring, and :func:`check_batches_fit`
refuses a batch size whose lower bound is beyond the free memory, naming the batch size
that fits; an allocation that still fails is named by :func:`out_of_memory_error`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from cleanai_core.errors import UserError

__all__ = [
    "check_batches_fit",
    "check_sample_fits",
    "free_memory",
    "meta_sample_peak",
    "out_of_memory_error",
    "sample_peak",
]

GB = 1e9


def _bytes(value: Any, meta: bool = False) -> int:
    """The bytes of the tensors in ``value``, each counted once (an in-place ReLU returns
    its input), by their own size (a sample is a view of the whole data set's tensor).
    ``meta``: count the tensors on the meta device (told apart by their storage), else the
    others."""
    leaves, _ = tree_flatten(value)
    seen: set[tuple[int, int]] = set()
    for t in leaves:
        if isinstance(t, torch.Tensor) and (t.device.type == "meta") == meta and t.layout == torch.strided:
            where = t.untyped_storage()._cdata if meta else t.data_ptr()
            seen.add((where, t.numel() * t.element_size()))
    return sum(size for _, size in seen)


def _size(n: float) -> str:
    for unit, scale in (("GB", GB), ("MB", 1e6)):
        if n >= 0.1 * scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


@contextmanager
def sample_peak(meta: bool = False) -> Iterator[Callable[[], int]]:
    """Within the block, every module's forward is watched; the function yielded gives the
    largest number of bytes a module's inputs and outputs held together (the *sample
    peak* of the glossary); ``meta``: of tensors on the meta device."""
    peak = [0]

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        peak[0] = max(peak[0], _bytes((args, output), meta))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield lambda: peak[0]
    finally:
        handle.remove()


def meta_sample_peak(model: torch.nn.Module, example: Any) -> int | None:
    """The sample peak of ``example`` estimated without arithmetic or memory: the model's
    forward runs on the meta device, its parameters and buffers swapped for meta tensors of
    their shapes (``torch.func.functional_call``: nothing is copied), its modes, buffers
    and attributes put back afterwards (a forward that caches a tensor keeps its own).
    ``None`` where the forward cannot run on meta tensors (it reads values: ``.item()``,
    ``nonzero``, NumPy). Run before the first real sample: one sample too large for the
    machine (an 8192 x 8192 image through a wide stem) was killed by the out-of-memory
    killer in that first forward, before any check could speak."""
    import warnings

    from torch.func import functional_call
    from torch.utils._pytree import tree_map

    from cleanai_core.model_state import preserved

    try:
        state = {n: torch.empty_like(t, device="meta") for n, t in model.named_parameters()}
        state.update({n: torch.empty_like(t, device="meta") for n, t in model.named_buffers()})
        inputs = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, example)
        args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
        with preserved(model), warnings.catch_warnings(), torch.no_grad(), sample_peak(meta=True) as peak:
            warnings.simplefilter("ignore")  # the model's own warnings show in the real run
            functional_call(model, state, args, kwargs)
            return peak()
    except Exception:  # noqa: BLE001 - any forward that needs values: no estimate, the real run measures
        return None


def check_sample_fits(cfg: dict[str, Any], per_sample: int | None, shape: Any, device: torch.device) -> None:
    """Refuse a first sample whose estimated peak (:func:`meta_sample_peak`) is beyond the
    free memory of ``device``: running it would end the process without a message."""
    free = free_memory(device)
    if free is None or not per_sample or per_sample <= free:
        return
    raise UserError(
        f"one sample of shape {shape} needs at least {_size(per_sample)} (the largest layer's inputs and outputs at "
        f"once, estimated without running it), more than the {_size(free)} of memory free on {device}; the run "
        f"would be killed for memory. {_fix(cfg, 0)}. Nothing was written."
    )


def free_memory(device: torch.device) -> int | None:
    """Bytes ``device`` can still allocate, or ``None`` where that is not known."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _fix(cfg: dict[str, Any], fits: int) -> str:
    """What to change: the batch size that fits, and the image size where one is given."""
    parts = [f"--batch-size {fits} or less"] if fits >= 1 else []
    if cfg.get("image_size"):
        parts.append(f"a smaller --image-size (now {cfg['image_size']})")
    elif not parts:
        parts.append("smaller inputs")
    return "Give " + ", or ".join(parts)


def check_batches_fit(cfg: dict[str, Any], per_sample: int, shape: Any, device: torch.device) -> None:
    """Refuse ``--batch-size`` where one batch needs more than the free memory of ``device``
    by the lower bound ``per_sample`` x batch size."""
    bs = int(cfg["batch_size"])
    free = free_memory(device)
    if free is None or per_sample <= 0 or bs * per_sample <= free:
        return
    fits = int(free // per_sample)
    raise UserError(
        f"one batch of --batch-size {bs} needs at least {_size(bs * per_sample)} ({_size(per_sample)} per sample of "
        f"shape {shape}: the largest layer's inputs and outputs at once), more than the "
        f"{_size(free)} of memory free on {device}; the run would be killed for memory. {_fix(cfg, fits)}. "
        "Nothing was written."
    )


def out_of_memory_error(exc: BaseException, cfg: dict[str, Any]) -> UserError:
    """The clear error for an allocation that failed during the job."""
    bs = int(cfg.get("batch_size") or 1)
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    fix = _fix(cfg, bs // 2).replace("Give", "give", 1)
    return UserError(
        f"the run ran out of memory on {cfg.get('device') or 'cpu'} ({type(exc).__name__}: {detail}): {fix}. "
        "Nothing was written."
    )
