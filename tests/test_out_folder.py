"""The output folder never loses what the run did not write (docs/reliability.md).

Either the previous content or the complete new result, whatever happens: files added
during a run, a second run into the same folder, inputs under --out, interrupts and
SIGTERM at any step, a full disk, a read-only file system, a mount point, a symlink."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cleanai_core import out_folder
from cleanai_core.cli import main
from cleanai_core.errors import UserError
from cleanai_core.history import PruningHistory
from cleanai_core.io import save_pruned
from cleanai_core.job import run as prune_cli
from cleanai_core.out_folder import folder_lock
from cleanai_plugins.io.demo import MODEL_SPEC

LITTER = re.compile(r"\.(tmp-|swap\.old-|probe-)|\.lock$|\.tmp$")
RESULT = {"architecture.json", "config.json", "history.json", "model.pt", "report.json", "report.md", "report.svg"}


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def litter(*folders: Path) -> list[str]:
    return [p.name for f in folders if f.is_dir() for p in f.rglob("*") if LITTER.search(p.name)]


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


@pytest.fixture()
def ws(tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.save((torch.rand(12, 1, 8, 8), torch.randint(0, 10, (12,))), tmp_path / "data.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def prune(*extra: str, model: str = MODEL_SPEC) -> int:
    return main(
        ["prune", "--model", model, "--data", "data.pt", "--out", "out", "--quiet", "--latency-repeats", "1", *extra]
    )


def during_run(monkeypatch, action) -> None:
    """Run ``action`` in the middle of the job (after pruning, before writing)."""
    real = prune_cli._latencies

    def latencies(*args, **kwargs):
        action()
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_cli, "_latencies", latencies)


def test_a_file_put_into_out_during_the_run_survives_and_the_run_fails(ws, monkeypatch, capsys):
    during_run(monkeypatch, lambda: (ws / "out").mkdir() or (ws / "out" / "mine.txt").write_text("keep me"))
    assert prune() == 2
    err = capsys.readouterr().err
    assert "changed" in err and "mine.txt" in err, err
    assert tree(ws / "out") == {"mine.txt": hashlib.sha256(b"keep me").hexdigest()}
    assert litter(ws) == []


def test_a_file_added_to_an_overwritten_out_during_the_run_survives(ws, monkeypatch, capsys):
    assert prune() == 0
    old = tree(ws / "out")
    during_run(monkeypatch, lambda: (ws / "out" / "notes.txt").write_text("mine"))
    assert prune("--overwrite", "--ratio", "0.5") == 2
    assert "notes.txt" in capsys.readouterr().err
    now = tree(ws / "out")
    assert now.pop("notes.txt") == hashlib.sha256(b"mine").hexdigest() and now == old
    assert litter(ws) == []


def test_a_second_run_into_a_locked_out_is_refused(ws, capsys):
    with folder_lock(ws / "out"):
        assert prune() == 2
        assert "another cleanai run" in capsys.readouterr().err
    assert not (ws / "out").exists()
    assert prune() == 0 and set(tree(ws / "out")) == RESULT
    assert litter(ws) == []  # the lock file is removed with the lock


@pytest.mark.parametrize("layout", ["module", "package"])
def test_overwrite_never_deletes_the_source_of_the_model_factory(ws, monkeypatch, capsys, layout):
    (ws / "out").mkdir()
    code = "from cleanai_plugins.io.demo import DigitsCNN\n\ndef build():\n    return DigitsCNN(width=8)\n"
    if layout == "module":
        src = ws / "out" / "myarch.py"
    else:
        (ws / "out" / "myarch").mkdir()
        src = ws / "out" / "myarch" / "__init__.py"
    src.write_text(code)
    monkeypatch.syspath_prepend(str(ws / "out"))
    assert prune("--overwrite", model="myarch:build") == 2
    assert "contains your input" in capsys.readouterr().err
    assert src.read_text() == code


def test_overwrite_never_deletes_code_the_run_imported_from_out(ws, monkeypatch, capsys):
    """The factory lives outside --out but imports a helper module that lives inside it."""
    (ws / "out").mkdir()
    (ws / "out" / "helper_in_out.py").write_text("WIDTH = 8\n")
    (ws / "lib").mkdir()
    (ws / "lib" / "outer_arch.py").write_text(
        "import sys\nsys.path.insert(0, 'out')\nimport helper_in_out\n"
        "from cleanai_plugins.io.demo import DigitsCNN\n\n"
        "def build():\n    return DigitsCNN(width=helper_in_out.WIDTH)\n"
    )
    monkeypatch.syspath_prepend(str(ws / "lib"))
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    try:
        assert prune("--overwrite", model="outer_arch:build") == 2
    finally:
        __import__("sys").modules.pop("helper_in_out", None)
        __import__("sys").modules.pop("outer_arch", None)
    assert "holds code this run imported" in capsys.readouterr().err
    assert (ws / "out" / "helper_in_out.py").read_text() == "WIDTH = 8\n"
    assert litter(ws) == []


@pytest.mark.usefixtures("sigint_raises")
@pytest.mark.parametrize("where", ["run", "nested swap"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_run_leaves_the_previous_result_and_no_litter(ws, monkeypatch, capsys, signum, where):
    """During the work, or while save_pruned commits into the run's staged folder."""
    assert prune() == 0
    old = tree(ws / "out")
    if where == "run":
        during_run(monkeypatch, lambda: signal.raise_signal(signum))
    else:
        real = out_folder.commit_folder

        def commit(staged, out, expected=out_folder.UNCHECKED):
            if Path(out).name != "out":
                signal.raise_signal(signum)  # to this thread, at once (os.kill may pick another thread)
            real(staged, out, expected)

        monkeypatch.setattr(out_folder, "commit_folder", commit)
    rc = prune("--overwrite", "--ratio", "0.5")
    assert rc == (143 if signum == signal.SIGTERM else 130)
    assert "nothing was written" in capsys.readouterr().err
    assert tree(ws / "out") == old and litter(ws) == []


