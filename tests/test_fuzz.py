"""Generated bad input: every run ends in success or a clean error, never a traceback;
the user's files and model are never changed; a pruned model always runs.

Counts are controlled by ``CLEANAI_FUZZ_EXAMPLES`` (default keeps the suite fast)."""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.cli import main
from cleanai_core.errors import CleanAIError, UserError

N = int(os.environ.get("CLEANAI_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    x = torch.rand(24, 1, 8, 8)
    y = torch.randint(0, 10, (24,))
    torch.save((x, y), root / "data.pt")
    from cleanai_plugins.io.demo import DigitsCNN

    torch.save(DigitsCNN().state_dict(), root / "weights.pt")
    (root / "garbage.pt").write_bytes(os.urandom(256))
    (root / "empty.pt").write_bytes(b"")
    return root


def _digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


OPTION_VALUES = {
    "--ratio": ["0.3", "0", "1", "-0.2", "1.5", "nan", "abc", ""],
    "--target-flops": ["0.5", "0", "2", "x"],
    "--alpha": ["0.5", "-1", "q"],
    "--beta": ["0.5", "-1", "inf"],
    "--importance": ["weight_activation", "magnitude", "nope", ""],
    "--round-to": ["8", "0", "-3", "two"],
    "--round-mode": ["nearest", "up", "down", ""],
    "--calib-batches": ["1", "0", "-1", "x"],
    "--batch-size": ["8", "0", "-4", "big"],
    "--calib-fraction": ["0.5", "0", "1", "7"],
    "--layer-ratio": ["features.0=0.5", "nomatch=0.5", "features.0=2", "=", "features.0"],
    "--ignore": ["classifier", "nomatch.*", "*"],
    "--seed": ["0", "-1", "s"],
    "--device": ["cpu", "tpu", "cuda:99"],
    "--weights": ["weights.pt", "garbage.pt", "missing.pt", "empty.pt"],
    "--data": ["data.pt", "garbage.pt", "missing.pt", "empty.pt", "nomodule:nofunction"],
    "--model": ["cleanai_plugins.io.demo:DigitsCNN", "timm:not_a_model", "missing.pt", "garbage.pt", "no.such:thing"],
}
FLAGS = ["--global", "--no-bias-compensation", "--no-bn-recalibration", "--quiet", "--overwrite", "--trust-model"]


@st.composite
def argvs(draw):
    argv = ["prune", "--dry-run", "--quiet"]
    for opt, values in OPTION_VALUES.items():
        if opt in ("--model", "--data") or draw(st.booleans()):
            argv += [opt, draw(st.sampled_from(values))]
    argv += draw(st.lists(st.sampled_from(FLAGS), max_size=3, unique=True))
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(st.sampled_from(["--bogus", "extra", "--ratio"])))
    return argv


@FUZZ
@given(argv=argvs(), with_out=st.booleans())
def test_cli_never_tracebacks(files, tmp_path_factory, argv, with_out):
    before = _digest(files)
    out = tmp_path_factory.mktemp("out") / "result"
    argv = [
        a if a not in ("weights.pt", "garbage.pt", "missing.pt", "empty.pt", "data.pt") else str(files / a)
        for a in argv
    ]
    if with_out:
        argv += ["--out", str(out)]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    assert code in (0, 1, 2)
    assert _digest(files) == before
    assert not out.exists()  # --dry-run writes nothing, errors write nothing


@FUZZ
@given(
    text=st.text(max_size=200)
    | st.sampled_from(
        [
            "ratio = 2",
            "ratio = 'x'",
            "unknown = 1",
            "[section]\nratio=0.3",
            "ratio = 0.3\nratio = 0.4",
            "layer_ratio = 3",
            "ignore = 5",
            "importance = 7",
            "alpha = []",
        ]
    )
)
def test_config_files_never_traceback(files, tmp_path_factory, text):
    cfg = tmp_path_factory.mktemp("cfg") / "c.toml"
    cfg.write_text(text)
    argv = [
        "prune",
        "--dry-run",
        "--quiet",
        "--model",
        "cleanai_plugins.io.demo:DigitsCNN",
        "--data",
        str(files / "data.pt"),
        "--config",
        str(cfg),
    ]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code in (0, 1, 2)


class Block(nn.Module):
    def __init__(self, c: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(c, c, 3, padding=1, groups=c if kind == "dw" else 1)
        self.bn = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.b(torch.relu(self.bn(self.a(x))))
        if self.kind == "res":
            return x + y
        if self.kind == "cat":
            return torch.cat([x, y], 1)[:, : x.shape[1]] + y
        return y


@st.composite
def models(draw):
    c = draw(st.sampled_from([4, 6, 8]))
    kinds = draw(st.lists(st.sampled_from(["res", "plain", "dw", "cat"]), min_size=1, max_size=3))
    layers = [nn.Conv2d(3, c, 3, padding=1)] + [Block(c, k) for k in kinds]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5)).eval()


@FUZZ
@given(
    model=models(),
    ratio=st.floats(-0.5, 1.5),
    importance=st.sampled_from(["magnitude", "weight_activation", "random", "lamp", "bn_scale", "nope"]),
    global_pruning=st.booleans(),
    round_to=st.sampled_from([None, 2, 3, 0]),
    round_mode=st.sampled_from(["up", "nearest", "down"]),
    compensation=st.booleans(),
    inplace=st.booleans(),
)
def test_random_options_keep_invariants(
    model, ratio, importance, global_pruning, round_to, round_mode, compensation, inplace
):
    x = torch.randn(2, 3, 6, 6)
    reference = model(x)
    state = copy.deepcopy(model.state_dict())
    try:
        pruner = StructuredPruner(
            model,
            x,
            importance,
            pruning_ratio=ratio,
            global_pruning=global_pruning,
            round_to=round_to,
            round_mode=round_mode,
            bias_compensation=compensation,
            inplace=inplace,
        )
        if importance == "weight_activation":
            pruner.collect_activations([torch.randn(4, 3, 6, 6)] * 2, progress=False)
        pruned = pruner.prune()
    except UserError:
        pruned = None
    except CleanAIError as exc:  # a clean failure is allowed, a traceback is not
        pytest.fail(f"unexpected failure: {exc}")
    if pruned is None or not inplace:
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k
        assert torch.equal(model(x), reference)
    if pruned is not None:
        assert pruned(x).shape == reference.shape
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
