"""Verification catches what users would hit: NaN/inf outputs, slicing that is not the
masking oracle (a channel count read at run time), and it honours ``output_transform`` and
dataclass outputs (also in ``check_pruner``)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.testing import check_pruner, masked_forward


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)
        self.aux = nn.Linear(16, 3)

    def features(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3))


class DividesByWidthMinusEight(Body):
    """Finite as trained; infinite once conv2 keeps 8 channels (as a model with a
    width-dependent normaliser would be)."""

    def forward(self, x):
        y = self.features(x)
        return self.fc(y) / torch.tensor(float(y.shape[1] - 8))


class TwoHeads(Body):
    def forward(self, x):
        y = self.features(x)
        return {"out": self.fc(y), "aux": self.aux(y)}


@dataclasses.dataclass
class Output:
    logits_main: torch.Tensor
    extra: torch.Tensor


class DataclassHeads(Body):
    def forward(self, x):
        y = self.features(x)
        return Output(self.fc(y), self.aux(y))


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(n))


def _prune(model, **kw):
    pruner = StructuredPruner(model.eval(), _x(), pruning_ratio=0.5, **kw)
    pruner.collect_activations([_x(4)], progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = pruner.prune()
    return pruner, pruned, [str(w.message) for w in caught if "skipped group" in str(w.message)]


def test_non_finite_output_of_a_pruned_model_is_caught_and_its_group_skipped():
    model = DividesByWidthMinusEight()
    assert bool(torch.isfinite(model(_x())).all())
    pruner, pruned, skipped = _prune(model, ignored_layers=["fc", "aux"])
    assert len(skipped) == 1 and "conv2" in skipped[0] and "NaN or inf" in skipped[0]
    assert pruned.conv2.out_channels == 16 and pruned.conv1.out_channels == 8  # the rest is pruned
    assert bool(torch.isfinite(pruned(_x())).all())
    assert pruner.report()["skipped_groups"] == skipped


def test_non_finite_outputs_where_the_original_is_non_finite_are_not_blamed():
    model = DividesByWidthMinusEight()
    with torch.no_grad():
        model.fc.bias.fill_(float("inf"))
    _, pruned, skipped = _prune(model, ignored_layers=["fc", "aux", "conv2"])
    assert skipped == [] and pruned.conv1.out_channels == 8


def test_output_transform_that_drops_an_output_is_honoured():
    _, pruned, skipped = _prune(TwoHeads(), output_transform=lambda o: o["out"], ignored_layers=["fc"])
    assert skipped == []
    assert pruned.conv1.out_channels == 8 and pruned.conv2.out_channels == 8
    assert pruned(_x())["out"].shape == (2, 10)


def test_dataclass_outputs_are_compared_on_every_field():
    _, pruned, skipped = _prune(DataclassHeads(), ignored_layers=["fc", "aux"])
    assert skipped == [] and pruned.conv2.out_channels == 8
    out = pruned(_x())
    assert out.logits_main.shape == (2, 10) and out.extra.shape == (2, 3)


def test_check_pruner_honours_output_transform_and_dataclasses():
    two = check_pruner(TwoHeads().eval(), _x(), output_transform=lambda o: o["out"])
    assert two.output_shapes_equal and two.max_abs_diff < 1e-5 and two.pruned_units > 0
    both = check_pruner(DataclassHeads().eval(), _x())
    assert both.output_shapes_equal and both.max_abs_diff < 1e-5 and both.params_after < both.params_before


def test_every_group_that_makes_outputs_non_finite_is_skipped():
    class InfOncePruned(Body):
        def forward(self, x):
            y = self.features(x)
            return self.fc(y) * (torch.inf if y.shape[1] < 16 or self.conv1.out_channels < 16 else 1.0)

    model = InfOncePruned()
    assert bool(torch.isfinite(model(_x())).all())
    _, pruned, skipped = _prune(model, ignored_layers=["fc", "aux"])
    assert len(skipped) == 2 and all("NaN or inf" in m for m in skipped)
    assert pruned.conv1.out_channels == 16 and pruned.conv2.out_channels == 16
    assert bool(torch.isfinite(pruned(_x())).all())


class ScalesByWidth(Body):
    """A correlation scaled by ``1 / sqrt(channels)`` read at run time (torchvision RAFT):
    zeroing conv2's channels keeps the scale, slicing them changes it. Finite either way."""

    def forward(self, x):
        f = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return ((f * f.flip(-1)).sum(1) / math.sqrt(f.shape[1])).flatten(1)


