"""torchvision models: attribute fix-ups after slicing.

RAFT's ``CorrBlock`` divides the correlation volume by ``sqrt(C)``, ``C`` read from the
feature maps' shape at run time; once the feature encoder's channels are pruned it would
divide by the pruned ``sqrt(C')`` and every correlation would grow by ``sqrt(C / C')``
(the masking oracle was 0.76 off on ``raft_small``). The scan records ``C`` before
slicing, and the pruned block's class is swapped for one that keeps dividing by it.

MaxViT's ``RelativePositionalMultiHeadAttention`` keeps ``n_heads`` / ``head_dim`` and
reshapes its attention output back to the *input* width ``D``; once heads are pruned
that width differs from ``n_heads * head_dim``, so the pruned module's class is swapped
for a subclass whose ``forward`` reshapes with the pruned width.

Faster / Mask / Keypoint R-CNN traced whole (the eval model on a list of images) reach
their ROI heads through ``MultiScaleRoIAlign``: ``roi_align`` per level, written into
``zeros(rois, C, h, w)`` with ``index_put_``; the pooler vouches that ``C`` is read from the
features at run time (``allow_filled_destinations``), so the FPN's channels, ``fc6``'s
inputs and the mask / keypoint heads prune with it. Traced through a ``forward_fn`` that
skips the ROI heads (backbone and RPN head), those read the FPN's outputs untraced: pruning
them left a model whose whole forward failed (``box_head.fc6`` still wanted 256 x 7 x 7
inputs), so then the FPN's output channels are kept (``cleanai_default_freezes``).

``torchvision.ops.DeformConv2d``'s weight and bias are sliced as bare tensors (the
``deform_conv2d`` mapper); its ``in_channels`` / ``out_channels`` follow the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cleanai_core import hookimpl
from cleanai_plugins.mappers.shape import allow_channel_ranges, allow_filled_destinations
from cleanai_plugins.zoo import loaded, named_classes, once_loaded


def _maxvit():
    return loaded("torchvision.models.maxvit")


def _vit():
    return loaded("torchvision.models.vision_transformer")


def _rcnn():
    return loaded("torchvision.models.detection.generalized_rcnn")


def _raft():
    return loaded("torchvision.models.optical_flow.raft")


def _poolers():
    return loaded("torchvision.ops.poolers")


def _deform_conv():
    return loaded("torchvision.ops.deform_conv")


RAFT_KEY = "torchvision_raft_channels"  # findings: {corr block name: the feature width it scales by}


def fix_vit(module: nn.Module, name: str, edits) -> None:
    """``VisionTransformer._process_input`` reshapes patches to ``self.hidden_dim``."""
    vit = _vit()
    if vit is not None and isinstance(module, vit.VisionTransformer):
        module.hidden_dim = module.conv_proj.out_channels


def fix_deform_conv(module: nn.Module) -> None:
    """A deformable convolution's widths as its sliced weight says (its ``forward`` reads
    the weight; these are what ``repr`` and a user's code read)."""
    dc = _deform_conv()
    if dc is not None and isinstance(module, dc.DeformConv2d):
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups


