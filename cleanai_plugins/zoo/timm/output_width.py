"""Attentions whose output reshape names the input width (EVA, PVT-v2, CoaT, Diff, Twins, ...), freed.

Glossary:

- *output reshape*: timm's ``EvaAttention`` (EVA-02, the ``vit_*_rope_*``, DINOv3 and PE
  models of ``eva.py``), PVT-v2's ``Attention`` and ``AttentionPoolLatent`` (the ``map``
  pooling of SigLIP, PE-core, NaFlexViT, test_vit3) end their attention with
  ``x.transpose(1, 2).reshape(B, N, C)``, ``C`` the width of the block's *input*, although
  their heads' width (``num_heads * head_dim``) is free: only that reshape ties them (and
  PVT-v2's spatial reduction, ``sr(x).reshape(B, C, -1)``, its output to its input).
- *width-bound*: that reshape made them width-bound attentions (``width_attention.py``):
  each input channel was coupled with one channel of q, k and v. Where the head size cannot
  shrink (rotary embeddings, SDPA's default scale) the heads go whole, so the residual stream
  pruned in head-sized blocks: eva02_tiny (3 heads of 64) lost one of three blocks and kept
  0.375 of its parameters at a ratio of 0.5, test_vit3's pooled stream 0.41; PVT-v2's first
  stage, one head, did not prune at all (pvt_v2_b1 kept 0.31). CoaT's factorised attention
  (``FactorAttnConvRelPosEnc``) also views ``qkv`` with ``C // num_heads``: its heads (8, in
  window groups of 2, 3 and 3) went whole and the stream kept 5 of 8 head-sized blocks
  (coat_lite_tiny kept 0.345 at a ratio of 0.5). Differential attention (``DiffAttention``:
  vit_dlittle, vit_dwee) ends the same way; its heads stay whole (``pairs_sub_heads``), so
  the stream pruned by whole heads (5 of 64: 3 kept, vit_dlittle kept 0.32). Twins'
  ``GlobalSubSampleAttn`` (PCPVT, SVT) and ``LocallyGroupedAttn`` (SVT) view their heads with
  ``C // num_heads`` and reshape the spatial reduction and the output to ``C``: the one-head
  first stage of twins_pcpvt_small did not prune at all (0.315 kept), the others by heads.
  ``RelPosAttention`` (``vit_relpos_*``, ``vit_srelpos_*``: whole heads, SDPA's default scale
  and a bias per head) pruned its stream by heads too: at a ratio of 0.3, one head of six
  went, and vit_srelpos_small kept 0.62 of its parameters (0.5 where the ratio meets a head).
  NesT's ``Attention`` and DaViT's ``WindowAttention`` / ``ChannelAttention`` (its heads
  whole: a softmax over each head's channels) the same: nest_tiny's and davit_tiny's first
  stream was three units of 32. CaiT's ``TalkingHeadAttn`` (heads mixed by ``proj_l`` /
  ``proj_w``: kept whole) and ``ClassAttn`` (also XCiT's) the same: cait_xxs24's stream was
  its four heads (0.542 kept at a ratio of 0.3, 0.508 freed; xcit_nano_12_p16 0.543 -> 0.51).
  MetaFormer's ``Attention`` (CAFormer's last two stages, heads of 32) the same: a stage of
  64 channels was two units (a tiny CAFormer kept 0.37 at a ratio of 0.5, 0.30 freed).

The scan leaves these classes out of the width-bound ones, so their heads prune on their own
and the stream on its own; after slicing the class becomes a variant whose ``forward`` reads
the width from the heads (``reshape(B, N, -1)``), the rest of ``forward`` as timm 1.0's.
``num_heads`` follows the kept heads in :func:`~cleanai_plugins.zoo.timm.attention.fix_attention`
(both keep ``head_dim``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cleanai_plugins.zoo import loaded
from cleanai_plugins.zoo.timm.lookup import triggered_by
from cleanai_plugins.zoo.timm.pruned import pruned_variant, variant_lookup

if TYPE_CHECKING:
    from cleanai_plugins.zoo.timm.scan import TimmScan

__all__ = ["fix_output_width", "scan_output_width"]


def _eva_forward(self, x, rope=None, attn_mask=None, is_causal: bool = False):
    """timm's ``EvaAttention.forward`` with the output width read from the heads."""
    eva = loaded("timm.models.eva")
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    if self.qkv is not None:
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        rot = eva.apply_rot_embed_cat
        q = torch.cat([q[:, :, :npt, :], rot(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt, :], rot(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    if self.fused_attn:
        dropout = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = eva.maybe_add_mask(attn, eva.resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal))
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
    x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _attend(self, q, k, v):
    """``softmax(q k^T * scale) v`` as timm's attentions run it: SDPA where ``fused_attn``, else
    the math path with the stored ``scale`` and ``attn_drop``."""
    if self.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
    return self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v


def _pvt_forward(self, x, feat_size):
    """timm's PVT-v2 ``Attention.forward`` with the widths read from the layers."""
    B, N, C = x.shape
    H, W = feat_size
    q = self.q(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
    if self.pool is not None or self.sr is not None:
        x = x.permute(0, 2, 1).reshape(B, C, H, W)
        x = self.sr(self.pool(x)) if self.pool is not None else self.sr(x)
        x = self.norm(x.flatten(2).permute(0, 2, 1))
        if self.pool is not None:
            x = self.act(x)
    k, v = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    x = _attend(self, q, k, v)
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


def _latent_pool_forward(self, x, attn_mask=None):
    """timm's ``AttentionPoolLatent.forward`` with the attention's width read from the heads."""
    B, N, _ = x.shape
    if self.pos_embed is not None:
        x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
    q = self.q(self.latent.expand(B, -1, -1)).reshape(B, self.latent_len, self.num_heads, self.head_dim)
    q = q.transpose(1, 2)
    k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if self.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = loaded("timm.layers.attention_pool").maybe_add_mask(attn, attn_mask)
        x = attn.softmax(dim=-1) @ v
    x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, self.latent_len, -1)))
    if self.mlp is not None:
        x = x + self.mlp(self.norm(x))
    if self.pool == "token":
        x = x[:, 0]
    elif self.pool == "avg":
        x = x.mean(1)
    return x


