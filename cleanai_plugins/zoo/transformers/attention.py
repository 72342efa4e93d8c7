"""Attention modules of Hugging Face transformers: which they are, and their attributes
after whole heads were pruned.

CleanAI keeps heads whole in every transformers attention module (the
``cleanai_whole_heads`` hook), so ``head_dim`` never changes and neither does the
attention scale; a pruned module has fewer query heads and, with grouped-query
attention, fewer key/value heads (a KV head goes with the query heads it serves, so the
group size stays). The counts are read back from the projections' widths, so the fix-up
gives the same answer however often it runs.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Container

import torch
from torch import nn

from cleanai_core.heads import HeadLayout, HeadSlice, heads_in_rows
from cleanai_plugins.zoo.transformers.quant_linear import is_quant_linear

__all__ = [
    "INPUT_PROJS",
    "fix_attention",
    "fix_attentions",
    "input_width_query",
    "has_fused_mqa",
    "has_fused_qkv",
    "head_counts",
    "head_layout",
    "is_attention",
    "proj_in_width",
    "proj_width",
    "reuses_keys",
]

HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size", "dim_head")
HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_HEADS_ATTRS = ("num_key_value_heads", "num_kv_heads")
#: the width of all heads together, which :func:`fix_attention` writes
WIDTH_ATTRS = ("all_head_size", "inner_dim", "split_size")
# child -> how many (q, k, v) parts of equal width its output holds, stacked or per head
# (DeBERTa's ``in_proj`` viewed as ``(heads, 3 * head_dim)``, ModernBERT's ``Wqkv``)
QUERY_PROJS = (
    ("q_proj", 1), ("query", 1), ("q", 1), ("q_lin", 1), ("query_proj", 1), ("project_q", 1),
    ("c_attn", 3), ("qkv", 3), ("Wqkv", 3), ("in_proj", 3),
)  # fmt: skip
KEY_PROJS = ("k_proj", "key", "k", "k_lin", "key_proj", "project_k")
#: the projections that read an attention's input (the residual stream): latent attention's (DeepSeek-V3,
#: Dots3) first query and key/value projections too, where the norms inside it (its LoRA ranks, an indexer's
#: keys) can outnumber the residual stream's and made their width the hidden size
INPUT_PROJS = (*(c for c, _ in QUERY_PROJS), "qkv_proj", "query_key_value", "q_a_proj", "kv_a_proj_with_mqa")
#: children that compute keys besides those starting with ``k`` or holding ``kv`` (fused projections)
_MAKES_KEYS = (*KEY_PROJS, *(c for c, stacks in QUERY_PROJS if stacks > 1), "qkv_proj", "query_key_value")


def has_fused_qkv(module: nn.Module) -> bool:
    """An attention module that slices one fused ``qkv_proj`` by channel ranges computed
    from its head counts (Phi-3), which :func:`fix_attention` and the config fix-up
    rewrite after slicing."""
    return proj_width(getattr(module, "qkv_proj", None)) is not None and isinstance(
        getattr(module, "num_key_value_groups", None), int
    )


def has_fused_mqa(module: nn.Module) -> bool:
    """Multi-query attention with one fused projection: the query heads first, then the
    one key and value head. Falcon's ``query_key_value`` of ``heads + 2`` heads (the key
    and value picked with ``[-2]``, ``[-1]``), GPT-BigCode's (SantaCoder, StarCoder)
    ``c_attn`` of ``embed_dim + 2 * kv_dim`` split into ``(embed_dim, kv_dim, kv_dim)``."""
    return _mqa_query_width(module) is not None


def _mqa_query_width(module: nn.Module) -> int | None:
    """The query part's width of a fused multi-query projection (:func:`has_fused_mqa`)."""
    if getattr(module, "multi_query", False) is not True:
        return None
    falcon = proj_width(getattr(module, "query_key_value", None))
    hd = getattr(module, "head_dim", None)
    if falcon is not None and not getattr(module, "new_decoder_architecture", False) and isinstance(hd, int):
        return falcon - 2 * hd
    fused, kv_dim = proj_width(getattr(module, "c_attn", None)), getattr(module, "kv_dim", None)
    if fused is not None and isinstance(kv_dim, int) and not getattr(module, "is_cross_attention", False):
        return fused - 2 * kv_dim
    return None


