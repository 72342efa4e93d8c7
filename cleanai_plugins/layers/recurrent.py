"""nn.RNN / nn.LSTM / nn.GRU, multi-layer and bidirectional, LSTM with ``proj_size``; and
the cells nn.RNNCell / nn.LSTMCell / nn.GRUCell that users step through a loop themselves.

Coupling (decided here):

- ``hidden_size`` H is one attribute for every layer and direction, so hidden unit ``j``
  of every layer and both directions is one unit (slice ``"hidden"``, H atoms). Pruning
  it removes row ``j`` of every gate block (4 for LSTM, 3 for GRU, 1 for RNN) of
  ``weight_ih``/``weight_hh``/biases, column ``j`` of ``weight_hh`` (or of ``weight_hr``
  with a projection) and, without a projection, the matching output channels.
- With ``proj_size`` P > 0 (LSTM), the output and ``h`` carry P channels (slice
  ``"proj"``, tied across layers and directions the same way): rows of ``weight_hr``,
  columns of ``weight_hh``; the cell units H (slice ``"hidden"``) are then internal.
- The output concatenates both directions, ``[forward, backward]``; its label is the
  output atoms repeated per direction, and layer ``k > 0`` reads them in its
  ``weight_ih`` columns.
- ``input_size``: slice ``"in"`` (columns of ``weight_ih_l0*``) from the input's label.
- An initial state ``hx`` (``h_0``, LSTM ``(h_0, c_0)``) must shrink with the units: its
  last-dim label is unioned with them (an unlabelled ``hx`` freezes them).
- ``h_n``/``c_n`` get labels too. A ``PackedSequence`` input and output are read through
  their ``data`` (steps by features).
- A cell (:class:`RecurrentCellPruner`) has the same ``"in"`` and ``"hidden"`` slices for
  its one layer; its state ``hx`` (LSTM ``(h, c)``) and its outputs carry the hidden
  units, so a loop that feeds a step's output back as the next ``hx`` couples nothing
  new. ``hx=None`` makes the cell create zeros of ``hidden_size`` itself, which follows
  the pruned width (a zero tensor the user's own code builds with a literal size cannot).

Masking oracle: zeroing the weights of a hidden unit makes its gates' pre-activations
zero, hence (with a zero initial state) its ``h`` and ``c`` stay exactly zero, which is
what removing it does. ``mask`` zeroes them in the oracle's copy.
"""

from __future__ import annotations

import torch
from torch import nn

from cleanai_core import hookimpl
from cleanai_core.graph.trace import TRef
from cleanai_core.interfaces import LayerPruner, replace_param, settings_mismatch, shape_of

__all__ = ["RecurrentCellPruner", "RecurrentPruner"]


def _gates(module) -> int:
    return {"LSTM": 4, "GRU": 3}.get(module.mode, 1)


def _suffixes(module) -> list[str]:
    return ["", "_reverse"] if module.bidirectional else [""]


def _packed_data(x) -> TRef | None:
    """The traced ``data`` of a ``PackedSequence`` argument or result (the trace keeps it as
    a plain tuple ``(data, batch_sizes, sorted_indices, unsorted_indices)``), else ``None``."""
    if isinstance(x, tuple) and len(x) == 4 and isinstance(x[0], TRef) and isinstance(x[1], TRef):
        return x[0] if x[0].ndim == 2 and x[1].ndim == 1 else None
    return None


def _rows(k: torch.Tensor, h: int, g: int) -> torch.Tensor:
    return torch.cat([k + i * h for i in range(g)])


