"""Session 22, outputs: what CleanAI writes after pruning and what the user gets back (the
replayable history, the saved folder pruned further, the report, recovery and gradual
pruning in the user's training loop), checked against independent counts."""

from __future__ import annotations

import pytest
import torch

from cleanai_core import StructuredPruner
from cleanai_core.history import PruningHistory
from cleanai_core.io import load_pruned, save_pruned

# -- a replayed model's transformers config declares the biases compensation added ---------------


def _tiny_llama():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _pruned_twice_widths(model, ids):
    p = StructuredPruner(model, ids[:1], pruning_ratio=0.3)
    p.collect_activations([ids], num_batches=1, progress=False)
    again = p.prune()
    return {n: tuple(t.shape) for n, t in again.named_parameters()}


def test_a_replayed_transformers_model_declares_compensation_biases_and_prunes_further_like_the_original(tmp_path):
    pytest.importorskip("transformers")
    ids = torch.randint(0, 61, (4, 12), generator=torch.Generator().manual_seed(0))
    folder = tmp_path / "orig"
    _tiny_llama().save_pretrained(folder)
    first = StructuredPruner(_tiny_llama(), ids[:1], pruning_ratio=0.3)
    first.collect_activations([ids], num_batches=1, progress=False)
    pruned = first.prune()
    assert pruned.config.mlp_bias is True  # compensation gave the MLP biases, and the config says so
    save_pruned(tmp_path / "saved", pruned, first.history, f"hf:{folder}")
    loaded = load_pruned(tmp_path / "saved")
    replayed = PruningHistory.from_json(first.history.to_json()).replay(_tiny_llama())
    for model in (loaded, replayed):
        # the config declared no bias: it no longer rebuilt its own model (from_pretrained, the describability check)
        assert model.config.mlp_bias is True
        assert model.config.cleanai_pruning == pruned.config.cleanai_pruning
    # pruned further, the loaded model keeps its 4 heads (3 heads of 8 cannot be a 32 wide Llama's config) as the
    # in-memory one does; it lost a head, and from_pretrained could not rebuild it
    want = _pruned_twice_widths(pruned, ids)
    assert want["model.layers.0.self_attn.q_proj.weight"] == (32, 32)
    assert _pruned_twice_widths(loaded, ids) == want


# -- recovery of a model the report does not score by accuracy names the report's own figures ------

REGRESSION_NET = """
import torch
from torch import nn


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
"""


def test_recovery_of_a_regression_gives_the_reports_held_out_error_for_the_original_pruned_and_recovered_model(
    tmp_path, monkeypatch, capsys
):
    import json

    from cleanai_core.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "net_o12.py").write_text(REGRESSION_NET)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    torch.save((x, x @ torch.randn(8, 3, generator=g) + 0.1 * torch.randn(200, 3, generator=g)), "reg.pt")
    common = ["--model", "net_o12:net", "--data", "reg.pt", "--ratio", "0.5", "--quiet", "--latency-repeats", "1"]
    assert main(["prune", *common, "--out", "plain"]) == 0
    assert main(["prune", *common, "--out", "rec", "--recover-epochs", "3"]) == 0
    out = capsys.readouterr().out
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    report = json.loads((tmp_path / "rec" / "report.json").read_text())
    rec = report["recovery"]
    # the pruned model's error before recovery (the run without it measures the same model) was nowhere
    assert rec["evaluation_metric"] == "mse"
    assert rec["evaluation_original"] == report["mse_before"] == plain["mse_before"]
    assert rec["evaluation_pruned"] == plain["mse_after"]
    assert rec["evaluation_recovered"] == report["mse_after"] < rec["evaluation_pruned"]
    # the terminal named the early-stopping split's figures "held-out mse" beside the report's other ones
    line = next(s for s in out.splitlines() if s.startswith("Recovery:"))
    figures = (report["mse_before"], plain["mse_after"], report["mse_after"])
    assert line.startswith(
        "Recovery: held-out mean squared error {:.4g} original, {:.4g} pruned, {:.4g} recovered".format(*figures)
    )
    md = (tmp_path / "rec" / "report.md").read_text()
    assert f"| right after pruning | {plain['mse_after']:.4g} |" in md and "The data has no labels" not in md


# -- GradualPruner and an optimizer built from named_parameters() --------------------------------


def _cnn():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


def _batches():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    return [(x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]) for i in range(4)]


