"""Measurements: parameters, FLOPs, latency, accuracy."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

try:  # the mode torch's FLOP counter dispatches through (private; :func:`_counting` does without it)
    from torch.utils.flop_counter import _FlopCounterMode
except ImportError:  # pragma: no cover - another torch
    _FlopCounterMode = None

from cleanai_core.errors import UserError, shown
from cleanai_core.model_state import preserved
from cleanai_core.options import check_callables, input_tensors, plain_number
from cleanai_core.runtime import call_model, copied_inputs
from cleanai_core.shapes import ShapeOnlyMode

__all__ = [
    "FlopsOfCopies",
    "call_model",
    "count_flops",
    "count_params",
    "ctc_errors",
    "edit_distance",
    "eval_mode",
    "measure_latency",
    "perplexity",
]


def _check_measured(who: str, model: Any, inputs: Any = None, forward_fn: Any = None, runs: bool = True) -> None:
    """A :class:`UserError` naming the argument of the public measuring function ``who``
    that is out of form, before anything runs: a model that is no module raised
    ``AttributeError: 'str' object has no attribute 'parameters'``, inputs of NumPy arrays
    or ``None`` conv2d's "received an invalid combination of arguments" (with a
    ``forward_fn``, the inputs are whatever it takes)."""
    if not isinstance(model, nn.Module):
        raise UserError(f"{who} needs a torch.nn.Module, got {shown(model)}")
    if not runs:
        return
    check_callables(forward_fn=forward_fn)
    if forward_fn is None:
        input_tensors(inputs, f"{who}'s inputs")


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    _check_measured("count_params", model, runs=False)
    return sum(p.numel() for p in model.parameters())


def perplexity(nll: float, tokens: float) -> float:
    """``exp`` of the mean negative log-likelihood per token; ``inf`` where that exceeds the
    float range (a mean over 709.8 nats: a wrecked model's logits of 1e4). ``math.exp``
    raised ``OverflowError: math range error`` there, which the command line reported as
    "the pruned model failed on the held-out part of --data" (the model had run)."""
    mean = nll / max(tokens, 1.0)
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf


def ctc_errors(logits: torch.Tensor, labels: torch.Tensor, blank: int | None) -> tuple[int, int]:
    """Greedy CTC decoding of each row of ``logits`` (N, T, V) (the best token per frame,
    repeats merged, the blank left out: ``pad_token_id``, as transformers' CTC loss takes
    it) against its ``labels`` (N, L) (``-100`` padding left out): the summed edit
    distances and the labels' length, whose ratio is the token error rate."""
    best = logits.argmax(-1).cpu()
    blank = 0 if blank is None else int(blank)
    wrong = count = 0
    for row, want in zip(best, labels.cpu(), strict=True):
        said = [int(t) for t in torch.unique_consecutive(row) if int(t) != blank]
        ref = [int(t) for t in want if int(t) != -100]
        wrong, count = wrong + edit_distance(said, ref), count + len(ref)
    return wrong, count


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance: insertions, deletions and substitutions, one each."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run in eval mode and restore every module's own mode, buffers and attributes
    afterwards (see :mod:`cleanai_core.model_state`)."""
    with preserved(model):
        yield model


def _vector_flops(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``mv`` / ``dot``: one multiply-add per element of the matrix (or vector)."""
    return 2 * math.prod(a_shape)


def _added_vector_flops(c_shape: Any, a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
    """``addmv``: the product's multiply-adds (the addition is not counted, as for ``addmm``)."""
    return 2 * math.prod(a_shape)


def _trilinear_flops(
    i1: Any, i2: Any, i3: Any, expand1: Any, expand2: Any, expand3: Any, *args: Any, out_shape: Any = None, **kw: Any
) -> int:
    """``_trilinear`` (``nn.Bilinear``: ``x1 W x2``): a multiply-add per point of the space
    the three operands span once their ``expand`` dims are inserted (N x out x in1 x in2)."""
    spans = []
    for shape, expand in ((i1, expand1), (i2, expand2), (i3, expand3)):
        shape = list(shape)
        for d in sorted(expand):
            shape.insert(d, 1)
        spans.append(shape)
    return 2 * math.prod(max(sizes) for sizes in zip(*spans, strict=True))


def _summed_batch_flops(c_shape: Any, a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
    """``addbmm`` (``(b, n, m) @ (b, m, p)`` summed over the batch): the batch's products'
    multiply-adds, as ``baddbmm`` (the additions are not counted)."""
    b, n, m = a_shape
    return 2 * b * n * m * b_shape[-1]


def _int_mm_flops(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``_int_mm`` (an int8 matrix product, ``torch.ao`` dynamic quantisation): as ``mm``."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _grouped_flops(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``_grouped_mm`` (and ``_scaled_grouped_mm``): the experts of a mixture-of-experts
    layer (``transformers`` 5 runs Mixtral's, Qwen-MoE's, OLMoE's experts as one call):
    one multiply-add per output element and step of the contracted dim. Tokens sorted by
    expert ``(rows, K)`` times ``(experts, K, N)`` make ``2 x rows x K x N``; two 2-D
    operands grouped along K (``(M, total K)`` times ``(total K, N)``) make
    ``2 x M x total K x N``. Each expert's FLOPs counted 0: a tiny Mixtral counted 239,616
    of its 829,440."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


_aten = torch.ops.aten
#: products PyTorch's counter has no formula for: a matrix times a vector (attention pooling
#: with a learned query, ``x @ self.q``), two vectors, ``nn.Bilinear``'s ``_trilinear``, a
#: batch of products summed (``addbmm``), an int8 product (``_int_mm``) and the grouped products
#: of mixture-of-experts layers (``_grouped_mm``) (each counted 0 FLOPs)
EXTRA_FLOP_FORMULAS = {
    _aten.mv: _vector_flops,
    _aten.dot: _vector_flops,
    _aten.vdot: _vector_flops,
    _aten.addmv: _added_vector_flops,
    _aten._trilinear: _trilinear_flops,
    _aten.addbmm: _summed_batch_flops,
    _aten._int_mm: _int_mm_flops,
    **{op: _grouped_flops for op in (getattr(_aten, n, None) for n in ("_grouped_mm", "_scaled_grouped_mm")) if op},
}


class _TotalOnly:
    """In place of the FLOP counter's module tracker, whose global module hooks keep the
    per-module breakdown that nothing here reads: every count goes to the total. The
    tracker was 5.5 of the 35 ms of a count of EfficientNet-B0 at one thread (and of an
    in-place data-free ``prune()``, which counts the original's FLOPs before changing it)."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _TotalOnly:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """PyTorch's FLOP counter with :data:`EXTRA_FLOP_FORMULAS`, counting the total only
    (``get_total_flops``; no per-module breakdown)."""
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _TotalOnly()
    return counter


def count_flops(model: nn.Module, inputs: Any, forward_fn: Callable | None = None) -> int:
    """FLOPs of one forward pass, by PyTorch's own counter (FLOPs = 2 x MACs).

    Attention is counted through the math backend, since fused CPU kernels are not
    seen by the counter. Counting needs shapes only, so the heavy ops run on the meta
    device (:class:`~cleanai_core.shapes.ShapeOnlyMode`)."""
    _check_measured("count_flops", model, inputs, forward_fn)
    counter = flop_counter()
    _count_into(counter, model, inputs, forward_fn)
    return int(counter.get_total_flops())


def _count_into(counter: FlopCounterMode, model: nn.Module, inputs: Any, forward_fn: Callable | None) -> None:
    """One shape-only forward pass of ``model`` under ``counter`` (see :func:`count_flops`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with eval_mode(model), _params_without_grad(model), torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with _unfused_kernels(), _counting(counter):
            call_model(model, inputs, forward_fn)


@contextmanager
def _counting(counter: FlopCounterMode) -> Iterator[None]:
    """``counter`` counting while the block runs shape-only, as ``with ShapeOnlyMode(),
    counter:`` did, in one dispatch mode (:class:`_ShapeOnlyCounter`); ``counter`` holds the
    same totals afterwards (``get_total_flops``)."""
    if _FlopCounterMode is None or not hasattr(counter, "_count_flops"):
        with ShapeOnlyMode(), counter:  # a torch whose counter is built otherwise: the two modes
            yield
        return
    counter.flop_counts.clear()
    with counter.mod_tracker, _ShapeOnlyCounter(counter):
        yield


def _ops(names: str) -> frozenset:
    """The ATen / prim overloads named ``ns.op.overload`` that this torch has."""
    out = []
    for name in names.split():
        ns, op, overload = name.split(".")
        got = getattr(getattr(getattr(torch.ops, ns), op, None), overload, None)
        if got is not None:
            out.append(got)
    return frozenset(out)


#: the queries torch's counting mode passes back to the tensor (``NotImplemented``)
_QUERIES = _ops(
    "aten.sym_is_contiguous.default aten.is_contiguous.default aten.is_contiguous.memory_format "
    "aten.is_strides_like_format.default aten.is_non_overlapping_and_dense.default aten.size.default "
    "aten.sym_size.default aten.stride.default aten.sym_stride.default aten.storage_offset.default "
    "aten.sym_storage_offset.default aten.numel.default aten.sym_numel.default aten.dim.default "
    "prim.layout.default"
)

_PRIM_DEVICE = torch.ops.prim.device.default

#: per ATen overload: whether it has a CompositeImplicitAutograd kernel (in Python or
#: registered), which torch's counting mode would run it through; fixed by its registration
_DECOMPOSES: dict[Any, bool] = {}


def _decomposes(func: Any) -> bool:
    got = _DECOMPOSES.get(func)
    if got is None:
        key = torch._C.DispatchKey.CompositeImplicitAutograd
        got = _DECOMPOSES[func] = key in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(
            func.name(), key
        )
    return got


if _FlopCounterMode is not None:

    class _ShapeOnlyCounter(_FlopCounterMode):
        """PyTorch's FLOP counting mode (``torch.utils.flop_counter._FlopCounterMode``: the
        same queries passed back, higher-order ops, decompositions and counts) whose ops run as
        under :class:`~cleanai_core.shapes.ShapeOnlyMode`: one Python dispatch per op where the
        two modes stacked made two, and a decomposition tried only for ops that have one (torch
        tries it for every op outside its formulas, entering the mode again each time). The
        write guard of a model's first count (:mod:`~cleanai_core.model_state`) is checked per
        op here too, as the trace's recorder hosts it, not as a third mode."""

        def __init__(self, counter: FlopCounterMode) -> None:
            super().__init__(counter)
            self.write_guards: list[Any] = []  # hosted by :func:`~cleanai_core.model_state.writes_guarded`

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if isinstance(func, torch._ops.HigherOrderOperator):
                return super().__torch_dispatch__(func, types, args, kwargs)
            kwargs = kwargs if kwargs else {}
            for guard in self.write_guards:
                guard.check(func, args, kwargs)
            if func in _QUERIES:
                return super().__torch_dispatch__(func, types, args, kwargs)
            counter = self.counter
            if func not in counter.flop_registry and func is not _PRIM_DEVICE and _decomposes(func):
                with self:
                    r = func.decompose(*args, **kwargs)
                    if r is not NotImplemented:
                        return r
            out = ShapeOnlyMode.run(func, args, kwargs)
            return counter._count_flops(func._overloadpacket, out, args, kwargs)


@contextmanager
def _unfused_kernels() -> Iterator[None]:
    """Fused kernels the FLOP counter does not see switched off while it runs; the unfused
    paths compute the same through ``linear`` / ``mm`` / ``bmm``, which it counts:

    - PyTorch's fast path of ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention``: in
      eval mode without gradients an encoder layer ran as one
      ``_transformer_encoder_layer_fwd`` call (a two-layer encoder of width 32 counted
      5,440 FLOPs where its linears and attention products make 358,720);
    - oneDNN (``nn.LSTM`` on the CPU ran as ``mkldnn_rnn_layer``: 0 FLOPs) and cuDNN
      (``_cudnn_rnn`` on a GPU). Convolutions are counted whatever backend would run them."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    mkldnn, cudnn = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    torch.backends.mha.set_fastpath_enabled(False)
    torch.backends.mkldnn.enabled = torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled = mkldnn, cudnn


@contextmanager
def _params_without_grad(model: nn.Module) -> Iterator[None]:
    """Parameters with ``requires_grad`` off while the FLOP counter runs, then back on.
    The counter's module tracker hooks the gradients of every module input that requires
    them, and a view of a parameter taken under ``no_grad`` (DeBERTa's relative position
    embeddings, ``weight.unsqueeze(0)``, handed to ``pos_proj``) requires grad with no
    gradient function: the tracker raised ``AssertionError: Expected gradient function
    to be set``. Nothing here needs gradients. Inference tensors (a model built under
    ``torch.inference_mode()``) are left alone: their flag cannot be set back outside
    inference mode."""
    params = [p for p in model.parameters() if p.requires_grad and not p.is_inference()]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


#: leaf modules whose FLOPs (as PyTorch's counter counts them) are the number of positions
#: they run at times their weight's elements, times 2: a channel-pruned copy's FLOPs follow
#: from its weight's size (pruning channels never changes the positions)
_WEIGHT_PROPORTIONAL = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _position_sizes(module: nn.Module, x: torch.Tensor) -> list[int]:
    """The sizes of ``x`` (a layer's input) that count the layer's positions and could be
    channels: a linear layer's leading dims but the first (the batch), a ``Conv1d``'s
    length. A larger conv's spatial dims are never channels."""
    if isinstance(module, nn.Linear):
        return list(x.shape[1:-1])
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        return list(x.shape[-1:])
    return []


class FlopsOfCopies:
    """:func:`count_flops` of pruned copies of one model, without running them when it can.

    The original is counted once, and each FLOP is attributed to the leaf module that ran
    it. Where every FLOP falls in a linear or convolution layer, each of those costs
    ``2 x positions x weight elements`` (PyTorch's counter), and channel pruning changes
    only the weight: a copy's FLOPs are the sum of ``flops x new / old weight elements``
    over those layers, exact and free. Any other model (attention's matrix products,
    FLOPs outside such layers, a layer that may run once per channel: a linear layer over
    the tokens of a ``(B, C, N)`` view, a ``Conv1d`` along the channels, taken to be one
    where such a size equals a width of the model's weights), or a copy whose layers are
    not the original's by name and type, is counted by running it (:func:`count_flops`).
    The sensitivity trials, the allocation's candidates and the ratio searches measure
    hundreds of copies of one model; a count costs a forward pass of Python (0.18 s on
    ResNet-50)."""

    def __init__(self, model: nn.Module, inputs: Any, forward_fn: Callable | None = None) -> None:
        self.inputs, self.forward_fn = inputs, forward_fn
        #: name -> (type, FLOPs per weight element, elements); None: copies are counted by running
        self.layers: dict[str, tuple[type, int, int]] | None = None
        self.names: set[str] = set()  # every such layer of the model, run or not
        self.total = self._count(model)

    def _count(self, model: nn.Module) -> int:
        ran: dict[str, int] = {}
        counter = flop_counter()
        start: dict[str, int] = {}
        positions: dict[str, set[int]] = {}  # per layer, the input sizes that count its positions

        def pre(name: str) -> Callable:
            def hook(module: nn.Module, args: tuple) -> None:
                start[name] = counter.get_total_flops()
                x = args[0] if args else None
                if isinstance(x, torch.Tensor):
                    positions.setdefault(name, set()).update(_position_sizes(module, x))

            return hook

        def post(name: str) -> Callable:
            return lambda *_: ran.__setitem__(name, ran.get(name, 0) + counter.get_total_flops() - start[name])

        leaves = {n: m for n, m in model.named_modules() if isinstance(m, _WEIGHT_PROPORTIONAL)}
        self.names = set(leaves)
        handles = []
        for name, m in leaves.items():
            handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
        try:
            _count_into(counter, model, self.inputs, self.forward_fn)
        finally:
            for h in handles:
                h.remove()
        total = int(counter.get_total_flops())
        widths = {d for p in model.parameters() for d in p.shape if d > 1}
        if any(positions.get(name, set()) & widths for name in ran):
            # a linear layer over the tokens of a (B, C, N) view (MLP-Mixer's token mixing) or a
            # Conv1d along the channels (ECA) runs at positions that count channels: pruning them
            # changes its FLOPs with its weight unchanged (Mixer at 0.5: 174.1M said, 157.3M true)
            return total
        layers = {}
        for name, flops in ran.items():
            w = getattr(leaves[name], "weight", None)
            if not isinstance(w, torch.Tensor) or w.numel() == 0 or flops % w.numel():
                return total
            layers[name] = (type(leaves[name]), flops // w.numel(), w.numel())
        if sum(per * n for _, per, n in layers.values()) == total:
            self.layers = layers
        return total

    def __call__(self, copy: nn.Module) -> int:
        """The FLOPs of one forward pass of ``copy`` (a pruned copy of the model) on the inputs."""
        total = self.from_sizes(copy)
        return count_flops(copy, self.inputs, self.forward_fn) if total is None else total

    def runs(self, copy: nn.Module) -> bool:
        """Whether measuring ``copy`` runs it (a copy that cannot run then fails here)."""
        return self.from_sizes(copy) is None

    def from_sizes(self, copy: nn.Module) -> int | None:
        """``copy``'s FLOPs from its layers' sizes; None where it must be counted by running."""
        if self.layers is None:
            return None
        mods = dict(copy.named_modules())
        if {n for n, m in mods.items() if isinstance(m, _WEIGHT_PROPORTIONAL)} != self.names:
            return None
        total = 0
        for name, (kind, per, _) in self.layers.items():
            m = mods.get(name)
            w = getattr(m, "weight", None)
            if type(m) is not kind or not isinstance(w, torch.Tensor):
                return None
            total += per * w.numel()
        return total


def measure_latency(
    model: nn.Module, inputs: Any, repeats: int = 20, warmup: int = 3, forward_fn: Callable | None = None
) -> float:
    """Median wall-clock milliseconds of one forward pass (no gradients). Each pass gets
    its own copy of ``inputs`` (a forward may change its input in place), made before the
    clock starts: a batch of 32 images at 224 px takes about 2 ms to copy, which timed with
    the pass would shrink every speed-up. On a GPU the copy is waited for before the clock
    starts and the pass before it stops (the copy was only queued, so it was timed with the
    pass); a CPU model is timed without waiting on a GPU the machine happens to have."""
    _check_measured("measure_latency", model, inputs, forward_fn)
    repeats, warmup = plain_number(repeats), plain_number(warmup)
    for name, value, least in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            # repeats=0 raised statistics.StatisticsError: "no median for empty data"; warmup=-1 was taken
            raise UserError(f"measure_latency: {name}={shown(value)} must be an integer >= {least}")
    on = {t.device.type for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)}
    on |= {p.device.type for p in model.parameters()}
    sync = torch.cuda.synchronize if "cuda" in on else (lambda: None)
    times = []
    with eval_mode(model), torch.no_grad():
        for i in range(warmup + repeats):
            given = copied_inputs(inputs)
            sync()
            t0 = time.perf_counter()
            call_model(model, given, forward_fn, copy=False)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)