def _per_head_fused(module: nn.Module) -> bool:
    """``query_key_value`` holding q, k, v per head, viewed as ``(num_heads, 3, head_dim)``
    (Falcon without multi-query, Bloom, GPT-NeoX)."""
    return (
        proj_width(getattr(module, "query_key_value", None)) is not None
        and getattr(module, "multi_query", False) is not True
        and getattr(module, "new_decoder_architecture", False) is not True
    )


_INPUT_WIDTH = (
    re.compile(r"\w+\s*,\s*\w+\s*,\s*(\w+)\s*=\s*(?:\w*hidden_states|query)\.(?:size\(\)|shape)"),
    re.compile(r"(\w+)\s*=\s*\w*hidden_states\.(?:shape|size\(\))\[(?:2|-1)\]"),
)


@functools.cache
def _reshapes_to_input_width(cls: type) -> bool:
    """``forward`` reads the width of its input (``bsz, tgt_len, embed_dim =
    hidden_states.size()``; FSMT: ``tgt_len, bsz, embed_dim = query.size()``; PEGASUS-X:
    ``hidden_dim=token_hidden_states.shape[2]``) and
    reshapes its attention output to it (LED's decoder attention: ``attn_output.reshape(bsz,
    tgt_len, embed_dim)``; PEGASUS-X: ``.view(dim.batch_size, dim.global_len, dim.hidden_dim)``)."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    for pattern in _INPUT_WIDTH:
        for found in pattern.finditer(src):
            if re.search(rf"(?:reshape|view)\([^)]*\b{found.group(1)}\s*\)", src) is not None:
                return True
    return False


def input_width_query(module: nn.Module) -> nn.Module | None:
    """The query projection of an attention module whose output is reshaped to the width
    of its input (:func:`_reshapes_to_input_width`): its heads shrink only with that input
    width, so the projection's output channels go with its input channels."""
    if not is_attention(module) or not _reshapes_to_input_width(type(module)):
        return None
    for child, stacks in QUERY_PROJS:
        proj = getattr(module, child, None)
        if stacks == 1 and isinstance(proj, nn.Linear) and proj.in_features == proj.out_features:
            return proj
    return None


def is_attention(module: nn.Module) -> bool:
    """A transformers attention module (``LlamaAttention``, ``BertSelfAttention``, ...)."""
    cls = type(module)
    return cls.__module__.startswith("transformers.") and "Attention" in cls.__name__


def proj_width(module: nn.Module | None) -> int | None:
    """Output width of a projection: ``nn.Linear``, transformers' ``Conv1D``, or a
    pointwise ``nn.Conv1d`` (SqueezeBERT's grouped MLP), JetMoE's ``ParallelExperts``,
    I-BERT's ``QuantLinear``."""
    if isinstance(module, nn.Linear) or is_quant_linear(module):
        return module.out_features
    if isinstance(module, nn.Conv1d) and module.kernel_size == (1,):
        return module.out_channels
    if type(module).__name__.endswith("ParallelExperts") and isinstance(getattr(module, "output_size", None), int):
        return module.output_size  # JetMoE's experts: one (experts, out, in) weight
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None and weight.ndim == 2:
        return int(weight.shape[1])
    return None


def proj_in_width(module: nn.Module | None) -> int | None:
    """Input width of a projection: ``nn.Linear`` (or I-BERT's ``QuantLinear``) or transformers' ``Conv1D``."""
    if isinstance(module, nn.Linear) or is_quant_linear(module):
        return module.in_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None and weight.ndim == 2:
        return int(weight.shape[0])
    return None


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> str | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return name
    return None


