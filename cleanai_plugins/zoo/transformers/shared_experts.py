"""Shared experts whose width the config derives from the routed experts' width.

A mixture-of-experts block may run, beside its routed experts, shared experts that every
token goes through. Some configs give them a width of their own
(``shared_expert_intermediate_size``: Qwen2-MoE); others build them ``n`` times as wide as
one routed expert, from the same key (Aria: ``intermediate_size *
moe_num_shared_experts``; Ernie-4.5-MoE, DeepSeek, GLM-4-MoE: ``moe_intermediate_size *
n_shared_experts``). There a uniform plan cut the two widths apart (at 0.4 Aria's experts
kept 60 of 96 units, aligned to 16 bytes, and its shared experts 116 of 192, not 2 x 60),
a config could not say the result, and the default kept both: nothing pruned.

The shared MLP's first projections are tied to the routed experts by the kernel's
``SAME_SHARE`` finding: the plan keeps the same share of both (60 and 120), so the one key
describes both again.
"""

from __future__ import annotations

from torch import nn

from cleanai_core.graph.findings import SAME_SHARE
from cleanai_plugins.zoo.transformers.config import SHARED_KEYS, config_owner
from cleanai_plugins.zoo.transformers.experts import expert_hidden, expert_width, is_experts

__all__ = ["shared_expert_ties"]


def _first_projections(mlp: nn.Module, hidden: int, width: int) -> list[nn.Linear] | None:
    """The projections of a gated MLP ``mlp`` that read the hidden size (gate and up,
    or both stacked), when its width (the input of its output projection, registered
    last: ``down_proj``) is a whole multiple of the routed experts' ``width``; else None."""
    linears = [m for m in mlp.children() if isinstance(m, nn.Linear)]
    if len(linears) < 2 or linears[-1].out_features != hidden or linears[-1].in_features % width:
        return None
    inner = linears[-1].in_features
    ups = [m for m in linears[:-1] if m.in_features == hidden and m.out_features in (inner, 2 * inner)]
    return ups or None


def shared_expert_ties(model: nn.Module) -> dict[str, set] | None:
    """The ``SAME_SHARE`` findings that tie each shared MLP beside 3-D routed experts to
    them, where the config has no width key of the shared experts' own."""
    names = dict(model.named_modules())
    ties: set = set()
    routed: set[str] = set()  # the blocks whose shared MLPs are tied already (to their first routed experts)
    for name, block in names.items():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, nn.Module) or not is_experts(experts):
            continue
        owner = config_owner(names, name)
        if owner is None or any(isinstance(getattr(owner[1], k, None), int) for k in SHARED_KEYS):
            continue
        width, hidden = expert_width(experts), expert_hidden(experts)
        key = f"{name}.experts" if name else "experts"  # the experts' own same_count key (their name)
        for holder in _holders(names, name):
            if holder in routed:
                continue
            routed.add(holder)
            for child_name, child in names[holder].named_children():
                if "shared" not in child_name or child is experts:
                    continue
                for proj in _first_projections(child, hidden, width) or ():
                    ties.add((proj, "out", key))
    return {SAME_SHARE: ties} if ties else None


def _holders(names: dict[str, nn.Module], name: str) -> list[str]:
    """Where the shared MLPs of the routed experts of block ``name`` live: beside them in
    the block, or beside the block in a parent holding several kinds of routed experts
    (ERNIE-4.5-VL's ``mlp.text_moe.experts`` and ``mlp.vision_moe.experts`` beside
    ``mlp.shared_experts``, as wide as ``moe_intermediate_size[0]`` times their number: the
    first kind, registered first, claims it)."""
    parent = name.rpartition(".")[0] if "." in name else ""
    if name and parent in names and not isinstance(getattr(names[parent], "experts", None), nn.Module):
        return [name, parent]
    return [name]
