"""Session 23 model coverage (models14): re-parameterisable (RepVGG-style) models fused after
pruning (``timm.utils.reparameterize_model``), and pruned after fusing; one focused check per
cause fixed (tiny models, default suite; real models under ``@pytest.mark.corpus``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_models_6 import n_params
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.testing import check_pruner, run_model

# -- a re-parameterisable block whose fusion reads widths stored at construction ---------------------


class RepBlock(nn.Module):
    """What timm's ``MobileOneBlock`` is: a 3x3 conv + BN branch, a 1x1 conv + BN branch and an
    identity BN, fused by ``reparameterize()`` into one conv sized from ``self.in_chs``,
    ``self.out_chs`` and ``self.groups``; the identity kernel is built from them too."""

    def __init__(self, chs: int, groups: int = 1) -> None:
        super().__init__()
        self.in_chs, self.out_chs, self.groups = chs, chs, groups
        self.conv = nn.Sequential(nn.Conv2d(chs, chs, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(chs))
        self.scale = nn.Sequential(nn.Conv2d(chs, chs, 1, groups=groups, bias=False), nn.BatchNorm2d(chs))
        self.identity = nn.BatchNorm2d(chs)
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return F.relu(self.reparam_conv(x))
        return F.relu(self.conv(x) + self.scale(x) + self.identity(x))

    @staticmethod
    def _fold(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        std = (bn.running_var + bn.eps).sqrt()
        return kernel * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std

    @torch.no_grad()
    def reparameterize(self) -> None:
        ident = torch.zeros(self.in_chs, self.in_chs // self.groups, 3, 3)
        for i in range(self.in_chs):
            ident[i, i % (self.in_chs // self.groups), 1, 1] = 1
        parts = [
            self._fold(self.conv[0].weight, self.conv[1]),
            self._fold(F.pad(self.scale[0].weight, [1, 1, 1, 1]), self.scale[1]),
            self._fold(ident, self.identity),
        ]
        self.reparam_conv = nn.Conv2d(self.in_chs, self.out_chs, 3, padding=1, groups=self.groups)
        self.reparam_conv.weight.copy_(sum(k for k, _ in parts))
        self.reparam_conv.bias.copy_(sum(b for _, b in parts))
        del self.conv, self.scale, self.identity


class RepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = RepBlock(16, groups=16)
        self.full = RepBlock(16)
        self.head = nn.Linear(16, 5)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.3, 0.3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.full(self.dw(self.stem(x))).mean((2, 3)))


def reparameterized(model: nn.Module) -> nn.Module:
    """``timm.utils.reparameterize_model``'s walk, without timm."""
    model = copy.deepcopy(model)
    for m in list(model.modules()):
        if hasattr(m, "reparameterize"):
            m.reparameterize()
    return model


def _images(n: int = 2, seed: int = 1, side: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_a_reparameterisable_block_fuses_once_pruned_with_the_widths_it_stored():
    model = RepNet()
    x = _images()
    p = StructuredPruner(model, x, pruning_ratio=0.5)
    p.collect_activations([_images(4, s) for s in (2, 3)], progress=False)
    small = p.prune()
    assert small.dw.conv[0].groups == small.dw.conv[0].in_channels == 8
    # before: in_chs, out_chs and groups stayed 16 ("integer modulo by zero", a 16-channel identity kernel)
    assert (small.dw.in_chs, small.dw.out_chs, small.dw.groups) == (8, 8, 8)
    assert (small.full.in_chs, small.full.out_chs, small.full.groups) == (8, 8, 1)
    with torch.no_grad():
        fused = reparameterized(small)
        assert fused.dw.reparam_conv.weight.shape == (8, 1, 3, 3)
        torch.testing.assert_close(fused(x), small(x), rtol=0, atol=1e-5)
    assert check_pruner(model, x, ratio=0.5).max_abs_diff < 1e-5


def test_a_stored_width_no_layer_witnesses_is_left_alone():
    model = RepNet()
    model.full.kernel = 3  # not a width name: never rewritten
    model.full.channels = 99  # a width name, but no layer of the block had 99 channels
    small = StructuredPruner(model, _images(), "magnitude", pruning_ratio=0.5).prune()
    assert (small.full.kernel, small.full.channels, small.full.in_chs) == (3, 99, 8)


timm = pytest.importorskip("timm")


def _timm_blocks(kind: str) -> nn.Module:
    """A stem, two re-parameterisable timm blocks of ``kind`` and a head."""
    from timm.models import byobnet, fastvit, ghostnet

    make = {
        "mobileone": lambda: byobnet.MobileOneBlock(16, 16, group_size=1, num_conv_branches=2),
        "fastvit_mobileone": lambda: fastvit.MobileOneBlock(16, 16, 3, group_size=1, num_conv_branches=2),
        "repmixer": lambda: fastvit.RepMixer(16, layer_scale_init_value=0.5),
        "large_kernel": lambda: fastvit.ReparamLargeKernelConv(16, 16, 7, 1, group_size=1, small_kernel=3),
        "rep_cpe": lambda: fastvit.RepConditionalPosEnc(16, spatial_shape=(3, 3)),
        "ghost_v3": lambda: ghostnet.GhostModuleV3(16, 16, mode="original"),
    }[kind]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), make(), make(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.append(nn.Linear(16, 5))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["mobileone", "fastvit_mobileone", "repmixer", "large_kernel", "rep_cpe", "ghost_v3"])
