"""The job behind ``cleanai prune``: load, split, calibrate, (analyse sensitivity,) prune,
(recover,) evaluate, measure and write the output folder. :func:`run_job` is the library
entry point; the command line only parses options into a :class:`PruneConfig`."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from cleanai_core import distributed
from cleanai_core.errors import PruningError, UserError, is_out_of_memory, model_fault
from cleanai_core.heap import heap_growing
from cleanai_core.job.config import PruneConfig, check_unread, pruner_options, recorded_config, resolve_config
from cleanai_core.job.inputs import (
    checked_collate,
    checked_dataset,
    first_input,
    first_not_finite,
    has_labels,
    load_inputs,
    split_dataset,
    to_device,
)
from cleanai_core.job.memory import (
    check_batches_fit,
    check_sample_fits,
    meta_sample_peak,
    out_of_memory_error,
    sample_peak,
)
from cleanai_core.job.outputs import check_out_apart, check_out_dir, guard_out, marker_text, resolved_spec_path
from cleanai_core.job.recovery import check_train_data
from cleanai_core.model_state import copy_model, preserved, round_through, set_mode, stored_in
from cleanai_core.pruning_report import indices_in_original, input_shape
from cleanai_core.runtime import device_of, private_rng
from cleanai_core.special_files import check_not_special

__all__ = ["execute", "run_job"]

log = logging.getLogger("cleanai")


def run_job(config: PruneConfig | dict[str, Any], model: Any = None, dataset: Any = None) -> dict[str, Any] | None:
    """Run a pruning job: ``config`` as a :class:`PruneConfig` or a dict of its options
    (resolved with ``--preset``, ``config`` file and ``CLEANAI_*`` variables as on the
    command line). Returns the report (``None`` for a dry run)."""
    if model is not None and not isinstance(model, torch.nn.Module):
        raise UserError(f"run_job(model=...) must be a torch.nn.Module, got {type(model).__name__}")
    if model is not None:  # a scripted model raised TypeError from BufferDict, a meta one aten::equal's error
        from cleanai_core.options import check_model

        check_model(model, who="run_job")
    objects = tuple(k for k, v in (("model", model), ("data", dataset)) if v is not None)
    cfg = resolve_config(config, objects=objects)
    cfg["_model_object"] = model is not None  # its spec may name no loader (save_pruned's rebuild_check)
    with _process_state_kept(cfg):
        return execute(cfg, model=model, dataset=dataset)


@contextlib.contextmanager
def _process_state_kept(cfg: dict[str, Any]) -> Any:
    """The caller's process as it was after the job: its random state (the job seeds the
    global generator with ``seed``; a user's own draws after ``run_job`` repeated from it,
    as they did after ``recover()`` before it forked the generator), torch's thread count
    (``threads``) and the ``cleanai`` logger's level (``quiet``)."""
    threads, logger = torch.get_num_threads(), logging.getLogger("cleanai")
    level = logger.level
    try:
        with private_rng(torch.device(str(cfg.get("device") or "cpu"))):
            yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        logger.setLevel(level)


def _accuracy_note(note: str | None, *results: dict[str, Any] | None) -> str | None:
    """Why the report has no accuracy (``None`` when it has one)."""
    if note or all(r and r.get("accuracy") is not None for r in results):
        return note
    notes = [r.get("accuracy_note") for r in results if r and r.get("accuracy_note")]
    return notes[0] if notes else "no installed evaluator measures this model's output"


