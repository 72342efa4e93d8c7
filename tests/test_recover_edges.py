"""recover() on what a demanding user passes: bad loss and schedule numbers, huge
temperatures, a loss that turns NaN, float64 / bfloat16 models, a call under no_grad or
inference_mode, data without len()."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from cleanai_core import recover
from cleanai_core.errors import UserError
from cleanai_core.recovery import distillation_loss
from cleanai_plugins.io.demo import digits_tensors


def _digits(n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_tensors()
    return x[:n], y[:n]


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"temperature": math.inf}, "temperature=inf must be a finite number > 0"),
        ({"temperature": math.nan}, "temperature=nan"),
        ({"kd_weight": math.nan}, "kd_weight=nan"),
        ({"kd_weight": -1.0}, "kd_weight=-1.0 must be >= 0"),
        ({"ce_weight": -0.5}, "ce_weight=-0.5 must be >= 0"),
        ({"kd_weight": 0, "ce_weight": 0}, "both 0"),
        ({"lr": math.inf}, "lr=inf"),
        ({"patience": 0}, "patience=0 must be an integer >= 1 or None"),
        ({"batch_size": 0}, "batch_size=0 must be an integer >= 1"),
        ({"warmup_fraction": 1.5}, "warmup_fraction=1.5 must be >= 0 and <= 1.0"),
        ({"max_grad_norm": math.nan}, "max_grad_norm=nan"),
    ],
)
def test_numbers_that_made_every_loss_nan_or_trained_backwards_are_refused(kwargs, words):
    # before: inf/nan temperatures and weights trained on NaN losses without a word, a negative
    # ce_weight pushed towards wrong answers, patience=0 stopped after epoch 1 although it improved,
    # batch_size=0 raised a bare ValueError from DataLoader
    model = _linear()
    with pytest.raises(UserError, match=words):
        recover(model, model, TensorDataset(*_digits()), epochs=1, progress=False, **kwargs)


@pytest.mark.parametrize("temperature", [1e4, 1e6])
def test_a_huge_temperature_gives_the_exact_kl_term(temperature):
    torch.manual_seed(0)
    s, t = torch.randn(64, 10) * 5, torch.randn(64, 10) * 5
    p, q = F.log_softmax(t.double() / temperature, -1), F.log_softmax(s.double() / temperature, -1)
    exact = float((p.exp() * (p - q)).sum(-1).mean()) * temperature**2  # -> the logit-matching limit, ~23.29
    got = float(distillation_loss(s, t, None, temperature=temperature))
    # float32 gave 22.89 at T=1e4 and -2805.8 at T=1e6
    assert got == pytest.approx(exact, rel=1e-4) and 23.0 < got < 23.6


def test_a_nan_loss_stops_at_once_with_a_warning_and_returns_the_best_weights():
    x, y = _digits()
    bad = x[:50].clone()
    bad[3, 0, 0, 0] = math.nan  # one broken sample in the first training batch
    train = [(bad, y[:50]), (x[50:100], y[50:100])]
    model, teacher = _linear(0), _linear(1)
    with pytest.warns(RuntimeWarning, match=r"recovery stopped in epoch 1: the training loss became nan") as caught:
        student, result = recover(model, teacher, train, val_data=[(x[200:], y[200:])], epochs=5, patience=None,
                                  progress=False)  # fmt: skip
    assert caught[0].filename == __file__  # points at the caller, not at torch's decorator wrappers
    # before: five epochs of NaN steps (train_loss nan x 5), no word about it
    assert result.diverged and result.stopped_early and result.epochs == 1 and math.isnan(result.train_loss[0])
    assert result.history == (result.initial,)  # no step was taken on the NaN loss
    assert _same(student, model) and all(torch.isfinite(p).all() for p in student.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_float64_and_bfloat16_students_train_on_float32_data_from_a_float32_teacher(dtype):
    x, y = _digits()
    model = _linear().to(dtype)
    # before: RuntimeError: Input type (torch.FloatTensor) and weight type (...) should be the same
    student, result = recover(model, _linear(1), TensorDataset(x, y), epochs=2, lr=1e-2, progress=False)
    assert all(p.dtype == dtype for p in student.parameters())
    assert result.metric == "accuracy" and result.best > result.initial + 0.2, result
    assert not _same(student, model)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_recover_called_under_no_grad_or_inference_mode_still_trains(context):
    x, y = _digits()
    model = _linear()
    with context():  # e.g. right after the user's own evaluation block
        student, result = recover(model, None, TensorDataset(x, y), epochs=2, lr=1e-2, progress=False)
    # before: UserError "nothing to train on: the batches have no labels and there is no teacher"
    assert result.best > result.initial + 0.2 and not _same(student, model)
    loss = F.cross_entropy(student(x), y)
    loss.backward()  # the returned model trains on (no inference tensors)
    assert student[1].weight.grad is not None


class _Samples(IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y, strict=True)


def test_data_without_len_trains_or_is_refused_with_a_reason():
    x, y = _digits()
    held = TensorDataset(x[300:], y[300:])
    # an IterableDataset of samples is batched like a map-style one; a DataLoader over it is counted
    # (before: TypeError: object of type '_Samples' has no len())
    for data in (_Samples(x[:300], y[:300]), DataLoader(_Samples(x[:300], y[:300]), batch_size=64)):
        student, result = recover(_linear(), None, data, val_data=held, epochs=2, lr=1e-2, progress=False)
        assert result.epochs == 2 and result.best > result.initial + 0.2
    gen = ((x[i : i + 50], y[i : i + 50]) for i in range(0, 300, 50))
    with pytest.raises(UserError, match="one-shot iterator"):
        recover(_linear(), None, gen, val_data=held, epochs=2, progress=False)
    with pytest.raises(UserError, match="the training part of train_data is empty"):
        recover(_linear(), None, [], val_data=held, epochs=1, progress=False)  # trained nothing, reported success


def test_frozen_parameters_stay_put_and_a_model_with_every_parameter_frozen_is_refused():
    x, y = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    for p in model[1].parameters():
        p.requires_grad_(False)
    student, result = recover(model, None, TensorDataset(x, y), epochs=3, lr=5e-2, progress=False)
    assert result.best > result.initial + 0.2
    assert torch.equal(student[1].weight, model[1].weight) and not student[1].weight.requires_grad
    assert not torch.equal(student[3].weight, model[3].weight) and student[3].weight.requires_grad
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError, match="requires_grad=False: there is nothing to train"):
        recover(model, None, TensorDataset(x, y), epochs=1, progress=False)  # was "no labels and no teacher"


class _BnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn = nn.Linear(64, 32), nn.BatchNorm1d(32)
        self.drop, self.fc2 = nn.Dropout(0.5), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.bn(self.fc1(x.flatten(1))))))


def _bn_net() -> _BnNet:
    torch.manual_seed(0)
    return _BnNet().eval()


def test_recover_leaves_the_callers_global_rng_state_alone():
    # before: recover() called torch.manual_seed(seed) on the global generator, so the caller's
    # next random draws repeated from seed 0 whatever their own seed was
    model, data = _bn_net(), TensorDataset(*_digits(200))
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    recover(model, None, data, epochs=1, progress=False)
    assert torch.equal(torch.rand(5), expected)
    a, _ = recover(_bn_net(), None, TensorDataset(*_digits(200)), epochs=1, seed=3, progress=False)
    b, _ = recover(_bn_net(), None, TensorDataset(*_digits(200)), epochs=1, seed=3, progress=False)
    assert _same(a, b)  # the seed still makes shuffling and dropout reproducible


def test_zero_learning_rate_is_a_control_run_that_moves_no_weight():
    # before: lr=0 was refused, though PyTorch's optimizers and schedulers take it (a sweep's control)
    model = _bn_net()
    student, result = recover(model, None, TensorDataset(*_digits(200)), epochs=2, lr=0.0, progress=False)
    params = dict(model.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in student.named_parameters())
    assert result.epochs == 2 and len(result.history) == 2
    assert not torch.equal(student.bn.running_mean, model.bn.running_mean)  # train-mode statistics did adapt


@pytest.mark.parametrize("how", ["requires_grad", "eval_mode"])
def test_batchnorm_frozen_by_the_user_stays_frozen_while_recovering(how):
    # before: student.train() put every module in train mode, so a frozen BatchNorm's running
    # statistics drifted towards the recovery data
    model = _bn_net()
    if how == "requires_grad":
        model.bn.requires_grad_(False)  # model in eval mode, as pruning returns it
    else:
        model.train()
        model.bn.eval()  # the user's own training setup: everything trains but this norm
    student, _ = recover(model, None, TensorDataset(*_digits(200)), epochs=2, lr=1e-2, progress=False)
    assert torch.equal(student.bn.running_mean, model.bn.running_mean)
    assert torch.equal(student.bn.running_var, model.bn.running_var)
    assert int(student.bn.num_batches_tracked) == 0
    assert not torch.equal(student.fc1.weight, model.fc1.weight)  # the rest did train
    assert student.training == model.training and not student.bn.training  # the modes are restored
    unfrozen, _ = recover(_bn_net(), None, TensorDataset(*_digits(200)), epochs=1, progress=False)
    assert int(unfrozen.bn.num_batches_tracked) > 0  # an ordinary BatchNorm does update


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"val_fraction": "0.1"}, "val_fraction='0.1' must be a number"),
        ({"seed": "a"}, "seed='a' must be an integer"),
        ({"device": "gpu"}, "device='gpu' is not a device"),
    ],
)
def test_arguments_of_the_wrong_type_are_refused_by_name(kwargs, words):
    # before: TypeError ('<' between float and str), ValueError from int(), RuntimeError from torch.device
    model = _linear()
    with pytest.raises(UserError, match=words):
        recover(model, model, TensorDataset(*_digits()), epochs=1, progress=False, **kwargs)


@pytest.mark.parametrize("shift", [10, -10])
def test_labels_outside_the_models_classes_are_refused(shift):
    # before: IndexError: Target 11 is out of bounds (from cross_entropy, deep in the loop)
    x, y = _digits(40)
    model = _linear()
    with pytest.raises(UserError, match=r"labels go from .* but the model has 10 outputs"):
        recover(model, None, TensorDataset(x, y + shift), epochs=1, progress=False)
    assert _same(model, _linear())


def test_a_teacher_with_other_outputs_is_refused():
    # before: RuntimeError: The size of tensor a (7) must match the size of tensor b (10)
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    with pytest.raises(UserError, match=r"teacher's outputs have shape \(\d+, 7\) but the pruned model's \(\d+, 10\)"):
        recover(_linear(), teacher, TensorDataset(*_digits(40)), epochs=1, progress=False)


def test_a_batch_of_another_shape_names_the_shape():
    # before: RuntimeError: mat1 and mat2 shapes cannot be multiplied, from the middle of training
    x, y = _digits(16)
    train = [(x[:8], y[:8]), (x[8:, :, :4, :4], y[8:])]
    with pytest.raises(UserError, match=r"input shape\(s\) \[\(8, 1, 4, 4\)\].*all of one shape"):
        recover(_linear(), None, train, val_data=[(x[:8], y[:8])], epochs=1, progress=False)


def test_an_empty_val_data_is_refused():
    # before: a bare StopIteration
    with pytest.raises(UserError, match=r"held-out data \(val_data\) is empty"):
        recover(_linear(), None, TensorDataset(*_digits(40)), val_data=[], epochs=1, progress=False)
