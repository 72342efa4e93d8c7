"""The pipeline on a CUDA device: graph, calibration (also sequential and taylor),
compensation and reconstruction, verification, report, save and ``load_pruned``.

Skipped where no GPU is present. ``CLEANAI_CUDA_TEST_DEVICE=cpu`` runs the same tests on
the CPU (to check the tests themselves on a machine without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import small_convnet, tiny_llama
from torch import nn

from cleanai_core import StructuredPruner

DEVICE = os.environ.get("CLEANAI_CUDA_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _net() -> nn.Module:
    return small_convnet(16, 32, 64, 10, stride=2)


def _batches(device, dtype=torch.float32, n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 3, 12, 12, generator=g).to(device, dtype), torch.randint(0, 10, (4,), generator=g).to(device))
        for _ in range(n)
    ]


def _prune(device, importance=None, dtype=torch.float64, **collect):
    model = _net().to(device, dtype).eval()
    example = torch.randn(1, 3, 12, 12).to(device, dtype)
    # round_to=None on both devices (its default depends on the device): the same units go
    pruner = StructuredPruner(model, example, importance=importance, pruning_ratio=0.4, round_to=None)
    pruner.collect_activations(_batches(device, dtype), progress=False, **collect)
    pruned = pruner.prune()
    return pruner, pruned


def test_round_to_defaults_to_what_pays_on_the_device():
    model = _net().to(DEVICE).eval()
    pruner = StructuredPruner(model, torch.randn(1, 3, 12, 12).to(DEVICE), "magnitude", pruning_ratio=0.3)
    assert pruner.round_to == (8 if DEVICE.startswith("cuda") else None)
    pruner.prune()
    layers = [(r["channels_before"], r["channels_after"]) for r in pruner.report()["layers"]]
    assert any(after < before for before, after in layers)
    assert all(after % (pruner.round_to or 1) == 0 or after == before for before, after in layers)


@pytest.mark.parametrize("importance", [None, "taylor"])
def test_cuda_prunes_like_cpu(importance):
    """float64 on both devices: the same units go and the pruned models agree."""
    gpu, gpu_model = _prune(DEVICE, importance)
    cpu, cpu_model = _prune("cpu", importance)
    assert {p.device.type for p in gpu_model.parameters()} == {torch.device(DEVICE).type}
    idx = [rec["pruned_indices"] for rec in gpu.report()["layers"]]
    assert idx == [rec["pruned_indices"] for rec in cpu.report()["layers"]] and any(idx)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(gpu_model(x.to(DEVICE)).cpu(), cpu_model(x), rtol=1e-9, atol=1e-9)
    report = gpu.report()
    assert report["params_after"] < report["params_before"] and report["flops_after"] < report["flops_before"]


def test_cuda_bf16_channels_last_calibration():
    """bf16 channels-last activations: statistics in float64 on the CPU, pruning runs."""
    model = _net().to(DEVICE, torch.bfloat16).to(memory_format=torch.channels_last).eval()
    pruner = StructuredPruner(model, torch.randn(1, 3, 12, 12).to(DEVICE, torch.bfloat16), pruning_ratio=0.3)
    batches = [(x.to(memory_format=torch.channels_last), y) for x, y in _batches(DEVICE, torch.bfloat16)]
    pruner.collect_activations(batches, progress=False)
    st = pruner.stats[("3", "in")]
    assert st.count == 3 * 4 * 12 * 12 and st.mean.dtype == torch.float64 and st.mean.device.type == "cpu"
    assert st.cov is not None and st.cov.shape == (16, 16)
    pruned = pruner.prune()
    assert pruned(batches[0][0]).shape == (4, 10)


def test_cuda_cli_end_to_end(tmp_path):
    """``cleanai prune --device cuda`` on torchvision resnet18, then ``load_pruned`` onto
    the device: same outputs as the pruned model the run saved."""
    torchvision = pytest.importorskip("torchvision")
    from cleanai_core.cli import main
    from cleanai_core.io import load_pruned

    torch.manual_seed(0)
    torch.save((torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))), tmp_path / "data.pt")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "w.pt")
    args = ["prune", "--model", "torchvision:resnet18", "--num-classes", "10", "--weights", str(tmp_path / "w.pt")]
    args += ["--data", str(tmp_path / "data.pt"), "--ratio", "0.5", "--batch-size", "8", "--device", DEVICE]
    args += ["--out", str(tmp_path / "out"), "--latency-repeats", "2", "--quiet"]
    assert main(args) == 0
    model = load_pruned(tmp_path / "out", map_location=DEVICE)
    assert {p.device.type for p in model.parameters()} == {torch.device(DEVICE).type}
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert model.conv1.weight.shape == state["conv1.weight"].shape and model.conv1.weight.shape[0] < 64
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    assert model(x).shape == (2, 10)


def test_cuda_sequential_calibration():
    model = tiny_llama(64, 128, 64).to(DEVICE)
    batches = [{"input_ids": torch.randint(0, 64, (2, 8), device=DEVICE)} for _ in range(2)]
    pruner = StructuredPruner(model, batches[0], pruning_ratio=0.3, output_transform=lambda o: o.logits)
    pruner.collect_activations(batches, progress=False, sequential=True)
    assert pruner.stats[("lm_head", "in")].count == 2 * 2 * 8
    pruned = pruner.prune()
    assert pruned(**batches[0]).logits.shape == (2, 8, 64)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
