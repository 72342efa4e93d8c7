"""The plugin manager: built-ins by import, then the ``cleanai`` entry-point group.

Environment:

- ``CLEANAI_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points (built-ins still load).
- ``CLEANAI_DISABLED_PLUGINS=a,b`` blocks plugins by name (entry-point name or
  built-in module name); the CLI's ``--disable-plugin`` does the same.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import pluggy

from cleanai_core import hookspecs
from cleanai_core.hookspecs import PROJECT

__all__ = [
    "BUILTIN_PLUGINS",
    "load_model",
    "PluginFailure",
    "PluginInfo",
    "get_plugin_manager",
    "plugin_manager",
    "list_plugins",
    "make_plugin_manager",
    "process_plugin_manager_restored",
    "temporary_plugin",
]

log = logging.getLogger("cleanai")

BUILTIN_PLUGINS: tuple[str, ...] = (
    "cleanai_plugins.layers.conv",
    "cleanai_plugins.layers.linear",
    "cleanai_plugins.layers.norm",
    "cleanai_plugins.layers.embedding",
    "cleanai_plugins.layers.activation",
    "cleanai_plugins.layers.attention",
    "cleanai_plugins.layers.recurrent",
    "cleanai_plugins.layers.observers",
    "cleanai_plugins.layers.parameters",
    "cleanai_plugins.mappers.shape",
    "cleanai_plugins.mappers.join",
    "cleanai_plugins.mappers.matmul",
    "cleanai_plugins.mappers.spatial",
    "cleanai_plugins.mappers.norm_ops",
    "cleanai_plugins.importance.criteria",
    "cleanai_plugins.reducers",
    "cleanai_plugins.zoo.timm",
    "cleanai_plugins.zoo.torchvision",
    "cleanai_plugins.zoo.torchvision_swin",
    "cleanai_plugins.zoo.torchvision_shuffle",
    "cleanai_plugins.zoo.fx_graphs",
    "cleanai_plugins.zoo.transformers",
    "cleanai_plugins.zoo.transformers_hidden",
    "cleanai_plugins.io.hf",  # before loaders: built-in claims are asked in this order
    "cleanai_plugins.io.text",
    "cleanai_plugins.io.models",
    "cleanai_plugins.io.datasets",
    "cleanai_plugins.io.evaluation",
    "cleanai_plugins.io.demo",
)


@attrs.frozen
class PluginFailure:
    """An entry point that could not be loaded; start-up went on without it."""

    name: str
    distribution: str
    error: str


@attrs.frozen
class PluginInfo:
    """One registered plugin, as ``cleanai plugins`` prints it."""

    name: str
    source: str  # "built-in" or "<distribution> <version>"
    hooks: tuple[str, ...]


class CleanAIPluginManager(pluggy.PluginManager):
    """A pluggy manager that only looks at ``cleanai_*`` attributes of plugins and
    remembers which entry points failed to load."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self.distributions: dict[str, str] = {}

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        if not name.startswith("cleanai_"):
            return None
        return super().parse_hookimpl_opts(plugin, name)


