"""Imports a run needs, with an error that says what is at fault: optional extras (timm,
torchvision, transformers, PyYAML) imported where a feature needs them, and modules the user
names (``--plugin MODULE``, ``package.module:callable`` specs).

Glossary:

- *extra*: a package CleanAI runs without, imported only by the feature that reads it
  (``timm:NAME`` specs, image folders, ``hf:`` models, YAML configs).
- *missing*: the extra itself is not installed: the fix is to install it.
- *broken*: the extra is installed but importing it fails, because a package it imports
  is missing (torchvision without Pillow or NumPy) or it was built for another torch
  (``RuntimeError: operator torchvision::nms does not exist``). Installing it again
  as the message said for *missing* does nothing; the fix is the package it names or a
  version that matches torch.

The import sites caught ``ImportError`` and said "needs torchvision: pip install
torchvision" for all three (torchvision installed, Pillow missing), or caught nothing, so a
torchvision built for another torch stopped the run as "raised by code outside CleanAI (the
model's forward, a data set, a factory or a plugin)", exit 1.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

from cleanai_core.errors import UserError

__all__ = ["check_file_spec", "file_spec_problem", "import_extra", "module_name_problem", "search_path_hint"]


def import_extra(name: str, use: str, install: str, instead: str = "", package: str = "") -> ModuleType:
    """``importlib.import_module(name)``; a :class:`UserError` that names the problem where
    it fails. ``use`` says what needs it (``"timm:NAME"``, ``"reading image folders"``),
    ``install`` how to get it (``"pip install timm"``), ``instead`` a sentence on doing
    without it, ``package`` the distribution's name where it is not the module's
    (``PyYAML`` for ``yaml``).

    >>> import_extra("json", "reading JSON", "it ships with Python").__name__
    'json'
    """
    root = name.split(".")[0]
    package = package or root
    tail = f" {instead}" if instead else ""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if not _installed(root):
            raise UserError(f"{use} needs {package}, which is not installed: {install}.{tail}") from None
        gone = exc.name or ""
        if gone and gone != root and not gone.startswith(root + "."):
            raise UserError(
                f"{use} needs {package}, which is installed but cannot be imported: it imports {gone!r}, which is "
                f"missing ({type(exc).__name__}: {exc}). Install the package that provides {gone!r}, or reinstall "
                f"{package} with its dependencies (pip install --force-reinstall {package}).{tail}"
            ) from exc
        raise _broken(package, use, install, tail, exc) from exc
    except Exception as exc:  # noqa: BLE001 - any failure at import is the installation's, not the run's
        raise _broken(package, use, install, tail, exc) from exc


def _installed(root: str) -> bool:
    try:
        return importlib.util.find_spec(root) is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without __spec__
        return True


def _broken(package: str, use: str, install: str, tail: str, exc: BaseException) -> UserError:
    import torch

    return UserError(
        f"{use} needs {package}, which is installed but fails to import ({type(exc).__name__}: {exc}). Its install "
        f"is damaged or does not fit the packages beside it (a build for another torch: this is torch "
        f"{torch.__version__}): reinstall a matching version ({install}).{tail}"
    )


def module_name_problem(name: str) -> str | None:
    """Why ``name`` is no module name, as the rest of a sentence that starts with what the
    user gave (``"--plugin 'x.py' "``), or ``None``. Nothing is imported."""
    if not name.strip():
        return "is empty; give a module's import name (package.module)."
    path = Path(name)
    a_file = name.endswith(".py") and (path.is_file() or "." not in name[: -len(".py")])  # not package.py
    if not (a_file or "/" in name or os.sep in name or name.startswith(".")):
        return None
    module = path.stem if path.suffix == ".py" else path.name
    folder = str(path.parent) if str(path.parent) not in ("", ".") else "."
    found = "" if path.is_file() else " (there is no such file either)"
    return (
        f"is a file path{found}, where a module's import name goes: give {module!r} and put its folder on Python's "
        f"module search path (PYTHONPATH={folder} cleanai ...)."
    )


#: ``PATH.py:callable``: a model factory or data function named by its file
_FILE_SPEC = re.compile(r"^(?P<file>.+\.py):[A-Za-z_][\w.]*$")


def file_spec_problem(spec: str) -> str | None:
    """For a ``package.module:callable`` spec written with a file path (``./models.py:build``),
    why it is none, as :func:`module_name_problem` says it; else ``None``."""
    match = _FILE_SPEC.match(spec)
    return module_name_problem(match["file"]) if match else None


def check_file_spec(spec: str, flag: str, what: str) -> None:
    """A :class:`UserError` where ``spec`` (given as ``flag``) is a ``PATH.py:callable``
    that is not itself a file: ``what`` it names (``"a model factory"``) is by its file."""
    problem = file_spec_problem(spec) if not Path(spec).exists() else None
    if problem:
        raise UserError(f"{flag} {spec!r} names {what} by its file: {spec.partition(':')[0]!r} {problem}")


def search_path_hint(name: str, exc: ImportError) -> str:
    """A sentence (with a leading space) where ``name`` failed to import because its top
    package is not on the search path but is in the current folder; else ``""``."""
    top = name.split(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or exc.name != top:
        return ""
    here = Path.cwd()
    found = next((f for f in (f"{top}.py", f"{top}/__init__.py") if (here / f).is_file()), None)
    if found is None or any(os.path.abspath(p or ".") == str(here) for p in sys.path):
        return ""
    return (
        f" There is {found!r} in the current folder, but the cleanai command does not import from the current folder: "
        "run it as PYTHONPATH=. cleanai ..."
    )
