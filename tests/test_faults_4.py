"""Fourth round of bad input and edge cases (docs/reliability.md): models wrapped by
``torch.compile`` or ``DataParallel``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cleanai_core import GradualPruner, PruningSchedule, StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.io import load_pruned, save_pruned
from cleanai_plugins.io.demo import MODEL_SPEC, DigitsCNN

X = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _digits() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN().eval()


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- torch.compile and DataParallel wrappers ---------------------------------------------------


@pytest.mark.parametrize("importance", ["magnitude", "weight_activation"])
def test_a_compiled_model_prunes_like_the_model_it_wraps(importance):
    # was TypeError: DigitsCNN does not support len() (the scorer tested the model's truth value);
    # the wrapper is not run: through it every hooked forward went through TorchDynamo (76 s, not 0.1 s)
    model = _digits()
    before = _state(model)
    pruner = StructuredPruner(torch.compile(model), X, importance=importance, pruning_ratio=0.5)
    pruner.collect_activations(_batches())
    pruned = pruner.prune()
    plain = StructuredPruner(_digits(), X, importance=importance, pruning_ratio=0.5)
    plain.collect_activations(_batches())
    expected = plain.prune()
    assert type(pruned) is DigitsCNN
    assert [p.shape for p in pruned.parameters()] == [p.shape for p in expected.parameters()]
    assert torch.equal(pruned(X), expected(X))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model as it was


def test_a_compiled_model_pruned_in_place_is_the_users_wrapper():
    model = _digits()
    compiled = torch.compile(model)
    out = StructuredPruner(compiled, X, importance="magnitude", pruning_ratio=0.5, inplace=True).prune()
    assert out is compiled and compiled._orig_mod is model
    assert model.features[0].weight.shape == (16, 1, 3, 3)  # 32 before


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "DataParallel"])
def test_save_pruned_of_a_wrapped_model_loads_back(tmp_path, wrap):
    # the tensors were saved as '_orig_mod.features.0.weight' / 'module.features.0.weight': the folder did not load
    pruner = StructuredPruner(_digits(), X, importance="magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    save_pruned(tmp_path / "o", wrap(pruned), pruner.history, MODEL_SPEC)
    loaded = load_pruned(tmp_path / "o")
    assert type(loaded) is DigitsCNN and torch.equal(loaded(X), pruned(X))


def test_gradual_pruning_of_a_compiled_model_resumes_on_the_plain_model():
    # the checkpoint named the parameters '_orig_mod.*' and a plain model did not resume from it
    model = _digits().train()
    compiled = torch.compile(model)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    gp = GradualPruner(compiled, X, opt, PruningSchedule(final=0.5, steps=2))
    out, _ = gp.step(_batches())
    assert out is compiled
    state = gp.state_dict()
    assert set(state["shapes"]) == {n for n, _ in model.named_parameters()}
    fresh = _digits().train()
    gp2 = GradualPruner(fresh, X, torch.optim.SGD(fresh.parameters(), lr=0.1), PruningSchedule(final=0.5, steps=2))
    gp2.load_state_dict(state)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]
    assert sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in _digits().parameters())


# -- save_pruned of a model its history did not make ------------------------------------------


def test_save_pruned_of_the_unpruned_model_is_refused_and_writes_nothing(tmp_path):
    # the folder was written, and load_pruned then called it "damaged, tampered with or not written by this CleanAI"
    model = _digits()
    pruner = StructuredPruner(model, X, importance="magnitude", pruning_ratio=0.5)
    pruned = pruner.prune()
    with pytest.raises(UserError, match=r"features\.0\.weight is \(32, 1, 3, 3\), the step leaves \(16, 1, 3, 3\)"):
        save_pruned(tmp_path / "o", model, pruner.history, MODEL_SPEC)
    with pytest.raises(UserError, match=r"step 0 slices [\w.]+, which this model does not have"):
        save_pruned(tmp_path / "o", nn.Sequential(nn.Conv2d(1, 4, 3)), pruner.history, MODEL_SPEC)
    assert not (tmp_path / "o").exists()
    save_pruned(tmp_path / "o", pruned, pruner.history, MODEL_SPEC)  # the pruned model saves and loads
    assert torch.equal(load_pruned(tmp_path / "o")(X), pruned(X))


def test_save_pruned_of_a_plan_that_removed_nothing_still_saves(tmp_path):
    model = _digits()
    with pytest.warns(RuntimeWarning, match="the plan removes no unit"):
        pruner = StructuredPruner(model, X, importance="magnitude", pruning_ratio=0.5, round_to=1000)
        pruned = pruner.prune()
    save_pruned(tmp_path / "o", pruned, pruner.history, MODEL_SPEC)
    assert load_pruned(tmp_path / "o").features[0].weight.shape == (32, 1, 3, 3)
