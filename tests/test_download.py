"""COCO download against a local HTTP server: resume after a dropped connection or a killed run,
checksum and size verification, servers without Range support, and extraction that never
leaves a complete-looking partial tree."""

import argparse
import hashlib
import http.server
import io
import json
import os
import threading
import zipfile

import pytest

from mrcnn_helpers.data import download as dl
from mrcnn_helpers.data.commands import add_data_commands
from mrcnn_helpers.errors import DataError


class _Server:
    """Serves `files` {url path: bytes} with HTTP Range support and scripted failures."""

    def __init__(self):
        self.files, self.requests = {}, []
        self.cut_after = {}        # path -> list of byte counts: the next responses stop early
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.lstrip("/")
                server.requests.append((path, self.headers.get("Range")))
                data = server.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                spec = self.headers.get("Range")
                if spec and not server.ignore_range:
                    start = int(spec.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cuts = server.cut_after.get(path)
                if cuts:
                    body = body[:cuts.pop(0)]   # promise everything, send part, hang up
                    self.close_connection = True
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.close()


def _zip(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _coco_archives():
    """Small stand-ins for the COCO 2017 zips, with the same top-level layout."""
    images = {f"val2017/{i:012d}.jpg": os.urandom(3000 + 500 * i) for i in range(1, 5)}
    gt = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 4, "height": 4}
                     for i in range(1, 5)], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    annotations = {"annotations/instances_val2017.json": json.dumps(gt),
                   "annotations/instances_train2017.json": json.dumps(gt)}
    return {"annotations/annotations_trainval2017.zip": _zip(annotations),
            "zips/val2017.zip": _zip(images)}, images


def _manifest(files, md5=True):
    names = {"annotations/annotations_trainval2017.zip": "annotations", "zips/val2017.zip": "val"}
    return {names[p]: dl.RemoteFile(p, len(d), hashlib.md5(d).hexdigest() if md5 else None)
            for p, d in files.items()}


def test_manifest_has_the_official_coco_2017_archives():
    assert dl.COCO_2017["val"] == dl.RemoteFile("zips/val2017.zip", 815_585_330,
                                                "442b8da7639aecaf257c1dceb8ba8c80")
    assert dl.COCO_2017["annotations"].md5 == "f4bbac642086de4f52a3fdda2de5fa2c"
    assert dl.COCO_2017["train"].name == "train2017.zip" and dl.COCO_2017["train"].size > 19e9


