"""A pruned transformers model's ``config`` rewritten to agree with its modules.

After slicing, the widths live in the tensors; ``save_pretrained`` writes ``config``,
and ``from_pretrained`` builds the model from it before loading the weights, so every
width the config names must be the pruned one. Read from the modules:

- ``hidden_size``: the most common input width of the attention projections the config
  owns (of its normalisation layers, for a model without attention);
- ``num_attention_heads`` / ``num_key_value_heads`` (``encoder_`` / ``decoder_``
  variants for encoder-decoder models): from the attention projections; ``head_dim``
  is written explicitly where the config has the key;
- the MLP width (``intermediate_size``, ``n_inner``, ``ffn_dim``, ``d_ff``,
  ``hidden_dim``, ``ffn_hidden_size``, ``d_inner``, ``encoder_ffn_dim``...): from the first MLP
  projection of every layer.

A config holds one value per key, so it describes the model only when every layer
kept the same widths (*uniform* pruning), and only the widths the family reads from it
(BERT and GPT-2 derive the head size from ``hidden_size / num_attention_heads``, so
fewer heads cannot be written). The model is rebuilt from the rewritten config on the
meta device and compared tensor by tensor; ``config.cleanai_pruning`` records what the
user got: ``{"uniform": true, "from_pretrained": true}``; or ``"uniform": false`` with
``"per_layer": {key: [widths]}``; or ``"from_pretrained": false`` with the first
``"mismatched"`` tensors, ``"reload": "load_pruned"`` and ``"why"`` (:mod:`.reload_path`:
heads, an MLP width tied to the hidden width, a width with no key); ``"biases_declared"``
names the config switches set for the biases bias compensation created (:mod:`.bias`).
Without ``from_pretrained``, reload through ``cleanai_core.load_pruned`` (which replays the
history on the original architecture). Per-stage configs (Swin, ConvNeXt): :mod:`.staged`.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter, defaultdict
from fractions import Fraction

import torch
from torch import nn

from cleanai_plugins.zoo.transformers.attention import INPUT_PROJS, head_counts, is_attention, proj_in_width, proj_width
from cleanai_plugins.zoo.transformers.bias import declare_biases
from cleanai_plugins.zoo.transformers.experts import expert_width
from cleanai_plugins.zoo.transformers.flat_experts import flat_expert_width
from cleanai_plugins.zoo.transformers.per_layer import (
    global_reads,
    layer_index,
    per_layer_keys,
    without_global_reads,
    write_per_layer,
)
from cleanai_plugins.zoo.transformers.reload_path import ALIBI, HEADS, MLP, reasons
from cleanai_plugins.zoo.transformers.staged import is_staged, write_stages

__all__ = [
    "MLP_UP",
    "SHARED_KEYS",
    "config_owner",
    "fix_config",
    "mlp_key",
    "rebuild_mismatches",
    "rebuilt",
    "rebuilt_shapes",
]

# the first projection of an MLP (its output width is the MLP width), and its stacked parts
MLP_UP = re.compile(
    r"(^|\.)((mlp|mlps\.\d+|feed_forward)\.(gate_proj|up_proj|c_fc|dense_h_to_4h|fc1|fc_in|gate_up_proj|w1)|intermediate\.dense|"
    r"ffn\.lin1|DenseReluDense\.wi(_0)?|fc1|ffn|mlp\.Wi|ffn\.linear_1|ff\.layer_1|mlp\.wi|experts\.expert_\d+\.wi|mixer\.up_proj|"
    r"ffn\.0|intermediate\.conv1d|mlp\.input_linear|ffn\.w_in\.w_0|feed_forward\.intermediate|feed_forward\.key|mlp_block\.gate_proj|"
    r"feed_forward\.dense\.dense)$"
)  # up_proj alone: an MLP without a gate (Nemotron); ffn.linear_1: Funnel; ff.layer_1: XLNet;
#  feed_forward: the hybrid Mamba models (Bamba, Jamba, Zamba); mlp.wi, experts.expert_<i>.wi: SwitchTransformers;
#  mixer.up_proj: Nemotron-H's MLP layers; feed_forward.w1 (w1, w3, w2): LFM2, LFM3; ffn.0: an nn.Sequential MLP (CTRL);
#  intermediate.conv1d: SqueezeBERT's grouped pointwise convolutions; mlp.input_linear: JetMoE's experts;
#  ffn.w_in.w_0 (w_0 gate, w_1 up, then w_out): CPM-Ant, width dim_ff; feed_forward.intermediate: ProphetNet;
#  feed_forward.key (key, then value; receptance gates the output): RWKV's channel mixing, width intermediate_size
#  mlp_block.gate_proj: RecurrentGemma, width intermediate_size // 2 (:func:`_unscale_mlp_key`);
#  mlps.<i>: LongCat-Flash's two MLPs per layer; feed_forward.dense.dense: Reformer (``feed_forward_size``)
#: MLP projections whose output stacks two halves (gate and up) of the MLP width
_MLP_STACKED = ("gate_up_proj", ".Wi", "mlp.input_linear")
#: the dense layers' own MLP key beside experts that take the MLP key: Llama 4's, MiniMax-M3's,
#: Cohere2-MoE's (its dense first layers; where the key is None they read the MLP key, as the experts do)
_DENSE_KEYS = ("intermediate_size_mlp", "dense_intermediate_size", "prefix_dense_intermediate_size")
#: a shared expert beside the routed ones: its own config key (Qwen2-MoE's
#: ``shared_expert_intermediate_size``; GraniteMoeShared's ``shared_intermediate_size``, its
#: ``input_linear`` stacking gate and up; Nemotron-H's ``moe_shared_expert_intermediate_size``; Laguna's
#: ``shared_experts``; written only where the config has one of these keys)
_SHARED_UP = re.compile(
    r"(^|\.)(mlp\.shared_experts?\.(gate_proj|gate_up_proj)|shared_mlp\.input_linear|mixer\.shared_experts\.up_proj)$"
)
#: the MLP width's key, the first the config has (``decoder_ffn_dim``: a decoder-only config, TrOCR's)
_MLP_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim", "ffn_hidden_size", "d_inner", "dff",
             "dim_ff", "decoder_ffn_dim", "feed_forward_size", "intermediate_multiple_size")  # fmt: skip


#: config keys that give shared experts a width of their own (Qwen2-MoE's, GraniteMoeShared's, Nemotron-H's)
SHARED_KEYS = ("shared_expert_intermediate_size", "shared_intermediate_size", "moe_shared_expert_intermediate_size",
               "shared_experts_intermediate_size")  # fmt: skip


def config_owner(names: dict[str, nn.Module], name: str) -> tuple[str, object] | None:
    """The nearest module (itself or an ancestor) holding a transformers config."""
    while True:
        config = getattr(names.get(name), "config", None)
        if config is not None and hasattr(config, "to_dict"):
            return name, config
        if not name:
            return None
        name = name.rpartition(".")[0]


def _side(name: str, config) -> str:
    """``encoder_`` / ``decoder_`` for the halves of an encoder-decoder model, from the
    nearest half in ``name``: ``encoder`` / ``decoder``, or a prefixed one that reads the same
    keys (SeamlessM4T's ``text_encoder`` / ``text_decoder``). A prefixed half whose config
    has keys of its own (SeamlessM4T's ``speech_encoder_*``) gets its own prefix: no key
    this fix-up writes, so the rebuild check keeps what it cannot say."""
    for part in reversed(name.split(".")):
        if part in ("encoder", "decoder"):
            return f"{part}_"
        stem, _, half = part.rpartition("_")
        if stem and half in ("encoder", "decoder"):
            return f"{part}_" if any(k.startswith(f"{part}_") for k in vars(config)) else f"{half}_"
    return ""


def _set(config, key: str, values: list[int], record: dict) -> None:
    if not values or not hasattr(config, key):
        return
    current = getattr(config, key)
    if isinstance(current, (list, tuple)):  # one value per layer (Gemma3n's ``intermediate_size``): each its own
        n = len(current)  # (a per-stage list, Swin's ``num_heads``, is written by :mod:`.staged`)
        if n == len(values) and not is_staged(config):
            setattr(config, key, type(current)(values))
        elif n and len(values) % n == 0 and not is_staged(config):
            # one value per kind of module, each layer holding one of each in that order (Ernie-4.5-VL's
            # ``moe_intermediate_size``: [text experts, vision experts] in every MoE layer)
            per_kind = [values[i::n] for i in range(n)]
            if any(len(set(v)) > 1 for v in per_kind):
                record[key] = values
            setattr(config, key, type(current)(v[0] for v in per_kind))
        return
    if len(set(values)) > 1:
        record[key] = values
    setattr(config, key, values[0])


def _entry(config) -> dict:
    return {"config": config, "norms": Counter(), "inputs": Counter(), "values": defaultdict(list),
            "scaled": defaultdict(list), "mlps": set(), "at": defaultdict(list)}  # fmt: skip


def _collect(model: nn.Module, scales: dict[str, tuple[Fraction, Fraction | None]] | None = None) -> dict[int, dict]:
    """Per config object: the widths its modules show (norms, heads, MLP widths).
    ``scales``: per attention module, its head and key/value head counts over the config's
    (:func:`_count_scales`); the counts divided by them go to ``"scaled"``. ``"at"``: per
    key, the layer of each value (:func:`~.per_layer.layer_index`)."""
    names = dict(model.named_modules())
    found: dict[int, dict] = {}
    for name, module in names.items():
        owner = config_owner(names, name)
        if owner is None:
            continue
        entry = found.setdefault(id(owner[1]), _entry(owner[1]))
        values, at, layer = entry["values"], entry["at"], layer_index(name, module)
        side = _side(name, owner[1]) if hasattr(owner[1], "encoder_ffn_dim") else ""
        if isinstance(module, nn.LayerNorm) or (type(module).__name__.endswith("RMSNorm")):
            w = getattr(module, "weight", None)
            if w is not None and w.ndim == 1:
                entry["norms"][int(w.shape[0])] += 1
        if is_attention(module):
            counts = head_counts(module)
            # the first input projection it has (Dots3's latent attention sets ``q_proj = None`` beside ``q_a_proj``)
            width = next((w for w in (proj_in_width(getattr(module, c, None)) for c in INPUT_PROJS) if w), None)
            if width is not None:
                entry["inputs"][width] += 1  # the residual stream the attention reads
            if counts is not None:
                heads, kv, hd = counts
                key = f"{side}attention_heads" if side else "num_attention_heads"
                values[key].append(heads)
                at[key].append(layer)
                scale = (scales or {}).get(name)
                if scale is not None:
                    entry["scaled"][key].append(_unscaled(heads, scale[0]))
                if kv is not None:
                    values["num_key_value_heads"].append(kv)
                    at["num_key_value_heads"].append(layer)
                    if scale is not None:
                        entry["scaled"]["num_key_value_heads"].append(_unscaled(kv, scale[1]))
                values["head_dim"].append(hd)
                at["head_dim"].append(layer)
                if isinstance(getattr(module, "attention_head_size", None), int):  # DeBERTa-v2 reads it
                    values["attention_head_size"].append(hd)
            rank = proj_width(getattr(module, "q_a_proj", None))  # latent attention's query LoRA (DeepSeek, MiniCPM3)
            if rank is not None:
                values["q_lora_rank"].append(rank)
                at["q_lora_rank"].append(layer)
        width = expert_width(module) or flat_expert_width(module)
        if width is not None:  # Mixtral's, Qwen3-MoE's, GPT-OSS's 3-D expert MLPs, DBRX's flat ones
            values["experts"].append(width)
        shared = _SHARED_UP.search(name)
        mlp = name.rpartition(".")[0]  # one width per MLP: its gate and up projections say the same
        if (MLP_UP.search(name) or shared) and mlp not in entry["mlps"] and not _in_norm(names, mlp):
            width = proj_width(module)
            if width is not None:
                if name.endswith((*_MLP_STACKED, "shared_mlp.input_linear")):
                    width //= 2
                part = "shared_expert" if shared else f"{side}ffn_dim" if side else "mlp"
                values[part].append(width)
                at[part].append(layer)
                entry["mlps"].add(mlp)
    return found


def _write(entry: dict) -> dict:
    """Write one config's widths; returns the keys whose layers disagree. A key of a
    heterogeneous config that some layer overrides is written layer by layer
    (:func:`~.per_layer.write_per_layer`)."""
    config, values, at = entry["config"], entry["values"], entry["at"]
    record: dict = {}
    layer_keys = per_layer_keys(config)

    def layered(key: str, part: str) -> bool:
        return key in layer_keys and write_per_layer(config, key, values.get(part, []), at.get(part, []))

    widths = entry["inputs"] or entry["norms"]
    if widths:
        _set(config, "hidden_size", [widths.most_common(1)[0][0]], record)
    for key in ("num_attention_heads", "encoder_attention_heads", "decoder_attention_heads"):
        if not layered(key, key):
            _set(config, key, _counts_of(entry, key), record)
    per_layer = getattr(config, "num_attention_heads_per_layer", None)  # Laguna: a head count per layer
    heads = values.get("num_attention_heads", [])
    if isinstance(per_layer, list) and len(per_layer) == len(heads):
        config.num_attention_heads_per_layer = list(heads)
        record.pop("num_attention_heads", None)
    for key in ("head_dim", "attention_head_size"):  # explicit: no hidden_size / heads division
        if values.get(key) and not is_staged(config) and not isinstance(getattr(type(config), key, None), property):
            if not layered(key, key):
                setattr(config, key, values[key][0])  # (Swin derives it per stage; Falcon's is a read-only property)
    for key in ("num_key_value_heads", "num_kv_heads"):
        if values.get("num_key_value_heads") and getattr(config, key, None) is not None:
            if not layered(key, "num_key_value_heads"):
                _set(config, key, _counts_of(entry, "num_key_value_heads"), record)
    if getattr(config, "q_lora_rank", None) and not layered("q_lora_rank", "q_lora_rank"):  # None: no query LoRA
        _set(config, "q_lora_rank", values.get("q_lora_rank", []), record)
    for key in ("encoder_ffn_dim", "decoder_ffn_dim"):
        _set(config, key, values.get(key, []), record)
    if not hasattr(config, "encoder_ffn_dim"):
        experts, mlp = values.get("experts", []), values.get("mlp", [])
        if hasattr(config, "moe_intermediate_size"):  # the experts' own key (Qwen3-MoE, DeepSeek)
            _set(config, "moe_intermediate_size", experts, record)
        elif (dense := next((k for k in _DENSE_KEYS if getattr(config, k, None) is not None), None)) is not None:
            _set(config, dense, mlp, record)  # the dense layers' own key (experts: the MLP key)
            mlp = experts
        else:  # the experts are the MLP (Mixtral)
            mlp = mlp + experts
        for key in SHARED_KEYS:
            _set(config, key, values.get("shared_expert", []), record)
        holder, key = mlp_key(config)
        if key is not None and not (mlp == values.get("mlp", []) and layered(key, "mlp")):
            _set(holder, key, mlp, record)
        elif mlp and not is_staged(config):  # (Swin's per-stage ratio is written by :mod:`.staged`)
            _set_mlp_ratio(config, mlp, record)
    return record


def _in_norm(names: dict[str, nn.Module], mlp: str) -> bool:
    """An MLP inside a norm (AXK2's gated norms: ``input_layernorm.mlp.fc1``, ``gated_norm_rank``
    wide), not the layer's MLP: its width is no MLP key's."""
    return type(names.get(mlp.rpartition(".")[0])).__name__.endswith("Norm")


def mlp_key(config) -> tuple[object, str | None]:
    """The config (or its ``ffn_config`` sub-config: DBRX's ``ffn_hidden_size``) holding the
    MLP width's key, and the key: the first of :data:`_MLP_KEYS` it has."""
    for holder in (config, getattr(config, "ffn_config", None)):
        key = next((k for k in _MLP_KEYS if holder is not None and hasattr(holder, k)), None)
        if key is not None:
            return holder, key
    return config, None


def _counts_of(entry: dict, key: str) -> list[int]:
    """The per-layer counts of ``key`` to write: as the modules show them, or, where the
    layers disagree and each derives its count from the key by a factor of its own (MiMo-V2's
    sliding-window layers: twice ``num_key_value_heads``), the key each implies."""
    raw, scaled = entry["values"].get(key, []), entry["scaled"].get(key, [])
    if len(set(raw)) > 1 and len(scaled) == len(raw) and len(set(scaled)) == 1 and None not in scaled:
        return scaled
    return raw


def _unscaled(count: int, scale: Fraction | None) -> int | None:
    """``count`` over a layer's factor: the config value it implies (None: not a whole number)."""
    if scale is None or scale <= 0:
        return None
    value = Fraction(count) / scale
    return int(value) if value.denominator == 1 and value > 0 else None


def _count_scales(model: nn.Module) -> dict[str, tuple[Fraction, Fraction | None]]:
    """Per attention module of the model rebuilt from its config as it stands (before the
    rewrite: the unpruned widths), its head and key/value head counts over the config's
    ``num_attention_heads`` / ``num_key_value_heads`` (``encoder_`` / ``decoder_``
    variants): 1 where a layer reads the key as it is, 2 for MiMo-V2's sliding-window
    key/value heads. Empty when the model cannot be rebuilt."""
    ref = rebuilt(model)
    if isinstance(ref, str):
        return {}
    with global_reads(_configs(ref)):
        return _scales_of(ref)


def _scales_of(ref: nn.Module) -> dict[str, tuple[Fraction, Fraction | None]]:
    names = dict(ref.named_modules())
    out: dict[str, tuple[Fraction, Fraction | None]] = {}
    for name, module in names.items():
        owner = config_owner(names, name) if is_attention(module) else None
        counts = head_counts(module) if owner is not None else None
        if counts is None:
            continue
        config, (heads, kv, _) = owner[1], counts
        side = _side(name, config) if hasattr(config, "encoder_ffn_dim") else ""
        h_key = f"{side}attention_heads" if side else "num_attention_heads"
        h_cfg, kv_cfg = getattr(config, h_key, None), getattr(config, "num_key_value_heads", None)
        if not isinstance(h_cfg, int) or h_cfg <= 0:
            continue
        kv_scale = Fraction(kv, kv_cfg) if kv is not None and isinstance(kv_cfg, int) and kv_cfg > 0 else None
        out[name] = (Fraction(heads, h_cfg), kv_scale)
    return out


def _disagree(found: dict[int, dict]) -> bool:
    """Some layers of one config show different head counts."""
    keys = ("num_attention_heads", "encoder_attention_heads", "decoder_attention_heads", "num_key_value_heads")
    return any(len(set(e["values"].get(k, []))) > 1 for e in found.values() for k in keys)


def _set_mlp_ratio(config, mlp: list[int], record: dict) -> None:
    """A config whose MLP width is ``int(hidden_size * mlp_ratio)`` (DINOv2): the ratio
    that gives the kept width (the rebuild check says whether the family reads it so)."""
    hidden, ratio = getattr(config, "hidden_size", None), getattr(config, "mlp_ratio", None)
    if not isinstance(hidden, int) or hidden <= 0 or not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
        return
    if len(set(mlp)) > 1:
        record["mlp_ratio"] = [m / hidden for m in mlp]
    width = mlp[0]
    if width % hidden == 0:
        ratio = width // hidden
    else:
        ratio = width / hidden
        if int(hidden * ratio) < width:  # a float just below the width: step up to it
            ratio = math.nextafter(ratio, math.inf)
    try:
        config.mlp_ratio = ratio
    except Exception:  # noqa: BLE001 - a config typed to whole ratios (DINOv2's strict dataclass): the rebuild
        pass  # check then reports the width it cannot say


def fix_config(model: nn.Module) -> None:
    """Rewrite the config of a transformers model (and of its sub-configs) from its
    modules, then check that the model rebuilt from it has the pruned shapes. The global
    values of a heterogeneous config's per-layer keys are read as any other
    (:func:`~.per_layer.global_reads`)."""
    with global_reads(_configs(model)):
        _fix_config(model)


def _configs(model: nn.Module) -> list:
    """The transformers configs of ``model``'s modules, each once."""
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")]
    return list({id(c): c for c in configs}.values())


def _fix_config(model: nn.Module) -> None:
    found = _collect(model)
    if _disagree(found):  # layers that derive their counts from one key by factors of their own
        found = _collect(model, _count_scales(model))
    root = model.config
    mine = found.setdefault(id(root), _entry(root))
    for entry in list(found.values()):
        # a submodel built from a copy of the model's config (T5's encoder and decoder stacks; a heterogeneous
        # config's per-layer copies, Dots3's indexer's): the same hidden size, read from all of them together (an
        # indexer's own key norms made its copy's hidden_size 16, and the router reading it failed)
        if entry is not mine and type(entry["config"]) is type(root):
            mine["norms"].update(entry["norms"])
            mine["inputs"].update(entry["inputs"])
            for part in ("values", "scaled", "at"):
                for key, widths in entry[part].items():
                    mine[part][key].extend(widths)
    for entry in found.values():
        if entry is not mine and type(entry["config"]) is type(root):
            entry["norms"], entry["inputs"] = mine["norms"], mine["inputs"]
    record = {}
    entry_width = _entry_width(model)
    before = [(entry["config"], dict(vars(entry["config"]))) for entry in found.values()]
    for entry in found.values():
        old = getattr(entry["config"], "hidden_size", None)
        record.update(_write(entry))
        if entry is mine and entry_width is not None and isinstance(old, int):
            root.hidden_size = entry_width
        if is_staged(entry["config"]):
            record.update(write_stages(model, entry["config"]))
        _fix_hidden_attrs(model, entry["config"], old)
    _write_embedding_width(model, root, record)
    declared = declare_biases(model)  # compensation's biases, where a config switch allows them
    mismatched = _unscale_mlp_key(model, before, _switch_off_derivations(model, rebuild_mismatches(model)))
    mismatched = _keep_what_rebuilds(model, before, mismatched)
    root.cleanai_pruning = {
        "uniform": not record,
        "from_pretrained": not mismatched,
        **({"per_layer": record} if record else {}),
        **({"biases_declared": declared} if declared else {}),
        **({"mismatched": mismatched[:5]} if mismatched else {}),
        **({"reload": "load_pruned", "why": _why(model, mismatched, record)} if mismatched else {}),
    }


def _why(model: nn.Module, mismatched: list[str], record: dict) -> list[str]:
    """The reasons, the layers' own widths first where they disagree (per-layer ratios,
    global ranking): that, not the family's head size or MLP formula, is what one key per
    width cannot say (Llama's heads were blamed on a head size derived from the width)."""
    why = reasons(model, mismatched)
    if not record:
        return why
    per_layer = f"layers keep different widths ({', '.join(sorted(record))}): the config holds one value per key"
    return [per_layer, *(w for w in why if w not in (HEADS, MLP))]


#: config switches that make a family derive the MLP width from its key by a formula (LFM2:
#: ``int(2 * intermediate_size / 3)``, times ``block_ffn_dim_multiplier``, rounded up to
#: ``block_multiple_of``), and the value that makes the key the width as written
_DERIVING_SWITCHES = {"block_auto_adjust_ff_dim": False}


def _switch_off_derivations(model: nn.Module, mismatched: list[str]) -> list[str]:
    """Where the rewritten config does not rebuild the model, turn off each switch of
    :data:`_DERIVING_SWITCHES` it has on, and keep it off if that rebuilds more: the MLP
    width written into the key is then the width the model gets (LFM2's MLP was kept by
    the default: no key could state a pruned width). Returns what still mismatches."""
    for key, plain in _DERIVING_SWITCHES.items():
        if mismatched and getattr(model.config, key, plain) != plain:
            mismatched = _set_if_it_rebuilds_more(model, model.config, key, plain, mismatched)
    return mismatched


def _unscale_mlp_key(model: nn.Module, before: list[tuple[object, dict]], mismatched: list[str]) -> list[str]:
    """Where the rewritten config does not rebuild the model, and its layers derive their MLP
    width from the key by a factor (RecurrentGemma: ``intermediate_size // 2``), write the key
    that gives the kept width: the width times the key over the width the unpruned config
    builds (read from the model rebuilt from the config as it was, on the meta device), kept
    if that rebuilds more. Returns what still mismatches."""
    for config, old in before:
        key = next((k for k in _MLP_KEYS if hasattr(config, k)), None)
        if not mismatched or key is None:
            return mismatched
        new, value = getattr(config, key), old.get(key)
        if type(new) is not int or type(value) is not int or new == value or new <= 0:
            continue
        now = dict(vars(config))
        vars(config).update(old)  # the unpruned config, for one rebuild
        ref = rebuilt(model)
        vars(config).update(now)
        if isinstance(ref, str):
            continue
        widths = {w for e in _collect(ref).values() if type(e["config"]) is type(config) for w in e["values"]["mlp"]}
        if len(widths) != 1 or (scale := Fraction(value, widths.pop())) == 1:
            continue
        width = new * scale
        if width.denominator == 1:
            mismatched = _set_if_it_rebuilds_more(model, config, key, int(width), mismatched)
    return mismatched


def _set_if_it_rebuilds_more(model: nn.Module, config, key: str, value, mismatched: list[str]) -> list[str]:
    """Set ``config.key`` to ``value`` and keep it if the model rebuilt from the config has
    fewer mismatched tensors than ``mismatched``; returns the mismatches that hold after."""
    old = getattr(config, key)
    setattr(config, key, value)
    again = rebuild_mismatches(model)
    if _weight(again) < _weight(mismatched):
        return again
    setattr(config, key, old)
    return mismatched


def _weight(mismatched: list[str]) -> tuple[int, int]:
    """How far a rebuild is from the model: tensors of another shape (or a failed rebuild)
    first, then scales computed anew (which :func:`rebuild_mismatches` lists only where every
    shape agrees). Counted together, Dots3's 4 ``q_lora_scale`` of a pruned query rank
    lost to 3 tensors of its dense MLP, whose pruned width was put back out of the config."""
    return sum(1 for m in mismatched if " " not in m or m.startswith("<")), len(mismatched)


def _keep_what_rebuilds(model: nn.Module, before: list[tuple[object, dict]], mismatched: list[str]) -> list[str]:
    """Where the rewritten config does not rebuild the model, put back each rewritten
    number whose old value rebuilds more of it, and return what still mismatches. A
    module's count is not always the config's: ConvBERT's attention has
    ``num_attention_heads // head_ratio`` heads, so writing its 2 heads into the config's
    4 broke the rebuild of a model whose heads were all kept (only its MLP was pruned)."""
    for config, old in before:
        for key, value in old.items():
            new = getattr(config, key, None)
            if not mismatched:
                return mismatched
            if new == value or type(value) not in (int, float) or type(new) not in (int, float):
                continue
            mismatched = _set_if_it_rebuilds_more(model, config, key, value, mismatched)
    return mismatched


#: config keys of an input embedding narrower than the hidden size (ALBERT, ELECTRA; OPT-350m)
_EMBEDDING_KEYS = ("embedding_size", "word_embed_proj_dim")


def _entry_width(model: nn.Module) -> int | None:
    """The hidden size where the input embeddings are projected into it (ALBERT,
    ELECTRA, OPT-350m, MobileBERT): the output width of that projection. The attention
    inputs cannot tell it there: MobileBERT's queries and keys read a bottleneck."""
    from cleanai_plugins.zoo.transformers_hidden import entry_projections

    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if emb is None or not hasattr(getattr(model, "config", None), "hidden_size"):
        return None
    # the projections of the *unpruned* widths: read them from the config before it is rewritten
    entries = entry_projections(model, emb)
    widths = {m.out_features for m in entries}
    return widths.pop() if len(widths) == 1 else None


def _write_embedding_width(model: nn.Module, config, record: dict) -> None:
    """The input embeddings' width, where the config names it apart from the hidden size."""
    key = next((k for k in _EMBEDDING_KEYS if isinstance(getattr(config, k, None), int)), None)
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    width = getattr(emb, "embedding_dim", None)
    if key is not None and isinstance(width, int):
        _set(config, key, [width], record)


def _fix_hidden_attrs(model: nn.Module, config, old: int | None) -> None:
    """Modules that keep the hidden size in an attribute (Mixtral's MoE block views its
    input with ``hidden_dim``) follow the pruned ``hidden_size``."""
    new = getattr(config, "hidden_size", None)
    if not isinstance(old, int) or not isinstance(new, int) or old == new:
        return
    for module in model.modules():
        if getattr(module, "config", config) is config and not is_attention(module):
            for attr in ("hidden_dim", "hidden_size"):
                if getattr(module, attr, None) == old and not isinstance(getattr(type(module), attr, None), property):
                    setattr(module, attr, new)


def _scale_mismatches(model: nn.Module, ref: nn.Module) -> list[str]:
    """Scales derived from the config at construction and not saved: float attributes of
    ``model``'s modules that the model rebuilt from its config (``ref``) computes anew
    (M2M100's, mBART's, Gemma's embedding scale ``sqrt(hidden_size)``; an attention's
    ``scaling``), and T5's ``model_dim`` that scales tied logits. A smaller hidden size
    rebuilds them differently, so ``from_pretrained`` would not give the same model. An
    ALiBi attention with pruned heads (``cleanai_kept_heads``) too: the rebuilt model's
    slopes are those of its head count, not of the heads kept (Bloom, Falcon with the hidden
    size pruned with the heads keep the head size, and every shape agrees)."""
    out = [ALIBI] if any(getattr(m, "cleanai_kept_heads", None) is not None for m in model.modules()) else []
    built = dict(ref.named_modules())
    for name, module in model.named_modules():
        other = built.get(name)
        if other is None:
            continue
        for attr, value in vars(module).items():
            again = vars(other).get(attr)
            if type(value) is float and type(again) is float and not math.isclose(value, again, rel_tol=1e-6):
                out.append(f"{name or type(module).__name__}.{attr} ({value:g} from the original config, {again:g} "
                           "from the pruned one)")  # fmt: skip
        dim, hidden = getattr(module, "model_dim", None), getattr(model.config, "hidden_size", None)
        if isinstance(dim, int) and isinstance(hidden, int) and dim != hidden:  # T5 scales tied logits by it
            out.append(f"{name or type(module).__name__}.model_dim (the original hidden size scales the logits)")
    return out


def rebuild_mismatches(model: nn.Module) -> list[str]:
    """Tensors of ``model`` whose shape the model rebuilt from its config (on the meta
    device, so nothing is allocated) does not have: empty when ``from_pretrained`` can
    rebuild it. Families that derive the head size from ``hidden_size /
    num_attention_heads`` (BERT, GPT-2, ...) cannot express fewer heads. When every shape
    agrees, the scales the rebuilt model computes differently (:func:`_scale_mismatches`),
    in words (with shapes wrong, a scale derived from them would only repeat the reason)."""
    ref = rebuilt(model)
    if isinstance(ref, str):
        return [f"<rebuild failed: {ref}>"]
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    out = [k for k, v in model.state_dict().items() if shapes.get(k) != tuple(v.shape)]
    return out or _scale_mismatches(model, ref)


def rebuilt_shapes(model: nn.Module) -> dict[str, tuple[int, ...]] | str:
    """``{state_dict key: shape}`` of the model rebuilt from ``model.config`` on the meta
    device, or the exception its ``__init__`` raised there (its name and message)."""
    ref = rebuilt(model)
    return ref if isinstance(ref, str) else {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def rebuilt(model: nn.Module, edit=None) -> nn.Module | str:
    """The model rebuilt from ``model.config`` on the meta device, or the exception its
    ``__init__`` (or the config's own validation, which ``save_pretrained`` runs: Llama's
    ``hidden_size % num_attention_heads == 0`` even with ``head_dim`` given) raised there
    (its name and message). ``edit``: called with the copied config first."""
    try:
        config = copy.deepcopy(model.config)
        if edit is not None:
            edit(config)
        without_global_reads(config)  # the rebuilt model reads its per-layer keys as from_pretrained will
        validate = getattr(config, "validate", None)
        if callable(validate):
            validate()
        with torch.device("meta"):
            return type(model)(config)
    except Exception as exc:  # noqa: BLE001 - a family whose __init__ cannot run on meta: say so
        why = " ".join(str(exc).split())[:200]  # the family's own words (e.g. hidden size not a multiple of heads)
        return f"{type(exc).__name__}{': ' + why if why else ''}"
