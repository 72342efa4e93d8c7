"""Re-parameterisable blocks (RepVGG style): the widths their fusion reads, after slicing.

Glossary:

- *re-parameterisable block*: a module with ``reparameterize()``, ``switch_to_deploy()`` or
  ``fuse()`` (what ``timm.utils.reparameterize_model`` calls): MobileOne, FastViT's
  ``MobileOneBlock`` / ``ReparamLargeKernelConv`` / ``RepMixer`` / ``RepConditionalPosEnc``,
  GhostNet-V3's ``GhostModuleV3`` and bottleneck, LCNet-V2's blocks, RepVGG, RepGhost.
  Their fusion builds one conv from the branches and sizes it, or its identity kernel, from
  widths stored in plain attributes at construction (``self.in_chs``, ``self.out_chs``,
  ``self.dim``, ``self.groups``, ``self.in_channels``).
- *witness*: a conv, linear or norm inside the block whose width (``in_channels``,
  ``out_channels``, ``groups``, ``in_features``, ``out_features``, ``num_features``) equalled
  the stored width before slicing; after slicing the stored width follows the witnesses
  nearest the block (fewest levels down), where they agree.

The forward never reads these widths, so the pruned model ran and matched the masking
oracle, but fusing it failed: mobileone_s0 "integer modulo by zero" (``in_chs // groups``
with the depthwise ``groups`` of the unpruned block), fastvit_t8, fastvit_mci0, ghostnetv3_050
"The size of tensor a (48) must match the size of tensor b (24)" (an identity kernel of the
old width), lcnetv2_small a fused depthwise conv with the old group count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from cleanai_plugins.zoo.timm.lookup import triggered_by

if TYPE_CHECKING:
    from cleanai_plugins.zoo.timm.scan import TimmScan

__all__ = ["fix_reparam_widths", "scan_reparam_widths"]

#: the methods ``timm.utils.reparameterize_model`` calls
_FUSING = ("reparameterize", "switch_to_deploy", "fuse")

_IN = ("in_channels", "in_features")
_OUT = ("out_channels", "out_features", "num_features")
_ANY = (*_IN, *_OUT, "groups")
#: stored width -> the fields of a witness that may hold it, in tiers: a norm's width stands
#: for an input width only where no layer reads one (FastViT's ``RepMixer.norm``: a
#: ``MobileOneBlock`` with its identity norm and no conv)
_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    **dict.fromkeys(("in_chs", "in_channels", "inp", "in_dim", "dim_in"), (_IN, ("num_features",))),
    **dict.fromkeys(("out_chs", "out_channels", "oup", "out_dim", "dim_out"), (_OUT,)),
    "groups": (("groups",),),
    **dict.fromkeys(("dim", "channels", "chs", "init_chs", "new_chs", "mid_chs", "hidden_dim"), (_ANY,)),
}
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase)

#: a stored width -> its witnesses as ``(levels down, layer, field)``
Witnesses = dict[str, list[tuple[int, nn.Module, str]]]


@triggered_by(*_FUSING)
def scan_reparam_widths(modules: list[nn.Module]) -> dict[nn.Module, Witnesses]:
    """Each re-parameterisable block -> its stored widths (over 1) and their witnesses."""
    found: dict[nn.Module, Witnesses] = {}
    for m in modules:
        if not any(callable(getattr(type(m), f, None)) for f in _FUSING):
            continue
        stored = {a: v for a, v in vars(m).items() if a in _FIELDS and type(v) is int and v > 1}
        if not stored:
            continue
        layers = [(n.count(".") + 1, s) for n, s in m.named_modules() if n and isinstance(s, _LAYERS)]
        witnesses: Witnesses = {}
        for attr, value in stored.items():
            for fields in _FIELDS[attr]:
                seen = [(d, s, f) for d, s in layers for f in fields if getattr(s, f, None) == value]
                if seen:
                    witnesses[attr] = seen
                    break
        ins = [a for a in witnesses if _FIELDS[a][0] in (_IN, _ANY) and stored[a] == stored.get("groups")]
        if "groups" in stored and "groups" not in witnesses and ins:  # depthwise, no conv: one group per channel
            witnesses["groups"] = witnesses[ins[0]]
        if witnesses:
            found[m] = witnesses
    return found


def _agreed(witnesses: list[tuple[int, nn.Module, str]]) -> int | None:
    """The width the nearest witnesses give, where they agree."""
    nearest = min(d for d, _, _ in witnesses)
    values = {getattr(s, f, None) for d, s, f in witnesses if d == nearest}
    value = values.pop() if len(values) == 1 else None
    return value if type(value) is int else None


@triggered_by(*_FUSING)
def fix_reparam_widths(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """The widths a re-parameterisable block stored follow its sliced layers."""
    for attr, witnesses in scan.reparam_widths.get(module, {}).items():
        value = _agreed(witnesses)
        if value is not None and getattr(module, attr, None) != value:
            setattr(module, attr, value)
