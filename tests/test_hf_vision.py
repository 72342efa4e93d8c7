"""Hugging Face vision models beyond ViT, Swin, ConvNeXt and DINOv2 (``tests/hf_families.py``):
tiny random models of each family, built from configs (no download), prune on the default
path (weight-activation scores, compensation, BatchNorm correction, verification against
the masking oracle), shrink, keep their output shapes, and reload from the folder
``save_pruned`` writes with the same outputs.

Many of them are CNNs whose configs cannot describe a pruned width (ResNet's bottleneck
width is ``hidden_sizes[i] // 4`` in code, MobileNet's widths follow ``depth_multiplier``):
keeping those widths left nothing to prune, and the default refused the whole model
("nothing in this model can be pruned"). They prune now and reload through ``load_pruned``
(``config.cleanai_pruning`` says so). A fast subset runs by default; the whole list is
marked ``corpus``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

T = pytest.importorskip("transformers")

from cleanai_core import StructuredPruner  # noqa: E402
from cleanai_core.io import load_pruned, save_pruned  # noqa: E402
from cleanai_core.testing import run_model  # noqa: E402

VIT = dict(
    image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96
)
SEGFORMER = dict(
    num_encoder_blocks=2,
    depths=[1, 1],
    sr_ratios=[2, 1],
    hidden_sizes=[16, 32],
    num_attention_heads=[1, 2],
    patch_sizes=[7, 3],
    strides=[4, 2],
    mlp_ratios=[2, 2],
)
PYRAMID = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])

#: family -> (model class, config class, config keys, image side)
FAMILIES: dict[str, tuple[str, str, dict, int]] = {
    "beit": ("BeitForImageClassification", "BeitConfig", dict(VIT, use_relative_position_bias=True), 32),
    "deit": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", VIT, 32),
    "data2vec-vision": ("Data2VecVisionForImageClassification", "Data2VecVisionConfig", VIT, 32),
    "vit-msn": ("ViTMSNForImageClassification", "ViTMSNConfig", VIT, 32),
    "ijepa": ("IJepaForImageClassification", "IJepaConfig", VIT, 32),
    "yolos": ("YolosForObjectDetection", "YolosConfig", dict(VIT, image_size=[32, 32], num_detection_tokens=5), 32),
    "dinov2-registers": (
        "Dinov2WithRegistersForImageClassification",
        "Dinov2WithRegistersConfig",
        dict(VIT, mlp_ratio=2, num_register_tokens=2),
        32,
    ),
    "dinov3-vit": ("DINOv3ViTModel", "DINOv3ViTConfig", VIT, 32),
    "siglip-vision": ("SiglipVisionModel", "SiglipVisionConfig", VIT, 32),
    "clip-vision": ("CLIPVisionModelWithProjection", "CLIPVisionConfig", VIT, 32),
    "pixtral-vision": ("PixtralVisionModel", "PixtralVisionConfig", dict(VIT, head_dim=16), 32),
    "aimv2-vision": ("Aimv2VisionModel", "Aimv2VisionConfig", VIT, 32),
    "vitdet": ("VitDetModel", "VitDetConfig", dict(VIT, pretrain_image_size=32), 32),
    "dpt": (
        "DPTForDepthEstimation",
        "DPTConfig",
        dict(
            VIT,
            num_hidden_layers=4,
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[16, 32, 48, 64],
            fusion_hidden_size=32,
            head_hidden_size=16,
        ),
        32,
    ),
    "swinv2": (
        "Swinv2ForImageClassification",
        "Swinv2Config",
        dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4),
        32,
    ),
    "hiera": (
        "HieraForImageClassification",
        "HieraConfig",
        dict(
            embed_dim=16,
            image_size=[64, 64],
            patch_size=[7, 7],
            patch_stride=[4, 4],
            depths=[1, 1, 1, 1],
            num_heads=[1, 2, 2, 4],
            query_stride=[2, 2],
            masked_unit_size=[8, 8],
        ),
        64,
    ),
    "segformer": ("SegformerForSemanticSegmentation", "SegformerConfig", dict(SEGFORMER, decoder_hidden_size=32), 32),
    "glpn": ("GLPNForDepthEstimation", "GLPNConfig", dict(SEGFORMER, decoder_hidden_size=16), 32),
    "pvt": (
        "PvtForImageClassification",
        "PvtConfig",
        dict(PYRAMID, image_size=32, num_attention_heads=[1, 1, 2, 2]),
        32,
    ),
    "pvt-v2": (
        "PvtV2ForImageClassification",
        "PvtV2Config",
        dict(PYRAMID, image_size=32, num_attention_heads=[1, 1, 2, 2]),
        32,
    ),
    "poolformer": ("PoolFormerForImageClassification", "PoolFormerConfig", PYRAMID, 32),
    "focalnet": (
        "FocalNetForImageClassification",
        "FocalNetConfig",
        dict(image_size=32, embed_dim=16, depths=[1, 1], patch_size=4),
        32,
    ),
    "convnextv2": (
        "ConvNextV2ForImageClassification",
        "ConvNextV2Config",
        dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
        32,
    ),
    "dinov3-convnext": ("DINOv3ConvNextModel", "DINOv3ConvNextConfig", dict(hidden_sizes=[16, 32], depths=[1, 1]), 32),
    "resnet": (
        "ResNetForImageClassification",
        "ResNetConfig",
        dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck"),
        32,
    ),
    "regnet": (
        "RegNetForImageClassification",
        "RegNetConfig",
        dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8),
        32,
    ),
    "bit": (
        "BitForImageClassification",
        "BitConfig",
        dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_groups=4),
        32,
    ),
    "mobilenet-v1": (
        "MobileNetV1ForImageClassification",
        "MobileNetV1Config",
        dict(image_size=32, depth_multiplier=0.25),
        32,
    ),
    "mobilenet-v2": (
        "MobileNetV2ForImageClassification",
        "MobileNetV2Config",
        dict(image_size=32, depth_multiplier=0.25),
        32,
    ),
    "mobilevit": (
        "MobileViTForImageClassification",
        "MobileViTConfig",
        dict(
            image_size=64,
            hidden_sizes=[16, 24, 32],
            neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 48],
            num_attention_heads=2,
        ),
        64,
    ),
    "mobilevit-v2": (
        "MobileViTV2ForImageClassification",
        "MobileViTV2Config",
        dict(image_size=64, width_multiplier=0.25),
        64,
    ),
    "levit": (
        "LevitForImageClassification",
        "LevitConfig",
        dict(
            image_size=32, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8]
        ),
        32,
    ),
    "efficientnet": (
        "EfficientNetForImageClassification",
        "EfficientNetConfig",
        dict(image_size=32, width_coefficient=0.5, depth_coefficient=0.2, hidden_dim=640),
        32,
    ),
    "textnet": ("TextNetForImageClassification", "TextNetConfig", {}, 32),
}
FAST = ["resnet", "segformer", "beit"]


def pixels(side: int, n: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def build(name: str):
    cls, config, keys, side = FAMILIES[name]
    if not hasattr(T, cls):
        pytest.skip(f"transformers {T.__version__} has no {cls}")
    torch.manual_seed(0)
    return getattr(T, cls)(getattr(T, config)(**keys)).eval(), side


def outputs(model, x) -> list[torch.Tensor]:
    return [t for t in run_model(model, (x,)) if t.is_floating_point()]


def prune_and_reload(name: str, tmp_path):
    model, side = build(name)
    x = pixels(side)
    pruner = StructuredPruner(model, (x,), pruning_ratio=0.5)
    pruner.collect_activations([(pixels(side, 2, seed),) for seed in (2, 3)], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "this model's config can describe none of its prunable widths"
        small = pruner.prune()
    model.save_pretrained(tmp_path / "original")
    save_pruned(tmp_path / "out", small, pruner.history, spec=f"hf:{tmp_path / 'original'}")
    return model, small, load_pruned(tmp_path / "out").eval(), x


def check_family(name: str, tmp_path) -> float:
    model, small, again, x = prune_and_reload(name, tmp_path)
    before, after = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters())
    assert after < 0.95 * before, f"{name}: {before} -> {after} parameters"
    want, got, reloaded = outputs(model, x), outputs(small, x), outputs(again, x)
    assert [t.shape for t in got] == [t.shape for t in want]
    assert len(reloaded) == len(got)
    for a, b in zip(got, reloaded, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    return after / before


@pytest.mark.parametrize("name", FAST)
def test_a_hugging_face_vision_model_prunes_by_default_and_reloads(name, tmp_path):
    check_family(name, tmp_path)


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(set(FAMILIES) - set(FAST)))
def test_every_hugging_face_vision_family_prunes_by_default_and_reloads(name, tmp_path):
    check_family(name, tmp_path)


if __name__ == "__main__":  # the table of docs/compatibility.md
    import tempfile
    from pathlib import Path

    for family in FAMILIES:
        with tempfile.TemporaryDirectory() as d:
            try:
                print(f"| {family} | {check_family(family, Path(d)):.3f} |")
            except Exception as exc:  # noqa: BLE001 - a row per family
                print(f"| {family} | {type(exc).__name__}: {str(exc)[:120]} |")
