"""The widths a transformers config cannot describe, found before pruning.

``from_pretrained`` builds the model from its config before it loads the weights, so a
pruned width reloads only where the config fix-up (:mod:`.config`) can write it into a
key the family reads: the MLP width (``intermediate_size``), the head count where the
head size is a key of its own (Llama's ``head_dim``)... Other widths have no key: the
pooler of a sequence classifier (``BertPooler.dense``, RoBERTa's ``classifier.dense``,
DeBERTa-v2's ``ContextPooler``: all ``hidden_size`` wide), BERT's heads (head size
``hidden_size / num_attention_heads``), MobileBERT's bottlenecks. Which ones, is asked of
the config itself rather than listed per family: every free group of the graph is pruned
by the pruner's uniform ratio (by half where its plan is not uniform; the same count in
groups of the same size, as a uniform prune does) on a copy
whose tensors live on the meta device, the config fix-up runs, the model is rebuilt from
the rewritten config (on the meta device too), and every group that cut a tensor whose
shape the rebuilt model does not have is kept, with the reason
(:mod:`.reload_path`). Again until the rest rebuilds (a few rounds at most).

Used by :mod:`cleanai_plugins.zoo.transformers_hidden` (``cleanai_default_freezes``), so
the one opt-out of that plugin prunes these widths too (reload with ``load_pruned``).
A prune that is not uniform (global ranking, per-layer ratios) can still leave layers
with different widths that one config key cannot hold: ``config.cleanai_pruning`` says so.
"""

from __future__ import annotations

import copy
import itertools
import re
import warnings

import torch
from torch import nn

from cleanai_core.graph.cut import cut_dims
from cleanai_core.planning import tie_counts, uniform_counts
from cleanai_core.slicing import apply_edits, edits_for
from cleanai_core.verify import untraced_layers
from cleanai_plugins.zoo.transformers.config import rebuild_mismatches, rebuilt_shapes
from cleanai_plugins.zoo.transformers.reload_path import ALIBI, reasons

__all__ = ["KEPT", "meta_copy", "undescribable"]

#: the end of every reason this module gives
KEPT = (
    "kept so that from_pretrained rebuilds the pruned model (cleanai_plugins.zoo.transformers_hidden; "
    "disable it to prune this too, then reload with load_pruned)"
)
_ROUNDS = 4
#: a module inside one numbered layer, below the layer itself (``model.layers.0.mlp``)
_LAYER_BLOCK = re.compile(r"\.\d+\.[^.]")
_UNRUN = "did not run on the example inputs"


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are empty tensors on the meta
    device (tied tensors stay tied): slicing it costs no memory."""
    memo: dict[int, torch.Tensor] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def _mismatched_dims(model: nn.Module) -> dict[str, set[int]] | None:
    """``{state_dict key: dimensions}`` of the tensors whose shape the model rebuilt from
    its config does not have; ``None`` when it cannot be rebuilt at all."""
    shapes = rebuilt_shapes(model)
    if isinstance(shapes, str):
        return None
    out: dict[str, set[int]] = {}
    for key, tensor in model.state_dict().items():
        ref, shape = shapes.get(key), tuple(tensor.shape)
        if ref == shape:
            continue
        if ref is None or len(ref) != len(shape):
            out[key] = set(range(len(shape)))
        else:
            out[key] = {d for d in range(len(shape)) if shape[d] != ref[d]}
    return out


def _owner(nodes: dict, key: str) -> tuple[str, str] | None:
    """``(claimed module, attribute path)`` of a state_dict key."""
    module, attr = key, ""
    while module:
        module, _, last = module.rpartition(".")
        attr = f"{last}.{attr}" if attr else last
        if module in nodes:
            return module, attr
    return None


def _touching(graph, groups: list, bad: dict[str, set[int]]) -> dict[int, str]:
    """``{group id: first mismatched key}`` of the groups that cut a mismatched tensor."""
    per_module: dict[str, list[tuple[str, str, set[int]]]] = {}
    for key, dims in bad.items():
        owner = _owner(graph.nodes, key)
        if owner is not None:
            per_module.setdefault(owner[0], []).append((key, owner[1], dims))
    hit: dict[int, str] = {}
    explained: set[str] = set()
    for group in groups:
        for spec in group.slices:
            if spec.module == "":
                if spec.name in bad:
                    hit.setdefault(group.id, spec.name)
                    explained.add(spec.name)
                continue
            node = graph.nodes.get(spec.module)
            for key, attr, dims in per_module.get(spec.module, ()):
                cut = cut_dims(node.module, node.pruner, spec, attr) if "." not in attr else None
                if cut is None or set(cut) & dims:
                    hit.setdefault(group.id, key)
                    explained.add(key)
    unexplained = sorted(set(bad) - explained)
    untraced = untraced_layers(graph) if unexplained else {}
    for key in unexplained:  # no group cut it: sized from a count that changed
        near = _nearest_cutters(groups, key)
        for gid in near:
            hit.setdefault(gid, key)
        holder = key.rpartition(".")[0]
        # a holder in the graph ran: no group cut it, yet its rebuilt width changed (Mask2Former's
        # input projection read a backbone width another key sets); "did not run" would be
        # false there, and that reason alone refuses the prune instead of falling back
        ran = holder in graph.nodes and holder not in untraced
        state = "ran but no group cut it" if ran else _UNRUN
        why = f"{holder} {state} and keeps its width, which its config key gives this one too"
        role = [] if near else _same_role_cutters(groups, holder)
        for gid in role:
            hit.setdefault(gid, why)
        if not near and not role:  # sized from a sibling block's width (shared experts beside ``mlp.text_moe``)
            for gid in _nearest_cutters(groups, key, up=2):
                hit.setdefault(gid, key)
    return hit


def _nearest_cutters(groups: list, key: str, up: int = 1) -> list[int]:
    """The groups that cut tensors beside ``key``'s holder (inside the holder's parent):
    a tensor no group cut whose rebuilt shape changed is sized from a count the config
    fix-up wrote for its neighbours (Phi's and Persimmon's ``q_layernorm`` of
    ``hidden_size / num_attention_heads``: the heads went in the attention around it).
    ``up=2``: inside the parent's parent, where nothing beside it and nothing in its role
    cut (ERNIE-4.5-VL's ``mlp.shared_experts.gate_proj``, sized from the experts' width in
    ``mlp.text_moe``), and only within a block of one layer (``layers.0.mlp``; not the layer
    itself, nor a model's embeddings). No further (and not the whole model, for a tensor of
    a top-level module): a mismatch that no pruning nearby explains blames nothing."""
    scope = key.rpartition(".")[0]
    for _ in range(up):
        scope = scope.rpartition(".")[0]
    if not scope or (up > 1 and not _LAYER_BLOCK.search(scope)):
        return []
    return [g.id for g in groups if any(s.module.startswith(f"{scope}.") for s in g.slices)]


def _same_role_cutters(groups: list, holder: str) -> list[int]:
    """The groups that cut the module of ``holder``'s role in the other layers (its name
    with the layer numbers free): a layer the example inputs never ran (Mllama's
    cross-attention layers without an image) is not in the graph and keeps its MLP, while
    the key the layers share was written with the others' pruned width."""
    role = re.compile(re.sub(r"\\.\d+\\.", r"\\.\\d+\\.", re.escape(holder)) + "$")
    return [g.id for g in groups if any(role.match(s.module) for s in g.slices)]


