"""Session 22 model coverage (models13): wrappers and feature extractors on the default path
(timm ``features_only`` nets, torchvision feature extractors and detection backbones); one
focused check per cause fixed (tiny models, default suite; real models under
``@pytest.mark.corpus``)."""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from test_models_6 import n_params
from torch import nn

from cleanai_core import StructuredPruner, hookimpl, load_pruned
from cleanai_core.errors import UserError
from cleanai_core.io import save_pruned
from cleanai_core.model_state import user_hooks
from cleanai_core.testing import check_pruner, temporary_plugin

# -- features taken by forward hooks a helper object of the model holds (timm FeatureHooks) ----------


class Collector:
    """What timm's ``FeatureHooks`` is: an object held by the model whose bound method,
    wrapped in ``functools.partial``, is registered as a forward hook on plain torch layers
    and stores their outputs for the model's ``forward`` to return."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.outputs: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.handles = [m.register_forward_hook(partial(self._keep, name)) for name, m in modules.items()]

    def _keep(self, name: str, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.outputs[name] = out

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = list(self.outputs.values()), OrderedDict()
        return out


class HookedFeatures(nn.Module):
    """A ``features_only`` net of the hook kind (timm xception41, nasnet, pnasnet,
    EfficientNet ``feature_location='expansion'``): the forward returns what the hooks on
    two ``nn.ReLU`` layers collected, and the last layer's output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(16, 12, 1), nn.ReLU(), nn.Conv2d(12, 6, 1),
        )  # fmt: skip
        self.hooks = Collector({"low": self.body[1], "mid": self.body[3]})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.body(x)
        return [*self.hooks.take(), y]


def test_features_collected_by_the_models_own_partial_hooks_come_out_of_the_pruned_copy():
    model = HookedFeatures().eval()
    x = torch.randn(2, 3, 8, 8)
    assert user_hooks(model) == []  # the helper's hooks were "the user's", dropped from every copy
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5  # inf before: the pruned copy gave [y] only
    p = StructuredPruner(model, x, pruning_ratio=0.5)
    p.collect_activations([torch.randn(2, 3, 8, 8) for _ in range(2)], progress=False)
    small = p.prune()
    assert [tuple(t.shape) for t in small(x)] == [(2, 8, 8, 8), (2, 16, 4, 4), (2, 6, 4, 4)]
    # the hooked features are outputs and stay whole; 6 of the 12 inner channels go (weights, biases, inputs)
    assert n_params(small) == n_params(model) - 6 * 16 - 6 - 6 * 6
    assert small.hooks is not model.hooks and model.hooks.outputs == OrderedDict()  # the copy fills its own


def test_features_collected_by_the_models_own_hooks_come_out_of_a_model_pruned_in_place():
    model = HookedFeatures().eval()
    x = torch.randn(2, 3, 8, 8)
    collector = model.hooks
    p = StructuredPruner(model, x, pruning_ratio=0.5, inplace=True)
    p.collect_activations([torch.randn(2, 3, 8, 8) for _ in range(2)], progress=False)
    small = p.prune()
    # the model's modules keep their hook tables, whose hooks fill this collector: the copy's replaced it and the
    # forward read an empty one ([y] alone, also before the hooks counted as the model's)
    assert small is model and model.hooks is collector
    assert [tuple(t.shape) for t in small(x)] == [(2, 8, 8, 8), (2, 16, 4, 4), (2, 6, 4, 4)]


# -- widths that fx tracing wrote into a GraphModule's code (create_feature_extractor, feature_cls='fx') --


