"""Frame sources and sinks of the deploy pipeline.

Sources yield (name, frame) pairs, frame an RGB uint8 numpy array [h, w, 3]:
  - a directory of images (sorted by name, named by their file names; the toolkit's one image
    reader, works without OpenCV);
  - a video file, an RTSP/HTTP stream URL, or a webcam ("webcam", "webcam:N" or a device number)
    through OpenCV (`pip install opencv-python-headless`); frames named frame_000000, ...
Sinks take (name, frame): an .mp4/.avi/.mkv file (OpenCV's VideoWriter) or a directory (one
image per frame under the frame's name, so an annotated folder mirrors its input folder).
An .avi is Motion JPEG, every frame a JPEG of its own: its frames are encoded in parallel by the
threads that call `prepare` (the deploy pipeline's drawing pool), which is what keeps a
1344x832 video at the pipeline's rate; an .mp4 (mp4v) predicts each frame from the one before,
so one thread encodes it, 5-7 ms a frame on the H200 machine's cores (BENCHMARKS.md).

What goes wrong, and what happens then: an unreadable image in a folder is skipped, named in a
warning and counted (`source.skipped`), as a video decoder drops a broken frame; a folder with
no readable image is an error. A stream that sends nothing for STREAM_TIMEOUT_S seconds ends
the run with a DataError (never a silent end, never a hang). Every image a sink writes is
written atomically; a video is written to a temporary file beside the output and renamed over
it when the run ends, when its source stops or after Ctrl-C (the frames so far make a valid
video), and removed when inference or writing fails, leaving an older video there as it was.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from mrcnn_helpers import video_writer
from mrcnn_helpers.data.images import list_image_files, load_image
from mrcnn_helpers.errors import DataError, MrcnnError
from mrcnn_helpers.fileio import PendingFile, atomic_output, check_output_path, check_writable_dir
from mrcnn_helpers.video_writer import ProcessVideoWriter

# A video is encoded by the writer thread unless MRCNN_ENCODER_PROCESS=1 asks for a process of
# its own (video_writer.py): measured on the H200 machine (16 cores, 2026-12-02,
# benchmarks/bench_deploy.py, docs/runs/bench_h200_deploy_encoder_process.txt) the process made
# 90.5 FPS and the thread 105.5 at 20 detections per frame: the thread stays the default.
ENCODER_PROCESS_DEFAULT = False
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm")
STREAM_PREFIXES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "rtmp://")
DEFAULT_FPS = 30.0
# How long a stream may send nothing (at open and between frames) before the run stops.
STREAM_TIMEOUT_S = 20.0
# FourCC per container: mp4v plays everywhere OpenCV's bundled FFmpeg can write it.
FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "mp4v",
          ".webm": "VP80"}
# Motion JPEG frames are encoded by cv2.imencode (libjpeg-turbo; it releases the GIL, so the
# threads calling VideoSink.prepare encode side by side) and appended as they are by OpenCV's
# FFmpeg muxer (VIDEOWRITER_PROP_RAW_VIDEO). Quality 90: ~45 KB for a 1344x832 frame of the
# deploy benchmark, 2.5 ms of one core.
JPEG_QUALITY = 90


class EncodedFrame(NamedTuple):
    """A frame VideoSink.prepare encoded already (Motion JPEG): its bytes and its size."""

    data: np.ndarray  # uint8 [1, n]
    height: int
    width: int


def import_cv2(what: str):
    try:
        import cv2
    except ImportError:
        raise DataError(f"{what} needs OpenCV: pip install opencv-python-headless (a directory "
                        "of images works without it)") from None
    return cv2


def uses_opencv(source, output) -> bool:
    """Whether reading `source` or writing `output` needs OpenCV (anything but image folders)."""
    text = str(source)
    reads_video = not Path(text).is_dir()
    return reads_video or Path(str(output)).suffix.lower() in VIDEO_SUFFIXES


class ImageDirSource:
    """Frames from the images of a directory, in file-name order. An image that cannot be read
    (corrupt, truncated, over the pixel limit) is skipped with a warning naming it and listed
    in `skipped` ("file: reason"); DataError when none of them can be read."""

    def __init__(self, directory):
        self.files = list_image_files(directory)
        self.fps = DEFAULT_FPS
        self.name = str(directory)
        self.inputs = [str(directory)]
        self.skipped: list[str] = []

    def __iter__(self):
        read = 0
        for path in self.files:
            try:
                frame = load_image(path).permute(1, 2, 0).numpy()
            except DataError as exc:
                self.skipped.append(f"{path.name}: {str(exc).split('; ')[0]}")
                warnings.warn(f"skipping {exc}", stacklevel=1)
                continue
            read += 1
            yield path.name, frame
        if read == 0:
            raise DataError(f"none of the {len(self.files)} images in {self.name} can be read "
                            f"(e.g. {self.skipped[0]})")

    def close(self):
        pass


class VideoSource:
    """Frames of a video file, stream or camera through cv2.VideoCapture (BGR -> RGB).

    A stream gets OpenCV's open and read timeouts (STREAM_TIMEOUT_S): a stream that stalls or
    drops ends with a DataError after that long. A video file ends at its last decodable frame;
    one with no decodable frame is a DataError.
    """

    def __init__(self, target, name: str, *, stream: bool = False):
        cv2 = import_cv2(f"reading {name}")
        self._cv2 = cv2
        self.stream = stream
        timeout = int(STREAM_TIMEOUT_S * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout, cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                  timeout] if stream and hasattr(cv2, "CAP_PROP_READ_TIMEOUT_MSEC") else []
        self.capture = (cv2.VideoCapture(target, cv2.CAP_ANY, params) if params
                        else cv2.VideoCapture(target))
        if not self.capture.isOpened():
            raise DataError(f"cannot open video source {name}: missing file, unsupported codec, "
                            "unreachable stream or busy camera")
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else DEFAULT_FPS
        self.name = name
        self.inputs = [target] if isinstance(target, str) and Path(target).exists() else []

    def __iter__(self):
        index = 0
        while True:
            ok, frame = self.capture.read()
            if not ok or frame is None:
                break
            yield f"frame_{index:06d}", self._cv2.cvtColor(frame, self._cv2.COLOR_BGR2RGB)
            index += 1
        if self.stream:
            raise DataError(f"stream {self.name} stopped sending frames after {index} (nothing "
                            f"for {STREAM_TIMEOUT_S:.0f} s, or it closed)")
        if index == 0:
            raise DataError(f"no frame of {self.name} can be decoded: a damaged or empty video")

    def close(self):
        self.capture.release()


def open_source(spec: str):
    """A frame source for a directory, video file, stream URL or webcam (see module doc)."""
    text = str(spec)
    match = re.fullmatch(r"(?:webcam|camera)(?::(\d+))?|(\d+)", text)
    if match:
        index = int(match.group(1) or match.group(2) or 0)
        return VideoSource(index, f"webcam {index}", stream=True)
    if text.lower().startswith(STREAM_PREFIXES):
        return VideoSource(text, text, stream=True)
    path = Path(text)
    if path.is_dir():
        return ImageDirSource(path)
    if not path.exists():
        raise DataError(f"input not found: {text} (give a video file, a directory of images, an "
                        "rtsp:// URL or 'webcam')")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        # FFmpeg would "decode" almost anything (a text file renders as a picture of its text).
        raise DataError(f"input {text} is not a video file ({', '.join(VIDEO_SUFFIXES)}), a "
                        "directory of images, a stream URL or 'webcam'")
    return VideoSource(str(path), str(path))


class ImageDirSink:
    """Writes each frame into a directory under its name (an image file's name is kept, a video
    frame's name gets .png), atomically: a failed write (full disk) leaves no partial file."""

    def __init__(self, directory):
        self.directory = check_writable_dir(directory, option="output")
        self.count = 0

    def write(self, name: str, frame: np.ndarray) -> None:
        path = self.directory / (name if Path(name).suffix else f"{name}.png")
        fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
        with atomic_output(path, "wb", what="annotated frame") as f:
            Image.fromarray(frame).save(f, format=fmt)
        self.count += 1

    def close(self):
        pass


class VideoSink:
    """Writes frames into a video file; opened at the first frame (its size fixes the video's).

    The frames go to a temporary file beside the output (fileio.PendingFile). `close()` renames
    it over the output once the video is found to hold the frames written, unless an error
    other than KeyboardInterrupt is propagating through the caller (inference or writing
    failed): then it is removed and an older video at the output path stays as it was. The
    pipeline closes its sink before it re-raises a source's error, so a stream that stops
    keeps the frames it sent.

    encoder_process: encode in a child process (video_writer.ProcessVideoWriter) rather than in
    the calling thread; None decides by MRCNN_ENCODER_PROCESS (=1 or =0), else
    ENCODER_PROCESS_DEFAULT (never for an .avi, whose frames `prepare` encodes, unless asked
    for). A child that cannot start, or no room for its frames, falls back to the calling
    thread with a warning. `prepare(frame)` (the BGR conversion, and for an .avi the JPEG
    encoding) may run on other threads, several at once, before `write_prepared`; `write` does
    both.
    """

    def __init__(self, path, fps: float, *, encoder_process: bool | None = None):
        self.path = Path(path)
        self._cv2 = import_cv2(f"writing {self.path}")
        self.fps = float(fps)
        self.writer = None
        self.pending = None
        self.size = None
        self.count = 0
        self.fourcc = FOURCC.get(self.path.suffix.lower(), "mp4v")
        jpeg = self.fourcc == "MJPG" and hasattr(self._cv2, "VIDEOWRITER_PROP_RAW_VIDEO")
        if encoder_process is None:
            choice = os.environ.get("MRCNN_ENCODER_PROCESS", "")
            encoder_process = (choice == "1" if choice in ("0", "1")
                               else ENCODER_PROCESS_DEFAULT and not jpeg)
        # Frames encoded by prepare(), appended by the writer (see JPEG_QUALITY).
        self.jpeg_frames = jpeg and not encoder_process
        # Started now: the child imports OpenCV while the model warms up.
        self._process = (ProcessVideoWriter(str(self.path))
                         if encoder_process and video_writer.available() else None)

    def _open(self, h: int, w: int) -> None:
        cv2 = self._cv2
        self.pending = PendingFile(self.path, error=DataError, what="video")
        fourcc = self.fourcc
        if self._process is not None:
            try:
                opened = self._process.open(self.pending.tmp, fourcc, self.fps, h, w)
                self.writer = self._process
            except DataError as exc:  # the child could not start: encode in this process
                warnings.warn(f"no encoder process ({exc}); encoding in the writer thread "
                              "instead", stacklevel=2)
                self._process = None
        if self._process is None:
            raw = [cv2.VIDEOWRITER_PROP_RAW_VIDEO, 1] if self.jpeg_frames else []
            self.writer = cv2.VideoWriter(str(self.pending.tmp), cv2.CAP_FFMPEG,
                                          cv2.VideoWriter_fourcc(*fourcc), self.fps, (w, h), raw)
            opened = self.writer.isOpened()
        if not opened:
            if self._process is not None:
                self._process.kill()
            self.writer = None
            self.pending.discard()
            raise DataError(f"cannot write video {self.path}: OpenCV has no encoder for "
                            f"{self.path.suffix}; try .avi, or an output directory")
        self.size = (h, w)

    def prepare(self, frame: np.ndarray) -> np.ndarray | EncodedFrame:
        """An RGB frame as the encoder takes it (BGR; for an .avi, encoded as JPEG): the part
        of writing that can run on other threads (the deploy pipeline's drawing threads, side by
        side) before write_prepared."""
        bgr = self._cv2.cvtColor(frame, self._cv2.COLOR_RGB2BGR)
        return self._encode(bgr) if self.jpeg_frames else bgr

    def _encode(self, bgr: np.ndarray) -> EncodedFrame:
        ok, data = self._cv2.imencode(".jpg", bgr, [self._cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise DataError(f"cannot encode a {bgr.shape[1]}x{bgr.shape[0]} frame of "
                            f"{self.path} as JPEG")
        return EncodedFrame(data.reshape(1, -1), int(bgr.shape[0]), int(bgr.shape[1]))

    def write_prepared(self, name: str, frame: np.ndarray | EncodedFrame) -> None:
        """Encode (or append) a frame from prepare(); a frame of another size than the first
        is resized."""
        encoded = isinstance(frame, EncodedFrame)
        h, w = (frame.height, frame.width) if encoded else frame.shape[:2]
        if self.writer is None:
            self._open(h, w)
        if (h, w) != self.size:  # rare: a folder of images of several sizes
            if encoded:
                frame = self._cv2.imdecode(frame.data.reshape(-1), self._cv2.IMREAD_COLOR)
            frame = self._cv2.resize(frame, (self.size[1], self.size[0]))
            encoded = False
        if self.jpeg_frames and not encoded:
            frame = self._encode(frame)
        self.writer.write(frame.data if self.jpeg_frames else frame)
        self.count += 1

    def write(self, name: str, frame: np.ndarray) -> None:
        self.write_prepared(name, self.prepare(frame))

    def _frames_in(self, path) -> int:
        capture = self._cv2.VideoCapture(str(path))
        try:
            return int(capture.get(self._cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
        finally:
            capture.release()

    def close(self):
        if self.writer is None:
            if self._process is not None:
                self._process.kill()
            return
        failing = sys.exc_info()[0]
        if failing is not None and not issubclass(failing, KeyboardInterrupt):
            if self._process is not None:
                self._process.kill()
            else:
                self.writer.release()
            self.writer = None
            self.pending.discard()
            return
        try:
            self.writer.release()
        except DataError:
            self.pending.discard()
            raise
        finally:
            self.writer = None
        # OpenCV reports no write errors (a full disk truncates the file silently): count.
        found = self._frames_in(self.pending.tmp)
        if found < self.count:
            self.pending.discard()
            raise DataError(f"could not write video {self.path}: it holds {found} of the "
                            f"{self.count} frames written (disk full?); an older file there, "
                            "if any, is unchanged")
        self.pending.commit()


def open_sink(output, fps: float = DEFAULT_FPS, inputs=()):
    """A video file sink for a video suffix, otherwise an image directory sink. inputs: what the
    run reads (the source's files, the model): the output may not be one of them or lie inside
    one (MrcnnError naming both)."""
    check_output_path(output, inputs, option="output")
    path = Path(output)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        if path.is_dir():
            raise MrcnnError(f"output {output} is a folder: name a video file, or drop the "
                             f"{path.suffix} suffix for a folder of annotated frames")
        return VideoSink(path, fps)
    if path.suffix:
        raise DataError(f"output {output}: give a video file ({', '.join(VIDEO_SUFFIXES)}) or a "
                        "directory for annotated frames")
    return ImageDirSink(path)