def undescribable(graph, ratio: float | None = None) -> list[tuple[torch.Tensor, str]]:
    """``[(units, reason)]``: the free units of every group of ``graph`` whose pruning
    the config of the transformers model(s) in ``graph.model`` cannot describe: checked
    with every group pruned by half, then (where the pruner's plan is uniform) by its
    ``ratio`` as the plan counts (kept counts aligned): a width tied to another by a
    formula (Ernie-MoE's shared experts, ``moe_intermediate_size`` times their number)
    agrees at a half only."""
    from transformers import PreTrainedModel

    from cleanai_plugins.zoo.transformers import outermost

    hf = [name for name, sub in outermost(graph.model, PreTrainedModel) if not rebuild_mismatches(sub)]
    if not hf:  # no transformers model, or one its config cannot rebuild even unpruned: nothing to keep
        return []
    found: list[tuple[torch.Tensor, str]] = []
    kept: set[int] = set()
    for share in (None, ratio) if ratio is not None else (None,):
        if not _check_rounds(graph, hf, share, kept, found):
            break
    unrun = any(_UNRUN in why for _, why in found)  # the inputs' fault (Mllama without images): the reason stays
    if found and not unrun and _leaves_nothing(graph, found):
        warnings.warn(
            "this model's config can describe none of its prunable widths (" + "; ".join(dict.fromkeys(
                why.removesuffix(f": {KEPT}") for _, why in found)) + "): they prune anyway, and the pruned "
            "model reloads with cleanai_core.load_pruned, not from_pretrained (config.cleanai_pruning says why)",
            RuntimeWarning,
            stacklevel=4,
        )  # fmt: skip
        return []
    return found


def _leaves_nothing(graph, found: list[tuple[torch.Tensor, str]]) -> bool:
    """Whether keeping ``found`` leaves no unit of the graph free: then keeping them would
    refuse the prune (Bloom: its MLP is ``4 * hidden_size`` in code and its heads' ALiBi
    slopes follow ``n_head``; XLM, GPT-NeoX-Japanese), where pruning them and reloading
    with ``load_pruned`` gives the user what they asked for."""
    kept = torch.cat([torch.as_tensor(units, dtype=torch.int64).reshape(-1) for units, _ in found])
    free = [g.units[~g.frozen] for g in graph.groups(prunable_only=True)]
    return bool(free) and bool(torch.isin(torch.cat(free), kept).all())