class RecurrentPruner(LayerPruner):
    name = "recurrent"

    def trace(self, module, call, ctx):
        x = call.args[0] if call.args else call.kwargs.get("input")
        hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
        h, p = module.hidden_size, module.proj_size
        hidden = ctx.produce(call.name, "hidden", h, **({} if p > 0 else {"dim": -1}))
        proj = ctx.produce(call.name, "proj", p, dim=-1) if p > 0 else hidden
        packed = _packed_data(x)
        if packed is not None:  # a PackedSequence: its data rows are steps, its last dim features
            x = packed
        if not isinstance(x, TRef):
            ctx.freeze(hidden, f"{ctx.where()}: input is not a plain tensor (PackedSequence?)")
            ctx.freeze(proj, f"{ctx.where()}: input is not a plain tensor (PackedSequence?)")
            for ref in call.inputs:
                ctx.freeze_tensor(ref, f"{ctx.where()}: PackedSequence input")
            return
        ctx.bind(call.name, "in", ctx.labels(x, -1), "in", arg=0, dim=-1)
        states = [hx] if isinstance(hx, TRef) else list(hx) if isinstance(hx, (tuple, list)) else []
        for i, s in enumerate(states):
            if isinstance(s, TRef):
                ctx.union(ctx.labels(s, -1), proj if i == 0 else hidden)
        d = 2 if module.bidirectional else 1
        outs = call.outputs
        if packed is not None and isinstance(call.out, tuple) and len(call.out) == 2:
            out_data = _packed_data(call.out[0])
            state = call.out[1]
            outs = [out_data, *([state] if isinstance(state, TRef) else list(state))]  # not the batch sizes
        if outs:
            ctx.set_label(outs[0], -1, proj.repeat(d))
        for i, o in enumerate(outs[1:]):
            ctx.set_label(o, -1, proj if i == 0 else hidden)

    # -- slicing ---------------------------------------------------------------
    def prune(self, module, keep):
        g, h, p = _gates(module), module.hidden_size, module.proj_size
        out_w = p if p > 0 else h
        d = 2 if module.bidirectional else 1
        kin, kh = keep.get("in"), keep.get("hidden")
        kp = keep.get("proj") if p > 0 else kh
        for layer in range(module.num_layers):
            for sfx in _suffixes(module):
                wih, whh = f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"
                if layer == 0 and kin is not None:
                    replace_param(module, wih, 1, kin)
                if layer > 0 and kp is not None:
                    replace_param(module, wih, 1, torch.cat([kp + i * out_w for i in range(d)]))
                if kh is not None:
                    rows = _rows(kh, h, g)
                    for name in (wih, whh, f"bias_ih_l{layer}{sfx}", f"bias_hh_l{layer}{sfx}"):
                        if hasattr(module, name):
                            replace_param(module, name, 0, rows)
                    if p > 0:
                        replace_param(module, f"weight_hr_l{layer}{sfx}", 1, kh)
                if kp is not None:
                    replace_param(module, whh, 1, kp)
                    if p > 0:
                        replace_param(module, f"weight_hr_l{layer}{sfx}", 0, kp)
        if kin is not None:
            module.input_size = kin.numel()
        if kh is not None:
            module.hidden_size = kh.numel()
        if p > 0 and kp is not None:
            module.proj_size = kp.numel()
        module._init_flat_weights()

    def settings_problem(self, module):
        ih, hh = shape_of(module, "weight_ih_l0"), shape_of(module, "weight_hh_l0")
        if ih is None or hh is None:
            return None
        hr = shape_of(module, "weight_hr_l0")
        layers = sum(1 for k in module._parameters if k.startswith("weight_ih_l") and not k.endswith("_reverse"))
        expected = {"input_size": ih[1], "hidden_size": hr[1] if hr else hh[1], "proj_size": hr[0] if hr else 0}
        expected.update(num_layers=layers, bidirectional="weight_ih_l0_reverse" in module._parameters)
        return settings_mismatch(module, expected, f"its weights (weight_ih_l0 {ih}, weight_hh_l0 {hh})")

    def mask(self, module, slice_name, idx):
        """Zero, in the masking oracle's copy, every weight of the pruned units."""
        g, h, p = _gates(module), module.hidden_size, module.proj_size
        out_w = p if p > 0 else h
        d = 2 if module.bidirectional else 1
        for layer in range(module.num_layers):
            for sfx in _suffixes(module):
                w = lambda n: getattr(module, f"{n}_l{layer}{sfx}", None)  # noqa: E731
                if slice_name == "in" and layer == 0:
                    w("weight_ih").data[:, idx] = 0
                if slice_name == "hidden":
                    rows = _rows(idx, h, g)
                    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        if w(name) is not None:
                            w(name).data[rows] = 0
                    if p > 0:
                        w("weight_hr").data[:, idx] = 0
                if slice_name == ("proj" if p > 0 else "hidden"):
                    w("weight_hh").data[:, idx] = 0
                    if p > 0:
                        w("weight_hr").data[idx] = 0
                    if layer > 0:
                        w("weight_ih").data[:, torch.cat([idx + i * out_w for i in range(d)])] = 0
        return True

    def weight_energy(self, module, slice_name):
        g, h, p = _gates(module), module.hidden_size, module.proj_size
        out_w = p if p > 0 else h
        d = 2 if module.bidirectional else 1
        n = {"in": module.input_size, "hidden": h, "proj": p}[slice_name]
        e = torch.zeros(n, device=module.weight_ih_l0.device)
        for layer in range(module.num_layers):
            for sfx in _suffixes(module):

                def sq(name):
                    t = getattr(module, f"{name}_l{layer}{sfx}", None)
                    return None if t is None else t.detach().float() ** 2

                if slice_name == "in" and layer == 0:
                    e += sq("weight_ih").sum(0)
                if slice_name == "hidden":
                    for name in ("weight_ih", "weight_hh"):
                        e += sq(name).sum(1).reshape(g, h).sum(0)
                    if p > 0:
                        e += sq("weight_hr").sum(0)
                if slice_name == ("proj" if p > 0 else "hidden"):
                    e += sq("weight_hh").sum(0)
                    if p > 0:
                        e += sq("weight_hr").sum(1)
                    if layer > 0:
                        e += sq("weight_ih").sum(0).reshape(d, out_w).sum(0)
        return e


