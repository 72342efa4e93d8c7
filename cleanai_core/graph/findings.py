"""Model findings: what plugins learn by scanning a model once, before its modules are claimed.

Some patterns are only visible from above a module: a ``Linear`` is an attention block's
``qkv`` only because of the block that holds it; a block's ``forward`` may slice a fixed
range of channels only because a fix-up will rewrite the bound. Plugins find such patterns
in :func:`~cleanai_core.hookspecs.cleanai_prepare_model`, which the kernel calls once per
model (per graph build, per slicing, per replay). The answers are joined into one
:class:`ModelFindings` that the kernel hands, explicitly, to everything asked afterwards
about the same model: the claim hook (``findings=``), the layer pruners and index mappers
while tracing (``TraceContext.findings``) and the after-prune fix-ups (``findings=``).

Findings describe the model *as scanned* (before slicing): a fix-up reads the widths it
needs from them, not from the half-pruned module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import nn

from cleanai_core.errors import UserError

__all__ = ["SAME_SHARE", "ModelFindings", "prepare_model"]

#: findings key read by the kernel (a set, joined across plugins) of ``(module, slice name,
#: key)``: that slice of the module keeps the same share of its units as every slice
#: whose ``same_share`` or ``same_count`` is ``key``
#: (:attr:`~cleanai_core.graph.context.SliceSpec.same_share`). For a width the model's
#: config derives from another one (Aria's shared experts: the routed experts' width times
#: their number), where the pruner that binds the slice cannot know it.
SAME_SHARE = "same_share"


class ModelFindings(Mapping[str, Any]):
    """The joined answers of :func:`~cleanai_core.hookspecs.cleanai_prepare_model`, read-only.

    Each plugin files its findings under keys of its own (``"timm"``); a key shared on
    purpose (modules several plugins vouch for) holds a ``set`` in every answer, and the
    sets are joined. Any other key answered twice is an error naming the key.

    Example::

        findings = prepare_model(model, pm)
        scan = findings.get("timm")  # None when no plugin filed anything under "timm"
    """

    def __init__(self, entries: Mapping[str, Any] | None = None) -> None:
        self._entries: dict[str, Any] = dict(entries or {})

    @classmethod
    def join(cls, answers: Iterable[Mapping[str, Any] | None]) -> ModelFindings:
        joined: dict[str, Any] = {}
        for answer in answers:
            for key, value in (answer or {}).items():
                if key not in joined:
                    joined[key] = set(value) if isinstance(value, (set, frozenset)) else value
                elif isinstance(value, (set, frozenset)) and isinstance(joined[key], set):
                    joined[key] |= value
                else:
                    raise UserError(
                        f"two plugins filed model findings under the key {key!r} (cleanai_prepare_model); "
                        "findings keys must be unique per plugin unless both answers are sets. "
                        "Rename the key in one plugin, or block one with CLEANAI_DISABLED_PLUGINS."
                    )
        return cls(joined)

    def __getitem__(self, key: str) -> Any:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ModelFindings({sorted(self._entries)})"


def prepare_model(model: nn.Module, pm: Any) -> ModelFindings:
    """Ask every plugin's ``cleanai_prepare_model`` about ``model`` once; join the answers."""
    return ModelFindings.join(pm.hook.cleanai_prepare_model(model=model))
