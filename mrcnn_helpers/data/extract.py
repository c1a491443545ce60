"""Zip extraction for the dataset downloads: staged, merged into existing folders, never
removing or replacing a file it did not put there.

Layout under the target folder DIR:
    DIR/.extract-<archive>/     files being extracted (removed when done or on failure)
    DIR/<the archive's tree>    every file renamed into place from the staging folder
    DIR/.done-<archive>         written last, once everything is in place

A crash leaves complete files only (each is renamed whole); the next run finishes the job,
keeping the files already in place that carry the archive's bytes (CRC).
"""

from __future__ import annotations

import os
import shutil
import zipfile
import zlib

from ..errors import DataError
from ..fileio import atomic_write_json, check_writable_dir, describe_os_error
from .progress import progress_bar


def _safe_members(archive: str, infos: list) -> None:
    for info in infos:
        parts = info.filename.replace("\\", "/").split("/")
        if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise DataError(f"{archive}: unsafe member path {info.filename!r}; refusing")


def _file_crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _placed(infos: list, out_dir: str) -> tuple[set, list]:
    """(names of the members already in place with the same bytes, paths that are in the way).

    A file at a member's path with other content (or a folder where a file goes) is not ours:
    extraction never replaces it."""
    same, blocking = set(), []
    for info in infos:
        target = os.path.join(out_dir, info.filename)
        if info.is_dir():
            if os.path.lexists(target) and not os.path.isdir(target):
                blocking.append(target)
        elif os.path.lexists(target):
            if (os.path.isfile(target) and not os.path.islink(target)
                    and os.path.getsize(target) == info.file_size
                    and _file_crc(target) == info.CRC):
                same.add(info.filename)
            else:
                blocking.append(target)
    return same, blocking


def extract_zip(archive: str | os.PathLike, out_dir: str | os.PathLike, *,
                check_crc: bool = False, progress: bool = False) -> list[str]:
    """Extract a zip into out_dir, merging into existing folders (see module doc).

    Files are extracted into DIR/.extract-<archive>/ first, then each is renamed into place;
    the .done marker is written last. Nothing that was there before is removed or replaced: a
    file already at a member's path with the member's bytes (CRC) is kept as it is (what an
    interrupted run placed), any other file in the way is refused with DataError naming it,
    before anything moves. Returns the top-level names of the archive. Members with absolute
    paths or ".." are refused. check_crc: test every member's CRC first (when no MD5 vouched
    for the archive). Raises DataError for a corrupt zip, a file in the way, or too little disk
    space (checked first; an extraction failing anyway removes its staging folder).
    """
    archive, out_dir = os.fspath(archive), os.fspath(out_dir)
    name = os.path.basename(archive)
    marker = os.path.join(out_dir, f".done-{name}")
    staging = os.path.join(out_dir, f".extract-{name}")
    check_writable_dir(out_dir, option="extraction folder")
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            _safe_members(archive, infos)
            if check_crc:
                bad = zf.testzip()
                if bad is not None:
                    raise DataError(f"{archive}: member {bad} fails its CRC check: the archive is "
                                    f"corrupt; delete it and download again")
            same, blocking = _placed(infos, out_dir)
            if blocking:
                raise DataError(f"extracting {archive} would replace {blocking[0]}"
                                f"{f' (and {len(blocking) - 1} more)' if len(blocking) > 1 else ''}"
                                f", which it did not create; move it away and re-run")
            todo = [i for i in infos if i.filename not in same]
            needed = sum(i.file_size for i in todo)
            free = shutil.disk_usage(out_dir).free
            if needed > free:
                raise DataError(f"extracting {archive} needs {needed / 2**30:.2f} GiB, only "
                                f"{free / 2**30:.2f} GiB free in {out_dir}")
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
            try:
                for info in progress_bar(todo, f"extracting {name}", unit="file",
                                         enabled=progress):
                    zf.extract(info, staging)
            except OSError as e:
                shutil.rmtree(staging, ignore_errors=True)
                raise DataError(f"extracting {archive} into {out_dir} failed: "
                                f"{describe_os_error(e)}; nothing was placed, re-run when fixed") \
                    from e
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive}: not a valid zip ({e}); delete it and download again") from e
    except OSError as e:  # the archive itself cannot be read
        raise DataError(f"cannot read {archive}: {describe_os_error(e)}") from e
    try:
        _move_into_place(staging, out_dir)
    except OSError as e:
        raise DataError(f"placing the files of {archive} into {out_dir} failed: "
                        f"{describe_os_error(e)}; re-run to finish (what was placed is "
                        f"complete)") from e
    tops = sorted({i.filename.replace("\\", "/").split("/")[0] for i in infos})
    atomic_write_json(marker, {"archive": name, "entries": tops}, error=DataError,
                      what="extraction marker")
    return tops


def _move_into_place(staging: str, out_dir: str) -> None:
    """Rename every file of `staging` to the same place under out_dir (folders merged)."""
    for root, _, files in os.walk(staging):
        rel = os.path.relpath(root, staging)
        target_dir = os.path.normpath(os.path.join(out_dir, rel))
        os.makedirs(target_dir, exist_ok=True)
        for file_name in files:
            os.replace(os.path.join(root, file_name), os.path.join(target_dir, file_name))
    shutil.rmtree(staging, ignore_errors=True)


def is_extracted(archive_name: str, out_dir: str | os.PathLike) -> bool:
    """True when `archive_name` was fully extracted into out_dir (its .done marker exists)."""
    return os.path.isfile(os.path.join(os.fspath(out_dir), f".done-{archive_name}"))
