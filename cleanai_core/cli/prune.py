"""``cleanai prune``: load a trained model and test data, score channels on part of the
data, prune by slicing, evaluate on the held-out rest, and write the results.

Options come from (lowest to highest priority) the defaults, ``--preset``, ``--config FILE``
(TOML, YAML or JSON), ``CLEANAI_<OPTION>`` environment variables and the command line (see
:mod:`cleanai_core.cli.config_sources`). The resolved options, with where each came from
(``_sources``), are written to ``DIR/config.json``, which ``--config`` reads back.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from cleanai_core import distributed
from cleanai_core.calibration import COVARIANCE_BUDGET_BYTES, COVARIANCE_ROWS
from cleanai_core.cli.config_sources import ENV_PREFIX, PRESETS, env_options, preset_options, read_config_file
from cleanai_core.errors import UserError

__all__ = ["DEFAULTS", "add_parser", "execute", "resolve_config", "run"]

log = logging.getLogger("cleanai")

DEFAULTS: dict[str, Any] = {
    "model": None,
    "data": None,
    "out": None,
    "preset": None,
    "ratio": None,  # 0.3 unless target_flops is given
    "target_flops": None,
    "target_params": None,
    "auto": False,
    "sensitivity": False,
    "sensitivity_batches": 2,
    "sensitivity_ratios": [0.25, 0.5, 0.75],
    "prune_dead_only": False,
    "importance": "weight_activation",
    "alpha": None,
    "beta": None,
    "ignore": [],
    "layer_ratio": {},
    "global_pruning": False,
    "round_to": None,
    "calib_batches": None,
    "calib_fraction": 0.5,
    "batch_size": 32,
    "device": "cpu",
    "seed": 0,
    "dry_run": False,
    "bias_compensation": True,
    "reconstruction": True,
    "covariance_rows": COVARIANCE_ROWS,
    "stats_budget_mib": COVARIANCE_BUDGET_BYTES >> 20,
    "sequential": False,
    "bn_recalibration": True,
    "trust_model": False,
    "trust_code": False,
    "weights": None,
    "num_classes": None,
    "image_size": None,
    "seq_len": None,
    "save_pickle": False,
    "overwrite": False,
    "quiet": False,
    "latency_repeats": 20,
    "threads": None,
    "recover_epochs": 0,
    "train_data": None,
    "recover_lr": 1e-3,
}
DEFAULT_RATIO = 0.3

AMOUNTS = ("ratio", "target_flops", "target_params")


def _preset_help() -> str:
    def show(v: Any) -> str:
        return "on" if v is True else "off" if v is False else "none" if v is None else str(v)

    return "; ".join(
        f"{name}: " + ", ".join(f"{k.replace('_', '-')} {show(v)}" for k, v in values.items())
        for name, values in PRESETS.items()
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prune",
        help="prune a trained model, scoring channels on your data",
        description="Prune a trained model by slicing channels, scored by weights and activations on your data. "
        "Part of the data (--calib-fraction) chooses the channels; accuracy is measured on the rest.",
        argument_default=argparse.SUPPRESS,
    )
    S = argparse.SUPPRESS
    g = p.add_argument_group("inputs")
    g.add_argument(
        "--model",
        "-m",
        metavar="M",
        help="timm:NAME, torchvision:NAME, hf:FOLDER_OR_NAME (transformers, no download), package.module:factory, "
        "or a pickled model file",
    )
    g.add_argument("--weights", metavar="FILE", help="state_dict to load into the model (torch.save(sd, FILE))")
    g.add_argument("--num-classes", type=int, metavar="N", help="classes of the model's head (timm/torchvision)")
    g.add_argument(
        "--trust-model",
        action="store_true",
        default=S,
        help="allow loading a pickled model file (unpickling runs code from the file)",
    )
    g.add_argument(
        "--trust-code",
        action="store_true",
        default=S,
        help="allow package.module:callable specs read from --config (importing and calling them runs code); "
        "specs typed on the command line need no flag",
    )
    g.add_argument(
        "--data",
        "-d",
        metavar="D",
        help="image folder (class sub-folders), .pt tensor file, .npz (x, y), package.module:function; "
        "for hf: models also .txt (a document per line), .jsonl (text, label) or tokenized .pt",
    )
    g.add_argument("--image-size", type=int, metavar="PX", help="image side for image folders")
    g.add_argument("--seq-len", type=int, metavar="N", help="tokens per text block or document (default 128)")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="read options from a .toml, .yaml/.yml or .json file (a config.json of an earlier run reproduces "
        f"it); precedence: command line > {ENV_PREFIX}<OPTION> environment variables > config file > "
        "--preset > defaults",
    )
    g = p.add_argument_group("pruning")
    g.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help=f"a starting point the other sources override ({_preset_help()})",
    )
    g.add_argument(
        "--ratio",
        "-r",
        type=float,
        metavar="R",
        help=f"share of channels to remove per group (default {DEFAULT_RATIO})",
    )
    g.add_argument("--target-flops", type=float, metavar="F", help="instead of --ratio: keep this share of FLOPs")
    g.add_argument(
        "--target-params", type=float, metavar="P", help="instead of --ratio: keep this share of the parameters"
    )
    g.add_argument(
        "--auto",
        action="store_true",
        default=S,
        help="with --target-flops or --target-params: per-layer ratios from a sensitivity analysis (each layer "
        "pruned alone, measured on part of the calibration data), instead of one ratio for all",
    )
    g.add_argument(
        "--sensitivity",
        action="store_true",
        default=S,
        help="measure every layer's sensitivity and add it (table and curves) to the report",
    )
    g.add_argument(
        "--sensitivity-batches",
        type=int,
        metavar="N",
        help="calibration batches set aside for the sensitivity trials (default 2); the rest stream the statistics",
    )
    g.add_argument(
        "--sensitivity-ratios", metavar="R,R,...", help="ratios each layer is tried at (default 0.25,0.5,0.75)"
    )
    g.add_argument(
        "--prune-dead-only",
        action="store_true",
        default=S,
        help="remove exactly the units that never activate on the calibration data (outputs unchanged)",
    )
    g.add_argument(
        "--importance", metavar="NAME", help="weight_activation (default), magnitude, bn_scale, taylor, random, lamp"
    )
    g.add_argument("--alpha", type=float, metavar="A", help="weight_activation: weight of the weight term")
    g.add_argument("--beta", type=float, metavar="B", help="weight_activation: weight of the activation term")
    g.add_argument(
        "--ignore",
        action="append",
        metavar="PATTERN",
        help="layer name, glob or class name whose output channels are kept (repeatable)",
    )
    g.add_argument("--layer-ratio", action="append", metavar="PATTERN=R", help="per-layer ratio (repeatable)")
    g.add_argument(
        "--global", dest="global_pruning", action="store_true", default=S, help="rank channels of all layers together"
    )
    g.add_argument("--round-to", type=int, metavar="N", help="keep channel counts multiples of N")
    g.add_argument(
        "--no-bias-compensation",
        dest="bias_compensation",
        action="store_false",
        default=S,
        help="do not fold removed channels' mean output into the next layer's bias",
    )
    g.add_argument(
        "--no-reconstruction",
        dest="reconstruction",
        action="store_false",
        default=S,
        help="fold removed channels by their mean only, not by least squares on the kept ones",
    )
    g.add_argument(
        "--covariance-rows",
        type=int,
        metavar="N",
        help="positions per calibration batch, drawn at random, that feed each layer's channel covariance for "
        "reconstruction (default 256; 0 = every position, slower)",
    )
    g.add_argument(
        "--stats-budget-mib",
        type=int,
        metavar="MIB",
        help="memory for the covariance matrices of reconstruction (default 1024); the narrowest layers get one "
        "until it is spent, the others fold by the mean only",
    )
    g.add_argument(
        "--sequential",
        action="store_true",
        default=S,
        help="calibrate block by block (decoder layers, ViT blocks): one block's activations and hooks at a time",
    )
    g.add_argument(
        "--no-bn-recalibration",
        dest="bn_recalibration",
        action="store_false",
        default=S,
        help="do not recompute BatchNorm statistics after pruning",
    )
    g = p.add_argument_group("data use")
    g.add_argument(
        "--calib-fraction",
        type=float,
        metavar="F",
        help="share of the data used to score channels; the rest measures accuracy (default 0.5)",
    )
    g.add_argument("--calib-batches", type=int, metavar="N", help="use at most N calibration batches")
    g.add_argument("--batch-size", type=int, metavar="B", help="batch size (default 32)")
    g.add_argument("--device", metavar="DEV", help="cpu (default), cuda, cuda:1...")
    g.add_argument("--seed", type=int, metavar="S", help="seed of the data split (default 0)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--latency-repeats", type=int, metavar="N", help="timed runs per latency figure (default 20)")
    g = p.add_argument_group("recovery")
    g.add_argument(
        "--recover-epochs", type=int, metavar="N", help="after pruning, distil from the original for N epochs"
    )
    g.add_argument(
        "--train-data",
        metavar="D",
        help="training data for recovery (same forms as --data); default: the calibration part of --data",
    )
    g.add_argument("--recover-lr", type=float, metavar="LR", help="AdamW learning rate for recovery (default 1e-3)")
    g = p.add_argument_group("output")
    g.add_argument("--out", "-o", metavar="DIR", help="output folder (must not exist or be empty)")
    g.add_argument("--overwrite", action="store_true", default=S, help="replace an existing --out folder")
    g.add_argument(
        "--save-pickle", action="store_true", default=S, help="also write model_full.pt, the whole module pickled"
    )
    g.add_argument("--dry-run", action="store_true", default=S, help="print the plan; write and change nothing")
    g.add_argument("--quiet", "-q", action="store_true", default=S, help="no progress bars or info logs")
    return p


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def _parse_layer_ratios(items: Any, source: str) -> dict[str, float]:
    if isinstance(items, dict):
        pairs = list(items.items())
    elif not isinstance(items, (list, tuple)) and items is not None:
        raise UserError(f"{source}: give layer ratios as a table (pattern = ratio) or a list of 'PATTERN=R' strings.")
    else:
        pairs = []
        for item in items or []:
            if not isinstance(item, str) or "=" not in item:
                raise UserError(f"{source}: {item!r} is not PATTERN=R (e.g. 'layer4.*=0.5').")
            pat, _, r = item.rpartition("=")
            pairs.append((pat, r))
    out = {}
    for pat, r in pairs:
        try:
            out[str(pat)] = float(r)
        except (TypeError, ValueError):
            raise UserError(f"{source}: ratio {r!r} for {pat!r} is not a number.") from None
    return out


def _parse_ratios(value: Any) -> list[float]:
    """``--sensitivity-ratios``: a comma-separated string or a list of numbers in (0, 1)."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        ratios = sorted({float(r) for r in items})
    except (TypeError, ValueError):
        raise UserError(
            f"--sensitivity-ratios {value!r}: give numbers separated by commas, e.g. 0.25,0.5,0.75"
        ) from None
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise UserError(f"--sensitivity-ratios {value!r}: every ratio must be strictly between 0 and 1")
    return ratios


