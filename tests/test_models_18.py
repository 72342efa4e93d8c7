"""Session 25 model coverage (models18): a sample drawn with seed 20261225 from
``timm.list_models()`` (under 30M parameters) and torchvision's task builders, pruned as a user
prunes them: ``cleanai prune --model ... --data ... --out ...`` on a locally made data set (a
``.pt`` of tensors or a folder of PNGs) with the options users vary (ratios 0.2 / 0.3 / 0.7,
``--global-pruning``, ``--round-to 8``, ``--ignore``, ``--target-params``, ``--target-flops``),
and the Python API on the default activation-aware path (``collect_activations``, ``prune``,
``report``, iterative steps, ignored layers, targets, ``save_pruned`` / ``load_pruned``). The
pruned model runs, the masking oracle holds, the parameters go down, the report's counts are the
model's, a reload is exact and the user's model is unchanged. A few small cases run in the default
suite; the whole sample is ``@pytest.mark.corpus``."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from cleanai_core import StructuredPruner, load_pruned
from cleanai_core.io import save_pruned
from cleanai_core.testing import check_pruner


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run(model, x):
    with torch.no_grad():
        return model(*x) if isinstance(x, tuple) else model(x)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _first_layer(model) -> str:
    kinds = (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
    return next(n for n, m in model.named_modules() if isinstance(m, kinds))


def _timm(name: str, side: int, kwargs: dict):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs), torch.rand(1, 3, side, side)


def api_case(model, x, spec: str, options: dict, opts: dict, tmp_path, trust: bool = False) -> tuple[int, int]:
    """The default path as a user runs it on ``model`` (left as built: train mode): the oracle on an
    eval copy, calibration on two random batches, ``prune`` / ``report``, save / reload (exact) and
    the user's model unchanged. Returns ``(params before, params after)``."""
    reference = copy.deepcopy(model).eval()
    scale = max([1.0] + [float(t.abs().max()) for t in _tensors(_run(reference, x)) if t.is_floating_point()])
    report = check_pruner(reference, x, ratio=0.5)
    assert report.output_shapes_equal and report.max_abs_diff < 1e-3 * scale
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mode = model.training
    opts = dict(opts)
    if opts.pop("ignore_first", False):
        opts["ignored_layers"] = [_first_layer(model)]
    pruner = StructuredPruner(model, x, **opts)
    shape = (x[0] if isinstance(x, tuple) else x).shape[1:]
    calib = [
        (torch.rand(2, *shape), torch.rand(2, *shape)) if isinstance(x, tuple) else torch.rand(4, *shape)
        for _ in range(2)
    ]
    pruner.collect_activations(calib, progress=False)
    small = pruner.prune()
    rep = pruner.report()
    assert (rep["params_before"], rep["params_after"]) == (n_params(model), n_params(small))
    assert n_params(small) < n_params(model)
    if "ignored_layers" in opts:
        name = opts["ignored_layers"][0]
        assert small.get_submodule(name).weight.shape == model.get_submodule(name).weight.shape
    small.eval()
    out = _tensors(_run(small, x))
    assert out and all(bool(t.isfinite().all()) for t in out if t.is_floating_point())
    save_pruned(tmp_path / "api", small, pruner.history, spec, options)
    back = load_pruned(tmp_path / "api", trust_code=trust).eval()
    assert all(torch.equal(a, b) for a, b in zip(_tensors(_run(back, x)), out, strict=True))
    assert model.training == mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return n_params(model), n_params(small)


