"""Writing an output folder so that nothing is lost: either the previous content or the
complete new one, whatever happens.

Terms:

- *target*: the folder the result goes to. A symlinked ``--out`` is written through: the
  target is the folder the link points to, and the link stays a link.
- *staged folder*: ``.NAME.tmp-*`` next to the target, where the new result is written.
- *commit*: the staged folder replaces the target (two renames, rolled back on failure),
  with SIGINT and SIGTERM held back so that an interrupt cannot split it. A mount point
  that cannot be renamed (``EBUSY``) gets its content replaced entry by entry instead.
- *snapshot*: what the target held when the run started; the commit refuses when it
  changed (a file someone put there meanwhile is never deleted).
- *lock*: ``.NAME.lock`` next to the target, held with ``flock`` for the whole run, so two
  runs into one folder cannot both succeed.

Every ``OSError`` (disk full, read-only file system, permission denied) becomes a
:class:`UserError` that names the folder and the cause, after the staged folder is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cleanai_core.errors import UserError

__all__ = [
    "Snapshot",
    "TrackedWriter",
    "check_name",
    "commit_folder",
    "current_umask",
    "folder_lock",
    "home_of",
    "is_mount",
    "os_error",
    "signals_deferred",
    "snapshot",
    "staged_folder",
    "resolved",
    "sibling_prefix",
    "target_of",
    "write_probe",
]

Snapshot = dict[str, tuple[int, int, int]] | None
_HELD = (signal.SIGINT, signal.SIGTERM)
INSIDE = ".cleanai."  # prefix of our own entries inside a mount-point target
UNCHECKED = object()  # commit without comparing the old content with a snapshot

_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.EBUSY: "the folder is busy (a mount point?)",
    errno.ENAMETOOLONG: "the path is too long",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


def os_error(exc: OSError, folder: Path, doing: str = "write the result to") -> UserError:
    """A :class:`UserError` for an ``OSError`` met while writing ``folder``."""
    cause = _CAUSES.get(exc.errno or 0, exc.strerror or str(exc))
    where = f" ({exc.filename})" if exc.filename else ""
    parent = target_of(folder).parent
    if exc.errno == errno.ENOENT and not parent.exists():  # said "free space, fix the permissions"
        return UserError(
            f"cannot {doing} {str(folder)!r}: the folder {str(parent)!r} it goes in does not exist. Nothing was "
            "written; create that folder first (mkdir -p) or choose another folder with --out."
        )
    return UserError(
        f"cannot {doing} {str(folder)!r}: {cause}{where}. Nothing was changed there; free space, fix the "
        "permissions or choose another folder with --out."
    )


def holds_the_working_folder(out: Path) -> bool:
    """Whether ``out`` is the current folder, a parent of it or the home folder: replacing it
    would leave the process (and the user's shell) in a deleted folder."""
    if not out.exists():
        return False
    folder, cwd = out.resolve(), Path.cwd().resolve()
    return folder == cwd or folder in cwd.parents or folder == Path.home().resolve()


def is_mount(target: Path) -> bool:
    """Whether ``target`` is a folder on another device than its parent (a mount point,
    such as a container volume): it cannot be renamed, so work happens inside it."""
    try:
        return target.is_dir() and target.stat().st_dev != target.parent.stat().st_dev
    except OSError:
        return False


def home_of(target: Path) -> tuple[Path, str]:
    """Where the staged folder, the probe and the lock go, and their name prefix: next to
    ``target`` (``.NAME.``, :func:`sibling_prefix`), or inside it when it is a mount point
    (``.cleanai.``)."""
    return (target, INSIDE) if is_mount(target) else (target.parent, sibling_prefix(target.name, target.parent))


#: bytes kept for what follows a sibling's prefix: ``swap.old-`` and mkdtemp's 8 characters
_SUFFIX_ROOM = 24


def sibling_prefix(name: str, folder: Path) -> str:
    """The prefix of the temporary files and folders written next to ``name`` in
    ``folder`` (a staged folder, the lock, a file being replaced): ``.NAME.``, or, where
    that and a suffix would pass the file system's longest name (255 bytes), the start of
    NAME that fits with ``~`` and 8 hex digits of NAME's hash. A ``--out`` name of 250
    characters, which the file system accepts, was refused as "the path is too long": its
    ``.NAME.lock`` was longer than a name may be."""
    import hashlib

    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    raw = os.fsencode(name)
    if len(raw) + 2 + _SUFFIX_ROOM <= longest:
        return f".{name}."
    digest = hashlib.sha1(raw).hexdigest()[:8]
    keep = max(0, longest - _SUFFIX_ROOM - 2 - len(digest) - 1)
    start = raw[:keep].decode(errors="ignore")  # a character cut in half is dropped (bytes of a UTF-8 name)
    while len(os.fsencode(start)) > keep:  # surrogate-escaped bytes of a name not in UTF-8
        start = start[:-1]
    return f".{start}~{digest}."


def check_name(out: Any, what: str = "--out") -> None:
    """A :class:`UserError` where a folder name of ``out`` that the write would create (a
    part that does not exist yet, and the last part always) is no name a person means:
    blanks only (``--out ' '``), blanks at its start or end (``'pruned '``), a control
    character, the last part ``-`` (read as standard output by many tools; this writes a
    folder of files), or a first part ``~`` / ``~user`` that the shell did not expand (a
    folder named ``~`` made in the working folder). Such folders were written, named ``' '``
    or ``'-'``, and hard to find or to remove from a shell."""
    text = os.fspath(out) if isinstance(out, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text:
        return
    fix = "Give a folder name of visible characters" + (" (e.g. --out pruned)." if what == "--out" else ".")
    path = Path(text)
    if path.name == "-":
        raise UserError(
            f"{what} {text!r} would write a folder named '-': the result is a folder of files, not a stream to "
            f"standard output. {fix}"
        )
    for folder in (path, *path.parents):
        part = folder.name
        if not part or part in (".", "..") or (folder is not path and folder.exists()):
            continue  # a folder that is there already is the user's own
        control = next((c for c in part if ord(c) < 32 or ord(c) == 127), None)
        if not part.strip():
            problem = f"the folder name {part!r} is blanks only, which a listing shows as nothing"
        elif control is not None:
            problem = f"the folder name {part!r} holds the control character {control!r}, which terminals do not show"
        elif part != part.strip():
            problem = (
                f"the folder name {part!r} has blanks at its {'start' if part[0].isspace() else 'end'}, so it looks "
                f"like {part.strip()!r} but is another folder (a quoting mistake?)"
            )
            fix = f"Give {str(folder.with_name(part.strip()) / path.relative_to(folder))!r} if that is what you meant."
        elif part.startswith("~") and folder.parent == Path(".") and os.path.expanduser(part) != part:
            problem = (
                f"the folder {part!r} would be made here, in {os.getcwd()!r}, not your home: '~' was not expanded "
                "(a quoted path, --out=~/..., or a config file)"
            )
            fix = f"Give {os.path.expanduser(text)!r} if that is what you meant."
        else:
            continue
        raise UserError(f"{what} {text!r}: {problem}; nothing was written. {fix}")


def target_of(out: Path) -> Path:
    """The folder that receives the result: ``out`` itself, or where a symlink points. A
    link that leads back to itself (``ln -s out out``) is a :class:`UserError`: pathlib's
    ``RuntimeError: Symlink loop from ...`` came out of ``save_pruned`` and ``cleanai prune``
    as a traceback."""
    return resolved(out) if out.is_symlink() else out.absolute()


def resolved(path: Path) -> Path:
    """``path.resolve()``, with a loop of symbolic links on the way (``ln -s out out``, or in
    a folder above) a :class:`UserError` naming it instead of pathlib's ``RuntimeError:
    Symlink loop from ...`` (a traceback out of ``save_pruned`` and ``cleanai prune``)."""
    try:
        return path.resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # RuntimeError up to Python 3.12, OSError(ELOOP) after
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            raise
        raise UserError(
            f"{str(path)!r} goes through a loop of symbolic links (a link that leads back to itself); nothing can "
            "be written there. Remove the link or give another folder."
        ) from None


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the duration: a signal that arrives meanwhile is
    recorded and handed to the previous handler when the block ends (a process-wide signal
    mask would not do: torch's worker threads receive signals the main thread blocks)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in _HELD}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            handler = old[s]
            if callable(handler):
                handler(s, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(s)


def snapshot(folder: Path) -> Snapshot:
    """Every entry under ``folder`` with (inode, size, mtime); ``None`` when it does not exist."""
    if not folder.is_dir():
        return None
    out: dict[str, tuple[int, int, int]] = {}
    for root, dirs, files in os.walk(folder):
        if Path(root) == folder:
            dirs[:] = [d for d in dirs if not d.startswith(INSIDE)]
            files = [f for f in files if not f.startswith(INSIDE)]
        for name in dirs + files:
            p = Path(root) / name
            st = p.lstat()
            out[str(p.relative_to(folder))] = (st.st_ino, st.st_size if name in files else 0, st.st_mtime_ns)
    return out


def _made_parents(folder: Path) -> list[Path]:
    """Create ``folder``'s missing parents; return the ones created (outermost last)."""
    missing = []
    p = folder.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
    return missing


def write_probe(out: Path) -> None:
    """Fail early, before the heavy work, when the folder that will hold ``out``'s staged
    copy cannot be written (read-only, permissions, a full disk)."""
    target = target_of(out)
    created: list[Path] = []
    try:
        created = _made_parents(target)
        home, prefix = home_of(target)
        fd, probe = tempfile.mkstemp(prefix=f"{prefix}probe-", dir=home)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied", str(target))
    except OSError as exc:
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise os_error(exc, out) from None


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` next to ``out``'s target for the duration; refuse when another
    run holds it."""
    import fcntl

    target = target_of(out)
    home, prefix = home_of(target)
    lock = home / f"{prefix}lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise os_error(exc, out, "create a lock file next to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"another cleanai run is writing to {str(out)!r} (it holds {str(lock)!r}); wait for it to finish "
                "or choose another --out."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it as we opened it: take the new one
    try:
        yield
    finally:
        with signals_deferred():
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _replace_contents(staged: Path, target: Path, expected: Any = UNCHECKED) -> None:
    """Fallback commit for a target that cannot be renamed (a mount point): move each
    entry of ``staged`` into ``target`` with ``os.replace`` and drop entries that are not
    in ``staged`` (only those in ``expected``, the snapshot taken at the start, when one is
    given). The folder itself (and its permissions) stays."""
    new = {p.name for p in staged.iterdir()}
    ours = None if expected is UNCHECKED else {k.split(os.sep)[0] for k in expected or {}}
    for name in sorted(new):
        src, dst = staged / name, target / name
        if src.is_dir() and dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{INSIDE}swap.old-", dir=target))
            os.replace(dst, old / "x")
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
    for p in list(target.iterdir()):
        if p.name not in new and not p.name.startswith(INSIDE) and (ours is None or p.name in ours):
            _remove(p)
    staged.rmdir()


def commit_folder(staged: Path, out: Path, expected: Any = UNCHECKED) -> None:
    """Make ``staged`` the content of ``out``'s target (call under :func:`signals_deferred`).

    The target keeps its permissions. With ``expected`` (a :func:`snapshot`), the old
    content is compared once it is moved aside, and put back if it changed since. On any
    failure the target is as before and the staged folder is left for the caller to remove."""
    target = target_of(out)
    if staged.parent == target:  # staged inside a mount point
        _replace_contents(staged, target, expected)
        return
    if not target.exists():
        os.rename(staged, target)  # an empty folder created meanwhile is replaced; a full one: ENOTEMPTY
        return
    os.chmod(staged, target.stat().st_mode & 0o7777)
    old = Path(tempfile.mkdtemp(prefix=f"{sibling_prefix(target.name, target.parent)}swap.old-", dir=target.parent))
    try:
        try:
            os.rename(target, old / "x")
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES, errno.EINVAL):
                old.rmdir()
                _replace_contents(staged, target, expected)
                return
            raise
        if expected is not UNCHECKED and snapshot(old / "x") != expected:
            os.rename(old / "x", target)  # written to after the last check: put back, untouched
            raise UserError(
                f"{str(out)!r} changed at the moment the result was to replace it; nothing in it was deleted and "
                "the result was not written. Use a folder nobody else writes to, and run again."
            )
        try:
            os.rename(staged, target)
        except BaseException:
            os.rename(old / "x", target)  # roll back
            raise
    except BaseException:
        if old.exists() and not (old / "x").exists():
            old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(
    out: Path, check: Callable[[], None] | None = None, mode: int | None = None, expected: Any = UNCHECKED
) -> Iterator[Path]:
    """Yield a new staged folder next to ``out``'s target; when the block succeeds, run
    ``check`` (which may refuse) and commit (``expected``: see :func:`commit_folder`). On
    any failure or interrupt the staged folder is removed and the target is left as it
    was; an ``OSError`` becomes a :class:`UserError`."""
    target = target_of(out)
    with signals_deferred():
        tmp = None
        try:
            _made_parents(target)
            home, prefix = home_of(target)
            tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}tmp-", dir=home))
            os.chmod(tmp, 0o777 & ~current_umask() if mode is None else mode)
        except BaseException as exc:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise os_error(exc, out) from None
            raise
    committed = False
    try:
        yield tmp
        with signals_deferred():
            if check is not None:
                check()
            commit_folder(tmp, out, expected)
            committed = True
    except BaseException as exc:
        if committed:  # an interrupt held back during the commit: the result is complete
            if isinstance(exc, KeyboardInterrupt):
                raise type(exc)(f"the complete result was written to {str(out)!r} first") from None
            raise
        with signals_deferred():
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise os_error(exc, out) from exc
        if isinstance(exc, KeyboardInterrupt) and str(exc):  # a nested commit's note is not true of ours
            raise type(exc)() from None
        raise


def current_umask() -> int:
    """The process umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class TrackedWriter:
    """A file wrapper for ``torch.save`` that keeps the real exception of a failed write
    (torch reports it as a ``RuntimeError`` from its zip writer)."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        try:
            return self.raw_write(data)
        except BaseException as exc:
            self.error = exc
            raise

    def raw_write(self, data: Any) -> int:
        """The write itself (a seam for fault-injection tests)."""
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()
