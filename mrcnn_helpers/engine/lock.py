"""The results-directory lock: one training run writes a RESULTS_DIR at a time.

Two runs on the same directory would interleave checkpoints, prune each other's files and resume
from each other's half-finished steps. The run that writes RESULTS_DIR therefore holds an
exclusive `fcntl.flock` on RESULTS_DIR/.lock, a file that holds the holder's pid for the error
message. The operating system drops the lock when the holder exits in any way (SIGKILL
included), so a `.lock` left behind by a dead run is simply locked again by the next one; the
file itself is never removed (removing it could let two runs lock two different files of the
same name).

On platforms without fcntl (Windows) the lock is not taken.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mrcnn_helpers.errors import TrainingError
from mrcnn_helpers.fileio import describe_os_error

try:
    import fcntl
except ImportError:  # Windows: no advisory locks through fcntl
    fcntl = None

LOCK_NAME = ".lock"


class ResultsLock:
    """Exclusive lock of a results directory, as a context manager.

        with ResultsLock(results_dir):
            ...  # this process alone writes results_dir

    Acquiring never waits: a directory locked by another process raises TrainingError at once,
    naming the holder's pid. Released on exit from the block (and by the OS when the process
    dies).
    """

    def __init__(self, results_dir: str | os.PathLike):
        self.path = Path(results_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> ResultsLock:
        if fcntl is None or self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TrainingError(f"cannot open the lock file {self.path}: "
                                f"{describe_os_error(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            raise TrainingError(_refusal(self.path, holder)) from None
        # Written in place, not through an atomic rename: the lock belongs to this inode, and a
        # replaced file would be a new, unlocked one.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> ResultsLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _refusal(path: Path, holder: int | None) -> str:
    text = (f"{path.parent} is in use by another training run (pid {holder or '?'} holds "
            f"{path}); wait for it to end or stop it, or use another results directory")
    if holder is not None and not _alive(holder):
        # Forked children (data loader workers) share the lock and outlive a killed parent by
        # a few seconds, until they notice it is gone.
        text += (f"; pid {holder} has exited, but processes it started still hold the lock: "
                 "retry in a few seconds")
    return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
