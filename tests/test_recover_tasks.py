"""Recovery's tasks beyond N-class classification and causal LMs: a binary classifier with
one logit, labels to ignore (-100), and taggers (a label per position) found by ``task="auto"``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cleanai_core.errors import UserError
from cleanai_core.recovery import _task_of, distillation_loss, evaluate_held_out, recover


def test_one_logit_is_a_binary_classifier_its_loss_the_binary_cross_entropy():
    g = torch.Generator().manual_seed(0)
    z, zt = torch.randn(16, 1, generator=g), torch.randn(16, 1, generator=g)
    y = torch.randint(0, 2, (16, 1), generator=g).float()  # a column, as BCEWithLogitsLoss takes it
    ce = distillation_loss(z, None, y)
    assert torch.allclose(ce, F.binary_cross_entropy_with_logits(z, y))
    kd = distillation_loss(z, zt, None, temperature=1.0)
    p, q = torch.sigmoid(zt), torch.sigmoid(z)  # KL of the teacher's Bernoulli from the student's
    bernoulli_kl = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean()
    assert torch.allclose(kd, bernoulli_kl, atol=1e-6)
    with pytest.raises(UserError, match=r"the model has 1 output \(a binary classifier: labels 0 and 1\)"):
        distillation_loss(z, None, y + 1)


def test_a_binary_classifier_recovers_and_its_accuracy_is_the_sign_of_its_logit():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    y = (x[:, 0] > 0).float()[:, None]
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    student = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))
    _, result = recover(student, teacher, TensorDataset(x, y), epochs=2, progress=False, amp=False)
    assert result.metric == "accuracy"
    loader = DataLoader(TensorDataset(x[:50], y[:50]), batch_size=16)
    metric, value = evaluate_held_out(student, loader, torch.device("cpu"), "classification")
    with torch.no_grad():
        expected = float(((student(x[:50]) > 0).float() == y[:50]).float().mean())
    assert metric == "accuracy" and value == pytest.approx(expected)


def test_labels_of_minus_100_count_in_no_loss_and_no_accuracy():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(12, 4, generator=g)
    y = torch.randint(0, 4, (12,), generator=g)
    y[::3] = -100
    keep = y != -100
    assert torch.allclose(distillation_loss(s, None, y), F.cross_entropy(s[keep], y[keep]))
    assert float(distillation_loss(s, None, torch.full((12,), -100))) == 0.0  # nothing to learn, not NaN
    model = nn.Linear(3, 4)
    x = torch.randn(12, 3, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    _, value = evaluate_held_out(model, loader, torch.device("cpu"), "classification")
    with torch.no_grad():
        pred = model(x).argmax(-1)
    assert value == pytest.approx(float((pred[keep] == y[keep]).float().mean()))


def _tagger_and_lm():
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=97, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    tagger = transformers.BertForTokenClassification(transformers.BertConfig(num_labels=5, **common)).eval()
    lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=16, n_layer=1, n_head=2)).eval()
    return tagger, lm


def test_a_tagger_is_not_taken_for_a_causal_lm_and_learns_each_positions_own_label():
    tagger, lm = _tagger_and_lm()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert _task_of(tagger(ids).logits, "auto", tagger) == "token"
        assert _task_of(lm(ids).logits, "auto", lm) == "causal_lm"
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 7, 5, generator=g), torch.randn(2, 7, 5, generator=g)
    tags = torch.randint(0, 5, (2, 7), generator=g)
    tags[:, 0] = -100  # [CLS]
    keep = tags.reshape(-1) != -100
    got = distillation_loss(s, None, tags, task="token")
    assert torch.allclose(got, F.cross_entropy(s.reshape(-1, 5)[keep], tags.reshape(-1)[keep]))  # not shifted
    kd = distillation_loss(s, t, None, task="token", temperature=1.0)
    per = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kd, per.mean())


class _Rows:
    """Samples by index with a length, and no torch ``Dataset`` (as a Hugging Face ``datasets.Dataset``)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_a_tagger_recovers_without_being_told_its_task_and_is_scored_at_its_labelled_positions():
    tagger, _ = _tagger_and_lm()
    torch.manual_seed(3)
    ids = torch.randint(0, 97, (40, 6))
    tags = ids % 5  # a tag each position can learn from its own token
    tags[:, 0] = -100
    data = _Rows([{"input_ids": ids[i], "labels": tags[i]} for i in range(40)])
    student, result = recover(tagger, tagger, data, epochs=1, progress=False, amp=False, batch_size=8)
    assert result.task == "token" and result.metric == "perplexity"
    loader = DataLoader(data.rows[:16], batch_size=8)
    metric, value = evaluate_held_out(student, loader, torch.device("cpu"), result.task)
    with torch.no_grad():
        logits = student(input_ids=ids[:16]).logits
    keep = tags[:16] != -100  # the tags' own positions, not the next token's
    assert metric == "perplexity"
    assert value == pytest.approx(math.exp(float(F.cross_entropy(logits[keep], tags[:16][keep]))), rel=1e-5)


