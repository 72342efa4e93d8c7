"""Pruned variants of timm classes: a subclass whose ``forward`` reads widths from its layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cleanai_plugins.zoo import loaded, named_classes, once_loaded

__all__ = ["pruned_variant", "variant_lookup"]


def pruned_variant(module: str, name: str, forward: Callable, home: str) -> Callable[[], tuple[Any, Any]]:
    """A getter of timm's class ``module.name`` and ``Pruned<name>``, its subclass with
    ``forward`` in place of its own, whose ``__module__`` is ``home`` (bind
    :func:`variant_lookup` as ``home``'s ``__getattr__``, so a pickled pruned model finds
    the class). Made once ``module`` is imported; ``(None, None)`` before, or where this
    version of timm lacks the class. Nothing here imports timm."""

    @once_loaded
    def make() -> tuple[type, type] | None:
        base = getattr(loaded(module), name, None)
        if base is None:
            return None
        variant = type(f"Pruned{name}", (base,), {"forward": forward, "__module__": home})
        return base, variant

    return lambda: make() or (None, None)


def variant_lookup(home: str, module: str, name: str, variant: Callable[[], tuple[Any, Any]]) -> Callable[[str], Any]:
    """``home``'s module ``__getattr__`` for ``Pruned<name>`` (:func:`pruned_variant`)."""
    return named_classes(home, {f"Pruned{name}": (module, lambda: variant()[1])})
