"""Paths a user gave that exist but are no regular file or folder: a named pipe (FIFO), a
device (``/dev/zero``, ``/dev/stdin``) or a socket. Reading one waits for a writer that
never comes (a FIFO) or never ends (``/dev/zero``: the process read it until the
out-of-memory killer stopped it); ``Path.is_file()`` is false for them, so they were
reported as files that "do not exist"."""

from __future__ import annotations

import os
import stat
from typing import Any

from cleanai_core.errors import UserError

__all__ = ["check_not_special", "special_kind"]

_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(path: Any) -> str | None:
    """What ``path`` is where it exists and is neither a regular file nor a folder (links
    followed), else ``None``."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, a loop of links, a NUL in the name: the caller's own checks say so
        return None
    return next((kind for test, kind in _KINDS if test(mode)), None)


def check_not_special(path: Any, what: str) -> None:
    """A :class:`UserError` naming ``what`` (``"--data"``, ``"weights file"``) when ``path``
    is a pipe, device or socket; nothing is opened."""
    kind = special_kind(path)
    if kind is not None:
        raise UserError(
            f"{what} {str(path)!r} is {kind}, not a regular file: reading it would wait for a writer or never end. "
            "Save the content to a file on disk and give that file."
        )
