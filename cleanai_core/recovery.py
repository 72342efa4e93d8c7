"""Recovery after pruning: distillation fine-tuning of the pruned model from the original.

Glossary:

- *student*: the pruned model being trained (a copy unless ``inplace=True``).
- *teacher*: the original model. It runs in eval mode under ``no_grad``; its weights,
  flags and modes are never changed (a copy is moved when it sits on another device).
- *held-out part*: a share of the training data (or ``val_data``) that decides early
  stopping and the best epoch. It is never the split that measures a report's accuracy:
  the caller passes training data separately.
- *better epoch*: a better held-out metric, or the same metric and a lower held-out loss
  (the training loss, teacher included, measured on the held-out part). Accuracy on a
  small held-out part saturates (often at 100% on data the teacher was trained on); with
  ties counted as no progress, every benchmark run stopped after 5-8 of 10 epochs, its
  cosine schedule cut off at 30-65% of the peak learning rate.
- *task*: ``"classification"`` (logits ``(N, C)``; one logit ``(N, 1)`` is a binary
  classifier, read as the two classes' logits ``(0, z)``, so its softmax is the sigmoid),
  ``"causal_lm"`` (logits ``(N, T, V)``: token-level KL, next-token cross-entropy on
  shifted labels, perplexity) or ``"token"`` (logits ``(N, T, C)`` scored at their own
  positions: a token classifier's tags, a masked LM's masked tokens, an encoder-decoder
  whose decoder already reads its targets shifted; KL over the real positions,
  cross-entropy where the labels are not -100, the perplexity of those). Labels of
  ``-100`` (PyTorch's and Hugging Face's ``ignore_index``: padding, sub-word pieces) count
  in no loss and no accuracy, in every task. ``"regression"`` (outputs ``(N, K)`` or
  ``(N,)`` against floating labels of that shape, not class indices): the squared error to
  the labels and to the teacher's outputs (no softmax), the held-out mean squared error.
  ``"ctc"`` (a speech recogniser's frames ``(N, T, V)`` against transcripts ``(N, L)``,
  ``L`` at most ``T``: ``...ForCTC``): KL over every frame, the CTC loss to the
  transcripts (blank ``pad_token_id``), the held-out token error rate of greedy decoding.
  Before session 21 its transcripts were read as per-frame tags, and recovery failed with
  an ``IndexError`` on the first held-out batch.

The loss is ``kd_weight * T^2 * KL(teacher_T || student_T) + ce_weight * CE(labels)``;
the cross-entropy term is used only when the batch has labels (a causal LM's labels are
its own input ids, shifted).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from cleanai_core.calibration import move_to, split_batch
from cleanai_core.errors import UserError, model_fault
from cleanai_core.metrics import call_model, ctc_errors, eval_mode, perplexity
from cleanai_core.model_state import (
    copy_model,
    drop_user_hooks,
    set_mode,
    state_copy,
    state_with_versions,
    user_hooks,
    warn_user_hooks,
)
from cleanai_core.options import check_callables, check_modules, check_not_meta, check_switches, plain_number
from cleanai_core.runtime import (
    checked_device,
    class_logits,
    find_logits,
    label_indices,
    not_class_labels,
    private_rng,
    reads_as_regression,
    regression_targets,
    unused_key_hint,
)

__all__ = [
    "RecoveryResult",
    "distillation_loss",
    "evaluate_held_out",
    "held_out_metric_and_loss",
    "logits_of",
    "recover",
    "split_train_data",
]

TASKS = ("auto", "classification", "causal_lm", "token", "regression", "ctc")

#: held-out metrics where lower is better
LOWER_IS_BETTER = ("perplexity", "mse", "teacher_mse", "error_rate")

#: the label that counts in no loss and no accuracy (``F.cross_entropy``'s default ``ignore_index``)
IGNORE_INDEX = -100


@attrs.frozen
class RecoveryResult:
    """What :func:`recover` did. ``history[k]`` is the held-out metric after epoch
    ``k + 1``; ``initial`` is the pruned model's, before training. ``best_epoch`` 0 means
    no epoch beat the pruned model, which is then returned unchanged."""

    metric: (
        str  # "accuracy", "perplexity", "teacher_agreement", "mse" or "teacher_mse" (regression), "error_rate" (ctc)
    )
    higher_is_better: bool
    initial: float
    history: tuple[float, ...]
    train_loss: tuple[float, ...]
    best_epoch: int
    best: float
    epochs: int
    stopped_early: bool
    seconds: float
    task: str
    train_samples: int  # len() of the training part: samples of a data set, batches of a list of batches
    held_out_samples: int
    initial_loss: float = math.nan  # the held-out loss (the training loss on the held-out part) before training
    held_out_loss: tuple[float, ...] = ()  # ... after each epoch: breaks ties of the metric
    diverged: bool = False  # stopped at a NaN / inf training loss (the best epoch's weights are returned)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self, value_serializer=lambda _i, _a, v: list(v) if isinstance(v, tuple) else v)


# -- model outputs ---------------------------------------------------------------------------


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output (:func:`cleanai_core.runtime.find_logits`), or a
    :class:`UserError` saying what to give."""
    logits = find_logits(out)
    if isinstance(logits, torch.Tensor):
        return logits
    raise UserError(
        f"cannot find logits in the model's output ({type(out).__name__}); return a tensor, an object with "
        "`.logits`, or pass forward_fn= that returns the logits"
    )


