"""Built-in evaluator: top-1 accuracy of classifiers on labelled batches."""

from __future__ import annotations

import logging

import torch

from cleanai_core import hookimpl
from cleanai_core.errors import UserError
from cleanai_core.model_state import set_mode
from cleanai_core.recovery import IGNORE_INDEX
from cleanai_core.runtime import (
    class_logits,
    find_logits,
    move_to,
    reads_as_regression,
    regression_targets,
    split_batch,
)
from cleanai_plugins.io.datasets import label_indices, not_class_labels

log = logging.getLogger("cleanai")

# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


@hookimpl(trylast=True)
def cleanai_evaluate(model, loader, device):
    """Top-1 accuracy for classifiers on ``(x, y)`` batches with class labels (integers,
    whole-number floats or one-hot rows); a model with one output is a binary classifier
    (class 1 where its logit is positive). Fractional targets shaped like the outputs are a
    regression's: the mean squared error instead (and recovery's task). When neither
    applies, returns ``{"accuracy_note": why}``. Labels of ``-100`` (PyTorch's
    ``ignore_index``) count in no accuracy, as in recovery's held-out accuracy."""
    from tqdm import tqdm

    correct = total = ignored = 0
    squared, values, samples, regression = 0.0, 0, 0, False
    set_mode(model, False)
    quiet = not log.isEnabledFor(logging.INFO)
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluating", unit="batch", disable=quiet, leave=False):
            if isinstance(batch, dict):  # the forward's inputs by name and labels (a model taking two images)
                x, target = split_batch(batch)
                if target is None:
                    return {"accuracy_note": "the data has no labels"}
            elif not isinstance(batch, (tuple, list)) or len(batch) < 2:
                return {"accuracy_note": "the data has no labels"}
            else:
                x, target = batch[0], batch[1]
            if not isinstance(target, torch.Tensor):
                return {"accuracy_note": f"the labels are a {type(target).__name__}, not a tensor of class indices"}
            y = label_indices(target) if target.dim() >= 1 else None
            if y is None and not target.is_floating_point():
                return {"accuracy_note": not_class_labels(target)}
            named = x if isinstance(x, dict) else {"": x}
            if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in named.values()):
                raise UserError("the evaluation data contains NaN or inf values; clean the data and run again")
            logits = find_logits(model(**move_to(x, device)) if isinstance(x, dict) else model(x.to(device)))
            # whole-number targets of a one-output model (ratings, counts) are a regression's too
            fractional = target.is_floating_point() and (y is None or regression or reads_as_regression(logits, target))
            if fractional:  # a regression where the targets are shaped like the outputs
                ref = regression_targets(logits, target) if isinstance(logits, torch.Tensor) else None
                if ref is None or total:
                    return {"accuracy_note": not_class_labels(target)}
                squared += float(((logits.float() - ref.float()) ** 2).sum())
                values, samples, regression = values + ref.numel(), samples + len(ref), True
                continue
            if logits is None or logits.dim() != 2:
                shape = tuple(logits.shape) if logits is not None else "no tensor"
                return {"accuracy_note": f"the model's output ({shape}) is not one row of class scores per sample"}
            binary = logits.shape[1] == 1  # one logit: a binary classifier, class 1 where the logit is positive
            classes = 2 if binary else logits.shape[1]
            labelled = y != IGNORE_INDEX  # "labels go from -100 to 2": the job stopped where recovery ignores them
            ignored += int((~labelled).sum())
            y, logits = y[labelled], logits[labelled.to(logits.device)]
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
                has = "1 output (a binary classifier: labels 0 and 1)" if binary else f"{classes} outputs"
                raise UserError(
                    f"labels go from {int(y.min())} to {int(y.max())} but the model has {has}; "
                    "give labels 0..N-1 matching the model's classes (or --num-classes)"
                )
            correct += int((class_logits(logits).argmax(1).cpu() == y).sum())
            total += len(y)
    if regression:
        return {
            "mse": squared / values,
            "evaluated": samples,
            "accuracy_note": "the targets are a regression's (floating values, one per output, not class "
            "labels): the mean squared error is reported instead",
            "recovery_task": "regression",
        }
    if total == 0:
        if ignored:
            return {"accuracy_note": f"every label of the evaluation data is {IGNORE_INDEX} (ignored)"}
        return {"accuracy_note": "the evaluation data is empty"}
    return {"accuracy": correct / total, "evaluated": total}