def test_a_signal_during_the_swap_is_held_until_the_result_is_complete(ws, monkeypatch, capsys):
    assert prune() == 0
    real = out_folder.commit_folder

    def commit(staged, out, expected=out_folder.UNCHECKED):
        if Path(out).name == "out":  # the swap into --out (not save_pruned's into the staged folder)
            signal.raise_signal(signal.SIGTERM)  # arrives in the middle of the swap, in this thread
        real(staged, out, expected)

    monkeypatch.setattr(out_folder, "commit_folder", commit)
    assert prune("--overwrite", "--ratio", "0.5") == 143
    assert "complete result was written" in capsys.readouterr().err
    report = (ws / "out" / "report.json").read_text()
    assert '"pruning_ratio": 0.5' in report and set(tree(ws / "out")) == RESULT
    assert litter(ws) == []


@pytest.mark.parametrize("mount", [False, True])
def test_a_file_added_after_the_last_check_is_put_back_not_deleted(ws, monkeypatch, capsys, mount):
    """The race between the final check and the swap: the old folder is compared again
    once it is moved aside (or, in a mount point, only entries it held at the start go)."""
    assert prune() == 0
    old = tree(ws / "out")
    if mount:
        monkeypatch.setattr(out_folder, "is_mount", lambda target: Path(target) == ws / "out")
    real = out_folder.commit_folder

    def commit(staged, out, expected=out_folder.UNCHECKED):
        if Path(out).name == "out":
            (ws / "out" / "late.txt").write_text("just in time")
        real(staged, out, expected)

    monkeypatch.setattr(out_folder, "commit_folder", commit)
    rc = prune("--overwrite", "--ratio", "0.5")
    now = tree(ws / "out")
    assert now.pop("late.txt") == hashlib.sha256(b"just in time").hexdigest()
    if mount:  # filled in place: the new result, and the late file kept beside it
        assert rc == 0 and set(now) == RESULT
    else:
        assert rc == 2 and now == old and "changed at the moment" in capsys.readouterr().err
    assert litter(ws) == []


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full"), (errno.EACCES, "permission denied")],
)
def test_an_unwritable_out_is_refused_before_the_heavy_work(ws, monkeypatch, capsys, code, words):
    real = out_folder.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if ".probe-" in kwargs.get("prefix", ""):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(out_folder.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(prune_cli, "load_inputs", lambda cfg: pytest.fail("loaded the model before the probe"))
    assert prune() == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert not (ws / "out").exists() and litter(ws) == []


def test_a_disk_that_fills_up_while_saving_is_a_clear_error(ws, monkeypatch, capsys):
    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(out_folder.TrackedWriter, "raw_write", full)
    assert prune() == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "Traceback" not in err, err
    assert not (ws / "out").exists() and litter(ws) == []


def test_a_symlinked_out_stays_a_link_and_an_existing_folder_keeps_its_mode(ws):
    (ws / "real").mkdir()
    os.chmod(ws / "real", 0o750)
    (ws / "out").symlink_to(ws / "real", target_is_directory=True)
    assert prune("--overwrite") == 0
    assert (ws / "out").is_symlink() and set(tree(ws / "real")) == RESULT
    assert (ws / "real").stat().st_mode & 0o777 == 0o750
    assert litter(ws) == []


@pytest.mark.parametrize("previous", [True, False])
def test_a_mount_point_out_is_filled_in_place(ws, monkeypatch, previous):
    """A container volume as --out: it cannot be renamed and its parent may be another
    file system, so the staged folder and the lock live inside it."""
    (ws / "out").mkdir()
    if previous:
        assert prune("--overwrite") == 0
    inode = (ws / "out").stat().st_ino
    monkeypatch.setattr(out_folder, "is_mount", lambda target: Path(target) == ws / "out")
    real = os.rename

    def rename(src, dst, *a, **k):
        assert Path(src) != ws / "out", "renamed the mount point"
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", rename)
    assert prune("--overwrite", "--ratio", "0.5") == 0
    assert (ws / "out").stat().st_ino == inode and set(tree(ws / "out")) == RESULT
    assert '"pruning_ratio": 0.5' in (ws / "out" / "report.json").read_text()
    assert litter(ws) == []


# ---------------------------------------------------------------------------
# save_pruned and the commit, with faults injected at every write step
# ---------------------------------------------------------------------------


def tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def tiny_net() -> nn.Module:
    """``tiny``'s architecture, the spec its folders name (save_pruned checks that it rebuilds them)."""
    return tiny(0)


def save(folder: Path, seed: int) -> None:
    save_pruned(folder, tiny(seed), PruningHistory(), "test_out_folder:tiny_net", save_pickle=False)


WRITE_STEPS = ("replace", "rename", "link", "fsync", "chmod", "mkdir")


class Faults:
    """Counts write steps; raises ``error`` at step ``at``."""

    def __init__(self, monkeypatch, at: int, error: BaseException) -> None:
        self.n, self.at, self.error, self.fired = 0, at, error, False
        for name in WRITE_STEPS:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))
        real_write = out_folder.TrackedWriter.raw_write
        monkeypatch.setattr(out_folder.TrackedWriter, "raw_write", self._wrap(real_write))

    def _wrap(self, fn):
        def wrapped(*args, **kwargs):
            self.n += 1
            if self.n == self.at:
                self.fired = True
                raise self.error
            return fn(*args, **kwargs)

        return wrapped