def _disabled_from_env() -> set[str]:
    raw = os.environ.get("CLEANAI_DISABLED_PLUGINS", "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _load_entry_points(pm: CleanAIPluginManager) -> None:
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != PROJECT or pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                continue
            dist_name = dist.metadata["name"] or "?"
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
                pm.check_pending()
            except Exception as exc:  # one broken plugin must not abort start-up
                if pm.has_plugin(ep.name):
                    pm.unregister(name=ep.name)
                failure = PluginFailure(ep.name, dist_name, f"{type(exc).__name__}: {exc}")
                pm.failures.append(failure)
                warnings.warn(
                    f"cleanai: plugin {ep.name!r} from {dist_name} failed to load and was skipped "
                    f"({failure.error}). Fix or uninstall it, or block it with "
                    f"CLEANAI_DISABLED_PLUGINS={ep.name}.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            pm.distributions[ep.name] = f"{dist_name} {dist.version}"


def make_plugin_manager(
    load_entrypoints: bool | None = None,
    disabled: Iterable[str] = (),
    builtins: Iterable[str] = BUILTIN_PLUGINS,
) -> CleanAIPluginManager:
    """Create a fresh plugin manager.

    Built-ins are registered first by import; entry points of the ``cleanai`` group
    after them, so an installed plugin's claim wins (pluggy calls later registrations
    first). ``check_pending`` rejects implementations of hooks that do not exist.

    Example::

        pm = make_plugin_manager(load_entrypoints=False)
        pruner = pm.hook.cleanai_layer_pruner(module=torch.nn.Linear(2, 3), name="fc")
    """
    pm = CleanAIPluginManager()
    for name in set(disabled) | _disabled_from_env():
        pm.set_blocked(name)
    for modname in builtins:
        if pm.is_blocked(modname):
            continue
        pm.register(importlib.import_module(modname), name=modname)
    pm.check_pending()
    if load_entrypoints is None:
        load_entrypoints = os.environ.get("CLEANAI_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
    if load_entrypoints:
        _load_entry_points(pm)
    _warn_unknown_blocked(set(disabled) | _disabled_from_env(), list(builtins))
    return pm


def _warn_unknown_blocked(names: set[str], builtins: list[str]) -> None:
    """A blocked name that is no plugin blocks nothing: a misspelt ``--disable-plugin``
    left the plugin it meant active, without a word."""
    known = builtins + [
        ep.name for dist in importlib.metadata.distributions() for ep in dist.entry_points if ep.group == PROJECT
    ]
    for name in sorted(names - set(known)):
        import difflib

        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        warnings.warn(
            f"cleanai: the blocked plugin {name!r} (--disable-plugin or CLEANAI_DISABLED_PLUGINS) is not a plugin, so "
            f"it blocks nothing; {hint}`cleanai plugins` lists them.",
            RuntimeWarning,
            stacklevel=3,
        )


_PM: CleanAIPluginManager | None = None


def get_plugin_manager() -> CleanAIPluginManager:
    """The process-wide manager, created on first use."""
    global _PM
    if _PM is None:
        _PM = make_plugin_manager()
    return _PM


def plugin_manager(pm: Any, who: str) -> pluggy.PluginManager:
    """``pm`` as the plugin manager ``who`` (a function or class taking ``pm=``) uses: the
    process-wide one (:func:`get_plugin_manager`) where ``pm`` is ``None``. Anything but a
    ``pluggy.PluginManager`` is a :class:`TypeError` naming the type wanted:
    ``DependencyGraph(model, x, pm="x")`` raised ``AttributeError: 'str' object has no
    attribute 'hook'`` from deep in the trace, and a falsy ``pm=0`` was silently replaced."""
    if pm is None:
        return get_plugin_manager()
    if not isinstance(pm, pluggy.PluginManager):
        raise TypeError(
            f"{who}: pm={pm!r} (a {type(pm).__name__}) must be a pluggy.PluginManager, e.g. "
            "cleanai_core.plugins.make_plugin_manager() or get_plugin_manager(); or None for the process-wide one"
        )
    return pm


def input_forms(kind: str, pm: Any = None) -> str:
    """What the installed loaders accept as ``kind`` (``"model"`` or ``"data"``), joined
    from the ``cleanai_input_forms`` hook, for messages."""
    pm = plugin_manager(pm, "input_forms")
    forms = [f[kind] for f in pm.hook.cleanai_input_forms() if f and f.get(kind)]
    return "; or ".join(forms) if forms else f"a {kind} spec an installed loader plugin reads"


def set_plugin_manager(pm: CleanAIPluginManager | None) -> None:
    """Replace the process-wide manager (``None``: rebuild on next use)."""
    global _PM
    _PM = pm


@contextmanager
def process_plugin_manager_restored() -> Iterator[None]:
    """The process-wide manager put back after the block: what one command line chose
    (``--disable-plugin``, ``--plugin``) lasts that command, not the rest of a process that
    calls ``cleanai_core.cli.main`` (a notebook, a test run)."""
    global _PM
    saved = _PM
    try:
        yield
    finally:
        _PM = saved


@contextmanager
def temporary_plugin(plugin: Any, name: str | None = None, pm: pluggy.PluginManager | None = None) -> Iterator[Any]:
    """Register ``plugin`` for the duration of a ``with`` block (tests, notebooks).

    Example::

        with temporary_plugin(MyPlugin(), name="mine"):
            graph = DependencyGraph(model, x)
    """
    pm = plugin_manager(pm, "temporary_plugin")
    registered = pm.register(plugin, name=name)
    try:
        pm.check_pending()
        yield plugin
    finally:
        pm.unregister(name=registered)


def list_plugins(pm: CleanAIPluginManager | None = None) -> list[PluginInfo]:
    """Every registered plugin with where it came from and the hooks it implements."""
    pm = plugin_manager(pm, "list_plugins")
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))
        source = pm.distributions.get(name, "built-in" if name in BUILTIN_PLUGINS else "registered at run time")
        out.append(PluginInfo(name=name, source=source, hooks=hooks))
    return out


def load_model(pm: Any, spec: str, options: dict[str, Any]) -> Any:
    """``cleanai_load_model`` for ``spec``; a model too large to allocate (``--num-classes``
    in the trillions, from the command line or a tampered ``architecture.json``) is a
    :class:`UserError` instead of the allocator's ``RuntimeError``."""
    from cleanai_core.errors import UserError

    num = options.get("num_classes")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        # cleanai explain --num-classes -3: "Trying to create tensor with negative dimension" (exit 1)
        raise UserError(f"--num-classes={num!r} is out of range: it must be an integer >= 1 (the model's classes).")
    try:
        return pm.hook.cleanai_load_model(spec=spec, options=options)
    except MemoryError:
        raise UserError(f"building the model {spec!r} ran out of memory; check --num-classes and the spec.") from None
    except (RuntimeError, TypeError, OverflowError) as exc:
        # "Storage size calculation overflowed" / "Overflow when unpacking long long": a size past
        # what torch can count (--num-classes 10**20) was a C++ stack dump, exit 1
        text = str(exc)
        overflow = "overflow" in text.lower() and ("size" in text or "long" in text)
        if "allocate" not in text and not overflow:
            raise
        num = options.get("num_classes")
        hint = f" (num_classes={num})" if num is not None else ""
        import re

        size = re.search(r"allocate (\d+) bytes", text)
        asked = f" ({int(size.group(1)) / 2**30:,.0f} GiB for one tensor)" if size else ""
        asked = " (a tensor of more elements than torch can count)" if overflow else asked
        raise UserError(
            f"building the model {spec!r}{hint} needs more memory than there is{asked}; check --num-classes and the "
            "spec."
        ) from None
