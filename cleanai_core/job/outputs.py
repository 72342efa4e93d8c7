"""The job's output folder: refuse folders that hold the user's inputs or files this run
did not write, lock ``--out``, and check at the moment of the swap that nobody changed it
(the swap itself is :func:`cleanai_core.out_folder.staged_folder`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from cleanai_core.errors import UserError
from cleanai_core.out_folder import check_name, holds_the_working_folder, resolved

__all__ = ["check_out_apart", "check_out_dir", "guard_out", "marker_text", "resolved_spec_path"]


def _is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder``, with links followed, or as written: a link
    inside ``folder`` (``--data out/d.pt`` linking to ``../d.pt``) is the user's input by
    the name they gave, and replacing the folder deleted it (the followed path alone lay
    outside)."""
    for a, b in ((path.resolve(), folder.resolve()), (Path(os.path.abspath(path)), Path(os.path.abspath(folder)))):
        if a == b or b in a.parents:
            return True
    return False


def _spec_sources(spec: str | None) -> list[str]:
    """Files an import spec ``package.module:callable`` would be imported from, found on
    ``sys.path`` without importing anything."""
    import re
    import sys

    if not spec or not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", spec):
        return []
    top = spec.partition(":")[0].split(".")[0]
    found = []
    for entry in sys.path:
        base = Path(entry or ".")
        for cand in (base / top, base / f"{top}.py"):
            if cand.exists():
                found.append(str(cand))
    return found


def check_out_dir(out: Path, overwrite: bool, inputs: list[str | None], own_marker: str | None = None) -> None:
    """Refuse an existing non-empty folder unless ``overwrite``; never one holding inputs
    (files, folders, or the source of a ``package.module:factory`` spec)."""
    check_name(out)  # --out ' ' and --out - wrote folders of those names
    resolved(out)  # a loop of links is named (pathlib's RuntimeError from the checks below)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder path.")
    if holds_the_working_folder(out):
        raise UserError(f"--out {str(out)!r} is the current folder, a parent of it or your home; give a new folder.")
    check_out_apart(out, [p for spec in inputs for p in [spec, *_spec_sources(spec)]])
    if out.is_dir() and any(out.iterdir()):
        if own_marker and (out / own_marker).is_file():
            foreign = _not_written_by_marker(out, own_marker)
            if not foreign or overwrite:
                return
            raise UserError(
                f"--out {str(out)!r} holds an earlier output of this command, and also files it did not write or "
                f"that changed since ({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); replacing the "
                "folder would delete them. Move them out, choose another --out, or add --overwrite."
            )
        if not overwrite:
            raise UserError(f"--out {str(out)!r} exists and is not empty; choose a new folder or add --overwrite.")


def check_out_apart(out: Path, inputs: list[str | None]) -> None:
    """Refuse an ``out`` that contains one of ``inputs`` (files or folders) or lies inside one
    of the folders."""
    for item in inputs:
        if not item or not (Path(item).exists() or Path(item).is_symlink()):
            continue
        if _is_within(Path(item), out):
            raise UserError(f"--out {str(out)!r} contains your input {item!r}; choose another folder.")
        if Path(item).is_dir() and _is_within(out, Path(item)):
            raise UserError(f"--out {str(out)!r} is inside your input folder {item!r}; choose another folder.")


def resolved_spec_path(spec: str | None) -> str | None:
    """The folder or file a loader's resolved spec names (``hf:/abs/folder``: a loader sets
    ``options["resolved_spec"]`` where its spec is a path), else ``None``. ``--model
    hf:llama --out llama --overwrite`` replaced the user's model folder with the result: the
    spec ``hf:llama`` is no path, so the check of ``--out`` against the inputs passed it by."""
    rest = str(spec or "").partition(":")[2]
    return rest if rest and Path(rest).is_absolute() and Path(rest).exists() else None


def _digests(folder: Path, skip: str) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` but ``skip``, by path relative to it (folders
    end in ``/``, links and other entries are named with ``?``)."""
    import hashlib

    found: dict[str, str] = {}
    for p in sorted(folder.rglob("*")):
        name = p.relative_to(folder).as_posix()
        if name == skip:
            continue
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            found[name] = "?"
        elif p.is_dir():
            found[name + "/"] = ""
        else:
            h = hashlib.sha256()
            with p.open("rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(chunk)
            found[name] = h.hexdigest()
    return found


def marker_text(folder: Path, marker: str, writer: str) -> str:
    """The marker that makes ``folder`` a command's own output (``cleanai demo`` replaces its
    own without ``--overwrite``): who wrote it and the SHA-256 of every file it holds, so a
    later run replaces only what it wrote."""
    import json

    return json.dumps({"written by": writer, "files": _digests(folder, marker)}, indent=1) + "\n"


def _not_written_by_marker(out: Path, marker: str) -> list[str]:
    """The entries of ``out`` its marker does not list or lists with other contents.
    ``cleanai demo`` replaced its output folder whole once the marker was there, so the
    files a user had put in it (notes, a fine-tuned copy) were deleted without a word. A
    marker of the earlier form (no list) vouches for the files a run writes, by name."""
    import json

    try:
        listed = json.loads((out / marker).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, TypeError, KeyError):
        listed = None
    now = _digests(out, marker)
    if not isinstance(listed, dict):  # a marker of the earlier form: the files a run writes, by name
        return [name for name in now if name not in _OUTPUT_NAMES]
    return [name for name, digest in now.items() if listed.get(name) != digest]


#: what a run writes into its output folder (a marker of the earlier form, without digests, vouches for these)
_OUTPUT_NAMES = (
    "model.pt", "history.json", "architecture.json", "config.json", "report.json", "report.md", "report.svg"
)  # fmt: skip


def guard_out(out: Path, stack: contextlib.ExitStack) -> tuple[Any, Any]:
    """Lock ``out``, probe that it can be written and remember what it holds; returns the
    check to run at the moment of the commit and the snapshot it compares with."""
    from cleanai_core.out_folder import folder_lock, snapshot, target_of, write_probe

    stack.enter_context(folder_lock(out))
    write_probe(out)
    target = target_of(out)
    start = snapshot(target)

    def check() -> None:
        import sys

        now = snapshot(target)
        if now != start:
            changed = sorted(set(now or {}) ^ set(start or {})) or sorted(now or {})
            raise UserError(
                f"while this run was going, --out {str(out)!r} changed ({', '.join(changed[:5]) or 'replaced'}); "
                "nothing in it was deleted and the result was not written. Use a folder nobody else writes to, "
                "and run again."
            )
        if start:
            used = [m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
            inside = [f for f in used if _is_within(Path(f), target)]
            if inside:
                raise UserError(
                    f"--out {str(out)!r} holds code this run imported ({inside[0]!r}); replacing the folder would "
                    "delete it. Choose another --out."
                )

    return check, start
