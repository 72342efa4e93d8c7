"""The options of a pruning job, documented once.

:class:`PruneConfig` lists every option of ``cleanai prune`` / :func:`cleanai_core.job.run_job`:
its name is the config-file key (TOML, YAML, JSON), the ``config.json`` key, the
``CLEANAI_<NAME>`` environment variable and, with ``-`` for ``_``, the command-line flag
(the parser is generated from these fields, see :mod:`cleanai_core.cli.prune`). Where
:class:`~cleanai_core.pruner.StructuredPruner` spells an option differently, its name is
an alias everywhere (``pruning_ratio`` for ``ratio``, ``ignored_layers`` for ``ignore``,
``layer_pruning_ratios`` for ``layer_ratio``, ``recalibrate_bn`` for ``bn_recalibration``)
and :func:`pruner_options` is the one place that maps them.

Options come from (lowest to highest priority) the defaults, ``--preset``, ``--config FILE``,
``CLEANAI_<OPTION>`` variables and the command line (:func:`resolve_config`).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from cleanai_core.bn_correction import BN_SAMPLES
from cleanai_core.calibration import COVARIANCE_BUDGET_BYTES, COVARIANCE_ROWS
from cleanai_core.config_sources import ENV_PREFIX, PRESETS, env_options, preset_options, read_config_file
from cleanai_core.device_defaults import default_round_to
from cleanai_core.errors import UserError
from cleanai_core.options import plain_number
from cleanai_core.runtime import checked_device
from cleanai_core.special_files import check_given_paths

__all__ = [
    "API_NAMES",
    "DEFAULTS",
    "DEFAULT_RATIO",
    "MAX_IMAGE_SIZE",
    "MAX_LATENCY_REPEATS",
    "PruneConfig",
    "check_config_paths",
    "check_unread",
    "option_fields",
    "pruner_options",
    "recorded_config",
    "resolve_config",
]

DEFAULT_RATIO = 0.3

#: job option -> StructuredPruner keyword, where they differ
API_NAMES = {
    "ratio": "pruning_ratio",
    "ignore": "ignored_layers",
    "layer_ratio": "layer_pruning_ratios",
    "bn_recalibration": "recalibrate_bn",
}


def _opt(default: Any, help: str, group: str, *flags: str, **parser: Any) -> Any:
    """A field with its command-line help, group and flags (``flags`` besides ``--name``;
    ``parser``: argparse keywords such as ``type``, ``metavar``, ``choices``)."""
    return attrs.field(default=default, metadata={"help": help, "group": group, "flags": flags, "parser": parser})


def _preset_help() -> str:
    def show(v: Any) -> str:
        return "on" if v is True else "off" if v is False else "none" if v is None else str(v)

    return "; ".join(
        f"{name}: " + ", ".join(f"{k.replace('_', '-')} {show(v)}" for k, v in values.items())
        for name, values in PRESETS.items()
    )


@attrs.define(kw_only=True)
class PruneConfig:
    """Every option of a pruning job (see the module docstring for how they are named).
    ``PruneConfig(model="timm:resnet18", data="imgs/", out="out/")``; :func:`run_job`
    takes it (or the same keys as a dict)."""

    # inputs
    model: str | None = _opt(None, "timm:NAME, torchvision:NAME, hf:FOLDER_OR_NAME (transformers, no download), "
                             "package.module:factory, a pickled model file, or a folder cleanai prune wrote (to "
                             "prune it further)", "inputs", "-m",
                             metavar="M")  # fmt: skip
    weights: str | None = _opt(None, "state_dict to load into the model (torch.save(sd, FILE))", "inputs",
                               metavar="FILE")  # fmt: skip
    num_classes: int | None = _opt(None, "classes of the model's head (timm/torchvision)", "inputs", type=int,
                                   metavar="N")  # fmt: skip
    trust_model: bool = _opt(False, "allow loading a pickled model file (unpickling runs code from the file)", "inputs")
    trust_code: bool = _opt(False, "allow package.module:callable specs read from --config (importing and calling "
                            "them runs code); specs typed on the command line need no flag. Also needed for an "
                            "hf: folder whose config.json names code of its own (auto_map)", "inputs")  # fmt: skip
    data: str | None = _opt(None, "image folder (class sub-folders), .pt tensor file, .npz (x, y), "
                            "package.module:function; for hf: models also .txt (a document per line), .jsonl "
                            "(text, label) or tokenized .pt", "inputs", "-d", metavar="D")  # fmt: skip
    image_size: int | None = _opt(None, "image side for image folders", "inputs", type=int, metavar="PX")
    seq_len: int | None = _opt(None, "tokens per text block or document (default 128)", "inputs", type=int,
                               metavar="N")  # fmt: skip
    # pruning
    preset: str | None = _opt(None, f"a starting point the other sources override ({_preset_help()})", "pruning",
                              choices=tuple(PRESETS))  # fmt: skip
    ratio: float | None = _opt(None, f"share of channels to remove per group (default {DEFAULT_RATIO})", "pruning",
                               "-r", "--pruning-ratio", type=float, metavar="R")  # fmt: skip
    target_flops: float | None = _opt(None, "instead of --ratio: keep this share of FLOPs", "pruning", type=float,
                                      metavar="F")  # fmt: skip
    target_latency: float | None = _opt(None, "with --auto, instead of --ratio: keep this share of the measured "
                                        "latency (batch 1, on --device)", "pruning", type=float,
                                        metavar="L")  # fmt: skip
    target_params: float | None = _opt(None, "instead of --ratio: keep this share of the parameters", "pruning",
                                       type=float, metavar="P")  # fmt: skip
    auto: bool = _opt(False, "with --target-flops or --target-params: per-layer ratios from a sensitivity analysis "
                      "(each layer pruned alone, measured on part of the calibration data), instead of one ratio "
                      "for all", "pruning")  # fmt: skip
    sensitivity: bool = _opt(False, "measure every layer's sensitivity and add it (table and curves) to the report",
                             "pruning")  # fmt: skip
    sensitivity_batches: int = _opt(2, "calibration batches set aside for the sensitivity trials (default 2); the "
                                    "rest stream the statistics", "pruning", type=int, metavar="N")  # fmt: skip
    sensitivity_ratios: list = _opt(attrs.Factory(lambda: [0.25, 0.5, 0.75]), "ratios each layer is tried at "
                                    "(default 0.25,0.5,0.75)", "pruning", metavar="R,R,...")  # fmt: skip
    prune_dead_only: bool = _opt(False, "remove exactly the units that never activate on the calibration data "
                                 "(outputs unchanged)", "pruning")  # fmt: skip
    importance: str = _opt("weight_activation", "weight_activation (default), magnitude, bn_scale, taylor, hessian, "
                           "random, lamp", "pruning", metavar="NAME")  # fmt: skip
    alpha: float | None = _opt(None, "weight_activation: weight of the weight term", "pruning", type=float,
                               metavar="A")  # fmt: skip
    beta: float | None = _opt(None, "weight_activation: weight of the activation term", "pruning", type=float,
                              metavar="B")  # fmt: skip
    ignore: list = _opt(attrs.Factory(list), "layer name, glob or class name whose output channels are kept "
                        "(repeatable)", "pruning", "--ignored-layers", action="append",
                        metavar="PATTERN")  # fmt: skip
    layer_ratio: dict = _opt(attrs.Factory(dict), "per-layer ratio (repeatable)", "pruning",
                             "--layer-pruning-ratios", action="append", metavar="PATTERN=R")  # fmt: skip
    global_pruning: bool = _opt(False, "rank channels of all layers together", "pruning", "--global")
    isomorphic: bool = _opt(False, "with --global: rank channels only among groups of the same structure (all "
                            "attention-head groups, all MLP groups, convs of one shape), each set losing the "
                            "ratio", "pruning")  # fmt: skip
    round_to: int | None = _opt(None, "keep channel counts multiples of N (default: what pays on --device: none on "
                                "cpu, 8 on cuda; 1 = no rounding)", "pruning", type=int, metavar="N")  # fmt: skip
    round_mode: str = _opt("up", "how --round-to rounds a kept count: up, or to the nearest multiple (on cpu, NCHW: "
                           "--round-to 16 --round-mode nearest is as fast as no rounding and keeps more channels)",
                           "pruning", choices=("up", "nearest"))  # fmt: skip
    bias_compensation: bool = _opt(True, "do not fold removed channels' mean output into the next layer's bias",
                                   "pruning")  # fmt: skip
    reconstruction: bool = _opt(True, "fold removed channels by their mean only, not by least squares on the kept "
                                "ones", "pruning")  # fmt: skip
    covariance_rows: int = _opt(COVARIANCE_ROWS, "positions per calibration batch, drawn at random, that feed each "
                                "layer's channel covariance for reconstruction (default 256; 0 = every position, "
                                "slower)", "pruning", type=int, metavar="N")  # fmt: skip
    stats_budget_mib: int = _opt(COVARIANCE_BUDGET_BYTES >> 20, "memory for the covariance matrices of "
                                 "reconstruction (default 1024); the narrowest layers get one until it is spent, the "
                                 "others fold by the mean only", "pruning", type=int, metavar="MIB")  # fmt: skip
    sequential: bool = _opt(False, "calibrate block by block (decoder layers, ViT blocks): one block's activations "
                            "and hooks at a time", "pruning")  # fmt: skip
    bn_samples: int = _opt(BN_SAMPLES, "calibration samples the BatchNorm correction reads, in batches spread over "
                           "the data (default 256; 0 = all): its cost stops growing with the calibration set",
                           "pruning", type=int, metavar="N")  # fmt: skip
    bn_recalibration: bool = _opt(True, "do not correct BatchNorm statistics after pruning", "pruning",
                                  "--no-recalibrate-bn")  # fmt: skip
    # data use
    calib_fraction: float = _opt(0.5, "share of the data used to score channels; the rest measures accuracy "
                                 "(default 0.5)", "data use", type=float, metavar="F")  # fmt: skip
    calib_batches: int | None = _opt(None, "use at most N calibration batches", "data use", type=int, metavar="N")
    batch_size: int = _opt(32, "batch size (default 32)", "data use", type=int, metavar="B")
    device: str = _opt("cpu", "cpu (default), cuda, cuda:1...", "data use", metavar="DEV")
    seed: int = _opt(0, "seed of the data split (default 0)", "data use", type=int, metavar="S")
    threads: int | None = _opt(None, "CPU threads for torch (default: torch's choice)", "data use", type=int,
                               metavar="N")  # fmt: skip
    latency_repeats: int = _opt(20, "timed runs per latency figure (default 20)", "data use", type=int, metavar="N")
    # recovery
    recover_epochs: int = _opt(0, "after pruning, distil from the original for N epochs", "recovery", type=int,
                               metavar="N")  # fmt: skip
    train_data: str | None = _opt(None, "training data for recovery (same forms as --data); default: the "
                                  "calibration part of --data", "recovery", metavar="D")  # fmt: skip
    recover_lr: float = _opt(1e-3, "AdamW learning rate for recovery (default 1e-3)", "recovery", type=float,
                             metavar="LR")  # fmt: skip
    # output
    out: str | None = _opt(None, "output folder (must not exist or be empty)", "output", "-o", metavar="DIR")
    overwrite: bool = _opt(False, "replace an existing --out folder", "output")
    save_pickle: bool = _opt(False, "also write model_full.pt, the whole module pickled", "output")
    dry_run: bool = _opt(False, "print the plan; write and change nothing", "output")
    quiet: bool = _opt(False, "no progress bars or info logs", "output", "-q")

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def option_fields() -> tuple[attrs.Attribute, ...]:
    return attrs.fields(PruneConfig)


DEFAULTS: dict[str, Any] = PruneConfig().to_dict()

CONFIG_HELP = (
    "read options from a .toml, .yaml/.yml or .json file (a config.json of an earlier run reproduces it); "
    f"precedence: command line > {ENV_PREFIX}<OPTION> environment variables > config file > --preset > defaults"
)


def pruner_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """:class:`~cleanai_core.pruner.StructuredPruner` keywords for a resolved job config
    (``--auto`` leaves the targets to the allocation)."""
    auto, dead = bool(cfg.get("auto")), bool(cfg.get("prune_dead_only"))
    return {
        API_NAMES["ratio"]: float(cfg["ratio"]) if cfg.get("ratio") is not None else DEFAULT_RATIO,
        API_NAMES["layer_ratio"]: cfg.get("layer_ratio") or None,
        API_NAMES["ignore"]: list(cfg.get("ignore") or []) or None,
        # a preset's ranking and rounding do not apply to the dead units (given, they are refused)
        "global_pruning": bool(cfg.get("global_pruning")) and not dead,
        "isomorphic": bool(cfg.get("isomorphic")) and not dead,
        "round_to": cfg.get("round_to") if cfg.get("round_to") is not None and not dead else "auto",
        "round_mode": cfg.get("round_mode") or "up",
        "target_flops": None if auto else cfg.get("target_flops"),
        "target_params": None if auto else cfg.get("target_params"),
        "prune_dead_only": bool(cfg.get("prune_dead_only")),
        "bias_compensation": bool(cfg.get("bias_compensation")),
        "reconstruction": bool(cfg.get("reconstruction")),
        "covariance_rows": int(cfg["covariance_rows"]),
        "stats_budget_bytes": int(cfg["stats_budget_mib"]) << 20,
        API_NAMES["bn_recalibration"]: bool(cfg.get("bn_recalibration")),
        "bn_samples": int(cfg["bn_samples"]),
    }


AMOUNTS = ("ratio", "target_flops", "target_params", "target_latency")


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
            if "=" in pat:  # 'a=0.5,b=0.2' or 'a=0.5=0.3': the pattern 'a=0.5,b' matched no layer
                raise UserError(
                    f"{source}: {item!r} holds more than one '='; give one PATTERN=R per --layer-ratio "
                    "(e.g. --layer-ratio 'layer3.*=0.3' --layer-ratio 'layer4.*=0.5')."
                )
            pairs.append((pat, r))
    out: dict[str, float] = {}
    for pat, r in pairs:
        try:
            value = float(r)
        except (TypeError, ValueError):
            raise UserError(f"{source}: ratio {r!r} for {pat!r} is not a number.") from None
        if str(pat) in out and out[str(pat)] != value:  # the later one silently won
            raise UserError(
                f"{source}: {str(pat)!r} is given twice, with ratios {out[str(pat)]:g} and {value:g}; give it once."
            )
        out[str(pat)] = value
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


# options whose value is text (a path, a spec, a name); the rest of the non-numbers are switches
_TEXT = ("model", "weights", "data", "preset", "importance", "device", "train_data", "out")
#: the text options that name files or folders (a ``~`` from a config file or the environment is the home)
_PATHS = ("model", "weights", "data", "train_data", "out")


def max_threads() -> int:
    """The most ``--threads`` accepted: 4 per CPU (far more threads than CPUs only slows
    torch down, and tens of thousands make OpenMP abort the process)."""
    return 4 * (os.cpu_count() or 1)


def _check_kinds(cfg: dict, sources: dict[str, str]) -> None:
    """Switches are true or false and text options are text, whatever source gave them: a
    config file's ``overwrite = "false"`` is refused rather than read as true."""
    for key, default in DEFAULTS.items():
        v = cfg.get(key)
        if v is None:
            continue
        flag, where = "--" + key.replace("_", "-"), sources.get(key, "default")
        if isinstance(default, bool):
            if isinstance(v, int) and v in (0, 1):  # bool, or 0/1 from JSON
                cfg[key] = bool(v)
                continue
            raise UserError(f"{flag} is a switch: give true or false, not {v!r} (from the {where}).")
        if key in _TEXT:
            if isinstance(v, os.PathLike):
                cfg[key] = os.fspath(v)
            elif not isinstance(v, str):
                raise UserError(f"{flag} must be text (a name or a path), not {v!r} (from the {where}).")
            if key in _PATHS and where in ("config file", "environment") and cfg[key].startswith("~"):
                # no shell expands a config file's "~/pruned": --out made a folder named "~" in the working folder
                cfg[key] = os.path.expanduser(cfg[key])
            if "\x00" in cfg[key]:  # --out: "ValueError: embedded null byte", blamed on the user's code (exit 1)
                raise UserError(f"{flag} {cfg[key]!r} holds a NUL character (\\x00), which no name or path can hold "
                                f"(from the {where}); remove it.")  # fmt: skip