class RecurrentCellPruner(LayerPruner):
    """nn.RNNCell / nn.LSTMCell / nn.GRUCell: one layer, one direction, no projection."""

    name = "recurrent_cell"

    def trace(self, module, call, ctx):
        x = call.args[0] if call.args else call.kwargs.get("input")
        hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
        hidden = ctx.produce(call.name, "hidden", module.hidden_size, dim=-1)
        ctx.bind(call.name, "in", ctx.labels(x, -1), "in", arg=0, dim=-1)
        for s in [hx] if isinstance(hx, TRef) else list(hx) if isinstance(hx, (tuple, list)) else []:
            if isinstance(s, TRef):
                ctx.union(ctx.labels(s, -1), hidden)
        for o in call.outputs:
            ctx.set_label(o, -1, hidden)

    def prune(self, module, keep):
        g, h = _cell_gates(module), module.hidden_size
        kin, kh = keep.get("in"), keep.get("hidden")
        if kin is not None:
            replace_param(module, "weight_ih", 1, kin)
            module.input_size = kin.numel()
        if kh is not None:
            rows = _rows(kh, h, g)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                if getattr(module, name, None) is not None:
                    replace_param(module, name, 0, rows)
            replace_param(module, "weight_hh", 1, kh)
            module.hidden_size = kh.numel()

    def settings_problem(self, module):
        ih, hh = shape_of(module, "weight_ih"), shape_of(module, "weight_hh")
        if ih is None or hh is None:
            return None
        expected = {"input_size": ih[1], "hidden_size": hh[1]}
        return settings_mismatch(module, expected, f"its weights (weight_ih {ih}, weight_hh {hh})")

    def mask(self, module, slice_name, idx):
        """Zero the pruned units' weights: with a zero state their gates' pre-activations
        are zero and their ``h`` (and ``c``) stay exactly zero, as removing them does."""
        if slice_name == "in":
            module.weight_ih.data[:, idx] = 0
            return True
        rows = _rows(idx, module.hidden_size, _cell_gates(module))
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            if getattr(module, name, None) is not None:
                getattr(module, name).data[rows] = 0
        module.weight_hh.data[:, idx] = 0
        return True

    def weight_energy(self, module, slice_name):
        g, h = _cell_gates(module), module.hidden_size
        if slice_name == "in":
            return (module.weight_ih.detach().float() ** 2).sum(0)
        e = torch.zeros(h, device=module.weight_hh.device)
        for name in ("weight_ih", "weight_hh"):
            e += (getattr(module, name).detach().float() ** 2).sum(1).reshape(g, h).sum(0)
        return e + (module.weight_hh.detach().float() ** 2).sum(0)


def _cell_gates(module) -> int:
    return 4 if isinstance(module, nn.LSTMCell) else 3 if isinstance(module, nn.GRUCell) else 1


@hookimpl(trylast=True)
def cleanai_layer_pruner(module):
    if isinstance(module, nn.modules.rnn.RNNBase):
        return RecurrentPruner()
    if isinstance(module, nn.modules.rnn.RNNCellBase):
        return RecurrentCellPruner()
    return None