def write_data(tmp_path, shape: tuple[int, ...], pngs: bool) -> str:
    """Eight labelled samples: a ``.pt`` of ``(x, y)`` or a folder of PNGs (two classes, each
    image 8 px larger than ``shape`` so that the folder's resize does something)."""
    torch.manual_seed(1)
    if not pngs:
        torch.save((torch.rand(8, *shape), torch.randint(0, 10, (8,))), tmp_path / "data.pt")
        return str(tmp_path / "data.pt")
    import numpy as np
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            pixels = (np.random.default_rng(i).random((shape[1] + 8, shape[2] + 8, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "imgs" / c / f"{i}.png")
    return str(tmp_path / "imgs")


def cli_case(spec: str, x, args: list[str], tmp_path, pngs=False, trust=False, first_model=None) -> tuple[int, int]:
    """``cleanai prune`` in-process on a locally made data set; the written folder reloads, runs,
    holds fewer parameters, as many as ``report.json`` says, and every layer of the report has the
    width the report gives it. Returns ``(params before, params after)`` as the report has them."""
    from cleanai_core.cli import main

    x = x[0] if isinstance(x, tuple) else x
    data = write_data(tmp_path, tuple(x.shape[1:]), pngs)
    args = [a if a != "FIRST" else _first_layer(first_model) for a in args] if first_model is not None else args
    extra = ["--image-size", str(x.shape[-1])] if pngs else []
    argv = ["prune", "--model", spec, "--data", data, "--out", str(tmp_path / "cli"), "--quiet", *args, *extra]
    assert main(argv) == 0
    rep = json.loads((tmp_path / "cli" / "report.json").read_text())
    back = load_pruned(tmp_path / "cli", trust_code=trust).eval()
    assert n_params(back) == rep["params_after"] < rep["params_before"]
    modules = dict(back.named_modules())
    for layer in rep["layers"]:
        if "step" in layer or layer["name"] not in modules:  # a bare parameter (a ViT's cls_token, a scale)
            continue
        module = modules[layer["name"]]
        width = getattr(module, "out_channels", getattr(module, "out_features", None))
        if width is not None:
            assert width == layer["channels_after"], layer["name"]
    assert all(bool(t.isfinite().all()) for t in _tensors(_run(back, x)) if t.is_floating_point())
    return rep["params_before"], rep["params_after"]


# -- fast cases (default suite) ----------------------------------------------------------------------


def test_cli_prunes_a_timm_model_from_a_png_folder_globally_rounded(tmp_path):
    """lcnet_035 at 64 px: a folder of PNGs (resized by ``--image-size``), ``--ratio 0.2
    --global-pruning --round-to 8``: every pruned width a multiple of 8."""
    pytest.importorskip("timm")
    _, x = _timm("lcnet_035", 64, {})
    before, after = cli_case(
        "timm:lcnet_035",
        x,
        ["--num-classes", "10", "--ratio", "0.2", "--global-pruning", "--round-to", "8", "--threads", "1"],
        tmp_path,
        pngs=True,
    )
    assert before == 376180 and after < 0.9 * before
    rep = json.loads((tmp_path / "cli" / "report.json").read_text())
    changed = [lay for lay in rep["layers"] if lay["channels_after"] != lay["channels_before"]]
    assert changed and all(lay["channels_after"] % 8 == 0 for lay in changed)


def test_api_iterative_steps_with_an_ignored_stem_on_a_repghostnet(tmp_path):
    """repghostnet_050 (re-parameterisable, train mode as built) at 64 px: three iterative steps at
    0.3 with the stem ignored; exact reload, the user's model unchanged."""
    model, x = _timm("repghostnet_050", 64, {})
    opts = {"pruning_ratio": 0.3, "iterative_steps": 3, "ignore_first": True}
    before, after = api_case(model, x, "timm:repghostnet_050", {"num_classes": 10}, opts, tmp_path)
    assert before == 1045778 and 0.4 < after / before < 0.6


# -- a model that takes two images, fed from a .pt dict of its forward's inputs (RAFT's form) ----------


class TwoImages(torch.nn.Module):
    """A siamese CNN: ``forward(image1, image2)``, as RAFT's (two frames) is called."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Conv2d(32, 24, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(24, 10)

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        x = self.b(torch.cat([self.a(image1), self.a(image2)], 1))
        return self.fc(x.mean((2, 3)))


def two_images() -> TwoImages:
    torch.manual_seed(0)
    return TwoImages()


def test_a_pt_dict_of_the_forwards_inputs_feeds_a_two_image_model(tmp_path, capsys):
    """``{'image1': ..., 'image2': ..., 'y': ...}`` in a ``.pt`` was refused ("expected keys 'x' and
    'y'"), and ``(x1, x2)`` read as inputs and labels: a model taking two images (torchvision's RAFT)
    could only be fed by a data function. The dict's names are the forward's own; a wrong name is
    refused naming the ones it takes."""
    from cleanai_core.cli import main

    torch.manual_seed(1)
    x1, x2 = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    torch.save({"image1": x1, "image2": x2, "y": torch.randint(0, 10, (8,))}, tmp_path / "pairs.pt")
    argv = ["prune", "--model", "test_models_18:two_images", "--data", str(tmp_path / "pairs.pt"), "--quiet"]
    assert main([*argv, "--ratio", "0.5", "--out", str(tmp_path / "o")]) == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert (rep["params_before"], rep["params_after"]) == (n_params(two_images()), 2110)
    assert rep["evaluation_samples"] == 4 and rep["accuracy_before"] is not None
    small = load_pruned(tmp_path / "o", trust_code=True).eval()
    assert (small.a[0].out_channels, small.b[0].out_channels, n_params(small)) == (8, 12, 2110)
    assert small(x1[:2], x2[:2]).shape == (2, 10)

    torch.save({"image1": x1, "img2": x2}, tmp_path / "bad.pt")
    capsys.readouterr()
    assert main([*argv[:4], str(tmp_path / "bad.pt"), "--quiet", "--out", str(tmp_path / "b")]) == 2
    assert "forward inputs (image1, image2)" in capsys.readouterr().err and not (tmp_path / "b").exists()


# -- the sample (seed 20261225), as the sweep ran it: corpus ---------------------------------------------


def vit_dinov2_96():
    """``cleanai prune --model test_models_18:vit_dinov2_96``: a ViT built for 96 px, as a user's
    factory builds a model whose size is fixed at creation."""
    import timm

    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=10, img_size=96)


def coatnet_96():
    import timm

    return timm.create_model("coatnet_0_rw_224", pretrained=False, num_classes=10, img_size=96)


#: name, img_size kwarg (a factory above builds it for the CLI), API options, API kept at most,
#: CLI arguments, a PNG folder (else a .pt), CLI kept at most (the sweep's figures + 0.02)
SAMPLE = [
    (
        "spnasnet_100",
        False,
        {"pruning_ratio": 0.3, "iterative_steps": 3},
        0.53,
        ["--ratio", "0.3", "--round-to", "8"],
        False,
        0.54,
    ),
    (
        "legacy_seresnet34",
        False,
        {"pruning_ratio": 0.3, "ignore_first": True},
        0.52,
        ["--ratio", "0.2", "--round-to", "8", "--global-pruning"],
        True,
        0.82,
    ),
    ("mobilenet_edgetpu_v2_m", False, {"pruning_ratio": 0.7}, 0.12, ["--target-params", "0.5"], False, 0.52),
    ("hgnetv2_b1", False, {"pruning_ratio": 0.2, "global_pruning": True}, 0.66, ["--target-flops", "0.6"], False, 0.60),
    (
        "repghostnet_111",
        False,
        {"pruning_ratio": 0.3, "round_to": 8},
        0.54,
        ["--ratio", "0.3", "--ignore", "conv_stem"],
        False,
        0.52,
    ),
    (
        "iformer_m_distilled",
        False,
        {"pruning_ratio": 0.2, "iterative_steps": 2, "global_pruning": True},
        0.61,
        ["--ratio", "0.7"],
        True,
        0.12,
    ),
    ("vit_small_patch14_dinov2", "vit_dinov2_96", {"target_params": 0.5}, 0.52, ["--ratio", "0.3"], False, 0.55),
    (
        "coatnet_0_rw_224",
        "coatnet_96",
        {"pruning_ratio": 0.2, "global_pruning": True},
        0.85,
        ["--target-flops", "0.6"],
        False,
        0.62,
    ),
]


@pytest.mark.corpus
@pytest.mark.parametrize(
    ("name", "factory", "api", "api_most", "cli", "pngs", "cli_most"), SAMPLE, ids=[s[0] for s in SAMPLE]
)
def test_timm_sample_prunes_through_the_api_and_the_command_line(
    tmp_path, name, factory, api, api_most, cli, pngs, cli_most
):
    kwargs = {"img_size": 96} if factory else {}
    model, x = _timm(name, 96, kwargs)
    options = {"num_classes": 10, **({"model_kwargs": kwargs} if kwargs else {})}
    before, after = api_case(model, x, f"timm:{name}", options, api, tmp_path, trust=bool(kwargs))
    assert after / before < api_most
    spec = f"test_models_18:{factory}" if factory else f"timm:{name}"
    extra = [] if factory else ["--num-classes", "10"]
    before, after = cli_case(spec, x, [*cli, *extra, "--threads", "1"], tmp_path, pngs=pngs, trust=bool(factory))
    assert after / before < cli_most


#: torchvision builder, input shape, API options, API kept at most, CLI arguments, CLI kept at most
TV_SAMPLE = [
    ("efficientnet_b3", (3, 96, 96), {"pruning_ratio": 0.7}, 0.12, ["--target-params", "0.5"], 0.52),
    (
        "squeezenet1_0",
        (3, 96, 96),
        {"pruning_ratio": 0.3, "iterative_steps": 3},
        0.53,
        ["--ratio", "0.3", "--round-to", "8"],
        0.6,
    ),
    ("r3d_18", (3, 4, 64, 64), {"target_params": 0.5}, 0.52, ["--ratio", "0.3"], 0.52),
    ("raft_small", (3, 128, 128), {"target_flops": 0.6}, 0.7, ["--ratio", "0.3", "--global-pruning"], 0.8),
]


@pytest.mark.corpus
@pytest.mark.parametrize(
    ("name", "shape", "api", "api_most", "cli", "cli_most"), TV_SAMPLE, ids=[s[0] for s in TV_SAMPLE]
)
def test_torchvision_sample_prunes_through_the_api_and_the_command_line(
    tmp_path, name, shape, api, api_most, cli, cli_most
):
    """Classification, video and optical flow (RAFT: two images, fed from a ``.pt`` dict of
    ``image1`` / ``image2``, which the command line read as nothing before this session)."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    two = name.startswith("raft")
    kw = {} if two else {"num_classes": 10}
    model = tv.models.get_model(name, weights=None, **kw)
    x = (torch.rand(1, *shape), torch.rand(1, *shape)) if two else torch.rand(1, *shape)
    before, after = api_case(model, x, f"torchvision:{name}", kw, api, tmp_path)
    assert after / before < api_most
    if two:
        from cleanai_core.cli import main

        torch.save({"image1": torch.rand(6, *shape), "image2": torch.rand(6, *shape)}, tmp_path / "pairs.pt")
        argv = ["prune", "--model", f"torchvision:{name}", "--data", str(tmp_path / "pairs.pt")]
        assert main([*argv, "--out", str(tmp_path / "cli"), "--quiet", "--threads", "1", *cli]) == 0
        small = load_pruned(tmp_path / "cli").eval()
        assert n_params(small) / before < cli_most
        assert _run(small, x)[-1].shape == (1, 2, *shape[1:])
        return
    extra = ["--num-classes", "10", "--threads", "1"]
    before, after = cli_case(f"torchvision:{name}", x, [*cli, *extra], tmp_path)
    assert after / before < cli_most
