"""torch.fx ``GraphModule``\\ s: widths that tracing wrote into the generated code.

A ``GraphModule`` (torchvision ``create_feature_extractor``, timm ``features_only`` with
``feature_cls='fx'``, ``torch.fx.symbolic_trace``) runs generated code, not the forward of the
modules it was traced from. Where tracing went *through* a module (any module outside
``torch.nn``, e.g. torchvision ConvNeXt's ``LayerNorm2d``), the attributes that module's
forward read became literals of the code: ``F.layer_norm(x, (96,), weight=..., bias=...)``.
Slicing shrinks the weight, the literal stays, and the pruned model failed ("Expected
weight to be of same shape as normalized_shape"); verification then kept the group whole,
so the stream of every traced-through norm did not prune.

Glossary:

- *graph*: an ``fx.Graph`` the module runs; torchvision's ``DualGraphModule`` holds one for
  train and one for eval mode (``train_graph`` / ``eval_graph``) and swaps them.
- *width literal*: a node argument that restates the shape of a tensor the node also
  reads; rewritten from that tensor's shape after slicing.

Handled: ``F.layer_norm``'s ``normalized_shape`` where its ``weight`` (or ``bias``) is an
attribute of the module (a ``get_attr`` node). Literals with no such tensor beside them (a
head count traced through an attention's forward) stay; verification keeps their groups
whole, which is correct.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cleanai_core import hookimpl
from cleanai_plugins.zoo import loaded

__all__ = ["fix_graph_widths"]


def _attribute(module: nn.Module, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node names on ``module`` (None for anything else)."""
    if getattr(node, "op", None) != "get_attr":
        return None
    value: Any = module
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def _graphs(module: nn.Module) -> list[Any]:
    """Every graph ``module`` runs (both of a ``DualGraphModule``), each once."""
    found = [module.graph, getattr(module, "train_graph", None), getattr(module, "eval_graph", None)]
    out: list[Any] = []
    for g in found:
        if g is not None and all(g is not h for h in out):
            out.append(g)
    return out


def _layer_norm_width(module: nn.Module, node: Any) -> bool:
    """Set ``normalized_shape`` of an ``F.layer_norm`` node to its weight's shape; whether it changed."""
    args = list(node.args)
    norm = args[2] if len(args) > 2 else node.kwargs.get("weight")
    norm = norm if norm is not None else (args[3] if len(args) > 3 else node.kwargs.get("bias"))
    t = _attribute(module, norm)
    if t is None:
        return False
    shape = tuple(t.shape)
    if len(args) > 1:
        old = args[1]
        if tuple(old) == shape:
            return False
        args[1] = type(old)(shape) if isinstance(old, (list, tuple)) else shape
        node.args = tuple(args)
        return True
    old = node.kwargs.get("normalized_shape")
    if old is None or tuple(old) == shape:
        return False
    node.kwargs = {**node.kwargs, "normalized_shape": type(old)(shape) if isinstance(old, (list, tuple)) else shape}
    return True


def fix_graph_widths(module: nn.Module) -> None:
    """Rewrite the width literals of every graph ``module`` runs, where it is a
    ``GraphModule``, and regenerate its code where one changed."""
    fx = loaded("torch.fx")
    if fx is None or not isinstance(module, fx.GraphModule):
        return
    changed = False
    for graph in _graphs(module):
        for node in graph.nodes:
            if node.op == "call_function" and node.target is F.layer_norm:
                changed |= _layer_norm_width(module, node)
    if changed:
        module.recompile()


@hookimpl
def cleanai_after_prune(module, name, edits, findings):
    fix_graph_widths(module)
