"""What the data-free path no longer repeats (issue #21, session 14), and that each shortcut
still gives what the long way gave: the timm fix-ups run only where the scan found one of
their trigger names, the sliced copy reuses its graph's claims, the slices' indices come
from one pass, ``eval()`` is skipped where it changes nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cleanai_core import StructuredPruner, hookimpl
from cleanai_core.graph.dependency import DependencyGraph
from cleanai_core.model_state import preserved
from cleanai_core.plugins import temporary_plugin
from cleanai_plugins.zoo.timm import FIXUPS, cleanai_after_prune, cleanai_prepare_model
from cleanai_plugins.zoo.timm.attention import fix_attention
from cleanai_plugins.zoo.timm.lookup import names_of
from cleanai_plugins.zoo.timm.scan import _SCANS, KEY


class Heads(nn.Module):
    """timm's ``Attention``: ``num_heads`` and ``head_dim`` are read by the reshapes, so
    after slicing only ``fix_attention`` keeps the module running."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 16)
        self.attn = Heads()
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x)
        return self.head(x + self.mlp(x)).mean(1)


def test_every_scan_and_fixup_declares_its_trigger_names():
    for fn in (*_SCANS, *FIXUPS):
        assert isinstance(fn.triggers, frozenset) and fn.triggers, fn.__name__


def test_the_scan_notes_the_fixups_of_each_module_by_its_names():
    model = Net()
    scan = cleanai_prepare_model(model)[KEY]
    assert set(scan.fixups) == set(model.modules())
    assert fix_attention in scan.fixups[model.attn]  # num_heads
    for plain in (model.embed, model.attn.qkv, model.mlp, model.mlp[1], model.head):
        assert scan.fixups[plain] == ()  # a Linear, a Sequential, a GELU: no pattern name


def test_a_module_the_scan_did_not_see_gets_every_fixup():
    model = Net()
    scan = cleanai_prepare_model(Net())  # another model's scan: model.attn is not in it
    keep = torch.cat([torch.arange(0, 8), torch.arange(16, 24), torch.arange(32, 40)])  # heads 0, 1 of q, k, v
    model.attn.qkv.weight = nn.Parameter(model.attn.qkv.weight[keep])
    model.attn.qkv.out_features = 24
    cleanai_after_prune(model.attn, "attn", {("attn.qkv", "out"): keep}, scan)
    assert model.attn.num_heads == 2 and model.attn.head_dim == 4


def test_attention_heads_still_follow_the_slicing_through_the_filtered_fixups():
    model = Net().eval()
    x = torch.randn(2, 6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a group skipped because the pruned model broke would warn
        pruned = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, bias_compensation=False).prune()
    attn = pruned.attn
    assert attn.qkv.out_features < 48 and attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
    assert pruned(x).shape == (2, 5) and model.attn.num_heads == 4


class ClassHeads(nn.Linear):
    num_heads = 2  # on the class, not the instance


class OwnLookup(nn.Linear):
    def __getattr__(self, name):
        if name == "num_heads":
            return 4
        return super().__getattr__(name)


def test_names_are_read_from_the_instance_its_tables_and_its_class():
    wanted = frozenset({"num_heads", "weight", "qkv", "training", "missing"})
    attn = Heads()
    assert names_of(attn, wanted) == {"num_heads", "qkv", "training"}
    assert names_of(nn.Linear(2, 2), wanted) == {"weight", "training"}
    assert names_of(ClassHeads(2, 2), wanted) == {"num_heads", "weight", "training"}
    assert names_of(OwnLookup(2, 2), wanted) is None  # its own __getattr__: any name may be there


class Claims:
    def __init__(self) -> None:
        self.asked: list[str] = []

    @hookimpl
    def cleanai_layer_pruner(self, module, name):
        self.asked.append(name)


def test_the_sliced_copy_reuses_the_graphs_claims():
    model = Net().eval()
    with temporary_plugin(Claims(), name="claims") as claims:
        pruner = StructuredPruner(model, torch.randn(2, 6, 8), "magnitude", pruning_ratio=0.5)
        asked = len(claims.asked)
        pruned = pruner.prune()
    assert asked == len(list(model.modules()))  # the graph: once per module
    assert len(claims.asked) == asked  # not again for the copy
    assert pruned.mlp[0].out_features == 16 and pruned.mlp[2].in_features == 16


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_indices_of_every_slice_are_those_of_a_pass_per_slice(seed):
    model = Net()
    graph = DependencyGraph(model, torch.randn(2, 6, 8))
    units = torch.rand(graph.root.numel(), generator=torch.Generator().manual_seed(seed)) < 0.4
    gone = units[graph.root]
    for spec, idx in zip(graph.slices, graph.indices_in(units), strict=True):
        want = gone[spec.atoms].nonzero().squeeze(1)
        assert idx.dtype == torch.int64 and torch.equal(idx, want), spec.module
    kept = graph.keep_indices(units)
    assert set(kept) == {(s.module, s.name) for s in graph.slices if bool(gone[s.atoms].any())}


def test_graph_unique_narrows_only_what_fits_32_bits():
    from cleanai_core.graph.groups import unique

    gen = torch.Generator().manual_seed(0)
    for lo, hi in ((-(2**31), 2**31 - 1), (2**31 - 5, 2**31 + 5), (-(2**40), 2**40)):
        x = torch.randint(lo, hi, (4000,), generator=gen)
        assert torch.equal(unique(x), torch.unique(x)) and unique(x).dtype == torch.int64


class Trains(nn.Linear):
    calls = 0

    def train(self, mode: bool = True):
        type(self).calls += 1
        return super().train(mode)


def test_preserved_calls_eval_only_where_it_changes_something(monkeypatch):
    seen = []
    original = nn.Module.train
    monkeypatch.setattr(nn.Module, "train", lambda self, mode=True: seen.append(mode) or original(self, mode))
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval()
    seen.clear()
    with preserved(model):
        pass
    assert seen == []  # every module in eval mode already, no train() of its own
    model[0].train()
    seen.clear()
    with preserved(model):
        assert not model[0].training
    assert seen and model[0].training and not model.training  # modes put back
    model = nn.Sequential(Trains(2, 2)).eval()
    Trains.calls = 0
    with preserved(model):
        pass
    assert Trains.calls == 1  # its own train() runs as it did