def _train(model, opt, batches):
    import torch.nn.functional as F

    model.train()
    for xb, yb in batches:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def test_a_bias_compensation_adds_is_named_in_an_optimizer_built_from_named_parameters():
    from cleanai_core.gradual import GradualPruner, PruningSchedule

    batches = _batches()
    model = _cnn()
    groups = [
        {"params": [(f"net.{n}", p) for n, p in model.named_parameters() if n.startswith("0.")], "lr": 1e-3},
        {"params": [(f"net.{n}", p) for n, p in model.named_parameters() if not n.startswith("0.")], "lr": 1e-2},
    ]
    opt = torch.optim.AdamW(groups)
    _train(model, opt, batches)
    gp = GradualPruner(model, batches[0][0][:2], opt, PruningSchedule(final=0.5, steps=2), by="ratio")
    gp.step(batches)
    assert model[2].bias is not None  # compensation gave the second convolution a bias, trained with its weight
    for group in opt.param_groups:  # the bias went unnamed: 4 tensors and 3 names, the state_dict one name short
        assert len(group["param_names"]) == len(group["params"])
    named = {n: p for g in opt.param_groups for n, p in zip(g["param_names"], g["params"], strict=True)}
    assert named == {f"net.{n}": p for n, p in model.named_parameters()}
    _train(model, opt, batches)
    state = opt.state_dict()
    # a resumed run (rebuilt unpruned, the pruner's checkpoint loaded, then the optimizer's) has the same names
    again = _cnn()
    opt2 = torch.optim.AdamW(
        [
            {**g, "params": [(f"net.{n}", p) for n, p in again.named_parameters() if n.startswith("0.") == (i == 0)]}
            for i, g in enumerate(groups)
        ]
    )
    gp2 = GradualPruner(again, batches[0][0][:2], opt2, PruningSchedule(final=0.5, steps=2), by="ratio")
    gp2.load_state_dict(gp.state_dict())
    again.load_state_dict(model.state_dict())
    opt2.load_state_dict(state)
    named2 = {n: p for g in opt2.param_groups for n, p in zip(g["param_names"], g["params"], strict=True)}
    assert named2 == {f"net.{n}": p for n, p in again.named_parameters()}
    assert torch.equal(opt2.state[again[2].bias]["exp_avg"], opt.state[model[2].bias]["exp_avg"])


# -- a bfloat16 checkpoint: the report measures the weights as written, and pruning further starts there ---