def test_the_reports_evaluator_reads_one_logit_as_a_binary_classifier():
    from cleanai_plugins.io.evaluation import cleanai_evaluate

    torch.manual_seed(4)
    model = nn.Linear(5, 1)
    x = torch.randn(30, 5)
    y = torch.randint(0, 2, (30,))
    result = cleanai_evaluate(model, DataLoader(TensorDataset(x, y), batch_size=8), torch.device("cpu"))
    with torch.no_grad():
        expected = float(((model(x)[:, 0] > 0).long() == y).float().mean())
    assert result["accuracy"] == pytest.approx(expected) and result["evaluated"] == 30
    with pytest.raises(UserError, match=r"1 output \(a binary classifier"):
        cleanai_evaluate(model, DataLoader(TensorDataset(x, y + 1), batch_size=8), torch.device("cpu"))


def test_gradient_criteria_take_a_binary_classifiers_binary_cross_entropy():
    from cleanai_core.collect import accumulate_gradients

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 1)).eval()
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    grads = accumulate_gradients(model, [(x, y)], None, None)
    loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], y.float())
    expected = torch.autograd.grad(loss, [model[2].weight, model[0].weight])
    assert torch.allclose(grads["2.weight"], expected[0], atol=1e-6)
    assert torch.allclose(grads["0.weight"], expected[1], atol=1e-6)


def test_a_regression_recovers_on_squared_errors_and_reports_its_mean_squared_error():
    torch.manual_seed(6)
    x = torch.randn(200, 4)
    y = torch.stack([x[:, 0] * 2 + 0.5, x[:, 1] - x[:, 2]], 1)  # fractional targets, two outputs
    teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    target = torch.randn(5, 2, generator=g)
    got = distillation_loss(s, t, target, task="regression", kd_weight=0.5, ce_weight=2.0)
    assert torch.allclose(got, 0.5 * F.mse_loss(s, t) + 2.0 * F.mse_loss(s, target))  # no softmax, no temperature
    soft = torch.softmax(y, 1)  # rows of class probabilities: soft labels, not a regression
    assert _task_of(teacher(x), "auto", teacher, soft) == "classification"
    recovered, result = recover(student, teacher, TensorDataset(x, y), epochs=3, progress=False, amp=False)
    assert result.task == "regression" and result.metric == "mse" and not result.higher_is_better
    assert result.best <= result.initial
    loader = DataLoader(TensorDataset(x[:40], y[:40]), batch_size=16)
    metric, value = evaluate_held_out(recovered, loader, torch.device("cpu"), "regression")
    with torch.no_grad():
        expected = float(((recovered(x[:40]) - y[:40]) ** 2).mean())
    assert metric == "mse" and value == pytest.approx(expected, rel=1e-5)


def test_the_reports_evaluator_gives_a_regressions_mean_squared_error():
    from cleanai_plugins.io.evaluation import cleanai_evaluate

    torch.manual_seed(7)
    model = nn.Linear(5, 2)
    x, y = torch.randn(30, 5), torch.randn(30, 2)
    result = cleanai_evaluate(model, DataLoader(TensorDataset(x, y), batch_size=8), torch.device("cpu"))
    with torch.no_grad():
        expected = float(((model(x) - y) ** 2).mean())
    assert result["mse"] == pytest.approx(expected, rel=1e-6) and result["recovery_task"] == "regression"
    assert result["evaluated"] == 30  # samples, as for accuracy (not the 60 values)
    assert "accuracy" not in result
    wrong = cleanai_evaluate(model, DataLoader(TensorDataset(x, torch.randn(30, 3)), batch_size=8), torch.device("cpu"))
    assert "mse" not in wrong and "not class indices" in wrong["accuracy_note"]  # not shaped like the outputs


def test_a_regression_job_reports_its_error_before_and_after(tmp_path):
    from cleanai_core.job.run import run_job

    torch.manual_seed(8)
    x = torch.randn(64, 6)
    y = torch.stack([x[:, 0] * 0.7 + 0.2, x[:, 1] * x[:, 2]], 1)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)).eval()
    cfg = {"model": "memory", "data": "memory", "ratio": 0.5, "out": str(tmp_path / "o"), "quiet": True}
    report = run_job(cfg, model=model, dataset=TensorDataset(x, y))
    assert report["mse_before"] > 0 and report["mse_after"] > 0 and report["accuracy_before"] is None
    assert report["params_after"] < report["params_before"]
    assert "Mean squared error" in (tmp_path / "o" / "report.md").read_text()