#: the largest ``--image-size``: one 3 x 8192 x 8192 float32 image is 805 MB
MAX_IMAGE_SIZE = 8192
#: the most ``--latency-repeats``: 10,000 timed runs of a 100 ms model are 17 minutes per
#: model (``--latency-repeats 1000000000000`` ran until it was killed, nothing said)
MAX_LATENCY_REPEATS = 10_000

#: options read only where another is set: ``(option, whether it is read, why not and the
#: fix)``. Given without it, they were ignored without a word (``--recover-lr 0.1`` with no
#: recovery, ``--sensitivity-ratios`` with no sensitivity analysis)
_READ_ONLY_WITH = (
    # cleanai sensitivity prunes nothing and writes no model: recovery, the pickle and the dead
    # units' pruning were skipped with exit 0
    *((key, lambda c: not c.get("_analysis_only"),
       "is not read by cleanai sensitivity, which prunes nothing and writes no model: leave {flag} out, or run "
       "cleanai prune") for key in ("recover_epochs", "save_pickle", "prune_dead_only")),
    ("ratio", lambda c: not c.get("_analysis_only"),
     "is not read by cleanai sensitivity, which tries each layer at --sensitivity-ratios: give those instead"),
    *((key, lambda c: not c.get("_analysis_only") or c.get("auto"),
       "is read by cleanai sensitivity only with --auto (the per-layer ratios it allocates): add --auto, or leave "
       "{flag} out") for key in ("target_flops", "target_params")),
    ("recover_lr", lambda c: c.get("recover_epochs"),
     "is the learning rate of recovery, which runs only with --recover-epochs N (N >= 1): add it, or leave {flag} out"),
    ("sensitivity_batches", lambda c: c.get("sensitivity") or c.get("auto"),
     "is read by the sensitivity analysis, which runs only with --sensitivity or --auto: add one, or leave {flag} out"),
    ("sensitivity_ratios", lambda c: c.get("sensitivity") or c.get("auto"),
     "is read by the sensitivity analysis, which runs only with --sensitivity or --auto: add one, or leave {flag} out"),
    ("bn_samples", lambda c: c.get("bn_recalibration"),
     "is read by the BatchNorm recalibration, which --no-bn-recalibration turns off: drop one of them"),
    # reconstruction folds into the bias compensation: --no-bias-compensation turns it off too
    ("covariance_rows", lambda c: c.get("reconstruction") and c.get("bias_compensation"),
     "feeds the covariances of reconstruction, which {off} turns off: drop one of them"),
    ("stats_budget_mib", lambda c: c.get("reconstruction") and c.get("bias_compensation"),
     "is the memory for the covariances of reconstruction, which {off} turns off: drop one of them"),
    # files whose tensors or text are read as they are: --image-size 16 with a .pt ran without a word (--seq-len
    # with token ids in a .pt stays quiet: shared argument lists of text runs carry it for every kind of data)
    ("image_size", lambda c: not _data_files_only(c, (".pt", ".pth", ".npz", ".txt", ".jsonl")),
     "sizes the images of an image folder (or a data function that takes it), and the data is read from tensor "
     "or text files as it is: leave {flag} out"),
    ("round_mode", lambda c: c.get("round_to") is not None or default_round_to(c.get("device")) is not None,
     "says how --round-to rounds, and no rounding is on (no --round-to, and none is the default on --device "
     "{device}): add --round-to N, or leave {flag} out"),
)  # fmt: skip


