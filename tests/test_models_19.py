"""Session 26 model coverage (models19): a new sample drawn with seed 20261203 from
``timm.list_models()`` (under 30M parameters) and torchvision's classification, detection,
segmentation, video and optical-flow builders, pruned through the Python API and ``cleanai
prune`` with the options users vary (the checks of ``test_models_18``: the pruned model runs, the
masking oracle holds, the parameters go down, the report's counts are the model's, a reload is
exact, the user's model is unchanged). The defect found: outputs that a model sorts or selects by
value (a detector's boxes after top-k and NMS) jump where slicing moves a score by a rounding error,
and the exact comparison with the masking oracle then skipped every group of ssd300_vgg16 at some
seeds (nothing pruned). Such outputs are now found by a nudge of the example inputs and left out of
the element-wise comparison (their shapes are still checked)."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_models_18 import _timm, api_case, cli_case, n_params
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.errors import PruningError
from cleanai_core.masking import check_exact, unsteady_outputs

# -- outputs ordered by value: the exact comparison leaves them out (fast) ------------------------------


class Ranked(nn.Module):
    """A detector's shape in small: a score and a "box" per position; the outputs are the scores
    sorted and the boxes in the scores' order (as top-k / NMS give them)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU())
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, b = self.head(self.body(x)).flatten(2).unbind(1)
        order = s.argsort(dim=1, descending=True)
        return s.gather(1, order), 100 * b.gather(1, order)


