"""Session 22 (lead): the model snapshot's fast path, the user-hook scan, and the end of
a process group the command line started."""

from __future__ import annotations

import torch
from torch import nn

from cleanai_core import distributed
from cleanai_core.model_state import preserved, user_hooks


class _Swaps(nn.Module):
    """A forward that replaces one attribute by another of the same count (the module's
    ``__dict__`` keeps its length), rebinds a third and sets a fourth."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = 2.0
        self.tag = "a"
        self.cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        del self.scale
        self.other = 5.0  # same number of entries as before
        self.tag = "b"
        self.lin.seen = True
        return self.lin(x)


def test_a_snapshot_puts_back_attributes_swapped_for_others_of_the_same_count():
    m = _Swaps()
    before = dict(m.__dict__)
    lin_before = dict(m.lin.__dict__)
    with preserved(m):
        m(torch.randn(2, 3))
        assert not hasattr(m, "scale") and m.other == 5.0 and m.tag == "b" and m.lin.seen
    assert m.scale == 2.0 and m.tag == "a" and not hasattr(m, "other") and not hasattr(m.lin, "seen")
    assert m.__dict__.keys() == before.keys() and all(m.__dict__[k] is v for k, v in before.items())
    assert m.lin.__dict__.keys() == lin_before.keys()


def test_a_snapshot_drops_hooks_a_forward_added_and_keeps_the_users():
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    mine = m[0].register_forward_hook(lambda mod, i, o: o)

    def adds_hook(mod, args):
        mod.register_forward_hook(lambda *a: None)

    m[1].register_forward_pre_hook(adds_hook)
    with preserved(m):
        m(torch.randn(1, 3))
        assert len(m[1]._forward_hooks) == 1
    assert len(m[1]._forward_hooks) == 0 and len(m[1]._forward_pre_hooks) == 1
    assert list(m[0]._forward_hooks) == [mine.id]


def test_user_hooks_lists_the_users_hooks_and_nothing_on_a_model_without_hooks():
    m = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 2)))
    assert user_hooks(m) == []
    h = m[1][1].register_forward_pre_hook(lambda mod, a: None)
    assert user_hooks(m) == [("1.1", "_forward_pre_hooks", h.id)]


def test_close_group_ends_the_process_group_with_and_without_the_barrier(tmp_path):
    import torch.distributed as dist

    for wait in (True, False):
        store = dist.FileStore(str(tmp_path / f"store-{wait}"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        assert dist.is_initialized()
        distributed.close_group(wait=wait)
        assert not dist.is_initialized()
    distributed.close_group(wait=True)  # no group: nothing to do