def _check_number(
    cfg: dict,
    key: str,
    kind: type,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = True,
    hi_open: bool = True,
) -> None:
    v = cfg.get(key)
    if v is None:
        return
    flag = "--" + key.replace("_", "-")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise UserError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got {v!r}.")
    if isinstance(v, float) and math.isnan(v):
        raise UserError(f"{flag} is NaN.")
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if bad_lo or bad_hi:
        if hi is not None:
            rng = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        else:
            rng = f"{'>' if lo_open else '>='} {lo}"
        raise UserError(f"{flag}={v} is out of range: it must be {rng}.")


def _apply(cfg: dict[str, Any], sources: dict[str, str], layer: dict[str, Any], source: str) -> None:
    """Lay one source over ``cfg``. A source that names one of ratio/target-flops/target-params
    clears the others from the sources below it; naming two at once is an error."""
    named = [k for k in AMOUNTS if layer.get(k) is not None]
    if len(named) > 1:
        raise UserError(f"the {source} sets more than one of ratio, target-flops and target-params; keep one.")
    for k in AMOUNTS if named else ():
        if k != named[0]:
            cfg[k] = None
            sources[k] = source
    cfg.update(layer)
    sources.update(dict.fromkeys(layer, source))


def resolve_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Defaults < ``--preset`` < ``--config`` < ``CLEANAI_<OPTION>`` variables < command line;
    validated. ``cfg["_sources"]`` says where each option came from."""
    cfg = copy.deepcopy(DEFAULTS)
    sources = dict.fromkeys(DEFAULTS, "default")
    given = dict(vars(args))
    for k in ("command", "_run", "disable_plugin"):
        given.pop(k, None)
    config_file = given.pop("config", None)
    from_file = read_config_file(config_file, DEFAULTS) if config_file else {}
    from_env = env_options(os.environ if environ is None else environ, DEFAULTS)
    preset, where = next(
        ((src.get("preset"), name) for src, name in ((given, "--preset"), (from_env, f"{ENV_PREFIX}PRESET"),
                                                     (from_file, f"preset in {config_file!r}"))
         if src.get("preset") is not None),
        (None, ""),
    )  # fmt: skip
    _apply(cfg, sources, preset_options(preset, where), "preset")
    _apply(cfg, sources, from_file, "config file")
    if config_file:
        cfg["config"] = str(Path(config_file).resolve())
    _apply(cfg, sources, from_env, "environment")
    cfg["layer_ratio"] = _parse_layer_ratios(cfg.get("layer_ratio"), f"layer_ratio from the {sources['layer_ratio']}")
    if "layer_ratio" in given:
        cfg["layer_ratio"].update(_parse_layer_ratios(given.pop("layer_ratio"), "--layer-ratio"))
        sources["layer_ratio"] = "command line"
    if "ignore" in given:
        cfg["ignore"] = list(cfg.get("ignore") or []) + list(given.pop("ignore"))
        sources["ignore"] = "command line"
    # the command line names its amount by flag, so two flags are an error even when one is None
    named = [k for k in AMOUNTS if k in given]
    if len(named) > 1:
        flags = [f"--{k.replace('_', '-')}" for k in named]
        both = f"both {flags[0]} and {flags[1]}" if len(flags) == 2 else "all three"
        raise UserError(f"give one of --ratio, --target-flops and --target-params, not {both}.")
    _apply(cfg, sources, given, "command line")
    if all(cfg.get(k) is None for k in AMOUNTS):
        cfg["ratio"] = DEFAULT_RATIO
        sources["ratio"] = "default"
    if cfg.get("auto") and cfg.get("target_flops") is None and cfg.get("target_params") is None:
        raise UserError("--auto allocates ratios to a target: give --target-flops F or --target-params P with it.")
    preset_options(cfg.get("preset"), "preset")  # a known name, whichever source gave it
    cfg["sensitivity_ratios"] = _parse_ratios(cfg.get("sensitivity_ratios"))
    # specs read from a config file or the environment run code only with --trust-code (see _spec_options)
    untrusted = ("config file", "environment")
    cfg["_from_config"] = sorted(k for k in ("model", "data", "train_data") if sources.get(k) in untrusted)
    cfg["_sources"] = sources
    for key in ("model", "data") + (() if cfg.get("dry_run") else ("out",)):
        if not cfg.get(key):
            raise UserError(f"--{key} is required (on the command line or in --config).")
    _check_number(cfg, "ratio", float, 0.0, 1.0)
    _check_number(cfg, "target_flops", float, 0.0, 1.0)
    _check_number(cfg, "target_params", float, 0.0, 1.0)
    _check_number(cfg, "sensitivity_batches", int, 1, None, lo_open=False)
    _check_number(cfg, "calib_fraction", float, 0.0, 1.0, hi_open=False)
    for key in ("alpha", "beta"):
        _check_number(cfg, key, float, 0.0, None, lo_open=False)
    for key in (
        "round_to",
        "calib_batches",
        "batch_size",
        "num_classes",
        "image_size",
        "seq_len",
        "latency_repeats",
        "threads",
    ):
        _check_number(cfg, key, int, 1, None, lo_open=False)
    _check_number(cfg, "covariance_rows", int, 0, None, lo_open=False)
    _check_number(cfg, "stats_budget_mib", int, 0, None, lo_open=False)
    _check_number(cfg, "recover_epochs", int, 0, None, lo_open=False)
    _check_number(cfg, "recover_lr", float, 0.0, None)
    for pat, r in cfg["layer_ratio"].items():
        if not 0.0 <= r < 1.0:
            raise UserError(
                f"--layer-ratio {pat}={r}: the ratio must be from 0 (keeps the layer whole) up to, not including, 1."
            )
    if (cfg.get("alpha") is not None or cfg.get("beta") is not None) and cfg["importance"] != "weight_activation":
        raise UserError(f"--alpha/--beta apply to the weight_activation importance, not {cfg['importance']!r}.")
    if not isinstance(cfg.get("ignore"), list):
        raise UserError("ignore must be a list of layer patterns.")
    try:
        torch.device(cfg["device"])
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"--device {cfg['device']!r} is not a device (try cpu or cuda).") from exc
    if str(cfg["device"]).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg['device']} was asked for but CUDA is not available; use --device cpu.")
    return cfg


# ---------------------------------------------------------------------------
# Output folder
# ---------------------------------------------------------------------------


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _spec_sources(spec: str | None) -> list[str]:
    """Files an import spec ``package.module:callable`` would be imported from, found on
    ``sys.path`` without importing anything."""
    import re
    import sys

    if not spec or not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", spec):
        return []
    top = spec.partition(":")[0].split(".")[0]
    found = []
    for entry in sys.path:
        base = Path(entry or ".")
        for cand in (base / top, base / f"{top}.py"):
            if cand.exists():
                found.append(str(cand))
    return found


def check_out_dir(out: Path, overwrite: bool, inputs: list[str | None], own_marker: str | None = None) -> None:
    """Refuse an existing non-empty folder unless ``overwrite``; never one holding inputs
    (files, folders, or the source of a ``package.module:factory`` spec)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder path.")
    if out.exists() and (_is_within(Path.cwd(), out) or out.resolve() == Path.home().resolve()):
        raise UserError(f"--out {str(out)!r} is the current folder, a parent of it or your home; give a new folder.")
    for item in [p for spec in inputs for p in [spec, *_spec_sources(spec)]]:
        if not item or not Path(item).exists():
            continue
        if _is_within(Path(item), out):
            raise UserError(f"--out {str(out)!r} contains your input {item!r}; choose another folder.")
        if Path(item).is_dir() and _is_within(out, Path(item)):
            raise UserError(f"--out {str(out)!r} is inside your input folder {item!r}; choose another folder.")
    if out.is_dir() and any(out.iterdir()):
        if own_marker and (out / own_marker).is_file():
            return
        if not overwrite:
            raise UserError(f"--out {str(out)!r} exists and is not empty; choose a new folder or add --overwrite.")


