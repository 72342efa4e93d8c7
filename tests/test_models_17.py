"""Session 25 model coverage (models17): user-written PyTorch models as popular repositories
write them (YOLOv8's backbone and neck, a UNet, a ResNeXt with ``groups=32``, a functional
Squeeze-Excitation, Transformers on ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``,
packed-sequence GRU / LSTM classifiers, an MLP-Mixer, ``chunk`` / ``unbind`` / ``einsum`` /
``pixel_shuffle``, nanoGPT) and timm's MetaFormer attention: the masking oracle, the data-free
and the activation-aware default paths, save / reload, the user's model unchanged. The models
are written here from their public descriptions (nothing downloaded); the fast cases run by
default, the sweep under ``@pytest.mark.corpus``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_models_6 import groups_with, n_params
from test_models_7 import replayed
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cleanai_core import DependencyGraph, StructuredPruner, load_pruned
from cleanai_core.io import save_pruned
from cleanai_core.testing import check_pruner


# -- YOLOv8 backbone + neck, written from ultralytics' public description --------------------------
def autopad(k, p=None, d=1):
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


class Conv(nn.Module):
    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, g=1, k=(3, 3), e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=False, g=1, e=0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=((3, 3), (3, 3)), e=1.0) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C2fChunk(C2f):
    """ultralytics' other spelling: ``chunk(2, 1)``."""

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class YOLOv8(nn.Module):
    """Backbone + PAN neck of YOLOv8 (width ``w``), returning P3, P4, P5; ``c2f``: the C2f class."""

    def __init__(self, w=16, n=1, c2f=C2f):
        super().__init__()
        c = [w, 2 * w, 4 * w, 8 * w, 16 * w]
        self.b0 = Conv(3, c[0], 3, 2)
        self.b1 = Conv(c[0], c[1], 3, 2)
        self.b2 = c2f(c[1], c[1], n, True)
        self.b3 = Conv(c[1], c[2], 3, 2)
        self.b4 = c2f(c[2], c[2], n, True)
        self.b5 = Conv(c[2], c[3], 3, 2)
        self.b6 = c2f(c[3], c[3], n, True)
        self.b7 = Conv(c[3], c[4], 3, 2)
        self.b8 = c2f(c[4], c[4], n, True)
        self.b9 = SPPF(c[4], c[4], 5)
        self.up = nn.Upsample(None, 2, "nearest")
        self.cat = Concat(1)
        self.h12 = c2f(c[4] + c[3], c[3], n)
        self.h15 = c2f(c[3] + c[2], c[2], n)
        self.h16 = Conv(c[2], c[2], 3, 2)
        self.h18 = c2f(c[2] + c[3], c[3], n)
        self.h19 = Conv(c[3], c[3], 3, 2)
        self.h21 = c2f(c[3] + c[4], c[4], n)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)  # literal widths (w=16: c[2] == 64)
        self.det = nn.ModuleList(nn.Conv2d(ci, 8, 1) for ci in (c[2], c[3], c[4]))

    def forward(self, x):
        x = self.b2(self.b1(self.b0(x)))
        p3 = self.b4(self.b3(x))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        h = self.h12(self.cat([self.up(p5), p4]))
        o3 = self.h15(self.cat([self.up(h), p3]))
        o3 = self.dw(o3)
        o4 = self.h18(self.cat([self.h16(o3), h]))
        o5 = self.h21(self.cat([self.h19(o4), p5]))
        return tuple(d(o) for d, o in zip(self.det, (o3, o4, o5), strict=True))


# -- UNet --
class DoubleConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.net(x)


