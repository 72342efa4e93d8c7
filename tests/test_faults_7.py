"""Seventh round of bad input and edge cases (docs/reliability.md, "Session 17: bad
inputs"): layers CleanAI cannot trace or copy (scripted, lazy, ``torch.nn.utils.prune``
masks), forwards that add layers or buffers, models built on the meta device, data items as
NumPy arrays, PIL images or of mixed float dtypes, and ``cleanai sensitivity --dry-run``."""

from __future__ import annotations

import collections
import hashlib
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from test_faults_4 import DEMO, ws  # noqa: F401 - ws: a fixture, asked for by name
from test_faults_5 import _net
from torch import nn

from cleanai_core import DependencyGraph, GradualPruner, PruningSchedule, StructuredPruner, load_pruned
from cleanai_core.cli import main
from cleanai_core.errors import TraceError, UserError
from cleanai_core.io import save_pruned
from cleanai_core.sensitivity import _fidelity
from cleanai_core.testing import check_pruner
from cleanai_plugins.io.demo import DigitsCNN

X = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))


_cnn = _net  # the seeded small CNN of the session-5 faults


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _pruned(model: nn.Module, x: torch.Tensor = X) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune()


def _three_doors(model: nn.Module):
    """The public doors a model goes through: the pruner, the graph, gradual pruning."""
    opt = torch.optim.SGD([p for p in model.parameters() if not nn.parameter.is_lazy(p)] or [nn.Parameter(X)], lr=0.1)
    return [
        lambda: StructuredPruner(model, X, "magnitude", pruning_ratio=0.5),
        lambda: DependencyGraph(model, X),
        lambda: GradualPruner(model, X, opt, PruningSchedule(final=0.5, steps=2), importance="magnitude"),
    ]


# -- layers CleanAI cannot trace or copy: named, before anything runs ------------------------------------


class ScriptedInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script is deprecated
            self.conv = torch.jit.script(nn.Conv2d(3, 8, 3))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_a_scripted_layer_inside_the_model_is_named_with_the_fix():
    # AttributeError: '_CachedForward' object has no attribute '__getattr__' (from the timm plugin's scan)
    model = ScriptedInside().eval()
    state = _state(model)
    for door in _three_doors(model):
        with pytest.raises(UserError, match=r"module 'conv' \(RecursiveScriptModule\) is a TorchScript module .*"
                           r"inside the model.*script the pruned model"):  # fmt: skip
            door()
    assert _same(model, state)


class LazyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.LazyConv2d(8, 3, padding=1)
        self.fc = nn.LazyLinear(4)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def test_a_lazy_layer_not_yet_initialised_is_named_and_prunes_once_run():
    # ValueError: Attempted to use an uninitialized parameter in <method 'numel' ...> (a traceback)
    torch.manual_seed(0)
    model = LazyNet().eval()
    for door in _three_doors(model):
        with pytest.raises(UserError, match=r"module 'conv' \(LazyConv2d\) has a parameter that is not initialised "
                           r"yet \('weight'.*Run the model once on a batch"):  # fmt: skip
            door()
    assert nn.parameter.is_lazy(model.conv.weight)  # nothing initialised it behind the user's back
    model(X)  # the fix the message gives
    pruner = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5)
    pruner.prune()
    with pytest.raises(UserError, match=r"module 'conv' \(LazyConv2d\) has a parameter that is not initialised"):
        pruner.history.replay(LazyNet())  # "RuntimeError: Can't access the shape of an uninitialized parameter"
    assert type(model.conv) is nn.Conv2d and _params(_pruned(model)) == 4 * 27 + 4 + 4 * 4 + 4
    assert check_pruner(model, X).max_abs_diff < 1e-6


def lazy_factory() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))


