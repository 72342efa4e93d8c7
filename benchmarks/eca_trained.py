"""ECA's approximate slicing on a trained model: the sliced model against exact ECA gates.

Session 18 made ECA channels (``EcaModule``: a ``Conv1d(1, 1, k)`` slid along the pooled
channels) prunable approximately: a kept channel's gate then reads other neighbours. This
measures what that costs on a trained model. A tiny timm ResNet (BasicBlock [1, 1, 1, 1],
channels 16-128, ECA in every block) is trained on 4 classes of synthetic 32 x 32 images
(a smooth class template at a random gain and shift, plus noise), pruned at a ratio of 0.5,
and compared with the same pruned model whose ECA gates are computed exactly, over the
full-width channel vector with the pruned channels zero (what the masking oracle computes),
for the default path, the default path without compensation, and ``magnitude``.

    python benchmarks/eca_trained.py [STEPS]      # prints one JSON object
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class ExactEca(nn.Module):
    """ECA over the full-width channel vector with the pruned channels zero."""

    def __init__(self, eca: nn.Module, keep: torch.Tensor, width: int) -> None:
        super().__init__()
        self.eca, self.keep, self.width = eca, keep, width

    def forward(self, x):
        b = x.shape[0]
        full = x.new_zeros(b, self.width)
        full[:, self.keep] = x.mean((2, 3))
        gate = self.eca.gate(self.eca.conv(full.view(b, 1, -1))).view(b, -1)[:, self.keep]
        return x * gate[:, :, None, None]


def data(n: int, seed: int, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, base.shape[0], (n,), generator=gen)
    x = base[y] * (0.5 + torch.rand(n, 1, 1, 1, generator=gen))
    shift = torch.randint(-4, 5, (n, 2), generator=gen)
    x = torch.stack([torch.roll(xi, (int(a), int(b)), (1, 2)) for xi, (a, b) in zip(x, shift, strict=True)])
    return x + 1.2 * torch.randn(x.shape, generator=gen), y


def main(steps: int = 400) -> dict:
    from timm.models.resnet import BasicBlock, ResNet

    from cleanai_core import StructuredPruner
    from cleanai_core.testing import masked_forward

    torch.set_num_threads(1)
    torch.manual_seed(0)
    classes, side = 4, 32
    base = F.interpolate(torch.randn(classes, 3, 4, 4, generator=torch.Generator().manual_seed(1)), size=(side, side))
    xtr, ytr = data(4096, 2, base)
    xte, yte = data(1024, 3, base)
    xcal, _ = data(128, 4, base)
    model = ResNet(
        BasicBlock, [1, 1, 1, 1], num_classes=classes, channels=(16, 32, 64, 128), stem_width=16,
        block_args={"attn_layer": "eca"},
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    t0 = time.thread_time()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (64,))
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    def acc(logits: torch.Tensor) -> float:
        return round(float((logits.argmax(1) == yte).float().mean()), 4)

    with torch.no_grad():
        res: dict = {"train_cpu_s": round(time.thread_time() - t0, 1), "acc_original": acc(model(xte))}
    n0 = sum(p.numel() for p in model.parameters())
    cal = [xcal[i : i + 32] for i in range(0, 128, 32)]
    norms = dict(model.named_modules())
    for tag, importance, kwargs in (
        ("default", None, {}),
        ("default_no_compensation", None, {"bias_compensation": False}),
        ("magnitude", "magnitude", {}),
    ):
        args = (importance,) if importance else ()
        pruner = StructuredPruner(model, xte[:2], *args, pruning_ratio=0.5, **kwargs)
        if importance is None:
            pruner.collect_activations(cal, progress=False)
        small = pruner.prune()
        pruned = pruner.plan().pruned_units()
        keeps = pruner.graph.keep_indices(pruned)
        exact = copy.deepcopy(small)
        for name, module in list(exact.named_modules()):
            if type(module).__name__ == "EcaModule":
                parent, child = name.rsplit(".", 1)
                width = norms[f"{parent}.bn2"].num_features
                keep = keeps.get((f"{parent}.bn2", "channels"), torch.arange(width))
                setattr(exact.get_submodule(parent), child, ExactEca(module, keep, width))
        with torch.no_grad():
            sliced, exact_out = small(xte), exact(xte)
            masked = masked_forward(pruner.graph, pruned, xte)[0]
        res[tag] = {
            "kept": round(sum(p.numel() for p in small.parameters()) / n0, 3),
            "acc_sliced": acc(sliced),
            "acc_exact_eca": acc(exact_out),
            "agree_sliced_exact": round(float((sliced.argmax(1) == exact_out.argmax(1)).float().mean()), 4),
            "rel_logits_sliced_exact": round(float((sliced - exact_out).norm() / exact_out.norm()), 4),
            "acc_masked_uncompensated": acc(masked),
        }
    return res


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 400), indent=1))
