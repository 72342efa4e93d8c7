"""Stage 1, arguments: keyword names a pruner does not take.

Glossary:

- *peer name*: a keyword of Torch-Pruning's pruners (``ch_sparsity``,
  ``max_pruning_ratio``, ``pruning_ratio_dict``, ...) that users bring to CleanAI. Each is
  answered with CleanAI's way to say the same thing, not read as a second spelling.
- *unknown name*: any other keyword; answered with the closest valid names.
- *peer method*: a method of Torch-Pruning's pruner or graph (``pruner.step()``,
  ``DG.get_pruning_group(...)``) looked up on CleanAI's: the ``AttributeError`` says
  CleanAI's way.

Without this, ``StructuredPruner(model, x, ch_sparsity=0.5)`` failed with Python's bare
``TypeError: ... got an unexpected keyword argument 'ch_sparsity'``."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from cleanai_core.errors import UserError

__all__ = ["PEER_IMPORTANCES", "PEER_METHODS", "PEER_NAMES", "check_option_names", "keywords", "missing_attribute"]

_LAYERS = "ignored_layers=[...] (modules, names, globs or types)"
_HEADS = (
    "none: the graph decides whether an attention loses whole heads or head width "
    "(and rewrites num_heads / head_dim); to keep an attention's heads, ignore its query projection in " + _LAYERS
)

# Torch-Pruning's keyword -> how CleanAI says it (docs/user-guide.md, "Coming from Torch-Pruning")
PEER_NAMES: Mapping[str, str] = {
    "ch_sparsity": "pruning_ratio= (the same value)",
    "ch_sparsity_dict": "layer_pruning_ratios={layer: ratio} (a tuple of layers as key is one scope)",
    "pruning_ratio_dict": "layer_pruning_ratios={layer: ratio} (a tuple of layers as key is one scope)",
    "max_ch_sparsity": "max_layer_ratio= (the same value; 1.0: no cap)",
    "max_pruning_ratio": "max_layer_ratio= (the same value; 1.0: no cap)",
    "iterative_pruning_ratio_scheduler": "iterative_schedule= (the same function, or its steps + 1 ratios)",
    "ignored_layer_outputs": _LAYERS,
    "ignored_layer_inputs": "ignoring the layer that feeds it, in " + _LAYERS,
    "ignored_params": "the tensor itself in " + _LAYERS,
    "unwrapped_parameters": (
        "nothing: bare nn.Parameters are found by themselves (the cleanai_unwrapped_parameter hook names the dim "
        "where the guess is wrong); to keep one's channels, put it in " + _LAYERS
    ),
    "customized_pruners": (
        "a plugin whose cleanai_layer_pruner hook returns your LayerPruner for the module "
        "(cleanai_core.testing.temporary_plugin registers one for a test)"
    ),
    "root_module_types": "nothing: every layer a plugin slices can root a group; to keep a type, put it in " + _LAYERS,
    "in_channel_groups": "nothing: group counts are read from the model (conv groups, GroupNorm)",
    "out_channel_groups": "nothing: group counts are read from the model (conv groups, GroupNorm)",
    "channel_groups": "nothing: group counts are read from the model (conv groups, GroupNorm)",
    "num_heads": _HEADS,
    "prune_num_heads": _HEADS,
    "prune_head_dims": _HEADS,
    "head_pruning_ratio": _HEADS,
    "group_reduction": "the criterion's reducer=, e.g. get_importance('magnitude', reducer='sum')",
}


_NO_REGULARISER = (
    "none: CleanAI has no sparse-training regulariser; prune in your training loop with GradualPruner, or add "
    "lam * sum(bn.weight.abs().sum()) over the BatchNorms to your loss and rank with importance='bn_scale'"
)

# (class, Torch-Pruning's method) -> how CleanAI does it
PEER_METHODS: Mapping[tuple[str, str], str] = {
    ("StructuredPruner", "step"): (
        "prune() (iterative_steps=N runs all the steps in one call); for step(interactive=True): plan = "
        "pruner.plan(), edit each plan.groups[i].pruned, then pruner.build(plan.pruned_units())"
    ),
    ("StructuredPruner", "regularize"): _NO_REGULARISER,
    ("StructuredPruner", "update_regularizer"): _NO_REGULARISER,
    ("StructuredPruner", "update_regularizor"): _NO_REGULARISER,
    ("StructuredPruner", "estimate_importance"): "score() (each group's unit scores, by group id)",
    ("StructuredPruner", "pruning_history"): "pruner.history (a PruningHistory: to_json(), replay(fresh_model))",
    ("StructuredPruner", "load_pruning_history"): "PruningHistory.from_json(text).replay(fresh_model)",
    ("StructuredPruner", "DG"): "pruner.graph (the DependencyGraph)",
    ("DependencyGraph", "get_pruning_group"): (
        "removal(layer, idxs) (a third argument 'in' / 'channels' / 'hidden' names another slice): a mask "
        "over the units for pruner.build(mask)"
    ),
    ("DependencyGraph", "get_all_groups"): "groups() (prunable_only=True: those that may shrink)",
    ("DependencyGraph", "check_pruning_group"): (
        "nothing: pruner.build(mask) refuses a mask that empties a layer or cuts frozen units, before slicing"
    ),
    ("DependencyGraph", "build_dependency"): "DependencyGraph(model, example_inputs), which traces when built",
}


# Torch-Pruning's importance classes (and the names its users shorten them to) -> CleanAI's criterion
PEER_IMPORTANCES: Mapping[str, str] = {
    "MagnitudeImportance": "'magnitude' (p= as its p)",
    "GroupMagnitudeImportance": "'magnitude' (p= as its p)",
    "GroupNormImportance": "'magnitude' (p=2: the squared group norm)",
    "l1": "'magnitude' with p=1",
    "l2": "'magnitude' (p=2, the default)",
    "BNScaleImportance": "'bn_scale'",
    "LAMPImportance": "'lamp'",
    "TaylorImportance": "'taylor' (labelled calibration batches, or your own loss.backward() first)",
    "GroupTaylorImportance": "'taylor' (labelled calibration batches, or your own loss.backward() first)",
    "HessianImportance": "'hessian' (labelled calibration batches)",
    "GroupHessianImportance": "'hessian' (labelled calibration batches)",
    "OBDImportance": "'hessian' (labelled calibration batches)",
    "OBDCImportance": "none; 'hessian' is OBD with the empirical Fisher's diagonal",
    "RandomImportance": "'random'",
    "FPGMImportance": "'fpgm'",
}


def missing_attribute(obj: Any, name: str) -> Any:
    """For ``obj.__getattr__``: raise the ``AttributeError`` for the missing attribute
    ``name``, Python's message with CleanAI's way where ``name`` is one of Torch-Pruning's
    methods. A property whose getter raised ``AttributeError`` (Python then calls
    ``__getattr__``) is run again, so its own error is the one seen."""
    prop = getattr(type(obj), name, None)
    if isinstance(prop, property) and prop.fget is not None:
        return prop.fget(obj)
    owner = type(obj).__name__
    way = next((PEER_METHODS[c.__name__, name] for c in type(obj).__mro__ if (c.__name__, name) in PEER_METHODS), None)
    tail = f": {name} is Torch-Pruning's; CleanAI's way: {way}" if way else ""
    raise AttributeError(f"{owner!r} object has no attribute {name!r}{tail}", name=name, obj=obj)


def check_option_names(given: Iterable[str], known: Iterable[str], who: str) -> None:
    """Refuse the keywords of ``given`` that ``who`` does not take (``known``): a peer
    name with CleanAI's way to say it, any other with the closest valid names. Raises
    :class:`UserError` (nothing else is checked before)."""
    known = sorted(known)
    unknown = [k for k in given if k not in known]
    if not unknown:
        return
    lines = []
    for k in unknown:
        if k in PEER_NAMES:
            lines.append(f"{k!r} is Torch-Pruning's option; CleanAI's way: {PEER_NAMES[k]}")
        else:
            close = difflib.get_close_matches(k, known, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else f"valid: {', '.join(known)}"
            lines.append(f"{k!r} is not an option ({hint})")
    raise UserError(f"{who} got an option it does not take: " + "; ".join(lines))


def keywords(fn: Any, skip: Iterable[str] = ("self",)) -> list[str]:
    """The named parameters of ``fn`` (not ``*args`` / ``**kwargs``), less ``skip``."""
    import inspect

    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind in kinds and p.name not in set(skip)]
