"""The ``cleanai`` command. One module per subcommand, each exposing
``add_parser(subparsers)`` (returns its parser) and ``run(args) -> int``; plugins add
theirs (``cleanai demo`` among them) through the ``cleanai_commands`` hook."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from cleanai_core import __version__
from cleanai_core.errors import CleanAIError, UserError
from cleanai_core.extras import module_name_problem, search_path_hint

__all__ = ["main"]

COMMANDS = ("prune", "sensitivity", "plugins", "explain")


def use_plugins(disabled: list[str], extra: list[str]) -> None:
    """The process's plugin manager without the ``--disable-plugin`` ones and with the
    ``--plugin`` modules registered (a module typed on the command line: importing it is
    the user's choice, as for ``--model package.module:factory``)."""
    if not disabled and not extra:
        return
    from pluggy import PluginValidationError

    from cleanai_core.plugins import make_plugin_manager, set_plugin_manager

    pm = make_plugin_manager(disabled=disabled)
    for name in extra:
        problem = module_name_problem(name)
        if problem:
            raise UserError(f"--plugin {name!r} {problem}")
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise UserError(
                f"--plugin {name}: {exc}; give the import name of a plugin module.{search_path_hint(name, exc)}"
            ) from None
        except (Exception, SystemExit) as exc:  # its own code failed at import: a traceback, or exit 0 doing nothing
            exited = isinstance(exc, SystemExit)
            what = f"called sys.exit({exc.code!r})" if exited else f"raised {type(exc).__name__}: {str(exc)[:200]}"
            raise UserError(
                f"--plugin {name}: importing the module {what}; nothing was run. Fix the module or leave --plugin "
                f"{name} out."
            ) from None
        try:
            pm.register(module, name=name)
            pm.check_pending()  # a hook implementation of a name no hook has (a misspelling)
        except PluginValidationError as exc:  # ... or of arguments the hook does not have
            raise UserError(f"--plugin {name}: {exc}; see `cleanai plugins` and docs/hooks.md for the hooks") from None
        except ValueError:  # already registered: pluggy's message printed every registered plugin's module
            raise UserError(
                f"--plugin {name}: the module is registered already (a built-in plugin, an installed one, or given "
                f"twice); leave --plugin {name} out."
            ) from None
    set_plugin_manager(pm)


def plugin_commands() -> list[Any]:
    """The subcommands plugins contribute (``cleanai_commands``)."""
    from cleanai_core.plugins import get_plugin_manager

    commands = [c for found in get_plugin_manager().hook.cleanai_commands() for c in found or ()]
    for c in commands:
        if c.NAME in COMMANDS:
            raise CleanAIError(f"a plugin adds the command {c.NAME!r}, which cleanai has already; rename it")
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cleanai",
        description="Structured pruning of trained PyTorch models, scored on your test data.",
    )
    parser.add_argument("--version", action="version", version=f"cleanai {__version__}")
    parser.add_argument(
        "--disable-plugin",
        action="append",
        default=[],
        metavar="NAME",
        help="block a plugin by name (repeatable); also CLEANAI_DISABLED_PLUGINS=a,b",
    )
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="register a plugin module by import name for this run (repeatable), e.g. "
        "cleanai_plugins.zoo.transformers_gqa (grouped-query attention: query heads per group)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in [importlib.import_module(f"cleanai_core.cli.{name}") for name in COMMANDS]:
        module.add_parser(sub).set_defaults(_run=module.run)
    for module in plugin_commands():
        module.add_parser(sub).set_defaults(_run=module.run)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every clean-up runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    """Run ``cleanai``; returns the exit code (130 after Ctrl-C, 143 after SIGTERM)."""
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["--version"]:  # fast path: no subcommand (and no torch) import
        print(f"cleanai {__version__}")
        return 0
    command = _command_of(args_list)
    _printable_stdout()
    try:
        with _sigterm_raises(), _warnings_escaped(command):
            return _main(argv, heap=argv is None)
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        detail = str(exc) or "nothing was written"
        print(f"cleanai{' ' + command if command else ''}: {what}; {detail}.", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


def _command_of(args: list[str]) -> str:
    """The command named in ``args``, past the options before it and their values: ``cleanai
    --disable-plugin NAME prune`` was called ``cleanai NAME`` in its warnings and its interrupt."""
    takes_value = {"--disable-plugin", "--plugin"}
    it = iter(args)
    for a in it:
        if a in takes_value:
            next(it, None)
        elif not a.startswith("-"):
            return a
    return ""


def _main(argv: list[str] | None, heap: bool = False) -> int:
    """``heap``: run the command with the imports, the model and the data out of the
    collector's full passes (:func:`~cleanai_core.heap.frozen_heap`): the ``cleanai``
    process itself, not a caller of :func:`main` in a loop (garbage a freeze caught would
    wait for a full pass outside the command)."""
    from cleanai_core.heap import frozen_heap, heap_growing

    with frozen_heap() if heap else contextlib.nullcontext():
        with heap_growing():
            from cleanai_core.plugins import process_plugin_manager_restored
        with process_plugin_manager_restored():  # --disable-plugin / --plugin: this command only
            return _run_command(argv)


def _run_command(argv: list[str] | None) -> int:
    pre = argparse.ArgumentParser(add_help=False)  # the plugins decide which commands exist
    pre.add_argument("--disable-plugin", action="append", default=[])
    pre.add_argument("--plugin", action="append", default=[])
    known = pre.parse_known_args(argv)[0]
    from cleanai_core.heap import heap_growing

    with heap_growing():  # the plugins' and the commands' imports (torch)
        try:
            use_plugins(known.disable_plugin, known.plugin)
        except UserError as exc:
            print(f"cleanai: error: {_terminal(exc)}", file=sys.stderr)
            return 2
        parser = build_parser()
    args = parser.parse_args(argv)
    vars(args).pop("plugin", None)  # not a command option
    vars(args).pop("_spellings", None)  # how each option was spelt (prune.GivenOnce), not an option
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"cleanai {args.command}: error: {_terminal(exc)}", file=sys.stderr)
        return 2
    except CleanAIError as exc:
        print(f"cleanai {args.command}: failed: {_terminal(exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of the output went away (cleanai plugins | head -1)
        # it said "cannot use: Broken pipe. Check the path (its length, links and permissions) and the disk"
        _stdout_to_devnull()
        return 141  # 128 + SIGPIPE: what a shell reports for a tool the closed pipe stopped
    except OSError as exc:  # a path the OS refuses (name too long, a loop of links, no permission, I/O error)
        print(f"cleanai {args.command}: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # pragma: no branch - re-raised unless the user's own code raised it
        where = _user_code_frame(exc)
        if where is None:  # CleanAI's or torch's own: a bug to report, with its traceback
            raise
        # a model whose forward fails on some calls only, raising in a stage no message covers
        # (FLOPs counting, a sensitivity trial's BatchNorm pass): a traceback, exit 1
        print(
            f"cleanai {args.command}: failed: {type(exc).__name__}: {_terminal(str(exc)[:300])}, raised by code "
            "outside CleanAI "
            f"({where}: the model's forward, a data set, a factory or a plugin); the run stopped there and wrote "
            "nothing. Fix it there and run again.",
            file=sys.stderr,
        )
        return 1
    except SystemExit as exc:  # raised by code the run called: argparse's own exits happen above
        # a model's forward, a data set's __getitem__ or a plugin calling sys.exit(0) ended the run with
        # exit code 0 and no word, the result not written
        print(
            f"cleanai {args.command}: error: code this run called (the model's forward, the data set or a plugin) "
            f"called sys.exit({exc.code!r}) instead of returning or raising an error; the run stopped there and "
            "wrote nothing. Remove the sys.exit call (raise an exception instead).",
            file=sys.stderr,
        )
        return 2


def _user_code_frame(exc: BaseException) -> str | None:
    """``"file:line"`` of the frame that raised ``exc`` where it is the user's code (not
    CleanAI's, its plugins', torch's or the standard library's), else ``None``. Frozen
    standard-library frames (``<frozen posixpath>``) are passed over to the frame that
    called them: ``os.path.abspath`` made such a name a path in the working folder, so an
    error CleanAI's own code met in ``os.path`` (``ValueError: embedded null byte``) was
    blamed on "code outside CleanAI (the model's forward, a data set, a factory or a
    plugin)", exit 1, without its traceback."""
    import sysconfig

    tb = exc.__traceback__
    if tb is None:
        return None
    frames = []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    tb = next((t for t in reversed(frames) if not t.tb_frame.f_code.co_filename.startswith("<")), None)
    if tb is None:
        return None
    file = os.path.abspath(tb.tb_frame.f_code.co_filename)
    libs = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    if _cleanai_file(file) or any(file.startswith(d + os.sep) for d in libs):
        return None
    return f"{file}:{tb.tb_lineno}"


def _cleanai_file(file: str) -> bool:
    """Whether ``file`` is a module of CleanAI's own (``cleanai_core``, ``cleanai_plugins``)."""
    # the folder that holds cleanai_core (this file is cleanai_core/cli/__init__.py): two levels up was
    # cleanai_core itself, so in a source checkout or an editable install CleanAI's own errors were
    # blamed on "code outside CleanAI", one line without their traceback
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    file = os.path.abspath(file)
    return any(file.startswith(os.path.join(root, d) + os.sep) for d in ("cleanai_core", "cleanai_plugins"))


def _terminal(message: Any) -> str:
    """A message as the terminal gets it: each line with the characters a terminal acts on
    (escape sequences, carriage returns) escaped (``errors.printable``). A module name in a
    model's code reaches errors and warnings as it is: ``"\\x1b[2J"`` cleared the screen."""
    from cleanai_core.errors import printable

    return "\n".join(printable(line) for line in str(message).split("\n"))


@contextlib.contextmanager
def _warnings_escaped(command: str = "") -> Iterator[None]:
    """Warnings printed during the command pass :func:`_terminal` (put back afterwards).
    CleanAI's own read as its other notes, ``cleanai prune: warning: ...``: they came as
    Python prints a warning, with the path of CleanAI's module, the line number and the
    line of its source (``/.../cleanai_core/job/run.py:319: RuntimeWarning: target_flops=0.999
    ...`` and then ``removed = pruner.plan().n_pruned``), which says nothing to a user of the
    command. Warnings of other code (the model's, torch's) keep where they come from."""
    import warnings

    shown = warnings.formatwarning

    def formatted(message: Any, category: Any, filename: str, *args: Any, **kwargs: Any) -> str:
        if _cleanai_file(filename):  # a message of its own that says "cleanai: ..." is not said twice
            text = str(message).removeprefix("cleanai: ")
            return f"cleanai{' ' + command if command else ''}: warning: {_terminal(text)}\n"
        return shown(_terminal(message), category, filename, *args, **kwargs)

    warnings.formatwarning = formatted
    try:
        yield
    finally:
        warnings.formatwarning = shown


def _printable_stdout() -> None:
    """Let stdout write what its encoding cannot (a path or layer name with 'ö' where the
    locale is C / ASCII, ``PYTHONIOENCODING=ascii``, a cp1252 console) as escapes, as stderr
    does: the last line, ``wrote 'öut/': ...``, raised ``UnicodeEncodeError`` after the result
    was written (exit 1, a traceback)."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if callable(reconfigure) and getattr(sys.stdout, "errors", "strict") == "strict":
        try:
            reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # a stream that cannot change: leave it
            pass


def _stdout_to_devnull() -> None:
    """Point the process's stdout at ``/dev/null``, so that the interpreter's last flush of
    what is still buffered for a closed pipe raises nothing ("Exception ignored ...")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a test's capture: nothing to flush
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system error on a file the user named: the path, the
    OS's reason and what to do."""
    path = exc.filename if exc.filename is not None else ""
    shown = str(path) if len(str(path)) <= 120 else str(path)[:100] + "..." + str(path)[-16:]
    reason = exc.strerror or str(exc) or type(exc).__name__
    if path == "":  # no file named: a connection a library opened (a model hub), a pipe, a device
        # it said "cannot use: An error happened while trying to locate the file on the Hub ... Check the path
        # (its length, links and permissions) and the disk" of no path at all
        return (
            f"{type(exc).__name__}: {str(reason)[:300]}. An operating-system or network error that names no file; "
            "CleanAI itself downloads nothing, so a model or data a library would fetch must be on this machine. "
            "Nothing was written."
        )
    return (
        f"cannot use {shown!r}: {reason}. Check the path (its length, links and permissions) and the disk, then run "
        "again."
    )


if __name__ == "__main__":
    sys.exit(main())