def _lm_targets(inputs: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets and their mask ``(N, T-1)`` for a causal LM: the labels if the
    batch has them (``-100`` ignored), else the input ids; padding masked out."""
    ids = target if isinstance(target, torch.Tensor) else None
    if ids is None:
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise UserError("a causal LM needs integer input_ids (N, T) in its batches to measure next-token loss")
    mask = ids != -100
    if isinstance(inputs, dict) and isinstance(inputs.get("attention_mask"), torch.Tensor):
        mask = mask & inputs["attention_mask"].bool()
    return ids[:, 1:], mask[:, 1:]


def _token_targets(logits: torch.Tensor, inputs: Any, target: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-position labels (``None`` without any) and the positions the KL reads ``(N, T)``
    for the ``"token"`` task: the batch's ``attention_mask`` where it covers the logits'
    positions (an encoder-decoder's covers its encoder; then ``decoder_attention_mask`` or
    every position)."""
    positions = tuple(logits.shape[:2])
    mask = torch.ones(positions, dtype=torch.bool, device=logits.device)
    for key in ("attention_mask", "decoder_attention_mask"):
        m = inputs.get(key) if isinstance(inputs, dict) else None
        if isinstance(m, torch.Tensor) and tuple(m.shape) == positions:
            mask = m.bool().to(logits.device)
            break
    if not isinstance(target, torch.Tensor):
        return None, mask
    if tuple(target.shape) != positions or target.is_floating_point():
        raise UserError(
            f"task='token' needs integer labels (N, T) = {positions}, one per position of the logits "
            f"{tuple(logits.shape)} (-100 where none), got {target.dtype} {tuple(target.shape)}"
        )
    return target.long().to(logits.device), mask


def _task_of(logits: torch.Tensor, task: str, model: nn.Module | None = None, target: Any = None) -> str:
    """``task``, or from the logits' shape where it is ``"auto"``: ``(N, C)`` classification;
    ``(N, T, C)`` a causal LM, unless the model's Hugging Face config says its outputs are
    ``num_labels`` tags and not the vocabulary, or the model predicts each position's own
    token (:func:`_predicts_own_positions`): then ``"token"`` (a tagger trained as a
    causal LM learned each position's tag from the next one's)."""
    if task != "auto":
        return task
    config = getattr(model, "config", None)
    if type(model).__name__.endswith("ForCTC") and logits.dim() == 3:
        return "ctc"
    if getattr(config, "problem_type", None) == "regression" or reads_as_regression(logits, target):
        return "regression"
    if logits.dim() == 2:
        return "classification"
    if logits.dim() == 3:
        vocab, labels = getattr(config, "vocab_size", None), getattr(config, "num_labels", None)
        tagger = type(model).__name__.endswith("ForTokenClassification")
        if tagger or (logits.shape[-1] == labels and logits.shape[-1] != vocab) or _predicts_own_positions(model):
            return "token"
        return "causal_lm"
    raise UserError(f"logits of shape {tuple(logits.shape)}: give task='classification', 'causal_lm' or 'token'")


def _predicts_own_positions(model: nn.Module | None) -> bool:
    """A Hugging Face model whose ``(N, T, V)`` logits score each position's own label, not
    the next token: an encoder-decoder (its decoder inputs are the labels shifted right
    already), a model that cannot generate (a masked LM: BERT, RoBERTa, ModernBERT) or an LM
    head whose config has no causal mask (``causal=False``: XLM, Flaubert). ``recover()``
    with ``task="auto"`` trained them as causal LMs, each position on the next one's
    label (only the command line named their task)."""
    config, generates = getattr(model, "config", None), getattr(model, "can_generate", None)
    if config is None or not callable(generates):
        return False
    return bool(getattr(config, "is_encoder_decoder", False) or getattr(config, "causal", None) is False
                or not generates())  # fmt: skip


# -- loss ----------------------------------------------------------------------------------------


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    target: Any = None,
    *,
    task: str = "classification",
    inputs: Any = None,
    temperature: float = 2.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    blank: int = 0,
) -> torch.Tensor:
    """``kd_weight * T^2 * KL(teacher_T || student_T) + ce_weight * CE``, averaged over
    samples (classification) or over valid tokens (causal LM, logits shifted by one).
    ``teacher_logits=None`` or ``kd_weight=0`` drops the KL term; no labels drops CE.
    ``task="ctc"``: CE is the CTC loss to the transcripts, ``blank`` its blank token."""
    s = student_logits.float()
    if task == "ctc":
        return _ctc_loss(s, teacher_logits, target, temperature, kd_weight, ce_weight, blank)
    if task == "regression":  # squared errors: to the labels, and to the teacher's outputs
        y = regression_targets(s, target)
        loss = s.new_zeros(())
        if teacher_logits is not None and kd_weight:
            loss = loss + kd_weight * F.mse_loss(s, teacher_logits.float().reshape(s.shape))
        if y is not None and ce_weight:
            loss = loss + ce_weight * F.mse_loss(s, y)
        return loss
    if task == "token":
        labels, mask = _token_targets(s, inputs, target)
        keep = mask.reshape(-1)
        if labels is not None:  # the labelled positions count for the cross-entropy even where KL skips them
            keep = keep | (labels.reshape(-1) != -100)
        s = s.reshape(-1, s.shape[-1])[keep]
        t = teacher_logits.float().reshape(-1, s.shape[-1])[keep] if teacher_logits is not None else None
        labels = labels.reshape(-1)[keep] if labels is not None else None
        if labels is not None and not bool((labels != -100).any()):  # a batch without labelled positions: KL only
            labels = None
    elif task == "causal_lm":
        tgt, mask = _lm_targets(inputs, target)
        s = s[:, :-1]
        keep = mask.reshape(-1)
        s = s.reshape(-1, s.shape[-1])[keep]
        t = teacher_logits.float()[:, :-1].reshape(-1, s.shape[-1])[keep] if teacher_logits is not None else None
        labels = tgt.reshape(-1)[keep]
    else:
        s = class_logits(s)
        t = class_logits(teacher_logits.float()) if teacher_logits is not None else None
        labels = class_targets(target)
    _check_logits(s, t, labels if ce_weight else None, binary=task != "causal_lm" and student_logits.shape[-1] == 1)
    loss = s.new_zeros(())
    if t is not None and kd_weight:
        # above T = 100 float32 log-softmaxes of logits / T cancel: at T = 1e4 the loss was 2% off, at 1e6 negative
        ks, kt = (s.double(), t.double()) if temperature > 100 else (s, t)
        per = F.kl_div(
            F.log_softmax(ks / temperature, -1), F.log_softmax(kt / temperature, -1), log_target=True, reduction="none"
        )
        loss = loss + (kd_weight * temperature**2 * per.sum(-1).mean()).to(s.dtype)
    if labels is not None and ce_weight and bool((labels != IGNORE_INDEX).any()):  # all ignored: the mean was NaN
        loss = loss + ce_weight * F.cross_entropy(s, labels.to(s.device).long())  # int32 / bool labels raised
    return loss


