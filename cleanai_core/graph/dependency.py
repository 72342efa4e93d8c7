"""DependencyGraph: trace a model once and find every tensor slice that shrinks together."""

from __future__ import annotations

import traceback
import types
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from cleanai_core.errors import TraceError, TraceInputError, UserError, printable, shown, shown_name
from cleanai_core.graph.context import SliceSpec, TraceContext, tensor_name
from cleanai_core.graph.cut import cut_dims
from cleanai_core.graph.findings import SAME_SHARE, ModelFindings, prepare_model
from cleanai_core.graph.groups import Group, components, make_groups, named_alone, unique
from cleanai_core.graph.trace import ModuleCall, OpCall, Recording, TRef, record
from cleanai_core.heads import head_layouts
from cleanai_core.interfaces import LayerPruner
from cleanai_core.model_state import reads_preserved
from cleanai_core.option_names import missing_attribute
from cleanai_core.options import (
    check_callables,
    check_example_inputs,
    check_modules,
    check_not_meta,
    check_switches,
)
from cleanai_core.plugins import plugin_manager
from cleanai_core.runtime import call_model, dtype_advice, plain_inputs

__all__ = ["DependencyGraph", "Node", "prunable_graph", "resolve_modules"]


@attrs.define(eq=False)
class Node:
    """A claimed module: its name, the pruner that slices it and the plugin that claimed it."""

    name: str
    module: nn.Module
    pruner: LayerPruner
    plugin: str


class OpaquePruner(LayerPruner):
    """For leaf modules that nobody claims: every channel through them is frozen."""

    name = "opaque"

    def trace(self, module, call, ctx):
        return None  # inputs are never read, so the kernel freezes them; outputs carry no channels

    def prune(self, module, keep):
        return None


def _fails_untraced(model: nn.Module, example_inputs: Any, forward_fn: Callable | None) -> bool:
    """The model fails on ``example_inputs`` when run plainly too (no hooks, no gradients):
    the fault is the model's or the inputs', not the trace's."""
    try:
        with torch.no_grad():
            call_model(model, example_inputs, forward_fn)
    except Exception:  # noqa: BLE001 - any failure of the user's model says the same
        return True
    return False


def _exception_text(exc: BaseException) -> str:
    """``"Type: message"``; for an exception without a message (a bare ``assert``, timm's
    ``_assert(H == self.pos_embed.height, '')`` where a model takes one input size only) the
    line that raised it, so that the refusal says what was checked: it read
    "AssertionError: ." for eca_halonext26ts at 64 px."""
    text = str(exc).strip()
    if text:
        return f"{type(exc).__name__}: {text}"
    frames = traceback.extract_tb(exc.__traceback__)
    while len(frames) > 1 and frames[-1].name.lstrip("_") == "assert":  # an assert helper: its caller
        frames = frames[:-1]
    if not frames:
        return f"{type(exc).__name__} (no message)"
    last = frames[-1]
    where = "/".join(last.filename.replace("\\", "/").split("/")[-3:])
    return f"{type(exc).__name__} (no message) at {where}:{last.lineno}: {(last.line or '').strip()}"


def _plugin_name(pm, pruner: Any) -> str:
    mod = type(pruner).__module__
    for name, plugin in pm.list_name_plugin():
        if getattr(plugin, "__name__", None) == mod or name == mod:
            return name
    for name, plugin in pm.list_name_plugin():  # a plugin object defined beside its pruner class
        if not isinstance(plugin, types.ModuleType) and type(plugin).__module__ == mod:
            return name
    return mod


def resolve_modules(model: nn.Module, pm=None, findings: ModelFindings | None = None) -> dict[str, Node]:
    """Ask the claim hook once per module, top-down; a claimed module's children are
    not entered. Leaf modules declared by plugins become opaque nodes.

    ``findings``: the model's :class:`ModelFindings`, handed to every claim; when not
    given, ``model`` is scanned here (:func:`prepare_model`)."""
    pm = plugin_manager(pm, "resolve_modules")
    if findings is None:
        findings = prepare_model(model, pm)
    leaf_specs: list[Any] = []
    for res in pm.hook.cleanai_leaf_modules(model=model):
        leaf_specs.extend(res or ())
    leaf_types = tuple(s for s in leaf_specs if isinstance(s, type))
    leaf_ids = {id(s) for s in leaf_specs if isinstance(s, nn.Module)}
    nodes: dict[str, Node] = {}
    skip: set[str] = set()  # claimed or opaque modules and, transitively, their children
    for name, module in model.named_modules():
        if name and name.rpartition(".")[0] in skip:
            skip.add(name)
            continue
        if module is model and name == "":
            pruner = pm.hook.cleanai_layer_pruner(module=module, name=name, findings=findings)
            if pruner is None:
                continue
        elif (leaf_types and isinstance(module, leaf_types)) or id(module) in leaf_ids:
            nodes[name] = Node(name, module, OpaquePruner(), "leaf_modules")
            skip.add(name)
            continue
        else:
            pruner = pm.hook.cleanai_layer_pruner(module=module, name=name, findings=findings)
        if pruner is not None:
            nodes[name] = Node(name, module, pruner, _plugin_name(pm, pruner))
            skip.add(name)
    return nodes


