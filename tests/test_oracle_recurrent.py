"""The masking oracle for the recurrent pruners (``layers/recurrent.py``): RNN, GRU, LSTM.

See ``layer_oracle.py`` for what the oracle checks."""

from __future__ import annotations

import pytest
import torch
from layer_oracle import group_of, oracle
from torch import nn

from cleanai_core.graph.dependency import DependencyGraph

torch.manual_seed(0)


# -- recurrent --------------------------------------------------------------------------------
class RNNBlock(nn.Module):
    def __init__(self, cls, hidden=12, **kw):
        super().__init__()
        d = 2 if kw.get("bidirectional") else 1
        out = kw.get("proj_size") or hidden
        self.inp = nn.Linear(6, 10)
        self.rnn = cls(10, hidden, **kw)
        self.fc = nn.Linear(out * d, 5)

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.inp(x)))
        return self.fc(y)


RNN_CASES = [
    (nn.RNN, {}),
    (nn.RNN, {"nonlinearity": "relu", "num_layers": 2}),
    (nn.RNN, {"num_layers": 3, "bidirectional": True}),
    (nn.LSTM, {}),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    (nn.LSTM, {"bias": False, "bidirectional": True}),
    (nn.LSTM, {"proj_size": 5, "num_layers": 2, "bidirectional": True}),
    (nn.GRU, {}),
    (nn.GRU, {"num_layers": 3, "bidirectional": True}),
    (nn.GRU, {"batch_first": True, "num_layers": 2, "bias": False}),
]


@pytest.mark.parametrize(("cls", "kw"), RNN_CASES, ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_recurrent(cls, kw):
    m = RNNBlock(cls, **kw)
    r = oracle(m, torch.randn(7, 3, 6))
    rnn = r.small.rnn
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cls]
    assert rnn.hidden_size == 6 and rnn.input_size == 5
    assert rnn.weight_ih_l0.shape == (gates * 6, 5)
    if kw.get("proj_size"):
        assert rnn.proj_size < 5 and rnn.weight_hr_l0.shape == (rnn.proj_size, 6)
    else:
        d = 2 if kw.get("bidirectional") else 1
        assert rnn.weight_hh_l0.shape == (gates * 6, 6) and r.small.fc.in_features == 6 * d
        if kw.get("num_layers", 1) > 1:
            assert rnn.weight_ih_l1.shape == (gates * 6, 6 * d)
    # the flat weights the kernels use are the new tensors
    assert all(
        a is b for a, b in zip(rnn._flat_weights, [getattr(rnn, n) for n in rnn._flat_weights_names], strict=True)
    )


class StateRNN(nn.Module):
    def __init__(self, cls, buffer: bool):
        super().__init__()
        self.rnn = cls(6, 8)
        self.fc = nn.Linear(8, 3)
        self.buffer = buffer
        self.register_buffer("h0", torch.randn(1, 3, 8))
        self.register_buffer("c0", torch.randn(1, 3, 8))

    def forward(self, x):
        h0 = self.h0 * 1.0 if self.buffer else torch.ones(1, x.shape[1], 8)
        hx = (h0, self.c0 * 1.0) if isinstance(self.rnn, nn.LSTM) else h0
        return self.fc(self.rnn(x, hx)[0])


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM], ids=lambda c: c.__name__)
def test_recurrent_initial_state(cls):
    # a constant initial state cannot shrink: the hidden units are frozen
    g = DependencyGraph(StateRNN(cls, buffer=False).eval(), torch.randn(4, 3, 6))
    assert group_of(g, "rnn", "hidden").prunable == 0
    # a buffer initial state is sliced with the units, and the oracle holds with non-zero states
    r = oracle(StateRNN(cls, buffer=True), torch.randn(4, 3, 6))
    assert r.small.h0.shape == (1, 3, 4) and r.small.rnn.hidden_size == 4
