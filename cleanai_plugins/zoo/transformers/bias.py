"""Biases that compensation created, declared in the config where the family allows it.

Bias compensation folds the removed channels' mean into the consumer layers' biases,
so a Llama's ``o_proj`` and ``down_proj`` gain biases its config (``attention_bias`` /
``mlp_bias`` false) says they do not have, and ``from_pretrained`` would rebuild them
without. Where the installed modeling code reads a config switch that adds biases to
those layers, the switch is set and every layer it controls gets a zero bias where it
has none: the outputs do not change and the rebuilt model has the same tensors.

Which switch controls which layers is measured, not listed: the model is rebuilt on the
meta device with the switch off and on. A family without such a switch for every new bias (Qwen2, Mistral,
Mixtral, Phi-3: ``bias=False`` in the code; Qwen3, Gemma: ``attention_bias`` only) is left
as it is, and the rebuild check records ``from_pretrained: false``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cleanai_plugins.zoo.transformers.attention import proj_width

__all__ = ["declare_biases"]

FLAGS = ("attention_bias", "mlp_bias")


def _bias_keys(model: nn.Module, config) -> set[str] | None:
    """The bias tensors of ``type(model)`` built from ``config`` on the meta device."""
    try:
        with torch.device("meta"):
            ref = type(model)(config)
    except Exception:  # a family whose __init__ cannot run on meta: nothing to declare
        return None
    return {k for k in ref.state_dict() if k.rpartition(".")[2] == "bias"}


def _with(config, flags: list[str]):
    config = copy.deepcopy(config)
    for flag in flags:
        setattr(config, flag, True)
    return config


def _add_zero_bias(module: nn.Module) -> bool:
    width = proj_width(module)
    weight = getattr(module, "weight", None)
    if width is None or not isinstance(weight, torch.Tensor) or getattr(module, "bias", False) is not None:
        return False
    bias = torch.zeros(width, dtype=weight.dtype, device=weight.device)
    module.bias = nn.Parameter(bias, requires_grad=weight.requires_grad)
    return True


def declare_biases(model: nn.Module) -> list[str]:
    """Set the config switches (``attention_bias``, ``mlp_bias``) whose layers carry
    biases the config does not declare, and give every layer a switch controls a zero
    bias. All or nothing: when some of the new biases have no switch (Qwen3 and Gemma
    have ``attention_bias`` but build their MLPs with ``bias=False``), ``from_pretrained``
    could not rebuild the model anyway, and nothing is changed. Returns the switches set."""
    config = model.config
    candidates = [f for f in FLAGS if getattr(config, f, None) is False]
    if not candidates:
        return []
    have = {k for k, _ in model.named_parameters(remove_duplicate=False) if k.rpartition(".")[2] == "bias"}
    base = _bias_keys(model, copy.deepcopy(config))
    if base is None or not (have - base):
        return []
    names = dict(model.named_modules())
    flipped, wanted = [], set()
    for flag in candidates:
        controlled = (_bias_keys(model, _with(config, [flag])) or set()) - base
        owners = [names.get(k.rpartition(".")[0]) for k in controlled]
        # every layer the switch controls must be able to take a bias
        if controlled & have and all(proj_width(m) is not None for m in owners):
            flipped.append(flag)
            wanted |= controlled
    if not flipped or (have - base) - wanted:  # a bias no switch declares: zero biases would buy nothing
        return []
    for key in sorted(wanted - have):
        _add_zero_bias(names[key.rpartition(".")[0]])
    for flag in flipped:
        setattr(config, flag, True)
    return flipped