class DependencyGraph:
    """The coupling structure of a model, from one traced forward pass.

    Example::

        graph = DependencyGraph(model, torch.randn(1, 3, 224, 224))
        for group in graph.groups():
            print(group.describe())
        print(graph.explain())

    :param model: the model (not modified; traced in eval mode, its modes and state put back).
    :param example_inputs: a tensor, a tuple of positional inputs or a dict of keywords.
    :param forward_fn: ``forward_fn(model, example_inputs)`` for unusual call signatures.
    :param output_transform: maps the output to its tensors (e.g. ``lambda o: o.logits``).
    :param ignored_layers: modules (or names) whose output channels are kept.
    """

    def __getattr__(self, name: str) -> Any:
        # reached only for a missing attribute: Torch-Pruning's method names get CleanAI's way
        return missing_attribute(self, name)

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        output_transform: Callable[[Any], Any] | None = None,
        ignored_layers: Iterable[nn.Module | str] = (),
        pm: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):  # an AttributeError from deep in the trace before
            raise UserError(f"DependencyGraph needs a torch.nn.Module, got {type(model).__name__}")
        check_modules(model)  # a scripted or lazy layer, a weight a pre-hook recomputes: named, before the trace
        # a model on the meta device: "the model failed to run on the example inputs while tracing: aten::equal ...
        # Meta tensors", where StructuredPruner names the device and the fix
        check_not_meta(model)
        example_inputs = plain_inputs(example_inputs)  # a tokenizer's BatchEncoding: a dict
        # as StructuredPruner checks them: forward_fn=5, example_inputs None, text or a NumPy array were
        # "the model failed to run on the example inputs ... the inputs or the model itself are at fault"
        check_callables(forward_fn=forward_fn, output_transform=output_transform)
        check_example_inputs(example_inputs)
        self.model = model
        self.pm = plugin_manager(pm, "DependencyGraph")
        # in eval mode, its state put back: a spectral_norm weight read in training mode by a
        # plugin's scan rewrites its power-iteration vectors
        with reads_preserved(model):
            self._build(model, example_inputs, forward_fn, output_transform, ignored_layers)

    def _build(
        self,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Callable[[nn.Module, Any], Any] | None,
        output_transform: Callable[[Any], Any] | None,
        ignored_layers: Iterable[nn.Module | str],
    ) -> None:
        self.findings = prepare_model(model, self.pm)
        # where the attention heads lie, read before any slicing (the report counts them)
        self.head_layouts = head_layouts(model, self.pm)
        self.nodes = resolve_modules(model, self.pm, self.findings)
        self.module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self._named = dict(model.named_modules())
        self.ignored = self._ignored_names(ignored_layers)
        self._mappers: dict[Any, Any] = {}
        claimed = {node.module: name for name, node in self.nodes.items()}
        try:
            watched = self._custom_layers(set(claimed.values()))
            self.recording: Recording = record(
                model, example_inputs, claimed, forward_fn, output_transform, watched=watched
            )
        except UserError:  # output_transform failed: it names itself
            raise
        except Exception as exc:
            through = " (through forward_fn)" if forward_fn is not None else ""
            also = " and that forward_fn calls the model as it should" if forward_fn is not None else ""
            text = _exception_text(exc)
            if "HigherOrderOperator" in text or "non-infra torch dispatch mode" in text:
                raise TraceInputError(
                    f"the model failed to run while tracing: {text}. A part of it runs a higher-order operator "
                    "or torch.compile (transformers' attn_implementation='flex_attention' does), which cannot run "
                    "under the dispatch mode CleanAI traces with: prune it with an eager implementation of that "
                    "part (for transformers: model.set_attn_implementation('sdpa') or 'eager'; the pruned model "
                    "can be switched back).",
                    kind="implementation",
                ) from exc
            if _fails_untraced(model, example_inputs, forward_fn):  # the user's: a UserError (CLI exit 2)
                raise TraceInputError(
                    f"the model failed to run on the example inputs{through} while tracing: {text}. It fails the "
                    "same way run plainly, without CleanAI's hooks: the inputs or the model itself (or the "
                    "configuration it was built from) are at fault, not the trace."
                    f"{dtype_advice(model, example_inputs, exc=exc)} Check that example_inputs match what the "
                    "model's forward expects (a tensor, a tuple of positional inputs, or a dict of keyword inputs)"
                    f"{also}.",
                    kind="inputs",
                ) from exc
            # CleanAI's: the same inputs run without the recorder (said "check that example_inputs match")
            raise TraceError(
                f"the model failed to run on the example inputs{through} while tracing: {text}. It runs on the "
                "same inputs without CleanAI's hooks, so the failure comes from tracing it (an operation the "
                "recorder or a plugin cannot follow), not from the inputs: report it with the model's code."
            ) from exc
        self.output_shapes = [r.shape for r in tree_flatten(self.recording.output)[0] if hasattr(r, "shape")]
        if not self.output_shapes:
            kind = type(self.recording.output).__name__
            raise TraceInputError(
                f"output_transform returned {kind}, which holds no tensors; return the output tensor(s) to keep"
                if output_transform is not None
                else f"the model's output ({kind}) holds no tensors, so CleanAI cannot check that pruning keeps it; "
                "pass output_transform=lambda out: <the output tensor(s)>",
                kind="output",
                returned=kind,
            )
        self.ctx = self._propagate()
        self._build_groups()

    # -- building -------------------------------------------------------------
    def _ignored_names(self, ignored_layers: Any) -> set[str]:
        """The names of the ignored layers: a module of the model or the exact name of one as
        it is, anything else (a glob, a type, a name the model lacks) through
        :func:`~cleanai_core.options.match_modules`, which refuses what matches no layer. A
        name the model lacked, a glob (``"layer4.*"``) and a lone name (``"fc"``, read as the
        layers ``f`` and ``c``) were kept as text that matched nothing: the channels the user
        meant to keep were pruned without a word."""
        from cleanai_core.options import as_specs, match_modules, split_ignored

        names = set(self.module_names.values())
        out: set[str] = set()
        layers, self.ignored_tensors = split_ignored(self.model, as_specs(ignored_layers, "ignored_layers"))
        for spec in layers:
            found = spec if isinstance(spec, str) and spec in names else None
            if isinstance(spec, nn.Module):
                found = self.module_names.get(id(spec))
            if found is None:
                out.update(match_modules(self.model, [spec]))
            elif next(self.model.get_submodule(found).children(), None) is not None:
                # a container (the model itself too) covers its layers, as in StructuredPruner: its name alone
                # ignored nothing inside it
                out.update(match_modules(self.model, [self.model.get_submodule(found)]))
            else:
                out.add(found)
        return out

    def _custom_layers(self, claimed: set[str]) -> set[str]:
        """The layers no plugin claims and whose weights are bare tensors to the trace (a
        custom layer, a LoRA linear traced through): leaves with parameters of their own.
        The trace notes their outputs (:attr:`Recording.module_outputs`): no slice is named
        after them, so before 2026-12-02 ``ignored_layers=[layer]`` kept nothing and
        ``layer_pruning_ratios={layer: r}`` changed nothing."""
        out = set()
        for name, module in self._named.items():
            if name and name not in claimed and next(module.children(), None) is None:
                if next(module.parameters(recurse=False), None) is not None:
                    out.add(name)
        return out

    def mapper_for(self, op: Any) -> Any:
        if op not in self._mappers:
            self._mappers[op] = self.pm.hook.cleanai_index_mapper(op=op)
        return self._mappers[op]

    def _propagate(self) -> TraceContext:
        choices: dict[int, int] = {}
        modules = self._named
        heads = {id(m) for res in self.pm.hook.cleanai_whole_heads(model=self.model) for m in res or ()}
        whole_heads = {name for name, m in modules.items() if id(m) in heads}
        coarse: set[str] = set()
        fine: dict[str, int] = {}  # channels in groups of several units under the fine ties
        for _ in range(4):
            ctx = TraceContext(choices, self.findings)
            ctx.modules = modules
            ctx.whole_heads = whole_heads
            ctx.call_numbers = self.recording.call_numbers
            ctx.coarse = set(coarse)
            self._setup_params(ctx)
            self._run(ctx)
            changed = _coarse_choices(ctx, coarse, fine)
            if not ctx.split_requests and not changed:
                break
            choices = {**choices, **ctx.split_requests}
        return ctx

    def _setup_params(self, ctx: TraceContext) -> None:
        owned = {}
        for name, node in self.nodes.items():
            for pname, _ in node.module.named_parameters(prefix=name):
                owned[pname] = name
            for bname, _ in node.module.named_buffers(prefix=name):
                owned[bname] = name
        ctx.param_owner = owned
        ctx.owners = {name: (node.module, node.pruner) for name, node in self.nodes.items()}
        seen = {r.param for e in self.recording.events if isinstance(e, OpCall) for r in e.inputs if r.param}
        tensors = dict(self.model.named_parameters(remove_duplicate=False))
        tensors.update(dict(self.model.named_buffers(remove_duplicate=False)))
        for pname in seen:
            if tensors[pname].layout != torch.strided:  # a sparse adjacency is data: no channels
                ctx.param_dims[pname] = False
                continue
            ctx.param_dims[pname] = self.pm.hook.cleanai_unwrapped_parameter(
                name=pname, parameter=tensors[pname], model=self.model
            )

    def _run(self, ctx: TraceContext) -> None:
        from cleanai_core.graph.elementwise import elementwise, is_pointwise
        from cleanai_core.graph.trace import maintenance_reads
        from cleanai_core.parametrized import trace_parametrized

        ctx.maintenance = maintenance_reads(self.recording)
        ctx.events = self.recording.events

        for event in self.recording.events:
            ctx.begin(event)
            try:
                if isinstance(event, ModuleCall):
                    self.nodes[event.name].pruner.trace(event.module, event, ctx)
                    trace_parametrized(event.name, event.module, self.nodes[event.name].pruner, ctx)
                else:
                    mapper = self.mapper_for(event.op)
                    if mapper is not None:
                        mapper.trace(event, ctx)
                    elif is_pointwise(event.op):
                        elementwise(event, ctx)
                    elif any(ctx._labels.get(r.key) is not None for r in event.inputs):
                        ctx.unknown_ops[str(event.op)] += 1
            except Exception as exc:
                who = (
                    f"module {event.name} ({type(event.module).__name__}, pruner {self.nodes[event.name].plugin})"
                    if isinstance(event, ModuleCall)
                    else f"op {event.op} in {event.scope or 'model'} "
                    f"(mapper {type(self.mapper_for(event.op)).__name__})"
                )
                raise TraceError(
                    f"tracing failed at {who}: {type(exc).__name__}: {exc}. The model ran; the plugin that maps "
                    "this step failed on it, a fault of CleanAI or of that plugin, not of the model or its inputs: "
                    "report it with the model's code (`cleanai plugins` lists the plugins)"
                ) from exc
            ctx.end(event)
        ctx.event = None
        ctx.unbinds.settle(ctx)
        self._couple_shared_parameters(ctx)
        self._freeze_outside_reads(ctx)
        outputs = self.recording.outputs()
        ctx.statistics.settle(ctx, outputs)
        ctx.freeze_untaken_cross({id(lab.cross[1]) for r in outputs if (lab := ctx.label_of(r)) and lab.cross})
        for ref in outputs:
            ctx.freeze_tensor(ref, "model output")
        for spec in ctx.slices.values():
            if spec.module in self.ignored and spec.kind != "in":
                ctx.freeze(spec.atoms, f"ignored layer {spec.module}")
            elif not spec.module and tensor_name(spec.name) in self.ignored_tensors:
                ctx.freeze(spec.atoms, f"ignored tensor {tensor_name(spec.name)}")
        self._check_ignored_tensors(ctx)
        for name, refs in self.recording.module_outputs.items():
            # a custom layer inside an ignored container stays free (YOLOv7's ``ImplicitA``
            # before an ignored ``Detect`` meets the channels on its input side, which prune)
            if named_alone(name, self.ignored):
                for ref in refs:
                    ctx.freeze_tensor(ref, f"ignored layer {name}")
        self._tie_shares(ctx)

    def _check_ignored_tensors(self, ctx: TraceContext) -> None:
        """A :class:`UserError` for an ignored tensor that a claimed layer holds (``fc.weight``):
        its channels are that layer's slices, which only ignoring the layer keeps. A bare tensor
        that carries no channels (a scalar, one left unused) has nothing to keep."""
        bare = {tensor_name(s.name) for s in ctx.slices.values() if not s.module}
        for name in sorted(self.ignored_tensors - bare):
            parts = name.split(".")[:-1]
            owner = next((o for k in range(len(parts), 0, -1) if (o := ".".join(parts[:k])) in self.nodes), None)
            if owner is not None:
                raise UserError(
                    f"ignored_layers names the tensor {name!r}, which layer {owner!r} holds and slices: its channels "
                    f"are that layer's; ignore {owner!r} to keep them"
                )

    def _tie_shares(self, ctx: TraceContext) -> None:
        """Slices the ``SAME_SHARE`` finding names take its key (``SliceSpec.same_share``)."""
        ties = {(id(module), name): key for module, name, key in self.findings.get(SAME_SHARE, ())}
        if not ties:
            return
        for spec in ctx.slices.values():
            node = self.nodes.get(spec.module)
            key = ties.get((id(node.module), spec.name)) if node is not None else None
            if key is not None:
                spec.same_share = key

    def _freeze_outside_reads(self, ctx: TraceContext) -> None:
        """A tensor of a claimed module read outside it, that its pruner did not label
        (:meth:`~cleanai_core.interfaces.LayerPruner.trace_param` answered ``None``), got
        frozen atoms of its own: the operations that read it keep its shape only if the
        module's own slices that cut it are frozen too (MobileBERT's MLM head concatenates
        the tied embedding weight with another layer's weight; pruning the embedding width
        broke it). A slice whose cut cannot be told is frozen as well."""
        by_module: dict[str, list[Any]] = {}
        for spec in ctx.slices.values():
            by_module.setdefault(spec.module, []).append(spec)
        for owner, attr, why in ctx.outside_reads:
            node = self.nodes.get(owner)
            if node is None:
                continue
            for spec in by_module.get(owner, ()):
                if "." in attr or cut_dims(node.module, node.pruner, spec, attr) != {}:
                    ctx.freeze(spec.atoms, why)

    def _couple_shared_parameters(self, ctx: TraceContext) -> None:
        """Modules claimed by the same kind of pruner that hold one parameter under the same
        name (T5's encoder and decoder embeddings share one weight) slice it alike: their
        slices of the same name are one set of channels."""
        holders: dict[int, dict[tuple[str, type], list[str]]] = {}
        for name, node in self.nodes.items():
            for attr, p in node.module._parameters.items():
                if p is not None:
                    holders.setdefault(id(p), {}).setdefault((attr, type(node.pruner)), []).append(name)
        by_module: dict[str, list[Any]] = {}
        for spec in ctx.slices.values():
            by_module.setdefault(spec.module, []).append(spec)
        for kinds in holders.values():
            for names in kinds.values():
                first: dict[str, Any] = {}
                for name in names:
                    for spec in by_module.get(name, ()):
                        seen = first.setdefault(spec.name, spec)
                        if seen is not spec and seen.atoms.numel() == spec.atoms.numel():
                            ctx.union(seen.atoms, spec.atoms)
            if len(kinds) > 1:  # different pruners (an embedding tied to an output projection)
                self._couple_by_dimension(ctx, kinds, by_module)

    def _couple_by_dimension(self, ctx: TraceContext, kinds: dict, by_module: dict[str, list[Any]]) -> None:
        """One parameter held by modules of different pruners (ALBERT's, OPT-350m's input
        embedding tied to an output projection that reads a narrower width than the hidden
        size): the slices that cut the same dimension of it are one set of channels. Which
        dimension a slice cuts is found by slicing a copy of the module on the meta device."""
        cutting: dict[int, list[Any]] = {}
        for (attr, _), names in kinds.items():
            for name in names:
                node = self.nodes[name]
                for spec in by_module.get(name, ()):
                    dim = _cut_dim(node.module, node.pruner, spec, attr)
                    if dim is not None:
                        cutting.setdefault(dim, []).append(spec)
        for specs in cutting.values():
            for spec in specs[1:]:
                if spec.atoms.numel() == specs[0].atoms.numel():
                    ctx.union(specs[0].atoms, spec.atoms)

    def _freeze_constant_inputs(self, ctx: TraceContext) -> None:
        """Channels that only a buffer holds and only layers' inputs read (the ``(x, y)``
        coordinates of Swin-V2's ``relative_coords_table`` and of timm's ``RelPosMlp``
        ``rel_coords_log``, fed to a position MLP's first linear layer) are data, like the
        model's input: no layer produces them, and pruning one removed a coordinate."""
        buffers = {n for n, _ in self.model.named_buffers(remove_duplicate=False)}
        bare = [s for s in ctx.slices.values() if s.kind == "param" and not s.module and s.name in buffers]
        if not bare:
            return
        other = torch.zeros(ctx.n_atoms, dtype=torch.bool)  # roots that a layer output or a parameter reaches
        for s in ctx.slices.values():
            if s.kind not in ("in", "count") and not (s.kind == "param" and not s.module and s.name in buffers):
                other[self.root[s.atoms]] = True
        for s in bare:
            if not bool(other[self.root[s.atoms]].any()):
                ctx.freeze(s.atoms, f"buffer {s.name} holds constant data that only layers read (like an input)")

    def _build_groups(self) -> None:
        ctx = self.ctx
        self.root = components(ctx.n_atoms, ctx.unions)
        self._freeze_constant_inputs(ctx)
        frozen = torch.cat([a for a, _ in ctx.frozen]) if ctx.frozen else torch.zeros(0, dtype=torch.int64)
        texts = sorted({why for _, why in ctx.frozen})
        ids = {t: i for i, t in enumerate(texts)}
        why_cat = torch.cat([torch.full((a.numel(),), ids[w]) for a, w in ctx.frozen]) if ctx.frozen else frozen
        pairs = unique(self.root[frozen] * max(len(texts), 1) + why_cat)
        reasons = (pairs // max(len(texts), 1), pairs % max(len(texts), 1), texts)
        self.slices: list[SliceSpec] = list(ctx.slices.values())
        self._slice_atoms: tuple | None = None  # for indices_in()
        for s in self.slices:
            node = self.nodes.get(s.module)
            s.pruner = node.pruner if node is not None else None
        _note_reads(self.recording, self.slices)
        normalized = torch.cat(ctx.normalized) if ctx.normalized else None
        self._groups = make_groups(self.root, frozen, self.slices, reasons, normalized)
        self._unit_group: torch.Tensor | None = None  # for check_removal()
        self._note_custom_layers(ctx)

    def _note_custom_layers(self, ctx: TraceContext) -> None:
        """:attr:`Group.layers`: the custom layers whose outputs carry each group's units."""
        if not self.recording.module_outputs:
            return
        at = torch.full((ctx.n_atoms,), -1, dtype=torch.int64)
        for i, g in enumerate(self._groups):
            at[g.units] = i
        found: dict[int, list[str]] = {}
        for name, refs in self.recording.module_outputs.items():
            labels = [lab for r in refs if (lab := ctx.label_of(r)) is not None]
            hit = {i for lab in labels for i in at[self.root[lab.atoms]].unique().tolist() if i >= 0}
            for i in hit:
                found.setdefault(i, []).append(name)
        for i, names in found.items():
            self._groups[i].layers = tuple(sorted(set(names)))

    def apply_default_freezes(self, ratio: float | None = None) -> None:
        """Freeze what the ``cleanai_default_freezes`` hook names (the pruner's defaults
        that depend on the coupling; ``ratio``: its uniform plan's, if it has one) and
        regroup; the reasons show in :meth:`explain`."""
        found = [item for res in self.pm.hook.cleanai_default_freezes(graph=self, ratio=ratio) for item in res or ()]
        for units, why in found:
            self.ctx.freeze(torch.as_tensor(units, dtype=torch.int64), why)
        if found:
            self._build_groups()

    # -- queries ----------------------------------------------------------------
    def groups(self, prunable_only: bool = False) -> list[Group]:
        """All groups (or only those with at least one prunable unit)."""
        if prunable_only is not True and prunable_only is not False:  # "no" read as true: prunable groups only
            check_switches(prunable_only=prunable_only)
        if prunable_only:
            return [g for g in self._groups if g.prunable > 0]
        return list(self._groups)

    def check_removal(self, pruned: torch.Tensor) -> None:
        """A :class:`UserError` unless the units ``pruned`` marks (a boolean mask over
        :attr:`root`'s units, as ``group.units`` index it) can go: none frozen, and every
        group keeps at least one unit. A hand-made mask that broke either rule was sliced
        anyway and failed only when the pruned model ran ("expected weight to be at least
        1 at dimension 0")."""
        n = self._check_mask(pruned, "the units to remove")
        if self._unit_group is None:
            self._unit_group = torch.full((n,), -1, dtype=torch.int64)
            for i, g in enumerate(self._groups):
                self._unit_group[g.units] = i
        for i in self._unit_group[pruned].unique().tolist():
            if i < 0:
                continue
            g = self._groups[i]
            gone = pruned[g.units]
            names = [m or "<param>" for m in g.modules()]
            where = f"group {g.id} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
            frozen = gone & g.frozen
            if bool(frozen.any()):
                why = g.reasons[0] if g.reasons else "frozen"
                raise UserError(
                    f"the mask removes {int(frozen.sum())} frozen unit(s) of {where}: {why}. "
                    "Leave the units group.frozen marks (group.prunable of them are free); nothing was changed"
                )
            if bool(gone.all()):
                raise UserError(
                    f"the mask removes all {g.size} units of {where}: its layers would have no channels left. "
                    "Keep at least one unit of every group; nothing was changed"
                )

    def removal(
        self, layer: nn.Module | str, indices: Iterable[int] | torch.Tensor, slice: str = "out"
    ) -> torch.Tensor:
        """A boolean mask over :attr:`root`'s units that removes ``indices`` of ``layer``'s
        ``slice`` (``"out"``: its output channels, ``"in"``: its inputs, a norm's
        ``"channels"``) and every index coupled with them: Torch-Pruning's
        ``DG.get_pruning_group(layer, prune_conv_out_channels, idxs)``. Give it to
        ``pruner.build(mask)``; where several indices form one unit (a head, a channel of
        every norm group) the whole unit goes. The indices are the layer's own:
        ``group.units[i]`` is the group's unit ``i``, which for a layer whose channels reach
        the group in another order (flipped, shuffled, gathered) is another channel.

        Example::

            mask = pruner.graph.removal(model.conv1, [2, 6, 9])
            small, _ = pruner.build(mask)
        """
        name = self.module_names.get(id(layer)) if isinstance(layer, nn.Module) else layer
        if name is None or name not in self._named:
            raise UserError(
                f"{layer if isinstance(layer, str) else type(layer).__name__!r} is not a module of the traced model; "
                "give the module object or its name as model.named_modules() lists it"
            )
        specs = [s for s in self.slices if s.module == name]
        spec = next((s for s in specs if s.name == slice), None)
        if spec is None:
            have = ", ".join(repr(s.name) for s in specs) or "none: no plugin slices it, or the trace never ran it"
            raise UserError(f"module {name!r} has no slice {slice!r} (its slices: {have})")
        width = spec.atoms.numel()
        idx = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices, dtype=torch.int64)
        if idx.dim() != 1 or bool(((idx < -width) | (idx >= width)).any()):
            raise UserError(
                f"the indices to remove from {name}:{slice} must be integers in 0..{width - 1}; got {idx.tolist()}"
            )
        pruned = torch.zeros(self.root.numel(), dtype=torch.bool)
        pruned[self.unit_of(spec)[idx]] = True
        return pruned

    def _check_mask(self, mask: Any, what: str) -> int:
        """The graph's unit count; a :class:`UserError` unless ``mask`` is a boolean mask over
        them (an index tensor or a list given to :meth:`keep_indices` was an ``IndexError``
        or ``TypeError`` from inside it)."""
        n = self.root.numel()
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n,):
            got = (
                f"a {mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else shown(mask)
            )
            hint = (
                f" (indices: make the mask with mask = torch.zeros({n}, dtype=torch.bool); mask[indices] = True)"
                if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                else ""
            )
            raise UserError(
                f"{what} must be a boolean mask over the graph's {n} units (mask[group.units[i]] = True marks unit i "
                f"of a group); got {got}{hint}"
            )
        return n

    def unit_of(self, spec: SliceSpec) -> torch.Tensor:
        """The unit (root atom) of every index of a slice."""
        return self.root[spec.atoms]

    def keep_indices(self, pruned_units: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        """For a boolean mask over units, the kept indices of every slice that shrinks."""
        self._check_mask(pruned_units, "keep_indices' pruned_units")
        kept = self.indices_in(~pruned_units)
        return {(s.module, s.name): k for s, k in zip(self.slices, kept, strict=True) if k.numel() < s.atoms.numel()}

    def indices_in(self, units: torch.Tensor) -> list[torch.Tensor]:
        """For a boolean mask over units, per slice (in :attr:`slices` order) the indices
        whose unit it marks, ascending: one gather and one ``nonzero`` over every slice's
        atoms at once (a pass per slice was 1.5 ms of an EfficientNet-B0's data-free
        ``prune()``, and both the slicing and the masking oracle ask)."""
        if self._slice_atoms is None:
            sizes = [s.atoms.numel() for s in self.slices]
            atoms = torch.cat([s.atoms for s in self.slices]) if self.slices else torch.zeros(0, dtype=torch.int64)
            owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.int64))
            starts = torch.cumsum(torch.tensor([0, *sizes[:-1]], dtype=torch.int64), 0)
            self._slice_atoms = (atoms, owner, starts, sizes)
        atoms, owner, starts, sizes = self._slice_atoms
        pos = units[self.root[atoms]].nonzero().squeeze(1)
        which = owner[pos]
        counts = torch.bincount(which, minlength=len(sizes)).tolist()
        return list(torch.split(pos - starts[which], counts))

    def explain(self, max_groups: int | None = 50) -> str:
        """A readable account: who claims each module, the groups, and what was frozen."""
        if max_groups is not None and (
            isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 0
        ):
            raise UserError(f"explain(max_groups={shown(max_groups)}) must be an integer >= 0, or None for every group")
        lines = ["Modules and the plugins that claim them:"]
        for name, node in self.nodes.items():
            lines.append(f"  {shown_name(name) if name else '<model>'}: {type(node.module).__name__} -> {node.plugin}")
        groups = self.groups()
        lines.append(f"\n{len(groups)} groups ({sum(g.prunable > 0 for g in groups)} prunable):")
        for g in groups[:max_groups]:
            lines.append("  " + g.describe())
            for r in g.reasons:
                lines.append(f"      frozen: {printable(r)}")
        if max_groups is not None and len(groups) > max_groups:
            lines.append(f"  ... {len(groups) - max_groups} more")
        if self.ctx.unknown_ops:
            lines.append("\nOperations not understood (their channels are frozen):")
            for op, n in self.ctx.unknown_ops.most_common():
                lines.append(f"  {printable(op)} x{n}")
        return "\n".join(lines)


