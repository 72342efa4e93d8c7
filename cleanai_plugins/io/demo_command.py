"""``cleanai demo``: the whole job on an embedded default, with no arguments.

Trains a small CNN on part of the UCI handwritten digits (shipped with CleanAI, CC BY 4.0),
hands the rest to ``cleanai prune`` as the "test data" (half of it scores channels, half
measures accuracy) and prints the headline numbers.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cleanai_core.errors import UserError

__all__ = ["DEFAULT_OUT", "NAME", "add_parser", "run"]

log = logging.getLogger("cleanai")

NAME = "demo"
DEFAULT_OUT = "cleanai-demo-out"
MARKER = ".cleanai-demo"
TRAIN_SAMPLES = 1000


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME,
        help="train a small CNN on the embedded digits data and prune it (no arguments needed)",
        description="Run the whole job on an embedded default: the UCI handwritten digits (CC BY 4.0) and a small "
        "CNN trained on them in seconds. Writes the same outputs as `cleanai prune`.",
    )
    # None: not given, so CLEANAI_OUT, CLEANAI_RATIO, ... (or the file CLEANAI_CONFIG names) apply, then the defaults
    p.add_argument("--out", "-o", default=None, metavar="DIR", help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--ratio", "-r", type=float, default=None, metavar="R", help=f"pruning ratio (default {RATIO})")
    p.add_argument("--epochs", type=int, default=8, metavar="N", help="training epochs (default 8)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed (default 0)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a non-demo --out folder")
    p.add_argument("--quiet", "-q", action="store_true", default=None, help="no progress bars or info logs")
    return p


#: the demo's pruning ratio where neither the command line nor the environment gives an amount
RATIO = 0.5
#: options the demo fixes itself: its embedded model and data (a CLEANAI_MODEL set for
#: ``cleanai prune`` is not read here, and the demo says so)
_OWN = ("model", "data", "weights", "num_classes", "train_data")


def demo_config(args: argparse.Namespace, model_spec: str, data: str) -> dict[str, Any]:
    """The demo's job options, resolved as ``cleanai prune`` resolves its own: defaults <
    ``--preset`` < the file ``CLEANAI_CONFIG`` names < ``CLEANAI_<OPTION>`` variables <
    the command line, with the demo's defaults for the ratio (:data:`RATIO`) and
    ``--out`` where nothing else sets them. Before session 24 the demo read the command
    line only: ``CLEANAI_RATIO=0.2 cleanai demo`` pruned 0.5, ``CLEANAI_OUT`` and
    ``CLEANAI_QUIET`` were ignored without a word."""
    import os

    from cleanai_core.config_sources import ENV_PREFIX
    from cleanai_core.job.config import resolve_config

    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k in ("out", "ratio", "seed", "quiet")}
    given = {k: v for k, v in given.items() if v is not None}
    if args.overwrite:
        given["overwrite"] = True
    ignored = [f"{ENV_PREFIX}{k.upper()}" for k in _OWN if os.environ.get(f"{ENV_PREFIX}{k.upper()}", "").strip()]
    if ignored:
        names = ", ".join(ignored)
        print(f"note: cleanai demo uses its embedded model and data; {names} not read here.", file=sys.stderr)
    environ = {k: v for k, v in os.environ.items() if k.removeprefix(ENV_PREFIX).lower() not in _OWN}
    if "out" not in given and not environ.get(f"{ENV_PREFIX}OUT", "").strip():
        given["out"] = DEFAULT_OUT
    cfg = resolve_config({**given, "model": model_spec, "data": data}, environ=environ)
    if cfg["_sources"].get("ratio") == "default" and cfg.get("ratio") is not None:
        cfg["ratio"], cfg["_sources"]["ratio"] = RATIO, "default (cleanai demo)"
    return cfg


#: the most training epochs ``cleanai demo`` takes (each is a pass over 1,000 digits)
MAX_EPOCHS = 1000


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import TensorDataset

    from cleanai_core.job import execute
    from cleanai_core.job.outputs import check_out_dir
    from cleanai_plugins.io.demo import DATA_PATH, MODEL_SPEC, digits_tensors, train_digits_cnn

    if not 1 <= args.epochs <= MAX_EPOCHS:  # --epochs 10**11 trained until killed
        raise UserError(f"--epochs={args.epochs} must be from 1 to {MAX_EPOCHS} (the default, 8, trains the demo).")
    cfg = demo_config(args, MODEL_SPEC, f"embedded:{DATA_PATH.name}")  # checks --ratio, --seed as prune does
    out = Path(cfg["out"])
    earlier = out.is_dir() and (out / MARKER).is_file()
    check_out_dir(out, bool(cfg.get("overwrite")), [], own_marker=MARKER)  # refuses files no earlier demo wrote
    if earlier:
        print(f"note: replacing the previous demo output in {out}/", file=sys.stderr)
    quiet, seed = bool(cfg.get("quiet")), int(cfg["seed"])
    logging.getLogger("cleanai").setLevel(logging.WARNING if quiet else logging.INFO)

    # a model this small runs fastest on one thread (and is not slowed by a busy machine)
    torch.set_num_threads(1)
    x, y = digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:TRAIN_SAMPLES], perm[TRAIN_SAMPLES:]
    log.info("training DigitsCNN on %d of the %d UCI digits (%s)...", len(train), len(x), DATA_PATH.name)
    t0 = time.time()
    model = train_digits_cnn(x[train], y[train], epochs=args.epochs, seed=seed)
    log.info("trained in %.1f s; pruning with the other %d images as test data", time.time() - t0, len(test))

    cfg.update(overwrite=True, _own_marker=MARKER)  # --out was checked above, before the training
    execute(cfg, model=model, dataset=TensorDataset(x[test], y[test]))
    print(f"load it back with: from cleanai_core.io import load_pruned; model = load_pruned({str(out)!r})")
    return 0