def test_slicing_that_differs_from_masking_is_caught_and_its_group_skipped():
    model = ScalesByWidth().eval()
    assert check_pruner(model, _x()).max_abs_diff > 5e-3  # the oracle sees it (tolerance 1e-3)
    pruner, pruned, skipped = _prune(model, bias_compensation=False, recalibrate_bn=False)
    assert len(skipped) == 1 and "conv2" in skipped[0] and "zeroed" in skipped[0]
    assert pruned.conv2.out_channels == 16 and pruned.conv1.out_channels == 8  # the rest is pruned
    # what is left is exact: the pruned model is the original with conv1's pruned channels zeroed
    expected = masked_forward(pruner.graph, pruner.plan().pruned_units(), _x())[0]
    assert torch.allclose(pruned(_x()), expected, atol=1e-5)
    assert pruner.report()["skipped_groups"] == skipped


def test_the_default_path_with_compensation_skips_a_group_that_differs_from_masking():
    _, pruned, skipped = _prune(ScalesByWidth())
    assert len(skipped) == 1 and "conv2" in skipped[0]
    assert pruned.conv2.out_channels == 16 and pruned.conv1.out_channels == 8


@pytest.mark.corpus
def test_torchvision_raft_small_prunes_its_feature_encoder_exactly():
    """The real model behind ``ScalesByWidth``: RAFT's correlation divides by
    ``sqrt(num_channels)`` of the feature maps. The torchvision plugin keeps the trained
    width in that scale, so verification's masking comparison passes and nothing is
    skipped (about 30 s on one CPU thread)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.optical_flow.raft_small(weights=None).eval()
    g = torch.Generator().manual_seed(0)
    pair = lambda: (torch.randn(1, 3, 128, 128, generator=g), torch.randn(1, 3, 128, 128, generator=g))  # noqa: E731
    example = pair()
    pruner = StructuredPruner(model, example, pruning_ratio=0.5, forward_fn=lambda m, x: m(*x, num_flow_updates=2)[-1])
    pruner.collect_activations([(example,), (pair(),)], progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = pruner.prune()
    assert not [str(w.message) for w in caught if "skipped group" in str(w.message)]
    assert pruned.feature_encoder.conv.out_channels < 128
    assert sum(p.numel() for p in pruned.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())
    assert bool(torch.isfinite(pruned(*example, num_flow_updates=2)[-1]).all())


class ReadsItsInputWidth(nn.Module):
    """torchvision's 3-D Swin pattern: the attention reshapes ``qkv`` with ``c // heads``, ``c``
    read from its (LayerNorm-normalised) input at run time."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.norm = nn.Linear(4, 8), nn.LayerNorm(8)
        self.qkv, self.proj, self.head = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):  # (B, N, 4)
        h = self.norm(self.stem(x))
        b, n, c = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, 2, c // 2).unbind(2)
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.head(h + self.proj(a.transpose(1, 2).reshape(b, n, -1)))


def test_a_slicing_that_fails_to_run_in_the_exactness_check_is_skipped_not_raised():
    # pruning the residual stream and qkv together runs (c = 4, 12 rows), but the exactness check
    # slices the exact groups alone (the LayerNorm-normalised stream stays 8 wide, qkv 12 rows):
    # its RuntimeError escaped prune() (torchvision swin3d_t) instead of naming the groups to skip
    model, x = ReadsItsInputWidth().eval(), torch.randn(2, 5, 4)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    with pytest.warns(RuntimeWarning, match="pruning it breaks the model"):
        small = pruner.prune()
    assert any("qkv" in s and "fails to run" in s for s in pruner.skipped_groups)
    with torch.no_grad():
        assert small(x).shape == (2, 5, 3) and small(torch.randn(3, 7, 4)).shape == (3, 7, 3)
