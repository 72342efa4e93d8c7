"""Where ``cleanai prune`` options come from besides the command line: presets, config
files (TOML, YAML, JSON) and ``CLEANAI_<OPTION>`` environment variables.

Precedence, lowest to highest: defaults < ``--preset`` < ``--config`` file <
environment < command line. Trust (``trust_model``/``trust_code``) is never granted by
any of these: only the command line or an API argument can turn it on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cleanai_core.errors import UserError
from cleanai_core.extras import import_extra
from cleanai_core.special_files import check_not_special

__all__ = ["ENV_PREFIX", "PRESETS", "SOURCES", "env_options", "preset_options", "read_config_file"]

log = logging.getLogger("cleanai")

# every preset sets the same keys, so switching presets never leaves one half-applied
PRESETS: dict[str, dict[str, Any]] = {
    "conservative": {
        "ratio": 0.2,
        "global_pruning": False,
        "round_to": None,
        "bias_compensation": True,
        "reconstruction": True,
        "bn_recalibration": True,
    },
    "balanced": {  # today's defaults
        "ratio": 0.3,
        "global_pruning": False,
        "round_to": None,
        "bias_compensation": True,
        "reconstruction": True,
        "bn_recalibration": True,
    },
    "aggressive": {
        "ratio": 0.5,
        "global_pruning": True,  # ranks all layers together; no group loses more than 90%
        "round_to": 8,
        "bias_compensation": True,
        "reconstruction": True,
        "bn_recalibration": True,
    },
}

SOURCES = ("default", "preset", "config file", "environment", "command line")
ENV_PREFIX = "CLEANAI_"
# key spellings besides the option name with "-" or "_": the CLI's flag names
ALIASES = {
    "global": "global_pruning",
    "layer_ratios": "layer_ratio",
    "ignored_layers": "ignore",
    # StructuredPruner's spellings (cleanai_core.job.config.API_NAMES)
    "pruning_ratio": "ratio",
    "layer_pruning_ratios": "layer_ratio",
    "recalibrate_bn": "bn_recalibration",
}
# consent switches: only the command line (or an API argument) can turn them on
TRUST_KEYS = ("trust_model", "trust_code")
# keys a config.json of an earlier run records that are not options to set again
RECORD_ONLY = ("config",)
# the value type of options whose default is None (environment variables are strings)
_NONE_TYPES = {
    "ratio": float,
    "target_flops": float,
    "target_params": float,
    "target_latency": float,
    "alpha": float,
    "beta": float,
    "round_to": int,
    "calib_batches": int,
    "num_classes": int,
    "image_size": int,
    "seq_len": int,
    "threads": int,
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def preset_options(name: Any, where: str) -> dict[str, Any]:
    if name is None:
        return {}
    if not isinstance(name, str) or name not in PRESETS:
        raise UserError(f"{where}: unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return dict(PRESETS[name])


def _load(path: str) -> tuple[Any, str]:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {path!r} is a folder; give a .toml, .yaml/.yml or .json file.")
    check_not_special(p, "config file")
    if not p.is_file():
        raise UserError(f"config file {path!r} does not exist.")
    suffix = p.suffix.lower()
    try:
        text = p.read_bytes().decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the file
    except UnicodeDecodeError as exc:
        raise UserError(
            f"config file {path!r} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start : exc.start + 1]!r}); "
            "save it as UTF-8."
        ) from None
    try:
        return _parse(path, suffix, text)
    except RecursionError:
        raise UserError(
            f"config file {path!r} is nested too deeply to be a config; write option = value pairs."
        ) from None


def _parse(path: str, suffix: str, text: str) -> tuple[Any, str]:
    if suffix in (".yaml", ".yml"):
        yaml = import_extra(
            "yaml",
            f"config file {path!r} is YAML; reading it",
            "pip install 'cleanai[yaml]' (or pyyaml)",
            "Or write the file as TOML or JSON.",
            package="PyYAML",
        )
        try:
            return yaml.load(text, Loader=_yaml_loader(yaml)), "YAML"
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: a number too long to convert
            raise UserError(f"config file {path!r} is not valid YAML: {exc}") from exc
    if suffix == ".json":
        try:
            return json.loads(text, object_pairs_hook=unique_keys), "JSON"
        except ValueError as exc:  # JSONDecodeError, or a number too long to convert
            raise UserError(f"config file {path!r} is not valid JSON: {exc}") from exc
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise UserError("a TOML --config needs Python 3.11+ (tomllib) or the tomli package on 3.10.") from None
    try:
        return tomllib.loads(text), "TOML"
    except ValueError as exc:  # TOMLDecodeError, or a number too long to convert
        raise UserError(f"config file {path!r} is not valid TOML: {exc}") from exc


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (a repeated key silently took the last
    value); ``json.loads(text, object_pairs_hook=unique_keys)``."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice; give each option once")
        seen[key] = value
    return seen


def _yaml_loader(yaml: Any) -> Any:
    """PyYAML's safe loader, refusing a mapping that repeats a key (it kept the last value)."""

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.value != "<<"]
        twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if twice is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {twice!r} appears twice; give each option once", node.start_mark
            )
        return loader.construct_mapping(node, deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeyLoader


def _check_not_an_output(path: str, data: dict) -> None:
    """A :class:`UserError` for a file a CleanAI run wrote other than its ``config.json``
    (``report.json``, ``history.json``, ``architecture.json``) given as ``--config``: it said
    "unknown key(s) 'params_before', 'params_after', ..." and every valid key."""
    from cleanai_core.special_files import cleanai_json_kind

    kind = cleanai_json_kind(data)
    if kind is not None and "config.json" not in kind:
        config = os.path.join(os.path.dirname(path), "config.json")
        there = f" ({config!r} beside it)" if os.path.isfile(config) else ""
        raise UserError(
            f"config file {path!r} is {kind}, not a config. Give the config.json of that run{there}, or a .toml, "
            ".yaml or .json file of options."
        )


def read_config_file(path: str, known: Mapping[str, Any]) -> dict[str, Any]:
    """The options in a TOML, YAML (``.yaml``/``.yml``) or JSON (``.json``) file, keys
    normalised to the names in ``known``. A single ``[prune]`` table is unwrapped; keys
    starting with ``_`` (what a ``config.json`` records about its run) are skipped."""
    data, kind = _load(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            f"config file {path!r}: the {kind} must be a table of option = value, not a {type(data).__name__}."
        )
    _check_not_an_output(path, data)
    if isinstance(data.get("prune"), dict) and len(data) == 1:
        data = data["prune"]
    elif isinstance(data.get("prune"), dict):  # said "unknown key(s) 'prune'", a key the docs name
        others = ", ".join(repr(str(k)) for k in data if k != "prune")
        raise UserError(
            f"config file {path!r} has a [prune] table and other top-level keys ({others}); a [prune] table is read "
            "only when it holds every option: move those keys into it, or drop the table and keep its keys at the "
            "top level."
        )
    recorded = "_sources" in data  # a config.json written by cleanai prune
    out: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        k = str(key).replace("-", "_")
        k = ALIASES.get(k, k)
        if k.startswith("_"):
            continue
        if k in TRUST_KEYS or k.startswith("trust"):
            if recorded or value is False:
                if value:
                    log.warning("%s records %s = %r; trust is not taken from a file: pass --%s again if you trust it",
                                path, k, value, k.replace("_", "-"))  # fmt: skip
                continue
            flag = "--" + k.replace("_", "-")
            raise UserError(
                f"config file {path!r} sets {key!r}: a config file cannot grant trust (it may come from someone "
                f"else). Remove the key and pass {flag} on the command line if you trust the model and code it names."
            )
        if k in RECORD_ONLY:
            continue
        if k not in known:
            unknown.append(key)
            continue
        if k in out:  # two spellings of one option (ratio and pruning-ratio): the later won silently
            first = next(str(o) for o in data if ALIASES.get(str(o).replace("-", "_"), str(o).replace("-", "_")) == k)
            raise UserError(
                f"config file {path!r} sets {k.replace('_', '-')} twice (as {first!r} and {key!r}); keep one of them."
            )
        if isinstance(value, str) and isinstance(known[k], (list, dict)):
            # one string for a list option (``ignore = "fc"``, as the API's ``ignored_layers="fc"``):
            # comma-separated items, as the environment gives them (it was refused as not a list)
            value = _parse_env(f"config file {path!r}: {key}", k, value, known[k])
        out[k] = value
    if unknown:
        import difflib

        valid = ", ".join(k.replace("_", "-") for k in known)
        close = {u: difflib.get_close_matches(str(u).replace("-", "_"), list(known), n=1) for u in unknown}
        hint = {u: f" (did you mean {c[0].replace('_', '-')!r}?)" if c else "" for u, c in close.items()}
        named = ", ".join(f"{u!r}{h}" for u, h in hint.items())
        raise UserError(f"config file {path!r}: unknown key(s) {named}. Valid keys: {valid}.")
    return out


def _parse_env(name: str, key: str, text: str, default: Any) -> Any:
    kind = type(default) if default is not None else _NONE_TYPES.get(key, str)
    if kind is bool:
        low = text.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise UserError(f"{name}={text!r}: give 1/0, true/false or yes/no.")
    if kind in (list, dict):  # ignore, sensitivity_ratios; layer_ratio as PATTERN=R items
        return [item.strip() for item in text.split(",") if item.strip()]
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise UserError(f"{name}={text!r} is not {'an integer' if kind is int else 'a number'}.") from None
    return text


def env_options(environ: Mapping[str, str], known: Mapping[str, Any]) -> dict[str, Any]:
    """Options from ``CLEANAI_<OPTION>`` variables: only names that match an option
    (``CLEANAI_BATCH_SIZE`` for ``batch_size``); other ``CLEANAI_*`` variables are left alone.
    Empty values are ignored."""
    out: dict[str, Any] = {}
    for key, default in known.items():
        name = ENV_PREFIX + key.upper()
        text = environ.get(name)
        if text is None or text.strip() == "":
            continue
        if key in TRUST_KEYS:
            raise UserError(
                f"{name} is set: the environment cannot grant trust. Unset it and pass --{key.replace('_', '-')} "
                "on the command line if you trust the model and code it names."
            )
        out[key] = _parse_env(name, key, text, default)
    _warn_near_misses(environ, known)
    return out


# CLEANAI_* variables that are not options (plugins, distributed runs, the test suite)
OTHER_VARIABLES = ("DISABLED_PLUGINS", "DISABLE_PLUGIN_AUTOLOAD", "DIST_TIMEOUT", "CUDA_TEST_DEVICE", "FUZZ_EXAMPLES",
                   "PRINT_CATALOGUE")  # fmt: skip


def _warn_near_misses(environ: Mapping[str, str], known: Mapping[str, Any]) -> None:
    """A ``CLEANAI_*`` variable that is no option but close to one (``CLEANAI_RATIOO``) was
    ignored without a word: say which option it looks like."""
    import difflib

    names = [k.upper() for k in known] + ["CONFIG"]  # CLEANAI_CONFIG names the config file (job.config)
    for var, text in environ.items():
        rest = var[len(ENV_PREFIX) :] if var.startswith(ENV_PREFIX) else None
        if not rest or rest in names or rest in OTHER_VARIABLES or not str(text).strip():
            continue
        alias = ALIASES.get(rest.lower())  # CLEANAI_PRUNING_RATIO: the API's spelling, not read from the environment
        close = [alias.upper()] if alias else difflib.get_close_matches(rest, names, n=1, cutoff=0.75)
        if close:
            log.warning("warning: %s is not an option and was ignored; did you mean %s%s?", var, ENV_PREFIX, close[0])
