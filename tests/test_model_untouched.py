"""The user's model object is left exactly as it was: every module's own mode, every
buffer (quantization observers included), hook handles, and ``requires_grad`` of new biases."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import small_convnet
from torch import nn

from cleanai_core import StructuredPruner

torch.ao.quantization = pytest.importorskip("torch.ao.quantization")


def _net() -> nn.Sequential:
    return small_convnet(8, 8, None, 4)


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n))


def _prune(model: nn.Module, **kw) -> nn.Module:
    pruner = StructuredPruner(model, _x(), pruning_ratio=0.5, **kw)
    pruner.collect_activations([_x(4), _x(6)], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pruner.prune()


def _modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def _assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_buffers())
    assert sorted(after) == sorted(before)
    changed = [
        n for n, b in before.items() if after[n].shape != b.shape or not torch.equal(after[n].view(-1), b.view(-1))
    ]
    assert changed == []


def test_frozen_batchnorm_inside_a_training_model_stays_frozen():
    model = _net().train()
    model[1].eval()  # a frozen BN, as in detection backbones
    modes = _modes(model)
    pruned = _prune(model)
    assert _modes(model) == modes
    assert model[1].training is False and model[4].training is True
    assert _modes(pruned) == modes  # the pruned copy keeps each module's mode too


def test_data_parallel_of_an_eval_model_stays_eval():
    model = nn.DataParallel(_net().eval())
    modes = _modes(model)
    assert modes["module"] is False and modes[""] is True
    _prune(model)
    assert _modes(model) == modes


@pytest.mark.parametrize("qat", [False, True], ids=["prepare", "prepare_qat"])
def test_quantization_observers_are_not_updated(qat):
    tq = torch.ao.quantization
    model = _net().train() if qat else _net().eval()
    model.qconfig = tq.get_default_qat_qconfig("x86") if qat else tq.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (tq.prepare_qat if qat else tq.prepare)(model, inplace=True)
    before = _buffers(model)
    assert any("activation_post_process" in n for n in before)
    modes = _modes(model)
    pruner = StructuredPruner(model, _x(), pruning_ratio=0.5)
    _assert_bit_identical(model, before)  # tracing
    pruner.collect_activations([_x(4), _x(6)], progress=False)
    _assert_bit_identical(model, before)  # calibration
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.prune()
    pruner.report()
    _assert_bit_identical(model, before)  # slicing, verification, FLOPs
    assert _modes(model) == modes


def test_batchnorm_statistics_untouched_in_train_mode():
    model = _net().train()
    before = _buffers(model)
    _prune(model)
    _assert_bit_identical(model, before)


def test_inplace_keeps_the_users_hook_handles_valid():
    model = _net().eval()
    calls: list[int] = []
    handle = model[3].register_forward_hook(lambda m, a, o: calls.append(1))
    pre = model[0].register_forward_pre_hook(lambda m, a: calls.append(2))
    pruned = _prune(model, inplace=True)
    assert pruned is model
    calls.clear()
    model(_x())
    assert sorted(calls) == [1, 2]  # the hooks still run on the pruned model
    handle.remove()
    pre.remove()
    calls.clear()
    model(_x())
    assert calls == []  # and remove() still removes them


def test_the_pruned_copy_does_not_carry_the_users_hooks():
    # the hooks were copied onto the pruned copy: they fired on its forward (into the user's list,
    # with pruned widths), and the user's handles could not remove them
    model = _net().eval()
    calls: list[tuple[int, ...]] = []
    handle = model[3].register_forward_hook(lambda m, a, o: calls.append(tuple(o.shape)))
    model[0].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[:1]))
    model[3].register_full_backward_hook(lambda m, gi, go: calls.append((-1,)))
    pruner = StructuredPruner(model, _x(), pruning_ratio=0.5)
    pruner.collect_activations([_x(4), _x(6)], progress=False)
    with pytest.warns(UserWarning, match=r"3 forward/backward hook\(s\) on 0, 3 stay on the original"):
        pruned = pruner.prune()
    calls.clear()
    pruned(_x()).sum().backward()
    assert calls == [] and pruned[3].out_channels == 4
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in pruned.modules())
    model(_x())
    assert calls == [(4,), (4, 8, 8, 8)]  # the original keeps them, at its own widths
    handle.remove()
    assert len(model[3]._forward_hooks) == 0


def test_the_pruned_copy_keeps_the_hooks_the_model_computes_with():
    # quantization observers (torch's own hooks) and a hook bound to an object a module holds
    # (timm's FeatureHooks of a features_only net) are part of the model: they stay on the copy
    class Taps:
        def __init__(self):
            self.seen: list[tuple[int, ...]] = []

        def hook(self, m, a, o):
            self.seen.append(tuple(o.shape))

    model = _net().eval()
    model.taps = Taps()
    model[3].register_forward_hook(model.taps.hook)
    tq = torch.ao.quantization
    model[8].qconfig = tq.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.prepare(model, inplace=True)
    assert len(model[8]._forward_hooks) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing to warn about: no hook of the user's
        pruned = StructuredPruner(model, _x(), importance="magnitude", pruning_ratio=0.5).prune()
    assert len(pruned[8]._forward_hooks) == 1 and len(pruned[3]._forward_hooks) == 1
    model.taps.seen.clear()
    pruned.taps.seen.clear()
    pruned(_x())
    assert pruned.taps is not model.taps and pruned.taps.seen == [(4, 4, 8, 8)] and model.taps.seen == []
    assert bool(pruned[8].activation_post_process.max_val > 0)  # the copy's observer ran


def test_compensation_gives_a_frozen_layer_a_frozen_bias():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1, bias=False),
    )
    for p in model.parameters():
        p.requires_grad_(False)
    model[4].weight.requires_grad_(True)  # a trainable head gets a trainable bias
    pruned = _prune(model)
    biases = {n: p.requires_grad for n, p in pruned.named_parameters() if n.endswith("bias")}
    assert biases == {"2.bias": False, "4.bias": True}


class _AttentionWithToken(nn.Module):
    """A bare parameter (zeroed in place by the old oracle copy) and an attention module
    whose pruner zeroes its own weights (``mask``), next to BatchNorm buffers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 16)
        self.token = nn.Parameter(torch.randn(1, 1, 16))
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x) + self.token
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.bn(h.transpose(1, 2)).mean(2))


def test_the_masking_oracle_in_verification_leaves_the_users_tensors_alone():
    from cleanai_core.graph.dependency import DependencyGraph
    from cleanai_core.masking import masked_outputs
    from cleanai_core.testing import random_units

    model = _AttentionWithToken().eval()
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = DependencyGraph(model, x)
    pruned = random_units(graph, 0.5)
    assert int(pruned.sum()) > 0
    out = masked_outputs(graph, pruned, x)[0]
    assert not torch.allclose(out, model(x))  # something was zeroed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    pruner.collect_activations([x, 2 * x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = pruner.prune()
    assert small.attn.embed_dim < 16 or small.embed.out_features < 16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
