"""A parameter shared by several modules (tied input and output embeddings) is sliced
once per holder and shared again afterwards."""

from __future__ import annotations

import copy

import torch
from torch import nn

from cleanai_core import DependencyGraph
from cleanai_core.slicing import SliceEdit, apply_edits
from cleanai_core.testing import check_pruner, random_units


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.mix(torch.relu(x)))  # the residual stream: one group


def test_tied_embeddings_are_one_parameter_after_pruning():
    model = TiedLM().eval()
    ids = torch.randint(0, 20, (2, 5))
    graph = DependencyGraph(model, ids)
    pruned = random_units(graph, 0.5)
    small = copy.deepcopy(model)
    keep = graph.keep_indices(pruned)
    assert ("embed", "out") in keep and ("head", "in") in keep
    apply_edits(small, [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in keep.items()])
    assert small.embed.weight.shape == (20, 4)
    assert small.head.weight is small.embed.weight
    assert sum(p.numel() for p in small.parameters()) == 20 * 4 + (4 * 4 + 4)
    assert torch.equal(small.embed.weight, model.embed.weight[:, keep[("embed", "out")]])
    assert model.head.weight is model.embed.weight and model.embed.weight.shape == (20, 8)  # the original is intact


def test_tied_model_prunes_exactly():
    report = check_pruner(TiedLM().eval(), torch.randint(0, 20, (2, 5)))
    assert report.max_abs_diff < 1e-6
    assert report.params_after < report.params_before


class ProjectedTiedLM(nn.Module):
    """Embeddings of 8 projected into a hidden size of 16 and back (ALBERT, ELECTRA,
    OPT-350m): the tied head reads the projection's output, not the embeddings, so only
    the shared weight joins the two widths of 8."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj_in, self.mix, self.proj_out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.proj_in(self.embed(ids))
        return self.head(self.proj_out(h + self.mix(torch.relu(h))))


def test_tied_weight_joins_the_widths_of_its_holders_of_different_kinds():
    model = ProjectedTiedLM().eval()
    ids = torch.randint(0, 20, (2, 5))
    graph = DependencyGraph(model, ids)
    group = next(g for g in graph.groups() if any(s.module == "embed" for s in g.slices))
    assert {(s.module, s.name) for s in group.slices} == {("embed", "out"), ("proj_in", "in"), ("proj_out", "out"),
                                                          ("head", "in")}  # fmt: skip
    assert (group.size, group.prunable) == (8, 8)
    report = check_pruner(model, ids)
    assert report.max_abs_diff < 1e-6
    pruned = random_units(graph, 0.5)
    small = copy.deepcopy(model)
    keep = graph.keep_indices(pruned)
    apply_edits(small, [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in keep.items()])
    assert small.embed.weight.shape == (20, 4) and small.head.weight is small.embed.weight
    assert small(ids).shape == (2, 5, 20)


def test_finding_the_cut_dimension_leaves_the_module_and_its_submodules_alone():
    """The probe slices a copy with meta tensors; a pruner that slices a submodule too (an
    attention's out_proj) must not reach the user's submodule through the copy."""
    from types import SimpleNamespace

    from cleanai_core.graph.cut import cut_dims

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.w = nn.Parameter(torch.randn(6, 4))

    class SlicesBoth:  # cuts dim 1 of ``w`` and the inner layer's rows
        def prune(self, module, idx):
            keep = idx["out"]
            module.w = nn.Parameter(module.w[:, keep])
            module.inner.weight = nn.Parameter(module.inner.weight[keep])
            module.inner.bias = nn.Parameter(module.inner.bias[keep])

    torch.manual_seed(0)
    outer = Outer()
    before = {k: v.clone() for k, v in outer.state_dict().items()}
    spec = SimpleNamespace(atoms=torch.arange(4), name="out")
    assert cut_dims(outer, SlicesBoth(), spec, "w") == {1: 1}
    assert cut_dims(outer, SlicesBoth(), spec, "inner") is None  # not a tensor
    after = outer.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert not after[k].is_meta and torch.equal(after[k], v), k