def test_timm_reparameterisable_blocks_fuse_once_pruned(kind):
    from timm.utils import reparameterize_model

    model = _timm_blocks(kind)
    x = _images()
    p = StructuredPruner(model, x, pruning_ratio=0.5)
    p.collect_activations([_images(4, s) for s in (2, 3)], progress=False)
    small = p.prune()
    assert n_params(small) < 0.6 * n_params(model)
    with torch.no_grad():
        want = small(x)
        fused = reparameterize_model(small)  # raised before (stale in_chs / groups / dim) for all but ghost_v3's
        torch.testing.assert_close(fused(x), want, rtol=0, atol=1e-5 * max(1.0, float(want.abs().max())))


# -- a compensation bias that reaches its BatchNorm through a reshape (LeViT's LinearNorm) ------------


class LinearNorm(nn.Module):
    """timm LeViT's ``LinearNorm``: ``bn(linear(x).flatten(0, 1)).reshape_as(x)`` on tokens; its
    ``fuse()`` folds the norm into a linear and ignores any bias of the linear (built without one)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.linear = nn.Linear(a, b, bias=False)
        self.bn = nn.BatchNorm1d(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        w = self.bn.weight / (self.bn.running_var + self.bn.eps) ** 0.5
        m = nn.Linear(self.linear.in_features, self.linear.out_features)
        m.weight.copy_(self.linear.weight * w[:, None])
        m.bias.copy_(self.bn.bias - self.bn.running_mean * w)
        return m


class TokenNet(nn.Module):
    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = shared
        self.embed = nn.Linear(6, 16)
        self.ln1, self.ln2 = LinearNorm(16, 24), LinearNorm(24, 16)
        self.head = nn.Linear(16, 5)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        h = F.gelu(self.ln1(x))
        x = x + self.ln2(h)
        if self.shared:  # ln2.linear's output also read beside its norm
            x = x + self.ln2.linear(h).sigmoid()
        return self.head(x.mean(1))


def _tokens(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 5, 6, generator=torch.Generator().manual_seed(seed)) + 0.5


def test_a_compensation_bias_reaching_its_batchnorm_through_a_reshape_goes_into_the_norm():
    model = TokenNet()
    x = _tokens()
    for options in ({}, {"recalibrate_bn": False, "reconstruction": False}):  # the default path, then bias alone
        p = StructuredPruner(model, x[:2], pruning_ratio=0.5, **options)
        p.collect_activations([_tokens(4, s) for s in (2, 3)], progress=False)
        small = p.prune()
        assert small.ln2.linear.in_features == 12
        # before: ln2.linear got a bias of its own (16 parameters) the BatchNorm after the flatten could hold
        assert small.ln2.linear.bias is None and p.history.meta["added_biases"] == []
    with_bias, _ = p.build(p.plan().pruned_units())
    assert with_bias.ln2.linear.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(small(x), with_bias(x), rtol=0, atol=1e-5)
        fused = copy.deepcopy(small)
        fused.ln1, fused.ln2 = small.ln1.fuse(), small.ln2.fuse()  # what LeViT's fuse() does: exact now
        torch.testing.assert_close(fused(x), small(x), rtol=0, atol=1e-5)


def test_a_reshaped_output_also_read_beside_its_norm_keeps_its_bias():
    model = TokenNet(shared=True)
    p = StructuredPruner(model, _tokens()[:2], pruning_ratio=0.5)
    p.collect_activations([_tokens(4, s) for s in (2, 3)], progress=False)
    small = p.prune()
    assert small.ln2.linear.bias is not None and p.history.meta["added_biases"] == ["ln2.linear"]


# -- attentions recognised in their fused form (EfficientViT-M, SHViT) -----------------------------


@pytest.mark.parametrize("kind", ["cascaded", "shsa"])
def test_an_attention_fused_before_pruning_prunes_like_the_unfused_one(kind):
    from timm.models import efficientvit_msra, shvit
    from timm.utils import reparameterize_model

    torch.manual_seed(0)
    if kind == "cascaded":
        attn = efficientvit_msra.CascadedGroupAttention(16, 4, num_heads=2, attn_ratio=2, resolution=4, kernels=(3, 3))
    else:
        attn = shvit.SHSA(16, 4, 8)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), attn, nn.Conv2d(16, 8, 1)).eval()
    x = _images(2, side=4)
    fused = reparameterize_model(model)  # ConvNorm -> one conv
    kept = {}
    for name, m in (("unfused", model), ("fused", fused)):
        report = check_pruner(m, x, ratio=0.5)
        assert report.max_abs_diff < 1e-5
        kept[name] = report.params_after / n_params(m)
    # before: fused 1.0 ("nothing can be pruned" in the attention: the unequal split froze it)
    assert kept["fused"] < 0.7 and kept["unfused"] < 0.7


# -- heads behind a rotary embedding that cuts the head dimension into fixed ranges (Gemma-4 ViT) ----


def _gemma4(**kw) -> nn.Module:
    torch.manual_seed(0)
    arch = dict(img_size=32, embed_dim=64, depth=2, num_heads=4, head_dim=16, intermediate_size=96)
    arch.update(position_embedding_size=8)
    return timm.create_model("gemma4_vit_167m", num_classes=5, **arch, **kw).eval()


def test_heads_whose_rotary_embedding_slices_the_head_dimension_prune_whole():
    model = _gemma4()  # its projections wrap their linear (``Gemma4ClippableLinear``)
    x = _images(2, side=32)
    report = check_pruner(model, x, ratio=0.5)
    assert report.max_abs_diff < 1e-4 and report.kept_whole == ()
    p = StructuredPruner(model, x, pruning_ratio=0.5)
    p.collect_activations([_images(2, s, 32) for s in (2, 3)], progress=False)
    small = p.prune()
    # before: q / k kept their channels on the head dimension, whose halves the rotary
    # embedding slices (frozen), and v's heads met them there: every head stayed (12 of 12)
    attn = small.encoder.blocks[0].attn
    assert (attn.num_heads, attn.q_proj.linear.out_features, attn.num_kv_heads) == (2, 32, 2)
    assert p.skipped_groups == [] and n_params(small) < 0.4 * n_params(model)
    assert run_model(small, x)[0].shape == (2, 5)


def test_query_heads_sharing_one_key_value_head_prune_one_by_one(tmp_path):
    from cleanai_core import load_pruned
    from cleanai_core.io import save_pruned

    torch.manual_seed(0)
    kw = dict(img_size=28, attn_type="rope", num_heads=6, num_kv_heads=1, embed_dim=96, depth=2, qkv_fused=False)
    model = timm.create_model("eva02_tiny_patch14_224", num_classes=5, **kw).eval()
    x = _images(2, side=28)
    assert check_pruner(model, x, ratio=0.5).max_abs_diff < 1e-4
    p = StructuredPruner(model, x, pruning_ratio=0.5)
    p.collect_activations([_images(2, s, 28) for s in (2, 3)], progress=False)
    small = p.prune()
    attn = small.blocks[0].attn
    # before: the key / value head, viewed (B, N, 1, 16), kept its channels on the head dimension and
    # every query head stayed (q_proj 96 wide, 0.354 of the parameters at 64 px)
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (48, 16, 16)
    assert (attn.num_heads, attn.num_kv_heads, attn.num_kv_groups) == (3, 1, 3)
    save_pruned(tmp_path / "m", small, p.history, "timm:eva02_tiny_patch14_224", {"num_classes": 5, "model_kwargs": kw})
    back = load_pruned(tmp_path / "m", trust_code=True)
    assert torch.equal(run_model(back, x)[0], run_model(small, x)[0])


# -- real models (corpus) ---------------------------------------------------------------------------

REPARAM = {
    "mobileone_s0": 64,
    "fastvit_t8": 64,
    "fastvit_mci0": 64,
    "ghostnetv3_050": 64,
    "lcnetv2_small": 64,
    "levit_128s": 224,
    "efficientvit_m0": 224,
    "shvit_s1": 224,
}


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(REPARAM))
def test_timm_models_fuse_once_pruned_and_prune_once_fused(name):
    from timm.utils import reparameterize_model

    side = REPARAM[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = _images(2, side=side)
    p = StructuredPruner(model, x, pruning_ratio=0.5)
    p.collect_activations([_images(2, s, side) for s in (2, 3)], progress=False)
    small = p.prune()
    assert n_params(small) < 0.3 * n_params(model)
    want = run_model(small, x)[0]
    got = run_model(reparameterize_model(small), x)[0]  # failed or differed (levit 0.28) before
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * max(1.0, float(want.abs().max())))
    fused = reparameterize_model(model)
    q = StructuredPruner(fused, x, pruning_ratio=0.5)
    q.collect_activations([_images(2, s, side) for s in (2, 3)], progress=False)
    assert n_params(q.prune()) < 0.3 * n_params(fused)  # shvit_s1 / efficientvit_m0 0.53 before
