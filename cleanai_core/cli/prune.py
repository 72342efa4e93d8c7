"""``cleanai prune``: the command line of :mod:`cleanai_core.job`.

The flags are generated from :class:`~cleanai_core.job.config.PruneConfig`, where every
option is named and documented once (flag ``--name-with-dashes``, config-file key and
``config.json`` key ``name_with_underscores``, variable ``CLEANAI_NAME``). Options come from
(lowest to highest priority) the defaults, ``--preset``, ``--config FILE`` (TOML, YAML or
JSON), ``CLEANAI_<OPTION>`` environment variables and the command line; the resolved
options, with where each came from (``_sources``), are written to ``DIR/config.json``,
which ``--config`` reads back.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cleanai_core import distributed
from cleanai_core.job.config import CONFIG_HELP, DEFAULTS, option_fields, resolve_config
from cleanai_core.job.run import execute

__all__ = ["DEFAULTS", "GivenOnce", "add_options", "add_parser", "run"]

GROUPS = ("inputs", "pruning", "data use", "recovery", "output")


class GivenOnce(argparse.Action):
    """Store an option's value. The same option given again with another value under another
    spelling (``--ratio 0.3 --pruning-ratio 0.6``) is an error; under the same spelling the
    last value is used, as in other tools (a wrapper script's defaults overridden by its
    arguments), with a warning. The last one was taken without a word either way. Needs the
    parser's ``argument_default=argparse.SUPPRESS``: an option not given yet is no attribute
    of the namespace."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        spellings = getattr(namespace, "_spellings", {})
        before = spellings.get(self.dest)
        if before is not None and getattr(namespace, self.dest, values) != values:
            old = getattr(namespace, self.dest)
            if before != option_string:
                raise argparse.ArgumentError(
                    self,
                    f"given twice, as {before} {old!r} and {option_string} {values!r}; give it once (a default "
                    f"belongs in --config or CLEANAI_{self.dest.upper()}, which the command line overrides)",
                )
            print(
                f"{parser.prog}: warning: {option_string} given twice ({old!r}, then {values!r}); the last is used.",
                file=sys.stderr,
            )
        spellings[self.dest] = option_string
        namespace._spellings = spellings
        setattr(namespace, self.dest, values)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return add_options(
        subparsers.add_parser(
            "prune",
            help="prune a trained model, scoring channels on your data",
            description="Prune a trained model by slicing channels, scored by weights and activations on your "
            "data. Part of the data (--calib-fraction) chooses the channels; accuracy is measured on the rest.",
            argument_default=argparse.SUPPRESS,
        )
    )


def add_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every :class:`~cleanai_core.job.config.PruneConfig` option as a flag of ``p``."""
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for field in option_fields():
        meta = field.metadata
        flag = "--" + field.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": field.name, "help": meta["help"], **meta["parser"]}
        if isinstance(field.default, bool):  # a switch: on, or off for options that are on by default
            flag = "--no-" + flag[2:] if field.default else flag
            kwargs.update(action="store_false" if field.default else "store_true", default=argparse.SUPPRESS)
        elif "action" not in kwargs:  # one value: a second, other one is refused (repeatable options append)
            kwargs["action"] = GivenOnce
        flags = [flag, *meta["flags"]]
        flags.sort(key=lambda f: (not f.startswith("--"), f != flag))  # the option's own name first
        groups[meta["group"]].add_argument(*flags, **kwargs)
        if field.name == "seq_len":
            groups["inputs"].add_argument("--config", metavar="FILE", help=CONFIG_HELP, action=GivenOnce)
    return p


def run(args: argparse.Namespace, **fixed: Any) -> int:
    """Run the job for the parsed ``args``; ``fixed`` options override them (another
    command's own settings, e.g. ``cleanai sensitivity``)."""
    cfg = {**resolve_config(args), **fixed}
    cfg["device"], started = distributed.init_from_env(cfg["device"])
    try:
        execute(cfg)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0