def _coat_forward(self, x, size):
    """timm's CoaT ``FactorAttnConvRelPosEnc.forward`` with the head size and the output
    width read from the heads (its relative position encoding reads them from ``q``)."""
    B, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    factor_att = q @ (k.softmax(dim=2).transpose(-1, -2) @ v)
    x = self.scale * factor_att + self.crpe(q, v, size=size)
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


def _relpos_forward(self, x, shared_rel_pos=None):
    """timm's ``RelPosAttention.forward`` (``vit_relpos_*``, ``vit_srelpos_*``) with the output
    width read from the heads."""
    B, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if self.fused_attn:
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
        )
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.rel_pos is not None:
            attn = self.rel_pos(attn, shared_rel_pos=shared_rel_pos)
        elif shared_rel_pos is not None:
            attn = attn + shared_rel_pos
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


def _metaformer_forward(self, x):
    """timm's MetaFormer ``Attention.forward`` (CAFormer's attention stages) with the output
    width read from the heads."""
    B, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return self.proj_drop(self.proj(_attend(self, q, k, v).transpose(1, 2).reshape(B, N, -1)))


def _nest_forward(self, x):
    """timm's NesT ``Attention.forward`` (blocks of tokens) with the head size and the output
    width read from ``qkv``."""
    B, T, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, T, N, 3, self.num_heads, -1).permute(3, 0, 4, 1, 2, 5).unbind(0)
    x = _attend(self, q, k, v)
    return self.proj_drop(self.proj(x.permute(0, 2, 3, 4, 1).reshape(B, T, N, -1)))


