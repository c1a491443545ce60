"""The deploy loop under faults: broken sources (corrupt images, text files, empty folders,
damaged videos, a stream that stalls), a sink that fails, Ctrl-C, and the readers `infer` adds
(labels files, --ann JSON).

The pipeline runs three threads (decode, infer, encode). Each probe asserts the run ends (no
hang: the threads are gone afterwards), with one line naming the file or stream, or with a
documented, counted skip; outputs are whole files (no temporary file left) and inputs
unchanged.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_reliability_disk import cli_error
from test_reliability_models import (
    ROOT,
    digest,
    mrcnn_capped,
    one_error_line,
    temporaries,
    tiny_files,
)

import mrcnn_helpers.deploy.io as deploy_io
from mrcnn_helpers.cli import main
from mrcnn_helpers.deploy import open_sink, open_source, run_deploy
from mrcnn_helpers.errors import DataError, MrcnnError
from mrcnn_helpers.inference import Predictor

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:skipping cannot read image:UserWarning")]
CLASS_NAMES = ["background", "circle", "triangle", "square"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_files(tmp_path_factory.mktemp("deploy"))


@pytest.fixture
def predictor(files):
    return Predictor(files["tiny"].model, files["tiny"].spec, CLASS_NAMES)


def _frames(directory: Path, count: int, size=(64, 96)) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((*size, 3), 30 * i % 255, np.uint8)).save(directory / f"{i:03d}.png")
    return directory


def _video(path: Path, frames: int, fourcc: str = "MJPG") -> Path:
    cv2 = pytest.importorskip("cv2")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (96, 64))
    for i in range(frames):
        writer.write(np.full((64, 96, 3), 20 * i % 250, np.uint8))
    writer.release()
    return path


def _frames_in(path: Path) -> int:
    import cv2

    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


# ---------------------------------------------------------------------------------------------
# Sources


def test_corrupt_image_in_a_folder_is_skipped_and_counted(files, tmp_path, capsys):
    frames = _frames(tmp_path / "frames", 3)
    (frames / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    before = digest(frames)
    capsys.readouterr()
    with pytest.warns(UserWarning, match=f"skipping cannot read image {frames / '001.png'}"):
        assert main(["deploy", "-m", str(files["checkpoint"]), "-i", str(frames), "-o",
                     str(tmp_path / "out"), "--json", str(tmp_path / "stats.json")]) == 0
    err = capsys.readouterr().err
    assert f"skipped 1 unreadable images: 001.png: cannot read image {frames / '001.png'}" in err
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["frames"] == 2 and len(stats["skipped_images"]) == 1
    assert stats["skipped_images"][0].startswith("001.png: cannot read image")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000.png", "002.png"]
    assert digest(frames) == before and temporaries(tmp_path) == []


def test_source_faults_are_one_line(files, tmp_path, capsys):
    ckpt = str(files["checkpoint"])
    out = tmp_path / "out"
    broken = _frames(tmp_path / "broken", 2)
    for name in ("000.png", "001.png"):
        (broken / name).write_bytes(b"not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    garbage = tmp_path / "clip.mp4"
    garbage.write_bytes(os.urandom(4096))
    cases = {
        broken: f"none of the 2 images in {broken} can be read (e.g. 000.png: cannot read "
                f"image {broken / '000.png'}",
        empty / "readme.txt": f"input {empty / 'readme.txt'} is not a video file",
        empty: f"no images (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp) in {empty}",
        tmp_path / "missing": f"input not found: {tmp_path / 'missing'}",
    }
    if _has_cv2():
        cases[garbage] = f"cannot open video source {garbage}"
        cases["webcam:97"] = "cannot open video source webcam 97"
        cases["rtsp://127.0.0.1:9/none"] = "cannot open video source rtsp://127.0.0.1:9/none"
    for source, expected in cases.items():
        line = cli_error(capsys, "deploy", "-m", ckpt, "-i", str(source), "-o", str(out))
        assert line.startswith(f"error: {expected}"), line
        assert not out.exists() or not any(out.iterdir())
    assert temporaries(tmp_path) == []


def _has_cv2() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def test_truncated_and_undecodable_videos(predictor, tmp_path):
    data = _video(tmp_path / "clip.mkv", 6).read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 2 // 3])
    stats = run_deploy(predictor, open_source(cut), open_sink(tmp_path / "out"), progress=False)
    assert 0 < stats.frames < 6  # the frames before the cut, then the end
    assert len(list((tmp_path / "out").iterdir())) == stats.frames
    data = _video(tmp_path / "clip2.mkv", 6, fourcc="mp4v").read_bytes()
    half = tmp_path / "half.mkv"
    half.write_bytes(data[: len(data) // 2])  # opens, but no frame decodes
    with pytest.raises(DataError, match=f"no frame of {half} can be decoded"):
        run_deploy(predictor, open_source(half), open_sink(tmp_path / "out2"), progress=False)
    assert not any((tmp_path / "out2").iterdir())


class _Stalling(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _stalling_server(data: bytes, stall_s: float):
    """An HTTP server sending the first half of `data`, then nothing for `stall_s` seconds."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "video/x-msvideo")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            time.sleep(stall_s)

        def log_message(self, *args):
            pass

    server = _Stalling(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_stalled_stream_ends_the_run_in_one_line(files, tmp_path, capsys, monkeypatch):
    data = _video(tmp_path / "clip.avi", 30).read_bytes()
    server = _stalling_server(data, stall_s=30)
    monkeypatch.setattr(deploy_io, "STREAM_TIMEOUT_S", 1.0)
    url = f"http://127.0.0.1:{server.server_address[1]}/clip.avi"
    threads = threading.active_count()
    start = time.monotonic()
    try:
        line = cli_error(capsys, "deploy", "-m", str(files["checkpoint"]), "-i", url, "-o",
                         str(tmp_path / "out"))
    finally:
        server.shutdown()
        server.server_close()
    assert time.monotonic() - start < 25  # not the 30 s the server stalls
    assert line.startswith(f"error: stream {url} stopped sending frames after ")
    written = sorted((tmp_path / "out").iterdir())
    assert written and all(Image.open(p).size == (96, 64) for p in written)
    assert threading.active_count() <= threads + 1  # at most the server's request thread


# ---------------------------------------------------------------------------------------------
# Sinks and interruptions


class _FailingSink:
    def __init__(self, after: int):
        self.after, self.count, self.closed = after, 0, False

    def write(self, name, frame):
        if self.count == self.after:
            raise MrcnnError(f"could not write {name}: No space left on device (errno 28)")
        self.count += 1

    def close(self):
        self.closed = True


class _CountingSource:
    """Frames of 64x96; raises `fault` (an exception instance) after `after` frames."""

    def __init__(self, count: int, after: int | None = None, fault=None):
        self.count, self.after, self.fault = count, after, fault
        self.fps, self.inputs, self.closed = 10.0, [], False

    def __iter__(self):
        for i in range(self.count):
            if self.after is not None and i == self.after:
                raise self.fault
            yield f"frame_{i:06d}", np.full((64, 96, 3), 10 * i, np.uint8)

    def close(self):
        self.closed = True


def test_a_failing_writer_ends_the_run(predictor):
    threads = threading.active_count()
    source, sink = _CountingSource(40), _FailingSink(after=2)
    with pytest.raises(MrcnnError, match="could not write frame_000002: No space left"):
        run_deploy(predictor, source, sink, batch_size=1, progress=False, queue_size=2)
    assert sink.closed and source.closed and sink.count == 2
    assert threading.active_count() == threads


def test_a_failing_source_ends_the_run(predictor, tmp_path):
    threads = threading.active_count()
    source = _CountingSource(10, after=3, fault=DataError("stream x stopped sending frames"))
    sink = open_sink(tmp_path / "out")
    with pytest.raises(DataError, match="stream x stopped sending frames"):
        run_deploy(predictor, source, sink, batch_size=2, progress=False)
    assert source.closed and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"frame_{i:06d}.png" for i in range(3)]  # every frame read before the fault
    assert threading.active_count() == threads


