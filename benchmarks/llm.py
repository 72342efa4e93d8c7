"""LLM quality without retraining (issue #15).

Trains two small Llama-style causal LMs on the CPU (4 layers, hidden 256, 8 heads, MLP
768, byte-level vocabulary of 259; full multi-head attention ``mha`` and grouped-query
attention ``gqa`` with 2 KV heads) on Python's own documentation (see
``benchmarks/llm_corpus.py``; checkpoints cached under ``benchmarks/.cache/llm/``), then
removes 20% and 50% of the **block parameters** (attention + MLP weights of the decoder
layers) without retraining and reports held-out perplexity for:

- ``ours``: the default (weight_activation, bias compensation + least-squares
  reconstruction), uniform per-layer ratio;
- ``ours, no LS``: bias compensation only (no least-squares reconstruction);
- ``ours, adaptive`` / ``ours, adaptive, no LS``: global ranking across layers;
- ``magnitude``: weight magnitude only, uniform, no compensation;
- ``Wanda-sp-like``: ``||W[:, j]|| * ||X_j||`` per unit (weight_activation on the second
  moment), uniform, no compensation;
- ``FLAP-like``: ``||W[:, j]||^2 * Var(X_j)`` (weight_activation, alpha = beta = 1, on the
  variance), z-scored per group and ranked globally (adaptive per layer), bias
  compensation;
- hidden-size (embedding dimension) pruning alone, magnitude vs ours, at the same shares
  of the hidden size;
- on ``gqa`` only, the two ways to shrink grouped-query attention at the same parameter
  count: whole KV groups (the default rows) and ``ours, query heads per group`` (the
  ``cleanai_plugins.zoo.transformers_gqa`` plugin: every KV head kept, each group loses
  the same query heads), uniform and adaptive.

Every configuration is expressed with StructuredPruner options; the block-parameter
share is hit with ``target_params``. Calibration: 64 blocks of 128 bytes from the
calibration split; perplexity on 96 held-out blocks (12,192 predicted bytes), both
disjoint from training.

Run::

    python benchmarks/llm.py            # trains (first run) and writes the table to stdout
    python benchmarks/llm.py --quick    # mha only, fewer configurations
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_corpus as corpus  # noqa: E402

from cleanai_core import StructuredPruner, WeightActivationImportance  # noqa: E402
from cleanai_core.metrics import count_params  # noqa: E402
from cleanai_core.plugins import make_plugin_manager, set_plugin_manager, temporary_plugin  # noqa: E402
from cleanai_plugins.io.hf import cleanai_evaluate  # noqa: E402
from cleanai_plugins.zoo import transformers_gqa  # noqa: E402

CALIB_BLOCKS, EVAL_BLOCKS, BATCH = 64, 96, 16
FRACTIONS = (0.2, 0.5)
ATTENTION = ("*q_proj", "*k_proj", "*v_proj")
HEAD_MLP = (*ATTENTION, "*gate_proj", "*up_proj")


def _wa(**kw):
    return WeightActivationImportance(**kw)


#: name -> (importance factory, StructuredPruner options)
CONFIGS = {
    "ours (default)": (_wa, dict(bias_compensation=True, reconstruction=True)),
    "ours, no LS": (_wa, dict(bias_compensation=True, reconstruction=False)),
    "ours, adaptive": (_wa, dict(bias_compensation=True, reconstruction=True, global_pruning=True)),
    "ours, adaptive, no LS": (_wa, dict(bias_compensation=True, reconstruction=False, global_pruning=True)),
    "magnitude": ("magnitude", dict(bias_compensation=False, reconstruction=False)),
    "Wanda-sp-like": (
        lambda: _wa(statistic="second_moment"),
        dict(bias_compensation=False, reconstruction=False),
    ),
    "FLAP-like": (
        lambda: _wa(weight_ratio=1.0, activation_ratio=1.0, statistic="variance"),
        dict(bias_compensation=True, reconstruction=False, global_pruning=True, normalizer="gaussian"),
    ),
}
QUICK = ("ours (default)", "ours, no LS", "magnitude", "Wanda-sp-like", "FLAP-like")
#: grouped-query attention only: the same configurations with query heads per group
PER_GROUP = ("ours (default)", "ours, adaptive")
HIDDEN = {
    "magnitude": ("magnitude", dict(bias_compensation=False, reconstruction=False)),
    "ours (default)": (_wa, dict(bias_compensation=True, reconstruction=True)),
}


def block_params(model) -> int:
    """Attention and MLP weights (and biases) of the decoder layers."""
    return sum(
        p.numel() for n, p in model.named_parameters() if ".layers." in n and (".self_attn." in n or ".mlp." in n)
    )


def perplexity(model, blocks: torch.Tensor) -> float:
    loader = DataLoader([{"input_ids": b, "labels": b} for b in blocks], batch_size=BATCH)
    return cleanai_evaluate(model.eval(), loader, torch.device("cpu"))["perplexity"]


def prune(model, calib: torch.Tensor, importance, options: dict, ignore=(), **target) -> torch.nn.Module:
    imp = importance() if callable(importance) else importance
    pruner = StructuredPruner(model, calib[:2], imp, ignored_layers=[model.lm_head, *ignore], **options, **target)
    pruner.collect_activations(DataLoader(calib, batch_size=BATCH), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pruner.prune()


def run_model(kind: str, names: tuple[str, ...], hidden: bool, log) -> list[dict]:
    model = corpus.trained(kind, log=log)
    data = corpus.splits()
    calib, held = corpus.blocks(data["calib"], CALIB_BLOCKS), corpus.blocks(data["heldout"], EVAL_BLOCKS)
    ignore = attention_ignores(model, calib, kind, log)
    total, block = count_params(model), block_params(model)
    dense = perplexity(model, held)
    log(f"[{kind}] dense perplexity {dense:.3f}; {block} block params of {total}")
    rows = [dict(model=kind, method="dense", fraction=0.0, removed=0.0, ppl=dense)]

    def record(method, frac, make):
        t0 = time.time()
        try:
            pruned = make()
        except Exception as exc:  # one failing configuration must not end the table
            log(f"[{kind}] {method} @ {frac:.0%}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
            rows.append(dict(model=kind, method=method, fraction=frac, removed=None, ppl=None, error=str(exc)[:200]))
            return
        removed = 1 - block_params(pruned) / block
        ppl = perplexity(pruned, held)
        log(
            f"[{kind}] {method} @ {frac:.0%}: block params removed {removed:.1%}, ppl {ppl:.3f} "
            f"({time.time() - t0:.0f}s)"
        )
        rows.append(dict(model=kind, method=method, fraction=frac, removed=removed, ppl=ppl))

    for frac in FRACTIONS:
        keep = 1 - frac * block / total  # the block share, as a share of all parameters
        for name in names:
            imp, opts = CONFIGS[name]
            record(name, frac, lambda: prune(model, calib, imp, opts, ignore, target_params=keep))
        for name in [n for n in PER_GROUP if n in names] if kind == "gqa" else []:
            imp, opts = CONFIGS[name]
            record(
                f"{name.replace(' (default)', '')}, query heads per group",
                frac,
                lambda: _per_group(model, calib, imp, opts, keep),
            )
    if hidden:
        for frac in FRACTIONS:
            for name, (imp, opts) in HIDDEN.items():
                ignore = dict(opts)
                record(
                    f"hidden size, {name}",
                    frac,
                    lambda: _prune_hidden(model, calib, imp, ignore, frac),
                )
    return rows


def attention_ignores(model, calib, kind: str, log) -> tuple[str, ...]:
    """``()`` when the attention traces and its heads can be pruned; otherwise (grouped-query
    attention before the graph side of issue #15 lands) switch to eager attention and keep
    the attention projections, so that the MLPs alone carry the block-parameter target."""
    try:
        StructuredPruner(model, calib[:1])
        return ()
    except Exception as exc:
        log(f"[{kind}] attention does not trace ({type(exc).__name__}: {str(exc)[:120]}); MLP-only pruning")
    model.set_attn_implementation("eager")
    StructuredPruner(model, calib[:1], ignored_layers=[model.lm_head, *ATTENTION])
    return ATTENTION


def _per_group(model, calib, importance, options, keep):
    """Grouped-query attention keeps its KV heads; each group loses the same query heads."""
    with temporary_plugin(transformers_gqa, name="transformers_gqa"):
        return prune(model, calib, importance, options, target_params=keep)


def _prune_hidden(model, calib, importance, options, frac):
    """Only the hidden size: heads and MLP widths ignored, and the plugin that keeps the
    hidden size of transformers models by default disabled."""
    imp = importance() if callable(importance) else importance
    set_plugin_manager(make_plugin_manager(disabled=["cleanai_plugins.zoo.transformers_hidden"]))
    try:
        pruner = StructuredPruner(
            model, calib[:2], imp, pruning_ratio=frac, ignored_layers=[model.lm_head, *HEAD_MLP], **options
        )
        pruner.collect_activations(DataLoader(calib, batch_size=BATCH), progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pruner.prune()
    finally:
        set_plugin_manager(None)


def table(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    kinds = list(dict.fromkeys(r["model"] for r in rows))
    head = "| method |" + "".join(f" {k} 20% | {k} 50% |" for k in kinds)
    lines = [head, "|---|" + "---:|---:|" * len(kinds)]
    dense = {r["model"]: r["ppl"] for r in rows if r["method"] == "dense"}
    lines.append("| dense (unpruned) |" + "".join(f" {dense[k]:.3f} | {dense[k]:.3f} |" for k in kinds))
    for m in methods:
        cells = []
        for k in kinds:
            for f in FRACTIONS:
                r = next((r for r in rows if r["model"] == k and r["method"] == m and r["fraction"] == f), None)
                if r is None:
                    cells.append("—")
                elif r["ppl"] is None:
                    cells.append("fails")
                else:
                    cells.append(f"{r['ppl']:.3f} ({100 * r['removed']:.0f}%)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="mha only, fewer configurations, no hidden-size rows")
    ap.add_argument("--models", default="mha,gqa", help="comma-separated: mha, gqa")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    ap.add_argument("--merge", nargs="+", metavar="FILE", help="only print one table from rows written by --json")
    args = ap.parse_args()
    if args.merge:
        print(table([r for f in args.merge for r in json.loads(Path(f).read_text())]))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    kinds = ["mha"] if args.quick else args.models.split(",")
    names = QUICK if args.quick else tuple(CONFIGS)
    rows = []
    t0 = time.time()
    for kind in kinds:
        rows += run_model(kind, names, hidden=not args.quick, log=log)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n{time.time() - t0:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if any(r["ppl"] is not None and not math.isfinite(r["ppl"]) for r in rows):
        print("note: some perplexities are not finite")


if __name__ == "__main__":
    main()
