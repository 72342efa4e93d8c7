"""The ``cleanai`` command. One module per subcommand, each exposing
``add_parser(subparsers)`` (returns its parser) and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from cleanai_core import __version__
from cleanai_core.errors import CleanAIError, UserError

__all__ = ["main"]

COMMANDS = ("prune", "demo", "plugins", "explain")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cleanai",
        description="Structured pruning of trained PyTorch models, scored on your test data.",
    )
    parser.add_argument("--version", action="version", version=f"cleanai {__version__}")
    parser.add_argument(
        "--disable-plugin",
        action="append",
        default=[],
        metavar="NAME",
        help="block a plugin by name (repeatable); also CLEANAI_DISABLED_PLUGINS=a,b",
    )
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="register a plugin module by import name for this run (repeatable), e.g. "
        "cleanai_plugins.zoo.transformers_gqa (grouped-query attention: query heads per group)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"cleanai_core.cli.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every clean-up runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    """Run ``cleanai``; returns the exit code (130 after Ctrl-C, 143 after SIGTERM)."""
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["--version"]:  # fast path: no subcommand (and no torch) import
        print(f"cleanai {__version__}")
        return 0
    command = next((a for a in args_list if a in COMMANDS), "")
    try:
        with _sigterm_raises():
            return _main(argv)
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        detail = str(exc) or "nothing was written"
        print(f"cleanai{' ' + command if command else ''}: {what}; {detail}.", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    extra = vars(args).pop("plugin", [])  # not a command option
    if args.disable_plugin or extra:
        from cleanai_core.plugins import make_plugin_manager, set_plugin_manager

        pm = make_plugin_manager(disabled=args.disable_plugin)
        for name in extra:
            try:
                pm.register(importlib.import_module(name), name=name)
            except (ImportError, ValueError) as exc:  # ValueError: already registered (a built-in)
                print(
                    f"cleanai: error: --plugin {name}: {exc}; give the import name of a plugin module", file=sys.stderr
                )
                return 2
        pm.check_pending()
        set_plugin_manager(pm)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"cleanai {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CleanAIError as exc:
        print(f"cleanai {args.command}: failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
