"""CleanAI: structured pruning of trained PyTorch models, scored on your test data."""

from cleanai_core.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
