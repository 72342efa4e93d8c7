"""The masking oracle for embeddings and bare parameters (``layers/embedding.py``,
``layers/parameters.py``): tokens, position embeddings, layer scales.

See ``layer_oracle.py`` for what the oracle checks."""

from __future__ import annotations

import pytest
import torch
from layer_oracle import group_of, oracle, seq
from test_oracle_mappers import X
from torch import nn

torch.manual_seed(0)


def test_embedding():
    m = seq(nn.Embedding(50, 16), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    r = oracle(m, torch.randint(0, 50, (2, 5)))
    assert r.small[0].embedding_dim == 8 and r.small[0].weight.shape == (50, 8)
    assert r.after == 50 * 8 + (4 * 8 + 4) + (3 * 4 + 3)


# -- bare parameters ----------------------------------------------------------------------------
class TokenNet(nn.Module):
    """Patchify, prepend a cls token, add pos_embed, layer-scale gamma, linear head."""

    def __init__(self, c=16):
        super().__init__()
        self.patch = nn.Conv2d(3, c, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.pos = nn.Parameter(torch.randn(1, 5, c))
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.mlp = nn.Linear(c, c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        t = t + self.gamma * self.mlp(t)
        return self.head(t[:, 0])


def test_bare_parameters_follow_channels():
    r = oracle(TokenNet(), torch.randn(2, 3, 8, 8))
    s = r.small
    assert s.cls.shape == (1, 1, 8) and s.pos.shape == (1, 5, 8) and s.gamma.shape == (8,)
    assert s.patch.out_channels == 8 and s.mlp.weight.shape == (8, 8) and s.head.in_features == 8


class LayerScale2dNet(nn.Module):
    """A residual conv block scaled by a FastViT-style layer scale ``gamma`` of shape
    ``(C, 1, 1)``, broadcast over NCHW feature maps."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.gamma * self.conv(x)
        return self.head(x)


def test_layer_scale_shaped_for_nchw_follows_channels():
    r = oracle(LayerScale2dNet(), X)
    assert group_of(r.graph, "", "gamma").prunable == 8
    assert r.small.gamma.shape == (4, 1, 1) and r.small.stem.out_channels == 4
    # stem 3*8*9+8, conv 8*8*9+8, gamma 8, head 8*4+4 -> half of the 8 channels kept
    assert (r.before, r.after) == (852, 3 * 4 * 9 + 4 + 4 * 4 * 9 + 4 + 4 + 4 * 4 + 4)


# -- a bare 2-D parameter used as a matrix ------------------------------------------------------
class BareMatrixNet(nn.Module):
    """A hidden layer of 16 channels read by a bare 2-D parameter used as a matrix, in one
    of the ways models write it; 12 output columns then a linear head."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.fc = nn.Linear(6, 16)
        shape = (12, 16) if form in ("linear", "left") else (16, 12)
        self.proj = nn.Parameter(torch.randn(shape))
        self.bias = nn.Parameter(torch.randn(12)) if form == "linear" else None
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = self.fc(x)
        if self.form == "at":
            y = h @ self.proj
        elif self.form == "linear":
            y = nn.functional.linear(h, self.proj, self.bias)
        elif self.form == "matmul3d":
            y = torch.matmul(h.unsqueeze(1).expand(-1, 5, -1), self.proj.to(h.dtype)).mean(1)
        else:  # "left": columns of the matrix contract
            y = (self.proj @ h.T).T
        return self.head(torch.relu(y))


@pytest.mark.parametrize("form", ["at", "linear", "matmul3d", "left"])
def test_a_bare_matrix_shrinks_along_both_of_its_dimensions(form):
    torch.manual_seed(0)
    r = oracle(BareMatrixNet(form), torch.randn(4, 6))
    contracted, columns = (1, 0) if form in ("linear", "left") else (0, 1)
    assert r.small.fc.out_features == 8 and r.small.proj.shape[contracted] == 8
    assert r.small.proj.shape[columns] == 6 and r.small.head.in_features == 6
    assert r.after == (6 * 8 + 8) + 8 * 6 + (6 if form == "linear" else 0) + (3 * 6 + 3)


def test_a_bare_matrix_read_also_element_wise_keeps_its_rows():
    """``x @ W`` contracts the rows, ``+ W.sum(1)`` reads them uncontracted: they stay."""

    class Net(BareMatrixNet):
        def forward(self, x):
            h = self.fc(x)
            return self.head(torch.relu(h @ self.proj)) + self.proj.sum(1)[:3]

    r = oracle(Net("at"), torch.randn(4, 6), must_prune=False)
    assert r.small.proj.shape[0] == 16 and r.small.fc.out_features == 16


def test_a_pruned_bare_matrix_replays_from_its_history():
    from cleanai_core import StructuredPruner

    torch.manual_seed(0)
    model, x = BareMatrixNet("at").eval(), torch.randn(8, 6)
    pruner = StructuredPruner(model, x, pruning_ratio=0.5)
    pruner.collect_activations([x])
    small = pruner.prune()
    assert small.proj.shape == (8, 6) and model.proj.shape == (16, 12)
    again = type(pruner.history).from_json(pruner.history.to_json()).replay(BareMatrixNet("at"))
    assert again.proj.shape == (8, 6) and again.fc.out_features == 8
    again.load_state_dict(small.state_dict())
    torch.testing.assert_close(again(x), small(x))


class ScalarAffineHead(nn.Module):
    """HGNet-V2's learnable affine block, a scalar ``scale * x + bias``, on pooled 1x1 maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.last = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 12, 1)
        self.scale, self.bias = nn.Parameter(torch.tensor([1.5])), nn.Parameter(torch.tensor([0.2]))
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = self.last(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1))
        return self.fc((self.scale * h + self.bias).flatten(1))


def test_a_scalar_parameter_on_a_1x1_map_leaves_the_channels_prunable():
    r = oracle(ScalarAffineHead(), torch.randn(2, 3, 6, 6))
    # the scalar's one-atom label landed on dim 3 of the (2, 12, 1, 1) output: "channels on
    # different dimensions meet" froze the 12 channels of ``last``
    assert group_of(r.graph, "last", "out").prunable == 12
    assert r.small.last.out_channels == 6 and r.small.fc.in_features == 6 and r.small.scale.shape == (1,)
    assert (r.before, r.after) == (8 * 28 + 12 * 9 + 2 + 39, 4 * 28 + 6 * 5 + 2 + 21)
