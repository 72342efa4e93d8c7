"""Recovery after pruning (issue 17): distillation fine-tuning, early stopping, modes,
causal-LM perplexity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from digits_setup import accuracy, splits, trained_cnn
from torch.utils.data import DataLoader, TensorDataset

from cleanai_core import StructuredPruner, recover
from cleanai_core.errors import UserError
from cleanai_core.recovery import distillation_loss, evaluate_held_out


def _pruned(model, target_flops: float = 0.25):
    cal = splits()[1]
    pruner = StructuredPruner(model, cal[0][:2], target_flops=target_flops, ignored_layers=[model.fc])
    pruner.collect_activations(DataLoader(TensorDataset(*cal), batch_size=64), progress=False)
    return pruner.prune()


@pytest.mark.slow  # trains the shared digits CNN first (~5 s)
def test_distillation_lifts_accuracy_of_a_4x_pruned_cnn_and_leaves_teacher_and_input_alone():
    torch.manual_seed(0)
    teacher = trained_cnn()
    pruned = _pruned(teacher)
    train_d, _, eval_d = splits()
    before, after_prune = accuracy(teacher, eval_d), accuracy(pruned, eval_d)
    assert after_prune < before - 0.2  # 4x fewer FLOPs without retraining loses a lot here
    teacher.train()  # the teacher's own mode must survive, and its BN statistics must not move
    t_state = copy.deepcopy(teacher.state_dict())
    p_state = copy.deepcopy(pruned.state_dict())
    recovered, result = recover(pruned, teacher, TensorDataset(*train_d), epochs=4, lr=3e-3, progress=False)
    assert recovered is not pruned
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in p_state.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_state.items())
    assert teacher.training and all(m.training for m in teacher.modules())
    assert not recovered.training  # the pruned model was in eval mode: restored
    final = accuracy(recovered, eval_d)
    assert final > after_prune + 0.25, (after_prune, final)
    assert result.metric == "accuracy" and result.higher_is_better
    assert result.epochs == len(result.history) == len(result.train_loss) <= 4
    assert result.best == max(result.history) > result.initial
    assert result.history[result.best_epoch - 1] == result.best
    assert result.train_samples == 900 and result.held_out_samples == 100
    assert result.seconds > 0


def test_early_stopping_stops_after_patience_epochs_and_returns_the_best_weights():
    teacher = trained_cnn()
    train_d = splits()[0]
    # the held-out part is already perfect and lr is tiny: no epoch can beat the start (train-mode
    # forwards still move BatchNorm statistics, which costs one held-out image here)
    student, result = recover(teacher, teacher, TensorDataset(*train_d), epochs=6, lr=1e-12, patience=2, progress=False)
    assert result.initial == 1.0
    assert result.stopped_early and result.epochs == 2 and len(result.history) == 2
    assert max(result.history) < 1.0 and result.best_epoch == 0 and result.best == 1.0
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())


def test_recover_without_teacher_is_plain_fine_tuning_and_held_out_data_can_be_given():
    teacher = trained_cnn()
    pruned = _pruned(teacher)
    train_d, cal_d, eval_d = splits()
    recovered, result = recover(
        pruned, None, TensorDataset(*train_d), val_data=TensorDataset(*cal_d), epochs=2, progress=False
    )
    assert result.held_out_samples == 300 and result.train_samples == 1000
    assert accuracy(recovered, eval_d) > accuracy(pruned, eval_d) + 0.1


def test_distillation_loss_is_t_squared_kl_plus_cross_entropy():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 7), torch.randn(5, 7), torch.randint(0, 7, (5,))
    T = 3.0
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    got = distillation_loss(s, t, y, temperature=T, kd_weight=0.7, ce_weight=0.3)
    assert torch.allclose(got, 0.7 * T * T * kl + 0.3 * F.cross_entropy(s, y), atol=1e-6)
    assert torch.allclose(distillation_loss(s, None, y), F.cross_entropy(s, y))


def _tiny_llama(seed: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _counting_sequences(n: int, length: int = 12) -> torch.Tensor:
    """Token t+1 = token t + 1 (mod 32): a language a tiny model learns in a few steps."""
    start = torch.randint(0, 32, (n, 1), generator=torch.Generator().manual_seed(1))
    return (start + torch.arange(length)) % 32


@pytest.mark.slow  # the first transformers import takes seconds
def test_causal_lm_loss_and_perplexity_match_hugging_face_shifted_labels():
    model = _tiny_llama(0)
    ids = _counting_sequences(4)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding is not a target
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    inputs = {"input_ids": ids, "attention_mask": mask}
    ours = distillation_loss(out.logits, None, labels, task="causal_lm", inputs=inputs)
    assert torch.allclose(ours, out.loss, atol=1e-5)
    batch = [{"input_ids": ids, "attention_mask": mask, "labels": labels}]
    metric, ppl = evaluate_held_out(model, batch, torch.device("cpu"), "causal_lm")
    assert metric == "perplexity" and ppl == pytest.approx(float(out.loss.exp()), rel=1e-5)


def test_recover_a_causal_lm_lowers_held_out_perplexity_by_distillation():
    teacher = _tiny_llama(0)
    ids = _counting_sequences(96)
    train_teacher = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    for _ in range(30):  # teach the teacher the counting language
        train_teacher.zero_grad()
        teacher(input_ids=ids, labels=ids).loss.backward()
        train_teacher.step()
    teacher.eval()
    student = _tiny_llama(1)  # an untrained student of the same shape
    data = [{"input_ids": ids[i : i + 8]} for i in range(0, 96, 8)]  # dict batches, labels = the ids
    recovered, result = recover(student, teacher, data[:10], val_data=data[10:], epochs=4, lr=1e-2, progress=False)
    assert result.task == "causal_lm" and result.metric == "perplexity" and not result.higher_is_better
    assert result.initial > 20  # about the vocabulary size before training
    assert result.best < result.initial / 4
    assert min(result.history) == result.best


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"epochs": 0}, "epochs=0"),
        ({"epochs": 1, "task": "vision"}, "task='vision'"),
        ({"epochs": 1, "lr": -1e-3}, "lr=-0.001 must be >= 0"),  # 0 is a legal control run
    ],
)
def test_bad_arguments_raise_user_errors(kwargs, words):
    model = trained_cnn()
    with pytest.raises(UserError, match=words):
        recover(model, model, TensorDataset(*splits()[0]), **kwargs)


@pytest.mark.slow  # imports BERT from transformers
def test_recover_a_hugging_face_sequence_classifier_from_dict_batches_with_labels():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 16, (320, 6), generator=torch.Generator().manual_seed(2))
    labels = (ids[:, 0] >= 8).long()  # the class is in the first token
    data = [{"input_ids": ids[i : i + 32], "labels": labels[i : i + 32]} for i in range(0, 320, 32)]
    recovered, result = recover(model, None, data[:8], val_data=data[8:], epochs=6, lr=1e-2, progress=False)
    assert result.task == "classification" and result.metric == "accuracy"
    assert result.initial < 0.7 < 0.9 < result.best


def test_a_dataloader_is_split_into_disjoint_train_and_held_out_parts_keeping_its_batch_size():
    from cleanai_core.recovery import split_train_data

    data = TensorDataset(torch.arange(200).float()[:, None], torch.arange(200) % 10)
    train, held, n_train, n_held = split_train_data(DataLoader(data, batch_size=50), None, 0.1, 64, seed=0)
    assert (n_train, n_held) == (180, 20) and train.batch_size == held.batch_size == 50
    seen_train = torch.cat([x[:, 0] for x, _ in train]).long().tolist()
    seen_held = torch.cat([x[:, 0] for x, _ in held]).long().tolist()
    assert len(set(seen_train)) == 180 and len(set(seen_held)) == 20
    assert not set(seen_train) & set(seen_held)
    with pytest.raises(UserError, match="val_fraction"):
        split_train_data(data, None, 1.0, 64, seed=0)
