"""COCO 2017 download: resumable, verified, and extracted so that a partial tree never looks done.

Layout under the target folder DIR:
    DIR/downloads/<archive>.zip          finished archives (kept unless asked not to)
    DIR/downloads/<archive>.zip.part     an unfinished download, resumed by the next run
    DIR/train2017/, DIR/val2017/, DIR/annotations/instances_{train,val}2017.json, ...
    DIR/.done-<archive>                  written last, once an archive is fully extracted

Downloads use HTTP Range requests to continue a .part file (a server that ignores Range makes
the transfer start over) and retry dropped connections. A finished file is checked against the
manifest: size always, MD5 where known; with no MD5 the zip's own CRCs are checked instead.
Extraction goes into DIR/.extract-<archive>/ first; each top-level folder is then renamed into
place and the .done marker is written last, so a crash leaves either no folder, a complete
folder without its marker (redone on the next run), or a finished one.

Standard library only (urllib); tqdm for the progress bar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile

from ..errors import DataError

DEFAULT_BASE_URL = "http://images.cocodataset.org/"


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


def load_manifest(path: str | os.PathLike) -> dict[str, RemoteFile]:
    """A manifest JSON {part: {"path": ..., "size": int|null, "md5": str|null}} (for mirrors)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        return {str(k): RemoteFile(str(v["path"]), v.get("size"), v.get("md5"))
                for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"cannot read manifest {path}: {e} (expected {{part: {{\"path\": ..., "
                        f"\"size\": ..., \"md5\": ...}}}})") from e


def _md5_of(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _open(url: str, start: int, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "mrcnn-helpers"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(request, timeout=timeout)


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
    return 0, (int(length) if length is not None else None)


def download_file(url: str, dest: str | os.PathLike, *, size: int | None = None,
                  md5: str | None = None, progress: bool = True, retries: int = 5,
                  timeout: float = 60.0, chunk_size: int = 1 << 20) -> str:
    """Download `url` to `dest`, resuming `dest + ".part"` if present; returns dest.

    Dropped connections are retried (up to `retries` times in a row without progress), each
    time continuing where the file stopped. The finished file must have `size` bytes (or the
    server's announced size) and the given MD5; on a mismatch the partial data is deleted and
    DownloadError says so. An existing `dest` is taken as finished and only verified.
    """
    from tqdm.auto import tqdm

    dest = os.fspath(dest)
    part = dest + ".part"
    if os.path.exists(dest):
        try:
            _verify(dest, size, md5, url)
        except DownloadError:
            os.remove(dest)
            raise
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    total, failures, bar = size, 0, None
    try:
        while True:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            if total is not None and have == total:
                break
            if total is not None and have > total:
                os.remove(part)  # longer than the file can be: not ours to resume
                have = 0
            try:
                response = _open(url, have, timeout)
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:  # nothing left to send: the part is complete
                    total = have if total is None else total
                    if have == total:
                        break
                    os.remove(part)
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
                    bar = tqdm(total=total, initial=have, unit="B", unit_scale=True,
                               unit_divisor=1024, desc=os.path.basename(dest), disable=not progress)
                else:
                    bar.reset(total=total)
                    bar.update(have)
                got = 0
                try:
                    with open(part, mode) as f:
                        while True:
                            block = response.read(chunk_size)
                            if not block:
                                break
                            f.write(block)
                            got += len(block)
                            bar.update(len(block))
                except (http.client.HTTPException, OSError) as e:
                    failures = 0 if got else failures + 1
                    if failures > retries:
                        raise DownloadError(f"{url}: transfer keeps failing ({e}); re-run to "
                                            f"resume") from e
                    _backoff(failures)
                    continue
                if total is None:  # no length announced: the end of the body is the end
                    break
                if os.path.getsize(part) < total:  # connection closed early: resume
                    failures = 0 if got else failures + 1
                    if failures > retries:
                        raise DownloadError(f"{url}: the server keeps closing the connection "
                                            f"early; re-run to resume")
                    _backoff(failures)
                    continue
                break
    finally:
        if bar is not None:
            bar.close()
    try:
        _verify(part, size if size is not None else total, md5, url)
    except DownloadError:
        os.remove(part)  # corrupt data cannot be resumed
        raise
    os.replace(part, dest)
    return dest


def _backoff(failures: int) -> None:
    """Wait before retrying after `failures` attempts in a row that made no progress."""
    if failures:
        time.sleep(min(0.1 * 2.0 ** (failures - 1), 30.0))


def _verify(path: str, size: int | None, md5: str | None, url: str) -> None:
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        raise DownloadError(f"{url}: downloaded {actual} bytes, expected {size}; deleted it, "
                            f"re-run to download again")
    if md5 is not None:
        digest = _md5_of(path)
        if digest != md5.lower():
            raise DownloadError(f"{url}: MD5 {digest} does not match the expected {md5}; deleted "
                                f"the file, re-run to download again")


def extract_zip(archive: str | os.PathLike, out_dir: str | os.PathLike, *,
                check_crc: bool = False) -> list[str]:
    """Extract a zip into out_dir so that nothing looks complete before it is (see module doc).

    Returns the top-level names placed in out_dir. Members with absolute paths or ".." are
    refused. check_crc: test every member's CRC first (when no MD5 vouched for the archive).
    Raises DataError for a corrupt zip or too little disk space.
    """
    archive, out_dir = os.fspath(archive), os.fspath(out_dir)
    name = os.path.basename(archive)
    marker = os.path.join(out_dir, f".done-{name}")
    staging = os.path.join(out_dir, f".extract-{name}")
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                parts = info.filename.replace("\\", "/").split("/")
                if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                    raise DataError(f"{archive}: unsafe member path {info.filename!r}; refusing")
            if check_crc:
                bad = zf.testzip()
                if bad is not None:
                    raise DataError(f"{archive}: member {bad} fails its CRC check: the archive is "
                                    f"corrupt; delete it and download again")
            needed = sum(i.file_size for i in infos)
            os.makedirs(out_dir, exist_ok=True)
            free = shutil.disk_usage(out_dir).free
            if needed > free:
                raise DataError(f"extracting {archive} needs {needed / 2**30:.1f} GiB, only "
                                f"{free / 2**30:.1f} GiB free in {out_dir}")
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
            zf.extractall(staging)
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive}: not a valid zip ({e}); delete it and download again") from e
    tops = sorted(os.listdir(staging))
    for top in tops:
        target = os.path.join(out_dir, top)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)  # a complete-looking folder without its marker: redo it
        elif os.path.lexists(target):
            os.remove(target)
        os.rename(os.path.join(staging, top), target)
    shutil.rmtree(staging, ignore_errors=True)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({"archive": name, "entries": tops}, f)
    return tops


def is_extracted(archive_name: str, out_dir: str | os.PathLike) -> bool:
    """True when `archive_name` was fully extracted into out_dir (its .done marker exists)."""
    return os.path.isfile(os.path.join(os.fspath(out_dir), f".done-{archive_name}"))


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
    out_dir = os.fspath(out_dir)
    downloads = os.path.join(out_dir, "downloads")
    os.makedirs(downloads, exist_ok=True)
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
        result[part] = extract_zip(dest, out_dir, check_crc=remote.md5 is None)
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
