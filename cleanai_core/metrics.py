"""Measurements: parameters, FLOPs, latency, accuracy."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cleanai_core.model_state import preserved
from cleanai_core.runtime import call_model

__all__ = ["call_model", "count_flops", "count_params", "eval_mode", "measure_latency"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run in eval mode and restore every module's own mode, buffers and attributes
    afterwards (see :mod:`cleanai_core.model_state`)."""
    with preserved(model):
        yield model


def count_flops(model: nn.Module, inputs: Any, forward_fn: Callable | None = None) -> int:
    """FLOPs of one forward pass, by PyTorch's own counter (FLOPs = 2 x MACs).

    Attention is counted through the math backend, since fused CPU kernels are not
    seen by the counter. Counting needs shapes only, so the heavy ops run on the meta
    device (:class:`~cleanai_core.shapes.ShapeOnlyMode`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cleanai_core.shapes import ShapeOnlyMode

    with eval_mode(model), torch.no_grad(), sdpa_kernel(SDPBackend.MATH), ShapeOnlyMode():
        with FlopCounterMode(display=False) as counter:
            call_model(model, inputs, forward_fn)
    return int(counter.get_total_flops())


def measure_latency(
    model: nn.Module, inputs: Any, repeats: int = 20, warmup: int = 3, forward_fn: Callable | None = None
) -> float:
    """Median wall-clock milliseconds of one forward pass (no gradients)."""
    times = []
    with eval_mode(model), torch.no_grad():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            call_model(model, inputs, forward_fn)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)
