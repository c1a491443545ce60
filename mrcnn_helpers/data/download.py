"""COCO 2017 download: resumable, verified, and extracted so that a partial tree never looks done.

Layout under the target folder DIR:
    DIR/downloads/<archive>.zip          finished archives (kept unless asked not to)
    DIR/downloads/<archive>.zip.part     an unfinished download, resumed by the next run
    DIR/train2017/, DIR/val2017/, DIR/annotations/instances_{train,val}2017.json, ...
    DIR/.done-<archive>                  written last, once an archive is fully extracted

Downloads use HTTP Range requests to continue a .part file (a server that ignores Range makes
the transfer start over) and retry dropped connections, a bounded number of times without
progress; a full disk stops at once, saying how much space is needed. A finished file is
checked against the manifest: size always, MD5 where known; with no MD5 the zip's own CRCs are
checked instead. Extraction (extract.py) stages the files, renames each into place, merging
into folders that exist, and writes the .done marker last, so a crash leaves complete files
only and the next run finishes the job; it never removes or replaces a file it did not put
there.

Standard library only (urllib); tqdm for the progress bars.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request

from ..errors import DataError
from ..fileio import check_writable_dir, describe_os_error
from .extract import extract_zip, is_extracted
from .progress import byte_bar

DEFAULT_BASE_URL = "http://images.cocodataset.org/"
# Largest archive a manifest may name (COCO's train2017.zip is 19.3 GB).
MAX_ARCHIVE_BYTES = 2**40
# Requests one download_file call makes at most, however they go (each making some progress).
MAX_ATTEMPTS = 1000


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One archive: path relative to the base URL, expected size in bytes and MD5 (None: unknown)."""

    path: str
    size: int | None = None
    md5: str | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


# The official COCO 2017 archives. Sizes and MD5 sums as published with the dataset and
# repeated by the major detection toolkits' download scripts.
COCO_2017: dict[str, RemoteFile] = {
    "annotations": RemoteFile("annotations/annotations_trainval2017.zip", 252_907_541,
                              "f4bbac642086de4f52a3fdda2de5fa2c"),
    "val": RemoteFile("zips/val2017.zip", 815_585_330, "442b8da7639aecaf257c1dceb8ba8c80"),
    "train": RemoteFile("zips/train2017.zip", 19_336_861_798, "cced6f7f71b7629ddf16f17bbcfab6b2"),
}


class DownloadError(DataError):
    """A download failed, was refused, or does not match its expected size or checksum."""


def _manifest_entry(part: str, entry, path: str) -> RemoteFile:
    """One checked manifest entry (see load_manifest)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
        raise DataError(f"cannot read manifest {path}: part {part!r} needs a \"path\" string, got {entry!r}")
    rel = entry["path"]
    if rel.startswith(("/", "\\")) or ".." in rel.replace("\\", "/").split("/") or "://" in rel:
        raise DataError(f"cannot read manifest {path}: part {part!r} has path {rel!r}; expected a path "
                        f"relative to the base URL, without '..'")
    size, md5 = entry.get("size"), entry.get("md5")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                             or not 0 < size <= MAX_ARCHIVE_BYTES):
        raise DataError(f"cannot read manifest {path}: part {part!r} has size {size!r}; expected a whole "
                        f"number of bytes from 1 to {MAX_ARCHIVE_BYTES}, or null")
    if md5 is not None and not (isinstance(md5, str) and re.fullmatch(r"[0-9a-fA-F]{32}", md5)):
        raise DataError(f"cannot read manifest {path}: part {part!r} has md5 {md5!r}; expected 32 hex "
                        f"digits, or null")
    return RemoteFile(rel, size, md5)


def load_manifest(path: str | os.PathLike) -> dict[str, RemoteFile]:
    """A manifest JSON {part: {"path": ..., "size": int|null, "md5": str|null}} (for mirrors).

    Raises DataError naming the file and the part for anything else (not JSON, not an object,
    a path that is absolute or climbs with "..", a size that is not a positive integer, an MD5
    that is not 32 hex digits)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DataError(f"cannot read manifest {path}: {e} (expected {{part: {{\"path\": ..., "
                        f"\"size\": ..., \"md5\": ...}}}})") from e
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"cannot read manifest {path}: expected a non-empty object {{part: "
                        f"{{\"path\": ..., \"size\": ..., \"md5\": ...}}}}, got "
                        f"{type(raw).__name__}")
    return {str(k): _manifest_entry(str(k), v, os.fspath(path)) for k, v in raw.items()}