class UNet(nn.Module):
    def __init__(self, cin=3, classes=2, base=8, bilinear=False):
        super().__init__()
        b = base
        self.inc = DoubleConv(cin, b)
        self.downs = nn.ModuleList([DoubleConv(b, 2 * b), DoubleConv(2 * b, 4 * b), DoubleConv(4 * b, 8 * b)])
        self.bilinear = bilinear
        self.ups = nn.ModuleList()
        self.convs = nn.ModuleList()
        for c in (8 * b, 4 * b, 2 * b):
            if bilinear:
                self.ups.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))
                self.convs.append(DoubleConv(c + c // 2, c // 2))
            else:
                self.ups.append(nn.ConvTranspose2d(c, c // 2, 2, stride=2))
                self.convs.append(DoubleConv(c, c // 2))
        self.outc = nn.Conv2d(b, classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for d in self.downs:
            skips.append(d(F.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up, conv in zip(self.ups, self.convs, strict=True):
            x = up(x)
            s = skips.pop()
            dy, dx = s.size(2) - x.size(2), s.size(3) - x.size(3)
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
            x = conv(torch.cat([s, x], dim=1))
        return self.outc(x)


# -- ResNeXt written by hand, groups=32 --
class ResNeXtBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, groups=32, width=4):
        super().__init__()
        mid = groups * width
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.short(x))


class ResNeXt(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.layer1 = nn.Sequential(ResNeXtBlock(64, 128), ResNeXtBlock(128, 128))
        self.layer2 = nn.Sequential(ResNeXtBlock(128, 256, 2, width=8))
        self.fc = nn.Linear(256, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- SE written with mean and F.linear --
class SEFunctional(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(c // r, c) * 0.3)
        self.b1 = nn.Parameter(torch.randn(c // r) * 0.1)
        self.w2 = nn.Parameter(torch.randn(c, c // r) * 0.3)
        self.b2 = nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True).flatten(1)
        s = F.relu(F.linear(s, self.w1, self.b1))
        s = torch.sigmoid(F.linear(s, self.w2, self.b2))
        return x * s[:, :, None, None]


class SENet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.se1 = SEFunctional(32)
        self.c2 = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.se2 = SEFunctional(64)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.se1(self.c1(x))
        x = self.se2(self.c2(x))
        return self.fc(x.mean((2, 3)))


# -- Transformers --
class MHAClassifier(nn.Module):
    def __init__(self, vocab=50, d=32, heads=4, layers=2, classes=3, seq=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.1)
        self.attn = nn.ModuleList(nn.MultiheadAttention(d, heads, batch_first=True) for _ in range(layers))
        self.ln1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.ff = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(layers)
        )
        self.ln2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        x = self.emb(ids) + self.pos[:, : ids.shape[1]]
        for attn, ln1, ff, ln2 in zip(self.attn, self.ln1, self.ff, self.ln2, strict=True):
            h = ln1(x)
            x = x + attn(h, h, h, need_weights=False)[0]
            x = x + ff(ln2(x))
        return self.head(x.mean(1))


class EncoderClassifier(nn.Module):
    def __init__(self, vocab=50, d=32, heads=4, layers=2, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(
            d, heads, 64, dropout=0.1, batch_first=True, norm_first=True, activation="gelu"
        )
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.norm(self.enc(self.emb(ids)))[:, 0])


# -- RNN text classifiers with packed sequences --
class PackedRNN(nn.Module):
    def __init__(self, kind="lstm", vocab=50, emb=16, hidden=24, classes=3, bidirectional=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb, padding_idx=0)
        rnn = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = rnn(emb, hidden, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, ids):
        lengths = (ids != 0).sum(1).cpu()
        packed = pack_padded_sequence(self.emb(ids), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        mask = (ids != 0).unsqueeze(-1).to(out.dtype)
        return self.fc((out * mask).sum(1) / mask.sum(1))


# -- MLP-Mixer with plain transposes --
class MixerBlock(nn.Module):
    def __init__(self, tokens, d, tok_h, ch_h):
        super().__init__()
        self.n1 = nn.LayerNorm(d)
        self.tok = nn.Sequential(nn.Linear(tokens, tok_h), nn.GELU(), nn.Linear(tok_h, tokens))
        self.n2 = nn.LayerNorm(d)
        self.ch = nn.Sequential(nn.Linear(d, ch_h), nn.GELU(), nn.Linear(ch_h, d))

    def forward(self, x):
        x = x + self.tok(self.n1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ch(self.n2(x))


class Mixer(nn.Module):
    def __init__(self, img=32, patch=8, d=32, depth=2, classes=10):
        super().__init__()
        n = (img // patch) ** 2
        self.stem = nn.Conv2d(3, d, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock(n, d, 2 * n, 4 * d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


# -- chunk / unbind / einsum / pixel_shuffle --
class OpsNet(nn.Module):
    """chunk gating, unbind of q / k / v, spatial attention and a weight in einsum, pixel_shuffle."""

    def __init__(self, c=16, r=2):
        super().__init__()
        self.c1 = nn.Conv2d(3, 2 * c, 3, padding=1)
        self.c2 = nn.Conv2d(c, 3 * c, 1)
        self.mix = nn.Parameter(torch.randn(c, c) * 0.3)
        self.c3 = nn.Conv2d(c, 3 * r * r, 3, padding=1)
        self.r = r
        self.scale = c**-0.5

    def forward(self, x):
        a, b = torch.chunk(self.c1(x), 2, dim=1)
        x = F.gelu(a) * b
        B, C, H, W = x.shape
        q, k, v = self.c2(x).view(B, 3, C, H * W).unbind(1)
        attn = torch.einsum("bci,bcj->bij", q, k).mul(self.scale).softmax(-1)
        x = x + torch.einsum("bij,bcj->bci", attn, v).reshape(B, C, H, W)
        x = torch.einsum("bchw,cd->bdhw", x, self.mix)
        return F.pixel_shuffle(self.c3(x), self.r)


# -- nanoGPT --
class LayerNormB(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, bias=True):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(0.0)
        self.resid_dropout = nn.Dropout(0.0)
        self.n_head = n_head
        self.n_embd = n_embd
        self.flash = hasattr(F, "scaled_dot_product_attention")
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd, bias=True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size, bias=True):
        super().__init__()
        self.ln_1 = LayerNormB(n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, bias)
        self.ln_2 = LayerNormB(n_embd, bias)
        self.mlp = MLP(n_embd, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab=64, block_size=16, n_layer=2, n_head=4, n_embd=32, bias=True, flash=True):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                drop=nn.Dropout(0.0),
                h=nn.ModuleList([Block(n_embd, n_head, block_size, bias) for _ in range(n_layer)]),
                ln_f=LayerNormB(n_embd, bias),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for b in self.transformer.h:
            b.attn.flash = flash

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# -- a non-local block; a GhostNet-style channel range ----------------------------------------------


class NonLocalBlock(nn.Module):
    """Wang et al.'s embedded-Gaussian non-local block as its popular PyTorch ports write it."""

    def __init__(self, in_channels, inter_channels=None):
        super().__init__()
        self.in_channels = in_channels
        self.inter_channels = inter_channels or in_channels // 2
        self.g = nn.Conv2d(in_channels, self.inter_channels, 1)
        self.theta = nn.Conv2d(in_channels, self.inter_channels, 1)
        self.phi = nn.Conv2d(in_channels, self.inter_channels, 1)
        self.W = nn.Sequential(nn.Conv2d(self.inter_channels, in_channels, 1), nn.BatchNorm2d(in_channels))

    def forward(self, x):
        b = x.size(0)
        g_x = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
        phi_x = self.phi(x).view(b, self.inter_channels, -1)
        f = F.softmax(torch.matmul(theta_x, phi_x), dim=-1)
        y = torch.matmul(f, g_x).permute(0, 2, 1).contiguous()
        y = y.view(b, self.inter_channels, *x.size()[2:])
        return x + self.W(y)


class NonLocalNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.nl = NonLocalBlock(32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.nl(self.stem(x)).mean((2, 3)))


class RangeNet(nn.Module):
    """GhostNet's module as its ports write it: ``cat([x1, cheap(x1)], 1)[:, : self.oup]``."""

    def __init__(self):
        super().__init__()
        self.oup = 24
        self.primary = nn.Conv2d(3, 16, 1)
        self.cheap = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        a = self.primary(x)
        out = torch.cat([a, self.cheap(a)], 1)
        return self.head(out[:, : self.oup])


def tiny_caformer(num_classes: int = 3):
    """A CAFormer (timm's MetaFormer: two separable-conv stages, two attention stages with
    heads of 32), one block a stage; timm's ``caformer_s18`` takes no ``depths`` / ``dims``."""
    metaformer = pytest.importorskip("timm.models.metaformer")
    return metaformer.MetaFormer(
        depths=(1, 1, 1, 1),
        dims=(16, 32, 64, 96),
        token_mixers=(metaformer.SepConv, metaformer.SepConv, metaformer.Attention, metaformer.Attention),
        norm_layers=[metaformer.LayerNorm2dNoBias] * 2 + [metaformer.LayerNormNoBias] * 2,
        num_classes=num_classes,
    )


# -- helpers ----------------------------------------------------------------------------------------


def _images(batch: int, side: int) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0))


def _tokens(batch: int, length: int = 12, vocab: int = 50, padded: bool = False) -> torch.Tensor:
    ids = torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    if padded:
        ids[0, length - 4 :] = 0  # a shorter first sequence: pack_padded_sequence sees two lengths
    return ids


def _redrawn(model: nn.Module) -> nn.Module:
    """Constant parameters (norm weights at 1, biases at 0) and BatchNorm's running statistics
    redrawn, so that the masking oracle has something to tell apart; eval mode."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and p.is_floating_point() and bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


def _reloads(tmp_path, small: nn.Module, pruner, spec: str, x) -> None:
    """``save_pruned`` with the factory ``spec`` and ``load_pruned`` give ``small``'s outputs."""
    save_pruned(tmp_path / "o", small, pruner.history, spec)
    back = load_pruned(tmp_path / "o", trust_code=True)
    with torch.no_grad():
        got, want = back.eval()(x), small.eval()(x)
    got, want = (got,) if torch.is_tensor(got) else got, (want,) if torch.is_tensor(want) else want
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# -- 1. a channel split sized by numbers its module stores ------------------------------------------


class StoredSplit(nn.Module):
    """C2f's pattern: ``cv1``'s channels split by sizes the module stores, one part worked on,
    all put back together. ``how``: ``equal`` (``split((self.c, self.c), 1)``), ``int``
    (``split(self.c, 1)``), ``unequal`` (``split((self.a, self.b), 1)``)."""

    def __init__(self, how: str = "equal") -> None:
        super().__init__()
        self.how = how
        if how == "unequal":
            self.a, self.b = 6, 10
        else:
            self.c = 8
        self.cv1 = nn.Conv2d(3, 16, 1)
        self.m = nn.Conv2d(16 - 6 if how == "unequal" else 8, 8, 3, padding=1)
        self.cv2 = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        y = self.cv1(x)
        if self.how == "equal":
            parts = list(y.split((self.c, self.c), 1))
        elif self.how == "int":
            parts = list(y.split(self.c, 1))
        else:
            parts = list(y.split((self.a, self.b), 1))
        parts.append(self.m(F.relu(parts[-1])))
        return self.cv2(torch.cat(parts, 1))


def stored_split_equal():
    return StoredSplit("equal")


def stored_split_int():
    return StoredSplit("int")


def stored_split_unequal():
    return StoredSplit("unequal")


@pytest.mark.parametrize(
    ("how", "units", "attrs", "params"),
    [
        ("equal", [(8, 8)], {"c": 4}, (748, 232)),
        ("int", [(8, 8)], {"c": 4}, (748, 232)),
        ("unequal", [(6, 6), (10, 10)], {"a": 3, "b": 5}, (892, 268)),
    ],
    ids=["equal", "int", "unequal"],
)
def test_a_split_into_sizes_its_module_stores_follows_the_pruning(tmp_path, how, units, attrs, params):
    """Before: ``split((self.c, self.c), 1)`` of pruned channels failed to run ("split_with_sizes
    expects split_sizes to sum exactly to 8"), so verification kept the group whole (YOLOv8's
    every C2f kept its ``cv1``); ``split((self.a, self.b), 1)`` froze its channels ("splits
    channels into unequal parts"). Each stored size is now a ``count`` slice of the part it
    sizes, set to the kept channels after slicing."""
    torch.manual_seed(0)
    model = _redrawn(StoredSplit(how))
    x = _images(2, 8)
    graph = DependencyGraph(model, x)
    assert [(g.size, g.prunable) for g in groups_with(graph, "cv1", "out")] == units
    report = check_pruner(model, x, ratio=0.5)
    assert report.kept_whole == () and report.output_shapes_equal and report.max_abs_diff < 1e-5
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert len(pruner.skipped_groups) == 0
    assert {k: getattr(small, k) for k in attrs} == attrs and (n_params(model), n_params(small)) == params
    assert small.cv1.out_channels == sum(attrs.values()) * (2 if how != "unequal" else 1)
    with torch.no_grad():
        assert torch.equal(replayed(model, pruner.history)(x), small(x))
    torch.save(small, tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=False)(x), small(x))
    _reloads(tmp_path, small, pruner, f"test_models_17:stored_split_{how}", x)
    assert all(getattr(model, k) in (6, 8, 10) for k in attrs)  # the user's model keeps its numbers
    # pruned again (the trace reads the new numbers), and in two steps: the counts follow each cut
    again = StructuredPruner(small, x, "magnitude", pruning_ratio=0.5).prune()
    stepped = StructuredPruner(model, x, "magnitude", pruning_ratio=0.75, iterative_steps=2)
    twice = stepped.prune()
    for m in (again, twice):
        widths = [getattr(m, k) for k in attrs]
        assert m.cv1.out_channels == sum(widths) * (2 if how != "unequal" else 1) and max(widths) < max(attrs.values())
        with torch.no_grad():
            m(x)
    with torch.no_grad():
        assert torch.equal(replayed(model, stepped.history)(x), twice(x))


class TwoStoredNumbers(StoredSplit):
    """The size the split reads is held by two attributes: which one the code read is unknown."""

    def __init__(self) -> None:
        super().__init__("equal")
        self.groups = 8


def test_a_split_size_two_attributes_hold_is_left_to_verification():
    torch.manual_seed(0)
    model = _redrawn(TwoStoredNumbers())
    x = _images(2, 8)
    graph = DependencyGraph(model, x)
    assert not any(s.name.endswith("=") for s in graph.slices)  # no count slice: nothing rewritten
    report = check_pruner(model, x, ratio=0.5)
    assert len(report.kept_whole) == 1 and "cv1" in report.kept_whole[0] and report.max_abs_diff < 1e-5
    with pytest.warns(RuntimeWarning, match="split_with_sizes expects split_sizes to sum exactly"):
        small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    assert small.cv1.out_channels == 16 and small.c == small.groups == 8
    assert small.m.out_channels == 4  # the other group still prunes
    with torch.no_grad():
        small(x)


# -- 2. YOLOv8 ----------------------------------------------------------------------------------------


def yolov8():
    return YOLOv8()


def yolov8_chunk():
    return YOLOv8(c2f=C2fChunk)


@pytest.mark.parametrize("factory", ["yolov8", "yolov8_chunk"])
def test_yolov8_backbone_and_neck_prune_every_c2f(tmp_path, factory):
    """YOLOv8 (width 16) with C2f's ``split((self.c, self.c), 1)``: 8 of its C2f groups were
    kept whole by verification (0.382 of the parameters kept by the masking oracle's random
    half, 826,448 by ``magnitude`` at 0.5); now every C2f prunes as its ``chunk(2, 1)``
    spelling always did (543,552). The depthwise conv written with literal widths
    (``nn.Conv2d(64, 64, 3, groups=64)``) prunes with its channels."""
    torch.manual_seed(0)
    model = _redrawn(globals()[factory]())
    x = _images(1, 32)
    report = check_pruner(model, x, ratio=0.5)
    assert report.kept_whole == () and report.output_shapes_equal and report.max_abs_diff < 1e-5
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert (n_params(model), n_params(small)) == (2161000, 543552)
    for name, m in small.named_modules():
        if isinstance(m, C2f):
            assert m.cv1.conv.out_channels == 2 * m.c == getattr(model, name).c, name
    assert small.dw.in_channels == small.dw.out_channels == small.dw.groups == 32
    assert small.b9.cv1.conv.out_channels == 64 and small.b9.cv2.conv.in_channels == 256  # SPPF: 4 x 64
    _reloads(tmp_path, small, pruner, f"test_models_17:{factory}", x)


# -- 3. timm MetaFormer attention ---------------------------------------------------------------------


def test_metaformer_attention_frees_its_stream_from_its_heads(tmp_path):
    """timm's MetaFormer ``Attention`` (CAFormer) reshapes its output to its input width, which
    tied the stream to its heads of 32: the third stage's 64 channels were 2 units and a tiny
    CAFormer kept 112,447 of 300,943 parameters at 0.5 (``magnitude``). It now joins the
    freed attentions: the stream is 64 units, the heads prune on their own (91,343 kept)."""
    torch.manual_seed(0)
    model = _redrawn(tiny_caformer())
    x = _images(2, 64)
    graph = DependencyGraph(model, x)
    assert [(g.size, g.prunable) for g in groups_with(graph, "stages.2.downsample.conv", "out")] == [(64, 64)]
    assert [(g.size, g.prunable) for g in groups_with(graph, "stages.2.blocks.0.token_mixer.qkv", "out")] == [(2, 2)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.kept_whole == () and report.output_shapes_equal and report.max_abs_diff < 1e-5
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert (n_params(model), n_params(small)) == (300943, 91343)
    attn = small.stages[2].blocks[0].token_mixer
    assert type(attn).__name__ == "PrunedMetaFormerAttention"
    assert (attn.num_heads, attn.head_dim, attn.attention_dim, attn.qkv.out_features) == (1, 32, 32, 96)
    assert small.stages[2].downsample.conv.out_channels == 32
    with torch.no_grad():
        assert torch.equal(replayed(model, pruner.history)(x), small(x))
    torch.save(small, tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=False)(x), small(x))
    _reloads(tmp_path, small, pruner, "test_models_17:tiny_caformer", x)


# -- 4. nanoGPT -----------------------------------------------------------------------------------------


def test_nanogpt_prunes_its_mlp_and_keeps_heads_and_stream_whole():
    """nanoGPT's ``CausalSelfAttention`` views q / k / v with ``C // n_head``, ``C`` the stream's
    width, and SDPA's default scale reads the head size: its heads and the stream stay (the
    stream's group is kept whole by verification: ``y.view(B, T, C)`` reads it); the MLPs
    prune and the output equals the masking oracle's."""
    torch.manual_seed(0)
    model = _redrawn(GPT())
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    report = check_pruner(model, x, ratio=0.5)
    assert report.kept_whole == () and report.output_shapes_equal and report.max_abs_diff < 1e-6
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    with pytest.warns(RuntimeWarning, match=r"skipped group \d+ \(lm_head, .*pruning it breaks the model"):
        small = pruner.prune()
    assert (n_params(model), n_params(small)) == (28032, 19712)  # each MLP 128 -> 64
    for block in small.transformer.h:
        assert (block.mlp.c_fc.out_features, block.attn.c_attn.weight.shape) == (64, (96, 32))
    assert small.lm_head.weight is small.transformer.wte.weight  # still tied


# -- 5. the sweep: user-written models on both paths ---------------------------------------------------


def unet():
    return UNet()


def unet_bilinear():
    return UNet(bilinear=True)


def resnext():
    return ResNeXt()


def senet():
    return SENet()


def mha_classifier():
    return MHAClassifier()


def encoder_classifier():
    return EncoderClassifier()


def lstm_classifier():
    return PackedRNN("lstm")


def gru_classifier():
    return PackedRNN("gru")


def mixer():
    return Mixer()


def ops_net():
    return OpsNet()


def gpt():
    return GPT()


def gpt_math():
    return GPT(flash=False)


def non_local():
    return NonLocalNet()


def ghost_range():
    return RangeNet()


#: factory -> (example batch maker, parameters before, kept by ``magnitude`` at 0.5, kept by the
#: default path at 0.5 with two calibration batches of 4)
USER_MODELS = {
    "yolov8": (lambda b: _images(b, 32), 2_161_000, 543_552, 543_552),
    "tiny_caformer": (lambda b: _images(b, 64), 300_943, 91_343, 92_303),
    "unet": (lambda b: _images(b, 32), 121_186, 30_546, 30_546),
    "unet_bilinear": (lambda b: _images(b, 32), 122_474, 30_854, 30_854),
    "resnext": (lambda b: _images(b, 16), 232_522, 60_202, 60_202),
    "senet": (lambda b: _images(b, 16), 22_914, 6_214, 6_214),
    "mha_classifier": (lambda b: _tokens(b), 27_491, 7_603, 7_603),
    "encoder_classifier": (lambda b: _tokens(b), 18_851, 5_331, 5_331),
    "lstm_classifier": (lambda b: _tokens(b, padded=True), 23_219, 6_235, 6_235),
    "gru_classifier": (lambda b: _tokens(b, padded=True), 17_651, 4_795, 4_795),
    "mixer": (lambda b: _images(b, 32), 25_674, 8_762, 8_762),
    "ops_net": (lambda b: _images(b, 16), 3_708, 1_604, 1_604),
    "gpt": (lambda b: _tokens(b, 16, 64), 28_032, 19_712, 19_712),
    "non_local": (lambda b: _images(b, 8), 3_482, 1_770, 1_770),  # inner groups whole by verification
    "ghost_range": (lambda b: _images(b, 8), 324, 160, 160),
    "gpt_math": (lambda b: _tokens(b, 16, 64), 28_032, 19_712, 19_712),
}


@pytest.mark.corpus
@pytest.mark.parametrize("factory", sorted(USER_MODELS))
def test_user_written_models_prune_on_both_paths_and_match_the_masking_oracle(tmp_path, factory):
    """The battery on each user-written model: the masking oracle at a random half, the
    data-free path (``magnitude``) and the default path (train mode as built, a batch-1
    example, two calibration batches), parameters down, the pruned model runs in eval mode,
    ``save_pruned`` with the factory / ``load_pruned`` exact, the user's model unchanged."""
    batch, before, after_magnitude, after_default = USER_MODELS[factory]
    torch.manual_seed(0)
    model = _redrawn(globals()[factory]())
    x = batch(2)
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    state = copy.deepcopy(model.state_dict())
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    model.train()
    default = StructuredPruner(model, batch(1), pruning_ratio=0.5)
    default.collect_activations([batch(4), batch(4)], progress=False)
    pruned = default.prune()
    assert (n_params(model), n_params(small), n_params(pruned)) == (before, after_magnitude, after_default)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        pruned.eval()(x)
    _reloads(tmp_path, small, pruner, f"test_models_17:{factory}", x)


@pytest.mark.corpus
def test_timm_caformer_prunes_its_attention_streams_unit_by_unit():
    """caformer_s18 at a ratio of 0.3 (heads of 32: 10 and 16 a stage, so 0.3 of the stream in
    head-sized blocks rounded down) kept 0.5233 of its parameters with ``magnitude``; with the
    stream freed of its heads, 0.5055 (a plain ViT keeps 0.525). The oracle holds."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("caformer_s18", pretrained=False, num_classes=10).eval()
    x = _images(1, 64)
    graph = DependencyGraph(model, x)
    assert [(g.size, g.prunable) for g in groups_with(graph, "stages.2.downsample.conv", "out")] == [(320, 320)]
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.3).prune()
    assert round(n_params(small) / n_params(model), 4) == 0.5055
    assert {b.token_mixer.num_heads for b in small.stages[3].blocks} == {12}  # of 16 (0.3 of 16: 4 whole heads gone)
    report = check_pruner(model, x, ratio=0.5)
    assert report.kept_whole == () and report.output_shapes_equal and report.max_abs_diff < 1e-5


# -- 6. views and channel ranges sized by stored numbers ------------------------------------------------


def test_a_view_that_names_a_stored_width_is_left_to_verification():
    """Wang et al.'s non-local block views ``g``'s, ``theta``'s and ``phi``'s outputs with
    ``view(b, self.inter_channels, -1)``. A view's size that equals a stored number is not
    made a count (the lead's merge, session 25): in attention the number of heads equals the
    head width often enough (BEiT written by hand, tiny transformers configs: 4 heads of 4)
    that such a count set ``num_heads`` from the head width. The inner groups stay whole by
    verification, which names them, and the rest prunes exactly (3,482 -> 1,770)."""
    torch.manual_seed(0)
    model = _redrawn(NonLocalNet())
    x = _images(2, 8)
    graph = DependencyGraph(model, x)
    assert not [s.name for s in graph.slices if s.kind == "count"]
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert (n_params(model), n_params(small)) == (3482, 1770) and len(pruner.skipped_groups) > 0
    assert small.nl.inter_channels == small.nl.g.out_channels == small.nl.theta.out_channels == 16
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5


def test_a_channel_range_bounded_by_a_stored_number_follows_the_pruning(tmp_path):
    """GhostNet's ``cat([x1, cheap(x1)], 1)[:, : self.oup]``: the channels below ``oup`` were
    frozen ("takes a fixed range of channels": nothing in the model could be pruned). ``oup``
    is now a count of the channels below it: it becomes the number of them kept."""
    torch.manual_seed(0)
    model = _redrawn(RangeNet())
    x = _images(2, 8)
    graph = DependencyGraph(model, x)
    assert [(g.size, g.prunable) for g in groups_with(graph, "primary", "out")] == [(16, 16)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.kept_whole == () and report.output_shapes_equal and report.max_abs_diff < 1e-6
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    rows = [i for i in range(16) if any(torch.equal(model.primary.weight[i], w) for w in small.primary.weight)]
    assert len(rows) == 8 and small.oup == small.head.in_channels == 8 + sum(i < 8 for i in rows)  # 8 + those of 0-7
    assert model.oup == 24
    _reloads(tmp_path, small, pruner, "test_models_17:ghost_range", x)
