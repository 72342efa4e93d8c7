"""A torchvision ResNet-18 on an image folder: the command line and the Python API side by side.

    python examples/example_resnet.py              # about 40 s of CPU time
    python examples/example_resnet.py --per-class 4 --epochs 1 --train-samples 200   # the CI setting

What it does:

1. writes a small image folder (one sub-folder per class, 64x64 PNGs) made from the
   embedded UCI digits, the layout of your own test images (``test_images/cat/1.jpg``);
2. trains ``torchvision.models.resnet18(weights=None, num_classes=10)`` briefly on other
   digits and saves its ``state_dict``: this stands in for your trained model;
3. prunes it with the **command line**:

       cleanai prune --model torchvision:resnet18 --weights resnet18_digits.pt --num-classes 10 \\
                     --data images/ --image-size 64 --ratio 0.3 --out pruned_cli/

4. prunes it again with the **Python API**, the same steps the command runs, and saves
   and reloads the result with ``save_pruned`` / ``load_pruned``.

Nothing is downloaded: the weights are trained here (``weights=None``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from cleanai_core import StructuredPruner, WeightActivationImportance, load_pruned
from cleanai_core.io import save_pruned
from cleanai_plugins.io.demo import digits_tensors

SIZE = 64
# what `cleanai prune --image-size 64` applies to an image folder for a torchvision model
TRANSFORM = transforms.Compose(
    [
        transforms.Resize(round(SIZE / 0.875)),
        transforms.CenterCrop(SIZE),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ]
)


def to_image(x: torch.Tensor) -> Image.Image:
    """An 8x8 digit in [0, 1] as a 64x64 RGB picture (upscaled, so the transform sees real pixels)."""
    grey = (x.squeeze(0) * 255).round().to(torch.uint8)
    return Image.fromarray(grey.numpy()).resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")


def write_image_folder(root: Path, x: torch.Tensor, y: torch.Tensor, per_class: int) -> int:
    """``root/<digit>/<n>.png``, ``per_class`` images per digit; returns the image count."""
    count = 0
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True)
        for n, i in enumerate((y == digit).nonzero().squeeze(1)[:per_class].tolist()):
            to_image(x[i]).save(root / str(digit) / f"{n}.png")
            count += 1
    return count


def train_resnet(x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    images = torch.stack([TRANSFORM(to_image(xi)) for xi in x])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(images[idx]), y[idx]).backward()
            opt.step()
    # a few quick epochs leave BatchNorm's running statistics behind the weights: recompute
    # them over the training images (what a full training run converges to anyway)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average
        for idx in torch.arange(len(images)).split(64):
            model(images[idx])
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    right = total = 0
    for xb, yb in loader:
        right += int((model(xb).argmax(1) == yb).sum())
        total += len(yb)
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description="ResNet-18 on an image folder: CLI and API side by side")
    parser.add_argument("--per-class", type=int, default=10, help="images per class in the folder (default 10)")
    parser.add_argument("--train-samples", type=int, default=300, help="digits to train on (default 300)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    parser.add_argument("--ratio", type=float, default=0.3, help="share of channels to remove (default 0.3)")
    parser.add_argument("--work", help="folder for the images, weights and outputs (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        x, y = digits_tensors()
        # the last `train_samples` digits train the model; the folder takes its images from the others
        split = len(x) - args.train_samples
        n_images = write_image_folder(work / "images", x[:split], y[:split], args.per_class)
        print(f"[1] wrote {n_images} images of {SIZE}x{SIZE} to {work / 'images'}/<class>/")

        model = train_resnet(x[split:], y[split:], args.epochs)
        torch.save(model.state_dict(), work / "resnet18_digits.pt")
        print(f"[2] trained resnet18 (weights=None) on {args.train_samples} digits, saved its state_dict")

        # -- 3. the command line ------------------------------------------------------------
        cmd = [
            sys.executable, "-m", "cleanai_core.cli", "prune",
            "--model", "torchvision:resnet18", "--weights", str(work / "resnet18_digits.pt"), "--num-classes", "10",
            "--data", str(work / "images"), "--image-size", str(SIZE),
            "--ratio", str(args.ratio), "--batch-size", "16", "--latency-repeats", "3",
            "--out", str(work / "pruned_cli"), "--quiet",
        ]  # fmt: skip
        print("[3] $ cleanai " + " ".join(cmd[3:]))
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            sys.exit(f"cleanai prune failed:\n{done.stderr}")
        print("    " + done.stdout.strip().replace("\n", "\n    "))
        cli = json.loads((work / "pruned_cli" / "report.json").read_text())
        print(f"    CLI params: {cli['params_before']} -> {cli['params_after']}")

        # -- 4. the Python API: the same job ----------------------------------------------------
        data = ImageFolder(str(work / "images"), transform=TRANSFORM)
        # the command's split: a seeded permutation, half scores the channels, half measures accuracy
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
        calib = DataLoader(Subset(data, perm[: len(data) // 2]), batch_size=16)
        held_out = DataLoader(Subset(data, perm[len(data) // 2 :]), batch_size=16)

        model = torchvision.models.resnet18(weights=None, num_classes=10)
        model.load_state_dict(torch.load(work / "resnet18_digits.pt", weights_only=True))
        model.eval()
        pruner = StructuredPruner(
            model,
            example_inputs=torch.randn(1, 3, SIZE, SIZE),
            importance=WeightActivationImportance(weight_ratio=0.5, activation_ratio=0.5),
            pruning_ratio=args.ratio,
            ignored_layers=[model.fc],  # the classifier head keeps its 10 outputs (also the default)
        )
        pruner.collect_activations(calib, progress=False)
        pruned = pruner.prune()
        report = pruner.report()
        print(f"[4] API params: {report['params_before']} -> {report['params_after']}")
        print(f"    API accuracy: {accuracy(model, held_out):.4f} -> {accuracy(pruned, held_out):.4f}")
        print(f"    layer1.0.conv1: {model.layer1[0].conv1.out_channels} -> {pruned.layer1[0].conv1.out_channels}")

        save_pruned(work / "pruned_api", pruned, pruner.history, "torchvision:resnet18", options={"num_classes": 10})
        again = load_pruned(work / "pruned_api")
        probe = next(iter(held_out))[0]
        with torch.no_grad():
            same = torch.allclose(again(probe), pruned(probe), atol=1e-5)
        print(f"    saved and reloaded with load_pruned: outputs equal: {same}")


if __name__ == "__main__":
    main()