def _evaluate(pm: Any, model: Any, loader: Any, device: torch.device, pruned: bool = False) -> dict[str, float] | None:
    """The evaluators' result for ``model`` on the held-out batches. The model failing on one
    is a :class:`UserError` (the original: the data) or a :class:`PruningError` (the pruned
    model, where the original ran); it was a traceback with exit code 1."""
    if loader is None:
        return None
    try:
        return pm.hook.cleanai_evaluate(model=model, loader=loader, device=device)
    except Exception as exc:
        if not model_fault(exc):
            raise
        what = f"{type(exc).__name__}: {str(exc)[:300]}"
        if pruned:
            raise PruningError(
                f"the pruned model failed on the held-out part of --data, where the original model ran ({what}); "
                "nothing was written. Please report this with the model; --ignore the layers named above meanwhile."
            ) from exc
        raise UserError(
            f"the model failed on the held-out part of --data, which measures accuracy ({what}); the first sample "
            "ran. Check that every sample of --data fits the model (shape, dtype, values); nothing was written."
        ) from exc


LATENCY_ROUNDS = 5


def _latencies(before: Any, after: Any, example: Any, repeats: int) -> tuple[float, float, int]:
    """Median CPU milliseconds of one forward pass of each model, measured in alternating
    rounds so that a change in machine load hits both alike. Returns (before, after,
    timed runs per model)."""
    import statistics

    from cleanai_core.metrics import measure_latency

    cpu = torch.device("cpu")
    x = to_device(example, cpu)
    models = [set_mode(copy_model(m).cpu(), False) for m in (before, after)]
    per_round = max(1, math.ceil(repeats / LATENCY_ROUNDS))
    times: list[list[float]] = [[], []]
    for _ in range(LATENCY_ROUNDS):
        for k, m in enumerate(models):
            try:
                times[k].append(measure_latency(m, x, repeats=per_round, warmup=1))
            except Exception as exc:  # it ran on this input before: a traceback, exit 1
                if not model_fault(exc):
                    raise
                which = ("the model", "the pruned model")[k]
                raise (UserError, PruningError)[k](
                    f"{which} failed while its latency was timed on the example input ({type(exc).__name__}: "
                    f"{str(exc)[:300]}), where it had run before: its forward fails on some calls only. Make "
                    "it deterministic (or fix what fails); nothing was written."
                ) from exc
    return (round(statistics.median(times[0]), 4), round(statistics.median(times[1]), 4),
            per_round * LATENCY_ROUNDS)  # fmt: skip