def _coarse_choices(ctx: TraceContext, coarse: set[str], fine: dict[str, int]) -> bool:
    """Update ``coarse`` from the pass traced in ``ctx`` (:meth:`TraceContext.offer_coarser`);
    whether it changed. A module whose fine ties left one of its slices a single unit goes
    coarse; after the coarse pass it stays so only where more of its channels sit in units
    that can go (one unit of several channels cannot: a plan keeps at least one unit), else
    it goes back to fine for good (``fine[name] = -1``)."""
    if not ctx.coarse_offers:
        return False
    root = components(ctx.n_atoms, ctx.unions)
    frozen = torch.zeros(ctx.n_atoms, dtype=torch.bool)
    if ctx.frozen:
        frozen[root[torch.cat([a for a, _ in ctx.frozen])]] = True
    changed = False
    for name, parts in ctx.coarse_offers.items():
        counts = [unique(root[a][~frozen[root[a]]]).numel() for a in parts]
        movable = sum(a.numel() for a, n in zip(parts, counts, strict=True) if n > 1)
        if name in coarse:
            if movable <= fine[name]:
                coarse.discard(name)
                fine[name] = -1
                changed = True
        elif name not in fine and any(n == 1 and a.numel() > 1 for a, n in zip(parts, counts, strict=True)):
            fine[name] = movable
            coarse.add(name)
            changed = True
    return changed


