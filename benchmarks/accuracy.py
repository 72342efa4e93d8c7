"""Retraining-free accuracy benchmark (issue #4).

Trains three small models on the UCI digits bundled with scikit-learn (seeded, CPU),
then prunes each at several FLOPs targets WITHOUT retraining, with every criterion,
with and without compensation (bias compensation + BatchNorm recalibration), and
reports accuracy on a held-out half of the test split. Calibration (activation
statistics, compensation means, BN recalibration) uses the other half only.

Run::

    python benchmarks/accuracy.py                 # full table -> docs/accuracy.md
    python benchmarks/accuracy.py --quick         # one target, fewer configs
    python benchmarks/accuracy.py --global        # adds global ranking rows
    python benchmarks/accuracy.py --recovery      # issue 17: retraining at 2x and 4x fewer FLOPs
    python benchmarks/accuracy.py --recovery --train-size 200   # ... from 200 train images
    python benchmarks/accuracy.py --bn            # issue 14: BN correction vs none vs train mode

``--recovery`` trains after pruning on the train split only (its own 10% held out for
early stopping): distillation from the original (``cleanai_core.recover``), plain
fine-tuning without a teacher for the same epochs, and gradual pruning inside a training
loop (``GradualPruner``) with the same loss, epochs and held-out split, each over
``--seeds`` seeds. Accuracy is still measured on the evaluation half of the test split.

Needs scikit-learn (the ``test`` extra) for ``sklearn.datasets.load_digits``.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cleanai_core import StructuredPruner, WeightActivationImportance
from cleanai_core.metrics import count_flops, count_params
from cleanai_core.scoring import get_importance

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (0.75, 0.5, 0.35)


# -- data -------------------------------------------------------------------------------


def load_data(seed: int = 0):
    """Digits split 1200 train / 597 test; the test split is halved into calibration
    (298) and evaluation (299). Images in [0, 1]; CNNs get a 16x16 bilinear upsample."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1200], perm[1200:]
    cal, ev = te[: len(te) // 2], te[len(te) // 2 :]
    return (x[tr], y[tr]), (x[cal], y[cal]), (x[ev], y[ev])


# -- models -----------------------------------------------------------------------------


def cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PlainCNN(nn.Module):
    """conv-bn-relu stacks on the native 8x8 images: 8x8 -> 4x4 -> 2x2, global pool, linear head."""

    def __init__(self, w: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            cbr(1, w),
            cbr(w, w),
            nn.MaxPool2d(2),
            cbr(w, 2 * w),
            cbr(2 * w, 2 * w),
            nn.MaxPool2d(2),
            cbr(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.short is None else self.short(x)))


class ResCNN(nn.Module):
    """A small ResNet: stem, two stages of two basic blocks (residual adds + BN)."""

    def __init__(self, w: int = 16) -> None:
        super().__init__()
        self.stem = cbr(1, w)
        self.layer1 = nn.Sequential(Block(w, w), Block(w, w))
        self.layer2 = nn.Sequential(Block(w, 2 * w, 2), Block(2 * w, 2 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 256), nn.Linear(256, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


MODELS = {"plain_cnn": PlainCNN, "res_cnn": ResCNN, "mlp": MLP}


def train(name: str, data, epochs: int = 12, seed: int = 0) -> nn.Module:
    """Seeded training; the weights are cached under ``benchmarks/.cache`` (delete to retrain)."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    cache = ROOT / "benchmarks" / ".cache" / f"{name}_e{epochs}_s{seed}.pt"
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        sched.step()
    cache.parent.mkdir(exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data
    return float((model(x).argmax(1) == y).float().mean())


# -- pruning ------------------------------------------------------------------------------


def criteria() -> dict:
    return {
        "wa_mult": lambda: WeightActivationImportance(),
        "wa_add": lambda: WeightActivationImportance(form="additive"),
        "magnitude": lambda: get_importance("magnitude"),
        "random": lambda: get_importance("random", seed=0),
    }


def prune_one(
    model,
    example,
    cal_loader,
    crit,
    comp: str,
    target: float,
    global_pruning: bool = False,
    bn: bool | None = None,
    bn_samples: int | None = None,
):
    """``comp``: "ls" (least-squares reconstruction + BN correction, the default),
    "mean" (mean/bias compensation + BN correction) or "off". ``bn`` overrides whether
    the BN correction runs (default: with the compensation); ``bn_samples``, how many
    calibration samples it reads (default: the pruner's)."""
    pruner = StructuredPruner(
        model,
        example,
        crit(),
        target_flops=target,
        ignored_layers=[model.fc if not isinstance(model, MLP) else model.fc3],
        bias_compensation=comp != "off",
        reconstruction=comp == "ls",
        recalibrate_bn=comp != "off" if bn is None else bn,
        global_pruning=global_pruning,
        **({} if bn_samples is None else {"bn_samples": bn_samples}),
    )
    pruner.collect_activations(cal_loader, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pruner.prune()


# -- BatchNorm statistics after pruning (issue 14) ---------------------------------------


@torch.no_grad()
def train_mode_recalibration(model: nn.Module, loader) -> nn.Module:
    """The recalibration the BN correction replaced, kept here only as a baseline: every
    BN's running statistics reset and re-estimated in train mode (cumulative average,
    ``momentum=None``) over the calibration batches, then eval."""
    bns = [(m, m.momentum) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for m, _ in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for xb, _ in loader:
        model(xb)
    for m, momentum in bns:
        m.momentum = momentum
    return model.eval()


BN_MODES = ("correction", "none", "train-mode")


def bn_table(names, train_d, cal_d, ev_d) -> list[str]:
    """At each FLOPs target: today's BN correction, no BN statistics update at all, and
    the old train-mode recalibration, with the default criterion and both compensations."""
    cal_loader = DataLoader(TensorDataset(*cal_d), batch_size=64)
    rows = [
        "| model | compensation | FLOPs target | FLOPs kept | BN correction (today) | s | no BN update | s "
        "| train-mode recalibration | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    for name in names:
        model = train(name, train_d)
        example = cal_d[0][:2]
        base_flops = count_flops(model, example)
        for comp in ("ls", "mean"):
            for target in TARGETS:
                cells = []
                for mode in BN_MODES:
                    t0 = time.time()
                    pruned = prune_one(
                        model, example, cal_loader, criteria()["wa_mult"], comp, target, bn=mode == "correction"
                    )
                    if mode == "train-mode":
                        train_mode_recalibration(pruned, cal_loader)
                    cells.append((accuracy(pruned, ev_d), time.time() - t0))
                fl = count_flops(pruned, example) / base_flops
                line = (
                    f"| {name} | {comp} | {target:.2f} | {fl:.3f} | "
                    + " | ".join(f"{a:.4f} | {s:.1f}" for a, s in cells)
                    + " |"
                )
                print(line, flush=True)
                rows.append(line)
    return rows


def bn_samples_table(names, seeds: int, batch: int, caps: list[int]) -> list[str]:
    """Mean accuracy over every model, compensation, FLOPs target and seed with the BN
    correction reading ``caps`` calibration samples (``bn_samples``; the first cap is the
    reference, e.g. 0 = all), in calibration batches of ``batch``: the mean difference to
    the reference, its standard error over the paired cells, and cells ahead / behind."""
    import statistics

    cells: list[list[float]] = []
    for seed in range(seeds):
        train_d, cal_d, ev_d = load_data(seed)
        cal_loader = DataLoader(TensorDataset(*cal_d), batch_size=batch)
        for name in names:
            model = train(name, train_d, seed=seed)
            for comp in ("ls", "mean"):
                for target in TARGETS:
                    cells.append([
                        accuracy(prune_one(model, cal_d[0][:2], cal_loader, criteria()["wa_mult"], comp, target,
                                           bn_samples=cap), ev_d)
                        for cap in caps
                    ])  # fmt: skip
                    print(seed, name, comp, target, cells[-1], flush=True)
    rows = [
        f"| samples read (batches of {batch}) | mean accuracy | vs {caps[0] or 'all'} (points) | standard error "
        "| ahead | behind |",
        "|---|---|---|---|---|---|",
    ]
    for i, cap in enumerate(caps):
        diff = [100 * (c[i] - c[0]) for c in cells]
        se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else 0.0
        mean = statistics.mean(c[i] for c in cells)
        ahead, behind = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
        rows.append(f"| {cap or 'all'} | {mean:.4f} | {statistics.mean(diff):+.2f} | {se:.2f} | {ahead} | {behind} |")
    return rows


# -- recovery (issue 17) ---------------------------------------------------------------------


RECOVERY_TARGETS = (0.5, 0.25)
VAL_FRACTION = 0.1  # recover()'s default held-out share of the train split


def train_subset(train_d, size: int | None, seed: int):
    """``size`` images of the train split drawn with ``seed`` (all of it for ``None``): the
    data a user recovers with when they have little; the teacher was trained on all of it."""
    if size is None or size >= len(train_d[1]):
        return train_d
    perm = torch.randperm(len(train_d[1]), generator=torch.Generator().manual_seed(100 + seed))[:size]
    return tuple(t[perm] for t in train_d)


def held_out_split(train_d, seed: int):
    """The ``(train part, held-out part)`` that ``recover(..., seed=seed)`` splits off."""
    n = len(train_d[1])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * VAL_FRACTION))
    return tuple(t[perm[n_val:]] for t in train_d), tuple(t[perm[:n_val]] for t in train_d)


def gradual_run(model, example, cal_loader, train_d, target: float, epochs: int, steps: int, lr: float, seed: int):
    """The protocol of one-shot + ``recover`` with the pruning spread out: one AdamW
    optimizer (no decay on 1-D parameters), warm-up and cosine decay over all epochs, the
    distillation loss, the same train / held-out split. The ``steps`` ``GradualPruner``
    steps (cubic schedule to ``target`` of the FLOPs, scored on the calibration half) are
    spread over the first epoch's batches, the first on the trained model as one-shot
    pruning does, so that nearly all epochs train at the final size. Among the epochs at
    the final size the one ``recover`` would keep is returned: the best held-out accuracy,
    ties to the lower held-out loss (the training loss)."""
    import copy

    from cleanai_core.gradual import GradualPruner, PruningSchedule
    from cleanai_core.recovery import _lr_lambda, distillation_loss, held_out_metric_and_loss

    torch.manual_seed(seed)
    train_part, held = held_out_split(train_d, seed)
    student = copy.deepcopy(model)
    params = list(student.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [q for q in params if q.dim() > 1], "weight_decay": 0.01},
            {"params": [q for q in params if q.dim() <= 1], "weight_decay": 0.0},
        ],
        lr=lr,
    )
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(*train_part), batch_size=64, shuffle=True, generator=gen)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, round(0.05 * total)))
    gp = GradualPruner(
        student, example, opt, PruningSchedule(final=1 - target, steps=steps),
        ignored_layers=[student.fc if not isinstance(student, MLP) else student.fc3],
    )  # fmt: skip
    step_at = {round(k * len(loader) / steps) for k in range(steps)}  # batch indices of the first epoch
    best, best_loss, best_state = -1.0, float("inf"), None
    for epoch in range(epochs):
        student.train()
        for i, (xb, yb) in enumerate(loader):
            if epoch == 0 and i in step_at and not gp.done:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gp.step(cal_loader)
            with torch.no_grad():
                t_logits = model(xb)
            loss = distillation_loss(student(xb), t_logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        while not gp.done:  # fewer batches than steps: the rest at the end of the epoch
            gp.step(cal_loader)
        _, score, held_loss = held_out_metric_and_loss(student, [held], torch.device("cpu"), "classification", model)
        if score > best or (score == best and held_loss <= best_loss):
            best, best_loss, best_state = score, held_loss, copy.deepcopy(student.state_dict())
    student.load_state_dict(best_state)
    return student.eval()


def nll(model: nn.Module, data) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model.eval()(data[0]), data[1]))


