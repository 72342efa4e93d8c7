"""Widths a config derives from the MLP width by a whole factor, beside the MLP.

LiLT runs, beside each layer's MLP (``intermediate.dense``, ``intermediate_size`` wide), a
layout MLP ``intermediate_size // channel_shrink_ratio`` wide, with no key of its own. A
uniform plan cut the two apart (at 0.4: 58 of 96 and 15 of 24), the config then rebuilt a
layout MLP of ``58 // 4``, and the default kept the layout MLP while the MLP key it derives
from changed: ``from_pretrained`` could not reload.

Which widths derive from the MLP key is asked of the config, not listed per family: the
model is rebuilt on the meta device with the key doubled, and every linear layer whose
output doubled with it, of another width than its layer's MLP, is tied to that MLP by the
kernel's ``SAME_SHARE`` finding: the plan keeps the same share of both (60 and 15), so the
one key describes both again.

GPT-NeoX-Japanese's MLP is ``int(hidden_size * intermediate_multiple_size)`` wide, the key
an int: only whole multiples of the hidden size can be written. Asked the same way (the
key doubled on a meta rebuild doubles the MLP), an MLP whose width is its key times a
step above 1 keeps a multiple of that step (:data:`MLP_STEPS`, the slice's ``multiple``):
at 0.4 of ``4 x 64`` it keeps ``3 x 64``, and the key written is 3.
"""

from __future__ import annotations

import re

from torch import nn

from cleanai_core.graph.findings import SAME_SHARE
from cleanai_plugins.layers.linear import LinearPruner
from cleanai_plugins.zoo.transformers.config import MLP_UP, mlp_key, rebuilt

__all__ = ["MLP_STEPS", "SteppedLinearPruner", "derived_mlp_ties"]

#: model findings key: ``{module: step}``, MLP layers whose kept width must be a multiple of ``step``
MLP_STEPS = "mlp_steps"

#: a numbered layer and the name up to it (``lilt.encoder.layer.0.``)
_LAYER = re.compile(r"^(.*?\.\d+\.)")


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def derived_mlp_ties(model: nn.Module) -> dict[str, object] | None:
    """The ``SAME_SHARE`` findings that tie each linear layer whose width the config
    derives from the MLP key (by another factor than the MLP's) to its layer's MLP, and the
    :data:`MLP_STEPS` finding: each MLP layer whose width is the key times the hidden size
    (GPT-NeoX-Japanese's ``intermediate_multiple_size``), with that step. One meta rebuild
    answers both."""
    from transformers import PreTrainedModel

    from cleanai_plugins.zoo.transformers import outermost

    ties: set = set()
    steps: dict[nn.Module, int] = {}
    for name, hf in outermost(model, PreTrainedModel):
        holder, key = mlp_key(hf.config)
        value = getattr(holder, key, None) if key is not None else None
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            continue
        sub = holder is not hf.config

        def double(config, key=key, value=value, sub=sub):
            setattr(config.ffn_config if sub else config, key, 2 * value)

        probe = rebuilt(hf, double)
        if isinstance(probe, str):
            continue
        before, after = _widths(hf), _widths(probe)
        grown = sorted(n for n, w in before.items() if after.get(n) == 2 * w)
        ups = [n for n in grown if MLP_UP.search(n)]
        for n in ups:
            step, rest = divmod(before[n], value)
            if step > 1 and not rest and step == getattr(hf.config, "hidden_size", None):
                steps[hf.get_submodule(n)] = step
        for n in grown:
            layer = _LAYER.match(n)
            if n in ups or layer is None:
                continue
            up = next((u for u in ups if u.startswith(layer[1]) and before[u] != before[n]), None)
            if up is not None:
                tie = f"{name}.{up}" if name else up
                ties.update({(hf.get_submodule(n), "out", tie), (hf.get_submodule(up), "out", tie)})
    found = {**({SAME_SHARE: ties} if ties else {}), **({MLP_STEPS: steps} if steps else {})}
    return found or None


class SteppedLinearPruner(LinearPruner):
    """A linear layer whose kept output channels are a multiple of ``step`` (:data:`MLP_STEPS`)."""

    def __init__(self, step: int, new_bias: bool = True) -> None:
        super().__init__(new_bias)
        self.step = step

    def trace(self, module, call, ctx):
        super().trace(module, call, ctx)
        spec = ctx.slices.get((call.name, "out"))
        if spec is not None:
            spec.multiple = self.step
