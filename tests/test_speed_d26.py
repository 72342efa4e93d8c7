"""Session 26, speedD (issue #21): FLOPs counted in one dispatch mode.

``count_flops`` ran the shape-only mode and torch's FLOP-counting mode stacked, two Python
dispatches per ATen op, and torch's mode tried a decomposition (entering itself again) for
every op outside its formulas. One mode now does both (``metrics._counting``); the counts
must be the stacked modes' to the FLOP.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode

from cleanai_core.metrics import EXTRA_FLOP_FORMULAS, FlopsOfCopies, _unfused_kernels, count_flops, eval_mode
from cleanai_core.shapes import ShapeOnlyMode


class _Net(nn.Module):
    """A 3x3 and a 1x1 convolution, attention through SDPA, a matrix times a vector, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.q = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 5)
        self.depths: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the modes the count put on (a first run of a model is also under the write guard)
        self.depths.append(sum(type(m).__name__ != "_WriteGuard" for m in _get_current_dispatch_mode_stack()))
        t = self.pw(torch.relu(self.bn(self.conv(x)))).flatten(2).transpose(1, 2)  # (B, 64, 12)
        q, k, v = t.chunk(3, -1)  # (B, 64, 4) each
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        w = torch.softmax(a @ self.q, -1)  # (B, 64)
        return self.head((a * w.unsqueeze(-1)).sum(1))


def _stacked(model: nn.Module, *inputs: torch.Tensor) -> int:
    """The count as it was made before: the shape-only mode under torch's counter."""
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    with eval_mode(model), torch.no_grad(), sdpa_kernel(SDPBackend.MATH), ShapeOnlyMode():
        with _unfused_kernels(), counter:
            model(*inputs)
    return int(counter.get_total_flops())


def test_a_count_runs_one_dispatch_mode_and_counts_every_product():
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(2, 3, 8, 8)
    got = count_flops(model, x)
    assert model.depths == [1]  # one Python mode for the count (stacked: 2)
    conv = 2 * 2 * 8 * 64 * 27  # 2 x images x out channels x positions x (3 x 3 x 3)
    pw = 2 * 2 * 12 * 64 * 8
    attention = 2 * (2 * 64 * 64 * 4) * 2  # q k^T and (.) v, two images
    vector = 2 * 2 * 64 * 4  # a @ q
    head = 2 * 2 * 4 * 5
    assert got == conv + pw + attention + vector + head == 212_048
    assert _stacked(model, x) == got
    assert model.depths == [1, 2]


@pytest.mark.parametrize(
    "build, inputs",
    [
        (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2), (2, 5, 32)),
        (lambda: nn.LSTM(8, 16, 2), (5, 3, 8)),
        (lambda: nn.Sequential(nn.Conv1d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 8, 3)), (2, 4, 10)),
    ],
    ids=["encoder", "lstm", "grouped-conv1d"],
)
def test_counts_equal_the_stacked_modes(build, inputs):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*inputs)
    want = {"encoder": 340_480, "lstm": 107_520, "grouped-conv1d": 2 * 2 * 6 * 8 * 6 + 2 * 2 * 48 * 3}
    got = count_flops(model, x)
    assert got == _stacked(model, x)
    assert got in want.values()


def test_layer_counts_read_mid_count_are_the_same():
    """FlopsOfCopies reads the running total from module hooks while the count runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 10))
    flops = FlopsOfCopies(model, torch.randn(1, 3, 8, 8))
    assert flops.total == 2 * (8 * 36 * 27 + 4 * 36 * 8 + 144 * 10) == 20_736
    assert flops.layers == {
        "0": (nn.Conv2d, 2 * 36, 216),
        "2": (nn.Conv2d, 2 * 36, 32),
        "4": (nn.Linear, 2, 1440),
    }


class _Writes(nn.Module):
    """A forward that writes its own weight in place (a running scale kept in a parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.depths: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.depths.append(len(_get_current_dispatch_mode_stack()))
        with torch.no_grad():
            self.lin.weight.mul_(2.0)
        return self.lin(x)


def test_a_first_count_hosts_the_write_guard_and_the_weights_are_put_back():
    from cleanai_core.model_state import preserved

    torch.manual_seed(0)
    model = _Writes().eval()
    before = model.lin.weight.detach().clone()
    with preserved(model):
        assert count_flops(model, torch.randn(2, 4)) == 2 * 2 * 4 * 3
    assert model.depths == [1]  # the guard checked inside the counting mode, not a mode of its own
    assert torch.equal(model.lin.weight, before)  # the write was saved and put back
