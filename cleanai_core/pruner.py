"""StructuredPruner: trace -> calibrate -> score -> plan -> slice -> verify -> report."""

from __future__ import annotations

import copy
import fnmatch
import functools
import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from cleanai_core import distributed
from cleanai_core.bn_correction import Moments, correct_batchnorm, norms_with_running_stats, recording
from cleanai_core.calibration import (
    COVARIANCE_BUDGET_BYTES,
    COVARIANCE_ROWS,
    StatsCollector,
    iterate,
    move_to,
    split_batch,
    total_batches,
)
from cleanai_core.dead_units import find_dead_units, removable_units
from cleanai_core.errors import PruningError, UserError
from cleanai_core.graph.dependency import DependencyGraph, resolve_modules
from cleanai_core.history import PruningHistory
from cleanai_core.metrics import call_model, count_flops, count_params
from cleanai_core.model_state import HOOK_ATTRIBUTES, preserved
from cleanai_core.planning import GroupPlan, PruningPlan, make_plan
from cleanai_core.replay import CalibrationData
from cleanai_core.scoring import ScoringContext, WeightActivationImportance, get_importance, get_normalizer
from cleanai_core.slicing import SliceEdit, prepare_model, run_after_prune, slice_tensors
from cleanai_core.steps import Targets, final_counts, step_group_ratios, step_ratio
from cleanai_core.verify import Reference, check_outputs, reference

__all__ = ["StructuredPruner", "match_modules"]

log = logging.getLogger("cleanai")

ModuleSpec = nn.Module | str | type


def match_modules(model: nn.Module, specs: Iterable[ModuleSpec]) -> dict[str, Any]:
    """Names of the modules of ``model`` matched by modules, names, globs or types, with
    every descendant of a matched container (``model.layer4`` covers ``layer4.0.conv1``).
    Returns ``{name: spec}``; raises :class:`UserError` for a spec that matches nothing."""
    named = list(model.named_modules())
    ids = {id(m): n for n, m in named}
    out: dict[str, Any] = {}
    for spec in specs:
        hits: list[str]
        if isinstance(spec, nn.Module):
            hits = [ids[id(spec)]] if id(spec) in ids else []
        elif isinstance(spec, type):
            hits = [n for n, m in named if isinstance(m, spec)]
        elif isinstance(spec, str):
            hits = [n for n, _ in named if n == spec or fnmatch.fnmatchcase(n, spec)]
        else:
            raise UserError(f"cannot match layers with {spec!r}: give a module, a name, a glob or a type")
        if not hits:
            raise UserError(f"{spec!r} matches no layer of the model; check the name with `cleanai explain`")
        for h in hits:
            out.setdefault(h, spec)
            for n, _ in named:
                if h and n.startswith(h + "."):
                    out.setdefault(n, spec)
    return out


