"""Session 22 (lead): the model snapshot's fast path, the user-hook scan, a saved folder
pruned further from the command line, and the recovery line's wording."""

from __future__ import annotations

import torch
from torch import nn

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


# -- a folder cleanai prune wrote, given as --model, is pruned further --------------------------

DEMO = "cleanai_plugins.io.demo:DigitsCNN"


def _files(folder):
    import hashlib

    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_saved_folder_as_model_is_pruned_further_and_saved_with_both_histories(tmp_path, monkeypatch, capsys):
    import json

    from cleanai_core.cli import main
    from cleanai_core.io import load_pruned

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "lead22_net.py").write_text(
        "from torch import nn\n\n\ndef net():\n    return nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), "
        "nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10))\n"
    )
    g = torch.Generator().manual_seed(0)
    torch.save((torch.rand(24, 1, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g)), "data.pt")
    common = ["--data", "data.pt", "--ratio", "0.3", "--quiet", "--latency-repeats", "1"]
    spec = "lead22_net:net"  # an import spec typed on the command line: consent given by typing it
    assert main(["prune", "--model", spec, *common, "--out", "saved"]) == 0
    first = json.loads((tmp_path / "saved" / "report.json").read_text())
    before = _files(tmp_path / "saved")
    capsys.readouterr()
    # its architecture.json names an import spec: reading the folder runs that code only with --trust-code
    assert main(["prune", "--model", "saved", *common, "--out", "twice"]) == 2
    assert "--trust-code" in capsys.readouterr().err and not (tmp_path / "twice").exists()
    assert main(["prune", "--model", "saved", "--trust-code", "--num-classes", "10", *common, "--out", "x"]) == 2
    assert "leave out --num-classes" in capsys.readouterr().err
    assert main(["prune", "--model", "saved", "--trust-code", *common, "--out", "twice"]) == 0
    second = json.loads((tmp_path / "twice" / "report.json").read_text())
    assert second["params_before"] == first["params_after"]
    assert second["params_after"] < first["params_after"]
    assert _files(tmp_path / "saved") == before  # the input folder is untouched
    arch = json.loads((tmp_path / "twice" / "architecture.json").read_text())
    assert arch["spec"] == spec  # the unpruned architecture, which the two histories replay on
    assert len(json.loads((tmp_path / "twice" / "history.json").read_text())["steps"]) == 2
    model = load_pruned(tmp_path / "twice", trust_code=True)
    assert sum(p.numel() for p in model.parameters()) == second["params_after"]
    state = torch.load(tmp_path / "twice" / "model.pt")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_saved_folder_as_model_takes_weights_of_its_own_shapes_only(tmp_path, monkeypatch, capsys):
    import json

    from cleanai_core.cli import main
    from cleanai_core.io import load_pruned

    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(1)
    torch.save((torch.rand(24, 1, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g)), "data.pt")
    common = ["--data", "data.pt", "--ratio", "0.3", "--quiet", "--latency-repeats", "1", "--trust-code"]
    assert main(["prune", "--model", DEMO, *common, "--out", "saved"]) == 0
    tuned = load_pruned("saved", trust_code=True)
    with torch.no_grad():  # "fine-tuned since": every weight changed
        for p in tuned.parameters():
            p.mul_(1.5)
    torch.save(tuned.state_dict(), "tuned.pt")
    from cleanai_plugins.io.demo import DigitsCNN

    torch.save(DigitsCNN().state_dict(), "unpruned.pt")
    capsys.readouterr()
    assert main(["prune", "--model", "saved", "--weights", "unpruned.pt", *common, "--out", "o"]) == 2
    assert "do not fit" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["prune", "--model", "saved", "--weights", "tuned.pt", *common, "--out", "o"]) == 0
    out = load_pruned("o", trust_code=True)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert sum(p.numel() for p in out.parameters()) == report["params_after"] < report["params_before"]
    # the first convolution's kept filters are rows of the tuned weights (1.5x), not of saved/'s
    first = next(n for n, _ in out.named_parameters() if n.endswith("weight"))
    got, was = dict(out.named_parameters())[first], dict(tuned.named_parameters())[first]
    assert got.shape[1] == was.shape[1] == 1 and got.shape[0] < was.shape[0]  # filters removed, input whole
    assert all(any(torch.equal(r, w) for w in was.unbind(0)) for r in got.unbind(0))


def test_the_recovery_lines_count_one_epoch_in_the_singular():
    from cleanai_core.recovery_report import recovery_summary

    rec = {"metric": "perplexity", "initial": 9.0, "best": 8.0, "seconds": 1.0}
    assert recovery_summary({**rec, "epochs": 1}).endswith("(1 epoch, 1.0 s)")
    assert recovery_summary({**rec, "epochs": 3}).endswith("(3 epochs, 1.0 s)")
