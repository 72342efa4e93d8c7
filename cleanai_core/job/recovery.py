"""``cleanai prune --recover-epochs N``: distillation fine-tuning of the pruned model from
the original, on training data that never overlaps the split measuring the report's
accuracy. Called by :mod:`cleanai_core.job.run`; returns the recovered model and the
report's ``"recovery"`` entry (rendered by :mod:`cleanai_core.recovery_report`)."""

from __future__ import annotations

import logging
import numbers
from typing import Any

import torch
from torch import nn

from cleanai_core.errors import UserError
from cleanai_core.report import finite_or_none

__all__ = ["check_train_data", "recover_for_report"]

log = logging.getLogger("cleanai")


def _training_data(cfg: dict[str, Any], pm: Any, model: nn.Module, calib: Any) -> tuple[Any, str]:
    spec = cfg.get("train_data")
    if not spec:
        if len(calib) < 2:  # said "train_data has 1 sample(s)": an argument of recover() the user never gave
            raise UserError(
                f"--recover-epochs without --train-data trains on the calibration samples of --data "
                f"({cfg.get('data')!r}), and {len(calib)} is too few to hold one out for early stopping; give "
                "--train-data (the training split), more samples in --data, or a larger --calib-fraction."
            )
        return calib, (
            f"no --train-data: trained on the {len(calib)} calibration samples of --data (10% of them held out for "
            "early stopping), never on the held-out evaluation samples"
        )
    from cleanai_core.job.inputs import first_input, first_not_finite, spec_options

    check_train_data(cfg)
    options = {
        "model": model,
        "image_size": cfg.get("image_size"),
        "seq_len": cfg.get("seq_len"),
        **spec_options(cfg, "train_data"),
    }
    data = pm.hook.cleanai_load_dataset(spec=spec, options=options)
    if data is None:
        raise UserError(f"--train-data {spec!r}: no such file or folder, or not a form this tool reads.")
    if len(data) < 2:
        raise UserError(f"--train-data {spec!r} has {len(data)} item(s); at least 2 are needed.")
    if first_not_finite(first_input(data)):  # recovery stopped on a NaN loss with a warning, exit 0
        raise UserError(f"--train-data {spec!r} contains NaN or inf values (in its first sample); clean the data "
                        "and run again.")  # fmt: skip
    return data, f"--train-data {spec} ({len(data)} samples, 10% held out for early stopping)"


def check_train_data(cfg: dict[str, Any]) -> None:
    """A :class:`UserError` when ``--train-data`` names the ``--data`` (the same spec, file
    or folder, or a copy of the file): recovery trained on the held-out half too, and the
    recovered model was measured on its own training samples, without a word."""
    spec = cfg.get("train_data")
    if spec and cfg.get("recover_epochs") and _same_data(str(spec), str(cfg.get("data") or "")):
        raise UserError(
            f"--train-data {spec!r} is the --data {cfg.get('data')!r}, whose held-out part measures the report's "
            "accuracy: recovery would be measured on samples it trained on. Leave --train-data out (recovery then "
            "trains on the calibration part of --data only), or give training data of other samples."
        )


def _same_data(a: str, b: str) -> bool:
    """Whether two data specs name the same data: the same text, the same file or folder
    (through links or another spelling), or two files with the same bytes."""
    import filecmp
    import os

    if not a or not b:
        return False
    if a == b:
        return True
    try:
        if not (os.path.exists(a) and os.path.exists(b)):
            return False
        if os.path.samefile(a, b):
            return True
        both_files = os.path.isfile(a) and os.path.isfile(b)
        return both_files and os.path.getsize(a) == os.path.getsize(b) and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


#: the evaluator's held-out figures a recovery is judged by, in the order the report's headline prefers
#: them, with whether higher is better
#: the least loss, as a share of the original model's figure, whose recovered share is reported
GAP_FLOOR = 1e-3

EVALUATION_METRICS = (("accuracy", True), ("perplexity", False), ("mse", False), ("error_rate", False))


def evaluation_metric(*results: dict[str, Any] | None) -> tuple[str, bool] | None:
    """``(name, higher_is_better)`` of the first figure of :data:`EVALUATION_METRICS` that
    every one of the evaluator's ``results`` gives; ``None`` where they share none."""
    for name, higher in EVALUATION_METRICS:
        if all(_number((r or {}).get(name)) is not None for r in results):
            return name, higher
    return None


def _number(value: Any) -> float | None:
    """``value`` as a float (an evaluator plugin's numpy scalar or 0-d tensor too), else ``None``."""
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        value = value.item()
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def recover_for_report(
    cfg: dict[str, Any],
    pm: Any,
    model: nn.Module,
    pruned: nn.Module,
    calib: Any,
    evaluate: Any,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    task: str = "auto",
) -> tuple[nn.Module, dict[str, Any]]:
    """Recover ``pruned`` (teacher ``model``); ``evaluate(m)`` gives the evaluator's result
    for ``m`` on the report's held-out split (or ``None``), ``before`` / ``after`` its results
    for the original and the pruned model; ``task`` as for :func:`~cleanai_core.recovery.recover`
    (the evaluator's ``recovery_task``: a token classifier's labels are not shifted).

    The entry names the report's own figure for the three models (``evaluation_metric``,
    ``evaluation_original`` / ``_pruned`` / ``_recovered``: accuracy, else perplexity, mean
    squared error or token error rate) beside ``accuracy_*``. Before 2026-12-02 a regression's
    or a language model's entry had only the accuracy keys (all null): the pruned model's figure
    before recovery was nowhere, and the terminal's "Recovery: held-out mse 10.0166 -> 9.9963"
    gave the early-stopping split's figures beside the report's "11.59 -> 11.54" for the same words."""
    from cleanai_core.recovery import recover

    data, source = _training_data(cfg, pm, model, calib)
    log.info("recovery: %s", source)
    recovered, result = recover(
        pruned,
        model,
        data,
        epochs=int(cfg["recover_epochs"]),
        lr=float(cfg["recover_lr"]),
        batch_size=int(cfg["batch_size"]),
        device=torch.device(cfg["device"]),
        seed=int(cfg["seed"]),
        progress=not cfg.get("quiet"),
        task=task,
    )
    rec = evaluate(recovered)
    found = evaluation_metric(before, after, rec)
    name, higher = found if found is not None else (None, True)
    original, pruned_value, recovered_value = (
        _number((r or {}).get(name)) if name else None for r in (before, after, rec)
    )
    gap = None
    if name is not None:
        lost = (original - pruned_value) if higher else (pruned_value - original)
        # the share of what pruning lost that recovery won back, where it lost a measurable part: a loss
        # of 1e-5 of the figure (a perplexity 34.864 -> 34.865) made "892635% of the gap recovered"
        if lost > GAP_FLOOR * max(abs(original), 1e-12):
            gap = ((recovered_value - pruned_value) if higher else (pruned_value - recovered_value)) / lost
    accuracy = name == "accuracy"
    entry = {
        "accuracy_original": original if accuracy else None,
        "accuracy_pruned": pruned_value if accuracy else None,
        "accuracy_recovered": recovered_value if accuracy else None,
        "evaluation_metric": name,
        "evaluation_original": original,
        "evaluation_pruned": pruned_value,
        "evaluation_recovered": recovered_value,
        "gap_recovered": gap,
        "training_data": source,
        **finite_or_none(result.to_json()),  # NaN / inf as None: a diverged run's losses
    }
    return recovered, finite_or_none(entry)
