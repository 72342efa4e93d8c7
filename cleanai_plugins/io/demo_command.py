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
    p.add_argument("--out", "-o", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--ratio", "-r", type=float, default=0.5, metavar="R", help="pruning ratio (default 0.5)")
    p.add_argument("--epochs", type=int, default=8, metavar="N", help="training epochs (default 8)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-demo --out folder")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info logs")
    return p


#: the most training epochs ``cleanai demo`` takes (each is a pass over 1,000 digits)
MAX_EPOCHS = 1000


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import TensorDataset

    from cleanai_core.job import DEFAULTS, execute
    from cleanai_core.job.outputs import check_out_dir
    from cleanai_plugins.io.demo import DATA_PATH, MODEL_SPEC, digits_tensors, train_digits_cnn

    if not 0.0 < args.ratio < 1.0:
        raise UserError(f"--ratio={args.ratio} must be strictly between 0 and 1.")
    if not 1 <= args.epochs <= MAX_EPOCHS:  # --epochs 10**11 trained until killed
        raise UserError(f"--epochs={args.epochs} must be from 1 to {MAX_EPOCHS} (the default, 8, trains the demo).")
    if not -(2**63) <= args.seed < 2**64:  # "Overflow when unpacking long long" (exit 1)
        raise UserError(f"--seed={args.seed} is out of range: it must be in [-2**63, 2**64) (what torch takes).")
    out = Path(args.out)
    earlier = out.is_dir() and (out / MARKER).is_file()
    check_out_dir(out, args.overwrite, [], own_marker=MARKER)  # refuses files the earlier demo did not write
    if earlier:
        print(f"note: replacing the previous demo output in {out}/", file=sys.stderr)
    logging.getLogger("cleanai").setLevel(logging.WARNING if args.quiet else logging.INFO)

    # a model this small runs fastest on one thread (and is not slowed by a busy machine)
    torch.set_num_threads(1)
    x, y = digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    train, test = perm[:TRAIN_SAMPLES], perm[TRAIN_SAMPLES:]
    log.info("training DigitsCNN on %d of the %d UCI digits (%s)...", len(train), len(x), DATA_PATH.name)
    t0 = time.time()
    model = train_digits_cnn(x[train], y[train], epochs=args.epochs, seed=args.seed)
    log.info("trained in %.1f s; pruning with the other %d images as test data", time.time() - t0, len(test))

    cfg = dict(DEFAULTS)
    cfg.update(
        model=MODEL_SPEC,
        data=f"embedded:{DATA_PATH.name}",
        out=str(out),
        ratio=args.ratio,
        seed=args.seed,
        quiet=args.quiet,
        overwrite=True,
        _own_marker=MARKER,
    )
    execute(cfg, model=model, dataset=TensorDataset(x[test], y[test]))
    print(f"load it back with: from cleanai_core.io import load_pruned; model = load_pruned({str(out)!r})")
    return 0
