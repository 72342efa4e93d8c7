"""Session 21 model coverage: one focused check per cause fixed (tiny configs, default suite;
the real models under ``@pytest.mark.corpus``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_models_6 import n_params
from test_models_7 import replayed
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.compensation import bias_absorbers, new_bias_params
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.graph.trace import TRAINING_PASS_MAX_SIDE, _enlarged
from cleanai_core.testing import check_pruner

# -- compensation's bias on a conv before its BatchNorm goes into the norm's running mean ---------


class ConvBN(nn.Module):
    """Three bias-free convs, each read by its BatchNorm alone, then a head; ``shared``: the
    second conv's output also feeds a side branch (then its bias must stay)."""

    def __init__(self, shared: bool = False, norm: type = nn.BatchNorm2d) -> None:
        super().__init__()
        self.shared = shared
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = norm(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = norm(16)
        self.conv3 = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.bn3 = norm(24)
        self.fc = nn.Linear(24, 5)
        torch.manual_seed(0)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2, self.bn3):
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 1.5)
                if hasattr(bn, "weight"):
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.5, 0.5)
        self.eval()

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        x = torch.relu(self.bn2(y)) + (y.sigmoid() if self.shared else 0)
        x = torch.relu(self.bn3(self.conv3(x))).mean((2, 3))
        return self.fc(x)


def _batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) + 0.5 for _ in range(n)]


def _pruner(model: nn.Module, **kw) -> StructuredPruner:
    p = StructuredPruner(model, _batches(1, seed=9)[0][:2], pruning_ratio=0.5, **kw)
    p.collect_activations(_batches(), progress=False)
    return p


def test_the_bias_compensation_gives_a_conv_before_its_batchnorm_goes_into_the_norm():
    model = ConvBN()
    x = _batches(1, seed=9)[0]
    p = _pruner(model, recalibrate_bn=False, reconstruction=False)
    small = p.prune()
    # before: conv2 and conv3 (their inputs pruned) got a bias of their own, 8 + 12 parameters
    assert (small.conv2.bias, small.conv3.bias) == (None, None)
    assert p.history.meta["added_biases"] == []
    with_bias, _ = p.build(p.plan().pruned_units())  # the same pruning, the biases still on the convs
    assert with_bias.conv2.bias is not None and with_bias.conv3.bias is not None
    assert n_params(with_bias) - n_params(small) == 8 + 12
    assert not torch.equal(small.bn2.running_mean, with_bias.bn2.running_mean)
    with torch.no_grad():
        torch.testing.assert_close(small(x), with_bias(x), rtol=0, atol=1e-5)
        # a state_dict of the architecture as built loads into the replayed history (no bias to create)
        back = replayed(model, p.history)
        back.load_state_dict(small.state_dict(), strict=True)
        assert torch.equal(back.eval()(x), small(x))
    # in train mode the norm subtracts the batch mean: the bias did nothing there either
    small.train(), with_bias.train()
    with torch.no_grad():
        torch.testing.assert_close(small(x), with_bias(x), rtol=0, atol=1e-5)


def test_the_batchnorm_correction_sees_the_compensated_input_before_the_bias_moves():
    model = ConvBN()
    x = _batches(1, seed=9)[0]
    p = _pruner(model, reconstruction=False)  # recalibrate_bn on (the default path)
    small = p.prune()
    assert (small.conv2.bias, small.conv3.bias) == (None, None)
    # the same correction on the model with its biases, then each bias moved by hand
    q = _pruner(model, reconstruction=False, recalibrate_bn=False)
    ref = q.prune()
    with_bias, edits = q.build(q.plan().pruned_units())
    from cleanai_core.collect import correct_batchnorm_after

    cal = p.calibration
    keep = {e.module: e.keep for e in edits}
    correct_batchnorm_after(model, with_bias, cal.moments, keep, cal.data, None, cal.samples, cal.batch_calls)
    assert ref.conv2.bias is None
    with torch.no_grad():
        torch.testing.assert_close(small(x), with_bias(x), rtol=0, atol=1e-5)


