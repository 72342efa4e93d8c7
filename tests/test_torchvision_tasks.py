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


def _multilevel_pool_net():
    """Two feature levels pooled over boxes by ``MultiScaleRoIAlign`` (``roi_align`` per
    level, written into ``zeros(rois, C, 3, 3)`` with ``index_put_``), then a linear head."""
    from collections import OrderedDict

    from torch import nn
    from torchvision.ops import MultiScaleRoIAlign

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, padding=1)
            self.down = nn.Conv2d(6, 6, 3, stride=2, padding=1)
            self.pool = MultiScaleRoIAlign(["0", "1"], 3, 2)
            self.fc = nn.Linear(6 * 9, 4)

        def forward(self, x):
            a = torch.relu(self.stem(x))
            feats = OrderedDict([("0", a), ("1", self.down(a))])
            boxes = [torch.tensor([[0.0, 0.0, 3.0, 3.0], [1.0, 1.0, 15.0, 15.0], [2.0, 0.0, 10.0, 12.0]])] * x.shape[0]
            return self.fc(self.pool(feats, boxes, [tuple(x.shape[-2:])] * x.shape[0]).flatten(1))

    torch.manual_seed(0)
    return Net().eval()


def test_roi_align_over_feature_levels_passes_the_channels():
    from cleanai_core.graph.dependency import DependencyGraph
    from cleanai_core.testing import check_pruner

    model, x = _multilevel_pool_net(), torch.randn(2, 3, 16, 16)
    graph = DependencyGraph(model, x)
    # roi_align was an unknown op and index_put_ into the zero-filled result froze the channels
    stem = [g for g in graph.groups() if any(s.module == "stem" and s.name == "out" for s in g.slices)]
    assert [(g.size, g.prunable) for g in stem] == [(6, 6)]
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()
    assert (small.stem.out_channels, small.fc.in_features) == (3, 27)
    with torch.no_grad():
        assert small(x).shape == (6, 4)  # 3 boxes per image


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn"])
def test_an_rcnn_traced_whole_prunes_its_roi_heads_and_reloads(offline, tmp_path, name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3).eval()
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    pruner = StructuredPruner(model, (images,), "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    heads = small.roi_heads
    # the ROI heads froze the FPN's outputs and box_head.fc6's 12544 inputs (0.45 / 0.55 kept)
    assert [b[0].out_channels for b in small.backbone.fpn.layer_blocks][0] == 128
    assert heads.box_head.fc6.in_features == 128 * 7 * 7
    assert n_params(small) / n_params(model) < 0.26
    if heads.has_mask():
        assert heads.mask_head[0][0].in_channels == 128
    save_pruned(tmp_path / "d", small, pruner.history, f"torchvision:{name}", {"num_classes": 3})
    back = load_pruned(tmp_path / "d")
    with torch.no_grad():
        got, again = small(images), back(images)
    assert len(got) == 2 and all(torch.equal(a[k], b[k]) for a, b in zip(got, again, strict=True) for k in a)


def test_index_put_into_a_tensor_of_literal_width_is_left_whole_by_verification():
    """Since 2026-12-01 ``index_put_`` into a fresh tensor follows the scatters' rule
    (``fresh_destination_problem``): the graph trusts its width unless the module stores
    it; a literal is found by verification, which leaves the group whole with the reason
    (before, the graph froze it unless the module vouched, ``allow_filled_destinations``)."""
    from torch import nn

    from cleanai_core.graph.dependency import DependencyGraph

    class Rows(nn.Module):  # rows written into zeros(4, 6): 6 is a literal, it cannot follow the channels
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            out = torch.zeros(4, 6)
            out.index_put_((torch.tensor([0, 2]),), self.fc(x))
            dst = self.fc(x).clone()
            dst.index_put_((torch.tensor([1]),), self.fc(x)[:1] * 2)  # channels meet channels: coupled
            return self.head(out) + self.head(dst).sum(0)

    torch.manual_seed(0)
    model, x = Rows().eval(), torch.randn(2, 3)
    fc = [g for g in DependencyGraph(model, x).groups() if any(s.module == "fc" and s.name == "out" for s in g.slices)]
    assert [(g.size, g.prunable) for g in fc] == [(6, 6)]
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert n_params(small) == n_params(model) == 38 and len(pruner.skipped_groups) == 1
    assert "pruning it breaks the model" in pruner.skipped_groups[0] and "shape mismatch" in pruner.skipped_groups[0]
    with torch.no_grad():
        assert torch.equal(small(x), model(x))


def test_raft_large_context_split_follows_the_pruned_hidden_state():
    from cleanai_core.testing import check_pruner

    torch.manual_seed(0)
    model = torchvision.models.optical_flow.raft_large(weights=None).eval()
    x = (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))

    def flow(m, x):
        return m(*x, num_flow_updates=2)[-1]

    # the context encoder's equal halves (hidden state, context) prune; the stored
    # hidden_state_size stayed 128 and the forward raised "should have strictly more than
    # hidden_state=128 channels"
    report = check_pruner(model, x, forward_fn=flow)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-4
    small = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, forward_fn=flow).prune()
    assert small.update_block.hidden_state_size == small.update_block.recurrent_block.hidden_size == 64
    assert n_params(small) / n_params(model) < 0.3
    with torch.no_grad():
        assert small(*x, num_flow_updates=2)[-1].shape == (1, 2, 128, 128)
