"""Built-in evaluator: top-1 accuracy of classifiers on labelled batches."""

from __future__ import annotations

import logging

import torch

from cleanai_core import hookimpl
from cleanai_core.errors import UserError
from cleanai_core.runtime import class_logits, find_logits
from cleanai_plugins.io.datasets import label_indices, not_class_labels

log = logging.getLogger("cleanai")

# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


@hookimpl(trylast=True)
def cleanai_evaluate(model, loader, device):
    """Top-1 accuracy for classifiers on ``(x, y)`` batches with class labels (integers,
    whole-number floats or one-hot rows); a model with one output is a binary classifier
    (class 1 where its logit is positive). When accuracy does not apply, returns
    ``{"accuracy_note": why}``."""
    from tqdm import tqdm

    correct = total = 0
    model.eval()
    quiet = not log.isEnabledFor(logging.INFO)
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluating", unit="batch", disable=quiet, leave=False):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                return {"accuracy_note": "the data has no labels"}
            x, y = batch[0], batch[1]
            if not isinstance(y, torch.Tensor):
                return {"accuracy_note": f"the labels are a {type(y).__name__}, not a tensor of class indices"}
            y = label_indices(y) if y.dim() >= 1 else None
            if y is None:
                return {"accuracy_note": not_class_labels(batch[1])}
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise UserError("the evaluation data contains NaN or inf values; clean the data and run again")
            logits = find_logits(model(x.to(device)))
            if logits is None or logits.dim() != 2:
                shape = tuple(logits.shape) if logits is not None else "no tensor"
                return {"accuracy_note": f"the model's output ({shape}) is not one row of class scores per sample"}
            binary = logits.shape[1] == 1  # one logit: a binary classifier, class 1 where the logit is positive
            classes = 2 if binary else logits.shape[1]
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
                has = "1 output (a binary classifier: labels 0 and 1)" if binary else f"{classes} outputs"
                raise UserError(
                    f"labels go from {int(y.min())} to {int(y.max())} but the model has {has}; "
                    "give labels 0..N-1 matching the model's classes (or --num-classes)"
                )
            predicted = class_logits(logits).argmax(1)
            correct += int((predicted.cpu() == y).sum())
            total += len(y)
    if total == 0:
        return {"accuracy_note": "the evaluation data is empty"}
    return {"accuracy": correct / total, "evaluated": total}
