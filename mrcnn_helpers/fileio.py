"""Files written safely (atomic writes, outputs kept off their inputs) and read within bounds.

Every file the toolkit writes (checkpoints, metrics, spec copies, COCO JSON, ONNX models, engines,
TFRecord shards, converted datasets, reports) goes through `atomic_write`, `atomic_write_json` or
the `atomic_output` context manager: the bytes go to a temporary file in the destination's folder,
named `.<name>.<random>.tmp`, which is flushed, fsynced and renamed over the destination
(`os.replace` is atomic within one file system). A reader therefore sees the old file or the new
one, never half of one; on any failure the temporary file is removed and the destination is left
as it was. A process killed mid-write can leave a temporary file behind: `remove_temporaries`
clears them (the trainer does at every checkpoint).

`check_output_path` is the one guard against commands that would write over what they read;
`check_writable_dir` checks an output folder before any work is done.

`check_torch_file` bounds what a `torch.save` file (checkpoint, weights file, state dict) may
expand to in memory before `torch.load` reads it: a file of 66 KB must not become 64 MiB.

Standard library only: the CLI imports this without paying for torch.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from mrcnn_helpers.errors import MrcnnError

TEMP_SUFFIX = ".tmp"



def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; what we write is published with the mode
# open() would give it (0666 less the umask), so other users and containers can read results.
_NEW_FILE_MODE = 0o666 & ~_umask()


def temporary_pattern(name: str = "*") -> str:
    """Glob pattern of the temporary files that atomic writes of `name` create."""
    return f".{name}.*{TEMP_SUFFIX}"


def _os_error_in(exc: BaseException | None) -> OSError | None:
    """The OSError behind `exc`: torch.save and other writers wrap the file object's ENOSPC/EIO
    in their own exception types."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_error(exc: BaseException) -> str:
    """'No space left on device (errno 28)' for an OSError (found through wrappers), else the
    exception's type and first line."""
    os_error = _os_error_in(exc)
    if os_error is not None:
        return f"{os_error.strerror or os_error} (errno {os_error.errno})"
    text = str(exc).splitlines()[0] if str(exc) else "no details"
    return f"{type(exc).__name__}: {text}"


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable (a crash right after os.replace could otherwise lose the
    # directory entry). Not possible on every platform (Windows): then the rename is as durable
    # as the file system makes it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb", *, error: type = MrcnnError,
                  what: str = "", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on a clean exit it replaces `path`.

        with atomic_output("model.pth", error=CheckpointError, what="checkpoint") as f:
            torch.save(state, f)

    mode: "wb" or "w" (text, utf-8 unless `encoding`). Parent folders are created. On any
    exception inside the block, or when flushing, syncing or renaming fails, the temporary file is
    removed, `path` is untouched, and `error` (an MrcnnError subclass) is raised naming the path
    and the OS error; the original exception is its cause. KeyboardInterrupt and SystemExit are
    re-raised as they are (after the cleanup).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_output writes new files: mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, _NEW_FILE_MODE)
        kwargs = {} if "b" in mode else {"encoding": encoding or "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except MrcnnError:
        raise  # already names what went wrong (e.g. a validation inside the block)
    except Exception as exc:
        raise error(f"could not write {path}: {describe_os_error(exc)}; the previous "
                    f"{what or 'file'}, if any, is unchanged") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


class PendingFile:
    """A temporary path beside `path` for writers that open a file by name and write it over
    many calls (OpenCV's VideoWriter picks the container from the suffix, which is kept:
    `.<name>.<random>.tmp<suffix>`). `commit()` fsyncs it and renames it over `path`;
    `discard()` removes it, leaving `path` as it was. Both raise `error` naming `path` on an OS
    error, and neither leaves the temporary file behind.
    """

    def __init__(self, path: str | os.PathLike, *, error: type = MrcnnError, what: str = ""):
        self.path, self.error, self.what = Path(path), error, what or "file"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.",
                                       suffix=TEMP_SUFFIX + self.path.suffix, dir=self.path.parent)
            os.fchmod(fd, _NEW_FILE_MODE)
            os.close(fd)
        except OSError as exc:
            raise error(f"could not write {self.path}: {describe_os_error(exc)}") from None
        self.tmp: Path | None = Path(tmp)

    def commit(self) -> Path:
        try:
            with open(self.tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(self.tmp, self.path)
            self.tmp = None
            _fsync_dir(self.path.parent)
        except OSError as exc:
            self.discard()
            raise self.error(f"could not write {self.path}: {describe_os_error(exc)}; the "
                             f"previous {self.what}, if any, is unchanged") from None
        return self.path

    def discard(self) -> None:
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


def atomic_write(path: str | os.PathLike, data: bytes | str, *, error: type = MrcnnError,
                 what: str = "") -> Path:
    """Write bytes or text (utf-8) to `path` atomically; returns the path (see atomic_output)."""
    binary = isinstance(data, (bytes, bytearray, memoryview))
    with atomic_output(path, "wb" if binary else "w", error=error, what=what) as handle:
        handle.write(data)
    return Path(path)


def json_safe(value: Any) -> Any:
    """`value` with NaN/inf as None (JSON has neither), numpy/torch scalars and arrays as Python
    values, tuples as lists and keys as strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy / torch scalars and arrays
    if callable(tolist) and not isinstance(value, (str, bytes)):
        return json_safe(tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2,
                      error: type = MrcnnError, what: str = "") -> Path:
    """Write `obj` as JSON (json_safe: no NaN) to `path` atomically; returns the path."""
    text = json.dumps(json_safe(obj), indent=indent)
    return atomic_write(path, text + "\n", error=error, what=what)


def remove_temporaries(directory: str | os.PathLike, names: Iterable[str] = ("*",)) -> list[Path]:
    """Delete temporary files that killed atomic writes left in `directory` (for files matching
    the glob patterns `names`). Returns the removed paths."""
    root = Path(directory)
    removed = []
    if not root.is_dir():
        return removed
    patterns = [temporary_pattern(n) for n in names]
    for entry in root.iterdir():
        if entry.is_file() and any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def check_output_path(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                      option: str = "output", allow_inside: bool = False) -> None:
    """Refuse an output that is one of the command's inputs, or lies inside an input folder.

    inputs: files and folders the command reads (None entries are ignored). An output folder
    that contains an input is refused too (writing there could replace it), unless
    allow_inside (e.g. a results directory that holds the checkpoint being read). Raises
    MrcnnError naming both paths; links are resolved, so another spelling of the same path is
    caught.
    """
    out = _resolved(output)
    for given in inputs:
        if given is None or os.fspath(given) == "":
            continue
        src = _resolved(given)
        if out == src:
            raise MrcnnError(f"{option} {output} is the input {given}: it would be overwritten; "
                             "choose another path")
        if src.is_dir() and _is_within(out, src):
            raise MrcnnError(f"{option} {output} lies inside the input folder {given}: writing "
                             "there could replace what is read; choose a path outside it")
        if not allow_inside and out.is_dir() and _is_within(src, out):
            raise MrcnnError(f"{option} {output} is a folder holding the input {given}: writing "
                             "there could replace it; choose another folder")


def check_writable_dir(path: str | os.PathLike, *, option: str = "output") -> Path:
    """Create folder `path` if needed and check it can be written; returns it as a Path.

    Raises MrcnnError naming the path and the reason when it is an existing file, cannot be
    created, or refuses a new file (read-only mount, permissions, full disk: a temporary file is
    created and removed to find out, since os.access cannot tell a read-only mount from a root
    process's permissions)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MrcnnError(f"{option} {path} is a file, not a folder: name a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MrcnnError(f"cannot create {option} folder {path}: {describe_os_error(exc)}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=TEMP_SUFFIX, dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MrcnnError(f"{option} folder {path} is not writable: {describe_os_error(exc)}"
                         ) from None
    return path

def _zip_entries(handle) -> list[zipfile.ZipInfo] | None:
    """The entries of the zip archive in `handle` (a path or a seekable binary file, whose
    position is kept), or None when it is not a zip archive."""
    here = handle.tell() if hasattr(handle, "seek") else None
    try:
        if not zipfile.is_zipfile(handle):
            return None
        if here is not None:
            handle.seek(here)
        with zipfile.ZipFile(handle) as archive:
            return archive.infolist()
    finally:
        if here is not None:
            handle.seek(here)


def source_name(source) -> str:
    """How messages name what is read: a path as given, an open file by its name."""
    if hasattr(source, "read"):
        return str(getattr(source, "name", None) or "<file object>")
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<bytes>"


def check_torch_file(source, name: str | None = None, *, error: type = MrcnnError) -> int:
    """Refuse a `torch.save` file whose tensors would take more memory than the file has bytes;
    returns the bytes its entries expand to (0 for a file that is not a zip archive).

    source: a path, bytes, or a seekable binary file object positioned at the file's start (the
    position is kept); name: the file in messages (default: the path). torch.save writes a zip
    archive whose entries (one per tensor storage, plus the pickle) are stored uncompressed, and
    torch.load reads every entry into memory, so a genuine file's entries add up to less than
    the file. Refused before anything is read into memory, with `error` naming the file, the
    entry and the sizes: a compressed entry (torch's reader inflates it: 66 KB can become
    64 MiB), a stored entry whose two sizes disagree, and entries adding up to more than the
    file (overlapping entries, each read in full under its own name). A file that is not a zip
    archive passes: torch's legacy format reads each storage from the file itself and stops
    with an error at its end, and anything else is refused by torch.load as unreadable.
    """
    in_memory = isinstance(source, (bytes, bytearray, memoryview))
    handle = io.BytesIO(source) if in_memory else source
    if name is None:
        name = "<bytes>" if in_memory else source_name(source)
    if hasattr(handle, "seek"):
        here = handle.tell()
        size = handle.seek(0, os.SEEK_END) - here
        handle.seek(here)
    else:
        size = os.path.getsize(handle)
    try:
        entries = _zip_entries(handle)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise error(f"{name} is unreadable: its zip directory is damaged ({exc})") from None
    entries = entries or []
    total = sum(entry.file_size for entry in entries)
    packed = [e for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise error(f"{name} refused: {len(packed)} of its {len(entries)} zip entries are "
                    f"compressed (e.g. {packed[0].filename!r}), and the file's {size} bytes "
                    f"would inflate to {total} in memory; torch.save stores tensors "
                    "uncompressed, so this is no file it wrote")
    for entry in entries:
        if entry.file_size != entry.compress_size:
            raise error(f"{name} refused: its entry {entry.filename!r} declares "
                        f"{entry.file_size} bytes but stores {entry.compress_size}")
    if total > size:
        raise error(f"{name} refused: its {len(entries)} zip entries add up to {total} bytes, "
                    f"more than the file's {size} bytes (entries overlap, and each would be "
                    "read into memory in full)")
    return total