def _guard_out(out: Path, stack: contextlib.ExitStack) -> tuple[Any, Any]:
    """Lock ``out``, probe that it can be written and remember what it holds; returns the
    check to run at the moment of the commit and the snapshot it compares with."""
    from cleanai_core.out_folder import folder_lock, snapshot, target_of, write_probe

    stack.enter_context(folder_lock(out))
    write_probe(out)
    target = target_of(out)
    start = snapshot(target)

    def check() -> None:
        import sys

        now = snapshot(target)
        if now != start:
            changed = sorted(set(now or {}) ^ set(start or {})) or sorted(now or {})
            raise UserError(
                f"while this run was going, --out {str(out)!r} changed ({', '.join(changed[:5]) or 'replaced'}); "
                "nothing in it was deleted and the result was not written. Use a folder nobody else writes to, "
                "and run again."
            )
        if start:
            used = [m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
            inside = [f for f in used if _is_within(Path(f), target)]
            if inside:
                raise UserError(
                    f"--out {str(out)!r} holds code this run imported ({inside[0]!r}); replacing the folder would "
                    "delete it. Choose another --out."
                )

    return check, start


# ---------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------


def _first_input(dataset: Any) -> Any:
    from cleanai_core.calibration import split_batch

    item = dataset[0]
    if isinstance(item, dict):  # labels are not inputs
        return {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else v) for k, v in split_batch(item)[0].items()}
    if isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise UserError(f"data items must be tensors or (input, label) pairs; got {type(item).__name__}.")
    return item.unsqueeze(0)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _has_labels(dataset: Any) -> bool:
    from cleanai_core.calibration import split_batch

    item = dataset[0]
    if isinstance(item, dict):
        return split_batch(item)[1] is not None
    return isinstance(item, (tuple, list)) and len(item) >= 2