def head_counts(
    module: nn.Module, kv_kept: bool = False, shared_kv: int | None = None
) -> tuple[int, int | None, int] | None:
    """``(query heads, key/value heads or None, head_dim)`` of an attention module, read
    from its projections' widths; ``None`` when they cannot be read. ``kv_kept``: the
    module pruned query heads per group and kept its key/value heads
    (:mod:`cleanai_plugins.mappers.gqa`), which a fused ``qkv_proj``'s width alone
    cannot tell from whole groups gone. ``shared_kv``: the key/value heads of the layer
    whose keys and values a module without a key projection of its own reuses
    (:func:`reuses_keys`)."""
    hd_attr = _int_attr(module, HEAD_DIM_ATTRS)
    if hd_attr is not None:
        hd = getattr(module, hd_attr)
    else:  # no head size of its own (OpenAI GPT: ``split_size`` and ``n_head``, both kept in ratio)
        heads_attr, width_attr = _int_attr(module, HEADS_ATTRS), _int_attr(module, WIDTH_ATTRS)
        if heads_attr is None or width_attr is None or getattr(module, heads_attr) <= 0:
            return None
        hd, rest = divmod(getattr(module, width_attr), getattr(module, heads_attr))
        if rest:
            return None
    width = None
    fused = proj_width(getattr(module, "qkv_proj", None))
    groups = getattr(module, "num_key_value_groups", None)
    kv_heads = getattr(module, "num_key_value_heads", None)
    o_in = proj_in_width(getattr(module, "o_proj", None))
    if fused is not None and isinstance(groups, int) and o_in is not None and o_in % hd == 0:
        # Phi-3: rows [q, k, v]; the output projection reads the query heads, so both modes read alike (a width
        # alone cannot tell whole KV groups gone from query heads per group, and load_pruned, which replays
        # the history without the plugin that chose the mode, rebuilt a Phi-3 pruned per group wrongly)
        heads, rest = divmod(fused // hd - o_in // hd, 2)
        if not rest and heads > 0 and fused % hd == 0:
            return o_in // hd, heads, hd
    if fused is not None and kv_kept and isinstance(kv_heads, int) and fused // hd > 2 * kv_heads:
        return fused // hd - 2 * kv_heads, kv_heads, hd
    if has_fused_mqa(module):
        return _mqa_query_width(module) // hd, 1, hd
    if getattr(module, "new_decoder_architecture", None) is True and isinstance(module.num_kv_heads, int):
        # Falcon-40B: rows (kv groups, group + 2, head_dim); whole KV groups go, the group size stays
        group = module.num_heads // module.num_kv_heads
        kv = proj_width(module.query_key_value) // ((group + 2) * hd)
        return kv * group, kv, hd
    if _per_head_fused(module) and proj_width(module.query_key_value) % (3 * hd) == 0:
        heads = proj_width(module.query_key_value) // (3 * hd)
        return heads, heads, hd
    if fused is not None and isinstance(groups, int) and fused % (hd * (groups + 2)) == 0:
        # Phi-3: rows [q (kv * groups heads), k (kv heads), v (kv heads)]; whole KV groups go
        kv = fused // (hd * (groups + 2))
        return kv * groups, kv, hd
    for child, stacks in QUERY_PROJS:
        w = proj_width(getattr(module, child, None))
        if w is not None and stacks == 3 and isinstance(groups, int) and groups > 1:
            return None  # a fused projection of grouped-query attention (DBRX's Wqkv): no equal thirds
        if w is not None:
            if child == "c_attn" and getattr(module, "is_cross_attention", False):
                w, stacks = proj_width(getattr(module, "q_attn", None)), 1
            width = w // stacks
            break
    if width is not None and o_in is not None and width == 2 * o_in:
        width = o_in  # a query and a gate per head (Qwen3-Next's q_proj: 2 x heads x head_dim rows)
    if width is None or hd <= 0 or width % hd:
        return None
    kv_width = next((proj_width(getattr(module, c, None)) for c in KEY_PROJS if hasattr(module, c)), None)
    kv = kv_width // hd if kv_width is not None and kv_width % hd == 0 else None
    if kv is None and shared_kv is not None and reuses_keys(module):
        kv = shared_kv
    return width // hd, kv, hd


def reuses_keys(module: nn.Module) -> bool:
    """A grouped-query attention module with a query projection and nothing that makes keys
    (no child named ``k...`` or ``...kv...``): it reuses the keys and values an earlier
    layer of its ``layer_type`` computed (Gemma3n's and Gemma 4's KV-shared layers,
    ``is_kv_shared_layer``)."""
    return (
        isinstance(getattr(module, "num_key_value_groups", None), int)
        and any(proj_width(getattr(module, c, None)) is not None for c, stacks in QUERY_PROJS if stacks == 1)
        and not any(n.startswith("k") or "kv" in n or n in _MAKES_KEYS for n, _ in module.named_children())
    )


def fix_attentions(model: nn.Module, kept: Container[nn.Module]) -> None:
    """:func:`fix_attention` on every transformers attention module of ``model``, in order.
    A module that reuses an earlier layer's keys and values (:func:`reuses_keys`) has the
    key/value heads of the last layer of its ``layer_type`` that computed its own: with
    whole KV groups pruned its group size stays either way, but with query heads pruned
    per group (``kept``) it shrinks, and a group size left as it was made ``repeat_kv``
    repeat the keys for heads that are gone (``The size of tensor a (4) must match the
    size of tensor b (8)``)."""
    last_kv: dict[object, int] = {}
    for attn in model.modules():
        if not is_attention(attn):
            continue
        kind = getattr(attn, "layer_type", None)
        fix_attention(attn, attn in kept, last_kv.get(kind))
        counts = None if reuses_keys(attn) else head_counts(attn, attn in kept)
        if counts is not None and counts[1] is not None:
            last_kv[kind] = counts[1]


def fix_attention(module: nn.Module, kv_kept: bool = False, shared_kv: int | None = None) -> None:
    """Set the head counts and widths of a pruned attention module from its projections
    (``kv_kept``, ``shared_kv``: see :func:`head_counts`)."""
    counts = head_counts(module, kv_kept, shared_kv)
    if counts is None:
        return
    heads, kv, hd = counts
    heads_attr = _int_attr(module, HEADS_ATTRS)
    width = getattr(module, heads_attr) * hd if heads_attr is not None else None  # all heads' width, unpruned
    if heads_attr is not None:
        old = getattr(module, heads_attr)
        for name in HEADS_ATTRS:
            if getattr(module, name, None) == old:
                setattr(module, name, heads)
    kv_attr = _int_attr(module, KV_HEADS_ATTRS)
    if kv is not None and kv_attr is not None:
        setattr(module, kv_attr, kv)
    if kv and isinstance(getattr(module, "num_key_value_groups", None), int):
        module.num_key_value_groups = max(1, heads // kv)
    for name in (*WIDTH_ATTRS, "embed_dim"):
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, heads * hd)
    if width != hd and getattr(module, "head_size", None) == width:  # all heads' width (LXMERT), not one head's
        module.head_size = heads * hd


def _child_out(module: nn.Module, name: str, child: str) -> tuple[str, int] | None:
    """``(module name, output width)`` of the projection ``child``, or of the ``linear`` it
    wraps (Moshi's ``MoshiLinear``)."""
    sub = getattr(module, child, None)
    w = proj_width(sub)
    if w is None and proj_width(getattr(sub, "linear", None)) is not None:
        child, w = f"{child}.linear", proj_width(sub.linear)
    return None if w is None else (f"{name}.{child}" if name else child, w)


#: (query, key/value) projections whose rows are ``(heads, rows of one head)``, for attention modules whose head
#: counts :func:`head_counts` cannot read (its fix-ups leave their heads whole): latent attention's
#: ``q_b_proj`` (or ``q_proj``) beside ``kv_b_proj`` (DeepSeek-V2/V3, MiniCPM3: a head's keys and values in one
#: block, as many as the query heads), CTRL's ``Wq`` / ``Wk``, Funnel's ``q_head`` / ``k_head``, wrapped
#: ``q_proj`` / ``k_proj`` (Moshi's); but for latent attention, a key/value head is as wide as a query head
ROWS_PER_HEAD = (("q_b_proj", "kv_b_proj"), ("q_proj", "kv_b_proj"), ("Wq", "Wk"), ("q_head", "k_head"),
                 ("q_proj", "k_proj"))  # fmt: skip


def _rows_per_head(module: nn.Module, name: str) -> HeadLayout | None:
    """The heads of an attention module of :data:`ROWS_PER_HEAD`: its heads attribute
    (``num_heads``, ``n_head``; its config's where it keeps none, as Funnel's) splits each projection's
    rows into that many equal blocks."""
    mp = getattr(module, "mp_num", None)
    fused = _child_out(module, name, "qkv_proj")
    if isinstance(mp, int) and fused is not None:  # CodeGen: rows (mp_num, [q, v, k] of heads / mp_num heads each)
        return _model_parallel_blocks(module, name, mp, *fused)
    holder = next((h for h in (module, getattr(module, "config", None)) if _int_attr(h, HEADS_ATTRS)), None)
    heads = getattr(holder, _int_attr(holder, HEADS_ATTRS)) if holder is not None else 0
    for q, k in ROWS_PER_HEAD:
        query, key = _child_out(module, name, q), _child_out(module, name, k)
        wrapped = k != "k_proj" or proj_width(getattr(module, q, None)) is None  # a plain q_proj: head_counts' own
        if heads <= 0 or query is None or key is None or query[1] % heads or not wrapped:
            continue
        kv = heads if k == "kv_b_proj" else key[1] // (query[1] // heads)
        if kv > 0 and key[1] % kv == 0:
            parts = [HeadSlice(at, "out", heads_in_rows(w, w // n)) for (at, w), n in ((query, heads), (key, kv))]
            return HeadLayout(name, *parts)
    return None


def _model_parallel_blocks(module: nn.Module, name: str, mp: int, at: str, width: int) -> HeadLayout | None:
    """CodeGen's ``qkv_proj``: ``mp`` blocks, each the queries, values and keys of ``heads / mp``
    heads in turn (its ``mp_num`` and ``head_dim``)."""
    heads, hd = getattr(module, "num_attention_heads", None), getattr(module, "head_dim", None)
    if not isinstance(heads, int) or not isinstance(hd, int) or heads % mp or width != 3 * heads * hd:
        return None
    local = heads // mp * hd  # rows of one part of a block
    q, k = (torch.full((width,), -1, dtype=torch.int64) for _ in range(2))
    for h in range(heads):
        row = h // (heads // mp) * 3 * local + h % (heads // mp) * hd
        q[row : row + hd], k[row + 2 * local : row + 2 * local + hd] = h, h
    return HeadLayout(name, HeadSlice(at, "out", q), HeadSlice(at, "out", k))


def head_layout(module: nn.Module, name: str) -> HeadLayout | None:
    """Where the query and key/value heads of a transformers attention module lie in its
    projections' output channels (the forms :func:`head_counts` reads), ``None`` where the
    counts cannot be read."""
    counts = head_counts(module)
    if counts is None:
        return _rows_per_head(module, name)
    heads, kv, hd = counts

    def rows(at: str, width: int, start: int, count: int, stride: int = 0) -> HeadSlice:
        return HeadSlice(at, "out", heads_in_rows(width, hd, start, count, stride))

    for child in ("qkv_proj", "query_key_value", "c_attn"):
        fused = _child_out(module, name, child)
        if fused is None or (child == "c_attn" and getattr(module, "is_cross_attention", False)):
            continue
        at, w = fused
        if has_fused_qkv(module) or has_fused_mqa(module):  # [q heads, k heads, v heads]
            return HeadLayout(name, rows(at, w, 0, heads), rows(at, w, heads * hd, kv or 1))
        if child == "query_key_value" and getattr(module, "new_decoder_architecture", None) is True and kv:
            group = heads // kv  # Falcon-40B: (kv groups, group + 2, head_dim)
            q = torch.full((w,), -1, dtype=torch.int64)
            k = torch.full((w,), -1, dtype=torch.int64)
            for g in range(kv):
                base = g * (group + 2) * hd
                k[base + group * hd : base + (group + 1) * hd] = g
                for j in range(group):
                    q[base + j * hd : base + (j + 1) * hd] = g * group + j
            return HeadLayout(name, HeadSlice(at, "out", q), HeadSlice(at, "out", k))
        if child == "query_key_value" and _per_head_fused(module):  # (heads, 3, head_dim)
            return HeadLayout(name, rows(at, w, 0, heads, 3 * hd), rows(at, w, hd, heads, 3 * hd))
    for child, stacks in QUERY_PROJS:
        found = _child_out(module, name, child)
        if found is None:
            continue
        at, w = found
        if child == "c_attn" and getattr(module, "is_cross_attention", False):
            query = _child_out(module, name, "q_attn")
            if query is None:
                return None
            return HeadLayout(name, rows(*query, 0, heads), rows(at, w, 0, heads))  # c_attn: keys, values
        if stacks == 1:  # a query and a gate per head (Qwen3-Next): one head is its 2 x head_dim rows
            block = w // heads if w in (heads * hd, 2 * heads * hd) else 0
            if not block:
                return None
            query = HeadSlice(at, "out", heads_in_rows(w, block, 0, heads), hd if block != hd else None)
            key = next((_child_out(module, name, c) for c in KEY_PROJS if hasattr(module, c)), None)
            kv_part = rows(*key, 0, key[1] // hd) if key is not None and key[1] % hd == 0 else None
            return HeadLayout(name, query, kv_part)
        if w != 3 * heads * hd:
            return None
        if child == "in_proj":  # DeBERTa: (heads, 3 * head_dim)
            return HeadLayout(name, rows(at, w, 0, heads, 3 * hd), rows(at, w, hd, heads, 3 * hd))
        return HeadLayout(name, rows(at, w, 0, heads), rows(at, w, heads * hd, heads))  # (3, heads, head_dim)
    return None
