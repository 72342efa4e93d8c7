"""A tiny table from ATen op names to mappers, shared by the built-in mapper plugins."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["FnMapper", "MapperTable", "arg"]


class FnMapper:
    """Wraps ``fn(call, ctx)`` as an :class:`~cleanai_core.interfaces.IndexMapper`."""

    def __init__(self, fn: Callable[[Any, Any], None]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__

    def trace(self, call, ctx) -> None:
        self.fn(call, ctx)

    def __repr__(self) -> str:
        return f"<mapper {self.fn.__name__}>"


class MapperTable:
    """``@table.register("view", "_unsafe_view")`` then ``table.lookup(op)``: by the
    op's packet name (``aten.view.default`` -> ``view``), or by the full overload
    name for entries that contain a dot."""

    def __init__(self) -> None:
        self._by_name: dict[str, FnMapper] = {}

    def register(self, *names: str) -> Callable:
        def deco(fn):
            m = FnMapper(fn)
            for n in names:
                self._by_name[n] = m
            return fn

        return deco

    def lookup(self, op: Any) -> FnMapper | None:
        full = str(op).removeprefix("aten.")
        hit = self._by_name.get(full)
        if hit is not None:
            return hit
        packet = getattr(op, "overloadpacket", None)
        name = getattr(packet, "__name__", None) or full.split(".")[0]
        return self._by_name.get(name)


def arg(call: Any, i: int, name: str, default: Any = None) -> Any:
    """Positional argument ``i`` of an op call, or keyword ``name``."""
    if len(call.args) > i:
        return call.args[i]
    return call.kwargs.get(name, default)
