"""StructuredPruner: the pipeline's sequencer. It holds the state between stages and calls them
in order; each stage is a module of free functions (the list: ``docs/architecture.md``)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cleanai_core import distributed, options, scoring
from cleanai_core.bn_correction import BN_SAMPLES
from cleanai_core.calibration import COVARIANCE_BUDGET_BYTES, COVARIANCE_ROWS
from cleanai_core.collect import Calibration, CalibrationSetup, calibrate, held_gradients
from cleanai_core.compensation import compensated_copy
from cleanai_core.dead_units import dead_plan
from cleanai_core.device_defaults import default_round_to
from cleanai_core.errors import PruningError, UserError, model_fault, shown
from cleanai_core.graph.dependency import DependencyGraph, prunable_graph
from cleanai_core.graph.groups import Group
from cleanai_core.history import PruningHistory
from cleanai_core.isomorphic import Signatures, scopes_of, signatures
from cleanai_core.masking import check_exact, exact_tolerance, exact_units, masked_outputs, unsteady_outputs, within
from cleanai_core.metrics import count_flops, count_params
from cleanai_core.model_state import (
    layout_change,
    layout_of,
    reads_preserved,
    transplant,
    user_hooks,
    warn_user_hooks,
    writes_nothing,
)
from cleanai_core.option_names import check_option_names, keywords, missing_attribute
from cleanai_core.options import ModuleSpec, match_modules
from cleanai_core.planning import PruningPlan, make_plan, unroundable_note
from cleanai_core.pruning_report import describe_importance, pruner_report
from cleanai_core.runtime import copy_modes, device_of, plain_inputs, without_autocast
from cleanai_core.scoring import ScoringContext, WeightActivationImportance, get_importance, score_groups
from cleanai_core.slicing import SliceEdit
from cleanai_core.steps import group_ratios, layer_scope_ratios, prune_in_steps, step_caps
from cleanai_core.targets import (
    TrialMemory,
    flops_measure,
    params_measure,
    pruned_size,
    ratio_for_target,
    unshrunk_params,
)
from cleanai_core.verify import (
    Reference,
    check_outputs,
    model_outputs,
    other_paths,
    reference,
    run_outputs,
    untraced_layers,
)

__all__ = ["StructuredPruner", "match_modules"]


def _autograd_on(model: nn.Module | None = None) -> contextlib.ExitStack:
    """Autograd on and the caller's ``torch.autocast`` off (``runtime.without_autocast``: under
    a bfloat16 autocast the statistics were bfloat16 activations' and another ResNet-18 plan
    came out), also when called under ``torch.no_grad()`` or ``torch.inference_mode()``:
    gradient criteria raised ``element 0 of tensors does not require grad``, and under
    inference mode the tensors made there cannot be updated in place. A ``with`` block, not
    a decorator: the warnings' ``stacklevel`` counts the frames to the user's line.

    With ``model``: the user's model in eval mode, its state put back at the end
    (:func:`~cleanai_core.model_state.reads_preserved`) for everything between the model runs
    too: a ``spectral_norm`` weight read in training mode (by a plugin's scan, the graph,
    the scores) runs a power iteration that rewrites its ``_u`` / ``_v``, so building a
    pruner changed the user's model."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    stack.enter_context(without_autocast())  # the caller's bfloat16 autocast: statistics in the model's dtype
    if model is not None:
        stack.enter_context(reads_preserved(model))
    return stack


#: the options :func:`_checked_options` checks, by the constructor's names (and attributes):
#: numbers, switches (``True`` / ``False``) and the rest
_NUMBERS = (
    "pruning_ratio", "max_layer_ratio", "round_to", "min_channels", "target_flops", "target_params",
    "iterative_steps", "covariance_rows", "stats_budget_bytes", "bn_samples",
)  # fmt: skip
_SWITCHES = (
    "global_pruning", "bias_compensation", "reconstruction", "recalibrate_bn", "inplace", "verify", "prune_dead_only",
)  # fmt: skip
_POSITIONAL = ("self", "model", "example_inputs")  # not options: not offered as a near name
_CHECKED = (*_NUMBERS, *_SWITCHES, "isomorphic", "round_mode", "forward_fn", "output_transform", "importance")


def _checked_options(
    given: dict[str, Any], layer_ratios: Any, rounded: bool, device: torch.device | None
) -> dict[str, Any]:
    """The options of ``given`` (every name of :data:`_CHECKED`) checked, NumPy and 0-d
    torch numbers made Python ones (``np.float32(0.5)`` was "not a number"), ``round_to=
    "auto"`` resolved for ``device`` and an importance name resolved: one code path for the
    constructor and for attributes set after it (``pruner.pruning_ratio = 1.5``), which had
    a near-copy of these checks. ``rounded``: ``round_to`` was asked for (not ``"auto"``)."""
    o = {k: options.plain_number(v) if k in _NUMBERS else v for k, v in given.items()}
    options.check_switches(**{k: o[k] for k in _SWITCHES})
    options.check_callables(forward_fn=o["forward_fn"], output_transform=o["output_transform"])
    importance = options.as_importance(o["importance"])
    o["importance"] = get_importance(importance) if isinstance(importance, str) else importance
    if importance is None:  # the default, also set after construction (pruner.importance = None raised TypeError)
        o["importance"] = WeightActivationImportance()
    if o["round_to"] == "auto":  # the device's default
        o["round_to"] = default_round_to(device)
    zero_ok = bool(layer_ratios) or bool(o["prune_dead_only"])  # pruning_ratio=0: only those decide
    options.check_targets(o["pruning_ratio"], o["target_flops"], o["target_params"], o["iterative_steps"], zero_ok)
    options.check_options(
        o["max_layer_ratio"], o["round_to"], o["covariance_rows"], o["stats_budget_bytes"], o["min_channels"],
        o["bn_samples"],
    )  # fmt: skip
    options.check_round_mode(o["round_mode"])
    options.check_ranking(o["global_pruning"], o["isomorphic"])
    asked = o["target_flops"] is not None or o["target_params"] is not None or layer_ratios
    if o["prune_dead_only"] and (asked or o["global_pruning"] or rounded):
        raise UserError(  # they were ignored: the dead units alone set what goes
            "prune_dead_only=True removes exactly the units that never activate; target_flops, target_params, "
            "layer_pruning_ratios, global_pruning and round_to do not apply: drop them or prune_dead_only"
        )
    return o


