"""Every hook a CleanAI plugin can implement: the reference for plugin authors.

A plugin is a module (or object) whose functions are decorated with
:data:`cleanai_core.hookimpl` and named after one of the specs below. pluggy passes
arguments by name, and an implementation may accept any subset of a spec's arguments,
so new arguments can be added to a spec later without breaking plugins.

Claim hooks (``firstresult``) stop at the first non-``None`` result. Built-in plugins
implement them with ``trylast=True``, so an installed plugin's claim wins over the
built-in one, and an implementation marked ``tryfirst=True`` wins over both.

All hooks appeared in version 0.1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from cleanai_core.interfaces import IndexMapper, LayerPruner

PROJECT = "cleanai"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "hookimpl", "hookspec"]

# ---------------------------------------------------------------------------
# Graph building: who slices what
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def cleanai_layer_pruner(module: nn.Module, name: str) -> LayerPruner | None:
    """Claim a module: return the :class:`~cleanai_core.interfaces.LayerPruner` that
    traces and slices it, or ``None`` to let other plugins decide.

    Called once per module instance while a :class:`~cleanai_core.DependencyGraph` is
    built; the answer is kept on the graph node, never asked again per channel. A
    claimed module is a leaf of the graph: the operations inside its ``forward`` are not
    traced, so a plugin can claim a whole composite (an attention block, an LSTM).

    :param module: the module instance (claims may depend on attributes, not only type).
    :param name: its qualified name in the model (``"layer1.0.conv1"``).
    :returns: a pruner, or ``None``. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def cleanai_index_mapper(op: torch._ops.OpOverload) -> IndexMapper | None:
    """Claim a tensor operation seen while tracing (an ATen overload such as
    ``aten.cat.default``): return the :class:`~cleanai_core.interfaces.IndexMapper` that
    maps channel labels from its inputs to its outputs, or ``None``.

    Resolved once per overload and cached. Ops nobody claims are handled by the kernel:
    element-wise ops (ATen ``pointwise`` tag) broadcast labels; anything else freezes the
    channels that reach it, and the op is named in :meth:`DependencyGraph.explain`.

    :param op: the ATen operator overload.
    :returns: a mapper, or ``None``. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def cleanai_unwrapped_parameter(name: str, parameter: torch.Tensor, model: nn.Module) -> int | bool | None:
    """Say which dimension of a bare parameter or buffer carries channels.

    Bare tensors (``cls_token``, ``pos_embed``, layer-scale ``gamma``, relative position
    tables) are used by operations outside any claimed module. Return the channel
    dimension (an ``int``, negative allowed), ``False`` to never prune this tensor, or
    ``None`` to let others decide (default: the only dimension larger than one, else the
    last). Stops at first non-None result.

    :param name: qualified name, e.g. ``"cls_token"`` or ``"blocks.0.ls1.gamma"``.
    :param parameter: the tensor.
    :param model: the model that owns it.
    """


@hookspec
def cleanai_default_ignores(model: nn.Module) -> list[nn.Module] | None:
    """Modules whose output channels must be kept unless the user says otherwise
    (classifier heads). Input channels of these modules may still shrink.

    :returns: a list of modules of ``model`` (results of all plugins are joined).
    """


@hookspec
def cleanai_leaf_modules(model: nn.Module) -> list[type | nn.Module] | None:
    """Modules (types or instances) not to enter while tracing and not to prune: every
    channel that flows into or out of them is frozen. For code the tracer cannot follow.

    :returns: types or module instances (results of all plugins are joined).
    """


# ---------------------------------------------------------------------------
# After slicing
# ---------------------------------------------------------------------------


@hookspec
def cleanai_after_prune(module: nn.Module, name: str, edits: dict[tuple[str, str], torch.Tensor]) -> None:
    """Fix attributes that live outside tensors once slicing is done (``num_heads``,
    ``head_dim``, ``attn_dim``...). Called for every module of the pruned model, after
    every slice was applied, in module order; also during replay.

    :param module: a module of the pruned model.
    :param name: its qualified name.
    :param edits: the kept indices of every slice that changed, keyed by
        ``(module name, slice name)`` (e.g. ``("blocks.0.attn.qkv", "out")``), in the
        index space *before* slicing. Attributes of ``module`` itself are not yet updated.
    """


# ---------------------------------------------------------------------------
# Scoring: importance criteria, reducers, normalisers
# ---------------------------------------------------------------------------


@hookspec
def cleanai_importances() -> dict[str, Any] | None:
    """Register importance criteria by name: ``{"magnitude": factory, ...}``.

    A factory is called with keyword options and returns an object implementing
    :class:`~cleanai_core.interfaces.Importance`. Names must be unique across plugins;
    a duplicate is an error naming both plugins.
    """


@hookspec
def cleanai_reducers() -> dict[str, Any] | None:
    """Register reducers by name: functions folding a stack of per-slice scores
    ``(n_slices, n_units)`` into one score per unit (``sum``, ``mean``, ``max``...)."""


@hookspec
def cleanai_normalizers() -> dict[str, Any] | None:
    """Register normalisers by name: functions rescaling one group's unit scores so
    groups can be ranked against each other (``mean``, ``max``, ``sum``, ``gaussian``...)."""


# ---------------------------------------------------------------------------
# The command line: models, data, evaluation, report
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def cleanai_load_model(spec: str, options: dict[str, Any]) -> nn.Module | None:
    """Build a model from a command-line spec such as ``timm:resnet18``. Return ``None``
    when the spec is not yours. Raise :class:`cleanai_core.errors.UserError` with a clear
    message when it is yours but wrong. Stops at first non-None result.

    :param spec: the ``--model`` string.
    :param options: resolved CLI options (``weights``, ``trust_model``, ``num_classes``...).
    """


@hookspec(firstresult=True)
def cleanai_load_dataset(spec: str, options: dict[str, Any]) -> Any | None:
    """Build a ``torch.utils.data.Dataset`` from a ``--data`` spec (a folder, a file,
    ``package.module:function``). Items are tensors or ``(input, label)`` pairs. Return
    ``None`` when the spec is not yours. Stops at first non-None result.

    :param spec: the ``--data`` string.
    :param options: resolved CLI options (``model``, ``image_size``...).
    """


@hookspec(firstresult=True)
def cleanai_evaluate(model: nn.Module, loader: Any, device: torch.device) -> dict[str, float] | None:
    """Evaluate a model on labelled data; return metrics such as ``{"accuracy": 0.93}``
    or ``None`` when not applicable. Stops at first non-None result."""


@hookspec
def cleanai_save_outputs(model: nn.Module, folder: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    """Write extra files for the pruned model into the output folder of ``cleanai prune``
    (a Hugging Face ``save_pretrained`` folder, an export). Called after ``model.pt`` and
    ``history.json`` are written and before the report, inside the folder that replaces
    ``--out`` when the job succeeds.

    :param model: the pruned model, on the CPU, in eval mode.
    :param folder: the output folder (a ``pathlib.Path``).
    :param options: ``example`` (one input batch, as the model is called), ``model_spec``.
    :returns: entries to add to ``report.json`` (e.g. ``{"hf_folder": "hf"}``), or ``None``.
        Results of all plugins are merged.
    """


@hookspec
def cleanai_report_sections(report: dict[str, Any]) -> list[tuple[str, str]] | None:
    """Add sections to ``report.md``: a list of ``(title, markdown)``. ``report`` is the
    JSON report as a dict, read-only."""
