"""Session 23b (models15): Hugging Face detection, segmentation, depth, pose and video models
built from tiny configs (no download) on the default path: calibrated prune, eval and train
forward, save / reload (``docs/compatibility.md``, "Session 23b: models15")."""

from __future__ import annotations

import warnings

import pytest
import torch

T = pytest.importorskip("transformers")

from cleanai_core import StructuredPruner  # noqa: E402
from cleanai_core.io import load_pruned, save_pruned  # noqa: E402
from cleanai_core.testing import run_model  # noqa: E402

SWIN_BACKBONE = dict(
    model_type="swin",
    image_size=32,
    patch_size=4,
    embed_dim=16,
    depths=[1, 1, 1, 1],
    num_heads=[1, 2, 2, 4],
    window_size=2,
    out_features=["stage1", "stage2", "stage3", "stage4"],
)
MASK2FORMER = dict(
    backbone_config=SWIN_BACKBONE,
    hidden_dim=32,
    feature_size=32,
    mask_feature_size=32,
    encoder_feedforward_dim=48,
    dim_feedforward=48,
    encoder_layers=1,
    decoder_layers=2,
    num_attention_heads=4,
    num_queries=5,
    num_labels=4,
    common_stride=4,
    use_pretrained_backbone=False,
)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def floats(model, x) -> list[torch.Tensor]:
    return [t for t in run_model(model, (x,)) if t.is_floating_point()]


def test_a_layer_that_ran_but_no_group_cut_is_not_called_unrun_and_the_prune_falls_back(tmp_path):
    """Mask2Former (Swin backbone): its pixel decoder's first input projection reads the
    backbone's last width, which another config key sets; no group cuts that conv, so the
    from_pretrained check blamed its role with "did not run on the example inputs" -- false,
    it ran -- and that reason (kept for Mllama's image-less cross-attention layers) stopped
    the fallback that prunes widths no config can describe: the default refused the whole
    model ("nothing in this model can be pruned"). A layer the trace ran gets a true reason
    now, the fallback prunes (load_pruned reloads), and the pruned model trains."""
    torch.manual_seed(0)
    model = T.Mask2FormerForUniversalSegmentation(T.Mask2FormerConfig(**MASK2FORMER)).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 64, 64, generator=gen)
    with pytest.warns(RuntimeWarning, match="config can describe none of its prunable widths"):
        pruner = StructuredPruner(model, (x,), pruning_ratio=0.5)
    pruner.collect_activations([(torch.randn(2, 3, 64, 64, generator=gen),) for _ in range(2)], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers the example never ran (queries_embedder, level_embed)
        small = pruner.prune()
    before, after = params(model), params(small)
    assert after < 0.55 * before, (before, after)
    want, got = floats(model, x), floats(small, x)
    assert [t.shape for t in got] == [t.shape for t in want]
    small.train()
    out = small(torch.randn(2, 3, 64, 64, generator=gen))
    (out.masks_queries_logits.pow(2).mean() + out.class_queries_logits.pow(2).mean()).backward()
    small.eval()
    model.save_pretrained(tmp_path / "original")
    save_pruned(tmp_path / "out", small, pruner.history, spec=f"hf:{tmp_path / 'original'}")
    again = load_pruned(tmp_path / "out").eval()
    for a, b in zip(floats(again, x), floats(small, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


VIDEO = dict(image_size=32, patch_size=8, num_frames=2, num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
#: family -> (model class, config class, config keys, one input's shape)
DEFAULT_EXAMPLE_FAMILIES = {
    "videomae": (
        "VideoMAEForVideoClassification",
        "VideoMAEConfig",
        dict(VIDEO, intermediate_size=96, tubelet_size=2, num_labels=4),
        (2, 3, 32, 32),
    ),
    "timesformer": (
        "TimesformerForVideoClassification",
        "TimesformerConfig",
        dict(VIDEO, intermediate_size=96, num_labels=4),
        (2, 3, 32, 32),
    ),
    "vitpose": (  # the image size is the backbone's: the top config has none
        "VitPoseForPoseEstimation",
        "VitPoseConfig",
        dict(
            backbone_config=dict(
                model_type="vitpose_backbone",
                image_size=[32, 32],
                patch_size=[8, 8],
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                mlp_ratio=2,
                out_indices=[2],
            ),
            num_labels=5,
        ),
        (3, 32, 32),
    ),
}


@pytest.mark.parametrize("name", sorted(DEFAULT_EXAMPLE_FAMILIES))
def test_a_video_or_backbone_sized_model_saved_without_an_example_gets_its_hf_folder(name, tmp_path):
    """``save_pruned`` without ``example_inputs`` checks the ``hf/`` folder on an input
    built from the config, as ``cleanai explain`` traces one: a video model (VideoMAE,
    TimesFormer, ViViT, V-JEPA 2) got a (1, 3, 224, 224) image ("not enough values to
    unpack (expected 5, got 4)") and ViTPose, whose image size is its backbone's, a 224
    image ("Input image size (224*224) doesn't match model (32*32)"): no ``hf/`` folder,
    though from_pretrained rebuilds the pruned model. The example now has the config's
    frames (``(1, frames, C, H, W)``) and the backbone's image size."""
    cls, config, keys, shape = DEFAULT_EXAMPLE_FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(T, cls)(getattr(T, config)(**keys)).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, *shape, generator=gen)
    pruner = StructuredPruner(model, (x,), pruning_ratio=0.5)
    pruner.collect_activations([(torch.randn(2, *shape, generator=gen),) for _ in range(2)], progress=False)
    small = pruner.prune()
    assert params(small) < 0.9 * params(model)
    model.save_pretrained(tmp_path / "original")
    save_pruned(tmp_path / "out", small, pruner.history, spec=f"hf:{tmp_path / 'original'}")
    assert (tmp_path / "out" / "hf" / "config.json").is_file()
    again = getattr(T, cls).from_pretrained(tmp_path / "out" / "hf").eval()
    assert params(again) == params(small)
    for a, b in zip(floats(again, x), floats(small, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_cleanai_explain_traces_a_video_folder_with_its_frames(tmp_path, capsys):
    """``cleanai explain --model hf:DIR`` of a VideoMAE folder traced a (1, 3, 224, 224)
    image and failed ("not enough values to unpack"); it traces (1, frames, 3, H, W) now."""
    from cleanai_core.cli import main

    cls, config, keys, _ = DEFAULT_EXAMPLE_FAMILIES["videomae"]
    getattr(T, cls)(getattr(T, config)(**keys)).save_pretrained(tmp_path / "m")
    assert main(["explain", "--model", f"hf:{tmp_path / 'm'}"]) == 0
    assert "videomae.encoder.layer.0.intermediate.dense" in capsys.readouterr().out
