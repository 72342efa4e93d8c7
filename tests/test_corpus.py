"""Model corpus: prune real torchvision / timm architectures at 0.5 and check the oracle.

The default run covers a fast representative set (small inputs, small variants). The
wide sweep (every torchvision classification model and the smallest timm model of every
family) is marked ``corpus``: ``pytest -m corpus tests/test_corpus.py``. The same checks
run in ``benchmarks/compat_sweep.py``, which writes ``docs/compatibility.md``.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from cleanai_core.graph.dependency import DependencyGraph  # noqa: E402
from cleanai_core.slicing import SliceEdit, apply_edits  # noqa: E402
from cleanai_core.testing import check_pruner, random_units, run_model  # noqa: E402

_SWEEP_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "compat_sweep.py"
_spec = importlib.util.spec_from_file_location("compat_sweep", _SWEEP_PATH)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

# (spec, input side): small inputs where the architecture allows them
FAST = [
    ("tv:resnet18", 64),
    ("tv:mobilenet_v3_small", 64),
    ("tv:shufflenet_v2_x0_5", 64),
    ("tv:squeezenet1_1", 64),
    ("tv:densenet121", 64),
    ("tv:mnasnet0_5", 64),
    ("tv:efficientnet_b0", 64),
    ("tv:convnext_tiny", 64),
    ("tv:swin_t", 64),
    ("tv:googlenet", 64),
    ("timm:vit_tiny_patch16_224", 224),
    ("timm:deit_tiny_distilled_patch16_224", 224),
    ("timm:convnext_atto", 64),
    ("timm:resnet18d", 64),
    ("timm:efficientnet_b0", 64),
    ("timm:lambda_resnet26t", 64),
    ("timm:pvt_v2_b1", 64),
    ("timm:vit_pwee_patch16_reg1_gap_256", 224),
    ("timm:mobilenetv3_small_050", 64),
    ("timm:regnetx_002", 64),
    ("timm:dla34", 64),
    ("timm:ghostnet_050", 64),
    ("timm:res2net50_14w_8s", 64),
    ("timm:cspresnet50", 64),
    ("timm:poolformer_s12", 64),
    ("timm:levit_128s", 224),
    ("timm:swin_tiny_patch4_window7_224", 224),
]


def _model(spec: str):
    torch.manual_seed(0)
    model, _ = sweep.build(spec)
    return model


def _check(model, size: int, batch: int = 2):
    x = torch.randn(batch, 3, size, size)
    expected = run_model(model, x)
    report = check_pruner(model, x, ratio=0.5)
    assert report.output_shapes_equal
    tol = sweep.oracle_tolerance(expected)
    assert report.max_abs_diff < tol, (report.max_abs_diff, tol)
    assert report.pruned_units > 0
    return report


@pytest.mark.parametrize("spec,size", FAST, ids=[s for s, _ in FAST])
def test_fast_corpus(spec, size):
    with torch.random.fork_rng():  # leave the global RNG as found: other files seed once at import
        model = _model(spec)
        report = _check(model, size)
    kept = report.params_after / report.params_before
    # half of every prunable group is gone: most weights scale with (kept channels)^2
    assert 0.05 < kept < 0.85, kept


def _wide_set() -> list[str]:
    try:
        return sweep.torchvision_models() + sweep.timm_families(measure=False)
    except Exception:  # pragma: no cover - listing needs timm/torchvision
        return []


@pytest.mark.corpus
@pytest.mark.parametrize("spec", _wide_set())
def test_wide_corpus(spec):
    rec = sweep.check_one(spec, 0.5)
    if rec["status"].startswith("skipped"):
        pytest.skip(f"{rec['status']}: {rec['error']}")
    assert rec["status"] == "pass", rec["error"]
    assert rec["params_after"] < rec["params_before"]


# timm families where a layer scale, a norm or a functional projection once froze most
# channels: (name, input side, most of the parameters a uniform 0.5 may keep: about a
# quarter, as for their neighbours). Before: fastvit_t8 0.56, convnextv2_atto 0.48,
# eva02_tiny 0.68 (after: its 3 heads of 64 tie the 192-channel stream, one third goes);
# tiny_vit_5m 0.65 (its per-head qkv, 3x the input width by chance, was taken for a
# width-bound one and tied the whole stream into one unit); regnetz_b16_evos 0.76
# (EvoNorm-S's group variance froze its channels; whole groups go now, and its grouped
# 3x3 convolutions with 16-channel norm groups kept their width: 0.58; they prune whole
# conv groups now: 0.30); levit_conv_128s 0.35 (uneven per-head parts froze channel j of
# every head; whole heads go now); edgenext_small 0.38 (an uneven chunk); cait_xxs24
# 0.67 (talking heads kept channel j of every head, its class attention whole heads: one
# unit); swinv2_cr_tiny 0.69 (cosine attention: F.normalize froze q and k); token-mixing
# MLPs, a linear layer over the tokens (mixer_s16 0.49, resmlp_12 0.50, gmixer_12 0.46,
# gmlp_ti16 0.40: "channels reach dim 2 of a consumer reading dim 1" froze the residual
# stream); hgnetv2_b0 0.39 (a learnable scalar on the head's 1x1 maps froze its channels)
COVERAGE = [
    ("fastvit_t8", 64, 0.3),
    ("convnextv2_atto", 64, 0.3),
    ("eva02_tiny_patch14_224", 56, 0.4),
    ("tiny_vit_5m_224", 64, 0.3),
    ("regnetz_b16_evos", 64, 0.35),
    ("levit_conv_128s", 64, 0.3),
    ("edgenext_small", 64, 0.36),
    ("cait_xxs24_224", 64, 0.3),
    ("swinv2_cr_tiny_ns_224", 64, 0.3),
    ("mixer_s16_224", 64, 0.3),
    ("resmlp_12_224", 64, 0.3),
    ("gmixer_12_224", 64, 0.3),
    ("gmlp_ti16_224", 64, 0.3),
    ("hgnetv2_b0", 64, 0.3),
]


@pytest.mark.parametrize("name,size,most", COVERAGE, ids=[n for n, _, _ in COVERAGE])
def test_uniform_half_reaches_the_whole_family(name, size, most):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fixed_tokens = ("eva", "cait", "swinv2", "mixer", "resmlp", "gmixer", "gmlp", "levit")
        kwargs = {"img_size": size} if name.startswith(fixed_tokens) else {}  # fewer tokens
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
        x = torch.randn(2, 3, size, size)
        # the exact (non-normalising) groups against the masking oracle
        report = check_pruner(model, x, ratio=0.5)
        assert report.max_abs_diff < sweep.oracle_tolerance(run_model(model, x))
        graph = DependencyGraph(model, x)
        pruned = random_units(graph, 0.5)  # normalising groups too: what a user gets
    small = copy.deepcopy(model)
    edits = [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in graph.keep_indices(pruned).items()]
    apply_edits(small, edits, graph.pm)
    assert [t.shape for t in run_model(small, x)] == [t.shape for t in run_model(model, x)]
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, small))
    assert after / before < most, (before, after)


# session 16: the default path end to end (calibration, prune, save_pruned / load_pruned) on the
# families whose attention or attributes were fixed then: (spec, architecture keyword arguments,
# input shape). EdgeNeXt / XCiT cross-covariance attention, MaxViT TF-layout position tables and
# RelPosMlp coordinates, Hiera-Det heads, torchvision MViT (16 x 224 x 224 clips: minutes on a CPU) and the
# float torchvision quantization builders.
DEFAULT_PATH = [
    ("timm:edgenext_xx_small", {}, (3, 64, 64)),
    ("timm:edgenext_x_small", {}, (3, 64, 64)),
    ("timm:xcit_nano_12_p16_224", {"img_size": 64}, (3, 64, 64)),
    ("timm:maxvit_tiny_tf_224", {"img_size": 64}, (3, 64, 64)),
    ("timm:maxvit_rmlp_pico_rw_256", {"img_size": 64}, (3, 64, 64)),
    ("timm:maxxvit_rmlp_nano_rw_256", {"img_size": 64}, (3, 64, 64)),
    ("timm:coatnet_pico_rw_224", {"img_size": 64}, (3, 64, 64)),
    ("timm:swinv2_tiny_window8_256", {}, (3, 256, 256)),
    ("timm:sam2_hiera_tiny", {}, (3, 64, 64)),
    ("tv:quantized_resnet18", {}, (3, 64, 64)),
    ("tv:quantized_mobilenet_v3_large", {}, (3, 64, 64)),
    ("tv:mvit_v2_s", {}, (3, 16, 224, 224)),
    ("tv:mvit_v1_b", {}, (3, 16, 224, 224)),
    # session 17 (kept at 0.5 before -> after): NextViT's grouped conv attention prunes whole
    # groups (0.551 -> 0.263), CoaT's aggregate passes its channels through (0.716 -> 0.356),
    # EfficientViT-M's cascaded and SHViT's partial attention prune their unequal splits
    # (0.529 -> 0.261, 0.532 -> 0.255); differential attention keeps whole heads (0.649 -> 0.255)
    ("timm:nextvit_small", {}, (3, 64, 64)),
    ("timm:coat_tiny", {"img_size": 64}, (3, 64, 64)),
    ("timm:efficientvit_m0", {}, (3, 64, 64)),
    ("timm:shvit_s1", {}, (3, 64, 64)),
    ("timm:vit_dwee_patch16_reg1_gap_256", {"img_size": 64}, (3, 64, 64)),
    ("timm:inception_next_tiny", {}, (3, 64, 64)),  # unequal branches split apart (0.531 -> 0.251)
    ("timm:iformer_t", {}, (3, 64, 64)),  # q / k under SDPA's default scale, the head's norm (0.402 -> 0.261)
    ("timm:repvit_m1", {}, (3, 64, 64)),  # the classifier head's norm no longer ignored (0.361 -> 0.257)
    # session 18: EVA, PVT-v2 and latent-pool attentions no longer width-bound (eva02_tiny 0.375 -> 0.282,
    # pvt_v2_b1 0.314 -> 0.256, test_vit3 0.409 -> 0.312); LiteMLA's padded values (efficientvit_b0
    # 0.297 -> 0.262); MobileViT-V2's [1, E, E] split (mobilevitv2_050 0.323 -> 0.259)
    ("timm:eva02_tiny_patch14_224", {"img_size": 56}, (3, 56, 56)),
    ("timm:pvt_v2_b0", {}, (3, 64, 64)),
    ("timm:test_vit3", {"img_size": 64}, (3, 64, 64)),
    ("timm:efficientvit_b0", {}, (3, 64, 64)),
    ("timm:mobilevitv2_050", {}, (3, 64, 64)),
    ("timm:resnetblur18", {}, (3, 64, 64)),  # BlurPool2d's filter buffer goes with its channels (0.362 -> 0.251)
    ("timm:ecaresnet26t", {}, (3, 64, 64)),  # ECA's channel conv passes them approximately (0.488 -> 0.252)
    # session 19
    ("timm:rexnet_100", {}, (3, 64, 64)),  # the shortcut's fixed channel range follows the kept ones (0.427 -> 0.265)
    ("timm:efficientnet_cc_b0_4e", {}, (3, 64, 64)),  # CondConv's expert filters slice like a conv's (0.500 -> 0.265)
    ("timm:coat_lite_tiny", {"img_size": 64}, (3, 64, 64)),  # factorised attention off the stream (0.345 -> 0.271)
    ("timm:eca_halonext26ts", {}, (3, 256, 256)),  # q / k narrower than v split apart (0.346 -> 0.253)
    ("timm:lambda_resnet26t", {}, (3, 64, 64)),  # the lambda layer claimed whole (0.391 -> 0.252)
    ("timm:focalnet_tiny_lrf", {}, (3, 64, 64)),  # the focal modulation's [dim, dim, gates] split (0.377 -> 0.254)
    ("timm:vit_dlittle_patch16_reg1_gap_256", {"img_size": 64}, (3, 64, 64)),  # DiffAttention's output (0.319 -> 0.266)
    # session 20
    ("tv:shufflenet_v2_x1_0", {}, (3, 64, 64)),  # split and shuffle by stored indices (0.35 -> 0.26)
    ("tv:quantized_shufflenet_v2_x0_5", {}, (3, 64, 64)),
    ("timm:vit_small_patch16_rope_mixed_224", {"img_size": 64}, (3, 64, 64)),  # freqs by head (0.337 -> 0.254)
    ("tv:googlenet", {}, (3, 64, 64)),  # aux classifiers (training only) traced and sliced (0.578 -> 0.252)
    # session 21
    ("tv:inception_v3", {"init_weights": False}, (3, 75, 75)),  # aux head traced on an enlarged image (0.330 -> 0.251)
    ("tv:mnasnet0_5", {}, (3, 64, 64)),  # reload kept its state_dict versions (load_pruned raised before)
]


@pytest.mark.corpus
@pytest.mark.parametrize("spec,kwargs,shape", DEFAULT_PATH, ids=[s for s, _, _ in DEFAULT_PATH])
def test_default_path_prunes_matches_and_reloads(tmp_path, spec, kwargs, shape):
    from cleanai_core import StructuredPruner, load_pruned
    from cleanai_core.io import save_pruned

    lib, name = spec.split(":", 1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if lib == "timm":
            model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
        else:
            model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()
        batch = 1 if len(shape) == 4 else 2
        x = torch.randn(batch, *shape)
        report = check_pruner(model, x, ratio=0.5)
        assert report.output_shapes_equal
        assert report.max_abs_diff < sweep.oracle_tolerance(run_model(model, x))
        pruner = StructuredPruner(model, x, pruning_ratio=0.5)
        pruner.collect_activations([torch.randn(batch, *shape)], num_batches=1)
        small = pruner.prune()
    kept = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
    assert kept < 0.4, kept
    options = {"num_classes": 10, **({"model_kwargs": kwargs} if kwargs else {})}
    save_pruned(tmp_path / "o", small, pruner.history, ("timm:" if lib == "timm" else "torchvision:") + name, options)
    back = load_pruned(tmp_path / "o", trust_code=bool(kwargs))
    assert all(torch.equal(a, b) for a, b in zip(run_model(back, x), run_model(small, x), strict=True))