def _ctc_loss(
    s: torch.Tensor, teacher: torch.Tensor | None, target: Any, temperature: float, kd: float, ce: float, blank: int
) -> torch.Tensor:
    """A speech recogniser's loss: KL to the teacher over every frame, and the CTC loss of
    the transcripts (``-100`` padding left out; every frame counts as input)."""
    loss = s.new_zeros(())
    if teacher is not None and kd:
        t = teacher.float().reshape(s.shape)
        per = F.kl_div(
            F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True, reduction="none"
        )
        loss = loss + kd * temperature**2 * per.sum(-1).mean()
    if isinstance(target, torch.Tensor) and ce and target.dim() == 2 and not target.is_floating_point():
        keep = target != IGNORE_INDEX
        lengths = keep.sum(1)
        if lengths.numel() and int(lengths.max()) > s.shape[1]:
            raise UserError(
                f"transcripts of up to {int(lengths.max())} tokens for {s.shape[1]} frames: a CTC model emits at most "
                "one token per frame; give longer audio or shorter labels"
            )
        log_probs = F.log_softmax(s, -1).transpose(0, 1)  # (T, N, V)
        frames = torch.full((s.shape[0],), s.shape[1], dtype=torch.long)
        loss = loss + ce * F.ctc_loss(
            log_probs, target[keep].long(), frames, lengths.cpu(), blank=blank, zero_infinity=True
        )
    return loss


def class_targets(target: Any) -> torch.Tensor | None:
    """The class labels of a batch's target for cross-entropy and accuracy: integer targets as
    they are (also per position), floating ones as class indices where they are whole numbers
    or one-hot rows (:func:`~cleanai_core.runtime.label_indices`). Other floating targets (soft
    or fractional) get a ``RuntimeWarning`` and are not used: whole-number float labels were
    dropped without a word, and recovery trained on the teacher alone."""
    if not isinstance(target, torch.Tensor):
        return None
    if not target.is_floating_point():
        return target[:, 0] if target.dim() == 2 and target.shape[1] == 1 else target  # a column of indices
    labels = label_indices(target) if target.dim() >= 1 else None
    if labels is None:
        warnings.warn(
            f"recover: {not_class_labels(target)}; they are not used: the loss is the teacher's (KL) alone and the "
            "held-out metric the agreement with the teacher",
            RuntimeWarning,
            stacklevel=2,
        )
    return labels


def _check_logits(s: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor | None, binary: bool = False) -> None:
    """A :class:`UserError` for a teacher whose outputs differ from the student's, or class
    labels outside the student's classes (were a bare ``RuntimeError`` / ``IndexError``).
    ``binary``: ``s`` is a one-logit model's two classes (:func:`_class_logits`)."""
    if t is not None and t.shape != s.shape:
        raise UserError(
            f"the teacher's outputs have shape {tuple(t.shape)} but the pruned model's {tuple(s.shape)}; give the "
            "original model the pruned one was made from as teacher (same classes), or teacher=None"
        )
    if labels is not None and s.dim() == 2 and tuple(labels.shape) != (s.shape[0],):
        # a question-answering head's (start, end) pairs against its start logits: a bare RuntimeError before
        raise UserError(
            f"recovery trains on one class index per row of the outputs {tuple(s.shape)}, but the labels have shape "
            f"{tuple(labels.shape)}; give such labels, or leave them out (the teacher alone then guides recovery)"
        )
    labels = labels[labels != IGNORE_INDEX] if labels is not None else None  # ignored positions, in any task
    if labels is not None and labels.numel() and s.dim() >= 1:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= s.shape[-1]:
            has = (
                "1 output (a binary classifier: labels 0 and 1)" if binary else
                f"{s.shape[-1]} outputs"
            )  # fmt: skip
            raise UserError(
                f"labels go from {low} to {high} but the model has {has}; give class indices 0..{s.shape[-1] - 1} "
                f"matching the model's classes ({IGNORE_INDEX} for a label to ignore)"
            )


