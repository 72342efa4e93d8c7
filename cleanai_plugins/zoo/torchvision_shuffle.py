"""torchvision ShuffleNet-V2: blocks that split and shuffle by stored indices once pruned.

Terms: a *block* is ``torchvision.models.shufflenetv2.InvertedResidual`` (or the
quantizable one); its *cat* is ``cat([x1, branch2(x2)])`` (stride 1, ``x1, x2 =
x.chunk(2)``) or ``cat([branch1(x), branch2(x)])`` (stride 2); the *shuffle* is
``channel_shuffle(cat, 2)``: view ``(2, C / 2)``, transpose, view back, so output channel
``2i`` is cat channel ``i`` and ``2i + 1`` is ``C / 2 + i``; a *run* is a block of stride 2
and the stride-1 blocks after it in the same ``nn.Sequential`` (a ShuffleNet stage).

With the module's code as it is, only a kept set that is the same in both halves
survives the shuffle in order, and the next block's ``chunk(2)`` needs halves of equal
size: channel ``i`` of both halves is tied in every block and, through a stage, its
whole stream became one unit (0.32-0.35 of the parameters kept at a ratio of 0.5 before
session 20). The blocks of a run vouch for their splits and shuffles
(``allow_channel_permutations``): the trace maps the chunk as two free parts and the
shuffle as the permutation it is. After slicing, every block of a run whose kept
channels changed becomes :class:`PrunedInvertedResidual` (or the quantizable one), whose
``forward`` picks ``x1`` / ``x2`` with ``index_select`` by the buffers ``x1_index`` /
``x2_index`` and shuffles with ``shuffle_index``, computed from the kept channels
(:func:`fix_shuffle_block`). The buffers are not saved in ``state_dict`` (a reload
replays the history, which makes them again); a pruned model pruned again traces them as
index buffers, whose values the slicer rewrites.
"""

from __future__ import annotations

import torch
from torch import nn

from cleanai_core import hookimpl
from cleanai_plugins.mappers.shape import allow_channel_permutations
from cleanai_plugins.zoo import loaded, named_classes, once_loaded

__all__ = ["SHUFFLE_KEY", "fix_shuffle_block", "pruned_quantizable_block", "pruned_shuffle_block", "shuffle_runs"]

#: findings key: ``{block name: (previous block of its run or None, branch width, the
#: qualified names of branch1's last conv (None at stride 1) and branch2's)}``
SHUFFLE_KEY = "torchvision_shuffle_runs"


def _shufflenet():
    return loaded("torchvision.models.shufflenetv2")


def _quantizable():
    return loaded("torchvision.models.quantization.shufflenetv2")


def _block_classes() -> tuple[type, ...]:
    out = []
    if (plain := _shufflenet()) is not None:
        out.append(plain.InvertedResidual)
    if (quant := _quantizable()) is not None:
        out.append(quant.QuantizableInvertedResidual)
    return tuple(out)


def _last_conv(branch: nn.Module) -> str | None:
    """The name (in ``branch``) of its last ``Conv2d``."""
    names = [n for n, m in branch.named_modules() if isinstance(m, nn.Conv2d)]
    return names[-1] if names else None


def shuffle_runs(model: nn.Module) -> tuple[dict[str, tuple], list[nn.Module]]:
    """The blocks of every run in ``model`` (see the module docstring), as
    :data:`SHUFFLE_KEY` describes them, and the block modules. A stride-1 block that does
    not follow a block of its run (its input's kept channels would be unknown) is left out."""
    classes = _block_classes()
    runs: dict[str, tuple] = {}
    blocks: list[nn.Module] = []
    if not classes:
        return runs, blocks
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prev = None
        for child, block in seq.named_children():
            full = f"{name}.{child}" if name else child
            last2 = _last_conv(block.branch2) if type(block) in classes else None
            last1 = _last_conv(block.branch1) if last2 is not None and block.stride > 1 else None
            if last2 is None or (prev is None if block.stride == 1 else last1 is None):
                prev = None
                continue
            width = int(block.branch2.get_submodule(last2).out_channels)
            runs[full] = (prev, width, f"{full}.branch1.{last1}" if last1 else None, f"{full}.branch2.{last2}")
            blocks.append(block)
            prev = full
    return runs, blocks


def _kept(edits, module: str, width: int) -> torch.Tensor:
    keep = edits.get((module, "out"))
    return torch.arange(width) if keep is None else keep.to("cpu", torch.int64)


