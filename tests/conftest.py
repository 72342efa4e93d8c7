"""Shared fixtures: fake installed distributions, so entry points are tested offline.

A distribution is visible to ``importlib.metadata`` when a ``<name>-<version>.dist-info``
folder holding ``METADATA`` (and ``entry_points.txt``) sits in a folder on ``sys.path``.
:func:`write_dist` writes such a folder next to the plugin's source; nothing is
downloaded or installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from cleanai_core.plugins import set_plugin_manager

EXAMPLE_PLUGIN = Path(__file__).parent.parent / "examples" / "example_plugin"


def write_dist(
    root: Path, name: str, version: str, entry_points: dict[str, str], modules: dict[str, str] | None = None
) -> Path:
    """Make ``root`` hold distribution ``name`` with ``[cleanai]`` entry points and the
    given module sources (``{"pkg/mod.py": "source"}``); returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[cleanai]"] + [f"{ep} = {target}" for ep, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for rel, source in (modules or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


@pytest.fixture(scope="session")
def example_dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that looks like site-packages with ``cleanai-example 0.1`` installed."""
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(
        EXAMPLE_PLUGIN / "cleanai_example", root / "cleanai_example", ignore=shutil.ignore_patterns("__pycache__")
    )
    return write_dist(root, "cleanai-example", "0.1", {"example": "cleanai_example.plugin"})


@pytest.fixture
def with_example(example_dist: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``cleanai-example`` on ``sys.path`` for this test (and the global manager rebuilt)."""
    monkeypatch.syspath_prepend(str(example_dist))
    monkeypatch.delenv("CLEANAI_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("CLEANAI_DISABLED_PLUGINS", raising=False)
    set_plugin_manager(None)
    yield example_dist
    set_plugin_manager(None)


def small_convnet(c1: int, c2: int, hidden: int | None, classes: int, stride: int = 1) -> nn.Module:
    """conv-BN-ReLU twice, pooled, then a two-layer MLP head (seeded); ``hidden=None``: one
    linear layer as the head."""
    torch.manual_seed(0)
    body = [
        nn.Conv2d(3, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1, stride=stride),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]  # made before the head: the seeded weights in this order
    head = [nn.Linear(c2, hidden), nn.ReLU(), nn.Linear(hidden, classes)] if hidden else [nn.Linear(c2, classes)]
    return nn.Sequential(*body, *head)


def tiny_llama(hidden: int, intermediate: int, vocab: int, layers: int = 2) -> nn.Module:
    """A random-weight multi-head (not grouped-query) Llama from a config; skips without transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt in this test, whatever an earlier test in the same worker
    left: a fresh-clone CI run (session 20) found SIGINT (not SIGTERM) no longer raising in one
    xdist worker, so every Ctrl-C test there failed ("DID NOT RAISE"), and no run since showed
    which earlier test left it so. What was there is named in a warning and put back after."""
    import signal
    import warnings

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])
    if handler is not signal.default_int_handler or signal.SIGINT in mask or signal.SIGTERM in mask:
        warnings.warn(f"an earlier test left SIGINT's handler {handler!r}, blocked {sorted(mask)}", stacklevel=2)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, handler)