def _heads_from_keep(keep: torch.Tensor, heads: int, head_dim: int, stacks: int) -> tuple[int, int]:
    """New (heads, head_dim) from the kept output rows of a stacked (q, k, v) projection."""
    total = heads * head_dim
    q_keep = keep[keep < total]
    kept_heads = int((q_keep // head_dim).unique().numel())
    if q_keep.numel() == kept_heads * head_dim:
        return kept_heads, head_dim
    return heads, q_keep.numel() // heads


@once_loaded
def pruned_maxvit_attention() -> type | None:
    """:class:`PrunedRelativePositionalMultiHeadAttention`, made once torchvision is imported."""
    maxvit = _maxvit()
    if maxvit is None:
        return None

    class PrunedRelativePositionalMultiHeadAttention(maxvit.RelativePositionalMultiHeadAttention):
        """Same computation; the output is reshaped to ``n_heads * head_dim``."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, G, P, _ = x.shape
            H, DH = self.n_heads, self.head_dim
            q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
            q = q.reshape(B, G, P, H, DH).permute(0, 1, 3, 2, 4)
            k = k.reshape(B, G, P, H, DH).permute(0, 1, 3, 2, 4)
            v = v.reshape(B, G, P, H, DH).permute(0, 1, 3, 2, 4)
            k = k * self.scale_factor
            dot_prod = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
            dot_prod = F.softmax(dot_prod + self.get_relative_positional_bias(), dim=-1)
            out = torch.einsum("B G H I J, B G H J D -> B G H I D", dot_prod, v)
            out = out.permute(0, 1, 3, 2, 4).reshape(B, G, P, H * DH)
            return self.merge(out)

    return _named(PrunedRelativePositionalMultiHeadAttention)


def fix_maxvit_attention(module: nn.Module, name: str, edits) -> None:
    maxvit = _maxvit()
    if maxvit is None or not isinstance(module, maxvit.RelativePositionalMultiHeadAttention):
        return
    keep = edits.get((f"{name}.to_qkv" if name else "to_qkv", "out"))
    if keep is not None:
        module.n_heads, module.head_dim = _heads_from_keep(keep, module.n_heads, module.head_dim, 3)
    if type(module) is maxvit.RelativePositionalMultiHeadAttention and (
        keep is not None or (f"{name}.merge" if name else "merge", "in") in edits
    ):
        module.__class__ = pruned_maxvit_attention()


@once_loaded
def pruned_corr_block() -> type | None:
    """:class:`PrunedCorrBlock`, made once torchvision is imported."""
    raft = _raft()
    if raft is None:
        return None

    class PrunedCorrBlock(raft.CorrBlock):
        """Same correlation pyramid, scaled by the feature width the model was trained with."""

        channels: int

        def _compute_corr_volume(self, fmap1: torch.Tensor, fmap2: torch.Tensor) -> torch.Tensor:
            b, c, h, w = fmap1.shape
            corr = torch.matmul(fmap1.view(b, c, h * w).transpose(1, 2), fmap2.view(b, c, h * w))
            return corr.view(b, h, w, 1, h, w) / torch.sqrt(torch.tensor(float(self.channels)))

    return _named(PrunedCorrBlock)


def _named(cls: type) -> type:
    """``cls`` found by name in this module (:func:`__getattr__`): a pickled model loads."""
    cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return cls


#: the pruned classes by name (a pickled model loads, also before torchvision is imported)
__getattr__ = named_classes(
    __name__,
    {
        "PrunedRelativePositionalMultiHeadAttention": ("torchvision.models.maxvit", pruned_maxvit_attention),
        "PrunedCorrBlock": ("torchvision.models.optical_flow.raft", pruned_corr_block),
    },
)


def raft_channels(model: nn.Module) -> dict[str, int]:
    """``{corr block name: feature width}`` of every RAFT in ``model``, as it is now (a block
    already swapped keeps the width it was given)."""
    raft = _raft()
    if raft is None:
        return {}
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, raft.RAFT):
            block = f"{name}.corr_block" if name else "corr_block"
            pinned = getattr(m.corr_block, "channels", None)
            out[block] = int(pinned) if pinned is not None else int(m.feature_encoder.conv.out_channels)
    return out


def fix_raft_correlation(module: nn.Module, name: str, findings) -> None:
    raft = _raft()
    if raft is None or type(module) is not raft.CorrBlock or findings is None:
        return
    channels = (findings.get(RAFT_KEY) or {}).get(name)
    if channels is not None:
        module.__class__ = pruned_corr_block()
        module.channels = channels


def fix_raft_hidden_size(module: nn.Module, name: str, edits) -> None:
    """RAFT splits its context encoder's output into ``[hidden_state_size, rest]``, both
    stored widths: they follow the recurrent block's pruned hidden channels (raft_large's
    equal halves prune together; its forward raised "The context encoder outputs 128
    channels, but it should have at strictly more than hidden_state=128 channels")."""
    raft = _raft()
    if raft is None or not isinstance(module, raft.RAFT):
        return
    block = getattr(module.update_block, "recurrent_block", None)
    conv = getattr(getattr(block, "convgru1", None), "convz", None)
    if isinstance(conv, nn.Conv2d):
        module.update_block.hidden_state_size = block.hidden_size = conv.out_channels


@hookimpl(trylast=True)
def cleanai_prepare_model(model):
    found = raft_channels(model)
    poolers = _poolers()
    pools = [m for m in model.modules() if poolers is not None and isinstance(m, poolers.MultiScaleRoIAlign)]
    out = {**({RAFT_KEY: found} if found else {}), **(allow_filled_destinations(*pools) if pools else {})}
    raft = _raft()
    rafts = [m for m in model.modules() if raft is not None and isinstance(m, raft.RAFT)]
    if rafts:  # the context split [hidden_state_size, rest]: fix_raft_hidden_size rewrites it
        out.update(allow_channel_ranges(*rafts))
    return out or None


@hookimpl(trylast=True)
def cleanai_after_prune(module, name, edits, findings):
    fix_maxvit_attention(module, name, edits)
    fix_vit(module, name, edits)
    fix_deform_conv(module)
    fix_raft_correlation(module, name, findings)
    fix_raft_hidden_size(module, name, edits)


def untraced_roi_features(graph) -> list[tuple[torch.Tensor, str]]:
    """The FPN output channels of every R-CNN in ``graph.model`` whose ROI heads the trace
    did not reach (a ``forward_fn`` through the backbone and the RPN only)."""
    rcnn = _rcnn()
    if rcnn is None:
        return []
    out = []
    for name, m in graph.model.named_modules():
        if not isinstance(m, rcnn.GeneralizedRCNN):
            continue
        prefix = f"{name}." if name else ""
        heads, fpn = f"{prefix}roi_heads.", f"{prefix}backbone.fpn.layer_blocks."
        if any(s.module.startswith(heads) for s in graph.slices):
            continue
        why = f"{prefix}roi_heads read the FPN's outputs but were not traced (run them in forward_fn to prune these)"
        out += [(graph.unit_of(s), why) for s in graph.slices if s.module.startswith(fpn) and s.kind == "out"]
    return out


@hookimpl(trylast=True)
def cleanai_default_freezes(graph):
    return untraced_roi_features(graph) or None