def spread(values) -> str:
    """``mean ± standard deviation`` (population, over the seeds) in percent."""
    t = torch.tensor(values, dtype=torch.float64) * 100
    return f"{float(t.mean()):.2f} ± {float(t.std(correction=0)):.2f}"


def recovery_table(
    names, train_d, cal_d, ev_d, epochs: int, lr: float, seeds: int, train_size: int | None = None
) -> list[str]:
    """Per model and FLOPs target, over ``seeds`` seeds (each its own held-out split and
    shuffling, shared by the three methods; with ``train_size`` also its subset of the train
    split): distillation, fine-tuning without a teacher,
    gradual pruning. Accuracy in % as mean ± spread, the paired difference teacher − no
    teacher in evaluation images per seed, and the evaluation cross-entropy (NLL)."""
    from cleanai_core.recovery import recover

    cal_loader = DataLoader(TensorDataset(*cal_d), batch_size=64)
    steps = 2  # 3 landed on other sizes than one-shot at 2x (0.456 vs 0.474 on res_cnn)
    rows = [
        "| model | FLOPs target | FLOPs kept | original | no retraining | recovered (teacher) | NLL | s "
        "| % of original | fine-tuned (no teacher) | NLL | s | teacher − none (images per seed; wins/losses/ties) "
        "| gradual (FLOPs kept) | NLL | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    for name in names:
        model = train(name, train_d)
        example = cal_d[0][:2]
        base = accuracy(model, ev_d)
        base_flops = count_flops(model, example)
        for target in RECOVERY_TARGETS:
            pruned = prune_one(model, example, cal_loader, criteria()["wa_mult"], "ls", target)
            fl = count_flops(pruned, example) / base_flops
            runs = {"kd": [], "ft": [], "gradual": []}  # (accuracy, nll, seconds) per seed
            g_flops = []
            for seed in range(seeds):
                data = train_subset(train_d, train_size, seed)
                for key, teacher in (("kd", model), ("ft", None)):
                    t0 = time.time()
                    out, _ = recover(
                        pruned, teacher, TensorDataset(*data), epochs=epochs, lr=lr, seed=seed, progress=False
                    )
                    runs[key].append((accuracy(out, ev_d), nll(out, ev_d), time.time() - t0))
                t0 = time.time()
                g = gradual_run(model, example, cal_loader, data, target, epochs, steps, lr, seed)
                runs["gradual"].append((accuracy(g, ev_d), nll(g, ev_d), time.time() - t0))
                g_flops.append(count_flops(g, example) / base_flops)
            cell = {k: (spread([r[0] for r in v]), sum(r[1] for r in v) / seeds, sum(r[2] for r in v) / seeds)
                    for k, v in runs.items()}  # fmt: skip
            kd_mean = sum(r[0] for r in runs["kd"]) / seeds
            pairs = zip(runs["kd"], runs["ft"], strict=True)
            diff = " ".join(f"{round((a[0] - b[0]) * len(ev_d[1])):+d}" for a, b in pairs)
            wins = sum(a[0] > b[0] for a, b in zip(runs["kd"], runs["ft"], strict=True))
            losses = sum(a[0] < b[0] for a, b in zip(runs["kd"], runs["ft"], strict=True))
            diff += f" ({wins}/{losses}/{seeds - wins - losses})"
            line = (
                f"| {name} | {target:.2f} | {fl:.3f} | {100 * base:.2f} | {100 * accuracy(pruned, ev_d):.2f} "
                f"| {cell['kd'][0]} | {cell['kd'][1]:.4f} | {cell['kd'][2]:.1f} | {100 * kd_mean / base:.1f} "
                f"| {cell['ft'][0]} | {cell['ft'][1]:.4f} | {cell['ft'][2]:.1f} | {diff} "
                f"| {cell['gradual'][0]} ({max(g_flops):.3f}) | {cell['gradual'][1]:.4f} | {cell['gradual'][2]:.1f} |"
            )
            print(line, flush=True)
            rows.append(line)
    return rows


def machine_line(t_start: float, extra: str = "") -> str:
    return (
        f"Machine: {platform.processor() or platform.machine()}, {platform.system()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {extra}total {time.time() - t_start:.0f} s."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the 0.5 FLOPs target")
    ap.add_argument("--global", dest="glob", action="store_true", help="also global ranking (default criterion)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--recovery", action="store_true", help="only the recovery table (issue 17)")
    ap.add_argument("--bn", action="store_true", help="only the BatchNorm table: correction, none, train mode (#14)")
    ap.add_argument(
        "--bn-samples",
        default=None,
        help="only the table of the BN correction's bn_samples: comma-separated counts, the first the reference "
        "(e.g. 0,256,128,64,32; 0 = all), over --seeds seeds in calibration batches of --bn-batch",
    )
    ap.add_argument("--bn-batch", type=int, default=16, help="--bn-samples: calibration batch size")
    ap.add_argument("--epochs", type=int, default=10, help="--recovery: training epochs after pruning")
    ap.add_argument("--seeds", type=int, default=3, help="--recovery: seeds per cell (mean ± spread)")
    ap.add_argument("--lr", type=float, default=3e-3, help="--recovery: AdamW learning rate (default 3e-3)")
    ap.add_argument(
        "--train-size", type=int, default=None, help="--recovery: recover from this many train images (seeded subset)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a crowded machine)")
    ap.add_argument(
        "--out",
        default=str(ROOT / "docs" / "accuracy.md"),
        help="Markdown file; the table replaces the part between the table markers (or the file is created)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    train_d, cal_d, ev_d = load_data()
    if args.bn_samples:
        caps = [int(c) for c in args.bn_samples.split(",")]
        names = [n for n in args.models.split(",") if n != "mlp"]
        rows = bn_samples_table(names, args.seeds, args.bn_batch, caps)
        meta = machine_line(t_start, f"{args.seeds} seeds; ")
        print("\n".join([*rows, "", meta]))
        write_table(Path(args.out), "\n".join([*rows, "", meta]), BN_SAMPLES_MARKERS)
        return
    if args.bn:
        rows = bn_table([n for n in args.models.split(",") if n != "mlp"], train_d, cal_d, ev_d)
        meta = machine_line(t_start)
        print(meta)
        write_table(Path(args.out), "\n".join([*rows, "", meta]), BN_MARKERS)
        return
    if args.recovery:
        rows = recovery_table(
            args.models.split(","), train_d, cal_d, ev_d, args.epochs, args.lr, args.seeds, args.train_size
        )
        size = f"{args.train_size} train images, " if args.train_size else ""
        meta = machine_line(t_start, f"{size}{args.epochs} epochs, lr {args.lr}, {args.seeds} seeds; ")
        print(meta)
        tag = ("" if args.epochs == 10 else f"-e{args.epochs}") + (f"-n{args.train_size}" if args.train_size else "")
        markers = tuple(m.replace("recovery", f"recovery{tag}") for m in RECOVERY_MARKERS)
        write_table(Path(args.out), "\n".join([*rows, "", meta]), markers)
        return
    cal_loader = DataLoader(TensorDataset(*cal_d), batch_size=64)
    targets = (0.5,) if args.quick else TARGETS
    rows = []
    header = (
        "| model | criterion | ranking | compensation | FLOPs target | FLOPs kept | params kept | accuracy "
        "| % of baseline |"
    )
    sep = "|---|---|---|---|---|---|---|---|---|"
    print(header)
    print(sep)
    for name in args.models.split(","):
        t0 = time.time()
        model = train(name, train_d)
        example = cal_d[0][:2]
        base_acc = accuracy(model, ev_d)
        base_flops = count_flops(model, example)
        base_params = count_params(model)
        line = (
            f"| {name} | (unpruned; {time.time() - t0:.0f} s to train or load) | - | - | 1.00 | 1.000 | 1.000 "
            f"| {base_acc:.4f} | 100.0 |"
        )
        print(line, flush=True)
        rows.append(line)
        configs = [(c, comp, False) for c in criteria() for comp in ("ls", "mean", "off")]
        if args.glob:
            configs += [("wa_mult", "ls", True), ("wa_mult", "mean", True), ("magnitude", "ls", True)]
        for target in targets:
            for cname, comp, glob in configs:
                pruned = prune_one(model, example, cal_loader, criteria()[cname], comp, target, glob)
                fl = count_flops(pruned, example) / base_flops
                pa = count_params(pruned) / base_params
                acc = accuracy(pruned, ev_d)
                line = (
                    f"| {name} | {cname} | {'global' if glob else 'uniform'} | {comp} | "
                    f"{target:.2f} | {fl:.3f} | {pa:.3f} | {acc:.4f} | {100 * acc / base_acc:.1f} |"
                )
                print(line, flush=True)
                rows.append(line)
    meta = machine_line(t_start)
    print(meta)
    write_table(Path(args.out), "\n".join([header, sep, *rows, "", meta]))


START, END = "<!-- table:start -->", "<!-- table:end -->"
RECOVERY_MARKERS = ("<!-- recovery:start -->", "<!-- recovery:end -->")
BN_MARKERS = ("<!-- bn:start -->", "<!-- bn:end -->")
BN_SAMPLES_MARKERS = ("<!-- bn-samples:start -->", "<!-- bn-samples:end -->")


def write_table(path: Path, table: str, markers: tuple[str, str] = (START, END)) -> None:
    """Put ``table`` between the markers of ``path`` (keeping the prose around it)."""
    start, end = markers
    block = f"{start}\n{table}\n{end}"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = (text + "\n\n" if text else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