class StructuredPruner:
    """Prune a trained model by real slicing, scoring units on your data.

    Example::

        importance = WeightActivationImportance(weight_ratio=0.5, activation_ratio=0.5)
        pruner = StructuredPruner(model, example_inputs, importance, pruning_ratio=0.3,
                                  ignored_layers=[model.fc])
        pruner.collect_activations(test_loader, num_batches=10)
        pruned_model = pruner.prune()
        print(pruner.report()["params_after"])

    :param model: the trained model; not modified unless ``inplace=True``. A
        ``torch.compile`` wrapper is pruned through the module it wraps: ``prune()`` returns
        the pruned module (compile it again), with ``inplace=True`` the wrapper itself.
    :param example_inputs: one batch of inputs (tensor, tuple or dict) for tracing.
    :param importance: a criterion object or a registered name; default
        :class:`WeightActivationImportance`.
    :param pruning_ratio: share of each group's units to remove (0 < r < 1); with
        ``global_pruning``, the share of all groups' units, ranked together. A share of
        units, not of parameters: units differ in cost, and global ranking takes the cheapest
        (0.3 keeps 0.67 of a MobileNet-V3's parameters, per group 0.58). For a share of the
        parameters give ``target_params``. The report says which (``ranking``,
        ``units_before``, ``units_after``).
    :param layer_pruning_ratios: ``{module | name | glob | type: ratio}``; a key may be a
        tuple of them (``{(model.layer1, model.layer2): 0.4}``, Torch-Pruning's scopes): each
        layer gets the ratio, and under ``global_pruning`` their units rank together and lose
        the ratio in all.
    :param ignored_layers: modules, names, globs or types whose output channels are kept
        (plus the classifier heads the ``cleanai_default_ignores`` hook names); a bare tensor
        of the model (``model.pos_embed`` or ``"pos_embed"``) keeps the channels it carries.
    :param global_pruning: rank units of all groups together (scores normalised per group).
    :param isomorphic: with ``global_pruning``: rank units only among groups of the same
        structure (:mod:`cleanai_core.isomorphic`: same module types, slices and shapes apart
        from the pruned width, e.g. all attention-heads groups of a ViT, all its MLP groups),
        each such set losing ``pruning_ratio`` of its units. Without ``global_pruning`` it is
        a :class:`UserError` (uniform pruning already ranks every group alone).
    :param max_layer_ratio: with global pruning, the most any group may lose, above 0 and
        at most 1 (1, Torch-Pruning's default ``max_pruning_ratio``, caps nothing: every group
        still keeps ``min_channels``).
    :param round_to: kept channel counts rounded up to a multiple (e.g. 8); ``"auto"``: what
        pays on the model's device (:mod:`cleanai_core.device_defaults`: none on CPU, 8 on CUDA).
        A group whose units span several channels (a grouped convolution's) and that no
        multiple fits below its width stays whole, with a ``RuntimeWarning`` naming a
        ``round_to`` that lets it shrink.
    :param round_mode: ``"up"`` (default): ``round_to`` rounds kept counts up; ``"nearest"``:
        to the nearest multiple (halves up, at least one multiple), so a layer may lose a few
        more or fewer units than the ratio asks. On CPU with NCHW tensors, where convolutions
        pad channels to blocks of 16, ``round_to=16, round_mode="nearest"`` measured as fast
        as no rounding or faster while keeping more channels (docs/benchmarks.md, session 16;
        channels-last: as fast, no gain).
    :param min_channels: units every group keeps at least.
    :param target_flops: instead of ``pruning_ratio``, keep this share of the FLOPs.
    :param target_params: instead of ``pruning_ratio``, keep this share of the parameters
        (searched like ``target_flops``; not with ``iterative_steps``).
    :param iterative_steps: prune in this many steps, re-collecting statistics in between.
    :param iterative_schedule: with ``iterative_steps``, how much is gone after each step
        (default: equal steps): Torch-Pruning's ``iterative_pruning_ratio_scheduler``, a
        function ``(pruning_ratio, steps)`` returning ``steps + 1`` ratios rising from 0 to
        ``pruning_ratio`` (the removed share before the first step and after each), or those
        ratios. Layer ratios follow the same curve; not with ``target_flops`` /
        ``target_params``.
    :param bias_compensation: fold removed channels' mean into consumers' bias.
    :param reconstruction: also fold removed channels into the kept ones by least squares
        (``x_removed ~ shift + coef @ x_kept``) from each consumer's channel covariance,
        collected during calibration for ungrouped convs and linears; needs ``bias_compensation``.
    :param covariance_rows: positions per calibration batch, drawn at random, that feed each
        covariance (cost rows x C^2 per batch); ``0``: every position.
    :param stats_budget_bytes: memory for the covariances, default 1 GiB, narrowest consumers
        first; the others (and layers above 4096 channels) fall back to mean compensation.
    :param recalibrate_bn: correct BatchNorm running statistics by what pruning changed at
        their inputs on the calibration data (:mod:`cleanai_core.bn_correction`).
    :param bn_samples: the BatchNorm correction runs the pruned model on calibration batches
        spread evenly over the data that hold at least this many samples (default 256;
        ``0``: every batch). Its cost stops growing with the calibration set, which still
        feeds every statistic of scoring and compensation.
    :param inplace: slice ``model`` itself (rolled back if anything fails). Its parameters stay
        the objects your optimizer and tensor hooks hold, with the pruned values and shapes;
        per-parameter optimizer state (momentum) of a sliced one keeps the old shape: clear
        it (``optimizer.state.clear()``) or prune inside training with :class:`GradualPruner`,
        which slices it.
    :param forward_fn: ``forward_fn(model, inputs)`` calls the model (default: by input type).
    :param output_transform: maps the model's output to what verification compares.
    :param normalizer: how scores are normalised per group for global ranking: a name
        (``"mean"``, the default; ``None`` or ``"none"``: not at all) or a function from one
        group's scores (a float64 tensor) to as many normalised scores.
    :param verify: check that every pruned model runs, with the original's output shapes and
        finite outputs, and that slicing alone matches the masking oracle on the example inputs
        (groups that normalise across channels aside); groups that fail are found, skipped and
        named in a warning.
    :param prune_dead_only: remove exactly the units that never activate on the calibration
        data (:mod:`cleanai_core.dead_units`); the outputs on that data do not change.
    """

    def __getattr__(self, name: str) -> Any:
        # reached only for a missing attribute: Torch-Pruning's method names get CleanAI's way
        return missing_attribute(self, name)

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        importance: Any = None,
        pruning_ratio: float = 0.3,
        layer_pruning_ratios: Mapping[ModuleSpec, float] | None = None,
        ignored_layers: Iterable[ModuleSpec] | None = None,
        global_pruning: bool = False,
        max_layer_ratio: float = 0.9,
        isomorphic: bool = False,
        round_to: int | str | None = "auto",
        round_mode: str = "up",
        min_channels: int = 1,
        target_flops: float | None = None,
        target_params: float | None = None,
        iterative_steps: int = 1,
        iterative_schedule: Callable[[float, int], Sequence[float]] | Sequence[float] | None = None,
        bias_compensation: bool = True,
        reconstruction: bool = True,
        covariance_rows: int = COVARIANCE_ROWS,
        recalibrate_bn: bool = True,
        inplace: bool = False,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        output_transform: Callable[[Any], Any] | None = None,
        normalizer: str | Callable[[torch.Tensor], torch.Tensor] | None = "mean",
        verify: bool = True,
        stats_budget_bytes: int = COVARIANCE_BUDGET_BYTES,
        prune_dead_only: bool = False,
        bn_samples: int = BN_SAMPLES,
        **other_options: Any,
    ) -> None:
        # a keyword it does not take (Torch-Pruning's ch_sparsity, max_pruning_ratio, ...) is answered in CleanAI's
        # terms; it was Python's bare "got an unexpected keyword argument"
        check_option_names(other_options, keywords(StructuredPruner.__init__, _POSITIONAL), "StructuredPruner")
        options.check_model(model)
        ignored_layers = options.as_specs(ignored_layers, "ignored_layers")
        layer_pruning_ratios = options.as_ratio_table(layer_pruning_ratios)
        rounded = options.plain_number(round_to) not in ("auto", None, 1)  # "auto": the device's default
        given = dict(locals())  # the arguments, by name
        checked = _checked_options({k: given[k] for k in _CHECKED}, layer_pruning_ratios, rounded, device_of(model))
        pruning_ratio, max_layer_ratio, round_to, min_channels = (
            checked[k] for k in ("pruning_ratio", "max_layer_ratio", "round_to", "min_channels")
        )
        target_flops, target_params, iterative_steps = (
            checked[k] for k in ("target_flops", "target_params", "iterative_steps")
        )
        covariance_rows, stats_budget_bytes, bn_samples, importance = (
            checked[k] for k in ("covariance_rows", "stats_budget_bytes", "bn_samples", "importance")
        )
        example_inputs = plain_inputs(example_inputs)  # a tokenizer's BatchEncoding: a dict
        options.check_example_inputs(example_inputs)
        # a torch.compile or DataParallel wrapper: the work runs on the module it wraps (the history names its
        # layers); in place, prune() returns the wrapper (it recompiles for the new shapes), else the pruned
        # module, to compile or wrap again
        self._given, model = model, options.pruned_module(model)
        self.model, self.example_inputs = model, example_inputs
        self.importance = importance  # None: the default, made by _checked_options
        self.pruning_ratio = float(pruning_ratio)
        self.global_pruning, self.max_layer_ratio = global_pruning, max_layer_ratio
        self.isomorphic = isomorphic
        self._sets: Signatures | None = None  # with isomorphic: the original groups' signatures
        self.round_to, self.round_mode, self.min_channels = round_to, round_mode, min_channels
        self.target_flops, self.target_params = target_flops, target_params
        self.iterative_steps = iterative_steps
        # per step, the share of the way to the final counts it ends at (None: equal steps)
        targeted = target_flops is not None or target_params is not None
        self._schedule = options.schedule_shares(iterative_schedule, self.pruning_ratio, iterative_steps, targeted)
        # while prune() runs iteratively: (step, steps), and each group's original and final unit counts
        self._step, self._targets = (0, 1), {}
        self._widths: dict[tuple[str, str], int] = {}  # while prune() runs iteratively: original group widths
        self._share: float | None = None  # a GradualPruner step: how far along to _targets it ends
        self.bias_compensation = bias_compensation
        self.reconstruction = reconstruction and bias_compensation
        self.covariance_rows, self.stats_budget_bytes = covariance_rows, stats_budget_bytes
        self.recalibrate_bn, self.inplace, self.verify = recalibrate_bn, inplace, verify
        self.bn_samples = bn_samples
        self.forward_fn, self.output_transform = forward_fn, output_transform
        self.normalizer = normalizer  # the name, resolved by the setter
        self.prune_dead_only = prune_dead_only
        self._ignored_specs = ignored_layers
        self.set_layer_ratios(layer_pruning_ratios or {})
        self.ignored = options.ignored_modules(model, ignored_layers or ())
        self.history, self.calibration = PruningHistory(), Calibration()
        self.scored_with_held_gradients = False  # Taylor scored with the gradients the user's backward left
        self._plan: PruningPlan | None = None
        self.pruned_model: nn.Module | None = None
        self.skipped_groups: list[str] = []
        self._before: dict[str, Any] = {}
        self._reference: Reference | None = None  # the original's outputs, for verification
        self._repeatable: bool | None = None  # whether two runs of the original on example_inputs agree
        self._unsteady: frozenset[int] | None = None  # outputs that jump where the example inputs barely move
        # a calibration batch that ran layers the trace of example_inputs did not (control flow that
        # depends on the data), and the original's outputs on it: the pruned model is checked on it too
        self._other_path: tuple[tuple, dict] | None = None
        self._other_reference: Reference | None = None
        self._pruned_plans: list[tuple[DependencyGraph, PruningPlan]] = []  # per step, for the report
        with _autograd_on(model):
            self.graph = self._build_graph(model)
        self._layout = layout_of(model)  # what the graph describes (_check_unchanged)
        self._check_ratios_reach(options.as_ratio_table(layer_pruning_ratios or {}) or {})
        units = sum(g.size for g in self.graph.groups(prunable_only=True))
        if iterative_steps > units:  # 10**9 steps ran until killed, each re-tracing and removing nothing
            raise UserError(
                f"iterative_steps={iterative_steps} is more steps than the {units} units this model can lose in all "
                f"(each step removes at least one, or only repeats the work); give at most {units} (a few steps are "
                "usual)"
            )

    # constructor options kept in another form: set after construction, they were plain new attributes that
    # nothing read (pruner.layer_pruning_ratios = {"fc": 0.9} pruned as before, without a word)
    @property
    def layer_pruning_ratios(self) -> dict[str, float]:
        """The per-layer ratios, by layer name; setting it is :meth:`set_layer_ratios`."""
        return dict(self.layer_ratios or {})

    @layer_pruning_ratios.setter
    def layer_pruning_ratios(self, ratios: Mapping[ModuleSpec, float] | None) -> None:
        self.set_layer_ratios(ratios or {})

    @property
    def ignored_layers(self) -> list[Any]:
        """The ``ignored_layers`` given; fixed once the graph is built (its groups depend on them)."""
        return list(self._ignored_specs or ())

    @ignored_layers.setter
    def ignored_layers(self, specs: Any) -> None:
        raise UserError(
            "ignored_layers cannot change after the pruner is built: its groups and statistics depend on them. Build "
            "a new pruner with them: StructuredPruner(model, example_inputs, ..., ignored_layers=[...])"
        )

    @property
    def normalizer(self) -> Any:
        """The normaliser of global ranking (a function); set it by name (``"mean"``, ``"max"``, ...)."""
        return self._normalizer

    @normalizer.setter
    def normalizer(self, name: str | Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        if name is None:  # Torch-Pruning's normalizer=None: scores ranked as they are
            name = "none"
        if callable(name):  # Torch-Pruning's normalizer=fn: one group's scores in, as many out
            self._normalizer = scoring.user_normalizer(name)
            return
        if not isinstance(name, str):  # a list raised "unhashable type" from the look-up
            raise UserError(f"normalizer={shown(name)} must be the name of a normaliser, e.g. 'mean'")
        self._normalizer = scoring.get_normalizer(name)

    @property
    def stats(self) -> dict:
        """Calibration statistics per ``(module, slice)`` of the original model."""
        return self.calibration.stats

    @property
    def gradients(self) -> dict[str, torch.Tensor]:  # loss gradients per parameter, for gradient criteria
        return self.calibration.gradients

    def _build_graph(self, model: nn.Module) -> DependencyGraph:
        uniform = not (
            self.global_pruning
            or self.layer_ratios
            or self.prune_dead_only
            or self.iterative_steps > 1
            or self.target_flops is not None
            or self.target_params is not None
        )
        ratio = self.pruning_ratio if uniform else None
        return prunable_graph(model, self.example_inputs, self.forward_fn, self.output_transform, self.ignored, ratio)

    # -- calibration -----------------------------------------------------------------
    def collect_activations(
        self,
        loader: Iterable[Any],
        num_batches: int | None = None,
        progress: bool = True,
        sequential: bool | str = False,
    ) -> StructuredPruner:
        """Stream per-channel statistics at every consumer's input over ``loader``
        (tensors, ``(x, y)`` pairs or dicts). Memory is bounded by the channel count.
        ``sequential=True`` (or the name of the block list, e.g. ``"model.layers"``) runs
        the batches through one block at a time (:mod:`cleanai_core.sequential`).
        Under an initialised ``torch.distributed`` group, ``loader`` is this rank's
        shard (:func:`cleanai_core.distributed.shard`), ``num_batches`` counts this rank's
        batches, and the statistics are summed over ranks."""
        num_batches = options.plain_number(num_batches)
        options.check_switches(progress=progress)  # "no" showed the bar
        self._check_not_pruned_in_place("collect_activations")
        self._check_unchanged()
        with _autograd_on(self.model):
            setup = CalibrationSetup.of(self)
            with other_paths(self.model, untraced_layers(self.graph)) as seen:
                self.calibration = calibrate(
                    self.model, self.graph.slices, loader, num_batches, setup, progress, sequential
                )
            # the ranks verify alike (one rank's batch would make its plan differ from the others')
            self._other_path = None if distributed.is_distributed() else seen.inputs
            self._other_reference = None
            self._plan = None
            return self

    # -- scoring and planning ----------------------------------------------------------
    def score(self, graph: Any = None, model: Any = None, calibration: Any = None) -> dict[int, torch.Tensor]:
        """Every prunable group's unit scores (the original model's unless given)."""
        if graph is None and model is None:
            self._check_not_pruned_in_place("score")
        graph = self.graph if graph is None else graph
        model = self.model if model is None else model
        _check_graph_of(graph, model, "score")
        cal = self.calibration if calibration is None else calibration
        held = None if cal.gradients or model is not self.model else held_gradients(model, self.importance, self.graph)
        if model is self.model:  # the report says so: scored on no data, with whatever backward left them
            self.scored_with_held_gradients = bool(held)
        grads = cal.gradients or held
        ctx = ScoringContext(graph, cal.stats, model, bias_compensation=self.bias_compensation, gradients=grads)
        return score_groups(self.importance, graph, ctx)

    def make_plan(
        self,
        ratio: float,
        scores: dict,
        graph: Any = None,
        ratios: Any = None,
        ranked: Any = None,
        set_ratios: Mapping[Hashable, float] | None = None,
    ) -> Any:
        """A :class:`PruningPlan` at ``ratio`` with this pruner's options. ``ratios``: per group
        id, instead of the layer ratios (and this step's share of them); ``ranked``: global
        ranking, instead of ``global_pruning``; ``set_ratios``: with ``isomorphic``, per
        isomorphic set, instead of ``ratio``."""
        graph = self.graph if graph is None else graph
        if not isinstance(graph, DependencyGraph):  # graph="g": AttributeError: 'str' object has no attribute 'groups'
            raise UserError(f"make_plan: graph={shown(graph)} must be a DependencyGraph (default: the pruner's)")
        if ranked is not None:
            options.check_switches(ranked=ranked)  # "no" ranked globally
        groups = graph.groups(prunable_only=True)
        if ratios is None:
            ratios = group_ratios(
                groups, self.layer_ratios, *self._step, self._targets, self.global_pruning, graph, self._share
            )
        ranked = self.global_pruning if ranked is None else ranked
        caps = step_caps(groups, self._widths, self.max_layer_ratio) if ranked and self._widths else None
        scopes = self.isomorphic_scopes(groups) if ranked and self.isomorphic else None
        if ranked and self.layer_scopes:  # a tuple of layers given one ratio: its groups rank together
            tuple_scopes, tuple_ratios = layer_scope_ratios(self, groups, ratios)
            if tuple_scopes:
                ratios = {gid: r for gid, r in ratios.items() if gid not in tuple_scopes}
                scopes = {**(scopes or {}), **tuple_scopes}
                set_ratios = {**(set_ratios or {}), **tuple_ratios}
        return make_plan(
            groups,
            scores,
            graph.root.numel(),
            ratio,
            group_ratios=ratios,
            global_pruning=ranked,
            max_layer_ratio=self.max_layer_ratio,
            round_to=self.round_to,
            round_nearest=self.round_mode == "nearest",
            min_units=self.min_channels,
            normalizer=self.normalizer,
            caps=caps,
            scopes=scopes,
            scope_ratios=set_ratios,
        )

    def isomorphic_scopes(self, groups: list[Group]) -> dict[int, Hashable]:
        """Per group id, the signature of its isomorphic set (:mod:`cleanai_core.isomorphic`),
        read on the original model and matched through producing slices, so the groups of
        a later iterative step stay in their original sets; a group that matches none ranks
        alone."""
        if self._sets is None:
            self._sets = signatures(self.graph.model, self.graph.groups(prunable_only=True))
        return scopes_of(groups, self._sets)

    def set_layer_ratios(self, ratios: Mapping[ModuleSpec, float]) -> None:
        """Replace the per-layer ratios (``{module | name | glob | type: ratio}``, 0 keeps
        a layer whole; the first entry matching a layer wins), e.g. with the ones
        :func:`cleanai_core.sensitivity.allocate_ratios` chose. Forgets any plan made. A ratio
        above 0 for an ignored layer is refused, here as in the constructor (it was dropped
        without a word when set here)."""
        table = options.as_ratio_table(ratios)
        named = options.layer_ratios(self.model, table)  # None: no ratios
        options.check_ignored_ratios(self.model, getattr(self, "_ignored_specs", None), table or {})
        if getattr(self, "graph", None) is not None:  # the constructor checks once the graph is built
            self._check_ratios_reach(table or {})
        self.layer_ratios, self._plan = named, None
        self.layer_scopes = options.layer_scopes(self.model, table or {})
        self._ratios_set = (named, dict(named or {}))  # what :meth:`_check_attributes` compares against

    def _check_ratios_reach(self, table: Mapping[ModuleSpec, float]) -> None:
        """A :class:`UserError` for a layer ratio above 0 whose layers carry the channels of
        no prunable group: ``layer_pruning_ratios={"fc": 0.5}`` for the classifier (its
        outputs are the model's) was dropped without a word, the group of its inputs pruned
        at the global ratio. A pattern matching some such layers among others stays valid."""
        reach: set[str] = set()
        for g in self.graph.groups(prunable_only=True):
            reach.update(s.module for s in g.slices if s.kind != "in")
            reach.update(g.layers)
        for spec, r in table.items():
            names = list(options.match_modules(self.model, [spec]))
            if not options.plain_number(r) or not names or any(n in reach for n in names):
                continue
            first = names[0]
            held = next(
                (g for g in self.graph.groups() if any(s.module == first and s.kind != "in" for s in g.slices)), None
            )
            why = f" (group {held.id}: {held.reasons[0] if held.reasons else 'frozen'})" if held is not None else ""
            feeds = next(
                (g for g in self.graph.groups(prunable_only=True) if any(s.module == first for s in g.slices)), None
            )
            producers = sorted({sl.module for sl in feeds.slices if sl.kind == "out"}) if feeds is not None else []
            instead = (
                f"; its input channels are group {feeds.id}'s, produced by {', '.join(map(repr, producers[:3]))}: give "
                "the ratio to that layer"
                if producers
                else ""
            )
            raise UserError(
                f"layer_pruning_ratios[{options.spec_label(spec, self.model)}]={options.plain_number(r)} "
                f"(--layer-ratio): the output channels of {first!r}{why} cannot be pruned, so the ratio would do "
                f"nothing{instead}, or drop it"
            )

    def _check_unchanged(self) -> None:
        """A :class:`UserError` where the model's layers changed after the pruner traced it (a
        layer replaced or widened, one added): the graph, groups and statistics describe the
        model as it was, and verification then skipped the changed groups with a warning that
        blamed a channel count read at run time."""
        change = layout_change(self._layout, self.model) if self.pruned_model is None or not self.inplace else None
        if change is not None:
            raise UserError(
                f"the model changed after the pruner was built: {change}. Its graph and statistics describe the model "
                "as it was; build a new StructuredPruner once the model is as it will be pruned"
            )

    def _check_not_pruned_in_place(self, who: str) -> None:
        """A :class:`UserError` once this pruner has pruned its model in place: its graph, statistics and
        plan describe the model as it was, so ``build`` raised ``IndexError: index out of range in self``
        from a layer pruner, ``analyse_sensitivity`` ``RuntimeError: INDICES element is out of DATA
        bounds``, and ``score`` / ``collect_activations`` read the pruned model through the old graph."""
        if self.inplace and self.pruned_model is not None:
            raise UserError(
                f"{who}: this pruner already pruned the model in place; to prune further, build a new "
                "StructuredPruner on the pruned model (and collect activations again): this one's graph, statistics "
                "and plan describe the model as it was"
            )

    def _check_attributes(self) -> None:
        """The options as the attributes hold them now, by the constructor's checks: an
        attribute set after construction (``pruner.pruning_ratio = 1.5``) went unchecked, so
        56,554 parameters were pruned to 53 without a word, ``"0.5"`` and NaN raised
        ``TypeError`` / ``ValueError`` from planning, ``global_pruning = "no"`` ranked
        globally, and ``importance = "magnitude"`` raised ``'str' object is not callable``."""
        given, (made, snapshot) = self.layer_ratios, getattr(self, "_ratios_set", (None, {}))
        if given is not None and (given is not made or dict(given) != snapshot):
            # pruner.layer_ratios = {model.fc: 0.5} (or the table changed in place): resolved to layer names and
            # checked as the constructor does; module keys raised TypeError from the plan's options key
            self.set_layer_ratios(given)
        now = {k: getattr(self, k) for k in _CHECKED}
        for key, value in _checked_options(now, self.layer_ratios, False, device_of(self.model)).items():
            setattr(self, key, value)
        # the plan is kept for the options it was made with: pruner.pruning_ratio = 0.25 (or another
        # criterion, round_to, target, ...) after a plan() or prune() gave the old plan again, without a word
        made_with = self._options_key()
        if getattr(self, "_plan_options", None) != made_with:
            self._plan, self._plan_options = None, made_with

    def _options_key(self) -> tuple:
        """The options a plan depends on, as values to compare: numbers, switches and names as
        they are; a criterion, function or normaliser by identity and, for a criterion, its
        plain settings (``importance.weight_ratio = 0.9`` set in place)."""
        key: list[Any] = [tuple(sorted((self.layer_ratios or {}).items())), id(self._normalizer)]
        for k in _CHECKED:
            v = getattr(self, k)
            plain = v is None or isinstance(v, (bool, int, float, str))
            key.append(v if plain else (id(v), describe_importance(v) if k == "importance" else None))
        return tuple(key)

    def plan(self) -> PruningPlan:
        """The dry run: which units would go. Changes nothing."""
        self._check_attributes()
        self._check_unchanged()
        with _autograd_on(self.model):
            if self._plan is None:  # the plan of an in-place prune stays readable, a new one cannot be made
                self._check_not_pruned_in_place("plan")
                dead = self.prune_dead_only
                self._plan = (
                    dead_plan(self.graph, self.stats, self.score) if dead else self.plan_for(self.graph, self.model)
                )
                distributed.check_same_plan(self._plan.pruned_units())
                if not dead and self._plan.n_pruned == 0 and self._plan.groups:
                    warnings.warn(
                        f"{self.why_nothing_pruned()}; the pruned model equals the original", RuntimeWarning, 3
                    )
                elif not dead and self.round_to and self.round_to > 1:
                    self._warn_unroundable()
            return self._plan

    def _warn_unroundable(self) -> None:
        """Say where ``round_to`` keeps whole groups the plan would shrink: regnety_002 kept
        0.52 of its parameters at a ratio of 0.5 and ``round_to=16`` (0.27 without), its
        last stage untouched, without a word. Documented, so not changed: the kept widths
        stay multiples, as asked (:func:`~cleanai_core.planning.unroundable_note`)."""
        note = unroundable_note([gp.group for gp in self._plan.groups if gp.n_pruned == 0], self.round_to)
        if note:
            warnings.warn(note, RuntimeWarning, 4)

    def why_nothing_pruned(self) -> str:
        """Why a plan removes no unit although groups can shrink: the rounding, the minimum
        width or a ratio too small for the widths (the run used to succeed silently)."""
        groups = self.plan().groups
        if self.prune_dead_only:
            return _why_no_dead_unit_pruned(self.graph, self.stats)
        # the groups given a ratio above 0 (a ratio of 0 keeps a layer whole on purpose): a
        # 0.2 for one conv of 64 channels at round_to=16 (12 units, rounded back to 64) was
        # blamed on "the ratio leaves less than one unit to remove"
        asked = [gp for gp in groups if gp.ratio > 0] or groups
        if groups and all(gp.ratio == 0 for gp in groups) and self.layer_ratios:
            # layer_pruning_ratios={"*": 0} (--layer-ratio '*=0') was blamed on the ratio: "raise the ratio"
            named = [k for k in self.layer_pruning_ratios if k]  # '' is the root, which a glob '*' matches
            return (
                f"the plan removes no unit: layer_pruning_ratios give every prunable group a ratio of 0, which keeps "
                f"it whole (layers {', '.join(repr(k) for k in named[:4])}{', ...' if len(named) > 4 else ''}); "
                "give the layers to prune a ratio above 0, or leave them out of layer_pruning_ratios to prune them "
                "at pruning_ratio"
            )
        sizes = [gp.group.size for gp in asked]
        room = any(math.floor(gp.ratio * gp.group.size + 1e-9) >= 1 for gp in asked)
        widths = f"groups of {min(sizes)}..{max(sizes)} units" if min(sizes) != max(sizes) else f"{sizes[0]} units"
        if self.round_to and self.round_to > 1 and (room or self.round_to >= min(sizes)):
            cause = f"round_to={self.round_to} rounds every kept count up to the whole group ({widths}); lower round_to"
        elif self.min_channels >= max(sizes):
            cause = f"min_channels={self.min_channels} keeps every unit ({widths}); lower min_channels"
        else:
            cause = f"the ratio leaves less than one unit to remove in every group ({widths}); raise the ratio"
        return f"the plan removes no unit: {cause}"

    def plan_for(self, graph: Any = None, model: Any = None, cal: Any = None, target: Any = None) -> PruningPlan:
        """The plan for ``model``: at the pruning ratio, or at the ratio meeting ``target``
        (default ``target_flops`` or ``target_params``); scores computed once."""
        if graph is None and model is None:
            self._check_not_pruned_in_place("plan_for")
        graph = self.graph if graph is None else graph
        model = self.model if model is None else model
        target = options.plain_number(target)
        number = isinstance(target, (int, float)) and not isinstance(target, bool)
        if target is not None and not (number and 0 < target < math.inf):
            raise UserError(f"plan_for: target={target!r} must be a positive number: the share of FLOPs to keep")
        scores = self.score(graph, model, cal)
        final = target is None  # the user's own target (a step of iterative pruning passes its own)
        target = target if target is not None else self.target_flops
        kind = "flops"
        if target is None and self.target_params is not None:
            target, measure, kind = self.target_params, params_measure, "params"
        elif target is not None:  # counted only where a target asks (a count runs the model)
            measure = flops_measure(self.example_inputs, self.forward_fn, model)
        ratio = self.pruning_ratio
        if target is not None:
            sizes: dict[float, float] = {}
            stats = ((cal.stats if cal is not None else self.stats) or None) if self.bias_compensation else None
            memory, check = TrialMemory(), self.trial_check()  # groups kept whole, as verification keeps them

            def size_at(r: float) -> float:
                if r not in sizes:
                    plan = self.make_plan(r, scores, graph)
                    sizes[r] = pruned_size(model, graph, plan, measure, stats, memory, check)
                return sizes[r]

            base = measure(model)
            ratio = ratio_for_target(target, size_at, base)
            if final:
                kept = size_at(ratio) / base
                _warn_if_far(kind, target, kept, [v / base for v in sizes.values()])
                if kept - target > TARGET_SLACK:
                    _warn_unreachable(
                        kind, target, kept, ratio, unshrunk_params(model, graph, self.make_plan(ratio, scores, graph))
                    )
        return self.make_plan(ratio, scores, graph)

    # -- slicing and verification ---------------------------------------------------------
    def build(
        self,
        pruned: torch.Tensor,
        source: nn.Module | None = None,
        graph: DependencyGraph | None = None,
        stats: dict | None = None,
        verify: bool | None = None,
        share: bool = False,
        exact: bool = False,
    ) -> tuple[nn.Module, list[SliceEdit]]:
        """A sliced, compensated and (unless ``verify`` or the pruner's ``verify`` says not)
        verified copy of ``source`` (the original model) without the ``pruned`` units (a mask
        over ``graph.root``); raises ``PruningError``. ``share``: the copy shares the
        parameters it left unsliced with ``source`` (a trial to run and throw away).
        ``exact``: verification also compares the slicing alone with the masking oracle
        (:func:`~cleanai_core.masking.check_exact`: the masked original runs, and with compensation
        the slicing alone is built and runs too)."""
        if source is None:
            self._check_not_pruned_in_place("build")
        source = self.model if source is None else source
        graph = self.graph if graph is None else graph
        # as score() checks them: source="m" raised AttributeError from slicing.py, a model of another
        # architecture "KeyError: no plugin claims module '0'", stats=[...] AttributeError from compensation.py,
        # and verify="no" verified (a truthy string)
        _check_graph_of(graph, source, "build")
        options.check_switches(share=share, exact=exact, **({} if verify is None else {"verify": verify}))
        if stats is not None and not isinstance(stats, Mapping):
            raise UserError(
                f"build: stats={shown(stats)} must be the calibration statistics by layer (pruner.stats, a dict), "
                "or None for the pruner's own"
            )
        graph.check_removal(pruned)  # a hand-made mask: before anything is sliced
        stats = (self.stats if stats is None else stats) if self.bias_compensation else {}
        model, edits = compensated_copy(source, graph, pruned, stats, self.reconstruction, share)
        if self.verify if verify is None else verify:
            try:
                if exact:  # nothing compensated: the model is the slicing alone
                    self._verify_exact(model, not stats, source, graph, pruned)
                else:
                    self._verify(model)
                self._verify_other_path(model)
            except PruningError:
                # the original may not run on the example inputs either (the trace runs on the meta
                # device, shapes only): then the inputs are at fault, not the pruning (UserError)
                self._original_outputs()
                self._check_repeatable()
                raise
        return model, edits

    def _verify(
        self,
        model: nn.Module,
        graph: DependencyGraph | None = None,
        outputs: list[torch.Tensor] | None = None,
        like: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Check ``model`` against the original's outputs (:func:`~cleanai_core.verify.check_outputs`;
        ``outputs``: its own, where they were just computed). The original runs once, and
        only where ``like`` (the masked original's outputs) does not settle the check."""
        return check_outputs(
            model, self.example_inputs, self._original_outputs, self.forward_fn, self.output_transform, outputs, like
        )

    def trial_check(self) -> Callable[[nn.Module], object] | None:
        """What a target search runs on a trial copy that measuring it does not run (None
        where ``verify`` is off): :meth:`_verify`, so the search keeps whole the groups
        verification will keep whole (:func:`~cleanai_core.targets.pruned_size`)."""
        return self._verify if self.verify else None

    def _verify_other_path(self, model: nn.Module) -> None:
        """Check ``model`` on the calibration batch that ran layers the trace did not (see
        :func:`~cleanai_core.verify.other_paths`): their inputs or outputs may have been
        pruned without them, and the pruned model broke on such inputs though it passed on
        ``example_inputs``."""
        if self._other_path is None:
            return
        args, kwargs = self._other_path
        run = lambda m, _: m(*args, **kwargs)  # noqa: E731
        if self._other_reference is None:
            self._other_reference = reference(self.model, None, run, self.output_transform)
        try:
            check_outputs(model, None, self._other_reference, run, self.output_transform)
        except PruningError as exc:
            raise PruningError(
                f"{exc}, on a calibration batch that runs layers the example inputs do not run "
                f"({', '.join(self._other_path_layers())}: the model takes another path for other inputs)"
            ) from exc

    def _other_path_layers(self) -> list[str]:
        return sorted(untraced_layers(self.graph))[:4]

    def _original_outputs(self) -> Reference:
        if self._reference is None:
            try:
                self._reference = reference(self.model, self.example_inputs, self.forward_fn, self.output_transform)
            except Exception as exc:
                if not model_fault(exc):
                    raise
                # the trace runs on the meta device (shapes only): float16 inputs to a float32 model passed
                # it and then raised the model's own RuntimeError here
                p = next((q for q in self.model.parameters() if q.is_floating_point()), None)
                want = f" (dtype {p.dtype}, device {p.device})" if p is not None else ""
                raise UserError(
                    f"the model failed on example_inputs ({type(exc).__name__}: {str(exc)[:300]}); give them as the "
                    f"model takes them{want}"
                ) from exc
        return self._reference

    def _check_repeatable(self) -> None:
        """A :class:`UserError` where the original itself gives other outputs on a second run of
        ``example_inputs`` (random masking in the forward, as ViT-MAE's, or sampling): every
        group then failed the comparison with the masking oracle, each was skipped with a
        warning, and nothing was pruned. Checked once, only after a verification failed."""
        if self._repeatable is None:
            first, second = (
                model_outputs(self.model, self.example_inputs, self.forward_fn, self.output_transform) for _ in range(2)
            )
            # by the masking oracle's own tolerance: where the original misses it, no pruned model meets it
            tol = exact_tolerance([t for t in first if bool(torch.isfinite(t).all())])
            self._repeatable = len(first) == len(second) and all(
                a.shape == b.shape and within(a, b, tol) for a, b in zip(first, second, strict=True)
            )
        if not self._repeatable:
            raise UserError(
                "the model gives other outputs on a second run of the same example_inputs in eval mode (its "
                "forward draws random numbers: random masking or token dropping, sampling, noise), so no pruned "
                "model can be checked against it. Make the forward repeatable: pass forward_fn=lambda m, x: "
                "m(x, noise=...) with fixed noise (ViT-MAE), or seed inside it; or prune with verify=False"
            )

    def _verify_exact(
        self,
        model: nn.Module,
        alone: bool,
        source: nn.Module,
        graph: DependencyGraph,
        pruned: torch.Tensor,
    ) -> None:
        """Check ``model`` (``source`` without the ``pruned`` units) against the original's
        outputs on the example inputs, and the slicing alone against
        the masking oracle on the exact groups' units of ``pruned`` (``alone``: ``model`` is
        the slicing alone, nothing compensated). The masked original's outputs serve both:
        where they settle the first check, the original does not run.

        Where ``source`` is not yet known to write nothing in forward, the masked original
        runs first: its guarded call proves that for ``model`` too, a copy of it
        (:func:`~cleanai_core.model_state.writes_nothing`), which then runs unguarded."""
        units = exact_units(graph, pruned)
        masked = lambda: masked_outputs(graph, units, self.example_inputs, self.forward_fn, self.output_transform)  # noqa: E731
        early = None
        if bool(units.any()) and not writes_nothing(source):
            try:
                early = masked()
            except Exception:  # noqa: BLE001 - the run below fails the same way first, as before the order changed
                # (float16 example inputs to a float32 model: the original's RuntimeError came out raw, not
                # "the model failed on example_inputs"); where the pruned model runs, masked() reruns and raises
                early = None
        outputs = run_outputs(model, self.example_inputs, self.forward_fn, self.output_transform)
        if not bool(units.any()):
            self._verify(model, outputs=outputs)
            return
        expected = early if early is not None else masked()
        self._verify(model, outputs=outputs, like=expected)
        args = (graph, units, self.example_inputs, self.forward_fn, self.output_transform, expected)
        if alone and torch.equal(units, pruned):
            got = outputs
        else:
            sliced, _ = compensated_copy(source, graph, units, {}, False, share=True)
            got = run_outputs(sliced, self.example_inputs, self.forward_fn, self.output_transform)
        try:
            check_exact(None, got, *args)
        except PruningError:
            if not self._unsteady_outputs():
                raise
            check_exact(None, got, *args, unsteady=self._unsteady_outputs())

    def _unsteady_outputs(self) -> frozenset[int]:
        """:func:`~cleanai_core.masking.unsteady_outputs` of the original on the example inputs
        (ssd300_vgg16 at some seeds: a near tie of scores reordered the boxes, every group was
        skipped and nothing pruned). Measured once, only after an exact comparison failed."""
        if self._unsteady is None:
            self._unsteady = unsteady_outputs(self.model, self.example_inputs, self.forward_fn, self.output_transform)
        return self._unsteady

    def _skip(self, msg: str) -> None:
        self.skipped_groups.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=5)

    def flops_before(self) -> int:
        """FLOPs of the original model (counted once)."""
        if "flops" not in self._before:
            self._before["flops"] = count_flops(self.model, self.example_inputs, self.forward_fn)
        return self._before["flops"]

    # -- the pipeline ----------------------------------------------------------------------
    def prune(self) -> nn.Module:
        """Slice the model; return the pruned model (a copy unless ``inplace=True``). Called
        again, it prunes the original again, with a fresh :attr:`history` (the steps of an
        earlier call were kept, so the saved history replayed both and did not load)."""
        self._check_attributes()
        self._check_unchanged()
        with _autograd_on():
            self._check_not_pruned_in_place("prune")
            several = self.iterative_steps > 1 and not self.gradients
            if several and held_gradients(self.model, self.importance, self.graph):
                raise UserError(
                    f"the gradients on the model's parameters (your own loss's backward) score one step, but "
                    f"iterative_steps={self.iterative_steps}: each later step scores a smaller model they do not "
                    "fit. Give labelled batches to collect_activations (the gradients are taken again at every "
                    "step), or prune one step at a time: backward, then StructuredPruner(..., inplace=True).prune()"
                )
            self.history = PruningHistory()
            self._before = {"params": count_params(self.model)}
            if self.inplace:  # the original is about to change: measure it now
                self.flops_before()
            self._pruned_plans = []
            if not self.inplace:
                warn_user_hooks(user_hooks(self.model), "pruned", "prune", stacklevel=3)
            if self._other_path is None:  # no calibration batch ran them: verification cannot try that path
                _warn_untraced(untraced_layers(self.graph))
            try:
                with reads_preserved(self.model):  # the copies are made, sliced and checked beside it
                    current = prune_in_steps(self)
            finally:
                # also when a step fails: a later plan() must not see a stale step
                self._step, self._targets, self._widths, self._share = (0, 1), {}, {}, None
            copy_modes(self.model, current)
            if self.inplace:
                transplant(self.model, current)
                current = self._given
            self.pruned_model = current
            return current

    def report(self) -> dict[str, Any]:
        """Per layer: channels before/after, pruned indices, importance scores of pruned and
        kept units; plus params and FLOPs before/after (:mod:`cleanai_core.pruning_report`).
        Call after :meth:`prune`."""
        with reads_preserved(self.model):
            return pruner_report(self)


def _why_no_dead_unit_pruned(graph: DependencyGraph, stats: Mapping[Any, Any]) -> str:
    """Why ``prune_dead_only`` removes nothing: no unit is dead on the calibration data, or the
    dead ones lie where they cannot go. ``cleanai prune --prune-dead-only`` said "no unit is
    dead" also where 4 of a conv's 8 channels never activated and ``--ignore`` kept the conv."""
    from cleanai_core.dead_units import find_dead_units

    found = [f for f in find_dead_units(graph, stats) if f.dead]
    if not found:
        return "the plan removes no unit: no unit is dead (never activates) on the calibration data"
    where = ", ".join(f"{len(f.dead)} of the {f.channels} input channels of {f.layer!r}" for f in found[:4])
    return (
        f"the plan removes no unit: {sum(len(f.dead) for f in found)} unit(s) never activate on the calibration "
        f"data ({where}{', ...' if len(found) > 4 else ''}), but none can be removed: they are in groups kept whole "
        "(ignored layers, channels that reach the model's output or another frozen group: `cleanai explain` "
        "names them), another reader of them sees them live, or min_channels keeps them"
    )


def _check_graph_of(graph: Any, model: Any, who: str) -> None:
    """A :class:`UserError` for a ``graph`` / ``model`` pair given to a public method that cannot
    go together: ``pruner.score(graph="g")`` raised ``AttributeError: 'str' object has no attribute
    'groups'``, a model of another architecture ``Linear has no attribute `0```."""
    if not isinstance(graph, DependencyGraph):
        raise UserError(f"{who}: graph={shown(graph)} must be a DependencyGraph (default: the pruner's)")
    if graph.model is not model:
        raise UserError(
            f"{who}: the model given is {shown(model)}, not the one the graph was built on "
            f"({shown(graph.model)}): give both of one model, e.g. DependencyGraph(model, example_inputs) with that "
            "model, or neither (the pruner's own)"
        )


def _warn_untraced(layers: Mapping[str, nn.Module]) -> None:
    """Say that layers the example inputs never ran keep their input widths (another task's
    head, a branch the forward takes for other inputs): before 2026-12-02 the pruned model
    failed there without a word ("mat1 and mat2 shapes cannot be multiplied")."""
    if layers:
        names = sorted(layers)
        warnings.warn(
            f"{len(names)} layer(s) never ran on the example inputs ({', '.join(names[:4])}"
            f"{' ...' if len(names) > 4 else ''}): the trace cannot see which channels they read, so they keep "
            "their input width while the layers before them may shrink, and the pruned model fails where the "
            "forward takes them (another task's head, another branch). Give example inputs or a forward_fn that "
            "run them, calibration batches that do (prune() then checks that path), or ignore the layers that "
            "feed them; a layer the forward never uses loses nothing",
            UserWarning,
            stacklevel=3,
        )


#: a target met further below than this (a share of the original) is reported
TARGET_SLACK = 0.05


def _warn_unreachable(kind: str, target: float, kept: float, ratio: float, whole: list[tuple[str, int]]) -> None:
    """Warn where even the highest ratio keeps more than ``target`` asks (a small LLM whose
    vocabulary embedding and head, kept with the hidden size, hold most parameters)."""
    total = sum(n for _, n in whole)
    largest = ", ".join(f"{name} ({n:,})" for name, n in whole[:3])
    warnings.warn(
        f"target_{kind}={target:g} cannot be reached: pruning {ratio:.0%} of every group keeps {kept:.2f} of the "
        f"original's {kind}. {total:,} parameters do not shrink, the largest {largest}: they are frozen or in no "
        "prunable group (`cleanai explain` says why). Ask for a target above that, or free them",
        RuntimeWarning,
        stacklevel=4,
    )


def _warn_if_far(kind: str, target: float, kept: float, seen: list[float]) -> None:
    """Warn where the ratio meeting ``target`` keeps much less than it asks: one ratio for
    every group moves in steps as large as its coarsest groups (two key-value heads of a
    small LLM: 0 or 1 of them go), so the next ratio down may keep far more than the target."""
    if target - kept <= TARGET_SLACK:
        return
    above = [v for v in seen if v > target]
    nearest = f" (the next ratio down keeps {min(above):.2f})" if above else ""
    warnings.warn(
        f"target_{kind}={target:g}: the pruned model keeps {kept:.2f} of the original's {kind}{nearest}. One ratio "
        "for every group moves in steps as large as its coarsest groups (e.g. a few attention or key-value heads); "
        "per-layer ratios land closer: `cleanai prune --auto`, or allocate_ratios() in Python",
        RuntimeWarning,
        stacklevel=4,
    )