def _accuracy_note(note: str | None, *results: dict[str, Any] | None) -> str | None:
    """Why the report has no accuracy (``None`` when it has one)."""
    if note or all(r and r.get("accuracy") is not None for r in results):
        return note
    notes = [r.get("accuracy_note") for r in results if r and r.get("accuracy_note")]
    return notes[0] if notes else "no installed evaluator measures this model's output"


def _evaluate(pm: Any, model: Any, loader: Any, device: torch.device) -> dict[str, float] | None:
    if loader is None:
        return None
    return pm.hook.cleanai_evaluate(model=model, loader=loader, device=device)


LATENCY_ROUNDS = 5


def _latencies(before: Any, after: Any, example: Any, repeats: int) -> tuple[float, float, int]:
    """Median CPU milliseconds of one forward pass of each model, measured in alternating
    rounds so that a change in machine load hits both alike. Returns (before, after,
    timed runs per model)."""
    import statistics

    from cleanai_core.metrics import measure_latency

    cpu = torch.device("cpu")
    x = _to(example, cpu)
    models = [copy.deepcopy(m).cpu().eval() for m in (before, after)]
    per_round = max(1, math.ceil(repeats / LATENCY_ROUNDS))
    times: list[list[float]] = [[], []]
    for _ in range(LATENCY_ROUNDS):
        for k, m in enumerate(models):
            times[k].append(measure_latency(m, x, repeats=per_round, warmup=1))
    return (round(statistics.median(times[0]), 4), round(statistics.median(times[1]), 4),
            per_round * LATENCY_ROUNDS)  # fmt: skip