def _block_indices(name: str, runs, edits, memo: dict) -> tuple:
    """``(kept input positions or None, kept output positions, x1 / x2 indices or None, the
    shuffle's picks of the pruned cat)`` of the block ``name`` of a run: positions in the
    original channels' numbering, from the kept channels of its branches' last convs and,
    at stride 1, the kept outputs of the block before it."""
    if name not in memo:
        prev, half, out1, out2 = runs[name]
        second = _kept(edits, out2, half)
        if prev is None:
            stream, first, x1, x2 = None, _kept(edits, out1, half), None, None
        else:
            stream = _block_indices(prev, runs, edits, memo)[1]
            first, n2 = stream[stream < half], int((stream >= half).sum())
            x1, x2 = torch.arange(first.numel()), torch.arange(first.numel(), first.numel() + n2)
        cat = torch.cat([first, second + half])  # sorted: the first part is below ``half``
        order = torch.arange(2 * half).reshape(2, half).t().reshape(-1)  # output j holds cat[order[j]]
        kept_out = torch.nonzero(torch.isin(order, cat)).reshape(-1)
        memo[name] = (stream, kept_out, x1, x2, torch.searchsorted(cat, order[kept_out]))
    return memo[name]


@once_loaded
def pruned_shuffle_block() -> type | None:
    """:class:`PrunedInvertedResidual`, made once torchvision's ShuffleNet is imported."""
    plain = _shufflenet()
    if plain is None:
        return None

    class PrunedInvertedResidual(plain.InvertedResidual):
        """Same block; its parts and its shuffle are picked by stored indices."""

        x1_index: torch.Tensor | None
        x2_index: torch.Tensor | None
        shuffle_index: torch.Tensor

        def _cat(self, parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(parts, dim=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.x1_index is not None:
                x1, x2 = x.index_select(1, self.x1_index), x.index_select(1, self.x2_index)
                out = self._cat([x1, self.branch2(x2)])
            else:
                out = self._cat([self.branch1(x), self.branch2(x)])
            return out.index_select(1, self.shuffle_index)

    return _named(PrunedInvertedResidual)


@once_loaded
def pruned_quantizable_block() -> type | None:
    """:class:`PrunedQuantizableInvertedResidual`, made once the quantizable ShuffleNet is imported."""
    quant, base = _quantizable(), pruned_shuffle_block()
    if quant is None or base is None:
        return None

    class PrunedQuantizableInvertedResidual(quant.QuantizableInvertedResidual):
        """The quantizable block, concatenating through its ``FloatFunctional``."""

        forward = base.forward

        def _cat(self, parts: list[torch.Tensor]) -> torch.Tensor:
            return self.cat.cat(parts, dim=1)

    return _named(PrunedQuantizableInvertedResidual)


def fix_shuffle_block(module: nn.Module, name: str, edits, findings) -> None:
    """Swap a block of a run whose kept channels changed for the pruned class (see the
    module docstring), with its index buffers."""
    runs = (findings.get(SHUFFLE_KEY) if findings is not None else None) or {}
    if name not in runs or type(module) not in _block_classes():
        return
    stream, kept_out, x1, x2, shuffle = _block_indices(name, runs, edits, {})
    width = 2 * runs[name][1]
    if kept_out.numel() == width and (stream is None or stream.numel() == width):
        return  # nothing this block reads or writes was pruned: its own code still holds
    quant = _quantizable()
    module.__class__ = (
        pruned_quantizable_block()
        if quant is not None and isinstance(module, quant.QuantizableInvertedResidual)
        else pruned_shuffle_block()
    )
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    for attr, value in (("x1_index", x1), ("x2_index", x2), ("shuffle_index", shuffle)):
        if value is None:
            setattr(module, attr, None)
        else:
            module.register_buffer(attr, value.to(device), persistent=False)


def _named(cls: type) -> type:
    cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return cls


#: the pruned classes by name (a pickled model loads, also before torchvision is imported)
__getattr__ = named_classes(
    __name__,
    {
        "PrunedInvertedResidual": ("torchvision.models.shufflenetv2", pruned_shuffle_block),
        "PrunedQuantizableInvertedResidual": (
            "torchvision.models.quantization.shufflenetv2",
            pruned_quantizable_block,
        ),
    },
)


@hookimpl(trylast=True)
def cleanai_prepare_model(model):
    runs, blocks = shuffle_runs(model)
    return {SHUFFLE_KEY: runs, **allow_channel_permutations(*blocks)} if runs else None


@hookimpl(trylast=True)
def cleanai_after_prune(module, name, edits, findings):
    fix_shuffle_block(module, name, edits, findings)