def test_a_bfloat16_checkpoints_report_measures_the_saved_weights_and_the_folder_prunes_further_from_them(
    tmp_path, monkeypatch
):
    import json

    pytest.importorskip("transformers")
    from cleanai_core.cli import main

    monkeypatch.chdir(tmp_path)
    _tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    torch.save({"input_ids": torch.randint(0, 61, (16, 12), generator=g)}, "ids.pt")
    common = ["--data", "ids.pt", "--ratio", "0.3", "--quiet", "--latency-repeats", "1", "--threads", "1"]
    assert main(["prune", "--model", "hf:model", *common, "--out", "a"]) == 0
    assert main(["prune", "--model", "a", *common, "--out", "b"]) == 0
    first, second = (json.loads((tmp_path / d / "report.json").read_text()) for d in "ab")
    # the same model, measured twice on the same held-out split: the first report gave the float32 pruned model's
    # perplexity (written in bfloat16), and the second run computed in bfloat16
    assert second["perplexity_before"] == first["perplexity_after"]
    assert second["params_before"] == first["params_after"] > second["params_after"]
    # "before" is the folder's pruned model: the report says it was pruned before (it read as the original)
    assert first["pruned_before_steps"] is None and second["pruned_before_steps"] == 1
    assert "pruned before by CleanAI in 1 step(s)" in (tmp_path / "b" / "report.md").read_text()
    for d in "ab":
        assert {v.dtype for v in torch.load(tmp_path / d / "model.pt").values() if v.is_floating_point()} == {
            torch.bfloat16
        }
    assert load_pruned(tmp_path / "b").model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_cleanai_folder_given_as_hf_spec_is_named_as_such(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from cleanai_core.cli import main

    monkeypatch.chdir(tmp_path)
    _tiny_llama().save_pretrained(tmp_path / "model")
    torch.save({"input_ids": torch.randint(0, 61, (16, 12), generator=torch.Generator().manual_seed(0))}, "ids.pt")
    common = ["--data", "ids.pt", "--ratio", "0.3", "--quiet", "--latency-repeats", "1", "--threads", "1"]
    assert main(["prune", "--model", "hf:model", *common, "--out", "a"]) == 0
    capsys.readouterr()
    # it said "no such local folder, and 'a' is not in the Hugging Face cache ... Unrecognized model"
    assert main(["prune", "--model", "hf:a", *common, "--out", "b"]) == 2
    err = capsys.readouterr().err
    assert "is a folder `cleanai prune` wrote" in err and "without hf:" in err and "hf:a/hf" in err
    assert not (tmp_path / "b").exists()


def test_a_gradual_runs_history_saves_and_replays_the_model_it_pruned(tmp_path, monkeypatch):
    import textwrap

    from cleanai_core.gradual import GradualPruner, PruningSchedule

    (tmp_path / "cnn_o12.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn


            def cnn():
                torch.manual_seed(0)
                return nn.Sequential(
                    nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
                )
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from cnn_o12 import cnn

    batches = _batches()
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gp = GradualPruner(model, batches[0][0][:2], opt, PruningSchedule(final=0.6, steps=3), by="ratio")
    for _ in range(3):
        _train(model, opt, batches)
        gp.step(batches)
    _train(model, opt, batches)
    history = gp.history
    assert len(history.steps) == sum(len(h.steps) for h in gp.histories) == 3
    assert history.meta["added_biases"] == ["2"]  # compensation's bias, created once by the replay
    save_pruned(tmp_path / "out", model, history, "cnn_o12:cnn")
    loaded = load_pruned(tmp_path / "out", trust_code=True)
    replayed = PruningHistory.from_json(history.to_json()).replay(cnn())
    assert {n: p.shape for n, p in replayed.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert [p.shape[0] for p in (model[0].weight, model[2].weight)] == [7, 7]  # 16 * (1 - 0.6), rounded up


# -- attributes set on the model after it was built come back from load_pruned -----------------------


def test_attributes_set_after_building_come_back_from_load_pruned_or_are_named(tmp_path, monkeypatch):
    import json
    import textwrap
    import warnings

    (tmp_path / "attrs_o12.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn


            def net():
                torch.manual_seed(0)
                return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from attrs_o12 import net

    model = net().eval()
    model.class_names = ["cat", "dog", "eel", "fox"]
    model.threshold = 0.7
    model.meta = {"epochs": 3}  # not a plain value: named, not kept
    model[0].note = "stem"
    x = torch.rand(4, 3, 8, 8)
    pruner = StructuredPruner(model, x[:1], pruning_ratio=0.5)
    pruner.collect_activations([x], progress=False)
    pruned = pruner.prune()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_pruned(tmp_path / "out", pruned, pruner.history, "attrs_o12:net")
    said = [str(w.message) for w in caught if "save_pruned" in str(w.message)]
    assert len(said) == 1 and "model.meta (dict)" in said[0] and "class_names" not in said[0]
    loaded = load_pruned(tmp_path / "out", trust_code=True)
    # architecture.json held them under 'settings', and load_pruned dropped them: the rebuilt modules lack them
    assert loaded.class_names == ["cat", "dog", "eel", "fox"] and loaded.threshold == 0.7 and loaded[0].note == "stem"
    assert not hasattr(loaded, "meta")
    arch = json.loads((tmp_path / "out" / "architecture.json").read_text())
    assert arch["added_settings"] == {
        "": {"class_names": ["cat", "dog", "eel", "fox"], "threshold": 0.7},
        "0": {"note": "stem"},
    }
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


# -- GradualPruner and a model trained by several optimizers -----------------------------------------


def _two_optimizers(model):
    backbone = torch.optim.SGD(
        [p for n, p in model.named_parameters() if not n.startswith("6.")], lr=0.05, momentum=0.9
    )
    return backbone, torch.optim.Adam(model[6].parameters(), lr=1e-2)


def test_gradual_pruning_keeps_every_optimizer_it_is_given_and_names_parameters_none_holds():
    from cleanai_core.gradual import GradualPruner, PruningSchedule

    batches = _batches()
    model = _cnn()
    backbone, head = _two_optimizers(model)

    def train(m, optimizers):
        import torch.nn.functional as F

        m.train()
        for xb, yb in batches:
            for o in optimizers:
                o.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            for o in optimizers:
                o.step()

    train(model, (backbone, head))
    exp_avg = head.state[model[6].weight]["exp_avg"].clone()
    gp = GradualPruner(model, batches[0][0][:2], [backbone, head], PruningSchedule(final=0.5, steps=2), by="ratio")
    assert gp.step(batches)[1] == [backbone, head]
    kept = gp.histories[0].steps[0]
    cols = next(e.keep for e in kept if e.module == "6" and e.slice != "outputs")  # the head's kept inputs
    # the head's optimizer holds the new weight, its Adam state sliced with it, and it trains on
    assert any(p is model[6].weight for p in head.param_groups[0]["params"])
    assert torch.equal(head.state[model[6].weight]["exp_avg"], exp_avg[:, cols])
    before = model[6].weight.detach().clone()
    train(model, (backbone, head))
    assert not torch.equal(before, model[6].weight)
    # given the backbone's optimizer alone, the head's kept stepping the old tensors: the head never trained again
    other = _cnn()
    backbone, head = _two_optimizers(other)
    train(other, (backbone, head))
    gp = GradualPruner(other, batches[0][0][:2], backbone, PruningSchedule(final=0.5, steps=2), by="ratio")
    with pytest.warns(RuntimeWarning, match=r"replaced the trainable parameter\(s\) \['6.weight'.*no optimizer given"):
        gp.step(batches)


def test_a_gradual_step_inside_a_bfloat16_autocast_training_loop_prunes_as_outside_it():
    from torch import nn

    from cleanai_core.gradual import GradualPruner, PruningSchedule

    def run(autocast: bool):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, bias=False),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
        )  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        _train(model, opt, batches)
        gp = GradualPruner(model, batches[0][0][:2], opt, PruningSchedule(final=0.5, steps=2), by="ratio")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the user's training loop's context
            gp.step(batches)
        return model, gp

    batches = _batches()
    (plain, gp_plain), (amp, gp_amp) = run(False), run(True)
    # the step scored on bfloat16 activations and refreshed the BatchNorm statistics from them: other weights
    # (1e-3 apart here; other channels on a ResNet-18)
    assert gp_amp.history.to_json() == gp_plain.history.to_json()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), amp.state_dict().values(), strict=True))
    assert plain[0].weight.shape[0] < 16


