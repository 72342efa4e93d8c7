"""Paths a user gave that exist but are no regular file or folder: a named pipe (FIFO), a
device (``/dev/zero``, ``/dev/stdin``), a socket, or a loop of symbolic links (which said
"does not exist"). Reading one waits for a writer that
never comes (a FIFO) or never ends (``/dev/zero``: the process read it until the
out-of-memory killer stopped it); ``Path.is_file()`` is false for them, so they were
reported as files that "do not exist".

Also a ``torch.save`` archive whose records were compressed (:func:`check_not_packed`):
``torch.save`` stores them as they are, and ``torch.load`` inflates whatever it finds, so a
file of a few hundred KB asked for hundreds of MB (10 MB for 10 GB: the out-of-memory
killer).

And a file of another format where a ``torch.save`` file goes (:func:`not_torch_save`):
JSON, text, an image, a NumPy ``.npy`` / ``.npz``, a CleanAI ``history.json``."""

from __future__ import annotations

import errno
import json
import os
import stat
import zipfile
from collections.abc import Mapping
from typing import Any

from cleanai_core.errors import UserError

__all__ = [
    "check_given_paths",
    "check_not_packed",
    "check_not_special",
    "cleanai_folder_kind",
    "cleanai_json_kind",
    "not_torch_save",
    "not_torch_save_error",
    "special_kind",
    "unreadable",
]

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


#: the options naming a file or folder (a spec, for --model); '' given for one of them is no path
PATH_OPTIONS = ("model", "weights", "data", "train_data", "out", "config")


def check_given_paths(given: Any, keys: tuple[str, ...] = PATH_OPTIONS) -> None:
    """A :class:`UserError` where an option of ``keys`` was given as the empty string
    (``--weights "$W"`` with ``W`` unset): ``--weights ''`` and ``--config ''`` were read as
    not given (a model of random weights pruned, exit 0), ``--train-data ''`` recovered on the
    scoring data, and ``cleanai explain --model ''`` said "'' is a folder" (the current one)."""
    items = given if isinstance(given, Mapping) else vars(given)  # an argparse namespace
    for key in keys:
        value = items.get(key)
        if isinstance(value, (str, bytes)) and not value:
            flag = f"--{key.replace('_', '-')}"
            raise UserError(
                f"{flag} is empty (''), which names no file or folder; nothing was read or written. Give the "
                f"path (an unset shell variable, as in {flag} \"$VAR\", gives '')"
                + ("." if key in ("model", "data", "out") else f", or leave {flag} out.")
            )


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


_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x93NUMPY", "a NumPy array file (numpy.save, .npy)"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x7fELF", "a program (ELF executable)"),
)


_BY_SUFFIX = {
    ".onnx": "an ONNX model (.onnx)",
    ".tflite": "a TensorFlow Lite model (.tflite)",
    ".pb": "a TensorFlow graph (.pb)",
    ".h5": "a Keras / HDF5 file (.h5)",
    ".keras": "a Keras model (.keras)",
    ".engine": "a TensorRT engine (.engine)",
}


def not_torch_save(path: Any) -> str | None:
    """What ``path`` is, in words, where it is a file of another format than ``torch.save``
    writes (a zip archive with a ``data.pkl`` record, or a pickle): a JSON or text file
    (a CleanAI ``history.json`` / ``architecture.json`` / ``report.json`` named as such), an
    image, a NumPy ``.npy`` or ``.npz``, another zip archive; ``None`` for a ``torch.save``
    file, an empty or unreadable one (the callers' own errors say so). ``torch.load`` read
    them all as a pickle, so a JSON file given as ``--weights`` was "a pickled model or
    checkpoint ... add --trust-model" and as ``--data`` "UnpicklingError: Weights only load
    failed. In PyTorch 2.6, we changed the default ...". Reads at most the first 64 KiB."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
        if not head:
            return None
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                return None
            if names and all(n.endswith(".npy") for n in names):
                return "a NumPy .npz archive (numpy.savez)"
            held = ", ".join(map(repr, names[:3])) or "nothing"
            return f"a zip archive without torch.save's records (it holds {held})"
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    if head[:1] == b"\x80":  # a pickle (protocol 2 and later: what torch.save writes outside a zip)
        return None
    found = next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)
    if found is not None:
        return found
    if head.startswith(b"PK"):  # a zip cut short: the callers' "truncated or damaged" says so
        return None
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        text = head[: exc.start].decode("utf-8-sig") if exc.start >= len(head) - 4 else None  # a character cut
    if text is None or any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        suffix = os.path.splitext(str(path))[1].lower()
        if suffix == ".safetensors":  # read by its own reader, whose error says what is wrong
            return None
        return _BY_SUFFIX.get(suffix, "a file of another format (neither a zip archive nor a pickle)")
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        return _json_kind(path)
    return "a text file"


def _json_kind(path: Any) -> str:
    """A JSON file in words, a file CleanAI wrote named by its role."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            data = json.load(fh) if os.path.getsize(path) <= 64 * 2**20 else None
    except (OSError, ValueError, RecursionError):
        return "a JSON (or other text) file"
    return cleanai_json_kind(data) or "a JSON file"


