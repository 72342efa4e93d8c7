"""Errors with messages a user can act on."""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = [
    "CleanAIError",
    "PruningError",
    "SpecError",
    "TraceError",
    "TraceInputError",
    "UserError",
    "is_out_of_memory",
    "model_fault",
    "printable",
    "shown",
    "shown_name",
]


class CleanAIError(Exception):
    """Base class of CleanAI's errors."""


class UserError(CleanAIError, ValueError):
    """Bad input: the message names the problem and what to do. The CLI exits with 2."""


class SpecError(UserError):
    """A ``package.module:callable`` spec that names nothing to call: its module does not
    import, or has no such attribute, or it is no callable. Whoever only checks a spec
    (``save_pruned``'s trial rebuild) can tell it from a failure of the call itself."""


class TraceError(CleanAIError, RuntimeError):
    """The model could not be traced; the message names the module or op. Raised as such
    where CleanAI's trace is at fault (a mapper or layer pruner that failed on an op, a
    forward that runs plainly but not under the recorder); the CLI exits with 1."""


class TraceInputError(TraceError, UserError):
    """The model could not be traced because of what it was given or returns: it fails on
    the example inputs run plainly too (``kind="inputs"``), its output holds no tensor
    (``kind="output"``), or a part of it runs a compiled implementation the trace cannot
    enter (``kind="implementation"``). The message names the fix. A :class:`UserError` (the
    CLI exits with 2; ``cleanai explain`` tries other inputs only for ``"inputs"``) and a
    :class:`TraceError` (``except TraceError`` still catches it). Before session 24 these
    were plain ``TraceError`` s: a ``RuntimeError``, exit 1, "failed"."""

    def __init__(self, message: str, kind: str = "inputs", returned: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        #: for ``kind="output"``: the type the model (or ``output_transform``) returned
        self.returned = returned


class PruningError(CleanAIError, RuntimeError):
    """Slicing produced a model that does not run; nothing was changed."""


def model_fault(exc: BaseException) -> bool:
    """Whether ``exc``, caught around a run of the user's model (its forward, ``forward_fn``,
    ``output_transform``), is the model's own failure, to be reported as one: any
    ``Exception`` but CleanAI's own errors and running out of memory, which say what they
    are. The call sites caught a list of types (``RuntimeError``, ``ValueError``, ...), so an
    ``AssertionError``, ``KeyError``, ``StopIteration`` or a model's own exception class came
    out of the command line as a traceback (exit 1)."""
    if not isinstance(exc, Exception) or isinstance(exc, CleanAIError):
        return False
    return not is_out_of_memory(exc)


def pruned_run_failed(exc: Exception) -> NoReturn:
    """Raise for a pruned (or trial) model whose run raised ``exc``: a :class:`PruningError`
    where the failure is the model's (the pruning broke it), ``exc`` itself where it is not
    (CleanAI's own errors; running out of memory, which is no property of the pruning and
    was taken for one: a trial out of memory ended its group's sensitivity curve, and
    verification kept the group whole)."""
    if not model_fault(exc):
        raise exc
    raise PruningError(f"the pruned model fails to run: {type(exc).__name__}: {exc}") from exc


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed: Python's ``MemoryError``, torch's
    ``OutOfMemoryError`` (named, without importing torch here) or the CPU allocator's
    ``RuntimeError: DefaultCPUAllocator: can't allocate memory``, which calibration called
    the model's own failure ("give calibration batches shaped like example_inputs")."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def shown(value: Any, limit: int = 80) -> str:
    """``value`` as an error message shows it: a module by its class (a network's ``repr``
    is one line per layer: a model passed where a path goes printed all of them), a tensor
    by its type and shape (its ``repr`` prints the values), anything else by its ``repr``,
    cut at ``limit`` characters."""
    import torch

    if isinstance(value, torch.nn.Module):
        first = repr(value).splitlines()[0]
        if first.endswith("(") or len(first) > limit:  # a container: "ResNet("
            return f"a {type(value).__name__} module"
        return f"the module {first}"
    if isinstance(value, torch.Tensor):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (newlines, tabs, escape
    sequences, other control and format characters) written as its Python escape
    (``\\n``, ``\\x1b``): a module name holding ``"\\x1b[2J"`` cleared the screen of
    ``cleanai explain`` and one holding a newline broke its lines."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def shown_name(name: str) -> str:
    """A module name as the terminal shows it: as it is where it is plain text without
    blanks (``features.0``, ``blocks.ünï``), else as the Python string that names it in
    ``ignored_layers`` (``'head\\nfc'``, ``'layers.with space'``), so it reads as one name."""
    if name.isprintable() and not any(c.isspace() for c in name):
        return name
    return repr(name)