class ChannelsNorm(nn.LayerNorm):
    """torchvision ConvNeXt's ``LayerNorm2d``: outside ``torch.nn``, so fx traces through its
    forward and writes ``self.normalized_shape`` into the code as a literal."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class NormedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = ChannelsNorm(16)
        self.conv = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(self.norm(self.stem(x)))).mean((2, 3)))


def traced_norm_net() -> nn.Module:
    """The factory a saved folder rebuilds from (``test_models_13:traced_norm_net``)."""
    torch.manual_seed(0)
    return torch.fx.symbolic_trace(NormedNet()).eval()


def test_a_norm_width_fx_wrote_into_the_code_follows_the_slicing(tmp_path):
    model = traced_norm_net()
    assert "(16,)" in model.code  # the literal
    x = torch.randn(2, 3, 8, 8)
    p = StructuredPruner(model, x, pruning_ratio=0.5)
    p.collect_activations([torch.randn(2, 3, 8, 8) for _ in range(2)], progress=False)
    small = p.prune()
    assert p.skipped_groups == []  # the stem / norm group "broke the model" and stayed whole before
    assert small.norm.weight.shape == (8,) and "(8,)" in small.code and "(16,)" in model.code
    # half the stem's filters (27 + a bias each), the norm's weights and biases and conv's columns (8 rows); then
    # half of conv's rows (8 + a bias each) and the head's columns
    assert n_params(small) == n_params(model) - (8 * 28 + 16 + 8 * 8) - 4 * 9 - 4 * 5
    assert small(x).shape == (2, 5)
    save_pruned(tmp_path / "o", small, p.history, "test_models_13:traced_norm_net")
    back = load_pruned(tmp_path / "o", trust_code=True)  # the replay rewrites the literal too
    torch.testing.assert_close(back(x), small(x), rtol=0, atol=0)


# -- observers of a model prepared for quantization (torch.ao.quantization prepare / prepare_fx) ------


class Quantizable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.shortcut = nn.Conv2d(3, 16, 1)
        self.skip = torch.ao.nn.quantized.FloatFunctional()  # calls its observer itself, as a submodule
        self.conv2 = nn.Conv2d(16, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.skip.add(self.relu(self.conv1(x)), self.shortcut(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.dequant(self.fc(x.flatten(1)))


def _prepared(kind: str) -> nn.Module:
    from torch.ao import quantization as tq

    torch.manual_seed(0)
    model = Quantizable().eval()
    x = torch.randn(2, 3, 8, 8)
    if kind == "fx":
        from torch.ao.quantization.quantize_fx import prepare_fx

        model = prepare_fx(model, tq.get_default_qconfig_mapping("x86"), (x,))
    else:
        model.qconfig = tq.get_default_qconfig("x86")
        tq.prepare(model, inplace=True)
    model(x)  # observed once
    return model


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("kind", ["eager", "fx"])
def test_a_model_prepared_for_quantization_prunes_through_its_observers_and_converts(kind):
    from torch.ao import quantization as tq
    from torch.ao.quantization.quantize_fx import convert_fx

    model = _prepared(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    report = check_pruner(model, x, ratio=0.5)  # "nothing in this model can be pruned" before (the histograms)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-5 and report.kept_whole == ()
    p = StructuredPruner(model, x, pruning_ratio=0.5)
    p.collect_activations([torch.randn(2, 3, 8, 8) for _ in range(2)], progress=False)
    small = p.prune()
    # 8 of conv1's filters (27 + a bias each), of the shortcut's (3 + 1) and of conv2's columns; 4 of conv2's rows
    # (8 + a bias) and fc's columns
    assert n_params(small) == n_params(model) - 8 * 28 - 8 * 4 - 8 * 8 - 4 * 9 - 4 * 5
    state = model.state_dict()  # the user's observers saw none of the calibration
    assert state.keys() == before.keys() and all(torch.equal(before[k], state[k]) for k in before)
    small(x)  # observes the pruned widths
    quantized = convert_fx(small) if kind == "fx" else tq.convert(small)
    assert quantized(x).shape == (2, 5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("kind", ["convert", "quantize_dynamic"])
def test_a_quantized_model_is_refused_with_the_layers_and_the_order_that_works(kind):
    from torch.ao import quantization as tq

    if kind == "convert":
        model = tq.convert(_prepared("eager"))
        layers = "conv1, shortcut, conv2 ..."
    else:
        torch.manual_seed(0)
        float_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        model, layers = tq.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8), "0, 2"
    x = torch.randn(2, 3, 8, 8) if kind == "convert" else torch.randn(2, 4)
    # said only "nothing in this model can be pruned ... or ignore fewer layers"
    with pytest.raises(
        UserError, match=rf"quantized weights \({layers}\), which cannot be sliced: prune the float model"
    ):
        StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)


# -- a buffer the forward sizes by the input (timm ConViT's rel_indices) -------------------------------


class PositionCache(nn.Module):
    """timm ConViT's ``GPSA``: a non-persistent ``(1, 1)`` placeholder the forward replaces
    with a table sized by the input the first time it sees that size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.register_buffer("positions", torch.zeros(1, 1), persistent=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1] * x.shape[-2]
        if self.positions.shape[-1] != n:
            self.positions = torch.linspace(0, 1, n).unsqueeze(0)
        return self.head((self.conv(x).flatten(2) * self.positions).mean(2))


