"""Review of session 24's changes (review16): where two branches' rules met, and where the
new code went wrong on inputs next to the ones its authors tested."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import small_convnet
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.runtime import positional_inputs, split_batch


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x1, x2):
        return self.out(torch.relu(self.a(x1) + self.b(x2)))


def test_a_failing_batch_read_as_a_models_two_inputs_is_not_said_to_be_read_as_input_and_label():
    model = _TwoInputs().eval()
    pruner = StructuredPruner(model, (torch.randn(1, 4), torch.randn(1, 4)), pruning_ratio=0.5)
    wrong = (torch.randn(3, 5), torch.randn(3, 5))  # both inputs the wrong width: the model got both
    assert positional_inputs(wrong, model) == 2
    assert split_batch(wrong, model)[1] is None
    with pytest.raises(UserError) as err:
        pruner.collect_activations([wrong], progress=False)
    assert "(3x5 and 4x8)" in str(err.value)
    assert "read as (input, label)" not in str(err.value)


def test_the_input_and_label_hint_stays_where_a_one_input_model_got_a_pair_of_like_tensors():
    model = small_convnet(8, 8, None, 4).eval()
    pruner = StructuredPruner(model, torch.randn(1, 3, 8, 8), pruning_ratio=0.5)
    assert positional_inputs((torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)), model) == 0
    with pytest.raises(UserError, match=r"read as \(input, label\)"):
        pruner.collect_activations([(torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8))], progress=False)


def _convnet_pruner() -> tuple[nn.Module, StructuredPruner]:
    model = small_convnet(8, 8, None, 4).eval()
    return model, StructuredPruner(model, torch.randn(2, 3, 8, 8), "magnitude", pruning_ratio=0.25)


@pytest.mark.parametrize(
    ("table", "pruned"),
    [
        (lambda m: {m[0]: 0.5, m[3]: 0.5}, 8),  # modules as keys, as the constructor takes them
        (lambda m: {"0": 0.5, m[3]: 0.25}, 6),  # a name and a module
        (lambda m: {"*": 0.75}, 12),  # a glob
        (lambda m: {nn.Conv2d: 0.5}, 8),  # a type
    ],
)
def test_layer_ratios_assigned_after_construction_are_resolved_as_the_constructor_resolves_them(table, pruned):
    model, pruner = _convnet_pruner()
    assert _quiet(pruner.plan).n_pruned == 4  # 0.25 of two groups of 8
    pruner.layer_ratios = table(model)  # sorted() of module keys raised TypeError from the plan's options key
    assert _quiet(pruner.plan).n_pruned == pruned
    assert all(isinstance(k, str) for k in pruner.layer_ratios)
    assert _quiet(pruner.prune)[0].out_channels == 8 - {8: 4, 6: 4, 12: 6}[pruned]


def test_layer_ratios_changed_in_place_plan_again_and_a_bad_one_is_refused_as_in_the_constructor():
    model, pruner = _convnet_pruner()
    pruner.layer_pruning_ratios = {"0": 0.5}
    assert _quiet(pruner.plan).n_pruned == 4 + 2
    pruner.layer_ratios[model[3]] = 0.5  # in place, a module key
    assert _quiet(pruner.plan).n_pruned == 4 + 4
    pruner.layer_ratios["3"] = 1.5
    with pytest.raises(UserError, match="1.5"):
        pruner.plan()


def test_consent_to_a_folders_tokenizer_code_is_not_carried_into_a_later_run_without_trust_code(tmp_path, capsys):
    """``--trust-code`` for one run recorded the folder as consented for the rest of the
    process: a later run of the same folder without the flag (a notebook, a script calling
    ``main`` twice, ``load_pruned`` after a trusted prune) built the folder's tokenizer code."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from test_hf_text_15 import folder
    from test_lead_24 import tokenizer_with_code

    from cleanai_core.cli import main

    src = folder(tmp_path)
    tokenizer_with_code(src, "Lead24Tokenizer")
    (tmp_path / "t.txt").write_text("the cat sat on a mat and the dog ran to the park with a ball.\n" * 20)
    argv = ["prune", "--model", f"hf:{src}", "--data", str(tmp_path / "t.txt"), "--seq-len", "16", "--threads", "1",
            "--latency-repeats", "1", "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "trusted"), "--trust-code"]) == 0
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "untrusted")]) == 2
    err = capsys.readouterr().err
    assert "tokenization_lead24.Lead24Tokenizer" in err and "--trust-code" in err
    assert not (tmp_path / "untrusted").exists()


class _MaskedAttention(nn.Module):
    """Attention whose causal mask is a frozen parameter of 0 and -inf, as older code keeps it."""

    def __init__(self, n: int = 6, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 32), nn.Linear(32, d)
        self.mask = nn.Parameter(torch.full((n, n), float("-inf")).triu(1), requires_grad=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        x = x + self.proj((q @ k.transpose(-1, -2) / 4 + self.mask).softmax(-1) @ v)
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_a_parameter_that_is_an_additive_mask_of_minus_inf_is_no_damaged_weight():
    model = _MaskedAttention().eval()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(model(x)).all())
    pruned = _quiet(StructuredPruner(model, x, "magnitude", pruning_ratio=0.5).prune)  # refused: "15 inf value(s)"
    assert (pruned.fc1.out_features, pruned.fc2.in_features) == (16, 16)
    assert int(torch.isinf(pruned.mask).sum()) == 15


@pytest.mark.parametrize("damage", ["one", "all", "nan_in_mask"])
def test_inf_in_a_weight_is_still_refused_whatever_else_it_holds(damage):
    model = _MaskedAttention().eval()
    with torch.no_grad():
        if damage == "one":  # a finite weight with one inf
            model.fc1.weight[0, 0] = float("inf")
        elif damage == "all":  # no finite value at all: no mask
            model.fc1.weight.fill_(float("-inf"))
        else:  # a mask that also holds NaN
            model.mask[0, 0] = float("nan")
    name = "mask" if damage == "nan_in_mask" else "fc1.weight"
    with pytest.raises(UserError, match=rf"tensor '{name}' holds \d+ (inf|NaN)"):
        StructuredPruner(model, torch.randn(2, 6, 16), "magnitude", pruning_ratio=0.5)


def test_an_image_folder_beside_a_training_runs_history_json_is_data_and_a_cleanai_one_is_named(tmp_path):
    """faults16 named a folder holding ``history.json`` or ``architecture.json`` as a pruned
    model's folder missing files, by the names alone: an image data set whose root keeps a
    Keras run's ``history.json`` (loss and accuracy per epoch) was refused as ``--data``."""
    pytest.importorskip("torchvision")
    image = pytest.importorskip("PIL.Image")
    import json

    from cleanai_core.special_files import cleanai_folder_kind
    from cleanai_plugins.io.datasets import _load_image_folder

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "history.json").write_text(json.dumps({"loss": [1.0, 0.5], "accuracy": [0.5, 0.8]}))
    assert cleanai_folder_kind(tmp_path) is None
    assert len(_load_image_folder(tmp_path, {"image_size": 8})) == 6
    (tmp_path / "history.json").write_text(json.dumps({"format": "cleanai-history/1", "steps": []}))
    kind = cleanai_folder_kind(tmp_path)
    assert kind is not None and "lacks architecture.json and model.pt" in kind[0]
    with pytest.raises(UserError, match="lacks architecture.json and model.pt"):
        _load_image_folder(tmp_path, {"image_size": 8})