#: how the "nothing in this model can be pruned" error says to let some outputs shrink, in
#: Python; ``cleanai prune``, which has no ``output_transform``, says its own way instead
OUTPUT_TRANSFORM_HINT = "pass output_transform=lambda out: <only the outputs to keep> if the others may shrink."


def prunable_graph(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: Any = None,
    output_transform: Any = None,
    ignored: Any = (),
    ratio: float | None = None,
) -> DependencyGraph:
    """The graph of ``model`` as the pruner sees it (``ignored`` kept, the
    ``cleanai_default_freezes`` hook applied, told the uniform ``ratio`` if there is one),
    or a :class:`UserError` when no group can be pruned."""
    from cleanai_core.errors import UserError

    ignored = set(ignored)
    graph = DependencyGraph(model, example_inputs, forward_fn, output_transform, ignored_layers=sorted(ignored))
    graph.apply_default_freezes(ratio)
    if not graph.groups(prunable_only=True):
        everything = ignored and all(s.module in ignored for s in graph.slices if s.kind == "out")
        reasons: dict[str, None] = {}
        for g in graph.groups():  # the groups some layer produces (a model input's group is frozen anyway)
            if any(s.kind != "in" for s in g.slices):
                reasons.update(dict.fromkeys(g.reasons))
        why = "; ".join(list(reasons)[:5])
        outputs = any(r.startswith("model output") for r in reasons)
        quantized = _quantized_layers(model)
        named = ", ".join(quantized[:3]) + (" ..." if len(quantized) > 3 else "")
        raise UserError(
            f"nothing in this model can be pruned{' (every layer is ignored)' if everything else ''}: no group "
            f"of coupled channels is free to shrink{f' (frozen by: {why})' if why else ''}. "
            + (
                f"Its layers hold quantized weights ({named}), "
                "which cannot be sliced: prune the float model, then quantize the pruned one (prepare / convert, "
                "quantize_dynamic). "
                if quantized
                else ""
            )
            + (
                "Channels that reach the model's output are kept so that its output shapes stay the same; "
                + OUTPUT_TRANSFORM_HINT
                + " "
                if outputs
                else ""
            )
            + "Run `cleanai explain` to see which operations froze them, or ignore fewer layers."
        )
    return graph