class ToyLoader:
    """Builds the toy models of this file from ``toy:<name>`` specs."""

    @hookimpl
    def cleanai_load_model(self, spec, options):
        build = {"toy:position_cache": PositionCache, "toy:resizable_table": ResizableTable}.get(spec)
        return build() if build is not None else None


def test_a_buffer_the_forward_sizes_by_the_input_does_not_stop_the_save(tmp_path):
    torch.manual_seed(0)
    model, x = PositionCache().eval(), torch.randn(2, 3, 4, 4)
    model(x)  # the placeholder is (1, 16) now, as in every model that ran before it was pruned
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    with temporary_plugin(ToyLoader(), name="toy"):
        # refused before: "positions (1, 16) vs model (1, 1) (a buffer outside the state_dict)"
        save_pruned(tmp_path / "p", small, pruner.history, "toy:position_cache")
        back = load_pruned(tmp_path / "p")
    assert back.positions.shape == (1, 1) and back.conv.out_channels == 4
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


class ResizableTable(nn.Module):
    """timm's ``set_input_size``: a method other than the forward re-sizes a window table;
    a model saved without the size that built it must still be refused."""

    def __init__(self, window: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.register_buffer("index", torch.arange(16), persistent=False)
        self.set_window(window)
        self.head = nn.Linear(8, 3)

    def set_window(self, window: int) -> None:
        self.index = torch.arange(window * window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).flatten(2)[..., self.index].mean(2))


def test_a_table_resized_outside_the_forward_still_stops_the_save(tmp_path):
    torch.manual_seed(0)
    model, x = ResizableTable(window=2).eval(), torch.randn(2, 3, 2, 2)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, ignored_layers=[model.head])
    small = pruner.prune()
    with temporary_plugin(ToyLoader(), name="toy"):
        with pytest.raises(UserError, match=r"index \(4,\) vs model \(16,\) \(a buffer outside the state_dict\)"):
            save_pruned(tmp_path / "t", small, pruner.history, "toy:resizable_table")
    assert not (tmp_path / "t").exists()


@pytest.mark.corpus
def test_convit_saves_and_reloads_after_it_ran(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "features_only": True}
    model, x = timm.create_model("convit_tiny", pretrained=False, **kwargs).eval(), torch.randn(2, 3, 32, 32)
    model(x)
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5)
    small = pruner.prune()
    save_pruned(tmp_path / "c", small, pruner.history, "timm:convit_tiny", {"model_kwargs": kwargs})
    back = load_pruned(tmp_path / "c", trust_code=True)
    with torch.no_grad():
        for a, b in zip(back(x), small(x), strict=True):
            assert torch.equal(a, b)


# -- the real models (slow) ---------------------------------------------------------------------------