def _md5_of(path: str, progress: bool = False, chunk: int = 1 << 22) -> str:
    digest = hashlib.md5()
    bar = byte_bar(f"MD5 {os.path.basename(path)}", os.path.getsize(path), enabled=progress)
    with bar, open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _open(url: str, start: int, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "mrcnn-helpers"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except ValueError as e:  # not a URL urllib can open ("unknown url type")
        raise DownloadError(f"{url}: {e}; give an http:// or https:// base URL") from e


def _total_from(response, start: int) -> tuple[int, int | None]:
    """(offset the body starts at, total size or None) from a 200 / 206 response."""
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")  # bytes a-b/total
        try:
            span, total = content_range.split(" ", 1)[1].split("/")
            first = int(span.split("-")[0])
            return first, (None if total == "*" else int(total))
        except (IndexError, ValueError):
            raise DownloadError(f"bad Content-Range {content_range!r} from the server") from None
    length = response.headers.get("Content-Length")
    try:
        return 0, (int(length) if length is not None else None)
    except ValueError:
        raise DownloadError(f"bad Content-Length {length!r} from the server") from None


def _disk_full(part: str, exc: OSError, total: int | None, url: str) -> DownloadError:
    """The one error for a local write failure (full disk, read-only, ...): never retried."""
    folder = os.path.dirname(os.path.abspath(part))
    have = os.path.getsize(part) if os.path.exists(part) else 0
    free = shutil.disk_usage(folder).free
    need = f"{_human(total - have)} more are needed, " if total is not None else ""
    return DownloadError(f"{url}: cannot write {part}: {describe_os_error(exc)}; {need}"
                         f"{_human(free)} free in {folder}; make room and re-run to resume "
                         f"from {have} bytes")


def _human(size: int) -> str:
    """A byte count as "1.50 GiB" / "29.3 MiB" / "512 bytes"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{size} bytes"


def _receive(response, part: str, mode: str, chunk_size: int, bar, total, url: str) -> int:
    """Append the body to `part` (mode "ab" or "wb"); returns the bytes received.

    A failing local write raises DownloadError at once (_disk_full), as does a body running
    past the expected size (MAX_ARCHIVE_BYTES when none is known); a failing read returns
    early (the caller resumes), raising nothing.
    """
    got = 0
    room = (total if total is not None else MAX_ARCHIVE_BYTES) - (
        os.path.getsize(part) if mode == "ab" and os.path.exists(part) else 0)
    try:
        f = open(part, mode)  # noqa: SIM115 - closed below
    except OSError as e:
        raise _disk_full(part, e, total, url) from e
    with f:
        while True:
            try:
                block = response.read(chunk_size)
            except (http.client.HTTPException, OSError):
                return got  # the connection dropped: the caller resumes
            if not block:
                return got
            if got + len(block) > room:
                raise DownloadError(f"{url}: the server sends more than the "
                                    f"{total if total is not None else MAX_ARCHIVE_BYTES} bytes "
                                    f"expected; not the archive the manifest names")
            try:
                f.write(block)
                f.flush()
            except OSError as e:
                raise _disk_full(part, e, total, url) from e
            got += len(block)
            bar.update(len(block))


def download_file(url: str, dest: str | os.PathLike, *, size: int | None = None,
                  md5: str | None = None, progress: bool = True, retries: int = 5,
                  timeout: float = 60.0, chunk_size: int = 1 << 20) -> str:
    """Download `url` to `dest`, resuming `dest + ".part"` if present; returns dest.

    Dropped connections are retried, each time continuing where the file stopped: an attempt
    that takes the file further than it ever was is progress, and `retries` attempts in a row
    without progress give up (so a server that ignores Range and keeps dropping stops too),
    as does the MAX_ATTEMPTS-th request. A failing local write (full disk, read-only folder) is
    never retried: DownloadError says how much space is needed and free. The finished file
    must have `size` bytes (or the server's announced size) and the given MD5; on a mismatch
    the partial data is deleted and DownloadError says so. An existing `dest` is taken as
    finished and only verified. One loop on purpose: the retry budget, the Range resume and
    the disk-space check act on the state of one transfer.
    """
    dest = os.fspath(dest)
    part = dest + ".part"
    if os.path.exists(dest):
        try:
            _verify(dest, size, md5, url, progress)
        except DownloadError:
            os.remove(dest)
            raise
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    total, failures, best, bar = size, 0, -1, None
    try:
        for _ in range(MAX_ATTEMPTS):
            have = os.path.getsize(part) if os.path.exists(part) else 0
            if total is not None and have == total:
                break
            if total is not None and have > total:
                os.remove(part)  # longer than the file can be: not ours to resume
                have, best = 0, -1
            best = max(best, have)
            try:
                response = _open(url, have, timeout)
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:  # nothing left to send: the part is complete
                    total = have if total is None else total
                    if have == total:
                        break
                    os.remove(part)
                    best = -1
                    continue
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            except (urllib.error.URLError, OSError) as e:
                failures += 1
                if failures > retries:
                    raise DownloadError(f"{url}: cannot connect ({getattr(e, 'reason', e)}); "
                                        f"re-run to resume from {have} bytes") from e
                _backoff(failures)
                continue
            with response:
                first, announced = _total_from(response, have)
                if response.status == 206 and first != have:
                    raise DownloadError(f"{url}: asked for bytes from {have}, the server sent "
                                        f"them from {first}")
                if total is None:
                    total = announced
                elif announced is not None and announced != total:
                    raise DownloadError(f"{url}: the server announces {announced} bytes, the "
                                        f"manifest expects {total}: a different file")
                mode = "ab" if first == have and have else "wb"  # 200 to a Range: start over
                have = have if mode == "ab" else 0
                if bar is None:
                    bar = byte_bar(os.path.basename(dest), total, initial=have, enabled=progress)
                else:
                    bar.reset(total=total)
                    bar.update(have)
                _receive(response, part, mode, chunk_size, bar, total, url)
            now = os.path.getsize(part)
            if total is None or now >= total:
                break  # no length announced: the end of the body is the end
            failures = 0 if now > best else failures + 1
            if failures > retries:
                raise DownloadError(f"{url}: the server keeps closing the connection early "
                                    f"({now} of {total} bytes); re-run to resume")
            _backoff(failures)
        else:
            raise DownloadError(f"{url}: still incomplete after {MAX_ATTEMPTS} requests; re-run "
                                f"to resume")
    finally:
        if bar is not None:
            bar.close()
    try:
        _verify(part, size if size is not None else total, md5, url, progress)
    except DownloadError:
        os.remove(part)  # corrupt data cannot be resumed
        raise
    os.replace(part, dest)
    return dest


def _backoff(failures: int) -> None:
    """Wait before retrying after `failures` attempts in a row that made no progress."""
    if failures:
        time.sleep(min(0.1 * 2.0 ** (failures - 1), 30.0))


def _verify(path: str, size: int | None, md5: str | None, url: str, progress: bool) -> None:
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        raise DownloadError(f"{url}: downloaded {actual} bytes, expected {size}; deleted it, "
                            f"re-run to download again")
    if md5 is not None:
        digest = _md5_of(path, progress)
        if digest != md5.lower():
            raise DownloadError(f"{url}: MD5 {digest} does not match the expected {md5}; deleted "
                                f"the file, re-run to download again")


def download_coco(out_dir: str | os.PathLike, parts=("annotations", "val", "train"), *,
                  base_url: str = DEFAULT_BASE_URL, manifest: dict[str, RemoteFile] | None = None,
                  keep_archives: bool = True, progress: bool = True, retries: int = 5,
                  timeout: float = 60.0) -> dict:
    """Download and extract COCO 2017 parts into out_dir (layout in the module doc).

    parts: keys of the manifest (COCO_2017: "annotations", "val", "train"). base_url: where the
    manifest paths live (a mirror, or a local server in tests). Parts already extracted are
    skipped; interrupted downloads resume. keep_archives=False deletes each zip once
    extracted. Returns {part: [top-level entries extracted]} and, when the standard layout is
    present, the spec paths: train_json / train_images / val_json / val_images.
    """
    manifest = COCO_2017 if manifest is None else manifest
    unknown = [p for p in parts if p not in manifest]
    if unknown:
        raise DataError(f"unknown parts {unknown}; choose from {sorted(manifest)}")
    if not (isinstance(base_url, str) and base_url.split("://", 1)[0].lower() in
            ("http", "https", "file") and "://" in base_url):
        raise DataError(f"base URL {base_url!r}: expected an http://, https:// or file:// URL")
    out_dir = os.fspath(out_dir)
    downloads = os.path.join(out_dir, "downloads")
    check_writable_dir(downloads, option="download folder")
    result = {}
    for part in parts:
        remote = manifest[part]
        if is_extracted(remote.name, out_dir):
            result[part] = "already extracted"
            continue
        dest = os.path.join(downloads, remote.name)
        have = os.path.getsize(dest + ".part") if os.path.exists(dest + ".part") else 0
        if remote.size is not None and not os.path.exists(dest):
            free = shutil.disk_usage(downloads).free
            if remote.size - have > free:
                raise DataError(f"{remote.name} needs {(remote.size - have) / 2**30:.1f} GiB more, "
                                f"only {free / 2**30:.1f} GiB free in {downloads}")
        url = base_url.rstrip("/") + "/" + remote.path
        download_file(url, dest, size=remote.size, md5=remote.md5, progress=progress,
                      retries=retries, timeout=timeout)
        result[part] = extract_zip(dest, out_dir, check_crc=remote.md5 is None,
                                   progress=progress)
        if not keep_archives:
            os.remove(dest)
    for split in ("train", "val"):
        json_file = os.path.join(out_dir, "annotations", f"instances_{split}2017.json")
        images = os.path.join(out_dir, f"{split}2017")
        if os.path.isfile(json_file):
            result[f"{split}_json"] = json_file
        if os.path.isdir(images):
            result[f"{split}_images"] = images
    return result