def test_a_conv_whose_output_is_read_beside_its_norm_keeps_its_bias():
    model = ConvBN(shared=True)
    p = _pruner(model, recalibrate_bn=False, reconstruction=False)
    small = p.prune()
    assert small.conv2.bias is not None and small.conv3.bias is None  # conv2's output also feeds the sigmoid
    assert p.history.meta["added_biases"] == ["conv2"]
    graph = p.graph
    assert bias_absorbers(model, graph, {"conv1", "conv2", "conv3"}) == {"conv1": "bn1", "conv3": "bn3"}
    x = _batches(1, seed=9)[0]
    with torch.no_grad():
        back = replayed(model, p.history)
        back.load_state_dict(small.state_dict(), strict=True)
        assert torch.equal(back.eval()(x), small(x))


def test_the_target_search_counts_no_bias_that_a_norm_takes():
    model = ConvBN()
    p = _pruner(model, recalibrate_bn=False)
    units = p.plan().pruned_units()
    assert new_bias_params(model, p.graph, p.stats, units) == 0  # was 40 (conv2 16 + conv3 24)
    shared = ConvBN(shared=True)
    q = _pruner(shared, recalibrate_bn=False)
    assert new_bias_params(shared, q.graph, q.stats, q.plan().pruned_units()) == 16
    small = StructuredPruner(
        model, _batches(1, seed=9)[0][:2], target_params=0.5, recalibrate_bn=False, reconstruction=False
    )
    small.collect_activations(_batches(), progress=False)
    pruned = small.prune()
    assert pruned.conv2.bias is None and n_params(pruned) <= 0.5 * n_params(model) + 30


class ScaledByItsMean(nn.Module):
    """Not a norm, though it holds running statistics: it scales by them (no plugin claims it)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.rand(c) + 0.5)
        self.register_buffer("running_var", torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.running_mean.view(1, -1, 1, 1) + self.running_var.view(1, -1, 1, 1)


def test_a_frozen_batchnorm_traced_as_its_operations_takes_the_bias_too():
    tv = pytest.importorskip("torchvision")
    model = ConvBN(norm=tv.ops.misc.FrozenBatchNorm2d)
    x = _batches(1, seed=9)[0]
    p = _pruner(model, recalibrate_bn=False, reconstruction=False)
    small = p.prune()
    assert (small.conv2.bias, small.conv3.bias) == (None, None)  # each got a bias before
    with_bias, _ = p.build(p.plan().pruned_units())
    assert with_bias.conv2.bias is not None and n_params(with_bias) - n_params(small) == 8 + 12
    small.train(), with_bias.train()  # a frozen norm reads its statistics in train mode too
    with torch.no_grad():
        torch.testing.assert_close(small(x), with_bias(x), rtol=0, atol=1e-5)
    odd = ConvBN(norm=ScaledByItsMean)
    q = _pruner(odd, recalibrate_bn=False, reconstruction=False)
    assert bias_absorbers(odd, q.graph, {"conv2", "conv3"}) == {}  # its statistics hold no shift
    assert q.prune().conv2.bias is not None


# -- a training-only head that needs a larger image than the example (Inception-v3's aux) ---------


class AuxNeedsSize(nn.Module):
    """A stream with an auxiliary head only a training forward runs, which pools 5 x 5 at
    stride 3 and then convolves 5 x 5: it needs at least a 32 x 32 map (64 px), as
    Inception-v3's needs 299 px."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.aux = nn.Sequential(nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 5))
        self.head = nn.Linear(16, 5)
        self.eval()

    def forward(self, x):
        x = torch.relu(self.body(torch.relu(self.stem(x))))
        out = self.head(x.mean((2, 3)))
        if self.training:
            return out, self.aux(F.avg_pool2d(x, 5, stride=3)).mean((2, 3))
        return out