def _forward(model: nn.Module, inputs: Any, forward_fn: Callable | None, what: str) -> Any:
    """``model`` on a batch (cast for it); an error from the model names the batch's shapes."""
    try:
        return logits_of(call_model(model, _cast_for(model, inputs), forward_fn))
    except Exception as exc:
        if not model_fault(exc):
            raise
        shapes = [tuple(t.shape) for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
        raise UserError(
            f"the {what} failed on a batch (input shape(s) {shapes}): {type(exc).__name__}: {str(exc)[:200]}. "
            "Give training and held-out batches shaped like the model's inputs, all of one shape."
            + unused_key_hint(exc, inputs)
        ) from None


# -- data ------------------------------------------------------------------------------------------


def split_train_data(
    train_data: Any, val_data: Any, val_fraction: float, batch_size: int, seed: int
) -> tuple[DataLoader | Any, DataLoader | Any, int, int]:
    """``(train loader, held-out loader, train samples, held-out samples)``. A data set
    or a DataLoader over a map-style data set is split (seeded) when no ``val_data`` is
    given; a DataLoader keeps its batch size and collate function."""
    from cleanai_core.collect import refuse_mapping

    refuse_mapping(train_data, "train_data")
    refuse_mapping(val_data, "val_data")
    if val_data is not None:
        return _loader(train_data, batch_size, True, seed), _loader(val_data, batch_size, False, seed, "val_data"), \
            _size(train_data), _size(val_data)  # fmt: skip
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1 (the held-out share of train_data)")
    dataset = train_data.dataset if isinstance(train_data, DataLoader) else train_data
    # a DataLoader's list holds samples (``DataLoader(rows, batch_size=8)``, rows of tokenized text: it was
    # refused as "a DataLoader: it must be a data set or a DataLoader over one"); a bare list holds batches
    over_list = isinstance(train_data, DataLoader) and isinstance(dataset, (list, tuple)) and train_data.batch_size
    if not (_map_style(dataset) or over_list):
        raise UserError(  # a list, a tensor or an (x, y) tuple was refused without saying what it was
            f"train_data is a {type(train_data).__name__}: it must be a data set or a DataLoader over one (with "
            "len()), so that a held-out part can be split from it (tensors: TensorDataset(x, y)); or pass val_data= "
            "(never the split that measures your accuracy)"
        )
    n = len(dataset)
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise UserError(f"train_data has {n} sample(s): too few to hold out {val_fraction:.0%} for early stopping")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    train, held = Subset(dataset, perm[n_val:]), Subset(dataset, perm[:n_val])
    bs = train_data.batch_size if isinstance(train_data, DataLoader) and train_data.batch_size else batch_size
    collate = train_data.collate_fn if isinstance(train_data, DataLoader) else None
    gen = torch.Generator().manual_seed(seed)
    drop = _drop_last(len(train), bs, isinstance(train_data, DataLoader) and bool(train_data.drop_last))
    return (
        DataLoader(train, batch_size=bs, shuffle=True, generator=gen, collate_fn=collate, drop_last=drop),
        DataLoader(held, batch_size=bs, shuffle=False, collate_fn=collate),
        len(train),
        len(held),
    )


def _drop_last(n: int, batch_size: int, asked: bool) -> bool:
    """Whether the training loader over ``n`` samples drops its last, partial batch: where
    the user's DataLoader did (it was rebuilt without), or where that batch would hold a
    single sample (more than one batch): a model with ``BatchNorm1d`` (or any norm over the
    batch) failed on it in train mode ("Expected more than 1 value per channel when
    training"), one run in ``batch_size`` (70 samples, 7 held out, batches of 31). The
    loader shuffles every epoch, so each epoch leaves out another sample."""
    return asked or (batch_size > 1 and n > batch_size and n % batch_size == 1)


def _map_style(data: Any) -> bool:
    """Whether ``data`` is a map-style data set of samples: a torch ``Dataset`` with a
    length, or another object indexed by sample with a length (a Hugging Face
    ``datasets.Dataset``, which is no torch ``Dataset``: it was refused). Lists and tuples
    are lists of batches; tensors, dicts and loaders are not data sets."""
    if isinstance(data, Dataset):
        return hasattr(data, "__len__")
    if isinstance(data, (list, tuple, dict, str, bytes, torch.Tensor, DataLoader)):
        return False
    return hasattr(data, "__len__") and hasattr(data, "__getitem__") and not hasattr(data, "__next__")


def _loader(data: Any, batch_size: int, shuffle: bool, seed: int, what: str = "train_data") -> Any:
    if isinstance(data, IterableDataset):  # yields samples, like a map-style data set: batched here
        return DataLoader(data, batch_size=batch_size)
    if _map_style(data):
        gen = torch.Generator().manual_seed(seed)
        drop = shuffle and _drop_last(len(data), batch_size, False)  # training batches only
        return DataLoader(
            data, batch_size=batch_size, shuffle=shuffle, generator=gen if shuffle else None, drop_last=drop
        )
    try:
        one_shot = iter(data) is data
    except TypeError:
        raise UserError(f"{what} is a {type(data).__name__}, which cannot be iterated; give a data set, a DataLoader "
                        "or a list of batches") from None  # fmt: skip
    if one_shot:  # a generator: empty from its second pass on (it raised TypeError on len())
        raise UserError(
            f"{what} is a one-shot iterator ({type(data).__name__}): it is read once per epoch and would be empty "
            "after the first; give a list of batches, a data set or a DataLoader"
        )
    return data


def _steps_per_epoch(loader: Any) -> tuple[int, int | None]:
    """Batches in one pass over ``loader``: ``len()``, else counted by one pass (a
    DataLoader over an IterableDataset has no length; the cosine schedule needs it); with
    the samples that pass saw (``None`` when it was not made)."""
    samples = None
    try:
        n = len(loader)
    except TypeError:
        n = samples = 0
        for batch in loader:
            n += 1
            inputs = split_batch(batch)[0]
            first = next((t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)), None)
            samples += int(first.shape[0]) if first is not None and first.dim() else 1
    if n == 0:
        raise UserError("the training part of train_data is empty: give at least one batch to train on")
    return n, samples


