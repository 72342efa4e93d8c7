"""The job's output folder: refuse folders that hold the user's inputs or files this run
did not write, lock ``--out``, and check at the moment of the swap that nobody changed it
(the swap itself is :func:`cleanai_core.out_folder.staged_folder`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from cleanai_core.errors import UserError
from cleanai_core.out_folder import holds_the_working_folder, resolved

__all__ = ["check_out_dir", "guard_out"]


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
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
    resolved(out)  # a loop of links is named (pathlib's RuntimeError from the checks below)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder path.")
    if holds_the_working_folder(out):
        raise UserError(f"--out {str(out)!r} is the current folder, a parent of it or your home; give a new folder.")
    for item in [p for spec in inputs for p in [spec, *_spec_sources(spec)]]:
        if not item or not Path(item).exists():
            continue
        if _is_within(Path(item), out):
            raise UserError(f"--out {str(out)!r} contains your input {item!r}; choose another folder.")
        if Path(item).is_dir() and _is_within(out, Path(item)):
            raise UserError(f"--out {str(out)!r} is inside your input folder {item!r}; choose another folder.")
    if out.is_dir() and any(out.iterdir()):
        if own_marker and (out / own_marker).is_file():
            return
        if not overwrite:
            raise UserError(f"--out {str(out)!r} exists and is not empty; choose a new folder or add --overwrite.")


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