def test_outputs_ordered_by_value_are_left_out_of_the_exact_comparison():
    """The boxes (output 1) jump where the inputs move by 1e-4 of themselves (near ties change
    places), the sorted scores (output 0) do not; the exact comparison then holds the scores to
    the oracle and not the boxes, and the default path prunes every group, none skipped."""
    torch.manual_seed(0)
    model, x = Ranked(), torch.rand(1, 3, 48, 48)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    assert pruner._unsteady_outputs() == frozenset({1})
    with torch.no_grad():
        s, b = model(x)
    swapped = b.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    with pytest.raises(PruningError, match="differ from the original's with those channels zeroed"):
        check_exact(None, [s, swapped], None, None, x, expected=[s, b])
    check_exact(None, [s, swapped], None, None, x, expected=[s, b], unsteady=frozenset({1}))
    with pytest.raises(PruningError):  # the steady output is still compared
        check_exact(None, [s + 0.5 * s.abs().max(), swapped], None, None, x, expected=[s, b], unsteady=frozenset({1}))
    pruner.collect_activations([torch.rand(4, 3, 48, 48) for _ in range(2)], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        small = pruner.prune()
    assert pruner.skipped_groups == []
    assert (n_params(model), n_params(small)) == (370, 122)
    assert [t.shape for t in small(x)] == [(1, 2304), (1, 2304)]


# -- ssd300_vgg16 at the seeds that pruned nothing: corpus ----------------------------------------------


@pytest.mark.corpus
@pytest.mark.parametrize("seed", [9, 14])
def test_ssd300_prunes_at_the_seeds_where_every_group_was_skipped(seed):
    """ssd300_vgg16 at 128 px, 0.3 with ``round_to=8`` on the default path (train mode as built):
    at seeds 9 and 14 of 0..15 every one of its 23 groups was skipped (the sliced model's boxes
    differed from the oracle's by 47.6 / 67.3: a near tie of scores went the other way), so it kept
    all 24,815,204 parameters; it now keeps 0.516 like the other 14 seeds."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(seed)
    model = tv.models.get_model("ssd300_vgg16", weights=None, weights_backbone=None, num_classes=10)
    x = torch.rand(1, 3, 128, 128)
    pruner = StructuredPruner(model, x, pruning_ratio=0.3, round_to=8)
    pruner.collect_activations([torch.rand(4, 3, 128, 128) for _ in range(2)], progress=False)
    small = pruner.prune()
    assert pruner.skipped_groups == []
    assert n_params(model) == 24815204 and 0.50 < n_params(small) / n_params(model) < 0.53
    assert {k: v.shape[1:] for k, v in small.eval()(x)[0].items()} == {
        "boxes": (4,),
        "scores": (),
        "labels": (),
    }


# -- the sample (seed 20261203), as the sweep ran it: corpus ---------------------------------------------

#: name, API options, API kept at most, CLI arguments, a PNG folder (else a .pt), CLI kept at most
#: (the sweep's figures + 0.02)
SAMPLE = [
    (
        "convnext_pico_ols",
        {"pruning_ratio": 0.7},
        0.12,
        ["--ratio", "0.2", "--global-pruning", "--round-to", "8"],
        False,
        0.79,
    ),
    (
        "dla46_c",
        {"pruning_ratio": 0.3, "ignore_first": True},
        0.52,
        ["--ratio", "0.3", "--ignore", "FIRST"],
        False,
        0.52,
    ),
    (
        "efficientvit_m3",
        {"target_flops": 0.6},
        0.61,
        ["--ratio", "0.4", "--no-bias-compensation", "--no-reconstruction"],
        True,
        0.39,
    ),
    (
        "resnetv2_18",
        {"pruning_ratio": 0.2, "iterative_steps": 2, "global_pruning": True},
        0.69,
        ["--target-flops", "0.6"],
        False,
        0.61,
    ),
    (
        "tf_mobilenetv3_large_minimal_100",
        {"pruning_ratio": 0.3, "ignore_first": True},
        0.52,
        ["--ratio", "0.3", "--ignore", "FIRST"],
        False,
        0.52,
    ),
    (
        "semnasnet_100",
        {"target_flops": 0.6},
        0.6,
        ["--ratio", "0.4", "--no-bias-compensation", "--no-reconstruction"],
        False,
        0.4,
    ),
    ("efficientnet_el", {"pruning_ratio": 0.3, "iterative_steps": 3}, 0.53, ["--target-params", "0.5"], False, 0.52),
]


@pytest.mark.corpus
@pytest.mark.parametrize(("name", "api", "api_most", "cli", "pngs", "cli_most"), SAMPLE, ids=[s[0] for s in SAMPLE])
def test_timm_sample_prunes_through_the_api_and_the_command_line(tmp_path, name, api, api_most, cli, pngs, cli_most):
    model, x = _timm(name, 96, {})
    before, after = api_case(model, x, f"timm:{name}", {"num_classes": 10}, api, tmp_path)
    assert after / before < api_most
    (tmp_path / "c").mkdir()
    args = [*cli, "--num-classes", "10", "--threads", "1"]
    before, after = cli_case(f"timm:{name}", x, args, tmp_path / "c", pngs=pngs, first_model=model)
    assert after / before < cli_most


@pytest.mark.corpus
def test_the_oracle_leaves_out_a_detectors_boxes_sorted_by_near_tied_scores():
    """fasterrcnn_mobilenet_v3_large_fpn with random weights at 128 px: its 100 scores are all
    about 0.1, the boxes come in their order, and a random half sliced reordered them: the oracle
    differed by 30.7 (tolerance 0.128). The boxes (output 0) jump where the inputs move by 1e-4;
    the oracle leaves them out and says so; the scores and the shapes still match. Whether the
    tie breaks the other way at all depends on the rounding of the run (threads: it did under
    pytest-xdist, not in one process at the merge), so either nothing is left out or exactly
    the boxes are, and the rest always matches."""
    tv = pytest.importorskip("torchvision")
    from cleanai_core.testing import check_pruner

    torch.manual_seed(0)
    model = tv.models.get_model(
        "fasterrcnn_mobilenet_v3_large_fpn", weights=None, weights_backbone=None, num_classes=10
    ).eval()
    report = check_pruner(model, torch.rand(1, 3, 128, 128), ratio=0.5)
    assert report.output_shapes_equal and report.kept_whole == ()
    assert report.unsteady_outputs in ((), (0,)) and report.max_abs_diff < 1e-3


def test_smooth_outputs_are_never_taken_for_unsteady_so_a_slicing_error_in_them_stays_seen():
    """The check that leaves sorted outputs out must not leave out a smooth one: a deep plain
    net's logits and a ResNet-18's move far less than the oracle's tolerance under the nudge,
    so a real slicing error in them still fails verification."""
    import torchvision

    torch.manual_seed(0)
    layers = [m for _ in range(8) for m in (nn.Linear(32, 32), nn.Tanh())]
    deep = nn.Sequential(nn.Linear(16, 32), *layers, nn.Linear(32, 10)).eval()
    assert unsteady_outputs(deep, (torch.randn(4, 16),)) == frozenset()
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    assert unsteady_outputs(resnet, (torch.randn(2, 3, 32, 32),)) == frozenset()