def cleanai_json_kind(data: Any) -> str | None:
    """Which file of a CleanAI run ``data`` (read from JSON) is, in words, else ``None``."""
    if not isinstance(data, dict):
        return None
    if str(data.get("format", "")).startswith("cleanai-history"):
        return "a pruning history (history.json of a folder cleanai prune or save_pruned wrote)"
    if "spec" in data and "format" in data and "settings" in data:
        return "the architecture.json of a folder cleanai prune or save_pruned wrote"
    if "params_before" in data or "skipped_groups" in data or isinstance(data.get("sensitivity"), dict):
        return "a report.json that cleanai prune or cleanai sensitivity wrote"
    if "_sources" in data:
        return "a config.json that cleanai prune wrote (give it as --config)"
    return None


def not_torch_save_error(path: Any, what: str, fix: str) -> UserError | None:
    """The :class:`UserError` for ``what`` (``"--data"``, ``"weights file"``) at ``path``
    where :func:`not_torch_save` tells what else it is, ending with ``fix``; else ``None``."""
    kind = not_torch_save(path)
    if kind is None:
        return None
    return UserError(f"{what} {str(path)!r} is not a file written by torch.save: it is {kind}. {fix}")


_SAVED_FILES = ("architecture.json", "history.json", "model.pt")


def _ours(path: str) -> bool:
    """Whether the JSON file at ``path`` is one a CleanAI run writes (:func:`cleanai_json_kind`)."""
    try:
        if os.path.getsize(path) > 64 * 2**20:
            return False
        with open(path, encoding="utf-8-sig") as fh:
            return cleanai_json_kind(json.load(fh)) is not None
    except (OSError, ValueError, RecursionError):
        return False


def cleanai_folder_kind(path: Any) -> tuple[str, str] | None:
    """Which folder of a CleanAI run ``path`` is and what to do, in words, else ``None``: a
    pruned model (``cleanai prune`` / ``save_pruned``), one missing some of its three files,
    or an analysis ``cleanai sensitivity`` wrote. As ``--data`` they were "image folder ...
    has no class sub-folders"; as ``--model`` an incomplete one or an analysis was "a folder;
    give a model file, ... or a folder written by `cleanai prune`"."""
    try:
        folder = os.fspath(path)
        if not os.path.isdir(folder):
            return None
        present = [n for n in _SAVED_FILES if os.path.isfile(os.path.join(folder, n))]
        if len(present) == len(_SAVED_FILES):
            return (
                "a folder cleanai prune or save_pruned wrote, a pruned model",
                "give it as --model to prune it further",
            )
        if all(os.path.isfile(os.path.join(folder, n)) for n in ("sensitivity.svg", "report.json")):
            what = "a folder cleanai sensitivity wrote, an analysis that holds no model"
            return what, "its config.json names the model and data it measured"
        ours = [n for n in ("architecture.json", "history.json") if n in present and _ours(os.path.join(folder, n))]
        if ours:  # a Keras training run's history.json beside the class folders of an image data set is data
            missing = " and ".join(n for n in _SAVED_FILES if n not in present)
            what = f"a folder cleanai prune or save_pruned wrote that lacks {missing}"
            return what, "a copy that missed files, or a damaged folder: save the pruned model again or copy all of it"
    except (OSError, TypeError, ValueError):
        return None
    return None