def execute(
    cfg: dict[str, Any], model: Any = None, dataset: Any = None, spec_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Run the whole job for a resolved config. Returns the report (``None`` for a dry run).

    ``model``/``dataset`` may be given directly (``cleanai demo``); ``cfg['model']`` must
    then still be a spec that rebuilds the architecture."""
    check_unread(cfg)
    check_train_data(cfg)
    quiet = bool(cfg.get("quiet"))
    logging.getLogger("cleanai").setLevel(logging.WARNING if quiet else logging.INFO)
    out = Path(cfg["out"]) if cfg.get("out") else None
    user_inputs = [cfg.get("model"), cfg.get("data"), cfg.get("weights"), cfg.get("config"), cfg.get("train_data")]
    for name, path in zip(("--model", "--data", "--weights", "--config", "--train-data"), user_inputs, strict=True):
        check_not_special(path, name)
    with contextlib.ExitStack() as guard:
        at_commit = (None, None)
        if isinstance(model, torch.nn.Module):
            # run_job(model=...): its modes, buffers and attributes come back as they were (the
            # job puts it in eval mode; a model in training mode was left in eval mode)
            guard.enter_context(preserved(model))
        if out is not None and not cfg.get("dry_run"):
            # rank 0 checks the folder it will write; a refusal stops every rank (the others
            # would wait in the first collective until the timeout)
            def check() -> None:
                if distributed.is_writer():
                    check_out_dir(out, bool(cfg.get("overwrite")), user_inputs, own_marker=cfg.get("_own_marker"))

            distributed.collectively(check, "checking --out")
            if distributed.is_writer():
                at_commit = guard_out(out, guard)
        try:
            return _execute(cfg, model, dataset, spec_options, out, at_commit)
        except Exception as exc:  # an allocation that failed: a traceback from wherever it happened
            if is_out_of_memory(exc):
                raise out_of_memory_error(exc, cfg) from exc
            raise


#: the command line's way to let a model's outputs shrink (it has no ``output_transform``)
CLI_OUTPUT_HINT = (
    "the command line has no output_transform: to let the others shrink, give --model a package.module:factory "
    "(a function of your own module, importable from the current folder) that returns the model wrapped in a "
    "module whose forward returns only the outputs to keep, or prune from Python with "
    "StructuredPruner(..., output_transform=lambda out: <only the outputs to keep>)."
)


def _execute(
    cfg: dict[str, Any],
    model: Any,
    dataset: Any,
    spec_options: dict[str, Any] | None,
    out: Path | None,
    at_commit: tuple[Any, Any],
) -> dict[str, Any] | None:
    from torch.utils.data import DataLoader

    from cleanai_core import io as cio
    from cleanai_core.graph.dependency import OUTPUT_TRANSFORM_HINT
    from cleanai_core.out_folder import staged_folder
    from cleanai_core.plugins import get_plugin_manager
    from cleanai_core.pruner import StructuredPruner
    from cleanai_core.report import headline_text, write_report
    from cleanai_core.scoring import get_importance

    quiet = bool(cfg.get("quiet"))
    torch.manual_seed(int(cfg["seed"]))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = torch.device(cfg["device"])
    t0 = time.time()
    if model is not None:
        if device_of(model) not in (None, device):  # the user's model stays where it is
            model = copy_model(model)
        model = set_mode(model, False).to(device)
    if model is None or dataset is None:
        with heap_growing(runs_user_code=True):  # the model, the data and the imports they take live to the end
            model, dataset, pm = load_inputs(cfg, model, dataset)
        if out is not None and not cfg.get("dry_run"):  # the folder a loader read the model from (hf:FOLDER)
            check_out_apart(out, [resolved_spec_path(cfg.get("_model_spec"))])
    else:
        pm = get_plugin_manager()
        dataset = checked_dataset(dataset, model, str(cfg["data"]))
    calib, held = split_dataset(dataset, float(cfg["calib_fraction"]), int(cfg["seed"]))
    bs = int(cfg["batch_size"])
    stats_part, sens_loader = calib, None
    if cfg.get("auto") or cfg.get("sensitivity"):  # trials on batches the statistics (and compensation) never saw
        from torch.utils.data import Subset

        n_sens = min(int(cfg["sensitivity_batches"]) * bs, len(calib) // 3)
        if n_sens < 1:
            raise UserError(f"--auto/--sensitivity need at least 3 calibration samples; there are {len(calib)}.")
        stats_part = Subset(calib, range(len(calib) - n_sens))
        sens_loader = DataLoader(
            Subset(calib, range(len(calib) - n_sens, len(calib))), batch_size=bs, collate_fn=checked_collate
        )
    num_batches = cfg.get("calib_batches")
    if num_batches is not None and int(num_batches) >= 1 and distributed.is_distributed():
        # --calib-batches counts batches of the whole job, not of each rank: the ranks share
        # the first N batches (the ones one process would read) instead of reading N each
        from torch.utils.data import Subset

        stats_part = Subset(stats_part, range(min(len(stats_part), int(num_batches) * bs)))
        num_batches = None
    # the samples whose activations score the channels: --calib-batches and the sensitivity trials' share leave
    # out part of the calibration split (the report said "100 calibration samples" where 16 were read)
    scored = len(stats_part) if num_batches is None else min(len(stats_part), int(num_batches) * bs)
    calib_loader = distributed.shard(
        DataLoader(stats_part, batch_size=bs, shuffle=False, collate_fn=checked_collate)
    )  # this rank's share
    eval_loader = (
        DataLoader(held, batch_size=bs, shuffle=False, collate_fn=checked_collate)
        if held is not None and has_labels(held)
        else None
    )
    accuracy_note = None
    if held is None:
        accuracy_note = "--calib-fraction 1: all data scores channels, none is left to measure accuracy"
    elif eval_loader is None:
        accuracy_note = "the data has no labels"
    example = to_device(first_input(calib), device)
    if first_not_finite(example):
        # said "example_inputs contain NaN or inf values", an argument the command line has not
        raise UserError(f"--data {cfg['data']!r} contains NaN or inf values (in the first calibration sample); clean "
                        "the data and run again.")  # fmt: skip
    estimate = meta_sample_peak(model, example)  # one sample beyond the free memory was killed without a word
    distributed.collectively(
        lambda: check_sample_fits(cfg, estimate, input_shape(example), device), "checking the first sample's memory"
    )
    try:
        with torch.no_grad(), sample_peak() as peak:  # what one sample needs, for the batches' check below
            output = model(example) if not isinstance(example, dict) else model(**example)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory_error(exc, cfg) from exc
        shape = tuple(example.shape) if isinstance(example, torch.Tensor) else "dict"
        raise UserError(
            f"the model failed on an input from --data (shape {shape}): {type(exc).__name__}: {str(exc)[:300]}. "
            f"{_input_dtype_hint(example, model)}Check that the data matches what the model expects (channels, "
            "image size, --num-classes)."
        ) from exc
    _check_output(output, cfg, model)
    check_model_reads(cfg, model, output)
    # --image-size 8192 --batch-size 32 was killed for memory without a word
    distributed.collectively(  # one rank short of memory stops every rank (none waits in a collective)
        lambda: check_batches_fit(cfg, peak(), input_shape(example), device), "checking the batches' memory"
    )

    importance_opts: dict[str, Any] = {}
    if cfg.get("alpha") is not None:
        importance_opts["weight_ratio"] = float(cfg["alpha"])
    if cfg.get("beta") is not None:
        importance_opts["activation_ratio"] = float(cfg["beta"])
    importance = get_importance(cfg["importance"], **importance_opts)
    try:
        pruner = StructuredPruner(model, example, importance=importance, **pruner_options(cfg))
    except UserError as exc:
        if OUTPUT_TRANSFORM_HINT not in str(exc):
            raise
        # the command line has no output_transform: its own way to let outputs shrink
        raise UserError(str(exc).replace(OUTPUT_TRANSFORM_HINT, CLI_OUTPUT_HINT)) from exc
    pruner.collect_activations(
        calib_loader, num_batches=num_batches, progress=not quiet, sequential=bool(cfg.get("sequential"))
    )
    sensitivity = None
    if cfg.get("auto") or cfg.get("sensitivity"):
        from cleanai_core.job.auto import sensitivity_and_ratios

        sensitivity = sensitivity_and_ratios(cfg, pruner, sens_loader, progress=not quiet)
        if cfg.get("_analysis_only"):  # cleanai sensitivity: the analysis is the result
            from cleanai_core.job.auto import write_analysis

            report = {"model": cfg["model"], "data": cfg["data"], **sensitivity, "seconds": round(time.time() - t0, 2)}
            return write_analysis(cfg, out, at_commit, report) if distributed.is_writer() else None
    if cfg.get("dry_run"):
        summary = pruner.plan().summary()
        if distributed.is_writer():
            print(summary)
        return None
    if not distributed.is_writer():  # rank 0 evaluates and writes; the others take part in pruning
        pruner.prune()
        return None

    with warnings.catch_warnings():  # said once, as the error below
        warnings.filterwarnings("ignore", message="the plan removes no unit")
        removed = pruner.plan().n_pruned
    if not cfg.get("prune_dead_only") and removed == 0:  # a copy of the input would be written as the result
        raise UserError(f"{pruner.why_nothing_pruned()} (--round-to, --ratio, --layer-ratio); nothing was written.")
    if cfg.get("prune_dead_only") and removed == 0:  # a valid finding, not an error: said, then written as asked
        # why: no dead unit, or dead ones that cannot go (an --ignore'd layer's: "no unit is dead" misled)
        why = pruner.why_nothing_pruned().removeprefix("the plan removes no unit: ")
        warnings.warn(
            f"--prune-dead-only: {why.replace('the calibration data', '--data')}, so the model written is the "
            "input, unpruned; to make it smaller, prune by score (--ratio, --target-params or --target-flops)",
            RuntimeWarning,
            stacklevel=2,
        )
    before_acc = _evaluate(pm, model, eval_loader, device)
    repeats = int(cfg.get("latency_repeats") or 20)
    stored = cfg.get("_stored_dtype")  # the dtype the folder is written in (bfloat16), narrower than the computing one

    def rounded(m: Any) -> Any:
        # measured as written: a bfloat16 checkpoint's report gave the float32 pruned model's perplexity, and the
        # same folder pruned further (--model FOLDER) started from another one
        return round_through(m, stored, cfg.get("_stored_float32", ())) if stored is not None else m

    pruned = rounded(pruner.prune())
    after_acc = _evaluate(pm, pruned, eval_loader, device, pruned=True)
    recovery = None
    if cfg.get("recover_epochs"):
        from cleanai_core.job.recovery import recover_for_report

        evaluated: list[tuple[Any, dict[str, Any] | None]] = []  # (model, the evaluator's whole result)

        def evaluate(m: Any) -> dict[str, Any] | None:  # the recovered model (the job's own copy), as written
            evaluated.append((m, _evaluate(pm, rounded(m), eval_loader, device, pruned=True)))
            return evaluated[-1][1]

        task = (before_acc or {}).get("recovery_task", "auto")  # how the labels align, where the evaluator says
        pruned, recovery = recover_for_report(cfg, pm, model, pruned, calib, evaluate, before_acc, after_acc, task=task)
        # the recovered model's whole result, on the same held-out split: a masked LM's report kept its accuracy
        # alone (perplexity_after and evaluation_tokens null, the perplexity row gone from report.md)
        done = [result for m, result in evaluated if m is pruned]
        after_acc = done[-1] if done else _evaluate(pm, rounded(pruned), eval_loader, device, pruned=True)
    lat_before, lat_after, repeats = _latencies(model, pruned, example, repeats)

    report = {
        "model": cfg["model"],
        "data": cfg["data"],
        **pruner.report(),  # params, FLOPs, plan, layers, dead units: counted once, by the library
        "target_flops": cfg.get("target_flops"),
        "target_params": cfg.get("target_params"),
        # an --auto run for a latency target named no amount at all (pruning ratio, FLOPs and parameter targets null)
        "target_latency": cfg.get("target_latency"),
        "flops_note": "FLOPs of one forward pass on one input (FLOPs = 2 x MACs)",
        "latency_before_ms": lat_before,
        "latency_after_ms": lat_after,
        "latency": {
            "device": "cpu",
            "batch_size": 1,
            "repeats": repeats,
            "method": f"median over {LATENCY_ROUNDS} alternating rounds of before/after",
            "statistic": "median",
            "threads": torch.get_num_threads(),
        },
        "accuracy_before": before_acc.get("accuracy") if before_acc else None,
        "accuracy_after": after_acc.get("accuracy") if after_acc else None,
        "accuracy_note": _accuracy_note(accuracy_note, before_acc, after_acc),
        # what the accuracy and perplexity measure where the evaluator says (a masked LM's: its masked tokens)
        "metric_note": next((r["metric_note"] for r in (before_acc, after_acc) if r and r.get("metric_note")), None),
        "perplexity_before": before_acc.get("perplexity") if before_acc else None,
        "perplexity_after": after_acc.get("perplexity") if after_acc else None,
        **{f"mse_{k}": r["mse"] for k, r in (("before", before_acc), ("after", after_acc)) if r and "mse" in r},
        **{  # a CTC speech recogniser's token error rate
            f"error_rate_{k}": r["error_rate"]
            for k, r in (("before", before_acc), ("after", after_acc))
            if r and "error_rate" in r
        },
        "evaluation_tokens": after_acc.get("tokens") if after_acc else None,
        "calibration_samples": len(calib),
        "scored_samples": scored,
        "evaluation_samples": len(held) if held is not None else 0,
        "input_shape": input_shape(example),
        "recovery": recovery,
        # --model FOLDER: the figures "before" are the folder's pruned model's; its own steps come first in history.json
        "pruned_before_steps": len(cfg["_prior_history"].steps) if cfg.get("_prior_history") is not None else None,
    }
    if cfg.get("_prior_history") is not None:  # --model FOLDER: pruned_indices index the folder's model
        indices_in_original(report["layers"], cfg["_prior_history"])
    if any(cfg.get(k) is not None for k in ("target_flops", "target_params", "target_latency")):
        report["pruning_ratio"] = None  # --auto: the allocation's target (the pruner itself has none)
    if sensitivity is not None:
        report.update(sensitivity)
    report["seconds"] = round(time.time() - t0, 2)

    arch_options = dict(spec_options or {})
    if cfg.get("num_classes") is not None:
        arch_options.setdefault("num_classes", cfg["num_classes"])
    history = pruner.history
    if cfg.get("_prior_history") is not None:  # --model FOLDER: its steps, then this job's, on its architecture
        arch_options = dict(cfg.get("_arch_options") or {})
        history = cfg["_prior_history"].then(history)
    # the options, then where each came from; --config reads it back and skips the "_" keys
    resolved = recorded_config(cfg)
    with staged_folder(out, check=at_commit[0], expected=at_commit[1]) as tmp:
        spec = str(Path(cfg["model"]).resolve()) if Path(cfg["model"]).is_file() else cfg["model"]
        spec = cfg.get("_model_spec") or spec
        saved = pruned.cpu()
        if cfg.get("_stored_dtype") is not None:  # the dtype the model's files store it in (bfloat16)
            saved = stored_in(saved, cfg["_stored_dtype"], cfg.get("_stored_float32", ()))
        cio.save_pruned(
            tmp,
            saved,
            history,
            spec,
            options=arch_options,
            save_pickle=bool(cfg.get("save_pickle")),
            example_input_shape=report["input_shape"] if isinstance(report["input_shape"], list) else None,
            example_inputs=example,
            report=report,  # the output plugins' entries (hf_folder, hf_reload)
            # run_job(cfg, model=m) of a model built in the caller's code: no loader may rebuild its spec, and the
            # job's work is not thrown away for it (model.pt loads into the caller's own architecture)
            rebuild_check=not cfg.get("_model_object"),
        )
        cio.atomic_write_text(tmp / "config.json", json.dumps(resolved, indent=2, default=str) + "\n")
        report = write_report(tmp, report)
        if cfg.get("_own_marker"):  # last: it lists what the folder holds, which a later demo may replace
            cio.atomic_write_text(tmp / cfg["_own_marker"], marker_text(tmp, cfg["_own_marker"], "cleanai demo"))
    if True:  # the headline is the result: printed even with --quiet
        print(headline_text(report))
        if report["accuracy_note"]:
            print(f"Accuracy not measured: {report['accuracy_note']}.")
        print(
            f"wrote {out}/: model.pt, history.json, architecture.json, config.json, report.json, report.md, "
            f"{report['plot']}"
            + (", model_full.pt" if cfg.get("save_pickle") else "")
            + (f", {report['recovery_plot']}" if recovery else "")
            + (f", {report['hf_folder']}/" if report.get("hf_folder") else "")
            + (f", {report['tokenizer_folder']}/" if report.get("tokenizer_folder") else "")
        )
    return report


def _check_output(output: Any, cfg: dict[str, Any], model: torch.nn.Module | None = None) -> None:
    """A :class:`UserError` where the model's output on the first sample holds no tensor
    (``None``, a number, text): the command line has no ``output_transform``, which the
    trace's message advised (``cleanai prune: failed: ... pass output_transform=lambda
    out: ...``, exit 1). Also where it holds NaN, or no finite value at all: the job pruned
    it and wrote the result, exit 0, the verification passing anything where the original's
    output is not finite."""
    from torch.utils._pytree import tree_flatten

    tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
    floats = [t for t in tensors if (t.is_floating_point() or t.is_complex()) and t.numel()]
    nan = sum(int(torch.isnan(t).sum()) for t in floats)
    total = sum(t.numel() for t in floats)
    if nan or (floats and not any(bool(torch.isfinite(t).any()) for t in floats)):
        from cleanai_core.options import check_finite

        if model is not None:
            check_finite(model)  # NaN or inf weights are named by their tensor
        what = f"NaN in {nan}" if nan else "inf in all"
        raise UserError(
            f"--model {cfg.get('model')!r} gives {what} of its {total} output values on the first sample of --data, "
            "before anything is pruned: the scores, the check of the pruned model against it and the accuracy "
            "would mean nothing. The sample and the weights are finite, so the forward computes them (a division "
            "by zero, a log or square root of a negative number, an overflow in half precision): fix the model or "
            "its weights, then run again; nothing was written."
        )
    if tensors:
        return
    raise UserError(
        f"--model {cfg.get('model')!r} returned {type(output).__name__} on an input from --data, not tensors: CleanAI "
        "checks the pruned model's outputs against the original's and measures accuracy on them. Make its forward "
        "return the output tensor(s) (e.g. a factory that wraps the model in a module whose forward returns the "
        "logits)."
    )


def check_model_reads(cfg: dict[str, Any], model: torch.nn.Module, output: Any = None) -> None:
    """:func:`~cleanai_core.job.config.check_unread` for options the model leaves unread:
    ``--bn-samples`` on a model without BatchNorm (nothing to correct) ran without a word;
    so did ``--num-classes 5`` for a model that gives another number of class scores on its
    first sample (a pickled model keeps its own head, and so does a factory that takes no
    ``num_classes``)."""
    from cleanai_core.bn_correction import norms_with_running_stats
    from cleanai_core.runtime import find_logits

    has_bn = bool(norms_with_running_stats(model))
    why = ("is read by the BatchNorm correction, and --model {model!r} has no norm layer with running statistics "
           "(BatchNorm) to correct: leave {flag} out")  # fmt: skip
    logits = find_logits(output) if output is not None else None
    classes = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None  # (N, classes)
    heads = (f"builds the model's head (timm:, torchvision:, a factory taking num_classes), but --model {{model!r}} "
             f"gives {classes} class scores: leave {{flag}} out, or give a model with that head")  # fmt: skip
    check_unread(
        cfg,
        (
            ("bn_samples", lambda c: has_bn, why),
            ("num_classes", lambda c: classes is None or classes == c.get("num_classes"), heads),
        ),
    )


def _input_dtype_hint(example: Any, model: torch.nn.Module) -> str:
    """A sentence when the inputs are integers or booleans and the model computes in floating
    point (int8 / int64 / bool images failed with "expected scalar type Char but found Float"
    and the advice named channels and image size; uint8 images are scaled to [0, 1] already)."""
    t = example if isinstance(example, torch.Tensor) else None
    p = next((q for q in model.parameters() if q.is_floating_point()), None)
    if t is None or t.is_floating_point() or p is None:
        return ""
    return (
        f"The inputs are {str(t.dtype).replace('torch.', '')} values but the model computes in "
        f"{str(p.dtype).replace('torch.', '')}: save floating-point inputs (e.g. x.float(), divided by 255 for "
        "8-bit pixel values) or uint8 images (scaled to [0, 1] when read). "
    )