def test_explain_gives_a_lazy_factorys_layers_their_shapes_from_the_example(capsys):
    # the check above refused it with "run the model once on a batch", which a --model spec's user cannot do
    assert main(["explain", "--model", f"{__name__}:lazy_factory", "--input-shape", "1,1,8,8"]) == 0
    assert re.search(r"group \d+: 8 units \(8 prunable\) -> 0:out\(out\), 3:in\(in\)", capsys.readouterr().out)
    assert main(["explain", "--model", f"{__name__}:lazy_factory", "--input-shape", "1,1,2,2"]) == 2
    err = capsys.readouterr().err
    assert "with lazy layers" in err and "Kernel size can't be greater" in err and "--input-shape 1,1,2,2" in err


def test_a_model_with_lazy_layers_saves_and_loads_through_its_recorded_input_shape(tmp_path):
    # load_pruned: "RuntimeError: Can't access the shape of an uninitialized parameter" replaying the history
    torch.manual_seed(0)
    model = LazyNet().eval()
    model(X)
    pruner = StructuredPruner(model, X, "magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    spec = f"{__name__}:LazyNet"
    with pytest.raises(UserError, match=r"has lazy layers \('conv', LazyConv2d\).*give example_input_shape=.*"
                       r"Nothing was written"):  # fmt: skip
        save_pruned(tmp_path / "none", pruned, pruner.history, spec)
    assert not (tmp_path / "none").exists()
    save_pruned(tmp_path / "shaped", pruned, pruner.history, spec, example_input_shape=[2, 3, 8, 8])
    back = load_pruned(tmp_path / "shaped", trust_code=True)
    assert type(back.conv) is nn.Conv2d and back.conv.weight.shape == (4, 3, 3, 3)
    assert torch.equal(back(X), pruned(X))


def test_the_command_lines_folder_of_a_lazy_factory_loads(ws, capsys):  # noqa: F811
    rc = main(["prune", "--model", f"{__name__}:lazy_factory", "--data", "data.pt", "--out", "o", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    back = load_pruned(ws / "o", trust_code=True)
    saved = torch.load(ws / "o" / "model.pt", weights_only=True)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in saved.items()) and back(_samples()[0]).shape == (16, 10)
    assert saved["0.weight"].shape[0] < 8


def _masked() -> nn.Sequential:
    model = _cnn()
    torch_prune.l1_unstructured(model[3], "weight", amount=0.3)
    return model


def test_a_torch_prune_mask_is_named_and_prunes_once_made_permanent():
    # RuntimeError: Only Tensors created explicitly by the user (graph leaves) support the deepcopy protocol
    model = _masked()
    state = _state(model)
    for door in _three_doors(model):
        mask = r"has a torch.nn.utils.prune mask on 'weight' \(weight_orig, weight_mask\)"
        with pytest.raises(UserError, match=rf"module '3' \(Conv2d\) {mask}.*prune.remove\(module, 'weight'\)"):
            door()
    assert _same(model, state) and hasattr(model[3], "weight_mask")
    zeros = int((model[3].weight == 0).sum())
    torch_prune.remove(model[3], "weight")
    assert int((model[3].weight == 0).sum()) == zeros > 0
    assert _params(_pruned(model)) == 4 * 27 + 4 + 4 * 2 + 4 * 36 + 4 + 4 * 4 + 4
    assert check_pruner(model, X).max_abs_diff < 1e-6


def test_save_pruned_of_a_model_with_a_pruning_mask_names_it_and_writes_nothing(tmp_path):
    # "the history's step 0 slices 3.weight, which this model does not have" (it has weight_orig)
    pruner = StructuredPruner(_cnn(), X, "magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    torch_prune.l1_unstructured(pruned[3], "weight", amount=0.5)
    with pytest.raises(UserError, match=r"module '3' \(Conv2d\) has a torch.nn.utils.prune mask on 'weight'"):
        save_pruned(tmp_path / "o", pruned, pruner.history, f"{__name__}:_cnn")
    assert not (tmp_path / "o").exists()
    torch_prune.remove(pruned[3], "weight")
    save_pruned(tmp_path / "o", pruned, pruner.history, f"{__name__}:_cnn")
    assert torch.equal(load_pruned(tmp_path / "o", trust_code=True)(X), pruned(X))


def test_recover_names_a_scripted_or_lazy_model_and_trains_through_a_pruning_mask():
    # "ValueError: can't optimize a non-leaf Tensor" / "Attempted to use an uninitialized parameter"
    from torch.utils.data import TensorDataset

    from cleanai_core import recover

    data = TensorDataset(X.repeat(6, 1, 1, 1), torch.tensor([0, 1] * 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(_cnn())
    with pytest.raises(UserError, match=r"the pruned model is a TorchScript module .*then script the pruned one"):
        recover(scripted, None, data, epochs=1)
    with pytest.raises(UserError, match=r"module 'conv' \(LazyConv2d\) has a parameter that is not initialised"):
        recover(_cnn(), LazyNet(), data, epochs=1)
    student = _masked()
    mask = student[3].weight_mask.clone()
    trained, _ = recover(student, None, data, epochs=1)
    assert torch.equal(trained[3].weight_mask, mask) and bool((trained[3].weight[mask == 0] == 0).all())


# -- a forward that adds layers or buffers: the user's model keeps its own ---------------------------------


class GrowsInForward(nn.Module):
    """A rotary-style cache registered on the first call, and a head built on it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = _cnn()

    def forward(self, x):
        if "cache" not in self._buffers:
            self.register_buffer("cache", torch.arange(4.0), persistent=False)
            self.head = nn.Identity()
        return self.head(self.body(x) + self.cache)


def test_layers_and_buffers_a_forward_adds_are_not_left_in_the_users_model():
    # the head and the cache the trace's forward registered stayed in the user's model
    model = GrowsInForward().eval()
    state, names = _state(model), [n for n, _ in model.named_modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = StructuredPruner(model, X, "weight_activation", pruning_ratio=0.5)
        pruner.collect_activations([X, X])
        pruned = pruner.prune()
    assert [n for n, _ in model.named_modules()] == names and "cache" not in model._buffers
    assert _same(model, state)
    assert pruned(X).shape == (2, 4) and _params(pruned) < _params(model)


# -- models on the meta device from the command line ---------------------------------------------------


def meta_digits() -> nn.Module:
    with torch.device("meta"):
        return DigitsCNN()


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_model_factory_on_the_meta_device_exits_2_naming_it(ws, capsys):  # noqa: F811
    # NotImplementedError: Cannot copy out of meta tensor (exit 1); explain blamed --input-shape
    before = _hashes(ws)
    rc = main(["prune", "--model", f"{__name__}:meta_digits", "--data", "data.pt", "--out", "o", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(r"gave a model whose tensors are on the meta device \(e.g. 'features.0.weight'", err)
    assert "--weights FILE" in err and not (ws / "o").exists() and _hashes(ws) == before
    assert main(["explain", "--model", f"{__name__}:meta_digits", "--input-shape", "1,1,8,8"]) == 2
    assert "on the meta device" in capsys.readouterr().err


def test_a_meta_model_factory_with_weights_prunes_like_the_real_one(ws, capsys):  # noqa: F811
    # copying the weights into meta tensors was a no-op (a warning per tensor), then the run failed
    torch.manual_seed(1)
    torch.save(DigitsCNN().state_dict(), ws / "w.pt")
    args = ["--data", "data.pt", "--weights", "w.pt", "--quiet", "--ratio", "0.5"]
    assert main(["prune", "--model", DEMO, *args, "--out", "real"]) == 0, capsys.readouterr().err
    assert main(["prune", "--model", f"{__name__}:meta_digits", *args, "--out", "meta"]) == 0, capsys.readouterr().err
    real, meta = (torch.load(ws / d / "model.pt", weights_only=True) for d in ("real", "meta"))
    assert real.keys() == meta.keys() and all(torch.equal(real[k], meta[k]) for k in real)


# -- data items: NumPy arrays, mixed float dtypes, namedtuples, PIL images --------------------------------


def _samples():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    return x, y


def numpy_items():
    x, y = _samples()
    return [(x[i].numpy(), y[i].numpy()) for i in range(16)]  # float32 arrays and NumPy int64 labels


def float64_numpy_items():
    x, y = _samples()
    return [(x[i].double().numpy(), int(y[i])) for i in range(16)]


def mixed_dtype_items():
    x, y = _samples()
    return [(x[i].double() if i % 2 else x[i], int(y[i])) for i in range(16)]


Sample = collections.namedtuple("Sample", "image label")


def namedtuple_items():
    x, y = _samples()
    return [Sample(x[i], int(y[i])) for i in range(16)]


def half_digits() -> nn.Module:
    torch.manual_seed(0)
    return DigitsCNN().half().eval()


def pil_items():
    image = pytest.importorskip("PIL.Image")
    x, y = _samples()
    return [(image.fromarray((x[i, 0] * 255).to(torch.uint8).numpy()), int(y[i])) for i in range(16)]


def _run(folder: Path, model: str, data: str, out: str) -> tuple[int, dict[str, torch.Tensor] | None]:
    rc = main(["prune", "--model", model, "--data", data, "--out", out, "--quiet", "--ratio", "0.5"])
    return rc, (torch.load(folder / out / "model.pt", weights_only=True) if rc == 0 else None)


@pytest.mark.parametrize("items", ["numpy_items", "float64_numpy_items", "mixed_dtype_items", "namedtuple_items"])
def test_data_items_as_arrays_or_of_mixed_dtypes_prune_like_the_same_tensors(ws, capsys, items):  # noqa: F811
    # arrays: "data items must be tensors or (input, label) pairs; got ndarray"; float64 and float32 items
    # in one data set: "the model failed on the held-out part ... expected scalar type Double but found Float"
    x, y = _samples()
    torch.save((x, y), ws / "same.pt")
    rc, want = _run(ws, DEMO, "same.pt", "want")
    assert rc == 0, capsys.readouterr().err
    rc, got = _run(ws, DEMO, f"{__name__}:{items}", "got")
    assert rc == 0, capsys.readouterr().err
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    report = json.loads((ws / "got" / "report.json").read_text())
    assert report["accuracy_before"] == json.loads((ws / "want" / "report.json").read_text())["accuracy_before"]


def test_namedtuple_items_for_a_half_precision_model_prune(ws, capsys):  # noqa: F811
    # TypeError: Sample.__new__() missing 1 required positional argument: 'label' (items cast to float16)
    rc, got = _run(ws, f"{__name__}:half_digits", f"{__name__}:namedtuple_items", "o")
    assert rc == 0, capsys.readouterr().err
    assert got["features.0.weight"].dtype == torch.float16 and got["features.0.weight"].shape[0] == 16


def test_pil_image_items_are_named_with_the_transform_to_add(ws, capsys):  # noqa: F811
    pytest.importorskip("PIL.Image")
    before = _hashes(ws)
    rc, _ = _run(ws, DEMO, f"{__name__}:pil_items", "o")
    err = capsys.readouterr().err
    assert rc == 2 and "got a PIL image (Image)" in err and "transforms.ToTensor()" in err
    assert not (ws / "o").exists() and _hashes(ws) == before


# -- example inputs of another dtype than the model's --------------------------------------------------


@pytest.mark.parametrize(
    ("model_dtype", "input_dtype"), [(torch.float32, torch.float64), (torch.float64, torch.float32)]
)
def test_example_inputs_of_another_float_dtype_name_both_dtypes(model_dtype, input_dtype):
    # said only "Input type (double) and bias type (float) should be the same"
    model = _cnn().to(model_dtype)
    state = _state(model)
    with pytest.raises(TraceError, match=rf"example_inputs are {input_dtype} but the model's parameters are "
                       rf"{model_dtype}: give them in the model's dtype \(x.to\({model_dtype}\)\)"):  # fmt: skip
        StructuredPruner(model, X.to(input_dtype), "magnitude", pruning_ratio=0.5)
    assert _same(model, state)


# -- cleanai sensitivity --dry-run ---------------------------------------------------------------------------


def test_sensitivity_dry_run_prints_the_table_and_writes_nothing(ws, capsys):  # noqa: F811
    # it wrote --out without the lock and the checks; an existing folder was refused as "changed at the moment
    # the result was to replace it"
    (ws / "taken").mkdir()
    (ws / "taken" / "mine.txt").write_text("keep")
    before = _hashes(ws)
    for out in ("fresh", "taken"):
        args = ["--data", "data.pt", "--out", out, "--quiet", "--dry-run", "--sensitivity-ratios", "0.5"]
        assert main(["sensitivity", "--model", DEMO, *args]) == 0
        printed = capsys.readouterr().out
        assert re.search(r"features\.0 \(32 units\): KL 0: 0, 0\.5: ", printed) and "wrote" not in printed
    assert not (ws / "fresh").exists() and [p.name for p in (ws / "taken").iterdir()] == ["mine.txt"]
    assert _hashes(ws) == before and not list(ws.glob(".fresh*")) and not list(ws.glob(".taken*"))


def test_sensitivity_kl_of_nearly_equal_outputs_is_never_negative():
    # rounding gave -2.22e-08 in the printed table for a group whose pruning changed nothing
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(256, 10, generator=g) * 8
    out = ref + torch.randn(256, 10, generator=g) * 1e-6
    kl = _fidelity(ref, out)
    assert kl.shape == (256,) and bool((kl >= 0).all()) and float(kl.max()) < 1e-6
    assert torch.equal(_fidelity(ref, ref), torch.zeros(256))


# -- image folders: a one-channel model, a huge --image-size ------------------------------------------------


def gray_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()


def rgb_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()


@pytest.fixture()
def images(ws):  # noqa: F811
    image = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(0)
    for k, cls in enumerate("ab"):
        (ws / "imgs" / cls).mkdir(parents=True)
        for i, mode in enumerate(("L", "RGB", "RGBA", "P")):
            pixels = (torch.rand(12, 12, 3, generator=g) * 255).to(torch.uint8).numpy()
            image.fromarray(pixels).convert(mode).save(ws / "imgs" / cls / f"{k}{i}.png")
    return ws


@pytest.mark.parametrize(("factory", "channels"), [("gray_cnn", 1), ("rgb_cnn", 3)])
def test_an_image_folder_is_read_with_the_channels_of_the_models_stem(images, capsys, factory, channels):
    # every image was made RGB: a one-channel model failed with "expected input[1, 3, 224, 224] to have 1 channels"
    from cleanai_plugins.io.datasets import _load_image_folder

    data = _load_image_folder(images / "imgs", {"model": globals()[factory](), "image_size": 8})
    assert [tuple(data[i][0].shape) for i in range(len(data))] == [(channels, 8, 8)] * 8
    gray = data[0][0]  # an "L" image: one channel of the pixels, normalised by ImageNet's channel average
    assert channels == 3 or abs(float(gray.mean()) * 0.226 + 0.449 - 0.5) < 0.15
    args = ["--data", "imgs", "--image-size", "8", "--out", "o", "--quiet", "--ratio", "0.5"]
    assert main(["prune", "--model", f"{__name__}:{factory}", *args]) == 0, capsys.readouterr().err
    assert torch.load(images / "o" / "model.pt", weights_only=True)["0.weight"].shape == (4, channels, 3, 3)


def test_an_image_size_beyond_8192_is_refused_before_anything_is_read(images, capsys):
    # --image-size 100000: one image is 120 GB as float32; the out-of-memory killer ended the run (exit 137)
    before = _hashes(images)
    args = ["--data", "imgs", "--image-size", "100000", "--out", "o", "--quiet"]
    assert main(["prune", "--model", f"{__name__}:rgb_cnn", *args]) == 2
    assert "--image-size=100000 is out of range: it must be in [1, 8192]" in capsys.readouterr().err
    assert not (images / "o").exists() and _hashes(images) == before
