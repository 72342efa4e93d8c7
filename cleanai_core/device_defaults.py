"""Defaults that depend on the device a pruned model will run on.

Glossary:

- *round_to*: kept channel counts rounded up to a multiple (``StructuredPruner(round_to=)``);
  it keeps a few more channels than the ratio asks, so it pays only where the kernels run
  multiples faster than the counts around them.

Measured for CPU (2 threads, AVX-512 Xeon, PyTorch's oneDNN / MKL kernels, float32;
docs/benchmarks.md, 2026-11-30 notes): ``benchmarks/round_to.py`` timed a 3x3 convolution
and a linear at every channel count from 58 to 70 and from 122 to 134; multiples of 8 and
16 cost the same per multiply-add as the counts between them, within the machine's noise
(64: 205 against 203-249 µs per million MACs for its neighbours; 128: 120 against 112-149).
The seven benchmark models pruned at ratio 0.5 (``benchmarks/speed.py``, idle machine,
session 5) gave a batch-32 speed-up per FLOPs reduction of 0.81 on average with the counts
as the ratio gives them and 0.80 with ``round_to=8``, model by model within +-0.08 either
way. Rounding up keeps more channels for no faster kernel, so on CPU nothing is rounded.

Session 16 measured again without the machine's noise (``benchmarks/round_to_kinds.py``: one
thread, CPU time by ``time.thread_time``, glibc's page faults switched off): oneDNN runs a
convolution on NCHW tensors in blocks of 16 channels (``aBcd16b``), padding the last block,
so a dense or depthwise conv costs per channel 0.70-0.83x at multiples of 16 against the
counts around them (depthwise 3x3 at 56x56: 32 channels cost less than 31, 48 less than
47); BatchNorm and GELU show no step, LayerNorm one every 8 channels, linear layers only
a slower odd input width. Rounding *up* to 16 (the default ``round_mode``) keeps up to a
block more per group: MobileNet-V3 and EfficientNet-B0 at ratio 0.5 kept 1.2-1.4x the
FLOPs for no faster model. Rounding to the
*nearest* multiple (``round_mode="nearest"``) keeps a count on the fast path at about the
ratio's size; on NCHW tensors it measured as fast as no rounding or faster with more
channels kept (docs/benchmarks.md, session 16), so ``round_to=16, round_mode="nearest"`` is
the CPU choice for convolutional models run in NCHW (in channels-last, which skips the block
reorders, it is as fast as no rounding). It is not the default, since it moves a layer's
width off the ratio asked (a group of 40 keeps 16 at ratio 0.5, one of 16 keeps all).

On CUDA, tensor-core kernels for half precision want channel counts that are multiples of
8 (NVIDIA's performance guide for cuDNN / cuBLAS), so counts are rounded to 8 there; not
measured on this project's machines (no GPU).
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
