"""Built-in reducers (fold per-slice scores) and normalisers (make groups comparable)."""

from __future__ import annotations

import torch

from cleanai_core import hookimpl


def lamp(s: torch.Tensor) -> torch.Tensor:
    """``s_u^2 / sum_{v: s_v >= s_u} s_v^2``."""
    sq = s.to(torch.float64) ** 2
    order = torch.argsort(sq)
    tail = torch.flip(torch.cumsum(torch.flip(sq[order], [0]), 0), [0])
    out = torch.empty_like(sq)
    out[order] = sq[order] / tail.clamp(min=1e-30)
    return out


def _safe_div(s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return s / d if float(d) > 0 else torch.zeros_like(s)


REDUCERS = {
    "sum": lambda x: x.sum(0),
    "mean": lambda x: x.mean(0),
    "max": lambda x: x.max(0).values,
    "prod": lambda x: x.prod(0),
    "first": lambda x: x[0],
}

NORMALIZERS = {
    "none": lambda s: s,
    "mean": lambda s: _safe_div(s, s.mean()),
    "max": lambda s: _safe_div(s, s.max()),
    "sum": lambda s: _safe_div(s, s.sum()),
    "gaussian": lambda s: (s - s.mean()) / (s.std() + 1e-12) if s.numel() > 1 else torch.zeros_like(s),
    # min-max onto [0, 1] (the name Torch-Pruning users pass); a constant group scores all 0
    "standardization": lambda s: _safe_div(s - s.min(), s.max() - s.min()),
    "lamp": lamp,
}


@hookimpl(trylast=True)
def cleanai_reducers():
    return dict(REDUCERS)


@hookimpl(trylast=True)
def cleanai_normalizers():
    return dict(NORMALIZERS)
