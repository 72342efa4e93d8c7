"""Errors with messages a user can act on."""

from __future__ import annotations

__all__ = ["CleanAIError", "PruningError", "TraceError", "UserError"]


class CleanAIError(Exception):
    """Base class of CleanAI's errors."""


class UserError(CleanAIError, ValueError):
    """Bad input: the message names the problem and what to do. The CLI exits with 2."""


class TraceError(CleanAIError, RuntimeError):
    """The model could not be traced; the message names the module or op."""


class PruningError(CleanAIError, RuntimeError):
    """Slicing produced a model that does not run; nothing was changed."""