def test_a_training_only_head_that_needs_a_larger_image_is_traced_on_an_enlarged_one():
    model = AuxNeedsSize()
    x = torch.randn(2, 3, 16, 16)  # 8 x 8 map: the aux head fails; 2x too (16 x 16), 4x runs
    graph = DependencyGraph(model, x)
    assert graph.recording.train_from is not None  # None before: the training pass was dropped
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-6
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    assert small.aux[0].in_channels == small.body.out_channels == 8  # aux.0 kept all 16 before
    assert (n_params(model), n_params(small)) == (2151, 777)
    small.train()
    out, aux = small(torch.randn(2, 3, 64, 64))  # raised "expected input ... to have 16 channels" before
    assert out.shape == (2, 5) and aux.shape == (2, 6)
    back = replayed(model, pruner.history)
    back.load_state_dict(small.state_dict(), strict=True)
    small.eval()
    with torch.no_grad():
        assert torch.equal(back.eval()(x), small(x))


def test_inputs_are_enlarged_only_where_they_are_images_within_the_side_limit():
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    big = _enlarged((x, torch.tensor([1, 2])), 2)
    assert big[0].shape == (1, 1, 4, 4) and torch.equal(big[0][0, 0, :2, :2], torch.full((2, 2), 0.0))
    assert torch.equal(big[1], torch.tensor([1, 2]))
    assert _enlarged(torch.randn(2, 7), 2) is None  # no image
    side = TRAINING_PASS_MAX_SIDE // 2 + 1
    assert _enlarged({"pixel_values": torch.randn(1, 3, side, side)}, 2) is None


@pytest.mark.corpus
def test_inception_v3_traced_below_299_px_trains_once_pruned():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.inception_v3(num_classes=10, aux_logits=True, init_weights=False).eval()
    x = torch.randn(2, 3, 75, 75)
    p = StructuredPruner(model, x, pruning_ratio=0.5)
    p.collect_activations([torch.randn(2, 3, 75, 75) for _ in range(2)], progress=False)
    small = p.prune()
    kept = n_params(small) / n_params(model)
    assert kept < 0.26  # 0.330 before: the aux head kept its 768 input channels
    small.train()
    out = small(torch.randn(2, 3, 299, 299))
    assert [tuple(o.shape) for o in out] == [(2, 10), (2, 10)]
    small.eval()
    back = replayed(model, p.history)
    back.load_state_dict(small.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), small(x))


# -- a module that reads its state_dict version (torchvision MNASNet) --------------------------------


class Versioned(nn.Module):
    """A layer whose ``_load_from_state_dict`` refuses a state without its version, as
    torchvision's MNASNet does ("version should be set to 1 or 2 instead of None")."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be set to 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_a_recovery_keeps_the_versions_a_module_reads_when_it_loads_its_best_state():
    from torch.utils.data import TensorDataset

    from cleanai_core.recovery import recover

    torch.manual_seed(0)
    teacher = Versioned().eval()
    student = copy.deepcopy(teacher)
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,)))
    # raised "version should be set to 2 instead of None" when it loaded the best state back
    recovered, result = recover(student, teacher, data, epochs=1, lr=1e-3, progress=False)
    assert result.epochs == 1 and recovered.fc.out_features == 3


def test_mnasnet_saves_and_reloads_with_its_state_dict_versions(tmp_path):
    tv = pytest.importorskip("torchvision")
    from cleanai_core import load_pruned
    from cleanai_core.io import save_pruned

    torch.manual_seed(0)
    model = tv.models.mnasnet0_5(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    save_pruned(tmp_path / "o", small, pruner.history, "torchvision:mnasnet0_5", {"num_classes": 10})
    saved = torch.load(tmp_path / "o" / "model.pt", weights_only=True)
    assert saved._metadata[""] == {"version": 2}  # a plain torch.load + load_state_dict works too
    back = load_pruned(tmp_path / "o")  # raised "version should be set to 1 or 2 instead of None"
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    plain = {k: v for k, v in saved.items()}  # a folder written before: no versions in model.pt
    torch.save(plain, tmp_path / "o" / "model.pt")
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "o")(x), small(x))