def _data_files_only(cfg: Mapping[str, Any], suffixes: tuple[str, ...]) -> bool:
    """Whether ``--data`` and ``--train-data`` (where given) are files with one of ``suffixes``."""
    sources = [cfg.get("data"), cfg.get("train_data")]
    given = [s for s in sources if isinstance(s, str) and s]
    return bool(given) and all(os.path.isfile(s) and os.path.splitext(s)[1].lower() in suffixes for s in given)


def _asks(value: Any, key: str, where: str, baseline: Mapping[str, Any]) -> bool:
    """Whether an option from ``where`` asks for something (``--round-to 1`` rounds nothing).
    From a file or the environment, what the defaults and the preset give is not asked: a
    ``config.json`` of an earlier run holds every option (a ``--prune-dead-only`` run's was
    refused for its default ratio 0.3)."""
    if where in ("default", "preset") or not value or (key == "round_to" and value == 1):
        return False
    return where == "command line" or value != baseline.get(key)


def check_unread(cfg: dict[str, Any], rules: tuple = _READ_ONLY_WITH) -> None:
    """Refuse an option the user gave (not a default or a preset's, and not the default's
    value: a ``config.json`` of an earlier run holds every option) that the job would not
    read, since the option it goes with is off. Run on the job's final options (``cleanai
    sensitivity`` sets ``sensitivity`` itself). From a config file or the environment, which
    serve many runs, it is a warning. ``rules``: ``(option, whether it is read, why not)``
    (:func:`cleanai_core.job.run.check_model_reads` passes the ones the model decides)."""
    import logging

    sources = cfg.get("_sources", {})
    for key, read, why in rules:
        where = sources.get(key, "default")
        if where in ("default", "preset") or cfg.get(key) == DEFAULTS[key] or read(cfg):
            continue
        flag = "--" + key.replace("_", "-")
        off = "--no-reconstruction" if not cfg.get("reconstruction") else "--no-bias-compensation"
        why = why.format(flag=flag, device=cfg.get("device"), off=off, model=cfg.get("model"))
        if where != "command line":
            logging.getLogger("cleanai").warning("warning: %s (%s) %s; it was ignored.", flag, where, why)
            continue
        raise UserError(f"{flag} ({where}) {why}.")


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
    if isinstance(v, float) and math.isinf(v):
        raise UserError(f"{flag}={v} is not a finite number.")
    if kind is int and hi is None and v > sys.maxsize:
        # --batch-size 10**20: "Stop argument for islice() must be ... <= sys.maxsize", a traceback
        raise UserError(f"{flag}={v} is out of range: it must be at most {sys.maxsize} (2**63 - 1).")
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
        raise UserError(
            f"the {source} sets more than one of ratio, target-flops, target-params and target-latency; keep one."
        )
    for k in AMOUNTS if named else ():
        if k != named[0]:
            cfg[k] = None
            sources[k] = source
    cfg.update(layer)
    sources.update(dict.fromkeys(layer, source))


