"""Paths a user gave that exist but are no regular file or folder: a named pipe (FIFO), a
device (``/dev/zero``, ``/dev/stdin``), a socket, or a loop of symbolic links (which said
"does not exist"). Reading one waits for a writer that
never comes (a FIFO) or never ends (``/dev/zero``: the process read it until the
out-of-memory killer stopped it); ``Path.is_file()`` is false for them, so they were
reported as files that "do not exist".

Also a ``torch.save`` archive whose records were compressed (:func:`check_not_packed`):
``torch.save`` stores them as they are, and ``torch.load`` inflates whatever it finds, so a
file of a few hundred KB asked for hundreds of MB (10 MB for 10 GB: the out-of-memory
killer)."""

from __future__ import annotations

import errno
import os
import stat
import zipfile
from typing import Any

from cleanai_core.errors import UserError

__all__ = ["check_not_packed", "check_not_special", "special_kind", "unreadable"]

LOOP = "a loop of symbolic links"
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
    except OSError as exc:  # missing: the caller's own checks say so; a loop of links said "does not exist"
        return LOOP if exc.errno == errno.ELOOP else None
    except ValueError:  # a NUL in the name
        return None
    return next((kind for test, kind in _KINDS if test(mode)), None)


def check_not_special(path: Any, what: str) -> None:
    """A :class:`UserError` naming ``what`` (``"--data"``, ``"weights file"``) when ``path``
    is a pipe, device or socket; nothing is opened."""
    kind = special_kind(path)
    if kind == LOOP:
        raise UserError(
            f"{what} {str(path)!r} is {kind} (a link that leads back to itself), so there is nothing to read. Give "
            "the file itself."
        )
    if kind is not None:
        raise UserError(
            f"{what} {str(path)!r} is {kind}, not a regular file: reading it would wait for a writer or never end. "
            "Save the content to a file on disk and give that file."
        )


def unreadable(path: Any, exc: BaseException) -> str:
    """Why ``torch.load`` could not read ``path`` (it raised ``exc``), as the end of a
    sentence that names the file: "is empty (0 bytes)", "is a torch.save archive of N
    bytes without the directory a complete one ends with: it may be truncated ...", else
    ``exc`` itself. An empty file said "(EOFError: )", and one cut off in a copy said
    torch's zip reader's "failed finding central directory. This is an internal miniz
    error ..." (cut mid-sentence at 200 characters); neither named the problem."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(4)
    except (OSError, ValueError):
        size, head = -1, b""
    if size == 0:
        return "is empty (0 bytes)"
    stopped = "it may be truncated or damaged (a copy, download or save that stopped early leaves such a file)"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):  # torch.save's zip without its closing directory
        return f"is a torch.save archive of {size:,} bytes without the directory a complete one ends with: {stopped}"
    if isinstance(exc, EOFError) or "ran out of input" in str(exc).lower():  # a legacy pickle that ends early
        return f"ends at byte {size:,}, in the middle of its data: {stopped}"
    return f"cannot be read ({type(exc).__name__}: {str(exc)[:200]}); it may be truncated or damaged"


# how far a torch.save archive may unpack beyond its own size before it is refused: torch.save
# stores its records uncompressed (about 1x); a zip tool repacking one with deflate gains a few x
_PACKED_RATIO = 16


def check_not_packed(path: Any, what: str) -> None:
    """A :class:`UserError` naming ``what`` when ``path`` is a zip archive (``torch.save``'s
    format) whose compressed records unpack to more than 16 times the file's size (and
    more than 1 MiB): not something ``torch.save`` writes, and ``torch.load`` would inflate
    it all into memory. Reads the zip's directory only."""
    try:
        size = os.path.getsize(path)
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as z:
            packed = sum(i.file_size for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED)
    except (OSError, ValueError, zipfile.BadZipFile):
        return  # unreadable: torch.load's own error says so
    if packed > _PACKED_RATIO * size + 2**20:
        raise UserError(
            f"{what} {str(path)!r} is a zip archive of {size:,} bytes whose compressed records unpack to "
            f"{packed:,} bytes; torch.save stores records uncompressed, so it was not written by torch.save (or was "
            "repacked, or built to exhaust memory) and is not read. Save it again with torch.save."
        )