def _size(data: Any) -> int:
    data = data.dataset if isinstance(data, DataLoader) else data
    try:
        return len(data)
    except TypeError:
        return 0


# -- evaluation --------------------------------------------------------------------------------------


def _check_held_out_finite(held_loader: Any, model: nn.Module) -> None:
    """A :class:`UserError` naming the held-out batch whose inputs hold NaN or inf. Its loss
    was NaN from the start, which no epoch's could beat (a tie of the metric goes to the lower
    loss): the run trained, then returned the pruned model unchanged without a word (the
    command line checks only ``--train-data``'s first sample)."""
    for i, batch in enumerate(held_loader):
        leaves, _ = tree_flatten(split_batch(batch, model)[0])
        if any(isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
               for t in leaves):  # fmt: skip
            raise UserError(
                f"the held-out data (val_data, or the share of train_data held out for early stopping) holds NaN or "
                f"inf values in its batch {i}, so its loss is NaN and no epoch can be chosen by it (the pruned model "
                "would come back unchanged); clean the data and run again"
            )


def evaluate_held_out(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    task: str,
    teacher: nn.Module | None = None,
    forward_fn: Callable | None = None,
) -> tuple[str, float]:
    """``(metric name, value)`` of ``model`` on ``loader`` in eval mode (modes restored):
    top-1 accuracy where labels exist, perplexity for a causal LM, else top-1 agreement
    with ``teacher``."""
    metric, value, _ = held_out_metric_and_loss(model, loader, device, task, teacher, forward_fn)
    return metric, value


def held_out_metric_and_loss(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    task: str,
    teacher: nn.Module | None = None,
    forward_fn: Callable | None = None,
    loss_options: dict[str, float] | None = None,
) -> tuple[str, float, float]:
    """:func:`evaluate_held_out`'s ``(metric, value)`` and the batch-averaged
    :func:`distillation_loss` on ``loader`` with ``loss_options`` (``temperature``,
    ``kd_weight``, ``ce_weight``; the KL term only with a ``teacher``)."""
    hits = total = 0
    nll = tokens = 0.0
    loss_sum, batches = 0.0, 0
    metric = None
    opts = {"temperature": 2.0, "kd_weight": 1.0, "ce_weight": 1.0, **(loss_options or {})}
    with eval_mode(model), torch.no_grad(), eval_mode(teacher) if teacher is not None else contextlib.nullcontext():
        for batch in loader:
            inputs, target = split_batch(batch, model)
            inputs, target = move_to(inputs, device), move_to(target, device)
            logits = _forward(model, inputs, forward_fn, "pruned model").float()
            t_logits = None
            if teacher is not None:
                t_logits = _forward(teacher, inputs, forward_fn, "teacher")
            loss_sum += float(distillation_loss(logits, t_logits, target, task=task, inputs=inputs, **opts))
            batches += 1
            if task == "causal_lm":
                tgt, mask = _lm_targets(inputs, target)
                ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tgt.clamp(min=0), reduction="none")
                nll += float((ce * mask).sum())
                tokens += float(mask.sum())
                metric = "perplexity"
                continue
            if task == "regression":
                y = regression_targets(logits, target)
                if y is None and t_logits is None:
                    raise UserError(
                        "the held-out data has no regression targets and there is no teacher to compare with"
                    )
                ref, metric = (y, "mse") if y is not None else (t_logits.float().reshape(logits.shape), "teacher_mse")
                nll += float(((logits - ref) ** 2).sum())
                tokens += float(ref.numel())
                continue
            if task == "ctc" and isinstance(target, torch.Tensor) and target.dim() == 2:
                wrong, n = ctc_errors(logits, target, opts.get("blank", 0))
                nll, tokens, metric = nll + wrong, tokens + n, "error_rate"
                continue
            if task == "token" and target is not None:  # at their own positions, -100 left out
                labels, _ = _token_targets(logits, inputs, target)
                picked = labels != -100
                nll += float(F.cross_entropy(logits[picked], labels[picked], reduction="sum"))
                tokens += float(picked.sum())
                metric = "perplexity"
                continue
            labels = class_targets(target)
            predicted = class_logits(logits).argmax(-1)
            if labels is not None and labels.shape == predicted.shape:
                ref, metric = labels.to(device), "accuracy"
            elif t_logits is not None:
                ref, metric = class_logits(t_logits).argmax(-1), "teacher_agreement"
            else:
                raise UserError("the held-out data has no labels and there is no teacher to compare with")
            counted = ref != IGNORE_INDEX
            hits += int(((predicted == ref) & counted).sum())
            total += int(counted.sum())
    if metric is None:
        raise UserError("the held-out data is empty; give more training data or a larger val_fraction")
    loss = loss_sum / batches
    if metric == "perplexity":
        return metric, perplexity(nll, tokens), loss
    if metric in ("mse", "teacher_mse", "error_rate"):
        return metric, nll / max(tokens, 1.0), loss
    return metric, hits / max(total, 1), loss