# -- a module's extra state (get_extra_state) through save_pruned, load_pruned and recover -------


EXTRA_STATE_NET = """
import torch
from torch import nn


class Labelled(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        self.classes = ["a", "b", "c", "d"]
        self.calib = torch.zeros(4)

    def get_extra_state(self):
        return {"classes": self.classes, "calib": self.calib}

    def set_extra_state(self, state):
        self.classes, self.calib = list(state["classes"]), state["calib"]

    def forward(self, x):
        return self.body(x) + self.calib
"""


def test_a_models_extra_state_saves_loads_and_survives_recovery(tmp_path, monkeypatch):
    from torch.utils.data import TensorDataset

    from cleanai_core.errors import UserError
    from cleanai_core.recovery import recover

    (tmp_path / "extra_o12.py").write_text(EXTRA_STATE_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    from extra_o12 import Labelled

    model = Labelled().eval()
    model.classes, model.calib = ["cat", "dog", "eel", "fox"], torch.tensor([0.1, 0.2, 0.3, 0.4])
    x = torch.rand(8, 3, 8, 8)
    pruner = StructuredPruner(model, x[:1], pruning_ratio=0.5)
    pruner.collect_activations([x], progress=False)
    pruned = pruner.prune()
    # save_pruned raised AttributeError: 'dict' object has no attribute 'layout'
    save_pruned(tmp_path / "out", pruned, pruner.history, "extra_o12:Labelled")
    loaded = load_pruned(tmp_path / "out", trust_code=True)
    assert loaded.classes == ["cat", "dog", "eel", "fox"] and torch.equal(loaded.calib, pruned.calib)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    # recover() raised AttributeError: 'dict' object has no attribute 'detach' (its copy of the best epoch)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    recovered, _ = recover(pruned, model, data, epochs=1, progress=False)
    assert recovered.classes == ["cat", "dog", "eel", "fox"] and torch.equal(recovered.calib, pruned.calib)
    pruned.classes = object()  # not plain data: refused before anything is written
    with pytest.raises(UserError, match="extra state of the model .*not plain data"):
        save_pruned(tmp_path / "bad", pruned, pruner.history, "extra_o12:Labelled")
    assert not (tmp_path / "bad").exists()


def test_cleanai_prune_takes_weights_with_a_models_extra_state_and_writes_it_back(tmp_path, monkeypatch):
    import json

    from cleanai_core.cli import main

    (tmp_path / "extra_o12b.py").write_text(EXTRA_STATE_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from extra_o12b import Labelled

    model = Labelled()
    model.classes, model.calib = ["cat", "dog", "eel", "fox"], torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.save(model.state_dict(), "w.pt")
    g = torch.Generator().manual_seed(0)
    torch.save((torch.rand(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)), "d.pt")
    common = ["--data", "d.pt", "--ratio", "0.5", "--quiet", "--latency-repeats", "1", "--recover-epochs", "1"]
    # "'w.pt' does not hold a state_dict (a dict of parameter names to tensors)"
    assert main(["prune", "--model", "extra_o12b:Labelled", "--weights", "w.pt", *common, "--out", "o"]) == 0
    loaded = load_pruned(tmp_path / "o", trust_code=True)
    assert loaded.classes == ["cat", "dog", "eel", "fox"] and torch.equal(loaded.calib, model.calib)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert sum(p.numel() for p in loaded.parameters()) == report["params_after"] < report["params_before"]
