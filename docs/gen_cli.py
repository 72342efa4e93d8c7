"""The CLI reference, rendered from the ``cleanai`` argparse parser at build time.

Used two ways:

- as an MkDocs hook (``hooks:`` in ``mkdocs.yml``): on every page, the line
  ``<!-- cli-reference -->`` (or ``<!-- cli-reference lang=tr -->``) is replaced by the
  reference of every command, so the docs never drift from the parser;
- as a script: ``python docs/gen_cli.py [--lang tr]`` prints the same Markdown.

Option help stays in English in every language (CLI messages are English); only the
headings around it are translated.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# document the checkout this file belongs to, also when cleanai is not installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MARKER = re.compile(r"^<!-- cli-reference(?: lang=(\w+))? -->$", re.MULTILINE)
WIDTH = 88

HEADINGS = {
    "en": {
        "usage": "Usage",
        "option": "option",
        "meaning": "meaning",
        "default": "default",
        "global": "Global options",
    },
    "tr": {
        "usage": "Kullanım",
        "option": "seçenek",
        "meaning": "anlamı",
        "default": "varsayılan",
        "global": "Genel seçenekler",
    },
}


def _escape(text: str) -> str:
    return re.sub(r"([\\`*_|<>\[\]])", r"\\\1", " ".join(text.split()))


def _fixed_width(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=WIDTH, max_help_position=32)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (sub, helps.get(name, "")) for name, sub in action.choices.items()}
    return {}


def _option_table(group: argparse._ArgumentGroup, words: dict[str, str], defaults: dict) -> list[str]:
    rows = []
    for action in group._group_actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            metavar = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
            name = ", ".join(f"`{opt}{metavar}`" for opt in action.option_strings)
        else:
            name = f"`{action.metavar or action.dest}`"
        default = defaults.get(action.dest) if action.default == argparse.SUPPRESS else action.default
        shown = "" if action.nargs == 0 or default in (None, False, [], {}) else f"`{default}`"
        rows.append(f"| {name} | {_escape(action.help or '')} | {shown} |")
    if not rows:
        return []
    return [f"| {words['option']} | {words['meaning']} | {words['default']} |", "|---|---|---|", *rows, ""]


def _groups(parser: argparse.ArgumentParser, words: dict[str, str], defaults: dict | None = None) -> list[str]:
    lines = []
    for group in parser._action_groups:
        table = _option_table(group, words, defaults or {})
        if not table:
            continue
        title = group.title or ""
        if title not in ("options", "optional arguments", "positional arguments"):
            lines += [f"**{title}**", ""]
        lines += table
    return lines


def render(lang: str = "en") -> str:
    """The whole reference as Markdown: the global options, then one section per command."""
    import importlib

    from cleanai_core.cli import build_parser

    words = HEADINGS.get(lang, HEADINGS["en"])
    parser = build_parser()
    _fixed_width(parser)
    lines = [f"## {words['global']}", "", "```text", parser.format_usage().strip(), "```", ""]
    lines += _groups(parser, words)
    for name, (sub, summary) in _subcommands(parser).items():
        _fixed_width(sub)
        summary = _escape(summary)
        lines += [f"## `cleanai {name}`", "", summary[:1].upper() + summary[1:] + ".", ""]
        if sub.description:
            lines += [_escape(sub.description), ""]
        lines += [f"{words['usage']}:", "", "```text", sub.format_usage().strip(), "```", ""]
        # a command whose options default to SUPPRESS (so a config file can fill them) keeps
        # the real defaults in its module's DEFAULTS (the module of its ``run``, a plugin's too)
        run = sub.get_default("_run")
        defaults = getattr(importlib.import_module(run.__module__), "DEFAULTS", {}) if run else {}
        lines += _groups(sub, words, defaults)
    return "\n".join(lines).rstrip() + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs hook signature)
    """MkDocs hook: replace the ``<!-- cli-reference -->`` marker with the rendered reference."""
    return MARKER.sub(lambda m: render(m.group(1) or "en"), markdown)


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="print the CLI reference as Markdown")
    cli.add_argument("--lang", default="en", choices=sorted(HEADINGS))
    sys.stdout.write(render(cli.parse_args().lang))
