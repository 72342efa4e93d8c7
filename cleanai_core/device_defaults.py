"""Defaults that depend on the device a pruned model will run on.

Glossary:

- *round_to*: kept channel counts rounded up to a multiple (``StructuredPruner(round_to=)``);
  it keeps a few more channels than the ratio asks, so it pays only where the kernels run
  multiples faster than the counts around them.

Measured for CPU (``benchmarks/round_to.py``, 2 threads, AVX-512 Xeon, PyTorch's oneDNN /
MKL kernels, float32; docs/benchmarks.md): a 3x3 convolution and a linear timed at every
channel count from 58 to 70 and 122 to 134 cost the same per multiply-add at multiples of
8 or 16 as at the counts between (within the machine's noise), and the four timm models
pruned with ``round_to`` 8 or 16 ran no faster per FLOP than with the counts the ratio
gives. So on CPU nothing is rounded. On CUDA, tensor-core kernels for half precision need
channel counts that are multiples of 8 (NVIDIA's performance guide for cuDNN / cuBLAS), so
counts are rounded to 8 there; not measured on this project's machines (no GPU).
"""

from __future__ import annotations

import torch

__all__ = ["ROUND_TO", "default_round_to"]

#: device type -> the round_to that pays there (None: keep the counts the ratio gives)
ROUND_TO: dict[str, int | None] = {"cpu": None, "cuda": 8}


def default_round_to(device: torch.device | str | None) -> int | None:
    """The ``round_to`` that pays on ``device`` (a device, its name, or None for the CPU);
    None (no rounding) for a device type without a measurement."""
    kind = torch.device(device).type if device is not None else "cpu"
    return ROUND_TO.get(kind)
