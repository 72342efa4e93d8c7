"""Plugins for the model families of timm, torchvision and transformers.

They look up their library's classes only once the library is imported
(:func:`loaded`): a model built from a library's classes cannot exist before that, and
importing all three whenever the plugins loaded cost every process 2-3 s of CPU (timm
brought torchvision and ``torch._dynamo`` with it, transformers 1 s more), also one
pruning a plain ``torch.nn`` model. Their claims that go by a module's attributes or its
class's module name work as before.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["imported", "loaded", "named_classes", "once_loaded"]


def loaded(name: str) -> ModuleType | None:
    """The module ``name`` (``"torchvision.models.maxvit"``) where it is imported by now,
    else None; never imports it. An instance of a class defined there cannot exist before
    that module is imported, so an ``isinstance`` test against its classes needs no more."""
    return sys.modules.get(name)


def once_loaded(factory: Callable[[], Any]) -> Callable[[], Any]:
    """``factory()`` (a zero-argument builder of classes on a library's classes) kept from
    its first result other than None: asked again until the library is imported."""
    made: list[Any] = []

    @functools.wraps(factory)
    def get() -> Any:
        if not made:
            value = factory()
            if value is None:
                return None
            made.append(value)
        return made[0]

    return get


def imported(name: str) -> ModuleType | None:
    """The module ``name``, imported now if need be (None where it cannot be): for a
    pickled pruned model, whose class is one of the plugins' and whose base is the
    library's, being loaded by name before the library was imported."""
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def named_classes(module: str, classes: dict[str, tuple[str, Callable[[], Any]]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the pruned classes the plugin ``module`` makes lazily:
    ``classes`` maps a class name to the library module it builds on and the (cached)
    builder that returns it. Unpickling looks a class up by name; the library is
    imported then if need be."""

    def getattr_(name: str) -> Any:
        where, make = classes.get(name, (None, None))
        made = make() if make is not None and imported(where) is not None else None
        if made is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return made

    return getattr_