def test_whole_number_targets_of_a_one_output_model_are_a_regressions():
    from cleanai_core.runtime import reads_as_regression

    one, three = torch.zeros(4, 1), torch.zeros(4, 3)
    ratings = torch.tensor([1.0, 3.0, 5.0, 2.0])  # ratings, counts: whole numbers, one per sample
    assert reads_as_regression(one, ratings) and reads_as_regression(one, ratings[:, None])
    assert not reads_as_regression(one, torch.tensor([0.0, 1.0, 1.0, 0.0]))  # a binary classifier's labels
    assert not reads_as_regression(one, ratings.long())  # integers are class labels
    assert not reads_as_regression(three, ratings)  # class indices of three outputs
    assert not reads_as_regression(three, torch.eye(3)[[0, 2, 1, 0]])  # one-hot rows
    assert not reads_as_regression(three, torch.softmax(torch.randn(4, 3), 1))  # soft labels
    assert reads_as_regression(three, torch.tensor([[2.0, 0.0, 7.0]]).repeat(4, 1))  # counts per output
    assert _task_of(one, "auto", None, ratings) == "regression"
    assert _task_of(one, "auto", None, torch.tensor([0.0, 1.0, 1.0, 0.0])) == "classification"


def test_the_reports_evaluator_and_gradients_read_whole_number_targets_as_a_regression():
    from cleanai_core.collect import accumulate_gradients
    from cleanai_plugins.io.evaluation import cleanai_evaluate

    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 1)).eval()
    x = torch.randn(30, 5)
    y = torch.randint(1, 6, (30,)).float()  # star ratings 1.0-5.0
    result = cleanai_evaluate(model, DataLoader(TensorDataset(x, y), batch_size=8), torch.device("cpu"))
    with torch.no_grad():
        expected = float(((model(x)[:, 0] - y) ** 2).mean())
    assert result["mse"] == pytest.approx(expected, rel=1e-6) and result["evaluated"] == 30
    assert result["recovery_task"] == "regression" and "accuracy" not in result
    grads = accumulate_gradients(model, [(x, y)], None, None)
    want = torch.autograd.grad(F.mse_loss(model(x)[:, 0], y), [model[2].weight])[0]
    assert torch.allclose(grads["2.weight"], want, atol=1e-6)
    squared = accumulate_gradients(model, [(x[:3], y[:3])], None, None, squared=True)
    per = [
        torch.autograd.grad(F.mse_loss(model(x[i : i + 1])[:, 0], y[i : i + 1]), [model[2].weight])[0] for i in range(3)
    ]
    assert torch.allclose(squared["2.weight"], sum(g**2 for g in per), atol=1e-6)
    # whole-number floats against three outputs stay class indices, for taylor too
    three = nn.Linear(5, 3)
    labels = torch.randint(0, 3, (30,))
    grads = accumulate_gradients(three, [(x, labels.float())], None, None)
    want = torch.autograd.grad(F.cross_entropy(three(x), labels), [three.weight])[0]
    assert torch.allclose(grads["weight"], want, atol=1e-6)


def test_a_data_file_keeps_whole_number_float_targets_for_a_regression_job(tmp_path):
    from cleanai_core.job.run import run_job
    from cleanai_plugins.io.datasets import class_labels, load_dataset

    assert class_labels(torch.tensor([1.0, 4.0, 2.0]), "t").dtype == torch.float32  # read where used
    assert class_labels(torch.tensor([1, 4, 2]), "t").dtype == torch.int64
    assert torch.equal(class_labels(torch.eye(3)[[2, 0]], "t"), torch.tensor([2, 0]))  # one-hot rows
    torch.manual_seed(10)
    x = torch.randn(64, 6)
    y = (x[:, 0] * 2 + 3).round()  # counts: whole numbers
    path = tmp_path / "reg.pt"
    torch.save(TensorDataset(x, y), path)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1)).eval()
    data = load_dataset(str(path), {})
    assert data.tensors[1].dtype == torch.float32
    cfg = {"model": "memory", "data": "memory", "ratio": 0.5, "out": str(tmp_path / "o"), "quiet": True}
    report = run_job(cfg, model=model, dataset=data)
    with torch.no_grad():
        errors = (model(x)[:, 0] - y) ** 2  # the report's held-out rows are some of these
    assert float(errors.min()) <= report["mse_before"] <= float(errors.max()) and report["accuracy_before"] is None
    assert report["mse_after"] > 0 and "regression's" in (tmp_path / "o" / "report.md").read_text()