class _GrayAt(_CountingSource):
    """Yields a 2-D frame at index `after`: the model's preprocessing fails on it."""

    def __iter__(self):
        for i, (name, frame) in enumerate(_CountingSource(self.count).__iter__()):
            yield name, frame[..., 0] if i == self.after else frame


@pytest.fixture(params=[False, True], ids=["writer-thread", "encoder-process"])
def encoder_process(request, monkeypatch):
    """Videos encoded by the writer thread, or by a child process (video_writer.py), as
    MRCNN_ENCODER_PROCESS=1 asks."""
    if request.param and not deploy_io.video_writer.available():
        pytest.skip("no /dev/shm")
    monkeypatch.setattr(deploy_io, "ENCODER_PROCESS_DEFAULT", request.param)
    return request.param


def _shm_files() -> set:
    return {p for p in os.listdir("/dev/shm") if p.startswith("mrcnn-frames-")} if os.path.isdir(
        "/dev/shm") else set()


def test_video_sink_publishes_only_whole_runs(predictor, tmp_path, encoder_process):
    """A video is written to a temporary file: a run that fails while inferring or writing
    leaves an older video as it was; a finished run, a source that stops (a stream that
    drops) and Ctrl-C replace it with the frames written. Either encoder leaves no process
    and no shared memory behind."""
    pytest.importorskip("cv2")
    children = _children()
    out = tmp_path / "out.avi"
    out.write_bytes(b"an older video")
    with pytest.raises(Exception) as info:
        run_deploy(predictor, _GrayAt(6, after=3), open_sink(out), batch_size=1,
                   progress=False)
    assert not isinstance(info.value, KeyboardInterrupt)
    assert out.read_bytes() == b"an older video" and temporaries(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        run_deploy(predictor, _CountingSource(6, after=3, fault=KeyboardInterrupt()),
                   open_sink(out), batch_size=1, progress=False)
    assert _frames_in(out) == 3 and temporaries(tmp_path) == []
    with pytest.raises(DataError, match="stopped"):
        run_deploy(predictor, _CountingSource(6, after=2, fault=DataError("stream stopped")),
                   open_sink(out), batch_size=1, progress=False)
    assert _frames_in(out) == 2 and temporaries(tmp_path) == []
    run_deploy(predictor, _CountingSource(5), open_sink(out), batch_size=2, progress=False)
    assert _frames_in(out) == 5 and temporaries(tmp_path) == []
    assert _children() == children and _shm_files() == set()


def _children() -> set:
    """Live child processes of this one (a finished encoder must not linger), from /proc."""
    found = set()
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(entry.parent.name))
    return found