def test_download_resumes_a_dropped_transfer_and_extracts(server, tmp_path):
    files, images = _coco_archives()
    server.files.update(files)
    val = files["zips/val2017.zip"]
    server.cut_after["zips/val2017.zip"] = [len(val) // 3, 1000]   # two drops, then the rest
    out = tmp_path / "coco"
    result = dl.download_coco(out, ("annotations", "val"), base_url=server.url,
                              manifest=_manifest(files), progress=False)
    val_requests = [r for p, r in server.requests if p == "zips/val2017.zip"]
    assert val_requests == [None, f"bytes={len(val) // 3}-", f"bytes={len(val) // 3 + 1000}-"]
    assert (out / "downloads" / "val2017.zip").read_bytes() == val
    for name, data in images.items():
        assert (out / name).read_bytes() == data
    assert result["val_json"] == str(out / "annotations" / "instances_val2017.json")
    assert result["val_images"] == str(out / "val2017") and result["val"] == ["val2017"]
    assert dl.is_extracted("val2017.zip", out) and dl.is_extracted("annotations_trainval2017.zip", out)
    assert not list(out.glob(".extract-*")) and not list((out / "downloads").glob("*.part"))
    # A second run finds everything done and fetches nothing.
    server.requests.clear()
    again = dl.download_coco(out, ("annotations", "val"), base_url=server.url,
                             manifest=_manifest(files), progress=False)
    assert server.requests == [] and again["val"] == "already extracted"


def test_download_resumes_a_killed_run_and_survives_servers_without_range(server, tmp_path):
    files, _ = _coco_archives()
    server.files.update(files)
    data = files["zips/val2017.zip"]
    dest = tmp_path / "val2017.zip"
    (tmp_path / "val2017.zip.part").write_bytes(data[:1234])      # what a killed run left
    dl.download_file(server.url + "zips/val2017.zip", dest, size=len(data),
                     md5=hashlib.md5(data).hexdigest(), progress=False)
    assert server.requests == [("zips/val2017.zip", "bytes=1234-")] and dest.read_bytes() == data
    # A server that ignores Range answers 200 with the whole file: start over, still correct.
    server.ignore_range, server.requests = True, []
    dest.unlink()
    (tmp_path / "val2017.zip.part").write_bytes(data[:999])
    dl.download_file(server.url + "zips/val2017.zip", dest, progress=False)
    assert dest.read_bytes() == data and server.requests == [("zips/val2017.zip", "bytes=999-")]
    # A finished .part (size known) needs no request at all.
    server.requests = []
    dest.unlink()
    (tmp_path / "val2017.zip.part").write_bytes(data)
    dl.download_file(server.url + "zips/val2017.zip", dest, size=len(data), progress=False)
    assert server.requests == [] and dest.read_bytes() == data


def test_download_verifies_size_and_checksum(server, tmp_path):
    files, _ = _coco_archives()
    server.files.update(files)
    data = files["zips/val2017.zip"]
    url = server.url + "zips/val2017.zip"
    with pytest.raises(dl.DownloadError, match=r"MD5 [0-9a-f]{32} does not match the expected 0+"):
        dl.download_file(url, tmp_path / "a.zip", md5="0" * 32, progress=False)
    assert not list(tmp_path.iterdir())                   # corrupt data is not kept to resume
    with pytest.raises(dl.DownloadError, match=f"announces {len(data)} bytes, the manifest "
                                               f"expects {len(data) + 1}"):
        dl.download_file(url, tmp_path / "b.zip", size=len(data) + 1, progress=False)
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.download_file(server.url + "zips/nothing.zip", tmp_path / "c.zip", progress=False)
    # Drops that make progress are resumed as long as they come; drops without progress are
    # retried `retries` times, then the partial file is kept for the next run.
    server.cut_after["zips/val2017.zip"], server.requests = [10] * 10, []
    dl.download_file(url, tmp_path / "d.zip", retries=2, progress=False)
    assert (tmp_path / "d.zip").read_bytes() == data and len(server.requests) == 11
    server.cut_after["zips/val2017.zip"] = [100] + [0] * 10
    with pytest.raises(dl.DownloadError, match="re-run to resume"):
        dl.download_file(url, tmp_path / "e.zip", retries=2, progress=False)
    assert (tmp_path / "e.zip.part").stat().st_size == 100


def test_extraction_is_atomic_and_checks_the_zip(server, tmp_path):
    files, images = _coco_archives()
    archive = tmp_path / "val2017.zip"
    archive.write_bytes(files["zips/val2017.zip"])
    out = tmp_path / "coco"
    # What an interrupted earlier run may leave: a staging folder and a folder with no marker,
    # holding some of the archive's files (each placed whole); beside them a file of the user's.
    (out / ".extract-val2017.zip" / "val2017").mkdir(parents=True)
    (out / "val2017").mkdir()
    first = sorted(images)[0]
    (out / first).write_bytes(images[first])
    (out / "val2017" / "mine.jpg").write_bytes(b"x")
    assert not dl.is_extracted("val2017.zip", out)
    assert dl.extract_zip(archive, out) == ["val2017"]
    assert sorted(os.listdir(out / "val2017")) == sorted(
        [n.split("/")[1] for n in images] + ["mine.jpg"])
    assert all((out / n).read_bytes() == data for n, data in images.items())
    assert (out / "val2017" / "mine.jpg").read_bytes() == b"x"      # never removed
    assert dl.is_extracted("val2017.zip", out) and not (out / ".extract-val2017.zip").exists()

    # Without an MD5 the zip's CRCs are checked: a flipped byte inside a member is caught.
    stored = io.BytesIO()
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("val2017/a.jpg", b"A" * 5000)
    raw = bytearray(stored.getvalue())
    raw[100] ^= 0xFF
    (tmp_path / "bad.zip").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="a.jpg fails its CRC check"):
        dl.extract_zip(tmp_path / "bad.zip", tmp_path / "x", check_crc=True)
    assert not dl.is_extracted("bad.zip", tmp_path / "x")
    (tmp_path / "slip.zip").write_bytes(_zip({"../evil.txt": b"x"}))
    with pytest.raises(DataError, match="unsafe member path"):
        dl.extract_zip(tmp_path / "slip.zip", tmp_path / "y")
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a valid zip"):
        dl.extract_zip(tmp_path / "junk.zip", tmp_path / "z")


def test_download_coco_cli_with_a_mirror_manifest(server, tmp_path, capsys):
    files, _ = _coco_archives()
    server.files.update(files)
    manifest = {part: {"path": f.path, "size": f.size, "md5": None}
                for part, f in _manifest(files).items()}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    parser = argparse.ArgumentParser(prog="mrcnn")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "download-coco", str(tmp_path / "coco"), "--parts",
                              "annotations", "val", "--base-url", server.url, "--manifest",
                              str(tmp_path / "manifest.json"), "--no-progress",
                              "--delete-archives"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"val_json: {tmp_path / 'coco' / 'annotations' / 'instances_val2017.json'}" in printed
    assert not list((tmp_path / "coco" / "downloads").iterdir())
    with pytest.raises(DataError, match=r"unknown parts \['test'\]"):
        dl.download_coco(tmp_path / "coco", ("test",), manifest=_manifest(files))
    (tmp_path / "bad.json").write_text("{\"val\": 3}")
    with pytest.raises(DataError, match="cannot read manifest"):
        dl.load_manifest(tmp_path / "bad.json")