class StructuredPruner:
    """Prune a trained model by real slicing, scoring units on your data.

    Example::

        importance = WeightActivationImportance(weight_ratio=0.5, activation_ratio=0.5)
        pruner = StructuredPruner(model, example_inputs, importance, pruning_ratio=0.3,
                                  ignored_layers=[model.fc])
        pruner.collect_activations(test_loader, num_batches=10)
        pruned_model = pruner.prune()
        print(pruner.report()["params_after"])

    :param model: the trained model; not modified unless ``inplace=True``.
    :param example_inputs: one batch of inputs (tensor, tuple or dict) for tracing.
    :param importance: a criterion object or a registered name; default
        :class:`WeightActivationImportance`.
    :param pruning_ratio: share of each group's units to remove (0 < r < 1).
    :param layer_pruning_ratios: ``{module | name | glob | type: ratio}``.
    :param ignored_layers: modules, names, globs or types whose output channels are kept
        (plus the classifier heads the ``cleanai_default_ignores`` hook names).
    :param global_pruning: rank units of all groups together (scores normalised per group).
    :param max_layer_ratio: with global pruning, the most any group may lose.
    :param round_to: kept channel counts rounded up to a multiple (e.g. 8).
    :param min_channels: units every group keeps at least.
    :param target_flops: instead of ``pruning_ratio``, keep this share of the FLOPs.
    :param target_params: instead of ``pruning_ratio``, keep this share of the parameters
        (searched like ``target_flops``; not with ``iterative_steps``).
    :param iterative_steps: prune in this many steps, re-collecting statistics in between.
    :param bias_compensation: fold removed channels' mean into consumers' bias.
    :param reconstruction: also collect each consumer's channel covariance during
        calibration and fold removed channels into the kept ones by least squares
        (``x_removed ~ shift + coef @ x_kept``); needs ``bias_compensation``. Memory is
        C^2 float64 per consumer, at most 1 GiB in all (narrowest consumers first; the
        others, and layers above 4096 channels, fall back to mean compensation). Only
        layers that can fold (ungrouped convs, linears) collect it.
    :param covariance_rows: positions per calibration batch, drawn at random, that feed
        each covariance (its cost per batch is rows x C^2); ``0`` uses every position.
        Means and variances always use every position.
    :param recalibrate_bn: correct BatchNorm running statistics by what pruning changed at
        their inputs on the calibration data (eval mode, any batch size; statistics stay as
        trained where pruning changed nothing; see :mod:`cleanai_core.bn_correction`).
    :param stats_budget_bytes: memory for covariance matrices (reconstruction), default
        1 GiB: the narrowest consumers get one until it is spent; the others fall back to
        mean compensation. ``0`` collects none.
    :param inplace: slice ``model`` itself (rolled back if anything fails).
    :param prune_dead_only: remove exactly the units that never activate on the
        calibration data, whatever the ratio; the outputs on that data do not change.
        See :mod:`cleanai_core.dead_units`.
    """

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
        round_to: int | None = None,
        min_channels: int = 1,
        target_flops: float | None = None,
        target_params: float | None = None,
        iterative_steps: int = 1,
        bias_compensation: bool = True,
        reconstruction: bool = True,
        covariance_rows: int = COVARIANCE_ROWS,
        recalibrate_bn: bool = True,
        inplace: bool = False,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        output_transform: Callable[[Any], Any] | None = None,
        normalizer: str = "mean",
        verify: bool = True,
        stats_budget_bytes: int = COVARIANCE_BUDGET_BYTES,
        prune_dead_only: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, torch.jit.ScriptModule):
            raise UserError(
                "the model is a TorchScript module (torch.jit.script or torch.jit.trace): CleanAI prunes the Python "
                "nn.Module. Prune the original model, then script the pruned one"
            )
        _check_ratio("pruning_ratio", pruning_ratio)
        if target_flops is not None and not 0.0 < float(target_flops) < 1.0:
            raise UserError(f"target_flops={target_flops}: give the share of FLOPs to keep, between 0 and 1")
        if target_params is not None and not 0.0 < float(target_params) < 1.0:
            raise UserError(f"target_params={target_params}: give the share of parameters to keep, between 0 and 1")
        if target_params is not None and (target_flops is not None or iterative_steps != 1):
            raise UserError("target_params works alone: not with target_flops, and with iterative_steps=1")
        if not 0.0 < max_layer_ratio < 1.0:
            raise UserError(f"max_layer_ratio={max_layer_ratio} must be between 0 and 1")
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise UserError(f"round_to={round_to} must be a positive integer")
        if not isinstance(iterative_steps, int) or iterative_steps < 1:
            raise UserError(f"iterative_steps={iterative_steps} must be a positive integer")
        from torch.utils._pytree import tree_flatten

        leaves = [t for t in tree_flatten(example_inputs)[0] if isinstance(t, torch.Tensor)]
        if not leaves:
            raise UserError(
                "example_inputs holds no tensor: give one batch of inputs, e.g. torch.randn(1, 3, 224, 224)"
            )
        if any(t.is_meta for t in leaves):
            raise UserError(
                "example_inputs are on the meta device (shapes without data): give real tensors on the model's "
                "device, e.g. torch.randn(1, 3, 224, 224)"
            )
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in leaves):
            raise UserError("example_inputs contain NaN or inf values; give finite inputs")
        self.model = model
        self.example_inputs = example_inputs
        self.importance = (
            get_importance(importance)
            if isinstance(importance, str)
            else (importance if importance is not None else WeightActivationImportance())
        )
        self.pruning_ratio = float(pruning_ratio)
        self.global_pruning = global_pruning
        self.max_layer_ratio = max_layer_ratio
        self.round_to = round_to
        self.min_channels = min_channels
        self.target_flops = target_flops
        self.target_params = target_params
        self.iterative_steps = iterative_steps
        self._step = (0, 1)  # (step, steps) while prune() runs iteratively
        self._targets: Targets = {}  # iterative: each group's original and final unit counts
        self.bias_compensation = bias_compensation
        self.reconstruction = reconstruction and bias_compensation
        if covariance_rows < 0:
            raise UserError(f"covariance_rows={covariance_rows} must be 0 (every position) or positive")
        self.covariance_rows = covariance_rows
        if not isinstance(stats_budget_bytes, int) or stats_budget_bytes < 0:
            raise UserError(f"stats_budget_bytes={stats_budget_bytes!r} must be a whole number of bytes, 0 or more")
        self.stats_budget_bytes = stats_budget_bytes
        self.recalibrate_bn = recalibrate_bn
        self.inplace = inplace
        self.forward_fn = forward_fn
        self.output_transform = output_transform
        self.normalizer = get_normalizer(normalizer)
        self.verify = verify
        self.prune_dead_only = prune_dead_only
        self.layer_ratios: dict[str, float] = {}
        self.set_layer_ratios(layer_pruning_ratios or {})
        self.ignored = set(match_modules(model, ignored_layers or ()))
        from cleanai_core.plugins import get_plugin_manager

        for res in get_plugin_manager().hook.cleanai_default_ignores(model=model):
            for m in res or ():
                self.ignored.update(match_modules(model, [m]))
        self.history = PruningHistory()
        self.stats: dict = {}
        self.gradients: dict[str, torch.Tensor] = {}
        self._calibration: CalibrationData | None = None
        self._bn_moments: Moments = {}  # BatchNorm input moments of the original model, per call
        self._plan: PruningPlan | None = None
        self.pruned_model: nn.Module | None = None
        self.skipped_groups: list[str] = []
        self._before: dict[str, Any] = {}
        self._reference: Reference | None = None  # the original's outputs, for verification
        self._pruned_plans: list[tuple[DependencyGraph, PruningPlan]] = []  # per step, for the report
        self.graph = self._build_graph(model)

    # -- graph ---------------------------------------------------------------------
    def _build_graph(self, model: nn.Module) -> DependencyGraph:
        graph = DependencyGraph(
            model, self.example_inputs, self.forward_fn, self.output_transform, ignored_layers=sorted(self.ignored)
        )
        if not graph.groups(prunable_only=True):
            why = (
                " (every layer is ignored)"
                if self.ignored and all(s.module in self.ignored for s in graph.slices if s.kind == "out")
                else ""
            )
            raise UserError(
                f"nothing in this model can be pruned{why}: no group of coupled channels is free to shrink. "
                "Run `cleanai explain` to see which operations froze them, or ignore fewer layers."
            )
        return graph

    # -- calibration -----------------------------------------------------------------
    @distributed.stage("calibration", then=distributed.combine_pruner)
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
        shard (:func:`cleanai_core.distributed.shard`) and the statistics are summed
        over ranks."""
        if num_batches is not None and num_batches < 1:
            raise UserError(f"num_batches={num_batches} must be at least 1")
        if sequential:
            from cleanai_core.sequential import collect_sequential

            self.stats = collect_sequential(
                self.model,
                self.graph.slices,
                loader,
                num_batches,
                self._forward,
                blocks=sequential if isinstance(sequential, str) else None,
                covariance=self.reconstruction,
                covariance_rows=self.covariance_rows,
                budget=self.stats_budget_bytes,
            )
            data = CalibrationData(loader, num_batches)
            data.batches = None  # not kept: the BatchNorm correction reads the loader again beside the original
            if getattr(self.importance, "needs_gradients", False):
                self.gradients = self._accumulate_gradients(self.model, data.replay(), _device_of(self.model))
            self._calibration = data
            self._bn_moments = {}
            self._plan = None
            return self
        from tqdm.auto import tqdm

        device = _device_of(self.model)
        collector = StatsCollector(
            self.model,
            self.graph.slices,
            covariance=self.reconstruction,
            covariance_budget=self.stats_budget_bytes,
            covariance_rows=self.covariance_rows,
        )
        data = CalibrationData(loader, num_batches)
        moments: Moments = {}
        with preserved(self.model):  # every module's mode and buffers (BN, observers) put back
            with collector.hooks(), recording(self.model, moments), torch.no_grad():
                batches = iterate(loader, num_batches)
                for batch in tqdm(
                    batches,
                    total=total_batches(loader, num_batches),
                    disable=not progress,
                    desc="calibrating",
                    unit="batch",
                    leave=False,
                ):
                    data.keep(batch)
                    inputs, _ = split_batch(batch)
                    self._forward(self.model, _inputs_for(self.model, inputs))
            if getattr(self.importance, "needs_gradients", False):
                self.gradients = self._accumulate_gradients(self.model, data.replay(), device)
        self.stats = collector.stats
        self._calibration = data
        self._bn_moments = moments
        self._plan = None
        return self

    def _forward(self, model: nn.Module, inputs: Any) -> Any:
        return call_model(model, inputs, self.forward_fn)

    def _accumulate_gradients(self, model: nn.Module, batches: Iterable[Any], device) -> dict[str, torch.Tensor]:
        clone = copy.deepcopy(model).eval()
        for p in clone.parameters():
            p.requires_grad_(True)
            p.grad = None
        seen = False
        for batch in batches:
            inputs, target = split_batch(batch)
            if target is None:
                raise UserError("taylor importance needs labels: the data yields inputs only")
            out = self._forward(clone, _inputs_for(clone, inputs))
            out = self.output_transform(out) if self.output_transform else getattr(out, "logits", out)
            loss = nn.functional.cross_entropy(out, _check_labels(out, move_to(target, device)))
            loss.backward()
            seen = True
        if not seen and not distributed.is_distributed():
            raise UserError("the calibration data is empty")
        return {n: p.grad.detach().clone() for n, p in clone.named_parameters() if p.grad is not None}

    # -- planning -------------------------------------------------------------------
    def _scores(self, graph: DependencyGraph, model: nn.Module, stats: dict) -> dict[int, torch.Tensor]:
        if getattr(self.importance, "needs_activations", False) and not stats:
            raise UserError(
                f"{type(self.importance).__name__} scores activations: call "
                "pruner.collect_activations(loader) first, or choose a data-free importance such as 'magnitude'"
            )
        ctx = ScoringContext(
            graph, stats, model, extra={"bias_compensation": self.bias_compensation, "gradients": self.gradients}
        )
        out = {}
        for g in graph.groups(prunable_only=True):
            s = torch.as_tensor(self.importance(g, ctx), dtype=torch.float64).reshape(-1)
            if s.numel() != g.size:
                raise PruningError(f"{type(self.importance).__name__} returned {s.numel()} scores for {g.size} units")
            out[g.id] = torch.nan_to_num(s, nan=0.0)
        return out

    def _group_ratios(self, graph: DependencyGraph) -> dict[int, float]:
        """Per-layer ratios by group; with iterative pruning, the share of this step, so
        that the steps together remove the requested ratio (not the ratio per step)."""
        step, steps = self._step
        groups = graph.groups(prunable_only=True)
        if steps > 1 and self._targets:
            ratios = step_group_ratios(groups, self._targets, step, steps)
            if not self.global_pruning:
                return ratios
            fixed = {gid for gid in ratios if self._has_layer_ratio(graph, gid)}
            return {gid: r for gid, r in ratios.items() if gid in fixed}
        ratios = {}
        for g in groups:
            for s in g.slices:
                if s.kind != "in" and s.module in self.layer_ratios:
                    ratios[g.id] = self.layer_ratios[s.module]
                    break
        return ratios

    def _has_layer_ratio(self, graph: DependencyGraph, gid: int) -> bool:
        g = next(g for g in graph.groups(prunable_only=True) if g.id == gid)
        return any(s.kind != "in" and s.module in self.layer_ratios for s in g.slices)

    def _make_plan(self, graph, model, stats, ratio: float, scores: dict | None = None) -> PruningPlan:
        scores = scores if scores is not None else self._scores(graph, model, stats)
        return make_plan(
            graph.groups(prunable_only=True),
            scores,
            graph.root.numel(),
            ratio,
            group_ratios=self._group_ratios(graph),
            global_pruning=self.global_pruning,
            max_layer_ratio=self.max_layer_ratio,
            round_to=self.round_to,
            min_units=self.min_channels,
            normalizer=self.normalizer,
        )

    def set_layer_ratios(self, ratios: Mapping[ModuleSpec, float]) -> None:
        """Replace the per-layer ratios (``{module | name | glob | type: ratio}``, 0 keeps
        a layer whole; the first entry matching a layer wins), e.g. with the ones
        :func:`cleanai_core.sensitivity.allocate_ratios` chose. Forgets any plan made."""
        layer_ratios: dict[str, float] = {}
        for spec, r in ratios.items():
            _check_ratio(f"layer_pruning_ratios[{spec!r}]", r, allow_zero=True)
            for name in match_modules(self.model, [spec]):
                layer_ratios.setdefault(name, float(r))
        self.layer_ratios = layer_ratios
        self._plan = None

    def plan(self) -> PruningPlan:
        """The dry run: which units would go. Changes nothing."""
        if self._plan is None and self.prune_dead_only:
            self._plan = self._dead_plan()
        if self._plan is None:
            ratio = self.pruning_ratio
            if self.target_flops is not None:
                ratio = self._solve_flops()
            elif self.target_params is not None:
                ratio = self._solve_flops(target=self.target_params, measure=count_params)
            self._plan = self._make_plan(self.graph, self.model, self.stats, ratio)
            distributed.check_same_plan(self._plan.pruned_units())
        return self._plan

    def _dead_plan(self) -> PruningPlan:
        if not self.stats:
            raise UserError(
                "prune_dead_only needs activation statistics: call pruner.collect_activations(loader) first"
            )
        gone = removable_units(self.graph, self.stats)
        scores = self._scores(self.graph, self.model, self.stats)
        plans = []
        for g in self.graph.groups(prunable_only=True):
            pruned = gone[g.units] & ~g.frozen
            if int(pruned.sum()) >= g.size:  # a group keeps at least one unit
                pruned[int(torch.argmax(scores[g.id]))] = False
            plans.append(GroupPlan(g, scores[g.id], pruned, int(pruned.sum()) / max(g.size, 1)))
        return PruningPlan(plans, self.graph.root.numel())

    def _solve_flops(
        self,
        graph: DependencyGraph | None = None,
        model: nn.Module | None = None,
        stats: dict | None = None,
        target: float | None = None,
        measure: Callable[[nn.Module], int] | None = None,
    ) -> float:
        """The ratio whose plan keeps ``target`` (default ``target_flops``) of ``model``'s FLOPs,
        or of another ``measure`` of a model (``count_params``)."""
        graph = graph if graph is not None else self.graph
        model = model if model is not None else self.model
        stats = stats if stats is not None else self.stats
        target = target if target is not None else self.target_flops
        measure = measure or (lambda m: count_flops(m, self.example_inputs, self.forward_fn))
        base = measure(model)
        scores = self._scores(graph, model, stats)
        lo, hi = 0.0, 0.95
        for _ in range(10):
            mid = (lo + hi) / 2
            plan = self._make_plan(graph, model, stats, mid, scores)
            small = _sliced_copy(model, self._edits(graph, plan.pruned_units()), graph.pm)
            if measure(small) / base > target:
                lo = mid
            else:
                hi = mid
        return hi

    # -- slicing ---------------------------------------------------------------------
    @staticmethod
    def _edits(graph: DependencyGraph, pruned: torch.Tensor) -> list[SliceEdit]:
        return [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in graph.keep_indices(pruned).items()]

    def _build(
        self,
        source: nn.Module,
        graph: DependencyGraph,
        stats: dict,
        pruned: torch.Tensor,
    ) -> tuple[nn.Module, list[SliceEdit]]:
        edits = self._edits(graph, pruned)
        compensate = None
        if self.bias_compensation and stats:
            compensate = functools.partial(self._compensate, graph=graph, stats=stats, pruned=pruned)
        model = _sliced_copy(source, edits, graph.pm, compensate)
        if self.verify:
            self._verify(model, graph)
        return model, edits

    def _compensate(
        self, model: nn.Module, graph: DependencyGraph, stats: dict, pruned: torch.Tensor, own: Callable
    ) -> None:
        """Fold what the removed input channels carried into the kept ones; ``own(module)``
        gives the module tensors of its own before a plugin writes to them in place."""
        with torch.no_grad():
            for spec in graph.slices:
                st = stats.get((spec.module, spec.name))
                if spec.kind != "in" or st is None or st.mean is None or spec.pruner is None:
                    continue
                gone = pruned[graph.root[spec.atoms]]
                if not bool(gone.any()):
                    continue
                idx = gone.nonzero().squeeze(1)
                module = own(model.get_submodule(spec.module))
                dev = _device_of(module) or torch.device("cpu")  # the statistics live on the CPU
                if self.reconstruction and st.cov is not None and not bool(gone.all()):
                    kept = (~gone).nonzero().squeeze(1)
                    coef, shift = _regress(st.cov, st.mean, idx, kept)
                    moved = (t.to(dev) for t in (idx, kept, coef, shift))
                    if spec.pruner.reconstruct(module, spec.name, *moved):
                        continue
                spec.pruner.compensate(module, spec.name, idx.to(dev), st.mean[idx].to(dev))

    def _verify(self, model: nn.Module, graph: DependencyGraph) -> None:
        """Shapes and finiteness of ``model``'s outputs against the original's
        (:mod:`cleanai_core.verify`); raises :class:`PruningError`."""
        if self._reference is None:
            self._reference = reference(self.model, self.example_inputs, self.forward_fn, self.output_transform)
        check_outputs(model, self.example_inputs, self._reference, self.forward_fn, self.output_transform)

    def _safe_build(self, source, graph, stats, plan: PruningPlan) -> tuple[nn.Module, list[SliceEdit]]:
        """Build; if the result does not run, find the groups at fault by bisection,
        skip them with a warning naming group, modules and plugins, and build again."""
        pruned = plan.pruned_units()
        distributed.check_same_plan(pruned)
        try:
            return self._build(source, graph, stats, pruned)
        except PruningError as first:
            active = [gp for gp in plan.groups if gp.n_pruned]

            def mask(gps):
                m = torch.zeros_like(pruned)
                for gp in gps:
                    m[gp.group.units[gp.pruned]] = True
                return m

            def ok(gps) -> bool:
                try:
                    self._build(source, graph, stats, mask(gps))
                    return True
                except PruningError:
                    return False

            def bad(gps):
                if ok(gps):
                    return []
                if len(gps) == 1:
                    return gps
                half = len(gps) // 2
                found = bad(gps[:half]) + bad(gps[half:])
                return found or gps

            culprits = bad(active)
            for gp in culprits:
                plugins = sorted({type(s.pruner).__name__ for s in gp.group.slices if s.pruner is not None})
                msg = (
                    f"skipped group {gp.group.id} ({', '.join(gp.group.modules()[:4])}; pruners "
                    f"{', '.join(plugins) or 'none'}): pruning it breaks the model ({first})"
                )
                self.skipped_groups.append(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
                gp.pruned[:] = False
            remaining = [gp for gp in active if gp not in culprits]
            return self._build(source, graph, stats, mask(remaining))

    def prune(self) -> nn.Module:
        """Slice the model; return the pruned model (a copy unless ``inplace=True``)."""
        self._before = {"params": count_params(self.model)}
        if self.inplace:  # the original is about to change: measure it now
            self._before["flops"] = count_flops(self.model, self.example_inputs, self.forward_fn)
        self._pruned_plans = []
        try:
            current = self._prune_steps()
        finally:
            self._step = (0, 1)  # also when a step fails: a later plan() must not see a stale step
            self._targets = {}
        _copy_modes(self.model, current)
        if self.inplace:
            self._transplant(current)
            current = self.model
        self.pruned_model = current
        return current

    def _prune_steps(self) -> nn.Module:
        """The pruning steps (one unless ``iterative_steps``): plan, build, record."""
        current, graph, stats, moments = self.model, self.graph, self.stats, self._bn_moments
        steps = self.iterative_steps
        base_flops = None
        if steps > 1 and self.target_flops is None:  # every step aims at a count from the original widths
            self._targets = final_counts(self._make_plan(graph, current, stats, self.pruning_ratio))
            units = sum(g.size for g in graph.groups(prunable_only=True))
        for step in range(steps):
            self._step = (step, steps)
            if step == 0 and steps == 1:
                plan = self.plan()
            else:
                if step > 0:
                    graph = self._build_graph(current)
                    stats, moments = self._recollect(current, graph)
                if self.target_flops is not None:
                    # step k ends at target ** (k / steps) of the original FLOPs
                    if base_flops is None:
                        base_flops = self._before.get("flops") or count_flops(
                            self.model, self.example_inputs, self.forward_fn
                        )
                    share = count_flops(current, self.example_inputs, self.forward_fn) / base_flops
                    r = self._solve_flops(graph, current, stats, self.target_flops ** ((step + 1) / steps) / share)
                else:
                    now = sum(g.size for g in graph.groups(prunable_only=True))
                    r = step_ratio(self.pruning_ratio, units, now, step, steps)
                plan = self._make_plan(graph, current, stats, r)
                if step == 0:
                    self._plan = plan
            pruned_model, edits = self._safe_build(current, graph, stats, plan)
            self._pruned_plans.append((graph, plan))
            self.history.record(edits)
            before = dict(current.named_modules())
            added = self.history.meta.setdefault("added_biases", [])
            for name, m in pruned_model.named_modules():
                old = before.get(name)
                if isinstance(getattr(m, "bias", None), torch.Tensor) and old is not None and old.bias is None:
                    added.append(name)
            if self.recalibrate_bn and self._calibration is not None:
                self._correct_bn(current, pruned_model, moments, edits)
            current = pruned_model
        return current

    @distributed.stage("re-calibration", then=distributed.combine_returned_stats)
    def _recollect(self, model: nn.Module, graph: DependencyGraph) -> tuple[dict, Moments]:
        """Statistics (and BatchNorm input moments) of ``model``, an intermediate step's result."""
        if self._calibration is None:
            return {}, {}
        collector = StatsCollector(
            model,
            graph.slices,
            covariance=self.reconstruction,
            covariance_budget=self.stats_budget_bytes,
            covariance_rows=self.covariance_rows,
        )
        moments: Moments = {}
        model.eval()
        with collector.hooks(), recording(model, moments), torch.no_grad():
            for batch in self._calibration.replay():
                self._forward(model, _inputs_for(model, split_batch(batch)[0]))
        if getattr(self.importance, "needs_gradients", False):  # gradients of this step's model
            self.gradients = self._accumulate_gradients(model, self._calibration.replay(), _device_of(model))
        return collector.stats, moments

    @distributed.stage("BatchNorm correction")
    def _correct_bn(self, source: nn.Module, pruned: nn.Module, moments: Moments, edits: list[SliceEdit]) -> None:
        """Move ``pruned``'s BatchNorm statistics by what pruning changed at their inputs
        (:mod:`cleanai_core.bn_correction`): on the kept calibration batches, else on the
        loader read again beside ``source``; skipped with a warning where neither can be."""
        data = self._calibration
        norms = norms_with_running_stats(pruned)
        keep = {e.module: e.keep for e in edits if e.module in norms}

        def run(model: nn.Module, batch: Any) -> None:
            self._forward(model, _inputs_for(model, split_batch(batch)[0]))

        if data.cached:
            correct_batchnorm(pruned, {k: list(v) for k, v in moments.items()}, keep, data.replay, run)
            return
        if data.one_shot:
            warnings.warn(
                "BatchNorm statistics were not corrected: the calibration data was an iterator too large to keep, "
                "so it cannot be read again; give a re-iterable loader (a list or a DataLoader)",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        fresh: Moments = {}

        def run_original(batch: Any) -> None:  # the loader may shuffle: measure both on each batch
            with preserved(source), recording(source, fresh), torch.no_grad():
                run(source, batch)

        correct_batchnorm(pruned, fresh, keep, data.replay, run, run_original)

    def _transplant(self, pruned: nn.Module) -> None:
        """Make ``self.model`` the pruned model, module by module (for ``inplace``)."""
        mine = dict(self.model.named_modules())
        for name, m in pruned.named_modules():
            target = mine.get(name)
            if target is None:
                continue
            if type(target) is not type(m):  # a plugin may swap a pruned module's class
                target.__class__ = type(m)
            for key, value in m.__dict__.items():
                # the user's hook handles point at the target's own hook tables: keep them
                if key != "_modules" and key not in HOOK_ATTRIBUTES:
                    target.__dict__[key] = value

    # -- report ---------------------------------------------------------------------------
    @staticmethod
    def _layer_records(graph: DependencyGraph, plan: PruningPlan) -> list[dict[str, Any]]:
        """Per pruned layer: channels before/after, pruned indices and scores (built when
        the report asks, not while pruning)."""
        layers = []
        unit_score = torch.zeros(graph.root.numel(), dtype=torch.float64)
        for gp in plan.groups:
            unit_score[gp.group.units] = gp.scores.to(torch.float64)
        pruned = plan.pruned_units()
        for spec in graph.slices:
            if spec.kind == "in":
                continue
            units = graph.root[spec.atoms]
            gone = pruned[units]
            scores = unit_score[units]
            layers.append(
                {
                    "name": spec.module or spec.name,
                    "slice": spec.name if spec.module else "tensor",
                    "channels_before": int(spec.atoms.numel()),
                    "channels_after": int((~gone).sum()),
                    "pruned_indices": gone.nonzero().squeeze(1).tolist(),
                    "importance_scores": {
                        "pruned": scores[gone].round(decimals=6).tolist(),
                        "kept": scores[~gone].round(decimals=6).tolist(),
                    },
                }
            )
        return layers

    def report(self) -> dict[str, Any]:
        """Per layer: channels before/after, pruned indices, importance scores of pruned and
        kept units; plus params and FLOPs before/after. Call after :meth:`prune`."""
        if self.pruned_model is None:
            raise UserError("nothing pruned yet: call pruner.prune() before pruner.report()")
        return {
            "params_before": self._before.get("params"),
            "params_after": count_params(self.pruned_model),
            "flops_before": self._before.get("flops") or count_flops(self.model, self.example_inputs, self.forward_fn),
            "flops_after": count_flops(self.pruned_model, self.example_inputs, self.forward_fn),
            "importance": repr(self.importance),
            "pruning_ratio": self.pruning_ratio,
            "skipped_groups": list(self.skipped_groups),
            "groups": self._plan.to_json()["groups"] if self._plan else [],
            "layers": [rec for graph, plan in self._pruned_plans for rec in self._layer_records(graph, plan)],
            "dead_units": [f.to_json() for f in find_dead_units(self.graph, self.stats)] if self.stats else None,
        }


def _regress(
    cov: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor, kept: torch.Tensor, damping: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of the removed channels on the kept ones from their covariance:
    ``x_removed ~ shift + coef @ x_kept`` (coef: removed x kept)."""
    c_kk = cov[kept][:, kept]
    c_kr = cov[kept][:, removed]
    lam = damping * float(c_kk.diagonal().mean().clamp(min=1e-12))
    eye = torch.eye(c_kk.shape[0], dtype=cov.dtype)
    coef = torch.linalg.solve(c_kk + lam * eye, c_kr).T
    shift = mean[removed] - coef @ mean[kept]
    return coef, shift


def _sliced_copy(source: nn.Module, edits: list[SliceEdit], pm: Any, compensate: Callable | None = None) -> nn.Module:
    """A pruned copy of ``source``; ``source`` and its tensors are never written to.

    The copy starts out sharing ``source``'s parameters and buffers: slicing makes new,
    smaller tensors anyway, so cloning every weight first (what ``copy.deepcopy`` does)
    would copy most of the model only to throw it away. A tensor is copied only where it
    is about to be written in place (``compensate(model, own)`` calls ``own(module)``
    before touching a module) or is left unsliced; one memo keeps tied tensors tied.
    Fix-up hooks run after every tensor is the copy's own.

    A plugin that writes into a tensor it was handed instead of replacing it would change
    the user's model through the sharing: every shared tensor's version counter, storage
    and shape are compared afterwards, and such a write raises, naming the tensor and the
    plugin that claimed its module.
    """
    originals = list(source.parameters()) + list(source.buffers())
    before = [_fingerprint(t) for t in originals]
    model = copy.deepcopy(source, {id(t): t for t in originals})
    shared = {id(t) for t in originals}
    memo: dict[int, Any] = {}

    def own(module: nn.Module) -> nn.Module:
        for m in module.modules():
            for table in (m._parameters, m._buffers):
                for key, t in table.items():
                    if t is not None and id(t) in shared:
                        table[key] = copy.deepcopy(t, memo)
        return module

    if compensate is not None:
        compensate(model, own=own)
    findings = prepare_model(model, pm)  # the copy as it is before slicing: its fix-ups read this
    slice_tensors(model, edits, pm, findings)
    _check_untouched(source, originals, before, pm)
    own(model)
    run_after_prune(model, edits, pm, findings)
    return model


def _fingerprint(t: torch.Tensor) -> tuple:
    """What an in-place write or a ``.data`` swap changes: version, storage, shape. (A
    write through ``t.data`` bumps no counter; reading every weight to catch it would cost
    more than the whole slicing.)"""
    try:
        version = t._version
    except RuntimeError:  # inference-mode tensors count no versions
        version = None
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # no storage (e.g. an uninitialised lazy parameter)
        ptr = None
    return version, ptr, tuple(t.shape)


def _check_untouched(source: nn.Module, originals: list[torch.Tensor], before: list[tuple], pm: Any) -> None:
    changed = {id(t) for t, fp in zip(originals, before, strict=True) if _fingerprint(t) != fp}
    if not changed:
        return
    names = [n for n, t in itertools.chain(source.named_parameters(), source.named_buffers()) if id(t) in changed]
    owners = {n.rpartition(".")[0] for n in names}
    nodes = resolve_modules(source, pm)
    claimed = sorted({f"{type(nodes[o].pruner).__name__} ({o or 'root'})" for o in owners if o in nodes})
    raise RuntimeError(
        f"a layer pruner wrote into {', '.join(names)} in place while slicing a copy, which changed your model "
        f"(it shares those tensors with the copy). Pruners involved: {', '.join(claimed) or 'unknown'}. "
        "LayerPruner.prune must replace a module's tensors (slice_params / replace_param), never write into "
        "them; report this to the plugin's author, or prune with inplace=True."
    )


def _check_ratio(name: str, r: Any, allow_zero: bool = False) -> None:
    if isinstance(r, (int, float)) and not isinstance(r, bool) and allow_zero and float(r) == 0.0:
        return
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not (0.0 < float(r) < 1.0) or math.isnan(r):
        if allow_zero:
            raise UserError(f"{name}={r!r} must be a number between 0 and 1, below 1 (0 keeps the layer whole)")
        raise UserError(f"{name}={r!r} must be a number strictly between 0 and 1 (e.g. 0.3 removes 30%)")


def _copy_modes(source: nn.Module, target: nn.Module) -> None:
    """Give every module of ``target`` the train/eval mode of its namesake in ``source``
    (a frozen BatchNorm inside a training model stays frozen)."""
    modes = {name: m.training for name, m in source.named_modules()}
    for name, m in target.named_modules():
        m.training = modes.get(name, source.training)


def _inputs_for(model: nn.Module, inputs: Any) -> Any:
    """``inputs`` on ``model``'s device; float64 tensors cast to the model's floating dtype
    when it is another (numpy arrays default to float64, models to float32)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None:
        return inputs
    inputs = move_to(inputs, p.device)
    if p.dtype == torch.float64:
        return inputs
    return tree_map(lambda t: t.to(p.dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float64 else t, inputs)


def _check_labels(out: Any, target: Any) -> torch.Tensor:
    """Labels a classification loss can use for gradient criteria, or a :class:`UserError`."""
    if not isinstance(out, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise UserError(
            "taylor importance needs a tensor of logits and a tensor of labels; pass output_transform=lambda out: "
            "<the logits> for models that return something else"
        )
    if target.is_floating_point() or target.is_complex():
        if target.shape == out.shape:  # class probabilities (soft labels)
            return target.to(out.dtype)
        raise UserError(
            f"taylor importance needs integer class labels, got {target.dtype} labels of shape {tuple(target.shape)}; "
            "give class indices 0..N-1 (e.g. labels.long())"
        )
    if target.ndim == 0 or out.ndim == 0 or target.shape[0] != out.shape[0]:
        n_in = out.shape[0] if out.ndim else 1
        n_lab = target.shape[0] if target.ndim else 1
        raise UserError(
            f"the calibration batch has {n_in} inputs but {n_lab} labels; "
            "give one label per input for taylor importance"
        )
    return target


def _device_of(model: nn.Module) -> torch.device | None:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else None
