"""Library-level safety: clear errors, the user's model untouched, never a broken model."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from cleanai_core import DependencyGraph, PruningHistory, StructuredPruner
from cleanai_core.errors import TraceError, UserError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class HardcodedReshape(nn.Module):
    """Reshapes with a constant channel count: pruning conv2 breaks it, conv1 does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)
        self.c = 16

    def forward(self, x):
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(x.reshape(x.shape[0], self.c * 4 * 4))


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 4, 4)


def test_user_model_untouched_even_in_train_mode():
    model = Net().train()
    for p in model.conv2.parameters():
        p.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    ids = [id(p) for p in model.parameters()]
    pruner = StructuredPruner(model, _x(), pruning_ratio=0.5)
    pruner.collect_activations([_x(4) for _ in range(3)], progress=False)
    pruned = pruner.prune()
    assert pruned is not model
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.conv2.parameters()] == [False, False]
    assert [id(p) for p in model.parameters()] == ids
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert pruned.conv1.out_channels == 8 and pruned.conv2.out_channels == 16


class TiedHead(Net):
    """Net with two extra 10x10 layers sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(10, 10)
        self.b = nn.Linear(10, 10)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(super().forward(x)))


def test_pruned_copy_shares_no_tensor_with_the_model():
    # compensation writes in place and some tensors stay unsliced: neither may reach the user's model
    model = TiedHead().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = StructuredPruner(model, _x(), pruning_ratio=0.5, ignored_layers=["fc", "a"])
    pruner.collect_activations([_x(4) for _ in range(3)], progress=False)
    pruned = pruner.prune()
    assert pruned.conv2.out_channels == 16 and pruned.fc.in_features == 16
    assert pruned.a.weight.shape == (10, 10) and pruned.b.weight is pruned.a.weight  # the tie survives
    mine = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not [n for n, t in [*pruned.named_parameters(), *pruned.named_buffers()] if t.data_ptr() in mine]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(pruned.fc.bias, model.fc.bias)  # compensation did write, to the copy


@pytest.mark.parametrize("how", ["in_place", "data_swap"])
def test_a_pruner_writing_into_shared_tensors_is_named(how):
    """The pruned copy shares the user's tensors until they are sliced: a third-party
    pruner that writes into one (instead of replacing it) is caught and named."""
    from cleanai_core import hookimpl
    from cleanai_core.plugins import temporary_plugin
    from cleanai_plugins.layers.conv import ConvPruner

    class CarelessConvPruner(ConvPruner):
        def prune(self, module, keep):
            if how == "in_place":
                with torch.no_grad():
                    module.weight.mul_(2.0)
            else:
                module.weight.data = module.weight.data.clone()  # swaps the storage under the shared Parameter
            super().prune(module, keep)

    class Careless:
        @hookimpl(tryfirst=True)
        def cleanai_layer_pruner(self, module):
            return CarelessConvPruner() if isinstance(module, nn.Conv2d) else None

    model = Net().eval()
    expected = r"wrote into conv1\.weight, conv2\.weight .*CarelessConvPruner \(conv1\), CarelessConvPruner \(conv2\)"
    with temporary_plugin(Careless(), name="careless"), pytest.raises(RuntimeError, match=expected):
        StructuredPruner(model, _x(), "magnitude", pruning_ratio=0.5).prune()
    # the default pruners replace tensors: the same model prunes cleanly and stays as it was
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert StructuredPruner(model, _x(), "magnitude", pruning_ratio=0.5).prune().conv1.out_channels == 8
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_hooks_removed_when_calibration_fails():
    model = Net().eval()
    pruner = StructuredPruner(model, _x(), pruning_ratio=0.5)

    def bad_loader():
        yield _x(2)
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        pruner.collect_activations(bad_loader(), progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_nan_activations_are_reported():
    model = Net().eval()
    pruner = StructuredPruner(model, _x(), pruning_ratio=0.5)
    bad = _x(2)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN or inf"):
        pruner.collect_activations([bad], progress=False)


def test_nan_example_inputs_rejected():
    x = _x()
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(UserError, match="NaN or inf"):
        StructuredPruner(Net().eval(), x, pruning_ratio=0.5)


def test_wrong_input_shape_names_the_problem():
    with pytest.raises(TraceError, match="failed to run on the example inputs"):
        DependencyGraph(Net().eval(), torch.randn(2, 5, 4, 4))


def test_output_without_tensors_needs_transform():
    class Weird(Net):
        def forward(self, x):
            return object()

    with pytest.raises(TraceError, match="output_transform"):
        DependencyGraph(Weird().eval(), _x())


def test_every_layer_ignored():
    model = Net().eval()
    with pytest.raises(UserError, match="nothing in this model can be pruned"):
        StructuredPruner(model, _x(), "magnitude", pruning_ratio=0.5, ignored_layers=[nn.Conv2d])


def test_breaking_group_is_skipped_with_a_warning():
    model = HardcodedReshape().eval()
    pruner = StructuredPruner(model, _x(), "magnitude", pruning_ratio=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = pruner.prune()
    msgs = [str(w.message) for w in caught if "skipped group" in str(w.message)]
    assert len(msgs) == 1 and "conv2" in msgs[0] and "ConvPruner" in msgs[0]
    assert pruned.conv1.out_channels == 4  # the safe group was still pruned
    assert pruned.conv2.out_channels == 16
    assert pruned(_x()).shape == (2, 10)
    assert len(pruner.report()["skipped_groups"]) == 1


def test_inplace_prunes_the_model_itself():
    model = Net().eval()
    x = _x()
    pruner = StructuredPruner(model, x, "magnitude", pruning_ratio=0.5, inplace=True)
    out = pruner.prune()
    assert out is model
    assert model.conv1.weight.shape == (8, 3, 3, 3)
    assert model(x).shape == (2, 10)


def test_corrupt_history_is_a_clear_error(tmp_path):
    path = tmp_path / "history.json"
    pruner = StructuredPruner(Net().eval(), _x(), "magnitude", pruning_ratio=0.5)
    pruner.prune()
    pruner.history.save(path)
    text = path.read_text()
    assert PruningHistory.load(path).to_json() == json.loads(text)
    path.write_text(text[: len(text) // 2])
    with pytest.raises(UserError, match="not valid JSON"):
        PruningHistory.load(path)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(UserError, match="not a CleanAI pruning history"):
        PruningHistory.load(path)


def test_history_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    path.write_text("previous")
    pruner = StructuredPruner(Net().eval(), _x(), "magnitude", pruning_ratio=0.5)
    pruner.prune()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("cleanai_core.history.os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        pruner.history.save(path)
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]


def test_report_before_prune_is_a_clear_error():
    pruner = StructuredPruner(Net().eval(), _x(), "magnitude", pruning_ratio=0.5)
    with pytest.raises(UserError, match="call pruner.prune"):
        pruner.report()


def test_activation_importance_without_data_is_a_clear_error():
    pruner = StructuredPruner(Net().eval(), _x(), pruning_ratio=0.5)
    with pytest.raises(UserError, match="collect_activations"):
        pruner.prune()


def _two_step_history() -> PruningHistory:
    pruner = StructuredPruner(Net().eval(), _x(), "magnitude", pruning_ratio=0.5, iterative_steps=2)
    pruner.prune()
    assert len(pruner.history.steps) == 2
    return pruner.history


def test_replay_of_a_history_that_does_not_fit_changes_nothing():
    data = _two_step_history().to_json()
    data["steps"][1][0]["keep"] = [999]  # step 0 fits; step 1 does not
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="step 1 of 2 failed.*the model was not changed"):
        PruningHistory.from_json(data).replay(model)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in before.items()}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.conv1.out_channels == 16


@pytest.mark.parametrize("target", ["already pruned", "another architecture", "not a module"])
def test_replay_on_the_wrong_model_is_a_user_error(target):
    history = _two_step_history()
    if target == "already pruned":
        model = history.replay(Net())
    elif target == "another architecture":
        model = nn.Sequential(nn.Conv2d(3, 4, 1))
    else:
        model = None
    shapes = None if model is None else {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="does not fit the model|unpruned torch.nn.Module"):
        history.replay(model)
    if model is not None:
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


def test_replay_keeps_the_users_hooks_and_prunes_in_place():
    history = _two_step_history()
    model = Net()
    seen = []
    handle = model.conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    assert history.replay(model) is model
    model(_x())
    assert seen == [model.conv2.out_channels] and model.conv2.out_channels < 32
    handle.remove()
    model(_x())
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("loader", "message"),
    [
        ([None], "yielded a NoneType"),
        ([torch.randn(0, 3, 4, 4), torch.randn(0, 3, 4, 4)], "holds no samples"),
        (5, "cannot be iterated"),
        ([torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4)], r"calibration batch 1 \(input shape \(2, 3, 4\)\)"),
        (torch.randn(4, 3, 4, 4), r"calibration batch 0 \(input shape \(3, 4, 4\)\).*batch as the first dimension"),
    ],
    ids=["None batch", "only empty batches", "not iterable", "a batch of the wrong shape", "a tensor, not batches"],
)
def test_calibration_data_the_model_cannot_use_is_a_user_error(loader, message):
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = StructuredPruner(model, _x(), pruning_ratio=0.5)
    with pytest.raises(UserError, match=message):
        pruner.collect_activations(loader, progress=False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="collect_activations"):  # nothing half-collected to prune on
        pruner.prune()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"format": "cleanai-history/1"}, "'steps' must be a list of lists of edits"),
        ({"format": "cleanai-history/1", "steps": "abc"}, "'steps' must be a list"),
        ({"format": "cleanai-history/1", "steps": [[{"module": "conv1"}]]}, r"edit 0 has no \['slice', 'keep'\]"),
        ({"format": "cleanai-history/1", "steps": [], "meta": [1, 2]}, "'meta' must be an object"),
        ({"format": "cleanai-history/1", "steps": [[{"module": "conv1", "slice": "out", "keep": [-1]}]]}, "'keep'"),
    ],
)
def test_a_history_out_of_form_is_refused_by_from_json_and_load(tmp_path, data, words):
    # before: KeyError: 'steps' / 'slice', TypeError (string indices, dict update sequence); load()
    # and from_json() skipped the checks that load_pruned makes on a saved folder's history.json
    with pytest.raises(UserError, match=words):
        PruningHistory.from_json(data)
    (tmp_path / "h.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=words):
        PruningHistory.load(tmp_path / "h.json")


def test_history_paths_that_are_folders_missing_or_none_are_refused(tmp_path):
    # before: IsADirectoryError, FileNotFoundError from the temporary file, TypeError for None
    history = _two_step_history()
    with pytest.raises(UserError, match="is a folder; give the history.json inside it"):
        PruningHistory.load(tmp_path)
    with pytest.raises(UserError, match="needs a file path"):
        PruningHistory.load(None)
    with pytest.raises(UserError, match="is a folder; give a file path"):
        history.save(tmp_path)
    with pytest.raises(UserError, match="the folder .*nodir' does not exist"):
        history.save(tmp_path / "nodir" / "h.json")
    assert list(tmp_path.iterdir()) == []


def test_run_job_refuses_a_misspelt_option_and_what_is_not_a_dict(tmp_path):
    # before: run_job({"ratioo": 0.5, ...}) ignored the key and pruned at the default ratio, writing
    # the result; run_job(None) was a TypeError; DependencyGraph(5, x) an AttributeError
    from cleanai_core import run_job

    base = {"model": "cleanai_plugins.io.demo:DigitsCNN", "data": str(tmp_path / "d.pt"), "out": str(tmp_path / "o")}
    with pytest.raises(UserError, match=r"unknown option\(s\) 'ratioo' \(did you mean 'ratio'\?\)"):
        run_job({**base, "ratioo": 0.5})
    with pytest.raises(UserError, match="run_job needs a PruneConfig or a dict of options, got NoneType"):
        run_job(None)
    with pytest.raises(UserError, match="DependencyGraph needs a torch.nn.Module, got int"):
        DependencyGraph(5, _x())
    assert list(tmp_path.iterdir()) == []
