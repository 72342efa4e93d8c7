"""Biases that compensation created, declared in the config where the family allows it.

Bias compensation folds the removed channels' mean into the consumer layers' biases,
so a Llama's ``o_proj`` and ``down_proj`` gain biases its config (``attention_bias`` /
``mlp_bias`` false) says they do not have, and ``from_pretrained`` would rebuild them
without. Where the installed modeling code reads a config switch that adds biases to
those layers, the switch is set and every layer it controls gets a zero bias where it
has none: the outputs do not change and the rebuilt model has the same tensors.

Which switch controls which layers is measured, not listed: the model is rebuilt on the
meta device with the switch off and on. Layers no switch can give a bias (Qwen2, Mistral,
Mixtral, Phi-3: ``bias=False`` in the code; Qwen3, Gemma: ``attention_bias`` only, the
MLP has no switch) are found before pruning (:func:`undeclarable`) and filed under the
``no_new_bias`` finding, so compensation folds into their kept columns only and never
creates a bias ``from_pretrained`` could not rebuild. A bias that still has no switch
(another plugin's) is left as it is, and the rebuild check records
``from_pretrained: false``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cleanai_plugins.zoo.transformers.attention import proj_width

__all__ = ["declare_biases", "undeclarable"]

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


def _valid(config) -> bool:
    """The config passes its own validation (``save_pretrained`` and ``from_pretrained`` run
    it): InternLM3's refuses ``attention_bias`` different from ``mlp_bias``."""
    validate = getattr(config, "validate", None)
    try:
        if callable(validate):
            validate()
    except Exception:  # noqa: BLE001 - the family's own validation error: the switch cannot be set alone
        return False
    return True


def _switches(model: nn.Module, config, base: set[str], flags) -> dict[str, set[str]]:
    """``{flag: bias keys it adds}`` for each flag whose every layer can take a bias and
    that the config's validation accepts set alone."""
    names = dict(model.named_modules())
    usable = {}
    for flag in flags:
        switched = _with(config, [flag])
        if not _valid(switched):
            continue
        controlled = (_bias_keys(model, switched) or set()) - base
        if controlled and all(proj_width(names.get(k.rpartition(".")[0])) is not None for k in controlled):
            usable[flag] = controlled
    return usable


def undeclarable(model: nn.Module) -> list[nn.Module]:
    """The ``nn.Linear`` layers of a transformers model that have no bias and that no
    config switch can give one: a bias compensation created there would not survive
    ``save_pretrained`` -> ``from_pretrained``."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    bare = {f"{n}.bias": m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is None}
    if not bare:
        return []
    base = _bias_keys(model, copy.deepcopy(config))
    if base is None:
        return []
    flags = [f for f in FLAGS if getattr(config, f, None) is False]
    declarable = set().union(*_switches(model, config, base, flags).values())
    return [m for k, m in bare.items() if k not in declarable]


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
    for flag, controlled in _switches(model, config, base, candidates).items():
        if controlled & have:
            flipped.append(flag)
            wanted |= controlled
    if not flipped or (have - base) - wanted:  # a bias no switch declares: zero biases would buy nothing
        return []
    for key in sorted(wanted - have):
        _add_zero_bias(names[key.rpartition(".")[0]])
    for flag in flipped:
        setattr(config, flag, True)
    return flipped