def _default_path(model: nn.Module, x: torch.Tensor) -> tuple[StructuredPruner, nn.Module]:
    g = torch.Generator().manual_seed(1)
    p = StructuredPruner(model, x, pruning_ratio=0.5)
    p.collect_activations([torch.randn(x.shape, generator=g) for _ in range(2)], progress=False)
    return p, p.prune()


@pytest.mark.corpus
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("xception41", {}), ("efficientnet_b0", {"feature_location": "expansion"})],
    ids=["xception41", "efficientnet_b0_expansion"],
)
def test_timm_hook_feature_nets_return_their_features_once_pruned(tmp_path, name, kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kwargs = {"features_only": True, **kwargs}
    model, x = timm.create_model(name, pretrained=False, **kwargs).eval(), torch.randn(2, 3, 64, 64)
    want = [t.shape for t in model(x)]
    p, small = _default_path(model, x)
    assert [t.shape for t in small(x)] == want  # [] (efficientnet) or the last map alone (xception41) before
    assert n_params(small) < 0.4 * n_params(model)
    save_pruned(tmp_path / "f", small, p.history, f"timm:{name}", {"model_kwargs": kwargs})
    back = load_pruned(tmp_path / "f", trust_code=True)
    with torch.no_grad():
        for a, b in zip(back(x), small(x), strict=True):
            assert torch.equal(a, b)


@pytest.mark.corpus
def test_torchvision_convnext_feature_extractor_prunes_its_streams():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    net = torchvision.models.convnext_tiny(num_classes=10)
    model = create_feature_extractor(net, {"features.3": "f3", "classifier": "out"}).eval()
    x = torch.randn(2, 3, 64, 64)
    p, small = _default_path(model, x)
    assert p.skipped_groups == []  # three streams "broke the model" before (0.535 kept)
    assert n_params(small) < 0.3 * n_params(model)
    assert {k: v.shape for k, v in small(x).items()} == {"f3": (2, 192, 8, 8), "out": (2, 10)}


@pytest.mark.corpus
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_torchvision_quantizable_resnet18_prepared_for_calibration_prunes_and_converts():
    torchvision = pytest.importorskip("torchvision")
    from torch.ao import quantization as tq

    torch.manual_seed(0)
    model = torchvision.models.quantization.resnet18(num_classes=10, quantize=False).eval()
    model.fuse_model()
    model.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(model, inplace=True)
    x = torch.randn(2, 3, 64, 64)
    model(x)
    _, small = _default_path(model, x)  # "nothing in this model can be pruned" before
    assert n_params(small) < 0.26 * n_params(model)
    small(x)
    assert tq.convert(small)(x).shape == (2, 10)


# -- a gradient criterion on a model that returns features (FPN backbones, feature nets) -----------------


class PyramidOut(nn.Module):
    """An FPN backbone's output: an ``OrderedDict`` of maps."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        a = torch.relu(self.c2(torch.relu(self.c1(x))))
        return OrderedDict([("0", a), ("1", self.c3(a))])


@pytest.mark.parametrize("importance", ["taylor", "hessian"])
def test_a_gradient_criterion_on_a_model_returning_features_names_the_output_and_the_fix(importance):
    torch.manual_seed(0)
    model, x = PyramidOut().eval(), torch.randn(2, 3, 8, 8)
    data = [(x, torch.tensor([0, 1]))]
    p = StructuredPruner(model, x, importance, pruning_ratio=0.5)
    # AttributeError: 'collections.OrderedDict' object has no attribute 'dim' before
    with pytest.raises(UserError, match=r"model returns an OrderedDict with keys '0', '1'\); pass output_transform"):
        p.collect_activations(data, progress=False)
    p = StructuredPruner(model, x, importance, pruning_ratio=0.5, output_transform=lambda out: out["1"].mean((2, 3)))
    p.collect_activations(data, progress=False)
    small = p.prune()
    # what the transform computes is traced: the pooled map's channels are the output's (c3 "broke the model" and
    # was skipped by the verification before)
    assert p.skipped_groups == [] and small.c1.out_channels == 4 and small.c3.out_channels == 8