def test_encoder_process_writes_what_the_writer_thread_writes(tmp_path):
    cv2 = pytest.importorskip("cv2")
    if not deploy_io.video_writer.available():
        pytest.skip("no /dev/shm")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(20)]  # > SLOTS
    decoded = {}
    for process in (False, True):  # the same encoder (mp4v) in either place
        sink = deploy_io.VideoSink(tmp_path / f"{process}.mp4", 10.0, encoder_process=process)
        for i, frame in enumerate(frames):
            sink.write(f"frame_{i:06d}", frame)
        sink.close()
        capture = cv2.VideoCapture(str(tmp_path / f"{process}.mp4"))
        decoded[process] = []
        while (got := capture.read())[0]:
            decoded[process].append(got[1])
        capture.release()
    assert len(decoded[True]) == 20
    assert all(np.array_equal(a, b) for a, b in zip(decoded[False], decoded[True], strict=True))


def test_avi_frames_are_jpeg_encoded_by_the_threads_that_prepare_them(tmp_path):
    """An .avi's frames are encoded in prepare() (several threads at once, in any order) and
    appended in write order: the video holds them in that order, close to the frames given;
    a frame of another size is resized to the first one's."""
    cv2 = pytest.importorskip("cv2")
    from concurrent.futures import ThreadPoolExecutor

    sink = deploy_io.VideoSink(tmp_path / "out.avi", 10.0)
    if not sink.jpeg_frames:
        pytest.skip("this OpenCV has no raw video writing")
    frames = [np.full((48, 64, 3), (10 * i, 255 - 10 * i, 128), np.uint8) for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        prepared = list(pool.map(sink.prepare, frames))
    assert all(isinstance(p, deploy_io.EncodedFrame) and (p.height, p.width) == (48, 64)
               for p in prepared)
    for i, p in enumerate(prepared):
        sink.write_prepared(f"frame_{i:06d}", p)
    sink.write("other_size", np.zeros((30, 40, 3), np.uint8))
    sink.close()
    capture = cv2.VideoCapture(str(tmp_path / "out.avi"))
    decoded = []
    while (got := capture.read())[0]:
        decoded.append(cv2.cvtColor(got[1], cv2.COLOR_BGR2RGB))
    capture.release()
    assert len(decoded) == 13 and decoded[-1].shape == (48, 64, 3)
    errors = [np.abs(d.astype(int) - f).mean() for d, f in zip(decoded, frames, strict=False)]
    assert max(errors) < 3.0, errors
    assert np.abs(decoded[-1].astype(int)).mean() < 3.0


def test_an_encoder_that_dies_ends_the_run_naming_the_video(predictor, tmp_path):
    """The encoder process killed mid-run: one DataError naming the video, an older video
    left as it was, no temporary file or shared memory left."""
    pytest.importorskip("cv2")
    if not deploy_io.video_writer.available():
        pytest.skip("no /dev/shm")
    out = tmp_path / "out.avi"
    out.write_bytes(b"an older video")
    sink = deploy_io.VideoSink(out, 10.0, encoder_process=True)
    sink.write("frame_000000", np.zeros((64, 96, 3), np.uint8))
    sink._process._process.kill()
    with pytest.raises(DataError, match=r"the encoder of .*out\.avi stopped"):
        run_deploy(predictor, _CountingSource(40), sink, batch_size=2, progress=False)
    assert out.read_bytes() == b"an older video" and temporaries(tmp_path) == []
    assert _shm_files() == set()


def test_an_encoder_that_cannot_start_falls_back_to_the_writer_thread(tmp_path, monkeypatch):
    pytest.importorskip("cv2")
    if not deploy_io.video_writer.available():
        pytest.skip("no /dev/shm")
    monkeypatch.setattr(deploy_io.video_writer.sys, "executable", "/bin/false")
    sink = deploy_io.VideoSink(tmp_path / "out.avi", 10.0, encoder_process=True)
    frame = np.zeros((64, 96, 3), np.uint8)
    with pytest.warns(UserWarning, match="encoding in the writer thread instead"):
        sink.write("frame_000000", frame)  # the first frame opens the video
    for i in (1, 2):
        sink.write(f"frame_{i:06d}", frame)
    sink.close()
    assert _frames_in(tmp_path / "out.avi") == 3 and temporaries(tmp_path) == []


def _default_sigint():
    """A shell without job control starts background jobs with SIGINT ignored, and children
    inherit that (then Python installs no KeyboardInterrupt handler): give the child the
    default disposition a terminal's Ctrl-C meets."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_through_the_command_line(files, tmp_path):
    """SIGINT to a real `mrcnn deploy` process: exit 130, `interrupted`, no traceback; every
    frame written is a whole image and no temporary file is left."""
    # Enough frames that the run cannot finish between the first frame written and the signal.
    frames = _frames(tmp_path / "frames", 600)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mrcnn_helpers", "deploy", "-m",
                             str(files["checkpoint"]), "-i", str(frames), "-o", str(out),
                             "--batch-size", "1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(p.suffix == ".png" for p in out.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted"
    written = sorted(out.iterdir())
    assert 0 < len(written) < 600 and temporaries(tmp_path) == []
    for path in written:
        Image.open(path).load()


def test_ctrl_c_at_a_terminal_keeps_the_video_written_by_the_encoder_process(files, tmp_path):
    """Ctrl-C at a terminal signals the whole process group, the encoder process too: it
    ignores the signal, the run ends with `interrupted` and the video holds the frames written
    before it, published whole."""
    pytest.importorskip("cv2")
    if not deploy_io.video_writer.available():
        pytest.skip("no /dev/shm")
    frames = _frames(tmp_path / "frames", 600)
    out = tmp_path / "out.avi"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MRCNN_ENCODER_PROCESS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mrcnn_helpers", "deploy", "-m",
                             str(files["checkpoint"]), "-i", str(frames), "-o", str(out),
                             "--batch-size", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint,  # noqa: PLW1509 - no threads yet
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (err := proc.stderr.readline()).startswith("deploy: 50 frames"):
        assert err or proc.poll() is None, "the run ended before 50 frames"
        assert time.monotonic() < deadline
    os.killpg(proc.pid, signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in rest, rest[-3000:]
    assert rest.strip().splitlines()[-1] == "interrupted"
    assert 50 <= _frames_in(out) < 600 and temporaries(tmp_path) == []


@pytest.mark.parametrize("case", ["checkpoint, video to folder", "ONNX, folder to video"])
def test_deploy_under_a_4_gib_address_space_limit(files, tmp_path, case):
    """Under `ulimit -v 4194304` (torch alone maps 3.2 GiB), deploy either runs or ends in one
    line saying it ran out of memory: never a signal (OpenCV's start-up used to crash with
    SIGSEGV once ONNX Runtime was loaded) nor a traceback (torch's and oneDNN's allocation
    errors)."""
    pytest.importorskip("cv2")
    if case.startswith("ONNX") and "onnx" not in files:
        pytest.skip("needs onnx and onnxruntime")
    if case.startswith("checkpoint"):
        model, source, out = files["checkpoint"], _video(tmp_path / "clip.avi", 8), tmp_path / "o"
    else:
        model, source, out = files["onnx"], files["images"], tmp_path / "o.avi"
    result = mrcnn_capped("deploy", "-m", model, "-i", source, "-o", out)
    assert result.returncode in (0, 2), result.stderr[-3000:]  # not -11 / 139 (SIGSEGV)
    if result.returncode == 2:
        assert "ran out of memory" in one_error_line(result)
    else:
        frames = _frames_in(out) if out.suffix else len(list(out.iterdir()))
        assert frames == (8 if case.startswith("checkpoint") else 2)
    assert temporaries(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Readers of `infer`: labels files and --ann


def test_labels_and_annotation_file_faults(files, tmp_path, capsys):
    ckpt, images = str(files["checkpoint"]), str(files["images"])
    out = tmp_path / "out"
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as handle:
        handle.truncate(64 << 20)
    two = tmp_path / "two.txt"
    two.write_text("circle\ntriangle\n")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [{"id": 7, "file_name": "elsewhere.png",
                                             "width": 96, "height": 64}],
                                 "annotations": [], "categories": []}))
    cases = {
        ("-l", str(two)): f"{two}: 2 labels, but the model has 3 classes",
        ("-l", str(binary)): f"labels file {binary} is not UTF-8 text",
        ("-l", str(huge)): f"labels file {huge} is {64 << 20} bytes, more than a labels file's",
        ("-l", str(files["results"])): f"labels file {files['results']} is a folder",
        ("-l", str(deep)): f"{deep}: 1 labels, but the model has 3 classes",
        ("--ann", str(tmp_path / "missing.json")): str(tmp_path / "missing.json"),
        ("--ann", str(binary)): str(binary),
        ("--ann", str(deep)): str(deep),
        ("--ann", str(other)): f"2 images of the input folder are not in {other}",
    }
    for (option, value), expected in cases.items():
        line = cli_error(capsys, "infer", "-m", ckpt, "-i", images, "-o", str(out), option, value)
        assert line.startswith("error: ") and expected in line, (option, value, line)
        assert not out.exists() or not any(out.iterdir())


def test_no_room_in_dev_shm_falls_back_to_the_writer_thread(tmp_path, monkeypatch):
    """/dev/shm too small for the frames (Docker's default 64 MB and a 4K video): a warning,
    then the writer thread encodes; nothing is left in /dev/shm."""
    pytest.importorskip("cv2")
    if not deploy_io.video_writer.available():
        pytest.skip("no /dev/shm")

    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(deploy_io.video_writer.os, "posix_fallocate", no_space)
    sink = deploy_io.VideoSink(tmp_path / "out.avi", 10.0, encoder_process=True)
    frame = np.zeros((64, 96, 3), np.uint8)
    with pytest.warns(UserWarning, match=r"no room for 8 frames of 96x64 in /dev/shm"):
        sink.write("frame_000000", frame)
    sink.write("frame_000001", frame)
    sink.close()
    assert _frames_in(tmp_path / "out.avi") == 2 and _shm_files() == set()