@pytest.mark.slow
@settings(
    max_examples=int(os.environ.get("CLEANAI_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    at=st.integers(1, 40),
    kind=st.sampled_from(["interrupt", "enospc", "eio"]),
    previous=st.booleans(),
    foreign=st.booleans(),
)
def test_save_pruned_leaves_the_old_folder_or_the_complete_new_one(tmp_path_factory, at, kind, previous, foreign):
    root = tmp_path_factory.mktemp("faults")
    folder = root / "o"
    if previous:
        save(folder, seed=1)
    if foreign:
        folder.mkdir(exist_ok=True)
        (folder / "user-notes.txt").write_text("mine")
    old = tree(folder) if folder.exists() else None
    save(root / "expected", seed=2)
    expected = tree(root / "expected") | ({"user-notes.txt": tree(folder)["user-notes.txt"]} if foreign else {})
    error = (
        KeyboardInterrupt() if kind == "interrupt" else OSError(errno.ENOSPC if kind == "enospc" else errno.EIO, "x")
    )
    with pytest.MonkeyPatch.context() as mp:
        faults = Faults(mp, at, error)
        try:
            save(folder, seed=2)
        except KeyboardInterrupt:
            assert kind == "interrupt"
        except UserError as exc:
            assert kind != "interrupt" and "cannot write" in str(exc)
    now = tree(folder) if folder.exists() else None
    if faults.fired:
        assert now in (old, expected), (faults.n, now)
    else:
        assert now == expected
    assert litter(root) == []


def test_save_pruned_into_an_existing_folder_keeps_other_files_and_replaces_its_own(tmp_path):
    save(tmp_path / "o", seed=1)
    (tmp_path / "o" / "model_full.pt").write_bytes(b"stale pickle")
    (tmp_path / "o" / "sub").mkdir()
    (tmp_path / "o" / "sub" / "n.txt").write_text("mine")
    save(tmp_path / "o", seed=2)
    save(tmp_path / "e", seed=2)
    now = tree(tmp_path / "o")
    assert now.pop("sub/n.txt") == hashlib.sha256(b"mine").hexdigest()
    assert now == tree(tmp_path / "e")  # the stale model_full.pt of the earlier save is gone


def test_a_mount_point_that_cannot_be_renamed_gets_its_content_replaced(tmp_path, monkeypatch):
    save(tmp_path / "o", seed=1)
    (tmp_path / "o" / "old-only.txt").write_text("x")
    inode = (tmp_path / "o").stat().st_ino
    real = os.rename

    def rename(src, dst, *a, **k):
        if Path(src) == tmp_path / "o":
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", rename)
    staged = tmp_path / ".o.tmp-x"
    staged.mkdir()
    save(tmp_path / "e", seed=2)
    for p in (tmp_path / "e").iterdir():
        (staged / p.name).write_bytes(p.read_bytes())
    with out_folder.signals_deferred():
        out_folder.commit_folder(staged, tmp_path / "o")
    assert (tmp_path / "o").stat().st_ino == inode
    assert tree(tmp_path / "o") == tree(tmp_path / "e") and litter(tmp_path) == []


def test_save_pruned_refuses_a_file_path(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        save(tmp_path / "f", seed=1)
