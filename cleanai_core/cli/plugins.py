"""``cleanai plugins``: every registered plugin, where it came from and the hooks it
implements; entry points that failed to load; plugins that were blocked.

Example::

    $ cleanai plugins
    $ cleanai plugins --json | python -m json.tool
"""

from __future__ import annotations

import argparse
import json
import sys

from cleanai_core.plugins import get_plugin_manager, list_plugins

__all__ = ["add_parser", "collect", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plugins",
        help="list plugins, where they come from and the hooks they implement",
        description=(
            "List every registered plugin (built-in, or the distribution and version that installed it) "
            "with the hooks it implements, entry points that failed to load, and blocked plugins."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def collect() -> dict:
    """What ``cleanai plugins`` shows, as plain data."""
    pm = get_plugin_manager()
    plugins = [{"name": p.name, "source": p.source, "hooks": list(p.hooks)} for p in list_plugins(pm)]
    failures = [{"name": f.name, "distribution": f.distribution, "error": f.error} for f in pm.failures]
    blocked = sorted(name for name, plugin in pm.list_name_plugin() if plugin is None)
    return {"plugins": plugins, "failures": failures, "blocked": blocked}


def run(args: argparse.Namespace) -> int:
    data = collect()
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{len(data['plugins'])} plugins:")
    for p in data["plugins"]:
        print(f"  {p['name']}  ({p['source']})")
        print(f"      hooks: {', '.join(p['hooks']) or '-'}")
    if data["failures"]:
        print(f"\n{len(data['failures'])} plugins failed to load (skipped):")
        for f in data["failures"]:
            print(f"  {f['name']}  ({f['distribution']}): {f['error']}")
    if data["blocked"]:
        print(f"\nblocked: {', '.join(data['blocked'])}")
    return 0
