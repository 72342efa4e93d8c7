"""Compatibility sweep: prune torchvision / timm models at a uniform ratio and check them.

Every model is built with random weights (``pretrained=False``, ``num_classes=10``),
traced, and a random ``--ratio`` of every prunable group is pruned (the classifier's
outputs are kept: model outputs are always frozen). The pruned model must run, keep its
output shape and match the masking oracle (:func:`cleanai_core.testing.check_pruner`'s
comparison, step by step so that the failing stage is known).

Models run in long-lived worker subprocesses (``--jobs`` of them) with a time limit per
model; a model that crashes its worker or runs too long is recorded and the worker is
replaced (``--fresh-process`` starts one process per model instead). Results are appended to a
JSON-lines cache so a sweep can be resumed or extended, and ``docs/compatibility.md``
is rendered from the cache.

Examples::

    python benchmarks/compat_sweep.py --set torchvision --jobs 2
    python benchmarks/compat_sweep.py --set timm-families --jobs 2
    python benchmarks/compat_sweep.py --set timm --filter 'convnext*' --limit 20
    python benchmarks/compat_sweep.py --set timm --stride 9 --limit 150 --jobs 1 --batch 1
    python benchmarks/compat_sweep.py --render-only

Statuses: ``pass``, ``fail-trace`` (building the dependency graph raised),
``fail-prune`` (slicing raised), ``fail-forward`` (the pruned model does not run),
``fail-shape`` (output shape changed), ``fail-oracle`` (output differs from the masked
original), ``fail-noprune`` (nothing could be pruned), ``skipped-too-big`` (more than
``--max-params`` parameters), ``skipped-too-slow`` (time limit), ``skipped-unsupported``
(the unpruned model cannot be built or run on CPU at this input size).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / "benchmarks" / "compat_results.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DOC = ROOT / "docs" / "compatibility.md"
# written by ``--calibrate`` runs (compat_calibrated.py); the oracle sweep keeps it as it is
CALIB_SECTION = "## Default pruning with calibration batches"
# written by hand from ``python tests/test_hf_corpus.py``; a sweep keeps it as it is
HF_SECTION = "## Hugging Face transformers"
# written by hand (segmentation, detection, video, optical flow and hand-written operations); kept as it is
OTHER_SECTION = "## Other torchvision tasks and hand-written operations"
# written by hand: dated sample sweeps (``--filter`` lists, ``--cache``/``--doc`` elsewhere); kept as it is
SAMPLE_SECTION = "## Sample sweeps"


def _kept_section(doc: Path, title: str = HF_SECTION) -> list[str]:
    """The lines of the section ``title`` of ``doc`` (empty when there is none)."""
    text = doc.read_text() if doc.exists() else ""
    start = text.find(title)
    if start < 0:
        return []
    end = text.find("\n## ", start + len(title))
    return [*text[start : end if end >= 0 else len(text)].rstrip("\n").split("\n"), ""]


SIZES_CACHE = ROOT / "benchmarks" / "timm_param_counts.json"
MAX_SIDE = 224
STATUSES = (
    "pass",
    "fail-trace",
    "fail-prune",
    "fail-forward",
    "fail-shape",
    "fail-oracle",
    "fail-noprune",
    "skipped-too-big",
    "skipped-too-slow",
    "skipped-unsupported",
)


# ---------------------------------------------------------------------------
# Building models (also used by tests/test_corpus.py)
# ---------------------------------------------------------------------------
def build(spec: str, max_side: int = MAX_SIDE, device: str | None = None):
    """``(model, input_size)`` for ``tv:<name>`` or ``timm:<name>`` (random weights,
    10 classes, eval mode). Input side capped at ``max_side`` where the model allows it."""
    model, size, _ = build_with_kwargs(spec, max_side, device)
    return model, size


def build_with_kwargs(spec: str, max_side: int = MAX_SIDE, device: str | None = None):
    """``(model, input_size, kwargs)``: :func:`build`, with the keyword arguments the
    architecture was built with beside ``num_classes`` (what a saved folder must rebuild)."""
    import torch

    lib, name = spec.split(":", 1)
    ctx = torch.device(device) if device else _nullcontext()
    if lib == "tv":
        import torchvision

        size = min(299 if name == "inception_v3" else 224, max_side)
        kwargs = {}
        if name in ("googlenet", "inception_v3"):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = False
        if size < 224 and name.startswith("vit_"):  # positional embeddings sized for the input
            kwargs["image_size"] = size
        with ctx:
            model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
        return model.eval(), (3, size, size), kwargs
    import timm

    cfg = timm.get_pretrained_cfg(name)
    size = tuple(getattr(cfg, "input_size", None) or (3, 224, 224)) if cfg is not None else (3, 224, 224)
    kwargs = {"pretrained": False, "num_classes": 10}
    if max(size[1:]) > max_side:
        scaled = (size[0], min(size[1], max_side), min(size[2], max_side))
        for img_size in (scaled[1:], scaled[1]):
            try:
                with ctx:
                    model = timm.create_model(name, img_size=img_size, **kwargs)
                return model.eval(), scaled, {"img_size": img_size}
            except Exception:
                pass
        # fully convolutional models run at any size
        with ctx:
            model = timm.create_model(name, **kwargs)
        return model.eval(), scaled, {}
    with ctx:
        model = timm.create_model(name, **kwargs)
    return model.eval(), size, {}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def count_params(spec: str) -> int:
    try:
        model, _ = build(spec, device="meta")
    except Exception:  # some initialisers need data
        model, _ = build(spec)
    return sum(p.numel() for p in model.parameters())


def error_text(exc: BaseException) -> str:
    """``Type: message [file:line]`` of an exception, for a record."""
    import traceback

    tb = traceback.extract_tb(exc.__traceback__)
    where = f" [{Path(tb[-1].filename).name}:{tb[-1].lineno}]" if tb else ""
    return f"{type(exc).__name__}: {str(exc)[:400]}{where}"


def sized(spec: str, max_params: int, rec: dict) -> bool:
    """Put the parameter count of ``spec`` into ``rec``; false (with the status set) when
    the model cannot be built or has more than ``max_params`` parameters."""
    try:
        n = count_params(spec)
    except Exception as exc:
        rec.update(status="skipped-unsupported", error="build: " + error_text(exc))
        return False
    rec["params_before"] = n
    if n > max_params:
        rec.update(status="skipped-too-big", error=f"{n / 1e6:.0f}M parameters > {max_params / 1e6:.0f}M")
        return False
    return True


def oracle_tolerance(expected) -> float:
    scale = max((float(t.abs().max()) for t in expected if t.numel()), default=1.0)
    return 1e-3 * max(1.0, scale)


# ---------------------------------------------------------------------------
# One model (runs in a subprocess)
# ---------------------------------------------------------------------------
def check_one(
    spec: str, ratio: float = 0.5, batch: int = 2, max_params: int = 150_000_000, seed: int = 0, side: int = MAX_SIDE
) -> dict:
    import copy

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rec: dict = {"model": spec, "status": None, "error": "", "params_before": None, "params_after": None}
    t0 = time.time()

    err = error_text
    if not sized(spec, max_params, rec):
        return rec
    from cleanai_core.testing import run_model

    try:
        try:
            model, size = build(spec, max_side=side)
            x = torch.randn(batch, *size)
            ref = run_model(model, x)
        except Exception:  # the model needs its default input size
            model, size = build(spec, max_side=100_000)
            x = torch.randn(batch, *size)
            ref = run_model(model, x)
    except Exception as exc:
        rec.update(status="skipped-unsupported", error="unpruned forward: " + err(exc))
        return rec
    rec["input"] = [batch, *size]
    from cleanai_core.graph.dependency import DependencyGraph
    from cleanai_core.slicing import SliceEdit, apply_edits
    from cleanai_core.testing import masked_forward, random_units

    try:
        graph = DependencyGraph(model, x)
    except Exception as exc:
        rec.update(status="fail-trace", error=err(exc))
        return rec
    groups = graph.groups()
    rec["groups"] = len(groups)
    rec["prunable_groups"] = sum(g.prunable > 0 for g in groups)
    rec["unknown_ops"] = dict(graph.ctx.unknown_ops)
    pruned = random_units(graph, ratio, torch.Generator().manual_seed(seed), exclude_normalized=True)
    all_pruned = random_units(graph, ratio, torch.Generator().manual_seed(seed))
    rec["pruned_units"] = int(pruned.sum())
    try:
        expected = masked_forward(graph, pruned, x)
        small = copy.deepcopy(model)
        edits = [SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in graph.keep_indices(pruned).items()]
        apply_edits(small, edits, graph.pm)
        # the uniform-ratio model (normalising groups pruned too): what a user gets
        full = copy.deepcopy(model)
        edits_full = [
            SliceEdit(m, s, k, graph.ctx.slices[(m, s)].dim) for (m, s), k in graph.keep_indices(all_pruned).items()
        ]
        apply_edits(full, edits_full, graph.pm)
    except Exception as exc:
        rec.update(status="fail-prune", error=err(exc))
        return rec
    rec["params_after"] = sum(p.numel() for p in full.parameters())
    try:
        got = run_model(small, x)
        got_full = run_model(full, x)
    except Exception as exc:
        rec.update(status="fail-forward", error=err(exc))
        return rec
    shapes = [tuple(t.shape) for t in ref]
    if [tuple(t.shape) for t in got] != shapes or [tuple(t.shape) for t in got_full] != shapes:
        rec.update(
            status="fail-shape",
            error=f"{shapes} -> {[tuple(t.shape) for t in got_full]}",
        )
        return rec
    diff = max((float((a - b).abs().max()) for a, b in zip(got, expected, strict=True)), default=0.0)
    tol = oracle_tolerance(expected)
    rec["max_abs_diff"] = diff
    rec["tolerance"] = tol
    rec["seconds"] = round(time.time() - t0, 1)
    if not diff <= tol:
        rec.update(status="fail-oracle", error=f"max |pruned - masked| = {diff:.3g} > {tol:.3g}")
        return rec
    if int(all_pruned.sum()) == 0:
        rec.update(status="fail-noprune", error="no prunable group")
        return rec
    rec["status"] = "pass"
    return rec


# ---------------------------------------------------------------------------
# Model lists
# ---------------------------------------------------------------------------
def torchvision_models() -> list[str]:
    import torchvision

    return [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]


def timm_models() -> list[str]:
    import timm

    return [f"timm:{n}" for n in timm.list_models()]


def timm_param_counts() -> dict[str, int]:
    """Parameter counts of every timm model (built on the meta device; cached)."""
    import timm

    counts = json.loads(SIZES_CACHE.read_text()) if SIZES_CACHE.exists() else {}
    missing = [n for n in timm.list_models() if n not in counts]
    for n in missing:
        try:
            counts[n] = count_params(f"timm:{n}")
        except Exception:
            counts[n] = -1
    if missing:
        SIZES_CACHE.write_text(json.dumps(counts, indent=0, sort_keys=True))
    return counts


def timm_families(measure: bool = True) -> list[str]:
    """The smallest model (by parameters) of every module under ``timm.models``.

    Parameter counts are measured once (a few minutes) and cached in
    ``benchmarks/timm_param_counts.json``; with ``measure=False`` and no cache, the first
    model name of every module is taken instead."""
    import timm

    if not measure and not SIZES_CACHE.exists():
        return [
            "timm:" + sorted(timm.list_models(module=m))[0] for m in timm.list_modules() if timm.list_models(module=m)
        ]
    counts = timm_param_counts()
    out = []
    for mod in timm.list_modules():
        names = [n for n in timm.list_models(module=mod) if counts.get(n, -1) > 0]
        if names:
            out.append("timm:" + min(names, key=lambda n: (counts[n], n)))
    return out


def family_of(spec: str) -> str:
    lib, name = spec.split(":", 1)
    if lib == "tv":
        return "torchvision"
    from timm.models import _registry

    return _registry._model_to_module.get(name, "?")


# ---------------------------------------------------------------------------
# Cache and report
# ---------------------------------------------------------------------------
def load_cache(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["model"]] = rec
    return out


class Worker:
    """A long-lived worker process that checks models one after another.

    Importing torch and timm costs about 6 s, as long as checking a typical model, so a
    worker is reused until a model crashes it or runs past ``--timeout`` (then the
    worker is killed, the model recorded, and a fresh worker started for the next one).
    """

    def __init__(self, args):
        self.args = args
        self.proc = None

    def _start(self):
        cmd = [sys.executable, __file__, "--worker", "-", *_worker_args(self.args)]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        self.errors: list[str] = []
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump_err, args=(self.proc.stderr, self.errors), daemon=True).start()
        try:  # the per-model clock starts once the imports are done
            self.lines.get(timeout=300)
        except queue.Empty:
            pass

    @staticmethod
    def _pump(stream, q):
        for line in stream:
            q.put(line)
        q.put(None)

    @staticmethod
    def _pump_err(stream, sink):
        for line in stream:
            sink.append(line)
            del sink[:-20]

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def check(self, spec: str) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        t0 = time.time()
        self.proc.stdin.write(spec + "\n")
        self.proc.stdin.flush()
        deadline = t0 + self.args.timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.time(), 0.01))
            except queue.Empty:
                self.stop()
                return {"model": spec, "status": "skipped-too-slow", "error": f"over {self.args.timeout}s"}
            if line is None:  # the worker died on this model
                self.proc.wait()
                tail = [ln.strip() for ln in self.errors if ln.strip()][-1:] or [f"exit code {self.proc.returncode}"]
                self.proc = None
                return {"model": spec, "status": "skipped-unsupported", "error": "worker crashed: " + tail[0][:300]}
            if line.startswith("{"):
                rec = json.loads(line)
                rec["wall_s"] = round(time.time() - t0, 1)
                return rec


def _worker_args(args) -> list[str]:
    out = ["--ratio", str(args.ratio), "--max-params", str(args.max_params), "--batch", str(args.batch)]
    out += ["--side", str(args.side)] + (["--end-to-end"] if args.end_to_end else [])
    return out + [
        "--calibrate",
        str(args.calibrate),
        "--calib-batch",
        str(args.calib_batch),
        "--calib-side",
        str(args.calib_side),
    ]


def _check(spec: str, args) -> dict:
    """One model: the oracle check, the default path with ``--calibrate`` batches, or
    ``--end-to-end`` (oracle, default path, save / reload, magnitude)."""
    if args.end_to_end:
        from compat_calibrated import check_end_to_end

        return check_end_to_end(
            spec, args.calib_batch, args.calibrate or 2, args.calib_side, args.ratio, max_params=args.max_params
        )
    if args.calibrate:
        from compat_calibrated import check_calibrated

        return check_calibrated(
            spec, args.calib_batch, args.calibrate, args.calib_side, args.ratio, max_params=args.max_params
        )
    return check_one(spec, args.ratio, batch=args.batch, max_params=args.max_params, side=args.side)


def compare(old: dict[str, dict], new: dict[str, dict]) -> list[str]:
    """What changed between two sweeps of the same models: status, parameters kept, and an
    oracle difference that moved past its tolerance (one line per model; empty when none)."""
    out = []
    for m in sorted(old.keys() & new.keys()):
        a, b = old[m], new[m]
        what = []
        if a["status"] != b["status"]:
            what.append(f"status {a['status']} -> {b['status']} ({b.get('error', '')[:120]})")
        if a.get("params_after") != b.get("params_after") and a["status"] == b["status"] == "pass":
            what.append(f"params after {a.get('params_after')} -> {b.get('params_after')}")
        da, db = a.get("max_abs_diff"), b.get("max_abs_diff")
        if da is not None and db is not None and (db > b.get("tolerance", 0) or db > 10 * max(da, 1e-6)):
            what.append(f"oracle diff {da:.2e} -> {db:.2e}")
        if what:
            out.append(f"{m}: " + "; ".join(what))
    for m in sorted(old.keys() - new.keys()):
        out.append(f"{m}: not in the new sweep")
    return out


def run_subprocess(spec: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", spec, *_worker_args(args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": spec, "status": "skipped-too-slow", "error": f"over {args.timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"model": spec, "status": "skipped-unsupported", "error": "worker crashed: " + tail[0][:300]}
    rec = json.loads(lines[-1])
    rec["wall_s"] = round(time.time() - t0, 1)
    return rec


def render(cache: dict[str, dict], doc: Path, note: str = "") -> None:
    recs = sorted(cache.values(), key=lambda r: (not r["model"].startswith("tv:"), r["model"]))
    try:
        families = {r["model"]: family_of(r["model"]) for r in recs}
    except Exception:
        families = {r["model"]: "?" for r in recs}
    fam_sample = set()
    try:
        fam_sample = set(timm_families()) if SIZES_CACHE.exists() else set()
    except Exception:
        pass

    def summary(rows: list[dict]) -> list[str]:
        counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        ran = [r for r in rows if not r["status"].startswith("skipped")]
        passed = counts["pass"]
        pct = f"{100 * passed / len(ran):.1f}%" if ran else "-"
        cells = " | ".join(str(counts[s]) for s in STATUSES)
        return [f"| {len(rows)} | {len(ran)} | {passed} | {pct} | {cells} |"]

    head = "| models | ran | pass | pass % of ran | " + " | ".join(STATUSES) + " |"
    sep = "|" + "---|" * (4 + len(STATUSES))
    lines = [
        "# Compatibility",
        "",
        "Generated by `benchmarks/compat_sweep.py` (do not edit by hand). Every model is built with random",
        "weights (`pretrained=False`, 10 classes), traced on a random input (`--batch`, see below; the model's default",
        f"input size capped at {MAX_SIDE} where the model allows it), then a random 50% of every prunable",
        "group is pruned (model outputs, hence the classifier's, are kept). A model passes when the pruned",
        "model runs, keeps its output shape and matches the masking oracle within 1e-3 x max(1, |output|)",
        "(groups that normalise across channels, LayerNorm/GroupNorm/RMS norms and the inputs of weight-standardised",
        "convolutions, are pruned for the parameter count but left out of the oracle comparison, as in",
        "`cleanai_core.testing.check_pruner`).",
        "",
        "`pass %` is over the models that ran (built and ran unpruned on CPU, not too big or too slow).",
        "",
    ]
    if note:
        lines += [note, ""]
    lines += ["## Summary", "", "| set " + head, "|---" + sep]
    sets = [
        ("torchvision classification", [r for r in recs if r["model"].startswith("tv:")]),
        ("timm, one model per family", [r for r in recs if r["model"] in fam_sample]),
        ("timm, all models run", [r for r in recs if r["model"].startswith("timm:")]),
    ]
    for title, rows in sets:
        if rows:
            lines.append(f"| {title} " + summary(rows)[0])
    lines += ["", "## Failures by cause", ""]
    causes: dict[str, list[str]] = {}
    for r in recs:
        if r["status"] != "pass":
            key = f"{r['status']}: {_short(r.get('error', ''))}"
            causes.setdefault(key, []).append(r["model"])
    for key, models in sorted(causes.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(models[:12]) + (f" ... (+{len(models) - 12})" if len(models) > 12 else "")
        lines.append(f"- **{len(models)}** {key.replace('|', '/')} - {shown}")
    lines += [""]
    for title in (SAMPLE_SECTION, CALIB_SECTION, HF_SECTION, OTHER_SECTION):
        lines += _kept_section(doc, title)
    lines += [
        "## Models",
        "",
        "| model | family | status | params before | params after (uniform 0.5) | kept | oracle diff | run | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        pb, pa = r.get("params_before"), r.get("params_after")
        kept = f"{pa / pb:.2f}" if pb and pa else ""
        diff = f"{r['max_abs_diff']:.1e}" if r.get("max_abs_diff") is not None else ""
        note = r.get("error", "") if r["status"] != "pass" else ""
        note = note.replace("|", "/").replace("\n", " ")[:300]
        lines.append(
            f"| {r['model']} | {families.get(r['model'], '')} | {r['status']} | {_m(pb)} | {_m(pa)} | {kept} "
            f"| {diff} | {r.get('run', '')} | {note} |"
        )
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")


def _short(msg: str) -> str:
    """The cause of a failure with numbers and shapes blanked, so that alike failures group."""
    msg = re.sub(r"\d+", "N", msg.split(" [")[0])
    return msg[:160]


def _m(n) -> str:
    return f"{n / 1e6:.2f}M" if n else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", choices=["torchvision", "timm", "timm-families", "all"], default="torchvision")
    p.add_argument("--filter", default=None, help="fnmatch pattern(s) on model names, comma separated")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--stride", type=int, default=1, help="every n-th selected model (a spread-out sample)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=int, default=180, help="seconds per model")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--side", type=int, default=MAX_SIDE, help="input side cap where the model runs at it (oracle runs)")
    p.add_argument("--max-params", type=int, default=150_000_000)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--doc", type=Path, default=DEFAULT_DOC)
    p.add_argument("--rerun", default=None, help="rerun cached models with these statuses (comma separated, or 'all')")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--fresh-process", action="store_true", help="one new process per model (slower, fully isolated)")
    p.add_argument("--note", default="", help="text placed above the summary (which models were run)")
    p.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="N",
        help="run the default user path instead of the oracle: StructuredPruner defaults, collect_activations on N "
        "random batches, prune() (see benchmarks/compat_calibrated.py; cache benchmarks/results/calib_bB.jsonl)",
    )
    p.add_argument(
        "--end-to-end",
        action="store_true",
        help="per model: the oracle, the default path (--calibrate batches, 2 by default), save_pruned / load_pruned "
        "and magnitude, constant parameters redrawn (compat_calibrated.check_end_to_end); give --cache",
    )
    p.add_argument("--calib-batch", type=int, default=1, metavar="B", help="inputs per calibration batch")
    p.add_argument("--calib-side", type=int, default=64, help="input side where the model runs at it")
    p.add_argument("--compare", type=Path, default=None, help="print what changed from this cache to --cache; no run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.end_to_end and args.cache == DEFAULT_CACHE and not args.worker:
        p.error("--end-to-end records go to a file of their own: give --cache")
    if args.calibrate and args.cache == DEFAULT_CACHE:
        args.cache = RESULTS / f"calib_b{args.calib_batch}.jsonl"

    if args.worker == "-":  # a long-lived worker: one model name per line on stdin
        import gc

        import timm  # noqa: F401  (imported before the clock of the first model starts)

        import cleanai_core.testing  # noqa: F401

        print("ready", flush=True)
        for line in sys.stdin:
            rec = _check(line.strip(), args)
            print(json.dumps(rec), flush=True)
            gc.collect()
        return 0
    if args.worker:
        rec = _check(args.worker, args)
        print(json.dumps(rec))
        return 0
    if args.compare:
        changes = compare(load_cache(args.compare), load_cache(args.cache))
        print("\n".join(changes) or f"no change from {args.compare} to {args.cache}")
        return 1 if changes else 0
    cache = load_cache(args.cache)
    if not args.render_only:
        if args.set == "torchvision":
            models = torchvision_models()
        elif args.set == "timm":
            models = timm_models()
        elif args.set == "timm-families":
            models = timm_families()
        else:
            models = torchvision_models() + timm_models()
        if args.filter:
            pats = args.filter.split(",")
            models = [m for m in models if any(fnmatch.fnmatch(m.split(":", 1)[1], q) for q in pats)]
        models = models[:: max(args.stride, 1)]
        rerun = set((args.rerun or "").split(",")) if args.rerun else set()
        todo = [m for m in models if m not in cache or "all" in rerun or cache[m]["status"] in rerun][args.offset :]
        if args.limit is not None:
            todo = todo[: args.limit]
        print(f"{len(todo)} models to run ({len(models)} selected, {len(cache)} cached)", flush=True)
        sizes = json.loads(SIZES_CACHE.read_text()) if SIZES_CACHE.exists() else {}
        workers: queue.Queue = queue.Queue()
        for _ in range(args.jobs):
            workers.put(Worker(args))

        def run(spec: str) -> dict:
            n = sizes.get(spec.split(":", 1)[1], 0) if spec.startswith("timm:") else 0
            if n > args.max_params:  # known from the cached counts: no need to start a worker
                msg = f"{n / 1e6:.0f}M parameters > {args.max_params / 1e6:.0f}M"
                return {"model": spec, "status": "skipped-too-big", "error": msg, "params_before": n}
            if args.fresh_process:
                return run_subprocess(spec, args)
            w = workers.get()
            try:
                return w.check(spec)
            finally:
                workers.put(w)

        with ThreadPoolExecutor(args.jobs) as pool, open(args.cache, "a") as fh:
            for i, rec in enumerate(pool.map(run, todo)):
                cache[rec["model"]] = rec
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                print(f"[{i + 1}/{len(todo)}] {rec['model']}: {rec['status']} {rec.get('error', '')[:200]}", flush=True)
        while not workers.empty():
            workers.get().stop()
    if args.end_to_end:
        pass  # recorded in --cache; summarised by hand in the sample sweeps
    elif args.calibrate:
        _render_calibrated(args)
    else:
        render(cache, args.doc, args.note)
    return 0


def _render_calibrated(args) -> None:
    """The calibration section of ``--doc`` from every ``calib_b*.jsonl`` beside ``--cache``."""
    from compat_calibrated import render_calibrated

    caches = {int(f.stem[len("calib_b") :]): load_cache(f) for f in args.cache.parent.glob("calib_b*.jsonl")}
    names = {m for c in caches.values() for m in c}
    fams = set(timm_families())
    sets = [
        ("torchvision classification", {m for m in names if m.startswith("tv:")}),
        ("timm, one model per family", names & fams),
        ("timm, other models (sample)", {m for m in names if m.startswith("timm:")} - fams),
    ]
    render_calibrated(caches, args.doc, sets, args.note)


if __name__ == "__main__":
    sys.exit(main())
