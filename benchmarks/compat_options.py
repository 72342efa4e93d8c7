"""Options sweep: torchvision / timm classification models at small image sizes, each pruned with
another criterion, ranking, ``round_to`` and ratio (drawn per model), then run, saved and
reloaded. One JSON line per model (``kept``: parameters kept; ``reload``: largest output
difference after ``save_pruned`` / ``load_pruned``, 0 expected).

Example::

    python benchmarks/compat_options.py resnet18,mnasnet0_5 benchmarks/results/options.jsonl
    python benchmarks/compat_options.py timm:resnet18,timm:vit_tiny_patch16_224 options.jsonl

A bare name is a torchvision builder; ``timm:<name>`` is built as ``compat_sweep.py`` builds it
(``img_size`` for the small side where the model needs one).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
import traceback
import warnings

CRITERIA = ["weight_activation", "magnitude", "taylor", "lamp", "bn_scale", "random"]


def check(i: int, name: str) -> dict:
    import torch
    import torchvision

    from cleanai_core import StructuredPruner, load_pruned
    from cleanai_core.io import save_pruned
    from cleanai_core.testing import run_model

    rnd = random.Random(i)
    side = rnd.choice([32, 48])
    opts = {
        "importance": CRITERIA[i % len(CRITERIA)],
        "global_pruning": bool(i % 2),
        "round_to": rnd.choice([None, 4, 8]),
        "pruning_ratio": rnd.choice([0.3, 0.5, 0.7]),
    }
    lib, name = name.split(":", 1) if ":" in name else ("tv", name)
    rec: dict = {"model": f"{lib}:{name}", "side": side, **opts}
    t = time.time()
    try:
        torch.manual_seed(0)
        if lib == "timm":
            from compat_sweep import build_with_kwargs

            model, size, kw = build_with_kwargs(rec["model"], side)
            kw = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
            shape = tuple(size)
        else:
            shape = (3, side, side)
            kw = {"aux_logits": True, "init_weights": False} if name.startswith(("inception", "googlenet")) else {}
            model = torchvision.models.get_model(name, weights=None, num_classes=10, **kw).eval()
        rec["side"] = list(shape[1:])
        x = torch.randn(2, *shape)
        try:
            ref = run_model(model, x)
        except RuntimeError as exc:  # too small an image for the model (AlexNet's pools at 32 px)
            return {**rec, "status": "skipped-unsupported", "error": f"unpruned forward: {str(exc)[:200]}"}
        n = sum(p.numel() for p in model.parameters())
        imp = opts.pop("importance")
        p = StructuredPruner(model, x, None if imp == "weight_activation" else imp, **opts)
        if imp in ("weight_activation", "taylor"):  # these read calibration data (taylor: labels)
            data = [(torch.randn(2, *shape), torch.randint(0, 10, (2,))) for _ in range(2)]
            p.collect_activations(data, progress=False)
        small = p.prune()
        got = run_model(small, x)
        rec["kept"] = round(sum(q.numel() for q in small.parameters()) / n, 4)
        rec["shape_ok"] = [a.shape for a in got] == [a.shape for a in ref]
        options = {"num_classes": 10, **({"model_kwargs": kw} if kw else {})}
        with tempfile.TemporaryDirectory() as tmp:
            save_pruned(f"{tmp}/o", small, p.history, ("timm:" if lib == "timm" else "torchvision:") + name, options)
            back = load_pruned(f"{tmp}/o", trust_code=bool(kw))
        rec["reload"] = max(float((a - b).abs().max()) for a, b in zip(run_model(back, x), got, strict=True))
        rec["status"] = "pass" if rec["shape_ok"] and rec["reload"] == 0 else "fail"
    except Exception as exc:
        rec.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:300]}", where=traceback.format_exc()[-400:])
    rec["seconds"] = round(time.time() - t, 1)
    return rec


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    names, path = argv[0].split(","), argv[1]
    with open(path, "a") as out:
        for i, name in enumerate(names):
            rec = check(i, name)
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(json.dumps(rec)[:300], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
