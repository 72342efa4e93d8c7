"""Every hook a CleanAI plugin can implement: the reference for plugin authors.

A plugin is a module (or object) whose functions are decorated with
:data:`cleanai_core.hookimpl` and named after one of the specs below. pluggy passes
arguments by name, and an implementation may accept any subset of a spec's arguments,
so new arguments can be added to a spec later without breaking plugins.

Claim hooks (``firstresult``) stop at the first non-``None`` result. Built-in plugins
implement them with ``trylast=True``, so an installed plugin's claim wins over the
built-in one, and an implementation marked ``tryfirst=True`` wins over both.

All hooks appeared in version 0.1, except where a docstring says otherwise.

Arguments with a default (``findings=None``) were added after 0.1: a caller that does not
pass them (code written for 0.1) makes pluggy pass the default, so old callers keep
working (this needs pluggy 1.7 or later).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from cleanai_core.graph.findings import ModelFindings
    from cleanai_core.interfaces import IndexMapper, LayerPruner

PROJECT = "cleanai"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "hookimpl", "hookspec"]

# ---------------------------------------------------------------------------
# Graph building: who slices what
# ---------------------------------------------------------------------------


@hookspec
def cleanai_prepare_model(model: nn.Module) -> dict[str, Any] | None:
    """Scan a model once, before any of its modules is claimed, and return what you found.

    For patterns visible only from above a module (this ``Linear`` is the ``qkv`` of an
    attention block that reshapes to its input width; this block slices a fixed range of
    channels that a fix-up will rewrite). The kernel calls it once per model it is about
    to claim: when a :class:`~cleanai_core.DependencyGraph` is built, before a model (or
    its copy) is sliced, and when a history is replayed. The answers of all plugins are
    joined into one :class:`~cleanai_core.graph.findings.ModelFindings`, handed to
    :func:`cleanai_layer_pruner` and :func:`cleanai_after_prune` as ``findings`` and to
    pruners and mappers while tracing as ``ctx.findings``. Findings describe the model as
    scanned, before slicing. Do not keep them anywhere else (no module-level tables): the
    kernel hands them to you where you need them.

    Appeared in version 0.2.

    :param model: the model about to be claimed (the user's model, a copy, or a rebuilt
        model during replay).
    :returns: ``{key: finding}`` under keys of your own (e.g. your plugin's name), or
        ``None``. A key answered by two plugins is an error, unless both answers are sets
        (modules several plugins vouch for): those are joined.
    """


@hookspec(firstresult=True)
def cleanai_layer_pruner(module: nn.Module, name: str, findings: ModelFindings | None = None) -> LayerPruner | None:
    """Claim a module: return the :class:`~cleanai_core.interfaces.LayerPruner` that
    traces and slices it, or ``None`` to let other plugins decide.

    Called once per module instance while a :class:`~cleanai_core.DependencyGraph` is
    built; the answer is kept on the graph node, never asked again per channel. A
    claimed module is a leaf of the graph: the operations inside its ``forward`` are not
    traced, so a plugin can claim a whole composite (an attention block, an LSTM).

    :param module: the module instance (claims may depend on attributes, not only type).
    :param name: its qualified name in the model (``"layer1.0.conv1"``).
    :param findings: what :func:`cleanai_prepare_model` found in the model that holds
        ``module``; ``None`` when the hook is called outside a model scan (a direct
        call). Added in version 0.2.
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
    ``None`` to let others decide (default: the last dimension larger than one, else the
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
def cleanai_default_freezes(graph: Any, ratio: float | None) -> list[tuple[torch.Tensor, str]] | None:
    """Units of a built graph to keep unless the user says otherwise, each with a reason:
    for defaults that depend on the coupling, not on one module (a transformers config
    that can describe only some widths). Called by the pruner once per graph it builds,
    after the default ignores, and by ``cleanai explain``; the kernel freezes what the
    plugins return and regroups, so :meth:`DependencyGraph.explain` shows the reasons.
    A plain :class:`~cleanai_core.DependencyGraph` (the masking oracle) does not call it.
    To prune those units anyway, disable the plugin that names them.

    Added in version 0.2.

    :param graph: the :class:`~cleanai_core.DependencyGraph`; read ``graph.groups()``,
        ``graph.model``; do not modify it.
    :param ratio: the share of every group the pruner's uniform plan takes (its
        ``pruning_ratio``), or ``None`` where the plan is not uniform (targets, global
        ranking, per-layer ratios, several steps, ``cleanai explain``). An implementation
        may leave this argument out.
    :returns: ``[(units, reason)]``: root atom ids (``Group.units``) and why they stay,
        or ``None``. The results of all plugins are joined.
    """


@hookspec
def cleanai_leaf_modules(model: nn.Module) -> list[type | nn.Module] | None:
    """Modules (types or instances) not to enter while tracing and not to prune: every
    channel that flows into or out of them is frozen. For code the tracer cannot follow.
    (To find patterns in a model for your claims or fix-ups, use
    :func:`cleanai_prepare_model`, not this hook.)

    :returns: types or module instances (results of all plugins are joined).
    """


@hookspec
def cleanai_whole_heads(model: nn.Module) -> list[nn.Module] | None:
    """Attention modules whose heads must stay whole: a reshape run directly in their
    ``forward`` that splits a channel dimension into several (``(heads, head_dim)``,
    ``(heads, 3, head_dim)``) keeps the outermost sub-dimension (the heads, or the key/value
    heads of a grouped ``(kv, group, head_dim)`` view) and ties the others, whatever the
    attention implementation does next. For code that derives the head count from the
    tensor (``view(b, s, -1, head_dim)``) and rotary embeddings that pair dimensions of a
    head.

    :returns: a list of modules of ``model`` (results of all plugins are joined).
    """


@hookspec
def cleanai_attention_heads(model: nn.Module) -> list[Any] | None:
    """Where the attention heads of ``model`` lie, for the report: one
    :class:`~cleanai_core.heads.HeadLayout` per attention module you know, naming the
    ``(module, slice)`` whose channels carry its query heads and the one that carries its
    key/value heads, with the head of each channel (``-1`` for channels of another part,
    :func:`~cleanai_core.heads.heads_in_rows` builds the common forms). Asked once per graph,
    on the model before it is sliced; the report counts the heads before and after and lists
    the ones that went (``report.json``'s ``attention_heads``). Nothing is pruned differently.

    :returns: a list of layouts (results of all plugins are joined; the first layout of a
        module wins). Added in version 0.2.
    """


# ---------------------------------------------------------------------------
# After slicing
# ---------------------------------------------------------------------------


@hookspec
def cleanai_after_prune(
    module: nn.Module,
    name: str,
    edits: dict[tuple[str, str], torch.Tensor],
    findings: ModelFindings | None = None,
) -> None:
    """Fix attributes that live outside tensors once slicing is done (``num_heads``,
    ``head_dim``, ``attn_dim``...). Called for every module of the pruned model, after
    every slice was applied, in module order; also during replay.

    :param module: a module of the pruned model.
    :param name: its qualified name.
    :param edits: the kept indices of every slice that changed, keyed by
        ``(module name, slice name)`` (e.g. ``("blocks.0.attn.qkv", "out")``), in the
        index space *before* slicing. Attributes of ``module`` itself are not yet updated.
    :param findings: what :func:`cleanai_prepare_model` found in the model *before* it
        was sliced (widths, head counts as they were); ``None`` when called outside a
        slicing. Added in version 0.2.
    """


# ---------------------------------------------------------------------------
# Scoring: importance criteria, reducers, normalisers
# ---------------------------------------------------------------------------


@hookspec
def cleanai_importances() -> dict[str, Any] | None:
    """Register importance criteria by name: ``{"magnitude": factory, ...}``.

    A factory is called with keyword options and returns an object implementing
    :class:`~cleanai_core.interfaces.Importance`: ``needs_activations``,
    ``needs_gradients`` and ``__call__(group, ctx)`` with ``ctx`` a
    :class:`~cleanai_core.scoring.ScoringContext`. Names must be unique across plugins;
    a duplicate is an error naming both plugins.
    """


@hookspec
def cleanai_reducers() -> dict[str, Any] | None:
    """Register reducers by name: functions folding a stack of per-term scores
    ``(n_terms, n_units)`` into one score per unit (``sum``, ``mean``, ``max``...).

    Criteria take a reducer by name as their ``reducer`` option and resolve it with
    :func:`cleanai_core.scoring.get_reducer` when they are built (the built-ins fold
    their per-slice or per-consumer terms with ``"mean"``, Taylor with ``"sum"``)."""


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

    :param spec: the ``--model`` string (or the ``spec`` of a saved folder's
        ``architecture.json``).
    :param options: resolved CLI options (``weights``, ``trust_model``, ``num_classes``...).
        ``trust_code`` is true only when the caller consents to importing and calling code
        that the spec names (a spec typed on the command line, ``--trust-code``,
        ``load_pruned(..., trust_code=True)``); ``spec_source`` says where the spec came
        from, for messages. A loader that resolves names it registered itself needs no
        consent; one that imports what the spec names must refuse without ``trust_code``.
        Code that the folder a spec names ships (a saved folder's import spec, an ``hf:``
        folder's ``auto_map``) needs more: typing the folder's name is no consent to run it;
        ``options["trust_folder_code"]``, where present, is the command line's
        ``--trust-code`` alone (``load_pruned`` passes only ``trust_code``).
        A loader whose spec depends on the working directory (a relative folder) may set
        ``options["resolved_spec"]`` to a spec that names the same model from anywhere
        (``hf:/abs/folder``); ``cleanai prune`` writes that one to ``architecture.json``.
        A loader that builds the model in float32 from files that store it in a narrower
        floating dtype (a ``bfloat16`` checkpoint) may set ``options["stored_dtype"]`` to
        that ``torch.dtype``; ``cleanai prune`` writes the pruned weights in it, except the
        parameters and buffers named in ``options["stored_float32"]`` (names as in the
        model's ``state_dict``), which the files keep in float32 beside the rest.
        ``options["meta_probe"]`` is true where ``load_pruned`` builds the architecture on
        the meta device to check the folder's shapes before the real build: a loader that
        runs code the user consented to (an import spec's factory) returns ``None`` there,
        so that the code runs once (the real build checks the shapes then).
    """


@hookspec(firstresult=True)
def cleanai_load_dataset(spec: str, options: dict[str, Any]) -> Any | None:
    """Build a ``torch.utils.data.Dataset`` from a ``--data`` spec (a folder, a file,
    ``package.module:function``). Items are tensors or ``(input, label)`` pairs. Return
    ``None`` when the spec is not yours. Stops at first non-None result.

    :param spec: the ``--data`` string.
    :param options: resolved CLI options (``model``, ``image_size``, ``trust_code`` and
        ``spec_source`` as for :func:`cleanai_load_model`).
    """


@hookspec(firstresult=True)
def cleanai_evaluate(model: nn.Module, loader: Any, device: torch.device) -> dict[str, float] | None:
    """Evaluate a model on labelled data; return metrics such as ``{"accuracy": 0.93}``,
    ``{"accuracy_note": "why accuracy does not apply"}`` (shown to the user and kept in
    ``report.json``), ``"metric_note"`` saying what the numbers measure (a masked LM's: its
    masked tokens; a note under the report's headline), or ``None`` when not yours. Stops at
    first non-None result."""


@hookspec
def cleanai_save_outputs(model: nn.Module, folder: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    """Write extra files for the pruned model into the output folder of ``cleanai prune``
    or ``save_pruned`` (a Hugging Face ``save_pretrained`` folder, an export). Called after
    ``model.pt`` and ``history.json`` are written and before the report, inside the staged
    folder that replaces ``--out`` (or ``save_pruned``'s folder) when the save succeeds; the
    entries written are listed in ``architecture.json`` (``outputs``) and replaced by a
    later save.

    :param model: the pruned model, on the CPU, in eval mode.
    :param folder: the output folder (a ``pathlib.Path``).
    :param options: ``example`` (one input batch, as the model is called; ``None`` where
        ``save_pruned`` was given no ``example_inputs``), ``model_spec``.
    :returns: entries to add to ``report.json`` (e.g. ``{"hf_folder": "hf"}``), or ``None``.
        Results of all plugins are merged.
    """


@hookspec
def cleanai_report_sections(report: dict[str, Any]) -> list[tuple[str, str]] | None:
    """Add sections to ``report.md``: a list of ``(title, markdown)``. ``report`` is the
    JSON report as a dict, read-only."""


@hookspec
def cleanai_input_forms() -> dict[str, str] | None:
    """Describe the ``--model`` and ``--data`` specs your loaders accept, for the messages
    that tell a user what to give: ``{"model": "timm:NAME, ...", "data": "an image folder,
    ..."}`` (either key may be left out). Results of all plugins are joined."""


@hookspec
def cleanai_commands() -> list[Any] | None:
    """Contribute ``cleanai`` subcommands: objects (modules, typically) with ``NAME``
    (the command word), ``add_parser(subparsers)`` returning its ``argparse`` parser, and
    ``run(args) -> int`` (the exit code). Results of all plugins are merged; a name the
    kernel already has (``prune``, ``explain``, ``plugins``) is an error."""
