"""Hugging Face text models, session 18: one cause per test (tiny models from configs,
``tests/hf_families.py``; nothing downloaded), and the user-side behaviours a text prune
meets (hidden states asked for, a model called before it is pruned). The families run in
the corpus sweep too (``pytest -m corpus tests/test_hf_corpus.py``)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_families import build  # noqa: E402

from cleanai_core import StructuredPruner  # noqa: E402


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def hidden_states(model, inputs, **kw) -> list[torch.Tensor] | None:
    with torch.no_grad():
        out = model(*inputs, **kw)
    return None if out.hidden_states is None else list(out.hidden_states)


def test_a_model_that_returned_hidden_states_prunes_to_one_that_still_does():
    """transformers installs its output-capturing hooks on the first call that asks for
    ``output_hidden_states`` and marks the model with an attribute. The pruned copy kept the
    mark but not the hooks (taken for the user's, with a warning telling the user to
    register them again): it returned ``hidden_states=None`` when asked. An installed
    library's hooks on its own modules are the model's now, and stay on the copy."""
    model, inputs, _ = build("llama-gqa")
    assert len(hidden_states(model, inputs, output_hidden_states=True)) == 3  # hooks installed now
    assert hooks(model) == 4
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*hook")
        small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4).prune()
    assert hooks(small) == 4 and params(small) < params(model)
    states = hidden_states(small, inputs, output_hidden_states=True)
    assert states is not None and [tuple(h.shape) for h in states] == [(1, 8, 64)] * 3
    assert hidden_states(small, inputs) is None  # not asked: none


def test_a_config_that_asks_for_hidden_states_leaves_the_model_as_it_was():
    """With ``config.output_hidden_states=True``, every run of the model during a prune
    (trace, checks) installed transformers' hooks once more: the attribute that says they
    are installed was put back, the hooks were not. The user's model then returned 7 hidden
    states for 2 layers (12 hooks), the pruned one 5. Hooks a forward registers now go with
    the rest of the state a forward leaves."""
    model, inputs, _ = build("llama-gqa")
    model.config.output_hidden_states = True
    small = StructuredPruner(model, inputs, importance="magnitude", pruning_ratio=0.4).prune()
    assert hooks(model) == 0 and hooks(small) == 0
    assert len(hidden_states(small, inputs)) == 3
    assert len(hidden_states(model, inputs)) == 3 and hooks(model) == 4