def _spec_options(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    """Consent for ``--model``/``--data``: a spec typed on the command line may name code to
    import and call; one read from ``--config`` only with ``--trust-code``."""
    from_config = key in (cfg.get("_from_config") or ())
    source = f"--{key}"
    if from_config and (cfg.get("_sources") or {}).get(key) == "environment":
        source = f"{ENV_PREFIX}{key.upper()} in the environment"
    elif from_config:
        source = f"{key} in config file {cfg.get('config')!r}"
    return {"trust_code": bool(cfg.get("trust_code")) or not from_config, "spec_source": source}


def _model_options(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "weights": cfg.get("weights"),
        "trust_model": bool(cfg.get("trust_model")),
        "num_classes": cfg.get("num_classes"),
        "pretrained": False,
        **_spec_options(cfg, "model"),
    }


def load_inputs(cfg: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Model (eval mode, on the device), data set and the plugin manager."""
    from cleanai_core.plugins import get_plugin_manager
    from cleanai_plugins.io.loaders import DATA_FORMS, MODEL_FORMS

    pm = get_plugin_manager()
    data = cfg["data"]
    if not Path(data).exists() and (Path(data).suffix or "/" in data or os.sep in data) and ":" not in data:
        raise UserError(f"--data {data!r}: no such file or folder. Give {DATA_FORMS}.")
    model = pm.hook.cleanai_load_model(spec=cfg["model"], options=_model_options(cfg))
    if model is None:
        hint = " (no such file)" if ("/" in cfg["model"] or "." in Path(cfg["model"]).suffix) else ""
        raise UserError(f"--model {cfg['model']!r}{hint}: not a model this tool can load. Give {MODEL_FORMS}.")
    model = model.eval().to(cfg["device"])
    dataset = pm.hook.cleanai_load_dataset(
        spec=cfg["data"],
        options={
            "model": model,
            "image_size": cfg.get("image_size"),
            "seq_len": cfg.get("seq_len"),
            **_spec_options(cfg, "data"),
        },
    )
    if dataset is None:
        raise UserError(
            f"--data {cfg['data']!r}: no such file or folder, or not a form this tool reads. Give {DATA_FORMS}."
        )
    if len(dataset) < 2:
        raise UserError(f"--data {cfg['data']!r} has {len(dataset)} item(s); at least 2 are needed.")
    return model, dataset, pm


def split_dataset(dataset: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Seeded random split into (calibration, held-out evaluation); evaluation is ``None``
    when ``fraction`` is 1."""
    from torch.utils.data import Subset

    n = len(dataset)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_cal = n if fraction >= 1.0 else min(max(1, int(round(n * fraction))), n - 1)
    calib = Subset(dataset, perm[:n_cal])
    held = Subset(dataset, perm[n_cal:]) if n_cal < n else None
    return calib, held


def execute(
    cfg: dict[str, Any], model: Any = None, dataset: Any = None, spec_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Run the whole job for a resolved config. Returns the report (``None`` for a dry run).

    ``model``/``dataset`` may be given directly (``cleanai demo``); ``cfg['model']`` must
    then still be a spec that rebuilds the architecture."""
    quiet = bool(cfg.get("quiet"))
    logging.getLogger("cleanai").setLevel(logging.WARNING if quiet else logging.INFO)
    out = Path(cfg["out"]) if cfg.get("out") else None
    user_inputs = [cfg.get("model"), cfg.get("data"), cfg.get("weights"), cfg.get("config"), cfg.get("train_data")]
    with contextlib.ExitStack() as guard:
        at_commit = (None, None)
        if out is not None and not cfg.get("dry_run") and distributed.is_writer():
            check_out_dir(out, bool(cfg.get("overwrite")), user_inputs, own_marker=cfg.get("_own_marker"))
            at_commit = _guard_out(out, guard)
        return _execute(cfg, model, dataset, spec_options, out, at_commit)


def _execute(
    cfg: dict[str, Any],
    model: Any,
    dataset: Any,
    spec_options: dict[str, Any] | None,
    out: Path | None,
    at_commit: tuple[Any, Any],
) -> dict[str, Any] | None:
    from torch.utils.data import DataLoader

    from cleanai_core import io as cio
    from cleanai_core.metrics import count_flops, count_params
    from cleanai_core.out_folder import staged_folder
    from cleanai_core.plugins import get_plugin_manager
    from cleanai_core.pruner import StructuredPruner
    from cleanai_core.report import headline_text, write_report
    from cleanai_core.scoring import get_importance

    quiet = bool(cfg.get("quiet"))
    torch.manual_seed(int(cfg["seed"]))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = torch.device(cfg["device"])
    t0 = time.time()
    if model is None or dataset is None:
        model, dataset, pm = load_inputs(cfg)
    else:
        pm = get_plugin_manager()
        model = model.eval().to(device)
    calib, held = split_dataset(dataset, float(cfg["calib_fraction"]), int(cfg["seed"]))
    bs = int(cfg["batch_size"])
    stats_part, sens_loader = calib, None
    if cfg.get("auto") or cfg.get("sensitivity"):  # trials on batches the statistics (and compensation) never saw
        from torch.utils.data import Subset

        n_sens = min(int(cfg["sensitivity_batches"]) * bs, len(calib) // 3)
        if n_sens < 1:
            raise UserError(f"--auto/--sensitivity need at least 3 calibration samples; there are {len(calib)}.")
        stats_part = Subset(calib, range(len(calib) - n_sens))
        sens_loader = DataLoader(Subset(calib, range(len(calib) - n_sens, len(calib))), batch_size=bs)
    calib_loader = distributed.shard(DataLoader(stats_part, batch_size=bs, shuffle=False))  # this rank's share
    eval_loader = DataLoader(held, batch_size=bs, shuffle=False) if held is not None and _has_labels(held) else None
    accuracy_note = None
    if held is None:
        accuracy_note = "--calib-fraction 1: all data scores channels, none is left to measure accuracy"
    elif eval_loader is None:
        accuracy_note = "the data has no labels"
    example = _to(_first_input(calib), device)
    try:
        with torch.no_grad():
            model(example) if not isinstance(example, dict) else model(**example)
    except Exception as exc:
        shape = tuple(example.shape) if isinstance(example, torch.Tensor) else "dict"
        raise UserError(
            f"the model failed on an input from --data (shape {shape}): {type(exc).__name__}: {str(exc)[:300]}. "
            "Check that the data matches what the model expects (channels, image size, --num-classes)."
        ) from exc

    importance_opts: dict[str, Any] = {}
    if cfg.get("alpha") is not None:
        importance_opts["weight_ratio"] = float(cfg["alpha"])
    if cfg.get("beta") is not None:
        importance_opts["activation_ratio"] = float(cfg["beta"])
    importance = get_importance(cfg["importance"], **importance_opts)
    pruner = StructuredPruner(
        model,
        example,
        importance=importance,
        pruning_ratio=float(cfg["ratio"]) if cfg.get("ratio") is not None else DEFAULT_RATIO,
        layer_pruning_ratios=cfg.get("layer_ratio") or None,
        ignored_layers=list(cfg.get("ignore") or []) or None,
        global_pruning=bool(cfg.get("global_pruning")),
        round_to=cfg.get("round_to"),
        target_flops=None if cfg.get("auto") else cfg.get("target_flops"),
        target_params=None if cfg.get("auto") else cfg.get("target_params"),
        prune_dead_only=bool(cfg.get("prune_dead_only")),
        bias_compensation=bool(cfg.get("bias_compensation")),
        reconstruction=bool(cfg.get("reconstruction")),
        covariance_rows=int(cfg["covariance_rows"]),
        stats_budget_bytes=int(cfg["stats_budget_mib"]) << 20,
        recalibrate_bn=bool(cfg.get("bn_recalibration")),
    )
    pruner.collect_activations(
        calib_loader, num_batches=cfg.get("calib_batches"), progress=not quiet, sequential=bool(cfg.get("sequential"))
    )
    sensitivity = None
    if cfg.get("auto") or cfg.get("sensitivity"):
        from cleanai_core.cli.auto import sensitivity_and_ratios

        sensitivity = sensitivity_and_ratios(cfg, pruner, sens_loader, progress=not quiet)
    if cfg.get("dry_run"):
        summary = pruner.plan().summary()
        if distributed.is_writer():
            print(summary)
        return None
    if not distributed.is_writer():  # rank 0 evaluates and writes; the others take part in pruning
        pruner.prune()
        return None

    before_acc = _evaluate(pm, model, eval_loader, device)
    params_before, flops_before = count_params(model), count_flops(model, example)
    repeats = int(cfg.get("latency_repeats") or 20)
    pruned = pruner.prune()
    after_acc = _evaluate(pm, pruned, eval_loader, device)
    recovery = None
    if cfg.get("recover_epochs"):
        from cleanai_core.cli.recovery import recover_for_report

        acc = lambda m: (_evaluate(pm, m, eval_loader, device) or {}).get("accuracy")
        accs = (before_acc or {}).get("accuracy"), (after_acc or {}).get("accuracy")
        pruned, recovery = recover_for_report(cfg, pm, model, pruned, calib, acc, *accs)
        after_acc = {"accuracy": recovery["accuracy_recovered"]} if eval_loader is not None else None
    lat_before, lat_after, repeats = _latencies(model, pruned, example, repeats)

    report = {
        "model": cfg["model"],
        "data": cfg["data"],
        "params_before": params_before,
        "params_after": count_params(pruned),
        "flops_before": flops_before,
        "flops_after": count_flops(pruned, example),
        "flops_note": "FLOPs of one forward pass on one input (FLOPs = 2 x MACs)",
        "latency_before_ms": lat_before,
        "latency_after_ms": lat_after,
        "latency": {
            "device": "cpu",
            "batch_size": 1,
            "repeats": repeats,
            "method": f"median over {LATENCY_ROUNDS} alternating rounds of before/after",
            "statistic": "median",
            "threads": torch.get_num_threads(),
        },
        "accuracy_before": before_acc.get("accuracy") if before_acc else None,
        "accuracy_after": after_acc.get("accuracy") if after_acc else None,
        "accuracy_note": _accuracy_note(accuracy_note, before_acc, after_acc),
        "perplexity_before": before_acc.get("perplexity") if before_acc else None,
        "perplexity_after": after_acc.get("perplexity") if after_acc else None,
        "evaluation_tokens": after_acc.get("tokens") if after_acc else None,
        "calibration_samples": len(calib),
        "evaluation_samples": len(held) if held is not None else 0,
        "input_shape": list(example.shape) if isinstance(example, torch.Tensor) else None,
        "recovery": recovery,
    }
    lib = pruner.report()
    for key in ("importance", "pruning_ratio", "skipped_groups", "groups", "layers", "dead_units"):
        report[key] = lib.get(key)
    report["target_flops"] = cfg.get("target_flops")
    if cfg.get("target_flops") is not None:
        report["pruning_ratio"] = None
    if sensitivity is not None:
        report.update(sensitivity)
    report["seconds"] = round(time.time() - t0, 2)

    arch_options = dict(spec_options or {})
    if cfg.get("num_classes") is not None:
        arch_options.setdefault("num_classes", cfg["num_classes"])
    # the options, then where each came from; --config reads it back and skips the "_" keys
    resolved = {k: v for k, v in cfg.items() if not k.startswith("_")}
    resolved["_sources"] = cfg.get("_sources") or {}
    with staged_folder(out, check=at_commit[0], expected=at_commit[1]) as tmp:
        spec = str(Path(cfg["model"]).resolve()) if Path(cfg["model"]).is_file() else cfg["model"]
        cio.save_pruned(
            tmp,
            pruned.cpu(),
            pruner.history,
            spec,
            options=arch_options,
            save_pickle=bool(cfg.get("save_pickle")),
            example_input_shape=report["input_shape"],
        )
        cio.atomic_write_text(tmp / "config.json", json.dumps(resolved, indent=2, default=str) + "\n")
        if cfg.get("_own_marker"):
            cio.atomic_write_text(tmp / cfg["_own_marker"], "written by cleanai demo\n")
        for extra in pm.hook.cleanai_save_outputs(
            model=pruned.cpu().eval(), folder=tmp, options={"example": example, "model_spec": cfg["model"]}
        ):
            report.update(extra or {})
        report = write_report(tmp, report)
    if True:  # the headline is the result: printed even with --quiet
        print(headline_text(report))
        if report["accuracy_note"]:
            print(f"Accuracy not measured: {report['accuracy_note']}.")
        print(
            f"wrote {out}/: model.pt, history.json, architecture.json, config.json, report.json, report.md, "
            f"{report['plot']}"
            + (", model_full.pt" if cfg.get("save_pickle") else "")
            + (f", {report['recovery_plot']}" if recovery else "")
            + (f", {report['hf_folder']}/" if report.get("hf_folder") else "")
        )
    return report


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    cfg["device"], started = distributed.init_from_env(cfg["device"])
    try:
        execute(cfg)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0