def _davit_window_forward(self, x):
    """timm's DaViT ``WindowAttention.forward`` with the head size and the output width read
    from ``qkv``."""
    B_, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if self.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v)
    else:
        x = self.softmax((q * self.scale) @ k.transpose(-2, -1)) @ v
    return self.proj(x.transpose(1, 2).reshape(B_, N, -1))


def _davit_channel_forward(self, x):
    """timm's DaViT ``ChannelAttention.forward`` (attention over each head's channels) with
    the head size and the output width read from ``qkv``."""
    B, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((k * self.scale).transpose(-1, -2) @ v).softmax(dim=-1)
    x = (attn @ q.transpose(-1, -2)).transpose(-1, -2)
    return self.proj(x.transpose(1, 2).reshape(B, N, -1))


def _class_attn_forward(self, x):
    """timm's ``ClassAttn.forward`` (CaiT's and XCiT's class-attention blocks) with the head
    size and the output width read from the projections."""
    B, N, _ = x.shape
    q = self.q(x[:, 0]).unsqueeze(1).reshape(B, 1, self.num_heads, -1).permute(0, 2, 1, 3)
    k = self.k(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
    v = self.v(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
    return self.proj_drop(self.proj(_attend(self, q, k, v).transpose(1, 2).reshape(B, 1, -1)))


def _talking_heads_forward(self, x):
    """timm's CaiT ``TalkingHeadAttn.forward`` with the head size and the output width read
    from ``qkv``."""
    B, N, _ = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
    attn = self.proj_l((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    attn = self.attn_drop(self.proj_w(attn.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1)))


def _twins_global_forward(self, x, size):
    """timm's Twins ``GlobalSubSampleAttn.forward`` with the widths read from the layers
    (``C // num_heads`` for the heads, ``reshape(B, C, -1)`` after the spatial reduction)."""
    B, N, C = x.shape
    q = self.q(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
    if self.sr is not None:
        x = x.permute(0, 2, 1).reshape(B, C, *size)
        x = self.norm(self.sr(x).flatten(2).permute(0, 2, 1))
    kv = self.kv(x).reshape(B, x.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    x = _attend(self, q, k, v)
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


def _twins_local_forward(self, x, size):
    """timm's Twins ``LocallyGroupedAttn.forward`` (padding form) with the head size and the
    output width read from ``qkv``."""
    B, N, C = x.shape
    H, W = size
    x = x.view(B, H, W, C)
    pad_r = (self.ws - W % self.ws) % self.ws
    pad_b = (self.ws - H % self.ws) % self.ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, Hp, Wp, _ = x.shape
    _h, _w = Hp // self.ws, Wp // self.ws
    x = x.reshape(B, _h, self.ws, _w, self.ws, C).transpose(2, 3)
    qkv = self.qkv(x).reshape(B, _h * _w, self.ws * self.ws, 3, self.num_heads, -1).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv.unbind(0)
    x = _attend(self, q, k, v)
    x = x.transpose(2, 3).reshape(B, _h, _w, self.ws, self.ws, -1)
    x = x.transpose(2, 3).reshape(B, _h * self.ws, _w * self.ws, -1)
    if pad_r > 0 or pad_b > 0:
        x = x[:, :H, :W, :].contiguous()
    return self.proj_drop(self.proj(x.reshape(B, N, -1)))


def _diff_forward(self, x, attn_mask=None, is_causal: bool = False):
    """timm's ``DiffAttention.forward`` with the output width read from the heads."""
    B, N, _ = x.shape
    q, k, v = self.qkv(x).chunk(3, dim=2)
    q = q.reshape(B, N, 2 * self.num_heads, self.head_dim).transpose(1, 2)
    k = k.reshape(B, N, 2 * self.num_heads, self.head_dim).transpose(1, 2)
    v = v.reshape(B, N, self.num_heads, 2 * self.head_dim).transpose(1, 2)
    q, k = self.q_norm(q), self.k_norm(k)
    lambda_full = self._compute_lambda().type_as(q)
    if self.fused_attn:
        q1, q2 = q.reshape(B, self.num_heads, 2, N, self.head_dim).unbind(2)
        k1, k2 = k.reshape(B, self.num_heads, 2, N, self.head_dim).unbind(2)
        p = self.attn_drop_p if self.training else 0.0
        attn1 = F.scaled_dot_product_attention(q1, k1, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal)
        attn2 = F.scaled_dot_product_attention(q2, k2, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal)
        x = attn1 - lambda_full * attn2
    else:
        layers = loaded("timm.layers.attention")
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = layers.maybe_add_mask(attn, layers.resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1)).view(B, self.num_heads, 2, N, N)
        x = (attn[:, :, 0] - lambda_full * attn[:, :, 1]) @ v
    x = (self.sub_norm(x) * (1 - self.lambda_init)).transpose(1, 2).reshape(B, N, -1)
    return self.proj_drop(self.proj(self.norm(x)))


#: (timm module, class, the variant's forward, the variant's name)
_BASES = (
    ("timm.models.eva", "EvaAttention", _eva_forward, "PrunedEvaAttention"),
    ("timm.models.pvt_v2", "Attention", _pvt_forward, "PrunedPvtAttention"),
    ("timm.layers.attention_pool", "AttentionPoolLatent", _latent_pool_forward, "PrunedAttentionPoolLatent"),
    ("timm.models.coat", "FactorAttnConvRelPosEnc", _coat_forward, "PrunedFactorAttnConvRelPosEnc"),
    ("timm.layers.diff_attention", "DiffAttention", _diff_forward, "PrunedDiffAttention"),
    ("timm.models.vision_transformer_relpos", "RelPosAttention", _relpos_forward, "PrunedRelPosAttention"),
    ("timm.models.nest", "Attention", _nest_forward, "PrunedNestAttention"),
    ("timm.models.metaformer", "Attention", _metaformer_forward, "PrunedMetaFormerAttention"),
    ("timm.models.davit", "WindowAttention", _davit_window_forward, "PrunedDavitWindowAttention"),
    ("timm.models.davit", "ChannelAttention", _davit_channel_forward, "PrunedDavitChannelAttention"),
    ("timm.models.cait", "ClassAttn", _class_attn_forward, "PrunedClassAttn"),
    ("timm.models.cait", "TalkingHeadAttn", _talking_heads_forward, "PrunedTalkingHeadAttn"),
    ("timm.models.twins", "GlobalSubSampleAttn", _twins_global_forward, "PrunedGlobalSubSampleAttn"),
    ("timm.models.twins", "LocallyGroupedAttn", _twins_local_forward, "PrunedLocallyGroupedAttn"),
)
_VARIANTS = [pruned_variant(module, name, forward, __name__, pruned) for module, name, forward, pruned in _BASES]
#: the pruned classes by name (a pickled model loads, also before timm is imported)
__getattr__ = variant_lookup(
    __name__, *((module, pruned, v) for (module, _, _, pruned), v in zip(_BASES, _VARIANTS, strict=True))
)


def _pruned() -> dict[type, type]:
    """timm's class -> its pruned variant, for the classes whose module is imported by now."""
    made = dict(v() for v in _VARIANTS)
    made.pop(None, None)
    return made


@triggered_by("num_heads")
def scan_output_width(modules: list[nn.Module]) -> set[nn.Module]:
    """The attentions of :data:`_BASES` (exactly those classes: a subclass may read ``C``
    elsewhere) whose ``head_dim`` the fix-ups can follow, or that store none (CoaT: the
    variant reads it with ``-1``, the fix-ups count the heads)."""
    pruned = _pruned()
    return {m for m in modules if type(m) in pruned and isinstance(getattr(m, "head_dim", 0), int)}


@triggered_by("num_heads")
def fix_output_width(module: nn.Module, name: str, edits, scan: TimmScan) -> None:
    """The class becomes its pruned variant (``num_heads``: :func:`fix_attention`)."""
    if module in scan.output_width:
        module.__class__ = _pruned()[type(module)]
