"""The masking oracle for attention (``layers/attention.py``, ``mappers/matmul.py``):
``nn.MultiheadAttention``, ViT, weights read outside their linear, EVA.

See ``layer_oracle.py`` for what the oracle checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from layer_oracle import group_of, oracle, prune_with
from torch import nn

from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.testing import random_units

torch.manual_seed(0)


# -- attention -------------------------------------------------------------------------------
class MHABlock(nn.Module):
    def __init__(self, e=32, heads=4, batch_first=True, kdim=None, bias=True, add_bias_kv=False, need_weights=True):
        super().__init__()
        self.inp = nn.Linear(8, e)
        self.kv = nn.Linear(8, kdim) if kdim else None
        self.attn = nn.MultiheadAttention(
            e, heads, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias, add_bias_kv=add_bias_kv
        )
        self.fc = nn.Linear(e, 16)
        self.batch_first, self.need_weights = batch_first, need_weights

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.inp(x)
        kv = self.kv(x) if self.kv is not None else h
        a, _ = self.attn(h, kv, kv, need_weights=self.need_weights)
        return self.fc(torch.relu(h + a))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"batch_first": False},
        {"kdim": 12},
        {"kdim": 12, "batch_first": False},
        {"bias": False},
        {"add_bias_kv": True},
        {"need_weights": False},
    ],
    ids=str,
)
def test_multihead_attention(kw):
    m = MHABlock(**kw)
    r = oracle(m, torch.randn(2, 5, 8))
    a = r.small.attn
    assert a.num_heads == 4 and a.embed_dim == a.head_dim * 4 and a.head_dim == 4  # 4 of 8 head dims per head
    assert a.out_proj.weight.shape == (16, 16)
    g = group_of(r.graph, "attn", "out")
    assert g.size == 8  # 32 channels viewed as (4 heads, 8 dims): one unit per head dim
    if kw.get("kdim"):
        assert a.kdim == a.vdim == 6 and a.k_proj_weight.shape == (16, 6) and not a._qkv_same_embed_dim
    else:
        assert a.in_proj_weight.shape == (48, 16) and a._qkv_same_embed_dim


def test_mha_fast_path_is_exact():
    """Self-attention, batch_first, eval, no grad: the native fast path runs before and after."""
    m = MHABlock(need_weights=False).eval()
    x = torch.randn(2, 5, 8)
    g = DependencyGraph(m, x)
    small = prune_with(g, random_units(g, 0.5))
    h = small.inp(x)
    with torch.no_grad():
        fast = small.attn(h, h, h, need_weights=False)[0]
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = small.attn(h, h, h, need_weights=False)[0]
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert torch.allclose(fast, slow, atol=1e-5)


def _random_head(vit: nn.Module) -> nn.Module:
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises it: the output would be constant
    return vit


def test_vit_b_16():
    m = _random_head(torchvision.models.vit_b_16(image_size=32)).eval()
    r = oracle(m, torch.randn(2, 3, 32, 32), ratio=0.25)
    # the residual stream (LayerNorm) is normalising; the 12 MLP hidden groups lose 768 units each
    assert r.before - r.after == 12 * 768 * (768 + 1 + 768)
    assert group_of(r.graph, "encoder.layers.encoder_layer_0.self_attention", "out").size == 64


def test_small_vit_without_layernorm_prunes_head_dims():
    m = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48, num_classes=5
    )
    for layer in m.encoder.layers:
        layer.ln_1, layer.ln_2 = nn.Identity(), nn.Identity()
    m.encoder.ln = nn.Identity()
    _random_head(m)

    def fwd(model, x):  # torchvision reads hidden_dim in _process_input
        model.hidden_dim = model.conv_proj.out_channels
        return model(x)

    r = oracle(m, torch.randn(2, 3, 32, 32), forward_fn=fwd)
    att = r.small.encoder.layers[0].self_attention
    assert att.embed_dim == 16 and att.head_dim == 4 and r.small.class_token.shape == (1, 1, 16)
    assert r.small.encoder.pos_embedding.shape == (1, 17, 16)


class FunctionalBiasAttention(nn.Module):
    """EVA / BEiT style self-attention: the fused ``qkv`` linear has no bias and is never
    called; ``forward`` runs ``F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))``
    with ``k_bias`` a zero buffer. Residual stream of 16 channels, 4 heads of 8."""

    def __init__(self, c=16, heads=4, hd=8):
        super().__init__()
        self.num_heads, self.head_dim = heads, hd
        self.embed = nn.Linear(3, c)
        self.qkv = nn.Linear(c, 3 * heads * hd, bias=False)
        self.q_bias = nn.Parameter(torch.randn(heads * hd))
        self.register_buffer("k_bias", torch.zeros(heads * hd), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(heads * hd))
        self.proj = nn.Linear(heads * hd, c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        h = self.embed(x)
        b, n, _ = h.shape
        qkv = F.linear(h, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.head(h + self.proj(y))


def test_weight_read_outside_its_linear_prunes_heads_and_inputs():
    r = oracle(FunctionalBiasAttention(), torch.randn(2, 5, 3))
    heads = group_of(r.graph, "qkv", "out")
    names = {(s.module, s.name) for s in heads.slices}
    assert names == {("qkv", "out"), ("", "q_bias"), ("", "k_bias"), ("", "v_bias"), ("proj", "in")}
    assert heads.size == heads.prunable == 4  # whole heads of 8 (the default SDPA scale)
    stream = group_of(r.graph, "qkv", "in")
    assert {("embed", "out"), ("proj", "out"), ("head", "in")} <= {(s.module, s.name) for s in stream.slices}
    assert stream.size == stream.prunable == 16
    s = r.small
    assert s.qkv.weight.shape == (48, 8) and s.q_bias.shape == s.k_bias.shape == s.v_bias.shape == (16,)
    assert s.num_heads == 2 and s.proj.weight.shape == (8, 16)
    # embed 3*16+16, qkv 96*16, q/v bias 2*32, proj 32*16+16, head 16*4+4 -> 8 channels, 2 heads
    assert (r.before, r.after) == (64 + 1536 + 64 + 528 + 68, 32 + 384 + 32 + 136 + 36)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-qkv", "q-k-v-projections"])
def test_eva_attention_prunes_whole_heads_apart_from_the_stream(fused):
    """timm's ``EvaAttention`` reshapes its output to the input width (``reshape(B, N, C)``),
    which tied q, k and v to the stream until session 18; the timm plugin now frees it (the
    pruned class reshapes with ``-1``), so whole heads go on their own and the stream on its
    own. Rotary embeddings (on all tokens but the first, joined back by ``cat``) keep the
    head size."""
    eva = pytest.importorskip("timm.models.eva")
    rope = pytest.importorskip("timm.layers").RotaryEmbeddingCat

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 16)
            self.attn = eva.EvaAttention(16, num_heads=4, qkv_bias=True, qkv_fused=fused, scale_norm=False)
            self.rope = rope(4, in_pixels=False, feat_shape=[2, 2])
            self.head = nn.Linear(16, 4)
            with torch.no_grad():
                for p in self.attn.parameters():
                    if p.ndim == 1:
                        p.normal_()

        def forward(self, x):
            h = self.embed(x)
            return self.head(h + self.attn(h, rope=self.rope.get_embed()))

    r = oracle(Block(), torch.randn(2, 5, 3))
    q = "attn.qkv" if fused else "attn.q_proj"
    heads = group_of(r.graph, q, "out")
    names = {(s.module, s.name) for s in heads.slices}
    assert (q, "out") in names and ("attn.proj", "in") in names and (q, "in") not in names
    assert heads.size == heads.prunable == 4  # 16 channels in 4 heads of 4
    stream = group_of(r.graph, q, "in")
    assert {("embed", "out"), ("attn.proj", "out"), ("head", "in")} <= {(s.module, s.name) for s in stream.slices}
    assert stream.size == stream.prunable == 16  # was one group with the heads: 4 units
    a = r.small.attn
    assert a.num_heads == 2 and a.proj.weight.shape == (8, 8)  # half of the heads, half of the stream
    if fused:
        assert ("", "attn.q_bias") in names and a.qkv.weight.shape == (24, 8) and a.k_bias.shape == (8,)
    else:
        assert a.q_proj.weight.shape == a.k_proj.weight.shape == a.v_proj.weight.shape == (8, 8)


class TwiceScaledWeight(nn.Module):
    """``F.linear(x, 2 * self.fc.weight)``: a scalar keeps both labelled dimensions."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.head = nn.Linear(3, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(F.linear(self.embed(x), 2 * self.fc.weight, self.fc.bias)))


class ColumnScaledWeight(TwiceScaledWeight):
    """``F.linear(x, self.fc.weight * s)`` with ``s`` as wide as the columns and no label."""

    def forward(self, x):
        w = self.fc.weight * torch.linspace(1.0, 2.0, 8)
        return self.head(torch.relu(F.linear(self.embed(x), w, self.fc.bias)))


def test_weight_scaled_outside_its_linear_keeps_its_columns_label():
    r = oracle(TwiceScaledWeight(), torch.randn(4, 3))
    columns = group_of(r.graph, "fc", "in")
    assert columns.prunable == 8 and ("embed", "out") in {(s.module, s.name) for s in columns.slices}
    assert r.small.fc.weight.shape == (3, 4) and r.small.embed.weight.shape == (4, 3)


def test_weight_read_outside_its_linear_freezes_columns_it_cannot_follow():
    r = oracle(ColumnScaledWeight(), torch.randn(4, 3))
    assert group_of(r.graph, "fc", "in").prunable == 0  # the multiplication drops the columns' label
    assert "a second labelled dimension reaches op aten.mul.Tensor" in r.graph.explain()
    assert group_of(r.graph, "fc", "out").prunable == 6 and r.small.fc.weight.shape == (3, 8)