# -- training ---------------------------------------------------------------------------------------------


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _cast_for(model: nn.Module, inputs: Any) -> Any:
    """``inputs`` with every floating tensor in ``model``'s floating dtype (a float64 or
    bfloat16 model fed float32 data raised a dtype mismatch); integer ids untouched."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None:
        return inputs
    return tree_map(lambda t: t.to(p.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, inputs)


def _check_number(name: str, value: Any, *, positive: bool = False, at_most: float | None = None) -> None:
    """A :class:`UserError` unless ``value`` is a finite number ``>= 0`` (``> 0`` with
    ``positive``; ``<= at_most`` when given): ``temperature=inf`` or ``kd_weight=nan``
    made every loss NaN, a negative ``ce_weight`` trained towards wrong answers."""
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name}={value!r} must be a finite number {bound}")
    if (value <= 0 if positive else value < 0) or (at_most is not None and value > at_most):
        raise UserError(f"{name}={value!r} must be {bound}" + (f" and <= {at_most}" if at_most is not None else ""))


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _amp_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _private_rng(fn: Callable) -> Callable:
    """Run ``fn`` on a fork of the global RNG (CPU and the training CUDA device): its
    ``seed`` makes shuffling and dropout reproducible without resetting the caller's
    random state (``torch.manual_seed(seed)`` on the global generator did, so a user's
    own random draws after ``recover()`` repeated from ``seed``)."""

    @functools.wraps(fn)
    def wrapper(pruned: Any, *args: Any, **kwargs: Any) -> Any:
        dev = kwargs.get("device")
        try:
            dev = checked_device(dev, "device=") if dev is not None else (
                _device_of(pruned) if isinstance(pruned, nn.Module) else torch.device("cpu")
            )  # fmt: skip
        except UserError:  # not a device here: ``fn`` says so
            dev = torch.device("cpu")
        with private_rng(dev):
            return fn(pruned, *args, **kwargs)

    return wrapper


def _is_frozen_norm(module: nn.Module, was_training: bool, root_was_training: bool) -> bool:
    """A norm with running statistics that the user froze: its parameters all have
    ``requires_grad=False``, or it was in eval mode inside a model in train mode."""
    if not isinstance(getattr(module, "running_mean", None), torch.Tensor):
        return False
    own = list(module.parameters(recurse=False))
    return (root_was_training and not was_training) or (bool(own) and not any(p.requires_grad for p in own))


def _train_modes(model: nn.Module) -> list[nn.Module]:
    """The modules that train in train mode. A model handed over in train mode keeps
    every module's own mode (the user set them: frozen BatchNorm, disabled dropout); a
    model in eval mode (as pruning returns it) trains whole, except norms whose
    parameters are all frozen, whose running statistics must stay as they are."""
    root = model.training
    if root:
        return [m for m in model.modules() if m.training]
    return [m for m in model.modules() if not _is_frozen_norm(m, m.training, root)]


def _teacher_apart(pruned: nn.Module, teacher: nn.Module, inplace: Any) -> nn.Module:
    """``teacher``, warned about where it is the student itself or shares its parameters:
    the usual cause is a model pruned in place (``inplace=True``) passed as both, so the
    distillation pulls towards the pruned model's own outputs, not the original's. That is
    a legal control run, so it is not refused; with ``inplace=True`` the student trains in
    place, so the teacher becomes a copy of what was given (it changed with the student,
    against "never modified", and its targets followed every step)."""
    own = {id(p) for p in pruned.parameters()}
    if teacher is not pruned and not any(id(p) in own for p in teacher.parameters()):
        return teacher
    which = "is the pruned model itself" if teacher is pruned else "shares parameters with the pruned model"
    warnings.warn(
        f"recover(): the teacher {which}, so the distillation pulls the student towards the pruned model's own "
        "outputs, not the original's (a model pruned with inplace=True is the original object). Pass the "
        "unpruned model as teacher (prune a copy: StructuredPruner(..., inplace=False), the default), or "
        "teacher=None for plain fine-tuning; as a control run this is what you asked for.",
        RuntimeWarning,
        stacklevel=6,  # the caller of recover(): past it and its three wrappers
    )
    return copy_model(teacher) if inplace is True else teacher


@_private_rng
@torch.inference_mode(False)  # called under no_grad or inference_mode, it trained nothing ("no labels")
@torch.enable_grad()
def recover(
    pruned: nn.Module,
    teacher: nn.Module | None,
    train_data: Any,
    *,
    epochs: int,
    val_data: Any = None,
    val_fraction: float = 0.1,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_fraction: float = 0.05,
    temperature: float = 2.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    patience: int | None = 3,
    max_grad_norm: float | None = None,
    device: str | torch.device | None = None,
    amp: bool = True,
    task: str = "auto",
    forward_fn: Callable | None = None,
    inplace: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, RecoveryResult]:
    """Fine-tune ``pruned`` on ``train_data``, distilling from ``teacher`` (the original).

    Example::

        pruned = StructuredPruner(model, x, target_flops=0.25).prune()  # after collect_activations
        recovered, result = recover(pruned, model, train_set, epochs=10)
        print(result.initial, "->", result.best, "at epoch", result.best_epoch)

    Floating inputs are cast to each model's dtype (a float64 or bfloat16 student, a
    float32 teacher); training runs with gradients on also when called under
    ``torch.no_grad()`` or ``torch.inference_mode()``.

    :param pruned: the student; copied unless ``inplace=True`` (the copy carries none of your
        forward or backward hooks, as ``prune()``'s: a warning names them). Its modes are restored.
        In train mode it keeps every module's own mode (BatchNorm you put in eval mode
        stays frozen); in eval mode (as pruning returns it) it trains whole, except norms
        whose parameters all have ``requires_grad=False``: their running statistics stay.
        The global RNG is not touched: ``seed`` drives a fork of it.
    :param teacher: the original model; never modified. ``None``: plain fine-tuning. The
        pruned model itself (or one sharing its parameters: a model pruned in place) is a
        ``RuntimeWarning``, as it is usually a mistake; it distils towards the pruned
        model's outputs as given (with ``inplace=True``, a copy taken before training).
    :param train_data: a data set or DataLoader of ``(x, y)``, ``x`` or dict batches.
        Never pass the split that measures your reported accuracy.
    :param val_data: held-out data for early stopping; default: ``val_fraction`` of
        ``train_data`` (seeded split, disjoint from the samples trained on).
    :param epochs: at most this many passes over the training part.
    :param lr, weight_decay, warmup_fraction: AdamW, linear warm-up over that share of
        the steps, then cosine decay to zero. ``lr=0`` is a legal control run (as for
        PyTorch's optimizers and schedulers): no weight moves, while BatchNorm running
        statistics still adapt to the pruned model in train mode.
    :param temperature, kd_weight, ce_weight: the loss (see the module docstring).
    :param patience: stop after this many epochs (>= 1) without a better epoch (see the
        glossary: the metric, ties broken by the held-out loss; ``None``: never). The
        best epoch's weights are returned. A NaN or inf training loss stops at once
        (a ``RuntimeWarning``; no step is taken on it), also with ``patience=None``.
    :param batch_size: for a data set (map-style or iterable); a DataLoader keeps its own.
        A last training batch of one sample is left out (a different one each epoch), as is
        a DataLoader's partial one where it drops it (``drop_last``).
        Data without ``len()`` (a DataLoader over an IterableDataset) is counted by one
        pass for the schedule; a one-shot iterator is refused (it would be empty from the
        second epoch on).
    :param device: default: where ``pruned`` is. On CUDA, ``amp`` runs the forward passes
        under ``torch.autocast`` (bfloat16 where supported, else float16 with a scaler).
    :param task: ``"auto"`` (from the logits' shape and the model's Hugging Face config:
        ``(N, T, V)`` is a causal LM, ``(N, T, num_labels)`` a tagger's ``"token"``),
        ``"classification"``, ``"causal_lm"``, ``"token"`` (labels at their own positions:
        token classifiers, masked LMs, encoder-decoders), ``"regression"`` (found by
        ``"auto"`` from fractional labels shaped like the outputs, or a config's
        ``problem_type``; see the module doc).
    :param forward_fn: ``forward_fn(model, inputs)`` when the model is not called as
        ``model(x)`` / ``model(**x)``.
    :returns: the recovered model and a :class:`RecoveryResult`.
    """
    epochs, batch_size, patience, seed, val_fraction, lr, weight_decay, warmup_fraction = map(
        plain_number, (epochs, batch_size, patience, seed, val_fraction, lr, weight_decay, warmup_fraction)
    )
    temperature, kd_weight, ce_weight, max_grad_norm = map(
        plain_number, (temperature, kd_weight, ce_weight, max_grad_norm)
    )
    if not isinstance(pruned, nn.Module):
        raise UserError(f"pruned must be a torch.nn.Module, got {type(pruned).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise UserError(f"teacher must be a torch.nn.Module or None, got {type(teacher).__name__}")
    # a scripted model raised "ValueError: can't optimize a non-leaf Tensor", a lazy one "Attempted to use an
    # uninitialized parameter"; a torch.nn.utils.prune mask trains (weight_orig, the mask kept)
    check_modules(pruned, masks=False, name="pruned model")
    check_not_meta(pruned, "pruned model", "pruned")
    if teacher is not None:
        check_modules(teacher, masks=False, name="teacher")
        check_not_meta(teacher, "teacher")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"epochs={epochs!r} must be a positive integer")
    if task not in TASKS:
        raise UserError(f"task={task!r}: choose one of {', '.join(TASKS)}")
    check_switches(inplace=inplace, amp=amp, progress=progress)  # inplace="no" trained the user's model in place
    _check_number("lr", lr)  # 0: a control run; weights stay, train-mode BatchNorm statistics still adapt
    _check_number("temperature", temperature, positive=True)
    _check_number("weight_decay", weight_decay)
    _check_number("kd_weight", kd_weight)
    _check_number("ce_weight", ce_weight)
    if not kd_weight and not ce_weight:
        raise UserError("kd_weight and ce_weight are both 0: the loss would be zero and nothing would train")
    _check_number("warmup_fraction", warmup_fraction, at_most=1.0)
    if max_grad_norm is not None:
        _check_number("max_grad_norm", max_grad_norm, positive=True)
    for name, value, low in (("batch_size", batch_size, 1), ("patience", patience, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            tail = " or None" if name == "patience" else ""
            raise UserError(f"{name}={value!r} must be an integer >= {low}{tail}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise UserError(f"val_fraction={val_fraction!r} must be a number between 0 and 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        # 2**70 raised "ValueError: Overflow when unpacking long long" from torch.manual_seed
        raise UserError(f"seed={seed!r} must be an integer in [-2**63, 2**64) (what torch.manual_seed takes)")
    check_callables(forward_fn=forward_fn)  # forward_fn=3 was "the pruned model failed on a batch ... shaped like"
    device = checked_device(device, "device=") if device is not None else _device_of(pruned)
    torch.manual_seed(seed)  # on the fork made by _private_rng: the caller's RNG state is restored after
    train_loader, held_loader, n_train, n_held = split_train_data(train_data, val_data, val_fraction, batch_size, seed)
    if teacher is not None:  # after the arguments' checks: a refused call says nothing else
        teacher = _teacher_apart(pruned, teacher, inplace)
    student = pruned if inplace else copy_model(pruned)
    if not inplace:  # the copy's hooks fired into the user's objects, and the user's handles could not remove them
        hooks = user_hooks(pruned)
        drop_user_hooks(student, hooks)
        warn_user_hooks(hooks, "recovered", "recover", stacklevel=6)  # past recover() and its three wrappers
    student_modes = [(m, m.training) for m in student.modules()]
    training = _train_modes(student)
    student.to(device)
    if teacher is not None and _device_of(teacher) != device:
        teacher = copy_model(teacher).to(device)  # the user's teacher stays where it is
    use_amp = bool(amp) and device.type == "cuda"
    amp_dtype = _amp_dtype() if use_amp else torch.float32
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise UserError("every parameter of the pruned model has requires_grad=False: there is nothing to train")
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch, counted = _steps_per_epoch(train_loader)
    if counted is not None and not n_train:  # an IterableDataset has no len(): train_samples said 0
        n_train = counted
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(round(warmup_fraction * total))))

    t0 = time.time()
    if task == "auto":
        batch = next(iter(held_loader), None)
        if batch is None:
            raise UserError("the held-out data (val_data) is empty; give at least one batch, or leave val_data out")
        first, target = (move_to(part, device) for part in split_batch(batch, student))
        with eval_mode(student), torch.no_grad():
            task = _task_of(_forward(student, first, forward_fn, "pruned model"), task, student, target)
    loss_options = {"temperature": temperature, "kd_weight": kd_weight, "ce_weight": ce_weight}
    if task == "ctc":  # transformers' CTC heads take pad_token_id as the blank
        loss_options["blank"] = int(getattr(getattr(student, "config", None), "pad_token_id", None) or 0)
    metric, initial, initial_loss = held_out_metric_and_loss(
        student, held_loader, device, task, teacher, forward_fn, loss_options
    )
    if isinstance(initial_loss, float) and math.isnan(initial_loss):
        _check_held_out_finite(held_loader, student)
    higher = metric not in LOWER_IS_BETTER
    best, best_epoch, best_loss = initial, 0, initial_loss
    best_state = state_copy(student)
    history: list[float] = []
    held_losses: list[float] = []
    losses: list[float] = []
    stale = 0
    stopped_early = diverged = False
    from tqdm import tqdm

    bar = tqdm(total=total, desc="recovering", unit="step", disable=not progress, leave=False)
    teacher_modes = [(m, m.training) for m in teacher.modules()] if teacher is not None else []
    if teacher is not None:
        set_mode(teacher, False)  # BN and dropout in inference mode; restored at the end
    try:
        for epoch in range(1, epochs + 1):
            for m in training:
                m.training = True  # this module only: the frozen norms inside stay in eval mode
            running, count = 0.0, 0
            for batch in train_loader:
                inputs, target = split_batch(batch, student)
                inputs, target = move_to(inputs, device), move_to(target, device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    t_logits = None
                    if teacher is not None and kd_weight:
                        with torch.no_grad():
                            t_logits = _forward(teacher, inputs, forward_fn, "teacher")
                    s_logits = _forward(student, inputs, forward_fn, "pruned model")
                loss = distillation_loss(s_logits, t_logits, target, task=task, inputs=inputs, **loss_options)
                if not loss.requires_grad:
                    raise UserError("nothing to train on: the batches have no labels and there is no teacher")
                if not scaler.is_enabled() and not math.isfinite(float(loss.detach())):
                    diverged = True  # NaN or inf: every later step would be too (with a float16 scaler: skipped)
                    running, count = math.nan, count + 1
                    break
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if max_grad_norm is not None:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(params, max_grad_norm)
                scaler.step(opt)
                scaler.update()
                sched.step()
                running += float(loss.detach())
                count += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{running / count:.4f}", **{metric: f"{best:.4f}"}, refresh=False)
            losses.append(running / max(count, 1))
            _, value, held_loss = held_out_metric_and_loss(
                student, held_loader, device, task, teacher, forward_fn, loss_options
            )
            history.append(value)
            held_losses.append(held_loss)
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}", **{metric: f"{value:.4f}"})
            better = (value > best) if higher else (value < best)
            better = better or (value == best and held_loss <= best_loss)  # a tie: the lower held-out loss
            stale = 0 if better else stale + 1
            if better:
                best, best_epoch, best_loss = value, epoch, held_loss
                best_state = state_copy(student)
            if diverged:
                stopped_early = True
                warnings.warn(
                    f"recovery stopped in epoch {epoch}: the training loss became {float(loss.detach())} (lr={lr} "
                    f"too high, or NaN/inf in a batch); returning the best epoch's weights (epoch {best_epoch}, "
                    f"held-out {metric} {best:.4f}; 0 = the pruned model)",
                    RuntimeWarning,
                    stacklevel=5,  # the caller's line: past the _private_rng, inference_mode and enable_grad wrappers
                )
                break
            if patience is not None and stale >= patience and epoch < epochs:
                stopped_early = True
                break
    finally:
        bar.close()
        for m, mode in student_modes + teacher_modes:
            m.training = mode
    student.load_state_dict(state_with_versions(student, best_state))
    result = RecoveryResult(
        metric=metric,
        higher_is_better=higher,
        initial=initial,
        history=tuple(history),
        train_loss=tuple(losses),
        best_epoch=best_epoch,
        best=best,
        epochs=len(history),
        stopped_early=stopped_early,
        seconds=round(time.time() - t0, 3),
        task=task,
        train_samples=n_train,
        held_out_samples=n_held,
        initial_loss=initial_loss,
        held_out_loss=tuple(held_losses),
        diverged=diverged,
    )
    return student, result