def _options_dict(args: Any) -> dict[str, Any]:
    """``run_job``'s dict of options, keys spelt as in a config file (``pruning_ratio``,
    ``calib-fraction``); an unknown key is refused (``ratioo`` was ignored and the job ran
    at the default ratio)."""
    from cleanai_core.config_sources import ALIASES

    if not isinstance(args, Mapping):
        raise UserError(f"run_job needs a PruneConfig or a dict of options, got {type(args).__name__}")
    given: dict[str, Any] = {}
    unknown = []
    for key, value in args.items():
        k = str(key).replace("-", "_")
        k = ALIASES.get(k, k)
        if k in DEFAULTS or k == "config" or k.startswith("_"):
            given[k] = plain_number(value)  # np.float32(0.5): "--ratio must be a number"
        else:
            unknown.append(key)
    if unknown:
        close = {u: difflib.get_close_matches(str(u).replace("-", "_"), list(DEFAULTS), n=1) for u in unknown}
        hints = "; ".join(f"{u!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for u, c in close.items())
        raise UserError(f"unknown option(s) {hints}; see PruneConfig for the valid names.")
    return given


def _read_config(config_file: str | None, environ: Mapping[str, str]) -> tuple[str | None, dict[str, Any]]:
    """The config file and its options: ``--config FILE``, else the file ``CLEANAI_CONFIG``
    names (the environment's spelling of ``--config``, which was ignored without a word);
    errors about a file named by the variable say so."""
    if config_file:
        return config_file, read_config_file(config_file, DEFAULTS)
    named = str(environ.get(f"{ENV_PREFIX}CONFIG", "")).strip()
    if not named:
        return None, {}
    try:
        return named, read_config_file(named, DEFAULTS)
    except UserError as exc:
        raise UserError(f"{exc} (The file is named by {ENV_PREFIX}CONFIG; unset it or fix the file.)") from None


def resolve_config(args: Any, environ: dict[str, str] | None = None, objects: tuple[str, ...] = ()) -> dict[str, Any]:
    """Defaults < ``--preset`` < ``--config`` < ``CLEANAI_<OPTION>`` variables < ``args``
    (the command line: an argparse namespace, or a dict or :class:`PruneConfig` of the
    options given); validated. ``cfg["_sources"]`` says where each option came from.
    ``objects``: what ``run_job`` was given as objects (``"model"``, ``"data"``)."""
    cfg = copy.deepcopy(DEFAULTS)
    sources = dict.fromkeys(DEFAULTS, "default")
    if isinstance(args, PruneConfig):  # only what differs from the defaults counts as given
        plain = {k: plain_number(v) for k, v in args.to_dict().items()}
        given = {k: v for k, v in plain.items() if v != DEFAULTS[k]}
    elif isinstance(args, argparse.Namespace):
        given = dict(vars(args))
    else:
        given = _options_dict(args)
    for k in ("command", "_run", "disable_plugin"):
        given.pop(k, None)
    check_given_paths(given)  # --weights '' was read as not given: a model of random weights pruned
    environ = os.environ if environ is None else environ
    config_file, from_file = _read_config(given.pop("config", None), environ)
    from_env = env_options(environ, DEFAULTS)
    preset, where = next(
        ((src.get("preset"), name) for src, name in ((given, "--preset"), (from_env, f"{ENV_PREFIX}PRESET"),
                                                     (from_file, f"preset in {config_file!r}"))
         if src.get("preset") is not None),
        (None, ""),
    )  # fmt: skip
    _apply(cfg, sources, preset_options(preset, where), "preset")
    _apply(cfg, sources, from_file, "config file")
    if config_file:
        cfg["config"] = os.path.abspath(config_file)  # a link as given: --out holding it is refused
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
        both = f"both {flags[0]} and {flags[1]}" if len(flags) == 2 else " and ".join(flags)
        raise UserError(f"give one of --ratio, --target-flops, --target-params and --target-latency, not {both}.")
    _apply(cfg, sources, given, "command line")
    _check_kinds(cfg, sources)  # before any switch is read: a config's "false" is not true
    if all(cfg.get(k) is None for k in AMOUNTS):
        cfg["ratio"] = DEFAULT_RATIO
        sources["ratio"] = "default"
    targets = ("target_flops", "target_params", "target_latency")
    if cfg.get("auto") and all(cfg.get(k) is None for k in targets):
        raise UserError(
            "--auto allocates ratios to a target: give --target-flops F, --target-params P or --target-latency L "
            "with it."
        )
    if cfg.get("isomorphic") and not cfg.get("global_pruning"):
        raise UserError(
            f"--isomorphic ({sources['isomorphic']}) refines global ranking, but global pruning is off "
            f"({sources['global_pruning']}): add --global (global = true in a config file)."
        )
    if cfg.get("prune_dead_only"):  # the amount is the dead units: a ratio or target given with it was ignored
        # so were the ranking and the rounding (--global, --round-to 8: the same units went)
        given = [*AMOUNTS, "layer_ratio", "global_pruning", "isomorphic", "round_to"]
        baseline = {**DEFAULTS, "ratio": DEFAULT_RATIO, **preset_options(preset, where)}
        asked = [k for k in given if _asks(cfg.get(k), k, sources.get(k, "default"), baseline)]
        if asked:
            flag = f"--{asked[0].replace('_', '-')}"
            raise UserError(
                f"--prune-dead-only removes exactly the units that never activate, so {flag} ({sources[asked[0]]}) "
                f"does not apply; drop one of them."
            )
    if cfg.get("target_latency") is not None and not cfg.get("auto"):
        raise UserError("--target-latency needs --auto: the per-layer ratios are chosen by measuring the latency.")
    preset_options(cfg.get("preset"), "preset")  # a known name, whichever source gave it
    cfg["sensitivity_ratios"] = _parse_ratios(cfg.get("sensitivity_ratios"))
    # specs read from a config file or the environment run code only with --trust-code (see _spec_options)
    untrusted = ("config file", "environment")
    cfg["_from_config"] = sorted(k for k in ("model", "data", "train_data") if sources.get(k) in untrusted)
    cfg["_sources"] = sources
    if "data" in objects and not cfg.get("data"):  # the data set given to run_job: a name for the report
        cfg["data"] = "<dataset given to run_job>"
    if "model" in objects and not cfg.get("model"):  # said "--model is required (on the command line ...)"
        raise UserError(
            "run_job(config, model=...) also needs the option 'model': the spec that rebuilds the model's "
            "architecture (e.g. 'torchvision:resnet18' or 'package.module:factory'), which the saved folder "
            "is loaded from."
        )
    for key in ("model", "data") + (() if cfg.get("dry_run") else ("out",)):
        if not cfg.get(key):
            raise UserError(f"--{key} is required (on the command line or in --config).")
    _check_number(cfg, "ratio", float, 0.0, 1.0)
    _check_number(cfg, "target_flops", float, 0.0, 1.0)
    _check_number(cfg, "target_params", float, 0.0, 1.0)
    _check_number(cfg, "target_latency", float, 0.0, 1.0)
    _check_number(cfg, "sensitivity_batches", int, 1, None, lo_open=False)
    _check_number(cfg, "calib_fraction", float, 0.0, 1.0, hi_open=False)
    for key in ("alpha", "beta"):
        _check_number(cfg, key, float, 0.0, None, lo_open=False)
    for key in (
        "round_to",
        "calib_batches",
        "batch_size",
        "num_classes",
        "seq_len",
    ):
        _check_number(cfg, key, int, 1, None, lo_open=False)
    _check_number(cfg, "latency_repeats", int, 1, MAX_LATENCY_REPEATS, lo_open=False, hi_open=False)
    # one image of 100000 x 100000 pixels is 120 GB as float32: the out-of-memory killer ended the run (exit 137)
    _check_number(cfg, "image_size", int, 1, MAX_IMAGE_SIZE, lo_open=False, hi_open=False)
    _check_number(cfg, "covariance_rows", int, 0, None, lo_open=False)
    _check_number(cfg, "stats_budget_mib", int, 0, None, lo_open=False)
    _check_number(cfg, "bn_samples", int, 0, None, lo_open=False)
    _check_number(cfg, "recover_epochs", int, 0, None, lo_open=False)
    _check_number(cfg, "recover_lr", float, 0.0, None, lo_open=False)
    _check_number(cfg, "seed", int, -(2**63), 2**64, lo_open=False)  # what torch.Generator.manual_seed takes
    _check_number(cfg, "threads", int, 1, max_threads(), lo_open=False, hi_open=False)
    for pat, r in cfg["layer_ratio"].items():
        if not 0.0 <= r < 1.0:
            raise UserError(
                f"--layer-ratio {pat}={r}: the ratio must be from 0 (keeps the layer whole) up to, not including, 1."
            )
    if cfg.get("train_data") and not cfg.get("recover_epochs"):  # it was read by nothing, without a word
        raise UserError(
            "--train-data is read only for recovery: add --recover-epochs N (N >= 1), or leave --train-data out."
        )
    if (cfg.get("alpha") is not None or cfg.get("beta") is not None) and cfg["importance"] != "weight_activation":
        raise UserError(f"--alpha/--beta apply to the weight_activation importance, not {cfg['importance']!r}.")
    if not isinstance(cfg.get("ignore"), list):
        raise UserError("ignore must be a list of layer patterns.")
    checked_device(cfg["device"], "--device")
    return cfg


# the options that may name a file or folder (model and data also take specs such as timm:NAME)
_PATH_OPTIONS = ("model", "weights", "data", "train_data", "out", "config")


def check_config_paths(cfg: Mapping[str, Any]) -> None:
    """A :class:`UserError` for a relative path a config file gave (``weights = "w.pt"``)
    that is not in the current folder, naming the folder it was read from: a config of a run
    started elsewhere said only ``--data 'd.pt': no such file or folder``."""
    sources = cfg.get("_sources") or {}
    for key in _PATH_OPTIONS[:4]:
        value = cfg.get(key)
        if sources.get(key) == "config file" and _missing_relative_path(value):
            raise UserError(
                f"--{key.replace('_', '-')} {value!r} (from config file {cfg.get('config')!r}) does not exist in the "
                f"current folder {os.getcwd()!r}: a relative path in a config file is read from the folder cleanai "
                "runs in. Run cleanai from the folder the config was written for, or write the absolute path into it."
            )


def _missing_relative_path(value: Any) -> bool:
    """Whether ``value`` is a relative file path (a suffix or a folder in it; no spec such as
    ``timm:NAME`` or ``package.module:function``) that does not exist."""
    if not isinstance(value, str) or not value or ":" in value or os.path.isabs(os.path.expanduser(value)):
        return False
    return bool(Path(value).suffix or "/" in value or os.sep in value) and not os.path.lexists(value)


def recorded_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The options as ``config.json`` records them (``--config`` reads them back): the
    resolved ones and where each came from (``_sources``), with a relative path an option
    names made absolute (also the folder of ``hf:FOLDER``). Relative paths are read from the
    current folder, so ``cleanai prune --config run/config.json`` of a run started elsewhere
    said ``--data 'd.pt': no such file or folder``."""
    recorded = {k: v for k, v in cfg.items() if not k.startswith("_")}
    for key in _PATH_OPTIONS:
        value = recorded.get(key)
        if not isinstance(value, str) or not value:
            continue
        head, rest = ("hf:", value[3:]) if value.startswith("hf:") else ("", value)
        if rest and not os.path.isabs(rest) and (key == "out" or os.path.exists(rest)):
            recorded[key] = head + os.path.abspath(rest)
    recorded["_sources"] = cfg.get("_sources") or {}
    return recorded
