"""torchvision segmentation and detection models through the public API: the pruned model
runs its whole forward and comes back from ``save_pruned`` / ``load_pruned`` without a
download (``benchmarks/compat_tv_tasks.py`` runs every builder)."""

from __future__ import annotations

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from cleanai_core import StructuredPruner, load_pruned  # noqa: E402
from cleanai_core.io import save_pruned  # noqa: E402
from cleanai_plugins.io.models import build_model  # noqa: E402


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture
def offline(monkeypatch):
    """Any weight download fails at once, as on a machine without network."""

    def refuse(url, *a, **k):
        raise AssertionError(f"tried to download {url}")

    from torchvision.models import _api

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(_api, "load_state_dict_from_url", refuse, raising=False)


def test_a_torchvision_segmentation_model_builds_without_its_imagenet_backbone(offline):
    # the builders default to weights_backbone=ImageNet: build_model downloaded it (a URLError
    # offline, also inside load_pruned), though --weights / model.pt replace every weight
    model = build_model("torchvision:lraspp_mobilenet_v3_large", {"num_classes": 4})
    assert model.classifier.low_classifier.out_channels == 4
    explicit = build_model("torchvision:lraspp_mobilenet_v3_large", {"model_kwargs": {"weights_backbone": None}})
    assert n_params(explicit) == 3_221_538


def test_a_pruned_segmentation_model_round_trips_offline(offline, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights_backbone=None, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, output_transform=lambda o: o["out"])
    small = pruner.prune()
    assert 0.2 < n_params(small) / n_params(model) < 0.3
    save_pruned(tmp_path / "seg", small, pruner.history, "torchvision:lraspp_mobilenet_v3_large", {"num_classes": 4})
    back = load_pruned(tmp_path / "seg")
    with torch.no_grad():
        assert torch.equal(back(x)["out"], small(x)["out"])


def test_faster_rcnn_pruned_through_its_rpn_still_runs_its_roi_heads():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights_backbone=None, num_classes=3).eval()
    x = torch.randn(2, 3, 128, 128)

    def rpn(m, x):  # the eval model returns detections whose number varies: trace the RPN
        return m.rpn.head(list(m.backbone(x).values()))

    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, forward_fn=rpn)
    assert "roi_heads read the FPN's outputs but were not traced" in pruner.graph.explain(max_groups=None)
    small = pruner.prune()
    # the FPN's outputs feed box_head.fc6 (256 x 7 x 7 inputs): they stay; they were cut to
    # 128 and the whole forward raised "mat1 and mat2 shapes cannot be multiplied"
    assert [b[0].out_channels for b in small.backbone.fpn.layer_blocks] == [256, 256]
    assert small.backbone.body["0"][0].out_channels == 8  # the MobileNet body prunes (16 -> 8)
    assert n_params(small) < n_params(model) - 3_000_000
    with torch.no_grad():
        detections = small(list(torch.rand(2, 3, 128, 128)))
    assert len(detections) == 2 and all(d["boxes"].shape[1:] == (4,) for d in detections)
