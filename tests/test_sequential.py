"""Sequential (block-by-block) calibration gives the statistics of a whole-model pass;
the statistics budget bounds the covariance memory."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from cleanai_core import StructuredPruner
from cleanai_core.errors import UserError
from cleanai_core.sequential import find_blocks


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x)))) * scale


class Deep(nn.Module):
    """Stem -> a ModuleList of residual blocks (with a keyword argument) -> head."""

    def __init__(self, width: int = 12, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(5, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h = b(h, scale=torch.tensor(0.5))
        return self.head(h)


def _data(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(6, 5, generator=g) + i for i in range(n)]


def _stats(pruner: StructuredPruner, **kw) -> dict:
    pruner.collect_activations(_data(), progress=False, **kw)
    return {k: (v.count, v.mean, v.m2, v.cov) for k, v in pruner.stats.items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0], k
        for x, y in zip(a[k][1:], b[k][1:], strict=True):
            assert (x is None) == (y is None), k
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_block_by_block_equals_whole_model_and_prunes_alike():
    torch.manual_seed(0)
    model = Deep().train()
    pruner = StructuredPruner(model, torch.randn(2, 5), pruning_ratio=0.4)
    whole = _stats(pruner)
    plan = pruner.plan().pruned_units().clone()
    by_block = _stats(pruner, sequential=True)
    _assert_same(whole, by_block)
    assert any(v[3] is not None for v in by_block.values())  # covariances were compared too
    assert torch.equal(pruner.plan().pruned_units(), plan) and bool(plan.any())
    assert model.training  # mode restored
    assert all("forward" not in b.__dict__ for b in model.blocks)  # the replay forwards are gone
    pruned = pruner.prune()
    assert pruned(torch.randn(2, 5)).shape == (2, 3)


def test_hf_llama_block_by_block_equals_whole_model():
    model = tiny_llama(32, 64, 50)
    batches = [{"input_ids": torch.randint(0, 50, (2, 8))} for _ in range(2)]
    pruner = StructuredPruner(model, batches[0], pruning_ratio=0.3, output_transform=lambda o: o.logits)
    pruner.collect_activations(batches, progress=False)
    whole = {k: (v.count, v.mean, v.m2, v.cov) for k, v in pruner.stats.items()}
    pruner.collect_activations(batches, progress=False, sequential="model.layers")
    by_block = {k: (v.count, v.mean, v.m2, v.cov) for k, v in pruner.stats.items()}
    _assert_same(whole, by_block)
    assert by_block[("lm_head", "in")][0] == 2 * 2 * 8  # the head, after the blocks, was collected
    pruned = pruner.prune()
    assert pruned(**batches[0]).logits.shape == (2, 8, 50)


def test_padded_batches_count_only_real_tokens_block_by_block():
    """The blocks were called alone, so the model's attention mask never reached the
    statistics: the padded positions counted (32 rows per consumer, not 26)."""
    model = tiny_llama(32, 64, 50)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, :3] = 0  # left padding
        batches.append({"input_ids": torch.randint(0, 50, (2, 8), generator=g), "attention_mask": mask})
    pruner = StructuredPruner(model, batches[0], pruning_ratio=0.3, output_transform=lambda o: o.logits)
    pruner.collect_activations(batches, progress=False)
    whole = {k: (v.count, v.mean, v.m2, v.cov) for k, v in pruner.stats.items()}
    pruner.collect_activations(batches, progress=False, sequential=True)
    by_block = {k: (v.count, v.mean, v.m2, v.cov) for k, v in pruner.stats.items()}
    assert by_block[("model.layers.1.mlp.down_proj", "in")][0] == 2 * (8 + 5)
    _assert_same(whole, by_block)


def test_stats_budget_bounds_covariance_alike_in_both_modes():
    """The budget picks the narrowest consumers of the whole model, block by block or not."""
    torch.manual_seed(0)
    model = Deep()
    chosen = {}
    for budget in (0, 2 * 12 * 12 * 8, 1 << 30):
        for sequential in (False, True):
            pruner = StructuredPruner(model, torch.randn(2, 5), stats_budget_bytes=budget)
            pruner.collect_activations(_data(), progress=False, sequential=sequential)
            held = {k: v.mean.numel() for k, v in pruner.stats.items() if v.cov is not None}
            assert sum(c * c * 8 for c in held.values()) <= budget
            chosen[budget, sequential] = held
        assert chosen[budget, False] == chosen[budget, True]
    assert [len(chosen[b, True]) for b in (0, 2 * 12 * 12 * 8, 1 << 30)] == [0, 2, 10]


def test_find_blocks_errors():
    assert find_blocks(Deep())[0] == "blocks"
    with pytest.raises(UserError, match="nn.ModuleList"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(UserError, match="no such submodule"):
        find_blocks(Deep(), "layers")
    with pytest.raises(UserError, match="must be a whole number"):
        StructuredPruner(Deep(), torch.randn(2, 5), stats_budget_bytes=-1)


def _hf_batches(inputs: dict) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{k: torch.randint(3, 100, (2, v.shape[1]), generator=g) for k, v in inputs.items()} for _ in range(2)]


@pytest.mark.parametrize("name", ["t5", "modernbert"])
def test_hf_blocks_get_their_own_arguments(name):
    """Each block gets what the model's loop gives it, not the first block's arguments: T5's
    later blocks read the position bias the first block computes (they got none, so their
    attention had no relative positions), ModernBERT's global layers a full mask and their
    own rotary embeddings (they got the first, local layer's window mask)."""
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_families import build

    model, inputs, _ = build(name)
    batches = _hf_batches(inputs if isinstance(inputs, dict) else {"input_ids": inputs[0]})
    pruner = StructuredPruner(model, batches[0], importance="magnitude", pruning_ratio=0.3)
    pruner.collect_activations(batches, progress=False)
    whole = {k: (v.count, v.mean, v.m2, v.cov) for k, v in pruner.stats.items()}
    pruner.collect_activations(batches, progress=False, sequential=True)
    by_block = {k: (v.count, v.mean, v.m2, v.cov) for k, v in pruner.stats.items()}
    for k in whole:  # float sums in another order: close, not bit-equal
        assert whole[k][0] == by_block[k][0], k
        for x, y in zip(whole[k][1:], by_block[k][1:], strict=True):
            assert (x is None) == (y is None), k
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


class Shrinking:
    """A data set that gives one batch fewer each time it is read."""

    def __init__(self) -> None:
        self.batches = _data()

    def __iter__(self):
        yield from list(self.batches)
        self.batches.pop()


def test_data_read_once_per_block_must_give_the_same_batches():
    pruner = StructuredPruner(Deep(), torch.randn(2, 5))
    with pytest.raises(UserError, match="a list_iterator can be read only once: give a list or a DataLoader"):
        pruner.collect_activations(iter(_data()), progress=False, sequential=True)
    with pytest.raises(UserError, match="it gave 4 batch\\(es\\) for block 0 but 3 for block 1"):
        pruner.collect_activations(Shrinking(), progress=False, sequential=True)


def test_a_block_applied_several_times_is_refused():
    """ALBERT applies its one layer group at every depth: block by block, its later
    applications were never calibrated (the statistics said one application per batch)."""
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_families import build

    model, inputs, _ = build("albert")
    pruner = StructuredPruner(model, inputs, importance="magnitude")
    with pytest.raises(UserError, match="block 0 of 'albert.encoder.albert_layer_groups' ran more than once"):
        pruner.collect_activations([inputs], progress=False, sequential="albert.encoder.albert_layer_groups")