def _quantized_layers(model: nn.Module) -> list[str]:
    """The modules whose saved state holds quantized tensors (a converted or dynamically
    quantized model: packed int8 weights, which no slice can cut), in order."""
    from torch.utils._pytree import tree_flatten

    found: dict[str, None] = {}
    try:
        state = model.state_dict()
    except Exception:  # noqa: BLE001 - only a hint for an error already raised
        return []
    for key, value in state.items():
        if any(isinstance(t, torch.Tensor) and t.is_quantized for t in tree_flatten(value)[0]):
            found[key.rsplit(".", 1)[0].removesuffix("._packed_params")] = None
    return list(found)


def _note_reads(recording: Recording, slices: list[SliceSpec]) -> None:
    """Set :attr:`SliceSpec.reads` of the ``"in"`` slices whose module ran once in the
    trace and got the input at its position ``arg`` (a tensor changed in place is another
    key after the change: the recorder gives an op's outputs new keys)."""
    calls: dict[str, list[ModuleCall]] = {}
    for e in recording.eval_events():
        if isinstance(e, ModuleCall):
            calls.setdefault(e.name, []).append(e)
    for s in slices:
        ran = calls.get(s.module, [])
        if s.kind != "in" or len(ran) != 1 or not isinstance(s.arg, int) or s.dim is None:
            continue
        args = ran[0].args
        x = args[s.arg] if s.arg < len(args) else None
        if isinstance(x, TRef) and x.ndim > 0:
            s.reads = (x.key, s.dim % x.ndim)


def _cut_dim(module: nn.Module, pruner: Any, spec: SliceSpec, attr: str) -> int | None:
    """The one dimension of ``module.<attr>`` that pruning slice ``spec`` shortens by one
    index when its first index goes (:func:`~cleanai_core.graph.cut.cut_dims`), else ``None``."""
    dims = cut_dims(module, pruner, spec, attr)
    if not dims or len(dims) != 1:
        return None
    ((dim, removed),) = dims.items()
    return dim if removed == 1 else None
