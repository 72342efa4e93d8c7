"""Pruned variants of timm classes: a subclass whose ``forward`` reads widths from its layers."""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["pruned_variant"]


def pruned_variant(module: str, name: str, forward: Callable, home: str) -> tuple[type | None, type | None]:
    """timm's class ``module.name`` and ``Pruned<name>``, its subclass with ``forward`` in place
    of its own, whose ``__module__`` is ``home``: bind it to that name there, so a pickled
    pruned model finds the class. ``(None, None)`` where timm (optional) or this version of it
    lacks the class."""
    try:
        base = getattr(importlib.import_module(module), name)
    except Exception:
        return None, None
    return base, type(f"Pruned{name}", (base,), {"forward": forward, "__module__": home})
