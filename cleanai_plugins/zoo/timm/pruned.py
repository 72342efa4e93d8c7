"""Pruned variants of timm classes: a subclass whose ``forward`` reads widths from its layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cleanai_plugins.zoo import loaded, named_classes, once_loaded

__all__ = ["pruned_variant", "variant_lookup"]


def pruned_variant(
    module: str, name: str, forward: Callable, home: str, pruned: str | None = None
) -> Callable[[], tuple[Any, Any]]:
    """A getter of timm's class ``module.name`` and ``Pruned<name>`` (or ``pruned``), its
    subclass with ``forward`` in place of its own, whose ``__module__`` is ``home`` (bind
    :func:`variant_lookup` as ``home``'s ``__getattr__``, so a pickled pruned model finds
    the class). Made once ``module`` is imported; ``(None, None)`` before, or where this
    version of timm lacks the class. Nothing here imports timm."""

    @once_loaded
    def make() -> tuple[type, type] | None:
        base = getattr(loaded(module), name, None)
        if base is None:
            return None
        variant = type(pruned or f"Pruned{name}", (base,), {"forward": forward, "__module__": home})
        return base, variant

    return lambda: make() or (None, None)


def variant_lookup(home: str, *variants: tuple[str, str, Callable[[], tuple[Any, Any]]]) -> Callable[[str], Any]:
    """``home``'s module ``__getattr__`` for pruned classes of :func:`pruned_variant`, each
    given as ``(library module, class name it is found by, its getter)``."""
    return named_classes(home, {name: (module, lambda v=variant: v()[1]) for module, name, variant in variants})
