"""The masking oracle for the linear and per-channel activation pruners
(``layers/linear.py``, ``layers/activation.py``).

See ``layer_oracle.py`` for what the oracle checks."""

from __future__ import annotations

import torch
from layer_oracle import group_of, oracle, seq
from torch import nn

torch.manual_seed(0)


def test_linear_2d_exact():
    m = seq(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    r = oracle(m, torch.randn(4, 10))
    assert r.after == r.before - 10 * (10 + 1) - 10 * 5


def test_linear_3d_and_batchnorm1d():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Linear(16, 5)

        def forward(self, x):  # (N, T, C): batchnorm over channels wants (N, C, T)
            h = self.a(x)
            h = self.bn(h.transpose(1, 2)).transpose(1, 2)
            return self.b(torch.relu(h))

    m = M()
    m.bn.running_mean.normal_()
    r = oracle(m, torch.randn(2, 7, 10))
    assert r.after == r.before - 8 * 11 - 8 * 2 - 8 * 5


def test_prelu_per_channel():
    m = seq(nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        m[1].weight.uniform_(-1, 1)
    r = oracle(m, torch.randn(2, 3, 6, 6))
    assert r.small[1].num_parameters == 4 and r.small[1].weight.shape == (4,)


class TokenMixing(nn.Module):
    """A ResMLP block: an MLP over the tokens (the channels on dim 1 after a transpose,
    through a per-channel scale), then one over the channels."""

    def __init__(self, tokens: int = 6, dim: int = 8, token_hidden: int = 10, hidden: int = 12) -> None:
        super().__init__()
        self.stem = nn.Linear(4, dim)
        self.scale = nn.Parameter(torch.randn(dim))
        self.tok1, self.tok2 = nn.Linear(tokens, token_hidden), nn.Linear(token_hidden, tokens)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # (B, tokens, 4)
        x = self.stem(x)
        t = (x * self.scale).transpose(1, 2)
        x = x + self.tok2(nn.functional.gelu(self.tok1(t))).transpose(1, 2)
        x = x + self.fc2(nn.functional.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def test_token_mixing_mlp_passes_the_channels_through_and_prunes_its_hidden_tokens():
    torch.manual_seed(0)
    r = oracle(TokenMixing(), torch.randn(2, 6, 4))
    stream, token_hidden = group_of(r.graph, "stem", "out"), group_of(r.graph, "tok1", "out")
    # the token MLP acts on each channel alone: the stream stays one prunable group of 8
    # (it froze: "channels reach dim 2 of a consumer reading dim 1"), and tok1's rows are
    # tok2's columns (the second labelled dimension through the GELU)
    assert (stream.size, stream.prunable) == (8, 8)
    assert (token_hidden.size, token_hidden.prunable) == (10, 10)
    assert ("tok2", "in") in {(s.module, s.name) for s in token_hidden.slices}
    assert group_of(r.graph, "tok1", "in").prunable == 0  # the tokens themselves stay
    # stream 8 -> 4, token hidden 10 -> 5, hidden 12 -> 6 (was 256: only the two hidden layers)
    assert (r.before, r.after) == (423, (16 + 4) + 4 + (30 + 5) + (30 + 6) + (24 + 6) + (24 + 4) + (12 + 3))


class SpatialGating(nn.Module):
    """gMLP's spatial gating: half of the hidden units mixed over the tokens gate the other half."""

    def __init__(self, tokens: int = 6, dim: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.stem, self.fc1 = nn.Linear(4, dim), nn.Linear(dim, 2 * hidden)
        self.proj, self.fc2, self.head = nn.Linear(tokens, tokens), nn.Linear(hidden, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.stem(x)
        u, v = self.fc1(x).chunk(2, dim=-1)
        v = self.proj(v.transpose(1, 2)).transpose(1, 2)
        return self.head((x + self.fc2(u * v)).mean(1))


def test_spatial_gating_prunes_gate_pairs_and_keeps_the_token_projection():
    torch.manual_seed(0)
    r = oracle(SpatialGating(), torch.randn(2, 6, 4))
    pairs = group_of(r.graph, "fc1", "out")
    assert (pairs.size, pairs.prunable) == (12, 12)  # u_j with v_j (v froze: so did u * v)
    assert group_of(r.graph, "proj", "out").prunable == 0  # its rows are tokens: they meet u's
    # stream 8 -> 4, hidden pairs 12 -> 6, proj untouched (was 249: the stream only)
    assert (r.before, r.after) == (429, (16 + 4) + (48 + 12) + (36 + 6) + (24 + 4) + (12 + 3))


class GatedTokenMixing(TokenMixing):
    """gMixer's token MLP: ``tok1`` makes two halves over the tokens, one gates the other."""

    def __init__(self) -> None:
        super().__init__(token_hidden=10)
        self.tok1 = nn.Linear(6, 20)

    def forward(self, x):
        x = self.stem(x)
        a, b = self.tok1((x * self.scale).transpose(1, 2)).chunk(2, dim=-1)
        x = x + self.tok2(a * nn.functional.gelu(b)).transpose(1, 2)
        x = x + self.fc2(nn.functional.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def test_gated_token_mixing_prunes_its_halves_in_pairs():
    torch.manual_seed(0)
    r = oracle(GatedTokenMixing(), torch.randn(2, 6, 4))
    pairs = group_of(r.graph, "tok1", "out")
    assert (pairs.size, pairs.prunable) == (10, 10)  # a_j with b_j, and tok2's column j
    assert r.small.tok1.out_features == 10 and r.small.tok2.in_features == 5
    assert group_of(r.graph, "stem", "out").prunable == 8