def _check_rounds(graph, hf: list[str], share: float | None, kept: set[int], found: list) -> bool:
    """Prune every free group not in ``kept`` by ``share`` (``None``: by half) on a meta
    copy, rebuild from the rewritten config, and add to ``kept`` and ``found`` the groups
    that cut a tensor the rebuilt model lacks; again until the rest rebuilds. Where the
    rewritten config builds no model at all (3 heads of a 64 wide Llama: transformers'
    config validation wants ``hidden_size % num_attention_heads == 0``), the groups that
    make it fail are found by bisection and kept. False when the check cannot go on."""
    model = graph.model
    for _ in range(_ROUNDS):
        groups = [g for g in graph.groups(prunable_only=True) if g.id not in kept]
        counts = _counts(groups, share)
        groups = [g for g in groups if counts[g.id] > 0]
        if not groups:
            return True
        small = _sliced_meta(graph, groups, counts)
        if small is None:
            return False
        bad: dict[str, set[int]] = {}
        for name in hf:
            dims = _mismatched_dims(small.get_submodule(name))
            if dims is None:  # the pruned config builds no model: which groups make it fail?
                failing = _failing_groups(graph, hf, groups, counts)
                if not failing:
                    return False
                for g in failing:
                    kept.add(g.id)
                    why = rebuild_mismatches(_sliced_meta(graph, [g], counts).get_submodule(name))
                    found.append((g.units[~g.frozen], f"{reasons(model, why[:1])[0]}: {KEPT}"))
                break
            bad.update({f"{name}.{k}" if name else k: d for k, d in dims.items()})
        else:
            hit = _touching(graph, groups, bad) if bad else {}
            scales = [] if hit else [w for name in hf for w in _derived_scales(small.get_submodule(name))]
            if not hit and not scales:
                return True
            if not hit:  # every shape rebuilds, a scale the config derives from a width pruned in its module does not
                for g in groups:
                    why = next((w for w in scales if _cuts_inside(g, w.partition(" ")[0].rpartition(".")[0])), None)
                    if why is not None:
                        kept.add(g.id)
                        found.append((g.units[~g.frozen], f"{reasons(model, [why])[0]}: {KEPT}"))
                if not any(g.id in kept for g in groups):
                    return True
                continue
            by_id = {g.id: g for g in groups}
            for gid, key in hit.items():
                kept.add(gid)
                why = reasons(model, [key])[0]
                found.append((by_id[gid].units[~by_id[gid].frozen], f"{why}: {KEPT}"))
    return True


def _counts(groups: list, share: float | None) -> dict[int, int]:
    """The units of each group the check prunes: half, or ``share`` as the uniform plan
    counts (aligned, tied sets at one share: :func:`~cleanai_core.planning.uniform_counts`)."""
    if share is not None:
        return uniform_counts(groups, share)
    return tie_counts(groups, {g.id: min(max(g.size // 2, 1), g.prunable, g.size - 1) for g in groups})


def _sliced_meta(graph, groups: list, counts: dict[int, int]) -> nn.Module | None:
    """A meta copy of ``graph.model`` with ``counts`` units of each of ``groups`` sliced
    (config fix-up included); None when it cannot be sliced on the meta device."""
    pruned = torch.zeros(graph.root.numel(), dtype=torch.bool)
    for g in groups:
        pruned[g.units[~g.frozen][: counts[g.id]]] = True
    small = meta_copy(graph.model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_edits(small, edits_for(graph, pruned), graph.pm)
    except Exception as exc:  # noqa: BLE001 - a pruner or fix-up that cannot run on meta tensors
        warnings.warn(
            f"cleanai_plugins.zoo.transformers_hidden could not check which widths the config describes "
            f"({type(exc).__name__}: {exc}); nothing more is kept, and the pruned model may need load_pruned",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return small


def _derived_scales(model: nn.Module) -> list[str]:
    """The scales the model rebuilt from its rewritten config computes anew where every
    shape agrees (Dots3's ``q_lora_scale`` from ``q_lora_rank``; not ALiBi slopes, which
    pruned heads keep by design and reload through ``load_pruned``)."""
    return [m for m in rebuild_mismatches(model) if m != ALIBI and "from the pruned one" in m]


def _cuts_inside(group, module: str) -> bool:
    """Whether ``group`` slices a module inside ``module`` (or ``module`` itself)."""
    return bool(module) and any(s.module == module or s.module.startswith(f"{module}.") for s in group.slices)


def _failing_groups(graph, hf: list[str], groups: list, counts: dict[int, int]) -> list:
    """The groups among ``groups`` whose pruning alone leaves a config that builds no
    model (bisection; a set that fails only together is kept whole)."""

    def fails(subset: list) -> bool:
        small = _sliced_meta(graph, subset, counts)
        return small is not None and any(_mismatched_dims(small.get_submodule(n)) is None for n in hf)

    def search(subset: list) -> list:
        if not fails(subset):
            return []
        if len(subset) == 1:
            return subset
        half = len(subset) // 2
        return (search(subset[:half]) + search(subset[half:])) or subset

    return search(groups)
