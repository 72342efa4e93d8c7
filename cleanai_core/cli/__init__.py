"""The ``cleanai`` command. One module per subcommand, each exposing
``add_parser(subparsers)`` (returns its parser) and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"cleanai_core.cli.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["--version"]:  # fast path: no subcommand (and no torch) import
        print(f"cleanai {__version__}")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.disable_plugin:
        from cleanai_core.plugins import make_plugin_manager, set_plugin_manager

        set_plugin_manager(make_plugin_manager(disabled=args.disable_plugin))
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
    except KeyboardInterrupt:
        print(f"cleanai {args.command}: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
