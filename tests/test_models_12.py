"""Session 21b model coverage: settings beyond the default path (other criteria, targets,
rounding, iterative steps, training after pruning); one focused check per cause fixed (tiny
models, default suite; the real models under ``@pytest.mark.corpus``)."""

from __future__ import annotations

import pytest
import torch
from test_models_6 import n_params
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.collect import accumulate_gradients
from cleanai_core.model_state import holds_history

# -- a cache the forward fills under gradients (timm LeViT's attention biases in eval mode) ---------


class CachedBias(nn.Module):
    """A positional bias gathered from a table once per device (and autograd mode) in eval
    mode and cached on the module, as timm's LeViT and EfficientFormer attention does
    (``cache=False``: no cache)."""

    def __init__(self, cache: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.use_cache = cache
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bias_table = nn.Parameter(torch.randn(16))
        self.register_buffer("idx", torch.arange(64) % 16)
        self.bias_cache: dict[str, torch.Tensor] = {}
        self.fc = nn.Linear(8, 5)
        self.eval()

    def forward(self, x):
        if self.training or not self.use_cache:
            b = self.bias_table[self.idx]
        else:
            key = f"{x.device}, grad {torch.is_grad_enabled()}"  # one filled in the gradient pass
            if key not in self.bias_cache:
                self.bias_cache[key] = self.bias_table[self.idx]
            b = self.bias_cache[key]
        return self.fc(torch.relu(self.conv(x) + b.view(1, 1, 8, 8)).mean((2, 3)))


def _labelled(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(2, 3, 8, 8, generator=g), torch.tensor([0, 4])) for _ in range(n)]


@pytest.mark.parametrize("squared", [False, True], ids=["taylor", "hessian"])
def test_gradients_pass_through_a_cache_the_forward_filled_under_gradients(squared):
    cached, plain = CachedBias(), CachedBias(cache=False)
    # raised "Trying to backward through the graph a second time" at the second batch
    got = accumulate_gradients(cached, _labelled(), None, None, squared=squared)
    want = accumulate_gradients(plain, _labelled(), None, None, squared=squared)
    assert sorted(got) == sorted(want) == ["bias_table", "conv.bias", "conv.weight", "fc.bias", "fc.weight"]
    for name in want:  # the cache's graph carried every batch's gradient to the table
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
    assert cached.bias_cache == {}  # the user's model is untouched (a copy ran)


def test_holds_history_finds_graph_tensors_in_plain_attributes_only():
    model = CachedBias()
    assert not holds_history(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))
    assert not holds_history(model)  # filled without gradients: no graph
    model.bias_cache.clear()
    model(torch.randn(1, 3, 8, 8))
    assert holds_history(model)
    model.bias_cache.clear()
    model.nested = [(torch.ones(2, requires_grad=True) * 2,)]
    assert holds_history(model)


@pytest.mark.parametrize("importance", ["taylor", "hessian"])
def test_a_gradient_criterion_prunes_a_model_whose_forward_caches_a_tensor(importance):
    model = CachedBias()
    x = torch.randn(2, 3, 8, 8)
    p = StructuredPruner(model, x, importance, pruning_ratio=0.5)
    p.collect_activations(_labelled(), progress=False)
    small = p.prune()
    assert small.conv.out_channels == 4 and n_params(small) == n_params(model) - 4 * 27 - 4 - 4 * 5


@pytest.mark.corpus
@pytest.mark.parametrize("importance", ["taylor", "hessian"])
def test_levit_scores_with_gradients_in_eval_mode(importance):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, num_classes=10, img_size=48).eval()
    x = torch.randn(2, 3, 48, 48)
    p = StructuredPruner(model, x, importance, pruning_ratio=0.5, global_pruning=True, max_layer_ratio=0.7)
    g = torch.Generator().manual_seed(1)
    p.collect_activations([(torch.randn(2, 3, 48, 48, generator=g), torch.tensor([1, 7])) for _ in range(2)],
                          progress=False)  # fmt: skip
    small = p.prune()
    assert n_params(small) < 0.6 * n_params(model)
    with torch.no_grad():
        assert small(x).shape == (2, 10)
