"""``cleanai sensitivity``: how much each prunable group of a model matters, on your data.

Every group is pruned alone at each of ``--sensitivity-ratios`` and the output measured
against the original's on batches set aside from the calibration data (mean KL divergence,
and accuracy where the data has labels). Nothing is pruned and no model is written: the
table (most sensitive first) is printed, and with ``--out DIR`` written as ``report.md``,
``report.json`` and ``sensitivity.svg`` with the ``config.json`` that reproduces the run.
The options are those of ``cleanai prune``; ``cleanai prune --auto`` allocates per-layer
ratios from the same analysis.
"""

from __future__ import annotations

import argparse
from typing import Any

from cleanai_core.cli import prune

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return prune.add_options(
        subparsers.add_parser(
            "sensitivity",
            help="measure how much each layer's pruning changes the output, on your data (prunes nothing)",
            description=__doc__.split("\n\n")[1].replace("\n", " "),
            argument_default=argparse.SUPPRESS,
        )
    )


def run(args: argparse.Namespace) -> int:
    return prune.run(args, sensitivity=True, _analysis_only=True)
