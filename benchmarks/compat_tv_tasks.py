"""torchvision segmentation, detection, video and optical-flow builders: oracle, pruner, full
forward, save/load.

For each builder (random weights, ``weights=None, weights_backbone=None``, eval mode): the
masking oracle on a random half of every exact group (``check_pruner``), then
``StructuredPruner(..., "magnitude", pruning_ratio=0.5).prune()`` (``--importance default``: the
default activation-aware path, calibrated on the input); the pruned model must run
its *whole* forward (detection: the post-processed detections, whose number may change), keep
the traced outputs' shapes, and come back from ``save_pruned`` / ``load_pruned`` with the same
outputs. Detection models are traced through ``forward_fn`` (their eval output is a list of
detections): the backbone and the dense head (RetinaNet, FCOS, SSD), or for R-CNN the backbone,
the RPN head and every ROI head on three fixed boxes per image. RAFT: two images, 2 flow updates.

    python benchmarks/compat_tv_tasks.py [--filter NAME,...] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback


def _dense_head(m, x):
    return m.head(list(m.backbone(x).values()))


def _rcnn_heads(m, x):
    """Backbone, RPN head and every ROI head (box, mask, keypoint) on three fixed boxes per
    image: what the eval model computes for its proposals, without the post-processing."""
    import torch

    feats = m.backbone(x)
    objectness, deltas = m.rpn.head(list(feats.values()))
    b, _, h, w = x.shape
    boxes = [torch.tensor([[0.0, 0.0, w / 2, h / 2], [w / 4, h / 4, 3 * w / 4, 3 * h / 4], [0.0, 0.0, w, h]])] * b
    sizes, rh = [(h, w)] * b, m.roi_heads
    outs = [*objectness, *deltas, *rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, boxes, sizes)))]
    if rh.has_mask():
        outs.append(rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats, boxes, sizes))))
    if rh.has_keypoint():
        outs.append(rh.keypoint_predictor(rh.keypoint_head(rh.keypoint_roi_pool(feats, boxes, sizes))))
    return outs


def _flow(m, x):
    return m(*x, num_flow_updates=2)[-1]


def cases():
    """``name -> (kwargs, input shape, forward_fn, output_transform)``; a RAFT input is a
    pair of images (``(2, *shape)``)."""
    import torchvision

    tv = torchvision.models
    out = {}
    for name in tv.list_models(module=tv.segmentation):
        out[name] = ({"num_classes": 4}, (3, 64, 64), None, lambda o: o["out"])
    for name in tv.list_models(module=tv.detection):
        fn = _rcnn_heads if "rcnn" in name else _dense_head
        side = 128 if "ssd300" not in name else 300
        out[name] = ({"num_classes": 2 if "keypoint" in name else 3}, (3, side, side), fn, None)
    for name in tv.list_models(module=tv.video):
        shape = (3, 16, 224, 224) if name.startswith(("s3d", "mvit")) else (3, 4, 56, 56)
        out[name] = ({"num_classes": 5}, shape, None, None)
    for name in tv.list_models(module=tv.optical_flow):
        out[name] = ({}, (3, 128, 128), _flow, None)
    return out


def check(name: str, spec, importance: str = "magnitude") -> dict:
    import torch
    import torchvision

    from cleanai_core import StructuredPruner, load_pruned
    from cleanai_core.io import save_pruned
    from cleanai_core.testing import check_pruner, run_model

    kwargs, shape, fn, transform = spec
    torch.manual_seed(0)
    flow = fn is _flow
    video = len(shape) == 4
    options = kwargs if flow or video else {"weights_backbone": None, **kwargs}
    model = torchvision.models.get_model(name, weights=None, **options).eval()
    batch = 1 if shape[1] == 16 else 2  # 16 x 224 x 224 clips: one
    x = (torch.rand(batch, *shape), torch.rand(batch, *shape)) if flow else torch.randn(batch, *shape)
    before = sum(p.numel() for p in model.parameters())
    rec = {"model": f"tv:{name}", "input": [batch, *shape], "params_before": before}
    t0 = time.time()
    try:
        graph_kw = {"output_transform": transform} if transform else {}
        rep = check_pruner(model, x, ratio=0.5, forward_fn=fn, **graph_kw)
        ref = run_model(model, x, fn, transform)
        tol = 1e-3 * max(1.0, max(float(t.abs().max()) for t in ref))
        rec.update(max_abs_diff=rep.max_abs_diff, tolerance=tol)
        if not rep.max_abs_diff <= tol:
            return {**rec, "status": "fail-oracle", "error": f"{rep.max_abs_diff:.3g} > {tol:.3g}"}
        if importance == "default":  # weight magnitude x activation, calibrated on two batches
            pruner = StructuredPruner(model, x, pruning_ratio=0.5, forward_fn=fn, **graph_kw)
            pruner.collect_activations([(x, None)] * 2, progress=False)  # (inputs, label): x may be a pair
        else:
            pruner = StructuredPruner(model, x, importance, pruning_ratio=0.5, forward_fn=fn, **graph_kw)
        small = pruner.prune()
        rec["params_after"] = sum(p.numel() for p in small.parameters())
        got = run_model(small, x, fn, transform)
        if [t.shape for t in got] != [t.shape for t in ref]:
            return {**rec, "status": "fail-shape", "error": f"{[t.shape for t in got]}"}
        detection = fn is not None and not flow
        with torch.no_grad():  # the whole model, as a user calls it
            whole = small([img for img in torch.rand(2, *shape)]) if detection else small(*x) if flow else small(x)
        with tempfile.TemporaryDirectory() as tmp:
            save_pruned(tmp, small, pruner.history, f"torchvision:{name}", options=kwargs)
            back = load_pruned(tmp)
        again = run_model(back, x, fn, transform)
        diff = max(float((a - b).abs().max()) for a, b in zip(got, again, strict=True))
        if diff > 1e-5:
            return {**rec, "status": "fail-reload", "error": f"reloaded outputs differ by {diff:.3g}"}
        rec["whole_forward"] = type(whole).__name__
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" [{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}]" if tb else ""
        return {**rec, "status": "fail", "error": f"{type(exc).__name__}: {str(exc)[:300]}{where}"}
    rec["seconds"] = round(time.time() - t0, 1)
    return {**rec, "status": "pass"}


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--filter", default=None, help="builder names, comma separated")
    p.add_argument("--out", default=None, help="append one JSON line per model here")
    p.add_argument(
        "--importance",
        default="magnitude",
        help="criterion of the pruner step; 'default': the default path, calibrated on the input twice",
    )
    p.add_argument("--side", type=int, default=None, help="image side (last two dimensions) instead of each case's")
    p.add_argument(
        "--importance-list", default=None, help="criteria run in turn on each model, comma separated (as --importance)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    todo = cases()
    if args.side:
        todo = {k: (kw, (*shape[:-2], args.side, args.side), fn, tr) for k, (kw, shape, fn, tr) in todo.items()}
    names = args.filter.split(",") if args.filter else sorted(todo)
    criteria = args.importance_list.split(",") if args.importance_list else [args.importance]
    for name in names:
        for importance in criteria:
            rec = {**check(name, todo[name], importance), "importance": importance}
            line = json.dumps(rec)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
